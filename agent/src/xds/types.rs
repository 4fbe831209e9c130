//! `istio.workload.Address` (a workload or a service) as plain, validated data. Conversion
//! refuses anything the agent could misread (an address that is neither 4 nor 16 bytes, a port
//! above 65535, an identity that is not a valid SPIFFE id, an enum value it does not know), with
//! an error naming the resource and the field, which the client sends back in its NACK.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ambit_proto::istio::workload::{
    self as pb, GatewayAddress, NetworkMode, Port, TunnelProtocol, WorkloadStatus, WorkloadType,
    address, gateway_address, load_balancing,
};

use super::Error;
use crate::{config::AppProtocol, identity::Identity, policy::Cidr};

/// The trust domain of a workload whose `trust_domain` is empty (the mesh default).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The service account of a workload whose `service_account` is empty.
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The cluster of a workload whose `cluster_id` is empty (istiod's default cluster name).
pub const DEFAULT_CLUSTER: &str = "Kubernetes";

/// One `istio.workload.Address` resource.
#[derive(Clone, Debug, PartialEq, Eq)]
// Transient (decoded, applied, dropped), and workloads are most resources: boxing them would add
// an allocation to each to save space on the rarer services.
#[allow(clippy::large_enum_variant)]
pub enum AddressResource {
    Workload(XdsWorkload),
    Service(XdsService),
}

/// A workload (pod, VM...) as istiod describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsWorkload {
    /// Globally unique id (istiod: `<cluster>//Pod/<namespace>/<name>`); the resource name.
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// Its addresses on its network (the network is ignored for now). Empty when the workload is
    /// reached by `hostname`, or only through its network's gateway (a `WorkloadEntry` with a
    /// network and no address): such workloads are known (by uid, identity, service) but are
    /// never an endpoint the data path picks.
    pub ips: Vec<IpAddr>,
    /// A DNS name, set instead of `ips` for workloads reached by name (not supported yet by the
    /// data path; kept so it can be reported).
    pub hostname: String,
    /// `spiffe://<trust_domain or cluster.local>/ns/<namespace>/sa/<service_account or default>`.
    pub identity: Identity,
    /// Tunnel protocol HBONE: the workload is in the mesh and is reached through 15008.
    pub hbone: bool,
    /// Host-network workload: its IP is shared, so it must not be looked up by IP.
    pub host_network: bool,
    /// The Kubernetes node it runs on.
    pub node: String,
    /// The services it backs, with its own port mappings.
    pub services: Vec<WorkloadService>,
    /// `namespace/name` of the workload-selector policies that apply to it.
    pub authorization_policies: Vec<String>,
    /// The waypoint traffic to it must go through (not enforced yet; kept for later).
    pub waypoint: Option<XdsGateway>,
    /// istiod's readiness of the workload (`status == HEALTHY`).
    pub healthy: bool,
    /// What Istio's metrics call the workload (the Deployment's name for its pods).
    pub workload_name: String,
    /// Telemetry and placement: canonical service and revision, cluster, network, locality.
    pub meta: WorkloadMeta,
}

/// What a workload is for telemetry and placement, as istiod describes it (shared by the many
/// pods of one Deployment, so the state keeps one copy per distinct value).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct WorkloadMeta {
    /// `service.istio.io/canonical-name` (else the `app` label, else the workload's name).
    pub canonical_name: String,
    /// `service.istio.io/canonical-revision` (else the `version` label, else `latest`).
    pub canonical_revision: String,
    /// Its cluster (`Kubernetes` when istiod leaves it empty, as ztunnel reads it).
    pub cluster_id: String,
    /// Its network; empty for the default network.
    pub network: String,
    pub region: String,
    pub zone: String,
    pub subzone: String,
    /// The owner's kind in lower case (`deployment`, `cronjob`, `pod`, `job`), for the
    /// `k8s.<kind>.name` baggage key.
    pub workload_type: &'static str,
}

/// A service a workload backs: one entry of the workload's `services` map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadService {
    /// The map key, `namespace/hostname`: also the service's xDS resource name.
    pub key: String,
    pub namespace: String,
    pub hostname: String,
    /// `(service_port, target_port)` for this workload. A `target_port` of 0 means "not
    /// overridden": use the service's target port (and if that is 0 too, the service port).
    pub ports: Vec<(u16, u16)>,
}

/// A service: a hostname and virtual IPs in front of the workloads that list it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsService {
    pub name: String,
    pub namespace: String,
    /// Fully qualified, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs (networks ignored for now). Empty for a headless service.
    pub vips: Vec<IpAddr>,
    /// Address blocks (a `ServiceEntry`'s `10.50.0.0/24`, `NetworkAddress.length` set): every
    /// address in one is this service's, unless an exact VIP or a longer block claims it.
    pub vip_ranges: Vec<Cidr>,
    /// `load_balancing.mode` PASSTHROUGH (istiod: a `ServiceEntry` with resolution NONE): no
    /// endpoint is picked, the connection goes to the address the client dialled.
    pub passthrough: bool,
    /// `(service_port, target_port)`. A `target_port` of 0 means "the same as the service port"
    /// unless the endpoint's own mapping ([`WorkloadService::ports`]) says otherwise.
    pub ports: Vec<(u16, u16)>,
    /// The service ports whose `app_protocol` istiod knows (UNKNOWN ones are left out).
    pub protocols: Vec<(u16, AppProtocol)>,
    /// Locality-aware endpoint selection (`load_balancing`), when istiod sets a mode that uses
    /// it (STRICT or FAILOVER) or allows unhealthy endpoints.
    pub load_balancing: Option<LoadBalancing>,
    /// The waypoint traffic to it must go through (not enforced yet; kept for later).
    pub waypoint: Option<XdsGateway>,
}

impl XdsService {
    /// `namespace/hostname`, the key workloads use for it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// How a service's endpoints are chosen for a client (istiod's `LoadBalancing`, as ztunnel reads
/// it): each endpoint is ranked by how many of `scopes`, in order, it shares with the client,
/// stopping at the first it does not.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LoadBalancing {
    pub scopes: Vec<Scope>,
    pub mode: LbMode,
    /// `health_policy: ALLOW_ALL` (istiod: `publishNotReadyAddresses`): unhealthy endpoints are
    /// candidates too.
    pub allow_unhealthy: bool,
}

/// A locality level traffic can be kept within.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Region => "REGION",
            Scope::Zone => "ZONE",
            Scope::Subzone => "SUBZONE",
            Scope::Node => "NODE",
            Scope::Cluster => "CLUSTER",
            Scope::Network => "NETWORK",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LbMode {
    /// Preferences ignored: every candidate endpoint.
    Standard,
    /// Only endpoints sharing every scope with the client; none is a refusal.
    Strict,
    /// The endpoints of the best rank there is (rank 0: any).
    Failover,
}

impl LbMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LbMode::Standard => "STANDARD",
            LbMode::Strict => "STRICT",
            LbMode::Failover => "FAILOVER",
        }
    }
}

/// A waypoint or gateway address, kept raw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct XdsGateway {
    pub destination: GatewayDestination,
    /// HBONE port, normally 15008.
    pub hbone_mtls_port: u16,
}

impl XdsGateway {
    /// The waypoint as operators name it: `ip:port`, or `namespace/hostname`.
    pub fn display_name(&self) -> String {
        match &self.destination {
            GatewayDestination::Address(ip) => {
                std::net::SocketAddr::new(*ip, self.hbone_mtls_port).to_string()
            }
            GatewayDestination::Hostname {
                namespace,
                hostname,
            } => format!("{namespace}/{hostname}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GatewayDestination {
    Address(IpAddr),
    /// A service, by namespace and hostname.
    Hostname {
        namespace: String,
        hostname: String,
    },
}

/// Converts and validates one decoded `Address` whose xDS resource name is `name` (used in
/// errors).
pub fn address_from_proto(name: &str, a: pb::Address) -> Result<AddressResource, Error> {
    match a.r#type {
        Some(address::Type::Workload(w)) => workload_from_proto(w).map(AddressResource::Workload),
        Some(address::Type::Service(s)) => service_from_proto(s).map(AddressResource::Service),
        None => Err(Error::Resource {
            resource: format!("address {name}"),
            why: "it is neither a workload nor a service (field `type` is not set)".to_owned(),
        }),
    }
}

fn workload_from_proto(w: pb::Workload) -> Result<XdsWorkload, Error> {
    let resource = format!("workload {}/{} (uid {:?})", w.namespace, w.name, w.uid);
    let bad = |why: String| Error::Resource {
        resource: resource.clone(),
        why,
    };
    if w.uid.is_empty() {
        return Err(bad("uid is empty".to_owned()));
    }
    let ips = w
        .addresses
        .iter()
        .enumerate()
        .map(|(i, b)| ip_from_bytes(b).map_err(|why| bad(format!("addresses[{i}] {why}"))))
        .collect::<Result<Vec<_>, _>>()?;
    // Neither addresses nor a hostname is valid: istiod's `workloadEntryWorkloadBuilder` makes
    // one from a WorkloadEntry that has only a network (reached through that network's gateway),
    // and ztunnel accepts it. It is kept and never picked as an endpoint.
    let trust_domain = if w.trust_domain.is_empty() {
        DEFAULT_TRUST_DOMAIN
    } else {
        &w.trust_domain
    };
    let service_account = if w.service_account.is_empty() {
        DEFAULT_SERVICE_ACCOUNT
    } else {
        &w.service_account
    };
    let identity = Identity::new(trust_domain, &w.namespace, service_account).map_err(|e| {
        bad(format!(
            "trust_domain, namespace and service_account do not make a valid identity: {e}"
        ))
    })?;
    let hbone = match TunnelProtocol::try_from(w.tunnel_protocol) {
        Ok(TunnelProtocol::Hbone) => true,
        // A sidecar workload: Ambit (like ztunnel) does not originate Istio's legacy mTLS, so it
        // is reached as a workload outside the ambient mesh.
        Ok(TunnelProtocol::None | TunnelProtocol::LegacyIstioMtls) => false,
        Err(_) => {
            return Err(bad(format!(
                "tunnel_protocol {} is not NONE, HBONE or LEGACY_ISTIO_MTLS",
                w.tunnel_protocol
            )));
        }
    };
    let host_network = match NetworkMode::try_from(w.network_mode) {
        Ok(NetworkMode::HostNetwork) => true,
        Ok(NetworkMode::Standard) => false,
        Err(_) => {
            return Err(bad(format!(
                "network_mode {} is not STANDARD or HOST_NETWORK",
                w.network_mode
            )));
        }
    };
    let healthy = match WorkloadStatus::try_from(w.status) {
        Ok(WorkloadStatus::Healthy) => true,
        Ok(WorkloadStatus::Unhealthy) => false,
        Err(_) => {
            return Err(bad(format!(
                "status {} is not HEALTHY or UNHEALTHY",
                w.status
            )));
        }
    };
    // Sorted by key: the proto map has no order, and equal input should give equal state.
    let mut services = w
        .services
        .into_iter()
        .map(|(key, list)| {
            let Some((namespace, hostname)) = key
                .split_once('/')
                .filter(|(ns, host)| !ns.is_empty() && !host.is_empty())
            else {
                return Err(bad(format!(
                    "services key {key:?} is not namespace/hostname"
                )));
            };
            let ports =
                ports(&list.ports).map_err(|why| bad(format!("services[{key:?}].ports: {why}")))?;
            Ok(WorkloadService {
                namespace: namespace.to_owned(),
                hostname: hostname.to_owned(),
                key,
                ports,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    services.sort_by(|a, b| a.key.cmp(&b.key));
    let waypoint = w
        .waypoint
        .map(|g| gateway(g).map_err(|why| bad(format!("waypoint: {why}"))))
        .transpose()?;
    // Istio's `workload` metric label: the owner (a Deployment's name), else the canonical name,
    // else the pod's own.
    let workload_name = [&w.workload_name, &w.canonical_name, &w.name]
        .into_iter()
        .find(|n| !n.is_empty())
        .cloned()
        .unwrap_or_default();
    let locality = w.locality.unwrap_or_default();
    let meta = WorkloadMeta {
        canonical_name: w.canonical_name,
        canonical_revision: w.canonical_revision,
        cluster_id: if w.cluster_id.is_empty() {
            DEFAULT_CLUSTER.to_owned()
        } else {
            w.cluster_id
        },
        network: w.network,
        region: locality.region,
        zone: locality.zone,
        subzone: locality.subzone,
        // Telemetry only: an unknown kind reads as a Deployment, as ztunnel's getter does.
        workload_type: match WorkloadType::try_from(w.workload_type) {
            Ok(WorkloadType::Cronjob) => "cronjob",
            Ok(WorkloadType::Pod) => "pod",
            Ok(WorkloadType::Job) => "job",
            Ok(WorkloadType::Deployment) | Err(_) => "deployment",
        },
    };
    Ok(XdsWorkload {
        meta,
        workload_name,
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        ips,
        hostname: w.hostname,
        identity,
        hbone,
        host_network,
        node: w.node,
        services,
        authorization_policies: w.authorization_policies,
        waypoint,
        healthy,
    })
}

fn service_from_proto(s: pb::Service) -> Result<XdsService, Error> {
    let resource = format!("service {}/{}", s.namespace, s.hostname);
    let bad = |why: String| Error::Resource {
        resource: resource.clone(),
        why,
    };
    if s.namespace.is_empty() {
        return Err(bad("namespace is empty".to_owned()));
    }
    if s.hostname.is_empty() {
        return Err(bad("hostname is empty".to_owned()));
    }
    let mut vips = Vec::new();
    let mut vip_ranges = Vec::new();
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_from_bytes(&a.address).map_err(|why| bad(format!("addresses[{i}] {why}")))?;
        let host_len = if ip.is_ipv4() { 32 } else { 128 };
        match a.length {
            None => vips.push(ip),
            Some(len) if len == host_len => vips.push(ip),
            Some(len) => {
                let range = u8::try_from(len)
                    .ok()
                    .and_then(|len| Cidr::new(ip, len).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "addresses[{i}].length {len} is not a prefix length for {ip}"
                        ))
                    })?;
                vip_ranges.push(range);
            }
        }
    }
    // An unknown mode or health policy reads as unset (ztunnel's getters); an unknown or
    // unspecified scope refuses the service, as ztunnel's conversion does.
    let passthrough = s
        .load_balancing
        .as_ref()
        .is_some_and(|lb| lb.mode == load_balancing::Mode::Passthrough as i32);
    let load_balancing = match &s.load_balancing {
        None => None,
        Some(lb) => {
            let scopes = lb
                .routing_preference
                .iter()
                .enumerate()
                .map(|(i, v)| match load_balancing::Scope::try_from(*v) {
                    Ok(load_balancing::Scope::Region) => Ok(Scope::Region),
                    Ok(load_balancing::Scope::Zone) => Ok(Scope::Zone),
                    Ok(load_balancing::Scope::Subzone) => Ok(Scope::Subzone),
                    Ok(load_balancing::Scope::Node) => Ok(Scope::Node),
                    Ok(load_balancing::Scope::Cluster) => Ok(Scope::Cluster),
                    Ok(load_balancing::Scope::Network) => Ok(Scope::Network),
                    _ => Err(bad(format!(
                        "load_balancing.routing_preference[{i}] {v} is not a scope"
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let mode = match lb.mode() {
                load_balancing::Mode::Strict => LbMode::Strict,
                load_balancing::Mode::Failover => LbMode::Failover,
                load_balancing::Mode::UnspecifiedMode | load_balancing::Mode::Passthrough => {
                    LbMode::Standard
                }
            };
            let allow_unhealthy = lb.health_policy() == load_balancing::HealthPolicy::AllowAll;
            (mode != LbMode::Standard || allow_unhealthy).then_some(LoadBalancing {
                scopes,
                mode,
                allow_unhealthy,
            })
        }
    };
    let ports = ports(&s.ports).map_err(|why| bad(format!("ports: {why}")))?;
    // An unknown value (a newer istiod's) is read as UNKNOWN: the waypoint then decides by the
    // request, as without it.
    let protocols = s
        .ports
        .iter()
        .filter_map(|p| {
            let proto = match pb::AppProtocol::try_from(p.app_protocol).ok()? {
                pb::AppProtocol::Http11 => AppProtocol::Http,
                pb::AppProtocol::Http2 => AppProtocol::Http2,
                pb::AppProtocol::Grpc => AppProtocol::Grpc,
                pb::AppProtocol::Tcp => AppProtocol::Tcp,
                pb::AppProtocol::Tls => AppProtocol::Tls,
                pb::AppProtocol::Unknown => return None,
            };
            Some((u16::try_from(p.service_port).ok()?, proto))
        })
        .collect();
    let waypoint = s
        .waypoint
        .map(|g| gateway(g).map_err(|why| bad(format!("waypoint: {why}"))))
        .transpose()?;
    Ok(XdsService {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        vips,
        vip_ranges,
        passthrough,
        ports,
        protocols,
        load_balancing,
        waypoint,
    })
}

/// 4 or 16 raw bytes. The error completes "addresses[i] ...".
pub(super) fn ip_from_bytes(b: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(b) {
        Ok(IpAddr::V4(Ipv4Addr::from(v4)))
    } else if let Ok(v6) = <[u8; 16]>::try_from(b) {
        Ok(IpAddr::V6(Ipv6Addr::from(v6)))
    } else {
        Err(format!("is {} bytes, not 4 or 16", b.len()))
    }
}

pub(super) fn port(p: u32) -> Result<u16, String> {
    u16::try_from(p).map_err(|_| format!("{p} is not a port (at most 65535)"))
}

fn ports(list: &[Port]) -> Result<Vec<(u16, u16)>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| {
            let service_port =
                port(p.service_port).map_err(|why| format!("[{i}].service_port {why}"))?;
            if service_port == 0 {
                return Err(format!("[{i}].service_port is 0"));
            }
            let target_port =
                port(p.target_port).map_err(|why| format!("[{i}].target_port {why}"))?;
            Ok((service_port, target_port))
        })
        .collect()
}

fn gateway(g: GatewayAddress) -> Result<XdsGateway, String> {
    let destination = match g.destination {
        Some(gateway_address::Destination::Address(a)) => GatewayDestination::Address(
            ip_from_bytes(&a.address).map_err(|why| format!("address {why}"))?,
        ),
        Some(gateway_address::Destination::Hostname(h)) => GatewayDestination::Hostname {
            namespace: h.namespace,
            hostname: h.hostname,
        },
        None => return Err("destination is not set".to_owned()),
    };
    let hbone_mtls_port =
        port(g.hbone_mtls_port).map_err(|why| format!("hbone_mtls_port {why}"))?;
    Ok(XdsGateway {
        destination,
        hbone_mtls_port,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ambit_proto::istio::workload::{NetworkAddress, PortList, Service, Workload};

    use super::*;

    fn workload() -> Workload {
        Workload {
            uid: "Kubernetes//Pod/default/sleep-1".into(),
            name: "sleep-1".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 0, 0, 7]],
            tunnel_protocol: TunnelProtocol::Hbone.into(),
            service_account: "sleep".into(),
            node: "node-a".into(),
            services: HashMap::from([(
                "default/echo.default.svc.cluster.local".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: 8080,
                        app_protocol: 0,
                    }],
                },
            )]),
            authorization_policies: vec!["default/allow".into()],
            ..Default::default()
        }
    }

    fn wrap(w: Workload) -> pb::Address {
        pb::Address {
            r#type: Some(address::Type::Workload(w)),
        }
    }

    #[test]
    fn converts_a_workload_with_defaults() {
        let AddressResource::Workload(w) =
            address_from_proto("x", wrap(workload())).expect("valid")
        else {
            panic!("not a workload");
        };
        assert_eq!(w.uid, "Kubernetes//Pod/default/sleep-1");
        assert_eq!(w.ips, vec![IpAddr::from([10, 0, 0, 7])]);
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert!(w.hbone && w.healthy && !w.host_network);
        assert_eq!(w.services.len(), 1);
        assert_eq!(w.services[0].namespace, "default");
        assert_eq!(w.services[0].hostname, "echo.default.svc.cluster.local");
        assert_eq!(w.services[0].ports, vec![(80, 8080)]);
        assert_eq!(w.authorization_policies, vec!["default/allow"]);

        let mut pw = workload();
        pw.service_account.clear();
        pw.trust_domain = "example.org".into();
        pw.tunnel_protocol = TunnelProtocol::None.into();
        pw.status = WorkloadStatus::Unhealthy.into();
        pw.addresses.push(vec![0xfd; 16]);
        let AddressResource::Workload(w) = address_from_proto("x", wrap(pw)).expect("valid") else {
            panic!("not a workload");
        };
        assert_eq!(
            w.identity.to_string(),
            "spiffe://example.org/ns/default/sa/default"
        );
        assert!(!w.hbone && !w.healthy);
        assert_eq!(w.ips.len(), 2);
    }

    #[test]
    fn converts_a_service() {
        let s = Service {
            name: "echo".into(),
            namespace: "default".into(),
            hostname: "echo.default.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 0, 1],
                length: None,
            }],
            ports: vec![
                Port {
                    service_port: 80,
                    target_port: 0,
                    app_protocol: 0,
                },
                Port {
                    service_port: 9090,
                    target_port: 0,
                    app_protocol: pb::AppProtocol::Grpc.into(),
                },
                // A newer istiod's value: read as UNKNOWN.
                Port {
                    service_port: 9091,
                    target_port: 0,
                    app_protocol: 42,
                },
            ],
            ..Default::default()
        };
        let a = pb::Address {
            r#type: Some(address::Type::Service(s)),
        };
        let AddressResource::Service(s) = address_from_proto("x", a).expect("valid") else {
            panic!("not a service");
        };
        assert_eq!(s.vips, vec![IpAddr::from([10, 96, 0, 1])]);
        assert_eq!(s.ports, vec![(80, 0), (9090, 0), (9091, 0)]);
        assert_eq!(s.protocols, vec![(9090, AppProtocol::Grpc)]);
        assert_eq!(s.key(), "default/echo.default.svc.cluster.local");
    }

    /// The shapes istiod's ambient index builds (pilot/pkg/serviceregistry/kube/controller/
    /// ambient/), each accepted as ztunnel's `TryFrom<XdsWorkload>` / `TryFrom<&XdsService>` do.
    #[test]
    fn accepts_every_shape_istiod_sends() {
        let convert = |w: Workload| match address_from_proto("x", wrap(w)) {
            Ok(AddressResource::Workload(w)) => w,
            other => panic!("not a workload: {other:?}"),
        };
        // `workloadEntryWorkloadBuilder` with a WorkloadEntry that has only a network: no
        // addresses, no hostname, reached through the network's gateway.
        let mut w = workload();
        w.addresses.clear();
        w.network = "remote".into();
        w.network_gateway = Some(GatewayAddress {
            destination: Some(gateway_address::Destination::Address(pb::NetworkAddress {
                network: "remote".into(),
                address: vec![192, 0, 2, 1],
                length: None,
            })),
            hbone_mtls_port: 15008,
        });
        let x = convert(w);
        assert!(x.ips.is_empty() && x.hostname.is_empty());
        assert_eq!(x.meta.network, "remote");
        // `serviceEntryWorkloadBuilder` for a DNS ServiceEntry without endpoints: hostname only.
        let mut w = workload();
        w.addresses.clear();
        w.hostname = "api.example.com".into();
        assert_eq!(convert(w).hostname, "api.example.com");
        // A sidecar pod (LEGACY_ISTIO_MTLS): reached as a workload outside the ambient mesh.
        let mut w = workload();
        w.tunnel_protocol = TunnelProtocol::LegacyIstioMtls.into();
        assert!(!convert(w).hbone);
        // Telemetry fields: copied; an empty cluster is istiod's default; an unknown owner kind
        // is a Deployment (telemetry only, as ztunnel's getter reads it).
        let mut w = workload();
        w.canonical_name = "sleep".into();
        w.canonical_revision = "v1".into();
        w.workload_type = 99;
        w.locality = Some(pb::Locality {
            region: "eu".into(),
            zone: "eu-1a".into(),
            subzone: String::new(),
        });
        let m = convert(w).meta;
        assert_eq!(
            (&*m.canonical_name, &*m.canonical_revision, &*m.cluster_id),
            ("sleep", "v1", DEFAULT_CLUSTER)
        );
        assert_eq!(
            (&*m.region, &*m.zone, m.workload_type),
            ("eu", "eu-1a", "deployment")
        );
        let mut w = workload();
        w.cluster_id = "east".into();
        w.workload_type = WorkloadType::Job.into();
        let m = convert(w).meta;
        assert_eq!((&*m.cluster_id, m.workload_type), ("east", "job"));
    }

    /// istiod's `toNetworkAddressFromCidr`: a ServiceEntry's `10.50.0.0/24` is the block's
    /// address with `length` 24; a single address has no length (or 32 / 128).
    #[test]
    fn service_addresses_with_a_length_are_blocks() {
        let na = |address: Vec<u8>, length: Option<u32>| NetworkAddress {
            network: String::new(),
            address,
            length,
        };
        let convert = |addresses: Vec<NetworkAddress>, mode: load_balancing::Mode| {
            let s = Service {
                name: "ext".into(),
                namespace: "default".into(),
                hostname: "ext.example.com".into(),
                addresses,
                load_balancing: Some(pb::LoadBalancing {
                    mode: mode.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            address_from_proto(
                "x",
                pb::Address {
                    r#type: Some(address::Type::Service(s)),
                },
            )
        };
        let Ok(AddressResource::Service(s)) = convert(
            vec![
                na(vec![10, 50, 0, 0], Some(24)),
                na(vec![10, 60, 0, 1], Some(32)),
                na(vec![10, 70, 0, 1], None),
                na(vec![0xfd; 16], Some(64)),
            ],
            load_balancing::Mode::Passthrough,
        ) else {
            panic!("valid");
        };
        assert_eq!(
            s.vips,
            vec![IpAddr::from([10, 60, 0, 1]), IpAddr::from([10, 70, 0, 1])]
        );
        assert_eq!(
            s.vip_ranges
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["10.50.0.0/24", "fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd:fdfd/64"]
        );
        assert!(s.passthrough);
        let Ok(AddressResource::Service(s)) = convert(vec![], load_balancing::Mode::Failover)
        else {
            panic!("valid");
        };
        assert!(!s.passthrough);
        let e = convert(
            vec![na(vec![10, 0, 0, 0], Some(33))],
            load_balancing::Mode::Strict,
        )
        .expect_err("a /33")
        .to_string();
        assert!(e.contains("addresses[0].length 33"), "{e}");
    }

    /// istiod's `preferSameZoneLoadBalancer` ([NETWORK, REGION, ZONE], FAILOVER) and
    /// `internalTrafficPolicy: Local` ([NODE], STRICT) as ztunnel reads them.
    #[test]
    fn load_balancing_is_read_as_ztunnel_reads_it() {
        use load_balancing::{HealthPolicy, Mode, Scope as S};
        let convert = |prefs: Vec<S>, mode: i32, health: HealthPolicy| {
            let s = Service {
                name: "web".into(),
                namespace: "default".into(),
                hostname: "web.default.svc.cluster.local".into(),
                load_balancing: Some(pb::LoadBalancing {
                    routing_preference: prefs.into_iter().map(i32::from).collect(),
                    mode,
                    health_policy: health.into(),
                    ..Default::default()
                }),
                ..Default::default()
            };
            match address_from_proto(
                "x",
                pb::Address {
                    r#type: Some(address::Type::Service(s)),
                },
            ) {
                Ok(AddressResource::Service(s)) => Ok(s.load_balancing),
                Ok(other) => panic!("{other:?}"),
                Err(e) => Err(e.to_string()),
            }
        };
        let zone = convert(
            vec![S::Network, S::Region, S::Zone],
            Mode::Failover.into(),
            HealthPolicy::OnlyHealthy,
        )
        .expect("valid")
        .expect("locality");
        assert_eq!(
            zone.scopes,
            vec![Scope::Network, Scope::Region, Scope::Zone]
        );
        assert_eq!(zone.mode, LbMode::Failover);
        let local = convert(
            vec![S::Node],
            Mode::Strict.into(),
            HealthPolicy::OnlyHealthy,
        )
        .expect("valid")
        .expect("locality");
        assert_eq!(
            (local.scopes, local.mode),
            (vec![Scope::Node], LbMode::Strict)
        );
        // `publishNotReadyAddresses`: no mode, unhealthy endpoints allowed.
        let all = convert(vec![], 0, HealthPolicy::AllowAll)
            .expect("valid")
            .expect("kept");
        assert!(all.allow_unhealthy && all.mode == LbMode::Standard);
        // An unknown mode reads as unset; nothing left to do.
        assert_eq!(
            convert(vec![S::Zone], 9, HealthPolicy::OnlyHealthy),
            Ok(None)
        );
        let e = convert(
            vec![S::UnspecifiedScope],
            Mode::Failover.into(),
            HealthPolicy::OnlyHealthy,
        )
        .expect_err("unspecified scope");
        assert!(e.contains("routing_preference[0] 0 is not a scope"), "{e}");
    }

    #[test]
    fn errors_name_the_resource_and_field() {
        let mut cases: Vec<(Workload, &str)> = Vec::new();
        let mut w = workload();
        w.addresses.push(vec![1, 2, 3, 4, 5]);
        cases.push((w, "addresses[1] is 5 bytes, not 4 or 16"));
        let mut w = workload();
        w.uid.clear();
        cases.push((w, "uid is empty"));
        let mut w = workload();
        w.namespace = "Default".into();
        cases.push((w, "namespace"));
        let mut w = workload();
        w.tunnel_protocol = 7;
        cases.push((w, "tunnel_protocol 7"));
        let mut w = workload();
        w.services.insert(
            "default/bad".into(),
            PortList {
                ports: vec![Port {
                    service_port: 70000,
                    target_port: 1,
                    app_protocol: 0,
                }],
            },
        );
        cases.push((w, "services[\"default/bad\"].ports: [0].service_port 70000"));
        let mut w = workload();
        w.services.insert("nohost".into(), PortList::default());
        cases.push((w, "\"nohost\" is not namespace/hostname"));
        for (w, want) in cases {
            let e = address_from_proto("x", wrap(w))
                .expect_err(want)
                .to_string();
            assert!(
                e.starts_with("workload default/sleep-1 (uid ")
                    || e.starts_with("workload Default/sleep-1 (uid "),
                "{e}"
            );
            assert!(e.contains(want), "want {want:?} in {e}");
        }
        let e = address_from_proto("n", pb::Address { r#type: None })
            .expect_err("empty")
            .to_string();
        assert!(e.contains("address n") && e.contains("neither"), "{e}");
    }
}
