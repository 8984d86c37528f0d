//! A byte queue for entropy that wipes bytes as they leave it.
//!
//! `VecDeque<u8>` leaves copies behind: bytes drained from it stay in its
//! buffer until overwritten, and growing it frees the old buffer as it is.
//! [`WipeQueue`] is a ring buffer over one boxed slice that zeroes every
//! byte the moment it leaves (taken, moved, discarded, withdrawn), zeroes
//! the old buffer when it grows, and zeroes everything when dropped. So at
//! any time the only copies of entropy in it are the bytes it holds.
//!
//! [`SecretBlock`] is the unit the daemon's queues carry: 32 bytes in a
//! heap slot of their own, zeroed when dropped. Moving one through a
//! channel moves a pointer, so the channels between the drivers, the
//! dispatcher and the outputs never hold entropy themselves.

use std::ops::Index;

use zeroize::Zeroize;

/// A FIFO of bytes that wipes what leaves it (see the module docs).
#[derive(Default)]
pub struct WipeQueue {
    buf: Box<[u8]>,
    head: usize,
    len: usize,
}

impl WipeQueue {
    /// An empty queue with room for `cap` bytes before it first grows.
    pub fn with_capacity(cap: usize) -> Self {
        Self {
            buf: vec![0; cap].into_boxed_slice(),
            head: 0,
            len: 0,
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where byte `i` (from the front) lives in the buffer.
    fn at(&self, i: usize) -> usize {
        (self.head + i) % self.buf.len()
    }

    /// Makes room for `more` bytes, moving into a bigger buffer (and
    /// wiping the old one) if need be.
    fn reserve(&mut self, more: usize) {
        let need = self.len + more;
        if need <= self.buf.len() {
            return;
        }
        let cap = need.max(self.buf.len() * 2).max(64);
        let mut bigger = vec![0u8; cap].into_boxed_slice();
        for (i, b) in bigger.iter_mut().take(self.len).enumerate() {
            *b = self.buf[self.at(i)];
        }
        self.buf.zeroize();
        self.buf = bigger;
        self.head = 0;
    }

    /// Appends `data` at the back.
    pub fn extend_from_slice(&mut self, data: &[u8]) {
        self.reserve(data.len());
        for &b in data {
            let i = self.at(self.len);
            self.buf[i] = b;
            self.len += 1;
        }
    }

    /// Puts `data` (in order) in front of the bytes held.
    pub fn prepend(&mut self, data: &[u8]) {
        self.reserve(data.len());
        let cap = self.buf.len();
        for &b in data.iter().rev() {
            self.head = (self.head + cap - 1) % cap;
            self.buf[self.head] = b;
            self.len += 1;
        }
    }

    /// Copies the first bytes into `out` (as many as fit); returns how many.
    pub fn copy_front(&self, out: &mut [u8]) -> usize {
        let n = out.len().min(self.len);
        for (i, o) in out.iter_mut().take(n).enumerate() {
            *o = self.buf[self.at(i)];
        }
        n
    }

    /// Wipes and forgets the first `n` bytes (all, if it holds fewer).
    pub fn discard_front(&mut self, n: usize) {
        let n = n.min(self.len);
        for i in 0..n {
            let at = self.at(i);
            self.buf[at] = 0;
        }
        if n > 0 {
            self.head = self.at(n);
        }
        self.len -= n;
    }

    /// Moves the first `n` bytes (all, if it holds fewer) to the back of
    /// `to`, wiping them here.
    pub fn move_front_to(&mut self, n: usize, to: &mut WipeQueue) {
        let n = n.min(self.len);
        to.reserve(n);
        for i in 0..n {
            let b = self.buf[self.at(i)];
            to.extend_from_slice(&[b]);
        }
        self.discard_front(n);
    }

    /// Removes `n` bytes from position `at` on (the later ones move up),
    /// wiping the places they leave.
    pub fn remove_range(&mut self, at: usize, n: usize) {
        let at = at.min(self.len);
        let n = n.min(self.len - at);
        for i in at..self.len - n {
            let (dst, src) = (self.at(i), self.at(i + n));
            self.buf[dst] = self.buf[src];
        }
        for i in self.len - n..self.len {
            let p = self.at(i);
            self.buf[p] = 0;
        }
        self.len -= n;
    }

    /// The bytes held, front first.
    pub fn iter(&self) -> impl Iterator<Item = u8> + '_ {
        (0..self.len).map(|i| self.buf[self.at(i)])
    }

    /// The whole buffer, held bytes and wiped places alike (for tests).
    #[cfg(test)]
    pub(crate) fn storage(&self) -> &[u8] {
        &self.buf
    }

    /// Wipes everything: what [`Drop`] does.
    pub fn wipe(&mut self) {
        self.buf.zeroize();
        self.head = 0;
        self.len = 0;
    }
}

impl Index<usize> for WipeQueue {
    type Output = u8;

    fn index(&self, i: usize) -> &u8 {
        assert!(i < self.len, "index {i} of a WipeQueue of {}", self.len);
        &self.buf[self.at(i)]
    }
}

impl Drop for WipeQueue {
    fn drop(&mut self) {
        self.wipe();
        #[cfg(test)]
        tests::LAST_DROPPED.with(|d| *d.borrow_mut() = self.buf.to_vec());
    }
}

/// 32 bytes of entropy in a heap slot of their own, zeroed when dropped
/// and never shown by `Debug` (see the module docs).
pub struct SecretBlock(Box<[u8; 32]>);

impl SecretBlock {
    /// Takes `data` in, zeroing the caller's copy.
    pub fn take(data: &mut [u8; 32]) -> Self {
        let mut slot = Box::new([0u8; 32]);
        slot.copy_from_slice(data);
        data.zeroize();
        Self(slot)
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Zeroes the bytes now (what [`Drop`] does).
    pub fn wipe(&mut self) {
        self.0.zeroize();
    }
}

impl Clone for SecretBlock {
    fn clone(&self) -> Self {
        let mut copy = *self.0;
        Self::take(&mut copy)
    }
}

impl std::fmt::Debug for SecretBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBlock(..)")
    }
}

impl Drop for SecretBlock {
    fn drop(&mut self) {
        self.wipe();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    std::thread_local! {
        /// The buffer of the last queue this thread dropped, as `Drop` left
        /// it just before freeing it.
        pub(super) static LAST_DROPPED: std::cell::RefCell<Vec<u8>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }

    #[test]
    fn dropping_a_pool_leaves_zeros_in_its_buffer() {
        let mut pool = WipeQueue::with_capacity(64);
        pool.extend_from_slice(&[0x5a; 100]);
        pool.discard_front(30);
        let cap = pool.storage().len();
        drop(pool);
        let left = LAST_DROPPED.with(|d| d.borrow().clone());
        assert_eq!(left.len(), cap, "the grown buffer was the one dropped");
        assert!(left.iter().all(|&b| b == 0), "{left:?}");
    }

    /// The held bytes, and whether every other place in the buffer is zero.
    fn only_held(q: &WipeQueue) -> bool {
        let held: std::collections::HashSet<usize> = (0..q.len()).map(|i| q.at(i)).collect();
        q.storage()
            .iter()
            .enumerate()
            .all(|(i, &b)| held.contains(&i) || b == 0)
    }

    #[test]
    fn bytes_that_leave_are_wiped_and_order_is_kept() {
        let mut q = WipeQueue::with_capacity(8);
        let mut model = std::collections::VecDeque::new();
        let mut other = WipeQueue::default();
        for round in 0u8..200 {
            let data: Vec<u8> = (0..(round % 13 + 1)).map(|i| round ^ (i + 1) | 1).collect();
            q.extend_from_slice(&data);
            model.extend(data.iter().copied());
            match round % 5 {
                0 => {
                    q.discard_front(3);
                    for _ in 0..3.min(model.len()) {
                        model.pop_front();
                    }
                }
                1 => {
                    let mut out = [0u8; 4];
                    let n = q.copy_front(&mut out);
                    assert_eq!(
                        out[..n],
                        model.iter().take(n).copied().collect::<Vec<_>>()[..]
                    );
                    q.move_front_to(n, &mut other);
                    model.drain(..n);
                }
                2 => {
                    let at = model.len() / 3;
                    q.remove_range(at, 2);
                    let end = (at + 2).min(model.len());
                    model.drain(at..end);
                }
                3 => {
                    q.prepend(&[7, 9]);
                    model.push_front(9);
                    model.push_front(7);
                }
                _ => {}
            }
            assert_eq!(
                q.iter().collect::<Vec<_>>(),
                model.iter().copied().collect::<Vec<_>>()
            );
            assert!(only_held(&q), "round {round}: a copy left behind");
            assert!(only_held(&other));
        }
        assert!(q.storage().len() > 8, "it grew");
    }

    #[test]
    fn a_secret_block_takes_its_bytes_and_wipes_them() {
        let mut src = [0x3c; 32];
        let mut b = SecretBlock::take(&mut src);
        assert_eq!(src, [0; 32], "the caller's copy is zeroed");
        assert_eq!(b.bytes(), &[0x3c; 32]);
        assert_eq!(b.clone().bytes(), &[0x3c; 32]);
        assert_eq!(format!("{b:?}"), "SecretBlock(..)");
        // What Drop does.
        b.wipe();
        assert_eq!(b.bytes(), &[0; 32]);
    }

    #[test]
    fn wiping_leaves_zeros() {
        let mut q = WipeQueue::with_capacity(16);
        q.extend_from_slice(&[0xa5; 40]);
        q.discard_front(5);
        assert!(q.storage().iter().any(|&b| b != 0));
        // What Drop does.
        q.wipe();
        assert!(q.storage().iter().all(|&b| b == 0));
        assert!(q.is_empty());
    }
}
