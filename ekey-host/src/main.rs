//! `ekey-host`: the Entropy Key daemon and tools (see [`ekey_host::commands`]).

fn main() -> std::process::ExitCode {
    ekey_host::commands::main()
}
