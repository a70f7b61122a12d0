//! `[rate_limit_store]`: one Redis server or a cluster's seed nodes, the error mode, and
//! exact or lease mode with its batch share and age.

use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use super::super::file::RawStore;
use super::super::{LeaseConfig, StoreConfig, StoreErrorMode, StoreMode, StoreServers};
use super::{range, Validator};

/// `lease`, in hundredths of a percent: a batch between 0.01% and half of a burst.
/// More than half would let two gateways hold the whole bucket between them.
const LEASE_SHARE_BP: RangeInclusive<u32> = 1..=5_000;
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
            range::STORE_TIMEOUT,
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
            (Some(url), Some(nodes)) => {
                // Reported too, so one run shows everything to fix.
                self.cluster_nodes(nodes);
                self.fail(
                    url.span(),
                    format!("rate_limit_store.redis: \"{}\" is set together with rate_limit_store.cluster; keep one: redis for one server, cluster for a Redis Cluster's seed nodes", url.get_ref()),
                )
            }
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
        self.duration_in("rate_limit_store.lease_ttl", raw, range::LEASE_TTL)
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::parse;

    /// A valid config with `store` as its `[rate_limit_store]` table (line 1 onwards).
    fn with_store(store: &str) -> String {
        format!(
            "[rate_limit_store]\n{store}\n[listen]\nhttp = \"127.0.0.1:0\"\n\n[environments.qa]\nupstream = \"http://127.0.0.1:9000\"\n"
        )
    }

    fn store(text: &str) -> StoreConfig {
        parse(&with_store(text), Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
            .config
            .rate_limit_store
            .unwrap()
    }

    /// The single error for `text`, as `check` prints it.
    fn error(text: &str) -> String {
        let errors = parse(&with_store(text), Path::new("t.toml")).unwrap_err();
        assert_eq!(errors.0.len(), 1, "{errors}");
        errors.0[0].to_string()
    }

    #[test]
    fn cluster_and_lease_mode_are_read_with_their_defaults() {
        let s = store("cluster = [\"redis://127.0.0.1:7000\", \"rediss://10.0.0.2:7001/0\"]\nmode = \"lease\"");
        assert_eq!(
            s.servers,
            StoreServers::Cluster(vec![
                "redis://127.0.0.1:7000".into(),
                "rediss://10.0.0.2:7001/0".into()
            ])
        );
        let lease = LeaseConfig {
            share_bp: 500,
            ttl: Duration::from_millis(250),
        };
        assert_eq!(s.mode, StoreMode::Lease(lease));
        let s = store(
            "redis = \"redis://h:6379/0\"\nmode = \"lease\"\nlease = \"0.5%\"\nlease_ttl = \"1s\"",
        );
        assert_eq!(s.servers, StoreServers::Single("redis://h:6379/0".into()));
        let lease = LeaseConfig {
            share_bp: 50,
            ttl: Duration::from_secs(1),
        };
        assert_eq!(s.mode, StoreMode::Lease(lease));
        assert_eq!(store("redis = \"redis://h:6379/0\"").mode, StoreMode::Exact);
    }

    #[test]
    fn a_batch_is_the_share_of_the_burst_and_at_least_one() {
        let lease = |share_bp| LeaseConfig {
            share_bp,
            ttl: Duration::from_millis(250),
        };
        assert_eq!(lease(500).batch(1000), 50);
        assert_eq!(lease(500).batch(10), 1);
        assert_eq!(lease(5000).batch(3), 1);
        assert_eq!(lease(1).batch(u32::MAX), 429_496);
    }

    #[test]
    fn redis_xor_cluster() {
        let both = error("redis = \"redis://h:6379\"\ncluster = [\"redis://h:7000\"]");
        assert!(both.starts_with("t.toml:2:9: rate_limit_store.redis: \"redis://h:6379\" is set together with rate_limit_store.cluster"), "{both}");
        let neither = error("timeout = \"20ms\"");
        assert!(
            neither.starts_with("t.toml:1:1: rate_limit_store: neither redis nor cluster is set"),
            "{neither}"
        );
        let empty = error("cluster = []");
        assert!(
            empty.starts_with("t.toml:2:11: rate_limit_store.cluster: [] names no node"),
            "{empty}"
        );
    }

    #[test]
    fn cluster_nodes_are_redis_urls_on_database_zero() {
        for (value, col) in [
            ("http://h:7000", 31),
            ("redis://h:7000/3", 31),
            ("redis+unix:///s", 31),
        ] {
            let e = error(&format!("cluster = [\"redis://ok:7000\", \"{value}\"]"));
            let expected = format!(
                "t.toml:2:{col}: rate_limit_store.cluster: \"{value}\" is not a cluster node URL"
            );
            assert!(e.starts_with(&expected), "{e}");
        }
    }

    #[test]
    fn lease_and_lease_ttl_have_ranges() {
        let base = "redis = \"redis://h:6379\"\nmode = \"lease\"\n";
        for (line, path, value, hint) in [
            (
                "lease = \"0%\"",
                "lease",
                "0%",
                "is out of range; use \"0.01%\" to \"50%\"",
            ),
            ("lease = \"60%\"", "lease", "60%", "is out of range"),
            (
                "lease = \"0.001%\"",
                "lease",
                "0.001%",
                "is not a percentage",
            ),
            (
                "lease = \"5\"",
                "lease",
                "5",
                "is not a percentage; write e.g. \"5%\"",
            ),
            ("lease = \"-5%\"", "lease", "-5%", "is not a percentage"),
            (
                "lease_ttl = \"5ms\"",
                "lease_ttl",
                "5ms",
                "is out of range; use between \"10ms\" and \"10s\"",
            ),
            ("lease_ttl = \"1m\"", "lease_ttl", "1m", "is out of range"),
            (
                "lease_ttl = \"soon\"",
                "lease_ttl",
                "soon",
                "is not a duration",
            ),
        ] {
            let e = error(&format!("{base}{line}"));
            let col = line.find('"').unwrap() + 1;
            let expected = format!("t.toml:4:{col}: rate_limit_store.{path}: \"{value}\" {hint}");
            assert!(e.starts_with(&expected), "{e}\nwanted {expected}");
        }
    }

    #[test]
    fn mode_is_exact_or_lease_and_lease_keys_need_lease_mode() {
        let e = error("redis = \"redis://h:6379\"\nmode = \"batch\"");
        assert!(
            e.starts_with(
                "t.toml:3:8: rate_limit_store.mode: \"batch\" is not a mode; use \"exact\""
            ),
            "{e}"
        );
        let e = error("redis = \"redis://h:6379\"\nlease = \"5%\"");
        assert!(e.starts_with("t.toml:3:9: rate_limit_store.lease: \"5%\" only applies in lease mode; add mode = \"lease\""), "{e}");
    }
}
