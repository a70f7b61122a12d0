//! The client connection's IO wrapper: it sees every byte before hyper does, which is
//! where two things are cheapest to notice.
//!
//! - Framing hyper tolerates but specter refuses (see [`crate::framing`]), in every
//!   request head: bare-LF line endings, and `Content-Length` together with
//!   `Transfer-Encoding` (hyper drops the former before a handler sees it). Only head
//!   bytes are looked at (bytes read while no request is being handled), and only at
//!   line ends found with `memchr` plus the first 18 bytes of each line: a head costs a
//!   few dozen nanoseconds, a body nothing.
//! - Activity, for the idle timeout: each read or write bumps a counter (no clock read
//!   on the hot path); the connection's watchdog compares it between ticks.
//! - The start of an HTTP/1 request head (bytes read while no request is being
//!   handled), for `header_read_timeout`: hyper's own header timer also runs while a
//!   keep-alive connection waits for its next request, which would make
//!   `header_read_timeout` the keep-alive limit instead of `idle_timeout`.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::ConnSignals;

pin_project_lite::pin_project! {
    pub struct ClientIo<I> {
        #[pin]
        inner: I,
        signals: Arc<ConnSignals>,
        head: HeadScan,
        // The connection opened with the HTTP/2 preface: no HTTP/1 heads to time.
        http2: bool,
    }
}

impl<I> ClientIo<I> {
    pub fn new(inner: I, signals: Arc<ConnSignals>) -> Self {
        ClientIo {
            inner,
            signals,
            head: HeadScan::default(),
            http2: false,
        }
    }
}

/// What is known of the request head being read.
#[derive(Default)]
struct HeadScan {
    /// The blank line that ends the head was seen: the rest is body (or nothing).
    done: bool,
    /// A line with content arrived: empty lines before the request line (RFC 9112
    /// §2.2, skipped by hyper) do not end the head.
    started: bool,
    /// The last byte of the previous read, for a CR and LF split across reads.
    prev: u8,
    /// The current line's first bytes, lower-cased, to spot two header names.
    line: [u8; 18],
    line_len: usize,
    /// Bytes of the current line so far (only whether it is empty matters).
    line_bytes: usize,
    content_length: bool,
    transfer_encoding: bool,
}

/// A head ended, and what it held.
enum HeadEvent {
    None,
    Http2Preface,
}

impl HeadScan {
    /// Takes the next bytes of the head; stops at its end.
    fn feed(&mut self, mut bytes: &[u8], signals: &ConnSignals) -> HeadEvent {
        let mut event = HeadEvent::None;
        while !self.done && !bytes.is_empty() {
            let Some(i) = memchr::memchr(b'\n', bytes) else {
                self.take(bytes);
                break;
            };
            self.take(&bytes[..i]);
            let before = if i > 0 { bytes[i - 1] } else { self.prev };
            if before != b'\r' {
                signals.bare_lf.store(true, Ordering::Relaxed);
            }
            if self.end_line(before == b'\r') {
                event = HeadEvent::Http2Preface;
            }
            if self.done && self.content_length && self.transfer_encoding {
                signals.length_and_chunked.store(true, Ordering::Relaxed);
            }
            self.prev = b'\n';
            bytes = &bytes[i + 1..];
        }
        event
    }

    fn take(&mut self, part: &[u8]) {
        let room = self.line.len() - self.line_len;
        for (slot, b) in self.line[self.line_len..].iter_mut().zip(part) {
            *slot = b.to_ascii_lowercase();
        }
        self.line_len += room.min(part.len());
        self.line_bytes += part.len();
        if let Some(&last) = part.last() {
            self.prev = last;
        }
    }

    /// Ends the current line; true when it was the HTTP/2 preface.
    fn end_line(&mut self, crlf: bool) -> bool {
        let empty = self.line_bytes == usize::from(crlf);
        let name = &self.line[..self.line_len];
        let preface = name.starts_with(b"pri * http/2.0");
        if empty {
            self.done = self.started;
        } else {
            self.started = true;
            self.content_length |= name.starts_with(b"content-length:");
            self.transfer_encoding |= name.starts_with(b"transfer-encoding:");
        }
        (self.line_len, self.line_bytes) = (0, 0);
        preface
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
        let fresh = &buf.filled()[before..];
        if fresh.is_empty() {
            return result;
        }
        this.signals.activity.fetch_add(1, Ordering::Relaxed);
        if *this.http2 || this.signals.in_flight.load(Ordering::Relaxed) > 0 {
            return result;
        }
        // Bytes while no request is handled start (or continue) a request head.
        if !this.signals.head_started.swap(true, Ordering::Relaxed) {
            *this.head = HeadScan::default();
            this.signals.bare_lf.store(false, Ordering::Relaxed);
            this.signals
                .length_and_chunked
                .store(false, Ordering::Relaxed);
        }
        if let HeadEvent::Http2Preface = this.head.feed(fresh, this.signals) {
            *this.http2 = true;
            this.signals.head_started.store(false, Ordering::Relaxed);
            this.signals.bare_lf.store(false, Ordering::Relaxed);
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

    #[test]
    fn a_head_split_into_single_bytes_is_read_the_same() {
        let head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\ncontent-LENGTH: 5\r\n\r\n";
        let signals = ConnSignals::default();
        let mut scan = HeadScan::default();
        for b in head {
            scan.feed(std::slice::from_ref(b), &signals);
        }
        assert!(scan.done);
        assert!(signals.length_and_chunked.load(Ordering::Relaxed));
        assert!(
            !signals.bare_lf.load(Ordering::Relaxed),
            "a CR and LF in two reads"
        );
    }

    /// Every head is read, not only the first: after a request was handled, the next
    /// head starts a fresh scan, and its findings replace the previous head's.
    ///
    /// Failing when written: only a connection's first head was scanned, so CL+TE on
    /// the second request of a keep-alive connection was forwarded as chunked.
    #[tokio::test]
    async fn the_second_head_of_a_connection_is_read_too() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let signals = Arc::new(ConnSignals::default());
        let mut io = ClientIo::new(server, signals.clone());
        let mut buf = [0u8; 4096];
        let both = || signals.length_and_chunked.load(Ordering::Relaxed);

        let first = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        client.write_all(first).await.unwrap();
        io.read_exact(&mut buf[..first.len()]).await.unwrap();
        assert!(!both());
        // The service takes the request (and answers it) before the next head comes.
        signals.head_started.store(false, Ordering::Relaxed);

        let second = b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        client.write_all(second).await.unwrap();
        io.read_exact(&mut buf[..second.len()]).await.unwrap();
        assert!(both(), "the second head's CL+TE was not seen");
    }

    #[tokio::test]
    async fn bare_lf_in_the_first_head_is_noticed() {
        assert!(!scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith\nlf").await);
        assert!(scan(b"GET / HTTP/1.1\nHost: a\n\n").await);
        assert!(scan(b"GET / HTTP/1.1\r\nHost: a\nX: b\r\n\r\n").await);
    }
}
