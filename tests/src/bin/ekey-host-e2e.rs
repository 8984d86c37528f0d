//! `ekey-host` built inside this package, so that its end-to-end tests
//! always run the current code (`CARGO_BIN_EXE_ekey-host-e2e`): the same
//! single call as `ekey-host/src/main.rs`.

fn main() -> std::process::ExitCode {
    ekey_host::commands::main()
}
