//! Traffic capture on the namespace test bed, against the real kernel hooks and sockets: what a
//! user of the mesh would check (bytes arrive, who the server sees, what the client sees, what the
//! agent logged, what the eBPF programs counted).

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use ambit_testbed::{
    Agent, AgentConfig, MeshSpec, Node, Pod, TestBed, log_field, log_message, log_str,
};
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(10);

/// Two nodes, a client pod on node-a, a server pod on node-b, an unenrolled `outsider` pod on
/// node-a, an echo server in the server pod, and an agent on each node.
struct Mesh {
    bed: TestBed,
    node_a: Node,
    node_b: Node,
    client: Pod,
    outsider: Pod,
    server: Pod,
    config_a: AgentConfig,
    config_b: AgentConfig,
    agent_a: Agent,
    agent_b: Agent,
    echo: ambit_testbed::Server,
}

fn mesh() -> Mesh {
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .unenrolled("outsider")
        .node("node-b")
        .pod("server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let server = m.take_pod("server");
    let echo = server.serve(PORT).expect("start echo server");
    let (config_a, config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let agent_a = m.bed.start_agent(&config_a).expect("start agent on node-a");
    let agent_b = m.bed.start_agent(&config_b).expect("start agent on node-b");
    Mesh {
        node_a: m.take_node("node-a"),
        node_b: m.take_node("node-b"),
        client: m.take_pod("client"),
        outsider: m.take_pod("outsider"),
        server,
        config_a,
        config_b,
        agent_a,
        agent_b,
        echo,
        bed: m.bed,
    }
}

fn u64_field(line: &Value, name: &str) -> Option<u64> {
    log_field(line, name).and_then(Value::as_u64)
}

fn access_log(
    agent: &Agent,
    mark: ambit_testbed::LogMark,
    direction: &str,
    dst: SocketAddr,
) -> Value {
    agent
        .wait_for_connection_log(mark, direction, dst, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The eBPF programs' counters for a node, read with `ambitctl bpf -o json`.
fn bpf_counters(node: &Node) -> Value {
    let bin = ambit_testbed::ambitctl_bin().expect("locate ambitctl");
    let out = Command::new(&bin)
        .args(["bpf", "-o", "json", "--pin-path"])
        .arg(node.bpf_pin_path())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(
        out.status.success(),
        "ambitctl bpf failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ambitctl bpf -o json prints JSON")
}

fn counter(counters: &Value, name: &str) -> u64 {
    counters["counters"][name]
        .as_u64()
        .unwrap_or_else(|| panic!("counter {name} missing in {counters}"))
}

fn assert_echoed(report: &ambit_testbed::ClientReport, dst: SocketAddr, bytes: usize) {
    assert!(report.ok, "client -> {dst} failed: {report:#?}");
    assert_eq!(report.sent, bytes as u64, "{report:#?}");
    assert_eq!(report.received, bytes as u64, "{report:#?}");
}

fn ip_of(pod: &Pod, like: SocketAddr) -> IpAddr {
    if like.is_ipv4() {
        pod.ipv4().into()
    } else {
        pod.ipv6().into()
    }
}

fn cross_node(dst_of: impl Fn(&Pod) -> SocketAddr) {
    let m = mesh();
    let dst = dst_of(&m.server);
    let (mark_a, mark_b) = (m.agent_a.mark(), m.agent_b.mark());
    let bytes = 256 * 1024;

    let report = m.client.connect(dst, bytes).expect("run client");

    // 1. bytes arrive intact both ways...
    assert_echoed(&report, dst, bytes);
    // 2. the client still sees the address it dialed (getpeername), not 127.0.0.1:15001...
    assert_eq!(
        report.peer,
        Some(dst),
        "getpeername must report the dialed address"
    );
    // ...and the server sees the client pod's own IP.
    let peers = m.echo.wait_for_accepts(1, WAIT).expect("server accepted");
    assert_eq!(
        peers[0].ip(),
        ip_of(&m.client, dst),
        "server must see the client pod IP"
    );

    // The connection went through both agents, not a direct path.
    let out = access_log(&m.agent_a, mark_a, "outbound", dst);
    assert_eq!(u64_field(&out, "bytes_sent"), Some(bytes as u64), "{out}");
    assert_eq!(
        u64_field(&out, "bytes_received"),
        Some(bytes as u64),
        "{out}"
    );
    assert_eq!(
        log_str(&out, "src.workload"),
        Some("default/client"),
        "{out}"
    );
    assert!(log_field(&out, "error").is_none(), "{out}");
    let inb = access_log(&m.agent_b, mark_b, "inbound", dst);
    assert_eq!(u64_field(&inb, "bytes_sent"), Some(bytes as u64), "{inb}");
    assert_eq!(
        log_str(&inb, "dst.workload"),
        Some("default/server"),
        "{inb}"
    );
    assert_eq!(
        log_str(&inb, "src.addr").map(|a| a.parse::<SocketAddr>().expect("addr").ip()),
        Some(ip_of(&m.client, dst)),
        "{inb}"
    );

    // The programs counted one redirect; the agent's own upstream connection (its process is in
    // a cgroup under the one the programs are attached to) was not captured again.
    let counters = bpf_counters(&m.node_a);
    let redirected =
        counter(&counters, "connect4_redirected") + counter(&counters, "connect6_redirected");
    assert_eq!(
        redirected, 1,
        "exactly the app's connection is redirected: {counters}"
    );
    assert_eq!(counter(&bpf_counters(&m.node_b), "inbound_steered"), 1);

    // aya-log output from the programs reaches the agent's log.
    m.agent_a
        .wait_for_log_after(
            mark_a,
            |v| {
                log_message(v).is_some_and(|msg| msg.contains("redirected"))
                    && log_str(v, "target") == Some("ambit")
            },
            WAIT,
        )
        .expect("the connect hook's log line in the agent's log");
}

#[test]
fn cross_node_ipv4_goes_through_both_agents() {
    if !ambit_testbed::privileged() {
        return;
    }
    cross_node(|server| server.v4(PORT));
}

#[test]
fn cross_node_ipv6_goes_through_both_agents() {
    if !ambit_testbed::privileged() {
        return;
    }
    cross_node(|server| server.v6(PORT));
}

#[test]
fn unenrolled_pod_is_not_captured_and_plaintext_inbound_goes_through_15006() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let dst = m.server.v4(PORT);
    let (mark_a, mark_b) = (m.agent_a.mark(), m.agent_b.mark());

    // The outsider is not enrolled: its connection leaves node-a directly...
    let report = m.outsider.connect(dst, 10_000).expect("run client");
    assert_echoed(&report, dst, 10_000);
    // ...but the server is: node-b's agent takes it on 15006 and the app still sees the
    // outsider's IP.
    let inb = access_log(&m.agent_b, mark_b, "inbound", dst);
    let src: SocketAddr = log_str(&inb, "src.addr")
        .expect("src.addr")
        .parse()
        .expect("addr");
    assert_eq!(src.ip(), IpAddr::from(m.outsider.ipv4()));
    let peers = m.echo.wait_for_accepts(1, WAIT).expect("accept");
    assert_eq!(peers[0].ip(), IpAddr::from(m.outsider.ipv4()));

    // A later captured connection is logged by node-a; the outsider's never was.
    let report = m.client.connect(dst, 10).expect("run client");
    assert_echoed(&report, dst, 10);
    let client_log = access_log(&m.agent_a, mark_a, "outbound", dst);
    let outbound: Vec<Value> = m
        .agent_a
        .access_logs()
        .into_iter()
        .filter(|v| log_str(v, "direction") == Some("outbound"))
        .collect();
    assert_eq!(
        outbound.len(),
        1,
        "only the enrolled client is captured: {outbound:#?}"
    );
    assert_eq!(outbound[0], client_log);
}

#[test]
fn agent_does_not_capture_itself_even_towards_its_own_ports() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let mark_b = m.agent_b.mark();
    // The client dials the agent's inbound port on the server pod. Node-a's agent carries it
    // (marked socket, not captured again); node-b steers it to 15006, and the agent refuses to
    // forward a connection for its own port instead of looping.
    let own = m.server.v4(ambit_common_ports::INBOUND);
    let report = m
        .client
        .connect_with(own, 100, 0, 3000)
        .expect("run client");
    assert!(
        !report.ok,
        "a connection to the agent's own port must not be served: {report:#?}"
    );
    let inb = access_log(&m.agent_b, mark_b, "inbound", own);
    assert!(
        log_str(&inb, "error").is_some_and(|e| e.contains("agent's own")),
        "{inb}"
    );
    // One redirect on node-a (the app's), one steer on node-b: no loop.
    let a = bpf_counters(&m.node_a);
    assert_eq!(counter(&a, "connect4_redirected"), 1, "{a}");
    let b = bpf_counters(&m.node_b);
    assert_eq!(counter(&b, "inbound_steered"), 1, "{b}");
    // And ordinary traffic still flows.
    assert_echoed(
        &m.client
            .connect(m.server.v4(PORT), 1000)
            .expect("run client"),
        m.server.v4(PORT),
        1000,
    );
}

/// The agent's ports, as the tests see them (kept here so the test crate does not depend on the
/// agent's crates).
mod ambit_common_ports {
    pub const INBOUND: u16 = 15006;
}

#[test]
fn unenrolling_restores_direct_traffic_and_reenrolling_captures_again() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh();
    let dst = m.server.v4(PORT);

    // Release the client: its traffic leaves directly (node-a's redirect counter stays put).
    m.config_a.add_pod(&m.client, false);
    m.agent_a
        .reload(&m.config_a)
        .expect("reload with client unenrolled");
    m.agent_a
        .wait_for_log(
            |v| log_message(v).is_some_and(|m| m.starts_with("pod unenrolled")),
            WAIT,
        )
        .expect("unenroll logged");
    let before = counter(&bpf_counters(&m.node_a), "connect4_redirected");
    let report = m.client.connect(dst, 5000).expect("run client");
    assert_echoed(&report, dst, 5000);
    assert_eq!(report.peer, Some(dst));
    assert_eq!(
        counter(&bpf_counters(&m.node_a), "connect4_redirected"),
        before,
        "an unenrolled pod's connect must not be redirected"
    );
    assert!(
        m.agent_a.access_logs().is_empty(),
        "node-a's agent must not see the unenrolled client's traffic"
    );

    // Enroll it again: captured again.
    let mark = m.agent_a.mark();
    m.config_a.add_pod(&m.client, true);
    m.agent_a
        .reload(&m.config_a)
        .expect("reload with client enrolled");
    let report = m.client.connect(dst, 5000).expect("run client");
    assert_echoed(&report, dst, 5000);
    access_log(&m.agent_a, mark, "outbound", dst);
    assert_eq!(
        counter(&bpf_counters(&m.node_a), "connect4_redirected"),
        before + 1
    );

    // Removing the pod from the config also releases it.
    m.config_a.remove_pod(&m.client);
    m.agent_a
        .reload(&m.config_a)
        .expect("reload without client");
    let report = m.client.connect(dst, 10).expect("run client");
    assert_echoed(&report, dst, 10);
    assert_eq!(
        counter(&bpf_counters(&m.node_a), "connect4_redirected"),
        before + 1
    );

    // A change only a restart applies is refused, by name, and the agent keeps its config.
    let mut moved = m.config_a.clone();
    moved
        .node_addresses
        .push("10.99.0.1".parse().expect("address"));
    moved.add_pod(&m.client, true);
    let reason = m
        .agent_a
        .try_reload(&moved)
        .expect("reload answered")
        .expect_err("changing nodeAddresses needs a restart");
    assert!(
        reason.contains("nodeAddresses") && reason.contains("restart"),
        "the refusal names the setting and what to do: {reason}"
    );
    let status = m
        .agent_a
        .ambitctl_json(&["status"])
        .expect("ambitctl status");
    assert!(
        status["configRefused"]
            .as_str()
            .is_some_and(|r| r.contains("nodeAddresses")),
        "ambitctl status says the file's content is not in force: {status}"
    );
    // Once a change applies, the refusal is gone.
    m.agent_a
        .reload(&m.config_a)
        .expect("the unchanged config applies");
    let status = m
        .agent_a
        .ambitctl_json(&["status"])
        .expect("ambitctl status");
    assert!(status["configRefused"].is_null(), "{status}");
    let report = m.client.connect(dst, 10).expect("run client");
    assert_echoed(&report, dst, 10);
    assert_eq!(
        counter(&bpf_counters(&m.node_a), "connect4_redirected"),
        before + 1,
        "the refused config (which enrolls the client) must not have been applied"
    );
    let _ = (&m.node_b, &m.config_b, &m.bed);
}

#[test]
fn a_bad_config_is_refused_and_the_old_one_keeps_serving() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let mark = m.agent_a.mark();
    let mut text = m.config_a.to_json();
    text = text.replacen(&m.client.ipv4().to_string(), "10.1.0.999", 1);
    std::fs::write(m.agent_a.config_path(), text).expect("write bad config");
    m.agent_a
        .process()
        .signal(nix_signal_hup())
        .expect("SIGHUP");
    let refused = m
        .agent_a
        .wait_for_log_after(
            mark,
            |v| log_message(v) == Some("config reload refused; keeping the previous config"),
            WAIT,
        )
        .expect("refusal logged");
    let err = log_str(&refused, "error").expect("error field");
    assert!(
        err.contains("pods[0].ips[0]"),
        "the error names the field: {err}"
    );
    // Still serving with the previous config.
    let dst = m.server.v4(PORT);
    let mark = m.agent_a.mark();
    assert_echoed(&m.client.connect(dst, 100).expect("run client"), dst, 100);
    access_log(&m.agent_a, mark, "outbound", dst);
}

fn nix_signal_hup() -> nix::sys::signal::Signal {
    nix::sys::signal::Signal::SIGHUP
}

#[test]
fn a_connection_cut_at_the_drain_timeout_is_still_in_the_access_log() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh();
    let dst = m.server.v4(PORT);
    // node-a's agent drains for 0.5 s only; the client holds its connection for 4 s.
    m.config_a.drain_timeout_seconds = Some(0.5);
    m.agent_a.stop().expect("stop node-a's agent");
    m.agent_a = m
        .bed
        .start_agent(&m.config_a)
        .expect("restart node-a's agent");
    let long = m
        .client
        .spawn_connect(dst, 100, 4_000, 8_000)
        .expect("start long client");
    long.wait_connected(WAIT).expect("long client connected");
    // The kernel completes the handshake before the agent accepts: stop only once the agent
    // holds the connection (a SIGTERM in between finds nothing open, and logs nothing).
    let deadline = Instant::now() + WAIT;
    while !m
        .agent_a
        .ambitctl_json(&["connections"])
        .is_ok_and(|c| c.as_array().is_some_and(|c| !c.is_empty()))
    {
        assert!(
            Instant::now() < deadline,
            "the agent never took the connection"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = m.agent_a.stop().expect("agent-a stops on SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let report = long.wait().expect("long client finished");
    assert!(!report.ok, "cut at the drain timeout: {report:#?}");
    // The connection's line is written although its handler never finished, saying why.
    let cut = m
        .agent_a
        .access_logs()
        .into_iter()
        .find(|v| log_str(v, "dst.addr") == Some(dst.to_string().as_str()))
        .expect("an access log line for the cut connection");
    assert_eq!(log_str(&cut, "fault"), Some("internal"), "{cut}");
    assert!(
        log_str(&cut, "error").is_some_and(|e| e.contains("shutdown")),
        "{cut}"
    );
    let _ = (&m.node_b, &m.config_b, &m.agent_b, &m.outsider);
}

#[test]
fn stopped_agent_fails_closed_drains_and_a_restart_takes_over() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let dst = m.server.v4(PORT);

    // A long connection open when node-a's agent is told to stop is drained, not cut.
    let long = m
        .client
        .spawn_connect(dst, 50_000, 1500, 10_000)
        .expect("start long client");
    long.wait_connected(WAIT).expect("long client connected");
    let status = m.agent_a.stop().expect("agent-a stops on SIGTERM");
    assert!(status.success(), "clean exit: {status:?}");
    let report = long.wait().expect("long client finished");
    assert_echoed(&report, dst, 50_000);

    // While it is down, the enrolled client's new connections are refused, never sent directly.
    let report = m
        .client
        .connect_with(dst, 100, 0, 3000)
        .expect("run client");
    assert!(!report.ok, "must fail closed: {report:#?}");
    assert_eq!(
        report.error_kind.as_deref(),
        Some("ConnectionRefused"),
        "{report:#?}"
    );

    // Node-b down too: plaintext inbound to the enrolled server is dropped, and the app sees
    // nothing of it.
    m.agent_b.stop().expect("agent-b stops");
    let accepted_before = m.echo.accepted_peers().len();
    let report = m
        .outsider
        .connect_with(dst, 100, 0, 2000)
        .expect("run client");
    assert!(!report.ok, "inbound must fail closed: {report:#?}");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        m.echo.accepted_peers().len(),
        accepted_before,
        "nothing reached the app"
    );
    assert!(
        counter(&bpf_counters(&m.node_b), "inbound_dropped_no_listener") >= 1,
        "sk_lookup dropped it"
    );

    // Restarted agents take over the pinned state: traffic flows through them again.
    let agent_a = m.bed.start_agent(&m.config_a).expect("restart agent-a");
    let agent_b = m.bed.start_agent(&m.config_b).expect("restart agent-b");
    let (mark_a, mark_b) = (agent_a.mark(), agent_b.mark());
    let report = m.client.connect(dst, 1000).expect("run client");
    assert_echoed(&report, dst, 1000);
    access_log(&agent_a, mark_a, "outbound", dst);
    access_log(&agent_b, mark_b, "inbound", dst);
    let state = bpf_counters(&m.node_a);
    let cgroup_links: Vec<&Value> = state["programs"]
        .as_array()
        .map(|p| p.iter().filter(|p| p["kind"] != "sk_lookup").collect())
        .unwrap_or_default();
    assert_eq!(
        cgroup_links.len(),
        ambit_testbed::CGROUP_LINKS,
        "one pinned link per cgroup program, no leftovers: {state:#}"
    );

    // Uninstall: `ambit-agent cleanup` releases the pods; traffic flows directly.
    agent_a.stop().expect("stop agent-a");
    let cleanup = Command::new(ambit_testbed::agent_bin().expect("locate ambit-agent"))
        .args(["cleanup", "--config"])
        .arg(agent_a.config_path())
        .output()
        .expect("run ambit-agent cleanup");
    assert!(
        cleanup.status.success(),
        "{}",
        String::from_utf8_lossy(&cleanup.stderr)
    );
    assert!(!m.node_a.bpf_pin_path().exists(), "pinned state removed");
    let report = m.client.connect(dst, 1000).expect("run client");
    assert_echoed(&report, dst, 1000);
}

#[test]
fn same_node_traffic_goes_through_outbound_and_inbound() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (bed, _node) = (&m.bed, &m.nodes["node-a"]);
    let (client, server) = (&m.pods["client"], &m.pods["server"]);
    let echo = server.serve(PORT).expect("echo server");
    let config = m.configs["node-a"].clone();
    let agent = bed.start_agent(&config).expect("start agent");
    for dst in [server.v4(PORT), server.v6(PORT)] {
        let mark = agent.mark();
        let report = client.connect(dst, 100_000).expect("run client");
        assert_echoed(&report, dst, 100_000);
        access_log(&agent, mark, "outbound", dst);
        let inb = access_log(&agent, mark, "inbound", dst);
        let src: SocketAddr = log_str(&inb, "src.addr")
            .expect("src.addr")
            .parse()
            .expect("addr");
        assert_eq!(src.ip(), ip_of(client, dst), "{inb}");
    }
    let peers = echo.wait_for_accepts(2, WAIT).expect("two accepts");
    assert_eq!(peers[0].ip(), IpAddr::from(client.ipv4()));
    assert_eq!(peers[1].ip(), IpAddr::from(client.ipv6()));
}

#[test]
fn node_addresses_are_captured_and_excluded_ports_pass_and_follow_reloads() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh();
    let dst = m.server.v4(PORT);
    let steered = |m: &Mesh| counter(&bpf_counters(&m.node_b), "inbound_steered");
    let redirected = |m: &Mesh| counter(&bpf_counters(&m.node_a), "connect4_redirected");

    // A node address is the node's, not the kubelet's: connections from it are captured.
    // (`nodeAddresses` is read at start, so node-b's agent restarts with it.)
    m.config_b.node_addresses = vec![m.outsider.ipv4().into()];
    m.agent_b.stop().expect("stop node-b's agent");
    m.agent_b = m
        .bed
        .start_agent(&m.config_b)
        .expect("restart node-b's agent");
    let before = steered(&m);
    assert_echoed(&m.outsider.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(steered(&m), before + 1, "a node address is steered");
    let before = steered(&m);

    // An excluded inbound port is not steered; other ports still are.
    m.config_b.inbound_excluded_ports = vec![PORT];
    m.agent_b.reload(&m.config_b).expect("reload node-b");
    assert_echoed(&m.outsider.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(
        steered(&m),
        before,
        "an excluded inbound port is not steered"
    );
    m.config_b.inbound_excluded_ports.clear();
    m.agent_b.reload(&m.config_b).expect("reload node-b");
    assert_echoed(&m.outsider.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(
        steered(&m),
        before + 1,
        "steered again once the exclusion is gone"
    );

    // An excluded outbound port is not redirected. This reload is a plain file change (no
    // SIGHUP): the agent notices it by itself.
    let mark = m.agent_a.mark();
    m.config_a.outbound_excluded_ports = vec![PORT];
    m.config_a
        .write_to(m.agent_a.config_path())
        .expect("write config");
    m.agent_a
        .wait_for_log_after(mark, |v| log_message(v) == Some("config applied"), WAIT)
        .expect("file change picked up without a signal");
    let before = redirected(&m);
    let report = m.client.connect(dst, 100).expect("run client");
    assert_echoed(&report, dst, 100);
    assert_eq!(report.peer, Some(dst));
    assert_eq!(
        redirected(&m),
        before,
        "an excluded outbound port is not redirected"
    );
}

#[test]
fn labelling_the_namespace_enrolls_pods_live_and_a_pod_label_opts_one_out() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh();
    let dst = m.server.v4(PORT);
    let redirected = |m: &Mesh| counter(&bpf_counters(&m.node_a), "connect4_redirected");
    // Let labels decide for both node-a pods; the namespace is not labelled yet.
    for name in ["client", "outsider"] {
        m.config_a.pod_mut(name).expect("pod").enrolled = None;
    }
    m.agent_a.reload(&m.config_a).expect("reload");
    let before = redirected(&m);
    assert_echoed(&m.client.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(redirected(&m), before, "not labelled: not captured");

    // Label the namespace ambient: both pods are captured.
    m.config_a.extra.insert(
        "namespaces".into(),
        serde_json::json!({"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    m.agent_a.reload(&m.config_a).expect("reload");
    for pod in [&m.client, &m.outsider] {
        let before = redirected(&m);
        assert_echoed(&pod.connect(dst, 100).expect("run client"), dst, 100);
        assert_eq!(redirected(&m), before + 1, "{} is captured", pod.name());
    }

    // The outsider opts out with its own label.
    m.config_a
        .pod_mut("outsider")
        .expect("pod")
        .labels
        .insert("istio.io/dataplane-mode".into(), "none".into());
    m.agent_a.reload(&m.config_a).expect("reload");
    let before = redirected(&m);
    assert_echoed(&m.outsider.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(redirected(&m), before, "an opted-out pod is released");
    assert_echoed(&m.client.connect(dst, 100).expect("run client"), dst, 100);
    assert_eq!(redirected(&m), before + 1, "the others stay captured");
}

#[test]
fn the_agent_refuses_a_bad_config_at_start_naming_the_field() {
    // Needs no privileges: the config is checked before anything is loaded.
    let dir = std::env::temp_dir().join(format!("ambit-badconfig-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("config.yaml");
    std::fs::write(
        &path,
        "node: node-a\ncgroup: /x\npods:\n  - {namespace: default, name: p, ips: [10.1.0.300], netns: /run/netns/p}\n",
    )
    .expect("write config");
    let agent = ambit_testbed::agent_bin().expect("locate ambit-agent");
    for sub in ["check", "run"] {
        let out = Command::new(&agent)
            .args([sub, "--config"])
            .arg(&path)
            .output()
            .expect("run ambit-agent");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sub}: a bad config must fail");
        assert!(
            stderr.contains("pods[0].ips[0]") && stderr.contains("invalid IP address"),
            "{sub}: the error names the field and the problem: {stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_kubelet_probes_skip_capture_and_every_other_host_connection_is_judged() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = MeshSpec::new()
        .node("node-a")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (bed, node, server) = (&m.bed, &m.nodes["node-a"], &m.pods["server"]);
    let echo = server.serve(PORT).expect("start echo server");
    let mut config = m.configs["node-a"].clone();
    config.extra.insert(
        "probes".into(),
        serde_json::json!({"kubeletCgroup": node.kubelet_cgroup_rel(),
                           "hostCgroup": node.host_cgroup_rel()}),
    );
    // Only mesh identities may reach the server: plaintext from the host is refused.
    config.extra.insert(
        "policies".into(),
        serde_json::json!([{"name": "mesh-only", "namespace": "default", "scope": "NAMESPACE",
            "action": "ALLOW",
            "rules": [{"clauses": [{"matches": [{"namespaces": [{"exact": "default"}]}]}]}]}]),
    );
    let agent = bed.start_agent(&config).expect("start agent");
    let counters = || bpf_counters(node);

    // The kubelet's probes reach the app as without the mesh, from the probe source, IPv4 and
    // IPv6, unjudged: nothing is steered or logged.
    let before = counters();
    for (dst, source) in [
        (server.v4(PORT), "169.254.7.127"),
        (server.v6(PORT), "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"),
    ] {
        let mark = agent.mark();
        let report = node
            .connect_from(&node.kubelet_cgroup_dir(), dst, 100, 5000)
            .expect("run the kubelet's probe");
        assert_echoed(&report, dst, 100);
        let peer = echo.accepted_peers().last().copied().expect("accepted");
        assert_eq!(
            peer.ip(),
            source.parse::<IpAddr>().expect("ip"),
            "{report:#?}"
        );
        assert!(
            agent
                .wait_for_access_log_after(mark, |_| true, Duration::from_millis(500))
                .is_err(),
            "a probe is not proxied"
        );
    }
    let after = counters();
    assert_eq!(
        counter(&after, "probe_marked"),
        counter(&before, "probe_marked") + 2
    );
    assert_eq!(
        counter(&after, "inbound_probe_passed"),
        counter(&before, "inbound_probe_passed") + 2
    );
    assert_eq!(
        counter(&after, "inbound_steered"),
        counter(&before, "inbound_steered")
    );

    // Any other process of the host is captured and judged: plaintext, so refused here.
    let mark = agent.mark();
    let report = node
        .connect_from(&node.agent_cgroup_dir(), server.v4(PORT), 100, 3000)
        .expect("run a host process's client");
    assert!(!report.ok, "refused by policy: {report:#?}");
    let log = agent
        .wait_for_connection_log(mark, "inbound", server.v4(PORT), WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(log_str(&log, "authz.policy"), None, "{log}");
    assert!(
        log_str(&log, "authz.decision").is_some_and(|d| d.contains("denied")),
        "judged and denied: {log}"
    );
    assert_eq!(
        counter(&counters(), "inbound_steered"),
        counter(&after, "inbound_steered") + 1
    );

    // And it cannot pass itself off as a probe: binding the probe source is refused.
    let out = node
        .exec(&[
            "python3",
            "-c",
            "import socket\nfor fam, ip in ((socket.AF_INET, '169.254.7.127'), (socket.AF_INET6, 'fd16:9254:7127:1337:ffff:ffff:ffff:ffff')):\n    s = socket.socket(fam, socket.SOCK_STREAM)\n    try:\n        s.bind((ip, 0)); print('bound')\n    except PermissionError:\n        print('refused')\n",
        ])
        .expect("run python3");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["refused", "refused"],
        "{out}"
    );
    assert!(counter(&counters(), "probe_source_bind_refused") >= 2);
}
