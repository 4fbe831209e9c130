//! The built-in certificate authority of standalone mode: a self-signed ECDSA P-256 root kept in
//! the agent's state directory (or given by the operator as files), signing the workload CSRs of
//! [`CertManager`](super::manager::CertManager) in-process.
//!
//! ```text
//! CertManager ──(CSR PEM)──> BuiltinCa::sign ──> leaf (URI SAN = identity), signed by the root
//! ```
//!
//! The root certificate is the mesh's trust anchor; it is distributed separately (`root_pem`),
//! never appended to the workload chain.

use std::{
    fmt, fs,
    io::Write as _,
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::CertificateDer;

use super::{
    Identity,
    ca::{self, BoxFuture, CaClient, WorkloadCert},
    manager,
};

/// File name of the root certificate in the CA directory.
pub const CERT_FILE: &str = "ca-cert.pem";
/// File name of the root key in the CA directory.
pub const KEY_FILE: &str = "ca-key.pem";

/// Subject common name of a generated root.
const ROOT_CN: &str = "Ambit root CA";
/// Lifetime of a generated root: 10 years.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// A generated root is valid from this long before its creation, for nodes whose clock is behind.
const ROOT_BACKDATE: Duration = Duration::from_secs(3600);
/// Workload certificates are valid from this long before they are issued (clock skew).
const LEAF_BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot create the CA directory {path}: {source} (check the agent's stateDir and its permissions)"
    )]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source} (check free space and permissions of the CA directory)")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "found {present} but not {missing}: restore the missing file, or remove both to generate a new root (every workload certificate then changes trust anchor)"
    )]
    Partial { present: PathBuf, missing: PathBuf },
    #[error("{path} holds no PEM certificate (expected a \"BEGIN CERTIFICATE\" block)")]
    NoCert { path: PathBuf },
    #[error("{path} is not a usable certificate: {why}")]
    BadCert { path: PathBuf, why: String },
    #[error(
        "{path} is not a usable private key (expected an unencrypted PKCS#8 or SEC1 PEM key): {why}"
    )]
    BadKey { path: PathBuf, why: String },
    #[error(
        "the key {key} does not belong to the certificate {cert}: check that the two files come from the same CA"
    )]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error(
        "{path} is not a CA certificate: it needs basic constraints CA:true and key usage keyCertSign"
    )]
    NotCa { path: PathBuf },
    #[error(
        "the root certificate {path} expired at {when}: replace it (for a generated root, remove the CA directory to generate a new one)"
    )]
    Expired { path: PathBuf, when: String },
    #[error("cannot generate the root CA: {0}")]
    Generate(rcgen::Error),
    #[error(transparent)]
    Issue(#[from] ca::Error),
}

/// The built-in CA: a root certificate and its key, signing workload certificates in-process.
pub struct BuiltinCa {
    root_der: CertificateDer<'static>,
    root_pem: String,
    issuer: Issuer<'static, KeyPair>,
    root_not_after: SystemTime,
    /// When set, only identities of this trust domain are signed.
    trust_domain: Option<String>,
    describe: String,
}

impl fmt::Debug for BuiltinCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key.
        f.debug_struct("BuiltinCa")
            .field("describe", &self.describe)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl BuiltinCa {
    /// Loads `ca-cert.pem` and `ca-key.pem` from `dir`, or, on first start, generates an ECDSA
    /// P-256 self-signed root for `trust_domain` (CN "Ambit root CA", O = trust domain, valid 10
    /// years) and persists both (directory created 0700, key file 0600).
    ///
    /// The CA then signs only identities of `trust_domain`.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<BuiltinCa, Error> {
        let cert_path = dir.join(CERT_FILE);
        let key_path = dir.join(KEY_FILE);
        let ca = match (exists(&cert_path)?, exists(&key_path)?) {
            (true, true) => {
                let ca = BuiltinCa::from_files(&cert_path, &key_path)?;
                tracing::info!(dir = %dir.display(), "loaded the built-in CA root");
                ca
            }
            (true, false) => {
                return Err(Error::Partial {
                    present: cert_path,
                    missing: key_path,
                });
            }
            (false, true) => {
                return Err(Error::Partial {
                    present: key_path,
                    missing: cert_path,
                });
            }
            (false, false) => {
                let (ca, key_pem) = BuiltinCa::generate_with_key(trust_domain)?;
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(|source| Error::CreateDir {
                        path: dir.to_owned(),
                        source,
                    })?;
                // The key first: a crash in between leaves a key without a certificate, which is
                // reported (Partial) rather than silently replaced.
                write_file(&key_path, key_pem.as_bytes(), 0o600)?;
                write_file(&cert_path, ca.root_pem.as_bytes(), 0o644)?;
                tracing::info!(dir = %dir.display(), trust_domain, "generated a new built-in CA root");
                ca
            }
        };
        Ok(ca
            .with_trust_domain(trust_domain)
            .with_describe(format!("builtin CA ({})", dir.display())))
    }

    /// Loads an operator-provided root: a PEM certificate (the first one in the file) and its PEM
    /// private key. The certificate must be a CA, currently valid, and match the key.
    pub fn from_files(cert_pem: &Path, key_pem: &Path) -> Result<BuiltinCa, Error> {
        let cert_text = fs::read(cert_pem).map_err(|source| Error::Read {
            path: cert_pem.to_owned(),
            source,
        })?;
        let root_der = rustls_pemfile::certs(&mut cert_text.as_slice())
            .next()
            .ok_or_else(|| Error::NoCert {
                path: cert_pem.to_owned(),
            })?
            .map_err(|e| Error::BadCert {
                path: cert_pem.to_owned(),
                why: e.to_string(),
            })?;
        let key_text = fs::read_to_string(key_pem).map_err(|source| Error::Read {
            path: key_pem.to_owned(),
            source,
        })?;
        let key = KeyPair::from_pem(&key_text).map_err(|e| Error::BadKey {
            path: key_pem.to_owned(),
            why: e.to_string(),
        })?;
        if let Ok(meta) = fs::metadata(key_pem)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(
                path = %key_pem.display(),
                mode = format_args!("{:o}", meta.permissions().mode() & 0o777),
                "the CA key file is readable by other users; restrict it to 0600"
            );
        }
        let ca = BuiltinCa::from_parts(root_der, key, cert_pem, key_pem)?;
        Ok(ca.with_describe(format!("builtin CA ({})", cert_pem.display())))
    }

    /// Generates a root in memory only (nothing is written), e.g. for tests that need a CA, or
    /// two unrelated ones.
    pub fn generate(trust_domain: &str) -> Result<BuiltinCa, Error> {
        Ok(BuiltinCa::generate_with_key(trust_domain)?
            .0
            .with_trust_domain(trust_domain))
    }

    /// Restricts signing to identities of `trust_domain`.
    pub fn with_trust_domain(mut self, trust_domain: &str) -> BuiltinCa {
        self.trust_domain = Some(trust_domain.to_owned());
        self
    }

    fn with_describe(mut self, describe: String) -> BuiltinCa {
        self.describe = describe;
        self
    }

    /// The root certificate: the trust anchor for the workload certificates this CA signs.
    pub fn root_cert(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate as PEM.
    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    /// Generates a key and CSR for `identity` and signs it, as the certificate manager would: a
    /// complete [`WorkloadCert`] without a manager (tests, tools).
    pub fn issue_for_test(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, Error> {
        let (key, csr) = manager::new_key_and_csr(identity)?;
        let chain = self.sign_csr(identity, &csr, ttl)?;
        Ok(manager::workload_cert(identity, &key, chain)?)
    }

    /// Returns the root and the key PEM (for persisting).
    fn generate_with_key(trust_domain: &str) -> Result<(BuiltinCa, String), Error> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(Error::Generate)?;
        let now = SystemTime::now();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ROOT_CN);
        dn.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = (now - ROOT_BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        params.serial_number = Some(random_serial().map_err(Error::Generate)?);
        let cert = params.self_signed(&key).map_err(Error::Generate)?;
        let key_pem = key.serialize_pem();
        let root_pem = cert.pem();
        let issuer = Issuer::new(params, key);
        let ca = BuiltinCa {
            root_der: cert.der().clone(),
            root_pem,
            issuer,
            root_not_after: now + ROOT_LIFETIME,
            trust_domain: None,
            describe: "builtin CA (in memory)".to_owned(),
        };
        Ok((ca, key_pem))
    }

    fn from_parts(
        root_der: CertificateDer<'static>,
        key: KeyPair,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<BuiltinCa, Error> {
        let bad = |why: String| Error::BadCert {
            path: cert_path.to_owned(),
            why,
        };
        let (_, x509) =
            x509_parser::parse_x509_certificate(&root_der).map_err(|e| bad(e.to_string()))?;
        if !x509.is_ca()
            || x509
                .key_usage()
                .ok()
                .flatten()
                .is_some_and(|ku| !ku.value.key_cert_sign())
        {
            return Err(Error::NotCa {
                path: cert_path.to_owned(),
            });
        }
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(Error::KeyMismatch {
                cert: cert_path.to_owned(),
                key: key_path.to_owned(),
            });
        }
        let root_not_after = unix_time(x509.validity().not_after.timestamp())
            .ok_or_else(|| bad("its notAfter is before 1970".to_owned()))?;
        if root_not_after <= SystemTime::now() {
            return Err(Error::Expired {
                path: cert_path.to_owned(),
                when: manager::rfc3339(root_not_after),
            });
        }
        let root_pem = super::pem_encode("CERTIFICATE", &root_der);
        let issuer = Issuer::from_ca_cert_der(&root_der, key).map_err(|e| bad(e.to_string()))?;
        Ok(BuiltinCa {
            root_der,
            root_pem,
            issuer,
            root_not_after,
            trust_domain: None,
            describe: String::new(),
        })
    }

    /// Checks the CSR and signs a leaf for `identity`. Returns `[leaf]`.
    fn sign_csr(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, ca::Error> {
        let wanted = identity.to_string();
        if let Some(td) = &self.trust_domain
            && identity.trust_domain() != td
        {
            return Err(ca::Error::Rejected(format!(
                "{wanted} is outside this CA's trust domain {td:?}"
            )));
        }
        if ttl.is_zero() {
            return Err(ca::Error::Rejected(
                "the requested lifetime is zero".to_owned(),
            ));
        }
        // Parses and verifies the CSR's signature (proof of possession of the key).
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
            ca::Error::Rejected(format!(
                "the CSR is not a valid signed PKCS#10 request: {e}"
            ))
        })?;
        let uris: Vec<&str> = csr
            .params
            .subject_alt_names
            .iter()
            .filter_map(|san| match san {
                SanType::URI(u) => Some(u.as_str()),
                _ => None,
            })
            .collect();
        if uris != [wanted.as_str()] {
            return Err(ca::Error::Rejected(format!(
                "the CSR asks for URI SANs {uris:?}, but only [{wanted:?}] is allowed for this caller"
            )));
        }

        let now = SystemTime::now();
        if self.root_not_after <= now {
            return Err(ca::Error::Unavailable(format!(
                "the root certificate expired at {}: replace the built-in CA's root",
                manager::rfc3339(self.root_not_after)
            )));
        }
        let not_after = now
            .checked_add(ttl)
            .map_or(self.root_not_after, |t| t.min(self.root_not_after));

        // Only what the CA decides goes into the leaf; nothing else is copied from the CSR.
        let mut params = CertificateParams::default();
        // Empty subject as Istio's workload certificates (rcgen then marks the SAN critical).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(wanted.clone().try_into().map_err(|e| {
            ca::Error::Rejected(format!("{wanted:?} is not a valid URI SAN: {e}"))
        })?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - LEAF_BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(
            random_serial()
                .map_err(|e| ca::Error::Unavailable(format!("no serial number: {e}")))?,
        );
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|e| ca::Error::Unavailable(format!("signing failed: {e}")))?;
        Ok(vec![leaf.der().clone()])
    }
}

impl CaClient for BuiltinCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, ca::Error>> {
        // One ECDSA signature: cheap enough to do inline.
        Box::pin(async move { self.sign_csr(identity, csr_pem, ttl) })
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.root_cert()]
    }
}

/// A random 128-bit serial number from the crypto provider's CSPRNG.
fn random_serial() -> Result<SerialNumber, rcgen::Error> {
    let mut bytes = [0u8; 16];
    rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .map_err(|_| rcgen::Error::RingUnspecified)?;
    // Positive (top bit clear) and without a leading zero byte, so it encodes in exactly 16
    // bytes; 126 random bits remain.
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn exists(path: &Path) -> Result<bool, Error> {
    path.try_exists().map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes `data` to `path` (which must not exist yet) with `mode`, through a temporary file and a
/// rename, so a crash never leaves a truncated file.
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    // A leftover from an interrupted start.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(data).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

fn unix_time(secs: i64) -> Option<SystemTime> {
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?))
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt as _, sync::Arc};

    use rustls::pki_types::UnixTime;

    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub(crate) fn new(what: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "ambit-{what}-{}-{:016x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("valid identity")
    }

    fn verify(root: &CertificateDer<'_>, leaf: &CertificateDer<'_>) -> Result<(), webpki::Error> {
        let anchors = [webpki::anchor_from_trusted_cert(root)?.to_owned()];
        let ee = webpki::EndEntityCert::try_from(leaf)?;
        for usage in [
            webpki::KeyUsage::client_auth(),
            webpki::KeyUsage::server_auth(),
        ] {
            ee.verify_for_usage(
                webpki::ALL_VERIFICATION_ALGS,
                &anchors,
                &[],
                UnixTime::now(),
                usage,
                None,
                None,
            )?;
        }
        Ok(())
    }

    fn uri_sans(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parsable leaf");
        cert.subject_alternative_name()
            .expect("valid SAN extension")
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn creates_persists_and_reloads_the_root() {
        let dir = TempDir::new("ca");
        let ca_dir = dir.0.join("ca");
        let first = BuiltinCa::load_or_create(&ca_dir, "cluster.local").expect("create");
        let dir_mode = fs::metadata(&ca_dir).expect("dir").permissions().mode() & 0o777;
        assert_eq!(dir_mode, 0o700);
        let key_mode = fs::metadata(ca_dir.join(KEY_FILE))
            .expect("key")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(key_mode, 0o600);
        assert!(first.describe().contains(&ca_dir.display().to_string()));

        let second = BuiltinCa::load_or_create(&ca_dir, "cluster.local").expect("reload");
        assert_eq!(first.root_cert(), second.root_cert());
        assert_eq!(first.root_pem(), second.root_pem());

        // The root's shape.
        let root = first.root_cert();
        let (_, x509) = x509_parser::parse_x509_certificate(&root).expect("parsable root");
        assert!(x509.is_ca());
        let ku = x509.key_usage().expect("ku").expect("has ku").value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let subject = x509.subject().to_string();
        assert!(
            subject.contains("CN=Ambit root CA") && subject.contains("O=cluster.local"),
            "{subject}"
        );
        let life = x509.validity().not_after.timestamp() - x509.validity().not_before.timestamp();
        assert!(life >= 10 * 365 * 24 * 3600, "{life}");

        // The reloaded CA signs leaves that chain to the original root.
        let leaf = second
            .issue_for_test(&id("a"), Duration::from_secs(3600))
            .expect("issue");
        verify(&first.root_cert(), &leaf.chain[0]).expect("chains to the persisted root");
    }

    #[test]
    fn a_missing_half_is_reported_not_replaced() {
        let dir = TempDir::new("ca");
        BuiltinCa::load_or_create(&dir.0, "cluster.local").expect("create");
        fs::remove_file(dir.0.join(CERT_FILE)).expect("remove cert");
        let e = BuiltinCa::load_or_create(&dir.0, "cluster.local").expect_err("partial");
        assert!(matches!(e, Error::Partial { .. }), "{e}");
    }

    #[test]
    fn from_files_checks_key_and_cert_belong_together() {
        let dir = TempDir::new("ca");
        let (a, b) = (dir.0.join("a"), dir.0.join("b"));
        BuiltinCa::load_or_create(&a, "cluster.local").expect("a");
        BuiltinCa::load_or_create(&b, "cluster.local").expect("b");
        let ok = BuiltinCa::from_files(&a.join(CERT_FILE), &a.join(KEY_FILE)).expect("matching");
        let leaf = ok
            .issue_for_test(&id("x"), Duration::from_secs(60))
            .expect("issue");
        verify(&ok.root_cert(), &leaf.chain[0]).expect("chains");
        let e = BuiltinCa::from_files(&a.join(CERT_FILE), &b.join(KEY_FILE)).expect_err("mismatch");
        assert!(matches!(e, Error::KeyMismatch { .. }), "{e}");
        let e = BuiltinCa::from_files(&a.join(KEY_FILE), &a.join(KEY_FILE)).expect_err("no cert");
        assert!(matches!(e, Error::NoCert { .. }), "{e}");
    }

    #[tokio::test]
    async fn signs_a_csr_into_a_leaf_that_chains_to_the_root() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let me = id("sleep");
        let (key, csr) = manager::new_key_and_csr(&me).expect("csr");
        let ttl = Duration::from_secs(3600);
        let chain = ca.sign(&me, &csr, ttl).await.expect("signed");
        assert_eq!(chain.len(), 1, "the root is not part of the chain");
        verify(&ca.root_cert(), &chain[0]).expect("leaf chains to the root");
        assert_eq!(uri_sans(&chain[0]), [me.to_string()]);

        let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).expect("leaf");
        assert!(!leaf.is_ca());
        let ku = leaf.key_usage().expect("ku").expect("has ku").value;
        assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
        let eku = leaf
            .extended_key_usage()
            .expect("eku")
            .expect("has eku")
            .value;
        assert!(eku.server_auth && eku.client_auth);
        assert_eq!(leaf.tbs_certificate.raw_serial().len(), 16);
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs() as i64;
        let (nb, na) = (
            leaf.validity().not_before.timestamp(),
            leaf.validity().not_after.timestamp(),
        );
        assert!(
            (now - 62..=now - 58).contains(&nb),
            "not_before {nb} vs now {now}"
        );
        assert!(
            (now + 3598..=now + 3602).contains(&na),
            "not_after {na} vs now {now}"
        );

        let cert = manager::workload_cert(&me, &key, chain).expect("usable");
        assert_eq!(cert.identity, me);

        // Two leaves never share a serial.
        let other = ca.issue_for_test(&me, ttl).expect("second");
        assert_ne!(other.serial, cert.serial);
    }

    #[tokio::test]
    async fn refuses_a_csr_for_another_identity() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let (_, csr) = manager::new_key_and_csr(&id("other")).expect("csr");
        let e = ca
            .sign(&id("me"), &csr, Duration::from_secs(60))
            .await
            .expect_err("must refuse");
        let msg = e.to_string();
        assert!(matches!(e, ca::Error::Rejected(_)), "{msg}");
        assert!(msg.contains("sa/other") && msg.contains("sa/me"), "{msg}");

        let foreign = Identity::new("other.domain", "default", "me").expect("id");
        let (_, csr) = manager::new_key_and_csr(&foreign).expect("csr");
        let e = ca
            .sign(&foreign, &csr, Duration::from_secs(60))
            .await
            .expect_err("other trust domain");
        assert!(e.to_string().contains("trust domain"), "{e}");

        let e = ca
            .sign(&id("me"), "not a csr", Duration::from_secs(60))
            .await
            .expect_err("garbage");
        assert!(matches!(e, ca::Error::Rejected(_)), "{e}");
    }

    #[test]
    fn leaves_of_an_unrelated_ca_do_not_chain() {
        let (a, b) = (
            Arc::new(BuiltinCa::generate("cluster.local").expect("a")),
            BuiltinCa::generate("cluster.local").expect("b"),
        );
        let leaf = b
            .issue_for_test(&id("x"), Duration::from_secs(60))
            .expect("issue");
        assert!(verify(&a.root_cert(), &leaf.chain[0]).is_err());
    }

    #[test]
    fn leaf_lifetime_never_exceeds_the_root() {
        let mut ca = BuiltinCa::generate("cluster.local").expect("ca");
        ca.root_not_after = SystemTime::now() + Duration::from_secs(100);
        let leaf = ca
            .issue_for_test(&id("x"), Duration::from_secs(3600))
            .expect("issue");
        assert!(leaf.not_after <= ca.root_not_after);
    }

    #[test]
    fn pem_encoding_matches_rcgen() {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = CertificateParams::default()
            .self_signed(&key)
            .expect("cert");
        assert_eq!(
            super::super::pem_encode("CERTIFICATE", cert.der()),
            cert.pem()
        );
        for (data, b64) in [
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            assert_eq!(
                super::super::pem_encode("X", data.as_bytes()),
                format!("-----BEGIN X-----\n{b64}\n-----END X-----\n")
            );
        }
    }
}
