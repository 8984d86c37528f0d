//! The software key on arbitrary host commands: never panics.
#![no_main]

use std::convert::Infallible;

use ekey_proto::device::{Device, DeviceConfig};
use ekey_proto::keys::{LongTermKey, MasterKey, Serial};
use libfuzzer_sys::fuzz_target;

struct Noise(u8);
impl rand_core::TryRng for Noise {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(u32::from(self.0))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        Ok(u64::from(self.0))
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Infallible> {
        for b in d {
            self.0 = self.0.wrapping_mul(31).wrapping_add(7);
            *b = self.0;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut cfg = DeviceConfig::new(Serial([9; 12]), LongTermKey::from_bytes([1; 32]));
    cfg.master_key = Some(MasterKey::from_bytes([2; 32]));
    let mut d = Device::new(cfg);
    let mut noise = Noise(1);
    for chunk in data.chunks(7) {
        d.handle_input(chunk, &mut noise);
        for _ in 0..3 {
            let _ = d.poll(&mut noise);
        }
    }
});
