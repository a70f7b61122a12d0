//! `[rate_limit_store]`: one Redis server or a cluster's seed nodes, the error mode, and
//! exact or lease mode with its batch share and age.

use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use super::super::file::RawStore;
use super::super::{LeaseConfig, StoreConfig, StoreErrorMode, StoreMode, StoreServers};
use super::Validator;

/// `lease`, in hundredths of a percent: a batch between 0.01% and half of a burst.
/// More than half would let two gateways hold the whole bucket between them.
const LEASE_SHARE_BP: RangeInclusive<u32> = 1..=5_000;
const LEASE_TTL: RangeInclusive<Duration> = Duration::from_millis(10)..=Duration::from_secs(10);
const DEFAULT_LEASE_BP: u32 = 500;
const DEFAULT_LEASE_TTL: Duration = Duration::from_millis(250);

impl Validator<'_> {
    pub(super) fn store(&mut self, raw: &Spanned<RawStore>) -> Option<StoreConfig> {
        let s = raw.get_ref();
        let servers = self.store_servers(raw);
        let timeout = self.duration_or(
            "rate_limit_store.timeout",
            &s.timeout,
            Duration::from_millis(20),
        );
        let on_error = match s.on_error.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("local") => Some(StoreErrorMode::Local),
            Some("allow") => Some(StoreErrorMode::Allow),
            Some("deny") => Some(StoreErrorMode::Deny),
            Some(other) => {
                let span = s.on_error.as_ref().map(|m| m.span()).unwrap_or_default();
                self.fail(span, format!("rate_limit_store.on_error: \"{other}\" is not a mode; use \"local\", \"allow\" or \"deny\""))
            }
        };
        let mode = self.store_mode(s);
        Some(StoreConfig {
            servers: servers?,
            timeout: timeout?,
            on_error: on_error?,
            mode: mode?,
        })
    }

    /// `redis = "..."` or `cluster = [...]`, exactly one of them.
    fn store_servers(&mut self, raw: &Spanned<RawStore>) -> Option<StoreServers> {
        let s = raw.get_ref();
        match (&s.redis, &s.cluster) {
            (Some(url), None) => {
                let ok = ["redis://", "rediss://", "redis+unix://"]
                    .iter()
                    .any(|scheme| url.get_ref().starts_with(scheme));
                if ok {
                    Some(StoreServers::Single(url.get_ref().clone()))
                } else {
                    self.fail(
                        url.span(),
                        format!("rate_limit_store.redis: \"{}\" is not a Redis URL; write e.g. \"redis://127.0.0.1:6379/0\"", url.get_ref()),
                    )
                }
            }
            (None, Some(nodes)) => self.cluster_nodes(nodes),
            (Some(url), Some(_)) => self.fail(
                url.span(),
                format!("rate_limit_store.redis: \"{}\" is set together with rate_limit_store.cluster; keep one: redis for one server, cluster for a Redis Cluster's seed nodes", url.get_ref()),
            ),
            (None, None) => self.fail(
                raw.span(),
                "rate_limit_store: neither redis nor cluster is set; add redis = \"redis://127.0.0.1:6379/0\" or cluster = [\"redis://10.0.0.1:7000\", ...]".to_owned(),
            ),
        }
    }

    fn cluster_nodes(&mut self, nodes: &Spanned<Vec<Spanned<String>>>) -> Option<StoreServers> {
        if nodes.get_ref().is_empty() {
            return self.fail(
                nodes.span(),
                "rate_limit_store.cluster: [] names no node; list at least one seed node, e.g. [\"redis://10.0.0.1:7000\"]".to_owned(),
            );
        }
        let mut ok = true;
        for node in nodes.get_ref() {
            let url = node.get_ref();
            let rest = url
                .strip_prefix("redis://")
                .or_else(|| url.strip_prefix("rediss://"));
            // A cluster has database 0 only; the crate refuses any other.
            let fine = rest.is_some_and(|r| {
                let path = r.split_once('/').map_or("", |(_, p)| p);
                !r.is_empty() && (path.is_empty() || path == "0")
            });
            if !fine {
                ok = false;
                self.fail::<()>(
                    node.span(),
                    format!("rate_limit_store.cluster: \"{url}\" is not a cluster node URL; write e.g. \"redis://10.0.0.1:7000\" (redis:// or rediss://, database 0 only)"),
                );
            }
        }
        ok.then(|| {
            StoreServers::Cluster(
                nodes
                    .get_ref()
                    .iter()
                    .map(|n| n.get_ref().clone())
                    .collect(),
            )
        })
    }

    fn store_mode(&mut self, s: &RawStore) -> Option<StoreMode> {
        match s.mode.as_ref().map(|m| m.get_ref().as_str()) {
            None | Some("exact") => {
                for (key, value) in [("lease", &s.lease), ("lease_ttl", &s.lease_ttl)] {
                    if let Some(v) = value {
                        self.fail::<()>(
                            v.span(),
                            format!("rate_limit_store.{key}: \"{}\" only applies in lease mode; add mode = \"lease\" or remove it", v.get_ref()),
                        );
                    }
                }
                (s.lease.is_none() && s.lease_ttl.is_none()).then_some(StoreMode::Exact)
            }
            Some("lease") => {
                let lease = s.lease.as_ref().map(|l| self.lease_share(l));
                let ttl = s.lease_ttl.as_ref().map(|t| self.lease_ttl(t));
                Some(StoreMode::Lease(LeaseConfig {
                    share_bp: lease.unwrap_or(Some(DEFAULT_LEASE_BP))?,
                    ttl: ttl.unwrap_or(Some(DEFAULT_LEASE_TTL))?,
                }))
            }
            Some(other) => {
                let span = s.mode.as_ref().map(|m| m.span()).unwrap_or_default();
                self.fail(
                    span,
                    format!("rate_limit_store.mode: \"{other}\" is not a mode; use \"exact\" (one round trip per request) or \"lease\""),
                )
            }
        }
    }

    fn lease_ttl(&mut self, raw: &Spanned<String>) -> Option<Duration> {
        let d = self.duration("rate_limit_store.lease_ttl", raw)?;
        if LEASE_TTL.contains(&d) {
            return Some(d);
        }
        self.fail(
            raw.span(),
            format!(
                "rate_limit_store.lease_ttl: \"{}\" is out of range; use \"10ms\" to \"10s\", e.g. \"250ms\"",
                raw.get_ref()
            ),
        )
    }

    /// `"5%"`, `"0.5%"`, `"12.25%"` -> hundredths of a percent.
    fn lease_share(&mut self, raw: &Spanned<String>) -> Option<u32> {
        let text = raw.get_ref();
        let parsed = text.strip_suffix('%').and_then(|number| {
            let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
            let digits = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
            if whole.is_empty()
                || whole.len() > 3
                || frac.len() > 2
                || !digits(whole)
                || !digits(frac)
            {
                return None;
            }
            let whole: u32 = whole.parse().ok()?;
            let frac: u32 = format!("{frac:0<2}").parse().ok()?;
            Some(whole * 100 + frac)
        });
        match parsed {
            Some(bp) if LEASE_SHARE_BP.contains(&bp) => Some(bp),
            Some(_) => self.fail(
                raw.span(),
                format!("rate_limit_store.lease: \"{text}\" is out of range; use \"0.01%\" to \"50%\" of the burst, e.g. \"5%\""),
            ),
            None => self.fail(
                raw.span(),
                format!("rate_limit_store.lease: \"{text}\" is not a percentage; write e.g. \"5%\" or \"0.5%\""),
            ),
        }
    }
}
