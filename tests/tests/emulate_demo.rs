//! The README's main job, `ekey-host run --emulate`, as a user runs it.

mod support;

use std::process::Command;

#[test]
fn run_emulate_writes_exactly_the_requested_verified_bytes() {
    let dir = std::env::temp_dir().join(format!("ekey-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("entropy.bin");
    let result = Command::new(support::ekey_host())
        .args([
            "run",
            "--emulate",
            "--limit",
            "1000",
            "--rate",
            "64000",
            "--output",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "stderr: {stderr}");
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(bytes.len(), 1000);
    // And with --record, the output is traced to what the built-in key
    // sent: the record's first bytes (the record file is private).
    let rec = dir.join("record.bin");
    let result = Command::new(support::ekey_host())
        .args([
            "run",
            "--emulate",
            "--limit",
            "5000",
            "--rate",
            "64000",
            "--record",
        ])
        .arg(&rec)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(result.status.success());
    let (got, sent) = (std::fs::read(&out).unwrap(), std::fs::read(&rec).unwrap());
    assert_eq!(got.len(), 5000);
    // The health gate passes whole 2,500-byte blocks; one that fails by
    // chance (about 1 in 1,250; this key's noise is the OS generator) is
    // left out, so match block by block.
    let mut at = 0;
    for block in sent.chunks(2500) {
        let n = block.len().min(got.len() - at);
        if n > 0 && got[at..at + n] == block[..n] {
            at += n;
        }
    }
    assert_eq!(at, got.len(), "output is not made of the key's record");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // --record belongs to the built-in key.
    let result = Command::new(support::ekey_host())
        .args(["run", "--record", "/tmp/x", "--device", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(result.status.code(), Some(2));
    // The session went through the protocol: identified, keyed, running.
    assert!(
        stderr.contains("running (new session key)"),
        "stderr: {stderr}"
    );
    // Not constant output: more than a handful of distinct byte values.
    let distinct = bytes.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(distinct > 200, "only {distinct} distinct byte values");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_without_any_key_source_says_what_to_give() {
    let result = Command::new(support::ekey_host())
        .args(["run"])
        .output()
        .unwrap();
    assert!(!result.status.success());
    assert!(String::from_utf8_lossy(&result.stderr).contains("--emulate"));
}
