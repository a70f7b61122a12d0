//! Log hygiene under hostile input, against the real binary: what any client can do
//! over and over (TLS handshakes with an IP address as server name, malformed requests,
//! requests to a dead upstream) is counted on `/metrics`, and leaves at most a handful
//! of lines besides the access log; the first real failure is still logged at once.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use futures_util::future::join_all;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const T: Duration = Duration::from_secs(10);
const KEY: &str = "spk_production_loghygiene0000000000000000";
/// Each kind of hostile traffic is sent this many times.
const N: usize = 1000;
/// Connections in flight at once while sending it.
const PARALLEL: usize = 16;

struct Running {
    _child: Child,
    http: SocketAddr,
    https: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

impl Running {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `specter run` with an http, an https and an admin listener, JSON logs on stderr
/// into `dir/specter.log`, and `RUST_LOG` as given (unset for `None`).
async fn start(dir: &Path, environments: &str, rust_log: Option<&str>) -> Running {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, cert_key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&cert_key, key.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\n{environments}",
        cert.display(),
        cert_key.display()
    );
    on_free_ports(|http, admin| try_start(dir, &tls, rust_log, http, admin)).await
}

async fn try_start(
    dir: &Path,
    body: &str,
    rust_log: Option<&str>,
    http: SocketAddr,
    admin: SocketAddr,
) -> Result<Running, String> {
    let https = free_addr();
    let config = dir.join("specter.toml");
    std::fs::write(
        &config,
        format!("[listen]\nhttp = \"{http}\"\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n{body}"),
    )
    .unwrap();
    let log = dir.join("specter.log");
    let child = spawn_json_logged(&config, &log, rust_log, admin, T).await?;
    Ok(Running {
        _child: child,
        http,
        https,
        admin,
        log,
    })
}

/// An address nothing listens on: bound, then released.
fn dead_upstream() -> String {
    format!("http://{}", free_addr())
}

fn environment(upstream: &str) -> String {
    format!(
        "[environments.production]\nupstream = \"{upstream}\"\n{}",
        key_block("production", "billing-service", KEY)
    )
}

fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn is_access(line: &Value) -> bool {
    line["target"] == "specter::access"
}

// ---------------------------------------------------------------------------------
// A ClientHello with an IP address as server name, as OpenSSL (wrk, curl
// --resolve-less scripts) sends it. rustls clients refuse to, so it is built by hand.

fn u16be(out: &mut Vec<u8>, v: usize) {
    out.extend_from_slice(&u16::try_from(v).unwrap().to_be_bytes());
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    u16be(out, data.len());
    out.extend_from_slice(data);
}

/// One TLS 1.2 ClientHello record offering ECDHE-ECDSA-AES128-GCM-SHA256 with `sni`
/// in its server_name extension.
fn client_hello(sni: &str) -> Vec<u8> {
    client_hello_with(0x0303, &[0xc02b], sni)
}

/// A ClientHello record offering at most `version` (no supported_versions extension)
/// and `suites`.
fn client_hello_with(version: u16, suites: &[u16], sni: &str) -> Vec<u8> {
    let mut name = Vec::new();
    u16be(&mut name, sni.len() + 3);
    name.push(0); // host_name
    u16be(&mut name, sni.len());
    name.extend_from_slice(sni.as_bytes());
    let mut ext = Vec::new();
    extension(&mut ext, 0x0000, &name);
    extension(&mut ext, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // x25519, secp256r1
    extension(&mut ext, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
    extension(&mut ext, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa/rsa-pss sha256

    let mut body = version.to_be_bytes().to_vec();
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11))); // random
    body.push(0); // no session id
    u16be(&mut body, suites.len() * 2);
    body.extend(suites.iter().flat_map(|s| s.to_be_bytes()));
    body.extend_from_slice(&[1, 0]); // null compression
    u16be(&mut body, ext.len());
    body.extend(ext);

    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend(body);
    let mut record = vec![0x16, 0x03, 0x01];
    u16be(&mut record, handshake.len());
    record.extend(handshake);
    record
}

/// Sends the hello, ends the stream (so the server's handshake fails with `eof`, not
/// with a reset: no race between our close and its reply), and returns the reply.
async fn hello_then_eof(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(hello).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut reply))
        .await
        .expect("the server closes within the time limit")
        .expect("a clean close");
    reply
}

/// Runs `make(i)` for `i` in `0..n`, `PARALLEL` at a time.
async fn in_parallel<F, Fut>(n: usize, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for start in (0..n).step_by(PARALLEL) {
        join_all((start..n.min(start + PARALLEL)).map(&make)).await;
    }
}

// ---------------------------------------------------------------------------------
// Metrics

async fn metrics(admin: SocketAddr) -> String {
    get(&client(), &format!("http://{admin}/metrics"), &[])
        .await
        .text()
}

/// The value of one series, e.g. `x_total{a="b"}`; 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// The sum over the series of `name` whose labels start with `labels`.
fn sum(text: &str, name: &str, labels: &str) -> f64 {
    let prefix = format!("{name}{{{labels}");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_traffic_is_counted_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), &environment(&dead_upstream()), None).await;
    let started_at = gw.log().len();
    let c = client();
    let to_dead = |c: TestClient| async move {
        let answer = get(
            &c,
            &format!("http://{}/v1/x", gw.http),
            &[("x-api-key", KEY)],
        )
        .await;
        assert!(answer.status.is_server_error(), "{}", answer.text());
    };

    // The first upstream failure is logged at once, with its cause.
    to_dead(c.clone()).await;
    let mut first = None;
    let found = poll_until(Duration::from_secs(2), || {
        first = json_lines(&gw.log()[started_at..])
            .into_iter()
            .find(|l| l["message"] == "gateway answered with an error");
        std::future::ready(first.is_some())
    })
    .await;
    assert!(found, "no warning for the first failure:\n{}", gw.log());
    let first = first.unwrap();
    assert_eq!(first["level"], "WARN", "{first}");
    let cause = first["cause"].as_str().unwrap_or_default().to_lowercase();
    assert!(cause.contains("connection refused"), "{first}");

    // Then hostile traffic, N of each kind.
    in_parallel(N - 1, |_| to_dead(c.clone())).await;
    let hello = client_hello("127.0.0.1");
    in_parallel(N, |_| async {
        let reply = hello_then_eof(gw.https, &hello).await;
        assert_eq!(reply.get(..1), Some(&[0x16][..]), "a ServerHello");
    })
    .await;
    // Half refused by hyper's parser (a space in a header name), half by specter's
    // framing check (bare LF line endings).
    in_parallel(N, |i| async move {
        let request: &[u8] = if i % 2 == 0 {
            b"GET /v1/x HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n"
        } else {
            b"GET /v1/x HTTP/1.1\nHost: a\n\n"
        };
        let reply = raw(gw.http, request, T).await;
        assert!(reply.starts_with("HTTP/1.1 400 "), "{reply:?}");
    })
    .await;

    // The counters match the traffic. hyper's own refusals are counted when their
    // connection task ends, which can be just after the client saw the close.
    let admin = gw.admin;
    poll_until(T, || async move {
        let m = metrics(admin).await;
        sample(
            &m,
            "specter_requests_total{environment=\"none\",status=\"400\"}",
        ) >= N as f64
    })
    .await;
    let m = metrics(gw.admin).await;
    let reason = |r: &str| {
        sample(
            &m,
            &format!("specter_tls_handshake_errors_total{{reason=\"{r}\"}}"),
        )
    };
    assert_eq!(reason("eof"), N as f64, "{m}");
    assert_eq!(
        sum(&m, "specter_tls_handshake_errors_total", ""),
        N as f64,
        "no other reason: {m}"
    );
    assert_eq!(
        sample(
            &m,
            "specter_requests_total{environment=\"none\",status=\"400\"}"
        ),
        N as f64,
        "{m}"
    );
    let answered_5xx: f64 = (500..600)
        .map(|s| {
            sample(
                &m,
                &format!("specter_requests_total{{environment=\"production\",status=\"{s}\"}}"),
            )
        })
        .sum();
    assert_eq!(answered_5xx, N as f64, "{m}");

    // The log: every request the handler saw in the access log (the dead upstream's and
    // the framing refusals; hyper's own refusals never reach it), and a handful of
    // other lines at most. Waiting for the access lines also waits for the writer.
    let expected_access = N + N / 2;
    let mut lines = Vec::new();
    let complete = poll_until(T, || {
        lines = json_lines(&gw.log()[started_at..]);
        std::future::ready(lines.iter().filter(|l| is_access(l)).count() >= expected_access)
    })
    .await;
    assert!(complete, "access lines missing");
    let others: Vec<&Value> = lines.iter().filter(|l| !is_access(l)).collect();
    let shown = || others.iter().map(|l| format!("{l}\n")).collect::<String>();
    assert!(
        others.len() <= 10,
        "{} lines besides the access log:\n{}",
        others.len(),
        shown()
    );
    for line in &others {
        let target = line["target"].as_str().unwrap_or_default();
        assert!(
            target.starts_with("specter"),
            "a library's line:\n{}",
            shown()
        );
    }
}

/// `RUST_LOG` still shows library records when it names the library or asks for
/// `debug` overall; a bare `info` (a usual production setting) keeps them quiet.
#[tokio::test]
async fn rust_log_still_shows_library_records_when_asked() {
    for (filter, shown) in [("info,rustls=warn", true), ("debug", true), ("info", false)] {
        let dir = tempfile::tempdir().unwrap();
        let gw = start(dir.path(), &environment(&dead_upstream()), Some(filter)).await;
        hello_then_eof(gw.https, &client_hello("127.0.0.1")).await;
        let rustls_line = || {
            json_lines(&gw.log()).iter().any(|l| {
                l["target"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("rustls"))
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("IP address"))
            })
        };
        if shown {
            let seen = poll_until(T, || std::future::ready(rustls_line())).await;
            assert!(
                seen,
                "RUST_LOG={filter} shows rustls's warning:\n{}",
                gw.log()
            );
        } else {
            // The access log is the witness that the log has caught up: a request
            // made after the handshake has its line.
            let c = client();
            get(&c, &format!("http://{}/v1/x", gw.http), &[]).await;
            let caught_up = poll_until(T, || {
                std::future::ready(json_lines(&gw.log()).iter().any(is_access))
            })
            .await;
            assert!(caught_up, "no access line:\n{}", gw.log());
            assert!(!rustls_line(), "RUST_LOG={filter}:\n{}", gw.log());
        }
    }
}

/// hyper answers some heads itself, before specter's handler runs; they are counted
/// like the handler's answers, by status.
#[tokio::test]
async fn heads_refused_by_the_parser_are_counted_by_status() {
    let up = Upstream::start("production").await;
    let gw = TestGateway::start(&format!(
        "[limits]\nmax_header_bytes = \"128KiB\"\n\n{}",
        environment(&up.url())
    ))
    .await;
    let many_headers: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
    let refusals = [
        (
            "GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n".to_owned(),
            "400",
        ),
        (
            format!("GET / HTTP/1.1\r\nHost: a\r\n{many_headers}\r\n"),
            "431",
        ),
        (
            format!(
                "GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
                "v".repeat(140_000)
            ),
            "431",
        ),
        (
            format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "p".repeat(70_000)),
            "414",
        ),
    ];
    for (request, status) in &refusals {
        let reply = raw(gw.http, request.as_bytes(), T).await;
        assert!(
            reply.starts_with(&format!("HTTP/1.1 {status} ")),
            "{status}: {}",
            &reply[..reply.len().min(40)]
        );
    }
    let m = metrics(gw.admin.unwrap()).await;
    let count = |s: &str| {
        sample(
            &m,
            &format!("specter_requests_total{{environment=\"none\",status=\"{s}\"}}"),
        )
    };
    assert_eq!(
        (count("400"), count("431"), count("414")),
        (1.0, 2.0, 1.0),
        "{m}"
    );
    assert_eq!(up.count(), 0);
}

/// Each way a handshake can fail lands in its own `reason`, taken from what rustls
/// (or the socket) reported.
#[tokio::test]
async fn handshake_failures_are_counted_by_reason() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, cert_key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, key.cert.pem()).unwrap();
    std::fs::write(&cert_key, key.signing_key.serialize_pem()).unwrap();
    let up = Upstream::start("production").await;
    let gw = TestGateway::start(&format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [limits]\nheader_read_timeout = \"1s\"\n\n\
         [tls]\n[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\n{}",
        cert.display(),
        cert_key.display(),
        environment(&up.url())
    ))
    .await;
    let https = gw.gateway.https_addr().unwrap();
    let fatal_alert = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28]; // handshake_failure
    let with_alert = [client_hello("localhost"), fatal_alert.to_vec()].concat();
    let cases: [(&[u8], &str); 5] = [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", "invalid_message"),
        (
            &client_hello_with(0x0301, &[0xc02b], "localhost"),
            "protocol_version",
        ),
        (
            &client_hello_with(0x0303, &[0x002f, 0x0035], "localhost"),
            "no_shared_cipher",
        ),
        (b"", "eof"),
        (&with_alert, "alert_received"),
    ];
    for (bytes, _) in &cases {
        hello_then_eof(https, bytes).await;
    }
    // Silent after the connect: the handshake times out after header_read_timeout.
    let mut silent = TcpStream::connect(https).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(T, silent.read_to_end(&mut rest))
        .await
        .expect("closed after header_read_timeout")
        .unwrap();

    let m = metrics(gw.admin.unwrap()).await;
    let reason = |r: &str| {
        sample(
            &m,
            &format!("specter_tls_handshake_errors_total{{reason=\"{r}\"}}"),
        )
    };
    for (_, expected) in &cases {
        assert_eq!(reason(expected), 1.0, "{expected}: {m}");
    }
    assert_eq!(reason("timeout"), 1.0, "{m}");
    assert_eq!(
        sum(&m, "specter_tls_handshake_errors_total", ""),
        6.0,
        "{m}"
    );
    assert_eq!(up.count(), 0);
}

/// Occurrences no later line reported are summarised by themselves once the interval
/// passed: the first lines plus the summaries' counts account for every failure.
#[tokio::test]
async fn suppressed_failures_are_summarised_with_their_count() {
    const SENT: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let gw = start(dir.path(), &environment(&dead_upstream()), None).await;
    let c = client();
    for _ in 0..SENT {
        let answer = get(
            &c,
            &format!("http://{}/v1/x", gw.http),
            &[("x-api-key", KEY)],
        )
        .await;
        assert!(answer.status.is_server_error(), "{}", answer.text());
    }
    let accounted = || {
        let (mut lines, mut more) = (0, 0);
        for line in json_lines(&gw.log()) {
            let message = line["message"].as_str().unwrap_or_default();
            let Some(rest) = message.strip_prefix("gateway answered with an error") else {
                continue;
            };
            match rest.strip_prefix(" (") {
                Some(summary) => {
                    let (count, tail) = summary.split_once(" more in the last ").unwrap();
                    assert!(tail.ends_with("s)"), "{message}");
                    more += count.replace(',', "").parse::<usize>().unwrap();
                }
                None => lines += 1,
            }
        }
        (lines, more)
    };
    let mut seen = (0, 0);
    let complete = poll_until(Duration::from_secs(15), || {
        seen = accounted();
        std::future::ready(seen.0 + seen.1 == SENT)
    })
    .await;
    assert!(complete, "{seen:?} of {SENT} accounted for:\n{}", gw.log());
    assert!(seen.1 > 0, "some were summarised: {seen:?}");
}
