//! Time as the admin API, the status page, reloads and logs show it, and monotonic
//! instants that fit in an atomic.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// RFC 3339 in UTC, to the second: `2026-11-30T07:33:19Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Monotonic time as a `u64` of nanoseconds since the first call, so that an instant
/// fits in an atomic. Never 0 (0 means "none" where it is stored); saturates after
/// 584 years.
pub fn monotonic_ns(t: std::time::Instant) -> u64 {
    nanos(t.saturating_duration_since(epoch())).max(1)
}

/// `d` in nanoseconds, saturating at `u64::MAX` (584 years).
pub fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The instant [`monotonic_ns`] gave `ns` for (to within the epoch's nanosecond).
pub fn monotonic_instant(ns: u64) -> std::time::Instant {
    let epoch = epoch();
    epoch
        .checked_add(std::time::Duration::from_nanos(ns))
        .unwrap_or(epoch + std::time::Duration::from_secs(u32::MAX.into()))
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

/// The wall clock as of the kernel's last tick (1 to 4 ms old), for what needs the
/// date, not the instant: key expiry, a key's last use, request ids. Read from the
/// vDSO's data page without the cycle counter: about a fifth of a precise read, which
/// was 25-30 ns on this machine, and a request took several.
pub fn coarse_now() -> SystemTime {
    coarse(CoarseClock::Realtime).map_or_else(SystemTime::now, |t| UNIX_EPOCH + t)
}

/// Monotonic milliseconds as of the kernel's last tick (see [`coarse_now`]), for
/// staleness measured in seconds.
pub fn coarse_monotonic_ms() -> u64 {
    let since_boot = coarse(CoarseClock::Monotonic)
        .unwrap_or_else(|| std::time::Instant::now().saturating_duration_since(epoch()));
    u64::try_from(since_boot.as_millis()).unwrap_or(u64::MAX)
}

enum CoarseClock {
    Realtime,
    Monotonic,
}

#[cfg(target_os = "linux")]
fn coarse(clock: CoarseClock) -> Option<Duration> {
    let id = match clock {
        CoarseClock::Realtime => libc::CLOCK_REALTIME_COARSE,
        CoarseClock::Monotonic => libc::CLOCK_MONOTONIC_COARSE,
    };
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through the pointer, which points
    // at a live, writable one.
    let rc = unsafe { libc::clock_gettime(id, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (rc == 0).then(|| Duration::new(secs, nanos))
}

/// Elsewhere the precise clocks serve (a `None` here falls back to them).
#[cfg(not(target_os = "linux"))]
fn coarse(_: CoarseClock) -> Option<Duration> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The coarse clocks trail the precise ones by at most a few kernel ticks.
    #[test]
    fn coarse_clocks_follow_the_precise_ones() {
        let precise = SystemTime::now();
        let coarse = coarse_now();
        let behind = precise.duration_since(coarse).unwrap_or_default();
        let ahead = coarse.duration_since(precise).unwrap_or_default();
        assert!(behind < Duration::from_millis(50), "{behind:?} behind");
        assert!(ahead < Duration::from_millis(5), "{ahead:?} ahead");
        let a = coarse_monotonic_ms();
        std::thread::sleep(Duration::from_millis(30));
        let b = coarse_monotonic_ms();
        assert!((20..1000).contains(&(b - a)), "{a} then {b}");
    }
}
