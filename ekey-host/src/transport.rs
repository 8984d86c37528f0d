//! Transports: everything that carries a key's byte stream is an
//! `AsyncRead + AsyncWrite`: a tty (`/dev/ttyACM0`, set raw), a Unix stream
//! socket (what `ekey-ulusbd` offers, and how tests attach software keys),
//! or an in-process pipe to the built-in software key.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use nix::sys::termios;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A byte stream to or from a key.
pub trait ByteLink: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteLink for T {}

/// A boxed [`ByteLink`].
pub type Link = Box<dyn ByteLink>;

/// Opens `path`: a Unix stream socket is connected to, a character device
/// is opened as a tty and set raw.
pub async fn open_path(path: &Path) -> io::Result<Link> {
    let meta = std::fs::metadata(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let ft = meta.file_type();
    if ft.is_socket() {
        let s = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        Ok(Box::new(s))
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

/// A non-blocking tty (or pty master) driven by tokio.
pub struct Tty {
    fd: AsyncFd<File>,
    /// For a pty master: the slave, held open so the master does not read
    /// EIO between clients.
    _slave: Option<std::os::fd::OwnedFd>,
}

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
        Tty::from_file(file)
    }

    /// Wraps an already-open, non-blocking file descriptor.
    pub fn from_file(file: File) -> io::Result<Tty> {
        // SAFETY: `File` owns its descriptor: it stays open and refers to
        // the same file description until the `AsyncFd` (which owns the
        // `File`) is dropped, and `as_raw_fd` always returns it.
        let fd = unsafe { AsyncFd::register(file) }.map_err(io::Error::from)?;
        Ok(Tty { fd, _slave: None })
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

impl AsyncRead for Tty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|inner| inner.get_ref().read(unfilled)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // A pty master with no slave open reads EIO: treat as EOF.
                Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for Tty {
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

/// Creates a pseudo-terminal for a software key: returns the master side
/// (the key's end) and the path of the slave (the host's end, set raw).
pub fn open_pty() -> io::Result<(Tty, std::path::PathBuf)> {
    let pty = nix::pty::openpty(None, None).map_err(io::Error::from)?;
    set_raw(&pty.slave)?;
    let path = nix::unistd::ttyname(&pty.slave).map_err(io::Error::from)?;
    set_nonblocking(&pty.master)?;
    let mut tty = Tty::from_file(File::from(pty.master))?;
    tty._slave = Some(pty.slave);
    Ok((tty, path))
}
