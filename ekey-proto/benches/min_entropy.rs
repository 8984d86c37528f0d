//! SP 800-90B min-entropy estimates (`health::min_entropy`): the cost of
//! `push` per byte, and of one `estimate` over the host window (125,000
//! bytes) and the embedded one (4,096 bytes), on ChaCha20 output and on a
//! stuck source (all bytes equal: the slowest case for the suffix sort);
//! and the host daemon's way, `estimate_window` with an eighth of the
//! window as sort scratch (the suffixes sorted in turns).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use ekey_proto::health::min_entropy::{EMBEDDED_WINDOW, Estimator, HOST_WINDOW, estimate_window};
use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

fn bench(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let mut stream = vec![0u8; 4 * HOST_WINDOW];
    rng.fill_bytes(&mut stream);

    let mut g = c.benchmark_group("min_entropy");
    let mut host = Box::new(Estimator::<HOST_WINDOW>::new());
    let mut next = 0usize;
    g.throughput(Throughput::Bytes(32));
    g.bench_function("push (one 32-byte block)", |b| {
        b.iter(|| {
            host.push(black_box(&stream[next..next + 32]));
            next = (next + 32) % (stream.len() - 32);
        })
    });

    g.throughput(Throughput::Bytes(HOST_WINDOW as u64));
    g.sample_size(20);
    host.push(&stream[..HOST_WINDOW]);
    g.bench_function("estimate (125,000 bytes, random)", |b| {
        b.iter(|| black_box(host.estimate()))
    });
    let window = &stream[..HOST_WINDOW];
    let mut eighth = vec![0u32; HOST_WINDOW / 8];
    g.bench_function(
        "estimate_window (125,000 bytes, random, 1/8 scratch)",
        |b| b.iter(|| black_box(estimate_window(black_box(window), &mut eighth))),
    );
    host.push(&[0x5A; HOST_WINDOW]);
    g.bench_function("estimate (125,000 bytes, stuck)", |b| {
        b.iter(|| black_box(host.estimate()))
    });

    let mut small = Box::new(Estimator::<EMBEDDED_WINDOW>::new());
    small.push(&stream[..EMBEDDED_WINDOW]);
    g.throughput(Throughput::Bytes(EMBEDDED_WINDOW as u64));
    g.sample_size(50);
    g.bench_function("estimate (4,096 bytes, random)", |b| {
        b.iter(|| black_box(small.estimate()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
