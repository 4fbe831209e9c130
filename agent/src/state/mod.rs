//! What the agent knows about workloads: who is at an IP, which identity it has, and whether it is
//! reached through HBONE. Written by the config sources through [`Workloads::replace`]; read by
//! the data path as a consistent snapshot, without locks.
//!
//! Two sources feed it through [`Sources`], the one writer: the local config (pods, `peers`,
//! `services`, `policies`) and the xDS client (`istio.workload.Address`,
//! `istio.security.Authorization`). Every change of either republishes a whole snapshot and
//! policy store; the local config wins where both describe the same IP or VIP.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;

use crate::{
    config::Config,
    identity::Identity,
    policy::{Policy, PolicyStore},
    xds::{AddressResource, XdsService, XdsSink, XdsWorkload},
};

/// What the xDS source currently holds, by resource name.
#[derive(Default)]
pub struct XdsState {
    pub workloads: HashMap<String, XdsWorkload>,
    pub services: HashMap<String, XdsService>,
    pub policies: HashMap<String, Policy>,
}

/// The one writer of the data path's state: merges the local config and xDS and publishes a new
/// snapshot and policy store whenever either changes.
pub struct Sources {
    config: Mutex<Option<Arc<Config>>>,
    xds: Mutex<XdsState>,
    publish: Box<dyn Fn(Snapshot, PolicyStore) + Send + Sync>,
}

impl Sources {
    pub fn new(publish: impl Fn(Snapshot, PolicyStore) + Send + Sync + 'static) -> Sources {
        Sources {
            config: Mutex::new(None),
            xds: Mutex::new(XdsState::default()),
            publish: Box::new(publish),
        }
    }

    pub fn set_config(&self, config: Arc<Config>) {
        *lock(&self.config) = Some(config);
        self.republish();
    }

    fn republish(&self) {
        let Some(config) = lock(&self.config).clone() else {
            // xDS arrived before the first config: published with it.
            return;
        };
        let xds = lock(&self.xds);
        let snapshot = Snapshot::build(&config, &xds);
        let policies: PolicyStore = config
            .policies
            .iter()
            .cloned()
            .chain(xds.policies.values().cloned())
            .collect();
        drop(xds);
        (self.publish)(snapshot, policies);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Each update replaces whole entries; a poisoned lock still holds consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl XdsSink for Sources {
    fn apply_addresses(&self, upserts: Vec<(String, AddressResource)>, removes: Vec<String>) {
        {
            let mut xds = lock(&self.xds);
            for name in removes {
                xds.workloads.remove(&name);
                xds.services.remove(&name);
            }
            for (name, r) in upserts {
                match r {
                    AddressResource::Workload(w) => {
                        xds.services.remove(&name);
                        xds.workloads.insert(name, w);
                    }
                    AddressResource::Service(s) => {
                        xds.workloads.remove(&name);
                        xds.services.insert(name, s);
                    }
                }
            }
        }
        self.republish();
    }

    fn apply_policies(&self, upserts: Vec<(String, Policy)>, removes: Vec<String>) {
        {
            let mut xds = lock(&self.xds);
            for name in removes {
                xds.policies.remove(&name);
            }
            for (name, p) in upserts {
                xds.policies.insert(name, p);
            }
        }
        self.republish();
    }
}

/// One workload.
#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    pub namespace: String,
    pub name: Option<String>,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
    /// Reached through HBONE (its node runs a mesh agent and it is enrolled).
    pub hbone: bool,
    /// On this node.
    pub local: bool,
    /// Services it backs (`namespace/hostname`).
    pub services: Vec<String>,
    /// Receives traffic (xDS status); unhealthy workloads are skipped as service endpoints.
    pub healthy: bool,
    /// Authorization policies that name this workload (`namespace/name`, from xDS).
    pub policies: Vec<String>,
}

impl Workload {
    /// `namespace/name`, or the namespace and identity when the name is unknown.
    pub fn display_name(&self) -> String {
        match &self.name {
            Some(n) => format!("{}/{}", self.namespace, n),
            None => format!("{}/({})", self.namespace, self.identity.service_account()),
        }
    }
}

/// A service: its VIPs and ports, and the workloads that back it.
#[derive(Debug)]
pub struct ServiceEntry {
    /// `namespace/hostname`.
    pub key: String,
    pub ports: Vec<crate::config::ServicePort>,
    pub endpoints: Vec<Arc<Workload>>,
    /// Round-robin cursor.
    next: AtomicUsize,
}

impl ServiceEntry {
    /// The workload port for a service port.
    pub fn target_port(&self, port: u16) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.target())
    }

    /// The next endpoint, round robin, that has an address of `family`'s kind.
    pub fn pick(&self, like: IpAddr) -> Option<(Arc<Workload>, IpAddr)> {
        let n = self.endpoints.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| {
            let w = &self.endpoints[(start + i) % n];
            if !w.healthy {
                return None;
            }
            let ip = w.ips.iter().find(|ip| ip.is_ipv4() == like.is_ipv4())?;
            Some((w.clone(), *ip))
        })
    }
}

/// An immutable view of all known workloads and services.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    by_vip: HashMap<IpAddr, Arc<ServiceEntry>>,
}

impl Snapshot {
    pub fn from_config(config: &Config) -> Snapshot {
        Snapshot::build(config, &XdsState::default())
    }

    /// The state from both sources: the local config and what xDS pushed. Where both name the
    /// same IP, the local config wins (it knows the pod's netns; xDS only describes it).
    pub fn build(config: &Config, xds: &XdsState) -> Snapshot {
        // Policies xDS names for an IP: for local pods the config describes them, xDS may still
        // attach policies.
        let xds_policies: HashMap<IpAddr, &Vec<String>> = xds
            .workloads
            .values()
            .filter(|w| !w.authorization_policies.is_empty())
            .flat_map(|w| w.ips.iter().map(move |ip| (*ip, &w.authorization_policies)))
            .collect();
        let policies_for = |ips: &[IpAddr]| {
            ips.iter()
                .find_map(|ip| xds_policies.get(ip))
                .map(|p| (*p).clone())
                .unwrap_or_default()
        };
        let mut by_ip = HashMap::new();
        for w in xds.workloads.values() {
            let w = Arc::new(Workload {
                namespace: w.namespace.clone(),
                name: Some(w.name.clone()),
                identity: w.identity.clone(),
                ips: w.ips.clone(),
                hbone: w.hbone,
                local: w.node == config.node,
                services: w.services.iter().map(|s| s.key.clone()).collect(),
                healthy: w.healthy,
                policies: w.authorization_policies.clone(),
            });
            for ip in &w.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        for p in &config.pods {
            let w = Arc::new(Workload {
                namespace: p.namespace.clone(),
                name: Some(p.name.clone()),
                identity: p.identity.clone(),
                ips: p.ips.clone(),
                hbone: p.enrolled,
                local: true,
                services: p.services.clone(),
                healthy: true,
                policies: policies_for(&p.ips),
            });
            for ip in &p.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        for p in &config.peers {
            let w = Arc::new(Workload {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                identity: p.identity.clone(),
                ips: p.ips.clone(),
                hbone: p.hbone,
                local: false,
                services: p.services.clone(),
                healthy: true,
                policies: policies_for(&p.ips),
            });
            for ip in &p.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        let mut by_vip = HashMap::new();
        let xds_services = xds.services.values().map(|sv| {
            let ports = sv
                .ports
                .iter()
                .map(|(port, target)| crate::config::ServicePort {
                    port: *port,
                    target_port: (*target != 0).then_some(*target),
                })
                .collect();
            (sv.key(), sv.vips.clone(), ports)
        });
        let config_services = config
            .services
            .iter()
            .map(|sv| (sv.key(), sv.vips.clone(), sv.ports.clone()));
        // Endpoints grouped by service in one pass over the workloads (not one pass per service).
        let mut backing: HashMap<&str, Vec<Arc<Workload>>> = HashMap::new();
        for w in by_ip.values() {
            for key in &w.services {
                backing.entry(key.as_str()).or_default().push(w.clone());
            }
        }
        for (key, vips, ports) in xds_services.chain(config_services) {
            let mut endpoints = backing.get(key.as_str()).cloned().unwrap_or_default();
            // One entry per workload (it is indexed once per IP), in a stable order.
            endpoints.sort_by(|a, b| a.ips.cmp(&b.ips));
            endpoints.dedup_by(|a, b| Arc::ptr_eq(a, b));
            let entry = Arc::new(ServiceEntry {
                key,
                ports,
                endpoints,
                next: AtomicUsize::new(0),
            });
            for vip in &vips {
                by_vip.insert(*vip, entry.clone());
            }
        }
        Snapshot { by_ip, by_vip }
    }

    /// The service whose virtual IP this is.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<ServiceEntry>> {
        self.by_vip.get(&ip.to_canonical())
    }

    pub fn by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip.get(&ip.to_canonical())
    }
}

/// The store: one writer (the config source), many lock-free readers.
#[derive(Default)]
pub struct Workloads {
    current: ArcSwap<Snapshot>,
}

impl Workloads {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    pub fn replace(&self, snapshot: Snapshot) {
        self.current.store(Arc::new(snapshot));
    }
}
