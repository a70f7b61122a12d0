//! `keys add`, `keys revoke`, `keys rotate`: edits of the config file that go through
//! `commands::edit` like `promote` does (layout kept, validated as `check` does,
//! atomic, refused when the file changed since it was read, `--dry-run` shows the
//! diff). The plaintext key goes to `out` (stdout) once the file is written, and
//! nowhere else; everything said to the operator goes to `err` (stderr).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::entries::{self, Entry, NewKey, REVOKED_BY};
use super::plan::{ConfigEdit, Plan};
use super::{environment_of, generate, when, KeysError};
use crate::config::{hex, sha256, valid_key_id};

/// Where and how a writing key command runs.
#[derive(Debug, Clone, Copy)]
pub struct EditOptions<'a> {
    pub config: &'a Path,
    /// Print the diff instead of writing.
    pub dry_run: bool,
    /// ANSI colours in the diff (only when stdout is a terminal).
    pub colour: bool,
    pub now: SystemTime,
}

/// `keys add`.
#[derive(Debug, Clone, Default)]
pub struct AddRequest<'a> {
    pub env: &'a str,
    pub id: Option<&'a str>,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// Lifetime from `not_before` (or now): another way to give `not_after`.
    pub ttl: Option<Duration>,
    /// An existing key (`--from-stdin`) instead of a minted one.
    pub key: Option<String>,
}

/// `keys add`: mints (or takes) a key and appends its hashed block to the environment.
pub fn add(
    opts: &EditOptions<'_>,
    req: &AddRequest<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), KeysError> {
    plan_add(opts, req)?.finish(opts, out, err)
}

/// What `keys add` would write, without writing it.
pub fn plan_add<'a>(opts: &EditOptions<'a>, req: &AddRequest<'_>) -> Result<Plan<'a>, KeysError> {
    let mut file = ConfigEdit::open(opts.config, req.env)?;
    let existing = file.entries();
    let id = match req.id {
        Some(id) => id.to_owned(),
        None => entries::next_numbered_id(req.env, &existing),
    };
    check_new_id(req.env, &id, &existing)?;
    let (key, minted) = match &req.key {
        Some(key) => (given_key(key, req.env)?, false),
        None => (generate(req.env), true),
    };
    let not_after = req
        .not_after
        .or_else(|| req.ttl.map(|ttl| req.not_before.unwrap_or(opts.now) + ttl));
    if let (Some(nb), Some(na)) = (req.not_before, not_after) {
        if when::floor_second(nb) >= when::floor_second(na) {
            return Err(KeysError::Window {
                not_before: when::format(nb),
                not_after: when::format(na),
            });
        }
    }
    let note = format!("added {} by specter keys add", when::format(opts.now));
    let digest = hex(&sha256(key.as_bytes()));
    file.append(
        &NewKey {
            id: &id,
            sha256_hex: &digest,
            not_before: req.not_before,
            not_after,
            note: &note,
        },
        None,
    );
    let mut said = format!("added key \"{id}\" to {}", req.env);
    said.push_str(&window_text(req.not_before, not_after));
    let action = format!("adding key \"{id}\" to {}", req.env);
    let mut plan = file.plan(action, vec![said], None);
    if minted {
        plan.key = Some(key);
    }
    Ok(plan)
}

/// `keys revoke`: the key stops working at `at` (default now) and keeps its block, with
/// a comment saying who revoked it when; or, with `remove`, its block goes.
pub fn revoke(
    opts: &EditOptions<'_>,
    env: &str,
    id: &str,
    at: Option<SystemTime>,
    remove: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), KeysError> {
    plan_revoke(opts, env, id, at, remove)?.finish(opts, out, err)
}

/// What `keys revoke` would write, without writing it.
pub fn plan_revoke<'a>(
    opts: &EditOptions<'a>,
    env: &str,
    id: &str,
    at: Option<SystemTime>,
    remove: bool,
) -> Result<Plan<'a>, KeysError> {
    let mut file = ConfigEdit::open(opts.config, env)?;
    let old = file.entry(id)?;
    let action = format!("revoking key \"{id}\" in {env}");
    if remove {
        entries::remove(file.environment_mut(), id);
        let said = format!("removed key \"{id}\" from {env}");
        return Ok(file.plan(action, vec![said], Some(id)));
    }
    let at = when::floor_second(at.unwrap_or(opts.now));
    if let Some(na) = old.not_after.filter(|na| *na <= at) {
        // Revoking never extends a key's life.
        let how = match (na <= opts.now, old.revoked) {
            (true, true) => "was revoked at",
            (true, false) => "expired at",
            (false, _) => "ends earlier, at",
        };
        let mut plan = file.plan(action, Vec::new(), Some(id));
        plan.nothing_to_do = Some(format!(
            "key \"{id}\" in {env} already {how} {}; nothing to change, nothing written",
            when::format(na)
        ));
        return Ok(plan);
    }
    let mut note = format!("revoked {} {REVOKED_BY}", when::format(opts.now));
    if let Some(na) = old.not_after {
        note.push_str(&format!("; not_after was {}", when::format(na)));
    }
    let mut key = file.key_mut(id)?;
    if let Some(nb) = old.not_before.filter(|nb| *nb >= at) {
        // A staged key that never started: not_before >= not_after would not validate,
        // and without not_before the key is simply past its end.
        key.remove("not_before");
        note.push_str(&format!("; it was staged from {}", when::format(nb)));
    }
    key.set_not_after(at, &note);
    let when_text = if at <= when::floor_second(opts.now) {
        "it stops working at the next reload".to_owned()
    } else {
        format!("it stops working at {}", when::format(at))
    };
    let said = format!(
        "revoked key \"{id}\" in {env}: not_after = {}; {when_text}",
        when::format(at)
    );
    Ok(file.plan(action, vec![said], Some(id)))
}

/// `keys rotate`.
#[derive(Debug, Clone)]
pub struct RotateRequest<'a> {
    pub env: &'a str,
    pub id: &'a str,
    /// How long the old key keeps working next to the new one.
    pub overlap: Duration,
    /// Defaults to `ID.2`, `ID.3`, ...
    pub new_id: Option<&'a str>,
    /// Lifetime of the new key.
    pub ttl: Option<Duration>,
}

/// `keys rotate`: a new key beside the old one, the old one ending after the overlap.
pub fn rotate(
    opts: &EditOptions<'_>,
    req: &RotateRequest<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), KeysError> {
    plan_rotate(opts, req)?.finish(opts, out, err)
}

/// What `keys rotate` would write, without writing it.
pub fn plan_rotate<'a>(
    opts: &EditOptions<'a>,
    req: &RotateRequest<'_>,
) -> Result<Plan<'a>, KeysError> {
    let (env, id) = (req.env, req.id);
    let mut file = ConfigEdit::open(opts.config, env)?;
    let old = file.entry(id)?;
    let existing = file.entries();
    let new_id = match req.new_id {
        Some(n) => n.to_owned(),
        None => entries::next_rotation_id(id, &existing),
    };
    check_new_id(env, &new_id, &existing)?;
    // Never extends the old key: an earlier end stays.
    let overlap_end = when::floor_second(opts.now + req.overlap);
    let until = old.not_after.map_or(overlap_end, |na| na.min(overlap_end));
    if let Some(nb) = old.not_before.filter(|nb| *nb >= until) {
        return Err(KeysError::StagedRotation {
            id: id.to_owned(),
            env: env.to_owned(),
            not_before: when::format(nb),
        });
    }
    let key = generate(env);
    let digest = hex(&sha256(key.as_bytes()));
    let now = when::format(opts.now);
    let new_note = format!("rotated from \"{id}\" {now} by specter keys rotate");
    let not_after = req.ttl.map(|t| opts.now + t);
    file.append(
        &NewKey {
            id: &new_id,
            sha256_hex: &digest,
            not_before: None,
            not_after,
            note: &new_note,
        },
        Some(id),
    );
    if old.not_after != Some(until) {
        let note = format!("rotated to \"{new_id}\" {now} by specter keys rotate");
        file.key_mut(id)?.set_not_after(until, &note);
    }
    let said = vec![
        format!(
            "added key \"{new_id}\" to {env}{}",
            window_text(None, not_after)
        ),
        old_key_fate(&old, until, opts.now, req.overlap),
    ];
    let action = format!("rotating key \"{id}\" in {env}");
    let mut plan = file.plan(action, said, Some(id));
    plan.key = Some(key);
    Ok(plan)
}

/// What a rotation did to the old key, for the operator.
fn old_key_fate(old: &Entry, until: SystemTime, now: SystemTime, overlap: Duration) -> String {
    let (id, end) = (&old.id, when::format(until));
    if old.not_after != Some(until) {
        let overlap = humantime::format_duration(overlap);
        format!("key \"{id}\" keeps working until {end} (overlap {overlap}); `specter keys usage` shows when it was last seen")
    } else if until <= now {
        format!("key \"{id}\" already stopped working at {end}; left as it is")
    } else {
        format!("key \"{id}\" already ends at {end}, before the overlap would; left as it is")
    }
}

fn check_new_id(env: &str, id: &str, existing: &[Entry]) -> Result<(), KeysError> {
    if !valid_key_id(id) {
        return Err(KeysError::BadId(id.to_owned()));
    }
    if existing.iter().any(|e| e.id == id) {
        return Err(KeysError::IdTaken {
            id: id.to_owned(),
            env: env.to_owned(),
        });
    }
    Ok(())
}

/// A key from `--from-stdin`, refused when it names another environment: pasting the
/// wrong environment's key is the mistake this catches.
fn given_key(input: &str, env: &str) -> Result<String, KeysError> {
    let key = input.trim();
    if key.is_empty() {
        return Err(KeysError::Empty);
    }
    match environment_of(key) {
        Some(named) if named != env => Err(KeysError::WrongEnvironment {
            named: named.to_owned(),
            env: env.to_owned(),
        }),
        _ => Ok(key.to_owned()),
    }
}

fn window_text(not_before: Option<SystemTime>, not_after: Option<SystemTime>) -> String {
    match (not_before, not_after) {
        (None, None) => String::new(),
        (Some(nb), None) => format!(" (valid from {})", when::format(when::floor_second(nb))),
        (None, Some(na)) => format!(" (valid until {})", when::format(when::floor_second(na))),
        (Some(nb), Some(na)) => format!(
            " (valid from {} until {})",
            when::format(when::floor_second(nb)),
            when::format(when::floor_second(na))
        ),
    }
}
