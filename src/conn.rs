//! What the listener hands the request pipeline about a client connection, below
//! both: the signals its IO wrapper raises, and the guard that keeps its place under
//! the connection limits.

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

/// What the connection's IO wrapper reports to the rest of the connection.
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

/// A connection's place under `max_connections` (and `max_connections_per_ip`), held
/// for as long as the connection or a tunnel made from it lives. Opaque above the
/// listener: the pipeline only keeps it alive.
pub type Held = Arc<dyn std::fmt::Debug + Send + Sync>;
