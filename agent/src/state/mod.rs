//! What the agent knows about workloads and services: who is at an IP, which identity it has,
//! whether it is reached through HBONE, which workloads back a service VIP. Read by the data path
//! as one consistent [`Snapshot`], without locks; written only by [`StateWriter`].
//!
//! ```text
//! local config ──┐                      ┌─> StateStore (ArcSwap<Snapshot>) ──> data path, admin API
//!                ├─> StateWriter (1 writer) ┤
//! xDS pushes ────┘                      └─> PolicyStore (when policies change)
//! ```
//!
//! A workload is built once, as an `Arc<Workload>`, when its resource arrives; every index of
//! the snapshot shares it. An xDS push clones the indexes (pointers only), applies the change to
//! the workloads and services it touches, and publishes the result: its cost grows with the push,
//! not with the mesh (beyond copying pointers). Strings and lists that many workloads share
//! (namespaces, nodes, identities, the services a deployment's pods back) are interned.
//!
//! Where the local config and xDS describe the same IP or VIP, the local config wins (it knows
//! the pod's netns; xDS only describes it).

mod sources;

use std::{
    borrow::Borrow,
    collections::{HashMap, HashSet},
    hash::{Hash, Hasher},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;

pub use sources::StateWriter;

use crate::{
    identity::Identity,
    policy::Cidr,
    xds::{LbMode, LoadBalancing, Scope, WorkloadMeta, XdsGateway},
};

/// Where a client runs, for locality-aware load balancing: its node and (from istiod) its
/// region, zone, subzone, cluster and network.
#[derive(Clone, Copy, Debug)]
pub struct Near<'a> {
    pub node: &'a str,
    pub meta: &'a WorkloadMeta,
}

/// An endpoint chosen for a connection.
#[derive(Clone, Debug)]
pub struct Picked {
    pub workload: Arc<Workload>,
    /// Its address and port for the service port asked for.
    pub addr: SocketAddr,
    /// With locality-aware load balancing: the mode, the scopes it shares with the client (in
    /// order) out of those preferred, e.g. `FAILOVER NETWORK,REGION (2 of 3)`.
    pub why: Option<String>,
}

/// Where a workload or service definition came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    Config,
    Xds,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Config => "config",
            Source::Xds => "xds",
        }
    }
}

/// A service a workload backs, with the workload's own port mapping for it.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct ServiceRef {
    /// `namespace/hostname`.
    pub key: Arc<str>,
    /// `(service_port, target_port)` on this workload; a target of 0 defers to the service.
    pub ports: Box<[(u16, u16)]>,
}

/// One workload.
#[derive(Debug)]
pub struct Workload {
    /// The uid, followed by the name unless the name is the uid's last `/` segment (istiod's
    /// uids end with the pod name, so usually one string holds both).
    ids: Box<str>,
    uid_len: u32,
    name_start: u32,
    pub namespace: Arc<str>,
    pub identity: Identity,
    /// The node it runs on (empty when unknown).
    pub node: Arc<str>,
    /// Istio's `workload` metric label: the owner's name (a Deployment), else the pod's.
    pub workload_name: Arc<str>,
    /// Canonical service and revision, cluster, network, locality (one copy per distinct value).
    pub meta: Arc<WorkloadMeta>,
    ips: Ips,
    /// Services it backs.
    pub services: Arc<[ServiceRef]>,
    /// Workload-selector authorization policies that name it (`namespace/name`).
    pub policies: Arc<[Arc<str>]>,
    /// The waypoint its traffic must go through.
    pub waypoint: Option<Arc<XdsGateway>>,
    /// Reached through HBONE (its node runs a mesh agent and it is enrolled).
    pub hbone: bool,
    /// On this node.
    pub local: bool,
    /// Receives traffic (xDS status); unhealthy workloads are skipped as service endpoints.
    pub healthy: bool,
    /// Shares its node's network (not indexed by IP).
    pub host_network: bool,
    pub source: Source,
}

/// Most workloads have one address (two when dual-stack): kept inline when there is one.
#[derive(Debug)]
enum Ips {
    One(IpAddr),
    Many(Box<[IpAddr]>),
}

/// What a [`Workload`] is made of, before it is built.
pub struct WorkloadFields {
    pub uid: String,
    /// Empty when unknown.
    pub name: String,
    pub namespace: Arc<str>,
    pub identity: Identity,
    pub node: Arc<str>,
    pub workload_name: Arc<str>,
    pub meta: Arc<WorkloadMeta>,
    pub ips: Vec<IpAddr>,
    pub services: Arc<[ServiceRef]>,
    pub policies: Arc<[Arc<str>]>,
    pub waypoint: Option<Arc<XdsGateway>>,
    pub hbone: bool,
    pub local: bool,
    pub healthy: bool,
    pub host_network: bool,
    pub source: Source,
}

impl Workload {
    pub fn new(f: WorkloadFields) -> Workload {
        let uid_len = f.uid.len();
        let (ids, name_start) = if !f.name.is_empty()
            && f.uid.ends_with(f.name.as_str())
            && f.uid[..uid_len - f.name.len()].ends_with('/')
        {
            (f.uid.into_boxed_str(), uid_len - f.name.len())
        } else {
            let mut s = f.uid;
            s.push_str(&f.name);
            (s.into_boxed_str(), uid_len)
        };
        let ips = match f.ips.as_slice() {
            [one] => Ips::One(*one),
            _ => Ips::Many(f.ips.into_boxed_slice()),
        };
        Workload {
            ids,
            // Resource names and Kubernetes names are far below 4 GiB.
            uid_len: u32::try_from(uid_len).unwrap_or(u32::MAX),
            name_start: u32::try_from(name_start).unwrap_or(u32::MAX),
            namespace: f.namespace,
            identity: f.identity,
            node: f.node,
            workload_name: f.workload_name,
            meta: f.meta,
            ips,
            services: f.services,
            policies: f.policies,
            waypoint: f.waypoint,
            hbone: f.hbone,
            local: f.local,
            healthy: f.healthy,
            host_network: f.host_network,
            source: f.source,
        }
    }

    /// Globally unique: the xDS uid, or `config//Pod/<ns>/<name>` for a pod from the config.
    pub fn uid(&self) -> &str {
        &self.ids[..self.uid_len as usize]
    }

    /// The pod's name; empty when unknown (a config `peers` entry without one).
    pub fn name(&self) -> &str {
        let start = self.name_start as usize;
        let end = if start < self.uid_len as usize {
            self.uid_len as usize
        } else {
            self.ids.len()
        };
        &self.ids[start..end]
    }

    pub fn ips(&self) -> &[IpAddr] {
        match &self.ips {
            Ips::One(ip) => std::slice::from_ref(ip),
            Ips::Many(ips) => ips,
        }
    }

    /// `namespace/name`, or the namespace and service account when the name is unknown.
    pub fn display_name(&self) -> String {
        match self.name() {
            "" => format!("{}/({})", self.namespace, self.identity.service_account()),
            n => format!("{}/{}", self.namespace, n),
        }
    }

    /// Whether it backs the service `key`.
    pub fn backs(&self, key: &str) -> bool {
        self.services.iter().any(|s| &*s.key == key)
    }

    /// The port this workload serves service `key`'s `port` on, if it maps it itself.
    fn own_target_port(&self, key: &str, port: u16) -> Option<u16> {
        self.services
            .iter()
            .find(|s| &*s.key == key)?
            .ports
            .iter()
            .find(|(p, t)| *p == port && *t != 0)
            .map(|(_, t)| *t)
    }
}

/// A workload in a set keyed by its uid.
#[derive(Clone, Debug)]
struct ByUid(Arc<Workload>);

impl PartialEq for ByUid {
    fn eq(&self, other: &ByUid) -> bool {
        self.0.uid() == other.0.uid()
    }
}

impl Eq for ByUid {}

impl Hash for ByUid {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.uid().hash(h)
    }
}

impl Borrow<str> for ByUid {
    fn borrow(&self) -> &str {
        self.0.uid()
    }
}

/// A service's definition (from a `Service` resource or the config's `services`).
#[derive(Debug, PartialEq, Eq)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    /// Fully qualified, e.g. `echo.default.svc.cluster.local`.
    pub hostname: String,
    pub vips: Vec<IpAddr>,
    /// Address blocks that are the service's too (an exact VIP or a longer block wins).
    pub vip_ranges: Vec<Cidr>,
    /// No endpoint is picked: connections go to the address dialled (istiod's PASSTHROUGH).
    pub passthrough: bool,
    /// `(service_port, target_port)`; a target of 0 means the endpoint's own mapping, or else
    /// the service port.
    pub ports: Vec<(u16, u16)>,
    /// What the ports speak, where known (`app_protocol` / `appProtocol`).
    pub protocols: Vec<(u16, crate::config::AppProtocol)>,
    /// Locality-aware endpoint selection; `None`: round robin over the healthy endpoints.
    pub load_balancing: Option<LoadBalancing>,
    pub waypoint: Option<XdsGateway>,
    pub source: Source,
}

impl ServiceDef {
    /// What service port `port` speaks, if declared.
    pub fn protocol(&self, port: u16) -> Option<crate::config::AppProtocol> {
        self.protocols
            .iter()
            .find(|(p, _)| *p == port)
            .map(|(_, a)| *a)
    }

    /// `namespace/hostname`, the key workloads use for it.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}

/// A service: its definition (when one is known) and the workloads that back it.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/hostname`.
    pub key: Arc<str>,
    /// `None` for a service only named by workloads (no VIPs, no ports).
    pub def: Option<Arc<ServiceDef>>,
    /// One entry per workload, ordered by address.
    pub endpoints: Box<[Arc<Workload>]>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl ServiceEntry {
    /// Whether the service has `port`.
    pub fn has_port(&self, port: u16) -> bool {
        self.def
            .as_ref()
            .is_some_and(|d| d.ports.iter().any(|(p, _)| *p == port))
    }

    /// The next healthy endpoint, round robin, with an address of `like`'s family, and the
    /// address and port to reach it on for the service's `port`: the endpoint's own mapping,
    /// else the service's target port, else `port` itself.
    pub fn pick(&self, like: IpAddr, port: u16) -> Option<(Arc<Workload>, SocketAddr)> {
        self.pick_from(self.next.fetch_add(1, Ordering::Relaxed), like, port)
    }

    /// What [`ServiceEntry::pick`] would answer now, without moving the cursor (for `explain`).
    pub fn peek(&self, like: IpAddr, port: u16) -> Option<(Arc<Workload>, SocketAddr)> {
        self.pick_from(self.next.load(Ordering::Relaxed), like, port)
    }

    /// The endpoint for a connection from a client at `near` (unknown: no locality), as
    /// ztunnel's `load_balance` chooses: with the service's locality preferences, only the
    /// endpoints of the best rank (FAILOVER) or of the full rank (STRICT; none is `None`), round
    /// robin among them; without, [`ServiceEntry::pick`]. `peek`: do not move the cursor.
    pub fn pick_near(
        &self,
        near: Option<Near<'_>>,
        like: IpAddr,
        port: u16,
        peek: bool,
    ) -> Option<Picked> {
        let start = if peek {
            self.next.load(Ordering::Relaxed)
        } else {
            self.next.fetch_add(1, Ordering::Relaxed)
        };
        let lb = self.def.as_ref().and_then(|d| d.load_balancing.as_ref());
        let Some(lb) = lb else {
            let (workload, addr) = self.pick_from(start, like, port)?;
            return Some(Picked {
                workload,
                addr,
                why: None,
            });
        };
        let rank = |w: &Workload| match near {
            Some(c) => lb.scopes.iter().take_while(|s| shares(**s, c, w)).count(),
            None => 0,
        };
        let eligible = |w: &Arc<Workload>| {
            let t = self.target_in(w, like, port, lb.allow_unhealthy)?;
            Some((rank(w), t))
        };
        let ranked: Vec<(usize, SocketAddr, &Arc<Workload>)> = self
            .endpoints
            .iter()
            .filter_map(|w| eligible(w).map(|(r, a)| (r, a, w)))
            .collect();
        let want = match lb.mode {
            LbMode::Standard => 0,
            LbMode::Strict => lb.scopes.len(),
            LbMode::Failover => ranked.iter().map(|(r, _, _)| *r).max()?,
        };
        let best: Vec<&(usize, SocketAddr, &Arc<Workload>)> = ranked
            .iter()
            .filter(|(r, _, _)| lb.mode == LbMode::Standard || *r == want)
            .collect();
        let (r, addr, w) = best.get(start % best.len().max(1))?;
        let shared: Vec<&str> = lb.scopes[..*r].iter().map(|s| s.as_str()).collect();
        Some(Picked {
            workload: (*w).clone(),
            addr: *addr,
            why: Some(format!(
                "{} {} ({r} of {} preferred scopes shared)",
                lb.mode.as_str(),
                if shared.is_empty() {
                    "-".to_owned()
                } else {
                    shared.join(",")
                },
                lb.scopes.len()
            )),
        })
    }

    fn pick_from(
        &self,
        start: usize,
        like: IpAddr,
        port: u16,
    ) -> Option<(Arc<Workload>, SocketAddr)> {
        let n = self.endpoints.len();
        (0..n).find_map(|i| self.target_of(&self.endpoints[(start + i) % n], like, port))
    }

    /// Every healthy endpoint with an address of `like`'s family, with the address to reach it
    /// on for the service's `port` (for callers that choose themselves, like the waypoint).
    pub fn candidates(
        &self,
        like: IpAddr,
        port: u16,
    ) -> impl Iterator<Item = (Arc<Workload>, SocketAddr)> + '_ {
        self.endpoints
            .iter()
            .filter_map(move |w| self.target_of(w, like, port))
    }

    fn target_of(
        &self,
        w: &Arc<Workload>,
        like: IpAddr,
        port: u16,
    ) -> Option<(Arc<Workload>, SocketAddr)> {
        self.target_in(w, like, port, false).map(|a| (w.clone(), a))
    }

    /// Where `w` serves the service's `port`, if it is a candidate (healthy, unless
    /// `allow_unhealthy`; an address of `like`'s family).
    fn target_in(
        &self,
        w: &Workload,
        like: IpAddr,
        port: u16,
        allow_unhealthy: bool,
    ) -> Option<SocketAddr> {
        if !w.healthy && !allow_unhealthy {
            return None;
        }
        let ip = w.ips().iter().find(|ip| ip.is_ipv4() == like.is_ipv4())?;
        let target = w
            .own_target_port(&self.key, port)
            .or_else(|| {
                let d = self.def.as_ref()?;
                let (_, t) = d.ports.iter().find(|(p, _)| *p == port)?;
                (*t != 0).then_some(*t)
            })
            .unwrap_or(port);
        Some(SocketAddr::new(*ip, target))
    }
}

/// Whether endpoint `w` is in the same `scope` as the client at `c` (plain comparisons, as
/// ztunnel's: a ZONE counts only after REGION because the ranking stops at the first miss).
fn shares(scope: Scope, c: Near<'_>, w: &Workload) -> bool {
    let (a, b) = (c.meta, &*w.meta);
    match scope {
        Scope::Region => a.region == b.region,
        Scope::Zone => a.zone == b.zone,
        Scope::Subzone => a.subzone == b.subzone,
        Scope::Node => c.node == &*w.node,
        Scope::Cluster => a.cluster_id == b.cluster_id,
        Scope::Network => a.network == b.network,
    }
}

/// An immutable view of all known workloads and services.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    by_uid: HashSet<ByUid>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// xDS workloads whose IP a config workload holds in `by_ip` (their named policies still
    /// apply there).
    shadowed: HashMap<IpAddr, Arc<Workload>>,
    /// Every xDS workload claiming an IP that more than one claims (rare: a pod replaced by one
    /// with its IP before the old one is removed). The one `by_ip` (or `shadowed`) holds is
    /// chosen from these by content, not by the order of pushes (see `sources::owner`), so a
    /// restarted agent, or a rebuild after a config change, routes the IP the same way.
    contested: HashMap<IpAddr, Vec<Arc<Workload>>>,
    by_identity: HashMap<Identity, Arc<[Arc<Workload>]>>,
    services: HashMap<Arc<str>, Arc<ServiceEntry>>,
    by_vip: HashMap<IpAddr, Arc<ServiceEntry>>,
    /// Every service claiming each VIP (usually one): `by_vip` holds the one chosen by content
    /// (a config service first, then the smallest key), not the last one updated, and a VIP
    /// another service still claims is not dropped when one lets it go.
    vip_claims: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Every service's address blocks, longest prefix first (then by key, so the choice between
    /// two services claiming one block does not depend on arrival order). Few: only ServiceEntries
    /// with CIDR addresses have them.
    vip_ranges: Arc<[(Cidr, Arc<str>)]>,
    /// The services DNS finds by hostname where the `namespace/hostname` key cannot (see
    /// [`Snapshot::service_by_hostname`]): ServiceEntry hosts and wildcards. Few, so rebuilt
    /// whole when one of them changes.
    dns_hosts: Arc<DnsHosts>,
}

/// Hostnames that are not `<name>.<namespace>.svc.<domain>` of their own namespace, for DNS.
#[derive(Debug, Default)]
pub(crate) struct DnsHosts {
    /// Lowercase hostname -> the service's key (the smallest, when several namespaces have it).
    exact: HashMap<Box<str>, Arc<str>>,
    /// `*.<suffix>` hosts as `(.<suffix>, key)`, longest suffix first, then by key.
    wildcards: Box<[(Box<str>, Arc<str>)]>,
}

impl DnsHosts {
    /// Whether the service `key` with hostname `host` belongs here: a wildcard, or a host a
    /// lookup by `<namespace>/<hostname>` of its own labels does not reach.
    pub(crate) fn holds(key: &str, host: &str) -> bool {
        if host.starts_with("*.") {
            return true;
        }
        let host = host.to_ascii_lowercase();
        let labels: Vec<&str> = host.split('.').collect();
        let own_key = labels.len() >= 4
            && labels[2] == "svc"
            && key
                .strip_prefix(labels[1])
                .and_then(|rest| rest.strip_prefix('/'))
                == Some(host.as_str());
        !own_key
    }

    pub(crate) fn build<'a>(services: impl Iterator<Item = (&'a Arc<str>, &'a str)>) -> DnsHosts {
        let mut exact: HashMap<Box<str>, Arc<str>> = HashMap::new();
        let mut wildcards = Vec::new();
        for (key, host) in services.filter(|(k, h)| DnsHosts::holds(k, h)) {
            let host = host.to_ascii_lowercase();
            if let Some(suffix) = host.strip_prefix('*') {
                wildcards.push((suffix.into(), key.clone()));
                continue;
            }
            match exact.get_mut(host.as_str()) {
                Some(k) if **k <= **key => {}
                Some(k) => *k = key.clone(),
                None => {
                    exact.insert(host.into(), key.clone());
                }
            }
        }
        wildcards.sort_by(|(a, ka): &(Box<str>, Arc<str>), (b, kb)| {
            (std::cmp::Reverse(a.len()), ka).cmp(&(std::cmp::Reverse(b.len()), kb))
        });
        DnsHosts {
            exact,
            wildcards: wildcards.into(),
        }
    }
}

impl Snapshot {
    /// The state of a config alone (no xDS).
    pub fn from_config(config: &crate::config::Config) -> Snapshot {
        sources::build_from_config(config)
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn by_uid(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.by_uid.get(uid).map(|w| &w.0)
    }

    /// Every workload with `identity`.
    pub fn by_identity(&self, identity: &Identity) -> &[Arc<Workload>] {
        self.by_identity.get(identity).map_or(&[], |w| w)
    }

    /// The service whose virtual IP this is: an exact VIP, else the service with the longest
    /// address block containing it (as ztunnel's `get_best_by_vip`).
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        let ip = ip.to_canonical();
        self.by_vip.get(&ip).or_else(|| {
            let (_, key) = self.vip_ranges.iter().find(|(r, _)| r.contains(ip))?;
            self.services.get(key)
        })
    }

    /// A service by `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<&Arc<ServiceEntry>> {
        self.services.get(key)
    }

    /// The service DNS answers `name` (lowercase, no trailing dot) with: a Kubernetes name
    /// (`<name>.<namespace>.svc.<domain>`) by its key, else a service with that hostname (the
    /// smallest key), else the longest wildcard host (`*.example.com`) it is under. No scan:
    /// the hosts keys do not reach are indexed.
    pub fn service_by_hostname(&self, name: &str) -> Option<&Arc<ServiceEntry>> {
        let labels: Vec<&str> = name.split('.').collect();
        if labels.len() >= 4
            && labels[2] == "svc"
            && let Some(s) = self.services.get(format!("{}/{name}", labels[1]).as_str())
            && s.def.is_some()
        {
            return Some(s);
        }
        let key = self.dns_hosts.exact.get(name).or_else(|| {
            let (_, key) = self
                .dns_hosts
                .wildcards
                .iter()
                .find(|(suffix, _)| name.len() > suffix.len() && name.ends_with(&**suffix))?;
            Some(key)
        })?;
        self.services.get(key)
    }

    /// The workload-selector policies that apply to the workload at `ip`: those it names, or,
    /// for a config pod that names none, those the control plane's view of it names.
    pub fn named_policies(&self, ip: IpAddr) -> &[Arc<str>] {
        let ip = ip.to_canonical();
        match self.by_ip.get(&ip) {
            Some(w) if !w.policies.is_empty() => &w.policies,
            Some(_) => self.shadowed.get(&ip).map_or(&[], |w| &w.policies),
            None => &[],
        }
    }

    /// For an xDS workload whose every address a config workload holds (the same pod, from the
    /// config and from istiod): that config workload, which is the one the data path uses. The
    /// admin API shows the two as one.
    pub fn merged_into(&self, w: &Arc<Workload>) -> Option<&Arc<Workload>> {
        let first = w.ips().first()?;
        if w.source != Source::Xds
            || !w
                .ips()
                .iter()
                .all(|ip| self.shadowed.get(ip).is_some_and(|s| Arc::ptr_eq(s, w)))
        {
            return None;
        }
        self.by_ip.get(first)
    }

    /// For a config workload: the xDS workload it shadows on its first address (istiod's view of
    /// the same pod, with the telemetry fields a config pod lacks).
    pub fn xds_twin(&self, w: &Workload) -> Option<&Arc<Workload>> {
        if w.source != Source::Config {
            return None;
        }
        self.shadowed.get(w.ips().first()?)
    }

    /// The workload telemetry describes `w` by (its `workload_name` and `meta`): for a config
    /// workload istiod also describes, istiod's (the config has no owner, canonical names or
    /// locality), else `w`.
    pub fn telemetry_of<'s>(&'s self, w: &'s Workload) -> &'s Workload {
        self.xds_twin(w).map_or(w, |t| t)
    }

    /// Every workload, in no particular order.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.by_uid.iter().map(|w| &w.0)
    }

    /// Every service, in no particular order.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    pub fn workload_count(&self) -> usize {
        self.by_uid.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }
}

/// The store: one writer ([`StateWriter`]), many lock-free readers.
#[derive(Default)]
pub struct StateStore {
    current: ArcSwap<Snapshot>,
}

impl StateStore {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn replace(&self, snapshot: Arc<Snapshot>) {
        self.current.store(snapshot);
    }
}

#[cfg(test)]
mod tests;
