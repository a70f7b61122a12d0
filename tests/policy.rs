//! An environment's policy and rate limits, end to end: a real gateway between real
//! clients (hyper, or raw TCP for what hyper will not send) and recording upstreams.
//! Every case checks both sides: what the client was told, and what the upstream
//! received (or that it received nothing).

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use common::{client, get, key_block, raw, send, Answer, TestClient, TestGateway, Upstream};

/// Raw TCP exchanges end when the gateway closes the connection (`Connection: close`);
/// this only bounds a gateway that never answers.
const RAW_TIMEOUT: Duration = Duration::from_secs(10);

/// Status and body of an answer, for failure messages.
fn describe(a: &Answer) -> String {
    format!("{} {}", a.status.as_u16(), a.text())
}

/// The gateway's JSON `error` code, if the answer is a well-formed gateway error.
fn error_code(a: &Answer) -> Option<String> {
    let json_type = a
        .headers
        .get("content-type")
        .is_some_and(|v| v == "application/json");
    let json: serde_json::Value = serde_json::from_slice(&a.body).ok()?;
    let code = json["error"].as_str()?.to_owned();
    json_type.then_some(code)
}

/// Parses an HTTP/1.1 response read off a raw socket (`Content-Length` bodies only,
/// which is what the gateway's own errors are).
fn parse_response(text: &str) -> Option<Answer> {
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()?
        .split(' ')
        .nth(1)?
        .parse::<StatusCode>()
        .ok()?;
    let mut headers = HeaderMap::new();
    for line in lines {
        let (name, value) = line.split_once(':')?;
        headers.append(
            HeaderName::from_bytes(name.trim().as_bytes()).ok()?,
            HeaderValue::from_str(value.trim()).ok()?,
        );
    }
    Some(Answer {
        status,
        headers,
        body: Bytes::from(body.to_owned()),
    })
}

/// Sends a hand-written request on a fresh connection and parses the answer.
async fn raw_answer(addr: SocketAddr, request: &str) -> Answer {
    let text = raw(addr, request.as_bytes(), RAW_TIMEOUT).await;
    parse_response(&text)
        .unwrap_or_else(|| panic!("no HTTP response to {request:?}; read {text:?}"))
}

fn raw_request(method: &str, target: &str, key: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
    )
}

// --- 1. paths ------------------------------------------------------------------------

const PATH_KEY: &str = "spk_paths_Q7mC2xLr9TfWbN4kHs8Vd1pZyJ3";

#[derive(Clone, Copy, Debug)]
enum Expect {
    /// 200, and the upstream received exactly this path and query.
    Forwarded(&'static str),
    /// 403 `forbidden_path`, nothing upstream.
    ForbiddenPath,
    /// 400 `bad_path`, nothing upstream.
    BadPath,
}

use Expect::{BadPath, ForbiddenPath, Forwarded};

/// `allow_paths = ["/v1/"]`, `deny_paths = ["/v1/internal/"]`.
const PATH_CASES: &[(&str, Expect)] = &[
    ("/v1/x", Forwarded("/v1/x")),
    ("/v1", Forwarded("/v1")),
    ("/v1/", Forwarded("/v1/")),
    ("/v10", ForbiddenPath),
    ("/v1x/y", ForbiddenPath),
    ("/", ForbiddenPath),
    ("/admin", ForbiddenPath),
    // dot segments, literal and encoded
    ("/v1/../admin", ForbiddenPath),
    ("/v1/%2e%2e/admin", ForbiddenPath),
    ("/v1/%2E%2E/admin", ForbiddenPath),
    ("/v1/.%2e/admin", ForbiddenPath),
    ("/v1/%2E%2E/v1/x", Forwarded("/v1/x")),
    ("/v1/./x", Forwarded("/v1/x")),
    ("/v1/%2e/x", Forwarded("/v1/x")),
    ("/v1/x/..", Forwarded("/v1/")),
    ("/v1/.", Forwarded("/v1/")),
    ("/v1/%2E%2E", ForbiddenPath),
    ("/..", ForbiddenPath),
    ("/../v1/x", Forwarded("/v1/x")),
    ("/v1/internal/../x", Forwarded("/v1/x")),
    // empty segments
    ("//admin", ForbiddenPath),
    ("//v1/x", Forwarded("/v1/x")),
    ("/v1//x", Forwarded("/v1/x")),
    // encoded unreserved characters are decoded, others kept (upper-case hex)
    ("/%61dmin", ForbiddenPath),
    ("/%76%31/x", Forwarded("/v1/x")),
    ("/v1/%7e", Forwarded("/v1/~")),
    ("/v1/%41-%5f", Forwarded("/v1/A-_")),
    ("/v1/a%20b", Forwarded("/v1/a%20b")),
    ("/v1/a%c3%a9", Forwarded("/v1/a%C3%A9")),
    // deny wins over allow, after normalisation, on whole segments, case-sensitive
    ("/v1/internal/x", ForbiddenPath),
    ("/v1/internal", ForbiddenPath),
    ("/v1/internal/", ForbiddenPath),
    ("/v1/internalx", Forwarded("/v1/internalx")),
    ("/v1/INTERNAL/x", Forwarded("/v1/INTERNAL/x")),
    ("/v1/./internal/x", ForbiddenPath),
    ("/v1//internal/x", ForbiddenPath),
    ("/v1/%69nternal/x", ForbiddenPath),
    ("/v1/%69%6E%74%65%72%6E%61%6C/x", ForbiddenPath),
    ("/v1/a/b/../../internal/z", ForbiddenPath),
    ("/v1/x/../internal/z", ForbiddenPath),
    // ambiguous forms are refused outright
    ("/admin%00", BadPath),
    ("/v1/x%00", BadPath),
    ("/v1/x%2Fy", BadPath),
    ("/v1/x%2fy", BadPath),
    ("/v1/a%5Cb", BadPath),
    ("/v1/a%5cb", BadPath),
    ("/v1/a\\b", BadPath),
    ("/v1/..;/admin", BadPath),
    ("/v1/.;/x", BadPath),
    ("/v1/..;x=1/admin", BadPath),
    ("/v1/%zz", BadPath),
    ("/v1/%4", BadPath),
    ("/v1/%", BadPath),
    // the query is never normalised or checked
    ("/v1/x?q=%2F", Forwarded("/v1/x?q=%2F")),
    (
        "/v1/x?next=/../admin&q=%00",
        Forwarded("/v1/x?next=/../admin&q=%00"),
    ),
    ("/v1/./x?a=%2e%2e", Forwarded("/v1/x?a=%2e%2e")),
    ("/admin?/v1/", ForbiddenPath),
    // absolute-form: its path is the path
    ("http://127.0.0.1/v1/%2e/x?a=1", Forwarded("/v1/x?a=1")),
    ("http://127.0.0.1/v1/../admin", ForbiddenPath),
    ("http://127.0.0.1/v1/x%2Fy", BadPath),
];

/// How a path case is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// hyper's client, when `http::Uri` keeps the target byte for byte (else raw TCP).
    Hyper,
    /// A hand-written HTTP/1.1 request over raw TCP, whatever the target.
    Raw,
}

/// GET `target` with the key, sent `via` hyper or raw TCP.
async fn get_target(client: &TestClient, addr: SocketAddr, target: &str, via: Via) -> Answer {
    let url = format!("http://{addr}{target}");
    let exact = url
        .parse::<http::Uri>()
        .ok()
        .is_some_and(|u| u.path_and_query().map(|p| p.as_str()) == Some(target));
    if via == Via::Hyper && exact {
        get(client, &url, &[("x-api-key", PATH_KEY)]).await
    } else {
        raw_answer(addr, &raw_request("GET", target, PATH_KEY)).await
    }
}

fn check_path_case(
    target: &str,
    expect: Expect,
    answer: &Answer,
    upstream_saw: &[common::Recorded],
) -> Result<(), String> {
    let (status, code) = match expect {
        Forwarded(want) => {
            return match upstream_saw {
                [one] if answer.status == StatusCode::OK && one.target == want => Ok(()),
                _ => Err(format!(
                    "{target:?}: want 200 and upstream target {want:?}; got {} and upstream saw {:?}",
                    describe(answer),
                    upstream_saw.iter().map(|r| &r.target).collect::<Vec<_>>()
                )),
            };
        }
        ForbiddenPath => (403, "forbidden_path"),
        BadPath => (400, "bad_path"),
    };
    if answer.status.as_u16() == status
        && error_code(answer).as_deref() == Some(code)
        && upstream_saw.is_empty()
    {
        Ok(())
    } else {
        Err(format!(
            "{target:?}: want {status} {code} and nothing upstream; got {} and upstream saw {:?}",
            describe(answer),
            upstream_saw.iter().map(|r| &r.target).collect::<Vec<_>>()
        ))
    }
}

#[tokio::test]
async fn paths_are_checked_in_the_normal_form_the_upstream_receives() {
    assert!(PATH_CASES.len() >= 30);
    let upstream = Upstream::start("paths").await;
    let gw = TestGateway::start(&format!(
        "[environments.paths]\nupstream = \"{}\"\n\n\
         [environments.paths.policy]\nallow_paths = [\"/v1/\"]\ndeny_paths = [\"/v1/internal/\"]\n\n{}",
        upstream.url(),
        key_block("paths", "paths-client", PATH_KEY),
    ))
    .await;
    let client = client();
    let mut failures = Vec::new();
    for via in [Via::Hyper, Via::Raw] {
        for &(target, expect) in PATH_CASES {
            let before = upstream.count();
            let answer = get_target(&client, gw.http, target, via).await;
            let saw = upstream.requests().split_off(before);
            if let Err(e) = check_path_case(target, expect, &answer, &saw) {
                failures.push(format!("{via:?} {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} path cases failed:\n{}",
        failures.len(),
        2 * PATH_CASES.len(),
        failures.join("\n")
    );
}

// --- 2. client addresses -------------------------------------------------------------

const GUARDED_KEY: &str = "spk_guarded_Hc5Wq2Lx8RmT1vKd7Pz3NbYf6";
const OPEN_KEY: &str = "spk_open_Zr4Tn8Bq1WcX6mKy3Jd9LsHv2";

/// `guarded` allows only `allow_ips`; `open` allows any address.
fn ip_config(listen: &str, allow_ips: &str, guarded: &Upstream, open: &Upstream) -> String {
    format!(
        "[listen]\n{listen}\n\n\
         [environments.guarded]\nupstream = \"{}\"\n\n\
         [environments.guarded.policy]\nallow_ips = {allow_ips}\n\n{}\n\
         [environments.open]\nupstream = \"{}\"\n\n{}",
        guarded.url(),
        key_block("guarded", "guarded-client", GUARDED_KEY),
        open.url(),
        key_block("open", "open-client", OPEN_KEY),
    )
}

const V4_LISTEN: &str = "http = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"";
const GUARDED_IPS: &str = "[\"10.0.0.0/8\", \"::1/128\"]";

#[tokio::test]
async fn forwarded_for_from_an_untrusted_peer_changes_nothing() {
    let (guarded, open) = (
        Upstream::start("guarded").await,
        Upstream::start("open").await,
    );
    let gw = TestGateway::start(&ip_config(V4_LISTEN, GUARDED_IPS, &guarded, &open)).await;
    let client = client();

    get(&client, &gw.url("/x"), &[("x-api-key", GUARDED_KEY)])
        .await
        .assert_error(403, "forbidden_ip");
    for forged in ["10.1.2.3", "8.8.8.8, 10.1.2.3", "::1"] {
        get(
            &client,
            &gw.url("/x"),
            &[("x-api-key", GUARDED_KEY), ("x-forwarded-for", forged)],
        )
        .await
        .assert_error(403, "forbidden_ip");
    }
    assert_eq!(guarded.count(), 0, "a refused request reached the upstream");

    let ok = get(
        &client,
        &gw.url("/x"),
        &[("x-api-key", OPEN_KEY), ("x-forwarded-for", "10.1.2.3")],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    let seen = open.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].headers["x-forwarded-for"], "127.0.0.1",
        "a forged X-Forwarded-For from an untrusted peer must be replaced, not extended"
    );
}

#[tokio::test]
async fn forwarded_for_from_a_trusted_proxy_names_the_client() {
    let (guarded, open) = (
        Upstream::start("guarded").await,
        Upstream::start("open").await,
    );
    let listen = format!("{V4_LISTEN}\ntrusted_proxies = [\"127.0.0.1/32\"]");
    let gw = TestGateway::start(&ip_config(&listen, GUARDED_IPS, &guarded, &open)).await;
    let client = client();
    let with_xff = |xff: &'static str| [("x-api-key", GUARDED_KEY), ("x-forwarded-for", xff)];

    let ok = get(&client, &gw.url("/x"), &with_xff("10.1.2.3")).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    let ok = get(&client, &gw.url("/y"), &with_xff("8.8.8.8, 10.1.2.3")).await;
    assert_eq!(
        ok.status,
        StatusCode::OK,
        "the right-most untrusted entry is the client: {}",
        describe(&ok)
    );

    // The right-most entry not written by a trusted proxy decides; what the client
    // wrote to its left does not.
    for refused in ["10.9.9.9, 8.8.8.8", "not-an-address", "10.1.2.3, garbage"] {
        let answer = get(&client, &gw.url("/z"), &with_xff(refused)).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "XFF {refused:?}");
        answer.assert_error(403, "forbidden_ip");
    }
    get(&client, &gw.url("/z"), &[("x-api-key", GUARDED_KEY)])
        .await
        .assert_error(403, "forbidden_ip");

    let seen = guarded.requests();
    let targets: Vec<&str> = seen.iter().map(|r| r.target.as_str()).collect();
    assert_eq!(
        targets,
        ["/x", "/y"],
        "refused requests reached the upstream"
    );
    let xff: Vec<&HeaderValue> = seen.iter().map(|r| &r.headers["x-forwarded-for"]).collect();
    assert_eq!(
        xff,
        ["10.1.2.3, 127.0.0.1", "8.8.8.8, 10.1.2.3, 127.0.0.1"],
        "a trusted proxy's X-Forwarded-For is extended with the address the gateway saw"
    );
}

#[tokio::test]
async fn allow_ips_over_ipv6() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("skipped: cannot bind [::1] on this machine");
        return;
    }
    let listen = "http = \"[::1]:0\"";
    for (allow_ips, allowed) in [("[\"::1/128\"]", true), ("[\"127.0.0.1/32\"]", false)] {
        let (guarded, open) = (
            Upstream::start("guarded").await,
            Upstream::start("open").await,
        );
        let gw = TestGateway::start(&ip_config(listen, allow_ips, &guarded, &open)).await;
        assert!(gw.http.is_ipv6());
        let answer = get(&client(), &gw.url("/v6"), &[("x-api-key", GUARDED_KEY)]).await;
        if allowed {
            assert_eq!(answer.status, StatusCode::OK, "{}", describe(&answer));
            let seen = guarded.requests();
            assert_eq!(seen.len(), 1);
            assert_eq!(seen[0].headers["x-forwarded-for"], "::1");
        } else {
            answer.assert_error(403, "forbidden_ip");
            assert_eq!(guarded.count(), 0);
        }
    }
}

// --- 3. methods ----------------------------------------------------------------------

const GET_ONLY_KEY: &str = "spk_readonly_Mx3Kq8Wz1Nd5Rt7Yb2Lc9Hv4";
const ANY_METHOD_KEY: &str = "spk_anymethod_Pq6Dn2Xs9Fw4Jk1Tm8Rz3Bv";

#[tokio::test]
async fn methods_outside_the_list_and_connect_and_trace_are_refused() {
    let (readonly, any) = (
        Upstream::start("readonly").await,
        Upstream::start("any").await,
    );
    let gw = TestGateway::start(&format!(
        "[environments.readonly]\nupstream = \"{}\"\n\n\
         [environments.readonly.policy]\nmethods = [\"GET\"]\n\n{}\n\
         [environments.any]\nupstream = \"{}\"\n\n{}",
        readonly.url(),
        key_block("readonly", "reader", GET_ONLY_KEY),
        any.url(),
        key_block("any", "anything", ANY_METHOD_KEY),
    ))
    .await;
    let client = client();
    let request = |method: Method, key: &str| {
        Request::builder()
            .method(method)
            .uri(gw.url("/v1/x"))
            .header("x-api-key", key)
            .body(Full::new(Bytes::from_static(b"payload")))
            .unwrap()
    };

    for method in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
        let answer = send(&client, request(method.clone(), GET_ONLY_KEY)).await;
        answer.assert_error(405, "method_not_allowed");
        assert_eq!(answer.headers["allow"], "GET", "{method}");
    }
    for key in [GET_ONLY_KEY, ANY_METHOD_KEY] {
        let answer = send(&client, request(Method::TRACE, key)).await;
        answer.assert_error(405, "method_not_allowed");
        assert!(answer.headers.contains_key("allow"));
        let answer = raw_answer(
            gw.http,
            &format!(
                "CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\nx-api-key: {key}\r\nConnection: close\r\n\r\n"
            ),
        )
        .await;
        answer.assert_error(405, "method_not_allowed");
        assert!(answer.headers.contains_key("allow"));
    }
    assert_eq!(readonly.count(), 0, "a refused method reached the upstream");
    assert_eq!(any.count(), 0, "TRACE or CONNECT reached the upstream");

    let ok = send(&client, request(Method::GET, GET_ONLY_KEY)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    let ok = send(&client, request(Method::POST, ANY_METHOD_KEY)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    assert_eq!(readonly.requests()[0].method, "GET");
    assert_eq!(any.requests()[0].method, "POST");
}

// --- 4. body size --------------------------------------------------------------------

const BODY_KEY: &str = "spk_small_Vb7Nc2Kx5Qw9Lm1Zt4Hd8Rp3Jy6";
const LIMIT: usize = 1024;

type StreamClient = Client<HttpConnector, specter::body::Body>;

/// A chunked body (no length declared) sent as `chunks` frames of `size` bytes.
fn chunked(chunks: usize, size: usize) -> specter::body::Body {
    let frames = (0..chunks)
        .map(move |_| Ok::<_, specter::body::BoxError>(Frame::data(Bytes::from(vec![b'a'; size]))));
    StreamBody::new(futures_util::stream::iter(frames)).boxed()
}

async fn post_stream(client: &StreamClient, url: &str, body: specter::body::Body) -> Answer {
    let req = Request::post(url)
        .header("x-api-key", BODY_KEY)
        .body(body)
        .unwrap();
    let response = client.request(req).await.expect("gateway answers");
    let (parts, body) = response.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.expect("body").to_bytes(),
    }
}

async fn body_gateway(upstream: &Upstream) -> TestGateway {
    TestGateway::start(&format!(
        "[environments.small]\nupstream = \"{}\"\n\n\
         [environments.small.policy]\nmax_body = \"1KiB\"\n\n{}",
        upstream.url(),
        key_block("small", "uploader", BODY_KEY),
    ))
    .await
}

#[tokio::test]
async fn declared_body_over_max_body_is_refused_before_forwarding() {
    let upstream = Upstream::start("small").await;
    let gw = body_gateway(&upstream).await;
    let client = client();
    let post = |len: usize| {
        Request::post(gw.url("/upload"))
            .header("x-api-key", BODY_KEY)
            .body(Full::new(Bytes::from(vec![b'a'; len])))
            .unwrap()
    };

    send(&client, post(2048))
        .await
        .assert_error(413, "body_too_large");
    send(&client, post(LIMIT + 1))
        .await
        .assert_error(413, "body_too_large");
    assert_eq!(
        upstream.count(),
        0,
        "an oversized body reached the upstream"
    );

    let ok = send(&client, post(LIMIT)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, LIMIT as u64);
    assert_eq!(seen[0].headers["content-length"], "1024");
}

#[tokio::test]
async fn streamed_body_over_max_body_is_cut_off() {
    let upstream = Upstream::start("small").await;
    let gw = body_gateway(&upstream).await;
    let client: StreamClient = Client::builder(TokioExecutor::new()).build_http();
    let url = gw.url("/upload");

    // Exactly the limit, streamed with no declared length, passes whole.
    let ok = post_stream(&client, &url, chunked(4, LIMIT / 4)).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", describe(&ok));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body_len, LIMIT as u64);
    assert!(!seen[0].headers.contains_key("content-length"));

    // One byte more, in the last frame.
    post_stream(&client, &url, chunked(1, LIMIT + 1))
        .await
        .assert_error(413, "body_too_large");
    // Growing past the limit over several frames.
    post_stream(&client, &url, chunked(6, 256))
        .await
        .assert_error(413, "body_too_large");
    // Hand-written chunked encoding: 1 KiB, then one byte more.
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\nx-api-key: {BODY_KEY}\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         400\r\n{}\r\n1\r\nb\r\n0\r\n\r\n",
        "a".repeat(LIMIT)
    );
    raw_answer(gw.http, &request)
        .await
        .assert_error(413, "body_too_large");

    // The upstream may have seen the start of a cut-off request, but never more than
    // the limit and never a complete oversized one (the recording upstream records
    // a request whose body broke off too, with the bytes it got).
    for r in upstream.requests().iter().skip(1) {
        assert!(
            r.body_len <= LIMIT as u64,
            "the upstream received {} body bytes past a {LIMIT}-byte limit",
            r.body_len
        );
    }
}

// --- 5. header rules -----------------------------------------------------------------

const HEADERS_KEY: &str = "spk_tenant_Kd4Wn9Qx2Lr7Bt5Mz1Hc8Vp3Jy6";

/// Headers the upstream received, one entry per request.
type SeenHeaders = Arc<Mutex<Vec<HeaderMap>>>;

/// An upstream that records request headers and answers with a secret header (which
/// the recording upstream of the harness never sends).
async fn secret_upstream() -> (SocketAddr, SeenHeaders) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: SeenHeaders = Arc::default();
    let rec = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let rec = rec.clone();
            let service = service_fn(move |req: Request<Incoming>| {
                rec.lock().unwrap().push(req.headers().clone());
                let response = Response::builder()
                    .header("x-upstream-secret", "s3cret")
                    .header("x-upstream-public", "yes")
                    .header("strict-transport-security", "max-age=999")
                    .body(Full::new(Bytes::from_static(b"secret")))
                    .unwrap();
                async move { Ok::<_, Infallible>(response) }
            });
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn header_rules_apply_on_both_sides() {
    let (addr, seen) = secret_upstream().await;
    let gw = TestGateway::start(&format!(
        "[environments.tenant]\nupstream = \"http://{addr}\"\n\n\
         [environments.tenant.policy]\n\
         request_headers = {{ set = {{ \"x-tenant\" = \"acme\" }}, remove = [\"cookie\"] }}\n\
         response_headers = {{ set = {{ \"strict-transport-security\" = \"max-age=1\" }}, remove = [\"x-upstream-secret\"] }}\n\n{}",
        key_block("tenant", "tenant-client", HEADERS_KEY),
    ))
    .await;

    let mut req = Request::get(gw.url("/v1/x"));
    for (name, value) in [
        ("x-api-key", HEADERS_KEY),
        ("cookie", "session=abc"),
        ("cookie", "other=def"),
        ("x-tenant", "evil"),
        ("x-other", "kept"),
    ] {
        req = req.header(name, value);
    }
    let answer = send(&client(), req.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", describe(&answer));
    assert_eq!(answer.text(), "secret");
    let hsts: Vec<_> = answer
        .headers
        .get_all("strict-transport-security")
        .iter()
        .collect();
    assert_eq!(hsts, ["max-age=1"], "set replaces the upstream's value");
    assert!(!answer.headers.contains_key("x-upstream-secret"));
    assert_eq!(answer.headers["x-upstream-public"], "yes");

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    let headers = &seen[0];
    assert!(!headers.contains_key("cookie"), "{headers:?}");
    let tenant: Vec<_> = headers.get_all("x-tenant").iter().collect();
    assert_eq!(tenant, ["acme"], "set replaces the client's value");
    assert_eq!(headers["x-other"], "kept");
    assert!(!headers.contains_key("x-api-key"));
}

// --- 6. rate limits ------------------------------------------------------------------

const KEY_A: &str = "spk_limited_Aq3Wz8Nx1Kd6Rt9Lm2Hc5Vb7Jp4";
const KEY_B: &str = "spk_limited_Bn5Tx2Qw7Lc9Kr1Zm4Hd8Vf3Jy6";

fn limited_config(env: &str, upstream: &Upstream, limits: &str) -> String {
    format!(
        "[environments.{env}]\nupstream = \"{}\"\n\n\
         [environments.{env}.rate_limit]\n{limits}\n\n{}\n{}",
        upstream.url(),
        key_block(env, "client-a", KEY_A),
        key_block(env, "client-b", KEY_B),
    )
}

fn header<'a>(a: &'a Answer, name: &str) -> &'a str {
    a.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header on {}", describe(a)))
        .to_str()
        .unwrap()
}

/// Checks a 429: scope in `RateLimit`, `Retry-After` whole seconds ≥ 1 agreeing with `t`.
fn assert_limited(a: &Answer, scope: &str, policy: &str) {
    a.assert_error(429, "rate_limited");
    assert_eq!(header(a, "ratelimit-policy"), policy);
    let retry_after: u64 = header(a, "retry-after")
        .parse()
        .expect("Retry-After in whole seconds");
    assert!(retry_after >= 1, "Retry-After {retry_after}");
    assert_eq!(
        header(a, "ratelimit"),
        format!("\"{scope}\";r=0;t={retry_after}")
    );
}

#[tokio::test]
async fn per_key_limit_admits_the_burst_then_429() {
    let upstream = Upstream::start("limited").await;
    let gw = TestGateway::start(&limited_config(
        "limited",
        &upstream,
        "per_key = { requests = 1, per = \"10s\", burst = 5 }",
    ))
    .await;
    let client = client();
    let policy = "\"per_key\";q=5;w=50";

    for i in 0..5u64 {
        let ok = get(&client, &gw.url("/v1/x"), &[("x-api-key", KEY_A)]).await;
        assert_eq!(ok.status, StatusCode::OK, "request {i}: {}", describe(&ok));
        assert_eq!(header(&ok, "ratelimit-policy"), policy);
        assert_eq!(
            header(&ok, "ratelimit"),
            format!("\"per_key\";r={};t={}", 4 - i, 10 * (i + 1))
        );
    }
    let refused = get(&client, &gw.url("/v1/x"), &[("x-api-key", KEY_A)]).await;
    assert_limited(&refused, "per_key", policy);
    let retry_after: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(
        retry_after <= 10,
        "Retry-After {retry_after} for a 10 s refill"
    );

    let other = get(&client, &gw.url("/v1/x"), &[("x-api-key", KEY_B)]).await;
    assert_eq!(other.status, StatusCode::OK, "B has its own bucket");
    assert_eq!(header(&other, "ratelimit"), "\"per_key\";r=4;t=10");
    assert_eq!(upstream.count(), 6, "the upstream sees exactly the 200s");
}

async fn metrics(admin: SocketAddr) -> String {
    let answer = get(&client(), &format!("http://{admin}/metrics"), &[]).await;
    assert_eq!(answer.status, StatusCode::OK);
    answer.text()
}

#[tokio::test]
async fn keys_share_the_environment_total() {
    let upstream = Upstream::start("shared").await;
    let gw = TestGateway::start(&limited_config(
        "shared",
        &upstream,
        "per_key = { requests = 1, per = \"10s\", burst = 5 }\n\
         total = { requests = 1, per = \"60s\", burst = 7 }",
    ))
    .await;
    let client = client();
    let policy = "\"per_key\";q=5;w=50, \"total\";q=7;w=420";
    let url = gw.url("/v1/x");
    let call = |key: &'static str| {
        let (client, url) = (client.clone(), url.clone());
        async move { get(&client, &url, &[("x-api-key", key)]).await }
    };

    for (i, key) in [KEY_A, KEY_A, KEY_A, KEY_A, KEY_A, KEY_B, KEY_B]
        .into_iter()
        .enumerate()
    {
        let ok = call(key).await;
        assert_eq!(ok.status, StatusCode::OK, "request {i}: {}", describe(&ok));
        assert_eq!(header(&ok, "ratelimit-policy"), policy);
        let state = header(&ok, "ratelimit");
        assert!(
            state.starts_with("\"per_key\";r=")
                && state.contains(&format!("\"total\";r={}", 6 - i)),
            "request {i}: RateLimit {state}"
        );
    }
    // B has per-key room left, but the environment's total is spent.
    assert_limited(&call(KEY_B).await, "total", policy);
    // A's own bucket is empty: refused per key first.
    assert_limited(&call(KEY_A).await, "per_key", policy);
    assert_eq!(upstream.count(), 7, "the upstream sees exactly the 200s");

    let text = metrics(gw.admin.expect("admin listener")).await;
    for want in [
        "specter_rate_limited_total{environment=\"shared\",scope=\"total\"} 1",
        "specter_rate_limited_total{environment=\"shared\",scope=\"per_key\"} 1",
    ] {
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in /metrics:\n{text}"
        );
    }
}
