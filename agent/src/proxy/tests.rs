//! The in-process tier: two "nodes" (a `ProxyContext` each, as the agent builds it) serve their
//! pods on loopback addresses through the [`Loopback`] capture, so a connection goes app ->
//! outbound -> HBONE (real mutual TLS, real HTTP/2) -> inbound -> app without root, eBPF or
//! network namespaces. What needs the kernel (redirection, sk_lookup, netns, transparent
//! sockets across namespaces) stays in the privileged tier (`tests/`).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpSocket},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{PodInfo, PodListeners, ProxyContext, capture::Loopback};
use crate::{
    config::Config,
    identity::manager::CertManager,
    metrics::{Gauges, Metrics},
    redirect::Netns,
    state::StateWriter,
};

const APP_PORT: u16 = 8080;

fn ip(s: &str) -> IpAddr {
    s.parse().expect("IP address")
}
const WAIT: Duration = Duration::from_secs(10);

/// A directory for the shared built-in CA, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "ambit-inproc-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Validation (rightly) refuses loopback pod IPs: pods, peers and waypoint addresses get their
/// loopback ones after it (`addresses`: config address -> loopback address).
fn remap(config: &mut Config, addresses: &[(IpAddr, IpAddr)]) {
    let lo = |ip: &mut IpAddr| {
        if let Some((_, l)) = addresses.iter().find(|(at, _)| at == ip) {
            *ip = *l;
        }
    };
    config.pods.iter_mut().flat_map(|p| &mut p.ips).for_each(lo);
    config
        .peers
        .iter_mut()
        .flat_map(|p| &mut p.ips)
        .for_each(lo);
    config
        .services
        .iter_mut()
        .filter_map(|s| s.waypoint.as_mut())
        .for_each(|w| lo(&mut w.address));
}

/// One node: its proxy, its state writer, and the pods it serves.
struct Node {
    ctx: Arc<ProxyContext>,
    capture: Arc<Loopback>,
    metrics: Arc<Metrics>,
    _sources: Arc<StateWriter>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Node {
    /// Builds a node from `yaml` (a config as the agent reads it) and serves its pods, each on
    /// its address's ports 15001, 15006 and 15008.
    async fn start(yaml: &str, addresses: &[(IpAddr, IpAddr)]) -> Node {
        let mut config = Config::parse(yaml, std::path::Path::new("inproc.yaml")).expect("config");
        remap(&mut config, addresses);
        let (ca, roots) = crate::app::build_ca(&config).expect("built-in CA");
        let certs = CertManager::new(ca, config.cert_lifetime);
        certs.set_identities(config.enrolled_pods().map(|p| p.identity.clone()));
        let capture = Arc::new(Loopback::default());
        let metrics = Arc::new(Metrics::default());
        let ctx = ProxyContext::new(&config, capture.clone(), certs, roots, metrics.clone());
        let sources = ctx.sources(&config);
        sources.set_config(Arc::new(config.clone()));
        let (cancel, tasks) = (CancellationToken::new(), TaskTracker::new());
        for p in config.enrolled_pods() {
            let ip = p.ips[0];
            let listen = |port| {
                let l = std::net::TcpListener::bind(SocketAddr::new(ip, port)).expect("bind");
                l.set_nonblocking(true).expect("nonblocking");
                l
            };
            let pod = Arc::new(PodInfo {
                key: p.key(),
                identity: p.identity.clone(),
                ips: p.ips.clone(),
                netns: Netns::own().expect("own netns"),
                hbone_tls: Default::default(),
                open: Arc::default(),
                dns: false,
            });
            let listeners = PodListeners {
                outbound: vec![listen(ambit_common::OUTBOUND_PORT)],
                inbound: listen(ambit_common::INBOUND_PORT),
                hbone: listen(ambit_common::HBONE_PORT),
                dns: Vec::new(),
            };
            tasks.spawn(super::follow_pod_cert(
                ctx.clone(),
                pod.clone(),
                cancel.clone(),
            ));
            super::serve_pod(ctx.clone(), pod.clone(), listeners, cancel.clone(), &tasks)
                .expect("serve pod");
            // The first certificate is issued in the background; wait for the server config.
            tokio::time::timeout(WAIT, async {
                while pod.hbone_server_config().is_none() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
            .await
            .expect("pod certificate within 10 s");
        }
        Node {
            ctx,
            capture,
            metrics,
            _sources: sources,
            cancel,
            tasks,
        }
    }

    /// The app at `src` (a pod of this node) dials `dst`: the connection is "redirected" to the
    /// pod's outbound listener, as the connect hook would. Sends `message` (then half-closes,
    /// unless it is an HTTP `GET`), returns the answer (empty when refused or closed).
    async fn dial(&self, src: IpAddr, dst: SocketAddr, message: &[u8]) -> Vec<u8> {
        let socket = TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::new(src, 0))
            .expect("bind app socket");
        let local = socket.local_addr().expect("local addr");
        self.capture.redirect(local, dst);
        let mut stream = socket
            .connect(SocketAddr::new(src, ambit_common::OUTBOUND_PORT))
            .await
            .expect("connect to the outbound listener");
        let mut answer = Vec::new();
        // An echo needs the half-close to finish; an HTTP client waits for the answer instead.
        let half_close = !message.starts_with(b"GET ");
        if stream.write_all(message).await.is_ok()
            && (!half_close || stream.shutdown().await.is_ok())
        {
            let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        }
        answer
    }

    /// Waits until this node holds no connection (their streams released to the pool).
    async fn settle(&self) {
        tokio::time::timeout(WAIT, async {
            while !self.ctx.live.is_empty() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("connections closed within 10 s");
    }

    fn metrics(&self) -> String {
        self.metrics.render(&Gauges::default())
    }

    async fn stop(self) {
        self.ctx.draining.cancel();
        self.cancel.cancel();
        self.tasks.close();
        self.ctx.connections.close();
        let _ = tokio::time::timeout(WAIT, self.ctx.connections.wait()).await;
        let _ = tokio::time::timeout(WAIT, self.tasks.wait()).await;
    }
}

/// An echo app at `addr` that reports each client's address.
async fn echo(addr: SocketAddr) -> tokio::sync::mpsc::UnboundedReceiver<SocketAddr> {
    let listener = TcpListener::bind(addr).await.expect("bind app");
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut s, peer)) = listener.accept().await {
            let _ = tx.send(peer);
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    rx
}

/// The pods' addresses in the configs, and where they really are (on loopback).
const CLIENT: &str = "10.250.0.1";
const SERVER: &str = "10.250.0.2";
/// A service VIP on node-a, backed by the server.
const VIP: &str = "10.96.0.10";

/// Two nodes: `client` (sa sleep) on node-a, `server` (sa echo) on node-b, each node knowing the
/// other's pod as a peer; `policies` go to node-b. Pods are at `a` and `b` (loopback).
async fn mesh(tag: &str, a: IpAddr, b: IpAddr, policies: &str) -> (TempDir, Node, Node) {
    let dir = TempDir::new(tag);
    let (ya, yb) = configs(&dir, ip(CLIENT), ip(SERVER), policies);
    let addresses = [(ip(CLIENT), a), (ip(SERVER), b)];
    let node_a = Node::start(&ya, &addresses).await;
    let node_b = Node::start(&yb, &addresses).await;
    (dir, node_a, node_b)
}

fn configs(dir: &TempDir, a: IpAddr, b: IpAddr, policies: &str) -> (String, String) {
    let common = format!(
        "cgroup: /unused\nstateDir: {}\n\
         namespaces: {{default: {{labels: {{istio.io/dataplane-mode: ambient}}}}}}\n",
        dir.0.display()
    );
    let node_a = format!(
        "node: node-a\n{common}\
         pods:\n  - {{namespace: default, name: client, serviceAccount: sleep, ips: [{a}], netns: /proc/self/ns/net}}\n\
         peers:\n  - {{namespace: default, name: server, serviceAccount: echo, ips: [{b}], services: [default/echo]}}\n\
         services:\n  - {{namespace: default, name: echo, vips: [{VIP}], ports: [{{port: 80, targetPort: {APP_PORT}}}]}}\n"
    );
    let node_b = format!(
        "node: node-b\n{common}\
         pods:\n  - {{namespace: default, name: server, serviceAccount: echo, ips: [{b}], netns: /proc/self/ns/net}}\n\
         peers:\n  - {{namespace: default, name: client, serviceAccount: sleep, ips: [{a}]}}\n\
         {policies}"
    );
    (node_a, node_b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_hbone_inbound_in_process_carries_bytes_with_both_identities() {
    let (a, b) = (ip("127.31.0.2"), ip("127.32.0.2"));
    let (_dir, node_a, node_b) = mesh("flow", a, b, "").await;
    let mut accepted = echo(SocketAddr::new(b, APP_PORT)).await;

    let answer = node_a
        .dial(a, SocketAddr::new(b, APP_PORT), b"hello through the mesh")
        .await;
    assert_eq!(answer, b"hello through the mesh");
    // The app sees the client pod's address, not the agent's.
    let peer = accepted.recv().await.expect("app accepted");
    assert_eq!(peer.ip(), a);
    // A service VIP is load-balanced to its endpoint's target port, through the same tunnel
    // (once the first stream is released: a busy connection gets a parallel one).
    node_a.settle().await;
    let answer = node_a
        .dial(a, SocketAddr::new(ip(VIP), 80), b"hello, service")
        .await;
    assert_eq!(answer, b"hello, service");
    assert_eq!(accepted.recv().await.expect("app accepted").ip(), a);
    // Carried over one pooled HBONE connection, each side reporting the other's verified
    // identity.
    assert_eq!(node_a.ctx.pool.stats().connections_opened, 1);
    let wait_for = |node: &Node, needle: &str| {
        let text = node.metrics();
        text.lines()
            .any(|l| l.contains(needle) && !l.ends_with(" 0"))
    };
    for _ in 0..100 {
        if wait_for(&node_b, "istio_tcp_connections_closed_total") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = node_b.metrics();
    let line = server
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .unwrap_or_else(|| panic!("no opened series on node-b:\n{server}"));
    assert!(
        line.contains(r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep""#)
            && line
                .contains(r#"destination_principal="spiffe://cluster.local/ns/default/sa/echo""#)
            && line.contains(r#"reporter="destination""#)
            && line.contains(r#"connection_security_policy="mutual_tls""#),
        "{line}"
    );
    node_a.stop().await;
    node_b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_on_the_destination_refuses_in_process_and_nothing_reaches_the_app() {
    let (a, b) = (ip("127.33.0.2"), ip("127.34.0.2"));
    let deny = "policies:\n  - {name: no-sleep, namespace: default, scope: NAMESPACE, action: DENY, \
                rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/default/sa/sleep}]}]}]}]}\n";
    let (_dir, node_a, node_b) = mesh("deny", a, b, deny).await;
    let mut accepted = echo(SocketAddr::new(b, APP_PORT)).await;

    let answer = node_a
        .dial(a, SocketAddr::new(b, APP_PORT), b"must not arrive")
        .await;
    assert!(answer.is_empty(), "denied, yet answered: {answer:?}");
    assert!(
        accepted.try_recv().is_err(),
        "the app must not see a denied connection"
    );
    let server = node_b.metrics();
    assert!(
        server
            .lines()
            .any(|l| l.starts_with("ambit_authorization_denials_total{")
                && l.contains("default/no-sleep")
                && !l.ends_with(" 0")),
        "{server}"
    );
    // The client's agent learnt it as a policy refusal (401), flagged DENY in its metrics.
    node_a.settle().await;
    let client = node_a.metrics();
    assert!(
        client
            .lines()
            .any(|l| l.starts_with("istio_tcp_connections_closed_total{")
                && l.contains(r#"response_flags="DENY""#)),
        "{client}"
    );
    node_a.stop().await;
    node_b.stop().await;
}

/// An HTTP app at `addr`: answers every request `200 ok`, closing the connection.
async fn http_app(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).await.expect("bind app");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                    )
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_with_a_waypoint_goes_through_it_in_process_and_its_l7_policy_applies() {
    let (a, b, w) = (ip("127.35.0.2"), ip("127.36.0.2"), ip("127.37.0.9"));
    const WAYPOINT: &str = "10.250.0.9";
    let dir = TempDir::new("waypoint");
    let common = format!(
        "stateDir: {}\nnamespaces: {{default: {{labels: {{istio.io/dataplane-mode: ambient}}}}}}\n",
        dir.0.display()
    );
    let service = format!(
        "services:\n  - {{namespace: default, name: echo, vips: [{VIP}], \
         ports: [{{port: 80, targetPort: {APP_PORT}}}], waypoint: {{address: {WAYPOINT}}}}}\n"
    );
    let server_peer = format!(
        "  - {{namespace: default, name: server, serviceAccount: echo, ips: [{SERVER}], services: [default/echo]}}\n"
    );
    let waypoint_peer = format!(
        "  - {{namespace: default, name: waypoint, serviceAccount: waypoint, ips: [{WAYPOINT}]}}\n"
    );
    let node_a = format!(
        "node: node-a\ncgroup: /unused\n{common}\
         pods:\n  - {{namespace: default, name: client, serviceAccount: sleep, ips: [{CLIENT}], netns: /proc/self/ns/net}}\n\
         peers:\n{server_peer}{waypoint_peer}{service}"
    );
    let node_b = format!(
        "node: node-b\ncgroup: /unused\n{common}\
         pods:\n  - {{namespace: default, name: server, serviceAccount: echo, ips: [{SERVER}], netns: /proc/self/ns/net}}\n\
         peers:\n{waypoint_peer}"
    );
    let waypoint = format!(
        "node: node-w\n{common}peers:\n{server_peer}{service}\
         waypoint:\n  namespace: default\n  name: waypoint\n  listen: \"{w}:15008\"\n  \
         authorization:\n    - {{name: no-admin, action: DENY, rules: [{{to: [{{operation: {{paths: [/admin*]}}}}]}}]}}\n"
    );
    let addresses = [(ip(CLIENT), a), (ip(SERVER), b), (ip(WAYPOINT), w)];
    let node_a = Node::start(&node_a, &addresses).await;
    let node_b = Node::start(&node_b, &addresses).await;
    http_app(SocketAddr::new(b, APP_PORT)).await;

    // The waypoint, wired as `ambit-agent waypoint` wires it, its sockets on loopback.
    let mut config =
        Config::parse(&waypoint, std::path::Path::new("waypoint.yaml")).expect("waypoint config");
    remap(&mut config, &addresses);
    let (control, stop) = (TaskTracker::new(), CancellationToken::new());
    let (ctx, _writer, certs) = crate::waypoint::build(
        &config,
        Arc::new(Loopback::default()),
        Netns::own().expect("own netns"),
        &control,
        &stop,
    )
    .expect("waypoint");
    let listener = TcpListener::bind(SocketAddr::new(w, ambit_common::HBONE_PORT))
        .await
        .expect("bind waypoint");
    control.spawn(crate::waypoint::accept_loop(
        ctx.clone(),
        listener,
        stop.clone(),
    ));
    tokio::time::timeout(WAIT, async {
        while ctx.tls.load().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("waypoint certificate within 10 s");

    let vip = SocketAddr::new(ip(VIP), 80);
    let get =
        |path: &str| format!("GET {path} HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n");
    let answer = node_a.dial(a, vip, get("/items").as_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
        "through the waypoint to the app: {answer:?}"
    );
    let answer = node_a.dial(a, vip, get("/admin/x").as_bytes()).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 403") && answer.contains("default/no-admin"),
        "the waypoint's L7 DENY answers, naming the policy: {answer:?}"
    );
    // The waypoint reports both requests, from the client's verified identity.
    let metrics = ctx.metrics.render(&Default::default());
    for code in ["200", "403"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("istio_requests_total{")
                    && l.contains(
                        r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep""#
                    )
                    && l.contains(&format!(r#"response_code="{code}""#))),
            "no {code} from the client in:\n{metrics}"
        );
    }

    // Shut it down as `ambit-agent waypoint` does.
    crate::lifecycle::drain(&ctx.connections, &ctx.draining, WAIT).await;
    ctx.upstream.close(Duration::from_secs(1)).await;
    crate::lifecycle::stop_control(&stop, &certs, &control).await;
    node_a.stop().await;
    node_b.stop().await;
}
