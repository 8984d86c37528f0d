//! `run --ekeyd-config`: a vendor-style ekeyd.conf drives the daemon
//! (issue 17): its keyring, its key and its output file, with the command
//! line winning where both speak; `migrate-ekeyd-config` prints the same.

mod support;

use std::process::Command;

use support::{DEMO_KEYRING, Emulator, Scratch, blocks, ekey_host};

/// An ekeyd.conf as the vendor's layout has them (comments, string-call
/// and parenthesised forms).
fn vendor_conf(keyring: &str, key: &str, out: &str, control: &str) -> String {
    format!(
        "-- ekeyd configuration\n\
         Daemonise(false)\n\
         Keyring \"{keyring}\"\n\
         UnixControlSocket \"{control}\"\n\
         -- the key\n\
         AddEntropyKey(\"{key}\")\n\
         SetOutputToFile \"{out}\"\n\
         TCPControlSocket(4950)\n"
    )
}

#[test]
fn a_vendor_config_drains_the_demo_key_into_its_output_file() {
    let dir = Scratch::new("ekeyd-conf");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let rec = dir.path("key.rec");
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "40000",
        "--record",
        rec.to_str().unwrap(),
    ]);
    let out = dir.path("out.bin");
    let conf = dir.write(
        "ekeyd.conf",
        &vendor_conf(
            ring.to_str().unwrap(),
            emu.path.to_str().unwrap(),
            out.to_str().unwrap(),
            dir.path("control").to_str().unwrap(),
        ),
    );
    let run = Command::new(ekey_host())
        .args(["run", "--limit", "4096", "--ekeyd-config"])
        .arg(&conf)
        .env_remove("EKEY_LOG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{log}");
    emu.stop();
    // The file holds the key's first 128 blocks, as the key sent them.
    let (got, sent) = (blocks(&out), blocks(&rec));
    assert_eq!(got.len(), 128, "{log}");
    assert_eq!(got[..], sent[..128]);
    // What the file asks for that is not done is said, with its line.
    assert!(
        log.contains("line 8: TCPControlSocket: refused: a TCP control socket is unauthenticated"),
        "{log}"
    );
    assert!(log.contains("line 2: Daemonise: ignored"), "{log}");
}

#[test]
fn the_command_line_wins_and_migration_prints_the_same_options() {
    let dir = Scratch::new("ekeyd-conf-cli");
    let conf = dir.write(
        "ekeyd.conf",
        &vendor_conf(
            "/nonexistent/keyring",
            "/nonexistent/key",
            "/nonexistent/out",
            "/nonexistent/ctl",
        ),
    );
    // --keyring on the command line beats the file's: the error names ours.
    let ring = dir.path("no-such-keyring");
    let run = Command::new(ekey_host())
        .args(["run", "--limit", "32", "--keyring"])
        .arg(&ring)
        .arg("--ekeyd-config")
        .arg(&conf)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(
        err.contains("no-such-keyring") && !err.contains("/nonexistent/keyring"),
        "{err}"
    );

    let migrate = Command::new(ekey_host())
        .args(["migrate-ekeyd-config"])
        .arg(&conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&migrate.stdout);
    assert!(
        migrate.status.success(),
        "{}",
        String::from_utf8_lossy(&migrate.stderr)
    );
    let line = "run --keyring /nonexistent/keyring --device /nonexistent/key --output /nonexistent/out --control /nonexistent/ctl";
    // The binary named is the one that ran.
    let bin = ekey_host().canonicalize().unwrap();
    let bin = bin.display();
    assert!(text.contains(&format!("\n{bin} {line}\n")), "{text}");
    assert!(
        text.contains(&format!("ExecStart=\nExecStart={bin} {line}\n")),
        "{text}"
    );
    assert!(
        text.contains("# warning: line 8: TCPControlSocket"),
        "{text}"
    );

    // A line that is not an ekeyd directive call stops it, naming the line.
    let bad = dir.write("bad.conf", "Keyring \"/k\"\nos.execute(\"rm -rf /\")\n");
    let run = Command::new(ekey_host())
        .args(["run", "--ekeyd-config"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success());
    assert!(err.contains("bad.conf: line 2"), "{err}");
}
