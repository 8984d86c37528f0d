//! Shared helpers for the vector tests.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;

pub fn load(name: &str) -> serde_json::Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

pub fn hex(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(v.as_str().unwrap()).unwrap()
}

pub fn arr<const N: usize>(v: &serde_json::Value) -> [u8; N] {
    hex(v).try_into().unwrap()
}

/// An RNG that hands out scripted bytes, then fails the test if asked for
/// more than it has.
pub struct ScriptedRng(pub VecDeque<u8>);

impl rand_core::TryRng for ScriptedRng {
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
        for d in dst {
            *d = self.0.pop_front().expect("scripted RNG ran out of bytes");
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for ScriptedRng {}

use ekey_proto::device::{Device, DeviceConfig, SentBlock};
use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

pub const SERIAL: Serial = Serial([0x21; 12]);

pub fn ltk() -> LongTermKey {
    LongTermKey::from_bytes([0x33; 32])
}

/// A host session wired to a software key over a perfect in-memory link.
pub struct Pair {
    pub device: Device,
    pub session: Session,
    pub now: Instant,
    pub noise: ChaCha20Rng,
    pub nonces: ChaCha20Rng,
    pub keyring: Option<LongTermKey>,
    pub events: Vec<Event>,
    pub sent: Vec<SentBlock>,
    pub released: Vec<[u8; 32]>,
    /// When false, nothing crosses the link (an unplugged cable).
    pub connected: bool,
    /// When true, the host's commands are lost on the way to the key.
    pub drop_commands: bool,
}

impl Pair {
    pub fn new(config: Config) -> Self {
        Self::with_device(config, DeviceConfig::new(SERIAL, ltk()))
    }

    pub fn with_device(config: Config, dev: DeviceConfig) -> Self {
        Pair {
            device: Device::new(dev),
            session: Session::new(config, Instant::ZERO),
            now: Instant::ZERO,
            noise: ChaCha20Rng::seed_from_u64(1),
            nonces: ChaCha20Rng::seed_from_u64(2),
            keyring: Some(ltk()),
            events: Vec::new(),
            sent: Vec::new(),
            released: Vec::new(),
            connected: true,
            drop_commands: false,
        }
    }

    /// Feeds raw bytes to the session as if they came from the key.
    pub fn feed(&mut self, bytes: &[u8]) {
        let keyring = self.keyring.clone();
        let lookup = move |s: &Serial| if *s == SERIAL { keyring.clone() } else { None };
        let mut input = bytes;
        while !input.is_empty() {
            let n = self
                .session
                .handle_input(self.now, input, &lookup, &mut self.nonces);
            input = &input[n..];
            while let Some(ev) = self.session.poll_event() {
                if let Event::Entropy { data, .. } = &ev {
                    self.released.push(*data);
                }
                self.events.push(ev);
            }
        }
    }

    /// One frame slot of 11 ms: host commands to the key, one frame back.
    pub fn step(&mut self) {
        self.now = Instant::from_millis(self.now.millis() + 11);
        while let Some(t) = self.session.poll_transmit() {
            if self.connected && !self.drop_commands {
                self.device.handle_input(&t, &mut self.noise);
            }
        }
        if self.connected
            && let Some(o) = self.device.poll(&mut self.noise)
        {
            if let Some(s) = o.entropy {
                self.sent.push(s);
            }
            self.feed(&o.bytes);
        }
        self.session.handle_timeout(self.now);
        while let Some(ev) = self.session.poll_event() {
            self.events.push(ev);
        }
    }

    pub fn run(&mut self, slots: usize) {
        for _ in 0..slots {
            self.step();
        }
    }

    /// Runs until `pred` holds or `slots` pass; returns whether it held.
    pub fn run_until(&mut self, slots: usize, mut pred: impl FnMut(&Pair) -> bool) -> bool {
        for _ in 0..slots {
            if pred(self) {
                return true;
            }
            self.step();
        }
        pred(self)
    }
}
