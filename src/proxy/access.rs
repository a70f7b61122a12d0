//! The access log: one line per request, written when the response body has been sent
//! (or abandoned), so it can carry the bytes both ways and the whole duration. When the
//! `specter::access` target is disabled, nothing is wrapped and nothing is counted.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use crate::body::{Body, BoxError};

pub fn enabled() -> bool {
    tracing::enabled!(target: "specter::access", tracing::Level::INFO)
}

/// Everything a line says except what is only known at the end.
pub struct Record {
    pub started: Instant,
    pub request_id: HeaderValue,
    pub trace_id: crate::trace::TraceIdHex,
    pub client_ip: IpAddr,
    pub method: Method,
    /// Logged without its query: keys passed as query parameters never reach a log.
    pub target: Option<http::uri::PathAndQuery>,
    pub status: u16,
    pub environment: Option<Arc<str>>,
    pub key_id: Option<crate::auth::KeyId>,
    pub upstream: Option<String>,
    pub upstream_status: u16,
    pub error: Option<&'static str>,
    /// Request body bytes that went upstream, counted by the body guard.
    pub bytes_in: Arc<AtomicU64>,
}

impl Record {
    fn write(&self, bytes_out: u64, completed: bool) {
        tracing::info!(
            target: "specter::access",
            request_id = self.request_id.to_str().unwrap_or(""),
            trace_id = self.trace_id.as_str(),
            client_ip = %self.client_ip,
            method = %self.method,
            path = self.target.as_ref().map_or("-", |t| t.path()),
            status = self.status,
            environment = self.environment.as_deref().unwrap_or("-"),
            key_id = self.key_id.as_ref().map_or("-", |k| k.as_str()),
            upstream = self.upstream.as_deref().unwrap_or("-"),
            upstream_status = self.upstream_status,
            // Microsecond resolution: more digits are clock noise, and cost log bytes.
            duration_ms = self.started.elapsed().as_micros() as f64 / 1000.0,
            bytes_in = self.bytes_in.load(Ordering::Relaxed),
            bytes_out,
            completed,
            error = self.error.unwrap_or("-"),
        );
    }
}

/// Wraps a response body so the line is written once it ends or is dropped.
pub fn log_on_completion(body: Body, record: Record) -> Body {
    Logged {
        inner: body,
        record,
        bytes_out: 0,
        done: false,
    }
    .boxed()
}

struct Logged {
    inner: Body,
    record: Record,
    bytes_out: u64,
    done: bool,
}

impl HttpBody for Logged {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                self.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64);
            }
            Poll::Ready(None) => self.finish(true),
            Poll::Ready(Some(Err(_))) => self.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Logged {
    fn finish(&mut self, completed: bool) {
        if !self.done {
            self.done = true;
            self.record.write(self.bytes_out, completed);
        }
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // hyper may drop a body it knows is complete (is_end_stream) without polling
        // it to the end; a body dropped early was abandoned by the client.
        let completed = self.inner.is_end_stream();
        self.finish(completed);
    }
}
