//! Raw USB where nusb has no backend (the BSDs): no key is ever listed,
//! and asking for USB says to name the key's tty instead (umodem/ucom
//! makes it `/dev/cuaU0` or `/dev/ttyU0`).
//!
//! The types are empty enums, so the code that drives USB keys compiles
//! everywhere and can never be reached here.

use std::io;
use std::time::Duration;

use crate::keys::transport::Link;

/// Simtec's USB vendor id.
pub const VENDOR_ID: u16 = 0x20df;
/// The Entropy Key's product id.
pub const PRODUCT_ID: u16 = 0x0001;

/// A USB device (none exist here).
pub enum DeviceInfo {}
/// A USB device's id (none exist here).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceId {}
/// An opened USB device (none exist here).
pub enum Device {}
/// A hot-plug watch (none can be made here).
pub enum HotplugWatch {}
/// A blocking USB link (none can be opened here).
pub enum BlockingUsb {}

impl DeviceInfo {
    /// The device's id.
    pub fn id(&self) -> DeviceId {
        match *self {}
    }
    /// The device's serial number string.
    pub fn serial_number(&self) -> Option<&str> {
        match *self {}
    }
}

/// The error every USB operation gives here.
pub fn unsupported() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "raw USB is not supported on this system (nusb runs on Linux, macOS and Windows): \
         name the key's tty instead, e.g. --device /dev/cuaU0 (umodem/ucom)",
    )
}

/// Whether a USB device is an Entropy Key.
pub fn is_entropy_key(d: &DeviceInfo) -> bool {
    match *d {}
}

/// Every Entropy Key on USB now: an error here.
pub async fn list() -> io::Result<Vec<DeviceInfo>> {
    Err(unsupported())
}

/// Blocking variant of [`list`].
pub fn list_blocking() -> io::Result<Vec<DeviceInfo>> {
    Err(unsupported())
}

/// Where a key sits.
pub fn describe(d: &DeviceInfo) -> String {
    match *d {}
}

/// Opens a key.
pub async fn open(info: &DeviceInfo) -> io::Result<(Link, Device)> {
    match *info {}
}

/// Blocking variant of [`open`].
pub fn open_blocking(info: &DeviceInfo, _poll: Duration) -> io::Result<BlockingUsb> {
    match *info {}
}

impl io::Read for BlockingUsb {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        match *self {}
    }
}

impl io::Write for BlockingUsb {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        match *self {}
    }
    fn flush(&mut self) -> io::Result<()> {
        match *self {}
    }
}

/// Resets the device's USB port.
pub async fn reset(dev: &Device) -> io::Result<()> {
    match *dev {}
}

/// Hot-plug events for Entropy Keys.
pub enum Hotplug {
    /// A key appeared.
    Arrived(Box<DeviceInfo>),
    /// A device went away.
    Left(DeviceId),
}

/// Watches for keys coming and going: an error here.
pub fn watch() -> io::Result<HotplugWatch> {
    Err(unsupported())
}

/// The next hot-plug event that concerns keys.
pub async fn next_event(w: &mut HotplugWatch) -> Option<Hotplug> {
    match *w {}
}
