//! Feeding the BSD kernels (`--kernel` on FreeBSD, OpenBSD and NetBSD).
//!
//! * **FreeBSD and OpenBSD**: the bytes are written to `/dev/random` (as
//!   root). Neither kernel keeps an entropy count, so there is no credit
//!   to give: FreeBSD's Fortuna hashes the bytes into its pools, which
//!   reach the generator at its next reseed; OpenBSD mixes them into its
//!   entropy pool, from which its ChaCha20 generators are rekeyed. The
//!   `--kernel` bits per byte are not used.
//! * **NetBSD**: `ioctl(/dev/random, RNDADDDATA, rnddata_t)` with an
//!   entropy estimate of the configured bits per byte (rnd(4)). A
//!   privileged *write* would count as full entropy; RNDADDDATA is how a
//!   lower estimate is given. The ioctl also consolidates the kernel's
//!   pending entropy, so no separate reseed is asked for.
//!
//! None of these kernels has an ioctl to force a reseed like Linux's
//! RNDRESEEDCRNG; [`BsdRandom`] says so through
//! [`EntropySink::can_reseed`]. The code is built on every Unix so that
//! its tests run on Linux with a fake device (a plain file, and a closure
//! standing in for the ioctl); only the ioctl call itself is NetBSD's.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::Path;

use zeroize::Zeroize;

use super::EntropySink;

/// Bytes of `rnddata_t.data` (`RND_SAVEWORDS` 128 words of 4 bytes).
pub const RND_DATA_BYTES: usize = 512;

/// NetBSD's `rnddata_t` (sys/rndio.h).
#[repr(C)]
pub struct RndData {
    /// Bytes of `data` used.
    pub len: u32,
    /// Entropy estimate of those bytes, in bits.
    pub entropy: u32,
    /// The bytes.
    pub data: [u8; RND_DATA_BYTES],
}

impl Drop for RndData {
    fn drop(&mut self) {
        self.data.zeroize();
    }
}

/// A BSD `_IOW(group, num, len)` request code: `IOC_IN`, the length in
/// bits 16..29, the group and the number.
pub const fn bsd_iow(group: u8, num: u8, len: usize) -> u64 {
    0x8000_0000 | (((len as u64) & 0x1fff) << 16) | ((group as u64) << 8) | num as u64
}

/// `RNDADDDATA = _IOW('R', 105, rnddata_t)`.
pub const RNDADDDATA: u64 = bsd_iow(b'R', 105, size_of::<RndData>());

/// Hands `bytes` to `add` as `rnddata_t`s of at most [`RND_DATA_BYTES`]
/// each, sharing `bits` among them by length and never claiming more than
/// 8 bits per byte. An empty `bytes` makes one empty `rnddata_t` (a
/// permission probe).
pub fn for_each_rnddata(
    bytes: &[u8],
    bits: u32,
    mut add: impl FnMut(&RndData) -> io::Result<()>,
) -> io::Result<()> {
    let total = bytes.len().max(1) as u64;
    for piece in bytes
        .chunks(RND_DATA_BYTES)
        .chain(bytes.is_empty().then_some(&[][..]))
    {
        let share = (u64::from(bits) * piece.len() as u64 / total).min(8 * piece.len() as u64);
        let mut d = RndData {
            // At most RND_DATA_BYTES (512): fits.
            len: piece.len() as u32,
            entropy: u32::try_from(share).unwrap_or(u32::MAX),
            data: [0; RND_DATA_BYTES],
        };
        d.data[..piece.len()].copy_from_slice(piece);
        add(&d)?;
    }
    Ok(())
}

/// How bytes reach the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `write(2)` to the device (FreeBSD, OpenBSD): no credit.
    Write,
    /// `ioctl(RNDADDDATA)` with an estimate (NetBSD).
    RndAddData,
}

impl Method {
    /// This system's method.
    pub fn native() -> Self {
        if cfg!(target_os = "netbsd") {
            Self::RndAddData
        } else {
            Self::Write
        }
    }
}

/// `/dev/random` on a BSD.
#[derive(Debug)]
pub struct BsdRandom {
    file: File,
    method: Method,
}

impl BsdRandom {
    /// Opens `/dev/random` with this system's [`Method`] and checks that
    /// it may be fed (root).
    pub fn open() -> io::Result<Self> {
        let dev = Self::open_at(Path::new("/dev/random"), Method::native())?;
        if dev.method == Method::Write {
            tracing::info!(
                "kernel: this kernel keeps no entropy count: bytes are mixed into /dev/random \
                 without credit (--kernel's bits per byte are not used)"
            );
        }
        Ok(dev)
    }

    /// Opens `path` (a stand-in for `/dev/random` in tests) with `method`,
    /// probing it with an empty add.
    pub fn open_at(path: &Path, method: Method) -> io::Result<Self> {
        let file = OpenOptions::new().write(true).open(path).map_err(|e| {
            let hint = if e.kind() == io::ErrorKind::PermissionDenied {
                "feeding the kernel needs root: "
            } else {
                ""
            };
            io::Error::new(e.kind(), format!("{hint}{}: {e}", path.display()))
        })?;
        let mut dev = Self { file, method };
        dev.add_entropy(&[], 0)?;
        Ok(dev)
    }
}

impl EntropySink for BsdRandom {
    fn add_entropy(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
        match self.method {
            Method::Write => self.file.write_all(bytes),
            Method::RndAddData => for_each_rnddata(bytes, bits, |d| rnd_add_data(&self.file, d)),
        }
    }

    fn initialised(&mut self) -> bool {
        super::crng_ready()
    }

    fn reseed(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn can_reseed(&self) -> bool {
        false
    }

    fn credits(&self) -> bool {
        self.method == Method::RndAddData
    }
}

/// `ioctl(fd, RNDADDDATA, d)`.
#[cfg(target_os = "netbsd")]
fn rnd_add_data(file: &File, d: &RndData) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `d` is a valid, initialised `rnddata_t` whose `data` holds
    // `len` bytes; the kernel only reads it, and it outlives the call.
    let rc = unsafe { nix::libc::ioctl(file.as_raw_fd(), RNDADDDATA as _, d as *const RndData) };
    nix::errno::Errno::result(rc).map(drop).map_err(|e| {
        let e = io::Error::from(e);
        if e.kind() == io::ErrorKind::PermissionDenied {
            io::Error::new(
                e.kind(),
                format!("feeding the kernel needs root: RNDADDDATA: {e}"),
            )
        } else {
            e
        }
    })
}

/// RNDADDDATA is NetBSD's.
#[cfg(not(target_os = "netbsd"))]
fn rnd_add_data(_: &File, _: &RndData) -> io::Result<()> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "RNDADDDATA is NetBSD's",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rnddata_layout_and_request_code_match_netbsd() {
        // sys/rndio.h: uint32_t len, entropy; u_char data[RND_SAVEWORDS * 4]
        // with RND_SAVEWORDS 128, and RNDADDDATA _IOW('R', 105, rnddata_t).
        assert_eq!(size_of::<RndData>(), 4 + 4 + 512);
        // IOC_IN 0x80000000 | 520 << 16 | 'R' << 8 | 105.
        assert_eq!(RNDADDDATA, 0x8208_5269);
    }

    #[test]
    fn rnddata_pieces_carry_the_bytes_and_share_the_estimate() {
        let bytes: Vec<u8> = (0..1300u32).map(|i| (i * 7) as u8).collect();
        let mut seen = Vec::new();
        let mut got = Vec::new();
        for_each_rnddata(&bytes, 1300 * 7, |d| {
            seen.push((d.len, d.entropy));
            got.extend_from_slice(&d.data[..d.len as usize]);
            assert!(d.data[d.len as usize..].iter().all(|&b| b == 0));
            Ok(())
        })
        .unwrap();
        assert_eq!(got, bytes);
        assert_eq!(seen, [(512, 512 * 7), (512, 512 * 7), (276, 276 * 7)]);
        // Never above 8 bits per byte, whatever is asked.
        let mut est = Vec::new();
        for_each_rnddata(&bytes[..10], u32::MAX, |d| {
            est.push(d.entropy);
            Ok(())
        })
        .unwrap();
        assert_eq!(est, [80]);
        // The probe: one empty rnddata_t.
        let mut n = 0;
        for_each_rnddata(&[], 0, |d| {
            assert_eq!((d.len, d.entropy), (0, 0));
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 1);
    }

    #[test]
    fn a_failing_ioctl_stops_at_the_first_piece() {
        let mut calls = 0;
        let err = for_each_rnddata(&[1; 2000], 0, |_| {
            calls += 1;
            Err(io::Error::from_raw_os_error(nix::libc::EPERM))
        })
        .unwrap_err();
        assert_eq!(calls, 1);
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn write_method_appends_the_bytes_to_the_device() {
        let dir = std::env::temp_dir().join(format!("ekey-bsd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev_path = dir.join("random");
        std::fs::write(&dev_path, b"").unwrap();
        let mut dev = BsdRandom::open_at(&dev_path, Method::Write).unwrap();
        assert!(!dev.can_reseed());
        dev.add_entropy(b"first ", 48).unwrap();
        dev.add_entropy(b"second", 0).unwrap();
        assert_eq!(std::fs::read(&dev_path).unwrap(), b"first second");
        // Through the feeder: everything it mixes in reaches the device,
        // and it never asks this sink for a reseed.
        let config = crate::outputs::kernel::KernelConfig::new(7)
            .unwrap()
            .with_reseed(std::time::Duration::from_secs(1));
        let now = std::time::Instant::now();
        let mut feeder = crate::outputs::kernel::KernelFeeder::new(config, now, true);
        let want = feeder.wants(now);
        assert!(want > 0);
        feeder.feed(now, &mut dev, &vec![0xa5; want]).unwrap();
        let stats = feeder.stats();
        assert_eq!(stats.reseeds + stats.reseed_failures, 0);
        assert_eq!(std::fs::read(&dev_path).unwrap().len(), 12 + want);
        // A missing device: a clear error naming it.
        let err = BsdRandom::open_at(&dir.join("nope"), Method::Write).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rndadddata_method_off_netbsd_says_it_is_netbsds() {
        let dir = std::env::temp_dir().join(format!("ekey-bsd-nb-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev_path = dir.join("random");
        std::fs::write(&dev_path, b"").unwrap();
        let r = BsdRandom::open_at(&dev_path, Method::RndAddData);
        if cfg!(target_os = "netbsd") {
            // A plain file takes no ioctl.
            assert!(r.is_err());
        } else {
            let err = r.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::Unsupported);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
