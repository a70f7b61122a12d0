//! Hostile request heads against a real gateway and an upstream that records the exact
//! bytes it receives: forged header spellings, forwarding headers from untrusted peers,
//! upgrade tunnels, path parameters, Host forms and the minor head forms of the second
//! attack round. Each test failed on the code before its fix.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const KEY: &str = "spk_production_hostile00000000000000000000";
const WAIT: Duration = Duration::from_secs(5);

/// An HTTP/1.1 upstream that records every request head byte for byte. It answers
/// `101` (then echoes) to any request carrying an `Upgrade` header, and `200 ok`
/// otherwise, on keep-alive connections.
#[derive(Clone)]
struct RawUpstream {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    async fn start() -> RawUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let seen = heads.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, seen.clone()));
            }
        });
        RawUpstream { addr, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every head received, lossily as text (the tests look for exact substrings).
    fn heads(&self) -> Vec<String> {
        let heads = self.heads.lock().unwrap();
        heads
            .iter()
            .map(|h| String::from_utf8_lossy(h).into_owned())
            .collect()
    }

    fn raw_heads(&self) -> Vec<Vec<u8>> {
        self.heads.lock().unwrap().clone()
    }
}

async fn serve(mut stream: TcpStream, heads: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
        heads.lock().unwrap().push(head);
        let length = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..length);
        if let Some(protocol) = text.lines().find_map(|l| l.strip_prefix("upgrade:")) {
            let answer = format!(
                "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {}\r\n\r\n",
                protocol.trim()
            );
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            let (mut r, mut w) = stream.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        if stream.write_all(ok).await.is_err() {
            return;
        }
    }
}

/// A gateway with one `production` environment in front of `up`, with extra
/// environment settings (TOML lines, e.g. a `[environments.production.policy]` table).
async fn gateway(up: &RawUpstream, extra: &str) -> TestGateway {
    TestGateway::start(&format!(
        "[environments.production]\nupstream = \"{}\"\n{}\n{extra}",
        up.url(),
        key_block("production", "prod-svc", KEY)
    ))
    .await
}

/// Sends one request head (the key header is added) on a fresh connection and returns
/// the status line's code and the whole answer.
async fn request(gw: &TestGateway, head: &str) -> (u16, String) {
    let (line, rest) = head.split_once("\r\n").expect("a request line");
    let bytes = format!("{line}\r\nx-api-key: {KEY}\r\nconnection: close\r\n{rest}");
    status_of(raw(gw.http, bytes.as_bytes(), WAIT).await)
}

fn status_of(answer: String) -> (u16, String) {
    let code = answer
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {answer:?}"));
    (code, answer)
}

/// Header names in a recorded head, lower-cased.
fn names(head: &str) -> Vec<String> {
    head.lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect()
}

fn value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

const FORGED: &str = "GET /v1/x HTTP/1.1\r\nhost: api.example.com\r\n\
    x_specter_environment: development\r\nx_specter_key_id: prod-admin\r\n\
    x_forwarded_for: 6.6.6.6\r\nx_api_key: spk_development_other\r\nx_tenant: acme\r\n\
    forwarded: for=6.6.6.6\r\nx-real-ip: 6.6.6.6\r\nx-original-url: /v1/internal/secret\r\n\
    x-rewrite-url: /v1/internal/secret\r\nx-forwarded-port: 1\r\nx-forwarded-prefix: /a\r\n\
    x-forwarded-server: evil\r\nx-host: evil.example.com\r\n\r\n";

/// Underscore spellings of gateway-owned headers and forwarding headers from a peer
/// that is not a trusted proxy never reach the upstream; specter's own do.
#[tokio::test]
async fn forged_header_variants_never_reach_the_upstream() {
    let up = RawUpstream::start().await;
    let gw = gateway(&up, "").await;
    let (status, answer) = request(&gw, FORGED).await;
    assert_eq!(status, 200, "{answer}");
    let head = &up.heads()[0];
    let sent = names(head);
    assert!(!sent.iter().any(|n| n.contains('_')), "{head}");
    for gone in [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-forwarded-server",
        "x-host",
    ] {
        assert!(
            !sent.iter().any(|n| n == gone),
            "{gone} reached the upstream:\n{head}"
        );
    }
    assert_eq!(value(head, "x-real-ip"), Some("127.0.0.1"), "{head}");
    assert_eq!(
        value(head, "forwarded"),
        Some("for=127.0.0.1;host=\"api.example.com\";proto=http"),
        "{head}"
    );
    assert_eq!(value(head, "x-specter-environment"), Some("production"));

    // The opt-in lets other underscore names through, never a gateway-owned spelling.
    let up = RawUpstream::start().await;
    let gw = gateway(
        &up,
        "[environments.production.policy]\nallow_underscore_headers = true\n",
    )
    .await;
    assert_eq!(request(&gw, FORGED).await.0, 200);
    let head = &up.heads()[0];
    let underscored: Vec<String> = names(head)
        .into_iter()
        .filter(|n| n.contains('_'))
        .collect();
    assert_eq!(underscored, ["x_tenant"], "{head}");
}

/// Only `websocket` and the protocols an environment lists open a tunnel; `h2c` never
/// does. Refused upgrades reach no upstream.
#[tokio::test]
async fn only_allowed_upgrade_protocols_open_a_tunnel() {
    let up = RawUpstream::start().await;
    let gw = gateway(
        &up,
        "[environments.production.policy]\nupgrades = [\"tcp\"]\n",
    )
    .await;
    let upgrade = |protocol: &str| {
        format!(
            "GET /v1/ws HTTP/1.1\r\nhost: g\r\nconnection: upgrade, http2-settings\r\n\
             upgrade: {protocol}\r\nhttp2-settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
        )
    };
    let (status, answer) = request(&gw, &upgrade("h2c")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("h2c"), "{answer}");
    let (status, answer) = request(&gw, &upgrade("foo")).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("policy.upgrades"), "{answer}");
    assert!(
        up.heads().is_empty(),
        "a refused upgrade reached the upstream"
    );

    for allowed in ["websocket", "tcp"] {
        // The tunnel stays open: read the answer's head only.
        let head = upgrade(allowed).replacen("\r\n", &format!("\r\nx-api-key: {KEY}\r\n"), 1);
        let mut stream = TcpStream::connect(gw.http).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8; 1];
            let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(n, 1, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.push(byte[0]);
        }
        let (status, answer) = status_of(String::from_utf8_lossy(&answer).into_owned());
        assert_eq!(status, 101, "{allowed}: {answer}");
    }
    assert_eq!(up.heads().len(), 2);
}

/// `;parameters` in a segment cannot hide a denied path; ASCII case can only when the
/// environment folds it. The upstream receives the path as sent.
#[tokio::test]
async fn path_parameters_and_case_do_not_hide_denied_paths() {
    let up = RawUpstream::start().await;
    let deny =
        "[environments.production.policy]\ndeny_paths = [\"/v1/admin/\", \"/v1/internal\"]\n";
    let gw = gateway(&up, deny).await;
    for path in [
        "/v1/admin;x/y",
        "/v1/internal;jsessionid=1/secret",
        "/v1;a/admin",
    ] {
        let (status, answer) =
            request(&gw, &format!("GET {path} HTTP/1.1\r\nhost: g\r\n\r\n")).await;
        assert_eq!(status, 403, "{path}: {answer}");
    }
    let (status, _) = request(&gw, "GET /V1/Admin/y HTTP/1.1\r\nhost: g\r\n\r\n").await;
    assert_eq!(status, 200, "paths are case-sensitive by default");
    let (status, _) = request(&gw, "GET /v1/users;v=2/7 HTTP/1.1\r\nhost: g\r\n\r\n").await;
    assert_eq!(status, 200);
    assert!(up.heads()[1].starts_with("GET /v1/users;v=2/7 HTTP/1.1\r\n"));

    let up = RawUpstream::start().await;
    let folding = format!("{deny}case_insensitive_paths = true\n");
    let gw = gateway(&up, &folding).await;
    let (status, _) = request(&gw, "GET /V1/ADMIN;x/y HTTP/1.1\r\nhost: g\r\n\r\n").await;
    assert_eq!(status, 403);
    assert!(up.heads().is_empty());
}

/// RFC 9112 §3.2: one Host, a valid host[:port], equal to an absolute target's
/// authority; anything else is 400 before the key is even looked at.
#[tokio::test]
async fn malformed_host_headers_are_refused() {
    let up = RawUpstream::start().await;
    let gw = gateway(&up, "").await;
    for head in [
        "GET / HTTP/1.1\r\nhost: api.example.com\r\nhost: evil.example.com\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: evil.com@api.example.com\r\n\r\n",
        "GET / HTTP/1.1\r\nhost: api.example.com:99999\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET http://a.example.com/ HTTP/1.1\r\nhost: b.example.com\r\n\r\n",
    ] {
        let (status, answer) = request(&gw, head).await;
        assert_eq!(status, 400, "{head:?}: {answer}");
        assert!(answer.contains("\"bad_request\""), "{answer}");
    }
    assert!(up.heads().is_empty());
}

/// TRACE and CONNECT in any case are refused; a UTF-8 path reaches the upstream byte
/// for byte (also through the normalising slow path); a Content-Length with leading
/// zeros is refused rather than forwarded as sent.
#[tokio::test]
async fn minor_head_forms() {
    let up = RawUpstream::start().await;
    let gw = gateway(&up, "").await;
    for method in ["trace", "Trace", "connect"] {
        let (status, answer) =
            request(&gw, &format!("{method} /v1/x HTTP/1.1\r\nhost: g\r\n\r\n")).await;
        assert_eq!(status, 405, "{method}: {answer}");
    }

    for (sent, forwarded) in [
        (&b"/v1/caf\xc3\xa9/x"[..], &b"/v1/caf\xc3\xa9/x"[..]),
        (b"/v1/caf\xc3\xa9/./x", b"/v1/caf\xc3\xa9/x"),
    ] {
        let mut bytes = b"GET ".to_vec();
        bytes.extend_from_slice(sent);
        bytes.extend_from_slice(
            format!(" HTTP/1.1\r\nhost: g\r\nx-api-key: {KEY}\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        );
        let (status, answer) = status_of(raw(gw.http, &bytes, WAIT).await);
        assert_eq!(status, 200, "{answer}");
        let head = up.raw_heads().pop().unwrap();
        let mut want = b"GET ".to_vec();
        want.extend_from_slice(forwarded);
        want.extend_from_slice(b" HTTP/1.1\r\n");
        assert!(
            head.starts_with(&want),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
    }

    let before = up.heads().len();
    let (status, answer) = request(
        &gw,
        "POST /v1/x HTTP/1.1\r\nhost: g\r\ncontent-length: 005\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(up.heads().len(), before);
}

/// A connection from `from` (any 127.0.0.0/8 address) to the gateway.
async fn connect_from(gw: &TestGateway, from: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(gw.http).await.unwrap()
}

/// One address holding its `max_connections_per_ip` has further connections closed
/// unanswered, while another address is still served under `max_connections`.
///
/// Failing when written: there was no per-address limit, so 4 idle connections from
/// one address under `max_connections = 4` locked every other client out.
#[tokio::test]
async fn one_address_cannot_take_every_connection() {
    let up = RawUpstream::start().await;
    let gw = gateway(
        &up,
        "[limits]\nmax_connections = 4\nmax_connections_per_ip = 2\n",
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(connect_from(&gw, "127.0.0.1").await);
    }
    let mut third = connect_from(&gw, "127.0.0.1").await;
    let _ = third
        .write_all(b"GET /v1/x HTTP/1.1\r\nhost: g\r\n\r\n")
        .await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(WAIT, third.read(&mut buf))
        .await
        .expect("the over-limit connection is closed at once");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    let mut other = connect_from(&gw, "127.0.0.2").await;
    let head =
        format!("GET /v1/x HTTP/1.1\r\nhost: g\r\nx-api-key: {KEY}\r\nconnection: close\r\n\r\n");
    other.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, other.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let (status, answer) = status_of(String::from_utf8_lossy(&answer).into_owned());
    assert_eq!(status, 200, "{answer}");
    drop(held);
}

/// Past its allowance of failed authentications an address gets 429 with
/// `Retry-After`; a valid key from the same address still works.
///
/// Failing when written: wrong keys were answered 401 at any rate.
#[tokio::test]
async fn failed_authentications_are_limited_per_address() {
    let up = RawUpstream::start().await;
    let gw = gateway(
        &up,
        "[limits]\nunauthenticated = { requests = 3, per = \"1m\" }\n",
    )
    .await;
    let c = client();
    let url = gw.url("/v1/x");
    for _ in 0..3 {
        get(
            &c,
            &url,
            &[("x-api-key", "spk_production_guess00000000000000000000")],
        )
        .await
        .assert_error(401, "invalid_api_key");
    }
    let limited = get(&c, &url, &[]).await;
    limited.assert_error(429, "too_many_failed_authentications");
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    let ok = get(&c, &url, &[("x-api-key", KEY)]).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// DNS rebinding: the admin listener answers only its own address, `localhost` and
/// `[listen] admin_hosts`, never an arbitrary name that happens to resolve to it.
///
/// Failing when written: `Host: evil.example` was answered with `/config`.
#[tokio::test]
async fn the_admin_listener_answers_only_its_own_names() {
    let up = RawUpstream::start().await;
    let gw = TestGateway::start(&format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nadmin_hosts = [\"Admin.Internal\"]\n\n\
         [environments.production]\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let admin = gw.admin.unwrap();
    let ask = |host: String| async move {
        let head = format!("GET /config HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
        status_of(raw(admin, head.as_bytes(), WAIT).await)
    };
    for refused in [
        "evil.example".to_owned(),
        format!("evil.example:{}", admin.port()),
        "127.0.0.2".to_owned(),
    ] {
        let (status, answer) = ask(refused.clone()).await;
        assert_eq!(status, 403, "{refused}: {answer}");
        assert!(answer.contains("wrong_host"), "{answer}");
        assert!(!answer.contains("environments"), "{answer}");
    }
    for answered in [
        admin.to_string(),
        "localhost".to_owned(),
        format!("admin.internal:{}", admin.port()),
    ] {
        let (status, answer) = ask(answered.clone()).await;
        assert_eq!(status, 200, "{answered}: {answer}");
    }
}

/// `Content-Length` with `Transfer-Encoding` is refused on every head: after empty
/// lines, and on the second request of a keep-alive connection.
///
/// Failing when written: both were forwarded as chunked (only a connection's first
/// head was scanned, and empty lines ended that scan early).
#[tokio::test]
async fn length_with_chunked_is_refused_on_every_head() {
    let up = RawUpstream::start().await;
    let gw = gateway(&up, "").await;
    let smuggle = format!(
        "POST /v1/x HTTP/1.1\r\nhost: g\r\nx-api-key: {KEY}\r\ncontent-length: 5\r\n\
         transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    let (status, answer) =
        status_of(raw(gw.http, format!("\r\n\r\n{smuggle}").as_bytes(), WAIT).await);
    assert_eq!(status, 400, "{answer}");

    let mut stream = TcpStream::connect(gw.http).await.unwrap();
    let first = format!("GET /v1/x HTTP/1.1\r\nhost: g\r\nx-api-key: {KEY}\r\n\r\n");
    stream.write_all(first.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"ok") {
        let mut chunk = [0u8; 1024];
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    stream.write_all(smuggle.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    let (status, answer) = status_of(String::from_utf8_lossy(&rest).into_owned());
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer.contains("both Content-Length and Transfer-Encoding"),
        "{answer}"
    );
    assert_eq!(
        up.heads().len(),
        1,
        "the smuggled request reached the upstream"
    );
}
