//! HTTP/1.1 Upgrade (WebSocket) pass-through. The upgrade is requested upstream only
//! after every check passed, and bytes are tunnelled only once the upstream answered
//! 101; any other answer is an ordinary response and the client connection stays HTTP.

use http::header::{HeaderMap, HeaderValue, CONNECTION, UPGRADE};
use http::{Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// The `Upgrade` protocol a request asks for, when it is a well-formed HTTP/1.1 upgrade.
pub fn requested(req: &http::request::Parts) -> Option<HeaderValue> {
    if req.version != Version::HTTP_11 {
        return None;
    }
    let wants =
        crate::headers::connection_tokens(&req.headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
    wants.then(|| req.headers.get(UPGRADE).cloned()).flatten()
}

/// Restores the upgrade headers that hop-by-hop stripping removed.
pub fn mark(headers: &mut HeaderMap, protocol: HeaderValue) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, protocol);
}

/// The client side of a requested upgrade: its connection, once hyper hands it over,
/// and the connection's slot, which the tunnel keeps for as long as it lives.
pub struct ClientSide {
    pub upgrade: OnUpgrade,
    pub slot: crate::conn::Held,
}

/// When the upstream switched protocols, joins the two upgraded connections and copies
/// bytes both ways until either side closes.
pub fn tunnel<B>(client: ClientSide, upstream: &mut Response<B>) {
    if upstream.status() != StatusCode::SWITCHING_PROTOCOLS {
        return;
    }
    let upstream = hyper::upgrade::on(upstream);
    tokio::spawn(async move {
        let ClientSide {
            upgrade,
            slot: _slot,
        } = client;
        let (client, upstream) = match tokio::join!(upgrade, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}
