//! The status page on the admin listener: `GET /` serves one self-contained HTML page
//! (inline style and script allowed by hash under a strict `Content-Security-Policy`, no
//! external resource), which polls `GET /status.json` every two seconds.
//!
//! The JSON holds, per environment, the per-second ring of [`crate::activity`], upstream health
//! and recent errors, and keys by state; then the config version and the last reload
//! error, and the TLS certificates with their expiry. Never a key, a key hash or a query
//! string: keys appear by id, and the reload error has every long token masked (a
//! rejected line may quote a hash, or a key pasted by mistake).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::Response;
use once_cell::sync::Lazy;
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::body::{self, Body};
use crate::state::{Environment, Shared, State};

/// Once a second, closes each environment's current sample.
pub async fn sample_every_second(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = SystemTime::now();
                for env in &shared.state.load().environments {
                    env.activity.tick(now);
                }
            }
            _ = stop.changed() => return,
        }
    }
}

const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");

/// The page and its policy, assembled once: the policy allows exactly the inline style
/// and script by their SHA-256, and fetches to this listener only.
static PAGE: Lazy<(Bytes, HeaderValue)> = Lazy::new(|| {
    let html = include_str!("page.html")
        .replace("/*STYLE*/", STYLE)
        .replace("/*SCRIPT*/", SCRIPT);
    let hash = |s: &str| base64(&crate::digest::sha256(s.as_bytes()));
    let csp = format!(
        "default-src 'none'; script-src 'sha256-{}'; style-src 'sha256-{}'; connect-src 'self'; \
         img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(SCRIPT),
        hash(STYLE)
    );
    let csp = HeaderValue::from_str(&csp).expect("the policy is ASCII");
    (Bytes::from(html), csp)
});

pub fn page() -> Response<Body> {
    let (html, csp) = &*PAGE;
    let mut r = Response::new(body::full(html.clone()));
    let h = r.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(http::header::CONTENT_SECURITY_POLICY, csp.clone());
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// The `/status.json` document.
pub fn view(shared: &Shared) -> Value {
    let state = shared.state.load();
    let last_error = shared
        .last_reload_error
        .lock()
        .map(|e| e.clone())
        .unwrap_or(None)
        .map(|e| json!({"error": mask_tokens(&e.error), "at": e.at}));
    let environments: Vec<Value> = state
        .environments
        .iter()
        .enumerate()
        .map(|(i, env)| environment(&state, i, env))
        .collect();
    json!({
        "generated_at": crate::clock::rfc3339(SystemTime::now()),
        "draining": shared.draining.load(Ordering::Relaxed),
        "config": {
            "version": state.version,
            "sha256": state.config.source.sha256,
            "loaded_at": crate::clock::rfc3339(state.loaded_at),
            "last_reload_error": last_error,
        },
        "environments": environments,
        "certificates": certificates(&state),
    })
}

fn environment(state: &State, index: usize, env: &Environment) -> Value {
    let upstreams: Vec<Value> = env
        .upstreams
        .slots
        .iter()
        .enumerate()
        .map(|(i, slot)| {
            let authority = slot.upstream.authority();
            let errors = env.activity.recent_errors(authority);
            json!({
                "url": slot.upstream.uri.to_string().trim_end_matches('/'),
                "healthy": env.upstreams.is_healthy(i),
                "recent_errors": errors.len(),
                "last_error": errors.last(),
            })
        })
        .collect();
    let (keys, counts) = keys(state, index);
    json!({
        "name": env.config.name,
        "requests_total": env.activity.total_requests(),
        "rate_limited_total": env.activity.total_rate_limited(),
        "samples": env.activity.samples(),
        "upstreams": upstreams,
        "key_states": counts,
        "keys": keys,
    })
}

/// The environment's keys by id with their state, and how many are in each state.
fn keys(state: &State, env: usize) -> (Vec<Value>, Value) {
    let now = SystemTime::now();
    let mut counts = [0u64; 4];
    let mut rows: Vec<Value> = state
        .keys
        .iter()
        .filter(|k| k.environment == env)
        .map(|k| {
            let (nb, na) = (k.window.not_before, k.window.not_after);
            let key_state = if nb.is_some_and(|t| t > now) {
                0
            } else if na.is_some_and(|t| t <= now) {
                3
            } else if na.is_some_and(|t| t <= now + crate::config::KEY_EXPIRY_WARNING) {
                2
            } else {
                1
            };
            counts[key_state] += 1;
            let state_name = ["staged", "active", "expiring", "expired"][key_state];
            let last_seen = k
                .usage
                .map_or(0, |u| u.last_seen_ms.load(Ordering::Relaxed));
            json!({
                "id": k.id,
                "state": state_name,
                "not_before": nb.map(crate::clock::rfc3339),
                "not_after": na.map(crate::clock::rfc3339),
                "requests": k.usage.map_or(0, |u| u.requests.load(Ordering::Relaxed)),
                "last_seen": (last_seen > 0)
                    .then(|| crate::clock::rfc3339(UNIX_EPOCH + Duration::from_millis(last_seen))),
            })
        })
        .collect();
    rows.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let counts = json!({
        "staged": counts[0], "active": counts[1], "expiring": counts[2], "expired": counts[3],
    });
    (rows, counts)
}

/// The served certificates (described once per config build) with their expiry.
fn certificates(state: &State) -> Vec<Value> {
    let now = i64::try_from(crate::clock::unix_now()).unwrap_or(i64::MAX);
    state
        .certificates
        .iter()
        .map(|c| {
            let not_after = u64::try_from(c.not_after)
                .ok()
                .map(|s| crate::clock::rfc3339(UNIX_EPOCH + Duration::from_secs(s)));
            json!({
                "file": c.path,
                "not_after": not_after,
                "days_left": (c.not_after - now).div_euclid(86_400),
            })
        })
        .collect()
}

/// Replaces every run of 20 or more key-like characters (letters, digits, `_`, `-`)
/// with `[masked]`: hashes are 64 hex digits and keys over 27 characters, while the
/// words and paths of an error message are shorter.
fn mask_tokens(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut run = String::new();
    let flush = |run: &mut String, out: &mut String| {
        if run.len() >= 20 {
            out.push_str("[masked]");
        } else {
            out.push_str(run);
        }
        run.clear();
    };
    for c in text.chars() {
        if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
            run.push(c);
        } else {
            flush(&mut run, &mut out);
            out.push(c);
        }
    }
    flush(&mut run, &mut out);
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_4648_vectors() {
        for (raw, encoded) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), encoded);
        }
    }

    #[test]
    fn long_tokens_are_masked_in_reload_errors() {
        let hash = "a".repeat(64);
        let text = format!(
            "specter.toml:9:10: environments.qa.keys[0].sha256: \"{hash}\" is not hex; fix"
        );
        let masked = mask_tokens(&text);
        assert!(!masked.contains(&hash));
        assert!(masked.contains("specter.toml:9:10: environments.qa.keys[0].sha256: \"[masked]\""));
    }

    #[test]
    fn the_policy_names_the_exact_inline_code() {
        let (html, csp) = &*PAGE;
        let html = std::str::from_utf8(html).unwrap();
        assert!(html.contains(SCRIPT) && html.contains(STYLE));
        assert!(!html.contains("/*SCRIPT*/") && !html.contains("src=") && !html.contains("<link"));
        let csp = csp.to_str().unwrap();
        assert!(csp.contains(&format!(
            "'sha256-{}'",
            base64(&crate::digest::sha256(SCRIPT.as_bytes()))
        )));
        assert!(!csp.contains("unsafe"));
    }
}
