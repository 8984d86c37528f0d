//! `ekey-host feed`, the guest-side feeder: the kernel fed from the
//! daemon's EGD port, reconnection with back-off, clean stop, bad input.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};

use support::{Daemon, Scratch, ekey_host, has_cap_sys_admin, is_root, wait_for};

/// A free port on loopback (the kernel's choice), released for the test.
fn port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The software-key daemon serving EGD on `addr`.
///
/// `--emulate` bytes come from the OS generator, which is why the daemon
/// refuses `--kernel` with `--emulate`. Crediting this machine's kernel with
/// them through `feed` is acceptable only because this is a test: they are
/// the OS CSPRNG's own output, so it is harmless here.
fn egd_daemon(dir: &Scratch, addr: &str) -> Daemon {
    let daemon = Daemon::start(dir, &["--emulate", "--rate", "64000", "--egd-tcp", addr]);
    assert!(
        wait_for(15, || daemon.status()["keys"][0]["running"] == true),
        "the software key never ran: {}",
        daemon.status()
    );
    daemon
}

/// A running `ekey-host feed`, its log in a file; killed on drop.
struct Feed {
    child: Child,
    log: PathBuf,
}

impl Feed {
    fn start(dir: &Scratch, args: &[&str]) -> Feed {
        Feed::start_with(Command::new(ekey_host()), dir, args)
    }

    fn start_with(mut cmd: Command, dir: &Scratch, args: &[&str]) -> Feed {
        let log = dir.path("feed.log");
        let child = cmd
            .arg("feed")
            .args(args)
            .env_remove("EKEY_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start ekey-host feed");
        Feed { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `secs` for it to exit.
    fn wait(&mut self, secs: u64) -> Option<ExitStatus> {
        let mut status = None;
        wait_for(secs, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig}");
    }
}

impl Drop for Feed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The number just before `what` in `line` ("… 8192 bytes written, …").
fn count(line: &str, what: &str) -> u64 {
    let head = &line[..line
        .find(what)
        .unwrap_or_else(|| panic!("no {what:?} in {line:?}"))];
    head.rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {what:?} in {line:?}"))
}

/// The final summary line ("feed: stopped: …").
fn final_summary(log: &str) -> &str {
    log.lines()
        .find(|l| l.contains("feed: stopped: "))
        .unwrap_or_else(|| panic!("no final summary in:\n{log}"))
}

#[test]
fn feed_credits_the_kernel_from_the_daemons_egd_port() {
    if !is_root() {
        println!("skipped: feeding the kernel needs root");
        return;
    }
    if !has_cap_sys_admin() {
        println!("skipped: root but no CAP_SYS_ADMIN (container?)");
        return;
    }
    let dir = Scratch::new("feed-kernel");
    let addr = format!("127.0.0.1:{}", port());
    let daemon = egd_daemon(&dir, &addr);
    // 8 KiB in mixes of 1 KiB every 20 ms (the CRNG is initialised on any
    // running machine), 5 bits credited per byte, then exit.
    let mut feed = Feed::start(
        &dir,
        &[
            "--egd",
            &addr,
            "--bits-per-byte",
            "5",
            "--interval",
            "20ms",
            "--bytes-per-interval",
            "1024",
            "--max-bytes",
            "8192",
        ],
    );
    let status = feed.wait(30).expect("feed did not finish");
    let log = feed.log();
    assert!(status.success(), "feed failed:\n{log}");
    assert!(log.contains(&format!("connected to tcp {addr}")), "{log}");
    let summary = final_summary(&log);
    // The ioctl counters: every byte received written, 5 bits each, no
    // failure.
    assert_eq!(count(summary, " bytes written"), 8192, "{summary}");
    assert_eq!(count(summary, " bits credited"), 8192 * 5, "{summary}");
    assert_eq!(count(summary, " ioctl failures"), 0, "{summary}");
    assert_eq!(count(summary, " bytes received"), 8192, "{summary}");
    // The daemon's side of it: one EGD client, exactly the bytes feed
    // asked for, and the client gone once feed exited.
    let s = daemon.status();
    assert_eq!(s["egd"]["total_clients"], 1, "{s}");
    assert_eq!(s["egd"]["total_served"], 8192, "{s}");
    assert_eq!(s["egd"]["closed_for_protocol_errors"], 0, "{s}");
    assert!(
        wait_for(5, || daemon.status()["egd"]["clients"]
            .as_array()
            .is_some_and(|c| c.is_empty())),
        "feed's connection still listed: {}",
        daemon.status()
    );
    assert!(daemon.terminate());
}

#[test]
fn feed_without_root_says_it_needs_root() {
    let dir = Scratch::new("feed-noroot");
    let mut cmd = if is_root() {
        // Drop to nobody with no capabilities at all.
        if !Command::new("setpriv")
            .arg("--help")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            println!("skipped: root, and no setpriv to drop privileges");
            return;
        }
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(ekey_host());
        c
    } else {
        Command::new(ekey_host())
    };
    let out = cmd.args(["feed", "--egd", "127.0.0.1:9"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("feeding the kernel needs root (CAP_SYS_ADMIN)"),
        "{stderr}"
    );
    drop(dir);
}

#[test]
fn feed_retries_with_backoff_reconnects_and_stops_on_sigterm() {
    let dir = Scratch::new("feed-retry");
    let addr = format!("127.0.0.1:{}", port());
    // Nothing listens yet. --test-discard: no root needed, nothing reaches
    // the kernel.
    let feed = Feed::start(
        &dir,
        &[
            "--egd",
            &addr,
            "--retry-min",
            "100ms",
            "--retry-max",
            "400ms",
            "--test-discard",
        ],
    );
    let failures = |log: &str| {
        log.lines()
            .filter(|l| l.contains(&format!("cannot connect to tcp {addr}")))
            .map(|l| l.rsplit("retrying in ").next().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        wait_for(15, || failures(&feed.log()).len() >= 5),
        "{}",
        feed.log()
    );
    assert_eq!(
        failures(&feed.log())[..5],
        ["100 ms", "200 ms", "400 ms", "400 ms", "400 ms"],
        "{}",
        feed.log()
    );
    // The server comes up: feed connects and takes bytes.
    let daemon = egd_daemon(&dir, &addr);
    assert!(
        wait_for(15, || daemon.status()["egd"]["total_served"]
            .as_u64()
            .is_some_and(|n| n >= 1024)),
        "{}\n{}",
        daemon.status(),
        feed.log()
    );
    assert!(feed.log().contains(&format!("connected to tcp {addr}")));
    assert_eq!(
        daemon.status()["egd"]["clients"].as_array().unwrap().len(),
        1
    );
    // The server goes away: noticed at once (feed is idle between mixes),
    // and the back-off starts again from its minimum after a good session.
    assert!(daemon.terminate());
    assert!(
        wait_for(10, || feed
            .log()
            .contains(&format!("lost the connection to tcp {addr}"))),
        "{}",
        feed.log()
    );
    let log = feed.log();
    let lost = log
        .lines()
        .find(|l| l.contains("lost the connection"))
        .unwrap();
    assert!(lost.ends_with("reconnecting in 100 ms"), "{lost}");
    // SIGTERM: a clean exit with a final summary.
    let mut feed = feed;
    feed.signal("TERM");
    let status = feed.wait(10).expect("feed ignored SIGTERM");
    let log = feed.log();
    assert!(status.success(), "{log}");
    assert!(log.contains("SIGTERM: stopping"), "{log}");
    let summary = final_summary(&log);
    assert!(count(summary, " bytes written") >= 1024, "{summary}");
    assert_eq!(count(summary, " ioctl failures"), 0, "{summary}");
    assert_eq!(count(summary, " connections"), 1, "{summary}");
    assert_eq!(count(summary, " lost"), 1, "{summary}");
    assert!(count(summary, " failed attempts") >= 5, "{summary}");
}

#[test]
fn feed_sigint_stops_it_too() {
    let dir = Scratch::new("feed-sigint");
    let addr = format!("127.0.0.1:{}", port());
    let mut feed = Feed::start(&dir, &["--egd", &addr, "--test-discard"]);
    assert!(wait_for(10, || feed.log().contains("cannot connect")));
    feed.signal("INT");
    let status = feed.wait(10).expect("feed ignored SIGINT");
    assert!(status.success(), "{}", feed.log());
    assert_eq!(count(final_summary(&feed.log()), " bytes written"), 0);
}

#[test]
fn feed_rejects_bad_input_clearly() {
    let run = |args: &[&str]| {
        let out = Command::new(ekey_host())
            .arg("feed")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    for (args, needle) in [
        (
            &["--egd", "127.0.0.1:1", "--bits-per-byte", "9"][..],
            "0..=8",
        ),
        (&["--egd", "nowhere"][..], "expected HOST:PORT"),
        (&["--egd", "127.0.0.1:99999"][..], "1..=65535"),
        (
            &["--egd", "127.0.0.1:1", "--interval", "soon"][..],
            "duration",
        ),
        (&[][..], "--egd"),
    ] {
        let (code, stderr) = run(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // Checked before /dev/random is opened (so even without root).
    let (code, stderr) = run(&["--egd", "127.0.0.1:1", "--interval", "0"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("non-zero"), "{stderr}");
}

#[test]
fn feed_over_the_daemons_egd_unix_socket() {
    let dir = Scratch::new("feed-unix");
    let sock = dir.path("egd.sock");
    let daemon = Daemon::start(
        &dir,
        &[
            "--emulate",
            "--rate",
            "64000",
            "--egd-unix",
            sock.to_str().unwrap(),
        ],
    );
    assert!(wait_for(15, || daemon.status()["keys"][0]["running"] == true));
    // --test-discard: filling until 1024 bytes, then 300 bytes every 10 ms.
    let mut feed = Feed::start(
        &dir,
        &[
            "--egd",
            sock.to_str().unwrap(),
            "--interval",
            "10ms",
            "--bytes-per-interval",
            "300",
            "--max-bytes",
            "3000",
            "--test-discard",
        ],
    );
    let status = feed.wait(30).expect("feed did not finish");
    let log = feed.log();
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("connected to unix {}", sock.display())),
        "{log}"
    );
    assert!(
        log.contains("kernel: mixing in 300 bytes every 10 ms"),
        "{log}"
    );
    assert_eq!(count(final_summary(&log), " bytes written"), 3000, "{log}");
    let s = daemon.status();
    assert_eq!(s["egd"]["total_clients"], 1, "{s}");
    assert_eq!(s["egd"]["total_served"], 3000, "{s}");
}

#[test]
fn absurd_durations_are_refused_not_a_panic() {
    for opt in ["--interval", "--status-interval", "--retry-max"] {
        let out = std::process::Command::new(support::ekey_host())
            .args(["feed", "--egd", "127.0.0.1:1", "--test-discard", opt])
            .arg("18446744073709551615")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{opt}: {stderr}");
        assert!(stderr.contains("too long"), "{opt}: {stderr}");
    }
}
