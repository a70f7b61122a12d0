//! `specter promote` and `specter diff`: lay one environment's promotable settings
//! (`rate_limit`, `policy`, timeouts) onto another, never its keys, upstreams or hosts.
//!
//! The edit is made with `toml_edit` on the file's own text, so everything outside the
//! promoted keys of `[environments.TO]` survives byte for byte, comments included. The
//! result goes through the same validation as `specter check` before anything is
//! written, and the write is atomic (temp file + rename) so a running gateway's watcher
//! only ever sees the old file or the whole new one.
//!
//! Reading, validating, diffing and the atomic write are `commands::edit`, shared with
//! `specter keys`.
//!
//! - `document`: settings as comparable leaves; the edit itself
//! - `render`: summary line, side-by-side table
//! - `loosening`: the changes that weaken a security-relevant setting

mod document;
pub mod loosening;
mod render;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use toml_edit::DocumentMut;

use super::edit::{self, EditError};
use crate::digest::hex;

pub use edit::{read_config, write_atomically};

/// A group of settings that promotion carries from one environment to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Group {
    Timeouts,
    RateLimit,
    Policy,
}

impl Group {
    pub const ALL: [Group; 3] = [Group::Timeouts, Group::RateLimit, Group::Policy];

    /// The keys of an environment table that belong to this group.
    fn keys(self) -> &'static [&'static str] {
        match self {
            Group::Timeouts => &["connect_timeout", "request_timeout"],
            Group::RateLimit => &["rate_limit"],
            Group::Policy => &["policy"],
        }
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Group::Timeouts => "timeouts",
            Group::RateLimit => "rate_limit",
            Group::Policy => "policy",
        })
    }
}

impl FromStr for Group {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "timeouts" => Ok(Group::Timeouts),
            "rate_limit" => Ok(Group::RateLimit),
            "policy" => Ok(Group::Policy),
            other => Err(format!(
                "\"{other}\" is not a promotable group; use rate_limit, policy or timeouts"
            )),
        }
    }
}

/// What `--only` names: a whole group, or one key inside `rate_limit` or `policy`
/// (`policy.allow_paths`, `rate_limit.per_key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Only {
    Group(Group),
    Key { group: Group, key: String },
}

impl fmt::Display for Only {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Only::Group(g) => write!(f, "{g}"),
            Only::Key { group, key } => write!(f, "{group}.{key}"),
        }
    }
}

impl FromStr for Only {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((group, key)) = s.trim().split_once('.') else {
            return s.parse().map(Only::Group);
        };
        let group: Group = group.parse()?;
        let valid_key = !key.is_empty()
            && key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        match group {
            Group::RateLimit | Group::Policy if valid_key => Ok(Only::Key {
                group,
                key: key.to_owned(),
            }),
            _ => Err(format!(
                "\"{s}\" is not promotable; name a group (rate_limit, policy, timeouts) or one key inside rate_limit or policy, e.g. policy.allow_paths"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("\"{0}\" is both FROM and TO; name two different environments")]
    SameEnvironment(String),
    #[error(
        "promoting {from} onto {to} loosens security-relevant settings of {to}, so nothing was written:\n{}\nreview them, then run again with --allow-removals",
        render::loosenings(list)
    )]
    Loosens {
        from: String,
        to: String,
        list: Vec<loosening::Loosening>,
    },
    #[error("neither {from} nor {to} sets {only}; check its spelling")]
    NothingSelected {
        from: String,
        to: String,
        only: String,
    },
    #[error(transparent)]
    Edit(#[from] EditError),
}

/// One promotable setting (a leaf such as `rate_limit.per_key.burst`) in two
/// environments; `None` where an environment does not set it.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub path: String,
    pub left: Option<toml::Value>,
    pub right: Option<toml::Value>,
}

impl Setting {
    pub fn differs(&self) -> bool {
        self.left != self.right
    }
}

/// What promoting FROM onto TO does to the file, computed without touching it.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub from: String,
    pub to: String,
    /// Settings that differ: `left` is TO now, `right` is FROM (TO afterwards).
    pub changes: Vec<Setting>,
    pub old_text: String,
    pub new_text: String,
    /// The changes that weaken a security-relevant setting of TO.
    pub loosenings: Vec<loosening::Loosening>,
}

impl Promotion {
    /// One line, e.g. `3 settings change, 1 removed; keys, upstreams, hosts untouched`.
    pub fn summary(&self) -> String {
        render::summary(&self.changes)
    }

    /// Line-based unified diff of the config file, old against new.
    pub fn unified_diff(&self, path: &Path, colour: bool) -> String {
        let label = format!("(after promoting {} onto {})", self.from, self.to);
        edit::unified_diff(&self.old_text, &self.new_text, path, &label, colour)
    }
}

/// Promotes `groups` of environment `from` onto `to` in config `text` (read from
/// `path`, which names it in errors). The new text has passed `specter check`'s
/// validation whenever it differs from the old.
pub fn plan(
    text: &str,
    path: &Path,
    from: &str,
    to: &str,
    groups: &[Group],
) -> Result<Promotion, PromoteError> {
    let only: Vec<Only> = groups.iter().copied().map(Only::Group).collect();
    plan_only(text, path, from, to, &only)
}

/// [`plan`] for groups and single keys inside them.
pub fn plan_only(
    text: &str,
    path: &Path,
    from: &str,
    to: &str,
    only: &[Only],
) -> Result<Promotion, PromoteError> {
    if from == to {
        return Err(PromoteError::SameEnvironment(from.to_owned()));
    }
    let (mut doc, ends) = edit::document::parse(text, path)?;
    let source = environment(&doc, from, path)?.clone();
    let target = environment(&doc, to, path)?;
    let groups: Vec<Group> = only
        .iter()
        .filter_map(|o| match o {
            Only::Group(g) => Some(*g),
            Only::Key { .. } => None,
        })
        .collect();
    let mut changes: Vec<Setting> = document::compare(target, &source, &keys(&groups));
    let (rows, wanted_source) = single_keys(target, &source, only, &groups).map_err(|only| {
        PromoteError::NothingSelected {
            from: from.to_owned(),
            to: to.to_owned(),
            only,
        }
    })?;
    changes.extend(rows);
    changes.retain(Setting::differs);
    let target = edit::document::environment_mut(&mut doc, to).expect("looked up above");
    for key in keys(&groups) {
        document::sync(target, &source, key);
    }
    for o in only {
        match o {
            Only::Key { group, .. } if !groups.contains(group) => {
                document::sync(target, &wanted_source, group.keys()[0]);
            }
            _ => {}
        }
    }
    let new_text = if changes.is_empty() {
        text.to_owned()
    } else {
        ends.render(&doc)
    };
    if new_text != text {
        let action = || format!("promoting {from} onto {to}");
        edit::validate(&new_text, text, path, action, "promotion")?;
    }
    Ok(Promotion {
        from: from.to_owned(),
        to: to.to_owned(),
        loosenings: loosening::find(&changes),
        changes,
        old_text: text.to_owned(),
        new_text,
    })
}

/// For the `--only` keys inside groups not promoted whole: their settings in both
/// environments, and TO's environment with FROM's values for them (the source that
/// syncs those keys and nothing else). Errs with the key that neither sets.
fn single_keys(
    target: &toml_edit::Item,
    source: &toml_edit::Item,
    only: &[Only],
    whole: &[Group],
) -> Result<(Vec<Setting>, toml_edit::Item), String> {
    let mut rows = Vec::new();
    let mut wanted = target.clone();
    for o in only {
        let Only::Key { group, key } = o else {
            continue;
        };
        if whole.contains(group) {
            continue;
        }
        let top = group.keys()[0];
        let prefix = format!("{top}.{key}");
        let before = rows.len();
        rows.extend(
            document::compare(target, source, &[top])
                .into_iter()
                .filter(|s| s.path == prefix || s.path.starts_with(&format!("{prefix}."))),
        );
        if rows.len() == before {
            return Err(o.to_string());
        }
        document::take_key(&mut wanted, source, top, key);
    }
    Ok((rows, wanted))
}

/// Every promotable setting of `a` (left) and `b` (right), in group order.
pub fn compare(text: &str, path: &Path, a: &str, b: &str) -> Result<Vec<Setting>, PromoteError> {
    let (doc, _) = edit::document::parse(text, path)?;
    let (left, right) = (environment(&doc, a, path)?, environment(&doc, b, path)?);
    Ok(document::compare(left, right, &keys(&Group::ALL)))
}

/// The side-by-side table printed by `specter diff`.
pub fn side_by_side(settings: &[Setting], a: &str, b: &str) -> String {
    render::side_by_side(settings, a, b)
}

/// How a `specter promote` run ended (errors aside).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TO already matches FROM; nothing written.
    InSync,
    /// Dry run: the diff was printed, nothing written.
    WouldChange,
    /// The new file was written.
    Applied,
}

impl Outcome {
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::InSync | Outcome::Applied => 0,
            Outcome::WouldChange => 2,
        }
    }
}

/// What `specter promote` was asked to do.
#[derive(Debug, Clone)]
pub struct PromoteRequest<'a> {
    pub config: &'a Path,
    pub from: &'a str,
    pub to: &'a str,
    /// Empty means every group.
    pub only: &'a [Only],
    pub apply: bool,
    /// Apply even when security-relevant settings are loosened.
    pub allow_removals: bool,
    /// ANSI colours in the diff (only when stdout is a terminal).
    pub colour: bool,
}

/// `specter promote`: prints the diff (dry run) or writes the file (`apply`).
pub fn run(
    req: &PromoteRequest<'_>,
    out: &mut dyn std::io::Write,
) -> Result<Outcome, PromoteError> {
    let (text, digest) = read_config(req.config)?;
    let all: Vec<Only> = Group::ALL.into_iter().map(Only::Group).collect();
    let only = if req.only.is_empty() { &all } else { req.only };
    let p = plan_only(&text, req.config, req.from, req.to, only)?;
    if p.changes.is_empty() {
        let names: Vec<String> = only.iter().map(Only::to_string).collect();
        let _ = writeln!(
            out,
            "{} already matches {} ({}); nothing to change",
            p.to,
            p.from,
            names.join(", ")
        );
        return Ok(Outcome::InSync);
    }
    if !req.apply {
        let _ = write!(out, "{}", p.unified_diff(req.config, req.colour));
        if !p.loosenings.is_empty() {
            let _ = write!(out, "{}", render::loosening_block(&p.to, &p.loosenings));
        }
        let _ = writeln!(out, "{}", p.summary());
        let _ = writeln!(out, "dry run: nothing written; add --apply to write it");
        return Ok(Outcome::WouldChange);
    }
    if !p.loosenings.is_empty() && !req.allow_removals {
        return Err(PromoteError::Loosens {
            from: p.from,
            to: p.to,
            list: p.loosenings,
        });
    }
    if !p.loosenings.is_empty() {
        let _ = write!(out, "{}", render::loosening_block(&p.to, &p.loosenings));
    }
    let written = write_atomically(req.config, p.new_text.as_bytes(), &digest)?;
    let _ = writeln!(
        out,
        "promoted {} onto {} in {}: {}",
        p.from,
        p.to,
        req.config.display(),
        p.summary()
    );
    let _ = writeln!(out, "sha256 {}", hex(&written));
    Ok(Outcome::Applied)
}

/// `specter diff`: the promotable settings of two environments side by side.
pub fn run_diff(
    config: &Path,
    a: &str,
    b: &str,
    out: &mut dyn std::io::Write,
) -> Result<(), PromoteError> {
    let (text, _) = read_config(config)?;
    let settings = compare(&text, config, a, b)?;
    let _ = write!(out, "{}", side_by_side(&settings, a, b));
    Ok(())
}

fn keys(groups: &[Group]) -> Vec<&'static str> {
    let mut groups = groups.to_vec();
    groups.sort();
    groups.dedup();
    groups
        .iter()
        .flat_map(|g| g.keys().iter().copied())
        .collect()
}

fn environment<'d>(
    doc: &'d DocumentMut,
    name: &str,
    path: &Path,
) -> Result<&'d toml_edit::Item, PromoteError> {
    Ok(edit::document::require_environment(doc, name, path)?)
}
