//! Packet and info parsing on arbitrary 64-byte frames and payloads.
#![no_main]

use ekey_proto::wire::info::parse_items;
use ekey_proto::wire::packet::Packet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut frame = [b' '; 64];
    frame[..2].copy_from_slice(b"* ");
    frame[62..].copy_from_slice(b"\r\n");
    for (d, s) in frame[2..62].iter_mut().zip(data) {
        *d = *s;
    }
    if let Ok(Packet::Info(text)) = Packet::parse(&frame) {
        for _ in parse_items(text.as_bytes()) {}
    }
    // Raw bytes straight into both parsers, too.
    if let Ok(f) = <[u8; 64]>::try_from(data) {
        let _ = Packet::parse(&f);
    }
    for _ in parse_items(data) {}
});
