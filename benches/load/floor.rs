//! The floor of the load benchmark: what a hyper proxy costs with no gateway logic.
//!
//! `floor proxy LISTEN UPSTREAM` is a hyper HTTP/1 server whose handler forwards each
//! request over one hyper `client::conn::http1` connection opened per client connection
//! (current-thread runtime: no pool, no checks, no headers added, no timers).
//! `floor serve LISTEN` is hyper's own hello server (200 "ok"), whose idle connections
//! are the per-connection memory floor.
//! `floor rawproxy LISTEN UPSTREAM` is the proxy with its upstream exchange done in the
//! request's own task instead of through hyper's client (no connection task, no
//! channel): what an HTTP/1 client of one's own can save at most. It reads
//! `Content-Length` responses only, which is what the benchmark's upstream sends.
//!
//! `floor h2proxy LISTEN UPSTREAM` is the HTTP/2 floor: a hyper HTTP/2 server (prior
//! knowledge, one task per stream as hyper spawns them) whose streams forward over a
//! shared stack of hyper `client::conn::http1` connections, one per request in flight,
//! reading each response whole (the benchmark's is two bytes).
//! `floor h2rawproxy LISTEN UPSTREAM` is that HTTP/2 server with `rawproxy`'s exchange
//! on a shared stack of upstream sockets: HTTP/2 without hyper's client.
//!
//! `floor rawcontract` and `floor h2rawcontract` are the raw floors plus what
//! specter's contract (DESIGN.md) makes any implementation send, done as cheaply as it
//! can be done: the gateway's nine fields upstream (`Forwarded`, `X-Forwarded-*`,
//! `X-Real-IP`, `X-Request-Id`, `traceparent`, `X-Specter-*`) instead of the client's
//! API key, and `RateLimit-Policy`, a `RateLimit` that changes with every response
//! and the request's id on every response (the changing two never indexed, as
//! specter sends them). Ids come from a counter: unique, not random. No key is
//! checked, no policy or limit evaluated, nothing counted or timed: specter over this
//! floor is what its own checks and plumbing cost.
//!
//! Built from the project's own hyper, so the ladder in `bench.py` starts where specter
//! would be with nothing of its own: `cargo build --release --example floor`.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

type Reply = Response<BoxBody<Bytes, hyper::Error>>;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: floor proxy|rawproxy|rawcontract|h2proxy|h2rawproxy|h2rawcontract \
                 LISTEN UPSTREAM | floor serve LISTEN";
    let (mode, listen) = match (args.get(1), args.get(2)) {
        (Some(mode), Some(listen)) => (mode.as_str(), listen.as_str()),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let upstream = match (mode, args.get(3)) {
        (
            "proxy" | "rawproxy" | "rawcontract" | "h2proxy" | "h2rawproxy" | "h2rawcontract",
            Some(up),
        ) => Some(up.clone()),
        ("serve", None) => None,
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind(listen).await?;
    let idle = Arc::new(Idle::default());
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let upstream = upstream.clone();
        let idle = idle.clone();
        let mode = mode.to_owned();
        tokio::spawn(async move {
            let contract = mode.ends_with("contract");
            let result = match upstream {
                Some(upstream) if mode.starts_with("raw") => {
                    rawproxy(stream, &upstream, contract).await
                }
                Some(upstream) if mode.starts_with("h2") => {
                    let raw = mode.starts_with("h2raw").then_some(contract);
                    h2proxy(stream, upstream, idle, raw).await
                }
                Some(upstream) => proxy(stream, &upstream).await,
                None => serve(stream).await,
            };
            if let Err(e) = result {
                eprintln!("connection: {e}");
            }
        });
    }
}

async fn serve(stream: TcpStream) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let hello = service_fn(|_: Request<Incoming>| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), hello)
        .await?;
    Ok(())
}

/// One upstream connection per client connection, shared by its requests in turn.
async fn proxy(
    stream: TcpStream,
    upstream: &str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let up = dial(upstream).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(up)).await?;
    tokio::spawn(connection);
    let sender = Arc::new(Mutex::new(sender));
    let forward = service_fn(move |mut req: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let mut sender = sender.lock().await;
            // Origin form towards the upstream, as a proxy must send it.
            if let Some(path) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = path.into();
            }
            let reply: Result<Reply, hyper::Error> = sender
                .send_request(req)
                .await
                .map(|response| response.map(BodyExt::boxed));
            reply
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), forward)
        .await?;
    Ok(())
}

/// A connection to the upstream, with Nagle off as every proxy here has it.
async fn dial(upstream: &str) -> std::io::Result<TcpStream> {
    let up = TcpStream::connect(upstream).await?;
    up.set_nodelay(true)?;
    Ok(up)
}

/// The HTTP/2 floors' idle upstream connections, shared by all client connections.
#[derive(Default)]
struct Idle {
    hyper: std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<Incoming>>>,
    raw: std::sync::Mutex<Vec<(TcpStream, Vec<u8>)>>,
}

/// HTTP/2 from the client; each stream takes an idle upstream connection from the
/// shared stack (or opens one) and puts it back once its response is read. `raw`:
/// the exchange is `rawproxy`'s, with the contract's fields or without.
async fn h2proxy(
    stream: TcpStream,
    upstream: String,
    idle: Arc<Idle>,
    raw: Option<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let forward = service_fn(move |mut req: Request<Incoming>| {
        let (idle, upstream) = (idle.clone(), upstream.clone());
        async move {
            if let Some(contract) = raw {
                let taken = idle.raw.lock().unwrap().pop();
                let (mut up, mut buf) = match taken {
                    Some(taken) => taken,
                    None => (dial(&upstream).await?, Vec::with_capacity(8192)),
                };
                let reply = exchange(&mut up, &mut buf, &req, contract).await?;
                idle.raw.lock().unwrap().push((up, buf));
                return Ok(reply);
            }
            let taken = idle.hyper.lock().unwrap().pop();
            let mut sender = match taken {
                Some(sender) => sender,
                None => {
                    let up = TokioIo::new(dial(&upstream).await?);
                    let (sender, connection) = hyper::client::conn::http1::handshake(up)
                        .await
                        .map_err(std::io::Error::other)?;
                    tokio::spawn(connection);
                    sender
                }
            };
            // HTTP/1 wants the authority in `Host` and the target in origin form.
            if let Some(host) = req.uri().authority().map(|a| a.as_str().parse()) {
                req.headers_mut()
                    .insert(hyper::header::HOST, host.map_err(std::io::Error::other)?);
            }
            if let Some(path) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = path.into();
            }
            *req.version_mut() = hyper::Version::HTTP_11;
            let response = sender.send_request(req).await;
            let (parts, body) = response.map_err(std::io::Error::other)?.into_parts();
            let body = body
                .collect()
                .await
                .map_err(std::io::Error::other)?
                .to_bytes();
            idle.hyper.lock().unwrap().push(sender);
            let body = Full::new(body).map_err(|never| match never {}).boxed();
            Ok::<Reply, std::io::Error>(Response::from_parts(parts, body))
        }
    });
    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(TokioIo::new(stream), forward)
        .await?;
    Ok(())
}

/// One upstream connection per client connection; each request writes its head on it
/// and reads the response itself.
async fn rawproxy(
    stream: TcpStream,
    upstream: &str,
    contract: bool,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let up = dial(upstream).await?;
    let up = Arc::new(Mutex::new((up, Vec::with_capacity(8192))));
    let forward = service_fn(move |req: Request<Incoming>| {
        let up = up.clone();
        async move {
            let mut up = up.lock().await;
            let (up, buf) = &mut *up;
            exchange(up, buf, &req, contract).await
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), forward)
        .await?;
    Ok(())
}

async fn exchange(
    up: &mut TcpStream,
    buf: &mut Vec<u8>,
    req: &Request<Incoming>,
    contract: bool,
) -> std::io::Result<Reply> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut head = Vec::with_capacity(512);
    head.extend_from_slice(req.method().as_str().as_bytes());
    head.push(b' ');
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    head.extend_from_slice(target.as_bytes());
    head.extend_from_slice(b" HTTP/1.1\r\n");
    if let (None, Some(host)) = (
        req.headers().get(hyper::header::HOST),
        req.uri().authority(),
    ) {
        for part in [&b"host: "[..], host.as_str().as_bytes(), b"\r\n"] {
            head.extend_from_slice(part);
        }
    }
    for (name, value) in req.headers() {
        if contract && name == "x-api-key" {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    let id = contract.then(|| {
        let id = RequestId::next();
        gateway_fields(&mut head, req, &id);
        id
    });
    head.extend_from_slice(b"\r\n");
    up.write_all(&head).await?;
    buf.clear();
    loop {
        buf.reserve(4096);
        if up.read_buf(buf).await? == 0 {
            return Err(std::io::Error::other("upstream closed"));
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = response.parse(buf).map_err(std::io::Error::other)?
        else {
            continue;
        };
        let mut reply = Response::builder().status(response.code.unwrap_or(502));
        let mut length = 0;
        for h in response.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let value = std::str::from_utf8(h.value).ok();
                length = value.and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            // The contract's responses are the upstream's less its hop-by-hop fields.
            if !(contract && h.name.eq_ignore_ascii_case("connection")) {
                reply = reply.header(h.name, h.value);
            }
        }
        while buf.len() < len + length {
            if up.read_buf(buf).await? == 0 {
                return Err(std::io::Error::other("upstream closed"));
            }
        }
        if let Some(id) = id {
            reply = response_fields(reply, &id);
        }
        let body = Full::new(Bytes::copy_from_slice(&buf[len..len + length]));
        return reply
            .body(body.map_err(|never| match never {}).boxed())
            .map_err(std::io::Error::other);
    }
}

/// A request's id, formatted once for both ways as specter does: a counter's, so
/// unique without a random number generator.
struct RequestId {
    n: u128,
    text: [u8; 36],
}

impl RequestId {
    fn next() -> RequestId {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let n = u128::from(n) << 64 | u128::from(n);
        let mut text = [0u8; 36];
        uuid::Uuid::from_u128(n)
            .hyphenated()
            .encode_lower(&mut text);
        RequestId { n, text }
    }
}

/// The nine fields specter's contract sends upstream, for a direct client on plain
/// HTTP; the trace and span ids are derived from the request id.
fn gateway_fields(head: &mut Vec<u8>, req: &Request<Incoming>, id: &RequestId) {
    let host = req
        .headers()
        .get(hyper::header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri().authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or(b"");
    let mut line = |parts: &[&[u8]]| {
        for part in parts {
            head.extend_from_slice(part);
        }
        head.extend_from_slice(b"\r\n");
    };
    line(&[b"forwarded: for=127.0.0.1;host=\"", host, b"\";proto=http"]);
    line(&[b"x-forwarded-for: 127.0.0.1"]);
    line(&[b"x-real-ip: 127.0.0.1"]);
    line(&[b"x-forwarded-proto: http"]);
    line(&[b"x-forwarded-host: ", host]);
    line(&[b"x-request-id: ", &id.text]);
    line(&[b"x-specter-environment: bench"]);
    line(&[b"x-specter-key-id: bench"]);
    let mut trace = [0u8; 55];
    trace[..3].copy_from_slice(b"00-");
    hex(&id.n.to_be_bytes(), &mut trace[3..35]);
    trace[35] = b'-';
    hex(
        &(id.n as u64 ^ 0x5bd1_e995).to_be_bytes(),
        &mut trace[36..52],
    );
    trace[52..].copy_from_slice(b"-01");
    line(&[b"traceparent: ", &trace]);
}

fn hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

/// The three fields specter's contract adds to each response: the limits' policy, their
/// state now (different each time) and the request's id, the last two never indexed.
fn response_fields(
    reply: hyper::http::response::Builder,
    id: &RequestId,
) -> hyper::http::response::Builder {
    use hyper::header::HeaderValue;
    let left = (u64::MAX - (id.n as u64)) % 100_000_000;
    let mut digits = itoa::Buffer::new();
    let mut state = String::with_capacity(48);
    for (i, scope) in ["per_key", "total"].into_iter().enumerate() {
        if i > 0 {
            state.push_str(", ");
        }
        state.push('"');
        state.push_str(scope);
        state.push_str("\";r=");
        state.push_str(digits.format(left));
        state.push_str(";t=1");
    }
    let mut state = HeaderValue::try_from(state).expect("ASCII");
    state.set_sensitive(true);
    let mut request_id = HeaderValue::from_bytes(&id.text).expect("ASCII");
    request_id.set_sensitive(true);
    reply
        .header(
            "ratelimit-policy",
            HeaderValue::from_static("\"per_key\";q=100000000;w=1, \"total\";q=100000000;w=1"),
        )
        .header("ratelimit", state)
        .header("x-request-id", request_id)
}
