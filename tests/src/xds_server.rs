//! A small Delta ADS server for the tests, speaking the same wire protocol as istiod: it listens
//! inside a node's network namespace, sends every new stream the full current state of both
//! resource types, forwards later pushes to every open stream, and records what clients send
//! (subscriptions, ACKs, NACKs) so tests can check them.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ambit_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use anyhow::{Context, Result, anyhow};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

#[derive(Default)]
struct State {
    /// type url -> name -> resource
    resources: BTreeMap<String, BTreeMap<String, Resource>>,
    /// Every request a client sent, in order.
    requests: Vec<DeltaDiscoveryRequest>,
    /// When each of `requests` arrived.
    received_at: Vec<Instant>,
    nonce: u64,
}

/// One client's delta ADS stream as the server sees it: what it sent with the stream (its
/// metadata: the token), its requests, and where the server's responses go.
pub struct AdsStream {
    pub metadata: tonic::metadata::MetadataMap,
    pub requests: Streaming<DeltaDiscoveryRequest>,
    pub responses: mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
}

/// The control plane's wire side, and nothing else: each new delta stream is handed to the
/// owner of the receiver, which decides every response (scripted by a unit test, or the stateful
/// [`XdsServer`]). Shared by the agent's xDS client tests and the test bed.
struct HandOff {
    streams: mpsc::Sender<AdsStream>,
}

type DeltaStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;
type SotwStream = Pin<Box<dyn Stream<Item = Result<DiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for HandOff {
    type StreamAggregatedResourcesStream = SotwStream;
    type DeltaAggregatedResourcesStream = DeltaStream;

    async fn stream_aggregated_resources(
        &self,
        _: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<SotwStream>, Status> {
        Err(Status::unimplemented("delta only"))
    }

    async fn delta_aggregated_resources(
        &self,
        req: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<DeltaStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let metadata = req.metadata().clone();
        let _ = self
            .streams
            .send(AdsStream {
                metadata,
                requests: req.into_inner(),
                responses: tx,
            })
            .await;
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// Serves delta ADS over TLS (`cert_pem`/`key_pem`) on `listener` until `shutdown`; every new
/// stream arrives on the returned receiver. The future must be spawned (or awaited).
pub fn serve_ads<F>(
    listener: tokio::net::TcpListener,
    cert_pem: &str,
    key_pem: &str,
    shutdown: F,
) -> Result<(
    impl std::future::Future<Output = Result<(), tonic::transport::Error>> + Send + use<F>,
    mpsc::Receiver<AdsStream>,
)>
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, streams) = mpsc::channel(16);
    let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
    let server = tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))?
        .serve_with_incoming_shutdown(
            AggregatedDiscoveryServiceServer::new(HandOff { streams: tx }),
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        );
    Ok((server, streams))
}

/// The state every stream of an [`XdsServer`] shares.
#[derive(Clone)]
struct Ads {
    state: Arc<Mutex<State>>,
    pushes: broadcast::Sender<DeltaDiscoveryResponse>,
}

fn lock(m: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Ads {
    /// Serves one stream as istiod does: the full state of a type on its subscription, then
    /// every push, recording what the client sends.
    async fn serve(self, stream: AdsStream) {
        let AdsStream {
            mut requests,
            responses: tx,
            ..
        } = stream;
        let state = self.state;
        let mut pushes = self.pushes.subscribe();
        let mut subscribed = 0;
        loop {
            tokio::select! {
                msg = requests.next() => {
                    let Some(Ok(msg)) = msg else { return };
                    let is_subscription = msg.response_nonce.is_empty();
                    let type_url = msg.type_url.clone();
                    {
                        let mut s = lock(&state);
                        s.requests.push(msg);
                        s.received_at.push(Instant::now());
                    }
                    if is_subscription {
                        // Answer a subscription with everything of that type (full state).
                        let resp = {
                            let mut s = lock(&state);
                            s.nonce += 1;
                            DeltaDiscoveryResponse {
                                type_url: type_url.clone(),
                                nonce: format!("n{}", s.nonce),
                                resources: s.resources.get(&type_url).map(|m| m.values().cloned().collect()).unwrap_or_default(),
                                ..Default::default()
                            }
                        };
                        subscribed += 1;
                        if tx.send(Ok(resp)).await.is_err() { return; }
                    }
                }
                push = pushes.recv(), if subscribed >= 2 => {
                    let Ok(push) = push else { return };
                    if tx.send(Ok(push)).await.is_err() { return; }
                }
            }
        }
    }
}

/// The server (listening once [`XdsServer::serve_in`] ran). Dropping it stops it.
pub struct XdsServer {
    addr: SocketAddr,
    cert_pem: String,
    key_pem: String,
    ads: Ads,
    runtime: tokio::runtime::Runtime,
}

impl XdsServer {
    /// Starts a server on `addr` inside the network namespace at `netns` (e.g. a node's), with a
    /// self-signed certificate for `addr`'s IP.
    pub fn start_in_netns(netns: &Path, addr: SocketAddr) -> Result<XdsServer> {
        let server = XdsServer::unstarted(addr)?;
        server.serve_in(netns)?;
        Ok(server)
    }

    /// A server for `addr` that does not listen yet (a control plane that is down): its
    /// certificate is known, pushes are remembered for the streams it will serve.
    pub fn unstarted(addr: SocketAddr) -> Result<XdsServer> {
        let cert = rcgen::generate_simple_self_signed(vec![addr.ip().to_string()])
            .context("self-signed certificate")?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let (pushes, _) = broadcast::channel(64);
        Ok(XdsServer {
            addr,
            cert_pem: cert.cert.pem(),
            key_pem: cert.signing_key.serialize_pem(),
            ads: Ads {
                state: Arc::default(),
                pushes,
            },
            runtime,
        })
    }

    /// Starts listening on the server's address inside the network namespace at `netns`.
    pub fn serve_in(&self, netns: &Path) -> Result<()> {
        let netns = netns.to_owned();
        let addr = self.addr;
        // Sockets belong to the netns of the thread that creates them.
        let std_listener = std::thread::spawn(move || -> Result<std::net::TcpListener> {
            let f =
                std::fs::File::open(&netns).with_context(|| format!("open {}", netns.display()))?;
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
            let l = std::net::TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .join()
        .map_err(|_| anyhow!("listener thread panicked"))??;
        let ads = self.ads.clone();
        self.runtime.block_on(async {
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            let (server, mut streams) = serve_ads(
                listener,
                &self.cert_pem,
                &self.key_pem,
                std::future::pending::<()>(),
            )?;
            tokio::spawn(server);
            tokio::spawn(async move {
                while let Some(stream) = streams.recv().await {
                    tokio::spawn(ads.clone().serve(stream));
                }
            });
            anyhow::Ok(())
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's certificate (the client's root).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Pushes resources of `type_url` (and removals) to every open stream, remembering them
    /// for later streams. Returns the push's nonce.
    pub fn push(&self, type_url: &str, resources: Vec<Resource>, removed: Vec<String>) -> String {
        let resp = {
            let mut s = lock(&self.ads.state);
            let held = s.resources.entry(type_url.to_owned()).or_default();
            for name in &removed {
                held.remove(name);
            }
            for r in &resources {
                held.insert(r.name.clone(), r.clone());
            }
            s.nonce += 1;
            DeltaDiscoveryResponse {
                type_url: type_url.to_owned(),
                nonce: format!("n{}", s.nonce),
                resources,
                removed_resources: removed,
                ..Default::default()
            }
        };
        let nonce = resp.nonce.clone();
        let _ = self.ads.pushes.send(resp);
        nonce
    }

    /// Pushes a response whose resources are NOT remembered (for invalid pushes).
    pub fn push_once(&self, type_url: &str, resources: Vec<Resource>) -> String {
        let resp = {
            let mut s = lock(&self.ads.state);
            s.nonce += 1;
            DeltaDiscoveryResponse {
                type_url: type_url.to_owned(),
                nonce: format!("n{}", s.nonce),
                resources,
                ..Default::default()
            }
        };
        let nonce = resp.nonce.clone();
        let _ = self.ads.pushes.send(resp);
        nonce
    }

    /// Waits for the client's answer to `nonce` (an ACK, or a NACK with `error_detail`).
    pub fn wait_reply(&self, nonce: &str, timeout: Duration) -> Result<DeltaDiscoveryRequest> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(r) = lock(&self.ads.state)
                .requests
                .iter()
                .find(|r| r.response_nonce == nonce)
                .cloned()
            {
                return Ok(r);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("no reply to xDS push {nonce} within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`XdsServer::wait_reply`], also returning when the reply arrived (stamped on
    /// receipt, so it does not depend on how often this polls): for push-to-ACK timings.
    pub fn wait_reply_timed(
        &self,
        nonce: &str,
        timeout: Duration,
    ) -> Result<(DeltaDiscoveryRequest, Instant)> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let s = lock(&self.ads.state);
                if let Some(i) = s.requests.iter().position(|r| r.response_nonce == nonce) {
                    return Ok((s.requests[i].clone(), s.received_at[i]));
                }
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("no reply to xDS push {nonce} within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for `n` answers to `nonce` (one per connected client).
    pub fn wait_replies(
        &self,
        nonce: &str,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<DeltaDiscoveryRequest>> {
        let deadline = Instant::now() + timeout;
        loop {
            let replies: Vec<DeltaDiscoveryRequest> = lock(&self.ads.state)
                .requests
                .iter()
                .filter(|r| r.response_nonce == nonce)
                .cloned()
                .collect();
            if replies.len() >= n {
                return Ok(replies);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "{} of {n} replies to xDS push {nonce} within {timeout:?}",
                    replies.len()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<DeltaDiscoveryRequest> {
        lock(&self.ads.state).requests.clone()
    }
}
