//! The one key both firmwares talk about. Shared with `build.rs` (through
//! `#[path]`), so it uses nothing but `core`.
//!
//! These are made-up values for a size check, not a real key's.

/// The key's serial number (12 bytes).
pub const SERIAL: [u8; 12] = *b"EMBEDDEDTEST";

/// The key's long-term key, as the host's keyring and the key's "flash"
/// both hold it.
pub const LONG_TERM_KEY: [u8; 32] = [
    0x3c, 0x91, 0x0e, 0x57, 0xa2, 0x6b, 0xd4, 0x18, 0x7f, 0xe0, 0x25, 0xb9, 0x40, 0x8d, 0x13, 0xc6,
    0x5a, 0xf2, 0x69, 0x04, 0xbb, 0x37, 0xde, 0x81, 0x1c, 0xa5, 0x72, 0x4e, 0xf9, 0x30, 0x8b, 0x66,
];

/// Seed of the host's (insecure, test-only) nonce generator. The recorded
/// transcript is only valid for the nonces this seed yields.
pub const NONCE_SEED: u32 = 0x1234_5678;

/// Seed of the key's noise source.
pub const NOISE_SEED: u32 = 0x9e37_79b9;

/// The recording runs until the host has released this many blocks.
pub const RECORDED_BLOCKS: u32 = 24;

/// `DeviceConfig::info_every` while recording: small, so that information
/// frames (`I>T V`, `I>F`, `I>S`) appear in a short transcript.
pub const RECORDED_INFO_EVERY: u32 = 8;

/// Milliseconds the host's clock moves per frame (a key sends about 90
/// frames a second).
pub const MS_PER_FRAME: u64 = 11;
