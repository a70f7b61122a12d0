//! `specter check` and `specter keys` as a user runs them: the real binary, real files.
//!
//! Every rejected config must point at the offending value (`file:line:col:`), name
//! its key path, show the bad value and say what would be valid. Expected positions
//! are computed from the fixture text, never written down by hand.

mod common;

use common::{run_specter as specter, Run};

use std::path::PathBuf;

use specter::config::{hex, sha256};
use tempfile::TempDir;

const LISTEN: &str = "[listen]\nhttp = \"127.0.0.1:0\"\n\n";

// --- harness ---------------------------------------------------------------------------

/// A config file in its own temporary directory.
struct Fixture {
    _dir: TempDir,
    path: PathBuf,
    text: String,
}

impl Fixture {
    /// `[listen]` followed by `body`.
    fn new(body: &str) -> Fixture {
        Fixture::raw(&format!("{LISTEN}{body}"))
    }

    /// Exactly `text`.
    fn raw(text: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("specter.toml");
        std::fs::write(&path, text).expect("the fixture is written");
        Fixture {
            _dir: dir,
            path,
            text: text.to_owned(),
        }
    }

    fn path_str(&self) -> &str {
        self.path.to_str().expect("temporary paths are UTF-8")
    }

    fn check(&self, extra: &[&str]) -> Run {
        let mut args = vec!["check", "--config", self.path_str()];
        args.extend_from_slice(extra);
        specter(&args, None)
    }

    /// The fixture with line numbers, for failure messages.
    fn numbered(&self) -> String {
        self.text
            .lines()
            .enumerate()
            .map(|(i, l)| format!("{:>3} | {l}\n", i + 1))
            .collect()
    }

    /// `file:line:col:` as `specter check` prints it.
    fn location(&self, (line, col): (usize, usize)) -> String {
        format!("{}:{line}:{col}:", self.path.display())
    }

    /// 1-based line and column (in characters) of `value` on the only line containing
    /// `line_needle`.
    fn locate(&self, line_needle: &str, value: &str) -> (usize, usize) {
        let count = self
            .text
            .lines()
            .filter(|l| l.contains(line_needle))
            .count();
        assert_eq!(
            count,
            1,
            "fixture must have exactly one line containing {line_needle:?}:\n{}",
            self.numbered()
        );
        self.locate_nth(line_needle, value, 0)
    }

    /// Like [`Fixture::locate`], on the `nth` (0-based) line containing `line_needle`.
    fn locate_nth(&self, line_needle: &str, value: &str, nth: usize) -> (usize, usize) {
        let (index, line) = self
            .text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(line_needle))
            .nth(nth)
            .unwrap_or_else(|| {
                panic!(
                    "fixture has no line #{nth} containing {line_needle:?}:\n{}",
                    self.numbered()
                )
            });
        let byte = line
            .find(value)
            .unwrap_or_else(|| panic!("{value:?} is not on line {}: {line:?}", index + 1));
        (index + 1, line[..byte].chars().count() + 1)
    }

    /// stderr cut into one record per reported problem (each starts with the path).
    fn records(&self, stderr: &str) -> Vec<String> {
        let prefix = format!("{}:", self.path.display());
        stderr
            .split(&prefix)
            .skip(1)
            .map(|rest| format!("{prefix}{rest}"))
            .collect()
    }
}

/// One acceptable way for `specter check` to report a problem.
struct Expect<'a> {
    /// Line and column of the offending value.
    at: (usize, usize),
    /// The key path the message must name.
    path: &'a str,
    /// The bad value the message must show.
    value: &'a str,
    /// A piece of the fix hint.
    hint: &'a str,
}

/// Asserts exit 1 and one error record that starts at an expected position and names
/// that expectation's key path, value and hint. Returns the record.
fn assert_rejected(f: &Fixture, run: &Run, candidates: &[Expect]) -> String {
    rejected(f, run, candidates, true)
}

/// Like [`assert_rejected`] but accepts the record at any position in the file.
fn assert_rejected_anywhere(f: &Fixture, run: &Run, candidates: &[Expect]) -> String {
    rejected(f, run, candidates, false)
}

/// `specter check` rejects `value`, found on the line holding `line_needle`, naming
/// `path` and a fix containing `hint`. Returns the record.
fn assert_value_rejected(
    f: &Fixture,
    line_needle: &str,
    value: &str,
    path: &str,
    hint: &str,
) -> String {
    let run = f.check(&[]);
    let at = f.locate(line_needle, value);
    assert_rejected(
        f,
        &run,
        &[Expect {
            at,
            path,
            value,
            hint,
        }],
    )
}

fn rejected(f: &Fixture, run: &Run, candidates: &[Expect], located: bool) -> String {
    let describe = |run: &Run| {
        let wanted: Vec<String> = candidates
            .iter()
            .map(|c| {
                format!(
                    "  {} ... {} ... {:?} ... {:?}",
                    f.location(c.at),
                    c.path,
                    c.value,
                    c.hint
                )
            })
            .collect();
        format!(
            "\nwanted one of:\n{}\n{run:?}\n--- fixture ---\n{}",
            wanted.join("\n"),
            f.numbered()
        )
    };
    assert_eq!(
        run.code,
        1,
        "check must fail with exit code 1{}",
        describe(run)
    );
    let records = f.records(&run.stderr);
    for c in candidates {
        let location = f.location(c.at);
        if let Some(r) = records.iter().find(|r| {
            (!located || r.starts_with(&location))
                && r.contains(c.path)
                && r.contains(c.value)
                && r.contains(c.hint)
        }) {
            return r.clone();
        }
    }
    let place = if located {
        "at the offending value"
    } else {
        "anywhere"
    };
    panic!(
        "no error {place} naming key path, value and fix{}",
        describe(run)
    );
}

/// `now + offset` as a TOML offset date-time, e.g. 2026-12-01T00:00:00Z.
fn toml_datetime(offset: time::Duration) -> String {
    let t = time::OffsetDateTime::now_utc() + offset;
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn digest(key: &str) -> String {
    hex(&sha256(key.as_bytes()))
}

/// The stderr lines that are warnings mentioning `needle`.
fn warnings_about<'a>(stderr: &'a str, needle: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .filter(|l| l.contains("warning") && l.contains(needle))
        .collect()
}

/// `specter keys new --env ENV --id ID`: (the key, the printed TOML block).
fn new_key(env: &str, id: &str) -> (String, String) {
    let run = specter(&["keys", "new", "--env", env, "--id", id], None);
    assert_eq!(run.code, 0, "{run:?}");
    let key = run.stdout.lines().next().unwrap_or_default().to_owned();
    let start = run
        .stdout
        .find(&format!("[[environments.{env}.keys]]"))
        .unwrap_or_else(|| panic!("no TOML block printed:\n{run:?}"));
    (key, run.stdout[start..].to_owned())
}

/// The `sha256 = "..."` value of a printed key block.
fn block_sha256(block: &str) -> String {
    let line = block
        .lines()
        .find(|l| l.trim_start().starts_with("sha256"))
        .unwrap_or_else(|| panic!("no sha256 line in block:\n{block}"));
    line.split('"').nth(1).unwrap_or_default().to_owned()
}

fn is_key_for(key: &str, env: &str) -> bool {
    key.strip_prefix(&format!("spk_{env}_"))
        .is_some_and(|random| {
            random.len() >= 27 && random.bytes().all(|b| b.is_ascii_alphanumeric())
        })
}

// --- 1. each kind of mistake -----------------------------------------------------------

#[test]
fn unknown_key_is_pointed_at_and_the_valid_spelling_offered() {
    let cases = [
        (
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nconect_timeout = \"2s\"\n",
            "conect_timeout",
            "environments.qa",
            "connect_timeout",
        ),
        (
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\n[environments.qa.policy]\nallow_path = [\"/v1/\"]\n",
            "allow_path",
            "environments.qa.policy",
            "allow_paths",
        ),
    ];
    for (body, typo, table, valid) in cases {
        let f = Fixture::new(body);
        let record = assert_value_rejected(&f, typo, typo, table, "spelling");
        assert!(
            record.contains(&format!("`{valid}`")),
            "the valid key {valid:?} is offered:\n{record}"
        );
    }
}

#[test]
fn bad_durations_are_rejected() {
    for bad in ["1 sec x", "abc"] {
        let f = Fixture::new(&format!(
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nconnect_timeout = \"{bad}\"\n"
        ));
        assert_value_rejected(
            &f,
            "connect_timeout",
            &format!("\"{bad}\""),
            "environments.qa.connect_timeout",
            "write e.g.",
        );
    }
}

/// One run reports every bad value, not only the first of a section.
///
/// Failing when written: `[limits]`, `[tls]`, `[rate_limit_store]` stopped at their first
/// bad value, so a second one surfaced only after the first was fixed.
#[test]
fn every_bad_value_of_a_section_is_reported_in_one_run() {
    let f = Fixture::new(
        "[limits]\nidle_timeout = \"5 parsecs\"\nmax_header_bytes = \"lots\"\nmax_headers = 0\n\n\
         [rate_limit_store]\nredis = \"http://cache:6379\"\non_error = \"panic\"\n\n\
         [environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n",
    );
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let records = f.records(&run.stderr);
    for path in [
        "limits.idle_timeout",
        "limits.max_header_bytes",
        "limits.max_headers",
        "rate_limit_store.redis",
        "rate_limit_store.on_error",
    ] {
        assert!(
            records.iter().any(|r| r.contains(&format!(": {path}:"))),
            "{path} is not reported:\n{}",
            run.stderr
        );
    }
}

/// A number or a boolean written as a string gets the fix, not only the type name.
#[test]
fn quoted_numbers_and_booleans_are_told_how_to_write_them() {
    for (line, hint) in [
        (
            "[limits]\nmax_connections = \"100\"\n",
            "write a whole number without quotes",
        ),
        (
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nhttp2 = \"yes\"\n",
            "write true or false",
        ),
    ] {
        let body = if line.contains("[environments.qa]") {
            line.to_owned()
        } else {
            format!("{line}[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n")
        };
        let run = Fixture::new(&body).check(&[]);
        assert_eq!(run.code, 1, "{}", run.stderr);
        assert!(
            run.stderr.contains(hint),
            "{hint:?} missing:\n{}",
            run.stderr
        );
    }
}

#[test]
fn zero_timeouts_are_rejected() {
    for zero in ["0s", "0ms"] {
        let f = Fixture::new(&format!(
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nrequest_timeout = \"{zero}\"\n"
        ));
        assert_value_rejected(
            &f,
            "request_timeout",
            &format!("\"{zero}\""),
            "environments.qa.request_timeout",
            "positive duration",
        );
    }
}

#[test]
fn bad_upstream_urls_are_rejected() {
    let cases = [
        ("127.0.0.1:9001", "scheme"),
        ("ftp://127.0.0.1:9001", "scheme"),
        ("http://127.0.0.1:9001/api", "path"),
    ];
    for (bad, why) in cases {
        let f = Fixture::new(&format!(
            "[environments.qa]\nconnect_timeout = \"2s\"\nupstreams = [\"http://127.0.0.1:9002\", \"{bad}\"]\n"
        ));
        let record = assert_value_rejected(
            &f,
            "upstreams",
            &format!("\"{bad}\""),
            "environments.qa.upstreams",
            "write e.g.",
        );
        assert!(
            record.contains(why),
            "says what is wrong ({why}):\n{record}"
        );
    }
}

/// DESIGN: "upstream URLs parse and have a scheme and a port (or the scheme's default)".
/// A port that is no port must not silently become the scheme's default.
#[test]
fn upstream_port_out_of_range_is_rejected() {
    let f = Fixture::new("[environments.qa]\nupstreams = [\"http://127.0.0.1:70000\"]\n");
    let run = f.check(&["--explain"]);
    assert_rejected(
        &f,
        &run,
        &[Expect {
            at: f.locate("upstreams", "\"http://127.0.0.1:70000\""),
            path: "environments.qa.upstreams",
            value: "70000",
            hint: "write e.g.",
        }],
    );
}

/// An error about `upstream = "..."` names the key the user wrote, not `upstreams`.
#[test]
fn single_upstream_errors_name_the_upstream_key() {
    let f = Fixture::new("[environments.qa]\nupstream = \"ftp://127.0.0.1:9001\"\n");
    assert_value_rejected(
        &f,
        "upstream =",
        "\"ftp://127.0.0.1:9001\"",
        "environments.qa.upstream:",
        "write e.g.",
    );
}

fn duplicate_hash_fixture() -> (Fixture, String) {
    let hash = digest("spk_shared_key_pasted_into_two_environments");
    let f = Fixture::new(&format!(
        "[environments.production]\nupstream = \"http://127.0.0.1:9003\"\n\n\
         [[environments.production.keys]]\nid = \"billing\"\nsha256 = \"{hash}\"\n\n\
         [environments.qa]\nupstream = \"http://127.0.0.1:9002\"\n\n\
         [[environments.qa.keys]]\nid = \"qa-runner\"\nsha256 = \"{hash}\"\n"
    ));
    (f, hash)
}

fn duplicate_hash_candidates<'a>(f: &Fixture, value: &'a str) -> Vec<Expect<'a>> {
    vec![
        Expect {
            at: f.locate_nth("sha256", "\"", 1),
            path: "environments.qa.keys[0].sha256",
            value,
            hint: "specter keys new",
        },
        Expect {
            at: f.locate_nth("sha256", "\"", 0),
            path: "environments.production.keys[0].sha256",
            value,
            hint: "specter keys new",
        },
    ]
}

#[test]
fn duplicate_key_hash_across_environments_names_both() {
    let (f, _) = duplicate_hash_fixture();
    let run = f.check(&[]);
    let record = assert_rejected(&f, &run, &duplicate_hash_candidates(&f, ""));
    for env in ["production", "qa"] {
        assert!(record.contains(env), "names environment {env}:\n{record}");
    }
    assert!(
        record.contains("billing") || record.contains("qa-runner"),
        "names the other key's id:\n{record}"
    );
}

/// DESIGN: every error shows the bad value. A hash is not a secret; at least the
/// redacted prefix used elsewhere (first 6 characters) lets the user find it.
#[test]
fn duplicate_key_hash_error_shows_the_hash() {
    let (f, hash) = duplicate_hash_fixture();
    let run = f.check(&[]);
    assert_rejected(&f, &run, &duplicate_hash_candidates(&f, &hash[..6]));
}

#[test]
fn duplicate_key_id_in_one_environment_is_rejected() {
    let f = Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9002\"\n\n\
         [[environments.qa.keys]]\nid = \"ci\"\nsha256 = \"{}\"\n\n\
         [[environments.qa.keys]]\nid = \"ci\"\nsha256 = \"{}\"\n",
        digest("first"),
        digest("second")
    ));
    let run = f.check(&[]);
    assert_rejected(
        &f,
        &run,
        &[
            Expect {
                at: f.locate_nth("id = ", "\"ci\"", 1),
                path: "environments.qa.keys[1].id",
                value: "\"ci\"",
                hint: "own id",
            },
            Expect {
                at: f.locate_nth("id = ", "\"ci\"", 0),
                path: "environments.qa.keys[0].id",
                value: "\"ci\"",
                hint: "own id",
            },
        ],
    );
}

#[test]
fn bad_environment_name_is_rejected() {
    let f = Fixture::new("[environments.\"Prod!\"]\nupstream = \"http://127.0.0.1:9001\"\n");
    let run = f.check(&[]);
    assert_rejected(
        &f,
        &run,
        &[Expect {
            at: f.locate("[environments.", "\"Prod!\""),
            path: "environments.",
            value: "Prod!",
            hint: "lower-case letters",
        }],
    );
}

fn syntax_error_fixture() -> Fixture {
    Fixture::new("[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nconnect_timeout = 2s\n")
}

#[test]
fn toml_syntax_error_is_pointed_at() {
    let f = syntax_error_fixture();
    let run = f.check(&[]);
    assert_rejected(
        &f,
        &run,
        &[Expect {
            at: f.locate("connect_timeout", "2s"),
            path: "environments.qa",
            value: "",
            hint: "quoted",
        }],
    );
}

/// DESIGN: "Every error message names the key path, the bad value and what would be
/// valid". For `connect_timeout = 2s` the key and the value are known.
#[test]
fn toml_syntax_error_names_key_and_value() {
    let f = syntax_error_fixture();
    assert_value_rejected(&f, "connect_timeout", "2s", "connect_timeout", "quoted");
}

#[test]
fn bad_sizes_are_rejected() {
    let cases = [
        (
            "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\n[environments.qa.policy]\nmax_body = \"10 megs\"\n",
            "max_body",
            "10 megs",
            "environments.qa.policy.max_body",
        ),
        (
            "[limits]\nmax_header_bytes = \"lots\"\n\n[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n",
            "max_header_bytes",
            "lots",
            "limits.max_header_bytes",
        ),
    ];
    for (body, key, bad, path) in cases {
        let f = Fixture::new(body);
        let run = f.check(&[]);
        assert_rejected(
            &f,
            &run,
            &[Expect {
                at: f.locate(key, &format!("\"{bad}\"")),
                path,
                value: &format!("\"{bad}\""),
                hint: "write e.g.",
            }],
        );
    }
}

#[test]
fn bad_cidr_in_allow_ips_is_rejected() {
    let f = Fixture::new(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\n\
         [environments.qa.policy]\nallow_ips = [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
    );
    assert_value_rejected(
        &f,
        "allow_ips",
        "\"10.0.0.0/33\"",
        "environments.qa.policy.allow_ips",
        "write e.g.",
    );
}

/// development on `localhost:9001`, qa on `127.0.0.1:9001`, with the given
/// `shares_upstream_with` lines.
fn shared_upstream_fixture(dev_shares: &str, qa_shares: &str) -> Fixture {
    Fixture::new(&format!(
        "[environments.development]\nupstream = \"http://localhost:9001\"\n{dev_shares}\n\
         [environments.qa]\nconnect_timeout = \"2s\"\nupstream = \"http://127.0.0.1:9001\"\n{qa_shares}\n"
    ))
}

fn shared_upstream_candidates(f: &Fixture) -> Vec<Expect<'static>> {
    vec![
        Expect {
            at: f.locate("127.0.0.1:9001", "\"http://127.0.0.1:9001\""),
            path: "environments.qa.upstream",
            value: "127.0.0.1:9001",
            hint: "shares_upstream_with",
        },
        Expect {
            at: f.locate("localhost:9001", "\"http://localhost:9001\""),
            path: "environments.development.upstream",
            value: "localhost:9001",
            hint: "shares_upstream_with",
        },
    ]
}

/// Exit 1 and an error naming both environments, the upstream and the way out
/// (its position is checked by `shared_upstream_error_points_at_the_upstream`).
fn assert_shared_upstream_rejected(f: &Fixture) {
    let run = f.check(&[]);
    let record = assert_rejected_anywhere(f, &run, &shared_upstream_candidates(f));
    for env in ["development", "qa"] {
        assert!(
            record.contains(&format!("\"{env}\"")),
            "names environment {env}:\n{record}"
        );
    }
}

fn one_sided_fixtures() -> [Fixture; 2] {
    [
        shared_upstream_fixture("shares_upstream_with = [\"qa\"]\n", ""),
        shared_upstream_fixture("", "shares_upstream_with = [\"development\"]\n"),
    ]
}

#[test]
fn shared_upstream_between_environments_is_rejected() {
    assert_shared_upstream_rejected(&shared_upstream_fixture("", ""));
}

#[test]
fn one_sided_shares_upstream_with_is_still_rejected() {
    for f in one_sided_fixtures() {
        assert_shared_upstream_rejected(&f);
    }
}

/// The error starts at the shared upstream's value (in either environment), not at
/// the environment's table header.
#[test]
fn shared_upstream_error_points_at_the_upstream() {
    let [a, b] = one_sided_fixtures();
    for f in [shared_upstream_fixture("", ""), a, b] {
        let run = f.check(&[]);
        assert_rejected(&f, &run, &shared_upstream_candidates(&f));
    }
}

#[test]
fn two_sided_shares_upstream_with_is_accepted() {
    let f = shared_upstream_fixture(
        "shares_upstream_with = [\"qa\"]\n",
        "shares_upstream_with = [\"development\"]\n",
    );
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "{run:?}\n{}", f.numbered());
    assert!(run.stdout.contains("ok"), "{run:?}");
}

// --- 6. a key pasted where its hash belongs --------------------------------------------

#[test]
fn key_pasted_into_sha256_is_rejected_without_echoing_it() {
    let key = "spk_qa_7Hq2ZkP9mX4vR8sT1wY6bN3cL5dF0gJa";
    let f = Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\n\
         [[environments.qa.keys]]\nid = \"ci\"\nsha256 = \"{key}\"\n"
    ));
    let run = f.check(&[]);
    assert_rejected(
        &f,
        &run,
        &[Expect {
            at: f.locate("sha256", "\""),
            path: "environments.qa.keys[0].sha256",
            value: "",
            hint: "specter keys",
        }],
    );
    let random = key.strip_prefix("spk_qa_").unwrap();
    let chars: Vec<char> = random.chars().collect();
    for window in chars.windows(8) {
        let piece: String = window.iter().collect();
        assert!(
            !run.stderr.contains(&piece) && !run.stdout.contains(&piece),
            "output shows part of the pasted key ({piece:?}):\n{run:?}"
        );
    }
}

// --- 2. the repo sample ----------------------------------------------------------------

#[test]
fn repo_sample_config_is_valid() {
    let run = specter(&["check", "--config", "config/specter.toml"], None);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("ok"), "{run:?}");
}

// --- 3. warnings -----------------------------------------------------------------------

fn expiry_fixture() -> Fixture {
    let expired = toml_datetime(-time::Duration::days(30));
    let soon = toml_datetime(time::Duration::days(3));
    let later = toml_datetime(time::Duration::days(365));
    Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\n\
         [[environments.qa.keys]]\nid = \"old-key\"\nsha256 = \"{}\"\nnot_after = {expired}\n\n\
         [[environments.qa.keys]]\nid = \"soon-key\"\nsha256 = \"{}\"\nnot_after = {soon}\n\n\
         [[environments.qa.keys]]\nid = \"later-key\"\nsha256 = \"{}\"\nnot_after = {later}\n",
        digest("old"),
        digest("soon"),
        digest("later")
    ))
}

#[test]
fn expired_and_expiring_keys_warn_without_failing() {
    let f = expiry_fixture();
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "warnings never fail the check: {run:?}");
    for (id, nth) in [("old-key", 0), ("soon-key", 1)] {
        let lines = warnings_about(&run.stderr, id);
        assert_eq!(lines.len(), 1, "one warning about {id}: {run:?}");
        let at = f.location(f.locate_nth("not_after", "20", nth));
        assert!(
            lines[0].starts_with(&at),
            "the warning about {id} points at its not_after ({at}): {run:?}"
        );
    }
    assert!(
        warnings_about(&run.stderr, "old-key")[0].contains("expired"),
        "{run:?}"
    );
    assert!(
        warnings_about(&run.stderr, "later-key").is_empty(),
        "a key valid for a year is not warned about: {run:?}"
    );
}

#[test]
fn expiry_warning_window_is_configurable() {
    let f = expiry_fixture();
    let run = f.check(&["--expiry-warning", "1d"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        warnings_about(&run.stderr, "soon-key").is_empty(),
        "a key expiring in 3 days is outside a 1 day window: {run:?}"
    );
    assert_eq!(
        warnings_about(&run.stderr, "old-key").len(),
        1,
        "an expired key is still reported: {run:?}"
    );
}

#[test]
fn key_id_reused_across_environments_warns_without_failing() {
    let f = Fixture::new(&format!(
        "[environments.development]\nupstream = \"http://127.0.0.1:9001\"\n\n\
         [[environments.development.keys]]\nid = \"shared-id\"\nsha256 = \"{}\"\n\n\
         [environments.qa]\nupstream = \"http://127.0.0.1:9002\"\n\n\
         [[environments.qa.keys]]\nid = \"shared-id\"\nsha256 = \"{}\"\n",
        digest("dev"),
        digest("qa")
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "{run:?}");
    let lines = warnings_about(&run.stderr, "shared-id");
    assert_eq!(lines.len(), 1, "{run:?}");
    for env in ["development", "qa"] {
        assert!(lines[0].contains(env), "names {env}: {run:?}");
    }
}

// --- 4. --explain ----------------------------------------------------------------------

/// The `--explain` section of each environment: the lines after its `[name]` header.
fn explain_sections(stdout: &str) -> Vec<(String, Vec<String>)> {
    let mut sections: Vec<(String, Vec<String>)> = Vec::new();
    for line in stdout.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            sections.push((name.to_owned(), Vec::new()));
        } else if let Some((_, lines)) = sections.last_mut() {
            lines.push(t.to_owned());
        }
    }
    sections
}

fn section_line<'a>(lines: &'a [String], label: &str, env: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.starts_with(label))
        .unwrap_or_else(|| panic!("[{env}] has no {label:?} line: {lines:#?}"))
}

#[test]
fn explain_prints_upstreams_hosts_keys_and_limits() {
    let f = Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9002\"\nhosts = [\"qa.example.com\"]\n\n\
         [environments.qa.rate_limit]\nper_key = {{ requests = 37, per = \"1s\", burst = 41 }}\n\n\
         [[environments.qa.keys]]\nid = \"a\"\nsha256 = \"{}\"\n\n\
         [[environments.qa.keys]]\nid = \"b\"\nsha256 = \"{}\"\n\n\
         [environments.production]\nupstreams = [\"http://10.0.0.5:8000\", \"https://backend.internal\"]\n\
         hosts = [\"api.example.com\", \"www.example.com\"]\n\n\
         [environments.production.rate_limit]\ntotal = {{ requests = 1234, per = \"1s\", burst = 4321 }}\n\n\
         [[environments.production.keys]]\nid = \"c\"\nsha256 = \"{}\"\n\n\
         [[environments.production.keys]]\nid = \"d\"\nsha256 = \"{}\"\n\n\
         [[environments.production.keys]]\nid = \"e\"\nsha256 = \"{}\"\n",
        digest("a"),
        digest("b"),
        digest("c"),
        digest("d"),
        digest("e")
    ));
    let run = f.check(&["--explain"]);
    assert_eq!(run.code, 0, "{run:?}");
    let sections = explain_sections(&run.stdout);
    let names: Vec<&str> = sections.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"qa") && names.contains(&"production"),
        "{run:?}"
    );
    let expected = [
        (
            "qa",
            vec!["127.0.0.1:9002"],
            vec!["qa.example.com"],
            "2",
            vec!["37", "41"],
        ),
        (
            "production",
            vec!["10.0.0.5:8000", "backend.internal:443"],
            vec!["api.example.com", "www.example.com"],
            "3",
            vec!["1234", "4321"],
        ),
    ];
    for (env, upstreams, hosts, keys, limits) in expected {
        let (_, lines) = sections.iter().find(|(n, _)| n == env).unwrap();
        let line = section_line(lines, "upstreams", env);
        for u in upstreams {
            assert!(line.contains(u), "[{env}] upstreams show {u}: {line}");
        }
        let line = section_line(lines, "hosts", env);
        for h in hosts {
            assert!(line.contains(h), "[{env}] hosts show {h}: {line}");
        }
        let line = section_line(lines, "keys", env);
        assert!(
            line.split(|c: char| !c.is_ascii_digit()).any(|n| n == keys),
            "[{env}] has {keys} keys: {line}"
        );
        let line = section_line(lines, "limits", env);
        for n in limits {
            assert!(line.contains(n), "[{env}] limits show {n}: {line}");
        }
    }
}

#[test]
fn explain_on_the_repo_sample_covers_every_environment() {
    let run = specter(
        &["check", "--config", "config/specter.toml", "--explain"],
        None,
    );
    assert_eq!(run.code, 0, "{run:?}");
    let sections = explain_sections(&run.stdout);
    for (env, upstream) in [
        ("development", "127.0.0.1:9001"),
        ("qa", "127.0.0.1:9002"),
        ("production", "127.0.0.1:9003"),
    ] {
        let (_, lines) = sections
            .iter()
            .find(|(n, _)| n == env)
            .unwrap_or_else(|| panic!("no [{env}] section: {run:?}"));
        assert!(section_line(lines, "upstreams", env).contains(upstream));
        section_line(lines, "hosts", env);
        section_line(lines, "keys", env);
        section_line(lines, "limits", env);
    }
}

// --- 5. keys new / keys hash -----------------------------------------------------------

#[test]
fn keys_new_prints_a_well_formed_key_and_a_block_that_passes_check() {
    let (key, block) = new_key("qa", "ci-key");
    assert!(is_key_for(&key, "qa"), "first line is a qa key: {key:?}");
    assert_eq!(block_sha256(&block), digest(&key), "{block}");
    let f = Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9002\"\n\n{block}"
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "{run:?}\n{}", f.numbered());
    assert!(
        !run.stdout.contains(&key) && !run.stderr.contains(&key),
        "{run:?}"
    );
    let (again, _) = new_key("qa", "ci-key");
    assert_ne!(key, again, "every key is fresh");
}

#[tokio::test]
async fn key_from_keys_new_authenticates_through_a_gateway() {
    let (key, block) = new_key("qa", "ci-key");
    let upstream = common::Upstream::start("qa").await;
    let toml = format!(
        "[environments.qa]\nupstream = \"{}\"\n\n{block}",
        upstream.url()
    );
    let gw = common::TestGateway::start(&toml).await;
    let client = common::client();

    let answer = common::get(&client, &gw.url("/v1/ping"), &[("x-api-key", &key)]).await;
    assert_eq!(answer.status, 200, "body: {}", answer.text());
    assert_eq!(answer.text(), "qa");
    let seen = upstream.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["x-specter-key-id"], "ci-key");

    // A different, well-formed qa key is not let through.
    let (stranger, _) = new_key("qa", "not-configured");
    let answer = common::get(&client, &gw.url("/v1/ping"), &[("x-api-key", &stranger)]).await;
    assert_eq!(answer.status, 401, "body: {}", answer.text());
    assert_eq!(upstream.count(), 1);
}

#[test]
fn keys_hash_reads_the_key_from_stdin_and_never_prints_it() {
    let (key, block) = new_key("qa", "ci-key");
    let run = specter(
        &["keys", "hash", "--env", "qa", "--id", "x"],
        Some(&format!("{key}\n")),
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains("[[environments.qa.keys]]"), "{run:?}");
    assert!(run.stdout.contains("\"x\""), "{run:?}");
    assert_eq!(block_sha256(&run.stdout), block_sha256(&block), "{run:?}");
    assert_eq!(block_sha256(&run.stdout), digest(&key));
    let random = key.strip_prefix("spk_qa_").unwrap();
    assert!(
        !run.stdout.contains(random) && !run.stderr.contains(random),
        "the key itself is never printed: {run:?}"
    );
}

/// Config and certificate paths that are not regular files are refused at once, by
/// name, instead of being read forever (`/dev/zero`) or blocking (a FIFO).
///
/// Failing when written: `check` on a config linked to `/dev/zero` read until memory
/// ran out.
#[test]
fn paths_that_are_not_regular_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("specter.toml");
    std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
    let run = specter(&["check", "--config", link.to_str().unwrap()], None);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("it is a character device, not a regular file"),
        "{run:?}"
    );

    let f = Fixture::new(
        "[tls]\n[[tls.certificates]]\ncert = \"/dev/zero\"\nkey = \"/dev/null\"\n\n\
         [environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n",
    );
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("cannot read /dev/zero: it is a character device"),
        "{run:?}"
    );
}

/// `h2c` can never be listed as an upgrade: specter speaks HTTP/2 itself, and an h2c
/// tunnel would carry streams no check sees.
#[test]
fn h2c_cannot_be_allowed_as_an_upgrade() {
    let f = Fixture::new(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\
         [environments.qa.policy]\nupgrades = [\"websocket\", \"h2c\"]\n",
    );
    assert_value_rejected(
        &f,
        "upgrades",
        "\"h2c\"",
        "environments.qa.policy.upgrades",
        "speaks HTTP/2 itself",
    );
}

/// Values that `run` could not use are refused by `check`, naming the documented range.
///
/// Failing when written: `idle_timeout = "1ns"` and `per = "585y"` were accepted, and
/// panicked every connection and the limiter.
#[test]
fn values_outside_their_documented_range_are_refused() {
    let f = Fixture::new(
        "[limits]\nidle_timeout = \"1ns\"\n\n[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n",
    );
    assert_value_rejected(
        &f,
        "idle_timeout",
        "\"1ns\"",
        "limits.idle_timeout",
        "use between \"1s\" and \"1day\"",
    );
    let f = Fixture::new(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n\
         [environments.qa.rate_limit]\nper_key = { requests = 5, per = \"585y\" }\n",
    );
    assert_value_rejected(
        &f,
        "per_key",
        "\"585y\"",
        "environments.qa.rate_limit.per_key.per",
        "out of range",
    );
}

/// A `keys_file` is read line by line; every bad line is reported at its own
/// `file:line:col`, and a hash shared with another environment at the file's line.
#[test]
fn keys_file_lines_are_checked_where_they_stand() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("qa.keys");
    let taken = hex(&sha256(b"spk_production_taken"));
    let good = hex(&sha256(b"spk_qa_good"));
    std::fs::write(
        &keys,
        format!(
            "# id  sha256  not_before  not_after\n\
             qa-1 {good}\n\
             qa-2 {taken}\n\
             qa-1 {}\n\
             qa-3 nothex\n\
             qa-4 {} yesterday\n",
            hex(&sha256(b"spk_qa_other")),
            hex(&sha256(b"spk_qa_four")),
        ),
    )
    .unwrap();
    let f = Fixture::new(&format!(
        "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\nkeys_file = \"{}\"\n\n\
         [environments.production]\nupstream = \"http://127.0.0.1:9002\"\n\
         [[environments.production.keys]]\nid = \"p\"\nsha256 = \"{taken}\"\n",
        keys.display()
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    let at = |line: usize, col: usize| {
        format!(
            "{}:{line}:{col}: environments.qa.keys_file:",
            keys.display()
        )
    };
    for (line, col, what) in [(5, 6, "not 64 hex"), (6, 71, "not an RFC 3339 time")] {
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with(&at(line, col)) && l.contains(what)),
            "no {what:?} at {line}:{col}:\n{}",
            run.stderr
        );
    }

    // With the bad lines gone, the cross-checks run: the shared hash and the repeated id.
    std::fs::write(
        &keys,
        format!(
            "qa-1 {good}\nqa-2 {taken}\nqa-1 {}\n",
            hex(&sha256(b"spk_qa_other"))
        ),
    )
    .unwrap();
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.lines().any(|l| l.starts_with(&at(2, 1))
            && l.contains("also key \"p\" of environment \"production\"")),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .lines()
            .any(|l| l.starts_with(&at(3, 1)) && l.contains("\"qa-1\" is used twice")),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains(&taken), "a full hash was printed");

    std::fs::write(&keys, format!("qa-1 {good} - 2099-01-01T00:00:00Z\n")).unwrap();
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "{run:?}");
}

// --- what `run` would refuse, and parse errors that read right --------------------------

const QA: &str = "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n";

#[test]
fn overlapping_listeners_are_rejected_by_check() {
    for (http, admin, wide) in [
        ("127.0.0.1:18080", "127.0.0.1:18080", ""),
        (
            "0.0.0.0:18080",
            "127.0.0.1:18080",
            "0.0.0.0 takes port 18080",
        ),
        ("[::]:18080", "[::1]:18080", ":: takes port 18080"),
    ] {
        let f = Fixture::raw(&format!(
            "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n{QA}"
        ));
        let quoted = format!("\"{admin}\"");
        let record = assert_value_rejected(&f, "admin =", &quoted, "listen.admin", "own port");
        assert!(record.contains(http), "{record}");
        assert!(record.contains(wide), "{record}");
    }
}

#[test]
fn a_non_loopback_admin_listener_warns_without_failing() {
    let f = Fixture::raw(&format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"0.0.0.0:0\"\n\n{QA}"
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 0, "{run:?}");
    let warned = warnings_about(&run.stderr, "listen.admin");
    assert_eq!(warned.len(), 1, "{run:?}");
    assert!(warned[0].contains("no authentication"), "{run:?}");
    let f = Fixture::raw(&format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"[::1]:0\"\n\n{QA}"
    ));
    let run = f.check(&[]);
    assert!(
        warnings_about(&run.stderr, "listen.admin").is_empty(),
        "{run:?}"
    );
}

#[test]
fn two_values_on_one_key_are_not_told_to_quote() {
    let f = Fixture::new(&format!("[limits]\nmax_headers = 100 100\n\n{QA}"));
    let record = assert_value_rejected(
        &f,
        "max_headers",
        "100 100",
        "max_headers",
        "one value per key",
    );
    assert!(!record.contains("quoted"), "{record}");
}

#[test]
fn a_table_defined_twice_is_named_whole() {
    let f = Fixture::new(&format!("{QA}\n{QA}"));
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("[environments.qa] is defined twice"),
        "{run:?}"
    );
    assert!(!run.stderr.contains("[environments.]"), "{run:?}");
}

#[test]
fn every_unknown_field_is_reported_at_once_with_near_misses_named() {
    let f = Fixture::raw(&format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nadmn = \"127.0.0.1:0\"\n\n[nope]\nx = 1\n\n{QA}hostz = []\n\n[environments.qa.rate_limit]\nper_key = {{ requests = 1, pr = \"1s\" }}\n"
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    let records = f.records(&run.stderr);
    assert_eq!(records.len(), 4, "{run:?}");
    for (typo, place, near) in [
        ("admn", "in [listen]", Some("admin")),
        ("nope", "at the top level", None),
        ("hostz", "in [environments.qa]", Some("hosts")),
        ("pr", "in [environments.qa.rate_limit.per_key]", Some("per")),
    ] {
        let line = if typo == "nope" {
            "[nope]".to_owned()
        } else {
            format!("{typo} =")
        };
        let at = f.location(f.locate(&line, typo));
        let record = records
            .iter()
            .find(|r| r.starts_with(&at))
            .unwrap_or_else(|| panic!("nothing at {at}: {run:?}"));
        assert!(
            record.contains(&format!("unknown field `{typo}` {place}")),
            "{record}"
        );
        if let Some(near) = near {
            assert!(
                record.contains(&format!("did you mean `{near}`?")),
                "{record}"
            );
        }
    }
    assert!(!run.stderr.contains("in []"), "{run:?}");
}

#[test]
fn a_missing_certificate_says_where_its_relative_path_was_resolved_from() {
    let f = Fixture::raw(&format!(
        "[listen]\nhttps = \"127.0.0.1:0\"\n\n[tls]\n[[tls.certificates]]\ncert = \"certs/missing.pem\"\nkey = \"certs/missing.key\"\n\n{QA}"
    ));
    let run = f.check(&[]);
    assert_eq!(run.code, 1, "{run:?}");
    // `run_specter` runs from the package root.
    let from = format!(
        "certs/missing.pem (relative to {})",
        env!("CARGO_MANIFEST_DIR")
    );
    assert!(run.stderr.contains(&from), "{from:?} missing: {run:?}");
}
