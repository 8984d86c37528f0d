//! Live SP 800-90B min-entropy estimates of each key's output (the
//! estimators of `ekey_proto::health::min_entropy`), over the last
//! `--min-entropy-window` bytes (default 125,000: the last 1,000,000 bits).
//!
//! Every verified block the key sends goes into the key's window, before
//! the health gate (so a closed gate's key is still judged). Once the
//! window is full, and then every [`EVERY`] with at least an eighth of a
//! window of new bytes, the window is copied and estimated on tokio's
//! blocking pool (the suffix sort of 125,000 bytes takes tens of
//! milliseconds: it must not hold up the key or the EGD clients). The
//! result goes into the key's status (`min_entropy_bits_per_byte`) and to
//! the gate ([`ekey_proto::health::Gate::observe_min_entropy`], which acts
//! on it only with `--min-entropy-floor`).
//!
//! Memory: the window (its size in bytes) per key, and while an estimate
//! runs a copy of it and 4 bytes per window byte of sort scratch, freed
//! afterwards.

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
pub const EVERY: Duration = Duration::from_secs(5);

/// One key's window of output bytes.
pub struct Window {
    ring: Zeroizing<Vec<u8>>,
    head: usize,
    len: usize,
    /// Bytes pushed since the last estimate began.
    fresh: usize,
    last: Option<Instant>,
    running: bool,
}

impl std::fmt::Debug for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Window")
            .field("size", &self.ring.len())
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
            head: 0,
            len: 0,
            fresh: 0,
            last: None,
            running: false,
        }
    }

    /// The window's size in bytes (0: off).
    pub fn size(&self) -> usize {
        self.ring.len()
    }

    /// Adds bytes, dropping the oldest once full.
    pub fn push(&mut self, data: &[u8]) {
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
        self.fresh = self.fresh.saturating_add(data.len());
    }

    /// When an estimate is due at `now`: the window's bytes, oldest first
    /// (and the estimate counts as running until [`Window::done`]).
    pub fn due(&mut self, now: Instant) -> Option<Zeroizing<Vec<u8>>> {
        let n = self.ring.len();
        let due = n > 0
            && self.len == n
            && !self.running
            && self.fresh >= (n / 8).max(1)
            && self.last.is_none_or(|t| now.duration_since(t) >= EVERY);
        if !due {
            return None;
        }
        self.running = true;
        self.fresh = 0;
        self.last = Some(now);
        let mut copy = Zeroizing::new(Vec::with_capacity(n));
        copy.extend_from_slice(self.ring.get(self.head..).unwrap_or(&[]));
        copy.extend_from_slice(self.ring.get(..self.head).unwrap_or(&[]));
        Some(copy)
    }

    /// The estimate started by [`Window::due`] is over.
    pub fn done(&mut self) {
        self.running = false;
    }
}

/// The estimates of `window` (oldest byte first).
pub fn estimate(window: &[u8]) -> Option<Estimates> {
    let mut order = vec![0u32; window.len()];
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
        w.done();
        assert!(w.due(t0 + EVERY / 2).is_none(), "too soon");
        assert!(w.due(t0 + EVERY).is_some());
        w.done();
        assert!(w.due(t0 + EVERY * 3).is_none(), "no fresh bytes");
        assert!(Window::new(0).due(t0).is_none());
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
