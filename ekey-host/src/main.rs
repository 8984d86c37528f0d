//! `ekey-host`: the Entropy Key daemon and tools.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant as StdInstant};

use clap::{Parser, Subcommand};
use ekey_host::soft::{DEMO_SERIAL, SoftKey, demo_long_term_key};
use ekey_proto::host::{Config, Event, Session};
use ekey_proto::keys::{LongTermKey, Serial};
use ekey_proto::time::Instant;

#[derive(Parser)]
#[command(
    version,
    about = "Driver and daemon for the Simtec Entropy Key (USB 20df:0001)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: keep keys keyed and healthy, write verified entropy
    /// to the outputs.
    Run {
        /// Use the built-in software key instead of hardware (for demos and
        /// tests: its bytes come from the OS generator, not from noise).
        #[arg(long)]
        emulate: bool,
        /// Write verified entropy to this file, or `-` for stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Stop after this many bytes.
        #[arg(long)]
        limit: Option<u64>,
        /// Frames per second the software key sends (a real key: about 86).
        #[arg(long, default_value_t = 86)]
        frame_rate: u32,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            emulate,
            output,
            limit,
            frame_rate,
        } => {
            if !emulate {
                eprintln!(
                    "ekey-host: driving keys over USB is not implemented yet; \
                     use `ekey-host run --emulate` for the built-in software key"
                );
                return ExitCode::from(2);
            }
            match run_emulated(output, limit, frame_rate) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ekey-host: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_emulated(output: Option<PathBuf>, limit: Option<u64>, frame_rate: u32) -> io::Result<()> {
    let mut out: Option<Box<dyn Write>> = match output.as_deref() {
        None => None,
        Some(p) if p.as_os_str() == "-" => Some(Box::new(io::stdout().lock())),
        Some(p) => Some(Box::new(File::create(p).map_err(|e| {
            io::Error::new(e.kind(), format!("cannot create {}: {e}", p.display()))
        })?)),
    };
    let status_line = io::stderr().is_terminal();
    let mut key = SoftKey::demo();
    let ltk = demo_long_term_key();
    let keyring =
        move |s: &Serial| -> Option<LongTermKey> { (*s == DEMO_SERIAL).then(|| ltk.clone()) };
    let mut nonce_rng = getrandom::SysRng;
    let start = StdInstant::now();
    let now = || Instant::from_millis(start.elapsed().as_millis() as u64);
    let mut session = Session::new(Config::default(), now());
    let slot = Duration::from_secs(1) / frame_rate.max(1);
    let mut next = StdInstant::now();
    let mut bytes: u64 = 0;
    let mut last_status = StdInstant::now();
    eprintln!(
        "ekey-host: software key {} (demo keys; not a hardware noise source)",
        key.serial()
    );
    loop {
        while let Some(t) = session.poll_transmit() {
            key.write(&t);
        }
        if let Some(o) = key.poll() {
            let mut input: &[u8] = &o.bytes;
            while !input.is_empty() {
                let used = session.handle_input(now(), input, &keyring, &mut nonce_rng);
                input = &input[used..];
                while let Some(ev) = session.poll_event() {
                    match ev {
                        Event::Entropy { data, .. } => {
                            let take =
                                limit.map_or(32, |l| l.saturating_sub(bytes).min(32)) as usize;
                            if let Some(w) = out.as_mut() {
                                w.write_all(&data[..take])?;
                            }
                            bytes += take as u64;
                        }
                        Event::StateChanged { state, reason } => {
                            if status_line {
                                eprint!("\r\x1b[K");
                            }
                            eprintln!("ekey-host: key {}: {state} ({reason})", key.serial());
                        }
                        Event::Fault(f) => eprintln!("ekey-host: key {}: {f:?}", key.serial()),
                        _ => {}
                    }
                }
            }
        }
        session.handle_timeout(now());
        if limit.is_some_and(|l| bytes >= l) {
            break;
        }
        if status_line && last_status.elapsed() >= Duration::from_millis(500) {
            last_status = StdInstant::now();
            let secs = start.elapsed().as_secs_f64().max(0.001);
            let temp = session
                .info()
                .temperature
                .map_or_else(|| "-".to_string(), |t| format!("{:.1} °C", t.celsius()));
            eprint!(
                "\r\x1b[Kkey {} · {} · {} bytes · {:.0} B/s · {}",
                key.serial(),
                session.state(),
                bytes,
                bytes as f64 / secs,
                temp
            );
        }
        next += slot;
        let wait = next.saturating_duration_since(StdInstant::now());
        std::thread::sleep(wait);
    }
    if let Some(w) = out.as_mut() {
        w.flush()?;
    }
    if status_line {
        eprintln!();
    }
    Ok(())
}
