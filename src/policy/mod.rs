//! An environment's access policy: host, client address, method, path and body size.

use crate::path;

use std::net::IpAddr;

use http::header::HeaderValue;
use http::{HeaderMap, Method};
use ipnet::IpNet;

use crate::config::PolicyConfig;
use crate::error::GatewayError;

/// The compiled form of [`PolicyConfig`], checked on every request.
#[derive(Debug)]
pub struct Policy {
    pub config: PolicyConfig,
    /// The `Allow` header of a 405, built once.
    allow: HeaderValue,
}

impl Policy {
    pub fn new(config: PolicyConfig) -> Policy {
        let allow = match &config.methods {
            Some(methods) => {
                let list: Vec<&str> = methods.iter().map(Method::as_str).collect();
                HeaderValue::from_str(&list.join(", ")).expect("method names are header-safe")
            }
            None => HeaderValue::from_static(""),
        };
        Policy { config, allow }
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), GatewayError> {
        match &self.config.allow_ips {
            Some(nets) if !nets.iter().any(|n| n.contains(&canonical_ip(ip))) => {
                Err(GatewayError::ForbiddenIp)
            }
            _ => Ok(()),
        }
    }

    pub fn check_method(&self, method: &Method) -> Result<(), GatewayError> {
        match &self.config.methods {
            Some(methods) if !methods.contains(method) => Err(GatewayError::MethodNotAllowed {
                allow: self.allow.clone(),
            }),
            _ => Ok(()),
        }
    }

    /// `path` must already be in normal form ([`path::normalize_path`]). Rules match it
    /// with each segment's `;parameters` removed, since Java servlet containers route
    /// `/a;jsessionid=1/b` as `/a/b`; the upstream still receives the path as sent.
    pub fn check_path(&self, path: &str) -> Result<(), GatewayError> {
        let stripped;
        let path = if path.contains(';') {
            stripped = path::without_parameters(path);
            stripped.as_str()
        } else {
            path
        };
        let fold = self.config.case_insensitive_paths;
        let matches = |p: &String| path_matches(path, p, fold);
        let allowed = self.config.allow_paths.iter().any(matches);
        let denied = self.config.deny_paths.iter().any(matches);
        if allowed && !denied {
            Ok(())
        } else {
            Err(GatewayError::ForbiddenPath)
        }
    }

    /// A tunnel's bytes are never seen by the policy again: only `websocket` and the
    /// protocols the environment lists may open one. Every protocol offered must be one.
    pub fn check_upgrade(&self, offered: &HeaderValue) -> Result<(), GatewayError> {
        let allowed = |name: &str| {
            name.eq_ignore_ascii_case("websocket")
                || self
                    .config
                    .upgrades
                    .iter()
                    .any(|u| u.eq_ignore_ascii_case(name))
        };
        let ok = offered.to_str().is_ok_and(|v| {
            v.split(',')
                .map(|p| p.trim().split('/').next().unwrap_or_default())
                .all(allowed)
        });
        if ok {
            Ok(())
        } else {
            Err(GatewayError::BadRequest(
                "this Upgrade protocol is not allowed here; the environment must list it in policy.upgrades",
            ))
        }
    }

    pub fn check_declared_body(&self, headers: &HeaderMap) -> Result<(), GatewayError> {
        let Some(limit) = self.config.max_body else {
            return Ok(());
        };
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(len) if len > limit => Err(GatewayError::BodyTooLarge { limit }),
            _ => Ok(()),
        }
    }
}

/// Prefix match on whole segments: `/v1` matches `/v1` and `/v1/x`, never `/v10`;
/// `fold` ignores ASCII case.
pub fn path_matches(path: &str, prefix: &str, fold: bool) -> bool {
    let (path, prefix) = (path.as_bytes(), prefix.as_bytes());
    let head = &path[..prefix.len().min(path.len())];
    let same = if fold {
        head.eq_ignore_ascii_case(prefix)
    } else {
        head == prefix
    };
    prefix == b"/" || (same && matches!(path.get(prefix.len()), None | Some(b'/')))
}

/// An IPv4 client seen through an IPv6 socket (`::ffff:a.b.c.d`) is that IPv4 client.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The address decisions are made on. `X-Forwarded-For` is believed only from a trusted
/// proxy, and then only up to the right-most entry that is not itself trusted: anything
/// left of that was written by the client and can be forged.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical_ip(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    let hops = headers
        .get_all(crate::headers::X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect::<Vec<_>>();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            break; // garbage: stop believing the chain here
        };
        client = canonical_ip(ip);
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

/// The request's host without port, lower-case: the authority of an absolute URI
/// (HTTP/2, absolute-form) or else the `Host` header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    let raw = match uri.authority() {
        Some(a) => a.as_str(),
        None => headers.get(http::header::HOST)?.to_str().ok()?,
    };
    Some(strip_port(raw))
}

fn strip_port(authority: &str) -> &str {
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.split(':').next().unwrap_or(host)
}

/// Host allow-list match, case-insensitive, with `*.example.com` wildcards (one label).
pub fn host_allowed(hosts: &[String], host: Option<&str>) -> bool {
    if hosts.is_empty() {
        return true;
    }
    let Some(host) = host else { return false };
    let host = host.trim_end_matches('.');
    hosts.iter().any(|h| match h.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => h.eq_ignore_ascii_case(host),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_prefixes() {
        assert!(path_matches("/v1", "/v1", false));
        assert!(path_matches("/v1/x", "/v1", false));
        assert!(!path_matches("/v10", "/v1", false));
        assert!(path_matches("/anything", "/", false));
        assert!(!path_matches("/V1/x", "/v1", false));
        assert!(path_matches("/V1/x", "/v1", true));
        assert!(!path_matches("/v", "/v1", true));
    }

    #[test]
    fn path_parameters_and_case_do_not_hide_a_denied_path() {
        let policy = |fold| {
            Policy::new(PolicyConfig {
                deny_paths: vec!["/v1/admin".to_owned(), "/v1/internal".to_owned()],
                case_insensitive_paths: fold,
                ..PolicyConfig::default()
            })
        };
        let (exact, folding) = (policy(false), policy(true));
        for path in [
            "/v1/admin;x/y",
            "/v1/internal;jsessionid=1/secret",
            "/v1;a/admin;b",
            "/v1/;x/admin",
        ] {
            assert!(exact.check_path(path).is_err(), "{path}");
        }
        assert!(exact.check_path("/v1/admins;x").is_ok());
        assert!(
            exact.check_path("/V1/Admin/y").is_ok(),
            "case-sensitive by default"
        );
        assert!(folding.check_path("/V1/Admin/y").is_err());
        assert!(folding.check_path("/V1/ADMIN;x/y").is_err());
    }

    #[test]
    fn only_websocket_and_listed_protocols_may_upgrade() {
        let policy = Policy::new(PolicyConfig {
            upgrades: vec!["tcp".to_owned()],
            ..PolicyConfig::default()
        });
        for ok in ["websocket", "WebSocket", "tcp/1", "websocket, tcp"] {
            assert!(
                policy.check_upgrade(&HeaderValue::from_static(ok)).is_ok(),
                "{ok}"
            );
        }
        for refused in ["h2c", "websocket, h2c", "foo", ""] {
            assert!(
                policy
                    .check_upgrade(&HeaderValue::from_static(refused))
                    .is_err(),
                "{refused}"
            );
        }
    }

    #[test]
    fn hosts() {
        let hosts = vec!["api.example.com".to_owned(), "*.dev.example.com".to_owned()];
        assert!(host_allowed(&hosts, Some("API.example.com")));
        assert!(host_allowed(&hosts, Some("a.dev.example.com")));
        assert!(!host_allowed(&hosts, Some("dev.example.com")));
        assert!(!host_allowed(&hosts, Some("a.b.dev.example.com")));
        assert!(!host_allowed(&hosts, None));
        assert!(host_allowed(&[], None));
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("example.com:8080"), "example.com");
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            crate::headers::X_FORWARDED_FOR,
            "1.1.1.1, 2.2.2.2, 10.0.0.7".parse().unwrap(),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(peer, &h, &trusted),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        let stranger: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        assert_eq!(client_ip(peer, &h, &[]), peer);
    }
}
