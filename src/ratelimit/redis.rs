//! Fleet mode: rate-limit counters in Redis, so limits hold across gateway instances.
//!
//! One atomic server-side script per request checks the key's bucket and the
//! environment's bucket in a single round trip, with the same GCRA arithmetic as
//! governor (interval `t = per / requests`, tolerance `tau = t * (burst - 1)`) and
//! Redis `TIME` as the clock, so the gateways' clocks never matter. Both buckets are
//! updated only when both admit the request (locally, governor has already spent the
//! per-key cell when the total refuses). Keys live under `specter:rl:{env}:{key_id}` and
//! `specter:rl:{env}:_total` and expire once their bucket is full again.
//!
//! When Redis is slow or down, `on_error` decides: this instance's own limiters
//! (`local`), admit (`allow`) or refuse with 503 (`deny`).

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::store_health::{self, StoreHealth};
use super::{limited, push_state, Scope};
use crate::body::BoxError;
use crate::config::{QuotaConfig, RateLimitConfig, StoreConfig, StoreErrorMode};
use crate::error::GatewayError;

/// `KEYS` = buckets (per key and/or total); `ARGV` = interval (µs) and burst per bucket,
/// then optionally a fixed "now" in µs (tests only; the gateway always uses `TIME`).
/// Returns `{1, remaining...}` when admitted, `{0, bucket index, wait µs}` when not.
const GCRA: &str = r#"
local now
if #ARGV > 2 * #KEYS then
  now = tonumber(ARGV[#ARGV])
else
  local now_parts = redis.call('TIME')
  now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
end
local next_tats = {}
local result = {1}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tau = interval * (tonumber(ARGV[2 * i]) - 1)
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  local earliest = tat - tau
  if now < earliest then
    return {0, i, earliest - now}
  end
  local next_tat = math.max(tat, now) + interval
  next_tats[i] = next_tat
  result[i + 1] = math.floor((now + tau + interval - next_tat) / interval)
end
for i = 1, #KEYS do
  local ttl_ms = math.ceil((next_tats[i] - now) / 1000) + 1000
  redis.call('SET', KEYS[i], string.format('%d', next_tats[i]), 'PX', ttl_ms)
end
return result
"#;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the rate-limit store failed")]
    Redis(#[from] redis::RedisError),
    #[error("rate-limit store answered {0:?}, which is not a script result")]
    Unexpected(Vec<i64>),
}

/// Admitted (with the `RateLimit` field), or refused (the 429 and its `RateLimit` field).
pub type Verdict = Result<Option<HeaderValue>, (GatewayError, HeaderValue)>;

pub struct RedisStore {
    pub config: StoreConfig,
    conn: ConnectionManager,
    script: redis::Script,
    /// Answering or failing, and why: `/readyz` reads it.
    pub health: Arc<StoreHealth>,
}

impl RedisStore {
    /// Connects lazily: a gateway starts, and serves under `on_error`, while Redis is down.
    pub fn new(config: &StoreConfig) -> Result<RedisStore, redis::RedisError> {
        let client = redis::Client::open(config.redis.as_str())?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout.max(Duration::from_millis(250))))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)?;
        Ok(RedisStore {
            config: config.clone(),
            conn,
            script: redis::Script::new(GCRA),
            health: Arc::default(),
        })
    }

    /// Checks (and spends) one request against the key's and the environment's buckets.
    pub async fn check(
        &self,
        environment: &str,
        key_id: &str,
        limits: &RateLimitConfig,
    ) -> Result<Verdict, StoreError> {
        let outcome = self.check_at(environment, key_id, limits, None).await;
        if outcome.is_ok() {
            self.health.succeeded();
        }
        outcome
    }

    /// One `PING` within `timeout`, for `/readyz`: the store's health without traffic.
    pub async fn probe(&self) {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut conn);
        match tokio::time::timeout(self.config.timeout, ping).await {
            Ok(Ok(_)) => self.health.succeeded(),
            Ok(Err(e)) => self.report(&StoreError::Redis(e)),
            Err(_) => self.report(&StoreError::Timeout(self.config.timeout)),
        }
    }

    /// [`check`](Self::check) with the script's clock fixed at `now_us` (µs since the
    /// Unix epoch) instead of Redis `TIME`: lets tests replay arrival times exactly.
    pub async fn check_at(
        &self,
        environment: &str,
        key_id: &str,
        limits: &RateLimitConfig,
        now_us: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let buckets: Vec<(Scope, QuotaConfig, String)> = [
            (Scope::PerKey, limits.per_key, key_id),
            (Scope::Total, limits.total, "_total"),
        ]
        .into_iter()
        .filter_map(|(scope, q, name)| {
            q.map(|q| (scope, q, format!("specter:rl:{environment}:{name}")))
        })
        .collect();
        if buckets.is_empty() {
            return Ok(Ok(None));
        }
        let mut invocation = self.script.prepare_invoke();
        for (_, q, key) in &buckets {
            let interval_us = (q.per / q.requests.get()).as_micros().max(1) as u64;
            invocation.key(key).arg(interval_us).arg(q.burst.get());
        }
        if let Some(now) = now_us {
            invocation.arg(now);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.config.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.config.timeout))??;
        match reply.as_slice() {
            [1, remaining @ ..] if remaining.len() == buckets.len() => {
                let mut fields = String::with_capacity(48);
                for ((scope, q, _), left) in buckets.iter().zip(remaining) {
                    push_state(&mut fields, *scope, q, (*left).max(0) as u32);
                }
                Ok(Ok(super::header_value(fields)))
            }
            [0, index, wait_us] if (1..=buckets.len() as i64).contains(index) => {
                let scope = buckets[(*index - 1) as usize].0;
                Ok(Err(limited(
                    scope,
                    Duration::from_micros((*wait_us).max(0) as u64),
                )))
            }
            other => Err(StoreError::Unexpected(other.to_vec())),
        }
    }

    /// Marks the store failing and logs the failure with its cause: the first at once,
    /// then one line per interval with a count. A timeout's cause is diagnosed on a
    /// fresh connection (at most once a second per store) before it is recorded.
    pub fn report(&self, error: &StoreError) {
        static STORE_FAILED: crate::logthrottle::Throttle =
            crate::logthrottle::Throttle::new("rate-limit store check failed");
        let what = || crate::proxy::ErrorChain(error).to_string();
        self.health.failed(what);
        let log = STORE_FAILED.check(&[]).map(|more| more.to_string());
        let due = self.health.cause_due();
        let on_error = self.config.on_error;
        if !matches!(error, StoreError::Timeout(_)) {
            if due {
                self.health.set_cause(what());
            }
            if let Some(more) = log {
                tracing::warn!(error = %what(), ?on_error, "rate-limit store check failed{more}");
            }
            return;
        }
        if !due && log.is_none() {
            return;
        }
        let (what, url, health) = (what(), self.config.redis.clone(), self.health.clone());
        let deadline = self.config.timeout.max(Duration::from_millis(500));
        tokio::spawn(async move {
            let cause = store_health::diagnose(&url, deadline).await;
            health.set_cause(format!("{what}; {cause}"));
            if let Some(more) = log {
                tracing::warn!(error = %what, %cause, ?on_error, "rate-limit store check failed{more}");
            }
        });
    }

    pub fn on_error(&self) -> StoreErrorMode {
        self.config.on_error
    }
}

/// The store a new snapshot uses: the previous one while its settings are unchanged
/// (keeping its connection), else a new one.
pub fn carry_over(
    config: Option<&StoreConfig>,
    previous: Option<&Arc<RedisStore>>,
) -> Result<Option<Arc<RedisStore>>, BoxError> {
    match (config, previous) {
        (None, _) => Ok(None),
        (Some(c), Some(p)) if p.config == *c => Ok(Some(p.clone())),
        (Some(c), _) => Ok(Some(Arc::new(RedisStore::new(c)?))),
    }
}
