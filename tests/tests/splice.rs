//! Same-node splice on the namespace test bed: a connection between two pods of one node is
//! admitted by the agent and then carried by the kernel (`sk_skb` redirect between the agent's
//! two sockets), with the operator's view (`ambitctl connections`, access log, Istio metrics)
//! intact, policy still in charge, and nothing left behind.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, MeshSpec, Pod, log_field, log_message, log_str, metrics};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(10);
const TRANSFER: usize = 64 * 1024 * 1024;

/// node-a with a client and a server pod, both enrolled; the server echoes on `PORT`.
struct SameNode {
    client: Pod,
    server: Pod,
    echo: ambit_testbed::Server,
    config: ambit_testbed::AgentConfig,
    bed: ambit_testbed::TestBed,
}

fn same_node() -> SameNode {
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod_as("client", "default", "client")
        .pod_as("server", "default", "server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (client, server) = (m.take_pod("client"), m.take_pod("server"));
    let echo = server.serve(PORT).expect("echo server");
    SameNode {
        client,
        server,
        echo,
        config: m.take_config("node-a"),
        bed: m.bed,
    }
}

fn u64_field(line: &Value, name: &str) -> u64 {
    log_field(line, name)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("{name} missing in {line}"))
}

/// The agent's CPU time (user + system) so far, from `/proc/<pid>/stat`.
fn cpu_seconds(agent: &Agent) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", agent.pid())).expect("stat");
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the state.
    let ticks: f64 = f[11].parse::<f64>().expect("utime") + f[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

fn connections(agent: &Agent) -> Vec<Value> {
    agent
        .ambitctl_json(&["connections"])
        .expect("ambitctl connections")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// `ambitctl bpf`, once the admin socket is up (just after readiness).
fn bpf_view(agent: &Agent) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        match agent.ambitctl_json(&["bpf"]) {
            Ok(v) => return v,
            Err(e) if Instant::now() > deadline => panic!("ambitctl bpf: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// A 4 MiB echo from the client to the server that the agent copies (it is not spliced): every
/// byte arrives, and the access log names `path` and the bytes.
fn copied_transfer(s: &SameNode, agent: &Agent, path: &str) {
    let dst = s.server.v4(PORT);
    let mark = agent.mark();
    let report = s.client.connect(dst, 4 * 1024 * 1024).expect("client");
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.received, 4 * 1024 * 1024);
    let line = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .expect("access log");
    assert_eq!(log_str(&line, "path"), Some(path), "{line}");
    assert_eq!(u64_field(&line, "bytes_sent"), 4 * 1024 * 1024, "{line}");
}

/// The splice state and the `AMBIT_SPLICE` map's fill as `ambitctl bpf` shows them (0 when
/// there is no splice map: the splice is off).
fn splice_entries(agent: &Agent) -> (String, u64) {
    let view = bpf_view(agent);
    let entries = view["maps"]
        .as_array()
        .expect("maps")
        .iter()
        .find(|m| m["name"] == "AMBIT_SPLICE")
        .map(|m| m["entries"].as_u64().expect("entries"));
    let state = view["splice"].as_str().unwrap_or_default().to_owned();
    assert_eq!(entries.is_some(), state == "on", "{view}");
    let entries = entries.unwrap_or(0);
    (state, entries)
}

/// Waits until the `AMBIT_SPLICE` map holds `n` sockets (two per spliced connection).
fn wait_for_splice_entries(agent: &Agent, n: u64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = splice_entries(agent).1;
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the splice map holds {now} sockets, not {n}, after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_same_node_transfer_is_spliced_in_the_kernel_and_counted_exactly() {
    if !ambit_testbed::privileged() {
        return;
    }
    let s = same_node();
    let agent = s.bed.start_agent(&s.config).expect("agent");
    assert_eq!(splice_entries(&agent), ("on".to_owned(), 0));
    let dst = s.server.v4(PORT);
    let labels = [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("destination_workload", "server"),
    ];
    let before = metrics::of_node(&s.bed.node("node-a").expect("node"));

    // A large payload both ways (the echo), while the agent's CPU is watched.
    let mark = agent.mark();
    let cpu = cpu_seconds(&agent);
    let report = s.client.connect(dst, TRANSFER).expect("client");
    let cpu = cpu_seconds(&agent) - cpu;
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.received, TRANSFER as u64);
    // Copied and encrypted in user space, 128 MiB take the agent seconds of CPU; spliced, it
    // only admits the connection and watches for its end. A wide bound, not a benchmark.
    assert!(
        cpu < 0.5,
        "the agent used {cpu:.2} s of CPU for a spliced {TRANSFER}-byte echo"
    );
    for direction in ["outbound", "inbound"] {
        let line = agent
            .wait_for_connection_log(mark, direction, dst, WAIT)
            .expect("access log");
        assert_eq!(log_str(&line, "path"), Some("kernel"), "{line}");
        assert_eq!(log_str(&line, "error"), None, "{line}");
        assert_eq!(u64_field(&line, "bytes_sent"), TRANSFER as u64, "{line}");
        assert_eq!(
            u64_field(&line, "bytes_received"),
            TRANSFER as u64,
            "{line}"
        );
        assert_eq!(
            log_str(&line, "src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "{line}"
        );
        assert_eq!(
            log_str(&line, "dst.identity"),
            Some("spiffe://cluster.local/ns/default/sa/server"),
            "{line}"
        );
    }
    let after = metrics::of_node(&s.bed.node("node-a").expect("node"));
    let delta =
        |name: &str| metrics::sum(&after, name, &labels) - metrics::sum(&before, name, &labels);
    assert_eq!(delta("istio_tcp_received_bytes_total"), TRANSFER as f64);
    assert_eq!(delta("istio_tcp_sent_bytes_total"), TRANSFER as f64);
    assert_eq!(delta("istio_tcp_connections_closed_total"), 1.0);

    // A connection held open mid-transfer: listed with both identities, path kernel and live
    // byte counts from the kernel.
    let half = 1024 * 1024;
    let held = s
        .client
        .spawn_connect(dst, 2 * half, 3000, 10_000)
        .expect("client");
    held.wait_connected(WAIT).expect("connected");
    let deadline = Instant::now() + WAIT;
    let listed = loop {
        let open = connections(&agent);
        let found = open
            .iter()
            .find(|c| c["direction"] == "inbound" && c["bytesSent"].as_u64() == Some(half as u64));
        if let Some(c) = found {
            break c.clone();
        }
        assert!(
            Instant::now() < deadline,
            "not listed with its bytes: {open:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(listed["path"], "kernel", "{listed}");
    assert_eq!(
        listed["srcIdentity"], "spiffe://cluster.local/ns/default/sa/client",
        "{listed}"
    );
    assert_eq!(
        listed["dstIdentity"], "spiffe://cluster.local/ns/default/sa/server",
        "{listed}"
    );
    assert_eq!(splice_entries(&agent).1, 2, "one connection: two sockets");
    let report = held.wait().expect("held client");
    assert!(report.ok, "{report:#?}");
    // The agent takes the pair out once it has passed the last FIN on, just after the client
    // read it.
    wait_for_splice_entries(&agent, 0);
    let bpf = agent.ambitctl_json(&["bpf"]).expect("bpf");
    assert!(
        bpf["counters"]["splice_redirected"].as_u64() > Some(0),
        "{bpf}"
    );
    assert_eq!(bpf["counters"]["splice_no_peer"].as_u64(), Some(0), "{bpf}");
}

#[test]
fn the_app_sees_the_client_pod_and_the_client_the_dialed_address_both_families() {
    if !ambit_testbed::privileged() {
        return;
    }
    let s = same_node();
    let agent = s.bed.start_agent(&s.config).expect("agent");
    for dst in [s.server.v4(PORT), s.server.v6(PORT)] {
        let mark = agent.mark();
        let report = s.client.connect(dst, 300_000).expect("client");
        assert!(report.ok, "{report:#?}");
        assert_eq!(report.peer, Some(dst), "getpeername is the dialed address");
        let line = agent
            .wait_for_connection_log(mark, "inbound", dst, WAIT)
            .expect("inbound log");
        assert_eq!(log_str(&line, "path"), Some("kernel"), "{line}");
    }
    let peers = s.echo.wait_for_accepts(2, WAIT).expect("two accepts");
    assert_eq!(peers[0].ip(), IpAddr::from(s.client.ipv4()));
    assert_eq!(peers[1].ip(), IpAddr::from(s.client.ipv6()));
}

#[test]
fn a_deny_closes_an_open_spliced_connection_and_a_denied_one_never_reaches_the_app() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut s = same_node();
    let agent = s.bed.start_agent(&s.config).expect("agent");
    let dst = s.server.v4(PORT);
    let held = s
        .client
        .spawn_connect(dst, 2 * 1024 * 1024, 8000, 10_000)
        .expect("client");
    held.wait_connected(WAIT).expect("connected");
    s.echo.wait_for_accepts(1, WAIT).expect("accepted");
    wait_for_splice_entries(&agent, 2);

    let mark = agent.mark();
    s.config.extra.insert(
        "policies".into(),
        json!([{
            "name": "deny-client", "namespace": "default", "scope": "NAMESPACE",
            "action": "DENY",
            "rules": [{"clauses": [{"matches": [{
                "principals": [{"exact": "cluster.local/ns/default/sa/client"}]
            }]}]}]
        }]),
    );
    agent.reload(&s.config).expect("reload");
    let started = Instant::now();
    let report = held.wait_timeout(WAIT).expect("held client");
    assert!(!report.ok, "the open connection is cut: {report:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut at once, not when the client was done ({:?})",
        started.elapsed()
    );
    let line = agent
        .wait_for_connection_log(mark, "inbound", dst, WAIT)
        .expect("inbound log");
    assert!(
        log_str(&line, "error").is_some_and(|e| e.contains("no longer allowed")),
        "{line}"
    );
    assert_eq!(splice_entries(&agent).1, 0);

    // A new connection is judged before anything is spliced: nothing reaches the app.
    let accepted = s.echo.accepted_peers().len();
    let mark = agent.mark();
    let report = s.client.connect_with(dst, 100, 0, 3000).expect("client");
    assert!(!report.ok, "{report:#?}");
    let line = agent
        .wait_for_connection_log(mark, "inbound", dst, WAIT)
        .expect("inbound log");
    assert_eq!(
        log_str(&line, "authz.policy"),
        Some("default/deny-client"),
        "{line}"
    );
    assert_eq!(
        s.echo.accepted_peers().len(),
        accepted,
        "nothing reached the app"
    );
}

#[test]
fn restart_and_unenrolling_leave_no_splice_entries_and_off_means_hbone() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut s = same_node();
    let agent = s.bed.start_agent(&s.config).expect("agent");
    let dst = s.server.v4(PORT);

    // An agent restart mid-transfer ends the connection (as for a copied one); the new agent
    // starts with empty splice maps and splices again.
    let held = s
        .client
        .spawn_connect(dst, 2 * 1024 * 1024, 8000, 10_000)
        .expect("client");
    held.wait_connected(WAIT).expect("connected");
    wait_for_splice_entries(&agent, 2);
    agent.stop().expect("stop");
    let report = held.wait_timeout(WAIT).expect("held client");
    assert!(!report.ok, "the agent's sockets went with it: {report:#?}");
    let agent = s.bed.start_agent(&s.config).expect("agent again");
    assert_eq!(splice_entries(&agent), ("on".to_owned(), 0));
    let report = s.client.connect(dst, 100_000).expect("client");
    assert!(report.ok, "{report:#?}");

    // Un-enrolling both pods with a spliced connection open: it is closed, and the maps are
    // empty.
    let held = s
        .client
        .spawn_connect(dst, 2 * 1024 * 1024, 8000, 10_000)
        .expect("client");
    held.wait_connected(WAIT).expect("connected");
    wait_for_splice_entries(&agent, 2);
    let enrolled = s.config.clone();
    s.config.remove_pod(&s.client).remove_pod(&s.server);
    agent.reload(&s.config).expect("reload");
    let _ = held.wait_timeout(WAIT).expect("held client");
    assert_eq!(splice_entries(&agent).1, 0);
    agent.stop().expect("stop");

    // Off in config: the same connection takes the HBONE path.
    let mut off = enrolled;
    off.extra
        .insert("acceleration".into(), json!({"sameNode": false}));
    let agent = s
        .bed
        .start_agent(&off)
        .expect("agent with acceleration off");
    assert_eq!(
        splice_entries(&agent).0,
        "off (acceleration.sameNode: false)"
    );
    let mark = agent.mark();
    let report = s.client.connect(dst, 100_000).expect("client");
    assert!(report.ok, "{report:#?}");
    let line = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .expect("outbound log");
    assert_eq!(log_str(&line, "path"), Some("hbone"), "{line}");
}

#[test]
fn a_reset_from_either_side_resets_the_other_and_half_close_passes_through() {
    if !ambit_testbed::privileged() {
        return;
    }
    let s = same_node();
    let agent = s.bed.start_agent(&s.config).expect("agent");
    let dst = s.server.v4(PORT);

    // The client's FIN (it shuts down writing, then reads the rest of the echo): the server
    // sees the end of the stream only after every byte, and its own close ends the client's.
    let report = s.client.connect(dst, 5 * 1024 * 1024).expect("client");
    assert!(report.ok, "half-close: {report:#?}");

    // The client resets: the app's side of the connection is reset too.
    let mark = agent.mark();
    let resetter = s
        .client
        .spawn_connect_reset(dst, 256 * 1024, 200)
        .expect("client");
    let _ = resetter.wait_timeout(WAIT).expect("resetting client");
    let closed = s
        .echo
        .wait_for_event(|e| e["event"] == "closed" && e.get("error").is_some(), WAIT)
        .expect("the server's connection ends with an error");
    assert!(
        closed["error"] == "ConnectionReset" || closed["error"] == "BrokenPipe",
        "{closed}"
    );
    let line = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .expect("outbound log");
    assert_eq!(log_str(&line, "fault"), Some("downstream"), "{line}");
    assert_eq!(log_str(&line, "path"), Some("kernel"), "{line}");

    // The server resets after 64 KiB: the client's connection is reset.
    let resetting = s
        .server
        .serve_then_reset(PORT + 1, 64 * 1024)
        .expect("server");
    let mark = agent.mark();
    let report = s
        .client
        .connect(s.server.v4(PORT + 1), 1024 * 1024)
        .expect("client");
    assert!(!report.ok, "{report:#?}");
    // The RST reaches the client as a reset, or (if it was writing when it came) a broken pipe.
    assert!(
        matches!(
            report.error_kind.as_deref(),
            Some("ConnectionReset" | "BrokenPipe")
        ),
        "{report:#?}"
    );
    let line = agent
        .wait_for_connection_log(mark, "outbound", s.server.v4(PORT + 1), WAIT)
        .expect("outbound log");
    assert_eq!(log_str(&line, "fault"), Some("upstream"), "{line}");
    drop(resetting);
    wait_for_splice_entries(&agent, 0);
}

#[test]
fn a_same_node_destination_behind_a_waypoint_is_never_spliced_around_it() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod_as("client", "default", "client")
        .pod_as("server", "default", "server")
        .unenrolled("waypoint")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (client, server) = (m.take_pod("client"), m.take_pod("server"));
    let waypoint = m.take_pod("waypoint");
    let echo = server.serve(PORT).expect("echo");
    let mut config = m.take_config("node-a");
    // Known to the mesh (so its identity can be verified), but nothing serves it.
    config.remove_pod(&waypoint).add_peer(&waypoint);
    config.pod_mut("server").expect("server entry").waypoint =
        Some(json!({"address": waypoint.ipv4()}));
    let agent = m.bed.start_agent(&config).expect("agent");

    // No waypoint runs: the connection goes to it (and fails), never straight to the pod.
    let dst = server.v4(PORT);
    let mark = agent.mark();
    let r = client.connect_with(dst, 100, 0, 3000).expect("client");
    assert!(!r.ok, "no waypoint, no connection: {r:#?}");
    let line = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .expect("outbound log");
    assert_eq!(log_str(&line, "path"), Some("waypoint"), "{line}");
    assert!(echo.accepted_peers().is_empty(), "nothing reached the app");
    assert_eq!(splice_entries(&agent).1, 0);
}

#[test]
fn a_full_splice_map_copies_the_next_connection_in_user_space_and_counts_it() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut s = same_node();
    // Room for one spliced connection (two sockets).
    s.config
        .extra
        .insert("acceleration".into(), json!({"sameNodeConnections": 1}));
    let agent = s.bed.start_agent(&s.config).expect("agent");
    let bpf = bpf_view(&agent);
    let size = bpf["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "AMBIT_SPLICE"))
        .map(|m| m["maxEntries"].clone());
    assert_eq!(
        size,
        Some(json!(2)),
        "the map is sized by the config: {bpf}"
    );
    let dst = s.server.v4(PORT);
    let node = s.bed.node("node-a").expect("node");
    let counted =
        |name: &str, labels: &[(&str, &str)]| metrics::sum(&metrics::of_node(&node), name, labels);

    // The first connection takes the room.
    let held = s
        .client
        .spawn_connect(dst, 2 * 1024 * 1024, 5000, 10_000)
        .expect("client");
    held.wait_connected(WAIT).expect("connected");
    wait_for_splice_entries(&agent, 2);

    // The next one cannot be spliced: the agent copies it, every byte arrives, and the
    // operator sees why.
    copied_transfer(&s, &agent, "local");
    agent
        .wait_for_log(
            |v| {
                ambit_testbed::log_str(v, "error")
                    .is_some_and(|e| e.contains("acceleration.sameNodeConnections"))
            },
            WAIT,
        )
        .expect("the warning names the setting");
    assert_eq!(
        counted("ambit_splice_refused_total", &[("reason", "map")]),
        1.0
    );
    assert_eq!(counted("ambit_splice_connections_total", &[]), 1.0);
    assert_eq!(counted("ambit_splice_capacity_sockets", &[]), 2.0);

    // Once the first ends, the room is free again.
    let report = held.wait().expect("held client");
    assert!(report.ok, "{report:#?}");
    wait_for_splice_entries(&agent, 0);
    let mark = agent.mark();
    // Held open until spliced: a client that sends everything and its FIN before the agent
    // has admitted it is copied instead (a sockhash takes established sockets only).
    let next = s
        .client
        .spawn_connect(dst, 100_000, 2000, 10_000)
        .expect("client");
    wait_for_splice_entries(&agent, 2);
    let report = next.wait().expect("client");
    assert!(report.ok, "{report:#?}");
    let line = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .expect("access log");
    assert_eq!(log_str(&line, "path"), Some("kernel"), "{line}");
    assert_eq!(counted("ambit_splice_connections_total", &[]), 2.0);
}

#[test]
fn a_kernel_that_refuses_the_splice_program_leaves_same_node_traffic_on_hbone() {
    if !ambit_testbed::privileged() {
        return;
    }
    let s = same_node();
    // The kernel answers BPF_PROG_ATTACH with EINVAL, as one without sk_skb programs does: the
    // capture (attached by BPF_LINK_CREATE) works, the splice program cannot be attached.
    let agent = s
        .bed
        .start_agent_refusing_prog_attach(&s.config)
        .expect("agent on a kernel without the splice");
    agent
        .wait_for_log(
            |v| log_message(v).is_some_and(|m| m.starts_with("cannot load the same-node splice")),
            WAIT,
        )
        .expect("the agent says it carries same-node traffic in user space");
    let bpf = bpf_view(&agent);
    let state = bpf["splice"].as_str().unwrap_or_default();
    assert!(state.starts_with("unavailable: "), "{bpf}");

    // Same-node connections still work, both ways, every byte over the agent's HBONE path.
    copied_transfer(&s, &agent, "hbone");
    let node = s.bed.node("node-a").expect("node");
    assert_eq!(
        metrics::sum(
            &metrics::of_node(&node),
            "ambit_splice_connections_total",
            &[]
        ),
        0.0
    );
}
