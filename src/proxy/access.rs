//! The access log: one line per request, written when the response body has been sent
//! (or abandoned), so it can carry the bytes both ways and the whole duration. When the
//! `specter::access` target is disabled, nothing is wrapped and nothing is counted.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tracing_appender::non_blocking::NonBlocking;

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
    pub upstream: Option<Arc<str>>,
    pub upstream_status: u16,
    pub error: Option<&'static str>,
    /// Request body bytes that went upstream, counted by the body guard; `None` for a
    /// request without a body.
    pub bytes_in: Option<Arc<AtomicU64>>,
}

/// Where JSON access lines go when the log format is JSON.
static JSON_SINK: OnceLock<&'static Batches> = OnceLock::new();

/// Under `--log-format json`, access lines are formatted here, straight into a batch
/// for the log's writer, instead of through `tracing`'s JSON layer: the same line,
/// field for field, at a third of the cost (that layer writes through a UTF-8 check per
/// piece). The `specter::access` filter still decides whether lines are written at all.
///
/// The returned guard hands the last batch to the writer when dropped: drop it before
/// the writer's own guard.
pub fn write_json_to(writer: NonBlocking) -> std::io::Result<FlushOnDrop> {
    // One per process, for its whole life.
    let batches: &'static Batches = Box::leak(Box::new(Batches::new(writer)));
    std::thread::Builder::new()
        .name("specter-access-log".into())
        .spawn(move || batches.flush_every(FLUSH_AFTER))?;
    let _ = JSON_SINK.set(batches);
    Ok(FlushOnDrop)
}

/// Access lines that wait for the log's writer thread, and go to it in batches: a
/// batch when [`BATCH_BYTES`] have gathered, or [`FLUSH_AFTER`] after the first line of
/// a batch, whichever comes first (Envoy's file access log batches the same way, with a
/// one-second interval). Handed over one by one, each line cost an allocation, a
/// channel message, and the writer thread's receiving and copying it: 0.4 µs more per
/// request to `/dev/null`, 1.1 µs more to a file (BENCHMARKS.md, "The access log").
struct Batches {
    pending: Mutex<Vec<u8>>,
    /// Raised when a line arrives in an empty batch.
    started: Condvar,
    writer: NonBlocking,
}

const BATCH_BYTES: usize = 32 * 1024;
const FLUSH_AFTER: Duration = Duration::from_millis(100);

impl Batches {
    fn new(writer: NonBlocking) -> Self {
        Batches {
            pending: Mutex::new(Vec::with_capacity(BATCH_BYTES * 2)),
            started: Condvar::new(),
            writer,
        }
    }

    fn pending(&self) -> MutexGuard<'_, Vec<u8>> {
        // A panic while formatting leaves whole lines behind it at worst.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let mut pending = self.pending();
        let first = pending.is_empty();
        line(&mut pending);
        if pending.len() >= BATCH_BYTES {
            self.write(&mut pending);
        } else if first {
            drop(pending);
            self.started.notify_one();
        }
    }

    fn flush(&self) {
        let mut pending = self.pending();
        if !pending.is_empty() {
            self.write(&mut pending);
        }
    }

    /// Hands the batch over under the lock, so that batches reach the writer in the
    /// order they were filled. The writer copies it, and never waits: it is lossy, and
    /// a batch it cannot queue is dropped, as a line was.
    fn write(&self, pending: &mut MutexGuard<'_, Vec<u8>>) {
        let _ = self.writer.clone().write_all(pending);
        pending.clear();
    }

    fn flush_every(&self, interval: Duration) {
        loop {
            let mut pending = self.pending();
            while pending.is_empty() {
                pending = self
                    .started
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            drop(pending);
            // The batching window itself: the lines of the next `interval` join this one.
            std::thread::sleep(interval);
            self.flush();
        }
    }
}

/// Hands the pending access lines to the log's writer when dropped.
pub struct FlushOnDrop;

impl Drop for FlushOnDrop {
    fn drop(&mut self) {
        if let Some(batches) = JSON_SINK.get() {
            batches.flush();
        }
    }
}

impl Record {
    fn bytes_in(&self) -> u64 {
        self.bytes_in
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed))
    }

    fn write(&self, bytes_out: u64, completed: bool) {
        if let Some(batches) = JSON_SINK.get() {
            batches.push(|out| self.json_line(out, bytes_out, completed));
            return;
        }
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
            bytes_in = self.bytes_in(),
            bytes_out,
            completed,
            error = self.error.unwrap_or("-"),
        );
    }
}

thread_local! {
    /// The timestamp's whole seconds, formatted once per second.
    static SECOND: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
}

impl Record {
    /// The line `tracing_subscriber`'s JSON format (flattened) writes for the event in
    /// [`Record::write`]: timestamp, level, the fields in order, target.
    fn json_line(&self, out: &mut Vec<u8>, bytes_out: u64, completed: bool) {
        let since_epoch = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        out.extend_from_slice(b"{\"timestamp\":\"");
        SECOND.with_borrow_mut(|(second, text)| {
            if *second != since_epoch.as_secs() {
                *second = since_epoch.as_secs();
                // `...:SSZ`, the `Z` moved after the microseconds.
                *text =
                    crate::clock::rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(*second));
                text.pop();
            }
            out.extend_from_slice(text.as_bytes());
        });
        let _ = write!(
            out,
            ".{:06}Z\",\"level\":\"INFO\"",
            since_epoch.subsec_micros()
        );
        let text = |out: &mut Vec<u8>, name: &str, value: &str| {
            let _ = write!(out, ",\"{name}\":");
            let _ = serde_json::to_writer(out, value);
        };
        let number = |out: &mut Vec<u8>, name: &str, value: u64| {
            let _ = write!(out, ",\"{name}\":{value}");
        };
        text(out, "request_id", self.request_id.to_str().unwrap_or(""));
        text(out, "trace_id", self.trace_id.as_str());
        let _ = write!(out, ",\"client_ip\":\"{}\"", self.client_ip);
        text(out, "method", self.method.as_str());
        text(out, "path", self.target.as_ref().map_or("-", |t| t.path()));
        number(out, "status", self.status.into());
        text(
            out,
            "environment",
            self.environment.as_deref().unwrap_or("-"),
        );
        text(
            out,
            "key_id",
            self.key_id.as_ref().map_or("-", |k| k.as_str()),
        );
        text(out, "upstream", self.upstream.as_deref().unwrap_or("-"));
        number(out, "upstream_status", self.upstream_status.into());
        out.extend_from_slice(b",\"duration_ms\":");
        let ms = self.started.elapsed().as_micros() as f64 / 1000.0;
        let _ = serde_json::to_writer(&mut *out, &ms);
        number(out, "bytes_in", self.bytes_in());
        number(out, "bytes_out", bytes_out);
        let _ = write!(out, ",\"completed\":{completed}");
        text(out, "error", self.error.unwrap_or("-"));
        out.extend_from_slice(b",\"target\":\"specter::access\"}\n");
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The JSON line specter writes itself must stay the line tracing's JSON layer
    /// writes for the same record (the pretty format still goes through tracing):
    /// same keys in the same order, same values but for the clock's.
    #[test]
    fn the_direct_json_line_is_the_tracing_json_line() {
        let record = Record {
            started: Instant::now(),
            request_id: HeaderValue::from_static("r\"1\\\\x"),
            trace_id: crate::trace::TraceContext::from_headers(&http::HeaderMap::new(), 0.0)
                .trace_id_hex(),
            client_ip: "2001:db8::1".parse().unwrap(),
            method: Method::PATCH,
            target: Some(http::uri::PathAndQuery::from_static("/v1/%C3%A9?secret=1")),
            status: 502,
            environment: Some(Arc::from("qa")),
            key_id: Some(crate::auth::KeyId::from("k1")),
            upstream: Some(Arc::from("10.0.0.1:8080")),
            upstream_status: 0,
            error: Some("upstream_unavailable"),
            bytes_in: Some(Arc::new(AtomicU64::new(7))),
        };
        let captured = Captured::default();
        let sink = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || record.write(42, false));
        let from_tracing = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let mut ours = Vec::new();
        record.json_line(&mut ours, 42, false);
        let ours = String::from_utf8(ours).unwrap();

        let parse = |line: &str| -> Vec<(String, serde_json::Value)> {
            let value: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
            let serde_json::Value::Object(map) = value else {
                panic!("not an object: {line}")
            };
            map.into_iter()
                .filter(|(k, _)| k != "timestamp" && k != "duration_ms")
                .collect()
        };
        assert_eq!(
            parse(&ours),
            parse(&from_tracing),
            "\n{ours}\n{from_tracing}"
        );
        let keys = |line: &str| {
            let mut keys = Vec::new();
            let mut rest = line;
            while let Some(i) = rest.find("\":") {
                let start = rest[..i].rfind('"').unwrap();
                keys.push(rest[start + 1..i].to_owned());
                rest = &rest[i + 2..];
            }
            keys
        };
        assert_eq!(keys(&ours), keys(&from_tracing));
        assert!(ours.ends_with("}\n") && !ours.contains("secret"));
    }

    fn line(i: usize) -> Vec<u8> {
        format!("{{\"line\":{i:08}}}\n").into_bytes()
    }

    /// Lines wait until a batch is full, which goes to the writer at once and whole;
    /// a flush hands over the rest. Nothing is lost, reordered or split.
    #[test]
    fn access_lines_reach_the_writer_in_whole_batches() {
        let captured = Captured::default();
        let (writer, guard) = tracing_appender::non_blocking(captured.clone());
        let batches = Batches::new(writer);
        let per_batch = BATCH_BYTES.div_ceil(line(0).len());
        for i in 0..per_batch + 3 {
            batches.push(|out| out.extend_from_slice(&line(i)));
        }
        assert_eq!(
            batches.pending().len(),
            3 * line(0).len(),
            "a full batch was handed over"
        );
        batches.flush();
        assert!(batches.pending().is_empty());
        drop(guard); // waits for the writer thread to write what it was given
        let expected: Vec<u8> = (0..per_batch + 3).flat_map(line).collect();
        assert_eq!(*captured.0.lock().unwrap(), expected);
    }

    /// A lone line is written by the batching thread once the interval has passed.
    #[test]
    fn a_lone_line_is_written_after_the_interval() {
        let captured = Captured::default();
        let (writer, _guard) = tracing_appender::non_blocking(captured.clone());
        let batches: &'static Batches = Box::leak(Box::new(Batches::new(writer)));
        std::thread::spawn(move || batches.flush_every(Duration::from_millis(10)));
        batches.push(|out| out.extend_from_slice(&line(7)));
        let deadline = Instant::now() + Duration::from_secs(10);
        while *captured.0.lock().unwrap() != line(7) {
            assert!(Instant::now() < deadline, "the line was never written");
            std::thread::yield_now();
        }
    }
}
