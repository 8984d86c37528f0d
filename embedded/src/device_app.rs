//! device-fw's loop: a software [`Device`] fed the host's commands.

use ekey_proto::device::{Device, DeviceConfig, Output};
use ekey_proto::keys::{LongTermKey, Serial};

use crate::fixture;

/// Frame slots per power cycle of device-fw: past one information cycle
/// (every 78 blocks by default).
pub const SLOTS_PER_CYCLE: u32 = 100;

/// Bytes the key reads per USB packet.
pub const PACKET: usize = 64;

/// A freshly powered key with the fixture's serial and long-term key, and
/// the documented defaults.
pub fn new_device() -> Device {
    Device::new(DeviceConfig::new(
        Serial(fixture::SERIAL),
        LongTermKey::from_bytes(fixture::LONG_TERM_KEY),
    ))
}

/// Runs `slots` frame slots: before each, the key reads the next packet
/// (up to [`PACKET`] bytes) of `commands`, if any is left; each slot's
/// output goes to `on_output`. Returns how many slots produced output.
pub fn run<R: rand_core::Rng + ?Sized>(
    device: &mut Device,
    noise: &mut R,
    mut commands: &[u8],
    slots: u32,
    mut on_output: impl FnMut(&Output),
) -> u32 {
    let mut produced = 0;
    for _ in 0..slots {
        if !commands.is_empty() {
            let (packet, rest) = commands.split_at(commands.len().min(PACKET));
            device.handle_input(packet, noise);
            commands = rest;
        }
        if let Some(output) = device.poll(noise) {
            produced += 1;
            on_output(&output);
        }
    }
    produced
}
