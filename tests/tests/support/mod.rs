//! Support for the end-to-end tests in `tests/`: running the built
//! `ekey-host` against software keys.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// The `ekey-host` program under test (this package's copy of the binary,
/// which cargo builds fresh for the integration tests).
pub fn ekey_host() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ekey-host-e2e"))
}

use std::io::{BufRead, BufReader};
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

/// A running `ekey-host emulate`, killed on drop.
pub struct Emulator {
    child: Child,
    /// The path it printed (socket or pty).
    pub path: PathBuf,
}

impl Emulator {
    /// Starts `ekey-host emulate ARGS…` and waits for the path it prints.
    pub fn start(args: &[&str]) -> Emulator {
        let mut child = Command::new(ekey_host())
            .arg("emulate")
            .args(args)
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
