//! Stand-ins for Unix sockets where there are none (Windows): connecting
//! and binding fail with a clear error, so the code that uses them (the
//! control socket, `status`, `rekey`'s hand-over) compiles everywhere and
//! says why it cannot work here.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

fn unsupported(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        format!(
            "{}: Unix sockets are Unix only (no control socket here; see --metrics)",
            path.display()
        ),
    )
}

/// A Unix stream socket: none can exist here.
#[derive(Debug)]
pub enum UnixStream {}

impl UnixStream {
    /// Fails: no Unix sockets here.
    pub async fn connect(path: impl AsRef<Path>) -> io::Result<Self> {
        Err(unsupported(path.as_ref()))
    }
}

impl AsyncRead for UnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match *self {}
    }
}

impl AsyncWrite for UnixStream {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        match *self {}
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        match *self {}
    }
}

/// A Unix socket listener: none can exist here.
#[derive(Debug)]
pub enum UnixListener {}

impl UnixListener {
    /// Fails: no Unix sockets here.
    pub fn bind(path: impl AsRef<Path>) -> io::Result<Self> {
        Err(unsupported(path.as_ref()))
    }

    /// Never returns: no listener exists.
    pub async fn accept(&self) -> io::Result<(UnixStream, ())> {
        match *self {}
    }
}
