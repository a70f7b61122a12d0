//! `keys list`: the keys as the file holds them, each with its state, and with usage
//! from a running gateway when one answers. Hashes only on request.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use toml_edit::Item;

use super::entries::{self, Entry};
use super::{fetch_rows, when, KeysError};
use crate::admin::KeyRow;
use crate::commands::edit::{self, document};

/// What a key can do right now, as `keys list` says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    /// `not_before` is still ahead.
    Staged,
    /// Works, but `not_after` falls within the warning window.
    Expiring,
    /// Past `not_after`, which `keys revoke` did not set.
    Expired,
    /// Past a `not_after` that `keys revoke` set.
    Revoked,
}

impl State {
    /// The same boundaries the gateway applies (`auth::lookup`): usable from
    /// `not_before` on, refused from `not_after` on.
    pub fn of(e: &Entry, now: SystemTime, window: Duration) -> State {
        match (e.not_before, e.not_after) {
            (_, Some(na)) if now >= na && e.revoked => State::Revoked,
            (_, Some(na)) if now >= na => State::Expired,
            (Some(nb), _) if now < nb => State::Staged,
            (_, Some(na)) if na <= now + window => State::Expiring,
            _ => State::Active,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Staged => "staged",
            State::Expiring => "expiring",
            State::Expired => "expired",
            State::Revoked => "revoked",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ListRequest<'a> {
    pub config: &'a Path,
    pub env: Option<&'a str>,
    /// The gateway's admin listener; `None` looks for `listen.admin` in the config.
    pub admin: Option<&'a str>,
    pub show_hashes: bool,
    /// Keys ending within this window are `expiring` (`check --expiry-warning`).
    pub expiry_warning: Duration,
    pub now: SystemTime,
}

pub async fn list(
    req: &ListRequest<'_>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), KeysError> {
    let (text, _) = edit::read_config(req.config)?;
    let (doc, _) = document::parse_to_read(&text, req.config)?;
    let names = match req.env {
        Some(env) => {
            document::require_environment(&doc, env, req.config)?;
            vec![env.to_owned()]
        }
        None => document::environment_names(&doc),
    };
    let keys: Vec<(String, Entry)> = names
        .iter()
        .filter_map(|n| Some((n, document::environment(&doc, n)?)))
        .flat_map(|(n, env)| entries::entries(env).into_iter().map(|e| (n.clone(), e)))
        .collect();
    let usage = match (req.admin, configured_admin(&doc)) {
        (Some(admin), _) => Some(fetch_rows(admin).await?),
        (None, Some(admin)) => match fetch_rows(&admin.to_string()).await {
            Ok(rows) => Some(rows),
            Err(e) => {
                let _ = writeln!(
                    err,
                    "no usage columns: the admin listener {admin} from the config did not answer ({e})"
                );
                None
            }
        },
        (None, None) => None,
    };
    let _ = write!(out, "{}", table(&keys, usage.as_deref(), req));
    Ok(())
}

/// `listen.admin` of the config, an unspecified address (`0.0.0.0`) turned into
/// loopback so that it can be dialled.
fn configured_admin(doc: &toml_edit::DocumentMut) -> Option<SocketAddr> {
    let raw = doc
        .get("listen")?
        .as_table_like()?
        .get("admin")
        .and_then(Item::as_str)?;
    let mut addr: SocketAddr = raw.parse().ok()?;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    Some(addr)
}

fn table(keys: &[(String, Entry)], usage: Option<&[KeyRow]>, req: &ListRequest<'_>) -> String {
    let by_key: HashMap<(&str, &str), &KeyRow> = usage
        .unwrap_or_default()
        .iter()
        .map(|r| ((r.environment.as_str(), r.key_id.as_str()), r))
        .collect();
    let time = |t: Option<SystemTime>| t.map_or("-".to_owned(), when::format);
    let mut header = vec!["ENVIRONMENT", "KEY ID", "STATE", "NOT BEFORE", "NOT AFTER"];
    if usage.is_some() {
        header.extend(["REQUESTS", "LAST SEEN"]);
    }
    if req.show_hashes {
        header.push("SHA256");
    }
    let mut rows: Vec<Vec<String>> = vec![header.into_iter().map(str::to_owned).collect()];
    for (env, e) in keys {
        let state = State::of(e, req.now, req.expiry_warning);
        let mut row = vec![
            env.clone(),
            e.id.clone(),
            state.as_str().to_owned(),
            time(e.not_before),
            time(e.not_after),
        ];
        if usage.is_some() {
            let r = by_key.get(&(env.as_str(), e.id.as_str()));
            row.push(r.map_or("-".to_owned(), |r| r.requests.to_string()));
            row.push(
                r.and_then(|r| r.last_seen.clone())
                    .unwrap_or_else(|| "-".to_owned()),
            );
        }
        if req.show_hashes {
            row.push(e.sha256.clone());
        }
        rows.push(row);
    }
    if keys.is_empty() {
        return "no keys\n".to_owned();
    }
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut s = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        s.push_str(line.join("  ").trim_end());
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_gateway_boundaries() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        let e = |nb: Option<SystemTime>, na: Option<SystemTime>, revoked| Entry {
            id: "k".into(),
            sha256: String::new(),
            not_before: nb,
            not_after: na,
            revoked,
        };
        let state = |e: Entry| State::of(&e, now, 14 * day);
        assert_eq!(state(e(None, None, false)), State::Active);
        assert_eq!(state(e(Some(now), None, false)), State::Active);
        assert_eq!(state(e(Some(now + day), None, false)), State::Staged);
        assert_eq!(state(e(None, Some(now + day), false)), State::Expiring);
        assert_eq!(state(e(None, Some(now + 15 * day), false)), State::Active);
        assert_eq!(state(e(None, Some(now), false)), State::Expired);
        assert_eq!(state(e(None, Some(now), true)), State::Revoked);
        assert_eq!(state(e(None, Some(now + day), true)), State::Expiring);
    }
}
