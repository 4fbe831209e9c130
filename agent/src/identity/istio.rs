//! The Istio CA back end: asks istiod (or anything serving Istio's `IstioCertificateService`,
//! such as [`crate::ca_server`]) to sign workload CSRs, the way Istio's node agent (ztunnel)
//! does for the workloads on its node.
//!
//! ```text
//! CertManager ──sign(identity, CSR)──> IstioCa ──gRPC over TLS──> istiod :15012
//!                                        authorization: Bearer <token file, re-read each time>
//!                                        clusterid: <cluster id>
//!                                        metadata.ImpersonatedIdentity = spiffe://...
//! ```
//!
//! The connection is made lazily, on the first request, and remade after a failure, so a CA that
//! is down when the agent starts only delays certificates.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf, sync::OnceLock, time::Duration};

use ambit_proto::{
    istio::v1::auth::{
        IstioCertificateRequest, istio_certificate_service_client::IstioCertificateServiceClient,
    },
    prost_types::{Struct, Value, value::Kind},
};
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tonic::{
    Code, Status,
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::{Channel, Endpoint},
};
use tracing::{Instrument, debug, debug_span};

use super::{
    Identity,
    ca::{self, BoxFuture, CaClient},
};

/// The `metadata` key under which a node agent names the workload identity it asks for.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// gRPC metadata (HTTP/2 header) carrying the bearer token.
pub const AUTHORIZATION_HEADER: &str = "authorization";
/// gRPC metadata carrying the cluster id (Istio's agent sends `ClusterID`; headers are lowercase).
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// How long one certificate request may take, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Configuration errors, reported by [`IstioCa::new`]; nothing here needs the CA to be up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid cluster id {0:?}: it is sent as the clusterid header, so it must be visible ASCII"
    )]
    ClusterId(String),
    #[error(transparent)]
    Endpoint(#[from] crate::grpc::Error),
}

/// How to reach and authenticate to an Istio CA.
#[derive(Clone, Debug)]
pub struct IstioCaConfig {
    /// The CA's gRPC address, `https://<host>:<port>`, e.g.
    /// `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM root certificate(s) that the CA's TLS certificate must chain to (for istiod, the
    /// mesh root from the `istio-ca-root-cert` ConfigMap). Only these are trusted.
    pub root_cert_pem: Vec<u8>,
    /// File holding the bearer token sent as `authorization: Bearer <token>` (for istiod, a
    /// projected service-account token with audience `istio-ca`). Read again for every request,
    /// because the kubelet rotates it. `None`: no token is sent.
    pub token_path: Option<PathBuf>,
    /// Sent as the `clusterid` header when set (multi-cluster istiod uses it to pick the cluster
    /// whose API server checks the token).
    pub cluster_id: Option<String>,
    /// The name the CA's TLS certificate must carry; default: the host of `address`. Set it when
    /// connecting by IP or through an alias (istiod's certificate is for
    /// `istiod.istio-system.svc`).
    pub server_name: Option<String>,
}

/// An Istio CA client; implements [`CaClient`].
pub struct IstioCa {
    address: String,
    endpoint: Endpoint,
    /// Made on first use: building a channel spawns its worker on the current tokio runtime, and
    /// `new` may be called outside one.
    channel: OnceLock<Channel>,
    token_path: Option<PathBuf>,
    cluster_id: Option<AsciiMetadataValue>,
}

impl IstioCa {
    /// Validates the configuration. Does not connect: the CA may be down now and up later.
    pub fn new(cfg: IstioCaConfig) -> Result<IstioCa, Error> {
        let address = cfg.address;
        let endpoint =
            crate::grpc::tls_endpoint("CA", &address, &cfg.root_cert_pem, cfg.server_name)?;

        let cluster_id = cfg
            .cluster_id
            .map(|id| AsciiMetadataValue::try_from(id.as_str()).map_err(|_| Error::ClusterId(id)))
            .transpose()?;

        Ok(IstioCa {
            address,
            endpoint,
            channel: OnceLock::new(),
            token_path: cfg.token_path,
            cluster_id,
        })
    }

    fn client(&self) -> IstioCertificateServiceClient<Channel> {
        let channel = self
            .channel
            .get_or_init(|| self.endpoint.connect_lazy())
            .clone();
        IstioCertificateServiceClient::new(channel)
    }

    /// The `authorization` value, read from the token file now (tokens rotate).
    async fn authorization(&self) -> Result<Option<AsciiMetadataValue>, ca::Error> {
        let Some(path) = &self.token_path else {
            return Ok(None);
        };
        // A missing or empty token is usually transient (the projected token is not mounted
        // yet), so it is reported as the CA being unusable for now, and retried.
        let token = tokio::fs::read_to_string(path).await.map_err(|e| {
            ca::Error::Unavailable(format!(
                "cannot read the CA token {}: {e}; is the service-account token mounted?",
                path.display()
            ))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(ca::Error::Unavailable(format!(
                "the CA token file {} is empty",
                path.display()
            )));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            ca::Error::Unavailable(format!(
                "the CA token in {} has characters a header cannot carry",
                path.display()
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    async fn request(
        &self,
        identity: &Identity,
        csr_pem: &str,
        ttl: Duration,
    ) -> Result<Vec<CertificateDer<'static>>, ca::Error> {
        let metadata = Struct {
            fields: BTreeMap::from([(
                IMPERSONATED_IDENTITY.to_owned(),
                Value {
                    kind: Some(Kind::StringValue(identity.to_string())),
                },
            )]),
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem.to_owned(),
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        req.set_timeout(REQUEST_TIMEOUT);
        if let Some(auth) = self.authorization().await? {
            req.metadata_mut().insert(AUTHORIZATION_HEADER, auth);
        }
        if let Some(id) = &self.cluster_id {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, id.clone());
        }

        let mut client = self.client();
        let resp = match tokio::time::timeout(REQUEST_TIMEOUT, client.create_certificate(req)).await
        {
            Err(_) => {
                return Err(ca::Error::Unavailable(format!(
                    "{} did not answer within {}s",
                    self.address,
                    REQUEST_TIMEOUT.as_secs()
                )));
            }
            Ok(Err(status)) => return Err(self.status_error(&status)),
            Ok(Ok(resp)) => resp.into_inner(),
        };
        let chain = parse_chain(identity, &resp.cert_chain)?;
        debug!(certs = chain.len(), "CA signed the certificate");
        Ok(chain)
    }

    fn status_error(&self, status: &Status) -> ca::Error {
        let msg = status_message(status);
        let address = &self.address;
        match status.code() {
            Code::Unauthenticated => ca::Error::Rejected(if self.token_path.is_some() {
                format!(
                    "{address}: not authenticated: {msg}; is the token valid for the CA (audience, expiry)?"
                )
            } else {
                format!("{address}: not authenticated: {msg}; no token is configured")
            }),
            Code::PermissionDenied => ca::Error::Rejected(format!(
                "{address}: permission denied: {msg}; the CA does not let this agent ask for this identity"
            )),
            Code::InvalidArgument | Code::FailedPrecondition => {
                ca::Error::Rejected(format!("{address}: invalid request: {msg}"))
            }
            Code::Unimplemented => ca::Error::Rejected(format!(
                "{address} does not serve IstioCertificateService ({msg}); is it istiod's port 15012?"
            )),
            // Unavailable (connection failures), DeadlineExceeded, Cancelled, ResourceExhausted,
            // Internal, Unknown...: the CA may do better on a later try.
            code => ca::Error::Unavailable(format!("{address}: {code:?}: {msg}")),
        }
    }
}

impl CaClient for IstioCa {
    fn sign<'a>(
        &'a self,
        identity: &'a Identity,
        csr_pem: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<Vec<CertificateDer<'static>>, ca::Error>> {
        let span = debug_span!("istio_ca", identity = %identity, ca = %self.address);
        Box::pin(self.request(identity, csr_pem, ttl).instrument(span))
    }

    fn describe(&self) -> String {
        format!("Istio CA ({})", self.address)
    }
}

/// The status message with the chain of causes, which is where a connection failure says what
/// went wrong ("tcp connect error: Connection refused", "invalid peer certificate: ...").
fn status_message(status: &Status) -> String {
    let mut msg = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let s = e.to_string();
        if !msg.contains(&s) {
            let _ = write!(msg, ": {s}");
        }
        source = e.source();
    }
    msg
}

/// Decodes the PEM chain of a response into DER, leaf first, and checks the leaf is for
/// `identity`. Trailing self-signed certificates (the roots istiod appends, possibly several in
/// one entry) are dropped: the result is leaf then intermediates, and trust comes from the
/// configured roots, not from the CA's answer.
fn parse_chain(
    identity: &Identity,
    entries: &[String],
) -> Result<Vec<CertificateDer<'static>>, ca::Error> {
    let mut chain = Vec::new();
    for entry in entries {
        for cert in CertificateDer::pem_slice_iter(entry.as_bytes()) {
            chain.push(cert.map_err(|e| {
                ca::Error::BadResponse(format!("certificate chain is not valid PEM: {e}"))
            })?);
        }
    }
    let Some(leaf) = chain.first() else {
        return Err(ca::Error::BadResponse(
            "the certificate chain is empty".to_owned(),
        ));
    };
    let want = identity.to_string();
    let uris = uri_sans(leaf)?;
    if !uris.contains(&want) {
        return Err(ca::Error::BadResponse(format!(
            "the certificate is for {uris:?}, not {want}"
        )));
    }
    while chain.len() > 1 && chain.last().is_some_and(is_self_signed) {
        chain.pop();
    }
    Ok(chain)
}

fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, ca::Error> {
    use x509_parser::extensions::GeneralName;

    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| ca::Error::BadResponse(format!("the leaf certificate does not parse: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| ca::Error::BadResponse(format!("the leaf's SAN extension is invalid: {e}")))?;
    Ok(san
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref())
        .is_ok_and(|(_, c)| c.tbs_certificate.subject.as_raw() == c.tbs_certificate.issuer.as_raw())
}

#[cfg(test)]
mod tests {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType,
        string::Ia5String,
    };

    use super::*;

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("valid identity")
    }

    /// A root and a leaf for `uri` signed by it, as PEM.
    fn root_and_leaf(uri: &str) -> (String, String) {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root =
            CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("key")).expect("root");
        let mut leaf = CertificateParams::new(Vec::<String>::new()).expect("params");
        leaf.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri).expect("uri"))];
        let leaf = leaf
            .signed_by(&KeyPair::generate().expect("key"), &*root)
            .expect("leaf");
        (root.pem(), leaf.pem())
    }

    #[test]
    fn parses_a_chain_and_drops_the_roots() {
        let me = id("sleep");
        let (root, leaf) = root_and_leaf(&me.to_string());
        let (other_root, _) = root_and_leaf(&me.to_string());
        // istiod's shape during root rotation: the last entry holds two roots.
        let chain = parse_chain(&me, &[leaf, format!("{root}{other_root}")]).expect("chain");
        assert_eq!(chain.len(), 1);
        assert_eq!(uri_sans(&chain[0]).expect("sans"), vec![me.to_string()]);
    }

    #[test]
    fn refuses_bad_chains() {
        let me = id("sleep");
        let (_, leaf) = root_and_leaf(&id("other").to_string());
        for (entries, want) in [
            (vec![], "empty"),
            (vec!["not pem".to_owned()], "empty"),
            (vec![leaf], "not spiffe://cluster.local/ns/default/sa/sleep"),
        ] {
            let e = parse_chain(&me, &entries).expect_err(want).to_string();
            assert!(e.contains(want), "{e}");
        }
    }

    #[test]
    fn validates_the_config() {
        let (root, _) = root_and_leaf("spiffe://td/ns/a/sa/b");
        let cfg = |address: &str, root: &[u8]| IstioCaConfig {
            address: address.to_owned(),
            root_cert_pem: root.to_vec(),
            token_path: None,
            cluster_id: None,
            server_name: None,
        };
        let ok = IstioCa::new(cfg(
            "https://istiod.istio-system.svc:15012",
            root.as_bytes(),
        ))
        .expect("valid config");
        assert_eq!(
            ok.describe(),
            "Istio CA (https://istiod.istio-system.svc:15012)"
        );
        IstioCa::new(cfg("https://[::1]:15012", root.as_bytes())).expect("IPv6 literal");
        for (address, root, want) in [
            ("http://istiod:15012", root.as_bytes(), "https://"),
            ("istiod:15012", root.as_bytes(), "https://"),
            ("https://istiod:15012", b"".as_slice(), "no PEM"),
            (
                "https://istiod:15012",
                b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".as_slice(),
                "root certificate",
            ),
        ] {
            let e = IstioCa::new(cfg(address, root))
                .err()
                .map(|e| e.to_string());
            assert!(
                e.as_deref().is_some_and(|e| e.contains(want)),
                "{address}: {e:?}"
            );
        }
        let mut bad_cluster = cfg("https://istiod:15012", root.as_bytes());
        bad_cluster.cluster_id = Some("a\nb".to_owned());
        assert!(matches!(
            IstioCa::new(bad_cluster),
            Err(Error::ClusterId(_))
        ));
    }
}
