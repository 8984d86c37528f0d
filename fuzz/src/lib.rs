//! What the fuzz targets share.

use std::convert::Infallible;

/// A xorshift generator: fast, deterministic noise and nonces for the
/// software key and the host (marked crypto only so the protocol's APIs
/// take it; it is not).
pub struct Xs(pub u64);

impl rand_core::TryRng for Xs {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.try_next_u64()? as u32)
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Ok(self.0)
    }
    fn try_fill_bytes(&mut self, d: &mut [u8]) -> Result<(), Infallible> {
        for b in d {
            *b = self.try_next_u64()? as u8;
        }
        Ok(())
    }
}

impl rand_core::TryCryptoRng for Xs {}
