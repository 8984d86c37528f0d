//! A sleep that costs one wake-up.
//!
//! The driver reads its link in batches: it drains what the key sent, then
//! sleeps while the next batch gathers. With tokio's timer a sleep longer
//! than 64 ms costs two wake-ups (the timer wheel's coarse slot first, then
//! the exact millisecond), which doubles the daemon's context switches at
//! the key's rate. On Linux a [`Ticker`] is a one-shot `timerfd`, armed for
//! each sleep and read through the runtime's reactor: exactly one wake-up
//! per sleep, and none while nobody sleeps. Elsewhere it is a tokio sleep.

use std::io;
use std::time::Duration;

/// Sleeps `period` at a time, one wake-up each (see the module docs).
pub struct Ticker {
    #[cfg(target_os = "linux")]
    fd: tokio::io::unix::AsyncFd<Fd>,
    period: Duration,
}

/// A timerfd the reactor can watch.
#[cfg(target_os = "linux")]
struct Fd(nix::sys::timerfd::TimerFd);

#[cfg(target_os = "linux")]
impl std::os::fd::AsRawFd for Fd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl Ticker {
    /// A sleeper for `period` (at least a millisecond). Needs a tokio
    /// runtime with I/O enabled.
    #[cfg(target_os = "linux")]
    pub fn new(period: Duration) -> io::Result<Self> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let period = period.max(Duration::from_millis(1));
        let tfd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        // SAFETY: `Fd` owns the timerfd: it stays open, and `as_raw_fd`
        // returns that same descriptor, until the `AsyncFd` is dropped.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(Fd(tfd), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Self { fd, period })
    }

    /// A sleeper for `period` (at least a millisecond).
    #[cfg(not(target_os = "linux"))]
    pub fn new(period: Duration) -> io::Result<Self> {
        Ok(Self {
            period: period.max(Duration::from_millis(1)),
        })
    }

    /// Sleeps one period.
    #[cfg(target_os = "linux")]
    pub async fn tick(&mut self) -> io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        self.fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(self.period)),
            TimerSetTimeFlags::empty(),
        )?;
        loop {
            let mut ready = self.fd.readable().await?;
            // Reading the timerfd clears its expiry.
            match ready.try_io(|fd| fd.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }

    /// Sleeps one period.
    #[cfg(not(target_os = "linux"))]
    pub async fn tick(&mut self) -> io::Result<()> {
        tokio::time::sleep(self.period).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_no_less_than_its_period() {
        let period = Duration::from_millis(30);
        let start = tokio::time::Instant::now();
        let mut t = Ticker::new(period).unwrap();
        for n in 1..=3u32 {
            t.tick().await.unwrap();
            assert!(start.elapsed() >= n * period - Duration::from_millis(2));
        }
    }
}
