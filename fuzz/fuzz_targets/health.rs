//! The health gate on an arbitrary sequence of pushes, pops and device
//! reports, under an arbitrary configuration: never panics, and after every
//! step agrees with a model of the policy written from the module docs of
//! `ekey_proto::health`:
//!
//! - the byte counters add up, and each one matches the model's count;
//! - the continuous, RCT and APT verdicts of each tested block match
//!   independent re-implementations over the pushed stream (with the
//!   cutoffs clamped as documented);
//! - popped bytes are exactly the released FIPS blocks, in pushed order,
//!   minus what was buffered when the gate closed; a block is released
//!   only if it passed, the gate was open before and after its verdict,
//!   and there was room;
//! - nothing is buffered or popped while the gate is closed;
//! - the gate closes on a push only for a failed block (at once on a
//!   continuous/RCT/APT failure, or `max_failures` failures among the last
//!   `failure_window` blocks tested since it last opened), and re-opens
//!   only on a push, after `reopen_after` clean blocks with no device
//!   condition; a device report never opens it and closes it while a
//!   failure mode, temperature or voltage condition holds; warnings follow
//!   the last reading.
//!
//! The key's own FIPS counter rule is modelled exactly too, as documented;
//! the reopen check is one-sided only where that rule is involved.
#![no_main]

use std::collections::VecDeque;

use ekey_proto::health::{
    CloseReason, FIPS_BLOCK_BYTES, Gate, GateConfig, Limits, MAX_FAILURE_WINDOW, OUTPUT_CAPACITY,
    fips_140_2,
};
use ekey_proto::host::DeviceInfo;
use ekey_proto::wire::info::{FailureMode, Fips, Shannon, Temperature, Voltage};
use libfuzzer_sys::fuzz_target;

/// Most 32-byte blocks pushed per input, to keep runs fast.
const MAX_PUSHES: usize = 60_000;

/// Reads the fuzz input; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn bytes<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes())
    }
    fn i64(&mut self) -> i64 {
        i64::from_le_bytes(self.bytes())
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// A u32 that is often an edge value.
    fn u32_edgy(&mut self, default: u32) -> u32 {
        match self.u8() % 8 {
            0 => 0,
            1 => 1,
            2 => u32::MAX,
            3 => u32::from(self.u8()),
            4 => self.u32(),
            5 => 2,
            _ => default,
        }
    }
    fn u16_edgy(&mut self, default: u16) -> u16 {
        match self.u8() % 8 {
            0 => 0,
            1 => 1,
            2 => u16::MAX,
            3 => u16::from(self.u8()),
            4 => self.u16(),
            5 => MAX_FAILURE_WINDOW + 1,
            _ => default,
        }
    }
    fn limits(&mut self, default: Limits) -> Limits {
        match self.u8() % 6 {
            0 => Limits {
                min: self.i64(),
                max: self.i64(),
            },
            1 => Limits {
                min: i64::MIN,
                max: i64::MAX,
            },
            2 => Limits {
                min: default.max,
                max: default.min,
            },
            3 => Limits {
                min: i64::MAX,
                max: i64::MIN,
            },
            _ => default,
        }
    }
}

/// SplitMix64, for long runs of well-mixed bytes from a short seed.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn block(&mut self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for c in b.chunks_mut(8) {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        b
    }
}

/// The Repetition Count Test as SP 800-90B and the docs describe it.
struct Rct {
    cutoff: u32,
    last: Option<u8>,
    run: u32,
}

impl Rct {
    fn feed(&mut self, b: u8) -> bool {
        if self.last == Some(b) {
            self.run += 1;
        } else {
            self.last = Some(b);
            self.run = 1;
        }
        if self.run >= self.cutoff {
            // Documented: counting restarts from this byte.
            self.run = 1;
            return true;
        }
        false
    }
}

/// The Adaptive Proportion Test as SP 800-90B and the docs describe it.
struct Apt {
    window: u64,
    cutoff: u64,
    pos: u64,
    sample: u8,
    count: u64,
}

impl Apt {
    fn feed(&mut self, b: u8) -> bool {
        let mut alarm = false;
        if self.pos == 0 {
            self.sample = b;
            self.count = 1;
        } else if b == self.sample {
            self.count += 1;
            alarm = self.count == self.cutoff;
        }
        self.pos += 1;
        if self.pos == self.window {
            self.pos = 0;
        }
        alarm
    }
}

/// The key's own FIPS counters, judged as documented.
#[derive(Default)]
struct DeviceFipsModel {
    base: Option<(u32, u32)>,
    tripped: bool,
}

struct Model {
    config: GateConfig,
    window_len: usize,
    reopen_after: u32,
    // The stream.
    pushes: u64,
    previous: Option<[u8; 32]>,
    block: Vec<u8>,
    fail_continuous: bool,
    fail_rct: bool,
    fail_apt: bool,
    rct: Rct,
    apt: Apt,
    // What the gate should hold and have done.
    out: VecDeque<u8>,
    popped: u64,
    discarded: u64,
    overflowed: u64,
    tested: u64,
    failed: u64,
    monobit: u64,
    poker: u64,
    runs: u64,
    long_run: u64,
    continuous: u64,
    rct_failures: u64,
    apt_failures: u64,
    times_closed: u64,
    // The policy.
    open: bool,
    window: VecDeque<bool>,
    clean: u32,
    failure_mode: bool,
    temperature: Option<i64>,
    voltage: Option<i64>,
    device_fips: DeviceFipsModel,
}

impl Model {
    fn new(config: GateConfig) -> Self {
        Model {
            config,
            window_len: usize::from(config.failure_window.clamp(1, MAX_FAILURE_WINDOW)),
            reopen_after: config.reopen_after.max(1),
            pushes: 0,
            previous: None,
            block: Vec::with_capacity(FIPS_BLOCK_BYTES),
            fail_continuous: false,
            fail_rct: false,
            fail_apt: false,
            rct: Rct {
                cutoff: config.rct_cutoff.max(2),
                last: None,
                run: 0,
            },
            apt: Apt {
                window: u64::from(config.apt_window.max(2)),
                cutoff: u64::from(config.apt_cutoff.max(2)),
                pos: 0,
                sample: 0,
                count: 0,
            },
            out: VecDeque::new(),
            popped: 0,
            discarded: 0,
            overflowed: 0,
            tested: 0,
            failed: 0,
            monobit: 0,
            poker: 0,
            runs: 0,
            long_run: 0,
            continuous: 0,
            rct_failures: 0,
            apt_failures: 0,
            times_closed: 0,
            open: true,
            window: VecDeque::new(),
            clean: 0,
            failure_mode: false,
            temperature: None,
            voltage: None,
            device_fips: DeviceFipsModel::default(),
        }
    }

    fn condition(&self) -> bool {
        self.failure_mode
            || self
                .temperature
                .is_some_and(|t| !self.config.temperature_close.contains(t))
            || self
                .voltage
                .is_some_and(|v| !self.config.voltage_close.contains(v))
            || self.device_fips.tripped
    }

    fn close(&mut self) {
        if self.open {
            self.times_closed += 1;
        }
        self.open = false;
        self.clean = 0;
        self.window.clear();
        self.discarded += self.out.len() as u64;
        self.out.clear();
    }

    fn observe(&mut self, info: &DeviceInfo) {
        if let Some(s) = info.shannon {
            self.failure_mode = s.failure != FailureMode::Ok;
        }
        if let Some(t) = info.temperature {
            self.temperature = Some(i64::from(t.deci_kelvin) * 100 - 273_150);
        }
        if let Some(v) = info.voltage {
            self.voltage = Some(i64::from(v.millivolts));
        }
        if let Some(f) = info.fips {
            let max = self.config.device_fips_max_failures;
            let d = &mut self.device_fips;
            match d.base {
                None => d.base = Some((f.blocks, f.failures)),
                Some((b, fl)) if f.blocks < b || f.failures < fl => {
                    d.base = Some((f.blocks, f.failures));
                }
                Some((b, fl)) => {
                    if max > 0 && f.failures - fl >= max {
                        d.tripped = true;
                        d.base = Some((f.blocks, f.failures));
                    } else if f.blocks - b >= self.config.device_fips_window {
                        d.tripped = false;
                        d.base = Some((f.blocks, f.failures));
                    }
                }
            }
        }
        if self.condition() {
            self.close();
        }
    }

    /// Feeds one pushed block; returns the model's verdict on a FIPS block
    /// it completes: (bytes, continuous ok, rct ok, apt ok).
    fn push(&mut self, data: &[u8; 32]) -> Option<(Vec<u8>, bool, bool, bool)> {
        self.pushes += 1;
        let repeat = self.previous == Some(*data);
        self.previous = Some(*data);
        let mut done = None;
        for (i, &b) in data.iter().enumerate() {
            if i == 0 || self.block.is_empty() {
                // The block's bytes reach this FIPS block.
                self.fail_continuous |= repeat;
            }
            self.block.push(b);
            self.fail_rct |= self.rct.feed(b);
            self.fail_apt |= self.apt.feed(b);
            if self.block.len() == FIPS_BLOCK_BYTES {
                let verdict = (
                    std::mem::take(&mut self.block),
                    !self.fail_continuous,
                    !self.fail_rct,
                    !self.fail_apt,
                );
                self.fail_continuous = false;
                self.fail_rct = false;
                self.fail_apt = false;
                assert!(done.is_none(), "a 32-byte block completed two FIPS blocks");
                done = Some(verdict);
            }
        }
        done
    }
}

fn arbitrary_info(input: &mut Input) -> DeviceInfo {
    let mask = input.u8();
    let temperature = (mask & 1 != 0).then(|| Temperature {
        deci_kelvin: match input.u8() % 6 {
            0 => 0,
            1 => u32::MAX,
            2 => 3150,
            3 => 2732 + u32::from(input.u8()),
            _ => input.u32(),
        },
    });
    let voltage = (mask & 2 != 0).then(|| Voltage {
        millivolts: match input.u8() % 5 {
            0 => 0,
            1 => u32::MAX,
            2 => 3250,
            3 => 2900 + u32::from(input.u16() % 800),
            _ => input.u32(),
        },
    });
    let fips = (mask & 4 != 0).then(|| Fips {
        blocks: input.u32_edgy(1000),
        failures: input.u32_edgy(0),
        monobit: input.u32(),
        poker: input.u32(),
        runs: input.u32(),
    });
    let shannon = (mask & 8 != 0).then(|| Shannon {
        raw_bytes: input.u32(),
        left: input.u32(),
        right: input.u32(),
        xor: input.u32(),
        debiased_left_bytes: input.u32(),
        debiased_left: input.u32(),
        debiased_right_bytes: input.u32(),
        debiased_right: input.u32(),
        failure: FailureMode::from_char(match input.u8() % 4 {
            0 | 1 => b'0',
            _ => input.u8(),
        }),
    });
    DeviceInfo {
        temperature,
        voltage,
        fips,
        shannon,
    }
}

fn arbitrary_config(input: &mut Input) -> GateConfig {
    let d = GateConfig::default();
    if input.u8().is_multiple_of(4) {
        return d;
    }
    GateConfig {
        failure_window: input.u16_edgy(d.failure_window),
        max_failures: input.u16_edgy(d.max_failures),
        reopen_after: input.u32_edgy(d.reopen_after),
        rct_cutoff: input.u32_edgy(d.rct_cutoff),
        apt_window: input.u32_edgy(d.apt_window),
        apt_cutoff: input.u32_edgy(d.apt_cutoff),
        device_fips_window: input.u32_edgy(d.device_fips_window),
        device_fips_max_failures: input.u32_edgy(d.device_fips_max_failures),
        temperature_warn: input.limits(d.temperature_warn),
        temperature_close: input.limits(d.temperature_close),
        voltage_warn: input.limits(d.voltage_warn),
        voltage_close: input.limits(d.voltage_close),
        // The model has no estimator: the floor stays off.
        min_entropy_floor_millibits: d.min_entropy_floor_millibits,
    }
}

/// Pushes one block into both, and checks the verdict and what follows.
fn push(gate: &mut Gate, model: &mut Model, data: &[u8; 32]) {
    let was_open = gate.is_open();
    let report = gate.push(data);
    let verdict = model.push(data);
    match (report, verdict) {
        (None, None) => {}
        (Some(report), Some((bytes, continuous_ok, rct_ok, apt_ok))) => {
            let block: &[u8; FIPS_BLOCK_BYTES] = bytes.as_slice().try_into().unwrap();
            assert_eq!(report.fips, fips_140_2(block), "FIPS statistics");
            assert_eq!(report.continuous_ok, continuous_ok, "continuous test");
            assert_eq!(report.rct_ok, rct_ok, "repetition count test");
            assert_eq!(report.apt_ok, apt_ok, "adaptive proportion test");
            let passed = report.fips.passed() && continuous_ok && rct_ok && apt_ok;
            assert_eq!(report.passed(), passed);

            model.tested += 1;
            model.failed += u64::from(!passed);
            model.monobit += u64::from(!report.fips.monobit_ok);
            model.poker += u64::from(!report.fips.poker_ok);
            model.runs += u64::from(!report.fips.runs_ok);
            model.long_run += u64::from(!report.fips.long_run_ok);
            model.continuous += u64::from(!continuous_ok);
            model.rct_failures += u64::from(!rct_ok);
            model.apt_failures += u64::from(!apt_ok);

            // The policy.
            let immediate = !(continuous_ok && rct_ok && apt_ok);
            if model.open {
                model.window.push_back(!passed);
                if model.window.len() > model.window_len {
                    model.window.pop_front();
                }
                let failures = model.window.iter().filter(|&&f| f).count();
                let max = usize::from(model.config.max_failures);
                if immediate || (max > 0 && failures >= max) {
                    assert!(!passed, "closed on a passing block");
                    model.close();
                }
            } else if !passed {
                model.clean = 0;
            } else if !model.condition() {
                model.clean += 1;
                if model.clean >= model.reopen_after {
                    model.open = true;
                    model.clean = 0;
                    model.window.clear();
                }
            }
            assert_eq!(gate.is_open(), model.open, "open after a tested block");

            let room = model.out.len() + FIPS_BLOCK_BYTES <= OUTPUT_CAPACITY;
            let release = passed && was_open && model.open;
            assert_eq!(report.released, release && room, "released");
            if report.released {
                model.out.extend(bytes.iter());
            } else {
                model.discarded += FIPS_BLOCK_BYTES as u64;
                if release {
                    model.overflowed += FIPS_BLOCK_BYTES as u64;
                }
            }
        }
        (report, verdict) => panic!(
            "tested a block out of step: gate {} model {}",
            report.is_some(),
            verdict.is_some()
        ),
    }
}

fn pop(gate: &mut Gate, model: &mut Model) -> bool {
    let got = gate.pop_released();
    if model.out.len() < 32 {
        assert!(got.is_none(), "popped bytes that were not released");
        return false;
    }
    let got = got.expect("released bytes not popped");
    let want: Vec<u8> = model.out.drain(..32).collect();
    assert_eq!(&got[..], &want[..], "popped bytes out of order");
    model.popped += 32;
    true
}

fn check(gate: &Gate, model: &Model) {
    let s = gate.status();
    let c = s.counters;
    assert_eq!(
        c.bytes_received,
        c.bytes_released + c.bytes_discarded + c.bytes_pending + c.bytes_buffered,
        "bytes do not add up: {c:?}"
    );
    assert_eq!(c.bytes_received, 32 * model.pushes);
    assert_eq!(c.bytes_released, model.popped);
    assert_eq!(c.bytes_pending, model.block.len() as u64);
    assert_eq!(c.bytes_buffered, model.out.len() as u64);
    assert_eq!(c.bytes_discarded, model.discarded);
    assert_eq!(c.bytes_overflowed, model.overflowed);
    assert!(c.bytes_overflowed <= c.bytes_discarded);
    assert_eq!(c.blocks_tested, model.tested);
    assert_eq!(c.blocks_failed, model.failed);
    assert_eq!(c.monobit_failures, model.monobit);
    assert_eq!(c.poker_failures, model.poker);
    assert_eq!(c.runs_failures, model.runs);
    assert_eq!(c.long_run_failures, model.long_run);
    assert_eq!(c.continuous_failures, model.continuous);
    assert_eq!(c.rct_failures, model.rct_failures);
    assert_eq!(c.apt_failures, model.apt_failures);
    assert_eq!(c.times_closed, model.times_closed);

    assert_eq!(s.open, gate.is_open());
    assert_eq!(s.open, model.open);
    assert_eq!(s.reason.is_none(), s.open, "a reason exactly while closed");
    if !s.open {
        assert_eq!(c.bytes_buffered, 0, "output held while closed");
    }
    assert_eq!(s.condition_active, model.condition());
    if s.condition_active {
        assert!(!s.open, "open with a device condition");
        assert!(
            matches!(
                s.reason,
                Some(
                    CloseReason::DeviceFailure(_)
                        | CloseReason::DeviceFipsRate { .. }
                        | CloseReason::Temperature { .. }
                        | CloseReason::Voltage { .. }
                )
            ),
            "condition held but reason is {:?}",
            s.reason
        );
    }
    if !s.open {
        assert_eq!(s.clean_blocks, model.clean);
    }
    if s.open {
        let failures = model.window.iter().filter(|&&f| f).count();
        assert_eq!(usize::from(s.failures_in_window), failures);
    }

    let cfg = &model.config;
    let w = s.warnings;
    match model.temperature {
        Some(t) => {
            assert_eq!(w.temperature_low, t < cfg.temperature_warn.min);
            assert_eq!(w.temperature_high, t > cfg.temperature_warn.max);
        }
        None => assert!(!w.temperature_low && !w.temperature_high),
    }
    match model.voltage {
        Some(v) => {
            assert_eq!(w.voltage_low, v < cfg.voltage_warn.min);
            assert_eq!(w.voltage_high, v > cfg.voltage_warn.max);
        }
        None => assert!(!w.voltage_low && !w.voltage_high),
    }
}

/// Formatting never panics either.
fn format(gate: &Gate) {
    let s = gate.status();
    let _ = format!("{gate:?} {}", s.warnings);
    if let Some(r) = s.reason {
        let _ = r.to_string();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let config = arbitrary_config(&mut input);
    let mut gate = Gate::new(config);
    let mut model = Model::new(config);
    assert_eq!(gate.config().failure_window as usize, model.window_len);
    assert_eq!(gate.config().reopen_after, model.reopen_after);
    let mut pushes = 0usize;
    let mut last = [0u8; 32];
    check(&gate, &model);

    while !input.is_empty() && pushes < MAX_PUSHES {
        let op = input.u8();
        // Bit 7: pop everything after each push of this step.
        let drain = op & 0x80 != 0;
        let mut blocks: Vec<[u8; 32]> = Vec::new();
        match op % 8 {
            0 => blocks.push(input.bytes()),
            1 => {
                // A long run of well-mixed blocks: passes, re-opens.
                let n = usize::from(input.u16()) % 12_000;
                let mut mix = Mix(u64::from(input.u32()));
                blocks.extend((0..n).map(|_| mix.block()));
            }
            2 => {
                // A long run of one block: continuous and RCT failures.
                let n = usize::from(input.u16()) % 2_000;
                let b = if input.u8() & 1 == 0 {
                    last
                } else {
                    input.bytes()
                };
                blocks.extend(std::iter::repeat_n(b, n));
            }
            3 => {
                // Biased bytes: fails FIPS without an immediate alarm.
                let n = usize::from(input.u16()) % 4_000;
                let mut mix = Mix(u64::from(input.u32()));
                let bias = input.u8();
                blocks.extend((0..n).map(|_| {
                    let mut a = mix.block();
                    let b = mix.block();
                    for (x, y) in a.iter_mut().zip(b) {
                        *x |= y & bias;
                    }
                    a
                }));
            }
            4 => {
                for _ in 0..=input.u8() {
                    pop(&mut gate, &mut model);
                    check(&gate, &model);
                }
            }
            5 => {
                while pop(&mut gate, &mut model) {}
                check(&gate, &model);
            }
            _ => {
                let info = arbitrary_info(&mut input);
                let was_open = gate.is_open();
                gate.observe(&info);
                model.observe(&info);
                assert!(was_open || !gate.is_open(), "a report opened the gate");
                check(&gate, &model);
                format(&gate);
            }
        }
        for b in blocks {
            if pushes >= MAX_PUSHES {
                break;
            }
            pushes += 1;
            last = b;
            push(&mut gate, &mut model, &b);
            if drain {
                while pop(&mut gate, &mut model) {}
            }
            check(&gate, &model);
        }
    }
    while pop(&mut gate, &mut model) {}
    check(&gate, &model);
    format(&gate);
});
