//! The key as a random number generator for your own program.
//!
//! [`open`] finds a key (the first one on USB, or a tty or Unix socket you
//! name), looks its long-term key up in the keyring, and returns an
//! [`ekey_proto::rng::EntropyKeyRng`]: `rand_core`'s `TryRng +
//! TryCryptoRng`, blocking until verified bytes arrive, with a typed error
//! instead of a panic. As in the daemon, a health gate
//! ([`ekey_proto::health::Gate`]) stands between the key and the caller:
//! bytes come only from 2,500-byte blocks that passed FIPS 140-2 and the
//! SP 800-90B tests, so the first call waits for one such block (about a
//! second), and a key whose noise goes bad gives
//! [`Error::GateClosed`](ekey_proto::rng::Error::GateClosed), not bytes.
//!
//! ```no_run
//! use rand_core::TryRng;
//! let mut key = ekey_host::rng::open(None, ekey_host::keyring::DEFAULT_PATH.as_ref())?;
//! let mut buf = [0u8; 32];
//! key.try_fill_bytes(&mut buf)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! A key gives a few kilobytes a second. For fast randomness, seed a
//! ChaCha20 generator from it and reseed it now and then (see
//! `examples/chacha_reseed.rs`); `examples/random_hex.rs` prints 32 bytes.
//! Wrap the RNG in `rand_core::UnwrapErr` only where a panic on a failing
//! key is acceptable.

use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant as StdInstant};

use ekey_proto::health::{Gate, GateConfig};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rng::EntropyKeyRng;
use ekey_proto::time::Instant;

use crate::keyring::Keyring;
use crate::keys::usb;

/// How long one transport read waits before the adapter looks at its
/// clock again.
const POLL: Duration = Duration::from_millis(200);

/// A blocking byte stream to a key, as `embedded-io` sees it. Reads that
/// find nothing within 200 ms report `TimedOut`, which the adapter
/// retries until its own deadline.
pub struct BlockingLink {
    inner: Box<dyn ReadWrite>,
    /// A tty read returning 0 means "nothing yet" (VTIME), not the end.
    zero_is_timeout: bool,
}

trait ReadWrite: Read + Write + Send {}
impl<T: Read + Write + Send> ReadWrite for T {}

impl embedded_io::ErrorType for BlockingLink {
    type Error = io::Error;
}

impl embedded_io::Read for BlockingLink {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, io::Error> {
        match self.inner.read(buf) {
            Ok(0) if self.zero_is_timeout && !buf.is_empty() => Err(io::ErrorKind::TimedOut.into()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Err(io::ErrorKind::TimedOut.into()),
            r => r,
        }
    }
}

impl embedded_io::Write for BlockingLink {
    fn write(&mut self, buf: &[u8]) -> Result<usize, io::Error> {
        self.inner.write(buf)
    }
    fn flush(&mut self) -> Result<(), io::Error> {
        self.inner.flush()
    }
}

/// Looks long-term keys up in a keyring loaded once.
pub struct KeyringLookup(Keyring);

impl ekey_proto::host::KeyLookup for KeyringLookup {
    fn long_term_key(&self, serial: &Serial) -> Option<LongTermKey> {
        self.0.get(serial)
    }
}

/// The monotonic clock the adapter reads.
pub struct Clock(StdInstant);

impl ekey_proto::rng::Clock for Clock {
    fn now(&mut self) -> Instant {
        Instant::from_millis(self.0.elapsed().as_millis() as u64)
    }
}

/// A key as an RNG: see the module docs.
pub type KeyRng = EntropyKeyRng<BlockingLink, KeyringLookup, getrandom::SysRng, Clock, Gate>;

/// Why a key cannot be opened as an RNG.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The keyring cannot be read.
    #[error(transparent)]
    Keyring(#[from] crate::keyring::KeyringError),
    /// The device (a path, or a USB key) cannot be opened or set up.
    #[error("{what}: {source}")]
    Device {
        /// The path, or the USB key's description.
        what: String,
        /// What failed.
        source: io::Error,
    },
    /// No key on USB.
    #[error("no Entropy Key (USB 20df:0001) is attached")]
    NoKey,
    /// More than one key on USB and no device named.
    #[error("several keys are attached: name one with a device path")]
    SeveralKeys,
}

/// Opens a key as an RNG: `device` (a tty or Unix socket), or else the one
/// key on USB; long-term keys from the keyring at `keyring`; the daemon's
/// default health gate.
pub fn open(device: Option<&Path>, keyring: &Path) -> Result<KeyRng, OpenError> {
    let ring = Keyring::load(keyring)?;
    let link = match device {
        Some(path) => open_path(path)?,
        None => open_usb()?,
    };
    Ok(EntropyKeyRng::new(
        link,
        KeyringLookup(ring),
        getrandom::SysRng,
        Clock(StdInstant::now()),
    )
    .with_gate(Gate::new(GateConfig::default())))
}

/// [`open`] from command-line arguments `[DEVICE [KEYRING]]` (as the
/// examples take them): no device means the key on USB, no keyring the
/// system one.
pub fn open_from_args(mut args: impl Iterator<Item = String>) -> Result<KeyRng, OpenError> {
    let device = args.next();
    let keyring = args
        .next()
        .unwrap_or_else(|| crate::keyring::DEFAULT_PATH.to_owned());
    open(device.as_deref().map(Path::new), Path::new(&keyring))
}

#[cfg(not(unix))]
fn open_path(path: &Path) -> Result<BlockingLink, OpenError> {
    Err(OpenError::Device {
        what: path.display().to_string(),
        source: io::Error::new(
            io::ErrorKind::Unsupported,
            "ttys and Unix sockets are Unix only; here keys come over USB",
        ),
    })
}

#[cfg(unix)]
fn open_path(path: &Path) -> Result<BlockingLink, OpenError> {
    let at = |source: io::Error| OpenError::Device {
        what: path.display().to_string(),
        source,
    };
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(path).map_err(at)?;
    if meta.file_type().is_socket() {
        let s = std::os::unix::net::UnixStream::connect(path).map_err(at)?;
        s.set_read_timeout(Some(POLL)).map_err(at)?;
        return Ok(BlockingLink {
            inner: Box::new(s),
            zero_is_timeout: false,
        });
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(at)?;
    crate::keys::transport::set_raw(&f).map_err(at)?;
    // Reads return after POLL with whatever came, possibly nothing.
    let mut t = nix::sys::termios::tcgetattr(&f).map_err(|e| at(e.into()))?;
    t.control_chars[nix::sys::termios::SpecialCharacterIndices::VMIN as usize] = 0;
    t.control_chars[nix::sys::termios::SpecialCharacterIndices::VTIME as usize] =
        (POLL.as_millis() / 100) as u8;
    nix::sys::termios::tcsetattr(&f, nix::sys::termios::SetArg::TCSANOW, &t)
        .map_err(|e| at(e.into()))?;
    Ok(BlockingLink {
        inner: Box::new(f),
        zero_is_timeout: true,
    })
}

fn open_usb() -> Result<BlockingLink, OpenError> {
    let on = |what: String| move |source: io::Error| OpenError::Device { what, source };
    let keys = usb::list_blocking().map_err(on("USB".into()))?;
    let info = match keys.as_slice() {
        [] => return Err(OpenError::NoKey),
        [one] => one,
        _ => return Err(OpenError::SeveralKeys),
    };
    let what = usb::describe(info);
    let link = usb::open_blocking(info, POLL).map_err(on(what))?;
    Ok(BlockingLink {
        inner: Box::new(link),
        zero_is_timeout: false,
    })
}
