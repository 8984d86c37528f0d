#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]
//! The Simtec Electronics Entropy Key protocol (version 0) as `no_std`,
//! allocation-free, I/O-free state machines.
//!
//! Layers, bottom up:
//! - [`skein`]: Skein-256 **version 1.1** (the version the key speaks), with
//!   the keyed, personalised states every protocol operation uses;
//! - [`pem`]: PEM64 (base64) and the 12-bit sub-code;
//! - [`wire`]: finding 64-byte frames in a byte stream, typed packets, info
//!   items and host commands (parse and emit only);
//! - [`keys`]: serial numbers and the secret keys, zeroized on drop;
//! - [`host`]: the host's [`host::Session`], bytes in, events out;
//! - [`rekey`]: long-term re-keying with the master key;
//! - [`rng`]: [`rng::EntropyKeyRng`], a blocking `rand_core` RNG over an
//!   `embedded-io` transport to one key;
//! - [`device`]: the key's own side, a software Entropy Key.
//!
//! Nothing here reads a clock, allocates or panics on input: time comes in
//! as [`time::Instant`], bytes come in as slices, and everything that can go
//! wrong with input is an error value or a counted event.

pub mod crypto;
#[cfg(feature = "device")]
pub mod device;
pub mod health;
pub mod host;
pub mod keys;
pub mod pem;
pub mod rekey;
pub mod rng;
pub mod skein;
pub mod time;
#[cfg(feature = "usb-device")]
pub mod usb_class;
pub mod wire;
