//! Property tests: the host `Session` against the software key (`device`)
//! over an in-memory link that chunks, corrupts, drops and inserts bytes,
//! across several session re-keys.
//!
//! Invariant: what the host releases is a subsequence, in order, of the
//! blocks the key sent with an intact MAC, and nothing else; with a clean
//! link (any chunking) it is all of them.

use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::host::{Config, Event, Session, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;
use proptest::prelude::*;
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// A tiny deterministic PRNG for link faults (xorshift64*).
struct Dice(u64);
impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// True with probability `per_million` / 1e6.
    fn chance(&mut self, per_million: u32) -> bool {
        (self.next() % 1_000_000) < u64::from(per_million)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[derive(Clone, Copy, Debug)]
struct LinkFaults {
    /// Per byte, in parts per million.
    flip: u32,
    drop: u32,
    /// Per frame slot, in parts per million: garbage burst on the link.
    garbage: u32,
    /// Per frame slot: ask the key to corrupt a MAC / replay a frame /
    /// prefix garbage.
    key_corrupt: u32,
    key_replay: u32,
    key_garbage: u32,
    /// Largest chunk handed to the session.
    max_chunk: usize,
}

impl LinkFaults {
    fn clean(max_chunk: usize) -> Self {
        LinkFaults {
            flip: 0,
            drop: 0,
            garbage: 0,
            key_corrupt: 0,
            key_replay: 0,
            key_garbage: 0,
            max_chunk,
        }
    }
}

struct Run {
    /// Every block the key sent with an intact MAC, in order.
    authentic: Vec<[u8; 32]>,
    /// Every block the key sent, in order.
    all_sent: Vec<[u8; 32]>,
    released: Vec<[u8; 32]>,
    rekeys: u64,
    final_state: State,
}

fn run(seed: u64, slots: usize, faults: LinkFaults) -> Run {
    let serial = Serial([0x5a; 12]);
    let ltk = LongTermKey::from_bytes([0x17; 32]);
    let mut device = Device::new(DeviceConfig::new(serial, ltk.clone()));
    let keyring = move |s: &Serial| (*s == serial).then(|| ltk.clone());
    let mut noise = ChaCha20Rng::seed_from_u64(seed);
    let mut nonces = ChaCha20Rng::seed_from_u64(seed ^ 0xdead_beef);
    let mut dice = Dice(seed | 1);
    let mut now = Instant::ZERO;
    let mut session = Session::new(Config::default(), now);
    let mut out = Run {
        authentic: Vec::new(),
        all_sent: Vec::new(),
        released: Vec::new(),
        rekeys: 0,
        final_state: State::Resetting,
    };
    let mut wire = Vec::new();
    for _ in 0..slots {
        now = Instant::from_millis(now.millis() + 11);
        // Host -> key.
        while let Some(t) = session.poll_transmit() {
            device.handle_input(&t, &mut noise);
        }
        // Key faults.
        if dice.chance(faults.key_corrupt) {
            device.faults_mut().corrupt_macs += 1;
        }
        if dice.chance(faults.key_replay) {
            device.faults_mut().replay_next = true;
        }
        if dice.chance(faults.key_garbage) {
            device.faults_mut().garbage += 1 + dice.below(100);
        }
        // Key -> link.
        wire.clear();
        if let Some(o) = device.poll(&mut noise) {
            if let Some(sent) = o.entropy {
                out.all_sent.push(sent.data);
                if sent.authentic {
                    out.authentic.push(sent.data);
                }
            }
            for &b in o.bytes.iter() {
                if dice.chance(faults.drop) {
                    continue;
                }
                let b = if dice.chance(faults.flip) {
                    b ^ (1 << dice.below(8))
                } else {
                    b
                };
                wire.push(b);
            }
        }
        if dice.chance(faults.garbage) {
            let at = dice.below(wire.len() + 1);
            let junk: Vec<u8> = (0..dice.below(80)).map(|_| dice.next() as u8).collect();
            wire.splice(at..at, junk);
        }
        // Link -> host, in random chunks.
        let mut input: &[u8] = &wire;
        while !input.is_empty() {
            let n = 1 + dice.below(faults.max_chunk.min(input.len()));
            let mut chunk = &input[..n];
            input = &input[n..];
            while !chunk.is_empty() {
                let used = session.handle_input(now, chunk, &keyring, &mut nonces);
                chunk = &chunk[used..];
                while let Some(ev) = session.poll_event() {
                    if let Event::Entropy { data, .. } = ev {
                        out.released.push(data);
                    }
                }
            }
        }
        session.handle_timeout(now);
    }
    out.rekeys = session.counters().rekeys;
    out.final_state = session.state();
    out
}

fn is_subsequence(sub: &[[u8; 32]], of: &[[u8; 32]]) -> bool {
    let mut it = of.iter();
    sub.iter().all(|x| it.any(|y| y == x))
}

/// Frame slots for a little over three session keys (4096 blocks each,
/// plus info frames).
const SLOTS: usize = 3 * 4096 + 3 * 4096 / 78 * 3 + 400;

#[test]
fn clean_link_releases_everything_across_rekeys() {
    let r = run(1, SLOTS, LinkFaults::clean(64));
    assert!(r.rekeys >= 3, "rekeys: {}", r.rekeys);
    assert_eq!(r.final_state, State::Running);
    assert!(r.released.len() > 3 * 4096 - 100);
    // Everything the key sent, except what was still in flight at the end.
    assert_eq!(r.released[..], r.all_sent[..r.released.len()]);
    assert!(r.all_sent.len() - r.released.len() <= 1);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn any_chunking_loses_nothing(seed in any::<u64>(), max_chunk in 1usize..700) {
        let r = run(seed, 4096 + 300, LinkFaults::clean(max_chunk));
        prop_assert!(r.rekeys >= 1);
        prop_assert_eq!(&r.released[..], &r.all_sent[..r.released.len()]);
        prop_assert!(r.all_sent.len() - r.released.len() <= 1);
    }

    #[test]
    fn hostile_link_releases_only_authentic_blocks_in_order(
        seed in any::<u64>(),
        flip in 0u32..300,
        drop in 0u32..300,
        garbage in 0u32..20_000,
        key_corrupt in 0u32..20_000,
        key_replay in 0u32..20_000,
        key_garbage in 0u32..20_000,
        max_chunk in 1usize..700,
    ) {
        let faults = LinkFaults { flip, drop, garbage, key_corrupt, key_replay, key_garbage, max_chunk };
        let r = run(seed, SLOTS, faults);
        prop_assert!(is_subsequence(&r.released, &r.authentic),
            "released {} blocks, not a subsequence of the {} authentic ones", r.released.len(), r.authentic.len());
        // Nothing released twice (replays dropped).
        let mut seen = std::collections::HashSet::new();
        for b in &r.released {
            prop_assert!(seen.insert(*b), "a block was released twice");
        }
        // The link is lossy but the session recovers: most blocks get through.
        prop_assert!(r.released.len() * 2 > r.authentic.len(),
            "only {} of {} released", r.released.len(), r.authentic.len());
        prop_assert!(r.rekeys >= 2);
    }
}
