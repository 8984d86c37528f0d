//! The subcommands: `main` parses the command line and runs one of them.

pub mod docs;
#[cfg(unix)]
pub mod emulate;
#[cfg(unix)]
pub mod feed;
pub mod keyring;
pub mod list;
pub mod rekey;
pub mod status;
pub mod test;

use std::io::{self, IsTerminal};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::cli::Cli;
use crate::cli::Command;
use crate::cli::KeySources;
use crate::cli::Outputs;
#[cfg(unix)]
use crate::commands::emulate::emulate;
use crate::commands::keyring::keyring_command;
use crate::commands::list::list_command;
use crate::commands::rekey::rekey_command;
use crate::commands::status::status_command;
use crate::daemon::run;
use crate::ekeyd_conf::{ConfError, Settings, migration};
use clap::{CommandFactory, FromArgMatches};

/// The log level from `EKEY_LOG` (`error`, `warn`, `info`, `debug`,
/// `trace`); `info` by default.
pub(crate) fn log_level() -> tracing::Level {
    std::env::var("EKEY_LOG")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(tracing::Level::INFO)
}

/// Runs the command line in `std::env::args()`; the binary's `main`.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    // Documentation commands: no logging, no runtime.
    if let Some(done) = offline_command(&cli.command) {
        return match done {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ekey-host: {e}");
                ExitCode::FAILURE
            }
        };
    }
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_ansi(io::stderr().is_terminal())
        .with_target(false)
        .with_max_level(log_level())
        .init();
    if let Err(e) = take_ekeyd_config(&mut cli.command, &matches) {
        eprintln!("ekey-host: {e}");
        return ExitCode::FAILURE;
    }
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
    let result = rt.block_on(run_command(cli.command));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("ekey-host: {msg}");
            ExitCode::FAILURE
        }
    }
}

/// `run --ekeyd-config FILE`: the file's settings where the command line
/// (`matches`) gave none.
fn take_ekeyd_config(command: &mut Command, matches: &clap::ArgMatches) -> Result<(), String> {
    let Command::Run {
        keys,
        outputs,
        ekeyd_config: Some(file),
    } = command
    else {
        return Ok(());
    };
    let run = matches.subcommand_matches("run");
    let given = |id: &str| {
        run.and_then(|m| m.value_source(id)) == Some(clap::parser::ValueSource::CommandLine)
    };
    apply_ekeyd_config(file, keys, outputs, given)
        .map_err(|e| format!("--ekeyd-config {}: {e}", file.display()))
}

/// Takes `file`'s settings (the vendor daemon's configuration) into
/// `keys` and `outputs`, except where the command line `given` an option;
/// logs what the file says that is not done.
fn apply_ekeyd_config(
    file: &std::path::Path,
    keys: &mut KeySources,
    outputs: &mut Outputs,
    given: impl Fn(&str) -> bool,
) -> Result<(), ConfError> {
    let s = Settings::read(file)?;
    for n in &s.notes {
        if n.warning {
            tracing::warn!("{}, line {}: {}", file.display(), n.line, n.text);
        } else {
            tracing::info!("{}, line {}: {}", file.display(), n.line, n.text);
        }
    }
    fn take<T>(slot: &mut T, value: Option<T>, given: bool) {
        if let (Some(v), false) = (value, given) {
            *slot = v;
        }
    }
    take(&mut keys.keyring, s.keyring, given("keyring"));
    if !s.devices.is_empty() {
        if given("devices") {
            tracing::info!(
                "--device given: the keys of {} are not added",
                file.display()
            );
        } else {
            keys.devices = s.devices;
        }
    }
    take(&mut outputs.output, s.output.map(Some), given("output"));
    take(
        &mut outputs.kernel,
        s.kernel
            .map(|b| Some(crate::outputs::kernel::Credit::Bits(b))),
        given("kernel"),
    );
    take(&mut outputs.egd_tcp, s.egd_tcp.map(Some), given("egd_tcp"));
    take(
        &mut outputs.egd_unix,
        s.egd_unix.map(Some),
        given("egd_unix"),
    );
    take(&mut outputs.egd_mode, s.egd_mode, given("egd_mode"));
    take(
        &mut outputs.egd_group,
        s.egd_group.map(Some),
        given("egd_group"),
    );
    take(&mut outputs.control, s.control.map(Some), given("control"));
    Ok(())
}

/// This program's path, for the command lines it prints (`ekey-host` if
/// unknown).
fn this_binary() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.to_str().map(str::to_string))
        .unwrap_or_else(|| "ekey-host".to_string())
}

/// The commands that only print or write files from the command line's
/// definition (or a config file); `None` for the others.
fn offline_command(command: &Command) -> Option<Result<(), String>> {
    match command {
        Command::Completions { shell } => Some(docs::completions(*shell, &mut io::stdout())),
        Command::Man { dir } => Some(docs::man_pages(dir).map(|pages| {
            println!("wrote {} manual pages to {}", pages.len(), dir.display());
        })),
        Command::MigrateEkeydConfig { file } => Some(
            Settings::read(file)
                .map(|s| print!("{}", migration(&s, file, &this_binary())))
                .map_err(|e| format!("{}: {e}", file.display())),
        ),
        _ => None,
    }
}

/// Runs a command that needs the runtime.
async fn run_command(command: Command) -> Result<(), String> {
    match command {
        Command::Run { keys, outputs, .. } => {
            run(keys, *outputs, None).await.map_err(|e| e.to_string())
        }
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
            run(keys, outputs, Some(Duration::from_secs(timeout)))
                .await
                .map_err(|e| e.to_string())
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
            let timeout = timeout.unwrap_or_else(|| blocks.saturating_mul(2).saturating_add(30));
            run(keys, outputs, Some(Duration::from_secs(timeout)))
                .await
                .map_err(|e| e.to_string())
        }
        #[cfg(unix)]
        Command::Emulate(args) => emulate(args).await,
        #[cfg(unix)]
        Command::Feed(args) => crate::commands::feed::main(args).await,
        Command::Rekey(args) => rekey_command(args).await,
        Command::Keyring { action, keyring } => keyring_command(action, &keyring).await,
        Command::Completions { .. } | Command::Man { .. } | Command::MigrateEkeydConfig { .. } => {
            Ok(())
        }
    }
}
