//! The agent under test: its standalone config (written as JSON, which is YAML), starting it in a
//! node, and reading its JSON log lines (events, access log).

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Read, Seek, SeekFrom},
    net::IpAddr,
    path::{Path, PathBuf},
    process::{ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    bed::{NodeInfo, Pod, Shared},
    log_field, log_message,
    process::{self, Process},
};

/// How long [`TestBed::start_agent`](crate::TestBed::start_agent) waits for "agent ready".
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long [`Agent::reload`] waits for "config applied".
const RELOAD_TIMEOUT: Duration = Duration::from_secs(15);
/// How long [`Agent::stop`] waits for the agent to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Log lines shown in errors.
const TAIL_LINES: usize = 40;

/// The agent's standalone config file (camelCase keys, as the agent reads them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentConfig {
    /// The node's name.
    pub node: String,
    /// The pods' parent cgroup relative to the cgroup v2 mount, where the agent attaches.
    pub cgroup: String,
    /// The agent's bpffs pin directory.
    pub bpf_pin_path: PathBuf,
    /// Sources whose inbound connections pass uncaptured (kubelet probes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_addresses: Vec<IpAddr>,
    /// Pod-local ports whose inbound connections are not captured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbound_excluded_ports: Vec<u16>,
    /// Destination ports whose outbound connections are not captured.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbound_excluded_ports: Vec<u16>,
    /// How long a shutdown waits for open connections (agent default when unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drain_timeout_seconds: Option<f64>,
    /// Where the agent keeps state: a directory of the bed's, never the host's /var/lib/ambit.
    pub state_dir: PathBuf,
    /// The admin API socket: in the bed's directory, one per node (never /run/ambit).
    pub admin_socket: PathBuf,
    /// Where the agent leaves the mesh's namespaces for the CNI plugin (in the bed's directory).
    pub cni_state_file: PathBuf,
    /// The CA: by default the built-in one, with its root in a directory shared by all agents of
    /// the bed (so every node of the bed trusts the others).
    pub ca: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_domain: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trust_roots: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_lifetime_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hbone: Option<Value>,
    /// The node's pods.
    #[serde(default)]
    pub pods: Vec<PodConfig>,
    /// Workloads on other nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<PeerConfig>,
    /// Further top-level keys, written as they are (for config the bed does not model yet).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// A pod entry of [`AgentConfig`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodConfig {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// The pod's netns file, `/run/netns/<name>`.
    pub netns: PathBuf,
    /// Whether its traffic is captured; `None` lets the namespace and pod labels decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrolled: Option<bool>,
    /// Pod labels (`istio.io/dataplane-mode: none` opts it out).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Services it backs (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// Overrides the config's `dns.capture` for this pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_capture: Option<bool>,
    /// The waypoint its inbound traffic must come through (`{"address": ip}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Value>,
}

impl PodConfig {
    /// The entry for `pod`.
    pub fn for_pod(pod: &Pod, enrolled: bool) -> PodConfig {
        PodConfig {
            namespace: pod.namespace().to_owned(),
            name: pod.name().to_owned(),
            service_account: pod.service_account().to_owned(),
            ips: pod.ips(),
            netns: pod.netns_path(),
            enrolled: Some(enrolled),
            labels: Default::default(),
            services: Vec::new(),
            dns_capture: None,
            waypoint: None,
        }
    }
}

/// A `peers` entry of [`AgentConfig`]: a workload on another node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerConfig {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub ips: Vec<IpAddr>,
    /// Reached through HBONE.
    pub hbone: bool,
    /// A SPIFFE id to expect instead of the one derived from the agent's trust domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Services it backs (`namespace/name`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The waypoint traffic to it goes through (`{"address": ip}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waypoint: Option<Value>,
}

impl AgentConfig {
    pub(crate) fn for_node(node: &NodeInfo, bed_tmp: &Path) -> AgentConfig {
        AgentConfig {
            state_dir: bed_tmp.join(format!("state-{}", node.name)),
            admin_socket: bed_tmp.join(format!("admin-{}.sock", node.name)),
            cni_state_file: bed_tmp.join(format!("cni-state-{}.json", node.name)),
            ca: serde_json::json!({ "builtin": { "dir": bed_tmp.join("ca") } }),
            trust_domain: None,
            trust_roots: None,
            cert_lifetime_seconds: None,
            hbone: None,
            peers: Vec::new(),
            node: node.name.clone(),
            cgroup: node.cgroup_rel.clone(),
            bpf_pin_path: node.pin_path.clone(),
            node_addresses: Vec::new(),
            inbound_excluded_ports: Vec::new(),
            outbound_excluded_ports: Vec::new(),
            drain_timeout_seconds: None,
            pods: Vec::new(),
            extra: serde_json::Map::new(),
        }
    }

    /// Adds `pod` as enrolled (or marks its entry enrolled).
    pub fn enroll(&mut self, pod: &Pod) -> &mut Self {
        self.add_pod(pod, true)
    }

    /// Adds `pod`, replacing an existing entry with the same namespace and name.
    pub fn add_pod(&mut self, pod: &Pod, enrolled: bool) -> &mut Self {
        let entry = PodConfig::for_pod(pod, enrolled);
        match self
            .pods
            .iter_mut()
            .find(|p| p.namespace == entry.namespace && p.name == entry.name)
        {
            Some(existing) => *existing = entry,
            None => self.pods.push(entry),
        }
        self
    }

    /// Adds `pod` (on another node) as a peer reached through HBONE, with its own identity.
    pub fn add_peer(&mut self, pod: &Pod) -> &mut Self {
        self.add_peer_as(pod, pod.service_account(), true)
    }

    /// Adds `pod` as a peer expected to have `service_account`'s identity (to test identity
    /// mismatches) and reached through HBONE or not.
    pub fn add_peer_as(&mut self, pod: &Pod, service_account: &str, hbone: bool) -> &mut Self {
        self.peers
            .retain(|p| !(p.namespace == pod.namespace() && p.name == pod.name()));
        self.peers.push(PeerConfig {
            namespace: pod.namespace().to_owned(),
            name: pod.name().to_owned(),
            service_account: service_account.to_owned(),
            ips: pod.ips(),
            hbone,
            identity: None,
            services: Vec::new(),
            waypoint: None,
        });
        self
    }

    /// Removes the entry of `pod`, if any.
    pub fn remove_pod(&mut self, pod: &Pod) -> &mut Self {
        self.pods
            .retain(|p| !(p.namespace == pod.namespace() && p.name == pod.name()));
        self
    }

    /// The entry of the pod called `name`, to edit.
    pub fn pod_mut(&mut self, name: &str) -> Option<&mut PodConfig> {
        self.pods.iter_mut().find(|p| p.name == name)
    }

    /// The peer entry of the pod called `name`, to edit.
    pub fn peer_mut(&mut self, name: &str) -> Option<&mut PeerConfig> {
        self.peers.iter_mut().find(|p| p.name == name)
    }

    /// The config as the agent reads it (JSON, which is valid YAML). A waypoint's config (with
    /// `waypoint` in `extra`) has no cgroup, pin path or pods: a waypoint captures nothing.
    pub fn to_json(&self) -> String {
        let mut v = serde_json::to_value(self)
            .unwrap_or_else(|e| panic!("BUG: agent config does not serialize: {e}"));
        if self.extra.contains_key("waypoint")
            && let Some(map) = v.as_object_mut()
        {
            for key in ["cgroup", "bpfPinPath", "pods", "cniStateFile"] {
                map.remove(key);
            }
        }
        serde_json::to_string_pretty(&v)
            .unwrap_or_else(|e| panic!("BUG: agent config does not serialize: {e}"))
    }

    /// The `waypoint` section of a waypoint's config, to edit (routes, authorization, ...).
    ///
    /// # Panics
    /// If this is not a waypoint's config ([`TestBed::waypoint_config`](crate::TestBed::waypoint_config)).
    pub fn waypoint_mut(&mut self) -> &mut serde_json::Map<String, Value> {
        self.extra
            .get_mut("waypoint")
            .and_then(Value::as_object_mut)
            .expect("waypoint_mut: not a waypoint config (make it with TestBed::waypoint_config)")
    }

    /// Writes the config to `path` atomically (a temp file renamed over it), so the agent never
    /// reads half a file.
    pub fn write_to(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, self.to_json())
            .with_context(|| format!("cannot write agent config {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
    }
}

/// A position in an agent's log: events after it are the ones that happened later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogMark(u64);

/// A running `ambit-agent`. Killed when dropped, if still running.
pub struct Agent {
    node: String,
    admin_socket: PathBuf,
    process: Process,
    log_path: PathBuf,
    config_path: PathBuf,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.node)
            .field("pid", &self.process.pid())
            .field("log", &self.log_path)
            .finish()
    }
}

/// The agent's log filter in tests: debug for our code, info for the libraries.
pub const TEST_LOG_FILTER: &str = "debug,aya=info,aya_obj=info,rustls=info,tonic=info,h2=info,hyper=info,hyper_util=info,tower=info";

/// How to launch one `ambit-agent` process under test.
struct Launch<'a> {
    /// `run` or `waypoint`.
    subcommand: &'a str,
    /// Config and log file stem in the bed's dir, e.g. `agent-node-a`.
    stem: String,
    netns: PathBuf,
    cgroup: PathBuf,
    /// How errors name it, e.g. `node node-a`.
    label: String,
    /// Log messages that must all appear before it counts as started.
    ready: &'a [&'a str],
    /// Run it where the kernel refuses `BPF_PROG_ATTACH` (see
    /// [`process::refuse_bpf_prog_attach`]).
    refuse_prog_attach: bool,
}

/// Writes `config`, starts the agent with its log in the bed's dir, and waits for `ready`.
fn launch(shared: &Shared, config: &AgentConfig, log_filter: &str, l: Launch<'_>) -> Result<Agent> {
    let bin = shared.agent_bin()?;
    let config_path = shared.tmp.join(format!("{}.yaml", l.stem));
    let log_path = shared.tmp.join(format!("{}.log", l.stem));
    config.write_to(&config_path)?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let log_err = log
        .try_clone()
        .with_context(|| format!("cannot open log {}", log_path.display()))?;
    let start_mark = LogMark(log.metadata().map(|m| m.len()).unwrap_or(0));
    let mut cmd = process::command_in(&bin, &l.netns, &l.cgroup)?;
    if l.refuse_prog_attach {
        process::refuse_bpf_prog_attach(&mut cmd);
    }
    cmd.arg(l.subcommand)
        .arg("--config")
        .arg(&config_path)
        .args(["--log-format", "json"])
        .env("AMBIT_LOG", log_filter)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    let process = shared.tracker.spawn(&mut cmd, &l.label)?;
    let agent = Agent {
        node: config.node.clone(),
        admin_socket: config.admin_socket.clone(),
        process,
        log_path,
        config_path,
    };
    for message in l.ready {
        agent
            .wait_for_log_after(
                start_mark,
                |v| log_message(v) == Some(message),
                READY_TIMEOUT,
            )
            .with_context(|| format!("{} did not log {message:?}", l.label))?;
    }
    Ok(agent)
}

/// Starts `ambit-agent waypoint` in `pod`'s netns and cgroup with `config`, and waits until it
/// listens and has its certificate.
pub(crate) fn start_waypoint(
    shared: &Shared,
    pod: &Pod,
    config: &AgentConfig,
    log_filter: &str,
) -> Result<Agent> {
    if !config.extra.contains_key("waypoint") {
        bail!("start_waypoint: the config has no waypoint section (use TestBed::waypoint_config)");
    }
    launch(
        shared,
        config,
        log_filter,
        Launch {
            subcommand: "waypoint",
            stem: format!("waypoint-{}", pod.name()),
            netns: pod.netns_path(),
            cgroup: pod.cgroup_dir().to_owned(),
            label: format!("waypoint {}", pod.name()),
            ready: &["HBONE server certificate in place", "waypoint ready"],
            refuse_prog_attach: false,
        },
    )
}

pub(crate) fn start(shared: &Shared, node: &NodeInfo, config: &AgentConfig) -> Result<Agent> {
    start_with_log_filter(shared, node, config, TEST_LOG_FILTER)
}

/// Starts `ambit-agent run` for `node` (in its netns, in the cgroup below the one the agent
/// attaches to) and waits for "agent ready".
pub(crate) fn start_with_log_filter(
    shared: &Shared,
    node: &NodeInfo,
    config: &AgentConfig,
    log_filter: &str,
) -> Result<Agent> {
    launch(shared, config, log_filter, node_agent(node, false))
}

/// Like [`start`], where the kernel refuses `BPF_PROG_ATTACH` to the agent.
pub(crate) fn start_refusing_prog_attach(
    shared: &Shared,
    node: &NodeInfo,
    config: &AgentConfig,
) -> Result<Agent> {
    launch(shared, config, TEST_LOG_FILTER, node_agent(node, true))
}

fn node_agent(node: &NodeInfo, refuse_prog_attach: bool) -> Launch<'static> {
    Launch {
        subcommand: "run",
        stem: format!("agent-{}", node.name),
        netns: Path::new("/run/netns").join(&node.netns),
        cgroup: node.cgroup_dir.join("agent"),
        label: format!("node {}", node.name),
        ready: &["agent ready"],
        refuse_prog_attach,
    }
}

impl Agent {
    /// The node it runs on.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Its admin API socket (what `ambitctl --socket` takes).
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// Runs `ambitctl --socket <this agent's> args` and returns its output.
    pub fn ambitctl(&self, args: &[&str]) -> Result<std::process::Output> {
        let bin = crate::binaries::ambitctl()?;
        std::process::Command::new(&bin)
            .arg("--socket")
            .arg(&self.admin_socket)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))
    }

    /// `ambitctl -o json args`, parsed; fails with ambitctl's stderr if it exits non-zero.
    pub fn ambitctl_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.ambitctl(&all)?;
        if !out.status.success() {
            anyhow::bail!(
                "ambitctl {} failed ({}): {}",
                all.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "ambitctl {} printed no JSON: {}",
                all.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Its process handle.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Whether it is still running.
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// Its log file (stdout and stderr; appended to across restarts on the same node).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// Every JSON line of the log so far (other lines are skipped).
    pub fn log_lines(&self) -> Vec<Value> {
        let mut reader = LogReader::new(&self.log_path, LogMark(0));
        reader.read_new()
    }

    /// The access-log lines so far (`"target":"access"`).
    pub fn access_logs(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|v| v.get("target").and_then(Value::as_str) == Some("access"))
            .collect()
    }

    /// The current end of the log, to wait for events that happen after it.
    pub fn mark(&self) -> LogMark {
        LogMark(fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0))
    }

    /// Waits up to `timeout` for a log line matching `pred`, from the start of the log.
    pub fn wait_for_log(
        &self,
        pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_for_log_after(LogMark(0), pred, timeout)
    }

    /// Waits up to `timeout` for a log line after `mark` matching `pred`. Fails early if the agent
    /// exits; errors carry the end of the log.
    pub fn wait_for_log_after(
        &self,
        mark: LogMark,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let mut reader = LogReader::new(&self.log_path, mark);
        loop {
            let exited = self.process.try_wait()?;
            // Read after checking for exit, so the last lines of an exited agent are seen.
            if let Some(v) = reader.read_new().into_iter().find(|v| pred(v)) {
                return Ok(v);
            }
            if let Some(status) = exited {
                bail!(
                    "agent on node {} exited ({status}); its last log lines in {}:\n{}",
                    self.node,
                    self.log_path.display(),
                    tail_since(&self.log_path, mark, TAIL_LINES)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "no matching log line from the agent on node {} within {timeout:?}; its last \
                     log lines in {}:\n{}",
                    self.node,
                    self.log_path.display(),
                    tail_since(&self.log_path, mark, TAIL_LINES)
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits for an access-log line after `mark` matching `pred`.
    pub fn wait_for_access_log_after(
        &self,
        mark: LogMark,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        self.wait_for_log_after(
            mark,
            |v| v.get("target").and_then(Value::as_str) == Some("access") && pred(v),
            timeout,
        )
    }

    /// Waits for the access-log line of a connection in `direction` ("outbound" / "inbound") to
    /// `dst` (the address the client dialed), logged after `mark`.
    pub fn wait_for_connection_log(
        &self,
        mark: LogMark,
        direction: &str,
        dst: std::net::SocketAddr,
        timeout: Duration,
    ) -> Result<Value> {
        let dst = dst.to_string();
        self.wait_for_access_log_after(
            mark,
            |v| {
                crate::log_str(v, "direction") == Some(direction)
                    && crate::log_str(v, "dst.addr") == Some(dst.as_str())
            },
            timeout,
        )
        .with_context(|| format!("no {direction} access log for {dst} on {}", self.node))
    }

    /// Writes `config` over the agent's config file (atomically), sends SIGHUP and waits for the
    /// agent to log "config applied". Returns that line; a refused reload is an error naming
    /// the agent's reason.
    pub fn reload(&self, config: &AgentConfig) -> Result<Value> {
        self.try_reload(config)?.map_err(|reason| {
            anyhow!(
                "agent on node {} refused the new config: {reason}",
                self.node
            )
        })
    }

    /// As [`Agent::reload`], but a refusal is an answer: `Ok(Err(reason))` with the error the
    /// agent logged ("config reload refused").
    pub fn try_reload(&self, config: &AgentConfig) -> Result<std::result::Result<Value, String>> {
        if config.node != self.node {
            bail!(
                "reload: config is for node {} but this agent runs on {}",
                config.node,
                self.node
            );
        }
        let mark = self.mark();
        config.write_to(&self.config_path)?;
        self.process.signal(Signal::SIGHUP)?;
        let line = self
            .wait_for_log_after(
                mark,
                |v| {
                    log_message(v).is_some_and(|m| {
                        m == "config applied"
                            || m == "waypoint config applied"
                            || m == "config reload refused; keeping the previous config"
                    })
                },
                RELOAD_TIMEOUT,
            )
            .with_context(|| {
                format!(
                    "agent on node {} neither applied nor refused the new config",
                    self.node
                )
            })?;
        if log_message(&line).is_some_and(|m| m.starts_with("config reload refused")) {
            let reason = crate::log_str(&line, "error").unwrap_or("(no reason logged)");
            return Ok(Err(reason.to_owned()));
        }
        Ok(Ok(line))
    }

    /// Sends SIGTERM and waits up to 15 s for the agent to exit; returns its exit status. If it
    /// does not exit, kills it and returns an error.
    pub fn stop(&self) -> Result<ExitStatus> {
        self.process.signal(Signal::SIGTERM)?;
        if let Some(status) = self.process.wait_timeout(STOP_TIMEOUT)? {
            return Ok(status);
        }
        let killed = self.process.kill();
        Err(anyhow!(
            "agent on node {} did not exit within {STOP_TIMEOUT:?} after SIGTERM, killed it \
             ({killed:?}); last lines of {}:\n{}",
            self.node,
            self.log_path.display(),
            tail(&self.log_path, TAIL_LINES)
        ))
    }

    /// The value of `field` in `line` as a string, e.g. `Agent::field_str(&v, "src.addr")`.
    pub fn field_str<'a>(line: &'a Value, field: &str) -> Option<&'a str> {
        log_field(line, field).and_then(Value::as_str)
    }
}

/// Reads complete lines of a growing log file from a byte offset, parsing JSON ones.
struct LogReader {
    path: PathBuf,
    offset: u64,
}

impl LogReader {
    fn new(path: &Path, mark: LogMark) -> LogReader {
        LogReader {
            path: path.to_owned(),
            offset: mark.0,
        }
    }

    /// JSON lines completed since the last call; a trailing partial line is left for later.
    fn read_new(&mut self) -> Vec<Value> {
        let Ok(mut file) = File::open(&self.path) else {
            return Vec::new();
        };
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return Vec::new();
        }
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() {
            return Vec::new();
        }
        let Some(last_newline) = buf.iter().rposition(|b| *b == b'\n') else {
            return Vec::new();
        };
        let complete = &buf[..=last_newline];
        self.offset += complete.len() as u64;
        complete
            .split(|b| *b == b'\n')
            .filter_map(|line| {
                let line = line.trim_ascii();
                if line.first() != Some(&b'{') {
                    return None;
                }
                serde_json::from_slice(line).ok()
            })
            .collect()
    }
}

/// The last `n` lines of a file, for error messages.
pub(crate) fn tail(path: &Path, n: usize) -> String {
    tail_since(path, LogMark(0), n)
}

/// The last `n` lines of a file after `mark`, for error messages.
fn tail_since(path: &Path, mark: LogMark, n: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return format!("(cannot read {})", path.display());
    };
    if file.seek(SeekFrom::Start(mark.0)).is_err() {
        return format!("(cannot read {})", path.display());
    }
    let lines: Vec<String> = BufReader::new(file).lines().map_while(Result::ok).collect();
    if lines.is_empty() {
        return "(nothing logged)".to_owned();
    }
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn log_reader_skips_non_json_and_partial_lines() {
        let dir = std::env::temp_dir().join(format!("ambit-logreader-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("create temp dir");
        let path = dir.join("log");
        fs::write(&path, "plain text\n{\"message\":\"a\"}\n{\"message\":\"b\"").expect("write");
        let mut r = LogReader::new(&path, LogMark(0));
        let got = r.read_new();
        assert_eq!(got.len(), 1);
        assert_eq!(log_message(&got[0]), Some("a"));
        let mut f = OpenOptions::new().append(true).open(&path).expect("open");
        f.write_all(b"}\n").expect("append");
        let got = r.read_new();
        assert_eq!(got.len(), 1);
        assert_eq!(log_message(&got[0]), Some("b"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn config_serializes_camel_case_without_empty_optionals() {
        let cfg = AgentConfig {
            node: "node-a".into(),
            cgroup: "/ambit-test-1/node-a".into(),
            bpf_pin_path: "/sys/fs/bpf/ambit-test-1/node-a".into(),
            node_addresses: Vec::new(),
            inbound_excluded_ports: Vec::new(),
            outbound_excluded_ports: vec![22],
            drain_timeout_seconds: None,
            admin_socket: "/tmp/ambit-test-1/admin-node-a.sock".into(),
            cni_state_file: "/tmp/ambit-test-1/cni-state-node-a.json".into(),
            pods: vec![PodConfig {
                namespace: "default".into(),
                name: "client".into(),
                service_account: "default".into(),
                ips: vec!["10.1.0.2".parse().expect("ip")],
                netns: "/run/netns/x".into(),
                enrolled: Some(true),
                labels: Default::default(),
                services: Vec::new(),
                dns_capture: None,
                waypoint: None,
            }],
            extra: serde_json::Map::new(),
            state_dir: "/tmp/x/state-node-a".into(),
            ca: serde_json::json!({"builtin": {"dir": "/tmp/x/ca"}}),
            trust_domain: None,
            trust_roots: None,
            cert_lifetime_seconds: None,
            hbone: None,
            peers: Vec::new(),
        };
        let v: Value = serde_json::from_str(&cfg.to_json()).expect("json");
        assert_eq!(v["ca"]["builtin"]["dir"], "/tmp/x/ca");
        assert!(v.get("peers").is_none());
        assert_eq!(v["bpfPinPath"], "/sys/fs/bpf/ambit-test-1/node-a");
        assert_eq!(v["outboundExcludedPorts"][0], 22);
        assert!(v.get("nodeAddresses").is_none());
        assert_eq!(v["pods"][0]["serviceAccount"], "default");
    }
}
