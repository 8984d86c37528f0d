//! session-fw: the host side of the Entropy Key protocol on a Cortex-M3.
//!
//! A `Session` is fed a recorded key's bytes (an opaque static slice: see
//! `transcript`), answers it with the insecure test nonce generator, and
//! publishes every released entropy block to `sink::ENTROPY_OUT`. When the
//! recording runs out it starts over with a fresh session, forever.

#![no_std]
#![no_main]
// No unsafe code of our own. (cortex-m-rt's `#[entry]` expansion has its
// own, turning the `static mut` below into a `&'static mut`; the lint does
// not apply to it.)
#![deny(unsafe_code)]

use core::hint::black_box;
use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use ekey_embedded::xorshift::InsecureNonceRng;
use ekey_embedded::{fixture, session_app, sink, transcript};
use ekey_proto::host::Session;
use panic_halt as _;

#[entry]
fn main() -> ! {
    // cortex-m-rt turns this into a `&'static mut` (safe: `main` runs once),
    // so the session lives in static RAM, not on the stack. `MaybeUninit`
    // rather than `Option`: `Option::<Session>::None` is not all zero bytes,
    // so it would land in .data and cost its full size in flash as well.
    static mut SESSION: MaybeUninit<Session> = MaybeUninit::uninit();

    let session: &'static mut Session = SESSION.write(session_app::new_session());
    let keyring = session_app::keyring();
    loop {
        // A real firmware seeds a real CSPRNG here (see `xorshift`).
        let mut rng = InsecureNonceRng::new(fixture::NONCE_SEED);
        // black_box: the optimiser must treat the input as unknown bytes.
        let input = black_box(transcript::KEY_TO_HOST);
        let done = session_app::replay(
            session,
            &keyring,
            &mut rng,
            input,
            sink::entropy,
            sink::transmit,
        );
        black_box(done);
        // Start over as after a power cycle. Assigning drops (and so
        // zeroizes) the old session's keys.
        *session = session_app::new_session();
    }
}
