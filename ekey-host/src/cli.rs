//! The `ekey-host` command line: `run`, `read`, `emulate`.

use std::path::PathBuf;
use std::time::Duration;

use crate::daemon::control;
use crate::keyring::{self};
#[cfg(unix)]
use crate::keys::soft::{self, DEMO_SERIAL};
use clap::{Args, Parser, Subcommand};
use ekey_proto::health::{GateConfig, Limits};

#[derive(Parser)]
#[command(
    name = "ekey-host",
    version,
    about = "Driver and daemon for the Simtec Entropy Key (USB 20df:0001)"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Args, Clone)]
pub(crate) struct KeySources {
    /// A key on a tty (/dev/ttyACM0, /dev/entropykey/*) or a Unix socket
    /// (ekey-ulusbd, `ekey-host emulate --unix`). Repeatable.
    #[arg(long = "device", value_name = "PATH")]
    pub(crate) devices: Vec<PathBuf>,
    /// Use the built-in software key (demo keys; its bytes come from the
    /// OS generator, not from hardware noise).
    #[arg(long)]
    pub(crate) emulate: bool,
    /// The keyring of long-term keys, in ekeyd's format.
    #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH)]
    pub(crate) keyring: PathBuf,
    /// Entropy rate of the built-in software key, bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = 4000)]
    pub(crate) rate: u32,
    /// With --emulate: append every block the built-in key sends to this
    /// file (mode 0600), in order, so that what came out can be traced.
    #[arg(long, value_name = "FILE", requires = "emulate")]
    pub(crate) record: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) health: HealthArgs,
}

/// Bounds of the health gate (the rest of its policy is fixed and
/// documented in `ekey_proto::health`).
#[derive(Args, Clone)]
pub(crate) struct HealthArgs {
    /// Warn when a key's core temperature leaves this range (°C).
    #[arg(long, value_name = "MIN:MAX", default_value = "0:70")]
    pub(crate) temperature_warn: String,
    /// Close the health gate when a key's core temperature leaves this
    /// range (°C).
    #[arg(long, value_name = "MIN:MAX", default_value = "-20:85")]
    pub(crate) temperature_limit: String,
    /// Warn when a key's supply voltage leaves this range (V).
    #[arg(long, value_name = "MIN:MAX", default_value = "3.135:3.465")]
    pub(crate) voltage_warn: String,
    /// Close the health gate when a key's supply voltage leaves this range
    /// (V).
    #[arg(long, value_name = "MIN:MAX", default_value = "2.97:3.63")]
    pub(crate) voltage_limit: String,
    /// Close the health gate while a key's SP 800-90B min-entropy estimate
    /// (the least of the six estimators over --min-entropy-window) is below
    /// this many bits per byte (0 to 8). Off by default.
    #[arg(long, value_name = "BITS")]
    pub(crate) min_entropy_floor: Option<f64>,
    /// Bytes of each key's output the min-entropy estimators look at
    /// (4096 to 1000000; default the last 1,000,000 bits); 0 turns them off.
    #[arg(long, value_name = "BYTES", default_value_t = crate::keys::estimate::DEFAULT_WINDOW)]
    pub(crate) min_entropy_window: usize,
}

impl HealthArgs {
    /// The gate's configuration: the documented defaults with these bounds.
    pub(crate) fn gate_config(&self) -> Result<GateConfig, String> {
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
        use crate::keys::estimate::{MAX_WINDOW, MIN_WINDOW};
        let window = self.min_entropy_window;
        if window != 0 && !(MIN_WINDOW..=MAX_WINDOW).contains(&window) {
            return Err(format!(
                "--min-entropy-window {window}: 0 (off) or {MIN_WINDOW} to {MAX_WINDOW} bytes"
            ));
        }
        let floor = match self.min_entropy_floor {
            None => 0,
            Some(_) if window == 0 => {
                return Err(
                    "--min-entropy-floor needs the estimators (--min-entropy-window 0 turns them off)"
                        .into(),
                );
            }
            Some(f) if (0.0..=8.0).contains(&f) => (f * 1000.0).round() as u32,
            Some(f) => {
                return Err(format!("--min-entropy-floor {f}: bits per byte, 0 to 8"));
            }
        };
        let config = GateConfig {
            min_entropy_floor_millibits: floor,
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
pub(crate) enum Command {
    /// Run the daemon: keep every key keyed and healthy and write verified
    /// entropy to the outputs.
    Run {
        #[command(flatten)]
        keys: KeySources,
        #[command(flatten)]
        outputs: Box<Outputs>,
        /// Also take the settings of the vendor daemon's configuration
        /// file (/etc/entropykey/ekeyd.conf); options given here win.
        #[arg(long, value_name = "FILE")]
        ekeyd_config: Option<PathBuf>,
    },
    /// Print the `run` command line (and a systemd drop-in) equivalent to
    /// the vendor daemon's configuration file.
    MigrateEkeydConfig {
        /// The ekeyd.conf to translate.
        #[arg(default_value = "/etc/entropykey/ekeyd.conf")]
        file: PathBuf,
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
    #[cfg(unix)]
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
            value_parser = clap::value_parser!(u64).range(1..=crate::commands::test::MAX_TEST_BLOCKS)
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
    #[cfg(unix)]
    Feed(crate::commands::feed::FeedArgs),
    /// Set a key's long-term key with the master key printed on its card,
    /// and store it in the keyring.
    Rekey(RekeyArgs),
    /// Print a shell completion script: `ekey-host completions bash >
    /// /etc/bash_completion.d/ekey-host` (zsh: into a directory of
    /// `$fpath` as `_ekey-host`; fish: `~/.config/fish/completions/`).
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages, `ekey-host.1` and one per subcommand
    /// (`ekey-host-run.1`, ...), into DIR (made if missing).
    Man {
        /// Where to write them, e.g. /usr/local/share/man/man1.
        dir: PathBuf,
    },
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
pub(crate) struct Outputs {
    /// Write verified entropy to this file, or `-` for stdout.
    #[arg(long, short, value_name = "FILE|-")]
    pub(crate) output: Option<PathBuf>,
    /// Stop after this many bytes have been written to --output (with no
    /// output at all: after this many bytes from the keys). Bytes served
    /// over EGD or given to the kernel do not count.
    #[arg(long, value_name = "BYTES")]
    pub(crate) limit: Option<u64>,
    /// The control socket `ekey-host status` asks (mode 0600).
    #[arg(long, value_name = "PATH")]
    pub(crate) control: Option<PathBuf>,
    /// Serve EGD clients (QEMU's rng-egd, ...) on this TCP address;
    /// `PORT` alone binds 127.0.0.1.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) egd_tcp: Option<String>,
    /// Serve EGD clients on this Unix socket.
    #[arg(long, value_name = "PATH")]
    pub(crate) egd_unix: Option<PathBuf>,
    /// Serve EGD clients over TLS (1.3 or 1.2) on this TCP address; `PORT`
    /// alone binds 127.0.0.1. Clients must present a certificate from
    /// --tls-client-ca (QEMU: tls-creds-x509).
    #[arg(long, value_name = "ADDR:PORT", requires_all = ["tls_cert", "tls_key", "tls_client_ca"])]
    pub(crate) egd_tls: Option<String>,
    /// The TLS listener's certificate chain, PEM, leaf first (re-read on
    /// SIGHUP).
    #[arg(long, value_name = "FILE", requires = "egd_tls")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// The TLS listener's private key, PEM; must not be readable by group
    /// or others.
    #[arg(long, value_name = "FILE", requires = "egd_tls")]
    pub(crate) tls_key: Option<PathBuf>,
    /// The CA certificates, PEM, that TLS clients' certificates must chain
    /// to.
    #[arg(long, value_name = "FILE", requires = "egd_tls")]
    pub(crate) tls_client_ca: Option<PathBuf>,
    /// Serve only TLS clients whose certificate subject is this, as status
    /// shows it (CN=guest1,O=Example), or whose common name it names
    /// (CN=guest1); repeatable.
    #[arg(long, value_name = "SUBJECT", requires = "egd_tls")]
    pub(crate) egd_allow_subject: Vec<String>,
    /// Mode of the EGD Unix socket and the `--vhost-user-rng` sockets,
    /// octal.
    #[arg(long, value_name = "OCTAL", default_value = "600")]
    pub(crate) egd_mode: String,
    /// Group (numeric id) of the EGD Unix socket and the
    /// `--vhost-user-rng` sockets.
    #[arg(long, value_name = "GID")]
    pub(crate) egd_group: Option<u32>,
    /// Most bytes per second each EGD client gets (so one guest cannot
    /// drain the host); unlimited by default.
    #[arg(long, value_name = "BYTES/S")]
    pub(crate) egd_rate: Option<u32>,
    /// Most EGD clients at once. When all slots are taken, an idle
    /// connection of the peer holding the most may be closed for a
    /// newcomer holding fewer (QEMU: use `reconnect=`).
    #[arg(long, value_name = "N", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) egd_max_clients: u32,
    /// Most EGD connections one peer may hold: one source address for
    /// TCP, one user id for the Unix socket.
    #[arg(long, value_name = "N", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) egd_max_per_peer: u32,
    /// Serve only TCP clients from this network (CIDR such as
    /// 10.0.0.0/8, or one address); repeatable. Default: anyone who can
    /// reach the port.
    #[arg(long, value_name = "CIDR", value_parser = parse_allow_net)]
    pub(crate) egd_allow: Vec<ipnet::IpNet>,
    /// Serve only Unix-socket clients of this user id; repeatable.
    #[arg(long, value_name = "UID")]
    pub(crate) egd_allow_uid: Vec<u32>,
    /// Serve only Unix-socket clients whose primary group is this gid;
    /// repeatable.
    #[arg(long, value_name = "GID")]
    pub(crate) egd_allow_gid: Vec<u32>,
    /// Share weight of one listener's clients under scarcity
    /// (`tcp=W`, `tls=W`, `unix=W` or `vhost-user=W`, W in 1..=1000,
    /// default 1 each); repeatable.
    #[arg(long, value_name = "KIND=WEIGHT", value_parser = parse_share)]
    pub(crate) egd_share: Vec<(String, u32)>,
    /// Serve one guest's virtio-rng queue over vhost-user on this socket
    /// (the daemon listens; QEMU: `-chardev socket,id=vu0,path=PATH
    /// -device vhost-user-rng-pci,chardev=vu0`, with shared guest memory);
    /// repeatable, one socket per guest, made with `--egd-mode` and
    /// `--egd-group`. The guest is a client of the EGD hub (`--egd-share
    /// vhost-user=W`, `--egd-rate`). Linux only.
    #[arg(long, value_name = "PATH")]
    pub(crate) vhost_user_rng: Vec<PathBuf>,
    /// Serve every vhost-user socket created in DIR (QEMU or libvirt makes
    /// it with `server=on`; the daemon connects), one guest per socket,
    /// named after the file (`vm1.sock`: `vm1`). Linux only.
    #[arg(long, value_name = "DIR")]
    pub(crate) vhost_user_rng_dir: Option<PathBuf>,
    /// Feed the kernel's pool (RNDADDENTROPY on /dev/random, needs
    /// CAP_SYS_ADMIN), crediting this many bits per byte (0..8; 0 mixes
    /// the bytes in without credit), or `auto`: each key's bytes get
    /// floor(its live min-entropy estimate × 7/8), at most 7, and none
    /// before its first estimate.
    #[arg(long, value_name = "BITS_PER_BYTE|auto", num_args = 0..=1, default_missing_value = "7")]
    pub(crate) kernel: Option<crate::outputs::kernel::Credit>,
    /// Once the kernel's generator is ready: mix in 64 bytes this often
    /// (e.g. 10s, 500ms, 2m; a bare number is seconds). Before that, the
    /// key's full rate goes to the kernel.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) kernel_interval: Duration,
    /// Once the kernel's generator is ready: after a mixing write, have it
    /// reseed from its input pool at once (RNDRESEEDCRNG) instead of at its
    /// next scheduled reseed (up to 60 s later), at most this often; 0 for
    /// never.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub(crate) kernel_reseed_interval: Duration,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics; `PORT` alone
    /// binds 127.0.0.1.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics: Option<String>,
    /// Tell systemd (Type=notify) the daemon is ready at once, instead of
    /// when the first key is keyed.
    #[arg(long)]
    pub(crate) no_wait: bool,
    /// `test`: stop once every key's gate has tested this many blocks.
    #[arg(skip)]
    pub(crate) test_blocks: Option<u64>,
}

#[derive(Subcommand)]
pub(crate) enum KeyringAction {
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
pub(crate) struct RekeyArgs {
    /// The key on this tty or Unix socket (default: the key on USB).
    #[arg(long, value_name = "PATH", conflicts_with = "serial")]
    pub(crate) device: Option<PathBuf>,
    /// The key on USB with this serial (needed when several are attached).
    #[arg(long, value_name = "PEM16")]
    pub(crate) serial: Option<String>,
    /// The master key as printed on the key's card (spaces and dashes are
    /// ignored). Other users can read a command line (ps): prefer
    /// --master-key-file or the prompt. Without either it is asked for.
    #[arg(long, value_name = "KEY", conflicts_with = "master_key_file")]
    pub(crate) master_key: Option<String>,
    /// Read the master key from this file; `-` reads it from standard input
    /// (e.g. from a password manager through a pipe).
    #[arg(long, value_name = "FILE")]
    pub(crate) master_key_file: Option<PathBuf>,
    /// The keyring to update.
    #[arg(long, value_name = "FILE", default_value = keyring::DEFAULT_PATH)]
    pub(crate) keyring: PathBuf,
    /// Do not touch a keyring: print the new long-term key to stdout.
    #[arg(long)]
    pub(crate) no_keyring: bool,
    /// The running daemon's control socket (to make it let go of the key).
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_PATH)]
    pub(crate) control: PathBuf,
    /// Tests only: the 12-byte nonce, in hex.
    #[arg(long, value_name = "HEX", hide = true)]
    pub(crate) nonce: Option<String>,
}

#[derive(Args)]
#[cfg(unix)]
pub(crate) struct EmulateArgs {
    /// Create a pseudo-terminal and print its path.
    #[arg(long, conflicts_with_all = ["unix", "tty"])]
    pub(crate) pty: bool,
    /// Listen on this Unix socket (one client at a time).
    #[arg(long, value_name = "PATH", conflicts_with = "tty")]
    #[arg(required_unless_present_any = ["pty", "tty"])]
    pub(crate) unix: Option<PathBuf>,
    /// Serve on this existing tty (e.g. a USB gadget's /dev/ttyGS0),
    /// reopening it when the other side hangs up.
    #[arg(long, value_name = "PATH")]
    pub(crate) tty: Option<PathBuf>,
    /// Serial number (16 PEM64 characters).
    #[arg(long, value_name = "PEM16", default_value_t = DEMO_SERIAL.to_string())]
    pub(crate) serial: String,
    /// Long-term key (44 PEM64 characters); default: the demo key.
    #[arg(long, value_name = "PEM44")]
    pub(crate) long_term_key: Option<String>,
    /// Master key as printed on a card, for long-term re-keying;
    /// default: the demo master key.
    #[arg(long, value_name = "PRINTED")]
    pub(crate) master_key: Option<String>,
    /// Entropy rate, bytes per second.
    #[arg(long, value_name = "BYTES/S", default_value_t = 4000)]
    pub(crate) rate: u32,
    /// Write every plaintext block sent to this file (mode 0600), in order.
    #[arg(long, value_name = "FILE")]
    pub(crate) record: Option<PathBuf>,
    /// Tests only: bytes (hex) the key's noise source yields first.
    #[arg(long, value_name = "HEX", hide = true)]
    pub(crate) noise_prefix: Option<String>,
    /// Test faults: corrupt the MAC of every Nth frame.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub(crate) fault_corrupt_every: u64,
    /// Test faults: garbage before every Nth frame.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub(crate) fault_garbage_every: u64,
    /// Test faults: send every Nth entropy frame twice.
    #[arg(long, value_name = "N", default_value_t = 0, hide = true)]
    pub(crate) fault_replay_every: u64,
    /// Test faults: report this failure mode (e.g. 3) from the start.
    #[arg(long, value_name = "CHAR", hide = true)]
    pub(crate) fault_failure_mode: Option<char>,
    /// Test faults: bad noise (stuck[=HEX], biased, repeat).
    #[arg(long, value_name = "KIND", hide = true)]
    pub(crate) fault_noise: Option<soft::NoiseFault>,
    /// Test faults: report this core temperature (tenths of a kelvin).
    #[arg(long, value_name = "DECI_KELVIN", hide = true)]
    pub(crate) fault_temperature: Option<u32>,
    /// Test faults: hold --fault-failure-mode and --fault-temperature back
    /// until the emulator gets SIGUSR1 (a key that fails while running).
    #[arg(long, hide = true)]
    pub(crate) fault_on_usr1: bool,
    /// Tests only: noise from ChaCha20 with this seed (64 hex digits), so
    /// that the stream is known in advance.
    #[arg(long, value_name = "HEX", hide = true)]
    pub(crate) noise_seed: Option<String>,
}

/// `--egd-allow`: a network in CIDR form, or one address.
pub(crate) fn parse_allow_net(s: &str) -> Result<ipnet::IpNet, String> {
    let s = s.trim();
    if let Ok(net) = s.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    s.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| format!("{s:?} is not a network (10.0.0.0/8, fd00::/8) or an address"))
}

/// `--egd-share`: `tcp=W`, `tls=W`, `unix=W` or `vhost-user=W`.
pub(crate) fn parse_share(s: &str) -> Result<(String, u32), String> {
    let (kind, weight) = s.split_once('=').ok_or_else(|| {
        format!("{s:?}: expected tcp=WEIGHT, tls=WEIGHT, unix=WEIGHT or vhost-user=WEIGHT")
    })?;
    let kind = kind.trim();
    if !["tcp", "tls", "unix", "vhost-user"].contains(&kind) {
        return Err(format!(
            "{kind:?}: the listener kinds are tcp, tls, unix and vhost-user"
        ));
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

/// Parses a duration: a whole number with a unit `ms`, `s`, `m` or `h`
/// (`10s`, `500ms`, `2m`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("{s:?}: expected a duration such as 10s, 500ms, 2m or 1h");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let d = match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => Some(Duration::from_secs(n)),
        "m" | "min" => n.checked_mul(60).map(Duration::from_secs),
        "h" => n.checked_mul(3600).map(Duration::from_secs),
        _ => return Err(bad()),
    };
    // Longer than a year is a typo, and would overflow the clock.
    d.filter(|d| *d <= MAX_DURATION)
        .ok_or_else(|| format!("{s:?}: too long (a year at most)"))
}

/// The longest duration [`parse_duration`] accepts: a year.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

#[cfg(test)]
mod tests {
    use super::*;

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
            (&["--egd-share", "udp=2"], "tcp, tls, unix and vhost-user"),
            (&["--egd-share", "tcp=0"], "1 to 1000"),
            (&["--egd-share", "tcp"], "tcp=WEIGHT"),
            (&["--egd-max-per-peer", "0"], "0"),
            (&["--egd-max-clients", "0"], "0"),
            (&["--egd-tls", "7777", "--tls-cert", "c.pem"], "--tls-key"),
            (&["--tls-key", "k.pem"], "--egd-tls"),
            (&["--egd-allow-subject", "CN=a"], "--egd-tls"),
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

    #[test]
    fn kernel_takes_bits_or_auto() {
        use crate::outputs::kernel::Credit;
        let kernel = |args: &[&str]| {
            let mut argv = vec!["ekey-host", "run"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv) {
                Ok(Cli {
                    command: Command::Run { outputs, .. },
                    ..
                }) => Ok(outputs.kernel),
                Ok(_) => Err("not run".to_string()),
                Err(e) => Err(e.to_string()),
            }
        };
        assert_eq!(kernel(&[]), Ok(None));
        assert_eq!(kernel(&["--kernel"]), Ok(Some(Credit::Bits(7))));
        assert_eq!(kernel(&["--kernel=0"]), Ok(Some(Credit::Bits(0))));
        assert_eq!(kernel(&["--kernel=8"]), Ok(Some(Credit::Bits(8))));
        assert_eq!(kernel(&["--kernel=auto"]), Ok(Some(Credit::Auto)));
        assert_eq!(kernel(&["--kernel", "AUTO"]), Ok(Some(Credit::Auto)));
        for bad in ["9", "-1", "7.5", "half", ""] {
            let err = kernel(&[&format!("--kernel={bad}")]).unwrap_err();
            assert!(
                err.contains("neither bits per byte (0..=8) nor `auto`"),
                "{bad}: {err}"
            );
        }
    }
}
