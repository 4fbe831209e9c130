//! One builder for the topology most tests start from: nodes, pods on them, and an agent config
//! per node in which the node's pods are enrolled (or listed unenrolled) and every enrolled pod of
//! the other nodes is an HBONE peer, as a control plane would describe them to each node.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! let mut m = ambit_testbed::MeshSpec::new()
//!     .node("node-a").pod("client").unenrolled("outsider")
//!     .node("node-b").pod("server")
//!     .build("target/debug/ambit-testpod")?;
//! let agent_a = m.bed.start_agent(&m.configs["node-a"])?;
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;

use anyhow::{Context as _, Result, bail};

use crate::{AgentConfig, Node, Pod, TestBed};

struct PodSpec {
    name: String,
    namespace: String,
    service_account: String,
    role: Role,
    /// Services it backs (`namespace/name`), in every config that lists it.
    services: Vec<String>,
}

/// How the configs describe a pod.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// Enrolled on its node, a peer of the others.
    Enrolled,
    /// Listed on its node, not captured; unknown to the others.
    Unenrolled,
    /// Listed on its node, not captured, and a peer of the others: a waypoint's pod, which
    /// speaks HBONE itself.
    UnenrolledPeer,
    /// Not in its node's config (its agent learns it from the Kubernetes API or the CNI
    /// plugin), a peer of the others.
    Elsewhere,
}

impl Role {
    fn peer_of_others(self) -> bool {
        matches!(
            self,
            Role::Enrolled | Role::UnenrolledPeer | Role::Elsewhere
        )
    }
}

/// What to build; see the module docs.
#[derive(Default)]
pub struct MeshSpec {
    nodes: Vec<(String, Vec<PodSpec>)>,
    /// [`MeshSpec::without_peers`].
    no_peers: bool,
    /// [`MeshSpec::everywhere`].
    extra: serde_json::Map<String, serde_json::Value>,
}

/// The built topology. Fields are public so tests can take what they hold (`pods.remove(..)`).
pub struct Mesh {
    pub bed: TestBed,
    /// By node name.
    pub nodes: BTreeMap<String, Node>,
    /// By pod name.
    pub pods: BTreeMap<String, Pod>,
    /// Each node's agent config, by node name.
    pub configs: BTreeMap<String, AgentConfig>,
    /// The pods other nodes know as peers, with the services they back, for
    /// [`Mesh::waypoint_config`].
    peers: Vec<(String, Vec<String>)>,
    extra: serde_json::Map<String, serde_json::Value>,
}

impl MeshSpec {
    pub fn new() -> MeshSpec {
        MeshSpec::default()
    }

    /// Adds a node; the pods that follow go on it.
    pub fn node(mut self, name: &str) -> MeshSpec {
        self.nodes.push((name.to_owned(), Vec::new()));
        self
    }

    /// An enrolled pod on the last node, namespace `default`, service account `default`.
    pub fn pod(self, name: &str) -> MeshSpec {
        self.pod_as(name, "default", "default")
    }

    /// An enrolled pod on the last node with its namespace and service account.
    pub fn pod_as(self, name: &str, namespace: &str, service_account: &str) -> MeshSpec {
        self.push(name, namespace, service_account, Role::Enrolled)
    }

    /// A pod on the last node that its agent lists but does not capture.
    pub fn unenrolled(self, name: &str) -> MeshSpec {
        self.push(name, "default", "default", Role::Unenrolled)
    }

    /// A pod on the last node that its agent lists but does not capture, and that the other
    /// nodes know as an HBONE peer: where a waypoint runs.
    pub fn unenrolled_peer(self, name: &str, namespace: &str, service_account: &str) -> MeshSpec {
        self.push(name, namespace, service_account, Role::UnenrolledPeer)
    }

    /// A pod on the last node that its agent's config does not list (the agent learns it from
    /// the Kubernetes API or the CNI plugin); the other nodes know it as a peer.
    pub fn listed_elsewhere(self, name: &str, namespace: &str, service_account: &str) -> MeshSpec {
        self.push(name, namespace, service_account, Role::Elsewhere)
    }

    /// The last pod backs `services` (`namespace/name`), in every config that lists it.
    pub fn serves(mut self, services: &[&str]) -> MeshSpec {
        if let Some(p) = self.nodes.last_mut().and_then(|(_, pods)| pods.last_mut()) {
            p.services = services.iter().map(|s| (*s).to_owned()).collect();
        }
        self
    }

    /// Sets `key` to `value` at the top of every node's config (`services`, `policies`, ...).
    pub fn everywhere(mut self, key: &str, value: serde_json::Value) -> MeshSpec {
        self.extra.insert(key.to_owned(), value);
        self
    }

    /// No peers: each node knows only its own pods (traffic to others is passthrough).
    pub fn without_peers(mut self) -> MeshSpec {
        self.no_peers = true;
        self
    }

    fn push(mut self, name: &str, namespace: &str, service_account: &str, role: Role) -> Self {
        let pod = PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            role,
            services: Vec::new(),
        };
        match self.nodes.last_mut() {
            Some((_, pods)) => pods.push(pod),
            // Reported by `build`, where errors are returned.
            None => self.nodes.push((String::new(), vec![pod])),
        }
        self
    }

    /// Creates the bed, its nodes and pods, and the agent configs (agents are not started).
    pub fn build(self, testpod_bin: &str) -> Result<Mesh> {
        if self.nodes.iter().any(|(n, _)| n.is_empty()) {
            bail!("MeshSpec: a pod was added before any node");
        }
        let mut names = std::collections::BTreeSet::new();
        for p in self.nodes.iter().flat_map(|(_, pods)| pods) {
            if !names.insert(&p.name) {
                bail!(
                    "MeshSpec: pod {} is named twice (pods are found by name)",
                    p.name
                );
            }
        }
        let bed = TestBed::with_testpod_bin(testpod_bin).context("create bed")?;
        let mut nodes = BTreeMap::new();
        let mut pods = BTreeMap::new();
        for (name, specs) in &self.nodes {
            let node = bed.add_node(name).with_context(|| format!("add {name}"))?;
            for p in specs {
                let pod = bed
                    .add_pod_in(&node, &p.name, &p.namespace, &p.service_account)
                    .with_context(|| format!("add pod {}", p.name))?;
                pods.insert(p.name.clone(), pod);
            }
            nodes.insert(name.clone(), node);
        }
        let mut configs = BTreeMap::new();
        for (name, specs) in &self.nodes {
            let mut config = bed.agent_config(name.as_str());
            for p in specs.iter().filter(|p| p.role != Role::Elsewhere) {
                config.add_pod(&pods[&p.name], p.role == Role::Enrolled);
                if let Some(entry) = config.pods.last_mut() {
                    entry.services = p.services.clone();
                }
            }
            if !self.no_peers {
                for (_, theirs) in self.nodes.iter().filter(|(other, _)| other != name) {
                    for p in theirs.iter().filter(|p| p.role.peer_of_others()) {
                        config.add_peer(&pods[&p.name]);
                        if let Some(entry) = config.peers.last_mut() {
                            entry.services = p.services.clone();
                        }
                    }
                }
            }
            config.extra.extend(self.extra.clone());
            configs.insert(name.clone(), config);
        }
        let peers = self
            .nodes
            .iter()
            .flat_map(|(_, pods)| pods)
            .filter(|p| p.role.peer_of_others())
            .map(|p| (p.name.clone(), p.services.clone()))
            .collect();
        Ok(Mesh {
            bed,
            nodes,
            pods,
            configs,
            peers,
            extra: self.extra,
        })
    }
}

impl Mesh {
    /// Takes node `name` out (for a test's own struct).
    pub fn take_node(&mut self, name: &str) -> Node {
        self.nodes
            .remove(name)
            .unwrap_or_else(|| panic!("the mesh has no node {name}"))
    }

    /// Takes pod `name` out.
    pub fn take_pod(&mut self, name: &str) -> Pod {
        self.pods
            .remove(name)
            .unwrap_or_else(|| panic!("the mesh has no pod {name}"))
    }

    /// A config for `ambit-agent waypoint` in pod `name`: every other pod the nodes know as a
    /// peer is its peer, with the services it backs, and what [`MeshSpec::everywhere`] set.
    pub fn waypoint_config(&self, name: &str) -> AgentConfig {
        let pod = self
            .pods
            .get(name)
            .unwrap_or_else(|| panic!("the mesh has no pod {name}"));
        let mut config = self.bed.waypoint_config(pod);
        for (peer, services) in self.peers.iter().filter(|(p, _)| p != name) {
            let Some(p) = self.pods.get(peer) else {
                continue;
            };
            config.add_peer(p);
            if let Some(entry) = config.peers.last_mut() {
                entry.services = services.clone();
            }
        }
        config.extra.extend(self.extra.clone());
        config
    }

    /// Takes node `name`'s agent config out.
    pub fn take_config(&mut self, name: &str) -> AgentConfig {
        self.configs
            .remove(name)
            .unwrap_or_else(|| panic!("the mesh has no node {name}"))
    }
}
