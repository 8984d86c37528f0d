//! The long-term re-key procedure against the software key.

mod common;

use common::{SERIAL, ltk};
use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::keys::{MasterKey, Serial};
use ekey_proto::rekey::{LongTermRekey, Refusal, RekeyConfig, RekeyOutcome, RekeyStep};
use ekey_proto::time::Instant;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

const MASTER: [u8; 32] = [0x4d; 32];

fn device(master: Option<[u8; 32]>) -> Device {
    let mut cfg = DeviceConfig::new(SERIAL, ltk());
    cfg.master_key = master.map(MasterKey::from_bytes);
    Device::new(cfg)
}

fn exchange(dev: &mut Device, master: [u8; 32], config: RekeyConfig) -> RekeyOutcome {
    exchange_with(dev, master, config, |_, _| {})
}

/// Runs a long-term re-key against `dev`; `on_command` sees every command
/// before the key does (to inject faults).
fn exchange_with(
    dev: &mut Device,
    master: [u8; 32],
    config: RekeyConfig,
    mut on_command: impl FnMut(&[u8], &mut Device),
) -> RekeyOutcome {
    let mut noise = ChaCha20Rng::seed_from_u64(5);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let mut now = Instant::ZERO;
    let mut r = LongTermRekey::new(config, MasterKey::from_bytes(master), now, &mut rng).unwrap();
    for _ in 0..10_000 {
        now = Instant::from_millis(now.millis() + 11);
        while let Some(t) = r.poll_transmit() {
            on_command(&t, dev);
            dev.handle_input(&t, &mut noise);
        }
        if let Some(o) = dev.poll(&mut noise) {
            let mut input: &[u8] = &o.bytes;
            while !input.is_empty() {
                let n = r.handle_input(now, input);
                input = &input[n..];
            }
        }
        r.handle_timeout(now);
        if let Some(outcome) = r.take_outcome() {
            assert_eq!(r.step(), RekeyStep::Finished);
            return outcome;
        }
    }
    panic!("re-key never finished");
}

#[test]
fn right_master_key_sets_the_same_long_term_key_on_both_sides() {
    let mut dev = device(Some(MASTER));
    let before = dev.long_term_key().clone();
    match exchange(&mut dev, MASTER, RekeyConfig::default()) {
        RekeyOutcome::Done { serial, key } => {
            assert_eq!(serial, SERIAL);
            assert!(key.ct_eq(dev.long_term_key()));
            assert!(!key.ct_eq(&before));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(dev.stats().long_term_rekeys, 1);
}

#[test]
fn wrong_master_key_is_refused_and_key_unchanged() {
    let mut dev = device(Some(MASTER));
    let before = dev.long_term_key().clone();
    match exchange(&mut dev, [0x01; 32], RekeyConfig::default()) {
        RekeyOutcome::Refused { refusal, text, .. } => {
            assert_eq!(refusal, Refusal::WrongMasterKey, "{text}");
        }
        other => panic!("{other:?}"),
    }
    assert!(dev.long_term_key().ct_eq(&before));
}

#[test]
fn repeated_wrong_master_keys_lock_the_key_out() {
    let mut dev = device(Some(MASTER));
    for _ in 0..3 {
        match exchange(&mut dev, [0x01; 32], RekeyConfig::default()) {
            RekeyOutcome::Refused { refusal, .. } => assert_eq!(refusal, Refusal::WrongMasterKey),
            other => panic!("{other:?}"),
        }
    }
    // Even the right key is refused now: locked.
    match exchange(&mut dev, MASTER, RekeyConfig::default()) {
        RekeyOutcome::Refused { refusal, .. } => assert_eq!(refusal, Refusal::LockedOut),
        other => panic!("{other:?}"),
    }
}

#[test]
fn wrong_serial_is_reported() {
    let mut dev = device(Some(MASTER));
    let cfg = RekeyConfig {
        expected_serial: Some(Serial([1; 12])),
        ..RekeyConfig::default()
    };
    assert!(matches!(
        exchange(&mut dev, MASTER, cfg),
        RekeyOutcome::WrongSerial { found, .. } if found == SERIAL
    ));
}

#[test]
fn silent_key_times_out_after_retries() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let cfg = RekeyConfig::default();
    let mut r =
        LongTermRekey::new(cfg, MasterKey::from_bytes(MASTER), Instant::ZERO, &mut rng).unwrap();
    let mut resets = 0;
    while r.outcome().is_none() {
        if let Some(t) = r.poll_transmit() {
            assert_eq!(&t[..], &[0x03]);
            resets += 1;
        }
        let now = r.poll_timeout().unwrap();
        r.handle_timeout(now);
    }
    assert_eq!(resets, 4, "one try and three retries");
    assert!(matches!(
        r.outcome(),
        Some(RekeyOutcome::TimedOut {
            step: RekeyStep::Resetting,
            key_may_have_changed: false
        })
    ));
}

#[test]
fn lost_long_term_reply_says_the_key_may_have_changed() {
    // The key takes the new long-term key, but its L! never verifies.
    let mut dev = device(Some(MASTER));
    let before = dev.long_term_key().clone();
    let cfg = RekeyConfig {
        retries: 0,
        ..RekeyConfig::default()
    };
    let outcome = exchange_with(&mut dev, MASTER, cfg, |cmd, dev| {
        if cmd.first() == Some(&b'L') {
            dev.faults_mut().corrupt_macs = 1;
        }
    });
    assert!(matches!(
        outcome,
        RekeyOutcome::TimedOut {
            step: RekeyStep::Rekeying,
            key_may_have_changed: true
        }
    ));
    assert!(!dev.long_term_key().ct_eq(&before), "the key did change");
}
