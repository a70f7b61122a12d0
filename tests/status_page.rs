//! The status page on the admin listener: `/` (self-contained HTML under a strict CSP)
//! and `/status.json` (shape, the per-second ring, upstream health, keys by state,
//! certificates, no secrets), and a real headless Chromium rendering it against a live
//! gateway under light traffic.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use common::*;
use serde_json::Value;

const QA_KEY: &str = "spk_qa_statuspagestatuspagestatuspage1";
const PROD_KEY: &str = "spk_production_statuspagestatuspagestatus";
const STAGED_KEY: &str = "spk_qa_stagedstagedstagedstagedstagedst";
const EXPIRING_KEY: &str = "spk_qa_expiringexpiringexpiringexpirin";
const EXPIRED_KEY: &str = "spk_qa_expiredexpiredexpiredexpiredexp";
/// Sent as a query string: it must never show up on the page.
const QUERY_SECRET: &str = "querysecretquerysecretquerysecret";

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let ck = rcgen::generate_simple_self_signed(vec!["status.test".to_owned()]).unwrap();
    let (cert, key) = (dir.join("status.pem"), dir.join("status.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// qa: a live upstream and a dead one, five keys in every state; production: a live
/// upstream and a tight per-key limit; one TLS certificate.
async fn gateway(dir: &Path, qa: &Upstream, prod: &Upstream) -> TestGateway {
    let (cert, key) = self_signed(dir);
    let now = SystemTime::now();
    let day = Duration::from_secs(86_400);
    let dead = free_addr();
    let mut text = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\n\
         [environments.qa]\nupstreams = [\"{}\", \"http://{dead}\"]\n\n\
         [environments.production]\nupstream = \"{}\"\n\
         [environments.production.rate_limit]\nper_key = {{ requests = 1, per = \"1m\", burst = 2 }}\n\n",
        cert.display(),
        key.display(),
        qa.url(),
        prod.url()
    );
    text.push_str(&key_block("qa", "qa-app", QA_KEY));
    text.push_str(&key_block("qa", "qa-next", STAGED_KEY));
    text.push_str(&format!("not_before = {}\n", rfc3339(now + 30 * day)));
    text.push_str(&key_block("qa", "qa-old", EXPIRING_KEY));
    text.push_str(&format!("not_after = {}\n", rfc3339(now + 3 * day)));
    text.push_str(&key_block("qa", "qa-gone", EXPIRED_KEY));
    text.push_str(&format!("not_after = {}\n", rfc3339(now - day)));
    text.push_str(&key_block("production", "prod-app", PROD_KEY));
    TestGateway::start(&text).await
}

/// Light traffic: qa requests (with a secret query string) until the dead upstream is
/// ejected, and production requests past its limit.
async fn traffic(gw: &TestGateway, c: &TestClient, rounds: usize) {
    for _ in 0..rounds {
        let url = gw.url(&format!("/v1/items?token={QUERY_SECRET}"));
        let a = get(c, &url, &[("x-api-key", QA_KEY)]).await;
        assert_eq!(a.status, 200, "{}", a.text());
        get(c, &gw.url("/p"), &[("x-api-key", PROD_KEY)]).await;
    }
}

async fn status_json(c: &TestClient, admin: std::net::SocketAddr) -> (String, Value) {
    let a = get(c, &format!("http://{admin}/status.json"), &[]).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    let text = a.text();
    let json = serde_json::from_str(&text).unwrap();
    (text, json)
}

fn env<'v>(status: &'v Value, name: &str) -> &'v Value {
    status["environments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

fn sampled_requests(env: &Value) -> u64 {
    env["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["requests"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_json_has_its_shape_and_no_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let (qa, prod) = (Upstream::start("qa").await, Upstream::start("prod").await);
    let gw = gateway(dir.path(), &qa, &prod).await;
    let admin = gw.admin.unwrap();
    let c = client();

    let page = get(&c, &format!("http://{admin}/"), &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(page.headers["content-type"], "text/html; charset=utf-8");
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert!(!csp.contains("unsafe") && !csp.contains('*'), "{csp}");
    let html = page.text();
    assert!(html.contains("/status.json"));
    assert!(
        !html.contains("src=") && !html.contains("<link"),
        "nothing external"
    );

    traffic(&gw, &c, 8).await;
    // A rejected reload that quoted a hash: shown, but masked.
    let hash = specter::config::hex(&specter::config::sha256(QA_KEY.as_bytes()));
    *gw.gateway.shared().last_reload_error.lock().unwrap() = Some(specter::state::ReloadFailure {
        error: format!("specter.toml:9:10: environments.qa.keys[0].sha256: \"{hash}\" is taken"),
        at: rfc3339(SystemTime::now()),
    });

    let mut last = Value::Null;
    let sampled = poll_until(Duration::from_secs(5), || {
        let c = c.clone();
        async move { sampled_requests(env(&status_json(&c, admin).await.1, "qa")) >= 8 }
    })
    .await;
    let (text, status) = status_json(&c, admin).await;
    assert!(sampled, "the ring never showed the traffic: {text}");
    last.clone_from(&status);

    assert_eq!(status["config"]["version"], 1);
    assert!(status["config"]["loaded_at"].is_string());
    let reload_error = status["config"]["last_reload_error"]["error"]
        .as_str()
        .unwrap();
    assert!(reload_error.contains("[masked]"), "{reload_error}");

    let qa_view = env(&last, "qa");
    assert_eq!(qa_view["requests_total"], 8);
    let sample = &qa_view["samples"].as_array().unwrap()[0];
    for field in [
        "t",
        "requests",
        "classes",
        "rate_limited",
        "p50_ms",
        "p99_ms",
    ] {
        assert!(!sample[field].is_null(), "sample lacks {field}: {sample}");
    }
    let two_xx: u64 = qa_view["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["classes"][1].as_u64().unwrap())
        .sum();
    assert_eq!(two_xx, 8);
    let ups = qa_view["upstreams"].as_array().unwrap();
    assert_eq!(ups.len(), 2);
    assert_eq!(ups[0]["healthy"], true);
    assert_eq!(
        ups[1]["healthy"], false,
        "the dead upstream is ejected: {ups:?}"
    );
    assert!(ups[1]["recent_errors"].as_u64().unwrap() >= 3);
    assert_eq!(ups[1]["last_error"]["kind"], "connect");
    assert_eq!(
        qa_view["key_states"],
        serde_json::json!({"active": 1, "staged": 1, "expiring": 1, "expired": 1})
    );
    let app = qa_view["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "qa-app")
        .unwrap();
    assert_eq!(app["state"], "active");
    assert_eq!(app["requests"], 8);
    assert!(app["last_seen"].is_string());

    let prod_view = env(&last, "production");
    assert_eq!(prod_view["rate_limited_total"], 6, "burst 2 of 8");

    let certs = last["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 1);
    assert!(certs[0]["file"].as_str().unwrap().ends_with("status.pem"));
    assert!(certs[0]["not_after"].is_string());
    assert!(certs[0]["days_left"].as_i64().unwrap() > 300);

    for secret in [
        QA_KEY,
        PROD_KEY,
        STAGED_KEY,
        EXPIRING_KEY,
        EXPIRED_KEY,
        QUERY_SECRET,
        &hash,
    ] {
        assert!(!text.contains(secret), "{secret} leaked into /status.json");
        assert!(!html.contains(secret));
    }
    assert!(!text.contains("BEGIN"), "no PEM on the page");
}

/// Debian's Chromium under its usual names.
fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|name| {
            Command::new(name)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

fn headless(browser: &str, profile: &Path, extra: &[&str], url: &str) -> std::process::Output {
    Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .output()
        .expect("chromium runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headless_chromium_renders_the_live_status_page() {
    let Some(browser) = chromium() else {
        eprintln!(
            "SKIPPED headless_chromium_renders_the_live_status_page: no chromium on PATH \
             (apt-get install chromium; .ci/run installs it)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (qa, prod) = (Upstream::start("qa").await, Upstream::start("prod").await);
    let gw = gateway(dir.path(), &qa, &prod).await;
    let admin = gw.admin.unwrap();
    let c = client();
    // Traffic keeps flowing while the browser loads the page.
    let background = {
        let (c, url) = (c.clone(), gw.url("/v1/items"));
        tokio::spawn(async move {
            for _ in 0..2000 {
                let req = http::Request::get(&url)
                    .header("x-api-key", QA_KEY)
                    .body(Default::default())
                    .unwrap();
                let _ = c.request(req).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let busy = poll_until(Duration::from_secs(10), || {
        let c = c.clone();
        async move {
            let status = status_json(&c, admin).await.1;
            let qa = env(&status, "qa");
            let samples = qa["samples"].as_array().unwrap();
            samples
                .last()
                .is_some_and(|s| s["requests"].as_u64().unwrap() > 0)
                && qa["upstreams"][1]["healthy"] == false
        }
    })
    .await;
    assert!(
        busy,
        "the gateway never showed traffic and an ejected upstream"
    );

    let url = format!("http://{admin}/");
    let page = tokio::task::spawn_blocking({
        let (browser, profile, url) = (browser, dir.path().join("profile"), url.clone());
        move || headless(browser, &profile, &["--dump-dom"], &url)
    })
    .await
    .unwrap();
    let dom = String::from_utf8_lossy(&page.stdout).into_owned();
    let why = || {
        format!(
            "stderr: {}\nDOM:\n{dom}",
            String::from_utf8_lossy(&page.stderr)
        )
    };
    assert!(dom.contains("data-env=\"qa\""), "{}", why());
    assert!(dom.contains("data-env=\"production\""), "{}", why());
    assert!(dom.contains("data-health=\"down\""), "{}", why());
    // The qa card's rate (production, first by name, has no traffic now).
    let qa_card = dom.split("data-env=\"qa\"").nth(1).unwrap_or_default();
    let rps: f64 = qa_card
        .split("data-rps=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no rate in the DOM: {}", why()));
    assert!(rps > 0.0, "rate {rps}: {}", why());
    assert!(!dom.contains(QA_KEY));

    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let taken = tokio::task::spawn_blocking({
        let (profile, arg) = (
            dir.path().join("profile"),
            format!("--screenshot={}", shot.display()),
        );
        move || headless(browser, &profile, &[&arg, "--window-size=1400,1100"], &url)
    })
    .await
    .unwrap();
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&taken.stderr)));
    assert!(
        png.starts_with(b"\x89PNG"),
        "no PNG at {} ({} bytes); chromium said: {}",
        shot.display(),
        png.len(),
        String::from_utf8_lossy(&taken.stderr)
    );
    eprintln!("status page screenshot: {}", shot.display());
    background.abort();
}
