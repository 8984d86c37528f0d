//! The daemon's outputs for a KVM host: EGD clients (as QEMU's rng-egd
//! talks) and the kernel pool.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::{DEMO_KEYRING, Daemon, Emulator, Scratch, wait_for};

fn port() -> u16 {
    // A free port on loopback (the kernel's choice), released for the daemon.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Whether `got` is made of pieces of `record`. The EGD server hands out
/// bytes in round-robin chunks, so a client's bytes are runs cut from the
/// key's stream; a run can be a few bytes long at a chunk boundary. Each
/// step takes the longest prefix of the rest found in the record; bytes the
/// key never sent would only match in pieces of a byte or two (an 8-byte
/// random match in this record has odds of about 1e-14), so at least 90 % of
/// the bytes must lie in pieces of 8 bytes or more.
fn traceable(got: &[u8], record: &[u8]) -> bool {
    let mut rest = got;
    let mut in_long_pieces = 0;
    while !rest.is_empty() {
        let best = (1..=rest.len().min(255))
            .rev()
            .find(|&len| record.windows(len).any(|w| w == &rest[..len]));
        let Some(best) = best else { return false };
        if best >= 8 {
            in_long_pieces += best;
        }
        rest = &rest[best..];
    }
    in_long_pieces * 10 >= got.len() * 9
}

#[test]
fn qemu_style_egd_clients_get_exactly_what_they_ask_for_from_the_key() {
    let dir = Scratch::new("egd");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let record = dir.path("record.bin");
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--record",
        record.to_str().unwrap(),
        "--rate",
        "40000",
    ]);
    let addr = format!("127.0.0.1:{}", port());
    let daemon = Daemon::for_key(&dir, &emu.path, &ring, &["--egd-tcp", &addr]);
    assert!(wait_for(10, || daemon.status()["keys"][0]["running"] == true));
    // Eight QEMU-style clients: 0x02 64, four requests in flight each.
    let mut clients: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(&addr).unwrap()).collect();
    for c in &mut clients {
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(&[2, 64, 2, 64, 2, 64, 2, 64]).unwrap();
    }
    let mut got = Vec::new();
    for c in &mut clients {
        let mut buf = vec![0u8; 256];
        c.read_exact(&mut buf).unwrap();
        got.push(buf);
    }
    // Status counts the clients and the bytes.
    let s = daemon.status();
    assert_eq!(s["egd"]["total_clients"], 8);
    assert!(s["egd"]["total_served"].as_u64().unwrap() >= 8 * 256);
    // Per key (one key here): what clients got of its bytes.
    assert_eq!(
        s["keys"][0]["accounting"]["egd_served"],
        s["egd"]["total_served"]
    );
    drop(clients);
    emu.stop();
    let record = std::fs::read(&record).unwrap();
    let mut all = Vec::new();
    for g in &got {
        assert!(
            traceable(g, &record),
            "a client got bytes the key never sent"
        );
        all.extend_from_slice(g);
    }
    // No 32-byte window was served twice.
    let mut seen = std::collections::HashSet::new();
    for w in all.chunks(16) {
        assert!(seen.insert(w.to_vec()), "bytes served twice");
    }
}

#[test]
fn kernel_output_credits_the_configured_bits() {
    if !support::is_root() {
        eprintln!("skipped: feeding the kernel needs root");
        return;
    }
    let dir = Scratch::new("kernel");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "40000",
    ]);
    let t0 = std::time::Instant::now();
    let daemon = Daemon::for_key(
        &dir,
        &emu.path,
        &ring,
        &[
            "--kernel=6",
            "--kernel-interval",
            "1",
            "--kernel-reseed-interval",
            "2",
        ],
    );
    let ok = wait_for(15, || {
        let k = &daemon.status()["kernel"];
        k["bytes_written"].as_u64().unwrap_or(0) >= 128
    });
    let s = daemon.status();
    let k = &s["kernel"];
    if !ok
        && std::fs::read_to_string(dir.path("daemon.log"))
            .unwrap_or_default()
            .contains("CAP_SYS_ADMIN")
    {
        eprintln!("skipped: root without CAP_SYS_ADMIN here");
        return;
    }
    assert!(ok, "kernel counters did not move: {s}");
    assert_eq!(k["ioctl_failures"], 0);
    // 6 bits for every byte written, no more.
    assert_eq!(
        k["bits_credited"].as_u64().unwrap(),
        6 * k["bytes_written"].as_u64().unwrap()
    );
    // Per key (one key here): the same bytes and bits, and never more than
    // the key handed the kernel output.
    let a = &s["keys"][0]["accounting"];
    assert_eq!(a["kernel_accepted"], k["bytes_written"]);
    assert_eq!(a["kernel_bits_credited"], k["bits_credited"]);
    assert!(a["kernel_accepted"].as_u64().unwrap() <= a["to_kernel"].as_u64().unwrap());
    // This machine's CRNG is ready: mixes every second are followed by
    // reseeds (RNDRESEEDCRNG), at most one every 2 s.
    assert!(
        wait_for(15, || daemon.status()["kernel"]["reseeds"].as_u64()
            >= Some(2)),
        "{}",
        daemon.status()
    );
    let k = daemon.status()["kernel"].clone();
    let secs = t0.elapsed().as_secs();
    assert_eq!(k["reseed_failures"], 0, "{k}");
    let reseeds = k["reseeds"].as_u64().unwrap();
    assert!(reseeds <= 1 + secs / 2, "{reseeds} reseeds in {secs} s");
    assert!(k["bytes_written"].as_u64().unwrap() >= 64 * reseeds, "{k}");
}

#[test]
fn an_existing_output_file_is_made_private_before_entropy_goes_in() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("output-mode");
    let out = dir.write("out.bin", "old contents\n");
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o644)).unwrap();
    let run = std::process::Command::new(support::ekey_host())
        .args(["read", "-n", "64", "--emulate", "-o"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let meta = std::fs::metadata(&out).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 64);
}
