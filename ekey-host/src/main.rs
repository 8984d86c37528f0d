//! `ekey-host`: the Entropy Key daemon and tools (see [`ekey_host::cli`]).

fn main() -> std::process::ExitCode {
    ekey_host::cli::main()
}
