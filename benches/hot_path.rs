//! The per-request hot path, piece by piece: key lookup, path normalisation, policy and
//! rate limits, and the per-key limiter store behind them (STYLE.md habit 13).
//!
//! `key_lookup` must cost the same at 10 and at 1,000,000 keys: one SHA-256 of the
//! presented key plus one map probe. The large maps are built once per size, outside
//! the timed loop, and the lookups cycle through ~1,000 distinct keys spread over the
//! whole map, like the set of keys active at any one time.
//!
//! `trace_context` is the W3C trace step every request takes (parse or start, then write
//! the outgoing `traceparent`), plus the status page's per-request counters.
//!
//! Run: `cargo bench --bench hot_path` (one group: `cargo bench --bench hot_path -- trace_context`).

use std::collections::HashMap;
use std::hint::black_box;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{HeaderMap, Method};

use specter::auth::{self, KeyId, KeyTable};
use specter::config::{sha256, KeyConfig, PolicyConfig, QuotaConfig, RateLimitConfig};
use specter::path::normalize_path;
use specter::policy::Policy;
use specter::ratelimit::EnvLimiter;

const API_KEY: HeaderName = HeaderName::from_static("x-api-key");
/// Distinct keys a lookup benchmark cycles through.
const SAMPLE: usize = 1_000;

/// The `i`-th key, shaped like `specter keys new` output: `spk_<env>_` + 32 base62.
fn api_key(i: u64) -> String {
    const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut state = i;
    let mut random = String::with_capacity(32);
    while random.len() < 32 {
        // splitmix64: deterministic, well spread.
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        for _ in 0..8 {
            random.push(BASE62[(z % 62) as usize] as char);
            z /= 62;
        }
    }
    format!("spk_prod_{random}")
}

fn key_table(n: usize) -> KeyTable {
    let keys = (0..n)
        .map(|i| KeyConfig {
            id: format!("prod-{i}"),
            sha256: sha256(api_key(i as u64).as_bytes()),
            not_before: None,
            not_after: None,
        })
        .collect();
    KeyTable::build(vec![("production", keys)], None)
}

/// Header values for up to [`SAMPLE`] keys spread evenly over `0..n` (or, with
/// `offset = n`, as many keys that are not in the map).
fn sample_headers(n: usize, offset: usize) -> Vec<HeaderValue> {
    let count = n.min(SAMPLE);
    let stride = n / count;
    (0..count)
        .map(|j| {
            let key = api_key((offset + j * stride) as u64);
            HeaderValue::from_str(&key).expect("ASCII key")
        })
        .collect()
}

/// What a request does with its key: headers in, key entry (or refusal) out.
fn key_step(map: &KeyTable, value: &HeaderValue) -> Result<usize, specter::error::GatewayError> {
    let mut headers = HeaderMap::new();
    headers.insert(API_KEY, value.clone());
    let (key, _source) = auth::extract(&headers, &API_KEY)?;
    let entry = auth::lookup(map, key, SystemTime::now())?;
    Ok(entry.environment())
}

fn key_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("key_lookup");
    for n in [10, 10_000, 1_000_000] {
        let map = key_table(n);
        let sample = sample_headers(n, 0);
        assert!(sample.iter().all(|v| key_step(&map, v).is_ok()));
        let mut next = sample.iter().cycle();
        group.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                let value = next.next().expect("cycle never ends");
                black_box(key_step(black_box(&map), value))
            })
        });
        if n == 1_000_000 {
            let unknown = sample_headers(n, n);
            assert!(unknown.iter().all(|v| key_step(&map, v).is_err()));
            let mut next = unknown.iter().cycle();
            group.bench_function("miss", |b| {
                b.iter(|| {
                    let value = next.next().expect("cycle never ends");
                    black_box(key_step(black_box(&map), value))
                })
            });
        }
    }
    group.finish();
}

fn path_normalize(c: &mut Criterion) {
    let mut group = c.benchmark_group("path_normalize");
    for (name, path) in [
        ("plain", "/v1/users/42"),
        ("dotted", "/v1/./a/../b//c"),
        ("encoded", "/v1/%61%62c/%2e%2e/x"),
    ] {
        assert!(normalize_path(path).is_ok(), "{path}");
        group.bench_function(name, |b| {
            b.iter(|| black_box(normalize_path(black_box(path))))
        });
    }
    group.finish();
}

/// A quota no benchmark can exhaust: 10^9 requests a second, a burst of ~4 * 10^9.
fn unlimited() -> QuotaConfig {
    QuotaConfig {
        requests: NonZeroU32::new(1_000_000_000).expect("non-zero"),
        per: Duration::from_secs(1),
        burst: NonZeroU32::MAX,
    }
}

fn policy() -> Policy {
    Policy::new(PolicyConfig {
        methods: Some(vec![Method::GET, Method::POST]),
        allow_paths: vec!["/v1".to_owned()],
        deny_paths: vec!["/v1/internal".to_owned()],
        allow_ips: Some(vec![
            "10.0.0.0/8".parse().expect("CIDR"),
            "127.0.0.0/8".parse().expect("CIDR"),
        ]),
        max_body: Some(1024 * 1024),
        ..PolicyConfig::default()
    })
}

fn policy_and_limits(c: &mut Criterion) {
    let policy = policy();
    let limits = RateLimitConfig {
        per_key: Some(unlimited()),
        total: Some(unlimited()),
    };
    let clock = governor::clock::DefaultClock::default();
    let ip: IpAddr = "10.1.2.3".parse().expect("IP");
    let method = Method::GET;
    let path = "/v1/users/42";
    let mut headers = HeaderMap::new();
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("512"));

    let mut group = c.benchmark_group("policy_and_limits");
    for (name, keys) in [("one_key", 1), ("100000_keys", 100_000)] {
        let limiter = EnvLimiter::carry_over(&limits, None, &clock);
        let ids: Vec<KeyId> = (0..keys)
            .map(|i| KeyId::from(format!("prod-{i}").as_str()))
            .collect();
        let step = |id: &KeyId| {
            policy.check_ip(ip).is_ok()
                && policy.check_method(&method).is_ok()
                && policy.check_path(path).is_ok()
                && policy.check_declared_body(&headers).is_ok()
                && limiter.check(id).is_ok()
        };
        assert!(ids.iter().all(step), "nothing is refused");
        let mut next = ids.iter().cycle();
        group.bench_function(name, |b| {
            b.iter(|| black_box(step(next.next().expect("cycle never ends"))))
        });
    }
    group.finish();
}

/// The rejected alternative to governor's DashMap-backed keyed limiter: one direct
/// limiter per key behind a single lock.
struct MutexStore {
    quota: Quota,
    limiters: Mutex<HashMap<Arc<str>, DefaultDirectRateLimiter>>,
}

impl MutexStore {
    fn check_key(&self, key: &Arc<str>) -> bool {
        let mut limiters = self.limiters.lock().expect("not poisoned");
        if let Some(limiter) = limiters.get(key) {
            return limiter.check().is_ok();
        }
        let limiter = RateLimiter::direct(self.quota);
        let ok = limiter.check().is_ok();
        limiters.insert(key.clone(), limiter);
        ok
    }
}

/// Runs `check` on each of two threads `iters` times, the threads starting together
/// on different keys; returns the slower thread's time, i.e. the time per check as
/// each thread sees it while the other competes for the same store.
fn two_threads(
    iters: u64,
    keys: &[Arc<str>],
    check: impl Fn(&Arc<str>) -> bool + Sync,
) -> Duration {
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        [0, keys.len() / 2]
            .map(|offset| {
                let (start, check) = (&start, &check);
                s.spawn(move || {
                    let mut next = keys.iter().cycle().skip(offset);
                    start.wait();
                    let began = Instant::now();
                    for _ in 0..iters {
                        black_box(check(next.next().expect("cycle never ends")));
                    }
                    began.elapsed()
                })
            })
            .map(|t| t.join().expect("bench thread"))
            .into_iter()
            .max()
            .expect("two threads")
    })
}

/// One check against a per-key limiter store: admitted or not.
type StoreCheck<'a> = dyn Fn(&Arc<str>) -> bool + Sync + 'a;

fn limiter_store(c: &mut Criterion) {
    let quota = Quota::per_second(NonZeroU32::new(1_000_000_000).expect("non-zero"))
        .allow_burst(NonZeroU32::MAX);
    let keys: Vec<Arc<str>> = (0..SAMPLE)
        .map(|i| Arc::from(format!("prod-{i}")))
        .collect();
    let dashmap: DefaultKeyedRateLimiter<Arc<str>> = RateLimiter::dashmap(quota);
    let mutex = MutexStore {
        quota,
        limiters: Mutex::new(HashMap::new()),
    };
    assert!(keys.iter().all(|k| dashmap.check_key(k).is_ok()));
    assert!(keys.iter().all(|k| mutex.check_key(k)));

    let mut group = c.benchmark_group("limiter_store");
    let dashmap_check = |k: &Arc<str>| dashmap.check_key(k).is_ok();
    let mutex_check = |k: &Arc<str>| mutex.check_key(k);
    let stores: [(&str, &StoreCheck<'_>); 2] = [
        ("dashmap_keyed", &dashmap_check),
        ("mutex_hashmap", &mutex_check),
    ];
    for (name, check) in stores {
        let mut next = keys.iter().cycle();
        group.bench_function(BenchmarkId::new(name, "1_thread"), |b| {
            b.iter(|| black_box(check(next.next().expect("cycle never ends"))))
        });
        group.bench_function(BenchmarkId::new(name, "2_threads"), |b| {
            b.iter_custom(|iters| two_threads(iters, &keys, check))
        });
    }
    group.finish();
}

/// The per-request cost of key usage tracking (`/keys`): two relaxed atomics and an
/// address compare; the address is stored only when it changes.
fn key_usage(c: &mut Criterion) {
    let usage = specter::auth::KeyUsage::default();
    let now = std::time::SystemTime::now();
    let same: std::net::IpAddr = "10.1.2.3".parse().expect("address");
    let other: std::net::IpAddr = "10.1.2.4".parse().expect("address");
    let mut group = c.benchmark_group("key_usage");
    group.bench_function("record_same_client", |b| {
        b.iter(|| usage.record(black_box(now), black_box(same)))
    });
    let mut flip = false;
    group.bench_function("record_alternating_clients", |b| {
        b.iter(|| {
            flip = !flip;
            usage.record(black_box(now), if flip { same } else { other })
        })
    });
    group.finish();
}

/// Trace context, always on: parse the client's `traceparent` (or start a trace), then
/// write the one sent upstream. And the status page's per-request counters.
fn trace_context(c: &mut Criterion) {
    use specter::trace::TraceContext;
    let mut group = c.benchmark_group("trace_context");
    let mut continued = HeaderMap::new();
    continued.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    let none = HeaderMap::new();
    group.bench_function("continue_and_write", |b| {
        b.iter(|| TraceContext::from_headers(black_box(&continued), 0.0).traceparent())
    });
    group.bench_function("start_and_write", |b| {
        b.iter(|| TraceContext::from_headers(black_box(&none), 0.0).traceparent())
    });
    let t = TraceContext::from_headers(&continued, 0.0);
    group.bench_function("trace_id_hex", |b| b.iter(|| black_box(&t).trace_id_hex()));
    let activity = specter::activity::Activity::default();
    group.bench_function("status_activity_record", |b| {
        b.iter(|| activity.record(black_box(200), black_box(Duration::from_micros(350)), false))
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30)
}

criterion_group! {
    name = hot_path;
    config = config();
    targets = key_lookup, path_normalize, policy_and_limits, limiter_store, key_usage, trace_context
}
criterion_main!(hot_path);
