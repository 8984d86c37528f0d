//! Transports: everything that carries a key's byte stream is an
//! `AsyncRead + AsyncWrite`: a tty (`/dev/ttyACM0`, set raw), a Unix stream
//! socket (what `ekey-ulusbd` offers, and how tests attach software keys),
//! or an in-process pipe to the built-in software key.
//!
//! ttys and Unix sockets are Unix's (the [`tty`] part); on Windows keys
//! come over USB or from the built-in software key.

use tokio::io::{AsyncRead, AsyncWrite};

#[cfg(unix)]
pub mod tty;
#[cfg(unix)]
pub use tty::*;

/// A byte stream to or from a key.
pub trait ByteLink: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteLink for T {}

/// A boxed [`ByteLink`].
pub type Link = Box<dyn ByteLink>;

/// How often a [`Polled`] link looks for input when none was there.
pub const READ_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How often a [`Polled`] link looks again while input comes in faster
/// than a real key sends (a large read last time): a fast source is not
/// held back to a hundred milliseconds per batch.
pub const FAST_READ_INTERVAL: std::time::Duration = std::time::Duration::from_millis(2);

/// A read at least this large means the source is fast (a real key fills
/// about 600 bytes in [`READ_INTERVAL`]).
pub const FAST_READ: usize = 1024;

/// How long a source counts as fast after a large read.
pub const FAST_WINDOW: std::time::Duration = std::time::Duration::from_millis(300);

/// Opens `path`: ttys and Unix sockets are Unix only.
#[cfg(not(unix))]
pub async fn open_path(path: &std::path::Path) -> std::io::Result<Link> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        format!(
            "{}: ttys and Unix sockets are Unix only; here keys come over USB",
            path.display()
        ),
    ))
}
