//! Real TLS 1.3 handshakes over an in-memory duplex, with certificates from a small rcgen CA (so
//! these tests do not depend on `identity::builtin`).

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::{
    HandshakeKind,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::*;
use crate::identity::ca::serial_hex;

const TD: &str = "cluster.local";

fn id(s: &str) -> Identity {
    s.parse().expect("test identity")
}

/// A CA hierarchy: `root` is what peers trust, `tail` the intermediates between it and the issuer.
struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    root: CertificateDer<'static>,
    root_pem: String,
    tail: Vec<CertificateDer<'static>>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256 key")
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = p256();
        let params = ca_params(name);
        let root = params.self_signed(&key).expect("root cert");
        TestCa {
            issuer: Issuer::new(params, key),
            root: root.der().clone(),
            root_pem: root.pem(),
            tail: Vec::new(),
        }
    }

    fn intermediate(&self, name: &str) -> TestCa {
        let key = p256();
        let params = ca_params(name);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("intermediate cert");
        let mut tail = vec![cert.der().clone()];
        tail.extend(self.tail.iter().cloned());
        TestCa {
            issuer: Issuer::new(params, key),
            root: self.root.clone(),
            root_pem: self.root_pem.clone(),
            tail,
        }
    }

    fn roots(&self) -> TrustRoots {
        TrustRoots::new(vec![self.root.clone()]).expect("roots")
    }

    /// A workload certificate for `identity` (also its URI SAN).
    fn issue(&self, identity: &str) -> WorkloadCert {
        self.issue_with(identity, |_| {})
    }

    /// Like `issue`, with `edit` applied to the leaf's parameters (SANs, validity, ...).
    fn issue_with(
        &self,
        identity: &str,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> WorkloadCert {
        let key = p256();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![uri_san(identity)];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.serial_number = Some(fastrand::u64(1..u64::MAX >> 1).into());
        params.use_authority_key_identifier_extension = true;
        edit(&mut params);
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("leaf cert")
            .der()
            .clone();
        let mut chain = vec![leaf];
        chain.extend(self.tail.iter().cloned());
        let now = SystemTime::now();
        WorkloadCert {
            identity: id(identity),
            serial: serial_hex(&chain[0]).expect("serial"),
            chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before: now,
            not_after: now + Duration::from_secs(3600),
        }
    }
}

fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("ia5 uri"))
}

const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/sleep";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/httpbin";

fn server(ca: &TestCa, identity: &str) -> (Arc<CertResolver>, Arc<rustls::ServerConfig>) {
    let resolver = Arc::new(CertResolver::new(&ca.issue(identity)).expect("resolver"));
    let config = server_config(resolver.clone(), &ca.roots(), TD).expect("server config");
    (resolver, config)
}

type Pair = (
    std::io::Result<client::TlsStream<tokio::io::DuplexStream>>,
    std::io::Result<server::TlsStream<tokio::io::DuplexStream>>,
);

/// Runs both sides of a handshake; HBONE dials by IP, so the server name is one.
async fn handshake(client: Arc<rustls::ClientConfig>, server: Arc<rustls::ServerConfig>) -> Pair {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let name = ServerName::IpAddress(Ipv4Addr::new(10, 0, 0, 7).into());
    let pair = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(
            TlsConnector::from(client).connect(name, c),
            TlsAcceptor::from(server).accept(s)
        )
    });
    pair.await.expect("handshake hung")
}

/// Completes a handshake and a round trip (which also delivers the session ticket).
async fn connect_ok(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (
    client::TlsStream<tokio::io::DuplexStream>,
    server::TlsStream<tokio::io::DuplexStream>,
) {
    let (c, s) = handshake(client, server).await;
    let (mut c, mut s) = (c.expect("client handshake"), s.expect("server handshake"));
    s.write_all(b"hi").await.expect("server write");
    s.flush().await.expect("server flush");
    let mut buf = [0u8; 2];
    c.read_exact(&mut buf).await.expect("client read");
    assert_eq!(&buf, b"hi");
    (c, s)
}

/// In TLS 1.3 the client finishes first, so a refused client cert shows up at the server, and at
/// the client only on its first read (as the server's alert).
async fn assert_server_refuses(pair: Pair, want: &str) -> String {
    let (c, s) = pair;
    let err = s.expect_err("server must refuse the client").to_string();
    assert!(err.contains(want), "server error {err:?} lacks {want:?}");
    if let Ok(mut c) = c {
        let mut buf = [0u8; 1];
        let read = c.read(&mut buf).await;
        assert!(
            matches!(read, Err(_) | Ok(0)),
            "client must see the refusal, got {read:?}"
        );
    }
    err
}

#[tokio::test]
async fn mutual_handshake_sees_both_identities() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let client_cfg = client_config(&ca.issue(CLIENT), &ca.roots(), vec![id(SERVER)]).expect("cfg");

    let (c, s) = connect_ok(client_cfg, server_cfg).await;
    let (_, cc) = c.get_ref();
    let (_, sc) = s.get_ref();
    assert_eq!(peer_identity(cc), Some(id(SERVER)));
    assert_eq!(peer_identity(sc), Some(id(CLIENT)));
    assert_eq!(
        cc.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(cc.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(sc.alpn_protocol(), Some(&b"h2"[..]));
}

#[tokio::test]
async fn any_of_the_expected_identities_is_accepted() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let expected = vec![id("spiffe://cluster.local/ns/default/sa/other"), id(SERVER)];
    let client_cfg = client_config(&ca.issue(CLIENT), &ca.roots(), expected).expect("cfg");
    connect_ok(client_cfg, server_cfg).await;
}

#[tokio::test]
async fn chains_through_an_intermediate() {
    let root = TestCa::new("root");
    let ca = root.intermediate("intermediate");
    let (_, server_cfg) = server(&ca, SERVER);
    let client_cfg =
        client_config(&ca.issue(CLIENT), &root.roots(), vec![id(SERVER)]).expect("cfg");
    let (c, s) = connect_ok(client_cfg, server_cfg).await;
    assert_eq!(peer_identity(s.get_ref().1), Some(id(CLIENT)));
    assert_eq!(peer_identity(c.get_ref().1), Some(id(SERVER)));
}

#[tokio::test]
async fn client_from_another_ca_is_refused() {
    let ca = TestCa::new("root");
    let other = TestCa::new("other root");
    let (_, server_cfg) = server(&ca, SERVER);
    // The client trusts the server, but its own certificate is from an unrelated root.
    let client_cfg =
        client_config(&other.issue(CLIENT), &ca.roots(), vec![id(SERVER)]).expect("cfg");
    assert_server_refuses(handshake(client_cfg, server_cfg).await, "UnknownIssuer").await;
}

#[tokio::test]
async fn server_from_another_ca_is_refused() {
    let ca = TestCa::new("root");
    let other = TestCa::new("other root");
    let (_, server_cfg) = server(&other, SERVER);
    let client_cfg = client_config(&ca.issue(CLIENT), &ca.roots(), vec![id(SERVER)]).expect("cfg");
    let (c, s) = handshake(client_cfg, server_cfg).await;
    let err = c.expect_err("client must refuse").to_string();
    assert!(err.contains("UnknownIssuer"), "{err}");
    assert!(s.is_err());
}

#[tokio::test]
async fn client_without_a_certificate_is_refused() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let provider = provider();
    let verifier = Arc::new(verify::ServerVerifier {
        roots: ca.roots(),
        algs: provider.signature_verification_algorithms,
        expected: vec![id(SERVER)],
    });
    let mut anonymous = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    assert_server_refuses(
        handshake(Arc::new(anonymous), server_cfg).await,
        "peer sent no certificates",
    )
    .await;
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let foreign = "spiffe://other.domain/ns/default/sa/sleep";
    let client_cfg = client_config(&ca.issue(foreign), &ca.roots(), vec![id(SERVER)]).expect("cfg");
    let err = assert_server_refuses(handshake(client_cfg, server_cfg).await, foreign).await;
    assert!(err.contains("not in trust domain cluster.local"), "{err}");
}

/// A client that presents `cert` as it is (built by hand: `client_config` refuses to present a
/// certificate that does not carry its identity), expecting the server to be `SERVER`.
fn presenting(ca: &TestCa, cert: WorkloadCert) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let verifier = Arc::new(verify::ServerVerifier {
        roots: ca.roots(),
        algs: provider.signature_verification_algorithms,
        expected: vec![id(SERVER)],
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain, cert.key)
        .expect("client cert");
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(cfg)
}

#[tokio::test]
async fn client_without_a_spiffe_identity_is_refused() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    // A mesh-signed certificate whose SAN is not a SPIFFE id; built by hand since `client_config`
    // refuses to present a certificate that does not carry its identity.
    let cert = ca.issue_with(CLIENT, |p| {
        p.subject_alt_names = vec![SanType::DnsName("sleep.default".try_into().expect("dns"))]
    });
    assert_server_refuses(
        handshake(presenting(&ca, cert), server_cfg).await,
        "exactly one uri san",
    )
    .await;
}

#[tokio::test]
async fn a_client_with_two_uri_sans_is_refused() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    // Signed by the mesh CA, but which of the two names the client would be a guess.
    let cert = ca.issue_with(CLIENT, |p| {
        p.subject_alt_names = vec![uri_san(CLIENT), uri_san(SERVER)]
    });
    let err = assert_server_refuses(
        handshake(presenting(&ca, cert), server_cfg).await,
        "exactly one uri san",
    )
    .await;
    assert!(err.contains(SERVER), "the error lists the URIs: {err}");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let cert = ca.issue_with(CLIENT, |p| {
        p.not_before = rcgen::date_time_ymd(1999, 1, 1);
        p.not_after = rcgen::date_time_ymd(2000, 1, 1);
    });
    let client_cfg = client_config(&cert, &ca.roots(), vec![id(SERVER)]).expect("cfg");
    assert_server_refuses(
        handshake(client_cfg, server_cfg).await,
        "certificate expired",
    )
    .await;
}

#[tokio::test]
async fn unexpected_server_identity_is_refused_naming_both() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let want = "spiffe://cluster.local/ns/default/sa/reviews";
    let client_cfg = client_config(&ca.issue(CLIENT), &ca.roots(), vec![id(want)]).expect("cfg");
    let (c, s) = handshake(client_cfg, server_cfg).await;
    let err = c.expect_err("client must refuse the server").to_string();
    assert!(err.contains(SERVER) && err.contains(want), "{err}");
    assert!(err.contains("peer presented identity"), "{err}");
    assert!(s.is_err(), "server must see the client's alert");
}

#[tokio::test]
async fn rotation_applies_to_the_next_handshake() {
    let ca = TestCa::new("root");
    let (resolver, server_cfg) = server(&ca, SERVER);
    let client_cert = ca.issue(CLIENT);
    let first = resolver.serial();

    let cfg = client_config(&client_cert, &ca.roots(), vec![id(SERVER)]).expect("cfg");
    let (c, _s) = connect_ok(cfg, server_cfg.clone()).await;
    let seen = c.get_ref().1.peer_certificates().expect("server chain")[0].clone();
    assert_eq!(serial_hex(&seen), Some(first.clone()));

    let next = ca.issue(SERVER);
    resolver.update(&next).expect("update");
    assert_eq!(resolver.serial(), next.serial);
    assert_ne!(next.serial, first);

    // A fresh client config, so the handshake is a full one rather than a resumption.
    let cfg = client_config(&client_cert, &ca.roots(), vec![id(SERVER)]).expect("cfg");
    let (c, _s) = connect_ok(cfg, server_cfg).await;
    let seen = c.get_ref().1.peer_certificates().expect("server chain")[0].clone();
    assert_eq!(serial_hex(&seen), Some(next.serial));
}

#[tokio::test]
async fn resumed_sessions_keep_both_identities() {
    let ca = TestCa::new("root");
    let (_, server_cfg) = server(&ca, SERVER);
    let cfg = client_config(&ca.issue(CLIENT), &ca.roots(), vec![id(SERVER)]).expect("cfg");
    let (c, _s) = connect_ok(cfg.clone(), server_cfg.clone()).await;
    assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Full));

    let (c, s) = connect_ok(cfg, server_cfg).await;
    assert_eq!(c.get_ref().1.handshake_kind(), Some(HandshakeKind::Resumed));
    assert_eq!(peer_identity(s.get_ref().1), Some(id(CLIENT)));
    assert_eq!(peer_identity(c.get_ref().1), Some(id(SERVER)));
}

#[test]
fn resolver_refuses_bad_certificates() {
    let ca = TestCa::new("root");
    let resolver = CertResolver::new(&ca.issue(SERVER)).expect("resolver");
    let before = resolver.serial();

    let e = resolver
        .update(&ca.issue(CLIENT))
        .expect_err("other identity");
    assert!(matches!(e, Error::IdentityChanged { .. }), "{e}");

    // Key from another certificate.
    let mut mixed = ca.issue(SERVER);
    mixed.key = ca.issue(SERVER).key;
    let e = resolver.update(&mixed).expect_err("mismatched key");
    assert!(matches!(e, Error::Key { .. }), "{e}");

    // Leaf issued for a different identity than it claims.
    let mut wrong = ca.issue(CLIENT);
    wrong.identity = id(SERVER);
    let e = resolver
        .update(&wrong)
        .expect_err("leaf for another identity");
    assert!(e.to_string().contains(CLIENT), "{e}");

    let mut empty = ca.issue(SERVER);
    empty.chain.clear();
    let e = CertResolver::new(&empty).expect_err("empty chain");
    assert!(matches!(e, Error::EmptyChain { .. }), "{e}");

    assert_eq!(
        resolver.serial(),
        before,
        "failed updates keep the old certificate"
    );
}

#[test]
fn config_arguments_are_checked() {
    let ca = TestCa::new("root");
    let cert = ca.issue(CLIENT);
    let e = client_config(&cert, &ca.roots(), vec![]).expect_err("no expected identity");
    assert!(matches!(e, Error::NoExpectedIdentity), "{e}");

    let resolver = Arc::new(CertResolver::new(&ca.issue(SERVER)).expect("resolver"));
    for td in ["", "Cluster.Local", "td/x"] {
        let e = server_config(resolver.clone(), &ca.roots(), td).expect_err(td);
        assert!(matches!(e, Error::BadTrustDomain { .. }), "{td}: {e}");
    }
}

#[test]
fn trust_roots_from_pem() {
    let a = TestCa::new("a");
    let b = TestCa::new("b");
    let bundle = format!("{}junk between blocks\n{}", a.root_pem, b.root_pem);
    assert_eq!(
        TrustRoots::from_pem(bundle.as_bytes())
            .expect("bundle")
            .len(),
        2
    );

    let e = TrustRoots::from_pem(b"").expect_err("empty");
    assert!(matches!(e, Error::NoRoots), "{e}");
    let e = TrustRoots::from_pem(b"-----BEGIN CERTIFICATE-----\n!!\n-----END CERTIFICATE-----\n")
        .expect_err("bad base64");
    assert!(matches!(e, Error::Pem(_)), "{e}");
    let e = TrustRoots::new(vec![CertificateDer::from(vec![1, 2, 3])]).expect_err("not a cert");
    assert!(matches!(e, Error::BadRoot { index: 0, .. }), "{e}");
}

#[test]
fn identity_is_the_one_and_only_uri_san() {
    let ca = TestCa::new("root");
    let one = ca.issue_with(CLIENT, |p| {
        p.subject_alt_names = vec![
            SanType::DnsName("sleep.default".try_into().expect("dns")),
            uri_san(CLIENT),
        ]
    });
    assert_eq!(
        identity_of(&one.chain[0]),
        Some(id(CLIENT)),
        "DNS SANs do not count"
    );
    for sans in [
        vec![uri_san(CLIENT), uri_san(SERVER)],
        vec![uri_san("https://example.com/x"), uri_san(CLIENT)],
        vec![uri_san("spiffe://cluster.local/not/istio")],
    ] {
        let cert = ca.issue_with(CLIENT, |p| p.subject_alt_names = sans.clone());
        assert_eq!(identity_of(&cert.chain[0]), None, "{sans:?}");
    }
    assert_eq!(identity_of(&a_root_without_sans()), None);
    assert_eq!(identity_of(&CertificateDer::from(vec![0u8; 4])), None);
}

fn a_root_without_sans() -> CertificateDer<'static> {
    TestCa::new("bare").root
}
