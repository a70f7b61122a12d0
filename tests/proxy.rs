//! The core request path: key -> environment -> streaming proxy, over real sockets.

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};

/// Three environments × 300 keys: every key reaches its own environment's upstream and
/// no other, and no upstream ever sees an API key.
#[tokio::test]
async fn every_key_reaches_only_its_own_environment() {
    let envs = ["development", "qa", "production"];
    let mut upstreams = Vec::new();
    let mut toml = String::new();
    let mut keys = Vec::new();
    for env in envs {
        let up = Upstream::start(env).await;
        toml.push_str(&format!(
            "[environments.{env}]\nupstream = \"{}\"\n",
            up.url()
        ));
        for i in 0..300 {
            let key = format!("spk_{env}_{i:04}_{}", "x".repeat(27));
            toml.push_str(&key_block(env, &format!("{env}-{i}"), &key));
            keys.push((env, i, key));
        }
        upstreams.push(up);
    }
    let gw = TestGateway::start(&toml).await;
    let client = client();
    for (env, i, key) in &keys {
        // Alternate the two ways of sending a key.
        let auth = format!("Bearer {key}");
        let header = if i % 2 == 0 {
            ("x-api-key", key.as_str())
        } else {
            ("authorization", auth.as_str())
        };
        let answer = get(&client, &gw.url("/who"), &[header]).await;
        assert_eq!(answer.status, 200, "{env} key {i}");
        assert_eq!(
            answer.text(),
            *env,
            "{env} key {i} answered by the wrong upstream"
        );
    }
    let all_keys: Vec<&str> = keys.iter().map(|(_, _, k)| k.as_str()).collect();
    for (env, up) in envs.iter().zip(&upstreams) {
        let seen = up.requests();
        assert_eq!(seen.len(), 300, "{env}");
        let ids: HashSet<String> = seen
            .iter()
            .map(|r| r.headers["x-specter-key-id"].to_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids.len(), 300);
        for r in &seen {
            assert_eq!(r.headers["x-specter-environment"], *env);
            assert!(
                r.headers.get("x-api-key").is_none() && r.headers.get("authorization").is_none()
            );
            for (name, value) in &r.headers {
                let v = value.to_str().unwrap_or("");
                assert!(
                    !all_keys.iter().any(|k| v.contains(k)),
                    "{env} upstream saw a key in {name}"
                );
            }
        }
    }
}

#[tokio::test]
async fn bad_keys_get_401_json_and_reach_nothing() {
    let up = Upstream::start("development").await;
    let toml = format!(
        "[environments.development]\nupstream = \"{}\"\n{}{}not_after = 2020-01-01T00:00:00Z\n{}not_before = 2999-01-01T00:00:00Z\n",
        up.url(),
        key_block("development", "good", "spk_development_good"),
        key_block("development", "old", "spk_development_old"),
        key_block("development", "staged", "spk_development_staged"),
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let url = gw.url("/x");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[], "missing_api_key"),
        (
            &[("authorization", "Basic dXNlcjpwYXNz")],
            "missing_api_key",
        ),
        (
            &[("x-api-key", "spk_development_unknown")],
            "invalid_api_key",
        ),
        (
            &[("authorization", "Bearer spk_development_unknown")],
            "invalid_api_key",
        ),
        (&[("authorization", "Bearer")], "invalid_api_key"),
        (&[("authorization", "Bearer   ")], "invalid_api_key"),
        (&[("x-api-key", "")], "invalid_api_key"),
        (
            &[
                ("x-api-key", "spk_development_good"),
                ("x-api-key", "spk_development_good"),
            ],
            "invalid_api_key",
        ),
        (
            &[
                ("x-api-key", "spk_development_good"),
                ("authorization", "Bearer spk_development_good"),
            ],
            "invalid_api_key",
        ),
        (&[("x-api-key", "spk_development_old")], "expired_api_key"),
        // A staged key answers exactly like an unknown one.
        (
            &[("x-api-key", "spk_development_staged")],
            "invalid_api_key",
        ),
    ];
    let mut ids = HashSet::new();
    for (headers, code) in cases {
        let answer = get(&c, &url, headers).await;
        answer.assert_error(401, code);
        assert!(ids.insert(answer.json()["request_id"].as_str().unwrap().to_owned()));
    }
    assert_eq!(up.count(), 0, "nothing may reach the upstream");
    let ok = get(&c, &url, &[("x-api-key", "spk_development_good")]).await;
    assert_eq!(ok.status, 200);
}

/// `Connection` may name headers to drop, but never the gateway's own headers, and
/// authentication uses the key as sent.
#[tokio::test]
async fn connection_header_tricks_change_nothing() {
    let up = Upstream::start("qa").await;
    let toml = format!(
        "[environments.qa]\nupstream = \"{}\"\n{}",
        up.url(),
        key_block("qa", "qa-key", "spk_qa_k")
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let answer = get(
        &c,
        &gw.url("/x"),
        &[
            ("x-api-key", "spk_qa_k"),
            (
                "connection",
                "x-api-key, x-specter-environment, x-specter-key-id",
            ),
            ("x-specter-environment", "production"),
            ("x-specter-key-id", "forged"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    let seen = &up.requests()[0];
    assert_eq!(seen.headers["x-specter-environment"], "qa");
    assert_eq!(seen.headers["x-specter-key-id"], "qa-key");
    assert_eq!(
        seen.headers.get_all("x-specter-environment").iter().count(),
        1
    );
    assert!(seen.headers.get("x-api-key").is_none());
    // Dropping the key header by `Connection` does not make a request anonymous-but-ok.
    let answer = get(&c, &gw.url("/x"), &[("connection", "x-api-key")]).await;
    answer.assert_error(401, "missing_api_key");
}

/// The 401 says where the key goes (the configured header, and Bearer), and two keys
/// get their own sentence under the same code.
#[tokio::test]
async fn key_errors_say_where_the_key_goes_and_that_one_is_enough() {
    let up = Upstream::start("qa").await;
    let toml = format!(
        "[auth]\nheader = \"x-team-token\"\n\n{}",
        single_environment("qa", &up, "", "k", "spk_qa_k")
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let missing = get(&c, &gw.url("/x"), &[]).await;
    missing.assert_error(401, "missing_api_key");
    let message = missing.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("x-team-token"), "{message}");
    assert!(message.contains("Authorization: Bearer"), "{message}");
    let two = get(
        &c,
        &gw.url("/x"),
        &[
            ("x-team-token", "spk_qa_k"),
            ("authorization", "Bearer spk_qa_k"),
        ],
    )
    .await;
    two.assert_error(401, "invalid_api_key");
    let message = two.json()["message"].as_str().unwrap().to_owned();
    assert!(message.contains("one API key, not two"), "{message}");
    assert!(!message.contains("spk_qa_k"), "{message}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn forwarded_headers_and_host() {
    let up = Upstream::start("qa").await;
    let toml = single_environment("qa", &up, "", "k", "spk_qa_k");
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let answer = get(
        &c,
        &gw.url("/a/b?x=1&y=2"),
        &[
            ("x-api-key", "spk_qa_k"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-request-id", "client-id-1"),
            ("host", "api.example.com"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-request-id"], "client-id-1");
    let seen = &up.requests()[0];
    assert_eq!(seen.target, "/a/b?x=1&y=2");
    assert_eq!(
        seen.headers["x-forwarded-for"], "127.0.0.1",
        "client XFF is replaced, not trusted"
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], "api.example.com");
    assert_eq!(seen.headers["x-request-id"], "client-id-1");
    assert_eq!(
        seen.headers["host"],
        up.addr.to_string().as_str(),
        "upstream gets its own authority"
    );
    // An invalid client id is replaced by a generated one.
    let long = "x".repeat(200);
    let answer = get(
        &c,
        &gw.url("/"),
        &[("x-api-key", "spk_qa_k"), ("x-request-id", &long)],
    )
    .await;
    let id = answer.headers["x-request-id"].to_str().unwrap();
    assert_ne!(id, long);
    assert_eq!(up.requests()[1].headers["x-request-id"], id);
}

#[tokio::test]
async fn preserve_host_sends_the_clients_host() {
    let up = Upstream::start("qa").await;
    let toml = single_environment("qa", &up, "preserve_host = true\n", "k", "spk_qa_k");
    let gw = TestGateway::start(&toml).await;
    let answer = get(
        &client(),
        &gw.url("/"),
        &[("x-api-key", "spk_qa_k"), ("host", "api.example.com")],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(up.requests()[0].headers["host"], "api.example.com");
}

#[tokio::test]
async fn hosts_are_enforced() {
    let up = Upstream::start("production").await;
    let toml = format!(
        "[environments.production]\nupstream = \"{}\"\nhosts = [\"api.example.com\"]\n{}",
        up.url(),
        key_block("production", "k", "spk_production_k")
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let wrong = get(
        &c,
        &gw.url("/"),
        &[
            ("x-api-key", "spk_production_k"),
            ("host", "evil.example.com"),
        ],
    )
    .await;
    wrong.assert_error(403, "wrong_host");
    assert_eq!(up.count(), 0);
    let right = get(
        &c,
        &gw.url("/"),
        &[
            ("x-api-key", "spk_production_k"),
            ("host", "API.example.com:8080"),
        ],
    )
    .await;
    assert_eq!(right.status, 200);
    // Absolute-form target: its authority counts as the host, and must equal Host.
    let raw_answer = raw(
        gw.http,
        b"GET http://evil.example.com/ HTTP/1.1\r\nhost: evil.example.com\r\nx-api-key: spk_production_k\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw_answer.starts_with("HTTP/1.1 403"), "{raw_answer}");
    assert!(raw_answer.contains("wrong_host"));
    let raw_answer = raw(
        gw.http,
        b"GET http://evil.example.com/ HTTP/1.1\r\nhost: api.example.com\r\nx-api-key: spk_production_k\r\nconnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(raw_answer.starts_with("HTTP/1.1 400"), "{raw_answer}");
    assert!(raw_answer.contains("differs from the Host header"));
    assert_eq!(up.count(), 1);
}

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// 256 MiB each way streams through while RSS grows by less than 32 MiB (the test
/// process holds the client, the gateway and the upstream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways() {
    const SIZE: u64 = 256 << 20;
    let up_in = Upstream::start("qa").await;
    let up_out = Upstream::start_with("development", Behaviour::LargeBody(SIZE)).await;
    let toml = format!(
        "[environments.qa]\nupstream = \"{}\"\n{}[environments.development]\nupstream = \"{}\"\n{}",
        up_in.url(),
        key_block("qa", "k", "spk_qa_k"),
        up_out.url(),
        key_block("development", "k", "spk_development_k")
    );
    let gw = TestGateway::start(&toml).await;
    let streaming: hyper_util::client::legacy::Client<_, specter::body::Body> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    // Warm up allocator and pools before measuring.
    let warm = Request::post(gw.url("/up"))
        .header("x-api-key", "spk_qa_k")
        .body(stream_zeros(1 << 20))
        .unwrap();
    streaming
        .request(warm)
        .await
        .unwrap()
        .into_body()
        .collect()
        .await
        .unwrap();
    let before = rss_kib();

    let upload = Request::post(gw.url("/up"))
        .header("x-api-key", "spk_qa_k")
        .body(stream_zeros(SIZE))
        .unwrap();
    let response = streaming.request(upload).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    assert_eq!(up_in.requests().last().unwrap().body_len, SIZE);

    let download = Request::get(gw.url("/down"))
        .header("x-api-key", "spk_development_k")
        .body(specter::body::empty())
        .unwrap();
    let mut body = streaming.request(download).await.unwrap().into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);
    let grown = rss_kib().saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "RSS grew by {grown} KiB while streaming 2 × 256 MiB"
    );
}

#[tokio::test]
async fn upstream_failures_map_to_502_and_504() {
    // A port with nothing listening: bind, note the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let slow = Upstream::start_with("qa", Behaviour::Delay(Duration::from_secs(5))).await;
    let toml = format!(
        "[environments.development]\nupstream = \"http://{dead}\"\n{}[environments.qa]\nupstream = \"{}\"\nrequest_timeout = \"300ms\"\n{}",
        key_block("development", "k", "spk_development_k"),
        slow.url(),
        key_block("qa", "k", "spk_qa_k")
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    let refused = get(&c, &gw.url("/"), &[("x-api-key", "spk_development_k")]).await;
    refused.assert_error(502, "upstream_unavailable");
    let started = std::time::Instant::now();
    let timed_out = get(&c, &gw.url("/"), &[("x-api-key", "spk_qa_k")]).await;
    timed_out.assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// `request_timeout` answers 504 on time whichever way the deadline is kept: an
/// HTTP/1 request's by the gateway's sweeper (woken by a deadline before its next
/// look, or finding it at a look), an HTTP/2 stream's by a timer. On one keep-alive
/// connection, an expired deadline never carries over to the next request.
#[tokio::test]
async fn request_timeout_answers_on_time_and_per_request() {
    let slow = Upstream::start_with("qa", Behaviour::Delay(Duration::from_secs(5))).await;
    let slower = Upstream::start_with("staging", Behaviour::Delay(Duration::from_secs(5))).await;
    let fast = Upstream::start("development").await;
    // The sweeper looks every 2.5 s (a quarter of the default header_read_timeout):
    // a 50 ms deadline falls before its next look and must wake it, a 3 s one is
    // found at a look and waited for exactly. Either way off, and the 504 would come
    // up to 2.5 s late.
    let toml = format!(
        "[environments.qa]\nupstream = \"{slow}\"\nrequest_timeout = \"50ms\"\n{}\
         [environments.staging]\nupstream = \"{}\"\nrequest_timeout = \"3s\"\n{}\
         [environments.development]\nupstream = \"{}\"\n{}",
        key_block("qa", "q", "spk_qa_q"),
        slower.url(),
        key_block("staging", "s", "spk_staging_s"),
        fast.url(),
        key_block("development", "d", "spk_development_d"),
        slow = slow.url(),
    );
    let gw = TestGateway::start(&toml).await;
    let stream = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for (key, timeout) in [
        ("spk_qa_q", Duration::from_millis(50)),
        ("spk_staging_s", Duration::from_secs(3)),
        ("spk_qa_q", Duration::from_millis(50)),
    ] {
        let started = std::time::Instant::now();
        let request = Request::get("/")
            .header("host", "gateway")
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), 504, "{key}");
        assert!(
            elapsed >= timeout && elapsed < timeout + Duration::from_millis(400),
            "{key}: 504 after {elapsed:?}, request_timeout {timeout:?}"
        );
        response.into_body().collect().await.unwrap();
    }
    let request = Request::get("/")
        .header("host", "gateway")
        .header("x-api-key", "spk_development_d")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(
        response.status(),
        200,
        "same connection, after two timeouts"
    );

    let started = std::time::Instant::now();
    let over_h2 = get(&h2_client(), &gw.url("/"), &[("x-api-key", "spk_qa_q")]).await;
    over_h2.assert_error(504, "upstream_timeout");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(50) && elapsed < Duration::from_millis(450),
        "HTTP/2: 504 after {elapsed:?}"
    );
}

#[tokio::test]
async fn one_of_two_upstreams_down_still_serves() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let alive = Upstream::start("production").await;
    let toml = format!(
        "[environments.production]\nupstreams = [\"http://{dead}\", \"{}\"]\n{}",
        alive.url(),
        key_block("production", "k", "spk_production_k")
    );
    let gw = TestGateway::start(&toml).await;
    let c = client();
    for i in 0..20 {
        let answer = get(
            &c,
            &gw.url(&format!("/{i}")),
            &[("x-api-key", "spk_production_k")],
        )
        .await;
        assert_eq!(answer.status, 200, "request {i}: {}", answer.text());
    }
    assert_eq!(alive.count(), 20);
}

#[tokio::test]
async fn http2_prior_knowledge_works() {
    let up = Upstream::start("qa").await;
    let toml = single_environment("qa", &up, "", "k", "spk_qa_k");
    let gw = TestGateway::start(&toml).await;
    let c = h2_client();
    let req = Request::post(gw.url("/h2?q=1"))
        .header("x-api-key", "spk_qa_k")
        .body(Full::new(Bytes::from_static(b"hello")))
        .unwrap();
    let answer = send(&c, req).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "qa");
    let seen = &up.requests()[0];
    assert_eq!(seen.target, "/h2?q=1");
    assert_eq!(seen.body_len, 5);
    assert_eq!(
        seen.headers["x-forwarded-host"],
        gw.http.to_string().as_str()
    );
    let missing = get(&c, &gw.url("/"), &[]).await;
    missing.assert_error(401, "missing_api_key");
}

/// Values that differ in every response (`RateLimit`, `x-request-id`) go out as HPACK
/// "never indexed" literals, so that they do not churn the connection's compression
/// table; every other response field may be indexed. Read off the wire: a raw HTTP/2
/// exchange, the response's header block walked representation by representation.
#[tokio::test]
async fn http2_per_response_values_are_never_indexed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start("qa").await;
    let limits = "[environments.qa.rate_limit]\nper_key = { requests = 100, per = \"1s\" }\n";
    let toml = single_environment("qa", &up, limits, "k", "spk_qa_k");
    let gw = TestGateway::start(&toml).await;
    let authority = gw.http.to_string();
    // Literal fields without indexing, new names, no Huffman: 0x00, name, value.
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", authority.as_str()),
        ("x-api-key", "spk_qa_k"),
    ] {
        block.push(0);
        for s in [name, value] {
            block.push(u8::try_from(s.len()).unwrap());
            block.extend_from_slice(s.as_bytes());
        }
    }
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(frame(0x1, 0x5, 1, &block)); // HEADERS, END_STREAM | END_HEADERS
    let mut tcp = tokio::net::TcpStream::connect(gw.http).await.unwrap();
    tcp.write_all(&out).await.unwrap();
    // Frames until the response's HEADERS on stream 1.
    let block = loop {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if head[3] == 0x1 && stream == 1 {
            assert_eq!(head[4] & 0x4, 0x4, "one HEADERS frame (END_HEADERS)");
            break payload;
        }
    };
    // RFC 7541 section 6: count the never-indexed literals (0001xxxx) and read their
    // values' lengths; skip every other representation whole.
    let int = |b: &[u8], i: &mut usize, prefix: u32| -> usize {
        let mask = (1u8 << prefix) - 1;
        let mut v = usize::from(b[*i] & mask);
        *i += 1;
        if v == usize::from(mask) {
            let mut shift = 0;
            loop {
                let byte = b[*i];
                *i += 1;
                v += usize::from(byte & 0x7f) << shift;
                shift += 7;
                if byte & 0x80 == 0 {
                    break;
                }
            }
        }
        v
    };
    let string = |b: &[u8], i: &mut usize| {
        let len = int(b, i, 7);
        *i += len;
    };
    let (mut i, mut never, mut fields) = (0, 0, 0);
    while i < block.len() {
        let first = block[i];
        if first & 0xe0 == 0x20 {
            int(&block, &mut i, 5); // a table size update, not a field
            continue;
        }
        fields += 1;
        if first & 0x80 != 0 {
            int(&block, &mut i, 7); // indexed
            continue;
        }
        let prefix = if first & 0xc0 == 0x40 { 6 } else { 4 };
        if first & 0xf0 == 0x10 {
            never += 1;
        }
        if int(&block, &mut i, prefix) == 0 {
            string(&block, &mut i); // a new name
        }
        string(&block, &mut i);
    }
    assert_eq!(i, block.len(), "the block parses to its end");
    assert_eq!(never, 2, "RateLimit and x-request-id, of {fields} fields");
    assert!(
        fields > 4,
        "status, the upstream's fields and the gateway's"
    );
}

/// `specter demo --port 0`: each environment's demo key reaches its own echo upstream.
#[tokio::test]
async fn demo_answers_for_each_environment() {
    let mut child = Child(
        Command::new(specter_bin())
            .args(["demo", "--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = child.0.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().unwrap().unwrap();
    let addr = first
        .split("http://")
        .nth(1)
        .unwrap()
        .split([',', ' '])
        .next()
        .unwrap()
        .to_owned();
    let mut keys = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(key) = line.split_whitespace().find(|w| w.starts_with("spk_")) {
            if !line.contains("curl") {
                keys.push(key.to_owned());
            }
        }
        if line.contains("Ctrl-C") {
            break;
        }
    }
    assert_eq!(keys.len(), 3, "three demo keys printed");
    let c = client();
    for (env, key) in ["development", "qa", "production"].iter().zip(&keys) {
        let answer = get(
            &c,
            &format!("http://{addr}/v1/hello"),
            &[("x-api-key", key)],
        )
        .await;
        assert_eq!(answer.status, 200, "{env}");
        let json = answer.json();
        assert_eq!(json["environment"], *env);
        assert_eq!(json["x-specter-environment"], *env);
        assert_eq!(json["api_key_seen"], false);
    }
}
