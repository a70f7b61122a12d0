//! The unified diff that dry runs print, coloured only for a terminal.

use std::path::Path;

use similar::{ChangeTag, TextDiff};

const RED: &str = "\x1b[31m";
const GREEN: &str = "\x1b[32m";
const CYAN: &str = "\x1b[36m";
const BOLD: &str = "\x1b[1m";
const RESET: &str = "\x1b[0m";

/// `--- path` / `+++ path` and hunks with three lines of context, like `diff -u`.
pub fn unified_diff(old: &str, new: &str, path: &Path, label: &str, colour: bool) -> String {
    let paint = |style: &str, line: &str| {
        if colour {
            format!("{style}{line}{RESET}\n")
        } else {
            format!("{line}\n")
        }
    };
    let diff = TextDiff::from_lines(old, new);
    let mut s = paint(BOLD, &format!("--- {}\t(current)", path.display()));
    s.push_str(&paint(BOLD, &format!("+++ {}\t{label}", path.display())));
    for hunk in diff.unified_diff().context_radius(3).iter_hunks() {
        s.push_str(&paint(CYAN, &hunk.header().to_string()));
        for change in hunk.iter_changes() {
            let (sign, style) = match change.tag() {
                ChangeTag::Delete => ('-', RED),
                ChangeTag::Insert => ('+', GREEN),
                ChangeTag::Equal => (' ', ""),
            };
            let text = change.value().trim_end_matches(['\n', '\r']);
            let line = format!("{sign}{text}");
            s.push_str(&if style.is_empty() {
                format!("{line}\n")
            } else {
                paint(style, &line)
            });
            if change.missing_newline() {
                s.push_str("\\ No newline at end of file\n");
            }
        }
    }
    s
}
