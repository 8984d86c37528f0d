//! Noticing that this machine is a restored snapshot or a clone: the
//! kernel's VM generation ID changed (`-device vmgenid` in QEMU; Hyper-V,
//! Firecracker and cloud-hypervisor offer the same ACPI device).
//!
//! Linux's vmgenid driver (5.18+, `CONFIG_VMGENID`) mixes the new ID into
//! the kernel's pool and sends a `change` uevent with `NEW_VMGENID=1`. A
//! clone still shares the rest of its sibling's state, so the feeders react
//! by fetching fresh bytes from the host at once and reseeding
//! (`KernelFeeder::fresh_generation`). [`watch`] listens for the uevent on
//! the kernel's netlink multicast group and counts each one in a
//! `tokio::sync::watch` channel.
//!
//! The driver exposes no sysfs file with the ID, so there is nothing to
//! poll; a kernel without the driver never sends the event, and the watch
//! then simply never moves.

use tokio::sync::watch;

/// Whether a kernel uevent message (`ACTION@DEVPATH`, then NUL-separated
/// `KEY=VALUE` fields) announces a new VM generation ID.
pub fn announces_new_generation(message: &[u8]) -> bool {
    let mut fields = message.split(|&b| b == 0);
    let header_ok = fields.next().is_some_and(|h| h.starts_with(b"change@"));
    header_ok && fields.any(|f| f == b"NEW_VMGENID=1")
}

/// Starts listening for new VM generation IDs: the count of those seen so
/// far goes to the returned receiver. Needs a tokio runtime. Fails (and
/// nothing is started) where kernel uevents cannot be read.
pub fn watch() -> std::io::Result<watch::Receiver<u64>> {
    let (tx, rx) = watch::channel(0u64);
    imp::spawn(tx)?;
    Ok(rx)
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
    use tokio::sync::watch;

    /// The kernel's uevent multicast group.
    const KERNEL_GROUP: u32 = 1;

    pub(super) fn spawn(tx: watch::Sender<u64>) -> io::Result<()> {
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
            if let Err(e) = listen(fd, &tx).await {
                tracing::warn!("VM generation ID watch stopped: {e}");
            }
        });
        Ok(())
    }

    async fn listen(fd: AsyncFd<OwnedFd>, tx: &watch::Sender<u64>) -> io::Result<()> {
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
                tx.send_modify(|count| *count += 1);
                if tx.is_closed() {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod imp {
    pub(super) fn spawn(_tx: tokio::sync::watch::Sender<u64>) -> std::io::Result<()> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "VM generation IDs are watched on Linux only",
        ))
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

    #[tokio::test(flavor = "current_thread")]
    async fn the_watch_opens_on_linux() {
        let rx = watch().expect("a netlink uevent socket");
        assert_eq!(*rx.borrow(), 0);
    }
}
