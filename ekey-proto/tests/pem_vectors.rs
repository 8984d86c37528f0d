//! PEM64 against the reference vectors (`tests/vectors/pem64.json`), every
//! error case, and round trips.

use ekey_proto::pem::{
    self, ALPHABET, Error, decode, decode_char, decode_quad, decode_u12, encode, encode_u12,
    encoded_len,
};
use proptest::prelude::*;

const VECTORS: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/pem64.json"
));

fn vectors() -> serde_json::Value {
    serde_json::from_str(VECTORS).expect("pem64.json parses")
}

#[test]
fn bytes_vectors_both_ways() {
    let v = vectors();
    let cases = v["bytes"].as_array().expect("bytes array");
    assert!(cases.len() >= 37, "expected 0..=36 byte vectors");
    for case in cases {
        let bytes = hex::decode(case["hex"].as_str().expect("hex")).expect("valid hex");
        let text = case["pem"].as_str().expect("pem").as_bytes();

        assert_eq!(encoded_len(bytes.len()), text.len());
        let mut enc = vec![0u8; encoded_len(bytes.len())];
        assert_eq!(encode(&bytes, &mut enc), Ok(text.len()));
        assert_eq!(enc, text, "encode {}", case["hex"]);

        // Exact-size output buffer suffices for decoding, too.
        let mut dec = vec![0u8; bytes.len()];
        assert_eq!(decode(text, &mut dec), Ok(bytes.len()), "decode {text:?}");
        assert_eq!(dec, bytes);

        // And a larger one is fine.
        let mut big = [0xa5u8; 64];
        assert_eq!(decode(text, &mut big), Ok(bytes.len()));
        assert_eq!(&big[..bytes.len()], &bytes[..]);
        assert!(big[bytes.len()..].iter().all(|&b| b == 0xa5));

        // One byte short is refused before anything is written.
        if let Some(short) = bytes.len().checked_sub(1) {
            let mut small = vec![0u8; short];
            assert_eq!(decode(text, &mut small), Err(Error::BufferTooSmall));
            let mut small = vec![0u8; text.len() - 1];
            assert_eq!(encode(&bytes, &mut small), Err(Error::BufferTooSmall));
        }

        // Quad by quad gives the same bytes.
        let mut joined = Vec::new();
        for q in text.chunks_exact(4) {
            let (b, n) = decode_quad(q.try_into().expect("quad")).expect("valid quad");
            joined.extend_from_slice(&b[..n]);
        }
        assert_eq!(joined, bytes);
    }
}

#[test]
fn twelve_bit_vectors_both_ways() {
    let v = vectors();
    let cases = v["twelve_bit"].as_array().expect("twelve_bit array");
    assert!(!cases.is_empty());
    for case in cases {
        let value = u16::try_from(case["value"].as_u64().expect("value")).expect("u16");
        let text: [u8; 2] = case["pem"]
            .as_str()
            .expect("pem")
            .as_bytes()
            .try_into()
            .expect("two characters");
        assert_eq!(encode_u12(value), text, "encode {value}");
        assert_eq!(decode_u12(text), Ok(value), "decode {text:?}");
    }
}

#[test]
fn twelve_bit_documented_values() {
    assert_eq!(decode_u12(*b"AA"), Ok(0));
    assert_eq!(decode_u12(*b"UY"), Ok(1556));
    assert_eq!(decode_u12(*b"//"), Ok(4095));
    assert_eq!(encode_u12(0xffff), *b"//");
    assert_eq!(encode_u12(0x1000), *b"AA");
}

#[test]
fn twelve_bit_exhaustive() {
    for v in 0..4096u16 {
        assert_eq!(decode_u12(encode_u12(v)), Ok(v));
    }
}

#[test]
fn twelve_bit_errors() {
    assert_eq!(
        decode_u12(*b"=A"),
        Err(Error::BadCharacter {
            position: 0,
            byte: b'='
        })
    );
    assert_eq!(
        decode_u12(*b"A="),
        Err(Error::BadCharacter {
            position: 1,
            byte: b'='
        })
    );
    assert_eq!(
        decode_u12(*b"A*"),
        Err(Error::BadCharacter {
            position: 1,
            byte: b'*'
        })
    );
    assert_eq!(
        decode_u12(*b" *"),
        Err(Error::BadCharacter {
            position: 0,
            byte: b' '
        })
    );
    assert_eq!(
        decode_u12([0x80, b'A']),
        Err(Error::BadCharacter {
            position: 0,
            byte: 0x80
        })
    );
}

#[test]
fn decode_char_whole_byte_range() {
    let mut valid = 0;
    for b in 0..=255u8 {
        match decode_char(b) {
            Some(v) => {
                valid += 1;
                assert_eq!(ALPHABET[usize::from(v)], b);
            }
            None => assert!(!ALPHABET.contains(&b)),
        }
    }
    assert_eq!(valid, 64);
    assert_eq!(decode_char(pem::FILLER), None);
}

#[test]
fn bad_length() {
    let mut out = [0u8; 32];
    for len in [1usize, 2, 3, 5, 6, 7, 43] {
        let input = vec![b'A'; len];
        assert_eq!(decode(&input, &mut out), Err(Error::BadLength { len }));
    }
    // Length is checked before characters.
    assert_eq!(decode(b"***", &mut out), Err(Error::BadLength { len: 3 }));
}

#[test]
fn empty_input() {
    assert_eq!(decode(b"", &mut []), Ok(0));
    assert_eq!(encode(b"", &mut []), Ok(0));
}

#[test]
fn bad_character_positions() {
    let mut out = [0u8; 32];
    let good = *b"NwBvBlg3OTBJORFD";
    for pos in 0..good.len() {
        for bad in [b'*', b' ', b'-', b'_', b'\0', b'\r', 0x80, 0xff, b'.'] {
            let mut t = good;
            t[pos] = bad;
            assert_eq!(
                decode(&t, &mut out),
                Err(Error::BadCharacter {
                    position: pos,
                    byte: bad
                }),
                "bad {bad:#x} at {pos}"
            );
        }
    }
    // The first bad character is reported.
    assert_eq!(
        decode(b"AAAA*A*A", &mut out),
        Err(Error::BadCharacter {
            position: 4,
            byte: b'*'
        })
    );
}

#[test]
fn misplaced_filler() {
    let mut out = [0u8; 32];
    // `=` in any quad but the last.
    for pos in 0..4 {
        let mut t = *b"AAAAAAAA";
        t[pos] = b'=';
        assert_eq!(
            decode(&t, &mut out),
            Err(Error::BadCharacter {
                position: pos,
                byte: b'='
            })
        );
    }
    // "AAAA====", "AAAAA===", "AAAAAA=A", "AAAA=AAA", "AAAAA=A=".
    let cases: [(&[u8], usize); 5] = [
        (b"AAAA====", 4),
        (b"AAAAA===", 5),
        (b"AAAAAA=A", 6),
        (b"AAAA=AAA", 4),
        (b"AAAAA=A=", 5),
    ];
    for (t, pos) in cases {
        assert_eq!(
            decode(t, &mut out),
            Err(Error::BadCharacter {
                position: pos,
                byte: b'='
            }),
            "{:?}",
            std::str::from_utf8(t)
        );
    }
    // Fillers are fine at the very end.
    assert_eq!(decode(b"AAAAAA==", &mut out), Ok(4));
    assert_eq!(decode(b"AAAAAAA=", &mut out), Ok(5));
}

#[test]
fn buffer_too_small() {
    let mut out = [0u8; 2];
    assert_eq!(decode(b"35bp", &mut out), Err(Error::BufferTooSmall));
    assert_eq!(decode(b"7H4=", &mut out), Ok(2));
    let mut out = [0u8; 1];
    assert_eq!(decode(b"7H4=", &mut out), Err(Error::BufferTooSmall));
    assert_eq!(decode(b"IA==", &mut out), Ok(1));
    let mut out = [0u8; 3];
    assert_eq!(encode(b"ab", &mut out), Err(Error::BufferTooSmall));
    assert_eq!(encode(b"ab", &mut [0u8; 4]), Ok(4));
    // Too small wins over bad characters that come later.
    assert_eq!(
        decode(b"****AAAA", &mut [0u8; 5]),
        Err(Error::BufferTooSmall)
    );
}

#[test]
fn encoded_len_saturates() {
    assert_eq!(encoded_len(1), 4);
    assert_eq!(encoded_len(3), 4);
    assert_eq!(encoded_len(4), 8);
    assert_eq!(encoded_len(usize::MAX), usize::MAX);
}

#[test]
fn display_messages() {
    let s = Error::BadCharacter {
        position: 5,
        byte: b'*',
    }
    .to_string();
    assert!(s.contains("0x2a") && s.contains("offset 5"), "{s}");
    let s = Error::BadCharacter {
        position: 1,
        byte: 0x0d,
    }
    .to_string();
    assert_eq!(s, "invalid PEM64 character 0x0d at offset 1");
    let s = Error::BadCharacter {
        position: 2,
        byte: b'=',
    }
    .to_string();
    assert!(s.contains("'='") && s.contains("offset 2"), "{s}");
    assert!(Error::BadLength { len: 7 }.to_string().contains('7'));
    assert!(!Error::BufferTooSmall.to_string().is_empty());
    let _: &dyn std::error::Error = &Error::BufferTooSmall;
}

proptest! {
    #[test]
    fn round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut text = vec![0u8; encoded_len(bytes.len())];
        prop_assert_eq!(encode(&bytes, &mut text), Ok(text.len()));
        prop_assert!(text.iter().all(|&c| decode_char(c).is_some() || c == b'='));
        let mut back = vec![0u8; bytes.len()];
        prop_assert_eq!(decode(&text, &mut back), Ok(bytes.len()));
        prop_assert_eq!(back, bytes);
    }

    #[test]
    fn decode_never_panics(
        text in proptest::collection::vec(any::<u8>(), 0..64),
        out_len in 0usize..64,
    ) {
        let mut out = vec![0u8; out_len];
        match decode(&text, &mut out) {
            Ok(n) => {
                prop_assert!(n <= out_len);
                // Whatever decodes re-encodes to the same text, up to the
                // unused bits of a filled last quad.
                let mut again = vec![0u8; encoded_len(n)];
                prop_assert_eq!(encode(&out[..n], &mut again), Ok(text.len()));
                let keep = text.len().saturating_sub(4);
                prop_assert_eq!(&again[..keep], &text[..keep]);
            }
            Err(Error::BadLength { len }) => prop_assert!(len % 4 != 0),
            Err(Error::BadCharacter { position, byte }) => {
                prop_assert_eq!(text[position], byte);
            }
            Err(Error::BufferTooSmall) => {}
        }
    }

    #[test]
    fn quad_never_panics(q in any::<[u8; 4]>()) {
        if let Ok((_, n)) = decode_quad(q) {
            prop_assert!((1..=3).contains(&n));
        }
    }

    #[test]
    fn quad_agrees_with_decode(q in any::<[u8; 4]>()) {
        let mut out = [0u8; 3];
        match (decode_quad(q), decode(&q, &mut out)) {
            (Ok((b, n)), Ok(m)) => {
                prop_assert_eq!(n, m);
                prop_assert_eq!(&b[..n], &out[..n]);
            }
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
    }
}
