//! The one body type the gateway passes around, and the guards wrapped around client
//! request bodies (size limit, read timeout) before they stream upstream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, SizeHint};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// No body; a zero-sized one, so boxing it allocates nothing.
pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}

/// The request body grew past `max_body` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The client sent no body bytes for `body_read_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("the client sent no request body data for {0:?}")]
pub struct BodyReadTimeout(pub Duration);

pin_project_lite::pin_project! {
    /// Streams a client's request body upstream, failing it once more than `limit`
    /// bytes passed, when no data arrived for `timeout`, or when the whole body took
    /// longer than `body_timeout`. The failure aborts the upstream request, so the
    /// upstream never sees a complete oversized or stalled request.
    pub struct Guarded<B> {
        #[pin]
        inner: B,
        seen: u64,
        limit: Option<u64>,
        timeout: Duration,
        // When the whole body must be in (`body_timeout`), if bounded.
        end: Option<tokio::time::Instant>,
        #[pin]
        deadline: tokio::time::Sleep,
        // Bytes passed, for the access log (when it is on).
        counter: Option<Arc<AtomicU64>>,
    }
}

impl<B> Guarded<B> {
    pub fn new(
        inner: B,
        limit: Option<u64>,
        (timeout, whole): (Duration, Option<Duration>),
        counter: Option<Arc<AtomicU64>>,
    ) -> Self {
        let now = tokio::time::Instant::now();
        let end = whole.map(|w| now + w);
        Guarded {
            inner,
            seen: 0,
            limit,
            timeout,
            end,
            deadline: tokio::time::sleep_until(next_deadline(now, timeout, end)),
            counter,
        }
    }
}

/// The next pause deadline, never past the whole body's.
fn next_deadline(
    now: tokio::time::Instant,
    pause: Duration,
    end: Option<tokio::time::Instant>,
) -> tokio::time::Instant {
    let next = now + pause;
    end.map_or(next, |end| next.min(end))
}

impl<B> HttpBody for Guarded<B>
where
    B: HttpBody<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                ready!(this.deadline.as_mut().poll(cx));
                return Poll::Ready(Some(Err(Box::new(BodyReadTimeout(*this.timeout)))));
            }
        };
        if let Some(data) = frame.data_ref() {
            *this.seen += data.len() as u64;
            if let Some(counter) = this.counter {
                counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if let Some(limit) = *this.limit {
                if *this.seen > limit {
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit }))));
                }
            }
            let next = next_deadline(tokio::time::Instant::now(), *this.timeout, *this.end);
            this.deadline.as_mut().reset(next);
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Finds a cause of type `T` anywhere in an error's source chain.
pub fn find_cause<'a, T: std::error::Error + 'static>(
    mut err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    loop {
        if let Some(t) = err.downcast_ref::<T>() {
            return Some(t);
        }
        err = err.source()?;
    }
}
