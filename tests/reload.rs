//! Hot reload over real files in a temp folder, a real gateway and real recording
//! upstreams: the three ways a config file gets replaced, rejected configs, key changes,
//! requests in flight across a swap, swaps under load, SIGHUP to the binary, and
//! `[listen]` changes (read at start only).

mod common;

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{ChildStderr, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use specter::reload::{self, DEBOUNCE};
use specter::state::Shared;
use specter::Gateway;
use tempfile::TempDir;

const KEY: &str = "spk_development_reloadtest0000000000000000";
/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);
/// A file that is not TOML at all.
const BROKEN: &str = "[environments.development\nupstream = \"http://127.0.0.1:1\"\n";

// ---------------------------------------------------------------------------------
// Config text

fn listen_block(http: &str, admin: &str) -> String {
    format!(
        "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n[limits]\nshutdown_grace = \"2s\"\n\n"
    )
}

/// One environment: its upstreams and its keys as (id, key).
fn env_block(name: &str, upstreams: &[&Upstream], keys: &[(&str, &str)]) -> String {
    let urls: Vec<String> = upstreams
        .iter()
        .map(|u| format!("\"{}\"", u.url()))
        .collect();
    let mut text = format!("[environments.{name}]\nupstreams = [{}]\n", urls.join(", "));
    for (id, key) in keys {
        text.push_str(&key_block(name, id, key));
    }
    text.push('\n');
    text
}

/// Loopback listeners on free ports and one `development` environment.
fn dev_config(upstreams: &[&Upstream], keys: &[(&str, &str)]) -> String {
    listen_block("127.0.0.1:0", "127.0.0.1:0") + &env_block("development", upstreams, keys)
}

/// 1-based number of the last line of `text` containing `needle`.
fn last_line_with(text: &str, needle: &str) -> usize {
    text.lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
        .last()
        .unwrap_or_else(|| panic!("{needle:?} not in the config"))
}

fn reload_count(metrics: &str, result: &str) -> u64 {
    let prefix = format!("specter_config_reloads_total{{result=\"{result}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse::<f64>().expect("a number") as u64)
}

// ---------------------------------------------------------------------------------
// The three ways a file gets replaced

/// What `std::fs::write` does: open, truncate, write, close on the same inode.
fn write_in_place(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Editors, `sed -i` and `promote --apply`: a temp file beside it, renamed over.
fn write_and_rename(path: &Path, text: &str) {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".specter.toml.{n}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A Kubernetes ConfigMap volume: `specter.toml -> ..data/specter.toml` and
/// `..data -> ..<timestamp>`; the file's own name never changes on an update.
struct ConfigMapDir {
    root: PathBuf,
    generation: usize,
}

impl ConfigMapDir {
    fn create(root: &Path, text: &str) -> ConfigMapDir {
        let mut cm = ConfigMapDir {
            root: root.to_owned(),
            generation: 0,
        };
        let folder = cm.timestamped_folder(text);
        symlink(&folder, root.join("..data")).unwrap();
        symlink("..data/specter.toml", root.join("specter.toml")).unwrap();
        cm
    }

    fn timestamped_folder(&mut self, text: &str) -> String {
        self.generation += 1;
        let name = format!(
            "..2026_11_20_10_00_0{}.{:09}",
            self.generation, self.generation
        );
        std::fs::create_dir(self.root.join(&name)).unwrap();
        std::fs::write(self.root.join(&name).join("specter.toml"), text).unwrap();
        name
    }

    /// What the kubelet does: a new timestamped folder, `..data_tmp` pointing at it,
    /// renamed over `..data`, then the old folder removed.
    fn update(&mut self, text: &str) {
        let old = std::fs::read_link(self.root.join("..data")).unwrap();
        let folder = self.timestamped_folder(text);
        symlink(&folder, self.root.join("..data_tmp")).unwrap();
        std::fs::rename(self.root.join("..data_tmp"), self.root.join("..data")).unwrap();
        std::fs::remove_dir_all(self.root.join(old)).unwrap();
    }
}

// ---------------------------------------------------------------------------------
// Waiting on observable conditions

/// Polls `check` until it holds; fails the test after [`DEADLINE`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(
        poll_until(DEADLINE, check).await,
        "timed out after {DEADLINE:?} waiting for {what}"
    );
}

/// The status of a GET, or `None` when nothing answered (not listening yet).
async fn try_status(client: &TestClient, url: &str) -> Option<u16> {
    let req = Request::get(url).body(Full::new(Bytes::new())).unwrap();
    let response = client.request(req).await.ok()?;
    Some(response.status().as_u16())
}

// ---------------------------------------------------------------------------------
// An in-process gateway on a config file

struct Fixture {
    /// Owns the folder; dropped last.
    _dir: TempDir,
    path: PathBuf,
    gateway: Gateway,
    client: TestClient,
}

impl Fixture {
    /// Writes `text` to `<tmp>/specter.toml` and starts a gateway on it (no watcher).
    async fn start(text: &str) -> Fixture {
        let dir = TempDir::new().unwrap();
        let path = dir.path().join("specter.toml");
        std::fs::write(&path, text).unwrap();
        Fixture::start_at(dir, path).await
    }

    async fn start_at(dir: TempDir, path: PathBuf) -> Fixture {
        let loaded = specter::config::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let gateway = Gateway::start(loaded.config).await.expect("gateway starts");
        Fixture {
            _dir: dir,
            path,
            gateway,
            client: client(),
        }
    }

    /// The folder watcher and SIGHUP handler, as `specter run` starts them.
    fn watch(&self) {
        reload::watch(self.shared().clone(), self.path.clone()).expect("watcher starts");
    }

    fn shared(&self) -> &Arc<Shared> {
        self.gateway.shared()
    }

    fn version(&self) -> u64 {
        self.shared().state.load().version
    }

    fn reloads(&self, result: &str) -> u64 {
        reload_count(&self.shared().metrics.encode(), result)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway.http_addr().unwrap())
    }

    async fn get(&self, key: &str) -> Answer {
        get(&self.client, &self.url("/reload"), &[("x-api-key", key)]).await
    }

    /// Asserts that `key` is answered 200 by the upstream named `upstream`.
    async fn assert_routed(&self, key: &str, upstream: &str) {
        let answer = self.get(key).await;
        assert_eq!(answer.status, 200, "body: {}", answer.text());
        assert_eq!(answer.text(), upstream, "answered by the wrong upstream");
    }

    async fn admin_config(&self) -> Value {
        let url = format!("http://{}/config", self.gateway.admin_addr().unwrap());
        let answer = get(&self.client, &url, &[]).await;
        assert_eq!(answer.status, 200);
        answer.json()
    }

    /// Reloads the file now, off the async threads like the watcher does.
    async fn reload_now(&self) -> Result<u64, String> {
        let (shared, path) = (self.shared().clone(), self.path.clone());
        tokio::task::spawn_blocking(move || {
            reload::reload_now(&shared, &path)
                .map(|summary| summary.version)
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap()
    }

    /// Waits until the admin `/config` reports `version`.
    async fn wait_for_version(&self, version: u64) {
        let fx = self;
        eventually(&format!("/config version {version}"), move || async move {
            fx.admin_config().await["version"].as_u64() >= Some(version)
        })
        .await;
    }

    /// Waits until the failure counter reaches `failures` (a rejected reload).
    async fn wait_for_failures(&self, failures: u64) {
        let fx = self;
        eventually(&format!("{failures} failed reloads"), move || async move {
            fx.reloads("failure") >= failures
        })
        .await;
    }

    /// Waits out a quiet period well past the debounce, then checks that nothing more
    /// happened: the version and the success counter are where they were expected.
    async fn assert_settled(&self, version: u64, successes: u64) {
        tokio::time::sleep(DEBOUNCE * 3).await;
        assert_eq!(self.version(), version, "more than one reload");
        assert_eq!(self.reloads("success"), successes, "more than one reload");
        assert_eq!(self.admin_config().await["version"], version);
    }
}

// ---------------------------------------------------------------------------------
// 1. The three replacement styles

/// With the watcher on, `replace` rewrites the config to route to `b` instead of `a`:
/// exactly one reload follows and the next request reaches `b`.
async fn one_reload_moves_traffic(
    fx: &Fixture,
    a: &Upstream,
    b: &Upstream,
    replace: impl FnOnce(&str),
) {
    fx.watch();
    fx.assert_routed(KEY, "a").await;
    let successes = fx.reloads("success");
    replace(&dev_config(&[b], &[("svc", KEY)]));
    fx.wait_for_version(2).await;
    fx.assert_settled(2, successes + 1).await;
    assert_eq!(fx.admin_config().await["last_reload_error"], Value::Null);
    fx.assert_routed(KEY, "b").await;
    assert_eq!((a.count(), b.count()), (1, 1));
}

#[tokio::test]
async fn in_place_write_reloads_once() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let fx = Fixture::start(&dev_config(&[&a], &[("svc", KEY)])).await;
    let path = fx.path.clone();
    one_reload_moves_traffic(&fx, &a, &b, |text| write_in_place(&path, text)).await;
}

#[tokio::test]
async fn temp_file_renamed_over_reloads_once() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let fx = Fixture::start(&dev_config(&[&a], &[("svc", KEY)])).await;
    let path = fx.path.clone();
    one_reload_moves_traffic(&fx, &a, &b, |text| write_and_rename(&path, text)).await;
}

#[tokio::test]
async fn kubernetes_configmap_symlink_swap_reloads_once() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let dir = TempDir::new().unwrap();
    let mut cm = ConfigMapDir::create(dir.path(), &dev_config(&[&a], &[("svc", KEY)]));
    let path = dir.path().join("specter.toml");
    let fx = Fixture::start_at(dir, path).await;
    one_reload_moves_traffic(&fx, &a, &b, |text| cm.update(text)).await;
    assert_eq!(
        fx.admin_config().await["environments"][0]["upstreams"][0],
        b.url()
    );
}

/// A file a reload introduces in a folder not watched before (here an `upstream_ca` in
/// a new folder) is watched from then on: changing it reloads.
#[tokio::test]
async fn files_in_a_folder_added_by_a_reload_are_watched() {
    let a = Upstream::start("a").await;
    let fx = Fixture::start(&dev_config(&[&a], &[("svc", KEY)])).await;
    fx.watch();
    let elsewhere = TempDir::new().unwrap();
    let ca = elsewhere.path().join("internal-ca.pem");
    let cert = rcgen::generate_simple_self_signed(vec!["ca.test".to_owned()]).unwrap();
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let with_ca = dev_config(&[&a], &[("svc", KEY)]).replace(
        "[environments.development]\n",
        &format!(
            "[environments.development]\nupstream_ca = {:?}\n",
            ca.display().to_string()
        ),
    );
    write_and_rename(&fx.path, &with_ca);
    fx.wait_for_version(2).await;
    fx.assert_settled(2, 1).await;

    // Rotating the CA file in the new folder is a reload of its own.
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    fx.wait_for_version(3).await;
    fx.assert_routed(KEY, "a").await;
}

// ---------------------------------------------------------------------------------
// 2. Rejected configs

/// A broken file and then an invalid one are each rejected whole with their location;
/// the old routing keeps serving; a fixed file recovers.
#[tokio::test]
async fn rejected_configs_keep_the_last_good_one_and_say_where() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let good = dev_config(&[&a], &[("svc", KEY)]);
    let fx = Fixture::start(&good).await;
    fx.watch();
    let (successes, failures) = (fx.reloads("success"), fx.reloads("failure"));

    let broken = format!("{good}[environments.qa\nupstream = \"{}\"\n", b.url());
    write_and_rename(&fx.path, &broken);
    fx.wait_for_failures(failures + 1).await;
    let error = rejected_error(&fx).await;
    assert_eq!(
        config_location(&error).0,
        last_line_with(&broken, "[environments.qa"),
        "{error}"
    );

    let hash = specter::config::hex(&specter::config::sha256(KEY.as_bytes()));
    let shared_key = good.clone() + &env_block("production", &[&b], &[("prod-svc", KEY)]);
    write_and_rename(&fx.path, &shared_key);
    fx.wait_for_failures(failures + 2).await;
    let error = rejected_error(&fx).await;
    assert!(error.contains("same key hash"), "{error}");
    let line = last_line_with(&shared_key, &hash);
    let col = shared_key.lines().nth(line - 1).unwrap().find('"').unwrap() + 1;
    assert_eq!(
        config_location(&error),
        (line, col),
        "points at the second use of the hash: {error}"
    );

    write_and_rename(&fx.path, &dev_config(&[&b], &[("svc", KEY)]));
    fx.wait_for_version(2).await;
    fx.assert_settled(2, successes + 1).await;
    assert_eq!(fx.admin_config().await["last_reload_error"], Value::Null);
    assert_eq!(fx.reloads("failure"), failures + 2);
    fx.assert_routed(KEY, "b").await;
}

/// A config written in place and paused mid-write (its writer still holds it open) is
/// not loaded, even when the part written so far is valid TOML; it is loaded once the
/// writer closes it.
///
/// Failing when written: the cut file, which lacks the `[policy]` table, was loaded
/// after the debounce and the denied path answered 200.
#[tokio::test]
async fn a_file_paused_mid_write_is_loaded_only_after_its_writer_closes_it() {
    use std::io::Write;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let policy = "[environments.development.policy]\ndeny_paths = [\"/reload\"]\n";
    let fx = Fixture::start(&(dev_config(&[&a], &[("svc", KEY)]) + policy)).await;
    fx.watch();
    fx.get(KEY).await.assert_error(403, "forbidden_path");

    let next = dev_config(&[&b], &[("svc", KEY)]);
    let mut writer = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&fx.path)
        .unwrap();
    writer.write_all(next.as_bytes()).unwrap();
    writer.flush().unwrap();
    // Nothing to await: the point is that nothing happens while the writer pauses.
    tokio::time::sleep(DEBOUNCE * 5).await;
    assert_eq!(fx.version(), 1, "a half-written file was loaded");
    fx.get(KEY).await.assert_error(403, "forbidden_path");

    writer.write_all(policy.as_bytes()).unwrap();
    drop(writer);
    fx.wait_for_version(2).await;
    let answer = fx.get(KEY).await;
    answer.assert_error(403, "forbidden_path");
    assert_eq!((a.count(), b.count()), (0, 0));
    assert_eq!(fx.reloads("failure"), 0);
}

/// A config path that is a device or a FIFO is refused at once, and the next reload of
/// a regular file works: nothing is read forever, nothing blocks.
///
/// Failing when written: `/dev/zero` was read until memory ran out and a FIFO blocked
/// the reload until a writer appeared.
#[tokio::test]
async fn a_config_path_that_is_not_a_regular_file_is_refused_without_blocking() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let fx = Fixture::start(&dev_config(&[&a], &[("svc", KEY)])).await;
    let swap_in = |target: &Path| {
        let link = fx.path.with_file_name(".link");
        symlink(target, &link).unwrap();
        std::fs::rename(&link, &fx.path).unwrap();
    };

    swap_in(Path::new("/dev/zero"));
    let error = fx.reload_now().await.unwrap_err();
    assert!(
        error.contains("character device, not a regular file"),
        "{error}"
    );

    let fifo = fx.path.with_file_name("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    swap_in(&fifo);
    let error = tokio::time::timeout(DEADLINE, fx.reload_now())
        .await
        .expect("a FIFO with no writer blocked the reload")
        .unwrap_err();
    assert!(error.contains("FIFO"), "{error}");

    write_and_rename(&fx.path, &dev_config(&[&b], &[("svc", KEY)]));
    assert_eq!(fx.reload_now().await, Ok(2));
    fx.assert_routed(KEY, "b").await;
}

/// An environment's `keys_file` is watched like the config: a key added to it (written
/// beside and renamed over) is served after the reload, and a removed one refused.
#[tokio::test]
async fn a_keys_file_is_watched_and_reloaded() {
    const NEW: &str = "spk_development_fromfile000000000000000000";
    let a = Upstream::start("a").await;
    let dir = TempDir::new().unwrap();
    let keys = dir.path().join("development.keys");
    let line = |id: &str, key: &str| {
        format!(
            "{id} {}\n",
            specter::config::hex(&specter::config::sha256(key.as_bytes()))
        )
    };
    std::fs::write(&keys, line("svc", KEY)).unwrap();
    let path = dir.path().join("specter.toml");
    let text = listen_block("127.0.0.1:0", "127.0.0.1:0")
        + &format!(
            "[environments.development]\nupstream = \"{}\"\nkeys_file = \"{}\"\n",
            a.url(),
            keys.display()
        );
    std::fs::write(&path, text).unwrap();
    let fx = Fixture::start_at(dir, path).await;
    fx.watch();
    fx.assert_routed(KEY, "a").await;
    fx.get(NEW).await.assert_error(401, "invalid_api_key");

    let tmp = keys.with_file_name(".development.keys.tmp");
    std::fs::write(&tmp, line("svc-2", NEW)).unwrap();
    std::fs::rename(&tmp, &keys).unwrap();
    fx.wait_for_version(2).await;
    fx.assert_routed(NEW, "a").await;
    fx.get(KEY).await.assert_error(401, "invalid_api_key");
}

/// After a rejected reload: version 1 still serves (to upstream `a`) and `/config`
/// reports the error. Returns the error text.
async fn rejected_error(fx: &Fixture) -> String {
    let config = fx.admin_config().await;
    assert_eq!(config["version"], 1, "{config}");
    assert_eq!(fx.version(), 1);
    let error = config["last_reload_error"]["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_reload_error in {config}"))
        .to_owned();
    assert!(config["last_reload_error"]["at"].is_string(), "{config}");
    fx.assert_routed(KEY, "a").await;
    error
}

// ---------------------------------------------------------------------------------
// 3. Keys added and removed

#[tokio::test]
async fn added_key_works_and_removed_key_is_refused_after_reload() {
    const OLD: &str = "spk_development_oldkey00000000000000000000";
    const NEW: &str = "spk_development_newkey00000000000000000000";
    let a = Upstream::start("a").await;
    let fx = Fixture::start(&dev_config(&[&a], &[("old", OLD)])).await;
    fx.watch();
    fx.assert_routed(OLD, "a").await;
    fx.get(NEW).await.assert_error(401, "invalid_api_key");

    write_and_rename(&fx.path, &dev_config(&[&a], &[("new", NEW)]));
    fx.wait_for_version(2).await;
    fx.assert_routed(NEW, "a").await;
    fx.get(OLD).await.assert_error(401, "invalid_api_key");
    let seen = a.requests();
    assert_eq!(seen.len(), 2, "the refused keys reached the upstream");
    assert_eq!(seen[0].headers["x-specter-key-id"], "old");
    assert_eq!(seen[1].headers["x-specter-key-id"], "new");
}

/// `idle_timeout` follows a reload for the connections accepted after it.
///
/// Failing when written: the accept loop kept the limits it started with, so the new
/// value was accepted, shown in nothing and applied to nothing.
#[tokio::test]
async fn a_reloaded_idle_timeout_applies_to_new_connections() {
    const KEY: &str = "spk_development_idle0000000000000000000000";
    let a = Upstream::start("a").await;
    let before = dev_config(&[&a], &[("svc", KEY)]);
    let fx = Fixture::start(&before).await;
    let after = before.replace(
        "shutdown_grace = \"2s\"\n",
        "shutdown_grace = \"2s\"\nidle_timeout = \"1s\"\n",
    );
    assert_ne!(before, after);
    std::fs::write(&fx.path, after).unwrap();
    assert_eq!(fx.reload_now().await, Ok(2));

    let addr = fx.gateway.http_addr().unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /idle HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut stream, request.as_bytes())
        .await
        .unwrap();
    let answered = Instant::now();
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        // The response, then EOF when the gateway closes the idle connection.
        loop {
            match tokio::io::AsyncReadExt::read(&mut stream, &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    let took = answered.elapsed();
    assert!(
        closed.is_ok() && took <= Duration::from_millis(2500),
        "an idle connection accepted after the reload was still open after {took:?} (idle_timeout = 1s)"
    );
}

// ---------------------------------------------------------------------------------
// 4. Requests in flight across a swap

/// A slow request that started on version 1 finishes against version 1's upstream,
/// while a request sent after the swap goes to version 2's.
#[tokio::test]
async fn request_in_flight_finishes_on_the_config_it_started_with() {
    let old = Upstream::start_with("old", Behaviour::Delay(Duration::from_millis(800))).await;
    let new = Upstream::start("new").await;
    let fx = Arc::new(Fixture::start(&dev_config(&[&old], &[("svc", KEY)])).await);
    let slow = tokio::spawn({
        let fx = fx.clone();
        async move { (fx.get(KEY).await, Instant::now()) }
    });
    let o = old.clone();
    eventually("the slow request to reach the old upstream", move || {
        let o = o.clone();
        async move { o.count() == 1 }
    })
    .await;

    write_and_rename(&fx.path, &dev_config(&[&new], &[("svc", KEY)]));
    assert_eq!(fx.reload_now().await, Ok(2));
    fx.assert_routed(KEY, "new").await;
    let new_done = Instant::now();

    let (answer, slow_done) = tokio::time::timeout(DEADLINE, slow).await.unwrap().unwrap();
    assert_eq!(answer.status, 200, "body: {}", answer.text());
    assert_eq!(answer.text(), "old");
    assert!(
        slow_done > new_done,
        "the slow request was not in flight during the swap"
    );
    assert_eq!((old.count(), new.count()), (1, 1));
}

/// A response body still streaming when its snapshot is swapped out (and dropped,
/// with its upstream client) arrives whole.
#[tokio::test]
async fn streaming_body_survives_the_swap_of_its_snapshot() {
    const SIZE: u64 = 16 * 1024 * 1024;
    let big = Upstream::start_with("big", Behaviour::LargeBody(SIZE)).await;
    let new = Upstream::start("new").await;
    let fx = Fixture::start(&dev_config(&[&big], &[("svc", KEY)])).await;
    let streaming = client();
    let req = Request::get(fx.url("/big"))
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = streaming.request(req).await.expect("gateway answers");
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = body
        .frame()
        .await
        .expect("a first frame")
        .expect("no error");
    let mut received = first.data_ref().map_or(0, |d| d.len() as u64);

    write_and_rename(&fx.path, &dev_config(&[&new], &[("svc", KEY)]));
    assert_eq!(fx.reload_now().await, Ok(2));
    fx.assert_routed(KEY, "new").await;

    let rest = tokio::time::timeout(DEADLINE, body.collect())
        .await
        .expect("the body finishes")
        .expect("the body streams without error");
    received += rest.to_bytes().len() as u64;
    assert_eq!(received, SIZE);
}

// ---------------------------------------------------------------------------------
// 5. Swaps under load

const CLIENTS: usize = 16;
const MAX_REQUESTS_PER_CLIENT: usize = 5_000;
const SWAPS: usize = 50;
const SWAP_EVERY: Duration = Duration::from_millis(80);

#[derive(Default)]
struct Tally {
    by_upstream: HashMap<String, usize>,
    failures: Vec<String>,
}

/// One keep-alive client sending GETs until told to stop (or a hard cap of count and
/// time). Anything but a 200 from a known upstream is a failure.
async fn keep_sending(url: String, stop: Arc<AtomicBool>) -> Tally {
    let client = client();
    let mut tally = Tally::default();
    let started = Instant::now();
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(15) {
            break;
        }
        let req = Request::get(&url)
            .header("x-api-key", KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let outcome = async {
            let response = client.request(req).await.map_err(|e| format!("{e:?}"))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("{e:?}"))?;
            let body = String::from_utf8_lossy(&body.to_bytes()).into_owned();
            match (status.as_u16(), body.as_str()) {
                (200, "a1" | "a2" | "b1" | "b2") => Ok(body),
                _ => Err(format!("{status}: {body}")),
            }
        };
        match tokio::time::timeout(Duration::from_secs(5), outcome).await {
            Ok(Ok(upstream)) => *tally.by_upstream.entry(upstream).or_default() += 1,
            Ok(Err(e)) => tally.failures.push(e),
            Err(_) => tally.failures.push("no answer within 5s".into()),
        }
    }
    tally
}

/// 16 clients keep sending while the file is swapped 50 times between two upstream
/// sets (every 10th write broken): not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_swaps_under_load_fail_no_request() {
    let set_a = [Upstream::start("a1").await, Upstream::start("a2").await];
    let set_b = [Upstream::start("b1").await, Upstream::start("b2").await];
    let text_a = dev_config(&[&set_a[0], &set_a[1]], &[("svc", KEY)]);
    let text_b = dev_config(&[&set_b[0], &set_b[1]], &[("svc", KEY)]);
    let fx = Fixture::start(&text_a).await;
    let (successes, failures) = (fx.reloads("success"), fx.reloads("failure"));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| tokio::spawn(keep_sending(fx.url("/load"), stop.clone())))
        .collect();

    let mut pace = tokio::time::interval(SWAP_EVERY);
    for i in 0..SWAPS {
        pace.tick().await;
        let (text, valid) = match i {
            i if i % 10 == 9 => (BROKEN, false),
            i if i % 2 == 0 => (text_b.as_str(), true),
            _ => (text_a.as_str(), true),
        };
        write_and_rename(&fx.path, text);
        assert_eq!(fx.reload_now().await.is_ok(), valid, "swap {i}");
    }
    stop.store(true, Ordering::Relaxed);

    let mut total = Tally::default();
    for task in clients {
        let tally = tokio::time::timeout(DEADLINE, task)
            .await
            .expect("client stops")
            .unwrap();
        total.failures.extend(tally.failures);
        for (upstream, n) in tally.by_upstream {
            *total.by_upstream.entry(upstream).or_default() += n;
        }
    }
    let sample: Vec<_> = total.failures.iter().take(5).collect();
    assert!(
        total.failures.is_empty(),
        "{} failed requests, e.g. {sample:?}",
        total.failures.len()
    );
    for up in set_a.iter().chain(&set_b) {
        let answered = total.by_upstream.get(up.name).copied().unwrap_or(0);
        assert!(
            answered > 0,
            "no request reached {}: {:?}",
            up.name,
            total.by_upstream
        );
        assert_eq!(
            up.count(),
            answered,
            "{} saw requests nobody got an answer to",
            up.name
        );
    }
    assert_eq!(fx.reloads("success"), successes + 45);
    assert_eq!(fx.reloads("failure"), failures + 5);
    assert_eq!(fx.version(), 46);
    let last = fx.get(KEY).await;
    assert!(
        ["b1", "b2"].contains(&last.text().as_str()),
        "{}",
        last.text()
    );
}

// ---------------------------------------------------------------------------------
// 6. SIGHUP to the binary

/// Collects the child's log lines as they come, so its stderr never fills up.
fn capture(stderr: ChildStderr) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let mut log = sink.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    log
}

fn signal(child: &Child, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.0.id()).unwrap();
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
}

async fn admin_version(client: &TestClient, admin: SocketAddr) -> Value {
    let answer = get(client, &format!("http://{admin}/config"), &[]).await;
    assert_eq!(answer.status, 200);
    answer.json()
}

/// Starts `specter run` and waits until it is ready and its reload handlers are in
/// place (the "specter running" line is logged after the watcher and SIGHUP handler).
async fn spawn_specter(
    path: &Path,
    admin: SocketAddr,
) -> Result<(Child, Arc<Mutex<String>>), String> {
    let mut child = Child(
        Command::new(specter_bin())
            .args(["--log-format", "json", "run", "--config"])
            .arg(path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let log = capture(child.0.stderr.take().unwrap());
    let (c, readyz) = (client(), format!("http://{admin}/readyz"));
    let deadline = Instant::now() + DEADLINE;
    loop {
        let running = log.lock().unwrap().contains("specter running");
        if running && try_status(&c, &readyz).await == Some(200) {
            return Ok((child, log));
        }
        let exited = child.0.try_wait().unwrap();
        if exited.is_some() || Instant::now() >= deadline {
            return Err(format!("(exit: {exited:?})\n{}", log.lock().unwrap()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn sighup_reloads_the_running_binary_and_sigterm_exits_zero() {
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("specter.toml");
    let config = |http: SocketAddr, admin: SocketAddr, up: &Upstream| {
        listen_block(&http.to_string(), &admin.to_string())
            + &env_block("development", &[up], &[("svc", KEY)])
    };
    let (http, admin, child, log) = on_free_ports(|http, admin| {
        std::fs::write(&path, config(http, admin, &a)).unwrap();
        let path = &path;
        async move {
            let (child, log) = spawn_specter(path, admin).await?;
            Ok((http, admin, child, log))
        }
    })
    .await;
    let c = client();
    let route = |c: &TestClient| {
        let url = format!("http://{http}/hup");
        let c = c.clone();
        async move { get(&c, &url, &[("x-api-key", KEY)]).await.text() }
    };
    let first = admin_version(&c, admin).await;
    assert_eq!(first["version"], 1);
    assert_eq!(route(&c).await, "a");

    // The file is untouched: only SIGHUP can make version 2.
    signal(&child, libc::SIGHUP);
    let cc = &c;
    eventually("version 2 after SIGHUP", move || async move {
        admin_version(cc, admin).await["version"] == 2
    })
    .await;
    let second = admin_version(&c, admin).await;
    assert_eq!(second["sha256"], first["sha256"]);
    assert_eq!(second["last_reload_error"], Value::Null);
    assert_eq!(route(&c).await, "a");

    write_and_rename(&path, &config(http, admin, &b));
    eventually("version 3 after the file changed", move || async move {
        admin_version(cc, admin).await["version"] == 3
    })
    .await;
    assert_eq!(route(&c).await, "b");
    drop(c);

    signal(&child, libc::SIGTERM);
    let code = wait_for_exit(child, &log).await;
    assert_eq!(code, Some(0), "log:\n{}", log.lock().unwrap());
}

async fn wait_for_exit(mut child: Child, log: &Mutex<String>) -> Option<i32> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status.code();
        }
        assert!(
            Instant::now() < deadline,
            "specter still running after SIGTERM; log:\n{}",
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------
// 7. `[listen]` changes

/// Listener addresses are read at start only: a reload that also moves `[listen]`
/// applies everything else, and the old listener keeps serving.
#[tokio::test]
async fn listen_change_applies_the_rest_and_keeps_the_old_listener() {
    const NEW: &str = "spk_development_addedwithlisten000000000000";
    let a = Upstream::start("a").await;
    let fx = Fixture::start(&dev_config(&[&a], &[("svc", KEY)])).await;
    fx.watch();
    let moved = free_addr();
    let text = listen_block(&moved.to_string(), "127.0.0.1:0")
        + &env_block("development", &[&a], &[("svc", KEY), ("added", NEW)]);
    write_and_rename(&fx.path, &text);
    fx.wait_for_version(2).await;

    assert_eq!(fx.admin_config().await["last_reload_error"], Value::Null);
    fx.assert_routed(NEW, "a").await;
    fx.assert_routed(KEY, "a").await;
    assert!(
        tokio::net::TcpStream::connect(moved).await.is_err(),
        "the reload bound the new [listen] address"
    );
    let fresh = client();
    let answer = get(&fresh, &fx.url("/fresh"), &[("x-api-key", NEW)]).await;
    assert_eq!(answer.status, 200, "a new connection to the old listener");
}
