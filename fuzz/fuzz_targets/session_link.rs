//! The host Session against the software key, with the fuzzer as the link:
//! it chooses when the key speaks, which bytes are flipped, dropped or
//! inserted, how input is chunked, how time passes and which faults the key
//! injects. Reaches the keyed states that raw bytes cannot.
//!
//! Checks: no panic; every released block is one the key sent with an
//! intact MAC, in order, never twice.
#![no_main]

use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use ekey_proto::wire::info::FailureMode;
use libfuzzer_sys::fuzz_target;

use ekey_fuzz::Xs;

fuzz_target!(|ops: &[u8]| {
    let serial = Serial([3; 12]);
    let ltk = LongTermKey::from_bytes([4; 32]);
    let mut dev = Device::new(DeviceConfig::new(serial, ltk.clone()));
    let keyring = move |s: &Serial| (*s == serial).then(|| ltk.clone());
    let mut noise = Xs(0x1234_5678);
    let mut nonces = Xs(0x9abc_def0);
    let mut now = Instant::ZERO;
    let mut s = Session::new(Config::default(), now);
    let mut authentic: Vec<[u8; 32]> = Vec::new();
    let mut cursor = 0usize; // released blocks must appear in `authentic` from here on
    let mut it = ops.iter().copied();
    while let Some(op) = it.next() {
        let arg = it.next().unwrap_or(0);
        now = Instant::from_millis(now.millis() + 11);
        while let Some(t) = s.poll_transmit() {
            dev.handle_input(&t, &mut noise);
        }
        let mut bytes: Vec<u8> = Vec::new();
        match op % 8 {
            0..=3 => {
                // The key speaks, delivered whole or with one mutation.
                if let Some(o) = dev.poll(&mut noise) {
                    if let Some(b) = o.entropy
                        && b.authentic
                    {
                        authentic.push(b.data);
                    }
                    bytes.extend_from_slice(&o.bytes);
                    let at = usize::from(arg) % bytes.len().max(1);
                    match op % 4 {
                        1 if !bytes.is_empty() => bytes[at] ^= 1 << (arg % 8),
                        2 if !bytes.is_empty() => {
                            bytes.remove(at);
                        }
                        3 => bytes.insert(at.min(bytes.len()), arg),
                        _ => {}
                    }
                }
            }
            4 => dev.faults_mut().corrupt_macs += 1,
            5 => dev.faults_mut().replay_next = true,
            6 => match arg % 4 {
                0 => dev.faults_mut().garbage += usize::from(arg),
                1 => dev.faults_mut().bad_generators_on_rekey = true,
                2 => dev.handle_input(&[arg], &mut noise),
                _ if arg == 3 => dev.faults_mut().failure_mode = Some(FailureMode::FipsRate),
                _ => {}
            },
            _ => now = Instant::from_millis(now.millis() + u64::from(arg) * 100),
        }
        let chunk = usize::from(arg % 70) + 1;
        for piece in bytes.chunks(chunk) {
            let mut input = piece;
            while !input.is_empty() {
                let n = s.handle_input(now, input, &keyring, &mut nonces);
                input = &input[n..];
                while let Some(ev) = s.poll_event() {
                    if let Event::Entropy { data, .. } = ev {
                        let pos = authentic[cursor..].iter().position(|b| *b == data).expect(
                            "released a block the key did not send authentically, or out of order",
                        );
                        cursor += pos + 1;
                    }
                }
            }
        }
        s.handle_timeout(now);
    }
});
