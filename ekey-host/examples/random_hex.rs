//! Prints 32 random bytes from an Entropy Key as hex.
//!
//! ```sh
//! cargo run -p ekey-host --example random_hex                       # the key on USB
//! cargo run -p ekey-host --example random_hex -- /dev/ttyACM0 KEYRING
//! ```

use rand_core::TryRng;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut key = ekey_host::rng::open_from_args(std::env::args().skip(1))?;
    let mut bytes = [0u8; 32];
    key.try_fill_bytes(&mut bytes)?;
    println!("{}", hex::encode(bytes));
    Ok(())
}
