//! Keys: their transports (ttys, Unix sockets, USB via nusb, the built-in
//! software key) and the driver that runs one key's session and health gate
//! over a link.

pub mod driver;
pub mod estimate;
pub mod soft;
pub mod ticker;
pub mod transport;
#[cfg_attr(not(usb), path = "usb_none.rs")]
pub mod usb;
