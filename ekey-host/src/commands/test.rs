//! `ekey-host test`: the per-key report, like rngtest's.

use crate::keys::driver::KeyStatus;
use std::collections::BTreeMap;

/// `ekey-host test`'s report on one key, like rngtest's, and whether the
/// key passed: its health gate never closed while `blocks` were tested.
pub(crate) fn test_report(k: &KeyStatus, blocks: u64) -> (String, bool) {
    use std::fmt::Write as _;
    let g = &k.gate;
    let c = &g.counters;
    let serial = k.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
    let mut r = String::new();
    let _ = writeln!(r, "key {serial} via {}", k.transport);
    let _ = writeln!(
        r,
        "  {:<32}{} ({} blocks of 20,000; asked for {blocks})",
        "bits tested:",
        c.blocks_tested * 20_000,
        c.blocks_tested
    );
    let _ = writeln!(
        r,
        "  {:<32}{}",
        "blocks passed:",
        c.blocks_tested - c.blocks_failed
    );
    let _ = writeln!(r, "  {:<32}{}", "blocks failed:", c.blocks_failed);
    let _ = writeln!(r, "  {:<32}{}", "FIPS 140-2 monobit:", c.monobit_failures);
    let _ = writeln!(r, "  {:<32}{}", "FIPS 140-2 poker:", c.poker_failures);
    let _ = writeln!(r, "  {:<32}{}", "FIPS 140-2 runs:", c.runs_failures);
    let _ = writeln!(r, "  {:<32}{}", "FIPS 140-2 long run:", c.long_run_failures);
    let _ = writeln!(
        r,
        "  {:<32}{}",
        "continuous (32-byte blocks):", c.continuous_failures
    );
    let _ = writeln!(
        r,
        "  {:<32}{}",
        "SP 800-90B repetition count:", c.rct_failures
    );
    let _ = writeln!(
        r,
        "  {:<32}{}",
        "SP 800-90B adaptive proportion:", c.apt_failures
    );
    if let Some(f) = k.info.fips {
        let _ = writeln!(
            r,
            "  {:<32}{} blocks, {} failed",
            "the key's own FIPS 140-2:", f.blocks, f.failures
        );
    }
    if let (Some(t), Some(v)) = (k.info.temperature, k.info.voltage) {
        let _ = writeln!(
            r,
            "  {:<32}{:.1} °C, {:.3} V",
            "readings:",
            t.celsius(),
            v.volts()
        );
    }
    if g.warnings.any() {
        let _ = writeln!(r, "  {:<32}{}", "warnings:", g.warnings);
    }
    let allowed = chance_failures(c.blocks_tested);
    let _ = writeln!(
        r,
        "  {:<32}{allowed} (more has odds under 1e-6 for a good key)",
        "failed blocks allowed:"
    );
    let (verdict, pass) = verdict(g, blocks, allowed);
    let _ = writeln!(r, "  {:<32}{verdict}", "verdict:");
    (r, pass)
}

/// The verdict on a key whose health gate is `g`, when `blocks` blocks
/// were asked for and chance allows `allowed` failed ones; and whether the
/// key passed.
fn verdict(g: &ekey_proto::health::GateStatus, blocks: u64, allowed: u64) -> (String, bool) {
    let c = &g.counters;
    let pass =
        c.times_closed == 0 && g.open && c.blocks_tested >= blocks && c.blocks_failed <= allowed;
    let verdict = if pass {
        "PASS (failures within chance; the health gate stayed open)".to_string()
    } else if c.blocks_failed > allowed {
        format!(
            "FAIL ({} of {} blocks failed; chance allows {allowed})",
            c.blocks_failed, c.blocks_tested
        )
    } else if let Some(reason) = g.reason {
        format!("FAIL (health gate closed: {reason})")
    } else if c.times_closed > 0 {
        format!("FAIL (the health gate closed {} times)", c.times_closed)
    } else {
        "FAIL (too few blocks tested)".to_string()
    };
    (verdict, pass)
}

/// Chance that a block of a good key fails any of the tests (FIPS 140-2
/// and the rest), as measured in `ekey_proto::health`'s docs.
pub(crate) const CHANCE_BLOCK_FAILURE: f64 = 7.99e-4;

/// The most failed blocks out of `n` that a good key shows with odds of at
/// least 1e-6: the largest `f` with P(Binomial(n, p) ≥ f) ≥ 1e-6.
///
/// Plain arithmetic only (`powi` is multiplications): no `libm`, which the
/// daemon would otherwise map into memory for this alone. Exact for `n` up
/// to [`MAX_TEST_BLOCKS`]; beyond that (1 − p)ⁿ underflows and no failure
/// count would be judged plausible.
pub(crate) fn chance_failures(n: u64) -> u64 {
    let p = CHANCE_BLOCK_FAILURE;
    let nf = n as f64;
    let mut pmf = (1.0 - p).powi(i32::try_from(n).unwrap_or(i32::MAX));
    let mut cdf = 0.0;
    let mut k: u64 = 0;
    loop {
        cdf += pmf;
        if 1.0 - cdf < 1e-6 || k >= n || pmf.is_nan() {
            return k;
        }
        pmf *= (nf - k as f64) / (k as f64 + 1.0) * (p / (1.0 - p));
        k += 1;
    }
}

/// Most blocks `ekey-host test -n` takes (about 7 hours of a key).
pub(crate) const MAX_TEST_BLOCKS: u64 = 100_000;

/// `test`'s end: prints each tested key's report and the keys that were not
/// tested; `Ok` when every key was tested and passed.
pub(crate) fn test_verdict(
    keys: &[KeyStatus],
    blocks: u64,
    tested: bool,
    interrupted: bool,
    failures: BTreeMap<String, String>,
) -> Result<(), String> {
    // Every key must have been tested, and have passed.
    let mut verdict = tested && failures.is_empty();
    for k in keys.iter().filter(|k| k.gate.counters.blocks_tested > 0) {
        let (report, pass) = test_report(k, blocks);
        print!("{report}");
        verdict &= pass;
    }
    for (source, reason) in &failures {
        println!("{source}: not tested: {reason}");
    }
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if !tested {
        let mut reasons: Vec<String> = failures.into_values().collect();
        if interrupted {
            reasons.push("interrupted".into());
        }
        if reasons.is_empty() {
            reasons.push("the keys stopped before enough blocks were tested".into());
        }
        return Err(format!("test incomplete: {}", reasons.join("; ")));
    }
    if verdict {
        Ok(())
    } else {
        Err("test FAILED (see the report)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chance_failures_follow_the_binomial_tail() {
        // n = 20: P(X ≥ 2) ≈ C(20,2)·p² ≈ 1.2e-4 is still plausible,
        // P(X ≥ 3) ≈ C(20,3)·p³ ≈ 5.8e-7 is not: 2 allowed.
        assert_eq!(chance_failures(20), 2);
        // n = 1,000, mean 0.8 (Poisson): P(X ≥ 8) ≈ 1.9e-6, P(X ≥ 9) ≈
        // 1.7e-7: 8 allowed.
        assert_eq!(chance_failures(1_000), 8);
        // More blocks never allow fewer failures.
        let mut last = 0;
        for n in (0..20_000).step_by(997) {
            let f = chance_failures(n);
            assert!(f >= last && f <= n.max(1), "{n}: {f}");
            last = f;
        }
        // The largest count allowed (mean 80): 126, as a log-space sum of
        // the same binomial terms in Python gives.
        assert_eq!(chance_failures(MAX_TEST_BLOCKS), 126);
    }
}
