//! `ekey-host`: the Entropy Key daemon and tools, as a library.
//!
//! Work in progress: today it has the built-in software key
//! ([`soft::SoftKey`]) that `ekey-host run --emulate` runs on.

pub mod cli;
pub mod control;
pub mod driver;
pub mod egd;
pub mod kernel;
pub mod keyring;
pub mod rng;
pub mod soft;
pub mod status;
pub mod transport;
pub mod usb;
