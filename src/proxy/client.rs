//! An environment's upstreams: one pooled hyper-util client, round-robin selection and
//! passive health.
//!
//! Selection is round-robin over healthy upstreams. Passive health: after
//! `FAILURES_TO_EJECT` consecutive connect failures an upstream is skipped for a back-off
//! (1 s, doubling to 30 s); when it ends, one request probes it. Round-robin rather than
//! least-outstanding: specter's environments front a handful of equal backends, and
//! round-robin keeps the hot path at one atomic increment.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::ServerName;

use crate::body::Body;
use crate::config::{EnvironmentConfig, Upstream};
use crate::tls::{self, TlsError};

pub type HttpClient = Client<HttpsConnector<HttpConnector>, Body>;

const FAILURES_TO_EJECT: u32 = 3;
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug)]
pub struct UpstreamSlot {
    pub upstream: Upstream,
    consecutive_failures: AtomicU32,
    /// Milliseconds since the pool's epoch before which the upstream is skipped.
    down_until_ms: AtomicU64,
}

pub struct UpstreamPool {
    pub client: HttpClient,
    pub slots: Vec<UpstreamSlot>,
    next: AtomicUsize,
    epoch: Instant,
}

impl UpstreamPool {
    pub fn new(env: &EnvironmentConfig) -> Result<UpstreamPool, TlsError> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(env.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let tls_config = tls::client_config(env.upstream_ca.as_deref())?;
        let builder = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config)
            .https_or_http();
        let builder = match &env.upstream_sni {
            Some(sni) => {
                let name = ServerName::try_from(sni.clone()).expect("validated upstream_sni");
                builder.with_server_name_resolver(FixedServerNameResolver::new(name))
            }
            None => builder,
        };
        let connector = if env.http2 {
            builder.enable_http2().wrap_connector(http)
        } else {
            builder.enable_http1().wrap_connector(http)
        };
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .http2_only(env.http2)
            .build(connector);
        let slots = env
            .upstreams
            .iter()
            .map(|u| UpstreamSlot {
                upstream: u.clone(),
                consecutive_failures: AtomicU32::new(0),
                down_until_ms: AtomicU64::new(0),
            })
            .collect();
        Ok(UpstreamPool {
            client,
            slots,
            next: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The next healthy upstream after round-robin, skipping `exclude` (a retry). An
    /// upstream whose back-off just ended is handed to one request as a probe.
    pub fn pick(&self, exclude: Option<usize>) -> Option<usize> {
        let n = self.slots.len();
        let start = if n == 1 {
            0
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        let now = self.now_ms();
        (0..n).map(|i| (start + i) % n).find(|&i| {
            if Some(i) == exclude {
                return false;
            }
            let slot = &self.slots[i];
            let until = slot.down_until_ms.load(Ordering::Relaxed);
            if until == 0 || slot.consecutive_failures.load(Ordering::Relaxed) < FAILURES_TO_EJECT {
                return true;
            }
            // Ejected: let exactly one request through once the back-off ended.
            until <= now
                && slot
                    .down_until_ms
                    .compare_exchange(
                        until,
                        now + backoff(slot).as_millis() as u64,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_ok()
        })
    }

    pub fn record_success(&self, i: usize) {
        let slot = &self.slots[i];
        if slot.consecutive_failures.load(Ordering::Relaxed) != 0 {
            slot.consecutive_failures.store(0, Ordering::Relaxed);
            slot.down_until_ms.store(0, Ordering::Relaxed);
        }
    }

    /// Returns true when this failure ejected the upstream.
    pub fn record_connect_failure(&self, i: usize) -> bool {
        let slot = &self.slots[i];
        let failures = slot.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures >= FAILURES_TO_EJECT {
            let until = self.now_ms() + backoff(slot).as_millis() as u64;
            slot.down_until_ms.store(until, Ordering::Relaxed);
            return failures == FAILURES_TO_EJECT;
        }
        false
    }

    pub fn is_healthy(&self, i: usize) -> bool {
        self.slots[i].consecutive_failures.load(Ordering::Relaxed) < FAILURES_TO_EJECT
    }
}

fn backoff(slot: &UpstreamSlot) -> Duration {
    let over = slot
        .consecutive_failures
        .load(Ordering::Relaxed)
        .saturating_sub(FAILURES_TO_EJECT)
        .min(5);
    (MIN_BACKOFF * 2u32.pow(over)).min(MAX_BACKOFF)
}
