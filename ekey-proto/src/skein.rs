//! Skein-256-256, **version 1.1** (2008), with the keyed, personalised
//! states every protocol operation uses (PROTOCOL.md §3).
//!
//! Version 1.1 differs from the Skein 1.3 that current libraries implement
//! in the Threefish-256 rotation constants and the key-schedule parity
//! constant; the two do not interoperate.
//!
//! Everything here is allocation-free and panic-free, and takes time that
//! depends only on lengths, never on the bytes (Threefish uses only
//! additions, rotations by constants and XORs). States derived from keys
//! wipe themselves on drop.
//!
//! Threefish-256 is fully unrolled; one block costs about 55-65 ns on a
//! current x86-64 core. A block is one long dependency chain, so
//! [`Skein256::finalize_two`] interleaves two independent computations.
//!
//! ```
//! use ekey_proto::skein::{hash, Skein256};
//! let mut st = Skein256::new();
//! st.update(b"ab");
//! st.update(b"c");
//! assert_eq!(st.finalize(), hash(b"abc"));
//! ```

use core::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop};

/// Threefish-256 v1.1 key-schedule parity constant.
const C240: u64 = 0x5555_5555_5555_5555;

/// Block size of Skein-256 in bytes.
const BLOCK: usize = 32;

/// UBI block type: key.
const TYPE_KEY: u64 = 0;
/// UBI block type: configuration.
const TYPE_CFG: u64 = 4;
/// UBI block type: personalisation.
const TYPE_PRS: u64 = 8;
/// UBI block type: message.
const TYPE_MSG: u64 = 48;
/// UBI block type: output.
const TYPE_OUT: u64 = 63;
/// Tweak word 1: first block of a UBI section.
const FLAG_FIRST: u64 = 1 << 62;
/// Tweak word 1: final block of a UBI section.
const FLAG_FINAL: u64 = 1 << 63;

/// Tweak word 1 for the start of a section of type `ty`.
const fn section(ty: u64) -> u64 {
    (ty << 56) | FLAG_FIRST
}

/// The configuration block: schema "SHA3", version 1, 256 output bits,
/// sequential tree parameters.
const CONFIG: [u8; BLOCK] = [
    0x53, 0x48, 0x41, 0x33, // "SHA3"
    0x01, 0x00, // version 1
    0x00, 0x00, // reserved
    0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // 256 output bits
    0x00, 0x00, 0x00, // tree info: sequential
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // reserved
];

/// The chaining value after the configuration block of unkeyed
/// Skein-256-256 (computed at compile time).
const IV: [u64; 4] = {
    let p = load(&CONFIG);
    let [p0, p1, p2, p3] = p;
    let [c0, c1, c2, c3] = threefish256(&[0; 4], BLOCK as u64, section(TYPE_CFG) | FLAG_FINAL, p);
    [c0 ^ p0, c1 ^ p1, c2 ^ p2, c3 ^ p3]
};

/// `RS` personalisation string.
const PERS_RS: &[u8; 96] = b"20090609 support@simtec.co.uk EntropyKey/v1/ReKeyingState                                       ";
/// `PMS` personalisation string.
const PERS_PMS: &[u8; 96] = b"20090609 support@simtec.co.uk EntropyKey/v1/MessageAuthenticationCodeState                      ";
/// `EES` personalisation string.
const PERS_EES: &[u8; 96] = b"20090609 support@simtec.co.uk EntropyKey/v1/EntropyEncryptionState                              ";
/// `LRS` personalisation string.
const PERS_LRS: &[u8; 96] = b"20090609 support@simtec.co.uk EntropyKey/v1/LongTermReKeyingState                               ";
/// `LKMS` personalisation string.
const PERS_LKMS: &[u8; 96] = b"20090609 support@simtec.co.uk EntropyKey/v1/MessageAuthenticationCodeStateForLongTermReKeying   ";

/// The five 96-byte personalisation strings of the protocol.
///
/// ```
/// use ekey_proto::skein::Personalisation;
/// let p = Personalisation::ReKeying.bytes();
/// assert!(p.starts_with(b"20090609 support@simtec.co.uk EntropyKey/v1/ReKeyingState"));
/// assert_eq!(p[95], b' ');
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Personalisation {
    /// `RS`: session re-keying.
    ReKeying,
    /// `PMS`: frame MACs.
    MessageAuthentication,
    /// `EES`: entropy encryption pads.
    EntropyEncryption,
    /// `LRS`: long-term re-keying.
    LongTermReKeying,
    /// `LKMS`: the MAC of a long-term re-key nonce.
    LongTermMessageAuthentication,
}

impl Personalisation {
    /// The 96-byte string (text, then spaces).
    #[must_use]
    pub const fn bytes(self) -> &'static [u8; 96] {
        match self {
            Self::ReKeying => PERS_RS,
            Self::MessageAuthentication => PERS_PMS,
            Self::EntropyEncryption => PERS_EES,
            Self::LongTermReKeying => PERS_LRS,
            Self::LongTermMessageAuthentication => PERS_LKMS,
        }
    }
}

// ---------------------------------------------------------------------------
// Threefish-256, version 1.1
// ---------------------------------------------------------------------------

/// One MIX: `a += b; b = rotl(b, r) ^ a`.
macro_rules! mix {
    ($a:ident, $b:ident, $r:literal) => {
        $a = $a.wrapping_add($b);
        $b = $b.rotate_left($r) ^ $a;
    };
}

/// Rounds 0..4 of an 8-round group (rotation pairs 0..3).
#[inline(always)]
const fn rounds_0_3(x: [u64; 4]) -> [u64; 4] {
    let [mut x0, mut x1, mut x2, mut x3] = x;
    mix!(x0, x1, 5);
    mix!(x2, x3, 56);
    mix!(x0, x3, 36);
    mix!(x2, x1, 28);
    mix!(x0, x1, 13);
    mix!(x2, x3, 46);
    mix!(x0, x3, 58);
    mix!(x2, x1, 44);
    [x0, x1, x2, x3]
}

/// Rounds 4..8 of an 8-round group (rotation pairs 4..7).
#[inline(always)]
const fn rounds_4_7(x: [u64; 4]) -> [u64; 4] {
    let [mut x0, mut x1, mut x2, mut x3] = x;
    mix!(x0, x1, 26);
    mix!(x2, x3, 20);
    mix!(x0, x3, 53);
    mix!(x2, x1, 35);
    mix!(x0, x1, 11);
    mix!(x2, x3, 42);
    mix!(x0, x3, 59);
    mix!(x2, x1, 50);
    [x0, x1, x2, x3]
}

/// Adds a subkey, given as its four words, to the state.
#[inline(always)]
const fn inject(x: [u64; 4], k: [u64; 4]) -> [u64; 4] {
    let [x0, x1, x2, x3] = x;
    let [k0, k1, k2, k3] = k;
    [
        x0.wrapping_add(k0),
        x1.wrapping_add(k1),
        x2.wrapping_add(k2),
        x3.wrapping_add(k3),
    ]
}

/// Threefish-256 v1.1 encryption of `block` under `key` and tweak
/// `(t0, t1)`: 72 rounds, 19 subkeys, fully unrolled.
#[inline(always)]
const fn threefish256(key: &[u64; 4], t0: u64, t1: u64, block: [u64; 4]) -> [u64; 4] {
    let [k0, k1, k2, k3] = *key;
    let k4 = C240 ^ k0 ^ k1 ^ k2 ^ k3;
    let t2 = t0 ^ t1;

    // Subkey s: k[s%5], k[(s+1)%5] + t[s%3], k[(s+2)%5] + t[(s+1)%3], k[(s+3)%5] + s.
    macro_rules! sk {
        ($a:ident, $b:ident, $c:ident, $d:ident, $ta:ident, $tb:ident, $s:literal) => {
            [
                $a,
                $b.wrapping_add($ta),
                $c.wrapping_add($tb),
                $d.wrapping_add($s),
            ]
        };
    }

    let mut x = inject(block, sk!(k0, k1, k2, k3, t0, t1, 0));
    x = rounds_0_3(x);
    x = inject(x, sk!(k1, k2, k3, k4, t1, t2, 1));
    x = rounds_4_7(x);
    x = inject(x, sk!(k2, k3, k4, k0, t2, t0, 2));
    x = rounds_0_3(x);
    x = inject(x, sk!(k3, k4, k0, k1, t0, t1, 3));
    x = rounds_4_7(x);
    x = inject(x, sk!(k4, k0, k1, k2, t1, t2, 4));
    x = rounds_0_3(x);
    x = inject(x, sk!(k0, k1, k2, k3, t2, t0, 5));
    x = rounds_4_7(x);
    x = inject(x, sk!(k1, k2, k3, k4, t0, t1, 6));
    x = rounds_0_3(x);
    x = inject(x, sk!(k2, k3, k4, k0, t1, t2, 7));
    x = rounds_4_7(x);
    x = inject(x, sk!(k3, k4, k0, k1, t2, t0, 8));
    x = rounds_0_3(x);
    x = inject(x, sk!(k4, k0, k1, k2, t0, t1, 9));
    x = rounds_4_7(x);
    x = inject(x, sk!(k0, k1, k2, k3, t1, t2, 10));
    x = rounds_0_3(x);
    x = inject(x, sk!(k1, k2, k3, k4, t2, t0, 11));
    x = rounds_4_7(x);
    x = inject(x, sk!(k2, k3, k4, k0, t0, t1, 12));
    x = rounds_0_3(x);
    x = inject(x, sk!(k3, k4, k0, k1, t1, t2, 13));
    x = rounds_4_7(x);
    x = inject(x, sk!(k4, k0, k1, k2, t2, t0, 14));
    x = rounds_0_3(x);
    x = inject(x, sk!(k0, k1, k2, k3, t0, t1, 15));
    x = rounds_4_7(x);
    x = inject(x, sk!(k1, k2, k3, k4, t1, t2, 16));
    x = rounds_0_3(x);
    x = inject(x, sk!(k2, k3, k4, k0, t2, t0, 17));
    x = rounds_4_7(x);
    inject(x, sk!(k3, k4, k0, k1, t0, t1, 18))
}

/// Rounds 0..4 of an 8-round group on two independent states, interleaved
/// so that the two dependency chains overlap in the pipeline.
#[inline(always)]
const fn rounds_0_3_x2(x: [u64; 4], y: [u64; 4]) -> ([u64; 4], [u64; 4]) {
    let [mut x0, mut x1, mut x2, mut x3] = x;
    let [mut y0, mut y1, mut y2, mut y3] = y;
    mix!(x0, x1, 5);
    mix!(y0, y1, 5);
    mix!(x2, x3, 56);
    mix!(y2, y3, 56);
    mix!(x0, x3, 36);
    mix!(y0, y3, 36);
    mix!(x2, x1, 28);
    mix!(y2, y1, 28);
    mix!(x0, x1, 13);
    mix!(y0, y1, 13);
    mix!(x2, x3, 46);
    mix!(y2, y3, 46);
    mix!(x0, x3, 58);
    mix!(y0, y3, 58);
    mix!(x2, x1, 44);
    mix!(y2, y1, 44);
    ([x0, x1, x2, x3], [y0, y1, y2, y3])
}

/// Rounds 4..8 of an 8-round group on two independent states, interleaved.
#[inline(always)]
const fn rounds_4_7_x2(x: [u64; 4], y: [u64; 4]) -> ([u64; 4], [u64; 4]) {
    let [mut x0, mut x1, mut x2, mut x3] = x;
    let [mut y0, mut y1, mut y2, mut y3] = y;
    mix!(x0, x1, 26);
    mix!(y0, y1, 26);
    mix!(x2, x3, 20);
    mix!(y2, y3, 20);
    mix!(x0, x3, 53);
    mix!(y0, y3, 53);
    mix!(x2, x1, 35);
    mix!(y2, y1, 35);
    mix!(x0, x1, 11);
    mix!(y0, y1, 11);
    mix!(x2, x3, 42);
    mix!(y2, y3, 42);
    mix!(x0, x3, 59);
    mix!(y0, y3, 59);
    mix!(x2, x1, 50);
    mix!(y2, y1, 50);
    ([x0, x1, x2, x3], [y0, y1, y2, y3])
}

/// Two independent Threefish-256 v1.1 encryptions computed together:
/// each one is a single long dependency chain, so interleaving two of them
/// almost doubles throughput.
#[inline(always)]
const fn threefish256_x2(
    a: (&[u64; 4], u64, u64, [u64; 4]),
    b: (&[u64; 4], u64, u64, [u64; 4]),
) -> ([u64; 4], [u64; 4]) {
    let (&[a0, a1, a2, a3], at0, at1, pa) = a;
    let (&[b0, b1, b2, b3], bt0, bt1, pb) = b;
    let a4 = C240 ^ a0 ^ a1 ^ a2 ^ a3;
    let b4 = C240 ^ b0 ^ b1 ^ b2 ^ b3;
    let at2 = at0 ^ at1;
    let bt2 = bt0 ^ bt1;

    macro_rules! sk {
        ($a:ident, $b:ident, $c:ident, $d:ident, $ta:ident, $tb:ident, $s:literal) => {
            [
                $a,
                $b.wrapping_add($ta),
                $c.wrapping_add($tb),
                $d.wrapping_add($s),
            ]
        };
    }
    let mut x = inject(pa, sk!(a0, a1, a2, a3, at0, at1, 0));
    let mut y = inject(pb, sk!(b0, b1, b2, b3, bt0, bt1, 0));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a1, a2, a3, a4, at1, at2, 1));
    y = inject(y, sk!(b1, b2, b3, b4, bt1, bt2, 1));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a2, a3, a4, a0, at2, at0, 2));
    y = inject(y, sk!(b2, b3, b4, b0, bt2, bt0, 2));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a3, a4, a0, a1, at0, at1, 3));
    y = inject(y, sk!(b3, b4, b0, b1, bt0, bt1, 3));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a4, a0, a1, a2, at1, at2, 4));
    y = inject(y, sk!(b4, b0, b1, b2, bt1, bt2, 4));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a0, a1, a2, a3, at2, at0, 5));
    y = inject(y, sk!(b0, b1, b2, b3, bt2, bt0, 5));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a1, a2, a3, a4, at0, at1, 6));
    y = inject(y, sk!(b1, b2, b3, b4, bt0, bt1, 6));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a2, a3, a4, a0, at1, at2, 7));
    y = inject(y, sk!(b2, b3, b4, b0, bt1, bt2, 7));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a3, a4, a0, a1, at2, at0, 8));
    y = inject(y, sk!(b3, b4, b0, b1, bt2, bt0, 8));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a4, a0, a1, a2, at0, at1, 9));
    y = inject(y, sk!(b4, b0, b1, b2, bt0, bt1, 9));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a0, a1, a2, a3, at1, at2, 10));
    y = inject(y, sk!(b0, b1, b2, b3, bt1, bt2, 10));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a1, a2, a3, a4, at2, at0, 11));
    y = inject(y, sk!(b1, b2, b3, b4, bt2, bt0, 11));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a2, a3, a4, a0, at0, at1, 12));
    y = inject(y, sk!(b2, b3, b4, b0, bt0, bt1, 12));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a3, a4, a0, a1, at1, at2, 13));
    y = inject(y, sk!(b3, b4, b0, b1, bt1, bt2, 13));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a4, a0, a1, a2, at2, at0, 14));
    y = inject(y, sk!(b4, b0, b1, b2, bt2, bt0, 14));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a0, a1, a2, a3, at0, at1, 15));
    y = inject(y, sk!(b0, b1, b2, b3, bt0, bt1, 15));
    (x, y) = rounds_4_7_x2(x, y);
    x = inject(x, sk!(a1, a2, a3, a4, at1, at2, 16));
    y = inject(y, sk!(b1, b2, b3, b4, bt1, bt2, 16));
    (x, y) = rounds_0_3_x2(x, y);
    x = inject(x, sk!(a2, a3, a4, a0, at2, at0, 17));
    y = inject(y, sk!(b2, b3, b4, b0, bt2, bt0, 17));
    (x, y) = rounds_4_7_x2(x, y);
    (
        inject(x, sk!(a3, a4, a0, a1, at0, at1, 18)),
        inject(y, sk!(b3, b4, b0, b1, bt0, bt1, 18)),
    )
}

/// Little-endian words of a 32-byte block (four plain loads).
#[inline(always)]
const fn load(b: &[u8; BLOCK]) -> [u64; 4] {
    match b.as_chunks::<8>() {
        ([w0, w1, w2, w3], []) => [
            u64::from_le_bytes(*w0),
            u64::from_le_bytes(*w1),
            u64::from_le_bytes(*w2),
            u64::from_le_bytes(*w3),
        ],
        // Unreachable: 32 bytes are exactly four words.
        _ => [0; 4],
    }
}

/// A chaining value as 32 little-endian bytes.
#[inline(always)]
fn store(w: &[u64; 4]) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    let (chunks, _) = out.as_chunks_mut::<8>();
    for (c, w) in chunks.iter_mut().zip(w) {
        *c = w.to_le_bytes();
    }
    out
}

/// One UBI block: `Threefish(chain, (t0, t1), block) XOR block`.
///
/// Inlined on 64-bit targets (speed); one shared copy elsewhere (an
/// unrolled Threefish is about 5 KiB of Thumb-2 code).
#[cfg_attr(target_pointer_width = "64", inline(always))]
#[cfg_attr(not(target_pointer_width = "64"), inline(never))]
fn ubi(chain: &[u64; 4], t0: u64, t1: u64, block: &[u8; BLOCK]) -> [u64; 4] {
    let p = load(block);
    let [p0, p1, p2, p3] = p;
    let [c0, c1, c2, c3] = threefish256(chain, t0, t1, p);
    [c0 ^ p0, c1 ^ p1, c2 ^ p2, c3 ^ p3]
}

/// Two independent UBI blocks computed together (see [`threefish256_x2`]).
#[cfg_attr(target_pointer_width = "64", inline(always))]
#[cfg_attr(not(target_pointer_width = "64"), inline(never))]
#[cfg(target_pointer_width = "64")]
fn ubi_x2(
    a: (&[u64; 4], u64, u64, &[u8; BLOCK]),
    b: (&[u64; 4], u64, u64, &[u8; BLOCK]),
) -> ([u64; 4], [u64; 4]) {
    let pa = load(a.3);
    let pb = load(b.3);
    let ([x0, x1, x2, x3], [y0, y1, y2, y3]) =
        threefish256_x2((a.0, a.1, a.2, pa), (b.0, b.1, b.2, pb));
    let [a0, a1, a2, a3] = pa;
    let [b0, b1, b2, b3] = pb;
    (
        [x0 ^ a0, x1 ^ a1, x2 ^ a2, x3 ^ a3],
        [y0 ^ b0, y1 ^ b1, y2 ^ b2, y3 ^ b3],
    )
}

/// The output stage: one output-type block holding counter 0.
#[inline]
fn output(chain: &[u64; 4]) -> [u8; BLOCK] {
    let mut out = ubi(chain, 8, section(TYPE_OUT) | FLAG_FINAL, &[0; BLOCK]);
    let bytes = store(&out);
    out.zeroize();
    bytes
}

// ---------------------------------------------------------------------------
// Skein-256-256
// ---------------------------------------------------------------------------

/// A Skein-256-256 v1.1 hashing state.
///
/// Small (a 32-byte chaining value, the tweak, a 32-byte buffer) and cheap
/// to clone: prepare a keyed state once, then clone it for every message.
/// The state is wiped when dropped; `Debug` does not show it.
///
/// For a whole message at once, [`finalize_with`](Self::finalize_with) and
/// [`finalize_pad_with`](Self::finalize_pad_with) finish a borrowed state
/// without copying it, and [`finalize_two`](Self::finalize_two) finishes
/// two states at once (a frame's MAC and pad), about 1.4 times faster than
/// one after the other.
///
/// ```
/// use ekey_proto::skein::{Skein256, Personalisation};
/// let prepared = Skein256::prepare(&[1; 12], &[2; 32], Personalisation::MessageAuthentication);
/// let mut st = prepared.clone();
/// st.update(b"some frame content");
/// let mac = st.finalize_pad();
/// assert_eq!(mac, prepared.finalize_pad_with(b"some frame content"));
/// ```
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Skein256 {
    /// The chaining value.
    chain: [u64; 4],
    /// Tweak word 0: bytes of the current section processed so far.
    pos: u64,
    /// Tweak word 1 without the final flag: block type and first flag.
    tweak1: u64,
    /// Bytes not processed yet (held back until more data arrives).
    buf: [u8; BLOCK],
    /// How many bytes of `buf` are in use (0..=32).
    buf_len: usize,
}

impl fmt::Debug for Skein256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Skein256(<redacted>)")
    }
}

impl Skein256 {
    /// A state whose message section starts from `chain`.
    #[inline]
    const fn with_chain(chain: [u64; 4], ty: u64) -> Self {
        Skein256 {
            chain,
            pos: 0,
            tweak1: section(ty),
            buf: [0; BLOCK],
            buf_len: 0,
        }
    }

    /// Unkeyed Skein-256-256.
    ///
    /// ```
    /// use ekey_proto::skein::Skein256;
    /// let mut st = Skein256::new();
    /// st.update(b"abc");
    /// assert_eq!(st.finalize().len(), 32);
    /// ```
    #[must_use]
    pub const fn new() -> Self {
        Self::with_chain(IV, TYPE_MSG)
    }

    /// The keyed, personalised state (PROTOCOL.md §3): key = `serial` ‖
    /// `secret` (44 bytes, a key-type UBI section), the configuration
    /// block, then the first 64 bytes of the personalisation string as a
    /// non-final personalisation section, then an empty message section.
    ///
    /// ```
    /// use ekey_proto::skein::{Skein256, Personalisation};
    /// let mut st = Skein256::prepare(&[0; 12], &[0; 32], Personalisation::EntropyEncryption);
    /// st.update(b"AB");
    /// let pad: [u8; 32] = st.finalize();
    /// # let _ = pad;
    /// ```
    #[must_use]
    pub fn prepare(serial: &[u8; 12], secret: &[u8; 32], pers: Personalisation) -> Self {
        // Key section from a zero chaining value.
        let mut st = Self::with_chain([0; 4], TYPE_KEY);
        st.update(serial);
        st.update(secret);
        st.close();
        // Configuration block.
        st.chain = ubi(
            &st.chain,
            BLOCK as u64,
            section(TYPE_CFG) | FLAG_FINAL,
            &CONFIG,
        );
        // Personalisation, the reference code's way: update only, never
        // closed, so the last 32 bytes stay in the buffer and are dropped.
        st.restart(TYPE_PRS);
        st.update(pers.bytes());
        // Message section.
        st.restart(TYPE_MSG);
        st
    }

    /// Starts a new UBI section of type `ty` from the current chaining
    /// value, discarding anything buffered.
    #[inline]
    fn restart(&mut self, ty: u64) {
        self.pos = 0;
        self.tweak1 = section(ty);
        self.buf = [0; BLOCK];
        self.buf_len = 0;
    }

    /// Processes one full block that is known not to be the last one.
    #[inline(never)]
    fn process(&mut self, block: &[u8; BLOCK]) {
        self.pos = self.pos.wrapping_add(BLOCK as u64);
        self.chain = ubi(&self.chain, self.pos, self.tweak1, block);
        self.tweak1 &= !FLAG_FIRST;
    }

    /// Absorbs message bytes.
    ///
    /// Feeding a message in pieces gives the same result as feeding it at
    /// once. The last (possibly full) block is held back until more data
    /// arrives or the state is finalised.
    ///
    /// ```
    /// use ekey_proto::skein::{hash, Skein256};
    /// let mut st = Skein256::new();
    /// for b in b"hello, world" {
    ///     st.update(&[*b]);
    /// }
    /// assert_eq!(st.finalize(), hash(b"hello, world"));
    /// ```
    #[inline]
    pub fn update(&mut self, data: &[u8]) {
        let len = self.buf_len;
        let end = len.wrapping_add(data.len());
        // Fast path: everything still fits in the buffer.
        if let Some(dst) = self.buf.get_mut(len..end) {
            copy(dst, data);
            self.buf_len = end;
            return;
        }
        self.update_slow(data);
    }

    /// [`update`](Self::update) when at least one block gets processed.
    fn update_slow(&mut self, mut data: &[u8]) {
        // Complete and process the buffered block if more data follows it.
        if self.buf_len > 0 {
            let Some(tail) = self.buf.get_mut(self.buf_len..) else {
                return;
            };
            match data.split_at_checked(tail.len()) {
                Some((head, rest)) if !rest.is_empty() => {
                    copy(tail, head);
                    let block = self.buf;
                    self.buf = [0; BLOCK];
                    self.buf_len = 0;
                    self.process(&block);
                    data = rest;
                }
                // Everything fits after all (unreachable from `update`).
                _ => {
                    copy(tail, data);
                    self.buf_len = self.buf_len.wrapping_add(data.len());
                    return;
                }
            }
        }
        // Whole blocks straight from the input, holding back the last one.
        while let Some((block, rest)) = data.split_first_chunk::<BLOCK>()
            && !rest.is_empty()
        {
            self.process(block);
            data = rest;
        }
        // The buffer is empty (all zeros) here and `data` is at most a block.
        let n = data.len().min(BLOCK);
        if let Some(dst) = self.buf.get_mut(..n) {
            copy(dst, data);
            self.buf_len = n;
        }
    }

    /// Processes the buffer, zero-padded, as the final block of the
    /// current section.
    #[inline(never)]
    fn close(&mut self) {
        // Bytes past `buf_len` are always zero: nothing to pad.
        self.pos = self.pos.wrapping_add(self.buf_len as u64);
        self.chain = ubi(&self.chain, self.pos, self.tweak1 | FLAG_FINAL, &self.buf);
        self.buf_len = 0;
    }

    /// Closes the message and runs the output stage: the Skein hash.
    ///
    /// ```
    /// use ekey_proto::skein::Skein256;
    /// let st = Skein256::new();
    /// assert_eq!(st.finalize()[..4], [0xbc, 0x27, 0x63, 0xf7]);
    /// ```
    #[must_use]
    pub fn finalize(self) -> [u8; 32] {
        let mut st = self;
        st.close();
        output(&st.chain)
    }

    /// Closes the message and returns the chaining value, with no output
    /// stage (the protocol's MACs).
    ///
    /// ```
    /// use ekey_proto::skein::{Skein256, Personalisation};
    /// let mut st = Skein256::prepare(&[0; 12], &[0; 32], Personalisation::MessageAuthentication);
    /// st.update(&[0x20; 52]);
    /// let mac = st.finalize_pad();
    /// # let _ = mac;
    /// ```
    #[must_use]
    pub fn finalize_pad(self) -> [u8; 32] {
        let mut st = self;
        st.close();
        store(&st.chain)
    }

    /// Same as `{ let mut s = self.clone(); s.update(msg); s.finalize() }`,
    /// without copying or changing `self`.
    ///
    /// ```
    /// use ekey_proto::skein::{Skein256, Personalisation};
    /// let prepared = Skein256::prepare(&[7; 12], &[9; 32], Personalisation::EntropyEncryption);
    /// let mut st = prepared.clone();
    /// st.update(b"AB");
    /// assert_eq!(prepared.finalize_with(b"AB"), st.finalize());
    /// ```
    #[must_use]
    pub fn finalize_with(&self, msg: &[u8]) -> [u8; 32] {
        Lane::new(self, msg, Finish::Final).run()
    }

    /// Same as `{ let mut s = self.clone(); s.update(msg); s.finalize_pad() }`,
    /// without copying or changing `self`.
    ///
    /// ```
    /// use ekey_proto::skein::{Skein256, Personalisation};
    /// let prepared = Skein256::prepare(&[7; 12], &[9; 32], Personalisation::MessageAuthentication);
    /// let mut st = prepared.clone();
    /// st.update(&[1; 52]);
    /// assert_eq!(prepared.finalize_pad_with(&[1; 52]), st.finalize_pad());
    /// ```
    #[must_use]
    pub fn finalize_pad_with(&self, msg: &[u8]) -> [u8; 32] {
        Lane::new(self, msg, Finish::Pad).run()
    }

    /// Finishes two independent computations at once: `self` with `msg`
    /// (as `finish` says) and `other` with `other_msg`. The results equal
    /// [`finalize_with`](Self::finalize_with) /
    /// [`finalize_pad_with`](Self::finalize_pad_with) of each, but the
    /// Threefish blocks of the two are interleaved: each block is one long
    /// dependency chain, so two of them share the core well (a frame's
    /// 52-byte MAC plus 2-byte pad: about 200 ns instead of 280 ns). A
    /// frame's MAC and its entropy pad are the intended pair.
    ///
    /// ```
    /// use ekey_proto::skein::{Finish, Skein256, Personalisation};
    /// let mac = Skein256::prepare(&[7; 12], &[9; 32], Personalisation::MessageAuthentication);
    /// let pad = Skein256::prepare(&[7; 12], &[9; 32], Personalisation::EntropyEncryption);
    /// let (m, p) = mac.finalize_two(&[0x41; 52], Finish::Pad, &pad, b"AB", Finish::Final);
    /// assert_eq!(m, mac.finalize_pad_with(&[0x41; 52]));
    /// assert_eq!(p, pad.finalize_with(b"AB"));
    /// ```
    #[must_use]
    pub fn finalize_two(
        &self,
        msg: &[u8],
        finish: Finish,
        other: &Skein256,
        other_msg: &[u8],
        other_finish: Finish,
    ) -> ([u8; 32], [u8; 32]) {
        // On 32-bit cores the interleaved lanes only cost code size (about
        // 10 KB on thumbv7m) without finding registers to run in: one lane
        // after the other there.
        #[cfg(not(target_pointer_width = "64"))]
        {
            let one = |st: &Skein256, m: &[u8], f: Finish| match f {
                Finish::Final => st.finalize_with(m),
                Finish::Pad => st.finalize_pad_with(m),
            };
            (one(self, msg, finish), one(other, other_msg, other_finish))
        }
        #[cfg(target_pointer_width = "64")]
        self.finalize_two_interleaved(msg, finish, other, other_msg, other_finish)
    }

    #[cfg(target_pointer_width = "64")]
    fn finalize_two_interleaved(
        &self,
        msg: &[u8],
        finish: Finish,
        other: &Skein256,
        other_msg: &[u8],
        other_finish: Finish,
    ) -> ([u8; 32], [u8; 32]) {
        let mut a = Lane::new(self, msg, finish);
        let mut b = Lane::new(other, other_msg, other_finish);
        loop {
            match (a.next_block(), b.next_block()) {
                (Some((at0, at1, ablk)), Some((bt0, bt1, bblk))) => {
                    (a.chain, b.chain) =
                        ubi_x2((&a.chain, at0, at1, &ablk), (&b.chain, bt0, bt1, &bblk));
                }
                (Some((t0, t1, blk)), None) => a.chain = ubi(&a.chain, t0, t1, &blk),
                (None, Some((t0, t1, blk))) => b.chain = ubi(&b.chain, t0, t1, &blk),
                (None, None) => break,
            }
        }
        (a.result(), b.result())
    }
}

/// How to finish a state: [`Skein256::finalize`] or
/// [`Skein256::finalize_pad`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Finish {
    /// Close the message, then the output stage (a hash).
    Final,
    /// Close the message, no output stage (the chaining value).
    Pad,
}

/// Where a [`Lane`] is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Message blocks remain (at least the final one).
    Message,
    /// Only the output block remains.
    Output,
    /// Nothing remains; `chain` is the result.
    Done,
}

/// Finishing a state with a message, one UBI block at a time, without
/// touching the state: lets two computations run interleaved.
struct Lane<'a> {
    /// The chaining value.
    chain: [u64; 4],
    /// Tweak word 0 so far.
    pos: u64,
    /// Tweak word 1 without the final flag.
    tweak1: u64,
    /// The state's buffered bytes, until consumed.
    held: &'a [u8],
    /// Message bytes not consumed yet.
    rest: &'a [u8],
    /// What comes next.
    stage: Stage,
    /// Whether an output stage follows the message.
    output: bool,
}

impl<'a> Lane<'a> {
    /// A lane finishing `st` ‖ `msg`.
    #[inline(always)]
    fn new(st: &'a Skein256, msg: &'a [u8], finish: Finish) -> Self {
        Lane {
            chain: st.chain,
            pos: st.pos,
            tweak1: st.tweak1,
            held: st.buf.get(..st.buf_len).unwrap_or(&[]),
            rest: msg,
            stage: Stage::Message,
            output: finish == Finish::Final,
        }
    }

    /// The next block to process as `(t0, t1, block)`; the caller must
    /// store the resulting chaining value in `self.chain` before asking
    /// again.
    #[inline(always)]
    fn next_block(&mut self) -> Option<(u64, u64, [u8; BLOCK])> {
        match self.stage {
            Stage::Message => Some(self.next_message_block()),
            Stage::Output => {
                self.stage = Stage::Done;
                Some((8, section(TYPE_OUT) | FLAG_FINAL, [0; BLOCK]))
            }
            Stage::Done => None,
        }
    }

    /// The next message block, full and not last, or the final one.
    #[inline(always)]
    fn next_message_block(&mut self) -> (u64, u64, [u8; BLOCK]) {
        let mut block = [0u8; BLOCK];
        if self.held.is_empty() {
            // Usual case (a fresh prepared state): whole blocks straight
            // from the message.
            if let Some((full, rest)) = self.rest.split_first_chunk::<BLOCK>()
                && !rest.is_empty()
            {
                self.rest = rest;
                return self.full(*full);
            }
        } else {
            let (filled, tail) = block
                .split_at_mut_checked(self.held.len())
                .unwrap_or((&mut [], &mut []));
            copy(filled, self.held);
            if let Some((head, rest)) = self.rest.split_at_checked(tail.len())
                && !rest.is_empty()
            {
                copy(tail, head);
                self.held = &[];
                self.rest = rest;
                return self.full(block);
            }
        }
        // The final block: the held bytes (already copied) and the rest of
        // the message, which fits.
        let offset = self.held.len();
        if let Some(dst) = block.get_mut(offset..) {
            copy(dst, self.rest);
        }
        let total = offset.wrapping_add(self.rest.len()).min(BLOCK);
        self.held = &[];
        self.rest = &[];
        self.pos = self.pos.wrapping_add(total as u64);
        self.stage = if self.output {
            Stage::Output
        } else {
            Stage::Done
        };
        (self.pos, self.tweak1 | FLAG_FINAL, block)
    }

    /// Accounts for a full, non-final block.
    #[inline(always)]
    fn full(&mut self, block: [u8; BLOCK]) -> (u64, u64, [u8; BLOCK]) {
        self.pos = self.pos.wrapping_add(BLOCK as u64);
        let t1 = self.tweak1;
        self.tweak1 &= !FLAG_FIRST;
        (self.pos, t1, block)
    }

    /// Runs the lane to the end and returns the result.
    #[inline(always)]
    fn run(mut self) -> [u8; BLOCK] {
        while let Some((t0, t1, block)) = self.next_block() {
            self.chain = ubi(&self.chain, t0, t1, &block);
        }
        self.result()
    }

    /// The final chaining value (or output) as bytes.
    #[inline(always)]
    fn result(&self) -> [u8; BLOCK] {
        store(&self.chain)
    }
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        self.chain.zeroize();
    }
}

/// Copies as many bytes as both slices have (they are always equally long
/// or `src` is shorter where this is used).
#[inline(always)]
fn copy(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

impl Default for Skein256 {
    fn default() -> Self {
        Self::new()
    }
}

/// Unkeyed Skein-256-256 v1.1 of `msg`.
///
/// ```
/// use ekey_proto::skein::hash;
/// assert_eq!(hash(b"")[..4], [0xbc, 0x27, 0x63, 0xf7]);
/// ```
#[must_use]
pub fn hash(msg: &[u8]) -> [u8; 32] {
    Skein256::new().finalize_with(msg)
}

/// One Threefish-256 v1.1 encryption of `block` (four little-endian words)
/// under `key` and tweak `(t0, t1)`, exposed for benchmarks and tests.
#[doc(hidden)]
#[must_use]
pub fn threefish256_encrypt(key: &[u64; 4], t0: u64, t1: u64, block: [u64; 4]) -> [u64; 4] {
    threefish256(key, t0, t1, block)
}

/// Two interleaved Threefish-256 v1.1 encryptions, exposed for benchmarks.
#[doc(hidden)]
#[must_use]
pub fn threefish256_encrypt_x2(
    a: (&[u64; 4], u64, u64, [u64; 4]),
    b: (&[u64; 4], u64, u64, [u64; 4]),
) -> ([u64; 4], [u64; 4]) {
    threefish256_x2(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn personalisations_are_96_bytes_text_then_spaces() {
        let all = [
            (Personalisation::ReKeying, "ReKeyingState"),
            (
                Personalisation::MessageAuthentication,
                "MessageAuthenticationCodeState",
            ),
            (Personalisation::EntropyEncryption, "EntropyEncryptionState"),
            (Personalisation::LongTermReKeying, "LongTermReKeyingState"),
            (
                Personalisation::LongTermMessageAuthentication,
                "MessageAuthenticationCodeStateForLongTermReKeying",
            ),
        ];
        for (p, name) in all {
            let b = p.bytes();
            assert_eq!(b.len(), 96);
            let text = core::str::from_utf8(b).unwrap();
            let trimmed = text.trim_end_matches(' ');
            let prefix = "20090609 support@simtec.co.uk EntropyKey/v1/";
            assert_eq!(&trimmed[..prefix.len()], prefix);
            assert_eq!(&trimmed[prefix.len()..], name);
            assert!(b[trimmed.len()..].iter().all(|&c| c == b' '));
        }
    }

    #[test]
    fn pms_and_lkms_share_prepared_state() {
        let a = Skein256::prepare(&[3; 12], &[4; 32], Personalisation::MessageAuthentication);
        let b = Skein256::prepare(
            &[3; 12],
            &[4; 32],
            Personalisation::LongTermMessageAuthentication,
        );
        assert_eq!(a.chain, b.chain);
        let c = Skein256::prepare(&[3; 12], &[4; 32], Personalisation::ReKeying);
        assert_ne!(a.chain, c.chain);
    }

    #[test]
    fn empty_hash() {
        assert_eq!(
            hash(b""),
            [
                0xbc, 0x27, 0x63, 0xf7, 0x07, 0xe2, 0x62, 0xb8, 0x0e, 0x03, 0x13, 0x79, 0x15, 0x43,
                0xa7, 0xab, 0x0a, 0x4b, 0x6c, 0xd0, 0x83, 0x27, 0x0a, 0xfb, 0x2f, 0xce, 0x42, 0x72,
                0xe1, 0xbb, 0x0a, 0xa9
            ]
        );
    }

    #[test]
    fn config_block_layout() {
        assert_eq!(
            u32::from_le_bytes([CONFIG[0], CONFIG[1], CONFIG[2], CONFIG[3]]),
            0x3341_4853
        );
        assert_eq!(load(&CONFIG), [0x0000_0001_3341_4853, 256, 0, 0]);
        assert_eq!(
            IV,
            ubi(&[0; 4], 32, section(TYPE_CFG) | FLAG_FINAL, &CONFIG)
        );
    }

    #[test]
    fn chunked_updates_match_oneshot() {
        let msg: [u8; 200] = core::array::from_fn(|i| (i * 7 + 3) as u8);
        let prepared = Skein256::prepare(&[5; 12], &[6; 32], Personalisation::EntropyEncryption);
        for len in 0..msg.len() {
            let m = &msg[..len];
            let one = prepared.finalize_with(m);
            let one_pad = prepared.finalize_pad_with(m);
            for chunk in [1, 2, 31, 32, 33, 64] {
                let mut st = prepared.clone();
                for c in m.chunks(chunk) {
                    st.update(c);
                    st.update(&[]);
                }
                assert_eq!(st.clone().finalize(), one, "len {len} chunk {chunk}");
                assert_eq!(st.finalize_pad(), one_pad, "len {len} chunk {chunk}");
            }
            // Pre-buffered state plus a short tail via the fast path.
            if len >= 5 {
                let mut st = prepared.clone();
                st.update(&m[..5]);
                assert_eq!(st.finalize_with(&m[5..]), one);
                assert_eq!(st.finalize_pad_with(&m[5..]), one_pad);
            }
        }
    }

    #[test]
    fn finalize_two_matches_single() {
        let msg: [u8; 150] = core::array::from_fn(|i| (i * 13 + 1) as u8);
        let a = Skein256::prepare(&[5; 12], &[6; 32], Personalisation::MessageAuthentication);
        let mut b = Skein256::new();
        b.update(&msg[..7]);
        for la in [0, 1, 2, 31, 32, 33, 52, 64, 65, 100, 150] {
            for lb in [0, 2, 25, 26, 57, 58, 90, 143] {
                let (ma, mb) = (&msg[..la], &msg[..lb]);
                for (fa, fb) in [
                    (Finish::Pad, Finish::Final),
                    (Finish::Final, Finish::Pad),
                    (Finish::Final, Finish::Final),
                    (Finish::Pad, Finish::Pad),
                ] {
                    let one = |st: &Skein256, m: &[u8], f: Finish| match f {
                        Finish::Final => st.finalize_with(m),
                        Finish::Pad => st.finalize_pad_with(m),
                    };
                    let (ra, rb) = a.finalize_two(ma, fa, &b, mb, fb);
                    assert_eq!(ra, one(&a, ma, fa), "{la} {lb} {fa:?} {fb:?}");
                    assert_eq!(rb, one(&b, mb, fb), "{la} {lb} {fa:?} {fb:?}");
                    let (rb2, ra2) = b.finalize_two(mb, fb, &a, ma, fa);
                    assert_eq!((ra2, rb2), (ra, rb));
                }
            }
        }
    }

    #[test]
    fn threefish_x2_matches_single() {
        let ka = [1, 2, 3, u64::MAX];
        let kb = [0x0123_4567_89ab_cdef, 0, C240, 7];
        let pa = [9, 8, 7, 6];
        let pb = [u64::MAX, 0, 1, 2];
        let (xa, xb) = threefish256_x2((&ka, 5, 1 << 62, pa), (&kb, 77, 3 << 62, pb));
        assert_eq!(xa, threefish256(&ka, 5, 1 << 62, pa));
        assert_eq!(xb, threefish256(&kb, 77, 3 << 62, pb));
    }

    #[test]
    fn zeroize_wipes() {
        let mut st = Skein256::prepare(&[1; 12], &[2; 32], Personalisation::ReKeying);
        st.update(b"secret");
        st.zeroize();
        assert_eq!(st.chain, [0; 4]);
        assert_eq!(st.buf, [0; 32]);
        assert_eq!(st.buf_len, 0);
        assert_eq!(st.pos, 0);
    }

    #[test]
    fn debug_redacts() {
        extern crate std;
        let st = Skein256::prepare(&[1; 12], &[2; 32], Personalisation::ReKeying);
        assert_eq!(std::format!("{st:?}"), "Skein256(<redacted>)");
    }
}
