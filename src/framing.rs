//! HTTP/1 framing strictness: requests whose framing two parsers could read differently
//! (the raw material of request smuggling) are refused with 400 and a closed connection.
//!
//! hyper already refuses duplicate differing `Content-Length`, obs-fold and transfer
//! codings that do not end in `chunked`. Refused here as well:
//! - a `Transfer-Encoding` other than one single `chunked` (`gzip, chunked`, two lines);
//! - `Content-Length` together with `Transfer-Encoding` (RFC 9112 §6.3 lets a server
//!   reject it, and a proxy should). hyper's parser drops the `Content-Length` before a
//!   handler sees the headers, so the connection's IO wrapper
//!   ([`crate::server::io::ClientIo`]), which sees the raw bytes, reports it for the
//!   first head of a connection. A later head with both is read as chunked, its
//!   `Content-Length` dropped, and hyper closes the connection after the response (the
//!   RFC's other allowed answer). The header check below only guards against a parser
//!   that would keep both;
//! - bare-LF line endings in the first head, also seen by the IO wrapper. Later heads
//!   are parsed by hyper's lenient parser, but specter re-frames every request with
//!   CRLF, so no such difference can reach an upstream.

use http::header::{CONTENT_LENGTH, TRANSFER_ENCODING};
use http::{HeaderMap, Version};

use std::sync::atomic::Ordering;

use crate::error::GatewayError;
use crate::server::io::ConnSignals;

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
    }
}
