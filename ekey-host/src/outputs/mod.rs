//! The daemon's outputs, and starting them.

pub mod egd;
pub mod file;
pub mod kernel;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::cli::Outputs;
use crate::keys::driver::{self};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Why an output cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The EGD TCP address cannot be bound.
    #[error("--egd-tcp {addr}: {source}")]
    EgdTcp { addr: String, source: io::Error },
    /// `--egd-mode` is not an octal mode.
    #[error("--egd-mode {0}: an octal mode such as 600 or 660")]
    EgdMode(String),
    /// The EGD Unix socket cannot be bound.
    #[error("--egd-unix {}: {source}", path.display())]
    EgdUnix { path: PathBuf, source: io::Error },
    /// A `--kernel` setting out of range.
    #[error(transparent)]
    Kernel(#[from] kernel::ConfigError),
    /// `--kernel-interval 0`.
    #[error("--kernel-interval must be more than 0")]
    KernelInterval,
    /// `/dev/random` cannot be opened for the kernel output.
    #[error("--kernel: {0}")]
    KernelOpen(io::Error),
    /// `--output` cannot be used.
    #[error(transparent)]
    File(#[from] file::FileError),
}

/// Starts the EGD server if asked for: its block queue, its statistics and
/// the Unix socket to remove at the end.
pub(crate) async fn start_egd(
    o: &Outputs,
    closes: driver::GateCloses,
) -> Result<
    (
        Option<mpsc::Sender<egd::SourceBlock>>,
        Option<Arc<Mutex<egd::EgdStats>>>,
        Option<PathBuf>,
    ),
    Error,
> {
    let mut listeners = Vec::new();
    if let Some(addr) = &o.egd_tcp {
        let l = egd::bind_tcp(addr).await.map_err(|source| Error::EgdTcp {
            addr: addr.clone(),
            source,
        })?;
        if let Ok(a) = l.local_addr() {
            info!("EGD server on tcp {a}");
        }
        listeners.push(egd::EgdListener::Tcp(l));
    }
    if let Some(path) = &o.egd_unix {
        let mode = u32::from_str_radix(o.egd_mode.trim(), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| Error::EgdMode(o.egd_mode.clone()))?;
        let l = egd::bind_unix(path, mode, o.egd_group).map_err(|source| Error::EgdUnix {
            path: path.clone(),
            source,
        })?;
        info!("EGD server on unix {} (mode {mode:o})", path.display());
        listeners.push(egd::EgdListener::Unix(l));
    }
    if listeners.is_empty() {
        return Ok((None, None, None));
    }
    if o.egd_unix.is_none() && !(o.egd_allow_uid.is_empty() && o.egd_allow_gid.is_empty()) {
        warn!(
            "--egd-allow-uid/--egd-allow-gid apply to --egd-unix clients only, and there is no --egd-unix"
        );
    }
    if o.egd_tcp.is_none() && !o.egd_allow.is_empty() {
        warn!("--egd-allow applies to --egd-tcp clients only, and there is no --egd-tcp");
    }
    let mut shares = egd::Shares::default();
    for (kind, weight) in &o.egd_share {
        match kind.as_str() {
            "tcp" => shares.tcp = *weight,
            _ => shares.unix = *weight,
        }
    }
    let config = egd::EgdConfig {
        admission: egd::Admission {
            max_clients: o.egd_max_clients as usize,
            max_per_peer: o.egd_max_per_peer as usize,
            allow_nets: o.egd_allow.clone(),
            allow_uids: o.egd_allow_uid.clone(),
            allow_gids: o.egd_allow_gid.clone(),
        },
        shares,
        rate_limit: o.egd_rate,
        ..egd::EgdConfig::default()
    };
    let stats = Arc::new(Mutex::new(egd::EgdStats::default()));
    let (tx, rx) = mpsc::channel::<egd::SourceBlock>(8);
    let st = stats.clone();
    tokio::spawn(async move {
        if let Err(e) = egd::serve(listeners, config, rx, st, closes).await {
            warn!("EGD server stopped: {e}");
        }
    });
    Ok((Some(tx), Some(stats), o.egd_unix.clone()))
}

/// Starts the kernel output if asked for: its block queue and statistics.
#[allow(clippy::type_complexity)]
pub(crate) fn start_kernel(
    o: &Outputs,
    closes: driver::GateCloses,
) -> Result<
    (
        Option<mpsc::Sender<kernel::KeyBlock>>,
        Option<Arc<Mutex<kernel::KernelStats>>>,
    ),
    Error,
> {
    let Some(bits) = o.kernel else {
        return Ok((None, None));
    };
    let config = kernel::KernelConfig::new(bits)?
        .with_pace(64, o.kernel_interval)
        .map_err(|_| Error::KernelInterval)?;
    // Fail now, with a clear message, rather than later in a task.
    let sink = kernel::RandomDevice::open().map_err(Error::KernelOpen)?;
    let stats = Arc::new(Mutex::new(kernel::KernelStats::default()));
    let (tx, rx) = mpsc::channel::<kernel::KeyBlock>(8);
    let st = stats.clone();
    if bits == 0 {
        info!("feeding the kernel without credit (--kernel=0)");
    } else {
        info!("feeding the kernel, crediting {bits} bits per byte");
    }
    tokio::spawn(async move {
        if let Err(e) = kernel::run_with(config, rx, st, sink, closes).await {
            warn!("kernel output stopped: {e}");
        }
    });
    Ok((Some(tx), Some(stats)))
}
