//! Host-side health tests of verified output, and the [`Gate`] that holds
//! back what fails them.
//!
//! The key tests itself, but a host that credits the kernel should not
//! take that on faith. The daemon puts one [`Gate`] per key between the
//! verified, decrypted 32-byte blocks ([`Event::Entropy`]) and every
//! output, and feeds it the key's reports ([`Event::Info`]):
//!
//! ```
//! use ekey_proto::health::{Gate, GateConfig};
//! use ekey_proto::host::{DeviceInfo, Event};
//!
//! fn handle(gate: &mut Gate, event: Event, out: &mut Vec<[u8; 32]>) {
//!     match event {
//!         Event::Entropy { data, .. } => {
//!             if let Some(report) = gate.push(&data) {
//!                 // One FIPS block (2,500 bytes) was tested.
//!                 let _ = report.passed();
//!             }
//!         }
//!         Event::Info(info) => gate.observe(&info),
//!         _ => {}
//!     }
//!     while let Some(block) = gate.pop_released() {
//!         out.push(block); // only bytes that passed, while the gate is open
//!     }
//! }
//! # let mut gate = Gate::new(GateConfig::default());
//! # let mut out = Vec::new();
//! # handle(&mut gate, Event::Info(DeviceInfo::default()), &mut out);
//! # assert!(out.is_empty() && gate.status().open);
//! ```
//!
//! Everything here is `no_std`, allocation-free and never panics; the
//! gate's buffers (about 7.5 KB) are wiped as bytes leave them and on drop.
//!
//! # FIPS 140-2 tests
//!
//! [`fips_140_2`] runs the four statistical tests of FIPS 140-2 §4.9.1
//! with the bounds of its change notice of 2001-10-10 (as `rngd` does) on
//! a block of 20,000 bits (2,500 bytes, most significant bit first):
//! monobit (`9725 < ones < 10275`), poker (`2.16 < X < 46.17`, computed in
//! integers), runs (each of the twelve counts within [`RUNS_INTERVALS`])
//! and long run (no run of 26 or more).
//!
//! A perfect source fails them by chance. Per block:
//!
//! | test | chance of failing | how |
//! |---|---|---|
//! | monobit | 1.03 × 10⁻⁴ | exact binomial tail, `P(X ≤ 9725) + P(X ≥ 10275)`, X ~ B(20000, ½) |
//! | poker | 0.99 × 10⁻⁴ | χ² with 15 degrees of freedom: 4.9 × 10⁻⁵ below 2.16, 5.0 × 10⁻⁵ above 46.17 |
//! | runs | 2.99 × 10⁻⁴ | twelve dependent counts, no closed form: measured |
//! | long run | 2.98 × 10⁻⁴ | ~10,000 runs, each ≥ 26 long with chance 2⁻²⁵ |
//! | **any** | **7.99 × 10⁻⁴** (0.08 %, 1 block in 1,250) | measured |
//!
//! "Measured" is 2 × 10⁷ blocks of ChaCha20 output (the ignored test
//! `measure_false_positive_rates` in `tests/health.rs` re-derives all five
//! rows: monobit 1.06 × 10⁻⁴, poker 0.99 × 10⁻⁴, runs 2.99 × 10⁻⁴, long
//! run 3.01 × 10⁻⁴, any 7.99 × 10⁻⁴). The rest of this page uses
//! `p = 8 × 10⁻⁴`.
//!
//! # Continuous test
//!
//! Two consecutive 32-byte blocks must differ (as `rngd` checks
//! consecutive words). A good source repeats a block with chance 2⁻²⁵⁶;
//! a repeat means a stuck generator or a replaying path.
//!
//! # SP 800-90B: repetition count and adaptive proportion
//!
//! NIST SP 800-90B §4.4 on the byte stream, with cutoffs for an assumed
//! min-entropy of **H = 7 bits per byte** ([`MIN_ENTROPY_BITS_PER_BYTE`])
//! and a false-positive probability of **α = 2⁻⁴⁰** ([`ALPHA_LOG2`]):
//!
//! - H is the credit the daemon gives the kernel per byte by default
//!   (7 bits): the standard sets the cutoffs from the entropy claimed for
//!   the source, and that credit is the claim. (The key's output is
//!   whitened, so a healthy key is above it.) A daemon crediting another
//!   rate can set [`GateConfig::rct_cutoff`] and
//!   [`GateConfig::apt_cutoff`] from [`rct_cutoff`] and the table below:
//!   for α = 2⁻⁴⁰, H = 6 gives 8 and 35, H = 8 gives 6 and 19.
//! - α = 2⁻⁴⁰ makes a false alarm at the nominal H about one per 10¹²
//!   bytes, and for the uniform bytes a healthy key delivers far rarer
//!   still (below): at a few kB/s, never in the life of the hardware.
//! - Repetition Count Test: `C = 1 + ⌈40 / 7⌉ =` [`RCT_CUTOFF`] `= 7`
//!   equal bytes in a row. At H = 7 a run of 7 has chance ≤ 2⁻⁴²; for
//!   uniform bytes 2⁻⁴⁸ per byte, about 3 × 10⁻⁴ per key-year at 3 kB/s.
//! - Adaptive Proportion Test: windows of `W =` [`APT_WINDOW`] `= 512`
//!   bytes; `C = 1 + CRITBINOM(512, 2⁻⁷, 1 − 2⁻⁴⁰) =` [`APT_CUTOFF`]
//!   `= 26` occurrences of the window's first byte. The test suite
//!   recomputes it from the binomial tail, and checks the method against
//!   the standard's own table for α = 2⁻²⁰. As the first byte counts
//!   itself, an alarm takes 25 more among the other 511 bytes: chance
//!   P(B(511, 2⁻⁷) ≥ 25) = 9.9 × 10⁻¹³ per window at H = 7, a little over
//!   α (9.1 × 10⁻¹³), as with the standard's own formula. For uniform
//!   bytes it is about 2 × 10⁻¹⁹.
//!
//! Either alarm is close to proof of a broken source, so it discards the
//! block it falls in and closes the gate at once.
//!
//! # The gate policy
//!
//! The [`Gate`] collects pushed 32-byte blocks into 2,500-byte FIPS blocks
//! (a pushed block may straddle two; the continuous, RCT and APT results
//! belong to the FIPS block(s) holding the bytes concerned) and tests each
//! full one. A block that fails any test is discarded. A block that passes
//! is released only if the gate was open before and is still open after
//! its own verdict; released bytes come back out of
//! [`Gate::pop_released`] as 32-byte blocks in their original order (2,500
//! is not a multiple of 32: a remainder waits for the next released
//! block). Counters always add up: `received = released + discarded +
//! pending + buffered` ([`GateCounters`]).
//!
//! **Closing on the failure rate.** With [`GateConfig::failure_window`]
//! `W = 1024` and [`GateConfig::max_failures`] `k = 10`: the gate closes
//! when 10 of the last 1,024 tested blocks failed. A good source fails
//! `W·p ≈ 0.82` blocks per window on average. The rule trips at a given
//! block only if that block fails and at least 9 of the 1,023 before it
//! did: `p · P(B(1023, p) ≥ 9) ≈ 1.7 × 10⁻¹⁰` per tested block, so about
//! 2 × 10⁻⁶ in 10,000 blocks and 0.006 per key-year at ~1.2 blocks a
//! second (one spurious close per ~160 key-years; each costs about a
//! minute of output). A source failing 1 % of its blocks closes within a
//! window or two; one failing every block closes on its 10th.
//!
//! **Closing at once**: a Repetition Count or Adaptive Proportion alarm,
//! or a repeated 32-byte block (chance per block: RCT at most about
//! 6 × 10⁻¹⁰ at H = 7 and 10⁻¹¹ for uniform bytes; continuous test
//! 2⁻²⁵⁶); and any device condition below.
//!
//! **While closed** nothing is released, even blocks that pass, and
//! released bytes not yet popped when it closes are discarded. Once no
//! device condition holds, [`GateConfig::reopen_after`] `= 64` consecutive
//! clean blocks (about a minute; discarded too) re-open it; any failure
//! restarts the count. A good source gets through on its first try with
//! chance `(1 − p)⁶⁴ ≈ 95 %`; one failing half its blocks, 2⁻⁶⁴. Closing
//! and re-opening clear the failure window.
//!
//! **The key's reports** ([`Gate::observe`]):
//!
//! - a failure mode other than `0` in `I>S` closes the gate until an `S`
//!   report says `0` again (a real key needs a power cycle for that);
//! - the `I>F` failure counter is judged over windows of
//!   [`GateConfig::device_fips_window`] `= 1000` of the key's blocks
//!   from the first report seen: 11 ([`GateConfig::device_fips_max_failures`])
//!   or more new failures within one window close the gate at once (a key
//!   failing every block: on its 11th). Assuming the key's own tests fail
//!   by chance as often as ours (p ≈ 8 × 10⁻⁴), `P(B(1000, p) ≥ 11) ≈
//!   10⁻⁹` per window, 4 × 10⁻⁵ per key-year. A report that spans several
//!   windows (the host was away) must show 11 per window it spans. The
//!   condition holds until a later window of 1,000 blocks stays below 11;
//!   counters that go down (a key reset) restart the window;
//! - core temperature outside [`GateConfig::temperature_warn`] (0 °C to
//!   70 °C) raises a warning in [`GateStatus::warnings`]; outside
//!   [`GateConfig::temperature_close`] (−20 °C to 85 °C) it closes the
//!   gate until a reading is back inside. A real key reports about 315 K
//!   (42 °C) at room temperature; 85 °C is the top of the commercial
//!   range of the parts, and the noise of its generators depends on
//!   temperature;
//! - supply voltage outside [`GateConfig::voltage_warn`] (3.3 V ± 5 %,
//!   3.135–3.465 V) warns; outside [`GateConfig::voltage_close`] (± 10 %,
//!   2.970–3.630 V) closes. A real key reports about 3.25 V.
//!
//! **Caught within** (all asserted in `tests/health.rs`, driving a
//! software key with faults through the real protocol): a stuck byte, 1
//! FIPS block (RCT); repeated 32-byte blocks, 1 block (continuous test); a
//! stream failing every block (e.g. each bit 1 with probability 0.55:
//! about 11,000 ± 70 ones per block, far outside the monobit bounds), 10
//! blocks, every one of them discarded; a failure mode, a temperature or
//! voltage out of bounds, on the report (before another block is tested).
//! No byte of a block that failed is ever released.
//!
//! [`Event::Entropy`]: crate::host::Event::Entropy
//! [`Event::Info`]: crate::host::Event::Info

/// NIST SP 800-90B §6.3 min-entropy estimates over a sliding window.
pub mod min_entropy;

use core::fmt;

use zeroize::Zeroize;

use crate::crypto::BLOCK_LEN;
use crate::host::DeviceInfo;
use crate::wire::info::FailureMode;

// ---------------------------------------------------------------------------
// FIPS 140-2
// ---------------------------------------------------------------------------

/// Bytes in one FIPS 140-2 test block (20,000 bits).
pub const FIPS_BLOCK_BYTES: usize = 2500;

/// Bits in one FIPS 140-2 test block.
pub const FIPS_BLOCK_BITS: u32 = 20_000;

/// Monobit test: the block passes if `MONOBIT_LOW < ones < MONOBIT_HIGH`.
pub const MONOBIT_LOW: u32 = 9725;

/// Monobit test: upper (exclusive) bound on the number of ones.
pub const MONOBIT_HIGH: u32 = 10_275;

/// Poker test, smallest passing Σf² (inclusive). The standard's bound is
/// `X > 2.16` with `X = 16/5000·Σf² − 5000`, that is `16·Σf² > 25,010,800`;
/// Σf² is an integer, so `Σf² ≥ 1,563,176` (`X ≥ 2.16320`).
pub const POKER_MIN_SUM_SQUARES: u32 = 1_563_176;

/// Poker test, largest passing Σf² (inclusive): `X < 46.17` is
/// `16·Σf² < 25,230,850`, so `Σf² ≤ 1,576,928` (`X ≤ 46.1696`).
pub const POKER_MAX_SUM_SQUARES: u32 = 1_576_928;

/// Runs test: the inclusive interval each count of runs of length 1, 2, 3,
/// 4, 5 and 6-or-more must lie in, for runs of zeros and runs of ones alike.
pub const RUNS_INTERVALS: [(u32, u32); 6] = [
    (2315, 2685),
    (1114, 1386),
    (527, 723),
    (240, 384),
    (103, 209),
    (103, 209),
];

/// Long-run test: a run of this many equal bits or more fails the block.
pub const LONG_RUN: u32 = 26;

/// The statistics of one FIPS 140-2 block and which tests it passed.
///
/// Bits are taken most significant bit of each byte first (as `rngd`
/// does); only the runs and long-run statistics depend on that order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FipsResult {
    /// Monobit statistic: the number of one bits (of 20,000).
    pub ones: u32,
    /// Poker statistic, Σf² over the 16 four-bit values, each `f` counting
    /// its occurrences among the 5,000 nibbles. See
    /// [`poker_x`](Self::poker_x) for the standard's `X`.
    pub poker_sum_squares: u32,
    /// Runs of zeros of length 1, 2, 3, 4, 5 and 6 or more.
    pub runs_of_zeros: [u32; 6],
    /// Runs of ones of length 1, 2, 3, 4, 5 and 6 or more.
    pub runs_of_ones: [u32; 6],
    /// The longest run of either bit.
    pub longest_run: u32,
    /// Monobit test passed: `9725 < ones < 10275`.
    pub monobit_ok: bool,
    /// Poker test passed: `2.16 < X < 46.17`.
    pub poker_ok: bool,
    /// Runs test passed: all twelve counts within [`RUNS_INTERVALS`].
    pub runs_ok: bool,
    /// Long-run test passed: no run of [`LONG_RUN`] bits or more.
    pub long_run_ok: bool,
}

impl FipsResult {
    /// Whether all four tests passed.
    pub const fn passed(&self) -> bool {
        self.monobit_ok && self.poker_ok && self.runs_ok && self.long_run_ok
    }

    /// The poker statistic as the standard defines it,
    /// `X = 16/5000 · Σf² − 5000`.
    pub fn poker_x(&self) -> f64 {
        f64::from(self.poker_sum_squares) * (16.0 / 5000.0) - 5000.0
    }

    /// `5000 · X = 16 · Σf² − 25,000,000`, exactly.
    pub const fn poker_x_times_5000(&self) -> i64 {
        16 * self.poker_sum_squares as i64 - 25_000_000
    }
}

/// Index of a run in a 12-lane array: zeros in lanes 0–5, ones in 6–11.
const fn run_lane(bit: u8, len: u32) -> usize {
    let len = if len > 6 {
        6
    } else if len == 0 {
        1
    } else {
        len
    };
    (bit as usize) * 6 + (len as usize - 1)
}

/// For each byte value: the runs strictly inside it (neither the run it
/// starts with nor the one it ends with), as twelve 16-bit lanes in three
/// words (lane `l` in word `l / 4`, bits `16·(l % 4)..`). Inner runs are
/// at most 6 bits long, and a block of 2,500 bytes adds at most 3 to a lane
/// per byte, so the lanes never carry into each other.
static INNER_RUNS: [[u64; 3]; 256] = inner_runs_table();

// Evaluated at compile time: an index out of range would fail the build,
// not a run.
#[allow(clippy::indexing_slicing)]
const fn inner_runs_table() -> [[u64; 3]; 256] {
    let mut table = [[0u64; 3]; 256];
    let mut v = 0usize;
    while v < 256 {
        // Walk the bits MSB first, noting where each run ends.
        let mut runs = [(0u8, 0u32); 8];
        let mut n = 0usize;
        let mut bit = ((v >> 7) & 1) as u8;
        let mut len = 0u32;
        let mut i = 8;
        while i > 0 {
            i -= 1;
            let b = ((v >> i) & 1) as u8;
            if b == bit {
                len += 1;
            } else {
                runs[n] = (bit, len);
                n += 1;
                bit = b;
                len = 1;
            }
        }
        runs[n] = (bit, len);
        n += 1;
        // Skip the first and the last run.
        let mut r = 1;
        while r + 1 < n {
            let lane = run_lane(runs[r].0, runs[r].1);
            table[v][lane / 4] += 1u64 << (16 * (lane % 4));
            r += 1;
        }
        v += 1;
    }
    table
}

/// Counts one complete run.
#[inline(always)]
fn record_run(runs: &mut [u32; 12], longest: &mut u32, bit: u8, len: u32) {
    add_run(runs, longest, bit, len, 1);
}

/// Counts a run `weight` (0 or 1) times, without branching on it.
#[inline(always)]
fn add_run(runs: &mut [u32; 12], longest: &mut u32, bit: u8, len: u32, weight: u32) {
    let lane = usize::from(bit & 1) * 6 + (len.clamp(1, 6) - 1) as usize;
    if let Some(c) = runs.get_mut(lane) {
        *c = c.wrapping_add(weight);
    }
    *longest = (*longest).max(len * weight);
}

/// Runs the four FIPS 140-2 power-up tests (monobit, poker, runs, long
/// run; with the bounds of the change notice of 2001-10-10, as `rngd`) on
/// one 20,000-bit block.
///
/// One pass over the bytes: a byte histogram gives the monobit and poker
/// statistics, and runs are counted a byte at a time (the runs inside a
/// byte come from a table; only the runs crossing byte boundaries are
/// counted one by one).
///
/// ```
/// use ekey_proto::health::{fips_140_2, FIPS_BLOCK_BYTES};
///
/// let zeros = fips_140_2(&[0u8; FIPS_BLOCK_BYTES]);
/// assert_eq!(zeros.ones, 0);
/// assert_eq!(zeros.longest_run, 20_000);
/// assert!(!zeros.monobit_ok && !zeros.poker_ok && !zeros.runs_ok && !zeros.long_run_ok);
///
/// // 0x55 = 01010101: balanced, but every nibble is 0101 and every run is 1.
/// let alt = fips_140_2(&[0x55u8; FIPS_BLOCK_BYTES]);
/// assert!(alt.monobit_ok && alt.long_run_ok);
/// assert!(!alt.poker_ok && !alt.runs_ok);
/// assert_eq!(alt.runs_of_ones[0], 10_000);
/// ```
pub fn fips_140_2(block: &[u8; FIPS_BLOCK_BYTES]) -> FipsResult {
    let mut histogram = [0u16; 256];
    let mut inner = [0u64; 3];
    let mut runs = [0u32; 12];
    let mut longest = 0u32;
    // The run in progress at the end of the previous byte (none at first).
    let mut cur_bit = 0u8;
    let mut cur_len = 0u32;

    for &v in block {
        if let Some(h) = histogram.get_mut(usize::from(v)) {
            *h = h.wrapping_add(1);
        }
        if v == 0 || v == 0xff {
            // The byte is one run: it extends or replaces the current one.
            let bit = v & 1;
            if bit != cur_bit {
                if cur_len > 0 {
                    record_run(&mut runs, &mut longest, cur_bit, cur_len);
                }
                cur_bit = bit;
                cur_len = 0;
            }
            cur_len = cur_len.wrapping_add(8);
            continue;
        }
        let first = v >> 7;
        let lead = if first == 1 {
            v.leading_ones()
        } else {
            v.leading_zeros()
        };
        // Branch-free (the two cases are equally likely in random data):
        // if the byte starts with the current run's bit, that run ends
        // after `lead` more bits; otherwise it ended at the byte boundary
        // (if there was one) and the byte's first run is a run of its own.
        let same = u32::from(first == cur_bit);
        let ended = cur_len.wrapping_add(same * lead);
        add_run(
            &mut runs,
            &mut longest,
            cur_bit,
            ended,
            u32::from(ended > 0),
        );
        add_run(&mut runs, &mut longest, first, lead, 1 - same);
        if let Some(t) = INNER_RUNS.get(usize::from(v)) {
            for (acc, add) in inner.iter_mut().zip(t) {
                *acc = acc.wrapping_add(*add);
            }
        }
        cur_bit = v & 1;
        cur_len = if cur_bit == 1 {
            v.trailing_ones()
        } else {
            v.trailing_zeros()
        };
    }
    if cur_len > 0 {
        record_run(&mut runs, &mut longest, cur_bit, cur_len);
    }
    for (lane, count) in runs.iter_mut().enumerate() {
        let word = inner.get(lane / 4).copied().unwrap_or(0);
        let n = (word >> (16 * (lane % 4))) & 0xffff;
        *count = count.wrapping_add(n as u32);
        // Inner runs (at most 6 long) count towards the longest run too;
        // longer runs were all recorded one by one.
        let len = (lane % 6) as u32 + 1;
        if n > 0 && len > longest {
            longest = len;
        }
    }

    let mut ones = 0u32;
    let mut nibbles = [0u32; 16];
    for (v, &n) in histogram.iter().enumerate() {
        let n = u32::from(n);
        ones = ones.wrapping_add(n.wrapping_mul((v as u32).count_ones()));
        if let Some(f) = nibbles.get_mut(v >> 4) {
            *f = f.wrapping_add(n);
        }
        if let Some(f) = nibbles.get_mut(v & 15) {
            *f = f.wrapping_add(n);
        }
    }
    // At most 5000² = 25,000,000: no overflow.
    let poker_sum_squares = nibbles
        .iter()
        .fold(0u32, |acc, &f| acc.wrapping_add(f.wrapping_mul(f)));

    let runs_of_zeros = runs.first_chunk::<6>().copied().unwrap_or_default();
    let runs_of_ones = runs.last_chunk::<6>().copied().unwrap_or_default();
    let in_range = |counts: &[u32; 6]| {
        counts
            .iter()
            .zip(RUNS_INTERVALS.iter())
            .all(|(&c, &(lo, hi))| lo <= c && c <= hi)
    };

    FipsResult {
        ones,
        poker_sum_squares,
        runs_of_zeros,
        runs_of_ones,
        longest_run: longest,
        monobit_ok: MONOBIT_LOW < ones && ones < MONOBIT_HIGH,
        poker_ok: (POKER_MIN_SUM_SQUARES..=POKER_MAX_SUM_SQUARES).contains(&poker_sum_squares),
        runs_ok: in_range(&runs_of_zeros) && in_range(&runs_of_ones),
        long_run_ok: longest < LONG_RUN,
    }
}

// ---------------------------------------------------------------------------
// SP 800-90B §4.4 continuous health tests
// ---------------------------------------------------------------------------

/// The min-entropy per byte the SP 800-90B cutoffs assume, in bits: `H = 7`.
/// See the [module docs](self#sp-800-90b-repetition-count-and-adaptive-proportion).
pub const MIN_ENTROPY_BITS_PER_BYTE: u32 = 7;

/// The false-positive probability the SP 800-90B cutoffs are set for, as
/// `−log2(α)`: `α = 2^-40`.
pub const ALPHA_LOG2: u32 = 40;

/// `C = 1 + ⌈−log2(α) / H⌉`, the Repetition Count Test cutoff of SP 800-90B
/// §4.4.1, for a whole number of bits `H` (`H = 0` is taken as 1).
///
/// ```
/// use ekey_proto::health::{rct_cutoff, RCT_CUTOFF};
/// assert_eq!(rct_cutoff(7, 40), 7);
/// assert_eq!(rct_cutoff(6, 40), 8);
/// assert_eq!(rct_cutoff(8, 20), 4);
/// assert_eq!(RCT_CUTOFF, rct_cutoff(7, 40));
/// ```
pub const fn rct_cutoff(min_entropy_bits: u32, alpha_log2: u32) -> u32 {
    let h = if min_entropy_bits == 0 {
        1
    } else {
        min_entropy_bits
    };
    1 + alpha_log2.div_ceil(h)
}

/// Repetition Count Test cutoff: 7 equal bytes in a row fail
/// (`1 + ⌈40 / 7⌉`).
pub const RCT_CUTOFF: u32 = rct_cutoff(MIN_ENTROPY_BITS_PER_BYTE, ALPHA_LOG2);

/// Adaptive Proportion Test window, in bytes (SP 800-90B's `W` for
/// non-binary samples).
pub const APT_WINDOW: u32 = 512;

/// Adaptive Proportion Test cutoff for `W = 512`, `H = 7`, `α = 2^-40`:
/// `C = 1 + CRITBINOM(512, 2^-7, 1 − 2^-40) = 26`. A window fails if its
/// first byte occurs 26 times or more in it (4 are expected at `H = 7`, 2
/// for uniform bytes).
pub const APT_CUTOFF: u32 = 26;

/// The Repetition Count Test of SP 800-90B §4.4.1 on a byte stream: an
/// alarm when the same byte value occurs `cutoff` times in a row.
///
/// ```
/// use ekey_proto::health::RepetitionCount;
/// let mut rct = RepetitionCount::new(3);
/// assert!(!rct.feed(7) && !rct.feed(7));
/// assert!(rct.feed(7)); // third in a row
/// assert!(!rct.feed(7)); // counting restarts after an alarm
/// ```
#[derive(Clone, Debug, Zeroize)]
pub struct RepetitionCount {
    cutoff: u32,
    last: u8,
    count: u32,
}

impl RepetitionCount {
    /// A test that raises an alarm at `cutoff` equal bytes in a row
    /// (cutoffs below 2 are taken as 2).
    pub const fn new(cutoff: u32) -> Self {
        RepetitionCount {
            cutoff: if cutoff < 2 { 2 } else { cutoff },
            last: 0,
            count: 0,
        }
    }

    /// Feeds one byte; `true` is an alarm. After an alarm the count starts
    /// again from this byte, so a stuck source alarms every `cutoff − 1`
    /// bytes.
    pub fn feed(&mut self, byte: u8) -> bool {
        if self.count > 0 && byte == self.last {
            self.count = self.count.saturating_add(1);
            if self.count >= self.cutoff {
                self.count = 1;
                return true;
            }
        } else {
            self.last = byte;
            self.count = 1;
        }
        false
    }
}

/// The Adaptive Proportion Test of SP 800-90B §4.4.2 on a byte stream:
/// non-overlapping windows of `window` bytes; an alarm when a window's
/// first byte value occurs `cutoff` times in it (counting the first).
///
/// ```
/// use ekey_proto::health::AdaptiveProportion;
/// let mut apt = AdaptiveProportion::new(8, 4);
/// let alarms = [1u8, 2, 1, 3, 1, 1, 5, 6].iter().filter(|&&b| apt.feed(b)).count();
/// assert_eq!(alarms, 1); // the fourth 1 in the window
/// ```
#[derive(Clone, Debug, Zeroize)]
pub struct AdaptiveProportion {
    window: u32,
    cutoff: u32,
    sample: u8,
    seen: u32,
    count: u32,
}

impl AdaptiveProportion {
    /// A test with this window and cutoff (a window below 2 is taken as 2,
    /// a cutoff below 2 as 2).
    pub const fn new(window: u32, cutoff: u32) -> Self {
        AdaptiveProportion {
            window: if window < 2 { 2 } else { window },
            cutoff: if cutoff < 2 { 2 } else { cutoff },
            sample: 0,
            seen: 0,
            count: 0,
        }
    }

    /// Feeds one byte; `true` is an alarm (at most one per window).
    pub fn feed(&mut self, byte: u8) -> bool {
        if self.seen == 0 {
            self.sample = byte;
            self.count = 1;
            self.seen = 1;
            return false;
        }
        self.seen = self.seen.saturating_add(1);
        let mut alarm = false;
        if byte == self.sample {
            self.count = self.count.saturating_add(1);
            alarm = self.count == self.cutoff;
        }
        if self.seen >= self.window {
            self.seen = 0;
        }
        alarm
    }
}

// ---------------------------------------------------------------------------
// The gate
// ---------------------------------------------------------------------------

/// Largest [`GateConfig::failure_window`], in tested blocks.
pub const MAX_FAILURE_WINDOW: u16 = 1024;

/// Bytes of passed output the gate holds for [`Gate::pop_released`]: two
/// FIPS blocks. A block that passes when there is no room is discarded
/// (counted in [`GateCounters::bytes_overflowed`]); pop everything after
/// each [`Gate::push`] and that never happens.
pub const OUTPUT_CAPACITY: usize = 2 * FIPS_BLOCK_BYTES;

/// An inclusive range of readings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Limits {
    /// Lowest good reading.
    pub min: i64,
    /// Highest good reading.
    pub max: i64,
}

impl Limits {
    /// Whether `value` is within `min..=max`.
    pub const fn contains(&self, value: i64) -> bool {
        self.min <= value && value <= self.max
    }
}

/// Tunables of a [`Gate`]. `Default` gives the values derived in the
/// [module docs](self#the-gate-policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GateConfig {
    /// Sliding window of tested blocks for the failure-rate rule (1 to
    /// [`MAX_FAILURE_WINDOW`]). Default 1024.
    pub failure_window: u16,
    /// The gate closes when this many blocks of the last
    /// [`failure_window`](Self::failure_window) failed; 0 disables the
    /// rule. Default 10.
    pub max_failures: u16,
    /// Consecutive clean blocks (tested, passed, and discarded) that
    /// re-open a closed gate once no device condition holds; 0 counts as 1.
    /// Default 64.
    pub reopen_after: u32,
    /// Repetition Count Test cutoff. Default [`RCT_CUTOFF`] (7).
    pub rct_cutoff: u32,
    /// Adaptive Proportion Test window. Default [`APT_WINDOW`] (512).
    pub apt_window: u32,
    /// Adaptive Proportion Test cutoff. Default [`APT_CUTOFF`] (26).
    pub apt_cutoff: u32,
    /// The key's own FIPS counters are judged over windows of this many
    /// of its blocks. Default 1000.
    pub device_fips_window: u32,
    /// The gate closes when the key's FIPS failure counter rises by this
    /// much within one window; 0 disables the rule. Default 11.
    pub device_fips_max_failures: u32,
    /// Core temperature outside this range (millidegrees Celsius) is a
    /// warning. Default 0.000 to 70.000 °C.
    pub temperature_warn: Limits,
    /// Core temperature outside this range (millidegrees Celsius) closes
    /// the gate. Default −20.000 to 85.000 °C.
    pub temperature_close: Limits,
    /// Supply voltage outside this range (millivolts) is a warning.
    /// Default 3.135 to 3.465 V (3.3 V ± 5 %).
    pub voltage_warn: Limits,
    /// Supply voltage outside this range (millivolts) closes the gate.
    /// Default 2.970 to 3.630 V (3.3 V ± 10 %).
    pub voltage_close: Limits,
    /// The gate closes while the key's min-entropy estimate (given with
    /// [`Gate::observe_min_entropy`], in millibits per byte) is below this;
    /// 0 (the default) turns the rule off.
    pub min_entropy_floor_millibits: u32,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            failure_window: 1024,
            max_failures: 10,
            reopen_after: 64,
            rct_cutoff: RCT_CUTOFF,
            apt_window: APT_WINDOW,
            apt_cutoff: APT_CUTOFF,
            device_fips_window: 1000,
            device_fips_max_failures: 11,
            temperature_warn: Limits {
                min: 0,
                max: 70_000,
            },
            temperature_close: Limits {
                min: -20_000,
                max: 85_000,
            },
            voltage_warn: Limits {
                min: 3135,
                max: 3465,
            },
            voltage_close: Limits {
                min: 2970,
                max: 3630,
            },
            min_entropy_floor_millibits: 0,
        }
    }
}

/// Why a gate is closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CloseReason {
    /// Too many tested blocks failed within the window.
    FailureRate {
        /// Failed blocks in the window when it closed.
        failures: u16,
        /// The window, in tested blocks.
        window: u16,
    },
    /// Two consecutive 32-byte blocks were equal.
    Continuous,
    /// The SP 800-90B Repetition Count Test raised an alarm.
    RepetitionCount,
    /// The SP 800-90B Adaptive Proportion Test raised an alarm.
    AdaptiveProportion,
    /// The key reports a failure mode.
    DeviceFailure(FailureMode),
    /// The key's own FIPS failure counter rose too fast.
    DeviceFipsRate {
        /// Failures it counted...
        failures: u32,
        /// ...within this many of its blocks.
        blocks: u32,
    },
    /// Core temperature outside the close limits.
    Temperature {
        /// The reading, in millidegrees Celsius.
        millicelsius: i64,
    },
    /// Supply voltage outside the close limits.
    Voltage {
        /// The reading, in millivolts.
        millivolts: u32,
    },
    /// The min-entropy estimate is below
    /// [`GateConfig::min_entropy_floor_millibits`].
    MinEntropy {
        /// The estimate, in millibits per byte.
        millibits: u32,
        /// The floor, in millibits per byte.
        floor: u32,
    },
}

/// Writes `milli / 1000` with `decimals` (1 to 3) decimals.
fn write_milli(f: &mut fmt::Formatter<'_>, milli: i64, decimals: u32) -> fmt::Result {
    let sign = if milli < 0 { "-" } else { "" };
    let abs = milli.unsigned_abs();
    let scale = 10u64.pow(3u32.saturating_sub(decimals.clamp(1, 3)));
    let width = decimals.clamp(1, 3) as usize;
    write!(
        f,
        "{sign}{}.{:0width$}",
        abs / 1000,
        (abs % 1000) / scale,
        width = width
    )
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            CloseReason::FailureRate { failures, window } => write!(
                f,
                "{failures} of the last {window} blocks failed the health tests"
            ),
            CloseReason::Continuous => f.write_str("two consecutive 32-byte blocks were equal"),
            CloseReason::RepetitionCount => f.write_str("repetition count test failed"),
            CloseReason::AdaptiveProportion => f.write_str("adaptive proportion test failed"),
            CloseReason::DeviceFailure(mode) => write!(f, "key reports: {mode}"),
            CloseReason::DeviceFipsRate { failures, blocks } => write!(
                f,
                "key's own FIPS 140-2 tests failed {failures} of {blocks} blocks"
            ),
            CloseReason::Temperature { millicelsius } => {
                f.write_str("core temperature ")?;
                write_milli(f, millicelsius, 1)?;
                f.write_str(" °C out of bounds")
            }
            CloseReason::Voltage { millivolts } => {
                f.write_str("supply voltage ")?;
                write_milli(f, i64::from(millivolts), 3)?;
                f.write_str(" V out of bounds")
            }
            CloseReason::MinEntropy { millibits, floor } => {
                f.write_str("min-entropy estimate ")?;
                write_milli(f, i64::from(millibits), 3)?;
                f.write_str(" bits per byte is below the floor of ")?;
                write_milli(f, i64::from(floor), 3)
            }
        }
    }
}

/// Readings outside the warning limits (but maybe inside the close limits).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Warnings {
    /// Core temperature below [`GateConfig::temperature_warn`].
    pub temperature_low: bool,
    /// Core temperature above [`GateConfig::temperature_warn`].
    pub temperature_high: bool,
    /// Supply voltage below [`GateConfig::voltage_warn`].
    pub voltage_low: bool,
    /// Supply voltage above [`GateConfig::voltage_warn`].
    pub voltage_high: bool,
}

impl Warnings {
    /// Whether any warning is active.
    pub const fn any(&self) -> bool {
        self.temperature_low || self.temperature_high || self.voltage_low || self.voltage_high
    }
}

/// Lists the active warnings, comma-separated, or `none`.
impl fmt::Display for Warnings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let all = [
            (self.temperature_low, "temperature low"),
            (self.temperature_high, "temperature high"),
            (self.voltage_low, "voltage low"),
            (self.voltage_high, "voltage high"),
        ];
        let mut first = true;
        for (on, name) in all {
            if on {
                if !first {
                    f.write_str(", ")?;
                }
                f.write_str(name)?;
                first = false;
            }
        }
        if first {
            f.write_str("none")?;
        }
        Ok(())
    }
}

/// Counters of a [`Gate`]. Bytes always add up:
/// `bytes_received = bytes_released + bytes_discarded + bytes_pending +
/// bytes_buffered`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GateCounters {
    /// FIPS blocks tested.
    pub blocks_tested: u64,
    /// Tested blocks that failed any test (FIPS 140-2, continuous, RCT,
    /// APT).
    pub blocks_failed: u64,
    /// Blocks that failed the monobit test.
    pub monobit_failures: u64,
    /// Blocks that failed the poker test.
    pub poker_failures: u64,
    /// Blocks that failed the runs test.
    pub runs_failures: u64,
    /// Blocks that failed the long-run test.
    pub long_run_failures: u64,
    /// Blocks that held a 32-byte block equal to the one before.
    pub continuous_failures: u64,
    /// Blocks in which the Repetition Count Test raised an alarm.
    pub rct_failures: u64,
    /// Blocks in which the Adaptive Proportion Test raised an alarm.
    pub apt_failures: u64,
    /// Bytes pushed in.
    pub bytes_received: u64,
    /// Bytes handed out by [`Gate::pop_released`].
    pub bytes_released: u64,
    /// Bytes thrown away: failed blocks, blocks tested while the gate was
    /// closed, output not yet popped when the gate closed, overflow.
    pub bytes_discarded: u64,
    /// Bytes waiting for their FIPS block to fill (not yet tested).
    pub bytes_pending: u64,
    /// Bytes that passed and wait for [`Gate::pop_released`] (including a
    /// remainder of less than 32 bytes carried over to the next block).
    pub bytes_buffered: u64,
    /// Passed bytes discarded because the output buffer was full (part of
    /// `bytes_discarded`).
    pub bytes_overflowed: u64,
    /// Times the gate went from open to closed.
    pub times_closed: u64,
}

/// A snapshot of a [`Gate`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct GateStatus {
    /// Whether passing blocks are released.
    pub open: bool,
    /// Why the gate is closed (`None` when open). While a device condition
    /// holds, that condition; otherwise what closed it last.
    pub reason: Option<CloseReason>,
    /// Whether a device condition (failure mode, FIPS rate, temperature,
    /// voltage) still holds: the gate cannot start re-opening yet.
    pub condition_active: bool,
    /// Consecutive clean blocks counted towards
    /// [`GateConfig::reopen_after`] (while closed).
    pub clean_blocks: u32,
    /// Failed blocks in the current failure-rate window (while open).
    pub failures_in_window: u16,
    /// Active warnings.
    pub warnings: Warnings,
    /// Counters.
    pub counters: GateCounters,
}

/// The outcome of one tested FIPS block, as [`Gate::push`] returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BlockReport {
    /// FIPS 140-2 statistics and verdicts.
    pub fips: FipsResult,
    /// No 32-byte block in it equal to the one before.
    pub continuous_ok: bool,
    /// No Repetition Count Test alarm on its bytes.
    pub rct_ok: bool,
    /// No Adaptive Proportion Test alarm on its bytes.
    pub apt_ok: bool,
    /// Whether its bytes went to the output (it passed and the gate was,
    /// and stayed, open).
    pub released: bool,
}

impl BlockReport {
    /// Whether the block passed every test.
    pub const fn passed(&self) -> bool {
        self.fips.passed() && self.continuous_ok && self.rct_ok && self.apt_ok
    }
}

/// Failures seen in the FIPS block being filled.
#[derive(Clone, Copy, Default)]
struct Flags {
    continuous: bool,
    rct: bool,
    apt: bool,
}

/// The key's own FIPS counters, judged over windows of its blocks.
#[derive(Clone, Copy, Default)]
struct DeviceFips {
    base: Option<(u32, u32)>,
    tripped: Option<(u32, u32)>,
}

/// A health gate for one key's verified entropy. See the
/// [module docs](self).
///
/// ```
/// use ekey_proto::health::{Gate, GateConfig, FIPS_BLOCK_BYTES};
///
/// let mut gate = Gate::new(GateConfig::default());
/// // A stuck source: 0x00 bytes (each 32-byte block equal to the last).
/// for _ in 0..(4 * FIPS_BLOCK_BYTES / 32) {
///     gate.push(&[0u8; 32]);
///     assert!(gate.pop_released().is_none());
/// }
/// let status = gate.status();
/// assert!(!status.open);
/// assert_eq!(status.counters.bytes_released, 0);
/// println!("closed: {}", status.reason.unwrap());
/// ```
pub struct Gate {
    config: GateConfig,
    block: [u8; FIPS_BLOCK_BYTES],
    block_len: usize,
    flags: Flags,
    previous: [u8; BLOCK_LEN],
    have_previous: bool,
    rct: RepetitionCount,
    apt: AdaptiveProportion,
    out: [u8; OUTPUT_CAPACITY],
    out_head: usize,
    out_len: usize,
    window: [u64; (MAX_FAILURE_WINDOW / 64) as usize],
    window_pos: u16,
    window_failures: u16,
    open: bool,
    reason: Option<CloseReason>,
    clean: u32,
    device_failure: Option<FailureMode>,
    temperature_bad: Option<i64>,
    voltage_bad: Option<u32>,
    /// The last min-entropy estimate below the floor, in millibits.
    min_entropy_low: Option<u32>,
    device_fips: DeviceFips,
    warnings: Warnings,
    counters: GateCounters,
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gate")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate::new(GateConfig::default())
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.block.zeroize();
        self.previous.zeroize();
        self.out.zeroize();
        self.rct.zeroize();
        self.apt.zeroize();
    }
}

impl Gate {
    /// A gate with this configuration; it starts open.
    pub fn new(config: GateConfig) -> Self {
        let mut config = config;
        config.failure_window = config.failure_window.clamp(1, MAX_FAILURE_WINDOW);
        config.reopen_after = config.reopen_after.max(1);
        Gate {
            rct: RepetitionCount::new(config.rct_cutoff),
            apt: AdaptiveProportion::new(config.apt_window, config.apt_cutoff),
            config,
            block: [0; FIPS_BLOCK_BYTES],
            block_len: 0,
            flags: Flags::default(),
            previous: [0; BLOCK_LEN],
            have_previous: false,
            out: [0; OUTPUT_CAPACITY],
            out_head: 0,
            out_len: 0,
            window: [0; (MAX_FAILURE_WINDOW / 64) as usize],
            window_pos: 0,
            window_failures: 0,
            open: true,
            reason: None,
            clean: 0,
            device_failure: None,
            temperature_bad: None,
            voltage_bad: None,
            min_entropy_low: None,
            device_fips: DeviceFips::default(),
            warnings: Warnings::default(),
            counters: GateCounters::default(),
        }
    }

    /// The configuration in use (with `failure_window` and `reopen_after`
    /// clamped as documented).
    pub fn config(&self) -> &GateConfig {
        &self.config
    }

    /// Whether passing blocks are released.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// A snapshot of state and counters.
    pub fn status(&self) -> GateStatus {
        let mut counters = self.counters;
        counters.bytes_pending = self.block_len as u64;
        counters.bytes_buffered = self.out_len as u64;
        GateStatus {
            open: self.open,
            reason: if self.open { None } else { self.reason },
            condition_active: self.device_condition().is_some(),
            clean_blocks: self.clean,
            failures_in_window: self.window_failures,
            warnings: self.warnings,
            counters,
        }
    }

    /// Feeds one verified 32-byte block. When it completes a FIPS block,
    /// that block is tested and the outcome returned; its bytes then
    /// either wait for [`pop_released`](Self::pop_released) or are
    /// discarded.
    pub fn push(&mut self, data: &[u8; BLOCK_LEN]) -> Option<BlockReport> {
        self.counters.bytes_received = self
            .counters
            .bytes_received
            .saturating_add(BLOCK_LEN as u64);
        let repeat = self.have_previous && self.previous == *data;
        self.previous = *data;
        self.have_previous = true;

        let mut report = None;
        let mut rest: &[u8] = data;
        while !rest.is_empty() {
            let room = FIPS_BLOCK_BYTES.saturating_sub(self.block_len);
            let (now, later) = rest
                .split_at_checked(room.min(rest.len()))
                .unwrap_or((rest, &[]));
            if repeat {
                self.flags.continuous = true;
            }
            let start = self.block_len;
            if let Some(dst) = self.block.get_mut(start..) {
                for (d, &b) in dst.iter_mut().zip(now) {
                    *d = b;
                    if self.rct.feed(b) {
                        self.flags.rct = true;
                    }
                    if self.apt.feed(b) {
                        self.flags.apt = true;
                    }
                }
            }
            self.block_len = start.saturating_add(now.len()).min(FIPS_BLOCK_BYTES);
            if self.block_len == FIPS_BLOCK_BYTES {
                report = Some(self.test_block());
            }
            if now.is_empty() {
                // Cannot happen (room is never 0 here); guards the loop.
                break;
            }
            rest = later;
        }
        report
    }

    /// The next 32 released bytes, in the order they were pushed, if that
    /// many have passed. Call until `None` after each
    /// [`push`](Self::push). The bytes are wiped from the gate.
    pub fn pop_released(&mut self) -> Option<[u8; BLOCK_LEN]> {
        if self.out_len < BLOCK_LEN {
            return None;
        }
        let mut block = [0u8; BLOCK_LEN];
        // The 32 bytes from the head, wrapping round the end of the ring.
        let (wrapped, tail) = self.out.split_at_mut(self.out_head.min(OUTPUT_CAPACITY));
        for (b, src) in block
            .iter_mut()
            .zip(tail.iter_mut().chain(wrapped.iter_mut()))
        {
            *b = *src;
            *src = 0;
        }
        self.out_head = (self.out_head + BLOCK_LEN) % OUTPUT_CAPACITY;
        self.out_len -= BLOCK_LEN;
        self.counters.bytes_released = self
            .counters
            .bytes_released
            .saturating_add(BLOCK_LEN as u64);
        Some(block)
    }

    /// Times the gate went from open to closed
    /// ([`GateCounters::times_closed`], without building a whole
    /// [`GateStatus`]).
    ///
    /// ```
    /// use ekey_proto::health::{Gate, GateConfig};
    /// assert_eq!(Gate::new(GateConfig::default()).times_closed(), 0);
    /// ```
    pub fn times_closed(&self) -> u64 {
        self.counters.times_closed
    }

    /// Bytes that passed and wait for [`pop_released`](Self::pop_released)
    /// (including a remainder of less than 32 bytes).
    ///
    /// ```
    /// use ekey_proto::health::{Gate, GateConfig};
    /// let gate = Gate::new(GateConfig::default());
    /// assert_eq!(gate.released_len(), 0);
    /// ```
    pub fn released_len(&self) -> usize {
        self.out_len
    }

    /// Whether the output buffer has room for one more tested block. A
    /// caller that cannot take released bytes for a while pops (and drops)
    /// the oldest until it has, so that the newest pass instead of
    /// overflowing.
    ///
    /// ```
    /// use ekey_proto::health::{Gate, GateConfig};
    /// assert!(Gate::new(GateConfig::default()).output_has_room());
    /// ```
    pub fn output_has_room(&self) -> bool {
        self.out_len.saturating_add(FIPS_BLOCK_BYTES) <= OUTPUT_CAPACITY
    }

    /// Takes in what the key reports about itself (pass every
    /// [`Event::Info`](crate::host::Event::Info); the merged view is
    /// fine). Items that are `None` leave their condition as it was.
    pub fn observe(&mut self, info: &DeviceInfo) {
        if let Some(s) = info.shannon {
            self.device_failure = (!s.failure.is_ok()).then_some(s.failure);
        }
        if let Some(t) = info.temperature {
            let mc = t.millicelsius();
            let warn = self.config.temperature_warn;
            self.warnings.temperature_low = mc < warn.min;
            self.warnings.temperature_high = mc > warn.max;
            self.temperature_bad = (!self.config.temperature_close.contains(mc)).then_some(mc);
        }
        if let Some(v) = info.voltage {
            let mv = i64::from(v.millivolts);
            let warn = self.config.voltage_warn;
            self.warnings.voltage_low = mv < warn.min;
            self.warnings.voltage_high = mv > warn.max;
            self.voltage_bad = (!self.config.voltage_close.contains(mv)).then_some(v.millivolts);
        }
        if let Some(fips) = info.fips {
            self.observe_device_fips(fips.blocks, fips.failures);
        }
        self.apply_device_condition();
    }

    fn observe_device_fips(&mut self, blocks: u32, failures: u32) {
        let max = self.config.device_fips_max_failures;
        let state = &mut self.device_fips;
        let Some((base_blocks, base_failures)) = state.base else {
            state.base = Some((blocks, failures));
            return;
        };
        if blocks < base_blocks || failures < base_failures {
            // The key reset its counters: judge from here.
            state.base = Some((blocks, failures));
            return;
        }
        let new_blocks = blocks - base_blocks;
        let new_failures = failures - base_failures;
        // Reports normally come every key block or so; one that spans
        // several windows (the host was away) is held to the same rate:
        // `max` failures per window.
        let windows = new_blocks
            .div_ceil(self.config.device_fips_window.max(1))
            .max(1);
        if max > 0 && new_failures >= max.saturating_mul(windows) {
            state.tripped = Some((new_failures, new_blocks));
            state.base = Some((blocks, failures));
        } else if new_blocks >= self.config.device_fips_window {
            // A whole window below the threshold: the condition clears.
            state.tripped = None;
            state.base = Some((blocks, failures));
        }
    }

    /// If a device condition holds: closes the gate for it, or (already
    /// closed) makes it the reason.
    fn apply_device_condition(&mut self) {
        if let Some(reason) = self.device_condition() {
            self.clean = 0;
            if self.open {
                self.close(reason);
            } else {
                self.reason = Some(reason);
            }
        }
    }

    /// The device condition that keeps the gate closed, if any.
    fn device_condition(&self) -> Option<CloseReason> {
        if let Some(mode) = self.device_failure {
            return Some(CloseReason::DeviceFailure(mode));
        }
        if let Some(millicelsius) = self.temperature_bad {
            return Some(CloseReason::Temperature { millicelsius });
        }
        if let Some(millivolts) = self.voltage_bad {
            return Some(CloseReason::Voltage { millivolts });
        }
        if let Some((failures, blocks)) = self.device_fips.tripped {
            return Some(CloseReason::DeviceFipsRate { failures, blocks });
        }
        if let Some(millibits) = self.min_entropy_low {
            return Some(CloseReason::MinEntropy {
                millibits,
                floor: self.config.min_entropy_floor_millibits,
            });
        }
        None
    }

    /// Takes in a min-entropy estimate of the key's output, in millibits
    /// per byte (8000 is full entropy). Below
    /// [`GateConfig::min_entropy_floor_millibits`] the gate closes, and
    /// stays closed until an estimate at or above the floor and then
    /// [`GateConfig::reopen_after`] clean blocks. Without a floor it does
    /// nothing.
    ///
    /// ```
    /// use ekey_proto::health::{CloseReason, Gate, GateConfig};
    ///
    /// let mut gate = Gate::new(GateConfig {
    ///     min_entropy_floor_millibits: 6000,
    ///     ..GateConfig::default()
    /// });
    /// gate.observe_min_entropy(7900);
    /// assert!(gate.is_open());
    /// gate.observe_min_entropy(5200);
    /// assert!(!gate.is_open());
    /// assert!(matches!(
    ///     gate.status().reason,
    ///     Some(CloseReason::MinEntropy { millibits: 5200, floor: 6000 })
    /// ));
    /// ```
    pub fn observe_min_entropy(&mut self, millibits: u32) {
        let floor = self.config.min_entropy_floor_millibits;
        self.min_entropy_low = (floor > 0 && millibits < floor).then_some(millibits);
        self.apply_device_condition();
    }

    /// Closes the gate; what waits for output is discarded.
    fn close(&mut self, reason: CloseReason) {
        if self.open {
            self.counters.times_closed = self.counters.times_closed.saturating_add(1);
        }
        self.open = false;
        self.reason = Some(reason);
        self.clean = 0;
        self.clear_window();
        self.discard_output();
    }

    fn reopen(&mut self) {
        self.open = true;
        self.reason = None;
        self.clean = 0;
        self.clear_window();
    }

    fn clear_window(&mut self) {
        self.window = [0; (MAX_FAILURE_WINDOW / 64) as usize];
        self.window_pos = 0;
        self.window_failures = 0;
    }

    /// Records one tested block in the failure window.
    fn window_record(&mut self, failed: bool) {
        let pos = usize::from(self.window_pos);
        let bit = 1u64 << (pos % 64);
        if let Some(word) = self.window.get_mut(pos / 64) {
            if *word & bit != 0 {
                self.window_failures = self.window_failures.saturating_sub(1);
            }
            if failed {
                *word |= bit;
                self.window_failures = self.window_failures.saturating_add(1);
            } else {
                *word &= !bit;
            }
        }
        self.window_pos = (self.window_pos + 1) % self.config.failure_window.max(1);
    }

    /// Drops every byte the gate holds: released bytes not taken yet and
    /// the part of a FIPS block not tested yet (both counted as
    /// discarded), and forgets the last block for the continuous test. The
    /// gate's state, window and counters stay. For a caller that starts
    /// over, e.g. after resetting the key.
    pub fn discard_buffered(&mut self) {
        self.discard_output();
        self.block.zeroize();
        self.counters.bytes_discarded = self
            .counters
            .bytes_discarded
            .saturating_add(self.block_len as u64);
        self.block_len = 0;
        self.flags = Flags::default();
        self.previous.zeroize();
        self.have_previous = false;
    }

    fn discard_output(&mut self) {
        self.out.zeroize();
        self.counters.bytes_discarded = self
            .counters
            .bytes_discarded
            .saturating_add(self.out_len as u64);
        self.out_head = 0;
        self.out_len = 0;
    }

    /// Tests the full FIPS block, updates the gate, and moves the bytes to
    /// the output or discards them.
    fn test_block(&mut self) -> BlockReport {
        let fips = fips_140_2(&self.block);
        let flags = core::mem::take(&mut self.flags);
        let mut report = BlockReport {
            fips,
            continuous_ok: !flags.continuous,
            rct_ok: !flags.rct,
            apt_ok: !flags.apt,
            released: false,
        };
        let passed = report.passed();
        let c = &mut self.counters;
        let bump = |n: &mut u64, failed: bool| {
            if failed {
                *n = n.saturating_add(1);
            }
        };
        bump(&mut c.blocks_tested, true);
        bump(&mut c.blocks_failed, !passed);
        bump(&mut c.monobit_failures, !fips.monobit_ok);
        bump(&mut c.poker_failures, !fips.poker_ok);
        bump(&mut c.runs_failures, !fips.runs_ok);
        bump(&mut c.long_run_failures, !fips.long_run_ok);
        bump(&mut c.continuous_failures, flags.continuous);
        bump(&mut c.rct_failures, flags.rct);
        bump(&mut c.apt_failures, flags.apt);

        // Failures that close the gate at once, most telling first.
        let immediate = if flags.rct {
            Some(CloseReason::RepetitionCount)
        } else if flags.continuous {
            Some(CloseReason::Continuous)
        } else if flags.apt {
            Some(CloseReason::AdaptiveProportion)
        } else {
            None
        };

        let was_open = self.open;
        if self.open {
            self.window_record(!passed);
            if let Some(reason) = immediate {
                self.close(reason);
            } else if self.config.max_failures > 0
                && self.window_failures >= self.config.max_failures
            {
                self.close(CloseReason::FailureRate {
                    failures: self.window_failures,
                    window: self.config.failure_window,
                });
            }
        } else if !passed {
            self.clean = 0;
            if let Some(reason) = immediate
                && self.device_condition().is_none()
            {
                self.reason = Some(reason);
            }
        } else if self.device_condition().is_none() {
            self.clean = self.clean.saturating_add(1);
            if self.clean >= self.config.reopen_after {
                self.reopen();
            }
        }

        report.released = passed && was_open && self.open && self.release_block();
        if !report.released {
            self.counters.bytes_discarded = self
                .counters
                .bytes_discarded
                .saturating_add(FIPS_BLOCK_BYTES as u64);
        }
        self.block.zeroize();
        self.block_len = 0;
        report
    }

    /// Moves the tested block to the output; `false` (and counted as
    /// overflow) if there is no room.
    fn release_block(&mut self) -> bool {
        if self.out_len + FIPS_BLOCK_BYTES > OUTPUT_CAPACITY {
            self.counters.bytes_overflowed = self
                .counters
                .bytes_overflowed
                .saturating_add(FIPS_BLOCK_BYTES as u64);
            return false;
        }
        let tail = (self.out_head + self.out_len) % OUTPUT_CAPACITY;
        let (first, second) = self.out.split_at_mut(tail);
        for (d, &s) in second
            .iter_mut()
            .chain(first.iter_mut())
            .zip(self.block.iter())
        {
            *d = s;
        }
        self.out_len += FIPS_BLOCK_BYTES;
        true
    }
}
