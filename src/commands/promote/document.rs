//! The `toml_edit` side of promotion (the layout-keeping parse is `edit::document`):
//! comparing settings, and the edit. An environment's settings may be written as
//! `[environments.qa.policy]` tables, as dotted keys (`policy.max_body = ...`) or as
//! inline tables; comparisons look through the style at the values (leaves), and the
//! edit keeps whatever TO already has, changing only the keys whose values differ.

use std::collections::BTreeMap;

use toml_edit::{Item, Key, Value};

use super::Setting;

/// A setting's dotted path (`policy.request_headers.set.x-tenant`) -> its value, with
/// layout and comments ignored. Arrays are one leaf; tables are looked into.
type Leaves = BTreeMap<String, toml::Value>;

/// The settings under `keys` of two environment items, leaf by leaf, sorted by path
/// within each key.
pub(super) fn compare(left: &Item, right: &Item, keys: &[&str]) -> Vec<Setting> {
    let mut rows = Vec::new();
    for key in keys {
        let l = leaves_at(left, key);
        let r = leaves_at(right, key);
        let mut paths: Vec<&String> = l.keys().chain(r.keys()).collect();
        paths.sort();
        paths.dedup();
        rows.extend(paths.into_iter().map(|p| Setting {
            path: p.clone(),
            left: l.get(p).cloned(),
            right: r.get(p).cloned(),
        }));
    }
    rows
}

/// Sets `into[top][key]` to `from[top][key]` (or removes it when `from` lacks it):
/// `into` then serves as the source that promotes one key and nothing else of `top`.
pub(super) fn take_key(into: &mut Item, from: &Item, top: &str, key: &str) {
    let Some(env) = into.as_table_like_mut() else {
        return;
    };
    if env.get(top).is_none() {
        env.insert(top, Item::Table(toml_edit::Table::new()));
    }
    let Some(group) = env.get_mut(top).and_then(Item::as_table_like_mut) else {
        return;
    };
    match child(from, top).and_then(|g| child(g, key)) {
        Some(value) => {
            group.insert(key, value.clone());
        }
        None => {
            group.remove(key);
        }
    }
}

/// Makes `to[key]` hold the same leaves as `from[key]`; `to` and `from` are table-like.
/// Equal subtrees are left alone, so TO keeps its own layout wherever values agree.
pub(super) fn sync(to: &mut Item, from: &Item, key: &str) {
    let source = child(from, key).filter(|item| !leaves(item, "").is_empty());
    let wanted = source.map(|s| leaves(s, "")).unwrap_or_default();
    if child(to, key).map(|t| leaves(t, "")).unwrap_or_default() == wanted {
        return;
    }
    let into = Container::of(to);
    let table = to.as_table_like_mut().expect("sync is given tables");
    match (source, table.get_mut(key)) {
        (Some(source), Some(target)) if target.is_table_like() && source.is_table_like() => {
            for k in union_keys(target, source) {
                sync(target, source, &k);
            }
            return;
        }
        (Some(Item::Value(source)), Some(Item::Value(target))) => {
            replace_value(target, source, into);
            return;
        }
        (Some(source), _) => {
            table.insert(key, adapt(source.clone(), into));
        }
        (None, _) => {
            table.remove(key);
        }
    }
    if let Container::Inline = into {
        // An entry added to or taken from `{ a = 1, b = 2 }` leaves odd spacing.
        table.fmt();
    }
}

/// Puts `source`'s value in place of `target`'s, keeping `target`'s surroundings; a
/// trailing comment stays in its column when it can.
fn replace_value(target: &mut Value, source: &Value, into: Container) {
    let mut source = source.clone();
    if let Container::Inline = into {
        one_line(&mut source);
    }
    let mut decor = target.decor().clone();
    let suffix = decor.suffix().and_then(|s| s.as_str()).unwrap_or("");
    if let (Some(at), Some(old), Some(new)) = (suffix.find('#'), width(target), width(&source)) {
        if suffix[..at].bytes().all(|b| b == b' ') {
            let pad = (at + old).saturating_sub(new).max(1);
            decor.set_suffix(format!("{}{}", " ".repeat(pad), &suffix[at..]));
        }
    }
    *target = source;
    *target.decor_mut() = decor;
}

/// Characters a value takes on its line, when it takes one line.
fn width(v: &Value) -> Option<usize> {
    let mut bare = v.clone();
    bare.decor_mut().clear();
    let text = bare.to_string();
    (!text.contains('\n')).then(|| text.trim().chars().count())
}

fn union_keys(a: &Item, b: &Item) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for t in [a, b].into_iter().filter_map(Item::as_table_like) {
        for (k, _) in t.iter() {
            if !keys.iter().any(|seen| seen == k) {
                keys.push(k.to_owned());
            }
        }
    }
    keys
}

/// How the table receiving a copied item is written, which decides how the copy is.
#[derive(Clone, Copy)]
enum Container {
    /// `[header]` table: the copy keeps FROM's style.
    Standard,
    /// Dotted keys: copied tables become dotted keys too.
    Dotted,
    /// Inline table: the copy must be a value.
    Inline,
}

impl Container {
    fn of(item: &Item) -> Container {
        match item {
            Item::Table(t) if t.is_dotted() => Container::Dotted,
            Item::Table(_) => Container::Standard,
            _ => Container::Inline,
        }
    }
}

fn adapt(mut item: Item, into: Container) -> Item {
    match into {
        Container::Inline => match item.into_value() {
            Ok(mut v) => {
                one_line(&mut v);
                Item::Value(v)
            }
            Err(_) => Item::None,
        },
        Container::Dotted => {
            detach(&mut item, true);
            item
        }
        Container::Standard => {
            detach(&mut item, false);
            item
        }
    }
}

/// Forgets where a copied table stood in FROM: its position (so it is laid out after
/// TO's own tables rather than among FROM's) and the comments above its header, which
/// describe FROM's section.
fn detach(item: &mut Item, dotted: bool) {
    match item {
        Item::Table(t) => {
            t.set_position(None);
            t.decor_mut().clear();
            if dotted {
                t.set_dotted(true);
            }
            for (_, child) in t.iter_mut() {
                detach(child, dotted);
            }
        }
        Item::ArrayOfTables(_) if dotted => item.make_value(),
        Item::ArrayOfTables(a) => {
            for t in a.iter_mut() {
                t.set_position(None);
                t.decor_mut().clear();
            }
        }
        Item::Value(_) | Item::None => {}
    }
}

fn child<'a>(table: &'a Item, key: &str) -> Option<&'a Item> {
    table.as_table_like()?.get(key)
}

/// The leaves of `env[key]`, their paths starting with `key`.
/// Lays a value copied into an inline table out on one line (comments inside it go).
fn one_line(v: &mut Value) {
    match v {
        Value::Array(a) => {
            a.iter_mut().for_each(one_line);
            a.fmt();
        }
        Value::InlineTable(t) => {
            t.iter_mut().for_each(|(_, v)| one_line(v));
            t.fmt();
        }
        _ => {}
    }
}

fn leaves_at(env: &Item, key: &str) -> Leaves {
    child(env, key)
        .map(|item| leaves(item, &segment(key)))
        .unwrap_or_default()
}

/// The leaves below `item`, their paths starting with `prefix` (none when empty).
fn leaves(item: &Item, prefix: &str) -> Leaves {
    let mut out = Leaves::new();
    collect(item, prefix, &mut out);
    out
}

fn collect(item: &Item, path: &str, out: &mut Leaves) {
    if let Some(table) = item.as_table_like() {
        for (k, child) in table.iter() {
            let child_path = if path.is_empty() {
                segment(k)
            } else {
                format!("{path}.{}", segment(k))
            };
            collect(child, &child_path, out);
        }
    } else if let Some(v) = plain_item(item) {
        out.insert(path.to_owned(), v);
    }
}

/// A key as written in a dotted path: bare when it can be, quoted otherwise.
fn segment(key: &str) -> String {
    Key::new(key).display_repr().into_owned()
}

fn plain_item(item: &Item) -> Option<toml::Value> {
    match item {
        Item::Value(v) => Some(plain(v)),
        Item::ArrayOfTables(a) => Some(toml::Value::Array(
            a.iter()
                .map(|t| plain(&Value::InlineTable(t.clone().into_inline_table())))
                .collect(),
        )),
        Item::Table(_) | Item::None => None,
    }
}

/// The value itself, whatever quoting, number format or comments it was written with.
fn plain(v: &Value) -> toml::Value {
    match v {
        Value::String(s) => toml::Value::String(s.value().clone()),
        Value::Integer(i) => toml::Value::Integer(*i.value()),
        Value::Float(f) => toml::Value::Float(*f.value()),
        Value::Boolean(b) => toml::Value::Boolean(*b.value()),
        Value::Datetime(d) => toml::Value::Datetime(*d.value()),
        Value::Array(a) => toml::Value::Array(a.iter().map(plain).collect()),
        Value::InlineTable(t) => {
            toml::Value::Table(t.iter().map(|(k, v)| (k.to_owned(), plain(v))).collect())
        }
    }
}
