//! `EntropyKeyRng` with a health gate, over a link the fuzzer controls: it
//! chooses how the software key's frames are mangled, which faults the key
//! injects, whether its noise is good or stuck, and how much each call
//! asks for.
//!
//! Checks: no panic; everything handed out is bytes of blocks the key sent
//! with intact MACs, from tested 2,500-byte blocks, in order, never twice;
//! and never more than the gate released.
#![no_main]

use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::rc::Rc;

use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::health::{Gate, GateConfig};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rng::{EntropyKeyRng, Error, SingleKey};
use ekey_proto::time::Instant;
use ekey_proto::wire::info::{FailureMode, Temperature};
use libfuzzer_sys::fuzz_target;
use rand_core::TryRng;

use ekey_fuzz::Xs;

/// The key's noise: good, or one byte over and over.
struct Noise {
    good: Xs,
    stuck: Option<u8>,
}
impl TryRng for Noise {
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
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Infallible> {
        match self.stuck {
            Some(s) => d.fill(s),
            None => self.good.try_fill_bytes(d)?,
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Noise {}

struct End {
    dev: Device,
    noise: Noise,
    ops: Vec<u8>,
    at: usize,
    pending: VecDeque<u8>,
    authentic: Vec<[u8; 32]>,
}

#[derive(Clone)]
struct Link(Rc<RefCell<End>>);

impl embedded_io::ErrorType for Link {
    type Error = embedded_io::ErrorKind;
}

impl embedded_io::Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let mut e = self.0.borrow_mut();
        let e = &mut *e;
        if e.pending.is_empty() {
            let (Some(&op), arg) = (e.ops.get(e.at), e.ops.get(e.at + 1).copied().unwrap_or(0))
            else {
                return Ok(0); // the fuzzer's script is over: end of stream
            };
            e.at += 2;
            match op % 10 {
                0..=5 => {
                    // The key speaks, whole or with one mutation; most
                    // often several frames, so that gate blocks fill up.
                    for _ in 0..=(arg % 8) {
                        let Some(o) = e.dev.poll(&mut e.noise) else {
                            continue;
                        };
                        // A replayed frame is sent twice; its block counts once.
                        if let Some(b) = o.entropy
                            && b.authentic
                        {
                            e.authentic.push(b.data);
                        }
                        let mut bytes = o.bytes.to_vec();
                        let at = usize::from(arg) % bytes.len().max(1);
                        match op % 6 {
                            1 if !bytes.is_empty() && arg > 200 => bytes[at] ^= 1 << (arg % 8),
                            2 if !bytes.is_empty() && arg > 220 => {
                                bytes.remove(at);
                            }
                            _ => {}
                        }
                        e.pending.extend(bytes);
                    }
                }
                6 => e.noise.stuck = (arg % 2 == 0).then_some(arg),
                7 => match arg % 5 {
                    0 => e.dev.faults_mut().corrupt_macs += 1,
                    1 => e.dev.faults_mut().replay_next = true,
                    2 => e.dev.faults_mut().garbage += usize::from(arg % 40),
                    3 if arg == 3 => e.dev.faults_mut().failure_mode = Some(FailureMode::FipsRate),
                    _ => {}
                },
                8 => e.dev.set_temperature(Temperature {
                    deci_kelvin: 2500 + u32::from(arg) * 5,
                }),
                _ => return Err(embedded_io::ErrorKind::TimedOut),
            }
        }
        let n = buf.len().min(e.pending.len());
        for (d, s) in buf.iter_mut().zip(e.pending.drain(..n)) {
            *d = s;
        }
        if n == 0 {
            return Err(embedded_io::ErrorKind::TimedOut);
        }
        Ok(n)
    }
}

impl embedded_io::Write for Link {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
        let mut e = self.0.borrow_mut();
        let e = &mut *e;
        e.dev.handle_input(buf, &mut e.noise);
        Ok(buf.len())
    }
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sizes, ops)) = data.split_first() else {
        return;
    };
    let serial = Serial([3; 12]);
    let ltk = LongTermKey::from_bytes([4; 32]);
    let link = Link(Rc::new(RefCell::new(End {
        dev: Device::new(DeviceConfig::new(serial, ltk.clone())),
        noise: Noise {
            good: Xs(0x1234_5678),
            stuck: None,
        },
        ops: ops.to_vec(),
        at: 0,
        pending: VecDeque::new(),
        authentic: Vec::new(),
    })));
    let mut ms = 0u64;
    let clock = move || {
        ms += 11;
        Instant::from_millis(ms)
    };
    let config = GateConfig {
        reopen_after: 2,
        ..GateConfig::default()
    };
    let mut rng = EntropyKeyRng::new(link.clone(), SingleKey::new(ltk), Xs(0x9abc_def0), clock)
        .with_gate(Gate::new(config));
    let mut out: Vec<u8> = Vec::new();
    for call in 0..2000usize {
        let len = ((usize::from(sizes) * (call + 1)) % 700) & !3;
        let mut buf = vec![0u8; len];
        match rng.try_fill_bytes(&mut buf) {
            Ok(()) => out.extend_from_slice(&buf),
            Err(Error::Eof) => break,
            Err(Error::FailureMode(_)) => rng.reset(),
            Err(_) => {}
        }
        let released = rng.gate().status().counters.bytes_released;
        assert!(
            released >= out.len() as u64,
            "handed out more than the gate released"
        );
    }
    // Every cut in what comes out falls on a multiple of 4 bytes of the
    // key's stream: blocks are 32 bytes, a tested block 2,500 = 78 * 32 + 4,
    // the adapter takes 32 at a time, and the calls ask for multiples of 4
    // (a failed call's bytes are not used). So each 4 bytes handed out
    // must be 4 aligned bytes of a block the key sent, each after the last.
    let authentic = &link.0.borrow().authentic;
    let words: Vec<&[u8]> = authentic.iter().flat_map(|b| b.chunks(4)).collect();
    let mut next = 0usize;
    for word in out.chunks(4) {
        let at = words[next..].iter().position(|w| *w == word).expect(
            "handed out bytes the key did not send authentically, or out of order, or twice",
        );
        next += at + 1;
    }
});
