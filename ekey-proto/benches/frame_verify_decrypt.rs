//! `frame_verify_decrypt`: one `E!` frame in, verified and decrypted (MAC
//! check, PEM decode, pad, XOR) with the session's prepared states reused.
//!
//! Two views: the bare per-frame work (`FrameKeys` + `Packet`), and the
//! whole host `Session` eating a recorded stream of 4,000 `E!` frames.

use std::hint::black_box;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use ekey_proto::crypto::FrameKeys;
use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial, SessionKey};
use ekey_proto::pem;
use ekey_proto::time::Instant;
use ekey_proto::wire::packet::Packet;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

fn single_frame(c: &mut Criterion) {
    let serial = Serial([0x11; 12]);
    let keys = FrameKeys::new(&serial, &SessionKey::from_bytes([0x22; 32]));
    let plain = [0x33u8; 32];
    let subcode = pem::encode_u12(1234);
    let pad = keys.pad(subcode);
    let mut data = plain;
    data.iter_mut().zip(pad).for_each(|(d, p)| *d ^= p);
    let frame = Packet::Entropy {
        seq: 1234,
        subcode,
        data,
    }
    .emit(&keys);

    let mut g = c.benchmark_group("frame_verify_decrypt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("one_frame", |b| {
        b.iter(|| {
            let frame = black_box(&frame);
            // As the Session does it: MAC and pad computed together.
            let (ok, pad) = keys.verify_with_pad(frame);
            assert!(ok);
            let Ok(Packet::Entropy { data, .. }) = Packet::parse(frame) else {
                unreachable!()
            };
            let mut out = data;
            out.iter_mut().zip(pad).for_each(|(d, p)| *d ^= p);
            black_box(out)
        })
    });
    g.finish();
}

/// Records a key's stream from reset to 4,000 `E!` frames, and the index
/// where the `E!` frames start.
fn record() -> (Vec<u8>, usize) {
    let serial = Serial([0x44; 12]);
    let ltk = LongTermKey::from_bytes([0x55; 32]);
    let mut cfg = DeviceConfig::new(serial, ltk);
    cfg.info_every = u32::MAX; // only E! frames once keyed
    let mut dev = Device::new(cfg);
    let mut noise = ChaCha20Rng::seed_from_u64(7);
    let mut session = new_session();
    let mut nonce_rng = ChaCha20Rng::seed_from_u64(9);
    let keyring = keyring();
    let mut stream = Vec::new();
    let mut start = 0;
    let mut blocks = 0;
    while blocks < 4000 {
        while let Some(t) = session.poll_transmit() {
            dev.handle_input(&t, &mut noise);
        }
        let Some(o) = dev.poll(&mut noise) else {
            continue;
        };
        if o.entropy.is_some() {
            if blocks == 0 {
                start = stream.len();
            }
            blocks += 1;
        }
        stream.extend_from_slice(&o.bytes);
        let mut input: &[u8] = &o.bytes;
        while !input.is_empty() {
            let n = session.handle_input(Instant::ZERO, input, &keyring, &mut nonce_rng);
            input = &input[n..];
            while session.poll_event().is_some() {}
        }
    }
    (stream, start)
}

fn new_session() -> Session {
    Session::new(Config::default(), Instant::ZERO)
}

fn keyring() -> impl Fn(&Serial) -> Option<LongTermKey> {
    |_| Some(LongTermKey::from_bytes([0x55; 32]))
}

fn session_stream(c: &mut Criterion) {
    let (stream, start) = record();
    let (handshake, frames) = stream.split_at(start);
    let keyring = keyring();
    let mut g = c.benchmark_group("frame_verify_decrypt");
    g.throughput(Throughput::Elements((frames.len() / 64) as u64));
    g.bench_function("session_4000_frames", |b| {
        b.iter_batched(
            || {
                // The same nonce RNG seed gives the nonce the recording used.
                let mut rng = ChaCha20Rng::seed_from_u64(9);
                let mut s = new_session();
                let mut input = handshake;
                while !input.is_empty() {
                    let n = s.handle_input(Instant::ZERO, input, &keyring, &mut rng);
                    input = &input[n..];
                    while s.poll_event().is_some() {}
                }
                (s, rng)
            },
            |(mut s, mut rng)| {
                let mut input = frames;
                let mut got = 0usize;
                while !input.is_empty() {
                    let n = s.handle_input(Instant::ZERO, input, &keyring, &mut rng);
                    input = &input[n..];
                    while let Some(ev) = s.poll_event() {
                        if let Event::Entropy { data, .. } = ev {
                            got += usize::from(black_box(data)[0] != 0) | 1;
                        }
                    }
                }
                assert_eq!(got, 4000);
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, single_frame, session_stream);
criterion_main!(benches);
