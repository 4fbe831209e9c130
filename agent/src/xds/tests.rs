//! The client against the test bed's ADS server core (`ambit_testbed::xds_server::serve_ads`:
//! tonic, TLS with an rcgen certificate, loopback), the one fake control plane of every tier. It
//! hands each stream to the test, which reads the client's requests and pushes responses
//! by hand, so every test states exactly what the control plane does.

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_proto::{
    envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource},
    istio::{
        security::{self as sec, Authorization},
        workload::{Address, NetworkAddress, Port, Service, TunnelProtocol, Workload, address},
    },
    prost_types::{Any, value::Kind},
};
use tokio::{net::TcpListener, sync::mpsc, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::policy::Policy;

const WAIT: Duration = Duration::from_secs(5);

/// One client stream as the server sees it (the test bed's fake control plane hands it over).
type Conn = ambit_testbed::xds_server::AdsStream;

/// What the tests ask of a stream.
trait ConnExt {
    async fn recv(&mut self) -> DeltaDiscoveryRequest;
    async fn subscriptions(&mut self) -> [DeltaDiscoveryRequest; 2];
    async fn push(&self, resp: DeltaDiscoveryResponse);
    async fn push_and_reply(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest;
}

impl ConnExt for Conn {
    async fn recv(&mut self) -> DeltaDiscoveryRequest {
        tokio::time::timeout(WAIT, self.requests.message())
            .await
            .expect("a request within the timeout")
            .expect("request stream ok")
            .expect("request stream open")
    }

    /// The two subscriptions of a new stream, address type first.
    async fn subscriptions(&mut self) -> [DeltaDiscoveryRequest; 2] {
        let a = self.recv().await;
        let b = self.recv().await;
        assert_eq!(a.type_url, ADDRESS_TYPE_URL);
        assert_eq!(b.type_url, AUTHORIZATION_TYPE_URL);
        for r in [&a, &b] {
            assert!(r.response_nonce.is_empty() && r.error_detail.is_none());
            assert!(
                r.resource_names_subscribe.is_empty(),
                "wildcard subscription"
            );
        }
        [a, b]
    }

    async fn push(&self, resp: DeltaDiscoveryResponse) {
        self.responses.send(Ok(resp)).await.expect("stream open");
    }

    /// Pushes and returns the client's answer, checking it carries the nonce.
    async fn push_and_reply(&mut self, resp: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let (nonce, type_url) = (resp.nonce.clone(), resp.type_url.clone());
        self.push(resp).await;
        let reply = self.recv().await;
        assert_eq!(reply.response_nonce, nonce);
        assert_eq!(reply.type_url, type_url);
        assert!(reply.node.is_none() && reply.initial_resource_versions.is_empty());
        reply
    }
}

/// The server's certificate and key, kept across restarts.
struct Tls {
    cert_pem: String,
    key_pem: String,
}

impl Tls {
    fn new() -> Tls {
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("cert");
        Tls {
            cert_pem: cert.cert.pem(),
            key_pem: cert.signing_key.serialize_pem(),
        }
    }
}

struct TestServer {
    addr: SocketAddr,
    conns: mpsc::Receiver<Conn>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl TestServer {
    async fn start(tls: &Tls, addr: SocketAddr) -> TestServer {
        let listener = TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (server, conns) = ambit_testbed::xds_server::serve_ads(
            listener,
            &tls.cert_pem,
            &tls.key_pem,
            stop.clone().cancelled_owned(),
        )
        .expect("server tls");
        let task = tokio::spawn(async move {
            server.await.expect("server runs");
        });
        TestServer {
            addr,
            conns,
            stop,
            task,
        }
    }

    async fn next_conn(&mut self) -> Conn {
        tokio::time::timeout(WAIT, self.conns.recv())
            .await
            .expect("a connection within the timeout")
            .expect("server running")
    }

    /// Stops accepting; streams the test holds must be dropped first.
    async fn stop(self) {
        // Streams accepted but not yet taken by the test end with the receiver, so the graceful
        // shutdown does not wait for them.
        let TestServer {
            conns, stop, task, ..
        } = self;
        drop(conns);
        stop.cancel();
        tokio::time::timeout(WAIT, task)
            .await
            .expect("server stops")
            .expect("server task");
    }
}

#[derive(Default)]
struct MemSink {
    addresses: Mutex<BTreeMap<String, AddressResource>>,
    policies: Mutex<BTreeMap<String, Policy>>,
}

impl XdsSink for MemSink {
    fn apply_addresses(&self, upserts: Vec<(String, AddressResource)>, removes: Vec<String>) {
        let mut m = self.addresses.lock().expect("lock");
        for r in removes {
            m.remove(&r);
        }
        m.extend(upserts);
    }

    fn apply_policies(&self, upserts: Vec<(String, Policy)>, removes: Vec<String>) {
        let mut m = self.policies.lock().expect("lock");
        for r in removes {
            m.remove(&r);
        }
        m.extend(upserts);
    }
}

impl MemSink {
    fn address_names(&self) -> Vec<String> {
        self.addresses
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect()
    }

    fn policy_names(&self) -> Vec<String> {
        self.policies
            .lock()
            .expect("lock")
            .keys()
            .cloned()
            .collect()
    }
}

fn node() -> NodeInfo {
    NodeInfo {
        node_name: "node-a".into(),
        pod_name: "ambit-x1".into(),
        pod_namespace: "istio-system".into(),
        instance_ips: vec![
            "10.0.0.5".parse().expect("ip"),
            "fd00::5".parse().expect("ip"),
        ],
        cluster_id: "Kubernetes".into(),
    }
}

struct TokenFile(PathBuf);

impl TokenFile {
    fn new(token: &str) -> TokenFile {
        let path = std::env::temp_dir().join(format!(
            "ambit-xds-token-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::write(&path, format!("{token}\n")).expect("write token");
        TokenFile(path)
    }
}

impl Drop for TokenFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

struct Running {
    client: Arc<XdsClient>,
    sink: Arc<MemSink>,
    shutdown: CancellationToken,
    task: JoinHandle<()>,
    _token: TokenFile,
}

impl Running {
    fn start(tls: &Tls, addr: SocketAddr) -> Running {
        let token = TokenFile::new("secret-token");
        let sink = Arc::new(MemSink::default());
        let client = Arc::new(
            XdsClient::new(
                XdsConfig {
                    address: format!("https://{addr}"),
                    root_cert_pem: tls.cert_pem.clone().into_bytes(),
                    token_path: Some(token.0.clone()),
                    server_name: None,
                    node: node(),
                },
                sink.clone(),
            )
            .expect("client config"),
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(client.clone().run(shutdown.clone()));
        Running {
            client,
            sink,
            shutdown,
            task,
            _token: token,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("client stops on shutdown")
            .expect("client task");
    }
}

fn workload(name: &str, ip: [u8; 4]) -> Resource {
    let w = Workload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: name.into(),
        node: "node-a".into(),
        ..Default::default()
    };
    resource(
        &w.uid.clone(),
        "v1",
        &Address {
            r#type: Some(address::Type::Workload(w)),
        },
    )
}

fn service(name: &str) -> Resource {
    let s = Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 96, 0, 1],
            length: None,
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    resource(
        &format!("default/{name}.default.svc.cluster.local"),
        "v1",
        &Address {
            r#type: Some(address::Type::Service(s)),
        },
    )
}

fn policy(name: &str, cidr_len: u32) -> Resource {
    let a = Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace.into(),
        action: sec::Action::Deny.into(),
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    source_ips: vec![sec::Address {
                        address: vec![10, 0, 0, 0],
                        length: cidr_len,
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    resource(&format!("default/{name}"), "v1", &a)
}

fn resource<M: ambit_proto::prost::Name>(name: &str, version: &str, m: &M) -> Resource {
    Resource {
        name: name.into(),
        version: version.into(),
        resource: Some(Any::from_msg(m).expect("encode")),
        ..Default::default()
    }
}

fn response(
    type_url: &str,
    nonce: &str,
    resources: Vec<Resource>,
    removed: &[&str],
) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: type_url.into(),
        nonce: nonce.into(),
        resources,
        removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    }
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

#[tokio::test]
async fn sends_node_and_auth_then_applies_and_acks_pushes() {
    let tls = Tls::new();
    let mut server = TestServer::start(&tls, localhost()).await;
    let c = Running::start(&tls, server.addr);
    let mut conn = server.next_conn().await;

    // Who we are, as ztunnel says it.
    assert_eq!(
        conn.metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer secret-token")
    );
    assert_eq!(
        conn.metadata.get("clusterid").and_then(|v| v.to_str().ok()),
        Some("Kubernetes")
    );
    let subs = conn.subscriptions().await;
    for s in &subs {
        assert!(s.initial_resource_versions.is_empty());
        let node = s.node.as_ref().expect("node on the initial requests");
        assert_eq!(
            node.id,
            "ztunnel~10.0.0.5~ambit-x1.istio-system~istio-system.svc.cluster.local"
        );
        let meta: HashMap<&str, &str> = node
            .metadata
            .as_ref()
            .expect("metadata")
            .fields
            .iter()
            .filter_map(|(k, v)| match &v.kind {
                Some(Kind::StringValue(s)) => Some((k.as_str(), s.as_str())),
                _ => None,
            })
            .collect();
        assert_eq!(
            meta,
            HashMap::from([
                ("NAME", "ambit-x1"),
                ("NAMESPACE", "istio-system"),
                ("INSTANCE_IPS", "10.0.0.5,fd00::5"),
                ("NODE_NAME", "node-a"),
                ("CLUSTER_ID", "Kubernetes"),
            ])
        );
    }
    assert_eq!(c.client.node_id(), subs[0].node.as_ref().expect("node").id);

    // Workloads and a service; readiness waits for the policy type too.
    let reply = conn
        .push_and_reply(response(
            ADDRESS_TYPE_URL,
            "a1",
            vec![
                workload("sleep", [10, 0, 0, 7]),
                workload("echo", [10, 0, 0, 8]),
                service("echo"),
            ],
            &[],
        ))
        .await;
    assert!(reply.error_detail.is_none(), "ACK: {reply:?}");
    assert_eq!(
        c.sink.address_names(),
        vec![
            "Kubernetes//Pod/default/echo",
            "Kubernetes//Pod/default/sleep",
            "default/echo.default.svc.cluster.local"
        ]
    );
    {
        let addresses = c.sink.addresses.lock().expect("lock");
        let Some(AddressResource::Workload(w)) = addresses.get("Kubernetes//Pod/default/sleep")
        else {
            panic!("sleep is a workload: {addresses:?}");
        };
        assert_eq!(
            w.identity.to_string(),
            "spiffe://cluster.local/ns/default/sa/sleep"
        );
        assert!(w.hbone);
        let Some(AddressResource::Service(s)) =
            addresses.get("default/echo.default.svc.cluster.local")
        else {
            panic!("echo is a service: {addresses:?}");
        };
        assert_eq!(s.ports, vec![(80, 8080)]);
    }
    assert!(!c.client.is_ready(), "no policies yet");

    // Istio's "nothing of this type" is an empty response; it makes the client ready.
    let reply = conn
        .push_and_reply(response(AUTHORIZATION_TYPE_URL, "p1", vec![], &[]))
        .await;
    assert!(reply.error_detail.is_none());
    tokio::time::timeout(WAIT, c.client.wait_ready())
        .await
        .expect("ready after both types");

    // A policy, then a removal of a workload.
    conn.push_and_reply(response(
        AUTHORIZATION_TYPE_URL,
        "p2",
        vec![policy("deny", 8)],
        &[],
    ))
    .await;
    assert_eq!(c.sink.policy_names(), vec!["default/deny"]);
    conn.push_and_reply(response(
        ADDRESS_TYPE_URL,
        "a2",
        vec![],
        &["Kubernetes//Pod/default/echo"],
    ))
    .await;
    assert_eq!(c.sink.address_names().len(), 2);

    let status = c.client.status();
    assert!(status.connected && status.ready);
    assert_eq!((status.pushes, status.nacks, status.connections), (4, 0, 1));
    assert_eq!((status.addresses, status.policies), (2, 1));
    assert!(status.last_push_unix_ms.is_some());

    drop(conn);
    c.stop().await;
    server.stop().await;
}

/// A workload resource whose second address is 5 bytes long: invalid.
fn bad_workload(name: &str, ip: [u8; 4], version: &str) -> Resource {
    let mut bad = workload(name, ip);
    bad.version = version.into();
    let mut a: Address = bad
        .resource
        .as_ref()
        .expect("body")
        .to_msg()
        .expect("decode");
    if let Some(address::Type::Workload(w)) = &mut a.r#type {
        w.addresses.push(vec![1, 2, 3, 4, 5]);
    }
    bad.resource = Some(Any::from_msg(&a).expect("encode"));
    bad
}

#[tokio::test]
async fn a_push_applies_its_valid_resources_and_nacks_only_the_bad_ones() {
    let tls = Tls::new();
    let mut server = TestServer::start(&tls, localhost()).await;
    let c = Running::start(&tls, server.addr);
    let mut conn = server.next_conn().await;
    conn.subscriptions().await;
    conn.push_and_reply(response(
        ADDRESS_TYPE_URL,
        "a1",
        vec![
            workload("sleep", [10, 0, 0, 7]),
            workload("kept", [10, 0, 0, 8]),
        ],
        &[],
    ))
    .await;

    // A good workload, a bad one, a bad new version of one already held, and a removal in one
    // response: everything valid applies, the NACK names exactly the two bad ones.
    let reply = conn
        .push_and_reply(response(
            ADDRESS_TYPE_URL,
            "a2",
            vec![
                workload("good", [10, 0, 0, 10]),
                bad_workload("bad", [10, 0, 0, 9], "v1"),
                bad_workload("kept", [10, 0, 0, 8], "v2"),
            ],
            &["Kubernetes//Pod/default/sleep"],
        ))
        .await;
    let detail = reply.error_detail.expect("NACK");
    assert_eq!(detail.code, 3);
    for name in ["default/bad", "default/kept"] {
        assert!(
            detail.message.contains(&format!(
                "workload {name} (uid \"Kubernetes//Pod/{name}\"): addresses[1] is 5 bytes, not 4 or 16"
            )),
            "{}",
            detail.message
        );
    }
    assert!(!detail.message.contains("good"), "{}", detail.message);
    assert_eq!(
        c.sink.address_names(),
        vec![
            "Kubernetes//Pod/default/good",
            "Kubernetes//Pod/default/kept"
        ],
        "good applied, sleep removed, bad refused, kept's last good version kept"
    );
    assert!(!c.client.is_ready(), "no policies yet");

    // A policy with a bad CIDR and a resource whose body does not decode, next to a good one.
    let garbage = Resource {
        name: "default/garbage".into(),
        version: "v1".into(),
        resource: Some(Any {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            value: vec![0xff, 0xff, 0xff],
        }),
        ..Default::default()
    };
    let reply = conn
        .push_and_reply(response(
            AUTHORIZATION_TYPE_URL,
            "p1",
            vec![policy("ok", 8), policy("wide", 40), garbage],
            &[],
        ))
        .await;
    let detail = reply.error_detail.expect("NACK");
    assert!(
        detail.message.contains("policy default/wide: rules[0].clauses[0].matches[0].source_ips[0]: 10.0.0.0/40 has a prefix length above 32"),
        "{}",
        detail.message
    );
    assert!(
        detail
            .message
            .contains("resource default/garbage: does not decode"),
        "{}",
        detail.message
    );
    assert_eq!(c.sink.policy_names(), vec!["default/ok"]);
    assert!(
        c.client.is_ready(),
        "the first full state was processed, rejections or not"
    );
    let status = c.client.status();
    assert_eq!((status.pushes, status.nacks), (3, 2));
    assert_eq!(status.rejected.get("address"), Some(&2));
    assert_eq!(status.rejected.get("authorization"), Some(&2));
    assert_eq!(status.last_rejected.len(), 4);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("NACK"))
    );

    // A later fix of the bad one applies it.
    let reply = conn
        .push_and_reply(response(
            AUTHORIZATION_TYPE_URL,
            "p2",
            vec![policy("wide", 16)],
            &[],
        ))
        .await;
    assert!(reply.error_detail.is_none());
    assert_eq!(c.sink.policy_names(), vec!["default/ok", "default/wide"]);

    // On reconnect the server is told what is held (by name, as ztunnel does): kept, not bad.
    drop(conn);
    let mut conn = server.next_conn().await;
    let [addresses, _] = conn.subscriptions().await;
    assert_eq!(
        addresses
            .initial_resource_versions
            .get("Kubernetes//Pod/default/kept")
            .map(String::as_str),
        Some("")
    );
    assert!(
        !addresses
            .initial_resource_versions
            .contains_key("Kubernetes//Pod/default/bad")
    );

    drop(conn);
    c.stop().await;
    server.stop().await;
}

#[tokio::test]
async fn reconnects_after_a_restart_and_names_what_it_holds() {
    let tls = Tls::new();
    let mut server = TestServer::start(&tls, localhost()).await;
    let addr = server.addr;
    let c = Running::start(&tls, addr);
    let mut conn = server.next_conn().await;
    conn.subscriptions().await;
    let mut v2 = workload("echo", [10, 0, 0, 8]);
    v2.version = "v2".into();
    conn.push_and_reply(response(
        ADDRESS_TYPE_URL,
        "a1",
        vec![workload("sleep", [10, 0, 0, 7]), v2, service("echo")],
        &[],
    ))
    .await;
    conn.push_and_reply(response(
        AUTHORIZATION_TYPE_URL,
        "p1",
        vec![policy("deny", 8)],
        &[],
    ))
    .await;
    assert!(c.client.is_ready());

    // The server goes away (its streams end, then it stops listening) and comes back on the
    // same address after a while: the client retries with backoff meanwhile.
    drop(conn);
    server.stop().await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = c.client.status();
    assert!(!status.connected);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot connect")),
        "{status:?}"
    );
    assert!(c.client.is_ready(), "the state held still serves");

    let mut server = TestServer::start(&tls, addr).await;
    let mut conn = server.next_conn().await;
    let [addresses, policies] = conn.subscriptions().await;
    assert_eq!(
        addresses.initial_resource_versions,
        HashMap::from([
            ("Kubernetes//Pod/default/sleep".to_owned(), String::new()),
            ("Kubernetes//Pod/default/echo".to_owned(), String::new()),
            (
                "default/echo.default.svc.cluster.local".to_owned(),
                String::new()
            ),
        ])
    );
    assert_eq!(
        policies.initial_resource_versions,
        HashMap::from([("default/deny".to_owned(), String::new())])
    );
    assert!(addresses.node.is_some());

    // The new server's view converges: it removes what is gone.
    conn.push_and_reply(response(
        ADDRESS_TYPE_URL,
        "b1",
        vec![],
        &["Kubernetes//Pod/default/echo"],
    ))
    .await;
    assert_eq!(c.sink.address_names().len(), 2);
    let status = c.client.status();
    assert!(status.connected);
    assert_eq!(status.connections, 2);

    drop(conn);
    c.stop().await;
    server.stop().await;
}

#[test]
fn validates_the_config() {
    let tls = Tls::new();
    let cfg = |address: &str, node: NodeInfo| XdsConfig {
        address: address.to_owned(),
        root_cert_pem: tls.cert_pem.clone().into_bytes(),
        token_path: None,
        server_name: None,
        node,
    };
    let sink: Arc<dyn XdsSink> = Arc::new(MemSink::default());
    for (address, node, want) in [
        ("http://istiod:15012", node(), "https://"),
        ("istiod:15012", node(), "https://"),
        (
            "https://istiod:15012",
            NodeInfo {
                instance_ips: vec![],
                ..node()
            },
            "instance_ips is empty",
        ),
        (
            "https://istiod:15012",
            NodeInfo {
                cluster_id: "a\nb".into(),
                ..node()
            },
            "cluster id",
        ),
    ] {
        let e = XdsClient::new(cfg(address, node), sink.clone())
            .err()
            .map(|e| e.to_string());
        assert!(
            e.as_deref().is_some_and(|e| e.contains(want)),
            "{address}: {e:?}"
        );
    }
    let mut bad_root = cfg("https://istiod:15012", node());
    bad_root.root_cert_pem = b"nothing".to_vec();
    assert!(matches!(
        XdsClient::new(bad_root, sink.clone()),
        Err(Error::Endpoint(crate::grpc::Error::RootCert { .. }))
    ));
    XdsClient::new(cfg("https://istiod.istio-system.svc:15012", node()), sink).expect("valid");
}

/// Decodes a test resource as the client would.
fn decoded_address(r: &Resource) -> AddressResource {
    let any = r.resource.clone().expect("resource body");
    let a: Address = any.to_msg().expect("decode");
    address_from_proto(&r.name, a).expect("valid")
}

fn decoded_policy(r: &Resource) -> crate::policy::Policy {
    let any = r.resource.clone().expect("resource body");
    let a: Authorization = any.to_msg().expect("decode");
    policy_from_proto(&r.name, a).expect("valid")
}

#[test]
fn the_local_file_and_xds_produce_the_same_state_for_the_same_content() {
    use crate::{
        config::Config,
        policy::{self, PolicyStore},
        state::{Snapshot, StateWriter},
    };
    let base = "node: node-b\ncgroup: /x\n";
    let file = format!(
        "{base}\
peers:
  - {{namespace: default, name: w1, serviceAccount: w1, ips: [10.2.0.5], services: [default/echo]}}
services:
  - {{namespace: default, name: echo, vips: [10.96.0.1], ports: [{{port: 80, targetPort: 8080}}]}}
policies:
  - name: deny-10
    namespace: default
    scope: NAMESPACE
    action: DENY
    rules: [{{clauses: [{{matches: [{{sourceIps: [10.0.0.0/8]}}]}}]}}]
"
    );
    let from_file = Config::parse(&file, std::path::Path::new("t.yaml")).expect("file config");
    let empty = Config::parse(base, std::path::Path::new("t.yaml")).expect("empty config");

    // The same content through the xDS sink.
    type Published = (Option<Arc<Snapshot>>, Option<PolicyStore>);
    let published: Arc<Mutex<Published>> = Arc::default();
    let out = published.clone();
    let sources = StateWriter::new(Arc::new(empty), move |s, p| {
        let mut out = out.lock().expect("lock");
        out.0 = Some(s);
        if p.is_some() {
            out.1 = p;
        }
    });
    let mut w = match decoded_address(&workload("w1", [10, 2, 0, 5])) {
        AddressResource::Workload(w) => w,
        AddressResource::Service(_) => unreachable!("a workload"),
    };
    w.services = vec![WorkloadService {
        key: "default/echo.default.svc.cluster.local".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        ports: Vec::new(),
    }];
    let mut svc = decoded_address(&service("echo"));
    if let AddressResource::Service(s) = &mut svc {
        s.vips = vec!["10.96.0.1".parse().expect("ip")];
    }
    sources.apply_addresses(
        vec![
            ("w1".into(), AddressResource::Workload(w)),
            ("default/echo.default.svc.cluster.local".into(), svc),
        ],
        Vec::new(),
    );
    sources.apply_policies(
        vec![(
            "default/deny-10".into(),
            decoded_policy(&policy("deny-10", 8)),
        )],
        Vec::new(),
    );
    let (xds_snap, xds_policies) = {
        let mut out = published.lock().expect("lock");
        (
            out.0.take().expect("published"),
            out.1.take().expect("policies published"),
        )
    };
    let file_snap = Snapshot::from_config(&from_file);
    let file_policies: PolicyStore = from_file.policies.iter().cloned().collect();

    let ip: std::net::IpAddr = "10.2.0.5".parse().expect("ip");
    let (a, b) = (
        file_snap.by_ip(ip).expect("from file"),
        xds_snap.by_ip(ip).expect("from xDS"),
    );
    assert_eq!(a.identity, b.identity);
    assert_eq!(a.hbone, b.hbone);
    assert_eq!(a.services, b.services);
    let vip: std::net::IpAddr = "10.96.0.1".parse().expect("ip");
    let (sa, sb) = (
        file_snap.service_by_vip(vip).expect("file VIP"),
        xds_snap.service_by_vip(vip).expect("xDS VIP"),
    );
    assert_eq!(sa.key, sb.key);
    let (da, db) = (sa.def.as_ref().expect("def"), sb.def.as_ref().expect("def"));
    assert_eq!(
        (&da.namespace, &da.hostname, &da.vips, &da.ports),
        (&db.namespace, &db.hostname, &db.vips, &db.ports)
    );
    let endpoint = |s: &crate::state::ServiceEntry| s.pick(vip, 80).map(|(_, a)| a);
    assert_eq!(endpoint(sa), endpoint(sb));
    assert_eq!(endpoint(sa), Some("10.2.0.5:8080".parse().expect("addr")));

    let conn = policy::Connection {
        src_identity: None,
        src_ip: "10.1.2.3".parse().expect("ip"),
        dst_ip: ip,
        dst_port: 8080,
        dst_namespace: "default",
        dst_policies: &[],
    };
    let (da, db) = (
        policy::evaluate(&file_policies, &conn),
        policy::evaluate(&xds_policies, &conn),
    );
    assert!(!da.allowed);
    assert_eq!(da, db, "the same decision from either source");
}

#[test]
fn policies_named_by_a_workload_apply_to_it() {
    use crate::{
        config::Config,
        policy::{self, Scope},
        state::StateWriter,
    };
    let config =
        Config::parse("node: n\ncgroup: /x\n", std::path::Path::new("t.yaml")).expect("config");
    let mut w = match decoded_address(&workload("w1", [10, 2, 0, 5])) {
        AddressResource::Workload(w) => w,
        AddressResource::Service(_) => unreachable!("a workload"),
    };
    w.authorization_policies = vec!["default/only-w1".into()];
    let sources = StateWriter::new(Arc::new(config), |_, _| {});
    sources.apply_addresses(
        vec![("w1".into(), AddressResource::Workload(w))],
        Vec::new(),
    );
    let snapshot = sources.snapshot();
    let mut p = decoded_policy(&policy("only-w1", 8));
    p.scope = Scope::WorkloadSelector;
    let store: policy::PolicyStore = std::iter::once(p).collect();
    let ip: std::net::IpAddr = "10.2.0.5".parse().expect("ip");
    let named = snapshot.named_policies(ip);
    let conn = |dst_policies: &[Arc<str>]| {
        policy::evaluate(
            &store,
            &policy::Connection {
                src_identity: None,
                src_ip: "10.1.2.3".parse().expect("ip"),
                dst_ip: ip,
                dst_port: 8080,
                dst_namespace: "default",
                dst_policies,
            },
        )
    };
    assert!(!conn(named).allowed, "the workload's own policy denies");
    assert!(
        conn(&[]).allowed,
        "a workload-selector policy applies only where named"
    );
}

/// A response as the wire carries it, with a raw `resources` entry (field 2) appended.
fn encoded_with_raw_resource(resp: &DeltaDiscoveryResponse, raw: &[u8]) -> Vec<u8> {
    use ambit_proto::prost::Message as _;
    let mut bytes = resp.encode_to_vec();
    bytes.push(0x12);
    bytes.push(u8::try_from(raw.len()).expect("short"));
    bytes.extend_from_slice(raw);
    bytes
}

#[test]
fn a_push_is_decoded_resource_by_resource_and_one_that_does_not_decode_is_refused_alone() {
    use ambit_proto::envoy::config::core::v3::ControlPlane;
    use push::{Push, Resources};

    let mut resp = response(
        ADDRESS_TYPE_URL,
        "n1",
        vec![workload("a", [10, 1, 0, 1]), service("web")],
        &["Kubernetes//Pod/default/gone"],
    );
    // Fields the client does not read are skipped, wherever they are.
    resp.system_version_info = "v7".into();
    resp.control_plane = Some(ControlPlane {
        identifier: "istiod-1".into(),
    });
    // A resource whose bytes are not a protobuf (a key cut short).
    let bytes = encoded_with_raw_resource(&resp, &[0xff, 0xff, 0xff]);
    // Decoded whole, the response would be refused with all it holds.
    assert!(
        <DeltaDiscoveryResponse as ambit_proto::prost::Message>::decode(bytes.as_slice()).is_err()
    );

    let push = Push::decode(&bytes).expect("the response itself is well formed");
    assert_eq!(push.type_url, ADDRESS_TYPE_URL);
    assert_eq!(push.nonce, "n1");
    assert_eq!(push.removed, ["Kubernetes//Pod/default/gone"]);
    assert_eq!(push.upserts, 3);
    let Resources::Addresses(valid) = &push.resources else {
        panic!("addresses: {push:?}")
    };
    let names: Vec<&str> = valid.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "Kubernetes//Pod/default/a",
            "default/web.default.svc.cluster.local"
        ]
    );
    assert_eq!(push.rejected.count, 1, "{:?}", push.rejected);
    assert!(
        push.rejected.named[0].contains("resource #2")
            && push.rejected.named[0].contains("does not decode"),
        "{:?}",
        push.rejected
    );

    // A response cut short is not one: the stream fails, as prost's own decode would.
    assert!(Push::decode(&bytes[..bytes.len() - 2]).is_err());
    let mut wrong_wire_type = bytes.clone();
    wrong_wire_type.extend_from_slice(&[0x20, 0x01]); // field 4 (type_url) as a varint
    assert!(Push::decode(&wrong_wire_type).is_err());
}

#[test]
fn a_policy_push_keeps_the_valid_ones_and_another_type_is_refused_whole() {
    use ambit_proto::prost::Message as _;
    use push::{Push, Resources};

    let resp = response(
        AUTHORIZATION_TYPE_URL,
        "n2",
        vec![policy("ok", 8), policy("bad-cidr", 33)],
        &[],
    );
    let push = Push::decode(&resp.encode_to_vec()).expect("decodes");
    let Resources::Policies(valid) = &push.resources else {
        panic!("policies: {push:?}")
    };
    assert_eq!(valid.len(), 1);
    assert_eq!(valid[0].0, "default/ok");
    assert_eq!(push.rejected.count, 1, "{:?}", push.rejected);
    assert!(
        push.rejected.named[0].contains("bad-cidr"),
        "{:?}",
        push.rejected
    );

    let other = response(
        "type.googleapis.com/envoy.config.cluster.v3.Cluster",
        "n3",
        vec![policy("ok", 8)],
        &[],
    );
    let push = Push::decode(&other.encode_to_vec()).expect("decodes");
    assert!(matches!(push.resources, Resources::Unsubscribed));
    assert!(
        push.rejected.named[0].contains("not subscribed"),
        "{:?}",
        push.rejected
    );
}

#[test]
fn a_push_of_many_bad_resources_keeps_twenty_reasons_and_counts_all() {
    use ambit_proto::prost::Message as _;
    use push::{Push, Rejected, Resources};

    let bad: Vec<Resource> = (0..500).map(|i| policy(&format!("bad-{i}"), 33)).collect();
    let resp = response(AUTHORIZATION_TYPE_URL, "n4", bad, &[]);
    let push = Push::decode(&resp.encode_to_vec()).expect("decodes");
    assert!(matches!(&push.resources, Resources::Policies(v) if v.is_empty()));
    assert_eq!(push.rejected.count, 500);
    assert_eq!(push.rejected.named.len(), Rejected::NAMED);
    assert!(
        push.rejected.named[0].contains("bad-0"),
        "{:?}",
        push.rejected
    );
}
