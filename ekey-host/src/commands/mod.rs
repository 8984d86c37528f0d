//! The subcommands: `main` parses the command line and runs one of them.

pub mod docs;
pub mod emulate;
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
use crate::cli::Outputs;
use crate::commands::emulate::emulate;
use crate::commands::keyring::keyring_command;
use crate::commands::list::list_command;
use crate::commands::rekey::rekey_command;
use crate::commands::status::status_command;
use crate::daemon::run;
use clap::Parser;

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
    let cli = Cli::parse();
    // Documentation commands: no logging, no runtime.
    let docs = match &cli.command {
        Command::Completions { shell } => Some(docs::completions(*shell, &mut io::stdout())),
        Command::Man { dir } => Some(docs::man_pages(dir).map(|pages| {
            println!("wrote {} manual pages to {}", pages.len(), dir.display());
        })),
        _ => None,
    };
    if let Some(done) = docs {
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
            Command::Run { keys, outputs } => {
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
                let timeout =
                    timeout.unwrap_or_else(|| blocks.saturating_mul(2).saturating_add(30));
                run(keys, outputs, Some(Duration::from_secs(timeout)))
                    .await
                    .map_err(|e| e.to_string())
            }
            Command::Emulate(args) => emulate(args).await,
            Command::Feed(args) => crate::commands::feed::main(args).await,
            Command::Rekey(args) => rekey_command(args).await,
            Command::Keyring { action, keyring } => keyring_command(action, &keyring).await,
            Command::Completions { .. } | Command::Man { .. } => Ok(()),
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
