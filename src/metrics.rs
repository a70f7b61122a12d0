//! Prometheus metrics. Labelled by environment, never by key id (cardinality, and ids
//! are the operator's business); never a key or a hash.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label value shared by reference count, so labelling a request allocates nothing.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
pub struct Label(pub Arc<str>);

impl Label {
    pub fn none() -> Label {
        Label(Arc::from("none"))
    }
}

impl EncodeLabelValue for Label {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        EncodeLabelValue::encode(&self.0.as_ref(), encoder)
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub environment: Label,
    pub status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EnvLabels {
    pub environment: Label,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub environment: Label,
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub environment: Label,
    pub scope: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TaskLabels {
    pub task: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub environment: Label,
    pub upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    pub certificate: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// Proxy latencies: 100 µs to 30 s.
const BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

fn duration_histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// One environment's request metrics, resolved once per snapshot so the hot path
/// touches no label map: a histogram handle and a counter per status, made on first use.
pub struct RequestMetrics {
    label: Label,
    duration: Histogram,
    by_status: Box<[std::sync::OnceLock<Counter>]>,
}

impl RequestMetrics {
    pub fn observe(&self, metrics: &Metrics, status: u16, seconds: f64) {
        self.duration.observe(seconds);
        match self.by_status.get(usize::from(status)) {
            Some(slot) => slot.get_or_init(|| self.counter(metrics, status)).inc(),
            None => self.counter(metrics, status).inc(),
        };
    }

    /// Counts an answer that had no handler behind it (hyper refused the request head
    /// itself), so no duration is observed.
    pub fn count(&self, metrics: &Metrics, status: u16) {
        self.counter(metrics, status).inc();
    }

    fn counter(&self, metrics: &Metrics, status: u16) -> Counter {
        let labels = RequestLabels {
            environment: self.label.clone(),
            status,
        };
        metrics.requests.get_or_create(&labels).clone()
    }
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<EnvLabels, Histogram, fn() -> Histogram>,
    pub upstream_errors: Family<KindLabels, Counter>,
    pub rate_limited: Family<ScopeLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    pub active_connections: Family<ListenerLabels, Gauge>,
    pub config_version: Gauge,
    pub tls_handshake_errors: Family<ReasonLabels, Counter>,
    pub upstream_healthy: Family<UpstreamLabels, Gauge>,
    pub rate_limit_store_errors: Counter,
    pub tls_certificate_expiry: Family<CertificateLabels, Gauge>,
    pub panics: Family<TaskLabels, Counter>,
    pub connections_over_ip_limit: Counter,
    /// OTLP span export: exported, dropped (queue full or batch failed), failed batches.
    pub trace_export: crate::trace::export::ExportCounters,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "specter_requests",
            "Requests answered, by environment and status",
            requests.clone(),
        );
        let duration = Family::<EnvLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register(
            "specter_request_duration_seconds",
            "Time from request to response headers, by environment",
            duration.clone(),
        );
        let upstream_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "specter_upstream_errors",
            "Failures towards upstreams, by kind (connect, timeout, protocol)",
            upstream_errors.clone(),
        );
        let rate_limited = Family::<ScopeLabels, Counter>::default();
        registry.register(
            "specter_rate_limited",
            "Requests refused by a rate limit, by scope (per_key, total)",
            rate_limited.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        // Series exist from the start, so `increase()` sees the first failure.
        for result in ["success", "failure"] {
            let _ = reloads.get_or_create(&ResultLabels { result });
        }
        registry.register(
            "specter_config_reloads",
            "Config reload attempts, by result (success, failure)",
            reloads.clone(),
        );
        let active_connections = Family::<ListenerLabels, Gauge>::default();
        registry.register(
            "specter_active_connections",
            "Open client connections, by listener",
            active_connections.clone(),
        );
        let config_version = Gauge::default();
        registry.register(
            "specter_config_version",
            "Version counter of the config in force",
            config_version.clone(),
        );
        let tls_handshake_errors = Family::<ReasonLabels, Counter>::default();
        for &reason in crate::tls::HANDSHAKE_ERROR_REASONS {
            let _ = tls_handshake_errors.get_or_create(&ReasonLabels { reason });
        }
        registry.register(
            "specter_tls_handshake_errors",
            "TLS handshakes that failed, by reason (a closed set: see README, Logging)",
            tls_handshake_errors.clone(),
        );
        let upstream_healthy = Family::<UpstreamLabels, Gauge>::default();
        registry.register(
            "specter_upstream_healthy",
            "1 while an upstream is considered healthy (passive checks), else 0",
            upstream_healthy.clone(),
        );
        let rate_limit_store_errors = Counter::default();
        registry.register(
            "specter_rate_limit_store_errors",
            "Rate-limit store checks that failed or timed out",
            rate_limit_store_errors.clone(),
        );
        let tls_certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "specter_tls_certificate_expiry_seconds",
            "When each served certificate expires, in seconds since the Unix epoch, by file",
            tls_certificate_expiry.clone(),
        );
        let panics = Family::<TaskLabels, Counter>::default();
        registry.register(
            "specter_panics",
            "Panics caught in a request, connection, stream or reload task (each one is a bug)",
            panics.clone(),
        );
        let connections_over_ip_limit = Counter::default();
        registry.register(
            "specter_connections_over_ip_limit",
            "Connections closed at accept because their address held max_connections_per_ip",
            connections_over_ip_limit.clone(),
        );
        let trace_export = crate::trace::export::ExportCounters::default();
        registry.register(
            "specter_trace_spans_exported",
            "Spans the OTLP collector accepted",
            trace_export.exported.clone(),
        );
        registry.register(
            "specter_trace_spans_dropped",
            "Sampled spans not exported: the export queue was full or their batch failed",
            trace_export.dropped.clone(),
        );
        registry.register(
            "specter_trace_export_failures",
            "OTLP export requests that failed (unreachable, timed out or refused)",
            trace_export.failed_batches.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("specter_build_info", "Build information", build);
        Metrics {
            registry,
            requests,
            duration,
            upstream_errors,
            rate_limited,
            reloads,
            active_connections,
            config_version,
            tls_handshake_errors,
            upstream_healthy,
            rate_limit_store_errors,
            tls_certificate_expiry,
            panics,
            connections_over_ip_limit,
            trace_export,
        }
    }

    /// Request metrics of one environment (`Label::none()` for requests without one).
    pub fn for_environment(&self, label: Label) -> RequestMetrics {
        let duration = self
            .duration
            .get_or_create(&EnvLabels {
                environment: label.clone(),
            })
            .clone();
        RequestMetrics {
            label,
            duration,
            by_status: (0..600).map(|_| std::sync::OnceLock::new()).collect(),
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
