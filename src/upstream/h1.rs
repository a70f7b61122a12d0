//! specter's own HTTP/1.1 client, for bodiless requests to plain-HTTP upstreams: the
//! request's own task writes the head and reads the response, with no connection task
//! and no channel in between. hyper's `client::conn` pays for both on every request (a
//! minimal proxy spends about 1.5 µs less CPU per request with a client like this one:
//! BENCHMARKS.md, "The upstream client"). Requests with a body go through hyper's
//! client, which batches the writes of head and body chunks; this client's first cut
//! wrote them one by one and halved the 64 KiB POST benchmark.
//!
//! The client-facing side stays hyper's: that is where untrusted bytes are parsed.
//! Here the peer is the environment's own backend, and still any framing two parsers
//! could read differently is refused: `Content-Length` together with
//! `Transfer-Encoding`, a bad or conflicting `Content-Length`, a bad chunk (see
//! [`chunked`](super::chunked)). A connection goes back to the pool only when its
//! response was read exactly to its end with nothing after it; anything else closes
//! it.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING};
use http::uri::PathAndQuery;
use http::{HeaderMap, Method, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chunked::{self, Decoded};
use super::{Added, IdleConnections};
use crate::body::{Body, BoxError};
use crate::headers::HOP_BY_HOP;
use crate::net::Socket;

/// The largest response head accepted (nginx's default is 4 or 8 KiB).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 100;
/// Read-buffer growth: room for a typical small response in one read.
const READ_CHUNK: usize = 8 * 1024;

/// An open connection to an upstream, idle between requests.
pub struct Connection {
    io: Socket,
    /// Bytes read and not yet consumed.
    read: BytesMut,
    /// The request head being written; kept to reuse its capacity.
    write: Vec<u8>,
}

impl Connection {
    pub fn new(io: Socket) -> Self {
        Connection {
            io,
            read: BytesMut::with_capacity(READ_CHUNK),
            write: Vec::with_capacity(1024),
        }
    }

    /// Closed by the upstream (or sent something unasked) while idle. The readiness
    /// tokio already holds, so no system call: a read that did not fill its buffer
    /// cleared it, so only an event since the last response sets it.
    pub fn is_stale(&self) -> bool {
        !self.read.is_empty() || self.io.read_ready()
    }
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the upstream connection failed")]
    Io(#[source] std::io::Error),
    #[error("the upstream sent an invalid response head")]
    Parse(#[source] httparse::Error),
    #[error("the upstream's response head is over {MAX_HEAD} bytes")]
    HeadTooLarge,
    #[error("the upstream's response {0}")]
    Framing(&'static str),
}

impl Error {
    /// The connection closed or was reset before any byte of a response: on a reused
    /// connection, the upstream closed it while it was idle.
    pub fn is_unanswered(&self) -> bool {
        use std::io::ErrorKind::*;
        matches!(self, Error::Io(e) if matches!(e.kind(), UnexpectedEof | ConnectionReset | BrokenPipe))
    }
}

/// How the response body is framed.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// Which of hyper's servers writes the response to the client, which decides what
/// its header map is best given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// The map goes round the client connection (see [`round_trip`]): it grows at
    /// most once, and hyper keeps it while the connection is idle, so it is given no
    /// room beyond the upstream's fields. A map of up to six fields takes 8 slots
    /// (~600 bytes), of seven to twelve 16 (~1,200). Content-Length is hyper's to
    /// write from the body.
    Http1,
    /// The map is new for each stream, and hyper's HTTP/2 server inserts the body's
    /// Content-Length if it is missing: room for that and for what the gateway adds
    /// (request id, rate-limit fields) saves rehashing it as it grows.
    Http2,
}

impl Writer {
    fn room(self) -> usize {
        match self {
            Writer::Http1 => 0,
            Writer::Http2 => 6,
        }
    }

    /// Whether the upstream's Content-Length stays in the map: hyper's HTTP/1 server
    /// writes it from the body's exact size (the length framed here), except where
    /// the body is not sent (a HEAD's, a 204's, a 304's), whose length it cannot know.
    fn keeps_length(self, no_body: bool) -> bool {
        no_body || self == Writer::Http2
    }
}

struct Head {
    parts: http::response::Parts,
    framing: Framing,
    keep_alive: bool,
}

/// Sends one bodiless request on `conn` and returns the response; its body streams
/// from the connection and hands it back to `idle` once read to its end.
///
/// The response's headers go into the request's header map, taken once a final
/// response head is complete (until then a failed exchange leaves `parts` whole, to be
/// sent again). hyper keeps the map of each response it writes for the next request
/// head it reads, so one map goes round each client connection instead of one being
/// allocated per response.
///
/// The request line says HTTP/1.1; `parts.version` is the client's, which says how
/// the response will be written (see [`Writer`]).
pub fn round_trip<'a>(
    mut conn: Connection,
    parts: &'a mut http::request::Parts,
    (target, added): (&'a PathAndQuery, &'a dyn Added),
    idle: &'a Arc<IdleConnections<Connection>>,
) -> impl Future<Output = Result<Response<Body>, Error>> + Send + 'a {
    let head_request = parts.method == Method::HEAD;
    let writer = if parts.version < Version::HTTP_2 {
        Writer::Http1
    } else {
        Writer::Http2
    };
    encode_head(&mut conn.write, parts, target, added);
    async move {
        let Connection { io, read, write } = &mut conn;
        // Written after the scheduler's current pass: the requests that arrived
        // together then go out together, and an upstream on this host is woken once
        // for them rather than once each (on loopback the sender pays for the
        // receiver's wake-up: +1.2 µs of system time per request without this,
        // measured; hyper's connection task batches the same way).
        tokio::task::yield_now().await;
        io.write_all(write).await.map_err(Error::Io)?;
        let head = read_head(io, read, (head_request, writer), &mut parts.headers).await?;
        Ok(respond(conn, head, idle))
    }
}

/// The request line and headers, the request's then the gateway's, in `wire`. The
/// request has no body, so no `Transfer-Encoding` goes with it.
fn encode_head(
    wire: &mut Vec<u8>,
    parts: &http::request::Parts,
    target: &PathAndQuery,
    added: &dyn Added,
) {
    wire.clear();
    wire.extend_from_slice(parts.method.as_str().as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(target.as_str().as_bytes());
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &parts.headers {
        if name == TRANSFER_ENCODING {
            continue;
        }
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    added.write(wire);
    wire.extend_from_slice(b"\r\n");
}

/// Reads until a final response head is complete; informational (1xx) heads are
/// skipped. A connection that closes before any byte is `UnexpectedEof`.
async fn read_head(
    io: &mut Socket,
    buf: &mut BytesMut,
    request: (bool, Writer),
    recycled: &mut HeaderMap,
) -> Result<Head, Error> {
    loop {
        if !buf.is_empty() {
            if let Some(head) = parse_head(buf, request, recycled)? {
                return Ok(head);
            }
            if buf.len() >= MAX_HEAD {
                return Err(Error::HeadTooLarge);
            }
        }
        buf.reserve(READ_CHUNK);
        if io.read_buf(buf).await.map_err(Error::Io)? == 0 {
            let why = if buf.is_empty() {
                "the upstream closed the connection without a response"
            } else {
                "the upstream closed the connection within the response head"
            };
            return Err(Error::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                why,
            )));
        }
    }
}

/// A final response head from the start of `buf`, split off it; `None` when more bytes
/// are needed. An informational head is consumed and parsing goes on after it. The
/// headers go into `recycled`'s allocation, taken out of it.
fn parse_head(
    buf: &mut BytesMut,
    (head_request, writer): (bool, Writer),
    recycled: &mut HeaderMap,
) -> Result<Option<Head>, Error> {
    loop {
        // Offsets into `buf`: the values are then shared with the head's bytes
        // instead of copied.
        let mut fields = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut response = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut response,
            buf,
            &mut headers,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(Error::Parse(e)),
        };
        let code = response.code.expect("a complete head has a status");
        let version = match response.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let start = buf.as_ptr() as usize;
        // A head is at most MAX_HEAD bytes plus one read: offsets fit in 32 bits.
        let offset = |s: &[u8]| (s.as_ptr() as usize - start) as u32;
        let reason = response.reason.map(|r| (offset(r.as_bytes()), r.len()));
        let count = response.headers.len();
        for (field, h) in fields.iter_mut().zip(response.headers.iter()) {
            *field = (
                offset(h.name.as_bytes()),
                h.name.len() as u32,
                offset(h.value),
                h.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        let status = StatusCode::from_u16(code).map_err(|_| Error::Framing("status is invalid"))?;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            return Err(Error::Framing("switches protocols unasked"));
        }
        if status.is_informational() {
            continue;
        }
        let no_body =
            head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
        let mut facts = Facts::default();
        let mut map = std::mem::take(recycled);
        map.clear();
        map.reserve(count + writer.room());
        for &(name_at, name_len, value_at, value_len) in &fields[..count] {
            let (name_at, name_len) = (name_at as usize, name_len as usize);
            let (value_at, value_len) = (value_at as usize, value_len as usize);
            let name = HeaderName::from_bytes(&head[name_at..name_at + name_len])
                .map_err(|_| Error::Framing("has an invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(value_at..value_at + value_len))
                .map_err(|_| Error::Framing("has an invalid header value"))?;
            facts.note(&name, &value);
            // Hop-by-hop fields are this connection's, read by `facts`, never passed on.
            let passed = if name == CONTENT_LENGTH {
                writer.keeps_length(no_body)
            } else {
                !HOP_BY_HOP.contains(&name)
            };
            if passed {
                map.append(name, value);
            }
        }
        if facts.connection_names_others {
            // Rare: `Connection` names end-to-end-looking fields; they are this hop's.
            for &(name_at, name_len, value_at, value_len) in &fields[..count] {
                let (name_at, value_at) = (name_at as usize, value_at as usize);
                if !head[name_at..name_at + name_len as usize].eq_ignore_ascii_case(b"connection") {
                    continue;
                }
                for option in head[value_at..value_at + value_len as usize].split(|&b| b == b',') {
                    if let Ok(named) = HeaderName::from_bytes(option.trim_ascii()) {
                        map.remove(named);
                    }
                }
            }
        }
        let (mut parts, ()) = Response::new(()).into_parts();
        parts.status = status;
        parts.version = version;
        parts.headers = map;
        if let Some((at, len)) = reason {
            let at = at as usize;
            let reason = &head[at..at + len];
            if status.canonical_reason().map(str::as_bytes) != Some(reason) {
                if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(head.slice(at..at + len)) {
                    parts.extensions.insert(reason);
                }
            }
        }
        let framing = facts.framing(no_body)?;
        let keep_alive = framing != Framing::Close
            && match version {
                Version::HTTP_10 => facts.keep_alive,
                _ => !facts.close,
            };
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
        }));
    }
}

/// What the framing headers of a response said.
#[derive(Default)]
struct Facts {
    length: Option<u64>,
    /// Some Transfer-Encoding was present; `chunked` when it ended in chunked.
    transfer_encoding: bool,
    chunked: bool,
    close: bool,
    keep_alive: bool,
    bad_length: bool,
    /// `Connection` names a field that is not hop-by-hop anyway (it goes too).
    connection_names_others: bool,
}

impl Facts {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) {
        if name == CONTENT_LENGTH {
            match (content_length(value), self.length) {
                (Some(n), None) => self.length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => self.bad_length = true,
            }
        } else if name == TRANSFER_ENCODING {
            self.transfer_encoding = true;
            let last = value
                .as_bytes()
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or(b"");
            self.chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
        } else if name == CONNECTION {
            for option in value.as_bytes().split(|&b| b == b',') {
                let option = option.trim_ascii();
                self.close |= option.eq_ignore_ascii_case(b"close");
                self.keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
                self.connection_names_others |= !option.is_empty()
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| option.eq_ignore_ascii_case(h.as_str().as_bytes()));
            }
        }
    }

    fn framing(&self, no_body: bool) -> Result<Framing, Error> {
        if self.transfer_encoding && (self.length.is_some() || self.bad_length) {
            return Err(Error::Framing(
                "has both Content-Length and Transfer-Encoding",
            ));
        }
        if self.bad_length {
            return Err(Error::Framing(
                "has an invalid or conflicting Content-Length",
            ));
        }
        Ok(match (no_body, self.transfer_encoding, self.length) {
            (true, _, _) => Framing::Empty,
            (_, true, _) if self.chunked => Framing::Chunked,
            // A coding that does not end in chunked: the body runs to the close.
            (_, true, _) => Framing::Close,
            (_, _, Some(0)) => Framing::Empty,
            (_, _, Some(n)) => Framing::Length(n),
            (_, _, None) => Framing::Close,
        })
    }
}

/// A Content-Length: digits only (a list of equal values allowed), at most 19 of
/// them so that it fits.
fn content_length(value: &HeaderValue) -> Option<u64> {
    let mut found = None;
    for part in value.as_bytes().split(|&b| b == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = std::str::from_utf8(part).ok()?.parse::<u64>().ok()?;
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

fn respond(
    conn: Connection,
    head: Head,
    idle: &Arc<IdleConnections<Connection>>,
) -> Response<Body> {
    let keep = head.keep_alive;
    let decoding = match head.framing {
        Framing::Empty => {
            if keep && conn.read.is_empty() {
                idle.put_back(conn);
            }
            return Response::from_parts(head.parts, crate::body::empty());
        }
        Framing::Length(n) => Decoding::Length(n),
        Framing::Chunked => Decoding::Chunked(chunked::Decoder::default()),
        Framing::Close => Decoding::Close,
    };
    let body = ResponseBody {
        conn: Some(conn),
        decoding,
        keep,
        idle: Arc::clone(idle),
    };
    Response::from_parts(head.parts, body.boxed())
}

enum Decoding {
    Length(u64),
    Chunked(chunked::Decoder),
    Close,
}

/// A response body read from its connection as the client takes it. Dropped before
/// its end, it closes the connection.
struct ResponseBody {
    /// `None` once the body ended.
    conn: Option<Connection>,
    decoding: Decoding,
    /// The connection may serve another request once this body ends.
    keep: bool,
    idle: Arc<IdleConnections<Connection>>,
}

#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the upstream closed the connection before the response body's end")]
    Truncated,
    #[error("the upstream's response body is invalid")]
    Chunk(#[from] chunked::ChunkError),
    #[error("reading the upstream's response body failed")]
    Io(#[from] std::io::Error),
}

impl ResponseBody {
    /// The body ended: the connection goes back to the pool if it may and nothing
    /// follows the body (bytes past its end are never taken as the next response).
    fn end(&mut self) {
        if let Some(conn) = self.conn.take() {
            if self.keep && conn.read.is_empty() {
                self.idle.put_back(conn);
            }
        }
    }

    fn fail(&mut self, e: BodyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(e.into())))
    }
}

impl hyper::body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            let data = match &mut this.decoding {
                Decoding::Length(left) if !conn.read.is_empty() => {
                    let n =
                        usize::try_from(*left).map_or(conn.read.len(), |l| l.min(conn.read.len()));
                    *left -= n as u64;
                    Some(conn.read.split_to(n).freeze())
                }
                Decoding::Length(_) => None,
                Decoding::Chunked(decoder) => match decoder.decode(&mut conn.read) {
                    Ok(Decoded::Data(data)) => Some(data),
                    Ok(Decoded::End) => {
                        this.end();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => None,
                    Err(e) => return this.fail(e.into()),
                },
                Decoding::Close if !conn.read.is_empty() => Some(conn.read.split().freeze()),
                Decoding::Close => None,
            };
            if let Some(data) = data {
                if matches!(this.decoding, Decoding::Length(0)) {
                    // The last bytes: the server stops polling once `is_end_stream`
                    // says so, so the connection goes back with them.
                    this.end();
                }
                return Poll::Ready(Some(Ok(Frame::data(data))));
            }
            conn.read.reserve(READ_CHUNK);
            let read = std::pin::pin!(conn.io.read_buf(&mut conn.read)).poll(cx);
            match read {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return this.fail(e.into()),
                Poll::Ready(Ok(0)) if matches!(this.decoding, Decoding::Close) => {
                    this.keep = false;
                    this.end();
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => return this.fail(BodyError::Truncated),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.decoding {
            Decoding::Length(n) => SizeHint::with_exact(*n),
            Decoding::Chunked(decoder) => {
                let mut hint = SizeHint::new();
                hint.set_lower(decoder.data_left());
                hint
            }
            Decoding::Close => SizeHint::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Option<Head>, Error> {
        parse_head(
            &mut BytesMut::from(head),
            (false, Writer::Http1),
            &mut HeaderMap::new(),
        )
    }

    #[test]
    fn framing_two_parsers_could_read_differently_is_refused() {
        for head in [
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 2, 3\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: +2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 0x2\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n",
        ] {
            assert!(
                matches!(parse(head), Err(Error::Framing(_))),
                "accepted: {head:?}"
            );
        }
        assert!(matches!(
            parse("HTTP/1.1 200 OK\r\nbad header\r\n\r\n"),
            Err(Error::Parse(_))
        ));
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let framing = |head: &str, head_request: bool| {
            let head = parse_head(
                &mut BytesMut::from(head),
                (head_request, Writer::Http1),
                &mut HeaderMap::new(),
            )
            .unwrap()
            .unwrap();
            (head.framing, head.keep_alive)
        };
        let ok = "HTTP/1.1 200 OK\r\n";
        assert_eq!(
            framing(&format!("{ok}content-length: 5\r\n\r\n"), false),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(&format!("{ok}content-length: 5, 5\r\n\r\n"), false),
            (Framing::Length(5), true)
        );
        assert_eq!(
            framing(
                &format!("{ok}transfer-encoding: gzip, chunked\r\n\r\n"),
                false
            ),
            (Framing::Chunked, true)
        );
        assert_eq!(
            framing(
                &format!("{ok}transfer-encoding: chunked, gzip\r\n\r\n"),
                false
            ),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(&format!("{ok}\r\n"), false),
            (Framing::Close, false)
        );
        assert_eq!(
            framing(&format!("{ok}content-length: 5\r\n\r\n"), true),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing("HTTP/1.1 204 No Content\r\n\r\n", false),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing(
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false
            ),
            (Framing::Empty, true)
        );
        assert_eq!(
            framing(
                &format!("{ok}content-length: 0\r\nconnection: close\r\n\r\n"),
                false
            ),
            (Framing::Empty, false)
        );
        assert_eq!(
            framing("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false),
            (Framing::Length(1), false)
        );
        assert_eq!(
            framing(
                "HTTP/1.0 200 OK\r\ncontent-length: 1\r\nconnection: Keep-Alive\r\n\r\n",
                false
            ),
            (Framing::Length(1), true)
        );
    }

    /// Hop-by-hop fields, and those `Connection` names in any case, are read for the
    /// framing and never put in the map; the rest keep their order.
    #[test]
    fn the_connections_own_fields_stay_out_of_the_map() {
        let head = parse(
            "HTTP/1.1 200 OK\r\nx-a: 1\r\nConnection: keep-alive, X-Hop, , te\r\nKeep-Alive: timeout=5\r\n\
             x-hop: 1\r\nProxy-Authenticate: Basic\r\nTrailer: x-t\r\nUpgrade: h2c\r\nx-b: 2\r\n\
             content-length: 2\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        let names: Vec<&str> = head.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a", "x-b"]);
        assert_eq!((head.framing, head.keep_alive), (Framing::Length(2), true));
    }

    #[test]
    fn informational_heads_are_skipped_and_values_shared() {
        let mut buf = BytesMut::from(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 201 Made It\r\nx-a: 1\r\ncontent-length: 2\r\n\r\nok",
        );
        let head = parse_head(&mut buf, (false, Writer::Http1), &mut HeaderMap::new())
            .unwrap()
            .unwrap();
        assert_eq!(head.parts.status, 201);
        assert_eq!(head.parts.headers["x-a"], "1");
        assert!(!head.parts.headers.contains_key("link"));
        let reason = head
            .parts
            .extensions
            .get::<hyper::ext::ReasonPhrase>()
            .unwrap();
        assert_eq!(reason.as_bytes(), b"Made It");
        assert_eq!(&buf[..], b"ok", "the body stays buffered");
        assert!(parse_head(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\nx: 1\r\n"),
            (false, Writer::Http1),
            &mut HeaderMap::new()
        )
        .unwrap()
        .is_none());
    }

    /// Content-Length leaves the map only where hyper writes it from the body: for
    /// an HTTP/1 client, when the body is sent.
    #[test]
    fn content_length_stays_in_the_map_where_hyper_does_not_write_it() {
        let names = |head: &str, request| -> Vec<String> {
            let head = parse_head(&mut BytesMut::from(head), request, &mut HeaderMap::new());
            let map = head.unwrap().unwrap().parts.headers;
            map.keys().map(|n| n.as_str().to_owned()).collect()
        };
        let ok = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n";
        let not_modified = "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n";
        assert!(names(ok, (false, Writer::Http1)).is_empty());
        assert_eq!(names(ok, (false, Writer::Http2)), ["content-length"]);
        assert_eq!(names(ok, (true, Writer::Http1)), ["content-length"], "HEAD");
        assert_eq!(
            names(not_modified, (false, Writer::Http1)),
            ["content-length"]
        );
    }

    #[test]
    fn the_request_map_carries_the_response_headers_and_nothing_of_the_request() {
        let mut request = crate::headers::map(&[
            ("x-api-key", "spk_never_echoed"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-for", "10.0.0.2"),
        ]);
        // An incomplete head leaves the request's map alone: it may be sent again.
        let partial = parse_head(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\nx: 1\r\n"),
            (false, Writer::Http1),
            &mut request,
        );
        assert!(partial.unwrap().is_none());
        assert_eq!(request.len(), 3);
        let mut buf = BytesMut::from("HTTP/1.1 200 OK\r\nx-a: 1\r\ncontent-length: 0\r\n\r\n");
        let head = parse_head(&mut buf, (false, Writer::Http1), &mut request)
            .unwrap()
            .unwrap();
        let names: Vec<_> = head.parts.headers.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["x-a"], "content-length is hyper's to write");
        assert_eq!(
            head.parts.headers.len(),
            1,
            "no value of the request's left"
        );
        assert!(request.is_empty());
    }
}
