//! The one writer of the state: merges the local config and xDS pushes into snapshots.
//!
//! A config change (rare, small) rebuilds the indexes from the workloads already built; an xDS
//! push is applied incrementally to a copy of the current indexes (see the module docs above).

use std::{
    collections::{HashMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::{Arc, Mutex, atomic::AtomicUsize},
};

use super::{
    ByUid, ServiceDef, ServiceEntry, ServiceRef, Snapshot, Source, Workload, WorkloadFields,
};
use crate::{
    config::{Config, WaypointRef},
    identity::Identity,
    policy::{Cidr, Policy, PolicyStore},
    xds::{
        AddressResource, GatewayDestination, WorkloadMeta, XdsGateway, XdsService, XdsSink,
        XdsWorkload,
    },
};

/// Called with every new snapshot, and the new policy store when policies changed.
type Publish = Box<dyn Fn(Arc<Snapshot>, Option<PolicyStore>) + Send + Sync>;

/// The one writer of the data path's state. Every change publishes at once.
pub struct StateWriter {
    writer: Mutex<Writer>,
    publish: Publish,
}

struct Writer {
    config: Arc<Config>,
    current: Arc<Snapshot>,
    /// Service definitions from xDS, by resource name (`namespace/hostname`).
    xds_services: HashMap<Arc<str>, Arc<ServiceDef>>,
    /// Policies from xDS, by resource name.
    xds_policies: HashMap<String, Policy>,
    intern: Interner,
}

impl StateWriter {
    /// Starts from `config` (and no xDS state), publishing it at once.
    pub fn new(
        config: Arc<Config>,
        publish: impl Fn(Arc<Snapshot>, Option<PolicyStore>) + Send + Sync + 'static,
    ) -> StateWriter {
        let mut writer = Writer {
            config,
            current: Arc::default(),
            xds_services: HashMap::new(),
            xds_policies: HashMap::new(),
            intern: Interner::default(),
        };
        writer.current = Arc::new(writer.rebuild());
        let policies = writer.policy_store();
        publish(writer.current.clone(), Some(policies));
        StateWriter {
            writer: Mutex::new(writer),
            publish: Box::new(publish),
        }
    }

    /// A new local config: its pods, peers, services and policies replace the previous ones.
    pub fn set_config(&self, config: Arc<Config>) {
        let mut w = lock(&self.writer);
        w.config = config;
        w.current = Arc::new(w.rebuild());
        let policies = w.policy_store();
        (self.publish)(w.current.clone(), Some(policies));
    }

    /// The last published snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        lock(&self.writer).current.clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update publishes a finished snapshot; a poisoned lock still holds the last one.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl XdsSink for StateWriter {
    fn apply_addresses(&self, upserts: Vec<(String, AddressResource)>, removes: Vec<String>) {
        let mut w = lock(&self.writer);
        let mut next = (*w.current).clone();
        let mut change = Change::default();
        for name in removes {
            if let Some(def) = w.xds_services.remove(name.as_str()) {
                change.defs.insert(w.intern.str(&def.key()));
            } else if let Some(old) = next.by_uid(&name).filter(|o| o.source == Source::Xds) {
                let old = old.clone();
                next.remove(&old, &mut change);
            }
        }
        for (name, resource) in upserts {
            match resource {
                AddressResource::Workload(mut x) => {
                    // The resource name is what removals name it by (istiod: the uid itself).
                    x.uid = name;
                    let built = Arc::new(w.workload_from_xds(x));
                    if let Some(old) = next.by_uid(built.uid()).cloned() {
                        next.remove(&old, &mut change);
                    }
                    next.insert(built, &mut change);
                }
                AddressResource::Service(s) => {
                    let key = w.intern.str(&name);
                    change.defs.insert(key.clone());
                    w.xds_services.insert(key, Arc::new(service_from_xds(s)));
                }
            }
        }
        next.update_services(&change, |key| w.def(key));
        next.update_identities(&change);
        w.intern.sweep_if_grown();
        w.current = Arc::new(next);
        (self.publish)(w.current.clone(), None);
    }

    fn apply_policies(&self, upserts: Vec<(String, Policy)>, removes: Vec<String>) {
        let mut w = lock(&self.writer);
        for name in removes {
            w.xds_policies.remove(&name);
        }
        w.xds_policies.extend(upserts);
        let policies = w.policy_store();
        (self.publish)(w.current.clone(), Some(policies));
    }
}

/// What a push changed: workloads removed and added, and service definitions touched.
#[derive(Default)]
struct Change {
    removed: Vec<Arc<Workload>>,
    added: Vec<Arc<Workload>>,
    defs: HashSet<Arc<str>>,
}

impl Writer {
    /// The snapshot of the current config and xDS state, indexes built from scratch (the
    /// workloads from xDS are reused as they are).
    fn rebuild(&mut self) -> Snapshot {
        let mut next = Snapshot::default();
        let mut change = Change::default();
        for w in self.current.workloads() {
            if w.source == Source::Xds {
                next.insert(w.clone(), &mut change);
            }
        }
        let config = self.config.clone();
        for p in &config.pods {
            let uid = p
                .uid
                .clone()
                .unwrap_or_else(|| format!("config//Pod/{}/{}", p.namespace, p.name));
            let w = self.workload_from_config(
                uid,
                p.name.clone(),
                &p.namespace,
                PeerLike {
                    identity: &p.identity,
                    ips: &p.ips,
                    hbone: p.enrolled,
                    local: true,
                    services: &p.services,
                    waypoint: p.waypoint,
                },
            );
            next.insert(w, &mut change);
        }
        for p in &config.peers {
            let name = p.name.clone().unwrap_or_default();
            let first_ip = p.ips.first().map(|ip| ip.to_string()).unwrap_or_default();
            let uid = format!(
                "config//Peer/{}/{}",
                p.namespace,
                p.name.as_deref().unwrap_or(&first_ip)
            );
            let w = self.workload_from_config(
                uid,
                name,
                &p.namespace,
                PeerLike {
                    identity: &p.identity,
                    ips: &p.ips,
                    hbone: p.hbone,
                    local: false,
                    services: &p.services,
                    waypoint: p.waypoint,
                },
            );
            next.insert(w, &mut change);
        }
        change.defs.extend(self.xds_services.keys().cloned());
        for s in &config.services {
            change.defs.insert(self.intern.str(&s.key()));
        }
        next.update_services(&change, |key| self.def(key));
        next.update_identities(&change);
        self.intern.sweep_if_grown();
        next
    }

    /// The definition of service `key`: the config's, else xDS's.
    fn def(&self, key: &str) -> Option<Arc<ServiceDef>> {
        if let Some(s) = self.config.services.iter().find(|s| s.key() == key) {
            return Some(Arc::new(ServiceDef {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                hostname: s.hostname.clone(),
                vips: s.vips.clone(),
                vip_ranges: Vec::new(),
                passthrough: false,
                ports: s
                    .ports
                    .iter()
                    .map(|p| (p.port, p.target_port.unwrap_or(0)))
                    .collect(),
                protocols: s
                    .ports
                    .iter()
                    .filter_map(|p| Some((p.port, p.app_protocol?)))
                    .collect(),
                load_balancing: s.load_balancing.as_ref().map(load_balancing),
                waypoint: s.waypoint.map(gateway),
                source: Source::Config,
            }));
        }
        self.xds_services.get(key).cloned()
    }

    fn policy_store(&self) -> PolicyStore {
        self.config
            .policies
            .iter()
            .cloned()
            .chain(self.xds_policies.values().cloned())
            .collect()
    }

    fn workload_from_xds(&mut self, x: XdsWorkload) -> Workload {
        let services = x
            .services
            .into_iter()
            .map(|s| ServiceRef {
                key: self.intern.str(&s.key),
                ports: s.ports.into_boxed_slice(),
            })
            .collect();
        let policies = x
            .authorization_policies
            .iter()
            .map(|p| self.intern.str(p))
            .collect();
        let local = x.node == self.config.node;
        Workload::new(WorkloadFields {
            namespace: self.intern.str(&x.namespace),
            identity: self.intern.identity(x.identity),
            node: self.intern.str(&x.node),
            workload_name: self.intern.str(&x.workload_name),
            meta: self.intern.meta(x.meta),
            services: self.intern.services(services),
            policies: self.intern.policies(policies),
            host_network: x.host_network,
            uid: x.uid,
            name: x.name,
            ips: x.ips,
            waypoint: x.waypoint.map(Arc::new),
            hbone: x.hbone,
            local,
            healthy: x.healthy,
            source: Source::Xds,
        })
    }

    fn workload_from_config(
        &mut self,
        uid: String,
        name: String,
        namespace: &str,
        p: PeerLike<'_>,
    ) -> Arc<Workload> {
        let services = p
            .services
            .iter()
            .map(|key| ServiceRef {
                key: self.intern.str(key),
                ports: Box::default(),
            })
            .collect();
        let node = if p.local {
            self.intern.str(&self.config.node.clone())
        } else {
            self.intern.str("")
        };
        let workload_name = self
            .intern
            .str(if name.is_empty() { "unknown" } else { &name });
        let meta = self.intern.meta(WorkloadMeta {
            canonical_name: workload_name.to_string(),
            workload_type: "pod",
            ..WorkloadMeta::default()
        });
        Arc::new(Workload::new(WorkloadFields {
            meta,
            workload_name,
            uid,
            name,
            namespace: self.intern.str(namespace),
            identity: self.intern.identity(p.identity.clone()),
            node,
            ips: p.ips.to_vec(),
            services: self.intern.services(services),
            policies: self.intern.policies(Vec::new()),
            waypoint: p.waypoint.map(|w| Arc::new(gateway(w))),
            hbone: p.hbone,
            local: p.local,
            healthy: true,
            host_network: false,
            source: Source::Config,
        }))
    }
}

/// The parts of a config pod or peer that become a workload.
struct PeerLike<'a> {
    identity: &'a Identity,
    ips: &'a [IpAddr],
    hbone: bool,
    local: bool,
    services: &'a [String],
    waypoint: Option<WaypointRef>,
}

/// A config waypoint as xDS names one.
fn gateway(w: WaypointRef) -> XdsGateway {
    XdsGateway {
        destination: GatewayDestination::Address(w.address),
        hbone_mtls_port: w.port,
    }
}

fn service_from_xds(s: XdsService) -> ServiceDef {
    ServiceDef {
        namespace: s.namespace,
        name: s.name,
        hostname: s.hostname,
        vips: s.vips,
        vip_ranges: s.vip_ranges,
        passthrough: s.passthrough,
        ports: s.ports,
        protocols: s.protocols,
        load_balancing: s.load_balancing,
        waypoint: s.waypoint,
        source: Source::Xds,
    }
}

/// The state of `config` alone.
pub(super) fn build_from_config(config: &Config) -> Snapshot {
    let sources = StateWriter::new(Arc::new(config.clone()), |_, _| {});
    Arc::unwrap_or_clone(sources.snapshot())
}

/// Of several xDS workloads claiming one IP, the one that gets it: a healthy one before an
/// unhealthy one, then the smallest uid. Decided by content alone, so the same workloads give
/// the same owner whatever order they arrived in.
fn owner(claims: &[Arc<Workload>]) -> Option<&Arc<Workload>> {
    claims
        .iter()
        .min_by(|a, b| (!a.healthy, a.uid()).cmp(&(!b.healthy, b.uid())))
}

impl Snapshot {
    /// The xDS workload that claims `ip` now: the holder, or the one a config workload shadows.
    fn xds_claimant(&self, ip: &IpAddr) -> Option<&Arc<Workload>> {
        match self.by_ip.get(ip) {
            Some(h) if h.source == Source::Xds => Some(h),
            _ => self.shadowed.get(ip),
        }
    }

    /// Gives `ip` to xDS workload `w` (or to the config workload holding it, keeping `w` as the
    /// shadowed one).
    fn set_xds_owner(&mut self, ip: IpAddr, w: Arc<Workload>) {
        match self.by_ip.get(&ip) {
            Some(h) if h.source == Source::Config => {
                self.shadowed.insert(ip, w);
            }
            _ => {
                self.by_ip.insert(ip, w);
            }
        }
    }

    /// Adds `w` to the uid, IP and shadow indexes (identities and services: see `update_*`).
    fn insert(&mut self, w: Arc<Workload>, change: &mut Change) {
        // A host-network workload shares its node's IP: it is an endpoint, never "the workload
        // at this IP".
        let by_ip = if w.host_network { &[][..] } else { w.ips() };
        for ip in by_ip {
            let ip = ip.to_canonical();
            if w.source == Source::Xds
                && let Some(other) = self.xds_claimant(&ip).cloned()
            {
                let claims = self.contested.entry(ip).or_insert_with(|| vec![other]);
                claims.push(w.clone());
                if let Some(chosen) = owner(claims).cloned() {
                    self.set_xds_owner(ip, chosen);
                }
                continue;
            }
            match self.by_ip.get(&ip) {
                // The config's view of an IP wins over xDS's.
                Some(held) if held.source == Source::Config && w.source == Source::Xds => {
                    self.shadowed.insert(ip, w.clone());
                }
                Some(held) if held.source == Source::Xds && w.source == Source::Config => {
                    self.shadowed.insert(ip, held.clone());
                    self.by_ip.insert(ip, w.clone());
                }
                _ => {
                    self.by_ip.insert(ip, w.clone());
                }
            }
        }
        self.by_uid.insert(ByUid(w.clone()));
        change.added.push(w);
    }

    /// Removes `w` from the uid, IP and shadow indexes. An IP another workload now holds stays
    /// with it.
    fn remove(&mut self, w: &Arc<Workload>, change: &mut Change) {
        self.by_uid.remove(w.uid());
        for ip in w.ips() {
            let ip = ip.to_canonical();
            if let Some(claims) = self.contested.get_mut(&ip)
                && claims.iter().any(|c| Arc::ptr_eq(c, w))
            {
                // Another claimant takes the IP over.
                claims.retain(|c| !Arc::ptr_eq(c, w));
                let chosen = owner(claims).cloned();
                if claims.len() <= 1 {
                    self.contested.remove(&ip);
                }
                if let Some(chosen) = chosen {
                    self.set_xds_owner(ip, chosen);
                }
                continue;
            }
            if self.by_ip.get(&ip).is_some_and(|h| Arc::ptr_eq(h, w)) {
                // A config pod's IP that shadowed this one is not ours to remove, and an xDS
                // workload shadowed by `w` cannot exist (config never shadows from xDS).
                self.by_ip.remove(&ip);
            }
            if self.shadowed.get(&ip).is_some_and(|h| Arc::ptr_eq(h, w)) {
                self.shadowed.remove(&ip);
            }
        }
        change.removed.push(w.clone());
    }

    /// Whether `w` (this very instance) is still in the snapshot.
    fn holds(&self, w: &Arc<Workload>) -> bool {
        self.by_uid
            .get(w.uid())
            .is_some_and(|h| Arc::ptr_eq(&h.0, w))
    }

    /// Rebuilds the identity index entries `change` touched.
    fn update_identities(&mut self, change: &Change) {
        let mut added: HashMap<&Identity, Vec<Arc<Workload>>> = HashMap::new();
        for w in &change.added {
            added.entry(&w.identity).or_default().push(w.clone());
        }
        let touched: HashSet<&Identity> = change
            .removed
            .iter()
            .map(|w| &w.identity)
            .chain(added.keys().copied())
            .collect();
        for id in touched {
            let mut list: Vec<Arc<Workload>> = self
                .by_identity
                .get(id)
                .into_iter()
                .flat_map(|l| l.iter())
                .filter(|w| self.holds(w))
                .cloned()
                .collect();
            for w in added.get(id).into_iter().flatten() {
                if self.holds(w) && !list.iter().any(|l| Arc::ptr_eq(l, w)) {
                    list.push(w.clone());
                }
            }
            if list.is_empty() {
                self.by_identity.remove(id);
            } else {
                self.by_identity.insert(id.clone(), list.into());
            }
        }
    }

    /// Rebuilds the service entries `change` touched: their endpoints, and their VIPs from
    /// `def_of`.
    fn update_services(
        &mut self,
        change: &Change,
        def_of: impl Fn(&str) -> Option<Arc<ServiceDef>>,
    ) {
        let mut added: HashMap<&Arc<str>, Vec<Arc<Workload>>> = HashMap::new();
        for w in &change.added {
            for s in w.services.iter() {
                added.entry(&s.key).or_default().push(w.clone());
            }
        }
        let touched: HashSet<&Arc<str>> = change
            .removed
            .iter()
            .flat_map(|w| w.services.iter().map(|s| &s.key))
            .chain(added.keys().copied())
            .chain(change.defs.iter())
            .collect();
        let mut vips: HashSet<IpAddr> = HashSet::new();
        let mut ranges_changed = false;
        let mut hosts_changed = false;
        for key in touched {
            let old = self.services.get(key).cloned();
            let mut endpoints: Vec<Arc<Workload>> = old
                .iter()
                .flat_map(|e| e.endpoints.iter())
                .filter(|w| self.holds(w))
                .cloned()
                .collect();
            for w in added.get(key).into_iter().flatten() {
                if self.holds(w) && !endpoints.iter().any(|e| Arc::ptr_eq(e, w)) {
                    endpoints.push(w.clone());
                }
            }
            endpoints.sort_by(|a, b| a.ips().cmp(b.ips()));
            let def = def_of(key);
            if let Some(old) = &old {
                for vip in old.def.iter().flat_map(|d| d.vips.iter()) {
                    let vip = vip.to_canonical();
                    if let Some(claims) = self.vip_claims.get_mut(&vip) {
                        claims.retain(|k| k != key);
                        if claims.is_empty() {
                            self.vip_claims.remove(&vip);
                        }
                    }
                    vips.insert(vip);
                }
            }
            let had_ranges = old
                .as_ref()
                .and_then(|o| o.def.as_ref())
                .is_some_and(|d| !d.vip_ranges.is_empty());
            let has_ranges = def.as_ref().is_some_and(|d| !d.vip_ranges.is_empty());
            ranges_changed |= had_ranges || has_ranges;
            let by_host = |d: Option<&Arc<ServiceDef>>| {
                d.is_some_and(|d| super::DnsHosts::holds(key, &d.hostname))
            };
            hosts_changed |=
                by_host(old.as_ref().and_then(|o| o.def.as_ref())) || by_host(def.as_ref());
            if def.is_none() && endpoints.is_empty() {
                self.services.remove(key);
                continue;
            }
            let entry = Arc::new(ServiceEntry {
                key: key.clone(),
                next: AtomicUsize::new(
                    old.map_or(0, |o| o.next.load(std::sync::atomic::Ordering::Relaxed)),
                ),
                def,
                endpoints: endpoints.into(),
            });
            for vip in entry.def.iter().flat_map(|d| d.vips.iter()) {
                let vip = vip.to_canonical();
                let claims = self.vip_claims.entry(vip).or_default();
                if !claims.contains(key) {
                    claims.push(key.clone());
                }
                vips.insert(vip);
            }
            self.services.insert(key.clone(), entry);
        }
        if ranges_changed {
            let mut ranges: Vec<(Cidr, Arc<str>)> = self
                .services
                .values()
                .filter_map(|e| Some((e, e.def.as_ref()?)))
                .flat_map(|(e, d)| d.vip_ranges.iter().map(|r| (*r, e.key.clone())))
                .collect();
            ranges.sort_by(|(a, ka), (b, kb)| {
                (std::cmp::Reverse(a.prefix_len()), ka)
                    .cmp(&(std::cmp::Reverse(b.prefix_len()), kb))
            });
            self.vip_ranges = ranges.into();
        }
        if hosts_changed {
            self.dns_hosts =
                Arc::new(super::DnsHosts::build(self.services.values().filter_map(
                    |e| Some((&e.key, e.def.as_ref()?.hostname.as_str())),
                )));
        }
        // Each VIP whose claims changed goes to the claimant chosen by content.
        for vip in vips {
            let owner = self.vip_claims.get(&vip).and_then(|claims| {
                claims
                    .iter()
                    .filter_map(|k| self.services.get(k))
                    .min_by(|a, b| {
                        let from_config = |e: &ServiceEntry| {
                            e.def.as_ref().is_some_and(|d| d.source == Source::Config)
                        };
                        (!from_config(a), &a.key).cmp(&(!from_config(b), &b.key))
                    })
                    .cloned()
            });
            match owner {
                Some(e) => {
                    self.by_vip.insert(vip, e);
                }
                None => {
                    self.by_vip.remove(&vip);
                }
            }
        }
    }
}

/// Shares equal strings, identities and lists among workloads. Entries nothing else holds any
/// more are dropped when the tables have doubled since the last sweep.
#[derive(Default)]
struct Interner {
    strs: HashSet<Arc<str>>,
    identities: HashSet<Identity>,
    services: HashSet<Arc<[ServiceRef]>>,
    policies: HashSet<Arc<[Arc<str>]>>,
    metas: HashSet<Arc<WorkloadMeta>>,
    swept_at: usize,
}

impl Interner {
    fn str(&mut self, s: &str) -> Arc<str> {
        if let Some(found) = self.strs.get(s) {
            return found.clone();
        }
        let new: Arc<str> = s.into();
        self.strs.insert(new.clone());
        new
    }

    fn identity(&mut self, id: Identity) -> Identity {
        intern(&mut self.identities, id)
    }

    fn services(&mut self, list: Vec<ServiceRef>) -> Arc<[ServiceRef]> {
        intern_list(&mut self.services, list)
    }

    fn policies(&mut self, list: Vec<Arc<str>>) -> Arc<[Arc<str>]> {
        intern_list(&mut self.policies, list)
    }

    fn meta(&mut self, meta: WorkloadMeta) -> Arc<WorkloadMeta> {
        if let Some(found) = self.metas.get(&meta) {
            return found.clone();
        }
        let new = Arc::new(meta);
        self.metas.insert(new.clone());
        new
    }

    fn len(&self) -> usize {
        self.strs.len()
            + self.identities.len()
            + self.services.len()
            + self.policies.len()
            + self.metas.len()
    }

    fn sweep_if_grown(&mut self) {
        if self.len() < 2 * self.swept_at + 1024 {
            return;
        }
        // Lists first: they hold strings.
        self.services.retain(|l| Arc::strong_count(l) > 1);
        self.policies.retain(|l| Arc::strong_count(l) > 1);
        self.metas.retain(|m| Arc::strong_count(m) > 1);
        self.identities.retain(Identity::is_shared);
        self.strs.retain(|s| Arc::strong_count(s) > 1);
        self.swept_at = self.len();
    }
}

fn intern<T: Hash + Eq + Clone>(table: &mut HashSet<T>, value: T) -> T {
    if let Some(found) = table.get(&value) {
        return found.clone();
    }
    table.insert(value.clone());
    value
}

fn intern_list<T: Hash + Eq>(table: &mut HashSet<Arc<[T]>>, list: Vec<T>) -> Arc<[T]> {
    if let Some(found) = table.get(list.as_slice()) {
        return found.clone();
    }
    let new: Arc<[T]> = list.into();
    table.insert(new.clone());
    new
}

/// A config service's locality preferences as the picker reads them (the same as istiod's).
fn load_balancing(lb: &crate::config::LoadBalancingConfig) -> crate::xds::LoadBalancing {
    use crate::{
        config::{HealthPolicy, LoadBalancingMode, LocalityScope},
        xds::{LbMode, LoadBalancing, Scope},
    };
    LoadBalancing {
        scopes: lb
            .routing_preference
            .iter()
            .map(|s| match s {
                LocalityScope::Network => Scope::Network,
                LocalityScope::Region => Scope::Region,
                LocalityScope::Zone => Scope::Zone,
                LocalityScope::Subzone => Scope::Subzone,
                LocalityScope::Node => Scope::Node,
                LocalityScope::Cluster => Scope::Cluster,
            })
            .collect(),
        mode: match lb.mode {
            LoadBalancingMode::Standard => LbMode::Standard,
            LoadBalancingMode::Strict => LbMode::Strict,
            LoadBalancingMode::Failover => LbMode::Failover,
        },
        allow_unhealthy: lb.health_policy == HealthPolicy::AllowAll,
    }
}
