//! One sweeper for every client connection: it closes those idle for `idle_timeout`,
//! those whose first request or request head is late, fails HTTP/1 requests past
//! their `request_timeout`, and tells every connection when the gateway drains.
//!
//! nginx keeps one timer tree for all its connections. specter kept a watchdog task
//! and timer per connection: 512 bytes of task for every idle connection, and a task
//! and a timer to set up for every accept. The sweeper holds a list of 72-byte
//! entries instead, and looks at each connection's counters a few times per timeout
//! (a few atomic loads each), so that a request costs it nothing.
//!
//! Deadlines are kept to within a quarter of the shortest connection timeout, late,
//! never early; a request's `request_timeout` exactly, through the [`Alarm`].

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::FutureExt;

use crate::clock::{monotonic_instant, monotonic_ns, nanos};
use crate::conn::{Alarm, ConnSignals};
use crate::proxy::ConnInfo;

/// The connections being watched, and when to look at them next.
pub struct Sweeper {
    watched: Mutex<Watched>,
    alarm: Arc<Alarm>,
    /// A quarter of the shortest timeout of any connection watched so far: how often
    /// the sweeper looks. Only ever lowered, so that a reload that shortens a timeout
    /// is kept to for the connections accepted after it.
    period_ns: AtomicU64,
}

#[derive(Default)]
struct Watched {
    entries: Vec<Entry>,
    /// The gateway drains: connections watched from now on are told at once.
    draining: bool,
}

/// One connection, as the sweeper last saw it. Instants are [`monotonic_ns`].
struct Entry {
    /// Weak: a connection that ended is dropped at once (its place under
    /// `max_connections` with it), and forgotten at the next look.
    conn: Weak<ConnInfo>,
    accepted: u64,
    idle_timeout: u64,
    header_read_timeout: u64,
    /// The activity counter as last seen, and since when it has not moved.
    activity: u64,
    quiet_since: u64,
    /// The request head under way: the request count when it was first seen, and
    /// when (0: none).
    head: (u64, u64),
    /// Told to close now: not told again.
    closed: bool,
}

impl Sweeper {
    pub fn new() -> Sweeper {
        Sweeper {
            watched: Mutex::default(),
            alarm: Arc::default(),
            period_ns: u64::MAX.into(),
        }
    }

    /// The alarm every watched connection's request deadline rings.
    pub fn alarm(&self) -> Arc<Alarm> {
        self.alarm.clone()
    }

    /// Watches `conn` from now, with the timeouts it was accepted under.
    pub fn watch(
        &self,
        conn: &Arc<ConnInfo>,
        idle_timeout: Duration,
        header_read_timeout: Duration,
    ) {
        let now = monotonic_ns(Instant::now());
        let entry = Entry {
            conn: Arc::downgrade(conn),
            accepted: now,
            idle_timeout: nanos(idle_timeout),
            header_read_timeout: nanos(header_read_timeout),
            activity: 0,
            quiet_since: now,
            head: (0, 0),
            closed: false,
        };
        // At least a millisecond: validation keeps timeouts far above it, and a
        // sweeper looking every few nanoseconds would take the CPU.
        let period = (entry.idle_timeout.min(entry.header_read_timeout) / 4).max(1_000_000);
        {
            let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
            if watched.draining {
                conn.signals.close.drain();
            }
            watched.entries.push(entry);
        }
        self.period_ns.fetch_min(period, Relaxed);
        self.alarm.ring_by(now.saturating_add(period));
    }

    /// Tells every connection, and every one watched from now on, to finish what it
    /// serves and close.
    pub fn drain(&self) {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        watched.draining = true;
        for entry in &watched.entries {
            if let Some(conn) = entry.conn.upgrade() {
                conn.signals.close.drain();
            }
        }
    }

    /// Looks at the connections at every tick and armed request deadline, until no
    /// connection is left and none can come (no listener or handshake holds the
    /// sweeper any more).
    pub async fn run(self: Arc<Self>) {
        let mut sleep = std::pin::pin!(tokio::time::sleep(Duration::ZERO));
        loop {
            let now = monotonic_ns(Instant::now());
            if now >= self.alarm.at() {
                let period = self.period_ns.load(Relaxed);
                self.alarm.set(now.saturating_add(period));
                match self.look(now) {
                    Some(deadline) => self.alarm.lower(deadline),
                    None if Arc::strong_count(&self) == 1 => return,
                    None => {}
                }
            }
            let at = monotonic_instant(self.alarm.at()).into();
            if sleep.deadline() != at {
                sleep.as_mut().reset(at);
            }
            std::future::poll_fn(|cx| {
                if self.alarm.rung(cx) || sleep.poll_unpin(cx).is_ready() {
                    return Poll::Ready(());
                }
                Poll::Pending
            })
            .await;
        }
    }

    /// Closes every connection past a deadline, fails requests past theirs, forgets
    /// connections that ended. Returns the earliest request deadline to come, or
    /// `None` if no connection is left.
    fn look(&self, now: u64) -> Option<u64> {
        let mut watched = self.watched.lock().unwrap_or_else(PoisonError::into_inner);
        let mut earliest = u64::MAX;
        watched.entries.retain_mut(|entry| {
            let Some(conn) = entry.conn.upgrade() else {
                return false;
            };
            if let Some(deadline) = conn.signals.deadline.check(now) {
                earliest = earliest.min(deadline);
            }
            if !entry.closed {
                if let Some(reason) = entry.overrun(&conn.signals, now) {
                    tracing::debug!(peer = %conn.peer, "{reason}; closing");
                    conn.signals.close.now();
                    entry.closed = true;
                }
            }
            true
        });
        let entries = &mut watched.entries;
        // After a wave of connections, the list gives back what it no longer needs.
        if entries.capacity() > 64 && entries.capacity() > 4 * entries.len() {
            entries.shrink_to(2 * entries.len());
        }
        (!entries.is_empty()).then_some(earliest)
    }
}

impl Entry {
    /// Which deadline the connection is past, if any.
    fn overrun(&mut self, signals: &ConnSignals, now: u64) -> Option<&'static str> {
        let requests = signals.requests.load(Relaxed);
        // The first request must arrive within header_read_timeout of the accept
        // (HTTP/2 has no header timer of its own).
        if requests == 0 && now.saturating_sub(self.accepted) >= self.header_read_timeout {
            return Some("no request within header_read_timeout");
        }
        // A head is timed from when it was first seen: it began before, so the
        // deadline is kept late, never early.
        self.head = match (signals.head_started.load(Relaxed), self.head) {
            (true, (n, since)) if since != 0 && n == requests => (n, since),
            (true, _) => (requests, now),
            (false, _) => (0, 0),
        };
        if self.head.1 != 0 && now.saturating_sub(self.head.1) >= self.header_read_timeout {
            return Some("request head not complete within header_read_timeout");
        }
        let activity = signals.activity.load(Relaxed);
        if activity != self.activity || signals.in_flight.load(Relaxed) > 0 {
            (self.activity, self.quiet_since) = (activity, now);
        }
        (now.saturating_sub(self.quiet_since) >= self.idle_timeout).then_some("idle connection")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn conn(sweeper: &Sweeper) -> Arc<ConnInfo> {
        Arc::new(ConnInfo {
            slot: Arc::new(()),
            peer: "127.0.0.1:1".parse().unwrap(),
            tls: false,
            client_cert_subject: None,
            signals: Arc::new(ConnSignals::new(sweeper.alarm())),
            forwarding: Default::default(),
        })
    }

    fn entry(accepted: u64) -> Entry {
        Entry {
            conn: Weak::new(),
            accepted,
            idle_timeout: 1000 * MS,
            header_read_timeout: 100 * MS,
            activity: 0,
            quiet_since: accepted,
            head: (0, 0),
            closed: false,
        }
    }

    /// Each deadline is kept from when the sweeper could first know of it: never
    /// early, whenever it looks.
    #[test]
    fn deadlines_are_kept_late_never_early() {
        let signals = ConnSignals::default();
        let mut e = entry(1);
        assert_eq!(
            e.overrun(&signals, 100 * MS),
            None,
            "99 ms after the accept"
        );
        assert_eq!(
            e.overrun(&signals, 101 * MS),
            Some("no request within header_read_timeout")
        );

        // A second head, first seen at 500 ms, is timed from then.
        signals.requests.store(1, Relaxed);
        signals.head_started.store(true, Relaxed);
        signals.activity.store(1, Relaxed);
        assert_eq!(e.overrun(&signals, 500 * MS), None);
        assert_eq!(e.overrun(&signals, 599 * MS), None);
        assert_eq!(
            e.overrun(&signals, 600 * MS),
            Some("request head not complete within header_read_timeout")
        );

        // Idle from the last activity seen (at 500 ms), not while a request is served.
        signals.head_started.store(false, Relaxed);
        signals.in_flight.store(1, Relaxed);
        assert_eq!(e.overrun(&signals, 5000 * MS), None, "busy");
        signals.in_flight.store(0, Relaxed);
        assert_eq!(e.overrun(&signals, 5999 * MS), None);
        assert_eq!(e.overrun(&signals, 6000 * MS), Some("idle connection"));
    }

    /// A request deadline before the sweeper's next look rings it awake on time; a
    /// connection that ended is forgotten, and the sweeper ends once no listener or
    /// handshake can bring another.
    #[tokio::test]
    async fn request_deadlines_ring_and_the_sweeper_ends_with_its_connections() {
        let sweeper = Arc::new(Sweeper::new());
        let running = tokio::spawn(sweeper.clone().run());
        let conn = conn(&sweeper);
        // Looks every 15 s: only the alarm can wake it for a 50 ms deadline.
        sweeper.watch(&conn, Duration::from_secs(60), Duration::from_secs(60));
        let started = Instant::now();
        let timeout = Duration::from_millis(50);
        let out = conn
            .signals
            .deadline
            .run(timeout, std::future::pending::<()>())
            .await;
        assert!(out.is_err());
        let took = started.elapsed();
        assert!(
            took >= timeout && took < timeout * 4,
            "failed after {took:?}"
        );

        // A connection with 40 ms timeouts makes it look every 10 ms: the ends are
        // seen at the next look.
        let short = self::conn(&sweeper);
        sweeper.watch(&short, Duration::from_millis(40), Duration::from_millis(40));
        drop((conn, short, sweeper));
        tokio::time::timeout(Duration::from_secs(10), running)
            .await
            .expect("the sweeper ended")
            .unwrap();
    }
}
