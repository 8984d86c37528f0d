//! `frames.json` and `keying.json` against the crate's frame, key and
//! re-key code.

mod common;

use common::{arr, hex, load};
use ekey_proto::crypto::{
    FrameKeys, derive_long_term_key, derive_session_key, long_term_nonce_mac,
};
use ekey_proto::keys::{LongTermKey, Serial, SessionKey};
use ekey_proto::rekey::{MasterKeyError, mac_command, parse_master_key, print_master_key};
use ekey_proto::wire::info::{InfoItem, parse_items};
use ekey_proto::wire::packet::Packet;

fn frame_of(s: &str) -> [u8; 64] {
    s.as_bytes().try_into().unwrap()
}

#[test]
fn published_real_device_frames_verify_and_parse() {
    let v = load("frames.json");
    let published = v["published"].as_array().unwrap();
    assert_eq!(published.len(), 6);
    for f in published {
        let serial: Serial = f["serial_pem"].as_str().unwrap().parse().unwrap();
        let keys = FrameKeys::new(&serial, &SessionKey::from_bytes(arr(&f["session_key"])));
        let frame = frame_of(f["frame"].as_str().unwrap());
        assert!(keys.verify(&frame), "MAC of {}", f["frame"]);
        let packet = Packet::parse(&frame).unwrap();
        // Re-emitting the parsed packet gives the very same bytes.
        assert_eq!(packet.emit(&keys), frame, "emit of {}", f["frame"]);
        // A flipped bit anywhere in the MAC'd content breaks the MAC.
        for i in 2..54 {
            let mut bad = frame;
            bad[i] ^= 0x01;
            assert!(!keys.verify(&bad), "flip at {i}");
        }
        match packet {
            Packet::Serial { version, serial: s } => {
                assert_eq!(version, 0);
                assert_eq!(s, serial);
            }
            Packet::Info(text) => {
                for item in parse_items(text.as_bytes()) {
                    match item.unwrap() {
                        InfoItem::Temperature(t) => {
                            assert_eq!(t.deci_kelvin, 3143);
                            assert!((t.celsius() - 41.15).abs() < 0.01);
                        }
                        InfoItem::Voltage(v) => assert_eq!(v.millivolts, 3254),
                        InfoItem::Fips(f) => {
                            assert_eq!(f.blocks, 7342);
                            assert_eq!(f.failures, 0);
                        }
                        other => panic!("unexpected item {other:?}"),
                    }
                }
            }
            Packet::RekeyRequest(t) => assert!(t.to_string().starts_with("Unable to send")),
            Packet::Warning(t) => assert_eq!(t.to_string(), "Unknown Input Character 0x65"),
            Packet::LongTermUnlocked(t) => assert_eq!(t.to_string(), "Long-term rekey unlocked"),
            other => panic!("unexpected packet {other:?}"),
        }
    }
}

#[test]
fn generated_frames_verify_and_entropy_decrypts_consistently() {
    let v = load("frames.json");
    for f in v["generated"].as_array().unwrap() {
        let serial = Serial(arr(&f["serial"]));
        let keys = FrameKeys::new(&serial, &SessionKey::from_bytes(arr(&f["session_key"])));
        let frame = frame_of(f["frame"].as_str().unwrap());
        assert!(keys.verify(&frame));
        // The wrong session key does not verify.
        let other = FrameKeys::new(&serial, &SessionKey::ZERO);
        assert!(!other.verify(&frame));
        let packet = Packet::parse(&frame).unwrap();
        assert_eq!(packet.emit(&keys), frame);
        if let Packet::Info(text) = &packet {
            let items: Vec<_> = parse_items(text.as_bytes()).map(Result::unwrap).collect();
            assert_eq!(items.len(), 2);
        }
    }
}

#[test]
fn session_keys_match() {
    let v = load("keying.json");
    for c in v["session_keys"].as_array().unwrap() {
        let key = derive_session_key(
            &Serial(arr(&c["serial"])),
            &LongTermKey::from_bytes(arr(&c["long_term_key"])),
            &arr(&c["device_entropy"]),
            &hex(&c["host_nonce"]),
        );
        assert_eq!(
            hex::encode(key.as_bytes()),
            c["session_key"].as_str().unwrap()
        );
    }
}

#[test]
fn entropy_pads_match() {
    let v = load("keying.json");
    for c in v["entropy_pads"].as_array().unwrap() {
        let keys = FrameKeys::new(
            &Serial(arr(&c["serial"])),
            &SessionKey::from_bytes(arr(&c["session_key"])),
        );
        let seq = c["sequence"].as_u64().unwrap() as u16;
        let sub = ekey_proto::pem::encode_u12(seq);
        assert_eq!(&sub, c["subcode"].as_str().unwrap().as_bytes());
        assert_eq!(hex::encode(keys.pad(sub)), c["pad"].as_str().unwrap());
    }
}

#[test]
fn long_term_rekeys_match() {
    let v = load("keying.json");
    for c in v["long_term_rekey"].as_array().unwrap() {
        let serial = Serial(arr(&c["serial"]));
        assert_eq!(serial.to_string(), c["serial_pem"].as_str().unwrap());
        let printed = c["master_key_printed"].as_str().unwrap();
        let master = parse_master_key(printed).unwrap();
        assert_eq!(master.as_bytes(), &arr::<32>(&c["master_key"]));
        assert_eq!(&print_master_key(&master)[..], printed.as_bytes());
        // With spaces every four characters, as people type it.
        let spaced: String = printed
            .as_bytes()
            .chunks(4)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(" ");
        assert!(parse_master_key(&spaced).unwrap().ct_eq(&master));
        let nonce = hex(&c["host_nonce"]);
        assert_eq!(
            hex::encode(long_term_nonce_mac(&serial, &master, &nonce)),
            c["nonce_mac"].as_str().unwrap()
        );
        assert_eq!(
            &mac_command(&serial, &master, &nonce),
            c["mac_command"].as_str().unwrap().as_bytes()
        );
        let ltk = derive_long_term_key(&serial, &master, &arr(&c["device_entropy"]), &nonce);
        assert_eq!(
            hex::encode(ltk.as_bytes()),
            c["new_long_term_key"].as_str().unwrap()
        );
    }
}

#[test]
fn master_key_typing_errors_are_caught_before_any_traffic() {
    let v = load("keying.json");
    for c in v["long_term_rekey"].as_array().unwrap() {
        let printed = c["master_key_printed"].as_str().unwrap();
        // Every single-character substitution is caught by the check byte
        // or the length, and none yields a key.
        for i in 0..printed.len() {
            for sub in ['A', 'z', '0', '+'] {
                let mut typo: Vec<u8> = printed.as_bytes().to_vec();
                if typo[i] == sub as u8 {
                    continue;
                }
                typo[i] = sub as u8;
                let typo = String::from_utf8(typo).unwrap();
                let r = parse_master_key(&typo);
                // A change in the low bits of the last character can leave
                // the check byte's value intact only if it is the check
                // byte's own padding; everything else must fail.
                if let Ok(k) = r {
                    panic!(
                        "typo at {i} accepted as a key ({} bytes)",
                        k.as_bytes().len()
                    );
                }
            }
            // A dropped character is refused as such.
            let dropped: String = printed
                .chars()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, c)| c)
                .collect();
            assert_eq!(
                parse_master_key(&dropped).unwrap_err(),
                MasterKeyError::Missing
            );
        }
    }
}
