//! `keys_file`: an environment's keys, one per line, for key counts that TOML handles
//! badly (a million keys as `[[keys]]` tables peak above 2 GiB while the TOML document
//! is parsed; as lines they are read one at a time).
//!
//! ```text
//! # id              sha256 (64 hex)                                                   not_before            not_after
//! billing-service   3d7f4e3e1a9c5a3e8f5e3f2d8d3c2f8f2a5f4e3d2c1b0a9f8e7d6c5b4a392817  -                     2027-06-30T00:00:00Z
//! ```
//!
//! Fields are separated by spaces or tabs; `not_before` and `not_after` are optional
//! RFC 3339 times with an offset, `-` for none; `#` starts a comment line. The file is
//! read streaming (the line buffer is reused), with the same regular-file check and
//! size cap as every other file specter reads, and every bad line is reported as
//! `file:line:col`.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::time::SystemTime;

use super::{valid_key_id, CheckOptions, ConfigError, ConfigWarning, KeyConfig, KeyDigest};

/// At most this many errors are listed for one file; a file that is wrong throughout
/// (say, the wrong file) gets a count of the rest instead of a million lines.
const MAX_ERRORS: usize = 50;

/// An environment's keys as read from its keys file.
pub struct FileKeys {
    pub keys: Vec<KeyConfig>,
    /// 1-based line of each key, for the checks that run after reading.
    pub lines: Vec<u32>,
}

/// Reads `path` for environment `env`: its keys, or every problem found.
pub fn read(
    path: &Path,
    env: &str,
    options: &CheckOptions,
    warnings: &mut Vec<ConfigWarning>,
) -> Result<FileKeys, Vec<ConfigError>> {
    let at = |line: usize, col: usize, message: String| ConfigError {
        file: path.to_path_buf(),
        line,
        col,
        message: format!("environments.{env}.keys_file: {message}"),
    };
    let file = super::read::open_regular(path)
        .map_err(|e| vec![at(1, 1, format!("cannot read {}: {e}", path.display()))])?;
    let mut reader = BufReader::with_capacity(64 * 1024, file.take(super::read::MAX_FILE_BYTES));
    let (mut keys, mut lines, mut errors) = (Vec::new(), Vec::new(), Vec::new());
    let mut skipped = 0usize;
    let mut buf = String::new();
    for number in 1.. {
        buf.clear();
        match reader.read_line(&mut buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                errors.push(at(
                    number,
                    1,
                    format!("cannot read line {number}: {e} (the file must be UTF-8 text)"),
                ));
                break;
            }
        }
        match parse_line(&buf, options.now) {
            Ok(None) => {}
            Ok(Some((key, warning))) => {
                if let Some(w) = warning {
                    warnings.push(ConfigWarning {
                        location: format!("{}:{number}", path.display()),
                        message: format!("environments.{env}.keys_file: key \"{}\" {w}", key.id),
                    });
                }
                keys.push(key);
                lines.push(number as u32);
            }
            Err((col, message)) if errors.len() < MAX_ERRORS => {
                errors.push(at(number, col, format!("line {number}: {message}")))
            }
            Err(_) => skipped += 1,
        }
    }
    if skipped > 0 {
        errors.push(at(1, 1, format!("{skipped} more bad lines not listed")));
    }
    if errors.is_empty() {
        keys.shrink_to_fit();
        lines.shrink_to_fit();
        Ok(FileKeys { keys, lines })
    } else {
        Err(errors)
    }
}

/// A key read from a line, and a note when it has expired.
type LineKey = (KeyConfig, Option<String>);

/// What is wrong with a line: the 1-based column and the message.
type LineError = (usize, String);

/// One line: `None` for a blank or comment line, else the key and an expiry note.
fn parse_line(line: &str, now: SystemTime) -> Result<Option<LineKey>, LineError> {
    let content = line.trim_end_matches(['\n', '\r']);
    let trimmed = content.trim_start();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(None);
    }
    // Each field with its 1-based column, for the error position.
    let mut fields = content
        .split([' ', '\t'])
        .scan(1usize, |col, f| {
            let here = *col;
            *col += f.chars().count() + 1;
            Some((here, f))
        })
        .filter(|(_, f)| !f.is_empty());
    let (id_col, id) = fields.next().expect("a non-blank line has a field");
    if !valid_key_id(id) {
        return Err((id_col, format!("\"{id}\" is not a valid key id; use 1-128 letters, digits or -_.:@/, not starting with '_'")));
    }
    let Some((hash_col, hash)) = fields.next() else {
        return Err((
            content.chars().count() + 1,
            format!("key \"{id}\" has no sha256; write `id sha256 [not_before] [not_after]`"),
        ));
    };
    let sha256 = digest(hash).ok_or_else(|| {
        (hash_col, format!("the sha256 of key \"{id}\" is not 64 hex characters; paste the hash printed by `specter keys new` or `specter keys hash`"))
    })?;
    let mut time = |name: &str| -> Result<Option<SystemTime>, LineError> {
        match fields.next() {
            None | Some((_, "-")) => Ok(None),
            Some((col, text)) => time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                .map(|t| Some(SystemTime::from(t)))
                .map_err(|_| (col, format!("{name} \"{text}\" of key \"{id}\" is not an RFC 3339 time with offset; write e.g. 2027-06-30T00:00:00Z, or - for none"))),
        }
    };
    let not_before = time("not_before")?;
    let not_after = time("not_after")?;
    if let Some((col, extra)) = fields.next() {
        return Err((col, format!("\"{extra}\" after the times of key \"{id}\"; a line is `id sha256 [not_before] [not_after]`")));
    }
    if let (Some(nb), Some(na)) = (not_before, not_after) {
        if nb >= na {
            return Err((id_col, format!("key \"{id}\": not_before is not earlier than not_after; the key could never be used")));
        }
    }
    let warning = not_after.and_then(|na| (na <= now).then(|| "has expired; remove it".to_owned()));
    Ok(Some((
        KeyConfig {
            id: id.to_owned(),
            sha256,
            not_before,
            not_after,
        },
        warning,
    )))
}

fn digest(hex: &str) -> Option<KeyDigest> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "3d7f4e3e1a9c5a3e8f5e3f2d8d3c2f8f2a5f4e3d2c1b0a9f8e7d6c5b4a392817";

    #[test]
    fn lines_with_and_without_times() {
        let now = SystemTime::now();
        assert!(parse_line("  # a comment\n", now).unwrap().is_none());
        assert!(parse_line("\n", now).unwrap().is_none());
        let (k, _) = parse_line(&format!("svc\t{HASH}\n"), now).unwrap().unwrap();
        assert_eq!(
            (k.id.as_str(), k.not_before, k.not_after),
            ("svc", None, None)
        );
        let line = format!("svc {HASH} - 2020-01-01T00:00:00Z");
        let (k, warning) = parse_line(&line, now).unwrap().unwrap();
        assert!(k.not_after.is_some() && warning.is_some());
    }

    #[test]
    fn bad_lines_say_which_column() {
        let now = SystemTime::now();
        let err = |line: &str| parse_line(line, now).unwrap_err();
        assert_eq!(err("_reserved abc").0, 1);
        assert_eq!(err("svc abc").0, 5);
        assert_eq!(err(&format!("svc {HASH} tomorrow")).0, 70);
        assert!(err("svc").1.contains("no sha256"));
        assert!(err(&format!("svc {HASH} - - extra")).1.contains("extra"));
        let backwards = format!("svc {HASH} 2027-01-01T00:00:00Z 2026-01-01T00:00:00Z");
        assert!(err(&backwards).1.contains("never be used"));
    }
}
