//! `specter demo`: three echo upstreams (one per environment) and a gateway in front of
//! them on loopback, from a config embedded in the binary. The echo upstreams answer
//! JSON showing which environment received what, so the separation is visible.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::{self, Body};
use crate::config::{self, hex, sha256};
use crate::server::{Gateway, StartError};

pub(super) const TEMPLATE: &str = include_str!("../../config/demo.toml");
pub const ENVIRONMENTS: [&str; 3] = ["development", "qa", "production"];

/// The demo's keys. Public on purpose: they open nothing but the demo's echo servers.
pub fn demo_key(env: &str) -> String {
    format!("spk_{env}_demo0000000000000000000000000000")
}

/// Starts an echo upstream for `environment` on `127.0.0.1:0`.
pub async fn echo_upstream(environment: &'static str) -> std::io::Result<SocketAddr> {
    echo_upstream_at(environment, SocketAddr::from(([127, 0, 0, 1], 0))).await
}

/// Starts an echo upstream for `environment` on `addr`.
pub async fn echo_upstream_at(
    environment: &'static str,
    addr: SocketAddr,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req| echo(environment, req));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn echo(environment: &str, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let (parts, mut incoming) = req.into_parts();
    let mut body_bytes = 0u64;
    while let Some(frame) = incoming.frame().await {
        match frame {
            Ok(f) => body_bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => break,
        }
    }
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
    let json = serde_json::json!({
        "environment": environment,
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query(),
        "host": header("host"),
        "x-specter-environment": header("x-specter-environment"),
        "x-specter-key-id": header("x-specter-key-id"),
        "x-forwarded-for": header("x-forwarded-for"),
        "x-request-id": header("x-request-id"),
        "api_key_seen": parts.headers.contains_key("x-api-key") || parts.headers.contains_key("authorization"),
        "body_bytes": body_bytes,
    });
    let mut response = Response::new(body::full(Bytes::from(format!("{json:#}\n"))));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("starting an echo upstream: {0}")]
    Upstream(#[from] std::io::Error),
    #[error("the embedded demo config is invalid (a bug): {0}")]
    Config(#[from] config::ConfigErrors),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Certificate(#[from] crate::commands::certs::CertsError),
}

/// Starts the echo upstreams and the gateway; the gateway listens on `127.0.0.1:port`,
/// with `tls` over https using a fresh self-signed certificate for localhost.
pub async fn start(port: u16, tls: bool) -> Result<Gateway, DemoError> {
    let listen = if tls { "https" } else { "http" };
    let mut text = TEMPLATE
        .replace("@LISTEN@", &format!("{listen} = \"127.0.0.1:{port}\""))
        .replace("@ADMIN@", "127.0.0.1:0");
    if tls {
        // rustls loads certificates from files: the demo's live in a private temp folder.
        let dir = std::env::temp_dir().join(format!("specter-demo-{}", std::process::id()));
        let (cert, key) = crate::commands::certs::self_signed()?;
        let (cert, key) = crate::commands::certs::write_pair(&dir, "demo", &cert, &key)?;
        text.push_str(&format!(
            "\n[tls]\n[[tls.certificates]]\ncert = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ));
    }
    for env in ENVIRONMENTS {
        let addr = echo_upstream(env).await?;
        let upper = env.to_ascii_uppercase();
        text = text
            .replace(&format!("@{upper}@"), &addr.to_string())
            .replace(
                &format!("@{upper}_SHA256@"),
                &hex(&sha256(demo_key(env).as_bytes())),
            );
    }
    let loaded = config::parse(&text, Path::new("<embedded demo config>"))?;
    Ok(Gateway::start(loaded.config).await?)
}

/// What the demo prints: where it listens, the keys, and curl lines to paste.
pub fn banner(gateway: &Gateway) -> String {
    let (scheme, addr, insecure) = match (gateway.http_addr(), gateway.https_addr()) {
        (Some(a), _) => ("http", a, ""),
        (None, Some(a)) => ("https", a, "-k "),
        (None, None) => unreachable!("the demo always listens"),
    };
    let http = format!("{scheme}://{addr}");
    let mut s = format!("specter demo: gateway on {http}");
    if !insecure.is_empty() {
        s.push_str(" (self-signed certificate: curl needs -k)");
    }
    if let Some(admin) = gateway.admin_addr() {
        s.push_str(&format!(", admin on http://{admin}"));
    }
    s.push_str("\n\nDemo keys (one per environment):\n");
    for env in ENVIRONMENTS {
        s.push_str(&format!("  {env:<12} {}\n", demo_key(env)));
    }
    s.push_str("\nTry:\n");
    for env in ENVIRONMENTS {
        let path = if env == "production" {
            "/v1/hello"
        } else {
            "/hello"
        };
        s.push_str(&format!(
            "  curl -s {insecure}-H 'x-api-key: {}' {http}{path}\n",
            demo_key(env)
        ));
    }
    s.push_str(&format!(
        "  curl -s {insecure}-i {http}/hello                      # no key: 401\n"
    ));
    s.push_str(&format!(
        "  curl -s {insecure}-i -H 'x-api-key: {}' {http}/admin   # production policy: 403\n",
        demo_key("production")
    ));
    if let Some(admin) = gateway.admin_addr() {
        s.push_str(&format!(
            "  curl -s http://{admin}/metrics | grep specter_requests\n"
        ));
    }
    s.push_str("\nCtrl-C stops the demo.\n");
    s
}
