//! Repeated warnings become one line per interval: a warning that any request or
//! connection can trigger (an upstream down, the rate-limit store down, an accept
//! failure) is logged the first time at once, then at most once per [`INTERVAL`], with
//! the number of occurrences it stood for: `... (1,234 more in the last 10s)`.
//!
//! A call site owns a `static` [`Throttle`] and names what it reports on with a key
//! (an environment, an upstream, a listener: names from the config, never from a
//! client), so one failing upstream does not hide the first failure of another.
//!
//! Cost, per call: one `arc-swap` load (lock-free), a SipHash of the key parts, a
//! hash-map probe, a monotonic clock read and two or three relaxed atomics; no lock and
//! no allocation. Measured (`cargo bench --bench logthrottle`, this 2-core host under
//! other builds): ~140 ns for a suppressed occurrence, ~290 ns while a second thread
//! hits the same key; formatting and writing the line it replaces costs microseconds.
//! A key's first call copies the site's small map (allocation, once per key). Each site
//! keeps at most [`MAX_KEYS`] slots (two `AtomicU64`s and the key's text); further keys
//! share one overflow slot, so a config with more names than that loses their
//! independence, never the bound.
//!
//! Occurrences suppressed after a line are reported with the next one, or, when none
//! comes within the interval, in a summary line of their own (the message, what it is
//! about and the count; the cause went with the first line) written by one background
//! thread that wakes once a second and exists only once a throttled warning happened.
//! Exact totals are on `/metrics` (`specter_upstream_errors_total`,
//! `specter_requests_total`, `specter_rate_limit_store_errors_total`).

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

/// The shortest gap between two lines from one site and key.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// Keys one site tells apart; see the module docs.
pub const MAX_KEYS: usize = 64;

/// A fixed-key hasher: keys come from the config and static strings, not from clients,
/// so there is nothing to randomise against, and a fixed hasher needs no state.
type Fixed = BuildHasherDefault<DefaultHasher>;

/// One site's slots by key hash, replaced whole (copy on write) when a key is added.
type Slots = HashMap<u64, Arc<Slot>, BuildHasherDefault<IdentityHasher>>;

/// The state behind one site's warning lines.
pub struct Throttle {
    /// The site's message, for the summaries the flusher writes by itself.
    message: &'static str,
    /// Whether the flusher knows this site (set with its first key).
    registered: AtomicBool,
    slots: ArcSwapOption<Slots>,
}

impl Throttle {
    /// `message` is the text the site logs, repeated in the flusher's summaries.
    pub const fn new(message: &'static str) -> Throttle {
        Throttle {
            message,
            registered: AtomicBool::new(false),
            slots: ArcSwapOption::const_empty(),
        }
    }

    /// `Some` when this occurrence should be logged now (append the [`Report`] to the
    /// message); `None` when it was counted for the next line instead. Counts nobody
    /// reports within an interval are logged by a background thread as a summary of
    /// their own (`MESSAGE (12 more in the last 10s)`, with the key).
    pub fn check(&'static self, key: &[&str]) -> Option<Report> {
        if !self.registered.load(Ordering::Relaxed)
            && !self.registered.swap(true, Ordering::Relaxed)
        {
            flusher::register(self);
        }
        self.check_at(key, now_ms())
    }

    fn check_at(&self, key: &[&str], now_ms: u64) -> Option<Report> {
        let hash = hash_key(key);
        let slots = self.slots.load();
        match slots.as_deref().and_then(|s| s.get(&hash)) {
            Some(slot) => slot.admit(now_ms),
            None => {
                drop(slots);
                self.insert(hash, key).admit(now_ms)
            }
        }
    }

    /// The slot for `hash`, made on first use (or the overflow slot once full).
    fn insert(&self, hash: u64, key: &[&str]) -> Arc<Slot> {
        let mut found = None;
        self.slots.rcu(|current| {
            let mut next = current.as_deref().cloned().unwrap_or_default();
            let (hash, label) = if next.len() >= MAX_KEYS && !next.contains_key(&hash) {
                (OVERFLOW, "(other keys)".to_owned())
            } else {
                (hash, key.join(" "))
            };
            let slot = next
                .entry(hash)
                .or_insert_with(|| Arc::new(Slot::new(label)));
            found = Some(slot.clone());
            Some(Arc::new(next))
        });
        found.unwrap_or_else(|| Arc::new(Slot::new(String::new())))
    }

    /// Hands `emit` the key and the count of every slot whose occurrences have waited
    /// an interval without a line, and restarts their interval.
    fn flush_at(&self, now_ms: u64, mut emit: impl FnMut(&str, Report)) {
        let Some(slots) = self.slots.load_full() else {
            return;
        };
        for slot in slots.values() {
            if slot.suppressed.load(Ordering::Relaxed) > 0 {
                if let Some(report) = slot.due(now_ms) {
                    emit(&slot.label, report);
                }
            }
        }
    }
}

/// The background thread that writes the summaries no later occurrence triggered.
/// A thread rather than a task: it serves every runtime, and exists only once a
/// throttled warning happened.
mod flusher {
    use std::sync::{Mutex, OnceLock};
    use std::time::Duration;

    use super::{now_ms, Throttle};

    static SITES: Mutex<Vec<&'static Throttle>> = Mutex::new(Vec::new());

    /// Once per site: never on the path of a suppressed occurrence.
    pub(super) fn register(site: &'static Throttle) {
        SITES.lock().unwrap_or_else(|e| e.into_inner()).push(site);
        static STARTED: OnceLock<()> = OnceLock::new();
        STARTED.get_or_init(|| {
            let spawned = std::thread::Builder::new()
                .name("specter-logthrottle".into())
                .spawn(run);
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "cannot start the thread that summarises repeated warnings");
            }
        });
    }

    fn run() {
        loop {
            // A second's tick: a summary comes at most a second after it is due.
            std::thread::sleep(Duration::from_secs(1));
            let sites = SITES.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for site in sites {
                site.flush_at(now_ms(), |key, report| {
                    tracing::warn!(about = key, "{}{report}", site.message);
                });
            }
        }
    }
}

/// The key hash the overflow slot lives under (a real key landing on it merely shares it).
const OVERFLOW: u64 = u64::MAX;

fn hash_key(parts: &[&str]) -> u64 {
    Fixed::default().hash_one(parts)
}

/// Milliseconds since the first call in this process, plus one (0 means "never").
fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

struct Slot {
    /// `now_ms()` of the last line; 0 before the first.
    last_ms: AtomicU64,
    /// Occurrences since the last line that were not logged.
    suppressed: AtomicU64,
    /// The key's parts, for the flusher's summaries (never a client's value).
    label: String,
}

impl Slot {
    fn new(label: String) -> Slot {
        Slot {
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            label,
        }
    }

    fn admit(&self, now_ms: u64) -> Option<Report> {
        let report = self.due(now_ms);
        if report.is_none() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
        }
        report
    }

    /// Takes the line of the current interval if it is free. One taker per interval: a
    /// thread that loses the exchange was concurrent with the line being written.
    fn due(&self, now_ms: u64) -> Option<Report> {
        let interval = INTERVAL.as_millis() as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        let due = last == 0 || now_ms.saturating_sub(last) >= interval;
        if !due
            || self
                .last_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return None;
        }
        Some(Report {
            suppressed: self.suppressed.swap(0, Ordering::Relaxed),
            since: Duration::from_millis(now_ms.saturating_sub(last)),
        })
    }
}

/// What a line stands for besides itself. Displays as nothing when it stands for
/// itself only, else as ` (1,234 more in the last 10s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub suppressed: u64,
    /// Time since the previous line from the same site and key.
    pub since: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.suppressed == 0 {
            return Ok(());
        }
        let since = Duration::from_secs(self.since.as_secs().max(1));
        write!(
            f,
            " ({} more in the last {})",
            Grouped(self.suppressed),
            humantime::format_duration(since)
        )
    }
}

/// A count with thousands separators, as people read it in a log line.
struct Grouped(u64);

impl fmt::Display for Grouped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = self.0.to_string();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                f.write_str(",")?;
            }
            write!(f, "{c}")?;
        }
        Ok(())
    }
}

/// The slots map's keys are already hashes: use them as they are.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    #[test]
    fn first_is_logged_then_one_line_per_interval_with_the_count() {
        let t = Throttle::new("test");
        let first = t
            .check_at(&["upstream_unavailable", "qa"], 1)
            .expect("first line");
        assert_eq!(first.to_string(), "", "a first line stands for itself");
        for ms in 2..1236 {
            assert_eq!(t.check_at(&["upstream_unavailable", "qa"], ms), None);
        }
        assert_eq!(t.check_at(&["upstream_unavailable", "qa"], 1 + 9 * S), None);
        let next = t
            .check_at(&["upstream_unavailable", "qa"], 1 + 10 * S)
            .expect("due after the interval");
        assert_eq!(next.suppressed, 1235);
        assert_eq!(next.to_string(), " (1,235 more in the last 10s)");
        // The count restarts with each line.
        assert_eq!(
            t.check_at(&["upstream_unavailable", "qa"], 2 + 10 * S),
            None
        );
        let third = t
            .check_at(&["upstream_unavailable", "qa"], 1 + 25 * S)
            .unwrap();
        assert_eq!(third.to_string(), " (1 more in the last 15s)");
    }

    #[test]
    fn keys_are_throttled_apart() {
        let t = Throttle::new("test");
        assert!(t.check_at(&["upstream_unavailable", "qa"], 1).is_some());
        assert!(t.check_at(&["upstream_unavailable", "qa"], 2).is_none());
        assert!(t
            .check_at(&["upstream_unavailable", "production"], 3)
            .is_some());
        assert!(t.check_at(&["upstream_timeout", "qa"], 4).is_some());
        // Parts are not concatenated: ("ab", "c") is not ("a", "bc").
        assert!(t.check_at(&["ab", "c"], 5).is_some());
        assert!(t.check_at(&["a", "bc"], 6).is_some());
    }

    #[test]
    fn keys_beyond_the_bound_share_one_slot() {
        let t = Throttle::new("test");
        let names: Vec<String> = (0..MAX_KEYS + 10).map(|i| format!("env{i}")).collect();
        for name in &names[..MAX_KEYS] {
            assert!(t.check_at(&[name], 1).is_some(), "{name}");
        }
        assert!(
            t.check_at(&[&names[MAX_KEYS]], 2).is_some(),
            "overflow's first"
        );
        for name in &names[MAX_KEYS + 1..] {
            assert!(
                t.check_at(&[name], 3).is_none(),
                "{name} shares the overflow"
            );
        }
        assert_eq!(
            t.slots.load().as_deref().map(HashMap::len),
            Some(MAX_KEYS + 1)
        );
    }

    #[test]
    fn concurrent_callers_log_once_and_lose_no_count() {
        let t = Arc::new(Throttle::new("test"));
        let logged = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let t = t.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter(|_| t.check_at(&["x"], 1).is_some())
                            .count()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .sum::<usize>()
        });
        assert_eq!(logged, 1);
        assert_eq!(t.check_at(&["x"], 1 + 10 * S).unwrap().suppressed, 3999);
    }

    #[test]
    fn a_count_left_without_a_line_is_flushed_once_due() {
        let t = Throttle::new("test");
        assert!(t.check_at(&["upstream_unavailable", "qa"], 1).is_some());
        assert!(t.check_at(&["upstream_timeout", "qa"], 1).is_some());
        for ms in 2..=13 {
            assert!(t.check_at(&["upstream_unavailable", "qa"], ms).is_none());
        }
        let flushed = |now| {
            let mut lines = Vec::new();
            t.flush_at(now, |key, report| lines.push(format!("{key}{report}")));
            lines
        };
        assert!(flushed(9 * S).is_empty(), "not due within the interval");
        assert_eq!(
            flushed(1 + 10 * S),
            ["upstream_unavailable qa (12 more in the last 10s)"],
            "a key with nothing suppressed gets no summary"
        );
        assert!(flushed(1 + 30 * S).is_empty(), "counted once");
        // The summary took the interval's line: the next occurrence waits for the next.
        assert!(t
            .check_at(&["upstream_unavailable", "qa"], 2 + 10 * S)
            .is_none());
    }

    #[test]
    fn counts_are_grouped_by_thousands() {
        for (n, text) in [
            (1, "1"),
            (999, "999"),
            (1000, "1,000"),
            (1234567, "1,234,567"),
        ] {
            assert_eq!(Grouped(n).to_string(), text);
        }
    }
}
