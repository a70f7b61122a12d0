//! The command line as an operator meets it: defaults from the environment, help on
//! every argument, tools that accept what the gateway prints, files never clobbered,
//! and startup errors in the log format asked for.

mod common;

use common::*;

const QA: &str = "[environments.qa]\nupstream = \"http://127.0.0.1:9001\"\n";

fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("specter.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

#[test]
fn specter_config_sets_the_default_config_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("[listen]\nhttp = \"127.0.0.1:0\"\n\n{QA}"),
    );
    let run = run_specter_env(&["check"], None, &[("SPECTER_CONFIG", &path)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.contains(&path), "{run:?}");
    // Every command that reads the config takes it from there, the key editors too.
    let run = run_specter_env(&["keys", "list"], None, &[("SPECTER_CONFIG", &path)]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        !run.stdout.contains("alice-laptop"),
        "listed config/specter.toml: {run:?}"
    );
    // --config still wins over the variable.
    let run = run_specter_env(
        &["check", "--config", "config/specter.toml"],
        None,
        &[("SPECTER_CONFIG", "/nonexistent.toml")],
    );
    assert!(!run.stderr.contains("nonexistent"), "{run:?}");
}

/// Every option of every subcommand says what it is for.
#[test]
fn every_argument_has_help_text() {
    for command in [
        &["run"][..],
        &["check"],
        &["demo"],
        &["promote"],
        &["diff"],
        &["certs", "dev"],
        &["keys", "new"],
        &["keys", "hash"],
        &["keys", "usage"],
        &["keys", "add"],
        &["keys", "revoke"],
        &["keys", "rotate"],
        &["keys", "list"],
        &["completions"],
        &["manpage"],
    ] {
        let mut args = command.to_vec();
        args.push("--help");
        let run = run_specter(&args, None);
        assert_eq!(run.code, 0, "{run:?}");
        let lines: Vec<&str> = run.stdout.lines().map(str::trim_start).collect();
        for (i, line) in lines.iter().enumerate() {
            if !line.starts_with('-') && !line.starts_with('<') {
                continue;
            }
            // clap puts the help beside the flag, or on the next line when long.
            let (flag, beside) = line.split_once("  ").unwrap_or((line, ""));
            let help = match beside.trim() {
                "" => lines.get(i + 1).copied().unwrap_or(""),
                text => text,
            };
            assert!(
                !help.is_empty() && !help.starts_with(['[', '-', '<']),
                "{command:?}: {flag} has no help text:\n{}",
                run.stdout
            );
        }
    }
}

#[tokio::test]
async fn keys_usage_takes_the_printed_url_or_the_config_and_names_what_it_cannot_reach() {
    let up = Upstream::start("qa").await;
    let gw = TestGateway::start(&single_environment(
        "qa",
        &up,
        "",
        "usage-key",
        "spk_qa_usage",
    ))
    .await;
    let admin = gw.admin.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmin = \"{admin}\"\n\n{QA}"),
    );
    let url = format!("http://{admin}");
    let unreachable = free_addr().to_string();
    let runs = tokio::task::spawn_blocking(move || {
        [
            run_specter(&["keys", "usage", "--admin", &url], None),
            run_specter(&["keys", "usage", "--config", &config], None),
            run_specter(&["keys", "usage", "--admin", &unreachable], None),
            run_specter(&["keys", "usage", "--admin", "https://127.0.0.1:1"], None),
        ]
        .map(|r| (r, unreachable.clone()))
    })
    .await
    .unwrap();
    for (run, _) in &runs[..2] {
        assert_eq!(run.code, 0, "{run:?}");
        assert!(run.stdout.contains("usage-key"), "{run:?}");
    }
    let (run, unreachable) = &runs[2];
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains(unreachable.as_str()), "{run:?}");
    let (run, _) = &runs[3];
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("plain http"), "{run:?}");
}

#[test]
fn certs_dev_never_overwrites_without_force_and_explains_a_file_as_out() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    let out = out.to_str().unwrap();
    assert_eq!(run_specter(&["certs", "dev", "--out", out], None).code, 0);
    let key = std::path::Path::new(out).join("localhost.key");
    let before = std::fs::read(&key).unwrap();
    let again = run_specter(&["certs", "dev", "--out", out], None);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(again.stderr.contains("--force"), "{again:?}");
    assert_eq!(std::fs::read(&key).unwrap(), before, "the key was replaced");
    let forced = run_specter(&["certs", "dev", "--out", out, "--force"], None);
    assert_eq!(forced.code, 0, "{forced:?}");
    assert_ne!(std::fs::read(&key).unwrap(), before);

    // An existing file, and a name that reads like one (it would become a directory).
    for file in ["localhost.pem", "new.pem"] {
        let file = std::path::Path::new(out).join(file);
        let run = run_specter(&["certs", "dev", "--out", file.to_str().unwrap()], None);
        assert_eq!(run.code, 1, "{run:?}");
        assert!(run.stderr.contains("names a file"), "{run:?}");
        assert!(run.stderr.contains("directory"), "{run:?}");
        assert!(!file.is_dir(), "{run:?}");
    }
}

#[test]
fn startup_config_errors_are_json_under_log_format_json() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("[listen]\nhttp = \"127.0.0.1:0\"\nadmn = \"x\"\n\n{QA}hostz = []\n"),
    );
    let run = run_specter(&["--log-format", "json", "run", "--config", &path], None);
    assert_eq!(run.code, 1, "{run:?}");
    let lines: Vec<&str> = run.stderr.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 2, "{run:?}");
    for line in lines {
        let record: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\n{run:?}"));
        assert_eq!(record["level"], "ERROR", "{record}");
        assert_eq!(record["file"], path.as_str(), "{record}");
        assert!(record["line"].as_u64().is_some(), "{record}");
        assert!(
            record["message"]
                .as_str()
                .unwrap()
                .contains("unknown field"),
            "{record}"
        );
    }
}

/// From the demo to a config of one's own: `demo --write-config` writes a config that
/// `check` accepts and plaintext keys only its owner can read; with the echo backends of
/// `demo --backends-only` behind it, `run` serves each environment's key a 200.
#[tokio::test]
async fn the_written_demo_config_checks_and_serves() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine");
    let out_arg = out.to_str().unwrap().to_owned();
    let written = run_specter(&["demo", "--write-config", &out_arg], None);
    assert_eq!(written.code, 0, "{written:?}");
    assert!(written.stdout.contains("--backends-only"), "{written:?}");
    let again = run_specter(&["demo", "--write-config", &out_arg], None);
    assert_eq!(again.code, 1, "never overwrites without --force: {again:?}");
    let keys_file = out.join("keys.txt");
    let mode = std::fs::metadata(&keys_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let config = out.join("specter.toml");
    let check = run_specter(&["check", "--config", config.to_str().unwrap()], None);
    assert_eq!(check.code, 0, "{check:?}");
    let keys: Vec<(String, String)> = std::fs::read_to_string(&keys_file)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_owned(), f[2].to_owned())
        })
        .collect();
    assert_eq!(keys.len(), 3, "{keys:?}");
    let text = std::fs::read_to_string(&config).unwrap();
    for (_, key) in &keys {
        assert!(
            !text.contains(key.as_str()),
            "a plaintext key in the config"
        );
    }

    let mut backends = Child(
        Command::new(specter_bin())
            .args(["demo", "--backends-only", "--backend-port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut lines = BufReader::new(backends.0.stdout.take().unwrap()).lines();
    let mut text = text;
    for (i, line) in lines.by_ref().take(3).enumerate() {
        let line = line.unwrap();
        let addr = line.split("http://").nth(1).unwrap().trim();
        text = text.replace(&format!("127.0.0.1:{}", 9001 + i), addr);
    }
    let running = on_free_ports(|http, admin| {
        let text = text
            .replace("127.0.0.1:8080", &http.to_string())
            .replace("127.0.0.1:9901", &admin.to_string());
        std::fs::write(&config, text).unwrap();
        let config = config.clone();
        async move {
            let mut child = Child(
                Command::new(specter_bin())
                    .args(["run", "--config", config.to_str().unwrap()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap(),
            );
            let c = client();
            let up = poll_until(std::time::Duration::from_secs(10), || {
                let c = c.clone();
                async move {
                    c.get(format!("http://{admin}/readyz").parse().unwrap())
                        .await
                        .is_ok_and(|r| r.status() == 200)
                }
            })
            .await;
            if up {
                return Ok((child, http));
            }
            let _ = child.0.kill();
            let mut log = String::new();
            if let Some(mut stderr) = child.0.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut stderr, &mut log);
            }
            Err(log)
        }
    })
    .await;
    let (_gateway, http) = running;
    let c = client();
    for (env, key) in &keys {
        let answer = get(
            &c,
            &format!("http://{http}/v1/hello"),
            &[("x-api-key", key)],
        )
        .await;
        assert_eq!(answer.status, 200, "{env}: {}", answer.text());
        assert_eq!(answer.json()["environment"], env.as_str());
    }
    drop(backends);
}

#[test]
fn completions_and_manpage_are_generated() {
    for shell in ["bash", "zsh", "fish"] {
        let run = run_specter(&["completions", shell], None);
        assert_eq!(run.code, 0, "{run:?}");
        for word in ["promote", "allow-removals", "write-config"] {
            assert!(run.stdout.contains(word), "{shell} lacks {word}: {run:?}");
        }
    }
    // bash is always here: the script must at least parse.
    let script = run_specter(&["completions", "bash"], None).stdout;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("specter.bash");
    std::fs::write(&path, script).unwrap();
    let parsed = std::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .unwrap();
    assert!(parsed.success(), "bash -n rejects the completion script");

    let man = run_specter(&["manpage"], None);
    assert_eq!(man.code, 0, "{man:?}");
    assert!(man.stdout.contains(".TH specter 1"), "{man:?}");
    for word in ["promote", "completions", "SPECTER_CONFIG"] {
        assert!(man.stdout.contains(word), "the man page lacks {word}");
    }
}

const GUARDED_POLICY: &str = "[environments.qa.policy]\nmethods = [\"GET\", \"POST\"]\nallow_paths = [\"/v1/\"]\ndeny_paths = [\"/v1/internal/\"]\nallow_ips = [\"10.0.0.0/8\"]\nmax_body = \"1MiB\"\nrequest_headers = { set = { \"x-upstream-token\" = \"s3cret-token\" }, remove = [\"cookie\"] }\nresponse_headers = { set = { \"strict-transport-security\" = \"max-age=31536000\" } }\n";

/// `/config` and `check --explain` show what each environment enforces, without the
/// values of request headers it sets (often the upstream's credentials).
#[tokio::test]
async fn config_and_explain_show_each_environments_policy() {
    let up = Upstream::start("qa").await;
    let body = format!(
        "{}{GUARDED_POLICY}",
        single_environment("qa", &up, "", "k", "spk_qa_k")
    );
    let gw = TestGateway::start(&body).await;
    let c = client();
    let config = get(&c, &format!("http://{}/config", gw.admin.unwrap()), &[]).await;
    let text = config.text();
    assert!(!text.contains("s3cret-token"), "{text}");
    let policy = &config.json()["environments"][0]["policy"];
    assert_eq!(
        policy["methods"],
        serde_json::json!(["GET", "POST"]),
        "{policy}"
    );
    assert_eq!(policy["deny_paths"][0], "/v1/internal", "{policy}");
    assert_eq!(
        policy["allow_ips"],
        serde_json::json!(["10.0.0.0/8"]),
        "{policy}"
    );
    assert_eq!(policy["max_body"], "1.0 MiB", "{policy}");
    assert_eq!(
        policy["request_headers"]["remove"],
        serde_json::json!(["cookie"])
    );
    assert!(policy["request_headers"]["set"]["x-upstream-token"].is_string());
    assert_eq!(
        policy["response_headers"]["set"]["strict-transport-security"],
        "max-age=31536000"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &format!("[listen]\nhttp = \"127.0.0.1:0\"\n\n{body}"),
    );
    let run = run_specter(&["check", "--config", &path, "--explain"], None);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(!run.stdout.contains("s3cret-token"), "{run:?}");
    for shown in [
        "methods   : GET, POST",
        "deny      : /v1/internal",
        "client IPs: 10.0.0.0/8",
        "max body  : 1.0 MiB",
        "remove cookie",
        "strict-transport-security: max-age=31536000",
        "x-upstream-token",
    ] {
        assert!(run.stdout.contains(shown), "{shown:?} missing: {run:?}");
    }
}

/// Ejection and recovery of an upstream are both logged, naming the environment and
/// the upstream.
#[tokio::test]
async fn upstream_ejection_and_recovery_are_logged_by_name() {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let upstream = free_addr();
    let log = dir.path().join("specter.log");
    let (_gateway, http) = on_free_ports(|http, admin| {
        let path = write_config(
            dir.path(),
            &format!(
                "[listen]\nhttp = \"{http}\"\nadmin = \"{admin}\"\n\n[environments.qa]\nupstream = \"http://{upstream}\"\n{}",
                key_block("qa", "k", "spk_qa_k")
            ),
        );
        let log = log.clone();
        async move {
            let child = Child(
                Command::new(specter_bin())
                    .args(["--log-format", "json", "run", "--config", &path])
                    .env_remove("RUST_LOG")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let c = client();
            let up = poll_until(Duration::from_secs(10), || {
                let c = c.clone();
                async move {
                    c.get(format!("http://{admin}/readyz").parse().unwrap())
                        .await
                        .is_ok_and(|r| r.status() == 200)
                }
            })
            .await;
            match up {
                true => Ok((child, http)),
                false => Err(std::fs::read_to_string(&log).unwrap_or_default()),
            }
        }
    })
    .await;
    let c = client();
    let key = [("x-api-key", "spk_qa_k")];
    let url = format!("http://{http}/");
    for _ in 0..3 {
        get(&c, &url, &key)
            .await
            .assert_error(502, "upstream_unavailable");
    }
    let logged = |what: &'static str| {
        let log = log.clone();
        let name = format!("http://{upstream}");
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains(what) && l.contains(&name) && l.contains("\"environment\":\"qa\"")
                })
        }
    };
    assert!(
        poll_until(Duration::from_secs(5), || logged("upstream ejected")).await,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    specter::commands::demo::echo_upstream_at("qa", upstream)
        .await
        .unwrap();
    let back = poll_until(Duration::from_secs(10), || {
        let (c, url) = (c.clone(), url.clone());
        async move { get(&c, &url, &key).await.status == 200 }
    })
    .await;
    assert!(back, "the upstream never came back into rotation");
    assert!(
        poll_until(Duration::from_secs(5), || logged(
            "upstream back in rotation"
        ))
        .await,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// A certificate file is logged by name when loaded, and again when replaced on disk
/// (the watcher reloads it), with its expiry.
#[tokio::test]
async fn certificate_loads_and_replacements_are_logged_by_name() {
    use std::process::{Command, Stdio};
    use std::time::Duration;

    let dir = tempfile::tempdir().unwrap();
    let write_cert = || {
        let (cert, key) = specter::commands::certs::self_signed().unwrap();
        specter::commands::certs::write_pair(dir.path(), "server", &cert, &key).unwrap()
    };
    let (cert, key) = write_cert();
    let log = dir.path().join("specter.log");
    let _gateway = on_free_ports(|http, admin| {
        let path = write_config(
            dir.path(),
            &format!(
                "[listen]\nhttp = \"{http}\"\nhttps = \"127.0.0.1:0\"\nadmin = \"{admin}\"\n\n[tls]\n[[tls.certificates]]\ncert = {cert:?}\nkey = {key:?}\n\n{QA}"
            ),
        );
        let log = log.clone();
        async move {
            let child = Child(
                Command::new(specter_bin())
                    .args(["--log-format", "json", "run", "--config", &path])
                    .env_remove("RUST_LOG")
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .unwrap(),
            );
            let c = client();
            let up = poll_until(Duration::from_secs(10), || {
                let c = c.clone();
                async move {
                    c.get(format!("http://{admin}/readyz").parse().unwrap())
                        .await
                        .is_ok_and(|r| r.status() == 200)
                }
            })
            .await;
            match up {
                true => Ok(child),
                false => Err(std::fs::read_to_string(&log).unwrap_or_default()),
            }
        }
    })
    .await;
    let logged = |what: &'static str| {
        let (log, name) = (log.clone(), cert.display().to_string());
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .any(|l| {
                    l.contains(&format!("\"message\":\"{what}\""))
                        && l.contains(&name)
                        && l.contains("not_after")
                })
        }
    };
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged("certificate loaded").await, "{}", text());
    write_cert();
    assert!(
        poll_until(Duration::from_secs(10), || logged("certificate reloaded")).await,
        "{}",
        text()
    );
}
