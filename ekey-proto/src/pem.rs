//! PEM64: the key's name for standard base64, and its 12-bit sub-code.
//!
//! The alphabet is `A-Z a-z 0-9 + /` with `=` as filler. Every group of up
//! to three bytes becomes four characters (`1 byte -> "xx=="`,
//! `2 bytes -> "xxx="`). The sub-code of binary frames (a sequence number or
//! a nonce length) is a separate, two-character encoding of a 12-bit value,
//! **low six bits first** ([`encode_u12`], [`decode_u12`]).
//!
//! Decoding is strict about characters (anything outside the alphabet, and
//! `=` anywhere but the end, is refused with its offset) and lenient about
//! the unused low bits of a final, filled quad, as the reference decoder is.
//!
//! ```
//! use ekey_proto::pem;
//!
//! let mut text = [0u8; 8];
//! let n = pem::encode(b"entrop", &mut text)?;
//! assert_eq!(&text[..n], b"ZW50cm9w");
//! let mut bytes = [0u8; 6];
//! let n = pem::decode(b"ZW50cm9w", &mut bytes)?;
//! assert_eq!(&bytes[..n], b"entrop");
//! # Ok::<(), pem::Error>(())
//! ```
use core::fmt;

/// The 64 PEM64 characters; a character's index is the six-bit value it
/// stands for.
///
/// ```
/// assert_eq!(ekey_proto::pem::ALPHABET[62], b'+');
/// ```
pub const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// The filler character that pads the last quad.
pub const FILLER: u8 = b'=';

/// Marks a byte outside the alphabet in [`DECODE_TABLE`]; every valid entry
/// is below 64, so one bit test over four lookups checks a whole quad.
const INVALID: u8 = 0x80;

/// Six-bit value of every byte, or [`INVALID`]; built from [`decode_char`].
const DECODE_TABLE: [u8; 256] = build_decode_table();

const fn build_decode_table() -> [u8; 256] {
    let mut table = [INVALID; 256];
    let mut rest: &mut [u8] = &mut table;
    let mut byte: u8 = 0;
    while let [slot, tail @ ..] = rest {
        *slot = match decode_char(byte) {
            Some(v) => v,
            None => INVALID,
        };
        byte = byte.wrapping_add(1);
        rest = tail;
    }
    table
}

/// Table lookup for the hot paths: six-bit value or [`INVALID`].
#[inline(always)]
fn lookup(c: u8) -> u8 {
    // A `u8` index into a 256-entry table: the `None` arm is unreachable
    // and the compiler drops the check.
    match DECODE_TABLE.get(usize::from(c)) {
        Some(&v) => v,
        None => INVALID,
    }
}

/// The character for the low six bits of `v`.
#[inline(always)]
fn encode_six(v: u8) -> u8 {
    // Index below 64 into a 64-entry table: never `None`.
    match ALPHABET.get(usize::from(v & 0x3f)) {
        Some(&c) => c,
        None => FILLER,
    }
}

/// Why PEM64 input was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Error {
    /// A byte outside the alphabet (or `=` where no filler may stand).
    BadCharacter {
        /// Offset in the input.
        position: usize,
        /// The byte found.
        byte: u8,
    },
    /// Input length is not a multiple of four.
    BadLength {
        /// The length found.
        len: usize,
    },
    /// The output buffer is too small.
    BufferTooSmall,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::BadCharacter {
                position,
                byte: FILLER,
            } => write!(
                f,
                "PEM64 filler '=' at offset {position} (only the last one or two characters may be '=')"
            ),
            Error::BadCharacter { position, byte } if byte.is_ascii_graphic() => write!(
                f,
                "invalid PEM64 character '{}' (0x{byte:02x}) at offset {position}",
                char::from(byte)
            ),
            Error::BadCharacter { position, byte } => {
                write!(
                    f,
                    "invalid PEM64 character 0x{byte:02x} at offset {position}"
                )
            }
            Error::BadLength { len } => {
                write!(
                    f,
                    "PEM64 text of {len} characters (must be a multiple of 4)"
                )
            }
            Error::BufferTooSmall => f.write_str("output buffer too small for the PEM64 data"),
        }
    }
}

impl core::error::Error for Error {}

/// The six-bit value of one PEM64 character, or `None` for a byte outside
/// the alphabet (including the filler `=`).
///
/// ```
/// use ekey_proto::pem::decode_char;
/// assert_eq!(decode_char(b'A'), Some(0));
/// assert_eq!(decode_char(b'/'), Some(63));
/// assert_eq!(decode_char(b'='), None);
/// ```
pub const fn decode_char(c: u8) -> Option<u8> {
    match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    }
}

/// The number of characters [`encode`] writes for `n` bytes: four for each
/// started group of three (saturates at `usize::MAX`, far beyond any slice).
///
/// ```
/// use ekey_proto::pem::encoded_len;
/// assert_eq!(encoded_len(0), 0);
/// assert_eq!(encoded_len(12), 16);
/// assert_eq!(encoded_len(32), 44);
/// ```
pub const fn encoded_len(n: usize) -> usize {
    n.div_ceil(3).saturating_mul(4)
}

/// Encodes one group of three bytes as four characters.
#[inline(always)]
fn encode_group([a, b, c]: [u8; 3]) -> [u8; 4] {
    [
        encode_six(a >> 2),
        encode_six((a << 4) | (b >> 4)),
        encode_six((b << 2) | (c >> 6)),
        encode_six(c),
    ]
}

/// Encodes `input` into `out`, returning the number of characters written
/// (always [`encoded_len`]`(input.len())`). The last quad is filled with
/// `=` when `input.len()` is not a multiple of three.
///
/// # Errors
///
/// [`Error::BufferTooSmall`] if `out` is shorter than
/// [`encoded_len`]`(input.len())`; nothing is written then.
///
/// ```
/// use ekey_proto::pem;
/// let mut out = [0u8; 4];
/// assert_eq!(pem::encode(&[0x20], &mut out), Ok(4));
/// assert_eq!(&out, b"IA==");
/// assert_eq!(pem::encode(&[1, 2, 3, 4], &mut out), Err(pem::Error::BufferTooSmall));
/// ```
pub fn encode(input: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    let needed = encoded_len(input.len());
    let out = out.get_mut(..needed).ok_or(Error::BufferTooSmall)?;
    let (groups, tail) = input.as_chunks::<3>();
    // `out` is exactly `encoded_len` long: one quad per group, plus one for
    // a partial group.
    let (quads, _) = out.as_chunks_mut::<4>();
    let mut quads = quads.iter_mut();
    // `groups` first: `zip` stops on it without taking a quad.
    for (group, quad) in groups.iter().zip(quads.by_ref()) {
        *quad = encode_group(*group);
    }
    if let Some(quad) = quads.next() {
        *quad = match *tail {
            [a] => {
                let [w, x, _, _] = encode_group([a, 0, 0]);
                [w, x, FILLER, FILLER]
            }
            [a, b] => {
                let [w, x, y, _] = encode_group([a, b, 0]);
                [w, x, y, FILLER]
            }
            _ => return Err(Error::BufferTooSmall),
        };
    }
    Ok(needed)
}

/// Finds the first byte of `q` that is not in the alphabet (used once a
/// quad is known to hold one).
fn first_bad(q: &[u8], base: usize) -> Error {
    let mut iter = q.iter().enumerate();
    let (offset, byte) = loop {
        match iter.next() {
            Some((i, &b)) if lookup(b) & INVALID != 0 => break (i, b),
            Some(_) => {}
            None => break (0, q.first().copied().unwrap_or(0)),
        }
    };
    Error::BadCharacter {
        position: base.saturating_add(offset),
        byte,
    }
}

/// Decodes one quad, `=` filler included: the decoded bytes and how many of
/// them (1 to 3) are meaningful. Error positions are offsets in the quad.
///
/// `=` may only be the last character (two bytes) or the last two (one
/// byte).
///
/// # Errors
///
/// [`Error::BadCharacter`] for a byte outside the alphabet or a misplaced
/// `=`.
///
/// ```
/// use ekey_proto::pem::{decode_quad, Error};
/// assert_eq!(decode_quad(*b"35bp"), Ok(([0xdf, 0x96, 0xe9], 3)));
/// assert_eq!(decode_quad(*b"7H4="), Ok(([0xec, 0x7e, 0], 2)));
/// assert_eq!(decode_quad(*b"IA=="), Ok(([0x20, 0, 0], 1)));
/// assert_eq!(decode_quad(*b"I=A="), Err(Error::BadCharacter { position: 1, byte: b'=' }));
/// ```
pub fn decode_quad(q: [u8; 4]) -> Result<([u8; 3], usize), Error> {
    let [c0, c1, c2, c3] = q;
    let (a, b) = (lookup(c0), lookup(c1));
    let (c, d, n) = match (c2, c3) {
        (FILLER, FILLER) => (0, 0, 1),
        (_, FILLER) => (lookup(c2), 0, 2),
        _ => (lookup(c2), lookup(c3), 3),
    };
    if (a | b | c | d) & INVALID != 0 {
        return Err(first_bad(&q, 0));
    }
    Ok((combine(a, b, c, d), n))
}

/// Joins four six-bit values into three bytes.
#[inline(always)]
fn combine(a: u8, b: u8, c: u8, d: u8) -> [u8; 3] {
    [(a << 2) | (b >> 4), (b << 4) | (c >> 2), (c << 6) | d]
}

/// Decodes PEM64 `input` into `out`, returning the number of bytes written.
///
/// The input length must be a multiple of four; `=` may stand only as the
/// last one or two characters of the last quad (`"xx=="` is one byte,
/// `"xxx="` two). Unused low bits of a filled quad are ignored.
///
/// # Errors
///
/// - [`Error::BadLength`] if `input.len()` is not a multiple of four;
/// - [`Error::BufferTooSmall`] if `out` cannot hold the decoded bytes
///   (checked before anything is written);
/// - [`Error::BadCharacter`] with the offset of the first byte outside the
///   alphabet, or of a misplaced `=`. `out` may hold part of the data then.
///
/// ```
/// use ekey_proto::pem::{self, Error};
/// let mut out = [0u8; 12];
/// assert_eq!(pem::decode(b"NwBvBlg3OTBJORFD", &mut out), Ok(12));
/// assert_eq!(pem::decode(b"7H4", &mut out), Err(Error::BadLength { len: 3 }));
/// assert_eq!(
///     pem::decode(b"7H4*", &mut out),
///     Err(Error::BadCharacter { position: 3, byte: b'*' })
/// );
/// ```
pub fn decode(input: &[u8], out: &mut [u8]) -> Result<usize, Error> {
    let (quads, rest) = input.as_chunks::<4>();
    if !rest.is_empty() {
        return Err(Error::BadLength { len: input.len() });
    }
    let Some((last, body)) = quads.split_last() else {
        return Ok(0);
    };
    let last_len = match *last {
        [_, _, FILLER, FILLER] => 1,
        [_, _, _, FILLER] => 2,
        _ => 3,
    };
    // At most `usize::MAX / 4 * 3 + 3` for real slices: cannot overflow.
    let needed = body.len().saturating_mul(3).saturating_add(last_len);
    let out = out.get_mut(..needed).ok_or(Error::BufferTooSmall)?;
    let (groups, out_tail) = out.as_chunks_mut::<3>();
    for (index, (group, quad)) in groups.iter_mut().zip(body).enumerate() {
        let [c0, c1, c2, c3] = *quad;
        let (a, b, c, d) = (lookup(c0), lookup(c1), lookup(c2), lookup(c3));
        if (a | b | c | d) & INVALID != 0 {
            return Err(first_bad(quad, index.saturating_mul(4)));
        }
        *group = combine(a, b, c, d);
    }
    let base = body.len().saturating_mul(4);
    let (bytes, n) = decode_quad(*last).map_err(|e| match e {
        Error::BadCharacter { position, byte } => Error::BadCharacter {
            position: base.saturating_add(position),
            byte,
        },
        other => other,
    })?;
    // With three bytes in the last quad, `as_chunks_mut` put them in
    // `groups` and `out_tail` is empty; otherwise `out_tail` has `n` bytes.
    let dst = match groups.get_mut(body.len()) {
        Some(group) => group.as_mut_slice(),
        None => out_tail,
    };
    let src = bytes.get(..n).ok_or(Error::BufferTooSmall)?;
    if dst.len() != src.len() {
        return Err(Error::BufferTooSmall);
    }
    dst.copy_from_slice(src);
    Ok(needed)
}

/// Encodes the low 12 bits of `v` as a sub-code: `ALPHABET[v & 63]` then
/// `ALPHABET[(v >> 6) & 63]` (low six bits first; not base64 of two bytes).
/// Higher bits are ignored.
///
/// ```
/// use ekey_proto::pem::encode_u12;
/// assert_eq!(encode_u12(0), *b"AA");
/// assert_eq!(encode_u12(1556), *b"UY");
/// assert_eq!(encode_u12(4095), *b"//");
/// assert_eq!(encode_u12(4096 + 1), *b"BA");
/// ```
pub fn encode_u12(v: u16) -> [u8; 2] {
    let [lo, hi] = (v & 0x0fff).to_le_bytes();
    [encode_six(lo), encode_six((hi << 2) | (lo >> 6))]
}

/// Decodes a two-character sub-code (low six bits first) to a value in
/// `0..=4095`.
///
/// # Errors
///
/// [`Error::BadCharacter`] (position 0 or 1) for `=` or any byte outside
/// the alphabet.
///
/// ```
/// use ekey_proto::pem::{decode_u12, Error};
/// assert_eq!(decode_u12(*b"UY"), Ok(1556));
/// assert_eq!(decode_u12(*b"A="), Err(Error::BadCharacter { position: 1, byte: b'=' }));
/// ```
pub fn decode_u12(c: [u8; 2]) -> Result<u16, Error> {
    let [c0, c1] = c;
    let (lo, hi) = (lookup(c0), lookup(c1));
    if (lo | hi) & INVALID != 0 {
        return Err(first_bad(&c, 0));
    }
    Ok(u16::from(lo) | (u16::from(hi) << 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_decode_char_and_alphabet() {
        for b in 0..=255u8 {
            let t = lookup(b);
            match decode_char(b) {
                Some(v) => {
                    assert_eq!(t, v);
                    assert_eq!(ALPHABET[usize::from(v)], b);
                }
                None => assert_eq!(t, INVALID),
            }
        }
        for (i, &c) in ALPHABET.iter().enumerate() {
            assert_eq!(decode_char(c), Some(i as u8));
            assert_eq!(encode_six(i as u8), c);
        }
    }

    #[test]
    fn decode_quad_every_filler_position() {
        // Filler anywhere but the last one or two characters is refused.
        type Case = (&'static [u8; 4], Result<([u8; 3], usize), Error>);
        let cases: [Case; 8] = [
            (b"AAAA", Ok(([0, 0, 0], 3))),
            (b"AAA=", Ok(([0, 0, 0], 2))),
            (b"AA==", Ok(([0, 0, 0], 1))),
            (
                b"A===",
                Err(Error::BadCharacter {
                    position: 1,
                    byte: b'=',
                }),
            ),
            (
                b"====",
                Err(Error::BadCharacter {
                    position: 0,
                    byte: b'=',
                }),
            ),
            (
                b"AA=A",
                Err(Error::BadCharacter {
                    position: 2,
                    byte: b'=',
                }),
            ),
            (
                b"=AAA",
                Err(Error::BadCharacter {
                    position: 0,
                    byte: b'=',
                }),
            ),
            (
                b"A=AA",
                Err(Error::BadCharacter {
                    position: 1,
                    byte: b'=',
                }),
            ),
        ];
        for (q, want) in cases {
            assert_eq!(decode_quad(*q), want, "{:?}", core::str::from_utf8(q));
        }
        assert_eq!(
            decode_quad(*b"AA\0="),
            Err(Error::BadCharacter {
                position: 2,
                byte: 0
            })
        );
        assert_eq!(
            decode_quad(*b"AAA\xff"),
            Err(Error::BadCharacter {
                position: 3,
                byte: 0xff
            })
        );
    }

    #[test]
    fn decode_quad_ignores_unused_bits() {
        // "IB==" has non-zero unused bits; the reference decoder keeps the
        // byte, and so do we.
        assert_eq!(decode_quad(*b"IB=="), Ok(([0x20, 0x10, 0], 1)));
    }

    #[test]
    fn first_bad_without_bad_byte_is_harmless() {
        assert_eq!(
            first_bad(b"AB", 7),
            Error::BadCharacter {
                position: 7,
                byte: b'A'
            }
        );
        assert_eq!(
            first_bad(b"", 7),
            Error::BadCharacter {
                position: 7,
                byte: 0
            }
        );
    }
}
