//! End-to-end test support: finding and running the built `ekey-host`.

use std::path::PathBuf;
use std::process::Command;

/// The `ekey-host` binary of this workspace, built if it is missing.
pub fn ekey_host() -> PathBuf {
    // target/<profile>/deps/<test-binary> -> target/<profile>/ekey-host
    let exe = std::env::current_exe().expect("current_exe");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("ekey-host");
    if !bin.exists() {
        let status = Command::new(env!("CARGO"))
            .args(["build", "-p", "ekey-host"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p ekey-host failed");
    }
    bin
}
