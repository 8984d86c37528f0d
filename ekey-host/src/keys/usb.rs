//! Keys on USB through `nusb` (usbfs): finding `20df:0001` devices,
//! claiming their CDC data interface (detaching `cdc_acm`), and the bulk
//! endpoints found from the descriptors, as a [`Link`].

use std::io;

use std::io::{Read, Write};
use std::time::Duration;

use nusb::MaybeFuture;
use nusb::descriptors::TransferType;
pub use nusb::hotplug::HotplugWatch;
use nusb::transfer::{Bulk, Direction, In, Out};
pub use nusb::{Device, DeviceId, DeviceInfo};

use crate::keys::transport::Link;

/// Simtec's USB vendor id.
pub const VENDOR_ID: u16 = 0x20df;
/// The Entropy Key's product id.
pub const PRODUCT_ID: u16 = 0x0001;

/// How often, and how far apart, a busy interface is claimed again.
const CLAIM_RETRIES: u32 = 15;
const CLAIM_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(200);

/// The CDC data interface class.
const CDC_DATA: u8 = 0x0a;

/// Whether a USB device is an Entropy Key.
pub fn is_entropy_key(d: &DeviceInfo) -> bool {
    d.vendor_id() == VENDOR_ID && d.product_id() == PRODUCT_ID
}

/// Every Entropy Key on USB now.
pub async fn list() -> io::Result<Vec<DeviceInfo>> {
    let all = nusb::list_devices().await.map_err(|e| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("cannot list USB devices ({e}): is there USB on this machine (/sys/bus/usb)?"),
        )
    })?;
    Ok(all.filter(is_entropy_key).collect())
}

/// A short description of where a key sits: `usb 1-2 (bus 1, address 5)`.
pub fn describe(d: &DeviceInfo) -> String {
    format!(
        "usb {} (bus {}, address {})",
        d.port_chain()
            .iter()
            .map(u8::to_string)
            .collect::<Vec<_>>()
            .join("."),
        bus(d),
        d.device_address()
    )
}

#[cfg(target_os = "linux")]
fn bus(d: &DeviceInfo) -> u8 {
    d.busnum()
}

#[cfg(not(target_os = "linux"))]
fn bus(d: &DeviceInfo) -> &str {
    d.bus_id()
}

/// The data interface and its bulk endpoints, from the descriptors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataInterface {
    /// Interface number.
    pub interface: u8,
    /// Bulk IN endpoint address.
    pub ep_in: u8,
    /// Bulk OUT endpoint address.
    pub ep_out: u8,
}

/// Finds the CDC data interface with one bulk IN and one bulk OUT endpoint.
pub fn find_data_interface(dev: &Device) -> io::Result<DataInterface> {
    let cfg = dev
        .active_configuration()
        .map_err(|e| io::Error::other(format!("no active configuration: {e}")))?;
    for alt in cfg.interface_alt_settings() {
        if alt.class() != CDC_DATA || alt.alternate_setting() != 0 {
            continue;
        }
        let bulk = |dir: Direction| {
            alt.endpoints()
                .find(|e| e.transfer_type() == TransferType::Bulk && e.direction() == dir)
                .map(|e| e.address())
        };
        if let (Some(ep_in), Some(ep_out)) = (bulk(Direction::In), bulk(Direction::Out)) {
            return Ok(DataInterface {
                interface: alt.interface_number(),
                ep_in,
                ep_out,
            });
        }
    }
    Err(io::Error::other(
        "no CDC data interface with bulk IN and OUT endpoints",
    ))
}

/// Opens a key: claims its data interface (detaching `cdc_acm`, which
/// nusb re-attaches when the link is dropped) and keeps IN transfers
/// queued.
pub async fn open(info: &DeviceInfo) -> io::Result<(Link, Device)> {
    let dev = info.open().await.map_err(|e| {
        io::Error::new(
            io::Error::from(e.clone()).kind(),
            format!("{}: cannot open: {e}", describe(info)),
        )
    })?;
    let data = find_data_interface(&dev)?;
    // A handle that was just dropped (the daemon letting go of the key for
    // a `rekey`, or `rekey` handing it back) releases the interface once
    // its transfers are cancelled: "busy" for a moment is retried.
    let mut attempts = 0;
    let intf = loop {
        match dev.detach_and_claim_interface(data.interface).await {
            Ok(intf) => break intf,
            Err(e) if e.kind() == nusb::ErrorKind::Busy && attempts < CLAIM_RETRIES => {
                attempts += 1;
                tokio::time::sleep(CLAIM_RETRY_DELAY).await;
            }
            Err(e) => {
                return Err(io::Error::other(format!(
                    "{}: cannot claim interface {}: {e}",
                    describe(info),
                    data.interface
                )));
            }
        }
    };
    let ep_in = intf
        .endpoint::<Bulk, In>(data.ep_in)
        .map_err(|e| io::Error::other(format!("endpoint {:#04x}: {e}", data.ep_in)))?;
    let ep_out = intf
        .endpoint::<Bulk, Out>(data.ep_out)
        .map_err(|e| io::Error::other(format!("endpoint {:#04x}: {e}", data.ep_out)))?;
    // One packet per transfer. A bulk IN transfer ends only when full or on
    // a short packet; at full speed every 64-byte frame is a full packet, so
    // a larger transfer could sit on an S! or K! until enough other frames
    // arrive to fill it. 32 in flight hold ~370 ms of a key's frames at
    // full speed, well over the driver's 100 ms between wake-ups, so the
    // key is never kept waiting.
    let mps = ep_in.max_packet_size().max(64);
    tracing::info!(
        "{}: claimed interface {}, bulk IN {:#04x} and OUT {:#04x}, {mps}-byte packets",
        describe(info),
        data.interface,
        data.ep_in,
        data.ep_out
    );
    let reader = ep_in.reader(mps).with_num_transfers(32);
    let writer = ep_out.writer(512);
    Ok((Box::new(tokio::io::join(reader, writer)), dev))
}

/// Resets the device's USB port (it re-enumerates; the old handle is dead).
pub async fn reset(dev: &Device) -> io::Result<()> {
    dev.reset().await.map_err(io::Error::from)
}

/// Hot-plug events for Entropy Keys.
pub enum Hotplug {
    /// A key appeared (boxed: a device's information is large on some
    /// systems).
    Arrived(Box<DeviceInfo>),
    /// A device went away (any device: match the id).
    Left(DeviceId),
}

/// Watches for keys coming and going. Create it before listing, so that
/// no key is missed.
pub fn watch() -> io::Result<HotplugWatch> {
    nusb::watch_devices().map_err(io::Error::from)
}

/// The next hot-plug event that concerns keys.
pub async fn next_event(w: &mut HotplugWatch) -> Option<Hotplug> {
    use futures_lite::StreamExt;
    loop {
        match w.next().await? {
            nusb::hotplug::HotplugEvent::Connected(d) if is_entropy_key(&d) => {
                return Some(Hotplug::Arrived(Box::new(d)));
            }
            nusb::hotplug::HotplugEvent::Disconnected(id) => return Some(Hotplug::Left(id)),
            _ => {}
        }
    }
}

/// Blocking variant of [`list`] for simple tools.
pub fn list_blocking() -> io::Result<Vec<DeviceInfo>> {
    Ok(nusb::list_devices()
        .wait()
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("cannot list USB devices: {e}"),
            )
        })?
        .filter(is_entropy_key)
        .collect())
}

/// A USB key's data interface as one blocking reader and writer.
pub struct BlockingUsb {
    reader: nusb::io::EndpointRead<Bulk>,
    writer: nusb::io::EndpointWrite<Bulk>,
}

impl Read for BlockingUsb {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.reader.read(buf)
    }
}

impl Write for BlockingUsb {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// Blocking variant of [`open`] for simple tools: reads return after
/// `poll` with whatever came, possibly nothing.
pub fn open_blocking(info: &DeviceInfo, poll: Duration) -> io::Result<BlockingUsb> {
    let dev = info.open().wait()?;
    let data = find_data_interface(&dev)?;
    let intf = dev.detach_and_claim_interface(data.interface).wait()?;
    let ep_in = intf.endpoint::<Bulk, In>(data.ep_in)?;
    let ep_out = intf.endpoint::<Bulk, Out>(data.ep_out)?;
    let mps = ep_in.max_packet_size().max(64);
    let reader = ep_in
        .reader(mps)
        .with_num_transfers(8)
        .with_read_timeout(poll);
    let writer = ep_out
        .writer(512)
        .with_write_timeout(Duration::from_secs(5));
    Ok(BlockingUsb { reader, writer })
}
