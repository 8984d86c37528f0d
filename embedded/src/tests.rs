//! Host-side checks that the firmwares' loops do what they claim, and the
//! state machines' sizes on the host.
//!
//! `cargo test --lib --target x86_64-unknown-linux-gnu -- --nocapture`

extern crate std;

use std::println;
use std::vec::Vec;

use ekey_proto::host::{Session, State};

use crate::fixture;
use crate::session_app::{self, Replay};
use crate::transcript::{self, recorded};
use crate::xorshift::InsecureNonceRng;

fn replay_once(session: &mut Session) -> (Replay, Vec<[u8; 32]>, Vec<u8>) {
    let mut rng = InsecureNonceRng::new(fixture::NONCE_SEED);
    let mut blocks = Vec::new();
    let mut sent = Vec::new();
    let r = session_app::replay(
        session,
        &session_app::keyring(),
        &mut rng,
        transcript::KEY_TO_HOST,
        |b| blocks.push(*b),
        |t| sent.extend_from_slice(t),
    );
    (r, blocks, sent)
}

#[test]
fn session_fw_replay_releases_the_recorded_blocks() {
    let mut session = session_app::new_session();
    let (r, blocks, sent) = replay_once(&mut session);
    assert_eq!(r.state, State::Running);
    assert_eq!(r.faults, 0);
    assert_eq!(r.blocks, recorded::BLOCKS);
    assert_eq!(r.blocks, fixture::RECORDED_BLOCKS);
    assert!(r.info_events > 0, "the transcript has information frames");
    assert_eq!(r.info_events, recorded::INFO_EVENTS);
    assert_eq!(blocks.first(), Some(&recorded::FIRST_BLOCK));
    assert_eq!(blocks.last(), Some(&recorded::LAST_BLOCK));
    // It said exactly what the recorded host said.
    assert_eq!(sent, transcript::HOST_TO_KEY);
}

#[test]
fn session_fw_loop_is_steady() {
    // The firmware's loop: a fresh session and generator every round.
    let mut session = session_app::new_session();
    let first = replay_once(&mut session);
    session = session_app::new_session();
    let second = replay_once(&mut session);
    assert_eq!(first, second);
}

#[test]
fn wrong_key_releases_nothing() {
    let mut session = session_app::new_session();
    let mut rng = InsecureNonceRng::new(fixture::NONCE_SEED);
    let keyring =
        |_: &ekey_proto::keys::Serial| Some(ekey_proto::keys::LongTermKey::from_bytes([0x55; 32]));
    let r = session_app::replay(
        &mut session,
        &keyring,
        &mut rng,
        transcript::KEY_TO_HOST,
        |_| panic!("released entropy under the wrong key"),
        |_| {},
    );
    assert_eq!(r.blocks, 0);
    assert_eq!(r.state, State::LongTermKeyRejected);
}

#[cfg(feature = "device")]
#[test]
fn device_fw_cycle_keys_and_sends_entropy() {
    use crate::device_app;
    use crate::xorshift::XorShift32;

    let mut device = device_app::new_device();
    let mut noise = XorShift32::new(fixture::NOISE_SEED);
    let mut out = Vec::new();
    let produced = device_app::run(
        &mut device,
        &mut noise,
        transcript::HOST_TO_KEY,
        device_app::SLOTS_PER_CYCLE,
        |o| out.extend_from_slice(&o.bytes),
    );
    assert!(device.is_keyed());
    let stats = device.stats();
    assert_eq!(stats.rekeys, 1);
    assert!(
        stats.blocks > 78,
        "an information cycle comes after 78 blocks"
    );
    assert_eq!(u64::from(produced), stats.frames);
    assert!(out.starts_with(b"* S!"));
    let count = |tag: &[u8]| out.windows(tag.len()).filter(|w| *w == tag).count();
    assert_eq!(count(b"* K!"), 1);
    assert!(count(b"* E!") > 78);
    assert!(count(b"* I>") >= 3);
}

#[test]
fn sizes_on_this_host() {
    use core::mem::size_of;
    println!("host ({}-bit):", usize::BITS);
    println!("  size_of::<Session>() = {}", size_of::<Session>());
    #[cfg(feature = "device")]
    println!(
        "  size_of::<Device>()  = {}",
        size_of::<ekey_proto::device::Device>()
    );
    println!(
        "  transcript: {} bytes key->host, {} bytes host->key",
        transcript::KEY_TO_HOST.len(),
        transcript::HOST_TO_KEY.len()
    );
}
