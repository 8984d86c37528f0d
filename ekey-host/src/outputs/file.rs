//! `--output FILE|-`: verified bytes to a file or stdout.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::wipe::SecretBlock;

/// Where verified entropy goes: a file or stdout. A regular file is written
/// from the runtime (page-cache writes do not stall); a pipe, FIFO or
/// terminal gets a thread of its own, so that a stalled reader never stalls
/// the daemon.
pub(crate) struct Output {
    pub(crate) tx: mpsc::Sender<(SecretBlock, usize)>,
    pub(crate) done: tokio::sync::oneshot::Receiver<io::Result<()>>,
    /// Bytes written (and flushed) so far.
    pub(crate) written: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes one batch: the block given and every block already queued; then
/// flushes. Whole blocks only.
pub(crate) fn write_batch(
    w: &mut dyn Write,
    first: (SecretBlock, usize),
    rx: &mut mpsc::Receiver<(SecretBlock, usize)>,
    written: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let (block, take) = first;
    w.write_all(&block.bytes()[..take])?;
    let mut n = take as u64;
    while let Ok((b, t)) = rx.try_recv() {
        w.write_all(&b.bytes()[..t])?;
        n += t as u64;
    }
    w.flush()?;
    written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// Why the `--output` file (or a `--record` file) cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// It cannot be created or opened.
    #[error("cannot create {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    /// Its metadata cannot be read.
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect { path: PathBuf, source: io::Error },
    /// It cannot be made private.
    #[error("cannot make {} private (chmod 600): {source}", path.display())]
    Chmod { path: PathBuf, source: io::Error },
    /// The thread that writes a pipe or terminal cannot start.
    #[error("cannot start the output thread: {0}")]
    Thread(io::Error),
}

pub(crate) fn open_output(output: Option<&Path>) -> Result<Option<Output>, FileError> {
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
    let (tx, mut rx) = mpsc::channel::<(SecretBlock, usize)>(64);
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
            .map_err(FileError::Thread)?;
    }
    Ok(Some(Output { tx, done, written }))
}

/// Creates (or truncates) `path` readable by its owner only: what goes in
/// is entropy. An existing regular file is made 0600 before anything is
/// written; a device or pipe (`/dev/stdout`, a FIFO) is left as it is.
pub(crate) fn create_private(path: &Path) -> Result<std::fs::File, FileError> {
    let path_buf = || path.to_path_buf();
    let file = crate::private::write_options()
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| FileError::Create {
            path: path_buf(),
            source,
        })?;
    let meta = file.metadata().map_err(|source| FileError::Inspect {
        path: path_buf(),
        source,
    })?;
    if meta.is_file() && crate::private::mode(&meta).is_some_and(|m| m & 0o077 != 0) {
        crate::private::set_private(&file).map_err(|source| FileError::Chmod {
            path: path_buf(),
            source,
        })?;
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
