//! What promotion prints besides the diff (`edit::unified_diff`): a one-line summary
//! and the side-by-side table of `specter diff`.

use super::Setting;

/// e.g. `3 settings change, 1 removed; keys, upstreams, hosts untouched`.
pub(super) fn summary(changes: &[Setting]) -> String {
    let removed = changes.iter().filter(|c| c.right.is_none()).count();
    let changed = changes.len() - removed;
    let mut parts = Vec::new();
    if changed > 0 {
        let noun = if changed == 1 {
            "setting changes"
        } else {
            "settings change"
        };
        parts.push(format!("{changed} {noun}"));
    }
    if removed > 0 {
        let noun = if changed > 0 {
            ""
        } else if removed == 1 {
            " setting"
        } else {
            " settings"
        };
        parts.push(format!("{removed}{noun} removed"));
    }
    if parts.is_empty() {
        parts.push("nothing changes".to_owned());
    }
    format!("{}; keys, upstreams, hosts untouched", parts.join(", "))
}

/// A two-column table, setting | A | B, with `*` in front of the rows that differ.
pub(super) fn side_by_side(settings: &[Setting], a: &str, b: &str) -> String {
    if settings.is_empty() {
        return format!(
            "neither {a} nor {b} sets any promotable setting (rate_limit, policy, timeouts)\n"
        );
    }
    let cell = |v: &Option<toml::Value>| v.as_ref().map_or("(unset)".to_owned(), |v| v.to_string());
    let rows: Vec<(bool, &str, String, String)> = settings
        .iter()
        .map(|s| (s.differs(), s.path.as_str(), cell(&s.left), cell(&s.right)))
        .collect();
    let w_path = rows
        .iter()
        .map(|r| r.1.chars().count())
        .max()
        .unwrap_or(0)
        .max("setting".len());
    let w_a = rows
        .iter()
        .map(|r| r.2.chars().count())
        .max()
        .unwrap_or(0)
        .max(a.chars().count());
    let line = |mark: &str, path: &str, l: &str, r: &str| {
        format!("{mark} {path:<w_path$} | {l:<w_a$} | {r}")
            .trim_end()
            .to_owned()
            + "\n"
    };
    let mut s = line(" ", "setting", a, b);
    for (differs, path, l, r) in &rows {
        s.push_str(&line(if *differs { "*" } else { " " }, path, l, r));
    }
    let differing = rows.iter().filter(|r| r.0).count();
    s.push_str(&format!(
        "\n{differing} of {} settings differ (marked *); keys, upstreams and hosts are never promoted and not shown\n",
        rows.len()
    ));
    s
}

/// One `  - path: what` line per loosened setting.
pub(super) fn loosenings(list: &[super::loosening::Loosening]) -> String {
    list.iter()
        .map(|l| format!("  - {}: {}", l.path, l.what))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The block a dry run (and an `--allow-removals` apply) prints after the diff.
pub(super) fn loosening_block(to: &str, list: &[super::loosening::Loosening]) -> String {
    format!(
        "\nSECURITY-RELEVANT: this loosens {} setting(s) of {to}; --apply refuses it without --allow-removals:\n{}\n\n",
        list.len(),
        loosenings(list)
    )
}
