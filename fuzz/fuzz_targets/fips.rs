//! `fips_140_2` on arbitrary 2,500-byte blocks: never panics, and agrees
//! with a bit-by-bit reading of FIPS 140-2 §4.9.1 (change notice of
//! 2001-10-10) written here from the standard, most significant bit first.
//!
//! Arbitrary input rarely comes near the passing bounds, so the input is
//! also used as a recipe: the first byte picks either the bytes as given
//! or a SplitMix64 stream from an 8-byte seed with a few patched bytes,
//! which lands inside and on the edges of the bounds.
#![no_main]

use ekey_proto::health::{FIPS_BLOCK_BYTES, fips_140_2};
use libfuzzer_sys::fuzz_target;

struct Naive {
    ones: u32,
    sum_squares: u32,
    runs: [[u32; 6]; 2],
    longest: u32,
}

fn naive(block: &[u8]) -> Naive {
    let bits: Vec<u8> = block
        .iter()
        .flat_map(|&b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    assert_eq!(bits.len(), 20_000);

    let ones = bits.iter().map(|&b| u32::from(b)).sum();

    let mut f = [0u32; 16];
    for nibble in bits.chunks(4) {
        let v = nibble
            .iter()
            .fold(0usize, |acc, &b| acc * 2 + usize::from(b));
        f[v] += 1;
    }
    let sum_squares = f.iter().map(|&n| n * n).sum();

    let mut runs = [[0u32; 6]; 2];
    let mut longest = 0;
    let mut start = 0;
    for i in 1..=bits.len() {
        if i == bits.len() || bits[i] != bits[start] {
            let len = (i - start) as u32;
            runs[usize::from(bits[start])][(len.min(6) - 1) as usize] += 1;
            longest = longest.max(len);
            start = i;
        }
    }
    Naive {
        ones,
        sum_squares,
        runs,
        longest,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut block = [0u8; FIPS_BLOCK_BYTES];
    if mode & 1 == 0 {
        // The bytes as given, repeated to fill the block.
        if !rest.is_empty() {
            for (d, s) in block.iter_mut().zip(rest.iter().cycle()) {
                *d = *s;
            }
        }
    } else {
        // A well-mixed block, then patches: (offset u16, byte) triples.
        let mut seed = [0u8; 8];
        for (d, s) in seed.iter_mut().zip(rest) {
            *d = *s;
        }
        let mut x = u64::from_le_bytes(seed);
        for chunk in block.chunks_mut(8) {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
        }
        for p in rest.get(8..).unwrap_or(&[]).chunks_exact(3) {
            let off = usize::from(u16::from_le_bytes([p[0], p[1]])) % FIPS_BLOCK_BYTES;
            block[off] = p[2];
        }
    }

    let got = fips_140_2(&block);
    let want = naive(&block);
    assert_eq!(got.ones, want.ones, "monobit statistic");
    assert_eq!(got.poker_sum_squares, want.sum_squares, "poker statistic");
    assert_eq!(got.runs_of_zeros, want.runs[0], "runs of zeros");
    assert_eq!(got.runs_of_ones, want.runs[1], "runs of ones");
    assert_eq!(got.longest_run, want.longest, "longest run");

    // Verdicts from the standard's bounds, in its own terms.
    assert_eq!(got.monobit_ok, 9725 < want.ones && want.ones < 10_275);
    // X = 16/5000 · Σf² − 5000, compared exactly as 5000·X against
    // 5000·2.16 = 10,800 and 5000·46.17 = 230,850.
    let x5000 = 16 * i64::from(want.sum_squares) - 25_000_000;
    assert_eq!(
        got.poker_ok,
        10_800 < x5000 && x5000 < 230_850,
        "poker 5000·X = {x5000}"
    );
    let intervals = [
        (2315, 2685),
        (1114, 1386),
        (527, 723),
        (240, 384),
        (103, 209),
        (103, 209),
    ];
    let runs_ok = want.runs.iter().all(|counts| {
        counts
            .iter()
            .zip(intervals)
            .all(|(&c, (lo, hi))| lo <= c && c <= hi)
    });
    assert_eq!(got.runs_ok, runs_ok);
    assert_eq!(got.long_run_ok, want.longest < 26);
    assert_eq!(
        got.passed(),
        got.monobit_ok && got.poker_ok && got.runs_ok && got.long_run_ok
    );
});
