//! Header rewriting between client and upstream, in both directions.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::OnceLock;

use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, FORWARDED, HOST};

use crate::auth::KeySource;
use crate::config::HeaderRules;
use crate::headers::*;

/// Headers only the gateway may set: a client's copy never reaches the upstream.
/// (`X-Forwarded-For` and `Forwarded` from a trusted proxy are read first and extended;
/// a valid `X-Request-Id` and `traceparent` were read before, and continue as the
/// gateway's own.) A `static`, not a `const`, like `HOP_BY_HOP`.
static GATEWAY_SET: [HeaderName; 11] = [
    X_FORWARDED_FOR,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_REAL_IP,
    FORWARDED,
    X_SPECTER_ENVIRONMENT,
    X_SPECTER_KEY_ID,
    X_SPECTER_CLIENT_CERT_SUBJECT,
    HOST,
    X_REQUEST_ID,
    crate::trace::TRACEPARENT,
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
    /// The request's trace: this hop's W3C `traceparent` always replaces the client's.
    pub trace: &'a crate::trace::TraceContext,
    /// The client's `tracestate` passes on only with the trace it belongs to.
    pub keep_tracestate: bool,
    pub environment: &'a HeaderValue,
    pub key_id: HeaderValue,
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
        // Copies too, each of its exact length: a `String` turned into `Bytes` as it
        // is keeps its spare capacity and takes a 24-byte block to share it, for the
        // connection's life (~100 bytes per idle connection, measured with DHAT).
        Some(ConnForwarding {
            client_ip,
            host: host.transpose().ok()?,
            ip: HeaderValue::from_bytes(client_ip.to_string().as_bytes()).ok()?,
            forwarded: HeaderValue::from_bytes(forwarded.as_bytes()).ok()?,
        })
    }

    fn matches(&self, client_ip: IpAddr, host: Option<&HeaderValue>) -> bool {
        self.client_ip == client_ip && self.host.as_ref() == host
    }
}

/// Strips what must not reach the upstream and applies the environment's rules; returns
/// the gateway's own fields, which go out with the request without entering its map
/// (see [`upstream::Added`](crate::upstream::Added)). Where a rule sets one of those
/// names, the gateway's value is the one sent.
pub fn rewrite_request<'a>(
    headers: &mut HeaderMap,
    f: Forwarded<'a>,
    rules: &HeaderRules,
) -> GatewayFields<'a> {
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
    let chain = match (previous_xff, previous_forwarded) {
        (None, None) => {
            let host = f.host.as_ref();
            match f.cache.get() {
                Some(cached) if cached.matches(f.client_ip, host) => Chain::Shared(cached),
                Some(_) => ConnForwarding::new(f.client_ip, host, f.tls)
                    .map_or(Chain::None, |built| Chain::Own(Box::new(built.into()))),
                None => ConnForwarding::new(f.client_ip, host, f.tls)
                    .map_or(Chain::None, |fresh| {
                        Chain::Shared(f.cache.get_or_init(|| fresh))
                    }),
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
            Chain::Own(Box::new(ChainValues {
                forwarded,
                xff,
                real_ip,
            }))
        }
    };
    let fields = GatewayFields {
        chain,
        tls: f.tls,
        host: f.host,
        request_id: f.request_id,
        trace: f.trace,
        environment: f.environment,
        key_id: f.key_id,
        client_cert_subject: f.client_cert_subject,
    };
    for (name, value) in &rules.set {
        if !fields.sets(name) {
            headers.insert(name.clone(), value.clone());
        }
    }
    fields
}

/// The gateway's forwarding and identity fields for one request.
pub struct GatewayFields<'a> {
    chain: Chain<'a>,
    tls: bool,
    /// `X-Forwarded-Host`: the Host (authority) the client addressed.
    host: Option<HeaderValue>,
    request_id: &'a HeaderValue,
    trace: &'a crate::trace::TraceContext,
    environment: &'a HeaderValue,
    key_id: HeaderValue,
    client_cert_subject: Option<&'a HeaderValue>,
}

/// `Forwarded`, `X-Forwarded-For` and `X-Real-IP`: the connection's shared values
/// (nearly always), or this request's own (a trusted proxy's chain extended, or a Host
/// other than the connection's first).
enum Chain<'a> {
    Shared(&'a ConnForwarding),
    Own(Box<ChainValues>),
    None,
}

struct ChainValues {
    forwarded: Option<HeaderValue>,
    xff: Option<HeaderValue>,
    real_ip: Option<HeaderValue>,
}

impl From<ConnForwarding> for ChainValues {
    fn from(c: ConnForwarding) -> ChainValues {
        ChainValues {
            forwarded: Some(c.forwarded),
            xff: Some(c.ip.clone()),
            real_ip: Some(c.ip),
        }
    }
}

impl GatewayFields<'_> {
    /// Each field but `traceparent`, which is formatted where it is sent, last.
    fn each(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        let (forwarded, xff, real_ip) = match &self.chain {
            Chain::Shared(c) => (Some(&c.forwarded), Some(&c.ip), Some(&c.ip)),
            Chain::Own(c) => (c.forwarded.as_ref(), c.xff.as_ref(), c.real_ip.as_ref()),
            Chain::None => (None, None, None),
        };
        let proto = HeaderValue::from_static(if self.tls { "https" } else { "http" });
        let fields = [
            (&FORWARDED, forwarded),
            (&X_FORWARDED_FOR, xff),
            (&X_REAL_IP, real_ip),
            (&X_FORWARDED_PROTO, Some(&proto)),
            (&X_FORWARDED_HOST, self.host.as_ref()),
            (&X_REQUEST_ID, Some(self.request_id)),
            (&X_SPECTER_ENVIRONMENT, Some(self.environment)),
            (&X_SPECTER_KEY_ID, Some(&self.key_id)),
            (&X_SPECTER_CLIENT_CERT_SUBJECT, self.client_cert_subject),
        ];
        for (name, value) in fields {
            if let Some(value) = value {
                f(name, value);
            }
        }
    }

    /// The gateway sends a field of this name.
    fn sets(&self, name: &HeaderName) -> bool {
        let mut found = *name == crate::trace::TRACEPARENT;
        self.each(|n, _| found |= n == name);
        found
    }
}

impl crate::upstream::Added for GatewayFields<'_> {
    fn write(&self, wire: &mut Vec<u8>) {
        let mut line = |name: &HeaderName, value: &[u8]| {
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value);
            wire.extend_from_slice(b"\r\n");
        };
        self.each(|n, v| line(n, v.as_bytes()));
        line(&crate::trace::TRACEPARENT, &self.trace.traceparent_bytes());
    }

    fn insert(&self, headers: &mut HeaderMap) {
        headers.reserve(10);
        self.each(|n, v| {
            headers.insert(n.clone(), v.clone());
        });
        headers.insert(crate::trace::TRACEPARENT, self.trace.traceparent());
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

/// Applies the environment's response rules. The upstream's hop-by-hop fields are gone
/// already: they belong to the upstream connection, and the upstream client leaves them
/// there (`upstream`).
pub fn rewrite_response(headers: &mut HeaderMap, rules: &HeaderRules) {
    for name in &rules.remove {
        headers.remove(name);
    }
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

    use crate::trace::TraceContext;
    use crate::upstream::Added;

    struct Ids(
        HeaderName,
        HeaderValue,
        HeaderValue,
        HeaderValue,
        TraceContext,
    );

    fn ids() -> Ids {
        Ids(
            HeaderName::from_static("x-api-key"),
            HeaderValue::from_static("r1"),
            HeaderValue::from_static("development"),
            HeaderValue::from_static("k1"),
            TraceContext::from_headers(&HeaderMap::new(), 0.0),
        )
    }

    /// What the gateway tells the upstream in these tests: client 192.0.2.7 behind
    /// peer 10.0.0.1 (untrusted), plain HTTP, Host `api.example.com`.
    fn forwarded<'a>(ids: &'a Ids, cache: &'a OnceLock<ConnForwarding>) -> Forwarded<'a> {
        let Ids(auth, rid, env, kid, trace) = ids;
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
            trace,
            keep_tracestate: false,
            environment: env,
            key_id: kid.clone(),
            client_cert_subject: None,
            cache,
        }
    }

    /// A request from `peer` (trusted or not) through an environment that does or does
    /// not allow underscore headers, as hyper's clients get it: the gateway's fields
    /// inserted into the map.
    fn rewritten(pairs: &[(&str, &str)], trusted_peer: bool, allow_underscores: bool) -> HeaderMap {
        let (ids, cache) = (ids(), OnceLock::new());
        let mut h = map(pairs);
        let f = Forwarded {
            trusted_peer,
            allow_underscores,
            ..forwarded(&ids, &cache)
        };
        rewrite_request(&mut h, f, &HeaderRules::default()).insert(&mut h);
        h
    }

    /// The same request as specter's own client writes it: the map's fields, then
    /// the gateway's. Parsed back, with every name in the order written.
    fn written(pairs: &[(&str, &str)], rules: &HeaderRules) -> Vec<(String, String)> {
        let (ids, cache) = (ids(), OnceLock::new());
        let mut h = map(pairs);
        let added = rewrite_request(&mut h, forwarded(&ids, &cache), rules);
        let mut wire = Vec::new();
        for (name, value) in &h {
            wire.extend_from_slice(format!("{name}: ").as_bytes());
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        added.write(&mut wire);
        String::from_utf8(wire)
            .unwrap()
            .lines()
            .map(|l| {
                let (n, v) = l.split_once(": ").expect("name: value");
                (n.to_owned(), v.to_owned())
            })
            .collect()
    }

    /// Each gateway field goes out exactly once, with the gateway's value, whether the
    /// client sent its own copy or a rule sets the same name; a rule for any other
    /// name applies.
    #[test]
    fn the_written_head_carries_each_gateway_field_once() {
        let rules = HeaderRules {
            set: vec![
                (X_FORWARDED_PROTO, HeaderValue::from_static("https")),
                (X_REQUEST_ID, HeaderValue::from_static("from-a-rule")),
                (
                    HeaderName::from_static("x-team"),
                    HeaderValue::from_static("web"),
                ),
            ],
            ..HeaderRules::default()
        };
        let sent = written(
            &[
                ("x-request-id", "client-id"),
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("x-forwarded-proto", "https"),
                ("x-keep", "1"),
            ],
            &rules,
        );
        let values = |name: &str| -> Vec<&str> {
            sent.iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(values("x-request-id"), ["r1"], "{sent:?}");
        assert_eq!(values("x-forwarded-proto"), ["http"]);
        assert_eq!(values("x-forwarded-for"), ["192.0.2.7"]);
        assert_eq!(values("x-real-ip"), ["192.0.2.7"]);
        assert_eq!(
            values("forwarded"),
            ["for=192.0.2.7;host=\"api.example.com\";proto=http"]
        );
        assert_eq!(values("x-forwarded-host"), ["api.example.com"]);
        assert_eq!(values("x-specter-environment"), ["development"]);
        assert_eq!(values("x-specter-key-id"), ["k1"]);
        assert_eq!(values("x-team"), ["web"]);
        assert_eq!(values("x-keep"), ["1"]);
        let traceparent = values("traceparent");
        assert_eq!(traceparent.len(), 1);
        assert_ne!(
            traceparent[0],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert!(values("x-specter-client-cert-subject").is_empty());
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
                && h.get(http::header::CONNECTION).is_none()
        );
        assert_eq!(h["x-keep"], "1");
        assert_eq!(h[X_FORWARDED_FOR], "192.0.2.7");
    }

    /// `Connection` listing only hop-by-hop names (its usual value) takes the path that
    /// matches no name against it; they still go, and nothing else does.
    #[test]
    fn hop_by_hop_options_of_connection_go_with_it() {
        let h = rewritten(
            &[
                ("connection", "Keep-Alive, upgrade, "),
                ("keep-alive", "timeout=5"),
                ("upgrade", "websocket"),
                ("te", "trailers"),
                ("x-keep", "1"),
            ],
            false,
            false,
        );
        for gone in ["connection", "keep-alive", "upgrade", "te"] {
            assert!(h.get(gone).is_none(), "{gone} was forwarded");
        }
        assert_eq!(h["x-keep"], "1");
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
            rewrite_request(&mut h, f, &HeaderRules::default()).insert(&mut h);
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
