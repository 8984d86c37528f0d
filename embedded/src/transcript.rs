//! The conversation `build.rs` recorded between the host `Session` and the
//! software `Device` (same seeds and keys as the firmwares use).

/// Everything the key sent, in order: `S!`, `k>`, `K!`, `E!` frames and
/// information frames, until the host had released
/// [`fixture::RECORDED_BLOCKS`](crate::fixture::RECORDED_BLOCKS) blocks.
pub static KEY_TO_HOST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/key_to_host.bin"));

/// Everything the host sent: a reset (Ctrl-C), then `K` and its nonce.
pub static HOST_TO_KEY: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/host_to_key.bin"));

/// What the host released while recording.
pub mod recorded {
    include!(concat!(env!("OUT_DIR"), "/recorded.rs"));
}
