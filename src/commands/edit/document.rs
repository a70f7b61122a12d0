//! The config file parsed with `toml_edit` so that it writes back byte for byte, and
//! environments found however they are written (`[environments.qa]`, dotted keys,
//! inline tables).

use std::path::Path;

use toml_edit::{DocumentMut, Item};

use super::EditError;
use crate::config::error::SourceMap;

/// Parses `text`, refusing a file whose untouched parts `toml_edit` would not write
/// back byte for byte.
pub fn parse(text: &str, path: &Path) -> Result<(DocumentMut, LineEnds), EditError> {
    let (doc, ends) = parse_to_read(text, path)?;
    let again = ends.render(&doc);
    if again != text {
        let line = first_different_line(text, &again);
        return Err(EditError::Layout {
            path: path.to_path_buf(),
            line,
        });
    }
    Ok((doc, ends))
}

/// Parses `text` for reading only: a layout that could not be written back is fine.
pub fn parse_to_read(text: &str, path: &Path) -> Result<(DocumentMut, LineEnds), EditError> {
    let ends = LineEnds::of(text);
    let lf = if ends.crlf {
        text.replace("\r\n", "\n")
    } else {
        text.to_owned()
    };
    let doc: DocumentMut = lf.parse().map_err(|source: toml_edit::TomlError| {
        let offset = source.span().map_or(0, |s| s.start);
        let (line, col) = SourceMap::new(path, &lf).position(offset);
        EditError::Unparsable {
            path: path.to_path_buf(),
            line,
            col,
            source: Box::new(source),
        }
    })?;
    Ok((doc, ends))
}

/// Line endings `toml_edit` does not keep by itself: CRLF throughout, and a last line
/// without a newline.
#[derive(Clone, Copy)]
pub struct LineEnds {
    crlf: bool,
    final_newline: bool,
}

impl LineEnds {
    fn of(text: &str) -> LineEnds {
        let crlf =
            text.contains("\r\n") && text.matches('\n').count() == text.matches("\r\n").count();
        LineEnds {
            crlf,
            final_newline: text.is_empty() || text.ends_with('\n'),
        }
    }

    pub fn render(self, doc: &DocumentMut) -> String {
        let mut s = doc.to_string();
        if !self.final_newline && s.ends_with('\n') {
            s.pop();
        }
        if self.crlf {
            s = s.replace('\n', "\r\n");
        }
        s
    }
}

fn first_different_line(a: &str, b: &str) -> usize {
    let same = a.lines().zip(b.lines()).take_while(|(x, y)| x == y).count();
    same + 1
}

/// The names of the environments that are tables, in file order.
pub fn environment_names(doc: &DocumentMut) -> Vec<String> {
    let Some(envs) = doc.get("environments").and_then(Item::as_table_like) else {
        return Vec::new();
    };
    envs.iter()
        .filter(|(_, item)| item.is_table_like())
        .map(|(name, _)| name.to_owned())
        .collect()
}

pub fn environment<'d>(doc: &'d DocumentMut, name: &str) -> Option<&'d Item> {
    let env = doc.get("environments")?.as_table_like()?.get(name)?;
    env.is_table_like().then_some(env)
}

pub fn environment_mut<'d>(doc: &'d mut DocumentMut, name: &str) -> Option<&'d mut Item> {
    let env = doc
        .get_mut("environments")?
        .as_table_like_mut()?
        .get_mut(name)?;
    env.is_table_like().then_some(env)
}

/// Environment `name`, or an error listing the environments `path` has.
pub fn require_environment<'d>(
    doc: &'d DocumentMut,
    name: &str,
    path: &Path,
) -> Result<&'d Item, EditError> {
    environment(doc, name).ok_or_else(|| {
        let known = environment_names(doc);
        EditError::UnknownEnvironment {
            name: name.to_owned(),
            path: path.to_path_buf(),
            known: if known.is_empty() {
                "no environments".to_owned()
            } else {
                known.join(", ")
            },
        }
    })
}
