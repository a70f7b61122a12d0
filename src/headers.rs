//! Header names the gateway reads or writes, as constants (no per-request allocation).

use http::header::HeaderName;

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
