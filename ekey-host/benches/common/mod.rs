//! Helpers shared by the bench binaries (`mod common;` in each): the
//! `ekey-host` binary and a test keyring, a child-process guard, and the
//! start-up handshakes with the emulator and the daemon.
//!
//! Not every bench uses every item, hence the blanket `dead_code` allowance.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ekey-host");
pub const KEYRING: &str = "RW11bGF0ZWRLZXkx Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\n";

/// A child process that is killed and reaped when dropped, so that a
/// panic anywhere in the bench leaves no stray emulator or daemon.
pub struct Guard {
    pub name: &'static str,
    pub child: Child,
}

impl Guard {
    pub fn spawn(name: &'static str, cmd: &mut Command) -> Guard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({BIN}): {e}"));
        Guard { name, child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Panics if the process has already exited.
    pub fn assert_alive(&mut self, log: &Path) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{} exited early ({status}); its log:\n{}",
                self.name,
                fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

/// Reads the emulator's first stdout line (the socket path it listens on),
/// with a timeout. The rest of its stdout is drained so it never blocks.
pub fn wait_for_path_line(stdout: ChildStdout, timeout: Duration) -> String {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send(line);
        let _ = reader.read_to_end(&mut Vec::new());
    });
    rx.recv_timeout(timeout)
        .expect("the emulator did not print its socket path")
}

/// `ekey-host status --json`, parsed; None if it fails.
pub fn status_json(control: &Path) -> Option<serde_json::Value> {
    let out = Command::new(BIN)
        .args(["status", "--json", "--control"])
        .arg(control)
        .stderr(Stdio::null())
        .output()
        .expect("cannot run ekey-host status");
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// Asks `ekey-host status --json` until the first key says it is running.
pub fn wait_until_running(control: &Path, daemon: &mut Guard, log: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        daemon.assert_alive(log);
        let running = status_json(control).is_some_and(|json| {
            json["keys"]
                .as_array()
                .is_some_and(|keys| keys.iter().any(|k| k["running"] == true))
        });
        if running {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the key did not reach `running` within {timeout:?}; daemon log:\n{}",
            fs::read_to_string(log).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// 238123 -> "238,123".
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Starts `ekey-host emulate --unix <dir>/key.sock --rate RATE` (stderr to
/// `<dir>/emulate.log`) and waits until it listens. Returns the emulator,
/// its socket and its log.
pub fn start_emulator(dir: &Path, rate: u32) -> (Guard, std::path::PathBuf, std::path::PathBuf) {
    let socket = dir.join("key.sock");
    let log = dir.join("emulate.log");
    let mut emulator = Guard::spawn(
        "the emulator",
        Command::new(BIN)
            .arg("emulate")
            .arg("--unix")
            .arg(&socket)
            .arg("--rate")
            .arg(rate.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(&log).expect("cannot create the emulator log")),
    );
    let stdout = emulator.child.stdout.take().expect("piped stdout");
    let line = wait_for_path_line(stdout, Duration::from_secs(10));
    emulator.assert_alive(&log);
    assert_eq!(
        Path::new(line.trim()),
        socket,
        "the emulator printed an unexpected line"
    );
    (emulator, socket, log)
}
