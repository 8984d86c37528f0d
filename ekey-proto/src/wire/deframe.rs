//! Finding 64-byte frames in a byte stream.
//!
//! The key's stream can hold garbage: stale bytes after open, noise, a
//! frame cut short by a reset. A frame is exactly [`FRAME_LEN`] bytes,
//! starting with `* ` and ending with `\r\n`. The [`Deframer`] looks for
//! `*`; a frame starts there if the next byte is a space and the bytes at
//! +62/+63 are CR LF; otherwise it skips to the next `*` after it (also
//! inside bytes it has already buffered, so a truncated frame followed by
//! a real one loses only the truncated one).
//!
//! ```
//! use ekey_proto::wire::deframe::Deframer;
//!
//! let frame = *b"* I>T03143 V03254                                     apKTNVoy\r\n";
//! let mut stream = b"junk".to_vec();
//! stream.extend_from_slice(&frame);
//!
//! let mut deframer = Deframer::new();
//! let mut input = &stream[..];
//! let mut found = Vec::new();
//! while !input.is_empty() {
//!     let (used, frame) = deframer.push(input);
//!     input = &input[used..];
//!     found.extend(frame);
//! }
//! assert_eq!(found, [frame]);
//! assert_eq!(deframer.stats().garbage_bytes, 4);
//! assert_eq!(deframer.stats().framing_errors, 1);
//! ```

/// Length of every frame, `* ` through `\r\n`.
pub const FRAME_LEN: usize = 64;

/// Counters kept by a [`Deframer`] since it was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DeframeStats {
    /// Well-formed frames found.
    pub frames: u64,
    /// Runs of discarded bytes; each contiguous run between two frames
    /// counts once, however long.
    pub framing_errors: u64,
    /// Bytes discarded (not part of any frame).
    pub garbage_bytes: u64,
}

/// Whether `window` (a complete candidate) is a well-formed frame.
#[inline]
fn is_frame(window: &[u8; FRAME_LEN]) -> bool {
    matches!(window, [b'*', b' ', .., b'\r', b'\n'])
}

/// Whether the second byte, if present, is the space a frame needs.
#[inline]
fn second_ok(candidate: &[u8]) -> bool {
    candidate.get(1).is_none_or(|&b| b == b' ')
}

/// Finds frames in a byte stream fed in chunks of any size.
///
/// Holds at most one partial frame ([`FRAME_LEN`] bytes); no allocation.
/// Feed it with [`push`](Deframer::push) or [`frames`](Deframer::frames).
#[derive(Clone, Debug)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Deframer {
    /// The candidate frame: `buf[..len]`, starting with `*` when `len > 0`.
    buf: [u8; FRAME_LEN],
    len: usize,
    stats: DeframeStats,
    /// The last byte seen was discarded: more discarded bytes continue the
    /// same framing error.
    in_garbage: bool,
}

impl Default for Deframer {
    fn default() -> Self {
        Self::new()
    }
}

impl Deframer {
    /// An empty deframer with zeroed counters.
    pub const fn new() -> Self {
        Self {
            buf: [0; FRAME_LEN],
            len: 0,
            stats: DeframeStats {
                frames: 0,
                framing_errors: 0,
                garbage_bytes: 0,
            },
            in_garbage: false,
        }
    }

    /// Consumes bytes from `input` until one frame is complete or `input`
    /// is used up. Returns how many bytes were consumed and the frame if
    /// one completed; call again with the rest (`&input[consumed..]`).
    ///
    /// Bytes of an incomplete candidate frame are held inside and count as
    /// consumed. Never panics; `consumed <= input.len()`, and `consumed > 0`
    /// whenever `input` is not empty.
    ///
    /// ```
    /// use ekey_proto::wire::deframe::Deframer;
    /// let frame = *b"* M>Long-term rekey unlocked                          vrHSYIoF\r\n";
    /// let mut d = Deframer::new();
    /// assert_eq!(d.push(&frame[..10]), (10, None));
    /// assert_eq!(d.buffered(), 10);
    /// let mut rest = frame[10..].to_vec();
    /// rest.extend_from_slice(b"* ");
    /// assert_eq!(d.push(&rest), (54, Some(frame)));
    /// assert_eq!(d.push(&rest[54..]), (2, None));
    /// ```
    pub fn push(&mut self, input: &[u8]) -> (usize, Option<[u8; FRAME_LEN]>) {
        let mut consumed = 0;
        loop {
            let rest = input.get(consumed..).unwrap_or_default();
            if rest.is_empty() {
                return (consumed, None);
            }
            if self.len > 0 {
                // Inside a candidate: top it up, then check it.
                let taken = self.fill(rest);
                consumed = consumed.saturating_add(taken);
                if let Some(frame) = self.check_buffer() {
                    return (consumed, Some(frame));
                }
                continue;
            }
            // Hunting in the input itself; nothing is buffered.
            let Some(star) = rest.iter().position(|&b| b == b'*') else {
                self.discard(rest.len());
                return (input.len(), None);
            };
            self.discard(star);
            consumed = consumed.saturating_add(star);
            let window = rest.get(star..).unwrap_or_default();
            if !second_ok(window) {
                self.discard(1);
                consumed = consumed.saturating_add(1);
                continue;
            }
            match window.first_chunk::<FRAME_LEN>() {
                Some(frame) if is_frame(frame) => {
                    self.emit();
                    return (consumed.saturating_add(FRAME_LEN), Some(*frame));
                }
                Some(_) => {
                    // Wrong end: skip this `*`, look for the next one.
                    self.discard(1);
                    consumed = consumed.saturating_add(1);
                }
                None => {
                    // A promising start at the end of the input: keep it.
                    self.fill(window);
                    return (input.len(), None);
                }
            }
        }
    }

    /// Iterates over the frames completed by `input`; afterwards all of
    /// `input` has been consumed (a partial frame at its end stays
    /// buffered for the next call).
    ///
    /// ```
    /// use ekey_proto::wire::deframe::Deframer;
    /// let frame = *b"* k>Unable to send entropy. Please re-key session.    VqrrSb4k\r\n";
    /// let stream = [&frame[..], b"\0\0", &frame[..]].concat();
    /// let mut d = Deframer::new();
    /// assert_eq!(d.frames(&stream).count(), 2);
    /// assert_eq!(d.stats().garbage_bytes, 2);
    /// ```
    pub fn frames<'a>(&'a mut self, input: &'a [u8]) -> Frames<'a> {
        Frames {
            deframer: self,
            input,
        }
    }

    /// Forgets a partial frame (for example after resetting the key). The
    /// forgotten bytes are not counted as garbage.
    pub fn reset(&mut self) {
        self.len = 0;
        self.in_garbage = false;
    }

    /// Bytes of a partial frame held, `0..FRAME_LEN`.
    pub fn buffered(&self) -> usize {
        self.len
    }

    /// Counters since this deframer was made.
    pub fn stats(&self) -> DeframeStats {
        self.stats
    }

    /// Counts `n` discarded bytes.
    fn discard(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let n = u64::try_from(n).unwrap_or(u64::MAX);
        self.stats.garbage_bytes = self.stats.garbage_bytes.saturating_add(n);
        if !self.in_garbage {
            self.in_garbage = true;
            self.stats.framing_errors = self.stats.framing_errors.saturating_add(1);
        }
    }

    /// Counts a frame; it ends any run of garbage.
    fn emit(&mut self) {
        self.stats.frames = self.stats.frames.saturating_add(1);
        self.in_garbage = false;
        self.len = 0;
    }

    /// Appends as much of `bytes` as the candidate has room for; returns
    /// how many were taken.
    fn fill(&mut self, bytes: &[u8]) -> usize {
        let free = self.buf.get_mut(self.len..).unwrap_or_default();
        let n = free.len().min(bytes.len());
        if let (Some(dst), Some(src)) = (free.get_mut(..n), bytes.get(..n)) {
            dst.copy_from_slice(src);
            self.len = self.len.saturating_add(n);
            n
        } else {
            0
        }
    }

    /// Checks the buffered candidate, dropping failed starts until it is
    /// still possible (returns `None`, maybe with an empty buffer) or
    /// complete (returns the frame).
    fn check_buffer(&mut self) -> Option<[u8; FRAME_LEN]> {
        loop {
            let candidate = self.buf.get(..self.len).unwrap_or_default();
            if candidate.is_empty() {
                return None;
            }
            let complete = self.len == FRAME_LEN && is_frame(&self.buf);
            if complete {
                let frame = self.buf;
                self.emit();
                return Some(frame);
            }
            if second_ok(candidate) && self.len < FRAME_LEN {
                return None;
            }
            // This start failed: skip to the next `*` after it.
            let next = candidate
                .iter()
                .skip(1)
                .position(|&b| b == b'*')
                .map_or(self.len, |p| p.saturating_add(1));
            self.discard(next);
            self.buf.copy_within(next.min(self.len)..self.len, 0);
            self.len = self.len.saturating_sub(next);
        }
    }
}

/// Iterator over the frames in one input slice; see [`Deframer::frames`].
#[derive(Debug)]
pub struct Frames<'a> {
    deframer: &'a mut Deframer,
    input: &'a [u8],
}

impl Iterator for Frames<'_> {
    type Item = [u8; FRAME_LEN];

    fn next(&mut self) -> Option<Self::Item> {
        while !self.input.is_empty() {
            let (used, frame) = self.deframer.push(self.input);
            self.input = self.input.get(used..).unwrap_or_default();
            if frame.is_some() {
                return frame;
            }
        }
        None
    }
}

impl core::iter::FusedIterator for Frames<'_> {}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    const F1: &[u8; 64] = b"* S!AANwBvBlg3OTBJORFD                                Al/Smw1b\r\n";
    const F2: &[u8; 64] = b"* I>T03143 V03254                                     apKTNVoy\r\n";
    const F3: &[u8; 64] = b"* E!AAG5d/K71wDV0WuL+h0raRLpT589ww7w+9SNxsFMRs99w=    RaU92PnS\r\n";

    /// Feeds `stream` in chunks of the given sizes (cycled), collecting
    /// frames; checks the consumption contract on the way.
    fn run_chunks(d: &mut Deframer, stream: &[u8], sizes: &[usize]) -> Vec<[u8; 64]> {
        let mut out = Vec::new();
        let mut pos = 0;
        let mut i = 0;
        while pos < stream.len() {
            let size = sizes[i % sizes.len()].max(1);
            i += 1;
            let end = (pos + size).min(stream.len());
            let mut chunk = &stream[pos..end];
            while !chunk.is_empty() {
                let (used, frame) = d.push(chunk);
                assert!(used > 0 && used <= chunk.len());
                chunk = &chunk[used..];
                out.extend(frame);
            }
            pos = end;
        }
        out
    }

    fn run(d: &mut Deframer, stream: &[u8]) -> Vec<[u8; 64]> {
        run_chunks(d, stream, &[stream.len().max(1)])
    }

    fn stats(frames: u64, framing_errors: u64, garbage_bytes: u64) -> DeframeStats {
        DeframeStats {
            frames,
            framing_errors,
            garbage_bytes,
        }
    }

    #[test]
    fn whole_frame() {
        let mut d = Deframer::new();
        assert_eq!(d.push(F1), (64, Some(*F1)));
        assert_eq!(d.stats(), stats(1, 0, 0));
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.push(&[]), (0, None));
    }

    #[test]
    fn byte_by_byte() {
        let mut d = Deframer::default();
        for (i, b) in F2.iter().enumerate() {
            let (used, frame) = d.push(core::slice::from_ref(b));
            assert_eq!(used, 1);
            if i == 63 {
                assert_eq!(frame, Some(*F2));
            } else {
                assert_eq!(frame, None);
                assert_eq!(d.buffered(), i + 1);
            }
        }
        assert_eq!(d.stats(), stats(1, 0, 0));
    }

    #[test]
    fn every_split_point() {
        for split in 0..=64 {
            let stream = [&F3[..], &F1[..]].concat();
            let mut d = Deframer::new();
            let (a, b) = stream.split_at(split);
            let mut out = run(&mut d, a);
            out.extend(run(&mut d, b));
            assert_eq!(out, [*F3, *F1], "split {split}");
            assert_eq!(d.stats(), stats(2, 0, 0));
        }
    }

    #[test]
    fn all_chunk_sizes() {
        let stream = [&b"xx"[..], F1, b"*", F2, b"* ", F3].concat();
        for size in 1..=stream.len() {
            let mut d = Deframer::new();
            assert_eq!(run_chunks(&mut d, &stream, &[size]), [*F1, *F2, *F3]);
            assert_eq!(d.stats(), stats(3, 3, 5), "size {size}");
        }
    }

    #[test]
    fn garbage_before_and_between() {
        let mut d = Deframer::new();
        let stream = [&b"junk"[..], F1].concat();
        assert_eq!(run(&mut d, &stream), [*F1]);
        assert_eq!(d.stats(), stats(1, 1, 4));

        let mut d = Deframer::new();
        let stream = [&b"\r\n\0garbage"[..], F1, b"more junk\r\n", F2, F3, b"tail"].concat();
        assert_eq!(run(&mut d, &stream), [*F1, *F2, *F3]);
        assert_eq!(d.stats(), stats(3, 3, 10 + 11 + 4));
    }

    #[test]
    fn stray_stars() {
        // `*` without a space, and `* ` that never ends in CR LF.
        let mut d = Deframer::new();
        let stream = [&b"a*b**c* d* "[..], F2, b"***", F1].concat();
        assert_eq!(run(&mut d, &stream), [*F2, *F1]);
        assert_eq!(d.stats(), stats(2, 2, 11 + 3));
        // A `* ` inside garbage a few bytes before a frame.
        let mut d = Deframer::new();
        let stream = [&b"* x"[..], F3].concat();
        assert_eq!(run(&mut d, &stream), [*F3]);
        assert_eq!(d.stats(), stats(1, 1, 3));
    }

    #[test]
    fn truncated_frame_then_full() {
        for cut in 1..64 {
            let stream = [&F1[..cut], F2].concat();
            for size in [1, 7, 63, 64, 200] {
                let mut d = Deframer::new();
                assert_eq!(
                    run_chunks(&mut d, &stream, &[size]),
                    [*F2],
                    "cut {cut} size {size}"
                );
                assert_eq!(d.stats(), stats(1, 1, cut as u64), "cut {cut} size {size}");
            }
        }
    }

    #[test]
    fn truncated_frame_between_frames() {
        let stream = [&F1[..], &F3[..40], F2].concat();
        let mut d = Deframer::new();
        assert_eq!(run(&mut d, &stream), [*F1, *F2]);
        assert_eq!(d.stats(), stats(2, 1, 40));
    }

    #[test]
    fn bad_end_is_skipped() {
        // Right length, wrong end: not a frame.
        let mut bad = *F1;
        bad[62] = b'\n';
        let stream = [&bad[..], F2].concat();
        let mut d = Deframer::new();
        assert_eq!(run(&mut d, &stream), [*F2]);
        assert_eq!(d.stats(), stats(1, 1, 64));
    }

    #[test]
    fn back_to_back_in_one_push() {
        let stream = [&F1[..], F2].concat();
        let mut d = Deframer::new();
        assert_eq!(d.push(&stream), (64, Some(*F1)));
        assert_eq!(d.push(&stream[64..]), (64, Some(*F2)));
        assert_eq!(d.stats(), stats(2, 0, 0));
        let mut d = Deframer::new();
        assert_eq!(d.frames(&stream).collect::<Vec<_>>(), [*F1, *F2]);
    }

    #[test]
    fn early_resync_on_second_byte() {
        let mut d = Deframer::new();
        assert_eq!(d.push(b"*"), (1, None));
        assert_eq!(d.buffered(), 1);
        assert_eq!(d.push(b"x"), (1, None));
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.stats(), stats(0, 1, 2));
        // "**" keeps the second star as a candidate.
        let mut d = Deframer::new();
        assert_eq!(d.push(b"*"), (1, None));
        assert_eq!(d.push(b"*"), (1, None));
        assert_eq!(d.buffered(), 1);
        assert_eq!(d.stats(), stats(0, 1, 1));
        assert_eq!(d.push(&F1[1..]), (63, Some(*F1)));
    }

    #[test]
    fn reset_forgets_partial() {
        let mut d = Deframer::new();
        assert_eq!(d.push(b"xx"), (2, None));
        assert_eq!(d.push(&F1[..30]), (30, None));
        d.reset();
        assert_eq!(d.buffered(), 0);
        assert_eq!(d.stats(), stats(0, 1, 2));
        assert_eq!(run(&mut d, b"yy"), Vec::<[u8; 64]>::new());
        // After a reset, new garbage is a new error.
        assert_eq!(d.stats(), stats(0, 2, 4));
        assert_eq!(run(&mut d, F1), [*F1]);
    }

    #[test]
    fn pure_garbage() {
        let mut d = Deframer::new();
        let junk = [0u8; 1000];
        assert_eq!(d.push(&junk), (1000, None));
        assert_eq!(d.push(&junk), (1000, None));
        assert_eq!(d.stats(), stats(0, 1, 2000));
    }

    /// The rule as a plain function over a whole stream: frames found and
    /// the index where the undecided tail starts.
    fn model(stream: &[u8]) -> (Vec<[u8; 64]>, DeframeStats, usize) {
        let mut frames = Vec::new();
        let mut st = DeframeStats::default();
        let mut in_garbage = false;
        let mut i = 0;
        let discard = |st: &mut DeframeStats, in_garbage: &mut bool, n: u64| {
            st.garbage_bytes += n;
            if !*in_garbage {
                *in_garbage = true;
                st.framing_errors += 1;
            }
        };
        while i < stream.len() {
            if stream[i] != b'*' {
                discard(&mut st, &mut in_garbage, 1);
                i += 1;
                continue;
            }
            let w = &stream[i..];
            if w.len() >= 2 && w[1] != b' ' {
                discard(&mut st, &mut in_garbage, 1);
                i += 1;
                continue;
            }
            if w.len() < 64 {
                break;
            }
            if w[62] == b'\r' && w[63] == b'\n' {
                frames.push(w[..64].try_into().unwrap());
                st.frames += 1;
                in_garbage = false;
                i += 64;
            } else {
                discard(&mut st, &mut in_garbage, 1);
                i += 1;
            }
        }
        (frames, st, stream.len() - i)
    }

    fn arb_frame() -> impl Strategy<Value = [u8; 64]> {
        proptest::collection::vec(any::<u8>().prop_filter("no star", |&b| b != b'*'), 60).prop_map(
            |payload| {
                let mut f = [0u8; 64];
                f[..2].copy_from_slice(b"* ");
                f[2..62].copy_from_slice(&payload);
                f[62..].copy_from_slice(b"\r\n");
                f
            },
        )
    }

    fn arb_garbage() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                any::<u8>().prop_filter("no star", |&b| b != b'*'),
                Just(b' '),
                Just(b'\r'),
                Just(b'\n'),
            ],
            0..80,
        )
    }

    /// Stream bytes rich in the characters that matter.
    fn arb_noisy() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            prop_oneof![
                Just(b'*'),
                Just(b' '),
                Just(b'\r'),
                Just(b'\n'),
                any::<u8>()
            ],
            0..400,
        )
    }

    proptest! {
        #[test]
        fn garbage_and_frames(
            parts in proptest::collection::vec((arb_garbage(), arb_frame()), 0..8),
            tail in arb_garbage(),
            sizes in proptest::collection::vec(1usize..100, 1..10),
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            let mut garbage = 0u64;
            let mut runs = 0u64;
            for (g, f) in &parts {
                stream.extend_from_slice(g);
                stream.extend_from_slice(f);
                want.push(*f);
                garbage += g.len() as u64;
                runs += u64::from(!g.is_empty());
            }
            stream.extend_from_slice(&tail);
            garbage += tail.len() as u64;
            runs += u64::from(!tail.is_empty());
            let mut d = Deframer::new();
            prop_assert_eq!(run_chunks(&mut d, &stream, &sizes), want);
            prop_assert_eq!(d.stats(), stats(parts.len() as u64, runs, garbage));
            prop_assert_eq!(d.buffered(), 0);
        }

        #[test]
        fn matches_model_in_any_chunking(
            stream in arb_noisy(),
            frames in proptest::collection::vec((0usize..400, arb_frame()), 0..4),
            sizes in proptest::collection::vec(1usize..130, 1..10),
        ) {
            let mut stream = stream;
            for (at, f) in frames {
                let at = at.min(stream.len());
                stream.splice(at..at, f);
            }
            let (want, want_stats, undecided) = model(&stream);
            let mut d = Deframer::new();
            prop_assert_eq!(run_chunks(&mut d, &stream, &sizes), want);
            prop_assert_eq!(d.stats(), want_stats);
            prop_assert_eq!(d.buffered(), undecided);
            let s = d.stats();
            prop_assert_eq!(
                s.garbage_bytes + 64 * s.frames + d.buffered() as u64,
                stream.len() as u64
            );
        }
    }
}
