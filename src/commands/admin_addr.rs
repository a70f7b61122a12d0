//! Where a running gateway's admin listener is, for commands that ask it (`keys usage`):
//! what the user typed (`host:port` or the `http://host:port` the demo prints), else
//! the config's `listen.admin`, else the documented default.

use std::net::SocketAddr;
use std::path::Path;

pub const DEFAULT: &str = "127.0.0.1:9901";

#[derive(Debug, thiserror::Error)]
pub enum AdminAddrError {
    #[error("--admin {0:?} is not an admin address; write host:port or http://host:port, e.g. 127.0.0.1:9901")]
    Malformed(String),
    #[error("--admin {0:?}: the admin listener speaks plain http; write http://{1}")]
    Https(String, String),
    #[error("cannot find the admin listener in {path}: {why}; pass --admin host:port")]
    Config { path: String, why: String },
}

/// The `host:port` to connect to.
pub fn resolve(given: Option<&str>, config: &Path) -> Result<String, AdminAddrError> {
    match given {
        Some(text) => parse(text),
        None if config.exists() => from_config(config),
        None => Ok(DEFAULT.to_owned()),
    }
}

/// `host:port`, `http://host:port` or `http://host:port/`.
pub fn parse(text: &str) -> Result<String, AdminAddrError> {
    let malformed = || AdminAddrError::Malformed(text.to_owned());
    let trimmed = text.trim().trim_end_matches('/');
    if let Some(rest) = trimmed.strip_prefix("https://") {
        return Err(AdminAddrError::Https(text.to_owned(), rest.to_owned()));
    }
    let authority = trimmed.strip_prefix("http://").unwrap_or(trimmed);
    let uri: http::uri::Authority = authority.parse().map_err(|_| malformed())?;
    if uri.port_u16().is_none() || authority.contains(['/', '@']) {
        return Err(malformed());
    }
    Ok(authority.to_owned())
}

/// `listen.admin` of the file at `path`; an unspecified address (`0.0.0.0`, `[::]`)
/// is reached on loopback.
fn from_config(path: &Path) -> Result<String, AdminAddrError> {
    let fail = |why: String| AdminAddrError::Config {
        path: path.display().to_string(),
        why,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| fail(e.message().to_owned()))?;
    let admin = table
        .get("listen")
        .and_then(|l| l.get("admin"))
        .and_then(|a| a.as_str())
        .ok_or_else(|| fail("it has no listen.admin".to_owned()))?;
    let mut addr: SocketAddr = admin
        .parse()
        .map_err(|_| fail(format!("listen.admin {admin:?} is not host:port")))?;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(addr.to_string())
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn the_printed_url_and_host_port_are_both_accepted() {
        for (given, wanted) in [
            ("127.0.0.1:9901", "127.0.0.1:9901"),
            ("http://127.0.0.1:9901", "127.0.0.1:9901"),
            ("http://127.0.0.1:9901/", "127.0.0.1:9901"),
            ("http://[::1]:9901", "[::1]:9901"),
            ("localhost:9901", "localhost:9901"),
        ] {
            assert_eq!(parse(given).unwrap(), wanted, "{given}");
        }
        for bad in [
            "127.0.0.1",
            "http://127.0.0.1/keys",
            "https://127.0.0.1:9901",
            "a b",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
