//! The host's side of the protocol: [`Session`], a sans-IO state machine.
//!
//! A `Session` is fed bytes from one key and yields events: bytes to send
//! back, verified and decrypted 32-byte entropy blocks, information items,
//! state changes with a named reason, and faults. It never reads a clock
//! (the caller passes [`Instant`]s), never touches I/O, never allocates, and
//! never panics on input.
//!
//! Driving it (the daemon, the RNG adapter and the tests all do this):
//!
//! ```
//! use ekey_proto::host::{Config, Event, Session};
//! use ekey_proto::keys::{LongTermKey, Serial};
//! use ekey_proto::time::Instant;
//!
//! let mut session = Session::new(Config::default(), Instant::ZERO);
//! // The session opens with a reset (Ctrl-C) for the key.
//! assert_eq!(session.poll_transmit().as_deref(), Some(&[0x03u8][..]));
//!
//! let keyring = |_: &Serial| -> Option<LongTermKey> { None };
//! # struct Rng; impl rand_core::TryRng for Rng { type Error = core::convert::Infallible;
//! # fn try_next_u32(&mut self) -> Result<u32, Self::Error> { Ok(0) }
//! # fn try_next_u64(&mut self) -> Result<u64, Self::Error> { Ok(0) }
//! # fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Self::Error> { d.fill(0); Ok(()) } }
//! # impl rand_core::TryCryptoRng for Rng {}
//! # let mut rng = Rng;
//! let mut input: &[u8] = b"* S!AANwBvBlg3OTBJORFD                                Al/Smw1b\r\n";
//! while !input.is_empty() {
//!     let used = session.handle_input(Instant::from_millis(10), input, &keyring, &mut rng);
//!     input = &input[used..];
//!     while let Some(event) = session.poll_event() {
//!         if let Event::Entropy { data, .. } = event { /* verified bytes */ let _ = data; }
//!     }
//! }
//! assert_eq!(session.serial().map(|s| s.to_string()).as_deref(), Some("NwBvBlg3OTBJORFD"));
//! assert_eq!(session.state().to_string(), "no long-term key in keyring");
//! ```
//!
//! Policy, where ekeyd's choices are not protocol facts (PROTOCOL.md §6):
//! - a frame whose MAC fails is dropped and counted; only
//!   [`Config::max_consecutive_bad_macs`] bad frames in a row reset the key;
//! - frames after a session re-key that fail their MAC before any frame has
//!   verified under the new key mean the long-term key is wrong (ekeyd
//!   decides on the first frame; we wait for
//!   [`Config::max_consecutive_bad_macs`] of them, so that one bit error
//!   cannot condemn a good key): no entropy, and a retry after a back-off
//!   that doubles from [`Config::rejected_backoff`] to
//!   [`Config::max_backoff`];
//! - within one session key, sequence numbers must increase: a replayed or
//!   older frame is dropped and counted;
//! - the host re-keys on seeing sequence 4095 without waiting for `k>`, and
//!   ignores `k>` while its own `K` is outstanding (frames the key sent
//!   before it saw the `K` may still be on their way; the re-key timeout
//!   covers a lost `K`); a key that asks for
//!   [`Config::max_rekeys_without_entropy`] session keys in a row without
//!   sending entropy in between is reset;
//! - any failure mode reported in `I>S` stops entropy until the key resets.

use core::fmt;
use core::time::Duration;

use zeroize::Zeroize;

use crate::crypto::{BLOCK_LEN, FrameKeys, derive_session_key};
use crate::keys::{LongTermKey, Serial, SessionKey};
use crate::time::Instant;
use crate::wire::command::{Command, RESET};
use crate::wire::deframe::{Deframer, FRAME_LEN};
use crate::wire::info::{
    self, FailureMode, Fips, InfoError, InfoItem, Shannon, Temperature, Voltage,
};
use crate::wire::packet::{Packet, PacketError, Text};

/// Length of the nonces the host sends: a 4-byte little-endian re-key
/// counter, then 8 random bytes (as ekeyd does).
pub const NONCE_LEN: usize = 12;

/// The highest sequence number; the key needs a new session key after it.
pub const LAST_SEQUENCE: u16 = 4095;

/// Answers "what is the long-term key of serial X". `None` is a valid
/// answer: the session then releases no entropy and says why.
///
/// Closures `Fn(&Serial) -> Option<LongTermKey>` implement it.
pub trait KeyLookup {
    /// The long-term key for `serial`, if the keyring has one.
    fn long_term_key(&self, serial: &Serial) -> Option<LongTermKey>;
}

impl<F: Fn(&Serial) -> Option<LongTermKey>> KeyLookup for F {
    fn long_term_key(&self, serial: &Serial) -> Option<LongTermKey> {
        self(serial)
    }
}

/// Tunables of a [`Session`]. `Default` gives the documented values.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Config {
    /// If set, an `S!` with another serial is refused (no entropy).
    pub expected_serial: Option<Serial>,
    /// No `S!` this long after a reset: reset again. Default 2 s.
    pub reset_timeout: Duration,
    /// No `K!` this long after a `K`: reset. Default 3 s.
    pub rekey_timeout: Duration,
    /// No valid frame this long while keyed or waiting for `k>`: reset.
    /// `None` disables it. Default 10 s (a key sends ~90 frames/s).
    pub idle_timeout: Option<Duration>,
    /// This many bad MACs in a row in a keyed session reset the key.
    /// A single bad frame is only dropped and counted. Default 3.
    pub max_consecutive_bad_macs: u32,
    /// A key that asks for this many session keys in a row (`K` sent each
    /// time) without an entropy frame in between is reset. Default 8.
    pub max_rekeys_without_entropy: u32,
    /// First wait before retrying a key whose long-term key was rejected.
    /// Default 5 s; doubles on every further rejection.
    pub rejected_backoff: Duration,
    /// Longest back-off (after rejections and unanswered resets). Default
    /// 300 s.
    pub max_backoff: Duration,
    /// After this many resets in a row without an `S!`, every further
    /// timeout also yields [`Event::Unresponsive`] (a USB port reset may
    /// help). Default 3.
    pub unresponsive_after: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            expected_serial: None,
            reset_timeout: Duration::from_secs(2),
            rekey_timeout: Duration::from_secs(3),
            idle_timeout: Some(Duration::from_secs(10)),
            max_consecutive_bad_macs: 3,
            max_rekeys_without_entropy: 8,
            rejected_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(300),
            unresponsive_after: 3,
        }
    }
}

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum State {
    /// A reset was sent; waiting for `S!`.
    Resetting,
    /// The key's serial has no long-term key in the keyring.
    NoLongTermKey,
    /// The key's serial is not the one expected.
    WrongSerial,
    /// Keyring has the key; waiting for the key to ask for a session key.
    WaitingForRekeyRequest,
    /// A `K` was sent; waiting for `K!`.
    Rekeying,
    /// Keyed: verified entropy flows.
    Running,
    /// The first frame after a re-key failed its MAC: the long-term key in
    /// the keyring is wrong for this key. Retried after a back-off.
    LongTermKeyRejected,
    /// The key reported a failure mode and sends no entropy until it is
    /// powered down.
    Failed(FailureMode),
}

impl State {
    /// Whether verified entropy can flow in this state.
    pub fn is_running(self) -> bool {
        self == State::Running
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Resetting => f.write_str("resetting"),
            State::NoLongTermKey => f.write_str("no long-term key in keyring"),
            State::WrongSerial => f.write_str("unexpected serial number"),
            State::WaitingForRekeyRequest => f.write_str("waiting for the key"),
            State::Rekeying => f.write_str("re-keying"),
            State::Running => f.write_str("running"),
            State::LongTermKeyRejected => f.write_str("long-term key rejected"),
            State::Failed(mode) => write!(f, "failure: {mode}"),
        }
    }
}

/// Why the state changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Reason {
    /// The session started.
    Start,
    /// The caller asked for a reset ([`Session::reset`]).
    Requested,
    /// No `S!` came after a reset.
    ResetTimeout,
    /// The key answered a reset with its serial.
    SerialReceived,
    /// The key reset itself (an `S!` outside a reset).
    UnexpectedReset,
    /// The key asked for a session key.
    RekeyRequested,
    /// Sequence 4095 arrived: the host re-keys.
    SequenceExhausted,
    /// A new session key is in use.
    Rekeyed,
    /// No `K!` came after a `K`.
    RekeyTimeout,
    /// The `K!` reported another nonce length than the host sent.
    NonceLengthMismatch {
        /// Bytes sent.
        sent: u16,
        /// Bytes the key says it received.
        received: u16,
    },
    /// Too many bad MACs in a row.
    PersistentBadMacs,
    /// The first frame under a new session key failed its MAC.
    LongTermKeyRejected,
    /// The back-off after a rejection ran out: trying again.
    BackoffElapsed,
    /// The key reported a failure mode.
    FailureMode(FailureMode),
    /// Too many `k>` frames without progress.
    RekeyLoop,
    /// The key reported bad generators (`B>`) during a re-key.
    BadGenerators,
    /// No valid frame for too long.
    Idle,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Start => f.write_str("session started"),
            Reason::Requested => f.write_str("reset requested"),
            Reason::ResetTimeout => f.write_str("no answer to reset"),
            Reason::SerialReceived => f.write_str("key identified itself"),
            Reason::UnexpectedReset => f.write_str("key reset itself"),
            Reason::RekeyRequested => f.write_str("key asked for a session key"),
            Reason::SequenceExhausted => f.write_str("sequence numbers used up"),
            Reason::Rekeyed => f.write_str("new session key"),
            Reason::RekeyTimeout => f.write_str("no answer to re-key"),
            Reason::NonceLengthMismatch { sent, received } => {
                write!(f, "key received {received} nonce bytes of {sent}")
            }
            Reason::PersistentBadMacs => f.write_str("persistent MAC failures"),
            Reason::LongTermKeyRejected => {
                f.write_str("first frame under the new session key failed its MAC")
            }
            Reason::BackoffElapsed => f.write_str("retrying after back-off"),
            Reason::FailureMode(m) => write!(f, "key reports: {m}"),
            Reason::RekeyLoop => f.write_str("key keeps asking for a session key"),
            Reason::BadGenerators => f.write_str("generators went bad during re-key"),
            Reason::Idle => f.write_str("no frames from key"),
        }
    }
}

/// Something went wrong that did not (by itself) change the state.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Fault {
    /// A frame of this type failed its MAC and was dropped.
    BadMac {
        /// The frame's type letter.
        kind: u8,
    },
    /// An `E!` frame whose sequence number is not above the last one.
    Replay {
        /// The frame's sequence number.
        seq: u16,
        /// The last sequence number accepted under this session key.
        last: u16,
    },
    /// A well-framed, authentic frame that is not a valid packet.
    Malformed(PacketError),
    /// A valid packet that makes no sense in this state (ignored).
    Unexpected {
        /// The frame's type letter.
        kind: u8,
    },
    /// `W>`: the key did not understand something the host sent.
    Warning(Text),
    /// `B>`: generators went bad during a re-key.
    BadGenerators(Text),
    /// An `I>` item could not be parsed.
    Info(InfoError),
    /// The nonce generator failed; no `K` was sent.
    Rng,
}

/// The latest information the key reported.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeviceInfo {
    /// Core temperature.
    pub temperature: Option<Temperature>,
    /// Supply voltage.
    pub voltage: Option<Voltage>,
    /// FIPS 140-2 counters.
    pub fips: Option<Fips>,
    /// Shannon estimates and failure mode.
    pub shannon: Option<Shannon>,
}

/// What a session reports.
///
/// `Debug` (and `defmt::Format`) never show the bytes of an entropy block.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    /// 32 verified, decrypted bytes of entropy.
    Entropy {
        /// The frame's sequence number.
        seq: u16,
        /// The plaintext.
        data: [u8; BLOCK_LEN],
    },
    /// The key identified itself.
    Serial(Serial),
    /// The key sent information; [`Session::info`] has the merged view.
    Info(DeviceInfo),
    /// The state changed.
    StateChanged {
        /// The new state.
        state: State,
        /// Why.
        reason: Reason,
    },
    /// Something was dropped or refused.
    Fault(Fault),
    /// Resets have gone unanswered this many times in a row.
    Unresponsive {
        /// Resets without an answer.
        attempts: u32,
    },
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Entropy { seq, .. } => write!(f, "Entropy {{ seq: {seq}, data: <32 bytes> }}"),
            Event::Serial(s) => write!(f, "Serial({s:?})"),
            Event::Info(i) => write!(f, "Info({i:?})"),
            Event::StateChanged { state, reason } => {
                write!(f, "StateChanged {{ state: {state:?}, reason: {reason:?} }}")
            }
            Event::Fault(x) => write!(f, "Fault({x:?})"),
            Event::Unresponsive { attempts } => {
                write!(f, "Unresponsive {{ attempts: {attempts} }}")
            }
        }
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Event {
    fn format(&self, f: defmt::Formatter<'_>) {
        match self {
            Event::Entropy { seq, .. } => defmt::write!(f, "Entropy {{ seq: {} }}", seq),
            Event::Serial(s) => defmt::write!(f, "Serial({})", s),
            Event::Info(i) => defmt::write!(f, "Info({})", i),
            Event::StateChanged { state, reason } => {
                defmt::write!(f, "StateChanged {{ state: {}, reason: {} }}", state, reason)
            }
            Event::Fault(x) => defmt::write!(f, "Fault({})", x),
            Event::Unresponsive { attempts } => defmt::write!(f, "Unresponsive({})", attempts),
        }
    }
}

/// Counters for a status page. They only grow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Counters {
    /// Bytes fed in.
    pub bytes_in: u64,
    /// Well-formed frames found.
    pub frames: u64,
    /// Runs of bytes that were not frames.
    pub framing_errors: u64,
    /// Bytes discarded by the frame finder.
    pub garbage_bytes: u64,
    /// Frames dropped for a bad MAC.
    pub bad_macs: u64,
    /// `E!` frames dropped for a sequence number not above the last.
    pub replays: u64,
    /// Authentic frames that were not valid packets.
    pub malformed: u64,
    /// Valid packets ignored in the state they came in.
    pub unexpected: u64,
    /// Frames skipped while waiting for `S!` after a reset.
    pub stale: u64,
    /// Entropy blocks released.
    pub blocks: u64,
    /// Session keys put in use.
    pub rekeys: u64,
    /// Resets sent.
    pub resets: u64,
    /// Resets that got no answer in time.
    pub reset_timeouts: u64,
    /// Re-keys that got no answer in time.
    pub rekey_timeouts: u64,
    /// Times the long-term key was rejected.
    pub long_term_key_rejections: u64,
    /// `W>` frames.
    pub warnings: u64,
    /// `I>` frames.
    pub info_frames: u64,
    /// Events dropped because the caller did not drain the queue (never
    /// entropy).
    pub events_dropped: u64,
}

impl Counters {
    /// Field-by-field sum, e.g. of a key's earlier sessions and its current
    /// one.
    pub fn merged(&self, other: &Counters) -> Counters {
        let a = self;
        let b = other;
        Counters {
            bytes_in: a.bytes_in.saturating_add(b.bytes_in),
            frames: a.frames.saturating_add(b.frames),
            framing_errors: a.framing_errors.saturating_add(b.framing_errors),
            garbage_bytes: a.garbage_bytes.saturating_add(b.garbage_bytes),
            bad_macs: a.bad_macs.saturating_add(b.bad_macs),
            replays: a.replays.saturating_add(b.replays),
            malformed: a.malformed.saturating_add(b.malformed),
            unexpected: a.unexpected.saturating_add(b.unexpected),
            stale: a.stale.saturating_add(b.stale),
            blocks: a.blocks.saturating_add(b.blocks),
            rekeys: a.rekeys.saturating_add(b.rekeys),
            resets: a.resets.saturating_add(b.resets),
            reset_timeouts: a.reset_timeouts.saturating_add(b.reset_timeouts),
            rekey_timeouts: a.rekey_timeouts.saturating_add(b.rekey_timeouts),
            long_term_key_rejections: a
                .long_term_key_rejections
                .saturating_add(b.long_term_key_rejections),
            warnings: a.warnings.saturating_add(b.warnings),
            info_frames: a.info_frames.saturating_add(b.info_frames),
            events_dropped: a.events_dropped.saturating_add(b.events_dropped),
        }
    }
}

const EVENT_CAPACITY: usize = 8;

/// The plaintext of the entropy events waiting in the queue, kept apart
/// from the events so that each slot is wiped when its event is taken
/// (a `Deque` slot keeps its bytes after a pop).
struct PlainRing {
    slots: [[u8; BLOCK_LEN]; EVENT_CAPACITY],
    head: usize,
    len: usize,
}

impl PlainRing {
    const fn new() -> Self {
        PlainRing {
            slots: [[0; BLOCK_LEN]; EVENT_CAPACITY],
            head: 0,
            len: 0,
        }
    }

    /// Stores `data` (and wipes it); false if full.
    fn push(&mut self, data: &mut [u8; BLOCK_LEN]) -> bool {
        let at = self.head.wrapping_add(self.len) % EVENT_CAPACITY;
        match (self.len < EVENT_CAPACITY, self.slots.get_mut(at)) {
            (true, Some(slot)) => {
                *slot = *data;
                data.zeroize();
                self.len += 1;
                true
            }
            _ => false,
        }
    }

    /// Moves the oldest block into `out`, wiping its slot.
    fn pop_into(&mut self, out: &mut [u8; BLOCK_LEN]) {
        if self.len == 0 {
            return;
        }
        if let Some(slot) = self.slots.get_mut(self.head) {
            *out = *slot;
            slot.zeroize();
        }
        self.head = self.head.wrapping_add(1) % EVENT_CAPACITY;
        self.len -= 1;
    }
}

impl Drop for PlainRing {
    fn drop(&mut self) {
        self.slots.zeroize();
    }
}

/// Events one frame can produce at most; input is not taken unless this
/// many slots are free.
const EVENTS_PER_FRAME: usize = 4;
/// Room for a reset and a `K` command.
const TRANSMIT_CAPACITY: usize = 64;

/// Bytes for the key, from [`Session::poll_transmit`].
pub type Transmit = heapless::Vec<u8, TRANSMIT_CAPACITY>;

/// The host's state machine for one key. See the [module docs](self).
pub struct Session {
    config: Config,
    state: State,
    deframer: Deframer,
    serial: Option<Serial>,
    long_term_key: Option<LongTermKey>,
    keys: Option<FrameKeys>,
    /// The first frame under `keys` has not verified yet.
    unconfirmed: bool,
    last_seq: Option<u16>,
    nonce: [u8; NONCE_LEN],
    nonce_counter: u32,
    consecutive_bad: u32,
    rekeys_without_entropy: u32,
    unanswered_resets: u32,
    rejections: u32,
    deadline: Option<Instant>,
    last_frame: Instant,
    info: DeviceInfo,
    counters: Counters,
    events: heapless::Deque<Event, EVENT_CAPACITY>,
    /// The bytes of the queued [`Event::Entropy`] events (which are queued
    /// with zeros in their place).
    plain: PlainRing,
    transmit: Transmit,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("state", &self.state)
            .field("serial", &self.serial)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// A new session. It starts by queueing a reset for the key.
    pub fn new(config: Config, now: Instant) -> Self {
        let mut s = Session {
            config,
            state: State::Resetting,
            deframer: Deframer::new(),
            serial: None,
            long_term_key: None,
            keys: None,
            unconfirmed: false,
            last_seq: None,
            nonce: [0; NONCE_LEN],
            nonce_counter: 0,
            consecutive_bad: 0,
            rekeys_without_entropy: 0,
            unanswered_resets: 0,
            rejections: 0,
            deadline: None,
            last_frame: now,
            info: DeviceInfo::default(),
            counters: Counters::default(),
            events: heapless::Deque::new(),
            plain: PlainRing::new(),
            transmit: Transmit::new(),
        };
        s.send_reset(now, Reason::Start);
        s
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The key's serial, once it has sent `S!`.
    pub fn serial(&self) -> Option<Serial> {
        self.serial
    }

    /// The latest information items, merged.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The counters, with the frame finder's included.
    pub fn counters(&self) -> Counters {
        let d = self.deframer.stats();
        Counters {
            frames: d.frames,
            framing_errors: d.framing_errors,
            garbage_bytes: d.garbage_bytes,
            ..self.counters
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Resets the key (e.g. after the keyring changed): forgets keys and
    /// any partial frame, and queues a Ctrl-C.
    pub fn reset(&mut self, now: Instant) {
        self.send_reset(now, Reason::Requested);
    }

    /// Feeds bytes from the key. Takes at most one frame's worth of input
    /// per call and returns how many bytes it consumed; call again with the
    /// rest. Drain [`poll_event`](Self::poll_event) between calls: when the
    /// event queue is nearly full this returns 0 and takes nothing.
    pub fn handle_input<K, R>(&mut self, now: Instant, input: &[u8], keys: &K, rng: &mut R) -> usize
    where
        K: KeyLookup + ?Sized,
        R: rand_core::TryCryptoRng + ?Sized,
    {
        if EVENT_CAPACITY.saturating_sub(self.events.len()) < EVENTS_PER_FRAME {
            return 0;
        }
        let (used, frame) = self.deframer.push(input);
        self.counters.bytes_in = self.counters.bytes_in.saturating_add(used as u64);
        if let Some(frame) = frame {
            self.handle_frame(now, &frame, keys, rng);
        }
        used
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        let mut event = self.events.pop_front()?;
        if let Event::Entropy { data, .. } = &mut event {
            self.plain.pop_into(data);
        }
        Some(event)
    }

    /// Bytes to send to the key, if any.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.transmit.is_empty() {
            None
        } else {
            Some(core::mem::take(&mut self.transmit))
        }
    }

    /// Whether bytes for the key are waiting in
    /// [`poll_transmit`](Self::poll_transmit).
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// Tells the session that its caller did not read from the key until
    /// `now` (for example an RNG adapter between two calls), so that this
    /// silence does not count as the key going idle. Deadlines for
    /// outstanding commands (a reset, a re-key) are unchanged.
    pub fn resume(&mut self, now: Instant) {
        self.last_frame = self.last_frame.max(now);
    }

    /// When [`handle_timeout`](Self::handle_timeout) should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let idle = match self.state {
            State::Running | State::WaitingForRekeyRequest => {
                self.config.idle_timeout.map(|d| self.last_frame + d)
            }
            _ => None,
        };
        match (self.deadline, idle) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Tells the session that time has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_none_or(|t| now < t) {
            return;
        }
        match self.state {
            State::Resetting => {
                self.counters.reset_timeouts = self.counters.reset_timeouts.saturating_add(1);
                self.unanswered_resets = self.unanswered_resets.saturating_add(1);
                if self.unanswered_resets >= self.config.unresponsive_after {
                    self.push_event(Event::Unresponsive {
                        attempts: self.unanswered_resets,
                    });
                }
                self.send_reset(now, Reason::ResetTimeout);
            }
            State::Rekeying => {
                self.counters.rekey_timeouts = self.counters.rekey_timeouts.saturating_add(1);
                self.send_reset(now, Reason::RekeyTimeout);
            }
            State::LongTermKeyRejected => self.send_reset(now, Reason::BackoffElapsed),
            State::Running | State::WaitingForRekeyRequest => self.send_reset(now, Reason::Idle),
            _ => self.deadline = None,
        }
    }

    // ----- internals -----

    fn push_event(&mut self, e: Event) {
        // `handle_input` reserves room for a frame's events before it takes
        // input, so entropy always fits. Only a caller that stops draining
        // while calling `handle_timeout` or `reset` can fill the queue; then
        // the newest (never an entropy) event is dropped and counted.
        if let Err(e) = self.events.push_back(e) {
            debug_assert!(!matches!(e, Event::Entropy { .. }));
            self.counters.events_dropped = self.counters.events_dropped.saturating_add(1);
        }
    }

    /// Queues an entropy event; its bytes wait in [`PlainRing`], and
    /// `data` is wiped.
    fn push_entropy(&mut self, seq: u16, data: &mut [u8; BLOCK_LEN]) {
        // Room is reserved by `handle_input`; the ring has the queue's
        // capacity and holds one block per queued entropy event.
        if self.events.is_full() || !self.plain.push(data) {
            self.counters.events_dropped = self.counters.events_dropped.saturating_add(1);
        } else {
            let placeholder = Event::Entropy {
                seq,
                data: [0; BLOCK_LEN],
            };
            // Cannot fail: the queue is not full.
            let _ = self.events.push_back(placeholder);
        }
        data.zeroize();
    }

    fn set_state(&mut self, state: State, reason: Reason) {
        self.state = state;
        self.push_event(Event::StateChanged { state, reason });
    }

    fn send_reset(&mut self, now: Instant, reason: Reason) {
        self.transmit.clear();
        let _ = self.transmit.push(RESET);
        self.counters.resets = self.counters.resets.saturating_add(1);
        self.deframer.reset();
        self.keys = None;
        self.long_term_key = None;
        self.last_seq = None;
        self.unconfirmed = false;
        self.consecutive_bad = 0;
        self.rekeys_without_entropy = 0;
        let wait = if self.unanswered_resets == 0 {
            self.config.reset_timeout
        } else {
            // Back off while the key stays silent.
            let factor = 1u32 << self.unanswered_resets.min(5);
            self.config
                .reset_timeout
                .saturating_mul(factor)
                .min(self.config.max_backoff.max(self.config.reset_timeout))
        };
        self.deadline = Some(now + wait);
        self.set_state(State::Resetting, reason);
    }

    fn handle_frame<K, R>(
        &mut self,
        now: Instant,
        frame: &[u8; FRAME_LEN],
        keyring: &K,
        rng: &mut R,
    ) where
        K: KeyLookup + ?Sized,
        R: rand_core::TryCryptoRng + ?Sized,
    {
        let kind = crate::wire::packet::kind(frame);
        if kind == b'S' {
            self.handle_serial_frame(now, frame, keyring);
            return;
        }
        match self.state {
            // Stale frames from before the reset, or frames under a key we
            // cannot check: skip them.
            State::Resetting | State::LongTermKeyRejected | State::WrongSerial => {
                self.counters.stale = self.counters.stale.saturating_add(1);
                return;
            }
            _ => {}
        }
        let Some(keys) = &self.keys else {
            self.counters.stale = self.counters.stale.saturating_add(1);
            return;
        };
        // For E! frames the pad is computed alongside the MAC (faster); it
        // is used only if the MAC verifies.
        let (authentic, pad) = if kind == b'E' {
            let (ok, pad) = keys.verify_with_pad(frame);
            (ok, Some(pad))
        } else {
            (keys.verify(frame), None)
        };
        if !authentic {
            self.bad_mac(now, kind);
            return;
        }
        self.last_frame = now;
        self.consecutive_bad = 0;
        if self.unconfirmed {
            self.unconfirmed = false;
            self.rejections = 0;
        }
        let packet = match Packet::parse(frame) {
            Ok(p) => p,
            Err(e) => {
                self.counters.malformed = self.counters.malformed.saturating_add(1);
                self.push_event(Event::Fault(Fault::Malformed(e)));
                return;
            }
        };
        match packet {
            Packet::Entropy { seq, data, .. } => self.handle_entropy(now, seq, pad, data, rng),
            Packet::Info(text) => self.handle_info(now, &text),
            Packet::RekeyRequest(_) => self.handle_rekey_request(now, rng),
            Packet::SessionRekey { nonce_len, entropy } => {
                self.handle_session_rekey(now, nonce_len, &entropy)
            }
            Packet::Warning(text) => {
                self.counters.warnings = self.counters.warnings.saturating_add(1);
                self.push_event(Event::Fault(Fault::Warning(text)));
            }
            Packet::BadGenerators(text) => {
                self.push_event(Event::Fault(Fault::BadGenerators(text)));
                if self.state == State::Rekeying {
                    self.deadline = None;
                    self.set_state(State::WaitingForRekeyRequest, Reason::BadGenerators);
                }
            }
            Packet::Serial { .. }
            | Packet::LongTermUnlocked(_)
            | Packet::LongTermRekey { .. }
            | Packet::LongTermRefused(_) => self.unexpected(kind),
        }
    }

    fn unexpected(&mut self, kind: u8) {
        self.counters.unexpected = self.counters.unexpected.saturating_add(1);
        self.push_event(Event::Fault(Fault::Unexpected { kind }));
    }

    fn bad_mac(&mut self, now: Instant, kind: u8) {
        self.counters.bad_macs = self.counters.bad_macs.saturating_add(1);
        self.push_event(Event::Fault(Fault::BadMac { kind }));
        self.consecutive_bad = self.consecutive_bad.saturating_add(1);
        if self.consecutive_bad < self.config.max_consecutive_bad_macs {
            return;
        }
        if self.unconfirmed {
            // Not one frame verified under the new session key: the
            // long-term key it was derived from is wrong.
            self.reject_long_term_key(now);
        } else {
            self.send_reset(now, Reason::PersistentBadMacs);
        }
    }

    fn reject_long_term_key(&mut self, now: Instant) {
        self.counters.long_term_key_rejections =
            self.counters.long_term_key_rejections.saturating_add(1);
        let factor = 1u32 << self.rejections.min(8);
        self.rejections = self.rejections.saturating_add(1);
        let wait = self
            .config
            .rejected_backoff
            .saturating_mul(factor)
            .min(self.config.max_backoff.max(self.config.rejected_backoff));
        self.keys = None;
        self.unconfirmed = false;
        self.deadline = Some(now + wait);
        self.set_state(State::LongTermKeyRejected, Reason::LongTermKeyRejected);
    }

    fn handle_serial_frame<K: KeyLookup + ?Sized>(
        &mut self,
        now: Instant,
        frame: &[u8; FRAME_LEN],
        keyring: &K,
    ) {
        let serial = match Packet::parse(frame) {
            Ok(Packet::Serial { serial, .. }) => serial,
            Ok(_) => return,
            Err(e) => {
                // Cannot check the MAC without a serial; count it as noise.
                self.counters.malformed = self.counters.malformed.saturating_add(1);
                self.push_event(Event::Fault(Fault::Malformed(e)));
                return;
            }
        };
        let zero = FrameKeys::new(&serial, &SessionKey::ZERO);
        if !zero.verify(frame) {
            self.counters.bad_macs = self.counters.bad_macs.saturating_add(1);
            self.push_event(Event::Fault(Fault::BadMac { kind: b'S' }));
            return;
        }
        let reason = if self.state == State::Resetting {
            Reason::SerialReceived
        } else {
            Reason::UnexpectedReset
        };
        self.last_frame = now;
        self.unanswered_resets = 0;
        self.deadline = None;
        self.last_seq = None;
        self.unconfirmed = false;
        self.consecutive_bad = 0;
        self.rekeys_without_entropy = 0;
        self.info = DeviceInfo::default();
        self.serial = Some(serial);
        self.push_event(Event::Serial(serial));
        if self.config.expected_serial.is_some_and(|s| s != serial) {
            self.keys = None;
            self.long_term_key = None;
            self.set_state(State::WrongSerial, reason);
            return;
        }
        self.keys = Some(zero);
        self.long_term_key = keyring.long_term_key(&serial);
        if self.long_term_key.is_some() {
            self.set_state(State::WaitingForRekeyRequest, reason);
        } else {
            self.set_state(State::NoLongTermKey, reason);
        }
    }

    fn handle_rekey_request<R: rand_core::TryCryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) {
        match self.state {
            State::WaitingForRekeyRequest | State::Running => {
                if self.rekeys_without_entropy >= self.config.max_rekeys_without_entropy {
                    self.send_reset(now, Reason::RekeyLoop);
                } else {
                    self.send_rekey(now, Reason::RekeyRequested, rng);
                }
            }
            // Our K is outstanding: this k> may have left the key before
            // it saw the K. The re-key timeout deals with a lost K.
            State::Rekeying => {}
            // No long-term key, failure mode: nothing to answer with.
            _ => {}
        }
    }

    fn send_rekey<R: rand_core::TryCryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        reason: Reason,
        rng: &mut R,
    ) {
        if self.long_term_key.is_none() {
            return;
        }
        let (counter, random) = self.nonce.split_at_mut(4);
        counter.copy_from_slice(&self.nonce_counter.to_le_bytes());
        if rng.try_fill_bytes(random).is_err() {
            self.push_event(Event::Fault(Fault::Rng));
            return;
        }
        self.nonce_counter = self.nonce_counter.wrapping_add(1);
        self.rekeys_without_entropy = self.rekeys_without_entropy.saturating_add(1);
        let mut buf = [0u8; TRANSMIT_CAPACITY];
        let Ok(n) = Command::SessionRekey(&self.nonce).write(&mut buf) else {
            return;
        };
        let _ = self.transmit.extend_from_slice(buf.get(..n).unwrap_or(&[]));
        self.deadline = Some(now + self.config.rekey_timeout);
        self.set_state(State::Rekeying, reason);
    }

    fn handle_session_rekey(&mut self, now: Instant, nonce_len: u16, entropy: &[u8; BLOCK_LEN]) {
        if self.state != State::Rekeying {
            self.unexpected(b'K');
            return;
        }
        let sent = NONCE_LEN as u16;
        if nonce_len != sent {
            self.send_reset(
                now,
                Reason::NonceLengthMismatch {
                    sent,
                    received: nonce_len,
                },
            );
            return;
        }
        let (Some(serial), Some(ltk)) = (self.serial, self.long_term_key.as_ref()) else {
            return;
        };
        let session_key = derive_session_key(&serial, ltk, entropy, &self.nonce);
        self.keys = Some(FrameKeys::new(&serial, &session_key));
        self.unconfirmed = true;
        self.last_seq = None;
        self.deadline = None;
        self.counters.rekeys = self.counters.rekeys.saturating_add(1);
        self.set_state(State::Running, Reason::Rekeyed);
    }

    fn handle_entropy<R: rand_core::TryCryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        seq: u16,
        pad: Option<[u8; BLOCK_LEN]>,
        data: [u8; BLOCK_LEN],
        rng: &mut R,
    ) {
        if self.state != State::Running {
            // Authentic but not to be released (e.g. under the zero key).
            self.unexpected(b'E');
            return;
        }
        if let Some(last) = self.last_seq
            && seq <= last
        {
            self.counters.replays = self.counters.replays.saturating_add(1);
            self.push_event(Event::Fault(Fault::Replay { seq, last }));
            return;
        }
        let Some(pad) = pad else { return };
        let mut plain = data;
        for (p, k) in plain.iter_mut().zip(pad.iter()) {
            *p ^= k;
        }
        self.last_seq = Some(seq);
        self.rekeys_without_entropy = 0;
        self.counters.blocks = self.counters.blocks.saturating_add(1);
        self.push_entropy(seq, &mut plain);
        if seq >= LAST_SEQUENCE {
            self.send_rekey(now, Reason::SequenceExhausted, rng);
        }
    }

    fn handle_info(&mut self, _now: Instant, text: &Text) {
        self.counters.info_frames = self.counters.info_frames.saturating_add(1);
        let mut failure = None;
        let mut first_error = None;
        for item in info::parse_items(text.as_bytes()) {
            match item {
                Ok(InfoItem::Temperature(t)) => self.info.temperature = Some(t),
                Ok(InfoItem::Voltage(v)) => self.info.voltage = Some(v),
                Ok(InfoItem::Fips(f)) => self.info.fips = Some(f),
                Ok(InfoItem::Shannon(s)) => {
                    if !s.failure.is_ok() {
                        failure = Some(s.failure);
                    }
                    self.info.shannon = Some(s);
                }
                Ok(InfoItem::Unknown { .. }) => {}
                Err(e) => {
                    // Counted; the items after it still count (a bad
                    // voltage must not hide a temperature). One event per
                    // frame, so the queue's reservation holds.
                    self.counters.malformed = self.counters.malformed.saturating_add(1);
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            self.push_event(Event::Fault(Fault::Info(e)));
        }
        self.push_event(Event::Info(self.info));
        if let Some(mode) = failure
            && self.state != State::Failed(mode)
        {
            self.deadline = None;
            self.set_state(State::Failed(mode), Reason::FailureMode(mode));
        }
    }
}
