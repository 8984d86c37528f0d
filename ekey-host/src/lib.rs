//! `ekey-host`: the Entropy Key daemon and tools, as a library.
//!
//! Where things live:
//!
//! - [`keys`]: a key's link ([`keys::transport`]: ttys and Unix sockets;
//!   [`keys::usb`]: USB via nusb; [`keys::soft`]: the built-in software
//!   key) and [`keys::driver`], which runs one key's `Session` and health
//!   gate ([`ekey_proto::health`]) over its link and releases verified
//!   blocks.
//! - [`daemon`]: `run` (and `read`/`test`): starts the keys (discovery,
//!   hot-plug), the outputs, the control socket and the metrics, and moves
//!   each verified block to exactly one output (`daemon::dispatch`).
//! - [`outputs`]: [`outputs::egd`] (the EGD server QEMU's `rng-egd`
//!   reads), [`outputs::kernel`] (`RNDADDENTROPY`) and [`outputs::file`]
//!   (`--output`).
//! - [`commands`]: one module per subcommand, and [`commands::main`], the
//!   binary's entry; [`commands::feed`] is the guest-side feeder that reads
//!   an EGD server into a guest's kernel. [`cli`]: the command line (clap).
//! - [`rng`]: a key as a `rand_core` RNG in your own program
//!   (`rng::open(None, keyring)` takes the key on USB); see
//!   `examples/random_hex.rs` and `examples/chacha_reseed.rs`.
//! - `tls` (feature `tls`, on by default): rustls settings for the EGD
//!   server's `--egd-tls` listener and `feed --egd tls://`.
//! - [`keyring`] (ekeyd's format, atomic 0600 writes), [`status`] (the
//!   status document), [`metrics`] (Prometheus over HTTP).
//!
//! Where entropy lives on its way: the driver's gate holds a key's blocks
//! until they pass; the dispatcher holds at most one block
//! (`Dispatch::pending`) and the bounded channels to the outputs a few
//! more; the EGD server's pool and each client's granted bytes; the kernel
//! output's buffer; the `--output` thread's queue.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod ekeyd_conf;
pub mod keyring;
pub mod keys;
pub mod metrics;
#[cfg(not(unix))]
pub mod nounix;
pub mod outputs;
pub mod private;
pub mod rng;
pub mod signals;
pub mod status;
#[cfg(feature = "tls")]
pub mod tls;
pub mod vmgenid;
pub mod wipe;
