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
//!
//! With a Redis Cluster the two buckets generally live in different slots (per-key
//! buckets are deliberately not hash-tagged, so a big environment spreads over every
//! shard), and one script cannot touch both without a CROSSSLOT error. Exact mode then
//! charges the key's bucket first and the total second; when the total refuses (or
//! fails), the key's cell is given back in a third round trip. Only if that give-back
//! fails too is the key charged one cell it did not use. Lease mode (see [`super::lease`])
//! takes batches of cells instead of one per request.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;

use super::lease::Leases;
use super::store_health::{self, StoreHealth};
use super::{limited, push_state, Scope};
use crate::body::BoxError;
use crate::config::{
    QuotaConfig, RateLimitConfig, StoreConfig, StoreErrorMode, StoreMode, StoreServers,
};
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

/// Takes up to `want` cells from each bucket (after giving `give_back` unspent cells back),
/// each bucket on its own: a cluster may route a call holding a single key anywhere.
/// `KEYS` = buckets; `ARGV` = interval (µs), burst, want, give_back per bucket, then
/// optionally a fixed "now" in µs (tests only). Returns, per bucket, the cells granted,
/// the cells left in the bucket and the µs until the next cell.
const TAKE: &str = r#"
local now
if #ARGV > 4 * #KEYS then
  now = tonumber(ARGV[#ARGV])
else
  local now_parts = redis.call('TIME')
  now = tonumber(now_parts[1]) * 1000000 + tonumber(now_parts[2])
end
local result = {}
for i = 1, #KEYS do
  local interval = tonumber(ARGV[4 * i - 3])
  local burst = tonumber(ARGV[4 * i - 2])
  local want = tonumber(ARGV[4 * i - 1])
  local give = tonumber(ARGV[4 * i])
  local tat = math.max(tonumber(redis.call('GET', KEYS[i])) or now, now)
  tat = math.max(tat - give * interval, now)
  local available = math.floor((now + burst * interval - tat) / interval)
  local granted = math.max(math.min(want, available), 0)
  tat = tat + granted * interval
  if granted > 0 or give > 0 then
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  result[3 * i - 2] = granted
  result[3 * i - 1] = available - granted
  result[3 * i] = math.max(tat - (burst - 1) * interval - now, 0)
end
return result
"#;

/// One bucket's part of a `TAKE` call.
pub struct Take<'a> {
    pub key: &'a str,
    pub quota: &'a QuotaConfig,
    pub want: u32,
    pub give_back: u32,
}

/// One bucket's answer to a `TAKE` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub granted: u32,
    /// Cells left in the shared bucket after this grant.
    pub remaining: u32,
    /// Until the bucket holds one more cell.
    pub wait: Duration,
}

/// A bucket of a request: which limit, its quota, and its Redis key.
pub type BucketRef = (Scope, QuotaConfig, String);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the rate-limit store failed")]
    Redis(#[from] redis::RedisError),
    #[error("rate-limit store answered {0:?}, which is not a script result")]
    Unexpected(Vec<i64>),
    #[error("a concurrent refill of this bucket's lease failed just now")]
    RefillFailed,
}

/// One Redis server (reconnecting manager) or a cluster (slots, MOVED/ASK, reconnects).
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Admitted (with the `RateLimit` field), or refused (the 429 and its `RateLimit` field).
pub type Verdict = Result<Option<HeaderValue>, (GatewayError, HeaderValue)>;

pub struct RedisStore {
    pub config: StoreConfig,
    conn: Connection,
    script: redis::Script,
    take_script: redis::Script,
    /// Lease mode's local batches; `None` in exact mode.
    leases: Option<Leases>,
    /// Answering or failing, and why: `/readyz` reads it.
    pub health: Arc<StoreHealth>,
}

impl RedisStore {
    /// Connects lazily: a gateway starts, and serves under `on_error`, while Redis is down.
    pub fn new(config: &StoreConfig) -> Result<RedisStore, redis::RedisError> {
        let connect_timeout = config.timeout.max(Duration::from_millis(250));
        let conn = match &config.servers {
            StoreServers::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let manager_config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                Connection::Single(ConnectionManager::new_lazy_with_config(
                    client,
                    manager_config,
                )?)
            }
            StoreServers::Cluster(nodes) => {
                // Each check has its own deadline (`timeout`); the crate's retries,
                // redirections and slot refreshes happen inside it.
                let client =
                    redis::cluster::ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .retries(2)
                        .min_retry_wait(10)
                        .max_retry_wait(200)
                        .overall_response_timeout(None)
                        .build()?;
                let cluster_config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(config.timeout);
                Connection::Cluster(client.get_pending_async_connection_with_config(cluster_config))
            }
        };
        let leases = match config.mode {
            StoreMode::Exact => None,
            StoreMode::Lease(lease) => Some(Leases::new(lease)),
        };
        Ok(RedisStore {
            config: config.clone(),
            conn,
            script: redis::Script::new(GCRA),
            take_script: redis::Script::new(TAKE),
            leases,
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
        let buckets = buckets(environment, key_id, limits);
        let verdict = match (&self.leases, &self.config.servers) {
            _ if buckets.is_empty() => return Ok(Ok(None)),
            (Some(leases), _) => leases.check(self, &buckets).await,
            (None, StoreServers::Single(_)) => self.check_both(&buckets, None).await,
            (None, StoreServers::Cluster(_)) => self.check_one_by_one(&buckets).await,
        };
        if verdict.is_ok() {
            self.health.succeeded();
        }
        verdict
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
    /// One server only, exact mode: both buckets in one script.
    pub async fn check_at(
        &self,
        environment: &str,
        key_id: &str,
        limits: &RateLimitConfig,
        now_us: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let buckets = buckets(environment, key_id, limits);
        if buckets.is_empty() {
            return Ok(Ok(None));
        }
        self.check_both(&buckets, now_us).await
    }

    /// Both buckets in one script: committed together or not at all.
    async fn check_both(
        &self,
        buckets: &[BucketRef],
        now_us: Option<u64>,
    ) -> Result<Verdict, StoreError> {
        let mut invocation = self.script.prepare_invoke();
        for (_, q, key) in buckets {
            invocation.key(key).arg(interval_us(q)).arg(q.burst.get());
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

    /// Exact mode on a cluster: the key's bucket, then the total, each in its own slot.
    /// A refusal or failure of the total gives the key's cell back.
    async fn check_one_by_one(&self, buckets: &[BucketRef]) -> Result<Verdict, StoreError> {
        let mut fields = String::with_capacity(48);
        let mut charged: Option<&BucketRef> = None;
        for bucket in buckets {
            let (scope, q, key) = bucket;
            let one = [Take {
                key,
                quota: q,
                want: 1,
                give_back: 0,
            }];
            let answer = self.take(&one, None).await.map(|t| t[0]);
            if !matches!(answer, Ok(Taken { granted: 1, .. })) {
                if let Some((_, q, key)) = charged {
                    self.give_back(key, q).await;
                }
            }
            let taken = answer?;
            if taken.granted == 0 {
                return Ok(Err(limited(*scope, taken.wait)));
            }
            push_state(&mut fields, *scope, q, taken.remaining);
            charged = Some(bucket);
        }
        Ok(Ok(super::header_value(fields)))
    }

    /// Returns one unused cell; a failure only costs the key that cell, so it is logged.
    async fn give_back(&self, key: &str, quota: &QuotaConfig) {
        let one = [Take {
            key,
            quota,
            want: 0,
            give_back: 1,
        }];
        if let Err(e) = self.take(&one, None).await {
            self.report(&e);
        }
    }

    /// One `TAKE` call over `takes`, all in one slot (or on one server).
    pub async fn take(
        &self,
        takes: &[Take<'_>],
        now_us: Option<u64>,
    ) -> Result<Vec<Taken>, StoreError> {
        let mut invocation = self.take_script.prepare_invoke();
        for t in takes {
            invocation
                .key(t.key)
                .arg(interval_us(t.quota))
                .arg(t.quota.burst.get())
                .arg(t.want)
                .arg(t.give_back);
        }
        if let Some(now) = now_us {
            invocation.arg(now);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<i64> =
            tokio::time::timeout(self.config.timeout, invocation.invoke_async(&mut conn))
                .await
                .map_err(|_| StoreError::Timeout(self.config.timeout))??;
        if reply.len() != 3 * takes.len() {
            return Err(StoreError::Unexpected(reply));
        }
        let clamp = |v: i64| u32::try_from(v.max(0)).unwrap_or(u32::MAX);
        Ok(reply
            .chunks_exact(3)
            .map(|t| Taken {
                granted: clamp(t[0]),
                remaining: clamp(t[1]),
                wait: Duration::from_micros(t[2].max(0) as u64),
            })
            .collect())
    }

    /// Whether the counters live in a cluster, where each bucket needs its own call.
    pub fn is_cluster(&self) -> bool {
        matches!(self.config.servers, StoreServers::Cluster(_))
    }

    /// Marks the store failing and logs the failure with its cause: the first at once,
    /// then one line per interval with a count. A timeout's cause is diagnosed on a
    /// fresh connection (at most once a second per store) before it is recorded.
    pub fn report(&self, error: &StoreError) {
        static STORE_FAILED: crate::logthrottle::Throttle =
            crate::logthrottle::Throttle::new("rate-limit store check failed");
        let what = || crate::error::ErrorChain(error).to_string();
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
        // A cluster is diagnosed through its first seed node.
        let url = match &self.config.servers {
            StoreServers::Single(url) => url.clone(),
            StoreServers::Cluster(nodes) => nodes.first().cloned().unwrap_or_default(),
        };
        let (what, health) = (what(), self.health.clone());
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

/// The buckets a request draws on, per key first. The names carry the key's id, never
/// the key or its hash, and no `{hash tag}`: in a cluster, an environment's per-key
/// buckets spread over all slots.
fn buckets(environment: &str, key_id: &str, limits: &RateLimitConfig) -> Vec<BucketRef> {
    [
        (Scope::PerKey, limits.per_key, key_id),
        (Scope::Total, limits.total, "_total"),
    ]
    .into_iter()
    .filter_map(|(scope, q, name)| {
        q.map(|q| (scope, q, format!("specter:rl:{environment}:{name}")))
    })
    .collect()
}

pub fn interval_us(q: &QuotaConfig) -> u64 {
    (q.per / q.requests.get()).as_micros().max(1) as u64
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
