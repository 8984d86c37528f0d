//! `ekey-host rekey` and `ekey-host keyring` against software keys.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use support::{DEMO_KEYRING, Daemon, Emulator, Scratch, blocks, ekey_host, read, wait_for};

const DEMO_MASTER: &str = "TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU2T";

fn rekey(args: &[&str]) -> std::process::Output {
    Command::new(ekey_host())
        .arg("rekey")
        .args(args)
        .output()
        .unwrap()
}

/// `ekey-host rekey --device DEVICE --master-key MASTER --keyring RING
/// --control CONTROL EXTRA…`.
fn rekey_key(
    device: &Path,
    master: &str,
    ring: &Path,
    control: &Path,
    extra: &[&str],
) -> std::process::Output {
    let mut args = vec![
        "--device",
        device.to_str().unwrap(),
        "--master-key",
        master,
        "--keyring",
        ring.to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    rekey(&args)
}

/// As [`rekey_key`], with the master key on standard input
/// (`--master-key-file -`), as a password manager's pipe gives it.
fn rekey_key_stdin(
    device: &Path,
    master: &str,
    ring: &Path,
    control: &Path,
    extra: &[&str],
) -> std::process::Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = Command::new(ekey_host())
        .arg("rekey")
        .args(["--device", device.to_str().unwrap()])
        .args(["--master-key-file", "-"])
        .args(["--keyring", ring.to_str().unwrap()])
        .args(["--control", control.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{master}").unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn vectors() -> serde_json::Value {
    let p = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../ekey-proto/tests/vectors/keying.json"
    );
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn b64(hex_str: &str) -> String {
    // PEM64 of 32 bytes, as a keyring line holds it.
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes: Vec<u8> = (0..hex_str.len() / 2)
        .map(|i| u8::from_str_radix(&hex_str[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn every_long_term_rekey_vector_through_the_command() {
    for (i, c) in vectors()["long_term_rekey"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        let dir = Scratch::new(&format!("rekey-vector-{i}"));
        let sock = dir.path("key.sock");
        let ring = dir.path("keyring");
        // The software key answers with the vector's device entropy.
        let emu = Emulator::start(&[
            "--unix",
            sock.to_str().unwrap(),
            "--serial",
            c["serial_pem"].as_str().unwrap(),
            "--master-key",
            c["master_key_printed"].as_str().unwrap(),
            "--noise-prefix",
            c["device_entropy"].as_str().unwrap(),
        ]);
        // Every other case reads the master key from standard input.
        let via = if i % 2 == 0 {
            rekey_key
        } else {
            rekey_key_stdin
        };
        let out = via(
            &emu.path,
            c["master_key_printed"].as_str().unwrap(),
            &ring,
            &dir.path("no-daemon"),
            &["--nonce", c["host_nonce"].as_str().unwrap()],
        );
        assert!(out.status.success(), "case {i}: {}", text(&out));
        assert!(text(&out).contains("long-term key updated"));
        // Only a key given on the command line is warned about.
        assert_eq!(
            text(&out).contains("other users can read this command line"),
            i % 2 == 0,
            "case {i}: {}",
            text(&out)
        );
        let line = std::fs::read_to_string(&ring).unwrap();
        assert_eq!(
            line.trim(),
            format!(
                "{} {}",
                c["serial_pem"].as_str().unwrap(),
                b64(c["new_long_term_key"].as_str().unwrap())
            ),
            "case {i}"
        );
        let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

#[test]
fn right_master_key_rekeys_and_the_new_key_works() {
    let dir = Scratch::new("rekey-right");
    let ring = dir.write("keyring", "# my keys\n");
    let record = dir.path("record.bin");
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
        "--rate",
        "100000",
    ]);
    let out = rekey_key(&emu.path, DEMO_MASTER, &ring, &dir.path("no-daemon"), &[]);
    assert!(out.status.success(), "{}", text(&out));
    let content = std::fs::read_to_string(&ring).unwrap();
    assert!(
        content.starts_with("# my keys\nRW11bGF0ZWRLZXkx "),
        "{content}"
    );
    assert!(
        !content.contains("Xl5eXl5eXl5e"),
        "the old demo key was replaced"
    );
    // The key now keys sessions with the new long-term key.
    let got = dir.path("out.bin");
    let r = read(2000, &emu.path, &ring, &got);
    assert!(r.status.success(), "{}", text(&r));
    emu.stop();
    let sent = std::fs::read(&record).unwrap();
    assert_eq!(std::fs::read(&got).unwrap(), sent[..2000]);
}

#[test]
fn wrong_master_key_is_refused_and_the_keyring_is_untouched() {
    let dir = Scratch::new("rekey-wrong");
    let ring = dir.write("keyring", DEMO_KEYRING);
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::read(&ring).unwrap();
    let emu = Emulator::start(&["--unix", dir.path("key.sock").to_str().unwrap()]);
    // A valid master key (right check digit), but not this key's.
    let other = "exNhxZ9hBSvVk7vFKV8HpwZSt4F64fo2gLd/qUEgZSMH";
    let out = rekey_key(&emu.path, other, &ring, &dir.path("no-daemon"), &[]);
    assert!(!out.status.success());
    assert!(text(&out).contains("master key is wrong"), "{}", text(&out));
    assert_eq!(std::fs::read(&ring).unwrap(), before, "keyring changed");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // The key still works with its old long-term key.
    let r = read(100, &emu.path, &ring, &dir.path("out.bin"));
    assert!(r.status.success(), "{}", text(&r));
}

#[test]
fn mistyped_master_key_is_refused_before_any_traffic() {
    let dir = Scratch::new("rekey-typo");
    let ring = dir.write("keyring", DEMO_KEYRING);
    // One character changed; the device path does not even exist, so any
    // attempt to talk to a key would fail differently.
    let out = rekey(&[
        "--device",
        dir.path("no-such-key").to_str().unwrap(),
        "--master-key",
        "TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU1N TU2t",
        "--keyring",
        ring.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("typing error"), "{t}");
    assert!(!t.contains("No such file"), "{t}");
    assert_eq!(std::fs::read_to_string(&ring).unwrap(), DEMO_KEYRING);
}

#[test]
fn a_running_daemon_lets_go_of_the_key_and_takes_it_back_rekeyed() {
    let dir = Scratch::new("rekey-daemon");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "20000",
    ]);
    let out_file = dir.path("out.bin");
    let daemon = Daemon::for_key(
        &dir,
        &emu.path,
        &ring,
        &["--output", out_file.to_str().unwrap()],
    );
    let running = |d: &Daemon| d.status()["keys"][0]["running"] == true;
    assert!(wait_for(10, || running(&daemon)));
    let out = rekey_key(&emu.path, DEMO_MASTER, &ring, &daemon.control, &[]);
    assert!(out.status.success(), "{}", text(&out));
    // The daemon took the key back and keys it with the new long-term key.
    assert!(wait_for(10, || {
        let s = daemon.status();
        s["keys"][0]["running"] == true && s["keys"][0]["connects"] == 2
    }));
    let before = blocks(&out_file).len();
    assert!(wait_for(10, || blocks(&out_file).len() > before + 50));
    assert!(!std::fs::read_to_string(&ring).unwrap().contains("Xl5eXl5e"));
}

fn keyring_cmd(args: &[&str]) -> std::process::Output {
    Command::new(ekey_host())
        .arg("keyring")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn keyring_check_list_and_remove() {
    let dir = Scratch::new("keyring-cmd");
    let good = dir.write(
        "good",
        "# keys\nRW11bGF0ZWRLZXkx Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\nQUFBQUFBQUFBQUFB Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\n",
    );
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = keyring_cmd(&["check", "--keyring", good.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("2 keys"));
    assert!(
        text(&out).contains("chmod 600"),
        "loose mode is flagged: {}",
        text(&out)
    );

    let bad = dir.write("bad", "# keys\nRW11bGF0ZWRLZXkx not-a-key\n\nQUFBQUFB\n");
    let out = keyring_cmd(&["check", "--keyring", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("line 2") && t.contains("line 4"), "{t}");

    let out = keyring_cmd(&["list", "--keyring", good.to_str().unwrap()]);
    assert!(out.status.success());
    let t = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(t.contains("RW11bGF0ZWRLZXkx") && t.contains("QUFBQUFBQUFBQUFB"));
    assert!(!t.contains("Xl5e"), "never the keys themselves");

    let out = keyring_cmd(&[
        "remove",
        "QUFBQUFBQUFBQUFB",
        "--keyring",
        good.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read_to_string(&good).unwrap(),
        "# keys\nRW11bGF0ZWRLZXkx Xl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl5eXl4=\n"
    );
    let mode = std::fs::metadata(&good).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let out = keyring_cmd(&[
        "remove",
        "QUFBQUFBQUFBQUFB",
        "--keyring",
        good.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
}

#[test]
fn ctrl_c_during_a_rekey_stops_it_and_leaves_the_keyring_alone() {
    use std::io::Write;
    use std::os::unix::net::UnixListener;
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let dir = Scratch::new("rekey-interrupted");
    let ring = dir.write("keyring", DEMO_KEYRING);
    std::fs::set_permissions(&ring, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::read(&ring).unwrap();
    // A "key" that takes the connection and never answers.
    let sock = dir.path("silent.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut child = Command::new(ekey_host())
        .arg("rekey")
        .args(["--device", sock.to_str().unwrap()])
        .args(["--master-key-file", "-"])
        .args(["--keyring", ring.to_str().unwrap()])
        .args(["--control", dir.path("no-daemon").to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{DEMO_MASTER}").unwrap();
    let (_conn, _) = listener.accept().unwrap();
    // Past the initial drain, while it waits for the key.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "rekey gave up too early"
    );
    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "took {:?}",
        sent.elapsed()
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("interrupted"), "{}", text(&out));
    assert_eq!(std::fs::read(&ring).unwrap(), before, "keyring changed");
    let mode = std::fs::metadata(&ring).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_release_ends_when_its_client_goes_even_with_outputs_backed_up() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;

    let dir = Scratch::new("release-held");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "100000",
    ]);
    // EGD with no client: the pool fills and the key's driver waits for
    // room, which must not stop it from letting go.
    let daemon = Daemon::for_key(&dir, &emu.path, &ring, &["--egd-tcp", "127.0.0.1:0"]);
    let egd_full = |d: &Daemon| {
        let s = d.status();
        s["keys"][0]["running"] == true
            && s["keys"][0]["accounting"]["to_egd"].as_u64().unwrap_or(0) >= 16 * 1024
    };
    assert!(wait_for(20, || egd_full(&daemon)), "{}", daemon.status());
    // Let the driver block on the full output.
    std::thread::sleep(std::time::Duration::from_millis(500));

    // A client (as `rekey` does) asks for the key and keeps the line open.
    let target = emu.path.to_str().unwrap();
    let mut conn = UnixStream::connect(&daemon.control).unwrap();
    writeln!(conn, "release {target}").unwrap();
    let mut answer = String::new();
    BufReader::new(&conn).read_line(&mut answer).unwrap();
    assert_eq!(answer.trim(), "ok: released");
    let connected = |d: &Daemon| d.status()["keys"][0]["connected"] == true;
    assert!(!connected(&daemon));
    // Still released a while later: the open connection holds it.
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(!connected(&daemon));

    // The client dies without a `resume`: the daemon takes the key back.
    drop(conn);
    assert!(
        wait_for(10, || {
            let s = daemon.status();
            s["keys"][0]["connected"] == true && s["keys"][0]["connects"] == 2
        }),
        "{}",
        daemon.status()
    );
}
