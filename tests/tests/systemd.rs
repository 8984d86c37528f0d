//! `Type=notify`: the daemon says READY=1 once a key is keyed (or at once
//! with `--no-wait`) and pings the watchdog while its loop turns. The test
//! plays systemd: it binds the notification socket and reads what arrives.

mod support;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{DEMO_KEYRING, Emulator, Scratch, ekey_host};

struct Run(Child);

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `ekey-host run ARGS…` with systemd's variables pointing at a
/// fresh notification socket.
fn start(dir: &Scratch, args: &[&str], watchdog_usec: Option<u64>) -> (Run, UnixDatagram) {
    let sock_path = dir.path("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut cmd = Command::new(ekey_host());
    cmd.arg("run")
        .args(args)
        .arg("--control")
        .arg(dir.path("control"))
        .env("NOTIFY_SOCKET", &sock_path)
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path("daemon.log")).unwrap(),
        ));
    if let Some(usec) = watchdog_usec {
        cmd.env("WATCHDOG_USEC", usec.to_string());
    }
    (Run(cmd.spawn().unwrap()), sock)
}

/// Every message received within `secs` seconds, in order.
fn messages_for(sock: &UnixDatagram, secs: f64, stop_at: Option<&str>) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = stop_at.is_some_and(|s| msg.lines().any(|l| l == s));
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

/// A demo software key and a daemon (with its keyring) on it.
fn start_with_demo_key(dir: &Scratch, watchdog_usec: Option<u64>) -> (Emulator, Run, UnixDatagram) {
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&["--unix", dir.path("key.sock").to_str().unwrap()]);
    let (run, sock) = start(
        dir,
        &[
            "--device",
            emu.path.to_str().unwrap(),
            "--keyring",
            ring.to_str().unwrap(),
        ],
        watchdog_usec,
    );
    (emu, run, sock)
}

fn has_line(msgs: &[String], line: &str) -> bool {
    msgs.iter().any(|m| m.lines().any(|l| l == line))
}

#[test]
fn ready_once_a_key_is_keyed_and_the_watchdog_is_fed() {
    let dir = Scratch::new("sd-ready");
    // Watchdog of 400 ms: pinged every 200 ms.
    let (_emu, _run, sock) = start_with_demo_key(&dir, Some(400_000));
    let msgs = messages_for(&sock, 15.0, Some("READY=1"));
    assert!(
        has_line(&msgs, "READY=1"),
        "no READY=1 within 15 s: {msgs:?}\n{}",
        std::fs::read_to_string(dir.path("daemon.log")).unwrap_or_default()
    );
    // After READY, the watchdog keeps being fed, and the status line says
    // the key runs.
    let later = messages_for(&sock, 1.5, None);
    let pings = later.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    assert!(pings >= 4, "{pings} watchdog pings in 1.5 s: {later:?}");
    let all: Vec<String> = msgs.into_iter().chain(later).collect();
    assert!(
        all.iter().any(|m| m.contains("STATUS=1 of 1 keys running")),
        "{all:?}"
    );
}

#[test]
fn not_ready_while_no_key_is_keyed_unless_told_not_to_wait() {
    let dir = Scratch::new("sd-wait");
    // The keyring does not know the emulated key: it never gets keyed.
    let ring = dir.write("keyring", "");
    let emu = Emulator::start(&["--unix", dir.path("key.sock").to_str().unwrap()]);
    let args = [
        "--device",
        emu.path.to_str().unwrap(),
        "--keyring",
        ring.to_str().unwrap(),
    ];
    {
        let (_run, sock) = start(&dir, &args, None);
        let msgs = messages_for(&sock, 4.0, Some("READY=1"));
        assert!(!has_line(&msgs, "READY=1"), "{msgs:?}");
        // No watchdog asked for: no pings either.
        assert!(!msgs.iter().any(|m| m.contains("WATCHDOG=1")), "{msgs:?}");
    }
    let _ = std::fs::remove_file(dir.path("notify.sock"));
    let _ = std::fs::remove_file(dir.path("control"));
    let mut with_no_wait = args.to_vec();
    with_no_wait.push("--no-wait");
    let (_run, sock) = start(&dir, &with_no_wait, None);
    let msgs = messages_for(&sock, 10.0, Some("READY=1"));
    assert!(has_line(&msgs, "READY=1"), "{msgs:?}");
}

#[test]
fn ready_comes_as_soon_as_the_key_is_keyed_not_at_the_next_ping() {
    // The shipped unit's WatchdogSec=30: pings every 15 s. READY=1 must not
    // wait for one of them.
    let dir = Scratch::new("sd-prompt");
    let (_emu, _run, sock) = start_with_demo_key(&dir, Some(30_000_000));
    let t0 = Instant::now();
    let msgs = messages_for(&sock, 10.0, Some("READY=1"));
    assert!(has_line(&msgs, "READY=1"), "{msgs:?}");
    // A key is keyed within about a second here.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
}
