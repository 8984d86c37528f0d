//! Fast randomness from a slow true RNG: a ChaCha20 generator seeded from
//! the Entropy Key and reseeded from it every 64 MiB of output. Prints how
//! fast it went and how much the key gave.
//!
//! ```sh
//! cargo run --release -p ekey-host --example chacha_reseed -- [DEVICE [KEYRING]]
//! ```

use rand_chacha::ChaCha20Rng;
use rand_core::{Rng, SeedableRng};

const RESEED_EVERY: usize = 64 << 20;
const TOTAL: usize = 256 << 20;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut key = ekey_host::rng::open_from_args(std::env::args().skip(1))?;
    // A failing key is an error here, not a panic: reseeding is fallible.
    let mut rng = ChaCha20Rng::try_from_rng(&mut key)?;
    let start = std::time::Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let (mut produced, mut reseeds) = (0usize, 0u32);
    while produced < TOTAL {
        rng.fill_bytes(&mut buf);
        produced += buf.len();
        if produced % RESEED_EVERY == 0 {
            rng = ChaCha20Rng::try_from_rng(&mut key)?;
            reseeds += 1;
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{} MiB in {secs:.2} s ({:.0} MiB/s), {reseeds} reseeds, {} bytes from the key",
        produced >> 20,
        (produced >> 20) as f64 / secs,
        32 * (reseeds + 1)
    );
    Ok(())
}
