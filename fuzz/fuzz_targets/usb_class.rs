//! `usb_class::EntropyKeyClass` under `UsbDevice` on a small fake bus whose
//! host side the fuzzer drives: bus resets, suspend/resume, arbitrary and
//! well-formed SETUP packets with arbitrary data stages, stray EP0 packets,
//! arbitrary bulk OUT packets, a real host `Session` keying the key, IN
//! tokens in any order, ticks, and a bus that fails or shortens writes and
//! fails reads.
//!
//! Checks, besides no panic (the documented behaviour of the class):
//! - nothing is ever written to the notification endpoint, no bulk IN
//!   packet is empty or longer than the endpoint's maximum;
//! - `run` moves no bytes while the device is not configured, and its
//!   `Activity` counts what the bus took and gave;
//! - `is_configured` only after a `SET_CONFIGURATION 1` since the last bus
//!   reset; a bus reset forgets the line settings and the pending frame;
//! - line coding and control lines change only on the host's requests;
//! - between bus resets (and unless the host de-configured the device),
//!   the bulk IN stream is whole 64-byte frames: nothing dropped or
//!   reordered even when the bus refuses or shortens writes.
#![no_main]

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use ekey_proto::device::{DeviceConfig, MAX_OUTPUT};
use ekey_proto::host::{Config, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use ekey_proto::usb_class::{self, EntropyKeyClass, LineCoding, Pacing};
use libfuzzer_sys::fuzz_target;
use usb_device::UsbDirection;
use usb_device::bus::{PollResult, UsbBus, UsbBusAllocator};
use usb_device::endpoint::{EndpointAddress, EndpointType};
use usb_device::{Result as UsbResult, UsbError};

use ekey_fuzz::Xs;

// ---------------------------------------------------------------------------
// The bus.

#[derive(Default)]
struct State {
    refuse_fixed: bool,
    /// Endpoints left to allocate (besides EP0).
    budget: u8,
    max_in: [Option<u16>; 16],
    max_out: [Option<u16>; 16],
    reset_pending: bool,
    suspend: Option<bool>,
    setup: Option<[u8; 8]>,
    out: [VecDeque<Vec<u8>>; 16],
    in_buf: [Option<Vec<u8>>; 16],
    in_complete: u16,
    stalled_in: u16,
    stalled_out: u16,
    /// Bus faults: the next n non-EP0 writes / reads fail; writes take
    /// at most `short_write` bytes (0: all).
    fail_writes: u8,
    fail_reads: u8,
    short_write: usize,
    // What the device did.
    resets_done: u32,
    written: [u64; 16],
    read: [u64; 16],
    empty_writes: [u32; 16],
    oversize_writes: [u32; 16],
    /// SETUP packets the device read, in order.
    setups_read: Vec<[u8; 8]>,
}

#[derive(Clone)]
struct Bus(Arc<Mutex<State>>);

impl Bus {
    fn st(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap()
    }
}

impl UsbBus for Bus {
    fn alloc_ep(
        &mut self,
        dir: UsbDirection,
        addr: Option<EndpointAddress>,
        ty: EndpointType,
        max: u16,
        _interval: u8,
    ) -> UsbResult<EndpointAddress> {
        let mut s = self.st();
        if ty == EndpointType::Control {
            let table = match dir {
                UsbDirection::In => &mut s.max_in,
                UsbDirection::Out => &mut s.max_out,
            };
            table[0] = Some(max);
            return Ok(EndpointAddress::from_parts(0, dir));
        }
        if s.budget == 0 {
            return Err(UsbError::EndpointOverflow);
        }
        let refuse = s.refuse_fixed;
        let table = match dir {
            UsbDirection::In => &mut s.max_in,
            UsbDirection::Out => &mut s.max_out,
        };
        let idx = match addr {
            Some(_) if refuse => return Err(UsbError::InvalidEndpoint),
            Some(a) if a.index() == 0 || table[a.index()].is_some() => {
                return Err(UsbError::InvalidEndpoint);
            }
            Some(a) => a.index(),
            None => (1..16)
                .find(|&i| table[i].is_none())
                .ok_or(UsbError::EndpointOverflow)?,
        };
        table[idx] = Some(max);
        s.budget -= 1;
        Ok(EndpointAddress::from_parts(idx, dir))
    }

    fn enable(&mut self) {}

    fn reset(&self) {
        let mut s = self.st();
        s.setup = None;
        s.out.iter_mut().for_each(VecDeque::clear);
        s.in_buf = Default::default();
        s.in_complete = 0;
        s.stalled_in = 0;
        s.stalled_out = 0;
        s.resets_done += 1;
    }

    fn set_device_address(&self, _addr: u8) {}

    fn write(&self, ep: EndpointAddress, buf: &[u8]) -> UsbResult<usize> {
        let mut s = self.st();
        assert!(ep.is_in(), "write to an OUT endpoint");
        let idx = ep.index();
        let max = s.max_in[idx].ok_or(UsbError::InvalidEndpoint)?;
        if idx != 0 {
            if buf.is_empty() {
                s.empty_writes[idx] += 1;
            }
            if s.fail_writes > 0 {
                s.fail_writes -= 1;
                return Err(UsbError::InvalidState);
            }
        }
        if buf.len() > usize::from(max) {
            s.oversize_writes[idx] += 1;
            return Err(UsbError::BufferOverflow);
        }
        if s.in_buf[idx].is_some() {
            return Err(UsbError::WouldBlock);
        }
        let n = if idx != 0 && s.short_write > 0 {
            buf.len().min(s.short_write)
        } else {
            buf.len()
        };
        s.in_buf[idx] = Some(buf[..n].to_vec());
        s.written[idx] += n as u64;
        Ok(n)
    }

    fn read(&self, ep: EndpointAddress, buf: &mut [u8]) -> UsbResult<usize> {
        let mut s = self.st();
        assert!(ep.is_out(), "read from an IN endpoint");
        let idx = ep.index();
        s.max_out[idx].ok_or(UsbError::InvalidEndpoint)?;
        if idx == 0 {
            if let Some(setup) = s.setup.take() {
                if buf.len() < 8 {
                    s.setup = Some(setup);
                    return Err(UsbError::BufferOverflow);
                }
                buf[..8].copy_from_slice(&setup);
                s.setups_read.push(setup);
                return Ok(8);
            }
        } else if s.fail_reads > 0 && !s.out[idx].is_empty() {
            s.fail_reads -= 1;
            return Err(UsbError::InvalidState);
        }
        let Some(p) = s.out[idx].front() else {
            return Err(UsbError::WouldBlock);
        };
        if p.len() > buf.len() {
            return Err(UsbError::BufferOverflow);
        }
        let p = s.out[idx].pop_front().unwrap();
        buf[..p.len()].copy_from_slice(&p);
        s.read[idx] += p.len() as u64;
        Ok(p.len())
    }

    fn set_stalled(&self, ep: EndpointAddress, stalled: bool) {
        let mut s = self.st();
        let bits = if ep.is_in() {
            &mut s.stalled_in
        } else {
            &mut s.stalled_out
        };
        let bit = 1u16 << ep.index();
        if stalled {
            *bits |= bit;
        } else {
            *bits &= !bit;
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
        if std::mem::take(&mut s.reset_pending) {
            return PollResult::Reset;
        }
        match s.suspend.take() {
            Some(true) => return PollResult::Suspend,
            Some(false) => return PollResult::Resume,
            None => {}
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
// The host.

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        a.to_vec()
    }
}

/// Checks the bulk IN stream is whole frames, while it is known to be
/// aligned.
struct Frames {
    aligned: bool,
    frame: Vec<u8>,
    whole: u64,
}

impl Frames {
    fn push(&mut self, packet: &[u8]) {
        if !self.aligned {
            return;
        }
        for &b in packet {
            self.frame.push(b);
            if self.frame.len() == 64 {
                assert_eq!(&self.frame[..2], b"* ", "frame start: {:?}", self.frame);
                assert_eq!(&self.frame[62..], b"\r\n", "frame end: {:?}", self.frame);
                self.frame.clear();
                self.whole += 1;
            }
        }
    }
    fn restart(&mut self) {
        self.aligned = true;
        self.frame.clear();
    }
}

fn setup_bytes(request_type: u8, request: u8, value: u16, index: u16, length: u16) -> [u8; 8] {
    let [v0, v1] = value.to_le_bytes();
    let [i0, i1] = index.to_le_bytes();
    let [l0, l1] = length.to_le_bytes();
    [request_type, request, v0, v1, i0, i1, l0, l1]
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let flags = input.u8();
    let bus = Bus(Arc::new(Mutex::new(State {
        refuse_fixed: flags & 1 != 0,
        // Usually enough endpoints; sometimes too few.
        budget: if flags & 6 == 6 { flags >> 6 } else { 15 },
        ..State::default()
    })));
    let host = bus.clone();
    let serial = Serial([3; 12]);
    let ltk = LongTermKey::from_bytes([4; 32]);
    let keyring = {
        let ltk = ltk.clone();
        move |s: &Serial| (*s == serial).then(|| ltk.clone())
    };
    let alloc = UsbBusAllocator::new(bus);
    let pacing = if flags & 8 != 0 {
        Pacing::Ticked
    } else {
        Pacing::HostDriven
    };
    let Ok(mut class) = EntropyKeyClass::new(&alloc, DeviceConfig::new(serial, ltk), pacing) else {
        assert!(flags & 6 == 6, "allocation failed with endpoints to spare");
        return;
    };
    if flags & 1 == 0 {
        assert!(class.uses_product_addresses());
    }
    let serial_string = usb_class::serial_string(&serial);
    let mut usb = usb_class::device_builder(&alloc, &serial_string)
        .unwrap()
        .build();

    let bulk_in = class.bulk_in_address().index();
    let bulk_out = class.bulk_out_address().index();
    let notify = class.notify_address().index();
    let max_out = usize::from(host.st().max_out[bulk_out].unwrap());

    let mut noise = Xs(0x1234_5678_9abc_def1);
    let mut nonces = Xs(0x0fed_cba9_8765_4321);
    let mut now = Instant::ZERO;
    let mut session = Session::new(Config::default(), now);
    let mut frames = Frames {
        aligned: true,
        frame: Vec::new(),
        whole: 0,
    };
    // SET_CONFIGURATION 1 read by the device since the last bus reset.
    let mut set_config_seen = false;
    // SET_LINE_CODING, SET_CONTROL_LINE_STATE read since the last reset.
    let mut set_line_coding_seen = false;
    let mut control_lines_seen = false;
    let mut setups_seen = 0usize;
    let mut steps = 0u32;

    while !input.0.is_empty() && steps < 2000 {
        steps += 1;
        let op = input.u8();
        let mut setup: Option<([u8; 8], Vec<Vec<u8>>)> = None;
        let mut pumps = 1usize;
        match op % 12 {
            0 => host.st().reset_pending = true,
            1 | 2 => {
                let s: [u8; 8] = if op % 12 == 1 {
                    std::array::from_fn(|_| input.u8())
                } else {
                    let comm = u16::from(input.u8() % 3);
                    let arg = input.u8();
                    match arg % 10 {
                        0 => setup_bytes(0x00, 5, u16::from(input.u8() % 128), 0, 0),
                        1 => {
                            let v = [0, 1, 1, 2, input.u16()][usize::from(input.u8() % 5)];
                            setup_bytes(0x00, 9, v, 0, 0)
                        }
                        2 => {
                            let ty = [1u16, 2, 3, 6, 0x21][usize::from(input.u8() % 5)];
                            let idx = u16::from(input.u8() % 5);
                            setup_bytes(0x80, 6, ty << 8 | idx, 0x0409, input.u16() % 300)
                        }
                        3 => setup_bytes(
                            0x21,
                            0x20,
                            0,
                            comm,
                            [7, 7, 8, 3, 0][usize::from(arg / 10 % 5)],
                        ),
                        4 => setup_bytes(
                            0xa1,
                            0x21,
                            0,
                            comm,
                            [7, 7, 64, 1, 0][usize::from(arg / 10 % 5)],
                        ),
                        5 => setup_bytes(0x21, 0x22, input.u16(), comm, 0),
                        6 => setup_bytes(0x21, 0x23, input.u16(), comm, 0),
                        7 => setup_bytes(
                            0x21 | (arg & 0x80),
                            input.u8(),
                            input.u16(),
                            comm,
                            input.u16() % 80,
                        ),
                        8 => {
                            let ep = [0x81u16, 0x03, 0x82, 0x00, input.u16()]
                                [usize::from(input.u8() % 5)];
                            setup_bytes(0x02, [1, 3][usize::from(arg >> 7)], 0, ep, 0)
                        }
                        _ => setup_bytes(0x80 | (arg & 3), 0, 0, u16::from(input.u8()), 2),
                    }
                };
                // A data stage for OUT requests, in packets of the host's
                // choosing (usually the right ones).
                let mut stage = Vec::new();
                let length = usize::from(u16::from_le_bytes([s[6], s[7]]));
                if s[0] & 0x80 == 0 && length > 0 {
                    let exact = input.u8() & 3 != 0;
                    let mut left = length.min(256);
                    while left > 0 {
                        let n = if exact {
                            left.min(64)
                        } else {
                            usize::from(input.u8() % 65)
                        };
                        let mut p = input.take(n);
                        p.resize(n, 0);
                        left = left.saturating_sub(n.max(1));
                        stage.push(p);
                    }
                }
                setup = Some((s, stage));
            }
            3 => {
                let n = usize::from(input.u8());
                let n = if n > 240 { n - 176 } else { n % (max_out + 1) };
                let p = input.take(n);
                host.st().out[bulk_out].push_back(p);
            }
            4 => {
                while let Some(t) = session.poll_transmit() {
                    for p in t.chunks(max_out.max(1)) {
                        host.st().out[bulk_out].push_back(p.to_vec());
                    }
                }
            }
            5 => {
                let n = usize::from(input.u8() % 65);
                let p = input.take(n);
                host.st().out[0].push_back(p);
            }
            6 => {
                for _ in 0..input.u8() % 8 {
                    class.tick();
                }
                if input.u8() % 4 == 0 {
                    class.set_pacing(if class.pacing() == Pacing::Ticked {
                        Pacing::HostDriven
                    } else {
                        Pacing::Ticked
                    });
                }
            }
            7 => host.st().suspend = Some(input.u8() & 1 == 0),
            8 => {
                let mut s = host.st();
                match input.u8() % 3 {
                    0 => s.fail_writes = input.u8() % 4,
                    1 => s.fail_reads = input.u8() % 4,
                    _ => s.short_write = usize::from(input.u8() % 80),
                }
            }
            9 => {
                now = Instant::from_millis(now.millis() + u64::from(input.u8()) * 100);
                session.handle_timeout(now);
            }
            _ => pumps = usize::from(input.u8() % 64) + 1,
        }

        if let Some((s, stage)) = setup {
            let mut st = host.st();
            st.setup = Some(s);
            st.in_buf[0] = None;
            st.out[0].clear();
            st.out[0].extend(stage);
            st.stalled_in &= !1;
            st.stalled_out &= !1;
        }

        for _ in 0..pumps {
            now = Instant::from_millis(now.millis() + 11);
            for _ in 0..3 {
                let before = host.st().resets_done;
                usb.poll(&mut [&mut class]);
                let st = host.st();
                for s in &st.setups_read[setups_seen..] {
                    set_line_coding_seen |= s[0] == 0x21 && s[1] == 0x20;
                    control_lines_seen |= s[0] == 0x21 && s[1] == 0x22;
                    if s[0] == 0x00 && s[1] == 9 {
                        if u16::from_le_bytes([s[2], s[3]]) == 1 {
                            set_config_seen = true;
                        } else {
                            // The class may drop what a packet the host has
                            // not collected yet belongs to.
                            frames.aligned = false;
                        }
                    }
                }
                setups_seen = st.setups_read.len();
                if st.resets_done != before {
                    drop(st);
                    set_config_seen = false;
                    set_line_coding_seen = false;
                    control_lines_seen = false;
                    frames.restart();
                    assert!(!class.is_configured(), "configured after a reset");
                    assert_eq!(class.pending_len(), 0, "a frame survived a reset");
                    assert_eq!(class.line_coding(), LineCoding::default());
                    assert!(!class.dtr() && !class.rts());
                }
            }
            if class.is_configured() {
                assert!(set_config_seen, "configured without SET_CONFIGURATION 1");
            }

            let configured = class.is_configured();
            let (w0, r0) = {
                let st = host.st();
                (st.written[bulk_in], st.read[bulk_out])
            };
            let result = class.run(&mut noise);
            let st = host.st();
            let (w1, r1) = (st.written[bulk_in], st.read[bulk_out]);
            drop(st);
            if let Ok(act) = result {
                assert_eq!(act.sent as u64, w1 - w0, "Activity::sent");
                assert_eq!(act.received as u64, r1 - r0, "Activity::received");
                if !configured {
                    assert_eq!(act, Default::default(), "moved bytes unconfigured");
                }
            }
            if !configured {
                assert_eq!((w0, r0), (w1, r1), "moved bytes unconfigured");
            }
            assert!(class.pending_len() <= MAX_OUTPUT);
            // Line settings change only on the host's class requests
            // (usb-device 0.3.2 may splice a SETUP's own bytes into a
            // pending data stage, so the values are not checked).
            if class.line_coding() != LineCoding::default() {
                assert!(set_line_coding_seen, "line coding the host never set");
            }
            if class.dtr() || class.rts() {
                assert!(control_lines_seen, "control lines the host never set");
            }

            // IN tokens on the mask the op byte's top bits choose
            // (everything when pumping).
            let mask = if op % 12 >= 10 { 7 } else { op >> 5 };
            let mut st = host.st();
            if mask & 1 != 0 && st.in_buf[0].take().is_some() {
                st.in_complete |= 1;
            }
            if mask & 2 != 0
                && st.stalled_in & (1 << bulk_in) == 0
                && let Some(p) = st.in_buf[bulk_in].take()
            {
                st.in_complete |= 1 << bulk_in;
                drop(st);
                frames.push(&p);
                let mut rest = &p[..];
                while !rest.is_empty() {
                    let n = session.handle_input(now, rest, &keyring, &mut nonces);
                    rest = &rest[n..];
                    while session.poll_event().is_some() {}
                }
                st = host.st();
            }
            if mask & 4 != 0 && st.in_buf[notify].take().is_some() {
                st.in_complete |= 1 << notify;
            }
            assert_eq!(st.written[notify], 0, "wrote to the notification endpoint");
            for idx in [bulk_in, notify] {
                assert_eq!(st.empty_writes[idx], 0, "empty packet on EP{idx} IN");
                assert_eq!(st.oversize_writes[idx], 0, "oversized packet on EP{idx} IN");
            }
            if op % 12 == 9 {
                break;
            }
        }
    }
    std::hint::black_box(frames.whole);
});
