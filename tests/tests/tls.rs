//! EGD over TLS through the binaries (issue 15): `run --egd-tls` refuses a
//! key file others may read, serves `feed --egd tls://` with a certificate
//! from the client CA and nobody else, and swaps its certificate on SIGHUP
//! while connected clients stay.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use support::{Daemon, Scratch, ekey_host, get, samples, wait_for};

type Ca = CertifiedIssuer<'static, KeyPair>;

fn ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// Writes `NAME-cert.pem` and `NAME-key.pem` (mode `key_mode`): a server
/// certificate for 127.0.0.1, or a client's; returns their paths.
fn issue(dir: &Scratch, ca: &Ca, name: &str, server: bool, key_mode: u32) -> (PathBuf, PathBuf) {
    let names = if server {
        vec!["127.0.0.1".to_string()]
    } else {
        Vec::new()
    };
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![if server {
        ExtendedKeyUsagePurpose::ServerAuth
    } else {
        ExtendedKeyUsagePurpose::ClientAuth
    }];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    let cert_path = dir.write(&format!("{name}-cert.pem"), &cert.pem());
    let key_path = dir.write(&format!("{name}-key.pem"), &key.serialize_pem());
    std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(key_mode)).unwrap();
    (cert_path, key_path)
}

fn port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `ekey-host feed --egd tls://ADDR` with a client's files, discarding
/// what it gets; its log in `log`.
fn feed(addr: &str, ca: &Path, client: &(PathBuf, PathBuf), extra: &[&str], log: &Path) -> Kid {
    Command::new(ekey_host())
        .args(["feed", "--egd", &format!("tls://{addr}"), "--test-discard"])
        .args([
            "--tls-ca",
            s(ca),
            "--tls-cert",
            s(&client.0),
            "--tls-key",
            s(&client.1),
        ])
        .args(["--retry-min", "100ms", "--retry-max", "200ms"])
        .args(["--interval", "20ms", "--bytes-per-interval", "1024"])
        .args(extra)
        .env_remove("EKEY_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
        .spawn()
        .map(Kid)
        .expect("start ekey-host feed")
}

/// A `feed` process, killed on drop (so a failed assertion leaves none).
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(kid: &mut Kid, secs: u64) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_for(secs, || {
        status = kid.0.try_wait().unwrap();
        status.is_some()
    });
    status
}

#[test]
fn a_key_file_others_may_read_stops_the_daemon_at_once() {
    let dir = Scratch::new("tls-key-mode");
    let ca = ca("Test CA");
    let ca_path = dir.write("ca.pem", &ca.pem());
    let (cert, key) = issue(&dir, &ca, "server", true, 0o644);
    let out = Command::new(ekey_host())
        .args(["run", "--emulate", "--egd-tls", "127.0.0.1:0"])
        .args([
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca_path),
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--tls-key {}", key.display()))
            && err.contains("readable by group and others")
            && err.contains("chmod 600"),
        "{err}"
    );
    // clap insists on all three files.
    let out = Command::new(ekey_host())
        .args([
            "run",
            "--emulate",
            "--egd-tls",
            "7777",
            "--tls-cert",
            s(&cert),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--tls-key"), "{err}");
}

#[test]
fn feed_over_tls_is_served_strangers_are_refused_and_sighup_swaps_the_certificate() {
    let dir = Scratch::new("tls-e2e");
    let (ca1, ca2) = (ca("Test CA"), ca("New CA"));
    let ca1_path = dir.write("ca1.pem", &ca1.pem());
    let ca2_path = dir.write("ca2.pem", &ca2.pem());
    let (cert, key) = issue(&dir, &ca1, "server", true, 0o600);
    let addr = format!("127.0.0.1:{}", port());
    let metrics = format!("127.0.0.1:{}", port());
    let daemon = Daemon::start(
        &dir,
        &[
            "--emulate",
            "--rate",
            "64000",
            "--metrics",
            &metrics,
            "--egd-tls",
            &addr,
            "--tls-cert",
            s(&cert),
            "--tls-key",
            s(&key),
            "--tls-client-ca",
            s(&ca1_path),
        ],
    );
    let guest = issue(&dir, &ca1, "guest1", false, 0o600);

    // A feeder with a good certificate gets its bytes and exits.
    let mut one = feed(
        &addr,
        &ca1_path,
        &guest,
        &["--max-bytes", "2048"],
        &dir.path("one.log"),
    );
    let status = wait_exit(&mut one, 30);
    let log = std::fs::read_to_string(dir.path("one.log")).unwrap();
    assert!(status.is_some_and(|s| s.success()), "{log}");
    assert!(log.contains(&format!("connected to tls {addr}")), "{log}");

    // One with a certificate of another CA gets nothing; the daemon counts it.
    let stranger = issue(&dir, &ca2, "stranger", false, 0o600);
    let two = feed(&addr, &ca1_path, &stranger, &[], &dir.path("two.log"));
    assert!(
        wait_for(15, || daemon.status()["egd"]["tls_handshake_failures"]
            .as_u64()
            >= Some(1)),
        "{}",
        daemon.status()
    );
    drop(two);
    let egd = &daemon.status()["egd"];
    assert!(
        egd["tls_last_failure"]
            .as_str()
            .unwrap()
            .contains("UnknownIssuer"),
        "{egd}"
    );
    assert_eq!(egd["total_clients"], 1, "{egd}");

    // A long-running feeder, then a new server certificate from another CA.
    let mut stay = feed(&addr, &ca1_path, &guest, &[], &dir.path("stay.log"));
    assert!(wait_for(
        15,
        || daemon.status()["egd"]["clients"][0]["bytes_served"].as_u64() > Some(0)
    ));
    let client = daemon.status()["egd"]["clients"][0].clone();
    assert_eq!(client["subject"], "CN=guest1", "{client}");
    assert_eq!(client["listener"], "tls", "{client}");
    // Metrics: the client by name, the refusal by reason.
    let m = samples(&get(&metrics, "/metrics").2);
    let series = |name: &str, label: &str| {
        m.iter()
            .find(|(k, _)| k.split('{').next() == Some(name) && k.contains(label))
            .map(|(_, v)| *v)
    };
    let served = series("ekey_egd_client_served_bytes_total", "name=\"CN=guest1\"");
    assert!(served > Some(0.0), "{m:?}");
    let failed = series("ekey_egd_tls_failed_handshakes_total", "reason=\"error\"");
    assert!(failed >= Some(1.0), "{m:?}");
    let (new_cert, new_key) = issue(&dir, &ca2, "server2", true, 0o600);
    std::fs::rename(&new_cert, &cert).unwrap();
    std::fs::rename(&new_key, &key).unwrap();
    let pid = daemon.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let dlog = || std::fs::read_to_string(dir.path("daemon.log")).unwrap_or_default();
    assert!(
        wait_for(10, || dlog().contains("TLS files reloaded")),
        "{}",
        dlog()
    );
    // New connections see the new certificate: a feeder trusting only the
    // new CA now gets in, one trusting only the old CA no longer does.
    let mut three = feed(
        &addr,
        &ca2_path,
        &guest,
        &["--max-bytes", "1024"],
        &dir.path("three.log"),
    );
    let status = wait_exit(&mut three, 30);
    assert!(
        status.is_some_and(|s| s.success()),
        "{}",
        std::fs::read_to_string(dir.path("three.log")).unwrap()
    );
    let mut four = feed(
        &addr,
        &ca1_path,
        &guest,
        &["--max-bytes", "1024"],
        &dir.path("four.log"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        four.0.try_wait().unwrap().is_none(),
        "the old CA's feeder was served"
    );
    drop(four);
    let four_log = std::fs::read_to_string(dir.path("four.log")).unwrap();
    assert!(four_log.contains("cannot connect"), "{four_log}");
    // The feeder connected before the reload is still the same client.
    let clients = daemon.status()["egd"]["clients"].clone();
    assert!(
        clients
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == client["id"]),
        "{clients}"
    );
    assert!(stay.0.try_wait().unwrap().is_none());
    drop(stay);
    assert!(daemon.terminate());
}
