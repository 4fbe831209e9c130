//! rustls configurations for HBONE (mutual TLS 1.3, ALPN `h2`) and the SPIFFE checks on them.
//!
//! ```text
//! identity::CertManager ──WorkloadCert──> client_config (outbound: dial pod B as pod A)
//!                       └─────────────────> CertResolver ──> server_config (pod B's listener)
//! tunnel::{client,server} run the handshakes; peer_identity(conn) ──> policy (authorization)
//! ```
//!
//! Both sides verify the peer's chain against the mesh roots with webpki. The client then requires
//! the server's URI SAN to be the destination workload's identity; the server requires a client
//! certificate whose identity is in the mesh's trust domain, and leaves the rest to authorization.
//! DNS names and IPs in certificates are not checked: workloads are named by SPIFFE id only.
//!
//! One crypto provider (aws-lc-rs) for everything; TLS 1.2 is never negotiated.

mod resolver;
mod verify;

#[cfg(test)]
mod tests;

use std::sync::{Arc, LazyLock};

use rustls::{
    CommonState,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, TrustAnchor, pem::PemObject},
};

pub use resolver::CertResolver;

use crate::identity::{Identity, WorkloadCert};

/// HBONE is HTTP/2 CONNECT.
const ALPN_H2: &[u8] = b"h2";

/// Session tickets a server sends per handshake. The HBONE pool keeps one long-lived connection per
/// (source identity, destination) and redials them one at a time, so a single ticket covers the
/// reconnect; more would only fill the server's session cache.
const TLS13_TICKETS: usize = 1;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no trust roots given; check the mesh root certificate (root-cert.pem) is configured and not empty"
    )]
    NoRoots,
    #[error(
        "trust root {index} is not a usable x.509 certificate ({cause}); check the mesh root certificate file"
    )]
    BadRoot { index: usize, cause: webpki::Error },
    #[error(
        "cannot read the pem trust roots ({0}); the file must hold one or more CERTIFICATE blocks"
    )]
    Pem(rustls::pki_types::pem::Error),
    #[error(
        "the certificate for {identity} has an empty chain; check the certificate authority's response"
    )]
    EmptyChain { identity: String },
    #[error(
        "the certificate for {identity} carries {found} in its uri san; check the certificate authority signed it for this identity"
    )]
    CertIdentity { identity: String, found: String },
    #[error(
        "the private key for {identity} is unusable or does not match its certificate ({cause}); it must be the pkcs#8 ecdsa p-256 key the csr was made with"
    )]
    Key {
        identity: String,
        cause: rustls::Error,
    },
    #[error("cannot build the tls configuration: {0}")]
    Config(rustls::Error),
    #[error(
        "no expected peer identity given; the destination workload's service account must be known before dialing it"
    )]
    NoExpectedIdentity,
    #[error("invalid trust domain {trust_domain:?}: {why}")]
    BadTrustDomain { trust_domain: String, why: String },
    #[error(
        "the resolver holds certificates for {holds}, not {got}; use one resolver per identity"
    )]
    IdentityChanged { holds: String, got: String },

    // Handshake verdicts; these reach the caller inside the rustls error of the handshake.
    #[error(
        "peer presented identity {presented} but {expected} was expected; check the destination's service account, and that its address is not now used by another workload"
    )]
    UnexpectedIdentity { presented: String, expected: String },
    #[error(
        "peer certificate must carry exactly one uri san, a spiffe:// identity (uris: {uris}); check it was issued by the mesh certificate authority"
    )]
    NoPeerIdentity { uris: String },
    #[error(
        "client identity {presented} is not in trust domain {trust_domain}; check both sides use the same trust domain and roots"
    )]
    ForeignTrustDomain {
        presented: String,
        trust_domain: String,
    },
}

/// Trust anchors (the mesh root certificates).
#[derive(Clone)]
pub struct TrustRoots {
    anchors: Arc<[TrustAnchor<'static>]>,
}

impl TrustRoots {
    /// Trusts these DER certificates as roots. At least one is required.
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<TrustRoots, Error> {
        if roots.is_empty() {
            return Err(Error::NoRoots);
        }
        let anchors = roots
            .iter()
            .enumerate()
            .map(|(index, der)| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|cause| Error::BadRoot { index, cause })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        Ok(TrustRoots {
            anchors: anchors.into(),
        })
    }

    /// Trusts every `CERTIFICATE` block of a PEM bundle; other blocks are skipped.
    pub fn from_pem(pem: &[u8]) -> Result<TrustRoots, Error> {
        let roots = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(Error::Pem)?;
        TrustRoots::new(roots)
    }

    /// How many roots are trusted.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Never true: a `TrustRoots` holds at least one root.
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    fn anchors(&self) -> &[TrustAnchor<'static>] {
        &self.anchors
    }
}

impl std::fmt::Debug for TrustRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustRoots")
            .field("roots", &self.len())
            .finish()
    }
}

/// Client config for an HBONE connection made on behalf of `cert`'s workload to a peer that must
/// present one of `expected` identities (the destination workload's identity).
///
/// The server's chain must lead to `roots` (server_auth usage, valid now) and its leaf's URI SAN
/// identity must be one of `expected`; the handshake error for a mismatch names both. The server
/// name passed to the connector is not checked (HBONE dials IPs) and no SNI is sent. `cert` is
/// presented as the client certificate. Session tickets are cached in the returned config (rustls'
/// default), so reusing it for the same destination lets reconnects resume.
pub fn client_config(
    cert: &WorkloadCert,
    roots: &TrustRoots,
    expected: Vec<Identity>,
) -> Result<Arc<rustls::ClientConfig>, Error> {
    if expected.is_empty() {
        return Err(Error::NoExpectedIdentity);
    }
    check_own_cert(cert)?;
    let provider = provider();
    let verifier = Arc::new(verify::ServerVerifier {
        roots: roots.clone(),
        algs: provider.signature_verification_algorithms,
        expected,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(|cause| Error::Key {
            identity: cert.identity.to_string(),
            cause,
        })?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.max_fragment_size = None;
    // `resumption` keeps rustls' default: an in-memory cache of TLS 1.3 tickets.
    Ok(Arc::new(config))
}

/// Server config for a pod's HBONE listener.
///
/// A client certificate is required; its chain must lead to `roots` (client_auth usage, valid now)
/// and its URI SAN must be a SPIFFE id in `trust_domain` (the handshake error names the presented
/// identity and the trust domain). Which identities may connect is authorization's call, made with
/// [`peer_identity`]. The server certificate comes from `resolver`, so a rotation applies to the
/// next handshake. Resumed sessions keep the client identity verified in the full handshake.
pub fn server_config(
    resolver: Arc<CertResolver>,
    roots: &TrustRoots,
    trust_domain: &str,
) -> Result<Arc<rustls::ServerConfig>, Error> {
    check_trust_domain(trust_domain)?;
    let provider = provider();
    let verifier = Arc::new(verify::ClientVerifier {
        roots: roots.clone(),
        algs: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.max_fragment_size = None;
    // `session_storage` keeps rustls' default (an in-memory cache, stateful tickets).
    config.send_tls13_tickets = TLS13_TICKETS;
    Ok(Arc::new(config))
}

/// The SPIFFE identity of a certificate: its URI SAN, which must be the only one and a
/// `spiffe://` id that parses (an X.509-SVID carries exactly one URI SAN; with two, which one
/// names the peer would be the verifier's guess).
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    sole_identity(&cert)
}

/// The verified peer's identity after a handshake (from `conn.peer_certificates()`).
pub fn peer_identity(conn: &CommonState) -> Option<Identity> {
    identity_of(conn.peer_certificates()?.first()?)
}

/// The aws-lc-rs provider every configuration uses.
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: LazyLock<Arc<CryptoProvider>> =
        LazyLock::new(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()));
    PROVIDER.clone()
}

fn sole_identity(cert: &webpki::EndEntityCert<'_>) -> Option<Identity> {
    let mut uris = cert.valid_uri_names();
    let uri = uris.next()?;
    if uris.next().is_some() || !uri.starts_with("spiffe://") {
        return None;
    }
    uri.parse().ok()
}

/// Our own certificate must be presentable: a chain, and a leaf that carries our identity.
fn check_own_cert(cert: &WorkloadCert) -> Result<(), Error> {
    let leaf = cert.chain.first().ok_or_else(|| Error::EmptyChain {
        identity: cert.identity.to_string(),
    })?;
    match identity_of(leaf) {
        Some(found) if found == cert.identity => Ok(()),
        found => Err(Error::CertIdentity {
            identity: cert.identity.to_string(),
            found: found.map_or_else(|| "no spiffe:// identity".to_owned(), |id| id.to_string()),
        }),
    }
}

fn check_trust_domain(trust_domain: &str) -> Result<(), Error> {
    // The identity type owns the rules; any valid namespace/service account will do here.
    match Identity::new(trust_domain, "ns", "sa") {
        Ok(_) => Ok(()),
        Err(e) => Err(Error::BadTrustDomain {
            trust_domain: trust_domain.to_owned(),
            why: match e {
                crate::identity::ParseError::Part { why, .. } => why.to_owned(),
                other => other.to_string(),
            },
        }),
    }
}

/// Keeps `slot` holding the HBONE server config for `identity` until `cancel`: built when the
/// identity's first certificate arrives, then updated in place on every rotation (new handshakes
/// get the new certificate at once). Shared by pods' 15008 listeners and the waypoint.
pub async fn follow_server_config(
    certs: &crate::identity::manager::CertManager,
    identity: &Identity,
    roots: &TrustRoots,
    trust_domain: &str,
    slot: &arc_swap::ArcSwapOption<rustls::ServerConfig>,
    cancel: tokio_util::sync::CancellationToken,
) {
    let Some(mut updates) = certs.subscribe(identity) else {
        tracing::error!(%identity, "BUG: identity not registered with the certificate manager");
        return;
    };
    let mut resolver: Option<Arc<CertResolver>> = None;
    loop {
        let cert = updates.borrow_and_update().clone();
        if let Some(cert) = cert {
            let result = match &resolver {
                Some(r) => r.update(&cert),
                None => CertResolver::new(&cert).and_then(|r| {
                    let r = Arc::new(r);
                    slot.store(Some(server_config(r.clone(), roots, trust_domain)?));
                    resolver = Some(r);
                    tracing::info!(%identity, serial = %cert.serial, "HBONE server certificate in place");
                    Ok(())
                }),
            };
            if let Err(e) = result {
                tracing::error!(%identity, error = %e, "cannot use the new certificate; check what the CA issued");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = updates.changed() => if changed.is_err() { return },
        }
    }
}
