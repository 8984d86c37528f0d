//! Prometheus metrics (`ekey-host run --metrics ADDR:PORT`).
//!
//! Every scrape builds a fresh registry from a snapshot of the daemon's
//! status (the same numbers `ekey-host status --json` shows), so the
//! figures are consistent with each other and nothing is counted twice.
//! Served as the Prometheus text format (0.0.4) on `GET /metrics`.
//!
//! Names are prefixed `ekey_`. Per-key series carry `serial` (PEM64, `?`
//! until the key has said it) and `transport` labels. Byte counts of a key
//! add up: `ekey_key_bytes_received_total` = `ekey_key_bytes_total` summed
//! over `fate` (`released` by the health gate, `discarded` by it) +
//! `ekey_key_bytes_pending` (in the gate: waiting for their block to be
//! tested, or passed and not yet handed on); and the released bytes =
//! `ekey_key_output_bytes_total` summed over `output` +
//! `ekey_key_output_queued_bytes` (on their way to an output).

use std::convert::Infallible;
use std::sync::atomic::AtomicU64;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::keys::driver::KeyStatus;
use crate::outputs::egd::EgdStats;
use crate::outputs::kernel::KernelStats;

/// What one scrape shows.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every key the daemon drives (or drove).
    pub keys: Vec<KeyStatus>,
    /// The EGD server's counters, if it runs.
    pub egd: Option<EgdStats>,
    /// The kernel output's counters, if it runs.
    pub kernel: Option<KernelStats>,
    /// Bytes written to `--output`.
    pub file_bytes: u64,
    /// The vhost-user guests (status's `vhost_user` document), if served.
    pub vhost_user: Option<serde_json::Value>,
}

type Labels = Vec<(String, String)>;

fn key_labels(k: &KeyStatus) -> Labels {
    vec![
        (
            "serial".into(),
            k.serial.map_or_else(|| "?".into(), |s| s.to_string()),
        ),
        ("transport".into(), k.transport.clone()),
    ]
}

fn with(mut l: Labels, name: &str, value: &str) -> Labels {
    l.push((name.into(), value.into()));
    l
}

/// Counters and gauges of one name, registered on first use.
struct Metrics<'r> {
    reg: &'r mut Registry,
}

impl Metrics<'_> {
    fn counter(&mut self, name: &str, help: &str) -> Family<Labels, Counter> {
        let f = Family::<Labels, Counter>::default();
        self.reg.register(name, help, f.clone());
        f
    }

    fn gauge(&mut self, name: &str, help: &str) -> Family<Labels, Gauge> {
        let f = Family::<Labels, Gauge>::default();
        self.reg.register(name, help, f.clone());
        f
    }

    fn fgauge(&mut self, name: &str, help: &str) -> Family<Labels, Gauge<f64, AtomicU64>> {
        let f = Family::<Labels, Gauge<f64, AtomicU64>>::default();
        self.reg.register(name, help, f.clone());
        f
    }
}

fn set(f: &Family<Labels, Gauge>, l: &Labels, v: i64) {
    f.get_or_create(l).set(v);
}

fn add(f: &Family<Labels, Counter>, l: &Labels, v: u64) {
    f.get_or_create(l).inc_by(v);
}

/// One series of `f` per `(value, count)`, labelled `label="value"`.
fn add_each(f: &Family<Labels, Counter>, label: &str, counts: &[(&str, u64)]) {
    for &(value, n) in counts {
        add(f, &vec![(label.into(), value.into())], n);
    }
}

fn fset(f: &Family<Labels, Gauge<f64, AtomicU64>>, l: &Labels, v: f64) {
    f.get_or_create(l).set(v);
}

/// The registry for one scrape.
pub fn registry(s: &Snapshot) -> Registry {
    let mut reg = Registry::with_prefix("ekey");
    let mut m = Metrics { reg: &mut reg };
    key_device_metrics(&mut m, &s.keys);
    key_gate_metrics(&mut m, &s.keys);
    key_session_metrics(&mut m, &s.keys);
    key_output_metrics(&mut m, s);
    let out_bytes = m.counter(
        "output_bytes",
        "Bytes each output passed on (kernel: mixed into the pool; egd: served to clients; file: written)",
    );
    add(
        &out_bytes,
        &vec![("output".into(), "file".into())],
        s.file_bytes,
    );
    if let Some(k) = &s.kernel {
        kernel_metrics(&mut m, k, &out_bytes);
    }
    if let Some(e) = &s.egd {
        egd_metrics(&mut m, e, &out_bytes);
    }
    if let Some(v) = &s.vhost_user {
        vhost_user_metrics(&mut m, v);
    }
    reg
}

/// Each vhost-user guest (from status's `vhost_user` document): whether
/// QEMU is connected, its connections, bytes and requests served, buffers
/// held, and rejected descriptors by kind. The hub's view of the same
/// guest is its `ekey_egd_client_*` series (`peer="vhost-user NAME"`).
fn vhost_user_metrics(m: &mut Metrics<'_>, v: &serde_json::Value) {
    let connected = m.gauge(
        "vhost_user_connected",
        "1 while the vhost-user guest's QEMU is connected",
    );
    let connections = m.counter(
        "vhost_user_connections",
        "Connections of each vhost-user guest's QEMU",
    );
    let served = m.counter(
        "vhost_user_served_bytes",
        "Bytes written into each vhost-user guest's buffers",
    );
    let requests = m.counter(
        "vhost_user_served_requests",
        "Buffers of each vhost-user guest filled",
    );
    let pending = m.gauge(
        "vhost_user_requests_pending",
        "Buffers of each vhost-user guest held, waiting for entropy",
    );
    let rejected = m.counter(
        "vhost_user_rejected_descriptors",
        "Descriptor chains of each vhost-user guest rejected, by kind",
    );
    let n = |g: &serde_json::Value, k: &str| g[k].as_u64().unwrap_or(0);
    for g in v["guests"].as_array().into_iter().flatten() {
        let l: Labels = vec![("name".into(), g["name"].as_str().unwrap_or("?").to_string())];
        set(
            &connected,
            &l,
            i64::from(g["connected"].as_bool() == Some(true)),
        );
        add(&connections, &l, n(g, "connections"));
        add(&served, &l, n(g, "bytes_served"));
        add(&requests, &l, n(g, "requests_served"));
        set(&pending, &l, n(g, "requests_pending") as i64);
        if let Some(kinds) = g["rejected"].as_object() {
            for (kind, count) in kinds.iter().filter(|(k, _)| k.as_str() != "total") {
                add(
                    &rejected,
                    &with(l.clone(), "kind", kind),
                    count.as_u64().unwrap_or(0),
                );
            }
        }
    }
}

/// Each key's link, state and what the key says of itself (readings,
/// entropy estimates, its own FIPS 140-2 counters).
fn key_device_metrics(m: &mut Metrics<'_>, keys: &[KeyStatus]) {
    let up = m.gauge("key_up", "1 while the key is attached and keyed");
    let state = m.gauge("key_state", "1 for the state the key's session is in");
    let connects = m.counter("key_connects", "Times the key's link came up");
    let temp = m.fgauge("key_temperature_celsius", "The key's core temperature");
    let volts = m.fgauge("key_voltage_volts", "The key's supply voltage");
    let shannon = m.fgauge(
        "key_shannons_per_byte",
        "The key's entropy estimate per byte, per generator stream",
    );
    let min_entropy = m.fgauge(
        "min_entropy_bits_per_byte",
        "SP 800-90B min-entropy estimate of the key's output, per estimator (\"min\": the least), over its window",
    );
    let dev_blocks = m.counter(
        "key_device_fips_blocks",
        "FIPS 140-2 blocks the key tested itself (since its reset)",
    );
    let dev_failed = m.counter(
        "key_device_fips_blocks_failed",
        "FIPS 140-2 blocks the key reports failed (since its reset)",
    );
    let dev_fail = m.counter(
        "key_device_fips_failures",
        "FIPS 140-2 failures the key reports, by test (since its reset; a block can fail several)",
    );
    for k in keys {
        let l = key_labels(k);
        set(&up, &l, i64::from(k.connected && k.state.is_running()));
        set(&state, &with(l.clone(), "state", &k.state.to_string()), 1);
        add(&connects, &l, k.connects);
        if let Some(t) = k.info.temperature {
            fset(&temp, &l, t.millicelsius() as f64 / 1000.0);
        }
        if let Some(v) = k.info.voltage {
            fset(&volts, &l, f64::from(v.millivolts) / 1000.0);
        }
        if let Some(e) = k.min_entropy {
            fset(&min_entropy, &with(l.clone(), "estimator", "min"), e.min());
            for (name, v) in e.iter() {
                fset(&min_entropy, &with(l.clone(), "estimator", name), v);
            }
        }
        if let Some(sh) = k.info.shannon {
            for (name, v) in [
                ("raw_left", sh.left_per_byte()),
                ("raw_right", sh.right_per_byte()),
                ("raw_xor", sh.xor_per_byte()),
                ("debiased_left", sh.debiased_left_per_byte()),
                ("debiased_right", sh.debiased_right_per_byte()),
            ] {
                if let Some(v) = v {
                    fset(&shannon, &with(l.clone(), "stream", name), f64::from(v));
                }
            }
        }
        if let Some(f) = k.info.fips {
            add(&dev_blocks, &l, u64::from(f.blocks));
            add(&dev_failed, &l, u64::from(f.failures));
            for (name, v) in [("monobit", f.monobit), ("poker", f.poker), ("runs", f.runs)] {
                add(&dev_fail, &with(l.clone(), "test", name), u64::from(v));
            }
        }
    }
}

/// Each key's health gate: blocks tested and failed, failures by test,
/// whether it is open, its closings and warnings.
fn key_gate_metrics(m: &mut Metrics<'_>, keys: &[KeyStatus]) {
    let host_blocks = m.counter(
        "key_host_fips_blocks",
        "20,000-bit blocks of verified output the host's health gate tested",
    );
    let host_failed = m.counter(
        "key_host_blocks_failed",
        "20,000-bit blocks that failed any of the host's health tests",
    );
    let host_fail = m.counter(
        "key_host_health_failures",
        "Health test failures found by the host's gate, by test (a block can fail several)",
    );
    let gate_open = m.gauge(
        "key_gate_open",
        "1 while the host's health gate lets the key's output through",
    );
    let gate_closures = m.counter("key_gate_closures", "Times the health gate closed");
    let gate_warn = m.gauge(
        "key_gate_warning",
        "1 while a reading (temperature, voltage) is outside its warning bounds",
    );
    for k in keys {
        let l = key_labels(k);
        let g = &k.gate;
        let gc = &g.counters;
        add(&host_blocks, &l, gc.blocks_tested);
        add(&host_failed, &l, gc.blocks_failed);
        for (name, v) in [
            ("monobit", gc.monobit_failures),
            ("poker", gc.poker_failures),
            ("runs", gc.runs_failures),
            ("long_run", gc.long_run_failures),
            ("continuous", gc.continuous_failures),
            ("repetition_count", gc.rct_failures),
            ("adaptive_proportion", gc.apt_failures),
        ] {
            add(&host_fail, &with(l.clone(), "test", name), v);
        }
        set(&gate_open, &l, i64::from(g.open));
        set(&gate_warn, &l, i64::from(g.warnings.any()));
        add(&gate_closures, &l, gc.times_closed);
    }
}

/// Each key's session counters: bad MACs, framing errors, replays,
/// re-keys and resets.
fn key_session_metrics(m: &mut Metrics<'_>, keys: &[KeyStatus]) {
    let macs = m.counter("key_mac_failures", "Frames whose MAC failed (dropped)");
    let framing = m.counter(
        "key_framing_errors",
        "Runs of bytes skipped between frames (line noise, lost sync)",
    );
    let replays = m.counter("key_replays_dropped", "Replayed frames dropped");
    let rekeys = m.counter("key_rekeys", "Session re-keys");
    let resets = m.counter("key_resets", "Resets sent to the key");
    for k in keys {
        let l = key_labels(k);
        let c = k.totals();
        add(&macs, &l, c.bad_macs);
        add(&framing, &l, c.framing_errors);
        add(&replays, &l, c.replays);
        add(&rekeys, &l, c.rekeys);
        add(&resets, &l, c.resets);
    }
}

/// Where each key's verified bytes went: by fate, in the gate, by
/// output, queued, and what the kernel and EGD clients took of them.
fn key_output_metrics(m: &mut Metrics<'_>, s: &Snapshot) {
    let received = m.counter(
        "key_bytes_received",
        "Verified, decrypted bytes the key delivered",
    );
    let fate = m.counter(
        "key_bytes",
        "Verified bytes by fate: released (passed the gate), discarded (failed or gate closed)",
    );
    let pending = m.gauge(
        "key_bytes_pending",
        "Verified bytes in the gate: waiting for their block to be tested, or passed and not yet handed on",
    );
    let per_output = m.counter(
        "key_output_bytes",
        "Released bytes of the key by the output they were handed to (unused: none asked; withdrawn: the key's gate closed first)",
    );
    let queued = m.gauge(
        "key_output_queued_bytes",
        "Released bytes of the key on their way to an output",
    );
    let kernel_accepted = m.counter(
        "key_kernel_bytes",
        "Bytes of the key the kernel accepted (RNDADDENTROPY)",
    );
    let kernel_bits = m.counter(
        "key_kernel_bits_credited",
        "Entropy bits credited to the kernel for the key's bytes",
    );
    let kernel_credit = m.gauge(
        "key_kernel_credit_bits_per_byte",
        "With --kernel=auto: the bits per byte the key's latest bytes were credited with (7/8 of its min-entropy estimate)",
    );
    let egd_served = m.counter(
        "key_egd_served_bytes",
        "Bytes of the key that EGD clients received (of those handed to the EGD pool)",
    );
    for k in &s.keys {
        let l = key_labels(k);
        let gc = &k.gate.counters;
        add(&received, &l, gc.bytes_received);
        add(
            &fate,
            &with(l.clone(), "fate", "released"),
            gc.bytes_released,
        );
        add(
            &fate,
            &with(l.clone(), "fate", "discarded"),
            gc.bytes_discarded,
        );
        set(&pending, &l, (gc.bytes_pending + gc.bytes_buffered) as i64);
        for (name, v) in [
            ("kernel", k.outputs.kernel),
            ("egd", k.outputs.egd),
            ("file", k.outputs.file),
            ("unused", k.outputs.unused),
            ("withdrawn", k.outputs.withdrawn),
        ] {
            add(&per_output, &with(l.clone(), "output", name), v);
        }
        set(&queued, &l, k.outputs.queued(gc.bytes_released) as i64);
        if let Some(kst) = &s.kernel {
            let accepted = k.booked_in(&kst.bytes_by_key);
            add(&kernel_accepted, &l, accepted);
            add(&kernel_bits, &l, k.booked_in(&kst.bits_by_key));
            if let Some(b) = k.serial.and_then(|serial| kst.credit_by_key.get(&serial)) {
                set(&kernel_credit, &l, i64::from(*b));
            }
        }
        if let Some(e) = &s.egd {
            let served = k.booked_in(&e.served_by_key);
            add(&egd_served, &l, served);
        }
    }
}

/// The kernel output's counters, and its share of `out_bytes`.
fn kernel_metrics(m: &mut Metrics<'_>, k: &KernelStats, out_bytes: &Family<Labels, Counter>) {
    let bits = m.counter(
        "kernel_bits_credited",
        "Entropy bits credited to the kernel",
    );
    let uncredited = m.counter(
        "kernel_bytes_uncredited",
        "Bytes mixed into the kernel's pool without credit",
    );
    let failures = m.counter("kernel_ioctl_failures", "RNDADDENTROPY calls that failed");
    let reseeds = m.counter(
        "kernel_reseeds",
        "CRNG reseeds asked for after mixing writes (RNDRESEEDCRNG), by outcome",
    );
    add(
        out_bytes,
        &vec![("output".into(), "kernel".into())],
        k.bytes_written,
    );
    add(&bits, &Vec::new(), k.bits_credited);
    add(&uncredited, &Vec::new(), k.bytes_uncredited);
    add(&failures, &Vec::new(), k.ioctl_failures);
    add_each(
        &reseeds,
        "outcome",
        &[("done", k.reseeds), ("failed", k.reseed_failures)],
    );
    let generations = m.counter(
        "kernel_new_vm_generations",
        "New VM generation IDs seen (a restored snapshot or a clone), each answered with fresh bytes and a reseed",
    );
    add(&generations, &Vec::new(), k.new_generations);
}

/// The EGD server's counters and pool, and its share of `out_bytes`.
fn egd_metrics(m: &mut Metrics<'_>, e: &EgdStats, out_bytes: &Family<Labels, Counter>) {
    let clients = m.gauge("egd_clients", "EGD clients connected now");
    let total = m.counter("egd_connections", "EGD clients accepted");
    let rejected = m.counter("egd_rejected_clients", "EGD clients refused (too many)");
    add(
        out_bytes,
        &vec![("output".into(), "egd".into())],
        e.total_served,
    );
    set(&clients, &Vec::new(), e.clients.len() as i64);
    add(&total, &Vec::new(), e.total_clients);
    add(&rejected, &Vec::new(), e.rejected_clients);
    let refused = m.counter(
        "egd_refused_connections",
        "EGD connections closed at once, by reason (not_allowed: allow-lists; peer_cap: --egd-max-per-peer; full: no slot, none reclaimable)",
    );
    add_each(
        &refused,
        "reason",
        &[
            ("not_allowed", e.refused_not_allowed),
            ("peer_cap", e.refused_peer_cap),
            ("full", e.rejected_clients),
        ],
    );
    let reclaimed = m.counter(
        "egd_reclaimed_slots",
        "Idle EGD connections closed to make room for another peer",
    );
    add(&reclaimed, &Vec::new(), e.reclaimed_slots);
    if e.tls {
        let failed = m.counter(
            "egd_tls_failed_handshakes",
            "TLS connections closed before any entropy byte because their handshake failed (error: no or bad certificate, not TLS, ...; timeout)",
        );
        add_each(
            &failed,
            "reason",
            &[
                ("error", e.tls_handshake_failures),
                ("timeout", e.tls_handshake_timeouts),
            ],
        );
    }
    let pool = m.gauge("egd_pool_bytes", "Bytes in the EGD pool now");
    let reserved = m.gauge(
        "egd_reserved_bytes",
        "Bytes of the EGD pool held as clients' credit",
    );
    set(&pool, &Vec::new(), e.pool_bytes as i64);
    set(&reserved, &Vec::new(), e.reserved_bytes as i64);
    egd_client_metrics(m, e);
}

/// Each EGD client's bytes served, requests pending and wait quantiles.
fn egd_client_metrics(m: &mut Metrics<'_>, e: &EgdStats) {
    let served = m.counter("egd_client_served_bytes", "Bytes served to each EGD client");
    let pending = m.gauge(
        "egd_client_requests_pending",
        "Requests each EGD client has waiting",
    );
    let wait = m.fgauge(
        "egd_client_wait_seconds",
        "How long each EGD client's requests waited, read to answered (quantile 0.5 or 0.99, within 19 %)",
    );
    for c in &e.clients {
        // A TLS client's name is its certificate's subject.
        let name = c.subject.clone().unwrap_or_else(|| c.peer.clone());
        let l: Labels = vec![
            ("client".into(), c.id.to_string()),
            ("peer".into(), c.peer.clone()),
            ("name".into(), name),
        ];
        add(&served, &l, c.bytes_served);
        set(&pending, &l, c.requests_pending as i64);
        for (q, name) in [(0.5, "0.5"), (0.99, "0.99")] {
            if let Some(d) = c.waits.quantile(q) {
                fset(&wait, &with(l.clone(), "quantile", name), d.as_secs_f64());
            }
        }
    }
}

/// The Prometheus text for `s`.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = prometheus_text::encode(&mut out, &registry(s));
    out
}

/// Serves `GET /metrics` on `listener` until the task is dropped;
/// `snapshot` is asked once per scrape.
pub async fn serve<F>(listener: TcpListener, snapshot: F)
where
    F: Fn() -> Snapshot + Clone + Send + Sync + 'static,
{
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let snapshot = snapshot.clone();
                async move { Ok::<_, Infallible>(answer(&req, &snapshot)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            // A scraper that hangs is dropped after a while.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(30), conn).await;
        });
    }
}

fn answer<B>(req: &Request<B>, snapshot: &impl Fn() -> Snapshot) -> Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            render(&snapshot()),
        ),
        (&hyper::Method::GET, "/") => (
            StatusCode::OK,
            "text/plain; charset=utf-8",
            "ekey-host: metrics at /metrics\n".to_string(),
        ),
        (&hyper::Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found; try /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}
