//! The traffic part: two nodes, a client pod and a server pod on each path, servers started once,
//! then every scenario through the direct paths (no agent anywhere yet) and, with both agents up
//! and the pods enrolled, through the same-node and cross-node paths. Agent CPU is read around
//! every run, agent memory before and after the load.

use std::{fmt, fs, path::Path, time::Duration};

use ambit_testbed::{Agent, Pod, Process, TestBed};
use anyhow::{Context, Result, bail};
use serde::Serialize;

use crate::{
    header, os, procfs, step,
    tools::{self, Http, Iperf, Runner, Sockperf},
};

const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;
/// The agent's log level in the benchmark: what a user runs (the access log is on).
const AGENT_LOG: &str = "info";
/// How long past its own duration a tool may take before it is killed.
const TOOL_GRACE: Duration = Duration::from_secs(30);

/// A path the traffic takes from the client pod to a server pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum PathId {
    #[serde(rename = "direct-same-node")]
    DirectSame,
    #[serde(rename = "same-node")]
    Same,
    /// The same pods through node-a's agent with `acceleration.sameNode: false`: HBONE to the
    /// local pod, every byte through the agent (what `same-node` was before the kernel splice).
    #[serde(rename = "same-node-user-space")]
    SameUserSpace,
    #[serde(rename = "direct-cross-node")]
    DirectCross,
    #[serde(rename = "cross-node")]
    Cross,
    /// HTTP only: client's agent -> waypoint (`ambit-agent waypoint`) -> server's agent.
    #[serde(rename = "waypoint")]
    Waypoint,
}

impl PathId {
    pub const ALL: [PathId; 6] = [
        PathId::DirectSame,
        PathId::Same,
        PathId::SameUserSpace,
        PathId::DirectCross,
        PathId::Cross,
        PathId::Waypoint,
    ];
    const DIRECT: [PathId; 2] = [PathId::DirectSame, PathId::DirectCross];
    const MESH: [PathId; 2] = [PathId::Same, PathId::Cross];

    pub fn key(self) -> &'static str {
        match self {
            PathId::DirectSame => "direct-same-node",
            PathId::Same => "same-node",
            PathId::SameUserSpace => "same-node-user-space",
            PathId::DirectCross => "direct-cross-node",
            PathId::Cross => "cross-node",
            PathId::Waypoint => "waypoint",
        }
    }

    /// The direct path a mesh path is compared with (the same pods, no agent).
    pub fn reference(self) -> Option<PathId> {
        match self {
            PathId::Same | PathId::SameUserSpace => Some(PathId::DirectSame),
            PathId::Cross | PathId::Waypoint => Some(PathId::DirectCross),
            _ => None,
        }
    }

    pub fn is_mesh(self) -> bool {
        self.reference().is_some()
    }

    pub fn description(self) -> &'static str {
        match self {
            PathId::DirectSame => {
                "client and server pods on node-a, no agent running and no eBPF attached"
            }
            PathId::Same => {
                "the same pods, both enrolled: admitted by node-a's agent, then spliced in the \
                 kernel (acceleration.sameNode, the default)"
            }
            PathId::SameUserSpace => {
                "the same pods through node-a's agent with acceleration.sameNode: false (HBONE \
                 to the local pod, every byte through the agent)"
            }
            PathId::DirectCross => {
                "client pod on node-a, server pod on node-b, no agent running and no eBPF attached"
            }
            PathId::Cross => {
                "the same pods, both enrolled: through both agents and HBONE mTLS between nodes"
            }
            PathId::Waypoint => {
                "HTTP only: the client pod calls a service VIP whose waypoint (ambit-agent waypoint, \
                 in a pod on node-b) routes each request to the server pod on node-b; HBONE on \
                 every hop"
            }
        }
    }
}

impl fmt::Display for PathId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.key())
    }
}

/// What a run measures, with which tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    Iperf { streams: u32, reverse: bool },
    Sockperf,
    Wrk,
    Hey,
}

pub const SCENARIOS: [Scenario; 7] = [
    Scenario::Iperf {
        streams: 1,
        reverse: false,
    },
    Scenario::Iperf {
        streams: 1,
        reverse: true,
    },
    Scenario::Iperf {
        streams: 4,
        reverse: false,
    },
    Scenario::Iperf {
        streams: 4,
        reverse: true,
    },
    Scenario::Sockperf,
    Scenario::Wrk,
    Scenario::Hey,
];

impl Scenario {
    /// Whether the waypoint path runs it (an L7 proxy carries HTTP).
    fn is_http(self) -> bool {
        matches!(self, Scenario::Wrk | Scenario::Hey)
    }

    pub fn key(self) -> String {
        match self {
            Scenario::Iperf { streams, reverse } => format!(
                "iperf3-{streams}-stream{}-{}",
                if streams == 1 { "" } else { "s" },
                if reverse {
                    "server-to-client"
                } else {
                    "client-to-server"
                }
            ),
            Scenario::Sockperf => "sockperf-ping-pong-tcp-1k".into(),
            Scenario::Wrk => "wrk-keepalive".into(),
            Scenario::Hey => "hey-new-connection-per-request".into(),
        }
    }
}

/// The benchmark's knobs.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub runs: usize,
    pub seconds: u64,
    pub http_connections: u32,
    pub message_bytes: u32,
    pub iperf_port: u16,
    pub sockperf_first_port: u16,
    pub http_port: u16,
    pub agent_log_level: &'static str,
    pub sockperf_pinning: String,
}

impl Settings {
    pub fn new(runs: usize, seconds: u64, http_connections: u32) -> Settings {
        Settings {
            runs,
            seconds,
            http_connections,
            message_bytes: 1024,
            iperf_port: IPERF_PORT,
            sockperf_first_port: SOCKPERF_PORT,
            http_port: HTTP_PORT,
            agent_log_level: AGENT_LOG,
            sockperf_pinning: format!(
                "client on CPU {SOCKPERF_CLIENT_CPU}, server on CPU {SOCKPERF_SERVER_CPU} \
                 (taskset; other tools and the agents are not pinned)"
            ),
        }
    }
}

/// One run of one scenario on one path.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    pub path: PathId,
    pub scenario: String,
    pub round: usize,
    pub command: String,
    /// CPU seconds (user + system) both agents (and the waypoint, on its path) used during the
    /// run; none on direct paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_seconds: Option<f64>,
    /// The part of it spent in the kernel (system time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agent_cpu_system_seconds: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iperf3: Option<Iperf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sockperf: Option<Sockperf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub kind: Scenario,
}

/// Resident memory of one agent over the benchmark, in bytes.
#[derive(Debug, Clone, Serialize)]
pub struct AgentMemory {
    pub node: String,
    /// VmRSS samples after start (pods enrolled, certificates issued), before any load.
    pub idle_rss: Vec<f64>,
    /// RssAnon at the same moments (the agent's own memory; the rest is mapped files).
    pub idle_anon: Vec<f64>,
    /// VmHWM after the load: the peak resident memory of its whole life.
    pub peak_rss: f64,
    /// VmRSS samples a second after the load ended.
    pub rss_after_load: Vec<f64>,
    pub anon_after_load: Vec<f64>,
}

/// Everything the traffic part measured.
#[derive(Debug, Serialize)]
pub struct Traffic {
    pub runs: Vec<Run>,
    pub agents: Vec<AgentMemory>,
}

struct Topology {
    client: Pod,
    server_a: Pod,
    server_b: Pod,
}

/// The service whose waypoint the waypoint path goes through (backed by server-b).
const WAYPOINT_VIP: &str = "10.96.0.80";

impl Topology {
    fn server(&self, path: PathId) -> &Pod {
        match path {
            PathId::DirectSame | PathId::Same | PathId::SameUserSpace => &self.server_a,
            PathId::DirectCross | PathId::Cross | PathId::Waypoint => &self.server_b,
        }
    }

    /// The address the client dials on `path`.
    fn target(&self, path: PathId) -> String {
        match path {
            PathId::Waypoint => WAYPOINT_VIP.to_owned(),
            _ => self.server(path).ipv4().to_string(),
        }
    }
}

pub fn run(bed: &TestBed, runner: &Runner, settings: &Settings) -> Result<Traffic> {
    header("bench: two nodes, a client pod and two server pods");
    let node_a = bed.add_node("node-a")?;
    let node_b = bed.add_node("node-b")?;
    let topo = Topology {
        client: bed.add_pod_in(&node_a, "client", "bench", "client")?,
        server_a: bed.add_pod_in(&node_a, "server-a", "bench", "server")?,
        server_b: bed.add_pod_in(&node_b, "server-b", "bench", "server")?,
    };
    let waypoint_pod = bed.add_pod_in(&node_b, "waypoint", "bench", "waypoint")?;
    for pod in [&topo.client, &topo.server_a, &topo.server_b, &waypoint_pod] {
        step(&format!(
            "{:<9} on {}  {}",
            pod.name(),
            pod.node_name(),
            pod.ipv4()
        ));
    }
    let _servers = [
        start_servers(runner, &topo.server_a)?,
        start_servers(runner, &topo.server_b)?,
    ];
    os::check_stop()?;

    let mut runs = Vec::new();
    header("bench: direct paths (no agent, no eBPF)");
    warm_up(runner, &topo, &PathId::DIRECT)?;
    measure(runner, settings, &topo, &PathId::DIRECT, &[], &mut runs)?;

    header("bench: starting both agents and enrolling the pods");
    let services = serde_json::json!([{
        "namespace": "bench", "name": "web", "vips": [WAYPOINT_VIP],
        "ports": [{"port": HTTP_PORT}],
        "waypoint": {"address": waypoint_pod.ipv4()},
    }]);
    let backs_web = |peers: &mut Vec<ambit_testbed::PeerConfig>| {
        for p in peers.iter_mut().filter(|p| p.name == topo.server_b.name()) {
            p.services = vec!["bench/web".to_owned()];
        }
    };
    let mut config_a = bed.agent_config(&node_a);
    config_a
        .enroll(&topo.client)
        .enroll(&topo.server_a)
        .add_peer(&topo.server_b)
        .add_peer(&waypoint_pod);
    backs_web(&mut config_a.peers);
    config_a.extra.insert("services".into(), services.clone());
    let mut config_b = bed.agent_config(&node_b);
    config_b
        .enroll(&topo.server_b)
        .add_pod(&waypoint_pod, false)
        .add_peer(&topo.client);
    if let Some(p) = config_b.pod_mut(topo.server_b.name()) {
        p.services = vec!["bench/web".to_owned()];
    }
    config_b.extra.insert("services".into(), services.clone());
    let mut config_w = bed.waypoint_config(&waypoint_pod);
    config_w.add_peer(&topo.server_b).add_peer(&topo.client);
    backs_web(&mut config_w.peers);
    config_w.extra.insert("services".into(), services);

    header("bench: same node in user space (acceleration.sameNode: false)");
    let mut config_off = config_a.clone();
    config_off.extra.insert(
        "acceleration".into(),
        serde_json::json!({"sameNode": false}),
    );
    let agent_off = bed
        .start_agent_with_log_filter(&config_off, AGENT_LOG)
        .context("the agent on node-a (splice off) did not start")?;
    warm_up(runner, &topo, &[PathId::SameUserSpace])?;
    measure(
        runner,
        settings,
        &topo,
        &[PathId::SameUserSpace],
        &[&agent_off],
        &mut runs,
    )?;
    agent_off
        .stop()
        .context("stopping node-a's agent (splice off)")?;

    let agent_a = bed
        .start_agent_with_log_filter(&config_a, AGENT_LOG)
        .context("the agent on node-a did not start")?;
    let agent_b = bed
        .start_agent_with_log_filter(&config_b, AGENT_LOG)
        .context("the agent on node-b did not start")?;
    let agents = [&agent_a, &agent_b];
    // Let start-up work (certificates, eBPF attach) settle before calling it idle.
    std::thread::sleep(Duration::from_secs(1));
    let mut idle = Vec::new();
    for agent in agents {
        let samples = procfs::memory_samples(agent.pid(), 10, Duration::from_millis(100))?;
        step(&format!(
            "{}: agent ready (pid {}), idle RSS {:.1} MiB ({:.1} MiB anonymous)",
            agent.node(),
            agent.pid(),
            crate::report::median(&samples.0).unwrap_or(0.0) / MIB,
            crate::report::median(&samples.1).unwrap_or(0.0) / MIB
        ));
        idle.push(samples);
    }
    os::check_stop()?;

    header("bench: through the agents");
    warm_up(runner, &topo, &PathId::MESH)?;
    measure(runner, settings, &topo, &PathId::MESH, &agents, &mut runs)?;

    header("bench: through a waypoint (HTTP)");
    let waypoint = bed
        .start_waypoint_with_log_filter(&waypoint_pod, &config_w, AGENT_LOG)
        .context("the waypoint did not start")?;
    step(&format!(
        "waypoint ready (pid {}) in pod {}, for service bench/web {WAYPOINT_VIP}:{HTTP_PORT}",
        waypoint.pid(),
        waypoint_pod.name()
    ));
    warm_up(runner, &topo, &[PathId::Waypoint])?;
    measure(
        runner,
        settings,
        &topo,
        &[PathId::Waypoint],
        &[&agent_a, &agent_b, &waypoint],
        &mut runs,
    )?;
    for agent in agents {
        if !agent.is_running() {
            bail!(
                "the agent on {} exited during the benchmark; see its log {}",
                agent.node(),
                agent.log_path().display()
            );
        }
    }

    let peaks: Vec<f64> = agents
        .iter()
        .map(|a| procfs::rss(a.pid()).map(|(_, hwm)| hwm as f64))
        .collect::<Result<_>>()?;
    std::thread::sleep(Duration::from_secs(1));
    let mut memory = Vec::new();
    for ((agent, (idle_rss, idle_anon)), peak_rss) in agents.iter().zip(idle).zip(peaks) {
        let (rss_after_load, anon_after_load) =
            procfs::memory_samples(agent.pid(), 10, Duration::from_millis(100))?;
        memory.push(AgentMemory {
            node: agent.node().to_owned(),
            idle_rss,
            idle_anon,
            peak_rss,
            rss_after_load,
            anon_after_load,
        });
    }
    Ok(Traffic {
        runs,
        agents: memory,
    })
}

pub const MIB: f64 = 1024.0 * 1024.0;

/// iperf3 and nginx listening in a server pod (they live as long as the handles).
fn start_servers(runner: &Runner, pod: &Pod) -> Result<Vec<Process>> {
    let iperf = runner.serve(
        pod,
        &strings(&["iperf3", "-s", "-p", &IPERF_PORT.to_string()]),
        IPERF_PORT,
    )?;
    let dir = runner.dir().join(format!("nginx-{}", pod.name()));
    let conf = write_nginx_config(&dir)?;
    let nginx = runner.serve(
        pod,
        &[
            "nginx".into(),
            "-p".into(),
            dir.display().to_string(),
            "-c".into(),
            conf.display().to_string(),
            "-e".into(),
            "stderr".into(),
        ],
        HTTP_PORT,
    )?;
    step(&format!(
        "{}: iperf3 :{IPERF_PORT}, nginx :{HTTP_PORT} (and sockperf from :{SOCKPERF_PORT}, one per run)",
        pod.name()
    ));
    Ok(vec![iperf, nginx])
}

/// One nginx process (no master) serving a 1 KiB page, everything under `dir`.
/// A sockperf server in `pod`, for one run.
///
/// A fresh one per run: sockperf's server blocks in recvfrom() on one connection at a time, so a
/// connection left open on the server side (the agent does not pass a client's RST on through
/// the tunnel, see the report's notes) would stall every later run.
/// Each run listens on a port of its own (`SOCKPERF_PORT + n`): the old server's side of such a
/// connection lingers after it is killed, and sockperf does not bind over it.
fn start_sockperf_server(runner: &Runner, pod: &Pod, port: u16) -> Result<Process> {
    runner.serve(
        pod,
        &pinned(
            SOCKPERF_SERVER_CPU,
            strings(&[
                "sockperf",
                "server",
                "--tcp",
                "-i",
                "0.0.0.0",
                "-p",
                &port.to_string(),
            ]),
        ),
        port,
    )
}

fn write_nginx_config(dir: &Path) -> Result<std::path::PathBuf> {
    let www = dir.join("www");
    fs::create_dir_all(&www).with_context(|| format!("cannot create {}", www.display()))?;
    fs::write(www.join("index.html"), "a".repeat(1024))?;
    let d = dir.display();
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {d}/nginx.pid;\n\
         error_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {d}/body;\n\
         \x20 proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n\
         \x20 uwsgi_temp_path {d}/uwsgi;\n\
         \x20 scgi_temp_path {d}/scgi;\n\
         \x20 keepalive_requests 10000000;\n\
         \x20 default_type text/html;\n\
         \x20 server {{\n\
         \x20   listen {HTTP_PORT};\n\
         \x20   root {d}/www;\n\
         \x20 }}\n\
         }}\n"
    );
    let path = dir.join("nginx.conf");
    fs::write(&path, conf).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// sockperf's client and server run on different CPUs, as on two hosts: left to the scheduler,
/// the direct round trip is 6-9 µs when both land on one CPU and ~80 µs when a wake-up crosses
/// CPUs (an inter-processor interrupt on this VM), so the direct reference would flip between
/// runs. The agents are not pinned.
const SOCKPERF_CLIENT_CPU: usize = 0;
const SOCKPERF_SERVER_CPU: usize = 1;

/// `args` under `taskset -c cpu` when the machine has more than one CPU.
fn pinned(cpu: usize, args: Vec<String>) -> Vec<String> {
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        return args;
    }
    let mut all = strings(&["taskset", "-c", &cpu.to_string()]);
    all.extend(args);
    all
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

fn client_command(
    settings: &Settings,
    scenario: Scenario,
    ip: &str,
    sockperf_port: u16,
) -> Vec<String> {
    let ip = ip.to_owned();
    let secs = settings.seconds.to_string();
    let conns = settings.http_connections.to_string();
    let url = format!("http://{ip}:{HTTP_PORT}/");
    match scenario {
        Scenario::Iperf { streams, reverse } => {
            let mut args = strings(&[
                "iperf3",
                "-c",
                &ip,
                "-p",
                &IPERF_PORT.to_string(),
                "-t",
                &secs,
                "-P",
                &streams.to_string(),
                "-J",
                "--connect-timeout",
                "5000",
            ]);
            if reverse {
                args.push("-R".into());
            }
            args
        }
        Scenario::Sockperf => pinned(
            SOCKPERF_CLIENT_CPU,
            strings(&[
                "sockperf",
                "ping-pong",
                "--tcp",
                "-i",
                &ip,
                "-p",
                &sockperf_port.to_string(),
                "-m",
                &settings.message_bytes.to_string(),
                "-t",
                &secs,
                "--full-rtt",
            ]),
        ),
        Scenario::Wrk => strings(&[
            "wrk",
            "-t",
            "1",
            "-c",
            &conns,
            "-d",
            &format!("{secs}s"),
            "--latency",
            "--timeout",
            "5s",
            &url,
        ]),
        Scenario::Hey => strings(&[
            "hey",
            "-z",
            &format!("{secs}s"),
            "-c",
            &conns,
            "-disable-keepalive",
            "-t",
            "5",
            &url,
        ]),
    }
}

/// A few hundred requests on each path first, so pooled tunnels and certificates exist before
/// anything is timed (bounded by count, not time).
fn warm_up(runner: &Runner, topo: &Topology, paths: &[PathId]) -> Result<()> {
    for &path in paths {
        let server = topo.server(path);
        runner.check_target(server.ipv4().into())?;
        let url = format!("http://{}:{HTTP_PORT}/", topo.target(path));
        let args = strings(&["hey", "-n", "400", "-c", "4", "-t", "5", &url]);
        let out = runner
            .run(&topo.client, &args, TOOL_GRACE)
            .with_context(|| format!("warm-up on the {path} path"))?;
        let http = tools::parse_hey(&out).with_context(|| format!("warm-up on the {path} path"))?;
        if http.ok_requests == 0 {
            bail!(
                "warm-up on the {path} path: no request succeeded ({} errors); is the path broken?",
                http.errors
            );
        }
    }
    Ok(())
}

fn agents_cpu(agents: &[&Agent]) -> Result<procfs::CpuTime> {
    agents.iter().map(|a| procfs::cpu_time(a.pid())).sum()
}

/// Every scenario on every path, `settings.runs` rounds; paths alternate within a round.
fn measure(
    runner: &Runner,
    settings: &Settings,
    topo: &Topology,
    paths: &[PathId],
    agents: &[&Agent],
    runs: &mut Vec<Run>,
) -> Result<()> {
    let limit = Duration::from_secs(settings.seconds) + TOOL_GRACE;
    // Counted across calls: a port a mesh path used may still be held on the server.
    static SOCKPERF_RUNS: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    for round in 0..settings.runs {
        for scenario in SCENARIOS {
            for &path in paths {
                if path == PathId::Waypoint && !scenario.is_http() {
                    continue;
                }
                os::check_stop()?;
                // The load ends at a pod of this bed (a VIP leads to one).
                let server = topo.server(path);
                runner.check_target(server.ipv4().into())?;
                let sockperf_port =
                    SOCKPERF_PORT + SOCKPERF_RUNS.load(std::sync::atomic::Ordering::Relaxed) % 1000;
                let args = client_command(settings, scenario, &topo.target(path), sockperf_port);
                let sockperf_server = match scenario {
                    Scenario::Sockperf => {
                        SOCKPERF_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        Some(start_sockperf_server(runner, server, sockperf_port)?)
                    }
                    _ => None,
                };
                let before = agents_cpu(agents)?;
                let result = runner.run(&topo.client, &args, limit);
                let after = agents_cpu(agents)?;
                drop(sockperf_server);
                os::check_stop()?;
                let mut run = Run {
                    path,
                    scenario: scenario.key(),
                    round,
                    command: args.join(" "),
                    agent_cpu_seconds: path
                        .is_mesh()
                        .then(|| after.since(before).total().as_secs_f64()),
                    agent_cpu_system_seconds: path
                        .is_mesh()
                        .then(|| after.since(before).system.as_secs_f64()),
                    iperf3: None,
                    sockperf: None,
                    http: None,
                    error: None,
                    kind: scenario,
                };
                let parsed = result.and_then(|out| {
                    parse_into(&mut run, scenario, &out)
                        .with_context(|| format!("its output ended: {}", tools::tail(&out, 8)))
                });
                if let Err(e) = parsed {
                    run.error = Some(format!("{e:#}"));
                }
                step(&format!(
                    "round {}/{} {:<18} {:<38} {}",
                    round + 1,
                    settings.runs,
                    path.key(),
                    run.scenario,
                    summary(&run)
                ));
                runs.push(run);
            }
        }
    }
    Ok(())
}

/// Reads a client tool's output into `run`.
fn parse_into(run: &mut Run, scenario: Scenario, out: &str) -> Result<()> {
    match scenario {
        Scenario::Iperf { .. } => run.iperf3 = Some(tools::parse_iperf(out)?),
        Scenario::Sockperf => run.sockperf = Some(tools::parse_sockperf(out)?),
        Scenario::Wrk => run.http = Some(tools::parse_wrk(out)?),
        Scenario::Hey => run.http = Some(tools::parse_hey(out)?),
    }
    Ok(())
}

fn summary(run: &Run) -> String {
    let cpu = run
        .agent_cpu_seconds
        .map(|c| format!(", agents {c:.2} CPU-s"))
        .unwrap_or_default();
    if let Some(e) = &run.error {
        return format!("FAILED: {e}");
    }
    if let Some(i) = &run.iperf3 {
        return format!("{:.2} Gbit/s{cpu}", i.bits_per_second / 1e9);
    }
    if let Some(s) = &run.sockperf {
        return format!("RTT p50 {:.1} µs, p99 {:.1} µs{cpu}", s.p50_us, s.p99_us);
    }
    if let Some(h) = &run.http {
        let errors = if h.errors > 0 {
            format!(", {} errors", h.errors)
        } else {
            String::new()
        };
        return format!(
            "{:.0} req/s, p50 {:.2} ms{errors}{cpu}",
            h.requests_per_second, h.p50_ms
        );
    }
    String::new()
}
