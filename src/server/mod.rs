//! Listeners, the accept loop, the connection cap, idle connections, and graceful drain.

pub mod io;
mod per_ip;
mod served;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, LimitsConfig};
use crate::conn::ConnSignals;
use crate::metrics::ListenerLabels;
use crate::proxy::{self, ConnInfo};
use crate::state::{BuildError, Shared, State};
use io::ClientIo;
use served::{Builders, Served};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({listener}): {source}")]
    Bind {
        listener: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Build(#[from] BuildError),
}

/// A running gateway. Dropping it does not stop it; call [`Gateway::shutdown`].
pub struct Gateway {
    shared: Arc<Shared>,
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    /// Every connection holds a receiver of it until it ends: their count is the open
    /// connections, and its `closed()` is the drain's end.
    stop_accepting: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Clone, Copy)]
enum Kind {
    Http,
    Https,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Http => "http",
            Kind::Https => "https",
        }
    }
}

impl Gateway {
    /// Builds the first snapshot, binds every configured listener and starts serving.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let limits = config.limits.clone();
        let listen = config.listen.clone();
        let metrics = crate::metrics::Metrics::new();
        let state = State::build(config, None, 1, &metrics)?;
        crate::state::release_freed_memory();
        let shared = Arc::new(Shared::new(metrics, state));
        let (stop_accepting, stop_rx) = watch::channel(false);
        let semaphore = Arc::new(Semaphore::new(limits.max_connections));
        let per_ip = Arc::new(per_ip::PerIp::default());
        let builders = Arc::new(connection_builders(&limits, &shared));
        let mut tasks = Vec::new();
        let mut bound =
            |kind: Kind, addr: Option<SocketAddr>| -> Result<Option<SocketAddr>, StartError> {
                let Some(addr) = addr else { return Ok(None) };
                let listener = bind(kind.label(), addr)?;
                let local = listener.local_addr().map_err(|source| StartError::Bind {
                    listener: kind.label(),
                    addr,
                    source,
                })?;
                let acceptor = Acceptor {
                    kind,
                    shared: shared.clone(),
                    semaphore: semaphore.clone(),
                    per_ip: per_ip.clone(),
                    builders: builders.clone(),
                };
                tasks.push(tokio::spawn(acceptor.run(listener, stop_rx.clone())));
                tracing::info!(listener = kind.label(), address = %local, "listening");
                Ok(Some(local))
            };
        let http = bound(Kind::Http, listen.http)?;
        let https = bound(Kind::Https, listen.https)?;
        let admin = match listen.admin {
            Some(addr) => {
                let listener = bind("admin", addr)?;
                let local = listener.local_addr().map_err(|source| StartError::Bind {
                    listener: "admin",
                    addr,
                    source,
                })?;
                tasks.push(tokio::spawn(crate::admin::serve(
                    listener,
                    local,
                    shared.clone(),
                    stop_rx.clone(),
                )));
                tracing::info!(listener = "admin", address = %local, "listening");
                Some(local)
            }
            None => None,
        };
        tasks.push(tokio::spawn(crate::status::sample_every_second(
            shared.clone(),
            stop_rx.clone(),
        )));
        tasks.push(tokio::spawn(reclaim_idle_limiters(
            shared.clone(),
            stop_rx.clone(),
        )));
        Ok(Gateway {
            shared,
            http,
            https,
            admin,
            stop_accepting,
            tasks,
        })
    }

    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http
    }

    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, lets in-flight requests finish (HTTP/1 connections close after
    /// their current response, HTTP/2 ones get GOAWAY), and returns once every
    /// connection is gone or `shutdown_grace` passed. Returns whether all drained.
    pub async fn shutdown(self) -> bool {
        let grace = self.shared.state.load().config.limits.shutdown_grace;
        self.shared.draining.store(true, Ordering::SeqCst);
        let _ = self.stop_accepting.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // The accept loops and the other tasks are gone: the receivers left are the
        // connections', each told to drain by the send above.
        let open = self.stop_accepting.receiver_count();
        tracing::info!(open_connections = open, grace = ?grace, "draining");
        let drained = tokio::time::timeout(grace, self.stop_accepting.closed())
            .await
            .is_ok();
        if !drained {
            tracing::warn!("shutdown grace elapsed with connections still open; closing them");
        }
        drained
    }
}

/// Every minute, per-key limiter state that has refilled completely is dropped, so
/// limiter memory follows the keys in use rather than every key ever seen.
async fn reclaim_idle_limiters(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let state = shared.state.load();
                for env in &state.environments {
                    env.limiter.retain_recent();
                }
                if let Some(failures) = &state.failed_auth {
                    failures.retain_recent();
                }
            }
            _ = stop.changed() => return,
        }
    }
}

fn bind(listener: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let std = std::net::TcpListener::bind(addr)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|source| StartError::Bind {
            listener,
            addr,
            source,
        })?;
    TcpListener::from_std(std).map_err(|source| StartError::Bind {
        listener,
        addr,
        source,
    })
}

fn connection_builders(limits: &LimitsConfig, shared: &Arc<Shared>) -> Builders<CatchingExecutor> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        // Heads are timed by `Connection::serve` from their first byte: hyper's timer
        // also runs while a keep-alive connection is idle, closing it after
        // `header_read_timeout` instead of `idle_timeout`.
        .header_read_timeout(None)
        // Both: hyper checks `max_buf_size` only while a head is incomplete, so a head
        // over it that arrives in one read would pass; `max_header_size` is checked
        // on the parsed head as well.
        .max_buf_size(limits.max_header_bytes)
        .max_header_size(limits.max_header_bytes)
        .max_headers(limits.max_headers)
        .keep_alive(true);
    let mut http2 = hyper::server::conn::http2::Builder::new(CatchingExecutor(shared.clone()));
    http2
        .timer(TokioTimer::new())
        .max_concurrent_streams(100)
        .max_header_list_size(limits.max_header_bytes as u32)
        .max_pending_accept_reset_streams(50)
        .max_local_error_reset_streams(256)
        .initial_stream_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024);
    // No HTTP/2 keep-alive pings: their traffic would keep an idle connection alive
    // forever; the idle watchdog in `Connection::serve` closes dead peers too.
    Builders { http1, http2 }
}

/// hyper's executor for what it spawns itself (an HTTP/2 stream's task, which polls
/// the response body), with panics caught.
#[derive(Clone)]
struct CatchingExecutor(pub Arc<Shared>);

impl<F> hyper::rt::Executor<F> for CatchingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        // Not an async block: it would hold the stream's future twice, as the block's
        // capture and inside what it awaits (each task twice the size).
        tokio::spawn(crate::panics::caught_in(self.0.clone(), "stream", future));
    }
}

struct Acceptor {
    kind: Kind,
    shared: Arc<Shared>,
    semaphore: Arc<Semaphore>,
    /// Shared by every listener: the limit is per address, not per port.
    per_ip: Arc<per_ip::PerIp>,
    builders: Arc<Builders<CatchingExecutor>>,
}

impl Acceptor {
    /// Accepts until told to stop. An accept error (EMFILE, ECONNABORTED...) backs off
    /// and continues; it never ends the loop. At `max_connections` the loop waits for a
    /// slot, leaving new connections in the kernel backlog.
    async fn run(self, listener: TcpListener, mut stop: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(5);
        let labels = ListenerLabels {
            listener: self.kind.label(),
        };
        let gauge = self
            .shared
            .metrics
            .active_connections
            .get_or_create(&labels)
            .clone();
        loop {
            let permit = tokio::select! {
                permit = self.semaphore.clone().acquire_owned() => permit.expect("never closed"),
                _ = stop.changed() => return,
            };
            let (stream, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => {
                        backoff = Duration::from_millis(5);
                        accepted
                    }
                    Err(e) => {
                        static ACCEPT_FAILED: crate::logthrottle::Throttle =
                            crate::logthrottle::Throttle::new("accept failed; backing off");
                        if let Some(more) = ACCEPT_FAILED.check(&[self.kind.label()]) {
                            tracing::warn!(listener = self.kind.label(), error = %e, "accept failed; backing off{more}");
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(1));
                        continue;
                    }
                },
                _ = stop.changed() => return,
            };
            // Per-connection limits follow reloads: read from the current snapshot.
            let limits = &self.shared.state.load().config.limits;
            let ip_slot = match limits.max_connections_per_ip {
                Some(max) => match self
                    .per_ip
                    .enter(crate::policy::canonical_ip(peer.ip()), max)
                {
                    Some(slot) => Some(slot),
                    None => {
                        // Closed unanswered, as nginx's limit_conn does for streams:
                        // the permit goes back at once.
                        self.shared.metrics.connections_over_ip_limit.inc();
                        continue;
                    }
                },
                None => None,
            };
            let _ = stream.set_nodelay(true);
            let conn = Connection {
                slot: Arc::new(Slot::new(permit, gauge.clone(), ip_slot)),
                peer,
                shared: self.shared.clone(),
                builders: self.builders.clone(),
                stop: stop.clone(),
                idle_timeout: limits.idle_timeout,
                header_read_timeout: limits.header_read_timeout,
            };
            let shared = self.shared.clone();
            // Two kinds of task, not one that matches on the kind: the handshake's state
            // would otherwise size every plain connection's task too (held for its
            // whole life).
            match self.kind {
                Kind::Http => {
                    let watchdog = conn.serve(stream, false, None);
                    tokio::spawn(crate::panics::caught_in(shared, "connection", watchdog));
                }
                Kind::Https => {
                    let handshake = Box::pin(conn.serve_tls(stream));
                    tokio::spawn(crate::panics::caught_in(shared, "connection", handshake));
                }
            }
        }
    }
}

/// What an accepted connection holds for as long as it, or a tunnel made from it,
/// lives: its place under `max_connections` and its count in
/// `specter_active_connections`. A WebSocket tunnel outlives the HTTP connection it was
/// upgraded from, so it keeps the slot.
#[derive(Debug)]
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    gauge: Gauge,
    /// The place under `max_connections_per_ip`, when that is set.
    _ip: Option<per_ip::IpSlot>,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, gauge: Gauge, ip: Option<per_ip::IpSlot>) -> Slot {
        gauge.inc();
        Slot {
            _permit: permit,
            gauge,
            _ip: ip,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// One accepted client connection and what serving it needs.
struct Connection {
    slot: Arc<Slot>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    builders: Arc<Builders<CatchingExecutor>>,
    /// Raised when the gateway drains; held for as long as the connection lives.
    stop: watch::Receiver<bool>,
    idle_timeout: Duration,
    /// The first request must arrive within this of the accept (HTTP/2 has no header
    /// timer of its own), and every HTTP/1 head within this of its first byte.
    header_read_timeout: Duration,
}

impl Connection {
    /// The TLS handshake, too, must finish within `header_read_timeout`.
    async fn serve_tls(self, stream: TcpStream) {
        let Some(config) = self.shared.state.load().tls.clone() else {
            tracing::debug!(peer = %self.peer, "HTTPS connection refused: the config has no [tls]");
            return;
        };
        let peer = self.peer;
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let handshake = tokio::time::timeout(self.header_read_timeout, acceptor.accept(stream));
        let tls = match handshake.await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let reason = crate::tls::handshake_error_reason(&e);
                self.count_handshake_error(reason);
                tracing::debug!(%peer, error = %e, reason, "TLS handshake failed");
                return;
            }
            Err(_) => {
                self.count_handshake_error("timeout");
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        let subject = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(crate::tls::subject_header);
        if let Some(subject) = &subject {
            // debug, not info: a client could otherwise write a line per connection.
            tracing::debug!(%peer, subject = subject.to_str().unwrap_or(""), "client certificate verified");
        }
        self.serve(tls, true, subject).await;
    }

    fn count_handshake_error(&self, reason: &'static str) {
        let labels = crate::metrics::ReasonLabels { reason };
        self.shared
            .metrics
            .tls_handshake_errors
            .get_or_create(&labels)
            .inc();
    }

    /// Serves HTTP/1.1 or HTTP/2 until the client leaves, the connection has been idle
    /// (no bytes either way and no request in progress) for `idle_timeout`, a request
    /// head took longer than `header_read_timeout`, or a drain closes it.
    ///
    /// The connection runs in a task of its own; the future returned is its watchdog,
    /// run by the caller's task: woken by its ticks and by the connection's end, never
    /// by the connection's traffic. A request therefore costs the connection no timer
    /// at all (in one task, the timers were polled at every wake-up: 0.3 to 0.5 µs per
    /// request, measured).
    ///
    /// Not an `async fn`: it would keep its arguments, moved-from, in the watchdog's
    /// future for the connection's life.
    fn serve<I>(
        self,
        io: I,
        tls: bool,
        client_cert_subject: Option<http::HeaderValue>,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let signals = Arc::new(ConnSignals::default());
        let info = Arc::new(ConnInfo {
            slot: self.slot,
            peer: self.peer,
            tls,
            client_cert_subject,
            signals: signals.clone(),
            forwarding: Default::default(),
        });
        let shared = self.shared.clone();
        let (for_watchdog, for_log) = (info.clone(), info.clone());
        let service = service_fn(move |req| {
            info.signals.requests.fetch_add(1, Ordering::Relaxed);
            info.signals.head_started.store(false, Ordering::Relaxed);
            // A guard, not a decrement at the end: hyper drops the handler of an HTTP/2
            // stream the client reset, and a count left behind would keep the idle
            // watchdog from ever closing the connection.
            let in_flight = InFlight::enter(info.clone());
            // A combinator, not an async block: the block would hold the request beside
            // the future it is moved into. Boxed per request: hyper's HTTP/1 connection
            // keeps a slot of the service future's size for its whole life, idle or
            // not, and an HTTP/2 stream's task holds it by value. A box of ~1.2 KB
            // per request measured CPU-neutral (HTTP/1 new/old 1.004, HTTP/2 ~0.99)
            // and took 1.0-1.2 KiB off every idle connection.
            Box::pin(
                proxy::handle(shared.clone(), info.clone(), req).map(move |response| {
                    drop(in_flight);
                    response
                }),
            )
        });
        let io = ClientIo::new(io, signals.clone());
        let connection = Served::new(io, service, self.builders, signals.clone());
        // Combinators, not an async block: the task then holds the connection once.
        // The closure holds the connection's info, not a copy of its address: 24 bytes
        // less put the task's cell under tokio's next 128-byte step (1,024 -> 896).
        let shared = self.shared;
        let served = crate::panics::caught_in(shared.clone(), "connection", connection).map(
            move |outcome| {
                if let Some(Err(e)) = outcome {
                    if let Some(status) = crate::framing::parser_refusal(&*e) {
                        shared.unidentified.count(&shared.metrics, status);
                    }
                    tracing::debug!(peer = %for_log.peer, error = %e, "connection ended with an error");
                }
            },
        );
        let limits = (self.idle_timeout, self.header_read_timeout);
        watchdog(for_watchdog, tokio::spawn(served), self.stop, limits)
    }
}

/// Ticks every quarter of the shorter of `idle_timeout` and `header_read_timeout`
/// until the connection ends, or one of them is overrun and it aborts the connection.
/// A deadline is therefore kept to within a quarter of its length, late, never early.
///
/// Between ticks it also wakes at the armed `request_timeout` of the HTTP/1 request
/// in flight, exactly (see [`RequestDeadline`](crate::conn::RequestDeadline)).
///
/// Not an `async fn`, and one future rather than one awaiting another: each would
/// hold its arguments a second time, and the watchdog's task lives as long as its
/// connection (512 bytes a task now, 768 as an `async fn`).
fn watchdog(
    conn: Arc<ConnInfo>,
    mut served: JoinHandle<()>,
    mut stop: watch::Receiver<bool>,
    (idle_timeout, header_read_timeout): (Duration, Duration),
) -> impl Future<Output = ()> + Send + 'static {
    let period = idle_timeout.min(header_read_timeout) / 4;
    let ticks = |d: Duration| {
        u32::try_from(d.as_nanos().div_ceil(period.as_nanos().max(1))).unwrap_or(u32::MAX)
    };
    let (idle_ticks, head_ticks) = (ticks(idle_timeout), ticks(header_read_timeout));
    let period_ns = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
    async move {
        use crate::clock::{monotonic_instant, monotonic_ns};
        let mut next_tick = monotonic_ns(std::time::Instant::now()).saturating_add(period_ns);
        let sleep = tokio::time::sleep_until(monotonic_instant(next_tick).into());
        let mut sleep = std::pin::pin!(sleep);
        // The signals are read through `conn` each time, not through a local
        // reference: the watchdog's task lives as long as its connection, and 16 bytes
        // less (this and `head`'s packing) put its cell under tokio's next 128-byte
        // step (640 -> 512 bytes).
        let (mut last_seen, mut quiet) = (conn.signals.activity.load(Ordering::Relaxed), 0u32);
        let mut since_accept = 0u32;
        // The head under way: the request count when it was first seen, and the ticks
        // that have seen it since (it began within the tick before the first); no
        // ticks, no head.
        let mut head = (0u64, 0u32);
        if *stop.borrow_and_update() {
            conn.signals.drain.raise();
        }
        // Raised once, when the gateway drains; a gateway dropped without draining (the
        // sender gone) leaves its connections alone.
        let changed = stop.changed();
        let mut changed = std::pin::pin!(changed);
        let mut listening = true;
        let overrun = loop {
            let wake_at = monotonic_instant(conn.signals.deadline.watch(next_tick));
            if sleep.deadline() != wake_at.into() {
                sleep.as_mut().reset(wake_at.into());
            }
            let ended = std::future::poll_fn(|cx| {
                if served.poll_unpin(cx).is_ready() {
                    return std::task::Poll::Ready(true);
                }
                if listening {
                    if let std::task::Poll::Ready(outcome) = changed.as_mut().poll(cx) {
                        listening = false;
                        if outcome.is_ok() {
                            conn.signals.drain.raise();
                        }
                    }
                }
                let rearmed = conn.signals.deadline.rearmed(cx);
                if rearmed || sleep.as_mut().poll_unpin(cx).is_ready() {
                    return std::task::Poll::Ready(false);
                }
                std::task::Poll::Pending
            })
            .await;
            if ended {
                break None;
            }
            let now = monotonic_ns(std::time::Instant::now());
            conn.signals.deadline.expire_if_passed(now);
            if now < next_tick {
                continue;
            }
            // Late ticks are not caught up: the next is a period from now.
            next_tick = now.saturating_add(period_ns);
            since_accept = since_accept.saturating_add(1);
            let requests = conn.signals.requests.load(Ordering::Relaxed);
            // The first request must arrive within header_read_timeout of the accept
            // (HTTP/2 has no header timer of its own).
            if requests == 0 && since_accept >= head_ticks {
                break Some("no request within header_read_timeout");
            }
            head = match (conn.signals.head_started.load(Ordering::Relaxed), head) {
                (true, (n, seen)) if seen > 0 && n == requests => (n, seen + 1),
                (true, _) => (requests, 1),
                (false, _) => (0, 0),
            };
            if head.1 > head_ticks {
                break Some("request head not complete within header_read_timeout");
            }
            let seen = conn.signals.activity.load(Ordering::Relaxed);
            let busy = conn.signals.in_flight.load(Ordering::Relaxed) > 0;
            quiet = if seen == last_seen && !busy {
                quiet + 1
            } else {
                0
            };
            last_seen = seen;
            if quiet >= idle_ticks {
                break Some("idle connection");
            }
        };
        if let Some(reason) = overrun {
            tracing::debug!(peer = %conn.peer, "{reason}; closing");
            served.abort();
        }
    }
}

/// Counts a request in `ConnSignals::in_flight` for as long as its handler lives.
struct InFlight(Arc<ConnInfo>);

impl InFlight {
    fn enter(info: Arc<ConnInfo>) -> Self {
        info.signals.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(info)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.signals.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
