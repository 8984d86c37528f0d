//! The protocol's uses of Skein: frame MACs, entropy pads, session and
//! long-term key derivation, the long-term re-key nonce MAC.
//!
//! Every function here takes prepared states or keys, never does I/O, and
//! keeps secrets in types that wipe themselves.

use subtle::ConstantTimeEq;

use crate::keys::{LongTermKey, MasterKey, Serial, SessionKey};
use crate::pem;
use crate::skein::{Finish, Personalisation, Skein256};

/// Number of MAC characters at the end of a frame.
pub const MAC_CHARS: usize = 8;
/// Number of frame bytes covered by the MAC (offsets 2..54).
pub const MAC_CONTENT_LEN: usize = 52;
/// Length of one entropy block.
pub const BLOCK_LEN: usize = 32;

/// Takes bytes 0, 1, 2, 29, 30, 31 of a Skein output and PEM64-encodes them
/// as two quads: the 8-character MAC the protocol uses.
fn short_mac(full: &[u8; 32]) -> [u8; MAC_CHARS] {
    let raw = short_mac_bytes(full);
    let mut out = [0u8; MAC_CHARS];
    // 6 bytes always encode to exactly 8 characters.
    let _ = pem::encode(&raw, &mut out);
    out
}

fn short_mac_bytes(full: &[u8; 32]) -> [u8; 6] {
    [full[0], full[1], full[2], full[29], full[30], full[31]]
}

/// The prepared Skein states for one serial and session key: frame MACs
/// (`PMS`) and entropy pads (`EES`). Made once per session key, copied for
/// every frame.
///
/// ```
/// use ekey_proto::crypto::FrameKeys;
/// use ekey_proto::keys::{Serial, SessionKey};
/// let serial: Serial = "NwBvBlg3OTBJORFD".parse().unwrap();
/// let keys = FrameKeys::new(&serial, &SessionKey::ZERO);
/// // A frame a real key sent right after a reset (all-zero session key):
/// let frame = *b"* S!AANwBvBlg3OTBJORFD                                Al/Smw1b\r\n";
/// assert!(keys.verify(&frame));
/// ```
#[derive(Clone)]
pub struct FrameKeys {
    mac: Skein256,
    pad: Skein256,
}

impl core::fmt::Debug for FrameKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("FrameKeys(<redacted>)")
    }
}

impl FrameKeys {
    /// Prepares the MAC and pad states for `serial` under `key`.
    pub fn new(serial: &Serial, key: &SessionKey) -> Self {
        FrameKeys {
            mac: Skein256::prepare(
                serial.as_bytes(),
                key.as_bytes(),
                Personalisation::MessageAuthentication,
            ),
            pad: Skein256::prepare(
                serial.as_bytes(),
                key.as_bytes(),
                Personalisation::EntropyEncryption,
            ),
        }
    }

    /// The 8 MAC characters for a frame's 52 content bytes (offsets 2..54).
    pub fn mac(&self, content: &[u8; MAC_CONTENT_LEN]) -> [u8; MAC_CHARS] {
        short_mac(&self.mac.finalize_pad_with(content))
    }

    /// Whether a whole 64-byte frame carries the right MAC (constant time).
    pub fn verify(&self, frame: &[u8; 64]) -> bool {
        let (content, mac) = frame_mac_parts(frame);
        let expected = self.mac(content);
        expected.ct_eq(mac).into()
    }

    /// The 32-byte pad that encrypts the `E!` frame whose sub-code
    /// characters are `subcode`.
    pub fn pad(&self, subcode: [u8; 2]) -> [u8; BLOCK_LEN] {
        self.pad.finalize_with(&subcode)
    }

    /// Checks an `E!` frame's MAC and computes its pad in one pass (the two
    /// hashes interleaved, which is faster than [`verify`](Self::verify)
    /// then [`pad`](Self::pad)). The pad is meaningless unless the MAC
    /// verified; the sub-code characters are taken from offsets 4..6.
    pub fn verify_with_pad(&self, frame: &[u8; 64]) -> (bool, [u8; BLOCK_LEN]) {
        let (content, mac) = frame_mac_parts(frame);
        let subcode = [frame[4], frame[5]];
        let (full, pad) =
            self.mac
                .finalize_two(content, Finish::Pad, &self.pad, &subcode, Finish::Final);
        (short_mac(&full).ct_eq(mac).into(), pad)
    }
}

/// Splits a frame into the MAC'd content (offsets 2..54) and its MAC
/// characters (54..62).
pub fn frame_mac_parts(frame: &[u8; 64]) -> (&[u8; MAC_CONTENT_LEN], &[u8; MAC_CHARS]) {
    let (_, rest) = frame.split_first_chunk::<2>().unwrap_or((&[0; 2], &[]));
    let (content, rest) = rest
        .split_first_chunk::<MAC_CONTENT_LEN>()
        .unwrap_or((&[0; MAC_CONTENT_LEN], &[]));
    let mac = rest.first_chunk::<MAC_CHARS>().unwrap_or(&[0; MAC_CHARS]);
    (content, mac)
}

/// `session_key = final(prepare(serial, LTK, RS) + device_entropy + nonce)`.
///
/// ```
/// use ekey_proto::crypto::derive_session_key;
/// use ekey_proto::keys::{LongTermKey, Serial};
/// let k = derive_session_key(&Serial([1; 12]), &LongTermKey::from_bytes([2; 32]), &[3; 32], &[4; 12]);
/// assert_ne!(k.as_bytes(), &[0u8; 32]);
/// ```
pub fn derive_session_key(
    serial: &Serial,
    ltk: &LongTermKey,
    device_entropy: &[u8; BLOCK_LEN],
    nonce: &[u8],
) -> SessionKey {
    let mut st = Skein256::prepare(serial.as_bytes(), ltk.as_bytes(), Personalisation::ReKeying);
    st.update(device_entropy);
    st.update(nonce);
    SessionKey::from_bytes(st.finalize())
}

/// `new_LTK = final(prepare(serial, master, LRS) + device_entropy + nonce)`.
pub fn derive_long_term_key(
    serial: &Serial,
    master: &MasterKey,
    device_entropy: &[u8; BLOCK_LEN],
    nonce: &[u8],
) -> LongTermKey {
    let mut st = Skein256::prepare(
        serial.as_bytes(),
        master.as_bytes(),
        Personalisation::LongTermReKeying,
    );
    st.update(device_entropy);
    st.update(nonce);
    LongTermKey::from_bytes(st.finalize())
}

/// The nonce MAC of a long-term re-key: `final_pad(prepare(serial, master,
/// LKMS) + nonce)`, bytes 0, 1, 2, 29, 30, 31.
pub fn long_term_nonce_mac(serial: &Serial, master: &MasterKey, nonce: &[u8]) -> [u8; 6] {
    let mut st = long_term_nonce_mac_state(serial, master);
    st.update(nonce);
    short_mac_bytes(&st.finalize_pad())
}

/// The prepared state for [`long_term_nonce_mac`], for callers that hash
/// the nonce as it arrives.
pub fn long_term_nonce_mac_state(serial: &Serial, master: &MasterKey) -> Skein256 {
    Skein256::prepare(
        serial.as_bytes(),
        master.as_bytes(),
        Personalisation::LongTermMessageAuthentication,
    )
}

/// Finishes a [`long_term_nonce_mac_state`] into the 6 MAC bytes.
pub fn finish_long_term_nonce_mac(st: Skein256) -> [u8; 6] {
    short_mac_bytes(&st.finalize_pad())
}
