//! The daemon's control socket: a Unix stream socket (mode 0600) that
//! answers one line-command per connection.
//!
//! Commands: `status` (the JSON status document), `reload` (re-read the
//! keyring, then reset the keys so they use it), `release KEY` (let go of
//! a key, by serial or transport, for as long as the client keeps the
//! connection open or until `resume KEY`), `resume KEY`.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Default path of the control socket.
pub const DEFAULT_PATH: &str = "/run/ekey-host/control";

/// Longest command line accepted.
const MAX_LINE: u64 = 256;

/// Binds the control socket: creates its directory (0700) if missing,
/// replaces a stale socket, and makes the socket 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        // A live daemon answers; a stale socket does not.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another ekey-host is running on {}", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Reads one command line from a control client.
pub async fn read_command(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_LINE);
    reader.read_line(&mut line).await?;
    Ok(line.trim().to_owned())
}

/// Connects to the daemon at `path` and sends `command`.
async fn send(path: &Path, command: &str) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach the daemon at {}: {e} (is `ekey-host run` running? see --control)",
            path.display()
        )
    })?;
    s.write_all(format!("{command}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends `command` to the daemon at `path` and returns its answer.
pub async fn request(path: &Path, command: &str) -> Result<String, String> {
    let exchange = async {
        let mut s = send(path, command).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok(answer)
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), exchange)
        .await
        .map_err(|_| format!("the daemon at {} does not answer", path.display()))?
}

/// Sends `command` to the daemon at `path` and reads its one-line answer,
/// keeping the connection open: for `release`, which lasts until the
/// connection closes (so a `rekey` that dies gives the key back).
pub async fn hold(path: &Path, command: &str) -> Result<(String, UnixStream), String> {
    let exchange = async {
        let mut s = send(path, command).await?;
        let mut answer = String::new();
        BufReader::new(&mut s)
            .take(MAX_ANSWER_LINE)
            .read_line(&mut answer)
            .await
            .map_err(|e| e.to_string())?;
        Ok((answer, s))
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), exchange)
        .await
        .map_err(|_| format!("the daemon at {} does not answer", path.display()))?
}

/// Longest one-line answer [`hold`] reads.
const MAX_ANSWER_LINE: u64 = 4096;

/// The control path to use: the option, or the default.
pub fn path_or_default(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}
