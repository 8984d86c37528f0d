//! A blocking random number generator on top of one Entropy Key:
//! [`EntropyKeyRng`] implements [`rand_core::TryRng`] and
//! [`rand_core::TryCryptoRng`].
//!
//! It owns a [`Session`], a byte transport to the key (anything that
//! implements [`embedded_io::Read`] and [`embedded_io::Write`]: a USB CDC
//! serial port, a UART bridge, a test double), the long-term key(s) to key
//! it with, a nonce generator for session re-keys and a [`Clock`]. Each
//! call reads from the transport (blocking) until enough verified,
//! decrypted entropy has arrived; the adapter never hands out a byte the
//! session did not release. Released 32-byte blocks are buffered, so small
//! reads (`try_next_u32`) do not waste the rest of a block, and every byte
//! is handed out once and then wiped from the buffer. No allocation, no
//! panics, no `std`.
//!
//! # Errors, and when to use [`UnwrapErr`](rand_core::UnwrapErr)
//!
//! A call fails with an [`Error`] when the transport fails or closes, when
//! the key cannot be trusted (its long-term key is unknown or wrong, its
//! serial is not the expected one, it reports a failure mode), or when no
//! verified block arrives for [`timeout`](EntropyKeyRng::timeout) of clock
//! time (default [`DEFAULT_TIMEOUT`]). On an error the bytes already
//! written to the destination must not be used; the adapter stays usable,
//! and the next call carries on (or fails again straight away while the key
//! stays refused; [`EntropyKeyRng::reset`] starts over).
//!
//! The adapter looks at its clock between reads, so the timeout holds only
//! if the transport's `read` returns now and then: with some bytes, or
//! with [`ErrorKind::TimedOut`] when nothing came for a while (the
//! adapter retries it, and `Interrupted`, on reads and writes alike). A
//! `read` that blocks until data arrives makes a silent key block the
//! call.
//!
//! - Handle errors (use the `try_` methods) wherever the program can do
//!   something sensible without the key: report it, retry later, fall back
//!   to another source, refuse the operation that needed randomness.
//! - Wrap it in [`rand_core::UnwrapErr`] (which makes it an infallible
//!   [`rand_core::CryptoRng`] that **panics** on error) only where an API
//!   insists on an infallible RNG and a panic (on a microcontroller: a
//!   reset) is the right answer to "no trustworthy entropy".
//!
//! # Health tests
//!
//! The key tests its own noise, but a program that wants to check rather
//! than trust can put a [`Gate`] (FIPS 140-2, the continuous test and the
//! SP 800-90B RCT and APT, plus the key's own reports) between the session
//! and the caller with [`EntropyKeyRng::with_gate`]. Bytes are then handed
//! out only from 2,500-byte blocks that passed, so the first call waits for
//! one whole block (about a second from a real key), and the adapter needs
//! about 7.7 KB more memory. While the gate is closed, calls keep reading
//! (clean blocks re-open it) and fail with [`Error::GateClosed`] once the
//! timeout passes with nothing released.
//!
//! # Bulk randomness
//!
//! A key delivers about 3 KB/s. For more, seed a fast CSPRNG from it, e.g.
//! `rand_chacha::ChaCha20Rng::try_from_rng(&mut key_rng)`, and reseed it
//! from the key periodically (say every few MB, or every minute), so that
//! a compromise of the CSPRNG state does not expose later output.
//!
//! # Example
//!
//! A software key ([`crate::device::Device`]) behind an in-memory link
//! stands in for a real one here; on a board the transport would be the USB
//! host's CDC-ACM channel and the clock a hardware timer.
//!
//! ```
//! # #[cfg(feature = "device")]
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use ekey_proto::device::{Device, DeviceConfig};
//! use ekey_proto::keys::{LongTermKey, Serial};
//! use ekey_proto::rng::{EntropyKeyRng, SingleKey};
//! use ekey_proto::time::Instant;
//! use rand_chacha::ChaCha20Rng;
//! use rand_core::{Rng, SeedableRng, TryRng, UnwrapErr};
//!
//! // What the adapter writes goes to the key; a read returns the bytes of
//! // the key's next frame.
//! struct Loopback {
//!     key: Device,
//!     noise: ChaCha20Rng,
//!     pending: Vec<u8>,
//! }
//! impl embedded_io::ErrorType for Loopback {
//!     type Error = core::convert::Infallible;
//! }
//! impl embedded_io::Read for Loopback {
//!     fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
//!         while self.pending.is_empty() {
//!             if let Some(out) = self.key.poll(&mut self.noise) {
//!                 self.pending.extend_from_slice(&out.bytes);
//!             }
//!         }
//!         let n = buf.len().min(self.pending.len());
//!         buf[..n].copy_from_slice(&self.pending[..n]);
//!         self.pending.drain(..n);
//!         Ok(n)
//!     }
//! }
//! impl embedded_io::Write for Loopback {
//!     fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
//!         self.key.handle_input(buf, &mut self.noise);
//!         Ok(buf.len())
//!     }
//!     fn flush(&mut self) -> Result<(), Self::Error> {
//!         Ok(())
//!     }
//! }
//!
//! let serial = Serial([0x21; 12]);
//! let long_term_key = LongTermKey::from_bytes([0x33; 32]);
//! let link = Loopback {
//!     key: Device::new(DeviceConfig::new(serial, long_term_key.clone())),
//!     noise: ChaCha20Rng::seed_from_u64(1),
//!     pending: Vec::new(),
//! };
//! let mut ms = 0;
//! let clock = move || {
//!     ms += 11; // a frame every 11 ms
//!     Instant::from_millis(ms)
//! };
//! // The nonces for session re-keys come from a board RNG in real life.
//! let nonces = ChaCha20Rng::seed_from_u64(2);
//! let mut key_rng = EntropyKeyRng::new(
//!     link,
//!     SingleKey::for_serial(serial, long_term_key),
//!     nonces,
//!     clock,
//! );
//!
//! // Fallible use: errors are values.
//! let mut secret = [0u8; 16];
//! key_rng.try_fill_bytes(&mut secret)?;
//! let _word: u32 = key_rng.try_next_u32()?;
//!
//! // Bulk randomness: a ChaCha20 seeded from the key (reseed it now and
//! // then the same way).
//! let mut fast = ChaCha20Rng::try_from_rng(&mut key_rng)?;
//! let _lots: u64 = fast.next_u64();
//!
//! // Infallible use for APIs that want a `CryptoRng`: panics on error.
//! let mut strict = UnwrapErr(&mut key_rng);
//! let _n: u64 = strict.next_u64();
//!
//! assert!(key_rng.state().is_running());
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "device"))]
//! # fn main() {}
//! ```

use core::fmt;
use core::time::Duration;

use embedded_io::{Error as _, ErrorKind, ErrorType, Read, Write};
use rand_core::{TryCryptoRng, TryRng};
use zeroize::{Zeroize, Zeroizing};

use crate::crypto::BLOCK_LEN;
use crate::health::{CloseReason, Gate};
use crate::host::{Config, Counters, DeviceInfo, Event, KeyLookup, Session, State};
use crate::keys::{LongTermKey, Serial};
use crate::time::Instant;
use crate::wire::info::FailureMode;

/// How long a call waits for a verified block before it fails with
/// [`Error::Timeout`], unless set with [`EntropyKeyRng::with_timeout`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes asked of the transport per read: one frame.
const READ_CHUNK: usize = 64;

/// A monotonic clock. `no_std` has none, so the caller supplies one
/// (e.g. a hardware timer). Closures `FnMut() -> Instant` implement it.
pub trait Clock {
    /// The current time.
    fn now(&mut self) -> Instant;
}

impl<F: FnMut() -> Instant> Clock for F {
    fn now(&mut self) -> Instant {
        self()
    }
}

/// A keyring of one long-term key: the simplest [`KeyLookup`] for a device
/// that talks to one Entropy Key.
#[derive(Clone)]
pub struct SingleKey {
    serial: Option<Serial>,
    key: LongTermKey,
}

impl SingleKey {
    /// The key, offered to whichever Entropy Key is attached. A key with
    /// another long-term key is then refused with
    /// [`Error::LongTermKeyRejected`].
    pub fn new(key: LongTermKey) -> Self {
        SingleKey { serial: None, key }
    }

    /// The key, offered only to the Entropy Key with this serial; any other
    /// gets [`Error::NoLongTermKey`].
    pub fn for_serial(serial: Serial, key: LongTermKey) -> Self {
        SingleKey {
            serial: Some(serial),
            key,
        }
    }

    /// The serial the key is for, if restricted.
    pub fn serial(&self) -> Option<Serial> {
        self.serial
    }
}

impl KeyLookup for SingleKey {
    fn long_term_key(&self, serial: &Serial) -> Option<LongTermKey> {
        match self.serial {
            Some(s) if s != *serial => None,
            _ => Some(self.key.clone()),
        }
    }
}

impl fmt::Debug for SingleKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SingleKey")
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for SingleKey {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "SingleKey {{ serial: {} }}", self.serial)
    }
}

/// What stands between the session's verified blocks and the caller:
/// [`Ungated`] (the default: every verified block) or a health
/// [`Gate`] (only blocks that passed its tests). Sealed.
pub trait BlockFilter: sealed::Sealed {
    /// Takes a verified block; returns a block that may be handed out now.
    #[doc(hidden)]
    fn accept(&mut self, block: &mut [u8; BLOCK_LEN]) -> Option<[u8; BLOCK_LEN]>;
    /// A block that may be handed out now, if any is waiting.
    #[doc(hidden)]
    fn release(&mut self) -> Option<[u8; BLOCK_LEN]>;
    /// Takes in what the key reported about itself.
    #[doc(hidden)]
    fn observe(&mut self, info: &DeviceInfo);
    /// Why nothing is released, if the filter is closed.
    #[doc(hidden)]
    fn closed(&self) -> Option<CloseReason>;
    /// Drops every byte held (for a reset).
    #[doc(hidden)]
    fn forget(&mut self);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Ungated {}
    impl Sealed for crate::health::Gate {}
}

/// No health gate: every block whose frame verified is handed out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ungated;

impl BlockFilter for Ungated {
    fn accept(&mut self, block: &mut [u8; BLOCK_LEN]) -> Option<[u8; BLOCK_LEN]> {
        let out = *block;
        block.zeroize();
        Some(out)
    }
    fn release(&mut self) -> Option<[u8; BLOCK_LEN]> {
        None
    }
    fn observe(&mut self, _info: &DeviceInfo) {}
    fn closed(&self) -> Option<CloseReason> {
        None
    }
    fn forget(&mut self) {}
}

impl BlockFilter for Gate {
    fn accept(&mut self, block: &mut [u8; BLOCK_LEN]) -> Option<[u8; BLOCK_LEN]> {
        self.push(block);
        block.zeroize();
        self.pop_released()
    }
    fn release(&mut self) -> Option<[u8; BLOCK_LEN]> {
        self.pop_released()
    }
    fn observe(&mut self, info: &DeviceInfo) {
        Gate::observe(self, info);
    }
    fn closed(&self) -> Option<CloseReason> {
        if self.is_open() {
            None
        } else {
            self.status().reason
        }
    }
    fn forget(&mut self) {
        self.discard_buffered();
    }
}

/// Why [`EntropyKeyRng`] could not deliver. `E` is the transport's error.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[non_exhaustive]
pub enum Error<E> {
    /// The transport failed (other than with
    /// [`ErrorKind::TimedOut`] or [`ErrorKind::Interrupted`], which are
    /// retried until [`Error::Timeout`]).
    Transport(E),
    /// No verified block arrived within the timeout.
    Timeout,
    /// The key reported a failure mode; it sends no entropy until it is
    /// reset ([`EntropyKeyRng::reset`]) or re-plugged.
    FailureMode(FailureMode),
    /// The key's frames fail their MACs under the session key derived from
    /// our long-term key: the long-term key is wrong. The session retries
    /// after a back-off; calls fail straight away until then.
    LongTermKeyRejected,
    /// The keyring has no long-term key for the key's serial.
    NoLongTermKey,
    /// The key's serial is not [`Config::expected_serial`].
    WrongSerial,
    /// The transport is closed: a read returned 0 bytes, or a write
    /// accepted none.
    Eof,
    /// The health gate ([`EntropyKeyRng::with_gate`]) is closed and
    /// released nothing within the timeout; the key's blocks keep being
    /// tested by later calls, and enough clean ones re-open it.
    GateClosed(CloseReason),
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Transport(e) => write!(f, "transport error: {e}"),
            Error::Timeout => f.write_str("no entropy from the key in time"),
            Error::FailureMode(m) => write!(f, "key reports a failure: {m}"),
            Error::LongTermKeyRejected => f.write_str("long-term key rejected by the key"),
            Error::NoLongTermKey => f.write_str("no long-term key for this key's serial"),
            Error::WrongSerial => f.write_str("unexpected serial number"),
            Error::Eof => f.write_str("transport closed"),
            Error::GateClosed(r) => write!(f, "health gate closed: {r}"),
        }
    }
}

impl<E: core::error::Error> core::error::Error for Error<E> {}

/// An Entropy Key as a blocking [`rand_core::TryCryptoRng`]. See the
/// [module docs](self).
///
/// - `T`: the byte transport to the key;
/// - `K`: the keyring ([`SingleKey`], or a closure
///   `Fn(&Serial) -> Option<LongTermKey>`);
/// - `R`: the generator for re-key nonces;
/// - `C`: the [`Clock`];
/// - `G`: the [`BlockFilter`]: [`Ungated`], or a [`Gate`] after
///   [`with_gate`](Self::with_gate).
pub struct EntropyKeyRng<T, K, R, C, G = Ungated> {
    filter: G,
    transport: T,
    keys: K,
    nonce_rng: R,
    clock: C,
    session: Session,
    timeout: Duration,
    now: Instant,
    /// The current block; bytes before `block_pos` are handed out (and
    /// wiped).
    block: Zeroizing<[u8; BLOCK_LEN]>,
    block_pos: usize,
    /// Bytes read but not yet fed to the session.
    input: [u8; READ_CHUNK],
    input_pos: usize,
    input_end: usize,
}

impl<T, K, R, C, G: fmt::Debug> fmt::Debug for EntropyKeyRng<T, K, R, C, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntropyKeyRng")
            .field("session", &self.session)
            .field("filter", &self.filter)
            .field("timeout", &self.timeout)
            .field("buffered", &self.buffered())
            .finish_non_exhaustive()
    }
}

impl<T, K, R, C> EntropyKeyRng<T, K, R, C, Ungated>
where
    T: Read + Write,
    K: KeyLookup,
    R: TryCryptoRng,
    C: Clock,
{
    /// An adapter with the default session [`Config`]. Nothing is sent
    /// until the first call asks for bytes.
    pub fn new(transport: T, keys: K, nonce_rng: R, clock: C) -> Self {
        Self::with_config(transport, keys, nonce_rng, clock, Config::default())
    }

    /// An adapter with the given session [`Config`] (e.g. with
    /// [`Config::expected_serial`] set).
    pub fn with_config(transport: T, keys: K, nonce_rng: R, mut clock: C, config: Config) -> Self {
        let now = clock.now();
        EntropyKeyRng {
            filter: Ungated,
            transport,
            keys,
            nonce_rng,
            clock,
            session: Session::new(config, now),
            timeout: DEFAULT_TIMEOUT,
            now,
            block: Zeroizing::new([0; BLOCK_LEN]),
            block_pos: BLOCK_LEN,
            input: [0; READ_CHUNK],
            input_pos: 0,
            input_end: 0,
        }
    }

    /// Hands out only bytes that passed `gate`'s health tests (see the
    /// [module docs](self#health-tests)); bytes already buffered are
    /// wiped.
    ///
    /// ```
    /// # #[cfg(feature = "device")]
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # use ekey_proto::device::{Device, DeviceConfig};
    /// # use ekey_proto::keys::{LongTermKey, Serial};
    /// # use ekey_proto::time::Instant;
    /// # use rand_chacha::ChaCha20Rng;
    /// # use rand_core::SeedableRng;
    /// # struct Loopback { key: Device, noise: ChaCha20Rng, pending: Vec<u8> }
    /// # impl embedded_io::ErrorType for Loopback { type Error = core::convert::Infallible; }
    /// # impl embedded_io::Read for Loopback {
    /// #     fn read(&mut self, buf: &mut [u8]) -> Result<usize, Self::Error> {
    /// #         while self.pending.is_empty() {
    /// #             if let Some(out) = self.key.poll(&mut self.noise) {
    /// #                 self.pending.extend_from_slice(&out.bytes);
    /// #             }
    /// #         }
    /// #         let n = buf.len().min(self.pending.len());
    /// #         buf[..n].copy_from_slice(&self.pending[..n]);
    /// #         self.pending.drain(..n);
    /// #         Ok(n)
    /// #     }
    /// # }
    /// # impl embedded_io::Write for Loopback {
    /// #     fn write(&mut self, buf: &[u8]) -> Result<usize, Self::Error> {
    /// #         self.key.handle_input(buf, &mut self.noise);
    /// #         Ok(buf.len())
    /// #     }
    /// #     fn flush(&mut self) -> Result<(), Self::Error> { Ok(()) }
    /// # }
    /// # let serial = Serial([0x21; 12]);
    /// # let ltk = LongTermKey::from_bytes([0x33; 32]);
    /// # let link = Loopback {
    /// #     key: Device::new(DeviceConfig::new(serial, ltk.clone())),
    /// #     noise: ChaCha20Rng::seed_from_u64(1),
    /// #     pending: Vec::new(),
    /// # };
    /// # let mut ms = 0;
    /// # let clock = move || { ms += 11; Instant::from_millis(ms) };
    /// use ekey_proto::health::{Gate, GateConfig, FIPS_BLOCK_BYTES};
    /// use ekey_proto::rng::{EntropyKeyRng, SingleKey};
    /// use rand_core::TryRng;
    ///
    /// let mut key_rng = EntropyKeyRng::new(
    ///     link,
    ///     SingleKey::for_serial(serial, ltk),
    ///     ChaCha20Rng::seed_from_u64(2),
    ///     clock,
    /// )
    /// .with_gate(Gate::new(GateConfig::default()));
    ///
    /// let mut secret = [0u8; 32];
    /// key_rng.try_fill_bytes(&mut secret)?;
    /// // The bytes came from a whole FIPS 140-2 block that passed.
    /// let status = key_rng.gate().status();
    /// assert!(status.open);
    /// assert_eq!(status.counters.blocks_tested, 1);
    /// assert!(key_rng.gate().status().counters.bytes_received >= FIPS_BLOCK_BYTES as u64);
    /// # Ok(())
    /// # }
    /// # #[cfg(not(feature = "device"))]
    /// # fn main() {}
    /// ```
    pub fn with_gate(mut self, gate: Gate) -> EntropyKeyRng<T, K, R, C, Gate> {
        self.discard_block();
        let EntropyKeyRng {
            filter: Ungated,
            transport,
            keys,
            nonce_rng,
            clock,
            session,
            timeout,
            now,
            block,
            block_pos,
            input,
            input_pos,
            input_end,
        } = self;
        EntropyKeyRng {
            filter: gate,
            transport,
            keys,
            nonce_rng,
            clock,
            session,
            timeout,
            now,
            block,
            block_pos,
            input,
            input_pos,
            input_end,
        }
    }
}

impl<T, K, R, C> EntropyKeyRng<T, K, R, C, Gate> {
    /// The health gate: its state, counters and why it closed.
    pub fn gate(&self) -> &Gate {
        &self.filter
    }
}

impl<T, K, R, C, G> EntropyKeyRng<T, K, R, C, G>
where
    T: Read + Write,
    K: KeyLookup,
    R: TryCryptoRng,
    C: Clock,
    G: BlockFilter,
{
    /// Sets how long a call waits for a verified block before it fails
    /// with [`Error::Timeout`] (or [`Error::GateClosed`]). The wait starts
    /// again with every block handed out.
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Resets the key and the session (e.g. after a failure mode, or to
    /// retry a refused key at once). Buffered bytes are discarded, the
    /// gate's too (its state and counters stay).
    pub fn reset(&mut self) {
        let now = self.now();
        self.discard_block();
        self.filter.forget();
        self.input_pos = 0;
        self.input_end = 0;
        self.session.reset(now);
    }

    fn now(&mut self) -> Instant {
        // A clock that steps back is treated as standing still.
        self.now = self.now.max(self.clock.now());
        self.now
    }

    /// Sends whatever the session wants sent. A write or flush that
    /// reports `TimedOut` or `Interrupted` is retried until the timeout.
    fn transmit(&mut self) -> Result<(), Error<T::Error>> {
        let mut deadline = None;
        while let Some(bytes) = self.session.poll_transmit() {
            let mut rest: &[u8] = &bytes;
            while !rest.is_empty() {
                match self.transport.write(rest) {
                    Ok(0) => return Err(Error::Eof),
                    Ok(n) => rest = rest.get(n..).unwrap_or(&[]),
                    Err(e) => self.again(e, &mut deadline)?,
                }
            }
            while let Err(e) = self.transport.flush() {
                self.again(e, &mut deadline)?;
            }
        }
        Ok(())
    }

    /// Whether to try a failed write or flush again: yes for `TimedOut`
    /// and `Interrupted` until the timeout (counted from the first).
    fn again(
        &mut self,
        e: T::Error,
        deadline: &mut Option<Instant>,
    ) -> Result<(), Error<T::Error>> {
        if !Self::retry(&e) {
            return Err(Error::Transport(e));
        }
        let now = self.now();
        let end = *deadline.get_or_insert(now + self.timeout);
        if now < end {
            Ok(())
        } else {
            Err(Error::Timeout)
        }
    }

    /// Transport errors that mean "try again".
    fn retry(e: &T::Error) -> bool {
        matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::Interrupted)
    }

    /// Drains the session's events into the block buffer; true if a block
    /// arrived. Fails if the session is in a state that releases nothing.
    fn drain(&mut self) -> Result<bool, Error<T::Error>> {
        let mut got = false;
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Entropy { mut data, .. } => {
                    // One frame per `handle_input`, and the buffer is
                    // empty whenever input is fed: nothing is overwritten.
                    if let Some(out) = self.filter.accept(&mut data) {
                        *self.block = out;
                        self.block_pos = 0;
                        got = true;
                    }
                    data.zeroize();
                }
                Event::Info(_) => self.filter.observe(self.session.info()),
                _ => {}
            }
        }
        self.check_state()?;
        Ok(got)
    }

    fn check_state(&mut self) -> Result<(), Error<T::Error>> {
        let e = match self.session.state() {
            State::Failed(mode) => Error::FailureMode(mode),
            State::LongTermKeyRejected => Error::LongTermKeyRejected,
            State::NoLongTermKey => Error::NoLongTermKey,
            State::WrongSerial => Error::WrongSerial,
            State::Resetting | State::WaitingForRekeyRequest | State::Rekeying | State::Running => {
                return Ok(());
            }
        };
        self.discard_block();
        Err(e)
    }

    /// Lets time pass for the session and sends what it wants sent.
    fn tick(&mut self) -> Result<Instant, Error<T::Error>> {
        let now = self.now();
        self.session.handle_timeout(now);
        self.drain()?;
        self.transmit()?;
        Ok(now)
    }

    /// Reads and feeds input until a block arrives.
    fn next_block(&mut self) -> Result<(), Error<T::Error>> {
        if let Some(out) = self.filter.release() {
            *self.block = out;
            self.block_pos = 0;
            return Ok(());
        }
        let deadline = self.now() + self.timeout;
        loop {
            if self.input_pos < self.input_end {
                let input = self
                    .input
                    .get(self.input_pos..self.input_end)
                    .unwrap_or(&[]);
                let used =
                    self.session
                        .handle_input(self.now, input, &self.keys, &mut self.nonce_rng);
                self.input_pos = if used == 0 {
                    // Cannot happen while the events are drained; never
                    // spin on it.
                    self.input_end
                } else {
                    self.input_pos.saturating_add(used).min(self.input_end)
                };
                let got = self.drain()?;
                self.transmit()?;
                if got {
                    return Ok(());
                }
                continue;
            }
            let now = self.tick()?;
            if now >= deadline {
                return Err(match self.filter.closed() {
                    Some(reason) => Error::GateClosed(reason),
                    None => Error::Timeout,
                });
            }
            match self.transport.read(&mut self.input) {
                Ok(0) => return Err(Error::Eof),
                Ok(n) => {
                    // The read may have blocked: the input is from now.
                    self.now();
                    self.input_pos = 0;
                    self.input_end = n.min(READ_CHUNK);
                }
                Err(e) if Self::retry(&e) => {}
                Err(e) => return Err(Error::Transport(e)),
            }
        }
    }

    /// Copies buffered bytes into `dst`, wiping them; returns how many.
    fn take_buffered(&mut self, dst: &mut [u8]) -> usize {
        let n = self.buffered().min(dst.len());
        let end = self.block_pos.saturating_add(n);
        if let (Some(d), Some(s)) = (dst.get_mut(..n), self.block.get_mut(self.block_pos..end)) {
            d.copy_from_slice(s);
            s.zeroize();
            self.block_pos = end;
            n
        } else {
            0
        }
    }

    fn fill(&mut self, dst: &mut [u8]) -> Result<(), Error<T::Error>> {
        if dst.is_empty() {
            return Ok(());
        }
        // Nobody read from the key since the last call: that silence is
        // ours, not the key's going idle.
        let now = self.now();
        self.session.resume(now);
        self.tick()?;
        let mut filled = 0;
        while let Some(rest) = dst.get_mut(filled..) {
            filled = filled.saturating_add(self.take_buffered(rest));
            if filled >= dst.len() {
                break;
            }
            self.next_block()?;
        }
        Ok(())
    }
}

impl<T, K, R, C, G> EntropyKeyRng<T, K, R, C, G> {
    /// The session's state.
    pub fn state(&self) -> State {
        self.session.state()
    }

    /// The latest information the key reported.
    pub fn info(&self) -> &DeviceInfo {
        self.session.info()
    }

    /// The session's counters.
    pub fn counters(&self) -> Counters {
        self.session.counters()
    }

    /// The key's serial, once it has sent it.
    pub fn serial(&self) -> Option<Serial> {
        self.session.serial()
    }

    /// The session itself, for anything else.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The timeout set by [`with_timeout`](Self::with_timeout).
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Verified bytes buffered and not handed out yet (fewer than 32).
    pub fn buffered(&self) -> usize {
        BLOCK_LEN.saturating_sub(self.block_pos)
    }

    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport back; buffered entropy is wiped.
    pub fn into_inner(self) -> T {
        self.transport
    }

    fn discard_block(&mut self) {
        self.block.zeroize();
        self.block_pos = BLOCK_LEN;
    }
}

impl<T, K, R, C, G> TryRng for EntropyKeyRng<T, K, R, C, G>
where
    T: Read + Write,
    K: KeyLookup,
    R: TryCryptoRng,
    C: Clock,
    G: BlockFilter,
{
    type Error = Error<<T as ErrorType>::Error>;

    /// Four bytes of the key's stream, little-endian.
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        let mut b = [0; 4];
        self.fill(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Eight bytes of the key's stream, little-endian.
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        let mut b = [0; 8];
        self.fill(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// The next `dst.len()` bytes of the key's stream. On error, `dst`
    /// holds no usable bytes.
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        self.fill(dst)
    }
}

impl<T, K, R, C, G> TryCryptoRng for EntropyKeyRng<T, K, R, C, G>
where
    T: Read + Write,
    K: KeyLookup,
    R: TryCryptoRng,
    C: Clock,
    G: BlockFilter,
{
}
