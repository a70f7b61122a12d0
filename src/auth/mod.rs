//! API key extraction and lookup: request headers -> the caller's key.
//!
//! Keys are looked up by their SHA-256 digest in the [`KeyTable`], so the cost is one
//! hash of the presented key plus one short scan, whatever the number of keys.

mod table;

pub use table::{Found, KeyTable, KeyView, Window};

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header::{HeaderName, HeaderValue, AUTHORIZATION};
use http::HeaderMap;

use crate::digest::sha256;
use crate::error::GatewayError;

/// Per-key usage counters, shared across config reloads for keys that remain.
/// Plain atomics: updating them never takes a lock on the request path.
#[derive(Debug, Default)]
pub struct KeyUsage {
    pub requests: AtomicU64,
    /// Milliseconds since the Unix epoch; 0 = never.
    pub last_seen_ms: AtomicU64,
    /// Replaced only when the client address changes, so the usual request (same
    /// client as last time) costs a load and a compare, no allocation.
    pub last_ip: arc_swap::ArcSwapOption<IpAddr>,
}

impl KeyUsage {
    pub fn record(&self, now: SystemTime, ip: IpAddr) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let ms = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_seen_ms.fetch_max(ms, Ordering::Relaxed);
        if self.last_ip.load().as_deref() != Some(&ip) {
            self.last_ip.store(Some(Arc::new(ip)));
        }
    }
}

/// A key's id. It shares the key table's memory and is a ready `x-specter-key-id`
/// value; it also names the key's per-key rate-limit bucket.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct KeyId(HeaderValue);

impl KeyId {
    pub fn as_str(&self) -> &str {
        // Ids are validated ASCII at load time.
        self.0.to_str().unwrap_or_default()
    }

    pub fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

impl From<&str> for KeyId {
    /// A copy of `id`; for ids that are not in a table (tests, benches). `id` must be a
    /// valid header value, as validated key ids are.
    fn from(id: &str) -> KeyId {
        KeyId(HeaderValue::from_str(id).expect("a key id is a valid header value"))
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which header carried the key, so forwarding removes exactly that one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Header,
    Bearer,
}

/// Reads the single API key of a request. Two key headers, or `Bearer` with nothing
/// after it, are refused rather than guessed at.
pub fn extract<'h>(
    headers: &'h HeaderMap,
    header: &HeaderName,
) -> Result<(&'h [u8], KeySource), GatewayError> {
    let mut found: Option<(&[u8], KeySource)> = None;
    for value in headers.get_all(header) {
        if found.is_some() {
            return Err(GatewayError::TwoApiKeys);
        }
        found = Some((value.as_bytes().trim_ascii(), KeySource::Header));
    }
    for value in headers.get_all(AUTHORIZATION) {
        let v = value.as_bytes();
        let is_bearer = v.len() >= 6 && v[..6].eq_ignore_ascii_case(b"bearer");
        if !is_bearer || (v.len() > 6 && v[6] != b' ') {
            continue; // another scheme (Basic ...) is the upstream's business
        }
        if found.is_some() {
            return Err(GatewayError::TwoApiKeys);
        }
        found = Some((v[6..].trim_ascii(), KeySource::Bearer));
    }
    match found {
        None => Err(GatewayError::MissingApiKey {
            header: header.clone(),
        }),
        Some((b"", _)) => Err(GatewayError::InvalidApiKey),
        Some(found) => Ok(found),
    }
}

/// Finds the key's entry and checks its validity window. A key not yet valid answers
/// exactly like an unknown one: callers learn nothing about staged keys.
pub fn lookup<'t>(
    keys: &'t KeyTable,
    key: &[u8],
    now: SystemTime,
) -> Result<Found<'t>, GatewayError> {
    let found = keys.find(&sha256(key)).ok_or(GatewayError::InvalidApiKey)?;
    let window = found.window();
    if window.not_before.is_some_and(|nb| now < nb) {
        return Err(GatewayError::InvalidApiKey);
    }
    if window.not_after.is_some_and(|na| now >= na) {
        return Err(GatewayError::ExpiredApiKey);
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map as headers;

    const H: HeaderName = HeaderName::from_static("x-api-key");

    #[test]
    fn extraction() {
        let ok =
            |pairs: &[(&str, &str)]| extract(&headers(pairs), &H).map(|(k, s)| (k.to_vec(), s));
        assert_eq!(
            ok(&[("x-api-key", "k1")]).unwrap(),
            (b"k1".to_vec(), KeySource::Header)
        );
        assert_eq!(
            ok(&[("authorization", "Bearer k2")]).unwrap(),
            (b"k2".to_vec(), KeySource::Bearer)
        );
        assert_eq!(
            ok(&[("authorization", "bearer  k2 ")]).unwrap().0,
            b"k2".to_vec()
        );
        assert!(matches!(ok(&[]), Err(GatewayError::MissingApiKey { .. })));
        assert!(matches!(
            ok(&[("authorization", "Basic abc")]),
            Err(GatewayError::MissingApiKey { .. })
        ));
        assert!(matches!(
            ok(&[("authorization", "Bearer")]),
            Err(GatewayError::InvalidApiKey)
        ));
        assert!(matches!(
            ok(&[("authorization", "Bearer ")]),
            Err(GatewayError::InvalidApiKey)
        ));
        assert!(matches!(
            ok(&[("x-api-key", "a"), ("x-api-key", "a")]),
            Err(GatewayError::TwoApiKeys)
        ));
        assert!(matches!(
            ok(&[("x-api-key", "a"), ("authorization", "Bearer a")]),
            Err(GatewayError::TwoApiKeys)
        ));
        assert!(matches!(
            ok(&[("x-api-key", "")]),
            Err(GatewayError::InvalidApiKey)
        ));
    }
}
