//! What `ekey-host status` shows: every key's state, health and counters,
//! as JSON and as a screenful of text.

use std::fmt::Write as _;
use std::time::Instant;

use serde_json::{Value, json};

use crate::keys::driver::KeyStatus;
use ekey_proto::health::GateStatus;

fn opt_f32(v: Option<f32>) -> Value {
    v.map_or(Value::Null, |x| {
        json!((f64::from(x) * 1000.0).round() / 1000.0)
    })
}

/// One key as JSON.
pub fn key_json(st: &KeyStatus, now: Instant) -> Value {
    let c = st.totals();
    let info = &st.info;
    let uptime = st
        .connected_since
        .filter(|_| st.connected)
        .map_or(0.0, |t| now.duration_since(t).as_secs_f64());
    let since_start = now.duration_since(st.since).as_secs_f64().max(0.001);
    json!({
        "transport": st.transport,
        "serial": st.serial.map(|s| s.to_string()),
        "state": st.state.to_string(),
        "reason": st.reason.to_string(),
        "running": st.state.is_running() && st.connected,
        "connected": st.connected,
        "connects": st.connects,
        "uptime_seconds": (uptime * 10.0).round() / 10.0,
        "temperature_celsius": info.temperature.map(|t| (f64::from(t.celsius()) * 100.0).round() / 100.0),
        "voltage_volts": info.voltage.map(|v| f64::from(v.millivolts) / 1000.0),
        "fips": info.fips.map(|f| json!({
            "blocks": f.blocks, "failures": f.failures,
            "monobit": f.monobit, "poker": f.poker, "runs": f.runs,
        })),
        "shannons_per_byte": info.shannon.map(|s| json!({
            "raw_left": opt_f32(s.left_per_byte()),
            "raw_right": opt_f32(s.right_per_byte()),
            "raw_xor": opt_f32(s.xor_per_byte()),
            "debiased_left": opt_f32(s.debiased_left_per_byte()),
            "debiased_right": opt_f32(s.debiased_right_per_byte()),
            "failure_mode": s.failure.to_string(),
        })),
        "min_entropy_bits_per_byte": st.min_entropy.map(|e| {
            let mut m = serde_json::Map::new();
            m.insert("min".into(), json!(round3(e.min())));
            for (name, v) in e.iter() {
                m.insert(name.into(), json!(round3(v)));
            }
            m.insert("tuple_capped".into(), json!(e.tuple_capped));
            m.insert(
                "window_bytes".into(),
                json!(st.window.lock().unwrap_or_else(|p| p.into_inner()).size()),
            );
            Value::Object(m)
        }),
        "bytes_delivered": st.delivered,
        "entropy_rate_bytes_per_second": (st.delivered as f64 / since_start).round() as u64,
        "mac_failures": c.bad_macs,
        "framing_errors": c.framing_errors,
        "replays_dropped": c.replays,
        "rekeys": c.rekeys,
        "resets": c.resets,
        "long_term_key_rejections": c.long_term_key_rejections,
        "warnings": c.warnings,
        "frames": c.frames,
        "entropy_blocks": c.blocks,
        "health_gate": gate_json(&st.gate),
        "accounting": accounting_json(st),
    })
}

/// `v` to three decimals.
fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The health gate's state and counters.
pub fn gate_json(g: &GateStatus) -> Value {
    let c = &g.counters;
    json!({
        "open": g.open,
        "reason": g.reason.map(|r| r.to_string()),
        "condition_active": g.condition_active,
        "clean_blocks": g.clean_blocks,
        "failures_in_window": g.failures_in_window,
        "warnings": g.warnings.any().then(|| g.warnings.to_string()),
        "blocks_tested": c.blocks_tested,
        "blocks_failed": c.blocks_failed,
        "failures": {
            "monobit": c.monobit_failures,
            "poker": c.poker_failures,
            "runs": c.runs_failures,
            "long_run": c.long_run_failures,
            "continuous": c.continuous_failures,
            "repetition_count": c.rct_failures,
            "adaptive_proportion": c.apt_failures,
        },
        "times_closed": c.times_closed,
    })
}

/// Where a key's verified bytes went. `received` = `discarded` +
/// `in_gate` + `to_kernel` + `to_egd` + `to_file` + `unused` (no output
/// asked for, or past `read`'s limit) + `withdrawn` (released, then dropped
/// before an output took it, because the key's gate closed) + `queued`
/// (released, not yet taken by an output). The kernel and EGD outputs
/// also drop what they still hold of a key whose gate closes:
/// `kernel_withdrawn` and `egd_withdrawn`, of `to_kernel` and `to_egd`. `to_kernel` bytes are credited (or mixed in without
/// credit with `--kernel=0`) as the kernel output writes them; `to_egd`
/// bytes go to the EGD server's pool (at most 16 KiB), from which clients
/// are served. The control socket adds, from the outputs' own books,
/// `kernel_accepted` and `kernel_bits_credited` (what the kernel took of the
/// key's bytes, and the credit), with `--kernel=auto`
/// `kernel_credit_bits_per_byte` (the credit its latest bytes got), and
/// `egd_served` (how many of the key's bytes EGD clients received).
pub fn accounting_json(st: &KeyStatus) -> Value {
    let c = &st.gate.counters;
    let o = &st.outputs;
    json!({
        "received": c.bytes_received,
        "discarded": c.bytes_discarded,
        "in_gate": c.bytes_pending + c.bytes_buffered,
        "released": c.bytes_released,
        "to_kernel": o.kernel,
        "to_egd": o.egd,
        "to_file": o.file,
        "unused": o.unused,
        "withdrawn": o.withdrawn,
        "queued": o.queued(c.bytes_released),
    })
}

/// `{before}N withdrawn{after}` when an output dropped some of a key's
/// bytes because its gate closed; nothing otherwise.
fn withdrawn_note(v: &Value, before: &str, after: &str) -> String {
    match v.as_u64().unwrap_or(0) {
        0 => String::new(),
        n => format!("{before}{} withdrawn{after}", human_bytes(n)),
    }
}

/// The whole status document.
pub fn status_json(keys: &[KeyStatus], now: Instant, started: Instant) -> Value {
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": now.duration_since(started).as_secs(),
        "keys": keys.iter().map(|k| key_json(k, now)).collect::<Vec<_>>(),
    })
}

fn num(v: &Value, unit: &str, digits: usize) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.digits$}{unit}"),
        None => "-".into(),
    }
}

fn human_bytes(n: u64) -> String {
    let n = n as f64;
    if n >= 1e9 {
        format!("{:.2} GB", n / 1e9)
    } else if n >= 1e6 {
        format!("{:.2} MB", n / 1e6)
    } else if n >= 1e3 {
        format!("{:.1} kB", n / 1e3)
    } else {
        format!("{n} B")
    }
}

fn duration(secs: f64) -> String {
    let s = secs as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        _ => format!("{}h {:02}m", s / 3600, (s % 3600) / 60),
    }
}

/// The status document as text for a person.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let keys = doc["keys"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "ekey-host {}, up {}, {} key{}",
        doc["version"].as_str().unwrap_or("?"),
        duration(doc["uptime_seconds"].as_f64().unwrap_or(0.0)),
        keys.len(),
        if keys.len() == 1 { "" } else { "s" }
    );
    for k in &keys {
        render_key(&mut out, k);
    }
    if let Some(k) = doc["kernel"].as_object() {
        let _ = writeln!(
            out,
            "\nkernel: {}; credit {}; {} written, {} bits credited, {} mixed in without credit, {} ioctl failures; {} reseeds ({} failed)",
            k["mode"].as_str().unwrap_or("?"),
            match k["credit"].as_str() {
                Some("auto") => "auto (7/8 of each key's min-entropy estimate)".to_string(),
                Some(b) => format!("{b} bits per byte"),
                None => "?".to_string(),
            },
            human_bytes(k["bytes_written"].as_u64().unwrap_or(0)),
            k["bits_credited"],
            human_bytes(k["bytes_uncredited"].as_u64().unwrap_or(0)),
            k["ioctl_failures"],
            k["reseeds"],
            k["reseed_failures"],
        );
    }
    if let Some(e) = doc["egd"].as_object() {
        render_egd(&mut out, e);
    }
    if let Some(v) = doc["vhost_user"].as_object() {
        render_vhost_user(&mut out, v);
    }
    out
}

fn render_vhost_user(out: &mut String, v: &serde_json::Map<String, Value>) {
    let guests = v["guests"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nvhost-user-rng: {} of {} guest{} connected, {} served, {} buffers held",
        v["connected"],
        guests.len(),
        if guests.len() == 1 { "" } else { "s" },
        human_bytes(v["bytes_served"].as_u64().unwrap_or(0)),
        v["requests_pending"],
    );
    let wait = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"))
    };
    for g in &guests {
        let _ = writeln!(
            out,
            "  {} ({}, {})  {}, {} connections, {} served in {} buffers, {} held, wait p50 {} p99 {}, {} rejected{}",
            g["name"].as_str().unwrap_or("?"),
            g["socket"].as_str().unwrap_or("?"),
            g["role"].as_str().unwrap_or("?"),
            if g["connected"].as_bool() == Some(true) {
                "connected"
            } else {
                "not connected"
            },
            g["connections"],
            human_bytes(g["bytes_served"].as_u64().unwrap_or(0)),
            g["requests_served"],
            g["requests_pending"],
            wait(&g["wait_p50_ms"]),
            wait(&g["wait_p99_ms"]),
            g["rejected"]["total"],
            g["last_error"]
                .as_str()
                .map_or_else(String::new, |e| format!("; last error: {e}")),
        );
    }
}

/// One key's section: its link and state, what it says of itself, its
/// gate, where its bytes went, and its counters.
fn render_key(out: &mut String, k: &Value) {
    let serial = k["serial"].as_str().unwrap_or("(not identified yet)");
    let _ = writeln!(
        out,
        "\nkey {serial}  via {}",
        k["transport"].as_str().unwrap_or("?")
    );
    let state = if k["connected"].as_bool() == Some(true) {
        format!(
            "{} ({})",
            k["state"].as_str().unwrap_or("?"),
            k["reason"].as_str().unwrap_or("?")
        )
    } else {
        "disconnected".into()
    };
    let _ = writeln!(out, "  state        {state}");
    let _ = writeln!(
        out,
        "  health       {}, {}",
        num(&k["temperature_celsius"], " °C", 1),
        num(&k["voltage_volts"], " V", 2)
    );
    if let Some(f) = k["fips"].as_object() {
        let _ = writeln!(
            out,
            "  FIPS 140-2   {} blocks, {} failures (monobit {}, poker {}, runs {})",
            f["blocks"], f["failures"], f["monobit"], f["poker"], f["runs"]
        );
    }
    if let Some(s) = k["shannons_per_byte"].as_object() {
        let _ = writeln!(
            out,
            "  Sh/byte      raw L {} R {} XOR {}, debiased L {} R {}",
            num(&s["raw_left"], "", 2),
            num(&s["raw_right"], "", 2),
            num(&s["raw_xor"], "", 2),
            num(&s["debiased_left"], "", 2),
            num(&s["debiased_right"], "", 2)
        );
    }
    if let Some(m) = k["min_entropy_bits_per_byte"].as_object() {
        let _ = writeln!(
            out,
            "  min-entropy  {} bits/byte (SP 800-90B over {} bytes: MCV {}, collision {}, Markov {}, compression {}, t-tuple {}, LRS {})",
            num(&m["min"], "", 3),
            m["window_bytes"],
            num(&m["most_common_value"], "", 2),
            num(&m["collision"], "", 2),
            num(&m["markov"], "", 2),
            num(&m["compression"], "", 2),
            num(&m["t_tuple"], "", 2),
            num(&m["lrs"], "", 2)
        );
    }
    if let Some(b) = k["accounting"]["kernel_credit_bits_per_byte"].as_u64() {
        let _ = writeln!(
            out,
            "  kernel       credited {b} bits/byte now (--kernel=auto: 7/8 of the min-entropy estimate)"
        );
    }
    render_gate(out, &k["health_gate"]);
    render_accounting(out, &k["accounting"]);
    let _ = writeln!(
        out,
        "  entropy      {} delivered, {} B/s",
        human_bytes(k["bytes_delivered"].as_u64().unwrap_or(0)),
        k["entropy_rate_bytes_per_second"]
    );
    let _ = writeln!(
        out,
        "  errors       {} bad MACs, {} framing, {} replays dropped",
        k["mac_failures"], k["framing_errors"], k["replays_dropped"]
    );
    let _ = writeln!(
        out,
        "  sessions     {} re-keys, {} resets, {} connects, up {}",
        k["rekeys"],
        k["resets"],
        k["connects"],
        duration(k["uptime_seconds"].as_f64().unwrap_or(0.0))
    );
}

/// A key's `gate` line: open or why closed, its counters, any warning.
fn render_gate(out: &mut String, g: &Value) {
    let gate = if g["open"].as_bool() == Some(false) {
        format!("CLOSED: {}", g["reason"].as_str().unwrap_or("?"))
    } else {
        "open".into()
    };
    let _ = writeln!(
        out,
        "  gate         {gate}; {} blocks tested, {} failed, closed {} times{}",
        g["blocks_tested"],
        g["blocks_failed"],
        g["times_closed"],
        g["warnings"]
            .as_str()
            .map_or_else(String::new, |w| format!("; WARNING: {w}"))
    );
}

/// A key's `bytes` line: where its verified bytes went.
fn render_accounting(out: &mut String, a: &Value) {
    let _ = writeln!(
        out,
        "  bytes        {} received = {} discarded + {} in the gate + {} to the kernel{} + {} to the EGD pool ({} served{}) + {} to the file + {} unused + {}{} queued",
        human_bytes(a["received"].as_u64().unwrap_or(0)),
        human_bytes(a["discarded"].as_u64().unwrap_or(0)),
        human_bytes(a["in_gate"].as_u64().unwrap_or(0)),
        human_bytes(a["to_kernel"].as_u64().unwrap_or(0)),
        withdrawn_note(&a["kernel_withdrawn"], " (", ")"),
        human_bytes(a["to_egd"].as_u64().unwrap_or(0)),
        human_bytes(a["egd_served"].as_u64().unwrap_or(0)),
        withdrawn_note(&a["egd_withdrawn"], ", ", ""),
        human_bytes(a["to_file"].as_u64().unwrap_or(0)),
        human_bytes(a["unused"].as_u64().unwrap_or(0)),
        match a["withdrawn"].as_u64().unwrap_or(0) {
            0 => String::new(),
            n => format!("{} withdrawn + ", human_bytes(n)),
        },
        human_bytes(a["queued"].as_u64().unwrap_or(0)),
    );
}

/// The EGD server's section: its totals, refusals and one line per client.
fn render_egd(out: &mut String, e: &serde_json::Map<String, Value>) {
    let clients = e["clients"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nEGD server: {} client{} now, {} served, {} clients in all, {} in the pool ({} held as credit)",
        clients.len(),
        if clients.len() == 1 { "" } else { "s" },
        human_bytes(e["total_served"].as_u64().unwrap_or(0)),
        e["total_clients"],
        human_bytes(e["pool_bytes"].as_u64().unwrap_or(0)),
        human_bytes(e["reserved_bytes"].as_u64().unwrap_or(0)),
    );
    let _ = writeln!(
        out,
        "  refused: {} not allowed, {} at their peer's cap, {} with every slot taken; {} idle slots reclaimed; {} closed for protocol errors",
        e["refused_not_allowed"],
        e["refused_peer_cap"],
        e["rejected_clients"],
        e["reclaimed_slots"],
        e["closed_for_protocol_errors"]
    );
    if e.get("tls").and_then(Value::as_bool) == Some(true) {
        let _ = writeln!(
            out,
            "  TLS: {} failed handshakes, {} timed out{}",
            e["tls_handshake_failures"],
            e["tls_handshake_timeouts"],
            e["tls_last_failure"]
                .as_str()
                .map_or_else(String::new, |w| format!("; last: {w}")),
        );
    }
    let wait = |v: &Value| {
        v.as_f64()
            .map_or_else(|| "-".to_string(), |ms| format!("{ms:.1} ms"))
    };
    for c in &clients {
        let _ = writeln!(
            out,
            "  #{} {}  share {}, {} served, {} pending, wait p50 {} p99 {}, connected {}, idle {}",
            c["id"],
            c["peer"].as_str().unwrap_or("?"),
            c["share"],
            human_bytes(c["bytes_served"].as_u64().unwrap_or(0)),
            c["requests_pending"],
            wait(&c["wait_p50_ms"]),
            wait(&c["wait_p99_ms"]),
            duration(c["connected_seconds"].as_f64().unwrap_or(0.0)),
            duration(c["idle_seconds"].as_f64().unwrap_or(0.0)),
        );
    }
}
