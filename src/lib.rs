//! specter: an API gateway that keeps development, qa and production apart.
//!
//! Every request carries an API key; the key belongs to exactly one environment; the
//! environment's policy and rate limits are enforced; the request streams to that
//! environment's upstream and nowhere else.
//!
//! # Layout
//!
//! A request's path through the crate, in order:
//!
//! - [`net`]: the request path's TCP sockets (system calls through rustix, not glibc)
//! - [`server`]: listeners, accept loop, connection cap, TLS handshake, connection IO
//!   (idle and first-request timeouts), graceful drain
//! - [`framing`]: HTTP/1 framing strictness (smuggling forms refused)
//! - [`proxy`]: `handle()` (never fails) -> `inner()`: `admit` (every check), then
//!   `upstream_request` and `send`; [`proxy::forward`] rewrites headers,
//!   [`proxy::upgrade`] tunnels WebSockets, [`proxy::access`] writes the access log
//! - [`upstream`]: an environment's upstreams, their pools and clients (specter's own
//!   HTTP/1.1 client for bodiless requests, hyper's for the rest); a response leaves it
//!   without the upstream connection's hop-by-hop fields
//! - [`auth`]: API key extraction and lookup by SHA-256 digest
//! - [`policy`]: host / client IP / method / path / body size; [`path`] is the
//!   one path normal form
//! - [`ratelimit`]: governor limiters per key and per environment, RateLimit headers;
//!   `ratelimit::redis`: the fleet's shared counters (one server or a cluster);
//!   `ratelimit::lease`: lease mode's locally spent batches of them
//! - [`error`]: `GatewayError` -> status + JSON body
//! - [`body`]: the body type; the streaming size limit and read timeout
//! - [`headers`]: the header names the gateway owns, and the hop-by-hop removal both
//!   directions share
//! - [`trace`]: W3C trace context: the client's `traceparent` continued, or a new trace;
//!   [`trace::export`] sends sampled requests' spans to an OTLP/HTTP collector
//!
//! Around it:
//!
//! - [`config`]: raw TOML types -> validated model, errors with `file:line:col`
//!   (`config::syntax` words the parser's errors and finds every unknown key;
//!   [`config::policy_view`] shows a policy to people; [`config::read`] opens every
//!   file an operator names, regular files only and capped; [`config::keys_file`]
//!   reads a line-oriented keys file; `config::range` is every value's range)
//! - [`state`]: the immutable snapshot behind one `ArcSwap`, built whole then swapped
//! - [`reload`]: file watcher + SIGHUP -> load -> build -> swap; keeps the last good
//! - [`tls`]: rustls server and client configs, SNI certificate choice
//! - [`admin`]: health, readiness, metrics, redacted config, key usage
//! - [`status`]: the admin listener's status page, `/status.json` and the per-second ring
//! - [`metrics`]: Prometheus registry
//! - [`panics`]: every task's panic caught, logged and counted
//! - [`logthrottle`]: a warning any request can trigger, logged once per interval with a count
//! - [`commands`]: `check`, `keys`, `demo` (+ `demo_config`: `--write-config`,
//!   `--backends-only`), `promote`/`diff`, `certs`, `admin_addr`: what the CLI runs

pub mod activity;
pub mod admin;
pub mod auth;
pub mod body;
pub mod clock;
pub mod commands;
pub mod config;
pub mod conn;
pub mod digest;
pub mod error;
pub mod framing;
pub mod headers;
pub mod logthrottle;
pub mod metrics;
pub mod net;
pub mod panics;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod server;
pub mod state;
pub mod status;
pub mod tls;
pub mod trace;
pub mod upstream;

pub use server::Gateway;
