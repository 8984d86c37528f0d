//! A [`usb-device`](usb_device) class that makes a microcontroller an
//! Entropy Key.
//!
//! [`EntropyKeyClass`] presents the USB interfaces of the real key and runs
//! a software key ([`Device`]) behind them, fed by a noise source the
//! firmware supplies. A host (this project's `ekey-host`, or the vendor's
//! `ekeyd` through the kernel's `cdc_acm` tty) then treats the
//! microcontroller as an Entropy Key.
//!
//! # What the host sees
//!
//! The real key is a classic CDC-ACM device: device class `02` (no
//! interface association descriptor), one configuration with
//!
//! | interface | class | endpoints |
//! |---|---|---|
//! | 0, communication | `02/02/00` (CDC, ACM, no protocol) with the CDC header (1.10), call management, ACM (`bmCapabilities` `0x02`: line coding and control line state) and union (0 → 1) functional descriptors | interrupt IN `0x82` (notifications, 16 bytes, 16 ms; nothing is ever sent on it) |
//! | 1, data | `0a/00/00` | bulk IN `0x81`, bulk OUT `0x03`, 64 bytes (full speed) |
//!
//! vendor:product `20df:0001`, manufacturer "Simtec Electronics", product
//! "Entropy Key", and as serial string the key's 12-byte serial in PEM64
//! (16 characters, the same serial as in the `S!` frame).
//!
//! usb-device sets the vendor:product and the strings in the firmware's
//! [`UsbDeviceBuilder`], not in the class; [`device_builder`] does that with
//! the values above, device class `02`, USB 2.0 and a 64-byte EP0.
//! [`UsbDeviceBuilder::composite_with_iads`] would also work with Linux, but
//! it changes the device class to `EF/02/01` and adds an interface
//! association descriptor, which the real key does not have; use it only if
//! the firmware adds other functions next to this class.
//!
//! # Endpoint addresses
//!
//! [`EntropyKeyClass::new`] asks the bus for the product's addresses. A bus
//! may refuse a fixed address (one taken already, a peripheral whose IN and
//! OUT endpoints share an index, or one that cannot choose): then that
//! endpoint is allocated wherever the bus likes, and
//! [`EntropyKeyClass::uses_product_addresses`] says so. Hosts find the
//! endpoints from the descriptors (`cdc_acm`, `ekeyd` through the tty and
//! `ekey-host` all do), so this costs nothing but fidelity. Only when the
//! bus cannot allocate an endpoint at all does `new` fail.
//!
//! # Data flow and pacing
//!
//! Call [`EntropyKeyClass::run`] with the noise source after every
//! [`UsbDevice::poll`](usb_device::device::UsbDevice::poll), whatever it
//! returned. `run` reads every packet waiting on bulk OUT into
//! [`Device::handle_input`] (one packet at a time, as the real key parses
//! them), then writes the frame being sent to bulk IN in packets of up to 64
//! bytes. When the bus answers `WouldBlock` (the host has not collected the
//! previous packet), the rest of the frame stays pending and goes out on a
//! later call: nothing is dropped or reordered. Only a USB bus reset (and a
//! de-configuration) discards the part of a frame that was not yet written,
//! since the host starts over then. No zero-length packets are sent.
//!
//! The class needs no clock. A new frame slot ([`Device::poll`]) is taken
//! only when nothing is pending, and when [`Pacing`] allows:
//!
//! - [`Pacing::HostDriven`] (the default): one slot per `run` call once the
//!   previous frame is handed to the bus. The key then runs as fast as the
//!   host reads and the noise source fills: the `Device` makes at most one
//!   frame ahead of the host. Unkeyed, a `k>` comes every eighth slot, so a
//!   busy `run` loop repeats it often; hosts cope, but it is not what the
//!   real key does.
//! - [`Pacing::Ticked`]: a slot for every [`tick`](EntropyKeyClass::tick)
//!   (at most [`MAX_TICK_CREDIT`] saved up while the host does not read).
//!   One tick every 11 ms from a timer gives about 90 slots a second, the
//!   rhythm [`Device`] documents for a real key (at most 2.9 kB/s of
//!   entropy, 5.8 kB/s on the wire; a `k>` every 88 ms while unkeyed); tick
//!   slower or faster to set another rate.
//!
//! Frames are produced only while the device is configured
//! (`SET_CONFIGURATION` 1 seen, no bus reset since). DTR is not required:
//! `ekey-host` claims interface 1 over usbfs and sends no CDC requests.
//!
//! # CDC requests
//!
//! `SET_LINE_CODING`, `GET_LINE_CODING` (returns what was set, 115200 8N1
//! at first), `SET_CONTROL_LINE_STATE` and `SEND_BREAK` to interface 0 are
//! accepted; the line settings are recorded ([`EntropyKeyClass::line_coding`],
//! [`EntropyKeyClass::dtr`]) but change nothing, as on the real key. Other
//! class requests to the class's interfaces are stalled.
//!
//! # Example
//!
//! A firmware's main loop (`bus` is the MCU's `UsbBus`, `noise` its noise
//! source as a [`rand_core::Rng`]):
//!
//! ```no_run
//! use ekey_proto::device::DeviceConfig;
//! use ekey_proto::keys::{LongTermKey, Serial};
//! use ekey_proto::usb_class::{self, EntropyKeyClass, Pacing};
//! use usb_device::bus::{UsbBus, UsbBusAllocator};
//!
//! fn firmware<B: UsbBus>(bus: B, noise: &mut impl rand_core::Rng) -> ! {
//!     let serial = Serial([7; 12]); // from the MCU's flash
//!     let key = LongTermKey::from_bytes([9; 32]); // ditto, never a constant
//!     let alloc = UsbBusAllocator::new(bus);
//!     // Classes first, then the device (usb-device allocates EP0 last).
//!     let mut class = EntropyKeyClass::new(
//!         &alloc,
//!         DeviceConfig::new(serial, key),
//!         Pacing::HostDriven,
//!     )
//!     .unwrap();
//!     // The serial string must outlive the UsbDevice.
//!     let serial_string = usb_class::serial_string(&serial);
//!     let mut usb = usb_class::device_builder(&alloc, &serial_string)
//!         .unwrap()
//!         .build();
//!     loop {
//!         usb.poll(&mut [&mut class]);
//!         // A USB error here is the bus's; the frame stays pending.
//!         let _ = class.run(noise);
//!     }
//! }
//! ```

use usb_device::class_prelude::{
    ControlIn, ControlOut, DescriptorWriter, EndpointAddress, EndpointIn, EndpointOut,
    EndpointType, InterfaceNumber, UsbBus, UsbBusAllocator, UsbClass, UsbError, control,
};
use usb_device::device::{StringDescriptors, UsbDeviceBuilder, UsbRev, UsbVidPid};
use usb_device::prelude::BuilderError;

use rand_core::Rng;

use crate::device::{Device, DeviceConfig, MAX_OUTPUT};
use crate::keys::{SERIAL_PEM_LEN, Serial};

/// The real key's USB vendor ID (Simtec Electronics).
pub const VENDOR_ID: u16 = 0x20df;
/// The real key's USB product ID.
pub const PRODUCT_ID: u16 = 0x0001;
/// `20df:0001`, for [`UsbDeviceBuilder::new`].
pub const VID_PID: UsbVidPid = UsbVidPid(VENDOR_ID, PRODUCT_ID);
/// The manufacturer string.
pub const MANUFACTURER: &str = "Simtec Electronics";
/// The product string.
pub const PRODUCT: &str = "Entropy Key";
/// The device class (CDC), as on the real key.
pub const DEVICE_CLASS: u8 = 0x02;
/// Maximum packet size of EP0.
pub const EP0_MAX_PACKET: u8 = 64;

/// The product's bulk IN endpoint (key to host).
pub const BULK_IN_ADDRESS: u8 = 0x81;
/// The product's bulk OUT endpoint (host to key).
pub const BULK_OUT_ADDRESS: u8 = 0x03;
/// The product's interrupt IN (notification) endpoint.
pub const NOTIFY_ADDRESS: u8 = 0x82;
/// Maximum packet size of the bulk endpoints (full speed).
pub const BULK_MAX_PACKET: u16 = 64;
/// Maximum packet size of the notification endpoint.
pub const NOTIFY_MAX_PACKET: u16 = 16;
/// Polling interval of the notification endpoint, in frames (ms).
pub const NOTIFY_INTERVAL: u8 = 16;

/// Most frame slots [`Pacing::Ticked`] saves up while the host is not
/// reading.
pub const MAX_TICK_CREDIT: u8 = 4;

const CLASS_CDC: u8 = 0x02;
const SUBCLASS_ACM: u8 = 0x02;
const PROTOCOL_NONE: u8 = 0x00;
const CLASS_CDC_DATA: u8 = 0x0a;
const CS_INTERFACE: u8 = 0x24;
const CDC_HEADER: u8 = 0x00;
const CDC_CALL_MANAGEMENT: u8 = 0x01;
const CDC_ACM: u8 = 0x02;
const CDC_UNION: u8 = 0x06;
/// ACM `bmCapabilities`: line coding and control line state requests.
const ACM_CAPABILITIES: u8 = 0x02;

const REQ_SET_LINE_CODING: u8 = 0x20;
const REQ_GET_LINE_CODING: u8 = 0x21;
const REQ_SET_CONTROL_LINE_STATE: u8 = 0x22;
const REQ_SEND_BREAK: u8 = 0x23;
const STANDARD_SET_CONFIGURATION: u8 = 9;

/// Most OUT packets one [`EntropyKeyClass::run`] reads (a bound for a bus
/// that never says `WouldBlock`).
const MAX_READS_PER_RUN: usize = 8;

/// The serial string for [`StringDescriptors::serial_number`]: the serial
/// in PEM64, 16 characters.
///
/// ```
/// use ekey_proto::keys::Serial;
/// let s: Serial = "NwBvBlg3OTBJORFD".parse().unwrap();
/// assert_eq!(ekey_proto::usb_class::serial_string(&s).as_str(), "NwBvBlg3OTBJORFD");
/// ```
pub fn serial_string(serial: &Serial) -> heapless::String<SERIAL_PEM_LEN> {
    serial.to_pem()
}

/// The real key's strings in US English: [`MANUFACTURER`], [`PRODUCT`] and
/// `serial` (from [`serial_string`]).
pub fn string_descriptors(serial: &str) -> StringDescriptors<'_> {
    StringDescriptors::default()
        .manufacturer(MANUFACTURER)
        .product(PRODUCT)
        .serial_number(serial)
}

/// A [`UsbDeviceBuilder`] set up as the real key: [`VID_PID`], device class
/// [`DEVICE_CLASS`] (no IADs), USB 2.0, 64-byte EP0 and
/// [`string_descriptors`]. Create the [`EntropyKeyClass`] before calling
/// `build()`. Further settings (power, release number) can be chained.
pub fn device_builder<'a, B: UsbBus>(
    alloc: &'a UsbBusAllocator<B>,
    serial: &'a str,
) -> Result<UsbDeviceBuilder<'a, B>, BuilderError> {
    UsbDeviceBuilder::new(alloc, VID_PID)
        .device_class(DEVICE_CLASS)
        .usb_rev(UsbRev::Usb200)
        .strings(&[string_descriptors(serial)])?
        .max_packet_size_0(EP0_MAX_PACKET)
}

/// When [`EntropyKeyClass::run`] takes a new frame slot. See the
/// [module docs](self#data-flow-and-pacing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Pacing {
    /// A slot per `run` call whenever the previous frame is written.
    #[default]
    HostDriven,
    /// A slot per [`EntropyKeyClass::tick`].
    Ticked,
}

/// CDC line coding (`SET_LINE_CODING`); recorded, not used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct LineCoding {
    /// Bits per second.
    pub baud: u32,
    /// 0: 1 stop bit, 1: 1.5, 2: 2.
    pub stop_bits: u8,
    /// 0 none, 1 odd, 2 even, 3 mark, 4 space.
    pub parity: u8,
    /// 5, 6, 7, 8 or 16.
    pub data_bits: u8,
}

impl LineCoding {
    fn to_bytes(self) -> [u8; 7] {
        let b = self.baud.to_le_bytes();
        [
            b[0],
            b[1],
            b[2],
            b[3],
            self.stop_bits,
            self.parity,
            self.data_bits,
        ]
    }

    fn from_bytes(d: &[u8]) -> Option<Self> {
        let (baud, rest) = d.split_first_chunk::<4>()?;
        let [stop_bits, parity, data_bits, ..] = *rest else {
            return None;
        };
        Some(LineCoding {
            baud: u32::from_le_bytes(*baud),
            stop_bits,
            parity,
            data_bits,
        })
    }
}

impl Default for LineCoding {
    fn default() -> Self {
        LineCoding {
            baud: 115_200,
            stop_bits: 0,
            parity: 0,
            data_bits: 8,
        }
    }
}

/// What one [`EntropyKeyClass::run`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Activity {
    /// Bytes read from bulk OUT (given to the key).
    pub received: usize,
    /// Bytes written to bulk IN.
    pub sent: usize,
    /// Frame slots taken ([`Device::poll`] calls).
    pub slots: usize,
}

/// An Entropy Key as a usb-device class. See the [module docs](self).
pub struct EntropyKeyClass<'a, B: UsbBus> {
    comm_if: InterfaceNumber,
    data_if: InterfaceNumber,
    notify: EndpointIn<'a, B>,
    bulk_in: EndpointIn<'a, B>,
    bulk_out: EndpointOut<'a, B>,
    product_addresses: bool,
    device: Device,
    pacing: Pacing,
    credit: u8,
    configured: bool,
    pending: heapless::Vec<u8, MAX_OUTPUT>,
    written: usize,
    line_coding: LineCoding,
    control_lines: u16,
}

fn alloc_or_any<B: UsbBus, D: usb_device::endpoint::EndpointDirection>(
    alloc: &UsbBusAllocator<B>,
    address: u8,
    ty: EndpointType,
    max_packet: u16,
    interval: u8,
) -> usb_device::Result<(usb_device::endpoint::Endpoint<'_, B, D>, bool)> {
    match alloc.alloc(
        Some(EndpointAddress::from(address)),
        ty,
        max_packet,
        interval,
    ) {
        Ok(ep) if u8::from(ep.address()) == address => Ok((ep, true)),
        Ok(ep) => Ok((ep, false)),
        Err(_) => alloc
            .alloc(None, ty, max_packet, interval)
            .map(|ep| (ep, false)),
    }
}

impl<'a, B: UsbBus> EntropyKeyClass<'a, B> {
    /// Allocates the two interfaces and three endpoints (the product's
    /// addresses if the bus grants them, else any) and creates the key.
    /// Call before [`UsbDeviceBuilder::build`].
    ///
    /// # Errors
    /// The bus's error when it cannot allocate an endpoint at all.
    pub fn new(
        alloc: &'a UsbBusAllocator<B>,
        config: DeviceConfig,
        pacing: Pacing,
    ) -> usb_device::Result<Self> {
        let comm_if = alloc.interface();
        let data_if = alloc.interface();
        let (bulk_in, fixed_in) = alloc_or_any(
            alloc,
            BULK_IN_ADDRESS,
            EndpointType::Bulk,
            BULK_MAX_PACKET,
            0,
        )?;
        let (bulk_out, fixed_out) = alloc_or_any(
            alloc,
            BULK_OUT_ADDRESS,
            EndpointType::Bulk,
            BULK_MAX_PACKET,
            0,
        )?;
        let (notify, fixed_notify) = alloc_or_any(
            alloc,
            NOTIFY_ADDRESS,
            EndpointType::Interrupt,
            NOTIFY_MAX_PACKET,
            NOTIFY_INTERVAL,
        )?;
        Ok(EntropyKeyClass {
            comm_if,
            data_if,
            notify,
            bulk_in,
            bulk_out,
            product_addresses: fixed_in && fixed_out && fixed_notify,
            device: Device::new(config),
            pacing,
            credit: 0,
            configured: false,
            pending: heapless::Vec::new(),
            written: 0,
            line_coding: LineCoding::default(),
            control_lines: 0,
        })
    }

    /// Whether the bus granted all three of the product's endpoint
    /// addresses.
    pub fn uses_product_addresses(&self) -> bool {
        self.product_addresses
    }

    /// The bulk IN endpoint's address.
    pub fn bulk_in_address(&self) -> EndpointAddress {
        self.bulk_in.address()
    }

    /// The bulk OUT endpoint's address.
    pub fn bulk_out_address(&self) -> EndpointAddress {
        self.bulk_out.address()
    }

    /// The notification endpoint's address.
    pub fn notify_address(&self) -> EndpointAddress {
        self.notify.address()
    }

    /// The software key (serial, counters, failure mode).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The software key, to change (fault knobs, long-term key).
    pub fn device_mut(&mut self) -> &mut Device {
        &mut self.device
    }

    /// The pacing in use.
    pub fn pacing(&self) -> Pacing {
        self.pacing
    }

    /// Changes the pacing (saved ticks are kept).
    pub fn set_pacing(&mut self, pacing: Pacing) {
        self.pacing = pacing;
    }

    /// Grants one frame slot under [`Pacing::Ticked`] (saturating at
    /// [`MAX_TICK_CREDIT`]). Cheap; may be called from a timer interrupt's
    /// critical section.
    pub fn tick(&mut self) {
        self.credit = self.credit.saturating_add(1).min(MAX_TICK_CREDIT);
    }

    /// Whether the host has configured the device (frames flow only then).
    pub fn is_configured(&self) -> bool {
        self.configured
    }

    /// Bytes of the current frame not yet handed to the bus.
    pub fn pending_len(&self) -> usize {
        self.pending.len().saturating_sub(self.written)
    }

    /// The line coding the host set last.
    pub fn line_coding(&self) -> LineCoding {
        self.line_coding
    }

    /// DTR, as the host set it last.
    pub fn dtr(&self) -> bool {
        self.control_lines & 1 != 0
    }

    /// RTS, as the host set it last.
    pub fn rts(&self) -> bool {
        self.control_lines & 2 != 0
    }

    /// Moves bytes: host commands from bulk OUT into the key, then the key's
    /// frames to bulk IN. Call after every `UsbDevice::poll`. See the
    /// [module docs](self#data-flow-and-pacing).
    ///
    /// # Errors
    /// A bus error other than `WouldBlock` (the data stays pending; call
    /// again).
    pub fn run<R: Rng + ?Sized>(&mut self, noise: &mut R) -> usb_device::Result<Activity> {
        let mut act = Activity::default();
        if !self.configured {
            return Ok(act);
        }
        let mut buf = [0u8; BULK_MAX_PACKET as usize];
        for _ in 0..MAX_READS_PER_RUN {
            match self.bulk_out.read(&mut buf) {
                Ok(n) => {
                    let packet = buf.get(..n).unwrap_or(&buf);
                    self.device.handle_input(packet, noise);
                    act.received = act.received.saturating_add(n);
                }
                Err(UsbError::WouldBlock) => break,
                Err(e) => return Err(e),
            }
        }
        let max = usize::from(self.bulk_in.max_packet_size()).max(1);
        loop {
            if self.pending_len() == 0 {
                self.pending.clear();
                self.written = 0;
                if !self.take_slot(act.slots) {
                    break;
                }
                act.slots = act.slots.saturating_add(1);
                match self.device.poll(noise) {
                    Some(out) => self.pending = out.bytes,
                    None => continue,
                }
            }
            let end = self.pending.len().min(self.written.saturating_add(max));
            let chunk = self.pending.get(self.written..end).unwrap_or(&[]);
            match self.bulk_in.write(chunk) {
                Ok(n) => {
                    self.written = self.written.saturating_add(n.min(chunk.len()));
                    act.sent = act.sent.saturating_add(n.min(chunk.len()));
                    if n == 0 {
                        break;
                    }
                }
                Err(UsbError::WouldBlock) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(act)
    }

    /// Whether a new frame slot may be taken, consuming a tick if ticked.
    fn take_slot(&mut self, taken: usize) -> bool {
        match self.pacing {
            Pacing::HostDriven => taken == 0,
            Pacing::Ticked => {
                if self.credit == 0 {
                    return false;
                }
                self.credit = self.credit.saturating_sub(1);
                true
            }
        }
    }

    fn drop_pending(&mut self) {
        self.pending.clear();
        self.written = 0;
    }

    fn is_our_cdc_request(&self, req: &control::Request) -> bool {
        req.request_type == control::RequestType::Class
            && req.recipient == control::Recipient::Interface
            && req.index == u16::from(u8::from(self.comm_if))
    }
}

impl<B: UsbBus> UsbClass<B> for EntropyKeyClass<'_, B> {
    fn get_configuration_descriptors(&self, w: &mut DescriptorWriter) -> usb_device::Result<()> {
        let comm = u8::from(self.comm_if);
        let data = u8::from(self.data_if);
        // Written only when the device is built with composite_with_iads().
        w.iad(
            self.comm_if,
            2,
            CLASS_CDC,
            SUBCLASS_ACM,
            PROTOCOL_NONE,
            None,
        )?;
        w.interface(self.comm_if, CLASS_CDC, SUBCLASS_ACM, PROTOCOL_NONE)?;
        w.write(CS_INTERFACE, &[CDC_HEADER, 0x10, 0x01])?;
        w.write(CS_INTERFACE, &[CDC_CALL_MANAGEMENT, 0x00, data])?;
        w.write(CS_INTERFACE, &[CDC_ACM, ACM_CAPABILITIES])?;
        w.write(CS_INTERFACE, &[CDC_UNION, comm, data])?;
        w.endpoint(&self.notify)?;
        w.interface(self.data_if, CLASS_CDC_DATA, 0x00, 0x00)?;
        w.endpoint(&self.bulk_in)?;
        w.endpoint(&self.bulk_out)
    }

    fn reset(&mut self) {
        self.configured = false;
        self.drop_pending();
        self.line_coding = LineCoding::default();
        self.control_lines = 0;
    }

    fn control_in(&mut self, xfer: ControlIn<B>) {
        let req = *xfer.request();
        if !self.is_our_cdc_request(&req) {
            return;
        }
        let _ = if req.request == REQ_GET_LINE_CODING {
            xfer.accept_with(&self.line_coding.to_bytes())
        } else {
            xfer.reject()
        };
    }

    fn control_out(&mut self, xfer: ControlOut<B>) {
        let req = *xfer.request();
        if req.request_type == control::RequestType::Standard
            && req.recipient == control::Recipient::Device
            && req.request == STANDARD_SET_CONFIGURATION
        {
            // Watch, don't answer: UsbDevice handles it after us. It
            // accepts only 0 (unconfigure) and our configuration; any other
            // value is refused and changes nothing, so here too.
            let ours = u16::from(usb_device::device::CONFIGURATION_VALUE);
            if req.value != 0 && req.value != ours {
                return;
            }
            let configured = req.value == ours;
            if self.configured && !configured {
                self.drop_pending();
            }
            self.configured = configured;
            return;
        }
        if !self.is_our_cdc_request(&req) {
            return;
        }
        let _ = match req.request {
            REQ_SET_LINE_CODING => match LineCoding::from_bytes(xfer.data()) {
                Some(lc) => {
                    self.line_coding = lc;
                    xfer.accept()
                }
                None => xfer.reject(),
            },
            REQ_SET_CONTROL_LINE_STATE => {
                self.control_lines = req.value;
                xfer.accept()
            }
            REQ_SEND_BREAK => xfer.accept(),
            _ => xfer.reject(),
        };
    }
}
