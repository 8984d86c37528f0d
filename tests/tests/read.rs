//! `ekey-host read` against software keys on Unix sockets and ptys.

mod support;

use std::time::{Duration, Instant};

use support::{DEMO_KEYRING, Emulator, Scratch, read};

/// 4,100 blocks: past sequence 4095, so across a session re-key.
const ACROSS_REKEY: u64 = 4100 * 32;

#[test]
fn reads_the_exact_stream_across_a_rekey_despite_corruption_garbage_and_replays() {
    let dir = Scratch::new("read-faults");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let record = dir.path("record.bin");
    let sock = dir.path("key.sock");
    let emu = Emulator::start(&[
        "--unix",
        sock.to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
        "--rate",
        "400000",
        "--fault-corrupt-every",
        "97",
        "--fault-garbage-every",
        "53",
        "--fault-replay-every",
        "71",
    ]);
    let out = dir.path("out.bin");
    let r = read(ACROSS_REKEY, &emu.path, &ring, &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(r.status.success(), "{stderr}");
    emu.stop();
    let got = std::fs::read(&out).unwrap();
    let sent = std::fs::read(&record).unwrap();
    assert_eq!(got.len() as u64, ACROSS_REKEY);
    // Exactly the key's authentic blocks, in order, nothing missing: the
    // corrupted and replayed frames are absent, everything else is there.
    assert!(sent.len() >= got.len());
    assert!(
        got == sent[..got.len()],
        "read output differs from the key's record"
    );
    // Two session keys were used.
    let rekeys = stderr.matches("running (new session key)").count();
    assert!(rekeys >= 2, "{stderr}");
}

#[test]
fn reads_from_a_pty_like_a_tty() {
    let dir = Scratch::new("read-pty");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let record = dir.path("record.bin");
    let emu = Emulator::start(&[
        "--pty",
        "--record",
        record.to_str().unwrap(),
        "--rate",
        "100000",
    ]);
    let out = dir.path("out.bin");
    let r = read(5000, &emu.path, &ring, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    emu.stop();
    let got = std::fs::read(&out).unwrap();
    let sent = std::fs::read(&record).unwrap();
    assert_eq!(got.len(), 5000);
    assert!(got == sent[..5000]);
}

fn expect_failure(dir: &Scratch, emulate_args: &[&str], keyring: &str, reason: &str) {
    let ring = dir.write("keyring", keyring);
    let sock = dir.path("key.sock");
    let mut owned: Vec<String> = vec!["--unix".into(), sock.to_str().unwrap().into()];
    owned.extend(emulate_args.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
    let emu = Emulator::start(&refs);
    let out = dir.path("out.bin");
    let start = Instant::now();
    let r = read(1000, &emu.path, &ring, &out);
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "should fail: {stderr}");
    assert!(stderr.contains(reason), "expected {reason:?} in: {stderr}");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert!(!out.exists(), "nothing may be written");
}

#[test]
fn unknown_serial_fails_with_its_reason_and_writes_nothing() {
    let dir = Scratch::new("read-noltk");
    expect_failure(
        &dir,
        &[],
        "# no keys\n",
        "has no long-term key in the keyring",
    );
}

#[test]
fn wrong_long_term_key_fails_with_its_reason_and_writes_nothing() {
    let dir = Scratch::new("read-wrongltk");
    let wrong = "RW11bGF0ZWRLZXkx ERERERERERERERERERERERERERERERERERERERERERE=\n";
    expect_failure(&dir, &[], wrong, "rejected the long-term key");
}

#[test]
fn failure_mode_fails_with_its_meaning_and_writes_nothing() {
    let dir = Scratch::new("read-failure");
    expect_failure(
        &dir,
        &["--fault-failure-mode", "3"],
        DEMO_KEYRING,
        "failure mode: generators correlated",
    );
}

#[test]
fn missing_device_fails_with_its_reason() {
    let dir = Scratch::new("read-missing");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let out = dir.path("out.bin");
    let r = read(10, &dir.path("nope"), &ring, &out);
    assert!(!r.status.success());
    assert!(String::from_utf8_lossy(&r.stderr).contains("no key found"));
    assert!(!out.exists());
}
