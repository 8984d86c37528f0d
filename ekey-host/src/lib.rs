//! `ekey-host`: the Entropy Key daemon and tools, as a library.
//!
//! - [`rng`]: a key as a `rand_core` RNG in your own program
//!   (`rng::open(None, keyring)` takes the key on USB); see
//!   `examples/random_hex.rs` and `examples/chacha_reseed.rs`.
//! - [`transport`] and [`usb`]: keys on ttys, Unix sockets and USB (nusb),
//!   as async byte streams; [`driver`]: one `Session` per key, verified
//!   blocks out with backpressure.
//! - Between keys and outputs, each key's health gate
//!   ([`ekey_proto::health`], run by [`driver`]).
//! - Outputs: [`egd`] (the EGD server QEMU's `rng-egd` reads) and
//!   [`kernel`] (`RNDADDENTROPY`); [`feed`], the guest-side feeder that
//!   reads an EGD server into a guest's kernel.
//! - [`metrics`]: Prometheus metrics over HTTP.
//! - [`keyring`] (ekeyd's format, atomic 0600 writes), [`control`] and
//!   [`status`] (the daemon's control socket), [`soft`] (the built-in
//!   software key), [`cli`] (the `ekey-host` command line).

pub mod cli;
pub mod control;
pub mod driver;
pub mod egd;
pub mod feed;
pub mod kernel;
pub mod keyring;
pub mod metrics;
pub mod rng;
pub mod soft;
pub mod status;
pub mod transport;
pub mod usb;
