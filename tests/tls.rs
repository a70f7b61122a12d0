//! TLS over real sockets: SNI certificate choice, refused old protocols (raw
//! ClientHellos), ALPN h2 / http/1.1, mTLS with the client subject forwarded,
//! certificate swap on reload, https upstreams with a private CA, and `certs dev`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme, SupportedProtocolVersion,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use specter::Gateway;

/// The bound on every network step; generous for a busy 2-core machine.
const T: Duration = Duration::from_secs(20);
const KEY: &str = "spk_production_tlstest000000000000000000000";
const ALL_VERSIONS: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
const H1: &[&[u8]] = &[b"http/1.1"];

// ---------------------------------------------------------------------------------
// Certificates

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

/// A certificate and its key, in the forms the tests need.
struct Leaf {
    der: CertificateDer<'static>,
    pem: String,
    key_pem: String,
    key_der: Vec<u8>,
}

impl Leaf {
    fn new(cert: rcgen::Certificate, key: KeyPair) -> Leaf {
        Leaf {
            der: cert.der().clone(),
            pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_der: key.serialize_der(),
        }
    }

    fn self_signed(names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        Leaf::new(params.self_signed(&key).unwrap(), key)
    }

    fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key_der.clone().into())
    }

    /// Writes `<name>.pem` and `<name>.key` into `dir`.
    fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// A private certificate authority.
struct Ca {
    params: CertificateParams,
    key: KeyPair,
    der: CertificateDer<'static>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = dn(name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca {
            der: cert.der().clone(),
            pem: cert.pem(),
            params,
            key,
        }
    }

    fn issue(&self, names: &[&str], cn: &str, purpose: ExtendedKeyUsagePurpose) -> Leaf {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![purpose];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.params, &self.key);
        Leaf::new(params.signed_by(&key, &issuer).unwrap(), key)
    }

    fn server(&self, names: &[&str]) -> Leaf {
        self.issue(names, names[0], ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, cn: &str) -> Leaf {
        self.issue(&[], cn, ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, &self.pem).unwrap();
        path
    }
}

// ---------------------------------------------------------------------------------
// Clients

/// Accepts any server certificate (signatures are still checked): for tests that
/// inspect which certificate the gateway chose.
#[derive(Debug)]
struct AcceptAnyServerCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How a test client judges the server's certificate.
enum Trust<'a> {
    /// Anything (inspection only).
    Any,
    /// Only chains to these roots, for the name connected to.
    Roots(&'a [&'a CertificateDer<'static>]),
}

fn client_config(
    trust: Trust<'_>,
    versions: &[&'static SupportedProtocolVersion],
    alpn: &[&[u8]],
    client_cert: Option<&Leaf>,
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    if let Trust::Roots(certs) = &trust {
        for c in *certs {
            roots.add((*c).clone()).unwrap();
        }
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client_cert {
        Some(leaf) => builder
            .with_client_auth_cert(vec![leaf.der.clone()], leaf.key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    if let Trust::Any = trust {
        config
            .dangerous()
            .set_certificate_verifier(Arc::new(AcceptAnyServerCert(provider())));
    }
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

fn dns(name: &str) -> ServerName<'static> {
    ServerName::try_from(name.to_owned()).unwrap()
}

/// No SNI: rustls sends none for an IP address.
fn no_sni() -> ServerName<'static> {
    ServerName::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST).into())
}

async fn handshake(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
) -> std::io::Result<TlsStream<TcpStream>> {
    timeout(T, async {
        let tcp = TcpStream::connect(addr).await?;
        TlsConnector::from(config).connect(name, tcp).await
    })
    .await
    .expect("TLS handshake within the time limit")
}

fn peer_leaf(tls: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .expect("the server sent a certificate")
        .clone()
        .into_owned()
}

async fn h1_over(tls: TlsStream<TcpStream>) -> hyper::Result<http1::SendRequest<Full<Bytes>>> {
    let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn request(uri: &str, host: &str, headers: &[(&str, &str)]) -> Request<Full<Bytes>> {
    let mut req = Request::get(uri).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(Full::new(Bytes::new())).unwrap()
}

async fn collect(response: Response<hyper::body::Incoming>) -> hyper::Result<Answer> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

async fn send_h1(
    sender: &mut http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> hyper::Result<Answer> {
    timeout(T, async {
        sender.ready().await?;
        collect(sender.send_request(req).await?).await
    })
    .await
    .expect("answer within the time limit")
}

/// One HTTP/1.1 GET over a fresh TLS connection; any failure (handshake, alert on
/// the first read, closed connection) is an `Err` describing it.
async fn https_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Answer, String> {
    let tls = handshake(addr, config, dns(host))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let mut sender = h1_over(tls).await.map_err(|e| format!("http1: {e}"))?;
    send_h1(&mut sender, request(path, host, headers))
        .await
        .map_err(|e| format!("request: {e}"))
}

// ---------------------------------------------------------------------------------
// Gateways

struct TlsGateway {
    gateway: Gateway,
    https: SocketAddr,
    config_path: PathBuf,
}

fn tls_section(settings: &str, certs: &[(PathBuf, PathBuf)]) -> String {
    let mut s = format!("[tls]\n{settings}\n");
    for (cert, key) in certs {
        s.push_str(&format!(
            "[[tls.certificates]]\ncert = \"{}\"\nkey = \"{}\"\n\n",
            cert.display(),
            key.display()
        ));
    }
    s
}

fn production(upstream: &str) -> String {
    production_with(upstream, "")
}

/// The production environment with more settings (`extra`, TOML lines) and its key.
fn production_with(upstream: &str, extra: &str) -> String {
    format!(
        "[environments.production]\nupstream = \"{upstream}\"\n{extra}{}",
        key_block("production", "billing-service", KEY)
    )
}

/// Writes `specter.toml` into `dir` (an https and an admin listener, then `rest`)
/// and starts a gateway from that file.
async fn start_https(dir: &Path, rest: &str) -> TlsGateway {
    let text = format!("[listen]\nhttps = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n\n{rest}");
    let config_path = dir.join("specter.toml");
    std::fs::write(&config_path, &text).unwrap();
    let loaded = specter::config::load(&config_path)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}\n---\n{text}"));
    let gateway = Gateway::start(loaded.config).await.expect("gateway starts");
    TlsGateway {
        https: gateway.https_addr().expect("https listener"),
        gateway,
        config_path,
    }
}

// ---------------------------------------------------------------------------------
// 1. SNI

#[tokio::test]
async fn sni_chooses_the_certificate_and_the_first_is_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("specter test CA");
    let a = ca.server(&["a.test"]);
    let b = ca.server(&["b.test"]);
    let wild = ca.server(&["*.wild.test"]);
    let up = Upstream::start("production").await;
    let certs = [
        a.write(dir.path(), "a"),
        b.write(dir.path(), "b"),
        wild.write(dir.path(), "wild"),
    ];
    let gw = start_https(
        dir.path(),
        &format!("{}{}", tls_section("", &certs), production(&up.url())),
    )
    .await;

    let inspect = client_config(Trust::Any, ALL_VERSIONS, &[], None);
    let cases = [
        (dns("a.test"), &a, "a.test"),
        (dns("b.test"), &b, "b.test"),
        (dns("x.wild.test"), &wild, "x.wild.test"),
        (dns("unknown.test"), &a, "an unknown name"),
        (
            dns("deep.x.wild.test"),
            &a,
            "a name two labels under the wildcard",
        ),
        (no_sni(), &a, "no SNI"),
    ];
    for (name, expected, what) in cases {
        let tls = handshake(gw.https, inspect.clone(), name)
            .await
            .unwrap_or_else(|e| panic!("{what}: handshake failed: {e}"));
        assert!(
            peer_leaf(&tls) == expected.der,
            "{what}: the gateway presented the wrong certificate"
        );
    }

    // Real verification against the CA.
    let verifying = client_config(Trust::Roots(&[&ca.der]), ALL_VERSIONS, H1, None);
    for host in ["a.test", "b.test", "x.wild.test"] {
        let answer = https_get(
            gw.https,
            verifying.clone(),
            host,
            "/v",
            &[("x-api-key", KEY)],
        )
        .await
        .unwrap_or_else(|e| panic!("{host}: {e}"));
        assert_eq!(answer.status, 200, "{host}: {}", answer.text());
    }
    // The default certificate does not cover an unknown name: a verifying client refuses.
    assert!(
        handshake(gw.https, verifying, dns("unknown.test"))
            .await
            .is_err(),
        "a verifying client accepted a.test's certificate for unknown.test"
    );
    assert_eq!(up.count(), 3);
}

// ---------------------------------------------------------------------------------
// 2. Protocol versions and cipher suites, with hand-built ClientHellos

fn put_u16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_be_bytes());
}

fn list16(items: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    put_u16(&mut v, (items.len() * 2) as u16);
    for i in items {
        put_u16(&mut v, *i);
    }
    v
}

fn extension(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    put_u16(out, kind);
    put_u16(out, data.len() as u16);
    out.extend_from_slice(data);
}

/// A complete TLS record holding one ClientHello (no supported_versions extension, so
/// `client_version` is the highest version offered).
fn client_hello(client_version: u16, suites: &[u16], sni: &str) -> Vec<u8> {
    let mut ext = Vec::new();
    let name = sni.as_bytes();
    let mut server_name = Vec::new();
    put_u16(&mut server_name, (name.len() + 3) as u16);
    server_name.push(0); // host_name
    put_u16(&mut server_name, name.len() as u16);
    server_name.extend_from_slice(name);
    extension(&mut ext, 0x0000, &server_name);
    extension(&mut ext, 0x000a, &list16(&[0x001d, 0x0017])); // x25519, secp256r1
    extension(&mut ext, 0x000b, &[1, 0]); // ec_point_formats: uncompressed
    extension(&mut ext, 0x000d, &list16(&[0x0403, 0x0804, 0x0401]));

    let mut body = Vec::new();
    put_u16(&mut body, client_version);
    body.extend((0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11))); // random
    body.push(0); // empty session id
    body.extend(list16(suites));
    body.extend_from_slice(&[1, 0]); // compression: null only
    put_u16(&mut body, ext.len() as u16);
    body.extend(ext);

    let mut handshake = vec![1]; // client_hello
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend(body);

    let mut record = vec![0x16, 0x03, 0x01];
    put_u16(&mut record, handshake.len() as u16);
    record.extend(handshake);
    record
}

/// The first bytes the server answers a raw ClientHello with (up to one record
/// header plus two bytes); empty when it closes or resets without answering.
async fn reply_head(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(hello).await.unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 7];
    timeout(T, async {
        while head.len() < 7 {
            match stream.read(&mut buf[..7 - head.len()]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the server answers or closes within the time limit");
    head
}

fn assert_refused(head: &[u8], what: &str) {
    assert!(
        head.is_empty() || head[0] == 0x15,
        "{what}: expected an alert or a closed connection, got {head:02x?}"
    );
    assert!(
        !(head.len() >= 6 && head[0] == 0x16 && head[5] == 2),
        "{what}: the server answered with a ServerHello"
    );
}

const ECDHE_ECDSA_AES128_GCM_SHA256: u16 = 0xc02b;
const CBC_SUITES: &[u16] = &[
    0xc009, 0xc00a, 0xc013, 0xc014, 0x002f, 0x0035, 0xc023, 0xc027,
];

#[tokio::test]
async fn old_protocols_and_cbc_suites_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::self_signed(&["localhost"]);
    let up = Upstream::start("production").await;
    let certs = [leaf.write(dir.path(), "localhost")];
    let gw = start_https(
        dir.path(),
        &format!("{}{}", tls_section("", &certs), production(&up.url())),
    )
    .await;

    // Positive control: the same hand-built hello at TLS 1.2 gets a ServerHello.
    let head = reply_head(
        gw.https,
        &client_hello(0x0303, &[ECDHE_ECDSA_AES128_GCM_SHA256], "localhost"),
    )
    .await;
    assert!(
        head.len() >= 6 && head[0] == 0x16 && head[5] == 2,
        "control: a TLS 1.2 GCM hello should get a ServerHello, got {head:02x?}"
    );

    let head = reply_head(
        gw.https,
        &client_hello(0x0302, &[ECDHE_ECDSA_AES128_GCM_SHA256], "localhost"),
    )
    .await;
    assert_refused(&head, "TLS 1.1 hello");

    let head = reply_head(gw.https, &client_hello(0x0303, CBC_SUITES, "localhost")).await;
    assert_refused(&head, "TLS 1.2 hello with only CBC suites");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn min_version_1_3_refuses_tls_1_2_clients() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = Leaf::self_signed(&["localhost"]);
    let up = Upstream::start("production").await;
    let certs = [leaf.write(dir.path(), "localhost")];
    let gw = start_https(
        dir.path(),
        &format!(
            "{}{}",
            tls_section("min_version = \"1.3\"", &certs),
            production(&up.url())
        ),
    )
    .await;

    let tls12 = client_config(Trust::Any, &[&rustls::version::TLS12], H1, None);
    let refused = handshake(gw.https, tls12, dns("localhost")).await;
    assert!(
        refused.is_err(),
        "a TLS 1.2-only client completed a handshake"
    );

    let head = reply_head(
        gw.https,
        &client_hello(0x0303, &[ECDHE_ECDSA_AES128_GCM_SHA256], "localhost"),
    )
    .await;
    assert_refused(&head, "raw TLS 1.2 hello against min_version 1.3");

    let tls13 = client_config(
        Trust::Roots(&[&leaf.der]),
        &[&rustls::version::TLS13],
        H1,
        None,
    );
    let tls = handshake(gw.https, tls13.clone(), dns("localhost"))
        .await
        .expect("a TLS 1.3 client connects");
    assert_eq!(
        tls.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let answer = https_get(gw.https, tls13, "localhost", "/", &[("x-api-key", KEY)])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(up.count(), 1);
}

// ---------------------------------------------------------------------------------
// 3. ALPN

#[tokio::test]
async fn alpn_negotiates_h2_and_http_1_1_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("specter test CA");
    let leaf = ca.server(&["localhost"]);
    let up = Upstream::start("production").await;
    let certs = [leaf.write(dir.path(), "localhost")];
    let gw = start_https(
        dir.path(),
        &format!("{}{}", tls_section("", &certs), production(&up.url())),
    )
    .await;

    // h2 preferred when offered first.
    let both = client_config(
        Trust::Roots(&[&ca.der]),
        ALL_VERSIONS,
        &[b"h2", b"http/1.1"],
        None,
    );
    let tls = handshake(gw.https, both, dns("localhost")).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut req = Request::get("https://localhost/v1/orders")
        .header("x-api-key", KEY)
        .header("x-specter-client-cert-subject", "CN=admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    *req.version_mut() = http::Version::HTTP_2;
    let answer = timeout(T, async {
        sender.ready().await?;
        collect(sender.send_request(req).await?).await
    })
    .await
    .expect("h2 answer in time")
    .expect("h2 request succeeds");
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "production");

    // http/1.1 when it is the only protocol offered.
    let h1 = client_config(Trust::Roots(&[&ca.der]), ALL_VERSIONS, H1, None);
    let tls = handshake(gw.https, h1, dns("localhost")).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut sender = h1_over(tls).await.unwrap();
    let answer = send_h1(
        &mut sender,
        request("/v1/orders", "localhost", &[("x-api-key", KEY)]),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());

    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        assert_eq!(r.target, "/v1/orders");
        assert_eq!(r.headers["x-forwarded-proto"], "https");
        assert_eq!(r.headers["x-specter-environment"], "production");
        assert!(
            r.headers.get("x-specter-client-cert-subject").is_none(),
            "a client-sent subject header reached the upstream without mTLS"
        );
    }
}

// ---------------------------------------------------------------------------------
// 4. mTLS

#[tokio::test]
async fn client_ca_requires_a_client_certificate_and_forwards_its_subject() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("specter server CA");
    let clients_ca = Ca::new("specter clients CA");
    let other_ca = Ca::new("someone else's CA");
    let server = server_ca.server(&["localhost"]);
    let billing = clients_ca.client("billing");
    let stranger = other_ca.client("billing");
    let up = Upstream::start("production").await;
    let certs = [server.write(dir.path(), "localhost")];
    let ca_path = clients_ca.write(dir.path(), "clients");
    let gw = start_https(
        dir.path(),
        &format!(
            "{}{}",
            tls_section(&format!("client_ca = \"{}\"", ca_path.display()), &certs),
            production(&up.url())
        ),
    )
    .await;
    let roots = [&server_ca.der];
    let key = [("x-api-key", KEY)];

    // No client certificate, TLS 1.3: the handshake may look complete to the client;
    // the refusal arrives on the first read. Either way no answer.
    let anonymous = client_config(Trust::Roots(&roots), ALL_VERSIONS, H1, None);
    let result = https_get(gw.https, anonymous, "localhost", "/", &key).await;
    assert!(
        result.is_err(),
        "no client certificate, TLS 1.3: got an answer {:?}",
        result.map(|a| (a.status, a.text()))
    );
    let anonymous12 = client_config(Trust::Roots(&roots), &[&rustls::version::TLS12], H1, None);
    let result = https_get(gw.https, anonymous12, "localhost", "/", &key).await;
    assert!(
        result.is_err(),
        "no client certificate, TLS 1.2: got an answer {:?}",
        result.map(|a| (a.status, a.text()))
    );

    // A certificate from another CA.
    let foreign = client_config(Trust::Roots(&roots), ALL_VERSIONS, H1, Some(&stranger));
    let result = https_get(gw.https, foreign, "localhost", "/", &key).await;
    assert!(
        result.is_err(),
        "a certificate from another CA: got an answer {:?}",
        result.map(|a| (a.status, a.text()))
    );
    assert_eq!(up.count(), 0, "a refused client reached the upstream");

    // A valid certificate; a forged subject header is replaced by the real one.
    let valid = client_config(Trust::Roots(&roots), ALL_VERSIONS, H1, Some(&billing));
    let answer = https_get(gw.https, valid.clone(), "localhost", "/a", &key)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    let forged = [
        ("x-api-key", KEY),
        ("x-specter-client-cert-subject", "CN=admin"),
    ];
    let answer = https_get(gw.https, valid, "localhost", "/b", &forged)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());

    let seen = up.requests();
    assert_eq!(seen.len(), 2);
    for r in &seen {
        let subjects: Vec<&str> = r
            .headers
            .get_all("x-specter-client-cert-subject")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(subjects.len(), 1, "{}: {subjects:?}", r.target);
        assert!(
            subjects[0].contains("CN=billing"),
            "{}: {subjects:?}",
            r.target
        );
        assert!(!subjects[0].contains("admin"), "{}: {subjects:?}", r.target);
    }
}

// ---------------------------------------------------------------------------------
// 5. Certificate swap on reload

#[tokio::test]
async fn reload_swaps_the_certificate_for_new_connections_only() {
    let dir = tempfile::tempdir().unwrap();
    let cert_a = Leaf::self_signed(&["localhost"]);
    let cert_b = Leaf::self_signed(&["localhost"]);
    let up = Upstream::start("production").await;
    let files = cert_a.write(dir.path(), "server");
    let gw = start_https(
        dir.path(),
        &format!(
            "{}{}",
            tls_section("", std::slice::from_ref(&files)),
            production(&up.url())
        ),
    )
    .await;
    let inspect = client_config(Trust::Any, ALL_VERSIONS, H1, None);
    let req = || request("/", "localhost", &[("x-api-key", KEY)]);

    let old = handshake(gw.https, inspect.clone(), dns("localhost"))
        .await
        .unwrap();
    assert!(
        peer_leaf(&old) == cert_a.der,
        "first connection: not cert A"
    );
    let mut old = h1_over(old).await.unwrap();
    assert_eq!(send_h1(&mut old, req()).await.unwrap().status, 200);

    cert_b.write(dir.path(), "server");
    specter::reload::reload_now(gw.gateway.shared(), &gw.config_path)
        .expect("reload with cert B succeeds");
    let answer = send_h1(&mut old, req())
        .await
        .expect("the connection opened before the swap keeps working");
    assert_eq!(answer.status, 200, "{}", answer.text());
    let new = handshake(gw.https, inspect.clone(), dns("localhost"))
        .await
        .unwrap();
    assert!(peer_leaf(&new) == cert_b.der, "after reload: not cert B");

    std::fs::write(&files.1, "this is not a private key\n").unwrap();
    let rejected = specter::reload::reload_now(gw.gateway.shared(), &gw.config_path);
    assert!(rejected.is_err(), "a broken key file was accepted");
    let after = handshake(gw.https, inspect, dns("localhost"))
        .await
        .unwrap();
    assert!(
        peer_leaf(&after) == cert_b.der,
        "after a rejected reload: not cert B"
    );
    assert_eq!(send_h1(&mut old, req()).await.unwrap().status, 200);
    assert_eq!(up.count(), 3);
}

/// `specter_tls_certificate_expiry_seconds` carries each served file's end of
/// validity, and follows a certificate replaced by a reload.
#[tokio::test]
async fn certificate_expiry_is_exported_and_follows_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let leaf = |year: i32| {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = rcgen::date_time_ymd(year, 5, 6);
        Leaf::new(params.self_signed(&key).unwrap(), key)
    };
    let up = Upstream::start("production").await;
    let files = leaf(2031).write(dir.path(), "server");
    let gw = start_https(
        dir.path(),
        &format!(
            "{}{}",
            tls_section("", std::slice::from_ref(&files)),
            production(&up.url())
        ),
    )
    .await;
    let admin = gw.gateway.admin_addr().unwrap();
    let c = client();
    let sample = |year: i32| {
        let at = time::Date::from_calendar_date(year, time::Month::May, 6)
            .unwrap()
            .midnight()
            .assume_utc()
            .unix_timestamp();
        format!(
            "specter_tls_certificate_expiry_seconds{{certificate=\"{}\"}} {at}\n",
            files.0.display()
        )
    };
    let metrics = get(&c, &format!("http://{admin}/metrics"), &[])
        .await
        .text();
    assert!(metrics.contains(&sample(2031)), "{metrics}");

    leaf(2032).write(dir.path(), "server");
    specter::reload::reload_now(gw.gateway.shared(), &gw.config_path).expect("reload");
    let metrics = get(&c, &format!("http://{admin}/metrics"), &[])
        .await
        .text();
    assert!(metrics.contains(&sample(2032)), "{metrics}");
    assert!(!metrics.contains(&sample(2031)), "{metrics}");
}

// ---------------------------------------------------------------------------------
// 6. https upstreams with a private CA

/// An https server answering 200 "secure" to everything, with `leaf`.
async fn secure_upstream(leaf: &Leaf) -> (SocketAddr, Arc<AtomicUsize>) {
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf.der.clone()], leaf.key())
        .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, count) = (acceptor.clone(), count.clone());
            tokio::spawn(async move {
                let Ok(Ok(tls)) = timeout(T, acceptor.accept(tcp)).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(
                            Bytes::from_static(b"secure"),
                        )))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, served)
}

/// One GET through a plain-HTTP gateway in front of `upstream`, with `extra` settings.
async fn through_gateway(upstream: &str, extra: &str) -> Answer {
    let gw = TestGateway::start(&production_with(upstream, extra)).await;
    timeout(T, get(&client(), &gw.url("/"), &[("x-api-key", KEY)]))
        .await
        .expect("gateway answers in time")
}

#[tokio::test]
async fn https_upstream_is_verified_against_upstream_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("internal CA");
    let other = Ca::new("unrelated CA");
    let ca_path = ca.write(dir.path(), "internal-ca");
    let other_path = other.write(dir.path(), "other-ca");
    let (addr, served) = secure_upstream(&ca.server(&["localhost"])).await;
    let port = addr.port();

    let answer = through_gateway(
        &format!("https://localhost:{port}"),
        &format!("upstream_ca = \"{}\"\n", ca_path.display()),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secure");

    let answer = through_gateway(
        &format!("https://localhost:{port}"),
        &format!("upstream_ca = \"{}\"\n", other_path.display()),
    )
    .await;
    answer.assert_error(502, "upstream_unavailable");

    let answer = through_gateway(
        &format!("https://127.0.0.1:{port}"),
        &format!(
            "upstream_ca = \"{}\"\nupstream_sni = \"localhost\"\n",
            ca_path.display()
        ),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(answer.text(), "secure");

    // Control: without upstream_sni the certificate (localhost only) does not cover
    // 127.0.0.1, so the SNI setting is what made the previous case work.
    let answer = through_gateway(
        &format!("https://127.0.0.1:{port}"),
        &format!("upstream_ca = \"{}\"\n", ca_path.display()),
    )
    .await;
    answer.assert_error(502, "upstream_unavailable");

    assert_eq!(served.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------
// 7. `specter certs dev`

#[tokio::test]
async fn certs_dev_writes_a_usable_localhost_certificate() {
    use std::os::unix::fs::PermissionsExt;

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("certs");
    // A stale, world-readable key from before: rewriting it (--force) must also narrow
    // its mode.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("localhost.key"), "stale").unwrap();
    std::fs::set_permissions(
        out.join("localhost.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let out_arg = out.to_str().unwrap().to_owned();
    let run = timeout(
        T,
        tokio::task::spawn_blocking(move || {
            run_specter(&["certs", "dev", "--out", &out_arg, "--force"], None)
        }),
    )
    .await
    .expect("specter certs dev finishes in time")
    .unwrap();
    assert_eq!(run.code, 0, "specter certs dev failed: {}", run.stderr);

    let cert = out.join("localhost.pem");
    let key = out.join("localhost.key");
    assert!(cert.is_file() && key.is_file());
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "key file mode {mode:o}");

    let up = Upstream::start("production").await;
    let gw = start_https(
        dir.path(),
        &format!(
            "{}{}",
            tls_section("", &[(cert.clone(), key)]),
            production(&up.url())
        ),
    )
    .await;
    let der = CertificateDer::from_pem_file(&cert).unwrap();
    let trusting = client_config(Trust::Roots(&[&der]), ALL_VERSIONS, H1, None);
    let answer = https_get(gw.https, trusting, "localhost", "/", &[("x-api-key", KEY)])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.text());
    assert_eq!(up.count(), 1);
}
