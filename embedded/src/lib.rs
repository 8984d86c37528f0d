//! Firmware-style harnesses for `ekey-proto`, built for a Cortex-M3 to see
//! what the protocol costs in flash and RAM (see `measure.sh`).
//!
//! The driving loops live here, not in the binaries, so that the host-side
//! tests (`cargo test --lib --target x86_64-unknown-linux-gnu`) run exactly
//! the code the firmwares run:
//!
//! - [`session_app`]: a host [`Session`](ekey_proto::host::Session) replaying
//!   a recorded key ([`transcript::KEY_TO_HOST`]); `session-fw`.
//! - [`device_app`]: a software [`Device`](ekey_proto::device::Device) fed the
//!   host's recorded commands ([`transcript::HOST_TO_KEY`]); `device-fw`.
//! - [`getrandom_app`] and [`getrandom_backend`]: ekey-proto's
//!   [`EntropyKeyRng`](ekey_proto::rng::EntropyKeyRng) over a transport
//!   replaying the recorded key, registered as `getrandom`'s custom
//!   backend; `getrandom-fw` (its module docs list the steps).
//!
//! Nothing here is a real firmware: there is no USB, the clock is a counter,
//! and the nonce generator is deliberately insecure ([`xorshift`]).

#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "device")]
pub mod device_app;
pub mod fixture;
pub mod getrandom_app;
pub mod getrandom_backend;
#[cfg(feature = "usb")]
pub mod register_bus;
pub mod session_app;
pub mod sink;
pub mod transcript;
pub mod xorshift;

#[cfg(test)]
mod tests;
