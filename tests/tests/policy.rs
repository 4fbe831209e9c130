//! L4 authorization on the namespace test bed: policies from the agent's config, enforced on
//! every inbound connection (HBONE 15008 and plaintext 15006) before a byte reaches the app.

use std::time::Duration;

use ambit_testbed::{Agent, MeshSpec, log_message, log_str};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

fn inbound_log(agent: &Agent, mark: ambit_testbed::LogMark, src_ip: std::net::IpAddr) -> Value {
    agent
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("inbound")
                    && log_str(v, "src.addr")
                        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                        .is_some_and(|a| a.ip() == src_ip)
            },
            WAIT,
        )
        .unwrap_or_else(|e| panic!("no inbound access log from {src_ip}: {e:#}"))
}

#[test]
fn deny_by_principal_refuses_that_source_only_and_a_policy_change_applies_at_once() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .pod_as("curl", "default", "curl")
        .unenrolled("outsider")
        .node("node-b")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (sleep, curl) = (m.take_pod("sleep"), m.take_pod("curl"));
    let server = m.take_pod("server");
    let echo = server.serve(PORT).expect("echo");
    let (config_a, mut config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let bed = &m.bed;
    let deny_sleep = json!([{
        "name": "deny-sleep", "namespace": "default", "scope": "NAMESPACE", "action": "DENY",
        "rules": [{"clauses": [{"matches": [{
            "principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]
        }]}]}]
    }]);
    config_b.extra.insert("policies".into(), deny_sleep);
    let agent_a = bed.start_agent(&config_a).expect("agent-a");
    let agent_b = bed.start_agent(&config_b).expect("agent-b");
    let dst = server.v4(PORT);

    // sleep is denied: nothing reaches the app, and both sides say why.
    let (mark_a, mark_b) = (agent_a.mark(), agent_b.mark());
    let report = sleep.connect_with(dst, 100, 0, 3000).expect("run client");
    assert!(!report.ok, "sleep must be denied: {report:#?}");
    let inb = inbound_log(&agent_b, mark_b, sleep.ipv4().into());
    assert_eq!(
        log_str(&inb, "authz.policy"),
        Some("default/deny-sleep"),
        "{inb}"
    );
    assert!(
        log_str(&inb, "authz.decision")
            .is_some_and(|d| d.contains("denied by policy default/deny-sleep")),
        "{inb}"
    );
    let out = agent_a
        .wait_for_log_after(
            mark_a,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
            },
            WAIT,
        )
        .expect("outbound log");
    assert!(
        log_str(&out, "error").is_some_and(|e| e.contains("401") && e.contains("policy")),
        "{out}"
    );
    assert!(echo.accepted_peers().is_empty(), "nothing reached the app");

    // curl, another identity, still gets through.
    let report = curl.connect(dst, 1000).expect("run client");
    assert!(report.ok, "{report:#?}");

    // Lift the policy: sleep's next connection is allowed.
    config_b.extra.remove("policies");
    agent_b.reload(&config_b).expect("reload");
    let report = sleep.connect(dst, 1000).expect("run client");
    assert!(report.ok, "allowed once the deny is gone: {report:#?}");
    let _ = log_message;
}

#[test]
fn an_allow_policy_requiring_an_identity_refuses_plaintext_and_dry_run_only_logs() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .unenrolled("outsider")
        .node("node-b")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (client, outsider) = (m.take_pod("client"), m.take_pod("outsider"));
    let server = m.take_pod("server");
    let _echo = server.serve(PORT).expect("echo");
    let (config_a, mut config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let bed = &m.bed;
    config_b.extra.insert(
        "policies".into(),
        json!([
            {"name": "mesh-only", "namespace": "default", "scope": "NAMESPACE", "action": "ALLOW",
             "rules": [{"clauses": [{"matches": [{"namespaces": [{"exact": "default"}]}]}]}]},
            {"name": "would-deny-all", "namespace": "default", "scope": "NAMESPACE",
             "action": "DENY", "dryRun": true, "rules": [{}]}
        ]),
    );
    let _agent_a = bed.start_agent(&config_a).expect("agent-a");
    let agent_b = bed.start_agent(&config_b).expect("agent-b");
    let dst = server.v4(PORT);

    // The mesh client (namespace default, over HBONE) is allowed; the dry-run deny only logs.
    let mark = agent_b.mark();
    let report = client.connect(dst, 1000).expect("run client");
    assert!(report.ok, "{report:#?}");
    let inb = inbound_log(&agent_b, mark, client.ipv4().into());
    assert_eq!(
        log_str(&inb, "authz.policy"),
        Some("default/mesh-only"),
        "{inb}"
    );
    agent_b
        .wait_for_log_after(
            mark,
            |v| {
                log_message(v) == Some("dry-run authorization policy")
                    && log_str(v, "policy") == Some("default/would-deny-all")
            },
            WAIT,
        )
        .expect("dry-run hit logged");

    // A plaintext client has no namespace: the allow policy does not match it.
    let mark = agent_b.mark();
    let report = outsider
        .connect_with(dst, 100, 0, 3000)
        .expect("run client");
    assert!(!report.ok, "plaintext must be refused: {report:#?}");
    let inb = inbound_log(&agent_b, mark, outsider.ipv4().into());
    assert!(
        log_str(&inb, "authz.decision").is_some_and(|d| d.contains("no allow policy matched")),
        "{inb}"
    );
}

#[test]
fn a_new_deny_closes_open_connections_it_no_longer_allows() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .pod_as("curl", "default", "curl")
        .node("node-b")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (sleep, curl, server) = (
        m.take_pod("sleep"),
        m.take_pod("curl"),
        m.take_pod("server"),
    );
    let echo = server.serve(PORT).expect("echo");
    let (config_a, mut config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let bed = &m.bed;
    let _agent_a = bed.start_agent(&config_a).expect("agent-a");
    let agent_b = bed.start_agent(&config_b).expect("agent-b");
    let dst = server.v4(PORT);

    // Two long connections (half their bytes, a pause, the rest).
    let from_sleep = sleep
        .spawn_connect(dst, 20_000, 3000, 10_000)
        .expect("sleep client");
    let from_curl = curl
        .spawn_connect(dst, 20_000, 3000, 10_000)
        .expect("curl client");
    from_sleep.wait_connected(WAIT).expect("sleep connected");
    from_curl.wait_connected(WAIT).expect("curl connected");
    // Both tunnels reached the app (admitted and registered on node-b).
    echo.wait_for_accepts(2, WAIT)
        .expect("both connections at the app");

    // Deny sleep while both are open: its connection is closed, curl's goes on.
    let mark = agent_b.mark();
    config_b.extra.insert(
        "policies".into(),
        json!([{
            "name": "deny-sleep", "namespace": "default", "scope": "NAMESPACE", "action": "DENY",
            "rules": [{"clauses": [{"matches": [{
                "principals": [{"exact": "cluster.local/ns/default/sa/sleep"}]
            }]}]}]
        }]),
    );
    agent_b.reload(&config_b).expect("reload");
    let closed = inbound_log(&agent_b, mark, sleep.ipv4().into());
    assert!(
        log_str(&closed, "error")
            .is_some_and(|e| e.contains("no longer allowed") && e.contains("default/deny-sleep")),
        "{closed}"
    );
    let sleep_report = from_sleep.wait().expect("sleep client ends");
    assert!(
        !sleep_report.ok,
        "sleep's open connection is closed: {sleep_report:#?}"
    );
    let curl_report = from_curl.wait().expect("curl client ends");
    assert!(
        curl_report.ok,
        "curl's connection is untouched: {curl_report:#?}"
    );
}
