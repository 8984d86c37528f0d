//! Skein-256 v1.1 throughput: one Threefish block, and the two per-frame
//! operations (52-byte MAC with `finalize_pad`, 2-byte pad with `finalize`).

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ekey_proto::skein::{
    Finish, Personalisation, Skein256, hash, threefish256_encrypt, threefish256_encrypt_x2,
};

fn bench(c: &mut Criterion) {
    let key = [1u64, 2, 3, 4];
    c.bench_function("threefish256 block", |b| {
        let mut x = [5u64, 6, 7, 8];
        b.iter(|| {
            x = threefish256_encrypt(black_box(&key), black_box(32), black_box(1 << 62), x);
            x
        })
    });

    c.bench_function("threefish256 x2 (two blocks)", |b| {
        let mut x = [5u64, 6, 7, 8];
        let mut y = [9u64, 6, 7, 8];
        b.iter(|| {
            (x, y) = threefish256_encrypt_x2(
                (black_box(&key), black_box(32), black_box(1 << 62), x),
                (black_box(&key), black_box(32), black_box(1 << 62), y),
            );
            (x, y)
        })
    });

    let mac = Skein256::prepare(&[1; 12], &[2; 32], Personalisation::MessageAuthentication);
    let pad = Skein256::prepare(&[1; 12], &[2; 32], Personalisation::EntropyEncryption);
    let content = [0x41u8; 52];

    c.bench_function("clone + update 52 + finalize_pad", |b| {
        b.iter(|| {
            let mut st = black_box(&mac).clone();
            st.update(black_box(&content));
            st.finalize_pad()
        })
    });
    c.bench_function("finalize_pad_with 52", |b| {
        b.iter(|| black_box(&mac).finalize_pad_with(black_box(&content)))
    });
    c.bench_function("clone + update 2 + finalize", |b| {
        b.iter(|| {
            let mut st = black_box(&pad).clone();
            st.update(black_box(b"AB"));
            st.finalize()
        })
    });
    c.bench_function("finalize_with 2", |b| {
        b.iter(|| black_box(&pad).finalize_with(black_box(b"AB")))
    });
    c.bench_function("frame: MAC 52 + pad 2 (clone paths)", |b| {
        b.iter(|| {
            let mut st = black_box(&mac).clone();
            st.update(black_box(&content));
            let m = st.finalize_pad();
            let mut st = black_box(&pad).clone();
            st.update(black_box(b"AB"));
            (m, st.finalize())
        })
    });
    c.bench_function("frame: MAC 52 + pad 2 (finalize_two)", |b| {
        b.iter(|| {
            black_box(&mac).finalize_two(
                black_box(&content),
                Finish::Pad,
                black_box(&pad),
                black_box(b"AB"),
                Finish::Final,
            )
        })
    });
    let long = [0x5au8; 1024];
    let mut group = c.benchmark_group("hash");
    group.throughput(criterion::Throughput::Bytes(long.len() as u64));
    group.bench_function("1 KiB", |b| b.iter(|| hash(black_box(&long))));
    group.finish();
    c.bench_function("prepare", |b| {
        b.iter(|| {
            Skein256::prepare(
                black_box(&[1; 12]),
                black_box(&[2; 32]),
                Personalisation::MessageAuthentication,
            )
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
