//! The `ekey-host` command line: `run`, `read`, `emulate`.

use std::collections::BTreeSet;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::control;
use crate::driver::{self, Block, Ended, KeyStatus, SharedStatus};
use crate::egd;
use crate::kernel;
use crate::keyring::{self, Keyring};
use crate::metrics;
use crate::soft::{self, DEMO_SERIAL, SoftKey, demo_long_term_key};
use crate::status;
use crate::transport::{self, Link};
use crate::usb;
use clap::{Args, Parser, Subcommand};
use ekey_proto::device::DeviceConfig;
use ekey_proto::health::{GateConfig, Limits};
use ekey_proto::host::{Config, Event, State};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::rekey::parse_master_key;
use tokio::io::AsyncWriteExt;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    name = "ekey-host",
    version,
    about = "Driver and daemon for the Simtec Entropy Key (USB 20df:0001)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct KeySources {
    /// A key on a tty (/dev/ttyACM0, /dev/entropykey/*) or a Unix socket
    /// (ekey-ulusbd, `ekey-host emulate --unix`). Repeatable.
    #[arg(long = "device", value_name = "PATH")]
    devices: Vec<PathBuf>,
    /// Use the built-in software key (demo keys; its bytes come from the
    /// OS generator, not from hardware noise).
    #[arg(long)]
    emulate: bool,
    /// The keyring of long-term keys, in ekeyd's format.
    #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH)]
    keyring: PathBuf,
    /// Entropy rate of the built-in software key, bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = 4000)]
    rate: u32,
    /// With --emulate: append every block the built-in key sends to this
    /// file (mode 0600), in order, so that what came out can be traced.
    #[arg(long, value_name = "FILE", requires = "emulate")]
    record: Option<PathBuf>,
    #[command(flatten)]
    health: HealthArgs,
}

/// Bounds of the health gate (the rest of its policy is fixed and
/// documented in `ekey_proto::health`).
#[derive(Args, Clone)]
struct HealthArgs {
    /// Warn when a key's core temperature leaves this range (°C).
    #[arg(long, value_name = "MIN:MAX", default_value = "0:70")]
    temperature_warn: String,
    /// Close the health gate when a key's core temperature leaves this
    /// range (°C).
    #[arg(long, value_name = "MIN:MAX", default_value = "-20:85")]
    temperature_limit: String,
    /// Warn when a key's supply voltage leaves this range (V).
    #[arg(long, value_name = "MIN:MAX", default_value = "3.135:3.465")]
    voltage_warn: String,
    /// Close the health gate when a key's supply voltage leaves this range
    /// (V).
    #[arg(long, value_name = "MIN:MAX", default_value = "2.97:3.63")]
    voltage_limit: String,
}

impl HealthArgs {
    /// The gate's configuration: the documented defaults with these bounds.
    fn gate_config(&self) -> Result<GateConfig, String> {
        let range = |flag: &str, v: &str| -> Result<Limits, String> {
            let bad = || format!("--{flag} {v}: give MIN:MAX, e.g. 0:70");
            let (lo, hi) = v.split_once(':').ok_or_else(bad)?;
            let lo: f64 = lo.trim().parse().map_err(|_| bad())?;
            let hi: f64 = hi.trim().parse().map_err(|_| bad())?;
            if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
                return Err(format!("--{flag} {v}: MIN must not be above MAX"));
            }
            Ok(Limits {
                min: (lo * 1000.0).round() as i64,
                max: (hi * 1000.0).round() as i64,
            })
        };
        let config = GateConfig {
            temperature_warn: range("temperature-warn", &self.temperature_warn)?,
            temperature_close: range("temperature-limit", &self.temperature_limit)?,
            voltage_warn: range("voltage-warn", &self.voltage_warn)?,
            voltage_close: range("voltage-limit", &self.voltage_limit)?,
            ..GateConfig::default()
        };
        Ok(config)
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: keep every key keyed and healthy and write verified
    /// entropy to the outputs.
    Run {
        #[command(flatten)]
        keys: KeySources,
        #[command(flatten)]
        outputs: Box<Outputs>,
    },
    /// List the Entropy Keys on USB, and whether the keyring has their keys.
    List {
        /// The keyring of long-term keys.
        #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH)]
        keyring: PathBuf,
    },
    /// Ask the running daemon how its keys are doing.
    Status {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
        /// The daemon's control socket.
        #[arg(long, value_name = "PATH", default_value = control::DEFAULT_PATH)]
        control: PathBuf,
    },
    /// Read exactly N verified bytes, like `dd`: from the key found (with
    /// several, their blocks in the order they arrive).
    Read {
        /// How many bytes.
        #[arg(short = 'n', value_name = "BYTES")]
        count: u64,
        /// Where to (default: stdout).
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
        #[command(flatten)]
        keys: KeySources,
        /// Give up after this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 30)]
        timeout: u64,
    },
    /// Expose a software key to other programs, on a pty, a Unix socket or
    /// an existing tty (a USB gadget's port).
    Emulate(EmulateArgs),
    /// Run the health tests (FIPS 140-2, continuous, SP 800-90B) on fresh
    /// output of the keys and print a report; exit status 0 if every key
    /// passed, 1 if not.
    Test {
        /// How many 20,000-bit blocks to test per key.
        #[arg(
            short = 'n',
            long = "blocks",
            value_name = "BLOCKS",
            default_value_t = 20,
            value_parser = clap::value_parser!(u64).range(1..=MAX_TEST_BLOCKS)
        )]
        blocks: u64,
        #[command(flatten)]
        keys: KeySources,
        /// Give up after this many seconds (default: 30 + 2 per block).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u64>,
    },
    /// Keep this machine's kernel fed from an EGD server (a guest without
    /// virtio-rng, fed by the host's `run --egd-tcp`).
    Feed(crate::feed::FeedArgs),
    /// Set a key's long-term key with the master key printed on its card,
    /// and store it in the keyring.
    Rekey(RekeyArgs),
    /// Look after the keyring: `list`, `check`, `remove SERIAL`.
    Keyring {
        #[command(subcommand)]
        action: KeyringAction,
        /// The keyring file.
        #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH, global = true)]
        keyring: PathBuf,
    },
}

/// Where `run` sends verified entropy. Every block goes to exactly one
/// output (never the same bytes to two consumers).
#[derive(Args, Clone, Default)]
struct Outputs {
    /// Write verified entropy to this file, or `-` for stdout.
    #[arg(long, short, value_name = "FILE|-")]
    output: Option<PathBuf>,
    /// Stop after this many bytes have been written to --output (with no
    /// output at all: after this many bytes from the keys). Bytes served
    /// over EGD or given to the kernel do not count.
    #[arg(long, value_name = "BYTES")]
    limit: Option<u64>,
    /// The control socket `ekey-host status` asks (mode 0600).
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Serve EGD clients (QEMU's rng-egd, ...) on this TCP address;
    /// `PORT` alone binds 127.0.0.1.
    #[arg(long, value_name = "ADDR:PORT")]
    egd_tcp: Option<String>,
    /// Serve EGD clients on this Unix socket.
    #[arg(long, value_name = "PATH")]
    egd_unix: Option<PathBuf>,
    /// Mode of the EGD Unix socket, octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    egd_mode: String,
    /// Group (numeric id) of the EGD Unix socket.
    #[arg(long, value_name = "GID")]
    egd_group: Option<u32>,
    /// Most bytes per second each EGD client gets (so one guest cannot
    /// drain the host); unlimited by default.
    #[arg(long, value_name = "BYTES/S")]
    egd_rate: Option<u32>,
    /// Most EGD clients at once. When all slots are taken, an idle
    /// connection of the peer holding the most may be closed for a
    /// newcomer holding fewer (QEMU: use `reconnect=`).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    egd_max_clients: u32,
    /// Most EGD connections one peer may hold: one source address for
    /// TCP, one user id for the Unix socket.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    egd_max_per_peer: u32,
    /// Serve only TCP clients from this network (CIDR such as
    /// 10.0.0.0/8, or one address); repeatable. Default: anyone who can
    /// reach the port.
    #[arg(long, value_name = "CIDR", value_parser = parse_allow_net)]
    egd_allow: Vec<ipnet::IpNet>,
    /// Serve only Unix-socket clients of this user id; repeatable.
    #[arg(long, value_name = "UID")]
    egd_allow_uid: Vec<u32>,
    /// Serve only Unix-socket clients whose primary group is this gid;
    /// repeatable.
    #[arg(long, value_name = "GID")]
    egd_allow_gid: Vec<u32>,
    /// Share weight of one listener's clients under scarcity
    /// (`tcp=W` or `unix=W`, W in 1..=1000, default 1 each); repeatable.
    #[arg(long, value_name = "KIND=WEIGHT", value_parser = parse_share)]
    egd_share: Vec<(String, u32)>,
    /// Feed the kernel's pool (RNDADDENTROPY on /dev/random, needs
    /// CAP_SYS_ADMIN), crediting this many bits per byte (0..8; 0 mixes
    /// the bytes in without credit).
    #[arg(long, value_name = "BITS_PER_BYTE", num_args = 0..=1, default_missing_value = "7")]
    kernel: Option<u8>,
    /// Once the kernel's generator is ready: mix in 64 bytes this often
    /// (e.g. 10s, 500ms, 2m; a bare number is seconds). Before that, the
    /// key's full rate goes to the kernel.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::feed::parse_duration)]
    kernel_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics; `PORT` alone
    /// binds 127.0.0.1.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<String>,
    /// Tell systemd (Type=notify) the daemon is ready at once, instead of
    /// when the first key is keyed.
    #[arg(long)]
    no_wait: bool,
    /// `test`: stop once every key's gate has tested this many blocks.
    #[arg(skip)]
    test_blocks: Option<u64>,
}

#[derive(Subcommand)]
enum KeyringAction {
    /// The serials in the keyring, and whether each key is attached now
    /// (never the keys themselves).
    List,
    /// Parse the keyring; report bad lines and loose permissions.
    Check,
    /// Remove a key's entry.
    Remove {
        /// The key's serial (16 PEM64 characters).
        serial: String,
    },
}

#[derive(Args)]
struct RekeyArgs {
    /// The key on this tty or Unix socket (default: the key on USB).
    #[arg(long, value_name = "PATH", conflicts_with = "serial")]
    device: Option<PathBuf>,
    /// The key on USB with this serial (needed when several are attached).
    #[arg(long, value_name = "PEM16")]
    serial: Option<String>,
    /// The master key as printed on the key's card (spaces and dashes are
    /// ignored). Other users can read a command line (ps): prefer
    /// --master-key-file or the prompt. Without either it is asked for.
    #[arg(long, value_name = "KEY", conflicts_with = "master_key_file")]
    master_key: Option<String>,
    /// Read the master key from this file; `-` reads it from standard input
    /// (e.g. from a password manager through a pipe).
    #[arg(long, value_name = "FILE")]
    master_key_file: Option<PathBuf>,
    /// The keyring to update.
    #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH)]
    keyring: PathBuf,
    /// Do not touch a keyring: print the new long-term key to stdout.
    #[arg(long)]
    no_keyring: bool,
    /// The running daemon's control socket (to make it let go of the key).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_PATH)]
    control: PathBuf,
    /// Tests only: the 12-byte nonce, in hex.
    #[arg(long, value_name = "HEX", hide = true)]
    nonce: Option<String>,
}

#[derive(Args)]
struct EmulateArgs {
    /// Create a pseudo-terminal and print its path.
    #[arg(long, conflicts_with_all = ["unix", "tty"])]
    pty: bool,
    /// Listen on this Unix socket (one client at a time).
    #[arg(long, value_name = "PATH", conflicts_with = "tty")]
    #[arg(required_unless_present_any = ["pty", "tty"])]
    unix: Option<PathBuf>,
    /// Serve on this existing tty (e.g. a USB gadget's /dev/ttyGS0),
    /// reopening it when the other side hangs up.
    #[arg(long, value_name = "PATH")]
    tty: Option<PathBuf>,
    /// Serial number (16 PEM64 characters).
    #[arg(long, value_name = "PEM16", default_value_t = DEMO_SERIAL.to_string())]
    serial: String,
    /// Long-term key (44 PEM64 characters); default: the demo key.
    #[arg(long, value_name = "PEM44")]
    long_term_key: Option<String>,
    /// Master key as printed on a card, for long-term re-keying;
    /// default: the demo master key.
    #[arg(long, value_name = "PRINTED")]
    master_key: Option<String>,
    /// Entropy rate, bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = 4000)]
    rate: u32,
    /// Write every plaintext block sent to this file (mode 0600), in order.
    #[arg(long, value_name = "FILE")]
    record: Option<PathBuf>,
    /// Tests only: bytes (hex) the key's noise source yields first.
    #[arg(long, value_name = "HEX", hide = true)]
    noise_prefix: Option<String>,
    /// Test faults: corrupt the MAC of every Nth frame.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    fault_corrupt_every: u64,
    /// Test faults: garbage before every Nth frame.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    fault_garbage_every: u64,
    /// Test faults: send every Nth entropy frame twice.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    fault_replay_every: u64,
    /// Test faults: report this failure mode (e.g. 3) from the start.
    #[arg(long, value_name = "CHAR", hide = true)]
    fault_failure_mode: Option<char>,
    /// Test faults: bad noise (stuck[=HEX], biased, repeat).
    #[arg(long, value_name = "KIND", hide = true)]
    fault_noise: Option<soft::NoiseFault>,
    /// Test faults: report this core temperature (tenths of a kelvin).
    #[arg(long, value_name = "DECI_KELVIN", hide = true)]
    fault_temperature: Option<u32>,
    /// Tests only: noise from ChaCha20 with this seed (64 hex digits), so
    /// that the stream is known in advance.
    #[arg(long, value_name = "HEX", hide = true)]
    noise_seed: Option<String>,
}

/// The log level from `EKEY_LOG` (`error`, `warn`, `info`, `debug`,
/// `trace`); `info` by default.
fn log_level() -> tracing::Level {
    std::env::var("EKEY_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

/// Runs the command line in `std::env::args()`; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .with_max_level(log_level())
        .init();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ekey-host: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.command {
            Command::Run { keys, outputs } => run(keys, *outputs, None).await,
            Command::Status { json, control } => status_command(json, &control).await,
            Command::List { keyring } => list_command(&keyring).await,
            Command::Read {
                count,
                output,
                keys,
                timeout,
            } => {
                let outputs = Outputs {
                    output: output.or_else(|| Some(PathBuf::from("-"))),
                    limit: Some(count),
                    ..Outputs::default()
                };
                run(keys, outputs, Some(Duration::from_secs(timeout))).await
            }
            Command::Test {
                blocks,
                keys,
                timeout,
            } => {
                let outputs = Outputs {
                    test_blocks: Some(blocks),
                    ..Outputs::default()
                };
                let timeout =
                    timeout.unwrap_or_else(|| blocks.saturating_mul(2).saturating_add(30));
                run(keys, outputs, Some(Duration::from_secs(timeout))).await
            }
            Command::Emulate(args) => emulate(args).await,
            Command::Feed(args) => crate::feed::main(args).await,
            Command::Rekey(args) => rekey_command(args).await,
            Command::Keyring { action, keyring } => keyring_command(action, &keyring).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ekey-host: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// The keyring lookups the sessions use; reloadable.
type SharedKeyring = Arc<RwLock<Keyring>>;

fn load_keyring(keys: &KeySources) -> Result<Keyring, String> {
    let explicit = keys.keyring.as_path() != Path::new(keyring::DEFAULT_PATH);
    let mut ring = match Keyring::load(&keys.keyring) {
        Ok(r) => r,
        Err(e) if keys.emulate && !explicit => {
            tracing::debug!("no keyring: {e}");
            Keyring::new()
        }
        // No keyring yet: keys get "no long-term key in keyring" until one
        // is written (`ekey-host rekey`) and the daemon reloads (SIGHUP).
        Err(keyring::KeyringError::Io { source, .. })
            if source.kind() == io::ErrorKind::NotFound =>
        {
            warn!(
                "keyring {} does not exist yet: keys will give no entropy until it has their long-term keys",
                keys.keyring.display()
            );
            Keyring::new()
        }
        Err(e) => return Err(e.to_string()),
    };
    if let Ok(Some(w)) = keyring::check_permissions(&keys.keyring) {
        warn!("{w}");
    }
    if keys.emulate && !ring.contains(&DEMO_SERIAL) {
        ring.set(DEMO_SERIAL, demo_long_term_key());
    }
    Ok(ring)
}

/// Why a key can give no entropy, if its state says so.
fn terminal_reason(state: State) -> Option<String> {
    match state {
        State::NoLongTermKey => Some("the key's serial has no long-term key in the keyring".into()),
        State::LongTermKeyRejected => Some(
            "the key rejected the long-term key in the keyring (wrong key for this serial)".into(),
        ),
        State::WrongSerial => Some("unexpected serial number".into()),
        State::Failed(mode) => Some(format!("the key is in a failure mode: {mode}")),
        _ => None,
    }
}

/// Where verified entropy goes: a file or stdout. A regular file is written
/// from the runtime (page-cache writes do not stall); a pipe, FIFO or
/// terminal gets a thread of its own, so that a stalled reader never stalls
/// the daemon.
struct Output {
    tx: mpsc::Sender<([u8; 32], usize)>,
    done: tokio::sync::oneshot::Receiver<io::Result<()>>,
    /// Bytes written (and flushed) so far.
    written: Arc<std::sync::atomic::AtomicU64>,
}

/// Writes one batch: the block given and every block already queued; then
/// flushes. Whole blocks only.
fn write_batch(
    w: &mut dyn Write,
    first: ([u8; 32], usize),
    rx: &mut mpsc::Receiver<([u8; 32], usize)>,
    written: &std::sync::atomic::AtomicU64,
) -> io::Result<()> {
    let (block, take) = first;
    w.write_all(&block[..take])?;
    let mut n = take as u64;
    while let Ok((b, t)) = rx.try_recv() {
        w.write_all(&b[..t])?;
        n += t as u64;
    }
    w.flush()?;
    written.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

fn open_output(output: Option<&Path>) -> Result<Option<Output>, String> {
    let (mut w, regular): (Box<dyn Write + Send>, bool) = match output {
        None => return Ok(None),
        Some(p) if p.as_os_str() == "-" => {
            let regular = std::fs::metadata("/dev/stdout").is_ok_and(|m| m.is_file());
            (Box::new(io::BufWriter::new(io::stdout())), regular)
        }
        Some(p) => {
            // Entropy is secret material: not readable by others.
            let f = create_private(p)?;
            let regular = f.metadata().is_ok_and(|m| m.is_file());
            (Box::new(io::BufWriter::with_capacity(64 * 32, f)), regular)
        }
    };
    let (tx, mut rx) = mpsc::channel::<([u8; 32], usize)>(64);
    let (done_tx, done) = tokio::sync::oneshot::channel();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = written.clone();
    if regular {
        tokio::spawn(async move {
            let mut result = Ok(());
            while let Some(first) = rx.recv().await {
                result = write_batch(&mut w, first, &mut rx, &count);
                if result.is_err() {
                    break;
                }
            }
            let _ = done_tx.send(result.and_then(|()| w.flush()));
        });
    } else {
        std::thread::Builder::new()
            .name("ekey-output".into())
            .spawn(move || {
                let mut result = Ok(());
                while let Some(first) = rx.blocking_recv() {
                    result = write_batch(&mut w, first, &mut rx, &count);
                    if result.is_err() {
                        break;
                    }
                }
                let _ = done_tx.send(result.and_then(|()| w.flush()));
            })
            .map_err(|e| format!("cannot start the output thread: {e}"))?;
    }
    Ok(Some(Output { tx, done, written }))
}

/// Creates (or truncates) `path` readable by its owner only: what goes in
/// is entropy. An existing regular file is made 0600 before anything is
/// written; a device or pipe (`/dev/stdout`, a FIFO) is left as it is.
fn create_private(path: &Path) -> Result<std::fs::File, String> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot inspect {}: {e}", path.display()))?;
    if meta.is_file() && meta.permissions().mode() & 0o077 != 0 {
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("cannot make {} private (chmod 600): {e}", path.display()))?;
    }
    Ok(file)
}

/// Every key's status, growing as keys are plugged in.
type SharedStatuses = Arc<Mutex<Vec<SharedStatus>>>;

/// How many times each key's health gate has closed, for the outputs (they
/// withdraw bytes released before the latest closing).
fn gate_closes(statuses: &SharedStatuses) -> driver::GateCloses {
    let statuses = statuses.clone();
    Arc::new(move |serial: &Serial| {
        let list = statuses.lock().unwrap_or_else(|p| p.into_inner());
        list.iter()
            .filter_map(|st| {
                let st = st.lock().unwrap_or_else(|p| p.into_inner());
                (st.serial == Some(*serial)).then_some(st.gate.counters.times_closed)
            })
            .max()
            .unwrap_or(0)
    })
}

fn snapshot(statuses: &SharedStatuses) -> Vec<KeyStatus> {
    statuses
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .collect()
}

/// The status entry for a key: a disconnected entry with the same serial
/// is reused (a re-plugged key keeps its history), else a new one.
fn add_status(
    statuses: &SharedStatuses,
    transport: String,
    serial: Option<&str>,
    gate: GateConfig,
) -> SharedStatus {
    let mut list = statuses.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(serial) = serial {
        for st in list.iter() {
            let mut g = st.lock().unwrap_or_else(|p| p.into_inner());
            if !g.connected && g.serial.is_some_and(|s| s.to_string() == serial) {
                g.transport = transport;
                return st.clone();
            }
        }
    }
    let mut fresh = KeyStatus::with_gate(transport, gate);
    // Until the key names itself, the serial its USB descriptor gives.
    fresh.serial = serial.and_then(|s| Serial::from_pem(s.as_bytes()).ok());
    let st = Arc::new(Mutex::new(fresh));
    list.push(st.clone());
    st
}

/// Drives a key on USB until it goes away; a key that stops answering
/// gets a USB port reset (it then re-enumerates and comes back through
/// hot-plug).
fn start_usb_key(info: nusb::DeviceInfo, ctx: &Ctx, statuses: &SharedStatuses, seen: &UsbSeen) {
    let id = info.id();
    if !seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .active
        .insert(id)
    {
        // Already driven (hot-plug and a rescan both saw it).
        return;
    }
    let seen = seen.clone();
    let status = add_status(
        statuses,
        usb::describe(&info),
        info.serial_number(),
        ctx.gate,
    );
    let mut ctx = ctx.clone();
    tokio::spawn(async move {
        let where_ = usb::describe(&info);
        loop {
            match usb::open(&info).await {
                Ok((mut link, dev)) => match drive_one(&mut link, &mut ctx, &status, true).await {
                    Ok(Ended::Unresponsive) => {
                        warn!("{where_}: key does not answer; resetting its USB port");
                        drop(link);
                        if let Err(e) = usb::reset(&dev).await {
                            warn!("{where_}: USB port reset failed: {e}");
                        }
                    }
                    Ok(Ended::Released) => {
                        // Let go (interface released) until the re-key is
                        // done, then take the key back.
                        drop(link);
                        drop(dev);
                        set_connected(&status, false);
                        info!("{where_}: key released for a re-key");
                        wait_until_resumed(&mut ctx, &status).await;
                        continue;
                    }
                    Ok(Ended::Closed) => info!("{where_}: key unplugged"),
                    Ok(Ended::OutputClosed) => {}
                    Err(e) => {
                        // An unplugged key's transfers fail with whatever
                        // the host controller makes of it; tell the two
                        // apart by whether the device is still there.
                        if still_listed(id, &e).await {
                            warn!("{where_}: the key stopped working: {e}");
                        } else {
                            info!("{where_}: key unplugged ({e})");
                        }
                    }
                },
                Err(e) => {
                    warn!("{e}");
                    // Not retried by the rescan (it would fail the same
                    // way every few seconds); a re-plug retries.
                    seen.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed
                        .insert(id);
                    if ctx.is_read {
                        let _ = ctx
                            .fail_tx
                            .send((where_.clone(), format!("cannot use the key: {e}")));
                    }
                }
            }
            break;
        }
        set_connected(&status, false);
        seen.lock()
            .unwrap_or_else(|p| p.into_inner())
            .active
            .remove(&id);
    });
}

/// Whether a USB key whose transfers failed with `e` is still attached.
///
/// nusb reports a disconnect as `ConnectionAborted`; other errors (a
/// host controller may first report `EPROTO`) come before the kernel has
/// removed the device, so the device list is asked for up to 2 s.
async fn still_listed(id: nusb::DeviceId, e: &io::Error) -> bool {
    if e.kind() == io::ErrorKind::ConnectionAborted {
        return false;
    }
    for _ in 0..10 {
        let listed = usb::list()
            .await
            .is_ok_and(|l| l.iter().any(|d| d.id() == id));
        if !listed {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    true
}

/// USB keys being driven, and those that could not be opened.
#[derive(Default)]
struct UsbSeenSets {
    active: std::collections::HashSet<nusb::DeviceId>,
    failed: std::collections::HashSet<nusb::DeviceId>,
}

type UsbSeen = Arc<Mutex<UsbSeenSets>>;

/// How often the daemon lists USB keys, besides hot-plug events: hot-plug
/// needs udev's events (no udevd in containers, initramfs or mdev systems),
/// and a key that re-enumerates after a port reset must come back anyway.
const USB_RESCAN: Duration = Duration::from_secs(5);

/// Waits until the key of `status` is no longer released.
async fn wait_until_resumed(ctx: &mut Ctx, status: &SharedStatus) {
    loop {
        let st = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !ctx.signals.is_released(&st) {
            return;
        }
        if ctx.signals.released.changed().await.is_err() {
            return;
        }
    }
}

/// What every key task shares.
#[derive(Clone)]
struct Ctx {
    gate: GateConfig,
    ring: SharedKeyring,
    tx: mpsc::Sender<Block>,
    fail_tx: mpsc::UnboundedSender<(String, String)>,
    signals: driver::Signals,
    is_read: bool,
    /// Told when a key starts running (systemd readiness without delay).
    keyed: Arc<tokio::sync::Notify>,
}

/// `run` and `read`: drive every key, write blocks to the output until the
/// limit (if any) or a signal.
async fn run(
    keys: KeySources,
    outputs: Outputs,
    read_timeout: Option<Duration>,
) -> Result<(), String> {
    let Outputs {
        output,
        limit,
        control,
        test_blocks,
        ..
    } = outputs.clone();
    let mut tested = false;
    let is_read = read_timeout.is_some();
    let statuses: SharedStatuses = Arc::new(Mutex::new(Vec::new()));
    let closes = gate_closes(&statuses);
    let (egd_tx, egd_stats, egd_unix_path) = start_egd(&outputs, closes.clone()).await?;
    if outputs.kernel.is_some() && keys.emulate {
        return Err(
            "--kernel with --emulate would credit the kernel with bytes from its own \
                    generator (the built-in software key's noise): refused"
                .into(),
        );
    }
    let (kernel_tx, kernel_stats) = start_kernel(&outputs, closes)?;
    let ring: SharedKeyring = Arc::new(RwLock::new(load_keyring(&keys)?));
    let mut out = open_output(output.as_deref())?;
    let (tx, mut rx) = mpsc::channel::<Block>(64);
    let (fail_tx, mut fail_rx) = mpsc::unbounded_channel::<(String, String)>();
    let (reload_tx, reload_rx) = tokio::sync::watch::channel(0u64);
    let (released_tx, released_rx) = tokio::sync::watch::channel(Arc::new(BTreeSet::new()));
    let keyed = Arc::new(tokio::sync::Notify::new());
    let mut gate = keys.health.gate_config()?;
    if let Some(bits) = outputs.kernel {
        // The SP 800-90B tests check the min-entropy we credit: cutoffs
        // for the credited bits per byte (α = 2⁻⁴⁰, W = 512; see
        // ekey_proto::health), the defaults being those for 7; for 6 or
        // fewer, those for 6 (stricter than such a credit needs).
        (gate.rct_cutoff, gate.apt_cutoff) = match bits {
            8 => (6, 19),
            7 => (7, 26),
            _ => (8, 35),
        };
    }
    let ctx = Ctx {
        gate,
        ring: ring.clone(),
        tx,
        fail_tx,
        signals: driver::Signals {
            reload: reload_rx,
            released: released_rx,
        },
        is_read,
        keyed: keyed.clone(),
    };

    for path in &keys.devices {
        let status = add_status(&statuses, path.display().to_string(), None, ctx.gate);
        tokio::spawn(keep_device(path.clone(), ctx.clone(), status));
    }
    if keys.emulate {
        let status = add_status(&statuses, "built-in software key".into(), None, ctx.gate);
        let (host_end, mut key_end) = tokio::io::duplex(4096);
        let slot = soft::slot_for_rate(keys.rate);
        info!(
            "software key {} (demo keys; bytes come from the OS generator, not from noise)",
            DEMO_SERIAL
        );
        let mut record: Option<Box<dyn Write + Send>> = match &keys.record {
            Some(p) => Some(Box::new(create_private(p)?)),
            None => None,
        };
        tokio::spawn(async move {
            let mut key = SoftKey::demo();
            let rec = record.as_deref_mut().map(|w| w as _);
            if let Err(e) = soft::serve(&mut key_end, &mut key, slot, rec).await {
                warn!("built-in software key: {e}");
            }
        });
        let mut ctx = ctx.clone();
        tokio::spawn(async move {
            let mut link: Link = Box::new(host_end);
            let _ = drive_one(&mut link, &mut ctx, &status, false).await;
        });
    }
    if keys.devices.is_empty() && !keys.emulate {
        // USB, the default: every key attached now, and (for the daemon)
        // every key plugged in later.
        let watch = if is_read {
            None
        } else {
            Some(usb::watch().map_err(|e| format!("cannot watch USB hot-plug events: {e}"))?)
        };
        let found = usb::list().await.map_err(|e| {
            format!("{e}; to use a key on a tty or socket give --device PATH, or --emulate for the built-in software key")
        })?;
        if found.is_empty() {
            if is_read {
                return Err("no key found: no Entropy Key (USB 20df:0001) is attached".into());
            }
            info!("no Entropy Key attached yet: waiting for one to be plugged in");
        }
        let seen = UsbSeen::default();
        for info in found {
            start_usb_key(info, &ctx, &statuses, &seen);
        }
        if let Some(mut watch) = watch {
            let (ctx2, statuses2, seen2) = (ctx.clone(), statuses.clone(), seen.clone());
            tokio::spawn(async move {
                let (ctx, statuses) = (ctx2, statuses2);
                while let Some(ev) = usb::next_event(&mut watch).await {
                    match ev {
                        usb::Hotplug::Arrived(info) => {
                            info!("key plugged in: {}", usb::describe(&info));
                            seen2
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .failed
                                .remove(&info.id());
                            start_usb_key(info, &ctx, &statuses, &seen2);
                        }
                        usb::Hotplug::Left(id) => {
                            seen2
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .failed
                                .remove(&id);
                        }
                    }
                }
            });
            let (ctx, statuses) = (ctx.clone(), statuses.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(USB_RESCAN);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let Ok(found) = usb::list().await else {
                        continue;
                    };
                    for info in found {
                        let known = {
                            let s = seen.lock().unwrap_or_else(|p| p.into_inner());
                            s.active.contains(&info.id()) || s.failed.contains(&info.id())
                        };
                        if !known {
                            info!("key found: {}", usb::describe(&info));
                            start_usb_key(info, &ctx, &statuses, &seen);
                        }
                    }
                }
            });
        }
    }
    let sources = statuses.lock().unwrap_or_else(|p| p.into_inner()).len();
    drop(ctx);

    let started = std::time::Instant::now();
    let mut bound_control: Option<PathBuf> = None;
    if !is_read {
        let path = control::path_or_default(control.clone());
        let listener = match control::bind(&path) {
            Ok(l) => Some(l),
            Err(e) if control.is_some() => {
                return Err(format!("control socket {}: {e}", path.display()));
            }
            Err(e) => {
                warn!(
                    "no control socket ({}: {e}); `ekey-host status` will not work",
                    path.display()
                );
                None
            }
        };
        if let Some(listener) = listener {
            bound_control = Some(path);
            let daemon = Daemon {
                statuses: statuses.clone(),
                started,
                ring: ring.clone(),
                keyring_path: keys.keyring.clone(),
                emulate: keys.emulate,
                reload_tx: reload_tx.clone(),
                released_tx,
                egd: egd_stats.clone(),
                kernel: kernel_stats.clone(),
                kernel_bits: outputs.kernel.unwrap_or(0),
            };
            tokio::spawn(serve_control(listener, daemon));
        }
    }

    if let Some(addr) = &outputs.metrics {
        let listener = egd::bind_tcp(addr)
            .await
            .map_err(|e| format!("--metrics {addr}: {e}"))?;
        if let Ok(a) = listener.local_addr() {
            info!("metrics on http://{a}/metrics");
        }
        let statuses = statuses.clone();
        let (egd, kernel) = (egd_stats.clone(), kernel_stats.clone());
        let file = out.as_ref().map(|o| o.written.clone());
        let kernel_bits_per_byte = outputs.kernel.unwrap_or(0);
        tokio::spawn(metrics::serve(listener, move || metrics::Snapshot {
            keys: snapshot(&statuses),
            egd: egd
                .as_ref()
                .map(|e| e.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            kernel: kernel
                .as_ref()
                .map(|k| k.lock().unwrap_or_else(|p| p.into_inner()).clone()),
            kernel_bits_per_byte,
            file_bytes: file
                .as_ref()
                .map_or(0, |w| w.load(std::sync::atomic::Ordering::Relaxed)),
        }));
    }
    let live = io::stderr().is_terminal() && !is_read;
    let mut gate_tick = tokio::time::interval(Duration::from_millis(250));
    let mut status_tick = tokio::time::interval(Duration::from_millis(500));
    // systemd (Type=notify): READY=1 once a key is keyed (or at once with
    // --no-wait), WATCHDOG=1 from this loop while it turns, STATUS= lines.
    let mut notify = (!is_read).then(|| Notifier::new(outputs.no_wait));
    let mut notify_tick = tokio::time::interval(
        notify
            .as_ref()
            .and_then(|n| n.period)
            .unwrap_or(Duration::from_secs(5)),
    );
    notify_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let t0 = tokio::time::Instant::now();
    // A timeout too large to add is no timeout.
    let deadline = read_timeout.and_then(|d| t0.checked_add(d));
    let mut written: u64 = 0;
    let mut failures: std::collections::BTreeMap<String, String> = Default::default();
    let mut fail_open = true;
    let mut interrupted = false;
    let mut pending: Option<Block> = None;
    let mut sigterm =
        signal(SignalKind::terminate()).map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    let mut sigint =
        signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch SIGINT: {e}"))?;
    let mut sighup =
        signal(SignalKind::hangup()).map_err(|e| format!("cannot watch SIGHUP: {e}"))?;
    let mut output_error: Option<io::Error> = None;
    loop {
        if limit.is_some_and(|l| written >= l) {
            break;
        }
        let writer = out.as_ref().map(|o| o.tx.clone());
        tokio::select! {
            // A block waits for room in the output: backpressure reaches the
            // keys through the bounded channels, nothing is dropped.
            b = rx.recv(), if pending.is_none() => {
                let Some(block) = b else { break };
                if writer.is_some() || egd_tx.is_some() || kernel_tx.is_some() {
                    pending = Some(block);
                } else {
                    let take = limit.map_or(32, |l| (l - written).min(32));
                    written += take;
                    block.book(32, |o| &mut o.unused);
                }
            }
            permit = reserve_block(kernel_tx.as_ref()), if pending.is_some() => {
                let Ok(permit) = permit else {
                    return Err("the kernel output stopped (see the log)".into());
                };
                if let Some(block) = pending.take() {
                    if block.withdrawn() {
                        block.book(32, |o| &mut o.withdrawn);
                    } else {
                        permit.send((block.data, block.serial, block.epoch));
                        block.book(32, |o| &mut o.kernel);
                    }
                }
            }
            permit = reserve_block(egd_tx.as_ref()), if pending.is_some() => {
                let Ok(permit) = permit else { break };
                if let Some(block) = pending.take() {
                    if block.withdrawn() {
                        block.book(32, |o| &mut o.withdrawn);
                    } else {
                        permit.send((block.data, block.serial, block.epoch));
                        block.book(32, |o| &mut o.egd);
                    }
                }
            }
            permit = reserve(writer.as_ref()), if pending.is_some() => {
                let Ok(permit) = permit else {
                    // The output thread ended: it says why below.
                    break;
                };
                if let Some(block) = pending.take() {
                    if block.withdrawn() {
                        block.book(32, |o| &mut o.withdrawn);
                        continue;
                    }
                    let take = limit.map_or(32, |l| (l - written).min(32));
                    permit.send((block.data, take as usize));
                    written += take;
                    block.book(take, |o| &mut o.file);
                    block.book(32 - take, |o| &mut o.unused);
                }
            }
            _ = gate_tick.tick(), if is_read => {
                if let Some(n) = test_blocks {
                    let keys = snapshot(&statuses);
                    let done = keys.iter().filter(|k| k.gate.counters.blocks_tested >= n).count();
                    if done + failures.len() >= sources && done > 0 {
                        tested = true;
                        break;
                    }
                    continue;
                }
                // `read` gives up on a key whose health gate closed.
                for st in snapshot(&statuses) {
                    if !st.gate.open {
                        let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
                        let why = st.gate.reason.map_or_else(String::new, |r| format!(": {r}"));
                        failures.insert(st.transport.clone(), format!("key {serial}: health gate closed{why}"));
                    }
                }
                if failures.len() >= sources {
                    break;
                }
            }
            f = fail_rx.recv(), if is_read && fail_open => {
                let Some((source, reason)) = f else {
                    fail_open = false;
                    continue;
                };
                failures.insert(source, reason);
                if failures.len() >= sources {
                    break;
                }
            }
            _ = sleep_until_opt(deadline) => {
                failures.insert(String::new(), format!("timed out after {} s waiting for entropy", read_timeout.unwrap_or_default().as_secs()));
                break;
            }
            _ = sigint.recv() => {
                interrupted = true;
                break;
            }
            _ = sigterm.recv() => {
                interrupted = true;
                break;
            }
            _ = sighup.recv() => {
                match reload_keyring(&ring, &keys.keyring, keys.emulate, &reload_tx) {
                    Ok(n) => info!("keyring {} reloaded: {n} keys", keys.keyring.display()),
                    Err(e) => warn!("keyring not reloaded, keeping the old one: {e}"),
                }
            }
            _ = status_tick.tick(), if live => {
                print_status_line(&statuses, written, t0.elapsed());
            }
            _ = keyed.notified(), if notify.as_ref().is_some_and(|n| !n.ready) => {
                if let Some(n) = notify.as_mut() {
                    n.tick(&snapshot(&statuses));
                }
            }
            _ = notify_tick.tick(), if notify.is_some() => {
                if let Some(n) = notify.as_mut() {
                    n.tick(&snapshot(&statuses));
                }
            }
        }
    }
    if notify.is_some() {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    }
    // Let the output thread write what it has (whole blocks), then stop.
    if let Some(o) = out.take() {
        drop(o.tx);
        match tokio::time::timeout(Duration::from_secs(5), o.done).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) if e.kind() == io::ErrorKind::BrokenPipe => {}
            Ok(Ok(Err(e))) => output_error = Some(e),
            Ok(Err(_)) => output_error = Some(io::Error::other("the output thread stopped")),
            Err(_) => {
                output_error = Some(io::Error::other(
                    "the output does not take data (stalled reader?)",
                ))
            }
        }
    }
    if live {
        eprintln!();
    }
    if let Some(p) = bound_control {
        let _ = std::fs::remove_file(p);
    }
    if let Some(p) = egd_unix_path {
        let _ = std::fs::remove_file(p);
    }
    if let Some(e) = output_error {
        return Err(format!("cannot write output: {e}"));
    }
    if let Some(n) = test_blocks {
        while let Ok((source, reason)) = fail_rx.try_recv() {
            failures.insert(source, reason);
        }
        let keys = snapshot(&statuses);
        // Every key must have been tested, and have passed.
        let mut verdict = tested && failures.is_empty();
        for k in keys.iter().filter(|k| k.gate.counters.blocks_tested > 0) {
            let (report, pass) = test_report(k, n);
            print!("{report}");
            verdict &= pass;
        }
        for (source, reason) in &failures {
            println!("{source}: not tested: {reason}");
        }
        let _ = io::stdout().flush();
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
        return if verdict {
            Ok(())
        } else {
            Err("test FAILED (see the report)".into())
        };
    }
    if is_read && limit.is_some_and(|l| written < l) {
        while let Ok((source, reason)) = fail_rx.try_recv() {
            failures.insert(source, reason);
        }
        // Nothing verified arrived: leave no empty file behind.
        if written == 0
            && let Some(p) = output.as_deref().filter(|p| p.as_os_str() != "-")
        {
            let _ = std::fs::remove_file(p);
        }
        if interrupted {
            return Err(format!(
                "interrupted after {written} of {} bytes",
                limit.unwrap_or(0)
            ));
        }
        let reasons: Vec<String> = failures.into_values().collect();
        return Err(if reasons.is_empty() {
            "the keys stopped before delivering enough entropy".into()
        } else {
            reasons.join("; ")
        });
    }
    Ok(())
}

/// `ekey-host test`'s report on one key, like rngtest's, and whether the
/// key passed: its health gate never closed while `blocks` were tested.
fn test_report(k: &KeyStatus, blocks: u64) -> (String, bool) {
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
    let _ = writeln!(r, "  {:<32}{verdict}", "verdict:");
    (r, pass)
}

/// Chance that a block of a good key fails any of the tests (FIPS 140-2
/// and the rest), as measured in `ekey_proto::health`'s docs.
const CHANCE_BLOCK_FAILURE: f64 = 7.99e-4;

/// The most failed blocks out of `n` that a good key shows with odds of at
/// least 1e-6: the largest `f` with P(Binomial(n, p) ≥ f) ≥ 1e-6.
///
/// Plain arithmetic only (`powi` is multiplications): no `libm`, which the
/// daemon would otherwise map into memory for this alone. Exact for `n` up
/// to [`MAX_TEST_BLOCKS`]; beyond that (1 − p)ⁿ underflows and no failure
/// count would be judged plausible.
fn chance_failures(n: u64) -> u64 {
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
const MAX_TEST_BLOCKS: u64 = 100_000;

/// What the daemon tells systemd.
struct Notifier {
    ready: bool,
    /// How often to ping the watchdog (half its timeout), if it is on.
    period: Option<Duration>,
    last_status: String,
}

impl Notifier {
    fn new(no_wait: bool) -> Self {
        let period = sd_notify::watchdog_enabled().map(|t| (t / 2).max(Duration::from_millis(100)));
        let mut n = Notifier {
            ready: false,
            period,
            last_status: String::new(),
        };
        if no_wait {
            n.ready();
        }
        n
    }

    fn ready(&mut self) {
        self.ready = true;
        if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
            warn!("cannot tell systemd the daemon is ready: {e}");
        }
    }

    /// Called every `period` (or every 5 s) from the main loop: it stops
    /// being called, and the watchdog fires, when the loop is stuck.
    fn tick(&mut self, keys: &[KeyStatus]) {
        let running = keys
            .iter()
            .filter(|k| k.connected && k.state.is_running())
            .count();
        if !self.ready && running > 0 {
            self.ready();
        }
        let status = format!(
            "{running} of {} keys running, {} bytes delivered",
            keys.len(),
            keys.iter().map(|k| k.delivered).sum::<u64>()
        );
        let mut states = Vec::new();
        if self.period.is_some() {
            states.push(sd_notify::NotifyState::Watchdog);
        }
        if status != self.last_status {
            states.push(sd_notify::NotifyState::Status(&status));
        }
        if !states.is_empty() {
            let _ = sd_notify::notify(&states);
        }
        self.last_status = status;
    }
}

/// `--egd-allow`: a network in CIDR form, or one address.
fn parse_allow_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{s:?} is not a network (10.0.0.0/8, fd00::/8) or an address"))
}

/// `--egd-share`: `tcp=W` or `unix=W`.
fn parse_share(s: &str) -> Result<(String, u32), String> {
    let (kind, weight) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected tcp=WEIGHT or unix=WEIGHT"))?;
    let kind = kind.trim();
    if kind != "tcp" && kind != "unix" {
        return Err(format!("{kind:?}: the listener kinds are tcp and unix"));
    }
    let weight: u32 = weight
        .trim()
        .parse()
        .ok()
        .filter(|w| (1..=1000).contains(w))
        .ok_or_else(|| {
            format!(
                "{:?}: a weight is a whole number from 1 to 1000",
                weight.trim()
            )
        })?;
    Ok((kind.to_string(), weight))
}

/// Starts the EGD server if asked for: its block queue, its statistics and
/// the Unix socket to remove at the end.
async fn start_egd(
    o: &Outputs,
    closes: driver::GateCloses,
) -> Result<
    (
        Option<mpsc::Sender<egd::SourceBlock>>,
        Option<Arc<Mutex<egd::EgdStats>>>,
        Option<PathBuf>,
    ),
    String,
> {
    let mut listeners = Vec::new();
    if let Some(addr) = &o.egd_tcp {
        let l = egd::bind_tcp(addr)
            .await
            .map_err(|e| format!("--egd-tcp {addr}: {e}"))?;
        if let Ok(a) = l.local_addr() {
            info!("EGD server on tcp {a}");
        }
        listeners.push(egd::EgdListener::Tcp(l));
    }
    if let Some(path) = &o.egd_unix {
        let mode = u32::from_str_radix(o.egd_mode.trim(), 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .ok_or_else(|| {
                format!(
                    "--egd-mode {}: an octal mode such as 600 or 660",
                    o.egd_mode
                )
            })?;
        let l = egd::bind_unix(path, mode, o.egd_group)
            .map_err(|e| format!("--egd-unix {}: {e}", path.display()))?;
        info!("EGD server on unix {} (mode {mode:o})", path.display());
        listeners.push(egd::EgdListener::Unix(l));
    }
    if listeners.is_empty() {
        return Ok((None, None, None));
    }
    if o.egd_unix.is_none() && !(o.egd_allow_uid.is_empty() && o.egd_allow_gid.is_empty()) {
        warn!(
            "--egd-allow-uid/--egd-allow-gid apply to --egd-unix clients only, and there is no --egd-unix"
        );
    }
    if o.egd_tcp.is_none() && !o.egd_allow.is_empty() {
        warn!("--egd-allow applies to --egd-tcp clients only, and there is no --egd-tcp");
    }
    let mut shares = egd::Shares::default();
    for (kind, weight) in &o.egd_share {
        match kind.as_str() {
            "tcp" => shares.tcp = *weight,
            _ => shares.unix = *weight,
        }
    }
    let config = egd::EgdConfig {
        admission: egd::Admission {
            max_clients: o.egd_max_clients as usize,
            max_per_peer: o.egd_max_per_peer as usize,
            allow_nets: o.egd_allow.clone(),
            allow_uids: o.egd_allow_uid.clone(),
            allow_gids: o.egd_allow_gid.clone(),
        },
        shares,
        rate_limit: o.egd_rate,
        ..egd::EgdConfig::default()
    };
    let stats = Arc::new(Mutex::new(egd::EgdStats::default()));
    let (tx, rx) = mpsc::channel::<egd::SourceBlock>(8);
    let st = stats.clone();
    tokio::spawn(async move {
        if let Err(e) = egd::serve(listeners, config, rx, st, closes).await {
            warn!("EGD server stopped: {e}");
        }
    });
    Ok((Some(tx), Some(stats), o.egd_unix.clone()))
}

/// Starts the kernel output if asked for: its block queue and statistics.
#[allow(clippy::type_complexity)]
fn start_kernel(
    o: &Outputs,
    closes: driver::GateCloses,
) -> Result<
    (
        Option<mpsc::Sender<kernel::KeyBlock>>,
        Option<Arc<Mutex<kernel::KernelStats>>>,
    ),
    String,
> {
    let Some(bits) = o.kernel else {
        return Ok((None, None));
    };
    let config = kernel::KernelConfig::new(bits)?
        .with_pace(64, o.kernel_interval)
        .map_err(|_| "--kernel-interval must be more than 0".to_string())?;
    // Fail now, with a clear message, rather than later in a task.
    let sink = kernel::RandomDevice::open().map_err(|e| format!("--kernel: {e}"))?;
    let stats = Arc::new(Mutex::new(kernel::KernelStats::default()));
    let (tx, rx) = mpsc::channel::<kernel::KeyBlock>(8);
    let st = stats.clone();
    if bits == 0 {
        info!("feeding the kernel without credit (--kernel=0)");
    } else {
        info!("feeding the kernel, crediting {bits} bits per byte");
    }
    tokio::spawn(async move {
        if let Err(e) = kernel::run_with(config, rx, st, sink, closes).await {
            warn!("kernel output stopped: {e}");
        }
    });
    Ok((Some(tx), Some(stats)))
}

/// Room in a block queue (pending forever when there is none).
async fn reserve_block<T>(
    tx: Option<&mpsc::Sender<T>>,
) -> Result<mpsc::Permit<'_, T>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) => tx.reserve().await,
        None => std::future::pending().await,
    }
}

/// Room in the output queue (pending forever when there is no output).
async fn reserve(
    tx: Option<&mpsc::Sender<([u8; 32], usize)>>,
) -> Result<mpsc::Permit<'_, ([u8; 32], usize)>, mpsc::error::SendError<()>> {
    match tx {
        Some(tx) => tx.reserve().await,
        None => std::future::pending().await,
    }
}

/// Re-reads the keyring; on success swaps it in and tells the keys.
fn reload_keyring(
    ring: &SharedKeyring,
    path: &Path,
    emulate: bool,
    reload_tx: &tokio::sync::watch::Sender<u64>,
) -> Result<usize, String> {
    let mut fresh = Keyring::load(path).map_err(|e| e.to_string())?;
    if emulate && !fresh.contains(&DEMO_SERIAL) {
        fresh.set(DEMO_SERIAL, demo_long_term_key());
    }
    let n = fresh.serials().len();
    *ring.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    reload_tx.send_modify(|g| *g += 1);
    Ok(n)
}

/// What the control socket acts on.
struct Daemon {
    statuses: SharedStatuses,
    started: std::time::Instant,
    ring: SharedKeyring,
    keyring_path: PathBuf,
    emulate: bool,
    reload_tx: tokio::sync::watch::Sender<u64>,
    released_tx: tokio::sync::watch::Sender<Arc<BTreeSet<String>>>,
    egd: Option<Arc<Mutex<egd::EgdStats>>>,
    kernel: Option<Arc<Mutex<kernel::KernelStats>>>,
    /// Bits credited per byte by the kernel output.
    kernel_bits: u8,
}

impl Daemon {
    fn reload(&self) -> Result<usize, String> {
        reload_keyring(
            &self.ring,
            &self.keyring_path,
            self.emulate,
            &self.reload_tx,
        )
    }

    /// Whether any key matching `target` (serial or transport) is connected.
    fn holds(&self, target: &str) -> bool {
        snapshot(&self.statuses).iter().any(|k| {
            k.connected
                && (k.transport == target || k.serial.is_some_and(|s| s.to_string() == target))
        })
    }

    async fn answer(&self, command: &str) -> String {
        let (verb, arg) = command.split_once(' ').unwrap_or((command, ""));
        let arg = arg.trim();
        match (verb, arg) {
            ("status", "") => {
                let snapshot = snapshot(&self.statuses);
                let mut doc =
                    status::status_json(&snapshot, std::time::Instant::now(), self.started);
                if let Some(e) = &self.egd {
                    let e = e.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    // Per key: of the bytes handed to the EGD pool, how
                    // many clients got.
                    if let Some(keys) = doc["keys"].as_array_mut() {
                        for (k, st) in keys.iter_mut().zip(&snapshot) {
                            let served = st
                                .serial
                                .and_then(|s| e.served_by_key.get(&s).copied())
                                .unwrap_or(0);
                            let withdrawn = st
                                .serial
                                .and_then(|s| e.withdrawn_by_key.get(&s).copied())
                                .unwrap_or(0);
                            k["accounting"]["egd_served"] = serde_json::json!(served);
                            k["accounting"]["egd_withdrawn"] = serde_json::json!(withdrawn);
                        }
                    }
                    doc["egd"] = e.to_json();
                }
                if let Some(k) = &self.kernel {
                    let k = k.lock().unwrap_or_else(|p| p.into_inner()).clone();
                    // Per key: what the kernel accepted, and the credit.
                    if let Some(keys) = doc["keys"].as_array_mut() {
                        for (entry, st) in keys.iter_mut().zip(&snapshot) {
                            let accepted = st
                                .serial
                                .and_then(|s| k.bytes_by_key.get(&s).copied())
                                .unwrap_or(0);
                            let withdrawn = st
                                .serial
                                .and_then(|s| k.withdrawn_by_key.get(&s).copied())
                                .unwrap_or(0);
                            let a = &mut entry["accounting"];
                            a["kernel_accepted"] = serde_json::json!(accepted);
                            a["kernel_withdrawn"] = serde_json::json!(withdrawn);
                            a["kernel_bits_credited"] =
                                serde_json::json!(accepted * u64::from(self.kernel_bits));
                        }
                    }
                    doc["kernel"] = serde_json::json!({
                        "mode": k.mode.to_string(),
                        "bytes_written": k.bytes_written,
                        "bits_credited": k.bits_credited,
                        "ioctl_failures": k.ioctl_failures,
                    });
                }
                format!("{doc}\n")
            }
            ("reload", "") => match self.reload() {
                Ok(n) => format!("ok: keyring reloaded, {n} keys\n"),
                Err(e) => format!("error: {e}\n"),
            },
            ("release", target) if !target.is_empty() => {
                let held = self.holds(target);
                self.released_tx.send_modify(|set| {
                    Arc::make_mut(set).insert(target.to_owned());
                });
                if !held {
                    return "ok: not held\n".into();
                }
                for _ in 0..100 {
                    if !self.holds(target) {
                        return "ok: released\n".into();
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                // Not let go of: take the request back, or the key would
                // stop the moment it did.
                self.released_tx.send_modify(|set| {
                    Arc::make_mut(set).remove(target);
                });
                "error: the key was not released in time\n".into()
            }
            ("resume", target) if !target.is_empty() => self.resume(target),
            _ => format!("error: unknown command {command:?}\n"),
        }
    }

    /// Takes a released key back, with the keyring re-read (it may hold
    /// the key's new long-term key).
    fn resume(&self, target: &str) -> String {
        let reloaded = self.reload();
        self.released_tx.send_modify(|set| {
            Arc::make_mut(set).remove(target);
        });
        match reloaded {
            Ok(n) => format!("ok: resumed, keyring reloaded ({n} keys)\n"),
            Err(e) => format!("ok: resumed, but the keyring was not reloaded: {e}\n"),
        }
    }

    /// Whether `target` is still released.
    fn is_released(&self, target: &str) -> bool {
        self.released_tx.borrow().contains(target)
    }
}

/// What the control socket answers after a `release`: the key stays
/// released while the client keeps the connection open (a `rekey` at
/// work), and is taken back when it closes without a `resume` (a `rekey`
/// that was killed).
async fn hold_release(stream: &mut tokio::net::UnixStream, daemon: &Daemon, target: &str) {
    use tokio::io::AsyncReadExt;
    let mut sink = [0u8; 64];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
    if daemon.is_released(target) {
        info!("{target}: the client that asked for its release has gone; taking the key back");
        let _ = daemon.resume(target);
    }
}

async fn serve_control(listener: tokio::net::UnixListener, daemon: Daemon) {
    let daemon = Arc::new(daemon);
    loop {
        let mut stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors or similar: do not spin.
                tracing::debug!("control socket: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // One task per client: a slow client never holds up the others.
        let daemon = daemon.clone();
        tokio::spawn(async move {
            let read =
                tokio::time::timeout(Duration::from_secs(2), control::read_command(&mut stream));
            let Ok(Ok(command)) = read.await else { return };
            let answer = daemon.answer(&command).await;
            let _ =
                tokio::time::timeout(Duration::from_secs(2), stream.write_all(answer.as_bytes()))
                    .await;
            if let Some(("release", target)) = command.split_once(' ')
                && answer.starts_with("ok")
            {
                hold_release(&mut stream, &daemon, target.trim()).await;
            }
        });
    }
}

/// Keeps a key on a tty or socket attached: re-opens it after it goes away
/// (unplugged, socket closed), once a second.
async fn keep_device(path: PathBuf, mut ctx: Ctx, status: SharedStatus) {
    loop {
        match transport::open_path(&path).await {
            Ok(mut link) => match drive_one(&mut link, &mut ctx, &status, false).await {
                Ok(Ended::OutputClosed) => return,
                Ok(Ended::Released) => {
                    drop(link);
                    set_connected(&status, false);
                    info!("{}: key released for a re-key", path.display());
                    wait_until_resumed(&mut ctx, &status).await;
                    continue;
                }
                Ok(Ended::Closed | Ended::Unresponsive) => {
                    warn!("{}: key went away", path.display())
                }
                Err(e) => warn!("{}: {e}", path.display()),
            },
            Err(e) => {
                if ctx.is_read {
                    let _ = ctx
                        .fail_tx
                        .send((path.display().to_string(), format!("no key found: {e}")));
                    return;
                }
                tracing::debug!("{e}");
            }
        }
        set_connected(&status, false);
        if ctx.tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn set_connected(status: &SharedStatus, up: bool) {
    status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .set_connected(up);
}

async fn drive_one(
    link: &mut Link,
    ctx: &mut Ctx,
    status: &SharedStatus,
    stop_when_unresponsive: bool,
) -> io::Result<Ended> {
    set_connected(status, true);
    let r = drive_connected(link, ctx, status, stop_when_unresponsive).await;
    set_connected(status, false);
    r
}

async fn drive_connected(
    link: &mut Link,
    ctx: &mut Ctx,
    status: &SharedStatus,
    stop_when_unresponsive: bool,
) -> io::Result<Ended> {
    driver::drain(link, Duration::from_millis(50), Duration::from_millis(500)).await?;
    let lookup = {
        let ring = ctx.ring.clone();
        move |s: &Serial| -> Option<LongTermKey> {
            ring.read().unwrap_or_else(|p| p.into_inner()).get(s)
        }
    };
    let transport = status
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .transport
        .clone();
    let (is_read, fail_tx, keyed) = (ctx.is_read, ctx.fail_tx.clone(), ctx.keyed.clone());
    let mut on_event = |st: &KeyStatus, ev: &Event| match ev {
        Event::StateChanged { state, reason } => {
            let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
            info!("key {serial} ({transport}): {state} ({reason})");
            if state.is_running() {
                keyed.notify_one();
            }
            if let Some(why) = terminal_reason(*state)
                && is_read
            {
                let _ = fail_tx.send((transport.clone(), format!("key {serial}: {why}")));
            }
        }
        Event::Fault(f) => tracing::debug!("key ({transport}): {f:?}"),
        Event::Unresponsive { attempts } => {
            warn!("key ({transport}) does not answer after {attempts} resets")
        }
        _ => {}
    };
    let options = driver::DriveOptions {
        config: Config::default(),
        stop_when_unresponsive,
        coalesce: driver::DriveOptions::DEFAULT_COALESCE,
    };
    driver::drive(
        link,
        options,
        &lookup,
        &ctx.tx,
        status,
        &mut ctx.signals,
        &mut on_event,
    )
    .await
}

fn print_status_line(statuses: &SharedStatuses, bytes: u64, elapsed: Duration) {
    let mut line = String::new();
    for st in snapshot(statuses) {
        let serial = st.serial.map_or_else(|| "?".to_string(), |s| s.to_string());
        let temp = st
            .info
            .temperature
            .map_or_else(|| "-".to_string(), |t| format!("{:.1} °C", t.celsius()));
        line.push_str(&format!("key {serial}: {} · {temp} · ", st.state));
    }
    let rate = bytes as f64 / elapsed.as_secs_f64().max(0.001);
    eprint!("\r\x1b[K{line}{bytes} bytes · {rate:.0} B/s");
}

async fn emulate(args: EmulateArgs) -> Result<(), String> {
    let EmulateArgs {
        pty,
        unix,
        tty,
        serial,
        long_term_key,
        master_key,
        rate,
        record,
        noise_prefix,
        fault_corrupt_every,
        fault_garbage_every,
        fault_replay_every,
        fault_failure_mode,
        fault_noise,
        fault_temperature,
        noise_seed,
    } = args;
    let plan = soft::FaultPlan {
        corrupt_every: fault_corrupt_every,
        garbage_every: fault_garbage_every,
        replay_every: fault_replay_every,
        failure_mode: fault_failure_mode.map(|c| c as u8),
        noise: fault_noise.unwrap_or_default(),
        temperature: fault_temperature,
    };
    let serial: Serial = serial
        .parse()
        .map_err(|e| format!("--serial: {e} (16 PEM64 characters)"))?;
    let ltk = match long_term_key {
        Some(k) => LongTermKey::from_pem(k.trim().as_bytes())
            .map_err(|e| format!("--long-term-key: {e} (44 PEM64 characters)"))?,
        None => demo_long_term_key(),
    };
    let mut config = DeviceConfig::new(serial, ltk);
    config.master_key = Some(match master_key {
        Some(m) => parse_master_key(&m).map_err(|e| format!("--master-key: {e}"))?,
        None => soft::demo_master_key(),
    });
    let mut key = SoftKey::new(config);
    key.set_faults(plan);
    if let Some(h) = noise_seed {
        let seed: [u8; 32] = hex::decode(h.trim())
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or("--noise-seed: 64 hex digits")?;
        key.seed_noise(seed);
    }
    if let Some(h) = noise_prefix {
        key.script_noise(&hex::decode(h.trim()).map_err(|e| format!("--noise-prefix: {e}"))?);
    }
    let mut rec: Option<Box<dyn Write + Send>> = match &record {
        Some(p) => Some(Box::new(create_private(p)?)),
        None => None,
    };
    let slot = soft::slot_for_rate(rate);
    if let Some(path) = tty {
        let rec = rec.as_deref_mut().map(|w| w as _);
        return serve_tty(&path, &mut key, slot, rec).await;
    }
    if pty {
        let (mut master, path) =
            transport::open_pty().map_err(|e| format!("cannot create a pty: {e}"))?;
        println!("{}", path.display());
        let _ = io::stdout().flush();
        info!("software key {serial} on {}", path.display());
        tokio::select! {
            r = soft::serve(&mut master, &mut key, slot, rec.as_deref_mut().map(|w| w as _)) => {
                r.map_err(|e| format!("pty: {e}"))
            }
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    } else {
        let path = unix.ok_or("give --pty or --unix PATH")?;
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                let _ = std::fs::remove_file(&path);
            }
        }
        let listener = tokio::net::UnixListener::bind(&path)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
        println!("{}", path.display());
        let _ = io::stdout().flush();
        info!("software key {serial} on {}", path.display());
        let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
        loop {
            tokio::select! {
                a = listener.accept() => {
                    let (mut stream, _) = a.map_err(|e| format!("accept: {e}"))?;
                    info!("client connected");
                    tokio::select! {
                        r = soft::serve(&mut stream, &mut key, slot, rec.as_deref_mut().map(|w| w as _)) => {
                            if let Err(e) = r { warn!("client: {e}"); }
                            info!("client disconnected");
                        }
                        _ = tokio::signal::ctrl_c() => break,
                        _ = sigterm.recv() => break,
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
            }
        }
        let _ = std::fs::remove_file(&path);
        Ok(())
    }
}

/// `emulate --tty`: serves the key on an existing tty until a signal,
/// reopening the tty whenever the other side hangs up (a gadget's port
/// while the host side is unbound).
async fn serve_tty(
    path: &Path,
    key: &mut SoftKey,
    slot: Duration,
    mut rec: Option<&mut (dyn Write + Send)>,
) -> Result<(), String> {
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("cannot watch SIGTERM: {e}"))?;
    // The first open must work: a wrong path is an error, not a wait.
    let mut tty = Some(transport::Tty::open(path).map_err(|e| e.to_string())?);
    println!("{}", path.display());
    let _ = io::stdout().flush();
    info!("software key {} on {}", key.serial(), path.display());
    loop {
        let mut t = match tty.take() {
            Some(t) => t,
            None => match transport::Tty::open(path) {
                Ok(t) => {
                    info!("{}: open again", path.display());
                    t
                }
                Err(e) => {
                    tracing::debug!("{}: {e}", path.display());
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                        _ = tokio::signal::ctrl_c() => return Ok(()),
                        _ = sigterm.recv() => return Ok(()),
                    }
                }
            },
        };
        tokio::select! {
            r = soft::serve(&mut t, key, slot, rec.as_deref_mut().map(|w| w as _)) => {
                match r {
                    Ok(()) => info!("{}: the other side hung up", path.display()),
                    Err(e) => info!("{}: {e}", path.display()),
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = sigterm.recv() => return Ok(()),
        }
        drop(t);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn status_command(json: bool, path: &Path) -> Result<(), String> {
    let answer = control::request(path, "status").await?;
    let doc: serde_json::Value = serde_json::from_str(&answer)
        .map_err(|e| format!("the daemon's answer is not a status document: {e}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&doc).unwrap_or(answer));
    } else {
        print!("{}", status::render(&doc));
    }
    Ok(())
}

async fn list_command(keyring_path: &Path) -> Result<(), String> {
    let ring = match Keyring::load(keyring_path) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("ekey-host: {e}");
            None
        }
    };
    let keys = usb::list().await.map_err(|e| e.to_string())?;
    if keys.is_empty() {
        println!("no Entropy Key (USB 20df:0001) attached");
        return Ok(());
    }
    for k in keys {
        let serial = k.serial_number().unwrap_or("(no serial)");
        let in_ring = match (&ring, serial.parse::<Serial>()) {
            (Some(r), Ok(s)) if r.contains(&s) => "long-term key in keyring",
            (Some(_), Ok(_)) => "NOT in keyring: run `ekey-host rekey`",
            (None, _) => "keyring unreadable",
            (_, Err(_)) => "serial is not a valid Entropy Key serial",
        };
        println!("{serial}  {}  {in_ring}", usb::describe(&k));
    }
    Ok(())
}

/// The master key from the option, a file, or a prompt (no echo).
fn read_master_key(args: &RekeyArgs) -> Result<ekey_proto::keys::MasterKey, String> {
    let text = zeroize::Zeroizing::new(match (&args.master_key, &args.master_key_file) {
        (Some(k), _) => {
            warn!(
                "--master-key: other users can read this command line (ps); --master-key-file or the prompt keep the key private"
            );
            k.clone()
        }
        (None, Some(f)) if f.as_os_str() == "-" => {
            // Room enough that no reallocation leaves a copy behind.
            let mut text = String::with_capacity(1024);
            io::Read::read_to_string(&mut io::stdin().lock(), &mut text)
                .map_err(|e| format!("cannot read the master key from standard input: {e}"))?;
            text
        }
        (None, Some(f)) => {
            std::fs::read_to_string(f).map_err(|e| format!("cannot read {}: {e}", f.display()))?
        }
        (None, None) => {
            if !io::stdin().is_terminal() {
                return Err("no master key: give --master-key, --master-key-file, or run on a terminal to be asked".into());
            }
            rpassword::prompt_password("Master key (as printed on the card): ")
                .map_err(|e| format!("cannot read the master key: {e}"))?
        }
    });
    parse_master_key(text.trim()).map_err(|e| e.to_string())
}

/// Which key to re-key: the device given, or the one on USB.
async fn rekey_target(args: &RekeyArgs) -> Result<(Link, String, Option<Serial>), String> {
    let wanted: Option<Serial> = match &args.serial {
        Some(s) => Some(s.parse().map_err(|e| format!("--serial: {e}"))?),
        None => None,
    };
    if let Some(path) = &args.device {
        let link = transport::open_path(path)
            .await
            .map_err(|e| e.to_string())?;
        return Ok((link, path.display().to_string(), wanted));
    }
    let keys = usb::list()
        .await
        .map_err(|e| format!("{e}; give --device PATH for a key on a tty or socket"))?;
    let matching: Vec<_> = keys
        .into_iter()
        .filter(|k| wanted.is_none_or(|w| k.serial_number() == Some(w.to_string().as_str())))
        .collect();
    match matching.as_slice() {
        [] => Err(match wanted {
            Some(w) => format!("no key with serial {w} is attached"),
            None => "no Entropy Key (USB 20df:0001) is attached".into(),
        }),
        [one] => {
            let (link, _dev) = usb::open(one).await.map_err(|e| e.to_string())?;
            let serial = one.serial_number().and_then(|s| s.parse().ok()).or(wanted);
            Ok((link, usb::describe(one), serial))
        }
        several => {
            let mut msg = String::from("several keys are attached; choose one with --serial:");
            for k in several {
                msg.push_str(&format!(
                    "\n  {}  {}",
                    k.serial_number().unwrap_or("?"),
                    usb::describe(k)
                ));
            }
            Err(msg)
        }
    }
}

/// Fixed nonce for tests (`--nonce`), else the OS generator.
struct NonceSource(Option<[u8; 12]>);

impl rand_core::TryRng for NonceSource {
    type Error = getrandom::Error;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        rand_core::TryRng::try_next_u32(&mut getrandom::SysRng)
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        rand_core::TryRng::try_next_u64(&mut getrandom::SysRng)
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        match self.0.take() {
            Some(n) if n.len() == dst.len() => {
                dst.copy_from_slice(&n);
                Ok(())
            }
            _ => rand_core::TryRng::try_fill_bytes(&mut getrandom::SysRng, dst),
        }
    }
}
impl rand_core::TryCryptoRng for NonceSource {}

async fn rekey_command(args: RekeyArgs) -> Result<(), String> {
    // Everything that can be refused is refused before the key is touched.
    let master = read_master_key(&args)?;
    let nonce = match &args.nonce {
        Some(h) => Some(
            hex::decode(h.trim())
                .ok()
                .and_then(|v| <[u8; 12]>::try_from(v).ok())
                .ok_or("--nonce: 24 hex digits")?,
        ),
        None => None,
    };
    let mut ring = if args.no_keyring {
        None
    } else {
        Some(match Keyring::load(&args.keyring) {
            Ok(r) => r,
            Err(keyring::KeyringError::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                Keyring::new()
            }
            Err(e) => {
                return Err(format!(
                    "{e}\n(the keyring is rewritten after a re-key: fix it first)"
                ));
            }
        })
    };
    // Ask a running daemon to let go of the key, and to take it back after.
    let target = match (&args.device, &args.serial) {
        (Some(p), _) => Some(p.display().to_string()),
        (None, Some(s)) => Some(s.clone()),
        (None, None) => usb::list().await.ok().and_then(|k| {
            (k.len() == 1)
                .then(|| k[0].serial_number().map(str::to_owned))
                .flatten()
        }),
    };
    // The release lasts while `held_release` keeps the control connection open:
    // if this process dies, the daemon takes the key back by itself.
    let mut released = None;
    let mut held_release = None;
    if let Some(t) = &target {
        match control::hold(&args.control, &format!("release {t}")).await {
            Ok((a, conn)) if a.starts_with("ok") => {
                released = Some(t.clone());
                held_release = Some(conn);
            }
            Ok((a, _)) => {
                return Err(format!(
                    "the running daemon could not let go of the key: {}",
                    a.trim()
                ));
            }
            // No daemon listening there: nothing holds the key.
            Err(e) if e.contains("No such file") || e.contains("Connection refused") => {}
            Err(e) => {
                return Err(format!(
                    "cannot ask the running daemon to let go of the key: {e}"
                ));
            }
        }
    }
    let result = tokio::select! {
        r = rekey_exchange(&args, master, nonce, ring.as_mut()) => r,
        _ = tokio::signal::ctrl_c() => Err("interrupted; if an L command had reached the key, run the re-key again".into()),
    };
    if let Some(t) = released
        && let Err(e) = control::request(&args.control, &format!("resume {t}")).await
    {
        eprintln!("ekey-host: could not tell the daemon to take the key back: {e}");
    }
    drop(held_release);
    let (serial, key) = result?;
    match ring {
        None => {
            println!("{serial} {}", String::from_utf8_lossy(&key.to_pem()[..]));
            eprintln!("key {serial}: long-term key updated (not stored: --no-keyring)");
        }
        Some(_) => {
            println!(
                "key {serial}: long-term key updated (keyring {})",
                args.keyring.display()
            );
        }
    }
    Ok(())
}

/// The exchange itself; on success the keyring (if any) is written.
async fn rekey_exchange(
    args: &RekeyArgs,
    master: ekey_proto::keys::MasterKey,
    nonce: Option<[u8; 12]>,
    ring: Option<&mut Keyring>,
) -> Result<(Serial, LongTermKey), String> {
    use ekey_proto::rekey::{LongTermRekey, RekeyConfig, RekeyOutcome};
    use tokio::io::AsyncReadExt;
    let (mut link, where_, expected) = rekey_target(args).await?;
    driver::drain(
        &mut link,
        Duration::from_millis(50),
        Duration::from_millis(500),
    )
    .await
    .map_err(|e| format!("{where_}: {e}"))?;
    let base = tokio::time::Instant::now();
    let now = || ekey_proto::time::Instant::from_millis(base.elapsed().as_millis() as u64);
    let config = RekeyConfig {
        expected_serial: expected,
        ..RekeyConfig::default()
    };
    let mut proc = LongTermRekey::new(config, master, now(), &mut NonceSource(nonce))
        .map_err(|e| format!("no random nonce: {e}"))?;
    let mut buf = [0u8; 1024];
    let outcome = loop {
        while let Some(t) = proc.poll_transmit() {
            link.write_all(&t)
                .await
                .map_err(|e| format!("{where_}: {e}"))?;
            link.flush().await.map_err(|e| format!("{where_}: {e}"))?;
        }
        if let Some(o) = proc.take_outcome() {
            break o;
        }
        let deadline = proc
            .poll_timeout()
            .map(|t| base + Duration::from_millis(t.millis()));
        tokio::select! {
            r = link.read(&mut buf) => {
                let n = r.map_err(|e| format!("{where_}: {e}"))?;
                if n == 0 {
                    return Err(format!("{where_}: the key went away during the re-key"));
                }
                let mut input = &buf[..n];
                while !input.is_empty() {
                    let used = proc.handle_input(now(), input);
                    input = &input[used..];
                }
            }
            _ = sleep_until_opt(deadline) => proc.handle_timeout(now()),
        }
    };
    match outcome {
        RekeyOutcome::Done { serial, key } => {
            if let Some(ring) = ring {
                ring.set(serial, key.clone());
                ring.save(&args.keyring).map_err(|e| {
                    format!(
                        "key {serial} has a new long-term key, but the keyring could not be written: {e}; \
                         run the re-key again once the keyring is writable"
                    )
                })?;
            }
            Ok((serial, key))
        }
        RekeyOutcome::Refused {
            serial,
            refusal,
            text,
        } => Err(format!(
            "key {serial} refused the long-term re-key: {refusal} (key says: {text}); keyring unchanged"
        )),
        RekeyOutcome::WrongSerial { expected, found } => Err(format!(
            "the key answering is {found}, not {expected}; nothing changed"
        )),
        RekeyOutcome::NonceLength { received } => Err(format!(
            "the key received {received} nonce bytes of 12; it may now hold a long-term key nobody knows: run the re-key again"
        )),
        RekeyOutcome::TimedOut {
            step,
            key_may_have_changed,
        } => Err(if key_may_have_changed {
            format!(
                "no answer from the key ({step}); it may have taken a new long-term key whose reply was lost: run the re-key again"
            )
        } else {
            format!("no answer from the key ({step}); nothing changed")
        }),
    }
}

async fn keyring_command(action: KeyringAction, path: &Path) -> Result<(), String> {
    match action {
        KeyringAction::List => {
            let ring = Keyring::load(path).map_err(|e| e.to_string())?;
            let attached: Option<Vec<String>> = usb::list().await.ok().map(|k| {
                k.iter()
                    .filter_map(|d| d.serial_number().map(str::to_owned))
                    .collect()
            });
            for serial in ring.serials() {
                let s = serial.to_string();
                let now = match &attached {
                    Some(a) if a.contains(&s) => "attached",
                    Some(_) => "not attached",
                    None => "attached: unknown (no USB here)",
                };
                println!("{s}  {now}");
            }
            Ok(())
        }
        KeyringAction::Check => {
            let ring = Keyring::load(path).map_err(|e| e.to_string())?;
            for w in ring.warnings() {
                eprintln!("warning: {w}");
            }
            if let Ok(Some(w)) = keyring::check_permissions(path) {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: {} keys, every line valid",
                path.display(),
                ring.serials().len()
            );
            Ok(())
        }
        KeyringAction::Remove { serial } => {
            let serial: Serial = serial.parse().map_err(|e| format!("serial: {e}"))?;
            let mut ring = Keyring::load(path).map_err(|e| e.to_string())?;
            if !ring.remove(&serial) {
                return Err(format!("{} has no key for {serial}", path.display()));
            }
            ring.save(path)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            println!("removed {serial} from {}", path.display());
            Ok(())
        }
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

    #[test]
    fn egd_admission_and_share_flags_parse_or_say_why_not() {
        let parse = |args: &[&str]| {
            let mut all = vec!["ekey-host", "run"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all) {
                Ok(Cli {
                    command: Command::Run { outputs, .. },
                    ..
                }) => Ok(outputs),
                Ok(_) => Err("not run".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        let o = parse(&[
            "--egd-allow",
            "10.1.2.3/8",
            "--egd-allow",
            "::1",
            "--egd-allow-uid",
            "64055",
            "--egd-share",
            "unix=4",
            "--egd-max-per-peer",
            "8",
        ])
        .unwrap();
        let nets: Vec<String> = o.egd_allow.iter().map(|n| n.to_string()).collect();
        assert_eq!(nets, ["10.0.0.0/8", "::1/128"]);
        assert_eq!(o.egd_allow_uid, [64055]);
        assert_eq!(o.egd_share, [("unix".to_string(), 4)]);
        assert_eq!((o.egd_max_per_peer, o.egd_max_clients), (8, 64));
        for (bad, why) in [
            (&["--egd-allow", "10.0.0.0/33"][..], "not a network"),
            (&["--egd-allow", "localhost"], "not a network"),
            (&["--egd-share", "udp=2"], "tcp and unix"),
            (&["--egd-share", "tcp=0"], "1 to 1000"),
            (&["--egd-share", "tcp"], "tcp=WEIGHT"),
            (&["--egd-max-per-peer", "0"], "0"),
            (&["--egd-max-clients", "0"], "0"),
        ] {
            let err = parse(bad).map(|_| ()).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    #[test]
    fn kernel_interval_takes_a_duration_or_bare_seconds() {
        let interval =
            |v: &str| match Cli::try_parse_from(["ekey-host", "run", "--kernel-interval", v]) {
                Ok(Cli {
                    command: Command::Run { outputs, .. },
                    ..
                }) => Ok(outputs.kernel_interval),
                Ok(_) => Err("not run".to_string()),
                Err(e) => Err(e.to_string()),
            };
        assert_eq!(interval("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(interval("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(interval("15"), Ok(Duration::from_secs(15)));
        let err = interval("soon").unwrap_err();
        assert!(err.contains("expected a duration"), "{err}");
    }
}
