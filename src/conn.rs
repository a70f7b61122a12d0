//! What the listener hands the request pipeline about a client connection, below
//! both: the signals its IO wrapper raises, and the guard that keeps its place under
//! the connection limits.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::task::AtomicWaker;

use crate::clock::monotonic_ns;

/// What the connection's IO wrapper reports to the rest of the connection.
#[derive(Debug, Default)]
pub struct ConnSignals {
    pub bare_lf: AtomicBool,
    pub length_and_chunked: AtomicBool,
    pub activity: AtomicU64,
    /// Requests that reached the handler on this connection.
    pub requests: AtomicU64,
    /// Requests being handled (not counting response bodies still streaming, which
    /// show up as activity).
    pub in_flight: AtomicU64,
    /// HTTP/1 request bytes arrived while no request was being handled: a head is
    /// under way. Cleared when the request reaches the handler.
    pub head_started: AtomicBool,
    /// The response-head deadline of the HTTP/1 request in flight.
    pub deadline: RequestDeadline,
    /// The gateway is draining: the connection finishes what it serves and closes.
    pub drain: Drain,
}

/// The drain signal for one connection, raised by its watchdog and read by the
/// connection's task at its next wake-up: a flag and a waker, where hyper-util's
/// graceful watcher polled a `Notify` at every wake-up of every connection.
#[derive(Debug, Default)]
pub struct Drain {
    raised: AtomicBool,
    waker: AtomicWaker,
    /// The connection's task registered its waker. Once is enough: the connection's
    /// future is polled by that one task for its whole life, whose waker stays valid,
    /// and the drain is raised (and the waker taken) once. Registering at every
    /// wake-up cost two compare-and-swaps each (`poll_raised`: ~60 ns a request in a
    /// profile).
    registered: AtomicBool,
}

impl Drain {
    pub fn raise(&self) {
        self.raised.store(true, SeqCst);
        self.waker.wake();
    }

    /// Whether the drain was raised; if not, the task polling is woken when it is.
    /// Always polled from the same task (see `registered`).
    pub fn poll_raised(&self, cx: &mut std::task::Context<'_>) -> bool {
        if !self.registered.load(Relaxed) {
            self.waker.register(cx.waker());
            self.registered.store(true, Relaxed);
        }
        self.raised.load(SeqCst)
    }
}

/// The `request_timeout` of a connection's HTTP/1 request, kept by the connection's
/// watchdog instead of a timer per request: arming it is a clock read and an atomic
/// store. HTTP/1 has one request in flight per connection, so one slot is enough.
///
/// The watchdog sleeps until its next tick or the armed deadline, whichever is
/// sooner, and publishes when that is (`watch_until`); a request whose deadline falls
/// before it wakes the watchdog to look again. Instants are
/// [`monotonic_ns`](crate::clock::monotonic_ns); 0 is "none".
#[derive(Debug, Default)]
pub struct RequestDeadline {
    armed: AtomicU64,
    /// The last deadline the watchdog found passed while still armed.
    expired: AtomicU64,
    watch_until: AtomicU64,
    /// Set with a wake of `watchdog`: a deadline before `watch_until` was armed.
    rearm: AtomicBool,
    request: AtomicWaker,
    watchdog: AtomicWaker,
}

/// The request's deadline passed before `inner` finished.
#[derive(Debug)]
pub struct Elapsed;

impl RequestDeadline {
    /// `inner` with `timeout` armed from now: `Err(Elapsed)` once the watchdog finds
    /// the deadline passed. Disarmed when the returned future ends or is dropped.
    pub fn run<F: Future>(&self, timeout: Duration, inner: F) -> Deadlined<'_, F> {
        let at = monotonic_ns(Instant::now())
            .saturating_add(u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX));
        Deadlined {
            inner,
            armed: Armed::new(self, at),
        }
    }

    /// For the watchdog: when to look next, `next_tick` or the armed deadline if
    /// sooner, published before it is returned. Re-read until stable, so that a
    /// request arming meanwhile is either seen here or sees the published instant.
    pub fn watch(&self, next_tick: u64) -> u64 {
        loop {
            let armed = self.armed.load(SeqCst);
            let wake_at = if armed != 0 && armed != self.expired.load(SeqCst) {
                armed.min(next_tick)
            } else {
                next_tick
            };
            self.watch_until.store(wake_at, SeqCst);
            if self.armed.load(SeqCst) == armed {
                return wake_at;
            }
        }
    }

    /// For the watchdog, once per wake-up: registers it to be woken by a rearm, and
    /// says whether one happened.
    pub fn rearmed(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.watchdog.register(cx.waker());
        self.rearm.swap(false, SeqCst)
    }

    /// For the watchdog: `now` is past the armed deadline, so the request fails.
    pub fn expire_if_passed(&self, now: u64) {
        let armed = self.armed.load(SeqCst);
        if armed != 0 && armed <= now {
            self.expired.store(armed, SeqCst);
            self.request.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A future under a [`RequestDeadline`]. A struct rather than an `async` block,
    /// which would hold `inner` twice (as captured, and as pinned): the request's
    /// future is copied whole each time it moves.
    pub struct Deadlined<'a, F> {
        #[pin]
        inner: F,
        armed: Armed<'a>,
    }
}

impl<F: Future> Future for Deadlined<'_, F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Armed(deadline, at) = *this.armed;
        deadline.request.register(cx.waker());
        if let Poll::Ready(out) = this.inner.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if deadline.expired.load(SeqCst) == at {
            return Poll::Ready(Err(Elapsed));
        }
        Poll::Pending
    }
}

/// An armed deadline, disarmed on drop.
struct Armed<'a>(&'a RequestDeadline, u64);

impl<'a> Armed<'a> {
    fn new(deadline: &'a RequestDeadline, at: u64) -> Self {
        deadline.armed.store(at, SeqCst);
        if at < deadline.watch_until.load(SeqCst) {
            deadline.rearm.store(true, SeqCst);
            deadline.watchdog.wake();
        }
        Armed(deadline, at)
    }
}

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        let _ = self.0.armed.compare_exchange(self.1, 0, SeqCst, SeqCst);
    }
}

/// A connection's place under `max_connections` (and `max_connections_per_ip`), held
/// for as long as the connection or a tunnel made from it lives. Opaque above the
/// listener: the pipeline only keeps it alive.
pub type Held = Arc<dyn std::fmt::Debug + Send + Sync>;
