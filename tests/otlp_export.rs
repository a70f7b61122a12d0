//! OTLP/HTTP export against an in-test collector that decodes the protobuf: one span
//! per sampled request with its attributes and parent ids, nothing secret in the bytes,
//! the exporter following reloads, and a dead collector never failing a request.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use tokio::net::TcpListener;

const KEY: &str = "spk_qa_otlpexportotlpexportotlpexport1";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";
const QUERY_SECRET: &str = "querysecretquerysecretquerysecret";

/// An OTLP/HTTP collector: decodes every `POST /v1/traces` and keeps the spans and the
/// raw bodies.
#[derive(Clone, Default)]
struct Collector {
    addr: Option<SocketAddr>,
    spans: Arc<Mutex<Vec<Span>>>,
    bodies: Arc<Mutex<Vec<Bytes>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let collector = Collector {
            addr: Some(listener.local_addr().unwrap()),
            ..Collector::default()
        };
        let c = collector.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req| c.clone().receive(req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        collector
    }

    async fn receive(
        self,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
        assert_eq!(req.method(), "POST");
        assert_eq!(req.uri().path(), "/v1/traces");
        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let decoded =
            ExportTraceServiceRequest::decode(body.as_ref()).expect("valid OTLP protobuf");
        for rs in decoded.resource_spans {
            for ss in rs.scope_spans {
                self.spans.lock().unwrap().extend(ss.spans);
            }
        }
        self.bodies.lock().unwrap().push(body);
        Ok(Response::new(Full::new(Bytes::new())))
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr.unwrap())
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Span> {
        let got = poll_until(Duration::from_secs(10), || {
            let count = self.spans.lock().unwrap().len();
            async move { count >= n }
        })
        .await;
        assert!(
            got,
            "the collector got {} spans, not {n}",
            self.spans().len()
        );
        self.spans()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn attr(span: &Span, key: &str) -> Option<Any> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
}

fn text(span: &Span, key: &str) -> Option<String> {
    match attr(span, key) {
        Some(Any::StringValue(s)) => Some(s),
        other => other.map(|o| panic!("{key} is not a string: {o:?}")),
    }
}

fn config(up: &Upstream, tracing: &str) -> String {
    format!(
        "{tracing}\n{}",
        single_environment("qa", up, "", "exporter-test", KEY)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_requests_become_spans_with_attributes_and_parents() {
    let collector = Collector::start().await;
    let up = Upstream::start("qa").await;
    let tracing = format!("[tracing]\notlp = \"{}\"\n", collector.url());
    let gw = TestGateway::start(&config(&up, &tracing)).await;
    let c = client();
    let url = gw.url(&format!("/v1/items?token={QUERY_SECRET}"));

    // Not sampled: the client said so, or specter started the trace at ratio 0.
    let unsampled = format!("00-{}-{PARENT}-00", "1".repeat(32));
    get(&c, &url, &[("x-api-key", KEY), ("traceparent", &unsampled)]).await;
    get(&c, &url, &[("x-api-key", KEY)]).await;
    // Sampled: a forwarded request and a refused one.
    let sampled = format!("00-{TRACE}-{PARENT}-01");
    let ok = get(&c, &url, &[("x-api-key", KEY), ("traceparent", &sampled)]).await;
    assert_eq!(ok.status, 200);
    let hop = up.requests().pop().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    let refused_tp = format!("00-{}-{PARENT}-01", "2".repeat(32));
    let refused = get(
        &c,
        &url,
        &[("x-api-key", "spk_qa_nope"), ("traceparent", &refused_tp)],
    )
    .await;
    refused.assert_error(401, "invalid_api_key");

    let spans = collector.wait_for(2).await;
    assert_eq!(spans.len(), 2, "only the sampled requests: {spans:#?}");
    let forwarded = &spans[0];
    assert_eq!(hex(&forwarded.trace_id), TRACE);
    assert_eq!(
        hex(&forwarded.parent_span_id),
        PARENT,
        "the client's span is the parent"
    );
    assert_eq!(
        format!("00-{TRACE}-{}-01", hex(&forwarded.span_id)),
        hop,
        "the upstream's parent is the exported span"
    );
    assert_eq!(forwarded.kind, 2, "SERVER");
    assert!(forwarded.end_time_unix_nano >= forwarded.start_time_unix_nano);
    assert!(forwarded.start_time_unix_nano > 0);
    assert_eq!(
        text(forwarded, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(text(forwarded, "url.path").as_deref(), Some("/v1/items"));
    assert_eq!(
        attr(forwarded, "http.response.status_code"),
        Some(Any::IntValue(200))
    );
    assert_eq!(
        text(forwarded, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        text(forwarded, "specter.environment").as_deref(),
        Some("qa")
    );
    assert_eq!(
        text(forwarded, "specter.key_id").as_deref(),
        Some("exporter-test")
    );
    assert_eq!(
        text(forwarded, "specter.upstream"),
        Some(up.addr.to_string())
    );
    assert_eq!(text(forwarded, "specter.error"), None);

    let failed = &spans[1];
    assert_eq!(hex(&failed.trace_id), "2".repeat(32));
    assert_eq!(
        attr(failed, "http.response.status_code"),
        Some(Any::IntValue(401))
    );
    assert_eq!(
        text(failed, "specter.error").as_deref(),
        Some("invalid_api_key")
    );
    assert_eq!(text(failed, "specter.key_id"), None);

    let hash = specter::config::hex(&specter::config::sha256(KEY.as_bytes()));
    for body in collector.bodies.lock().unwrap().iter() {
        for secret in [KEY, "spk_qa_nope", QUERY_SECRET, &hash, "token="] {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} was exported"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_follows_reloads() {
    let (a, b) = (Collector::start().await, Collector::start().await);
    let up = Upstream::start("qa").await;
    let with = |collector: &Collector| {
        format!(
            "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{}",
            config(
                &up,
                &format!(
                    "[tracing]\notlp = \"{}\"\nsample_ratio = 1.0\n",
                    collector.url()
                )
            )
        )
    };
    let gw = TestGateway::start(&with(&a)).await;
    let c = client();
    assert_eq!(
        get(&c, &gw.url("/one"), &[("x-api-key", KEY)]).await.status,
        200
    );
    a.wait_for(1).await;

    let reload = |text: String| {
        let config = specter::config::parse(&text, Path::new("test.toml"))
            .unwrap()
            .config;
        specter::reload::apply(gw.gateway.shared(), config).expect("reload applies");
    };
    reload(with(&b));
    assert_eq!(
        get(&c, &gw.url("/two"), &[("x-api-key", KEY)]).await.status,
        200
    );
    let spans = b.wait_for(1).await;
    assert_eq!(text(&spans[0], "url.path").as_deref(), Some("/two"));
    assert_eq!(a.spans().len(), 1, "the old collector gets nothing new");

    // Export off: nothing more goes anywhere (a marker request after turning it back on
    // arrives alone).
    reload(format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{}",
        config(&up, "[tracing]\nsample_ratio = 1.0\n")
    ));
    assert_eq!(
        get(&c, &gw.url("/three"), &[("x-api-key", KEY)])
            .await
            .status,
        200
    );
    reload(with(&b));
    assert_eq!(
        get(&c, &gw.url("/four"), &[("x-api-key", KEY)])
            .await
            .status,
        200
    );
    let spans = b.wait_for(2).await;
    assert_eq!(spans.len(), 2);
    assert_eq!(text(&spans[1], "url.path").as_deref(), Some("/four"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_never_fails_a_request_and_drops_are_counted() {
    let up = Upstream::start("qa").await;
    let dead = free_addr();
    let tracing = format!("[tracing]\notlp = \"http://{dead}\"\nsample_ratio = 1.0\n");
    let gw = TestGateway::start(&config(&up, &tracing)).await;
    let c = client();
    for _ in 0..20 {
        assert_eq!(
            get(&c, &gw.url("/x"), &[("x-api-key", KEY)]).await.status,
            200
        );
    }
    let metrics = format!("http://{}/metrics", gw.admin.unwrap());
    let counted = poll_until(Duration::from_secs(10), || {
        let c = c.clone();
        let metrics = metrics.clone();
        async move {
            let text = get(&c, &metrics, &[]).await.text();
            value(&text, "specter_trace_spans_dropped_total") == 20.0
                && value(&text, "specter_trace_export_failures_total") >= 1.0
        }
    })
    .await;
    let text = get(&c, &metrics, &[]).await.text();
    assert!(
        counted,
        "{}",
        text.lines()
            .filter(|l| l.contains("trace"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(value(&text, "specter_trace_spans_exported_total"), 0.0);
}

fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the metrics"))
}
