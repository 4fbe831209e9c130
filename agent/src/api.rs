//! The admin API's wire types: JSON bodies served by the agent on its unix socket and read by
//! `ambitctl`. One definition for both ends, so they cannot drift.
//!
//! | method | path | body |
//! |---|---|---|
//! | GET | `/status` | [`Status`] |
//! | GET | `/workloads` (`?local=true`) | `Vec<`[`WorkloadView`]`>` |
//! | GET | `/services` | `Vec<`[`ServiceView`]`>` |
//! | GET | `/policies` | `Vec<`[`PolicyView`]`>` |
//! | GET | `/certificates` | `Vec<`[`CertView`]`>` |
//! | GET | `/connections` | `Vec<`[`ConnectionView`]`>` |
//! | GET | `/bpf` | [`BpfView`] |
//! | GET | `/config` | the agent's config, as it reads it (JSON) |
//! | GET | `/logging` | [`LogLevel`] |
//! | PUT | `/logging?level=<filter>` | [`LogLevel`] (the new one) |
//! | GET | `/explain?src=<pod, ip or spiffe id>&dst=<ip:port>` | [`Explain`] |
//! | POST | `/cni/add` (body [`CniPod`]) | [`CniAnswer`], once the pod is enrolled (or not opted in) |
//! | POST | `/cni/del` (body [`CniPod`]) | [`CniAnswer`] |
//! | POST | `/cni/check` (body [`CniPod`]) | [`CniAnswer`]; 409 if an opted-in pod is not enrolled |
//!
//! Errors are a non-2xx status with an [`ApiError`] body. Field names are camelCase.

use serde::{Deserialize, Serialize};

/// Where the agent serves the admin API unless its config says otherwise (`adminSocket`).
pub const DEFAULT_SOCKET: &str = "/run/ambit/admin.sock";

/// The body of every error response.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ApiError {
    pub error: String,
}

/// `GET /status`: is the agent healthy, and what is it connected to.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    /// The agent's version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub node: String,
    pub pid: u32,
    pub uptime_seconds: u64,
    /// What `/healthz/ready` on 15021 answers.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub not_ready: Vec<String>,
    /// The config file the agent runs from.
    pub config_file: String,
    /// Why the file's current content is not in force: the last reload was refused (it does not
    /// validate, or it changes a setting only a restart applies). `None` once one applies.
    #[serde(default)]
    pub config_refused: Option<String>,
    pub trust_domain: String,
    /// Enrolled (captured) local pods.
    pub enrolled_pods: usize,
    /// Enrolled pods served from the record an earlier agent saved, because the source that
    /// claims them (`waiting_for`) has not synced yet.
    #[serde(default)]
    pub adopted_pods: Vec<String>,
    /// Netns an earlier agent enrolled that stay captured but unserved (no usable record) until
    /// every source has synced: their connections are refused, never sent in plaintext.
    #[serde(default)]
    pub held_netns: Vec<u64>,
    /// A pod source that has not synced yet (`kubernetes`): nothing pinned is released before.
    #[serde(default)]
    pub waiting_for: Option<String>,
    /// Local pods that should be enrolled but could not be, with the error.
    pub failed_pods: Vec<FailedPod>,
    /// Known workloads and services (all sources), and policies.
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    /// Open proxied connections.
    pub connections: usize,
    pub ca: CaStatus,
    /// `None` when the agent runs from its local config only.
    pub xds: Option<XdsView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailedPod {
    /// `namespace/name`.
    pub pod: String,
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaStatus {
    /// `builtin` or `istio`.
    pub kind: String,
    /// The CA's address (`istio`) or directory (`builtin`).
    pub location: String,
    /// Identities holding a valid certificate, of those the node needs.
    pub certificates_ready: usize,
    pub certificates_total: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsView {
    pub address: String,
    /// A stream is open now.
    pub connected: bool,
    /// The first full state has arrived.
    pub ready: bool,
    /// Streams opened so far (1 + reconnects).
    pub streams: u64,
    pub pushes: u64,
    pub nacks: u64,
    /// Resources rejected so far (each alone), by type (`address`, `authorization`).
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// The most recent rejections, `name: reason`, newest last.
    #[serde(default)]
    pub last_rejected: Vec<String>,
    /// When the last push was applied, RFC 3339.
    pub last_push: Option<String>,
    /// The last connection failure or NACK reason.
    pub last_error: Option<String>,
    /// Resources held: workloads and services (`Address`), policies (`Authorization`).
    pub addresses: usize,
    pub policies: usize,
}

/// One workload the agent knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView {
    /// The xDS uid (`<cluster>//Pod/<ns>/<name>`), or `config//Pod/<ns>/<name>` for a config pod.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// Its node, when known.
    pub node: String,
    pub identity: String,
    pub ips: Vec<String>,
    /// Reached through HBONE.
    pub hbone: bool,
    /// On this node.
    pub local: bool,
    /// For a local pod: captured by this agent now.
    pub enrolled: bool,
    pub healthy: bool,
    /// `namespace/hostname` of the services it backs.
    pub services: Vec<String>,
    /// Workload-selector policies that name it.
    pub policies: Vec<String>,
    /// `config`, `xds`, or `config+xds` (a config pod istiod also describes: one workload, the
    /// config's settings, istiod's telemetry fields).
    pub source: String,
    /// The waypoint its traffic must go through (`ip:port` or `namespace/hostname`), if any.
    pub waypoint: Option<String>,
    /// Istio's canonical service and revision (telemetry); empty when unknown.
    #[serde(default)]
    pub canonical_name: String,
    #[serde(default)]
    pub canonical_revision: String,
    /// Its cluster (istiod's `cluster_id`) and network; empty when unknown or the default.
    #[serde(default)]
    pub cluster: String,
    #[serde(default)]
    pub network: String,
    /// `region/zone/subzone`, as far as known.
    #[serde(default)]
    pub locality: String,
    /// For `config+xds`: the uid istiod gives the pod.
    #[serde(default)]
    pub xds_uid: Option<String>,
}

/// One service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView {
    /// `namespace/hostname`.
    pub key: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    pub ports: Vec<ServicePortView>,
    pub endpoints: Vec<EndpointView>,
    /// `config`, `xds`, or `workloads` (only named by workloads, no definition).
    pub source: String,
    pub waypoint: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortView {
    pub port: u16,
    /// 0: the same as `port` unless the endpoint maps it.
    pub target_port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointView {
    /// `namespace/name` of the workload.
    pub workload: String,
    pub ips: Vec<String>,
    pub healthy: bool,
}

/// One authorization policy.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyView {
    /// `namespace/name`.
    pub name: String,
    /// `GLOBAL`, `NAMESPACE` or `WORKLOAD_SELECTOR`.
    pub scope: String,
    /// `ALLOW` or `DENY`.
    pub action: String,
    pub dry_run: bool,
    pub rules: usize,
    /// `config` or `xds`.
    pub source: String,
    /// The policy as the agent holds it (the same shape as in the config file).
    pub spec: serde_json::Value,
}

/// One workload certificate.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    pub identity: String,
    /// `pending`, `ready`, `renewing` or `failing`.
    pub state: String,
    pub serial: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// Seconds until `not_after` (negative when expired).
    pub expires_in_seconds: Option<i64>,
    /// RFC 3339: the next renewal or retry.
    pub next_rotation: Option<String>,
    pub last_error: Option<String>,
    pub fetches: u64,
}

/// One open connection through the agent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionView {
    /// Unique for the agent's lifetime (stable across `--watch` refreshes).
    pub id: u64,
    /// `inbound` or `outbound`.
    pub direction: String,
    /// `hbone`, `passthrough`, `waypoint`, `kernel` (spliced same-node) or `local` (same-node,
    /// copied by the agent).
    pub path: String,
    pub src: String,
    pub dst: String,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    pub src_identity: Option<String>,
    pub dst_identity: Option<String>,
    /// The service whose VIP was dialed, if any.
    pub service: Option<String>,
    /// Bytes from the source to the destination so far.
    pub bytes_sent: u64,
    /// Bytes from the destination back to the source so far.
    pub bytes_received: u64,
    pub age_seconds: f64,
}

/// `GET /bpf`: the capture programs and their state.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfView {
    pub pin_path: String,
    /// The cgroup the cgroup programs attach to.
    pub cgroup: String,
    pub programs: Vec<BpfProgramView>,
    pub enrolled: Vec<BpfEnrolledView>,
    pub maps: Vec<BpfMapView>,
    /// Program counters (summed over CPUs), by name.
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Whether same-node connections are spliced in the kernel: `on`, `off (...)` or
    /// `unavailable: <why>`. `None` when read from bpffs without the agent (`--offline`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub splice: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfProgramView {
    pub name: String,
    /// e.g. `cgroup/connect4`, `sk_lookup`.
    pub kind: String,
    /// Where it is attached: the cgroup path, or `netns <cookie>` (sk_lookup, one per pod).
    pub attached_to: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfEnrolledView {
    pub netns_cookie: u64,
    /// `namespace/name` of the pod, or `None` for pinned state no current pod claims.
    pub pod: Option<String>,
    pub ips: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BpfMapView {
    pub name: String,
    pub max_entries: u32,
    /// Entries in use; `None` for arrays (always full by construction).
    pub entries: Option<u32>,
}

/// `GET /logging`, and the answer to `PUT /logging?level=`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LogLevel {
    /// An `EnvFilter` directive, e.g. `info` or `info,ambit_agent::xds=debug`.
    pub level: String,
}

/// `GET /explain`: what would happen to a new connection from `src` to `dst`, and why. Computed
/// by the same functions the data path uses for a real connection.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Explain {
    /// The source as resolved: `namespace/name` of a workload, or the bare IP.
    pub src: String,
    pub src_ip: Option<String>,
    pub src_identity: Option<String>,
    /// The destination as asked.
    pub dst: String,
    /// Whether the source's connection is captured by the agent (an enrolled local pod; the
    /// destination port not excluded).
    pub captured: bool,
    /// The service whose VIP `dst` is, and the endpoint picked (another connection may get
    /// another endpoint: round robin).
    pub service: Option<String>,
    pub endpoint: Option<String>,
    pub dst_workload: Option<String>,
    pub dst_identity: Option<String>,
    /// `hbone`, `passthrough`, `waypoint`, `direct` (not captured), or `refused`.
    pub path: String,
    /// The inbound authorization at the destination, when the destination is a workload whose
    /// agent enforces policy (a mesh workload).
    pub authorization: Option<ExplainAuthz>,
    /// The decision overall: `allow` or `deny`.
    pub verdict: String,
    /// Each step of the reasoning, in order, for humans.
    pub steps: Vec<String>,
}

/// `ambitctl explain --dns NAME`: what the DNS proxy does with a name.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DnsExplain {
    pub name: String,
    /// The service whose hostname it is (`namespace/hostname`), when the mesh knows it.
    pub service: Option<String>,
    /// What the agent answers (its VIPs), when the mesh knows it.
    pub addresses: Vec<std::net::IpAddr>,
    /// `answered by the agent` or `forwarded to the pod's resolver`, and why.
    pub outcome: String,
    /// The node's `dns.capture` (a pod's annotation may override it).
    pub capture: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExplainAuthz {
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), or `None` when no policy applied.
    pub policy: Option<String>,
    /// The index of the rule that matched, when one did.
    pub rule: Option<usize>,
    /// The decision in words (what the access log says).
    pub reason: String,
    /// Dry-run policies that would have decided otherwise.
    pub dry_run: Vec<String>,
}

/// A pod as the container runtime describes it to the CNI plugin (`ambit-cni`), which forwards
/// it to the agent. Names and uid come from the runtime's `CNI_ARGS` (`K8S_POD_NAMESPACE`,
/// `K8S_POD_NAME`, `K8S_POD_UID`), the netns and IPs from the CNI call and the previous
/// plugins' result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CniPod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub uid: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: the pod's network namespace path (empty on a DEL after the netns is gone).
    #[serde(default)]
    pub netns: String,
    /// The pod's IPs from the previous plugins' result (on DEL too, when the runtime still has
    /// it).
    #[serde(default)]
    pub ips: Vec<String>,
}

/// The agent's answer to a CNI call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CniAnswer {
    /// The pod is captured now (ADD, CHECK) or was released (DEL).
    pub enrolled: bool,
    /// Why, in words (e.g. "namespace default is not labelled istio.io/dataplane-mode=ambient").
    pub reason: String,
}

/// What the agent leaves on disk for the CNI plugin when it cannot be reached: which namespaces
/// are in the mesh. An ADD for a pod of one of them fails while the agent is down (the kubelet
/// retries), so no pod of the mesh starts uncaptured; other pods start normally.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct CniState {
    /// Namespaces labelled `istio.io/dataplane-mode=ambient`.
    pub ambient_namespaces: Vec<String>,
    /// The agent's admin socket when it wrote this.
    pub socket: String,
}
