//! Keys: their transports (ttys, Unix sockets, USB via nusb, the built-in
//! software key) and the driver that runs one key's session and health gate
//! over a link.

pub mod driver;
pub mod soft;
pub mod ticker;
pub mod transport;
pub mod usb;
