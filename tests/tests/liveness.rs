//! A driver whose outputs are all full still reads its key: an unplugged
//! key, and a key that reports a failure mode, are seen at once.
//!
//! "Every output full": the daemon's only output is an EGD socket with no
//! client, so its pool fills and then takes nothing. The key keeps
//! sending; the daemon shows it is still reading by booking the bytes no
//! output can take as `unused`.

mod support;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use support::*;

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// A key on a Unix socket at 20 kB/s and a daemon on it whose only output
/// is an EGD socket nobody reads; returns once every output is full (the
/// driver books bytes as unused).
fn full_outputs(dir: &Scratch, emulate: &[&str]) -> (Emulator, Daemon) {
    let ring = dir.write("keyring", DEMO_KEYRING);
    let sock = dir.path("key.sock");
    let mut args = vec!["--unix", sock.to_str().unwrap(), "--rate", "20000"];
    args.extend_from_slice(emulate);
    let emu = Emulator::start(&args);
    let egd = dir.path("egd.sock");
    let daemon = Daemon::for_key(
        dir,
        &emu.path,
        &ring,
        &["--egd-unix", egd.to_str().unwrap()],
    );
    assert!(
        wait_for(30, || n(
            &daemon.status()["keys"][0]["accounting"]["unused"]
        ) > 0),
        "the outputs never filled: {}",
        daemon.status()
    );
    let s = daemon.status();
    let key = &s["keys"][0];
    assert_eq!(key["connected"], true, "{key}");
    assert_eq!(key["health_gate"]["open"], true, "{key}");
    assert!(n(&s["egd"]["pool_bytes"]) > 0, "{s}");
    (emu, daemon)
}

/// One EGD request on the daemon's socket, `0x01 255` (read without
/// blocking): the bytes served.
fn egd_probe(dir: &Scratch) -> Vec<u8> {
    let mut s = UnixStream::connect(dir.path("egd.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(&[0x01, 255]).unwrap();
    let mut len = [0u8; 1];
    s.read_exact(&mut len).unwrap();
    let mut got = vec![0u8; usize::from(len[0])];
    s.read_exact(&mut got).unwrap();
    got
}

#[test]
fn an_unplugged_key_is_seen_within_3_s_while_every_output_is_full() {
    let dir = Scratch::new("live-unplug");
    let (emu, daemon) = full_outputs(&dir, &[]);
    // Still full a second later (the pool did not move), and still read.
    let before = n(&daemon.status()["keys"][0]["accounting"]["unused"]);
    std::thread::sleep(Duration::from_secs(1));
    let s = daemon.status();
    assert!(
        n(&s["keys"][0]["accounting"]["unused"]) > before,
        "the driver stopped reading: {s}"
    );

    // Unplug: the key's socket goes away.
    let path = emu.path.clone();
    emu.stop();
    let _ = std::fs::remove_file(&path);
    let t0 = Instant::now();
    assert!(
        wait_for(3, || daemon.status()["keys"][0]["connected"] == false),
        "still connected {:?} after the unplug: {}",
        t0.elapsed(),
        daemon.status()
    );
    assert!(daemon.terminate());
}

#[test]
fn a_failure_report_closes_the_gate_within_5_s_while_every_output_is_full() {
    let dir = Scratch::new("live-failure");
    let (emu, daemon) = full_outputs(&dir, &["--fault-failure-mode", "3", "--fault-on-usr1"]);
    let pooled = n(&daemon.status()["egd"]["pool_bytes"]);

    // The key starts reporting failure mode 3 now.
    emu.signal("USR1");
    let t0 = Instant::now();
    assert!(
        wait_for(5, || daemon.status()["keys"][0]["health_gate"]["open"]
            == false),
        "the gate is still open {:?} after the report: {}",
        t0.elapsed(),
        daemon.status()
    );
    let s = daemon.status();
    let key = &s["keys"][0];
    assert!(
        key["health_gate"]["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("key reports"),
        "{key}"
    );

    // Nothing released before the report is served after it: the pool's
    // bytes were withdrawn, and nothing new passes the closed gate.
    for _ in 0..2 {
        let got = egd_probe(&dir);
        assert!(
            got.is_empty(),
            "{} bytes served after the failure report",
            got.len()
        );
        assert_eq!(n(&daemon.status()["egd"]["pool_bytes"]), 0);
        std::thread::sleep(Duration::from_secs(1));
    }
    let s = daemon.status();
    let a = &s["keys"][0]["accounting"];
    assert_eq!(s["keys"][0]["health_gate"]["open"], false, "{s}");
    assert_eq!(n(&s["egd"]["total_served"]), 0, "{s}");
    // All the pool got was withdrawn, and every released byte is booked.
    assert!(
        n(&a["egd_withdrawn"]) >= pooled,
        "the pool was not withdrawn: {a}"
    );
    assert_eq!(n(&a["egd_withdrawn"]), n(&a["to_egd"]), "{a}");
    assert_eq!(
        n(&a["released"]),
        n(&a["to_egd"]) + n(&a["unused"]) + n(&a["withdrawn"]) + n(&a["queued"]),
        "{a}"
    );
    assert!(daemon.terminate());
}
