//! Fleet mode on a real 3-node Redis Cluster (redis-server --cluster-enabled, joined by
//! `redis-cli --cluster create`), on loopback ports picked free by the test.
#![cfg(feature = "redis")]

mod common;

use std::num::NonZeroU32;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use specter::config::{
    QuotaConfig, RateLimitConfig, StoreConfig, StoreErrorMode, StoreMode, StoreServers,
};
use specter::ratelimit::redis::RedisStore;

/// A port `p` with `p + 10000` (the cluster bus) free too.
fn cluster_port() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = a.local_addr().unwrap().port();
        if p <= 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

struct Node {
    port: u16,
    child: Option<Child>,
}

/// Three masters, no replicas, killed on drop. `cluster-require-full-coverage no`: the
/// surviving nodes keep serving their slots when one dies.
struct Cluster {
    _dir: tempfile::TempDir,
    nodes: Vec<Node>,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let conf = dir.path().join(format!("nodes-{port}.conf"));
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file"])
                .arg(&conf)
                .args(["--cluster-node-timeout", "1000"])
                .args(["--cluster-require-full-coverage", "no"])
                .args(["--save", "", "--appendonly", "no", "--dir"])
                .arg(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("redis-server is installed (.ci/run installs it)");
            nodes.push(Node {
                port,
                child: Some(Child(child)),
            });
        }
        let cluster = Cluster { _dir: dir, nodes };
        for i in 0..3 {
            let up = poll_until(Duration::from_secs(10), || async {
                cluster.query::<String>(i, &["PING"]).await.is_ok()
            })
            .await;
            assert!(up, "redis-server {i} did not come up");
        }
        let addrs: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli is installed (redis-tools)");
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        for i in 0..3 {
            let ok = poll_until(Duration::from_secs(10), || async {
                let info = cluster.query::<String>(i, &["CLUSTER", "INFO"]).await;
                info.is_ok_and(|i| i.contains("cluster_state:ok"))
            })
            .await;
            assert!(ok, "node {i} never saw the cluster as ok");
        }
        cluster
    }

    fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// One command on node `i` itself (no redirection).
    async fn query<T: redis::FromRedisValue>(
        &self,
        i: usize,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.nodes[i].port))?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// The node that holds `key` (keys exist while their bucket is not full).
    async fn holder(&self, key: &str) -> Option<usize> {
        for i in 0..self.nodes.len() {
            if self.nodes[i].child.is_some()
                && self.query::<i64>(i, &["EXISTS", key]).await == Ok(1)
            {
                return Some(i);
            }
        }
        None
    }

    fn kill(&mut self, i: usize) {
        self.nodes[i].child = None;
    }

    fn store_toml(&self, extra: &str) -> String {
        let seeds: Vec<String> = self.seeds().iter().map(|s| format!("\"{s}\"")).collect();
        format!(
            "[rate_limit_store]\ncluster = [{}]\ntimeout = \"500ms\"\non_error = \"deny\"\n{extra}\n",
            seeds.join(", ")
        )
    }
}

fn key(i: usize) -> String {
    format!("spk_qa_cluster{i:04}")
}

/// `n` keys (ids `k0000`...) in environment qa, with limits.
fn many_keys_config(up: &Upstream, store: &str, limits: &str, n: usize) -> String {
    let mut text = format!(
        "{store}[environments.qa]\nupstream = \"{}\"\n[environments.qa.rate_limit]\n{limits}\n",
        up.url()
    );
    for i in 0..n {
        text.push_str(&key_block("qa", &format!("k{i:04}"), &key(i)));
    }
    text
}

/// Sends one request per key in `keys`, through `gw`, 32 at a time; returns the statuses.
async fn statuses(gw: &TestGateway, keys: impl Iterator<Item = usize>) -> Vec<(usize, u16)> {
    use futures_util::StreamExt;
    let c = client();
    futures_util::stream::iter(keys)
        .map(|i| {
            let c = c.clone();
            let url = gw.url("/");
            async move {
                let k = key(i);
                let answer = get(&c, &url, &[("x-api-key", k.as_str())]).await;
                (i, answer.status.as_u16())
            }
        })
        .buffered(32)
        .collect()
        .await
}

fn quota(requests: u32, per: Duration, burst: u32) -> QuotaConfig {
    QuotaConfig {
        requests: NonZeroU32::new(requests).unwrap(),
        per,
        burst: NonZeroU32::new(burst).unwrap(),
    }
}

/// Two gateways share every key's limit through the cluster; 1,000 keys land on all
/// three nodes, and no request fails (a CROSSSLOT error would be a 503 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_a_thousand_keys_spread_over_the_cluster() {
    let cluster = Cluster::start().await;
    let up = Upstream::start("qa").await;
    let limits = "per_key = { requests = 1, per = \"1m\", burst = 2 }\ntotal = { requests = 1, per = \"1m\", burst = 100000 }";
    let text = many_keys_config(&up, &cluster.store_toml(""), limits, 1000);
    let a = TestGateway::start(&text).await;
    let b = TestGateway::start(&text).await;
    for (gw, expected) in [(&a, 200), (&b, 200), (&a, 429)] {
        let got = statuses(gw, 0..1000).await;
        let wrong: Vec<_> = got.iter().filter(|(_, s)| *s != expected).collect();
        assert!(
            wrong.is_empty(),
            "expected {expected}, got {:?}",
            &wrong[..wrong.len().min(10)]
        );
    }
    let mut per_node = Vec::new();
    for i in 0..3 {
        per_node.push(cluster.query::<i64>(i, &["DBSIZE"]).await.unwrap());
    }
    assert_eq!(
        per_node.iter().sum::<i64>(),
        1001,
        "1,000 keys + the total: {per_node:?}"
    );
    assert!(
        per_node.iter().all(|n| *n > 250),
        "keys not spread: {per_node:?}"
    );
}

/// Exact mode on a cluster charges the key, then the total; a refusal by the total
/// gives the key's cell back.
#[tokio::test]
async fn a_refusal_by_the_total_gives_the_key_cell_back() {
    let cluster = Cluster::start().await;
    let store = RedisStore::new(&StoreConfig {
        servers: StoreServers::Cluster(cluster.seeds()),
        timeout: Duration::from_secs(1),
        on_error: StoreErrorMode::Deny,
        mode: StoreMode::Exact,
    })
    .unwrap();
    let minute = Duration::from_secs(60);
    let limits = RateLimitConfig {
        per_key: Some(quota(1, minute, 2)),
        total: Some(quota(1, minute, 1)),
    };
    let first = store.check("qa", "k1", &limits).await.unwrap();
    assert_eq!(
        first.unwrap().unwrap(),
        "\"per_key\";r=1;t=60, \"total\";r=0;t=60"
    );
    let (err, _) = store.check("qa", "k2", &limits).await.unwrap().unwrap_err();
    assert!(matches!(
        err,
        specter::error::GatewayError::RateLimited { scope: "total", .. }
    ));
    assert!(cluster.holder("specter:rl:qa:k1").await.is_some());
    assert_eq!(
        cluster.holder("specter:rl:qa:k2").await,
        None,
        "k2's cell was given back"
    );
}

/// One node dies: the keys it held follow on_error (deny: 503), the others keep their
/// exact shared limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_only_the_keys_it_held() {
    let mut cluster = Cluster::start().await;
    let up = Upstream::start("qa").await;
    let limits = "per_key = { requests = 1, per = \"1m\", burst = 2 }\ntotal = { requests = 1, per = \"1m\", burst = 100000 }";
    let text = many_keys_config(&up, &cluster.store_toml(""), limits, 60);
    let gw = TestGateway::start(&text).await;
    assert!(statuses(&gw, 0..60).await.iter().all(|(_, s)| *s == 200));
    let total = cluster.holder("specter:rl:qa:_total").await.unwrap();
    let victim = (total + 1) % 3;
    let mut held = Vec::new();
    for i in 0..60 {
        held.push(
            cluster
                .holder(&format!("specter:rl:qa:k{i:04}"))
                .await
                .unwrap(),
        );
    }
    assert!(held.contains(&victim), "no key on node {victim}: {held:?}");
    cluster.kill(victim);

    for (expected_alive, round) in [(200, "second cell"), (429, "bucket empty")] {
        for (i, status) in statuses(&gw, 0..60).await {
            let expected = if held[i] == victim {
                503
            } else {
                expected_alive
            };
            assert_eq!(status, expected, "{round}: key {i} on node {}", held[i]);
        }
    }
}

/// Slots move to another node while requests flow: MOVED and ASK are followed, no
/// request fails, and the counters move with their keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_slots_are_followed_without_failed_requests() {
    let cluster = Cluster::start().await;
    let up = Upstream::start("qa").await;
    let limits = "per_key = { requests = 1, per = \"1m\", burst = 1000 }";
    let text = many_keys_config(&up, &cluster.store_toml(""), limits, 200);
    let gw = TestGateway::start(&text).await;
    assert!(statuses(&gw, 0..200).await.iter().all(|(_, s)| *s == 200));
    let before = cluster.query::<i64>(0, &["DBSIZE"]).await.unwrap();
    assert!(before > 0);
    let from: String = cluster.query(0, &["CLUSTER", "MYID"]).await.unwrap();
    let to: String = cluster.query(1, &["CLUSTER", "MYID"]).await.unwrap();

    let seed = format!("127.0.0.1:{}", cluster.nodes[0].port);
    let reshard = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &seed,
                "--cluster-from",
                &from,
                "--cluster-to",
                &to,
            ])
            .args(["--cluster-slots", "5461", "--cluster-yes"])
            .output()
            .unwrap()
    });
    let mut rounds = 0;
    while !reshard.is_finished() || rounds < 2 {
        let got = statuses(&gw, 0..200).await;
        let failed: Vec<_> = got.iter().filter(|(_, s)| *s != 200).collect();
        assert!(
            failed.is_empty(),
            "round {rounds}: {:?}",
            &failed[..failed.len().min(10)]
        );
        rounds += 1;
    }
    let out = reshard.await.unwrap();
    assert!(
        out.status.success(),
        "reshard: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(
        cluster.query::<i64>(0, &["DBSIZE"]).await.unwrap(),
        0,
        "node 0 gave all its slots away"
    );
    // Every key was charged 1 + rounds times, on whichever node held it: nothing lost.
    let c = client();
    let answer = get(&c, &gw.url("/"), &[("x-api-key", key(0).as_str())]).await;
    let state = answer.headers["ratelimit"].to_str().unwrap().to_owned();
    let expected = format!("\"per_key\";r={};", 1000 - 2 - rounds);
    assert!(state.starts_with(&expected), "{state}, expected {expected}");
}

/// Lease mode through the cluster: two gateways take batches (50% of 20 = 10 cells) of
/// each key's bucket and of the total, from whichever nodes hold them; together they
/// admit exactly what the buckets hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_shares_buckets_through_the_cluster() {
    let cluster = Cluster::start().await;
    let up = Upstream::start("qa").await;
    let store = cluster.store_toml("mode = \"lease\"\nlease = \"50%\"\nlease_ttl = \"10s\"");
    let limits = "per_key = { requests = 1, per = \"1h\", burst = 20 }\ntotal = { requests = 1, per = \"1h\", burst = 50 }";
    let text = many_keys_config(&up, &store, limits, 4);
    let a = TestGateway::start(&text).await;
    let b = TestGateway::start(&text).await;
    let mut admitted = [0; 4];
    for round in 0..30 {
        for gw in [&a, &b] {
            for (i, status) in statuses(gw, 0..4).await {
                match status {
                    200 => admitted[i] += 1,
                    429 => {}
                    other => panic!("round {round}, key {i}: {other}"),
                }
            }
        }
    }
    // 50 for the environment; no key above its 20.
    assert_eq!(admitted.iter().sum::<u32>(), 50, "{admitted:?}");
    assert!(admitted.iter().all(|n| *n <= 20), "{admitted:?}");
}
