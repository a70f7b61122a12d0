//! `GatewayError`: every answer the gateway gives by itself, as status + JSON body.
//!
//! `status()` and `code()` are exhaustive matches without a catch-all: a new variant
//! must say what the client sees. Causes are kept as sources, never flattened to text,
//! so a refused connection and a timeout stay distinguishable in logs and metrics.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

use crate::body::{self, Body, BoxError};
use crate::path::PathError;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    // --- the client's fault ---------------------------------------------------------
    #[error("the request is malformed: {0}")]
    BadRequest(&'static str),
    #[error("the request path is refused")]
    BadPath(#[source] PathError),
    /// Names the header this gateway reads, so the client learns where the key goes.
    #[error("no API key was sent")]
    MissingApiKey { header: http::HeaderName },
    #[error("the API key is not valid")]
    InvalidApiKey,
    /// Two keys (two key headers, or a key header and a Bearer): refused, never guessed
    /// between. Same code as an invalid key, as DESIGN.md's table has no other.
    #[error("more than one API key was sent")]
    TwoApiKeys,
    #[error("the API key has expired")]
    ExpiredApiKey,
    #[error("this host is not served for the key's environment")]
    WrongHost,
    #[error("the client address is not allowed for the key's environment")]
    ForbiddenIp,
    #[error("the path is not allowed for the key's environment")]
    ForbiddenPath,
    #[error("the method is not allowed for the key's environment")]
    MethodNotAllowed { allow: HeaderValue },
    #[error("the client did not send its request body in time")]
    RequestTimeout,
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("too many failed authentications from this address")]
    TooManyFailedAuthentications { retry_after: Duration },
    #[error("rate limit ({scope}) exceeded")]
    RateLimited {
        scope: &'static str,
        retry_after: Duration,
    },
    // --- the upstream's fault -------------------------------------------------------
    #[error("the upstream could not be reached")]
    UpstreamUnavailable(#[source] BoxError),
    #[error("the upstream sent no response headers within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("no upstream of the environment is healthy")]
    NoHealthyUpstream,
    // --- ours -------------------------------------------------------------------------
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("the rate-limit store is unavailable")]
    RateLimitStoreUnavailable(#[source] BoxError),
    #[error("the gateway failed internally")]
    Internal,
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            BadRequest(_) | BadPath(_) => StatusCode::BAD_REQUEST,
            MissingApiKey { .. } | InvalidApiKey | TwoApiKeys | ExpiredApiKey => {
                StatusCode::UNAUTHORIZED
            }
            WrongHost | ForbiddenIp | ForbiddenPath => StatusCode::FORBIDDEN,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            RateLimited { .. } | TooManyFailedAuthentications { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            NoHealthyUpstream | ShuttingDown | RateLimitStoreUnavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable machine-readable code clients and dashboards match on.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            BadRequest(_) => "bad_request",
            BadPath(_) => "bad_path",
            MissingApiKey { .. } => "missing_api_key",
            InvalidApiKey | TwoApiKeys => "invalid_api_key",
            ExpiredApiKey => "expired_api_key",
            WrongHost => "wrong_host",
            ForbiddenIp => "forbidden_ip",
            ForbiddenPath => "forbidden_path",
            MethodNotAllowed { .. } => "method_not_allowed",
            RequestTimeout => "request_timeout",
            BodyTooLarge { .. } => "body_too_large",
            RateLimited { .. } => "rate_limited",
            TooManyFailedAuthentications { .. } => "too_many_failed_authentications",
            UpstreamUnavailable(_) => "upstream_unavailable",
            UpstreamTimeout(_) => "upstream_timeout",
            NoHealthyUpstream => "no_healthy_upstream",
            ShuttingDown => "shutting_down",
            RateLimitStoreUnavailable(_) => "rate_limit_store_unavailable",
            Internal => "internal_error",
        }
    }

    /// One sentence for a person. Never includes the key, a hash, or upstream details.
    fn message(&self) -> String {
        match self {
            GatewayError::BadRequest(why) => format!("The request is malformed: {why}."),
            GatewayError::BadPath(why) => format!("The path is refused: {why}."),
            GatewayError::MissingApiKey { header } => {
                format!("Send an API key in the {header} header or as Authorization: Bearer <key>.")
            }
            GatewayError::TwoApiKeys => {
                "Send one API key, not two: either the key header or Authorization: Bearer, once."
                    .into()
            }
            GatewayError::RateLimited { retry_after, .. } => format!(
                "Too many requests; retry after {} s.",
                retry_after_secs(*retry_after)
            ),
            other => {
                let mut s = other.to_string();
                if let Some(first) = s.get_mut(..1) {
                    first.make_ascii_uppercase();
                }
                s.push('.');
                s
            }
        }
    }

    pub fn into_response(self, request_id: &HeaderValue, trace_id: &str) -> Response<Body> {
        let json = serde_json::json!({
            "error": self.code(),
            "message": self.message(),
            "request_id": request_id.to_str().unwrap_or_default(),
            "trace_id": trace_id,
        });
        let mut response = Response::new(body::full(Bytes::from(json.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(crate::headers::X_REQUEST_ID, request_id.clone());
        match &self {
            GatewayError::MethodNotAllowed { allow } => {
                headers.insert(ALLOW, allow.clone());
            }
            GatewayError::RateLimited { retry_after, .. }
            | GatewayError::TooManyFailedAuthentications { retry_after } => {
                headers.insert(RETRY_AFTER, retry_after_secs(*retry_after).into());
            }
            _ => {}
        }
        response
    }
}

/// `Retry-After` is whole seconds, rounded up, and never 0 for a limited request.
pub fn retry_after_secs(d: Duration) -> u64 {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    secs.max(1)
}

/// Displays an error with its whole source chain: "a: b: c".
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}
