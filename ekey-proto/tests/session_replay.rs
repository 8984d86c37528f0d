//! `vectors/session.json` replayed through the host `Session`: the host must
//! send exactly the bytes the reference daemon sent and release exactly the
//! expected entropy.

mod common;

use common::{ScriptedRng, hex, load};
use ekey_proto::host::{Config, Event, Fault, Session, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;

#[test]
fn session_json_replays_exactly() {
    let v = load("session.json");
    let serial = Serial(common::arr(&v["serial"]));
    assert_eq!(serial.to_string(), v["serial_pem"].as_str().unwrap());
    let ltk = LongTermKey::from_bytes(common::arr(&v["long_term_key"]));
    let keyring = move |s: &Serial| (*s == serial).then(|| ltk.clone());
    // The RNG supplies the 8 random tail bytes of each nonce.
    let mut rng = ScriptedRng(
        v["host_nonces"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| hex(n)[4..].to_vec())
            .collect(),
    );
    let mut now = Instant::from_millis(0);
    let mut session = Session::new(Config::default(), now);
    let mut released = Vec::new();
    let mut sent = Vec::new();
    let mut bad_macs = 0;
    for step in v["steps"].as_array().unwrap() {
        if let Some(expect) = step.get("host_sends") {
            // Everything the host sent since the previous step.
            while let Some(t) = session.poll_transmit() {
                sent.extend_from_slice(&t);
            }
            assert_eq!(
                hex::encode(&sent),
                expect.as_str().unwrap(),
                "host bytes at step: {}",
                step["note"]
            );
            sent.clear();
            continue;
        }
        let mut input: &[u8] = &hex(&step["device_sends"]);
        while !input.is_empty() {
            now = Instant::from_millis(now.millis() + 1);
            let used = session.handle_input(now, input, &keyring, &mut rng);
            input = &input[used..];
            while let Some(ev) = session.poll_event() {
                match ev {
                    Event::Entropy { data, .. } => released.extend_from_slice(&data),
                    Event::Fault(Fault::BadMac { .. }) => bad_macs += 1,
                    _ => {}
                }
            }
            // Anything sent mid-step is checked against the next host step.
            while let Some(t) = session.poll_transmit() {
                sent.extend_from_slice(&t);
            }
        }
    }
    assert!(
        sent.is_empty(),
        "host sent unexpected bytes at the end: {sent:02x?}"
    );
    let expected = hex(&v["expected_entropy"]);
    assert_eq!(released.len(), expected.len());
    assert!(released == expected, "released entropy differs");
    assert_eq!(bad_macs, 1, "exactly the corrupted E! 100 fails its MAC");
    let c = session.counters();
    assert_eq!(c.bad_macs, 1);
    assert_eq!(c.rekeys, 2);
    assert_eq!(c.blocks, 4096 - 1 + 10);
    assert!(c.framing_errors > 0, "the stray bytes were counted");
    assert_eq!(session.state(), State::Running);
}
