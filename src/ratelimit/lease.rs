//! Lease mode: each gateway takes a batch of cells from a shared bucket in one round
//! trip and spends them locally, so Redis sees about one call per batch instead of one
//! per request.
//!
//! A batch is `lease` of the bucket's burst (at least one cell). An instance goes back
//! to Redis when its batch is spent or older than `lease_ttl`; the cells an old batch
//! left unspent are given back in that same call (no extra round trip), or, when the
//! instance never comes back, simply stay charged until the bucket refills.
//!
//! The bound: every admitted request spent a cell the shared bucket handed out, so the
//! fleet never admits more than the bucket allows over time. What changes is *when*:
//! cells taken before a window may be spent inside it, so any window can see up to one
//! batch per instance (instances × batch) more than exact mode would admit in it.
//!
//! A refused refill (the bucket is empty) is remembered until the bucket could hand out
//! a whole batch again (at most `lease_ttl`), so an instance under overload refuses
//! locally instead of asking Redis per request.
//!
//! Memory: one entry per bucket in use on this instance (the Redis key name, ~40 bytes,
//! and a ~100-byte lease behind an async mutex); entries idle past `lease_ttl` are
//! dropped once a minute.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Mutex, MutexGuard};

use super::redis::{interval_us, BucketRef, RedisStore, StoreError, Take, Taken, Verdict};
use super::{limited, push_state};
use crate::config::{LeaseConfig, QuotaConfig};

/// How often idle leases are swept out.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

pub struct Leases {
    config: LeaseConfig,
    buckets: DashMap<String, Arc<Mutex<Lease>>>,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last sweep.
    swept_ms: AtomicU64,
}

/// This instance's share of one shared bucket.
#[derive(Default)]
struct Lease {
    /// Cells this instance may still spend.
    cells: u32,
    /// The shared bucket's remaining cells when the batch was taken: with `cells`, the
    /// `RateLimit` remaining this instance can vouch for.
    shared_left: u32,
    /// When the batch was taken, and under which quota.
    taken: Option<(Instant, QuotaConfig)>,
    /// The bucket refused a batch: refuse locally until then.
    refused_until: Option<Instant>,
    /// The last failed refill, so requests queued behind it do not each wait out a
    /// timeout of their own.
    failed_at: Option<Instant>,
}

impl Lease {
    fn usable(&self, now: Instant, ttl: Duration, q: &QuotaConfig) -> bool {
        self.cells > 0 && self.fresh(now, ttl, q)
    }

    fn fresh(&self, now: Instant, ttl: Duration, q: &QuotaConfig) -> bool {
        self.taken
            .is_some_and(|(at, quota)| quota == *q && now.duration_since(at) < ttl)
    }

    /// Cells of an old batch to give back with the next refill (same quota only: a
    /// changed quota has a fresh bucket).
    fn unspent(&self, q: &QuotaConfig) -> u32 {
        match self.taken {
            Some((_, quota)) if quota == *q => self.cells,
            _ => 0,
        }
    }
}

impl Leases {
    pub fn new(config: LeaseConfig) -> Leases {
        Leases {
            config,
            buckets: DashMap::new(),
            epoch: Instant::now(),
            swept_ms: AtomicU64::new(0),
        }
    }

    fn entry(&self, key: &str) -> Arc<Mutex<Lease>> {
        if let Some(lease) = self.buckets.get(key) {
            return lease.clone();
        }
        self.buckets.entry(key.to_owned()).or_default().clone()
    }

    /// Spends one cell of each bucket, refilling the batches that are spent or old.
    pub async fn check(
        &self,
        store: &RedisStore,
        buckets: &[BucketRef],
    ) -> Result<Verdict, StoreError> {
        let started = Instant::now();
        let entries: Vec<_> = buckets.iter().map(|(_, _, key)| self.entry(key)).collect();
        // Per key, then total, for every request: one lock order, no deadlock.
        let mut leases = Vec::with_capacity(entries.len());
        for entry in &entries {
            leases.push(entry.lock().await);
        }
        let now = Instant::now();
        for (lease, (scope, _, _)) in leases.iter().zip(buckets) {
            if let Some(until) = lease.refused_until.filter(|u| *u > now) {
                return Ok(Err(limited(*scope, until - now)));
            }
        }
        let ttl = self.config.ttl;
        let stale: Vec<usize> = (0..buckets.len())
            .filter(|&i| !leases[i].usable(now, ttl, &buckets[i].1))
            .collect();
        if !stale.is_empty() {
            if leases
                .iter()
                .any(|l| l.failed_at.is_some_and(|f| f >= started))
            {
                return Err(StoreError::RefillFailed);
            }
            self.refill_stale(store, buckets, &mut leases, &stale)
                .await?;
        }
        let now = Instant::now();
        let verdict = spend(&mut leases, buckets, now);
        drop(leases);
        self.sweep_if_due(now);
        Ok(verdict)
    }

    /// One round trip (per bucket on a cluster) renews the batches in `stale`.
    async fn refill_stale(
        &self,
        store: &RedisStore,
        buckets: &[BucketRef],
        leases: &mut [MutexGuard<'_, Lease>],
        stale: &[usize],
    ) -> Result<(), StoreError> {
        let takes: Vec<Take> = stale
            .iter()
            .map(|&i| {
                let (_, q, key) = &buckets[i];
                Take {
                    key,
                    quota: q,
                    want: self.config.batch(q.burst.get()),
                    give_back: leases[i].unspent(q),
                }
            })
            .collect();
        let answers = refill(store, &takes).await;
        let now = Instant::now();
        for (&i, answer) in stale.iter().zip(&answers) {
            let lease = &mut leases[i];
            match answer {
                Ok(taken) => self.renew(lease, &buckets[i].1, taken, now),
                Err(_) => lease.failed_at = Some(now),
            }
        }
        match answers.into_iter().find_map(Result::err) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    fn renew(&self, lease: &mut Lease, q: &QuotaConfig, taken: &Taken, now: Instant) {
        lease.cells = taken.granted;
        lease.shared_left = taken.remaining;
        lease.taken = Some((now, *q));
        lease.failed_at = None;
        lease.refused_until = (taken.granted == 0).then(|| {
            // Wait for a whole batch rather than a single cell: an instance under
            // overload then asks Redis about once per batch, not once per request.
            let batch = u64::from(self.config.batch(q.burst.get()));
            let whole_batch = taken.wait + Duration::from_micros(interval_us(q) * (batch - 1));
            now + whole_batch.min(self.config.ttl)
        });
    }

    /// Drops leases idle past `lease_ttl` (their unspent cells stay charged in Redis
    /// until the bucket refills), at most once per [`SWEEP_EVERY`].
    fn sweep_if_due(&self, now: Instant) {
        let now_ms = now.duration_since(self.epoch).as_millis() as u64;
        let last = self.swept_ms.load(Ordering::Relaxed);
        if now_ms.saturating_sub(last) < SWEEP_EVERY.as_millis() as u64
            || self
                .swept_ms
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        let ttl = self.config.ttl;
        self.buckets.retain(|_, lease| match lease.try_lock() {
            Ok(l) => {
                l.taken
                    .is_some_and(|(at, _)| now.saturating_duration_since(at) < ttl)
                    || l.refused_until.is_some_and(|u| u > now)
            }
            Err(_) => true,
        });
    }

    /// Number of buckets with a lease on this instance (for tests).
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

/// One cell from each lease, or a 429 for the first bucket whose batch came back empty.
fn spend(leases: &mut [MutexGuard<'_, Lease>], buckets: &[BucketRef], now: Instant) -> Verdict {
    if let Some(i) = leases.iter().position(|l| l.cells == 0) {
        let wait = leases[i]
            .refused_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        return Err(limited(buckets[i].0, wait));
    }
    let mut fields = String::with_capacity(48);
    for (lease, (scope, q, _)) in leases.iter_mut().zip(buckets) {
        lease.cells -= 1;
        let remaining = lease
            .cells
            .saturating_add(lease.shared_left)
            .min(q.burst.get());
        push_state(&mut fields, *scope, q, remaining);
    }
    Ok(super::header_value(fields))
}

/// One call for all stale buckets on one server; on a cluster one call per bucket (each
/// in its own slot), so a failing node fails only the buckets it holds.
async fn refill(store: &RedisStore, takes: &[Take<'_>]) -> Vec<Result<Taken, StoreError>> {
    if !store.is_cluster() || takes.len() == 1 {
        return match store.take(takes, None).await {
            Ok(taken) => taken.into_iter().map(Ok).collect(),
            Err(e) => {
                let mut out = vec![Err(e)];
                out.extend((1..takes.len()).map(|_| Err(StoreError::RefillFailed)));
                out
            }
        };
    }
    let mut out = Vec::with_capacity(takes.len());
    for take in takes {
        out.push(
            store
                .take(std::slice::from_ref(take), None)
                .await
                .map(|t| t[0]),
        );
    }
    out
}
