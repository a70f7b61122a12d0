//! `specter promote` and `specter diff` as a user runs them: the real binary on real
//! files in a temp folder. Promotion must change only TO's promotable settings, keep
//! every other byte of the file, validate before writing and write atomically.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use specter::commands::edit::EditError;
use specter::commands::promote;
use specter::config::{hex, sha256};
use tempfile::TempDir;

use common::{run_specter, Run};

/// Three environments, comments everywhere, each writing its settings in another
/// style: development with `[tables]`, qa with dotted keys, production inline.
const STYLES: &str = r#"# specter test fixture: three environments in three styles.
# The first lines are a file comment that must survive.

[listen]
http = "127.0.0.1:0"   # any free port

[limits]
max_headers = 100      # server-wide, never promoted

# --- development: where settings are tried first ------------------------------
[environments.development]   # header comment
upstream        = "http://127.0.0.1:9001"   # dev backend
connect_timeout = "1s"      # dev connects fast
request_timeout = "10s"

[environments.development.rate_limit]
# generous for developers
per_key = { requests = 50, per = "1s", burst = 100 }
total   = { requests = 500, per = "1s" }   # whole environment

[environments.development.policy]
methods     = ["GET", "POST", "DELETE"]   # no PUT yet
allow_paths = [
  "/v1/",   # public API
  "/v2/",   # the next one
]
max_body    = "5MiB"

[environments.development.policy.request_headers]
set    = { "x-tenant" = "dev" }   # tells the backend who calls
remove = ["cookie"]

[[environments.development.keys]]
id     = "alice-laptop"   # Alice's key
sha256 = "1111111111111111111111111111111111111111111111111111111111111111"

# --- qa: written with dotted keys ---------------------------------------------
[environments.qa]
upstream          = "http://127.0.0.1:9002"   # qa backend: must stay
hosts             = ["qa.example.com"]        # qa host: must stay
connect_timeout   = "2s"                      # qa connect
request_timeout   = "30s"                     # qa request
policy.methods    = ["GET"]                   # qa only reads
policy.deny_paths = ["/v1/internal/"]         # only qa has it: promotion removes it
rate_limit.per_key = { requests = 10, per = "1s" }   # qa per key

# qa's one key
[[environments.qa.keys]]
id     = "qa-runner"   # qa key: must stay
sha256 = "2222222222222222222222222222222222222222222222222222222222222222"

# --- production: inline tables -------------------------------------------------
[environments.production]
upstreams  = ["http://127.0.0.1:9003", "http://127.0.0.1:9004"]   # prod backends
hosts      = ["api.example.com"]
policy     = { methods = ["GET", "POST"], max_body = "1MiB" }   # prod policy, inline
rate_limit = { total = { requests = 1000, per = "1s" } }

[[environments.production.keys]]
id     = "billing"
sha256 = "3333333333333333333333333333333333333333333333333333333333333333"
# trailing comment at the end of the file
"#;

// --- harness ---------------------------------------------------------------------------

fn specter(args: &[&str]) -> Run {
    run_specter(args, None)
}

/// `specter promote FROM TO --config FILE EXTRA...`
fn promote(file: &Path, from: &str, to: &str, extra: &[&str]) -> Run {
    let mut args = vec!["promote", from, to, "--config", file.to_str().unwrap()];
    args.extend_from_slice(extra);
    specter(&args)
}

/// `specter diff A B --config FILE`
fn diff(file: &Path, a: &str, b: &str) -> Run {
    specter(&["diff", a, b, "--config", file.to_str().unwrap()])
}

fn fixture(text: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new().unwrap();
    let file = dir.path().join("specter.toml");
    fs::write(&file, text).unwrap();
    (dir, file)
}

fn file_sha(path: &Path) -> String {
    hex(&sha256(&fs::read(path).unwrap()))
}

fn env_table(text: &str, env: &str) -> toml::Table {
    let doc: toml::Table = toml::from_str(text).unwrap();
    doc["environments"][env].as_table().unwrap().clone()
}

/// The file's lines minus everything promotion may change in qa: the timeout lines of
/// `[environments.qa]` and every `rate_limit` / `policy` line of qa (dotted keys here).
fn outside_qa_promotables(text: &str) -> Vec<&str> {
    let mut section = "";
    // Brackets still open in a dropped value that spans lines: its lines go too.
    let mut open = 0i32;
    text.lines()
        .filter(|line| {
            let t = line.trim_start();
            let code = t.split('#').next().unwrap_or("");
            let depth =
                code.matches(['[', '{']).count() as i32 - code.matches([']', '}']).count() as i32;
            if open > 0 {
                open += depth;
                return false;
            }
            if t.starts_with('[') {
                section = t;
                return true;
            }
            let in_qa = section.starts_with("[environments.qa]");
            let promotable = [
                "connect_timeout",
                "request_timeout",
                "policy.",
                "rate_limit.",
            ]
            .iter()
            .any(|p| t.starts_with(p));
            if in_qa && promotable {
                open = depth;
            }
            !(in_qa && promotable)
        })
        .collect()
}

fn promotable(env: &toml::Table) -> Vec<Option<&toml::Value>> {
    ["connect_timeout", "request_timeout", "rate_limit", "policy"]
        .iter()
        .map(|k| env.get(*k))
        .collect()
}

// --- promote --apply ---------------------------------------------------------------------

#[test]
fn apply_changes_only_qa_promotables_and_keeps_every_other_byte() {
    let (_dir, file) = fixture(STYLES);
    let run = promote(&file, "development", "qa", &["--apply", "--allow-removals"]);
    assert_eq!(run.code, 0, "{run:?}");
    let new = fs::read_to_string(&file).unwrap();
    assert!(
        run.stdout.contains(&format!("sha256 {}", file_sha(&file))),
        "prints the new file's SHA-256: {run:?}"
    );
    assert!(
        run.stdout.contains("keys, upstreams, hosts untouched"),
        "{run:?}"
    );

    // Outside qa's promotable lines, the file is the same sequence of lines.
    assert_eq!(outside_qa_promotables(STYLES), outside_qa_promotables(&new));
    // And every line that was there before and is not promotable is byte-identical.
    let new_lines: BTreeSet<&str> = new.lines().collect();
    for line in outside_qa_promotables(STYLES) {
        assert!(new_lines.contains(line), "lost or changed: {line:?}\n{new}");
    }

    let (before, after) = (env_table(STYLES, "qa"), env_table(&new, "qa"));
    for untouched in ["upstream", "hosts", "keys"] {
        assert_eq!(
            before[untouched], after[untouched],
            "qa.{untouched} changed"
        );
    }
    let dev = env_table(&new, "development");
    assert_eq!(
        promotable(&dev),
        promotable(&after),
        "qa now matches development"
    );
    assert_eq!(
        env_table(STYLES, "development"),
        dev,
        "FROM is never changed"
    );
    assert_eq!(
        env_table(STYLES, "production"),
        env_table(&new, "production")
    );
    assert!(
        !after["policy"]
            .as_table()
            .unwrap()
            .contains_key("deny_paths"),
        "a setting only qa had is removed"
    );
    assert!(!new.contains("only qa has it"), "{new}");

    let check = specter(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.code, 0, "the promoted file passes check: {check:?}");
}

#[test]
fn apply_writes_qa_in_its_own_style() {
    let (_dir, file) = fixture(STYLES);
    assert_eq!(
        promote(&file, "development", "qa", &["--apply", "--allow-removals"]).code,
        0
    );
    let new = fs::read_to_string(&file).unwrap();
    // qa keeps dotted keys: no [environments.qa.policy] table appears.
    assert!(!new.contains("[environments.qa.policy"), "{new}");
    assert!(!new.contains("[environments.qa.rate_limit"), "{new}");
    let methods = new
        .lines()
        .find(|l| l.starts_with("policy.methods"))
        .unwrap();
    assert_eq!(
        methods.find('#'),
        STYLES
            .lines()
            .find(|l| l.starts_with("policy.methods"))
            .unwrap()
            .find('#'),
        "a changed value keeps its trailing comment in its column: {methods}"
    );
    assert!(methods.starts_with("policy.methods    = [\"GET\", \"POST\", \"DELETE\"] "));

    // Production writes its policy inline, and keeps doing so.
    assert_eq!(
        promote(
            &file,
            "development",
            "production",
            &["--apply", "--allow-removals"]
        )
        .code,
        0
    );
    let new = fs::read_to_string(&file).unwrap();
    assert!(!new.contains("[environments.production.policy"), "{new}");
    assert_eq!(
        promotable(&env_table(&new, "development")),
        promotable(&env_table(&new, "production"))
    );
    let check = specter(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}\n{new}");
}

#[test]
fn apply_into_an_environment_without_those_tables_adds_them() {
    // production -> development: development's [tables] get production's values; and
    // qa -> a bare environment gets whole new sections.
    let text = STYLES.replace(
        "[[environments.production.keys]]",
        "[environments.staging]\nupstream = \"http://127.0.0.1:9005\"\n\n[[environments.production.keys]]",
    );
    let (_dir, file) = fixture(&text);
    for (from, to) in [("production", "development"), ("development", "staging")] {
        let run = promote(&file, from, to, &["--apply", "--allow-removals"]);
        assert_eq!(run.code, 0, "{from} -> {to}: {run:?}");
        let new = fs::read_to_string(&file).unwrap();
        assert_eq!(
            promotable(&env_table(&new, from)),
            promotable(&env_table(&new, to)),
            "{new}"
        );
        let check = specter(&["check", "--config", file.to_str().unwrap()]);
        assert_eq!(check.code, 0, "{check:?}\n{new}");
    }
}

#[test]
fn apply_keeps_file_permissions() {
    let (_dir, file) = fixture(STYLES);
    fs::set_permissions(&file, fs::Permissions::from_mode(0o640)).unwrap();
    let run = promote(&file, "development", "qa", &["--apply", "--allow-removals"]);
    assert_eq!(run.code, 0, "{run:?}");
    let mode = fs::metadata(&file).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o640);
    let leftovers: Vec<_> = fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec!["specter.toml"], "no temp file left behind");
}

// --- dry run -----------------------------------------------------------------------------

#[test]
fn dry_run_prints_a_diff_writes_nothing_and_exits_2() {
    let (_dir, file) = fixture(STYLES);
    let before = file_sha(&file);
    let run = promote(&file, "development", "qa", &[]);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(file_sha(&file), before, "a dry run writes nothing");
    let out = &run.stdout;
    assert!(
        out.starts_with(&format!("--- {}", file.display())),
        "{run:?}"
    );
    assert!(out.contains(&format!("+++ {}", file.display())), "{run:?}");
    assert!(out.contains("\n@@ -"), "{run:?}");
    assert!(out.contains("\n-connect_timeout   = \"2s\"                      # qa connect\n"));
    assert!(out.contains("\n+connect_timeout   = \"1s\"                      # qa connect\n"));
    assert!(
        out.contains("\n-policy.deny_paths = [\"/v1/internal/\"]"),
        "{run:?}"
    );
    assert!(
        !out.contains('\x1b'),
        "no colours when stdout is not a terminal"
    );
    for changed in out.lines().filter(|l| l.starts_with(['-', '+'])) {
        let l = changed.to_ascii_lowercase();
        assert!(
            !l.contains("upstream") && !l.contains("hosts") && !l.contains("sha256"),
            "keys, upstreams and hosts never change: {changed}"
        );
    }
    assert!(
        out.contains("removed; keys, upstreams, hosts untouched"),
        "{run:?}"
    );
}

#[test]
fn the_diff_is_coloured_only_when_asked() {
    let (_dir, file) = fixture(STYLES);
    let (text, _) = promote::read_config(&file).unwrap();
    let plan = promote::plan(&text, &file, "development", "qa", &promote::Group::ALL).unwrap();
    let coloured = plan.unified_diff(&file, true);
    assert!(coloured.contains("\x1b[31m-connect_timeout"), "{coloured}");
    assert!(coloured.contains("\x1b[32m+connect_timeout"), "{coloured}");
    assert!(!plan.unified_diff(&file, false).contains('\x1b'));
}

#[test]
fn in_sync_environments_exit_0() {
    let (_dir, file) = fixture(STYLES);
    assert_eq!(
        promote(&file, "development", "qa", &["--apply", "--allow-removals"]).code,
        0
    );
    let after_apply = file_sha(&file);
    let again = promote(&file, "development", "qa", &[]);
    assert_eq!(again.code, 0, "{again:?}");
    assert!(again.stdout.contains("already matches"), "{again:?}");
    let applied_again = promote(&file, "development", "qa", &["--apply", "--allow-removals"]);
    assert_eq!(applied_again.code, 0, "{applied_again:?}");
    assert_eq!(
        file_sha(&file),
        after_apply,
        "nothing to write, nothing written"
    );
}

#[test]
fn only_rate_limit_promotes_only_the_rate_limit() {
    let (_dir, file) = fixture(STYLES);
    let run = promote(
        &file,
        "development",
        "qa",
        &["--only", "rate_limit", "--apply"],
    );
    assert_eq!(run.code, 0, "{run:?}");
    let new = fs::read_to_string(&file).unwrap();
    let (before, after) = (env_table(STYLES, "qa"), env_table(&new, "qa"));
    let dev = env_table(&new, "development");
    assert_eq!(after["rate_limit"], dev["rate_limit"]);
    for kept in ["policy", "connect_timeout", "request_timeout"] {
        assert_eq!(after[kept], before[kept], "{kept} is not promoted");
    }
    assert_eq!(
        promote(&file, "development", "qa", &["--only", "rate_limit"]).code,
        0
    );
    assert_eq!(
        promote(&file, "development", "qa", &["--only", "policy,timeouts"]).code,
        2
    );
    let bad = promote(&file, "development", "qa", &["--only", "keys"]);
    assert_eq!(
        bad.code, 1,
        "an unknown group is an error, not \"changes\": {bad:?}"
    );
    assert!(
        bad.stderr.contains("rate_limit, policy or timeouts"),
        "{bad:?}"
    );
}

// --- refusals ----------------------------------------------------------------------------

/// Promotion validates the result exactly like `specter check`. Every promotable
/// setting is checked per environment, so a valid FROM always gives a valid TO; what a
/// real user hits is a FROM that was edited by hand into an invalid value. Promoting it
/// must not spread the mistake: the run is refused, the error names TO's key (the
/// value as it would have landed there) with line:col in the would-be file, and the
/// file is not touched.
#[test]
fn promoting_an_invalid_value_is_refused_without_writing() {
    let text = STYLES.replace("max_body    = \"5MiB\"", "max_body    = \"lots\"");
    let (_dir, file) = fixture(&text);
    let before = file_sha(&file);
    for extra in [&[][..], &["--apply"][..]] {
        let run = promote(&file, "development", "qa", extra);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(
            run.stderr.contains("would leave an invalid config"),
            "{run:?}"
        );
        assert!(run.stderr.contains("nothing was written"), "{run:?}");
        assert!(
            run.stderr.contains("as it would be after promotion"),
            "{run:?}"
        );
        assert!(
            run.stderr
                .contains("environments.qa.policy.max_body: \"lots\""),
            "names the value as it would be in TO: {run:?}"
        );
        assert!(
            run.stdout.is_empty(),
            "no diff for a refused promotion: {run:?}"
        );
        assert_eq!(file_sha(&file), before);
    }
}

#[test]
fn unknown_environment_same_environment_and_missing_file_exit_1() {
    let (dir, file) = fixture(STYLES);
    let before = file_sha(&file);

    let unknown = promote(&file, "development", "staging", &["--apply"]);
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown environment \"staging\""),
        "{unknown:?}"
    );
    assert!(
        unknown.stderr.contains("development, qa, production"),
        "lists the known ones"
    );

    let same = promote(&file, "qa", "qa", &["--apply"]);
    assert_eq!(same.code, 1, "{same:?}");
    assert!(
        same.stderr.contains("\"qa\" is both FROM and TO"),
        "{same:?}"
    );
    assert_eq!(file_sha(&file), before);

    let missing = dir.path().join("nope.toml");
    let run = promote(&missing, "development", "qa", &["--apply"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot read"), "{run:?}");
    assert!(!missing.exists());

    let broken = dir.path().join("broken.toml");
    fs::write(&broken, "[environments.qa\nupstream = 1\n").unwrap();
    let run = promote(&broken, "development", "qa", &["--apply"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(":1:"), "points at the line: {run:?}");
    assert!(run.stderr.contains("not valid TOML"), "{run:?}");
    assert_eq!(run.stderr.trim().lines().count(), 1, "one line: {run:?}");
}

#[test]
fn line_endings_are_kept() {
    let crlf = STYLES.replace('\n', "\r\n");
    let unterminated = STYLES.trim_end().to_owned();
    for text in [&crlf, &unterminated] {
        let (_dir, file) = fixture(text);
        let run = promote(&file, "development", "qa", &["--apply", "--allow-removals"]);
        assert_eq!(run.code, 0, "{run:?}");
        let new = fs::read_to_string(&file).unwrap();
        assert_eq!(outside_qa_promotables(text), outside_qa_promotables(&new));
        assert_eq!(new.ends_with('\n'), text.ends_with('\n'), "{new:?}");
        let crlfs = new.matches("\r\n").count();
        let lfs = new.matches('\n').count();
        assert_eq!(crlfs == lfs, text.contains('\r'), "{new:?}");
        let check = specter(&["check", "--config", file.to_str().unwrap()]);
        assert_eq!(check.code, 0, "{check:?}");
    }
}

/// toml_edit writes the dotted keys of one table together; a file that splits them
/// with another key would have lines moved that promotion has no business touching,
/// so it is refused rather than reformatted.
#[test]
fn a_layout_that_cannot_be_kept_is_refused() {
    let deny =
        "policy.deny_paths = [\"/v1/internal/\"]         # only qa has it: promotion removes it\n";
    let per_key = "rate_limit.per_key = { requests = 10, per = \"1s\" }   # qa per key\n";
    let split = STYLES.replace(&format!("{deny}{per_key}"), &format!("{per_key}{deny}"));
    assert_ne!(split, STYLES);
    let (_dir, file) = fixture(&split);
    let before = file_sha(&file);
    let run = promote(&file, "development", "qa", &["--apply"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("layout could not be kept"), "{run:?}");
    assert_eq!(file_sha(&file), before);
}

/// The file is re-read just before the rename: if someone saved it since promotion
/// read it, the rename would silently drop their edit, so nothing is written.
#[test]
fn a_file_changed_during_promotion_is_not_overwritten() {
    let (_dir, file) = fixture(STYLES);
    let (text, digest) = promote::read_config(&file).unwrap();
    let plan = promote::plan(&text, &file, "development", "qa", &promote::Group::ALL).unwrap();
    let edited = text.replace("max_headers = 100", "max_headers = 200");
    fs::write(&file, &edited).unwrap();

    let err = promote::write_atomically(&file, plan.new_text.as_bytes(), &digest).unwrap_err();
    assert!(matches!(err, EditError::Changed { .. }), "{err:?}");
    assert!(err
        .to_string()
        .contains("the config changed since it was read; run again"));
    assert_eq!(
        fs::read_to_string(&file).unwrap(),
        edited,
        "the other edit is kept"
    );
    assert_eq!(
        fs::read_dir(file.parent().unwrap()).unwrap().count(),
        1,
        "no temp file"
    );

    // With the current digest the same write goes through.
    let now = sha256(edited.as_bytes());
    let written = promote::write_atomically(&file, plan.new_text.as_bytes(), &now).unwrap();
    assert_eq!(hex(&written), file_sha(&file));
}

// --- diff --------------------------------------------------------------------------------

#[test]
fn diff_shows_promotable_settings_side_by_side_and_writes_nothing() {
    let (_dir, file) = fixture(STYLES);
    let before = file_sha(&file);
    let run = diff(&file, "development", "qa");
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(file_sha(&file), before);
    let lines: Vec<&str> = run.stdout.lines().collect();
    let row = |setting: &str| {
        *lines
            .iter()
            .find(|l| l[2..].starts_with(&format!("{setting} ")))
            .unwrap_or_else(|| panic!("no row {setting}: {run:?}"))
    };
    let header: Vec<&str> = lines[0].split('|').map(str::trim).collect();
    assert_eq!(header, ["setting", "development", "qa"], "{run:?}");
    assert!(row("connect_timeout").starts_with("* "), "{run:?}");
    let cells: Vec<&str> = row("connect_timeout").split('|').map(str::trim).collect();
    assert_eq!(cells, ["* connect_timeout", "\"1s\"", "\"2s\""], "{run:?}");
    assert!(
        row("rate_limit.per_key.per").starts_with("  "),
        "equal rows unmarked"
    );
    assert!(row("policy.deny_paths").contains("(unset)"), "{run:?}");
    assert!(row("policy.request_headers.set.x-tenant").starts_with("* "));
    assert!(
        !run.stdout.contains("upstream")
            || run
                .stdout
                .contains("upstreams and hosts are never promoted")
    );
    assert!(
        !run.stdout.contains("sha256"),
        "keys are not shown: {run:?}"
    );

    let unknown = diff(&file, "development", "nope");
    assert_eq!(unknown.code, 1, "{unknown:?}");
    assert!(
        unknown.stderr.contains("unknown environment \"nope\""),
        "{unknown:?}"
    );
}

#[test]
fn the_sample_config_promotes_and_still_checks() {
    let sample =
        fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/specter.toml")).unwrap();
    let (_dir, file) = fixture(&sample);
    for (from, to) in [("qa", "production"), ("development", "qa")] {
        let run = promote(&file, from, to, &["--apply", "--allow-removals"]);
        assert_eq!(run.code, 0, "{from} -> {to}: {run:?}");
    }
    let check = specter(&["check", "--config", file.to_str().unwrap()]);
    assert_eq!(check.code, 0, "{check:?}");
}

// --- security-relevant loosenings, --only sub-keys ------------------------------------

/// Production protects itself (HSTS, cookie stripping, allow_ips, a denied path, a body
/// limit); qa has none of it, but reads the same paths.
const GUARDED: &str = r#"[listen]
http = "127.0.0.1:0"

[environments.qa]
upstream = "http://127.0.0.1:9002"

[environments.qa.policy]
allow_paths = ["/v1/", "/v2/"]
methods = ["GET", "POST", "DELETE"]

[environments.production]
upstream = "http://127.0.0.1:9003"

[environments.production.policy]
allow_paths = ["/v1/"]
methods = ["GET", "POST"]
deny_paths = ["/v1/internal/"]
allow_ips = ["10.0.0.0/8"]
max_body = "1MiB"
request_headers = { remove = ["cookie"] }
response_headers = { set = { "strict-transport-security" = "max-age=31536000" } }
"#;

#[test]
fn loosening_promotions_are_named_and_refused_without_allow_removals() {
    let (_dir, file) = fixture(GUARDED);
    let before = file_sha(&file);
    let dry = promote(&file, "qa", "production", &["--only", "policy"]);
    assert_eq!(dry.code, 2, "{dry:?}");
    let block = dry
        .stdout
        .split_once("SECURITY-RELEVANT")
        .unwrap_or_else(|| panic!("no security block: {dry:?}"))
        .1;
    for named in [
        "policy.response_headers.set.strict-transport-security",
        "policy.request_headers.remove",
        "\"cookie\"",
        "policy.allow_ips",
        "policy.deny_paths",
        "policy.max_body",
        "policy.methods",
        "\"DELETE\"",
    ] {
        assert!(block.contains(named), "{named} not named: {dry:?}");
    }
    assert!(
        !block.contains("allow_paths"),
        "allow_paths widening is not listed: {dry:?}"
    );

    let refused = promote(&file, "qa", "production", &["--only", "policy", "--apply"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(refused.stderr.contains("--allow-removals"), "{refused:?}");
    assert!(refused.stderr.contains("policy.allow_ips"), "{refused:?}");
    assert_eq!(file_sha(&file), before, "nothing written");

    let allowed = promote(
        &file,
        "qa",
        "production",
        &["--only", "policy", "--apply", "--allow-removals"],
    );
    assert_eq!(allowed.code, 0, "{allowed:?}");
    assert!(allowed.stdout.contains("policy.allow_ips"), "{allowed:?}");
    let prod = env_table(&fs::read_to_string(&file).unwrap(), "production");
    assert!(!prod["policy"].as_table().unwrap().contains_key("allow_ips"));
}

#[test]
fn only_accepts_one_key_inside_a_group() {
    let (_dir, file) = fixture(GUARDED);
    let run = promote(
        &file,
        "qa",
        "production",
        &["--only", "policy.allow_paths", "--apply"],
    );
    assert_eq!(run.code, 0, "allow_paths alone is no loosening: {run:?}");
    let new = fs::read_to_string(&file).unwrap();
    let policy = env_table(&new, "production")["policy"]
        .as_table()
        .unwrap()
        .clone();
    let qa = env_table(&new, "qa")["policy"].as_table().unwrap().clone();
    assert_eq!(policy["allow_paths"], qa["allow_paths"]);
    // Everything else of production's policy stays as it was.
    let before = env_table(GUARDED, "production")["policy"]
        .as_table()
        .unwrap()
        .clone();
    for kept in [
        "methods",
        "deny_paths",
        "allow_ips",
        "max_body",
        "request_headers",
        "response_headers",
    ] {
        assert_eq!(policy[kept], before[kept], "{kept} changed:\n{new}");
    }
    assert!(new.contains("deny_paths = [\"/v1/internal/\"]"), "{new}");

    let typo = promote(&file, "qa", "production", &["--only", "policy.alow_paths"]);
    assert_eq!(typo.code, 1, "{typo:?}");
    assert!(typo.stderr.contains("policy.alow_paths"), "{typo:?}");
    let bad = promote(&file, "qa", "production", &["--only", "keys.id"]);
    assert_eq!(bad.code, 1, "{bad:?}");
}
