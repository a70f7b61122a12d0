//! `specter keys add | revoke | rotate | list` as an operator runs them: the real binary
//! editing a real file in a temp folder, and a real `specter run` watching that file.
//! The edits must take effect through the hot reload without failing other traffic,
//! keep every other byte of the file, validate before writing, refuse to overwrite a
//! concurrent edit, and let the plaintext key out on stdout only.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use similar::{ChangeTag, TextDiff};
use specter::commands::edit::EditError;
use specter::commands::keys::{self, AddRequest, EditOptions, KeysError};
use specter::config::{hex, sha256};
use tempfile::TempDir;

use common::*;

/// Longest wait for a change to reach a running gateway (the reload is debounced
/// ~200 ms; the rest is margin for a busy machine).
const RELOAD_LIMIT: Duration = Duration::from_secs(10);

const STEADY: &str = "spk_qa_steadysteadysteadysteadysteady01";
const DOOMED: &str = "spk_qa_doomeddoomeddoomeddoomeddoomed01";
const OLD: &str = "spk_qa_oldoldoldoldoldoldoldoldoldold0001";
const PROD: &str = "spk_production_billingbillingbillingbill01";

/// A config with comments and alignment everywhere the commands must not touch.
fn config_text(listen: &str, qa: &str, production: &str) -> String {
    format!(
        r#"# keys_edit fixture: every comment here must survive every edit.
{listen}
[environments.qa]              # qa: the one the tests edit
upstream = "{qa}"   # echo upstream

# the service that keeps sending; never touched
[[environments.qa.keys]]
id     = "steady"   # steady's own comment
sha256 = "{}"

[[environments.qa.keys]]
id        = "doomed"
sha256    = "{}"
not_after = 2099-01-01T00:00:00Z   # yearly review

# the key a rotation replaces
[[environments.qa.keys]]
id     = "old"
sha256 = "{}"

[environments.production]
upstream = "{production}"   # production backend

[[environments.production.keys]]
id     = "billing"
sha256 = "{}"
# trailing comment at the end of the file
"#,
        hash(STEADY),
        hash(DOOMED),
        hash(OLD),
        hash(PROD),
    )
}

fn hash(key: &str) -> String {
    hex(&sha256(key.as_bytes()))
}

/// The fixture in a temp folder, its listeners never started.
fn offline_fixture() -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("specter.toml");
    let listen = "[listen]\nhttp = \"127.0.0.1:1\"\nadmin = \"127.0.0.1:2\"\n";
    let text = config_text(listen, "http://127.0.0.1:9001", "http://127.0.0.1:9002");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// `specter keys ARGS --config FILE`, stdin fed when given.
fn keys(file: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    let mut all = vec!["keys"];
    all.extend_from_slice(args);
    all.extend(["--config", file.to_str().unwrap()]);
    run_specter(&all, stdin)
}

/// The same, from async tests (the binary runs to its end on a blocking thread while
/// the test's request loops go on).
async fn keys_async(file: &Path, args: &[&str]) -> Run {
    let file = file.to_path_buf();
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        keys(&file, &args, None)
    })
    .await
    .unwrap()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

/// Lines `old` lost and lines `new` gained, in order. A block added or removed
/// between blank lines shows one blank line changed, on whichever side the diff picks.
fn changed_lines(old: &str, new: &str) -> (Vec<String>, Vec<String>) {
    let (mut gone, mut added) = (Vec::new(), Vec::new());
    for change in TextDiff::from_lines(old, new).iter_all_changes() {
        let line = change.value().trim_end_matches('\n').to_owned();
        match change.tag() {
            ChangeTag::Delete => gone.push(line),
            ChangeTag::Insert => added.push(line),
            ChangeTag::Equal => {}
        }
    }
    (gone, added)
}

/// The key alone on stdout, one line.
fn printed_key(run: &Run, env: &str) -> String {
    assert_eq!(run.code, 0, "{run:?}");
    let key = run.stdout.trim_end_matches('\n');
    assert!(!key.contains('\n'), "stdout holds only the key: {run:?}");
    assert!(key.starts_with(&format!("spk_{env}_")), "{run:?}");
    key.to_owned()
}

async fn status(c: &TestClient, url: &str, key: &str) -> u16 {
    get(c, url, &[("x-api-key", key)]).await.status.as_u16()
}

/// Starts upstreams and `specter run` on the fixture.
async fn serving() -> (TempDir, PathBuf, SpecterProcess) {
    let (qa, production) = (Upstream::start("qa").await, Upstream::start("prod").await);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("specter.toml");
    let gateway = SpecterProcess::start(&path, |http, admin| {
        let listen = format!("[listen]\nhttp  = \"{http}\"   # the gateway\nadmin = \"{admin}\"\n");
        config_text(&listen, &qa.url(), &production.url())
    })
    .await;
    (dir, path, gateway)
}

/// Sends with `key` until `stop`, at most 20 s or 20,000 requests; returns the number
/// sent and every answer that was not a 200 from the qa upstream.
async fn keep_sending(
    url: String,
    key: &'static str,
    stop: Arc<AtomicBool>,
) -> (usize, Vec<String>) {
    let c = client();
    let (mut sent, mut failures) = (0, Vec::new());
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed)
        && sent < 20_000
        && started.elapsed() < Duration::from_secs(20)
    {
        let answer = get(&c, &url, &[("x-api-key", key)]).await;
        sent += 1;
        if answer.status != 200 || answer.text() != "qa" {
            failures.push(format!("{}: {}", answer.status, answer.text()));
        }
    }
    (sent, failures)
}

// ---------------------------------------------------------------------------------
// Through a running gateway

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_key_is_served_after_the_reload_and_no_other_request_fails() {
    let (_dir, path, gateway) = serving().await;
    let c = client();
    let url = gateway.url("/added");
    let stop = Arc::new(AtomicBool::new(false));
    let steady = tokio::spawn(keep_sending(url.clone(), STEADY, stop.clone()));

    let run = keys_async(&path, &["add", "--env", "qa"]).await;
    let written = Instant::now();
    let key = printed_key(&run, "qa");
    assert!(run.stderr.contains("added key \"qa-1\" to qa"), "{run:?}");
    let served = poll_until(RELOAD_LIMIT, || {
        let (c, url, key) = (&c, &url, &key);
        async move { status(c, url, key).await == 200 }
    })
    .await;
    let took = written.elapsed();
    assert!(
        served,
        "the added key was not accepted within {RELOAD_LIMIT:?}"
    );
    eprintln!("added key served {took:?} after `keys add` returned");

    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = steady.await.unwrap();
    assert!(sent > 0);
    assert!(
        failures.is_empty(),
        "{} of {sent} failed: {failures:?}",
        failures.len()
    );

    // The plaintext key went to stdout and nowhere else.
    let config = get(&c, &gateway.admin_url("/config"), &[]).await.text();
    let usage = get(&c, &gateway.admin_url("/keys"), &[]).await.text();
    assert!(
        config.contains("qa-1") && usage.contains("qa-1"),
        "{config}\n{usage}"
    );
    let places = [
        ("the config file", read(&path)),
        ("the command's stderr", run.stderr.clone()),
        ("the gateway's log", gateway.log_text()),
        ("/config", config),
        ("/keys", usage),
    ];
    for (place, text) in places {
        assert!(!text.contains(&key), "the key is in {place}");
        assert!(!text.contains(&key[8..]), "part of the key is in {place}");
    }
    assert!(read(&path).contains(&hash(&key)), "the file holds the hash");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_and_a_rotated_one_works_until_the_overlap_ends() {
    let (_dir, path, gateway) = serving().await;
    let c = client();
    let url = gateway.url("/r");
    for key in [DOOMED, OLD] {
        assert_eq!(status(&c, &url, key).await, 200);
    }

    let run = keys_async(&path, &["revoke", "--env", "qa", "--id", "doomed"]).await;
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let refused = poll_until(RELOAD_LIMIT, || async {
        status(&c, &url, DOOMED).await == 401
    })
    .await;
    assert!(refused, "the revoked key still works");
    get(&c, &url, &[("x-api-key", DOOMED)])
        .await
        .assert_error(401, "expired_api_key");

    let run = keys_async(
        &path,
        &["rotate", "--env", "qa", "--id", "old", "--overlap", "4s"],
    )
    .await;
    let new = printed_key(&run, "qa");
    let until = not_after_of(&read(&path), "old");
    let served = poll_until(RELOAD_LIMIT, || async {
        status(&c, &url, &new).await == 200
    })
    .await;
    assert!(served, "the rotated-in key was not accepted");
    assert!(
        SystemTime::now() < until,
        "the reload took longer than the overlap"
    );
    assert_eq!(
        status(&c, &url, OLD).await,
        200,
        "both work during the overlap"
    );
    let ended = poll_until(RELOAD_LIMIT, || async {
        status(&c, &url, OLD).await == 401
    })
    .await;
    assert!(ended, "the old key outlived its overlap");
    assert!(
        SystemTime::now() >= until,
        "the old key stopped before its overlap ended"
    );
    get(&c, &url, &[("x-api-key", OLD)])
        .await
        .assert_error(401, "expired_api_key");
    assert_eq!(
        status(&c, &url, &new).await,
        200,
        "the new key goes on working"
    );

    // `keys list` finds the admin listener in the config and adds usage.
    let list = keys_async(&path, &["list", "--env", "qa"]).await;
    assert_eq!(list.code, 0, "{list:?}");
    let row = |id: &str| {
        list.stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no row for {id}: {list:?}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(list.stdout.starts_with("ENVIRONMENT"), "{list:?}");
    assert!(
        list.stdout.contains("REQUESTS") && list.stdout.contains("LAST SEEN"),
        "{list:?}"
    );
    assert_eq!(row("doomed")[2], "revoked");
    assert_eq!(
        row("old")[2],
        "expired",
        "a rotation's end is an expiry, not a revocation"
    );
    assert_eq!(row("old.2")[2], "active");
    assert_eq!(row("steady")[2], "active");
    let old_requests: u64 = row("old")[5].parse().unwrap();
    assert!(old_requests >= 2, "{list:?}");
    assert!(row("old")[6].ends_with('Z'), "last seen is shown: {list:?}");
    assert!(!list.stdout.contains(&new) && !gateway.log_text().contains(&new));
}

/// `not_after` of key `id` as the file says.
fn not_after_of(text: &str, id: &str) -> SystemTime {
    let doc: toml::Table = toml::from_str(text).unwrap();
    let keys = doc["environments"]["qa"]["keys"].as_array().unwrap();
    let key = keys.iter().find(|k| k["id"].as_str() == Some(id)).unwrap();
    let stamp = key["not_after"].as_datetime().unwrap().to_string();
    humantime::parse_rfc3339(&stamp).unwrap()
}

// ---------------------------------------------------------------------------------
// The file

/// Each command changes exactly its own lines; every other byte, comments and
/// alignment included, is kept.
#[test]
fn every_edit_changes_only_its_own_lines() {
    let (_dir, path) = offline_fixture();
    let step = |args: &[&str]| {
        let before = read(&path);
        let run = keys(&path, args, None);
        assert_eq!(run.code, 0, "{run:?}");
        let after = read(&path);
        let check = run_specter(&["check", "--config", path.to_str().unwrap()], None);
        assert_eq!(
            check.code, 0,
            "every result passes check: {check:?}\n{after}"
        );
        (run, changed_lines(&before, &after))
    };

    let (run, (gone, added)) = step(&["add", "--env", "qa", "--id", "ci", "--ttl", "90d"]);
    let key = printed_key(&run, "qa");
    assert!(gone.is_empty(), "{gone:?}");
    assert_eq!(added.len(), 6, "{added:?}");
    assert_eq!(
        added.iter().filter(|l| l.is_empty()).count(),
        1,
        "{added:?}"
    );
    let added: Vec<&String> = added.iter().filter(|l| !l.is_empty()).collect();
    assert!(added[0].starts_with("# added ") && added[0].ends_with(" by specter keys add"));
    assert_eq!(added[1], "[[environments.qa.keys]]");
    assert_eq!(added[2], "id     = \"ci\"");
    assert_eq!(added[3], &format!("sha256 = \"{}\"", hash(&key)));
    assert!(added[4].starts_with("not_after = "), "{added:?}");
    let in_file = read(&path);
    let ci_at = in_file.find("id     = \"ci\"").unwrap();
    assert!(
        in_file.find("id     = \"old\"").unwrap() < ci_at
            && ci_at < in_file.find("[environments.production]").unwrap(),
        "added after qa's last key, before production:\n{in_file}"
    );

    let (_, (gone, added)) = step(&["revoke", "--env", "qa", "--id", "doomed"]);
    assert_eq!(gone, ["not_after = 2099-01-01T00:00:00Z   # yearly review"]);
    assert_eq!(added.len(), 2, "{added:?}");
    assert!(
        added[0].starts_with("# revoked ")
            && added[0].ends_with(" by specter keys revoke; not_after was 2099-01-01T00:00:00Z"),
        "{added:?}"
    );
    assert!(
        added[1].starts_with("not_after = ") && added[1].ends_with("Z   # yearly review"),
        "the value's own comment stays: {added:?}"
    );

    let (run, (gone, added)) = step(&["rotate", "--env", "qa", "--id", "old"]);
    let new = printed_key(&run, "qa");
    assert!(gone.is_empty(), "{gone:?}");
    assert_eq!(added.len(), 7, "{added:?}");
    assert_eq!(
        added.iter().filter(|l| l.is_empty()).count(),
        1,
        "{added:?}"
    );
    let added: Vec<&String> = added.iter().filter(|l| !l.is_empty()).collect();
    assert!(added[0].starts_with("# rotated to \"old.2\" "), "{added:?}");
    assert!(added[1].starts_with("not_after = "), "{added:?}");
    assert!(added[2].starts_with("# rotated from \"old\" "), "{added:?}");
    assert_eq!(added[3], "[[environments.qa.keys]]");
    assert_eq!(added[4], "id     = \"old.2\"");
    assert_eq!(added[5], &format!("sha256 = \"{}\"", hash(&new)));
    let text = read(&path);
    let (old_at, new_at) = (
        text.find("id     = \"old\"").unwrap(),
        text.find("\"old.2\"").unwrap(),
    );
    assert!(
        old_at < new_at && new_at < text.find("id     = \"ci\"").unwrap(),
        "the pair stays together:\n{text}"
    );
    let overlap = not_after_of(&text, "old")
        .duration_since(SystemTime::now())
        .unwrap();
    assert!(
        overlap > Duration::from_secs(6 * 86_400) && overlap <= Duration::from_secs(7 * 86_400)
    );

    let (_, (gone, added)) = step(&["revoke", "--env", "qa", "--id", "ci", "--remove"]);
    assert!(added.is_empty(), "{added:?}");
    assert_eq!(gone.len(), 6, "the block and its comment go: {gone:?}");
    assert!(gone.iter().any(|l| l == "id     = \"ci\""));

    let text = read(&path);
    for kept in [
        "# keys_edit fixture: every comment here must survive every edit.",
        "[environments.qa]              # qa: the one the tests edit",
        "id     = \"steady\"   # steady's own comment",
        "# the key a rotation replaces",
        "upstream = \"http://127.0.0.1:9002\"   # production backend",
    ] {
        assert!(text.contains(kept), "{kept:?} is gone:\n{text}");
    }
    assert!(
        text.ends_with("# trailing comment at the end of the file\n"),
        "{text}"
    );
}

#[test]
fn dry_runs_print_the_diff_and_write_nothing() {
    let (dir, path) = offline_fixture();
    let before = read(&path);
    for args in [
        &["add", "--env", "qa", "--dry-run"][..],
        &["revoke", "--env", "qa", "--id", "doomed", "--dry-run"],
        &[
            "revoke",
            "--env",
            "qa",
            "--id",
            "doomed",
            "--remove",
            "--dry-run",
        ],
        &["rotate", "--env", "qa", "--id", "old", "--dry-run"],
    ] {
        let run = keys(&path, args, None);
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert_eq!(read(&path), before, "{args:?} wrote the file");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
        assert!(run.stdout.starts_with("--- "), "a unified diff: {run:?}");
        assert!(run.stdout.contains("\n@@ "), "{run:?}");
        assert!(run.stderr.contains("dry run: nothing written"), "{run:?}");
        assert!(
            !run.stdout.contains("spk_"),
            "no key is printed by a dry run: {run:?}"
        );
        let full_hash = run
            .stdout
            .split(|c: char| !c.is_ascii_hexdigit())
            .any(|w| w.len() == 64);
        assert!(!full_hash, "hashes are shortened in the diff: {run:?}");
    }
    let add = keys(&path, &["add", "--env", "qa", "--dry-run"], None);
    assert!(
        add.stdout.contains("+[[environments.qa.keys]]")
            && add.stdout.contains("+id     = \"qa-1\""),
        "{add:?}"
    );
    let revoke = keys(
        &path,
        &["revoke", "--env", "qa", "--id", "doomed", "--dry-run"],
        None,
    );
    assert!(
        revoke
            .stdout
            .contains("-not_after = 2099-01-01T00:00:00Z   # yearly review"),
        "{revoke:?}"
    );
}

/// The file is re-read just before the rename; someone else's save in between is kept,
/// and the key is not printed, since it was never stored.
#[test]
fn a_concurrent_edit_is_detected_and_no_key_is_printed() {
    let (dir, path) = offline_fixture();
    let opts = EditOptions {
        config: &path,
        dry_run: false,
        colour: false,
        now: SystemTime::now(),
    };
    let request = AddRequest {
        env: "qa",
        ..AddRequest::default()
    };
    let plan = keys::plan_add(&opts, &request).unwrap();
    let edited = read(&path).replace("# echo upstream", "# edited meanwhile");
    std::fs::write(&path, &edited).unwrap();

    let (mut out, mut err) = (Vec::new(), Vec::new());
    let refused = plan.finish(&opts, &mut out, &mut err).unwrap_err();
    assert!(
        matches!(&refused, KeysError::Edit(e) if matches!(**e, EditError::Changed { .. })),
        "{refused:?}"
    );
    assert!(refused
        .to_string()
        .contains("changed since it was read; run again"));
    assert!(
        out.is_empty(),
        "no key printed: {}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(read(&path), edited, "the other edit is kept");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temp file left"
    );

    // Run again, it goes through.
    let run = keys(&path, &["add", "--env", "qa"], None);
    printed_key(&run, "qa");
    assert!(read(&path).contains("# edited meanwhile"));
}

#[test]
fn edits_that_would_not_pass_check_are_refused_and_write_nothing() {
    let (_dir, path) = offline_fixture();
    let before = read(&path);
    let refused = |args: &[&str], stdin: Option<&str>, says: &str| {
        let run = keys(&path, args, stdin);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
        assert!(
            run.stderr.contains(says),
            "{args:?} should say {says:?}: {run:?}"
        );
        assert!(run.stdout.is_empty(), "{run:?}");
        assert_eq!(read(&path), before, "{args:?} wrote the file");
    };
    refused(
        &["add", "--env", "qa", "--id", "steady"],
        None,
        "key id \"steady\" is already used in qa",
    );
    refused(
        &["add", "--env", "staging"],
        None,
        "unknown environment \"staging\"",
    );
    refused(&["add", "--env", "qa", "--id", "_x"], None, "is not valid");
    // A key already stored for production cannot join qa, under either name.
    refused(
        &["add", "--env", "qa", "--from-stdin"],
        Some(PROD),
        "is an spk_production_... key, for environment production, not qa",
    );
    refused(
        &[
            "add",
            "--env",
            "production",
            "--id",
            "again",
            "--from-stdin",
        ],
        Some(PROD),
        "is the same key hash as key \"billing\"",
    );
    refused(
        &[
            "add",
            "--env",
            "qa",
            "--not-before",
            "2030-01-01",
            "--not-after",
            "2029-01-01",
        ],
        None,
        "not earlier than not_after",
    );
    refused(
        &["revoke", "--env", "qa", "--id", "nobody"],
        None,
        "no key \"nobody\" in environment qa; it has: steady, doomed, old",
    );
    refused(
        &["rotate", "--env", "qa", "--id", "nobody"],
        None,
        "no key \"nobody\"",
    );
    refused(
        &["revoke", "--env", "qa", "--id", "old", "--at", "tomorrow"],
        None,
        "is not a time",
    );

    // A legacy key taken from stdin is stored, and not echoed back.
    let run = keys(
        &path,
        &["add", "--env", "qa", "--from-stdin"],
        Some("legacy-key-0123456789\n"),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert!(!run.stderr.contains("legacy-key"), "{run:?}");
    assert!(read(&path).contains(&hash("legacy-key-0123456789")));
}

#[test]
fn list_shows_each_state_and_hashes_only_when_asked() {
    let (_dir, path) = offline_fixture();
    let ok = |args: &[&str]| {
        let run = keys(&path, args, None);
        assert_eq!(run.code, 0, "{run:?}");
        run
    };
    ok(&[
        "add",
        "--env",
        "qa",
        "--id",
        "later",
        "--not-before",
        "+30d",
    ]);
    ok(&["add", "--env", "qa", "--id", "soon", "--ttl", "3d"]);
    ok(&[
        "add",
        "--env",
        "qa",
        "--id",
        "past",
        "--not-before",
        "2020-01-01",
        "--not-after",
        "2020-06-01T00:00:00+02:00",
    ]);
    ok(&["revoke", "--env", "qa", "--id", "doomed"]);
    let again = ok(&["revoke", "--env", "qa", "--id", "doomed"]);
    assert!(again.stderr.contains("already was revoked at"), "{again:?}");
    let before = read(&path);
    let later = ok(&["revoke", "--env", "qa", "--id", "soon", "--at", "+30d"]);
    assert!(
        later.stderr.contains("already ends earlier, at"),
        "never extended: {later:?}"
    );
    assert_eq!(read(&path), before);
    let planned = ok(&["revoke", "--env", "qa", "--id", "old", "--at", "+2d"]);
    assert!(
        planned.stderr.contains("it stops working at 20"),
        "{planned:?}"
    );

    let list = ok(&["list"]);
    assert!(
        list.stderr.contains("no usage columns"),
        "the config's admin does not answer: {list:?}"
    );
    let state = |id: &str| {
        let line = list
            .stdout
            .lines()
            .find(|l| l.split_whitespace().nth(1) == Some(id));
        line.unwrap_or_else(|| panic!("no {id}: {list:?}"))
            .split_whitespace()
            .nth(2)
            .unwrap()
            .to_owned()
    };
    assert_eq!(state("steady"), "active");
    assert_eq!(state("later"), "staged");
    assert_eq!(state("soon"), "expiring");
    assert_eq!(state("past"), "expired");
    assert_eq!(state("doomed"), "revoked");
    assert_eq!(state("old"), "expiring", "revoked for later, still working");
    assert_eq!(state("billing"), "active");
    assert!(
        list.stdout.contains("2020-05-31T22:00:00Z"),
        "times in UTC: {list:?}"
    );
    assert!(!list.stdout.contains(&hash(STEADY)), "{list:?}");

    let wide = ok(&[
        "list",
        "--expiry-warning",
        "1d",
        "--env",
        "qa",
        "--show-hashes",
    ]);
    assert!(wide.stdout.contains(&hash(STEADY)), "{wide:?}");
    assert!(!wide.stdout.contains("billing"), "--env filters: {wide:?}");
    assert!(
        wide.stdout
            .lines()
            .any(|l| l.contains(" soon ") && l.contains(" active ")),
        "{wide:?}"
    );
}

/// Keys written as an inline array get inline entries; an environment without keys
/// gets its first `[[...keys]]` table after its own tables, not after another's.
#[test]
fn other_layouts_are_edited_in_their_own_style() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("specter.toml");
    let text = format!(
        r#"[listen]
http = "127.0.0.1:1"

[environments.qa]
upstream = "http://127.0.0.1:9001"
keys = [
  {{ id = "a", sha256 = "{}" }},   # a's comment
]

[environments.development]
upstream = "http://127.0.0.1:9003"

[environments.development.policy]
methods = ["GET"]   # dev reads

[environments.production]
upstream = "http://127.0.0.1:9002"
"#,
        hash(STEADY)
    );
    std::fs::write(&path, &text).unwrap();

    let key = printed_key(&keys(&path, &["add", "--env", "qa"], None), "qa");
    let run = keys(&path, &["revoke", "--env", "qa", "--id", "a"], None);
    assert_eq!(run.code, 0, "{run:?}");
    let dev = printed_key(
        &keys(&path, &["add", "--env", "development"], None),
        "development",
    );

    let after = read(&path);
    let check = run_specter(&["check", "--config", path.to_str().unwrap()], None);
    assert_eq!(check.code, 0, "{check:?}\n{after}");
    let (gone, added) = changed_lines(&text, &after);
    assert_eq!(gone.len(), 1, "{gone:?}");
    assert!(gone[0].contains("id = \"a\""), "{gone:?}");
    let a = added.iter().find(|l| l.contains("id = \"a\"")).unwrap();
    assert!(
        a.contains("not_after = ") && a.ends_with("},   # a's comment"),
        "{added:?}"
    );
    let qa1 = format!("  {{ id = \"qa-1\", sha256 = \"{}\" }},", hash(&key));
    assert!(added.contains(&qa1), "{added:?}");
    let dev_at = after.find("[[environments.development.keys]]").unwrap();
    assert!(
        after.find("methods = [\"GET\"]").unwrap() < dev_at
            && dev_at < after.find("[environments.production]").unwrap(),
        "{after}"
    );
    assert!(after.contains(&hash(&dev)));

    let list = keys(&path, &["list", "--env", "qa"], None);
    assert!(
        list.stdout
            .lines()
            .any(|l| l.contains(" a ") && l.contains("expired")),
        "inline keys carry no comment, so a revoked one lists as expired: {list:?}"
    );
}

/// A file `toml_edit` would not write back byte for byte (dotted keys of one table
/// split by another key) is refused by the editing commands, and still listed.
#[test]
fn a_layout_that_cannot_be_kept_is_listed_but_not_edited() {
    let (_dir, path) = offline_fixture();
    let split = read(&path).replace(
        "upstream = \"http://127.0.0.1:9001\"   # echo upstream\n",
        "policy.methods = [\"GET\"]\nupstream = \"http://127.0.0.1:9001\"\npolicy.max_body = \"1MiB\"\n",
    );
    std::fs::write(&path, &split).unwrap();
    let check = run_specter(&["check", "--config", path.to_str().unwrap()], None);
    assert_eq!(check.code, 0, "{check:?}");

    let run = keys(&path, &["add", "--env", "qa"], None);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("layout could not be kept"), "{run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    assert_eq!(read(&path), split);

    let list = keys(&path, &["list", "--env", "qa"], None);
    assert_eq!(list.code, 0, "{list:?}");
    assert!(list.stdout.contains("steady"), "{list:?}");
}
