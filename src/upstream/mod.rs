//! An environment's upstreams: their connections, round-robin selection and passive
//! health.
//!
//! HTTP/1.1 upstreams get pools of our own: per upstream, stacks of idle connections.
//! A request pops the most recently used one (or connects), and its response body
//! puts it back when it ends. Bodiless requests to plain-HTTP upstreams go through
//! specter's own HTTP/1.1 client (`h1`); requests with a body, TLS upstreams and
//! upgrades through hyper's `client::conn`. Compared with hyper-util's pooled client this skips the pool-key
//! hashing, the URI rewriting and the per-request connector clone, and lets a request
//! that was never answered on a reused connection be sent again on a fresh one.
//! HTTP/2 upstreams use hyper-util's client, which multiplexes requests over one
//! connection.
//!
//! Selection is round-robin over healthy upstreams. Passive health: after
//! `FAILURES_TO_EJECT` consecutive connect failures an upstream is skipped for a back-off
//! (1 s, doubling to 30 s); when it ends, one request probes it. Round-robin rather than
//! least-outstanding: specter's environments front a handful of equal backends, and
//! round-robin keeps the hot path at one atomic increment.

mod chunked;
mod h1;

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::{BoxFuture, Either};
use futures_util::FutureExt;
use http::header::{HOST, UPGRADE};
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;
use tower_service::Service;

use crate::body::{Body, BoxError};
use crate::config::{EnvironmentConfig, Upstream};
use crate::tls::{self, TlsError};

type Connector = HttpsConnector<HttpConnector>;

/// Idle HTTP/1.1 connections kept per upstream, and how long one may stay idle.
const MAX_IDLE: usize = 1024;
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

const FAILURES_TO_EJECT: u32 = 3;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct UpstreamSlot {
    pub upstream: Upstream,
    /// `upstream.authority()`, shared: access lines and exported spans take a
    /// reference count per request, not a copy.
    pub authority: Arc<str>,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's epoch before which the upstream is skipped.
    down_until_ms: AtomicU64,
    /// `Host` for requests that do not keep the client's: the authority, without a
    /// default port.
    host: HeaderValue,
    idle: Arc<HyperIdle>,
    /// Connections of specter's own client (plain HTTP).
    plain_idle: Arc<IdleConnections<h1::Connection>>,
}

enum Transport {
    Http1 {
        tls: Connector,
        plain: HttpConnector,
    },
    Http2(Box<Client<Connector, Body>>),
}

pub struct UpstreamPool {
    transport: Transport,
    pub slots: Vec<UpstreamSlot>,
    next: AtomicUsize,
    epoch: Instant,
}

impl UpstreamPool {
    pub fn new(env: &EnvironmentConfig) -> Result<UpstreamPool, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(env.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls_config = tls::client_config(env.upstream_ca.as_deref())?;
        let plain = http.clone();
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http();
        let builder = match &env.upstream_sni {
            Some(sni) => {
                let name = ServerName::try_from(sni.clone()).expect("validated upstream_sni");
                builder.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let transport = if env.http2 {
            let connector = builder.enable_http2().wrap_connector(http);
            Transport::Http2(Box::new(
                Client::builder(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .pool_timer(TokioTimer::new())
                    .pool_idle_timeout(IDLE_TIMEOUT)
                    .http2_only(true)
                    .build(connector),
            ))
        } else {
            Transport::Http1 {
                tls: builder.enable_http1().wrap_connector(http),
                plain,
            }
        };
        let slots = env
            .upstreams
            .iter()
            .map(|u| UpstreamSlot {
                upstream: u.clone(),
                authority: u.authority().into(),
                consecutive_failures: AtomicU32::new(0),
                down_until_ms: AtomicU64::new(0),
                host: host_header(&u.uri),
                idle: Arc::default(),
                plain_idle: Arc::default(),
            })
            .collect();
        Ok(UpstreamPool {
            transport,
            slots,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    /// Sends `parts` + `body` to upstream `i` with `target` as the request target, and
    /// the gateway's own fields (`added`) after the request's.
    ///
    /// The request is prepared here and only what the exchange needs is moved into the
    /// returned future: every byte of it is copied each time the request's future moves.
    /// The routes other than specter's own client are rarer on the hot path, and boxed.
    pub fn send<'a>(
        &'a self,
        i: usize,
        mut parts: Head,
        body: Body,
        target: PathAndQuery,
        added: &'a dyn Added,
    ) -> Either<impl Future<Output = Sent> + Send + 'a, BoxFuture<'a, Sent>> {
        let slot = &self.slots[i];
        match &self.transport {
            Transport::Http2(client) => {
                parts.version = Version::HTTP_2;
                added.insert(&mut parts.headers);
                let mut uri = http::uri::Parts::default();
                uri.scheme = slot.upstream.uri.scheme().cloned();
                uri.authority = slot.upstream.uri.authority().cloned();
                uri.path_and_query = Some(target);
                let uri = Uri::from_parts(uri).map_err(|e| UpstreamError::Request(e.into()));
                Either::Right(Box::pin(async move {
                    parts.uri = uri?;
                    let mut response = client.request(Request::from_parts(*parts, body)).await?;
                    end_hop_by_hop(&mut response);
                    Ok(response.map(|b| b.map_err(Into::into).boxed()))
                }))
            }
            Transport::Http1 { tls, plain } => {
                if !parts.headers.contains_key(HOST) {
                    parts.headers.insert(HOST, slot.host.clone());
                }
                let own = slot.upstream.uri.scheme_str() == Some("http")
                    && body.is_end_stream()
                    && !parts.headers.contains_key(UPGRADE);
                if own {
                    // The request keeps the client's version: specter's own client
                    // writes HTTP/1.1 whatever it says (see `h1::round_trip`).
                    Either::Left(send_own(plain, slot, parts, target, added))
                } else {
                    parts.version = Version::HTTP_11;
                    added.insert(&mut parts.headers);
                    parts.uri = Uri::from(target);
                    let request = Request::from_parts(*parts, body);
                    Either::Right(Box::pin(send_hyper(tls, slot, request)))
                }
            }
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next healthy upstream after round-robin, skipping `exclude` (a retry). An
    /// upstream whose back-off just ended is handed to one request as a probe.
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        let n = self.slots.len();
        let start = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        (0..n).map(|i| (start + i) % n).find(|&i| {
            if Some(i) == exclude {
                return false;
            }
            let slot = &self.slots[i];
            let until = slot.down_until_ms.load(Ordering::Relaxed);
            if until == 0 || slot.consecutive_failures.load(Ordering::Relaxed) < FAILURES_TO_EJECT {
                return true;
            }
            // Ejected: let exactly one request through once the back-off ended.
            let now = self.now_ms();
            until <= now
                && slot
                    .down_until_ms
                    .compare_exchange(
                        until,
                        now + backoff(slot).as_millis() as u64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
        })
    }

    /// Returns true when this success brought an ejected upstream back.
    pub fn record_success(&self, i: usize) -> bool {
        let slot = &self.slots[i];
        let failures = slot.consecutive_failures.load(Ordering::Relaxed);
        if failures != 0 {
            slot.consecutive_failures.store(0, Ordering::Relaxed);
            slot.down_until_ms.store(0, Ordering::Relaxed);
        }
        failures >= FAILURES_TO_EJECT
    }

    /// Returns true when this failure ejected the upstream.
    pub fn record_connect_failure(&self, i: usize) -> bool {
        let slot = &self.slots[i];
        let failures = slot.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_TO_EJECT {
            let until = self.now_ms() + backoff(slot).as_millis() as u64;
            slot.down_until_ms.store(until, Ordering::Relaxed);
            return failures == FAILURES_TO_EJECT;
        }
        false
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        self.slots[i].consecutive_failures.load(Ordering::Relaxed) < FAILURES_TO_EJECT
    }
}

fn backoff(slot: &UpstreamSlot) -> Duration {
    let over = slot
        .consecutive_failures
        .load(Ordering::Relaxed)
        .saturating_sub(FAILURES_TO_EJECT)
        .min(5);
    (MIN_BACKOFF * 2u32.pow(over)).min(MAX_BACKOFF)
}

/// Why a request got no response from its upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connecting to the upstream failed")]
    Connect(#[source] BoxError),
    #[error("HTTP/1.1 exchange failed")]
    Http(#[from] hyper::Error),
    #[error("HTTP/1.1 exchange failed")]
    Exchange(#[from] h1::Error),
    #[error("HTTP/2 exchange failed")]
    Http2(#[from] hyper_util::client::legacy::Error),
    #[error("the request cannot be sent")]
    Request(#[source] BoxError),
}

impl UpstreamError {
    /// Nothing was sent: the connection could not be made.
    pub fn is_connect(&self) -> bool {
        match self {
            UpstreamError::Connect(_) => true,
            UpstreamError::Http2(e) => e.is_connect(),
            _ => false,
        }
    }
}

fn host_header(uri: &Uri) -> HeaderValue {
    let authority = uri.authority().map_or("", |a| a.as_str());
    let default_port = match uri.scheme_str() {
        Some("https") => ":443",
        _ => ":80",
    };
    let host = authority.strip_suffix(default_port).unwrap_or(authority);
    HeaderValue::from_str(host).expect("a parsed authority is a valid header value")
}

async fn connect(connector: &Connector, uri: &Uri) -> Result<SendRequest<Body>, UpstreamError> {
    let io = connector
        .clone()
        .call(uri.clone())
        .await
        .map_err(UpstreamError::Connect)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| UpstreamError::Connect(e.into()))?;
    // A combinator, not an async block, which would hold the connection twice (as its
    // capture and inside the upgradeable connection it awaits) for the task's life.
    tokio::spawn(connection.with_upgrades().map(|ended| {
        if let Err(e) = ended {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    }));
    Ok(sender)
}

/// A request's head, boxed once as it arrives (`proxy::handle`): on its way upstream it
/// moves from future to future, a pointer each time instead of 224 bytes, and each
/// future that holds it (every one down to this client's) is a pointer larger, not a
/// head.
pub type Head = Box<http::request::Parts>;

/// What sending a request comes to.
type Sent = Result<Response<Body>, UpstreamError>;

/// A request through hyper's `client::conn` (bodies, TLS upstreams, upgrades), on an idle
/// connection if one is open, else a new one.
async fn send_hyper(
    connector: &Connector,
    slot: &UpstreamSlot,
    mut request: Request<Body>,
) -> Sent {
    loop {
        let (mut sender, reused) = match slot.idle.checkout().await {
            Some(sender) => (sender, true),
            None => (connect(connector, &slot.upstream.uri).await?, false),
        };
        match sender.try_send_request(request).await {
            Ok(response) => return Ok(pooled(response, sender, &slot.idle)),
            // An idle connection that closed before the request was written to it:
            // nothing reached the upstream, so send it again on a new one.
            Err(mut e) if reused && e.message().is_some() => {
                request = e.take_message().expect("checked above");
            }
            Err(e) => return Err(e.into_error().into()),
        }
    }
}

/// A bodiless request through specter's own client: on an idle connection if one is
/// open, else a new one. A reused connection that closed before answering (the
/// upstream timed it out while idle) gets the request again on a new connection.
///
/// Not an `async fn`, here and in the request path above it: an `async fn` keeps its
/// arguments in its future beside the locals they are moved into (`-Zprint-type-sizes`
/// shows both), and the request's future is as large as hyper's per-connection slot
/// for it.
#[allow(clippy::manual_async_fn)] // on purpose: see above
fn send_own<'a>(
    connector: &'a HttpConnector,
    slot: &'a UpstreamSlot,
    mut parts: Head,
    target: PathAndQuery,
    added: &'a dyn Added,
) -> impl std::future::Future<Output = Sent> + Send + 'a {
    async move {
        loop {
            let (conn, reused) = match slot.plain_idle.checkout_stale_free() {
                Some(conn) => (conn, true),
                // Boxed: connecting is rare on a warm pool, and its future would otherwise
                // enlarge every request's future.
                None => (
                    Box::pin(connect_plain(connector, &slot.upstream.uri)).await?,
                    false,
                ),
            };
            match h1::round_trip(conn, &mut parts, (&target, added), &slot.plain_idle).await {
                Err(e) if reused && e.is_unanswered() => continue,
                sent => return sent.map_err(Into::into),
            }
        }
    }
}

async fn connect_plain(
    connector: &HttpConnector,
    uri: &Uri,
) -> Result<h1::Connection, UpstreamError> {
    let io = connector
        .clone()
        .call(uri.clone())
        .await
        .map_err(|e| UpstreamError::Connect(e.into()))?;
    let io = crate::net::Socket::from_tokio(io.into_inner())
        .map_err(|e| UpstreamError::Connect(e.into()))?;
    Ok(h1::Connection::new(io))
}

/// The fields the gateway adds to each request it forwards (its forwarding and
/// identity headers), kept out of the request's header map: specter's own client
/// writes them after the request's fields, which spares a map insert each (and, for a
/// request read over HTTP/2, the map's growth: h2 sizes it for the client's fields);
/// hyper's clients get them inserted. The request's map holds none of these names.
pub trait Added: Sync {
    /// Appends `name: value\r\n` lines to an HTTP/1.1 head under construction.
    fn write(&self, wire: &mut Vec<u8>);
    /// Inserts them into a request's map.
    fn insert(&self, headers: &mut http::HeaderMap);
}

/// What the idle pool needs to know of a connection.
trait Idle {
    /// Closed, or otherwise unfit for another request.
    fn is_closed(&self) -> bool;
}

impl Idle for SendRequest<Body> {
    fn is_closed(&self) -> bool {
        SendRequest::is_closed(self)
    }
}

impl Idle for h1::Connection {
    fn is_closed(&self) -> bool {
        self.is_stale()
    }
}

/// hyper's idle connections (TLS upstreams, upgrades).
type HyperIdle = IdleConnections<SendRequest<Body>>;

/// An upstream's idle HTTP/1.1 connections, most recently used last.
/// Each with the coarse monotonic millisecond it was put back at
/// ([`coarse_monotonic_ms`](crate::clock::coarse_monotonic_ms): staleness is measured
/// in tens of seconds).
struct IdleConnections<C>(Mutex<Vec<(C, u64)>>);

impl<C> Default for IdleConnections<C> {
    fn default() -> Self {
        IdleConnections(Mutex::default())
    }
}

impl<C> std::fmt::Debug for IdleConnections<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.0.lock().map_or(0, |v| v.len());
        write!(f, "IdleConnections({idle})")
    }
}

impl<C: Idle> IdleConnections<C> {
    /// The most recently used connection still open and not idle for too long.
    fn checkout_stale_free(&self) -> Option<C> {
        loop {
            let (conn, since) = self.0.lock().ok()?.pop()?;
            let idle_ms = crate::clock::coarse_monotonic_ms().saturating_sub(since);
            if !conn.is_closed() && u128::from(idle_ms) <= IDLE_TIMEOUT.as_millis() {
                return Some(conn);
            }
        }
    }

    fn put_back(&self, conn: C) {
        // One clock read serves the staleness checks and the connection's stamp.
        let now = crate::clock::coarse_monotonic_ms();
        let stale = |since: &u64| u128::from(now.saturating_sub(*since)) > IDLE_TIMEOUT.as_millis();
        let Ok(mut idle) = self.0.lock() else { return };
        if idle.first().is_some_and(|(_, since)| stale(since)) {
            idle.retain(|(c, since)| !c.is_closed() && !stale(since));
        }
        if idle.len() < MAX_IDLE {
            idle.push((conn, now));
        }
    }
}

impl HyperIdle {
    /// The most recently used open connection, once it can take a request.
    async fn checkout(&self) -> Option<SendRequest<Body>> {
        loop {
            let mut sender = self.checkout_stale_free()?;
            // Usually ready already; otherwise the previous response's end is still
            // being processed by the connection task.
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }
}

/// The response, with a body that hands the connection back when it ends. A body
/// dropped early (client gone) takes the connection with it: hyper closes it.
/// The upstream connection's own fields (hop-by-hop, and those its `Connection` names)
/// end at the gateway: every response leaves this module without them (specter's own
/// client drops them as it parses). A 101 keeps `Upgrade`, the protocol the tunnel
/// switches to.
fn end_hop_by_hop<B>(response: &mut Response<B>) {
    let switched_to = (response.status() == StatusCode::SWITCHING_PROTOCOLS)
        .then(|| response.headers().get(UPGRADE).cloned())
        .flatten();
    let headers = response.headers_mut();
    crate::headers::strip_hop_by_hop(headers);
    if let Some(protocol) = switched_to {
        headers.insert(UPGRADE, protocol);
    }
}

fn pooled(
    mut response: Response<Incoming>,
    sender: SendRequest<Body>,
    idle: &Arc<HyperIdle>,
) -> Response<Body> {
    end_hop_by_hop(&mut response);
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        return response.map(|b| b.map_err(Into::into).boxed());
    }
    if response.body().is_end_stream() {
        idle.put_back(sender);
        return response.map(|b| b.map_err(Into::into).boxed());
    }
    let idle = Arc::clone(idle);
    response.map(|inner| {
        PooledBody {
            inner,
            sender: Some((sender, idle)),
        }
        .boxed()
    })
}

struct PooledBody {
    inner: Incoming,
    sender: Option<(SendRequest<Body>, Arc<HyperIdle>)>,
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if matches!(frame, Some(Err(_))) {
            self.sender = None;
        } else if frame.is_none() || self.inner.is_end_stream() {
            // The server stops polling once `is_end_stream` says so: hand the
            // connection back with the last frame, not only at `None`.
            if let Some((sender, idle)) = self.sender.take() {
                idle.put_back(sender);
            }
        }
        Poll::Ready(frame.map(|f| f.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
