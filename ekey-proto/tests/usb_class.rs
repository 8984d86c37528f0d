//! `usb_class::EntropyKeyClass` on a simulated USB bus: a test `UsbBus`
//! that plays the host controller, enumerates the device through EP0 as a
//! host would, parses the descriptors itself, and runs a host `Session`
//! over the bulk endpoints it found in them.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};

use ekey_proto::device::DeviceConfig;
use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use ekey_proto::usb_class::{self, EntropyKeyClass, MAX_TICK_CREDIT, Pacing};
use rand_chacha::ChaCha20Rng;
use rand_core::{SeedableRng, TryRng};
use usb_device::UsbDirection;
use usb_device::bus::{PollResult, UsbBus, UsbBusAllocator};
use usb_device::device::UsbDevice;
use usb_device::endpoint::{EndpointAddress, EndpointType};
use usb_device::{Result as UsbResult, UsbError};

/// The serial of the key in the usb-vm-lab log (`iSerial 3
/// NwBvBlg3OTBJORFD`); the bytes are that text decoded with Python's
/// base64 module.
const SERIAL: Serial = Serial([55, 0, 111, 6, 88, 55, 57, 48, 73, 57, 17, 67]);
const SERIAL_TEXT: &str = "NwBvBlg3OTBJORFD";

fn ltk() -> LongTermKey {
    LongTermKey::from_bytes([0x5a; 32])
}

// ---------------------------------------------------------------------------
// The simulated bus: device side (`UsbBus`) and host side (methods below).

#[derive(Clone, Copy, Debug)]
struct EpInfo {
    max: u16,
}

#[derive(Default)]
struct BusState {
    /// Refuse every fixed (`Some`) address other than EP0.
    refuse_fixed: bool,
    eps_in: [Option<EpInfo>; 16],
    eps_out: [Option<EpInfo>; 16],
    enabled: bool,
    address: u8,
    reset_pending: bool,
    setup: Option<[u8; 8]>,
    /// Packets the host sent, per OUT endpoint.
    out: [VecDeque<Vec<u8>>; 16],
    /// The packet each IN endpoint holds for the host (single-buffered).
    in_buf: [Option<Vec<u8>>; 16],
    in_complete: u16,
    stalled_in: u16,
    stalled_out: u16,
    /// Writes refused with `WouldBlock` on IN endpoints other than EP0.
    would_blocks: usize,
}

/// A `Sync` test bus; clones share the state (one for the allocator, one
/// for the test as host).
#[derive(Clone)]
struct SimBus(Arc<Mutex<BusState>>);

impl SimBus {
    fn new(refuse_fixed: bool) -> Self {
        SimBus(Arc::new(Mutex::new(BusState {
            refuse_fixed,
            ..BusState::default()
        })))
    }

    fn st(&self) -> MutexGuard<'_, BusState> {
        self.0.lock().unwrap()
    }

    // Host side.

    fn host_reset(&self) {
        self.st().reset_pending = true;
    }

    fn host_setup(&self, setup: [u8; 8]) {
        let mut s = self.st();
        // A SETUP takes EP0 over: stale data and stalls go.
        s.setup = Some(setup);
        s.in_buf[0] = None;
        s.out[0].clear();
        s.in_complete &= !1;
        s.stalled_in &= !1;
        s.stalled_out &= !1;
    }

    fn host_out(&self, idx: usize, packet: &[u8]) {
        let mut s = self.st();
        let max = s.eps_out[idx].expect("OUT endpoint not allocated").max;
        assert!(packet.len() <= usize::from(max));
        s.out[idx].push_back(packet.to_vec());
    }

    /// Collects the packet an IN endpoint holds (an IN token the device
    /// answers with data), if any.
    fn host_in(&self, idx: usize) -> Option<Vec<u8>> {
        let mut s = self.st();
        let p = s.in_buf[idx].take()?;
        s.in_complete |= 1 << idx;
        Some(p)
    }

    fn ep0_stalled(&self) -> bool {
        let s = self.st();
        s.stalled_in & 1 != 0 || s.stalled_out & 1 != 0
    }
}

impl UsbBus for SimBus {
    fn alloc_ep(
        &mut self,
        dir: UsbDirection,
        addr: Option<EndpointAddress>,
        ty: EndpointType,
        max: u16,
        _interval: u8,
    ) -> UsbResult<EndpointAddress> {
        let mut s = self.st();
        let refuse = s.refuse_fixed;
        let table = match dir {
            UsbDirection::In => &mut s.eps_in,
            UsbDirection::Out => &mut s.eps_out,
        };
        let idx = match addr {
            Some(a) if refuse && a.index() != 0 => return Err(UsbError::InvalidEndpoint),
            Some(a) if table[a.index()].is_some() => return Err(UsbError::InvalidEndpoint),
            Some(a) => a.index(),
            None => (1..16)
                .find(|&i| table[i].is_none())
                .ok_or(UsbError::EndpointOverflow)?,
        };
        assert!(
            ty != EndpointType::Control || idx == 0,
            "control endpoint {idx}"
        );
        table[idx] = Some(EpInfo { max });
        Ok(EndpointAddress::from_parts(idx, dir))
    }

    fn enable(&mut self) {
        self.st().enabled = true;
    }

    fn reset(&self) {
        let mut s = self.st();
        s.address = 0;
        s.setup = None;
        s.out.iter_mut().for_each(VecDeque::clear);
        s.in_buf = Default::default();
        s.in_complete = 0;
        s.stalled_in = 0;
        s.stalled_out = 0;
    }

    fn set_device_address(&self, addr: u8) {
        self.st().address = addr;
    }

    fn write(&self, ep: EndpointAddress, buf: &[u8]) -> UsbResult<usize> {
        let mut s = self.st();
        assert!(ep.is_in());
        let idx = ep.index();
        let info = s.eps_in[idx].ok_or(UsbError::InvalidEndpoint)?;
        if buf.len() > usize::from(info.max) {
            return Err(UsbError::BufferOverflow);
        }
        if s.in_buf[idx].is_some() {
            if idx != 0 {
                s.would_blocks += 1;
            }
            return Err(UsbError::WouldBlock);
        }
        s.in_buf[idx] = Some(buf.to_vec());
        Ok(buf.len())
    }

    fn read(&self, ep: EndpointAddress, buf: &mut [u8]) -> UsbResult<usize> {
        let mut s = self.st();
        assert!(ep.is_out());
        let idx = ep.index();
        s.eps_out[idx].ok_or(UsbError::InvalidEndpoint)?;
        if idx == 0
            && let Some(setup) = s.setup.take()
        {
            buf[..8].copy_from_slice(&setup);
            return Ok(8);
        }
        let Some(p) = s.out[idx].front() else {
            return Err(UsbError::WouldBlock);
        };
        if p.len() > buf.len() {
            return Err(UsbError::BufferOverflow);
        }
        let p = s.out[idx].pop_front().unwrap();
        buf[..p.len()].copy_from_slice(&p);
        Ok(p.len())
    }

    fn set_stalled(&self, ep: EndpointAddress, stalled: bool) {
        let mut s = self.st();
        let bits = if ep.is_in() {
            &mut s.stalled_in
        } else {
            &mut s.stalled_out
        };
        if stalled {
            *bits |= 1 << ep.index();
        } else {
            *bits &= !(1 << ep.index());
        }
    }

    fn is_stalled(&self, ep: EndpointAddress) -> bool {
        let s = self.st();
        let bits = if ep.is_in() {
            s.stalled_in
        } else {
            s.stalled_out
        };
        bits & (1 << ep.index()) != 0
    }

    fn suspend(&self) {}

    fn resume(&self) {}

    fn poll(&self) -> PollResult {
        let mut s = self.st();
        assert!(s.enabled, "polled before enable");
        if s.reset_pending {
            s.reset_pending = false;
            return PollResult::Reset;
        }
        let ep_setup = u16::from(s.setup.is_some());
        let ep_out = (0..16)
            .filter(|&i| !s.out[i].is_empty())
            .fold(0u16, |m, i| m | 1 << i);
        let ep_in_complete = std::mem::take(&mut s.in_complete);
        if ep_setup | ep_out | ep_in_complete == 0 {
            PollResult::None
        } else {
            PollResult::Data {
                ep_out,
                ep_in_complete,
                ep_setup,
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A noise source that records every fill, so the test knows each block the
// key could have sent.

struct LoggingNoise {
    rng: ChaCha20Rng,
    fills: Vec<Vec<u8>>,
}

impl TryRng for LoggingNoise {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.rng.try_fill_bytes(dst)?;
        self.fills.push(dst.to_vec());
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The device under test and the host's control transfers.

#[derive(Debug, PartialEq)]
struct Stall;

struct Rig<'a> {
    bus: SimBus,
    dev: UsbDevice<'a, SimBus>,
    class: EntropyKeyClass<'a, SimBus>,
    noise: LoggingNoise,
    /// The address the host talks to.
    address: u8,
    slots: usize,
}

fn rig<'a>(
    alloc: &'a UsbBusAllocator<SimBus>,
    bus: SimBus,
    serial: &'a str,
    pacing: Pacing,
    iads: bool,
) -> Rig<'a> {
    let class = EntropyKeyClass::new(alloc, DeviceConfig::new(SERIAL, ltk()), pacing).unwrap();
    let mut b = usb_class::device_builder(alloc, serial).unwrap();
    if iads {
        b = b.composite_with_iads();
    }
    Rig {
        bus,
        dev: b.build(),
        class,
        noise: LoggingNoise {
            rng: ChaCha20Rng::seed_from_u64(7),
            fills: Vec::new(),
        },
        address: 0,
        slots: 0,
    }
}

/// Makes the bus, allocator and serial string a rig borrows.
macro_rules! make_rig {
    ($rig:ident, refuse_fixed = $refuse:expr, pacing = $pacing:expr, iads = $iads:expr) => {
        let bus = SimBus::new($refuse);
        let alloc = UsbBusAllocator::new(bus.clone());
        let serial = usb_class::serial_string(&SERIAL);
        let mut $rig = rig(&alloc, bus, &serial, $pacing, $iads);
    };
}

fn setup_packet(req_type: u8, req: u8, value: u16, index: u16, length: u16) -> [u8; 8] {
    let [v0, v1] = value.to_le_bytes();
    let [i0, i1] = index.to_le_bytes();
    let [l0, l1] = length.to_le_bytes();
    [req_type, req, v0, v1, i0, i1, l0, l1]
}

impl Rig<'_> {
    /// One turn of the firmware's main loop.
    fn poll(&mut self) {
        self.dev.poll(&mut [&mut self.class]);
        let act = self.class.run(&mut self.noise).unwrap();
        self.slots += act.slots;
    }

    fn check_address(&self) {
        assert_eq!(
            self.bus.st().address,
            self.address,
            "no device answers at address {}",
            self.address
        );
    }

    fn control_in(
        &mut self,
        req_type: u8,
        req: u8,
        value: u16,
        index: u16,
        length: u16,
    ) -> Result<Vec<u8>, Stall> {
        self.check_address();
        self.bus
            .host_setup(setup_packet(req_type, req, value, index, length));
        let mut data = Vec::new();
        for _ in 0..100 {
            self.poll();
            if self.bus.ep0_stalled() {
                return Err(Stall);
            }
            if let Some(p) = self.bus.host_in(0) {
                assert!(p.len() <= 64, "EP0 packet of {} bytes", p.len());
                let short = p.len() < 64;
                data.extend(p);
                if short || data.len() >= usize::from(length) {
                    self.poll();
                    // Status stage: a zero-length OUT.
                    self.bus.host_out(0, &[]);
                    self.poll();
                    assert!(!self.bus.ep0_stalled());
                    assert!(data.len() <= usize::from(length));
                    return Ok(data);
                }
            }
        }
        panic!("control IN {req_type:#04x}/{req:#04x} never completed");
    }

    fn control_out(
        &mut self,
        req_type: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<(), Stall> {
        self.check_address();
        let len = u16::try_from(data.len()).unwrap();
        self.bus
            .host_setup(setup_packet(req_type, req, value, index, len));
        self.poll();
        for chunk in data.chunks(64) {
            if self.bus.ep0_stalled() {
                return Err(Stall);
            }
            self.bus.host_out(0, chunk);
            self.poll();
        }
        for _ in 0..100 {
            if self.bus.ep0_stalled() {
                return Err(Stall);
            }
            // Status stage: the device sends a zero-length IN.
            if let Some(p) = self.bus.host_in(0) {
                assert!(p.is_empty(), "status stage with data");
                self.poll();
                return Ok(());
            }
            self.poll();
        }
        panic!("control OUT {req_type:#04x}/{req:#04x} never completed");
    }

    fn get_descriptor(&mut self, ty: u8, index: u8, lang: u16, length: u16) -> Vec<u8> {
        self.control_in(0x80, 6, u16::from(ty) << 8 | u16::from(index), lang, length)
            .unwrap()
    }

    fn string(&mut self, index: u8) -> String {
        let d = self.get_descriptor(3, index, 0x0409, 255);
        assert_eq!(d[1], 3);
        assert_eq!(usize::from(d[0]), d.len());
        let units: Vec<u16> = d[2..]
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect();
        String::from_utf16(&units).unwrap()
    }
}

// ---------------------------------------------------------------------------
// An independent reading of the descriptors.

#[derive(Debug, Clone, Copy, PartialEq)]
struct Endpoint {
    address: u8,
    kind: u8,
    max: u16,
    interval: u8,
}

#[derive(Debug, Default)]
struct Interface {
    number: u8,
    class: [u8; 3],
    num_endpoints: u8,
    endpoints: Vec<Endpoint>,
    /// Class-specific (0x24) descriptors after it, without length and type.
    functional: Vec<Vec<u8>>,
}

#[derive(Debug)]
struct ConfigView {
    total_length: u16,
    num_interfaces: u8,
    value: u8,
    interfaces: Vec<Interface>,
    /// Interface association descriptors, without length and type.
    iads: Vec<Vec<u8>>,
}

fn parse_config(d: &[u8]) -> ConfigView {
    assert_eq!(&d[..2], &[9, 2]);
    let mut view = ConfigView {
        total_length: u16::from_le_bytes([d[2], d[3]]),
        num_interfaces: d[4],
        value: d[5],
        interfaces: Vec::new(),
        iads: Vec::new(),
    };
    let mut rest = &d[9..];
    while !rest.is_empty() {
        let len = usize::from(rest[0]);
        assert!(len >= 2 && len <= rest.len(), "bad descriptor length {len}");
        let (desc, tail) = rest.split_at(len);
        rest = tail;
        match desc[1] {
            4 => {
                assert_eq!(len, 9);
                assert_eq!(desc[3], 0, "alternate setting");
                view.interfaces.push(Interface {
                    number: desc[2],
                    num_endpoints: desc[4],
                    class: [desc[5], desc[6], desc[7]],
                    ..Interface::default()
                });
            }
            5 => {
                assert_eq!(len, 7);
                view.interfaces
                    .last_mut()
                    .unwrap()
                    .endpoints
                    .push(Endpoint {
                        address: desc[2],
                        kind: desc[3] & 3,
                        max: u16::from_le_bytes([desc[4], desc[5]]),
                        interval: desc[6],
                    });
            }
            0x24 => view
                .interfaces
                .last_mut()
                .unwrap()
                .functional
                .push(desc[2..].to_vec()),
            0x0b => view.iads.push(desc[2..].to_vec()),
            t => panic!("unexpected descriptor type {t:#04x}"),
        }
    }
    view
}

const INTERRUPT: u8 = 3;
const BULK: u8 = 2;

/// What a host needs after enumeration.
struct Found {
    device: Vec<u8>,
    config: ConfigView,
    bulk_in: u8,
    bulk_out: u8,
}

/// Enumerates as Linux does: reset, device descriptor at address 0,
/// SET_ADDRESS, device descriptor, configuration (header, then full),
/// strings, SET_CONFIGURATION, then what `cdc_acm` sends on open.
fn enumerate(rig: &mut Rig<'_>) -> Found {
    rig.bus.host_reset();
    rig.poll();
    let first = rig.get_descriptor(1, 0, 0, 64);
    assert_eq!(first.len(), 18);
    rig.control_out(0x00, 5, 9, 0, &[]).unwrap();
    rig.address = 9;
    let device = rig.get_descriptor(1, 0, 0, 18);
    assert_eq!(device, first);
    let head = rig.get_descriptor(2, 0, 0, 9);
    let total = u16::from_le_bytes([head[2], head[3]]);
    let full = rig.get_descriptor(2, 0, 0, total);
    assert_eq!(full.len(), usize::from(total));
    assert_eq!(&full[..9], &head[..]);
    let config = parse_config(&full);
    assert!(!rig.class.is_configured());
    rig.control_out(0x00, 9, u16::from(config.value), 0, &[])
        .unwrap();
    assert!(rig.class.is_configured());
    let data_if = config
        .interfaces
        .iter()
        .find(|i| i.class[0] == 0x0a)
        .unwrap();
    let ep = |dir_in: bool| {
        data_if
            .endpoints
            .iter()
            .find(|e| e.kind == BULK && (e.address & 0x80 != 0) == dir_in)
            .unwrap()
            .address
    };
    Found {
        device,
        bulk_in: ep(true),
        bulk_out: ep(false),
        config,
    }
}

/// What `cdc_acm` does when the tty is opened: DTR|RTS, 9600 8N1.
fn open_tty(rig: &mut Rig<'_>) {
    rig.control_out(0x21, 0x22, 0x0003, 0, &[]).unwrap();
    rig.control_out(0x21, 0x20, 0, 0, &[0x80, 0x25, 0, 0, 0, 0, 8])
        .unwrap();
}

// ---------------------------------------------------------------------------
// The host `Session` on the far side of the bus.

struct HostSide {
    session: Session,
    now: Instant,
    nonces: ChaCha20Rng,
    events: Vec<Event>,
    released: Vec<(u16, [u8; 32])>,
    bytes_in: usize,
}

impl HostSide {
    fn new() -> Self {
        HostSide {
            session: Session::new(Config::default(), Instant::ZERO),
            now: Instant::ZERO,
            nonces: ChaCha20Rng::seed_from_u64(99),
            events: Vec::new(),
            released: Vec::new(),
            bytes_in: 0,
        }
    }

    fn drain(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            if let Event::Entropy { seq, data } = &ev {
                self.released.push((*seq, *data));
            }
            self.events.push(ev);
        }
    }

    /// One millisecond: commands out, maybe one packet in, timeouts.
    fn step(&mut self, rig: &mut Rig<'_>, found: &Found, collect: bool) {
        self.now = Instant::from_millis(self.now.millis() + 1);
        while let Some(t) = self.session.poll_transmit() {
            for chunk in t.chunks(64) {
                rig.bus.host_out(usize::from(found.bulk_out & 0x0f), chunk);
            }
        }
        rig.poll();
        if collect && let Some(p) = rig.bus.host_in(usize::from(found.bulk_in & 0x0f)) {
            assert!(p.len() <= 64);
            self.bytes_in += p.len();
            let lookup = |s: &Serial| (*s == SERIAL).then(ltk);
            let mut input = &p[..];
            while !input.is_empty() {
                let n = self
                    .session
                    .handle_input(self.now, input, &lookup, &mut self.nonces);
                input = &input[n..];
                self.drain();
            }
        }
        self.session.handle_timeout(self.now);
        self.drain();
    }
}

/// The released blocks are exactly the noise the key drew after the one
/// draw for the session key (`K`): in order, none missing, none altered.
fn assert_released_is_noise(rig: &Rig<'_>, host: &HostSide, at_least: usize) {
    assert!(
        host.released.len() >= at_least,
        "only {} blocks released",
        host.released.len()
    );
    assert_eq!(rig.class.device().stats().rekeys, 1);
    assert!(rig.noise.fills.iter().all(|f| f.len() == 32));
    for (i, (seq, data)) in host.released.iter().enumerate() {
        assert_eq!(usize::from(*seq), i, "sequence numbers must run on");
        assert_eq!(
            &data[..],
            &rig.noise.fills[i + 1][..],
            "block {i} is not the key's noise"
        );
    }
    let faults: Vec<_> = host
        .events
        .iter()
        .filter(|e| matches!(e, Event::Fault(_)))
        .collect();
    assert!(faults.is_empty(), "faults: {faults:?}");
    assert!(host.events.contains(&Event::Serial(SERIAL)));
}

// ---------------------------------------------------------------------------

#[test]
fn enumeration_shows_the_real_keys_descriptors() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = false
    );
    let found = enumerate(&mut rig);

    // Device descriptor (USB 2.0 table 9-8).
    let d = &found.device;
    assert_eq!(d[0], 18);
    assert_eq!(d[1], 1);
    assert_eq!(u16::from_le_bytes([d[2], d[3]]), 0x0200, "bcdUSB");
    assert_eq!(&d[4..7], &[0x02, 0x00, 0x00], "device class: CDC, no IAD");
    assert_eq!(d[7], 64, "bMaxPacketSize0");
    assert_eq!(u16::from_le_bytes([d[8], d[9]]), 0x20df);
    assert_eq!(u16::from_le_bytes([d[10], d[11]]), 0x0001);
    assert_eq!(d[17], 1, "bNumConfigurations");
    let (i_manufacturer, i_product, i_serial) = (d[14], d[15], d[16]);
    assert!(i_manufacturer != 0 && i_product != 0 && i_serial != 0);

    // Configuration.
    let c = &found.config;
    assert_eq!(c.num_interfaces, 2);
    assert_eq!(c.interfaces.len(), 2);
    assert!(c.iads.is_empty());
    assert!(c.total_length > 9);
    let comm = &c.interfaces[0];
    assert_eq!(comm.number, 0);
    assert_eq!(comm.class, [0x02, 0x02, 0x00]);
    assert_eq!(comm.num_endpoints, 1);
    assert_eq!(comm.endpoints.len(), 1);
    let notify = comm.endpoints[0];
    assert_eq!((notify.address, notify.kind), (0x82, INTERRUPT));
    assert!(notify.max >= 10, "a SERIAL_STATE notification must fit");
    assert!(notify.interval >= 1);
    // CDC 1.10 functional descriptors: header, call management, ACM,
    // union (in the order the CDC spec requires the header first).
    assert_eq!(
        comm.functional,
        vec![
            vec![0x00, 0x10, 0x01],
            vec![0x01, 0x00, 1],
            vec![0x02, 0x02],
            vec![0x06, 0, 1],
        ]
    );
    let data = &c.interfaces[1];
    assert_eq!(data.number, 1);
    assert_eq!(data.class, [0x0a, 0x00, 0x00]);
    assert_eq!(data.num_endpoints, 2);
    let mut eps = data.endpoints.clone();
    eps.sort_by_key(|e| e.address);
    assert_eq!(
        eps.iter()
            .map(|e| (e.address, e.kind, e.max))
            .collect::<Vec<_>>(),
        vec![(0x03, BULK, 64), (0x81, BULK, 64)]
    );
    assert!(rig.class.uses_product_addresses());
    assert_eq!((found.bulk_in, found.bulk_out), (0x81, 0x03));

    // Strings.
    let langs = rig.get_descriptor(3, 0, 0, 255);
    assert_eq!(langs, vec![4, 3, 0x09, 0x04]);
    assert_eq!(rig.string(i_manufacturer), "Simtec Electronics");
    assert_eq!(rig.string(i_product), "Entropy Key");
    let serial = rig.string(i_serial);
    assert_eq!(serial, SERIAL_TEXT);
    assert_eq!(serial.parse::<Serial>().unwrap(), SERIAL);
}

#[test]
fn cdc_requests_are_answered() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = false
    );
    enumerate(&mut rig);
    assert!(!rig.class.dtr());
    // GET_LINE_CODING before any SET: something sane (115200 8N1).
    let lc = rig.control_in(0xa1, 0x21, 0, 0, 7).unwrap();
    assert_eq!(lc, vec![0x00, 0xc2, 0x01, 0x00, 0, 0, 8]);
    open_tty(&mut rig);
    assert!(rig.class.dtr() && rig.class.rts());
    let lc = rig.control_in(0xa1, 0x21, 0, 0, 7).unwrap();
    assert_eq!(lc, vec![0x80, 0x25, 0, 0, 0, 0, 8]);
    assert_eq!(rig.class.line_coding().baud, 9600);
    rig.control_out(0x21, 0x23, 0, 0, &[]).unwrap(); // SEND_BREAK
    rig.control_out(0x21, 0x22, 0, 0, &[]).unwrap(); // tty closed
    assert!(!rig.class.dtr());
    // Not supported: encapsulated commands; a short line coding; a class
    // request to an interface that does not exist.
    assert_eq!(rig.control_in(0xa1, 0x01, 0, 0, 64), Err(Stall));
    assert_eq!(rig.control_out(0x21, 0x20, 0, 0, &[1, 2, 3]), Err(Stall));
    assert_eq!(rig.control_out(0x21, 0x22, 3, 5, &[]), Err(Stall));
    // EP0 still works after the stalls.
    assert_eq!(rig.control_in(0xa1, 0x21, 0, 0, 7).unwrap()[6], 8);
}

fn keyed_session_receives_noise(pacing: Pacing, refuse_fixed: bool) {
    make_rig!(
        rig,
        refuse_fixed = refuse_fixed,
        pacing = pacing,
        iads = false
    );
    let found = enumerate(&mut rig);
    assert_eq!(rig.class.uses_product_addresses(), !refuse_fixed);
    open_tty(&mut rig);
    let mut host = HostSide::new();
    for _ in 0..20_000 {
        if pacing == Pacing::Ticked {
            rig.class.tick();
        }
        host.step(&mut rig, &found, true);
        if host.released.len() >= 200 {
            break;
        }
    }
    // 200 blocks cross two information cycles (every 78 blocks).
    assert_released_is_noise(&rig, &host, 200);
    assert!(host.events.iter().any(|e| matches!(e, Event::Info(_))));
}

#[test]
fn host_session_gets_verified_entropy_host_driven() {
    keyed_session_receives_noise(Pacing::HostDriven, false);
}

#[test]
fn host_session_gets_verified_entropy_ticked() {
    keyed_session_receives_noise(Pacing::Ticked, false);
}

#[test]
fn a_bus_that_refuses_fixed_addresses_gets_automatic_ones() {
    keyed_session_receives_noise(Pacing::HostDriven, true);
}

#[test]
fn would_block_on_bulk_in_loses_nothing() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = false
    );
    let found = enumerate(&mut rig);
    let mut host = HostSide::new();
    // A slow, irregular reader: collects on some milliseconds only.
    let mut pattern = ChaCha20Rng::seed_from_u64(3);
    for _ in 0..40_000 {
        let collect = pattern.try_next_u32().unwrap() % 5 == 0;
        host.step(&mut rig, &found, collect);
        if host.released.len() >= 120 {
            break;
        }
    }
    let busy = rig.bus.st().would_blocks;
    assert!(busy > 300, "the IN endpoint was busy only {busy} times");
    // A long stall: the host collects nothing; the key keeps one frame.
    let frames = rig.class.device().stats().frames;
    let slots = rig.slots;
    for _ in 0..500 {
        host.step(&mut rig, &found, false);
    }
    assert!(rig.class.device().stats().frames <= frames + 1);
    assert!(rig.slots <= slots + 1);
    assert!(rig.class.pending_len() > 0);
    let released = host.released.len();
    for _ in 0..2000 {
        host.step(&mut rig, &found, true);
    }
    assert!(host.released.len() > released + 10);
    assert_released_is_noise(&rig, &host, 120);
}

#[test]
fn ticked_pacing_takes_one_slot_per_tick() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::Ticked,
        iads = false
    );
    let found = enumerate(&mut rig);
    let in_idx = usize::from(found.bulk_in & 0x0f);
    let collect = |rig: &mut Rig<'_>| {
        let mut bytes = 0;
        for _ in 0..50 {
            rig.poll();
            bytes += rig.bus.host_in(in_idx).map_or(0, |p| p.len());
        }
        bytes
    };
    assert_eq!(collect(&mut rig), 0, "no ticks, no frames");
    assert_eq!(rig.slots, 0);
    rig.class.tick();
    // A fresh key's first slot is its S! frame.
    assert_eq!(collect(&mut rig), 64);
    assert_eq!(rig.slots, 1);
    for _ in 0..10 {
        rig.class.tick();
    }
    collect(&mut rig);
    assert_eq!(rig.slots, 1 + usize::from(MAX_TICK_CREDIT));
}

#[test]
fn frames_flow_only_while_configured() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = false
    );
    let in_idx = usize::from(usb_class::BULK_IN_ADDRESS & 0x0f);
    rig.bus.host_reset();
    for _ in 0..50 {
        rig.poll();
    }
    assert!(rig.bus.host_in(in_idx).is_none());
    assert_eq!(rig.slots, 0);
    let found = enumerate(&mut rig);
    rig.poll();
    let first = rig.bus.host_in(usize::from(found.bulk_in & 0x0f)).unwrap();
    assert_eq!(&first[..4], b"* S!");
    rig.poll();
    assert!(rig.class.pending_len() > 0 || rig.slots > 1);
    // A bus reset: not configured; what was not handed over is dropped.
    rig.bus.host_reset();
    rig.poll();
    assert!(!rig.class.is_configured());
    assert_eq!(rig.class.pending_len(), 0);
    let slots = rig.slots;
    for _ in 0..50 {
        rig.poll();
    }
    assert_eq!(rig.slots, slots);
}

#[test]
fn composite_with_iads_adds_an_association() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = true
    );
    let found = enumerate(&mut rig);
    assert_eq!(&found.device[4..7], &[0xef, 0x02, 0x01]);
    assert_eq!(found.config.iads, vec![vec![0, 2, 0x02, 0x02, 0x00, 0]]);
    assert_eq!(found.config.interfaces.len(), 2);
}

#[test]
fn a_refused_set_configuration_changes_nothing() {
    make_rig!(
        rig,
        refuse_fixed = false,
        pacing = Pacing::HostDriven,
        iads = false
    );
    let found = enumerate(&mut rig);
    assert!(rig.class.is_configured());
    // SET_CONFIGURATION 2: there is no configuration 2; usb-device refuses
    // it and stays configured, and so must the class.
    let _ = rig.control_out(0x00, 0x09, 2, 0, &[]);
    assert!(rig.class.is_configured());
    let in_idx = usize::from(found.bulk_in & 0x0f);
    let mut got = None;
    for _ in 0..20 {
        rig.poll();
        if let Some(p) = rig.bus.host_in(in_idx) {
            got = Some(p);
            break;
        }
    }
    let first = got.expect("the key went silent after a refused SET_CONFIGURATION");
    assert_eq!(first.first(), Some(&b'*'));
}
