//! The one path normal form: what the policy checks is exactly what the upstream sees.
//!
//! 1. percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded, other
//!    escapes kept with upper-case hex (RFC 3986 §6.2.2);
//! 2. encoded `/`, `\` and NUL, raw `\`, malformed escapes and `..;`-style dot segments
//!    are refused: upstreams disagree on what they mean (Tomcat treats `..;` as `..`);
//! 3. empty segments collapse (`//` -> `/`) and dot segments are removed (RFC 3986 §5.2.4).

use std::borrow::Cow;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`, `%5C`, `%00`, a malformed escape, or a dot segment with parameters.
    Encoded,
    /// A raw `\`.
    Backslash,
    /// Not an absolute path (`*`, or a target without a leading `/`).
    NotOriginForm,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::Encoded => "the path has an encoded slash, backslash or NUL, a malformed escape, or a dot segment with parameters",
            PathError::Backslash => "the path has a backslash",
            PathError::NotOriginForm => "the request target is not an absolute path",
        })
    }
}

impl std::error::Error for PathError {}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalises an origin-form path (no query). Returns the path to check and forward,
/// borrowed when it already is in normal form (the usual case).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    // Fast path: nothing to decode and no segment that could change.
    let bytes = path.as_bytes();
    let simple = !bytes.iter().any(|&b| matches!(b, b'%' | b'\\' | b'.')) && !path.contains("//");
    if simple {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(bytes)?;
    let ends_with_slash = decoded.ends_with('/');
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = ends_with_slash;
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    for (i, seg) in segments.iter().enumerate() {
        match *seg {
            "" => {}
            "." => trailing |= i == last,
            ".." => {
                out.pop();
                trailing |= i == last;
            }
            s if s.starts_with(".;") || s.starts_with("..;") => return Err(PathError::Encoded),
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for seg in &out {
        result.push('/');
        result.push_str(seg);
    }
    if result.is_empty() || (trailing && !out.is_empty()) {
        result.push('/');
    }
    Ok(Cow::Owned(result))
}

/// The path with every segment's `;parameters` removed (and segments left empty by
/// that collapsed), as a servlet container routes it: `/a;x=1/b` -> `/a/b`.
pub fn without_parameters(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for segment in path.split('/').skip(1) {
        let segment = segment.split(';').next().unwrap_or_default();
        if !segment.is_empty() {
            out.push('/');
            out.push_str(segment);
        }
    }
    if out.is_empty() || path.ends_with('/') {
        out.push('/');
    }
    out
}

fn decode_unreserved(bytes: &[u8]) -> Result<String, PathError> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => return Err(PathError::Backslash),
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(hex_value);
                let lo = bytes.get(i + 2).copied().and_then(hex_value);
                let (Some(hi), Some(lo)) = (hi, lo) else {
                    return Err(PathError::Encoded);
                };
                let b = hi << 4 | lo;
                match b {
                    b'/' | b'\\' | 0 => return Err(PathError::Encoded),
                    b if is_unreserved(b) => out.push(b),
                    b => {
                        const HEX: &[u8; 16] = b"0123456789ABCDEF";
                        out.extend_from_slice(&[
                            b'%',
                            HEX[(b >> 4) as usize],
                            HEX[(b & 0xf) as usize],
                        ]);
                    }
                }
                i += 3;
            }
            // Bytes pass through as they are: a UTF-8 path stays the same UTF-8.
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII replaced ASCII escapes, so the UTF-8 of the input is intact.
    String::from_utf8(out).map_err(|_| PathError::Encoded)
}

/// The stored form of a path prefix: normalised, without a trailing `/` (except `/`).
pub fn prefix_form(normalized: &str) -> String {
    let trimmed = normalized.trim_end_matches('/');
    if trimmed.is_empty() {
        "/".to_owned()
    } else {
        trimmed.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_stored_without_a_trailing_slash() {
        assert_eq!(prefix_form("/v1/"), "/v1");
        assert_eq!(prefix_form("/"), "/");
    }

    #[test]
    fn normal_forms() {
        let cases = [
            ("/", "/"),
            ("/v1/x", "/v1/x"),
            ("/v1/../admin", "/admin"),
            ("/v1/%2e%2e/admin", "/admin"),
            ("/v1/%2E%2E/admin", "/admin"),
            ("//admin", "/admin"),
            ("/v1/./x", "/v1/x"),
            ("/%61dmin", "/admin"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/../../etc", "/etc"),
            ("/v1/x/", "/v1/x/"),
            ("/v1/%7euser", "/v1/~user"),
            ("/v1/a%20b", "/v1/a%20b"),
            ("/v1/a%c3%a9", "/v1/a%C3%A9"),
            ("/..", "/"),
            ("/v1//..//x", "/x"),
            ("/v1/caf\u{e9}/./x", "/v1/caf\u{e9}/x"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize_path(input).as_deref(), Ok(want), "{input}");
        }
    }

    #[test]
    fn refused_forms() {
        for input in [
            "/admin%00",
            "/v1/x%2Fy",
            "/v1/x%2fy",
            "/v1%5cx",
            "/v1\\x",
            "/v1/..;/admin",
            "/%zz",
            "/%4",
            "*",
        ] {
            assert!(normalize_path(input).is_err(), "{input}");
        }
    }
}
