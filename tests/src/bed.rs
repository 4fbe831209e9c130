//! The test bed itself: the fabric, nodes and pods as network namespaces, their cgroups, and the
//! cleanup that removes all of it.

use std::{
    ffi::OsStr,
    fmt, fs,
    io::Read,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, anyhow, bail};

use crate::{
    agent::{self, Agent, AgentConfig},
    binaries, cgroup,
    cmd::{self, ip, ip_in, sysctl_in},
    process::{self, Process, Tracker},
};

/// Prefix of every netns name a bed creates: `ab-<id>-...`.
const NETNS_PREFIX: &str = "ab-";
/// Prefix of the bed's cgroup, bpffs and temp directories: `ambit-test-<id>`.
const DIR_PREFIX: &str = "ambit-test-";
/// Root of the beds' bpffs pin directories.
const BPFFS: &str = "/sys/fs/bpf";
/// Where `ip netns` keeps its namespace files.
const NETNS_DIR: &str = "/run/netns";

/// Set to keep every bed's temp dir (agent configs and logs) after it is dropped.
pub const KEEP_TMP_ENV: &str = "AMBIT_KEEP_TMP";

/// How long to wait for interfaces to have carrier and for IPv6 addresses to leave DAD.
const LINK_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Shared state of one bed, held by the bed and by its [`Node`] and [`Pod`] handles.
pub(crate) struct Shared {
    pub(crate) id: String,
    pub(crate) cgroup_mount: PathBuf,
    pub(crate) cgroup_root: PathBuf,
    pub(crate) bpf_root: PathBuf,
    pub(crate) tmp: PathBuf,
    pub(crate) fabric: String,
    pub(crate) tracker: Tracker,
    state: Mutex<State>,
    testpod_bin: Mutex<Option<PathBuf>>,
    agent_bin: Mutex<Option<PathBuf>>,
    keep_tmp: AtomicBool,
}

#[derive(Default)]
struct State {
    nodes: Vec<Arc<NodeInfo>>,
    pods: Vec<Arc<PodInfo>>,
    /// Network namespaces created, in order.
    netns: Vec<String>,
    /// Pods ever added per node (indexes are not reused after `remove_pod`).
    pods_added: Vec<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    pub(crate) fn testpod_bin(&self) -> Result<PathBuf> {
        let mut bin = lock(&self.testpod_bin);
        if bin.is_none() {
            *bin = Some(binaries::testpod()?);
        }
        bin.clone()
            .ok_or_else(|| anyhow!("BUG: testpod binary path unset"))
    }

    pub(crate) fn agent_bin(&self) -> Result<PathBuf> {
        let mut bin = lock(&self.agent_bin);
        if bin.is_none() {
            *bin = Some(binaries::agent()?);
        }
        bin.clone()
            .ok_or_else(|| anyhow!("BUG: agent binary path unset"))
    }

    fn node(&self, name: &str) -> Option<Arc<NodeInfo>> {
        lock(&self.state)
            .nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
    }
}

/// One test cluster: a fabric netns with a bridge, nodes and pods. Dropping it removes everything
/// it created (best effort, never panics; what could not be removed is printed).
pub struct TestBed {
    shared: Arc<Shared>,
}

impl fmt::Debug for TestBed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestBed")
            .field("id", &self.shared.id)
            .finish()
    }
}

pub(crate) struct NodeInfo {
    pub(crate) name: String,
    index: usize,
    pub(crate) netns: String,
    pub(crate) cgroup_dir: PathBuf,
    pub(crate) cgroup_rel: String,
    pub(crate) pin_path: PathBuf,
}

pub(crate) struct PodInfo {
    pub(crate) name: String,
    pub(crate) namespace: String,
    pub(crate) service_account: String,
    pub(crate) node: String,
    index: usize,
    pub(crate) netns: String,
    cgroup_dir: PathBuf,
    ipv4: Ipv4Addr,
    ipv6: Ipv6Addr,
}

/// A node: a network namespace routing between the underlay (`eth0`) and its pods (`br0`).
#[derive(Clone)]
pub struct Node {
    bed: Arc<Shared>,
    info: Arc<NodeInfo>,
}

/// A pod: a network namespace with `eth0` on its node's bridge, and a cgroup under the node's.
#[derive(Clone)]
pub struct Pod {
    pub(crate) bed: Arc<Shared>,
    pub(crate) info: Arc<PodInfo>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Node({}, netns {})", self.info.name, self.info.netns)
    }
}

impl fmt::Debug for Pod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Pod({}/{} on {}, {} {})",
            self.info.namespace, self.info.name, self.info.node, self.info.ipv4, self.info.ipv6
        )
    }
}

/// Something that names a node of the bed: a [`Node`] or its name.
pub trait NodeName {
    fn node_name(&self) -> &str;
}

impl NodeName for Node {
    fn node_name(&self) -> &str {
        &self.info.name
    }
}
impl NodeName for &Node {
    fn node_name(&self) -> &str {
        &self.info.name
    }
}
impl NodeName for &str {
    fn node_name(&self) -> &str {
        self
    }
}
impl NodeName for String {
    fn node_name(&self) -> &str {
        self
    }
}
impl NodeName for &String {
    fn node_name(&self) -> &str {
        self
    }
}

fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut random = [0u8; 2];
    let got_random = fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut random))
        .is_ok();
    if !got_random {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        random = [(nanos >> 8) as u8, nanos as u8];
    }
    // The pid comes before the only dash, so `cleanup_stale` can tell whether the creator lives;
    // the random part has a fixed width, so counter + random is unambiguous.
    format!(
        "{:x}-{n:x}{:04x}",
        std::process::id(),
        u16::from_be_bytes(random)
    )
}

fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.']);
    if !ok {
        bail!(
            "{what} name {name:?} is not usable: use up to 40 lowercase letters, digits, '-' or '.', \
             like a Kubernetes name"
        );
    }
    Ok(())
}

impl TestBed {
    /// Creates an empty bed: the fabric netns with its bridge, the bed's cgroup and temp dir.
    /// Binaries are looked up when first needed (see [`TestBed::set_testpod_bin`]).
    pub fn new() -> Result<TestBed> {
        if !nix::unistd::geteuid().is_root() {
            bail!(
                "the test bed needs root for network namespaces, cgroups and eBPF; run as root \
                 (and guard the test with `if !ambit_testbed::privileged() {{ return; }}`)"
            );
        }
        let id = unique_id();
        let cgroup_mount = cgroup::cgroup2_mount()?;
        let dir_name = format!("{DIR_PREFIX}{id}");
        let shared = Arc::new(Shared {
            cgroup_root: cgroup_mount.join(&dir_name),
            bpf_root: Path::new(BPFFS).join(&dir_name),
            tmp: std::env::temp_dir().join(&dir_name),
            fabric: format!("{NETNS_PREFIX}{id}-fab"),
            cgroup_mount,
            id,
            tracker: Tracker::default(),
            state: Mutex::default(),
            testpod_bin: Mutex::new(None),
            agent_bin: Mutex::new(None),
            keep_tmp: AtomicBool::new(std::env::var_os(KEEP_TMP_ENV).is_some()),
        });
        // From here on, Drop cleans up whatever was made if a step fails.
        let bed = TestBed { shared };
        bed.setup_fabric()?;
        Ok(bed)
    }

    /// Like [`TestBed::new`], with the `ambit-testpod` binary given (integration tests of this
    /// package can pass `env!("CARGO_BIN_EXE_ambit-testpod")`).
    pub fn with_testpod_bin(path: impl Into<PathBuf>) -> Result<TestBed> {
        let bed = TestBed::new()?;
        bed.set_testpod_bin(path);
        Ok(bed)
    }

    /// Uses this `ambit-testpod` binary instead of looking it up.
    pub fn set_testpod_bin(&self, path: impl Into<PathBuf>) {
        *lock(&self.shared.testpod_bin) = Some(path.into());
    }

    /// Keeps the temp dir (agent configs and logs) when the bed is dropped. It is always kept
    /// when the bed is dropped during a panic, and when `AMBIT_KEEP_TMP` is set.
    pub fn set_keep_tmp(&self, keep: bool) {
        self.shared.keep_tmp.store(keep, Ordering::Relaxed);
    }

    /// Uses this `ambit-agent` binary instead of looking it up.
    pub fn set_agent_bin(&self, path: impl Into<PathBuf>) {
        *lock(&self.shared.agent_bin) = Some(path.into());
    }

    fn setup_fabric(&self) -> Result<()> {
        let s = &self.shared;
        cgroup::create(&s.cgroup_root)?;
        fs::create_dir_all(&s.tmp)
            .with_context(|| format!("cannot create temp dir {}", s.tmp.display()))?;
        self.add_netns(&s.fabric)?;
        ip_in(
            &s.fabric,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip_in(&s.fabric, &["link", "set", "br0", "up"])?;
        Ok(())
    }

    /// Creates a netns with `lo` up and IPv6 DAD off, and records it for cleanup.
    fn add_netns(&self, name: &str) -> Result<()> {
        ip(["netns", "add", name]).with_context(|| {
            format!(
                "cannot create network namespace {name}; is iproute2 installed and are we root?"
            )
        })?;
        lock(&self.shared.state).netns.push(name.to_owned());
        sysctl_in(
            name,
            &[
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ],
        )?;
        ip_in(name, &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// This bed's unique id; every name it creates contains it.
    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// The bed's temp dir (agent configs and logs).
    pub fn tmp_dir(&self) -> &Path {
        &self.shared.tmp
    }

    /// The cgroup v2 mount point (what [`Node::cgroup_rel`] is relative to).
    pub fn cgroup_mount(&self) -> &Path {
        &self.shared.cgroup_mount
    }

    /// The bed's cgroup (absolute path), parent of the node cgroups.
    pub fn cgroup_root(&self) -> &Path {
        &self.shared.cgroup_root
    }

    /// The bed's bpffs directory, parent of the nodes' pin paths.
    pub fn bpf_root(&self) -> &Path {
        &self.shared.bpf_root
    }

    /// The name of the fabric netns (the underlay's bridge).
    pub fn fabric_netns(&self) -> &str {
        &self.shared.fabric
    }

    /// Adds node `name` (0-based index `k` = nodes added before): netns `ab-<id>-<name>`, underlay
    /// `10.0.0.(k+1)` / `fd00::(k+1)`, pod bridge `10.(k+1).0.1` / `fd00:(k+1)::1`, routes to and
    /// from every other node's pod subnets, and cgroups `<name>` and `<name>/agent`.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        check_name("node", name)?;
        let k = {
            let state = lock(&self.shared.state);
            if state.nodes.iter().any(|n| n.name == name) {
                bail!("node {name} already exists in this bed");
            }
            state.nodes.len()
        };
        if k >= 250 {
            bail!("a bed has at most 250 nodes");
        }
        self.build_node(name, k)
            .with_context(|| format!("cannot set up node {name}"))
    }

    fn build_node(&self, name: &str, k: usize) -> Result<Node> {
        let s = &self.shared;
        let netns = format!("{NETNS_PREFIX}{}-{name}", s.id);
        let n = k + 1;
        self.add_netns(&netns)?;
        sysctl_in(
            &netns,
            &["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"],
        )?;

        // Underlay: eth0 in the node, its peer n<k> on the fabric bridge.
        let fab_port = format!("n{k}");
        ip_in(
            &s.fabric,
            &[
                "link", "add", &fab_port, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        ip_in(
            &s.fabric,
            &["link", "set", &fab_port, "master", "br0", "up"],
        )?;
        ip_in(
            &netns,
            &["addr", "add", &format!("10.0.0.{n}/24"), "dev", "eth0"],
        )?;
        ip_in(
            &netns,
            &[
                "addr",
                "add",
                &format!("fd00::{n}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;

        // The pods' bridge.
        ip_in(
            &netns,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
            ],
        )?;
        ip_in(
            &netns,
            &["addr", "add", &format!("10.{n}.0.1/24"), "dev", "br0"],
        )?;
        ip_in(
            &netns,
            &[
                "addr",
                "add",
                &format!("fd00:{n}::1/64"),
                "dev",
                "br0",
                "nodad",
            ],
        )?;
        ip_in(&netns, &["link", "set", "br0", "up"])?;
        wait_links_ready(&netns, &["eth0"])?;

        // Routes between this node's pods and every other node's, both ways.
        let others: Vec<Arc<NodeInfo>> = lock(&s.state).nodes.clone();
        for other in &others {
            let m = other.index + 1;
            add_pod_routes(&netns, m)?;
            add_pod_routes(&other.netns, n)?;
        }

        let cgroup_dir = s.cgroup_root.join(name);
        cgroup::create(&cgroup_dir.join("agent"))?;
        // Where the node's "kubelet" runs: beside the pods' cgroup, not under it.
        cgroup::create(&s.cgroup_root.join(format!("{name}-kubelet")))?;
        let info = Arc::new(NodeInfo {
            name: name.to_owned(),
            index: k,
            netns,
            cgroup_rel: format!("/{DIR_PREFIX}{}/{name}", s.id),
            cgroup_dir,
            pin_path: s.bpf_root.join(name),
        });
        let mut state = lock(&s.state);
        state.nodes.push(Arc::clone(&info));
        state.pods_added.push(0);
        Ok(Node {
            bed: Arc::clone(&self.shared),
            info,
        })
    }

    /// Adds pod `name` in Kubernetes namespace `default` with service account `default`.
    pub fn add_pod(&self, node: &Node, name: &str) -> Result<Pod> {
        self.add_pod_in(node, name, "default", "default")
    }

    /// Adds pod `name` (0-based index `j` among the pods added to this node so far) to `node`:
    /// netns `ab-<id>-<node>-<name>`, `eth0` on the node's `br0` with `10.(k+1).0.(j+2)` and
    /// `fd00:(k+1)::(j+2)`, default routes via the node, and cgroup `<node>/<name>`.
    /// `namespace` and `service_account` only go into the agent config.
    pub fn add_pod_in(
        &self,
        node: &Node,
        name: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Pod> {
        check_name("pod", name)?;
        if name == "agent" {
            bail!("pod name \"agent\" is taken by the node's agent cgroup; choose another");
        }
        let j = {
            let state = lock(&self.shared.state);
            let Some(k) = state.nodes.iter().position(|n| n.name == node.info.name) else {
                bail!("node {} is not part of this bed", node.info.name);
            };
            if state
                .pods
                .iter()
                .any(|p| p.node == node.info.name && p.name == name)
            {
                bail!("pod {name} already exists on node {}", node.info.name);
            }
            state.pods_added[k]
        };
        if j >= 250 {
            bail!("a node has at most 250 pods");
        }
        let pod = self
            .build_pod(node, name, namespace, service_account, j)
            .with_context(|| format!("cannot set up pod {name} on node {}", node.info.name))?;
        Ok(pod)
    }

    fn build_pod(
        &self,
        node: &Node,
        name: &str,
        namespace: &str,
        service_account: &str,
        j: usize,
    ) -> Result<Pod> {
        let s = &self.shared;
        let n = node.info.index + 1;
        let host = j + 2;
        let netns = format!("{}-{name}", node.info.netns);
        {
            let mut state = lock(&s.state);
            let k = node.info.index;
            state.pods_added[k] += 1;
        }
        self.add_netns(&netns)?;
        let node_port = format!("p{j}");
        ip_in(
            &node.info.netns,
            &[
                "link", "add", &node_port, "type", "veth", "peer", "name", "eth0", "netns", &netns,
            ],
        )?;
        ip_in(
            &node.info.netns,
            &["link", "set", &node_port, "master", "br0", "up"],
        )?;
        let ipv4: Ipv4Addr = format!("10.{n}.0.{host}")
            .parse()
            .context("BUG: pod IPv4 address")?;
        let ipv6: Ipv6Addr = format!("fd00:{n}::{host}")
            .parse()
            .context("BUG: pod IPv6 address")?;
        ip_in(
            &netns,
            &["addr", "add", &format!("{ipv4}/24"), "dev", "eth0"],
        )?;
        ip_in(
            &netns,
            &["addr", "add", &format!("{ipv6}/64"), "dev", "eth0", "nodad"],
        )?;
        ip_in(&netns, &["link", "set", "eth0", "up"])?;
        wait_links_ready(&netns, &["eth0"])?;
        ip_in(
            &netns,
            &["route", "add", "default", "via", &format!("10.{n}.0.1")],
        )?;
        ip_in(
            &netns,
            &[
                "-6",
                "route",
                "add",
                "default",
                "via",
                &format!("fd00:{n}::1"),
            ],
        )?;
        let cgroup_dir = node.info.cgroup_dir.join(name);
        cgroup::create(&cgroup_dir)?;
        let info = Arc::new(PodInfo {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
            node: node.info.name.clone(),
            index: j,
            netns,
            cgroup_dir,
            ipv4,
            ipv6,
        });
        lock(&s.state).pods.push(Arc::clone(&info));
        Ok(Pod {
            bed: Arc::clone(&self.shared),
            info,
        })
    }

    /// Removes a pod: kills its processes, deletes its netns (and so its veth) and its cgroup.
    /// Its index and IPs are not reused.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        let s = &self.shared;
        cgroup::kill_all(&pod.info.cgroup_dir);
        ip(["netns", "del", &pod.info.netns])?;
        {
            let mut state = lock(&s.state);
            state.netns.retain(|n| *n != pod.info.netns);
            state.pods.retain(|p| !Arc::ptr_eq(p, &pod.info));
        }
        cgroup::remove_tree(&pod.info.cgroup_dir, Duration::from_secs(5))
    }

    /// The node called `name`, if the bed has one.
    pub fn node(&self, name: &str) -> Option<Node> {
        self.shared.node(name).map(|info| Node {
            bed: Arc::clone(&self.shared),
            info,
        })
    }

    /// All nodes, in the order they were added.
    pub fn nodes(&self) -> Vec<Node> {
        lock(&self.shared.state)
            .nodes
            .iter()
            .map(|info| Node {
                bed: Arc::clone(&self.shared),
                info: Arc::clone(info),
            })
            .collect()
    }

    /// All pods, in the order they were added.
    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.shared.state)
            .pods
            .iter()
            .map(|info| Pod {
                bed: Arc::clone(&self.shared),
                info: Arc::clone(info),
            })
            .collect()
    }

    /// The network namespaces this bed has created and not deleted yet.
    pub fn netns_names(&self) -> Vec<String> {
        lock(&self.shared.state).netns.clone()
    }

    /// A config for the agent on `node` (a [`Node`] or its name), prefilled with the node's name,
    /// cgroup and bpffs pin path and no pods.
    ///
    /// # Panics
    /// If the bed has no such node (a mistake in the test).
    pub fn agent_config(&self, node: impl NodeName) -> AgentConfig {
        let name = node.node_name();
        let info = self.shared.node(name).unwrap_or_else(|| {
            panic!("agent_config: this bed has no node named {name:?}; add it with add_node first")
        });
        AgentConfig::for_node(&info, self.tmp_dir())
    }

    /// A config for `ambit-agent waypoint` running in `pod` (its namespace, name and service
    /// account), with the bed's CA and no services, peers or routes yet; edit the `waypoint`
    /// section with [`AgentConfig::waypoint_mut`].
    pub fn waypoint_config(&self, pod: &Pod) -> AgentConfig {
        let mut config = self.agent_config(pod.node_name());
        config.state_dir = self
            .tmp_dir()
            .join(format!("state-waypoint-{}", pod.name()));
        config.admin_socket = self
            .tmp_dir()
            .join(format!("admin-waypoint-{}.sock", pod.name()));
        config.extra.insert(
            "waypoint".into(),
            serde_json::json!({
                "namespace": pod.namespace(),
                "name": pod.name(),
                "serviceAccount": pod.service_account(),
            }),
        );
        config
    }

    /// Starts `ambit-agent waypoint` inside `pod` with `config` (see
    /// [`TestBed::waypoint_config`]) and waits until it listens with its certificate. Its log is
    /// read like an agent's.
    pub fn start_waypoint(&self, pod: &Pod, config: &AgentConfig) -> Result<Agent> {
        agent::start_waypoint(&self.shared, pod, config, crate::TEST_LOG_FILTER)
    }

    /// Like [`TestBed::start_waypoint`], logging at `log_filter` (benchmarks: `info`).
    pub fn start_waypoint_with_log_filter(
        &self,
        pod: &Pod,
        config: &AgentConfig,
        log_filter: &str,
    ) -> Result<Agent> {
        agent::start_waypoint(&self.shared, pod, config, log_filter)
    }

    /// Starts `ambit-agent run` for `config.node`, inside the node's netns and its `agent` cgroup
    /// (below the cgroup the agent attaches to, so tests show it does not capture itself), and
    /// waits up to 30 s for it to log "agent ready".
    pub fn start_agent(&self, config: &AgentConfig) -> Result<Agent> {
        let info = self.agent_node(config)?;
        agent::start(&self.shared, &info, config)
    }

    /// The node `config` is for.
    fn agent_node(&self, config: &AgentConfig) -> Result<Arc<NodeInfo>> {
        self.shared.node(&config.node).ok_or_else(|| {
            anyhow!(
                "start_agent: this bed has no node named {:?}; add it with add_node first",
                config.node
            )
        })
    }

    /// Like [`TestBed::start_agent`], on a kernel that refuses to attach programs by
    /// `BPF_PROG_ATTACH` (a seccomp filter on the agent; `BPF_LINK_CREATE` still works): as on a
    /// kernel without `sk_skb` sockmap programs, the same-node splice cannot load.
    pub fn start_agent_refusing_prog_attach(&self, config: &AgentConfig) -> Result<Agent> {
        let info = self.agent_node(config)?;
        agent::start_refusing_prog_attach(&self.shared, &info, config)
    }

    /// Like [`TestBed::start_agent`], with `log_filter` as the agent's `AMBIT_LOG` instead of
    /// [`TEST_LOG_FILTER`](crate::TEST_LOG_FILTER) (debug): benchmarks run the agent as a user
    /// would, at `info`, where per-connection debug lines do not cost CPU.
    pub fn start_agent_with_log_filter(
        &self,
        config: &AgentConfig,
        log_filter: &str,
    ) -> Result<Agent> {
        let info = self.agent_node(config)?;
        agent::start_with_log_filter(&self.shared, &info, config, log_filter)
    }

    /// Spawns `cmd` (made with [`Pod::command`] or [`Node::command`], or a plain one for the host)
    /// and tracks it, so it is killed when the handle or the bed is dropped.
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        self.shared.tracker.spawn(cmd, "the test bed")
    }

    fn cleanup(&self) {
        let s = &self.shared;
        let panicking = std::thread::panicking();
        let mut problems = Vec::new();

        s.tracker.kill_all();
        cgroup::kill_all(&s.cgroup_root);
        // Unpinning first releases the agents' programs and links (and the netns and cgroups
        // they hold) before those are deleted.
        if s.bpf_root.exists()
            && let Err(e) = fs::remove_dir_all(&s.bpf_root)
        {
            problems.push(format!("bpffs dir {}: {e}", s.bpf_root.display()));
        }

        let netns = std::mem::take(&mut lock(&s.state).netns);
        for name in netns.iter().rev() {
            if let Err(e) = ip(["netns", "del", name]) {
                problems.push(format!("netns {name}: {e:#}"));
            }
        }
        if let Err(e) = cgroup::remove_tree(&s.cgroup_root, Duration::from_secs(5)) {
            problems.push(format!("{e:#}"));
        }
        let keep_tmp = panicking || s.keep_tmp.load(Ordering::Relaxed);
        if keep_tmp {
            if panicking {
                print_agent_logs(&s.tmp);
            }
            eprintln!(
                "testbed {}: keeping logs and configs in {}",
                s.id,
                s.tmp.display()
            );
        } else if let Err(e) = fs::remove_dir_all(&s.tmp)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            problems.push(format!("temp dir {}: {e}", s.tmp.display()));
        }
        if !problems.is_empty() {
            eprintln!(
                "testbed {}: could not clean up everything (remove by hand, or call \
                 ambit_testbed::cleanup_stale() once this process has exited):\n  {}",
                s.id,
                problems.join("\n  ")
            );
        }
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// On a failing test, shows the end of each agent log, which usually says why.
fn print_agent_logs(tmp: &Path) {
    let Ok(entries) = fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("agent-") && name.ends_with(".log") {
            eprintln!(
                "---- last lines of {} ----\n{}",
                e.path().display(),
                agent::tail(&e.path(), 40)
            );
        }
    }
}

fn add_pod_routes(netns: &str, m: usize) -> Result<()> {
    ip_in(
        netns,
        &[
            "route",
            "add",
            &format!("10.{m}.0.0/24"),
            "via",
            &format!("10.0.0.{m}"),
        ],
    )?;
    ip_in(
        netns,
        &[
            "-6",
            "route",
            "add",
            &format!("fd00:{m}::/64"),
            "via",
            &format!("fd00::{m}"),
        ],
    )?;
    Ok(())
}

/// Waits until `ifaces` have carrier and no IPv6 address in `netns` is tentative.
fn wait_links_ready(netns: &str, ifaces: &[&str]) -> Result<()> {
    let mut last = String::new();
    let ready = crate::poll(LINK_READY_TIMEOUT, || {
        for iface in ifaces {
            match ip_in(netns, &["-o", "link", "show", "dev", iface]) {
                Ok(out) if out.contains("LOWER_UP") => {}
                Ok(out) => {
                    last = format!("{iface} has no carrier yet: {}", out.trim());
                    return None;
                }
                Err(e) => {
                    last = format!("{e:#}");
                    return None;
                }
            }
        }
        match ip_in(netns, &["-6", "-o", "addr", "show", "tentative"]) {
            Ok(out) if out.trim().is_empty() => Some(()),
            Ok(out) => {
                last = format!("IPv6 addresses still tentative: {}", out.trim());
                None
            }
            Err(e) => {
                last = format!("{e:#}");
                None
            }
        }
    });
    ready.ok_or_else(|| {
        anyhow!("links in netns {netns} not ready after {LINK_READY_TIMEOUT:?}: {last}")
    })
}

impl Node {
    /// The node's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// 0-based index, in the order nodes were added.
    pub fn index(&self) -> usize {
        self.info.index
    }

    /// The node's netns name, `ab-<id>-<node>`.
    pub fn netns_name(&self) -> &str {
        &self.info.netns
    }

    /// `/run/netns/<netns name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.info.netns)
    }

    /// The node's cgroup, the pods' parent (absolute path).
    pub fn cgroup_dir(&self) -> &Path {
        &self.info.cgroup_dir
    }

    /// The node's cgroup relative to the cgroup v2 mount, e.g. `/ambit-test-<id>/node-a`: where
    /// the agent attaches its programs.
    pub fn cgroup_rel(&self) -> &str {
        &self.info.cgroup_rel
    }

    /// The cgroup the node's agent runs in (absolute path), `<node cgroup>/agent`.
    pub fn agent_cgroup_dir(&self) -> PathBuf {
        self.info.cgroup_dir.join("agent")
    }

    /// The cgroup that plays the node's kubelet (absolute path): a sibling of the node's cgroup,
    /// so the pods' capture programs do not apply to it.
    pub fn kubelet_cgroup_dir(&self) -> PathBuf {
        self.bed
            .cgroup_root
            .join(format!("{}-kubelet", self.info.name))
    }

    /// [`Node::kubelet_cgroup_dir`] relative to the cgroup v2 mount (for `probes.kubeletCgroup`).
    pub fn kubelet_cgroup_rel(&self) -> String {
        format!("/{DIR_PREFIX}{}/{}-kubelet", self.bed.id, self.info.name)
    }

    /// The bed's cgroup relative to the cgroup v2 mount: every process of the bed's nodes is
    /// below it (for `probes.hostCgroup`).
    pub fn host_cgroup_rel(&self) -> String {
        format!("/{DIR_PREFIX}{}", self.bed.id)
    }

    /// A client (`ambit-testpod connect`, as [`Pod::connect`]) run from this node's netns in the
    /// cgroup `cgroup_dir`: a host process, the kubelet, ...
    pub fn connect_from(
        &self,
        cgroup_dir: &Path,
        addr: SocketAddr,
        bytes: usize,
        timeout_ms: u64,
    ) -> Result<crate::ClientReport> {
        let bin = self.bed.testpod_bin()?;
        let cmd = process::command_in(&bin, &self.netns_path(), cgroup_dir)?;
        crate::workload::spawn_client(
            |c| self.spawn(c),
            cmd,
            &format!("node {}", self.info.name),
            crate::workload::ClientRun {
                addr,
                bytes,
                hold_ms: 0,
                timeout_ms,
                extra: &[],
            },
        )?
        .wait()
    }

    /// The agent's bpffs pin directory, `/sys/fs/bpf/ambit-test-<id>/<node>` (made by the agent).
    pub fn bpf_pin_path(&self) -> &Path {
        &self.info.pin_path
    }

    /// Underlay IPv4 address, `10.0.0.(k+1)`.
    pub fn underlay_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 0, 0, octet(self.info.index + 1))
    }

    /// Underlay IPv6 address, `fd00::(k+1)`.
    pub fn underlay_v6(&self) -> Ipv6Addr {
        hex_group_addr(&format!("fd00::{}", self.info.index + 1))
    }

    /// The pods' gateway (the node's `br0`), `10.(k+1).0.1`.
    pub fn gateway_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, octet(self.info.index + 1), 0, 1)
    }

    /// The pods' IPv6 gateway, `fd00:(k+1)::1`.
    pub fn gateway_v6(&self) -> Ipv6Addr {
        hex_group_addr(&format!("fd00:{}::1", self.info.index + 1))
    }

    /// The pods on this node, in the order they were added.
    pub fn pods(&self) -> Vec<Pod> {
        lock(&self.bed.state)
            .pods
            .iter()
            .filter(|p| p.node == self.info.name)
            .map(|info| Pod {
                bed: Arc::clone(&self.bed),
                info: Arc::clone(info),
            })
            .collect()
    }

    /// A command that runs `program` in this node's netns and its agent cgroup.
    ///
    /// # Panics
    /// If the netns or cgroup cannot be opened (the bed was dropped); see [`Node::try_command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program)
            .unwrap_or_else(|e| panic!("node {}: {e:#}", self.info.name))
    }

    /// Like [`Node::command`], returning an error instead of panicking.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        self.command_in_cgroup(program, &self.agent_cgroup_dir())
    }

    /// A command that runs `program` in this node's netns and in the cgroup directory
    /// `cgroup_dir` (absolute path).
    pub fn command_in_cgroup(
        &self,
        program: impl AsRef<OsStr>,
        cgroup_dir: &Path,
    ) -> Result<Command> {
        process::command_in(program, &self.netns_path(), cgroup_dir)
    }

    /// Spawns `cmd` (usually from [`Node::command`]) and tracks it like [`TestBed::spawn`].
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        self.bed
            .tracker
            .spawn(cmd, &format!("node {}", self.info.name))
    }

    /// Runs `args[0] args[1..]` in the node (netns and agent cgroup) to completion; returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("exec needs a program"))?;
        let mut cmd = self.try_command(program)?;
        cmd.args(rest);
        cmd::run_command(&mut cmd).with_context(|| format!("in node {}", self.info.name))
    }
}

impl Pod {
    /// The pod's name.
    pub fn name(&self) -> &str {
        &self.info.name
    }

    /// The pod's Kubernetes namespace (for the agent config).
    pub fn namespace(&self) -> &str {
        &self.info.namespace
    }

    /// The pod's service account (for the agent config).
    pub fn service_account(&self) -> &str {
        &self.info.service_account
    }

    /// The name of the node it runs on.
    pub fn node_name(&self) -> &str {
        &self.info.node
    }

    /// 0-based index among the pods added to its node.
    pub fn index(&self) -> usize {
        self.info.index
    }

    /// The pod's IPv4 address.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.info.ipv4
    }

    /// The pod's IPv6 address.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.info.ipv6
    }

    /// Both addresses, IPv4 first.
    pub fn ips(&self) -> Vec<IpAddr> {
        vec![self.info.ipv4.into(), self.info.ipv6.into()]
    }

    /// `ipv4:port`.
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.info.ipv4.into(), port)
    }

    /// `[ipv6]:port`.
    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(self.info.ipv6.into(), port)
    }

    /// The pod's netns name, `ab-<id>-<node>-<pod>`.
    pub fn netns_name(&self) -> &str {
        &self.info.netns
    }

    /// `/run/netns/<netns name>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new(NETNS_DIR).join(&self.info.netns)
    }

    /// The pod's cgroup (absolute path).
    pub fn cgroup_dir(&self) -> &Path {
        &self.info.cgroup_dir
    }

    /// A command that runs `program` in this pod's netns and cgroup.
    ///
    /// # Panics
    /// If the netns or cgroup cannot be opened (the pod was removed or the bed dropped); see
    /// [`Pod::try_command`].
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.try_command(program)
            .unwrap_or_else(|e| panic!("pod {}: {e:#}", self.info.name))
    }

    /// Like [`Pod::command`], returning an error instead of panicking.
    pub fn try_command(&self, program: impl AsRef<OsStr>) -> Result<Command> {
        process::command_in(program, &self.netns_path(), &self.info.cgroup_dir)
    }

    /// Spawns `cmd` (usually from [`Pod::command`]) and tracks it like [`TestBed::spawn`].
    pub fn spawn(&self, cmd: &mut Command) -> Result<Process> {
        self.bed
            .tracker
            .spawn(cmd, &format!("pod {}", self.info.name))
    }

    /// Runs `args[0] args[1..]` in the pod to completion; returns stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("exec needs a program"))?;
        let mut cmd = self.try_command(program)?;
        cmd.args(rest);
        cmd::run_command(&mut cmd).with_context(|| format!("in pod {}", self.info.name))
    }
}

fn octet(n: usize) -> u8 {
    u8::try_from(n).unwrap_or(u8::MAX)
}

/// Parses an IPv6 address we format ourselves (decimal numbers used as hex groups, as the
/// addressing plan writes them: node 12's bridge is `fd00:12::1`).
fn hex_group_addr(s: &str) -> Ipv6Addr {
    s.parse().unwrap_or(Ipv6Addr::UNSPECIFIED)
}

/// Removes what beds of processes that no longer run left behind (network namespaces, cgroups,
/// bpffs pins, temp dirs), e.g. after a test binary was killed. Returns the ids it cleaned.
/// Best effort: prints what it could not remove.
pub fn cleanup_stale() -> Vec<String> {
    let mut ids = std::collections::BTreeSet::new();
    let id_alive = |id: &str| -> bool {
        let pid_hex = id.split('-').next().unwrap_or("");
        match u32::from_str_radix(pid_hex, 16) {
            Ok(pid) => Path::new("/proc").join(pid.to_string()).exists(),
            Err(_) => true, // not ours: leave it alone
        }
    };
    let cgroup_mount = cgroup::cgroup2_mount().ok();
    let dirs: Vec<PathBuf> = [
        cgroup_mount.clone(),
        Some(PathBuf::from(BPFFS)),
        Some(std::env::temp_dir()),
    ]
    .into_iter()
    .flatten()
    .collect();
    for dir in &dirs {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(id) = name.strip_prefix(DIR_PREFIX) {
                    ids.insert(id.to_owned());
                }
            }
        }
    }
    let netns: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    for name in &netns {
        let mut parts = name.splitn(4, '-');
        if let (Some("ab"), Some(pid), Some(rest), Some(_)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        {
            let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
            // Our ids are `<pid hex>-<counter hex><4 hex random digits>`.
            if hex(pid) && hex(rest) && rest.len() >= 5 {
                ids.insert(format!("{pid}-{rest}"));
            }
        }
    }
    let mut cleaned = Vec::new();
    for id in ids {
        if id_alive(&id) {
            continue;
        }
        let mut problems = Vec::new();
        let prefix = format!("{NETNS_PREFIX}{id}-");
        for name in netns.iter().filter(|n| n.starts_with(&prefix)) {
            if let Err(e) = ip(["netns", "del", name]) {
                problems.push(format!("{e:#}"));
            }
        }
        let dir_name = format!("{DIR_PREFIX}{id}");
        if let Some(mount) = &cgroup_mount
            && let Err(e) = cgroup::remove_tree(&mount.join(&dir_name), Duration::from_secs(5))
        {
            problems.push(format!("{e:#}"));
        }
        for dir in [
            Path::new(BPFFS).join(&dir_name),
            std::env::temp_dir().join(&dir_name),
        ] {
            if dir.exists()
                && let Err(e) = fs::remove_dir_all(&dir)
            {
                problems.push(format!("{}: {e}", dir.display()));
            }
        }
        if problems.is_empty() {
            eprintln!("testbed: removed leftovers of bed {id} (its process is gone)");
        } else {
            eprintln!(
                "testbed: could not remove all leftovers of bed {id}:\n  {}",
                problems.join("\n  ")
            );
        }
        cleaned.push(id);
    }
    cleaned
}
