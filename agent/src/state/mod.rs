//! What the agent knows about workloads: who is at an IP, which identity it has, and whether it is
//! reached through HBONE. Written by the config sources through [`Workloads::replace`]; read by
//! the data path as a consistent snapshot, without locks.
//!
//! Today the standalone config is the only source (local pods and `peers`); the xDS client fills
//! the same store from a control plane.

use std::{collections::HashMap, net::IpAddr, sync::Arc};

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

/// An immutable view of all known workloads.
#[derive(Debug, Default)]
pub struct Snapshot {
    by_ip: HashMap<IpAddr, Arc<Workload>>,
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
            });
            for ip in &p.ips {
                by_ip.insert(*ip, w.clone());
            }
        }
        Snapshot { by_ip }
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
