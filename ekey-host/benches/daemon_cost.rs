//! What the daemon costs while it drains a software key paced at the real
//! key's rate (about 4 kB/s): CPU time and peak RSS of `ekey-host run`,
//! measured from /proc over a fixed window.
//!
//! `cargo bench -p ekey-host --bench daemon_cost`
//!
//! Environment: `EKEY_BENCH_SECS` (window length, default 60) and
//! `EKEY_BENCH_RATE` (the software key's rate in bytes/s, default 4000),
//! `EKEY_BENCH_DAEMON` (the binary run as the daemon; default the one cargo
//! just built, so the README's static build is measured with
//! `cargo build-static` and
//! `EKEY_BENCH_DAEMON=$PWD/target/x86_64-unknown-linux-musl/release/ekey-host`;
//! the path must be absolute, as benches run in the package folder).
//!
//! The key is `ekey-host emulate --unix`, a separate process, so the
//! daemon pays for the socket reads, frame decoding, MACs, the FIPS tests
//! and the output writes, but not for generating the key's bytes; the
//! emulator's own CPU time is reported separately, for information.
//! Linux only (/proc).

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::{BIN, Guard, KEYRING, env_or, thousands, wait_until_running};

const TARGET_CPU_PERCENT: f64 = 0.25;
const VENDOR_CPU_PERCENT: f64 = 0.52;
const TARGET_RSS_MIB: f64 = 2.66;
const VENDOR_RSS_MIB: f64 = 2.66;
const TARGET_WAKEUPS_PER_SECOND: f64 = 5.0;
const VENDOR_WAKEUPS_PER_SECOND: f64 = 126.0;

/// CPU time of a whole process (all threads), in clock ticks, from
/// /proc/PID/stat: utime + stime (fields 14 and 15).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // The command name (field 2) is in parentheses and may hold spaces;
    // everything after the last ')' is space-separated, starting at field 3.
    let rest = &stat[stat.rfind(')').expect("/proc/PID/stat has no ')'") + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> u64 {
        fields[n - 3]
            .parse()
            .unwrap_or_else(|e| panic!("/proc/{pid}/stat field {n}: {e}"))
    };
    field(14) + field(15)
}

/// A `kB` line of /proc/PID/status (VmHWM, VmRSS, ...), in bytes.
fn status_kib(pid: u32, key: &str) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no {key}"))
        * 1024
}

/// On-CPU time of a whole process (all threads) in nanoseconds, from the
/// scheduler's own accounting (/proc/PID/task/*/schedstat, first field).
/// Unlike utime+stime, which the kernel may sample at each clock tick, this
/// is exact; 0 if schedstat is unavailable.
fn sched_ns(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Context switches (voluntary + involuntary) over all the process's
/// threads: roughly how often it wakes up.
fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        for line in status.lines() {
            if let Some(v) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += v.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    total
}

/// Clock ticks per second for /proc/PID/stat, from `getconf CLK_TCK`;
/// 100 (the value on every mainstream Linux) if that fails.
fn clock_ticks_per_second() -> (u64, &'static str) {
    Command::new("getconf")
        .arg("CLK_TCK")
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok()?.trim().parse().ok())
        .filter(|&hz: &u64| hz > 0)
        .map_or((100, "assumed; getconf CLK_TCK failed"), |hz| {
            (hz, "getconf CLK_TCK")
        })
}

/// How many threads the process has now (/proc/PID/task).
fn thread_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.flatten().count())
}

/// Where the process's resident memory is now, from /proc/PID/smaps, in
/// bytes: (the ekey-host binary, other files (libc, ld.so), the heap,
/// other anonymous memory (thread stacks, mmap'd arenas, the main stack)).
fn rss_by_kind(pid: u32) -> (u64, u64, u64, u64) {
    let Ok(smaps) = fs::read_to_string(format!("/proc/{pid}/smaps")) else {
        return (0, 0, 0, 0);
    };
    let (mut bin, mut files, mut heap, mut anon) = (0, 0, 0, 0);
    let mut kind = 3;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            // A mapping's header: range perms offset dev inode [path].
            let path = words.nth(4).unwrap_or("");
            kind = if path.ends_with("/ekey-host") || path.contains("/deps/ekey_host-") {
                0
            } else if path.starts_with('/') {
                1
            } else if path == "[heap]" {
                2
            } else {
                3
            };
        } else if first == "Rss:" {
            let kib: u64 = words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match kind {
                0 => bin += kib * 1024,
                1 => files += kib * 1024,
                2 => heap += kib * 1024,
                _ => anon += kib * 1024,
            }
        }
    }
    (bin, files, heap, anon)
}

fn file_len(path: &Path) -> u64 {
    fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn main() {
    let secs: f64 = env_or("EKEY_BENCH_SECS", 60.0);
    let rate: u32 = env_or("EKEY_BENCH_RATE", 4000);
    assert!(secs > 0.0, "EKEY_BENCH_SECS must be positive");
    let (hz, hz_source) = clock_ticks_per_second();

    // Declared before the guards, so it is removed after they are dropped.
    let dir = tempfile::tempdir().expect("cannot create a temp dir");
    let keyring = dir.path().join("keyring");
    fs::write(&keyring, KEYRING).expect("cannot write the keyring");
    let output: PathBuf = dir.path().join("out.bin");
    let control = dir.path().join("ctl");
    let daemon_log = dir.path().join("daemon.log");

    let (mut emulator, socket, emu_log) = common::start_emulator(dir.path(), rate);

    let daemon_bin =
        std::env::var_os("EKEY_BENCH_DAEMON").map_or_else(|| PathBuf::from(BIN), PathBuf::from);
    let mut daemon = Guard::spawn(
        "the daemon",
        Command::new(&daemon_bin)
            .arg("run")
            .arg("--device")
            .arg(&socket)
            .arg("--keyring")
            .arg(&keyring)
            .arg("--output")
            .arg(&output)
            .arg("--control")
            .arg(&control)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&daemon_log).expect("cannot create the daemon log")),
    );
    wait_until_running(&control, &mut daemon, &daemon_log, Duration::from_secs(20));

    // The measurement window: nothing talks to the daemon in between.
    let (dpid, epid) = (daemon.pid(), emulator.pid());
    let start = Instant::now();
    let (d_cpu0, e_cpu0) = (cpu_ticks(dpid), cpu_ticks(epid));
    let (d_ns0, e_ns0) = (sched_ns(dpid), sched_ns(epid));
    let d_cs0 = context_switches(dpid);
    let bytes0 = file_len(&output);
    thread::sleep(Duration::from_secs_f64(secs));
    daemon.assert_alive(&daemon_log);
    emulator.assert_alive(&emu_log);
    let (d_cpu1, e_cpu1) = (cpu_ticks(dpid), cpu_ticks(epid));
    let (d_ns1, e_ns1) = (sched_ns(dpid), sched_ns(epid));
    let d_cs1 = context_switches(dpid);
    let bytes1 = file_len(&output);
    let wall = start.elapsed().as_secs_f64();
    let d_hwm = status_kib(dpid, "VmHWM");
    let d_rss = status_kib(dpid, "VmRSS");
    let e_hwm = status_kib(epid, "VmHWM");
    let threads = thread_count(dpid);
    let (rss_bin, rss_files, rss_heap, rss_anon) = rss_by_kind(dpid);

    let ticks = |t: u64| t as f64 / hz as f64;
    let d_cpu = ticks(d_cpu1 - d_cpu0);
    let e_cpu = ticks(e_cpu1 - e_cpu0);
    let d_pct = 100.0 * d_cpu / wall;
    let e_pct = 100.0 * e_cpu / wall;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let delivered = bytes1 - bytes0;
    let delivered_rate = delivered as f64 / wall;
    let wakeups = (d_cs1 - d_cs0) as f64 / wall;
    let sched_pct = |ns0: u64, ns1: u64| 100.0 * (ns1 - ns0) as f64 / 1e9 / wall;

    let verdict = |ok: bool| if ok { "" } else { "  MISSED" };
    println!("daemon_cost: {wall:.1} s at {rate} B/s (software key on a Unix socket)");
    println!("  daemon     {}", daemon_bin.display());
    println!(
        "  cpu        {d_cpu:.3} s  = {d_pct:.3} % of one core   \
         (target <= {TARGET_CPU_PERCENT} %; vendor ekeyd {VENDOR_CPU_PERCENT} %){}",
        verdict(d_pct <= TARGET_CPU_PERCENT)
    );
    println!(
        "  peak RSS   {:.2} MiB                          \
         (target <= {TARGET_RSS_MIB} MiB; vendor ekeyd {VENDOR_RSS_MIB} MiB){}",
        mib(d_hwm),
        verdict(mib(d_hwm) <= TARGET_RSS_MIB)
    );
    println!(
        "  delivered  {} kB  ({} B/s = {:.1} % of the key's rate)",
        delivered / 1000,
        thousands(delivered_rate.round() as u64),
        100.0 * delivered_rate / f64::from(rate.max(1))
    );
    println!(
        "  wakeups    {wakeups:.1} context switches/s (all threads)  \
         (target <= {TARGET_WAKEUPS_PER_SECOND}; vendor ekeyd {VENDOR_WAKEUPS_PER_SECOND}){}",
        verdict(wakeups <= TARGET_WAKEUPS_PER_SECOND)
    );
    println!("  threads    {threads}");
    println!(
        "  (info) daemon RSS now {:.2} MiB: binary {:.2}, shared libraries (libc, ld.so, libgcc_s) {:.2}, \
         heap {:.2}, other anonymous (stacks, arenas) {:.2}",
        mib(d_rss),
        mib(rss_bin),
        mib(rss_files),
        mib(rss_heap),
        mib(rss_anon)
    );
    println!(
        "  (info) clock {hz} ticks/s ({hz_source}), so CPU resolution {:.3} s",
        1.0 / hz as f64
    );
    println!(
        "  (info) scheduler's exact on-CPU time: daemon {:.3} s = {:.3} %",
        (d_ns1 - d_ns0) as f64 / 1e9,
        sched_pct(d_ns0, d_ns1)
    );
    println!(
        "  (info) emulator, not the daemon: cpu {e_cpu:.3} s = {e_pct:.3} % of one core \
         (scheduler: {:.3} %), peak RSS {:.2} MiB",
        sched_pct(e_ns0, e_ns1),
        mib(e_hwm)
    );

    drop(daemon);
    drop(emulator);
}
