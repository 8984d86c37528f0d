//! Noticing that this machine is a restored snapshot or a clone: the
//! kernel's VM generation ID changed (`-device vmgenid` in QEMU; Hyper-V,
//! Firecracker and cloud-hypervisor offer the same ACPI device).
//!
//! Linux's vmgenid driver (5.18+, `CONFIG_VMGENID`) mixes the new ID into
//! the kernel's pool; once the CRNG is ready it logs `random: crng reseeded
//! due to virtual machine fork`, and kernels that carry the vmgenid uevent
//! patch also send a `change` uevent with `NEW_VMGENID=1` (Debian's 6.1
//! and 6.12 do not: the uevent was reverted). A clone still shares the
//! rest of its sibling's state, so the feeders react by fetching fresh
//! bytes from the host at once and reseeding
//! (`KernelFeeder::fresh_generation`).
//!
//! [`watch()`] listens to both: the uevent on the kernel's netlink multicast
//! group, and the log line in `/dev/kmsg` (readable by root, or with
//! CAP_SYSLOG where `kernel.dmesg_restrict` is set; records from user
//! space, which anyone allowed to write `/dev/kmsg` could forge, are not
//! taken). An ID seen on both within [`SAME_EVENT`] counts once. The
//! driver exposes no sysfs file with the ID, so there is nothing to poll;
//! without the driver the watch simply never moves.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// Whether a kernel uevent message (`ACTION@DEVPATH`, then NUL-separated
/// `KEY=VALUE` fields) announces a new VM generation ID.
pub fn announces_new_generation(message: &[u8]) -> bool {
    let mut fields = message.split(|&b| b == 0);
    let header_ok = fields.next().is_some_and(|h| h.starts_with(b"change@"));
    header_ok && fields.any(|f| f == b"NEW_VMGENID=1")
}

/// What the kernel logs when its vmgenid driver sees a new ID.
pub const FORK_MESSAGE: &str = "crng reseeded due to virtual machine fork";

/// Whether a `/dev/kmsg` record (`PRIO,SEQ,TIME,FLAGS;TEXT`) is the
/// kernel's own (facility 0: not written from user space) and says the
/// VM forked.
pub fn record_announces_fork(record: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(record) else {
        return false;
    };
    let Some((head, message)) = text.split_once(';') else {
        return false;
    };
    let from_kernel = head
        .split(',')
        .next()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|prio| prio >> 3 == 0);
    from_kernel
        && message
            .lines()
            .next()
            .is_some_and(|l| l.contains(FORK_MESSAGE))
}

/// Two sightings closer than this are the same new generation.
pub const SAME_EVENT: Duration = Duration::from_secs(2);

/// Counts new generations from any source, once per [`SAME_EVENT`].
#[derive(Clone)]
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
struct Counter {
    tx: Arc<watch::Sender<u64>>,
    last: Arc<Mutex<Option<Instant>>>,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Counter {
    fn seen(&self) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < SAME_EVENT) {
            return;
        }
        *last = Some(now);
        self.tx.send_modify(|count| *count += 1);
    }
}

/// Starts listening for new VM generation IDs (the uevent and the kernel
/// log, where each can be read): the count of those seen so far goes to
/// the returned receiver. Needs a tokio runtime. Fails, saying why, only
/// if neither can be read.
pub fn watch() -> std::io::Result<watch::Receiver<u64>> {
    let (tx, rx) = watch::channel(0u64);
    let counter = Counter {
        tx: Arc::new(tx),
        last: Arc::new(Mutex::new(None)),
    };
    let uevents = imp::spawn_uevents(counter.clone());
    let kmsg = imp::spawn_kmsg(counter);
    match (uevents, kmsg) {
        (Err(u), Err(k)) => Err(std::io::Error::new(
            k.kind(),
            format!("uevents: {u}; /dev/kmsg: {k}"),
        )),
        (Err(e), Ok(())) => {
            tracing::debug!("VM generation IDs: no uevents ({e}); watching /dev/kmsg");
            Ok(rx)
        }
        (Ok(()), Err(e)) => {
            tracing::info!(
                "VM generation IDs: watching uevents only; /dev/kmsg cannot be read ({e}), \
                 and kernels without the NEW_VMGENID uevent (Debian 6.1, 6.12) tell only there"
            );
            Ok(rx)
        }
        (Ok(()), Ok(())) => Ok(rx),
    }
}

/// [`watch()`] for `who` (`feed`, `kernel`): `None`, with a warning
/// saying why, where neither source can be read.
pub fn watch_or_say(who: &str) -> Option<watch::Receiver<u64>> {
    watch()
        .map_err(|e| tracing::warn!("{who}: not watching for new VM generation IDs: {e}"))
        .ok()
}

/// Resolves at the next new VM generation; never without a watch, or once
/// its sender is gone.
pub async fn next(generations: Option<&mut watch::Receiver<u64>>) {
    let changed = match generations {
        Some(g) => g.changed().await.is_ok(),
        None => false,
    };
    if !changed {
        std::future::pending::<()>().await;
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use std::io;
    use std::os::fd::{AsRawFd, OwnedFd};

    use nix::sys::socket::{
        AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recvfrom, socket,
    };
    use tokio::io::unix::AsyncFd;

    /// The kernel's uevent multicast group.
    const KERNEL_GROUP: u32 = 1;

    pub(super) fn spawn_uevents(counter: super::Counter) -> io::Result<()> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            SockProtocol::NetlinkKObjectUEvent,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, KERNEL_GROUP))?;
        // SAFETY: `fd` is an open socket that the AsyncFd owns from here
        // on (it is moved in), so it stays open, and `as_raw_fd` keeps
        // returning it, for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(fd) }?;
        tokio::spawn(async move {
            if let Err(e) = listen(fd, &counter).await {
                tracing::warn!("VM generation ID watch (uevents) stopped: {e}");
            }
        });
        Ok(())
    }

    /// Follows `/dev/kmsg` from its end (older records are not news).
    pub(super) fn spawn_kmsg(counter: super::Counter) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open("/dev/kmsg")?;
        nix::unistd::lseek(&file, 0, nix::unistd::Whence::SeekEnd)?;
        // SAFETY: as for the netlink socket: the AsyncFd owns the file.
        let fd = unsafe { AsyncFd::register(OwnedFd::from(file)) }?;
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            loop {
                let Ok(mut ready) = fd.readable().await else {
                    return;
                };
                match ready.try_io(|fd| nix::unistd::read(fd, &mut buf).map_err(io::Error::from)) {
                    Ok(Ok(n)) => {
                        if super::record_announces_fork(buf.get(..n).unwrap_or_default()) {
                            counter.seen();
                        }
                    }
                    // Records overwritten before we read them: go on.
                    Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::EPIPE) => {}
                    Ok(Err(e)) => {
                        tracing::warn!("VM generation ID watch (/dev/kmsg) stopped: {e}");
                        return;
                    }
                    Err(_would_block) => {}
                }
                if counter.tx.is_closed() {
                    return;
                }
            }
        });
        Ok(())
    }

    async fn listen(fd: AsyncFd<OwnedFd>, counter: &super::Counter) -> io::Result<()> {
        let mut buf = vec![0u8; 8192];
        loop {
            let mut ready = fd.readable().await?;
            let got = ready.try_io(|fd| {
                recvfrom::<NetlinkAddr>(fd.as_raw_fd(), &mut buf).map_err(io::Error::from)
            });
            let (n, from) = match got {
                Ok(Ok(got)) => got,
                // Too many uevents at once (a burst of hot-plugs): some
                // were dropped; go on with the next.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENOBUFS) => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            };
            // Only the kernel (port 0) speaks for the kernel.
            let from_kernel = from.is_some_and(|a| a.pid() == 0);
            let message = buf.get(..n).unwrap_or_default();
            if from_kernel && super::announces_new_generation(message) {
                counter.seen();
            }
            if counter.tx.is_closed() {
                return Ok(());
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    fn unsupported() -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "VM generation IDs are watched on Linux only",
        ))
    }

    pub(super) fn spawn_uevents(_: super::Counter) -> std::io::Result<()> {
        unsupported()
    }

    pub(super) fn spawn_kmsg(_: super::Counter) -> std::io::Result<()> {
        unsupported()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_vmgenid_change_event_counts() {
        let event = b"change@/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0ACTION=change\0\
                      DEVPATH=/devices/LNXSYSTM:00/LNXSYBUS:00/QEMUVGID:00\0SUBSYSTEM=acpi\0\
                      NEW_VMGENID=1\0MODALIAS=acpi:QEMUVGID:VM_GEN_COUNTER:\0SEQNUM=2711\0";
        assert!(announces_new_generation(event));
        assert!(!announces_new_generation(
            b"add@/devices/x\0ACTION=add\0NEW_VMGENID=1\0"
        ));
        assert!(!announces_new_generation(
            b"change@/devices/x\0ACTION=change\0NEW_VMGENID=0\0"
        ));
        assert!(!announces_new_generation(
            b"change@/devices/x\0NEW_VMGENID=1x\0"
        ));
        assert!(!announces_new_generation(b""));
        // udev's re-broadcasts (group 2) start "libudev": not listened to,
        // and not taken either.
        assert!(!announces_new_generation(b"libudev\0\xfe\xed\xca\xfe"));
    }

    #[test]
    fn only_the_kernels_fork_record_counts() {
        assert!(record_announces_fork(
            b"6,1893,52071443,-;random: crng reseeded due to virtual machine fork\n"
        ));
        // The same text written from user space (facility user: 8 and up).
        assert!(!record_announces_fork(
            b"14,1894,52071500,-;random: crng reseeded due to virtual machine fork\n"
        ));
        assert!(!record_announces_fork(
            b"6,1895,52071600,-;random: crng init done\n"
        ));
        // Continuation lines (" KEY=VALUE") are not the message.
        assert!(!record_announces_fork(
            b"6,1896,1,-;usb 1-1: new device\n SUBSYSTEM=crng reseeded due to virtual machine fork\n"
        ));
        assert!(!record_announces_fork(b"garbage"));
        assert!(!record_announces_fork(
            b"x,1,1,-;crng reseeded due to virtual machine fork"
        ));
    }

    #[test]
    fn a_generation_seen_twice_at_once_counts_once() {
        let (tx, rx) = watch::channel(0);
        let c = Counter {
            tx: Arc::new(tx),
            last: Arc::new(Mutex::new(None)),
        };
        c.seen();
        c.seen();
        assert_eq!(*rx.borrow(), 1);
        *c.last.lock().unwrap() = Some(Instant::now() - SAME_EVENT);
        c.seen();
        assert_eq!(*rx.borrow(), 2);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn the_watch_opens_on_linux() {
        let rx = watch().expect("a netlink uevent socket");
        assert_eq!(*rx.borrow(), 0);
    }
}
