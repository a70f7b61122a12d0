//! Header rewriting between client and upstream, in both directions.

use std::net::IpAddr;

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, HOST};

use crate::auth::KeySource;
use crate::config::HeaderRules;
use crate::headers::*;

/// Removes the hop-by-hop headers, every header the `Connection` header names, and those
/// `also` picks, in one pass over the names present: a message carries a handful of
/// headers while the candidates are about twenty, so this beats a hashed `remove` per
/// candidate. Runs before the gateway sets its own headers, so `Connection:
/// x-specter-environment` removes only the client's copy, never the gateway's.
fn remove_where(headers: &mut HeaderMap, also: impl Fn(&HeaderName) -> bool) {
    let connection = headers.contains_key(CONNECTION);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            HOP_BY_HOP.contains(n) || also(n) || (connection && named_by_connection(headers, n))
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// The comma-separated options of every `Connection` header.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn named_by_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    connection_tokens(headers).any(|token| token.eq_ignore_ascii_case(name.as_str()))
}

/// Headers only the gateway may set: a client's copy never reaches the upstream.
const GATEWAY_SET: [HeaderName; 7] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_SPECTER_ENVIRONMENT,
    X_SPECTER_KEY_ID,
    X_SPECTER_CLIENT_CERT_SUBJECT,
    HOST,
];

/// What the gateway knows about a request that the upstream must be told.
pub struct Forwarded<'a> {
    pub auth_header: &'a HeaderName,
    pub key_source: KeySource,
    pub client_ip: IpAddr,
    /// The address that connected to the gateway.
    pub peer_ip: IpAddr,
    /// The peer is a trusted proxy: extend its `X-Forwarded-For` with the peer's address
    /// instead of replacing it with the client's.
    pub extend_forwarded_for: bool,
    pub tls: bool,
    /// Host (authority) the client addressed, before rewriting.
    pub host: Option<HeaderValue>,
    pub request_id: &'a HeaderValue,
    pub environment: &'a HeaderValue,
    pub key_id: &'a HeaderValue,
    pub client_cert_subject: Option<&'a HeaderValue>,
}

pub fn rewrite_request(headers: &mut HeaderMap, f: &Forwarded<'_>, rules: &HeaderRules) {
    // A hop-by-hop `X-Forwarded-For` (named by `Connection`) is not the chain to extend.
    let previous_xff = if f.extend_forwarded_for && !named_by_connection(headers, &X_FORWARDED_FOR)
    {
        join_values(headers, &X_FORWARDED_FOR)
    } else {
        None
    };
    let bearer = f.key_source == KeySource::Bearer;
    remove_where(headers, |n| {
        n == f.auth_header
            || (bearer && n == AUTHORIZATION)
            || GATEWAY_SET.contains(n)
            || rules.remove.contains(n)
    });
    for (name, value) in &rules.set {
        headers.insert(name.clone(), value.clone());
    }
    let xff = match previous_xff {
        Some(prev) => format!("{prev}, {}", f.peer_ip),
        None => f.client_ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if f.tls { "https" } else { "http" }),
    );
    if let Some(host) = &f.host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    headers.insert(X_REQUEST_ID, f.request_id.clone());
    headers.insert(X_SPECTER_ENVIRONMENT, f.environment.clone());
    headers.insert(X_SPECTER_KEY_ID, f.key_id.clone());
    if let Some(subject) = f.client_cert_subject {
        headers.insert(X_SPECTER_CLIENT_CERT_SUBJECT, subject.clone());
    }
}

pub fn rewrite_response(headers: &mut HeaderMap, rules: &HeaderRules) {
    remove_where(headers, |n| rules.remove.contains(n));
    for (name, value) in &rules.set {
        headers.insert(name.clone(), value.clone());
    }
}

fn join_values(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let v = v.to_str().ok()?;
        match &mut out {
            Some(s) => {
                s.push_str(", ");
                s.push_str(v);
            }
            None => out = Some(v.to_owned()),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_named_headers_go_but_gateway_headers_stay() {
        let mut h = HeaderMap::new();
        h.insert(
            CONNECTION,
            "x-specter-environment, x-api-key, x-drop".parse().unwrap(),
        );
        h.insert("x-drop", "1".parse().unwrap());
        h.insert("x-keep", "1".parse().unwrap());
        h.insert(X_SPECTER_ENVIRONMENT, "production".parse().unwrap());
        h.insert("x-api-key", "secret".parse().unwrap());
        let auth = HeaderName::from_static("x-api-key");
        let (rid, env, kid) = (
            HeaderValue::from_static("r1"),
            HeaderValue::from_static("development"),
            HeaderValue::from_static("k1"),
        );
        let f = Forwarded {
            auth_header: &auth,
            key_source: KeySource::Header,
            client_ip: "127.0.0.1".parse().unwrap(),
            peer_ip: "127.0.0.1".parse().unwrap(),
            extend_forwarded_for: false,
            tls: false,
            host: None,
            request_id: &rid,
            environment: &env,
            key_id: &kid,
            client_cert_subject: None,
        };
        rewrite_request(&mut h, &f, &HeaderRules::default());
        assert_eq!(h[X_SPECTER_ENVIRONMENT], "development");
        assert_eq!(h[X_SPECTER_KEY_ID], "k1");
        assert!(
            h.get("x-drop").is_none()
                && h.get("x-api-key").is_none()
                && h.get(CONNECTION).is_none()
        );
        assert_eq!(h["x-keep"], "1");
        assert_eq!(h[X_FORWARDED_FOR], "127.0.0.1");
    }
}
