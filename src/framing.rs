//! HTTP/1 framing strictness: requests whose framing two parsers could read differently
//! (the raw material of request smuggling) are refused with 400 and a closed connection.
//!
//! hyper already refuses duplicate differing `Content-Length`, obs-fold and transfer
//! codings that do not end in `chunked`. Refused here as well:
//! - a `Transfer-Encoding` other than one single `chunked` (`gzip, chunked`, two lines);
//! - `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.3 lets a server
//!   reject it, and a proxy should). hyper's parser drops the `Content-Length` before a
//!   handler sees the headers, so the connection's IO wrapper
//!   ([`crate::server::io::ClientIo`]), which sees the raw bytes, reports it for every
//!   request head (empty lines before the request line included). The header check
//!   below only guards against a parser that would keep both. One form is left to
//!   hyper: a head pipelined behind a request whose body is still being read is not
//!   scanned, and such a head with both is read as chunked, its `Content-Length`
//!   dropped, and the connection closed after the response (the RFC's other answer);
//! - bare-LF line endings in a head, also seen by the IO wrapper. specter re-frames
//!   every request with CRLF, so no difference can reach an upstream either way.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Uri, Version};

use std::sync::atomic::Ordering;

use crate::conn::ConnSignals;
use crate::error::GatewayError;

/// `signals` carries what the connection's IO wrapper saw in the raw first head.
pub fn check_request(
    version: Version,
    headers: &HeaderMap,
    signals: &ConnSignals,
) -> Result<(), GatewayError> {
    if version >= Version::HTTP_2 {
        return Ok(()); // binary framing: none of this applies
    }
    if signals.bare_lf.load(Ordering::Relaxed) {
        return Err(GatewayError::BadRequest(
            "a header line ends in a bare LF; use CRLF",
        ));
    }
    if signals.length_and_chunked.load(Ordering::Relaxed) {
        return Err(GatewayError::BadRequest(
            "both Content-Length and Transfer-Encoding are set",
        ));
    }
    // hyper reads `005` as 5; an upstream or a middlebox may read it otherwise.
    if let Some(len) = headers.get(CONTENT_LENGTH) {
        if len.len() > 1 && len.as_bytes()[0] == b'0' {
            return Err(GatewayError::BadRequest(
                "Content-Length must be a plain number without leading zeros",
            ));
        }
    }
    let mut codings = headers.get_all(TRANSFER_ENCODING).iter();
    if let Some(first) = codings.next() {
        if headers.contains_key(CONTENT_LENGTH) {
            return Err(GatewayError::BadRequest(
                "both Content-Length and Transfer-Encoding are set",
            ));
        }
        if codings.next().is_some() || !first.as_bytes().eq_ignore_ascii_case(b"chunked") {
            return Err(GatewayError::BadRequest(
                "Transfer-Encoding must be exactly `chunked`",
            ));
        }
    }
    Ok(())
}

/// RFC 9112 §3.2: exactly one `Host` (HTTP/1.1; HTTP/1.0 and HTTP/2 at most one),
/// a valid `host[:port]` with no userinfo and a port in 1-65535, equal to the target's
/// authority when the target has one (absolute form, HTTP/2 `:authority`).
pub fn check_host(version: Version, uri: &Uri, headers: &HeaderMap) -> Result<(), GatewayError> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() {
        return Err(GatewayError::BadRequest("send one Host header, not two"));
    }
    let bad = || GatewayError::BadRequest("the Host header is not a valid host[:port]");
    let valid = |a: &str| {
        if valid_host_port(a) {
            Ok(())
        } else {
            Err(bad())
        }
    };
    match (host, uri.authority()) {
        (None, None) if version == Version::HTTP_11 => Err(GatewayError::BadRequest(
            "an HTTP/1.1 request needs a Host header",
        )),
        (None, authority) => authority.map_or(Ok(()), |a| valid(a.as_str())),
        (Some(host), authority) => {
            let host = host.to_str().map_err(|_| bad())?;
            valid(host)?;
            match authority {
                Some(a) if !a.as_str().eq_ignore_ascii_case(host) => Err(GatewayError::BadRequest(
                    "the request target's authority differs from the Host header",
                )),
                _ => Ok(()),
            }
        }
    }
}

/// RFC 3986 `host [":" port]`: an IPv6 literal in brackets, or a non-empty reg-name /
/// IPv4 (no userinfo: `@` is not among its characters), and a port in 1-65535. Checked
/// in place, since every request passes here (parsing an `Authority` copies it).
fn valid_host_port(s: &str) -> bool {
    let (host_ok, port) = match s.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) => (v6.parse::<std::net::Ipv6Addr>().is_ok(), port),
            None => return false,
        },
        None => {
            let (host, port) = match s.rfind(':') {
                Some(i) => s.split_at(i),
                None => (s, ""),
            };
            let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b);
            (!host.is_empty() && host.bytes().all(reg_name), port)
        }
    };
    let port_ok = match port.strip_prefix(':') {
        Some(digits) => digits.parse::<u16>().is_ok_and(|p| p != 0),
        None => port.is_empty(),
    };
    host_ok && port_ok
}

/// `Upgrade: h2c` is refused outright: specter speaks HTTP/2 itself, and an h2c tunnel
/// would carry streams that no check ever sees.
pub fn check_h2c(headers: &HeaderMap) -> Result<(), GatewayError> {
    let h2c = headers.get_all(UPGRADE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|p| {
                p.trim()
                    .split('/')
                    .next()
                    .is_some_and(|n| n.eq_ignore_ascii_case("h2c"))
            })
        })
    });
    if h2c {
        return Err(GatewayError::BadRequest(
            "Upgrade: h2c is refused; use HTTP/2 over TLS (ALPN) or with prior knowledge",
        ));
    }
    Ok(())
}

/// The status hyper answered a connection's request head with by itself, before any
/// handler ran (so `specter_requests_total` would otherwise never see it): 400 for a
/// malformed method, target, version or header, 431 for too many or too large headers,
/// 414 for a target over hyper's limit. `None` for any other connection error.
pub fn parser_refusal(error: &(dyn std::error::Error + 'static)) -> Option<u16> {
    let error = error.downcast_ref::<hyper::Error>()?;
    if !error.is_parse() || error.is_parse_version_h2() {
        return None;
    }
    if error.is_parse_too_large() {
        // hyper says which of its two "too large" kinds only in the message.
        return Some(if error.to_string().contains("URI") {
            414
        } else {
            431
        });
    }
    Some(400)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::headers::map as headers;

    #[test]
    fn ambiguous_framing_is_refused() {
        let v = Version::HTTP_11;
        let ok = ConnSignals::default();
        assert!(check_request(v, &headers(&[("content-length", "5")]), &ok).is_ok());
        assert!(check_request(v, &headers(&[("transfer-encoding", "chunked")]), &ok).is_ok());
        assert!(check_request(v, &headers(&[("transfer-encoding", "Chunked")]), &ok).is_ok());
        for bad in [
            &[("content-length", "5"), ("transfer-encoding", "chunked")][..],
            &[
                ("transfer-encoding", "chunked"),
                ("transfer-encoding", "chunked"),
            ][..],
            &[("transfer-encoding", "gzip, chunked")][..],
        ] {
            assert!(check_request(v, &headers(bad), &ok).is_err(), "{bad:?}");
        }
        let bare_lf = ConnSignals::default();
        bare_lf.bare_lf.store(true, Ordering::Relaxed);
        assert!(check_request(v, &HeaderMap::new(), &bare_lf).is_err());
        assert!(check_request(Version::HTTP_2, &HeaderMap::new(), &bare_lf).is_ok());
        assert!(check_request(v, &headers(&[("content-length", "005")]), &ok).is_err());
        assert!(check_request(v, &headers(&[("content-length", "0")]), &ok).is_ok());
    }

    #[test]
    fn one_valid_host_that_matches_the_target() {
        let v = Version::HTTP_11;
        let origin: Uri = "/v1/x".parse().unwrap();
        let check = |uri: &Uri, pairs: &[(&str, &str)]| check_host(v, uri, &headers(pairs));
        for ok in [
            "api.example.com",
            "api.example.com:8443",
            "127.0.0.1:8080",
            "[::1]:80",
            "[::1]",
        ] {
            assert!(check(&origin, &[("host", ok)]).is_ok(), "{ok}");
        }
        for bad in [
            &[("host", "a.example.com"), ("host", "b.example.com")][..],
            &[("host", "evil.com@api.example.com")][..],
            &[("host", "api.example.com:99999")][..],
            &[("host", "api.example.com:0")][..],
            &[("host", "api.example.com:")][..],
            &[("host", "")][..],
            &[("host", "[::1")][..],
            &[("host", "[zz]:80")][..],
            &[("host", "a/b")][..],
            &[][..],
        ] {
            assert!(check(&origin, bad).is_err(), "{bad:?}");
        }
        let absolute: Uri = "http://api.example.com/v1/x".parse().unwrap();
        assert!(check(&absolute, &[("host", "API.example.com")]).is_ok());
        assert!(check(&absolute, &[("host", "other.example.com")]).is_err());
        assert!(check_host(Version::HTTP_10, &origin, &HeaderMap::new()).is_ok());
        assert!(check_host(Version::HTTP_2, &absolute, &HeaderMap::new()).is_ok());
    }

    #[test]
    fn h2c_is_refused_in_any_spelling() {
        for bad in ["h2c", "H2C", "websocket, h2c", "h2c/1"] {
            assert!(check_h2c(&headers(&[("upgrade", bad)])).is_err(), "{bad}");
        }
        assert!(check_h2c(&headers(&[("upgrade", "websocket")])).is_ok());
    }
}
