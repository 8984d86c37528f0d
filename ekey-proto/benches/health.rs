//! Health tests: the FIPS 140-2 tests on one 20,000-bit block, and the
//! whole `Gate` (SP 800-90B tests, continuous test, FIPS, release)
//! taking one FIPS block's worth of 32-byte blocks.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ekey_proto::health::{FIPS_BLOCK_BYTES, Gate, fips_140_2};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut block = [0u8; FIPS_BLOCK_BYTES];
    rng.fill_bytes(&mut block);

    let mut g = c.benchmark_group("health");
    g.throughput(Throughput::Bytes(FIPS_BLOCK_BYTES as u64));
    g.bench_function("fips_140_2 (one 2500-byte block)", |b| {
        b.iter(|| fips_140_2(black_box(&block)))
    });

    // 2500 bytes of 32-byte blocks, each pushed and popped; a stream of
    // distinct blocks so the continuous test never fires.
    let mut stream = vec![[0u8; 32]; 4 * 2500];
    for s in stream.iter_mut() {
        rng.fill_bytes(s);
    }
    let mut gate = Gate::default();
    let mut next = 0usize;
    g.bench_function("Gate push+pop (2500 bytes)", |b| {
        b.iter(|| {
            let mut out = 0u8;
            let mut fed = 0;
            while fed < FIPS_BLOCK_BYTES {
                gate.push(black_box(&stream[next]));
                next = (next + 1) % stream.len();
                fed += 32;
                while let Some(x) = gate.pop_released() {
                    out ^= x[0];
                }
            }
            out
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
