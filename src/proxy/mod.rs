//! The request path: `handle` (never fails: maps errors, records metrics and the access
//! log) around `inner` (key -> policy -> rate limits -> forward, with `?`).
//!
//! Nothing is sent upstream before every check passed.

pub mod access;
pub mod forward;
pub mod upgrade;

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use futures_util::future::{Either, FutureExt};
use http::header::{HeaderValue, CONTENT_LENGTH, HOST};
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use crate::auth::{KeyId, KeySource};
use crate::body::{self, Body, BodyReadTimeout, BodyTooLarge, Guarded};
use crate::error::{ErrorChain, GatewayError};
use crate::headers::{RATELIMIT, RATELIMIT_POLICY, X_REQUEST_ID};
use crate::metrics::{KindLabels, ScopeLabels};
use crate::path::normalize_path;
use crate::policy;
use crate::state::{Environment, Shared, State};
use crate::trace::{export, TraceContext};
use crate::upstream::Head;

/// Facts about the client connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The connection's place under `max_connections`; a tunnel takes it over.
    pub slot: crate::conn::Held,
    pub peer: SocketAddr,
    pub tls: bool,
    /// Subject of a verified client certificate (mTLS), ready to forward.
    pub client_cert_subject: Option<HeaderValue>,
    /// What the connection's IO wrapper noticed (bare LF, activity).
    pub signals: Arc<crate::conn::ConnSignals>,
    /// The forwarding headers its requests share, built by the first.
    pub forwarding: std::sync::OnceLock<forward::ConnForwarding>,
}

/// A request being handled, counted in its connection's `in_flight` for as long as its
/// handler lives. A guard, not a decrement at the end: hyper drops the handler of an
/// HTTP/2 stream the client reset, and a count left behind would keep the sweeper from
/// ever closing the idle connection.
pub struct InFlight(Arc<ConnInfo>);

impl InFlight {
    pub fn enter(conn: Arc<ConnInfo>) -> Self {
        conn.signals.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(conn)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.signals.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::ops::Deref for InFlight {
    type Target = ConnInfo;

    fn deref(&self) -> &ConnInfo {
        &self.0
    }
}

/// What the access log and the response decoration need to know about a request.
#[derive(Default)]
struct Outcome {
    environment: Option<usize>,
    /// Set only while the access log is on, like `target`.
    key_id: Option<KeyId>,
    ratelimit: Option<HeaderValue>,
    /// The normalised path and the query: checked, forwarded and (path only) logged.
    target: Option<PathAndQuery>,
    upstream: Option<usize>,
    upstream_status: Option<u16>,
    client_ip: Option<std::net::IpAddr>,
    /// The access log is on: an access line is written.
    logged: bool,
    /// Request body bytes sent upstream; counted only for a logged request that has a
    /// body (a bodiless one logs 0 without a counter).
    bytes_in: Option<Arc<std::sync::atomic::AtomicU64>>,
    /// Keep `key_id` and `target`: the access log is on, or a span will be exported.
    details: bool,
}

/// The response to `req`; `conn` is counted in flight until it is ready. Taken by the
/// handler rather than dropped by a combinator around it, which would move the ~1.2 KB
/// future once more.
#[allow(clippy::manual_async_fn)] // on purpose: see `upstream::send_own`
pub fn handle(
    shared: Arc<Shared>,
    conn: InFlight,
    req: Request<Incoming>,
) -> impl std::future::Future<Output = Result<Response<Body>, Infallible>> + Send {
    // Lent to `inner`, which takes it once admitted: passed by value, it would stay,
    // moved-from, in this future beside `inner`'s copy.
    let (head, body) = req.into_parts();
    let mut req = Some((Box::new(head), body));
    async move {
        let started = Instant::now();
        let state = shared.state.load_full();
        let head = &req.as_ref().expect("present until inner takes it").0;
        let request_id = request_id(&head.headers);
        let trace = TraceContext::from_headers(&head.headers, state.config.tracing.sample_ratio);
        let (version, method) = (head.version, head.method.clone());
        let exporter = state.exporter.as_deref().filter(|_| trace.sampled);
        let server_address = exporter
            .and_then(|_| policy::request_host(&head.uri, &head.headers))
            .map(str::to_owned);
        let logged = access::enabled();
        let mut outcome = Outcome {
            logged,
            details: logged || exporter.is_some(),
            ..Outcome::default()
        };
        let handled = inner(
            &shared,
            &state,
            &conn,
            &mut req,
            (&request_id, &trace),
            &mut outcome,
        );
        let result = crate::panics::caught(&shared.metrics, "request", handled)
            .await
            .unwrap_or(Err(GatewayError::Internal));
        let env = outcome.environment.map(|i| &state.environments[i]);
        let (mut response, error) = match result {
            Ok(response) => (response, None),
            Err(err) => {
                let code = err.code();
                (
                    error_response(&shared, env, err, (&request_id, &trace), version),
                    Some(code),
                )
            }
        };
        decorate(&mut response, env, outcome.ratelimit.take(), &request_id);
        let status = response.status().as_u16();
        let elapsed = started.elapsed();
        env.map_or(&shared.unidentified, |e| &e.metrics).observe(
            &shared.metrics,
            status,
            elapsed.as_secs_f64(),
        );
        if let Some(env) = env {
            env.activity
                .record(status, elapsed, error == Some("rate_limited"));
        }
        let upstream = env
            .zip(outcome.upstream)
            .map(|(e, i)| &e.upstreams.slots[i].authority);
        if let Some(exporter) = exporter {
            let end = SystemTime::now();
            exporter.submit(export::SpanRecord {
                trace,
                start: end.checked_sub(elapsed).unwrap_or(end),
                end,
                method: method.clone(),
                target: outcome.target.clone(),
                status,
                server_address,
                environment: env.map(|e| e.label.0.clone()),
                key_id: outcome.key_id.clone(),
                upstream: upstream.cloned(),
                error,
            });
        }
        if outcome.logged {
            let record = access::Record {
                started,
                request_id,
                trace_id: trace.trace_id_hex(),
                client_ip: outcome
                    .client_ip
                    .unwrap_or_else(|| policy::canonical_ip(conn.peer.ip())),
                method,
                target: outcome.target,
                status,
                environment: env.map(|e| e.label.0.clone()),
                key_id: outcome.key_id,
                upstream: upstream.cloned(),
                upstream_status: outcome.upstream_status.unwrap_or(0),
                error,
                bytes_in: outcome.bytes_in,
            };
            response = response.map(|body| access::log_on_completion(body, record));
        }
        Ok(response)
    }
}

/// The JSON answer for an error, counted and (for our own failures) logged with its
/// whole cause chain.
fn error_response(
    shared: &Shared,
    env: Option<&Environment>,
    err: GatewayError,
    (request_id, trace): (&HeaderValue, &TraceContext),
    version: Version,
) -> Response<Body> {
    if let (GatewayError::RateLimited { scope, .. }, Some(env)) = (&err, env) {
        let labels = ScopeLabels {
            environment: env.label.clone(),
            scope,
        };
        shared.metrics.rate_limited.get_or_create(&labels).inc();
    }
    if err.status().is_server_error() {
        static ANSWERED: crate::logthrottle::Throttle =
            crate::logthrottle::Throttle::new("gateway answered with an error");
        if let Some(more) = ANSWERED.check(&[err.code(), env.map_or("", |e| &e.config.name)]) {
            tracing::warn!(request_id = request_id.to_str().unwrap_or(""), trace_id = %trace.trace_id_hex(), error = err.code(), cause = %ErrorChain(&err), "gateway answered with an error{more}");
        }
    }
    let close = err.status() == http::StatusCode::BAD_REQUEST && version < Version::HTTP_2;
    let mut response = err.into_response(request_id, trace.trace_id_hex().as_str());
    if close {
        // A malformed request leaves the connection's framing in doubt.
        let headers = response.headers_mut();
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

fn decorate(
    response: &mut Response<Body>,
    env: Option<&Environment>,
    ratelimit: Option<HeaderValue>,
    request_id: &HeaderValue,
) {
    let switching = response.status() == http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    let upgrade_to = switching
        .then(|| headers.get(http::header::UPGRADE).cloned())
        .flatten();
    if let Some(env) = env {
        forward::rewrite_response(headers, &env.policy.config.response_headers);
        if let Some(protocol) = upgrade_to {
            upgrade::mark(headers, protocol);
        }
        if let Some(policy) = env.limiter.policy_header() {
            headers.insert(RATELIMIT_POLICY, policy.clone());
        }
        if let Some(mut state) = ratelimit {
            never_indexed(&mut state);
            headers.insert(RATELIMIT, state);
        }
    }
    let mut request_id = request_id.clone();
    never_indexed(&mut request_id);
    headers.insert(X_REQUEST_ID, request_id);
}

/// A value that differs in every response is kept out of HTTP/2's header compression
/// table (sent as a "never indexed" literal; HTTP/1 ignores the mark). Indexed, each
/// one evicts a useful entry, and the encoder compares every later value of that name
/// with all those in the table (HPACK's share of a response: 1.0 µs that way, 0.8 now).
fn never_indexed(value: &mut HeaderValue) {
    value.set_sensitive(true);
}

/// Not an `async fn` (nor is [`handle`]): see `upstream::send_own`. `req` is taken
/// once admitted.
#[allow(clippy::manual_async_fn)] // on purpose: see `upstream::send_own`
fn inner<'a>(
    shared: &'a Shared,
    state: &'a State,
    conn: &'a ConnInfo,
    req: &'a mut Option<(Head, Incoming)>,
    ids: (&'a HeaderValue, &'a TraceContext),
    outcome: &'a mut Outcome,
) -> impl std::future::Future<Output = Result<Response<Body>, GatewayError>> + Send + 'a {
    async move {
        // In a block, not in locals of this scope: a local keeps its place in the future
        // until its scope ends, across the await below, even once moved from.
        let (env, attempt, upgrade, deadline) = {
            let head = &req.as_ref().expect("lent whole").0;
            let admitted = admit(shared, state, conn, head, outcome).await?;
            // HTTP/1 has one request in flight per connection: its deadline is the
            // connection's to keep. HTTP/2 streams each take a timer.
            let deadline = (head.version < Version::HTTP_2).then_some(&conn.signals.deadline);
            let request = req.take().expect("lent whole");
            let counter = outcome.logged.then_some(&mut outcome.bytes_in);
            let (attempt, upgrade) =
                upstream_request(state, conn, request, ids, &admitted, counter);
            (admitted.env, attempt, upgrade, deadline)
        };
        send(shared, env, attempt, (upgrade, deadline), outcome).await
    }
}

/// A request that passed every check.
struct Admitted<'s> {
    env: &'s Environment,
    key_id: KeyId,
    key_source: KeySource,
    /// The normal form: what the policy checked and what the upstream receives.
    target: PathAndQuery,
    client_ip: IpAddr,
}

/// Every check, in the documented order: framing, key, policy, rate limits.
async fn admit<'s>(
    shared: &Shared,
    state: &'s State,
    conn: &ConnInfo,
    req: &http::request::Parts,
    outcome: &mut Outcome,
) -> Result<Admitted<'s>, GatewayError> {
    crate::framing::check_request(req.version, &req.headers, &conn.signals)?;
    crate::framing::check_host(req.version, &req.uri, &req.headers)?;
    crate::framing::check_h2c(&req.headers)?;
    if shared.draining.load(Ordering::Relaxed) {
        return Err(GatewayError::ShuttingDown);
    }
    let method = req.method.as_str();
    if method.eq_ignore_ascii_case("CONNECT") || method.eq_ignore_ascii_case("TRACE") {
        return Err(GatewayError::MethodNotAllowed {
            allow: HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
        });
    }
    let target = forward_target(&req.uri)?;
    // Only the access log and an exported span read these; otherwise no reference
    // count is touched.
    let logged = outcome.details;
    if logged {
        outcome.target = Some(target.clone());
    }

    // Key expiry and the key's last use need the date, not the instant.
    let now = crate::clock::coarse_now();
    let found =
        crate::auth::extract(&req.headers, &state.config.auth.header).and_then(|(key, source)| {
            crate::auth::lookup(&state.keys, key, now).map(|key| (key, source))
        });
    let (key, key_source) =
        found.map_err(|refused| failed_authentication(state, conn, req, refused))?;
    let env = &state.environments[key.environment()];
    let key_id = key.id();
    if logged {
        outcome.key_id = Some(key_id.clone());
    }
    outcome.environment = Some(key.environment());
    let trusted = &state.config.listen.trusted_proxies;
    let client_ip = policy::client_ip(conn.peer.ip(), &req.headers, trusted);
    outcome.client_ip = Some(client_ip);
    key.usage().record(now, client_ip);

    let host = policy::request_host(&req.uri, &req.headers);
    if !policy::host_allowed(&env.config.hosts, host) {
        return Err(GatewayError::WrongHost);
    }
    env.policy.check_ip(client_ip)?;
    env.policy.check_method(&req.method)?;
    env.policy.check_path(target.path())?;
    if let Some(protocol) = upgrade::requested(req) {
        env.policy.check_upgrade(&protocol)?;
    }
    env.policy.check_declared_body(&req.headers)?;

    match check_limits(shared, state, env, &key_id).await {
        Ok(header) => outcome.ratelimit = header,
        Err((err, header)) => {
            outcome.ratelimit = header;
            return Err(err);
        }
    }
    Ok(Admitted {
        env,
        key_id,
        key_source,
        target,
        client_ip,
    })
}

/// A refused key is charged to the client's address when `[limits] unauthenticated`
/// is set; past its allowance the answer is 429 instead of 401.
fn failed_authentication(
    state: &State,
    conn: &ConnInfo,
    req: &http::request::Parts,
    refused: GatewayError,
) -> GatewayError {
    let Some(failures) = &state.failed_auth else {
        return refused;
    };
    let trusted = &state.config.listen.trusted_proxies;
    let ip = policy::client_ip(conn.peer.ip(), &req.headers, trusted);
    match failures.charge(ip) {
        Ok(()) => refused,
        Err(retry_after) => GatewayError::TooManyFailedAuthentications { retry_after },
    }
}

/// The normalised path with the client's query, built once: `PathAndQuery` shares its
/// bytes, so the policy, the access log and every attempt read the same allocation.
fn forward_target(uri: &Uri) -> Result<PathAndQuery, GatewayError> {
    let path = normalize_path(uri.path()).map_err(GatewayError::BadPath)?;
    if let (Cow::Borrowed(_), Some(as_sent)) = (&path, uri.path_and_query()) {
        // Already in normal form (the usual case): the client's own bytes, shared with
        // the request head (a reference count, no copy).
        return Ok(as_sent.clone());
    }
    let target = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    PathAndQuery::try_from(target)
        .map_err(|_| GatewayError::BadRequest("the request target cannot be forwarded"))
}

/// The request as the upstream receives it, but for the URI (set per attempt).
struct Attempt<'a> {
    parts: Head,
    /// The gateway's fields, sent after the request's own.
    added: forward::GatewayFields<'a>,
    body: Body,
    path_and_query: PathAndQuery,
    /// A copy for one retry, made only when a retry is possible at all: bodiless
    /// requests (nearly all idempotent ones) on an environment with several upstreams.
    spare: Option<Head>,
}

fn upstream_request<'a>(
    state: &'a State,
    conn: &'a ConnInfo,
    (mut parts, incoming): (Head, Incoming),
    (request_id, trace): (&'a HeaderValue, &'a TraceContext),
    a: &Admitted<'a>,
    bytes_in: Option<&mut Option<Arc<std::sync::atomic::AtomicU64>>>,
) -> (Attempt<'a>, Option<upgrade::ClientSide>) {
    let env = a.env;
    // hyper puts the connection's upgrade handle on every HTTP/1.1 request with an
    // `Upgrade` field; without one there is nothing to hand over, and the request goes
    // on as a plain one (its upgrade fields are hop-by-hop, so they are stripped).
    let upgrade = upgrade::requested(&parts).and_then(|protocol| {
        let upgrade = parts.extensions.remove::<hyper::upgrade::OnUpgrade>()?;
        Some((protocol, upgrade))
    });
    let original_host = parts
        .uri
        .authority()
        .and_then(|authority| HeaderValue::from_str(authority.as_str()).ok())
        .or_else(|| parts.headers.get(HOST).cloned());
    let peer_ip = policy::canonical_ip(conn.peer.ip());
    let trusted = &state.config.listen.trusted_proxies;
    let forwarded = forward::Forwarded {
        auth_header: &state.config.auth.header,
        key_source: a.key_source,
        client_ip: a.client_ip,
        peer_ip,
        trusted_peer: trusted.iter().any(|n| n.contains(&peer_ip)),
        allow_underscores: env.policy.config.allow_underscore_headers,
        tls: conn.tls,
        host: original_host.clone(),
        request_id,
        trace,
        keep_tracestate: trace.continued(),
        environment: &env.name_header,
        key_id: a.key_id.header_value().clone(),
        client_cert_subject: conn.client_cert_subject.as_ref(),
        cache: &conn.forwarding,
    };
    let added = forward::rewrite_request(
        &mut parts.headers,
        forwarded,
        &env.policy.config.request_headers,
    );
    let upgrade = upgrade.map(|(protocol, upgrade)| {
        upgrade::mark(&mut parts.headers, protocol);
        upgrade::ClientSide {
            upgrade,
            slot: conn.slot.clone(),
        }
    });
    if let (true, Some(host)) = (env.config.preserve_host, original_host) {
        parts.headers.insert(HOST, host);
    }
    let path_and_query = a.target.clone();
    // The upstream's version is the transport's to set (`UpstreamPool::send`): until
    // then the request keeps the client's, which says how the response is written.

    let empty_body = incoming.is_end_stream()
        || parts
            .headers
            .get(CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0");
    let spare = (empty_body && env.upstreams.slots.len() > 1).then(|| clone_parts(&parts));
    // A bodiless request needs no guard (and no timer).
    let body = if empty_body {
        body::empty()
    } else {
        let limits = &state.config.limits;
        Guarded::new(
            incoming,
            env.policy.config.max_body,
            (limits.body_read_timeout, limits.body_timeout),
            bytes_in.map(|counter| counter.insert(Arc::default()).clone()),
        )
        .boxed()
    };
    (
        Attempt {
            parts,
            added,
            body,
            path_and_query,
            spare,
        },
        upgrade,
    )
}

/// Sends to a healthy upstream, retrying once elsewhere when that is safe.
///
/// Not an `async fn`: its arguments would sit in the future beside the values taken
/// out of them, and the request's future is copied whole each time it moves.
fn send<'a>(
    shared: &'a Shared,
    env: &'a Environment,
    attempt: Attempt<'a>,
    (mut client_upgrade, deadline): (
        Option<upgrade::ClientSide>,
        Option<&'a crate::conn::RequestDeadline>,
    ),
    outcome: &'a mut Outcome,
) -> impl std::future::Future<Output = Result<Response<Body>, GatewayError>> + Send + 'a {
    let Attempt {
        parts,
        added,
        body,
        path_and_query,
        mut spare,
    } = attempt;
    let idempotent = is_idempotent(&parts.method);
    let mut next = Some((parts, body));
    let mut failed: Option<usize> = None;
    async move {
        loop {
            let (parts, body) = next.take().expect("each attempt has its request");
            let upstream = env
                .upstreams
                .pick(failed)
                .ok_or(GatewayError::NoHealthyUpstream)?;
            outcome.upstream = Some(upstream);
            let timeout = env.config.request_timeout;
            let sent = env
                .upstreams
                .send(upstream, parts, body, path_and_query.clone(), &added);
            // One or the other, never both, in the request's future.
            let answered = match deadline {
                Some(deadline) => Either::Left(deadline.run(timeout, sent).map(Result::ok)),
                None => Either::Right(tokio::time::timeout(timeout, sent).map(Result::ok)),
            };
            let err = match answered.await {
                Some(Ok(mut response)) => {
                    if env.upstreams.record_success(upstream) {
                        tracing::info!(environment = %env.config.name, upstream = %env.upstreams.slots[upstream].upstream.uri, "upstream back in rotation");
                    }
                    outcome.upstream_status = Some(response.status().as_u16());
                    if let Some(client) = client_upgrade.take() {
                        upgrade::tunnel(client, &mut response);
                    }
                    return Ok(response);
                }
                Some(Err(e)) => e,
                None => {
                    upstream_error(shared, env, upstream, "timeout");
                    return Err(GatewayError::UpstreamTimeout(timeout));
                }
            };
            if let Some(too_large) = body::find_cause::<BodyTooLarge>(&err) {
                return Err(GatewayError::BodyTooLarge {
                    limit: too_large.limit,
                });
            }
            if body::find_cause::<BodyReadTimeout>(&err).is_some() {
                return Err(GatewayError::RequestTimeout);
            }
            let connect = err.is_connect();
            upstream_error(
                shared,
                env,
                upstream,
                if connect { "connect" } else { "protocol" },
            );
            if connect && env.upstreams.record_connect_failure(upstream) {
                static EJECTED: crate::logthrottle::Throttle = crate::logthrottle::Throttle::new(
                    "upstream ejected after repeated connect failures",
                );
                let up = &env.upstreams.slots[upstream].upstream;
                if let Some(more) = EJECTED.check(&[&env.config.name, up.authority()]) {
                    tracing::warn!(environment = %env.config.name, upstream = %up.uri, "upstream ejected after repeated connect failures{more}");
                }
            }
            // Retried once elsewhere: a failed connect (nothing was sent), or an idempotent
            // request whose connection closed before any response byte (like nginx's
            // `proxy_next_upstream error`).
            if connect || (unanswered(&err) && idempotent) {
                if let (None, Some(copy)) = (failed, spare.take()) {
                    next = Some((copy, body::empty()));
                    failed = Some(upstream);
                    continue;
                }
            }
            return Err(GatewayError::UpstreamUnavailable(Box::new(err)));
        }
    }
}

/// Rate limits: this instance's limiters, or the fleet's shared counters in Redis
/// with `on_error` deciding when the store fails.
async fn check_limits(
    shared: &Shared,
    state: &State,
    env: &Environment,
    key_id: &KeyId,
) -> Result<Option<HeaderValue>, (GatewayError, Option<HeaderValue>)> {
    #[cfg(feature = "redis")]
    if let (Some(store), true) = (&state.store, env.limiter.is_limited()) {
        use crate::config::StoreErrorMode;
        // Boxed: a round trip to Redis dwarfs an allocation, and the store's future
        // would otherwise enlarge every request's future, fleet mode or not.
        let checked = store.check(&env.config.name, key_id.as_str(), &env.config.rate_limit);
        match Box::pin(checked).await {
            Ok(verdict) => return verdict.map_err(|(e, h)| (e, Some(h))),
            Err(e) => {
                shared.metrics.rate_limit_store_errors.inc();
                store.report(&e);
                match store.on_error() {
                    StoreErrorMode::Local => {}
                    StoreErrorMode::Allow => return Ok(None),
                    StoreErrorMode::Deny => {
                        return Err((GatewayError::RateLimitStoreUnavailable(Box::new(e)), None))
                    }
                }
            }
        }
    }
    let _ = (shared, state);
    env.limiter.check(key_id).map_err(|(e, h)| (e, Some(h)))
}

fn upstream_error(shared: &Shared, env: &Environment, upstream: usize, kind: &'static str) {
    let authority = env.upstreams.slots[upstream].upstream.authority();
    env.activity.record_upstream_error(authority, kind);
    shared
        .metrics
        .upstream_errors
        .get_or_create(&KindLabels {
            environment: env.label.clone(),
            kind,
        })
        .inc();
}

/// The upstream connection closed or was reset before a response head arrived.
fn unanswered(err: &(dyn std::error::Error + 'static)) -> bool {
    use std::io::ErrorKind::*;
    body::find_cause::<hyper::Error>(err)
        .is_some_and(|e| e.is_incomplete_message() || e.is_canceled())
        || body::find_cause::<std::io::Error>(err).is_some_and(|e| {
            matches!(
                e.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            )
        })
}

fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

fn clone_parts(parts: &http::request::Parts) -> Head {
    let (mut p, ()) = Request::new(()).into_parts();
    p.method = parts.method.clone();
    p.version = parts.version;
    p.headers = parts.headers.clone();
    Box::new(p)
}

/// The client's `x-request-id` when it is sane (1-128 visible ASCII), else a new UUIDv7
/// (time-ordered, so ids sort by arrival in logs).
fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(X_REQUEST_ID) {
        let b = v.as_bytes();
        if !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..=0x7e).contains(c)) {
            return v.clone();
        }
    }
    // Per thread, from the coarse wall clock: `Uuid::now_v7` locks one mutex shared by
    // every thread and reads the precise clock. A thread's ids still increase within
    // a millisecond (the context's counter), and the random bits keep them apart.
    thread_local! {
        static V7: uuid::ContextV7 = const { uuid::ContextV7::new() };
    }
    static CONTEXT: uuid::timestamp::context::ThreadLocalContext<uuid::ContextV7> =
        uuid::timestamp::context::ThreadLocalContext::new(&V7);
    let now = crate::clock::coarse_now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = uuid::Timestamp::from_unix(&CONTEXT, now.as_secs(), now.subsec_nanos());
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Uuid::new_v7(at).hyphenated().encode_lower(&mut buf);
    crate::headers::shared_value(buf).expect("uuid is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated ids are UUIDv7, distinct, and increasing within a thread even when
    /// many share one tick of the coarse clock; a valid client id is kept.
    #[test]
    fn request_ids_are_distinct_increasing_v7() {
        let empty = http::HeaderMap::new();
        let ids: Vec<uuid::Uuid> = (0..2000)
            .map(|_| uuid::Uuid::parse_str(request_id(&empty).to_str().unwrap()).unwrap())
            .collect();
        assert!(ids.iter().all(|id| id.get_version_num() == 7));
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "not increasing");
        let mut sent = http::HeaderMap::new();
        sent.insert(X_REQUEST_ID, HeaderValue::from_static("client-id-1"));
        assert_eq!(request_id(&sent), "client-id-1");
    }
}
