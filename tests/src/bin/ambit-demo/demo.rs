//! `cargo xtask demo`: a two-node cluster on the test bed with agents on both nodes, real echo
//! traffic (same node and across nodes, IPv4 and IPv6, and from a pod outside the mesh), and a
//! report of which connections went through which agent, from the agents' access logs; a service
//! with an endpoint on each node that prefers the client's node (locality-aware load balancing);
//! then HTTP through an Ambit waypoint configured from the cluster (a stand-in Kubernetes API
//! with an HTTPRoute and an AuthorizationPolicy: a weighted split, an L7 denial, then the route
//! changed live), and the DNS proxy (a mesh name answered by the agent, another name by the
//! pod's resolver).

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use ambit_testbed::{
    Agent, ClientReport, Pod, TestBed,
    kube_server::{self, KubeApi},
    log_field,
};
use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::{header, sigint, step};

const PORT: u16 = 8080;
/// The virtual IP of service `web`, which has a waypoint.
const WEB_VIP: &str = "10.96.0.20";
/// The virtual IP of service `nearby`, whose endpoints are on both nodes, the client's first.
const NEARBY_VIP: &str = "10.96.0.30";
/// The port node-b's policy `no-9090` denies.
const DENIED_PORT: u16 = 9090;
/// Where a kept demo (`--keep`) says who it is, for `--down`; `AMBIT_DEMO_KEEP_FILE` moves it
/// (the test suite's own demo must not touch a user's).
const KEEP_FILE: &str = "/run/ambit-demo.json";
const KEEP_FILE_ENV: &str = "AMBIT_DEMO_KEEP_FILE";

fn keep_file() -> std::path::PathBuf {
    std::env::var_os(KEEP_FILE_ENV).map_or_else(|| KEEP_FILE.into(), Into::into)
}
/// The line a kept demo prints once the cluster is ready to poke at (`cargo xtask demo --keep`
/// waits for it).
pub const KEPT_MARKER: &str = "ambit-demo: kept";

#[derive(clap::Args)]
pub struct Options {
    /// Bytes each client sends (and expects echoed).
    #[arg(long, default_value_t = 64 * 1024)]
    bytes: usize,
    /// After the report, keep the cluster up until Ctrl-C (to look around with `ip netns exec`).
    #[arg(long, conflicts_with = "keep")]
    hold: bool,
    /// After the report, print the commands to try and keep the cluster up until SIGTERM or
    /// `--down` (what `cargo xtask demo --keep` runs in the background).
    #[arg(long)]
    keep: bool,
    /// Keep the agents' configs and logs after teardown.
    #[arg(long)]
    keep_logs: bool,
}

pub fn run(options: &Options) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the demo needs root for network namespaces, cgroups and eBPF; run it as root");
    }
    // Beside this program in the target dir, or where the environment points, as for the tests.
    let agent_bin = ambit_testbed::agent_bin()?;
    let testpod_bin = ambit_testbed::testpod_bin()?;
    if options.keep
        && let Some(pid) = kept_demo()
    {
        bail!(
            "a demo is kept already (pid {pid}, recorded in {}); `cargo xtask demo --down` stops it first",
            keep_file().display()
        );
    }
    sigint::install()?;
    let cleaned = ambit_testbed::cleanup_stale();
    if !cleaned.is_empty() {
        step(&format!(
            "removed leftovers of crashed test beds: {cleaned:?}"
        ));
    }
    // The bed lives inside `demo`, so it is torn down before we report how the demo ended.
    let result = demo(options, &agent_bin, &testpod_bin);
    // A kept demo ends by a signal (`--down`): that is its normal end once it was kept.
    if sigint::interrupted() && !(options.keep && result.is_ok()) {
        bail!("demo interrupted; the cluster was torn down");
    }
    result?;
    eprintln!("\ndemo finished; the cluster was torn down");
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if sigint::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

struct Connection<'a> {
    from: &'a Pod,
    to: &'a Pod,
    dst: SocketAddr,
    report: ClientReport,
}

fn demo(options: &Options, agent_bin: &Path, testpod_bin: &Path) -> Result<()> {
    header("demo: building a two-node cluster in network namespaces");
    let bed = TestBed::new()?;
    bed.set_agent_bin(agent_bin);
    bed.set_testpod_bin(testpod_bin);
    bed.set_keep_tmp(options.keep_logs);
    let node_a = bed.add_node("node-a")?;
    let node_b = bed.add_node("node-b")?;
    let client_a = bed.add_pod(&node_a, "client-a")?;
    let server_a = bed.add_pod(&node_a, "server-a")?;
    let outsider = bed.add_pod(&node_a, "outsider")?;
    let client_b = bed.add_pod(&node_b, "client-b")?;
    let server_b = bed.add_pod(&node_b, "server-b")?;
    // The L7 part: service `web` (two versions, one per node) behind a waypoint on node-b.
    let web_v1 = bed.add_pod_in(&node_a, "web-v1", "default", "web")?;
    let web_v2 = bed.add_pod_in(&node_b, "web-v2", "default", "web")?;
    let waypoint = bed.add_pod_in(&node_b, "waypoint", "default", "waypoint")?;
    // The pods' DNS resolver (outside the mesh), for the DNS proxy scene.
    let resolver = bed.add_pod(&node_a, "resolver")?;
    check_interrupt()?;
    let services = serde_json::json!([
        {"namespace": "default", "name": "web", "vips": [WEB_VIP],
         "ports": [{"port": 80, "targetPort": PORT}], "waypoint": {"address": waypoint.ipv4()}},
        {"namespace": "default", "name": "web-v1", "vips": ["10.96.0.21"],
         "ports": [{"port": 80, "targetPort": PORT}]},
        {"namespace": "default", "name": "web-v2", "vips": ["10.96.0.22"],
         "ports": [{"port": 80, "targetPort": PORT}]},
        // Endpoints on both nodes; as Kubernetes' `trafficDistribution: PreferClose` on a
        // one-zone cluster becomes: the client's node first, the other when it has none.
        {"namespace": "default", "name": "nearby", "vips": [NEARBY_VIP],
         "ports": [{"port": 80, "targetPort": PORT}],
         "loadBalancing": {"routingPreference": ["NODE"], "mode": "FAILOVER"}},
    ]);
    let backs_web = |config: &mut ambit_testbed::AgentConfig| {
        for (pod, version) in [(&web_v1, "web-v1"), (&web_v2, "web-v2")] {
            let list = vec!["default/web".to_owned(), format!("default/{version}")];
            if let Some(p) = config.pods.iter_mut().find(|p| p.name == pod.name()) {
                p.services = list.clone();
            }
            if let Some(p) = config.peers.iter_mut().find(|p| p.name == pod.name()) {
                p.services = list;
            }
        }
        for pod in [&server_a, &server_b] {
            let list = vec!["default/nearby".to_owned()];
            if let Some(p) = config.pods.iter_mut().find(|p| p.name == pod.name()) {
                p.services = list.clone();
            }
            if let Some(p) = config.peers.iter_mut().find(|p| p.name == pod.name()) {
                p.services = list;
            }
        }
        config.extra.insert("services".into(), services.clone());
    };

    let mut config_a = bed.agent_config(&node_a);
    config_a
        .enroll(&client_a)
        .enroll(&server_a)
        .enroll(&web_v1)
        .add_pod(&outsider, false)
        .add_pod(&resolver, false);
    // node-a's agent serves its pods' DNS.
    config_a
        .extra
        .insert("dns".into(), json!({"capture": true}));
    // Each node knows the other's mesh pods: where HBONE applies and which identity to expect.
    config_a
        .add_peer(&client_b)
        .add_peer(&server_b)
        .add_peer(&web_v2)
        .add_peer(&waypoint);
    backs_web(&mut config_a);
    let mut config_b = bed.agent_config(&node_b);
    config_b
        .enroll(&client_b)
        .enroll(&server_b)
        .enroll(&web_v2)
        .add_pod(&waypoint, false);
    config_b
        .add_peer(&client_a)
        .add_peer(&server_a)
        .add_peer(&web_v1);
    backs_web(&mut config_b);
    // Something for `explain` to deny: nothing in namespace default takes connections on 9090
    // (on both nodes, as a control plane pushes a namespace's policies to every node).
    let no_9090 = serde_json::json!([{"name": "no-9090", "namespace": "default",
        "scope": "NAMESPACE", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{"destinationPorts": [DENIED_PORT]}]}]}]}]);
    config_a.extra.insert("policies".into(), no_9090.clone());
    config_b.extra.insert("policies".into(), no_9090);
    let mut config_w = bed.waypoint_config(&waypoint);
    config_w
        .add_peer(&web_v1)
        .add_peer(&web_v2)
        .add_peer(&client_a)
        .add_peer(&client_b);
    backs_web(&mut config_w);
    // The waypoint's routes and policies come from the cluster, as Istio's waypoint's do.
    let api = cluster(&waypoint)?;
    api.configure(&bed, &mut config_w);

    eprintln!(
        "    {:<10} {:<8} {:<12} {:<14} in the mesh",
        "pod", "node", "IPv4", "IPv6"
    );
    for pod in [
        &client_a, &server_a, &outsider, &resolver, &web_v1, &client_b, &server_b, &web_v2,
        &waypoint,
    ] {
        let enrolled = ![outsider.name(), waypoint.name(), resolver.name()].contains(&pod.name());
        eprintln!(
            "    {:<10} {:<8} {:<12} {:<14} {}",
            pod.name(),
            pod.node_name(),
            pod.ipv4(),
            pod.ipv6(),
            if enrolled { "yes" } else { "no" }
        );
    }

    header("demo: starting the agents");
    let agent_a = bed
        .start_agent(&config_a)
        .context("the agent on node-a did not start")?;
    step(&format!(
        "node-a: agent ready (pid {}, log {})",
        agent_a.pid(),
        agent_a.log_path().display()
    ));
    check_interrupt()?;
    let agent_b = bed
        .start_agent(&config_b)
        .context("the agent on node-b did not start")?;
    step(&format!(
        "node-b: agent ready (pid {}, log {})",
        agent_b.pid(),
        agent_b.log_path().display()
    ));
    check_interrupt()?;

    header(&format!("demo: echo servers on port {PORT}, then traffic"));
    let echo_a = server_a.serve(PORT)?;
    let echo_b = server_b.serve(PORT)?;
    let cases: [(&Pod, &Pod, SocketAddr); 8] = [
        (&client_a, &server_a, server_a.v4(PORT)),
        (&client_a, &server_a, server_a.v6(PORT)),
        (&client_a, &server_b, server_b.v4(PORT)),
        (&client_a, &server_b, server_b.v6(PORT)),
        (&client_b, &server_a, server_a.v4(PORT)),
        (&client_b, &server_a, server_a.v6(PORT)),
        (&outsider, &server_a, server_a.v4(PORT)),
        (&outsider, &server_b, server_b.v6(PORT)),
    ];
    // Watch the link between the nodes while the traffic runs.
    // Only while the mesh pods talk (cases 1-6); the outsider is plaintext by design.
    let mut capture = Capture::start(&bed, &node_a);
    let mut wire = None;
    let mut connections = Vec::new();
    for (i, (from, to, dst)) in cases.into_iter().enumerate() {
        if i == 6 {
            wire = capture.take().and_then(Capture::stop);
        }
        check_interrupt()?;
        let report = from
            .connect(dst, options.bytes)
            .with_context(|| format!("cannot run the client in {}", from.name()))?;
        step(&format!(
            "{} -> {dst}: {}",
            from.name(),
            if report.ok { "ok" } else { "failed" }
        ));
        connections.push(Connection {
            from,
            to,
            dst,
            report,
        });
    }

    // Access-log lines are written when a connection closes: give the agents a moment.
    let agents = [&agent_a, &agent_b];
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut seen = via_agents(&agents, &connections);
    while seen.iter().any(Vec::is_empty) && Instant::now() < deadline && !sigint::interrupted() {
        std::thread::sleep(Duration::from_millis(100));
        seen = via_agents(&agents, &connections);
    }

    header("demo: report");
    let mut through = 0;
    for (i, (c, via)) in connections.iter().zip(&seen).enumerate() {
        let family = if c.dst.is_ipv4() { "IPv4" } else { "IPv6" };
        let path = if c.from.node_name() == c.to.node_name() {
            "same node"
        } else {
            "cross-node"
        };
        let source = if c.from.name() == outsider.name() {
            format!("{} (not in the mesh)", c.from.name())
        } else {
            c.from.name().to_owned()
        };
        let outcome = if c.report.ok {
            format!("{} bytes echoed", c.report.received)
        } else {
            format!(
                "FAILED ({}: {}), {} of {} bytes echoed",
                c.report
                    .error_kind
                    .as_deref()
                    .unwrap_or("no error reported"),
                c.report.error_message.as_deref().unwrap_or("").trim(),
                c.report.received,
                options.bytes
            )
        };
        let via_text = if via.is_empty() {
            "direct (no agent logged it)".to_owned()
        } else {
            through += 1;
            format!("via {}", via.join(" -> "))
        };
        let src = c
            .report
            .local
            .map_or_else(|| "?".to_owned(), |a| a.to_string());
        eprintln!(
            "  {:>2}. {source} {src} -> {} {} ({family}, {path}): {outcome}; {via_text}",
            i + 1,
            c.to.name(),
            c.dst,
        );
    }
    let failed = connections.iter().filter(|c| !c.report.ok).count();
    eprintln!(
        "\n  {} connections: {} ok, {failed} failed; {through} went through an agent",
        connections.len(),
        connections.len() - failed
    );
    for agent in agents {
        // What the eBPF programs counted on this node, as an operator reads it: through the
        // agent's admin socket.
        match agent.ambitctl_json(&["bpf"]) {
            Ok(v) => eprintln!("  {} eBPF counters: {}", agent.node(), v["counters"]),
            Err(e) => eprintln!("  {}: ambitctl bpf failed: {e:#}", agent.node()),
        }
    }

    match wire {
        Some(w) => eprintln!(
            "\n  mesh traffic (1-6) on the wire between the nodes (node-a eth0): {} packets to/from \
             port 15008 (TLS), {} to/from port 8080; payload bytes seen in clear: {}",
            w.hbone_packets,
            w.plaintext_packets,
            if w.payload_visible { "YES" } else { "none" }
        ),
        None => eprintln!("\n  (no packet capture: tcpdump unavailable)"),
    }

    check_interrupt()?;
    locality_scene(
        [&agent_a, &agent_b],
        [&client_a, &client_b],
        [&echo_a, &echo_b],
    )?;
    check_interrupt()?;
    // Kept running until the end (for `--keep`).
    let _waypoint = waypoint_scene(&bed, &client_a, [&web_v1, &web_v2], &waypoint, &config_w)?;
    check_interrupt()?;
    live_route_scene(&api, &client_a)?;
    check_interrupt()?;
    let _resolver = dns_scene(&client_a, &resolver)?;

    if options.keep {
        keep(
            &bed,
            &[&agent_a, &agent_b],
            &client_a,
            &server_b,
            &outsider,
            &web_v2,
        )?;
    } else if options.hold {
        header("demo: holding the cluster (Ctrl-C to tear down)");
        for name in bed.netns_names() {
            step(&format!("ip netns exec {name} <command>"));
        }
        while !sigint::interrupted() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if options.keep_logs {
        step(&format!(
            "logs and configs kept in {}",
            bed.tmp_dir().display()
        ));
    }
    header("demo: tearing down");
    Ok(())
}

/// Service `nearby` has an endpoint on each node and prefers the client's node: each client's
/// connections stay on its node, and `explain` says why.
fn locality_scene(
    agents: [&Agent; 2],
    clients: [&Pod; 2],
    echoes: [&ambit_testbed::Server; 2],
) -> Result<()> {
    const CONNECTIONS: usize = 6;
    header(&format!(
        "demo: service nearby ({NEARBY_VIP}:80, an endpoint on each node) prefers the client's node"
    ));
    let vip: SocketAddr = format!("{NEARBY_VIP}:80").parse()?;
    for client in clients {
        let before: Vec<usize> = echoes.iter().map(|e| e.accepted_peers().len()).collect();
        for _ in 0..CONNECTIONS {
            check_interrupt()?;
            let r = client.connect(vip, 1000)?;
            if !r.ok {
                bail!("{} -> {vip} failed: {r:?}", client.name());
            }
        }
        let served = |i: usize| echoes[i].accepted_peers().len() - before[i];
        let deadline = Instant::now() + Duration::from_secs(3);
        while served(0) + served(1) < CONNECTIONS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        step(&format!(
            "{} ({}): {CONNECTIONS} connections to nearby -> server-a (node-a) served {}, server-b (node-b) served {}",
            client.name(),
            client.node_name(),
            served(0),
            served(1)
        ));
    }
    let explain = agents[0].ambitctl_json(&[
        "explain",
        "--from",
        &format!("default/{}", clients[0].name()),
        &vip.to_string(),
    ])?;
    if let Some(why) = explain["steps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|s| s.contains("chosen by locality"))
    {
        step(&format!("ambitctl explain on node-a: {why}"));
    }
    Ok(())
}

/// The cluster as the waypoint reads it, from a stand-in Kubernetes API in its pod: Service web
/// bound to the waypoint (`istio.io/use-waypoint`), the waypoint's Gateway and Service, an
/// 80/20 HTTPRoute and a DENY of /admin for the Gateway.
fn cluster(waypoint: &Pod) -> Result<KubeApi> {
    let api = KubeApi::start_in(&waypoint.netns_path())?;
    api.set_namespace("default", json!({}));
    api.set_object(
        "services",
        "default/web",
        kube_server::service("web", json!({"istio.io/use-waypoint": "waypoint"}), PORT),
    );
    for s in ["web-v1", "web-v2", "waypoint"] {
        api.set_object(
            "services",
            &format!("default/{s}"),
            kube_server::service(s, json!({}), PORT),
        );
    }
    api.set_object(
        "gateways",
        "default/waypoint",
        kube_server::waypoint_gateway("waypoint"),
    );
    api.set_object(
        "httproutes",
        "default/web",
        kube_server::http_route("web", "web", &[("web-v1", 80), ("web-v2", 20)], json!({})),
    );
    api.set_object(
        "authorizationpolicies",
        "default/no-admin",
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "no-admin", "namespace": "default"},
               "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                        "name": "waypoint"}],
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}}),
    );
    Ok(api)
}

/// Who answered each of `n` requests to `path` on service web (`""` for a failure).
fn answered_by(client: &Pod, path: &str, n: usize) -> Result<Vec<String>> {
    let url = format!("http://{WEB_VIP}{path}");
    let mut args = vec!["curl", "-sS", "--max-time", "10"];
    for i in 0..n {
        if i > 0 {
            args.push("--next");
        }
        args.extend(["-w", "\n", url.as_str()]);
    }
    let out = client.exec(&args)?;
    Ok(out
        .lines()
        .filter(|l| !l.is_empty())
        .map(|l| l.split(' ').next().unwrap_or_default().to_owned())
        .collect())
}

/// The route changed in the cluster while the waypoint runs: all of web to web-v2, within
/// seconds, and the route's status says the waypoint accepted it.
fn live_route_scene(api: &KubeApi, client: &Pod) -> Result<()> {
    header("demo: the cluster changes HTTPRoute web to send everything to web-v2 (applied live)");
    api.set_object(
        "httproutes",
        "default/web",
        kube_server::http_route("web", "web", &[("web-v2", 1)], json!({})),
    );
    let start = Instant::now();
    let mut last = Vec::new();
    while start.elapsed() < Duration::from_secs(10) {
        check_interrupt()?;
        last = answered_by(client, "/live", 10)?;
        if last.iter().all(|w| w == "web-v2") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let v2 = last.iter().filter(|w| *w == "web-v2").count();
    step(&format!(
        "client-a: 10 requests after the change -> web-v2 served {v2} (applied within {} ms)",
        start.elapsed().as_millis()
    ));
    let route = api.object("httproutes", "default/web").unwrap_or_default();
    let parent = &route["status"]["parents"][0];
    let accepted = parent["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Accepted");
    step(&format!(
        "HTTPRoute default/web status by {}: Accepted={} (generation {})",
        parent["controllerName"].as_str().unwrap_or("-"),
        accepted.and_then(|c| c["status"].as_str()).unwrap_or("-"),
        accepted
            .map(|c| c["observedGeneration"].to_string())
            .unwrap_or_default(),
    ));
    let gateway = api
        .object("gateways", "default/waypoint")
        .unwrap_or_default();
    step(&format!(
        "Gateway default/waypoint programmed by the waypoint: address {}",
        gateway["status"]["addresses"][0]["value"]
            .as_str()
            .unwrap_or("-")
    ));
    Ok(())
}

/// The DNS proxy on node-a: a mesh name answered by the agent with the service's VIP (the
/// pod's resolver never sees it), another name forwarded to that resolver.
fn dns_scene(client: &Pod, resolver_pod: &Pod) -> Result<ambit_testbed::Server> {
    header("demo: DNS from client-a to its resolver, through node-a's DNS proxy");
    let resolver = resolver_pod.serve_dns(53, &[("example.test", "192.0.2.7")])?;
    let server = SocketAddr::new(resolver_pod.ipv4().into(), 53);
    for name in ["web.default.svc.cluster.local", "example.test"] {
        let a = client.dns_query(server, &["--name", name])?;
        step(&format!(
            "client-a asks {server} for {name}: {} (answer from {})",
            a["answers"]
                .as_array()
                .map(|v| v
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default(),
            a["from"].as_str().unwrap_or("-"),
        ));
    }
    let asked: Vec<String> = resolver
        .events()
        .iter()
        .filter(|e| e["event"] == "query")
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect();
    step(&format!(
        "the resolver was asked for: {} (the mesh name never reached it)",
        asked.join(", ")
    ));
    Ok(resolver)
}

/// HTTP through the waypoint: an 80/20 split between web-v1 and web-v2, and an L7 denial.
fn waypoint_scene(
    bed: &TestBed,
    client: &Pod,
    web: [&Pod; 2],
    waypoint_pod: &Pod,
    config: &ambit_testbed::AgentConfig,
) -> Result<(Agent, [ambit_testbed::Server; 2])> {
    header(&format!(
        "demo: HTTP to service web ({WEB_VIP}:80) through a waypoint: 80/20 split, /admin denied"
    ));
    let servers = [web[0].serve_http(PORT)?, web[1].serve_http(PORT)?];
    let waypoint = bed
        .start_waypoint(waypoint_pod, config)
        .context("the waypoint did not start")?;
    step(&format!(
        "waypoint ready in pod {} (pid {}, log {})",
        waypoint_pod.name(),
        waypoint.pid(),
        waypoint.log_path().display()
    ));
    let synced = waypoint.wait_for_log(
        |v| {
            log_field(v, "message").and_then(Value::as_str)
                == Some("the waypoint read its routes and policies from the Kubernetes API")
        },
        Duration::from_secs(20),
    );
    synced.context("the waypoint did not read the cluster's routes and policies")?;
    step(
        "waypoint: HTTPRoute default/web (80/20) and AuthorizationPolicy default/no-admin read from the cluster",
    );
    let out = client.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "30",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}\n",
        &format!("http://{WEB_VIP}/hello/[1-50]"),
    ])?;
    let ok = out.lines().filter(|l| *l == "200").count();
    let denied = client.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "10",
        "-w",
        " (HTTP %{http_code})",
        &format!("http://{WEB_VIP}/admin/users"),
    ])?;
    let deadline = Instant::now() + Duration::from_secs(3);
    while servers.iter().map(|s| s.requests().len()).sum::<usize>() < ok
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    step(&format!(
        "client-a: 50 requests to http://{WEB_VIP}/hello/N: {ok} answered 200; web-v1 (node-a) \
         served {}, web-v2 (node-b) served {}",
        servers[0].requests().len(),
        servers[1].requests().len()
    ));
    step(&format!(
        "client-a: GET /admin/users -> {}",
        denied.replace('\n', "")
    ));
    if let Some(line) = waypoint
        .access_logs()
        .iter()
        .rev()
        .find(|v| log_field(v, "path").and_then(Value::as_str) == Some("/hello/50"))
    {
        let text = |f: &str| log_field(line, f).map(|v| v.to_string().trim_matches('"').to_owned());
        step(&format!(
            "waypoint access log, last request: {} {} from {} -> {} ({}) route {} status {} in {} ms",
            text("method").unwrap_or_default(),
            text("path").unwrap_or_default(),
            text("src.identity").unwrap_or_default(),
            text("dst.endpoint").unwrap_or_default(),
            text("dst.workload").unwrap_or_default(),
            text("route").unwrap_or_default(),
            text("status").unwrap_or_default(),
            text("duration_ms").unwrap_or_default(),
        ));
    }
    // Kept running by the caller (for `--keep`).
    Ok((waypoint, servers))
}

/// A socket address from a log field, with IPv4-mapped IPv6 shown as IPv4.
fn log_addr(line: &Value, field: &str) -> Option<SocketAddr> {
    let addr: SocketAddr = log_field(line, field)?.as_str()?.parse().ok()?;
    Some(SocketAddr::new(addr.ip().to_canonical(), addr.port()))
}

/// For each connection, the agents (and directions) whose access log has it.
fn via_agents(agents: &[&Agent], connections: &[Connection<'_>]) -> Vec<Vec<String>> {
    let logs: Vec<(String, Vec<Value>)> = agents
        .iter()
        .map(|a| (a.node().to_owned(), a.access_logs()))
        .collect();
    connections
        .iter()
        .map(|c| match c.report.local {
            Some(src) => matching_entries(&logs, src, c.dst),
            None => Vec::new(),
        })
        .collect()
}

/// The access-log entries (per node) of the connection from `src` (the client's address and
/// port) to `dst` (the address it dialed), described as `node direction (path)`.
fn matching_entries(
    logs: &[(String, Vec<Value>)],
    src: SocketAddr,
    dst: SocketAddr,
) -> Vec<String> {
    let mut via = Vec::new();
    for (node, lines) in logs {
        for line in lines {
            let text = |f: &str| log_field(line, f).and_then(Value::as_str);
            // The outbound hop logs the client's own address and port; the inbound hop on the
            // destination node sees the connection the source node's agent opened (same client
            // IP, the agent's own source port).
            let logged_src = log_addr(line, "src.addr");
            let same_src = match text("direction") {
                Some("inbound") => logged_src.map(|a| a.ip()) == Some(src.ip()),
                _ => logged_src == Some(src),
            };
            if !same_src || log_addr(line, "dst.addr") != Some(dst) {
                continue;
            }
            let mut entry = format!("{node} {}", text("direction").unwrap_or("?"));
            match (text("path"), text("direction")) {
                (Some("hbone"), Some("outbound")) => entry.push_str(&format!(
                    " (HBONE mTLS as {}, verified {})",
                    text("src.identity").unwrap_or("?"),
                    text("dst.identity").unwrap_or("?")
                )),
                (Some("hbone"), _) => entry.push_str(&format!(
                    " (HBONE mTLS from {})",
                    text("src.identity").unwrap_or("?")
                )),
                (Some(path), _) => entry.push_str(&format!(" ({path})")),
                (None, _) => {}
            }
            if let Some(error) = text("error") {
                entry.push_str(&format!(" error: {error}"));
            }
            via.push(entry);
        }
    }
    // Hop order: the source node's outbound leg, then the destination node's inbound leg.
    via.sort_by_key(|e| e.contains(" inbound"));
    via
}

/// A tcpdump capture on a node's underlay link, to show what crosses between nodes.
struct Capture(ambit_testbed::wire::Capture);

/// What the capture saw.
struct Wire {
    hbone_packets: usize,
    plaintext_packets: usize,
    payload_visible: bool,
}

impl Capture {
    fn start(bed: &TestBed, node: &ambit_testbed::Node) -> Option<Capture> {
        ambit_testbed::wire::Capture::start(bed, node)
            .ok()
            .map(Capture)
    }

    fn stop(self) -> Option<Wire> {
        let (text, raw) = self.0.stop().ok()?;
        Some(Wire {
            hbone_packets: text.lines().filter(|l| l.contains(".15008")).count(),
            plaintext_packets: text.lines().filter(|l| l.contains(".8080")).count(),
            payload_visible: ambit_testbed::wire::contains(
                &raw,
                &ambit_testbed::wire::pattern(1000..1064),
            ),
        })
    }
}

/// `--keep`: the commands to try on the live cluster, then wait for SIGTERM (`--down`) or Ctrl-C.
fn keep(
    bed: &TestBed,
    agents: &[&Agent; 2],
    client: &Pod,
    server: &Pod,
    outsider: &Pod,
    web_v2: &Pod,
) -> Result<()> {
    let ambitctl = ambit_testbed::ambitctl_bin()?;
    let ctl = |agent: &Agent| {
        format!(
            "{} --socket {}",
            ambitctl.display(),
            agent.admin_socket().display()
        )
    };
    let (a, b) = (ctl(agents[0]), ctl(agents[1]));
    // Inside the pod's cgroup (the capture programs see only the pods' cgroups), then its netns:
    // in that order, because `ip netns exec` remounts /sys, hiding the cgroup mount.
    let in_pod = |pod: &Pod, command: &str| {
        format!(
            "sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} {command}'",
            pod.cgroup_dir().display(),
            pod.netns_name(),
        )
    };
    header("demo: kept running; try these (as root)");
    let lines = [
        "# each node, its pods, the mesh it knows".to_owned(),
        format!("{a} status"),
        format!("{b} workloads"),
        "# connections as they happen (run the curls below in another terminal)".to_owned(),
        format!("{a} connections --watch"),
        "# an allowed flow, and one the policy no-9090 denies".to_owned(),
        format!(
            "{a} explain --from default/{} {}",
            client.name(),
            server.v4(PORT)
        ),
        format!(
            "{a} explain --from default/{} {}:{DENIED_PORT}",
            client.name(),
            server.ipv4()
        ),
        "# HTTP through the waypoint (80/20 between web-v1 and web-v2; /admin is denied)"
            .to_owned(),
        in_pod(client, &format!("curl -s http://{WEB_VIP}/hello")),
        in_pod(client, &format!("curl -s http://{WEB_VIP}/admin")),
        format!(
            "# from {} (not in the mesh) to web-v2: plaintext, judged by node-b's agent",
            outsider.name()
        ),
        in_pod(
            outsider,
            &format!("curl -s --max-time 3 http://{}/hello", web_v2.v4(PORT)),
        ),
        "# the eBPF programs and maps, and each agent's log".to_owned(),
        format!("{a} bpf"),
        format!(
            "tail -f {} {}",
            agents[0].log_path().display(),
            agents[1].log_path().display()
        ),
        "# remove it all".to_owned(),
        "cargo xtask demo --down".to_owned(),
    ];
    for line in &lines {
        println!("  {line}");
    }
    let record = serde_json::json!({
        "pid": std::process::id(),
        "bed": bed.id(),
        "netns": bed.netns_names(),
        "sockets": agents.iter().map(|a| a.admin_socket().display().to_string()).collect::<Vec<_>>(),
    });
    let file = keep_file();
    std::fs::write(&file, serde_json::to_string_pretty(&record)? + "\n")
        .with_context(|| format!("cannot write {}", file.display()))?;
    eprintln!("{KEPT_MARKER} (pid {})", std::process::id());
    while !sigint::interrupted() {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file(&file);
    Ok(())
}

/// Whether `pid` is a live `ambit-demo`: not gone, not a zombie its parent has not reaped yet (it
/// has torn everything down by then), and not a reused pid.
fn is_running_demo(pid: i32) -> bool {
    alive(pid)
        && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| c.contains("ambit-demo"))
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X')
    })
}

/// The pid of the demo the keep record names, if it still runs.
fn kept_demo() -> Option<i32> {
    let record: Value = serde_json::from_str(&std::fs::read_to_string(keep_file()).ok()?).ok()?;
    let pid = i32::try_from(record["pid"].as_u64()?).ok()?;
    is_running_demo(pid).then_some(pid)
}

/// `--down`: stops the kept demo (SIGTERM; it tears its cluster down) and waits for it.
pub fn down() -> Result<()> {
    let file = keep_file();
    let text = match std::fs::read_to_string(&file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            step(&format!("no kept demo (nothing at {})", file.display()));
            return Ok(());
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    let record: Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not the demo's record", file.display()))?;
    let pid = record["pid"]
        .as_u64()
        .and_then(|p| i32::try_from(p).ok())
        .with_context(|| format!("{} has no pid", file.display()))?;
    let is_demo = is_running_demo(pid);
    if is_demo {
        step(&format!(
            "stopping the kept demo (pid {pid}); it tears its cluster down"
        ));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .with_context(|| format!("cannot signal pid {pid}"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        if alive(pid) {
            bail!(
                "the kept demo (pid {pid}) did not stop within 60 s; see its log (target/demo/keep.log)"
            );
        }
    } else {
        step(&format!(
            "the kept demo (pid {pid}) is gone; removing what it left"
        ));
    }
    let _ = std::fs::remove_file(&file);
    let cleaned = ambit_testbed::cleanup_stale();
    if !cleaned.is_empty() {
        step(&format!("removed leftovers: {cleaned:?}"));
    }
    step("the demo cluster is down");
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn matches_access_log_by_client_and_original_destination() {
        let logs = vec![
            (
                "node-a".to_owned(),
                vec![
                    json!({"target": "access", "direction": "outbound", "path": "hbone",
                           "src.addr": "10.1.0.2:40000", "dst.addr": "10.2.0.3:8080",
                           "src.identity": "spiffe://td/ns/a/sa/c",
                           "dst.identity": "spiffe://td/ns/b/sa/s"}),
                    json!({"target": "access", "direction": "outbound",
                           "src.addr": "10.1.0.2:40001", "dst.addr": "10.2.0.3:8080"}),
                ],
            ),
            (
                "node-b".to_owned(),
                vec![json!({"target": "access", "direction": "inbound",
                            "src.addr": "[::ffff:10.1.0.2]:40000", "dst.addr": "10.2.0.3:8080",
                            "error": "denied"})],
            ),
        ];
        let src: SocketAddr = "10.1.0.2:40000".parse().expect("addr");
        let dst: SocketAddr = "10.2.0.3:8080".parse().expect("addr");
        assert_eq!(
            matching_entries(&logs, src, dst),
            [
                "node-a outbound (HBONE mTLS as spiffe://td/ns/a/sa/c, verified spiffe://td/ns/b/sa/s)",
                "node-b inbound error: denied"
            ]
        );
        // The inbound hop is matched by the client's IP (its port is the agent's own).
        let other: SocketAddr = "10.1.0.2:9".parse().expect("addr");
        assert_eq!(
            matching_entries(&logs, other, dst),
            ["node-b inbound error: denied"]
        );
        let stranger: SocketAddr = "10.1.0.9:40000".parse().expect("addr");
        assert!(matching_entries(&logs, stranger, dst).is_empty());
    }
}
