//! The client connection's IO wrapper: it sees every byte before hyper does, which is
//! where two things are cheapest to notice.
//!
//! - Framing hyper tolerates but specter refuses (see [`crate::framing`]), in the
//!   connection's first request head: bare-LF line endings, and `Content-Length`
//!   together with `Transfer-Encoding` (hyper drops the former before a handler sees it).
//! - Activity, for the idle timeout: each read or write bumps a counter (no clock read
//!   on the hot path); the connection's watchdog compares it between ticks.
//! - The start of an HTTP/1 request head (bytes read while no request is being
//!   handled), for `header_read_timeout`: hyper's own header timer also runs while a
//!   keep-alive connection waits for its next request, which would make
//!   `header_read_timeout` the keep-alive limit instead of `idle_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the wrapper reports to the rest of the connection.
#[derive(Debug, Default)]
pub struct ConnSignals {
    pub bare_lf: AtomicBool,
    pub length_and_chunked: AtomicBool,
    pub activity: AtomicU64,
    /// Requests that reached the handler on this connection.
    pub requests: AtomicU64,
    /// Requests being handled (not counting response bodies still streaming, which
    /// show up as activity).
    pub in_flight: AtomicU64,
    /// HTTP/1 request bytes arrived while no request was being handled: a head is
    /// under way. Cleared when the request reaches the handler.
    pub head_started: AtomicBool,
}

pin_project_lite::pin_project! {
    pub struct ClientIo<I> {
        #[pin]
        inner: I,
        signals: Arc<ConnSignals>,
        prev: u8,
        // Consecutive line endings seen; 2 ends the first head and the scan.
        newlines: u8,
        // A byte other than CR or LF arrived: the empty lines a client may send before
        // its request line (RFC 9112 §2.2, skipped by hyper) do not end the head.
        started: bool,
        head_done: bool,
        // The start of the current line, lower-cased, to spot two header names.
        line: [u8; 18],
        line_len: usize,
        content_length: bool,
        transfer_encoding: bool,
        // The connection opened with the HTTP/2 preface: no HTTP/1 heads to time.
        http2: bool,
    }
}

impl<I> ClientIo<I> {
    pub fn new(inner: I, signals: Arc<ConnSignals>) -> Self {
        ClientIo {
            inner,
            signals,
            prev: 0,
            newlines: 0,
            started: false,
            head_done: false,
            line: [0; 18],
            line_len: 0,
            content_length: false,
            transfer_encoding: false,
            http2: false,
        }
    }
}

impl<I: AsyncRead> AsyncRead for ClientIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let result = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.signals.activity.fetch_add(1, Ordering::Relaxed);
            if !*this.http2 && this.signals.in_flight.load(Ordering::Relaxed) == 0 {
                this.signals.head_started.store(true, Ordering::Relaxed);
            }
        }
        if !*this.head_done {
            for &b in &buf.filled()[before..] {
                match b {
                    b'\n' => {
                        if *this.prev != b'\r' {
                            this.signals.bare_lf.store(true, Ordering::Relaxed);
                        }
                        let name = &this.line[..*this.line_len];
                        if name.starts_with(b"pri * http/2.0") {
                            *this.http2 = true;
                            this.signals.head_started.store(false, Ordering::Relaxed);
                        }
                        *this.content_length |= name.starts_with(b"content-length:");
                        *this.transfer_encoding |= name.starts_with(b"transfer-encoding:");
                        *this.line_len = 0;
                        *this.newlines += u8::from(*this.started);
                        if *this.newlines == 2 {
                            *this.head_done = true;
                            if *this.content_length && *this.transfer_encoding {
                                this.signals
                                    .length_and_chunked
                                    .store(true, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                    b'\r' => {}
                    _ => {
                        *this.started = true;
                        *this.newlines = 0;
                        if *this.line_len < this.line.len() {
                            this.line[*this.line_len] = b.to_ascii_lowercase();
                            *this.line_len += 1;
                        }
                    }
                }
                *this.prev = b;
            }
        }
        result
    }
}

impl<I: AsyncWrite> AsyncWrite for ClientIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.signals.activity.fetch_add(1, Ordering::Relaxed);
        this.inner.poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        this.signals.activity.fetch_add(1, Ordering::Relaxed);
        this.inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    async fn signals(bytes: &'static [u8]) -> Arc<ConnSignals> {
        let signals = Arc::new(ConnSignals::default());
        let mut io = ClientIo::new(bytes, signals.clone());
        let mut out = Vec::new();
        io.read_to_end(&mut out).await.unwrap();
        signals
    }

    async fn scan(bytes: &'static [u8]) -> bool {
        signals(bytes).await.bare_lf.load(Ordering::Relaxed)
    }

    #[tokio::test]
    async fn length_with_chunked_in_the_first_head_is_noticed() {
        let both =
            signals(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n")
                .await;
        assert!(both.length_and_chunked.load(Ordering::Relaxed));
        let after_empty_lines = signals(
            b"\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        )
        .await;
        assert!(
            after_empty_lines.length_and_chunked.load(Ordering::Relaxed),
            "empty lines before the request line do not end the head"
        );
        let one =
            signals(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\ntransfer-encoding: x\r\n").await;
        assert!(
            !one.length_and_chunked.load(Ordering::Relaxed),
            "body bytes are not headers"
        );
    }

    #[tokio::test]
    async fn request_bytes_start_a_head_but_the_http2_preface_does_not() {
        let h1 = signals(b"GET / HTTP/1.1\r\nHost: a\r\n").await;
        assert!(h1.head_started.load(Ordering::Relaxed));
        let h2 = signals(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00").await;
        assert!(!h2.head_started.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn bare_lf_in_the_first_head_is_noticed() {
        assert!(!scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith\nlf").await);
        assert!(scan(b"GET / HTTP/1.1\nHost: a\n\n").await);
        assert!(scan(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n").await);
    }
}
