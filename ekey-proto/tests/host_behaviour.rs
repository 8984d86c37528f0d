//! The host `Session`'s policies, each driven against the software key.

mod common;

use common::{Pair, SERIAL, ltk};
use ekey_proto::device::DeviceConfig;
use ekey_proto::host::{Config, Event, Fault, Reason, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use ekey_proto::wire::info::FailureMode;

fn reasons(p: &Pair) -> Vec<(State, Reason)> {
    p.events
        .iter()
        .filter_map(|e| match e {
            Event::StateChanged { state, reason } => Some((*state, *reason)),
            _ => None,
        })
        .collect()
}

#[test]
fn keys_and_runs_with_the_right_long_term_key() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(50, |p| p.session.state() == State::Running));
    p.run(200);
    assert!(!p.released.is_empty());
    let authentic: Vec<_> = p.sent.iter().map(|s| s.data).collect();
    assert_eq!(p.released[..], authentic[..p.released.len()]);
    let info = p.session.info();
    assert_eq!(info.temperature.unwrap().deci_kelvin, 3150);
    assert_eq!(info.voltage.unwrap().millivolts, 3254);
    assert!(info.shannon.unwrap().failure.is_ok());
    assert_eq!(p.session.serial(), Some(SERIAL));
}

#[test]
fn no_long_term_key_means_no_entropy_and_says_why() {
    let mut p = Pair::new(Config::default());
    p.keyring = None;
    p.run(300);
    assert_eq!(p.session.state(), State::NoLongTermKey);
    assert_eq!(p.session.state().to_string(), "no long-term key in keyring");
    assert!(p.released.is_empty());
    assert!(p.sent.is_empty(), "the key was never keyed");
}

#[test]
fn wrong_long_term_key_is_rejected_then_retried_with_backoff() {
    let mut p = Pair::new(Config::default());
    p.keyring = Some(LongTermKey::from_bytes([0x99; 32]));
    assert!(p.run_until(100, |p| p.session.state() == State::LongTermKeyRejected));
    assert_eq!(p.session.state().to_string(), "long-term key rejected");
    assert!(p.released.is_empty());
    let first = p.now;
    // Retried after the back-off (5 s), rejected again, and the wait doubles.
    assert!(p.run_until(2000, |p| p.session.counters().long_term_key_rejections >= 2));
    let second = p.now;
    assert!(second.saturating_duration_since(first).as_millis() >= 5000);
    assert!(p.run_until(3000, |p| p.session.counters().long_term_key_rejections >= 3));
    assert!(p.now.saturating_duration_since(second).as_millis() >= 10_000);
    assert!(p.released.is_empty());
    // The keyring gets fixed, the caller resets: entropy flows.
    p.keyring = Some(ltk());
    p.session.reset(p.now);
    assert!(p.run_until(100, |p| !p.released.is_empty()));
}

#[test]
fn failure_mode_stops_entropy_with_a_named_reason() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| !p.released.is_empty()));
    p.device.faults_mut().failure_mode = Some(FailureMode::Correlated);
    assert!(p.run_until(50, |p| matches!(p.session.state(), State::Failed(_))));
    assert_eq!(
        p.session.state().to_string(),
        "failure: generators correlated"
    );
    let released = p.released.len();
    p.run(500);
    assert_eq!(p.released.len(), released);
    assert!(reasons(&p).contains(&(
        State::Failed(FailureMode::Correlated),
        Reason::FailureMode(FailureMode::Correlated)
    )));
}

#[test]
fn replayed_frame_is_dropped_and_counted() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.released.len() >= 5));
    p.device.faults_mut().replay_next = true;
    p.run(20);
    assert_eq!(p.session.counters().replays, 1);
    assert!(
        p.events
            .iter()
            .any(|e| matches!(e, Event::Fault(Fault::Replay { .. })))
    );
    let sent: Vec<_> = p.sent.iter().map(|s| s.data).collect();
    assert_eq!(p.released[..], sent[..p.released.len()]);
}

#[test]
fn single_bad_mac_is_dropped_persistent_ones_reset() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.released.len() >= 5));
    let resets = p.session.counters().resets;
    p.device.faults_mut().corrupt_macs = 1;
    p.run(20);
    assert_eq!(p.session.counters().bad_macs, 1);
    assert_eq!(
        p.session.counters().resets,
        resets,
        "one bad frame is no reason to reset"
    );
    assert_eq!(p.session.state(), State::Running);
    p.device.faults_mut().corrupt_macs = 3;
    p.run(20);
    assert_eq!(p.session.counters().resets, resets + 1);
    assert!(reasons(&p).contains(&(State::Resetting, Reason::PersistentBadMacs)));
    assert!(p.run_until(100, |p| p.session.state() == State::Running));
    // No corrupted block was released.
    for s in p.sent.iter().filter(|s| !s.authentic) {
        assert!(!p.released.contains(&s.data));
    }
}

#[test]
fn silent_key_is_reset_again_and_reported_unresponsive() {
    let mut p = Pair::new(Config::default());
    p.connected = false;
    p.run(2000); // 22 s
    let c = p.session.counters();
    assert!(c.reset_timeouts >= 3, "{c:?}");
    assert!(
        p.events
            .iter()
            .any(|e| matches!(e, Event::Unresponsive { attempts } if *attempts >= 3))
    );
    // Back-off: far fewer resets than 22 s / 2 s.
    assert!(c.resets < 8, "{c:?}");
    p.connected = true;
    assert!(p.run_until(4000, |p| p.session.state() == State::Running));
}

#[test]
fn lost_rekey_reply_times_out_and_recovers() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.session.state() == State::Rekeying));
    // The K never reaches the key.
    let _ = p.session.poll_transmit();
    p.connected = false;
    p.run(300); // > 3 s
    assert!(p.session.counters().rekey_timeouts >= 1);
    p.connected = true;
    assert!(p.run_until(2000, |p| !p.released.is_empty()));
}

#[test]
fn rekeys_at_sequence_4095_without_waiting() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(6000, |p| p.session.counters().rekeys >= 2));
    assert!(reasons(&p).contains(&(State::Rekeying, Reason::SequenceExhausted)));
    assert!(p.released.len() >= 4096);
    let sent: Vec<_> = p.sent.iter().map(|s| s.data).collect();
    assert_eq!(p.released[..], sent[..p.released.len()]);
}

#[test]
fn wrong_serial_is_refused() {
    let cfg = Config {
        expected_serial: Some(Serial([0x77; 12])),
        ..Config::default()
    };
    let mut p = Pair::new(cfg);
    p.run(100);
    assert_eq!(p.session.state(), State::WrongSerial);
    assert!(p.released.is_empty());
}

#[test]
fn nonce_length_mismatch_resets() {
    // A K! reporting 3 nonce bytes where the host sent 12.
    let mut p = Pair::with_device(Config::default(), DeviceConfig::new(SERIAL, ltk()));
    assert!(p.run_until(100, |p| p.session.state() == State::Rekeying));
    let _ = p.session.poll_transmit();
    // Let the key see a 3-byte nonce instead of the host's 12.
    p.device.handle_input(b"KAAAA.", &mut p.noise);
    p.run(3);
    assert!(reasons(&p).contains(&(
        State::Resetting,
        Reason::NonceLengthMismatch {
            sent: 12,
            received: 3
        }
    )));
}

#[test]
fn bad_generators_during_rekey_abandons_it() {
    let mut p = Pair::new(Config::default());
    p.device.faults_mut().bad_generators_on_rekey = true;
    p.run(100);
    assert!(
        p.events
            .iter()
            .any(|e| matches!(e, Event::Fault(Fault::BadGenerators(_))))
    );
    assert!(reasons(&p).contains(&(State::WaitingForRekeyRequest, Reason::BadGenerators)));
    // The key asks again and gets keyed.
    assert!(p.run_until(200, |p| !p.released.is_empty()));
}

#[test]
fn unknown_input_gives_a_warning_event() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.session.state() == State::Running));
    p.device.handle_input(b"e", &mut p.noise);
    p.run(5);
    let w = p.events.iter().find_map(|e| match e {
        Event::Fault(Fault::Warning(t)) => Some(t.to_string()),
        _ => None,
    });
    assert_eq!(w.as_deref(), Some("Unknown Input Character 0x65"));
    assert_eq!(p.session.counters().warnings, 1);
}

#[test]
fn timeouts_are_reported_through_poll_timeout() {
    let p = Pair::new(Config::default());
    // Right after start, the reset deadline is pending.
    assert_eq!(p.session.poll_timeout(), Some(Instant::from_millis(2000)));
}

#[test]
fn entropy_from_a_key_reporting_failure_is_never_released() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| !p.released.is_empty()));
    // A lying key: reports a failure mode but keeps sending entropy.
    p.device.faults_mut().keep_sending_when_failed = true;
    p.device.faults_mut().failure_mode = Some(FailureMode::LeftBiased);
    assert!(p.run_until(200, |p| matches!(p.session.state(), State::Failed(_))));
    let released = p.released.len();
    let sent = p.sent.len();
    p.run(500);
    assert!(p.sent.len() > sent + 300, "the key kept sending");
    assert_eq!(
        p.released.len(),
        released,
        "nothing released after the failure report"
    );
    assert!(p.session.counters().unexpected > 300);
}

#[test]
fn serial_frame_with_a_bad_mac_is_not_believed() {
    let mut p = Pair::new(Config::default());
    // A real key's S! (frames.json) with one MAC character changed.
    let mut frame = *b"* S!AANwBvBlg3OTBJORFD                                Al/Smw1b\r\n";
    frame[55] = b'X';
    p.feed(&frame);
    assert_eq!(p.session.state(), State::Resetting);
    assert_eq!(p.session.serial(), None);
    assert_eq!(p.session.counters().bad_macs, 1);
    frame[55] = b'l';
    p.feed(&frame);
    assert_eq!(p.session.serial().unwrap().to_string(), "NwBvBlg3OTBJORFD");
}

#[test]
fn unsolicited_session_rekey_reply_is_ignored_and_the_session_recovers() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.released.len() >= 3));
    // Someone else re-keys the key behind the host's back.
    p.device.handle_input(b"KAAAAAAAAAAAAAAAA.", &mut p.noise);
    assert!(p.run_until(200, |p| {
        reasons(p).contains(&(State::Resetting, Reason::PersistentBadMacs))
    }));
    assert!(
        p.session.counters().unexpected >= 1,
        "the K! was not the host's"
    );
    assert!(p.run_until(200, |p| p.session.state() == State::Running));
    let authentic: Vec<_> = p.sent.iter().map(|s| s.data).collect();
    let mut it = authentic.iter();
    assert!(
        p.released.iter().all(|b| it.any(|a| a == b)),
        "released only the key's blocks, in order"
    );
}

#[test]
fn key_that_keeps_asking_for_a_key_is_reset() {
    let mut p = Pair::new(Config::default());
    // Every re-key is abandoned (B>), so the key asks again and again
    // without ever sending entropy.
    let mut looped = false;
    for _ in 0..3000 {
        p.device.faults_mut().bad_generators_on_rekey = true;
        p.step();
        if reasons(&p).contains(&(State::Resetting, Reason::RekeyLoop)) {
            looped = true;
            break;
        }
    }
    assert!(looped);
    assert!(p.released.is_empty());
}

#[test]
fn rekey_requests_sent_before_the_key_saw_our_k_do_not_reset_it() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.session.state() == State::Rekeying));
    // The K is lost; meanwhile the key goes on asking (k> every 8 slots),
    // as a key does whose k> frames were queued before our K reached it.
    let _ = p.session.poll_transmit();
    p.drop_commands = true;
    p.run(200); // 2.2 s: below the 3 s re-key timeout, ~25 k> frames
    assert!(!reasons(&p).contains(&(State::Resetting, Reason::RekeyLoop)));
    assert_eq!(p.session.state(), State::Rekeying);
    // A lost K is what the re-key timeout is for.
    p.drop_commands = false;
    assert!(p.run_until(500, |p| {
        reasons(p).contains(&(State::Resetting, Reason::RekeyTimeout))
    }));
    assert!(p.run_until(500, |p| !p.released.is_empty()));
}

#[test]
fn key_that_goes_quiet_is_reset_after_the_idle_timeout() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.session.state() == State::Running));
    let t = p.now;
    p.connected = false;
    assert!(p.run_until(1200, |p| {
        reasons(p).contains(&(State::Resetting, Reason::Idle))
    }));
    assert!(p.now.saturating_duration_since(t).as_millis() >= 10_000);
}

#[test]
fn one_bad_frame_right_after_a_rekey_does_not_condemn_a_good_long_term_key() {
    let mut p = Pair::new(Config::default());
    assert!(p.run_until(100, |p| p.session.state() == State::Rekeying));
    // The K! is fine; the first frame under the new key is corrupted.
    p.run(1);
    p.device.faults_mut().corrupt_macs = 1;
    p.run(20);
    assert_eq!(p.session.counters().bad_macs, 1);
    assert_eq!(p.session.counters().long_term_key_rejections, 0);
    assert_eq!(p.session.state(), State::Running);
    assert!(!p.released.is_empty());
}

#[test]
fn a_malformed_info_item_does_not_hide_the_items_after_it() {
    let mut dev = DeviceConfig::new(SERIAL, ltk());
    dev.temperature = ekey_proto::wire::info::Temperature { deci_kelvin: 3682 };
    let mut p = Pair::with_device(Config::default(), dev);
    p.device.faults_mut().malformed_info_item = true;
    assert!(p.run_until(300, |p| p.session.info().voltage.is_some()));
    // `V0325x T03682 V03254`: the bad voltage is counted, once, and the
    // temperature and the good voltage after it are taken.
    assert_eq!(p.session.counters().malformed, 1);
    let faults = p
        .events
        .iter()
        .filter(|e| matches!(e, Event::Fault(Fault::Info(_))))
        .count();
    assert_eq!(faults, 1);
    assert_eq!(p.session.info().temperature.unwrap().deci_kelvin, 3682);
    assert_eq!(p.session.info().voltage.unwrap().millivolts, 3254);
}
