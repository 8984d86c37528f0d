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
        "  size_of::<getrandom_app::KeyRng<fn(&[u8])>>() = {}",
        size_of::<crate::getrandom_app::KeyRng<fn(&[u8])>>()
    );
    println!(
        "  transcript: {} bytes key->host, {} bytes host->key",
        transcript::KEY_TO_HOST.len(),
        transcript::HOST_TO_KEY.len()
    );
}

// --- getrandom-fw: the key's RNG as getrandom's custom backend ----------
//
// These call `Backend::fill`, the body of getrandom-fw's
// `__getrandom_v03_custom`: on the host getrandom keeps the OS's source
// (the custom-backend cfg is set for thumbv7m-none-eabi only), so the
// extern function itself is exercised by the firmware build, not here.
// Each test has its own `Backend`, not the global `BACKEND`.

mod getrandom_backend {
    extern crate std;

    use std::boxed::Box;
    use std::sync::{Arc, Mutex};
    use std::vec;
    use std::vec::Vec;

    use ekey_proto::host::State;
    use ekey_proto::keys::LongTermKey;
    use ekey_proto::rng::{EntropyKeyRng, SingleKey};
    use getrandom::Error;

    use crate::fixture;
    use crate::getrandom_app::{self, ReplayLink, TickClock};
    use crate::getrandom_backend::{self as backend, Backend, KeySource};
    use crate::transcript::{self, recorded};
    use crate::xorshift::InsecureNonceRng;

    fn leak<T>(t: T) -> &'static mut T {
        Box::leak(Box::new(t))
    }

    /// What the RNG sent to the "key".
    type Sent = Arc<Mutex<Vec<u8>>>;

    /// getrandom-fw's RNG, keyed; the host's bytes are collected in `log`.
    fn keyed_rng(log: Sent) -> &'static mut getrandom_app::KeyRng<impl FnMut(&[u8]) + Send> {
        let rng = leak(getrandom_app::new_key_rng(
            transcript::KEY_TO_HOST,
            move |b: &[u8]| log.lock().unwrap().extend_from_slice(b),
        ));
        getrandom_app::key_session(rng).expect("the recorded key keys");
        assert_eq!(rng.state(), State::Running);
        rng
    }

    #[test]
    fn fails_before_registration_and_writes_nothing() {
        let backend = Backend::new();
        assert!(!backend.is_registered());
        let mut buf = [0xa5u8; 16];
        assert_eq!(backend.fill(&mut buf), Err(backend::NOT_REGISTERED));
        assert_eq!(buf, [0xa5; 16]);
        assert_eq!(
            backend::code_of(backend::NOT_REGISTERED),
            Some(backend::code::NOT_REGISTERED)
        );
        assert_eq!(backend::code_of(Error::UNSUPPORTED), None);
        assert_ne!(backend::NOT_REGISTERED, Error::UNSUPPORTED);
    }

    #[test]
    fn hands_out_the_keys_bytes_then_the_keys_error() {
        let sent = Sent::default();
        let rng = keyed_rng(Arc::clone(&sent));
        let backend = Backend::new();
        assert!(backend.register(rng).is_ok());
        assert!(backend.is_registered());

        // Keying used the stream's first byte.
        let mut first = [0u8; 31];
        backend.fill(&mut first).unwrap();
        assert_eq!(first[..], recorded::FIRST_BLOCK[1..]);
        // Then block by block, the last one being the recording's last.
        let mut blocks = 0;
        let mut last = [0u8; 32];
        let err = loop {
            let mut buf = [0x5au8; 32];
            match backend.fill(&mut buf) {
                Ok(()) => {
                    blocks += 1;
                    last = buf;
                }
                Err(e) => {
                    assert_eq!(buf, [0; 32], "no bytes on error");
                    break e;
                }
            }
        };
        assert_eq!(blocks, fixture::RECORDED_BLOCKS - 1);
        assert_eq!(last, recorded::LAST_BLOCK);
        // The recording ran out: end of file, reported as such, for good.
        assert_eq!(err, backend::KEY_EOF);
        assert_eq!(backend::code_of(err), Some(backend::code::KEY_EOF));
        assert_eq!(backend.fill(&mut [0; 1]), Err(backend::KEY_EOF));
        // The RNG said what the recorded host said (reset, `K` + nonce).
        assert_eq!(*sent.lock().unwrap(), transcript::HOST_TO_KEY);
    }

    #[test]
    fn a_failed_fill_wipes_the_bytes_it_got() {
        let rng = keyed_rng(Sent::default());
        let backend = Backend::new();
        assert!(backend.register(rng).is_ok());
        // One byte more than the recording has left: every byte but the
        // last was the key's, and the call still fails with nothing in it.
        let left = fixture::RECORDED_BLOCKS as usize * 32 - 1;
        let mut buf = vec![0x5au8; left + 1];
        assert_eq!(backend.fill(&mut buf), Err(backend::KEY_EOF));
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn a_wrong_long_term_key_gives_an_error_not_bytes() {
        let mut rng = EntropyKeyRng::new(
            ReplayLink::new(transcript::KEY_TO_HOST, |_: &[u8]| {}),
            SingleKey::new(LongTermKey::from_bytes([0x55; 32])),
            InsecureNonceRng::new(fixture::NONCE_SEED),
            TickClock::default(),
        );
        let mut buf = [0x5au8; 8];
        assert_eq!(
            KeySource::fill(&mut rng, &mut buf),
            Err(backend::KEY_REJECTED)
        );
        assert_eq!(rng.state(), State::LongTermKeyRejected);

        let backend = Backend::new();
        assert!(backend.register(leak(rng)).is_ok());
        let mut buf = [0x5au8; 8];
        assert_eq!(backend.fill(&mut buf), Err(backend::KEY_REJECTED));
        assert_eq!(buf, [0; 8]);
    }

    /// A source that fills with one byte value.
    struct Pattern(u8);

    impl KeySource for Pattern {
        fn fill(&mut self, dest: &mut [u8]) -> Result<(), Error> {
            dest.fill(self.0);
            Ok(())
        }
    }

    #[test]
    fn registers_once() {
        let backend = Backend::new();
        assert!(backend.register(leak(Pattern(1))).is_ok());
        assert!(backend.register(leak(Pattern(2))).is_err());
        let mut buf = [0u8; 4];
        backend.fill(&mut buf).unwrap();
        assert_eq!(buf, [1; 4]);
    }

    /// A source that calls the backend again from inside `fill`, as an
    /// interrupt handler calling getrandom during a call would.
    struct Reentrant(&'static Backend);

    impl KeySource for Reentrant {
        fn fill(&mut self, dest: &mut [u8]) -> Result<(), Error> {
            let mut inner = [0u8; 4];
            match self.0.fill(&mut inner) {
                Err(e) if e == backend::BUSY => {
                    dest.fill(0xb5);
                    Ok(())
                }
                _ => Err(Error::UNEXPECTED),
            }
        }
    }

    #[test]
    fn a_call_during_a_call_is_busy_not_a_deadlock() {
        let backend: &'static Backend = leak(Backend::new());
        assert!(backend.register(leak(Reentrant(backend))).is_ok());
        let mut buf = [0u8; 8];
        backend.fill(&mut buf).unwrap();
        assert_eq!(buf, [0xb5; 8]);
        // And the source was put back.
        backend.fill(&mut buf).unwrap();
    }
}
