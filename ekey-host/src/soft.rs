//! The built-in software key: `ekey-proto`'s `device` state machine with
//! documented demo keys, fed by the operating system's CSPRNG.
//!
//! Its output is only as random as the OS generator it draws from: it is for
//! demos and tests, never a source to credit a kernel with.

use ekey_proto::device::{Device, DeviceConfig, Output};
use ekey_proto::keys::{LongTermKey, Serial};

/// Serial of the demo software key (PEM64 `RW11bGF0ZWRLZXkx`).
pub const DEMO_SERIAL: Serial = Serial(*b"EmulatedKey1");

/// Long-term key of the demo software key: 32 bytes of 0x5e. Public on
/// purpose: a software key protects nothing.
pub fn demo_long_term_key() -> LongTermKey {
    LongTermKey::from_bytes([0x5e; 32])
}

/// A software key in this process.
pub struct SoftKey {
    device: Device,
    noise: rand_core::UnwrapErr<getrandom::SysRng>,
}

impl SoftKey {
    /// The demo key.
    pub fn demo() -> Self {
        Self::new(DeviceConfig::new(DEMO_SERIAL, demo_long_term_key()))
    }

    /// A software key with this configuration.
    pub fn new(config: DeviceConfig) -> Self {
        SoftKey {
            device: Device::new(config),
            noise: rand_core::UnwrapErr(getrandom::SysRng),
        }
    }

    /// Bytes from the host.
    pub fn write(&mut self, bytes: &[u8]) {
        self.device.handle_input(bytes, &mut self.noise);
    }

    /// One frame slot's output, if the key has something to say.
    pub fn poll(&mut self) -> Option<Output> {
        self.device.poll(&mut self.noise)
    }

    /// The key's serial.
    pub fn serial(&self) -> Serial {
        self.device.serial()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_serial_reads_as_documented() {
        assert_eq!(DEMO_SERIAL.to_string(), "RW11bGF0ZWRLZXkx");
    }
}
