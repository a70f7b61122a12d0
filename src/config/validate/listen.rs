//! `[listen]` rules beyond each address parsing: two listeners that the kernel would
//! refuse to bind together, and an admin listener reachable from other machines.

use std::net::SocketAddr;

use toml::Spanned;

use super::Validator;

/// One listener as written: its key, its parsed address and where it is.
pub(super) struct Listener<'a> {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub raw: &'a Spanned<String>,
}

/// Whether binding both would fail with "address in use". Port 0 is always free. An
/// unspecified address takes the port on every address of its family, and `[::]` on
/// Linux (dual stack, `bindv6only = 0`) takes the IPv4 port too.
fn overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    let (x, y) = (a.ip(), b.ip());
    let covers = |u: std::net::IpAddr, other: std::net::IpAddr| {
        u.is_unspecified() && (u.is_ipv6() || u.is_ipv4() == other.is_ipv4())
    };
    x == y || covers(x, y) || covers(y, x)
}

impl Validator<'_> {
    pub(super) fn check_listeners(&mut self, listeners: &[Listener<'_>]) {
        for (i, b) in listeners.iter().enumerate() {
            if let Some(a) = listeners[..i].iter().find(|a| overlap(a.addr, b.addr)) {
                let why = if a.addr.ip() == b.addr.ip() {
                    String::new()
                } else {
                    let wide = if a.addr.ip().is_unspecified() { a } else { b };
                    format!(
                        " ({} takes port {} on every address)",
                        wide.addr.ip(),
                        wide.addr.port()
                    )
                };
                self.fail::<()>(
                    b.raw.span(),
                    format!(
                        "listen.{}: \"{}\" clashes with listen.{} = \"{}\"{why}; give each listener its own port",
                        b.key,
                        b.raw.get_ref(),
                        a.key,
                        a.raw.get_ref()
                    ),
                );
            }
        }
        if let Some(admin) = listeners.iter().find(|l| l.key == "admin") {
            if !admin.addr.ip().is_loopback() {
                self.warn(
                    admin.raw.span(),
                    format!(
                        "listen.admin: \"{}\" is reachable from other machines, and /config, /keys and /metrics have no authentication; bind it to 127.0.0.1 or [::1] unless a firewall guards it",
                        admin.raw.get_ref()
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::overlap;

    #[test]
    fn listeners_overlap_like_the_kernel_says() {
        let clash = |a: &str, b: &str| overlap(a.parse().unwrap(), b.parse().unwrap());
        assert!(clash("127.0.0.1:8080", "127.0.0.1:8080"));
        assert!(clash("0.0.0.0:8080", "127.0.0.1:8080"));
        assert!(clash("127.0.0.1:8080", "0.0.0.0:8080"));
        assert!(clash("[::]:8080", "[::1]:8080"));
        assert!(clash("[::]:8080", "127.0.0.1:8080"));
        assert!(!clash("0.0.0.0:8080", "[::1]:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.2:8080"));
        assert!(!clash("127.0.0.1:8080", "127.0.0.1:8081"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"));
    }
}
