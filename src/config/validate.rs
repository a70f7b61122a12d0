//! Raw file types -> validated [`Config`]. Every rejection names the key path, the bad
//! value and what would be valid; validation goes on after an error so all are reported.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::header::HeaderName;
use http::{HeaderValue, Method, Uri};
use ipnet::IpNet;
use toml::value::Datetime;
use toml::Spanned;

use super::error::SourceMap;
use super::file::*;
use super::*;
use crate::path::normalize_path;

mod listen;
mod store;
mod tracing_table;

/// Keys expiring within this window are reported by `specter check`.
pub const KEY_EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// Request headers that configuration may not set or remove: framing, routing and the
/// gateway's own identity headers belong to specter alone.
const RESERVED_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "content-length",
    "te",
    "trailer",
    "upgrade",
    "host",
    "x-specter-environment",
    "x-specter-key-id",
    "x-specter-client-cert-subject",
];

/// The documented range of every duration and size (README, "Value ranges"): any value
/// `check` accepts is one `run` can use, on timers, clocks and limiters alike.
pub mod range {
    use std::time::Duration;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }
    const fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }
    const DAY: u64 = 86_400;

    pub const HEADER_READ_TIMEOUT: (Duration, Duration) = (ms(100), s(3600));
    /// The sweeper looks at connections every quarter of it (or of header_read_timeout).
    pub const IDLE_TIMEOUT: (Duration, Duration) = (s(1), s(DAY));
    pub const SHUTDOWN_GRACE: (Duration, Duration) = (ms(1), s(3600));
    pub const BODY_READ_TIMEOUT: (Duration, Duration) = (ms(100), s(3600));
    pub const BODY_TIMEOUT: (Duration, Duration) = (s(1), s(DAY));
    pub const CONNECT_TIMEOUT: (Duration, Duration) = (ms(1), s(300));
    pub const REQUEST_TIMEOUT: (Duration, Duration) = (ms(1), s(DAY));
    pub const STORE_TIMEOUT: (Duration, Duration) = (ms(1), s(10));
    /// Lease mode: how old a batch may get before it goes back to Redis.
    pub const LEASE_TTL: (Duration, Duration) = (ms(10), s(10));
    pub const RATE_PER: (Duration, Duration) = (ms(1), s(366 * DAY));
    /// How long a drained bucket may take to refill (burst x per / requests).
    pub const RATE_BUCKET_DEPTH: Duration = s(100 * 366 * DAY);
    pub const MAX_BODY: u64 = 1 << 40;
}

pub fn parse_and_validate(
    text: &str,
    path: &Path,
    options: CheckOptions,
) -> Result<Loaded, ConfigErrors> {
    let map = SourceMap::new(path, text);
    let raw = super::syntax::parse(&map)?;
    let mut v = Validator {
        map,
        options,
        errors: Vec::new(),
        warnings: Vec::new(),
        file_keys: HashMap::new(),
    };
    let config = v.config(raw);
    if v.errors.is_empty() {
        Ok(Loaded {
            config: config.expect("a config without errors was built"),
            warnings: v.warnings,
        })
    } else {
        Err(ConfigErrors(v.errors))
    }
}

struct Validator<'a> {
    map: SourceMap<'a>,
    options: CheckOptions,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigWarning>,
    /// Where each environment's `keys_file` keys came from, for the checks across keys.
    file_keys: HashMap<String, FileKeysOrigin>,
}

/// An environment's keys from `[[keys]]` come first; these are the ones after them.
struct FileKeysOrigin {
    path: PathBuf,
    /// How many keys came from `[[keys]]` tables.
    inline: usize,
    lines: Vec<u32>,
}

impl Validator<'_> {
    fn fail<T>(&mut self, span: Range<usize>, message: String) -> Option<T> {
        self.errors.push(self.map.error(span, message));
        None
    }

    fn warn(&mut self, span: Range<usize>, message: String) {
        let location = self.map.location(span);
        self.warnings.push(ConfigWarning { location, message });
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let listen = self.listen(&raw.listen);
        let limits = self.limits(&raw.limits);
        let tls = raw.tls.as_ref().and_then(|t| self.tls(t));
        if let (Some(l), None) = (&listen, &raw.tls) {
            if l.https.is_some() {
                self.fail::<()>(
                    raw.listen.span(),
                    "listen.https is set but there is no [tls] section; add [tls] with at least one [[tls.certificates]], or remove listen.https".into(),
                );
            }
        }
        let auth = self.auth(&raw.auth);
        let environments = self.environments(&raw.environments);
        let store = raw.rate_limit_store.as_ref().and_then(|s| self.store(s));
        let tracing = self.tracing(raw.tracing.as_ref());
        let sha256 = hex(&sha256(self.map.text.as_bytes()));
        Some(Config {
            listen: listen?,
            limits: limits?,
            tls,
            auth: auth?,
            environments: environments?,
            rate_limit_store: store,
            tracing: tracing?,
            source: ConfigSource {
                path: self.map.file.to_path_buf(),
                sha256,
            },
        })
    }

    fn listen(&mut self, raw: &Spanned<RawListen>) -> Option<ListenConfig> {
        let l = raw.get_ref();
        let http = l
            .http
            .as_ref()
            .and_then(|a| self.socket_addr("listen.http", a));
        let https = l
            .https
            .as_ref()
            .and_then(|a| self.socket_addr("listen.https", a));
        let admin = l
            .admin
            .as_ref()
            .and_then(|a| self.socket_addr("listen.admin", a));
        let trusted_proxies = l
            .trusted_proxies
            .iter()
            .filter_map(|c| self.cidr("listen.trusted_proxies", c))
            .collect();
        let admin_hosts = l
            .admin_hosts
            .iter()
            .filter_map(|h| self.admin_host(h))
            .collect();
        let written = [
            ("http", &l.http, http),
            ("https", &l.https, https),
            ("admin", &l.admin, admin),
        ];
        let listeners: Vec<listen::Listener<'_>> = written
            .into_iter()
            .filter_map(|(key, raw, addr)| {
                Some(listen::Listener {
                    key,
                    addr: addr?,
                    raw: raw.as_ref()?,
                })
            })
            .collect();
        self.check_listeners(&listeners);
        if l.http.is_none() && l.https.is_none() {
            return self.fail(
                raw.span(),
                "[listen] needs `http` or `https` (or both), e.g. http = \"127.0.0.1:8080\"".into(),
            );
        }
        Some(ListenConfig {
            http,
            https,
            admin,
            trusted_proxies,
            admin_hosts,
        })
    }

    fn admin_host(&mut self, raw: &Spanned<String>) -> Option<String> {
        let host = raw.get_ref().to_ascii_lowercase();
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if valid {
            Some(host)
        } else {
            self.fail(
                raw.span(),
                format!("listen.admin_hosts: \"{}\" is not a host name; write the name without scheme or port, e.g. \"admin.internal\"", raw.get_ref()),
            )
        }
    }

    fn limits(&mut self, raw: &RawLimits) -> Option<LimitsConfig> {
        // Every value is checked even after a bad one, so one run reports them all.
        fn keep<T>(slot: &mut T, checked: Option<T>) {
            if let Some(value) = checked {
                *slot = value;
            }
        }
        let mut l = LimitsConfig::default();
        let before = self.errors.len();
        if let Some(n) = &raw.max_connections {
            let n = self.positive("limits.max_connections", n, 1 << 24);
            keep(&mut l.max_connections, n.map(|n| n as usize));
        }
        if let Some(d) = &raw.header_read_timeout {
            keep(
                &mut l.header_read_timeout,
                self.duration_in("limits.header_read_timeout", d, range::HEADER_READ_TIMEOUT),
            );
        }
        if let Some(d) = &raw.idle_timeout {
            keep(
                &mut l.idle_timeout,
                self.duration_in("limits.idle_timeout", d, range::IDLE_TIMEOUT),
            );
        }
        if let Some(s) = &raw.max_header_bytes {
            let bytes = match self.size("limits.max_header_bytes", s) {
                Some(bytes) if !(8192..=16 << 20).contains(&bytes) => self.fail(
                    s.span(),
                    format!(
                        "limits.max_header_bytes: \"{}\" is out of range; use between \"8KiB\" and \"16MiB\"",
                        s.get_ref()
                    ),
                ),
                checked => checked,
            };
            keep(&mut l.max_header_bytes, bytes.map(|b| b as usize));
        }
        if let Some(n) = &raw.max_headers {
            let n = self.positive("limits.max_headers", n, 10_000);
            keep(&mut l.max_headers, n.map(|n| n as usize));
        }
        if let Some(d) = &raw.shutdown_grace {
            keep(
                &mut l.shutdown_grace,
                self.duration_in("limits.shutdown_grace", d, range::SHUTDOWN_GRACE),
            );
        }
        if let Some(d) = &raw.body_read_timeout {
            keep(
                &mut l.body_read_timeout,
                self.duration_in("limits.body_read_timeout", d, range::BODY_READ_TIMEOUT),
            );
        }
        if let Some(n) = &raw.max_connections_per_ip {
            let n = self.positive("limits.max_connections_per_ip", n, 1 << 24);
            keep(&mut l.max_connections_per_ip, n.map(|n| Some(n as usize)));
        }
        if let Some(q) = &raw.unauthenticated {
            let q = self.quota("limits.unauthenticated", q);
            keep(&mut l.unauthenticated, q.map(Some));
        }
        if let Some(d) = &raw.body_timeout {
            let whole = self.duration_in("limits.body_timeout", d, range::BODY_TIMEOUT);
            keep(&mut l.body_timeout, whole.map(Some));
        }
        (self.errors.len() == before).then_some(l)
    }

    fn tls(&mut self, raw: &Spanned<RawTls>) -> Option<TlsConfig> {
        let t = raw.get_ref();
        let min_version = match t.min_version.as_ref().map(|v| v.get_ref().as_str()) {
            None | Some("1.2") => Some(TlsVersion::V1_2),
            Some("1.3") => Some(TlsVersion::V1_3),
            Some(other) => {
                let span = t.min_version.as_ref().map(|v| v.span()).unwrap_or_default();
                self.fail(
                    span,
                    format!(
                        "tls.min_version: \"{other}\" is not supported; use \"1.2\" or \"1.3\""
                    ),
                )
            }
        };
        if t.certificates.is_empty() {
            return self.fail(
                raw.span(),
                "[tls] has no certificate; add a [[tls.certificates]] with `cert` and `key` (specter certs dev writes a local one)".into(),
            );
        }
        let mut certificates = Vec::new();
        for (i, c) in t.certificates.iter().enumerate() {
            let c = c.get_ref();
            let cert_path = PathBuf::from(c.cert.get_ref());
            let key_path = PathBuf::from(c.key.get_ref());
            if let Err(e) = crate::tls::load_certified_key(&cert_path, &key_path) {
                self.fail::<()>(c.cert.span(), format!("tls.certificates[{i}]: {e}"));
                continue;
            }
            certificates.push(CertificateConfig {
                cert_path,
                key_path,
            });
        }
        let client_ca = match &t.client_ca {
            Some(ca) => {
                let path = PathBuf::from(ca.get_ref());
                match crate::tls::load_roots(&path) {
                    Ok(_) => Some(Some(path)),
                    Err(e) => self.fail(ca.span(), format!("tls.client_ca: {e}")),
                }
            }
            None => Some(None),
        };
        Some(TlsConfig {
            min_version: min_version?,
            client_ca: client_ca?,
            certificates,
        })
    }

    fn auth(&mut self, raw: &RawAuth) -> Option<AuthConfig> {
        let Some(h) = &raw.header else {
            return Some(AuthConfig {
                header: HeaderName::from_static("x-api-key"),
            });
        };
        let name = h.get_ref().to_ascii_lowercase();
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) if !RESERVED_HEADERS.contains(&name.as_str()) && name != "authorization" => {
                Some(AuthConfig { header })
            }
            _ => self.fail(
                h.span(),
                format!(
                    "auth.header: \"{}\" cannot carry API keys; use a plain header name such as \"x-api-key\" (Authorization: Bearer is always accepted)",
                    h.get_ref()
                ),
            ),
        }
    }

    fn environments(
        &mut self,
        raw: &BTreeMap<Spanned<String>, Spanned<RawEnvironment>>,
    ) -> Option<Vec<EnvironmentConfig>> {
        let before = self.errors.len();
        if raw.is_empty() {
            return self.fail(
                0..0,
                "no environment is configured; add e.g. [environments.development] with an upstream and keys".into(),
            );
        }
        let mut envs = Vec::new();
        for (name, env) in raw {
            if let Some(e) = self.environment(name, env) {
                envs.push(e);
            }
        }
        self.check_key_uniqueness(raw);
        self.check_file_keys(&envs);
        self.check_shared_upstreams(raw, &envs);
        (self.errors.len() == before).then_some(envs)
    }

    fn environment(
        &mut self,
        name: &Spanned<String>,
        raw: &Spanned<RawEnvironment>,
    ) -> Option<EnvironmentConfig> {
        let n = name.get_ref();
        let before = self.errors.len();
        if !valid_environment_name(n) {
            self.fail::<()>(
                name.span(),
                format!("environments.{n}: \"{n}\" is not a valid environment name; use lower-case letters, digits, '_' and '-' (e.g. \"qa\")"),
            );
        }
        let e = raw.get_ref();
        let upstreams = self.upstreams(n, raw);
        let hosts = e.hosts.iter().filter_map(|h| self.host(n, h)).collect();
        let connect_timeout = self.duration_or(
            &format!("environments.{n}.connect_timeout"),
            &e.connect_timeout,
            Duration::from_secs(2),
            range::CONNECT_TIMEOUT,
        );
        let request_timeout = self.duration_or(
            &format!("environments.{n}.request_timeout"),
            &e.request_timeout,
            Duration::from_secs(30),
            range::REQUEST_TIMEOUT,
        );
        let upstream_ca = e.upstream_ca.as_ref().and_then(|ca| {
            let path = PathBuf::from(ca.get_ref());
            match crate::tls::load_roots(&path) {
                Ok(_) => Some(path),
                Err(err) => self.fail(ca.span(), format!("environments.{n}.upstream_ca: {err}")),
            }
        });
        let upstream_sni = e.upstream_sni.as_ref().and_then(|sni| {
            match rustls_pki_types::ServerName::try_from(sni.get_ref().as_str()) {
                Ok(_) => Some(sni.get_ref().clone()),
                Err(_) => self.fail(
                    sni.span(),
                    format!("environments.{n}.upstream_sni: \"{}\" is not a DNS name or IP address; write e.g. \"backend.internal\"", sni.get_ref()),
                ),
            }
        });
        let shares = e
            .shares_upstream_with
            .iter()
            .map(|s| s.get_ref().clone())
            .collect();
        let rate_limit = self.rate_limit(n, &e.rate_limit);
        let policy = self.policy(n, &e.policy);
        let mut keys: Vec<KeyConfig> = e
            .keys
            .iter()
            .enumerate()
            .filter_map(|(i, k)| self.key(n, i, k))
            .collect();
        let keys_file = e.keys_file.as_ref().map(|f| PathBuf::from(f.get_ref()));
        if let Some(path) = &keys_file {
            match super::keys_file::read(path, n, &self.options, &mut self.warnings) {
                Ok(file) => {
                    let origin = FileKeysOrigin {
                        path: path.clone(),
                        inline: keys.len(),
                        lines: file.lines,
                    };
                    // Moved, not copied, when there are no [[keys]] tables: a copy of a
                    // million keys would double the peak of a reload.
                    if keys.is_empty() {
                        keys = file.keys;
                    } else {
                        keys.extend(file.keys);
                    }
                    self.file_keys.insert(n.clone(), origin);
                }
                Err(errors) => self.errors.extend(errors),
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(EnvironmentConfig {
            name: n.clone(),
            upstreams: upstreams?,
            hosts,
            connect_timeout: connect_timeout?,
            request_timeout: request_timeout?,
            http2: e.http2,
            preserve_host: e.preserve_host,
            upstream_ca,
            upstream_sni,
            shares_upstream_with: shares,
            rate_limit: rate_limit?,
            policy: policy?,
            keys,
            keys_file,
        })
    }

    fn upstreams(&mut self, env: &str, raw: &Spanned<RawEnvironment>) -> Option<Vec<Upstream>> {
        let e = raw.get_ref();
        let (key, list): (&str, Vec<&Spanned<String>>) = match (&e.upstream, &e.upstreams) {
            (Some(one), None) => ("upstream", vec![one]),
            (None, Some(many)) if !many.get_ref().is_empty() => {
                ("upstreams", many.get_ref().iter().collect())
            }
            (Some(one), Some(_)) => {
                return self.fail(
                    one.span(),
                    format!("environments.{env}: both `upstream` and `upstreams` are set; keep one (`upstreams = [...]` for several)"),
                )
            }
            _ => {
                return self.fail(
                    raw.span(),
                    format!("environments.{env}: no upstream; add upstream = \"http://127.0.0.1:8000\" (or upstreams = [...])"),
                )
            }
        };
        let before = self.errors.len();
        let ups: Vec<Upstream> = list
            .into_iter()
            .filter_map(|u| self.upstream(&format!("environments.{env}.{key}"), u))
            .collect();
        (self.errors.len() == before).then_some(ups)
    }

    fn upstream(&mut self, path: &str, raw: &Spanned<String>) -> Option<Upstream> {
        let s = raw.get_ref();
        let bad = |why: &str| {
            format!(
                "{path}: \"{s}\" {why}; write e.g. \"http://10.0.0.5:8000\" or \"https://backend.internal\""
            )
        };
        let uri: Uri = match s.parse() {
            Ok(u) => u,
            Err(_) => return self.fail(raw.span(), bad("is not a URL")),
        };
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(_) => {
                return self.fail(
                    raw.span(),
                    bad("has an unsupported scheme (only http and https)"),
                )
            }
            None => return self.fail(raw.span(), bad("has no scheme")),
        };
        let Some(authority) = uri.authority() else {
            return self.fail(raw.span(), bad("has no host"));
        };
        if authority.as_str().contains('@') {
            return self.fail(
                raw.span(),
                bad("carries credentials, which are not supported"),
            );
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return self.fail(
                raw.span(),
                bad("has a path or query, which upstreams may not have"),
            );
        }
        let explicit_port = authority.as_str()[authority.host().len()..].strip_prefix(':');
        let port = match explicit_port.map(str::parse::<u16>) {
            None => {
                if tls {
                    443
                } else {
                    80
                }
            }
            Some(Ok(port)) if port > 0 => port,
            Some(_) => return self.fail(raw.span(), bad("has a port outside 1-65535")),
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let uri = Uri::builder()
            .scheme(uri.scheme_str().unwrap_or("http"))
            .authority(authority.as_str())
            .path_and_query("/")
            .build()
            .ok()?;
        Some(Upstream {
            uri,
            tls,
            host,
            port,
        })
    }

    fn host(&mut self, env: &str, raw: &Spanned<String>) -> Option<String> {
        let h = raw.get_ref().trim_end_matches('.').to_ascii_lowercase();
        let valid = !h.is_empty()
            && h.len() <= 253
            && h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'*');
        if valid {
            Some(h)
        } else {
            self.fail(
                raw.span(),
                format!("environments.{env}.hosts: \"{}\" is not a host name; write the name without scheme or port, e.g. \"api.example.com\"", raw.get_ref()),
            )
        }
    }

    fn rate_limit(&mut self, env: &str, raw: &RawRateLimit) -> Option<RateLimitConfig> {
        let before = self.errors.len();
        let per_key = raw
            .per_key
            .as_ref()
            .and_then(|q| self.quota(&format!("environments.{env}.rate_limit.per_key"), q));
        let total = raw
            .total
            .as_ref()
            .and_then(|q| self.quota(&format!("environments.{env}.rate_limit.total"), q));
        (self.errors.len() == before).then_some(RateLimitConfig { per_key, total })
    }

    fn quota(&mut self, path: &str, raw: &Spanned<RawQuota>) -> Option<QuotaConfig> {
        let q = raw.get_ref();
        let requests = self.positive(&format!("{path}.requests"), &q.requests, u32::MAX as i64);
        let per = self.duration_in(&format!("{path}.per"), &q.per, range::RATE_PER);
        let burst = match &q.burst {
            Some(b) => self.positive(&format!("{path}.burst"), b, u32::MAX as i64),
            None => requests,
        };
        let (requests, per, burst) = (requests?, per?, burst?);
        let interval = per.as_nanos() / requests as u128;
        if interval == 0 {
            return self.fail(
                q.per.span(),
                format!("{path}: {requests} requests per \"{}\" is finer than one per nanosecond; use a longer `per`", q.per.get_ref()),
            );
        }
        // The bucket's depth in time must fit the limiters' nanosecond arithmetic.
        if interval * burst as u128 > range::RATE_BUCKET_DEPTH.as_nanos() {
            return self.fail(
                q.per.span(),
                format!("{path}: a burst of {burst} at {requests} per \"{}\" takes longer than 100 years to refill; raise `requests` or lower `burst`", q.per.get_ref()),
            );
        }
        Some(QuotaConfig {
            requests: NonZeroU32::new(requests as u32)?,
            per,
            burst: NonZeroU32::new(burst as u32)?,
        })
    }

    fn policy(&mut self, env: &str, raw: &RawPolicy) -> Option<PolicyConfig> {
        let before = self.errors.len();
        let p = format!("environments.{env}.policy");
        let methods = raw.methods.as_ref().map(|ms| {
            ms.iter()
                .filter_map(|m| self.method(&format!("{p}.methods"), m))
                .collect::<Vec<_>>()
        });
        let allow_paths = match &raw.allow_paths {
            Some(paths) => paths
                .iter()
                .filter_map(|s| self.path_prefix(&format!("{p}.allow_paths"), s))
                .collect(),
            None => vec!["/".to_owned()],
        };
        let deny_paths = raw
            .deny_paths
            .iter()
            .filter_map(|s| self.path_prefix(&format!("{p}.deny_paths"), s))
            .collect();
        let allow_ips = raw.allow_ips.as_ref().map(|ips| {
            ips.iter()
                .filter_map(|c| self.cidr(&format!("{p}.allow_ips"), c))
                .collect::<Vec<_>>()
        });
        let max_body = raw
            .max_body
            .as_ref()
            .and_then(|s| self.size(&format!("{p}.max_body"), s));
        if let (Some(size), Some(raw)) = (max_body, &raw.max_body) {
            if size > range::MAX_BODY {
                self.fail::<()>(
                    raw.span(),
                    format!(
                        "{p}.max_body: \"{}\" is out of range; use at most \"1TiB\"",
                        raw.get_ref()
                    ),
                );
            }
        }
        let request_headers =
            self.header_rules(&format!("{p}.request_headers"), &raw.request_headers);
        let response_headers =
            self.header_rules(&format!("{p}.response_headers"), &raw.response_headers);
        let upgrades = raw
            .upgrades
            .iter()
            .filter_map(|u| self.upgrade(&format!("{p}.upgrades"), u))
            .collect();
        if self.errors.len() != before {
            return None;
        }
        Some(PolicyConfig {
            methods,
            allow_paths,
            deny_paths,
            allow_ips,
            max_body,
            request_headers: request_headers?,
            response_headers: response_headers?,
            upgrades,
            case_insensitive_paths: raw.case_insensitive_paths,
            allow_underscore_headers: raw.allow_underscore_headers,
        })
    }

    fn upgrade(&mut self, path: &str, raw: &Spanned<String>) -> Option<String> {
        let token = raw.get_ref().to_ascii_lowercase();
        let name = token.split('/').next().unwrap_or_default();
        if name == "h2c" {
            return self.fail(
                raw.span(),
                format!("{path}: \"{}\" is always refused: specter speaks HTTP/2 itself (TLS with ALPN, or prior knowledge); remove it", raw.get_ref()),
            );
        }
        if name.is_empty() || HeaderName::from_bytes(name.as_bytes()).is_err() {
            return self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is not an Upgrade protocol name; write e.g. \"websocket\"",
                    raw.get_ref()
                ),
            );
        }
        Some(name.to_owned())
    }

    fn method(&mut self, path: &str, raw: &Spanned<String>) -> Option<Method> {
        let m = raw.get_ref().to_ascii_uppercase();
        match Method::from_bytes(m.as_bytes()) {
            Ok(method) if method != Method::CONNECT && method != Method::TRACE => Some(method),
            Ok(_) => self.fail(
                raw.span(),
                format!("{path}: \"{m}\" is always refused by specter; remove it"),
            ),
            Err(_) => self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is not an HTTP method; write e.g. \"GET\"",
                    raw.get_ref()
                ),
            ),
        }
    }

    fn path_prefix(&mut self, path: &str, raw: &Spanned<String>) -> Option<String> {
        let s = raw.get_ref();
        if !s.starts_with('/') {
            return self.fail(
                raw.span(),
                format!("{path}: \"{s}\" must start with '/', e.g. \"/v1/\""),
            );
        }
        match normalize_path(s) {
            Ok(n) => Some(crate::path::prefix_form(&n)),
            Err(_) => self.fail(
                raw.span(),
                format!("{path}: \"{s}\" has an encoded '/', '\\' or NUL, which requests are refused for; write the plain path"),
            ),
        }
    }

    fn header_rules(&mut self, path: &str, raw: &RawHeaderRules) -> Option<HeaderRules> {
        let before = self.errors.len();
        let mut rules = HeaderRules::default();
        for (name, value) in &raw.set {
            let n = self.header_name(&format!("{path}.set"), name);
            match HeaderValue::from_str(value.get_ref()) {
                Ok(v) => {
                    if let Some(n) = n {
                        rules.set.push((n, v));
                    }
                }
                Err(_) => {
                    self.fail::<()>(
                        value.span(),
                        format!(
                            "{path}.set.{}: \"{}\" is not a valid header value; use visible ASCII",
                            name.get_ref(),
                            value.get_ref()
                        ),
                    );
                }
            }
        }
        for name in &raw.remove {
            if let Some(n) = self.header_name(&format!("{path}.remove"), name) {
                rules.remove.push(n);
            }
        }
        (self.errors.len() == before).then_some(rules)
    }

    fn header_name(&mut self, path: &str, raw: &Spanned<String>) -> Option<HeaderName> {
        let lower = raw.get_ref().to_ascii_lowercase();
        if RESERVED_HEADERS.contains(&lower.as_str()) {
            return self.fail(
                raw.span(),
                format!("{path}: \"{}\" is managed by specter itself and cannot be changed by configuration; remove it", raw.get_ref()),
            );
        }
        match HeaderName::from_bytes(lower.as_bytes()) {
            Ok(n) => Some(n),
            Err(_) => self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is not a header name; write e.g. \"x-tenant\"",
                    raw.get_ref()
                ),
            ),
        }
    }

    fn key(&mut self, env: &str, i: usize, raw: &Spanned<RawKey>) -> Option<KeyConfig> {
        let k = raw.get_ref();
        let p = format!("environments.{env}.keys[{i}]");
        let id = k.id.get_ref();
        let id_ok = valid_key_id(id);
        if !id_ok {
            self.fail::<()>(
                k.id.span(),
                format!("{p}.id: \"{id}\" is not a valid key id; use 1-128 letters, digits or -_.:@/, not starting with '_' (reserved) (it is sent upstream in x-specter-key-id)"),
            );
        }
        let digest = parse_digest(k.sha256.get_ref());
        if digest.is_none() {
            let shown = redact_hash(k.sha256.get_ref());
            self.fail::<()>(
                k.sha256.span(),
                format!("{p}.sha256: \"{shown}\" is not 64 hex characters; paste the block printed by `specter keys new` or `specter keys hash`"),
            );
        }
        let not_before = k
            .not_before
            .as_ref()
            .and_then(|d| self.datetime(&format!("{p}.not_before"), d));
        let not_after = k
            .not_after
            .as_ref()
            .and_then(|d| self.datetime(&format!("{p}.not_after"), d));
        if let (Some(nb), Some(na)) = (not_before, not_after) {
            if nb >= na {
                self.fail::<()>(raw.span(), format!("{p}: not_before is not earlier than not_after; the key could never be used"));
            }
        }
        if let (Some(na), Some(d)) = (not_after, &k.not_after) {
            let now = self.options.now;
            if na <= now {
                self.warn(
                    d.span(),
                    format!("{p} (id \"{id}\") expired at {}; remove it", d.get_ref()),
                );
            } else if na <= now + self.options.expiry_warning {
                self.warn(
                    d.span(),
                    format!(
                        "{p} (id \"{id}\") expires at {}; rotate it soon",
                        d.get_ref()
                    ),
                );
            }
        }
        if !id_ok {
            return None;
        }
        Some(KeyConfig {
            id: id.clone(),
            sha256: digest?,
            not_before,
            not_after,
        })
    }

    fn datetime(&mut self, path: &str, raw: &Spanned<Datetime>) -> Option<SystemTime> {
        let d = raw.get_ref();
        let parsed = (d.date.is_some() && d.time.is_some() && d.offset.is_some())
            .then(|| {
                time::OffsetDateTime::parse(
                    &d.to_string(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .flatten();
        match parsed {
            Some(t) => Some(SystemTime::from(t)),
            None => self.fail(
                raw.span(),
                format!("{path}: {d} is not a full date-time with offset; write e.g. 2027-06-30T00:00:00Z"),
            ),
        }
    }

    /// A key hash may appear once across all environments; ids are unique within one
    /// and only warned about across them (they show up in headers and logs).
    fn check_key_uniqueness(&mut self, raw: &BTreeMap<Spanned<String>, Spanned<RawEnvironment>>) {
        let mut by_hash: HashMap<KeyDigest, (&str, &str)> = HashMap::new();
        let mut ids_seen: HashMap<&str, &str> = HashMap::new();
        for (name, env) in raw {
            let mut ids_here: HashSet<&str> = HashSet::new();
            for (i, key) in env.get_ref().keys.iter().enumerate() {
                let k = key.get_ref();
                let (env_name, id) = (name.get_ref().as_str(), k.id.get_ref().as_str());
                if let Some(digest) = parse_digest(k.sha256.get_ref()) {
                    if let Some((other_env, other_id)) = by_hash.insert(digest, (env_name, id)) {
                        self.fail::<()>(
                            k.sha256.span(),
                            format!(
                                "environments.{env_name}.keys[{i}].sha256: \"{}\" is the same key hash as key \"{other_id}\" in environment \"{other_env}\"; a key belongs to exactly one environment, so generate a new key with `specter keys new --env {env_name}`",
                                redact_hash(k.sha256.get_ref())
                            ),
                        );
                    }
                }
                if !ids_here.insert(id) {
                    self.fail::<()>(
                        k.id.span(),
                        format!("environments.{env_name}.keys[{i}].id: \"{id}\" is used twice in this environment; give each key its own id"),
                    );
                } else if let Some(other) = ids_seen.insert(id, env_name) {
                    if other != env_name {
                        self.warn(
                            k.id.span(),
                            format!("key id \"{id}\" is used in both \"{other}\" and \"{env_name}\"; ids reach upstream headers and logs, so distinct ids avoid confusion"),
                        );
                    }
                }
            }
        }
    }

    /// Keys from `keys_file`s: a hash used twice anywhere, or an id twice in one
    /// environment, reported at the file's line. Sorting (16 bytes a key) instead of
    /// hash maps keeps a million keys' check within a few tens of MiB.
    fn check_file_keys(&mut self, envs: &[EnvironmentConfig]) {
        if self.file_keys.is_empty() {
            return;
        }
        let origins: Vec<Option<&FileKeysOrigin>> =
            envs.iter().map(|e| self.file_keys.get(&e.name)).collect();
        let from_file = |env: usize, key: usize| -> Option<(PathBuf, usize)> {
            let o = origins[env]?;
            let line = *o.lines.get(key.checked_sub(o.inline)?)?;
            Some((o.path.clone(), line as usize))
        };
        let mut errors = Vec::new();
        for pair in keys_by_digest(envs).windows(2) {
            let [(a, ea, ka), (b, eb, kb)] = pair else {
                continue;
            };
            if a != b {
                continue;
            }
            // Reported at a keys-file line; two [[keys]] tables are the TOML check's.
            let (ea, ka, eb, kb) = (*ea as usize, *ka as usize, *eb as usize, *kb as usize);
            let ((here_env, here_key), (other_env, other_key)) = if from_file(eb, kb).is_some() {
                ((eb, kb), (ea, ka))
            } else {
                ((ea, ka), (eb, kb))
            };
            let Some((file, line)) = from_file(here_env, here_key) else {
                continue;
            };
            let (name, other) = (&envs[here_env].name, &envs[other_env]);
            errors.push(ConfigError {
                file,
                line,
                col: 1,
                message: format!(
                    "environments.{name}.keys_file: the key hash on this line is also key \"{}\" of environment \"{}\"; a key belongs to exactly one environment, so generate a new key with `specter keys new --env {name}`",
                    other.keys[other_key].id, other.name
                ),
            });
        }
        for (e, env) in envs.iter().enumerate() {
            if origins[e].is_none() {
                continue;
            }
            let mut ids: Vec<u32> = (0..env.keys.len() as u32).collect();
            ids.sort_unstable_by(|a, b| {
                env.keys[*a as usize]
                    .id
                    .cmp(&env.keys[*b as usize].id)
                    .then(a.cmp(b))
            });
            for pair in ids.windows(2) {
                let (first, second) = (pair[0] as usize, pair[1] as usize);
                if env.keys[first].id != env.keys[second].id {
                    continue;
                }
                let Some((file, line)) = from_file(e, second) else {
                    continue;
                };
                errors.push(ConfigError {
                    file,
                    line,
                    col: 1,
                    message: format!(
                        "environments.{}.keys_file: key id \"{}\" is used twice in this environment; give each key its own id",
                        env.name, env.keys[second].id
                    ),
                });
            }
        }
        self.errors.extend(errors);
    }

    /// The product's promise: one environment's keys can never reach another's backend.
    fn check_shared_upstreams(
        &mut self,
        raw: &BTreeMap<Spanned<String>, Spanned<RawEnvironment>>,
        envs: &[EnvironmentConfig],
    ) {
        let names: HashSet<&str> = envs.iter().map(|e| e.name.as_str()).collect();
        for (name, env) in raw {
            for s in &env.get_ref().shares_upstream_with {
                let other = s.get_ref();
                if other == name.get_ref() || !names.contains(other.as_str()) {
                    self.fail::<()>(
                        s.span(),
                        format!("environments.{}.shares_upstream_with: \"{other}\" is not another configured environment; name one of: {}", name.get_ref(), sorted(&names)),
                    );
                }
            }
        }
        let raw_by_name: HashMap<&str, &RawEnvironment> = raw
            .iter()
            .map(|(n, e)| (n.get_ref().as_str(), e.get_ref()))
            .collect();
        let mut owners: HashMap<(String, u16), &EnvironmentConfig> = HashMap::new();
        for env in envs {
            let (key, spans) = raw_by_name
                .get(env.name.as_str())
                .map(|e| upstream_spans(e))
                .unwrap_or_default();
            for (i, up) in env.upstreams.iter().enumerate() {
                let endpoint = (canonical_host(&up.host), up.port);
                let Some(other) = owners.get(&endpoint).copied() else {
                    owners.insert(endpoint, env);
                    continue;
                };
                if other.name == env.name {
                    continue;
                }
                let mutual = env.shares_upstream_with.contains(&other.name)
                    && other.shares_upstream_with.contains(&env.name);
                if !mutual {
                    let span = spans.get(i).cloned().unwrap_or_default();
                    let (a, b) = (&other.name, &env.name);
                    self.fail::<()>(
                        span,
                        format!(
                            "environments.{b}.{key}: \"{}\" is the same backend ({}:{}) as an upstream of environment \"{a}\"; environments must not share a backend. Give \"{b}\" its own, or if sharing is intended set shares_upstream_with = [\"{a}\"] in environments.{b} and shares_upstream_with = [\"{b}\"] in environments.{a}",
                            up.uri.to_string().trim_end_matches('/'),
                            endpoint.0,
                            up.port
                        ),
                    );
                }
            }
        }
    }

    // --- scalar helpers -----------------------------------------------------------

    /// A duration within `range` (the README's "Value ranges" table).
    fn duration_in(
        &mut self,
        path: &str,
        raw: &Spanned<String>,
        range: (Duration, Duration),
    ) -> Option<Duration> {
        let (min, max) = range;
        match humantime::parse_duration(raw.get_ref()) {
            Ok(d) if d.is_zero() => self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is zero; use a positive duration such as \"2s\"",
                    raw.get_ref()
                ),
            ),
            Ok(d) if d < min || d > max => self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is out of range; use between \"{}\" and \"{}\"",
                    raw.get_ref(),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                ),
            ),
            Ok(d) => Some(d),
            Err(e) => self.fail(
                raw.span(),
                format!(
                    "{path}: \"{}\" is not a duration ({e}); write e.g. \"250ms\", \"30s\" or \"5m\"",
                    raw.get_ref()
                ),
            ),
        }
    }

    fn duration_or(
        &mut self,
        path: &str,
        raw: &Option<Spanned<String>>,
        default: Duration,
        range: (Duration, Duration),
    ) -> Option<Duration> {
        match raw {
            Some(d) => self.duration_in(path, d, range),
            None => Some(default),
        }
    }

    fn size(&mut self, path: &str, raw: &Spanned<String>) -> Option<u64> {
        let why = match raw.get_ref().trim().parse::<bytesize::ByteSize>() {
            Ok(b) if b.as_u64() > 0 => return Some(b.as_u64()),
            Ok(_) => "it is zero".to_owned(),
            Err(e) => e,
        };
        self.fail(
            raw.span(),
            format!(
                "{path}: \"{}\" is not a positive size ({why}); write e.g. \"64KiB\" or \"10MiB\"",
                raw.get_ref()
            ),
        )
    }

    fn positive(&mut self, path: &str, raw: &Spanned<i64>, max: i64) -> Option<i64> {
        let n = *raw.get_ref();
        if (1..=max).contains(&n) {
            Some(n)
        } else {
            self.fail(
                raw.span(),
                format!("{path}: {n} is out of range; use a number from 1 to {max}"),
            )
        }
    }

    fn socket_addr(&mut self, path: &str, raw: &Spanned<String>) -> Option<SocketAddr> {
        match raw.get_ref().parse() {
            Ok(a) => Some(a),
            Err(_) => self.fail(
                raw.span(),
                format!("{path}: \"{}\" is not an address; write IP:port, e.g. \"127.0.0.1:8080\" or \"[::]:8443\"", raw.get_ref()),
            ),
        }
    }

    fn cidr(&mut self, path: &str, raw: &Spanned<String>) -> Option<IpNet> {
        let s = raw.get_ref().trim();
        if let Ok(net) = s.parse::<IpNet>() {
            return Some(net.trunc());
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Some(IpNet::from(ip));
        }
        self.fail(raw.span(), format!("{path}: \"{s}\" is not a CIDR; write e.g. \"10.0.0.0/8\", \"2001:db8::/32\" or a single address"))
    }
}

/// The key an environment's upstreams are written under, and each one's span.
fn upstream_spans(e: &RawEnvironment) -> (&'static str, Vec<Range<usize>>) {
    match (&e.upstream, &e.upstreams) {
        (Some(one), _) => ("upstream", vec![one.span()]),
        (None, Some(many)) => (
            "upstreams",
            many.get_ref().iter().map(|u| u.span()).collect(),
        ),
        (None, None) => ("upstreams", Vec::new()),
    }
}

fn parse_digest(s: &str) -> Option<KeyDigest> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Error messages show enough of a bad hash to find it, never a whole (maybe real) one:
/// a user might paste the key itself into `sha256`.
fn redact_hash(s: &str) -> String {
    let head: String = s.chars().take(6).collect();
    format!("{head}... ({} characters)", s.chars().count())
}

/// `localhost`, `127.0.0.1` and `::1` are one host when deciding whether two
/// environments share a backend.
/// One name per backend host for the sharing check: every loopback or unspecified
/// address (`127.0.0.0/8`, `::1`, `0.0.0.0`, `::`, IPv4-mapped forms) and `localhost`
/// are one host, "loopback"; other addresses in their canonical form.
fn canonical_host(host: &str) -> String {
    let host = host.trim_end_matches('.');
    if host.eq_ignore_ascii_case("localhost") {
        return "loopback".to_owned();
    }
    match host.parse::<std::net::IpAddr>().map(|ip| ip.to_canonical()) {
        Ok(ip) if ip.is_loopback() || ip.is_unspecified() => "loopback".to_owned(),
        Ok(ip) => ip.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

fn sorted(names: &HashSet<&str>) -> String {
    let mut v: Vec<&str> = names.iter().copied().collect();
    v.sort_unstable();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_parsing_accepts_upper_and_lower_hex() {
        let lower = "ab".repeat(32);
        assert_eq!(parse_digest(&lower), Some([0xab; 32]));
        assert_eq!(parse_digest(&lower.to_uppercase()), Some([0xab; 32]));
        assert_eq!(parse_digest("abc"), None);
        assert_eq!(parse_digest(&"zz".repeat(32)), None);
    }

    #[test]
    fn loopback_names_are_one_host() {
        for same in [
            "localhost",
            "LOCALHOST.",
            "::1",
            "127.0.0.2",
            "0.0.0.0",
            "::",
            "::ffff:127.0.0.1",
            "0:0:0:0:0:0:0:1",
        ] {
            assert_eq!(canonical_host(same), canonical_host("127.0.0.1"), "{same}");
        }
        assert_eq!(
            canonical_host("::ffff:10.0.0.1"),
            canonical_host("10.0.0.1")
        );
        assert_ne!(canonical_host("10.0.0.1"), canonical_host("127.0.0.1"));
    }
}
