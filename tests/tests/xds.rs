//! The agents driven by a control plane: a test xDS server (the same Delta ADS wire protocol as
//! istiod) pushes workloads and policy; the data path obeys at once. The agents' config files
//! name no peers and no policies: everything here comes from xDS.

use std::time::Duration;

use ambit_proto::{
    envoy::service::discovery::v3::Resource,
    istio::{
        security::{self as sec, Authorization},
        workload::{
            Address, NetworkAddress, Port, PortList, Service, TunnelProtocol, Workload, address,
        },
    },
    prost_types::Any,
};
use ambit_testbed::{
    Mesh, MeshSpec, Pod, log_message, log_str,
    metrics::sum,
    poll,
    wire::{Capture, contains, pattern},
    xds_server::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, XdsServer},
};
use serde_json::json;

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(15);

fn workload(pod: &Pod, node: &str, address_bytes: Option<Vec<u8>>) -> Resource {
    let addresses = match address_bytes {
        Some(b) => vec![b],
        None => vec![pod.ipv4().octets().to_vec(), pod.ipv6().octets().to_vec()],
    };
    let w = Workload {
        uid: format!("Kubernetes//Pod/{}/{}", pod.namespace(), pod.name()),
        name: pod.name().into(),
        namespace: pod.namespace().into(),
        addresses,
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: pod.service_account().into(),
        node: node.into(),
        ..Default::default()
    };
    Resource {
        name: w.uid.clone(),
        version: "1".into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address::Type::Workload(w)),
            })
            .expect("encode"),
        ),
        ..Default::default()
    }
}

/// `r` (a workload) with the telemetry fields istiod fills from the pod's labels and owner.
fn with_telemetry(mut r: Resource, canonical: &str, owner: &str) -> Resource {
    let mut a: Address = r.resource.as_ref().expect("any").to_msg().expect("decode");
    if let Some(address::Type::Workload(w)) = &mut a.r#type {
        w.canonical_name = canonical.into();
        w.canonical_revision = "v1".into();
        w.cluster_id = "east".into();
        w.workload_name = owner.into();
    }
    r.resource = Some(Any::from_msg(&a).expect("encode"));
    r
}

fn deny_principal(name: &str, principal: &str) -> Resource {
    let a = Authorization {
        name: name.into(),
        namespace: "default".into(),
        scope: sec::Scope::Namespace.into(),
        action: sec::Action::Deny.into(),
        rules: vec![sec::Rule {
            clauses: vec![sec::Clause {
                matches: vec![sec::Match {
                    principals: vec![sec::StringMatch {
                        match_type: Some(sec::string_match::MatchType::Exact(principal.into())),
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: false,
    };
    Resource {
        name: format!("default/{name}"),
        version: "1".into(),
        resource: Some(Any::from_msg(&a).expect("encode")),
        ..Default::default()
    }
}

/// Points every node's agent at the control plane `xds` listening on `addr` (its root
/// certificate written into the bed), with `more` settings in the `xds` section; each node says
/// which addresses are its own, as istiod's workloads name nodes by them.
fn use_xds(mesh: &mut Mesh, xds: &XdsServer, addr: std::net::SocketAddr, more: serde_json::Value) {
    let root = mesh.bed.tmp_dir().join("xds-root.pem");
    std::fs::write(&root, xds.cert_pem()).expect("write root");
    let mut section = json!({"address": format!("https://{addr}"), "rootCert": root});
    section
        .as_object_mut()
        .expect("an object")
        .extend(more.as_object().cloned().unwrap_or_default());
    for (name, config) in &mut mesh.configs {
        config.node_addresses = vec![mesh.nodes[name].underlay_v4().into()];
        config.extra.insert("xds".into(), section.clone());
    }
}

#[test]
fn a_control_plane_drives_tunnels_and_policy_and_a_bad_push_is_nacked() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut mesh = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .pod_as("curl", "default", "curl")
        .node("node-b")
        .pod_as("server", "default", "server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (sleep, curl, server) = (
        mesh.take_pod("sleep"),
        mesh.take_pod("curl"),
        mesh.take_pod("server"),
    );
    let node_a = mesh.nodes["node-a"].clone();
    let echo = server.serve(PORT).expect("echo");

    let xds_addr = std::net::SocketAddr::new(node_a.underlay_v4().into(), 15010);
    let xds = XdsServer::start_in_netns(&node_a.netns_path(), xds_addr).expect("xDS server");
    xds.push(
        ADDRESS_TYPE_URL,
        vec![
            workload(&sleep, "node-a", None),
            workload(&curl, "node-a", None),
            workload(&server, "node-b", None),
        ],
        Vec::new(),
    );
    use_xds(&mut mesh, &xds, xds_addr, json!({}));
    let agent_a = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent-a");
    let agent_b = mesh
        .bed
        .start_agent(&mesh.configs["node-b"])
        .expect("agent-b");
    for agent in [&agent_a, &agent_b] {
        agent
            .wait_for_log(
                |v| log_message(v).is_some_and(|m| m.starts_with("xDS ready")),
                WAIT,
            )
            .expect("xDS ready");
    }
    let subscribed: Vec<String> = xds.requests().iter().map(|r| r.type_url.clone()).collect();
    assert!(
        subscribed.iter().any(|t| t == ADDRESS_TYPE_URL),
        "{subscribed:?}"
    );
    assert!(
        subscribed.iter().any(|t| t == AUTHORIZATION_TYPE_URL),
        "{subscribed:?}"
    );

    // Traffic flows through HBONE, with identities that only xDS told the agents.
    let dst = server.v4(PORT);
    let mark = agent_a.mark();
    let report = sleep.connect(dst, 10_000).expect("run client");
    assert!(report.ok, "{report:#?}");
    let out = agent_a
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
            },
            WAIT,
        )
        .expect("outbound log");
    assert_eq!(log_str(&out, "path"), Some("hbone"), "{out}");
    assert_eq!(
        log_str(&out, "dst.identity"),
        Some("spiffe://cluster.local/ns/default/sa/server"),
        "{out}"
    );

    // A DENY for sleep: its open connection is closed, new ones are refused within a second,
    // curl still works.
    let long = sleep
        .spawn_connect(dst, 20_000, 4000, 10_000)
        .expect("long client");
    long.wait_connected(WAIT).expect("connected");
    // The first connection above and this one.
    echo.wait_for_accepts(2, WAIT)
        .expect("the long connection reached the app");
    let nonce = xds.push(
        AUTHORIZATION_TYPE_URL,
        vec![deny_principal(
            "deny-sleep",
            "cluster.local/ns/default/sa/sleep",
        )],
        Vec::new(),
    );
    // Both agents ACKed: the policy is in force on node-b (applied before the ACK is sent).
    let acks = xds
        .wait_replies(&nonce, 2, WAIT)
        .expect("both agents reply to the policy push");
    assert!(
        acks.iter().all(|a| a.error_detail.is_none()),
        "ACKs, not NACKs: {acks:?}"
    );
    let accepted = echo.accepted_peers().len();
    let report = sleep.connect_with(dst, 100, 0, 3000).expect("run client");
    assert!(!report.ok, "sleep is denied: {report:#?}");
    assert_eq!(
        echo.accepted_peers().len(),
        accepted,
        "nothing reached the app"
    );
    assert!(
        !long.wait().expect("long client").ok,
        "sleep's open connection was closed"
    );
    let report = curl.connect(dst, 1000).expect("run client");
    assert!(report.ok, "curl still allowed: {report:#?}");

    // A push that does not validate is NACKed with a detail naming it; the last good state
    // keeps serving.
    let bad = workload(&curl, "node-a", Some(vec![10, 1, 0, 9, 9]));
    let nonce = xds.push_once(ADDRESS_TYPE_URL, vec![bad]);
    let reply = xds.wait_reply(&nonce, WAIT).expect("reply to the bad push");
    assert_eq!(reply.type_url, ADDRESS_TYPE_URL);
    let detail = reply.error_detail.expect("a NACK carries an error detail");
    assert!(detail.message.contains("curl"), "{}", detail.message);
    let report = curl.connect(dst, 1000).expect("run client");
    assert!(report.ok, "the previous state keeps serving: {report:#?}");
}

#[test]
fn before_the_control_plane_has_spoken_connections_are_held_never_leaked_nor_admitted() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut mesh = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .pod_as("curl", "default", "curl")
        .node("node-b")
        .pod_as("server", "default", "server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (sleep, curl, server) = (
        mesh.take_pod("sleep"),
        mesh.take_pod("curl"),
        mesh.take_pod("server"),
    );
    let node_a = mesh.nodes["node-a"].clone();
    let echo = server.serve(PORT).expect("echo");
    let dst = server.v4(PORT);

    // The control plane is down when both agents start: it will send the workloads (the agents'
    // files name no peers) and a DENY for curl.
    let xds_addr = std::net::SocketAddr::new(node_a.underlay_v4().into(), 15010);
    let xds = XdsServer::unstarted(xds_addr).expect("xDS server");
    xds.push(
        ADDRESS_TYPE_URL,
        vec![
            workload(&sleep, "node-a", None),
            workload(&curl, "node-a", None),
            workload(&server, "node-b", None),
        ],
        Vec::new(),
    );
    xds.push(
        AUTHORIZATION_TYPE_URL,
        vec![deny_principal(
            "deny-curl",
            "cluster.local/ns/default/sa/curl",
        )],
        Vec::new(),
    );
    use_xds(&mut mesh, &xds, xds_addr, json!({"syncHoldSeconds": 60}));
    let agent_a = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent-a");
    let agent_b = mesh
        .bed
        .start_agent(&mesh.configs["node-b"])
        .expect("agent-b");
    let capture = Capture::start(&mesh.bed, &node_a).expect("capture");

    // Without the control plane the destination is not known to be in the mesh: it would leave
    // as plaintext passthrough, and node-b has not heard of the DENY. Both are held instead.
    let allowed = sleep
        .spawn_connect(dst, 4096, 0, 60_000)
        .expect("sleep's client");
    let denied = curl
        .spawn_connect(dst, 4096, 0, 60_000)
        .expect("curl's client");
    let held = poll(WAIT, || {
        let m = ambit_testbed::metrics::of_node(&node_a);
        (sum(&m, "ambit_held_connections", &[]) == 2.0).then_some(())
    });
    assert!(held.is_some(), "both connections are held at node-a");
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        echo.accepted_peers().is_empty(),
        "nothing reached the app before the control plane spoke"
    );
    let status = agent_a.ambitctl_json(&["status"]).expect("status");
    assert_eq!(status["ready"], false, "{status:#}");

    // The control plane comes up: the same connections go on, judged on its state.
    let mark_a = agent_a.mark();
    let mark_b = agent_b.mark();
    xds.serve_in(&node_a.netns_path())
        .expect("the xDS server listens");
    let report = allowed.wait().expect("sleep's client");
    assert!(report.ok, "the held connection succeeds: {report:#?}");
    let out = agent_a
        .wait_for_connection_log(mark_a, "outbound", dst, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(log_str(&out, "path"), Some("hbone"), "{out}");
    let report = denied.wait().expect("curl's client");
    assert!(
        !report.ok,
        "the DENY holds from the first connection: {report:#?}"
    );
    let inbound = agent_b
        .wait_for_log_after(
            mark_b,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "src.identity")
                        == Some("spiffe://cluster.local/ns/default/sa/curl")
            },
            WAIT,
        )
        .expect("curl's connection at node-b");
    assert_eq!(
        log_str(&inbound, "authz.policy"),
        Some("default/deny-curl"),
        "{inbound}"
    );
    assert_eq!(
        echo.accepted_peers().len(),
        1,
        "only sleep's connection reached the app"
    );
    let (summary, raw) = capture.stop().expect("stop capture");
    assert!(
        !summary.contains(&format!("{}.{PORT}", server.ipv4())),
        "no plaintext to the server:\n{summary}"
    );
    assert!(
        !contains(&raw, &pattern(0..64)),
        "the payload is not visible on the wire"
    );
}

#[test]
fn a_connection_held_longer_than_the_sync_hold_is_refused_with_the_reason() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut mesh = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .pod("server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, server, node) = (
        mesh.take_pod("client"),
        mesh.take_pod("server"),
        mesh.nodes["node-a"].clone(),
    );
    let echo = server.serve(PORT).expect("echo");
    // A control plane that never answers.
    let xds_addr = std::net::SocketAddr::new(node.underlay_v4().into(), 15010);
    let xds = XdsServer::unstarted(xds_addr).expect("xDS server");
    use_xds(
        &mut mesh,
        &xds,
        xds_addr,
        json!({"syncHoldSeconds": 1, "maxHeldConnections": 4}),
    );
    let agent = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent");
    let mark = agent.mark();
    let report = client
        .connect_with(server.v4(PORT), 100, 0, 10_000)
        .expect("client");
    assert!(!report.ok, "{report:#?}");
    let log = agent
        .wait_for_connection_log(mark, "outbound", server.v4(PORT), WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        log_str(&log, "limit"),
        Some("control_plane_not_synced"),
        "{log}"
    );
    assert_eq!(log_str(&log, "fault"), Some("internal"), "{log}");
    assert!(
        log_str(&log, "error").is_some_and(|e| e.contains("istiod")),
        "the error says what to check: {log}"
    );
    assert!(echo.accepted_peers().is_empty());
    let m = ambit_testbed::metrics::of_node(&node);
    assert_eq!(
        sum(
            &m,
            "ambit_connections_refused_total",
            &[
                ("direction", "outbound"),
                ("reason", "control_plane_not_synced")
            ]
        ),
        1.0
    );
}

/// A synthetic workload on another node (no pod behind it): state only.
fn synthetic(i: u32) -> Resource {
    let w = Workload {
        uid: format!("Kubernetes//Pod/default/synthetic-{i}"),
        name: format!("synthetic-{i}"),
        namespace: "default".into(),
        addresses: vec![vec![10, 9, (i / 250) as u8, (i % 250 + 1) as u8]],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: "synthetic".into(),
        node: "node-c".into(),
        ..Default::default()
    };
    Resource {
        name: w.uid.clone(),
        version: "1".into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address::Type::Workload(w)),
            })
            .expect("encode"),
        ),
        ..Default::default()
    }
}

/// The workloads istiod described, as `ambitctl workloads` lists them: a pod also in the
/// agent's config is one row (`config+xds`).
fn xds_workloads(agent: &ambit_testbed::Agent) -> usize {
    agent
        .ambitctl_json(&["workloads"])
        .expect("workloads")
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|w| w["source"] == "xds" || w["source"] == "config+xds")
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn one_bad_workload_in_the_first_full_state_costs_only_itself() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut mesh = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .node("node-b")
        .pod_as("server", "default", "server")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (sleep, server) = (mesh.take_pod("sleep"), mesh.take_pod("server"));
    let (node_a, node_b) = (mesh.nodes["node-a"].clone(), mesh.nodes["node-b"].clone());
    let _echo = server.serve(PORT).expect("echo");
    let dst = server.v4(PORT);

    // 100 workloads, one of which does not validate (a 5-byte address).
    let odd = Workload {
        uid: "Kubernetes//Pod/default/odd".into(),
        name: "odd".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 9, 9, 9, 9]],
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: "odd".into(),
        node: "node-c".into(),
        ..Default::default()
    };
    let odd_resource = |w: &Workload, version: &str| Resource {
        name: w.uid.clone(),
        version: version.into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address::Type::Workload(w.clone())),
            })
            .expect("encode"),
        ),
        ..Default::default()
    };
    // Shapes istiod legitimately sends: a WorkloadEntry with only a network (no address, no
    // hostname: reached through that network's gateway), and a ServiceEntry whose address is a
    // block (`10.50.0.0/24`, NetworkAddress.length) backed by the server pod.
    let addressless = Workload {
        uid: "Kubernetes/networking.istio.io/WorkloadEntry/default/vm".into(),
        name: "vm".into(),
        namespace: "default".into(),
        network: "remote".into(),
        tunnel_protocol: TunnelProtocol::Hbone.into(),
        service_account: "vm".into(),
        ..Default::default()
    };
    let ext = Service {
        name: "ext".into(),
        namespace: "default".into(),
        hostname: "ext.example.com".into(),
        addresses: vec![NetworkAddress {
            network: String::new(),
            address: vec![10, 50, 0, 0],
            length: Some(24),
        }],
        ports: vec![Port {
            service_port: 80,
            target_port: u32::from(PORT),
            app_protocol: 0,
        }],
        ..Default::default()
    };
    let ext_resource = Resource {
        name: "default/ext.example.com".into(),
        version: "1".into(),
        resource: Some(
            Any::from_msg(&Address {
                r#type: Some(address::Type::Service(ext)),
            })
            .expect("encode"),
        ),
        ..Default::default()
    };
    let server_backing_ext = {
        let mut r = workload(&server, "node-b", None);
        let mut a: Address = r.resource.as_ref().expect("any").to_msg().expect("decode");
        if let Some(address::Type::Workload(w)) = &mut a.r#type {
            w.services.insert(
                "default/ext.example.com".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: u32::from(PORT),
                        app_protocol: 0,
                    }],
                },
            );
        }
        r.resource = Some(Any::from_msg(&a).expect("encode"));
        r
    };
    let mut state = vec![
        odd_resource(&odd, "1"),
        odd_resource(&addressless, "1"),
        ext_resource,
        with_telemetry(workload(&sleep, "node-a", None), "sleep", "sleep-deploy"),
        with_telemetry(server_backing_ext, "server", "server-deploy"),
    ];
    state.extend((0..96).map(synthetic));
    let xds_addr = std::net::SocketAddr::new(node_a.underlay_v4().into(), 15010);
    let xds = XdsServer::start_in_netns(&node_a.netns_path(), xds_addr).expect("xDS server");
    xds.push(ADDRESS_TYPE_URL, state, Vec::new());
    use_xds(&mut mesh, &xds, xds_addr, json!({}));
    let agent_b = mesh
        .bed
        .start_agent(&mesh.configs["node-b"])
        .expect("agent-b");
    let agent_a = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent-a");

    let ready = |agent: &ambit_testbed::Agent| {
        poll(WAIT, || {
            let s = agent.ambitctl_json(&["status"]).ok()?;
            (s["ready"] == true).then_some(s)
        })
    };
    let status = ready(&agent_a).expect("ready: the first full state was processed");
    assert_eq!(status["xds"]["rejected"]["address"], 1, "{status:#}");
    let nack = xds
        .requests()
        .into_iter()
        .find(|r| r.type_url == ADDRESS_TYPE_URL && r.error_detail.is_some())
        .expect("the response was NACKed");
    let message = nack.error_detail.expect("detail").message;
    assert!(message.contains("default/odd"), "{message}");
    assert!(
        !message.contains("synthetic"),
        "only the bad one is named: {message}"
    );
    assert_eq!(
        xds_workloads(&agent_a),
        99,
        "the 99 valid workloads applied (the address-less one among them)"
    );
    // The enrolled pod is in the config and in istiod's push: one workload, explained by name.
    let sleep_row = agent_a
        .ambitctl_json(&["workloads", "--local"])
        .expect("workloads");
    assert_eq!(sleep_row[0]["source"], "config+xds", "{sleep_row:#}");
    assert_eq!(
        sleep_row[0]["xdsUid"], "Kubernetes//Pod/default/sleep",
        "{sleep_row:#}"
    );
    let explained = agent_a
        .ambitctl_json(&["explain", "--from", "default/sleep", &dst.to_string()])
        .expect("explain by name is not ambiguous");
    assert_eq!(explained["path"], "hbone", "{explained:#}");
    let m = ambit_testbed::metrics::of_node(&node_a);
    assert_eq!(
        sum(
            &m,
            "ambit_xds_rejected_resources_total",
            &[("type", "address")]
        ),
        1.0
    );

    // Traffic to a valid workload of that push goes over HBONE.
    let tunnelled = |agent: &ambit_testbed::Agent| {
        let mark = agent.mark();
        let report = sleep.connect(dst, 1000).expect("client");
        assert!(report.ok, "{report:#?}");
        let out = agent
            .wait_for_connection_log(mark, "outbound", dst, WAIT)
            .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(log_str(&out, "path"), Some("hbone"), "{out}");
    };
    tunnelled(&agent_a);
    // Any address of the block is the service's: it reaches the endpoint over HBONE.
    let in_block: std::net::SocketAddr = "10.50.0.7:80".parse().expect("addr");
    let (mark, mark_b) = (agent_a.mark(), agent_b.mark());
    let report = sleep.connect(in_block, 1000).expect("client");
    assert!(report.ok, "{report:#?}");
    let out = agent_a
        .wait_for_connection_log(mark, "outbound", in_block, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(log_str(&out, "path"), Some("hbone"), "{out}");
    // One trace id in both agents' access logs (`traceparent` on the CONNECT).
    let inb = agent_b
        .wait_for_connection_log(mark_b, "inbound", dst, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let trace = log_str(&out, "traceparent").expect("the client's agent started a trace");
    assert_eq!(trace.len(), 55, "{out}");
    assert_eq!(log_str(&inb, "traceparent"), Some(trace), "{inb}");
    assert_eq!(
        log_str(&out, "dst.service"),
        Some("default/ext.example.com"),
        "{out}"
    );

    // Istio's full TCP label set, with the values istiod pushed, on both agents (ztunnel's
    // names and order): the source side of the block's connection, and its destination side,
    // which learns the service from the tunnel's `Forwarded: host=`.
    let expected = |reporter: &str| {
        vec![
            ("reporter", reporter.to_owned()),
            ("source_workload", "sleep-deploy".to_owned()),
            ("source_canonical_service", "sleep".to_owned()),
            ("source_canonical_revision", "v1".to_owned()),
            ("source_workload_namespace", "default".to_owned()),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/sleep".to_owned(),
            ),
            ("source_app", "sleep".to_owned()),
            ("source_version", "v1".to_owned()),
            ("source_cluster", "east".to_owned()),
            ("destination_service", "ext.example.com".to_owned()),
            ("destination_service_namespace", "default".to_owned()),
            ("destination_service_name", "ext".to_owned()),
            ("destination_workload", "server-deploy".to_owned()),
            ("destination_canonical_service", "server".to_owned()),
            ("destination_canonical_revision", "v1".to_owned()),
            ("destination_workload_namespace", "default".to_owned()),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/server".to_owned(),
            ),
            ("destination_app", "server".to_owned()),
            ("destination_version", "v1".to_owned()),
            ("destination_cluster", "east".to_owned()),
            ("request_protocol", "tcp".to_owned()),
            ("response_flags", "-".to_owned()),
            ("connection_security_policy", "mutual_tls".to_owned()),
        ]
    };
    for (node, reporter) in [(&node_a, "source"), (&node_b, "destination")] {
        let want = expected(reporter);
        let series = poll(WAIT, || {
            let m = ambit_testbed::metrics::of_node(node);
            m.keys()
                .find(|k| {
                    k.starts_with("istio_tcp_connections_closed_total{")
                        && want
                            .iter()
                            .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
                })
                .cloned()
        })
        .unwrap_or_else(|| {
            panic!(
                "no {reporter} series with {want:?} in {:#?}",
                ambit_testbed::metrics::of_node(node)
                    .keys()
                    .filter(|k| k.starts_with("istio_tcp_connections_closed_total"))
                    .collect::<Vec<_>>()
            )
        });
        let names: Vec<&str> = series
            .trim_start_matches("istio_tcp_connections_closed_total{")
            .split("\",")
            .filter_map(|kv| kv.split('=').next())
            .collect();
        assert_eq!(
            names,
            want.iter().map(|(l, _)| *l).collect::<Vec<_>>(),
            "{series}"
        );
    }

    // A later fix of the bad one applies it.
    let mut fixed = odd.clone();
    fixed.addresses = vec![vec![10, 9, 9, 9]];
    let nonce = xds.push(
        ADDRESS_TYPE_URL,
        vec![odd_resource(&fixed, "2")],
        Vec::new(),
    );
    let reply = xds.wait_reply(&nonce, WAIT).expect("reply to the fix");
    assert!(reply.error_detail.is_none(), "ACK: {reply:?}");
    assert_eq!(xds_workloads(&agent_a), 100);

    // A restart with the same state is ready again, and tunnels.
    agent_a.stop().expect("stop agent-a");
    let agent_a = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent-a again");
    ready(&agent_a).expect("ready after the restart");
    tunnelled(&agent_a);
}

/// istiod's locality preferences (`Service.load_balancing`, e.g. from `trafficDistribution` or
/// `internalTrafficPolicy: Local`) keep node-a's client on node-a's endpoint while it is healthy;
/// FAILOVER then takes node-b's, STRICT refuses.
#[test]
fn locality_preferences_keep_traffic_on_the_node_then_fail_over_or_refuse() {
    use ambit_proto::istio::workload::{LoadBalancing, WorkloadStatus, load_balancing};
    if !ambit_testbed::privileged() {
        return;
    }
    let mut mesh = MeshSpec::new()
        .node("node-a")
        .pod_as("sleep", "default", "sleep")
        .pod_as("web-a", "default", "web")
        .node("node-b")
        .pod_as("web-b", "default", "web")
        .without_peers()
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (sleep, near, far) = (
        mesh.take_pod("sleep"),
        mesh.take_pod("web-a"),
        mesh.take_pod("web-b"),
    );
    let node_a = mesh.nodes["node-a"].clone();
    let near_echo = near.serve(PORT).expect("echo a");
    let far_echo = far.serve(PORT).expect("echo b");
    let vip: std::net::SocketAddr = "10.96.9.9:80".parse().expect("vip");

    let backing = |pod: &Pod, node: &str, healthy: bool| {
        let mut r = workload(pod, node, None);
        let mut a: Address = r.resource.as_ref().expect("any").to_msg().expect("decode");
        if let Some(address::Type::Workload(w)) = &mut a.r#type {
            w.services.insert(
                "default/web.default.svc.cluster.local".into(),
                PortList {
                    ports: vec![Port {
                        service_port: 80,
                        target_port: u32::from(PORT),
                        app_protocol: 0,
                    }],
                },
            );
            if !healthy {
                w.status = WorkloadStatus::Unhealthy.into();
            }
        }
        r.resource = Some(Any::from_msg(&a).expect("encode"));
        r.version = if healthy { "1" } else { "2" }.into();
        r
    };
    let web = |mode: load_balancing::Mode, version: &str| {
        let s = Service {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            addresses: vec![NetworkAddress {
                network: String::new(),
                address: vec![10, 96, 9, 9],
                length: None,
            }],
            ports: vec![Port {
                service_port: 80,
                target_port: u32::from(PORT),
                app_protocol: 0,
            }],
            load_balancing: Some(LoadBalancing {
                routing_preference: vec![load_balancing::Scope::Node.into()],
                mode: mode.into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Resource {
            name: "default/web.default.svc.cluster.local".into(),
            version: version.into(),
            resource: Some(
                Any::from_msg(&Address {
                    r#type: Some(address::Type::Service(s)),
                })
                .expect("encode"),
            ),
            ..Default::default()
        }
    };
    let xds_addr = std::net::SocketAddr::new(node_a.underlay_v4().into(), 15010);
    let xds = XdsServer::start_in_netns(&node_a.netns_path(), xds_addr).expect("xDS server");
    xds.push(
        ADDRESS_TYPE_URL,
        vec![
            workload(&sleep, "node-a", None),
            backing(&near, "node-a", true),
            backing(&far, "node-b", true),
            web(load_balancing::Mode::Failover, "1"),
        ],
        Vec::new(),
    );
    use_xds(&mut mesh, &xds, xds_addr, json!({}));
    let _agent_b = mesh
        .bed
        .start_agent(&mesh.configs["node-b"])
        .expect("agent-b");
    let agent_a = mesh
        .bed
        .start_agent(&mesh.configs["node-a"])
        .expect("agent-a");
    poll(WAIT, || {
        let s = agent_a.ambitctl_json(&["status"]).ok()?;
        (s["ready"] == true).then_some(())
    })
    .expect("agent-a ready");

    // While node-a's endpoint is healthy, every connection stays on the node.
    let mark = agent_a.mark();
    for _ in 0..4 {
        let r = sleep.connect(vip, 100).expect("client");
        assert!(r.ok, "{r:#?}");
    }
    near_echo.wait_for_accepts(4, WAIT).expect("four to web-a");
    assert!(far_echo.accepted_peers().is_empty(), "none left the node");
    let out = agent_a
        .wait_for_connection_log(mark, "outbound", vip, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        log_str(&out, "dst.locality"),
        Some("FAILOVER NODE (1 of 1 preferred scopes shared)"),
        "{out}"
    );
    let explained = agent_a
        .ambitctl_json(&["explain", "--from", "default/sleep", &vip.to_string()])
        .expect("explain");
    assert!(
        explained
            .to_string()
            .contains("chosen by locality: FAILOVER NODE"),
        "{explained:#}"
    );

    // web-a unhealthy: FAILOVER goes to node-b.
    let nonce = xds.push(
        ADDRESS_TYPE_URL,
        vec![backing(&near, "node-a", false)],
        Vec::new(),
    );
    xds.wait_reply(&nonce, WAIT).expect("ACK");
    let r = sleep.connect(vip, 100).expect("client");
    assert!(r.ok, "{r:#?}");
    far_echo
        .wait_for_accepts(1, WAIT)
        .expect("failed over to web-b");

    // STRICT: only the node's endpoints, none healthy: refused, saying why.
    let nonce = xds.push(
        ADDRESS_TYPE_URL,
        vec![web(load_balancing::Mode::Strict, "2")],
        Vec::new(),
    );
    xds.wait_reply(&nonce, WAIT).expect("ACK");
    let mark = agent_a.mark();
    let r = sleep.connect_with(vip, 100, 0, 3000).expect("client");
    assert!(!r.ok, "STRICT refuses: {r:#?}");
    let out = agent_a
        .wait_for_connection_log(mark, "outbound", vip, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        log_str(&out, "error").is_some_and(|e| e.contains("STRICT")),
        "{out}"
    );
    assert_eq!(far_echo.accepted_peers().len(), 1, "nothing more to node-b");
}
