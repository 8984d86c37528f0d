//! `--output FILE|-`: verified bytes to a file or stdout.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

/// Where verified entropy goes: a file or stdout. A regular file is written
/// from the runtime (page-cache writes do not stall); a pipe, FIFO or
/// terminal gets a thread of its own, so that a stalled reader never stalls
/// the daemon.
pub(crate) struct Output {
    pub(crate) tx: mpsc::Sender<([u8; 32], usize)>,
    pub(crate) done: tokio::sync::oneshot::Receiver<io::Result<()>>,
    /// Bytes written (and flushed) so far.
    pub(crate) written: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes one batch: the block given and every block already queued; then
/// flushes. Whole blocks only.
pub(crate) fn write_batch(
    w: &mut dyn Write,
    first: ([u8; 32], usize),
    rx: &mut mpsc::Receiver<([u8; 32], usize)>,
    written: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let (block, take) = first;
    w.write_all(&block[..take])?;
    let mut n = take as u64;
    while let Ok((b, t)) = rx.try_recv() {
        w.write_all(&b[..t])?;
        n += t as u64;
    }
    w.flush()?;
    written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

pub(crate) fn open_output(output: Option<&Path>) -> Result<Option<Output>, String> {
    let (mut w, regular): (Box<dyn Write + Send>, bool) = match output {
        None => return Ok(None),
        Some(p) if p.as_os_str() == "-" => {
            let regular = std::fs::metadata("/dev/stdout").is_ok_and(|m| m.is_file());
            (Box::new(io::BufWriter::new(io::stdout())), regular)
        }
        Some(p) => {
            // Entropy is secret material: not readable by others.
            let f = create_private(p)?;
            let regular = f.metadata().is_ok_and(|m| m.is_file());
            (Box::new(io::BufWriter::with_capacity(64 * 32, f)), regular)
        }
    };
    let (tx, mut rx) = mpsc::channel::<([u8; 32], usize)>(64);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = written.clone();
    if regular {
        tokio::spawn(async move {
            let mut result = Ok(());
            while let Some(first) = rx.recv().await {
                result = write_batch(&mut w, first, &mut rx, &count);
                if result.is_err() {
                    break;
                }
            }
            let _ = done_tx.send(result.and_then(|()| w.flush()));
        });
    } else {
        std::thread::Builder::new()
            .name("ekey-output".into())
            .spawn(move || {
                let mut result = Ok(());
                while let Some(first) = rx.blocking_recv() {
                    result = write_batch(&mut w, first, &mut rx, &count);
                    if result.is_err() {
                        break;
                    }
                }
                let _ = done_tx.send(result.and_then(|()| w.flush()));
            })
            .map_err(|e| format!("cannot start the output thread: {e}"))?;
    }
    Ok(Some(Output { tx, done, written }))
}

/// Creates (or truncates) `path` readable by its owner only: what goes in
/// is entropy. An existing regular file is made 0600 before anything is
/// written; a device or pipe (`/dev/stdout`, a FIFO) is left as it is.
pub(crate) fn create_private(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot make {} private (chmod 600): {e}", path.display()))?;
    }
    Ok(file)
}

impl Output {
    /// Closes the queue, lets the output thread write what it has (whole
    /// blocks) and waits for it (at most 5 s). Returns the error that ended
    /// it, if any (a reader that went away is not one).
    pub(crate) async fn finish(self) -> Option<io::Error> {
        drop(self.tx);
        match tokio::time::timeout(std::time::Duration::from_secs(5), self.done).await {
            Ok(Ok(Ok(()))) => None,
            Ok(Ok(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => None,
            Ok(Ok(Err(e))) => Some(e),
            Ok(Err(_)) => Some(io::Error::other("the output thread stopped")),
            Err(_) => Some(io::Error::other(
                "the output does not take data (stalled reader?)",
            )),
        }
    }
}
