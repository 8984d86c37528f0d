//! The daemon (`run`, and `read`/`test`, which run it to a limit).

pub mod control;
mod dispatch;
mod keys;
mod notify;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::cli::KeySources;
use crate::cli::Outputs;
use crate::commands::test::test_verdict;
use crate::daemon::control::Daemon;
use crate::daemon::control::start_control;
use crate::daemon::dispatch::Dispatch;
use crate::daemon::dispatch::Turn;
use crate::daemon::keys::start_keys;
use crate::daemon::notify::Notifier;
use crate::keyring::{self, Keyring};
use crate::keys::driver::{self, Block, KeyStatus, SharedStatus};
use crate::keys::soft::{DEMO_SERIAL, demo_long_term_key};
use crate::metrics;
use crate::outputs::egd;
use crate::outputs::file::FileError;
use crate::outputs::file::Output;
use crate::outputs::file::open_output;
use crate::outputs::kernel;
use crate::outputs::start_egd;
use crate::outputs::start_kernel;
use crate::signals::{Signal, SignalKind, signal};
use ekey_proto::health::GateConfig;
use ekey_proto::keys::Serial;
use tokio::sync::mpsc;
use tracing::{info, warn};

/// The keyring lookups the sessions use; reloadable.
/// Why the daemon (or `read`, or `test`) could not start or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An output could not start.
    #[error(transparent)]
    Output(#[from] crate::outputs::Error),
    /// `--output` or `--record` cannot be used.
    #[error(transparent)]
    File(#[from] FileError),
    /// The keyring cannot be read.
    #[error(transparent)]
    Keyring(#[from] keyring::KeyringError),
    /// A bad health-gate setting (the message names the flag).
    #[error("{0}")]
    Health(String),
    /// `--kernel=auto` with the estimates turned off.
    #[error(
        "--kernel=auto credits the kernel by the keys' min-entropy estimates, but \
         --min-entropy-window 0 turns them off: give a window (at least 4096 bytes) or \
         a fixed credit (--kernel=BITS)"
    )]
    KernelAutoWithoutEstimates,
    /// `--kernel` with `--emulate`.
    #[error(
        "--kernel with --emulate would credit the kernel with bytes from its own \
         generator (the built-in software key's noise): refused"
    )]
    KernelWithEmulate,
    /// USB hot-plug events cannot be watched.
    #[error("cannot watch USB hot-plug events: {0}")]
    UsbWatch(io::Error),
    /// USB devices cannot be listed.
    #[error(
        "{0}; to use a key on a tty or socket give --device PATH, or --emulate for the built-in software key"
    )]
    UsbList(io::Error),
    /// `read` or `test` found no key on USB.
    #[error("no key found: no Entropy Key (USB 20df:0001) is attached")]
    NoKey,
    /// An explicit `--control` socket cannot be bound.
    #[error("control socket {}: {source}", path.display())]
    Control { path: PathBuf, source: io::Error },
    /// The metrics address cannot be bound.
    #[error("--metrics {addr}: {source}")]
    Metrics { addr: String, source: io::Error },
    /// A signal cannot be watched.
    #[error("cannot watch {name}: {source}")]
    Signal {
        name: &'static str,
        source: io::Error,
    },
    /// The kernel output ended.
    #[error("the kernel output stopped (see the log)")]
    KernelStopped,
    /// `--output` failed.
    #[error("cannot write output: {0}")]
    Write(io::Error),
    /// `read` was interrupted before its count.
    #[error("interrupted after {written} of {limit} bytes")]
    Interrupted { written: u64, limit: u64 },
    /// `read` ended short: the keys' reasons, joined.
    #[error("{0}")]
    Short(String),
    /// `test` did not pass (the report says why).
    #[error("{0}")]
    Test(String),
}

pub(crate) type SharedKeyring = Arc<RwLock<Keyring>>;

pub(crate) fn load_keyring(keys: &KeySources) -> Result<Keyring, Error> {
    let explicit = keys.keyring.as_path() != Path::new(keyring::DEFAULT_PATH);
    let mut ring = match Keyring::load(&keys.keyring) {
        Ok(r) => r,
        Err(e) if keys.emulate && !explicit => {
            tracing::debug!("no keyring: {e}");
            Keyring::new()
        }
        // No keyring yet: keys get "no long-term key in keyring" until one
        // is written (`ekey-host rekey`) and the daemon reloads (SIGHUP).
        Err(keyring::KeyringError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            warn!(
                "keyring {} does not exist yet: keys will give no entropy until it has their long-term keys",
                keys.keyring.display()
            );
            Keyring::new()
        }
        Err(e) => return Err(e.into()),
    };
    if let Ok(Some(w)) = keyring::check_permissions(&keys.keyring) {
        warn!("{w}");
    }
    if keys.emulate && !ring.contains(&DEMO_SERIAL) {
        ring.set(DEMO_SERIAL, demo_long_term_key());
    }
    Ok(ring)
}

/// Re-reads the keyring; on success swaps it in and tells the keys.
pub(crate) fn reload_keyring(
    ring: &SharedKeyring,
    path: &Path,
    emulate: bool,
    reload_tx: &tokio::sync::watch::Sender<u64>,
) -> Result<usize, keyring::KeyringError> {
    let mut fresh = Keyring::load(path)?;
    if emulate && !fresh.contains(&DEMO_SERIAL) {
        fresh.set(DEMO_SERIAL, demo_long_term_key());
    }
    let n = fresh.serials().len();
    *ring.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    reload_tx.send_modify(|g| *g += 1);
    Ok(n)
}

/// Every key's status, growing as keys are plugged in.
pub(crate) type SharedStatuses = Arc<Mutex<Vec<SharedStatus>>>;

/// `f` of each status entry of the key `serial` (a key has one, unless it
/// moved between transports).
fn of_key<T>(statuses: &SharedStatuses, serial: &Serial, f: impl Fn(&KeyStatus) -> T) -> Vec<T> {
    let list = statuses.lock().unwrap_or_else(|p| p.into_inner());
    list.iter()
        .filter_map(|st| {
            let st = st.lock().unwrap_or_else(|p| p.into_inner());
            (st.serial == Some(*serial)).then(|| f(&st))
        })
        .collect()
}

/// How many times each key's health gate has closed, for the outputs (they
/// withdraw bytes released before the latest closing).
pub(crate) fn gate_closes(statuses: &SharedStatuses) -> driver::GateCloses {
    let statuses = statuses.clone();
    Arc::new(move |serial: &Serial| {
        of_key(&statuses, serial, |st| st.gate.counters.times_closed)
            .into_iter()
            .max()
            .unwrap_or(0)
    })
}

/// `--kernel=auto`'s credit for each key: from the least of its latest
/// min-entropy estimates ([`kernel::auto_bits`]; 0 before the first).
pub(crate) fn auto_credits(statuses: &SharedStatuses) -> kernel::KeyCredits {
    let statuses = statuses.clone();
    Arc::new(move |serial: &Serial| {
        of_key(&statuses, serial, |st| {
            kernel::auto_bits(st.min_entropy.map(|e| e.min()))
        })
        .into_iter()
        .min()
        .unwrap_or(0)
    })
}

pub(crate) fn snapshot(statuses: &SharedStatuses) -> Vec<KeyStatus> {
    statuses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect()
}

/// The status entry for a key: a disconnected entry with the same serial
/// is reused (a re-plugged key keeps its history), else a new one.
pub(crate) fn add_status(
    statuses: &SharedStatuses,
    transport: String,
    serial: Option<&str>,
    gate: GateConfig,
    window: usize,
) -> SharedStatus {
    let mut list = statuses.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(serial) = serial {
        for st in list.iter() {
            let mut g = st.lock().unwrap_or_else(|p| p.into_inner());
            if !g.connected && g.serial.is_some_and(|s| s.to_string() == serial) {
                g.transport = transport;
                return st.clone();
            }
        }
    }
    let mut fresh = KeyStatus::with_gate(transport, gate, window);
    // Until the key names itself, the serial its USB descriptor gives.
    fresh.serial = serial.and_then(|s| Serial::from_pem(s.as_bytes()).ok());
    let st = Arc::new(Mutex::new(fresh));
    list.push(st.clone());
    st
}

/// What every key task shares.
#[derive(Clone)]
pub(crate) struct Ctx {
    pub(crate) gate: GateConfig,
    /// Bytes of each key's output the min-entropy estimators see.
    pub(crate) window: usize,
    pub(crate) ring: SharedKeyring,
    pub(crate) tx: mpsc::Sender<Block>,
    pub(crate) fail_tx: mpsc::UnboundedSender<(String, String)>,
    pub(crate) signals: driver::Signals,
    pub(crate) is_read: bool,
    /// Told when a key starts running (systemd readiness without delay).
    pub(crate) keyed: Arc<tokio::sync::Notify>,
}

/// The daemon's end of the channels its key drivers use.
struct Channels {
    rx: mpsc::Receiver<Block>,
    fail_rx: mpsc::UnboundedReceiver<(String, String)>,
    reload_tx: tokio::sync::watch::Sender<u64>,
    released_tx: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
}

/// The health gate's settings: the command line's, with the SP 800-90B
/// cutoffs for the credit `--kernel` gives.
fn gate_for(keys: &KeySources, outputs: &Outputs) -> Result<GateConfig, Error> {
    let mut gate = keys.health.gate_config().map_err(Error::Health)?;
    if let Some(credit) = outputs.kernel {
        // The SP 800-90B tests check the min-entropy we credit: cutoffs
        // for the credited bits per byte (α = 2⁻⁴⁰, W = 512; see
        // ekey_proto::health), the defaults being those for 7; for 6 or
        // fewer, those for 6 (stricter than such a credit needs). `auto`
        // credits at most 7.
        (gate.rct_cutoff, gate.apt_cutoff) = match credit {
            kernel::Credit::Bits(8) => (6, 19),
            kernel::Credit::Bits(7) | kernel::Credit::Auto => (7, 26),
            kernel::Credit::Bits(_) => (8, 35),
        };
    }
    Ok(gate)
}

/// The context every key driver gets, and the daemon's ends of its channels.
fn make_ctx(
    gate: GateConfig,
    window: usize,
    ring: &SharedKeyring,
    is_read: bool,
) -> (Ctx, Channels) {
    let (tx, rx) = mpsc::channel::<Block>(64);
    let (fail_tx, fail_rx) = mpsc::unbounded_channel::<(String, String)>();
    let (reload_tx, reload_rx) = tokio::sync::watch::channel(0u64);
    let (released_tx, released_rx) = tokio::sync::watch::channel(Arc::new(BTreeSet::new()));
    let ctx = Ctx {
        gate,
        window,
        ring: ring.clone(),
        tx,
        fail_tx,
        signals: driver::Signals {
            reload: reload_rx,
            released: released_rx,
        },
        is_read,
        keyed: Arc::new(tokio::sync::Notify::new()),
    };
    let channels = Channels {
        rx,
        fail_rx,
        reload_tx,
        released_tx,
    };
    (ctx, channels)
}

/// What `run` started, for the main loop and for the end.
struct Started {
    statuses: SharedStatuses,
    ring: SharedKeyring,
    dispatch: Dispatch,
    out: Option<Output>,
    fail_rx: mpsc::UnboundedReceiver<(String, String)>,
    reload_tx: tokio::sync::watch::Sender<u64>,
    keyed: Arc<tokio::sync::Notify>,
    /// Keys started at the beginning.
    sources: usize,
    /// Files to remove at the end: the control socket, the EGD socket.
    sockets: Vec<PathBuf>,
    /// The EGD TLS listener's files, reloaded with the keyring.
    tls: crate::outputs::TlsReload,
}

/// Starts the outputs, the keys, the control socket and the metrics.
async fn start(keys: &KeySources, outputs: &Outputs, is_read: bool) -> Result<Started, Error> {
    let statuses: SharedStatuses = Arc::new(Mutex::new(Vec::new()));
    let closes = gate_closes(&statuses);
    let egd = start_egd(outputs, closes.clone()).await?;
    let (egd_tx, egd_stats) = (egd.tx, egd.stats);
    if outputs.kernel.is_some() && keys.emulate {
        return Err(Error::KernelWithEmulate);
    }
    if outputs.kernel == Some(kernel::Credit::Auto) && keys.health.min_entropy_window == 0 {
        return Err(Error::KernelAutoWithoutEstimates);
    }
    let lookups = kernel::KeyLookups {
        closes,
        credits: Some(auto_credits(&statuses)),
    };
    let (kernel_tx, kernel_stats) = start_kernel(outputs, lookups)?;
    let ring: SharedKeyring = Arc::new(RwLock::new(load_keyring(keys)?));
    let out = open_output(outputs.output.as_deref())?;
    let (ctx, channels) = make_ctx(
        gate_for(keys, outputs)?,
        keys.health.min_entropy_window,
        &ring,
        is_read,
    );
    let keyed = ctx.keyed.clone();
    let sources = start_keys(keys, ctx, &statuses).await?;
    let mut sockets: Vec<PathBuf> = egd.unix_path.into_iter().collect();
    sockets.extend(egd.vhost_sockets);
    let daemon = Daemon {
        statuses: statuses.clone(),
        started: std::time::Instant::now(),
        ring: ring.clone(),
        keyring_path: keys.keyring.clone(),
        emulate: keys.emulate,
        reload_tx: channels.reload_tx.clone(),
        released_tx: channels.released_tx,
        egd: egd_stats.clone(),
        tls: egd.tls.clone(),
        kernel: kernel_stats.clone(),
        kernel_credit: outputs.kernel,
        vhost: egd.vhost.clone(),
    };
    if !is_read {
        sockets.extend(start_control(outputs.control.clone(), daemon)?);
    }
    if let Some(addr) = &outputs.metrics {
        let file = out.as_ref().map(|o| o.written.clone());
        let outs = MetricsOutputs {
            egd: egd_stats,
            kernel: kernel_stats,
            vhost: egd.vhost.clone(),
            file,
        };
        start_metrics(addr, &statuses, outs).await?;
    }
    let dispatch = Dispatch {
        rx: channels.rx,
        pending: None,
        egd: egd_tx,
        kernel: kernel_tx,
        file: out.as_ref().map(|o| o.tx.clone()),
        limit: outputs.limit,
        written: 0,
    };
    Ok(Started {
        statuses,
        ring,
        dispatch,
        out,
        fail_rx: channels.fail_rx,
        reload_tx: channels.reload_tx,
        keyed,
        sources,
        sockets,
        tls: egd.tls,
    })
}

/// The outputs' counters `/metrics` shows.
struct MetricsOutputs {
    egd: Option<Arc<Mutex<egd::EgdStats>>>,
    kernel: Option<Arc<Mutex<kernel::KernelStats>>>,
    vhost: Option<crate::outputs::VhostStats>,
    file: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Serves `/metrics` on `addr`.
async fn start_metrics(
    addr: &str,
    statuses: &SharedStatuses,
    outs: MetricsOutputs,
) -> Result<(), Error> {
    let MetricsOutputs {
        egd,
        kernel,
        vhost,
        file,
    } = outs;
    let listener = egd::bind_tcp(addr).await.map_err(|source| Error::Metrics {
        addr: addr.to_string(),
        source,
    })?;
    if let Ok(a) = listener.local_addr() {
        info!("metrics on http://{a}/metrics");
    }
    let statuses = statuses.clone();
    tokio::spawn(metrics::serve(listener, move || metrics::Snapshot {
        keys: snapshot(&statuses),
        egd: egd
            .as_ref()
            .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        kernel: kernel
            .as_ref()
            .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()).clone()),
        vhost_user: vhost.as_ref().map(crate::outputs::vhost_json),
        file_bytes: file
            .as_ref()
            .map_or(0, |w| w.load(std::sync::atomic::Ordering::Relaxed)),
    }));
    Ok(())
}

/// Why the main loop ended, and what `read` and `test` learnt on the way.
#[derive(Default)]
struct Outcome {
    /// `test`: every key tested its blocks.
    tested: bool,
    interrupted: bool,
    /// Keys that stopped or failed (`read`, `test`), by transport.
    failures: BTreeMap<String, String>,
}

/// The main loop's timers and signals.
struct Loop {
    gate_tick: tokio::time::Interval,
    status_tick: tokio::time::Interval,
    notify_tick: tokio::time::Interval,
    notify: Option<Notifier>,
    sigterm: Signal,
    sigint: Signal,
    sighup: Signal,
    /// Whether the failure channel is still open.
    fail_open: bool,
    t0: tokio::time::Instant,
    deadline: Option<tokio::time::Instant>,
}

impl Loop {
    fn new(outputs: &Outputs, read_timeout: Option<Duration>) -> Result<Self, Error> {
        let is_read = read_timeout.is_some();
        // systemd (Type=notify): READY=1 once a key is keyed (or at once with
        // --no-wait), WATCHDOG=1 from this loop while it turns, STATUS= lines.
        let notify = (!is_read).then(|| Notifier::new(outputs.no_wait));
        let period = notify.as_ref().and_then(|n| n.period);
        let mut notify_tick = tokio::time::interval(period.unwrap_or(Duration::from_secs(5)));
        notify_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let t0 = tokio::time::Instant::now();
        let watch = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|source| Error::Signal { name, source })
        };
        Ok(Self {
            gate_tick: tokio::time::interval(Duration::from_millis(250)),
            status_tick: tokio::time::interval(Duration::from_millis(500)),
            notify_tick,
            notify,
            sigterm: watch(SignalKind::terminate(), "SIGTERM")?,
            sigint: watch(SignalKind::interrupt(), "SIGINT")?,
            sighup: watch(SignalKind::hangup(), "SIGHUP")?,
            fail_open: true,
            t0,
            // A timeout too large to add is no timeout.
            deadline: read_timeout.and_then(|d| t0.checked_add(d)),
        })
    }
}

/// `read` and `test`, every quarter second: whether to stop (every key
/// tested, or every key's gate closed).
fn read_check(s: &Started, test_blocks: Option<u64>, outcome: &mut Outcome) -> bool {
    if let Some(n) = test_blocks {
        let keys = snapshot(&s.statuses);
        let done = keys
            .iter()
            .filter(|k| k.gate.counters.blocks_tested >= n)
            .count();
        outcome.tested = done + outcome.failures.len() >= s.sources && done > 0;
        return outcome.tested;
    }
    // `read` gives up on a key whose health gate closed.
    for st in snapshot(&s.statuses) {
        if !st.gate.open {
            let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
            let why = st
                .gate
                .reason
                .map_or_else(String::new, |r| format!(": {r}"));
            outcome.failures.insert(
                st.transport.clone(),
                format!("key {serial}: health gate closed{why}"),
            );
        }
    }
    outcome.failures.len() >= s.sources
}

/// Runs until the limit, a signal, `read`'s end, or the outputs' end.
async fn main_loop(
    s: &mut Started,
    keys: &KeySources,
    outputs: &Outputs,
    read_timeout: Option<Duration>,
) -> Result<Outcome, Error> {
    let is_read = read_timeout.is_some();
    let live = io::stderr().is_terminal() && !is_read;
    let mut l = Loop::new(outputs, read_timeout)?;
    let mut outcome = Outcome::default();
    while !s.dispatch.done() {
        tokio::select! {
            turn = s.dispatch.turn() => match turn {
                Turn::Moved => {}
                Turn::Ended => break,
                Turn::KernelStopped => return Err(Error::KernelStopped),
            },
            _ = l.gate_tick.tick(), if is_read => {
                if read_check(s, outputs.test_blocks, &mut outcome) {
                    break;
                }
            }
            f = s.fail_rx.recv(), if is_read && l.fail_open => {
                let Some((source, reason)) = f else {
                    l.fail_open = false;
                    continue;
                };
                outcome.failures.insert(source, reason);
                if outcome.failures.len() >= s.sources {
                    break;
                }
            }
            _ = sleep_until_opt(l.deadline) => {
                let secs = read_timeout.unwrap_or_default().as_secs();
                outcome.failures.insert(String::new(), format!("timed out after {secs} s waiting for entropy"));
                break;
            }
            _ = l.sigint.recv() => {
                outcome.interrupted = true;
                break;
            }
            _ = l.sigterm.recv() => {
                outcome.interrupted = true;
                break;
            }
            _ = l.sighup.recv() => {
                match reload_keyring(&s.ring, &keys.keyring, keys.emulate, &s.reload_tx) {
                    Ok(n) => info!("keyring {} reloaded: {n} keys", keys.keyring.display()),
                    Err(e) => warn!("keyring not reloaded, keeping the old one: {e}"),
                }
                s.tls.reload();
            }
            _ = l.status_tick.tick(), if live => {
                print_status_line(&s.statuses, s.dispatch.written, l.t0.elapsed());
            }
            _ = s.keyed.notified(), if l.notify.as_ref().is_some_and(|n| !n.ready) => {
                if let Some(n) = l.notify.as_mut() {
                    n.tick(&snapshot(&s.statuses));
                }
            }
            _ = l.notify_tick.tick(), if l.notify.is_some() => {
                if let Some(n) = l.notify.as_mut() {
                    n.tick(&snapshot(&s.statuses));
                }
            }
        }
    }
    if l.notify.is_some() {
        notify::stopping();
    }
    if live {
        eprintln!();
    }
    Ok(outcome)
}

/// `run` and `read`: drive every key, write blocks to the output until the
/// limit (if any) or a signal.
pub(crate) async fn run(
    keys: KeySources,
    outputs: Outputs,
    read_timeout: Option<Duration>,
) -> Result<(), Error> {
    let is_read = read_timeout.is_some();
    let mut s = start(&keys, &outputs, is_read).await?;
    let mut outcome = main_loop(&mut s, &keys, &outputs, read_timeout).await?;
    let written = s.dispatch.written;
    // Let the output thread write what it has (whole blocks), then stop.
    drop(s.dispatch);
    let output_error = match s.out.take() {
        Some(o) => o.finish().await,
        None => None,
    };
    for p in &s.sockets {
        let _ = std::fs::remove_file(p);
    }
    if let Some(e) = output_error {
        return Err(Error::Write(e));
    }
    while let Ok((source, reason)) = s.fail_rx.try_recv() {
        outcome.failures.insert(source, reason);
    }
    if let Some(n) = outputs.test_blocks {
        let keys = snapshot(&s.statuses);
        return test_verdict(
            &keys,
            n,
            outcome.tested,
            outcome.interrupted,
            outcome.failures,
        )
        .map_err(Error::Test);
    }
    if is_read && outputs.limit.is_some_and(|l| written < l) {
        // Nothing verified arrived: leave no empty file behind.
        if written == 0
            && let Some(p) = outputs.output.as_deref().filter(|p| p.as_os_str() != "-")
        {
            let _ = std::fs::remove_file(p);
        }
        if outcome.interrupted {
            let limit = outputs.limit.unwrap_or(0);
            return Err(Error::Interrupted { written, limit });
        }
        let reasons: Vec<String> = outcome.failures.into_values().collect();
        return Err(Error::Short(if reasons.is_empty() {
            "the keys stopped before delivering enough entropy".into()
        } else {
            reasons.join("; ")
        }));
    }
    Ok(())
}

pub(crate) async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub(crate) fn print_status_line(statuses: &SharedStatuses, bytes: u64, elapsed: Duration) {
    let mut line = String::new();
    for st in snapshot(statuses) {
        let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
        let temp = st
            .info
            .temperature
            .map_or_else(|| "-".to_string(), |t| format!("{:.1} °C", t.celsius()));
        line.push_str(&format!("key {serial}: {} · {temp} · ", st.state));
    }
    let rate = bytes as f64 / elapsed.as_secs_f64().max(0.001);
    eprint!("\r\x1b[K{line}{bytes} bytes · {rate:.0} B/s");
}
