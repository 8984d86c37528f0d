//! The Entropy Key's RNG as [`getrandom`]'s custom backend, so that every
//! crate in a firmware that calls `getrandom::fill` (or `getrandom::u32`,
//! `u64`) gets the key's verified, decrypted bytes.
//!
//! This module is the safe half: a slot ([`Backend`], one of them in
//! [`BACKEND`]) that holds the key's RNG once it is registered and fills
//! buffers from it. The other half is the function getrandom calls, which
//! must be defined in the firmware's root crate (`src/bin/getrandom-fw.rs`):
//!
//! 1. **Select the backend.** getrandom 0.4 uses a custom backend when built
//!    with `--cfg getrandom_backend="custom"`. That has to be a rustflag
//!    (for all crates), not a build script's `cargo:rustc-cfg` (that reaches
//!    only the build script's own crate): `.cargo/config.toml` sets it for
//!    `[target.thumbv7m-none-eabi]`. Without it getrandom fails to compile
//!    for a bare-metal target; host builds keep the OS's source.
//! 2. **Define the function.** With that cfg getrandom 0.4 (like 0.3)
//!    declares and calls
//!    `unsafe extern "Rust" fn __getrandom_v03_custom(dest: *mut u8, len:
//!    usize) -> Result<(), getrandom::Error>`. The binary defines it once,
//!    `#[unsafe(no_mangle)]`: it writes zeros over the `len` bytes (they may
//!    be uninitialised), makes them a `&mut [u8]` and calls
//!    [`BACKEND.fill`](Backend::fill). That is all the `unsafe` there is.
//! 3. **Register the RNG** at start-up: build the
//!    [`EntropyKeyRng`] over the transport to the key, let it key the session
//!    (its first read does; see [`getrandom_app::key_session`]), put it in a
//!    `static` (so it lives for `'static`) and hand it to
//!    [`BACKEND.register`](Backend::register).
//!
//! Until step 3, and whenever the key cannot deliver, getrandom returns an
//! error with one of this module's custom codes ([`NOT_REGISTERED`],
//! [`KEY_TIMEOUT`], [`KEY_EOF`], ...), never bytes from elsewhere. On a key
//! error the destination is wiped (zeros), so the bytes the key did deliver
//! before failing cannot be mistaken for a result. [`code_of`] turns an
//! error back into its code, e.g. for a log line.
//!
//! # Concurrency
//!
//! The slot is a [`critical_section::Mutex`]; on a single-core Cortex-M the
//! `cortex-m` crate's `critical-section-single-core` implementation masks
//! interrupts for it. The critical section is held only to move the RNG out
//! of the slot and back, **not** while the RNG reads from the key (which
//! blocks for a frame time or more, up to its timeout): interrupts, and an
//! interrupt-driven USB stack feeding the transport, keep running. A
//! getrandom call that arrives while another is reading from the key (from
//! an interrupt handler, say) fails at once with [`BUSY`] rather than
//! deadlocking or handing out the same bytes twice.
//!
//! [`getrandom_app::key_session`]: crate::getrandom_app::key_session

use core::cell::Cell;

use critical_section::Mutex;
use ekey_proto::host::KeyLookup;
use ekey_proto::rng::{self, BlockFilter, Clock, EntropyKeyRng};
use embedded_io::{Read, Write};
use getrandom::Error;
use rand_core::{TryCryptoRng, TryRng};

/// The custom error codes (for [`Error::new_custom`]) this backend returns.
pub mod code {
    /// No RNG registered yet.
    pub const NOT_REGISTERED: u16 = 0;
    /// Another call is reading from the key.
    pub const BUSY: u16 = 1;
    /// [`rng::Error::Transport`](ekey_proto::rng::Error::Transport).
    pub const KEY_TRANSPORT: u16 = 2;
    /// [`rng::Error::Timeout`](ekey_proto::rng::Error::Timeout).
    pub const KEY_TIMEOUT: u16 = 3;
    /// [`rng::Error::FailureMode`](ekey_proto::rng::Error::FailureMode).
    pub const KEY_FAILURE_MODE: u16 = 4;
    /// [`rng::Error::LongTermKeyRejected`](ekey_proto::rng::Error::LongTermKeyRejected).
    pub const KEY_REJECTED: u16 = 5;
    /// [`rng::Error::NoLongTermKey`](ekey_proto::rng::Error::NoLongTermKey).
    pub const KEY_NO_LONG_TERM_KEY: u16 = 6;
    /// [`rng::Error::WrongSerial`](ekey_proto::rng::Error::WrongSerial).
    pub const KEY_WRONG_SERIAL: u16 = 7;
    /// [`rng::Error::Eof`](ekey_proto::rng::Error::Eof).
    pub const KEY_EOF: u16 = 8;
    /// [`rng::Error::GateClosed`](ekey_proto::rng::Error::GateClosed).
    pub const KEY_GATE_CLOSED: u16 = 9;
    /// An [`rng::Error`](ekey_proto::rng::Error) this version does not know.
    pub const KEY_OTHER: u16 = 10;
    /// The highest code used.
    pub const LAST: u16 = KEY_OTHER;
}

/// No RNG has been registered (yet): [`Backend::register`] comes after
/// the session is keyed at start-up.
pub const NOT_REGISTERED: Error = Error::new_custom(code::NOT_REGISTERED);
/// Another getrandom call is reading from the key (e.g. an interrupt
/// handler called getrandom while the main loop's call was waiting).
pub const BUSY: Error = Error::new_custom(code::BUSY);
/// The transport to the key failed.
pub const KEY_TRANSPORT: Error = Error::new_custom(code::KEY_TRANSPORT);
/// No verified block from the key within the RNG's timeout.
pub const KEY_TIMEOUT: Error = Error::new_custom(code::KEY_TIMEOUT);
/// The key reported a failure mode.
pub const KEY_FAILURE_MODE: Error = Error::new_custom(code::KEY_FAILURE_MODE);
/// The key rejected our long-term key.
pub const KEY_REJECTED: Error = Error::new_custom(code::KEY_REJECTED);
/// No long-term key for the key's serial.
pub const KEY_NO_LONG_TERM_KEY: Error = Error::new_custom(code::KEY_NO_LONG_TERM_KEY);
/// The key's serial is not the expected one.
pub const KEY_WRONG_SERIAL: Error = Error::new_custom(code::KEY_WRONG_SERIAL);
/// The transport to the key is closed.
pub const KEY_EOF: Error = Error::new_custom(code::KEY_EOF);
/// The RNG's health gate is closed.
pub const KEY_GATE_CLOSED: Error = Error::new_custom(code::KEY_GATE_CLOSED);
/// Any other error of the key's RNG.
pub const KEY_OTHER: Error = Error::new_custom(code::KEY_OTHER);

/// getrandom's error for an error of the key's RNG.
pub fn key_error<E>(e: &rng::Error<E>) -> Error {
    match e {
        rng::Error::Transport(_) => KEY_TRANSPORT,
        rng::Error::Timeout => KEY_TIMEOUT,
        rng::Error::FailureMode(_) => KEY_FAILURE_MODE,
        rng::Error::LongTermKeyRejected => KEY_REJECTED,
        rng::Error::NoLongTermKey => KEY_NO_LONG_TERM_KEY,
        rng::Error::WrongSerial => KEY_WRONG_SERIAL,
        rng::Error::Eof => KEY_EOF,
        rng::Error::GateClosed(_) => KEY_GATE_CLOSED,
        _ => KEY_OTHER,
    }
}

/// The [`code`] of one of this backend's errors; `None` for any other
/// getrandom error.
pub fn code_of(e: Error) -> Option<u16> {
    (0..=code::LAST).find(|&c| Error::new_custom(c) == e)
}

/// What the backend draws from: the key's RNG. Implemented for every
/// [`EntropyKeyRng`] (gated or not), over any transport; the trait exists
/// so that [`Backend`] can hold one without naming its type parameters.
pub trait KeySource {
    /// Fills all of `dest` with the key's bytes, or fails (and then `dest`
    /// holds nothing usable).
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), Error>;
}

impl<T, K, R, C, G> KeySource for EntropyKeyRng<T, K, R, C, G>
where
    T: Read + Write,
    K: KeyLookup,
    R: TryCryptoRng,
    C: Clock,
    G: BlockFilter,
{
    fn fill(&mut self, dest: &mut [u8]) -> Result<(), Error> {
        self.try_fill_bytes(dest).map_err(|e| key_error(&e))
    }
}

/// The registered source, by reference: it lives in a `static` of the
/// firmware's (in .bss, where a `MaybeUninit` keeps it), not in this slot.
type Source = &'static mut (dyn KeySource + Send);

enum Slot {
    /// Nothing registered.
    Empty,
    /// Registered and free.
    Idle(Source),
    /// Registered, and moved out by a [`Backend::fill`] in progress.
    Busy,
}

/// Where the key's RNG is registered for getrandom. The firmware uses the
/// one in [`BACKEND`]; the host tests make their own.
pub struct Backend {
    slot: Mutex<Cell<Slot>>,
}

/// The backend getrandom-fw's `__getrandom_v03_custom` fills from.
pub static BACKEND: Backend = Backend::new();

impl Backend {
    /// A backend with nothing registered.
    pub const fn new() -> Self {
        Backend {
            slot: Mutex::new(Cell::new(Slot::Empty)),
        }
    }

    /// Makes `source` the backend's source, for good. Refused (and
    /// `source` handed back) if one is registered already.
    pub fn register(&self, source: Source) -> Result<(), Source> {
        critical_section::with(|cs| {
            let slot = self.slot.borrow(cs);
            match slot.replace(Slot::Empty) {
                Slot::Empty => {
                    slot.set(Slot::Idle(source));
                    Ok(())
                }
                other => {
                    slot.set(other);
                    Err(source)
                }
            }
        })
    }

    /// Whether a source has been registered.
    pub fn is_registered(&self) -> bool {
        critical_section::with(|cs| {
            let slot = self.slot.borrow(cs);
            let now = slot.replace(Slot::Empty);
            let registered = !matches!(now, Slot::Empty);
            slot.set(now);
            registered
        })
    }

    /// Fills all of `dest` from the registered source: what
    /// `__getrandom_v03_custom` does. Fails with [`NOT_REGISTERED`] before
    /// registration, [`BUSY`] while another call is reading from the key,
    /// or the key's error ([`key_error`]); after a key error `dest` is all
    /// zeros.
    pub fn fill(&self, dest: &mut [u8]) -> Result<(), Error> {
        // Take the source out in a short critical section ...
        let source = critical_section::with(|cs| {
            let slot = self.slot.borrow(cs);
            match slot.replace(Slot::Busy) {
                Slot::Idle(source) => Ok(source),
                Slot::Empty => {
                    slot.set(Slot::Empty);
                    Err(NOT_REGISTERED)
                }
                Slot::Busy => Err(BUSY),
            }
        })?;
        // ... read from the key outside it (this blocks) ...
        let result = source.fill(dest);
        // ... and put it back. Only this call can end `Busy`: `register`
        // refuses while it lasts.
        critical_section::with(|cs| self.slot.borrow(cs).set(Slot::Idle(source)));
        if result.is_err() {
            // Bytes the key delivered before failing are no result.
            dest.fill(0);
        }
        result
    }
}

impl Default for Backend {
    fn default() -> Self {
        Self::new()
    }
}
