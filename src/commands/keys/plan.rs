//! An edit of the config in progress: the file as read (text and digest), the
//! document the command changes, and what it tells the operator. [`Plan::finish`]
//! validates the result as `specter check` does, then shows it (dry run) or writes it
//! through `commands::edit`, and only then hands out the plaintext key.

use std::io::Write;
use std::path::Path;

use toml_edit::{DocumentMut, Item};

use super::change::EditOptions;
use super::entries::{self, Entry, NewKey};
use super::KeysError;
use crate::commands::edit::{self, document, EditError};
use crate::config::{self, hex, ConfigWarning, KeyDigest};

/// The config being edited: its text as read, the digest that detects a concurrent
/// edit, and the document the command changes.
pub(super) struct ConfigEdit<'a> {
    path: &'a Path,
    env: String,
    text: String,
    digest: KeyDigest,
    doc: DocumentMut,
    ends: document::LineEnds,
}

impl<'a> ConfigEdit<'a> {
    pub(super) fn open(path: &'a Path, env: &str) -> Result<ConfigEdit<'a>, KeysError> {
        let (text, digest) = edit::read_config(path)?;
        let (doc, ends) = document::parse(&text, path)?;
        document::require_environment(&doc, env, path)?;
        Ok(ConfigEdit {
            path,
            env: env.to_owned(),
            text,
            digest,
            doc,
            ends,
        })
    }

    fn environment(&self) -> &Item {
        document::environment(&self.doc, &self.env).expect("checked when opened")
    }

    pub(super) fn environment_mut(&mut self) -> &mut Item {
        document::environment_mut(&mut self.doc, &self.env).expect("checked when opened")
    }

    pub(super) fn entries(&self) -> Vec<Entry> {
        entries::entries(self.environment())
    }

    pub(super) fn entry(&self, id: &str) -> Result<Entry, KeysError> {
        let all = self.entries();
        all.iter()
            .find(|e| e.id == id)
            .cloned()
            .ok_or_else(|| {
                let mut known = known_ids(&all);
                if let Some(file) = self.environment().get("keys_file").and_then(Item::as_str) {
                    known.push_str(&format!("; keys listed in its keys_file {file} are not edited by this command: change that file (one `id sha256 [not_before] [not_after]` per line, written beside it and renamed over)"));
                }
                KeysError::UnknownKey {
                    id: id.to_owned(),
                    env: self.env.clone(),
                    known,
                }
            })
    }

    pub(super) fn key_mut(&mut self, id: &str) -> Result<entries::KeyMut<'_>, KeysError> {
        let env = self.env.clone();
        entries::find_mut(self.environment_mut(), id).ok_or(KeysError::UnknownKey {
            id: id.to_owned(),
            env,
            known: String::new(),
        })
    }

    pub(super) fn append(&mut self, key: &NewKey<'_>, after: Option<&str>) {
        entries::append(self.environment_mut(), key, after);
    }

    pub(super) fn plan(self, action: String, said: Vec<String>, touched: Option<&str>) -> Plan<'a> {
        Plan {
            file: self,
            action,
            said,
            touched: touched.map(str::to_owned),
            key: None,
            nothing_to_do: None,
        }
    }
}

/// An edit worked out but not yet validated or written; [`Plan::finish`] does both.
pub struct Plan<'a> {
    file: ConfigEdit<'a>,
    /// e.g. `adding key "qa-2" to qa`, for the error when validation fails.
    action: String,
    /// What changed, one line each, told on stderr.
    said: Vec<String>,
    /// The key whose expiry the command set on purpose: no warnings about it.
    touched: Option<String>,
    /// The plaintext key, printed on stdout once the file is written.
    pub(super) key: Option<String>,
    /// Set when the file already says what was asked: nothing is written.
    pub(super) nothing_to_do: Option<String>,
}

impl std::fmt::Debug for Plan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Plan")
            .field("action", &self.action)
            .field("said", &self.said)
            .finish_non_exhaustive()
    }
}

impl Plan<'_> {
    /// The config text the plan would write.
    pub fn new_text(&self) -> String {
        self.file.ends.render(&self.file.doc)
    }

    /// Validates the edited file, then prints the diff (dry run) or writes it (refused
    /// when the file changed since it was read) and prints what changed, and the key
    /// on `out` only once the file holds its hash.
    pub fn finish(
        self,
        opts: &EditOptions<'_>,
        out: &mut dyn Write,
        err: &mut dyn Write,
    ) -> Result<(), KeysError> {
        if let Some(why) = &self.nothing_to_do {
            let _ = writeln!(err, "{why}");
            return Ok(());
        }
        let new_text = self.new_text();
        let loaded = edit::validate(
            &new_text,
            &self.file.text,
            self.file.path,
            || self.action.clone(),
            "the edit",
        )?;
        self.warn_about_news(&loaded.warnings, err);
        if opts.dry_run {
            self.show(&new_text, opts.colour, out, err);
            return Ok(());
        }
        let file = &self.file;
        let written = edit::write_atomically(file.path, new_text.as_bytes(), &file.digest)?;
        for line in &self.said {
            let _ = writeln!(err, "{line}");
        }
        let _ = writeln!(
            err,
            "wrote {} (sha256 {}); a gateway watching it reloads it now",
            file.path.display(),
            hex(&written)
        );
        if let Some(key) = &self.key {
            let _ = writeln!(out, "{key}");
            let _ = writeln!(
                err,
                "the new key is on stdout, shown this once (the file holds only its SHA-256): hand it to its owner now"
            );
        }
        Ok(())
    }

    /// Warnings `specter check` gives for the new file and not for the old one, except
    /// those about the key whose end the command set on purpose.
    fn warn_about_news(&self, warnings: &[ConfigWarning], err: &mut dyn Write) {
        let before: Vec<String> = config::parse(&self.file.text, self.file.path)
            .map(|l| l.warnings.iter().map(|w| w.message.clone()).collect())
            .unwrap_or_default();
        let quiet = self.touched.as_ref().map(|id| format!("(id \"{id}\")"));
        for w in warnings {
            let about_touched = quiet.as_ref().is_some_and(|q| w.message.contains(q));
            if !before.contains(&w.message) && !about_touched {
                let _ = writeln!(err, "{w}");
            }
        }
    }

    /// The dry run: the diff on `out`, hashes shortened; what would change on `err`.
    fn show(&self, new_text: &str, colour: bool, out: &mut dyn Write, err: &mut dyn Write) {
        let file = &self.file;
        let label = format!("(after {})", self.action);
        let (old, new) = (redact_hashes(&file.text), redact_hashes(new_text));
        let diff = edit::unified_diff(&old, &new, file.path, &label, colour);
        let _ = write!(out, "{diff}");
        for line in &self.said {
            let _ = writeln!(err, "would have {line}");
        }
        let _ = writeln!(
            err,
            "dry run: nothing written to {}; key hashes in the diff are shortened",
            file.path.display()
        );
        if self.key.is_some() {
            let _ = writeln!(
                err,
                "the key minted for this dry run was not kept; the real run mints another"
            );
        }
    }
}

fn known_ids(all: &[Entry]) -> String {
    if all.is_empty() {
        "it has no keys".to_owned()
    } else {
        let ids: Vec<&str> = all.iter().map(|e| e.id.as_str()).collect();
        format!("it has: {}", ids.join(", "))
    }
}

/// Shortens every 64-hex-digit run (a key hash) to its first 6 digits, as the
/// validator's messages do: diffs of key blocks show which key, not its hash.
fn redact_hashes(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < bytes.len() {
        let run = bytes[i..]
            .iter()
            .take_while(|b| b.is_ascii_hexdigit())
            .count();
        let bounded = i == 0 || !bytes[i - 1].is_ascii_alphanumeric();
        if run == 64 && bounded {
            out.push_str(&text[i..i + 6]);
            out.push_str("...");
            i += 64;
        } else {
            let step = run.max(1);
            let end = (i + step..=text.len())
                .find(|e| text.is_char_boundary(*e))
                .unwrap_or(text.len());
            out.push_str(&text[i..end]);
            i = end;
        }
    }
    out
}

impl From<EditError> for KeysError {
    fn from(e: EditError) -> Self {
        KeysError::Edit(Box::new(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_shortened_and_nothing_else_changes() {
        let h = "ab".repeat(32);
        let text = format!("id = \"é\"\nsha256 = \"{h}\"\nx = \"{h}1\"\n");
        let r = redact_hashes(&text);
        assert_eq!(
            r,
            format!("id = \"é\"\nsha256 = \"ababab...\"\nx = \"{h}1\"\n")
        );
    }
}
