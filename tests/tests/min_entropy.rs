//! Live min-entropy estimates in the daemon (issue 18): `status` shows each
//! key's SP 800-90B estimates, and `--min-entropy-floor` closes the gate
//! when the estimate is below it; bad values are refused by name.

mod support;

use std::process::Command;

use support::{Daemon, Scratch, ekey_host, wait_for};

#[test]
fn estimates_are_shown_and_a_floor_above_them_closes_the_gate() {
    let dir = Scratch::new("min-entropy-floor");
    let ring = dir.path("keyring");
    // The estimators give about 7.1 bits per byte on 125,000 random bytes
    // (their confidence bounds): a floor of 7.95 is above that.
    let d = Daemon::start(
        &dir,
        &[
            "--emulate",
            "--keyring",
            ring.to_str().unwrap(),
            "--rate",
            "200000",
            "--min-entropy-floor",
            "7.95",
        ],
    );
    let mut st = serde_json::Value::Null;
    assert!(
        wait_for(30, || {
            st = d.status();
            !st["keys"][0]["min_entropy_bits_per_byte"].is_null()
                && st["keys"][0]["health_gate"]["open"] == false
        }),
        "{st}"
    );
    let k = &st["keys"][0];
    let m = &k["min_entropy_bits_per_byte"];
    let min = m["min"].as_f64().unwrap();
    assert!((5.0..7.95).contains(&min), "{m}");
    for name in [
        "most_common_value",
        "collision",
        "markov",
        "compression",
        "t_tuple",
        "lrs",
    ] {
        let v = m[name].as_f64().unwrap();
        assert!(v >= min && v <= 8.0, "{name}: {m}");
    }
    assert_eq!(m["window_bytes"], 125_000);
    let reason = k["health_gate"]["reason"].as_str().unwrap();
    assert!(reason.starts_with("min-entropy estimate "), "{reason}");
    assert!(reason.ends_with("below the floor of 7.950"), "{reason}");
}

#[test]
fn bad_min_entropy_options_are_refused() {
    let dir = Scratch::new("min-entropy-bad");
    for (args, says) in [
        (&["--min-entropy-floor", "9"][..], "--min-entropy-floor 9"),
        (
            &["--min-entropy-window", "100"][..],
            "--min-entropy-window 100",
        ),
        (
            &["--min-entropy-window", "0", "--min-entropy-floor", "6"][..],
            "--min-entropy-floor needs the estimators",
        ),
    ] {
        let out = Command::new(ekey_host())
            .args(["read", "-n", "32", "--emulate", "--keyring"])
            .arg(dir.path("keyring"))
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}
