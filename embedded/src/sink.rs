//! Where the firmwares put their output: statics a debugger (or
//! `measure.sh`'s QEMU run) can read, standing in for memory-mapped
//! registers.
//!
//! Every access goes through [`core::hint::black_box`] applied to the
//! static's address: the optimiser then cannot see which memory is written,
//! so it must keep the stores and everything computed for them (without
//! this, LTO could notice nobody reads these statics and delete the
//! protocol work feeding them). Atomics keep this safe code with no
//! `static mut`; on a Cortex-M3 a relaxed store is a plain `str`.

use core::hint::black_box;
use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

/// The last released entropy block, as eight little-endian words.
pub static ENTROPY_OUT: [AtomicU32; 8] = [const { AtomicU32::new(0) }; 8];

/// Entropy blocks released so far.
pub static BLOCKS_OUT: AtomicU32 = AtomicU32::new(0);

/// A stand-in for a UART data register: the last byte sent.
pub static TX_DATA: AtomicU32 = AtomicU32::new(0);

/// Bytes sent through [`TX_DATA`] so far.
pub static TX_COUNT: AtomicU32 = AtomicU32::new(0);

/// Frame slots that produced output (device-fw).
pub static FRAMES_OUT: AtomicU32 = AtomicU32::new(0);

/// getrandom calls that failed (getrandom-fw).
pub static GETRANDOM_ERRORS: AtomicU32 = AtomicU32::new(0);

/// The last failed getrandom call's error code (getrandom-fw): the
/// backend's custom code (`getrandom_backend::code`), or `u32::MAX` for
/// any other error.
pub static GETRANDOM_LAST_ERROR: AtomicU32 = AtomicU32::new(0);

/// Publishes one released entropy block.
pub fn entropy(block: &[u8; 32]) {
    let out = black_box(&ENTROPY_OUT);
    for (slot, word) in out.iter().zip(block.chunks_exact(4)) {
        slot.store(
            u32::from_le_bytes([word[0], word[1], word[2], word[3]]),
            Relaxed,
        );
    }
    black_box(&BLOCKS_OUT).fetch_add(1, Relaxed);
}

/// Sends bytes, one "register write" each.
pub fn transmit(bytes: &[u8]) {
    let data = black_box(&TX_DATA);
    for &b in bytes {
        data.store(u32::from(b), Relaxed);
    }
    black_box(&TX_COUNT).fetch_add(bytes.len() as u32, Relaxed);
}

/// Counts one frame slot that produced output.
pub fn frame_slot() {
    black_box(&FRAMES_OUT).fetch_add(1, Relaxed);
}

/// Counts one failed getrandom call and records its error code.
pub fn getrandom_error(code: u32) {
    black_box(&GETRANDOM_LAST_ERROR).store(code, Relaxed);
    black_box(&GETRANDOM_ERRORS).fetch_add(1, Relaxed);
}
