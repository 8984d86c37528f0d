//! Live SP 800-90B min-entropy estimates of each key's output (the
//! estimators of `ekey_proto::health::min_entropy`), over the last
//! `--min-entropy-window` bytes (default 125,000: the last 1,000,000 bits).
//!
//! Every verified block the key sends goes into the key's window, before
//! the health gate (so a closed gate's key is still judged). Once the
//! window is full, and then at most every [`EVERY`] and once at least half
//! a window of new bytes came (at a real key's 4 kB/s: every 16 s, 0.1 %
//! of a core), the window is lent to an estimate on tokio's blocking
//! pool (the suffix sort of 125,000 bytes takes about 16 ms: it must not
//! hold up the key or the EGD clients). The
//! result goes into the key's status (`min_entropy_bits_per_byte`) and to
//! the gate ([`ekey_proto::health::Gate::observe_min_entropy`], which acts
//! on it only with `--min-entropy-floor`).
//!
//! Memory: the window (its size in bytes) per key. The estimate borrows
//! the window's buffer (bytes arriving meanwhile wait beside it, a few
//! hundred at most), and needs sort scratch while it runs, freed
//! afterwards: 4 bytes per slot, an eighth of the window's bytes for a
//! healthy key ([`scratch_slots`]; up to one per byte for a stuck one).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ekey_proto::health::min_entropy::{Estimates, HOST_WINDOW, estimate_window};
use zeroize::Zeroizing;

/// The default window, bytes.
pub const DEFAULT_WINDOW: usize = HOST_WINDOW;
/// The smallest window accepted (smaller windows estimate far too low).
pub const MIN_WINDOW: usize = 4096;
/// The largest window accepted.
pub const MAX_WINDOW: usize = 1_000_000;
/// At most one estimate per key this often.
pub const EVERY: Duration = Duration::from_secs(10);

/// One key's window of output bytes.
pub struct Window {
    /// The bytes, a ring from `head`; lent (empty here) while an estimate
    /// runs.
    ring: Zeroizing<Vec<u8>>,
    size: usize,
    head: usize,
    len: usize,
    /// Bytes pushed while the ring is lent (the newest `size` at most),
    /// added to it when it comes back.
    arrived: Zeroizing<Vec<u8>>,
    /// Bytes pushed since the last estimate began.
    fresh: usize,
    last: Option<Instant>,
    running: bool,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("size", &self.size)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

/// A [`Window`] shared by the key's sessions and its estimate task.
pub type SharedWindow = Arc<Mutex<Window>>;

impl Window {
    /// A window of `size` bytes; 0: no estimates.
    pub fn new(size: usize) -> Self {
        Self {
            ring: Zeroizing::new(vec![0; size]),
            size,
            head: 0,
            len: 0,
            arrived: Zeroizing::new(Vec::new()),
            fresh: 0,
            last: None,
            running: false,
        }
    }

    /// The window's size in bytes (0: off).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Adds bytes, dropping the oldest once full.
    pub fn push(&mut self, data: &[u8]) {
        if self.size == 0 {
            return;
        }
        self.fresh = self.fresh.saturating_add(data.len());
        if self.running {
            // The ring is lent: keep the newest `size` bytes for it.
            self.arrived.extend_from_slice(data);
            let over = self.arrived.len().saturating_sub(self.size);
            if over > 0 {
                self.arrived.drain(..over);
            }
            return;
        }
        self.put(data);
    }

    fn put(&mut self, data: &[u8]) {
        let n = self.ring.len();
        if n == 0 {
            return;
        }
        for &b in data {
            if let Some(slot) = self.ring.get_mut(self.head) {
                *slot = b;
            }
            self.head = (self.head + 1) % n;
        }
        self.len = (self.len + data.len()).min(n);
    }

    /// When an estimate is due at `now`: the window's bytes, oldest first.
    /// They are lent, not copied: hand them back with [`Window::done`]
    /// (until then the estimate counts as running, and bytes pushed wait
    /// beside the window).
    pub fn due(&mut self, now: Instant) -> Option<Zeroizing<Vec<u8>>> {
        let n = self.size;
        let due = n > 0
            && self.len == n
            && !self.running
            && self.fresh >= (n / 2).max(1)
            && self.last.is_none_or(|t| now.duration_since(t) >= EVERY);
        if !due {
            return None;
        }
        self.running = true;
        self.fresh = 0;
        self.last = Some(now);
        let mut ring = std::mem::take(&mut self.ring);
        ring.rotate_left(self.head);
        self.head = 0;
        Some(ring)
    }

    /// The estimate started by [`Window::due`] is over: its bytes come back
    /// (a buffer of another size, or none, empties the window), and the
    /// bytes pushed meanwhile go in.
    pub fn done(&mut self, bytes: Option<Zeroizing<Vec<u8>>>) {
        self.running = false;
        match bytes {
            Some(b) if b.len() == self.size => self.ring = b,
            _ => {
                self.ring = Zeroizing::new(vec![0; self.size]);
                self.len = 0;
            }
        }
        self.head = 0;
        let arrived = std::mem::take(&mut self.arrived);
        self.put(&arrived);
    }
}

/// Suffix-sort scratch for `window`: the slots its commonest byte value
/// needs (see [`ekey_proto::health::min_entropy::tuple_estimates`]), and at
/// least an eighth of the window, so that the sort takes at most about 9
/// passes. For a healthy key that is 4 bytes per 8 window bytes instead of
/// 4 per byte.
pub fn scratch_slots(window: &[u8]) -> usize {
    let mut counts = [0usize; 256];
    for &b in window {
        if let Some(c) = counts.get_mut(usize::from(b)) {
            *c += 1;
        }
    }
    let largest = counts.into_iter().max().unwrap_or(0);
    largest.max(window.len() / 8).min(window.len())
}

/// The estimates of `window` (oldest byte first).
pub fn estimate(window: &[u8]) -> Option<Estimates> {
    let mut order = vec![0u32; scratch_slots(window)];
    estimate_window(window, &mut order)
}

/// Millibits per byte, as the gate takes them.
pub fn millibits(e: &Estimates) -> u32 {
    (e.min().clamp(0.0, 8.0) * 1000.0).floor() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_once_full_then_paced_and_oldest_first() {
        let mut w = Window::new(MIN_WINDOW);
        let t0 = Instant::now();
        w.push(&vec![1; MIN_WINDOW - 1]);
        assert!(w.due(t0).is_none(), "not full");
        w.push(&[2, 3]);
        let copy = w.due(t0).expect("full");
        assert_eq!(copy.len(), MIN_WINDOW);
        // Oldest first: one 1 was dropped, the newest bytes are last.
        assert_eq!(&copy[MIN_WINDOW - 2..], &[2, 3]);
        assert!(copy[..MIN_WINDOW - 2].iter().all(|&b| b == 1));
        w.push(&vec![4; MIN_WINDOW]);
        assert!(w.due(t0 + EVERY).is_none(), "still running");
        w.done(Some(copy));
        assert!(w.due(t0 + EVERY / 2).is_none(), "too soon");
        let lent = w.due(t0 + EVERY).unwrap();
        // The 4s pushed while the first estimate ran went in on return.
        assert!(lent.iter().all(|&b| b == 4));
        w.done(Some(lent));
        assert!(w.due(t0 + EVERY * 3).is_none(), "no fresh bytes");
        assert!(Window::new(0).due(t0).is_none());
    }

    #[test]
    fn bytes_pushed_while_lent_follow_the_window_in_order() {
        let mut w = Window::new(MIN_WINDOW);
        let t0 = Instant::now();
        let first: Vec<u8> = (0..MIN_WINDOW + 100).map(|i| i as u8).collect();
        w.push(&first);
        let lent = w.due(t0).unwrap();
        assert_eq!(&lent[..], &first[100..], "oldest first");
        assert_eq!(w.size(), MIN_WINDOW);
        w.push(&[200, 201]);
        w.push(&[202]);
        w.done(Some(lent));
        // The 3 bytes that came while lent count as new: half a window is
        // 3 + MIN_WINDOW / 2 - 3.
        w.push(&vec![9; MIN_WINDOW / 2 - 4]);
        assert!(
            w.due(t0 + EVERY).is_none(),
            "not half a window of new bytes yet"
        );
        w.push(&[9]);
        let again = w.due(t0 + EVERY).unwrap();
        let tail = &again[MIN_WINDOW / 2..];
        assert_eq!(&tail[..3], &[200, 201, 202]);
        assert!(tail[3..].iter().all(|&b| b == 9));
        assert_eq!(
            &again[..10],
            &first[MIN_WINDOW / 2 + 100..MIN_WINDOW / 2 + 110]
        );
        // More than a window while lent: only the newest window is kept;
        // and a lost buffer empties the window rather than mixing sizes.
        w.push(&vec![5; MIN_WINDOW * 2]);
        w.done(None);
        assert_eq!(w.len, MIN_WINDOW);
        assert!(w.due(t0 + EVERY * 2).unwrap().iter().all(|&b| b == 5));
    }

    #[test]
    fn scratch_is_an_eighth_unless_one_byte_value_needs_more() {
        let mut random = vec![0u8; 125_000];
        getrandom::fill(&mut random).unwrap();
        assert_eq!(scratch_slots(&random), 125_000 / 8);
        assert_eq!(scratch_slots(&[7; 4096]), 4096);
        // Every other byte a 1: its 2048 suffixes must fit at once.
        let half: Vec<u8> = (0..4096)
            .map(|i| if i % 2 == 0 { 1 } else { 2 + (i % 200) as u8 })
            .collect();
        assert_eq!(scratch_slots(&half), 2048);
        assert_eq!(scratch_slots(&[]), 0);
    }

    #[test]
    fn random_bytes_estimate_high_and_a_stuck_stream_low() {
        let mut bytes = vec![0u8; MIN_WINDOW * 4];
        getrandom::fill(&mut bytes).unwrap();
        let e = estimate(&bytes).unwrap();
        assert!(millibits(&e) > 5000, "{e:?}");
        let stuck: Vec<u8> = bytes.iter().map(|b| b & 0x0f).collect();
        let e = estimate(&stuck).unwrap();
        assert!(millibits(&e) < 4500, "{e:?}");
    }
}
