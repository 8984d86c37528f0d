//! Skein-256-256 v1.1 test vectors (`tests/vectors/skein256v1_1.json`).

use ekey_proto::skein::{Finish, Personalisation, Skein256, hash};
use serde_json::Value;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/skein256v1_1.json"
    ))
    .expect("read skein256v1_1.json");
    serde_json::from_str(&text).expect("parse skein256v1_1.json")
}

fn field<'a>(v: &'a Value, name: &str) -> &'a str {
    v[name]
        .as_str()
        .unwrap_or_else(|| panic!("missing string field {name}"))
}

fn bytes(v: &Value, name: &str) -> Vec<u8> {
    hex::decode(field(v, name)).expect("hex")
}

fn array<const N: usize>(v: &Value, name: &str) -> [u8; N] {
    bytes(v, name)
        .try_into()
        .unwrap_or_else(|_| panic!("{name}: expected {N} bytes"))
}

fn pers(name: &str) -> Personalisation {
    match name {
        "RS" => Personalisation::ReKeying,
        "PMS" => Personalisation::MessageAuthentication,
        "EES" => Personalisation::EntropyEncryption,
        "LRS" => Personalisation::LongTermReKeying,
        "LKMS" => Personalisation::LongTermMessageAuthentication,
        other => panic!("unknown personalisation {other}"),
    }
}

const CHUNKINGS: [usize; 5] = [1, 31, 32, 33, 64];

fn fed(mut st: Skein256, msg: &[u8], chunk: usize) -> Skein256 {
    for c in msg.chunks(chunk) {
        st.update(c);
    }
    st
}

#[test]
fn personalisation_strings_match() {
    let v = vectors();
    let map = v["personalisations"].as_object().expect("personalisations");
    assert_eq!(map.len(), 5);
    for (name, text) in map {
        let text = text.as_str().expect("string");
        assert_eq!(text.len(), 96, "{name}");
        assert_eq!(pers(name).bytes().as_slice(), text.as_bytes(), "{name}");
    }
}

#[test]
fn plain_vectors() {
    let v = vectors();
    let list = v["plain"].as_array().expect("plain");
    assert!(!list.is_empty());
    for (i, t) in list.iter().enumerate() {
        let msg = bytes(t, "msg");
        let want: [u8; 32] = array(t, "hash");
        assert_eq!(hash(&msg), want, "plain #{i} (len {})", msg.len());

        let mut st = Skein256::new();
        st.update(&msg);
        assert_eq!(st.finalize(), want, "plain #{i} update");

        assert_eq!(
            Skein256::default().finalize_with(&msg),
            want,
            "plain #{i} finalize_with"
        );

        let (a, b) =
            Skein256::new().finalize_two(&msg, Finish::Final, &Skein256::new(), b"", Finish::Final);
        assert_eq!((a, b), (want, hash(b"")), "plain #{i} finalize_two");

        for chunk in CHUNKINGS {
            let st = fed(Skein256::new(), &msg, chunk);
            assert_eq!(st.finalize(), want, "plain #{i} in {chunk}-byte chunks");
        }
    }
}

#[test]
fn keyed_vectors() {
    let v = vectors();
    let list = v["keyed"].as_array().expect("keyed");
    assert!(!list.is_empty());
    for (i, t) in list.iter().enumerate() {
        let p = pers(field(t, "pers"));
        let serial: [u8; 12] = array(t, "serial");
        let secret: [u8; 32] = array(t, "secret");
        let msg = bytes(t, "msg");
        let want_final: [u8; 32] = array(t, "final");
        let want_pad: [u8; 32] = array(t, "final_pad");
        let ctx = format!("keyed #{i} ({}, len {})", field(t, "pers"), msg.len());

        let prepared = Skein256::prepare(&serial, &secret, p);

        let mut st = prepared.clone();
        st.update(&msg);
        assert_eq!(st.clone().finalize(), want_final, "{ctx} final");
        assert_eq!(st.finalize_pad(), want_pad, "{ctx} final_pad");

        assert_eq!(
            prepared.finalize_with(&msg),
            want_final,
            "{ctx} finalize_with"
        );
        assert_eq!(
            prepared.finalize_pad_with(&msg),
            want_pad,
            "{ctx} finalize_pad_with"
        );

        for chunk in CHUNKINGS {
            let st = fed(prepared.clone(), &msg, chunk);
            assert_eq!(
                st.clone().finalize(),
                want_final,
                "{ctx} final, {chunk}-byte chunks"
            );
            assert_eq!(
                st.finalize_pad(),
                want_pad,
                "{ctx} final_pad, {chunk}-byte chunks"
            );
        }

        // Interleaved with another computation, in both orders.
        let other = Skein256::new();
        let (f, h) = prepared.finalize_two(&msg, Finish::Final, &other, &msg, Finish::Final);
        assert_eq!((f, h), (want_final, hash(&msg)), "{ctx} finalize_two final");
        let (h, f) = other.finalize_two(b"xy", Finish::Pad, &prepared, &msg, Finish::Pad);
        assert_eq!(f, want_pad, "{ctx} finalize_two pad");
        assert_eq!(
            h,
            other.finalize_pad_with(b"xy"),
            "{ctx} finalize_two other"
        );

        // PMS and LKMS prepare identical states (only 64 of the 96
        // personalisation bytes are processed).
        let twin = match p {
            Personalisation::MessageAuthentication => {
                Some(Personalisation::LongTermMessageAuthentication)
            }
            Personalisation::LongTermMessageAuthentication => {
                Some(Personalisation::MessageAuthentication)
            }
            _ => None,
        };
        if let Some(twin) = twin {
            let st = Skein256::prepare(&serial, &secret, twin);
            assert_eq!(st.finalize_pad_with(&msg), want_pad, "{ctx} twin");
        }
    }
}
