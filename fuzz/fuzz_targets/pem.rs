//! PEM64 decoding: never panics; whatever decodes re-encodes to the input.
#![no_main]

use ekey_proto::pem;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = [0u8; 256];
    if let Ok(n) = pem::decode(data, &mut out) {
        let mut back = [0u8; 400];
        let m = pem::encode(&out[..n], &mut back).unwrap();
        // Canonical input (zero trailing bits) round-trips exactly.
        let mut again = [0u8; 256];
        let k = pem::decode(&back[..m], &mut again).unwrap();
        assert_eq!(&again[..k], &out[..n]);
    }
    if let [a, b, ..] = data {
        let _ = pem::decode_u12([*a, *b]);
    }
    if let [a, b, c, d, ..] = data {
        let _ = pem::decode_quad([*a, *b, *c, *d]);
    }
});
