//! The one immutable snapshot a request works on: keys, environments with their policy,
//! limiters and upstream clients, TLS config. Built whole from a validated [`Config`]
//! (taking over what must survive from the previous snapshot), then swapped in with a
//! single `ArcSwap::store`; a request loads it once and keeps it to the end.

use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;

use crate::auth::KeyTable;
use crate::config::{Config, EnvironmentConfig, KeyConfig};
use crate::metrics::Label;
use crate::policy::Policy;
use crate::ratelimit::EnvLimiter;
use crate::tls::{self, TlsError};
use crate::upstream::UpstreamPool;

pub struct Environment {
    pub config: EnvironmentConfig,
    pub label: Label,
    /// `x-specter-environment`, built once.
    pub name_header: HeaderValue,
    pub policy: Policy,
    pub limiter: EnvLimiter,
    pub upstreams: UpstreamPool,
    pub metrics: crate::metrics::RequestMetrics,
    /// Live counters and the per-second ring for the status page; kept across reloads
    /// while the environment remains.
    pub activity: Arc<crate::activity::Activity>,
}

pub struct State {
    pub config: Arc<Config>,
    pub keys: KeyTable,
    pub environments: Vec<Environment>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// The served certificates, for the expiry gauge and the reload log.
    pub certificates: Vec<tls::CertificateInfo>,
    /// `[limits] unauthenticated`: failed authentications per client address.
    pub failed_auth: Option<crate::ratelimit::failures::FailedAuthLimiter>,
    /// Fleet mode: shared rate-limit counters (kept across reloads while unchanged).
    #[cfg(feature = "redis")]
    pub store: Option<Arc<crate::ratelimit::redis::RedisStore>>,
    /// `[tracing] otlp`: the span exporter (kept across reloads while the URL is).
    pub exporter: Option<Arc<crate::trace::export::Exporter>>,
    /// Increases by one with every applied config.
    pub version: u64,
    pub loaded_at: SystemTime,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("environment {environment}: upstream TLS: {source}")]
    UpstreamTls {
        environment: String,
        #[source]
        source: Box<TlsError>,
    },
    #[error("listener TLS: {0}")]
    ServerTls(#[source] Box<TlsError>),
    #[error("rate-limit store: {0}")]
    Store(#[source] crate::body::BoxError),
}

impl State {
    /// Builds a snapshot for `config`. From `previous` it takes over the limiters whose
    /// quota is unchanged and the usage counters of keys that remain.
    ///
    /// The keys move out of the config into the key table: the snapshot's `config` keeps
    /// every setting but no key list, so a million keys are held once, packed.
    pub fn build(
        mut config: Config,
        previous: Option<&State>,
        version: u64,
        metrics: &crate::metrics::Metrics,
    ) -> Result<State, BuildError> {
        let key_lists: Vec<Vec<KeyConfig>> = config
            .environments
            .iter_mut()
            .map(|e| std::mem::take(&mut e.keys))
            .collect();
        let clock = governor::clock::DefaultClock::default();
        let mut environments = Vec::with_capacity(config.environments.len());
        for env in &config.environments {
            let old = previous.and_then(|p| p.environment(&env.name));
            let upstreams = UpstreamPool::new(env).map_err(|source| BuildError::UpstreamTls {
                environment: env.name.clone(),
                source: Box::new(source),
            })?;
            let label = Label(Arc::from(env.name.as_str()));
            environments.push(Environment {
                metrics: metrics.for_environment(label.clone()),
                label,
                name_header: HeaderValue::from_str(&env.name).expect("validated name"),
                policy: Policy::new(env.policy.clone()),
                activity: old.map(|o| o.activity.clone()).unwrap_or_default(),
                limiter: EnvLimiter::carry_over(&env.rate_limit, old.map(|o| &o.limiter), &clock),
                upstreams,
                config: env.clone(),
            });
        }
        let lists = config
            .environments
            .iter()
            .map(|e| e.name.as_str())
            .zip(key_lists)
            .collect();
        let keys = KeyTable::build(lists, previous.map(|p| &p.keys));
        // Built whenever [tls] is there: an HTTPS listener runs from start to exit, even
        // when a reloaded [listen] no longer names it.
        let tls = match &config.tls {
            Some(t) => Some(tls::server_config(t).map_err(|e| BuildError::ServerTls(Box::new(e)))?),
            None => None,
        };
        #[cfg(feature = "redis")]
        let store = crate::ratelimit::redis::carry_over(
            config.rate_limit_store.as_ref(),
            previous.and_then(|p| p.store.as_ref()),
        )
        .map_err(BuildError::Store)?;
        let failed_auth = config.limits.unauthenticated.map(|q| {
            crate::ratelimit::failures::FailedAuthLimiter::carry_over(
                q,
                previous.and_then(|p| p.failed_auth.as_ref()),
            )
        });
        let exporter = config.tracing.otlp.as_ref().and_then(|base| {
            match previous.and_then(|p| p.exporter.as_ref()) {
                Some(kept) if kept.base == *base => Some(kept.clone()),
                _ => crate::trace::export::Exporter::start(base, metrics.trace_export.clone()),
            }
        });
        let certificates: Vec<tls::CertificateInfo> = config
            .tls
            .iter()
            .flat_map(|t| &t.certificates)
            .filter_map(|c| tls::describe(&c.cert_path))
            .collect();
        tls::log_changes(previous.map(|p| &p.certificates[..]), &certificates);
        Ok(State {
            exporter,
            #[cfg(feature = "redis")]
            store,
            failed_auth,
            certificates,
            config: Arc::new(config),
            keys,
            environments,
            tls,
            version,
            loaded_at: SystemTime::now(),
        })
    }

    /// By name, in O(log n): environments keep the config's order, sorted by name.
    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments
            .binary_search_by(|e| e.config.name.as_str().cmp(name))
            .ok()
            .map(|i| &self.environments[i])
    }
}

/// Parsing a large config, and dropping a replaced snapshot, leave freed memory that
/// glibc keeps mapped; hand it back so the resident size reflects what is held. Called
/// once the parse and the old snapshot are gone, not while building.
pub fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// What lives for the whole process: the current snapshot and what must outlive it.
pub struct Shared {
    pub state: arc_swap::ArcSwap<State>,
    pub metrics: crate::metrics::Metrics,
    /// Request metrics of requests no key tied to an environment.
    pub unidentified: crate::metrics::RequestMetrics,
    /// Set on SIGTERM/SIGINT: new requests get 503 `shutting_down`, `/readyz` 503.
    pub draining: std::sync::atomic::AtomicBool,
    /// The last rejected reload, for `/config`; cleared by the next good one.
    pub last_reload_error: std::sync::Mutex<Option<ReloadFailure>>,
    /// The config the process started with: listeners, the connection cap and the
    /// header limits are set from it once, and a reload that changes them is told so.
    pub started: Arc<Config>,
}

impl AsRef<crate::metrics::Metrics> for Shared {
    fn as_ref(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadFailure {
    pub error: String,
    pub at: String,
}

impl Shared {
    /// `state` must have been built with `metrics`.
    pub fn new(metrics: crate::metrics::Metrics, state: State) -> Shared {
        metrics.config_version.set(state.version as i64);
        Shared {
            started: state.config.clone(),
            state: arc_swap::ArcSwap::from_pointee(state),
            unidentified: metrics.for_environment(Label::none()),
            metrics,
            draining: Default::default(),
            last_reload_error: Default::default(),
        }
    }
}
