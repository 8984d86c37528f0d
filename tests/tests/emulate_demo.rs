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
