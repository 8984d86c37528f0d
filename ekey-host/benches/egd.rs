//! The EGD server under load (issue 4): throughput and per-request latency
//! with many clients and a fast key, then fairness between clients when
//! entropy is scarce (the key at its real rate, about 4 kB/s).
//!
//! `cargo bench -p ekey-host --bench egd`
//!
//! Environment: `EKEY_BENCH_SECS` (length of the throughput window,
//! default 10), `EKEY_BENCH_FAST_RATE` (the software key's rate in the
//! throughput test, bytes/s, default 8000000: faster than the daemon can serve, so the buffer holds entropy) and
//! `EKEY_BENCH_CLIENTS` (clients in the throughput test, default 64, at
//! most the daemon's `--egd-max-clients` default of 64).
//!
//! Each measurement gets a fresh `ekey-host emulate --unix` (the key, a
//! separate process) and a fresh `ekey-host run --egd-tcp 127.0.0.1:PORT`;
//! the clients are std threads with blocking TCP sockets. Linux/Unix only.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
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
                .arg("--control")
                .arg(&control)
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

/// `clients` clients, each doing `0x02 64` one at a time for `secs` seconds.
fn throughput(secs: f64, rate: u32, clients: usize) {
    let mut rig = Rig::start(rate);
    let totals0 = rig.egd_totals();
    let window = Duration::from_secs_f64(secs);
    let barrier = Arc::new(Barrier::new(clients + 1));
    let workers: Vec<_> = (0..clients)
        .map(|i| {
            let mut stream = rig.connect();
            let barrier = Arc::clone(&barrier);
            thread::Builder::new()
                .name(format!("egd-client-{i}"))
                .spawn(move || {
                    let request = [0x02, TP_REQUEST];
                    let mut reply = [0u8; TP_REQUEST as usize];
                    let mut latencies: Vec<u64> = Vec::with_capacity(1 << 14);
                    barrier.wait();
                    let deadline = Instant::now() + window;
                    while Instant::now() < deadline {
                        let t0 = Instant::now();
                        stream
                            .write_all(&request)
                            .unwrap_or_else(|e| panic!("client {i}: write: {e}"));
                        stream
                            .read_exact(&mut reply)
                            .unwrap_or_else(|e| panic!("client {i}: read: {e}"));
                        latencies.push(t0.elapsed().as_nanos() as u64);
                    }
                    latencies
                })
                .expect("cannot spawn a client thread")
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut all: Vec<u64> = Vec::new();
    let mut per_client: Vec<usize> = Vec::new();
    for worker in workers {
        match worker.join() {
            Ok(lat) => {
                per_client.push(lat.len());
                all.extend(lat);
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
    let wall = start.elapsed().as_secs_f64();
    rig.assert_alive();
    let totals1 = rig.egd_totals();
    drop(rig);

    assert!(!all.is_empty(), "no request completed");
    all.sort_unstable();
    let requests = all.len() as u64;
    let bytes = requests * u64::from(TP_REQUEST);
    let p50 = quantile_ms(&all, 0.50);
    let p99 = quantile_ms(&all, 0.99);
    let max = *all.last().unwrap() as f64 / 1e6;
    let mean = all.iter().sum::<u64>() as f64 / all.len() as f64 / 1e6;
    let verdict = if p99 < TARGET_P99_MS { "" } else { "  MISSED" };
    println!(
        "egd throughput: {clients} clients x 0x02 {TP_REQUEST} for {wall:.1} s: {} B/s; \
         latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms \
         (target p99 < {TARGET_P99_MS} ms){verdict}",
        thousands((bytes as f64 / wall).round() as u64),
    );
    println!(
        "  (info) {} requests ({} B), mean latency {mean:.3} ms, p90 {:.2} ms, p99.9 {:.2} ms; \
         software key paced at {} B/s",
        thousands(requests),
        thousands(bytes),
        quantile_ms(&all, 0.90),
        quantile_ms(&all, 0.999),
        thousands(u64::from(rate)),
    );
    println!(
        "  (info) requests per client: min {}, max {}",
        per_client.iter().min().unwrap(),
        per_client.iter().max().unwrap()
    );
    if let (Some((s0, c0)), Some((s1, c1))) = (totals0, totals1) {
        println!(
            "  (info) daemon's own count: {} B served to {} clients in the window",
            thousands(s1 - s0),
            c1 - c0
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

fn main() {
    let secs: f64 = env_or("EKEY_BENCH_SECS", 10.0);
    let fast_rate: u32 = env_or("EKEY_BENCH_FAST_RATE", 8_000_000);
    assert!(secs > 0.0, "EKEY_BENCH_SECS must be positive");
    let clients: usize = env_or("EKEY_BENCH_CLIENTS", TP_CLIENTS);
    assert!(fast_rate > 0, "EKEY_BENCH_FAST_RATE must be positive");
    assert!(clients > 0, "EKEY_BENCH_CLIENTS must be positive");
    throughput(secs, fast_rate, clients);
    fairness();
}
