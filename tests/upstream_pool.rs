//! specter's own HTTP/1.1 upstream connections: reused while the upstream keeps them
//! open, replaced when it does not, never reused after an abandoned response. The
//! upstream here is raw TCP so the test sees every connection it accepts.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const KEY: &str = "spk_development_pool";

/// An HTTP/1.1 upstream that answers every request with `response` and counts the
/// connections it accepted; with `close_after_each`, it closes a connection after
/// each answer.
struct RawUpstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

async fn raw_upstream(response: &'static [u8], close_after_each: bool) -> RawUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_request(&mut stream, &mut buf).await {
                    if stream.write_all(response).await.is_err() || close_after_each {
                        return;
                    }
                }
            });
        }
    });
    RawUpstream { addr, connections }
}

/// Reads one request (head and `Content-Length` body) off the front of `buf`, reading
/// more as needed; false when the peer closed.
async fn read_request(stream: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + length {
                buf.drain(..end + 4 + length);
                return true;
            }
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn gateway_for(up: &RawUpstream) -> TestGateway {
    TestGateway::start(&format!(
        "[environments.development]\nupstream = \"http://{}\"\n{}",
        up.addr,
        key_block("development", "svc", KEY)
    ))
    .await
}

async fn send_each(gw: &TestGateway, n: usize) {
    let c = client();
    for i in 0..n {
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let body = if i % 2 == 0 { "" } else { "a small body" };
        let req = Request::builder()
            .method(method)
            .uri(gw.url(&format!("/{i}")))
            .header("x-api-key", KEY)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let answer = send(&c, req).await;
        assert!(answer.status.is_success(), "request {i}: {}", answer.text());
    }
}

#[tokio::test]
async fn keep_alive_connections_are_reused_whatever_the_response_framing() {
    let framings: [(&str, &[u8]); 3] = [
        (
            "content-length",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "chunked",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        ),
        ("no body", b"HTTP/1.1 204 No Content\r\n\r\n"),
    ];
    for (framing, response) in framings {
        let up = raw_upstream(response, false).await;
        let gw = gateway_for(&up).await;
        send_each(&gw, 20).await;
        // One for the bodiless requests (specter's own client), one for those with a
        // body (hyper's).
        assert_eq!(
            up.connections.load(Ordering::SeqCst),
            2,
            "{framing}: 20 sequential requests should share one connection per client"
        );
    }
}

/// hyper writes a forwarded response's Content-Length from its body's size (the field
/// is not kept in the response's map): the client gets it once, with the upstream's
/// value. A HEAD's response, whose body hyper does not see, keeps the upstream's.
#[tokio::test]
async fn content_length_reaches_the_client_once_with_the_upstreams_value() {
    let cases: [(&str, &'static [u8], &str, &str); 2] = [
        (
            "GET",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            "5",
            "hello",
        ),
        (
            "HEAD",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
            "1234",
            "",
        ),
    ];
    for (method, response, length, body) in cases {
        let up = raw_upstream(response, false).await;
        let gw = gateway_for(&up).await;
        let head = format!(
            "{method} /x HTTP/1.1\r\nhost: g\r\nx-api-key: {KEY}\r\nconnection: close\r\n\r\n"
        );
        let answer = raw(gw.http, head.as_bytes(), Duration::from_secs(5)).await;
        let lower = answer.to_ascii_lowercase();
        let lengths: Vec<_> = lower
            .lines()
            .filter_map(|l| l.strip_prefix("content-length:"))
            .map(str::trim)
            .collect();
        assert!(answer.starts_with("HTTP/1.1 200"), "{method}: {answer}");
        assert_eq!(lengths, [length], "{method}: {answer}");
        assert!(
            answer.ends_with(&format!("\r\n\r\n{body}")),
            "{method}: {answer}"
        );
    }
}

#[tokio::test]
async fn an_upstream_that_closes_each_connection_costs_no_request() {
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        true,
    )
    .await;
    let gw = gateway_for(&up).await;
    send_each(&gw, 10).await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 10);
}

#[tokio::test]
async fn a_connection_whose_response_was_abandoned_is_not_reused() {
    // 64 MiB announced, a few bytes sent: the connection is mid-response when the client
    // goes away, so it must not carry another request.
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\nonly the start",
        false,
    )
    .await;
    let gw = gateway_for(&up).await;
    let c = client();
    let response = c
        .request(
            Request::get(gw.url("/big"))
                .header("x-api-key", KEY)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.data_ref().unwrap().as_ref(), b"only the start");
    drop(body);
    drop(c);

    // The gateway learns of the abandoned body when its client connection closes;
    // a new connection is then the only correct way to send the next request.
    let next = client()
        .request(
            Request::get(gw.url("/next"))
                .header("x-api-key", KEY)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = next.status();
    let mut body = next.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(first.data_ref().unwrap().as_ref(), b"only the start");
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}

/// Sends one GET through a fresh client: the status and the whole body, or what
/// failed (the response, or its body part way).
async fn fetch(gw: &TestGateway, path: &str) -> Result<(u16, Bytes), String> {
    let response = client()
        .request(
            Request::get(gw.url(path))
                .header("x-api-key", KEY)
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .map_err(|e| format!("response: {e:?}"))?;
    let status = response.status().as_u16();
    let body = response.into_body().collect().await;
    let body = body.map_err(|e| format!("body: {e}"))?;
    Ok((status, body.to_bytes()))
}

#[tokio::test]
async fn response_framing_two_parsers_could_read_differently_is_refused() {
    let ambiguous: [&'static [u8]; 4] = [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
    ];
    for response in ambiguous {
        let up = raw_upstream(response, false).await;
        let gw = gateway_for(&up).await;
        for i in 0..2 {
            let answer = get(&client(), &gw.url("/"), &[("x-api-key", KEY)]).await;
            answer.assert_error(502, "upstream_unavailable");
            assert_eq!(
                up.connections.load(Ordering::SeqCst),
                i + 1,
                "a refused response closes its connection: {}",
                String::from_utf8_lossy(response)
            );
        }
    }
}

#[tokio::test]
async fn bytes_past_a_responses_end_are_never_read_as_the_next_response() {
    // The upstream sends a second, unasked response right behind the first: it must
    // neither reach the client nor answer the next request.
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled",
        false,
    )
    .await;
    let gw = gateway_for(&up).await;
    for i in 0..3 {
        assert_eq!(fetch(&gw, "/").await, Ok((200, Bytes::from("ok"))));
        assert_eq!(up.connections.load(Ordering::SeqCst), i + 1);
    }
}

#[tokio::test]
async fn a_bad_chunk_fails_the_response_and_closes_its_connection() {
    for response in [
        &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore\r\n0\r\n\r\n"
            [..],
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\nok\r\n0\r\n\r\n",
    ] {
        let up = raw_upstream(response, false).await;
        let gw = gateway_for(&up).await;
        for i in 0..2 {
            // The head may or may not have gone out before the bad chunk was met; the
            // client never gets a complete response either way.
            let outcome = fetch(&gw, "/").await;
            assert!(outcome.is_err(), "a complete response: {outcome:?}");
            assert_eq!(up.connections.load(Ordering::SeqCst), i + 1);
        }
    }
}

#[tokio::test]
async fn an_idle_connection_the_upstream_closed_silently_costs_no_request() {
    // Closed after each answer without saying so: the pooled connection is found
    // closed when the next request takes it, or answers nothing and the request is
    // sent again on a new one.
    let up = raw_upstream(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", true).await;
    let gw = gateway_for(&up).await;
    for _ in 0..10 {
        assert_eq!(fetch(&gw, "/").await, Ok((200, Bytes::from("ok"))));
    }
    assert_eq!(up.connections.load(Ordering::SeqCst), 10);
}

/// The upstream connection's own fields (hop-by-hop, and those its `Connection` names)
/// end at the gateway, through either client (specter's own for bodiless requests,
/// hyper's for those with a body) and to either kind of client connection. The
/// connection is still reused: `keep-alive` was read, not lost.
#[tokio::test]
async fn the_upstream_connections_own_fields_stay_with_it() {
    let up = raw_upstream(
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n\
          Proxy-Authenticate: Basic\r\nTrailer: x-t\r\nX-End: 2\r\nContent-Length: 2\r\n\r\nok",
        false,
    )
    .await;
    let gw = gateway_for(&up).await;
    for (client, version) in [(client(), "HTTP/1.1"), (h2_client(), "HTTP/2")] {
        for (method, body) in [("GET", ""), ("POST", "a small body")] {
            let req = Request::builder()
                .method(method)
                .uri(gw.url("/x"))
                .header("x-api-key", KEY)
                .body(Full::new(Bytes::from(body)))
                .unwrap();
            let answer = send(&client, req).await;
            assert_eq!(answer.text(), "ok", "{version} {method}");
            assert_eq!(answer.headers["x-end"], "2", "{version} {method}");
            for gone in [
                "connection",
                "keep-alive",
                "x-hop",
                "proxy-authenticate",
                "trailer",
            ] {
                assert!(
                    !answer.headers.contains_key(gone),
                    "{version} {method}: {gone} reached the client: {:?}",
                    answer.headers
                );
            }
        }
    }
    // One connection per upstream client, each reused by both client connections.
    assert_eq!(up.connections.load(Ordering::SeqCst), 2);
}
