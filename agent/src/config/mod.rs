//! The agent's standalone configuration: a YAML file parsed and validated once per (re)load into
//! plain data, then shared as `Arc<Config>`. Nothing here does IO beyond reading the file.
//!
//! Errors name the field and the problem (`pods[1].ips[0]: invalid IP address syntax`), so an
//! operator can fix the file without reading code.

pub mod waypoint;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::identity::Identity;

/// Default root of the agent's pinned eBPF state; the node name is appended.
pub const DEFAULT_BPF_PIN_ROOT: &str = "/sys/fs/bpf/ambit";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config file {path}: {field}: {message}")]
    Parse {
        path: PathBuf,
        field: String,
        message: String,
    },
    #[error("config file {path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

/// Where a pod's network namespace is found.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum NetnsRef {
    /// A bind-mounted netns file, e.g. `/run/netns/<name>` or a CRI sandbox's netns path.
    Path(PathBuf),
    /// Any process in the pod; its `/proc/<pid>/ns/net` is used.
    Pid(u32),
}

impl NetnsRef {
    pub fn path(&self) -> PathBuf {
        match self {
            NetnsRef::Path(p) => p.clone(),
            NetnsRef::Pid(pid) => PathBuf::from(format!("/proc/{pid}/ns/net")),
        }
    }
}

impl fmt::Display for NetnsRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NetnsRef::Path(p) => write!(f, "{}", p.display()),
            NetnsRef::Pid(pid) => write!(f, "pid {pid}"),
        }
    }
}

/// Where workload certificates come from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum CaConfig {
    /// The agent's own CA (standalone mode). The root is read from `certFile`/`keyFile` if given,
    /// else from (or generated into) `dir`.
    Builtin {
        dir: PathBuf,
        cert_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    },
    /// Istio's CA API (`istio.v1.auth.IstioCertificateService`), e.g. istiod on port 15012.
    Istio {
        /// `https://host:port`.
        address: String,
        /// PEM root that signs the CA server's TLS certificate.
        root_cert: PathBuf,
        /// Bearer token file, re-read for every request.
        token_path: Option<PathBuf>,
        /// Sent as `clusterid` metadata.
        cluster_id: Option<String>,
        /// Name to verify in the CA's certificate instead of the address's host (needed when
        /// connecting by IP to a CA whose certificate has no IP SAN, as `xds.serverName`).
        server_name: Option<String>,
    },
}

/// Data-path acceleration by the kernel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Acceleration {
    /// Connections between two pods of this node, once admitted (destination resolved, no
    /// waypoint, L4 policy allows), are spliced in the kernel: no copy through the agent and
    /// no TLS (the bytes never leave the node). Default on; where the kernel cannot, or when
    /// off, they take the HBONE path. Read at start.
    pub same_node: bool,
    /// How many connections the kernel may carry at once (the splice maps hold two sockets
    /// each); the next ones are copied by the agent (path `local`, counted in
    /// `ambit_splice_refused{reason="map"}`). Default 16384, at most 131072. Read at start.
    pub same_node_connections: u32,
}

impl Acceleration {
    /// The default of [`Acceleration::same_node_connections`] (the eBPF object's own size).
    pub const SAME_NODE_CONNECTIONS: u32 = ambit_common::MAX_SPLICED_SOCKETS / 2;
    pub const MAX_SAME_NODE_CONNECTIONS: u32 = 131_072;

    /// The splice maps' size, in sockets.
    pub fn splice_sockets(&self) -> u32 {
        self.same_node_connections * 2
    }
}

impl Default for Acceleration {
    fn default() -> Self {
        Acceleration {
            same_node: true,
            same_node_connections: Acceleration::SAME_NODE_CONNECTIONS,
        }
    }
}

/// The DNS proxy (see [`crate::dns`]). Read at start.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsSettings {
    /// Serve enrolled pods' DNS (UDP and TCP to port 53): mesh names answered, the rest
    /// forwarded to the resolver each query was for. Default off; a pod's
    /// `ambient.istio.io/dns-capture: "true"`/`"false"` annotation (`dnsCapture` for a config
    /// pod) overrides it.
    pub capture: bool,
    /// Where a query goes when the resolver the pod asked is not known. Default: the
    /// nameservers of the agent's `/etc/resolv.conf`.
    pub upstreams: Vec<SocketAddr>,
    /// How long a forwarded query waits for its answer (then SERVFAIL). Default 5 s.
    #[serde(with = "millis", rename = "timeoutMillis")]
    pub timeout: Duration,
}

impl Default for DnsSettings {
    fn default() -> Self {
        DnsSettings {
            capture: false,
            upstreams: Vec::new(),
            timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawDns {
    #[serde(default)]
    capture: Option<bool>,
    #[serde(default)]
    upstreams: Vec<SocketAddr>,
    #[serde(default)]
    timeout_millis: Option<u64>,
}

/// Milliseconds as a number.
mod millis {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawAcceleration {
    #[serde(default)]
    same_node: Option<bool>,
    #[serde(default)]
    same_node_connections: Option<usize>,
}

/// HBONE tunnel tuning.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HboneConfig {
    /// Streams one pooled HTTP/2 connection carries before another is opened. Default 100.
    pub max_streams_per_connection: usize,
    /// Connections to one destination that concurrent streams are spread over before two share
    /// one (each TLS connection is driven by one task, so one core). Default 4.
    pub parallel_connections: usize,
    /// A pooled connection without streams for this long is closed. Default 60 s.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Streams one HBONE client may have open on one connection to us (HTTP/2
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`). Default 100.
    pub max_concurrent_streams: u32,
    /// The largest header block a client may send us (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    /// Default 16 KiB: a `CONNECT` carries a few short headers.
    pub max_header_list_bytes: u32,
    /// HTTP/2 PINGs on idle HBONE connections, both ways: a peer that does not answer within
    /// `keepaliveTimeoutSeconds` is gone, and its connection is closed. Defaults 30 s and 10 s.
    #[serde(with = "secs")]
    pub keepalive_interval: Duration,
    #[serde(with = "secs")]
    pub keepalive_timeout: Duration,
    /// An HBONE connection to us without a stream for this long is closed (GOAWAY). Default
    /// 10 min.
    #[serde(with = "secs")]
    pub server_idle_timeout: Duration,
}

impl Default for HboneConfig {
    fn default() -> Self {
        HboneConfig {
            max_streams_per_connection: 100,
            parallel_connections: 4,
            idle_timeout: Duration::from_secs(60),
            max_concurrent_streams: 100,
            max_header_list_bytes: 16 << 10,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            server_idle_timeout: Duration::from_secs(600),
        }
    }
}

/// Bounds on what clients can make the agent hold. A connection over a limit is refused at once
/// (closed, or `503` for an HBONE stream), with the limit named in the access log (`limit`) and
/// in `ambit_connections_refused_total{reason}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Limits {
    /// Connections the agent's pod listeners hold at once, all pods together. Default 65536.
    pub max_connections: usize,
    /// Connections one pod's listeners (15001, 15006, 15008) hold at once. Default 16384.
    pub max_connections_per_pod: usize,
    /// TLS handshakes on 15008 in flight at once, all pods together. Default 1024.
    pub max_handshakes: usize,
    /// TLS handshakes in flight from one source IP. Default 64: a client that stalls its
    /// handshakes holds at most these.
    pub max_handshakes_per_source: usize,
    /// How long every handshake step may take, both ways: TCP connect, TLS, HTTP/2, and the
    /// answer to a `CONNECT`. Default 10 s.
    #[serde(with = "secs")]
    pub handshake_timeout: Duration,
    /// HBONE streams one client identity may have open to this node's pods at once. Default
    /// 16384.
    pub max_streams_per_identity: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 65536,
            max_connections_per_pod: 16384,
            max_handshakes: 1024,
            max_handshakes_per_source: 64,
            handshake_timeout: Duration::from_secs(10),
            max_streams_per_identity: 16384,
        }
    }
}

/// A workload on another node (standalone mode): where HBONE applies and which identity it must
/// present. The xDS source fills the same state from a control plane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Peer {
    pub namespace: String,
    pub name: Option<String>,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Whether it is reached through HBONE (its node runs a mesh agent). Default `true`.
    pub hbone: bool,
    /// Its SPIFFE identity: `identity` from the config if given, else built from the trust
    /// domain, namespace and service account.
    pub identity: Identity,
    /// Services it backs (`namespace/hostname`).
    pub services: Vec<String>,
    /// The waypoint its traffic must go through.
    pub waypoint: Option<WaypointRef>,
}

/// A waypoint (an L7 proxy reached over HBONE), named by its address as xDS's
/// `GatewayAddress` names it. Its identity is that of the workload at the address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WaypointRef {
    pub address: IpAddr,
    /// Its HBONE port. Default 15008.
    #[serde(default = "default_hbone_port")]
    pub port: u16,
}

fn default_hbone_port() -> u16 {
    ambit_common::HBONE_PORT
}

/// Which host connections are kubelet probes. The kubelet's connections to enrolled pods are
/// given the probe source address (Istio's `169.254.7.127`, `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`),
/// which pods let through uncaptured; no other process of the host may bind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Probes {
    /// The kubelet's cgroup (relative to the cgroup v2 mount), e.g.
    /// `/system.slice/kubelet.service`.
    pub kubelet_cgroup: PathBuf,
    /// The cgroup holding every host process that must not bind the probe source. Default `/`
    /// (the whole host).
    pub host_cgroup: PathBuf,
}

/// The control plane (istiod) the agent takes workloads, services and policies from by xDS.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsSettings {
    /// `https://host:port`, e.g. `https://istiod.istio-system.svc:15012`.
    pub address: String,
    /// PEM root the server's certificate must chain to.
    pub root_cert: PathBuf,
    pub token_path: Option<PathBuf>,
    /// Name to verify in the server's certificate, when connecting by IP.
    pub server_name: Option<String>,
    pub cluster_id: String,
    /// How the agent introduces itself (Istio node-agent metadata).
    pub pod_name: String,
    pub pod_namespace: String,
    /// How long an enrolled pod's new connection waits for the control plane's first full state
    /// before it is refused (nothing is sent or admitted before). Default 10 s.
    #[serde(with = "secs")]
    pub sync_hold: Duration,
    /// Connections that may wait so at once; more are refused at once. Default 1024.
    pub max_held_connections: usize,
}

/// A service: virtual IPs whose connections the agent spreads over the workloads that back it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Default `<name>.<namespace>.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// The waypoint traffic to the service goes through.
    pub waypoint: Option<WaypointRef>,
    /// Locality preferences, as istiod sends them (`load_balancing`); unset: round robin over
    /// every healthy endpoint.
    pub load_balancing: Option<LoadBalancingConfig>,
}

/// A service's locality preferences: Istio's `LoadBalancing` (what `trafficDistribution:
/// PreferClose` and `internalTrafficPolicy: Local` become), for a service of the local config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancingConfig {
    /// The scopes an endpoint should share with the client, most important first.
    #[serde(default)]
    pub routing_preference: Vec<LocalityScope>,
    /// `FAILOVER` (default): the endpoints sharing the most scopes there are; `STRICT`: only
    /// endpoints sharing all of them (none: refused); `STANDARD`: preferences ignored.
    #[serde(default)]
    pub mode: LoadBalancingMode,
    /// `ONLY_HEALTHY` (default) or `ALLOW_ALL` (unhealthy endpoints are candidates too).
    #[serde(default)]
    pub health_policy: HealthPolicy,
}

/// A locality level (Istio's `LoadBalancing.Scope`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LocalityScope {
    Network,
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
}

/// Istio's `LoadBalancing.Mode`, without `PASSTHROUGH` (a local service always has endpoints).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum LoadBalancingMode {
    Standard,
    Strict,
    #[default]
    Failover,
}

/// Istio's `LoadBalancing.HealthPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HealthPolicy {
    #[default]
    OnlyHealthy,
    AllowAll,
}

impl Service {
    /// `namespace/hostname`, how workloads name the services they back (as in xDS).
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// A service port and the workload port it maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Default: the same as `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
    /// What the port speaks (Kubernetes' `appProtocol`), for the waypoint: `http`, `http2`,
    /// `grpc`, `tcp`, `tls`. Unset: the waypoint sends gRPC as HTTP/2 and the rest as HTTP/1.1.
    #[serde(default)]
    pub app_protocol: Option<AppProtocol>,
}

/// A port's application protocol (istiod's `AppProtocol`, from a Service port's `appProtocol`
/// or name prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    Http,
    Http2,
    Grpc,
    Tcp,
    Tls,
}

impl AppProtocol {
    /// Whether a waypoint speaks HTTP/2 to the endpoints of a port of this protocol (`None`: it
    /// cannot tell, and decides by the request).
    pub fn http2(self) -> Option<bool> {
        match self {
            AppProtocol::Http2 | AppProtocol::Grpc => Some(true),
            AppProtocol::Http => Some(false),
            AppProtocol::Tcp | AppProtocol::Tls => None,
        }
    }
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name, unique within the namespace.
    pub name: String,
    /// Pod UID, if known (Kubernetes mode); informational in standalone mode.
    pub uid: Option<String>,
    /// Service account the pod runs as; its identity in the mesh.
    pub service_account: String,
    /// The pod's IPs (one per family, usually).
    pub ips: Vec<IpAddr>,
    /// The pod's network namespace.
    pub netns: NetnsRef,
    /// Whether the pod's traffic is captured (and it speaks HBONE): `enrolled` if given, else
    /// its namespace is labelled `istio.io/dataplane-mode=ambient` and the pod is not labelled
    /// `istio.io/dataplane-mode=none`.
    pub enrolled: bool,
    /// Its SPIFFE identity (from trust domain, namespace and service account).
    pub identity: Identity,
    /// Services it backs (`namespace/hostname`).
    pub services: Vec<String>,
    /// The waypoint its inbound traffic must come through.
    pub waypoint: Option<WaypointRef>,
    /// Overrides `dns.capture` (a config pod's `dnsCapture`, a Kubernetes pod's
    /// `ambient.istio.io/dns-capture` annotation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_capture: Option<bool>,
}

impl Pod {
    /// `namespace/name`, the key used in logs and by the agent.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Kubernetes mode: where the API server is and how the agent authenticates (defaults: the in-cluster service
/// account).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSettings {
    /// `https://host:port`; default from `KUBERNETES_SERVICE_HOST` / `KUBERNETES_SERVICE_PORT`.
    pub api_server: String,
    pub token_path: PathBuf,
    pub ca_cert: PathBuf,
    /// Only network namespaces whose path starts with this are searched for pods' IPs (e.g.
    /// `/var/run/netns/cni-` with containerd); default: all of `/run/netns`, `/var/run/netns`
    /// and every process's.
    pub netns_path_prefix: Option<String>,
}

/// A pod's override of `dns.capture` (`"true"` or `"false"`), as Istio's.
pub const DNS_CAPTURE_ANNOTATION: &str = "ambient.istio.io/dns-capture";

pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The whole validated configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Config {
    /// This node's name.
    pub node: String,
    /// The pods' parent cgroup (relative to the cgroup v2 mount, or an absolute path under it).
    /// The capture programs attach here, so only this node's pods are seen.
    pub cgroup: PathBuf,
    /// bpffs directory for this agent's pinned maps and links.
    pub bpf_pin_path: PathBuf,
    /// The node's own addresses: sent to the control plane as `INSTANCE_IPS`. They are not
    /// exempt from capture (only kubelet probes are, see `probes`).
    pub node_addresses: Vec<IpAddr>,
    /// Kubelet health probes pass capture (see [`Probes`]); without it, the kubelet's
    /// connections are captured and judged like any host connection.
    pub probes: Option<Probes>,
    /// Local ports of pods whose inbound connections are never captured.
    pub inbound_excluded_ports: Vec<u16>,
    /// Destination ports whose outbound connections are never captured.
    pub outbound_excluded_ports: Vec<u16>,
    /// How long a shutdown waits for open connections to finish.
    #[serde(with = "secs", rename = "drainTimeoutSeconds")]
    pub drain_timeout: Duration,
    /// The mesh's trust domain. Default `cluster.local`.
    pub trust_domain: String,
    /// Where the agent keeps state (the built-in CA's root). Default `/var/lib/ambit`.
    pub state_dir: PathBuf,
    /// Certificate authority for workload certificates.
    pub ca: CaConfig,
    /// PEM bundle of the mesh's trust anchors. Default: the built-in CA's root, or the Istio CA's
    /// `rootCert`.
    pub trust_roots: Option<PathBuf>,
    /// Requested lifetime of workload certificates. Default 24 h.
    #[serde(with = "secs", rename = "certLifetimeSeconds")]
    pub cert_lifetime: Duration,
    pub hbone: HboneConfig,
    pub limits: Limits,
    /// What the kernel carries instead of the agent.
    pub acceleration: Acceleration,
    /// The DNS proxy.
    pub dns: DnsSettings,
    /// Pods on this node.
    pub pods: Vec<Pod>,
    /// Workloads on other nodes.
    pub peers: Vec<Peer>,
    /// L4 authorization policies, in Istio's terms (the xDS source fills the same store).
    pub policies: Vec<crate::policy::Policy>,
    /// Services (virtual IPs load-balanced by the agent).
    pub services: Vec<Service>,
    /// A control plane to take the same state from, in addition to this file.
    pub xds: Option<XdsSettings>,
    /// Where `GET /healthz/ready` is served. Default `0.0.0.0:15021`.
    pub readiness_address: std::net::SocketAddr,
    /// Where Prometheus metrics (`GET /metrics`) are served. Default `0.0.0.0:15020`.
    pub metrics_address: std::net::SocketAddr,
    /// The admin API's unix socket (root-only). Default `/run/ambit/admin.sock`.
    pub admin_socket: PathBuf,
    /// Where the agent tells the CNI plugin which namespaces are in the mesh, for when the
    /// agent cannot be reached. Default `/var/lib/ambit/cni-state.json` (persistent, so that it
    /// outlives a reboot).
    pub cni_state_file: PathBuf,
    /// Namespaces labelled `istio.io/dataplane-mode=ambient` (from `namespaces`): pods the CNI
    /// plugin announces in them are enrolled.
    pub ambient_namespaces: std::collections::BTreeSet<String>,
    /// Kubernetes mode: watch the API for namespaces and this node's pods; in a waypoint's
    /// config, for the HTTPRoutes and AuthorizationPolicies it serves (`waypoint::cluster`).
    pub kubernetes: Option<KubeSettings>,
    /// Waypoint mode (`ambit-agent waypoint`): the waypoint's identity, routes and L7 policies.
    /// A waypoint config has no `cgroup` and no `pods`: it captures nothing.
    pub waypoint: Option<waypoint::Waypoint>,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Read {
            path: path.to_owned(),
            cause,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|err| {
            let field = match err.path().to_string() {
                p if p == "." => "(top level)".to_owned(),
                p => p,
            };
            // The YAML parser's message may already start with the field's path.
            let message = err.into_inner().to_string();
            let message = match message.strip_prefix(&format!("{field}: ")) {
                Some(rest) => rest.to_owned(),
                None => message,
            };
            Error::Parse {
                path: path.to_owned(),
                field,
                message,
            }
        })?;
        raw.validate(path)
    }

    pub fn enrolled_pods(&self) -> impl Iterator<Item = &Pod> {
        self.pods.iter().filter(|p| p.enrolled)
    }

    /// The settings (by their name in the file) that differ between `self` and `new` and that
    /// only a restart applies. Everything not in [`LIVE_SETTINGS`] is such a setting, so a new
    /// field is restart-only until it is made live on purpose.
    pub fn restart_needed(&self, new: &Config) -> Vec<String> {
        let (Ok(serde_json::Value::Object(old)), Ok(serde_json::Value::Object(new_map))) =
            (serde_json::to_value(self), serde_json::to_value(new))
        else {
            // Serializing plain data does not fail; if it ever did, refuse rather than guess.
            return vec!["(the whole config)".to_owned()];
        };
        let mut fixed: Vec<String> = old
            .iter()
            .filter(|(k, v)| !LIVE_SETTINGS.contains(&k.as_str()) && new_map.get(*k) != Some(*v))
            .map(|(k, _)| k.clone())
            .collect();
        // The waypoint's routes and policies are live; who it is and where it listens are not.
        match (&self.waypoint, &new.waypoint) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                for (name, changed) in [
                    ("waypoint.namespace", a.namespace != b.namespace),
                    ("waypoint.name", a.name != b.name),
                    ("waypoint.serviceAccount", a.identity != b.identity),
                    ("waypoint.listen", a.listen != b.listen),
                ] {
                    if changed {
                        fixed.push(name.to_owned());
                    }
                }
            }
            _ => fixed.push("waypoint".to_owned()),
        }
        fixed
    }
}

/// The top-level settings a reload applies while the agent runs (`waypoint` is compared by its
/// parts in [`Config::restart_needed`]). The rest are read once at start: identity and CA, the
/// eBPF attachment, listeners, the control plane and the Kubernetes watch.
pub const LIVE_SETTINGS: &[&str] = &[
    "pods",
    "peers",
    "policies",
    "services",
    "inboundExcludedPorts",
    "outboundExcludedPorts",
    "drainTimeoutSeconds",
    "ambientNamespaces",
    "cniStateFile",
    "waypoint",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawConfig {
    /// Default: the `NODE_NAME` environment variable (the downward API's `spec.nodeName`).
    #[serde(default)]
    node: Option<String>,
    /// Required, except in a waypoint's config.
    #[serde(default)]
    cgroup: Option<PathBuf>,
    #[serde(default)]
    bpf_pin_path: Option<PathBuf>,
    #[serde(default)]
    node_addresses: Vec<IpAddr>,
    #[serde(default)]
    probes: Option<RawProbes>,
    #[serde(default)]
    inbound_excluded_ports: Vec<u16>,
    #[serde(default)]
    outbound_excluded_ports: Vec<u16>,
    #[serde(default)]
    drain_timeout_seconds: Option<f64>,
    #[serde(default)]
    trust_domain: Option<String>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    ca: Option<RawCa>,
    #[serde(default)]
    trust_roots: Option<PathBuf>,
    #[serde(default)]
    cert_lifetime_seconds: Option<u64>,
    #[serde(default)]
    hbone: RawHbone,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    acceleration: RawAcceleration,
    #[serde(default)]
    dns: RawDns,
    #[serde(default)]
    pods: Vec<RawPod>,
    #[serde(default)]
    peers: Vec<RawPeer>,
    #[serde(default)]
    policies: Vec<crate::policy::Policy>,
    #[serde(default)]
    services: Vec<RawService>,
    #[serde(default)]
    namespaces: BTreeMap<String, RawNamespace>,
    #[serde(default)]
    xds: Option<RawXds>,
    #[serde(default)]
    readiness_address: Option<std::net::SocketAddr>,
    #[serde(default)]
    metrics_address: Option<std::net::SocketAddr>,
    #[serde(default)]
    admin_socket: Option<PathBuf>,
    #[serde(default)]
    cni_state_file: Option<PathBuf>,
    #[serde(default)]
    kubernetes: Option<RawKube>,
    #[serde(default)]
    waypoint: Option<waypoint::Waypoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawProbes {
    kubelet_cgroup: PathBuf,
    #[serde(default)]
    host_cgroup: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawKube {
    #[serde(default)]
    api_server: Option<String>,
    #[serde(default)]
    token_path: Option<PathBuf>,
    #[serde(default)]
    ca_cert: Option<PathBuf>,
    #[serde(default)]
    netns_path_prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawXds {
    address: String,
    root_cert: PathBuf,
    #[serde(default)]
    token_path: Option<PathBuf>,
    #[serde(default)]
    server_name: Option<String>,
    #[serde(default)]
    cluster_id: Option<String>,
    #[serde(default)]
    pod_name: Option<String>,
    #[serde(default)]
    pod_namespace: Option<String>,
    #[serde(default)]
    sync_hold_seconds: Option<f64>,
    #[serde(default)]
    max_held_connections: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawNamespace {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Where the agent leaves the mesh's namespaces for the CNI plugin by default.
/// On persistent storage: after a reboot the plugin must still know the mesh's namespaces.
pub const DEFAULT_CNI_STATE_FILE: &str = "/var/lib/ambit/cni-state.json";

/// The label that opts a namespace into the mesh (`ambient`) and a pod out of it (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawService {
    namespace: String,
    name: String,
    #[serde(default)]
    hostname: Option<String>,
    vips: Vec<IpAddr>,
    ports: Vec<ServicePort>,
    #[serde(default)]
    waypoint: Option<WaypointRef>,
    #[serde(default)]
    load_balancing: Option<LoadBalancingConfig>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawCa {
    #[serde(default)]
    builtin: Option<RawBuiltinCa>,
    #[serde(default)]
    istio: Option<RawIstioCa>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawBuiltinCa {
    #[serde(default)]
    dir: Option<PathBuf>,
    #[serde(default)]
    cert_file: Option<PathBuf>,
    #[serde(default)]
    key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawIstioCa {
    address: String,
    root_cert: PathBuf,
    #[serde(default)]
    token_path: Option<PathBuf>,
    #[serde(default)]
    cluster_id: Option<String>,
    #[serde(default)]
    server_name: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawHbone {
    #[serde(default)]
    max_streams_per_connection: Option<usize>,
    #[serde(default)]
    parallel_connections: Option<usize>,
    #[serde(default)]
    idle_timeout_seconds: Option<f64>,
    #[serde(default)]
    max_concurrent_streams: Option<usize>,
    #[serde(default)]
    max_header_list_bytes: Option<usize>,
    #[serde(default)]
    keepalive_interval_seconds: Option<f64>,
    #[serde(default)]
    keepalive_timeout_seconds: Option<f64>,
    #[serde(default)]
    server_idle_timeout_seconds: Option<f64>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    max_connections: Option<usize>,
    #[serde(default)]
    max_connections_per_pod: Option<usize>,
    #[serde(default)]
    max_handshakes: Option<usize>,
    #[serde(default)]
    max_handshakes_per_source: Option<usize>,
    #[serde(default)]
    handshake_timeout_seconds: Option<f64>,
    #[serde(default)]
    max_streams_per_identity: Option<usize>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPeer {
    namespace: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default = "default_service_account")]
    service_account: String,
    ips: Vec<IpAddr>,
    #[serde(default = "default_true")]
    hbone: bool,
    #[serde(default)]
    identity: Option<String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    waypoint: Option<WaypointRef>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawPod {
    namespace: String,
    name: String,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default = "default_service_account")]
    service_account: String,
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    pid: Option<u32>,
    /// Explicit enrollment; when absent, the namespace and pod labels decide.
    #[serde(default)]
    enrolled: Option<bool>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    waypoint: Option<WaypointRef>,
    /// Overrides `dns.capture` for this pod.
    #[serde(default)]
    dns_capture: Option<bool>,
}

/// A count: `default` when absent, else within `range`.
fn bounded(
    field: &str,
    value: Option<usize>,
    default: usize,
    range: std::ops::RangeInclusive<usize>,
) -> Result<usize, (String, String)> {
    match value {
        None => Ok(default),
        Some(n) if range.contains(&n) => Ok(n),
        Some(n) => Err((
            field.to_owned(),
            format!("{n} is not between {} and {}", range.start(), range.end()),
        )),
    }
}

/// A duration given in seconds: `default` when absent, else within `range`.
fn seconds(
    field: &str,
    value: Option<f64>,
    default: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<Duration, (String, String)> {
    match value {
        None => Ok(Duration::from_secs_f64(default)),
        Some(s) if s.is_finite() && range.contains(&s) => Ok(Duration::from_secs_f64(s)),
        Some(s) => Err((
            field.to_owned(),
            format!("{s} is not between {} and {}", range.start(), range.end()),
        )),
    }
}

fn default_service_account() -> String {
    "default".to_owned()
}

fn default_true() -> bool {
    true
}

/// Kubernetes' DNS-1123 label rule, which namespace and service account names follow.
pub(crate) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Pod names may be DNS-1123 subdomains (dots allowed, up to 253 characters).
fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

impl RawConfig {
    fn validate(mut self, path: &Path) -> Result<Config, Error> {
        let invalid = |field: String, message: String| Error::Invalid {
            path: path.to_owned(),
            field,
            message,
        };
        let waypoint_name = self.waypoint.as_ref().map(|w| w.name.clone());
        let node = match self
            .node
            .take()
            .or_else(|| std::env::var("NODE_NAME").ok())
            .or(waypoint_name)
        {
            Some(n) => n,
            None => {
                return Err(invalid(
                    "node".into(),
                    "missing: give this node's name, or set NODE_NAME (in Kubernetes, from the \
                     downward API's spec.nodeName)"
                        .into(),
                ));
            }
        };
        let kubernetes = match self.kubernetes.take() {
            None => None,
            Some(k) => {
                let api_server = match k.api_server {
                    Some(a) => a,
                    None => match (
                        std::env::var("KUBERNETES_SERVICE_HOST"),
                        std::env::var("KUBERNETES_SERVICE_PORT"),
                    ) {
                        (Ok(host), Ok(port)) if host.contains(':') => {
                            format!("https://[{host}]:{port}")
                        }
                        (Ok(host), Ok(port)) => format!("https://{host}:{port}"),
                        _ => {
                            return Err(invalid(
                                "kubernetes.apiServer".into(),
                                "missing, and KUBERNETES_SERVICE_HOST/PORT are not set (not \
                                 running in a pod?)"
                                    .into(),
                            ));
                        }
                    },
                };
                let sa = Path::new(SERVICE_ACCOUNT_DIR);
                Some(KubeSettings {
                    api_server,
                    token_path: k.token_path.unwrap_or_else(|| sa.join("token")),
                    ca_cert: k.ca_cert.unwrap_or_else(|| sa.join("ca.crt")),
                    netns_path_prefix: k.netns_path_prefix,
                })
            }
        };
        let node = &node;
        if !is_dns_subdomain(node) {
            return Err(invalid(
                "node".into(),
                format!("{node:?} is not a valid node name (lowercase DNS name)"),
            ));
        }
        let cgroup = match (self.cgroup.take(), &self.waypoint) {
            (Some(c), _) => c,
            (None, Some(_)) => PathBuf::new(),
            (None, None) => {
                return Err(invalid(
                    "cgroup".into(),
                    "missing: name the pods' parent cgroup, e.g. /kubepods.slice".into(),
                ));
            }
        };
        if self.waypoint.is_some() {
            if !self.pods.is_empty() {
                return Err(invalid(
                    "pods".into(),
                    "a waypoint captures no pods; list the workloads it sends to under `peers`"
                        .into(),
                ));
            }
            if kubernetes
                .as_ref()
                .is_some_and(|k| k.netns_path_prefix.is_some())
            {
                return Err(invalid(
                    "kubernetes.netnsPathPrefix".into(),
                    "a waypoint finds no pods (it reads routes and policies from the API)".into(),
                ));
            }
        } else if cgroup.as_os_str().is_empty() {
            return Err(invalid(
                "cgroup".into(),
                "must name the pods' parent cgroup, e.g. /kubepods.slice".into(),
            ));
        }
        if cgroup
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(invalid("cgroup".into(), "must not contain '..'".into()));
        }
        let bpf_pin_path = self
            .bpf_pin_path
            .unwrap_or_else(|| Path::new(DEFAULT_BPF_PIN_ROOT).join(node));
        if !bpf_pin_path.is_absolute() {
            return Err(invalid(
                "bpfPinPath".into(),
                format!(
                    "{} must be an absolute path on a bpffs mount",
                    bpf_pin_path.display()
                ),
            ));
        }
        for (field, ports) in [
            ("inboundExcludedPorts", &self.inbound_excluded_ports),
            ("outboundExcludedPorts", &self.outbound_excluded_ports),
        ] {
            if let Some(i) = ports.iter().position(|p| *p == 0) {
                return Err(invalid(
                    format!("{field}[{i}]"),
                    "port 0 is not a port".into(),
                ));
            }
        }
        if let Some(i) = self
            .inbound_excluded_ports
            .iter()
            .position(|p| *p == ambit_common::INBOUND_PORT || *p == ambit_common::OUTBOUND_PORT)
        {
            return Err(invalid(
                format!("inboundExcludedPorts[{i}]"),
                "the agent's own ports 15001 and 15006 cannot be excluded".into(),
            ));
        }
        let drain_timeout = seconds(
            "drainTimeoutSeconds",
            self.drain_timeout_seconds,
            5.0,
            0.0..=3600.0,
        )
        .map_err(|(f, m)| invalid(f, m))?;

        let trust_domain = self
            .trust_domain
            .unwrap_or_else(|| "cluster.local".to_owned());
        // Validates the trust domain with the identity rules.
        Identity::new(trust_domain.clone(), "default", "default")
            .map_err(|e| invalid("trustDomain".into(), e.to_string()))?;
        let state_dir = self
            .state_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/ambit"));
        let ca = match self.ca {
            None => CaConfig::Builtin {
                dir: state_dir.join("ca"),
                cert_file: None,
                key_file: None,
            },
            Some(RawCa {
                builtin: Some(_),
                istio: Some(_),
            }) => {
                return Err(invalid(
                    "ca".into(),
                    "give either builtin or istio, not both".into(),
                ));
            }
            Some(RawCa { istio: Some(i), .. }) => {
                if !(i.address.starts_with("https://")) {
                    return Err(invalid(
                        "ca.istio.address".into(),
                        format!(
                            "{:?} must be an https:// URL (the CA is only spoken to over TLS)",
                            i.address
                        ),
                    ));
                }
                CaConfig::Istio {
                    address: i.address,
                    root_cert: i.root_cert,
                    token_path: i.token_path,
                    cluster_id: i.cluster_id,
                    server_name: i.server_name,
                }
            }
            Some(RawCa { builtin, .. }) => {
                let b = builtin.unwrap_or_default();
                if b.cert_file.is_some() != b.key_file.is_some() {
                    return Err(invalid(
                        "ca.builtin".into(),
                        "certFile and keyFile go together".into(),
                    ));
                }
                CaConfig::Builtin {
                    dir: b.dir.unwrap_or_else(|| state_dir.join("ca")),
                    cert_file: b.cert_file,
                    key_file: b.key_file,
                }
            }
        };
        let cert_lifetime = match self.cert_lifetime_seconds {
            None => Duration::from_secs(24 * 3600),
            Some(s) if (2..=365 * 24 * 3600).contains(&s) => Duration::from_secs(s),
            Some(s) => {
                return Err(invalid(
                    "certLifetimeSeconds".into(),
                    format!("{s} is not between 2 and one year"),
                ));
            }
        };
        let d = HboneConfig::default();
        let h = &self.hbone;
        let hbone = HboneConfig {
            max_streams_per_connection: bounded(
                "hbone.maxStreamsPerConnection",
                h.max_streams_per_connection,
                d.max_streams_per_connection,
                1..=10_000,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            parallel_connections: bounded(
                "hbone.parallelConnections",
                h.parallel_connections,
                d.parallel_connections,
                1..=64,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            idle_timeout: seconds(
                "hbone.idleTimeoutSeconds",
                h.idle_timeout_seconds,
                d.idle_timeout.as_secs_f64(),
                0.001..=86400.0,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            max_concurrent_streams: bounded(
                "hbone.maxConcurrentStreams",
                h.max_concurrent_streams,
                d.max_concurrent_streams as usize,
                1..=10_000,
            )
            .map_err(|(f, m)| invalid(f, m))? as u32,
            max_header_list_bytes: bounded(
                "hbone.maxHeaderListBytes",
                h.max_header_list_bytes,
                d.max_header_list_bytes as usize,
                1024..=1 << 20,
            )
            .map_err(|(f, m)| invalid(f, m))? as u32,
            keepalive_interval: seconds(
                "hbone.keepaliveIntervalSeconds",
                h.keepalive_interval_seconds,
                d.keepalive_interval.as_secs_f64(),
                0.1..=3600.0,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            keepalive_timeout: seconds(
                "hbone.keepaliveTimeoutSeconds",
                h.keepalive_timeout_seconds,
                d.keepalive_timeout.as_secs_f64(),
                0.1..=600.0,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            server_idle_timeout: seconds(
                "hbone.serverIdleTimeoutSeconds",
                h.server_idle_timeout_seconds,
                d.server_idle_timeout.as_secs_f64(),
                0.1..=86400.0,
            )
            .map_err(|(f, m)| invalid(f, m))?,
        };
        let defaults = Limits::default();
        let l = &self.limits;
        let limits = Limits {
            max_connections: bounded(
                "limits.maxConnections",
                l.max_connections,
                defaults.max_connections,
                1..=1 << 22,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            max_connections_per_pod: bounded(
                "limits.maxConnectionsPerPod",
                l.max_connections_per_pod,
                defaults.max_connections_per_pod,
                1..=1 << 22,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            max_handshakes: bounded(
                "limits.maxHandshakes",
                l.max_handshakes,
                defaults.max_handshakes,
                1..=1 << 20,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            max_handshakes_per_source: bounded(
                "limits.maxHandshakesPerSource",
                l.max_handshakes_per_source,
                defaults.max_handshakes_per_source,
                1..=1 << 20,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            handshake_timeout: seconds(
                "limits.handshakeTimeoutSeconds",
                l.handshake_timeout_seconds,
                defaults.handshake_timeout.as_secs_f64(),
                0.1..=300.0,
            )
            .map_err(|(f, m)| invalid(f, m))?,
            max_streams_per_identity: bounded(
                "limits.maxStreamsPerIdentity",
                l.max_streams_per_identity,
                defaults.max_streams_per_identity,
                1..=1 << 22,
            )
            .map_err(|(f, m)| invalid(f, m))?,
        };
        let identity_of = |field: String, ns: &str, sa: &str| {
            Identity::new(trust_domain.clone(), ns, sa).map_err(|e| invalid(field, e.to_string()))
        };

        let mut services = Vec::with_capacity(self.services.len());
        let mut vips = HashSet::new();
        for (i, sv) in self.services.into_iter().enumerate() {
            let field = |name: &str| format!("services[{i}].{name}");
            if !is_dns_label(&sv.namespace) {
                return Err(invalid(
                    field("namespace"),
                    format!("{:?} is not a valid namespace name", sv.namespace),
                ));
            }
            if !is_dns_label(&sv.name) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is not a valid service name", sv.name),
                ));
            }
            if sv.vips.is_empty() {
                return Err(invalid(
                    field("vips"),
                    "a service needs at least one virtual IP".into(),
                ));
            }
            for (j, vip) in sv.vips.iter().enumerate() {
                if !vips.insert(*vip) {
                    return Err(invalid(
                        format!("services[{i}].vips[{j}]"),
                        format!("{vip} is the VIP of another service"),
                    ));
                }
            }
            if sv.ports.is_empty() {
                return Err(invalid(
                    field("ports"),
                    "a service needs at least one port".into(),
                ));
            }
            if let Some(j) = sv
                .ports
                .iter()
                .position(|p| p.port == 0 || p.target_port == Some(0))
            {
                return Err(invalid(
                    format!("services[{i}].ports[{j}]"),
                    "port 0 is not a port".into(),
                ));
            }
            if let Some(lb) = &sv.load_balancing {
                let prefs = &lb.routing_preference;
                if let Some(j) = (1..prefs.len()).find(|&j| prefs[..j].contains(&prefs[j])) {
                    return Err(invalid(
                        format!("services[{i}].loadBalancing.routingPreference[{j}]"),
                        format!("{:?} is listed twice", prefs[j]),
                    ));
                }
                // The local config gives its pods and peers no region, zone, subzone, network
                // or cluster: those scopes would match every endpoint and do nothing.
                if let Some(j) = prefs.iter().position(|p| *p != LocalityScope::Node) {
                    return Err(invalid(
                        format!("services[{i}].loadBalancing.routingPreference[{j}]"),
                        format!(
                            "{:?}: only NODE applies to a service of the local config (its pods \
                             and peers have no region, zone, subzone, network or cluster; \
                             services from istiod take every scope)",
                            prefs[j]
                        ),
                    ));
                }
                if prefs.is_empty() && lb.mode != LoadBalancingMode::Standard {
                    return Err(invalid(
                        format!("services[{i}].loadBalancing.routingPreference"),
                        format!(
                            "mode {:?} needs at least one scope (NETWORK, REGION, ZONE, SUBZONE, NODE, CLUSTER)",
                            lb.mode
                        ),
                    ));
                }
            }
            let hostname = sv
                .hostname
                .unwrap_or_else(|| format!("{}.{}.svc.cluster.local", sv.name, sv.namespace));
            services.push(Service {
                namespace: sv.namespace,
                name: sv.name,
                hostname,
                vips: sv.vips,
                ports: sv.ports,
                waypoint: sv.waypoint,
                load_balancing: sv.load_balancing,
            });
        }
        // A workload names a service as `namespace/hostname` (as xDS does) or `namespace/name`.
        let resolve_services = |field: String, names: &[String]| -> Result<Vec<String>, Error> {
            names
                .iter()
                .enumerate()
                .map(|(j, n)| {
                    services
                        .iter()
                        .find(|sv| *n == sv.key() || *n == format!("{}/{}", sv.namespace, sv.name))
                        .map(Service::key)
                        .ok_or_else(|| {
                            invalid(
                                format!("{field}[{j}]"),
                                format!("{n:?} is not a service in `services` (namespace/name or namespace/hostname)"),
                            )
                        })
                })
                .collect()
        };

        let mut pods = Vec::with_capacity(self.pods.len());
        let mut keys = HashSet::new();
        let mut ips = HashSet::new();
        for (i, p) in self.pods.into_iter().enumerate() {
            let field = |name: &str| format!("pods[{i}].{name}");
            if !is_dns_label(&p.namespace) {
                return Err(invalid(
                    field("namespace"),
                    format!("{:?} is not a valid namespace name", p.namespace),
                ));
            }
            if !is_dns_subdomain(&p.name) {
                return Err(invalid(
                    field("name"),
                    format!("{:?} is not a valid pod name", p.name),
                ));
            }
            if !is_dns_subdomain(&p.service_account) {
                return Err(invalid(
                    field("serviceAccount"),
                    format!(
                        "{:?} is not a valid service account name",
                        p.service_account
                    ),
                ));
            }
            if p.ips.is_empty() {
                return Err(invalid(field("ips"), "a pod needs at least one IP".into()));
            }
            for (j, ip) in p.ips.iter().enumerate() {
                if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                    return Err(invalid(
                        format!("pods[{i}].ips[{j}]"),
                        format!("{ip} cannot be a pod IP"),
                    ));
                }
                if !ips.insert(*ip) {
                    return Err(invalid(
                        format!("pods[{i}].ips[{j}]"),
                        format!("{ip} is already the IP of another pod"),
                    ));
                }
            }
            let netns = match (p.netns, p.pid) {
                (Some(path), None) if path.is_absolute() => NetnsRef::Path(path),
                (Some(path), None) => {
                    return Err(invalid(
                        field("netns"),
                        format!("{} must be an absolute path", path.display()),
                    ));
                }
                (None, Some(pid)) if pid > 0 => NetnsRef::Pid(pid),
                (None, Some(_)) => return Err(invalid(field("pid"), "must be > 0".into())),
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        field("netns"),
                        "give either netns or pid, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(invalid(
                        field("netns"),
                        "missing: give the pod's netns path (e.g. /run/netns/<name>) or a pid in the pod"
                            .into(),
                    ));
                }
            };
            let identity = identity_of(field("serviceAccount"), &p.namespace, &p.service_account)?;
            let pod_services = resolve_services(field("services"), &p.services)?;
            // As Istio: a namespace labelled ambient enrolls its pods, a pod labelled none opts
            // out; an explicit `enrolled` overrides both.
            let ns_ambient = self
                .namespaces
                .get(&p.namespace)
                .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|v| v == "ambient");
            let pod_opted_out = p
                .labels
                .get(DATAPLANE_MODE_LABEL)
                .is_some_and(|v| v == "none");
            let enrolled = p.enrolled.unwrap_or(ns_ambient && !pod_opted_out);
            let pod = Pod {
                dns_capture: p.dns_capture,
                waypoint: p.waypoint,
                services: pod_services,
                identity,
                namespace: p.namespace,
                name: p.name,
                uid: p.uid,
                service_account: p.service_account,
                ips: p.ips,
                netns,
                enrolled,
            };
            if !keys.insert(pod.key()) {
                return Err(invalid(
                    field("name"),
                    format!("pod {} is listed twice", pod.key()),
                ));
            }
            pods.push(pod);
        }

        let mut peers = Vec::with_capacity(self.peers.len());
        for (i, p) in self.peers.into_iter().enumerate() {
            let field = |name: &str| format!("peers[{i}].{name}");
            if !is_dns_label(&p.namespace) {
                return Err(invalid(
                    field("namespace"),
                    format!("{:?} is not a valid namespace name", p.namespace),
                ));
            }
            if p.ips.is_empty() {
                return Err(invalid(field("ips"), "a peer needs at least one IP".into()));
            }
            for (j, ip) in p.ips.iter().enumerate() {
                if !ips.insert(*ip) {
                    return Err(invalid(
                        format!("peers[{i}].ips[{j}]"),
                        format!("{ip} is already the IP of another pod or peer"),
                    ));
                }
            }
            let identity = match &p.identity {
                // Pinned, e.g. a workload of another trust domain.
                Some(id) => id
                    .parse::<Identity>()
                    .map_err(|e| invalid(field("identity"), e.to_string()))?,
                None => identity_of(field("serviceAccount"), &p.namespace, &p.service_account)?,
            };
            let peer_services = resolve_services(field("services"), &p.services)?;
            peers.push(Peer {
                services: peer_services,
                namespace: p.namespace,
                name: p.name,
                service_account: p.service_account,
                ips: p.ips,
                hbone: p.hbone,
                identity,
                waypoint: p.waypoint,
            });
        }

        let mut policy_keys = HashSet::new();
        for (i, p) in self.policies.iter().enumerate() {
            if !is_dns_label(&p.namespace) {
                return Err(invalid(
                    format!("policies[{i}].namespace"),
                    format!("{:?} is not a valid namespace name", p.namespace),
                ));
            }
            if p.name.is_empty() {
                return Err(invalid(
                    format!("policies[{i}].name"),
                    "must not be empty".into(),
                ));
            }
            if !policy_keys.insert(p.key()) {
                return Err(invalid(
                    format!("policies[{i}].name"),
                    format!("policy {} is listed twice", p.key()),
                ));
            }
        }

        let xds = match self.xds {
            None => None,
            Some(x) => {
                if !x.address.starts_with("https://") {
                    return Err(invalid(
                        "xds.address".into(),
                        format!(
                            "{:?} must be an https:// URL (xDS is only spoken over TLS)",
                            x.address
                        ),
                    ));
                }
                if self.node_addresses.is_empty() {
                    // A DaemonSet shares one config: the addresses come from the downward API.
                    if let Ok(ips) = std::env::var("INSTANCE_IPS") {
                        self.node_addresses = ips
                            .split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::parse)
                            .collect::<Result<_, _>>()
                            .map_err(|e| {
                                invalid(
                                    "nodeAddresses".into(),
                                    format!("INSTANCE_IPS={ips:?} is not a list of IPs: {e}"),
                                )
                            })?;
                    }
                }
                if self.node_addresses.is_empty() {
                    return Err(invalid(
                        "nodeAddresses".into(),
                        "xDS needs the node's addresses (sent to the control plane as INSTANCE_IPS); \
                         list them, or set INSTANCE_IPS"
                            .into(),
                    ));
                }
                Some(XdsSettings {
                    address: x.address,
                    root_cert: x.root_cert,
                    token_path: x.token_path,
                    server_name: x.server_name,
                    cluster_id: x.cluster_id.unwrap_or_else(|| "Kubernetes".to_owned()),
                    pod_name: x
                        .pod_name
                        .or_else(|| std::env::var("POD_NAME").ok())
                        .unwrap_or_else(|| format!("ambit-{node}")),
                    pod_namespace: x
                        .pod_namespace
                        .or_else(|| std::env::var("POD_NAMESPACE").ok())
                        .unwrap_or_else(|| "istio-system".to_owned()),
                    sync_hold: seconds(
                        "xds.syncHoldSeconds",
                        x.sync_hold_seconds,
                        10.0,
                        0.0..=600.0,
                    )
                    .map_err(|(f, m)| invalid(f, m))?,
                    max_held_connections: match x.max_held_connections {
                        None => 1024,
                        Some(n) if (1..=1_000_000).contains(&n) => n,
                        Some(n) => {
                            return Err(invalid(
                                "xds.maxHeldConnections".into(),
                                format!("{n} is not between 1 and 1000000"),
                            ));
                        }
                    },
                })
            }
        };

        let ambient_namespaces = self
            .namespaces
            .iter()
            .filter(|(_, n)| {
                n.labels
                    .get(DATAPLANE_MODE_LABEL)
                    .is_some_and(|v| v == "ambient")
            })
            .map(|(name, _)| name.clone())
            .collect();
        let waypoint = match self.waypoint {
            None => None,
            Some(mut w) => {
                w.validate(&trust_domain, &services, xds.is_some())
                    .map_err(|(field, message)| invalid(format!("waypoint.{field}"), message))?;
                Some(w)
            }
        };
        Ok(Config {
            waypoint,
            readiness_address: self
                .readiness_address
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 15021))),
            metrics_address: self
                .metrics_address
                .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], 15020))),
            admin_socket: self
                .admin_socket
                .unwrap_or_else(|| PathBuf::from(crate::api::DEFAULT_SOCKET)),
            cni_state_file: self
                .cni_state_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_CNI_STATE_FILE)),
            ambient_namespaces,
            xds,
            services,
            policies: self.policies,
            trust_domain,
            state_dir,
            ca,
            trust_roots: self.trust_roots,
            cert_lifetime,
            hbone,
            limits,
            acceleration: Acceleration {
                same_node: self.acceleration.same_node.unwrap_or(true),
                same_node_connections: bounded(
                    "acceleration.sameNodeConnections",
                    self.acceleration.same_node_connections,
                    Acceleration::SAME_NODE_CONNECTIONS as usize,
                    1..=Acceleration::MAX_SAME_NODE_CONNECTIONS as usize,
                )
                .map_err(|(f, m)| invalid(f, m))? as u32,
            },
            dns: {
                let timeout = match self.dns.timeout_millis {
                    None => DnsSettings::default().timeout,
                    Some(ms @ 1..=60_000) => Duration::from_millis(ms),
                    Some(ms) => {
                        return Err(invalid(
                            "dns.timeoutMillis".into(),
                            format!("{ms} is not within 1..=60000"),
                        ));
                    }
                };
                if self.dns.upstreams.len() > 8 {
                    return Err(invalid(
                        "dns.upstreams".into(),
                        "at most 8 resolvers".into(),
                    ));
                }
                DnsSettings {
                    capture: self.dns.capture.unwrap_or(false),
                    upstreams: self.dns.upstreams,
                    timeout,
                }
            },
            peers,
            node: node.clone(),
            kubernetes,
            cgroup,
            bpf_pin_path,
            node_addresses: self.node_addresses,
            probes: self.probes.map(|p| Probes {
                kubelet_cgroup: p.kubelet_cgroup,
                host_cgroup: p.host_cgroup.unwrap_or_else(|| PathBuf::from("/")),
            }),
            inbound_excluded_ports: self.inbound_excluded_ports,
            outbound_excluded_ports: self.outbound_excluded_ports,
            drain_timeout,
            pods,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("test.yaml"))
    }

    const GOOD: &str = r#"
node: node-a
cgroup: /kubepods
nodeAddresses: [10.0.0.1]
inboundExcludedPorts: [22]
namespaces:
  default: {labels: {istio.io/dataplane-mode: ambient}}
pods:
  - namespace: default
    name: client
    serviceAccount: sleep
    ips: [10.1.0.2, "fd00:1::2"]
    netns: /run/netns/client
  - namespace: default
    name: server
    ips: [10.1.0.3]
    pid: 42
    enrolled: false
"#;

    #[test]
    fn parses_a_good_config() {
        let c = parse(GOOD).expect("good config");
        assert_eq!(c.node, "node-a");
        assert_eq!(c.bpf_pin_path, Path::new("/sys/fs/bpf/ambit/node-a"));
        assert_eq!(c.pods.len(), 2);
        assert_eq!(c.pods[0].service_account, "sleep");
        assert_eq!(c.pods[1].service_account, "default");
        assert_eq!(c.pods[1].netns, NetnsRef::Pid(42));
        assert!(!c.pods[1].enrolled);
        assert_eq!(c.enrolled_pods().count(), 1);
        assert_eq!(c.drain_timeout, Duration::from_secs(5));
    }

    #[test]
    fn the_splice_maps_are_sized_by_same_node_connections_within_bounds() {
        let c = parse(GOOD).expect("good config");
        assert_eq!(
            c.acceleration.splice_sockets(),
            ambit_common::MAX_SPLICED_SOCKETS
        );
        let c = parse(&format!("{GOOD}acceleration: {{sameNodeConnections: 3}}\n")).expect("3");
        assert_eq!(
            (c.acceleration.same_node, c.acceleration.splice_sockets()),
            (true, 6)
        );
        for bad in ["0", "131073"] {
            let e = parse(&format!(
                "{GOOD}acceleration: {{sameNodeConnections: {bad}}}\n"
            ))
            .expect_err(bad)
            .to_string();
            assert!(e.contains("acceleration.sameNodeConnections"), "{e}");
        }
    }

    #[test]
    fn a_reload_may_change_pods_and_policy_but_not_what_is_read_at_start() {
        let old = parse(GOOD).expect("good config");
        let live = parse(&format!(
            "{GOOD}policies:\n  - {{name: deny-all, namespace: default, scope: NAMESPACE, action: DENY}}\n"
        ))
        .expect("with a policy");
        let live = Config {
            inbound_excluded_ports: vec![22, 2222],
            drain_timeout: Duration::from_secs(9),
            ..live
        };
        assert_eq!(old.restart_needed(&live), Vec::<String>::new());

        // `kubernetes` was missing from the hand-kept list this check replaced.
        let kube = parse(&format!(
            "{GOOD}kubernetes: {{apiServer: \"https://127.0.0.1:6443\"}}\n"
        ))
        .expect("with kubernetes");
        assert_eq!(old.restart_needed(&kube), ["kubernetes"]);

        let moved = parse(
            &GOOD
                .replace("node: node-a", "node: node-b")
                .replace("nodeAddresses: [10.0.0.1]", "nodeAddresses: [10.0.0.9]"),
        )
        .expect("another node");
        let mut fixed = old.restart_needed(&moved);
        fixed.sort();
        // The pin path follows the node name by default, so it changes too.
        assert_eq!(fixed, ["bpfPinPath", "node", "nodeAddresses"]);
    }

    fn error_of(text: &str) -> String {
        parse(text)
            .expect_err("config should be refused")
            .to_string()
    }

    #[test]
    fn names_the_field_of_a_bad_ip() {
        let e = error_of(&GOOD.replace("10.1.0.3", "10.1.0.300"));
        assert!(e.contains("pods[1].ips[0]"), "{e}");
        assert!(e.contains("invalid IP address"), "{e}");
        assert_eq!(e.matches("pods[1].ips[0]").count(), 1, "named once: {e}");
    }

    #[test]
    fn refuses_unknown_fields() {
        let e = error_of(&GOOD.replace("serviceAccount: sleep", "serviceAcount: sleep"));
        assert!(e.contains("pods[0]"), "{e}");
        assert!(e.contains("serviceAcount"), "{e}");
    }

    #[test]
    fn refuses_missing_netns() {
        let e = error_of(&GOOD.replace("    netns: /run/netns/client\n", ""));
        assert!(e.contains("pods[0].netns"), "{e}");
        assert!(e.contains("missing"), "{e}");
    }

    #[test]
    fn refuses_duplicate_ips_and_pods() {
        let e = error_of(&GOOD.replace("10.1.0.3", "10.1.0.2"));
        assert!(
            e.contains("pods[1].ips[0]") && e.contains("another pod"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("name: server", "name: client"));
        assert!(e.contains("listed twice"), "{e}");
    }

    #[test]
    fn namespace_and_pod_labels_decide_enrollment_unless_explicit() {
        let c = parse(&GOOD.replace("    pid: 42\n    enrolled: false\n", "    pid: 42\n"))
            .expect("valid");
        assert!(
            c.pods[0].enrolled && c.pods[1].enrolled,
            "ambient namespace enrolls its pods"
        );
        let opted_out = GOOD.replace(
            "    pid: 42\n    enrolled: false\n",
            "    pid: 42\n    labels: {istio.io/dataplane-mode: none}\n",
        );
        assert!(
            !parse(&opted_out).expect("valid").pods[1].enrolled,
            "a pod can opt out"
        );
        let not_ambient = GOOD.replace("istio.io/dataplane-mode: ambient", "team: a");
        let c = parse(&not_ambient).expect("valid");
        assert!(!c.pods[0].enrolled, "no label, no mesh");
        let explicit = not_ambient.replace(
            "    netns: /run/netns/client\n",
            "    netns: /run/netns/client\n    enrolled: true\n",
        );
        assert!(
            parse(&explicit).expect("valid").pods[0].enrolled,
            "explicit wins"
        );
    }

    #[test]
    fn service_locality_preferences_are_read_and_checked() {
        let with = |lb: &str| {
            GOOD.replace(
                "pods:\n",
                &format!(
                    "services:\n  - {{namespace: default, name: echo, vips: [10.96.0.10], ports: [{{port: 80}}], loadBalancing: {lb}}}\npods:\n"
                ),
            )
        };
        let c = parse(&with("{routingPreference: [NODE]}")).expect("valid");
        let lb = c.services[0].load_balancing.as_ref().expect("read");
        assert_eq!(lb.routing_preference, [LocalityScope::Node]);
        assert_eq!(
            lb.mode,
            LoadBalancingMode::Failover,
            "PreferClose's mode by default"
        );
        assert_eq!(lb.health_policy, HealthPolicy::OnlyHealthy);
        let c = parse(&with(
            "{routingPreference: [NODE], mode: STRICT, healthPolicy: ALLOW_ALL}",
        ))
        .expect("valid");
        let lb = c.services[0].load_balancing.as_ref().expect("read");
        assert_eq!(
            (lb.mode, lb.health_policy),
            (LoadBalancingMode::Strict, HealthPolicy::AllowAll)
        );
        for (bad, says) in [
            ("{routingPreference: [NODE, NODE]}", "routingPreference[1]"),
            ("{routingPreference: [NODE, ZONE]}", "only NODE applies"),
            ("{mode: STRICT}", "needs at least one scope"),
            ("{routingPreference: [HOST]}", "unknown variant"),
        ] {
            let e = error_of(&with(bad));
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(parse(&with("{mode: STANDARD}")).is_ok());
    }

    #[test]
    fn resolves_services_and_refuses_unknown_ones() {
        let with_service = GOOD.replace(
            "pods:\n",
            "services:\n  - {namespace: default, name: echo, vips: [10.96.0.10], ports: [{port: 80, targetPort: 8080}]}\npods:\n",
        );
        let c = parse(&with_service.replace(
            "    enrolled: false\n",
            "    enrolled: false\n    services: [default/echo]\n",
        ))
        .expect("valid");
        assert_eq!(c.services[0].hostname, "echo.default.svc.cluster.local");
        assert_eq!(
            c.pods[1].services,
            ["default/echo.default.svc.cluster.local"]
        );
        assert_eq!(c.services[0].ports[0].target(), 8080);
        let e = error_of(&with_service.replace(
            "    enrolled: false\n",
            "    enrolled: false\n    services: [default/nope]\n",
        ));
        assert!(
            e.contains("pods[1].services[0]") && e.contains("not a service"),
            "{e}"
        );
        let e = error_of(&with_service.replace("vips: [10.96.0.10]", "vips: []"));
        assert!(e.contains("services[0].vips"), "{e}");
    }

    #[test]
    fn refuses_bad_names_and_ports() {
        let e = error_of(&GOOD.replace(
            "namespace: default\n    name: client",
            "namespace: Default\n    name: client",
        ));
        assert!(e.contains("pods[0].namespace"), "{e}");
        let e = error_of(&GOOD.replace("[22]", "[15006]"));
        assert!(e.contains("inboundExcludedPorts[0]"), "{e}");
        let e = error_of(&GOOD.replace("[22]", "[70000]"));
        assert!(e.contains("inboundExcludedPorts[0]"), "{e}");
        let e = error_of("cgroup: /x\n");
        assert!(e.contains("node"), "{e}");
    }

    const WAYPOINT: &str = "\
services:
  - {namespace: default, name: echo, vips: [10.96.0.20], ports: [{port: 80, targetPort: 8080}]}
  - {namespace: default, name: echo-v1, vips: [10.96.0.21], ports: [{port: 80}]}
waypoint:
  namespace: default
  name: waypoint
  routes:
    - name: split
      parentRefs: [{name: echo}]
      rules:
        - matches: [{path: {type: PathPrefix, value: /api}, method: GET}]
          backendRefs: [{name: echo-v1, port: 80, weight: 90}, {name: echo, weight: 10}]
          timeouts: {request: 2s}
          retry: {attempts: 3, codes: [503]}
  authorization:
    - name: no-admin
      action: DENY
      rules:
        - to: [{operation: {paths: [/admin*]}}]
          when: [{key: 'request.headers[x-user]', values: [guest]}]
";

    #[test]
    fn a_waypoint_config_needs_no_cgroup_and_resolves_services() {
        let c = parse(WAYPOINT).expect("waypoint config");
        assert!(c.cgroup.as_os_str().is_empty());
        assert_eq!(
            c.node, "waypoint",
            "the node name defaults to the waypoint's"
        );
        let w = c.waypoint.expect("waypoint section");
        assert_eq!(
            w.identity().to_string(),
            "spiffe://cluster.local/ns/default/sa/waypoint",
            "the service account defaults to the waypoint's name"
        );
        let rule = &w.routes[0].rules[0];
        assert_eq!(
            rule.backend_refs[0].service_key(),
            "default/echo-v1.default.svc.cluster.local"
        );
        assert_eq!(
            rule.timeouts.request.map(|d| d.duration()),
            Some(Duration::from_secs(2))
        );
        assert_eq!(w.authorization[0].key(), "default/no-admin");
        // An agent config still needs its cgroup.
        let e = error_of("node: n\n");
        assert!(e.contains("cgroup"), "{e}");
    }

    #[test]
    fn names_the_field_of_a_bad_waypoint_setting() {
        let cases = [
            (
                "name: echo-v1, port: 80, weight: 90",
                "name: nope, port: 80, weight: 90",
                "waypoint.routes[0].rules[0].backendRefs[0]",
            ),
            (
                "type: PathPrefix",
                "type: RegularExpression",
                "waypoint.routes[0].rules[0].matches[0].path.type",
            ),
            (
                "method: GET",
                "method: get",
                "waypoint.routes[0].rules[0].matches[0].method",
            ),
            (
                "request: 2s",
                "request: 2 seconds",
                "waypoint.routes[0].rules[0].timeouts.request",
            ),
            (
                "codes: [503]",
                "codes: [200]",
                "waypoint.routes[0].rules[0].retry.codes",
            ),
            (
                "key: 'request.headers[x-user]'",
                "key: 'request.auth.claims[iss]'",
                "waypoint.authorization[0].rules[0].when[0].key",
            ),
            (
                "action: DENY",
                "action: AUDIT",
                "waypoint.authorization[0].action",
            ),
            (
                "parentRefs: [{name: echo}]",
                "parentRefs: []",
                "waypoint.routes[0].parentRefs",
            ),
            (
                "parentRefs: [{name: echo}]",
                "parentRefs: [{name: echo}]\n      hostnames: [\"\u{fc}.example\"]",
                "waypoint.routes[0].hostnames[0]",
            ),
            (
                "key: 'request.headers[x-user]', values: [guest]",
                "key: source.ip, values: [10.0.0.0/33]",
                "waypoint.authorization[0].rules[0].when[0].values",
            ),
        ];
        for (from, to, field) in cases {
            assert!(WAYPOINT.contains(from), "{from}");
            let e = error_of(&WAYPOINT.replace(from, to));
            assert!(e.contains(field), "{to}: {e}");
        }
        let e = error_of(&format!("{WAYPOINT}pods: []\ncgroup: /x\n").replace(
            "pods: []",
            "pods: [{namespace: a, name: b, ips: [10.0.0.1], pid: 1}]",
        ));
        assert!(e.contains("pods") && e.contains("captures no pods"), "{e}");
    }
}
