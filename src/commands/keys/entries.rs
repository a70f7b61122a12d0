//! An environment's keys inside the `toml_edit` document: read as written (for
//! `keys list` and to pick ids), and edited in place for add, revoke and rotate.
//!
//! Keys may be written as `[[environments.qa.keys]]` tables (what `keys new` prints)
//! or as an inline array `keys = [{ id = ..., sha256 = ... }]`. Both are read and
//! edited; only the table form can carry the comments the commands leave (TOML has no
//! comments inside inline tables), so an inline key that was revoked lists as expired.

use std::time::SystemTime;

use toml_edit::{ArrayOfTables, DocumentMut, InlineTable, Item, Table, TableLike, Value};

use super::when;

/// Marks a `not_after` set by `keys revoke`; `keys list` tells revoked from expired
/// by it.
pub const REVOKED_BY: &str = "by specter keys revoke";

/// One key as the file writes it; values the validator would refuse read as absent.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: String,
    pub sha256: String,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// The `not_after` carries the comment `keys revoke` writes.
    pub revoked: bool,
}

/// The keys of environment item `env`, in file order.
pub fn entries(env: &Item) -> Vec<Entry> {
    let Some(keys) = env.as_table_like().and_then(|t| t.get("keys")) else {
        return Vec::new();
    };
    let time = |t: &dyn TableLike, k: &str| {
        t.get(k)
            .and_then(Item::as_datetime)
            .and_then(when::from_toml)
    };
    let entry = |t: &dyn TableLike, revoked: bool| Entry {
        id: t.get("id").and_then(Item::as_str).unwrap_or("").to_owned(),
        sha256: t
            .get("sha256")
            .and_then(Item::as_str)
            .unwrap_or("")
            .to_owned(),
        not_before: time(t, "not_before"),
        not_after: time(t, "not_after"),
        revoked,
    };
    match keys {
        Item::ArrayOfTables(a) => a.iter().map(|t| entry(t, revoked_mark(t))).collect(),
        Item::Value(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_inline_table)
            .map(|t| entry(t, false))
            .collect(),
        _ => Vec::new(),
    }
}

fn revoked_mark(t: &Table) -> bool {
    t.key("not_after")
        .and_then(|k| k.leaf_decor().prefix())
        .and_then(|p| p.as_str())
        .is_some_and(|p| p.contains(REVOKED_BY))
}

/// A key's table, whichever way it is written.
pub enum KeyMut<'a> {
    Table(&'a mut Table),
    Inline(&'a mut InlineTable),
}

/// The key `id` of environment item `env`.
pub fn find_mut<'a>(env: &'a mut Item, id: &str) -> Option<KeyMut<'a>> {
    let has_id = |t: &dyn TableLike| t.get("id").and_then(Item::as_str) == Some(id);
    match env.as_table_like_mut()?.get_mut("keys")? {
        Item::ArrayOfTables(a) => a.iter_mut().find(|t| has_id(*t)).map(KeyMut::Table),
        Item::Value(Value::Array(a)) => a
            .iter_mut()
            .filter_map(Value::as_inline_table_mut)
            .find(|t| has_id(*t))
            .map(KeyMut::Inline),
        _ => None,
    }
}

impl KeyMut<'_> {
    fn table_like(&mut self) -> &mut dyn TableLike {
        match self {
            KeyMut::Table(t) => *t,
            KeyMut::Inline(t) => *t,
        }
    }

    /// Sets `not_after` to `t`, keeping the spacing and trailing comment of the value it
    /// replaces, and writes `note` as a comment line above it (table form only).
    pub fn set_not_after(&mut self, t: SystemTime, note: &str) {
        let mut value = when::toml_value(t);
        let table = self.table_like();
        match table.get_mut("not_after") {
            Some(Item::Value(old)) => {
                *value.decor_mut() = old.decor().clone();
                *old = value;
            }
            _ => {
                table.insert("not_after", Item::Value(value));
            }
        }
        if let KeyMut::Inline(t) = self {
            // The entry before it kept its closing space: `"..." , not_after`.
            t.fmt();
        }
        if let KeyMut::Table(table) = self {
            if let Some(mut key) = table.key_mut("not_after") {
                let decor = key.leaf_decor_mut();
                let before = decor.prefix().and_then(|p| p.as_str()).unwrap_or("");
                let (lines, indent) = before
                    .rsplit_once('\n')
                    .map_or(("", before), |(l, i)| (&before[..l.len() + 1], i));
                decor.set_prefix(format!("{lines}{indent}# {note}\n{indent}"));
            }
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.table_like().remove(key);
    }
}

/// Deletes key `id` (and the comments directly above its table). False when absent.
pub fn remove(env: &mut Item, id: &str) -> bool {
    let has_id = |t: &dyn TableLike| t.get("id").and_then(Item::as_str) == Some(id);
    let Some(keys) = env.as_table_like_mut().and_then(|t| t.get_mut("keys")) else {
        return false;
    };
    match keys {
        Item::ArrayOfTables(a) => {
            let found = a.iter().position(|t| has_id(t));
            if let Some(i) = found {
                a.remove(i);
            }
            found.is_some()
        }
        Item::Value(Value::Array(a)) => {
            let found = a
                .iter()
                .position(|v| v.as_inline_table().is_some_and(|t| has_id(t)));
            if let Some(i) = found {
                a.remove(i);
            }
            found.is_some()
        }
        _ => false,
    }
}

/// A key about to be written: its hash, never the key.
pub struct NewKey<'a> {
    pub id: &'a str,
    pub sha256_hex: &'a str,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
    /// A comment line above the block (table form only), e.g. who added it when.
    pub note: &'a str,
}

impl NewKey<'_> {
    /// The key's table as `keys new` lays it out (values aligned on `=`).
    fn table(&self) -> Table {
        let mut text = format!(
            "[[k]]\nid     = {}\nsha256 = {}\n",
            Value::from(self.id),
            Value::from(self.sha256_hex)
        );
        for (name, t) in [
            ("not_before", self.not_before),
            ("not_after", self.not_after),
        ] {
            if let Some(t) = t {
                text.push_str(&format!("{name} = {}\n", when::toml_value(t)));
            }
        }
        let doc: DocumentMut = text.parse().expect("a key block is valid TOML");
        let mut table = doc["k"]
            .as_array_of_tables()
            .and_then(|a| a.get(0))
            .cloned()
            .expect("the block holds one table");
        table.decor_mut().set_prefix(format!("\n# {}\n", self.note));
        // Its place in the scratch document means nothing in the real one; without a
        // position a table is written after the one before it in the document tree.
        table.set_position(None);
        table
    }

    fn inline(&self) -> InlineTable {
        let mut t = InlineTable::new();
        t.insert("id", self.id.into());
        t.insert("sha256", self.sha256_hex.into());
        for (name, v) in [
            ("not_before", self.not_before),
            ("not_after", self.not_after),
        ] {
            if let Some(v) = v {
                t.insert(name, when::toml_value(v));
            }
        }
        t.fmt();
        t
    }
}

/// Adds `key` to environment item `env`: right after key `after` when given (a
/// rotation keeps the pair together), else after the environment's last key, in the
/// style its keys are already written in.
pub fn append(env: &mut Item, key: &NewKey<'_>, after: Option<&str>) {
    let inline_env = !matches!(env, Item::Table(_));
    let Some(table) = env.as_table_like_mut() else {
        return;
    };
    match table.get_mut("keys") {
        Some(Item::ArrayOfTables(a)) => push_table(a, key.table(), after),
        Some(Item::Value(Value::Array(a))) => {
            let at = after
                .and_then(|id| {
                    a.iter().position(|v| {
                        v.as_inline_table()
                            .and_then(|t| t.get("id"))
                            .and_then(Value::as_str)
                            == Some(id)
                    })
                })
                .map_or(a.len(), |i| i + 1);
            insert_inline(a, at, Value::InlineTable(key.inline()));
        }
        _ if inline_env => {
            let mut a = toml_edit::Array::new();
            a.push(key.inline());
            table.insert("keys", Item::Value(Value::Array(a)));
        }
        _ => {
            let mut a = ArrayOfTables::new();
            a.push(key.table());
            table.insert("keys", Item::ArrayOfTables(a));
        }
    }
}

/// Inserts `value` at `at` on a line of its own when the array is laid out one entry
/// per line. What follows an entry up to the next line break (its comment) stays with
/// that entry, so it moves to the new entry's prefix, and the entry that follows gets
/// a plain line break.
fn insert_inline(a: &mut toml_edit::Array, at: usize, mut value: Value) {
    let text = |d: &toml_edit::Decor| d.prefix().and_then(|p| p.as_str()).unwrap_or("").to_owned();
    let last_prefix = a.iter().last().map(|v| text(v.decor())).unwrap_or_default();
    let indent = last_prefix.rsplit_once('\n').map(|(_, i)| i.to_owned());
    let Some(indent) = indent else {
        value
            .decor_mut()
            .set_prefix(if a.is_empty() { "" } else { " " });
        a.insert_formatted(at, value);
        return;
    };
    let trailing_comma = a.trailing_comma();
    let prefix = match a.get_mut(at) {
        Some(next) => {
            let p = text(next.decor());
            next.decor_mut().set_prefix(format!("\n{indent}"));
            p
        }
        None if trailing_comma => {
            let trailing = a.trailing().as_str().unwrap_or("").to_owned();
            match trailing.rsplit_once('\n') {
                Some((comment, rest)) => {
                    a.set_trailing(format!("\n{rest}"));
                    format!("{comment}\n{indent}")
                }
                None => format!("\n{indent}"),
            }
        }
        None => format!("\n{indent}"),
    };
    value.decor_mut().set_prefix(prefix);
    a.insert_formatted(at, value);
}

/// Pushes `table` and gives it the document position of the table it follows, so it
/// is written directly below that one (tables render in position order; the sort is
/// stable and the new table comes later in the array).
fn push_table(a: &mut ArrayOfTables, mut table: Table, after: Option<&str>) {
    let anchor = after
        .and_then(|id| {
            a.iter()
                .find(|t| t.get("id").and_then(Item::as_str) == Some(id))
        })
        .or_else(|| a.iter().last())
        .and_then(Table::position);
    table.set_position(anchor);
    a.push(table);
}

/// `E-N` with N one more than the highest already used in the environment, so an id is
/// never handed out twice while its key is still in the file.
pub fn next_numbered_id(env: &str, existing: &[Entry]) -> String {
    let prefix = format!("{env}-");
    let highest = existing
        .iter()
        .filter_map(|e| e.id.strip_prefix(&prefix)?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    format!("{env}-{}", highest + 1)
}

/// The id a rotation gives the new key: `ID.2` for `ID`, `ID.3` for `ID.2`, skipping
/// ids already in the environment.
pub fn next_rotation_id(old: &str, existing: &[Entry]) -> String {
    let (base, n) = match old.rsplit_once('.') {
        Some((base, n)) if n.parse::<u64>().is_ok_and(|n| n >= 2) && !base.is_empty() => {
            (base, n.parse::<u64>().unwrap_or(1))
        }
        _ => (old, 1),
    };
    (n + 1..)
        .map(|n| format!("{base}.{n}"))
        .find(|id| !existing.iter().any(|e| &e.id == id))
        .unwrap_or_else(|| format!("{base}.{}", n + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(ids: &[&str]) -> Vec<Entry> {
        ids.iter()
            .map(|id| Entry {
                id: (*id).to_owned(),
                sha256: String::new(),
                not_before: None,
                not_after: None,
                revoked: false,
            })
            .collect()
    }

    #[test]
    fn added_ids_count_up_past_the_highest() {
        assert_eq!(next_numbered_id("qa", &[]), "qa-1");
        assert_eq!(
            next_numbered_id("qa", &ids(&["qa-1", "qa-7", "qa-x", "production-9"])),
            "qa-8"
        );
    }

    #[test]
    fn rotated_ids_count_generations() {
        assert_eq!(next_rotation_id("billing", &ids(&["billing"])), "billing.2");
        assert_eq!(next_rotation_id("billing.2", &[]), "billing.3");
        assert_eq!(
            next_rotation_id("billing", &ids(&["billing.2", "billing.3"])),
            "billing.4"
        );
        assert_eq!(next_rotation_id("v1.0", &[]), "v1.0.2");
    }
}
