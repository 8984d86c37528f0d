//! Stands for any `no_std` crate that needs random bytes and asks
//! [`getrandom`] for them: a TLS stack, a UUID generator, a hash map's
//! seed. It knows nothing of the Entropy Key and has no `unsafe` code;
//! which source `getrandom::fill` reads is the firmware's choice
//! (`getrandom-fw` registers the key's RNG as getrandom's custom backend).

#![no_std]
#![forbid(unsafe_code)]

/// A fresh 32-byte secret (say, a key for a session with a peer), or
/// getrandom's error when no random bytes can be had. Never made-up bytes:
/// the error goes to the caller.
pub fn secret_key() -> Result<[u8; 32], getrandom::Error> {
    let mut key = [0u8; 32];
    getrandom::fill(&mut key)?;
    Ok(key)
}
