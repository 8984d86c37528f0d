//! Serial numbers and the secret keys of the protocol.
//!
//! Secret types ([`LongTermKey`], [`SessionKey`], [`MasterKey`]) are wiped
//! when dropped and never show their bytes through `Debug`.

use core::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::pem;

/// Length of a serial number in bytes.
pub const SERIAL_LEN: usize = 12;
/// Length of a serial number as PEM64 text.
pub const SERIAL_PEM_LEN: usize = 16;
/// Length of every key (long-term, session, master) in bytes.
pub const KEY_LEN: usize = 32;
/// Length of a 32-byte key as PEM64 text (with one `=` filler).
pub const KEY_PEM_LEN: usize = 44;

/// A key's 12-byte serial number; shown as its 16 PEM64 characters.
///
/// ```
/// use ekey_proto::keys::Serial;
/// let s: Serial = "NwBvBlg3OTBJORFD".parse().unwrap();
/// assert_eq!(s.to_pem().as_str(), "NwBvBlg3OTBJORFD");
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Serial(pub [u8; SERIAL_LEN]);

impl Serial {
    /// The serial's bytes.
    pub const fn as_bytes(&self) -> &[u8; SERIAL_LEN] {
        &self.0
    }

    /// Parses the 16-character PEM64 form.
    pub fn from_pem(text: &[u8]) -> Result<Self, KeyTextError> {
        let mut out = [0u8; SERIAL_LEN];
        decode_exact(text, SERIAL_PEM_LEN, &mut out)?;
        Ok(Serial(out))
    }

    /// The 16-character PEM64 form.
    pub fn to_pem(&self) -> heapless::String<SERIAL_PEM_LEN> {
        let mut buf = [0u8; SERIAL_PEM_LEN];
        let n = pem::encode(&self.0, &mut buf).unwrap_or(0);
        let mut s = heapless::String::new();
        for &b in buf.get(..n).unwrap_or(&[]) {
            let _ = s.push(char::from(b));
        }
        s
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.to_pem().as_str())
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Serial({})", self.to_pem().as_str())
    }
}

impl core::str::FromStr for Serial {
    type Err = KeyTextError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Serial::from_pem(s.as_bytes())
    }
}

/// Why a serial number or key in text form was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum KeyTextError {
    /// The text has the wrong number of characters.
    Length {
        /// Characters expected.
        expected: usize,
        /// Characters found.
        found: usize,
    },
    /// The text is not valid PEM64.
    Pem(pem::Error),
}

impl fmt::Display for KeyTextError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyTextError::Length { expected, found } => {
                write!(f, "expected {expected} characters, found {found}")
            }
            KeyTextError::Pem(e) => write!(f, "{e}"),
        }
    }
}

impl core::error::Error for KeyTextError {}

fn decode_exact(text: &[u8], chars: usize, out: &mut [u8]) -> Result<(), KeyTextError> {
    if text.len() != chars {
        return Err(KeyTextError::Length {
            expected: chars,
            found: text.len(),
        });
    }
    let n = pem::decode(text, out).map_err(KeyTextError::Pem)?;
    if n != out.len() {
        return Err(KeyTextError::Length {
            expected: chars,
            found: text.len(),
        });
    }
    Ok(())
}

macro_rules! secret_key {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Zeroize, ZeroizeOnDrop)]
        pub struct $name([u8; KEY_LEN]);

        /// Constant-time, like [`ct_eq`]($name::ct_eq).
        impl PartialEq for $name {
            fn eq(&self, other: &Self) -> bool {
                self.ct_eq(other)
            }
        }

        impl Eq for $name {}

        impl $name {
            /// Wraps 32 key bytes.
            pub const fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                $name(bytes)
            }

            /// The key bytes. Handle with care: never log them.
            pub const fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }

            /// Parses the 44-character PEM64 form (as in a keyring file).
            pub fn from_pem(text: &[u8]) -> Result<Self, KeyTextError> {
                let mut out = [0u8; KEY_LEN];
                let r = decode_exact(text, KEY_PEM_LEN, &mut out);
                let key = $name(out);
                out.zeroize();
                r.map(|()| key)
            }

            /// The 44-character PEM64 form (for a keyring file).
            pub fn to_pem(&self) -> zeroize::Zeroizing<[u8; KEY_PEM_LEN]> {
                let mut buf = zeroize::Zeroizing::new([0u8; KEY_PEM_LEN]);
                let _ = pem::encode(&self.0, &mut buf[..]);
                buf
            }

            /// Constant-time comparison.
            pub fn ct_eq(&self, other: &Self) -> bool {
                use subtle::ConstantTimeEq;
                self.0.ct_eq(&other.0).into()
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        #[cfg(feature = "defmt")]
        impl defmt::Format for $name {
            fn format(&self, f: defmt::Formatter<'_>) {
                defmt::write!(f, "{=str}(<redacted>)", stringify!($name))
            }
        }
    };
}

secret_key!(
    /// A key's long-term key (LTK): set with the master key, kept in the
    /// key's flash and in the host's keyring; session keys derive from it.
    LongTermKey
);
secret_key!(
    /// A session key, negotiated every 4096 entropy frames.
    SessionKey
);
secret_key!(
    /// The master key printed on the key's card (the 32 key bytes, without
    /// the check byte); see [`crate::rekey`] for parsing the printed form.
    MasterKey
);

impl SessionKey {
    /// The all-zero session key a key uses right after a reset.
    pub const ZERO: SessionKey = SessionKey([0; KEY_LEN]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_debug_print() {
        let k = LongTermKey::from_bytes([0x41; 32]);
        let mut s = heapless::String::<64>::new();
        fmt::write(&mut s, format_args!("{k:?}")).unwrap();
        assert_eq!(s.as_str(), "LongTermKey(<redacted>)");
    }

    #[test]
    fn key_pem_round_trip() {
        let k = LongTermKey::from_bytes([7; 32]);
        let pem = k.to_pem();
        let back = LongTermKey::from_pem(&pem[..]).unwrap();
        assert!(back.ct_eq(&k));
        assert!(matches!(
            LongTermKey::from_pem(b"short"),
            Err(KeyTextError::Length {
                expected: 44,
                found: 5
            })
        ));
    }

    #[test]
    fn serial_rejects_bad_text() {
        assert!("NwBvBlg3OTBJORF*".parse::<Serial>().is_err());
        assert!("NwBvBlg3OTBJORF".parse::<Serial>().is_err());
    }
}
