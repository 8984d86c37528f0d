//! A tiny xorshift32 generator behind rand_core 0.10's traits. Shared with
//! `build.rs` (through `#[path]`), so it uses nothing but `core` and
//! `rand_core`.
//!
//! **Not a cryptographic generator.** It is here so the size figures are
//! those of the protocol code, not of a CSPRNG. A real host firmware must
//! feed [`Session`](ekey_proto::host::Session) nonces from a real CSPRNG
//! (the MCU's TRNG, or a ChaCha generator such as `rand_chacha` seeded from
//! it): the session key is derived from the host's nonce, and a predictable
//! nonce lets a fake key replay an old session. The key's noise source, too,
//! would be a hardware noise source on a real device.

use core::convert::Infallible;

/// Marsaglia's xorshift32 (13, 17, 5). The state is never zero.
#[derive(Clone, Debug)]
pub struct XorShift32 {
    state: u32,
}

impl XorShift32 {
    /// A generator from `seed` (a zero seed is replaced, as zero is a fixed
    /// point).
    pub const fn new(seed: u32) -> Self {
        XorShift32 {
            state: if seed == 0 { 0x6d2b_79f5 } else { seed },
        }
    }

    fn step(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        x
    }
}

// Infallible, so the blanket impl makes it a `rand_core::Rng`: the key's
// noise source (`Device::poll` wants `Rng`).
impl rand_core::TryRng for XorShift32 {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        Ok(self.step())
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let lo = u64::from(self.step());
        let hi = u64::from(self.step());
        Ok((hi << 32) | lo)
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for chunk in dst.chunks_mut(4) {
            let word = self.step().to_le_bytes();
            for (d, s) in chunk.iter_mut().zip(word) {
                *d = s;
            }
        }
        Ok(())
    }
}

/// The host's nonce generator in these firmwares: xorshift32 wearing the
/// [`rand_core::TryCryptoRng`] marker that `Session::handle_input` asks for.
///
/// **The marker is a lie here, on purpose and only here** (see the module
/// docs): replace this with a real CSPRNG in any firmware that talks to a
/// real key.
#[derive(Clone, Debug)]
pub struct InsecureNonceRng(pub XorShift32);

impl InsecureNonceRng {
    /// A generator from `seed`.
    pub const fn new(seed: u32) -> Self {
        InsecureNonceRng(XorShift32::new(seed))
    }
}

impl rand_core::TryRng for InsecureNonceRng {
    type Error = Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        self.0.try_next_u32()
    }

    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        self.0.try_next_u64()
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        self.0.try_fill_bytes(dst)
    }
}

// NOT cryptographically secure: see above.
impl rand_core::TryCryptoRng for InsecureNonceRng {}
