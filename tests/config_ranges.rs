//! Every duration, size and rate has a documented range that `check` enforces, and any
//! config `check` accepts runs: built from values at and around every bound, it builds
//! a snapshot, starts a gateway and serves a request with a body, without a panic.
//!
//! Failing when written: `idle_timeout = "1ns"` panicked every connection, `per =
//! "585y"` panicked the limiter, and `body_read_timeout = "500000000000y"` turned every
//! POST into a 502.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use proptest::prelude::*;
use specter::config::range;
use specter::Gateway;

const KEY: &str = "spk_qa_ranges000000000000000000000000000";

/// One runtime and one upstream for all cases.
fn runtime() -> &'static (tokio::runtime::Runtime, Upstream) {
    static RT: OnceLock<(tokio::runtime::Runtime, Upstream)> = OnceLock::new();
    RT.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let up = rt.block_on(Upstream::start("qa"));
        (rt, up)
    })
}

/// Durations at and just inside a range's bounds, or anywhere inside it.
fn inside((min, max): (Duration, Duration)) -> impl Strategy<Value = Duration> {
    let step = Duration::from_millis(1);
    prop_oneof![
        Just(min),
        Just(min + step),
        Just(max),
        Just(max - step),
        (min.as_millis() as u64..=max.as_millis() as u64).prop_map(Duration::from_millis),
    ]
}

/// Durations just outside a range's bounds, and far outside it.
fn outside((min, max): (Duration, Duration)) -> impl Strategy<Value = Duration> {
    let below = min.saturating_sub(Duration::from_millis(1));
    prop_oneof![
        Just(if below.is_zero() {
            Duration::from_nanos(1)
        } else {
            below
        }),
        Just(max + Duration::from_secs(1)),
        Just(Duration::from_secs(585 * 365 * 86_400)),
    ]
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![Just(1u64), Just(2), Just(u32::MAX as u64), 1u64..100_000]
}

#[derive(Debug, Clone)]
struct Values {
    /// In the order of [`RANGES`].
    durations: [Duration; 8],
    requests: u64,
    burst: u64,
    max_body: u64,
}

/// header_read_timeout, idle_timeout, shutdown_grace, body_read_timeout, body_timeout,
/// connect_timeout, request_timeout, rate_limit.per_key.per.
const RANGES: [(Duration, Duration); 8] = [
    range::HEADER_READ_TIMEOUT,
    range::IDLE_TIMEOUT,
    range::SHUTDOWN_GRACE,
    range::BODY_READ_TIMEOUT,
    range::BODY_TIMEOUT,
    range::CONNECT_TIMEOUT,
    range::REQUEST_TIMEOUT,
    range::RATE_PER,
];

impl Values {
    fn in_range(&self) -> bool {
        self.durations
            .iter()
            .zip(RANGES)
            .all(|(d, (min, max))| min <= *d && *d <= max)
            && self.requests <= u32::MAX as u64
            && self.burst <= u32::MAX as u64
            && self.max_body <= range::MAX_BODY
    }
}

/// Values inside every range; in half the cases one of them is then moved outside.
fn values() -> impl Strategy<Value = Values> {
    let durations: Vec<_> = RANGES.iter().map(|r| inside(*r)).collect();
    let faults: Vec<_> = RANGES.iter().map(|r| outside(*r)).collect();
    (
        durations,
        count(),
        count(),
        prop_oneof![Just(1u64), Just(range::MAX_BODY), 1u64..(1 << 30)],
        proptest::option::of((0..11usize, faults)),
    )
        .prop_map(|(durations, requests, burst, max_body, fault)| {
            let mut v = Values {
                durations: durations.try_into().expect("one per range"),
                requests,
                burst,
                max_body,
            };
            match fault {
                Some((i @ 0..=7, outside)) => v.durations[i] = outside[i],
                Some((8, _)) => v.requests = u32::MAX as u64 + 1,
                Some((9, _)) => v.burst = u32::MAX as u64 + 1,
                Some((_, _)) => v.max_body = range::MAX_BODY + 1,
                None => {}
            }
            v
        })
}

fn text(v: &Values, upstream: &Upstream) -> String {
    let d: Vec<String> = v
        .durations
        .iter()
        .map(|d| humantime::format_duration(*d).to_string())
        .collect();
    format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\n\n[limits]\nheader_read_timeout = \"{}\"\n\
         idle_timeout = \"{}\"\nshutdown_grace = \"{}\"\nbody_read_timeout = \"{}\"\n\
         body_timeout = \"{}\"\n\n[environments.qa]\nupstream = \"{}\"\n\
         connect_timeout = \"{}\"\nrequest_timeout = \"{}\"\n\
         [environments.qa.rate_limit]\nper_key = {{ requests = {}, per = \"{}\", burst = {} }}\n\
         [environments.qa.policy]\nmax_body = \"{} B\"\n{}",
        d[0],
        d[1],
        d[2],
        d[3],
        d[4],
        upstream.url(),
        d[5],
        d[6],
        v.requests,
        d[7],
        v.burst,
        v.max_body,
        key_block("qa", "svc", KEY),
    )
}

/// Serves one POST with a body through a gateway built from `config`.
async fn serve_one(config: specter::config::Config) -> u16 {
    let gateway = Gateway::start(config)
        .await
        .expect("an accepted config starts");
    let url = format!("http://{}/v1/x", gateway.http_addr().unwrap());
    let req = Request::post(url)
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::from_static(b"0123456789")))
        .unwrap();
    let answer = send(&client(), req).await;
    gateway.shutdown().await;
    answer.status.as_u16()
}

/// The refusals of values inside the ranges, both documented: a rate finer than one
/// request per nanosecond, and a bucket that would take over 100 years to refill.
fn rate_refusal(message: &str) -> bool {
    message.contains("finer than one per nanosecond") || message.contains("to refill")
}

/// The corners: every value at its lowest, then every value at its highest, serve.
#[test]
fn every_bound_itself_serves() {
    let (rt, upstream) = runtime();
    let mut served = 0;
    for pick in [|r: (Duration, Duration)| r.0, |r: (Duration, Duration)| r.1] {
        for (requests, burst) in [(1, 1), (u32::MAX as u64, u32::MAX as u64)] {
            let v = Values {
                durations: RANGES.map(pick),
                requests,
                burst,
                max_body: if requests == 1 { 1 } else { range::MAX_BODY },
            };
            let text = text(&v, upstream);
            match specter::config::parse(&text, Path::new("ranges.toml")) {
                Ok(loaded) => {
                    let status = rt.block_on(serve_one(loaded.config));
                    // A one-byte max_body refuses the ten-byte body; a 1ms request_timeout may expire.
                    assert!([200, 413, 429, 504].contains(&status), "{status} for {v:?}");
                    served += 1;
                }
                Err(e) => assert!(rate_refusal(&e.to_string()), "{v:?}: {e}"),
            }
        }
    }
    // The lowest and the highest bounds with a one-request bucket both start and serve;
    // a test whose every corner were refused would check nothing.
    assert!(served >= 2, "only {served} corners started");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn any_config_check_accepts_serves_a_request(v in values()) {
        let (rt, upstream) = runtime();
        let text = text(&v, upstream);
        match specter::config::parse(&text, Path::new("ranges.toml")) {
            Ok(loaded) => {
                prop_assert!(v.in_range(), "out-of-range values accepted: {:?}", v);
                let status = rt.block_on(serve_one(loaded.config));
                prop_assert!([200, 413, 429, 504].contains(&status), "status {} for {:?}", status, v);
            }
            Err(e) => {
                // Refused: a value out of its documented range, or a bucket deeper than
                // the limiter's arithmetic; the error says where.
                let message = e.to_string();
                prop_assert!(
                    !v.in_range() || rate_refusal(&message),
                    "refused in-range values {:?}: {}", v, message
                );
                prop_assert!(message.contains("ranges.toml:"), "{}", message);
            }
        }
    }
}
