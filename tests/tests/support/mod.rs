//! Support for the end-to-end tests in `tests/`: running the built
//! `ekey-host` against software keys.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Whether the tests run as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Whether CAP_SYS_ADMIN (bit 21) is in this process's effective set
/// (root in a default container lacks it): what feeding the kernel needs.
pub fn has_cap_sys_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << 21) != 0)
}

/// The `ekey-host` program under test (this package's copy of the binary,
/// which cargo builds fresh for the integration tests).
pub fn ekey_host() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ekey-host-e2e"))
}

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Stdio};

/// The demo key's long-term key as a keyring line.
pub const DEMO_KEYRING: &str =
    "# demo software key\nRW11bGF0ZWRLZXkx Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\n";

/// A fresh scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Makes `/tmp/ekey-test-<name>-<pid>`.
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ekey-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    /// A path inside.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes a file inside and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A noise seed (64 hex digits) that depends only on `args`' file names
/// and other values (FNV-1a, four lanes).
pub fn seed_for(args: &[&str]) -> String {
    let tag: Vec<String> = args
        .iter()
        .map(|a| {
            Path::new(a)
                .file_name()
                .map_or_else(|| a.to_string(), |f| f.to_string_lossy().into_owned())
        })
        .collect();
    let tag = tag.join(" ");
    (0u8..4)
        .map(|lane| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ u64::from(lane);
            for b in tag.bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            format!("{h:016x}")
        })
        .collect()
}

/// A running `ekey-host emulate`, killed on drop.
pub struct Emulator {
    child: Child,
    /// The path it printed (socket or pty).
    pub path: PathBuf,
}

impl Emulator {
    /// Starts `ekey-host emulate ARGS…` and waits for the path it prints.
    ///
    /// Unless ARGS give `--noise-seed`, the key's noise is seeded from ARGS
    /// (file names only, not the per-run scratch directory): every run of a
    /// test sees the same stream, so a block that fails the daemon's health
    /// tests by chance (about 1 in 1,250) cannot make a test flaky.
    pub fn start(args: &[&str]) -> Emulator {
        let mut full: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        if !args.contains(&"--noise-seed") {
            full.push("--noise-seed".into());
            full.push(seed_for(args));
        }
        let mut child = Command::new(ekey_host())
            .arg("emulate")
            .args(&full)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start ekey-host emulate");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let path = PathBuf::from(line.trim());
        assert!(path.exists(), "emulator printed {line:?}");
        Emulator { child, path }
    }

    /// Sends it a signal (`kill -SIG PID`).
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} the emulator");
    }

    /// Stops it (so its record file is complete).
    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ekey-host read -n N --device DEV --keyring RING -o OUT`.
pub fn read(n: u64, device: &Path, keyring: &Path, out: &Path) -> std::process::Output {
    Command::new(ekey_host())
        .args(["read", "-n", &n.to_string(), "--timeout", "20", "--device"])
        .arg(device)
        .arg("--keyring")
        .arg(keyring)
        .arg("-o")
        .arg(out)
        .output()
        .expect("run ekey-host read")
}

/// A running `ekey-host run`, killed on drop.
pub struct Daemon {
    child: Child,
    /// Its control socket.
    pub control: PathBuf,
}

impl Daemon {
    /// Starts `ekey-host run ARGS… --control <dir>/control` and waits for
    /// the control socket.
    pub fn start(dir: &Scratch, args: &[&str]) -> Daemon {
        let control = dir.path("control");
        let child = Command::new(ekey_host())
            .arg("run")
            .args(args)
            .arg("--control")
            .arg(&control)
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path("daemon.log")).unwrap(),
            ))
            .spawn()
            .expect("start ekey-host run");
        for _ in 0..200 {
            if control.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        assert!(control.exists(), "no control socket");
        Daemon { child, control }
    }

    /// Starts the daemon on one key: `--device DEVICE --keyring RING EXTRA…`.
    pub fn for_key(dir: &Scratch, device: &Path, ring: &Path, extra: &[&str]) -> Daemon {
        let mut args = vec![
            "--device",
            device.to_str().unwrap(),
            "--keyring",
            ring.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        Daemon::start(dir, &args)
    }

    /// `ekey-host status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(ekey_host())
            .args(["status", "--json", "--control"])
            .arg(&self.control)
            .output()
            .unwrap();
        if !out.status.success() {
            let log = self.control.with_file_name("daemon.log");
            panic!(
                "{}\ndaemon log:\n{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then wait; returns whether it exited cleanly.
    pub fn terminate(mut self) -> bool {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().map(|s| s.success()).unwrap_or(false)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 50 ms for up to `secs` seconds.
pub fn wait_for(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while std::time::Instant::now() < end {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    f()
}

/// A file of 32-byte blocks.
pub fn blocks(path: &Path) -> Vec<[u8; 32]> {
    let data = std::fs::read(path).unwrap_or_default();
    data.chunks_exact(32)
        .map(|c| c.try_into().unwrap())
        .collect()
}

/// `GET path` over HTTP/1.1; returns (status line, content type, body).
pub fn get(addr: &str, path: &str) -> (String, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    let status = head.lines().next().unwrap().to_owned();
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_owned())
        })
        .unwrap_or_default();
    (status, ctype, body.to_owned())
}

/// Samples by full series name (`name{labels}`), parsed from the text
/// format without our code.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse::<f64>().unwrap())
        })
        .collect()
}
