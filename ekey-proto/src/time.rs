//! Time as the caller tells it: a monotonic millisecond count.
//!
//! The state machines never read a clock; every call that may depend on time
//! takes an [`Instant`] from the caller, as smoltcp does.

use core::time::Duration;

/// A point in time, in milliseconds since an arbitrary, caller-chosen epoch.
///
/// ```
/// use ekey_proto::time::Instant;
/// use core::time::Duration;
/// let t = Instant::from_millis(1_000);
/// assert_eq!(t + Duration::from_millis(500), Instant::from_millis(1_500));
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Instant {
    millis: u64,
}

impl Instant {
    /// The epoch.
    pub const ZERO: Instant = Instant { millis: 0 };

    /// An instant `millis` milliseconds after the epoch.
    pub const fn from_millis(millis: u64) -> Self {
        Instant { millis }
    }

    /// Milliseconds since the epoch.
    pub const fn millis(self) -> u64 {
        self.millis
    }

    /// Time from `earlier` to `self`, zero if `earlier` is later.
    pub fn saturating_duration_since(self, earlier: Instant) -> Duration {
        Duration::from_millis(self.millis.saturating_sub(earlier.millis))
    }
}

impl core::ops::Add<Duration> for Instant {
    type Output = Instant;
    fn add(self, d: Duration) -> Instant {
        let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Instant {
            millis: self.millis.saturating_add(ms),
        }
    }
}
