//! The host Session on arbitrary input: never panics, never releases a block
//! (no frame can carry a valid MAC under a key the fuzzer does not know,
//! except by a 2^-48 chance), and the event queue never overflows.
#![no_main]

use std::convert::Infallible;

use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use libfuzzer_sys::fuzz_target;

struct Counter(u8);
impl rand_core::TryRng for Counter {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(u32::from(self.0))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(u64::from(self.0))
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Infallible> {
        for b in d {
            self.0 = self.0.wrapping_add(1);
            *b = self.0;
        }
        Ok(())
    }
}
impl rand_core::TryCryptoRng for Counter {}

fuzz_target!(|data: &[u8]| {
    let keyring = |_: &Serial| Some(LongTermKey::from_bytes([0x42; 32]));
    let mut rng = Counter(0);
    let mut now = Instant::ZERO;
    let mut s = Session::new(Config::default(), now);
    // Each chunk: one length byte, one time-step byte, then the bytes.
    let mut rest = data;
    while let [len, step, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, next) = tail.split_at(n);
        rest = next;
        now = Instant::from_millis(now.millis() + u64::from(*step) * 50);
        s.handle_timeout(now);
        let mut input = chunk;
        while !input.is_empty() {
            let used = s.handle_input(now, input, &keyring, &mut rng);
            input = &input[used..];
            while let Some(ev) = s.poll_event() {
                assert!(
                    !matches!(ev, Event::Entropy { .. }),
                    "released unverifiable bytes"
                );
            }
        }
        let _ = s.poll_transmit();
        let _ = s.poll_timeout();
    }
});
