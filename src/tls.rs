//! rustls, server and client side: certificate loading, SNI selection, ALPN, mTLS,
//! and the client config for `https://` upstreams. Always the `ring` provider, passed
//! explicitly so a second provider pulled in by another crate can never change it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use crate::config::{TlsConfig, TlsVersion};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", Resolved(path))]
    File {
        path: PathBuf,
        #[source]
        source: crate::config::read::ReadError,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{path} holds no PEM certificate; expected -----BEGIN CERTIFICATE-----")]
    NoCertificate { path: PathBuf },
    #[error("the key {key} does not belong to the certificate {cert} ({source}); pair each certificate with its own key")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("{path}: {source}")]
    Rustls {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("the crypto provider cannot offer these TLS versions: {0}")]
    Versions(#[source] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// A path as given, and for a relative one the directory it was resolved from: the
/// working directory, which a service manager may set somewhere unexpected.
struct Resolved<'a>(&'a Path);

impl fmt::Display for Resolved<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.display())?;
        if self.0.is_relative() {
            match std::env::current_dir() {
                Ok(dir) => write!(f, " (relative to {})", dir.display())?,
                Err(_) => write!(f, " (relative to the working directory)")?,
            }
        }
        Ok(())
    }
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The file's bytes, read as [`crate::config::read`] reads every operator-named file.
fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    crate::config::read::read_regular(path).map_err(|source| TlsError::File {
        path: path.to_owned(),
        source,
    })
}

fn certs_from(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(&read(path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Loads a PEM chain and its key (PKCS#8, PKCS#1 RSA or SEC1 EC) and checks they match.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = certs_from(cert)?;
    let der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|source| TlsError::Read {
        path: key.to_owned(),
        source,
    })?;
    CertifiedKey::from_der(chain, der, &provider())
        .map(Arc::new)
        .map_err(|source| TlsError::Mismatch {
            cert: cert.to_owned(),
            key: key.to_owned(),
            source,
        })
}

pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from(path)? {
        roots.add(cert).map_err(|source| TlsError::Rustls {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

/// Picks the certificate whose DNS names (exact or `*.` wildcard) cover the client's
/// SNI; the first certificate answers clients without SNI or with an unknown name.
pub struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SniResolver({} certificates)", self.certs.len())
    }
}

impl SniResolver {
    pub fn new(certs: Vec<Arc<CertifiedKey>>) -> Self {
        assert!(!certs.is_empty(), "validation requires one certificate");
        SniResolver { certs }
    }

    fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let name = sni.and_then(|s| ServerName::try_from(s).ok());
        if let (Some(name), true) = (name, self.certs.len() > 1) {
            for ck in &self.certs {
                let Some(leaf) = ck.cert.first() else {
                    continue;
                };
                let Ok(parsed) = webpki::EndEntityCert::try_from(leaf) else {
                    continue;
                };
                if parsed.verify_is_valid_for_subject_name(&name).is_ok() {
                    return ck.clone();
                }
            }
        }
        self.certs[0].clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// The https listener's config: the given certificates, TLS >= `min_version`, ALPN
/// h2 then http/1.1, and client certificates when `client_ca` is set.
pub fn server_config(config: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    let mut certs = Vec::new();
    for c in &config.certificates {
        certs.push(load_certified_key(&c.cert_path, &c.key_path)?);
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(TlsError::Versions)?;
    let builder = match &config.client_ca {
        Some(ca) => {
            let roots = Arc::new(load_roots(ca)?);
            let verifier =
                WebPkiClientVerifier::builder_with_provider(roots, provider()).build()?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut server = builder.with_cert_resolver(Arc::new(SniResolver::new(certs)));
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(server))
}

/// TLS towards `https://` upstreams: public web roots, or only `upstream_ca`.
pub fn client_config(upstream_ca: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let roots = match upstream_ca {
        Some(path) => load_roots(path)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Versions)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

/// Every `reason` of `specter_tls_handshake_errors_total`: a closed set, so a client
/// can never add a series.
pub const HANDSHAKE_ERROR_REASONS: &[&str] = &[
    "no_shared_cipher",
    "protocol_version",
    "bad_certificate",
    "alert_received",
    "peer_incompatible",
    "peer_misbehaved",
    "invalid_message",
    "eof",
    "timeout",
    "io",
    "other",
];

/// The reason a failed server handshake is counted under. tokio-rustls hands rustls's
/// error over inside an `io::Error`; an end of stream or a reset has none.
pub fn handshake_error_reason(error: &std::io::Error) -> &'static str {
    use rustls::{Error as E, PeerIncompatible as P};
    let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    else {
        return match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        };
    };
    match tls {
        E::PeerIncompatible(
            P::NoCipherSuitesInCommon | P::NoKxGroupsInCommon | P::NoSignatureSchemesInCommon,
        ) => "no_shared_cipher",
        E::PeerIncompatible(
            P::SupportedVersionsExtensionRequired
            | P::Tls12NotOffered
            | P::Tls12NotOfferedOrEnabled
            | P::ServerTlsVersionIsDisabledByOurConfig,
        ) => "protocol_version",
        E::PeerIncompatible(_) | E::NoApplicationProtocol | E::UnsupportedNameType => {
            "peer_incompatible"
        }
        E::InvalidCertificate(_) | E::NoCertificatesPresented => "bad_certificate",
        E::AlertReceived(_) => "alert_received",
        E::PeerMisbehaved(_) | E::DecryptError => "peer_misbehaved",
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. }
        | E::PeerSentOversizedRecord => "invalid_message",
        _ => "other",
    }
}

/// The subject of a verified client certificate as a header value (RFC 4514 style,
/// e.g. `CN=billing,O=Acme`), or `None` when it cannot be expressed as one.
pub fn subject_header(leaf: &CertificateDer<'_>) -> Option<http::HeaderValue> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    http::HeaderValue::from_str(&cert.subject().to_string()).ok()
}

/// A served certificate as an operator names it: its file, when its leaf expires and
/// its fingerprint (to tell a replaced certificate from the same one re-read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateInfo {
    pub path: String,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    pub sha256: String,
}

/// Describes the leaf certificate of the PEM file at `path`.
pub fn describe(path: &Path) -> Option<CertificateInfo> {
    let pem = read(path).ok()?;
    let leaf = CertificateDer::pem_slice_iter(&pem).next()?.ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    Some(CertificateInfo {
        path: path.display().to_string(),
        not_after: cert.validity().not_after.timestamp(),
        sha256: crate::digest::hex(&crate::digest::sha256(leaf.as_ref())),
    })
}

/// Logs each certificate of `now` that is new or replaced since `before`, by file name.
pub fn log_changes(before: Option<&[CertificateInfo]>, now: &[CertificateInfo]) {
    for cert in now {
        let old = before.and_then(|b| b.iter().find(|o| o.path == cert.path));
        if old.is_some_and(|o| o.sha256 == cert.sha256) {
            continue;
        }
        let not_after = time::OffsetDateTime::from_unix_timestamp(cert.not_after)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let event = if old.is_some() {
            "certificate reloaded"
        } else {
            "certificate loaded"
        };
        tracing::info!(certificate = %cert.path, %not_after, sha256 = %cert.sha256, "{event}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    /// The reasons tests/log_hygiene.rs cannot provoke over a socket cheaply; the others
    /// (eof, timeout, invalid_message, protocol_version, no_shared_cipher,
    /// alert_received) are asserted there against real handshakes.
    #[test]
    fn handshake_errors_map_to_a_reason_of_the_closed_set() {
        let wrapped = |e: rustls::Error| io::Error::new(io::ErrorKind::InvalidData, e);
        let cases = [
            (
                wrapped(rustls::Error::NoCertificatesPresented),
                "bad_certificate",
            ),
            (
                wrapped(rustls::Error::InvalidCertificate(
                    rustls::CertificateError::UnknownIssuer,
                )),
                "bad_certificate",
            ),
            (wrapped(rustls::Error::DecryptError), "peer_misbehaved"),
            (
                wrapped(rustls::Error::NoApplicationProtocol),
                "peer_incompatible",
            ),
            (wrapped(rustls::Error::General("x".into())), "other"),
            (io::ErrorKind::ConnectionReset.into(), "io"),
            (io::ErrorKind::UnexpectedEof.into(), "eof"),
        ];
        for (error, reason) in cases {
            assert_eq!(handshake_error_reason(&error), reason, "{error:?}");
            assert!(HANDSHAKE_ERROR_REASONS.contains(&reason));
        }
    }
}
