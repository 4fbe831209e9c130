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
    enrolled: bool,
}

/// What to build; see the module docs.
#[derive(Default)]
pub struct MeshSpec {
    nodes: Vec<(String, Vec<PodSpec>)>,
    /// [`MeshSpec::without_peers`].
    no_peers: bool,
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
        self.push(name, namespace, service_account, true)
    }

    /// A pod on the last node that its agent lists but does not capture.
    pub fn unenrolled(self, name: &str) -> MeshSpec {
        self.push(name, "default", "default", false)
    }

    /// No peers: each node knows only its own pods (traffic to others is passthrough).
    pub fn without_peers(mut self) -> MeshSpec {
        self.no_peers = true;
        self
    }

    fn push(mut self, name: &str, namespace: &str, service_account: &str, enrolled: bool) -> Self {
        let pod = PodSpec {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            enrolled,
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
            for p in specs {
                config.add_pod(&pods[&p.name], p.enrolled);
            }
            if !self.no_peers {
                for (_, theirs) in self.nodes.iter().filter(|(other, _)| other != name) {
                    for p in theirs.iter().filter(|p| p.enrolled) {
                        config.add_peer(&pods[&p.name]);
                    }
                }
            }
            configs.insert(name.clone(), config);
        }
        Ok(Mesh {
            bed,
            nodes,
            pods,
            configs,
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

    /// Takes node `name`'s agent config out.
    pub fn take_config(&mut self, name: &str) -> AgentConfig {
        self.configs
            .remove(name)
            .unwrap_or_else(|| panic!("the mesh has no node {name}"))
    }
}
