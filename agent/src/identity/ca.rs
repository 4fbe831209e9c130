//! The contract between the certificate manager and a certificate authority, and the certificate
//! the agent holds for one workload identity.

use std::{
    future::Future,
    pin::Pin,
    time::{Duration, SystemTime},
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use super::Identity;

/// Errors from a CA back end. `Unavailable` is retried with backoff; `Rejected` too, but it is
/// reported as the CA refusing (wrong token, identity not allowed).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("certificate authority unreachable: {0}")]
    Unavailable(String),
    #[error("certificate authority refused the request: {0}")]
    Rejected(String),
    #[error("certificate authority returned an unusable certificate: {0}")]
    BadResponse(String),
    #[error("cannot build the certificate request: {0}")]
    Csr(String),
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A certificate authority that signs workload CSRs.
pub trait CaClient: Send + Sync + 'static {
    /// Signs `csr_pem` (a PKCS#10 CSR whose URI SAN is `identity`) for `ttl`. Returns the chain,
    /// leaf first, as PEM-decoded DER.
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, Error>>;

    /// A short description for status output, e.g. `builtin CA (/var/lib/ambit/ca)`.
    fn describe(&self) -> String;

    /// The CA's root certificates, when it knows them (the built-in CA does). A CA server
    /// returns them after the chain, as istiod does and as ztunnel expects.
    fn roots(&self) -> Vec<CertificateDer<'static>> {
        Vec::new()
    }
}

/// A certificate and key for one workload identity. The key was generated in the agent and never
/// left it.
#[derive(Debug)]
pub struct WorkloadCert {
    pub identity: Identity,
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// ECDSA P-256 private key (PKCS#8).
    pub key: PrivateKeyDer<'static>,
    /// Hex serial of the leaf.
    pub serial: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The serial number of a certificate as lowercase hex (as `ambitctl` and the logs show it).
pub fn serial_hex(der: &CertificateDer<'_>) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some(
        cert.tbs_certificate
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}
