//! The admin listener: health, readiness, metrics, the redacted config, key usage.
//! Never a key, a key hash or a private key.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::clock::rfc3339;
use crate::state::{Shared, State};

pub async fn serve(
    listener: TcpListener,
    local: SocketAddr,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    static ACCEPT_FAILED: crate::logthrottle::Throttle =
                        crate::logthrottle::Throttle::new("accept failed; backing off");
                    if let Some(more) = ACCEPT_FAILED.check(&[]) {
                        tracing::warn!(listener = "admin", error = %e, "accept failed; backing off{more}");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let shared = shared.clone();
                async move {
                    if !addressed_to_us(&shared, local, &req) {
                        return Ok::<_, Infallible>(json_response(
                            StatusCode::FORBIDDEN,
                            json!({"error": "wrong_host", "message": "The admin listener answers only requests addressed to its own address, localhost, or a name in [listen] admin_hosts."}),
                        ));
                    }
                    Ok(route(&shared, &req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// DNS rebinding: a page on `evil.example` that re-points its name at 127.0.0.1 can
/// make a browser send requests here, with `Host: evil.example`. Such a name is never
/// one the listener answers to: only an IP literal of its own address, `localhost`
/// (for loopback and wildcard listeners) and `[listen] admin_hosts`. The port is not
/// compared (forwarding changes it); a request without `Host` (HTTP/1.0) is answered.
fn addressed_to_us(shared: &Shared, local: SocketAddr, req: &Request<Incoming>) -> bool {
    let Some(name) = crate::policy::request_host(req.uri(), req.headers()) else {
        // No Host at all is an HTTP/1.0 client, not a browser; an unreadable one is refused.
        return !req.headers().contains_key(http::header::HOST);
    };
    let name = name.trim_end_matches('.');
    let own_ip = local.ip();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return own_ip.is_unspecified()
            || crate::policy::canonical_ip(ip) == crate::policy::canonical_ip(own_ip);
    }
    if name.eq_ignore_ascii_case("localhost") {
        return own_ip.is_loopback() || own_ip.is_unspecified();
    }
    let state = shared.state.load();
    state
        .config
        .listen
        .admin_hosts
        .iter()
        .any(|h| h.eq_ignore_ascii_case(name))
}

/// `HEAD` answers like `GET`; hyper leaves the body out and keeps its length.
async fn route(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            json!({"error": "method_not_allowed", "message": "The admin API only answers GET and HEAD."}),
        );
        r.headers_mut()
            .insert(http::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/" => crate::status::page(),
        "/status.json" => json_response(StatusCode::OK, crate::status::view(shared)),
        "/healthz" => json_response(StatusCode::OK, json!({"status": "ok"})),
        "/readyz" => {
            let (status, body) = readiness(shared).await;
            json_response(status, body)
        }
        "/metrics" => {
            record_upstream_health(shared);
            record_certificate_expiry(shared);
            let mut r = Response::new(body::full(Bytes::from(shared.metrics.encode())));
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/config" => json_response(StatusCode::OK, config_view(shared)),
        "/keys" => json_response(StatusCode::OK, keys_view(&shared.state.load())),
        _ => json_response(
            StatusCode::NOT_FOUND,
            json!({"error": "not_found", "message": "Try /healthz, /readyz, /metrics, /config or /keys."}),
        ),
    }
}

/// Ready unless draining, or unless the fleet's rate-limit store fails while
/// `on_error = "deny"` refuses every limited request; with `local` or `allow` the
/// gateway still serves, and says in which degraded mode.
async fn readiness(shared: &Shared) -> (StatusCode, Value) {
    if shared.draining.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "draining"}),
        );
    }
    #[cfg(feature = "redis")]
    {
        use crate::config::StoreErrorMode;
        let store = shared.state.load().store.clone();
        if let Some(store) = store {
            store.probe().await;
            if let Some(cause) = store.health.failure() {
                let reason = cause;
                return match store.on_error() {
                    StoreErrorMode::Deny => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        json!({"status": "not_ready", "reason": reason, "on_error": "deny",
                               "effect": "every rate-limited request is refused with 503"}),
                    ),
                    StoreErrorMode::Local => (
                        StatusCode::OK,
                        json!({"status": "degraded", "reason": reason, "on_error": "local",
                               "effect": "this instance's own limiters apply"}),
                    ),
                    StoreErrorMode::Allow => (
                        StatusCode::OK,
                        json!({"status": "degraded", "reason": reason, "on_error": "allow",
                               "effect": "rate limits are not enforced"}),
                    ),
                };
            }
        }
    }
    (StatusCode::OK, json!({"status": "ready"}))
}

/// Upstream health is read off the live snapshot at scrape time, so upstreams removed
/// by a reload disappear from the metrics too.
fn record_upstream_health(shared: &Shared) {
    let state = shared.state.load();
    let gauges = &shared.metrics.upstream_healthy;
    gauges.clear();
    for env in &state.environments {
        for (i, slot) in env.upstreams.slots.iter().enumerate() {
            let labels = crate::metrics::UpstreamLabels {
                environment: env.label.clone(),
                upstream: slot.upstream.authority().to_owned(),
            };
            gauges
                .get_or_create(&labels)
                .set(i64::from(env.upstreams.is_healthy(i)));
        }
    }
}

/// Like upstream health: read off the live snapshot, so a replaced certificate's old
/// file disappears from the gauge.
fn record_certificate_expiry(shared: &Shared) {
    let state = shared.state.load();
    let gauges = &shared.metrics.tls_certificate_expiry;
    gauges.clear();
    for cert in &state.certificates {
        let labels = crate::metrics::CertificateLabels {
            certificate: cert.path.clone(),
        };
        gauges.get_or_create(&labels).set(cert.not_after);
    }
}

fn json_response(status: StatusCode, value: Value) -> Response<Body> {
    let mut r = Response::new(body::full(Bytes::from(value.to_string())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn config_view(shared: &Shared) -> Value {
    let state = shared.state.load();
    let c = &state.config;
    let last_error = shared
        .last_reload_error
        .lock()
        .map(|e| e.clone())
        .unwrap_or(None);
    let environments: Vec<Value> = state
        .environments
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let cfg = &e.config;
            let quota = |q: &Option<crate::config::QuotaConfig>| {
                q.map(|q| json!({"requests": q.requests.get(), "per": humantime::format_duration(q.per).to_string(), "burst": q.burst.get()}))
            };
            json!({
                "name": cfg.name,
                "upstreams": cfg.upstreams.iter().map(|u| u.uri.to_string().trim_end_matches('/').to_owned()).collect::<Vec<_>>(),
                "upstream_health": (0..e.upstreams.slots.len()).map(|i| e.upstreams.is_healthy(i)).collect::<Vec<_>>(),
                "hosts": cfg.hosts,
                "connect_timeout": humantime::format_duration(cfg.connect_timeout).to_string(),
                "request_timeout": humantime::format_duration(cfg.request_timeout).to_string(),
                "rate_limit": {"per_key": quota(&cfg.rate_limit.per_key), "total": quota(&cfg.rate_limit.total)},
                "policy": crate::config::policy_view::to_json(&cfg.policy),
                "key_ids": state.keys.ids_of(i).collect::<Vec<&str>>(),
            })
        })
        .collect();
    json!({
        "file": c.source.path.display().to_string(),
        "sha256": c.source.sha256,
        "version": state.version,
        "loaded_at": rfc3339(state.loaded_at),
        "last_reload_error": last_error,
        "environments": environments,
    })
}

/// One row of `/keys`; `specter keys usage` reads the same type back.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct KeyRow {
    pub environment: String,
    pub key_id: String,
    pub not_before: Option<String>,
    pub not_after: Option<String>,
    pub requests: u64,
    pub last_seen: Option<String>,
    pub last_ip: Option<String>,
}

fn keys_view(state: &State) -> Value {
    let mut rows: Vec<KeyRow> = state
        .keys
        .iter()
        .map(|k| {
            let last_seen = k
                .usage
                .map_or(0, |u| u.last_seen_ms.load(Ordering::Relaxed));
            KeyRow {
                environment: state.environments[k.environment].config.name.clone(),
                key_id: k.id.to_owned(),
                not_before: k.window.not_before.map(rfc3339),
                not_after: k.window.not_after.map(rfc3339),
                requests: k.usage.map_or(0, |u| u.requests.load(Ordering::Relaxed)),
                last_seen: (last_seen > 0)
                    .then(|| rfc3339(UNIX_EPOCH + Duration::from_millis(last_seen))),
                last_ip: k
                    .usage
                    .and_then(|u| u.last_ip.load().as_deref().map(|ip| ip.to_string())),
            }
        })
        .collect();
    rows.sort_by(|a, b| (&a.environment, &a.key_id).cmp(&(&b.environment, &b.key_id)));
    serde_json::to_value(rows).unwrap_or_default()
}
