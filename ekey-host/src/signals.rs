//! Unix signals where there are any: on Windows, Ctrl-C stands in for
//! SIGINT and SIGTERM, and SIGHUP/SIGUSR1 never come (reload through the
//! restart instead).

#[cfg(unix)]
pub use tokio::signal::unix::{Signal, SignalKind, signal};

#[cfg(not(unix))]
pub use shim::{Signal, SignalKind, signal};

#[cfg(not(unix))]
mod shim {
    use std::io;

    /// The signals the daemon listens for.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct SignalKind(u8);

    impl SignalKind {
        /// SIGTERM: Ctrl-C here.
        pub fn terminate() -> Self {
            Self(0)
        }
        /// SIGINT: Ctrl-C here.
        pub fn interrupt() -> Self {
            Self(1)
        }
        /// SIGHUP: never here.
        pub fn hangup() -> Self {
            Self(2)
        }
        /// SIGUSR1: never here.
        pub fn user_defined1() -> Self {
            Self(3)
        }
    }

    /// A stream of one kind of signal.
    pub struct Signal(SignalKind);

    /// Listens for `kind`.
    pub fn signal(kind: SignalKind) -> io::Result<Signal> {
        Ok(Signal(kind))
    }

    impl Signal {
        /// The next signal; for kinds this system has not, never.
        pub async fn recv(&mut self) -> Option<()> {
            if self.0.0 <= 1 {
                tokio::signal::ctrl_c().await.ok()
            } else {
                std::future::pending().await
            }
        }
    }
}
