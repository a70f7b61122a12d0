//! Config errors that point into the file: `path:line:col: key.path: "value" is ...; fix`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One problem found in a config file, located by line and column (both 1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.col,
            self.message
        )
    }
}

/// Everything wrong with one file. Validation keeps going after the first problem so a
/// user fixes them all in one round instead of one per `specter check`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A finding that does not stop the config from loading (expiring keys, reused ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigWarning {
    pub location: String,
    pub message: String,
}

impl fmt::Display for ConfigWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: warning: {}", self.location, self.message)
    }
}

/// Maps byte offsets of one source text to 1-based line and column (in characters).
pub struct SourceMap<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    /// Offsets where lines start, found on the first lookup: a config with 100,000
    /// warnings must not scan its text from the top for each of them.
    line_starts: std::sync::OnceLock<Vec<usize>>,
}

impl<'a> SourceMap<'a> {
    pub fn new(file: &'a Path, text: &'a str) -> SourceMap<'a> {
        SourceMap {
            file,
            text,
            line_starts: std::sync::OnceLock::new(),
        }
    }

    pub fn position(&self, offset: usize) -> (usize, usize) {
        let offset = floor_char_boundary(self.text, offset.min(self.text.len()));
        let starts = self.line_starts.get_or_init(|| {
            std::iter::once(0)
                .chain(self.text.match_indices('\n').map(|(i, _)| i + 1))
                .collect()
        });
        let line = starts.partition_point(|&s| s <= offset);
        let col = self.text[starts[line - 1]..offset].chars().count() + 1;
        (line, col)
    }

    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, col) = self.position(span.start);
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            col,
            message: message.into(),
        }
    }

    pub fn location(&self, span: Range<usize>) -> String {
        let (line, col) = self.position(span.start);
        format!("{}:{line}:{col}", self.file.display())
    }

    /// The `key = value` written on the line holding `offset`, if that line is one.
    pub fn assignment_at(&self, offset: usize) -> Option<(&str, &str)> {
        let start = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line = self.text[line_start..].lines().next()?;
        let (key, value) = line.split_once('=')?;
        let (key, value) = (key.trim(), value.split('#').next()?.trim());
        let plain_key = !key.is_empty() && !key.starts_with('[') && !key.contains(['{', '"', ' ']);
        plain_key.then_some((key, value))
    }

    /// The `[table]` header in force at `offset`, for errors that toml reports without
    /// a key path (wrong types). A header line counts whole, even when the error points
    /// into its middle.
    pub fn enclosing_table(&self, offset: usize) -> Option<&str> {
        let start = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line_end = self.text[start..]
            .find('\n')
            .map_or(self.text.len(), |i| start + i);
        self.text[..line_end].lines().rev().find_map(header_name)
    }

    /// The table named by the header written on the line holding `offset`, if that
    /// line is a `[table]` or `[[array]]` header.
    pub fn header_at(&self, offset: usize) -> Option<&str> {
        let start = floor_char_boundary(self.text, offset.min(self.text.len()));
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        header_name(self.text[line_start..].lines().next()?)
    }
}

fn header_name(line: &str) -> Option<&str> {
    let line = line.trim();
    let inner = line.strip_prefix("[[").and_then(|l| l.split("]]").next());
    let inner = inner.or_else(|| line.strip_prefix('[').and_then(|l| l.split(']').next()));
    inner.map(str::trim)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}
