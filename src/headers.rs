//! Header names the gateway reads or writes, as constants (no per-request allocation),
//! and the removal of hop-by-hop fields, which the request path and the upstream
//! client's responses share.

use std::borrow::Cow;

use http::header::{GetAll, HeaderMap, HeaderName, HeaderValue, CONNECTION};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
pub const X_SPECTER_ENVIRONMENT: HeaderName = HeaderName::from_static("x-specter-environment");
pub const X_SPECTER_KEY_ID: HeaderName = HeaderName::from_static("x-specter-key-id");
pub const X_SPECTER_CLIENT_CERT_SUBJECT: HeaderName =
    HeaderName::from_static("x-specter-client-cert-subject");
pub const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Hop-by-hop headers (RFC 9110 §7.6.1 plus the legacy ones): never forwarded.
/// A `static`, not a `const`: a `const` array of names is built and dropped at every use.
pub static HOP_BY_HOP: [HeaderName; 9] = [
    http::header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    http::header::PROXY_AUTHENTICATE,
    http::header::PROXY_AUTHORIZATION,
    http::header::TE,
    http::header::TRAILER,
    http::header::TRANSFER_ENCODING,
    http::header::UPGRADE,
];

/// Removes the hop-by-hop headers, every header the `Connection` header names, and those
/// `also` picks, in passes over the names present: a message carries a handful of
/// headers while the candidates are about twenty, so this beats a hashed `remove` per
/// candidate. A pass notes up to `DOOMED_PER_PASS` names to remove (one more pass
/// only if it filled up); `also` names each by a reference of its own where it can, so
/// that no name is cloned (a custom name's first clone allocates). Runs before the
/// gateway sets its own headers, so `Connection: x-specter-environment` removes only
/// the client's copy, never the gateway's.
pub fn remove_where<'r>(
    headers: &mut HeaderMap,
    also: impl Fn(&HeaderName) -> Option<Cow<'r, HeaderName>>,
) {
    let connection = headers.contains_key(CONNECTION);
    // Whether `Connection` names a header that is not hop-by-hop anyway. Nearly never
    // (`keep-alive`, `upgrade`): then no name needs matching against its options.
    let names_others = connection
        && tokens(&headers.get_all(CONNECTION)).any(|t| {
            !t.is_empty()
                && !HOP_BY_HOP
                    .iter()
                    .any(|h| t.eq_ignore_ascii_case(h.as_str()))
        });
    loop {
        let mut doomed: [Option<Cow<'r, HeaderName>>; DOOMED_PER_PASS] = Default::default();
        let mut found = 0;
        // Looked up once a pass, not once a name.
        let listed = names_others.then(|| headers.get_all(CONNECTION));
        for n in headers.keys() {
            // `Connection` goes last (below): the names it lists must all be read first.
            if n == CONNECTION {
                continue;
            }
            let name = match HOP_BY_HOP.iter().find(|h| *h == n) {
                Some(hop) => Some(Cow::Borrowed(hop)),
                None => also(n).or_else(|| {
                    let named = listed.as_ref().is_some_and(|l| lists(l, n));
                    named.then(|| Cow::Owned(n.clone()))
                }),
            };
            if let Some(name) = name {
                doomed[found] = Some(name);
                found += 1;
                if found == DOOMED_PER_PASS {
                    break;
                }
            }
        }
        for name in doomed.iter().flatten() {
            headers.remove(&**name);
        }
        if found < DOOMED_PER_PASS {
            break;
        }
    }
    if connection {
        headers.remove(CONNECTION);
    }
}

/// How many names a pass of [`remove_where`] notes before removing them.
const DOOMED_PER_PASS: usize = 4;

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

pub fn named_by_connection(headers: &HeaderMap, name: &HeaderName) -> bool {
    lists(&headers.get_all(CONNECTION), name)
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    remove_where(headers, |_| None);
}

/// A value the gateway makes per request and then sends twice or more (the request id
/// goes upstream and back to the client; `traceparent` upstream and into a span).
/// Built on a reference-counted array: one allocation, and every clone is a count.
/// (A value from a `Vec` allocates again on its first clone, to share itself.)
pub fn shared_value<const N: usize>(bytes: [u8; N]) -> Option<http::HeaderValue> {
    http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(bytes)).ok()
}

/// A header map from `(name, value)` pairs, in order (repeated names append), for unit
/// tests.
#[cfg(test)]
pub fn map(pairs: &[(&str, &str)]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("a valid header name"),
            v.parse().expect("a valid header value"),
        );
    }
    h
}
