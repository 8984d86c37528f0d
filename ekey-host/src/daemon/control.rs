//! The daemon's control socket: a Unix stream socket (mode 0600) that
//! answers one line-command per connection.
//!
//! Commands: `status` (the JSON status document), `reload` (re-read the
//! keyring, then reset the keys so they use it), `release KEY` (let go of
//! a key, by serial or transport, for as long as the client keeps the
//! connection open or until `resume KEY`), `resume KEY`.

use std::io;
use std::path::{Path, PathBuf};

#[cfg(not(unix))]
use crate::nounix::{UnixListener, UnixStream};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
#[cfg(unix)]
use tokio::net::{UnixListener, UnixStream};

/// Default path of the control socket.
pub const DEFAULT_PATH: &str = "/run/ekey-host/control";

/// Longest command line accepted.
const MAX_LINE: u64 = 256;

/// Binds the control socket: creates its directory (0700) if missing,
/// replaces a stale socket, and makes the socket 0600.
#[cfg(unix)]
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
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

/// The control socket is a Unix socket: an error here.
#[cfg(not(unix))]
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    UnixListener::bind(path)
}

/// Reads one command line from a control client.
pub async fn read_command(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = String::new();
    let mut reader = BufReader::new(stream).take(MAX_LINE);
    reader.read_line(&mut line).await?;
    Ok(line.trim().to_owned())
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Nothing listens at the control socket.
    #[error(
        "cannot reach the daemon at {}: {source} (is `ekey-host run` running? see --control)",
        path.display()
    )]
    Unreachable {
        /// The control socket.
        path: PathBuf,
        /// Why connecting failed.
        source: io::Error,
    },
    /// The exchange failed half way.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// No answer within 15 s.
    #[error("the daemon at {} does not answer", .0.display())]
    NoAnswer(PathBuf),
}

/// Connects to the daemon at `path` and sends `command`.
async fn send(path: &Path, command: &str) -> Result<UnixStream, ControlError> {
    let mut s = UnixStream::connect(path)
        .await
        .map_err(|source| ControlError::Unreachable {
            path: path.to_path_buf(),
            source,
        })?;
    s.write_all(format!("{command}\n").as_bytes()).await?;
    Ok(s)
}

/// Sends `command` to the daemon at `path` and returns its answer.
pub async fn request(path: &Path, command: &str) -> Result<String, ControlError> {
    let exchange = async {
        let mut s = send(path, command).await?;
        let mut answer = String::new();
        s.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), exchange)
        .await
        .map_err(|_| ControlError::NoAnswer(path.to_path_buf()))?
}

/// Sends `command` to the daemon at `path` and reads its one-line answer,
/// keeping the connection open: for `release`, which lasts until the
/// connection closes (so a `rekey` that dies gives the key back).
pub async fn hold(path: &Path, command: &str) -> Result<(String, UnixStream), ControlError> {
    let exchange = async {
        let mut s = send(path, command).await?;
        let mut answer = String::new();
        BufReader::new(&mut s)
            .take(MAX_ANSWER_LINE)
            .read_line(&mut answer)
            .await?;
        Ok((answer, s))
    };
    tokio::time::timeout(std::time::Duration::from_secs(15), exchange)
        .await
        .map_err(|_| ControlError::NoAnswer(path.to_path_buf()))?
}

/// Longest one-line answer [`hold`] reads.
const MAX_ANSWER_LINE: u64 = 4096;

/// The control path to use: the option, or the default.
pub fn path_or_default(p: Option<PathBuf>) -> PathBuf {
    p.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::daemon::SharedKeyring;
use crate::daemon::SharedStatuses;
use crate::daemon::control;
use crate::daemon::reload_keyring;
use crate::daemon::snapshot;
use crate::outputs::egd;
use crate::outputs::kernel;
use crate::status;
use tracing::info;

/// What the control socket acts on.
pub(crate) struct Daemon {
    pub(crate) statuses: SharedStatuses,
    pub(crate) started: std::time::Instant,
    pub(crate) ring: SharedKeyring,
    pub(crate) keyring_path: PathBuf,
    pub(crate) emulate: bool,
    pub(crate) reload_tx: tokio::sync::watch::Sender<u64>,
    pub(crate) released_tx: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
    pub(crate) egd: Option<Arc<Mutex<egd::EgdStats>>>,
    /// The EGD TLS listener's files.
    pub(crate) tls: crate::outputs::TlsReload,
    pub(crate) kernel: Option<Arc<Mutex<kernel::KernelStats>>>,
    /// What the kernel output credits (`--kernel`).
    pub(crate) kernel_credit: Option<kernel::Credit>,
    /// The vhost-user guests' counters.
    pub(crate) vhost: Option<crate::outputs::VhostStats>,
}

impl Daemon {
    pub(crate) fn reload(&self) -> Result<usize, crate::keyring::KeyringError> {
        reload_keyring(
            &self.ring,
            &self.keyring_path,
            self.emulate,
            &self.reload_tx,
        )
    }

    /// Whether any key matching `target` (serial or transport) is connected.
    pub(crate) fn holds(&self, target: &str) -> bool {
        snapshot(&self.statuses).iter().any(|k| {
            k.connected
                && (k.transport == target || k.serial.is_some_and(|s| s.to_string() == target))
        })
    }

    pub(crate) async fn answer(&self, command: &str) -> String {
        let (verb, arg) = command.split_once(' ').unwrap_or((command, ""));
        let arg = arg.trim();
        match (verb, arg) {
            ("status", "") => self.answer_status(),
            ("reload", "") => {
                let keyring = self.reload();
                let tls = self.tls.reload();
                let tls_text = match &tls {
                    None => String::new(),
                    Some(Ok(())) => "; TLS files reloaded".to_string(),
                    Some(Err(e)) => format!("; TLS files not reloaded (the old ones stay): {e}"),
                };
                match (keyring, tls) {
                    (Ok(n), None | Some(Ok(()))) => {
                        format!("ok: keyring reloaded, {n} keys{tls_text}\n")
                    }
                    (Ok(n), Some(Err(_))) => {
                        format!("error: keyring reloaded, {n} keys{tls_text}\n")
                    }
                    (Err(e), _) => format!("error: {e}{tls_text}\n"),
                }
            }
            ("release", target) if !target.is_empty() => self.answer_release(target).await,
            ("resume", target) if !target.is_empty() => self.resume(target),
            _ => format!("error: unknown command {command:?}\n"),
        }
    }

    /// The `status` answer: the status document, with the EGD and kernel
    /// outputs' own books of each key and their counters.
    fn answer_status(&self) -> String {
        let snapshot = snapshot(&self.statuses);
        let mut doc = status::status_json(&snapshot, std::time::Instant::now(), self.started);
        if let Some(e) = &self.egd {
            let e = e.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // Per key: of the bytes handed to the EGD pool, how
            // many clients got.
            if let Some(keys) = doc["keys"].as_array_mut() {
                for (k, st) in keys.iter_mut().zip(&snapshot) {
                    let served = st.booked_in(&e.served_by_key);
                    let withdrawn = st.booked_in(&e.withdrawn_by_key);
                    k["accounting"]["egd_served"] = serde_json::json!(served);
                    k["accounting"]["egd_withdrawn"] = serde_json::json!(withdrawn);
                }
            }
            doc["egd"] = e.to_json();
        }
        if let Some(k) = &self.kernel {
            let k = k.lock().unwrap_or_else(|p| p.into_inner()).clone();
            // Per key: what the kernel accepted, and the credit.
            if let Some(keys) = doc["keys"].as_array_mut() {
                for (entry, st) in keys.iter_mut().zip(&snapshot) {
                    let accepted = st.booked_in(&k.bytes_by_key);
                    let withdrawn = st.booked_in(&k.withdrawn_by_key);
                    let a = &mut entry["accounting"];
                    a["kernel_accepted"] = serde_json::json!(accepted);
                    a["kernel_withdrawn"] = serde_json::json!(withdrawn);
                    a["kernel_bits_credited"] = serde_json::json!(st.booked_in(&k.bits_by_key));
                    if let Some(b) = st.serial.and_then(|s| k.credit_by_key.get(&s)) {
                        a["kernel_credit_bits_per_byte"] = serde_json::json!(b);
                    }
                }
            }
            doc["kernel"] = serde_json::json!({
                "mode": k.mode.to_string(),
                "credit": self.kernel_credit.map(|c| c.to_string()),
                "bytes_written": k.bytes_written,
                "bits_credited": k.bits_credited,
                "bytes_uncredited": k.bytes_uncredited,
                "ioctl_failures": k.ioctl_failures,
                "reseeds": k.reseeds,
                "reseed_failures": k.reseed_failures,
                "new_vm_generations": k.new_generations,
            });
        }
        if let Some(v) = &self.vhost {
            doc["vhost_user"] = crate::outputs::vhost_json(v);
        }
        format!("{doc}\n")
    }

    /// The `release` answer: asks the driver of `target` to let go of it,
    /// and waits up to 5 s for it to; taken back if it was not let go of.
    async fn answer_release(&self, target: &str) -> String {
        let held = self.holds(target);
        self.released_tx.send_modify(|set| {
            Arc::make_mut(set).insert(target.to_owned());
        });
        if !held {
            return "ok: not held\n".into();
        }
        for _ in 0..100 {
            if !self.holds(target) {
                return "ok: released\n".into();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Not let go of: take the request back, or the key would
        // stop the moment it did.
        self.released_tx.send_modify(|set| {
            Arc::make_mut(set).remove(target);
        });
        "error: the key was not released in time\n".into()
    }

    /// Takes a released key back, with the keyring re-read (it may hold
    /// the key's new long-term key).
    pub(crate) fn resume(&self, target: &str) -> String {
        let reloaded = self.reload();
        self.released_tx.send_modify(|set| {
            Arc::make_mut(set).remove(target);
        });
        match reloaded {
            Ok(n) => format!("ok: resumed, keyring reloaded ({n} keys)\n"),
            Err(e) => format!("ok: resumed, but the keyring was not reloaded: {e}\n"),
        }
    }

    /// Whether `target` is still released.
    pub(crate) fn is_released(&self, target: &str) -> bool {
        self.released_tx.borrow().contains(target)
    }
}

/// What the control socket answers after a `release`: the key stays
/// released while the client keeps the connection open (a `rekey` at
/// work), and is taken back when it closes without a `resume` (a `rekey`
/// that was killed).
pub(crate) async fn hold_release(stream: &mut UnixStream, daemon: &Daemon, target: &str) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 64];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    if daemon.is_released(target) {
        info!("{target}: the client that asked for its release has gone; taking the key back");
        let _ = daemon.resume(target);
    }
}

pub(crate) async fn serve_control(listener: UnixListener, daemon: Daemon) {
    let daemon = Arc::new(daemon);
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: do not spin.
                tracing::debug!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // One task per client: a slow client never holds up the others.
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let read =
                tokio::time::timeout(Duration::from_secs(2), control::read_command(&mut stream));
            let Ok(Ok(command)) = read.await else { return };
            let answer = daemon.answer(&command).await;
            let _ =
                tokio::time::timeout(Duration::from_secs(2), stream.write_all(answer.as_bytes()))
                    .await;
            if let Some(("release", target)) = command.split_once(' ')
                && answer.starts_with("ok")
            {
                hold_release(&mut stream, &daemon, target.trim()).await;
            }
        });
    }
}

/// Binds the control socket (`--control`, or the default path) and serves
/// `daemon` on it. Returns the socket's path, to remove at the end; `None`
/// when the default path cannot be bound (`status` will not work; an
/// explicit `--control` that cannot be bound is an error).
pub(crate) fn start_control(
    control: Option<PathBuf>,
    daemon: Daemon,
) -> Result<Option<PathBuf>, super::Error> {
    let path = path_or_default(control.clone());
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) if control.is_some() => {
            return Err(super::Error::Control { path, source: e });
        }
        Err(e) => {
            tracing::warn!(
                "no control socket ({}: {e}); `ekey-host status` will not work",
                path.display()
            );
            return Ok(None);
        }
    };
    tokio::spawn(serve_control(listener, daemon));
    Ok(Some(path))
}
