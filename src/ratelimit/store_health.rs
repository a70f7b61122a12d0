//! Whether the fleet's rate-limit store is answering, and why not: read by `/readyz`
//! and by the store's failure log.
//!
//! A check that times out says nothing about the cause (the connection manager may be
//! busy retrying a refused connect behind it), so the cause comes from [`diagnose`]: one
//! fresh connection and a `PING`, whose own error (refused, unreachable, auth, timeout)
//! is what happened.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::AsyncConnectionConfig;

/// Written on every store outcome: one relaxed load per request while healthy, a store
/// only when the state flips.
#[derive(Debug)]
pub struct StoreHealth {
    failing: AtomicBool,
    /// The last failure's cause, for people (never the store's URL: it may hold a password).
    cause: Mutex<Option<String>>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last cause taken: at most one a second per
    /// store, whatever the log throttle (shared by every store of the process) allows.
    last_cause_ms: AtomicU64,
}

impl Default for StoreHealth {
    fn default() -> Self {
        StoreHealth {
            failing: AtomicBool::new(false),
            cause: Mutex::new(None),
            epoch: Instant::now(),
            last_cause_ms: AtomicU64::new(0),
        }
    }
}

impl StoreHealth {
    /// True at most once a second: time to find out (and record) why the store fails.
    pub fn cause_due(&self) -> bool {
        let now = (self.epoch.elapsed().as_millis() as u64).max(1);
        let last = self.last_cause_ms.load(Ordering::Relaxed);
        (last == 0 || now.saturating_sub(last) >= 1000)
            && self
                .last_cause_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    pub fn succeeded(&self) {
        if self.failing.load(Ordering::Relaxed) && self.failing.swap(false, Ordering::Relaxed) {
            tracing::info!("rate-limit store answering again");
        }
    }

    /// Marks the store failing; `cause` is taken only on the flip, later causes arrive
    /// through [`set_cause`](Self::set_cause) at the failure log's pace.
    pub fn failed(&self, cause: impl FnOnce() -> String) {
        if !self.failing.load(Ordering::Relaxed) && !self.failing.swap(true, Ordering::Relaxed) {
            self.set_cause(cause());
        }
    }

    pub fn set_cause(&self, cause: String) {
        if let Ok(mut slot) = self.cause.lock() {
            *slot = Some(cause);
        }
    }

    /// `Some(cause)` while the last outcome was a failure.
    pub fn failure(&self) -> Option<String> {
        if !self.failing.load(Ordering::Relaxed) {
            return None;
        }
        let cause = self.cause.lock().ok().and_then(|c| c.clone());
        Some(cause.unwrap_or_else(|| "no answer".to_owned()))
    }
}

/// What a fresh connection to `url` runs into within `deadline`.
pub async fn diagnose(url: &str, deadline: Duration) -> String {
    let attempt = async {
        let client = redis::Client::open(url)?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(deadline))
            .set_response_timeout(Some(deadline));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(deadline * 2, attempt).await {
        Ok(Ok(_)) => "a fresh connection answers PING: the store is slow, not down".to_owned(),
        Ok(Err(e)) => format!("a fresh connection: {}", without_repeats(&e)),
        Err(_) => format!("a fresh connection got no answer within {deadline:?} either"),
    }
}

/// The error and its sources, leaving out a source whose text is already there (the
/// redis crate shows its IO cause in its own message too).
fn without_repeats(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}
