//! getrandom-fw: the Entropy Key as `getrandom`'s source in a `no_std`
//! Cortex-M3 firmware, so that any crate calling `getrandom::fill` (here
//! the stand-in crate `getrandom-user`) gets the key's verified, decrypted
//! bytes.
//!
//! The steps (see also `ekey_embedded::getrandom_backend`):
//!
//! 1. **The cfg flag.** `.cargo/config.toml` builds every crate for
//!    `thumbv7m-none-eabi` with `--cfg getrandom_backend="custom"`. It must
//!    be a rustflag (`[target.<triple>] rustflags` or `RUSTFLAGS`): a build
//!    script's `cargo:rustc-cfg` would not reach getrandom. Note that a
//!    `RUSTFLAGS` environment variable replaces the config's rustflags.
//! 2. **The extern function.** With that flag getrandom 0.4 calls
//!    `__getrandom_v03_custom` (the same symbol and signature as in 0.3),
//!    defined once in the root crate: here, at the bottom of this file. It
//!    zeroes the buffer it is given (getrandom may pass uninitialised
//!    memory), then fills it from `getrandom_backend::BACKEND`.
//! 3. **Registering the RNG.** At start-up `main` builds ekey-proto's
//!    `EntropyKeyRng` (here over a transport replaying the recorded key of
//!    `build.rs`; on a board, the USB host's CDC-ACM channel to the key) in
//!    a `static`, keys the session (`getrandom_app::key_session`: a key we
//!    cannot trust is found here, not inside some crate's call) and
//!    registers it with `BACKEND.register`, once.
//! 4. **Before registration**, and whenever the key cannot deliver,
//!    getrandom returns an error with a custom code (`NOT_REGISTERED`,
//!    `KEY_EOF`, ...; `getrandom_backend::code`), never made-up bytes. The
//!    firmware shows both: a call before registration, and calls after the
//!    recording has run out (the transport then reports end of file).
//!
//! What the firmware publishes (see `sink`): every 32-byte secret
//! `getrandom_user::secret_key` got to `ENTROPY_OUT` (counted in
//! `BLOCKS_OUT`), each failed call to `GETRANDOM_ERRORS` with its code in
//! `GETRANDOM_LAST_ERROR`, the host's bytes to the key to `TX_DATA`. With
//! the recording (24 blocks of 32 bytes, one byte spent on keying) that
//! is: one `NOT_REGISTERED`, 23 secrets, then `KEY_EOF`, and idle.
//!
//! **The nonce generator is not secure** (see `xorshift`): a real firmware
//! seeds the RNG's nonces from the MCU's TRNG.

#![no_std]
#![no_main]
// The only unsafe code of ours is `__getrandom_v03_custom` (allowed there).
// (cortex-m-rt's `#[entry]` expansion has its own, turning the `static mut`
// below into a `&'static mut`; the lint does not apply to it.)
#![deny(unsafe_code)]

use core::hint::black_box;
use core::mem::MaybeUninit;

use cortex_m_rt::entry;
use ekey_embedded::getrandom_app::{self, KeyRng};
use ekey_embedded::getrandom_backend::{self, BACKEND};
use ekey_embedded::{sink, transcript};
// Linked for its critical-section implementation (single core: masks
// interrupts), which BACKEND's mutex uses.
use cortex_m as _;
use panic_halt as _;

/// The key's RNG: the host's bytes go to `sink::transmit`.
type Rng = KeyRng<fn(&[u8])>;

/// One call of a crate that uses getrandom; its result goes to the sinks.
fn draw() -> bool {
    match getrandom_user::secret_key() {
        Ok(secret) => {
            sink::entropy(&secret);
            true
        }
        Err(e) => {
            record(e);
            false
        }
    }
}

fn record(e: getrandom::Error) {
    sink::getrandom_error(getrandom_backend::code_of(e).map_or(u32::MAX, u32::from));
}

#[entry]
fn main() -> ! {
    // cortex-m-rt turns this into a `&'static mut` (safe: `main` runs once):
    // the RNG lives in static RAM for good, as registering requires, and
    // `MaybeUninit` keeps it in .bss (as the other firmwares' state).
    static mut RNG: MaybeUninit<Rng> = MaybeUninit::uninit();

    // Nothing registered yet: getrandom fails with NOT_REGISTERED.
    draw();

    // black_box: the optimiser must treat the recording as unknown bytes.
    let input = black_box(transcript::KEY_TO_HOST);
    let rng: &'static mut Rng = RNG.write(getrandom_app::new_key_rng(
        input,
        sink::transmit as fn(&[u8]),
    ));
    match getrandom_app::key_session(rng) {
        Ok(()) => {
            if BACKEND.register(rng).is_err() {
                panic!("registered twice");
            }
        }
        // Not registered: getrandom keeps failing with NOT_REGISTERED.
        Err(e) => record(getrandom_backend::key_error(&e)),
    }

    // Crates calling getrandom now get the key's bytes, until it cannot
    // deliver (here: the recording ends).
    while draw() {}
    loop {
        cortex_m::asm::wfi();
    }
}

/// getrandom's custom backend (getrandom 0.4 with
/// `--cfg getrandom_backend="custom"`): getrandom calls this for every
/// non-empty request, with `dest` pointing to `len` writable bytes that may
/// be uninitialised. Defined once, in the root crate.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
unsafe extern "Rust" fn __getrandom_v03_custom(
    dest: *mut u8,
    len: usize,
) -> Result<(), getrandom::Error> {
    // SAFETY: getrandom hands us `len` bytes at `dest`, valid for writes and
    // not aliased for the duration of the call. Writing zeros first makes
    // them initialised, so they may then be viewed as a `&mut [u8]`.
    let dest = unsafe {
        core::ptr::write_bytes(dest, 0, len);
        core::slice::from_raw_parts_mut(dest, len)
    };
    BACKEND.fill(dest)
}
