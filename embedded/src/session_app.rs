//! session-fw's loop: a host [`Session`] fed bytes from a fake key.

use ekey_proto::host::{Config, Event, KeyLookup, Session, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;

use crate::fixture;

/// What one replay did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Replay {
    /// Entropy blocks released.
    pub blocks: u32,
    /// `Event::Info` events seen.
    pub info_events: u32,
    /// `Event::Fault` events seen.
    pub faults: u32,
    /// The session's state at the end.
    pub state: State,
}

/// A fresh session, as a firmware makes one after power-on.
pub fn new_session() -> Session {
    Session::new(Config::default(), Instant::ZERO)
}

/// The keyring: a closure holding one long-term key, for one serial.
///
/// `LongTermKey` is zeroized on drop; the copy handed to the session lives
/// as long as the session keeps it.
pub fn keyring() -> impl Fn(&Serial) -> Option<LongTermKey> {
    let serial = Serial(fixture::SERIAL);
    let key = LongTermKey::from_bytes(fixture::LONG_TERM_KEY);
    move |s: &Serial| (*s == serial).then(|| key.clone())
}

/// Feeds `input` (bytes "from the key") to `session` until it is used up,
/// handing released blocks to `on_block` and the session's bytes for the
/// key to `on_transmit`. The clock moves one frame time per call of
/// `handle_input`.
pub fn replay<K, R>(
    session: &mut Session,
    keyring: &K,
    rng: &mut R,
    mut input: &[u8],
    mut on_block: impl FnMut(&[u8; 32]),
    mut on_transmit: impl FnMut(&[u8]),
) -> Replay
where
    K: KeyLookup + ?Sized,
    R: rand_core::TryCryptoRng + ?Sized,
{
    let mut result = Replay {
        blocks: 0,
        info_events: 0,
        faults: 0,
        state: session.state(),
    };
    let mut millis: u64 = 0;
    loop {
        // Transmit first: the session opens with a reset for the key.
        while let Some(tx) = session.poll_transmit() {
            on_transmit(&tx);
        }
        if input.is_empty() {
            break;
        }
        let now = Instant::from_millis(millis);
        let used = session.handle_input(now, input, keyring, rng);
        input = input.get(used..).unwrap_or(&[]);
        millis += fixture::MS_PER_FRAME;
        while let Some(event) = session.poll_event() {
            match event {
                Event::Entropy { data, .. } => {
                    result.blocks += 1;
                    on_block(&data);
                }
                Event::Info(_) => result.info_events += 1,
                Event::Fault(_) => result.faults += 1,
                _ => {}
            }
        }
        session.handle_timeout(now);
        if used == 0 {
            // Cannot happen with the queue drained every time; never spin.
            break;
        }
    }
    result.state = session.state();
    result
}
