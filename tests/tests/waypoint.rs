//! Waypoints from the node agent's side, on the namespace test bed: a destination with a
//! waypoint is reached only through it. When the waypoint is down the connection fails with a
//! clear error and is never sent around it; a client whose agent skips the waypoint is refused
//! by the destination's agent, over HBONE and in plaintext.

use std::time::Duration;

use ambit_testbed::{MeshSpec, log_str};
use serde_json::json;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_waypoint_that_is_down_fails_clearly_and_is_never_bypassed() {
    if !ambit_testbed::privileged() {
        return;
    }
    // A waypoint workload that serves nothing (its proxy is down).
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .node("node-b")
        .pod("server")
        .unenrolled_peer("waypoint", "default", "waypoint")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, server, waypoint) = (
        m.take_pod("client"),
        m.take_pod("server"),
        m.take_pod("waypoint"),
    );
    let echo = server.serve(PORT).expect("echo");
    let mut config_a = m.take_config("node-a");
    config_a.peer_mut("server").expect("server peer").waypoint =
        Some(json!({"address": waypoint.ipv4()}));
    let agent_a = m.bed.start_agent(&config_a).expect("agent-a");
    let _agent_b = m.bed.start_agent(&m.configs["node-b"]).expect("agent-b");

    let explain = agent_a
        .ambitctl_json(&[
            "explain",
            "--from",
            "default/client",
            &server.v4(PORT).to_string(),
        ])
        .expect("explain");
    assert_eq!(explain["path"], "waypoint", "{explain:#}");
    assert_eq!(
        explain["dstIdentity"], "spiffe://cluster.local/ns/default/sa/waypoint",
        "{explain:#}"
    );

    let mark = agent_a.mark();
    let r = client
        .connect_with(server.v4(PORT), 100, 0, 3000)
        .expect("client");
    assert!(!r.ok, "no waypoint, no connection: {r:#?}");
    let log = agent_a
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
            },
            WAIT,
        )
        .expect("access log");
    assert_eq!(log_str(&log, "path"), Some("waypoint"), "{log}");
    let error = log_str(&log, "error").unwrap_or_default();
    assert!(
        error.contains("waypoint default/waypoint") && error.contains(":15008"),
        "the error names the waypoint: {log}"
    );
    assert!(
        echo.accepted_peers().is_empty(),
        "nothing went around the waypoint"
    );
}

#[test]
fn a_workload_with_a_waypoint_refuses_traffic_that_skipped_it() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .unenrolled("outsider")
        .node("node-b")
        .pod("server")
        .unenrolled_peer("waypoint", "default", "waypoint")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, outsider, server, waypoint) = (
        m.take_pod("client"),
        m.take_pod("outsider"),
        m.take_pod("server"),
        m.take_pod("waypoint"),
    );
    let echo = server.serve(PORT).expect("echo");
    // node-a's agent does not know about the waypoint (a stale or misconfigured client side).
    let mut config_a = m.take_config("node-a");
    config_a.peers.retain(|p| p.name != "waypoint");
    let mut config_b = m.take_config("node-b");
    config_b.pod_mut("server").expect("server entry").waypoint =
        Some(json!({"address": waypoint.ipv4()}));
    let _agent_a = m.bed.start_agent(&config_a).expect("agent-a");
    let agent_b = m.bed.start_agent(&config_b).expect("agent-b");

    for (who, pod) in [("HBONE", &client), ("plaintext", &outsider)] {
        let mark = agent_b.mark();
        let r = pod
            .connect_with(server.v4(PORT), 100, 0, 3000)
            .expect("client");
        assert!(!r.ok, "{who}: skipping the waypoint is refused: {r:#?}");
        let log = agent_b
            .wait_for_log_after(
                mark,
                |v| {
                    log_str(v, "target") == Some("access")
                        && log_str(v, "direction") == Some("inbound")
                },
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{who}: inbound log: {e:#}"));
        assert!(
            log_str(&log, "error")
                .is_some_and(|e| e.contains("only accepts traffic through its waypoint")),
            "{who}: {log}"
        );
    }
    assert!(echo.accepted_peers().is_empty(), "nothing reached the app");

    // explain at the destination's agent says the same for the plaintext pod.
    let explain = agent_b
        .ambitctl(&[
            "-o",
            "json",
            "explain",
            "--from",
            &outsider.ipv4().to_string(),
            &server.v4(PORT).to_string(),
        ])
        .expect("explain");
    assert_eq!(explain.status.code(), Some(4), "{explain:?}");
    let v: serde_json::Value = serde_json::from_slice(&explain.stdout).expect("json");
    assert_eq!(v["verdict"], "deny", "{v:#}");
}
