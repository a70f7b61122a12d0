//! Per-environment rate limits (governor GCRA) and the IETF `RateLimit` header fields.
//!
//! Follows draft-ietf-httpapi-ratelimit-headers-08 (the structured-field syntax kept by
//! later revisions): `RateLimit-Policy` lists each policy as
//! `"name";q=<quota>;w=<window seconds>` and `RateLimit` its current state as
//! `"name";r=<remaining>;t=<seconds until the quota is whole again>`. A GCRA bucket of
//! `burst` refilled at `requests/per` is announced as `q=burst` per the time the
//! bucket takes to refill (`w = burst * per / requests`).
//!
//! Limiters outlive config snapshots: [`EnvLimiter::carry_over`] reuses the previous
//! limiter when the quota is unchanged, so a reload neither resets counters nor hands
//! out a fresh burst.

pub mod failures;
#[cfg(feature = "redis")]
pub mod lease;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(feature = "redis")]
pub mod store_health;

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use http::HeaderValue;

use crate::auth::KeyId;
use crate::config::{QuotaConfig, RateLimitConfig};
use crate::error::GatewayError;

pub type DirectLimiter<C> = RateLimiter<NotKeyed, InMemoryState, C, StateInformationMiddleware>;
pub type KeyedLimiter<C> =
    RateLimiter<Bucket, DefaultKeyedStateStore<Bucket>, C, StateInformationMiddleware>;

/// The name of a key's bucket in the per-key limiter. Per request it borrows the key's
/// id from the key table (a reference count); when governor stores it (`clone`, once
/// per new bucket) it takes bytes of its own, so a bucket that lives on across reloads
/// does not keep an old key table's id arena alive.
#[derive(PartialEq, Eq, Hash)]
pub struct Bucket(KeyId);

impl Clone for Bucket {
    fn clone(&self) -> Self {
        Bucket(KeyId::from(self.0.as_str()))
    }
}

/// Which bucket refused a request, for `specter_rate_limited_total{scope}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    PerKey,
    Total,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PerKey => "per_key",
            Scope::Total => "total",
        }
    }
}

pub fn quota(q: &QuotaConfig) -> Quota {
    let interval = q.per / q.requests.get();
    Quota::with_period(interval)
        .expect("validation keeps the interval above zero")
        .allow_burst(q.burst)
}

struct Limit<L> {
    config: QuotaConfig,
    limiter: Arc<L>,
}

impl<L> Limit<L> {
    /// The previous limiter when its quota is `q` (its counters carry over), else a new one.
    fn reuse_or(q: QuotaConfig, previous: Option<&Limit<L>>, new: impl FnOnce() -> L) -> Limit<L> {
        let reused = previous
            .filter(|l| l.config == q)
            .map(|l| l.limiter.clone());
        Limit {
            config: q,
            limiter: reused.unwrap_or_else(|| Arc::new(new())),
        }
    }
}

/// One environment's limiters: per key (keyed by key id) and for the whole environment.
pub struct EnvLimiter<C: Clock = DefaultClock> {
    per_key: Option<Limit<KeyedLimiter<C>>>,
    total: Option<Limit<DirectLimiter<C>>>,
    /// `RateLimit-Policy`, built once per snapshot.
    policy: Option<HeaderValue>,
}

impl<C: Clock + Clone> EnvLimiter<C> {
    /// Builds the limiters for `config`, reusing those of `previous` whose quota did not
    /// change (their counters carry over), and making new ones for changed quotas.
    pub fn carry_over(
        config: &RateLimitConfig,
        previous: Option<&EnvLimiter<C>>,
        clock: &C,
    ) -> Self {
        let per_key = config.per_key.map(|q| {
            Limit::reuse_or(q, previous.and_then(|p| p.per_key.as_ref()), || {
                KeyedLimiter::new(quota(&q), DefaultKeyedStateStore::default(), clock.clone())
            })
        });
        let total = config.total.map(|q| {
            Limit::reuse_or(q, previous.and_then(|p| p.total.as_ref()), || {
                RateLimiter::direct_with_clock(quota(&q), clock.clone()).with_middleware()
            })
        });
        let policy = policy_header(config);
        EnvLimiter {
            per_key,
            total,
            policy,
        }
    }
}

impl<C: Clock> EnvLimiter<C> {
    pub fn is_limited(&self) -> bool {
        self.policy.is_some()
    }

    pub fn policy_header(&self) -> Option<&HeaderValue> {
        self.policy.as_ref()
    }

    /// Per key first, then the environment total. `Ok` carries the `RateLimit` value;
    /// `Err` is a 429 whose `RateLimit` value says which bucket is empty.
    pub fn check(
        &self,
        key_id: &KeyId,
    ) -> Result<Option<HeaderValue>, (GatewayError, HeaderValue)> {
        if self.policy.is_none() {
            return Ok(None);
        }
        let mut fields = String::with_capacity(48);
        if let Some(l) = &self.per_key {
            match l.limiter.check_key(&Bucket(key_id.clone())) {
                Ok(snapshot) => {
                    push_state(&mut fields, Scope::PerKey, &l.config, remaining(&snapshot))
                }
                Err(not_until) => {
                    return Err(self.limited(Scope::PerKey, &not_until, l.limiter.clock()))
                }
            }
        }
        if let Some(l) = &self.total {
            match l.limiter.check() {
                Ok(snapshot) => {
                    push_state(&mut fields, Scope::Total, &l.config, remaining(&snapshot))
                }
                Err(not_until) => {
                    return Err(self.limited(Scope::Total, &not_until, l.limiter.clock()))
                }
            }
        }
        Ok(header_value(fields))
    }

    fn limited(
        &self,
        scope: Scope,
        not_until: &NotUntil<C::Instant>,
        clock: &C,
    ) -> (GatewayError, HeaderValue) {
        limited(scope, not_until.wait_time_from(clock.now()))
    }

    /// Drops per-key state that has fully refilled: idle keys cost no memory.
    pub fn retain_recent(&self) {
        if let Some(l) = &self.per_key {
            l.limiter.retain_recent();
            l.limiter.shrink_to_fit();
        }
    }

    /// Number of keys with live per-key state (for tests and metrics).
    pub fn tracked_keys(&self) -> usize {
        self.per_key.as_ref().map_or(0, |l| l.limiter.len())
    }

    /// Whether two limiters share their counters (a reload carried them over).
    pub fn shares_state_with(&self, other: &EnvLimiter<C>) -> (bool, bool) {
        let pk = match (&self.per_key, &other.per_key) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.limiter, &b.limiter),
            _ => false,
        };
        let total = match (&self.total, &other.total) {
            (Some(a), Some(b)) => Arc::ptr_eq(&a.limiter, &b.limiter),
            _ => false,
        };
        (pk, total)
    }
}

/// A field value built as a `String`, handed over without a copy.
pub fn header_value(fields: String) -> Option<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(fields)).ok()
}

/// Whole seconds (rounded up) until `missing` cells are back in the bucket.
fn refill_secs(q: &QuotaConfig, missing: u32) -> u64 {
    if missing == 0 {
        return 0;
    }
    crate::error::retry_after_secs(q.per / q.requests.get() * missing)
}

fn remaining(s: &StateSnapshot) -> u32 {
    s.remaining_burst_capacity()
}

/// A 429 for `scope`, and the `RateLimit` field that says which bucket is empty.
pub fn limited(scope: Scope, retry_after: Duration) -> (GatewayError, HeaderValue) {
    let t = crate::error::retry_after_secs(retry_after);
    let header =
        HeaderValue::from_str(&format!("\"{}\";r=0;t={t}", scope.as_str())).expect("ASCII");
    let err = GatewayError::RateLimited {
        scope: scope.as_str(),
        retry_after,
    };
    (err, header)
}

/// Appends one policy's state to a `RateLimit` field value. Once or twice per
/// response: the numbers go through `itoa`, not `core::fmt` (about 60 ns a request
/// less, in a `perf` diff).
pub fn push_state(out: &mut String, scope: Scope, q: &QuotaConfig, remaining: u32) {
    let t = refill_secs(q, q.burst.get().saturating_sub(remaining));
    let mut digits = itoa::Buffer::new();
    if !out.is_empty() {
        out.push_str(", ");
    }
    out.push('"');
    out.push_str(scope.as_str());
    out.push_str("\";r=");
    out.push_str(digits.format(remaining));
    out.push_str(";t=");
    out.push_str(digits.format(t));
}

fn policy_header(config: &RateLimitConfig) -> Option<HeaderValue> {
    let mut out = String::new();
    for (scope, q) in [
        (Scope::PerKey, config.per_key),
        (Scope::Total, config.total),
    ] {
        let Some(q) = q else { continue };
        if !out.is_empty() {
            out.push_str(", ");
        }
        let window: Duration = q.per / q.requests.get() * q.burst.get();
        let w = crate::error::retry_after_secs(window);
        let _ = write!(out, "\"{}\";q={};w={w}", scope.as_str(), q.burst);
    }
    (!out.is_empty()).then(|| HeaderValue::from_str(&out).expect("ASCII"))
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn q(requests: u32, per_ms: u64, burst: u32) -> QuotaConfig {
        QuotaConfig {
            requests: NonZeroU32::new(requests).unwrap(),
            per: Duration::from_millis(per_ms),
            burst: NonZeroU32::new(burst).unwrap(),
        }
    }

    fn config(per_key: Option<QuotaConfig>, total: Option<QuotaConfig>) -> RateLimitConfig {
        RateLimitConfig { per_key, total }
    }

    /// Offers one request every `step` over the closed interval `[0, span]`.
    fn admitted(
        l: &EnvLimiter<FakeRelativeClock>,
        clock: &FakeRelativeClock,
        key: &KeyId,
        step: Duration,
        span: Duration,
    ) -> u64 {
        let mut ok = 0;
        for i in 0..=(span.as_nanos() / step.as_nanos()) {
            if i > 0 {
                clock.advance(step);
            }
            ok += u64::from(l.check(key).is_ok());
        }
        ok
    }

    #[test]
    fn a_stored_bucket_name_owns_its_bytes() {
        let id = KeyId::from("svc");
        let stored = Bucket(id.clone()).clone();
        assert!(stored == Bucket(id.clone()));
        assert_ne!(
            stored.0.header_value().as_bytes().as_ptr(),
            id.header_value().as_bytes().as_ptr(),
            "governor's copy must not share the key table's arena"
        );
    }

    #[test]
    fn admits_rate_times_time_plus_burst_at_three_times_the_rate() {
        // 10 requests per 3 s (one every 300 ms), burst 20; offered: one every 100 ms
        // (3x the rate, on exact nanosecond steps) for 60 s on a fake clock.
        let clock = FakeRelativeClock::default();
        let l = EnvLimiter::carry_over(&config(Some(q(10, 3000, 20)), None), None, &clock);
        let key = KeyId::from("k");
        let ok = admitted(
            &l,
            &clock,
            &key,
            Duration::from_millis(100),
            Duration::from_secs(60),
        );
        let rate_times_time = 60_000 / 300;
        assert_eq!(ok, rate_times_time + 20);
    }

    #[test]
    fn per_key_buckets_are_separate_but_share_the_total() {
        let clock = FakeRelativeClock::default();
        let l = EnvLimiter::carry_over(
            &config(Some(q(5, 1000, 5)), Some(q(8, 1000, 8))),
            None,
            &clock,
        );
        let (hot, cold) = (KeyId::from("hot"), KeyId::from("cold"));
        for _ in 0..5 {
            assert!(l.check(&hot).is_ok());
        }
        let (err, header) = l.check(&hot).unwrap_err();
        assert!(matches!(
            err,
            GatewayError::RateLimited {
                scope: "per_key",
                ..
            }
        ));
        assert_eq!(header, "\"per_key\";r=0;t=1");
        for _ in 0..3 {
            assert!(
                l.check(&cold).is_ok(),
                "cold key has its own per-key bucket"
            );
        }
        let (err, _) = l.check(&cold).unwrap_err();
        assert!(
            matches!(err, GatewayError::RateLimited { scope: "total", .. }),
            "8 of the total used"
        );
    }

    #[test]
    fn headers_follow_the_draft() {
        let clock = FakeRelativeClock::default();
        let l = EnvLimiter::carry_over(
            &config(Some(q(100, 1000, 200)), Some(q(2000, 1000, 4000))),
            None,
            &clock,
        );
        assert_eq!(
            l.policy_header().unwrap(),
            "\"per_key\";q=200;w=2, \"total\";q=4000;w=2"
        );
        let state = l.check(&"k".into()).unwrap().unwrap();
        assert_eq!(state, "\"per_key\";r=199;t=1, \"total\";r=3999;t=1");
    }

    #[test]
    fn state_survives_an_unchanged_quota_and_resets_on_a_changed_one() {
        let clock = FakeRelativeClock::default();
        let cfg = config(Some(q(1, 1000, 2)), Some(q(100, 1000, 100)));
        let old = EnvLimiter::carry_over(&cfg, None, &clock);
        let key = KeyId::from("k");
        assert!(old.check(&key).is_ok());
        assert!(old.check(&key).is_ok());
        assert!(old.check(&key).is_err());

        let same = EnvLimiter::carry_over(&cfg, Some(&old), &clock);
        assert_eq!(same.shares_state_with(&old), (true, true));
        assert!(
            same.check(&key).is_err(),
            "counters carried over: still limited"
        );

        let changed =
            EnvLimiter::carry_over(&config(Some(q(1, 1000, 3)), cfg.total), Some(&same), &clock);
        assert_eq!(changed.shares_state_with(&same), (false, true));
        assert!(
            changed.check(&key).is_ok(),
            "a new quota starts a fresh bucket"
        );
    }

    #[test]
    fn idle_keys_are_reclaimed() {
        let clock = FakeRelativeClock::default();
        let l = EnvLimiter::carry_over(&config(Some(q(10, 1000, 10)), None), None, &clock);
        for i in 0..100 {
            let _ = l.check(&KeyId::from(format!("k{i}").as_str()));
        }
        assert_eq!(l.tracked_keys(), 100);
        clock.advance(Duration::from_secs(2));
        l.retain_recent();
        assert_eq!(l.tracked_keys(), 0);
    }
}
