//! Live min-entropy estimates in the daemon (issue 18): `status` shows each
//! key's SP 800-90B estimates, and `--min-entropy-floor` closes the gate
//! when the estimate is below it; `--kernel=auto` credits the kernel by
//! the estimate; bad values are refused by name.

mod support;

use std::process::Command;

use support::{
    DEMO_KEYRING, Daemon, Emulator, Scratch, ekey_host, get, has_cap_sys_admin, is_root, samples,
    wait_for,
};

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

#[test]
fn kernel_auto_credits_nothing_before_the_first_estimate_then_seven_eighths_of_it() {
    if !is_root() || !has_cap_sys_admin() {
        eprintln!("skipped: feeding the kernel needs root with CAP_SYS_ADMIN");
        return;
    }
    let dir = Scratch::new("kernel-auto");
    let ring = dir.write("keyring", DEMO_KEYRING);
    // 125,000 bytes (the window) take about 3 s at 40 kB/s: the first
    // mixes come before the first estimate.
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "40000",
    ]);
    let metrics = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", l.local_addr().unwrap().port())
    };
    let daemon = Daemon::for_key(
        &dir,
        &emu.path,
        &ring,
        &[
            "--kernel=auto",
            "--kernel-interval",
            "200ms",
            "--metrics",
            &metrics,
        ],
    );
    let mut st = serde_json::Value::Null;
    let ok = wait_for(30, || {
        st = daemon.status();
        st["kernel"]["bits_credited"].as_u64().unwrap_or(0) > 0
    });
    assert!(ok, "nothing credited: {st}");
    let k = &st["kernel"];
    let a = &st["keys"][0]["accounting"];
    let min = st["keys"][0]["min_entropy_bits_per_byte"]["min"]
        .as_f64()
        .expect("credit without an estimate");
    let credit = a["kernel_credit_bits_per_byte"].as_u64().unwrap();
    // floor(estimate × 7/8), at most 7 (the built-in key's estimate is
    // about 7.1: 6 bits per byte).
    assert_eq!(credit, ((min * 7.0 / 8.0).floor() as u64).min(7), "{st}");
    assert!((1..=7).contains(&credit), "{st}");
    let written = k["bytes_written"].as_u64().unwrap();
    let uncredited = k["bytes_uncredited"].as_u64().unwrap();
    // Mixes before the first estimate went in without credit; every byte
    // since got the estimate's credit (one key, one steady estimate).
    assert!(uncredited >= 64, "nothing mixed before the estimate: {k}");
    assert_eq!(
        k["bits_credited"].as_u64().unwrap(),
        credit * (written - uncredited),
        "{st}"
    );
    assert_eq!(a["kernel_bits_credited"], k["bits_credited"]);
    assert_eq!(k["ioctl_failures"], 0);
    assert_eq!(k["credit"], "auto");
    // The metrics: the key's credit per byte now, and the uncredited bytes
    // (at least those of the status read before).
    let (_, _, body) = get(&metrics, "/metrics");
    let m = samples(&body);
    let series = |prefix: &str| {
        m.iter()
            .find(|(name, _)| name.starts_with(prefix))
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {prefix} in {body}"))
    };
    assert_eq!(
        series("ekey_key_kernel_credit_bits_per_byte{"),
        credit as f64
    );
    assert!(series("ekey_kernel_bytes_uncredited_total") >= uncredited as f64);
    // And in words.
    let text = Command::new(ekey_host())
        .args(["status", "--control"])
        .arg(dir.path("control"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("credit auto (7/8 of each key's min-entropy estimate)"),
        "{text}"
    );
    assert!(
        text.contains(&format!("credited {credit} bits/byte now")),
        "{text}"
    );
}

#[test]
fn kernel_auto_without_estimates_is_refused() {
    let dir = Scratch::new("kernel-auto-bad");
    let out = Command::new(ekey_host())
        .args(["run", "--device"])
        .arg(dir.path("no-such-key"))
        .args(["--kernel=auto", "--min-entropy-window", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--kernel=auto credits the kernel by the keys' min-entropy estimates, but --min-entropy-window 0 turns them off"),
        "{err}"
    );
}
