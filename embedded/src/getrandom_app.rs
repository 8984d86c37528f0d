//! getrandom-fw's key: ekey-proto's [`EntropyKeyRng`] over a transport that
//! replays the recorded key ([`transcript::KEY_TO_HOST`]), with the
//! fixture's long-term key and the (insecure, test-only) nonce generator
//! session-fw uses, so that it releases the recorded blocks, in order.
//! [`getrandom_backend`](crate::getrandom_backend) makes it getrandom's
//! source.
//!
//! [`transcript::KEY_TO_HOST`]: crate::transcript::KEY_TO_HOST

use core::convert::Infallible;

use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rng::{self, EntropyKeyRng, SingleKey};
use ekey_proto::time::Instant;
use embedded_io::{ErrorType, Read, Write};
use rand_core::TryRng;
use zeroize::Zeroizing;

use crate::fixture;
use crate::xorshift::InsecureNonceRng;

/// A stand-in for the USB host's serial channel to a key: reads return the
/// recorded key's bytes, in order, then end of file (`Ok(0)`, which the
/// RNG reports as [`rng::Error::Eof`]); writes (the host's reset and `K` +
/// nonce) go to `on_write`.
pub struct ReplayLink<W> {
    input: &'static [u8],
    on_write: W,
}

impl<W: FnMut(&[u8])> ReplayLink<W> {
    /// A link replaying `input`.
    pub fn new(input: &'static [u8], on_write: W) -> Self {
        ReplayLink { input, on_write }
    }
}

impl<W> ErrorType for ReplayLink<W> {
    type Error = Infallible;
}

impl<W: FnMut(&[u8])> Read for ReplayLink<W> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, Infallible> {
        let (now, rest) = self.input.split_at(self.input.len().min(buf.len()));
        if let Some(dst) = buf.get_mut(..now.len()) {
            dst.copy_from_slice(now);
        }
        self.input = rest;
        Ok(now.len())
    }
}

impl<W: FnMut(&[u8])> Write for ReplayLink<W> {
    fn write(&mut self, buf: &[u8]) -> Result<usize, Infallible> {
        (self.on_write)(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// A stand-in for a hardware timer: every reading is 1 ms later than the
/// one before. The RNG reads it a few times per 64-byte frame, so the
/// replay stays far from the session's timeouts (seconds).
#[derive(Clone, Debug, Default)]
pub struct TickClock {
    millis: u64,
}

impl rng::Clock for TickClock {
    fn now(&mut self) -> Instant {
        let now = Instant::from_millis(self.millis);
        self.millis = self.millis.saturating_add(1);
        now
    }
}

/// The key's RNG in getrandom-fw; `W` is where the host's bytes go.
pub type KeyRng<W> = EntropyKeyRng<ReplayLink<W>, SingleKey, InsecureNonceRng, TickClock>;

/// The keyring: the fixture's long-term key, for the fixture's serial.
pub fn single_key() -> SingleKey {
    SingleKey::for_serial(
        Serial(fixture::SERIAL),
        LongTermKey::from_bytes(fixture::LONG_TERM_KEY),
    )
}

/// The key's RNG, reading the recorded key's bytes from `input` (the
/// firmware passes [`transcript::KEY_TO_HOST`](crate::transcript::KEY_TO_HOST))
/// and sending the host's bytes to `on_write`. Nothing is sent until the
/// first read.
///
/// The nonce generator is session-fw's insecure one (see
/// [`xorshift`](crate::xorshift)) with the recording's seed: the only
/// nonce the recorded `K!` answers. A real firmware seeds a real CSPRNG
/// (the MCU's TRNG) here, and its transport is the USB host's CDC-ACM
/// channel to the key.
pub fn new_key_rng<W: FnMut(&[u8])>(input: &'static [u8], on_write: W) -> KeyRng<W> {
    EntropyKeyRng::new(
        ReplayLink::new(input, on_write),
        single_key(),
        InsecureNonceRng::new(fixture::NONCE_SEED),
        TickClock::default(),
    )
}

/// Keys the session before the RNG is registered, so that a key that
/// cannot be trusted (wrong long-term key, unknown serial, failure mode)
/// shows at start-up, not in some crate's getrandom call, and the first
/// such call does not wait for the key exchange. The RNG keys on its first
/// read, so this reads one byte, which is wiped; the stream handed out
/// afterwards starts at the byte after it.
pub fn key_session<W: FnMut(&[u8])>(rng: &mut KeyRng<W>) -> Result<(), rng::Error<Infallible>> {
    let mut first = Zeroizing::new([0u8; 1]);
    rng.try_fill_bytes(&mut *first)
}
