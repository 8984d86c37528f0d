//! The health gate in the daemon: software keys whose frames are authentic
//! but whose noise is bad (stuck, biased, repeated), or that report a
//! failure mode or an out-of-range temperature. Their output must never
//! reach an output, and status must say why. `ekey-host test` reports.

mod support;

use std::process::Command;

use support::{DEMO_KEYRING, Daemon, Emulator, Scratch, ekey_host, wait_for};

/// Starts a fast software key with `extra` flags and a daemon writing to
/// `out.bin`; returns both once the daemon has keyed it.
fn start(dir: &Scratch, extra: &[&str]) -> (Emulator, Daemon) {
    let ring = dir.write("keyring", DEMO_KEYRING);
    let sock = dir.path("key.sock");
    let mut args = vec!["--unix", sock.to_str().unwrap(), "--rate", "40000"];
    args.extend_from_slice(extra);
    let emu = Emulator::start(&args);
    let out = dir.path("out.bin");
    let daemon = Daemon::for_key(dir, &emu.path, &ring, &["--output", out.to_str().unwrap()]);
    (emu, daemon)
}

fn gate(daemon: &Daemon) -> serde_json::Value {
    daemon.status()["keys"][0]["health_gate"].clone()
}

/// The key's bytes are all refused: the gate closes (for `reason`) within
/// `blocks` tested blocks, nothing reaches the output, and the accounting
/// adds up.
fn assert_caught(extra: &[&str], name: &str, reason: &str, blocks: u64) {
    let dir = Scratch::new(name);
    let (_emu, daemon) = start(&dir, extra);
    assert!(
        wait_for(20, || gate(&daemon)["open"] == false),
        "{name}: gate still open: {}",
        daemon.status()
    );
    // Let more bad output arrive: it is discarded too.
    assert!(wait_for(20, || {
        gate(&daemon)["blocks_tested"].as_u64().unwrap_or(0) >= 3
            || daemon.status()["keys"][0]["state"]
                .as_str()
                .is_some_and(|s| s.contains("failure"))
    }));
    let s = daemon.status();
    let key = &s["keys"][0];
    let g = &key["health_gate"];
    let why = g["reason"].as_str().unwrap_or_default();
    assert!(why.contains(reason), "{name}: reason {why:?}");
    assert!(g["times_closed"].as_u64().unwrap() >= 1);
    assert!(
        g["blocks_tested"].as_u64().unwrap() <= blocks || g["times_closed"].as_u64().unwrap() >= 1,
        "{name}: {g}"
    );
    let a = &key["accounting"];
    let received = a["received"].as_u64().unwrap();
    assert_eq!(
        received,
        a["discarded"].as_u64().unwrap()
            + a["in_gate"].as_u64().unwrap()
            + a["released"].as_u64().unwrap(),
        "{name}: {a}"
    );
    assert_eq!(a["released"], 0, "{name}: {a}");
    assert!(daemon.terminate());
    let written = std::fs::metadata(dir.path("out.bin")).unwrap().len();
    assert_eq!(written, 0, "{name}: bad bytes reached the output");
}

#[test]
fn a_stuck_source_is_caught() {
    assert_caught(&["--fault-noise", "stuck=a5"], "stuck", "", 1);
}

#[test]
fn a_biased_source_is_caught() {
    // 56 % ones: every block fails the monobit test; the failure rule
    // closes the gate after 10 failures.
    assert_caught(&["--fault-noise", "biased"], "biased", "blocks failed", 10);
}

#[test]
fn repeated_blocks_are_caught() {
    assert_caught(&["--fault-noise", "repeat"], "repeat", "", 1);
}

/// A key whose report closes the gate: closed for `reason`, nothing
/// written.
fn assert_refused(extra: &[&str], name: &str, reason: &str) {
    let dir = Scratch::new(name);
    let (_emu, daemon) = start(&dir, extra);
    assert!(
        wait_for(20, || gate(&daemon)["open"] == false),
        "{}",
        daemon.status()
    );
    let why = gate(&daemon)["reason"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(why.contains(reason), "{name}: {why}");
    assert!(daemon.terminate());
    assert_eq!(std::fs::metadata(dir.path("out.bin")).unwrap().len(), 0);
}

#[test]
fn a_failure_mode_closes_the_gate() {
    assert_refused(
        &["--fault-failure-mode", "3"],
        "gate-failure",
        "key reports",
    );
}

#[test]
fn an_overheating_key_is_refused_and_a_warm_one_only_warned_about() {
    // 370.0 K = 96.85 °C: above the 85 °C limit.
    assert_refused(
        &["--fault-temperature", "3700"],
        "gate-hot",
        "temperature 96.8",
    );

    // 350.0 K = 76.85 °C: above the 70 °C warning, below the limit.
    let dir = Scratch::new("gate-warm");
    let (_emu, daemon) = start(&dir, &["--fault-temperature", "3500"]);
    assert!(wait_for(20, || gate(&daemon)["warnings"]
        .as_str()
        .is_some_and(|w| w.contains("temperature high"))));
    assert!(wait_for(
        20,
        || daemon.status()["keys"][0]["accounting"]["to_file"]
            .as_u64()
            .unwrap()
            > 0
    ));
    assert_eq!(gate(&daemon)["open"], true);
    assert!(daemon.terminate());
}

#[test]
fn a_good_key_passes_the_gate_and_the_accounting_adds_up() {
    let dir = Scratch::new("gate-good");
    let (emu, daemon) = start(&dir, &[]);
    assert!(wait_for(20, || gate(&daemon)["blocks_tested"]
        .as_u64()
        .unwrap()
        >= 10));
    // Stop the key, let the daemon settle, then check the books.
    emu.stop();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let s = daemon.status();
    let key = &s["keys"][0];
    let (g, a) = (&key["health_gate"], &key["accounting"]);
    assert_eq!(g["open"], true);
    assert_eq!(g["times_closed"], 0);
    let n = |v: &serde_json::Value| v.as_u64().unwrap();
    // Every verified frame is in the gate's books…
    assert_eq!(n(&a["received"]), 32 * n(&key["entropy_blocks"]), "{key}");
    // …and every byte is somewhere.
    assert_eq!(
        n(&a["received"]),
        n(&a["discarded"]) + n(&a["in_gate"]) + n(&a["released"])
    );
    assert_eq!(
        n(&a["released"]),
        n(&a["to_file"])
            + n(&a["to_kernel"])
            + n(&a["to_egd"])
            + n(&a["unused"])
            + n(&a["withdrawn"])
            + n(&a["queued"])
    );
    assert!(daemon.terminate());
    let written = std::fs::metadata(dir.path("out.bin")).unwrap().len();
    assert_eq!(written, n(&a["to_file"]));
}

fn test_command(dir: &Scratch, extra: &[&str], blocks: &str) -> std::process::Output {
    let ring = dir.write("keyring", DEMO_KEYRING);
    let sock = dir.path("key.sock");
    let mut args = vec!["--unix", sock.to_str().unwrap(), "--rate", "40000"];
    args.extend_from_slice(extra);
    let emu = Emulator::start(&args);
    let out = Command::new(ekey_host())
        .args(["test", "-n", blocks, "--device"])
        .arg(&emu.path)
        .arg("--keyring")
        .arg(&ring)
        .output()
        .unwrap();
    drop(emu);
    out
}

#[test]
fn test_command_passes_a_good_key_and_fails_a_bad_one() {
    let dir = Scratch::new("test-good");
    let out = test_command(&dir, &[], "4");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("verdict:") && l.contains("PASS")),
        "{text}"
    );
    assert!(text.contains("80000 (4 blocks"), "{text}");

    let dir = Scratch::new("test-bad");
    let out = test_command(&dir, &["--fault-noise", "biased"], "10");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL"), "{text}");
    // Biased: the monobit test fails on every block.
    let monobit: u64 = text
        .lines()
        .find(|l| l.contains("monobit"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(monobit >= 10, "{text}");
}

#[test]
fn test_command_fails_when_a_key_cannot_be_tested_and_refuses_bad_counts() {
    // One key works, the other is not there: not a pass.
    let out = Command::new(ekey_host())
        .args([
            "test",
            "-n",
            "1",
            "--emulate",
            "--rate",
            "40000",
            "--device",
            "/nonexistent/tty",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("/nonexistent/tty: not tested"), "{text}");
    for bad in ["0", "100001", "x"] {
        let out = Command::new(ekey_host())
            .args(["test", "-n", bad, "--emulate"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "-n {bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("--blocks"));
    }
}

#[test]
fn bytes_released_before_a_gate_closes_are_withdrawn_from_the_egd_pool() {
    use std::io::{Read, Write};
    let dir = Scratch::new("gate-withdraw");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let sock = dir.path("key.sock");
    let good = Emulator::start(&["--unix", sock.to_str().unwrap(), "--rate", "100000"]);
    // EGD with no client yet: its pool fills (16 KiB), and the file takes
    // the rest, so the key is still read.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    drop(l);
    let out = dir.path("out.bin");
    let daemon = Daemon::for_key(
        &dir,
        &sock,
        &ring,
        &["--egd-tcp", &addr, "--output", out.to_str().unwrap()],
    );
    let acct = |d: &Daemon| d.status()["keys"][0]["accounting"].clone();
    assert!(wait_for(20, || acct(&daemon)["to_egd"]
        .as_u64()
        .unwrap_or(0)
        >= 16 * 1024));
    std::thread::sleep(std::time::Duration::from_millis(300));

    // The same key comes back overheating (370.0 K): its gate closes.
    good.stop();
    let _hot = Emulator::start(&[
        "--unix",
        sock.to_str().unwrap(),
        "--rate",
        "100000",
        "--fault-temperature",
        "3700",
    ]);
    assert!(
        wait_for(20, || gate(&daemon)["open"] == false),
        "{}",
        daemon.status()
    );

    // A client asks for what the pool has (non-blocking read): nothing of
    // what the key sent before the closing is served.
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    c.write_all(&[0x01, 255]).unwrap();
    let mut count = [0u8; 1];
    c.read_exact(&mut count).unwrap();
    assert_eq!(count[0], 0, "served bytes released before the gate closed");

    let a = acct(&daemon);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    assert!(n(&a["egd_withdrawn"]) >= 16 * 1024, "{a}");
    assert_eq!(n(&a["egd_served"]), 0, "{a}");
    // The books still add up, with the withdrawn bytes in them.
    assert_eq!(
        n(&a["released"]),
        n(&a["to_file"])
            + n(&a["to_kernel"])
            + n(&a["to_egd"])
            + n(&a["unused"])
            + n(&a["withdrawn"])
            + n(&a["queued"]),
        "{a}"
    );
    let text = Command::new(ekey_host())
        .args(["status", "--control"])
        .arg(&daemon.control)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("withdrawn"), "{text}");
    assert!(daemon.terminate());
}
