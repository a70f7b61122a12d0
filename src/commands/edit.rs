//! Editing the config file the safe way, shared by `specter promote` and the writing
//! `specter keys` commands: read it (keeping its digest), parse it so that untouched
//! parts write back byte for byte, validate the result exactly as `specter check`
//! does, show the change as a unified diff, and replace the file atomically unless
//! someone changed it since it was read.
//!
//! - `document`: the layout-keeping parse and finding environments however written
//! - `diff`: the unified diff printed by dry runs
//! - `write`: the atomic replace that refuses when the file changed underneath

mod diff;
pub mod document;
mod write;

use std::path::{Path, PathBuf};

use crate::config::{self, sha256, ConfigErrors, KeyDigest, Loaded};

pub use diff::unified_diff;
pub use write::write_atomically;

#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: the file is not UTF-8 ({source}); save it as UTF-8", path.display())]
    NotUtf8 {
        path: PathBuf,
        #[source]
        source: std::string::FromUtf8Error,
    },
    #[error("{}:{line}:{col}: not valid TOML: {}", path.display(), source.message().trim_end())]
    Unparsable {
        path: PathBuf,
        line: usize,
        col: usize,
        #[source]
        source: Box<toml_edit::TomlError>,
    },
    #[error("{}:{line}: this line would be rewritten even without any change, so the file's layout could not be kept (dotted keys of one table split by other keys?); group them and run again", path.display())]
    Layout { path: PathBuf, line: usize },
    #[error("unknown environment \"{name}\"; {} has: {known}", path.display())]
    UnknownEnvironment {
        name: String,
        path: PathBuf,
        known: String,
    },
    #[error(
        "{action} would leave an invalid config{}, so nothing was written; \
         line:col below refer to the file as it would be after {after}:\n{source}",
        if *already_invalid { " (the current file fails `specter check` too)" } else { "" }
    )]
    Invalid {
        /// What was attempted, e.g. `promoting qa onto production`.
        action: String,
        /// The same as a noun, e.g. `promotion`.
        after: &'static str,
        already_invalid: bool,
        #[source]
        source: ConfigErrors,
    },
    #[error("the config changed since it was read; run again ({} was left as it is)", path.display())]
    Changed { path: PathBuf },
    #[error("cannot write {}: {source}; the file was left as it was", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The config file's text and the SHA-256 of its bytes as read; the digest is what
/// [`write_atomically`] compares against to notice a concurrent edit.
pub fn read_config(path: &Path) -> Result<(String, KeyDigest), EditError> {
    let bytes = std::fs::read(path).map_err(|source| EditError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let digest = sha256(&bytes);
    let text = String::from_utf8(bytes).map_err(|source| EditError::NotUtf8 {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((text, digest))
}

/// Validates `new_text` as `specter check` would (certificates included, relative
/// paths anchored at `path`). On failure the error says whether `old_text` failed too,
/// so the user knows whether the edit or the file is to blame.
pub fn validate(
    new_text: &str,
    old_text: &str,
    path: &Path,
    action: impl FnOnce() -> String,
    after: &'static str,
) -> Result<Loaded, EditError> {
    config::parse(new_text, path).map_err(|source| EditError::Invalid {
        action: action(),
        after,
        already_invalid: config::parse(old_text, path).is_err(),
        source,
    })
}
