//! Feeding the kernel's random pool (PROTOCOL.md §10, `--kernel`).
//!
//! This page is about Linux; the BSDs are fed through the same
//! [`KernelFeeder`] by [`bsd::BsdRandom`] (see there: no credit on FreeBSD
//! and OpenBSD, RNDADDDATA with an estimate on NetBSD, no forced reseeds).
//! Elsewhere (macOS, Windows) [`RandomDevice::open`] says the kernel
//! cannot be fed.
//!
//! Bytes go in via `ioctl(/dev/random, RNDADDENTROPY, rand_pool_info)`, which
//! mixes them into the pool and credits `bits_per_byte` bits of entropy per
//! byte. That needs CAP_SYS_ADMIN; without it [`RandomDevice::open`] fails
//! with "feeding the kernel needs root (CAP_SYS_ADMIN)".
//!
//! # Policy
//!
//! Since Linux 5.18 `entropy_avail` is pinned at 256 and `/dev/random` only
//! reports POLLOUT before the CRNG is initialised, so "wait for POLLOUT" would
//! stall forever once it is. Instead [`KernelFeeder`] has two [`Mode`]s:
//!
//! * [`Mode::Filling`] while the CRNG is not initialised (`getrandom` with
//!   `GRND_NONBLOCK` fails with EAGAIN): feed as fast as the key allows, in
//!   ioctls of up to the configured `chunk` bytes, re-checking after every
//!   write. This is what shortens boot-time stalls.
//! * [`Mode::Topping`] once it is: mix in the configured `bytes_per_interval`
//!   fresh bytes every [`KernelConfig::interval`] (default 64 bytes every
//!   10 s). In between no bytes are taken from the source (backpressure).
//!
//! **Reseeds.** Once the CRNG is initialised, bytes added with
//! RNDADDENTROPY wait in the input pool until the kernel's next scheduled
//! reseed of the CRNG, up to 60 s later. So after a mixing write in
//! [`Mode::Topping`] the feeder asks for a reseed at once
//! (`ioctl(RNDRESEEDCRNG)`, Linux 4.17+), at most once per
//! [`KernelConfig::reseed_interval`] (default 10 s; zero: never). While
//! filling it does not: the kernel reseeds by itself when the CRNG
//! initialises. A failed reseed (an older kernel, no CAP_SYS_ADMIN) is
//! counted ([`KernelStats::reseed_failures`]) and logged once; it never
//! stops the output.
//!
//! **New VM generations.** When this machine turns out to be a restored
//! snapshot or a clone (a new VM generation ID, see `crate::vmgenid`),
//! [`KernelFeeder::fresh_generation`] makes the feeder want that many
//! bytes at once, whatever the pace, and reseed right after them, whatever
//! the reseed interval.
//!
//! The feeder is sans-IO: time is passed in and the device is an
//! [`EntropySink`], so the policy is tested without root. [`run`] drives it
//! with a real [`RandomDevice`] inside the daemon.
//!
//! **Only bytes that passed the health checks may be given to the feeder**
//! (to [`KernelFeeder::feed`] or to [`run`]'s `source`): it credits every byte
//! it is given. Keeping refused bytes out is the caller's job.

use std::fmt;
#[cfg(target_os = "linux")]
use std::fs::{File, OpenOptions};
use std::io;
#[cfg(target_os = "linux")]
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "netbsd"))]
use nix::errno::Errno;
#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "netbsd"))]
use nix::libc;
use tokio::sync::mpsc;
#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "netbsd"))]
use zeroize::Zeroize;
use zeroize::Zeroizing;

use crate::wipe::WipeQueue;

use crate::keys::driver::GateCloses;

pub mod bsd;

/// Bytes the daemon's kernel output mixes in at once when this host turns
/// out to be a restored snapshot or a clone.
pub const ON_VMGENID_BYTES: usize = 64;

/// Largest number of bytes passed to the kernel in one ioctl.
pub const MAX_CHUNK: usize = 512;

#[cfg(target_os = "linux")]
/// `RNDADDENTROPY = _IOW('R', 0x03, int[2])` (0x40085203 on Linux).
const RNDADDENTROPY: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_write!(b'R', 0x03, size_of::<[libc::c_int; 2]>())
        as nix::sys::ioctl::ioctl_num_type;

#[cfg(target_os = "linux")]
/// `RNDRESEEDCRNG = _IO('R', 0x07)` (0x5207 on Linux).
const RNDRESEEDCRNG: nix::sys::ioctl::ioctl_num_type =
    nix::request_code_none!(b'R', 0x07) as nix::sys::ioctl::ioctl_num_type;

#[cfg(target_os = "linux")]
const NEEDS_ROOT: &str = "feeding the kernel needs root (CAP_SYS_ADMIN)";

/// What `--kernel` credits per byte: a fixed number of bits, or `auto`,
/// which follows each key's live min-entropy estimate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Credit {
    /// This many bits per byte, 0..=8 (0 mixes bytes in without credit).
    Bits(u8),
    /// Each key's bytes are credited floor(its SP 800-90B min-entropy
    /// estimate × 7/8) bits per byte, never above 7, and nothing before its
    /// first estimate (`--kernel=auto`; see [`auto_bits`]).
    Auto,
}

impl Default for Credit {
    fn default() -> Self {
        Credit::Bits(7)
    }
}

impl fmt::Display for Credit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credit::Bits(b) => write!(f, "{b}"),
            Credit::Auto => f.write_str("auto"),
        }
    }
}

impl std::str::FromStr for Credit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("auto") {
            return Ok(Credit::Auto);
        }
        match s.parse::<u8>() {
            Ok(b) if b <= 8 => Ok(Credit::Bits(b)),
            _ => Err(format!(
                "{s:?} is neither bits per byte (0..=8) nor `auto` (follow the keys' \
                 min-entropy estimates)"
            )),
        }
    }
}

/// The most `--kernel=auto` credits per byte.
pub const AUTO_MAX_BITS: u8 = 7;

/// `--kernel=auto`'s credit for a key whose least SP 800-90B min-entropy
/// estimate is `min_entropy` bits per byte: floor(estimate × 7/8), never
/// above [`AUTO_MAX_BITS`]; 0 without an estimate (or a nonsensical one).
pub fn auto_bits(min_entropy: Option<f64>) -> u8 {
    match min_entropy {
        Some(h) if h.is_finite() && h > 0.0 => {
            // `as` saturates; the floor of 7/8 of at most 8 bits is 7.
            ((h * 7.0 / 8.0).floor() as u8).min(AUTO_MAX_BITS)
        }
        _ => 0,
    }
}

/// For `--kernel=auto`: the bits per byte to credit a key's bytes with now
/// (from [`auto_bits`] of its latest estimate).
pub type KeyCredits = Arc<dyn Fn(&ekey_proto::keys::Serial) -> u8 + Send + Sync>;

/// How the kernel is fed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Entropy credited per byte, 0..=8 (default 7; 0 mixes bytes in
    /// without credit). With `auto`, the most any key's bytes get.
    pub bits_per_byte: u8,
    /// Whether each key's bytes are credited by its min-entropy estimate
    /// (`--kernel=auto`, looked up by [`run_with`]'s `credits`), at most
    /// `bits_per_byte`.
    pub auto: bool,
    /// Pace once the CRNG is initialised (default 10 s).
    pub interval: Duration,
    /// Bytes mixed in per `interval` once initialised (default 64).
    pub bytes_per_interval: usize,
    /// Bytes per ioctl while the CRNG is not initialised (default 256, at
    /// most [`MAX_CHUNK`]).
    pub chunk: usize,
    /// Once initialised: the shortest time between two reseeds of the CRNG
    /// after mixing writes (default 10 s; zero: no reseeds).
    pub reseed_interval: Duration,
}

impl Default for KernelConfig {
    fn default() -> Self {
        KernelConfig {
            bits_per_byte: 7,
            auto: false,
            interval: Duration::from_secs(10),
            bytes_per_interval: 64,
            chunk: 256,
            reseed_interval: Duration::from_secs(10),
        }
    }
}

/// A kernel output setting out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// More than 8 bits credited per byte.
    #[error("--kernel: {0} bits per byte is out of range (0..=8)")]
    BitsPerByte(u8),
    /// A zero interval or zero bytes per interval.
    #[error("the interval and the bytes per interval must be non-zero")]
    ZeroPace,
}

impl KernelConfig {
    /// The defaults with `bits_per_byte` credited per byte; rejects values
    /// above 8.
    pub fn new(bits_per_byte: u8) -> Result<Self, ConfigError> {
        if bits_per_byte > 8 {
            return Err(ConfigError::BitsPerByte(bits_per_byte));
        }
        Ok(KernelConfig {
            bits_per_byte,
            ..KernelConfig::default()
        })
    }

    /// The defaults for `credit`: `auto` credits at most
    /// [`AUTO_MAX_BITS`], each key's bytes by its estimate.
    pub fn for_credit(credit: Credit) -> Result<Self, ConfigError> {
        match credit {
            Credit::Bits(b) => Self::new(b),
            Credit::Auto => Ok(KernelConfig {
                bits_per_byte: AUTO_MAX_BITS,
                auto: true,
                ..KernelConfig::default()
            }),
        }
    }

    /// Sets the pace used once the CRNG is initialised; both must be non-zero.
    pub fn with_pace(
        mut self,
        bytes_per_interval: usize,
        interval: Duration,
    ) -> Result<Self, ConfigError> {
        if bytes_per_interval == 0 || interval.is_zero() {
            return Err(ConfigError::ZeroPace);
        }
        self.bytes_per_interval = bytes_per_interval;
        self.interval = interval;
        Ok(self)
    }

    /// Sets the shortest time between reseeds; zero turns them off.
    pub fn with_reseed(mut self, interval: Duration) -> Self {
        self.reseed_interval = interval;
        self
    }

    fn chunk(&self) -> usize {
        self.chunk.clamp(1, MAX_CHUNK)
    }

    fn bytes_per_interval(&self) -> usize {
        self.bytes_per_interval.max(1)
    }

    /// Bits credited for `len` bytes: never more than 8 per byte.
    fn credit(&self, len: usize) -> u32 {
        let bits = u64::from(self.bits_per_byte.min(8)) * len as u64;
        u32::try_from(bits).unwrap_or(u32::MAX)
    }
}

/// What the feeder is doing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// CRNG not initialised: feed as fast as the key allows.
    #[default]
    Filling,
    /// CRNG initialised: `bytes` fresh bytes every `interval`.
    Topping { bytes: usize, interval: Duration },
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mode::Filling => f.write_str("filling the kernel pool (CRNG not ready)"),
            Mode::Topping { bytes, interval } => {
                write!(f, "mixing in {bytes} bytes every ")?;
                if interval.subsec_nanos() == 0 {
                    write!(f, "{} s", interval.as_secs())
                } else {
                    write!(f, "{} ms", interval.as_millis())
                }
            }
        }
    }
}

/// Counters of the kernel output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelStats {
    /// Bytes the kernel accepted.
    pub bytes_written: u64,
    /// Bits of entropy credited with them.
    pub bits_credited: u64,
    /// RNDADDENTROPY calls that failed.
    pub ioctl_failures: u64,
    /// Reseeds of the CRNG asked for after mixing writes (RNDRESEEDCRNG).
    pub reseeds: u64,
    /// New VM generation IDs seen (each answered with fresh bytes and a
    /// reseed).
    pub new_generations: u64,
    /// RNDRESEEDCRNG calls that failed.
    pub reseed_failures: u64,
    /// Current mode.
    pub mode: Mode,
    /// Bytes the kernel accepted, by the key they came from (each credited
    /// `bits_per_byte` bits); kept by [`run`], empty for a bare
    /// [`KernelFeeder`].
    pub bytes_by_key: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    /// Bytes dropped before they reached the kernel because their key's
    /// health gate closed after they were released, by key.
    pub withdrawn_by_key: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    /// Bits credited with the bytes of each key (kept by [`run`]).
    pub bits_by_key: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    /// With `--kernel=auto`: the bits per byte each key's latest bytes were
    /// credited with (kept by [`run`]).
    pub credit_by_key: std::collections::BTreeMap<ekey_proto::keys::Serial, u8>,
    /// Bytes the kernel accepted without any credit (`--kernel=0`, a key
    /// not yet estimated under `--kernel=auto`, a kernel that keeps no
    /// count).
    pub bytes_uncredited: u64,
}

/// Where entropy goes: the kernel ([`RandomDevice`]) or a fake in tests.
pub trait EntropySink {
    /// Mixes `bytes` in, crediting `bits` bits of entropy.
    fn add_entropy(&mut self, bytes: &[u8], bits: u32) -> io::Result<()>;
    /// Whether the kernel's CRNG is initialised.
    fn initialised(&mut self) -> bool;
    /// Reseeds the CRNG from the input pool now.
    fn reseed(&mut self) -> io::Result<()>;
    /// Whether [`EntropySink::reseed`] does anything (no BSD kernel has a
    /// forced reseed; the feeder then never asks).
    fn can_reseed(&self) -> bool {
        true
    }
    /// Whether the kernel takes the credit it is given (FreeBSD and
    /// OpenBSD keep no entropy count; the feeder then counts none).
    fn credits(&self) -> bool {
        true
    }
}

/// The kernel's random device on this system: Linux's (RNDADDENTROPY).
#[cfg(target_os = "linux")]
pub type RandomDevice = LinuxRandom;
/// The kernel's random device on this system: a BSD's.
#[cfg(any(target_os = "freebsd", target_os = "openbsd", target_os = "netbsd"))]
pub type RandomDevice = bsd::BsdRandom;
/// The kernel's random device on this system: none can be fed here.
#[cfg(not(any(
    target_os = "linux",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd"
)))]
pub type RandomDevice = Unfed;

/// Where no kernel can be fed (macOS, Windows): [`Unfed::open`] says so.
#[derive(Debug)]
pub enum Unfed {}

impl Unfed {
    /// Fails: this system's kernel cannot be fed.
    pub fn open() -> io::Result<Self> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "feeding the kernel is supported on Linux, FreeBSD, OpenBSD and NetBSD only; \
             use --egd-tcp, --output or read here",
        ))
    }
}

impl EntropySink for Unfed {
    fn add_entropy(&mut self, _: &[u8], _: u32) -> io::Result<()> {
        match *self {}
    }
    fn initialised(&mut self) -> bool {
        match *self {}
    }
    fn reseed(&mut self) -> io::Result<()> {
        match *self {}
    }
}

/// Whether the kernel's generator is seeded: `getrandom` with
/// `GRND_NONBLOCK` fails with EAGAIN until it is (Linux 3.17+, FreeBSD
/// 12+, NetBSD 10+). OpenBSD seeds it at boot.
#[cfg(any(target_os = "linux", target_os = "freebsd", target_os = "netbsd"))]
pub(crate) fn crng_ready() -> bool {
    let mut byte = 0u8;
    loop {
        // SAFETY: the buffer is one writable byte, as the length says.
        let rc = unsafe { libc::getrandom((&raw mut byte).cast(), 1, libc::GRND_NONBLOCK) };
        byte.zeroize();
        if rc >= 0 {
            return true;
        }
        match Errno::last() {
            Errno::EINTR => continue,
            Errno::EAGAIN => return false,
            // No getrandom (an old kernel): don't flood it forever.
            _ => return true,
        }
    }
}

/// Whether the kernel's generator is seeded: OpenBSD seeds it at boot,
/// and elsewhere there is nothing to fill.
#[cfg(not(any(target_os = "linux", target_os = "freebsd", target_os = "netbsd")))]
pub(crate) fn crng_ready() -> bool {
    true
}

/// `/dev/random` on Linux, fed through RNDADDENTROPY.
#[cfg(target_os = "linux")]
#[derive(Debug)]
pub struct LinuxRandom {
    file: File,
}

#[cfg(target_os = "linux")]
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_CHUNK],
}

#[cfg(target_os = "linux")]
fn permission_error(err: io::Error) -> io::Error {
    if matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES)) {
        io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("{NEEDS_ROOT}: {err}"),
        )
    } else {
        err
    }
}

#[cfg(target_os = "linux")]
impl LinuxRandom {
    /// Opens `/dev/random` for writing and checks, with an empty
    /// RNDADDENTROPY, that we may feed it (fails with "feeding the kernel
    /// needs root (CAP_SYS_ADMIN)" otherwise).
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .open("/dev/random")
            .map_err(|e| match e.kind() {
                io::ErrorKind::PermissionDenied => {
                    io::Error::new(e.kind(), format!("{NEEDS_ROOT}: /dev/random: {e}"))
                }
                _ => io::Error::new(e.kind(), format!("/dev/random: {e}")),
            })?;
        let mut dev = LinuxRandom { file };
        dev.add_entropy(&[], 0)?;
        Ok(dev)
    }
}

#[cfg(target_os = "linux")]
impl EntropySink for LinuxRandom {
    fn add_entropy(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
        for piece in bytes
            .chunks(MAX_CHUNK)
            .chain(bytes.is_empty().then_some(&[][..]))
        {
            // This piece's share of `bits`, never above 8 bits per byte.
            let share = (u64::from(bits) * piece.len() as u64 / bytes.len().max(1) as u64)
                .min(8 * piece.len() as u64);
            let mut info = RandPoolInfo {
                entropy_count: libc::c_int::try_from(share).unwrap_or(libc::c_int::MAX),
                buf_size: piece.len() as libc::c_int,
                buf: [0; MAX_CHUNK],
            };
            info.buf[..piece.len()].copy_from_slice(piece);
            // SAFETY: `info` is a valid, initialised `struct rand_pool_info`
            // whose `buf` holds at least `buf_size` bytes; the kernel only
            // reads from it, and it outlives the call.
            let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), RNDADDENTROPY, &info) };
            info.buf.zeroize();
            Errno::result(rc).map_err(|e| permission_error(io::Error::from(e)))?;
        }
        Ok(())
    }

    fn reseed(&mut self) -> io::Result<()> {
        // SAFETY: RNDRESEEDCRNG takes no argument.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), RNDRESEEDCRNG) };
        Errno::result(rc)
            .map(drop)
            .map_err(|e| permission_error(io::Error::from(e)))
    }

    fn initialised(&mut self) -> bool {
        crng_ready()
    }
}

/// The feeding policy, without I/O: see the [module docs](self).
#[derive(Debug)]
pub struct KernelFeeder {
    config: KernelConfig,
    due: Instant,
    stats: KernelStats,
    /// When a reseed was last asked for.
    reseeded_at: Option<Instant>,
    /// Bytes wanted at once for a new VM generation, and whether a reseed
    /// is owed once they are in.
    fresh: usize,
    reseed_owed: bool,
}

impl KernelFeeder {
    /// A feeder starting at `now`, in [`Mode::Topping`] (first mix due at
    /// once) if the CRNG is already `initialised`, else [`Mode::Filling`].
    pub fn new(config: KernelConfig, now: Instant, initialised: bool) -> Self {
        let mut feeder = KernelFeeder {
            config,
            due: now,
            stats: KernelStats::default(),
            reseeded_at: None,
            fresh: 0,
            reseed_owed: false,
        };
        if initialised {
            feeder.stats.mode = feeder.topping();
        }
        feeder
    }

    fn topping(&self) -> Mode {
        Mode::Topping {
            bytes: self.config.bytes_per_interval(),
            interval: self.config.interval,
        }
    }

    /// The current mode.
    pub fn mode(&self) -> &Mode {
        &self.stats.mode
    }

    /// The counters (and mode).
    pub fn stats(&self) -> &KernelStats {
        &self.stats
    }

    /// How many bytes the feeder wants at `now`: the configured `chunk`
    /// while filling, the configured `bytes_per_interval` when the next mix
    /// is due while topping, else 0.
    ///
    /// After [`KernelFeeder::fresh_generation`], at least the bytes it asked
    /// for, at once.
    pub fn wants(&self, now: Instant) -> usize {
        let paced = match self.stats.mode {
            Mode::Filling => self.config.chunk(),
            Mode::Topping { .. } if now >= self.due => self.config.bytes_per_interval(),
            Mode::Topping { .. } => 0,
        };
        paced.max(self.fresh)
    }

    /// This machine is a restored snapshot or a clone: want `bytes` fresh
    /// bytes now (at least one), and reseed once they are mixed in.
    pub fn fresh_generation(&mut self, bytes: usize) {
        self.fresh = bytes.max(1);
        self.reseed_owed = true;
        self.stats.new_generations += 1;
    }

    /// Takes the count of new VM generations seen so far (from
    /// `crate::vmgenid::watch`): if it moved, one
    /// [`KernelFeeder::fresh_generation`] of `bytes` (however many came at
    /// once); returns whether it moved.
    pub fn note_generations(&mut self, seen: u64, bytes: usize) -> bool {
        if seen <= self.stats.new_generations {
            return false;
        }
        self.fresh_generation(bytes);
        self.stats.new_generations = seen;
        true
    }

    /// When the feeder next wants bytes; `None` while filling (it always
    /// wants bytes then).
    pub fn next_wake(&self) -> Option<Instant> {
        match self.stats.mode {
            Mode::Filling => None,
            Mode::Topping { .. } => Some(self.due),
        }
    }

    /// Mixes `bytes` into `sink`, crediting `bits_per_byte` bits per byte
    /// (never more than 8), in writes of at most `chunk` bytes. While
    /// filling, `initialised()` is re-checked after each write. Failed writes
    /// are counted and the last error returned; their bytes are dropped, not
    /// retried.
    ///
    /// Once the CRNG was initialised before the write, a write that
    /// mixed anything in is followed by a reseed, unless one was asked for
    /// less than [`KernelConfig::reseed_interval`] ago (see the module docs).
    ///
    /// `bytes` must have passed the health checks.
    pub fn feed(
        &mut self,
        now: Instant,
        sink: &mut impl EntropySink,
        bytes: &[u8],
    ) -> io::Result<()> {
        self.feed_with(now, sink, bytes, None)
    }

    /// [`KernelFeeder::feed`], crediting `bits` bits for all of `bytes`
    /// instead of `bits_per_byte` per byte (`--kernel=auto`: the sum of
    /// each key's share). Never more than 8 bits per byte are credited; a
    /// sink that keeps no count ([`EntropySink::credits`]) gets none.
    pub fn feed_credited(
        &mut self,
        now: Instant,
        sink: &mut impl EntropySink,
        bytes: &[u8],
        bits: u64,
    ) -> io::Result<()> {
        self.feed_with(now, sink, bytes, Some(bits))
    }

    fn feed_with(
        &mut self,
        now: Instant,
        sink: &mut impl EntropySink,
        bytes: &[u8],
        total_bits: Option<u64>,
    ) -> io::Result<()> {
        let ready = matches!(self.stats.mode, Mode::Topping { .. });
        let mut mixed = false;
        let mut result = Ok(());
        for piece in bytes.chunks(self.config.chunk()) {
            let bits = match total_bits {
                _ if !sink.credits() => 0,
                None => self.config.credit(piece.len()),
                // This piece's share, rounded down, never above 8 per byte.
                Some(total) => {
                    let share =
                        u128::from(total) * piece.len() as u128 / bytes.len().max(1) as u128;
                    let share = share.min(8 * piece.len() as u128);
                    u32::try_from(share).unwrap_or(u32::MAX)
                }
            };
            match sink.add_entropy(piece, bits) {
                Ok(()) => {
                    self.stats.bytes_written += piece.len() as u64;
                    self.stats.bits_credited += u64::from(bits);
                    if bits == 0 {
                        self.stats.bytes_uncredited += piece.len() as u64;
                    }
                    self.fresh = self.fresh.saturating_sub(piece.len());
                    mixed |= !piece.is_empty();
                }
                Err(e) => {
                    self.stats.ioctl_failures += 1;
                    // A new generation's bytes are asked for once: a kernel
                    // refusing them must not make the feeder spin.
                    self.fresh = 0;
                    result = Err(e);
                }
            }
            if self.stats.mode == Mode::Filling && sink.initialised() {
                self.stats.mode = self.topping();
            }
        }
        if matches!(self.stats.mode, Mode::Topping { .. }) {
            self.due = now + self.config.interval;
        }
        if self.reseed_owed && self.fresh == 0 && mixed {
            // A new generation: reseed now, whatever the interval (and
            // whatever the mode: the clone's CRNG is its sibling's).
            self.reseed_owed = false;
            self.reseed(now, sink, true);
        } else if ready && mixed {
            self.reseed(now, sink, false);
        }
        result
    }

    /// Asks for a reseed, unless reseeds are off or one was asked for too
    /// recently (unless `forced`); counts the outcome, and logs the first
    /// failure.
    fn reseed(&mut self, now: Instant, sink: &mut impl EntropySink, forced: bool) {
        let every = self.config.reseed_interval;
        let recent = self
            .reseeded_at
            .is_some_and(|t| now.saturating_duration_since(t) < every);
        if !sink.can_reseed() || (!forced && (every.is_zero() || recent)) {
            return;
        }
        self.reseeded_at = Some(now);
        match sink.reseed() {
            Ok(()) => self.stats.reseeds += 1,
            Err(e) => {
                self.stats.reseed_failures += 1;
                if self.stats.reseed_failures == 1 {
                    tracing::warn!(
                        "kernel: RNDRESEEDCRNG failed ({e}): bytes mixed in wait for the kernel's \
                         own reseed (within 60 s); feeding goes on, and further failures are \
                         only counted"
                    );
                }
            }
        }
    }
}

/// Feeds `/dev/random` from `source` until `source` closes.
///
/// Blocks are taken only when the feeder wants bytes (backpressure
/// otherwise); `stats` is updated after every write. Fails at once when
/// `/dev/random` can't be fed (not root) and when an ioctl is refused for
/// lack of permission; other ioctl failures are counted and logged.
///
/// Every block in `source` must have passed the health checks.
///
/// With [`KernelConfig::auto`], `keys.credits` gives each key's credit.
pub async fn run(
    config: KernelConfig,
    source: mpsc::Receiver<KeyBlock>,
    stats: Arc<Mutex<KernelStats>>,
    keys: KeyLookups,
) -> io::Result<()> {
    let sink = RandomDevice::open()?;
    let generations = crate::vmgenid::watch_or_say("kernel");
    run_with(config, source, stats, sink, keys, generations).await
}

/// What the kernel output asks of the keys as it goes.
#[derive(Clone)]
pub struct KeyLookups {
    /// How many times each key's health gate has closed (to withdraw bytes
    /// released before a closing).
    pub closes: GateCloses,
    /// With `--kernel=auto`: the bits per byte to credit each key's bytes
    /// with; without, unused.
    pub credits: Option<KeyCredits>,
}

impl KeyLookups {
    /// Fixed credit: only the gates' closings are looked up.
    pub fn fixed(closes: GateCloses) -> Self {
        KeyLookups {
            closes,
            credits: None,
        }
    }
}

/// The kernel output's side of withdrawing bytes whose key's gate closed
/// after they were released (see [`crate::keys::driver::GATE_CLOSINGS`]).
#[derive(Default)]
struct Withdrawals {
    /// [`crate::keys::driver::GATE_CLOSINGS`] at the last check.
    closings_seen: u64,
    /// For each key with bytes waiting: its gate's closings when they were
    /// released.
    epoch: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    by_key: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
}

impl Withdrawals {
    /// Queues a block, unless its key's gate closed after its release.
    fn take_in(
        &mut self,
        block: KeyBlock,
        pending: &mut WipeQueue,
        keys: &mut crate::outputs::egd::Runs,
        closes: &GateCloses,
    ) {
        let (data, key, epoch) = block;
        let data = data.bytes();
        self.check(pending, keys, closes);
        if crate::keys::driver::any_gate_closed() && epoch < closes(&key) {
            *self.by_key.entry(key).or_default() += data.len() as u64;
        } else {
            pending.extend_from_slice(data);
            keys.push_back(key, data.len());
            self.epoch.insert(key, epoch);
        }
    }

    /// After any gate closed: drops waiting bytes released before their
    /// key's gate last closed.
    fn check(
        &mut self,
        pending: &mut WipeQueue,
        keys: &mut crate::outputs::egd::Runs,
        closes: &GateCloses,
    ) {
        let now = crate::keys::driver::GATE_CLOSINGS.load(std::sync::atomic::Ordering::Acquire);
        if now == self.closings_seen {
            return;
        }
        self.closings_seen = now;
        let epochs = &self.epoch;
        let removed = keys.withdraw(pending, |k| epochs.get(k).is_some_and(|&e| e < closes(k)));
        for (key, n) in removed {
            self.epoch.remove(&key);
            *self.by_key.entry(key).or_default() += n as u64;
        }
    }
}

/// A verified block, the key it came from, and how many times that key's
/// health gate had closed when it was released (a block released before
/// a later closing is withdrawn, never credited).
pub type KeyBlock = (crate::wipe::SecretBlock, ekey_proto::keys::Serial, u64);

/// [`run`] with any [`EntropySink`].
pub async fn run_with(
    config: KernelConfig,
    mut source: mpsc::Receiver<KeyBlock>,
    stats: Arc<Mutex<KernelStats>>,
    mut sink: impl EntropySink,
    keys: KeyLookups,
    mut generations: Option<tokio::sync::watch::Receiver<u64>>,
) -> io::Result<()> {
    let KeyLookups { closes, credits } = keys;
    // With auto and nothing to look estimates up in, nothing is credited.
    let credits = config.auto.then(|| {
        credits.unwrap_or_else(|| Arc::new(|_: &ekey_proto::keys::Serial| 0u8) as KeyCredits)
    });
    let mut feeder = KernelFeeder::new(config, Instant::now(), sink.initialised());
    tracing::info!("kernel: {}", feeder.mode());
    *stats.lock().unwrap_or_else(|e| e.into_inner()) = feeder.stats().clone();
    // Room for the most it usually holds (a request and a block); it wipes
    // what leaves it, and its old buffer if it ever grows.
    let most = feeder
        .config
        .chunk()
        .max(feeder.config.bytes_per_interval())
        + 32;
    let mut pending = WipeQueue::with_capacity(most);
    let mut pending_keys = crate::outputs::egd::Runs::default();
    let mut books = Books::default();
    let mut withdrawn = Withdrawals::default();
    let chunk = feeder.config.chunk();
    loop {
        note_generations(&mut feeder, generations.as_ref());
        let want = feeder.wants(Instant::now());
        if want == 0 {
            idle(&feeder, generations.as_mut()).await;
            continue;
        }
        // Filling: write whatever the key has delivered so far (at least one
        // block); topping: wait for exactly `want` bytes.
        let need = if *feeder.mode() == Mode::Filling {
            1
        } else {
            want
        };
        while pending.len() < need {
            match source.recv().await {
                Some(block) => {
                    withdrawn.take_in(block, &mut pending, &mut pending_keys, &closes);
                }
                None => return Ok(()),
            }
        }
        while pending.len() < want {
            match source.try_recv() {
                Ok(block) => withdrawn.take_in(block, &mut pending, &mut pending_keys, &closes),
                Err(_) => break,
            }
        }
        // A key's gate may have closed while its bytes waited here.
        withdrawn.check(&mut pending, &mut pending_keys, &closes);
        if pending.is_empty() {
            continue;
        }
        let before = feeder.mode().clone();
        let result = write_pending(
            &mut feeder,
            &mut sink,
            &mut pending,
            &mut pending_keys,
            &mut books,
            credits.as_ref(),
            (want, chunk),
        );
        publish_stats(&stats, &feeder, &books, &withdrawn);
        if *feeder.mode() != before {
            tracing::info!("kernel: {}", feeder.mode());
        }
        if let Err(e) = result {
            if e.kind() == io::ErrorKind::PermissionDenied {
                return Err(e);
            }
            tracing::warn!("kernel: RNDADDENTROPY failed: {e}");
        }
    }
}

/// Waits until the feeder's next mix is due, or a new VM generation.
async fn idle(feeder: &KernelFeeder, generations: Option<&mut tokio::sync::watch::Receiver<u64>>) {
    if let Some(wake) = feeder.next_wake() {
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {}
            () = crate::vmgenid::next(generations) => {}
        }
    }
}

/// Tells `feeder` of new VM generations, and logs them.
fn note_generations(
    feeder: &mut KernelFeeder,
    generations: Option<&tokio::sync::watch::Receiver<u64>>,
) {
    let seen = generations.map_or(0, |g| *g.borrow());
    if feeder.note_generations(seen, ON_VMGENID_BYTES) {
        tracing::info!(
            "kernel: new VM generation ID (this host was restored from a snapshot or \
             cloned): mixing in {ON_VMGENID_BYTES} fresh bytes, then reseeding"
        );
    }
}

/// What the kernel took of each key: bytes, bits credited, and (auto) the
/// credit per byte its latest bytes got.
#[derive(Default)]
struct Books {
    bytes: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    bits: std::collections::BTreeMap<ekey_proto::keys::Serial, u64>,
    credit: std::collections::BTreeMap<ekey_proto::keys::Serial, u8>,
}

/// Shows the feeder's counters in `stats`, with what the kernel accepted
/// of each key (`books`) and what was withdrawn of each.
fn publish_stats(
    stats: &Mutex<KernelStats>,
    feeder: &KernelFeeder,
    books: &Books,
    withdrawn: &Withdrawals,
) {
    let mut st = stats.lock().unwrap_or_else(|e| e.into_inner());
    *st = feeder.stats().clone();
    st.bytes_by_key.clone_from(&books.bytes);
    st.bits_by_key.clone_from(&books.bits);
    st.credit_by_key.clone_from(&books.credit);
    st.withdrawn_by_key = withdrawn.by_key.clone();
}

/// Writes up to `want` of the `pending` bytes (and their keys) to the
/// kernel, one write per `chunk` bytes, so that each key is booked in
/// `books` only the bytes the kernel accepted and the bits they were
/// credited (each key's from `credits` with `--kernel=auto`); the error
/// of the last write that failed, if any.
fn write_pending(
    feeder: &mut KernelFeeder,
    sink: &mut impl EntropySink,
    pending: &mut WipeQueue,
    pending_keys: &mut crate::outputs::egd::Runs,
    books: &mut Books,
    credits: Option<&KeyCredits>,
    (want, chunk): (usize, usize),
) -> io::Result<()> {
    let take = want.min(pending.len());
    let mut bytes = Zeroizing::new(vec![0u8; take]);
    pending.copy_front(&mut bytes);
    pending.discard_front(take);
    let mut result = Ok(());
    let now = Instant::now();
    let most = feeder.config.bits_per_byte.min(8);
    let counted = sink.credits();
    for piece in bytes.chunks(chunk) {
        let keys = pending_keys.take_front(piece.len());
        // Each run's bits per byte: its key's estimate, or the fixed credit.
        let per_byte: Vec<u8> = keys
            .iter()
            .map(|(key, _)| credits.map_or(most, |c| c(key).min(most)))
            .collect();
        let written = match credits {
            Some(_) => {
                let bits = keys
                    .iter()
                    .zip(&per_byte)
                    .map(|((_, n), &b)| *n as u64 * u64::from(b))
                    .sum();
                feeder.feed_credited(now, sink, piece, bits)
            }
            None => feeder.feed(now, sink, piece),
        };
        match written {
            Ok(()) => {
                for ((key, n), b) in keys.into_iter().zip(per_byte) {
                    *books.bytes.entry(key).or_insert(0) += n as u64;
                    let bits = if counted { n as u64 * u64::from(b) } else { 0 };
                    *books.bits.entry(key).or_insert(0) += bits;
                    if credits.is_some() {
                        books.credit.insert(key, b);
                    }
                }
            }
            Err(e) => result = Err(e),
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A block of `v` bytes from `key`, released at gate epoch `epoch`.
    fn kb(v: u8, key: ekey_proto::keys::Serial, epoch: u64) -> KeyBlock {
        (crate::wipe::SecretBlock::take(&mut [v; 32]), key, epoch)
    }

    /// A fake kernel: records writes, initialises after `init_after` bytes.
    #[derive(Default)]
    struct FakeSink {
        written: Vec<(usize, u32)>,
        total: usize,
        init_after: usize,
        fail: bool,
        /// How many writes there had been at each reseed.
        reseeds: Vec<usize>,
        reseed_fails: bool,
    }

    impl EntropySink for FakeSink {
        fn add_entropy(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
            if self.fail {
                return Err(io::Error::other("fake failure"));
            }
            self.written.push((bytes.len(), bits));
            self.total += bytes.len();
            Ok(())
        }
        fn initialised(&mut self) -> bool {
            self.total >= self.init_after
        }
        fn reseed(&mut self) -> io::Result<()> {
            if self.reseed_fails {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            self.reseeds.push(self.written.len());
            Ok(())
        }
    }

    #[test]
    fn request_code_matches_linux() {
        let expected: nix::sys::ioctl::ioctl_num_type = 0x4008_5203;
        assert_eq!(RNDADDENTROPY, expected);
    }

    #[test]
    fn bits_per_byte_validated() {
        for bad in [9, 200] {
            let err = KernelConfig::new(bad).unwrap_err();
            assert_eq!(err, ConfigError::BitsPerByte(bad));
            let err = err.to_string();
            assert!(err.contains("out of range (0..=8)"), "{err}");
            assert!(err.contains(&bad.to_string()), "{err}");
        }
        for good in 0..=8 {
            assert_eq!(KernelConfig::new(good).unwrap().bits_per_byte, good);
        }
        assert!(
            KernelConfig::default()
                .with_pace(0, Duration::from_secs(1))
                .is_err()
        );
        assert!(
            KernelConfig::default()
                .with_pace(1, Duration::ZERO)
                .is_err()
        );
    }

    #[test]
    fn mode_display() {
        assert_eq!(
            Mode::Filling.to_string(),
            "filling the kernel pool (CRNG not ready)"
        );
        let topping = Mode::Topping {
            bytes: 64,
            interval: Duration::from_secs(10),
        };
        assert_eq!(topping.to_string(), "mixing in 64 bytes every 10 s");
        let fast = Mode::Topping {
            bytes: 8,
            interval: Duration::from_millis(500),
        };
        assert_eq!(fast.to_string(), "mixing in 8 bytes every 500 ms");
    }

    #[test]
    fn fills_until_initialised_then_tops_up() {
        let t0 = Instant::now();
        let mut sink = FakeSink {
            init_after: 600,
            ..FakeSink::default()
        };
        let mut feeder = KernelFeeder::new(KernelConfig::default(), t0, sink.initialised());
        assert_eq!(*feeder.mode(), Mode::Filling);
        assert_eq!(feeder.next_wake(), None);
        // Filling: wants a chunk at any time, as fast as it comes.
        for i in 0..3 {
            assert_eq!(feeder.mode(), &Mode::Filling, "after {i} chunks");
            assert_eq!(feeder.wants(t0), 256);
            feeder.feed(t0, &mut sink, &[0x55; 256]).unwrap();
        }
        // 768 bytes written: the kernel said "initialised" after the third.
        assert_eq!(
            *feeder.mode(),
            Mode::Topping {
                bytes: 64,
                interval: Duration::from_secs(10)
            }
        );
        assert_eq!(feeder.wants(t0), 0);
        assert_eq!(feeder.next_wake(), Some(t0 + Duration::from_secs(10)));
        assert_eq!(feeder.stats().bytes_written, 768);
        assert_eq!(sink.written, vec![(256, 256 * 7); 3]);
    }

    #[test]
    fn starts_topping_when_already_initialised() {
        let t0 = Instant::now();
        let feeder = KernelFeeder::new(KernelConfig::default(), t0, true);
        assert!(matches!(feeder.mode(), Mode::Topping { .. }));
        assert_eq!(feeder.wants(t0), 64, "first mix is due at once");
    }

    #[test]
    fn topping_paces_exactly_bytes_per_interval() {
        let t0 = Instant::now();
        let config = KernelConfig::default();
        let interval = config.interval;
        let mut sink = FakeSink::default();
        let mut feeder = KernelFeeder::new(config, t0, true);
        // Simulate 100 s in 100 ms steps, feeding whatever is wanted.
        let mut now = t0;
        while now < t0 + Duration::from_secs(100) {
            let want = feeder.wants(now);
            if want > 0 {
                assert_eq!(want, 64);
                feeder.feed(now, &mut sink, &vec![0xaa; want]).unwrap();
                assert_eq!(feeder.wants(now), 0);
                assert_eq!(feeder.wants(now + interval - Duration::from_millis(1)), 0);
                assert_eq!(feeder.next_wake(), Some(now + interval));
            }
            now += Duration::from_millis(100);
        }
        // Mixes at 0, 10, ..., 90 s.
        assert_eq!(sink.written, vec![(64, 64 * 7); 10]);
        assert_eq!(feeder.stats().bytes_written, 640);
        assert_eq!(feeder.stats().bits_credited, 640 * 7);
    }

    #[test]
    fn reseeds_follow_mixing_writes_once_ready_and_never_too_often() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // Mixes every second, reseeds at most every 2.5 s.
        let config = KernelConfig::default()
            .with_pace(64, ms(1000))
            .unwrap()
            .with_reseed(ms(2500));
        // The CRNG initialises after 512 bytes.
        let mut sink = FakeSink {
            init_after: 512,
            ..FakeSink::default()
        };
        let mut feeder = KernelFeeder::new(config, t0, false);
        let mut now = t0;
        while now < t0 + Duration::from_secs(10) {
            let want = feeder.wants(now);
            if want > 0 {
                feeder.feed(now, &mut sink, &vec![0x55; want]).unwrap();
            }
            now += ms(100);
        }
        // Filling: 256 bytes at 0 s and 256 at 0.1 s, no reseed (the kernel
        // reseeds by itself as it initialises); then mixes at 1.1, 2.1, ...,
        // 9.1 s (writes 3..=11), reseeds after those at 1.1, 4.1 and 7.1 s
        // (at least 2.5 s apart): after writes 3, 6 and 9.
        assert_eq!(sink.written.len(), 11);
        assert_eq!(sink.reseeds, [3, 6, 9]);
        assert_eq!(feeder.stats().reseeds, 3);
        assert_eq!(feeder.stats().reseed_failures, 0);

        // Zero: never.
        let mut sink = FakeSink::default();
        let mut feeder = KernelFeeder::new(KernelConfig::default().with_reseed(ms(0)), t0, true);
        feeder.feed(t0, &mut sink, &[1; 64]).unwrap();
        assert!(sink.reseeds.is_empty());

        // An empty write mixes nothing: no reseed.
        let mut feeder = KernelFeeder::new(KernelConfig::default(), t0, true);
        feeder.feed(t0, &mut sink, &[]).unwrap();
        assert_eq!(feeder.stats().reseeds, 0);
    }

    #[test]
    fn a_new_generation_fetches_at_once_and_reseeds_whatever_the_pace() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        // Reseeds off, mixes every 10 s: neither stops a new generation.
        let config = KernelConfig::default().with_reseed(s(0));
        let mut sink = FakeSink::default();
        let mut feeder = KernelFeeder::new(config, t0, true);
        feeder.feed(t0, &mut sink, &[1; 64]).unwrap();
        assert_eq!(feeder.wants(t0 + s(3)), 0);
        assert!(sink.reseeds.is_empty());
        feeder.fresh_generation(100);
        assert_eq!(feeder.wants(t0 + s(3)), 100);
        // Part of it: still owed, no reseed yet.
        feeder.feed(t0 + s(3), &mut sink, &[2; 60]).unwrap();
        assert_eq!(feeder.wants(t0 + s(3)), 40);
        assert!(sink.reseeds.is_empty());
        feeder.feed(t0 + s(3), &mut sink, &[3; 40]).unwrap();
        assert_eq!(sink.reseeds, [3], "reseeded after the third write");
        assert_eq!(feeder.wants(t0 + s(3)), 0);
        // The pace goes on from the last mix.
        assert_eq!(feeder.wants(t0 + s(13)), 64);
        let st = feeder.stats();
        assert_eq!(
            (st.new_generations, st.reseeds, st.bytes_written),
            (1, 1, 164)
        );
        // While filling too.
        let mut sink = FakeSink {
            init_after: usize::MAX,
            ..FakeSink::default()
        };
        let mut feeder = KernelFeeder::new(KernelConfig::default(), t0, false);
        feeder.fresh_generation(64);
        assert_eq!(feeder.wants(t0), 256);
        feeder.feed(t0, &mut sink, &[4; 256]).unwrap();
        assert_eq!(sink.reseeds, [1]);
    }

    #[test]
    fn failed_reseeds_are_counted_paced_and_never_stop_the_output() {
        let t0 = Instant::now();
        let config = KernelConfig::default()
            .with_pace(64, Duration::from_secs(1))
            .unwrap();
        let mut sink = FakeSink {
            reseed_fails: true,
            ..FakeSink::default()
        };
        let mut feeder = KernelFeeder::new(config, t0, true);
        for s in 0..30 {
            let now = t0 + Duration::from_secs(s);
            assert_eq!(feeder.wants(now), 64);
            feeder.feed(now, &mut sink, &[7; 64]).unwrap();
        }
        // 30 mixes, a reseed tried every 10 s (0, 10, 20 s), each failing.
        let st = feeder.stats();
        assert_eq!(
            (st.bytes_written, st.reseeds, st.reseed_failures),
            (30 * 64, 0, 3)
        );
    }

    #[test]
    fn credit_is_bits_per_byte_and_never_above_eight() {
        let t0 = Instant::now();
        for bpb in 0..=8 {
            let mut sink = FakeSink::default();
            let mut feeder = KernelFeeder::new(KernelConfig::new(bpb).unwrap(), t0, false);
            feeder.feed(t0, &mut sink, &[1; 100]).unwrap();
            assert_eq!(sink.written, vec![(100, 100 * u32::from(bpb))]);
            assert_eq!(feeder.stats().bits_credited, 100 * u64::from(bpb));
        }
        // A config built by hand with a bogus value is still capped.
        let config = KernelConfig {
            bits_per_byte: 200,
            ..KernelConfig::default()
        };
        let mut sink = FakeSink::default();
        let mut feeder = KernelFeeder::new(config, t0, false);
        feeder.feed(t0, &mut sink, &[1; 600]).unwrap();
        // Split into chunks of 256.
        assert_eq!(sink.written, vec![(256, 2048), (256, 2048), (88, 704)]);
        assert_eq!(feeder.stats().bits_credited, 600 * 8);
    }

    #[test]
    fn ioctl_failures_counted() {
        let t0 = Instant::now();
        let mut sink = FakeSink {
            fail: true,
            ..FakeSink::default()
        };
        let mut feeder = KernelFeeder::new(KernelConfig::default(), t0, true);
        assert!(feeder.feed(t0, &mut sink, &[0; 64]).is_err());
        assert_eq!(feeder.stats().ioctl_failures, 1);
        assert_eq!(feeder.stats().bytes_written, 0);
        assert_eq!(feeder.stats().bits_credited, 0);
        // A failed mix still waits for the next interval (no hot retry loop).
        assert_eq!(feeder.wants(t0), 0);
        // While filling, each failed chunk counts.
        let mut feeder = KernelFeeder::new(KernelConfig::default(), t0, false);
        sink.init_after = usize::MAX;
        assert!(feeder.feed(t0, &mut sink, &[0; 600]).is_err());
        assert_eq!(feeder.stats().ioctl_failures, 3);
    }

    #[tokio::test]
    async fn run_with_fake_sink_fills_then_paces() {
        let (tx, rx) = mpsc::channel(64);
        let stats = Arc::new(Mutex::new(KernelStats::default()));
        let config = KernelConfig {
            interval: Duration::from_secs(3600),
            ..KernelConfig::default()
        };
        let sink = FakeSink {
            init_after: 64,
            ..FakeSink::default()
        };
        let never: GateCloses = Arc::new(|_: &ekey_proto::keys::Serial| 0);
        let task = tokio::spawn(run_with(
            config,
            rx,
            stats.clone(),
            sink,
            KeyLookups::fixed(never),
            None,
        ));
        // Filling takes whatever comes; then one topping mix is due after
        // an hour, so the rest stays in the channel (backpressure).
        // Two keys, alternating blocks.
        let keys = [
            ekey_proto::keys::Serial([1; 12]),
            ekey_proto::keys::Serial([2; 12]),
        ];
        for i in 0..10 {
            tx.send(kb(7, keys[i % 2], 0)).await.unwrap();
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = stats.lock().unwrap().clone();
        assert!(matches!(s.mode, Mode::Topping { .. }), "{s:?}");
        assert!(s.bytes_written >= 64 && s.bytes_written < 320, "{s:?}");
        assert_eq!(s.bits_credited, s.bytes_written * 7);
        // Each key is booked exactly its accepted bytes: the written bytes
        // are the first ones sent, alternating key by key in 32s.
        let n = s.bytes_written;
        let first = (0..n).filter(|b| (b / 32) % 2 == 0).count() as u64;
        assert_eq!(s.bytes_by_key.get(&keys[0]).copied().unwrap_or(0), first);
        assert_eq!(
            s.bytes_by_key.get(&keys[1]).copied().unwrap_or(0),
            n - first
        );
        assert!(tx.capacity() < 64, "unwanted blocks stay queued");
        task.abort();
    }

    #[tokio::test]
    async fn blocks_released_before_their_gate_closed_are_never_credited() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (tx, rx) = mpsc::channel(64);
        let stats = Arc::new(Mutex::new(KernelStats::default()));
        // Topping from the start: 64 bytes every 200 ms.
        let config = KernelConfig {
            interval: Duration::from_millis(200),
            ..KernelConfig::default()
        };
        let sink = FakeSink::default();
        let (a, b) = (
            ekey_proto::keys::Serial([1; 12]),
            ekey_proto::keys::Serial([2; 12]),
        );
        let a_closes = Arc::new(AtomicU64::new(0));
        let closes: GateCloses = {
            let a_closes = a_closes.clone();
            Arc::new(move |k: &ekey_proto::keys::Serial| {
                if *k == a {
                    a_closes.load(Ordering::SeqCst)
                } else {
                    0
                }
            })
        };
        let task = tokio::spawn(run_with(
            config,
            rx,
            stats.clone(),
            sink,
            KeyLookups::fixed(closes),
            None,
        ));
        tx.send(kb(1, a, 0)).await.unwrap();
        tx.send(kb(2, b, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(
            (s.bytes_by_key.get(&a), s.bytes_by_key.get(&b)),
            (Some(&32), Some(&32))
        );

        // Key A's gate closes. Its block released before (epoch 0) is
        // withdrawn; its block released after (epoch 1) is taken.
        a_closes.store(1, Ordering::SeqCst);
        crate::keys::driver::GATE_CLOSINGS.fetch_add(1, Ordering::SeqCst);
        tx.send(kb(3, a, 0)).await.unwrap();
        tx.send(kb(4, b, 0)).await.unwrap();
        tx.send(kb(5, a, 1)).await.unwrap();
        tx.send(kb(6, b, 0)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(350)).await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.withdrawn_by_key.get(&a), Some(&32), "{s:?}");
        assert_eq!(s.withdrawn_by_key.get(&b), None);
        assert_eq!(s.bytes_by_key.get(&a), Some(&64), "{s:?}");
        assert!(s.bytes_by_key.get(&b).copied().unwrap_or(0) >= 64, "{s:?}");
        assert_eq!(s.bits_credited, s.bytes_written * 7);
        task.abort();
    }

    #[test]
    fn auto_credits_seven_eighths_of_the_estimate_rounded_down() {
        for (estimate, bits) in [
            (None, 0),
            (Some(f64::NAN), 0),
            (Some(-1.0), 0),
            (Some(0.0), 0),
            (Some(1.14), 0),
            (Some(1.15), 1),
            (Some(2.3), 2),
            (Some(6.857), 5),
            (Some(6.858), 6),
            (Some(7.12), 6),
            (Some(7.999), 6),
            (Some(8.0), 7),
            (Some(9.0), 7),
            (Some(f64::INFINITY), 0),
        ] {
            assert_eq!(auto_bits(estimate), bits, "{estimate:?}");
        }
        let auto = KernelConfig::for_credit(Credit::Auto).unwrap();
        assert!(auto.auto);
        assert_eq!(auto.bits_per_byte, AUTO_MAX_BITS);
        assert_eq!(
            KernelConfig::for_credit(Credit::Bits(9)),
            Err(ConfigError::BitsPerByte(9))
        );
        assert_eq!("auto".parse(), Ok(Credit::Auto));
        assert_eq!(Credit::Auto.to_string(), "auto");
        assert_eq!("5".parse::<Credit>().map(|c| c.to_string()), Ok("5".into()));
    }

    #[test]
    fn feed_credited_shares_its_bits_and_never_credits_above_eight() {
        let t0 = Instant::now();
        let config = KernelConfig {
            chunk: 100,
            ..KernelConfig::default()
        };
        let mut sink = FakeSink::default();
        let mut feeder = KernelFeeder::new(config, t0, false);
        feeder
            .feed_credited(t0, &mut sink, &[0; 250], 1000)
            .unwrap();
        assert_eq!(sink.written, vec![(100, 400), (100, 400), (50, 200)]);
        feeder.feed_credited(t0, &mut sink, &[0; 10], 1000).unwrap();
        assert_eq!(sink.written.last(), Some(&(10, 80)));
        feeder.feed_credited(t0, &mut sink, &[0; 30], 0).unwrap();
        let s = feeder.stats();
        assert_eq!(s.bits_credited, 1000 + 80);
        assert_eq!(s.bytes_uncredited, 30);
        assert_eq!(s.bytes_written, 290);
    }

    #[tokio::test]
    async fn auto_without_estimates_to_look_up_credits_nothing() {
        let (tx, rx) = mpsc::channel(8);
        let stats = Arc::new(Mutex::new(KernelStats::default()));
        let sink = FakeSink {
            init_after: usize::MAX,
            ..FakeSink::default()
        };
        let config = KernelConfig::for_credit(Credit::Auto).unwrap();
        let never: GateCloses = Arc::new(|_: &ekey_proto::keys::Serial| 0);
        let keys = KeyLookups::fixed(never);
        let task = tokio::spawn(run_with(config, rx, stats.clone(), sink, keys, None));
        let key = ekey_proto::keys::Serial([3; 12]);
        for _ in 0..8 {
            tx.send(kb(9, key, 0)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.bytes_written, 256, "{s:?}");
        assert_eq!((s.bits_credited, s.bytes_uncredited), (0, 256), "{s:?}");
        task.abort();
    }

    #[tokio::test]
    async fn auto_credits_each_key_by_its_estimate() {
        use std::sync::atomic::{AtomicU8, Ordering};
        let (tx, rx) = mpsc::channel(64);
        let stats = Arc::new(Mutex::new(KernelStats::default()));
        // Filling throughout, in writes of 64 bytes (two blocks).
        let config = KernelConfig {
            chunk: 64,
            ..KernelConfig::for_credit(Credit::Auto).unwrap()
        };
        let sink = FakeSink {
            init_after: usize::MAX,
            ..FakeSink::default()
        };
        let (a, b) = (
            ekey_proto::keys::Serial([1; 12]),
            ekey_proto::keys::Serial([2; 12]),
        );
        // A has no estimate yet; B's gives 6 bits per byte.
        let a_bits = Arc::new(AtomicU8::new(0));
        let credits: KeyCredits = {
            let a_bits = a_bits.clone();
            Arc::new(move |k: &ekey_proto::keys::Serial| {
                if *k == a {
                    a_bits.load(Ordering::SeqCst)
                } else {
                    6
                }
            })
        };
        let keys = KeyLookups {
            closes: Arc::new(|_: &ekey_proto::keys::Serial| 0),
            credits: Some(credits),
        };
        let task = tokio::spawn(run_with(config, rx, stats.clone(), sink, keys, None));
        let settle = || tokio::time::sleep(Duration::from_millis(50));
        // Two of A's blocks: one write, no credit.
        tx.send(kb(1, a, 0)).await.unwrap();
        tx.send(kb(1, a, 0)).await.unwrap();
        settle().await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(
            (s.bytes_written, s.bits_credited, s.bytes_uncredited),
            (64, 0, 64),
            "{s:?}"
        );
        // A and B in one write: only B's half is credited.
        tx.send(kb(2, a, 0)).await.unwrap();
        tx.send(kb(3, b, 0)).await.unwrap();
        settle().await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(
            (s.bytes_written, s.bits_credited, s.bytes_uncredited),
            (128, 32 * 6, 64),
            "{s:?}"
        );
        // A's estimate arrives, and would give 8: auto gives at most 7.
        a_bits.store(8, Ordering::SeqCst);
        tx.send(kb(4, a, 0)).await.unwrap();
        tx.send(kb(5, b, 0)).await.unwrap();
        settle().await;
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.bits_credited, 32 * 6 + 32 * 7 + 32 * 6, "{s:?}");
        assert_eq!(s.bits_by_key.get(&a), Some(&(32 * 7)));
        assert_eq!(s.bits_by_key.get(&b), Some(&(2 * 32 * 6)));
        assert_eq!(s.bytes_by_key.get(&a), Some(&(4 * 32)));
        assert_eq!(s.credit_by_key.get(&a), Some(&7));
        assert_eq!(s.credit_by_key.get(&b), Some(&6));
        assert_eq!(
            s.bits_by_key.values().sum::<u64>(),
            s.bits_credited,
            "the keys' books add up"
        );
        task.abort();
    }

    /// Issues a real RNDADDENTROPY when run as root (tests run as root here
    /// and in CI).
    #[test]
    fn root_feeds_the_kernel() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: not root");
            return;
        }
        let mut dev = match RandomDevice::open() {
            Ok(dev) => dev,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                println!("skipped: /dev/random not available: {e}");
                return;
            }
            // Root without CAP_SYS_ADMIN (e.g. a default container): the
            // probe ioctl was refused; check the error is the clear one.
            Err(e) if !has_cap_sys_admin() => {
                assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
                assert!(e.to_string().contains(NEEDS_ROOT), "{e}");
                println!("skipped: root but no CAP_SYS_ADMIN ({e})");
                return;
            }
            Err(e) => panic!("open /dev/random as root: {e}"),
        };
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).unwrap();
        let t0 = Instant::now();
        let initialised = dev.initialised();
        let mut feeder = KernelFeeder::new(KernelConfig::new(7).unwrap(), t0, initialised);
        feeder
            .feed(t0, &mut dev, &bytes)
            .expect("RNDADDENTROPY as root");
        let stats = feeder.stats();
        assert_eq!(stats.bytes_written, 32);
        assert_eq!(stats.bits_credited, 32 * 7);
        assert_eq!(stats.ioctl_failures, 0);
        // Direct call too, crediting 7 bits/byte.
        dev.add_entropy(&bytes, 32 * 7)
            .expect("RNDADDENTROPY as root");
        println!("fed 2 x 32 bytes at 7 bits/byte; mode: {}", feeder.mode());
    }

    /// As root, on a machine whose CRNG is ready: mixing writes are
    /// followed by real RNDRESEEDCRNG calls, no more often than the
    /// interval (the counters are the ioctls' own results).
    #[test]
    fn root_reseeds_the_crng_after_mixing_writes() {
        if !nix::unistd::geteuid().is_root() || !has_cap_sys_admin() {
            println!("skipped: RNDRESEEDCRNG needs root with CAP_SYS_ADMIN");
            return;
        }
        let mut dev = RandomDevice::open().expect("open /dev/random as root");
        if !dev.initialised() {
            println!("skipped: this machine's CRNG is not ready yet");
            return;
        }
        let ms = Duration::from_millis;
        let config = KernelConfig::new(7)
            .unwrap()
            .with_pace(32, ms(20))
            .unwrap()
            .with_reseed(ms(300));
        let t0 = Instant::now();
        let mut feeder = KernelFeeder::new(config, t0, true);
        let mut bytes = [0u8; 32];
        let mut writes = 0;
        while t0.elapsed() < ms(1000) {
            let now = Instant::now();
            if feeder.wants(now) > 0 {
                getrandom::fill(&mut bytes).unwrap();
                feeder.feed(now, &mut dev, &bytes).expect("RNDADDENTROPY");
                writes += 1;
            }
            std::thread::sleep(ms(5));
        }
        let st = feeder.stats();
        assert_eq!(st.reseed_failures, 0, "RNDRESEEDCRNG refused");
        // About 1000 / 300 + 1: at 0, 300, 600, 900 ms (a little later each,
        // as mixes come every 20 ms or so).
        assert!(
            (3..=4).contains(&st.reseeds),
            "{} reseeds in {writes} writes",
            st.reseeds
        );
        assert!(
            writes > 3 * st.reseeds,
            "{writes} writes, {} reseeds",
            st.reseeds
        );
    }

    /// Whether CAP_SYS_ADMIN (bit 21) is in this process's effective set.
    fn has_cap_sys_admin() -> bool {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .is_some_and(|caps| caps & (1 << 21) != 0)
    }

    #[test]
    fn non_root_gets_a_clear_error() {
        let err = permission_error(io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
        assert!(
            err.to_string()
                .contains("feeding the kernel needs root (CAP_SYS_ADMIN)")
        );
    }
}
