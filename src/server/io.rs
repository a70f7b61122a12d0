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
//!   on the hot path); the gateway's sweeper compares it between looks.
//! - The start of an HTTP/1 request head (bytes read while no request is being
//!   handled), for `header_read_timeout`: hyper's own header timer also runs while a
//!   keep-alive connection waits for its next request, which would make
//!   `header_read_timeout` the keep-alive limit instead of `idle_timeout`.
//! - Which protocol the client speaks: [`ClientIo::poll_sniff`] reads the first bytes,
//!   up to the length of HTTP/2's preface, and hands them to hyper again with its
//!   first read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

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
        replay: Replay,
    }
}

/// The client's first bytes, read by [`ClientIo::poll_sniff`] and not yet handed on.
#[derive(Default)]
struct Replay {
    bytes: [u8; H2_PREFACE.len()],
    start: u8,
    end: u8,
}

const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection's first bytes say it speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl<I> ClientIo<I> {
    pub fn new(inner: I, signals: Arc<ConnSignals>) -> Self {
        ClientIo {
            inner,
            signals,
            head: HeadScan::default(),
            http2: false,
            replay: Replay::default(),
        }
    }
}

impl<I: AsyncRead> ClientIo<I> {
    /// Reads until the first bytes either are HTTP/2's preface or cannot be; the end
    /// of the stream before that says HTTP/1 (hyper then sees the end and closes).
    ///
    /// hyper-util's automatic builder does the same with a buffer of its own, which
    /// hyper's first read then gets alone: a head that arrived whole is parsed in two
    /// reads, and the second doubles hyper's read buffer to 16 KiB for the life of the
    /// connection (measured with DHAT: 8 KiB more per idle connection).
    pub fn poll_sniff(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<Protocol>> {
        let mut this = self.project();
        loop {
            let end = usize::from(this.replay.end);
            if this.replay.bytes[..end] != H2_PREFACE[..end] {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            if end == H2_PREFACE.len() {
                // Not a request head: nothing to time or to scan from here on.
                *this.http2 = true;
                this.signals.head_started.store(false, Ordering::Relaxed);
                this.signals.bare_lf.store(false, Ordering::Relaxed);
                return Poll::Ready(Ok(Protocol::Http2));
            }
            let mut buf = ReadBuf::new(&mut this.replay.bytes[end..]);
            ready!(poll_fresh(
                this.inner.as_mut(),
                this.signals,
                this.head,
                *this.http2,
                cx,
                &mut buf
            ))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(Protocol::Http1));
            }
            // At most 24: the preface's length.
            this.replay.end += buf.filled().len() as u8;
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
    line_len: u8,
    /// Bytes of the current line so far, saturating: only whether it is empty
    /// matters. Bytes, not words: the scan lives in the connection's task, whose
    /// cell 16 bytes less keeps under tokio's next 128-byte step (1,024 -> 896).
    line_bytes: u8,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Takes the next bytes of the head; stops at its end.
    fn feed(&mut self, mut bytes: &[u8], signals: &ConnSignals) {
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
            self.end_line(before == b'\r');
            if self.done && self.content_length && self.transfer_encoding {
                signals.length_and_chunked.store(true, Ordering::Relaxed);
            }
            self.prev = b'\n';
            bytes = &bytes[i + 1..];
        }
    }

    fn take(&mut self, part: &[u8]) {
        let len = usize::from(self.line_len);
        for (slot, b) in self.line[len..].iter_mut().zip(part) {
            *slot = b.to_ascii_lowercase();
        }
        // At most the line's 18 bytes.
        self.line_len = (self.line.len().min(len + part.len())) as u8;
        let taken = u8::try_from(part.len()).unwrap_or(u8::MAX);
        self.line_bytes = self.line_bytes.saturating_add(taken);
        if let Some(&last) = part.last() {
            self.prev = last;
        }
    }

    /// Ends the current line.
    fn end_line(&mut self, crlf: bool) {
        let empty = self.line_bytes == u8::from(crlf);
        let name = &self.line[..usize::from(self.line_len)];
        if empty {
            self.done = self.started;
        } else {
            self.started = true;
            self.content_length |= name.starts_with(b"content-length:");
            self.transfer_encoding |= name.starts_with(b"transfer-encoding:");
        }
        (self.line_len, self.line_bytes) = (0, 0);
    }
}

impl<I: AsyncRead> AsyncRead for ClientIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let replay = this.replay;
        if replay.start == replay.end {
            return poll_fresh(this.inner, this.signals, this.head, *this.http2, cx, buf);
        }
        let (start, end) = (usize::from(replay.start), usize::from(replay.end));
        let n = buf.remaining().min(end - start);
        buf.put_slice(&replay.bytes[start..start + n]);
        replay.start += n as u8;
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        // Read on in the same call, so that hyper gets a head that arrived whole in
        // one read (see `poll_sniff`); nothing more yet is no reason to wait.
        match poll_fresh(this.inner, this.signals, this.head, *this.http2, cx, buf) {
            Poll::Pending => Poll::Ready(Ok(())),
            ready => ready,
        }
    }
}

/// Reads from the connection itself, counting activity and scanning head bytes.
fn poll_fresh<I: AsyncRead>(
    inner: Pin<&mut I>,
    signals: &ConnSignals,
    head: &mut HeadScan,
    http2: bool,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    let before = buf.filled().len();
    let result = inner.poll_read(cx, buf);
    let fresh = &buf.filled()[before..];
    if fresh.is_empty() {
        return result;
    }
    signals.activity.fetch_add(1, Ordering::Relaxed);
    if http2 || signals.in_flight.load(Ordering::Relaxed) > 0 {
        return result;
    }
    // Bytes while no request is handled start (or continue) a request head.
    if !signals.head_started.swap(true, Ordering::Relaxed) {
        *head = HeadScan::default();
        signals.bare_lf.store(false, Ordering::Relaxed);
        signals.length_and_chunked.store(false, Ordering::Relaxed);
    }
    head.feed(fresh, signals);
    result
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

    async fn sniff<I: AsyncRead + Unpin>(io: &mut ClientIo<I>) -> Protocol {
        std::future::poll_fn(|cx| Pin::new(&mut *io).poll_sniff(cx))
            .await
            .unwrap()
    }

    /// Sniffs as the server does, then reads the rest: every byte comes out once.
    async fn signals(bytes: &'static [u8]) -> Arc<ConnSignals> {
        let signals = Arc::new(ConnSignals::default());
        let mut io = ClientIo::new(bytes, signals.clone());
        sniff(&mut io).await;
        let mut out = Vec::new();
        io.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, bytes);
        signals
    }

    #[tokio::test]
    async fn sniffed_bytes_reach_the_first_read_together_with_the_rest() {
        use Protocol::*;
        let cases: [(&[u8], _); 5] = [
            (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", Http1),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
                Http2,
            ),
            (b"PRI * HTTP/1.1\r\nHost: a\r\n\r\n", Http1),
            (b"P", Http1),
            (b"", Http1),
        ];
        for (bytes, protocol) in cases {
            let mut io = ClientIo::new(bytes, Arc::new(ConnSignals::default()));
            assert_eq!(sniff(&mut io).await, protocol, "{bytes:?}");
            let mut buf = [0u8; 8192];
            let n = io.read(&mut buf).await.unwrap();
            assert_eq!(&buf[..n], bytes, "one read hands on all that is there");
        }
    }

    #[tokio::test]
    async fn a_sniffed_start_is_handed_on_without_waiting_for_the_rest() {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(4096);
        let mut io = ClientIo::new(server, Arc::new(ConnSignals::default()));
        client.write_all(b"GET / HT").await.unwrap();
        assert_eq!(sniff(&mut io).await, Protocol::Http1);
        let mut buf = [0u8; 64];
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"GET / HT");
        client.write_all(b"TP/1.1\r\n").await.unwrap();
        let n = io.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"TP/1.1\r\n");
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
