//! contrib/ (systemd unit, Prometheus alerts, Grafana dashboard) and the README stay
//! true to the code: every metric they name exists, every metric that exists is
//! documented, every file the README points to is in the repository, and the unit and
//! the rules pass their own tools' checks where those tools are installed.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use common::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(ROOT).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn installed(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Metric names written in `text` (`specter_...`).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("specter_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// Families a running gateway exports once each kind of event happened: the names of
/// its `# TYPE` lines (a family without samples is not exported at all).
async fn exported_families() -> BTreeSet<String> {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = specter::commands::certs::self_signed().unwrap();
    let (cert, key) = specter::commands::certs::write_pair(dir.path(), "kit", &cert, &key).unwrap();
    let up = Upstream::start("qa").await;
    let gone = free_addr();
    let text = format!(
        "[listen]\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n\
         [tls]\n[[tls.certificates]]\ncert = {cert:?}\nkey = {key:?}\n\n\
         {}[environments.qa.rate_limit]\nper_key = {{ requests = 1, per = \"1m\", burst = 1 }}\n\n\
         [environments.dev]\nupstream = \"http://{gone}\"\n{}",
        single_environment("qa", &up, "", "k", "spk_qa_k"),
        key_block("dev", "d", "spk_dev_d"),
    );
    let gw = TestGateway::start(&text).await;
    let c = client();
    let qa = [("x-api-key", "spk_qa_k")];
    assert_eq!(get(&c, &gw.url("/"), &qa).await.status, 200);
    assert_eq!(get(&c, &gw.url("/"), &qa).await.status, 429);
    let dev = get(&c, &gw.url("/"), &[("x-api-key", "spk_dev_d")]).await;
    assert_eq!(dev.status, 502, "{}", dev.text());
    let text = get(&c, &format!("http://{}/metrics", gw.admin.unwrap()), &[])
        .await
        .text();
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Whether `name` (as a query writes it, e.g. `..._total`, `..._bucket`) is a sample
/// of one of `families`.
fn is_exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_total", "_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| {
                name.strip_suffix(suffix)
                    .is_some_and(|base| families.contains(base))
            })
}

#[tokio::test]
async fn dashboards_and_alerts_name_only_exported_metrics_and_the_readme_documents_all() {
    let families = exported_families().await;
    assert!(
        families.contains("specter_upstream_healthy"),
        "{families:?}"
    );
    assert!(
        families.contains("specter_tls_certificate_expiry_seconds"),
        "{families:?}"
    );
    for file in [
        "contrib/grafana/specter.json",
        "contrib/prometheus/alerts.yml",
    ] {
        let names = metric_names(&read(file));
        assert!(names.len() >= 5, "{file} names too few metrics: {names:?}");
        for name in names {
            assert!(
                is_exported(&name, &families),
                "{file} names {name}, which the gateway does not export ({families:?})"
            );
        }
    }
    let readme = read("README.md");
    for family in &families {
        assert!(
            readme.contains(family.as_str()),
            "README.md does not document {family}"
        );
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("contrib/grafana/specter.json")).expect("the dashboard is JSON");
    assert!(dashboard["panels"].as_array().is_some_and(|p| p.len() >= 6));
}

/// Links and repository paths in the README exist (it once pointed at DESIGN.md,
/// which is not in the repository).
#[test]
fn the_readme_points_only_to_files_in_the_repository() {
    let readme = read("README.md");
    let mut wanted = BTreeSet::new();
    for link in readme.split("](").skip(1) {
        let target = link.split(')').next().unwrap_or("");
        if !target.contains("://") && !target.starts_with('#') {
            wanted.insert(target.to_owned());
        }
    }
    for (i, quoted) in readme.split('`').enumerate() {
        let repo_path = ["src/", "tests/", "benches/", "config/", "contrib/", ".ci/"]
            .iter()
            .any(|dir| quoted.starts_with(dir));
        if i % 2 == 1 && !quoted.contains(' ') && (repo_path || quoted.ends_with(".md")) {
            wanted.insert(quoted.trim_end_matches('/').to_owned());
        }
    }
    for word in readme.split(|c: char| c.is_whitespace() || "()[],;:`".contains(c)) {
        if word.ends_with(".md") {
            wanted.insert(word.to_owned());
        }
    }
    assert!(wanted.contains("LICENSE"), "{wanted:?}");
    for path in wanted {
        assert!(
            Path::new(ROOT).join(&path).exists(),
            "README.md points to {path}, which is not in the repository"
        );
    }
    let license = read("LICENSE");
    assert!(license.contains("Apache License") && license.contains("Version 2.0"));
    assert!(read("Cargo.toml").contains("license = \"Apache-2.0\""));
}

#[test]
fn the_systemd_unit_reloads_on_sighup_and_is_locked_down() {
    let unit = read("contrib/systemd/specter.service");
    for directive in [
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "AmbientCapabilities=CAP_NET_BIND_SERVICE",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == directive),
            "the unit lacks {directive}"
        );
    }
    if !installed("systemd-analyze") {
        eprintln!("skipped: systemd-analyze is not installed; the unit was not verified");
        return;
    }
    // verify insists that ExecStart's binary exists: point it at the one just built.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/specter", specter_bin())).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let about_unit: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("specter.service"))
        .collect();
    assert!(
        out.status.success() && about_unit.is_empty(),
        "systemd-analyze verify:\n{stderr}"
    );
}

#[test]
fn the_alert_rules_pass_promtool() {
    if !installed("promtool") {
        eprintln!("skipped: promtool (Debian package prometheus) is not installed");
        return;
    }
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(Path::new(ROOT).join("contrib/prometheus/alerts.yml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "promtool check rules:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
