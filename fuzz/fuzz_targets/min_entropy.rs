//! The SP 800-90B estimators (`ekey_proto::health::min_entropy`) on
//! arbitrary bytes (a key's output is untrusted): never panic, every
//! estimate lies in [0, 8] bits per byte, the suffix sort in turns (as
//! little scratch as the commonest byte needs, or any amount between that
//! and one slot per byte) agrees with the sort in one go, too little
//! scratch is refused, and `Estimator<N>` over the last N bytes agrees with
//! `estimate_window` over the same bytes.
#![no_main]

use ekey_proto::health::min_entropy::{Estimates, Estimator, estimate_window, tuple_estimates};
use libfuzzer_sys::fuzz_target;

fn in_range(e: &Estimates) {
    for (name, v) in e.iter() {
        assert!((0.0..=8.0).contains(&v), "{name} = {v}");
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the scratch size; the rest is the window.
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let mut counts = [0usize; 256];
    for &b in bytes {
        counts[usize::from(b)] += 1;
    }
    let least = counts.into_iter().max().unwrap_or(0);
    let mut all = vec![0u32; bytes.len()];
    let full = estimate_window(bytes, &mut all);
    if bytes.len() < 2 {
        assert!(full.is_none());
        return;
    }
    let full = full.expect("enough scratch");
    in_range(&full);
    let slots = least + (bytes.len() - least) * usize::from(pick) / 255;
    let mut some = vec![0u32; slots];
    assert_eq!(estimate_window(bytes, &mut some), Some(full));
    let mut fewest = vec![0u32; least];
    assert_eq!(
        tuple_estimates(bytes, &mut fewest),
        tuple_estimates(bytes, &mut all)
    );
    assert!(tuple_estimates(bytes, &mut fewest[..least - 1]).is_none());

    let mut est = Estimator::<512>::new();
    est.push(bytes);
    match est.estimate() {
        Some(e) => {
            let last = &bytes[bytes.len() - 512..];
            let mut order = vec![0u32; 512];
            assert_eq!(Some(e), estimate_window(last, &mut order));
        }
        None => assert!(bytes.len() < 512),
    }
});
