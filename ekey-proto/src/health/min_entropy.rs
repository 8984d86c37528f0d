//! Live min-entropy estimates: the non-IID estimators of NIST SP 800-90B
//! §6.3.1–§6.3.6 over a sliding window of the last `N` output bytes.
//!
//! ```
//! use ekey_proto::health::min_entropy::Estimator;
//!
//! // A small window (the host uses `HostEstimator`, 125,000 bytes).
//! let mut est = Estimator::<4096>::new();
//! assert!(est.estimate().is_none()); // not full yet
//!
//! let mut x: u64 = 0x9E37_79B9_7F4A_7C15; // stand-in for the key's output
//! let mut block = [0u8; 32];
//! for _ in 0..4096 / 32 {
//!     for b in block.iter_mut() {
//!         x ^= x << 13;
//!         x ^= x >> 7;
//!         x ^= x << 17;
//!         *b = (x >> 56) as u8;
//!     }
//!     est.push(&block);
//! }
//! let e = est.estimate().expect("window is full");
//! for (name, bits_per_byte) in e.iter() {
//!     assert!((0.0..=8.0).contains(&bits_per_byte), "{name}");
//! }
//! assert!(e.min() > 5.0); // small windows estimate low (see the table below)
//! ```
//!
//! # What is estimated
//!
//! Each estimator gives bits of min-entropy per **byte** (0 to 8), the way
//! NIST's `ea_non_iid` tool treats 8-bit samples:
//!
//! | field of [`Estimates`] | §     | runs on | scaled |
//! |---|---|---|---|
//! | `most_common_value` | 6.3.1 | the bytes | — |
//! | `collision`         | 6.3.2 | the bit string (each byte most significant bit first) | × 8 |
//! | `markov`            | 6.3.3 | the bit string | × 8 |
//! | `compression`       | 6.3.4 | the bit string | × 8 |
//! | `t_tuple`           | 6.3.5 | the bytes | — |
//! | `lrs`               | 6.3.6 | the bytes | — |
//!
//! [`Estimates::min`] is the smallest of the six. The tool's own
//! assessment, `min(H_original, 8 × H_bitstring)`, takes more estimators:
//! it also runs the most-common-value, t-tuple and LRS estimators on the
//! bit string, and the four predictors (§6.3.7–§6.3.10). Those are not
//! here, so `min()` can be above the tool's final figure; it equals the
//! minimum of the tool's values for these six (within the tolerance of
//! `tests/min_entropy.rs`).
//!
//! The conventions follow the standard and the tool: Z = 2.5758293035489008
//! (the 99.5 % quantile) for every upper confidence bound; the bit-string
//! estimators are capped at 1 bit per bit and the byte estimators at 8
//! bits per byte (a value the tool prints above 8 counts as 8, as in its
//! `H_original`); an estimator that does not apply reports 8.0, the
//! largest value, as the tool leaves it out of the minimum. That happens
//! to the t-tuple estimator when no byte string occurs 35 times (windows
//! of under about 9,000 uniform bytes), to LRS when its range of lengths
//! is empty, and to the compression estimator in windows of 750 bytes or
//! fewer.
//!
//! The estimators are lower bounds with a confidence margin, and they are
//! noisy: even perfect input reads well under 8, and lower in small
//! windows. The tool's values on `/dev/urandom` (`tests/vectors/sp800-90b/`):
//!
//! | window | most common value | collision | Markov | compression | t-tuple | LRS |
//! |---|---|---|---|---|---|---|
//! | 4,096 B | 6.58 | 6.39 | 7.91 | 5.50 | (8) | 7.27 |
//! | 32,768 B | 7.37 | 7.53 | 7.96 | 6.90 | 7.37 | 7.70 |
//! | 125,000 B | 7.69 | 7.15 | 7.99 | 6.74 | 7.69 | 7.81 |
//!
//! # Window, memory and cost
//!
//! [`Estimator<N>`] keeps the last `N` bytes in a ring buffer and one
//! `u32` per byte of scratch for sorting the window's suffixes:
//! `size_of::<Estimator<N>>()` is `5·N + 8` bytes on a 32-bit target
//! such as `thumbv7m-none-eabi` (`5·N + 16` on 64-bit), and nothing else
//! but about 1.5 KB of stack during [`Estimator::estimate`]:
//!
//! | N (bytes) | bits | `size_of` on thumbv7m | use |
//! |---|---|---|---|
//! | 2,048 | 16,384 | 10,248 B | tight microcontrollers |
//! | 4,096 ([`EMBEDDED_WINDOW`]) | 32,768 | 20,488 B | embedded |
//! | 32,768 | 262,144 | 163,848 B | |
//! | 125,000 ([`HOST_WINDOW`]) | 1,000,000 | 625,008 B | the host: the last 10⁶ bits |
//!
//! [`Estimator::push`] copies bytes into the ring: a `memcpy`, O(1) per
//! byte (about 0.2 ns per byte on an x86-64 host, `benches/min_entropy.rs`).
//! [`Estimator::estimate`] does the work on demand:
//!
//! - O(N) for the most-common-value, collision and Markov estimators;
//! - O(N) for the compression estimator's scan, plus a root-finding of
//!   10–25 evaluations of a sum that is cut off after a few thousand
//!   terms (up to N·8/6 for nearly constant blocks);
//! - O(N log N) comparisons of at most [`MAX_TUPLE`] bytes to sort the
//!   suffixes for the t-tuple and LRS estimators, then O(N) for the
//!   counts.
//!
//! On an x86-64 host an estimate takes about 13–16 ms for the host
//! window (random or constant input) and about 1 ms for 4,096 bytes: once
//! a second is cheap. A Cortex-M3 has no floating-point unit, so there
//! the compression estimator's software `f64` dominates.
//!
//! **Less scratch.** The `Estimator` keeps a slot per byte so that any
//! input fits. [`estimate_window`](crate::health::min_entropy::estimate_window)
//! and [`tuple_estimates`](crate::health::min_entropy::tuple_estimates) take less: as
//! many slots as the window's commonest byte value occurs (a healthy
//! source's bytes spread over all 256 values, so about `N/256`; a stuck
//! one's do not). The suffixes are then sorted in turns, a range of first
//! bytes at a time (no group of equal tuples spans two first bytes), at
//! the price of one pass over the window per turn; the result is the
//! same. The daemon gives an eighth of the window: 62.5 KB of scratch for
//! 125,000 bytes, in about 9 turns, for about 16 ms per estimate instead
//! of 12 (`benches/min_entropy.rs`).
//!
//! # The t-tuple and LRS estimators: bounded tuple length
//!
//! Both need, for every length `t`, the counts of the window's distinct
//! `t`-byte strings. The tool builds a full suffix array and LCP array
//! (about 9·N bytes more, and unbounded lengths). Here the suffixes are
//! sorted on their first [`MAX_TUPLE`] `= 64` bytes only, and common
//! prefixes are measured up to 64 bytes. The result is **exact** (equal
//! to the full estimator's) whenever no string of 64 bytes occurs twice
//! in the window; for uniform bytes a repeat of 64 bytes anywhere in
//! 125,000 has chance about 2⁻⁴⁸⁷. When one does occur,
//! [`Estimates::tuple_capped`] is set and lengths over 64 are not
//! examined. Both estimators take a maximum of probabilities over
//! lengths, so the values are then upper bounds of the full estimators'
//! (for LRS, when even length 64 is below its range, the value at length
//! 64 stands in); a constant window still reads 0 on both. Such a window
//! is far from random in any case (the other estimators read low too).
//!
//! # Math without `std`
//!
//! `core` has no `log2`, `sqrt` or `powf` for `f64`, and the crate has no
//! `libm`; the module has its own (argument reduction on the exponent
//! bits, then a short series or Newton steps), accurate to a few units in
//! the last place over the ranges used and checked against `std` in its
//! unit tests.
//!
//! [`Estimates`]: crate::health::min_entropy::Estimates
//! [`Estimates::min`]: crate::health::min_entropy::Estimates::min
//! [`Estimates::tuple_capped`]: crate::health::min_entropy::Estimates::tuple_capped
//! [`Estimator<N>`]: crate::health::min_entropy::Estimator
//! [`Estimator::estimate`]: crate::health::min_entropy::Estimator::estimate
//! [`Estimator::push`]: crate::health::min_entropy::Estimator::push
//! [`EMBEDDED_WINDOW`]: crate::health::min_entropy::EMBEDDED_WINDOW
//! [`HOST_WINDOW`]: crate::health::min_entropy::HOST_WINDOW
//! [`MAX_TUPLE`]: crate::health::min_entropy::MAX_TUPLE

use zeroize::Zeroize;

/// The window for the host: 125,000 bytes, the last 1,000,000 bits.
pub const HOST_WINDOW: usize = 125_000;

/// The window recommended for a microcontroller: 4,096 bytes (about 20 KB
/// of state).
pub const EMBEDDED_WINDOW: usize = 4096;

/// An estimator over the host's window ([`HOST_WINDOW`]). It is about
/// 625 KB: put it in a `Box` or a `static`.
pub type HostEstimator = Estimator<HOST_WINDOW>;

/// An estimator over the embedded window ([`EMBEDDED_WINDOW`]).
pub type EmbeddedEstimator = Estimator<EMBEDDED_WINDOW>;

/// The longest byte string the t-tuple and LRS estimators tell apart (see
/// the module documentation).
pub const MAX_TUPLE: usize = 64;

/// Z for the 99.5 % upper confidence bounds of SP 800-90B.
const Z_ALPHA: f64 = 2.575_829_303_548_901;

/// Occurrences a t-tuple needs for the t-tuple estimator (§6.3.5).
const TUPLE_CUTOFF: u32 = 35;

/// Compression estimator (§6.3.4): bits per block and dictionary blocks.
const COMPRESSION_BLOCK_BITS: u32 = 6;
const COMPRESSION_DICT_BLOCKS: usize = 1000;

/// The six estimates of one window, in bits of min-entropy per byte.
#[derive(Clone, Copy, Debug, PartialEq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Estimates {
    /// Most common value (§6.3.1), on the bytes.
    pub most_common_value: f64,
    /// Collision estimate (§6.3.2), on the bit string, × 8.
    pub collision: f64,
    /// Markov estimate (§6.3.3), on the bit string, × 8.
    pub markov: f64,
    /// Compression estimate (§6.3.4), on the bit string, × 8.
    pub compression: f64,
    /// t-tuple estimate (§6.3.5), on the bytes.
    pub t_tuple: f64,
    /// Longest repeated substring estimate (§6.3.6), on the bytes.
    pub lrs: f64,
    /// A byte string of [`MAX_TUPLE`] bytes occurs more than once in the
    /// window, so `t_tuple` and `lrs` only cover lengths up to
    /// [`MAX_TUPLE`] and may be above the full estimators' values.
    pub tuple_capped: bool,
}

impl Estimates {
    /// The estimators' stable `snake_case` names, in the order of
    /// [`Estimates::iter`] (for metric labels).
    pub const NAMES: [&'static str; 6] = [
        "most_common_value",
        "collision",
        "markov",
        "compression",
        "t_tuple",
        "lrs",
    ];

    /// The six values in the order of [`Estimates::NAMES`].
    pub const fn values(&self) -> [f64; 6] {
        [
            self.most_common_value,
            self.collision,
            self.markov,
            self.compression,
            self.t_tuple,
            self.lrs,
        ]
    }

    /// `(name, bits per byte)` for each estimator, in a stable order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, f64)> + use<> {
        Self::NAMES.into_iter().zip(self.values())
    }

    /// The smallest of the six estimates, in bits per byte.
    pub fn min(&self) -> f64 {
        self.values().into_iter().fold(8.0, f64::min)
    }
}

/// Min-entropy estimates over a sliding window of the last `N` bytes.
///
/// [`push`](Self::push) is cheap and [`estimate`](Self::estimate) does
/// the work; see the [module documentation](self) for the estimators,
/// memory and costs, and for an example. The window holds output bytes:
/// it is wiped on drop and by [`clear`](Self::clear).
pub struct Estimator<const N: usize> {
    /// Ring buffer; the oldest byte is at `head` once full.
    buf: [u8; N],
    /// Scratch for the suffix sort (positions in the window).
    order: [u32; N],
    /// Where the next byte goes.
    head: usize,
    /// Bytes held (at most `N`).
    len: usize,
}

impl<const N: usize> Default for Estimator<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> core::fmt::Debug for Estimator<N> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Estimator")
            .field("window", &N)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl<const N: usize> Drop for Estimator<N> {
    fn drop(&mut self) {
        self.clear();
    }
}

impl<const N: usize> Estimator<N> {
    /// An empty estimator (`const`, so it can be a `static`).
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            order: [0; N],
            head: 0,
            len: 0,
        }
    }

    /// The window size in bytes.
    pub const fn window(&self) -> usize {
        N
    }

    /// Bytes held, up to `N`.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// No bytes held.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The window is full, so [`estimate`](Self::estimate) gives a value.
    pub const fn is_full(&self) -> bool {
        self.len >= N
    }

    /// Forgets (and wipes) every byte held.
    pub fn clear(&mut self) {
        self.buf.zeroize();
        self.order.zeroize();
        self.head = 0;
        self.len = 0;
    }

    /// Adds bytes to the window, dropping the oldest once it is full.
    /// Costs a copy of `bytes` (only the last `N` of them, if more).
    pub fn push(&mut self, bytes: &[u8]) {
        let skip = bytes.len().saturating_sub(N);
        let mut rest = bytes.get(skip..).unwrap_or(&[]);
        while !rest.is_empty() {
            let Some(dst) = self.buf.get_mut(self.head..) else {
                self.head = 0;
                continue;
            };
            let n = dst.len().min(rest.len());
            if n == 0 {
                break;
            }
            if let (Some(d), Some(s)) = (dst.get_mut(..n), rest.get(..n)) {
                d.copy_from_slice(s);
            }
            rest = rest.get(n..).unwrap_or(&[]);
            self.head = self.head.saturating_add(n);
            if self.head >= N {
                self.head = 0;
            }
            self.len = self.len.saturating_add(n).min(N);
        }
    }

    /// The estimates over the window, or `None` until it is full (or if
    /// `N < 2`, or `N` does not fit in a `u32`).
    ///
    /// O(N log N); see the module documentation. It reorders the ring
    /// buffer in place (oldest byte first), which `push` does not mind.
    pub fn estimate(&mut self) -> Option<Estimates> {
        if !self.is_full() || N < 2 || u32::try_from(N).is_err() {
            return None;
        }
        if self.head != 0 && self.head < N {
            self.buf.rotate_left(self.head);
            self.head = 0;
        }
        estimate_window(&self.buf, &mut self.order)
    }
}

/// All six estimates over `window` (oldest byte first), with `order` as
/// scratch for the suffix sort: `window.len()` slots always do, and as few
/// as the commonest byte value occurs (see [`tuple_estimates`]; fewer slots,
/// more passes over the window, same result). `None` if `order` is shorter
/// than that, or `window` has fewer than 2 bytes, or more than `u32::MAX`.
pub fn estimate_window(window: &[u8], order: &mut [u32]) -> Option<Estimates> {
    let tuples = tuple_estimates(window, order)?;
    Some(Estimates {
        most_common_value: most_common_value(window),
        collision: collision(window),
        markov: markov(window),
        compression: compression(window),
        t_tuple: tuples.t_tuple,
        lrs: tuples.lrs,
        tuple_capped: tuples.capped,
    })
}

/// `-log2` of an upper confidence bound `p̂ + Z·√(p̂(1−p̂)/(n−1))` on a
/// probability, clamped to `[0, max]`.
fn bound_entropy(p_hat: f64, n: usize, max: f64) -> f64 {
    let n1 = (n as f64 - 1.0).max(1.0);
    let pu = (p_hat + Z_ALPHA * math::sqrt(p_hat * (1.0 - p_hat) / n1)).min(1.0);
    clamp(-math::log2(pu), max)
}

fn clamp(h: f64, max: f64) -> f64 {
    if h.is_nan() {
        return 0.0;
    }
    h.clamp(0.0, max) + 0.0 // + 0.0 turns −0 into 0
}

/// Most common value estimate (§6.3.1) over bytes, in bits per byte.
/// 8.0 for fewer than 2 bytes.
pub fn most_common_value(bytes: &[u8]) -> f64 {
    if bytes.len() < 2 {
        return 8.0;
    }
    let mut counts = [0u32; 256];
    for &b in bytes {
        if let Some(c) = counts.get_mut(usize::from(b)) {
            *c = c.saturating_add(1);
        }
    }
    let mode = counts.iter().copied().max().unwrap_or(0);
    bound_entropy(f64::from(mode) / bytes.len() as f64, bytes.len(), 8.0)
}

/// Collision estimate (§6.3.2) over the bit string of `bytes` (most
/// significant bit first), in bits per byte (8 × bits per bit).
///
/// The bit string is cut into collisions: two equal bits (t = 2) or, if
/// they differ, three bits (t = 3); an unfinished one at the end is
/// dropped. For a binary source with P(1) = p the mean of t is
/// `2 + 2p(1−p)`, so the lower bound X̄' = X̄ − Z·σ̂/√v (at least 2) gives
/// `p = ½ + √(5/4 − X̄'/2)`; for X̄' ≥ 2.5 there is no solution and the
/// estimate is 1 bit per bit.
pub fn collision(bytes: &[u8]) -> f64 {
    // state: 0 = no bit, 1 = one bit (in `first`), 2 = two unequal bits
    let (mut state, mut first) = (0u8, 0u8);
    let (mut v, mut sum, mut sum_sq) = (0u64, 0u64, 0u64);
    for &byte in bytes {
        for k in (0..8).rev() {
            let bit = (byte >> k) & 1;
            match state {
                0 => {
                    first = bit;
                    state = 1;
                }
                1 if bit == first => {
                    v += 1;
                    sum += 2;
                    sum_sq += 4;
                    state = 0;
                }
                1 => state = 2,
                _ => {
                    v += 1;
                    sum += 3;
                    sum_sq += 9;
                    state = 0;
                }
            }
        }
    }
    if v < 2 {
        return 8.0;
    }
    let vf = v as f64;
    let mean = sum as f64 / vf;
    // Sample variance from exact integers: (v·Σt² − (Σt)²) / (v(v−1)).
    let num = u128::from(v) * u128::from(sum_sq) - u128::from(sum) * u128::from(sum);
    let var = num as f64 / (vf * (vf - 1.0));
    let x = (mean - Z_ALPHA * math::sqrt(var) / math::sqrt(vf)).max(2.0);
    if x >= 2.5 {
        return 8.0;
    }
    let p = 0.5 + math::sqrt(1.25 - 0.5 * x);
    8.0 * clamp(-math::log2(p), 1.0)
}

/// Markov estimate (§6.3.3) over the bit string of `bytes` (most
/// significant bit first), in bits per byte (8 × bits per bit).
///
/// The first-order transition probabilities and the initial ones give the
/// most likely 128-bit sequence among the six the standard lists (all
/// zeros, all ones, alternating, and one change); its min-entropy / 128.
pub fn markov(bytes: &[u8]) -> f64 {
    let bits = (bytes.len() as u64).saturating_mul(8);
    if bits < 2 {
        return 8.0;
    }
    // zeros over all bits; transitions 0→0 and 1→0 over adjacent pairs
    let (mut zeros, mut c00, mut c10) = (0u64, 0u64, 0u64);
    let mut prev: Option<u8> = None;
    for &b in bytes {
        zeros += u64::from(8 - b.count_ones());
        let (a, next) = (b, b << 1); // bit k of `next` = the bit after bit k of `a`
        c00 += u64::from((!a & !next & 0xFE).count_ones());
        c10 += u64::from((a & !next & 0xFE).count_ones());
        if let Some(p) = prev {
            let head = b >> 7;
            match (p & 1, head) {
                (0, 0) => c00 += 1,
                (1, 0) => c10 += 1,
                _ => {}
            }
        }
        prev = Some(b);
    }
    let last_zero = u64::from(prev.is_some_and(|b| b & 1 == 0));
    let c0 = zeros - last_zero; // zeros among the first bits-1 bits
    let c1 = bits - 1 - c0;
    let (p00, p01) = if c0 > 0 {
        let p = c00 as f64 / c0 as f64;
        (p, 1.0 - p)
    } else {
        (0.0, 0.0)
    };
    let (p10, p11) = if c1 > 0 {
        let p = c10 as f64 / c1 as f64;
        (p, 1.0 - p)
    } else {
        (0.0, 0.0)
    };
    let p0 = zeros as f64 / bits as f64;
    let p1 = 1.0 - p0;
    let l = math::log2;
    let mut h = 128.0f64;
    let mut consider = |ok: bool, value: f64| {
        if ok && value < h {
            h = value;
        }
    };
    consider(p00 > 0.0, -l(p0) - 127.0 * l(p00));
    consider(
        p01 > 0.0 && p10 > 0.0,
        -l(p0) - 64.0 * l(p01) - 63.0 * l(p10),
    );
    consider(p01 > 0.0 && p11 > 0.0, -l(p0) - l(p01) - 126.0 * l(p11));
    consider(p10 > 0.0 && p00 > 0.0, -l(p1) - l(p10) - 126.0 * l(p00));
    consider(
        p10 > 0.0 && p01 > 0.0,
        -l(p1) - 64.0 * l(p10) - 63.0 * l(p01),
    );
    consider(p11 > 0.0, -l(p1) - 127.0 * l(p11));
    8.0 * clamp(h / 128.0, 1.0)
}

/// Compression estimate (§6.3.4) over the bit string of `bytes` (most
/// significant bit first), in bits per byte (8 × bits per bit).
///
/// 6-bit blocks; the first 1,000 fill a dictionary of last occurrences,
/// and the rest give the mean and spread of log2 of the distance back to
/// the previous occurrence (Maurer's statistic). The lower bound of the
/// mean is matched to its expectation under the standard's
/// near-uniform model, solved for `p` by regula falsi. 8.0 if there are 1,000 blocks
/// or fewer (750 bytes).
pub fn compression(bytes: &[u8]) -> f64 {
    let blocks = (bytes.len() as u64).saturating_mul(8) / u64::from(COMPRESSION_BLOCK_BITS);
    let Ok(blocks) = usize::try_from(blocks) else {
        return 8.0;
    };
    if blocks <= COMPRESSION_DICT_BLOCKS {
        return 8.0;
    }
    let nu = blocks - COMPRESSION_DICT_BLOCKS;
    let mut dict = [0usize; 64]; // 1-based index of the last occurrence, 0 = never
    let (mut sum, mut sum_sq) = (Kahan::default(), Kahan::default());
    let (mut acc, mut have) = (0u32, 0u32);
    let mut index = 0usize; // blocks read so far
    'bytes: for &b in bytes {
        acc = ((acc << 8) | u32::from(b)) & 0x3FFF;
        have += 8;
        while have >= COMPRESSION_BLOCK_BITS {
            if index >= blocks {
                break 'bytes;
            }
            have -= COMPRESSION_BLOCK_BITS;
            let block = ((acc >> have) & 0x3F) as usize;
            index += 1;
            if let Some(last) = dict.get_mut(block) {
                if index > COMPRESSION_DICT_BLOCKS {
                    let d = math::log2_int(index - *last);
                    sum.add(d);
                    sum_sq.add(d * d);
                }
                *last = index;
            }
        }
    }
    let nuf = nu as f64;
    let mean = sum.sum / nuf;
    let var = if nu > 1 {
        (sum_sq.sum / (nuf - 1.0) - mean * mean).max(0.0)
    } else {
        0.0
    };
    let sigma = 0.5907 * math::sqrt(var);
    let target = mean - Z_ALPHA * sigma / math::sqrt(nuf);

    let floor = 1.0 / 64.0;
    if compression_expectation(floor, blocks) <= target {
        return 8.0;
    }
    let p = solve_decreasing(|p| compression_expectation(p, blocks) - target, floor, 1.0);
    if p <= floor {
        return 8.0;
    }
    8.0 * clamp(-math::log2(p) / f64::from(COMPRESSION_BLOCK_BITS), 1.0)
}

/// The root of a decreasing `f` with `f(lo) > 0 ≥ f(hi)`, by regula
/// falsi with the Illinois modification (a bisection step whenever the
/// secant leaves the bracket): about 10 evaluations to full precision
/// for the smooth function here, at most 100.
fn solve_decreasing(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> f64 {
    let (mut f_lo, mut f_hi) = (f(lo), f(hi));
    let mut side = 0i8;
    for _ in 0..100 {
        if hi - lo <= 1e-15 * hi || lo.is_nan() || hi.is_nan() {
            break;
        }
        let mut x = hi - f_hi * (hi - lo) / (f_hi - f_lo);
        if !(x > lo && x < hi) {
            x = 0.5 * (lo + hi);
        }
        let fx = f(x);
        if fx.is_nan() {
            break;
        }
        if fx > 0.0 {
            lo = x;
            f_lo = fx;
            if side == -1 {
                f_hi *= 0.5;
            }
            side = -1;
        } else {
            hi = x;
            f_hi = fx;
            if fx == 0.0 {
                return x;
            }
            if side == 1 {
                f_lo *= 0.5;
            }
            side = 1;
        }
    }
    0.5 * (lo + hi)
}

/// The expected Maurer statistic when one 6-bit block has probability `p`
/// and the other 63 share `1 − p`: `G(p) + 63·G((1−p)/63)`, with
/// `G(z) = 1/ν · Σ_{t=d+1}^{n} Σ_{u=1}^{t} log2(u)·F(z,t,u)`,
/// `F = z²(1−z)^{u−1}` for `u < t` and `z(1−z)^{t−1}` for `u = t`
/// (SP 800-90B §6.3.4 step 7). Swapping the sums:
/// `G(z) = 1/ν·[z²·Σ_{u=2}^{n−1} log2(u)(1−z)^{u−1}(n − max(u, d)) +
/// z·Σ_{u=d+1}^{n} log2(u)(1−z)^{u−1}]`, summed for both arguments in one
/// pass and cut off once both powers are below 10⁻¹⁸ (the tail is then
/// under about 10⁻¹⁷ of the sum).
fn compression_expectation(p: f64, blocks: usize) -> f64 {
    let d = COMPRESSION_DICT_BLOCKS;
    let nu = (blocks - d) as f64;
    let q = (1.0 - p) / 63.0;
    let (rp, rq) = (1.0 - p, 1.0 - q);
    // (1−z)^{u−1} at u = 2; G(0) = 0 (for p = 1), so no terms for it
    let (mut pw_p, mut pw_q) = (rp, if q > 0.0 { rq } else { 0.0 });
    let (mut first_p, mut first_q) = (Kahan::default(), Kahan::default());
    let (mut second_p, mut second_q) = (Kahan::default(), Kahan::default());
    let n = blocks as f64;
    for u in 2..=blocks {
        if pw_p < 1e-18 && pw_q < 1e-18 {
            break;
        }
        let lg = math::log2_int(u);
        if u < blocks {
            let weight = n - (u.max(d) as f64);
            first_p.add(lg * pw_p * weight);
            first_q.add(lg * pw_q * weight);
        }
        if u > d {
            second_p.add(lg * pw_p);
            second_q.add(lg * pw_q);
        }
        pw_p *= rp;
        pw_q *= rq;
    }
    let g_p = (p * p * first_p.sum + p * second_p.sum) / nu;
    let g_q = (q * q * first_q.sum + q * second_q.sum) / nu;
    g_p + 63.0 * g_q
}

/// Compensated (Kahan) summation.
#[derive(Default, Clone, Copy)]
struct Kahan {
    sum: f64,
    comp: f64,
}

impl Kahan {
    fn add(&mut self, x: f64) {
        let y = x - self.comp;
        let t = self.sum + y;
        self.comp = (t - self.sum) - y;
        self.sum = t;
    }
}

/// The t-tuple and LRS estimates of one window (see [`tuple_estimates`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TupleEstimates {
    /// t-tuple estimate (§6.3.5), bits per byte; 8.0 if no byte string
    /// occurs 35 times.
    pub t_tuple: f64,
    /// LRS estimate (§6.3.6), bits per byte; 8.0 if it does not apply.
    pub lrs: f64,
    /// A string of [`MAX_TUPLE`] bytes repeats: lengths beyond it were
    /// not examined.
    pub capped: bool,
}

/// The t-tuple (§6.3.5) and LRS (§6.3.6) estimates over `bytes`, with
/// `order` as scratch: at least as many slots as the commonest byte value
/// of `bytes` occurs (`bytes.len()` slots always do). `None` if `order` is
/// shorter than that, or `bytes` has fewer than 2 or more than `u32::MAX`
/// bytes.
///
/// Sorts the suffixes on their first [`MAX_TUPLE`] bytes, then one pass
/// over neighbouring suffixes finds, for each length `t` ≤ [`MAX_TUPLE`],
/// the runs of suffixes sharing `t` bytes (the groups of equal
/// `t`-tuples): `Q[t]`, the largest group, and `S[t] = Σ C(group, 2)`.
/// Then `u` is the first `t` with `Q[t] < 35`, `v` the longest repeat;
/// t-tuple: `p̂ = max_{t<u} (Q[t]/(n−t+1))^{1/t}`; LRS:
/// `p̂ = max_{u≤W≤v} (S[W]/C(n−W+1, 2))^{1/W}`; each with the upper
/// bound `p̂ + Z·√(p̂(1−p̂)/(n−1))`.
///
/// No group spans two first bytes, so the suffixes are sorted in turns,
/// each turn taking the first-byte values whose suffixes fit `order`: with
/// `bytes.len()` slots, one turn; with fewer, the same result in more
/// turns (each a pass over `bytes`). On random bytes about `n/256` slots
/// do; a stuck source needs them all.
///
/// ```
/// use ekey_proto::health::min_entropy::tuple_estimates;
///
/// let bytes: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
/// let mut all = vec![0u32; bytes.len()];
/// let mut few = vec![0u32; 512];
/// assert_eq!(tuple_estimates(&bytes, &mut few), tuple_estimates(&bytes, &mut all));
/// // Too few slots for the commonest byte: refused, not wrong.
/// assert_eq!(tuple_estimates(&[7; 100], &mut few[..99]), None);
/// ```
pub fn tuple_estimates(bytes: &[u8], order: &mut [u32]) -> Option<TupleEstimates> {
    let n = bytes.len();
    if n < 2 {
        return None;
    }
    let n32 = u32::try_from(n).ok()?;
    let mut counts = [0u32; 256];
    for &b in bytes {
        if let Some(c) = counts.get_mut(usize::from(b)) {
            *c = c.saturating_add(1);
        }
    }
    let largest = counts.iter().copied().max().unwrap_or(0) as usize;
    if order.len() < largest {
        return None;
    }
    let mut groups = Groups::new();
    let mut lo = 0usize;
    while lo < counts.len() {
        // The first-byte values lo..hi whose suffixes fit `order` (at least
        // one: none has more than `largest`).
        let (mut hi, mut fill) = (lo, 0usize);
        while let Some(&c) = counts.get(hi) {
            if fill + c as usize > order.len() {
                break;
            }
            fill += c as usize;
            hi += 1;
        }
        let slots = order.get_mut(..fill)?;
        let mut k = 0;
        for (i, &b) in (0..n32).zip(bytes) {
            if (lo..hi).contains(&usize::from(b)) {
                if let Some(slot) = slots.get_mut(k) {
                    *slot = i;
                }
                k += 1;
            }
        }
        sort_suffixes(bytes, slots);
        groups.scan(bytes, slots);
        lo = hi;
    }
    let Groups { q, s, longest } = groups;

    let v = longest;
    let mut u = 1;
    while u <= v && q.get(u).is_some_and(|&c| c >= TUPLE_CUTOFF) {
        u += 1;
    }
    let nf = n as f64;
    let mut t_tuple = 8.0;
    if u > 1 {
        let mut p_hat = 0.0f64;
        for t in 1..u {
            let count = f64::from(q.get(t).copied().unwrap_or(0));
            let p = count / (nf - t as f64 + 1.0);
            p_hat = p_hat.max(math::root(p, t as f64));
        }
        t_tuple = bound_entropy(p_hat, n, 8.0);
    }
    let capped = longest >= MAX_TUPLE;
    let mut lrs = 8.0;
    // Capped with every length up to the cap occurring 35 times: the full
    // range [u, v] lies beyond the cap; use the longest length examined.
    let first = if capped { u.min(v) } else { u };
    if v >= first {
        let mut p_hat = 0.0f64;
        for w in first..=v {
            let pairs = s.get(w).copied().unwrap_or(0) as f64;
            let m = nf - w as f64; // C(n−w+1, 2) = (n−w)(n−w+1)/2
            let choices = m * (m + 1.0) / 2.0;
            if choices > 0.0 {
                p_hat = p_hat.max(math::root(pairs / choices, w as f64));
            }
        }
        lrs = bound_entropy(p_hat, n, 8.0);
    }
    Some(TupleEstimates {
        t_tuple,
        lrs,
        capped,
    })
}

/// The first [`MAX_TUPLE`] bytes of the suffix at `i`.
fn prefix(bytes: &[u8], i: u32) -> &[u8] {
    let rest = bytes.get(i as usize..).unwrap_or(&[]);
    rest.get(..MAX_TUPLE).unwrap_or(rest)
}

/// Sorts the suffixes at `order` on their first [`MAX_TUPLE`] bytes.
fn sort_suffixes(bytes: &[u8], order: &mut [u32]) {
    // Compare the first 8 bytes as one big-endian word (zero-padded at the
    // end of the window), and the prefixes themselves only when the words
    // are equal: padding makes a short suffix compare as itself or equal.
    let word = |i: u32| -> u64 {
        let i = i as usize;
        if let Some(w) = bytes
            .get(i..i.saturating_add(8))
            .and_then(|s| s.try_into().ok())
        {
            return u64::from_be_bytes(w);
        }
        let rest = bytes.get(i..).unwrap_or(&[]);
        let mut w = [0u8; 8];
        let n = rest.len().min(8);
        if let (Some(d), Some(s)) = (w.get_mut(..n), rest.get(..n)) {
            d.copy_from_slice(s);
        }
        u64::from_be_bytes(w)
    };
    order.sort_unstable_by(|&a, &b| {
        word(a)
            .cmp(&word(b))
            .then_with(|| prefix(bytes, a).cmp(prefix(bytes, b)))
    });
}

/// Per length t (index t, 1..=MAX_TUPLE): the largest group of suffixes
/// sharing t bytes, and Σ C(group, 2); and the longest repeat.
struct Groups {
    q: [u32; MAX_TUPLE + 1],
    s: [u64; MAX_TUPLE + 1],
    longest: usize,
}

impl Groups {
    fn new() -> Self {
        Groups {
            q: [1; MAX_TUPLE + 1],
            s: [0; MAX_TUPLE + 1],
            longest: 0,
        }
    }

    /// Adds the groups among the sorted suffixes at `order`.
    fn scan(&mut self, bytes: &[u8], order: &[u32]) {
        // Where the open run of suffixes sharing t bytes began.
        let mut start = [0u32; MAX_TUPLE + 1];
        let (q, s) = (&mut self.q, &mut self.s);
        let mut close = |t: usize, end: u32, start: &[u32; MAX_TUPLE + 1]| {
            let size = end.saturating_sub(start.get(t).copied().unwrap_or(end));
            if let Some(qt) = q.get_mut(t) {
                *qt = (*qt).max(size);
            }
            if let Some(st) = s.get_mut(t) {
                let size = u64::from(size);
                *st = st.saturating_add(size * size.saturating_sub(1) / 2);
            }
        };
        let mut prev_lcp = 0usize;
        let mut prev_suffix: &[u8] = &[];
        let mut k = 0u32;
        for &pos in order {
            let suffix = prefix(bytes, pos);
            let lcp = if k == 0 {
                0
            } else {
                prev_suffix
                    .iter()
                    .zip(suffix)
                    .take_while(|(x, y)| x == y)
                    .count()
            };
            for t in lcp + 1..=prev_lcp {
                close(t, k, &start);
            }
            for t in prev_lcp + 1..=lcp {
                if let Some(st) = start.get_mut(t) {
                    *st = k - 1; // k ≥ 1 whenever lcp > 0
                }
            }
            self.longest = self.longest.max(lcp);
            prev_lcp = lcp;
            prev_suffix = suffix;
            k = k.saturating_add(1);
        }
        for t in 1..=prev_lcp {
            close(t, k, &start);
        }
    }
}

/// `log2`, `sqrt` and roots for `f64` without `std`.
mod math {
    const LOG2_E: f64 = core::f64::consts::LOG2_E;
    const LN_2: f64 = core::f64::consts::LN_2;

    /// `1/(2k+1)`: the series of `atanh(s)/s` in `s²`; 13 terms leave an
    /// error below `|s|²⁶/27 < 10⁻²¹` for `|s| ≤ 0.1716`.
    // Evaluated at compile time: an index out of range fails the build.
    #[allow(clippy::indexing_slicing)]
    const ATANH_COEFFS: [f64; 13] = {
        let mut c = [0.0; 13];
        let mut k = 0;
        while k < 13 {
            c[k] = 1.0 / (2 * k + 1) as f64;
            k += 1;
        }
        c
    };

    /// Square root; 0 for zero, negative or NaN input.
    pub(super) fn sqrt(x: f64) -> f64 {
        if x.is_nan() || x <= 0.0 {
            return 0.0;
        }
        if x.is_infinite() {
            return x;
        }
        // Halve the exponent for a first guess (within ~6 %), then Newton.
        let mut y = f64::from_bits((x.to_bits() >> 1) + 0x1FF8_0000_0000_0000);
        for _ in 0..8 {
            y = 0.5 * (y + x / y);
        }
        y
    }

    /// Base-2 logarithm; −∞ for 0, NaN for negative or NaN input.
    pub(super) const fn log2(x: f64) -> f64 {
        if x.is_nan() || x < 0.0 {
            return f64::NAN;
        }
        if x == 0.0 {
            return f64::NEG_INFINITY;
        }
        if x.is_infinite() {
            return x;
        }
        let mut bits = x.to_bits();
        let mut e = ((bits >> 52) & 0x7FF) as i64;
        if e == 0 {
            // subnormal: scale by 2^54 first
            bits = (x * 18_014_398_509_481_984.0).to_bits();
            e = ((bits >> 52) & 0x7FF) as i64 - 54;
        }
        e -= 1023;
        let mut m = f64::from_bits((bits & 0x000F_FFFF_FFFF_FFFF) | 0x3FF0_0000_0000_0000);
        if m > core::f64::consts::SQRT_2 {
            m *= 0.5;
            e += 1;
        }
        // ln m = 2·atanh(s), s = (m−1)/(m+1), |s| ≤ 0.1716
        let s = (m - 1.0) / (m + 1.0);
        let s2 = s * s;
        let [c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12] = ATANH_COEFFS;
        let mut series = c12;
        series = series * s2 + c11;
        series = series * s2 + c10;
        series = series * s2 + c9;
        series = series * s2 + c8;
        series = series * s2 + c7;
        series = series * s2 + c6;
        series = series * s2 + c5;
        series = series * s2 + c4;
        series = series * s2 + c3;
        series = series * s2 + c2;
        series = series * s2 + c1;
        series = series * s2 + c0;
        e as f64 + 2.0 * s * series * LOG2_E
    }

    /// `log2(i)` for `i < 256` (`log2(0)` is −∞). Evaluated at compile
    /// time: an index out of range fails the build.
    #[allow(clippy::indexing_slicing)]
    static LOG2_SMALL: [f64; 256] = {
        let mut t = [0.0; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = log2(i as f64);
            i += 1;
        }
        t
    };

    /// `log2(i)` for an integer, from a table below 256.
    pub(super) fn log2_int(i: usize) -> f64 {
        match LOG2_SMALL.get(i) {
            Some(&v) => v,
            None => log2(i as f64),
        }
    }

    /// 2^y.
    pub(super) fn exp2(y: f64) -> f64 {
        if y.is_nan() {
            return f64::NAN;
        }
        if y < -1075.0 {
            return 0.0;
        }
        if y > 1024.0 {
            return f64::INFINITY;
        }
        let n = y as i64; // toward zero: f in (−1, 1)
        let f = y - n as f64;
        let z = f * LN_2;
        let mut series = 1.0;
        for k in (1..=22).rev() {
            series = 1.0 + series * z / f64::from(k);
        }
        let half = n / 2;
        series * pow2(half) * pow2(n - half)
    }

    /// 2^n for −1022 ≤ n ≤ 1023 (clamped to that range).
    fn pow2(n: i64) -> f64 {
        let n = n.clamp(-1022, 1023);
        f64::from_bits(((n + 1023) as u64) << 52)
    }

    /// `x^(1/t)` for `x` in `[0, 1]` and `t ≥ 1`.
    pub(super) fn root(x: f64, t: f64) -> f64 {
        if x.is_nan() || x <= 0.0 {
            return 0.0;
        }
        if x >= 1.0 {
            return 1.0;
        }
        exp2(log2(x) / t).min(1.0)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;

    #[test]
    fn math_matches_std() {
        let mut x = 1e-300f64;
        while x < 1e300 {
            for v in [x, x * 1.37, x * 0.999_999, 1.0 - x.min(0.5)] {
                let want = v.log2();
                let got = math::log2(v);
                assert!(
                    (got - want).abs() <= 4e-16 * want.abs().max(1.0),
                    "log2({v})"
                );
                let (s, ws) = (math::sqrt(v), v.sqrt());
                assert!((s - ws).abs() <= 4.5e-16 * ws, "sqrt({v})");
            }
            x *= 3.7;
        }
        for i in -2000..=2000 {
            let y = f64::from(i) * 0.37;
            let (got, want) = (math::exp2(y), y.exp2());
            assert!((got - want).abs() <= 1e-15 * want, "exp2({y}) {got} {want}");
        }
        for (x, t) in [(0.5, 2.0), (1e-9, 7.0), (0.003_906_25, 1.0), (0.9, 64.0)] {
            let want = f64::powf(x, 1.0 / t);
            assert!((math::root(x, t) - want).abs() <= 1e-15, "root({x}, {t})");
        }
        assert!(math::log2(5e-324).is_finite()); // smallest subnormal
        assert_eq!(math::sqrt(-1.0), 0.0);
        assert_eq!(math::root(0.0, 3.0), 0.0);
    }

    #[test]
    fn constant_input_has_no_entropy() {
        let mut est = Estimator::<2048>::new();
        est.push(&[0x5A; 3000]);
        let e = est.estimate().unwrap();
        assert_eq!(e.most_common_value, 0.0);
        assert_eq!(e.t_tuple, 0.0);
        assert_eq!(e.lrs, 0.0);
        assert!(e.tuple_capped);
        assert_eq!(e.min(), 0.0);
        // 0x5A repeated is periodic in its bits too: the compression
        // estimator sees every 6-bit block recur 4 blocks later.
        assert!(e.compression < 1.0, "{e:?}");

        est.push(&[0; 2048]);
        let e = est.estimate().unwrap();
        for (name, value) in e.iter() {
            assert!(value < 1e-6, "{name}: {value}");
        }
    }

    #[test]
    fn ring_keeps_the_last_window() {
        let data: std::vec::Vec<u8> = (0..5000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut a = Estimator::<1024>::new();
        for chunk in data.chunks(33) {
            a.push(chunk);
        }
        let mut b = Estimator::<1024>::new();
        b.push(&data);
        let mut order = [0u32; 1024];
        let want = estimate_window(&data[data.len() - 1024..], &mut order);
        assert_eq!(a.estimate(), want);
        assert_eq!(b.estimate(), want);
        a.push(&data[..10]);
        assert!(a.is_full() && a.len() == 1024);
        a.clear();
        assert!(a.is_empty() && a.estimate().is_none());
    }

    #[test]
    fn names_are_stable() {
        let e = Estimates {
            most_common_value: 1.0,
            collision: 2.0,
            markov: 3.0,
            compression: 4.0,
            t_tuple: 5.0,
            lrs: 0.5,
            tuple_capped: false,
        };
        let got: std::vec::Vec<_> = e.iter().collect();
        assert_eq!(got[0], ("most_common_value", 1.0));
        assert_eq!(got[5], ("lrs", 0.5));
        assert_eq!(e.min(), 0.5);
    }
}
