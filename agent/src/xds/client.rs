//! The delta ADS client: one gRPC stream to the control plane carrying both subscriptions.
//!
//! ```text
//! connect (TLS to the configured root, bearer token re-read per connection)
//!   -> DeltaAggregatedResources: one initial request per type (node, initial_resource_versions)
//!   <- response: decode + validate each resource; apply the valid ones and the removals,
//!      remember their names; ACK (nonce), or NACK (nonce, google.rpc.Status code 3) naming
//!      only the rejected resources, whose last good version (if any) stays in force
//! stream ends or fails -> backoff 100 ms..15 s, jittered (reset once a connection delivered
//! something) -> reconnect, telling the server which resources it holds
//! ```
//!
//! The resources held are sent back by name with an empty version, as ztunnel does (istiod
//! serves it so): the names say what the client holds; a server that compared versions would
//! at worst resend. Not keeping the versions saves ~74 B of heap per workload (7.4 MB at
//! 100,000, measured by the scale bench's heap log line).
//!
//! Resources are judged one by one, as ztunnel does: istiod does not resend after a NACK (it waits
//! for the next change), so refusing a whole response for one odd resource would leave the node
//! without the mesh's state. Ready once a response of each type has been processed (istiod sends
//! an empty one when there is nothing), whether or not every resource in it was accepted; it
//! stays ready across reconnects, because the state it built is still served.

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ambit_proto::{
    envoy::{
        config::core::v3::{Node, node::UserAgentVersionType},
        service::discovery::v3::DeltaDiscoveryRequest,
    },
    google::rpc::Status,
    prost_types::{Struct, Value, value::Kind},
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{
    metadata::{AsciiMetadataValue, MetadataValue},
    transport::Endpoint,
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{
    ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, AddressResource, Error, XdsSink,
    push::{AdsCodec, Push, Rejected, Resources},
};
use crate::policy::Policy;

/// First reconnect delay; doubled after each failed connection up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// HTTP/2 pings notice a server that vanished without closing the connection.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A full push of a large mesh is one message; ztunnel allows 200 MiB.
const MAX_MESSAGE_BYTES: usize = 200 * 1024 * 1024;
/// The ADS method (Envoy's `AggregatedDiscoveryService.DeltaAggregatedResources`).
const ADS_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// A NACK names at most this many bad resources (then "and N more").
const MAX_NACK_ERRORS: usize = Rejected::NAMED;
/// `google.rpc.Code.INVALID_ARGUMENT`, the code of a NACK's `error_detail`.
const INVALID_ARGUMENT: i32 = 3;

/// Node metadata keys, as Istio's node agent (ztunnel) sends them.
const META_NAME: &str = "NAME";
const META_NAMESPACE: &str = "NAMESPACE";
const META_INSTANCE_IPS: &str = "INSTANCE_IPS";
const META_NODE_NAME: &str = "NODE_NAME";
const META_CLUSTER_ID: &str = "CLUSTER_ID";
/// gRPC metadata (HTTP/2 headers), as for the Istio CA.
const AUTHORIZATION_HEADER: &str = "authorization";
const CLUSTER_ID_HEADER: &str = "clusterid";

/// Who the agent is, told to the control plane in the `Node` of its first requests. istiod
/// identifies node agents by the id `ztunnel~<ip>~<pod>.<namespace>~<namespace>.svc.cluster.local`
/// and sends them only the workload and authorization types.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// The Kubernetes node the agent runs on (metadata `NODE_NAME`).
    pub node_name: String,
    /// The agent's own pod name (metadata `NAME`, and in the node id).
    pub pod_name: String,
    /// The agent's own namespace (metadata `NAMESPACE`, and in the node id).
    pub pod_namespace: String,
    /// The agent's pod IPs; the first is in the node id, all are in `INSTANCE_IPS`
    /// (comma-separated). At least one.
    pub instance_ips: Vec<IpAddr>,
    /// The cluster id (metadata `CLUSTER_ID` and the `clusterid` header; istiod uses it to pick the
    /// cluster whose API server checks the token). Empty: not sent.
    pub cluster_id: String,
}

/// How to reach and authenticate to the control plane.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// `https://<host>:<port>`, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM root certificate(s) the server's TLS certificate must chain to (for istiod, the mesh
    /// root from the `istio-ca-root-cert` ConfigMap). Only these are trusted.
    pub root_cert_pem: Vec<u8>,
    /// File holding the bearer token sent as `authorization: Bearer <token>` (for istiod, a
    /// projected service-account token with audience `istio-ca`), read again on every
    /// connection because the kubelet rotates it. `None`: no token is sent.
    pub token_path: Option<PathBuf>,
    /// The name the server's certificate must carry; default: the host of `address`. Set it
    /// when connecting by IP or through an alias (istiod's certificate is for
    /// `istiod.istio-system.svc`).
    pub server_name: Option<String>,
    pub node: NodeInfo,
}

/// The client's state for the admin API and `ambitctl`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    pub address: String,
    /// A stream is open.
    pub connected: bool,
    /// A response of each type has been applied.
    pub ready: bool,
    /// Streams opened so far.
    pub connections: u64,
    /// Responses processed (ACKed, or applied but for the resources a NACK named).
    pub pushes: u64,
    /// Responses NACKed (at least one resource rejected).
    pub nacks: u64,
    /// Resources rejected so far, by type ([`type_label`]: `address` for workloads and
    /// services, `authorization` for policies).
    #[serde(default)]
    pub rejected: BTreeMap<String, u64>,
    /// The most recent rejections, newest last (at most [`MAX_NACK_ERRORS`]): `name: reason`.
    #[serde(default)]
    pub last_rejected: Vec<String>,
    /// When the last response was applied, milliseconds since the Unix epoch.
    pub last_push_unix_ms: Option<u64>,
    /// The last connection failure or NACK reason; never cleared (read it with the counters).
    pub last_error: Option<String>,
    /// Resources held, by type: workloads and services, policies.
    pub addresses: usize,
    pub policies: usize,
}

/// The delta ADS client. Build with [`XdsClient::new`], then spawn [`XdsClient::run`].
pub struct XdsClient {
    address: String,
    endpoint: Endpoint,
    node: Node,
    token_path: Option<PathBuf>,
    cluster_id: Option<AsciiMetadataValue>,
    sink: Arc<dyn XdsSink>,
    inner: Mutex<Inner>,
    ready: watch::Sender<bool>,
}

/// What the run loop keeps between responses and connections.
#[derive(Default)]
struct Inner {
    /// The names of what the sink holds, per type; sent as `initial_resource_versions`.
    addresses: HashSet<Box<str>>,
    policies: HashSet<Box<str>>,
    got_addresses: bool,
    got_policies: bool,
    status: XdsStatus,
}

impl XdsClient {
    /// Validates the configuration. Does not connect: the server may be down now and up later.
    pub fn new(config: XdsConfig, sink: Arc<dyn XdsSink>) -> Result<XdsClient, Error> {
        let address = config.address;
        let endpoint = crate::grpc::tls_endpoint(
            "xDS server",
            &address,
            &config.root_cert_pem,
            config.server_name,
        )?
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);

        let node = build_node(&config.node)?;
        let cluster_id = Some(config.node.cluster_id)
            .filter(|id| !id.is_empty())
            .map(|id| AsciiMetadataValue::try_from(id.as_str()).map_err(|_| Error::ClusterId(id)))
            .transpose()?;
        let (ready, _) = watch::channel(false);
        Ok(XdsClient {
            inner: Mutex::new(Inner {
                status: XdsStatus {
                    address: address.clone(),
                    ..XdsStatus::default()
                },
                ..Inner::default()
            }),
            address,
            endpoint,
            node,
            token_path: config.token_path,
            cluster_id,
            sink,
            ready,
        })
    }

    /// The node id sent to the control plane.
    pub fn node_id(&self) -> &str {
        &self.node.id
    }

    /// Whether a response of each type has been applied.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Resolves once [`XdsClient::is_ready`] is true.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // Errors only if the sender is dropped, which `self` prevents.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    pub fn status(&self) -> XdsStatus {
        let inner = self.lock();
        let mut status = inner.status.clone();
        status.ready = self.is_ready();
        status.addresses = inner.addresses.len();
        status.policies = inner.policies.len();
        status
    }

    /// Keeps a stream open until `shutdown`, reconnecting with backoff.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        let mut id: u64 = 0;
        loop {
            id += 1;
            let mut delivered = false;
            let span = info_span!("xds", id, server = %self.address);
            let result = tokio::select! {
                () = shutdown.cancelled() => break,
                r = self.connection(&mut delivered).instrument(span.clone()) => r,
            };
            self.lock().status.connected = false;
            if delivered {
                backoff = INITIAL_BACKOFF;
            }
            // Equal jitter: somewhere in [backoff/2, backoff], so agents restarted together
            // do not reconnect together.
            let half = backoff / 2;
            let delay = half + half.mul_f64(fastrand::f64());
            span.in_scope(|| match &result {
                Ok(()) => info!(retry_in = ?delay, "xDS stream closed by the server"),
                Err(e) => warn!(error = %e, retry_in = ?delay, "xDS connection failed"),
            });
            if let Err(e) = result {
                self.lock().status.last_error = Some(e.to_string());
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        self.lock().status.connected = false;
        info!(server = %self.address, "xDS client stopped");
    }

    /// One stream: connect, subscribe, handle responses until the stream ends. Sets `delivered`
    /// once a response arrived.
    async fn connection(&self, delivered: &mut bool) -> Result<(), Error> {
        let connect_error = |detail: String| Error::Connect {
            address: self.address.clone(),
            detail,
        };
        let channel = self
            .endpoint
            .connect()
            .await
            .map_err(|e| connect_error(error_chain(&e)))?;

        let (tx, rx) = mpsc::channel(4);
        for req in self.initial_requests() {
            debug!(
                type_url = req.type_url,
                known = req.initial_resource_versions.len(),
                "subscribing"
            );
            tx.send(req)
                .await
                .map_err(|_| connect_error("BUG: request channel closed".to_owned()))?;
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(auth) = self.authorization().await? {
            request.metadata_mut().insert(AUTHORIZATION_HEADER, auth);
        }
        if let Some(id) = &self.cluster_id {
            request.metadata_mut().insert(CLUSTER_ID_HEADER, id.clone());
        }
        // The generated client's call, with our codec: responses are validated resource by
        // resource as they are decoded (see `push`).
        let mut grpc =
            tonic::client::Grpc::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES);
        grpc.ready()
            .await
            .map_err(|e| connect_error(format!("the channel is not ready: {e}")))?;
        request.extensions_mut().insert(tonic::GrpcMethod::new(
            "envoy.service.discovery.v3.AggregatedDiscoveryService",
            "DeltaAggregatedResources",
        ));
        let mut responses = grpc
            .streaming(
                request,
                http::uri::PathAndQuery::from_static(ADS_PATH),
                AdsCodec,
            )
            .await
            .map_err(|s| connect_error(status_message(&s)))?
            .into_inner();
        {
            let mut inner = self.lock();
            inner.status.connected = true;
            inner.status.connections += 1;
        }
        info!("xDS stream open");

        loop {
            let response = responses.message().await.map_err(|s| Error::Stream {
                address: self.address.clone(),
                detail: status_message(&s),
            })?;
            let Some(response) = response else {
                return Ok(());
            };
            *delivered = true;
            let reply = self.handle(response);
            tx.send(reply).await.map_err(|_| Error::Stream {
                address: self.address.clone(),
                detail: "the request stream closed".to_owned(),
            })?;
        }
    }

    fn initial_requests(&self) -> [DeltaDiscoveryRequest; 2] {
        let inner = self.lock();
        let request = |type_url: &str, known: &HashSet<Box<str>>| DeltaDiscoveryRequest {
            node: Some(self.node.clone()),
            type_url: type_url.to_owned(),
            initial_resource_versions: known
                .iter()
                .map(|name| (name.to_string(), String::new()))
                .collect(),
            ..Default::default()
        };
        [
            request(ADDRESS_TYPE_URL, &inner.addresses),
            request(AUTHORIZATION_TYPE_URL, &inner.policies),
        ]
    }

    /// Applies or refuses one response; returns the ACK or NACK to send.
    fn handle(&self, push: Push) -> DeltaDiscoveryRequest {
        let (upserts, removes) = (push.upserts, push.removed.len());
        // Each valid resource and every removal is applied; the rejected ones are named.
        match push.resources {
            Resources::Addresses(valid) => self.apply_addresses(valid, push.removed),
            Resources::Policies(valid) => self.apply_policies(valid, push.removed),
            Resources::Unsubscribed => {}
        }
        let (type_url, nonce, rejected) = (push.type_url, push.nonce, push.rejected);
        let error_detail = if rejected.is_empty() {
            info!(type_url, nonce, upserts, removes, "xDS push applied (ACK)");
            None
        } else {
            let message = nack_message(&rejected);
            warn!(
                type_url,
                nonce,
                upserts,
                removes,
                rejected = rejected.count,
                error = %message,
                "xDS push applied but for the resources named (NACK); their last good version, if any, stays"
            );
            let mut inner = self.lock();
            inner.status.nacks += 1;
            *inner
                .status
                .rejected
                .entry(type_label(&type_url).to_owned())
                .or_default() += rejected.count as u64;
            let last = &mut inner.status.last_rejected;
            last.extend(rejected.named.iter().cloned());
            let excess = last.len().saturating_sub(MAX_NACK_ERRORS);
            last.drain(..excess);
            inner.status.last_error = Some(format!("NACK {type_url}: {message}"));
            Some(Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            })
        };
        if upserts + removes >= LARGE_PUSH {
            release_free_memory();
        }
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: nonce,
            error_detail,
            ..Default::default()
        }
    }

    fn apply_addresses(&self, decoded: Vec<(String, AddressResource)>, removes: Vec<String>) {
        let names = names_of(&decoded);
        // The sink is called from this task only, so the order of pushes is kept.
        self.sink.apply_addresses(decoded, removes.clone());
        let mut inner = self.lock();
        for name in &removes {
            inner.addresses.remove(name.as_str());
        }
        inner.addresses.extend(names);
        inner.got_addresses = true;
        self.applied(inner);
    }

    fn apply_policies(&self, decoded: Vec<(String, Policy)>, removes: Vec<String>) {
        let names = names_of(&decoded);
        self.sink.apply_policies(decoded, removes.clone());
        let mut inner = self.lock();
        for name in &removes {
            inner.policies.remove(name.as_str());
        }
        inner.policies.extend(names);
        inner.got_policies = true;
        self.applied(inner);
    }

    fn applied(&self, mut inner: MutexGuard<'_, Inner>) {
        inner.status.pushes += 1;
        inner.status.last_push_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if inner.got_addresses && inner.got_policies && !self.is_ready() {
            info!("xDS ready: workloads, services and policies received");
            self.ready.send_replace(true);
        }
    }

    /// The `authorization` value, read from the token file now (tokens rotate).
    async fn authorization(&self) -> Result<Option<AsciiMetadataValue>, Error> {
        let Some(path) = &self.token_path else {
            return Ok(None);
        };
        let token = tokio::fs::read_to_string(path).await.map_err(|e| {
            Error::Token(format!(
                "{}: {e}; is the service-account token mounted?",
                path.display()
            ))
        })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(Error::Token(format!("{} is empty", path.display())));
        }
        let mut value = MetadataValue::try_from(format!("Bearer {token}")).map_err(|_| {
            Error::Token(format!(
                "{} has characters a header cannot carry",
                path.display()
            ))
        })?;
        value.set_sensitive(true);
        Ok(Some(value))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is consistent after each statement that changes it, so a panic elsewhere
        // while it was held does not make it unusable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `type` label of the rejection metric for a type URL.
pub fn type_label(type_url: &str) -> &'static str {
    match type_url {
        ADDRESS_TYPE_URL => "address",
        AUTHORIZATION_TYPE_URL => "authorization",
        _ => "other",
    }
}

/// The names of `decoded`, to remember what the sink holds.
fn names_of<T>(decoded: &[(String, T)]) -> Vec<Box<str>> {
    decoded
        .iter()
        .map(|(name, _)| name.as_str().into())
        .collect()
}

/// The NACK's detail: the reasons kept, and how many more there were.
fn nack_message(rejected: &Rejected) -> String {
    let mut msg = rejected.named.join("; ");
    if rejected.count > rejected.named.len() {
        let _ = write!(msg, "; and {} more", rejected.count - rejected.named.len());
    }
    msg
}

fn build_node(info: &NodeInfo) -> Result<Node, Error> {
    let Some(ip) = info.instance_ips.first() else {
        return Err(Error::Node(
            "instance_ips is empty: the node id carries the agent's pod IP".to_owned(),
        ));
    };
    if info.pod_name.is_empty() || info.pod_namespace.is_empty() {
        return Err(Error::Node(
            "pod_name and pod_namespace must be set: the node id carries them".to_owned(),
        ));
    }
    let (pod, ns) = (&info.pod_name, &info.pod_namespace);
    let ips = info
        .instance_ips
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut fields = BTreeMap::new();
    let mut put = |k: &str, v: &str| {
        fields.insert(
            k.to_owned(),
            Value {
                kind: Some(Kind::StringValue(v.to_owned())),
            },
        );
    };
    put(META_NAME, pod);
    put(META_NAMESPACE, ns);
    put(META_INSTANCE_IPS, &ips);
    put(META_NODE_NAME, &info.node_name);
    if !info.cluster_id.is_empty() {
        put(META_CLUSTER_ID, &info.cluster_id);
    }
    Ok(Node {
        id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
        metadata: Some(Struct { fields }),
        user_agent_name: "ambit".to_owned(),
        user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion(
            env!("CARGO_PKG_VERSION").to_owned(),
        )),
        ..Default::default()
    })
}

/// The error and its causes, which is where a connection failure says what went wrong
/// ("tcp connect error: Connection refused", "invalid peer certificate: ...").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !msg.contains(&s_text) {
            let _ = write!(msg, ": {s_text}");
        }
        source = s.source();
    }
    msg
}

fn status_message(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), error_chain(status))
}

/// A push this big decodes into much transient memory (the protobufs, then the converted
/// resources): afterwards the free memory is handed back to the kernel.
const LARGE_PUSH: usize = 1000;

/// Gives the allocator's free pages back to the kernel after a large push (glibc keeps freed
/// heap pages otherwise), and logs how much heap is in use and free, for operators sizing the
/// agent for a big mesh.
fn release_free_memory() {
    if let Some((before, after)) = crate::memory::release_free_heap() {
        info!(
            heap_in_use_bytes = after.in_use,
            heap_free_bytes_before = before.free,
            heap_free_bytes_after = after.free,
            mmapped_bytes = after.mmapped,
            "returned free heap memory to the kernel after a large xDS push"
        );
    }
}
