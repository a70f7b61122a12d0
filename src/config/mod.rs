//! The configuration: raw file types ([`file`](mod@file)) validated into the model below
//! (`validate`), where a bad value cannot exist.

pub mod error;
pub mod file;
pub mod keys_file;
pub mod policy_view;
pub mod read;
mod syntax;
mod validate;

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use http::header::HeaderName;
use http::{HeaderValue, Method, Uri};
use ipnet::IpNet;

pub use error::{ConfigError, ConfigErrors, ConfigWarning};
pub use validate::{range, KEY_EXPIRY_WARNING};

pub use crate::digest::{hex, sha256, KeyDigest};

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: ListenConfig,
    pub limits: LimitsConfig,
    pub tls: Option<TlsConfig>,
    pub auth: AuthConfig,
    /// Sorted by name (TOML tables are unordered); `State::environment` relies on it.
    pub environments: Vec<EnvironmentConfig>,
    pub rate_limit_store: Option<StoreConfig>,
    pub tracing: TracingConfig,
    pub source: ConfigSource,
}

/// `[tracing]`: W3C trace context is always on; these decide what is sampled and where
/// sampled spans go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TracingConfig {
    /// Share of the traces specter starts that are sampled (0.0-1.0). A client's own
    /// `traceparent` decides for the traces it continues.
    pub sample_ratio: f64,
    /// OTLP/HTTP collector base URL (`/v1/traces` is appended); `None`: no export.
    pub otlp: Option<Uri>,
}

/// Where a config came from, for `/config`, reload logs and error messages.
#[derive(Debug, Clone)]
pub struct ConfigSource {
    pub path: PathBuf,
    /// Hex SHA-256 of the file's bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenConfig {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    pub trusted_proxies: Vec<IpNet>,
    /// Host names the admin listener answers besides its own address and `localhost`
    /// (lower-case): any other name may be a DNS-rebinding page in a browser.
    pub admin_hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitsConfig {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub shutdown_grace: Duration,
    /// Longest pause between two pieces of a client's request body (408 when exceeded).
    pub body_read_timeout: Duration,
    /// Longest a whole request body may take (408 when exceeded); `None`: no bound
    /// beyond `body_read_timeout` per pause.
    pub body_timeout: Option<Duration>,
    /// Connections one client address may hold at once; `None`: only `max_connections`.
    pub max_connections_per_ip: Option<usize>,
    /// Failed authentications a client address may make (429 beyond); `None`: no limit.
    pub unauthenticated: Option<QuotaConfig>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_header_bytes: 64 * 1024,
            max_headers: 100,
            shutdown_grace: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(30),
            body_timeout: None,
            max_connections_per_ip: None,
            unauthenticated: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    V1_2,
    V1_3,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub min_version: TlsVersion,
    pub client_ca: Option<PathBuf>,
    /// Loaded and checked at validation; the first is the default certificate.
    pub certificates: Vec<CertificateConfig>,
}

#[derive(Debug, Clone)]
pub struct CertificateConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub header: HeaderName,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentConfig {
    pub name: String,
    pub upstreams: Vec<Upstream>,
    /// Lower-case host names without port; empty means any host.
    pub hosts: Vec<String>,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub http2: bool,
    pub preserve_host: bool,
    pub upstream_ca: Option<PathBuf>,
    pub upstream_sni: Option<String>,
    pub shares_upstream_with: Vec<String>,
    pub rate_limit: RateLimitConfig,
    pub policy: PolicyConfig,
    /// The `[[keys]]` tables, then the lines of `keys_file`.
    pub keys: Vec<KeyConfig>,
    /// One key per line (see [`keys_file`]); watched like the config.
    pub keys_file: Option<PathBuf>,
}

impl EnvironmentConfig {
    /// Equal in everything but the key list.
    pub fn same_settings(&self, other: &EnvironmentConfig) -> bool {
        let EnvironmentConfig {
            name,
            upstreams,
            hosts,
            connect_timeout,
            request_timeout,
            http2,
            preserve_host,
            upstream_ca,
            upstream_sni,
            shares_upstream_with,
            rate_limit,
            policy,
            keys: _,
            keys_file: _,
        } = self;
        *name == other.name
            && *upstreams == other.upstreams
            && *hosts == other.hosts
            && *connect_timeout == other.connect_timeout
            && *request_timeout == other.request_timeout
            && *http2 == other.http2
            && *preserve_host == other.preserve_host
            && *upstream_ca == other.upstream_ca
            && *upstream_sni == other.upstream_sni
            && *shares_upstream_with == other.shares_upstream_with
            && *rate_limit == other.rate_limit
            && *policy == other.policy
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `scheme://authority` with no path, e.g. `http://10.0.0.5:8000`.
    pub uri: Uri,
    pub tls: bool,
    pub host: String,
    pub port: u16,
}

impl Upstream {
    pub fn authority(&self) -> &str {
        self.uri.authority().map_or("", |a| a.as_str())
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RateLimitConfig {
    pub per_key: Option<QuotaConfig>,
    pub total: Option<QuotaConfig>,
}

/// `requests` per `per`, with a bucket of `burst` (defaults to `requests`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotaConfig {
    pub requests: NonZeroU32,
    pub per: Duration,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyConfig {
    /// `None` allows every method (except CONNECT and TRACE, always refused).
    pub methods: Option<Vec<Method>>,
    /// Normalised prefixes, matched on whole segments.
    pub allow_paths: Vec<String>,
    pub deny_paths: Vec<String>,
    /// `None` allows every client address.
    pub allow_ips: Option<Vec<IpNet>>,
    pub max_body: Option<u64>,
    pub request_headers: HeaderRules,
    pub response_headers: HeaderRules,
    /// `Upgrade` protocols tunnelled besides `websocket`, lower-case (never `h2c`): a
    /// tunnel's bytes are opaque to the policy, so each protocol is an explicit choice.
    pub upgrades: Vec<String>,
    /// Path rules ignore ASCII case, for upstreams that do (IIS, case-folding routers).
    pub case_insensitive_paths: bool,
    /// Forward request headers whose name has a `_` (dropped by default: CGI and WSGI
    /// upstreams read `x_a` and `x-a` as one variable). Never one that spells a
    /// gateway-owned header.
    pub allow_underscore_headers: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            methods: None,
            allow_paths: vec!["/".to_owned()],
            deny_paths: Vec::new(),
            allow_ips: None,
            max_body: None,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            upgrades: Vec::new(),
            case_insensitive_paths: false,
            allow_underscore_headers: false,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderRules {
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyConfig {
    pub id: String,
    pub sha256: KeyDigest,
    pub not_before: Option<SystemTime>,
    pub not_after: Option<SystemTime>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorMode {
    Local,
    Allow,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    pub servers: StoreServers,
    pub timeout: Duration,
    pub on_error: StoreErrorMode,
    pub mode: StoreMode,
}

/// Where the fleet's counters live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreServers {
    /// One Redis server (`redis = "..."`).
    Single(String),
    /// Seed nodes of a Redis Cluster (`cluster = [...]`); the rest is discovered.
    Cluster(Vec<String>),
}

/// How often a gateway asks the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// One round trip per request.
    Exact,
    /// Batches of cells taken from the shared buckets and spent locally.
    Lease(LeaseConfig),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseConfig {
    /// Share of a bucket's burst taken per round trip, in hundredths of a percent
    /// (`"5%"` is 500), so the config stays `Eq` and exact.
    pub share_bp: u32,
    /// A batch older than this goes back to the store.
    pub ttl: Duration,
}

impl LeaseConfig {
    /// Cells per batch for a bucket of `burst`: the configured share, at least 1.
    pub fn batch(&self, burst: u32) -> u32 {
        (u64::from(burst) * u64::from(self.share_bp) / 10_000).max(1) as u32
    }
}

/// A validated config and the warnings found on the way.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigWarning>,
}

/// Options that change what validation warns about (never what it accepts).
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    pub now: SystemTime,
    pub expiry_warning: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            now: SystemTime::now(),
            expiry_warning: KEY_EXPIRY_WARNING,
        }
    }
}

/// Reads, parses and validates the file at `path`.
pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
    load_with(path, CheckOptions::default())
}

pub fn load_with(path: &Path, options: CheckOptions) -> Result<Loaded, ConfigErrors> {
    let bytes = read::read_regular(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("cannot read the config file: {e}"),
        }])
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 1,
            col: 1,
            message: format!("the config file is not UTF-8 ({e}); save it as UTF-8"),
        }])
    })?;
    parse_with(&text, path, options)
}

/// Parses and validates config text; `path` names it in errors and anchors the
/// relative paths inside it (certificates), like a file at that path would.
pub fn parse(text: &str, path: &Path) -> Result<Loaded, ConfigErrors> {
    parse_with(text, path, CheckOptions::default())
}

pub fn parse_with(text: &str, path: &Path, options: CheckOptions) -> Result<Loaded, ConfigErrors> {
    validate::parse_and_validate(text, path, options)
}

/// Environment names: `[a-z0-9_-]+` (they appear in headers, metrics and Redis keys).
pub fn valid_environment_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Key ids: 1-128 of `[A-Za-z0-9-_.:@/]`, not starting with `_` (reserved: the
/// environment's Redis bucket is `_total`). They are sent upstream in a header.
pub fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('_')
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:@/".contains(&b))
}

/// Every key of `environments` as (digest, environment index, key index), sorted by
/// digest: 16 bytes a key, where a hash set of a million keys would take several times
/// that. Digests are unique in a valid config, so neighbours are the only repeats.
pub fn keys_by_digest(environments: &[EnvironmentConfig]) -> Vec<(&KeyDigest, u32, u32)> {
    let mut all: Vec<(&KeyDigest, u32, u32)> = environments
        .iter()
        .enumerate()
        .flat_map(|(e, env)| {
            env.keys
                .iter()
                .enumerate()
                .map(move |(k, key)| (&key.sha256, e as u32, k as u32))
        })
        .collect();
    all.sort_unstable();
    all
}
