//! Time as the admin API, the status page, reloads and logs show it, and monotonic
//! instants that fit in an atomic.

use std::time::{SystemTime, UNIX_EPOCH};

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
    let since = t.saturating_duration_since(epoch());
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX).max(1)
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
