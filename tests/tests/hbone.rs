//! HBONE between nodes on the namespace test bed: real TLS, real HTTP/2, real kernel hooks.
//! What a user checks: the bytes arrive, the wire carries TLS to 15008 and never the payload,
//! each side knows the other's SPIFFE identity, strangers are refused, connections are pooled,
//! certificates rotate under a live stream, and the Istio CA API works.

use std::{
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Stdio,
    time::Duration,
};

use ambit_testbed::{
    Agent, AgentConfig, MeshSpec, Node, Pod, TestBed, log_field, log_message, log_str,
    wire::{Capture, contains, pattern},
};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

fn spiffe(pod: &Pod) -> String {
    format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        pod.namespace(),
        pod.service_account()
    )
}

/// Two nodes; `client` (and the unenrolled `outsider`) on node-a, `server` on node-b; each node
/// knows the other's pods as HBONE peers; an echo server in `server`.
struct Mesh {
    bed: TestBed,
    node_a: Node,
    node_b: Node,
    client: Pod,
    outsider: Pod,
    server: Pod,
    config_a: AgentConfig,
    config_b: AgentConfig,
    echo: ambit_testbed::Server,
}

impl Mesh {
    fn new() -> Mesh {
        let mut m = MeshSpec::new()
            .node("node-a")
            .pod("client")
            .unenrolled("outsider")
            .node("node-b")
            .pod("server")
            .build(env!("CARGO_BIN_EXE_ambit-testpod"))
            .expect("build the mesh");
        let server = m.take_pod("server");
        let echo = server.serve(PORT).expect("start echo server");
        Mesh {
            node_a: m.take_node("node-a"),
            node_b: m.take_node("node-b"),
            client: m.take_pod("client"),
            outsider: m.take_pod("outsider"),
            server,
            config_a: m.take_config("node-a"),
            config_b: m.take_config("node-b"),
            echo,
            bed: m.bed,
        }
    }

    fn start(&self) -> (Agent, Agent) {
        let a = self.bed.start_agent(&self.config_a).expect("start agent-a");
        let b = self.bed.start_agent(&self.config_b).expect("start agent-b");
        (a, b)
    }
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

fn assert_echoed(report: &ambit_testbed::ClientReport, bytes: usize) {
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.sent, bytes as u64, "{report:#?}");
    assert_eq!(report.received, bytes as u64, "{report:#?}");
}

fn count_logs(agent: &Agent, message: &str) -> usize {
    agent
        .log_lines()
        .iter()
        .filter(|v| log_message(v) == Some(message))
        .count()
}

#[test]
fn cross_node_traffic_is_mutual_tls_on_15008_with_identities_and_no_plaintext_on_the_wire() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = Mesh::new();
    let (agent_a, agent_b) = m.start();
    for dst in [m.server.v4(PORT), m.server.v6(PORT)] {
        let capture = Capture::start(&m.bed, &m.node_a).expect("capture");
        let (mark_a, mark_b) = (agent_a.mark(), agent_b.mark());
        let bytes = 300_000;
        let report = m.client.connect(dst, bytes).expect("run client");
        assert_echoed(&report, bytes);
        assert_eq!(report.peer, Some(dst));

        // Both agents logged the connection as HBONE, with both identities.
        let out = access_log(&agent_a, mark_a, "outbound", dst);
        assert_eq!(log_str(&out, "path"), Some("hbone"), "{out}");
        assert_eq!(
            log_str(&out, "src.identity"),
            Some(spiffe(&m.client).as_str()),
            "{out}"
        );
        assert_eq!(
            log_str(&out, "dst.identity"),
            Some(spiffe(&m.server).as_str()),
            "{out}"
        );
        assert!(log_field(&out, "error").is_none(), "{out}");
        let inb = access_log(&agent_b, mark_b, "inbound", dst);
        assert_eq!(log_str(&inb, "path"), Some("hbone"), "{inb}");
        assert_eq!(
            log_str(&inb, "src.identity"),
            Some(spiffe(&m.client).as_str()),
            "{inb}"
        );
        assert_eq!(
            log_field(&inb, "bytes_sent").and_then(Value::as_u64),
            Some(bytes as u64)
        );
        // The app sees the client pod's IP.
        let peers = m.echo.accepted_peers();
        let client_ip: IpAddr = if dst.is_ipv4() {
            m.client.ipv4().into()
        } else {
            m.client.ipv6().into()
        };
        assert_eq!(peers.last().map(|p| p.ip()), Some(client_ip));

        // On the wire between the nodes: TLS to 15008, never port 8080, never the payload.
        let (summary, raw) = capture.stop().expect("stop capture");
        assert!(
            summary.contains(".15008"),
            "no HBONE packets captured:\n{summary}"
        );
        assert!(
            !summary.contains(".8080"),
            "plaintext port 8080 on the wire:\n{summary}"
        );
        for window in [0..48, 100_000..100_048, 250_000..250_048] {
            assert!(
                !contains(&raw, &pattern(window.clone())),
                "payload bytes {window:?} visible in the capture"
            );
        }
    }
    let _ = (&m.node_b, &m.outsider);
}

#[test]
fn strangers_are_refused_and_nothing_reaches_the_app() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = Mesh::new();
    let (_agent_a, agent_b) = m.start();
    let dst = m.server.v4(PORT);
    let node_c = m.bed.add_node("node-c").expect("add node-c");
    let stranger = m.bed.add_pod(&node_c, "stranger").expect("add stranger");
    // node-b must not know the stranger for this to be about TLS, not about policy.

    // `why`: what the server's refusal must say, so the test knows which check refused.
    let refused = |config: AgentConfig, what: &str, why: &[&str]| {
        let agent = m.bed.start_agent(&config).expect("start agent-c");
        let mark_b = agent_b.mark();
        let accepted = m.echo.accepted_peers().len();
        let report = stranger
            .connect_with(dst, 100, 0, 3000)
            .expect("run client");
        assert!(!report.ok, "{what}: must be refused: {report:#?}");
        let refusal = agent_b
            .wait_for_log_after(
                mark_b,
                |v| log_message(v) == Some("HBONE TLS handshake refused"),
                WAIT,
            )
            .unwrap_or_else(|e| panic!("{what}: node-b did not log the refusal: {e:#}"));
        let error = log_str(&refusal, "error").unwrap_or_default();
        assert!(
            why.iter().any(|w| error.to_lowercase().contains(w)),
            "{what}: refused for the wrong reason: {error}"
        );
        assert_eq!(
            m.echo.accepted_peers().len(),
            accepted,
            "{what}: nothing reaches the app"
        );
        agent.stop().expect("stop agent-c");
    };

    // A certificate from another CA.
    let mut other_ca = m.bed.agent_config(&node_c);
    other_ca.enroll(&stranger).add_peer(&m.server);
    other_ca.ca = json!({"builtin": {"dir": m.bed.tmp_dir().join("other-ca")}});
    // It trusts the mesh's root, so it accepts the server and the refusal is the server's.
    other_ca.trust_roots = Some(m.bed.tmp_dir().join("ca").join("ca-cert.pem"));
    // Same root subject, other key: webpki reports a bad signature (or an unknown issuer).
    refused(other_ca, "another CA", &["badsignature", "unknownissuer"]);

    // The mesh's CA, but another trust domain.
    // (The server's identity is pinned, so the stranger accepts the server and the refusal is
    // the server's trust-domain check.)
    let mut other_td = m.bed.agent_config(&node_c);
    other_td.enroll(&stranger).add_peer(&m.server);
    other_td.peers[0].identity = Some(spiffe(&m.server));
    other_td.trust_domain = Some("elsewhere.local".into());
    other_td.trust_roots = Some(m.bed.tmp_dir().join("ca").join("ca-cert.pem"));
    refused(other_td, "another trust domain", &["elsewhere.local"]);

    // No certificate at all: a plain TLS client from a pod that is not in the mesh.
    let mark_b = agent_b.mark();
    let out = m
        .outsider
        .command("openssl")
        .args(["s_client", "-connect"])
        .arg(SocketAddr::new(m.server.ipv4().into(), 15008).to_string())
        .args(["-alpn", "h2", "-tls1_3"])
        .stdin(Stdio::null())
        .output()
        .expect("run openssl s_client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let refusal = agent_b
        .wait_for_log_after(
            mark_b,
            |v| log_message(v) == Some("HBONE TLS handshake refused"),
            WAIT,
        )
        .unwrap_or_else(|e| {
            panic!("a client without a certificate must be refused: {e:#}\n{text}")
        });
    let error = log_str(&refusal, "error")
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        error.contains("certificate"),
        "refused because no client certificate was presented: {error}"
    );

    let _ = (&m.node_b, &m.client);
}

#[test]
fn client_refuses_a_server_with_an_unexpected_identity() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = Mesh::new();
    m.config_a.add_peer_as(&m.server, "not-the-server", true);
    let (agent_a, _agent_b) = m.start();
    let dst = m.server.v4(PORT);
    let mark = agent_a.mark();
    let report = m
        .client
        .connect_with(dst, 100, 0, 3000)
        .expect("run client");
    assert!(!report.ok, "{report:#?}");
    let out = access_log(&agent_a, mark, "outbound", dst);
    let error = log_str(&out, "error").unwrap_or_default();
    assert!(
        error.contains("not-the-server") && error.contains(&spiffe(&m.server)),
        "the error names the expected and the presented identity: {out}"
    );
    assert!(
        m.echo.accepted_peers().is_empty(),
        "nothing reaches the app"
    );
}

#[test]
fn connections_share_pooled_hbone_connections_up_to_the_stream_limit() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = Mesh::new();
    m.config_a.hbone = Some(json!({"maxStreamsPerConnection": 2, "parallelConnections": 1}));
    let (agent_a, agent_b) = m.start();
    let dst = m.server.v4(PORT);

    // Sequential connections reuse one HBONE connection.
    for _ in 0..4 {
        assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    }
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 1);
    assert_eq!(
        count_logs(&agent_b, "hbone connection accepted"),
        1,
        "one TLS handshake"
    );

    // Three at once with a limit of two streams per connection: a second connection opens.
    let clients: Vec<_> = (0..3)
        .map(|_| {
            m.client
                .spawn_connect(dst, 10_000, 1500, 10_000)
                .expect("start client")
        })
        .collect();
    for c in clients {
        assert_echoed(&c.wait().expect("client"), 10_000);
    }
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 2);
    assert_eq!(count_logs(&agent_b, "hbone connection accepted"), 2);
}

#[test]
fn concurrent_flows_are_spread_over_parallel_connections_then_share() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = Mesh::new();
    m.config_a.hbone = Some(json!({"parallelConnections": 2}));
    let (agent_a, agent_b) = m.start();
    let dst = m.server.v4(PORT);

    // Three flows at once: the first two get a TLS connection each, the third shares one.
    let run_three = || {
        let clients: Vec<_> = (0..3)
            .map(|_| {
                m.client
                    .spawn_connect(dst, 10_000, 1500, 10_000)
                    .expect("start client")
            })
            .collect();
        for c in clients {
            assert_echoed(&c.wait().expect("client"), 10_000);
        }
    };
    run_three();
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 2);
    assert_eq!(count_logs(&agent_b, "hbone connection accepted"), 2);
    // The same again: the two pooled connections (idle now) take them; nothing new opens.
    run_three();
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 2);
    // One at a time: an idle pooled connection each time.
    for _ in 0..3 {
        assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    }
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 2);
}

#[test]
fn certificates_rotate_under_a_live_stream_and_new_connections_use_the_new_one() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = Mesh::new();
    m.config_a.cert_lifetime_seconds = Some(4);
    m.config_b.cert_lifetime_seconds = Some(4);
    let (_agent_a, agent_b) = m.start();
    let dst = m.server.v4(PORT);

    // A stream that sends before and after the rotation (at about 2 s).
    let long = m
        .client
        .spawn_connect(dst, 200_000, 4000, 15_000)
        .expect("start long client");
    long.wait_connected(WAIT).expect("connected");
    let first = agent_b
        .wait_for_log(
            |v| log_message(v) == Some("hbone connection accepted"),
            WAIT,
        )
        .expect("first handshake");
    let first_serial = log_str(&first, "src.serial").expect("serial").to_owned();

    // Wait for node-a to renew the client's certificate (at about half its 4 s lifetime).
    let client_id = spiffe(&m.client);
    let issued = |a: &Agent| {
        a.log_lines()
            .iter()
            .filter(|v| {
                log_message(v) == Some("workload certificate issued")
                    && log_str(v, "identity") == Some(client_id.as_str())
            })
            .count()
    };
    ambit_testbed::poll(WAIT, || (issued(&_agent_a) >= 2).then_some(()))
        .expect("the client's certificate was renewed");
    // A new connection now: it must present the renewed certificate.
    assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    let serials: Vec<String> = agent_b
        .log_lines()
        .iter()
        .filter(|v| log_message(v) == Some("hbone connection accepted"))
        .filter_map(|v| log_str(v, "src.serial").map(str::to_owned))
        .collect();
    assert!(
        serials.iter().any(|s| *s != first_serial),
        "a new connection after the rotation uses a new certificate: {serials:?}"
    );
    // And the long stream kept flowing across the rotation.
    assert_echoed(&long.wait().expect("long client"), 200_000);
}

/// `GET /healthz/ready` on the node's agent: the status code and body.
fn readiness(node: &Node) -> (u16, String) {
    let script = "import urllib.request, urllib.error\n\
try:\n    r = urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=2)\n    print(r.status); print(r.read().decode())\n\
except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n";
    let out = node
        .command("python3")
        .args(["-c", script])
        .output()
        .expect("run python3");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (code, body) = text.split_once('\n').unwrap_or((&text, ""));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `ambit-agent ca-server` in node-a's netns, serving Istio's CA API from a built-in CA to the
/// bed's two nodes, each with its own token (`<tmp>/token-<node>`) and its agent config's pods
/// as its workloads.
fn start_ca_server(bed: &TestBed, node: &Node, dir: &Path) -> ambit_testbed::Process {
    let nodes: Vec<Value> = ["node-a", "node-b"]
        .iter()
        .map(|n| {
            json!({"name": n, "tokenFile": bed.tmp_dir().join(format!("token-{n}")),
                   "agentConfig": bed.tmp_dir().join(format!("agent-{n}.yaml"))})
        })
        .collect();
    let config = bed.tmp_dir().join("ca-server.yaml");
    std::fs::write(
        &config,
        json!({"dir": dir, "listen": format!("{}:15012", node.underlay_v4()), "nodes": nodes})
            .to_string(),
    )
    .expect("write the CA server's config");
    let agent = ambit_testbed::agent_bin().expect("ambit-agent binary");
    let mut cmd = node.command(agent);
    cmd.args(["ca-server", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    bed.spawn(&mut cmd).expect("start ca-server")
}

#[test]
fn istio_ca_backend_gets_certificates_and_survives_the_ca_being_down_at_start() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = Mesh::new();
    let dir = m.bed.tmp_dir().join("istio-ca");
    for c in [&mut m.config_a, &mut m.config_b] {
        // Each node its own credential.
        let token = m.bed.tmp_dir().join(format!("token-{}", c.node));
        std::fs::write(&token, format!("secret-of-{}", c.node)).expect("write token");
        c.ca = json!({"istio": {
            "address": format!("https://{}:15012", m.node_a.underlay_v4()),
            "rootCert": dir.join("server-cert.pem"),
            "tokenPath": token,
        }});
        c.trust_roots = Some(dir.join("ca-cert.pem"));
    }
    // The CA server creates its files; start it once so they exist, then stop it: the agents
    // start while the CA is down.
    let ca = start_ca_server(&m.bed, &m.node_a, &dir);
    assert!(
        ambit_testbed::poll(WAIT, || dir.join("server-cert.pem").exists().then_some(())).is_some(),
        "ca-server wrote its certificate"
    );
    ca.kill().expect("stop ca-server");

    let (agent_a, agent_b) = m.start();
    agent_a
        .wait_for_log(
            |v| log_str(v, "level") == Some("WARN") && format!("{v}").contains("unreachable"),
            WAIT,
        )
        .expect("the CA being down is reported");
    assert!(agent_a.is_running(), "a CA that is down is not fatal");
    let (code, body) = readiness(&m.node_a);
    assert_eq!(code, 503, "not ready without certificates: {body}");
    assert!(body.contains("certificates missing"), "{body}");

    let _ca = start_ca_server(&m.bed, &m.node_a, &dir);
    let dst = m.server.v4(PORT);
    let ok = ambit_testbed::poll(Duration::from_secs(20), || {
        let r = m.client.connect_with(dst, 1000, 0, 3000).ok()?;
        r.ok.then_some(r)
    });
    assert!(ok.is_some(), "traffic flows once the CA is back");
    let (code, body) = readiness(&m.node_a);
    assert_eq!(code, 200, "ready once certificates arrived: {body}");
    let mark = agent_b.mark();
    assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    let inb = access_log(&agent_b, mark, "inbound", dst);
    assert_eq!(
        log_str(&inb, "src.identity"),
        Some(spiffe(&m.client).as_str())
    );
}

#[test]
fn an_app_that_refuses_or_an_agent_port_is_a_503_for_the_tunnel_and_a_clear_error() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = Mesh::new();
    let (agent_a, agent_b) = m.start();
    let closed = m.server.v4(9999); // nothing listens there
    let (mark_a, mark_b) = (agent_a.mark(), agent_b.mark());
    let report = m
        .client
        .connect_with(closed, 100, 0, 3000)
        .expect("run client");
    assert!(!report.ok, "{report:#?}");
    let out = access_log(&agent_a, mark_a, "outbound", closed);
    let error = log_str(&out, "error").unwrap_or_default();
    assert!(error.contains("503"), "client side names the status: {out}");
    let inb = access_log(&agent_b, mark_b, "inbound", closed);
    assert!(
        log_str(&inb, "error").is_some_and(|e| e.contains("refused")),
        "server side says the app refused: {inb}"
    );

    // A tunnel to one of the agent's own ports is a 503 too, as ztunnel answers (`SelfCall`).
    let own = m.server.v4(15006);
    let (mark_a, mark_b) = (agent_a.mark(), agent_b.mark());
    let report = m
        .client
        .connect_with(own, 100, 0, 3000)
        .expect("run client");
    assert!(!report.ok, "{report:#?}");
    let out = access_log(&agent_a, mark_a, "outbound", own);
    assert!(
        log_str(&out, "error").is_some_and(|e| e.contains("503")),
        "{out}"
    );
    let inb = access_log(&agent_b, mark_b, "inbound", own);
    assert!(
        log_str(&inb, "error").is_some_and(|e| e.contains("agent's own")),
        "{inb}"
    );
}

#[test]
fn a_restarted_destination_agent_gets_a_fresh_pooled_connection() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = Mesh::new();
    let (agent_a, agent_b) = m.start();
    let dst = m.server.v4(PORT);
    assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    // The pooled connection's far end goes away with the agent. Idle HBONE connections get a
    // GOAWAY when it drains, so it does not wait out its drain timeout for them.
    let stopping = std::time::Instant::now();
    agent_b.stop().expect("stop agent-b");
    assert!(
        stopping.elapsed() < Duration::from_secs(3),
        "draining waited {:?} for idle connections",
        stopping.elapsed()
    );
    let _agent_b = m.bed.start_agent(&m.config_b).expect("restart agent-b");
    assert_echoed(&m.client.connect(dst, 1000).expect("run client"), 1000);
    assert_eq!(count_logs(&agent_a, "hbone connection opened"), 2);
}
