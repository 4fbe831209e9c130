//! Service VIPs on the namespace test bed: the agent spreads connections to a VIP over the
//! workloads that back the service, follows endpoint changes live, and refuses clearly when
//! there is none.

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use ambit_testbed::{MeshSpec, log_str};
use serde_json::json;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

#[test]
fn a_vip_spreads_over_its_endpoints_follows_changes_and_refuses_when_empty() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .node("node-b")
        .pod("echo-1")
        .pod("echo-2")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("build the mesh");
    let (client, one, two) = (
        m.take_pod("client"),
        m.take_pod("echo-1"),
        m.take_pod("echo-2"),
    );
    let echo_one = one.serve(PORT).expect("serve 1");
    let echo_two = two.serve(PORT).expect("serve 2");

    let services = json!([
        {"namespace": "default", "name": "echo", "vips": ["10.96.0.10", "fd00:96::10"],
         "ports": [{"port": 80, "targetPort": PORT}]},
        {"namespace": "default", "name": "empty", "vips": ["10.96.0.11"], "ports": [{"port": 80}]}
    ]);
    let (mut config_a, config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let bed = &m.bed;
    for p in &mut config_a.peers {
        p.services = vec!["default/echo".into()];
    }
    config_a.extra.insert("services".into(), services.clone());
    let agent_a = bed.start_agent(&config_a).expect("agent-a");
    let _agent_b = bed.start_agent(&config_b).expect("agent-b");

    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    for _ in 0..6 {
        let r = client.connect(vip, 1000).expect("run client");
        assert!(r.ok, "{r:#?}");
        assert_eq!(r.peer, Some(vip), "the app still sees the VIP it dialed");
    }
    let vip6: SocketAddr = "[fd00:96::10]:80".parse().expect("vip");
    let r = client.connect(vip6, 1000).expect("run client");
    assert!(r.ok, "IPv6 VIP: {r:#?}");
    let (a, b) = (
        echo_one.accepted_peers().len(),
        echo_two.accepted_peers().len(),
    );
    assert!(
        a >= 2 && b >= 2,
        "both endpoints serve the VIP: {a} and {b}"
    );
    let logged: HashMap<String, usize> = agent_a
        .access_logs()
        .iter()
        .filter(|v| log_str(v, "dst.service") == Some("default/echo.default.svc.cluster.local"))
        .filter_map(|v| log_str(v, "dst.endpoint").map(str::to_owned))
        .fold(HashMap::new(), |mut m, e| {
            *m.entry(e).or_default() += 1;
            m
        });
    assert!(
        logged.len() >= 2,
        "the access log shows the chosen endpoints: {logged:?}"
    );

    // echo-2 stops backing the service: new connections all go to echo-1.
    config_a.peers.iter_mut().for_each(|p| {
        if p.name == "echo-2" {
            p.services.clear();
        }
    });
    agent_a.reload(&config_a).expect("reload");
    let before = echo_two.accepted_peers().len();
    for _ in 0..4 {
        let r = client.connect(vip, 100).expect("run client");
        assert!(r.ok, "{r:#?}");
    }
    assert_eq!(
        echo_two.accepted_peers().len(),
        before,
        "no new connections to echo-2"
    );

    // A VIP with no endpoints is refused, with a clear error.
    let mark = agent_a.mark();
    let empty: SocketAddr = "10.96.0.11:80".parse().expect("vip");
    let r = client
        .connect_with(empty, 100, 0, 3000)
        .expect("run client");
    assert!(!r.ok, "{r:#?}");
    let line = agent_a
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "dst.addr") == Some("10.96.0.11:80")
            },
            WAIT,
        )
        .expect("access log for the empty VIP");
    assert!(
        log_str(&line, "error").is_some_and(|e| e.contains("no healthy endpoint")),
        "{line}"
    );
}
