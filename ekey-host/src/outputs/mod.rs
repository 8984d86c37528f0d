//! The daemon's outputs, and starting them.

pub mod egd;
pub mod file;
pub mod kernel;
#[cfg(vhost_user)]
pub mod vhost_user;

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
    /// The EGD TLS address cannot be bound.
    #[error("--egd-tls {addr}: {source}")]
    EgdTls { addr: String, source: io::Error },
    /// A vhost-user socket or folder cannot be served.
    #[error("--{flag} {}: {source}", path.display())]
    VhostUser {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// Two `--vhost-user-rng` sockets would give guests the same name.
    #[error("--vhost-user-rng: two sockets named {0:?} (a guest is named after its socket's file)")]
    VhostUserName(String),
    /// vhost-user is Linux's, and a build feature.
    #[error(
        "--vhost-user-rng and --vhost-user-rng-dir are Linux only, and this ekey-host was \
         built without them (cargo feature `vhost-user`, on by default)"
    )]
    VhostUserUnsupported,
    /// The TLS files cannot be used.
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// `--egd-tls` in a build without the `tls` feature.
    #[cfg(not(feature = "tls"))]
    #[error("--egd-tls: this ekey-host was built without TLS (cargo feature `tls`)")]
    NoTls,
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

/// What [`start_egd`] started.
#[derive(Default)]
pub(crate) struct EgdStarted {
    /// The server's block queue.
    pub(crate) tx: Option<mpsc::Sender<egd::SourceBlock>>,
    /// Its statistics.
    pub(crate) stats: Option<Arc<Mutex<egd::EgdStats>>>,
    /// The Unix socket to remove at the end.
    pub(crate) unix_path: Option<PathBuf>,
    /// The TLS listener's settings, to reload.
    pub(crate) tls: TlsReload,
    /// The vhost-user guests' counters, if any are served.
    pub(crate) vhost: Option<VhostStats>,
    /// The vhost-user sockets to remove at the end.
    pub(crate) vhost_sockets: Vec<PathBuf>,
}

/// The vhost-user guests' counters.
#[cfg(vhost_user)]
pub(crate) type VhostStats = vhost_user::SharedStats;
/// No vhost-user here.
#[cfg(not(vhost_user))]
pub(crate) type VhostStats = Arc<Mutex<()>>;

/// The vhost-user guests' counters as JSON (status `vhost_user`).
pub(crate) fn vhost_json(stats: &VhostStats) -> serde_json::Value {
    let stats = stats.lock().unwrap_or_else(|e| e.into_inner());
    #[cfg(vhost_user)]
    {
        stats.to_json()
    }
    #[cfg(not(vhost_user))]
    {
        let () = *stats;
        serde_json::Value::Null
    }
}

#[cfg(vhost_user)]
impl vhost_user::Connector for egd::InternalConnector {
    fn connect(&self, name: &str) -> Option<tokio::io::DuplexStream> {
        egd::InternalConnector::connect(self, name)
    }
}

/// `--egd-mode` as a number.
fn socket_mode(o: &Outputs) -> Result<u32, Error> {
    u32::from_str_radix(o.egd_mode.trim(), 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| Error::EgdMode(o.egd_mode.clone()))
}

/// The vhost-user sockets and folder asked for, and an in-process
/// listener for their guests.
#[cfg(vhost_user)]
struct VhostPlan {
    sockets: Vec<(PathBuf, String)>,
    /// `--egd-mode` and `--egd-group`, for the sockets.
    mode: u32,
    group: Option<u32>,
    dir: Option<PathBuf>,
    connector: egd::InternalConnector,
}

/// Checks the vhost-user options and makes the hub's in-process listener.
#[cfg(vhost_user)]
fn plan_vhost(
    o: &Outputs,
    listeners: &mut Vec<egd::EgdListener>,
) -> Result<Option<VhostPlan>, Error> {
    if o.vhost_user_rng.is_empty() && o.vhost_user_rng_dir.is_none() {
        return Ok(None);
    }
    let mut sockets = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for path in &o.vhost_user_rng {
        let name = path
            .file_name()
            .and_then(vhost_user::guest_name)
            .ok_or_else(|| Error::VhostUser {
                flag: "vhost-user-rng",
                path: path.clone(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the socket needs a file name in UTF-8 (it names the guest)",
                ),
            })?;
        if !names.insert(name.clone()) {
            return Err(Error::VhostUserName(name));
        }
        sockets.push((path.clone(), name));
    }
    let mode = socket_mode(o)?;
    let (connector, listener) = egd::internal_listener();
    listeners.push(listener);
    Ok(Some(VhostPlan {
        sockets,
        mode,
        group: o.egd_group,
        dir: o.vhost_user_rng_dir.clone(),
        connector,
    }))
}

/// Serves the planned vhost-user sockets (once the hub runs).
#[cfg(vhost_user)]
fn start_vhost(plan: VhostPlan) -> Result<(VhostStats, Vec<PathBuf>), Error> {
    let stats = VhostStats::default();
    let connector: Arc<dyn vhost_user::Connector> = Arc::new(plan.connector);
    let runtime = tokio::runtime::Handle::current();
    let mut paths = Vec::new();
    for (path, name) in plan.sockets {
        let at = |source| Error::VhostUser {
            flag: "vhost-user-rng",
            path: path.clone(),
            source,
        };
        vhost_user::spawn_socket(
            &path,
            &name,
            connector.clone(),
            stats.clone(),
            runtime.clone(),
        )
        .map_err(at)?;
        // Who may connect: as for --egd-unix.
        if let Some(gid) = plan.group {
            std::os::unix::fs::chown(&path, None, Some(gid)).map_err(at)?;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(plan.mode)).map_err(at)?;
        info!(
            "vhost-user-rng: guest {name} on {} (mode {:o})",
            path.display(),
            plan.mode
        );
        paths.push(path);
    }
    if let Some(dir) = plan.dir {
        vhost_user::spawn_dir(&dir, connector, stats.clone(), runtime).map_err(|source| {
            Error::VhostUser {
                flag: "vhost-user-rng-dir",
                path: dir.clone(),
                source,
            }
        })?;
        info!(
            "vhost-user-rng: serving every socket created in {}",
            dir.display()
        );
    }
    Ok((stats, paths))
}

/// The TLS listener's settings, if there is one: what SIGHUP and the
/// control socket's `reload` re-read.
#[derive(Clone, Default)]
pub(crate) struct TlsReload {
    #[cfg(feature = "tls")]
    server: Option<Arc<crate::tls::TlsServer>>,
}

impl TlsReload {
    /// Re-reads the certificate, key and client CA, and logs the outcome;
    /// `None` without a TLS listener. On an error the files in use are kept.
    pub(crate) fn reload(&self) -> Option<Result<(), String>> {
        #[cfg(feature = "tls")]
        if let Some(server) = &self.server {
            let files = server.files();
            let done = server.reload().map_err(|e| e.to_string());
            match &done {
                Ok(()) => info!(
                    "TLS files reloaded: {}, {}, client CA {}",
                    files.cert.display(),
                    files.key.display(),
                    files.client_ca.display()
                ),
                Err(e) => warn!("TLS files not reloaded, keeping the old ones: {e}"),
            }
            return Some(done);
        }
        None
    }
}

/// The TLS listener, bound, with its settings read.
#[cfg(feature = "tls")]
async fn bind_tls(
    o: &Outputs,
    addr: &str,
) -> Result<(egd::EgdListener, Arc<crate::tls::TlsServer>), Error> {
    let (Some(cert), Some(key), Some(client_ca)) = (&o.tls_cert, &o.tls_key, &o.tls_client_ca)
    else {
        // clap requires all three with --egd-tls.
        return Err(Error::EgdTls {
            addr: addr.to_string(),
            source: io::Error::other("needs --tls-cert, --tls-key and --tls-client-ca"),
        });
    };
    let server = crate::tls::TlsServer::load(crate::tls::ServerFiles {
        cert: cert.clone(),
        key: key.clone(),
        client_ca: client_ca.clone(),
    })?;
    let l = egd::bind_tcp(addr).await.map_err(|source| Error::EgdTls {
        addr: addr.to_string(),
        source,
    })?;
    if let Ok(a) = l.local_addr() {
        info!(
            "EGD server on tls {a} (certificate {}, clients of {})",
            cert.display(),
            client_ca.display()
        );
    }
    let server = Arc::new(server);
    Ok((egd::EgdListener::Tls(l, server.clone()), server))
}

/// The EGD server's settings from the command line (warning about
/// allow-lists that no listener uses).
fn egd_config(o: &Outputs) -> egd::EgdConfig {
    if o.egd_unix.is_none() && !(o.egd_allow_uid.is_empty() && o.egd_allow_gid.is_empty()) {
        warn!(
            "--egd-allow-uid/--egd-allow-gid apply to --egd-unix clients only, and there is no --egd-unix"
        );
    }
    if o.egd_tcp.is_none() && o.egd_tls.is_none() && !o.egd_allow.is_empty() {
        warn!("--egd-allow applies to --egd-tcp and --egd-tls clients only, and there is neither");
    }
    let mut shares = egd::Shares::default();
    for (kind, weight) in &o.egd_share {
        match kind.as_str() {
            "tcp" => shares.tcp = *weight,
            "tls" => shares.tls = *weight,
            "vhost-user" => shares.vhost_user = *weight,
            _ => shares.unix = *weight,
        }
    }
    egd::EgdConfig {
        admission: egd::Admission {
            max_clients: o.egd_max_clients as usize,
            max_per_peer: o.egd_max_per_peer as usize,
            allow_nets: o.egd_allow.clone(),
            allow_uids: o.egd_allow_uid.clone(),
            allow_gids: o.egd_allow_gid.clone(),
            allow_subjects: o.egd_allow_subject.clone(),
        },
        shares,
        rate_limit: o.egd_rate,
        ..egd::EgdConfig::default()
    }
}

/// Starts the EGD server if asked for.
pub(crate) async fn start_egd(
    o: &Outputs,
    closes: driver::GateCloses,
) -> Result<EgdStarted, Error> {
    let mut listeners = Vec::new();
    let mut tls = TlsReload::default();
    if let Some(addr) = &o.egd_tls {
        #[cfg(feature = "tls")]
        {
            let (l, server) = bind_tls(o, addr).await?;
            tls.server = Some(server);
            listeners.push(l);
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (addr, &mut tls);
            return Err(Error::NoTls);
        }
    }
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
        let mode = socket_mode(o)?;
        let l = egd::bind_unix(path, mode, o.egd_group).map_err(|source| Error::EgdUnix {
            path: path.clone(),
            source,
        })?;
        info!("EGD server on unix {} (mode {mode:o})", path.display());
        #[cfg(unix)]
        listeners.push(egd::EgdListener::Unix(l));
        #[cfg(not(unix))]
        match l {}
    }
    #[cfg(vhost_user)]
    let vhost_plan = plan_vhost(o, &mut listeners)?;
    #[cfg(not(vhost_user))]
    if !o.vhost_user_rng.is_empty() || o.vhost_user_rng_dir.is_some() {
        return Err(Error::VhostUserUnsupported);
    }
    if listeners.is_empty() {
        return Ok(EgdStarted::default());
    }
    let config = egd_config(o);
    let stats = Arc::new(Mutex::new(egd::EgdStats::default()));
    let (tx, rx) = mpsc::channel::<egd::SourceBlock>(8);
    let st = stats.clone();
    tokio::spawn(async move {
        if let Err(e) = egd::serve(listeners, config, rx, st, closes).await {
            warn!("EGD server stopped: {e}");
        }
    });
    #[cfg(vhost_user)]
    let (vhost, vhost_sockets) = match vhost_plan {
        Some(plan) => {
            let (stats, paths) = start_vhost(plan)?;
            (Some(stats), paths)
        }
        None => (None, Vec::new()),
    };
    #[cfg(not(vhost_user))]
    let (vhost, vhost_sockets) = (None, Vec::new());
    Ok(EgdStarted {
        tx: Some(tx),
        stats: Some(stats),
        unix_path: o.egd_unix.clone(),
        tls,
        vhost,
        vhost_sockets,
    })
}

/// Starts the kernel output if asked for: its block queue and statistics.
#[allow(clippy::type_complexity)]
pub(crate) fn start_kernel(
    o: &Outputs,
    keys: kernel::KeyLookups,
) -> Result<
    (
        Option<mpsc::Sender<kernel::KeyBlock>>,
        Option<Arc<Mutex<kernel::KernelStats>>>,
    ),
    Error,
> {
    let Some(credit) = o.kernel else {
        return Ok((None, None));
    };
    let config = kernel::KernelConfig::for_credit(credit)?
        .with_pace(64, o.kernel_interval)
        .map_err(|_| Error::KernelInterval)?
        .with_reseed(o.kernel_reseed_interval);
    // Fail now, with a clear message, rather than later in a task.
    let sink = kernel::RandomDevice::open().map_err(Error::KernelOpen)?;
    let stats = Arc::new(Mutex::new(kernel::KernelStats::default()));
    let (tx, rx) = mpsc::channel::<kernel::KeyBlock>(8);
    let st = stats.clone();
    let generations = crate::vmgenid::watch_or_say("kernel");
    match credit {
        kernel::Credit::Bits(0) => info!("feeding the kernel without credit (--kernel=0)"),
        kernel::Credit::Bits(bits) => info!("feeding the kernel, crediting {bits} bits per byte"),
        kernel::Credit::Auto => info!(
            "feeding the kernel, crediting each key's bytes with 7/8 of its min-entropy \
             estimate (at most {} bits per byte; none before its first estimate)",
            kernel::AUTO_MAX_BITS
        ),
    }
    tokio::spawn(async move {
        if let Err(e) = kernel::run_with(config, rx, st, sink, keys, generations).await {
            warn!("kernel output stopped: {e}");
        }
    });
    Ok((Some(tx), Some(stats)))
}
