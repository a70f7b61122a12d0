//! Raw serde types: exactly the shape of the TOML file, nothing checked beyond types.
//!
//! Every value that validation may reject is `Spanned`, so its error can point at the
//! byte range in the file (turned into `line:col` by [`super::error`]).

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::value::Datetime;
use toml::Spanned;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub listen: Spanned<RawListen>,
    #[serde(default)]
    pub limits: RawLimits,
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default)]
    pub auth: RawAuth,
    #[serde(default)]
    pub environments: BTreeMap<Spanned<String>, Spanned<RawEnvironment>>,
    pub rate_limit_store: Option<Spanned<RawStore>>,
    pub tracing: Option<Spanned<RawTracing>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListen {
    pub http: Option<Spanned<String>>,
    pub https: Option<Spanned<String>>,
    pub admin: Option<Spanned<String>>,
    #[serde(default)]
    pub trusted_proxies: Vec<Spanned<String>>,
    #[serde(default)]
    pub admin_hosts: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_connections: Option<Spanned<i64>>,
    pub header_read_timeout: Option<Spanned<String>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub max_header_bytes: Option<Spanned<String>>,
    pub max_headers: Option<Spanned<i64>>,
    pub shutdown_grace: Option<Spanned<String>>,
    pub body_read_timeout: Option<Spanned<String>>,
    pub body_timeout: Option<Spanned<String>>,
    pub max_connections_per_ip: Option<Spanned<i64>>,
    pub unauthenticated: Option<Spanned<RawQuota>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub min_version: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    #[serde(default)]
    pub certificates: Vec<Spanned<RawCertificate>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    pub header: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEnvironment {
    pub upstream: Option<Spanned<String>>,
    pub upstreams: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub hosts: Vec<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub request_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub http2: bool,
    #[serde(default)]
    pub preserve_host: bool,
    pub upstream_ca: Option<Spanned<String>>,
    pub upstream_sni: Option<Spanned<String>>,
    #[serde(default)]
    pub shares_upstream_with: Vec<Spanned<String>>,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub policy: RawPolicy,
    #[serde(default)]
    pub keys: Vec<Spanned<RawKey>>,
    pub keys_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub per_key: Option<Spanned<RawQuota>>,
    pub total: Option<Spanned<RawQuota>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub requests: Spanned<i64>,
    pub per: Spanned<String>,
    pub burst: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    pub methods: Option<Vec<Spanned<String>>>,
    pub allow_paths: Option<Vec<Spanned<String>>>,
    #[serde(default)]
    pub deny_paths: Vec<Spanned<String>>,
    pub allow_ips: Option<Vec<Spanned<String>>>,
    pub max_body: Option<Spanned<String>>,
    #[serde(default)]
    pub request_headers: RawHeaderRules,
    #[serde(default)]
    pub response_headers: RawHeaderRules,
    #[serde(default)]
    pub upgrades: Vec<Spanned<String>>,
    #[serde(default)]
    pub case_insensitive_paths: bool,
    #[serde(default)]
    pub allow_underscore_headers: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHeaderRules {
    #[serde(default)]
    pub set: BTreeMap<Spanned<String>, Spanned<String>>,
    #[serde(default)]
    pub remove: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: Spanned<String>,
    pub sha256: Spanned<String>,
    pub not_before: Option<Spanned<Datetime>>,
    pub not_after: Option<Spanned<Datetime>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub redis: Option<Spanned<String>>,
    pub cluster: Option<Spanned<Vec<Spanned<String>>>>,
    pub timeout: Option<Spanned<String>>,
    pub on_error: Option<Spanned<String>>,
    pub mode: Option<Spanned<String>>,
    pub lease: Option<Spanned<String>>,
    pub lease_ttl: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTracing {
    pub otlp: Option<Spanned<String>>,
    pub sample_ratio: Option<Spanned<toml::Value>>,
}
