//! W3C trace context through a real gateway: a valid `traceparent` is continued with a
//! new span, a missing or malformed one starts a trace, the sampled flag and
//! `[tracing] sample_ratio` decide sampling, and the trace id appears in error bodies
//! and in the access log of the real binary.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use serde_json::Value;

const KEY: &str = "spk_qa_tracecontexttracecontexttrace1";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

fn traceparent(flags: &str) -> String {
    format!("00-{TRACE}-{PARENT}-{flags}")
}

/// The upstream's view of the last request's `traceparent`: (trace id, parent id, flags).
fn received(up: &Upstream) -> (String, String, String) {
    let last = up.requests().pop().expect("the upstream got a request");
    let values: Vec<_> = last.headers.get_all("traceparent").iter().collect();
    assert_eq!(values.len(), 1, "exactly one traceparent upstream");
    let v = values[0].to_str().unwrap().to_owned();
    let parts: Vec<&str> = v.split('-').collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert_eq!(parts[0], "00", "{v}");
    let lower_hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    assert!(lower_hex(parts[1], 32) && parts[1] != "0".repeat(32), "{v}");
    assert!(lower_hex(parts[2], 16) && parts[2] != "0".repeat(16), "{v}");
    assert!(parts[3] == "00" || parts[3] == "01", "{v}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

async fn gateway(up: &Upstream, tracing: &str) -> TestGateway {
    let env = single_environment("qa", up, "", "tracer", KEY);
    TestGateway::start(&format!("{tracing}\n{env}")).await
}

#[tokio::test]
async fn a_valid_traceparent_keeps_its_trace_with_a_new_span_and_its_tracestate() {
    let up = Upstream::start("qa").await;
    let gw = gateway(&up, "").await;
    let c = client();
    let tp = traceparent("01");
    let a = get(
        &c,
        &gw.url("/x"),
        &[
            ("x-api-key", KEY),
            ("traceparent", &tp),
            ("tracestate", "vendor=abc"),
        ],
    )
    .await;
    assert_eq!(a.status, 200);
    let (trace, span, flags) = received(&up);
    assert_eq!(trace, TRACE);
    assert_ne!(span, PARENT, "the gateway's hop has its own span id");
    assert_eq!(flags, "01");
    let last = up.requests().pop().unwrap();
    assert_eq!(last.headers["tracestate"], "vendor=abc");

    // Unsampled stays unsampled even at ratio 1 (the flag is honoured).
    let gw1 = gateway(&up, "[tracing]\nsample_ratio = 1.0\n").await;
    let tp = traceparent("00");
    let a = get(
        &c,
        &gw1.url("/x"),
        &[("x-api-key", KEY), ("traceparent", &tp)],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(received(&up).2, "00");
}

#[tokio::test]
async fn without_a_traceparent_a_new_trace_starts_sampled_by_the_ratio() {
    let up = Upstream::start("qa").await;
    let c = client();
    let mut seen = Vec::new();
    for (tracing, flags) in [("", "00"), ("[tracing]\nsample_ratio = 1.0\n", "01")] {
        let gw = gateway(&up, tracing).await;
        for _ in 0..3 {
            let a = get(&c, &gw.url("/x"), &[("x-api-key", KEY)]).await;
            assert_eq!(a.status, 200);
            let (trace, _, got) = received(&up);
            assert_eq!(got, flags, "with {tracing:?}");
            seen.push(trace);
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 6, "every started trace has its own id");
}

#[tokio::test]
async fn malformed_trace_headers_never_fail_a_request() {
    let up = Upstream::start("qa").await;
    let gw = gateway(&up, "").await;
    let c = client();
    let upper = format!("00-{}-{PARENT}-01", TRACE.to_uppercase());
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("too short", vec![format!("00-{TRACE}-{PARENT}-1")]),
        ("too long", vec![format!("00-{TRACE}-{PARENT}-011")]),
        ("upper-case hex", vec![upper]),
        (
            "zero trace id",
            vec![format!("00-{}-{PARENT}-01", "0".repeat(32))],
        ),
        (
            "zero parent id",
            vec![format!("00-{TRACE}-{}-01", "0".repeat(16))],
        ),
        ("version ff", vec![format!("ff-{TRACE}-{PARENT}-01")]),
        ("garbage", vec!["hello".into()]),
        ("two headers", vec![traceparent("01"), traceparent("01")]),
    ];
    for (what, values) in cases {
        let mut headers = vec![("x-api-key", KEY), ("tracestate", "vendor=abc")];
        headers.extend(values.iter().map(|v| ("traceparent", v.as_str())));
        let a = get(&c, &gw.url("/x"), &headers).await;
        assert_eq!(a.status, 200, "{what}: {}", a.text());
        let (trace, _, _) = received(&up);
        assert_ne!(trace, TRACE, "{what}: a new trace starts");
        let last = up.requests().pop().unwrap();
        assert!(
            last.headers.get("tracestate").is_none(),
            "{what}: a tracestate without its trace is dropped"
        );
    }
}

#[tokio::test]
async fn error_bodies_carry_the_trace_id() {
    let up = Upstream::start("qa").await;
    let gw = gateway(&up, "").await;
    let c = client();
    let tp = traceparent("01");
    let a = get(
        &c,
        &gw.url("/x"),
        &[("x-api-key", "spk_qa_wrong"), ("traceparent", &tp)],
    )
    .await;
    a.assert_error(401, "invalid_api_key");
    assert_eq!(a.json()["trace_id"], TRACE);

    // A keyless malformed request (400, before any key check) has one too.
    let a = get(&c, &gw.url("/a%2fb"), &[]).await;
    a.assert_error(400, "bad_path");
    let id = a.json()["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 32);
    assert_ne!(id, "0".repeat(32));
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn the_access_log_carries_the_trace_id() {
    let up = Upstream::start("qa").await;
    let dir = tempfile::tempdir().unwrap();
    let env = single_environment("qa", &up, "", "tracer", KEY);
    let p = SpecterProcess::start(&dir.path().join("specter.toml"), |http, admin| {
        format!("[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n{env}")
    })
    .await;
    let c = client();
    let tp = traceparent("01");
    let a = get(
        &c,
        &p.url("/logged"),
        &[("x-api-key", KEY), ("traceparent", &tp)],
    )
    .await;
    assert_eq!(a.status, 200);
    let request_id = a.headers["x-request-id"].to_str().unwrap().to_owned();
    let logged = poll_until(Duration::from_secs(5), || {
        let found = p.log_text().contains(&request_id);
        async move { found }
    })
    .await;
    assert!(logged, "no access line:\n{}", p.log_text());
    let line: Value = p
        .log_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["target"] == "specter::access" && l["request_id"] == request_id.as_str())
        .expect("the access line parses");
    assert_eq!(line["trace_id"], TRACE, "{line}");
}

#[test]
fn tracing_settings_are_validated_with_their_location() {
    let base = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n{}\n",
        key_block("qa", "k", KEY).replace(
            "[[environments.qa.keys]]",
            "[environments.qa]\nupstream = \"http://127.0.0.1:9\"\n[[environments.qa.keys]]"
        )
    );
    // The setting sits on the line after `[tracing]`.
    let line = base.lines().count() + 2;
    let bad = [
        (
            "[tracing]\nsample_ratio = 1.5\n",
            "tracing.sample_ratio: \"1.5\"",
        ),
        (
            "[tracing]\nsample_ratio = \"half\"\n",
            "tracing.sample_ratio",
        ),
        (
            "[tracing]\notlp = \"https://collector:4318\"\n",
            "tracing.otlp: \"https://collector:4318\"",
        ),
        ("[tracing]\notlp = \"not a url\"\n", "tracing.otlp"),
        ("[tracing]\nsampling = 1\n", "unknown field"),
    ];
    for (section, expected) in bad {
        let text = format!("{base}{section}");
        let err = specter::config::parse(&text, Path::new("specter.toml"))
            .err()
            .unwrap_or_else(|| panic!("accepted: {section}"))
            .to_string();
        assert!(err.contains(expected), "{err}");
        assert!(err.starts_with(&format!("specter.toml:{line}:")), "{err}");
    }
    let good = format!("{base}[tracing]\nsample_ratio = 1\notlp = \"http://127.0.0.1:4318\"\n");
    let loaded = specter::config::parse(&good, Path::new("specter.toml")).unwrap();
    assert_eq!(loaded.config.tracing.sample_ratio, 1.0);
}
