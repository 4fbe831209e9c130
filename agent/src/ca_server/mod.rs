//! A certificate authority server speaking Istio's `IstioCertificateService`, backed by any
//! [`CaClient`] (normally the built-in CA). A standalone mesh runs it so agents on other nodes
//! get certificates with [`crate::identity::istio::IstioCa`] exactly as they would from istiod; tests use
//! it to exercise that client.
//!
//! ```text
//! IstioCa ──TLS (h2)──> serve(): which node's token? ──> identity = ImpersonatedIdentity | CSR URI SAN
//!          ──> every CSR SAN == identity? ──> a workload of that node? ──> lifetime capped
//!          ──> ca.sign() ──> PEM chain
//! ```
//!
//! Who may ask for what is [`access`]'s: per-node tokens, the node's workloads'
//! identities only, a maximum lifetime; without tokens only on loopback.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use ambit_proto::{
    istio::v1::auth::{
        IstioCertificateRequest, IstioCertificateResponse, Roots,
        istio_certificate_service_server::{
            IstioCertificateService, IstioCertificateServiceServer,
        },
    },
    prost_types::value::Kind,
};
use rustls::pki_types::{CertificateDer, CertificateSigningRequestDer, pem::PemObject};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Sleep,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
// tonic's server takes a `Stream` of connections; tonic re-exports the trait for generated code.
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, debug_span, info, warn};

pub mod access;

use self::access::Callers;
use crate::identity::{
    Identity,
    ca::{self, CaClient},
    istio::IMPERSONATED_IDENTITY,
};
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause after an accept error such as EMFILE, instead of spinning.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the CA server stopped: {0}")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves `IstioCertificateService` on `listener` (already bound) over TLS with `tls` (the server
/// certificate and key; `h2` is added to its ALPN protocols if missing, as gRPC needs HTTP/2),
/// signing with `ca` for the callers `callers` allows. The identity signed for is
/// `ImpersonatedIdentity` from the request metadata, else the CSR's URI SAN; the request is
/// refused (PermissionDenied) unless every SAN of the CSR is that identity and the caller's node
/// has a workload with it. Runs until `shutdown` resolves, then stops accepting and waits for
/// open connections to finish.
pub async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    ca: Arc<dyn CaClient>,
    callers: Arc<Callers>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), Error> {
    let mut tls = (*tls).clone();
    if !tls.alpn_protocols.iter().any(|p| p == b"h2") {
        tls.alpn_protocols.push(b"h2".to_vec());
    }
    let local = listener.local_addr().ok();
    info!(addr = ?local, ca = %ca.describe(), authenticated = !callers.is_open(), "CA server listening");
    let incoming = TlsIncoming {
        listener,
        acceptor: TlsAcceptor::from(Arc::new(tls)),
        handshakes: JoinSet::new(),
        pause: None,
    };
    let signer = Signer { ca, callers };
    tonic::transport::Server::builder()
        .serve_with_incoming_shutdown(
            IstioCertificateServiceServer::new(signer),
            incoming,
            shutdown,
        )
        .await
        .map_err(Error::Serve)?;
    info!(addr = ?local, "CA server stopped");
    Ok(())
}

struct Signer {
    ca: Arc<dyn CaClient>,
    callers: Arc<Callers>,
}

#[tonic::async_trait]
impl IstioCertificateService for Signer {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let span = debug_span!("ca_request", peer = ?peer);
        self.create(peer, request).instrument(span).await
    }
}

impl Signer {
    async fn create(
        &self,
        peer: Option<SocketAddr>,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let result = self.sign(request).await;
        match &result {
            Ok(s) => info!(
                peer = ?peer,
                node = %s.node,
                identity = %s.identity,
                lifetime_s = s.lifetime.as_secs(),
                capped = s.capped,
                "signed a workload certificate"
            ),
            Err(status) => warn!(
                peer = ?peer,
                code = ?status.code(),
                reason = status.message(),
                "refused a certificate request"
            ),
        }
        let mut chain = result?.chain;
        // Like istiod: the chain ends with the root, and the roots are also sent on their own.
        let roots = self.ca.roots();
        for root in &roots {
            if chain.last() != Some(root) {
                chain.push(root.clone());
            }
        }
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain
                .iter()
                .map(|c| crate::identity::pem_encode("CERTIFICATE", c))
                .collect(),
            root_cert: (!roots.is_empty()).then(|| Roots {
                ca_cert: roots
                    .iter()
                    .map(|c| crate::identity::pem_encode("CERTIFICATE", c))
                    .collect(),
            }),
        }))
    }

    async fn sign(&self, request: Request<IstioCertificateRequest>) -> Result<Signed, Status> {
        let caller = self.callers.authenticate(request.metadata())?;
        let req = request.into_inner();
        let impersonated = impersonated_identity(&req)?;
        let sans = csr_sans(&req.csr)?;
        let identity = match impersonated {
            Some(id) => id,
            None => match sans.as_slice() {
                [San::Uri(uri)] => uri.parse::<Identity>().map_err(|e| {
                    Status::invalid_argument(format!("the CSR's URI SAN is not an identity: {e}"))
                })?,
                _ => {
                    return Err(Status::invalid_argument(format!(
                        "no {IMPERSONATED_IDENTITY} in the metadata and the CSR does not have \
                         exactly one SAN, a SPIFFE URI (it has {sans:?})"
                    )));
                }
            },
        };
        let want = identity.to_string();
        if sans.is_empty() || sans.iter().any(|s| *s != San::Uri(want.clone())) {
            return Err(Status::permission_denied(format!(
                "the CSR asks for {sans:?}, but the request is for {want} only"
            )));
        }
        self.callers.authorize(caller, &identity)?;
        let requested = u64::try_from(req.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let (ttl, capped) = self.callers.lifetime(requested);
        let chain = self
            .ca
            .sign(&identity, &req.csr, ttl)
            .await
            .map_err(|e| match e {
                ca::Error::Unavailable(m) => Status::unavailable(m),
                ca::Error::Rejected(m) => Status::permission_denied(m),
                ca::Error::Csr(m) => Status::invalid_argument(m),
                ca::Error::BadResponse(m) => Status::internal(m),
            })?;
        Ok(Signed {
            node: caller.name().to_owned(),
            identity,
            lifetime: ttl,
            capped,
            chain,
        })
    }
}

/// A signed certificate, and what the log says of it.
struct Signed {
    node: String,
    identity: Identity,
    lifetime: Duration,
    /// The request asked for longer than the maximum.
    capped: bool,
    chain: Vec<CertificateDer<'static>>,
}

fn impersonated_identity(req: &IstioCertificateRequest) -> Result<Option<Identity>, Status> {
    let Some(value) = req
        .metadata
        .as_ref()
        .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY))
    else {
        return Ok(None);
    };
    match &value.kind {
        Some(Kind::StringValue(s)) => s.parse().map(Some).map_err(|e| {
            Status::invalid_argument(format!("{IMPERSONATED_IDENTITY} is not an identity: {e}"))
        }),
        other => Err(Status::invalid_argument(format!(
            "{IMPERSONATED_IDENTITY} must be a string, not {other:?}"
        ))),
    }
}

/// A subject alternative name of a CSR, as far as authorization cares.
#[derive(Debug, PartialEq, Eq)]
enum San {
    Uri(String),
    /// Anything else (DNS name, IP, e-mail...), which a workload certificate never needs.
    Other(String),
}

fn csr_sans(pem: &str) -> Result<Vec<San>, Status> {
    use x509_parser::{
        certification_request::X509CertificationRequest, extensions::ParsedExtension,
        prelude::FromDer,
    };

    let bad = |why: String| Status::invalid_argument(format!("the CSR is not usable: {why}"));
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| bad(format!("no PEM CERTIFICATE REQUEST: {e}")))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| bad(format!("it does not parse: {e}")))?;
    let mut sans = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            for name in &san.general_names {
                sans.push(match name {
                    x509_parser::extensions::GeneralName::URI(u) => San::Uri((*u).to_owned()),
                    other => San::Other(other.to_string()),
                });
            }
        }
    }
    Ok(sans)
}

/// Accepted connections, TLS handshakes done concurrently (a slow client does not hold up the
/// others). The handshake tasks belong to the `JoinSet`, so dropping the stream (tonic does on
/// shutdown) closes the listener and aborts unfinished handshakes.
struct TlsIncoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: JoinSet<Option<TlsStream<TcpStream>>>,
    pause: Option<Pin<Box<Sleep>>>,
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, io::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(pause) = &mut this.pause
            && pause.as_mut().poll(cx).is_ready()
        {
            this.pause = None;
        }
        while this.pause.is_none() {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, peer))) => {
                    let acceptor = this.acceptor.clone();
                    let handshake = async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => Some(tls),
                            Ok(Err(e)) => {
                                debug!(error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                None
                            }
                        }
                    };
                    this.handshakes
                        .spawn(handshake.instrument(debug_span!("ca_handshake", peer = %peer)));
                }
                Poll::Ready(Err(e)) => {
                    warn!(error = %e, "cannot accept a connection to the CA server");
                    let mut pause = Box::pin(tokio::time::sleep(ACCEPT_ERROR_PAUSE));
                    if pause.as_mut().poll(cx).is_pending() {
                        this.pause = Some(pause);
                    }
                }
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(tls)))) => return Poll::Ready(Some(Ok(tls))),
                Poll::Ready(Some(Ok(None))) => {}
                Poll::Ready(Some(Err(e))) => warn!(error = %e, "TLS handshake task failed"),
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{path::PathBuf, time::Instant};

    use rcgen::{
        BasicConstraints, CertificateParams, CertificateSigningRequestParams, CertifiedIssuer,
        IsCa, KeyPair, SanType, string::Ia5String,
    };
    use rustls::pki_types::PrivateKeyDer;
    use tokio::{sync::oneshot, task::JoinHandle};

    use super::access::NodeCaller;
    use super::*;
    use crate::identity::istio::{IstioCa, IstioCaConfig};

    /// A CA for tests: signs any CSR with an rcgen root and returns leaf and root (as istiod
    /// does); remembers the lifetime it was asked for.
    struct TestCa {
        root: CertifiedIssuer<'static, KeyPair>,
        asked: std::sync::Mutex<Option<Duration>>,
    }

    impl TestCa {
        fn new() -> TestCa {
            let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let key = KeyPair::generate().expect("key");
            TestCa {
                root: CertifiedIssuer::self_signed(params, key).expect("root"),
                asked: std::sync::Mutex::new(None),
            }
        }
    }

    impl CaClient for TestCa {
        fn sign<'a>(
            &'a self,
            _identity: &'a Identity,
            csr_pem: &'a str,
            ttl: Duration,
        ) -> ca::BoxFuture<'a, Result<Vec<CertificateDer<'static>>, ca::Error>> {
            *self.asked.lock().expect("lock") = Some(ttl);
            Box::pin(async move {
                let csr = CertificateSigningRequestParams::from_pem(csr_pem)
                    .map_err(|e| ca::Error::Csr(e.to_string()))?;
                let leaf = csr
                    .signed_by(&*self.root)
                    .map_err(|e| ca::Error::Csr(e.to_string()))?;
                Ok(vec![leaf.der().clone(), self.root.der().clone()])
            })
        }

        fn describe(&self) -> String {
            "test CA".to_owned()
        }
    }

    struct Server {
        addr: SocketAddr,
        /// PEM of the server's self-signed TLS certificate (the client's root).
        tls_root: Vec<u8>,
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<Result<(), Error>>,
    }

    /// Callers: node-a (token file `token`) may get `sleep`'s identity; without a token file,
    /// anyone may get anything (a loopback server).
    fn callers(token: Option<&TokenFile>) -> Callers {
        match token {
            None => Callers::open(Duration::from_secs(24 * 3600)),
            Some(t) => Callers::nodes(
                vec![NodeCaller::new(
                    "node-a".into(),
                    t.0.clone(),
                    None,
                    vec![id("sleep")],
                )],
                Duration::from_secs(24 * 3600),
            ),
        }
    }

    impl Server {
        async fn start(callers: Callers) -> Server {
            Server::start_with(Arc::new(TestCa::new()), callers).await
        }

        async fn start_with(ca: Arc<dyn CaClient>, callers: Callers) -> Server {
            Server::start_named(ca, callers, &["127.0.0.1"]).await
        }

        /// Serving a certificate for `names` only.
        async fn start_named(ca: Arc<dyn CaClient>, callers: Callers, names: &[&str]) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = listener.local_addr().expect("local addr");
            let names = names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>();
            let cert = rcgen::generate_simple_self_signed(names).expect("server cert");
            let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.cert.der().clone()],
                PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into()),
            )
            .expect("server config");
            let (stop, stopped) = oneshot::channel();
            let task = tokio::spawn(serve(
                listener,
                Arc::new(tls),
                ca,
                Arc::new(callers),
                async {
                    let _ = stopped.await;
                },
            ));
            Server {
                addr,
                tls_root: cert.cert.pem().into_bytes(),
                stop: Some(stop),
                task,
            }
        }

        fn client(&self, token_path: Option<PathBuf>) -> IstioCa {
            IstioCa::new(IstioCaConfig {
                address: format!("https://{}", self.addr),
                root_cert_pem: self.tls_root.clone(),
                token_path,
                cluster_id: Some("Kubernetes".to_owned()),
                server_name: None,
            })
            .expect("client config")
        }

        async fn stop(mut self) {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("server stops on shutdown")
                .expect("server task")
                .expect("server result");
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("valid identity")
    }

    fn csr_for(uri: &str) -> String {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(uri).expect("uri"))];
        params
            .serialize_request(&KeyPair::generate().expect("key"))
            .expect("csr")
            .pem()
            .expect("csr pem")
    }

    fn temp_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "ambit-ca-server-test-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// A token file in a fresh temporary directory, removed on drop.
    struct TokenFile(PathBuf);

    impl TokenFile {
        fn new(token: &str) -> TokenFile {
            let f = TokenFile(temp_dir().join("token"));
            f.write(token);
            f
        }

        fn write(&self, token: &str) {
            std::fs::write(&self.0, format!("{token}\n")).expect("write token");
        }
    }

    impl Drop for TokenFile {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    fn leaf_uris(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).expect("leaf parses");
        let san = cert
            .subject_alternative_name()
            .expect("SAN extension")
            .expect("has SANs");
        san.value
            .general_names
            .iter()
            .map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => (*u).to_owned(),
                other => other.to_string(),
            })
            .collect()
    }

    #[tokio::test]
    async fn signs_for_the_impersonated_identity() {
        let token = TokenFile::new("s3cret");
        let server = Server::start(callers(Some(&token))).await;
        let ca = server.client(Some(token.0.clone()));
        let me = id("sleep");
        let chain = ca
            .sign(&me, &csr_for(&me.to_string()), Duration::from_secs(3600))
            .await
            .expect("signed");
        // The server returns leaf + root; the client keeps the leaf (no intermediates here).
        assert_eq!(chain.len(), 1);
        assert_eq!(leaf_uris(&chain[0]), vec![me.to_string()]);
        // The channel is reused for a second request.
        ca.sign(&me, &csr_for(&me.to_string()), Duration::from_secs(3600))
            .await
            .expect("signed again");
        server.stop().await;
    }

    #[tokio::test]
    async fn serves_the_builtin_ca() {
        let dir = temp_dir();
        let builtin = crate::identity::builtin::BuiltinCa::load_or_create(&dir, "cluster.local")
            .expect("builtin CA");
        let root = builtin.root_cert();
        let token = TokenFile::new("s3cret");
        let server = Server::start_with(Arc::new(builtin), callers(Some(&token))).await;
        let me = id("sleep");
        let chain = server
            .client(Some(token.0.clone()))
            .sign(&me, &csr_for(&me.to_string()), Duration::from_secs(3600))
            .await
            .expect("signed");
        assert_eq!(leaf_uris(&chain[0]), vec![me.to_string()]);
        let (_, leaf) = x509_parser::parse_x509_certificate(chain[0].as_ref()).expect("leaf");
        let (_, root) = x509_parser::parse_x509_certificate(root.as_ref()).expect("root");
        assert_eq!(leaf.issuer().as_raw(), root.subject().as_raw());
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn wrong_or_missing_token_is_rejected_and_the_token_is_reread() {
        let node_token = TokenFile::new("s3cret");
        let server = Server::start(callers(Some(&node_token))).await;
        let me = id("sleep");
        let csr = csr_for(&me.to_string());
        let ttl = Duration::from_secs(3600);

        let e = server
            .client(None)
            .sign(&me, &csr, ttl)
            .await
            .expect_err("no token");
        assert!(
            matches!(&e, ca::Error::Rejected(m) if m.contains("no token is configured")),
            "{e}"
        );

        let token = TokenFile::new("wrong");
        let ca = server.client(Some(token.0.clone()));
        let e = ca.sign(&me, &csr, ttl).await.expect_err("wrong token");
        assert!(
            matches!(&e, ca::Error::Rejected(m) if m.contains("invalid token")),
            "{e}"
        );

        // The client's token is fixed: the next request reads the new one.
        token.write("s3cret");
        ca.sign(&me, &csr, ttl)
            .await
            .expect("signed with the right token");
        // The node's token rotates on the server's side too: read again when it changes.
        std::thread::sleep(Duration::from_millis(20));
        node_token.write("rotated");
        let e = ca.sign(&me, &csr, ttl).await.expect_err("the old token");
        assert!(matches!(&e, ca::Error::Rejected(_)), "{e}");
        token.write("rotated");
        ca.sign(&me, &csr, ttl)
            .await
            .expect("signed with the rotated token");

        std::fs::remove_file(&token.0).expect("remove token");
        let e = ca.sign(&me, &csr, ttl).await.expect_err("token file gone");
        assert!(
            matches!(&e, ca::Error::Unavailable(m) if m.contains("cannot read the CA token")),
            "{e}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn a_node_gets_certificates_only_for_its_own_workloads() {
        let token_a = TokenFile::new("token-of-node-a");
        let token_b = TokenFile::new("token-of-node-b");
        // node-a's workloads come from its agent config (an enrolled pod), node-b's from its
        // identities list.
        let dir = temp_dir();
        let config_a = dir.join("node-a.yaml");
        std::fs::write(
            &config_a,
            "node: node-a\ncgroup: /x\npods:\n- {namespace: default, name: sleep-0, \
             serviceAccount: sleep, ips: [10.1.0.2], netns: /run/netns/sleep, enrolled: true}\n",
        )
        .expect("write agent config");
        let nodes = vec![
            NodeCaller::new(
                "node-a".into(),
                token_a.0.clone(),
                Some(config_a),
                Vec::new(),
            ),
            NodeCaller::new(
                "node-b".into(),
                token_b.0.clone(),
                None,
                vec![id("httpbin")],
            ),
        ];
        let server = Server::start(Callers::nodes(nodes, Duration::from_secs(3600))).await;
        let ttl = Duration::from_secs(600);
        let (sleep, httpbin) = (id("sleep"), id("httpbin"));
        let a = server.client(Some(token_a.0.clone()));
        let b = server.client(Some(token_b.0.clone()));
        a.sign(&sleep, &csr_for(&sleep.to_string()), ttl)
            .await
            .expect("node-a's own workload");
        b.sign(&httpbin, &csr_for(&httpbin.to_string()), ttl)
            .await
            .expect("node-b's own workload");
        let e = a
            .sign(&httpbin, &csr_for(&httpbin.to_string()), ttl)
            .await
            .expect_err("node-a asks for node-b's workload");
        assert!(
            matches!(&e, ca::Error::Rejected(m) if m.contains("node node-a may not obtain a certificate for spiffe://cluster.local/ns/default/sa/httpbin")),
            "{e}"
        );
        let e = b
            .sign(&sleep, &csr_for(&sleep.to_string()), ttl)
            .await
            .expect_err("and the other way");
        assert!(
            matches!(&e, ca::Error::Rejected(m) if m.contains("node node-b")),
            "{e}"
        );
        let e = server
            .client(None)
            .sign(&sleep, &csr_for(&sleep.to_string()), ttl)
            .await
            .expect_err("no credential");
        assert!(matches!(&e, ca::Error::Rejected(_)), "{e}");
        server.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_lifetime_above_the_maximum_is_cut_to_it() {
        let test_ca = Arc::new(TestCa::new());
        let max = Duration::from_secs(24 * 3600);
        let server = Server::start_with(test_ca.clone(), Callers::open(max)).await;
        let me = id("sleep");
        let ten_years = Duration::from_secs(10 * 365 * 24 * 3600);
        server
            .client(None)
            .sign(&me, &csr_for(&me.to_string()), ten_years)
            .await
            .expect("signed");
        assert_eq!(*test_ca.asked.lock().expect("lock"), Some(max));
        server
            .client(None)
            .sign(&me, &csr_for(&me.to_string()), Duration::from_secs(600))
            .await
            .expect("signed");
        assert_eq!(
            *test_ca.asked.lock().expect("lock"),
            Some(Duration::from_secs(600)),
            "shorter ones as asked"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn csr_for_another_identity_is_rejected() {
        let server = Server::start(callers(None)).await;
        let ca = server.client(None);
        let csr = csr_for(&id("other").to_string());
        let e = ca
            .sign(&id("sleep"), &csr, Duration::from_secs(3600))
            .await
            .expect_err("SAN mismatch");
        assert!(
            matches!(&e, ca::Error::Rejected(m) if m.contains("permission denied")),
            "{e}"
        );
        server.stop().await;
    }

    #[tokio::test]
    async fn ca_down_is_unavailable_quickly_and_recovers() {
        // A port that was just free: nothing listens on it.
        let reserved = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = reserved.local_addr().expect("addr");
        drop(reserved);
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let ca = IstioCa::new(IstioCaConfig {
            address: format!("https://{addr}"),
            root_cert_pem: cert.cert.pem().into_bytes(),
            token_path: None,
            cluster_id: None,
            server_name: None,
        })
        .expect("lazy: the CA being down is not a config error");
        let me = id("sleep");
        for _ in 0..2 {
            let start = Instant::now();
            let e = ca
                .sign(&me, &csr_for(&me.to_string()), Duration::from_secs(3600))
                .await
                .expect_err("nothing listening");
            assert!(
                start.elapsed() < Duration::from_secs(1),
                "took {:?}",
                start.elapsed()
            );
            assert!(
                matches!(&e, ca::Error::Unavailable(m) if m.contains("refused")),
                "{e}"
            );
        }
    }

    #[tokio::test]
    async fn untrusted_server_certificate_is_unavailable() {
        let server = Server::start(callers(None)).await;
        let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        let ca = IstioCa::new(IstioCaConfig {
            address: format!("https://{}", server.addr),
            root_cert_pem: other.cert.pem().into_bytes(),
            token_path: None,
            cluster_id: None,
            server_name: None,
        })
        .expect("config");
        let me = id("sleep");
        let e = ca
            .sign(&me, &csr_for(&me.to_string()), Duration::from_secs(3600))
            .await
            .expect_err("untrusted");
        assert!(
            matches!(&e, ca::Error::Unavailable(m) if m.contains("certificate")),
            "{e}"
        );
        server.stop().await;
    }

    /// `ca.istio.serverName`: a CA reached by IP whose certificate names it only by DNS name
    /// (istiod's) is verified against that name, and refused when the name differs.
    #[tokio::test]
    async fn a_ca_reached_by_ip_is_verified_by_its_server_name() {
        let server =
            Server::start_named(Arc::new(TestCa::new()), callers(None), &["istiod.example"]).await;
        let client = |server_name: Option<&str>| {
            IstioCa::new(IstioCaConfig {
                address: format!("https://{}", server.addr),
                root_cert_pem: server.tls_root.clone(),
                token_path: None,
                cluster_id: None,
                server_name: server_name.map(str::to_owned),
            })
            .expect("config")
        };
        let me = id("sleep");
        let csr = csr_for(&me.to_string());
        let hour = Duration::from_secs(3600);
        client(Some("istiod.example"))
            .sign(&me, &csr, hour)
            .await
            .expect("verified by its name");
        for name in [None, Some("other.example")] {
            let e = client(name)
                .sign(&me, &csr, hour)
                .await
                .expect_err("the certificate does not name it");
            assert!(
                matches!(&e, ca::Error::Unavailable(m) if m.contains("certificate")),
                "{name:?}: {e}"
            );
        }
        server.stop().await;
    }

    #[tokio::test]
    async fn without_metadata_the_csr_san_is_the_identity() {
        use ambit_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;
        use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

        let server = Server::start(callers(None)).await;
        let channel = Endpoint::from_shared(format!("https://{}", server.addr))
            .expect("endpoint")
            .tls_config(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&server.tls_root)),
            )
            .expect("tls")
            .connect()
            .await
            .expect("connect");
        let mut client = IstioCertificateServiceClient::new(channel);
        let me = id("sleep").to_string();
        let resp = client
            .create_certificate(IstioCertificateRequest {
                csr: csr_for(&me),
                validity_duration: 0,
                metadata: None,
            })
            .await
            .expect("signed")
            .into_inner();
        assert_eq!(resp.cert_chain.len(), 2, "leaf and root");
        let leaf = CertificateDer::from_pem_slice(resp.cert_chain[0].as_bytes()).expect("PEM");
        assert_eq!(leaf_uris(&leaf), vec![me]);

        let status = client
            .create_certificate(IstioCertificateRequest {
                csr: "garbage".to_owned(),
                validity_duration: 0,
                metadata: None,
            })
            .await
            .expect_err("not a CSR");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        drop(client);
        server.stop().await;
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0usize, 1, 2, 3, 4, 47, 48, 49, 100] {
            let der =
                CertificateDer::from((0..len).map(|i| (i * 37 % 256) as u8).collect::<Vec<u8>>());
            let pem = crate::identity::pem_encode("CERTIFICATE", &der);
            let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("decodes");
            assert_eq!(back.as_ref(), der.as_ref(), "len {len}");
            assert!(pem.lines().all(|l| l.len() <= 64));
        }
    }
}
