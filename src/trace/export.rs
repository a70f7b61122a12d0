//! OTLP/HTTP protobuf export of one span per sampled request (`[tracing] otlp`).
//!
//! Why not the OpenTelemetry SDK's `BatchSpanProcessor` + `opentelemetry-otlp`: its
//! queue drops spans silently (no count we could expose), every span goes through the
//! SDK's dynamic attribute maps, and its HTTP client choices pull in reqwest. Here the
//! request path only builds a small [`SpanRecord`] (for sampled requests, and only with
//! export on) and `try_send`s it into a bounded queue: a full queue drops the span and
//! counts it in `specter_trace_spans_dropped_total`, so export can never slow or fail a
//! request. One task per exporter drains the queue in batches (up to [`BATCH`] spans or
//! [`FLUSH_EVERY`]), encodes them with the `opentelemetry-proto` messages (prost), and
//! POSTs them with the hyper client to `<otlp>/v1/traces`, one batch at a time.
//!
//! The exporter lives in the config snapshot: a reload that keeps the URL keeps it; a new
//! URL starts a new one, and the old one's task flushes what it holds and ends once the
//! old snapshot is dropped (its queue closes).
//!
//! Never exported: keys, key hashes, the query string, `tracestate`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;

use super::TraceContext;

/// Spans waiting for export; beyond this they are dropped (and counted). About 300 bytes
/// each: under 1 MiB held at most.
pub const QUEUE: usize = 2048;
/// Spans per export request, at most.
pub const BATCH: usize = 512;
/// A batch goes out at the latest this long after its first span.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// One export request's deadline.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// What one request's span says, captured when its response head is ready.
pub struct SpanRecord {
    pub trace: TraceContext,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: Method,
    /// The normalised path; its query is never exported.
    pub target: Option<PathAndQuery>,
    pub status: u16,
    pub server_address: Option<String>,
    pub environment: Option<Arc<str>>,
    pub key_id: Option<crate::auth::KeyId>,
    pub upstream: Option<std::sync::Arc<str>>,
    pub error: Option<&'static str>,
}

/// The export counters, shared with the metrics registry.
#[derive(Clone, Default)]
pub struct ExportCounters {
    pub exported: Counter,
    pub dropped: Counter,
    pub failed_batches: Counter,
}

pub struct Exporter {
    /// The configured collector base URL, to tell whether a reload changed it.
    pub base: Uri,
    queue: mpsc::Sender<SpanRecord>,
    counters: ExportCounters,
}

impl Exporter {
    /// Starts the batch task on the current tokio runtime; `None` outside one.
    pub fn start(base: &Uri, counters: ExportCounters) -> Option<Arc<Exporter>> {
        Exporter::with_capacity(base, counters, QUEUE)
    }

    pub fn with_capacity(
        base: &Uri,
        counters: ExportCounters,
        capacity: usize,
    ) -> Option<Arc<Exporter>> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        let (queue, rx) = mpsc::channel(capacity);
        runtime.spawn(run(traces_endpoint(base), rx, counters.clone()));
        Some(Arc::new(Exporter {
            base: base.clone(),
            queue,
            counters,
        }))
    }

    /// Never waits: a full queue drops the span and counts it.
    pub fn submit(&self, span: SpanRecord) {
        if self.queue.try_send(span).is_err() {
            self.counters.dropped.inc();
        }
    }
}

/// `<base>/v1/traces`, as the OTLP/HTTP specification names the path.
fn traces_endpoint(base: &Uri) -> Uri {
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    parts.path_and_query = PathAndQuery::try_from(format!("{prefix}/v1/traces")).ok();
    Uri::from_parts(parts).unwrap_or_else(|_| base.clone())
}

async fn run(endpoint: Uri, mut rx: mpsc::Receiver<SpanRecord>, counters: ExportCounters) {
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + FLUSH_EVERY;
        let mut open = true;
        while batch.len() < BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) => {
                    open = false;
                    break;
                }
                Err(_) => break,
            }
        }
        let body = encode(&batch);
        let sent = send(&client, &endpoint, body).await;
        match sent {
            Ok(()) => {
                counters.exported.inc_by(batch.len() as u64);
            }
            Err(why) => {
                counters.failed_batches.inc();
                counters.dropped.inc_by(batch.len() as u64);
                static FAILED: crate::logthrottle::Throttle =
                    crate::logthrottle::Throttle::new("OTLP export failed; spans dropped");
                if let Some(more) = FAILED.check(&[]) {
                    tracing::warn!(collector = %endpoint, error = why, spans = batch.len(), "OTLP export failed; spans dropped{more}");
                }
            }
        }
        batch.clear();
        if !open {
            return;
        }
    }
}

async fn send(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    endpoint: &Uri,
    body: Bytes,
) -> Result<(), &'static str> {
    let request = Request::post(endpoint.clone())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(body))
        .map_err(|_| "request could not be built")?;
    match tokio::time::timeout(SEND_TIMEOUT, client.request(request)).await {
        Err(_) => Err("timed out"),
        Ok(Err(_)) => Err("collector unreachable"),
        Ok(Ok(response)) if response.status().is_success() => Ok(()),
        Ok(Ok(_)) => Err("collector refused the batch"),
    }
}

/// One `ExportTraceServiceRequest` holding `spans`, protobuf-encoded.
pub fn encode(spans: &[SpanRecord]) -> Bytes {
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![text("service.name", "specter")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "specter".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: spans.iter().map(span).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    Bytes::from(request.encode_to_vec())
}

fn span(r: &SpanRecord) -> Span {
    let mut attributes = vec![
        text("http.request.method", r.method.as_str()),
        KeyValue {
            key: "http.response.status_code".into(),
            value: Some(AnyValue {
                value: Some(any_value::Value::IntValue(i64::from(r.status))),
            }),
            ..Default::default()
        },
    ];
    let optional = [
        ("url.path", r.target.as_ref().map(|t| t.path())),
        ("server.address", r.server_address.as_deref()),
        ("specter.environment", r.environment.as_deref()),
        ("specter.key_id", r.key_id.as_ref().map(|k| k.as_str())),
        ("specter.upstream", r.upstream.as_deref()),
        ("specter.error", r.error),
    ];
    attributes.extend(
        optional
            .into_iter()
            .filter_map(|(key, value)| value.map(|v| text(key, v))),
    );
    let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, crate::clock::nanos);
    Span {
        trace_id: r.trace.trace_id.to_vec(),
        span_id: r.trace.span_id.to_vec(),
        parent_span_id: r.trace.parent_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags: 0x01,
        name: r.method.as_str().to_owned(),
        kind: span::SpanKind::Server as i32,
        start_time_unix_nano: nanos(r.start),
        end_time_unix_nano: nanos(r.end),
        attributes,
        status: (r.status >= 500).then(|| Status {
            message: r.error.unwrap_or_default().to_owned(),
            code: status::StatusCode::Error as i32,
        }),
        ..Default::default()
    }
}

fn text(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_owned())),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SpanRecord {
        let trace = TraceContext::from_headers(&http::HeaderMap::new(), 1.0);
        SpanRecord {
            trace,
            start: UNIX_EPOCH + Duration::from_secs(10),
            end: UNIX_EPOCH + Duration::from_secs(11),
            method: Method::GET,
            target: Some(PathAndQuery::from_static("/v1/x?token=secret")),
            status: 502,
            server_address: Some("api.test".into()),
            environment: Some(Arc::from("qa")),
            key_id: None,
            upstream: None,
            error: Some("upstream_unavailable"),
        }
    }

    #[test]
    fn the_query_string_is_never_encoded() {
        let bytes = encode(&[record()]);
        let decoded = ExportTraceServiceRequest::decode(bytes.as_ref()).unwrap();
        let span = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert!(!bytes.windows(6).any(|w| w == b"secret"));
        let path = span
            .attributes
            .iter()
            .find(|a| a.key == "url.path")
            .unwrap();
        assert_eq!(
            path.value.as_ref().unwrap().value,
            Some(any_value::Value::StringValue("/v1/x".into()))
        );
        assert_eq!(
            span.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        assert!(
            span.parent_span_id.is_empty(),
            "a started trace has no parent"
        );
    }

    #[test]
    fn the_endpoint_appends_the_traces_path() {
        let e = |s: &str| traces_endpoint(&s.parse().unwrap()).to_string();
        assert_eq!(
            e("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(e("http://c:4318/otlp/"), "http://c:4318/otlp/v1/traces");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_without_waiting() {
        // A collector that accepts connections and never answers holds the batch task.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base: Uri = format!("http://{}", listener.local_addr().unwrap())
            .parse()
            .unwrap();
        let (connected, mut in_flight) = mpsc::channel(1);
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
                let _ = connected.try_send(());
            }
        });
        let counters = ExportCounters::default();
        let exporter = Exporter::with_capacity(&base, counters.clone(), 4).unwrap();
        for _ in 0..4 {
            exporter.submit(record());
        }
        // The first batch has left the queue and hangs at the collector...
        in_flight.recv().await.unwrap();
        let started = std::time::Instant::now();
        for _ in 0..100 {
            exporter.submit(record());
        }
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "submit never waits"
        );
        // ...so 4 of the next 100 fit and 96 are dropped.
        assert_eq!(counters.dropped.get(), 96);
        assert_eq!(counters.exported.get(), 0);
    }
}
