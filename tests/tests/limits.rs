//! A mesh peer or a flood cannot take a node down (all load goes to the bed's own pods, bounded in
//! count and time): 10,000 concurrent connections through one node are served; one HBONE client
//! opening streams far past the server's limits, resetting them as fast as it opens them, sending
//! oversized header blocks, or stalling its TLS handshakes is held back while another pod's
//! traffic through the same agent keeps flowing; a pod's connection budget refuses the excess
//! with the limit named in the access log and the metric.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use ambit_testbed::{
    Agent, MeshSpec, Node, Pod, TestBed,
    h2raw::{self, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, REFUSED_STREAM, RST_STREAM, RawH2},
    log_str,
    metrics::{of_node, sum},
};
use serde_json::json;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
const ATTACKER: &str = "spiffe://cluster.local/ns/default/sa/attacker";

/// node-a with an enrolled client and an unenrolled attacker pod, node-b with the server; the
/// server node's agent gets `limits_b` (merged into its config).
struct Bed {
    bed: TestBed,
    node_b: Node,
    client: Pod,
    attacker: Pod,
    server: Pod,
    echo: ambit_testbed::Server,
    agent_a: Agent,
    agent_b: Agent,
}

fn bed(extra_b: serde_json::Value, extra_a: serde_json::Value) -> Bed {
    // Only node-a knows its peer (the server); node-b judges the client by its certificate.
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .unenrolled("attacker")
        .node("node-b")
        .pod("server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, attacker, server) = (
        m.take_pod("client"),
        m.take_pod("attacker"),
        m.take_pod("server"),
    );
    let (mut config_a, mut config_b) = (m.take_config("node-a"), m.take_config("node-b"));
    let node_b = m.take_node("node-b");
    let bed = m.bed;
    let echo = server.serve(PORT).expect("echo");
    config_a.add_peer(&server);
    for (k, v) in extra_a.as_object().into_iter().flatten() {
        config_a.extra.insert(k.clone(), v.clone());
    }
    // The server backs a service, for the service-hostname CONNECT test.
    if let Some(p) = config_b.pods.iter_mut().find(|p| p.name == server.name()) {
        p.services = vec!["default/echo".into()];
    }
    config_b.extra.insert(
        "services".into(),
        json!([{"namespace": "default", "name": "echo", "vips": ["10.96.7.7"],
                "ports": [{"port": 80, "targetPort": PORT}]}]),
    );
    for (k, v) in extra_b.as_object().into_iter().flatten() {
        config_b.extra.insert(k.clone(), v.clone());
    }
    let agent_a = bed.start_agent(&config_a).expect("agent-a");
    let agent_b = bed.start_agent(&config_b).expect("agent-b");
    Bed {
        bed,
        node_b,
        client,
        attacker,
        server,
        echo,
        agent_a,
        agent_b,
    }
}

impl Bed {
    fn ca_dir(&self) -> PathBuf {
        self.bed.tmp_dir().join("ca")
    }

    fn hbone(&self) -> SocketAddr {
        self.server.v4(15008)
    }

    /// An attacker's HBONE connection to the server pod, with a mesh identity of its own.
    fn attack(&self) -> RawH2 {
        let tcp = h2raw::tcp_in(&self.attacker.netns_path(), self.hbone(), WAIT)
            .expect("connect to 15008");
        RawH2::handshake(tcp, &self.ca_dir(), ATTACKER, WAIT).expect("TLS as the attacker")
    }

    /// The client pod's traffic still flows: `n` connections, each echoed.
    fn others_flow(&self, n: usize, when: &str) {
        for i in 0..n {
            let r = self
                .client
                .connect_with(self.server.v4(PORT), 1000, 0, 5000)
                .expect("run client");
            assert!(r.ok, "{when}, connection {i}: {r:#?}");
        }
    }

    fn refused(&self, reason: &str) -> f64 {
        sum(
            &of_node(&self.node_b),
            "ambit_connections_refused_total",
            &[("reason", reason)],
        )
    }
}

#[test]
fn ten_thousand_concurrent_connections_through_one_node_are_served() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(json!({}), json!({}));
    let report = b
        .client
        .flood(b.server.v4(PORT), 10_000, 64)
        .expect("run the flood client");
    assert_eq!(report["opened"], 10_000, "{report}");
    assert_eq!(
        report["echoed"], 10_000,
        "all held open at once, all served: {report}"
    );
    assert!(b.agent_a.is_running() && b.agent_b.is_running());
    let status = b.agent_b.ambitctl_json(&["status"]).expect("status");
    assert_eq!(status["ready"], true, "{status:#}");
    b.others_flow(3, "after the flood");
}

#[test]
fn thousands_of_streams_on_one_hbone_connection_are_limited_while_others_flow() {
    if !ambit_testbed::privileged() {
        return;
    }
    // The attacker's identity may hold 50 streams; each connection 100 (SETTINGS).
    let b = bed(json!({"limits": {"maxStreamsPerIdentity": 50}}), json!({}));
    let authority = b.server.v4(PORT).to_string();

    // 150 streams at once: 100 are taken (SETTINGS_MAX_CONCURRENT_STREAMS), the rest refused;
    // of those taken, the identity's budget serves 50 and answers 503 to the others.
    let mut h2 = b.attack();
    for i in 0..150u32 {
        h2.connect(2 * i + 1, &authority, 0);
    }
    h2.flush().expect("send the streams");
    // Every stream gets an answer (HEADERS) or is refused (RST_STREAM REFUSED_STREAM); a 503
    // answer is also followed by RST_STREAM NO_ERROR (the request side is still open), which
    // must not count, or the read could stop before the slower 200s.
    let (frames, closed) = h2
        .read_frames(Duration::from_secs(10), |fs| {
            fs.iter()
                .filter(|f| {
                    f.kind == HEADERS
                        || (f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM))
                })
                .count()
                >= 150
        })
        .expect("read the server's answers");
    assert!(!closed, "the connection stays up");
    let answered: Vec<_> = frames.iter().filter(|f| f.kind == HEADERS).collect();
    // `:status 200` is HPACK static index 8, the first byte of the block.
    let ok = answered
        .iter()
        .filter(|f| f.payload.first() == Some(&0x88))
        .count();
    let refused = frames
        .iter()
        .filter(|f| f.kind == RST_STREAM && f.error_code() == Some(REFUSED_STREAM))
        .count();
    assert_eq!(
        answered.len(),
        100,
        "SETTINGS_MAX_CONCURRENT_STREAMS streams are taken"
    );
    assert_eq!(refused, 50, "the rest are refused (REFUSED_STREAM)");
    assert_eq!(
        ok, 50,
        "the identity's budget serves 50; the others get 503"
    );
    assert_eq!(b.refused("identity_streams"), 50.0);
    b.echo
        .wait_for_accepts(50, WAIT)
        .expect("the served ones reached the app");
    b.others_flow(5, "while the attacker holds its streams");

    // Thousands at once on a new connection: h2 refuses past the limit, then cuts the
    // connection off (GOAWAY ENHANCE_YOUR_CALM) before its refusals pile up.
    let mut flood = b.attack();
    for i in 0..5000u32 {
        flood.connect(2 * i + 1, &authority, 0);
    }
    let _ = flood.flush();
    let (_, closed) = flood
        .read_frames(Duration::from_secs(10), |fs| {
            fs.iter().any(|f| f.kind == GOAWAY)
        })
        .expect("read");
    let cut = ambit_testbed::poll(WAIT, || (b.refused("h2_flood") >= 1.0).then_some(()));
    assert!(
        cut.is_some() || closed,
        "a client opening thousands of streams is cut off"
    );
    assert!(cut.is_some(), "and counted as h2_flood");
    assert!(
        b.echo.accepted_peers().len() <= 50 + 5,
        "the app got no more from the attacker than its budget"
    );
    b.others_flow(3, "after the stream flood");
    drop(h2);
}

#[test]
fn rapid_reset_is_cut_off_while_others_flow() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(json!({}), json!({}));
    let mut h2 = b.attack();
    let authority = b.server.v4(PORT).to_string();
    // Open and cancel at once, in batches, up to 20,000 streams or until the server ends it.
    let mut closed = false;
    let mut frames = Vec::new();
    for batch in 0..20u32 {
        for i in 0..1000 {
            let id = 2 * (batch * 1000 + i) + 1;
            h2.connect(id, &authority, 0);
            h2.reset(id, h2raw::CANCEL);
        }
        if h2.flush().is_err() {
            closed = true;
            break;
        }
        let (f, c) = h2
            .read_frames(Duration::from_millis(50), |_| false)
            .expect("read");
        frames.extend(f);
        if c || frames.iter().any(|f| f.kind == GOAWAY) {
            closed = true;
            break;
        }
    }
    let calm = frames
        .iter()
        .any(|f| f.kind == GOAWAY && f.error_code() == Some(ENHANCE_YOUR_CALM));
    assert!(
        closed,
        "the server cuts a client that resets streams as fast as it opens them"
    );
    assert!(calm, "with GOAWAY ENHANCE_YOUR_CALM");
    let counted = ambit_testbed::poll(WAIT, || (b.refused("h2_flood") >= 1.0).then_some(()));
    assert!(counted.is_some(), "counted as h2_flood");
    b.others_flow(3, "after the rapid reset");
}

#[test]
fn oversized_header_blocks_are_refused_while_others_flow() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(json!({}), json!({}));
    let mut h2 = b.attack();
    let authority = b.server.v4(PORT).to_string();
    // 64 KiB of header against the 16 KiB SETTINGS_MAX_HEADER_LIST_SIZE.
    h2.connect(1, &authority, 64 << 10);
    h2.flush().expect("send");
    let (frames, _) = h2
        .read_frames(Duration::from_secs(3), |fs| {
            fs.iter().any(|f| {
                f.stream == 1 && matches!(f.kind, HEADERS | RST_STREAM) || f.kind == GOAWAY
            })
        })
        .expect("read");
    let served = frames
        .iter()
        .any(|f| f.stream == 1 && f.kind == HEADERS && f.payload.first() == Some(&0x88));
    assert!(
        !served,
        "an oversized header block is not served: {frames:?}"
    );
    assert!(
        frames
            .iter()
            .any(|f| (f.stream == 1 && matches!(f.kind, HEADERS | RST_STREAM)) || f.kind == GOAWAY),
        "it is answered with a refusal: {frames:?}"
    );
    assert!(
        b.echo.accepted_peers().is_empty(),
        "nothing reached the app"
    );
    b.others_flow(3, "after the oversized headers");
}

#[test]
fn a_client_stalling_its_tls_handshakes_does_not_hold_up_others() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(
        json!({"limits": {"maxHandshakesPerSource": 16, "handshakeTimeoutSeconds": 30}}),
        json!({}),
    );
    // 100 TCP connections to 15008 that never send a ClientHello.
    let stalled: Vec<_> = (0..100)
        .map(|_| h2raw::tcp_in(&b.attacker.netns_path(), b.hbone(), WAIT).expect("connect"))
        .collect();
    let counted = ambit_testbed::poll(WAIT, || {
        (b.refused("handshakes_per_source") >= 84.0).then_some(())
    });
    assert!(
        counted.is_some(),
        "past 16 in flight from one source, handshakes are refused at once ({})",
        b.refused("handshakes_per_source")
    );
    let start = std::time::Instant::now();
    b.others_flow(5, "while the attacker stalls 100 handshakes");
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "other clients were not held up: {:?}",
        start.elapsed()
    );
    drop(stalled);
}

#[test]
fn a_pod_over_its_connection_budget_is_refused_with_the_limit_named() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(json!({}), json!({"limits": {"maxConnectionsPerPod": 4}}));
    let held: Vec<_> = (0..4)
        .map(|_| {
            let h = b
                .client
                .spawn_connect(b.server.v4(PORT), 100, 8000, 10_000)
                .expect("client");
            h.wait_connected(WAIT).expect("connected");
            h
        })
        .collect();
    b.echo
        .wait_for_accepts(4, WAIT)
        .expect("four reached the app");
    let mark = b.agent_a.mark();
    let r = b
        .client
        .connect_with(b.server.v4(PORT), 100, 0, 3000)
        .expect("client");
    assert!(!r.ok, "the fifth is refused: {r:#?}");
    let log = b
        .agent_a
        .wait_for_access_log_after(
            mark,
            |v| log_str(v, "limit") == Some("pod_connections"),
            WAIT,
        )
        .expect("the refusal's access log line");
    assert!(
        log_str(&log, "error").is_some_and(|e| e.contains("limits.maxConnectionsPerPod")),
        "{log}"
    );
    let m = of_node(&b.bed.node("node-a").expect("node-a"));
    assert_eq!(
        sum(
            &m,
            "ambit_connections_refused_total",
            &[("direction", "outbound"), ("reason", "pod_connections")]
        ),
        1.0
    );
    for h in held {
        assert!(h.wait().expect("held client").ok);
    }
    // Room again once they are done.
    b.others_flow(2, "after the held connections ended");
}

/// ztunnel's service-hostname `CONNECT` (`host:port`, as east-west gateways send it) reaches the
/// pod on the port it serves that service on; a hostname the pod does not back, or a port the
/// service lacks, is a 503 as ztunnel answers.
#[test]
fn a_service_hostname_connect_reaches_the_pod_that_backs_it() {
    if !ambit_testbed::privileged() {
        return;
    }
    let b = bed(json!({}), json!({}));
    let mark = b.agent_b.mark();
    let mut h2 = b.attack();
    h2.connect(1, "echo.default.svc.cluster.local:80", 0);
    h2.connect(3, "other.default.svc.cluster.local:80", 0);
    h2.connect(5, "echo.default.svc.cluster.local:81", 0);
    h2.flush().expect("send");
    let (frames, _) = h2
        .read_frames(WAIT, |fs| {
            fs.iter().filter(|f| f.kind == HEADERS).count() >= 3
        })
        .expect("read the answers");
    let status_200 = |id: u32| {
        frames
            .iter()
            .find(|f| f.kind == HEADERS && f.stream == id)
            .map(|f| f.payload.first() == Some(&0x88))
    };
    assert_eq!(
        status_200(1),
        Some(true),
        "the backed service: 200 {frames:?}"
    );
    assert_eq!(
        status_200(3),
        Some(false),
        "a service it does not back: refused"
    );
    assert_eq!(
        status_200(5),
        Some(false),
        "a port the service lacks: refused"
    );
    // The served stream is logged when it ends.
    drop(h2);
    let served = b
        .agent_b
        .wait_for_connection_log(mark, "inbound", b.server.v4(PORT), WAIT)
        .expect("the hostname CONNECT went to the pod's port 8080");
    assert_eq!(log_str(&served, "src.identity"), Some(ATTACKER), "{served}");
    for why in [
        "backs no service other.default.svc.cluster.local",
        "has no port 81",
    ] {
        b.agent_b
            .wait_for_access_log_after(
                mark,
                |v| log_str(v, "error").is_some_and(|e| e.contains(why)),
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{why}: {e:#}"));
    }
}
