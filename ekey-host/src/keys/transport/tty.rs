//! ttys and Unix stream sockets as [`Link`]s.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::termios;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{FAST_READ, FAST_READ_INTERVAL, FAST_WINDOW, Link, READ_INTERVAL};

/// Opens `path`: a Unix stream socket is connected to, a character device
/// is opened as a tty and set raw.
pub async fn open_path(path: &Path) -> io::Result<Link> {
    let meta = std::fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let ft = meta.file_type();
    if ft.is_socket() {
        Ok(Box::new(connect_unix(path)?))
    } else if ft.is_char_device() {
        Ok(Box::new(Tty::open(path)?))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{}: neither a tty nor a Unix socket", path.display()),
        ))
    }
}

/// Puts a terminal into raw mode: no echo, no line discipline, no signals,
/// 8 data bits; reads return what is there.
pub fn set_raw<F: AsFd>(fd: F) -> io::Result<()> {
    let mut t = termios::tcgetattr(&fd).map_err(io::Error::from)?;
    termios::cfmakeraw(&mut t);
    t.control_flags |= termios::ControlFlags::CLOCAL | termios::ControlFlags::CREAD;
    t.control_chars[termios::SpecialCharacterIndices::VMIN as usize] = 1;
    t.control_chars[termios::SpecialCharacterIndices::VTIME as usize] = 0;
    termios::tcsetattr(&fd, termios::SetArg::TCSANOW, &t).map_err(io::Error::from)
}

/// A non-blocking file descriptor (tty, pty master, Unix socket) that is
/// read in batches: when nothing is there, it looks again after
/// [`READ_INTERVAL`] instead of asking to be woken for every byte. A key
/// sends about a hundred frames a second; reading them ten at a time cuts
/// the daemon's wakeups (and CPU) tenfold, and no protocol timeout is
/// anywhere near 100 ms. Writes are driven by readiness as usual.
pub struct Polled<F: std::os::fd::AsRawFd> {
    fd: AsyncFd<F>,
    retry: Pin<Box<tokio::time::Sleep>>,
    armed: bool,
    /// Until then the source counts as fast (a large read came lately):
    /// look again soon.
    fast_until: Option<tokio::time::Instant>,
    /// For a pty master: the slave, held open so the master does not read
    /// EIO between clients.
    _slave: Option<std::os::fd::OwnedFd>,
}

/// A tty or pty master.
pub type Tty = Polled<File>;

impl Tty {
    /// Opens a tty device, sets it raw.
    pub fn open(path: &Path) -> io::Result<Tty> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc_flags())
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        set_raw(&file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{}: cannot set raw mode: {e}", path.display()),
            )
        })?;
        Polled::new(file)
    }
}

impl<F: std::os::fd::AsRawFd> Polled<F> {
    /// Wraps an open, non-blocking descriptor. Needs a tokio runtime.
    pub fn new(io: F) -> io::Result<Self> {
        // Registered for write readiness only: input is looked for on a
        // timer (see the type's docs), so arriving bytes wake nobody.
        // SAFETY: `io` owns its descriptor (File, UnixStream): it stays
        // open and refers to the same file description until the `AsyncFd`
        // that owns `io` is dropped, and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register_with_interest(io, tokio::io::Interest::WRITABLE) }
            .map_err(io::Error::from)?;
        Ok(Polled {
            fd,
            retry: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            armed: false,
            fast_until: None,
            _slave: None,
        })
    }
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_NONBLOCK).bits()
}

/// Makes a file descriptor non-blocking.
pub fn set_nonblocking<F: AsFd>(fd: F) -> io::Result<()> {
    use nix::fcntl::{F_GETFL, F_SETFL, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(&fd, F_GETFL).map_err(io::Error::from)?);
    fcntl(&fd, F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

impl<F> AsyncRead for Polled<F>
where
    F: std::os::fd::AsRawFd + Unpin,
    for<'a> &'a F: Read,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            let unfilled = buf.initialize_unfilled();
            match this.fd.get_ref().read(unfilled) {
                Ok(n) => {
                    this.armed = false;
                    if n >= FAST_READ {
                        this.fast_until = Some(tokio::time::Instant::now() + FAST_WINDOW);
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A pty master with no slave open reads EIO: end of input.
                Err(e) if e.raw_os_error() == Some(nix::libc::EIO) => return Poll::Ready(Ok(())),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Asked with the no-op waker ("is anything there now?", the
                // driver draining the line): nobody waits, so no timer is set.
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        && cx.waker().will_wake(std::task::Waker::noop()) =>
                {
                    return Poll::Pending;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !this.armed {
                        this.armed = true;
                        let now = tokio::time::Instant::now();
                        let fast = this.fast_until.is_some_and(|t| now < t);
                        let wait = if fast {
                            FAST_READ_INTERVAL
                        } else {
                            READ_INTERVAL
                        };
                        let at = now + wait;
                        this.retry.as_mut().reset(at);
                    }
                    ready!(this.retry.as_mut().poll(cx));
                    this.armed = false;
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<F> AsyncWrite for Polled<F>
where
    F: std::os::fd::AsRawFd + Unpin,
    for<'a> &'a F: Write,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|inner| inner.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Connects to a Unix stream socket (a key served by `ekey-ulusbd` or
/// `ekey-host emulate --unix`).
pub fn connect_unix(path: &Path) -> io::Result<Polled<std::os::unix::net::UnixStream>> {
    let s = std::os::unix::net::UnixStream::connect(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    s.set_nonblocking(true)?;
    Polled::new(s)
}

/// Creates a pseudo-terminal for a software key: returns the master side
/// (the key's end) and the path of the slave (the host's end, set raw).
pub fn open_pty() -> io::Result<(Tty, std::path::PathBuf)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    set_raw(&pty.slave)?;
    let path = nix::unistd::ttyname(&pty.slave).map_err(io::Error::from)?;
    set_nonblocking(&pty.master)?;
    let mut tty = Polled::new(File::from(pty.master))?;
    tty._slave = Some(pty.slave);
    Ok((tty, path))
}
