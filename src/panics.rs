//! A panic is a bug, but one request or connection must not take the gateway with it,
//! nor vanish without a word: every task specter runs catches its panic, logs it with
//! its message and counts it in `specter_panics_total{task}`.
//!
//! Unwinding stays on in the release profile (no `panic = "abort"`) for this.
//! The wrappers cost one landing pad per poll: no allocation, no clock.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;

use crate::metrics::{Metrics, TaskLabels};

/// Logs and counts the panic of a `task` ("request", "connection", "stream", "reload").
pub fn record(metrics: &Metrics, task: &'static str, payload: &(dyn Any + Send)) {
    metrics.panics.get_or_create(&TaskLabels { task }).inc();
    tracing::error!(
        task,
        cause = message(payload),
        "a {task} task panicked; it was stopped and specter goes on (this is a bug: please report it)"
    );
}

/// The panic's message, when it is text (`panic!("...")` and `.expect("...")` are).
pub fn message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message")
}

/// Runs `future`; a panic is recorded and yields `None`.
///
/// A plain function returning a combinator, not an `async fn`: an `async fn` would
/// hold `future` twice in its state (the argument and the running copy), and on the
/// request path that doubled every move of the request's future.
pub fn caught<'a, F>(
    metrics: &'a Metrics,
    task: &'static str,
    future: F,
) -> impl Future<Output = Option<F::Output>> + 'a
where
    F: Future + 'a,
{
    catching(future, move |payload| record(metrics, task, payload))
}

/// [`caught`] for a future that must own what it reports to (a spawned task's):
/// `owner` holds the metrics.
pub fn caught_in<O, F>(
    owner: Arc<O>,
    task: &'static str,
    future: F,
) -> impl Future<Output = Option<F::Output>>
where
    O: AsRef<Metrics> + ?Sized,
    F: Future,
{
    catching(future, move |payload| {
        record((*owner).as_ref(), task, payload)
    })
}

fn catching<F: Future>(
    future: F,
    report: impl FnOnce(&(dyn Any + Send)),
) -> impl Future<Output = Option<F::Output>> {
    AssertUnwindSafe(future)
        .catch_unwind()
        .map(move |result| result.map_err(|payload| report(&*payload)).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_is_counted_and_its_message_kept() {
        let metrics = Metrics::new();
        let out = caught(&metrics, "request", async { panic!("boom {}", 7) }).await;
        assert!(out.is_none());
        assert_eq!(caught(&metrics, "request", async { 5 }).await, Some(5));
        let text = metrics.encode();
        assert!(
            text.contains("specter_panics_total{task=\"request\"} 1"),
            "{text}"
        );
        let payload: Box<dyn Any + Send> = Box::new(String::from("boom 7"));
        assert_eq!(message(&*payload), "boom 7");
    }
}
