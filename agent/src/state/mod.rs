//! What the agent knows about workloads: who is at an IP, which identity it has, and whether it is
//! reached through HBONE. Written by the config sources through [`Workloads::replace`]; read by
//! the data path as a consistent snapshot, without locks.
//!
//! Today the standalone config is the only source (local pods and `peers`); the xDS client fills
//! the same store from a control plane.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use arc_swap::ArcSwap;

use crate::{config::Config, identity::Identity};

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
        let mut by_ip = HashMap::new();
        for p in &config.pods {
            let w = Arc::new(Workload {
                namespace: p.namespace.clone(),
                name: Some(p.name.clone()),
                identity: p.identity.clone(),
                ips: p.ips.clone(),
                hbone: p.enrolled,
                local: true,
                services: p.services.clone(),
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
            });
            for ip in &p.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        let mut by_vip = HashMap::new();
        for sv in &config.services {
            let key = sv.key();
            let mut endpoints: Vec<Arc<Workload>> = by_ip
                .values()
                .filter(|w: &&Arc<Workload>| w.services.contains(&key))
                .cloned()
                .collect();
            // One entry per workload (it is indexed once per IP), in a stable order.
            endpoints.sort_by(|a, b| a.ips.cmp(&b.ips));
            endpoints.dedup_by(|a, b| Arc::ptr_eq(a, b));
            let entry = Arc::new(ServiceEntry {
                key,
                ports: sv.ports.clone(),
                endpoints,
                next: AtomicUsize::new(0),
            });
            for vip in &sv.vips {
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
