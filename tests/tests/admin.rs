//! The operator's view of a node on the namespace test bed: every `ambitctl` subcommand against
//! running agents with known traffic, `explain` against what the data path really did, and the
//! Prometheus endpoint's counters against the exact connections and bytes sent.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use ambit_testbed::{Agent, MeshSpec, Node, Pod, TestBed, log_str, metrics::sum, poll};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);
const VIP: &str = "10.96.0.20";

struct Mesh {
    bed: TestBed,
    node_a: Node,
    node_b: Node,
    client: Pod,
    sleep: Pod,
    outsider: Pod,
    server: Pod,
    agent_a: Agent,
    agent_b: Agent,
}

/// node-a: `client` and `sleep` enrolled, `outsider` not; node-b: `server`, backing service
/// `echo` (VIP 10.96.0.20:80 -> 8080). Both nodes hold the policy that denies `sleep` (as a
/// control plane gives every node every policy).
fn mesh() -> Mesh {
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod_as("client", "default", "client")
        .pod_as("sleep", "default", "sleep")
        .unenrolled("outsider")
        .node("node-b")
        .pod_as("server", "default", "server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let policies = json!([{
        "name": "deny-sleep", "namespace": "default", "scope": "NAMESPACE", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{
            "principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]
        }]}]}]
    }]);
    let services = json!([{"namespace": "default", "name": "echo", "vips": [VIP],
                           "ports": [{"port": 80, "targetPort": PORT}]}]);
    let mut config_a = m.take_config("node-a");
    config_a.peers[0].services = vec!["default/echo".into()];
    config_a.extra.insert("policies".into(), policies.clone());
    config_a.extra.insert("services".into(), services);
    let mut config_b = m.take_config("node-b");
    config_b.extra.insert("policies".into(), policies);
    let agent_a = m.bed.start_agent(&config_a).expect("agent-a");
    let agent_b = m.bed.start_agent(&config_b).expect("agent-b");
    Mesh {
        node_a: m.take_node("node-a"),
        node_b: m.take_node("node-b"),
        client: m.take_pod("client"),
        sleep: m.take_pod("sleep"),
        outsider: m.take_pod("outsider"),
        server: m.take_pod("server"),
        agent_a,
        agent_b,
        bed: m.bed,
    }
}

fn find<'a>(list: &'a Value, key: &str, want: &str) -> Option<&'a Value> {
    list.as_array()?
        .iter()
        .find(|v| v[key].as_str() == Some(want))
}

#[test]
fn every_ambitctl_subcommand_shows_the_node_as_it_is() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let _echo = m.server.serve(PORT).expect("echo");
    let a = &m.agent_a;

    let status = a.ambitctl_json(&["status"]).expect("status");
    assert_eq!(status["node"], "node-a", "{status:#}");
    assert_eq!(status["ready"], true, "{status:#}");
    assert_eq!(status["enrolledPods"], 2, "{status:#}");
    assert_eq!(status["ca"]["kind"], "builtin", "{status:#}");
    assert_eq!(status["ca"]["certificatesReady"], 2, "{status:#}");
    assert!(status["xds"].is_null(), "no control plane configured");

    let local = a
        .ambitctl_json(&["workloads", "--local"])
        .expect("workloads");
    let client = find(&local, "name", "client").expect("client listed");
    assert_eq!(client["enrolled"], true, "{client:#}");
    assert_eq!(
        client["identity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(client["ips"][0], m.client.ipv4().to_string());
    assert_eq!(
        find(&local, "name", "outsider").expect("outsider")["enrolled"],
        false
    );
    assert!(
        find(&local, "name", "server").is_none(),
        "server is not local"
    );
    let all = a.ambitctl_json(&["workloads"]).expect("workloads");
    let server = find(&all, "name", "server").expect("server known");
    assert_eq!(server["local"], false);
    assert_eq!(server["hbone"], true);

    let services = a.ambitctl_json(&["services"]).expect("services");
    let echo = find(&services, "key", "default/echo.default.svc.cluster.local").expect("echo");
    assert_eq!(echo["vips"], json!([VIP]), "{echo:#}");
    assert_eq!(echo["ports"], json!([{"port": 80, "targetPort": PORT}]));
    assert_eq!(
        echo["endpoints"][0]["workload"], "default/server",
        "{echo:#}"
    );

    let policies = m.agent_b.ambitctl_json(&["policies"]).expect("policies");
    let deny = find(&policies, "name", "default/deny-sleep").expect("deny-sleep");
    assert_eq!(deny["action"], "DENY", "{deny:#}");
    assert_eq!(deny["scope"], "NAMESPACE");
    assert_eq!(deny["source"], "config");

    let certs = a.ambitctl_json(&["certificates"]).expect("certificates");
    for sa in ["client", "sleep"] {
        let id = format!("spiffe://cluster.local/ns/default/sa/{sa}");
        let c = find(&certs, "identity", &id).unwrap_or_else(|| panic!("{id}: {certs:#}"));
        assert_eq!(c["state"], "ready", "{c:#}");
        assert!(c["serial"].is_string(), "{c:#}");
        assert!(
            c["expiresInSeconds"].as_i64().is_some_and(|s| s > 0),
            "{c:#}"
        );
    }

    let bpf = a.ambitctl_json(&["bpf"]).expect("bpf");
    let programs = bpf["programs"].as_array().expect("programs");
    let connect4 = programs
        .iter()
        .find(|p| p["kind"] == "cgroup/connect4")
        .unwrap_or_else(|| panic!("connect4 attached: {bpf:#}"));
    assert!(
        connect4["attachedTo"][0]
            .as_str()
            .is_some_and(|c| c.starts_with("cgroup ")),
        "{connect4:#}"
    );
    let sk_lookup = programs
        .iter()
        .find(|p| p["kind"] == "sk_lookup")
        .expect("sk_lookup");
    assert_eq!(
        sk_lookup["attachedTo"].as_array().map(Vec::len),
        Some(2),
        "one sk_lookup link per enrolled pod: {sk_lookup:#}"
    );
    let mut enrolled: Vec<&str> = bpf["enrolled"]
        .as_array()
        .expect("enrolled")
        .iter()
        .filter_map(|e| e["pod"].as_str())
        .collect();
    enrolled.sort_unstable();
    assert_eq!(enrolled, ["default/client", "default/sleep"], "{bpf:#}");
    let enrolled_map = find(&bpf["maps"], "name", "AMBIT_ENROLLED").expect("map listed");
    assert_eq!(enrolled_map["entries"], 2, "{enrolled_map:#}");

    let config = a.ambitctl_json(&["config"]).expect("config");
    assert_eq!(config["node"], "node-a");
    assert_eq!(
        config["adminSocket"],
        a.admin_socket().display().to_string()
    );

    let level = a.ambitctl_json(&["log-level"]).expect("log-level");
    assert!(
        level["level"]
            .as_str()
            .is_some_and(|l| l.starts_with("debug")),
        "{level}"
    );
    let set = a
        .ambitctl_json(&["log-level", "info,ambit_agent::proxy=debug"])
        .expect("set");
    assert_eq!(set["level"], "info,ambit_agent::proxy=debug");
    assert_eq!(
        a.ambitctl_json(&["log-level"]).expect("log-level")["level"],
        "info,ambit_agent::proxy=debug"
    );
    let bad = a.ambitctl(&["log-level", "info,=="]).expect("run");
    assert_eq!(
        bad.status.code(),
        Some(1),
        "an invalid filter is the agent's error"
    );
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid log filter"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    // A live connection shows on both agents with both identities and its bytes so far.
    let half = 100_000;
    let conn = m
        .client
        .spawn_connect(m.server.v4(PORT), 2 * half, 4_000, 5_000)
        .expect("client");
    let seen = poll(WAIT, || {
        let list = a.ambitctl_json(&["connections"]).ok()?;
        list.as_array()?
            .iter()
            .find(|c| c["bytesSent"] == half as u64 && c["bytesReceived"] == half as u64)
            .cloned()
    })
    .unwrap_or_else(|| panic!("the open connection with {half} bytes each way"));
    assert_eq!(seen["direction"], "outbound", "{seen:#}");
    assert_eq!(seen["path"], "hbone");
    assert_eq!(
        seen["srcIdentity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(
        seen["dstIdentity"],
        "spiffe://cluster.local/ns/default/sa/server"
    );
    assert_eq!(seen["dstWorkload"], "default/server");
    let inbound = poll(WAIT, || {
        let list = m.agent_b.ambitctl_json(&["connections"]).ok()?;
        list.as_array()?
            .iter()
            .find(|c| c["direction"] == "inbound" && c["bytesSent"] == half as u64)
            .cloned()
    })
    .expect("the same connection at the destination");
    assert_eq!(
        inbound["srcIdentity"],
        "spiffe://cluster.local/ns/default/sa/client"
    );
    assert_eq!(inbound["srcWorkload"], "default/client", "{inbound:#}");
    let table = a.ambitctl(&["connections"]).expect("table");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("default/client") || table.contains("client"),
        "{table}"
    );
    let report = conn.wait().expect("client");
    assert!(report.ok, "{report:#?}");
    let gone = poll(WAIT, || {
        let list = a.ambitctl_json(&["connections"]).ok()?;
        list.as_array()?.is_empty().then_some(())
    });
    assert!(gone.is_some(), "a finished connection leaves the list");
}

/// The access log's record of the connection `client` just made (last one to `dst`).
fn outbound_record(agent: &Agent, mark: ambit_testbed::LogMark, src: &Pod) -> Value {
    agent
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
                    && log_str(v, "src.addr")
                        .and_then(|a| a.parse::<SocketAddr>().ok())
                        .is_some_and(|a| a.ip() == std::net::IpAddr::from(src.ipv4()))
            },
            WAIT,
        )
        .unwrap_or_else(|e| panic!("no outbound access log from {}: {e:#}", src.name()))
}

#[test]
fn explain_agrees_with_the_data_path() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let _echo = m.server.serve(PORT).expect("echo");
    let _outside = m.outsider.serve(PORT).expect("outsider serves");
    let a = &m.agent_a;
    let explain = |src: &str, dst: &str| {
        let out = a
            .ambitctl(&["-o", "json", "explain", "--from", src, dst])
            .expect("run");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "explain {src} {dst}: {e}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (v, out.status.code())
    };

    // Allowed, through HBONE.
    let dst = m.server.v4(PORT).to_string();
    let (e, code) = explain("default/client", &dst);
    assert_eq!(
        (e["captured"].clone(), e["path"].clone()),
        (json!(true), json!("hbone")),
        "{e:#}"
    );
    assert_eq!(e["verdict"], "allow");
    assert_eq!(code, Some(0));
    let mark = a.mark();
    let r = m.client.connect(m.server.v4(PORT), 1000).expect("client");
    assert!(r.ok, "{r:#?}");
    let log = outbound_record(a, mark, &m.client);
    assert_eq!(log_str(&log, "path"), e["path"].as_str(), "{log}");

    // Denied by the destination's policy, named with its rule.
    let (e, code) = explain(&m.sleep.ipv4().to_string(), &dst);
    assert_eq!(e["verdict"], "deny", "{e:#}");
    assert_eq!(e["authorization"]["policy"], "default/deny-sleep", "{e:#}");
    assert_eq!(e["authorization"]["rule"], 0, "{e:#}");
    assert_eq!(code, Some(4), "explain exits 4 on deny");
    let mark_b = m.agent_b.mark();
    let r = m
        .sleep
        .connect_with(m.server.v4(PORT), 100, 0, 3000)
        .expect("sleep");
    assert!(!r.ok, "the data path denies too: {r:#?}");
    let inbound = m
        .agent_b
        .wait_for_log_after(
            mark_b,
            |v| {
                log_str(v, "target") == Some("access") && log_str(v, "direction") == Some("inbound")
            },
            WAIT,
        )
        .expect("inbound log");
    assert_eq!(
        log_str(&inbound, "authz.policy"),
        e["authorization"]["policy"].as_str(),
        "{inbound}"
    );
    // The identity form of the source gives the same answer.
    let (by_id, _) = explain("spiffe://cluster.local/ns/default/sa/sleep", &dst);
    assert_eq!(by_id["verdict"], "deny");

    // Passthrough to a pod outside the mesh.
    let out_dst = m.outsider.v4(PORT).to_string();
    let (e, _) = explain("client", &out_dst);
    assert_eq!(e["path"], "passthrough", "{e:#}");
    assert!(e["authorization"].is_null());
    let mark = a.mark();
    let r = m.client.connect(m.outsider.v4(PORT), 1000).expect("client");
    assert!(r.ok, "{r:#?}");
    assert_eq!(
        log_str(&outbound_record(a, mark, &m.client), "path"),
        Some("passthrough")
    );

    // A service VIP: the endpoint explain names is the one the next connection gets.
    let vip = format!("{VIP}:80");
    let (e, _) = explain("default/client", &vip);
    assert_eq!(
        e["service"], "default/echo.default.svc.cluster.local",
        "{e:#}"
    );
    assert_eq!(e["endpoint"], m.server.v4(PORT).to_string());
    assert_eq!(e["path"], "hbone");
    let mark = a.mark();
    let r = m
        .client
        .connect(vip.parse().expect("vip"), 1000)
        .expect("client");
    assert!(r.ok, "{r:#?}");
    let log = outbound_record(a, mark, &m.client);
    assert_eq!(
        log_str(&log, "dst.endpoint"),
        e["endpoint"].as_str(),
        "{log}"
    );
    assert_eq!(log_str(&log, "path"), e["path"].as_str());

    // A port the service does not have: refused, by both.
    let (e, code) = explain("default/client", &format!("{VIP}:81"));
    assert_eq!(
        (e["path"].clone(), e["verdict"].clone()),
        (json!("refused"), json!("deny")),
        "{e:#}"
    );
    assert_eq!(code, Some(4));
    let r = m
        .client
        .connect_with(format!("{VIP}:81").parse().expect("vip"), 100, 0, 3000)
        .expect("client");
    assert!(!r.ok, "{r:#?}");

    // Unknown sources are the agent's error, not a verdict.
    let out = a
        .ambitctl(&["explain", "--from", "default/nobody", &dst])
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no workload"),
        "{out:?}"
    );
}

#[test]
fn metrics_parse_and_move_by_exactly_what_was_sent() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh();
    let echo = m.server.serve(PORT).expect("echo");
    let metrics_of = ambit_testbed::metrics::of_node;
    let metrics = || metrics_of(&m.node_b);
    let redirected = [("counter", "connect4_redirected")];
    let redirected_before = sum(
        &metrics_of(&m.node_a),
        "ambit_ebpf_events_total",
        &redirected,
    );
    let client_to_server = [
        ("reporter", "destination"),
        (
            "source_principal",
            "spiffe://cluster.local/ns/default/sa/client",
        ),
        ("source_workload", "client"),
        ("destination_workload", "server"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let deny = [("direction", "inbound"), ("policy", "default/deny-sleep")];
    let before = metrics();
    assert!(
        sum(&before, "ambit_enrolled_pods", &[]) == 1.0,
        "node-b has one pod"
    );

    const N: usize = 3;
    const BYTES: usize = 12_345;
    for _ in 0..N {
        let r = m.client.connect(m.server.v4(PORT), BYTES).expect("client");
        assert!(r.ok, "{r:#?}");
    }
    echo.wait_for_accepts(N, WAIT).expect("accepts");
    let r = m
        .sleep
        .connect_with(m.server.v4(PORT), 100, 0, 3000)
        .expect("sleep");
    assert!(!r.ok, "{r:#?}");

    // Byte counters move when connections close: wait for all of them.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let now = metrics();
        let closed = sum(
            &now,
            "istio_tcp_connections_closed_total",
            &client_to_server,
        ) - sum(
            &before,
            "istio_tcp_connections_closed_total",
            &client_to_server,
        );
        let denied = sum(&now, "ambit_authorization_denials_total", &deny)
            - sum(&before, "ambit_authorization_denials_total", &deny);
        if (closed as usize >= N && denied >= 1.0) || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sum(&after, name, labels) - sum(&before, name, labels)
    };
    assert_eq!(
        delta("istio_tcp_connections_opened_total", &client_to_server),
        N as f64
    );
    assert_eq!(
        delta("istio_tcp_connections_closed_total", &client_to_server),
        N as f64
    );
    assert_eq!(
        delta("istio_tcp_received_bytes_total", &client_to_server),
        (N * BYTES) as f64,
        "request bytes"
    );
    assert_eq!(
        delta("istio_tcp_sent_bytes_total", &client_to_server),
        (N * BYTES) as f64,
        "response bytes (echoed)"
    );
    assert_eq!(delta("ambit_authorization_denials_total", &deny), 1.0);
    assert!(
        sum(
            &after,
            "ambit_certificate_expiry_timestamp_seconds",
            &[("identity", "spiffe://cluster.local/ns/default/sa/server")]
        ) > 0.0
    );
    let redirected_after = sum(
        &metrics_of(&m.node_a),
        "ambit_ebpf_events_total",
        &redirected,
    );
    assert!(
        redirected_after - redirected_before >= (N + 1) as f64,
        "node-a's connect hook counted every redirect: {redirected_before} -> {redirected_after}"
    );
    let _ = (&m.bed, &m.outsider);
}
