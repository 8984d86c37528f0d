//! Host commands (host → key), PROTOCOL.md §5.
//!
//! ```
//! use ekey_proto::wire::command::Command;
//! let mut buf = [0u8; 32];
//! let n = Command::SessionRekey(&[0u8; 12]).write(&mut buf).unwrap();
//! assert_eq!(&buf[..n], b"KAAAAAAAAAAAAAAAA.");
//! ```

use crate::pem;

/// Ctrl-C: resets the key's state machines in any state.
pub const RESET: u8 = 0x03;

/// The longest nonce this crate sends or accepts in a command it builds.
pub const MAX_NONCE_LEN: usize = 48;

/// The longest command [`Command::write`] produces.
pub const MAX_COMMAND_LEN: usize = 2 + pem::encoded_len(MAX_NONCE_LEN);

/// A command the host sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Command<'a> {
    /// `0x03`.
    Reset,
    /// `K` PEM64(nonce) `.`: re-key the session.
    SessionRekey(&'a [u8]),
    /// `M` + 8 PEM64 characters: the MAC of a coming long-term nonce.
    LongTermMac([u8; 6]),
    /// `L` PEM64(nonce) `.`: long-term re-key.
    LongTermRekey(&'a [u8]),
}

/// Why a command could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CommandError {
    /// The nonce is longer than [`MAX_NONCE_LEN`].
    NonceTooLong,
    /// The output buffer is too small.
    BufferTooSmall,
}

impl core::fmt::Display for CommandError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CommandError::NonceTooLong => "nonce too long",
            CommandError::BufferTooSmall => "buffer too small",
        })
    }
}

impl core::error::Error for CommandError {}

impl Command<'_> {
    /// Bytes this command takes on the wire.
    pub fn len(&self) -> usize {
        match self {
            Command::Reset => 1,
            Command::SessionRekey(n) | Command::LongTermRekey(n) => {
                2usize.saturating_add(pem::encoded_len(n.len()))
            }
            Command::LongTermMac(_) => 9,
        }
    }

    /// Always false: every command has at least one byte.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Writes the command into `out`, returning its length.
    pub fn write(&self, out: &mut [u8]) -> Result<usize, CommandError> {
        let len = self.len();
        let out = out.get_mut(..len).ok_or(CommandError::BufferTooSmall)?;
        let (letter, body, end): (u8, &[u8], Option<u8>) = match self {
            Command::Reset => (RESET, &[], None),
            Command::SessionRekey(n) => (b'K', n, Some(b'.')),
            Command::LongTermRekey(n) => (b'L', n, Some(b'.')),
            Command::LongTermMac(m) => (b'M', m, None),
        };
        if body.len() > MAX_NONCE_LEN {
            return Err(CommandError::NonceTooLong);
        }
        let (first, rest) = out.split_first_mut().ok_or(CommandError::BufferTooSmall)?;
        *first = letter;
        let n = pem::encode(body, rest).map_err(|_| CommandError::BufferTooSmall)?;
        if let Some(e) = end {
            *rest.get_mut(n).ok_or(CommandError::BufferTooSmall)? = e;
        }
        Ok(len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_json_first_command() {
        // From vectors/session.json: nonce 00000000 b162bc78bde45770.
        let nonce = [0, 0, 0, 0, 0xb1, 0x62, 0xbc, 0x78, 0xbd, 0xe4, 0x57, 0x70];
        let mut buf = [0u8; MAX_COMMAND_LEN];
        let n = Command::SessionRekey(&nonce).write(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"KAAAAALFivHi95Fdw.");
    }

    #[test]
    fn rejects_small_buffer_and_long_nonce() {
        let mut buf = [0u8; 4];
        assert_eq!(
            Command::SessionRekey(&[0; 12]).write(&mut buf),
            Err(CommandError::BufferTooSmall)
        );
        let mut big = [0u8; 200];
        assert_eq!(
            Command::LongTermRekey(&[0; 60]).write(&mut big),
            Err(CommandError::NonceTooLong)
        );
        assert_eq!(Command::Reset.write(&mut buf), Ok(1));
        assert_eq!(buf[0], 3);
    }
}
