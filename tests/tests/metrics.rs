//! `run --metrics`: a Prometheus scrape while a software key runs. The
//! counters move between scrapes and add up; the alert rules in `contrib/`
//! name only metrics the daemon serves.

mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;

use support::{DEMO_KEYRING, Daemon, Emulator, Scratch, get, samples, wait_for};

fn port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The value of the one series of `name` whose labels include all of
/// `labels`.
fn value(s: &BTreeMap<String, f64>, name: &str, labels: &[&str]) -> f64 {
    let hits: Vec<f64> = s
        .iter()
        .filter(|(k, _)| k.split('{').next() == Some(name) && labels.iter().all(|l| k.contains(l)))
        .map(|(_, v)| *v)
        .collect();
    assert_eq!(hits.len(), 1, "{name} {labels:?}: {hits:?}");
    hits[0]
}

#[test]
fn metrics_move_and_add_up() {
    let dir = Scratch::new("metrics");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "20000",
    ]);
    let addr = format!("127.0.0.1:{}", port());
    let egd = format!("127.0.0.1:{}", port());
    let out = dir.path("out.bin");
    let daemon = Daemon::for_key(
        &dir,
        &emu.path,
        &ring,
        &[
            "--metrics",
            &addr,
            "--egd-tcp",
            &egd,
            "--output",
            out.to_str().unwrap(),
        ],
    );
    assert!(wait_for(15, || daemon.status()["keys"][0]["running"] == true));
    // One EGD client takes some bytes.
    let mut client = TcpStream::connect(&egd).unwrap();
    client.write_all(&[2, 64, 2, 64]).unwrap();
    let mut got = [0u8; 128];
    client.read_exact(&mut got).unwrap();

    let (status, ctype, first) = get(&addr, "/metrics");
    assert!(status.contains("200"), "{status}");
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let a = samples(&first);
    assert!(wait_for(10, || {
        let b = samples(&get(&addr, "/metrics").2);
        value(&b, "ekey_key_bytes_received_total", &[])
            > value(&a, "ekey_key_bytes_received_total", &[])
    }));
    // Stop the key so that nothing moves, then read one consistent scrape.
    emu.stop();
    std::thread::sleep(std::time::Duration::from_millis(600));
    let s = samples(&get(&addr, "/metrics").2);
    let serial = "serial=\"RW11bGF0ZWRLZXkx\"";
    assert_eq!(value(&s, "ekey_key_up", &[serial]), 0.0);
    assert_eq!(value(&s, "ekey_key_gate_open", &[serial]), 1.0);
    assert!(value(&s, "ekey_key_temperature_celsius", &[serial]) > 40.0);
    assert!(value(&s, "ekey_key_rekeys_total", &[serial]) >= 1.0);
    let received = value(&s, "ekey_key_bytes_received_total", &[serial]);
    let released = value(&s, "ekey_key_bytes_total", &[serial, "fate=\"released\""]);
    let discarded = value(&s, "ekey_key_bytes_total", &[serial, "fate=\"discarded\""]);
    let pending = value(&s, "ekey_key_bytes_pending", &[serial]);
    assert!(received > 0.0);
    assert_eq!(received, released + discarded + pending);
    let per_output: f64 = ["kernel", "egd", "file", "unused", "withdrawn"]
        .iter()
        .map(|o| {
            value(
                &s,
                "ekey_key_output_bytes_total",
                &[serial, &format!("output=\"{o}\"")],
            )
        })
        .sum();
    let queued = value(&s, "ekey_key_output_queued_bytes", &[serial]);
    assert_eq!(per_output + queued, released);
    // The outputs' own counters agree with what the key handed them.
    let file = value(&s, "ekey_output_bytes_total", &["output=\"file\""]);
    assert_eq!(file, std::fs::metadata(&out).unwrap().len() as f64);
    assert_eq!(
        file,
        value(
            &s,
            "ekey_key_output_bytes_total",
            &[serial, "output=\"file\""]
        )
    );
    let served = value(&s, "ekey_output_bytes_total", &["output=\"egd\""]);
    assert!(served >= 128.0);
    assert!(
        served
            <= value(
                &s,
                "ekey_key_output_bytes_total",
                &[serial, "output=\"egd\""]
            )
    );
    assert_eq!(value(&s, "ekey_egd_clients", &[]), 1.0);
    // The one client's own books: all it was served, nothing pending, its
    // waits measured; nobody refused.
    assert_eq!(
        value(
            &s,
            "ekey_egd_client_served_bytes_total",
            &["peer=\"tcp 127.0.0.1:"]
        ),
        served
    );
    assert_eq!(value(&s, "ekey_egd_client_requests_pending", &[]), 0.0);
    let p50 = value(&s, "ekey_egd_client_wait_seconds", &["quantile=\"0.5\""]);
    let p99 = value(&s, "ekey_egd_client_wait_seconds", &["quantile=\"0.99\""]);
    assert!(0.0 < p50 && p50 <= p99 && p99 < 10.0, "{p50} {p99}");
    for reason in ["not_allowed", "peer_cap", "full"] {
        let label = format!("reason=\"{reason}\"");
        assert_eq!(
            value(&s, "ekey_egd_refused_connections_total", &[&label]),
            0.0
        );
    }
    assert_eq!(value(&s, "ekey_egd_reclaimed_slots_total", &[]), 0.0);
    // One key: everything served came from it.
    assert_eq!(
        value(&s, "ekey_key_egd_served_bytes_total", &[serial]),
        served
    );

    // Other paths.
    assert!(get(&addr, "/nothing").0.contains("404"));

    // Every metric the alert rules use is served.
    let rules = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/ekey-alerts.yml"),
    )
    .unwrap();
    let names: std::collections::BTreeSet<String> = s
        .keys()
        .map(|k| k.split('{').next().unwrap().to_owned())
        .collect();
    let mut used = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("ekey_") && !word.ends_with('_') {
            used += 1;
            assert!(names.contains(word), "alert rules use {word}, not served");
        }
    }
    assert!(used >= 4);
    drop(client);
    assert!(daemon.terminate());
}
