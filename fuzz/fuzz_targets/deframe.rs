//! The frame finder on arbitrary bytes in arbitrary chunks: never panics,
//! every frame it yields is well formed, and the counts add up.
#![no_main]

use ekey_proto::wire::deframe::Deframer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut d = Deframer::new();
    let mut frames = 0u64;
    for piece in rest.chunks(chunk) {
        let mut input = piece;
        while !input.is_empty() {
            let (used, frame) = d.push(input);
            assert!(used <= input.len());
            if let Some(f) = frame {
                assert_eq!(&f[..2], b"* ");
                assert_eq!(&f[62..], b"\r\n");
                frames += 1;
            }
            if used == 0 && frame.is_none() {
                panic!("no progress");
            }
            input = &input[used..];
        }
    }
    let s = d.stats();
    assert_eq!(s.frames, frames);
    assert_eq!(
        s.frames * 64 + s.garbage_bytes + d.buffered() as u64,
        rest.len() as u64
    );
});
