//! `ekey_host::rng::open`: the key as a `rand_core` RNG, against software
//! keys on a Unix socket and a pty.

mod support;

use ekey_proto::rng::Error;
use rand_core::TryRng;
use support::{DEMO_KEYRING, Emulator, Scratch};

#[test]
fn the_rng_yields_exactly_the_keys_stream() {
    let dir = Scratch::new("rng-socket");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let record = dir.path("record.bin");
    for transport in ["--unix", "--pty"] {
        let _ = std::fs::remove_file(&record);
        let sock = dir.path("key.sock");
        let mut args = vec![transport];
        if transport == "--unix" {
            args.push(sock.to_str().unwrap());
        }
        args.extend(["--record", record.to_str().unwrap(), "--rate", "100000"]);
        let emu = Emulator::start(&args);
        let mut key = ekey_host::rng::open(Some(&emu.path), &ring).unwrap();
        let mut got = vec![0u8; 5000];
        key.try_fill_bytes(&mut got[..7]).unwrap();
        key.try_fill_bytes(&mut got[7..]).unwrap();
        let word = key.try_next_u32().unwrap();
        drop(key);
        emu.stop();
        let sent = std::fs::read(&record).unwrap();
        assert_eq!(got, sent[..5000], "{transport}");
        assert_eq!(word.to_le_bytes(), sent[5000..5004], "{transport}");
    }
}

#[test]
fn a_wrong_long_term_key_is_an_error_not_bytes() {
    let dir = Scratch::new("rng-wrong");
    let ring = dir.write(
        "keyring",
        "RW11bGF0ZWRLZXkx ERERERERERERERERERERERERERERERERERERERERERE=\n",
    );
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "100000",
    ]);
    let mut key = ekey_host::rng::open(Some(&emu.path), &ring).unwrap();
    let mut buf = [0u8; 32];
    match key.try_fill_bytes(&mut buf) {
        Err(Error::LongTermKeyRejected) => {}
        other => panic!("expected LongTermKeyRejected, got {other:?}"),
    }
}

#[test]
fn a_key_with_stuck_noise_gives_a_closed_gate_not_bytes() {
    // The frames verify (the key is genuine); its noise does not pass.
    let dir = Scratch::new("rng-stuck");
    let ring = dir.write("keyring", DEMO_KEYRING);
    let emu = Emulator::start(&[
        "--unix",
        dir.path("key.sock").to_str().unwrap(),
        "--rate",
        "100000",
        "--fault-noise",
        "stuck",
    ]);
    let mut key = ekey_host::rng::open(Some(&emu.path), &ring)
        .unwrap()
        .with_timeout(std::time::Duration::from_secs(5));
    let mut buf = [0u8; 32];
    match key.try_fill_bytes(&mut buf) {
        Err(Error::GateClosed(reason)) => {
            assert!(!reason.to_string().is_empty());
        }
        other => panic!("expected GateClosed, got {other:?}"),
    }
    assert_eq!(buf, [0u8; 32]);
    let status = key.gate().status();
    assert!(!status.open);
    assert_eq!(status.counters.bytes_released, 0);
    assert!(status.counters.bytes_received > 0);
}
