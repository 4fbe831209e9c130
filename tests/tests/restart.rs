//! A restart never releases pods (Kubernetes mode, against the stand-in API server): node-a's
//! agent is restarted while its client pod keeps connecting to a pod on node-b, once with the API
//! server answering and once with it down for 30 s. A capture on node-a's link sees not one byte
//! of the client's payload in the clear (only HBONE); the netns cookies enrolled in the pinned
//! maps are the same before and after; while the API is away the new agent says so (status and
//! readiness) and serves the pod as the previous agent left it; once the API answers again,
//! traffic flows over HBONE as before.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, AtomicU32, Ordering},
    time::{Duration, Instant},
};

use ambit_testbed::{
    Agent, LogMark, MeshSpec, Pod,
    kube_server::KubeApi,
    log_str, poll,
    wire::{Capture, contains, pattern},
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
/// How long the API server stays away in the outage case.
const OUTAGE: Duration = Duration::from_secs(30);
/// After the outage the agent's list retries back off (up to 30 s).
const RESYNC: Duration = Duration::from_secs(60);

/// The netns cookies enrolled in the pinned maps, as the agent reports them.
fn enrolled_cookies(agent: &Agent) -> Vec<u64> {
    let bpf = agent.ambitctl_json(&["bpf"]).expect("ambitctl bpf");
    let mut cookies: Vec<u64> = bpf["enrolled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["netnsCookie"].as_u64())
        .collect();
    cookies.sort_unstable();
    cookies
}

/// The outbound access log line of the client's next connection to `dst`.
fn outbound_log(agent: &Agent, mark: LogMark, dst: SocketAddr) -> Value {
    agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// One connection with the payload pattern, which must arrive and come back over HBONE.
fn assert_tunnelled(agent: &Agent, client: &Pod, dst: SocketAddr, when: &str) {
    let mark = agent.mark();
    let report = client.connect(dst, 4096).expect("run client");
    assert!(report.ok, "{when}: {report:#?}");
    let log = outbound_log(agent, mark, dst);
    assert_eq!(log_str(&log, "path"), Some("hbone"), "{when}: {log}");
}

/// Connects again and again until `stop` (at most ~1000 times), counting the outcomes: the
/// traffic of a pod that keeps working through the restart.
fn stream(client: &Pod, dst: SocketAddr, stop: &AtomicBool, ok: &AtomicU32, failed: &AtomicU32) {
    for _ in 0..1000 {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match client.connect_with(dst, 2048, 0, 2000) {
            Ok(r) if r.ok => ok.fetch_add(1, Ordering::SeqCst),
            _ => failed.fetch_add(1, Ordering::SeqCst),
        };
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn restart_keeps_pods_captured(api_down: bool) {
    // node-a's agent learns its client pod from the API; node-b's config names it as a peer.
    let mut m = MeshSpec::new()
        .node("node-a")
        .listed_elsewhere("client", "default", "client")
        .node("node-b")
        .pod_as("server", "default", "server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, server) = (m.take_pod("client"), m.take_pod("server"));
    let (node_a, mut config_a, config_b) = (
        m.take_node("node-a"),
        m.take_config("node-a"),
        m.take_config("node-b"),
    );
    let bed = &m.bed;
    let _echo = server.serve(PORT).expect("echo");
    let dst = server.v4(PORT);

    let api = KubeApi::start_in(&node_a.netns_path()).expect("fake API server");
    api.set_namespace("default", json!({"istio.io/dataplane-mode": "ambient"}));
    api.set_pod("node-a", &client, json!({"app": "client"}));
    api.configure(bed, &mut config_a);
    let _agent_b = bed.start_agent(&config_b).expect("agent-b");
    let old = bed.start_agent(&config_a).expect("agent-a");
    let enrolled = poll(WAIT, || {
        let c = enrolled_cookies(&old);
        (c.len() == 1).then_some(c)
    });
    let before = enrolled.expect("the client pod is enrolled from the API");
    assert_tunnelled(&old, &client, dst, "before the restart");

    let capture = Capture::start(bed, &node_a).expect("capture");
    let (stop, ok, failed) = (AtomicBool::new(false), AtomicU32::new(0), AtomicU32::new(0));
    std::thread::scope(|s| {
        let streaming = s.spawn(|| stream(&client, dst, &stop, &ok, &failed));
        std::thread::sleep(Duration::from_millis(500));
        old.stop().expect("the old agent stops on SIGTERM");
        let down_since = Instant::now();
        if api_down {
            api.set_down(true);
        }
        let new = bed.start_agent(&config_a).expect("the new agent");
        assert_eq!(
            enrolled_cookies(&new),
            before,
            "the new agent kept the pinned enrollment"
        );

        if api_down {
            let status = new.ambitctl_json(&["status"]).expect("status");
            assert_eq!(status["waitingFor"], "kubernetes", "{status:#}");
            assert_eq!(
                status["adoptedPods"],
                json!(["default/client"]),
                "{status:#}"
            );
            assert_eq!(status["ready"], false, "{status:#}");
            let why = status["notReady"].to_string();
            assert!(
                why.contains("Kubernetes API") && why.contains("stay captured"),
                "readiness says why: {status:#}"
            );
            // The pod is served as the previous agent left it, API or not.
            assert_tunnelled(&new, &client, dst, "while the API is down");
            std::thread::sleep(OUTAGE.saturating_sub(down_since.elapsed()));
            assert_eq!(
                enrolled_cookies(&new),
                before,
                "30 s without the API: still captured"
            );
            api.set_down(false);
        }
        let synced = poll(RESYNC, || {
            let s = new.ambitctl_json(&["status"]).ok()?;
            (s["waitingFor"].is_null() && s["ready"] == true).then_some(s)
        });
        let status = synced.unwrap_or_else(|| {
            panic!(
                "the agent syncs with the API again: {:#}",
                new.ambitctl_json(&["status"]).unwrap_or_default()
            )
        });
        assert_eq!(status["adoptedPods"], json!([]), "{status:#}");
        assert_eq!(
            enrolled_cookies(&new),
            before,
            "the same netns, never released"
        );
        assert_tunnelled(&new, &client, dst, "after the API answered again");
        stop.store(true, Ordering::SeqCst);
        streaming.join().expect("streaming thread");
    });
    let (summary, raw) = capture.stop().expect("stop capture");
    assert!(
        ok.load(Ordering::SeqCst) > 0,
        "the client's connections went through during the test"
    );
    assert!(
        summary.contains(".15008"),
        "the capture saw the HBONE traffic:\n{summary}"
    );
    assert!(
        !summary.contains(&format!("{}.{PORT}", server.ipv4())),
        "no plaintext connection to the server on the wire:\n{summary}"
    );
    for window in [0..64, 1000..1064] {
        assert!(
            !contains(&raw, &pattern(window.clone())),
            "the client's payload {window:?} is visible on the wire"
        );
    }
}

#[test]
fn a_restart_in_kubernetes_mode_never_releases_pods() {
    if !ambit_testbed::privileged() {
        return;
    }
    restart_keeps_pods_captured(false);
}

#[test]
fn a_restart_while_the_api_server_is_down_keeps_pods_captured_and_served() {
    if !ambit_testbed::privileged() {
        return;
    }
    restart_keeps_pods_captured(true);
}
