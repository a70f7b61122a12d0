//! What operators see and what must never leak: Prometheus metrics (exact deltas), the
//! admin API (`/config`, `/keys`, health), the JSON access log of the real binary,
//! request ids, and the key lifecycle (`specter check` warnings, staged keys). The
//! secrets rule is checked end to end: no API key, no key hash, in any log line,
//! metric or admin answer.

mod common;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::Full;
use prometheus_parse::{LineInfo, Scrape, Value as Metric};
use rand::distr::{Alphanumeric, SampleString};
use serde_json::Value;
use specter::config::{hex, sha256};
use specter::Gateway;
use tempfile::TempDir;

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);
const ENVS: [&str; 3] = ["development", "qa", "production"];

// ---------------------------------------------------------------------------------
// Helpers

fn random_key(env: &str) -> String {
    format!(
        "spk_{env}_{}",
        Alphanumeric.sample_string(&mut rand::rng(), 32)
    )
}

fn hash_hex(key: &str) -> String {
    hex(&sha256(key.as_bytes()))
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

async fn admin_get(c: &TestClient, admin: SocketAddr, path: &str) -> Answer {
    get(c, &format!("http://{admin}{path}"), &[]).await
}

async fn admin_json(c: &TestClient, admin: SocketAddr, path: &str) -> Value {
    let answer = admin_get(c, admin, path).await;
    assert_eq!(answer.status, 200, "{path}: {}", answer.text());
    assert_eq!(answer.headers["content-type"], "application/json", "{path}");
    answer.json()
}

/// A gateway started from a config file in its own temporary folder, so the test can
/// rewrite the file and call `reload_now` on it.
struct FileGateway {
    _dir: TempDir,
    path: PathBuf,
    gateway: Gateway,
    http: SocketAddr,
    admin: SocketAddr,
}

impl FileGateway {
    async fn start(body: &str) -> FileGateway {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("specter.toml");
        std::fs::write(&path, with_listen(body)).unwrap();
        let loaded = specter::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let gateway = Gateway::start(loaded.config).await.expect("gateway starts");
        FileGateway {
            http: gateway.http_addr().unwrap(),
            admin: gateway.admin_addr().unwrap(),
            _dir: dir,
            path,
            gateway,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Replaces the file and reloads it the way the watcher does.
    fn reload(
        &self,
        text: &str,
    ) -> Result<specter::reload::ReloadSummary, specter::reload::ReloadError> {
        std::fs::write(&self.path, text).unwrap();
        specter::reload::reload_now(self.gateway.shared(), &self.path)
    }
}

fn with_listen(body: &str) -> String {
    format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{body}")
}

// ---------------------------------------------------------------------------------
// Metrics helpers

/// Parses the exposition with prometheus-parse, after checking that every line is one
/// it understands (it silently skips lines it cannot read). The only line it does not
/// know is OpenMetrics' closing `# EOF`, which it ignores harmlessly.
fn parse_metrics(text: &str) -> Scrape {
    assert_eq!(
        text.lines().last(),
        Some("# EOF"),
        "OpenMetrics text ends with # EOF"
    );
    for line in text
        .lines()
        .filter(|l| *l != "# EOF" && !l.starts_with("# UNIT"))
    {
        assert_ne!(
            LineInfo::parse(line),
            LineInfo::Ignored,
            "prometheus-parse cannot read {line:?}"
        );
    }
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("the exposition parses")
}

/// Names of the declared metric families (`# TYPE` lines).
fn families(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| match LineInfo::parse(l) {
            LineInfo::Type {
                metric_name,
                metric_alias,
                ..
            } => Some(metric_alias.unwrap_or(metric_name)),
            _ => None,
        })
        .collect()
}

/// The value of the sample `name` whose labels are exactly `labels`; 0 when absent.
fn sample(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        })
        .map(|s| match &s.value {
            Metric::Counter(v) | Metric::Gauge(v) | Metric::Untyped(v) => *v,
            other => panic!("{name}: unexpected value {other:?}"),
        })
        .collect();
    assert!(found.len() <= 1, "{name}{labels:?} appears twice");
    found.first().copied().unwrap_or(0.0)
}

/// The `+Inf` bucket of a histogram series; 0 when absent.
fn histogram_inf(scrape: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .find_map(|s| match &s.value {
            Metric::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count),
            _ => None,
        })
        .unwrap_or(0.0)
}

async fn scrape(c: &TestClient, admin: SocketAddr) -> (String, Scrape) {
    let answer = admin_get(c, admin, "/metrics").await;
    assert_eq!(answer.status, 200);
    let text = answer.text();
    let parsed = parse_metrics(&text);
    (text, parsed)
}

// ---------------------------------------------------------------------------------
// 1. Metrics

#[tokio::test]
async fn metrics_count_every_outcome_exactly() {
    const A1: &str = "spk_alpha_metricskeyone000000000000000";
    const A2: &str = "spk_alpha_metricskeytwo000000000000000";
    const B1: &str = "spk_beta_metricskeyone0000000000000000";
    let up = Upstream::start("alpha").await;
    let refused = free_addr();
    let config = format!(
        "[environments.alpha]\nupstream = \"{}\"\n\
         [environments.alpha.rate_limit]\nper_key = {{ requests = 1, per = \"1m\", burst = 2 }}\n\
         {}{}\n\
         [environments.beta]\nupstream = \"http://{refused}\"\n{}",
        up.url(),
        key_block("alpha", "alpha-one", A1),
        key_block("alpha", "alpha-two", A2),
        key_block("beta", "beta-one", B1),
    );
    let gw = TestGateway::start(&config).await;
    let admin = gw.admin.unwrap();
    let c = client();
    let (_, before) = scrape(&c, admin).await;
    let url = gw.url("/v1/m");

    // alpha: 2 + 2 admitted (burst 2 per key), then 3 refused for A1.
    for key in [A1, A1, A2, A2] {
        assert_eq!(get(&c, &url, &[("x-api-key", key)]).await.status, 200);
    }
    for _ in 0..3 {
        let answer = get(&c, &url, &[("x-api-key", A1)]).await;
        answer.assert_error(429, "rate_limited");
    }
    // beta: the upstream refuses; the third consecutive failure ejects it, so the
    // fourth request finds no healthy upstream.
    for _ in 0..3 {
        let answer = get(&c, &url, &[("x-api-key", B1)]).await;
        answer.assert_error(502, "upstream_unavailable");
    }
    get(&c, &url, &[("x-api-key", B1)])
        .await
        .assert_error(503, "no_healthy_upstream");
    // No key, unknown key: no environment.
    for headers in [
        vec![],
        vec![],
        vec![("x-api-key", "spk_alpha_unknown000000000000000000000")],
        vec![(
            "authorization",
            "Bearer spk_beta_unknown0000000000000000000",
        )],
    ] {
        let answer = get(&c, &url, &headers).await;
        assert_eq!(answer.status, 401, "{}", answer.text());
    }
    assert_eq!(up.count(), 4);

    let (text, after) = scrape(&c, admin).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    let requests = "specter_requests_total";
    for (env, status, n) in [
        ("alpha", "200", 4.0),
        ("alpha", "429", 3.0),
        ("beta", "502", 3.0),
        ("beta", "503", 1.0),
        ("none", "401", 4.0),
    ] {
        assert_eq!(
            delta(requests, &[("environment", env), ("status", status)]),
            n,
            "{requests}{{environment={env},status={status}}}\n{text}"
        );
    }
    let all_requests: f64 = after
        .samples
        .iter()
        .filter(|s| s.metric == requests)
        .map(|s| match s.value {
            Metric::Counter(v) | Metric::Untyped(v) => v,
            _ => 0.0,
        })
        .sum();
    assert_eq!(all_requests, 15.0, "no other series counted\n{text}");

    let limited = "specter_rate_limited_total";
    assert_eq!(
        delta(limited, &[("environment", "alpha"), ("scope", "per_key")]),
        3.0
    );
    assert_eq!(
        delta(limited, &[("environment", "alpha"), ("scope", "total")]),
        0.0
    );
    let upstream_errors = "specter_upstream_errors_total";
    assert_eq!(
        delta(
            upstream_errors,
            &[("environment", "beta"), ("kind", "connect")]
        ),
        3.0,
        "{text}"
    );
    assert_eq!(
        delta(
            upstream_errors,
            &[("environment", "alpha"), ("kind", "connect")]
        ),
        0.0
    );

    let duration = "specter_request_duration_seconds";
    for (env, n) in [("alpha", 7.0), ("beta", 4.0), ("none", 4.0)] {
        let labels = [("environment", env)];
        assert_eq!(
            delta(&format!("{duration}_count"), &labels),
            n,
            "{duration}_count{{environment={env}}}\n{text}"
        );
        assert_eq!(histogram_inf(&after, duration, &labels), n, "+Inf bucket");
        assert!(sample(&after, &format!("{duration}_sum"), &labels) > 0.0);
    }

    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "specter_active_connections"
                && matches!(s.value, Metric::Gauge(v) if v >= 0.0)),
        "specter_active_connections\n{text}"
    );
    assert_eq!(sample(&after, "specter_config_version", &[]), 1.0);
    assert!(
        after
            .samples
            .iter()
            .any(|s| s.metric == "specter_build_info" && s.labels.get("version").is_some()),
        "specter_build_info\n{text}"
    );
    let declared = families(&text);
    for family in [
        "specter_requests",
        "specter_request_duration_seconds",
        "specter_upstream_errors",
        "specter_rate_limited",
        "specter_active_connections",
        "specter_config_version",
        "specter_build_info",
    ] {
        assert!(declared.contains(family), "{family} not declared\n{text}");
    }
}

/// Every family the design lists is exposed from the start, its fixed label values at
/// zero: a series that only appears with its first increment hides that increment
/// from `increase()` and `rate()`, so the first failed reload would never alert.
#[tokio::test]
async fn reload_counters_are_exposed_before_the_first_reload() {
    let up = Upstream::start("dev").await;
    let gw = TestGateway::start(&format!(
        "[environments.development]\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let (text, metrics) = scrape(&client(), gw.admin.unwrap()).await;
    assert!(
        families(&text).contains("specter_config_reloads"),
        "specter_config_reloads_total is missing until the first reload:\n{text}"
    );
    for result in ["success", "failure"] {
        let found = metrics.samples.iter().any(|s| {
            s.metric == "specter_config_reloads_total" && s.labels.get("result") == Some(result)
        });
        assert!(
            found,
            "specter_config_reloads_total{{result=\"{result}\"}} 0 expected:\n{text}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 2. /config

fn config_text(up: [&Upstream; 3], keys: &[(&str, &str, &str)]) -> String {
    let mut text = format!(
        "[environments.development]\nupstreams = [\"{}\", \"{}\"]\nhosts = [\"dev.example.test\", \"localhost\"]\n\
         [environments.development.rate_limit]\n\
         per_key = {{ requests = 10, per = \"1s\", burst = 20 }}\n\
         total = {{ requests = 100, per = \"1m\", burst = 200 }}\n\n\
         [environments.production]\nupstream = \"{}\"\n\n",
        up[0].url(),
        up[1].url(),
        up[2].url()
    );
    for (env, id, key) in keys {
        text.push_str(&key_block(env, id, key));
    }
    text
}

fn environment<'v>(config: &'v Value, name: &str) -> &'v Value {
    config["environments"]
        .as_array()
        .unwrap_or_else(|| panic!("no environments in {config}"))
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no environment {name} in {config}"))
}

#[tokio::test]
async fn config_view_reports_versions_errors_and_never_secrets() {
    let ups = [
        Upstream::start("d1").await,
        Upstream::start("d2").await,
        Upstream::start("p").await,
    ];
    let ups = [&ups[0], &ups[1], &ups[2]];
    let keys: Vec<(&str, &str, String)> = vec![
        ("development", "dev-svc", random_key("development")),
        ("development", "dev-ci", random_key("development")),
        ("production", "prod-billing", random_key("production")),
    ];
    let key_refs: Vec<(&str, &str, &str)> =
        keys.iter().map(|(e, i, k)| (*e, *i, k.as_str())).collect();
    let fx = FileGateway::start(&config_text(ups, &key_refs)).await;
    let c = client();
    let config = admin_json(&c, fx.admin, "/config").await;

    let sha = config["sha256"].as_str().expect("sha256");
    assert_eq!(sha.len(), 64, "{config}");
    assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()), "{config}");
    assert_eq!(sha, hash_hex(&std::fs::read_to_string(&fx.path).unwrap()));
    assert_eq!(config["version"], 1);
    let loaded_at = config["loaded_at"].as_str().expect("loaded_at");
    humantime::parse_rfc3339(loaded_at).expect("loaded_at is RFC 3339");
    assert_eq!(config["last_reload_error"], Value::Null);

    let dev = environment(&config, "development");
    assert_eq!(
        dev["upstreams"],
        serde_json::json!([ups[0].url(), ups[1].url()])
    );
    assert_eq!(
        dev["hosts"],
        serde_json::json!(["dev.example.test", "localhost"])
    );
    let per_key = &dev["rate_limit"]["per_key"];
    assert_eq!(per_key["requests"], 10);
    assert_eq!(per_key["per"], "1s");
    assert_eq!(per_key["burst"], 20);
    let total = &dev["rate_limit"]["total"];
    assert_eq!(
        (&total["requests"], &total["per"], &total["burst"]),
        (&100.into(), &"1m".into(), &200.into())
    );
    assert_eq!(dev["key_ids"], serde_json::json!(["dev-svc", "dev-ci"]));
    let prod = environment(&config, "production");
    assert_eq!(prod["upstreams"], serde_json::json!([ups[2].url()]));
    assert_eq!(prod["hosts"], serde_json::json!([]));
    assert_eq!(prod["rate_limit"]["per_key"], Value::Null);
    assert_eq!(prod["key_ids"], serde_json::json!(["prod-billing"]));

    // A broken file: rejected whole, the running config stays, the error is reported.
    let broken = "[environments.development\nupstream = \"http://127.0.0.1:1\"\n";
    assert!(fx.reload(broken).is_err());
    let config = admin_json(&c, fx.admin, "/config").await;
    assert_eq!(config["version"], 1, "{config}");
    assert_eq!(config["sha256"], sha);
    let failure = &config["last_reload_error"];
    let error = failure["error"]
        .as_str()
        .unwrap_or_else(|| panic!("last_reload_error has no error text: {config}"));
    let (line, col) = config_location(error);
    assert!(line >= 1 && col >= 1, "{error}");
    assert!(failure["at"].is_string(), "{config}");
    assert_eq!(
        get(&c, &fx.url("/"), &[("x-api-key", &keys[2].2)])
            .await
            .status,
        200,
        "still serving the last good config"
    );

    // A good file: version 2, error cleared, the new key ids shown.
    let new_key = random_key("production");
    let mut good_keys = key_refs.clone();
    good_keys.push(("production", "prod-new", &new_key));
    let good = with_listen(&config_text(ups, &good_keys));
    fx.reload(&good).expect("good config reloads");
    let config = admin_json(&c, fx.admin, "/config").await;
    assert_eq!(config["version"], 2, "{config}");
    assert_eq!(config["last_reload_error"], Value::Null);
    assert_eq!(config["sha256"], hash_hex(&good));
    assert_eq!(
        environment(&config, "production")["key_ids"],
        serde_json::json!(["prod-billing", "prod-new"])
    );

    let (_, metrics) = scrape(&c, fx.admin).await;
    let reloads = "specter_config_reloads_total";
    assert_eq!(sample(&metrics, reloads, &[("result", "failure")]), 1.0);
    assert_eq!(sample(&metrics, reloads, &[("result", "success")]), 1.0);
    assert_eq!(sample(&metrics, "specter_config_version", &[]), 2.0);

    let text = admin_get(&c, fx.admin, "/config").await.text();
    let lower = text.to_lowercase();
    for key in keys.iter().map(|k| k.2.as_str()).chain([new_key.as_str()]) {
        assert!(!text.contains(key), "a key in /config: {text}");
        assert!(
            !lower.contains(&hash_hex(key)[..16]),
            "a key hash in /config: {text}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 3. /keys

#[tokio::test]
async fn keys_view_counts_usage_across_reloads() {
    let (dev, qa) = (Upstream::start("dev").await, Upstream::start("qa").await);
    let (a, b, c_key) = (
        random_key("development"),
        random_key("qa"),
        random_key("development"),
    );
    let envs = |keys: &str| {
        format!(
            "[environments.development]\nupstream = \"{}\"\n\n[environments.qa]\nupstream = \"{}\"\n\n{keys}",
            dev.url(),
            qa.url()
        )
    };
    let key_a = format!(
        "{}not_after = 2099-01-01T00:00:00Z\n",
        key_block("development", "client-a", &a)
    );
    let key_b = format!(
        "{}not_before = 2020-01-01T00:00:00Z\n",
        key_block("qa", "client-b", &b)
    );
    let fx = FileGateway::start(&envs(&format!("{key_a}{key_b}"))).await;
    let c = client();
    let started = SystemTime::now();
    for _ in 0..3 {
        assert_eq!(
            get(&c, &fx.url("/k"), &[("x-api-key", &a)]).await.status,
            200
        );
    }
    for _ in 0..5 {
        let bearer = format!("Bearer {b}");
        assert_eq!(
            get(&c, &fx.url("/k"), &[("authorization", &bearer)])
                .await
                .status,
            200
        );
    }
    for unknown in [random_key("development"), random_key("qa")] {
        get(&c, &fx.url("/k"), &[("x-api-key", &unknown)])
            .await
            .assert_error(401, "invalid_api_key");
    }

    let rows = admin_json(&c, fx.admin, "/keys").await;
    let rows = rows.as_array().expect("a list").clone();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let fields: HashSet<&str> = [
        "environment",
        "key_id",
        "not_before",
        "not_after",
        "requests",
        "last_seen",
    ]
    .into();
    for row in &rows {
        let object = row.as_object().unwrap();
        let keys: HashSet<&str> = object.keys().map(|k| k.as_str()).collect();
        assert!(keys.is_superset(&fields), "missing fields: {row}");
        for (name, value) in object {
            let looks_like_hash = value
                .as_str()
                .is_some_and(|v| v.len() >= 32 && v.bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                !name.contains("sha") && !name.contains("hash") && !looks_like_hash,
                "a hash in /keys: {row}"
            );
        }
    }
    let row = |rows: &[Value], id: &str| rows.iter().find(|r| r["key_id"] == id).cloned();
    let ra = row(&rows, "client-a").expect("client-a listed");
    let rb = row(&rows, "client-b").expect("client-b listed");
    assert_eq!(ra["environment"], "development");
    assert_eq!(ra["requests"], 3);
    assert_eq!(ra["not_before"], Value::Null);
    assert_eq!(ra["not_after"], "2099-01-01T00:00:00Z");
    assert_eq!(rb["environment"], "qa");
    assert_eq!(rb["requests"], 5);
    assert_eq!(rb["not_before"], "2020-01-01T00:00:00Z");
    assert_eq!(rb["not_after"], Value::Null);
    for r in [&ra, &rb] {
        let seen = r["last_seen"].as_str().unwrap_or_else(|| panic!("{r}"));
        let seen = humantime::parse_rfc3339(seen).expect("RFC 3339");
        // Second precision: allow the truncation below the start.
        assert!(seen + Duration::from_secs(1) >= started, "{r}");
        assert!(seen <= SystemTime::now(), "{r}");
    }

    // Keep A, drop B, add C: A's usage survives, B is gone, C starts at zero.
    let key_c = key_block("development", "client-c", &c_key);
    fx.reload(&with_listen(&envs(&format!("{key_a}{key_c}"))))
        .expect("reload");
    let after = admin_json(&c, fx.admin, "/keys").await;
    let after = after.as_array().unwrap().clone();
    assert_eq!(after.len(), 2, "{after:?}");
    let ra2 = row(&after, "client-a").expect("client-a kept");
    assert_eq!(ra2["requests"], 3);
    assert_eq!(ra2["last_seen"], ra["last_seen"]);
    assert!(row(&after, "client-b").is_none(), "client-b removed");
    let rc = row(&after, "client-c").expect("client-c added");
    assert_eq!(rc["requests"], 0);
    assert_eq!(rc["last_seen"], Value::Null);
    assert_eq!(rc["environment"], "development");

    let text = admin_get(&c, fx.admin, "/keys").await.text().to_lowercase();
    for key in [&a, &b, &c_key] {
        assert!(!text.contains(&key.to_lowercase()), "a key in /keys");
        assert!(!text.contains(&hash_hex(key)[..16]), "a hash in /keys");
    }

    // `specter keys usage` reads the same rows: one line per key, counts included.
    let admin = fx.admin.to_string();
    let run = tokio::task::spawn_blocking(move || {
        run_specter(&["keys", "usage", "--admin", &admin], None)
    })
    .await
    .unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    let line = |id: &str| {
        run.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no line for {id}:\n{}", run.stdout))
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
    };
    assert_eq!(line("client-a"), ["development", "client-a", "3"]);
    assert_eq!(line("client-c"), ["development", "client-c", "0"]);
    assert!(
        run.stdout.contains("2099-01-01T00:00:00Z"),
        "{}",
        run.stdout
    );
}

// ---------------------------------------------------------------------------------
// 4. Health, readiness, unknown paths, methods

#[tokio::test]
async fn admin_health_readiness_and_errors() {
    let up = Upstream::start("dev").await;
    let gw = TestGateway::start(&format!(
        "[environments.development]\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let (c, admin) = (client(), gw.admin.unwrap());
    assert_eq!(admin_get(&c, admin, "/healthz").await.status, 200);
    assert_eq!(admin_get(&c, admin, "/readyz").await.status, 200);
    // `/` is the status page (tests/status_page.rs).
    for path in ["/nope", "/metrics/extra", "/status.json/x"] {
        let answer = admin_get(&c, admin, path).await;
        assert_eq!(answer.status, 404, "{path}");
        assert_eq!(answer.headers["content-type"], "application/json");
        assert_eq!(answer.json()["error"], "not_found");
    }
    for path in ["/healthz", "/config", "/metrics"] {
        let req = Request::post(format!("http://{admin}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = send(&c, req).await;
        assert_eq!(answer.status, 405, "POST {path}");
        assert_eq!(answer.json()["error"], "method_not_allowed");
        assert_eq!(answer.headers["allow"], "GET, HEAD");
    }
    // HEAD answers wherever GET does: same status and length, no body.
    for path in ["/healthz", "/readyz", "/config", "/metrics", "/keys"] {
        let req = Request::head(format!("http://{admin}{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let answer = send(&c, req).await;
        assert_eq!(answer.status, 200, "HEAD {path}");
        assert!(answer.body.is_empty(), "HEAD {path} sent a body");
        assert!(answer.headers.contains_key("content-length"), "HEAD {path}");
    }
}

/// The connection gauge follows connections as they open and close.
#[tokio::test]
async fn active_connections_gauge_follows_open_connections() {
    let up = Upstream::start("dev").await;
    let gw = TestGateway::start(&format!(
        "[environments.development]\nupstream = \"{}\"\n",
        up.url()
    ))
    .await;
    let (c, admin) = (client(), gw.admin.unwrap());
    let gauge = |c: TestClient| async move {
        let (_, m) = scrape(&c, admin).await;
        sample(&m, "specter_active_connections", &[("listener", "http")])
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(tokio::net::TcpStream::connect(gw.http).await.unwrap());
    }
    let deadline = Instant::now() + DEADLINE;
    while gauge(c.clone()).await != 3.0 {
        assert!(Instant::now() < deadline, "gauge never reached 3");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(open);
    while gauge(c.clone()).await != 0.0 {
        assert!(Instant::now() < deadline, "gauge never went back to 0");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------
// The real binary, logging JSON to a file

struct Running {
    child: Child,
    http: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
}

/// `specter run --config F --log-format json`, stderr into a file beside the config.
async fn run_binary(dir: &Path, body: &str, rust_log: Option<&str>) -> Running {
    on_free_ports(|http, admin| try_run_binary(dir, body, rust_log, http, admin)).await
}

async fn try_run_binary(
    dir: &Path,
    body: &str,
    rust_log: Option<&str>,
    http: SocketAddr,
    admin: SocketAddr,
) -> Result<Running, String> {
    let text = format!(
        "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n[limits]\nshutdown_grace = \"2s\"\n\n{body}"
    );
    let path = dir.join("specter.toml");
    std::fs::write(&path, text).unwrap();
    let log = dir.join("specter.log");
    let child = spawn_json_logged(&path, &log, rust_log, admin, DEADLINE).await?;
    Ok(Running {
        child,
        http,
        admin,
        log,
    })
}

impl Running {
    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// SIGTERM, wait for exit 0, and return the whole log.
    async fn stop(mut self) -> String {
        let pid = libc::pid_t::try_from(self.child.0.id()).unwrap();
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                break status;
            }
            assert!(Instant::now() < deadline, "specter ignores SIGTERM");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let log = std::fs::read_to_string(&self.log).unwrap();
        assert_eq!(status.code(), Some(0), "log:\n{log}");
        log
    }
}

/// Every log line as JSON (the json format writes nothing else).
fn json_lines(log: &str) -> Vec<Value> {
    log.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect()
}

fn access_lines(lines: &[Value]) -> Vec<&Value> {
    lines
        .iter()
        .filter(|l| l["target"] == "specter::access")
        .collect()
}

// ---------------------------------------------------------------------------------
// 5. No secrets anywhere

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_or_hash_in_logs_metrics_or_admin_answers() {
    let ups = [
        Upstream::start("development").await,
        Upstream::start("qa").await,
        Upstream::start("production").await,
    ];
    let keys: Vec<(usize, String)> = (0..50).map(|i| (i % 3, random_key(ENVS[i % 3]))).collect();
    let mut body = String::new();
    for (e, up) in ups.iter().enumerate() {
        body.push_str(&format!(
            "[environments.{}]\nupstream = \"{}\"\n",
            ENVS[e],
            up.url()
        ));
        for (i, (_, key)) in keys.iter().enumerate().filter(|(_, (k, _))| *k == e) {
            body.push_str(&key_block(ENVS[e], &format!("{}-svc-{i}", ENVS[e]), key));
        }
        body.push('\n');
    }
    let invalid: Vec<String> = vec![
        random_key("development"),
        random_key("qa"),
        random_key("production"),
        format!(
            "not-a-key-{}",
            Alphanumeric.sample_string(&mut rand::rng(), 24)
        ),
    ];
    let dir = TempDir::new().unwrap();
    let gw = run_binary(dir.path(), &body, Some("debug")).await;
    let c = client();
    let mut sent = 0usize;
    for (i, (e, key)) in keys.iter().enumerate() {
        let bearer = format!("Bearer {key}");
        let query = match i % 3 {
            0 => format!("?api_key={key}"),
            1 => format!("?token={key}&page=2"),
            _ => String::new(),
        };
        let via_header = get(
            &c,
            &gw.url(&format!("/v1/items/{i}")),
            &[("x-api-key", key)],
        )
        .await;
        let via_bearer = get(
            &c,
            &gw.url(&format!("/v1/items/{i}{query}")),
            &[("authorization", &bearer)],
        )
        .await;
        for answer in [via_header, via_bearer] {
            assert_eq!(answer.status, 200, "key {i}: {}", answer.text());
            assert_eq!(answer.text(), ENVS[*e]);
        }
        sent += 2;
    }
    for (i, bad) in invalid.iter().enumerate() {
        let bearer = format!("Bearer {bad}");
        let cases = [
            (
                format!("/v1/bad/{i}"),
                vec![("x-api-key", bad.as_str())],
                "invalid_api_key",
            ),
            (
                format!("/v1/bad/{i}?token={bad}"),
                vec![("authorization", bearer.as_str())],
                "invalid_api_key",
            ),
            (
                format!("/v1/bad/{i}?api_key={bad}"),
                vec![],
                "missing_api_key",
            ),
        ];
        for (path, headers, code) in cases {
            get(&c, &gw.url(&path), &headers)
                .await
                .assert_error(401, code);
            sent += 1;
        }
    }
    let mut admin_text = String::new();
    for path in ["/metrics", "/config", "/keys"] {
        let answer = admin_get(&c, gw.admin, path).await;
        assert_eq!(answer.status, 200, "{path}");
        admin_text.push_str(&answer.text());
        admin_text.push('\n');
    }
    drop(c);
    let log = gw.stop().await;

    // The search is meaningful: the log has every access line, and the admin answers
    // carry the data the keys produced.
    let lines = json_lines(&log);
    let access = access_lines(&lines);
    assert_eq!(access.len(), sent, "one access line per request");
    assert!(admin_text.contains("production-svc-2"), "{admin_text}");
    assert!(
        lines.iter().any(|l| l["level"] == "DEBUG"),
        "RUST_LOG=debug is in force"
    );

    let haystacks = [("log", &log), ("admin answers", &admin_text)];
    for (what, text) in haystacks {
        let lower = text.to_lowercase();
        for secret in keys.iter().map(|(_, k)| k).chain(&invalid) {
            if let Some(line) = text.lines().find(|l| l.contains(secret.as_str())) {
                panic!("an API key in the {what}: {line}");
            }
            let hash = &hash_hex(secret)[..16];
            if let Some(line) = lower.lines().find(|l| l.contains(hash)) {
                panic!("a key hash in the {what}: {line}");
            }
        }
    }
    // The access log's path is the normalised path, never the query string.
    for line in &access {
        let path = line["path"].as_str().unwrap_or_else(|| panic!("{line}"));
        assert!(
            path.starts_with("/v1/") && !path.contains('?'),
            "query in the logged path: {line}"
        );
    }
}

// ---------------------------------------------------------------------------------
// 6. Access log format

/// The binary in front of a recording upstream, with one development key (`svc`).
async fn development_with_one_key(dir: &Path) -> (Upstream, String, Running) {
    let up = Upstream::start("development").await;
    let key = random_key("development");
    let body = format!(
        "[environments.development]\nupstream = \"{}\"\n{}",
        up.url(),
        key_block("development", "svc", &key)
    );
    let gw = run_binary(dir, &body, None).await;
    (up, key, gw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_line_counts_the_request_body_sent_upstream() {
    let dir = TempDir::new().unwrap();
    let (_up, key, gw) = development_with_one_key(dir.path()).await;
    let c = client();
    for (id, sent) in [("post-5", &b"hello"[..]), ("post-0", &b""[..])] {
        let req = Request::post(gw.url("/v1/thing"))
            .header("x-api-key", key.as_str())
            .header("x-request-id", id)
            .body(Full::new(Bytes::from_static(sent)))
            .unwrap();
        assert_eq!(send(&c, req).await.status, 200, "{id}");
    }
    drop(c);
    let log = gw.stop().await;
    let lines = json_lines(&log);
    for (id, bytes_in) in [("post-5", 5), ("post-0", 0)] {
        let line = access_lines(&lines)
            .into_iter()
            .find(|l| l["request_id"] == id)
            .unwrap_or_else(|| panic!("no access line for {id}; log:\n{log}"));
        assert_eq!(line["bytes_in"], bytes_in, "{line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_access_log_has_one_line_per_request_with_every_field() {
    let dir = TempDir::new().unwrap();
    let (up, key, gw) = development_with_one_key(dir.path()).await;
    let c = client();
    let cases: [(&str, &str, Option<&str>, u16); 4] = [
        ("log-ok-get", "/v1/thing", Some(key.as_str()), 200),
        ("log-ok-query", "/v1/./a//b?q=1", Some(key.as_str()), 200),
        ("log-missing", "/v1/thing", None, 401),
        (
            "log-invalid",
            "/v1/thing",
            Some("spk_development_nope"),
            401,
        ),
    ];
    for (id, path, key, status) in cases {
        let mut headers = vec![("x-request-id", id)];
        if let Some(k) = key {
            headers.push(("x-api-key", k));
        }
        let answer = get(&c, &gw.url(path), &headers).await;
        assert_eq!(answer.status, status, "{id}: {}", answer.text());
        assert_eq!(answer.headers["x-request-id"], id);
    }
    drop(c);
    let log = gw.stop().await;
    let lines = json_lines(&log);
    let access = access_lines(&lines);
    assert_eq!(access.len(), cases.len(), "log:\n{log}");
    let by_id: HashMap<&str, Vec<&Value>> = access.iter().fold(HashMap::new(), |mut m, l| {
        m.entry(l["request_id"].as_str().expect("request_id"))
            .or_default()
            .push(l);
        m
    });
    let line = |id: &str| -> &Value {
        let found = by_id.get(id).map_or(&[][..], |v| v.as_slice());
        assert_eq!(
            found.len(),
            1,
            "exactly one access line for {id}; log:\n{log}"
        );
        found[0]
    };
    for l in &access {
        assert_eq!(l["level"], "INFO", "{l}");
        assert!(l["timestamp"].is_string(), "{l}");
        for field in [
            "request_id",
            "client_ip",
            "method",
            "path",
            "status",
            "environment",
            "key_id",
            "upstream",
            "upstream_status",
            "duration_ms",
            "bytes_in",
            "bytes_out",
            "completed",
            "error",
        ] {
            assert!(!l[field].is_null(), "no {field} at the top level: {l}");
        }
        assert_eq!(l["completed"], true, "{l}");
        assert_eq!(l["bytes_in"], 0, "GETs send no body: {l}");
        assert_eq!(l["client_ip"], "127.0.0.1");
        assert_eq!(l["method"], "GET");
        assert!(l["duration_ms"].as_f64().is_some_and(|d| d >= 0.0), "{l}");
        // Rounded to microseconds: at most three decimals.
        let text = l["duration_ms"].to_string();
        let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
        assert!(
            decimals <= 3,
            "duration_ms {text} is finer than a microsecond"
        );
    }
    let upstream = up.addr.to_string();
    for id in ["log-ok-get", "log-ok-query"] {
        let l = line(id);
        assert_eq!(l["status"], 200, "{l}");
        assert_eq!(l["environment"], "development");
        assert_eq!(l["key_id"], "svc");
        assert_eq!(l["upstream"], upstream.as_str());
        assert_eq!(l["upstream_status"], 200);
        assert_eq!(l["error"], "-");
        // The recording upstream answers its own name.
        assert_eq!(l["bytes_out"], "development".len(), "{l}");
    }
    assert_eq!(line("log-ok-get")["path"], "/v1/thing");
    assert_eq!(
        line("log-ok-query")["path"],
        "/v1/a/b",
        "normalised, no query"
    );
    for (id, code) in [
        ("log-missing", "missing_api_key"),
        ("log-invalid", "invalid_api_key"),
    ] {
        let l = line(id);
        assert_eq!(l["status"], 401, "{l}");
        assert_eq!(l["error"], code, "{l}");
        assert_eq!(l["path"], "/v1/thing");
        assert_eq!(l["environment"], "-");
        assert_eq!(l["key_id"], "-");
        assert_eq!(l["upstream"], "-");
        assert_eq!(l["upstream_status"], 0);
    }
}

// ---------------------------------------------------------------------------------
// 7. Request ids

fn header_in_raw<'a>(response: &'a str, name: &str) -> Option<&'a str> {
    let head = response.split("\r\n\r\n").next()?;
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_are_kept_when_valid_and_unique_when_generated() {
    let up = Upstream::start("development").await;
    let key = random_key("development");
    let gw = TestGateway::start(&format!(
        "[environments.development]\nupstream = \"{}\"\n{}",
        up.url(),
        key_block("development", "svc", &key)
    ))
    .await;
    let c = client();
    let last_upstream_id = || {
        up.requests()
            .last()
            .expect("the upstream got the request")
            .headers["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned()
    };

    let kept = "client-trace-0001:abc/XYZ";
    let answer = get(
        &c,
        &gw.url("/ids"),
        &[("x-api-key", &key), ("x-request-id", kept)],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.headers["x-request-id"], kept);
    assert_eq!(last_upstream_id(), kept);

    let too_long = "a".repeat(201);
    let answer = get(
        &c,
        &gw.url("/ids"),
        &[("x-api-key", &key), ("x-request-id", &too_long)],
    )
    .await;
    assert_eq!(answer.status, 200);
    let replaced = answer.headers["x-request-id"].to_str().unwrap().to_owned();
    assert_ne!(replaced, too_long);
    assert!(!replaced.is_empty() && replaced.len() <= 128);
    assert_eq!(
        last_upstream_id(),
        replaced,
        "the replacement goes upstream"
    );

    let raw_request = format!(
        "GET /ids HTTP/1.1\r\nHost: {}\r\nx-api-key: {key}\r\nx-request-id: has a space\r\nConnection: close\r\n\r\n",
        gw.http
    );
    let response = raw(gw.http, raw_request.as_bytes(), DEADLINE).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let replaced = header_in_raw(&response, "x-request-id").expect("x-request-id");
    assert!(
        !replaced.contains(' ') && !replaced.is_empty(),
        "{replaced}"
    );
    assert_eq!(last_upstream_id(), replaced);

    // 10,000 generated ids over keep-alive connections from a few concurrent tasks.
    const TASKS: usize = 4;
    const PER_TASK: usize = 2500;
    let url = gw.url("/ids");
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::with_capacity(PER_TASK);
            for _ in 0..PER_TASK {
                let answer = get(&c, &url, &[]).await;
                assert_eq!(answer.status, 401);
                let id = answer.headers["x-request-id"].to_str().unwrap().to_owned();
                assert_eq!(answer.json()["request_id"], id.as_str(), "body and header");
                ids.push(id);
            }
            ids
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        let mut all = Vec::with_capacity(TASKS * PER_TASK);
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        all
    })
    .await
    .expect("10,000 requests in time");
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(unique.len(), TASKS * PER_TASK, "generated ids are unique");
}

// ---------------------------------------------------------------------------------
// 8. Key lifecycle

#[test]
fn check_warns_about_expiring_and_expired_keys_and_exits_zero() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("specter.toml");
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let (soon, old, fine) = (
        random_key("development"),
        random_key("development"),
        random_key("development"),
    );
    let text = format!(
        "[listen]\nhttp = \"127.0.0.1:8080\"\n\n\
         [environments.development]\nupstream = \"http://127.0.0.1:9000\"\n\
         {}not_after = {}\n{}not_after = {}\n{}not_after = {}\n",
        key_block("development", "expiring-soon", &soon),
        rfc3339(now + 3 * day),
        key_block("development", "long-expired", &old),
        rfc3339(now - day),
        key_block("development", "far-off", &fine),
        rfc3339(now + 365 * day),
    );
    std::fs::write(&path, &text).unwrap();
    let out = Command::new(specter_bin())
        .args(["check", "--config"])
        .arg(&path)
        .env_remove("RUST_LOG")
        .output()
        .expect("specter check runs");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let warning = |id: &str| {
        stderr
            .lines()
            .find(|l| l.contains("warning") && l.contains(&format!("\"{id}\"")))
            .unwrap_or_else(|| panic!("no warning about {id}:\n{stderr}"))
            .to_owned()
    };
    let expiring = warning("expiring-soon");
    assert!(expiring.contains("expires"), "{expiring}");
    let expired = warning("long-expired");
    assert!(expired.contains("expired"), "{expired}");
    for w in [&expiring, &expired] {
        let (line, col) = config_location(w);
        assert!(line > 1 && col >= 1, "{w}");
    }
    assert!(
        !stderr.contains("\"far-off\""),
        "no warning for a key a year away:\n{stderr}"
    );
    for key in [&soon, &old, &fine] {
        let hash = hash_hex(key);
        assert!(!stdout.contains(&hash[..16]) && !stderr.contains(&hash[..16]));
    }
}

#[tokio::test]
async fn staged_keys_are_refused_until_not_before() {
    let up = Upstream::start("development").await;
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let (staged, active, expired) = (
        random_key("development"),
        random_key("development"),
        random_key("development"),
    );
    let gw = TestGateway::start(&format!(
        "[environments.development]\nupstream = \"{}\"\n\
         {}not_before = {}\n{}not_before = {}\n{}not_after = {}\n",
        up.url(),
        key_block("development", "staged", &staged),
        rfc3339(now + hour),
        key_block("development", "active", &active),
        rfc3339(now - hour),
        key_block("development", "expired", &expired),
        rfc3339(now - hour),
    ))
    .await;
    let c = client();
    get(&c, &gw.url("/v1/x"), &[("x-api-key", &staged)])
        .await
        .assert_error(401, "invalid_api_key");
    let bearer = format!("Bearer {staged}");
    get(&c, &gw.url("/v1/x"), &[("authorization", &bearer)])
        .await
        .assert_error(401, "invalid_api_key");
    let answer = get(&c, &gw.url("/v1/x"), &[("x-api-key", &active)]).await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    get(&c, &gw.url("/v1/x"), &[("x-api-key", &expired)])
        .await
        .assert_error(401, "expired_api_key");
    assert_eq!(up.count(), 1, "only the active key reached the upstream");

    let keys = admin_json(&c, gw.admin.unwrap(), "/keys").await;
    let staged_row = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key_id"] == "staged")
        .unwrap_or_else(|| panic!("{keys}"));
    assert_eq!(staged_row["not_before"], rfc3339(now + hour).as_str());
}
