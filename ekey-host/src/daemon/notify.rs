//! systemd notifications: READY=1, WATCHDOG=1, STATUS=.

use std::time::Duration;

use crate::keys::driver::KeyStatus;
use tracing::warn;

/// What the daemon tells systemd.
pub(crate) struct Notifier {
    pub(crate) ready: bool,
    /// How often to ping the watchdog (half its timeout), if it is on.
    pub(crate) period: Option<Duration>,
    pub(crate) last_status: String,
}

impl Notifier {
    pub(crate) fn new(no_wait: bool) -> Self {
        let period = watchdog_enabled().map(|t| (t / 2).max(Duration::from_millis(100)));
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

    pub(crate) fn ready(&mut self) {
        self.ready = true;
        if let Err(e) = send(&[State::Ready]) {
            warn!("cannot tell systemd the daemon is ready: {e}");
        }
    }

    /// Called every `period` (or every 5 s) from the main loop: it stops
    /// being called, and the watchdog fires, when the loop is stuck.
    pub(crate) fn tick(&mut self, keys: &[KeyStatus]) {
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
            states.push(State::Watchdog);
        }
        if status != self.last_status {
            states.push(State::Status(&status));
        }
        if !states.is_empty() {
            let _ = send(&states);
        }
        self.last_status = status;
    }
}

/// Tells systemd the daemon is stopping.
pub(crate) fn stopping() {
    let _ = send(&[State::Stopping]);
}

/// What is told.
#[cfg_attr(not(unix), allow(dead_code))]
enum State<'a> {
    Ready,
    Watchdog,
    Status(&'a str),
    Stopping,
}

#[cfg(unix)]
fn send(states: &[State<'_>]) -> std::io::Result<()> {
    use sd_notify::NotifyState;
    let states: Vec<NotifyState<'_>> = states
        .iter()
        .map(|s| match s {
            State::Ready => NotifyState::Ready,
            State::Watchdog => NotifyState::Watchdog,
            State::Status(t) => NotifyState::Status(t),
            State::Stopping => NotifyState::Stopping,
        })
        .collect();
    sd_notify::notify(&states)
}

#[cfg(unix)]
fn watchdog_enabled() -> Option<Duration> {
    sd_notify::watchdog_enabled()
}

/// No systemd here.
#[cfg(not(unix))]
fn send(_: &[State<'_>]) -> std::io::Result<()> {
    Ok(())
}

#[cfg(not(unix))]
fn watchdog_enabled() -> Option<Duration> {
    None
}
