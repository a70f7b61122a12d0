//! Listeners, the accept loop, the connection cap, idle connections, and graceful drain.

pub mod io;
mod per_ip;
mod served;
mod sweeper;

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
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{Config, LimitsConfig};
use crate::conn::ConnSignals;
use crate::metrics::ListenerLabels;
use crate::net::{Listener, Socket};
use crate::proxy::{self, ConnInfo};
use crate::state::{BuildError, Shared, State};
use io::ClientIo;
use served::{Builders, Served};
use sweeper::Sweeper;

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
    sweeper: Arc<Sweeper>,
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
        let sweeper = Arc::new(Sweeper::new());
        let mut tasks = Vec::new();
        let mut bound =
            |kind: Kind, addr: Option<SocketAddr>| -> Result<Option<SocketAddr>, StartError> {
                let Some(addr) = addr else { return Ok(None) };
                let (listener, local) = bind(kind.label(), addr, Listener::new)?;
                let acceptor = Acceptor {
                    kind,
                    shared: shared.clone(),
                    semaphore: semaphore.clone(),
                    per_ip: per_ip.clone(),
                    builders: builders.clone(),
                    sweeper: sweeper.clone(),
                };
                tasks.push(tokio::spawn(acceptor.run(listener, stop_rx.clone())));
                tracing::info!(listener = kind.label(), address = %local, "listening");
                Ok(Some(local))
            };
        let http = bound(Kind::Http, listen.http)?;
        let https = bound(Kind::Https, listen.https)?;
        let admin = match listen.admin {
            Some(addr) => {
                let (listener, local) = bind("admin", addr, TcpListener::from_std)?;
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
        // Not one of `tasks`: it keeps the connections' deadlines through the drain,
        // and ends by itself once no connection is left and none can come.
        tokio::spawn(sweeper.clone().run());
        Ok(Gateway {
            shared,
            http,
            https,
            admin,
            stop_accepting,
            tasks,
            sweeper,
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
        self.sweeper.drain();
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

/// Binds `addr` and registers the listener with the runtime through `register`;
/// returns it with the address it got (the port, when `addr` asked for any).
fn bind<L>(
    listener: &'static str,
    addr: SocketAddr,
    register: impl FnOnce(std::net::TcpListener) -> std::io::Result<L>,
) -> Result<(L, SocketAddr), StartError> {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        let local = l.local_addr()?;
        Ok((register(l)?, local))
    });
    bound.map_err(|source| StartError::Bind {
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
    // forever; the sweeper's idle timeout closes dead peers too.
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
    sweeper: Arc<Sweeper>,
}

impl Acceptor {
    /// Accepts until told to stop. An accept error (EMFILE, ECONNABORTED...) backs off
    /// and continues; it never ends the loop. At `max_connections` the loop waits for a
    /// slot, leaving new connections in the kernel backlog.
    async fn run(self, listener: Listener, mut stop: watch::Receiver<bool>) {
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
                sweeper: self.sweeper.clone(),
                stop: stop.clone(),
                idle_timeout: limits.idle_timeout,
                header_read_timeout: limits.header_read_timeout,
            };
            // Two kinds of task, not one that matches on the kind: the handshake's state
            // would otherwise size every plain connection's task too (held for its
            // whole life).
            match self.kind {
                Kind::Http => {
                    tokio::spawn(conn.serve(stream, false, None));
                }
                Kind::Https => {
                    let shared = self.shared.clone();
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
    /// Watches the connection's deadlines once it is served.
    sweeper: Arc<Sweeper>,
    /// Held for as long as the connection lives: the gateway's drain counts them.
    stop: watch::Receiver<bool>,
    idle_timeout: Duration,
    /// The first request must arrive within this of the accept (HTTP/2 has no header
    /// timer of its own), and every HTTP/1 head within this of its first byte.
    header_read_timeout: Duration,
}

impl Connection {
    /// The TLS handshake, too, must finish within `header_read_timeout`.
    async fn serve_tls(self, stream: Socket) {
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
        // A task of its own: this one's handshake state is not kept for the
        // connection's life.
        tokio::spawn(self.serve(tls, true, subject));
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
    /// head took longer than `header_read_timeout`, or a drain closes it: the future
    /// returned is the connection's task. Its deadlines are kept by the gateway's
    /// [`Sweeper`], so that a request costs the connection no timer at all (in one
    /// task, the timers were polled at every wake-up: 0.3 to 0.5 µs per request,
    /// measured).
    ///
    /// Not an `async fn`: it would keep its arguments, moved-from, in the task's
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
        let signals = Arc::new(ConnSignals::new(self.sweeper.alarm()));
        let info = Arc::new(ConnInfo {
            slot: self.slot,
            peer: self.peer,
            tls,
            client_cert_subject,
            signals: signals.clone(),
            forwarding: Default::default(),
        });
        self.sweeper
            .watch(&info, self.idle_timeout, self.header_read_timeout);
        let shared = self.shared.clone();
        let for_log = info.clone();
        let service = service_fn(move |req| {
            info.signals.requests.fetch_add(1, Ordering::Relaxed);
            info.signals.head_started.store(false, Ordering::Relaxed);
            // The handler holds the request's place in `in_flight` (see `InFlight`).
            // Boxed per request: hyper's HTTP/1 connection keeps a slot of the service
            // future's size for its whole life, idle or not, and an HTTP/2 stream's
            // task holds it by value. A box of ~1.2 KB per request measured CPU-neutral
            // (HTTP/1 new/old 1.004, HTTP/2 ~0.99) and took 1.0-1.2 KiB off every idle
            // connection.
            Box::pin(proxy::handle(
                shared.clone(),
                proxy::InFlight::enter(info.clone()),
                req,
            ))
        });
        let io = ClientIo::new(io, signals.clone());
        let connection = Served::new(io, service, self.builders, signals);
        // Combinators, not an async block: the task then holds the connection once.
        // The closure holds the connection's info, not a copy of its address: 24 bytes
        // less put the task's cell under tokio's next 128-byte step (1,024 -> 896).
        let (shared, open) = (self.shared, self.stop);
        crate::panics::caught_in(shared.clone(), "connection", connection).map(move |outcome| {
            if let Some(Err(e)) = outcome {
                if let Some(status) = crate::framing::parser_refusal(&*e) {
                    shared.unidentified.count(&shared.metrics, status);
                }
                tracing::debug!(peer = %for_log.peer, error = %e, "connection ended with an error");
            }
            drop(open);
        })
    }
}
