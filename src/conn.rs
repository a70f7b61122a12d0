//! What the listener hands the request pipeline about a client connection, below
//! both: the signals its IO wrapper raises, how the listener's sweeper asks it to close
//! and times its HTTP/1 request, and the guard that keeps its place under the
//! connection limits.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::SeqCst};
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
    /// The connection is asked to finish what it serves (the gateway drains) or to
    /// close now (a deadline passed).
    pub close: Close,
}

impl ConnSignals {
    /// Signals whose request deadlines wake `alarm`'s sweeper. Every field spelled
    /// out: `..Default::default()` would allocate an `Alarm` per connection to drop.
    pub fn new(alarm: Arc<Alarm>) -> ConnSignals {
        ConnSignals {
            bare_lf: AtomicBool::default(),
            length_and_chunked: AtomicBool::default(),
            activity: AtomicU64::default(),
            requests: AtomicU64::default(),
            in_flight: AtomicU64::default(),
            head_started: AtomicBool::default(),
            deadline: RequestDeadline {
                armed: AtomicU64::default(),
                expired: AtomicU64::default(),
                request: TaskWaker::default(),
                alarm,
            },
            close: Close::default(),
        }
    }
}

/// How a connection is asked to end, by the sweeper that watches every connection,
/// and read by the connection's task at its next wake-up: a flag and a waker, where
/// hyper-util's graceful watcher polled a `Notify` at every wake-up of every
/// connection, and where a task aborted from outside needed a handle kept for it.
#[derive(Debug, Default)]
pub struct Close {
    /// 0, [`Closing::Drain`] or [`Closing::Now`]; only ever raised.
    asked: AtomicU8,
    waker: TaskWaker,
}

/// The waker of the one task that polls a connection's future, kept for the
/// connection's life. A tokio task's waker stays valid as long as its task, so once
/// is enough: an `AtomicWaker` registered at every poll cost two compare-and-swaps
/// each (~60 ns a request in a profile). And unlike an `AtomicWaker`'s, waking does not
/// consume it: a signal raised twice (a drain, then a passed deadline; a request's
/// deadline, then the next request's) wakes the task each time.
#[derive(Debug, Default)]
struct TaskWaker(std::sync::OnceLock<std::task::Waker>);

impl TaskWaker {
    /// Keeps the polling task's waker, the first time. The fence pairs with
    /// [`TaskWaker::wake`]'s: the state read after this is either the state raised
    /// before a wake that found no waker, or that wake finds this one.
    fn register(&self, cx: &std::task::Context<'_>) {
        if self.0.get().is_none() {
            let _ = self.0.set(cx.waker().clone());
            std::sync::atomic::fence(SeqCst);
        }
    }

    /// Wakes the task, if it registered; call after raising the state it reads.
    fn wake(&self) {
        std::sync::atomic::fence(SeqCst);
        if let Some(waker) = self.0.get() {
            waker.wake_by_ref();
        }
    }
}

/// What [`Close`] asks of the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Closing {
    No = 0,
    /// Finish what is in flight, then close (the gateway drains).
    Drain = 1,
    /// Close now (a deadline passed).
    Now = 2,
}

impl Close {
    pub fn drain(&self) {
        self.ask(Closing::Drain);
    }

    pub fn now(&self) {
        self.ask(Closing::Now);
    }

    fn ask(&self, closing: Closing) {
        self.asked.fetch_max(closing as u8, SeqCst);
        self.waker.wake();
    }

    /// What is asked; until closing now, the task polling is woken when more is.
    /// Always polled from the connection's one task (see `TaskWaker`).
    pub fn poll(&self, cx: &mut std::task::Context<'_>) -> Closing {
        self.waker.register(cx);
        match self.asked.load(SeqCst) {
            0 => Closing::No,
            1 => Closing::Drain,
            _ => Closing::Now,
        }
    }
}

/// When the sweeper (see `server::sweeper`) next looks at the connections it
/// watches, shared by all of them: a request whose deadline falls sooner brings that
/// forward. Instants are [`monotonic_ns`].
#[derive(Debug, Default)]
pub struct Alarm {
    at: AtomicU64,
    /// Set with a wake of `sweeper`: `at` was brought forward.
    rung: AtomicBool,
    sweeper: AtomicWaker,
}

impl Alarm {
    /// Makes the sweeper look again by `at`, waking it if it meant to look later.
    pub fn ring_by(&self, at: u64) {
        if at < self.at.load(SeqCst) {
            self.at.fetch_min(at, SeqCst);
            self.rung.store(true, SeqCst);
            self.sweeper.wake();
        }
    }

    /// For the sweeper: when it looks next.
    pub fn at(&self) -> u64 {
        self.at.load(SeqCst)
    }

    /// For the sweeper, before it looks: the latest it looks again. Set before the
    /// look, so that a deadline armed during it is either seen by the look or rings.
    pub fn set(&self, at: u64) {
        self.at.store(at, SeqCst);
    }

    /// For the sweeper, after it looked: brings its next look forward to `at`. Not a
    /// store: a deadline armed during the look may have brought it further forward.
    pub fn lower(&self, at: u64) {
        self.at.fetch_min(at, SeqCst);
    }

    /// For the sweeper, once per wake-up: registers it to be woken by a ring, and says
    /// whether one happened.
    pub fn rung(&self, cx: &mut std::task::Context<'_>) -> bool {
        self.sweeper.register(cx.waker());
        self.rung.swap(false, SeqCst)
    }
}

/// The `request_timeout` of a connection's HTTP/1 request, kept by the sweeper
/// instead of a timer per request: arming it is a clock read and an atomic store.
/// HTTP/1 has one request in flight per connection, so one slot is enough.
///
/// The sweeper sleeps until its next look or the earliest armed deadline, whichever
/// is sooner (the [`Alarm`]); a request whose deadline falls before that rings the
/// alarm. Instants are [`crate::clock::monotonic_ns`]; 0 is "none".
#[derive(Debug, Default)]
pub struct RequestDeadline {
    armed: AtomicU64,
    /// The last deadline the sweeper found passed while still armed.
    expired: AtomicU64,
    /// An HTTP/1 connection's requests are polled by the connection's one task.
    request: TaskWaker,
    alarm: Arc<Alarm>,
}

/// The request's deadline passed before `inner` finished.
#[derive(Debug)]
pub struct Elapsed;

impl RequestDeadline {
    /// `inner` with `timeout` armed from now: `Err(Elapsed)` once the sweeper finds
    /// the deadline passed. Disarmed when the returned future ends or is dropped.
    pub fn run<F: Future>(&self, timeout: Duration, inner: F) -> Deadlined<'_, F> {
        let at = monotonic_ns(Instant::now()).saturating_add(crate::clock::nanos(timeout));
        Deadlined {
            inner,
            armed: Armed::new(self, at),
        }
    }

    /// For the sweeper: fails the request if `now` is past its deadline, and returns
    /// the deadline still to come, if one is armed.
    pub fn check(&self, now: u64) -> Option<u64> {
        let armed = self.armed.load(SeqCst);
        if armed == 0 || armed == self.expired.load(SeqCst) {
            return None;
        }
        if armed > now {
            return Some(armed);
        }
        self.expired.store(armed, SeqCst);
        self.request.wake();
        None
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
        deadline.request.register(cx);
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
        deadline.alarm.ring_by(at);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A drain and then a close each wake the connection's task: the second signal
    /// is not lost because the first one took the waker.
    ///
    /// Failing when written: the waker was an `AtomicWaker` registered once, and
    /// waking one takes its waker, so the close after a drain woke nothing.
    #[tokio::test]
    async fn a_drain_then_a_close_wake_the_task_each_time() {
        let close = Arc::new(Close::default());
        let (seen, mut polls) = tokio::sync::mpsc::unbounded_channel();
        let polled = close.clone();
        let task = tokio::spawn(std::future::poll_fn(move |cx| {
            let closing = polled.poll(cx);
            seen.send(closing).unwrap();
            if closing == Closing::Now {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }));
        assert_eq!(polls.recv().await, Some(Closing::No));
        close.drain();
        assert_eq!(polls.recv().await, Some(Closing::Drain));
        close.now();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the close woke the task")
            .unwrap();
    }
}
