//! One environment's live activity: counters the request path bumps, and a ring of
//! per-second samples the status page plots.
//!
//! Cost: a request adds to three relaxed atomics (requests, its status class, its
//! latency bucket), plus one when it was rate limited; nothing is locked on the request
//! path. Once a second the sampler diffs the counters into a [`Sample`] (64 bytes) kept in
//! a ring of [`RING_SECONDS`]: about 19 KiB per environment. An upstream error (rare by
//! nature) takes a short lock to note when and what.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Five minutes of per-second samples.
pub const RING_SECONDS: usize = 300;
/// Latency buckets: bucket `i` holds durations in `[2^i, 2^(i+1))` microseconds; the last
/// one everything from about 33 s up.
const BUCKETS: usize = 26;
/// Errors of one upstream kept for the page (the newest).
const ERRORS_KEPT: usize = 32;
/// An upstream error is "recent" for this long.
pub const RECENT: Duration = Duration::from_secs(300);

#[derive(Default)]
pub struct Activity {
    requests: AtomicU64,
    /// 1xx..5xx.
    classes: [AtomicU64; 5],
    rate_limited: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    ring: Mutex<Ring>,
    /// Upstream authority -> its latest errors.
    upstream_errors: Mutex<HashMap<String, VecDeque<UpstreamError>>>,
}

/// One second of an environment's traffic.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sample {
    /// Unix seconds at the end of the second.
    pub t: u64,
    pub requests: u64,
    /// Responses by class: `[1xx, 2xx, 3xx, 4xx, 5xx]`.
    pub classes: [u64; 5],
    pub rate_limited: u64,
    /// Latency percentiles in milliseconds (upper bound of the bucket); 0 without traffic.
    pub p50_ms: f64,
    pub p99_ms: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct UpstreamError {
    /// Unix seconds.
    pub at: u64,
    pub kind: &'static str,
}

#[derive(Default)]
struct Ring {
    samples: VecDeque<Sample>,
    /// The counters at the previous tick.
    last: Totals,
}

#[derive(Default, Clone, Copy)]
struct Totals {
    requests: u64,
    classes: [u64; 5],
    rate_limited: u64,
    latency: [u64; BUCKETS],
}

impl Activity {
    /// Called once per answered request.
    pub fn record(&self, status: u16, elapsed: Duration, rate_limited: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(class) = (status / 100)
            .checked_sub(1)
            .and_then(|c| self.classes.get(usize::from(c)))
        {
            class.fetch_add(1, Ordering::Relaxed);
        }
        if rate_limited {
            self.rate_limited.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(elapsed.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let bucket = (micros.ilog2() as usize).min(BUCKETS - 1);
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_upstream_error(&self, upstream: &str, kind: &'static str) {
        let at = crate::clock::unix_now();
        let Ok(mut map) = self.upstream_errors.lock() else {
            return;
        };
        let errors = map.entry(upstream.to_owned()).or_default();
        if errors.len() == ERRORS_KEPT {
            errors.pop_front();
        }
        errors.push_back(UpstreamError { at, kind });
    }

    /// The errors of `upstream` within [`RECENT`], oldest first.
    pub fn recent_errors(&self, upstream: &str) -> Vec<UpstreamError> {
        let since = crate::clock::unix_now().saturating_sub(RECENT.as_secs());
        self.upstream_errors
            .lock()
            .ok()
            .and_then(|map| {
                map.get(upstream)
                    .map(|e| e.iter().filter(|e| e.at >= since).cloned().collect())
            })
            .unwrap_or_default()
    }

    /// Closes the current second: appends its sample to the ring.
    pub fn tick(&self, now: SystemTime) {
        let totals = self.totals();
        let Ok(mut ring) = self.ring.lock() else {
            return;
        };
        let last = ring.last;
        let mut latency = [0u64; BUCKETS];
        for (i, l) in latency.iter_mut().enumerate() {
            *l = totals.latency[i].saturating_sub(last.latency[i]);
        }
        let mut classes = [0u64; 5];
        for (i, c) in classes.iter_mut().enumerate() {
            *c = totals.classes[i].saturating_sub(last.classes[i]);
        }
        let sample = Sample {
            t: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            requests: totals.requests.saturating_sub(last.requests),
            classes,
            rate_limited: totals.rate_limited.saturating_sub(last.rate_limited),
            p50_ms: percentile_ms(&latency, 0.50),
            p99_ms: percentile_ms(&latency, 0.99),
        };
        if ring.samples.len() == RING_SECONDS {
            ring.samples.pop_front();
        }
        ring.samples.push_back(sample);
        ring.last = totals;
    }

    /// The ring, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.ring
            .lock()
            .map(|r| r.samples.iter().copied().collect())
            .unwrap_or_default()
    }

    pub fn total_requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn total_rate_limited(&self) -> u64 {
        self.rate_limited.load(Ordering::Relaxed)
    }

    fn totals(&self) -> Totals {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Totals {
            requests: load(&self.requests),
            classes: std::array::from_fn(|i| load(&self.classes[i])),
            rate_limited: load(&self.rate_limited),
            latency: std::array::from_fn(|i| load(&self.latency[i])),
        }
    }
}

/// The upper bound (ms) of the bucket holding the `q` quantile.
fn percentile_ms(buckets: &[u64; BUCKETS], q: f64) -> f64 {
    let n: u64 = buckets.iter().sum();
    if n == 0 {
        return 0.0;
    }
    let rank = ((n as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return (1u64 << (i + 1)) as f64 / 1000.0;
        }
    }
    (1u64 << BUCKETS) as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tick_turns_counters_into_one_second_sample() {
        let a = Activity::default();
        for _ in 0..98 {
            a.record(200, Duration::from_micros(300), false);
        }
        a.record(429, Duration::from_micros(40), true);
        a.record(502, Duration::from_millis(20), false);
        let t = UNIX_EPOCH + Duration::from_secs(1_000);
        a.tick(t);
        a.tick(t + Duration::from_secs(1));
        let s = a.samples();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].requests, 100);
        assert_eq!(s[0].classes, [0, 98, 0, 1, 1]);
        assert_eq!(s[0].rate_limited, 1);
        assert_eq!(s[0].p50_ms, 0.512, "300 µs falls in [256, 512) µs");
        assert_eq!(s[0].p99_ms, 0.512);
        assert_eq!(s[1].requests, 0, "the next second starts from zero");
        assert_eq!(s[1].p50_ms, 0.0);
    }

    #[test]
    fn the_ring_keeps_the_last_five_minutes() {
        let a = Activity::default();
        for i in 0..(RING_SECONDS as u64 + 10) {
            a.tick(UNIX_EPOCH + Duration::from_secs(i));
        }
        let s = a.samples();
        assert_eq!(s.len(), RING_SECONDS);
        assert_eq!(s[0].t, 10);
    }

    #[test]
    fn upstream_errors_are_bounded() {
        let a = Activity::default();
        for _ in 0..100 {
            a.record_upstream_error("127.0.0.1:9", "connect");
        }
        assert_eq!(a.recent_errors("127.0.0.1:9").len(), ERRORS_KEPT);
        assert!(a.recent_errors("other:1").is_empty());
    }
}
