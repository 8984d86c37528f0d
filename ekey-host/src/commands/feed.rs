//! `ekey-host feed`: keep this machine's kernel fed from an EGD server.
//!
//! The guest-side counterpart of the daemon's EGD output, for virtual
//! machines whose hypervisor offers no virtio-rng (and a replacement for
//! ekeyd's `ekey-egd-linux`): connect to an EGD server (PROTOCOL.md §9) over
//! TCP, TLS (`tls://HOST:PORT`) or a Unix socket, fetch bytes with blocking reads (`0x02 n`, n ≤ 255,
//! as QEMU's `rng-egd` does) and mix them into the local kernel's pool with
//! `RNDADDENTROPY` (needs CAP_SYS_ADMIN).
//!
//! The pace is the daemon's kernel output policy, reused from [`kernel`]: a
//! [`KernelFeeder`] fills the pool as fast as the server delivers while the
//! kernel's CRNG is not initialised, then mixes in `--bytes-per-interval`
//! bytes every `--interval`. Bytes are requested only when the feeder wants
//! them, never ahead (backpressure): while topping up, the connection is idle
//! between mixes.
//!
//! When the server cannot be reached or goes away, `feed` retries with
//! exponential back-off (`--retry-min`, doubling up to `--retry-max`; reset
//! once a connection has delivered data). A reply that does not arrive within
//! `--read-timeout` counts as a lost connection. Bytes of a reply cut short
//! are dropped, never credited.
//!
//! It logs what it does (connections; losses and retries, each failed
//! attempt at first, then every tenth; mode changes; a summary every
//! `--status-interval` and on SIGUSR1) and stops on SIGTERM or SIGINT with a
//! final summary (`feed: stopped: N bytes written, N bits credited, N ioctl
//! failures; …`). It has no control socket: the log is its status.
//!
//! **Trust.** Every byte received is credited with `--bits-per-byte` bits
//! (0: mixed in, never credited):
//! only point `feed` at an EGD server you trust to serve verified entropy
//! (`ekey-host run --egd-tcp …` on the host serves only bytes that passed
//! the key's health checks), over a path you trust. Across a network,
//! use `--egd tls://HOST:PORT` (the daemon's `--egd-tls`): `feed` checks the
//! server's certificate against `--tls-ca` for HOST (a name or an address)
//! and shows its own (`--tls-cert`, `--tls-key`), so nobody on the way can
//! read, change or impersonate the stream.

use std::fmt;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::signal::unix::{SignalKind, signal};
use tokio::time::Instant;
use tracing::{info, warn};
use zeroize::{Zeroize, Zeroizing};

use crate::outputs::kernel::{self, EntropySink, KernelConfig, KernelFeeder, KernelStats, Mode};

/// Largest EGD blocking read (`0x02 n`): `n` is one byte.
pub const MAX_REQUEST: usize = 255;

/// Consecutive failed connection attempts logged one by one; after that,
/// every tenth.
const QUIET_AFTER: u64 = 5;

/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Bytes the `--test-discard` sink takes before it reports the CRNG as
/// initialised.
const DISCARD_INIT_AFTER: u64 = 1024;

/// `ekey-host feed`: the options.
#[derive(clap::Args, Debug, Clone)]
pub struct FeedArgs {
    /// The EGD server: HOST:PORT (TCP), tls://HOST:PORT (TLS, with
    /// --tls-ca, --tls-cert and --tls-key), or the path of a Unix socket
    /// (any other value containing '/', or an existing socket).
    #[arg(long, value_name = "HOST:PORT|tls://HOST:PORT|PATH", value_parser = parse_egd_addr)]
    pub egd: EgdAddr,
    /// With tls://: the CA certificates (PEM) the server's certificate must
    /// chain to; it must name HOST (as a DNS name or an IP address).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// With tls://: this client's certificate chain (PEM), for the server to
    /// check.
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// With tls://: this client's private key (PEM); must not be readable
    /// by group or others.
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Entropy credited per byte received, 0..=8 (0 mixes the bytes in
    /// without credit, as the daemon's `--kernel=0`).
    #[arg(
        long,
        value_name = "N",
        default_value_t = KernelConfig::default().bits_per_byte,
        value_parser = clap::value_parser!(u8).range(0..=8)
    )]
    pub bits_per_byte: u8,
    /// Once the kernel's CRNG is initialised: mix in --bytes-per-interval
    /// bytes this often (e.g. 10s, 500ms, 2m). Before that, as fast as the
    /// server delivers.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Once the CRNG is initialised: after a mixing write, have the kernel
    /// reseed it at once (RNDRESEEDCRNG), at most this often; 0 for never.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub reseed_interval: Duration,
    /// When this VM turns out to be a restored snapshot or a clone (the
    /// kernel announces a new VM generation ID: QEMU's `-device vmgenid`),
    /// fetch this many bytes at once, credit them and reseed; 0 to not
    /// watch.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub on_vmgenid_bytes: usize,
    /// Bytes mixed in every --interval once the CRNG is initialised.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 64,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub bytes_per_interval: u16,
    /// Log a summary (bytes written, bits credited, ioctl failures,
    /// connections) this often; 0 for never. SIGUSR1 logs one at once.
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub status_interval: Duration,
    /// First delay before reconnecting to the server; doubles after every
    /// failed attempt.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub retry_min: Duration,
    /// Longest delay between reconnection attempts.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub retry_max: Duration,
    /// Reconnect when a reply makes no progress for this long (a server
    /// that is gone without closing the connection, or has no entropy);
    /// 0 to wait forever.
    #[arg(long, value_name = "DURATION", default_value = "2m", value_parser = parse_duration)]
    pub read_timeout: Duration,
    /// Exit (successfully) once this many bytes have been received and
    /// given to the kernel.
    #[arg(long, value_name = "BYTES")]
    pub max_bytes: Option<u64>,
    /// Tests only: count the bytes but discard them instead of writing them
    /// to /dev/random (no root needed); the CRNG is reported initialised
    /// after 1024 bytes.
    #[arg(long, hide = true)]
    pub test_discard: bool,
}

/// Where the EGD server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EgdAddr {
    /// `HOST:PORT` (resolved at every connection attempt).
    Tcp(String),
    /// A Unix stream socket.
    Unix(PathBuf),
    /// `tls://HOST:PORT`: TLS over TCP, the server's certificate checked
    /// for HOST.
    Tls(String),
}

impl fmt::Display for EgdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EgdAddr::Tcp(a) => write!(f, "tcp {a}"),
            EgdAddr::Unix(p) => write!(f, "unix {}", p.display()),
            EgdAddr::Tls(a) => write!(f, "tls {a}"),
        }
    }
}

/// The TLS settings of a `tls://` server (none for the others).
#[derive(Clone, Default)]
struct TlsDial {
    #[cfg(feature = "tls")]
    connector: Option<crate::tls::TlsConnector>,
}

impl fmt::Debug for TlsDial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TlsDial")
    }
}

/// A connection to the server.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Conn = Box<dyn Io>;

impl EgdAddr {
    async fn connect(&self, tls: &TlsDial) -> io::Result<Conn> {
        match self {
            EgdAddr::Tcp(addr) => Ok(Box::new(tcp_connect(addr).await?)),
            EgdAddr::Unix(path) => Ok(Box::new(UnixStream::connect(path).await?)),
            #[cfg(feature = "tls")]
            EgdAddr::Tls(addr) => {
                let connector = tls.connector.as_ref().ok_or_else(|| {
                    io::Error::other("tls:// needs --tls-ca, --tls-cert and --tls-key")
                })?;
                let host = tls_host(addr)?;
                let tcp = tcp_connect(addr).await?;
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(host, tcp))
                    .await
                    .map_err(|_| {
                        io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out")
                    })??;
                Ok(Box::new(stream))
            }
            #[cfg(not(feature = "tls"))]
            EgdAddr::Tls(_) => {
                let _ = tls;
                Err(io::Error::other(NO_TLS))
            }
        }
    }
}

#[cfg(not(feature = "tls"))]
const NO_TLS: &str = "this ekey-host was built without TLS (cargo feature `tls`)";

async fn tcp_connect(addr: &str) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// The name the server's certificate must have: HOST of HOST:PORT
/// (an IPv6 address without its brackets).
#[cfg(feature = "tls")]
fn tls_host(addr: &str) -> io::Result<rustls_pki_types::ServerName<'static>> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    rustls_pki_types::ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host:?} is not a host name or address: {e}"),
        )
    })
}

/// Parses `--egd`: a Unix socket if `s` contains '/' or names an existing
/// socket, else `HOST:PORT` (`[v6]:PORT` for IPv6 literals).
pub fn parse_egd_addr(s: &str) -> Result<EgdAddr, String> {
    classify_egd_addr(s, is_socket(Path::new(s)))
}

fn is_socket(path: &Path) -> bool {
    path.metadata().is_ok_and(|m| m.file_type().is_socket())
}

fn classify_egd_addr(s: &str, is_socket: bool) -> Result<EgdAddr, String> {
    if let Some(rest) = s.strip_prefix("tls://") {
        if let Err(why) = host_port(rest) {
            return Err(format!("{s:?}: {why} (expected tls://HOST:PORT)"));
        }
        // The host is what the server's certificate must name: check it
        // now rather than at every connection attempt.
        #[cfg(feature = "tls")]
        if let Err(e) = tls_host(rest) {
            return Err(format!("{s:?}: {e}"));
        }
        return Ok(EgdAddr::Tls(rest.to_string()));
    }
    if s.contains('/') || is_socket {
        return Ok(EgdAddr::Unix(PathBuf::from(s)));
    }
    match host_port(s) {
        Ok(()) => Ok(EgdAddr::Tcp(s.to_string())),
        Err(why) => Err(format!(
            "{s:?}: {why} (expected HOST:PORT, tls://HOST:PORT, or the path of a Unix socket containing '/')"
        )),
    }
}

/// Checks `HOST:PORT` (`[v6]:PORT` for IPv6 literals); says what is wrong.
fn host_port(s: &str) -> Result<(), &'static str> {
    let Some((host, port)) = s.rsplit_once(':') else {
        return Err("no port");
    };
    if host.is_empty() || host == "[]" {
        return Err("no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err("an IPv6 address needs brackets, as in [::1]:PORT");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("the port must be a number in 1..=65535"),
        Ok(_) => Ok(()),
    }
}

pub use crate::cli::{MAX_DURATION, parse_duration};

/// `1 s`, `500 ms`, `1.5 s`.
fn show(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{} s", d.as_secs())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Counters of a running `feed`, as its summaries show them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FeedStats {
    /// The kernel output's counters and mode.
    pub kernel: KernelStats,
    /// Bytes received from the server and given to the kernel (complete
    /// replies only).
    pub bytes_received: u64,
    /// Connections made.
    pub connections: u64,
    /// Connections lost (closed by the server, failed or timed out).
    pub lost: u64,
    /// Failed connection attempts.
    pub failed_attempts: u64,
    /// Whether a connection is up now.
    pub connected: bool,
}

impl fmt::Display for FeedStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let k = &self.kernel;
        write!(
            f,
            "{} bytes written, {} bits credited, {} ioctl failures, {} reseeds ({} failed), \
             {} new VM generations; \
             {} bytes received, {} connections, {} lost, {} failed attempts; {}; {}",
            k.bytes_written,
            k.bits_credited,
            k.ioctl_failures,
            k.reseeds,
            k.reseed_failures,
            k.new_generations,
            self.bytes_received,
            self.connections,
            self.lost,
            self.failed_attempts,
            if self.connected {
                "connected"
            } else {
                "not connected"
            },
            k.mode,
        )
    }
}

/// Reconnection delays: `min`, doubling up to `max`.
#[derive(Debug)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The delay before the next attempt.
    fn next(&mut self) -> Duration {
        let d = self.next;
        self.next = d.saturating_mul(2).min(self.max);
        d
    }

    fn reset(&mut self) {
        self.next = self.min;
    }
}

/// The validated settings of one `feed` run.
#[derive(Clone, Debug)]
struct Options {
    config: KernelConfig,
    retry_min: Duration,
    retry_max: Duration,
    read_timeout: Option<Duration>,
    max_bytes: Option<u64>,
    tls: TlsDial,
    /// Bytes fetched for a new VM generation (0: not watched).
    on_vmgenid: usize,
    /// New VM generation IDs seen so far (`crate::vmgenid::watch`).
    generations: Option<tokio::sync::watch::Receiver<u64>>,
}

impl FeedArgs {
    /// The TLS settings: for `tls://`, all three files, read now (so a bad
    /// file stops `feed` at once, with its name); for the others, none.
    fn tls(&self) -> Result<TlsDial, String> {
        let files = (&self.tls_ca, &self.tls_cert, &self.tls_key);
        let any = files.0.is_some() || files.1.is_some() || files.2.is_some();
        if !matches!(self.egd, EgdAddr::Tls(_)) {
            if any {
                return Err(
                    "--tls-ca, --tls-cert and --tls-key are for --egd tls://HOST:PORT".into(),
                );
            }
            return Ok(TlsDial::default());
        }
        let (Some(ca), Some(cert), Some(key)) = files else {
            return Err("--egd tls://… needs --tls-ca, --tls-cert and --tls-key".into());
        };
        #[cfg(feature = "tls")]
        {
            let files = crate::tls::ClientFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            };
            let connector = crate::tls::connector(&files).map_err(|e| format!("feed: {e}"))?;
            Ok(TlsDial {
                connector: Some(connector),
            })
        }
        #[cfg(not(feature = "tls"))]
        {
            let _ = (ca, cert, key);
            Err(format!("--egd tls://: {NO_TLS}"))
        }
    }

    fn options(&self) -> Result<Options, String> {
        let config = KernelConfig::new(self.bits_per_byte)
            .map_err(|e| e.to_string().replace("--kernel", "--bits-per-byte"))?
            .with_pace(usize::from(self.bytes_per_interval), self.interval)
            .map_err(|_| "--interval and --bytes-per-interval must be non-zero".to_string())?
            .with_reseed(self.reseed_interval);
        if self.retry_min.is_zero() {
            return Err("--retry-min must be non-zero".into());
        }
        if self.retry_max < self.retry_min {
            return Err("--retry-max must not be shorter than --retry-min".into());
        }
        Ok(Options {
            config,
            retry_min: self.retry_min,
            retry_max: self.retry_max,
            read_timeout: (!self.read_timeout.is_zero()).then_some(self.read_timeout),
            max_bytes: self.max_bytes,
            tls: self.tls()?,
            on_vmgenid: self.on_vmgenid_bytes,
            generations: None,
        })
    }
}

/// `--test-discard`: counts bytes, writes nothing.
#[derive(Debug, Default)]
struct Discard {
    total: u64,
}

impl EntropySink for Discard {
    fn add_entropy(&mut self, bytes: &[u8], _bits: u32) -> io::Result<()> {
        self.total += bytes.len() as u64;
        Ok(())
    }

    fn initialised(&mut self) -> bool {
        self.total >= DISCARD_INIT_AFTER
    }

    fn reseed(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Runs `ekey-host feed` until SIGTERM/SIGINT, `--max-bytes`, or a fatal
/// error (not allowed to feed the kernel: "feeding the kernel needs root
/// (CAP_SYS_ADMIN)").
pub async fn main(args: FeedArgs) -> Result<(), String> {
    let opts = args.options()?;
    if args.test_discard {
        warn!("feed: test mode: bytes are discarded, not written to the kernel");
        drive(&args, &opts, Discard::default()).await
    } else {
        let sink = kernel::RandomDevice::open().map_err(|e| format!("feed: {e}"))?;
        drive(&args, &opts, sink).await
    }
}

async fn drive<S: EntropySink>(args: &FeedArgs, opts: &Options, mut sink: S) -> Result<(), String> {
    let mut opts = opts.clone();
    if opts.on_vmgenid > 0 {
        opts.generations = crate::vmgenid::watch_or_say("feed");
    }
    let opts = &opts;
    let watch = |kind: SignalKind, name: &str| {
        signal(kind).map_err(|e| format!("cannot watch {name}: {e}"))
    };
    let mut term = watch(SignalKind::terminate(), "SIGTERM")?;
    let mut int = watch(SignalKind::interrupt(), "SIGINT")?;
    let mut usr1 = watch(SignalKind::user_defined1(), "SIGUSR1")?;
    let mut ticker = (!args.status_interval.is_zero()).then(|| {
        tokio::time::interval_at(Instant::now() + args.status_interval, args.status_interval)
    });
    info!(
        "feed: feeding the kernel from the EGD server at {}, crediting {} bits per byte",
        args.egd, opts.config.bits_per_byte
    );
    let stats = Mutex::new(FeedStats::default());
    let summary = || lock(&stats).to_string();
    let work = run(
        || args.egd.connect(&opts.tls),
        &args.egd,
        opts,
        &mut sink,
        &stats,
    );
    tokio::pin!(work);
    let result = loop {
        tokio::select! {
            r = &mut work => break r,
            _ = term.recv() => {
                info!("feed: SIGTERM: stopping");
                break Ok(());
            }
            _ = int.recv() => {
                info!("feed: SIGINT: stopping");
                break Ok(());
            }
            _ = usr1.recv() => info!("feed: {}", summary()),
            _ = tick(&mut ticker) => info!("feed: {}", summary()),
        }
    };
    info!("feed: stopped: {}", summary());
    result
}

async fn tick(ticker: &mut Option<tokio::time::Interval>) {
    match ticker {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// How a connection ended.
enum End {
    /// `max_bytes` reached.
    Done,
    /// The connection is gone; reconnect.
    Lost(String),
    /// The kernel refused us (permission): stop.
    Fatal(String),
}

/// Connects (through `dial`) and feeds `sink` until `max_bytes` or a fatal
/// error, reconnecting with back-off.
async fn run<S, D, F>(
    mut dial: D,
    target: &EgdAddr,
    opts: &Options,
    sink: &mut S,
    stats: &Mutex<FeedStats>,
) -> Result<(), String>
where
    S: EntropySink,
    D: FnMut() -> F,
    F: Future<Output = io::Result<Conn>>,
{
    let mut feeder = KernelFeeder::new(opts.config.clone(), now(), sink.initialised());
    info!("feed: kernel: {}", feeder.mode());
    lock(stats).kernel = feeder.stats().clone();
    let mut backoff = Backoff::new(opts.retry_min, opts.retry_max);
    let mut failures = 0u64;
    loop {
        if done(opts, stats) {
            return Ok(());
        }
        let mut conn = match dial().await {
            Ok(conn) => conn,
            Err(e) => {
                lock(stats).failed_attempts += 1;
                failures += 1;
                let delay = backoff.next();
                // Every failure at first, then every tenth: a server that
                // is down for days should not flood the log.
                if failures <= QUIET_AFTER {
                    warn!(
                        "feed: cannot connect to {target}: {e}; retrying in {}",
                        show(delay)
                    );
                } else if failures.is_multiple_of(10) {
                    warn!(
                        "feed: still cannot connect to {target} ({failures} attempts): {e}; \
                         retrying in {}",
                        show(delay)
                    );
                }
                tokio::time::sleep(delay).await;
                continue;
            }
        };
        failures = 0;
        info!("feed: connected to {target}");
        {
            let mut s = lock(stats);
            s.connections += 1;
            s.connected = true;
        }
        let mut delivered = false;
        let end = session(&mut conn, &mut feeder, sink, opts, stats, &mut delivered).await;
        lock(stats).connected = false;
        drop(conn);
        match end {
            End::Done => {
                info!("feed: --max-bytes reached");
                return Ok(());
            }
            End::Fatal(e) => return Err(format!("feed: {e}")),
            End::Lost(why) => {
                lock(stats).lost += 1;
                if delivered {
                    backoff.reset();
                }
                let delay = backoff.next();
                warn!(
                    "feed: lost the connection to {target}: {why}; reconnecting in {}",
                    show(delay)
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

fn lock(stats: &Mutex<FeedStats>) -> MutexGuard<'_, FeedStats> {
    stats.lock().unwrap_or_else(|e| e.into_inner())
}

fn done(opts: &Options, stats: &Mutex<FeedStats>) -> bool {
    let received = lock(stats).bytes_received;
    opts.max_bytes.is_some_and(|max| received >= max)
}

/// Feeds from one connection until it is lost, `max_bytes` is reached or
/// the kernel refuses us. Sets `delivered` once a reply arrived.
async fn session<S: EntropySink>(
    conn: &mut Conn,
    feeder: &mut KernelFeeder,
    sink: &mut S,
    opts: &Options,
    stats: &Mutex<FeedStats>,
    delivered: &mut bool,
) -> End {
    let mut buf = Zeroizing::new(Vec::<u8>::new());
    let mut commands = Vec::new();
    let mut generations = opts.generations.clone();
    loop {
        note_generations(feeder, generations.as_ref(), opts, stats);
        let received = lock(stats).bytes_received;
        let left = match opts.max_bytes {
            Some(max) if received >= max => return End::Done,
            Some(max) => usize::try_from(max - received).unwrap_or(usize::MAX),
            None => usize::MAX,
        };
        let want = feeder.wants(now());
        if want == 0 {
            // Topping up and not due yet: idle, but notice a server that
            // hangs up meanwhile.
            let Some(wake) = feeder.next_wake() else {
                continue;
            };
            match idle_until(conn, wake, generations.as_mut()).await {
                Some(why) => return End::Lost(why),
                None => continue,
            }
        }
        // Filling: one request's worth at a time (the feeder takes any
        // amount); topping up: exactly the mix, in as many requests as
        // needed, sent at once.
        let n = if *feeder.mode() == Mode::Filling {
            want.min(MAX_REQUEST)
        } else {
            want
        }
        .min(left);
        commands.clear();
        let mut rest = n;
        while rest > 0 {
            let piece = rest.min(MAX_REQUEST);
            commands.extend_from_slice(&[0x02, piece as u8]);
            rest -= piece;
        }
        let ask = async {
            conn.write_all(&commands).await?;
            conn.flush().await
        };
        if let Err(e) = with_timeout(opts.read_timeout, ask).await {
            return End::Lost(e);
        }
        buf.clear();
        buf.resize(n, 0);
        if let Err(e) = read_reply(conn, &mut buf, opts.read_timeout).await {
            return End::Lost(e);
        }
        *delivered = true;
        let before = feeder.mode().clone();
        let result = feeder.feed(now(), sink, &buf);
        buf.zeroize();
        {
            let mut s = lock(stats);
            s.bytes_received += n as u64;
            s.kernel = feeder.stats().clone();
        }
        if *feeder.mode() != before {
            info!("feed: kernel: {}", feeder.mode());
        }
        if let Err(e) = result {
            if e.kind() == io::ErrorKind::PermissionDenied {
                return End::Fatal(e.to_string());
            }
            warn!("feed: RNDADDENTROPY failed: {e}");
        }
    }
}

/// Tells `feeder` of new VM generations since the last look (by the
/// count, not the watch's own "seen" mark, which idling moves), and logs
/// them.
fn note_generations(
    feeder: &mut KernelFeeder,
    generations: Option<&tokio::sync::watch::Receiver<u64>>,
    opts: &Options,
    stats: &Mutex<FeedStats>,
) {
    let seen = generations.map_or(0, |g| *g.borrow());
    if feeder.note_generations(seen, opts.on_vmgenid) {
        lock(stats).kernel = feeder.stats().clone();
        info!(
            "feed: new VM generation ID (this VM was restored from a snapshot or cloned): \
             fetching {} fresh bytes, then reseeding",
            opts.on_vmgenid
        );
    }
}

/// Waits until `wake` (or a new VM generation) without asking for
/// anything; why the connection is lost if the server hangs up (or sends
/// something) meanwhile.
async fn idle_until(
    conn: &mut Conn,
    wake: std::time::Instant,
    generations: Option<&mut tokio::sync::watch::Receiver<u64>>,
) -> Option<String> {
    let mut probe = [0u8; 1];
    tokio::select! {
        _ = tokio::time::sleep_until(Instant::from_std(wake)) => None,
        () = crate::vmgenid::next(generations) => None,
        r = conn.read(&mut probe) => {
            probe.zeroize();
            Some(match r {
                Ok(0) => "the server closed the connection".into(),
                Ok(_) => "the server sent data nobody asked for".into(),
                Err(e) => e.to_string(),
            })
        }
    }
}

async fn with_timeout<T>(
    limit: Option<Duration>,
    fut: impl Future<Output = io::Result<T>>,
) -> Result<T, String> {
    let r = match limit {
        Some(t) => tokio::time::timeout(t, fut)
            .await
            .map_err(|_| format!("no progress for {}", show(t)))?,
        None => fut.await,
    };
    r.map_err(|e| e.to_string())
}

/// Reads exactly `buf.len()` bytes: the reply to the blocking reads sent.
async fn read_reply(
    conn: &mut Conn,
    buf: &mut [u8],
    limit: Option<Duration>,
) -> Result<(), String> {
    let mut filled = 0;
    while filled < buf.len() {
        let n = with_timeout(limit, conn.read(&mut buf[filled..])).await?;
        if n == 0 {
            return Err(if filled == 0 {
                "the server closed the connection".into()
            } else {
                format!(
                    "the server closed the connection in the middle of a reply \
                     ({filled} of {} bytes; dropped)",
                    buf.len()
                )
            });
        }
        filled += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::sync::Arc;
    use tokio::net::TcpListener;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        feed: FeedArgs,
    }

    fn parse(args: &[&str]) -> Result<FeedArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("feed").chain(args.iter().copied())).map(|c| c.feed)
    }

    #[test]
    fn addresses() {
        let tcp = |s: &str| EgdAddr::Tcp(s.to_string());
        assert_eq!(parse_egd_addr("127.0.0.1:7777"), Ok(tcp("127.0.0.1:7777")));
        assert_eq!(parse_egd_addr("egd.example:80"), Ok(tcp("egd.example:80")));
        assert_eq!(parse_egd_addr("[::1]:8888"), Ok(tcp("[::1]:8888")));
        assert_eq!(
            parse_egd_addr("/run/egd.sock"),
            Ok(EgdAddr::Unix("/run/egd.sock".into()))
        );
        assert_eq!(
            parse_egd_addr("./egd:1"),
            Ok(EgdAddr::Unix("./egd:1".into()))
        );
        // A name without '/' is a socket only if one exists.
        assert_eq!(
            classify_egd_addr("egd.sock", true),
            Ok(EgdAddr::Unix("egd.sock".into()))
        );
        for bad in [
            "egd.sock",
            "",
            "host",
            "host:",
            ":80",
            "host:0",
            "host:65536",
            "host:x",
            "::1:80",
            "[]:80",
        ] {
            let err = classify_egd_addr(bad, false).unwrap_err();
            assert!(err.contains("expected HOST:PORT"), "{bad}: {err}");
        }
        assert_eq!(
            parse_egd_addr("tls://egd.example:7777"),
            Ok(EgdAddr::Tls("egd.example:7777".into()))
        );
        assert_eq!(
            parse_egd_addr("tls://[::1]:7777"),
            Ok(EgdAddr::Tls("[::1]:7777".into()))
        );
        #[cfg(feature = "tls")]
        assert!(
            parse_egd_addr("tls://bad_name!:1")
                .unwrap_err()
                .contains("not a host name or address")
        );
        for bad in [
            "tls://",
            "tls://host",
            "tls://:1",
            "tls://h:0",
            "tls:///run/egd",
        ] {
            let err = parse_egd_addr(bad).unwrap_err();
            assert!(err.contains("expected tls://HOST:PORT"), "{bad}: {err}");
        }
        assert_eq!(tcp("h:1").to_string(), "tcp h:1");
        assert_eq!(EgdAddr::Unix("/s".into()).to_string(), "unix /s");
    }

    #[test]
    fn socket_files_are_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egd-sock");
        assert!(!is_socket(&path), "missing");
        let _l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(is_socket(&path));
        assert!(!is_socket(dir.path()), "a directory");
        let file = dir.path().join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(!is_socket(&file));
    }

    #[test]
    fn durations() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("10"), Duration::from_secs(10));
        assert_eq!(ok(" 10 s "), Duration::from_secs(10));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("2min"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in [
            "",
            "s",
            "10x",
            "-1s",
            "1.5s",
            "ten",
            "99999999999999999999s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            parse_duration("18446744073709551615h")
                .unwrap_err()
                .contains("too long")
        );
        // Up to a year; more would overflow the clock (the reviewer's
        // `--interval 18446744073709551615` panicked in `Instant + d`).
        assert_eq!(ok("8784h"), MAX_DURATION);
        for long in ["8785h", "18446744073709551615", "31622401s"] {
            assert!(
                parse_duration(long).unwrap_err().contains("too long"),
                "{long}"
            );
        }
        assert_eq!(show(Duration::from_secs(60)), "60 s");
        assert_eq!(show(Duration::from_millis(250)), "250 ms");
        assert_eq!(show(Duration::from_millis(1500)), "1.5 s");
    }

    #[test]
    fn defaults_are_the_daemons_kernel_policy() {
        let args = parse(&["--egd", "127.0.0.1:1"]).unwrap();
        let opts = args.options().unwrap();
        assert_eq!(opts.config, KernelConfig::default());
        assert_eq!(opts.retry_min, Duration::from_secs(1));
        assert_eq!(opts.retry_max, Duration::from_secs(60));
        assert_eq!(opts.read_timeout, Some(Duration::from_secs(120)));
        assert_eq!(opts.max_bytes, None);
        assert!(!args.test_discard);

        let args = parse(&[
            "--egd",
            "/run/egd",
            "--bits-per-byte",
            "3",
            "--interval",
            "500ms",
            "--bytes-per-interval",
            "300",
            "--read-timeout",
            "0",
        ])
        .unwrap();
        let opts = args.options().unwrap();
        assert_eq!(opts.config.bits_per_byte, 3);
        assert_eq!(opts.config.interval, Duration::from_millis(500));
        assert_eq!(opts.config.bytes_per_interval, 300);
        assert_eq!(opts.read_timeout, None);

        // 0 mixes in without credit, as the daemon's --kernel=0.
        let opts = parse(&["--egd", "h:1", "--bits-per-byte", "0"])
            .unwrap()
            .options()
            .unwrap();
        assert_eq!(opts.config.bits_per_byte, 0);
    }

    #[test]
    fn bad_options_are_refused_clearly() {
        for (args, needle) in [
            (&["--egd", "h:1", "--bits-per-byte", "9"][..], "0..=8"),
            (&["--egd", "nowhere"][..], "expected HOST:PORT"),
            (
                &["--egd", "h:1", "--interval", "soon"][..],
                "expected a duration",
            ),
            (
                &["--egd", "h:1", "--bytes-per-interval", "0"][..],
                "bytes-per-interval",
            ),
            (&[][..], "--egd"),
        ] {
            let err = parse(args).unwrap_err().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        for (args, needle) in [
            (&["--egd", "h:1", "--interval", "0"][..], "non-zero"),
            (&["--egd", "h:1", "--retry-min", "0"][..], "--retry-min"),
            (
                &["--egd", "h:1", "--retry-min", "5s", "--retry-max", "1s"][..],
                "--retry-max",
            ),
            (
                &["--egd", "h:1", "--tls-ca", "ca.pem"][..],
                "are for --egd tls://",
            ),
            (
                &["--egd", "tls://h:1", "--tls-ca", "ca.pem"][..],
                "needs --tls-ca, --tls-cert and --tls-key",
            ),
            (
                &[
                    "--egd",
                    "tls://h:1",
                    "--tls-ca",
                    "/nonexistent/ca.pem",
                    "--tls-cert",
                    "c",
                    "--tls-key",
                    "k",
                ][..],
                "--tls-ca /nonexistent/ca.pem",
            ),
        ] {
            let err = parse(args).unwrap().options().unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let got: Vec<u64> = (0..9).map(|_| b.next().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next(), Duration::from_secs(1));
        assert_eq!(b.next(), Duration::from_secs(2));
    }

    #[test]
    fn summary_names_the_counters() {
        let s = FeedStats {
            kernel: KernelStats {
                bytes_written: 100,
                bits_credited: 700,
                ioctl_failures: 2,
                mode: Mode::Filling,
                ..KernelStats::default()
            },
            bytes_received: 110,
            connections: 3,
            lost: 2,
            failed_attempts: 5,
            connected: true,
        };
        assert_eq!(
            s.to_string(),
            "100 bytes written, 700 bits credited, 2 ioctl failures, 0 reseeds (0 failed), \
             0 new VM generations; \
             110 bytes received, \
             3 connections, 2 lost, 5 failed attempts; connected; \
             filling the kernel pool (CRNG not ready)"
        );
    }

    // ---- against a fake EGD server -------------------------------------

    /// What the fake server does on one connection.
    #[derive(Clone, Copy, Debug)]
    enum Plan {
        /// Answer every request.
        Serve,
        /// Answer this many requests, then close (between requests).
        CloseAfter(usize),
        /// Answer this many, send half of the next reply, close.
        CutAfter(usize),
        /// Read requests, never answer.
        Mute,
    }

    #[derive(Default)]
    struct Log {
        /// `n` of every `0x02 n` read, per connection.
        requests: Vec<Vec<u8>>,
        /// Every complete reply's bytes, in order, over all connections.
        sent: Vec<u8>,
        /// Bytes of replies cut short.
        cut: Vec<u8>,
        /// Any other command byte seen.
        bad_commands: Vec<u8>,
    }

    struct FakeServer {
        addr: EgdAddr,
        log: Arc<Mutex<Log>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for FakeServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl FakeServer {
        /// A TCP server on loopback; connection i follows `plans[i]` (the
        /// last plan for the rest).
        async fn tcp(plans: Vec<Plan>) -> FakeServer {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = EgdAddr::Tcp(listener.local_addr().unwrap().to_string());
            let log = Arc::new(Mutex::new(Log::default()));
            let l2 = log.clone();
            let task = tokio::spawn(async move {
                for i in 0.. {
                    let (stream, _) = listener.accept().await.unwrap();
                    let plan = plans[i.min(plans.len() - 1)];
                    l2.lock().unwrap().requests.push(Vec::new());
                    tokio::spawn(serve(stream, plan, l2.clone(), i));
                }
            });
            FakeServer { addr, log, task }
        }

        /// A TLS server on loopback (client certificates required, as
        /// the daemon's), every connection following `plan`.
        #[cfg(feature = "tls")]
        async fn tls(plan: Plan, files: &crate::tls::ServerFiles) -> FakeServer {
            let acceptor = crate::tls::TlsAcceptor::from(crate::tls::server_config(files).unwrap());
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = EgdAddr::Tls(listener.local_addr().unwrap().to_string());
            let log = Arc::new(Mutex::new(Log::default()));
            let l2 = log.clone();
            let task = tokio::spawn(async move {
                for i in 0.. {
                    let (stream, _) = listener.accept().await.unwrap();
                    let Ok(stream) = acceptor.accept(stream).await else {
                        continue;
                    };
                    l2.lock().unwrap().requests.push(Vec::new());
                    tokio::spawn(serve(stream, plan, l2.clone(), i));
                }
            });
            FakeServer { addr, log, task }
        }

        fn log(&self) -> std::sync::MutexGuard<'_, Log> {
            self.log.lock().unwrap()
        }
    }

    async fn serve(
        mut s: impl AsyncRead + AsyncWrite + Unpin,
        plan: Plan,
        log: Arc<Mutex<Log>>,
        conn: usize,
    ) {
        let mut answered = 0;
        loop {
            if matches!(plan, Plan::CloseAfter(k) if answered == k) {
                return;
            }
            let mut cmd = [0u8; 2];
            if s.read_exact(&mut cmd[..1]).await.is_err() {
                return;
            }
            if cmd[0] != 0x02 {
                log.lock().unwrap().bad_commands.push(cmd[0]);
                return;
            }
            if s.read_exact(&mut cmd[1..]).await.is_err() {
                return;
            }
            let n = usize::from(cmd[1]);
            log.lock().unwrap().requests[conn].push(cmd[1]);
            let mut reply = vec![0u8; n];
            getrandom::fill(&mut reply).unwrap();
            match plan {
                Plan::Mute => continue,
                Plan::CutAfter(k) if answered == k => {
                    let half = &reply[..n / 2];
                    let _ = s.write_all(half).await;
                    let _ = s.flush().await;
                    log.lock().unwrap().cut.extend_from_slice(half);
                    return;
                }
                _ => {}
            }
            // Log before writing: the client may act on the reply at once.
            log.lock().unwrap().sent.extend_from_slice(&reply);
            if s.write_all(&reply).await.is_err() {
                return;
            }
            answered += 1;
        }
    }

    /// A fake kernel: keeps every byte; initialised after `init_after`.
    #[derive(Default)]
    struct Sink {
        bytes: Vec<u8>,
        bits: u64,
        init_after: usize,
        error: Option<io::ErrorKind>,
        calls: usize,
        /// Bytes written before each reseed.
        reseeds: Vec<usize>,
    }

    impl Sink {
        fn filling() -> Self {
            Sink {
                init_after: usize::MAX,
                ..Sink::default()
            }
        }
    }

    impl EntropySink for Sink {
        fn add_entropy(&mut self, bytes: &[u8], bits: u32) -> io::Result<()> {
            self.calls += 1;
            if let Some(kind) = self.error {
                return Err(io::Error::new(kind, "fake refusal"));
            }
            self.bytes.extend_from_slice(bytes);
            self.bits += u64::from(bits);
            Ok(())
        }
        fn initialised(&mut self) -> bool {
            self.bytes.len() >= self.init_after
        }
        fn reseed(&mut self) -> io::Result<()> {
            self.reseeds.push(self.bytes.len());
            Ok(())
        }
    }

    fn opts(config: KernelConfig, max_bytes: Option<u64>) -> Options {
        Options {
            config,
            retry_min: Duration::from_millis(20),
            retry_max: Duration::from_millis(80),
            read_timeout: Some(Duration::from_secs(5)),
            max_bytes,
            tls: TlsDial::default(),
            on_vmgenid: 64,
            generations: None,
        }
    }

    fn pace(bytes: usize, interval: Duration) -> KernelConfig {
        KernelConfig::default().with_pace(bytes, interval).unwrap()
    }

    async fn run_for(
        limit: Duration,
        addr: &EgdAddr,
        opts: &Options,
        sink: &mut Sink,
        stats: &Mutex<FeedStats>,
    ) -> Option<Result<(), String>> {
        tokio::time::timeout(
            limit,
            run(|| addr.connect(&opts.tls), addr, opts, sink, stats),
        )
        .await
        .ok()
    }

    #[tokio::test]
    async fn filling_passes_on_exactly_the_bytes_served() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let o = opts(KernelConfig::new(5).unwrap(), Some(5000));
        let r = run_for(Duration::from_secs(20), &server.addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        let log = server.log();
        assert_eq!(sink.bytes, log.sent, "the sink got exactly what was served");
        assert_eq!(log.sent.len(), 5000);
        let requests = &log.requests[0];
        assert!(
            requests.iter().all(|&n| (1..=255).contains(&n)),
            "{requests:?}"
        );
        // Filling: full-size requests, the last one cut to --max-bytes.
        assert_eq!(requests.len(), 20);
        assert!(requests[..19].iter().all(|&n| n == 255));
        assert_eq!(requests[19], (5000 - 19 * 255) as u8);
        assert!(log.bad_commands.is_empty());
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.kernel.bytes_written, 5000);
        assert_eq!(s.kernel.bits_credited, 5000 * 5);
        assert_eq!(sink.bits, 5000 * 5);
        assert_eq!(s.bytes_received, 5000);
        assert_eq!((s.connections, s.lost, s.failed_attempts), (1, 0, 0));
    }

    #[tokio::test]
    async fn topping_up_requests_only_what_is_due() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink::default(); // initialised from the start
        let stats = Mutex::new(FeedStats::default());
        let o = opts(pace(600, Duration::from_secs(3600)), None);
        let r = run_for(
            Duration::from_millis(400),
            &server.addr,
            &o,
            &mut sink,
            &stats,
        )
        .await;
        assert_eq!(r, None, "still running");
        let log = server.log();
        // One mix of 600 bytes, due at once, in requests of at most 255;
        // the next is an hour away, so nothing more was asked for.
        assert_eq!(log.requests, vec![vec![255, 255, 90]]);
        assert_eq!(log.sent.len(), 600);
        assert_eq!(sink.bytes, log.sent);
        let s = stats.lock().unwrap().clone();
        assert!(
            matches!(s.kernel.mode, Mode::Topping { bytes: 600, .. }),
            "{s:?}"
        );
        assert_eq!(s.kernel.bits_credited, 600 * 7);
        assert!(s.connected);
    }

    #[tokio::test]
    async fn topping_up_paces_the_mixes() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink::default();
        let stats = Mutex::new(FeedStats::default());
        let o = opts(pace(100, Duration::from_millis(100)), Some(300));
        let t0 = std::time::Instant::now();
        let r = run_for(Duration::from_secs(10), &server.addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        // Mixes at 0, 100 and 200 ms.
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t0.elapsed()
        );
        assert_eq!(server.log().requests, vec![vec![100, 100, 100]]);
        assert_eq!(sink.bytes, server.log().sent);
    }

    #[tokio::test]
    async fn switches_from_filling_to_topping_up() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink {
            init_after: 1000,
            ..Sink::default()
        };
        let stats = Mutex::new(FeedStats::default());
        let o = opts(pace(64, Duration::from_secs(3600)), None);
        run_for(
            Duration::from_millis(400),
            &server.addr,
            &o,
            &mut sink,
            &stats,
        )
        .await;
        // The kernel said "initialised" after the 4th request (1020 bytes);
        // the first mix is then due in an hour.
        assert_eq!(server.log().requests, vec![vec![255; 4]]);
        assert_eq!(sink.bytes, server.log().sent);
        assert!(matches!(
            stats.lock().unwrap().kernel.mode,
            Mode::Topping { .. }
        ));
    }

    #[tokio::test]
    async fn reconnects_with_backoff_and_resets_it_after_data() {
        // Attempts 0-3 and 5-6 are refused; 4 gets a server that answers
        // two requests then hangs up; 7 gets one that keeps serving.
        let server = FakeServer::tcp(vec![Plan::CloseAfter(2), Plan::Serve]).await;
        let attempts = Mutex::new(Vec::<std::time::Instant>::new());
        let dial = || {
            let i = {
                let mut a = attempts.lock().unwrap();
                a.push(std::time::Instant::now());
                a.len() - 1
            };
            let addr = server.addr.clone();
            async move {
                if matches!(i, 0..=3 | 5 | 6) {
                    Err(io::Error::from(io::ErrorKind::ConnectionRefused))
                } else {
                    addr.connect(&TlsDial::default()).await
                }
            }
        };
        let o = Options {
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_millis(800),
            ..opts(KernelConfig::default(), Some(4 * 255))
        };
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let r = tokio::time::timeout(
            Duration::from_secs(20),
            run(dial, &server.addr, &o, &mut sink, &stats),
        )
        .await;
        assert_eq!(r.ok(), Some(Ok(())));
        let a = attempts.lock().unwrap();
        assert_eq!(a.len(), 8);
        let gaps: Vec<Duration> = a.windows(2).map(|w| w[1] - w[0]).collect();
        // 100, 200, 400, 800 (capped) ms while refused; after the
        // connection that delivered data, back to 100, 200, 400.
        let expected = [100, 200, 400, 800, 100, 200, 400];
        for (gap, want) in gaps.iter().zip(expected) {
            let want = Duration::from_millis(want);
            assert!(
                *gap >= want && *gap < want + Duration::from_millis(300),
                "gaps {gaps:?}, expected {expected:?} ms"
            );
        }
        let s = stats.lock().unwrap().clone();
        assert_eq!((s.connections, s.lost, s.failed_attempts), (2, 1, 6));
        let log = server.log();
        assert_eq!(log.requests[0], vec![255; 2], "then it hung up");
        assert_eq!(log.requests[1], vec![255; 2]);
        assert_eq!(sink.bytes, log.sent, "every complete reply, in order");
        assert_eq!(sink.bytes.len(), 4 * 255);
    }

    #[tokio::test]
    async fn real_reconnect_after_the_server_comes_back() {
        // No server at first: the port is free.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = EgdAddr::Tcp(format!("127.0.0.1:{port}"));
        let o = opts(KernelConfig::default(), Some(1000));
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let log = Arc::new(Mutex::new(Log::default()));
        let l2 = log.clone();
        let server = async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
            for i in 0.. {
                let (s, _) = listener.accept().await.unwrap();
                l2.lock().unwrap().requests.push(Vec::new());
                tokio::spawn(serve(s, Plan::Serve, l2.clone(), i));
            }
        };
        let feed = run(|| addr.connect(&o.tls), &addr, &o, &mut sink, &stats);
        let r = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::select! {
                r = feed => r,
                _ = server => unreachable!(),
            }
        })
        .await;
        assert_eq!(r.ok(), Some(Ok(())));
        let s = stats.lock().unwrap().clone();
        assert!(s.failed_attempts >= 2, "{s:?}");
        assert_eq!(s.connections, 1);
        assert_eq!(sink.bytes, log.lock().unwrap().sent);
        assert_eq!(sink.bytes.len(), 1000);
    }

    #[tokio::test]
    async fn a_reply_cut_short_is_dropped_not_credited() {
        let server = FakeServer::tcp(vec![Plan::CutAfter(1), Plan::Serve]).await;
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let o = opts(KernelConfig::default(), Some(3 * 255));
        let r = run_for(Duration::from_secs(20), &server.addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        let log = server.log();
        assert_eq!(log.cut.len(), 127);
        assert_eq!(sink.bytes, log.sent, "only complete replies");
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.bytes_received, 3 * 255);
        assert_eq!(s.kernel.bits_credited, 3 * 255 * 7);
        assert_eq!((s.connections, s.lost), (2, 1));
    }

    #[tokio::test]
    async fn a_hang_up_while_idle_is_noticed() {
        // First connection: the first mix, then the server hangs up.
        let server = FakeServer::tcp(vec![Plan::CloseAfter(1), Plan::Serve]).await;
        let mut sink = Sink::default();
        let stats = Mutex::new(FeedStats::default());
        let o = opts(pace(64, Duration::from_secs(3600)), None);
        run_for(
            Duration::from_millis(500),
            &server.addr,
            &o,
            &mut sink,
            &stats,
        )
        .await;
        let s = stats.lock().unwrap().clone();
        assert_eq!((s.connections, s.lost), (2, 1), "{s:?}");
        assert!(s.connected);
        // Reconnected, and still not asking: the next mix is not due.
        assert_eq!(server.log().requests, vec![vec![64], vec![]]);
        assert_eq!(sink.bytes, server.log().sent);
    }

    /// A new VM generation in the middle of a 10 s pause: fresh bytes at
    /// once, then a reseed, though a reseed was done a moment before.
    #[tokio::test]
    async fn a_new_vm_generation_fetches_at_once_and_reseeds() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink::default(); // initialised: topping up
        let stats = Mutex::new(FeedStats::default());
        let (tx, rx) = tokio::sync::watch::channel(0u64);
        let o = Options {
            on_vmgenid: 100,
            generations: Some(rx),
            ..opts(pace(64, Duration::from_secs(10)), None)
        };
        let t0 = std::time::Instant::now();
        let feed = run_for(
            Duration::from_millis(800),
            &server.addr,
            &o,
            &mut sink,
            &stats,
        );
        let restore = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tx.send_modify(|g| *g += 1);
            std::future::pending::<()>().await
        };
        tokio::select! {
            _ = feed => {}
            () = restore => {}
        }
        assert!(t0.elapsed() < Duration::from_secs(2));
        // The first mix, then the 100 fresh bytes; reseeded after each.
        assert_eq!(sink.bytes.len(), 164);
        assert_eq!(sink.bytes, server.log().sent);
        assert_eq!(sink.reseeds, [64, 164]);
        let k = stats.lock().unwrap().kernel.clone();
        assert_eq!((k.new_generations, k.reseeds), (1, 2));
    }

    #[tokio::test]
    async fn a_silent_server_times_out_and_is_redialled() {
        let server = FakeServer::tcp(vec![Plan::Mute]).await;
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let o = Options {
            read_timeout: Some(Duration::from_millis(100)),
            ..opts(KernelConfig::default(), None)
        };
        run_for(
            Duration::from_millis(700),
            &server.addr,
            &o,
            &mut sink,
            &stats,
        )
        .await;
        let s = stats.lock().unwrap().clone();
        assert!(s.connections >= 2 && s.lost >= 2, "{s:?}");
        assert!(sink.bytes.is_empty());
        assert_eq!(s.kernel.bytes_written, 0);
    }

    #[tokio::test]
    async fn over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("egd.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let log = Arc::new(Mutex::new(Log::default()));
        log.lock().unwrap().requests.push(Vec::new());
        let l2 = log.clone();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            serve(s, Plan::Serve, l2, 0).await;
        });
        let addr = parse_egd_addr(path.to_str().unwrap()).unwrap();
        assert_eq!(addr, EgdAddr::Unix(path.clone()));
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let o = opts(KernelConfig::new(8).unwrap(), Some(700));
        let r = run_for(Duration::from_secs(20), &addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        assert_eq!(sink.bytes, log.lock().unwrap().sent);
        assert_eq!(sink.bits, 700 * 8);
        server.abort();
    }

    /// Over TLS, `feed` shows its certificate, gets what the server sent,
    /// and refuses a server whose certificate does not name the host or
    /// comes from another CA.
    #[cfg(feature = "tls")]
    #[tokio::test]
    async fn over_tls_only_the_right_server_is_read() {
        use crate::tls::testing::{ca, issue, leaf, write};
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
        let (ca, other) = (ca("Test CA"), ca("Other CA"));
        write(Path::new(&path("ca.pem")), &ca.pem(), 0o644);
        let (cert, key) = leaf(&ca, "guest1", false, false);
        write(Path::new(&path("client.pem")), &cert, 0o644);
        write(Path::new(&path("client.key")), &key, 0o600);
        let server = |name: &str, cert: (String, String)| {
            let files = crate::tls::ServerFiles {
                cert: dir.path().join(format!("{name}.pem")),
                key: dir.path().join(format!("{name}.key")),
                client_ca: dir.path().join("ca.pem"),
            };
            write(&files.cert, &cert.0, 0o644);
            write(&files.key, &cert.1, 0o600);
            files
        };
        let feed = |addr: &EgdAddr| {
            let EgdAddr::Tls(a) = addr else {
                unreachable!()
            };
            let egd = format!("tls://{a}");
            let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
            let args = [
                "--egd",
                &egd,
                "--tls-ca",
                &ca,
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
            ];
            parse(&args).unwrap().options().unwrap().tls
        };
        let good =
            FakeServer::tls(Plan::Serve, &server("good", leaf(&ca, "egd", true, false))).await;
        let mut sink = Sink::filling();
        let stats = Mutex::new(FeedStats::default());
        let o = Options {
            tls: feed(&good.addr),
            ..opts(KernelConfig::new(8).unwrap(), Some(700))
        };
        let r = run_for(Duration::from_secs(20), &good.addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        assert_eq!(sink.bytes, good.log().sent);
        assert_eq!(sink.bytes.len(), 700);
        let wrong_name = issue(&ca, "egd", &["egd.example", "10.9.9.9"], true, false);
        let foreign = leaf(&other, "egd", true, false);
        for (name, cert) in [("wrong-name", wrong_name), ("foreign", foreign)] {
            let bad = FakeServer::tls(Plan::Serve, &server(name, cert)).await;
            let mut sink = Sink::filling();
            let stats = Mutex::new(FeedStats::default());
            let o = Options {
                tls: feed(&bad.addr),
                ..opts(KernelConfig::new(8).unwrap(), Some(700))
            };
            run_for(Duration::from_millis(500), &bad.addr, &o, &mut sink, &stats).await;
            let s = stats.lock().unwrap().clone();
            assert!(sink.bytes.is_empty(), "{name}");
            assert_eq!(s.connections, 0, "{name}: {s:?}");
            assert!(s.failed_attempts >= 1, "{name}: {s:?}");
            assert!(
                bad.log().requests.is_empty(),
                "{name}: the server was asked"
            );
        }
    }

    #[tokio::test]
    async fn kernel_refusing_permission_is_fatal() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink {
            error: Some(io::ErrorKind::PermissionDenied),
            ..Sink::filling()
        };
        let stats = Mutex::new(FeedStats::default());
        let o = opts(KernelConfig::default(), None);
        let r = run_for(Duration::from_secs(20), &server.addr, &o, &mut sink, &stats).await;
        let err = r.expect("stops by itself").unwrap_err();
        assert!(err.contains("fake refusal"), "{err}");
        assert_eq!(stats.lock().unwrap().kernel.ioctl_failures, 1);
    }

    #[tokio::test]
    async fn other_ioctl_failures_are_counted_and_feeding_goes_on() {
        let server = FakeServer::tcp(vec![Plan::Serve]).await;
        let mut sink = Sink {
            error: Some(io::ErrorKind::Other),
            ..Sink::filling()
        };
        let stats = Mutex::new(FeedStats::default());
        let o = opts(KernelConfig::default(), Some(3 * 255));
        let r = run_for(Duration::from_secs(20), &server.addr, &o, &mut sink, &stats).await;
        assert_eq!(r, Some(Ok(())));
        let s = stats.lock().unwrap().clone();
        assert_eq!(s.kernel.ioctl_failures, 3);
        assert_eq!(s.kernel.bytes_written, 0);
        assert_eq!(s.kernel.bits_credited, 0);
        assert_eq!(s.bytes_received, 3 * 255);
    }

    #[test]
    fn discard_sink_reports_initialised_after_1024_bytes() {
        let mut d = Discard::default();
        assert!(!d.initialised());
        d.add_entropy(&[0; 1023], 0).unwrap();
        assert!(!d.initialised());
        d.add_entropy(&[0; 1], 0).unwrap();
        assert!(d.initialised());
    }
}
