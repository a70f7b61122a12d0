//! W3C Trace Context (always on): the `traceparent` a request arrives with is kept (same
//! trace id, a new span id for the gateway's hop); a missing or malformed one starts a
//! new trace. The upstream always receives a valid `traceparent`.
//!
//! Cost per request: parsing reads the header's bytes in place (no allocation); ids come
//! from a per-thread xoshiro generator (`SmallRng`, a few ns); the outgoing header is
//! written into a 55-byte stack buffer and copied once into its `HeaderValue`. The hex
//! trace id for logs and error bodies is formatted only when one of them is written.
//! `benches/hot_path.rs` (`trace_context`) measures the whole step.

pub mod export;

use std::cell::RefCell;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`.
pub const TRACEPARENT_LEN: usize = 55;
const FLAG_SAMPLED: u8 = 0x01;

/// One request's place in a trace. `Copy` and 34 bytes: it rides along the request
/// without a reference count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The gateway's own span: the parent the upstream sees.
    pub span_id: [u8; 8],
    /// The client's span, when it sent a valid `traceparent`.
    pub parent_id: Option<[u8; 8]>,
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the client's trace when its `traceparent` is valid (and there is exactly
    /// one); otherwise starts a trace, sampled with probability `sample_ratio`.
    pub fn from_headers(headers: &HeaderMap, sample_ratio: f64) -> TraceContext {
        let mut values = headers.get_all(TRACEPARENT).iter();
        let incoming = match (values.next(), values.next()) {
            (Some(only), None) => parse_traceparent(only.as_bytes()),
            _ => None,
        };
        let span_id = random_nonzero_u64().to_be_bytes();
        match incoming {
            Some(p) => TraceContext {
                trace_id: p.trace_id,
                span_id,
                parent_id: Some(p.parent_id),
                sampled: p.flags & FLAG_SAMPLED != 0,
            },
            None => {
                let trace_id = random_trace_id();
                TraceContext {
                    trace_id,
                    span_id,
                    parent_id: None,
                    sampled: sampled_by_ratio(&trace_id, sample_ratio),
                }
            }
        }
    }

    /// True when the client's `traceparent` was kept (so its `tracestate` belongs to
    /// this trace and passes on).
    pub fn continued(&self) -> bool {
        self.parent_id.is_some()
    }

    /// The `traceparent` the upstream receives: this trace, the gateway's span.
    pub fn traceparent(&self) -> HeaderValue {
        crate::headers::shared_value(self.traceparent_bytes())
            .expect("hex digits and dashes are a valid header value")
    }

    /// [`traceparent`](Self::traceparent)'s bytes, for a head written directly.
    pub fn traceparent_bytes(&self) -> [u8; TRACEPARENT_LEN] {
        let mut buf = [0u8; TRACEPARENT_LEN];
        buf[..3].copy_from_slice(b"00-");
        hex_into(&self.trace_id, &mut buf[3..35]);
        buf[35] = b'-';
        hex_into(&self.span_id, &mut buf[36..52]);
        buf[52] = b'-';
        hex_into(&[u8::from(self.sampled)], &mut buf[53..55]);
        buf
    }

    /// The trace id as 32 lower-case hex digits, for logs and error bodies.
    pub fn trace_id_hex(&self) -> TraceIdHex {
        let mut buf = [0u8; 32];
        hex_into(&self.trace_id, &mut buf);
        TraceIdHex(buf)
    }
}

/// A trace id formatted on the stack.
#[derive(Clone, Copy)]
pub struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl std::fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The fields of a valid `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Traceparent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Parses a `traceparent` value as W3C Trace Context level 1 reads it: lower-case hex
/// only; version `ff` is invalid; version `00` is exactly 55 bytes; a later version may
/// append `-...` fields, which are ignored; all-zero trace or parent ids are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<Traceparent> {
    if v.len() < TRACEPARENT_LEN || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let version = hex_byte(v[0], v[1])?;
    match version {
        0xff => return None,
        0x00 if v.len() != TRACEPARENT_LEN => return None,
        _ if v.len() > TRACEPARENT_LEN && v[TRACEPARENT_LEN] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0u8; 16];
    hex_decode(&v[3..35], &mut trace_id)?;
    let mut parent_id = [0u8; 8];
    hex_decode(&v[36..52], &mut parent_id)?;
    let flags = hex_byte(v[53], v[54])?;
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some(Traceparent {
        trace_id,
        parent_id,
        flags,
    })
}

/// A started trace is sampled when its id's low 64 bits fall under `ratio` of the
/// range: deterministic per trace id, like OpenTelemetry's `TraceIdRatioBased`.
fn sampled_by_ratio(trace_id: &[u8; 16], ratio: f64) -> bool {
    if ratio <= 0.0 {
        return false;
    }
    if ratio >= 1.0 {
        return true;
    }
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let threshold = (ratio * u64::MAX as f64) as u64;
    u64::from_be_bytes(low) < threshold
}

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_rng(&mut rand::rng()));
}

fn random_nonzero_u64() -> u64 {
    RNG.with(|rng| {
        let mut rng = rng.borrow_mut();
        loop {
            let n: u64 = rng.random();
            if n != 0 {
                return n;
            }
        }
    })
}

fn random_trace_id() -> [u8; 16] {
    let high = random_nonzero_u64();
    let low = random_nonzero_u64();
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&high.to_be_bytes());
    id[8..].copy_from_slice(&low.to_be_bytes());
    id
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_into(bytes: &[u8], out: &mut [u8]) {
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
}

/// One lower-case hex digit; upper case is invalid in `traceparent`.
fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

fn hex_byte(hi: u8, lo: u8) -> Option<u8> {
    Some(hex_digit(hi)? << 4 | hex_digit(lo)?)
}

fn hex_decode(hex: &[u8], out: &mut [u8]) -> Option<()> {
    for (pair, b) in hex.chunks_exact(2).zip(out.iter_mut()) {
        *b = hex_byte(pair[0], pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(values: &[&str]) -> HeaderMap {
        let pairs: Vec<(&str, &str)> = values.iter().map(|v| ("traceparent", *v)).collect();
        crate::headers::map(&pairs)
    }

    #[test]
    fn a_valid_traceparent_is_continued_with_a_new_span() {
        let t = TraceContext::from_headers(&headers(&[VALID]), 0.0);
        assert_eq!(
            t.trace_id_hex().as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(t.parent_id, Some(0x00f067aa0ba902b7u64.to_be_bytes()));
        assert_ne!(t.span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert!(t.sampled, "flag 01 is honoured whatever the ratio");
        let out = t.traceparent();
        let parsed = parse_traceparent(out.as_bytes()).expect("valid");
        assert_eq!(parsed.trace_id, t.trace_id);
        assert_eq!(parsed.parent_id, t.span_id);
        assert_eq!(parsed.flags, 1);
    }

    #[test]
    fn an_unsampled_parent_stays_unsampled_at_ratio_one() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let t = TraceContext::from_headers(&headers(&[v]), 1.0);
        assert!(t.continued());
        assert!(!t.sampled);
        assert!(t.traceparent().as_bytes().ends_with(b"-00"));
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        let bad = [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "",
        ];
        for v in bad {
            assert_eq!(parse_traceparent(v.as_bytes()), None, "{v:?}");
            let t = TraceContext::from_headers(&headers(&[v]), 0.0);
            assert!(!t.continued(), "{v:?}");
            assert_ne!(t.trace_id, [0; 16]);
            assert!(parse_traceparent(t.traceparent().as_bytes()).is_some());
        }
    }

    #[test]
    fn two_traceparent_headers_start_a_new_trace() {
        let other = "00-11111111111111111111111111111111-2222222222222222-01";
        let t = TraceContext::from_headers(&headers(&[VALID, other]), 0.0);
        assert!(!t.continued());
    }

    #[test]
    fn a_later_version_may_carry_more_fields() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-ever";
        assert!(parse_traceparent(v.as_bytes()).is_some());
        let glued = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(parse_traceparent(glued.as_bytes()).is_none());
    }

    #[test]
    fn started_traces_follow_the_ratio() {
        let none = HeaderMap::new();
        let count = |ratio| {
            (0..4000)
                .filter(|_| TraceContext::from_headers(&none, ratio).sampled)
                .count()
        };
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), 4000);
        let quarter = count(0.25);
        assert!((700..1300).contains(&quarter), "{quarter} of 4000 at 0.25");
    }
}
