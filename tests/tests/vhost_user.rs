//! `run --vhost-user-rng` and `--vhost-user-rng-dir` (issue 16) from the
//! outside: the socket is made with `--egd-mode`, the guest is listed in
//! `status` and the metrics before any QEMU connects, the socket is removed
//! at exit, and bad options stop the daemon with a message naming them and
//! leave the files alone. A real QEMU guest reading through it is
//! `tests/vm`'s `vhost-user-rng` check.

mod support;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::process::Command;

use support::{Daemon, Scratch, ekey_host, get, samples, wait_for};

fn port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

#[test]
fn a_socket_is_served_listed_and_removed_at_exit() {
    let dir = Scratch::new("vhost-user-socket");
    let sock = dir.path("build1.sock");
    let metrics = format!("127.0.0.1:{}", port());
    let d = Daemon::start(
        &dir,
        &[
            "--emulate",
            "--keyring",
            dir.path("keyring").to_str().unwrap(),
            "--vhost-user-rng",
            sock.to_str().unwrap(),
            "--egd-mode",
            "660",
            "--metrics",
            &metrics,
        ],
    );
    let meta = std::fs::metadata(&sock).expect("the socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let st = d.status();
    let guests = st["vhost_user"]["guests"]
        .as_array()
        .expect("vhost_user.guests");
    assert_eq!(guests.len(), 1, "{st}");
    let g = &guests[0];
    assert_eq!(g["name"], "build1");
    assert_eq!(g["socket"], sock.to_str().unwrap());
    assert_eq!(g["role"], "listen");
    assert_eq!(g["connected"], false);
    assert_eq!(g["bytes_served"], 0);

    let text = Command::new(ekey_host())
        .args(["status", "--control"])
        .arg(&d.control)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("vhost-user-rng: 0 of 1 guest connected"),
        "{text}"
    );

    let mut m = Default::default();
    assert!(wait_for(10, || {
        m = samples(&get(&metrics, "/metrics").2);
        m.contains_key("ekey_vhost_user_connected{name=\"build1\"}")
    }));
    assert_eq!(m["ekey_vhost_user_connected{name=\"build1\"}"], 0.0);
    assert_eq!(
        m["ekey_vhost_user_served_bytes_total{name=\"build1\"}"],
        0.0
    );

    assert!(d.terminate(), "clean exit");
    assert!(!sock.exists(), "socket removed at exit");
}

fn refused(dir: &Scratch, args: &[&str]) -> String {
    let out = Command::new(ekey_host())
        .arg("run")
        .arg("--emulate")
        .arg("--keyring")
        .arg(dir.path("keyring"))
        .arg("--control")
        .arg(dir.path("control"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_vhost_user_options_are_refused_with_their_names_and_nothing_lost() {
    let dir = Scratch::new("vhost-user-bad");
    // A file that is not a socket is never replaced.
    let file = dir.write("notes.sock", "keep me\n");
    let err = refused(&dir, &["--vhost-user-rng", file.to_str().unwrap()]);
    assert!(
        err.contains("--vhost-user-rng") && err.contains("notes.sock"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me\n");

    // Two guests of the same name.
    std::fs::create_dir_all(dir.path("a")).unwrap();
    std::fs::create_dir_all(dir.path("b")).unwrap();
    let (a, b) = (dir.path("a/vm.sock"), dir.path("b/vm.sock"));
    let err = refused(
        &dir,
        &[
            "--vhost-user-rng",
            a.to_str().unwrap(),
            "--vhost-user-rng",
            b.to_str().unwrap(),
        ],
    );
    assert!(err.contains("two sockets named \"vm\""), "{err}");
    assert!(!a.exists() && !b.exists());

    // A folder that is not there.
    let err = refused(
        &dir,
        &[
            "--vhost-user-rng-dir",
            dir.path("nowhere").to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("--vhost-user-rng-dir") && err.contains("nowhere"),
        "{err}"
    );

    // A mode that is not octal.
    let err = refused(
        &dir,
        &[
            "--vhost-user-rng",
            dir.path("g.sock").to_str().unwrap(),
            "--egd-mode",
            "rw",
        ],
    );
    assert!(err.contains("--egd-mode rw"), "{err}");
    assert!(!dir.path("g.sock").exists());
}
