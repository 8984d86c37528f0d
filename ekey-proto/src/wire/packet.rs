//! Typed packets: parsing a 64-byte frame into a [`Packet`] and emitting one.
//!
//! The frame layout (PROTOCOL.md §4):
//!
//! ```text
//! 0..2   "* "       start of frame
//! 2      type       S I W E k K M L l B
//! 3      encoding   '>' text, '!' binary
//! 4..54  payload    50 bytes, space padded
//! 54..62 MAC        8 PEM64 characters
//! 62..64 "\r\n"     end of frame
//! ```
//!
//! Parsing never checks the MAC (see [`crate::crypto::FrameKeys::verify`]);
//! it only checks structure, and never panics.

use core::fmt;

use crate::crypto::{BLOCK_LEN, FrameKeys, MAC_CONTENT_LEN};
use crate::keys::{SERIAL_LEN, Serial};
use crate::pem;
use crate::wire::deframe::FRAME_LEN;

/// Length of a frame's payload.
pub const PAYLOAD_LEN: usize = 50;

/// Text carried by a text (`>`) frame, trailing padding removed.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Text(heapless::Vec<u8, PAYLOAD_LEN>);

impl Text {
    /// Text from bytes; anything past 50 bytes is cut off.
    pub fn new(bytes: &[u8]) -> Self {
        let mut v = heapless::Vec::new();
        for &b in bytes.iter().take(PAYLOAD_LEN) {
            let _ = v.push(b);
        }
        Text(v)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Text {
    /// Printable ASCII as is, anything else as `\xNN`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0.iter() {
            if (0x20..0x7f).contains(&b) {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[cfg(feature = "defmt")]
impl defmt::Format for Text {
    fn format(&self, f: defmt::Formatter<'_>) {
        defmt::write!(f, "{=[u8]:a}", self.as_bytes())
    }
}

/// One frame from the key, by type.
#[derive(Clone, PartialEq, Eq, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Packet {
    /// `S!`: sent after every reset; the session key is zero from here on.
    Serial {
        /// Protocol version (the sub-code), 0 for every known key.
        version: u16,
        /// The key's serial number.
        serial: Serial,
    },
    /// `I>`: information items (see [`crate::wire::info::parse_items`]).
    Info(Text),
    /// `k>`: the key asks for a session key.
    RekeyRequest(Text),
    /// `K!`: answer to the host's `K`; the key switches keys right after it.
    SessionRekey {
        /// How many nonce bytes the key received.
        nonce_len: u16,
        /// 32 bytes of device entropy for the key derivation.
        entropy: [u8; BLOCK_LEN],
    },
    /// `E!`: 32 encrypted bytes of entropy.
    Entropy {
        /// Sequence number 0..=4095.
        seq: u16,
        /// The two sub-code characters (hashed into the pad).
        subcode: [u8; 2],
        /// The encrypted block.
        data: [u8; BLOCK_LEN],
    },
    /// `M>`: long-term re-key unlocked.
    LongTermUnlocked(Text),
    /// `L!`: long-term re-key reply.
    LongTermRekey {
        /// How many nonce bytes the key received.
        nonce_len: u16,
        /// 32 bytes of device entropy for the key derivation.
        entropy: [u8; BLOCK_LEN],
    },
    /// `l>`: long-term re-key refused.
    LongTermRefused(Text),
    /// `W>`: the key did not understand the host.
    Warning(Text),
    /// `B>`: generators went bad during a re-key.
    BadGenerators(Text),
}

/// Why a well-framed frame is not a valid packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PacketError {
    /// Not 64 bytes starting `* ` and ending CR LF.
    NotAFrame,
    /// A type letter the protocol does not have.
    UnknownType(u8),
    /// The encoding byte is not the one this type uses.
    WrongEncoding {
        /// The type letter.
        kind: u8,
        /// The encoding byte found.
        encoding: u8,
    },
    /// The binary payload is not valid PEM64 or has the wrong length.
    BadPayload,
}

impl fmt::Display for PacketError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PacketError::NotAFrame => f.write_str("not a frame"),
            PacketError::UnknownType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            PacketError::WrongEncoding { kind, encoding } => write!(
                f,
                "frame type '{}' with wrong encoding 0x{encoding:02x}",
                char::from(*kind).escape_default()
            ),
            PacketError::BadPayload => f.write_str("malformed binary payload"),
        }
    }
}

impl core::error::Error for PacketError {}

const TEXT: u8 = b'>';
const BINARY: u8 = b'!';

/// The encoding each type letter uses, `None` for unknown letters.
pub const fn encoding_of(kind: u8) -> Option<u8> {
    match kind {
        b'S' | b'K' | b'E' | b'L' => Some(BINARY),
        b'I' | b'W' | b'k' | b'M' | b'l' | b'B' => Some(TEXT),
        _ => None,
    }
}

/// The type letter of a frame (offset 2).
pub const fn kind(frame: &[u8; FRAME_LEN]) -> u8 {
    frame[2]
}

/// The 50 payload bytes of a frame (offsets 4..54).
pub fn payload(frame: &[u8; FRAME_LEN]) -> &[u8; PAYLOAD_LEN] {
    let (_, rest) = frame.split_first_chunk::<4>().unwrap_or((&[0; 4], &[]));
    rest.first_chunk::<PAYLOAD_LEN>()
        .unwrap_or(&[b' '; PAYLOAD_LEN])
}

fn is_framed(frame: &[u8; FRAME_LEN]) -> bool {
    frame[0] == b'*' && frame[1] == b' ' && frame[62] == b'\r' && frame[63] == b'\n'
}

fn trim_end_spaces(b: &[u8]) -> &[u8] {
    let end = b
        .iter()
        .rposition(|&c| c != b' ')
        .map_or(0, |p| p.saturating_add(1));
    b.get(..end).unwrap_or(&[])
}

/// A binary payload: sub-code plus up to 36 decoded bytes.
struct Binary {
    sub: u16,
    subcode: [u8; 2],
    data: [u8; 36],
    len: usize,
}

fn parse_binary(payload: &[u8; PAYLOAD_LEN]) -> Result<Binary, PacketError> {
    let (subcode, rest) = payload
        .split_first_chunk::<2>()
        .ok_or(PacketError::BadPayload)?;
    let sub = pem::decode_u12(*subcode).map_err(|_| PacketError::BadPayload)?;
    let body = trim_end_spaces(rest);
    let mut data = [0u8; 36];
    let len = pem::decode(body, &mut data).map_err(|_| PacketError::BadPayload)?;
    Ok(Binary {
        sub,
        subcode: *subcode,
        data,
        len,
    })
}

fn block(b: &Binary) -> Result<[u8; BLOCK_LEN], PacketError> {
    if b.len != BLOCK_LEN {
        return Err(PacketError::BadPayload);
    }
    Ok(*b
        .data
        .first_chunk::<BLOCK_LEN>()
        .ok_or(PacketError::BadPayload)?)
}

impl Packet {
    /// Parses a whole 64-byte frame. The MAC is not checked here.
    ///
    /// ```
    /// use ekey_proto::wire::packet::Packet;
    /// let frame = *b"* I>T03143 V03254                                     apKTNVoy\r\n";
    /// let Packet::Info(text) = Packet::parse(&frame).unwrap() else { panic!() };
    /// assert_eq!(text.as_bytes(), b"T03143 V03254");
    /// ```
    pub fn parse(frame: &[u8; FRAME_LEN]) -> Result<Packet, PacketError> {
        if !is_framed(frame) {
            return Err(PacketError::NotAFrame);
        }
        let kind = frame[2];
        let encoding = frame[3];
        let expected = encoding_of(kind).ok_or(PacketError::UnknownType(kind))?;
        if encoding != expected {
            return Err(PacketError::WrongEncoding { kind, encoding });
        }
        let payload = payload(frame);
        if expected == TEXT {
            let text = Text::new(trim_end_spaces(payload));
            return Ok(match kind {
                b'I' => Packet::Info(text),
                b'k' => Packet::RekeyRequest(text),
                b'M' => Packet::LongTermUnlocked(text),
                b'l' => Packet::LongTermRefused(text),
                b'B' => Packet::BadGenerators(text),
                _ => Packet::Warning(text),
            });
        }
        let bin = parse_binary(payload)?;
        match kind {
            b'S' => {
                if bin.len != SERIAL_LEN {
                    return Err(PacketError::BadPayload);
                }
                let serial = bin
                    .data
                    .first_chunk::<SERIAL_LEN>()
                    .ok_or(PacketError::BadPayload)?;
                Ok(Packet::Serial {
                    version: bin.sub,
                    serial: Serial(*serial),
                })
            }
            b'K' => Ok(Packet::SessionRekey {
                nonce_len: bin.sub,
                entropy: block(&bin)?,
            }),
            b'L' => Ok(Packet::LongTermRekey {
                nonce_len: bin.sub,
                entropy: block(&bin)?,
            }),
            _ => Ok(Packet::Entropy {
                seq: bin.sub,
                subcode: bin.subcode,
                data: block(&bin)?,
            }),
        }
    }

    /// The type letter and encoding byte of this packet.
    pub fn kind(&self) -> (u8, u8) {
        match self {
            Packet::Serial { .. } => (b'S', BINARY),
            Packet::Info(_) => (b'I', TEXT),
            Packet::RekeyRequest(_) => (b'k', TEXT),
            Packet::SessionRekey { .. } => (b'K', BINARY),
            Packet::Entropy { .. } => (b'E', BINARY),
            Packet::LongTermUnlocked(_) => (b'M', TEXT),
            Packet::LongTermRekey { .. } => (b'L', BINARY),
            Packet::LongTermRefused(_) => (b'l', TEXT),
            Packet::Warning(_) => (b'W', TEXT),
            Packet::BadGenerators(_) => (b'B', TEXT),
        }
    }

    /// Builds the 64-byte frame for this packet, MAC'd with `keys`.
    ///
    /// An `Entropy` packet is emitted with the sub-code for its `seq`
    /// (its `subcode` field is ignored) and its `data` as given: encrypt
    /// before emitting (see [`crate::crypto::FrameKeys::pad`]).
    pub fn emit(&self, keys: &FrameKeys) -> [u8; FRAME_LEN] {
        let mut frame = [b' '; FRAME_LEN];
        let (kind, encoding) = self.kind();
        frame[0] = b'*';
        frame[2] = kind;
        frame[3] = encoding;
        frame[62] = b'\r';
        frame[63] = b'\n';
        if let Some((_, rest)) = frame.split_first_chunk_mut::<4>()
            && let Some(payload) = rest.first_chunk_mut::<PAYLOAD_LEN>()
        {
            self.write_payload(payload);
        }
        let mac = {
            let (content, _) = crate::crypto::frame_mac_parts(&frame);
            let c: [u8; MAC_CONTENT_LEN] = *content;
            keys.mac(&c)
        };
        if let Some(slot) = frame.get_mut(54..62) {
            slot.copy_from_slice(&mac);
        }
        frame
    }

    fn write_payload(&self, payload: &mut [u8; PAYLOAD_LEN]) {
        let (sub, data): (u16, &[u8]) = match self {
            Packet::Serial { version, serial } => (*version, serial.as_bytes()),
            Packet::SessionRekey { nonce_len, entropy }
            | Packet::LongTermRekey { nonce_len, entropy } => (*nonce_len, entropy),
            Packet::Entropy { seq, data, .. } => (*seq, data),
            Packet::Info(t)
            | Packet::RekeyRequest(t)
            | Packet::LongTermUnlocked(t)
            | Packet::LongTermRefused(t)
            | Packet::Warning(t)
            | Packet::BadGenerators(t) => {
                for (dst, src) in payload.iter_mut().zip(t.as_bytes()) {
                    *dst = *src;
                }
                return;
            }
        };
        let (code, rest) = payload.split_at_mut(2);
        code.copy_from_slice(&pem::encode_u12(sub));
        let _ = pem::encode(data, rest);
    }
}
