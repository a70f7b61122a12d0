//! Which promoted changes weaken what protects an environment: a response header it
//! no longer sets, a request header it no longer strips, more client addresses, hosts
//! or methods admitted, fewer paths denied, a larger (or no) body limit. Promotion
//! makes TO equal FROM, so "qa never had HSTS" silently drops production's; these are
//! printed by name and `--apply` refuses them without `--allow-removals`.

use std::collections::BTreeSet;

use super::Setting;

/// One weakened setting of TO, for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loosening {
    pub path: String,
    pub what: String,
}

/// The loosenings among `changes` (`left` = TO now, `right` = TO after promotion).
pub fn find(changes: &[Setting]) -> Vec<Loosening> {
    changes.iter().filter_map(judge).collect()
}

fn judge(s: &Setting) -> Option<Loosening> {
    let path = s.path.as_str();
    let what = if let Some(name) = path.strip_prefix("policy.response_headers.set.") {
        match (&s.left, &s.right) {
            (Some(old), None) => format!("stops setting response header {name} (was {old})"),
            (Some(old), Some(new)) => format!("changes response header {name} from {old} to {new}"),
            (None, _) => return None,
        }
    } else {
        match path {
            "policy.request_headers.remove" => {
                let kept = gone(&folded(&s.left, false), &folded(&s.right, false))?;
                format!("stops removing request headers {kept}")
            }
            "policy.deny_paths" => format!("no longer denies {}", gone(&s.left, &s.right)?),
            "policy.allow_ips" => widened(s, "any client address")?,
            "hosts" => widened(s, "any Host")?,
            "policy.methods" => widened(
                &Setting {
                    path: s.path.clone(),
                    left: folded(&s.left, true),
                    right: folded(&s.right, true),
                },
                "any method",
            )?,
            "policy.max_body" => larger_body(s)?,
            _ => return None,
        }
    };
    Some(Loosening {
        path: s.path.clone(),
        what,
    })
}

/// The strings of an array value (an unset setting has none).
fn strings(v: &Option<toml::Value>) -> BTreeSet<String> {
    v.as_ref()
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Methods compare upper case, header names lower case.
fn folded(v: &Option<toml::Value>, upper: bool) -> Option<toml::Value> {
    let fold = |s: &str| {
        if upper {
            s.to_ascii_uppercase()
        } else {
            s.to_ascii_lowercase()
        }
    };
    let items = strings(v)
        .iter()
        .map(|s| toml::Value::String(fold(s)))
        .collect();
    v.as_ref().map(|_| toml::Value::Array(items))
}

fn listed(items: impl IntoIterator<Item = String>) -> String {
    items
        .into_iter()
        .map(|i| format!("\"{i}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What `old` lists and `new` no longer does.
fn gone(old: &Option<toml::Value>, new: &Option<toml::Value>) -> Option<String> {
    let new = strings(new);
    let lost: Vec<String> = strings(old)
        .into_iter()
        .filter(|o| !new.contains(o))
        .collect();
    (!lost.is_empty()).then(|| listed(lost))
}

/// An allow-list that admits more: unset (anything) or with new entries.
fn widened(s: &Setting, anything: &str) -> Option<String> {
    let old = s.left.as_ref()?;
    let Some(_) = &s.right else {
        return Some(format!("becomes unset, admitting {anything} (was {old})"));
    };
    let before = strings(&s.left);
    let added: Vec<String> = strings(&s.right)
        .into_iter()
        .filter(|n| !before.contains(n))
        .collect();
    (!added.is_empty()).then(|| format!("admits {} as well", listed(added)))
}

fn larger_body(s: &Setting) -> Option<String> {
    let size = |v: &toml::Value| v.as_str()?.parse::<bytesize::ByteSize>().ok();
    let old = s.left.as_ref()?;
    match &s.right {
        None => Some(format!(
            "becomes unset (was {old}), so the default limit applies"
        )),
        Some(new) => match (size(old), size(new)) {
            (Some(o), Some(n)) if n > o => Some(format!("grows from {old} to {new}")),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting(path: &str, left: Option<&str>, right: Option<&str>) -> Setting {
        let value =
            |t: &str| toml::from_str::<toml::Table>(&format!("v = {t}")).unwrap()["v"].clone();
        Setting {
            path: path.to_owned(),
            left: left.map(value),
            right: right.map(value),
        }
    }

    #[test]
    fn loosenings_are_found_and_tightenings_are_not() {
        let loose = [
            setting(
                "policy.response_headers.set.strict-transport-security",
                Some("\"max-age=1\""),
                None,
            ),
            setting(
                "policy.request_headers.remove",
                Some("[\"cookie\", \"x-debug\"]"),
                Some("[\"x-debug\"]"),
            ),
            setting("policy.allow_ips", Some("[\"10.0.0.0/8\"]"), None),
            setting(
                "policy.allow_ips",
                Some("[\"10.0.0.0/8\"]"),
                Some("[\"10.0.0.0/8\", \"0.0.0.0/0\"]"),
            ),
            setting("policy.deny_paths", Some("[\"/v1/internal/\"]"), None),
            setting(
                "policy.methods",
                Some("[\"GET\"]"),
                Some("[\"GET\", \"DELETE\"]"),
            ),
            setting("policy.max_body", Some("\"1MiB\""), Some("\"10MiB\"")),
            setting("hosts", Some("[\"a.example\"]"), None),
        ];
        for s in &loose {
            assert!(judge(s).is_some(), "{s:?}");
        }
        let tight = [
            setting("policy.response_headers.set.x-new", None, Some("\"1\"")),
            setting(
                "policy.request_headers.remove",
                Some("[\"x-debug\"]"),
                Some("[\"x-debug\", \"cookie\"]"),
            ),
            setting("policy.allow_ips", None, Some("[\"10.0.0.0/8\"]")),
            setting(
                "policy.methods",
                Some("[\"GET\", \"POST\"]"),
                Some("[\"GET\"]"),
            ),
            setting("policy.max_body", Some("\"10MiB\""), Some("\"1MiB\"")),
            setting("policy.allow_paths", Some("[\"/v1/\"]"), None),
            setting("rate_limit.per_key.burst", Some("5"), Some("50")),
        ];
        for s in &tight {
            assert!(judge(s).is_none(), "{s:?}");
        }
    }
}
