//! Wall-clock time as the admin API, the status page, reloads and logs show it.

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
