//! The TOML parser's and serde's errors, worded for the person who wrote the file.
//!
//! serde stops at the first unknown field; to report every one in a single run the
//! unknown key is taken out of a copy of the file (with `toml_edit`, so nothing else
//! moves) and the copy parsed again, until no unknown field is left. Each is located
//! by its key path in the original text.

use std::ops::Range;
use std::str::FromStr;

use toml_edit::{DocumentMut, Item, Value};

use super::error::{ConfigError, ConfigErrors, SourceMap};
use super::file::RawConfig;

/// At most this many unknown fields are collected; a file with more is not a config.
const MAX_UNKNOWN: usize = 32;

/// Parses `map.text` into the raw types, or every problem worded with its fix.
pub fn parse(map: &SourceMap<'_>) -> Result<RawConfig, ConfigErrors> {
    toml::from_str(map.text).map_err(|first| {
        if first.message().contains("unknown field") {
            ConfigErrors(unknown_fields(map, first))
        } else {
            ConfigErrors(vec![worded(map, &first)])
        }
    })
}

/// A key's place in the document: table keys and array indexes.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

fn display_path(path: &[Segment]) -> String {
    let mut out = String::new();
    for segment in path {
        match segment {
            Segment::Key(k) if out.is_empty() => out.push_str(k),
            Segment::Key(k) => {
                out.push('.');
                out.push_str(k);
            }
            Segment::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn unknown_fields(map: &SourceMap<'_>, first: toml::de::Error) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let mut error = first;
    // Parsed once: the original (to locate keys) and the copy that loses them.
    let (Ok(original), Ok(mut copy)) = (
        toml_edit::Document::parse(map.text),
        DocumentMut::from_str(map.text),
    ) else {
        return vec![worded(map, &error)];
    };
    let mut text = map.text.to_owned();
    while found.len() < MAX_UNKNOWN && error.message().contains("unknown field") {
        let start = error.span().map_or(0, |s| s.start);
        let Some(path) = path_at(&text, start) else {
            break;
        };
        let span = key_span(original.as_item(), &path).unwrap_or(start..start);
        let (message, near) = unknown_message(&path, error.message());
        found.push(map.error(span, message));
        // The key goes, or is renamed to its near miss so that a misspelt required
        // field does not turn into a "missing field" that ends the search.
        replace(copy.as_item_mut(), &path, near.as_deref());
        text = copy.to_string();
        match toml::from_str::<RawConfig>(&text) {
            Ok(_) => break,
            Err(e) => error = e,
        }
    }
    if found.is_empty() {
        found.push(worded(map, &error));
    }
    found.sort_by_key(|e| (e.line, e.col));
    found
}

fn unknown_message(path: &[Segment], serde_message: &str) -> (String, Option<String>) {
    let (parent, name) = match path.split_last() {
        Some((Segment::Key(name), parent)) => (parent, name.as_str()),
        _ => (path, ""),
    };
    let place = if parent.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in [{}]", display_path(parent))
    };
    let expected: Vec<&str> = serde_message
        .split_once("expected")
        .map(|(_, list)| list.split('`').skip(1).step_by(2).collect())
        .unwrap_or_default();
    let mut message = format!("unknown field `{name}` {place}");
    let near = nearest(name, &expected);
    match near {
        Some(near) => message.push_str(&format!(
            ": did you mean `{near}`? Check its spelling or remove it"
        )),
        None => message.push_str("; remove it or check its spelling"),
    }
    if !expected.is_empty() {
        let list: Vec<String> = expected.iter().map(|e| format!("`{e}`")).collect();
        message.push_str(&format!(" (valid here: {})", list.join(", ")));
    }
    (message, near.map(str::to_owned))
}

/// The valid name closest to `name`, when it is a plausible typo of it.
fn nearest<'a>(name: &str, valid: &[&'a str]) -> Option<&'a str> {
    valid
        .iter()
        .map(|v| (strsim::damerau_levenshtein(name, v), *v))
        .filter(|(d, v)| *d <= (v.len() / 3).max(1))
        .min()
        .map(|(_, v)| v)
}

/// The path of the key whose text contains byte `offset`.
fn path_at(text: &str, offset: usize) -> Option<Vec<Segment>> {
    let doc = toml_edit::Document::parse(text).ok()?;
    let mut path = Vec::new();
    find_in_item(doc.as_item(), offset, &mut path).then_some(path)
}

fn find_in_item(item: &Item, offset: usize, path: &mut Vec<Segment>) -> bool {
    match item {
        Item::Table(t) => t.iter().any(|(name, _)| {
            t.get_key_value(name)
                .is_some_and(|(k, v)| find_under(name, k.span(), v, offset, path))
        }),
        Item::ArrayOfTables(a) => a.iter().enumerate().any(|(i, t)| {
            within(path, Segment::Index(i), |path| {
                t.iter().any(|(name, _)| {
                    t.get_key_value(name)
                        .is_some_and(|(k, v)| find_under(name, k.span(), v, offset, path))
                })
            })
        }),
        Item::Value(v) => find_in_value(v, offset, path),
        Item::None => false,
    }
}

fn find_in_value(value: &Value, offset: usize, path: &mut Vec<Segment>) -> bool {
    match value {
        Value::InlineTable(t) => t.iter().any(|(name, _)| {
            t.get_key_value(name)
                .is_some_and(|(k, v)| find_under(name, k.span(), v, offset, path))
        }),
        Value::Array(a) => a.iter().enumerate().any(|(i, v)| {
            within(path, Segment::Index(i), |path| {
                find_in_value(v, offset, path)
            })
        }),
        _ => false,
    }
}

/// Runs `search` with `segment` appended to `path`; keeps it there only on a hit.
fn within(
    path: &mut Vec<Segment>,
    segment: Segment,
    search: impl FnOnce(&mut Vec<Segment>) -> bool,
) -> bool {
    path.push(segment);
    let hit = search(path);
    if !hit {
        path.pop();
    }
    hit
}

fn find_under(
    name: &str,
    key_span: Option<Range<usize>>,
    item: &Item,
    offset: usize,
    path: &mut Vec<Segment>,
) -> bool {
    within(path, Segment::Key(name.to_owned()), |path| {
        key_span.is_some_and(|s| s.contains(&offset)) || find_in_item(item, offset, path)
    })
}

/// A place in a parsed document, borrowed.
#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Table(&'a toml_edit::Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn step(self, segment: &Segment) -> Option<Node<'a>> {
        let node = match self {
            Node::Item(Item::Table(t)) => Node::Table(t),
            Node::Item(Item::Value(v)) => Node::Value(v),
            other => other,
        };
        Some(match (segment, node) {
            (Segment::Key(k), Node::Table(t)) => Node::Item(t.get(k)?),
            (Segment::Key(k), Node::Value(Value::InlineTable(t))) => Node::Value(t.get(k)?),
            (Segment::Index(i), Node::Item(Item::ArrayOfTables(a))) => Node::Table(a.get(*i)?),
            (Segment::Index(i), Node::Value(Value::Array(a))) => Node::Value(a.get(*i)?),
            _ => return None,
        })
    }
}

/// Where the key at `path` is written in the document `root` was parsed from.
fn key_span(root: &Item, path: &[Segment]) -> Option<Range<usize>> {
    let (last, parent) = path.split_last()?;
    let Segment::Key(name) = last else {
        return None;
    };
    let mut node = Node::Item(root);
    for segment in parent {
        node = node.step(segment)?;
    }
    match node {
        Node::Item(Item::Table(t)) | Node::Table(t) => t.key(name)?.span(),
        Node::Item(Item::Value(Value::InlineTable(t))) | Node::Value(Value::InlineTable(t)) => {
            t.key(name)?.span()
        }
        _ => None,
    }
}

/// Takes the key at `path` out, or renames it to `to` when that name is free.
fn replace(item: &mut Item, path: &[Segment], to: Option<&str>) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    match (first, item) {
        (Segment::Key(k), Item::Table(t)) if rest.is_empty() => {
            if let Some(old) = t.remove(k) {
                if let Some(to) = to.filter(|to| !t.contains_key(to)) {
                    t.insert(to, old);
                }
            }
        }
        (Segment::Key(k), Item::Value(Value::InlineTable(t))) if rest.is_empty() => {
            if let Some(old) = t.remove(k) {
                if let Some(to) = to.filter(|to| !t.contains_key(to)) {
                    t.insert(to, old);
                }
            }
        }
        (Segment::Key(k), Item::Table(t)) => {
            if let Some(next) = t.get_mut(k) {
                replace(next, rest, to);
            }
        }
        (Segment::Key(k), Item::Value(Value::InlineTable(t))) => {
            if let Some(v) = t.get_mut(k) {
                let mut next = Item::Value(v.clone());
                replace(&mut next, rest, to);
                if let Item::Value(changed) = next {
                    *v = changed;
                }
            }
        }
        (Segment::Index(i), Item::ArrayOfTables(a)) => {
            if let Some(t) = a.get_mut(*i) {
                let mut next = Item::Table(t.clone());
                replace(&mut next, rest, to);
                if let Item::Table(changed) = next {
                    *t = changed;
                }
            }
        }
        (Segment::Index(i), Item::Value(Value::Array(a))) => {
            if let Some(v) = a.get_mut(*i) {
                let mut next = Item::Value(v.clone());
                replace(&mut next, rest, to);
                if let Item::Value(changed) = next {
                    *v = changed;
                }
            }
        }
        _ => {}
    }
}

/// Every error other than unknown fields: the key, the value and the fix.
fn worded(map: &SourceMap<'_>, e: &toml::de::Error) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let raw = e.message().trim_end();
    let header = map.header_at(span.start);
    if let (Some(header), true) = (header, raw.contains("duplicate key")) {
        return map.error(
            span,
            format!(
                "[{header}] is defined twice; each table may appear once: merge the two into one"
            ),
        );
    }
    let mut message = raw.to_owned();
    let assignment = map.assignment_at(span.start);
    if let Some((key, value)) = assignment {
        if let Some(extra) = trailing_text(value) {
            let table = table_prefix(map, span.start);
            return map.error(
                span,
                format!("{table}{key} = {value}: `{extra}` follows the value; write one value per key (a list is written [1, 2])"),
            );
        }
        message = format!("{key} = {value}: {message}");
    }
    message = format!("{}{message}", table_prefix(map, span.start));
    if raw.contains("duplicate key") {
        message.push_str("; each key may appear once in a table: remove one");
    } else if raw.contains("expected a string") || raw.contains("must be quoted") {
        message.push_str(
            "; write the value as a quoted string (durations like \"30s\", sizes like \"10MiB\")",
        );
    } else if raw.contains("expected i64") || raw.contains("expected u") {
        message.push_str("; write a whole number without quotes, e.g. 100");
    } else if raw.contains("expected a boolean") {
        message.push_str("; write true or false, without quotes");
    }
    map.error(span, message)
}

/// The text after a complete bare value (`max_headers = 100 100`): the error is not
/// about quoting, it is about the second token.
fn trailing_text(value: &str) -> Option<&str> {
    let (first, rest) = value.split_once(char::is_whitespace)?;
    let bare = !first.starts_with(['"', '\'', '[', '{']);
    (bare && !rest.trim().is_empty()).then(|| rest.trim())
}

fn table_prefix(map: &SourceMap<'_>, offset: usize) -> String {
    match map.enclosing_table(offset) {
        Some("") | None => String::new(),
        Some(table) => format!("in [{table}]: "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_and_removed_by_its_path() {
        let text = "[a]\nx = 1\n\n[a.b]\nc = { d = 1, e = 2 }\n";
        let offset = text.find("e =").unwrap();
        let path = path_at(text, offset).unwrap();
        assert_eq!(display_path(&path), "a.b.c.e");
        let mut doc = DocumentMut::from_str(text).unwrap();
        replace(doc.as_item_mut(), &path, None);
        let tables = "[[k]]\nid = 1\n\n[[k]]\nid = 2\nnot_afer = 3\n";
        let path = path_at(tables, tables.find("not_afer").unwrap()).unwrap();
        assert_eq!(display_path(&path), "k[1].not_afer");
        let parsed = toml_edit::Document::parse(tables).unwrap();
        assert_eq!(
            key_span(parsed.as_item(), &path),
            tables.find("not_afer").map(|s| s..s + 8)
        );
        assert_eq!(doc.to_string(), "[a]\nx = 1\n\n[a.b]\nc = { d = 1}\n");
    }
}
