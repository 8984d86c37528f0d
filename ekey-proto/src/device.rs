//! The key's own side: a software Entropy Key as a sans-IO state machine.
//!
//! [`Device`] takes the host's command bytes in and produces the frames a
//! real key would send, encrypting blocks from a caller-supplied noise
//! source (any [`rand_core::Rng`]). It has no clock: each call to
//! [`Device::poll`] is one frame slot, and the caller paces them (a real key
//! sends about 90 frames a second). Tests use its fault knobs ([`Faults`])
//! to make a hostile key.
//!
//! ```
//! use ekey_proto::device::{Device, DeviceConfig};
//! use ekey_proto::keys::{LongTermKey, Serial};
//! # struct Noise(u8); impl rand_core::TryRng for Noise { type Error = core::convert::Infallible;
//! # fn try_next_u32(&mut self) -> Result<u32, Self::Error> { Ok(7) }
//! # fn try_next_u64(&mut self) -> Result<u64, Self::Error> { Ok(7) }
//! # fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Self::Error> { d.fill(self.0); Ok(()) } }
//! let mut key = Device::new(DeviceConfig::new(Serial([1; 12]), LongTermKey::from_bytes([2; 32])));
//! let mut noise = Noise(0x55);
//! let first = key.poll(&mut noise).unwrap();
//! assert_eq!(&first.bytes[..4], b"* S!"); // a key starts by saying who it is
//! ```

use core::fmt;

use rand_core::Rng;

use crate::crypto::{BLOCK_LEN, FrameKeys, finish_long_term_nonce_mac, long_term_nonce_mac_state};
use crate::keys::{LongTermKey, MasterKey, Serial, SessionKey};
use crate::pem;
use crate::skein::{Personalisation, Skein256};
use crate::wire::command::RESET;
use crate::wire::deframe::FRAME_LEN;
use crate::wire::info::{FailureMode, Fips, InfoItem, Shannon, Temperature, Voltage};
use crate::wire::packet::{PAYLOAD_LEN, Packet, Text};

/// Longest output of one [`Device::poll`]: garbage, a frame, a replay.
pub const MAX_OUTPUT: usize = 64 + 2 * FRAME_LEN;

/// Longest nonce the key counts (the sub-code has 12 bits).
pub const MAX_NONCE_LEN: u16 = 4095;

/// How a software key is set up.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    /// Serial number.
    pub serial: Serial,
    /// Long-term key (as in its flash).
    pub long_term_key: LongTermKey,
    /// Master key; without one, long-term re-keys are refused.
    pub master_key: Option<MasterKey>,
    /// An information cycle (`T V`, `F`, `S` frames) after this many `E!`
    /// frames. Default 78 (one FIPS block).
    pub info_every: u32,
    /// While unkeyed, a `k>` every this many polls (others send nothing).
    /// Default 8.
    pub rekey_request_every: u32,
    /// Wrong long-term re-key MACs before the key locks itself. Default 3.
    pub max_long_term_failures: u32,
    /// Reported temperature. Default 315.0 K.
    pub temperature: Temperature,
    /// Reported supply voltage. Default 3254 mV.
    pub voltage: Voltage,
}

impl DeviceConfig {
    /// A configuration with the documented defaults.
    pub fn new(serial: Serial, long_term_key: LongTermKey) -> Self {
        DeviceConfig {
            serial,
            long_term_key,
            master_key: None,
            info_every: 78,
            rekey_request_every: 8,
            max_long_term_failures: 3,
            temperature: Temperature { deci_kelvin: 3150 },
            voltage: Voltage { millivolts: 3254 },
        }
    }
}

/// Faults to inject; each field is consumed as it takes effect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Faults {
    /// Corrupt the MAC of this many coming frames.
    pub corrupt_macs: u32,
    /// Corrupt the MAC of this many coming `E!` frames (other frames pass).
    pub corrupt_entropy_macs: u32,
    /// Send this many bytes of garbage (from the noise source) before the
    /// next frame.
    pub garbage: usize,
    /// Send the next `E!` frame twice.
    pub replay_next: bool,
    /// Enter this failure mode (reported in `I>S`; no more entropy until
    /// the key is re-created, as a real key needs a power cycle).
    pub failure_mode: Option<FailureMode>,
    /// Send a `B>` (generators bad) instead of the next `K!`.
    pub bad_generators_on_rekey: bool,
    /// A lying key: keep sending entropy while reporting a failure mode
    /// (a host must not release it).
    pub keep_sending_when_failed: bool,
    /// Put a malformed item (`V0325x`) before the temperature in the next
    /// temperature-and-voltage report.
    pub malformed_info_item: bool,
}

/// What one frame slot produced.
#[derive(Clone, Debug, Default)]
pub struct Output {
    /// Bytes for the host.
    pub bytes: heapless::Vec<u8, MAX_OUTPUT>,
    /// The `E!` frame in `bytes`, if one was sent.
    pub entropy: Option<SentBlock>,
}

/// The plaintext of an `E!` frame, for tests to compare with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentBlock {
    /// Sequence number.
    pub seq: u16,
    /// The plaintext.
    pub data: [u8; BLOCK_LEN],
    /// Whether its MAC was sent intact (false when corrupted on purpose).
    pub authentic: bool,
    /// Whether it was sent twice (the second copy is a replay).
    pub replayed: bool,
}

/// Counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames sent.
    pub frames: u64,
    /// `E!` frames sent.
    pub blocks: u64,
    /// Session re-keys done.
    pub rekeys: u64,
    /// Resets seen.
    pub resets: u64,
    /// `W>` frames sent.
    pub warnings: u64,
    /// Long-term re-keys done.
    pub long_term_rekeys: u64,
    /// Long-term re-keys refused.
    pub long_term_refusals: u64,
}

#[derive(Clone)]
enum Reply {
    Serial,
    SessionRekey {
        nonce_len: u16,
        entropy: [u8; BLOCK_LEN],
        key: SessionKey,
    },
    Unlocked,
    LongTermRekey {
        nonce_len: u16,
        entropy: [u8; BLOCK_LEN],
    },
    Refused(&'static [u8]),
    Warning(u8),
    BadGenerators,
}

// No allocator: the nonce's hashing states live inline, whatever the size.
#[allow(clippy::large_enum_variant)]
enum Parse {
    Idle,
    /// Collecting a nonce for `K` or `L`.
    Nonce {
        long_term: bool,
        quad: [u8; 4],
        have: u8,
        len: u16,
        /// RS (session) or LRS (long-term) state, device entropy absorbed.
        derive: Skein256,
        /// LKMS state (long-term only).
        mac: Option<Skein256>,
        entropy: [u8; BLOCK_LEN],
    },
    /// Collecting the 8 characters after `M`.
    Mac {
        chars: [u8; 8],
        have: u8,
    },
}

/// Which info frame comes next in a cycle.
#[derive(Clone, Copy, PartialEq, Eq)]
enum InfoPhase {
    None,
    TempVolt,
    Fips,
    Shannon,
}

/// A software Entropy Key. See the [module docs](self).
pub struct Device {
    config: DeviceConfig,
    keys: FrameKeys,
    keyed: bool,
    seq: u16,
    parse: Parse,
    replies: heapless::Deque<Reply, 8>,
    unlocked: Option<[u8; 6]>,
    long_term_failures: u32,
    failure: FailureMode,
    info_phase: InfoPhase,
    since_info: u32,
    idle_polls: u32,
    fips_blocks: u32,
    faults: Faults,
    pending_key: Option<SessionKey>,
    stats: DeviceStats,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device")
            .field("serial", &self.config.serial)
            .field("keyed", &self.keyed)
            .field("seq", &self.seq)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

const UNABLE: &[u8] = b"Unable to send entropy. Please re-key session.";
const UNLOCKED: &[u8] = b"Long-term rekey unlocked";
const REFUSED_MAC: &[u8] = b"Long-term rekey refused: bad nonce MAC";
const REFUSED_LOCKED: &[u8] = b"Long-term rekey refused: locked out";
const BAD_GENERATORS: &[u8] = b"Generators failed during rekey";

impl Device {
    /// A key that has just been powered on: its first frame is `S!`.
    pub fn new(config: DeviceConfig) -> Self {
        let keys = FrameKeys::new(&config.serial, &SessionKey::ZERO);
        let mut d = Device {
            config,
            keys,
            keyed: false,
            seq: 0,
            parse: Parse::Idle,
            replies: heapless::Deque::new(),
            unlocked: None,
            long_term_failures: 0,
            failure: FailureMode::Ok,
            info_phase: InfoPhase::None,
            since_info: 0,
            idle_polls: 0,
            fips_blocks: 0,
            faults: Faults::default(),
            pending_key: None,
            stats: DeviceStats::default(),
        };
        d.reset();
        d.stats.resets = 0;
        d
    }

    /// The key's serial.
    pub fn serial(&self) -> Serial {
        self.config.serial
    }

    /// The long-term key in the key's "flash" (changes on a long-term
    /// re-key).
    pub fn long_term_key(&self) -> &LongTermKey {
        &self.config.long_term_key
    }

    /// Replaces the long-term key (e.g. to make a key whose keyring entry
    /// is wrong).
    pub fn set_long_term_key(&mut self, key: LongTermKey) {
        self.config.long_term_key = key;
    }

    /// Whether a session key is in use.
    pub fn is_keyed(&self) -> bool {
        self.keyed
    }

    /// The failure mode the key is in.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }

    /// Counters.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// The fault knobs, to set.
    pub fn faults_mut(&mut self) -> &mut Faults {
        &mut self.faults
    }

    /// Sets the core temperature the key reports from now on (a sensor
    /// reading, e.g. to show a host reacting to an overheating key).
    pub fn set_temperature(&mut self, temperature: Temperature) {
        self.config.temperature = temperature;
    }

    /// Sets the supply voltage the key reports from now on.
    pub fn set_voltage(&mut self, voltage: Voltage) {
        self.config.voltage = voltage;
    }

    fn reset(&mut self) {
        self.stats.resets = self.stats.resets.saturating_add(1);
        self.keys = FrameKeys::new(&self.config.serial, &SessionKey::ZERO);
        self.keyed = false;
        self.seq = 0;
        self.parse = Parse::Idle;
        self.replies.clear();
        self.unlocked = None;
        self.info_phase = InfoPhase::TempVolt;
        self.since_info = 0;
        self.idle_polls = 0;
        self.pending_key = None;
        let _ = self.replies.push_back(Reply::Serial);
    }

    fn reply(&mut self, r: Reply) {
        if self.replies.is_full() {
            let _ = self.replies.pop_front();
        }
        let _ = self.replies.push_back(r);
    }

    /// Feeds bytes from the host (one USB packet's worth, as the key reads
    /// them: an unknown character drops the rest of the packet).
    pub fn handle_input<R: Rng + ?Sized>(&mut self, bytes: &[u8], noise: &mut R) {
        for &b in bytes {
            if b == RESET {
                self.reset();
                continue;
            }
            let parse = core::mem::replace(&mut self.parse, Parse::Idle);
            self.parse = match parse {
                Parse::Idle => match b {
                    b'R' | b'r' => {
                        self.reset();
                        Parse::Idle
                    }
                    b'K' | b'k' => self.start_nonce(false, noise),
                    b'L' | b'l' => self.start_nonce(true, noise),
                    b'M' | b'm' => Parse::Mac {
                        chars: [0; 8],
                        have: 0,
                    },
                    _ => {
                        self.warn(b);
                        return;
                    }
                },
                Parse::Mac { mut chars, have } => {
                    if let Some(slot) = chars.get_mut(usize::from(have)) {
                        *slot = b;
                    }
                    let have = have.saturating_add(1);
                    if have < 8 {
                        Parse::Mac { chars, have }
                    } else {
                        let mut mac = [0u8; 6];
                        if pem::decode(&chars, &mut mac) == Ok(6) {
                            self.unlocked = Some(mac);
                            self.reply(Reply::Unlocked);
                        } else {
                            self.warn(b);
                            return;
                        }
                        Parse::Idle
                    }
                }
                Parse::Nonce {
                    long_term,
                    mut quad,
                    have,
                    mut len,
                    mut derive,
                    mut mac,
                    entropy,
                } => {
                    if b == b'.' {
                        if have != 0 {
                            self.warn(b);
                            return;
                        }
                        self.finish_nonce(long_term, len, derive, mac, entropy);
                        Parse::Idle
                    } else if pem::decode_char(b).is_none() && b != b'=' {
                        self.warn(b);
                        return;
                    } else {
                        if let Some(slot) = quad.get_mut(usize::from(have)) {
                            *slot = b;
                        }
                        let mut have = have.saturating_add(1);
                        if have == 4 {
                            have = 0;
                            match pem::decode_quad(quad) {
                                Ok((bytes, n)) => {
                                    let part = bytes.get(..n).unwrap_or(&[]);
                                    derive.update(part);
                                    if let Some(m) = mac.as_mut() {
                                        m.update(part);
                                    }
                                    len = len.saturating_add(n as u16).min(MAX_NONCE_LEN);
                                }
                                Err(_) => {
                                    self.warn(b);
                                    return;
                                }
                            }
                        }
                        Parse::Nonce {
                            long_term,
                            quad,
                            have,
                            len,
                            derive,
                            mac,
                            entropy,
                        }
                    }
                }
            };
        }
    }

    fn warn(&mut self, b: u8) {
        self.parse = Parse::Idle;
        self.stats.warnings = self.stats.warnings.saturating_add(1);
        self.reply(Reply::Warning(b));
    }

    fn start_nonce<R: Rng + ?Sized>(&mut self, long_term: bool, noise: &mut R) -> Parse {
        let mut entropy = [0u8; BLOCK_LEN];
        noise.fill_bytes(&mut entropy);
        let serial = self.config.serial;
        let (derive, mac) = if long_term {
            let master = self
                .config
                .master_key
                .clone()
                .unwrap_or(MasterKey::from_bytes([0; 32]));
            let mut d = Skein256::prepare(
                serial.as_bytes(),
                master.as_bytes(),
                Personalisation::LongTermReKeying,
            );
            d.update(&entropy);
            (d, Some(long_term_nonce_mac_state(&serial, &master)))
        } else {
            let mut d = Skein256::prepare(
                serial.as_bytes(),
                self.config.long_term_key.as_bytes(),
                Personalisation::ReKeying,
            );
            d.update(&entropy);
            (d, None)
        };
        Parse::Nonce {
            long_term,
            quad: [0; 4],
            have: 0,
            len: 0,
            derive,
            mac,
            entropy,
        }
    }

    fn finish_nonce(
        &mut self,
        long_term: bool,
        len: u16,
        derive: Skein256,
        mac: Option<Skein256>,
        entropy: [u8; BLOCK_LEN],
    ) {
        if !self.failure.is_ok() && !self.faults.keep_sending_when_failed {
            // A key in a failure mode has locked itself: no re-keying.
            return;
        }
        if !long_term {
            if self.faults.bad_generators_on_rekey {
                self.faults.bad_generators_on_rekey = false;
                self.reply(Reply::BadGenerators);
                return;
            }
            let key = SessionKey::from_bytes(derive.finalize());
            self.reply(Reply::SessionRekey {
                nonce_len: len,
                entropy,
                key,
            });
            return;
        }
        let expected = self.unlocked.take();
        let locked = self.config.master_key.is_none()
            || self.long_term_failures >= self.config.max_long_term_failures;
        let (Some(expected), Some(mac), false) = (expected, mac, locked) else {
            self.stats.long_term_refusals = self.stats.long_term_refusals.saturating_add(1);
            self.reply(Reply::Refused(REFUSED_LOCKED));
            return;
        };
        let got = finish_long_term_nonce_mac(mac);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(&got[..], &expected[..])) {
            self.long_term_failures = self.long_term_failures.saturating_add(1);
            self.stats.long_term_refusals = self.stats.long_term_refusals.saturating_add(1);
            self.reply(Reply::Refused(REFUSED_MAC));
            return;
        }
        self.long_term_failures = 0;
        self.config.long_term_key = LongTermKey::from_bytes(derive.finalize());
        self.stats.long_term_rekeys = self.stats.long_term_rekeys.saturating_add(1);
        self.reply(Reply::LongTermRekey {
            nonce_len: len,
            entropy,
        });
    }

    /// One frame slot: the next frame the key sends, if any. Replies to
    /// commands come first, then entropy (when keyed) with an information
    /// cycle every [`DeviceConfig::info_every`] blocks, or a `k>` now and
    /// then when unkeyed.
    pub fn poll<R: Rng + ?Sized>(&mut self, noise: &mut R) -> Option<Output> {
        if let Some(mode) = self.faults.failure_mode.take() {
            self.failure = mode;
            self.info_phase = InfoPhase::TempVolt;
        }
        let mut out = Output::default();
        if self.faults.garbage > 0 {
            let n = self.faults.garbage.min(64);
            self.faults.garbage = self.faults.garbage.saturating_sub(n);
            let mut g = [0u8; 64];
            let g = g.get_mut(..n).unwrap_or(&mut []);
            noise.fill_bytes(g);
            let _ = out.bytes.extend_from_slice(g);
        }
        let packet = self.next_packet(noise, &mut out)?;
        let (frame, corrupted) = self.finish_frame(&packet);
        let _ = out.bytes.extend_from_slice(&frame);
        if let Some(sent) = out.entropy.as_mut() {
            sent.authentic = !corrupted;
            if self.faults.replay_next {
                self.faults.replay_next = false;
                sent.replayed = true;
                let _ = out.bytes.extend_from_slice(&frame);
            }
        }
        // A session key takes effect right after the K! that announced it.
        if let Some(key) = self.pending_key.take() {
            self.keys = FrameKeys::new(&self.config.serial, &key);
            self.keyed = true;
            self.seq = 0;
            self.stats.rekeys = self.stats.rekeys.saturating_add(1);
        }
        self.stats.frames = self.stats.frames.saturating_add(1);
        Some(out)
    }

    fn finish_frame(&mut self, packet: &Packet) -> ([u8; FRAME_LEN], bool) {
        let mut frame = packet.emit(&self.keys);
        if self.faults.corrupt_entropy_macs > 0 && matches!(packet, Packet::Entropy { .. }) {
            self.faults.corrupt_entropy_macs -= 1;
        } else if self.faults.corrupt_macs > 0 {
            self.faults.corrupt_macs -= 1;
        } else {
            return (frame, false);
        }
        if let Some(c) = frame.get_mut(54) {
            *c = if *c == b'A' { b'B' } else { b'A' };
        }
        (frame, true)
    }

    fn text(bytes: &[u8]) -> Text {
        Text::new(bytes)
    }

    fn info_packet(&mut self, phase: InfoPhase) -> Packet {
        let mut text: heapless::Vec<u8, PAYLOAD_LEN> = heapless::Vec::new();
        match phase {
            InfoPhase::TempVolt => {
                if core::mem::take(&mut self.faults.malformed_info_item) {
                    let _ = text.extend_from_slice(b"V0325x ");
                }
                let _ = InfoItem::Temperature(self.config.temperature).write_to(&mut text);
                let _ = text.push(b' ');
                let _ = InfoItem::Voltage(self.config.voltage).write_to(&mut text);
            }
            InfoPhase::Fips => {
                let _ = InfoItem::Fips(Fips {
                    blocks: self.fips_blocks,
                    failures: 0,
                    monobit: 0,
                    poker: 0,
                    runs: 0,
                })
                .write_to(&mut text);
            }
            InfoPhase::Shannon | InfoPhase::None => {
                // Figures of the order a real key reports.
                let _ = InfoItem::Shannon(Shannon {
                    raw_bytes: 8052,
                    left: 23751,
                    right: 23792,
                    xor: 23584,
                    debiased_left_bytes: 7112,
                    debiased_left: 20876,
                    debiased_right_bytes: 8063,
                    debiased_right: 24150,
                    failure: self.failure,
                })
                .write_to(&mut text);
            }
        }
        Packet::Info(Text::new(&text))
    }

    fn next_packet<R: Rng + ?Sized>(&mut self, noise: &mut R, out: &mut Output) -> Option<Packet> {
        if let Some(reply) = self.replies.pop_front() {
            return Some(match reply {
                Reply::Serial => Packet::Serial {
                    version: 0,
                    serial: self.config.serial,
                },
                Reply::SessionRekey {
                    nonce_len,
                    entropy,
                    key,
                } => {
                    self.pending_key = Some(key);
                    Packet::SessionRekey { nonce_len, entropy }
                }
                Reply::Unlocked => Packet::LongTermUnlocked(Self::text(UNLOCKED)),
                Reply::LongTermRekey { nonce_len, entropy } => {
                    Packet::LongTermRekey { nonce_len, entropy }
                }
                Reply::Refused(t) => Packet::LongTermRefused(Self::text(t)),
                Reply::Warning(b) => {
                    let mut t: heapless::Vec<u8, PAYLOAD_LEN> = heapless::Vec::new();
                    let _ = t.extend_from_slice(b"Unknown Input Character 0x");
                    let hex = b"0123456789abcdef";
                    let _ = t.push(hex.get(usize::from(b >> 4)).copied().unwrap_or(b'0'));
                    let _ = t.push(hex.get(usize::from(b & 15)).copied().unwrap_or(b'0'));
                    Packet::Warning(Text::new(&t))
                }
                Reply::BadGenerators => Packet::BadGenerators(Self::text(BAD_GENERATORS)),
            });
        }
        if self.info_phase != InfoPhase::None {
            let phase = self.info_phase;
            self.info_phase = match phase {
                InfoPhase::TempVolt => InfoPhase::Fips,
                InfoPhase::Fips => InfoPhase::Shannon,
                InfoPhase::Shannon | InfoPhase::None => InfoPhase::None,
            };
            return Some(self.info_packet(phase));
        }
        self.idle_polls = self.idle_polls.wrapping_add(1);
        if !self.failure.is_ok() && !self.faults.keep_sending_when_failed {
            // A failed key only reports, once a cycle.
            if self
                .idle_polls
                .is_multiple_of(self.config.info_every.max(1))
            {
                self.info_phase = InfoPhase::TempVolt;
            }
            return None;
        }
        if !self.keyed || self.seq > crate::host::LAST_SEQUENCE {
            let every = self.config.rekey_request_every.max(1);
            return (self.idle_polls % every == 1 % every)
                .then(|| Packet::RekeyRequest(Self::text(UNABLE)));
        }
        let seq = self.seq;
        let subcode = pem::encode_u12(seq);
        let mut plain = [0u8; BLOCK_LEN];
        noise.fill_bytes(&mut plain);
        let pad = self.keys.pad(subcode);
        let mut data = plain;
        for (d, p) in data.iter_mut().zip(pad.iter()) {
            *d ^= p;
        }
        self.seq = seq.saturating_add(1);
        self.stats.blocks = self.stats.blocks.saturating_add(1);
        self.since_info = self.since_info.saturating_add(1);
        if self.since_info >= self.config.info_every {
            self.since_info = 0;
            self.fips_blocks = self.fips_blocks.saturating_add(1);
            self.info_phase = InfoPhase::TempVolt;
        }
        out.entropy = Some(SentBlock {
            seq,
            data: plain,
            authentic: true,
            replayed: false,
        });
        Some(Packet::Entropy { seq, subcode, data })
    }
}
