//! Long-term re-keying with the master key (PROTOCOL.md §7).
//!
//! [`parse_master_key`] reads the master key as printed on the key's card;
//! [`LongTermRekey`] runs the exchange (reset, `M`, `L`) as a sans-IO
//! procedure driven like [`crate::host::Session`]: bytes in, bytes out,
//! time passed in.
//!
//! ```
//! use ekey_proto::rekey::{parse_master_key, MasterKeyError};
//! // From vectors/keying.json; people type it with spaces.
//! let key = parse_master_key("exNh xZ9h BSvV k7vF KV8H pwZS t4F6 4fo2 gLd/ qUEg ZSMH").unwrap();
//! assert_eq!(key.as_bytes()[0], 0x7b);
//! // One character mistyped: the check byte catches it.
//! assert_eq!(
//!     parse_master_key("exNhxZ9hBSvVk7vFKV8HpwZSt4F64fo2gLd/qUEgZSMh").unwrap_err(),
//!     MasterKeyError::CheckByte
//! );
//! ```

use core::fmt;
use core::time::Duration;

use zeroize::Zeroize;

use crate::crypto::{FrameKeys, derive_long_term_key, long_term_nonce_mac};
use crate::keys::{KEY_LEN, LongTermKey, MasterKey, Serial, SessionKey};
use crate::pem;
use crate::time::Instant;
use crate::wire::command::{Command, MAX_COMMAND_LEN, RESET};
use crate::wire::deframe::Deframer;
use crate::wire::packet::{Packet, Text};

/// Length of the nonce this crate sends in a long-term re-key.
pub const NONCE_LEN: usize = 12;

/// CRC-8 as used for the master key's check byte: polynomial 0x31,
/// initial value 0xFF, MSB first, no final XOR.
///
/// ```
/// assert_eq!(ekey_proto::rekey::crc8(b"123456789"), 0xF7);
/// ```
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0xFFu8;
    for &b in data {
        crc ^= b;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x31
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Why a printed master key was refused. Nothing here reveals key bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MasterKeyError {
    /// A character that is not PEM64, a space or a dash.
    BadCharacter {
        /// 1-based position among the characters typed (spaces included).
        position: usize,
    },
    /// Not 43 or 44 PEM64 characters (spaces and dashes not counted).
    Length {
        /// The characters found.
        found: usize,
    },
    /// The check byte does not match: a character was mistyped.
    CheckByte,
    /// 43 characters: one is missing (a key without check byte ends with
    /// the filler `=` and has 44).
    Missing,
}

impl fmt::Display for MasterKeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MasterKeyError::BadCharacter { position } => write!(
                f,
                "character {position} of the master key is not one that can appear on the card \
                 (A-Z, a-z, 0-9, + and /)"
            ),
            MasterKeyError::Length { found } => write!(
                f,
                "the master key has 44 characters (spaces don't count); {found} were given"
            ),
            MasterKeyError::Missing => f.write_str(
                "the master key has 43 characters: one is missing (a key printed without \
                 check digit ends with '=')",
            ),
            MasterKeyError::CheckByte => f.write_str(
                "the master key's check digit does not match: look for a typing error \
                 (0/O, 1/l/I, case) and try again",
            ),
        }
    }
}

impl core::error::Error for MasterKeyError {}

/// Parses a master key as printed: 44 PEM64 characters (32 key bytes and a
/// CRC-8 check byte), spaces and dashes ignored; or 44 characters ending in
/// the filler `=` that encode exactly 32 bytes, without a check byte.
///
/// Unlike PROTOCOL.md's "43–44 characters", 43 characters are refused
/// ([`MasterKeyError::Missing`]): they are far more often a printed key with
/// a character left out than a key without its filler, and a wrong master
/// key sent to the key counts towards its lock-out.
pub fn parse_master_key(printed: &str) -> Result<MasterKey, MasterKeyError> {
    let mut chars = [0u8; 44];
    let mut n = 0usize;
    for (i, b) in printed.bytes().enumerate() {
        if b == b' ' || b == b'-' || b == b'\t' {
            continue;
        }
        let ok = pem::decode_char(b).is_some() || b == b'=';
        if !ok {
            chars.zeroize();
            return Err(MasterKeyError::BadCharacter {
                position: i.saturating_add(1),
            });
        }
        if let Some(slot) = chars.get_mut(n) {
            *slot = b;
        }
        n = n.saturating_add(1);
    }
    let result = decode_master(&chars, n);
    chars.zeroize();
    result
}

fn decode_master(chars: &[u8; 44], n: usize) -> Result<MasterKey, MasterKeyError> {
    let mut raw = [0u8; 33];
    let result = (|| {
        match n {
            // 43 characters are most likely a printed key with one left out:
            // decoding them as a key without check byte would turn a typing
            // error into a wrong-MAC attempt that counts towards the key's
            // lock-out. A key without check byte has its filler: 44 chars.
            43 => return Err(MasterKeyError::Missing),
            44 => match pem::decode(chars, &mut raw) {
                Ok(33) => {
                    let (key, check) = raw.split_at(KEY_LEN);
                    if check != [crc8(key)] {
                        return Err(MasterKeyError::CheckByte);
                    }
                }
                Ok(KEY_LEN) => {}
                _ => return Err(MasterKeyError::Length { found: n }),
            },
            _ => return Err(MasterKeyError::Length { found: n }),
        }
        let key = raw
            .first_chunk::<KEY_LEN>()
            .copied()
            .unwrap_or([0; KEY_LEN]);
        Ok(MasterKey::from_bytes(key))
    })();
    raw.zeroize();
    result
}

/// The printed form of a master key (44 characters with the check byte).
pub fn print_master_key(key: &MasterKey) -> zeroize::Zeroizing<[u8; 44]> {
    let mut raw = zeroize::Zeroizing::new([0u8; 33]);
    if let Some((k, c)) = raw.split_first_chunk_mut::<KEY_LEN>() {
        k.copy_from_slice(key.as_bytes());
        if let Some(c) = c.first_mut() {
            *c = crc8(key.as_bytes());
        }
    }
    let mut out = zeroize::Zeroizing::new([0u8; 44]);
    let _ = pem::encode(&raw[..], &mut out[..]);
    out
}

/// The `M` command for a nonce: `M` + the nonce MAC in 8 PEM64 characters.
pub fn mac_command(serial: &Serial, master: &MasterKey, nonce: &[u8]) -> [u8; 9] {
    let mac = long_term_nonce_mac(serial, master, nonce);
    let mut out = [0u8; 9];
    let _ = Command::LongTermMac(mac).write(&mut out);
    out
}

/// Tunables of a [`LongTermRekey`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct RekeyConfig {
    /// If set, the key must report this serial.
    pub expected_serial: Option<Serial>,
    /// How long to wait for each answer. Default 3 s.
    pub step_timeout: Duration,
    /// How many times the whole exchange is started over after a timeout.
    /// Default 3.
    pub retries: u32,
}

impl Default for RekeyConfig {
    fn default() -> Self {
        RekeyConfig {
            expected_serial: None,
            step_timeout: Duration::from_secs(3),
            retries: 3,
        }
    }
}

/// Where a long-term re-key stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RekeyStep {
    /// Reset sent, waiting for `S!`.
    Resetting,
    /// `M` sent, waiting for `M>`.
    Unlocking,
    /// `L` sent, waiting for `L!` or `l>`.
    Rekeying,
    /// Finished; see [`LongTermRekey::outcome`].
    Finished,
}

impl fmt::Display for RekeyStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RekeyStep::Resetting => "waiting for the key to answer a reset",
            RekeyStep::Unlocking => "waiting for the key to unlock long-term re-keying",
            RekeyStep::Rekeying => "waiting for the key's long-term re-key reply",
            RekeyStep::Finished => "finished",
        })
    }
}

/// What an `l>` frame says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Refusal {
    /// The nonce MAC was wrong: the master key is not this key's.
    WrongMasterKey,
    /// The key is locked out of long-term re-keying.
    LockedOut,
    /// The frame's text names neither.
    Unspecified,
}

impl Refusal {
    /// Reads the reason from an `l>` frame's text.
    pub fn from_text(text: &[u8]) -> Refusal {
        let has = |needle: &[u8]| {
            text.windows(needle.len())
                .any(|w| w.eq_ignore_ascii_case(needle))
        };
        if has(b"lock") {
            Refusal::LockedOut
        } else if has(b"mac") {
            Refusal::WrongMasterKey
        } else {
            Refusal::Unspecified
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::WrongMasterKey => "the master key is wrong for this key",
            Refusal::LockedOut => "the key is locked out of long-term re-keying",
            Refusal::Unspecified => "the master key is wrong or the key is locked out",
        })
    }
}

/// How a long-term re-key ended.
#[derive(Debug, PartialEq, Eq)]
pub enum RekeyOutcome {
    /// The key took the new long-term key.
    Done {
        /// The key's serial.
        serial: Serial,
        /// The new long-term key, for the keyring.
        key: LongTermKey,
    },
    /// The key answered `l>`.
    Refused {
        /// The key's serial.
        serial: Serial,
        /// What the frame says.
        refusal: Refusal,
        /// The frame's text.
        text: Text,
    },
    /// Another key answered than the one expected.
    WrongSerial {
        /// Expected.
        expected: Serial,
        /// Found.
        found: Serial,
    },
    /// The key reported another nonce length than was sent. The key has
    /// stored a long-term key from a nonce the host did not send: run the
    /// re-key again.
    NonceLength {
        /// Bytes the key says it received.
        received: u16,
    },
    /// No answer in time, after every retry.
    TimedOut {
        /// The step that timed out last.
        step: RekeyStep,
        /// An `L` command reached the key in some attempt: the key may have
        /// stored a new long-term key whose reply was lost. Run the re-key
        /// again (with the master key) before trusting the old keyring entry.
        key_may_have_changed: bool,
    },
}

/// The long-term re-key exchange for one key, sans-IO.
///
/// Drive it with [`handle_input`](Self::handle_input),
/// [`poll_transmit`](Self::poll_transmit), [`poll_timeout`](Self::poll_timeout)
/// and [`handle_timeout`](Self::handle_timeout) until
/// [`outcome`](Self::outcome) is `Some`.
pub struct LongTermRekey {
    config: RekeyConfig,
    master: MasterKey,
    step: RekeyStep,
    deframer: Deframer,
    serial: Option<Serial>,
    zero_keys: Option<FrameKeys>,
    nonce: [u8; NONCE_LEN],
    attempts: u32,
    deadline: Option<Instant>,
    transmit: heapless::Vec<u8, 64>,
    outcome: Option<RekeyOutcome>,
    bad_frames: u64,
    /// An `L` command has been sent in some attempt.
    sent_long_term: bool,
}

impl fmt::Debug for LongTermRekey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LongTermRekey")
            .field("step", &self.step)
            .field("serial", &self.serial)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl LongTermRekey {
    /// Starts the exchange: queues a reset. Errors only if `rng` fails.
    pub fn new<R: rand_core::TryCryptoRng + ?Sized>(
        config: RekeyConfig,
        master: MasterKey,
        now: Instant,
        rng: &mut R,
    ) -> Result<Self, R::Error> {
        let mut nonce = [0u8; NONCE_LEN];
        rng.try_fill_bytes(&mut nonce)?;
        let mut s = LongTermRekey {
            config,
            master,
            step: RekeyStep::Resetting,
            deframer: Deframer::new(),
            serial: None,
            zero_keys: None,
            nonce,
            attempts: 0,
            deadline: None,
            transmit: heapless::Vec::new(),
            outcome: None,
            bad_frames: 0,
            sent_long_term: false,
        };
        s.restart(now);
        Ok(s)
    }

    fn restart(&mut self, now: Instant) {
        self.attempts = self.attempts.saturating_add(1);
        self.transmit.clear();
        let _ = self.transmit.push(RESET);
        self.deframer.reset();
        self.step = RekeyStep::Resetting;
        self.deadline = Some(now + self.config.step_timeout);
    }

    fn finish(&mut self, outcome: RekeyOutcome) {
        self.step = RekeyStep::Finished;
        self.deadline = None;
        self.outcome = Some(outcome);
    }

    /// The current step.
    pub fn step(&self) -> RekeyStep {
        self.step
    }

    /// The key's serial, once known.
    pub fn serial(&self) -> Option<Serial> {
        self.serial
    }

    /// Frames that failed their MAC or made no sense (ignored).
    pub fn bad_frames(&self) -> u64 {
        self.bad_frames
    }

    /// The result, once finished.
    pub fn outcome(&self) -> Option<&RekeyOutcome> {
        self.outcome.as_ref()
    }

    /// Takes the result, once finished.
    pub fn take_outcome(&mut self) -> Option<RekeyOutcome> {
        self.outcome.take()
    }

    /// Bytes to send to the key.
    pub fn poll_transmit(&mut self) -> Option<heapless::Vec<u8, 64>> {
        if self.transmit.is_empty() {
            None
        } else {
            Some(core::mem::take(&mut self.transmit))
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) should be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadline
    }

    /// Tells the procedure time has passed: a step without an answer
    /// starts the exchange over, up to [`RekeyConfig::retries`] times.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.deadline {
            Some(d) if now >= d => {}
            _ => return,
        }
        if self.attempts > self.config.retries {
            let step = self.step;
            let key_may_have_changed = self.sent_long_term;
            self.finish(RekeyOutcome::TimedOut {
                step,
                key_may_have_changed,
            });
        } else {
            self.restart(now);
        }
    }

    /// Feeds bytes from the key; returns how many were consumed (at most
    /// one frame's worth per call).
    pub fn handle_input(&mut self, now: Instant, input: &[u8]) -> usize {
        if self.step == RekeyStep::Finished {
            return input.len();
        }
        let (used, frame) = self.deframer.push(input);
        if let Some(frame) = frame {
            self.handle_frame(now, &frame);
        }
        used
    }

    fn handle_frame(&mut self, now: Instant, frame: &[u8; 64]) {
        let Ok(packet) = Packet::parse(frame) else {
            self.bad_frames = self.bad_frames.saturating_add(1);
            return;
        };
        if let Packet::Serial { serial, .. } = packet {
            let keys = FrameKeys::new(&serial, &SessionKey::ZERO);
            if !keys.verify(frame) {
                self.bad_frames = self.bad_frames.saturating_add(1);
                return;
            }
            if self.step != RekeyStep::Resetting {
                // The key reset under us: start over.
                self.restart(now);
                self.transmit.clear();
            }
            if let Some(expected) = self.config.expected_serial
                && expected != serial
            {
                self.finish(RekeyOutcome::WrongSerial {
                    expected,
                    found: serial,
                });
                return;
            }
            self.serial = Some(serial);
            self.zero_keys = Some(keys);
            let cmd = mac_command(&serial, &self.master, &self.nonce);
            let _ = self.transmit.extend_from_slice(&cmd);
            self.step = RekeyStep::Unlocking;
            self.deadline = Some(now + self.config.step_timeout);
            return;
        }
        let (Some(keys), Some(serial)) = (&self.zero_keys, self.serial) else {
            return;
        };
        if !keys.verify(frame) {
            self.bad_frames = self.bad_frames.saturating_add(1);
            return;
        }
        match (self.step, packet) {
            (RekeyStep::Unlocking, Packet::LongTermUnlocked(_)) => {
                let mut buf = [0u8; MAX_COMMAND_LEN];
                if let Ok(n) = Command::LongTermRekey(&self.nonce).write(&mut buf) {
                    let _ = self.transmit.extend_from_slice(buf.get(..n).unwrap_or(&[]));
                }
                self.step = RekeyStep::Rekeying;
                self.sent_long_term = true;
                self.deadline = Some(now + self.config.step_timeout);
            }
            (RekeyStep::Unlocking | RekeyStep::Rekeying, Packet::LongTermRefused(text)) => {
                let refusal = Refusal::from_text(text.as_bytes());
                self.finish(RekeyOutcome::Refused {
                    serial,
                    refusal,
                    text,
                });
            }
            (RekeyStep::Rekeying, Packet::LongTermRekey { nonce_len, entropy }) => {
                if usize::from(nonce_len) != NONCE_LEN {
                    self.finish(RekeyOutcome::NonceLength {
                        received: nonce_len,
                    });
                    return;
                }
                let key = derive_long_term_key(&serial, &self.master, &entropy, &self.nonce);
                self.finish(RekeyOutcome::Done { serial, key });
            }
            // Info, k> and the like while we wait: not ours to handle.
            _ => {}
        }
    }
}

impl Drop for LongTermRekey {
    fn drop(&mut self) {
        self.nonce.zeroize();
    }
}
