//! `specter check`: validate a config without serving, like `nginx -t`.

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use crate::config::{self, CheckOptions, Config};

/// Prints problems to stderr (`file:line:col: message`) and returns the exit code:
/// 0 when valid (warnings never change it), 1 when not.
pub fn run(
    path: &Path,
    explain: bool,
    expiry_warning: Duration,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> i32 {
    let options = CheckOptions {
        now: SystemTime::now(),
        expiry_warning,
    };
    match config::load_with(path, options) {
        Ok(loaded) => {
            for w in &loaded.warnings {
                let _ = writeln!(err, "{w}");
            }
            let c = &loaded.config;
            let keys: usize = c.environments.iter().map(|e| e.keys.len()).sum();
            let _ = writeln!(
                out,
                "{}: ok ({} environments, {keys} keys, {} warnings)",
                path.display(),
                c.environments.len(),
                loaded.warnings.len()
            );
            if explain {
                let _ = write!(out, "{}", explain_report(c));
            }
            0
        }
        Err(errors) => {
            let _ = writeln!(err, "{errors}");
            1
        }
    }
}

/// The isolation report: per environment, where its traffic goes and who may send it.
pub fn explain_report(c: &Config) -> String {
    let mut s = String::new();
    for e in &c.environments {
        let ups: Vec<String> = e
            .upstreams
            .iter()
            .map(|u| {
                format!(
                    "{}:{}{}",
                    u.host,
                    u.port,
                    if u.tls { " (https)" } else { "" }
                )
            })
            .collect();
        let hosts = if e.hosts.is_empty() {
            "any".to_owned()
        } else {
            e.hosts.join(", ")
        };
        let quota = |q: &Option<crate::config::QuotaConfig>| match q {
            Some(q) => format!(
                "{}/{} burst {}",
                q.requests,
                humantime::format_duration(q.per),
                q.burst
            ),
            None => "none".to_owned(),
        };
        s.push_str(&format!("\n[{}]\n", e.name));
        s.push_str(&format!("  upstreams : {}\n", ups.join(", ")));
        s.push_str(&format!("  hosts     : {hosts}\n"));
        s.push_str(&format!("  keys      : {}\n", e.keys.len()));
        s.push_str(&format!(
            "  timeouts  : connect {}, request {}\n",
            humantime::format_duration(e.connect_timeout),
            humantime::format_duration(e.request_timeout)
        ));
        s.push_str(&format!(
            "  limits    : per key {}, total {}\n",
            quota(&e.rate_limit.per_key),
            quota(&e.rate_limit.total)
        ));
        for line in crate::config::policy_view::explain_lines(&e.policy) {
            s.push_str(&line);
            s.push('\n');
        }
        let shares = if e.shares_upstream_with.is_empty() {
            "none (backend is its own)".to_owned()
        } else {
            e.shares_upstream_with.join(", ")
        };
        s.push_str(&format!("  shares upstream with: {shares}\n"));
    }
    s
}
