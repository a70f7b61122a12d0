//! Hot reload: a watcher on the config's folder (and the certificate files' folders)
//! plus SIGHUP, debounced, then one path: read -> parse -> validate -> build the whole
//! new snapshot -> one `ArcSwap::store`. Any failure keeps the running snapshot.
//!
//! The folder, not the file, is watched: editors and `promote --apply` write a temp file
//! and rename it over, and Kubernetes flips a `..data` symlink; a watch on the file
//! itself goes silent after the first rename.

use std::collections::{BTreeSet, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::config::{self, Config, ConfigErrors};
use crate::state::{BuildError, ReloadFailure, Shared, State};

/// A burst of file events closer together than this is one reload.
pub const DEBOUNCE: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("{0}")]
    Invalid(#[from] ConfigErrors),
    #[error("building the new config failed: {0}")]
    Build(#[from] BuildError),
}

/// What a successful reload changed, for the log line.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub version: u64,
    pub sha256: String,
    pub environments_added: Vec<String>,
    pub environments_removed: Vec<String>,
    pub environments_changed: Vec<String>,
    pub keys_added: usize,
    pub keys_removed: usize,
}

impl std::fmt::Display for ReloadSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |v: &[String]| {
            if v.is_empty() {
                "-".to_owned()
            } else {
                v.join(",")
            }
        };
        write!(
            f,
            "environments added {} removed {} changed {}; keys +{} -{}",
            list(&self.environments_added),
            list(&self.environments_removed),
            list(&self.environments_changed),
            self.keys_added,
            self.keys_removed
        )
    }
}

/// Reloads from `path` now. One writer at a time: callers serialise through
/// [`watch`]'s single task (or tests call it directly).
pub fn reload_now(shared: &Shared, path: &Path) -> Result<ReloadSummary, ReloadError> {
    let result = config::load(path)
        .map_err(ReloadError::from)
        .and_then(|loaded| {
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            apply(shared, loaded.config)
        });
    match &result {
        Ok(summary) => {
            shared
                .metrics
                .reloads
                .get_or_create(&crate::metrics::ResultLabels { result: "success" })
                .inc();
            *shared.last_reload_error.lock().expect("not poisoned") = None;
            tracing::info!(version = summary.version, sha256 = %summary.sha256, "config reloaded: {summary}");
        }
        Err(e) => {
            shared
                .metrics
                .reloads
                .get_or_create(&crate::metrics::ResultLabels { result: "failure" })
                .inc();
            *shared.last_reload_error.lock().expect("not poisoned") = Some(ReloadFailure {
                error: e.to_string(),
                at: crate::clock::rfc3339(SystemTime::now()),
            });
            tracing::error!(
                "config reload rejected, keeping version {}: {e}",
                shared.state.load().version
            );
        }
    }
    result
}

/// Builds the new snapshot from `config` (taking over limiters and usage) and swaps it in.
pub fn apply(shared: &Shared, config: Config) -> Result<ReloadSummary, ReloadError> {
    let old = shared.state.load_full();
    warn_start_only(&shared.started, &config);
    let summary = summarize(&old, &config, old.version + 1);
    for what in vanished(&old, &config) {
        tracing::warn!("{what}");
    }
    let new = State::build(config, Some(&old), old.version + 1, &shared.metrics)?;
    shared.metrics.config_version.set(new.version as i64);
    shared.state.store(Arc::new(new));
    // Unless a request still holds it, the old snapshot goes here.
    drop(old);
    crate::state::release_freed_memory();
    Ok(summary)
}

/// Settings read once at start: a config that differs from the started one there is
/// applied except for them, and says so on every reload until specter restarts.
fn warn_start_only(started: &Config, new: &Config) {
    let addresses = |l: &crate::config::ListenConfig| (l.http, l.https, l.admin);
    if addresses(&new.listen) != addresses(&started.listen) {
        tracing::warn!("[listen] differs from the one specter started with; listener addresses are read at start only: restart specter to apply them (the rest of the config is applied now)");
    }
    if started.listen.https.is_some() && new.tls.is_none() {
        tracing::warn!("[tls] was removed but the HTTPS listener runs until restart: it refuses every connection until [tls] is back");
    }
    let (a, b) = (&started.limits, &new.limits);
    if (a.max_connections, a.max_header_bytes, a.max_headers)
        != (b.max_connections, b.max_header_bytes, b.max_headers)
    {
        tracing::warn!("limits.max_connections, max_header_bytes or max_headers differ from the values specter started with; they are read at start only: restart specter to apply them (the other limits apply to new connections now)");
    }
}

/// A reload that drops a whole environment or a whole guard table is more often a cut
/// or mistaken file than an intent: it is applied (the file is valid), and said loudly.
fn vanished(old: &State, new: &Config) -> Vec<String> {
    let now: std::collections::HashMap<&str, &crate::config::EnvironmentConfig> = new
        .environments
        .iter()
        .map(|e| (e.name.as_str(), e))
        .collect();
    let (default_policy, unlimited) = (
        crate::config::PolicyConfig::default(),
        crate::config::RateLimitConfig::default(),
    );
    let mut gone = Vec::new();
    for before in &old.environments {
        let name = &before.config.name;
        let Some(after) = now.get(name.as_str()) else {
            gone.push(format!(
                "environment {name} vanished from the config: its keys no longer work"
            ));
            continue;
        };
        if before.config.policy != default_policy && after.policy == default_policy {
            gone.push(format!("environments.{name}.policy vanished: the environment now allows every path, method, client address and body size"));
        }
        if before.config.rate_limit != unlimited && after.rate_limit == unlimited {
            gone.push(format!("environments.{name}.rate_limit vanished: the environment is no longer rate limited"));
        }
    }
    gone
}

/// What changed between the running snapshot and a new config (before it is built:
/// the snapshot holds its keys in the key table, the new config still in its lists).
fn summarize(old: &State, new: &Config, version: u64) -> ReloadSummary {
    let before: BTreeSet<&str> = old
        .environments
        .iter()
        .map(|e| e.config.name.as_str())
        .collect();
    let after: BTreeSet<&str> = new.environments.iter().map(|e| e.name.as_str()).collect();
    let (keys_added, keys_removed) = key_changes(old, new);
    let owned = |names: Vec<&&str>| names.into_iter().map(|n| n.to_string()).collect();
    ReloadSummary {
        version,
        sha256: new.source.sha256.clone(),
        environments_added: owned(after.difference(&before).collect()),
        environments_removed: owned(before.difference(&after).collect()),
        environments_changed: new
            .environments
            .iter()
            .filter(|e| {
                old.environment(&e.name)
                    .is_some_and(|o| !o.config.same_settings(e))
            })
            .map(|e| e.name.clone())
            .collect(),
        keys_added,
        keys_removed,
    }
}

/// What a file event says about the file's content, for deciding when to reload it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// Created or written in place: the writer may be half-way through, and a cut
    /// file can still be valid TOML (a missing `[policy]` table loads as "allow all").
    Writing,
    /// A writer closed the file: complete once nothing else happens for [`DEBOUNCE`].
    Closed,
    /// Renamed into place (editors, `promote --apply`, Kubernetes' `..data` swap) or
    /// removed: the change is whole at once.
    Replaced,
}

fn classify(kind: &EventKind) -> Option<Change> {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Data(_)) => Some(Change::Writing),
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Change::Closed),
        EventKind::Modify(ModifyKind::Name(_)) | EventKind::Remove(_) => Some(Change::Replaced),
        _ => None,
    }
}

/// Keys added and removed, a key being its (environment, id, hash). Both sides are
/// walked in digest order (the old key table is sorted that way, the new keys by
/// [`config::keys_by_digest`]) instead of two hash sets of a million tuples, which cost
/// a million-key reload 3 s and 140 MiB more.
fn key_changes(old: &State, new: &Config) -> (usize, usize) {
    let envs = &new.environments;
    let mut before = old.keys.iter().peekable();
    let (mut added, mut removed) = (0, 0);
    for (digest, e, k) in config::keys_by_digest(envs) {
        while before.next_if(|b| b.digest < digest).is_some() {
            removed += 1;
        }
        let (env, key) = (&envs[e as usize], &envs[e as usize].keys[k as usize]);
        let same = |b: &crate::auth::KeyView<'_>| {
            b.digest == digest
                && b.id == key.id
                && old.environments[b.environment].config.name == env.name
        };
        match before.next_if(|b| b.digest == digest) {
            Some(b) if same(&b) => {}
            Some(_) => (added, removed) = (added + 1, removed + 1),
            None => added += 1,
        }
    }
    (added, removed + before.count())
}

/// Watches the config (and certificate) files and SIGHUP until the runtime ends.
/// Returns once the watcher is in place, so a change made after it returns is seen.
///
/// A file written in place is reloaded only after its writer closed it and it stayed
/// quiet for [`DEBOUNCE`]; a file renamed into place is reloaded after [`DEBOUNCE`]
/// (which merges the burst of events one save makes). SIGHUP reloads at once.
pub fn watch(shared: Arc<Shared>, path: PathBuf) -> notify::Result<tokio::task::JoinHandle<()>> {
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    let names = Arc::new(std::sync::Mutex::new(HashSet::<OsString>::new()));
    let relevant_names = names.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        let Some(change) = classify(&event.kind) else {
            return;
        };
        let names = relevant_names.lock().expect("not poisoned");
        if event.paths.iter().any(|p| {
            p.file_name()
                .is_some_and(|n| names.contains(n) || n == "..data")
        }) {
            let _ = tx.send(change);
        }
    })?;
    let mut watched = Watched {
        watcher,
        folders: BTreeSet::new(),
        names,
        path: path.clone(),
    };
    watched.follow(&shared.state.load().config)?;
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    Ok(tokio::spawn(async move {
        let mut hup = hup.ok();
        // An in-place write whose writer has not closed the file yet.
        let mut writing = false;
        // When the last event's burst counts as over.
        let mut due: Option<tokio::time::Instant> = None;
        loop {
            let settled = async {
                match due {
                    Some(at) if !writing => tokio::time::sleep_until(at).await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                got = rx.recv() => {
                    let Some(change) = got else { return };
                    writing = change == Change::Writing;
                    due = Some(tokio::time::Instant::now() + DEBOUNCE);
                    continue;
                }
                () = settled => {}
                Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                    tracing::info!("SIGHUP: reloading");
                }
            }
            (writing, due) = (false, None);
            let (s, p) = (shared.clone(), path.clone());
            if let Err(e) = tokio::task::spawn_blocking(move || reload_now(&s, &p)).await {
                // A panic while building the snapshot: the running one stays, say so.
                tracing::error!(error = %e, "reload aborted; the running config stays");
                if e.is_panic() {
                    crate::panics::record(&shared.metrics, "reload", &*e.into_panic());
                }
            }
            if let Err(e) = watched.follow(&shared.state.load().config) {
                tracing::warn!(
                    "cannot watch a folder named by the new config (SIGHUP still reloads): {e}"
                );
            }
        }
    }))
}

/// The files a config depends on (itself, certificates, CAs, keys files) and the folders watched
/// to see them change; follows every applied config, so a certificate moved to a new
/// folder by a reload is watched from then on.
struct Watched {
    watcher: notify::RecommendedWatcher,
    folders: BTreeSet<PathBuf>,
    /// File names the watcher callback reacts to.
    names: Arc<std::sync::Mutex<HashSet<OsString>>>,
    path: PathBuf,
}

impl Watched {
    fn follow(&mut self, config: &Config) -> notify::Result<()> {
        *self.names.lock().expect("not poisoned") = names_to_watch(config, &self.path);
        for dir in folders_to_watch(config, &self.path) {
            if !self.folders.contains(&dir) {
                self.watcher.watch(&dir, RecursiveMode::NonRecursive)?;
                self.folders.insert(dir);
            }
        }
        Ok(())
    }
}

fn names_to_watch(config: &Config, path: &Path) -> HashSet<OsString> {
    watched_files(config)
        .chain(std::iter::once(path.to_path_buf()))
        .filter_map(|p| p.file_name().map(|n| n.to_owned()))
        .collect()
}

fn folders_to_watch(config: &Config, path: &Path) -> BTreeSet<PathBuf> {
    watched_files(config)
        .chain(std::iter::once(path.to_path_buf()))
        .map(|p| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect()
}

fn watched_files(config: &Config) -> impl Iterator<Item = PathBuf> + '_ {
    let tls = config.tls.iter().flat_map(|t| {
        t.certificates
            .iter()
            .flat_map(|c| [c.cert_path.clone(), c.key_path.clone()])
            .chain(t.client_ca.clone())
    });
    let per_environment = config
        .environments
        .iter()
        .flat_map(|e| e.upstream_ca.iter().chain(&e.keys_file).cloned());
    tls.chain(per_environment)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(text: &str) -> State {
        let config = crate::config::parse(text, Path::new("specter.toml"))
            .unwrap_or_else(|e| panic!("{e}"))
            .config;
        State::build(config, None, 1, &crate::metrics::Metrics::new()).expect("builds")
    }

    #[test]
    fn key_changes_count_added_and_removed_keys() {
        let key = |id: &str, key: &str| {
            format!(
                "[[environments.qa.keys]]\nid = \"{id}\"\nsha256 = \"{}\"\n",
                crate::digest::hex(&crate::digest::sha256(key.as_bytes()))
            )
        };
        let base = "[listen]\nhttp = \"127.0.0.1:0\"\n[environments.qa]\nupstream = \"http://10.0.0.1:1\"\n";
        let before = format!(
            "{base}{}{}{}",
            key("a", "k1"),
            key("b", "k2"),
            key("c", "k3")
        );
        // k1 stays, k2 moves to a new id (one removed, one added), k3 goes, k4 comes.
        let after = format!(
            "{base}{}{}{}",
            key("a", "k1"),
            key("b2", "k2"),
            key("d", "k4")
        );
        let config = |text: &str| {
            crate::config::parse(text, Path::new("specter.toml"))
                .expect("valid")
                .config
        };
        let old = state(&before);
        assert_eq!(key_changes(&old, &config(&after)), (2, 2));
        assert_eq!(key_changes(&old, &config(&before)), (0, 0));
    }

    #[test]
    fn a_vanished_environment_policy_or_limit_is_named() {
        let listen = "[listen]\nhttp = \"127.0.0.1:0\"\n";
        let env = |name: &str, port: u16| {
            format!("[environments.{name}]\nupstream = \"http://10.0.0.1:{port}\"\n")
        };
        let guarded = format!(
            "{listen}{}[environments.qa.policy]\ndeny_paths = [\"/x\"]\n[environments.qa.rate_limit]\ntotal = {{ requests = 5, per = \"1s\" }}\n{}",
            env("qa", 1),
            env("production", 2)
        );
        let old = state(&guarded);
        assert!(vanished(&old, &old.config).is_empty());
        let cut = state(&format!("{listen}{}", env("qa", 1)));
        let gone = vanished(&old, &cut.config);
        assert_eq!(gone.len(), 3, "{gone:?}");
        assert!(
            gone[0].starts_with("environment production vanished"),
            "{gone:?}"
        );
        assert!(
            gone[1].starts_with("environments.qa.policy vanished"),
            "{gone:?}"
        );
        assert!(
            gone[2].starts_with("environments.qa.rate_limit vanished"),
            "{gone:?}"
        );
    }
}
