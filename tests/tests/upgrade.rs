//! A rolling update with surge on the namespace test bed: the new agent starts while the old one
//! still runs (as a DaemonSet with `maxSurge: 1` does), then the old one is told to stop. A long
//! transfer through the old agent is drained, not cut; connections opened during the overlap
//! and after it are still tunnelled (never plaintext); and the new agent adopts the pinned
//! programs and maps instead of adding its own.

use std::time::Duration;

use ambit_testbed::{MeshSpec, log_str, poll};
use serde_json::Value;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

/// The pinned cgroup links (not `sk_lookup`, one per pod, nor the agent's own, unpinned splice
/// program on its sockhash).
fn cgroup_links(state: &Value) -> usize {
    state["programs"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter(|p| p["kind"] != "sk_lookup" && p["kind"] != "sk_skb/stream_verdict")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_surge_upgrade_drains_the_old_agent_and_never_leaks_plaintext() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .node("node-b")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (bed, client, server) = (&m.bed, &m.pods["client"], &m.pods["server"]);
    let (config_a, config_b) = (&m.configs["node-a"], &m.configs["node-b"]);
    let echo = server.serve(PORT).expect("echo");
    let old = bed.start_agent(config_a).expect("old agent");
    let agent_b = bed.start_agent(config_b).expect("agent-b");
    let before = old.ambitctl_json(&["bpf"]).expect("bpf");
    assert_eq!(
        cgroup_links(&before),
        ambit_testbed::CGROUP_LINKS,
        "{before:#}"
    );

    // A long transfer through the old agent: half now, a pause, half later.
    let long = client
        .spawn_connect(server.v4(PORT), 4 << 20, 4_000, 10_000)
        .expect("long transfer");
    long.wait_connected(WAIT).expect("long transfer connected");

    // The new agent starts next to the old one.
    let new = bed.start_agent(config_a).expect("new agent");
    for _ in 0..4 {
        let r = client.connect(server.v4(PORT), 10_000).expect("client");
        assert!(r.ok, "during the overlap: {r:#?}");
    }

    // The old one is told to stop: it stops accepting and drains.
    old.stop().expect("old agent stops on SIGTERM");
    for _ in 0..4 {
        let r = client.connect(server.v4(PORT), 10_000).expect("client");
        assert!(r.ok, "after the old agent left: {r:#?}");
    }
    let report = long.wait().expect("long transfer");
    assert!(
        report.ok,
        "the long transfer survives the upgrade: {report:#?}"
    );

    // Every connection reached the server through HBONE: the destination's agent logged each
    // as an inbound tunnel from the client's identity, and none arrived in plaintext.
    let inbound: Vec<Value> = poll(WAIT, || {
        let logs: Vec<Value> = agent_b
            .access_logs()
            .into_iter()
            .filter(|v| log_str(v, "direction") == Some("inbound"))
            .collect();
        (logs.len() >= 9).then_some(logs)
    })
    .unwrap_or_else(|| {
        panic!(
            "9 inbound connections at node-b: {:#?}",
            agent_b.access_logs()
        )
    });
    for v in &inbound {
        assert_eq!(log_str(v, "path"), Some("hbone"), "{v}");
        assert_eq!(
            log_str(v, "src.identity"),
            Some("spiffe://cluster.local/ns/default/sa/default"),
            "{v}"
        );
    }
    assert!(echo.accepted_peers().len() >= 9);

    // The new agent adopted the pinned state: the same seven cgroup links, one enrollment.
    let after = new.ambitctl_json(&["bpf"]).expect("bpf from the new agent");
    assert_eq!(
        cgroup_links(&after),
        ambit_testbed::CGROUP_LINKS,
        "no duplicate attachments: {after:#}"
    );
    assert_eq!(
        after["enrolled"].as_array().map(Vec::len),
        Some(1),
        "{after:#}"
    );
    let status = new
        .ambitctl_json(&["status"])
        .expect("the new agent serves the admin socket");
    assert_eq!(status["ready"], true, "{status:#}");
}
