//! Header rewriting between client and upstream, in both directions.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::header::{
    GetAll, HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONNECTION, FORWARDED, HOST,
};

use crate::auth::KeySource;
use crate::config::HeaderRules;
use crate::headers::*;

/// Removes the hop-by-hop headers, every header the `Connection` header names, and those
/// `also` picks, in passes over the names present: a message carries a handful of
/// headers while the candidates are about twenty, so this beats a hashed `remove` per
/// candidate. Each pass finds one name to remove; `also` names it by a reference of its
/// own where it can, so that no name is cloned (a custom name's first clone allocates).
/// Runs before the gateway sets its own headers, so `Connection:
/// x-specter-environment` removes only the client's copy, never the gateway's.
fn remove_where<'r>(
    headers: &mut HeaderMap,
    also: impl Fn(&HeaderName) -> Option<Cow<'r, HeaderName>>,
) {
    let connection = headers.contains_key(CONNECTION);
    loop {
        // Looked up once a pass, not once a name.
        let listed = connection.then(|| headers.get_all(CONNECTION));
        let doomed = headers.keys().find_map(|n| {
            if let Some(hop) = HOP_BY_HOP.iter().find(|h| *h == n && *h != CONNECTION) {
                return Some(Cow::Borrowed(hop));
            }
            // `Connection` goes last: the names it lists must all be read first.
            also(n).or_else(|| {
                let named = listed
                    .as_ref()
                    .is_some_and(|l| n != CONNECTION && lists(l, n));
                named.then(|| Cow::Owned(n.clone()))
            })
        });
        match doomed {
            Some(name) => {
                headers.remove(&*name);
            }
            None => break,
        }
    }
    if connection {
        headers.remove(CONNECTION);
    }
}

/// The comma-separated options of every `Connection` header.
pub fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    tokens(&headers.get_all(CONNECTION))
}

fn tokens<'a>(connection: &GetAll<'a, HeaderValue>) -> impl Iterator<Item = &'a str> {
    connection
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The `Connection` headers list `name` among their options.
fn lists(connection: &GetAll<'_, HeaderValue>, name: &HeaderName) -> bool {
    tokens(connection).any(|token| token.eq_ignore_ascii_case(name.as_str()))
}

fn named_by_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    lists(&headers.get_all(CONNECTION), name)
}

/// Headers only the gateway may set: a client's copy never reaches the upstream.
/// (`X-Forwarded-For` and `Forwarded` from a trusted proxy are read first and extended.)
/// A `static`, not a `const`, like `HOP_BY_HOP`.
static GATEWAY_SET: [HeaderName; 9] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REAL_IP,
    FORWARDED,
    X_SPECTER_ENVIRONMENT,
    X_SPECTER_KEY_ID,
    X_SPECTER_CLIENT_CERT_SUBJECT,
    HOST,
];

/// Headers in which a proxy tells its upstream about the client or the original
/// request. Believed only from `trusted_proxies`: from anyone else they are forgeries
/// (`X-Original-URL` even re-routes Symfony and IIS upstreams past path rules).
fn forwarding_header(name: &str) -> bool {
    name.starts_with("x-forwarded-") || FORWARDING.contains(&name)
}

/// The forwarding headers besides the `x-forwarded-*` family.
const FORWARDING: [&str; 5] = [
    "forwarded",
    "x-real-ip",
    "x-original-url",
    "x-rewrite-url",
    "x-host",
];

/// `a` spells `b` once `_` is read as `-`, as CGI and WSGI upstreams read header names.
fn spells(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
}

/// A header name with `_` that an upstream may read as one the gateway owns.
fn spells_gateway_owned(name: &str, auth_header: &HeaderName) -> bool {
    let n = name.as_bytes();
    let prefixed = |p: &str| n.len() > p.len() && spells(&n[..p.len()], p.as_bytes());
    prefixed("x-specter-")
        || prefixed("x-forwarded-")
        || FORWARDING
            .iter()
            .chain(&["x-request-id", auth_header.as_str()])
            .any(|owned| spells(n, owned.as_bytes()))
}

/// What the gateway knows about a request that the upstream must be told.
pub struct Forwarded<'a> {
    pub auth_header: &'a HeaderName,
    pub key_source: KeySource,
    pub client_ip: IpAddr,
    /// The address that connected to the gateway.
    pub peer_ip: IpAddr,
    /// The peer is a trusted proxy: its forwarding headers are believed, and its
    /// `X-Forwarded-For` and `Forwarded` extended with the peer's address instead of
    /// replaced.
    pub trusted_peer: bool,
    /// The environment's `policy.allow_underscore_headers`.
    pub allow_underscores: bool,
    pub tls: bool,
    /// Host (authority) the client addressed, before rewriting.
    pub host: Option<HeaderValue>,
    pub request_id: &'a HeaderValue,
    /// This hop's W3C `traceparent`; always set, replacing the client's.
    pub traceparent: HeaderValue,
    /// The client's `tracestate` passes on only with the trace it belongs to.
    pub keep_tracestate: bool,
    pub environment: &'a HeaderValue,
    pub key_id: &'a HeaderValue,
    pub client_cert_subject: Option<&'a HeaderValue>,
    /// The connection's forwarding values, built by its first request.
    pub cache: &'a OnceLock<ConnForwarding>,
}

/// `X-Forwarded-For` / `X-Real-IP` and `Forwarded` for a request that extends no
/// chain. They depend only on the client address, the Host and the scheme, which a
/// keep-alive connection's requests nearly always share: its first request builds
/// them, and the next ones that match take a reference count instead of formatting.
#[derive(Debug, Clone)]
pub struct ConnForwarding {
    client_ip: IpAddr,
    host: Option<HeaderValue>,
    ip: HeaderValue,
    forwarded: HeaderValue,
}

impl ConnForwarding {
    fn new(client_ip: IpAddr, host: Option<&HeaderValue>, tls: bool) -> Option<ConnForwarding> {
        let forwarded = forwarded_element(None, client_ip, host, tls);
        // A copy, not a clone: the request's Host shares hyper's read buffer, and a
        // clone kept here would keep that buffer for the connection's life (8 KiB per
        // idle connection, measured with DHAT).
        let host = host.map(|h| HeaderValue::from_bytes(h.as_bytes()));
        Some(ConnForwarding {
            client_ip,
            host: host.transpose().ok()?,
            ip: HeaderValue::from_maybe_shared(bytes::Bytes::from(client_ip.to_string())).ok()?,
            forwarded: HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)).ok()?,
        })
    }

    fn matches(&self, client_ip: IpAddr, host: Option<&HeaderValue>) -> bool {
        self.client_ip == client_ip && self.host.as_ref() == host
    }
}

pub fn rewrite_request(headers: &mut HeaderMap, f: &Forwarded<'_>, rules: &HeaderRules) {
    // A hop-by-hop chain (named by `Connection`) is not the chain to extend.
    let previous = |headers: &HeaderMap, name: &HeaderName| {
        (f.trusted_peer && !named_by_connection(headers, name))
            .then(|| join_values(headers, name))
            .flatten()
    };
    let previous_xff = previous(headers, &X_FORWARDED_FOR);
    let previous_forwarded = previous(headers, &FORWARDED);
    let bearer = f.key_source == KeySource::Bearer;
    remove_where(headers, |n| {
        if n == f.auth_header {
            return Some(Cow::Borrowed(f.auth_header));
        }
        if let Some(owned) = GATEWAY_SET.iter().chain(&rules.remove).find(|g| *g == n) {
            return Some(Cow::Borrowed(owned));
        }
        let doomed = (bearer && n == AUTHORIZATION)
            || (!f.trusted_peer && forwarding_header(n.as_str()))
            || (n.as_str().contains('_')
                && (!f.allow_underscores || spells_gateway_owned(n.as_str(), f.auth_header)))
            || (!f.keep_tracestate && n == crate::trace::TRACESTATE);
        doomed.then(|| Cow::Owned(n.clone()))
    });
    // Room for what is added below at once, instead of growing the map step by step.
    headers.reserve(rules.set.len() + 11);
    for (name, value) in &rules.set {
        headers.insert(name.clone(), value.clone());
    }
    let (xff, real_ip, forwarded) = match (previous_xff, previous_forwarded) {
        (None, None) => {
            let host = f.host.as_ref();
            let built;
            let values = match f.cache.get() {
                Some(cached) if cached.matches(f.client_ip, host) => Some(cached),
                Some(_) => {
                    built = ConnForwarding::new(f.client_ip, host, f.tls);
                    built.as_ref()
                }
                None => ConnForwarding::new(f.client_ip, host, f.tls)
                    .map(|fresh| f.cache.get_or_init(|| fresh)),
            };
            match values {
                Some(v) => (
                    Some(v.ip.clone()),
                    Some(v.ip.clone()),
                    Some(v.forwarded.clone()),
                ),
                None => (None, None, None),
            }
        }
        (previous_xff, previous_forwarded) => {
            // Extending a trusted proxy's chain: the address this hop heard from is
            // the peer's.
            let extended = previous_xff.is_some();
            let (xff, for_ip) = match previous_xff {
                Some(prev) => (format!("{prev}, {}", f.peer_ip), f.peer_ip),
                None => (f.client_ip.to_string(), f.client_ip),
            };
            let xff = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)).ok();
            let forwarded = forwarded_element(previous_forwarded, for_ip, f.host.as_ref(), f.tls);
            let real_ip = match &xff {
                Some(v) if !extended => Some(v.clone()),
                _ => HeaderValue::from_str(&f.client_ip.to_string()).ok(),
            };
            let forwarded = HeaderValue::from_maybe_shared(bytes::Bytes::from(forwarded)).ok();
            (xff, real_ip, forwarded)
        }
    };
    if let Some(v) = forwarded {
        headers.insert(FORWARDED, v);
    }
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if let Some(v) = real_ip {
        headers.insert(X_REAL_IP, v);
    }
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if f.tls { "https" } else { "http" }),
    );
    if let Some(host) = &f.host {
        headers.insert(X_FORWARDED_HOST, host.clone());
    }
    headers.insert(X_REQUEST_ID, f.request_id.clone());
    headers.insert(crate::trace::TRACEPARENT, f.traceparent.clone());
    headers.insert(X_SPECTER_ENVIRONMENT, f.environment.clone());
    headers.insert(X_SPECTER_KEY_ID, f.key_id.clone());
    if let Some(subject) = f.client_cert_subject {
        headers.insert(X_SPECTER_CLIENT_CERT_SUBJECT, subject.clone());
    }
}

/// This hop's RFC 7239 element (`for=...;host="...";proto=...`), after a trusted
/// proxy's chain when there is one.
fn forwarded_element(
    previous: Option<String>,
    for_ip: IpAddr,
    host: Option<&HeaderValue>,
    tls: bool,
) -> String {
    use std::fmt::Write;
    let mut out = previous.map(|p| p + ", ").unwrap_or_default();
    let _ = match for_ip {
        IpAddr::V4(ip) => write!(out, "for={ip}"),
        IpAddr::V6(ip) => write!(out, "for=\"[{ip}]\""),
    };
    // A quoted-string may not hold `"` or `\`; a valid Host has neither.
    if let Some(host) = host.and_then(|h| h.to_str().ok()) {
        if !host.contains(['"', '\\']) {
            let _ = write!(out, ";host=\"{host}\"");
        }
    }
    out.push_str(if tls { ";proto=https" } else { ";proto=http" });
    out
}

pub fn rewrite_response(headers: &mut HeaderMap, rules: &HeaderRules) {
    remove_where(headers, |n| {
        rules.remove.iter().find(|r| *r == n).map(Cow::Borrowed)
    });
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

    use crate::headers::map;

    struct Ids(HeaderName, HeaderValue, HeaderValue, HeaderValue);

    fn ids() -> Ids {
        Ids(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("r1"),
            HeaderValue::from_static("development"),
            HeaderValue::from_static("k1"),
        )
    }

    /// What the gateway tells the upstream in these tests: client 192.0.2.7 behind
    /// peer 10.0.0.1 (untrusted), plain HTTP, Host `api.example.com`.
    fn forwarded<'a>(ids: &'a Ids, cache: &'a OnceLock<ConnForwarding>) -> Forwarded<'a> {
        let Ids(auth, rid, env, kid) = ids;
        Forwarded {
            auth_header: auth,
            key_source: KeySource::Header,
            client_ip: "192.0.2.7".parse().unwrap(),
            peer_ip: "10.0.0.1".parse().unwrap(),
            trusted_peer: false,
            allow_underscores: false,
            tls: false,
            host: Some(HeaderValue::from_static("api.example.com")),
            request_id: rid,
            traceparent: HeaderValue::from_static(
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            keep_tracestate: false,
            environment: env,
            key_id: kid,
            client_cert_subject: None,
            cache,
        }
    }

    /// A request from `peer` (trusted or not) through an environment that does or does
    /// not allow underscore headers.
    fn rewritten(pairs: &[(&str, &str)], trusted_peer: bool, allow_underscores: bool) -> HeaderMap {
        let (ids, cache) = (ids(), OnceLock::new());
        let mut h = map(pairs);
        let f = Forwarded {
            trusted_peer,
            allow_underscores,
            ..forwarded(&ids, &cache)
        };
        rewrite_request(&mut h, &f, &HeaderRules::default());
        h
    }

    #[test]
    fn connection_named_headers_go_but_gateway_headers_stay() {
        let h = rewritten(
            &[
                ("connection", "x-specter-environment, x-api-key, x-drop"),
                ("x-drop", "1"),
                ("x-keep", "1"),
                ("x-specter-environment", "production"),
                ("x-api-key", "secret"),
            ],
            false,
            false,
        );
        assert_eq!(h[X_SPECTER_ENVIRONMENT], "development");
        assert_eq!(h[X_SPECTER_KEY_ID], "k1");
        assert!(
            h.get("x-drop").is_none()
                && h.get("x-api-key").is_none()
                && h.get(CONNECTION).is_none()
        );
        assert_eq!(h["x-keep"], "1");
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7");
    }

    const FORGED: &[(&str, &str)] = &[
        ("x_specter_environment", "production"),
        ("x_specter_key_id", "prod-admin"),
        ("x_forwarded_for", "6.6.6.6"),
        ("x_api_key", "spk_production_stolen"),
        ("x_request_id", "forged"),
        ("x_real_ip", "6.6.6.6"),
        ("forwarded", "for=6.6.6.6"),
        ("x-real-ip", "6.6.6.6"),
        ("x-original-url", "/v1/internal/secret"),
        ("x-rewrite-url", "/v1/internal/secret"),
        ("x-forwarded-port", "443"),
        ("x-forwarded-prefix", "/admin"),
        ("x-forwarded-server", "evil"),
        ("x-host", "evil.example.com"),
        ("x_tenant", "acme"),
    ];

    /// Failing when written: underscore spellings and the forwarding headers specter does
    /// not set itself were forwarded as the client wrote them.
    #[test]
    fn forged_variants_of_gateway_headers_never_reach_the_upstream() {
        let h = rewritten(FORGED, false, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert!(!names.iter().any(|n| n.contains('_')), "{names:?}");
        for gone in [
            "x-original-url",
            "x-rewrite-url",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded-server",
            "x-host",
        ] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(h[X_REAL_IP], "192.0.2.7");
        assert_eq!(
            h[FORWARDED],
            "for=192.0.2.7;host=\"api.example.com\";proto=http"
        );
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7");

        // The opt-in admits other underscore names, never a gateway-owned spelling.
        let h = rewritten(FORGED, false, true);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(h["x_tenant"], "acme");
        assert_eq!(
            names.iter().filter(|n| n.contains('_')).count(),
            1,
            "{names:?}"
        );
    }

    #[test]
    fn a_trusted_proxy_forwarding_headers_are_kept_and_extended() {
        let h = rewritten(
            &[
                ("x-forwarded-for", "192.0.2.7"),
                ("forwarded", "for=192.0.2.7;proto=https"),
                ("x-original-url", "/v1/x"),
                ("x-forwarded-port", "443"),
            ],
            true,
            false,
        );
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7, 10.0.0.1");
        assert_eq!(
            h[FORWARDED],
            "for=192.0.2.7;proto=https, for=10.0.0.1;host=\"api.example.com\";proto=http"
        );
        assert_eq!(h["x-original-url"], "/v1/x");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(h[X_REAL_IP], "192.0.2.7");
    }

    /// The forwarding values a connection's first request built are reused only by
    /// requests with the same client and Host.
    #[test]
    fn a_connection_reuses_its_forwarding_values_only_for_the_same_host() {
        let (ids, cache) = (ids(), OnceLock::new());
        let rewrite = |host: &'static str| {
            let mut h = HeaderMap::new();
            let f = Forwarded {
                tls: true,
                host: Some(HeaderValue::from_static(host)),
                ..forwarded(&ids, &cache)
            };
            rewrite_request(&mut h, &f, &HeaderRules::default());
            h
        };
        for host in ["a.example", "b.example", "a.example"] {
            let h = rewrite(host);
            assert_eq!(
                h[FORWARDED],
                format!("for=192.0.2.7;host=\"{host}\";proto=https").as_str()
            );
            assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7");
            assert_eq!(h[X_REAL_IP], "192.0.2.7");
        }
        assert!(cache.get().is_some_and(|c| c.matches(
            "192.0.2.7".parse().unwrap(),
            Some(&HeaderValue::from_static("a.example"))
        )));
    }

    /// The Host a connection keeps is its own copy: hyper parses header values as
    /// slices of its read buffer, which a kept slice would keep alive.
    #[test]
    fn the_kept_host_does_not_share_the_request_buffer() {
        let buffer = bytes::Bytes::from_static(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n");
        let host = HeaderValue::from_maybe_shared(buffer.slice(22..31)).unwrap();
        let kept = ConnForwarding::new("192.0.2.7".parse().unwrap(), Some(&host), false).unwrap();
        let kept = kept.host.unwrap();
        assert_eq!(kept, "a.example");
        assert!(!buffer.as_ptr_range().contains(&kept.as_bytes().as_ptr()));
    }

    #[test]
    fn ipv6_clients_are_quoted_in_forwarded() {
        let v6 = forwarded_element(None, "2001:db8::1".parse().unwrap(), None, true);
        assert_eq!(v6, "for=\"[2001:db8::1]\";proto=https");
    }
}
