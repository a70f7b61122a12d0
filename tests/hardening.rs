//! Edge hardening over real sockets: slow and silent clients, request smuggling forms,
//! header limits, HTTP/2 rapid reset, the connection cap, graceful drain of the real
//! binary, upstream failover, the body read timeout, WebSocket-style upgrades and idle
//! HTTP/2 connections. Clients that must misbehave speak raw TCP or the `h2` crate.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

const KEY: &str = "spk_production_hardening00000000000000000000";

// ---------------------------------------------------------------------------------
// Gateways and raw HTTP/1

/// One `production` environment in front of `upstreams`, with `limits` under `[limits]`.
fn config(limits: &str, upstreams: &[String]) -> String {
    let urls: Vec<String> = upstreams.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[limits]\n{limits}\n\n[environments.production]\nupstreams = [{}]\n{}",
        urls.join(", "),
        key_block("production", "edge", KEY)
    )
}

async fn gateway(limits: &str, upstreams: &[String]) -> TestGateway {
    TestGateway::start(&config(limits, upstreams)).await
}

/// A well-formed request head; `key` goes in `x-api-key`.
fn get_head(path: &str, key: Option<&str>) -> String {
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    format!("GET {path} HTTP/1.1\r\nHost: gateway.test\r\n{key}\r\n")
}

/// An HTTP/1 response read off a raw socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawResponse {
    fn parse(bytes: &[u8]) -> Option<RawResponse> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let status = head.split(' ').nth(1)?.parse().ok()?;
        Some(RawResponse {
            status,
            head,
            body: bytes[end + 4..].to_vec(),
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    fn content_length(&self) -> usize {
        self.header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Asserts a gateway error: the status, and the JSON `error` code.
    fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(self.status, status, "{}", self.head);
        assert_eq!(self.header("content-type"), Some("application/json"));
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body))
        });
        assert_eq!(json["error"], code, "{json}");
    }
}

/// Reads one response (head, then a `Content-Length` body) within `timeout`. `None`
/// when the connection closed or the time ran out first.
async fn read_response<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Option<RawResponse> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(response) = RawResponse::parse(&bytes) {
            let bodiless = response.status == 101 || response.status == 204;
            if bodiless || response.body.len() >= response.content_length() {
                return Some(response);
            }
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
}

/// What the server sent back on a raw connection, and whether it closed it.
struct Exchange {
    bytes: Vec<u8>,
    closed: bool,
}

/// Writes `request` on a fresh connection (write errors ignored: the server may close
/// early), then reads until the server closes the connection (EOF or reset) or
/// `timeout` passes.
async fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                return Exchange {
                    bytes,
                    closed: true,
                }
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
            Err(_) => {
                return Exchange {
                    bytes,
                    closed: false,
                }
            }
        }
    }
}

/// Runs `test` and fails it when it takes longer than `limit`.
async fn bounded<F: std::future::Future<Output = ()>>(limit: Duration, test: F) {
    tokio::time::timeout(limit, test)
        .await
        .unwrap_or_else(|_| panic!("the test did not finish within {limit:?}"));
}

// ---------------------------------------------------------------------------------
// 1. Slowloris

/// Sends `bytes` one per second (none at all when empty); returns how long after
/// connecting the server closed the connection, or an error when it was still open
/// after `open_for`.
async fn trickle(addr: SocketAddr, bytes: Vec<u8>, open_for: Duration) -> Result<Duration, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let connected = Instant::now();
    let mut next = bytes.into_iter();
    let mut buf = [0u8; 1024];
    while connected.elapsed() < open_for {
        if let Some(byte) = next.next() {
            if stream.write_all(&[byte]).await.is_err() {
                return Ok(connected.elapsed());
            }
        }
        let tick = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            match tokio::time::timeout_at(tick, stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(connected.elapsed()),
                Ok(Ok(_)) => continue, // an error response or SETTINGS before the close
                Err(_) => break,
            }
        }
    }
    Err(format!(
        "still open {:?} after connecting",
        connected.elapsed()
    ))
}

/// 200 clients each sending a request head one byte per second are cut off by
/// `header_read_timeout`, while a normal client keeps being served on new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_while_others_are_served() {
    let up = Upstream::start("production").await;
    let gw = gateway("header_read_timeout = \"2s\"", &[up.url()]).await;
    let (addr, url) = (gw.http, gw.url("/during-attack"));
    bounded(Duration::from_secs(10), async move {
        let mut attackers = JoinSet::new();
        for _ in 0..200 {
            let head = get_head("/slow", Some(KEY)).into_bytes();
            attackers.spawn(trickle(addr, head, Duration::from_secs(6)));
        }
        let mut served = Vec::new();
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let started = Instant::now();
            // A fresh client each time: new connections must still be accepted.
            let answer = get(&client(), &url, &[("x-api-key", KEY)]).await;
            assert_eq!(answer.status, 200, "a normal client during the attack");
            served.push(started.elapsed());
        }
        let mut closes = Vec::new();
        while let Some(result) = attackers.join_next().await {
            closes.push(result.unwrap().unwrap_or_else(|e| panic!("slowloris: {e}")));
        }
        closes.sort();
        let (first, last) = (closes[0], closes[closes.len() - 1]);
        eprintln!(
            "slowloris: 200 connections closed after {first:?} .. {last:?} (median {:?}); \
             normal requests took {served:?}",
            closes[100]
        );
        assert!(
            last <= Duration::from_secs(3),
            "the slowest slowloris connection was closed after {last:?}, over header_read_timeout + 1 s"
        );
        assert!(
            first >= Duration::from_millis(1500),
            "a slowloris connection was closed after {first:?}, before header_read_timeout"
        );
        assert!(served.iter().all(|d| *d < Duration::from_secs(1)), "{served:?}");
    })
    .await;
}

/// A connection that never completes its first request head holds a connection slot
/// just like a slowloris one, so it must be closed as fast: one that sends nothing at
/// all, and one that trickles the HTTP/2 connection preface one byte per second.
///
/// Failing when written: hyper-util's `auto` builder reads the protocol preface before
/// hyper's HTTP/1 `header_read_timeout` starts, with no deadline of its own, so only
/// the idle watchdog (`idle_timeout`) closes a silent connection, and a trickled
/// preface (activity every second) is never closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_slow_preface_connections_are_closed_within_header_read_timeout() {
    let up = Upstream::start("production").await;
    let limits = "header_read_timeout = \"2s\"\nidle_timeout = \"30s\"";
    let gw = gateway(limits, &[up.url()]).await;
    let addr = gw.http;
    let open_for = Duration::from_secs(5);
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let (silent, slow_preface) = tokio::join!(
        trickle(addr, Vec::new(), open_for),
        trickle(addr, preface, open_for)
    );
    eprintln!("silent connection: {silent:?}; slow HTTP/2 preface: {slow_preface:?}");
    for (what, closed) in [("silent", silent), ("slow HTTP/2 preface", slow_preface)] {
        let after = closed
            .unwrap_or_else(|e| panic!("{what} connection with header_read_timeout = 2s: {e}"));
        assert!(
            after <= Duration::from_secs(3),
            "{what} connection closed after {after:?}"
        );
    }
}

/// `header_read_timeout` times a request head from its first byte; a keep-alive
/// connection waiting for its next request answers to `idle_timeout` alone. A second
/// request whose head trickles in is cut off like a first one.
///
/// Failing when written: hyper's HTTP/1 header timer also runs while a keep-alive
/// connection waits, so every keep-alive connection was closed `header_read_timeout`
/// after its last response (10 s by default, against a 60 s `idle_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_outlives_header_read_timeout_but_a_slow_second_head_does_not() {
    let up = Upstream::start("production").await;
    let limits = "header_read_timeout = \"1s\"\nidle_timeout = \"30s\"";
    let gw = gateway(limits, &[up.url()]).await;
    let head = get_head("/again", Some(KEY));
    bounded(Duration::from_secs(10), async move {
        // Idle for 2.5 header_read_timeouts between two requests on one connection.
        let mut patient = TcpStream::connect(gw.http).await.unwrap();
        patient.write_all(head.as_bytes()).await.unwrap();
        let first = read_response(&mut patient, Duration::from_secs(2)).await;
        assert_eq!(first.map(|r| r.status), Some(200));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        patient.write_all(head.as_bytes()).await.unwrap();
        let second = read_response(&mut patient, Duration::from_secs(2)).await;
        assert_eq!(
            second.map(|r| r.status),
            Some(200),
            "the idle keep-alive connection was closed before idle_timeout"
        );

        // A second head sent one byte every 200 ms (it would take 9 s).
        let mut slow = TcpStream::connect(gw.http).await.unwrap();
        slow.write_all(head.as_bytes()).await.unwrap();
        let first = read_response(&mut slow, Duration::from_secs(2)).await;
        assert_eq!(first.map(|r| r.status), Some(200));
        let began = Instant::now();
        let mut closed_after = None;
        for byte in head.bytes() {
            if slow.write_all(&[byte]).await.is_err() {
                closed_after = Some(began.elapsed());
                break;
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed_after = Some(began.elapsed());
                    break;
                }
                Ok(Ok(_)) | Err(_) => {}
            }
        }
        let closed_after = closed_after.expect("a trickled second head was never cut off");
        assert!(
            closed_after >= Duration::from_millis(900) && closed_after <= Duration::from_millis(2000),
            "the slow second head was cut off after {closed_after:?}, not about header_read_timeout (1 s)"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 2. Request smuggling

/// Forms two HTTP parsers could frame differently. `@KEY@` is the valid key.
const SMUGGLING: &[(&str, &str)] = &[
    (
        "Content-Length then Transfer-Encoding",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding then Content-Length",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    ),
    (
        "two differing Content-Length",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "obs-fold",
        "GET /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nX-Folded: a\r\n b\r\n\r\n",
    ),
    (
        "bare LF everywhere",
        "GET /smuggle HTTP/1.1\nHost: g\nx-api-key: @KEY@\n\n",
    ),
    (
        "one bare LF among CRLFs",
        "GET /smuggle HTTP/1.1\r\nHost: g\nx-api-key: @KEY@\r\n\r\n",
    ),
    (
        "Transfer-Encoding: gzip, chunked",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding: chunked twice",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "Transfer-Encoding: xchunked",
        "POST /smuggle HTTP/1.1\r\nHost: g\r\nx-api-key: @KEY@\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "HTTP/1.0 with Transfer-Encoding",
        "POST /smuggle HTTP/1.0\r\nHost: g\r\nx-api-key: @KEY@\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
];

/// Each ambiguous framing gets 400 and a closed connection (its framing is in doubt);
/// hyper answers some itself with an empty body, specter the rest with JSON.
#[tokio::test]
async fn smuggling_forms_get_400_a_closed_connection_and_reach_nothing() {
    let up = Upstream::start("production").await;
    let gw = gateway("", &[up.url()]).await;
    bounded(Duration::from_secs(20), async {
        for (name, form) in SMUGGLING {
            let request = form.replace("@KEY@", KEY);
            let got = exchange(gw.http, request.as_bytes(), Duration::from_secs(3)).await;
            let text = String::from_utf8_lossy(&got.bytes);
            let response = RawResponse::parse(&got.bytes)
                .unwrap_or_else(|| panic!("{name}: no response: {text:?}"));
            assert_eq!(response.status, 400, "{name}: {text}");
            assert!(
                got.closed,
                "{name}: the connection was left open after the 400"
            );
            if response.body.is_empty() {
                eprintln!("smuggling: {name}: 400 from hyper (empty body), closed");
            } else {
                response.assert_error(400, "bad_request");
                eprintln!("smuggling: {name}: 400 bad_request JSON from specter, closed");
            }
        }
        // A well-formed request on the same gateway does get through.
        let control = exchange(
            gw.http,
            get_head("/control", Some(KEY))
                .replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
                .as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert_eq!(
            RawResponse::parse(&control.bytes).map(|r| r.status),
            Some(200)
        );
    })
    .await;
    let seen: Vec<String> = up.requests().iter().map(|r| r.target.clone()).collect();
    assert_eq!(seen, ["/control"], "a smuggling form reached the upstream");
}

// ---------------------------------------------------------------------------------
// 3. Header limits

fn head_with(extra: &str) -> String {
    format!("GET /headers HTTP/1.1\r\nHost: g\r\nx-api-key: {KEY}\r\n{extra}\r\n")
}

fn fillers(n: usize) -> String {
    (0..n).map(|i| format!("X-Filler-{i}: v\r\n")).collect()
}

fn big_header(bytes: usize) -> String {
    format!("X-Big: {}\r\n", "a".repeat(bytes))
}

async fn assert_431(addr: SocketAddr, what: &str, request: &str) {
    let got = exchange(addr, request.as_bytes(), Duration::from_secs(3)).await;
    let response = RawResponse::parse(&got.bytes).unwrap_or_else(|| {
        panic!(
            "{what}: no response: {:?}",
            String::from_utf8_lossy(&got.bytes)
        )
    });
    assert_eq!(response.status, 431, "{what}: {}", response.head);
    if !response.body.is_empty() {
        response.assert_error(431, "headers_too_large");
    }
}

/// Too many headers, or header bytes over `max_header_bytes`, get 431 before any check
/// or forwarding; just under the limits the same requests pass.
#[tokio::test]
async fn header_count_and_size_limits_answer_431() {
    let up = Upstream::start("production").await;
    let defaults = gateway("", &[up.url()]).await;
    let small = gateway("max_header_bytes = \"8KiB\"", &[up.url()]).await;
    bounded(Duration::from_secs(15), async {
        // Host + key + 99 = 101 headers.
        assert_431(defaults.http, "101 headers", &head_with(&fillers(99))).await;
        assert_431(
            defaults.http,
            "a 70 KiB header",
            &head_with(&big_header(70 * 1024)),
        )
        .await;
        assert_431(
            small.http,
            "a 9 KiB header over 8KiB",
            &head_with(&big_header(9 * 1024)),
        )
        .await;
        assert_eq!(
            up.count(),
            0,
            "a request over the header limits reached the upstream"
        );

        // Under the limits they pass: 90 headers; a 6 KiB header under 8KiB.
        let close = "Connection: close\r\n";
        for (addr, extra) in [
            (defaults.http, fillers(88) + close),
            (small.http, big_header(6 * 1024) + close),
        ] {
            let got = exchange(addr, head_with(&extra).as_bytes(), Duration::from_secs(3)).await;
            let status = RawResponse::parse(&got.bytes).map(|r| r.status);
            assert_eq!(status, Some(200), "{}", String::from_utf8_lossy(&got.bytes));
        }
        assert_eq!(up.count(), 2);
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 4. HTTP/2 rapid reset

/// CVE-2023-44487: a client opening and at once cancelling streams is sent away long
/// before it gets through 5,000, and the server still serves a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_gets_goaway() {
    let up = Upstream::start("production").await;
    let gw = gateway("", &[up.url()]).await;
    let (addr, url) = (gw.http, gw.url("/reset"));
    bounded(Duration::from_secs(20), async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut send, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let mut opened = 0usize;
        let mut error = None;
        while opened < 5000 {
            if let Err(e) = std::future::poll_fn(|cx| send.poll_ready(cx)).await {
                error = Some(e);
                break;
            }
            let request = Request::get(&url)
                .header("x-api-key", KEY)
                .body(())
                .unwrap();
            match send.send_request(request, true) {
                Ok((_response, mut stream)) => {
                    stream.send_reset(h2::Reason::CANCEL);
                    opened += 1;
                }
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
        }
        drop(send);
        let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
        let conn_error = match ended {
            Ok(Ok(Err(e))) => Some(e),
            _ => None,
        };
        // The GOAWAY itself, or the server's close right after it when the client was
        // still writing and met the closed socket before reading the frame.
        let ended_by_server = |e: &h2::Error| {
            e.is_go_away() && e.is_remote()
                || e.get_io().is_some_and(|io| {
                    matches!(
                        io.kind(),
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                    )
                })
        };
        let ending = error
            .iter()
            .chain(conn_error.iter())
            .find(|e| ended_by_server(e));
        eprintln!(
            "rapid reset: connection ended after {opened} streams opened and reset; \
             client error {error:?}; connection {conn_error:?}; upstream saw {} requests",
            up.count()
        );
        assert!(
            ending.is_some() && opened < 5000,
            "the server kept the connection after {opened} reset streams \
             (client error {error:?}, connection {conn_error:?})"
        );
        let fresh = get(&h2_client(), &url, &[("x-api-key", KEY)]).await;
        assert_eq!(
            fresh.status, 200,
            "a fresh HTTP/2 connection after the attack"
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 5. The connection cap

/// Connections over `max_connections` wait in the backlog unserved; they are served
/// once slots free up, and the gateway keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_served_connections_and_recovers() {
    let up = Upstream::start("production").await;
    let gw = gateway("max_connections = 20", &[up.url()]).await;
    let (addr, url) = (gw.http, gw.url("/after"));
    bounded(Duration::from_secs(20), async move {
        let mut conns = Vec::new();
        for i in 0..60 {
            let stream = TcpStream::connect(addr)
                .await
                .unwrap_or_else(|e| panic!("connection {i} (backlog): {e}"));
            conns.push(stream);
        }
        // Connections 21..60 completed their handshake in the kernel's backlog; the
        // gateway must not serve them while the first 20 hold every slot.
        let request = get_head("/capped", Some(KEY));
        for i in [20, 59] {
            conns[i].write_all(request.as_bytes()).await.unwrap();
            let answer = read_response(&mut conns[i], Duration::from_millis(700)).await;
            assert!(
                answer.is_none(),
                "connection {} was served over max_connections: {answer:?}",
                i + 1
            );
        }
        for (i, conn) in conns.iter_mut().enumerate().take(20) {
            conn.write_all(request.as_bytes()).await.unwrap();
            let answer = read_response(conn, Duration::from_secs(3)).await;
            let status = answer.map(|a| a.status);
            assert_eq!(status, Some(200), "connection {} of the first 20", i + 1);
        }
        drop(conns.drain(..20));
        // The freed slots go to the waiting connections: the 21st gets its answer.
        let freed = Instant::now();
        let answer = read_response(&mut conns[0], Duration::from_secs(3)).await;
        assert_eq!(
            answer.map(|a| a.status),
            Some(200),
            "connection 21 after slots freed"
        );
        eprintln!(
            "max_connections: connection 21 served {:?} after 20 closed",
            freed.elapsed()
        );
        drop(conns);
        for i in 0..5 {
            let started = Instant::now();
            let fresh = tokio::time::timeout(
                Duration::from_secs(2),
                get(&client(), &url, &[("x-api-key", KEY)]),
            )
            .await
            .unwrap_or_else(|_| panic!("new connection {i} not served within 2 s"));
            assert_eq!(fresh.status, 200);
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{:?}",
                started.elapsed()
            );
        }
        let admin = format!("http://{}/healthz", gw.admin.unwrap());
        assert_eq!(get(&client(), &admin, &[]).await.status, 200);
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 6. Graceful drain of the real binary

async fn status_of(url: &str) -> Option<u16> {
    let request = Request::get(url)
        .body(http_body_util::Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(2), client().request(request));
    match response.await {
        Ok(Ok(r)) => Some(r.status().as_u16()),
        _ => None,
    }
}

/// SIGTERM to the real binary: listeners close at once, readiness drops, requests in
/// flight finish, and the process exits 0 within `shutdown_grace`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_exits_0() {
    let up =
        Upstream::start_with("production", Behaviour::Delay(Duration::from_millis(1500))).await;
    let dir = tempfile::tempdir().unwrap();
    let (http, admin, mut child) = on_free_ports(|http, admin| {
        let (dir, up) = (dir.path(), &up);
        async move {
            let path = dir.join("specter.toml");
            let text = format!(
                "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n{}",
                config("shutdown_grace = \"10s\"", &[up.url()])
            );
            std::fs::write(&path, text).unwrap();
            let log = dir.join("stderr.log");
            let child = Child(
                Command::new(specter_bin())
                    .args(["run", "--config"])
                    .arg(&path)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let readyz = format!("http://{admin}/readyz");
            let ready = poll_until(Duration::from_secs(10), || async {
                status_of(&readyz).await == Some(200)
            });
            if ready.await {
                Ok((http, admin, child))
            } else {
                Err(std::fs::read_to_string(&log).unwrap_or_default())
            }
        }
    })
    .await;
    let readyz = format!("http://{admin}/readyz");
    let url = format!("http://{http}/slow");
    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        let mut requests = JoinSet::new();
        for _ in 0..20 {
            let url = url.clone();
            // Each request on its own connection: its own client.
            requests.spawn(async move {
                let request = Request::get(&url)
                    .header("x-api-key", KEY)
                    .body(http_body_util::Full::new(Bytes::new()))
                    .unwrap();
                match client().request(request).await {
                    Ok(r) => Ok(r.status().as_u16()),
                    Err(e) => Err(format!("{e:?}")),
                }
            });
        }
        let all_arrived = poll_until(Duration::from_secs(5), || async { up.count() == 20 });
        assert!(
            all_arrived.await,
            "upstream saw {} of 20 requests",
            up.count()
        );
        let pid = child.0.id() as libc::pid_t;
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let signalled = Instant::now();

        let refused = poll_until(Duration::from_secs(1), || async {
            TcpStream::connect(http).await.is_err()
        });
        assert!(
            refused.await,
            "new connections still accepted 1 s after SIGTERM"
        );
        let refused_after = signalled.elapsed();
        let ready = status_of(&readyz).await;
        assert!(
            matches!(ready, None | Some(503)),
            "/readyz during the drain answered {ready:?}"
        );

        let mut statuses = Vec::new();
        while let Some(done) = requests.join_next().await {
            statuses.push(done.unwrap());
        }
        assert!(
            statuses.iter().all(|s| *s == Ok(200)),
            "in-flight requests during the drain: {statuses:?}"
        );
        let exit = loop {
            if let Some(status) = child.0.try_wait().unwrap() {
                break Some(status);
            }
            if signalled.elapsed() > Duration::from_secs(10) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!(
            "drain: listener refused {refused_after:?} after SIGTERM; exited {exit:?} after {:?}",
            signalled.elapsed()
        );
        let exit = exit.expect("specter did not exit within shutdown_grace");
        assert_eq!(exit.code(), Some(0));
    })
    .await;
    if outcome.is_err() {
        let log = std::fs::read_to_string(dir.path().join("stderr.log")).unwrap_or_default();
        panic!("the drain test did not finish within 30 s; specter's log:\n{log}");
    }
}

// ---------------------------------------------------------------------------------
// 7. Failover between upstreams

/// An upstream that can be killed: aborting its accept loop drops its listener, so new
/// connections are refused. It closes each connection after one response (requests in
/// flight at the kill still finish), so the gateway connects anew every time and meets
/// the refusal at once instead of reusing a pooled connection.
struct Killable {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Killable {
    async fn start(name: &'static str) -> Killable {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::Relaxed);
                        async move { Ok::<_, Infallible>(Response::new(specter::body::full(name))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(false)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Killable { addr, hits, accept }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    async fn kill(self) -> usize {
        self.accept.abort();
        let _ = self.accept.await;
        self.hits.load(Ordering::Relaxed)
    }
}

/// One of two upstreams dies under a steady stream of GETs: the connect-failure retry
/// and ejection hide it completely. With both dead the answer is a fast 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_hides_a_dead_upstream_and_both_dead_is_503() {
    let a = Killable::start("a").await;
    let b = Killable::start("b").await;
    let (a_hits, b_hits) = (a.hits.clone(), b.hits.clone());
    let gw = gateway("", &[a.url(), b.url()]).await;
    let url = gw.url("/steady");
    bounded(Duration::from_secs(20), async move {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let total = Arc::new(AtomicUsize::new(0));
        let mut workers = JoinSet::new();
        for _ in 0..4 {
            let (stop, failures, total, url) =
                (stop.clone(), failures.clone(), total.clone(), url.clone());
            workers.spawn(async move {
                let client = client();
                while !stop.load(Ordering::Relaxed) {
                    let answer = get(&client, &url, &[("x-api-key", KEY)]).await;
                    total.fetch_add(1, Ordering::Relaxed);
                    if answer.status != 200 {
                        failures.lock().unwrap().push((answer.status, answer.text()));
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
        let both_served = poll_until(Duration::from_secs(5), || async {
            a_hits.load(Ordering::Relaxed) > 10 && b_hits.load(Ordering::Relaxed) > 10
        });
        assert!(both_served.await, "both upstreams serve before the kill");
        let a_at_kill = a.kill().await;
        let b_at_kill = b_hits.load(Ordering::Relaxed);
        // Past the first ejection back-off (1 s), so a probe of the dead one happens too.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        stop.store(true, Ordering::Relaxed);
        while workers.join_next().await.is_some() {}
        let (total, failures) = (total.load(Ordering::Relaxed), failures.lock().unwrap().clone());
        eprintln!(
            "failover: {total} GETs, {} failed; a served {a_at_kill} before its kill, b served {} ({} after)",
            failures.len(),
            b_hits.load(Ordering::Relaxed),
            b_hits.load(Ordering::Relaxed) - b_at_kill
        );
        assert!(a_at_kill > 10 && b_at_kill > 10, "both served before the kill");
        // Requests a already accepted when it died may still finish: one per worker.
        let a_after_kill = a_hits.load(Ordering::Relaxed) - a_at_kill;
        assert!(a_after_kill <= 4, "a served {a_after_kill} after its kill");
        assert!(total > 100, "only {total} GETs");
        // A GET whose new connection was still in a's accept backlog when a died is
        // reset before any response byte; it is retried on b (see the test below).
        assert!(failures.is_empty(), "failed GETs around the kill: {failures:?}");

        b.kill().await;
        let client = client();
        let mut answers = Vec::new();
        for _ in 0..30 {
            let started = Instant::now();
            let answer = get(&client, &url, &[("x-api-key", KEY)]).await;
            answers.push((answer, started.elapsed()));
        }
        // Steady state: once the first `no_healthy_upstream` came, every later answer.
        let first = answers
            .iter()
            .position(|(a, _)| a.status == 503)
            .unwrap_or_else(|| {
                let seen: Vec<u16> = answers.iter().map(|(a, _)| a.status.as_u16()).collect();
                panic!("never 503 with both upstreams dead: {seen:?}")
            });
        assert!(first <= 10, "503 only from request {first}");
        for (answer, took) in &answers[first..] {
            answer.assert_error(503, "no_healthy_upstream");
            assert!(*took < Duration::from_millis(50), "a 503 took {took:?}");
        }
        let slowest = answers[first..].iter().map(|(_, t)| *t).max().unwrap();
        eprintln!("both dead: 503 from request {first}; slowest 503 {slowest:?}");
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 8. Body read timeout

/// A client that stops sending its declared body gets 408 after `body_read_timeout`.
#[tokio::test]
async fn a_stalled_body_gets_408() {
    let up = Upstream::start("production").await;
    let gw = gateway("body_read_timeout = \"1s\"", &[up.url()]).await;
    bounded(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(gw.http).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: g\r\nx-api-key: {KEY}\r\nContent-Length: 100\r\n\r\n0123456789"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let stalled = Instant::now();
        let response = read_response(&mut stream, Duration::from_secs(5))
            .await
            .expect("an answer to the stalled body");
        let took = stalled.elapsed();
        eprintln!("body read timeout: 408 after {took:?}");
        response.assert_error(408, "request_timeout");
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_secs(3),
            "408 after {took:?}"
        );
    })
    .await;
}

/// A body that trickles in (each pause well under `body_read_timeout`) gets 408 once
/// the whole of it took `body_timeout`, and the upstream never sees it complete.
///
/// Failing when written: `body_timeout` did not exist; a client sending one byte a
/// second held a request open for as long as it liked.
#[tokio::test]
async fn a_trickling_body_gets_408_after_body_timeout() {
    let up = Upstream::start("production").await;
    let gw = gateway(
        "body_read_timeout = \"1s\"\nbody_timeout = \"1s\"",
        &[up.url()],
    )
    .await;
    bounded(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(gw.http).await.unwrap();
        let head = format!(
            "POST /upload HTTP/1.1\r\nHost: g\r\nx-api-key: {KEY}\r\nContent-Length: 100\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let started = Instant::now();
        let (mut reader, mut writer) = stream.into_split();
        let trickle = tokio::spawn(async move {
            for _ in 0..100 {
                if writer.write_all(b"x").await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let response = read_response(&mut reader, Duration::from_secs(5))
            .await
            .expect("an answer to the trickling body");
        let took = started.elapsed();
        trickle.abort();
        response.assert_error(408, "request_timeout");
        assert!(
            took >= Duration::from_millis(900) && took <= Duration::from_secs(3),
            "408 after {took:?}"
        );
        assert!(up.requests().iter().all(|r| r.body_len < 100));
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 9. WebSocket-style upgrades

/// An upstream that switches to an echo tunnel on `Upgrade: websocket` when `accepts`,
/// and otherwise answers 200 "no upgrade here". Records every request's headers.
async fn ws_upstream(accepts: bool) -> (String, Arc<Mutex<Vec<HeaderMap>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = service_fn(move |mut req: Request<Incoming>| {
                    record.lock().unwrap().push(req.headers().clone());
                    let wants = req
                        .headers()
                        .get("upgrade")
                        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
                    let response = if accepts && wants {
                        let on_upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            if let Ok(upgraded) = on_upgrade.await {
                                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            }
                        });
                        Response::builder()
                            .status(101)
                            .header("connection", "upgrade")
                            .header("upgrade", "websocket")
                            .header("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
                            .body(specter::body::empty())
                            .unwrap()
                    } else {
                        Response::new(specter::body::full("no upgrade here"))
                    };
                    async move { Ok::<_, Infallible>(response) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

fn upgrade_request(key: Option<&str>) -> String {
    let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
    format!(
        "GET /ws HTTP/1.1\r\nHost: g\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{key}\r\n"
    )
}

/// Upgrades pass through only after the key check, and bytes are tunnelled only when
/// the upstream switched protocols.
#[tokio::test]
async fn websocket_upgrades_tunnel_only_after_the_checks_and_a_101() {
    let (echo_url, echo_seen) = ws_upstream(true).await;
    let (plain_url, plain_seen) = ws_upstream(false).await;
    let echo = gateway("", &[echo_url]).await;
    let plain = gateway("", &[plain_url]).await;
    bounded(Duration::from_secs(15), async {
        let mut stream = TcpStream::connect(echo.http).await.unwrap();
        stream
            .write_all(upgrade_request(Some(KEY)).as_bytes())
            .await
            .unwrap();
        let response = read_response(&mut stream, Duration::from_secs(3))
            .await
            .expect("an answer to the upgrade");
        assert_eq!(response.status, 101, "{}", response.head);
        assert!(response
            .header("upgrade")
            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")));
        for message in [&b"hello through the tunnel"[..], &[0u8, 1, 2, 255, 13, 10]] {
            stream.write_all(message).await.unwrap();
            let mut echoed = vec![0u8; message.len()];
            tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut echoed))
                .await
                .expect("echo within 2 s")
                .unwrap();
            assert_eq!(echoed, message);
        }
        // The tunnel outlives the HTTP connection it came from, and keeps its slot
        // (failing when written: the gauge read 0 while the tunnel ran, and the tunnel
        // did not count against max_connections).
        let active = || {
            let text = echo.gateway.shared().metrics.encode();
            text.lines()
                .find_map(|l| l.strip_prefix("specter_active_connections{listener=\"http\"} "))
                .map(|v| v.trim().to_owned())
        };
        assert_eq!(
            active().as_deref(),
            Some("1"),
            "an open tunnel holds its connection slot"
        );
        drop(stream);
        let released = poll_until(Duration::from_secs(3), || async {
            active().as_deref() == Some("0")
        });
        assert!(released.await, "a closed tunnel gives its slot back");
        {
            let seen = echo_seen.lock().unwrap();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0]["upgrade"], "websocket");
            assert!(seen[0].get("x-api-key").is_none(), "the key went upstream");
        }

        let mut stream = TcpStream::connect(echo.http).await.unwrap();
        stream
            .write_all(upgrade_request(None).as_bytes())
            .await
            .unwrap();
        let response = read_response(&mut stream, Duration::from_secs(3))
            .await
            .expect("an answer to the keyless upgrade");
        response.assert_error(401, "missing_api_key");
        assert_eq!(
            echo_seen.lock().unwrap().len(),
            1,
            "a keyless upgrade reached the upstream"
        );

        // Refused upgrade: an ordinary 200, and the connection stays HTTP (a second
        // request on it is handled by the gateway, not tunnelled raw to the upstream).
        let mut stream = TcpStream::connect(plain.http).await.unwrap();
        stream
            .write_all(upgrade_request(Some(KEY)).as_bytes())
            .await
            .unwrap();
        let response = read_response(&mut stream, Duration::from_secs(3))
            .await
            .expect("an answer to the refused upgrade");
        assert_eq!(response.status, 200, "{}", response.head);
        assert_eq!(response.body, b"no upgrade here");
        stream
            .write_all(get_head("/after-refusal", Some(KEY)).as_bytes())
            .await
            .expect("the connection stays open after a refused upgrade");
        let second = read_response(&mut stream, Duration::from_secs(2))
            .await
            .expect("a second request on the same connection is answered");
        assert_eq!(second.status, 200, "{}", second.head);
        let seen = plain_seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "both requests passed the gateway");
        for headers in seen.iter() {
            assert!(
                headers.get("x-specter-environment").is_some()
                    && headers.get("x-api-key").is_none(),
                "bytes reached the upstream without passing the gateway: {headers:?}"
            );
        }
    })
    .await;
}

// ---------------------------------------------------------------------------------
// 10. Idle HTTP/2 connections

/// An HTTP/2 (prior knowledge) client connection, ready to send; the connection task
/// ends when the gateway closes the connection.
async fn h2_connect(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    JoinHandle<Result<(), h2::Error>>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    (send.ready().await.unwrap(), connection)
}

fn keyed_get(url: &str) -> Request<()> {
    Request::get(url).header("x-api-key", KEY).body(()).unwrap()
}

/// An HTTP/2 connection with nothing in flight is closed after `idle_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_is_closed_after_idle_timeout() {
    let up = Upstream::start("production").await;
    let gw = gateway(
        "idle_timeout = \"1s\"\nheader_read_timeout = \"5s\"",
        &[up.url()],
    )
    .await;
    let (addr, url) = (gw.http, gw.url("/once"));
    bounded(Duration::from_secs(10), async move {
        let (mut send, mut connection) = h2_connect(addr).await;
        let (response, _) = send.send_request(keyed_get(&url), true).unwrap();
        let response = response.await.unwrap();
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let idle_since = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(5), &mut connection).await;
        let took = idle_since.elapsed();
        eprintln!("idle HTTP/2 connection closed after {took:?}: {closed:?}");
        assert!(
            closed.is_ok(),
            "the idle connection was still open after 5 s"
        );
        assert!(
            took >= Duration::from_millis(750) && took <= Duration::from_millis(2500),
            "closed after {took:?} of idleness with idle_timeout = 1s"
        );
        drop(send);
    })
    .await;
}

/// A stream the client resets while its request is being handled is no longer in
/// flight: the connection, idle afterwards, is still closed after `idle_timeout`.
///
/// Failing when written: the in-flight count was decremented after the handler's await,
/// which never completes when hyper drops the handler of a reset stream, so the idle
/// watchdog saw a request in progress forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_http2_stream_does_not_keep_its_connection_open() {
    let up = Upstream::start_with("production", Behaviour::Delay(Duration::from_secs(30))).await;
    let gw = gateway(
        "idle_timeout = \"1s\"\nheader_read_timeout = \"5s\"",
        &[up.url()],
    )
    .await;
    let (addr, url) = (gw.http, gw.url("/slow"));
    bounded(Duration::from_secs(10), async move {
        let (mut send, mut connection) = h2_connect(addr).await;
        let (_response, mut stream) = send.send_request(keyed_get(&url), true).unwrap();
        // The request reaches the (slow) upstream, then the client gives up on it.
        while up.count() == 0 {
            tokio::task::yield_now().await;
        }
        stream.send_reset(h2::Reason::CANCEL);
        let reset_at = Instant::now();
        let closed = tokio::time::timeout(Duration::from_secs(5), &mut connection).await;
        let took = reset_at.elapsed();
        assert!(
            closed.is_ok(),
            "the connection was still open 5 s after its only stream was reset (idle_timeout = 1s)"
        );
        assert!(took <= Duration::from_millis(2500), "closed after {took:?}");
        drop(send);
    })
    .await;
}

/// An upstream that took the connection into its backlog and then died before
/// answering: the GET is retried on the other upstream instead of answering 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_reset_before_any_response_is_retried_elsewhere() {
    // Listening, never accepting: the kernel completes the handshake into the backlog.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let healthy = Upstream::start("healthy").await;
    let gw = gateway("", &[silent_url, healthy.url()]).await;
    let c = client();
    bounded(Duration::from_secs(10), async move {
        // Round-robin: one of the first two requests goes to the silent upstream.
        let url = gw.url("/retry");
        let requests = (0..2).map(|_| get(&c, &url, &[("x-api-key", KEY)]));
        let pending = futures_util::future::join_all(requests);
        tokio::pin!(pending);
        // Let both requests reach their upstreams, then kill the silent one: its
        // queued connection is reset before a single response byte.
        tokio::select! {
            _ = &mut pending => panic!("a request to the silent upstream cannot finish"),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        drop(silent);
        for answer in pending.await {
            assert_eq!(answer.status, 200, "{}", answer.text());
            assert_eq!(answer.text(), "healthy");
        }
        assert_eq!(healthy.count(), 2);
    })
    .await;
}
