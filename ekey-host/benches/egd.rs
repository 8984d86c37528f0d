//! The EGD server under load (issue 4): throughput and per-request latency
//! with many clients and a fast key, then fairness between clients when
//! entropy is scarce (the key at its real rate, about 4 kB/s); shares
//! over time under scarcity (issue 13); and EGD over TLS beside plain TCP
//! (issue 15).
//!
//! `cargo bench -p ekey-host --bench egd`
//!
//! Measurements:
//!
//! * `throughput`: `EKEY_BENCH_CLIENTS` clients, each doing `0x02 64` one
//!   at a time against a fast key; bytes/s and latency (target p99 < 5 ms).
//! * `fairness`: 16 clients, each pipelining ten `0x02 255` at once, at
//!   4,000 B/s; how close together they finish.
//! * `shares`: at 4,000 B/s, one greedy client keeping 40 `0x02 255` in
//!   flight (a new one for each 255 bytes received) beside 1, then 4,
//!   guest-like clients, each sending `0x02 64` on a 100 ms tick and
//!   waiting for the reply (a late reply is followed at once by the next
//!   request; missed ticks are skipped, not made up). After a 3 s warm-up,
//!   over a window of `EKEY_BENCH_SHARE_SECS`: each guest's bytes as a
//!   share of its demand (640 B/s; target >= 95 %) and its reply latency
//!   (request written to 64 bytes read; target p99 <= 20 ms), the greedy
//!   client's bytes (target > 0), and what clients received plus the change
//!   in what the pool holds (the daemon's `egd.total_served` and
//!   `egd.pool_bytes`: the guests' credit sits in the pool) against what
//!   the keys' gates handed to the EGD server (`keys[].accounting.to_egd`),
//!   both from `ekey-host status --json` (target >= 98 %: nothing lost).
//! * `tls`: one daemon with both `--egd-tcp` and `--egd-tls` on a fast key
//!   (so the pool is full: replies come from the buffer), and the
//!   `throughput` workload (`EKEY_BENCH_CLIENTS` clients, each doing
//!   `0x02 64` one at a time, for `EKEY_BENCH_SECS`) over plain TCP, then,
//!   once the daemon has seen those clients go, over TLS (each window
//!   starts once the daemon holds all its clients); bytes/s, p50 and p99
//!   of each, and TLS p99 / TCP p99 (target <= 2). The certificates
//!   (a CA, the server's for 127.0.0.1, one client certificate that all
//!   the TLS clients show, so they are one peer as the TCP clients are)
//!   are made with rcgen for the run; the TLS clients are rustls's
//!   blocking client with ring. Also (info) the TLS handshake time per
//!   connection, client side, the clients connecting one at a time: p50
//!   and max. Skipped in a build without the `tls` feature.
//!
//! Figures that miss their target are marked `MISSED`; nothing is asserted.
//!
//! Environment: `EKEY_BENCH_ONLY` (comma-separated list of the
//! measurements to run, of `throughput`, `fairness`, `shares` and `tls`;
//! default all), `EKEY_BENCH_SECS` (length of the throughput window, and
//! of each of the two `tls` windows, default 10), `EKEY_BENCH_FAST_RATE`
//! (the software key's rate in the throughput and tls tests, bytes/s,
//! default 8000000: faster than the daemon can serve, so the buffer holds
//! entropy), `EKEY_BENCH_CLIENTS` (clients in the throughput test and on
//! each transport in the tls test, default 64, at most the daemon's
//! `--egd-max-clients` default of 64; the daemon runs with
//! `--egd-max-per-peer 64`, as all the clients are one peer) and
//! `EKEY_BENCH_SHARE_SECS` (length of each shares window after the warm-up,
//! default 12).
//!
//! Each measurement gets a fresh `ekey-host emulate --unix` (the key, a
//! separate process; its `--rate` is in entropy bytes/s) and a fresh
//! `ekey-host run --egd-tcp 127.0.0.1:PORT` (for `tls`, also `--egd-tls`);
//! the clients are std threads with blocking TCP sockets (with rustls's
//! blocking client over them for TLS). Linux/Unix only.

mod common;

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Guard, KEYRING, env_or, status_json, thousands, wait_until_running};

/// Throughput test: default clients, and bytes per `0x02 n` request.
const TP_CLIENTS: usize = 64;
const TP_REQUEST: u8 = 64;
const TARGET_P99_MS: f64 = 5.0;

/// Fairness test: clients, requests pipelined per client, bytes per request.
const FAIR_CLIENTS: usize = 16;
const FAIR_REQUESTS: usize = 10;
const FAIR_REQUEST: u8 = 255;
const FAIR_RATE: u32 = 4000;
const TARGET_FAIRNESS: f64 = 0.8;
const VENDOR_FIRST_S: f64 = 0.01;
const VENDOR_LAST_S: f64 = 7.49;

/// Shares test: the key's rate, the greedy client's pipeline, the guests'
/// requests and tick, the warm-up, and the targets.
const SHARE_RATE: u32 = 4000;
const SHARE_GREEDY_IN_FLIGHT: usize = 40;
const SHARE_GREEDY_REQUEST: u8 = 255;
const SHARE_GUEST_REQUEST: u8 = 64;
const SHARE_TICK: Duration = Duration::from_millis(100);
const SHARE_WARMUP: Duration = Duration::from_secs(3);
const TARGET_GUEST_SHARE: f64 = 0.95;
const TARGET_GUEST_P99_MS: f64 = 20.0;
const TARGET_DELIVERED: f64 = 0.98;
/// How long a shares client's read may block before it looks whether the
/// window is over.
const SHARE_POLL: Duration = Duration::from_secs(1);

/// A client read that takes longer than this means the daemon is stuck.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// A software key and a daemon serving EGD on 127.0.0.1. Fields drop in
/// declaration order: the daemon, then the emulator, then the temp dir.
struct Rig {
    daemon: Guard,
    emulator: Guard,
    addr: SocketAddr,
    control: PathBuf,
    daemon_log: PathBuf,
    emu_log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rig {
    /// Starts the emulator at `rate` bytes/s and the daemon, and waits
    /// until the daemon reports the key running.
    fn start(rate: u32) -> Rig {
        Rig::start_with(rate, &[])
    }

    /// [`Rig::start`], with `extra` arguments for `ekey-host run` (another
    /// listener, say).
    fn start_with(rate: u32, extra: &[OsString]) -> Rig {
        let dir = tempfile::tempdir().expect("cannot create a temp dir");
        let keyring = dir.path().join("keyring");
        fs::write(&keyring, KEYRING).expect("cannot write the keyring");
        let control = dir.path().join("ctl");
        let daemon_log = dir.path().join("daemon.log");

        let (emulator, socket, emu_log) = common::start_emulator(dir.path(), rate);

        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut daemon = Guard::spawn(
            "the daemon",
            Command::new(BIN)
                .arg("run")
                .arg("--device")
                .arg(&socket)
                .arg("--keyring")
                .arg(&keyring)
                .arg("--egd-tcp")
                .arg(addr.to_string())
                // Every bench client is one peer (this user on 127.0.0.1).
                .arg("--egd-max-per-peer")
                .arg("64")
                .arg("--control")
                .arg(&control)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(fs::File::create(&daemon_log).expect("cannot create the daemon log")),
        );
        wait_until_running(&control, &mut daemon, &daemon_log, Duration::from_secs(20));
        Rig {
            daemon,
            emulator,
            addr,
            control,
            daemon_log,
            emu_log,
            _dir: dir,
        }
    }

    fn assert_alive(&mut self) {
        self.daemon.assert_alive(&self.daemon_log);
        self.emulator.assert_alive(&self.emu_log);
    }

    /// Connects one EGD client (Nagle off, bounded reads).
    fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr)
            .unwrap_or_else(|e| panic!("cannot connect to the EGD server at {}: {e}", self.addr));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .expect("read timeout");
        stream
    }

    /// The daemon's `egd` status (total_served, total_clients), if it answers.
    fn egd_totals(&self) -> Option<(u64, u64)> {
        let json = status_json(&self.control)?;
        Some((
            json["egd"]["total_served"].as_u64()?,
            json["egd"]["total_clients"].as_u64()?,
        ))
    }
}

/// A TCP port that was free a moment ago: bind port 0, read it, let go.
fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}

/// The `q` quantile (0..=1) of sorted nanosecond values, in milliseconds.
fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1e6
}

/// What a throughput run saw.
struct Load {
    /// Every request's latency (request written to reply read), ns, sorted.
    latencies: Vec<u64>,
    /// Requests completed by each client.
    per_client: Vec<usize>,
    /// From the clients' start to the last one's end, s.
    wall: f64,
}

impl Load {
    fn requests(&self) -> u64 {
        self.latencies.len() as u64
    }

    fn bytes(&self) -> u64 {
        self.requests() * u64::from(TP_REQUEST)
    }

    fn bytes_per_s(&self) -> u64 {
        (self.bytes() as f64 / self.wall).round() as u64
    }

    /// The `q` quantile of the latencies, ms.
    fn ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies, q)
    }

    fn max_ms(&self) -> f64 {
        *self.latencies.last().expect("no latencies") as f64 / 1e6
    }

    fn mean_ms(&self) -> f64 {
        self.latencies.iter().sum::<u64>() as f64 / self.latencies.len() as f64 / 1e6
    }
}

/// One throughput client (`name`, for messages): `0x02 TP_REQUEST` one at
/// a time, from the barrier until `window` has passed. Returns each
/// request's latency (ns).
fn request_loop<S: Read + Write>(
    name: &str,
    stream: &mut S,
    barrier: &Barrier,
    window: Duration,
) -> Vec<u64> {
    let request = [0x02, TP_REQUEST];
    let mut reply = [0u8; TP_REQUEST as usize];
    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 14);
    barrier.wait();
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        let t0 = Instant::now();
        stream
            .write_all(&request)
            .unwrap_or_else(|e| panic!("{name}: write: {e}"));
        stream
            .read_exact(&mut reply)
            .unwrap_or_else(|e| panic!("{name}: read: {e}"));
        latencies.push(t0.elapsed().as_nanos() as u64);
    }
    latencies
}

/// Runs [`request_loop`] on each of `streams` (a thread each, named
/// `egd-KIND-I`; all start together) for `window`. Each stream is closed
/// when its client is done.
fn run_load<S: Read + Write + Send + 'static>(
    kind: &str,
    streams: Vec<S>,
    window: Duration,
) -> Load {
    let barrier = Arc::new(Barrier::new(streams.len() + 1));
    let workers: Vec<_> = streams
        .into_iter()
        .enumerate()
        .map(|(i, mut stream)| {
            let barrier = Arc::clone(&barrier);
            let name = format!("{kind} {i}");
            thread::Builder::new()
                .name(format!("egd-{kind}-{i}"))
                .spawn(move || request_loop(&name, &mut stream, &barrier, window))
                .expect("cannot spawn a client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut latencies: Vec<u64> = Vec::new();
    let mut per_client: Vec<usize> = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(lat) => {
                per_client.push(lat.len());
                latencies.extend(lat);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    assert!(!latencies.is_empty(), "{kind}: no request completed");
    latencies.sort_unstable();
    Load {
        latencies,
        per_client,
        wall,
    }
}

/// `clients` clients, each doing `0x02 64` one at a time for `secs` seconds.
fn throughput(secs: f64, rate: u32, clients: usize) {
    let mut rig = Rig::start(rate);
    let totals0 = rig.egd_totals();
    let streams: Vec<TcpStream> = (0..clients).map(|_| rig.connect()).collect();
    let load = run_load("client", streams, Duration::from_secs_f64(secs));
    rig.assert_alive();
    let totals1 = rig.egd_totals();
    drop(rig);

    let p99 = load.ms(0.99);
    let verdict = if p99 < TARGET_P99_MS { "" } else { "  MISSED" };
    println!(
        "egd throughput: {clients} clients x 0x02 {TP_REQUEST} for {:.1} s: {} B/s; \
         latency p50 {:.2} ms, p99 {p99:.2} ms, max {:.2} ms \
         (target p99 < {TARGET_P99_MS} ms){verdict}",
        load.wall,
        thousands(load.bytes_per_s()),
        load.ms(0.50),
        load.max_ms(),
    );
    println!(
        "  (info) {} requests ({} B), mean latency {:.3} ms, p90 {:.2} ms, p99.9 {:.2} ms; \
         software key paced at {} B/s",
        thousands(load.requests()),
        thousands(load.bytes()),
        load.mean_ms(),
        load.ms(0.90),
        load.ms(0.999),
        thousands(u64::from(rate)),
    );
    println!(
        "  (info) requests per client: min {}, max {}",
        load.per_client.iter().min().unwrap(),
        load.per_client.iter().max().unwrap()
    );
    if let (Some((s0, c0)), Some((s1, c1))) = (totals0, totals1) {
        println!(
            "  (info) daemon's own count: {} B served to {} clients in the window",
            thousands(s1 - s0),
            c1 - c0
        );
    }
}

/// The `tls` measurement: TLS beside plain TCP in one daemon.
#[cfg(feature = "tls")]
mod tls {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use rcgen::{
        BasicConstraints, Certificate, CertificateParams, CertifiedIssuer, DnType,
        ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
    use rustls_pki_types::{PrivateKeyDer, ServerName};

    use super::*;

    /// TLS p99 / plain TCP p99, at most.
    const TARGET_P99_RATIO: f64 = 2.0;
    /// The subject of the one client certificate every TLS client shows
    /// (so they are one peer, as the TCP clients are).
    const CLIENT_CN: &str = "ekey-bench-client";

    /// A TLS EGD client's stream.
    type TlsStream = StreamOwned<ClientConnection, TcpStream>;

    /// Certificates made for the run: a CA that is both the server's and
    /// the clients' (`--tls-client-ca`), the server's certificate for
    /// 127.0.0.1 and its key (files, for the daemon), and the clients'
    /// settings with one client certificate (in memory).
    struct Pki {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
        client: Arc<ClientConfig>,
        _dir: tempfile::TempDir,
    }

    /// A certificate from `ca` for `names` (addresses or DNS names), for
    /// `usage`, and its key.
    fn issue(
        ca: &CertifiedIssuer<'static, KeyPair>,
        cn: &str,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> (Certificate, KeyPair) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("cannot make a key pair");
        let cert = params
            .signed_by(&key, ca)
            .expect("cannot sign a certificate");
        (cert, key)
    }

    /// Writes `text` to `path` and gives it `mode`.
    fn write_file(path: &Path, text: &str, mode: u32) {
        fs::write(path, text).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().expect("cannot create a temp dir");
            let mut params =
                CertificateParams::new(Vec::<String>::new()).expect("CA certificate parameters");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(DnType::CommonName, "ekey-bench CA");
            let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
                .expect("cannot make the CA certificate");
            let (server_cert, server_key) = issue(
                &ca,
                "ekey-bench-server",
                &["127.0.0.1"],
                ExtendedKeyUsagePurpose::ServerAuth,
            );
            let (client_cert, client_key) =
                issue(&ca, CLIENT_CN, &[], ExtendedKeyUsagePurpose::ClientAuth);

            let pki_path = |name: &str| dir.path().join(name);
            let (ca_path, cert, key) = (
                pki_path("ca.pem"),
                pki_path("server.pem"),
                pki_path("server.key"),
            );
            write_file(&ca_path, &ca.pem(), 0o644);
            write_file(&cert, &server_cert.pem(), 0o644);
            // The daemon refuses a key file that group or others may read.
            write_file(&key, &server_key.serialize_pem(), 0o600);

            let mut roots = RootCertStore::empty();
            roots
                .add(ca.der().clone())
                .expect("the CA certificate is not usable as a root");
            // ring, as the daemon uses (src/tls.rs); rustls marks it
            // deprecated for its lack of post-quantum key exchange.
            #[allow(deprecated)]
            let provider = rustls::crypto::ring::default_provider();
            let client = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .expect("TLS protocol versions")
                .with_root_certificates(roots)
                .with_client_auth_cert(
                    vec![client_cert.der().clone()],
                    PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
                )
                .expect("the client certificate and key are not usable");
            Pki {
                ca: ca_path,
                cert,
                key,
                client: Arc::new(client),
                _dir: dir,
            }
        }

        /// `ekey-host run` arguments for a TLS listener on `addr`.
        fn daemon_args(&self, addr: SocketAddr) -> Vec<OsString> {
            vec![
                "--egd-tls".into(),
                addr.to_string().into(),
                "--tls-cert".into(),
                self.cert.clone().into(),
                "--tls-key".into(),
                self.key.clone().into(),
                "--tls-client-ca".into(),
                self.ca.clone().into(),
            ]
        }

        /// Connects a TLS EGD client to `addr` (Nagle off, bounded reads)
        /// and completes its handshake. Returns the stream and the
        /// handshake's time: from making the ClientHello (after the TCP
        /// connect) to the handshake done on the client's side (its
        /// Finished sent).
        fn connect(&self, addr: SocketAddr) -> (TlsStream, Duration) {
            let mut sock = TcpStream::connect(addr)
                .unwrap_or_else(|e| panic!("cannot connect to the TLS EGD server at {addr}: {e}"));
            sock.set_nodelay(true).expect("TCP_NODELAY");
            sock.set_read_timeout(Some(READ_TIMEOUT))
                .expect("read timeout");
            let t0 = Instant::now();
            let mut conn =
                ClientConnection::new(Arc::clone(&self.client), ServerName::from(addr.ip()))
                    .expect("cannot start a TLS client connection");
            while conn.is_handshaking() {
                conn.complete_io(&mut sock)
                    .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
            }
            (StreamOwned::new(conn, sock), t0.elapsed())
        }
    }

    /// Waits until the daemon holds `n` EGD clients (TCP and TLS);
    /// panics after `timeout`.
    fn wait_for_clients(rig: &mut Rig, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            rig.assert_alive();
            let held = status_json(&rig.control)
                .and_then(|json| json["egd"]["clients"].as_array().map(Vec::len));
            if held == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon holds {held:?} EGD clients, not {n}, after {timeout:?}; its log:\n{}",
                fs::read_to_string(&rig.daemon_log).unwrap_or_default()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// One daemon with `--egd-tcp` and `--egd-tls` on a fast key: the
    /// throughput workload over plain TCP, then over TLS.
    pub(super) fn tls(secs: f64, rate: u32, clients: usize) {
        let pki = Pki::new();
        let tls_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut rig = Rig::start_with(rate, &pki.daemon_args(tls_addr));
        let log = fs::read_to_string(&rig.daemon_log).unwrap_or_default();
        assert!(
            log.contains(&format!("EGD server on tls {tls_addr}")),
            "the daemon does not say it serves TLS on {tls_addr}; its log:\n{log}"
        );
        let window = Duration::from_secs_f64(secs);

        let totals0 = rig.egd_totals();
        let streams: Vec<TcpStream> = (0..clients).map(|_| rig.connect()).collect();
        // As for TLS below: start the window with every client admitted.
        wait_for_clients(&mut rig, clients, Duration::from_secs(10));
        let tcp = run_load("tcp-client", streams, window);
        rig.assert_alive();
        let totals1 = rig.egd_totals();
        // The TCP and TLS clients share the daemon's slots: let it see the
        // TCP ones go first.
        wait_for_clients(&mut rig, 0, Duration::from_secs(10));

        // One at a time, so each handshake is timed alone.
        let mut handshakes: Vec<u64> = Vec::with_capacity(clients);
        let streams: Vec<TlsStream> = (0..clients)
            .map(|_| {
                let (stream, took) = pki.connect(tls_addr);
                handshakes.push(took.as_nanos() as u64);
                stream
            })
            .collect();
        handshakes.sort_unstable();
        let version = streams[0]
            .conn
            .protocol_version()
            .map_or_else(|| "-".into(), |v| format!("{v:?}"));
        let suite = streams[0]
            .conn
            .negotiated_cipher_suite()
            .map_or_else(|| "-".into(), |s| format!("{:?}", s.suite()));
        // The daemon admits a TLS client once its handshake is done on the
        // server's side too; start the window with all of them admitted.
        wait_for_clients(&mut rig, clients, Duration::from_secs(10));
        let tls = run_load("tls-client", streams, window);
        rig.assert_alive();
        let totals3 = rig.egd_totals();
        let failures = status_json(&rig.control).map(|json| {
            (
                json["egd"]["tls_handshake_failures"].as_u64(),
                json["egd"]["tls_handshake_timeouts"].as_u64(),
            )
        });
        drop(rig);

        let head = format!("egd tls: {clients} clients x 0x02 {TP_REQUEST}, buffered");
        for (name, load) in [("plain TCP", &tcp), ("TLS", &tls)] {
            println!(
                "{head}, {name} for {:.1} s: {} B/s; latency p50 {:.2} ms, p99 {:.2} ms, \
                 max {:.2} ms",
                load.wall,
                thousands(load.bytes_per_s()),
                load.ms(0.50),
                load.ms(0.99),
                load.max_ms(),
            );
        }
        let ratio = tls.ms(0.99) / tcp.ms(0.99);
        println!(
            "{head}: TLS p99 / TCP p99 = {ratio:.2} (target <= {TARGET_P99_RATIO:.0}){}; \
             TLS B/s / TCP B/s = {:.2}",
            missed(ratio <= TARGET_P99_RATIO),
            tls.bytes_per_s() as f64 / tcp.bytes_per_s() as f64,
        );
        println!(
            "  (info) TLS handshake per connection ({clients}, one at a time, client side): \
             p50 {:.2} ms, max {:.2} ms; {version}, {suite}",
            quantile_ms(&handshakes, 0.50),
            *handshakes.last().unwrap() as f64 / 1e6,
        );
        for (name, load) in [("tcp", &tcp), ("tls", &tls)] {
            println!(
                "  (info) {name}: {} requests ({} B), per client min {}, max {}; mean latency \
                 {:.3} ms, p90 {:.2} ms, p99.9 {:.2} ms",
                thousands(load.requests()),
                thousands(load.bytes()),
                load.per_client.iter().min().unwrap(),
                load.per_client.iter().max().unwrap(),
                load.mean_ms(),
                load.ms(0.90),
                load.ms(0.999),
            );
        }
        let count = |a: Option<(u64, u64)>, b: Option<(u64, u64)>| match (a, b) {
            (Some((s0, c0)), Some((s1, c1))) => {
                format!("{} B to {} clients", thousands(s1 - s0), c1 - c0)
            }
            _ => "-".into(),
        };
        let (fails, timeouts) = failures.unwrap_or((None, None));
        println!(
            "  (info) daemon's own count: tcp {}, tls {}; TLS handshake \
             failures {}, timeouts {}; software key paced at {} B/s",
            count(totals0, totals1),
            count(totals1, totals3),
            fails.map_or_else(|| "-".into(), |n| n.to_string()),
            timeouts.map_or_else(|| "-".into(), |n| n.to_string()),
            thousands(u64::from(rate)),
        );
    }
}

/// 16 clients, each pipelining ten `0x02 255` at once, at the real rate.
fn fairness() {
    let mut rig = Rig::start(FAIR_RATE);
    let per_client = FAIR_REQUESTS * usize::from(FAIR_REQUEST);
    let barrier = Arc::new(Barrier::new(FAIR_CLIENTS + 1));
    let workers: Vec<_> = (0..FAIR_CLIENTS)
        .map(|i| {
            let mut stream = rig.connect();
            let barrier = Arc::clone(&barrier);
            thread::Builder::new()
                .name(format!("egd-fair-{i}"))
                .spawn(move || {
                    let request: Vec<u8> = [0x02, FAIR_REQUEST].repeat(FAIR_REQUESTS);
                    let mut reply = vec![0u8; per_client];
                    barrier.wait();
                    stream
                        .write_all(&request)
                        .unwrap_or_else(|e| panic!("client {i}: write: {e}"));
                    stream
                        .read_exact(&mut reply)
                        .unwrap_or_else(|e| panic!("client {i}: read: {e}"));
                    Instant::now()
                })
                .expect("cannot spawn a client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut done: Vec<f64> = workers
        .into_iter()
        .map(|w| match w.join() {
            Ok(t) => t.saturating_duration_since(start).as_secs_f64(),
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect();
    rig.assert_alive();
    drop(rig);

    done.sort_by(f64::total_cmp);
    let first = done[0];
    let last = done[done.len() - 1];
    let ratio = if last > 0.0 { first / last } else { 1.0 };
    let verdict = if ratio >= TARGET_FAIRNESS {
        ""
    } else {
        "  MISSED"
    };
    println!(
        "egd fairness: {FAIR_CLIENTS} clients x {FAIR_REQUESTS} x 0x02 {FAIR_REQUEST} \
         at {FAIR_RATE} B/s: first done {first:.2} s, last {last:.2} s, first/last {ratio:.2} \
         (target >= {TARGET_FAIRNESS:.2}; ekeyd {VENDOR_FIRST_S} s / {VENDOR_LAST_S} s){verdict}"
    );
    let list: Vec<String> = done.iter().map(|t| format!("{t:.2}")).collect();
    println!(
        "  (info) {} B in total; finish times (s, sorted): {}",
        thousands((FAIR_CLIENTS * per_client) as u64),
        list.join(" ")
    );
}

/// True for the errors a read or write timeout gives.
fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// The shares scenario's clock: clients run from `start`; the measured
/// window is `[w0, w1)`; `stop` is set at `w1` (then the sockets are shut
/// down).
#[derive(Clone)]
struct ShareClock {
    start: Instant,
    w0: Instant,
    w1: Instant,
    stop: Arc<AtomicBool>,
}

impl ShareClock {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn in_window(&self, at: Instant) -> bool {
        at >= self.w0 && at < self.w1
    }
}

/// The greedy client: keeps `SHARE_GREEDY_IN_FLIGHT` requests for
/// `SHARE_GREEDY_REQUEST` bytes in flight, sending a new one for each
/// `SHARE_GREEDY_REQUEST` bytes received. Returns its bytes in the window.
fn greedy_client(mut stream: TcpStream, clock: ShareClock) -> u64 {
    let one = [0x02, SHARE_GREEDY_REQUEST];
    let size = u64::from(SHARE_GREEDY_REQUEST);
    if let Err(e) = stream.write_all(&one.repeat(SHARE_GREEDY_IN_FLIGHT)) {
        assert!(clock.stopped(), "greedy client: write: {e}");
        return 0;
    }
    let mut buf = [0u8; 4096];
    let mut received: u64 = 0;
    let mut in_window: u64 = 0;
    while !clock.stopped() {
        match stream.read(&mut buf) {
            Ok(0) => {
                assert!(
                    clock.stopped(),
                    "greedy client: the daemon closed the connection"
                );
            }
            Ok(n) => {
                if clock.in_window(Instant::now()) {
                    in_window += n as u64;
                }
                let done = (received + n as u64) / size - received / size;
                received += n as u64;
                if done > 0
                    && let Err(e) = stream.write_all(&one.repeat(done as usize))
                {
                    assert!(clock.stopped(), "greedy client: write: {e}");
                }
            }
            Err(e) if timed_out(&e) => {}
            Err(e) => assert!(clock.stopped(), "greedy client: read: {e}"),
        }
    }
    in_window
}

/// What one guest saw in the window.
struct GuestResult {
    /// Reply bytes read in the window.
    bytes: u64,
    /// Latencies (ns) of the replies completed in the window, sorted.
    latencies: Vec<u64>,
    /// How long the request pending when the window closed had waited.
    pending: Option<Duration>,
}

/// A guest-like client: `0x02 SHARE_GUEST_REQUEST` on a `SHARE_TICK`
/// tick starting at `first`, one at a time. A reply that comes after the
/// next tick is followed at once by the next request, and the ticks
/// missed are skipped (the tick stays on its grid).
fn guest_client(i: usize, mut stream: TcpStream, clock: ShareClock, first: Instant) -> GuestResult {
    let request = [0x02, SHARE_GUEST_REQUEST];
    let mut reply = [0u8; SHARE_GUEST_REQUEST as usize];
    let mut result = GuestResult {
        bytes: 0,
        latencies: Vec::new(),
        pending: None,
    };
    let mut due = first;
    'ticks: loop {
        if clock.stopped() || due >= clock.w1 {
            break;
        }
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
            continue;
        }
        let t0 = Instant::now();
        if let Err(e) = stream.write_all(&request) {
            assert!(clock.stopped(), "guest {i}: write: {e}");
            break;
        }
        let mut got = 0;
        while got < reply.len() {
            match stream.read(&mut reply[got..]) {
                Ok(0) => {
                    assert!(
                        clock.stopped(),
                        "guest {i}: the daemon closed the connection"
                    );
                }
                Ok(n) => {
                    if clock.in_window(Instant::now()) {
                        result.bytes += n as u64;
                    }
                    got += n;
                    continue;
                }
                Err(e) if timed_out(&e) => {}
                Err(e) => assert!(clock.stopped(), "guest {i}: read: {e}"),
            }
            if clock.stopped() {
                result.pending = Some(clock.w1.saturating_duration_since(t0));
                break 'ticks;
            }
        }
        let done = Instant::now();
        if clock.in_window(done) {
            result.latencies.push((done - t0).as_nanos() as u64);
        }
        due += SHARE_TICK;
        if due <= done {
            // Late: the next request goes now; the ticks missed meanwhile
            // are skipped, so `due` becomes the last tick at or before now.
            let missed = (done - due).as_nanos() / SHARE_TICK.as_nanos();
            due += SHARE_TICK * missed as u32;
        }
    }
    result.latencies.sort_unstable();
    result
}

/// (egd.total_served + egd.pool_bytes, sum of keys[].accounting.to_egd)
/// from the daemon: bytes delivered or still in the pool (held there as the
/// guests' credit, or free), against bytes released to the EGD server.
fn served_and_released(rig: &Rig) -> Option<(u64, u64)> {
    let json = status_json(&rig.control)?;
    let served = json["egd"]["total_served"].as_u64()? + json["egd"]["pool_bytes"].as_u64()?;
    let released = json["keys"]
        .as_array()?
        .iter()
        .map(|k| k["accounting"]["to_egd"].as_u64())
        .sum::<Option<u64>>()?;
    Some((served, released))
}

/// `x` as a percentage with one decimal, or "-".
fn percent(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{:.1}", x * 100.0))
}

/// A latency in ms, or "-".
fn ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

/// " MISSED" unless `ok`.
fn missed(ok: bool) -> &'static str {
    if ok { "" } else { " MISSED" }
}

/// One greedy client beside `guests` guest-like ones, at the real rate.
fn shares(guests: usize, secs: f64) {
    let mut rig = Rig::start(SHARE_RATE);
    let window = Duration::from_secs_f64(secs);
    let start = Instant::now() + Duration::from_millis(100);
    let clock = ShareClock {
        start,
        w0: start + SHARE_WARMUP,
        w1: start + SHARE_WARMUP + window,
        stop: Arc::new(AtomicBool::new(false)),
    };
    let mut sockets: Vec<TcpStream> = Vec::new();
    let mut connect = || {
        let stream = rig.connect();
        stream
            .set_read_timeout(Some(SHARE_POLL))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(SHARE_POLL))
            .expect("write timeout");
        sockets.push(stream.try_clone().expect("cannot clone a socket"));
        stream
    };

    let greedy = {
        let stream = connect();
        let clock = clock.clone();
        thread::Builder::new()
            .name("egd-greedy".into())
            .spawn(move || {
                let now = Instant::now();
                thread::sleep(clock.start.saturating_duration_since(now));
                greedy_client(stream, clock)
            })
            .expect("cannot spawn a client thread")
    };
    let guest_threads: Vec<_> = (0..guests)
        .map(|i| {
            let stream = connect();
            let clock = clock.clone();
            // Guests' ticks are spread over the tick, as independent
            // guests' would be.
            let first = clock.start + SHARE_TICK * i as u32 / guests as u32;
            thread::Builder::new()
                .name(format!("egd-guest-{i}"))
                .spawn(move || guest_client(i, stream, clock, first))
                .expect("cannot spawn a client thread")
        })
        .collect();

    thread::sleep(clock.w0.saturating_duration_since(Instant::now()));
    let books0 = served_and_released(&rig);
    thread::sleep(clock.w1.saturating_duration_since(Instant::now()));
    let books1 = served_and_released(&rig);
    clock.stop.store(true, Ordering::SeqCst);
    for socket in &sockets {
        let _ = socket.shutdown(Shutdown::Both);
    }
    let greedy_bytes = match greedy.join() {
        Ok(b) => b,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    let results: Vec<GuestResult> = guest_threads
        .into_iter()
        .map(|g| match g.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        })
        .collect();
    rig.assert_alive();
    drop(rig);

    let demand = f64::from(SHARE_GUEST_REQUEST) * (1.0 / SHARE_TICK.as_secs_f64()) * secs;
    let share = |r: &GuestResult| r.bytes as f64 / demand;
    let p =
        |r: &GuestResult, q: f64| (!r.latencies.is_empty()).then(|| quantile_ms(&r.latencies, q));
    // The worst guest: the smallest share; the worst p99 (a guest with no
    // reply in the window counts as the worst).
    let worst_share = results.iter().map(share).fold(f64::INFINITY, f64::min);
    let worst_p99 = results
        .iter()
        .map(|r| p(r, 0.99).unwrap_or(f64::INFINITY))
        .fold(0.0, f64::max);
    let worst_p99 = worst_p99.is_finite().then_some(worst_p99);
    let ratio = match (books0, books1) {
        (Some((s0, r0)), Some((s1, r1))) if r1 > r0 => {
            Some(s1.saturating_sub(s0) as f64 / (r1 - r0) as f64)
        }
        _ => None,
    };

    let head = format!(
        "egd shares: {guests} guest{} (0x02 {SHARE_GUEST_REQUEST} every {} ms) + 1 greedy \
         ({SHARE_GREEDY_IN_FLIGHT} x 0x02 {SHARE_GREEDY_REQUEST} in flight) at {SHARE_RATE} B/s",
        if guests == 1 { "" } else { "s" },
        SHARE_TICK.as_millis(),
    );
    let share_ok = worst_share >= TARGET_GUEST_SHARE;
    let p99_ok = worst_p99.is_some_and(|x| x <= TARGET_GUEST_P99_MS);
    let tail = format!(
        "greedy {} B (target > 0){}; delivered/released {} % (target >= {:.0} %){}",
        thousands(greedy_bytes),
        missed(greedy_bytes > 0),
        percent(ratio),
        TARGET_DELIVERED * 100.0,
        missed(ratio.is_some_and(|r| r >= TARGET_DELIVERED)),
    );
    if guests == 1 {
        let r = &results[0];
        println!(
            "{head}: guest demand met {} % (target >= {:.0} %){}, p50 {} ms, p99 {} ms \
             (target <= {TARGET_GUEST_P99_MS} ms){}; {tail}",
            percent(Some(share(r))),
            TARGET_GUEST_SHARE * 100.0,
            missed(share_ok),
            ms(p(r, 0.50)),
            ms(p(r, 0.99)),
            missed(p99_ok),
        );
    } else {
        println!(
            "{head}: worst guest demand met {} % (target >= {:.0} %){}, worst p99 {} ms \
             (target <= {TARGET_GUEST_P99_MS} ms){}; {tail}",
            percent(Some(worst_share)),
            TARGET_GUEST_SHARE * 100.0,
            missed(share_ok),
            ms(worst_p99),
            missed(p99_ok),
        );
    }
    for (i, r) in results.iter().enumerate() {
        let pending = match r.pending {
            Some(d) => format!(
                ", one request pending {:.0} ms at the end",
                d.as_secs_f64() * 1e3
            ),
            None => String::new(),
        };
        println!(
            "  (info) guest {i}: {} B in {secs:.1} s = {} % of demand; {} replies ({} within \
             {TARGET_GUEST_P99_MS} ms), latency min {} ms, p50 {} ms, p99 {} ms, max {} ms{pending}",
            thousands(r.bytes),
            percent(Some(share(r))),
            r.latencies.len(),
            r.latencies
                .iter()
                .filter(|&&x| x as f64 / 1e6 <= TARGET_GUEST_P99_MS)
                .count(),
            ms(r.latencies.first().map(|&x| x as f64 / 1e6)),
            ms(p(r, 0.50)),
            ms(p(r, 0.99)),
            ms(r.latencies.last().map(|&x| x as f64 / 1e6)),
        );
    }
    if let (Some((s0, r0)), Some((s1, r1))) = (books0, books1) {
        let guest_bytes: u64 = results.iter().map(|r| r.bytes).sum();
        println!(
            "  (info) in {secs:.1} s: released to EGD {} B ({} B/s), delivered or still pooled {} B \
             ({} B/s): guests {} B, greedy {} B",
            thousands(r1.saturating_sub(r0)),
            thousands((r1.saturating_sub(r0) as f64 / secs).round() as u64),
            thousands(s1.saturating_sub(s0)),
            thousands((s1.saturating_sub(s0) as f64 / secs).round() as u64),
            thousands(guest_bytes),
            thousands(greedy_bytes),
        );
    } else {
        println!("  (info) the daemon's status did not answer; delivered/released unknown");
    }
}

/// The measurements `EKEY_BENCH_ONLY` asks for (all by default).
fn selected() -> Vec<&'static str> {
    const ALL: [&str; 4] = ["throughput", "fairness", "shares", "tls"];
    let Ok(list) = std::env::var("EKEY_BENCH_ONLY") else {
        return ALL.to_vec();
    };
    let mut chosen = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let known = ALL.iter().find(|&&a| a == name).unwrap_or_else(|| {
            panic!(
                "EKEY_BENCH_ONLY: unknown measurement {name:?} (known: {})",
                ALL.join(", ")
            )
        });
        if !chosen.contains(known) {
            chosen.push(*known);
        }
    }
    assert!(!chosen.is_empty(), "EKEY_BENCH_ONLY names no measurement");
    chosen
}

fn main() {
    let only = selected();
    let secs: f64 = env_or("EKEY_BENCH_SECS", 10.0);
    let fast_rate: u32 = env_or("EKEY_BENCH_FAST_RATE", 8_000_000);
    assert!(secs > 0.0, "EKEY_BENCH_SECS must be positive");
    let clients: usize = env_or("EKEY_BENCH_CLIENTS", TP_CLIENTS);
    let share_secs: f64 = env_or("EKEY_BENCH_SHARE_SECS", 12.0);
    assert!(fast_rate > 0, "EKEY_BENCH_FAST_RATE must be positive");
    assert!(clients > 0, "EKEY_BENCH_CLIENTS must be positive");
    assert!(share_secs > 0.0, "EKEY_BENCH_SHARE_SECS must be positive");
    if only.contains(&"throughput") {
        throughput(secs, fast_rate, clients);
    }
    if only.contains(&"fairness") {
        fairness();
    }
    if only.contains(&"shares") {
        shares(1, share_secs);
        shares(4, share_secs);
    }
    if only.contains(&"tls") {
        #[cfg(feature = "tls")]
        tls::tls(secs, fast_rate, clients);
        #[cfg(not(feature = "tls"))]
        println!("egd tls: skipped (ekey-host built without its `tls` feature)");
    }
}
