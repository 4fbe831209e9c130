//! The DNS proxy on the namespace test bed: an enrolled pod's DNS (UDP and TCP to port 53) is
//! captured by the eBPF programs and answered by its agent for the names the mesh knows; every
//! other name goes on to the resolver the pod asked (a resolver pod of the bed), which never
//! sees the mesh names; the answer always appears to come from that resolver. A query that does
//! not parse gets FORMERR; a pod with `dnsCapture: false` is left alone.

use std::{net::SocketAddr, time::Duration};

use ambit_testbed::{MeshSpec, metrics::sum, poll};
use serde_json::{Value, json};

const ECHO_VIP: &str = "10.96.0.20";
const ECHO: &str = "echo.default.svc.cluster.local";
const WAIT: Duration = Duration::from_secs(10);

/// Every node with the `echo` service and the DNS proxy on.
fn with_dns(spec: MeshSpec) -> MeshSpec {
    spec.everywhere(
        "services",
        json!([{"namespace": "default", "name": "echo", "vips": [ECHO_VIP],
                "ports": [{"port": 80, "targetPort": 8080}]}]),
    )
    .everywhere("dns", json!({"capture": true}))
}

fn answers(v: &Value) -> Vec<String> {
    v["answers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect()
}

fn names_asked(resolver: &ambit_testbed::Server) -> Vec<String> {
    resolver
        .events()
        .iter()
        .filter(|e| e["event"] == "query")
        .filter_map(|e| e["name"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn mesh_names_are_answered_by_the_agent_and_the_rest_reach_the_pod_s_resolver() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = with_dns(MeshSpec::new())
        .node("node-a")
        .pod("client")
        .pod("plain")
        .unenrolled("resolver")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    // One pod opts out.
    m.configs
        .get_mut("node-a")
        .and_then(|c| c.pod_mut("plain"))
        .expect("plain")
        .dns_capture = Some(false);
    let (client, plain, resolver_pod) = (
        m.take_pod("client"),
        m.take_pod("plain"),
        m.take_pod("resolver"),
    );
    // The pods' resolver: it has its own (different) answer for the mesh name, so an answer
    // from it shows.
    let resolver = resolver_pod
        .serve_dns(53, &[("external.test", "192.0.2.7"), (ECHO, "192.0.2.99")])
        .expect("resolver");
    let agent = m.bed.start_agent(&m.configs["node-a"]).expect("agent");
    let server = SocketAddr::new(resolver_pod.ipv4().into(), 53);

    // A mesh name, answered by the agent with the service's VIP, from the resolver's address.
    for how in [&[][..], &["--connected"][..]] {
        let mut args = vec!["--name", ECHO];
        args.extend_from_slice(how);
        let a = client.dns_query(server, &args).expect("query");
        assert_eq!(a["rcode"], 0, "{how:?}: {a}");
        assert_eq!(answers(&a), [ECHO_VIP], "{how:?}: {a}");
        assert_eq!(
            a["from"],
            server.to_string(),
            "{how:?}: the answer comes from the resolver's address: {a}"
        );
    }
    // Over TCP too (a captured connection to port 53).
    let a = client
        .dns_query(server, &["--name", ECHO, "--tcp"])
        .expect("TCP query");
    assert_eq!(answers(&a), [ECHO_VIP], "{a}");
    assert!(
        !names_asked(&resolver).contains(&ECHO.to_owned()),
        "the resolver never saw the mesh name: {:?}",
        names_asked(&resolver)
    );

    // Another name goes on to the pod's resolver, and its answer comes back.
    let a = client
        .dns_query(server, &["--name", "external.test"])
        .expect("query");
    assert_eq!(answers(&a), ["192.0.2.7"], "{a}");
    assert_eq!(a["from"], server.to_string(), "{a}");
    let asked = poll(WAIT, || {
        let n = names_asked(&resolver);
        n.contains(&"external.test".to_owned()).then_some(n)
    });
    assert!(asked.is_some(), "the resolver was asked for external.test");
    let a = client
        .dns_query(server, &["--name", "nowhere.test"])
        .expect("query");
    assert_eq!(a["rcode"], 3, "the resolver's NXDOMAIN comes back: {a}");

    // A query that does not parse (a question running off the end): FORMERR, same id.
    let a = client
        .dns_query(server, &["--raw", "abcd01000001000000000000ff"])
        .expect("query");
    assert_eq!(
        (a["rcode"].as_u64(), a["id"].as_u64()),
        (Some(1), Some(0xabcd)),
        "{a}"
    );

    // The pod that opted out: its query reaches its resolver, which answers the mesh name its
    // own way.
    let a = plain.dns_query(server, &["--name", ECHO]).expect("query");
    assert_eq!(answers(&a), ["192.0.2.99"], "{a}");

    let metrics = ambit_testbed::metrics::of_node(&m.nodes["node-a"]);
    assert!(
        sum(&metrics, "ambit_dns_requests_total", &[("outcome", "mesh")]) >= 3.0,
        "{metrics:?}"
    );
    assert!(
        sum(
            &metrics,
            "ambit_dns_requests_total",
            &[("outcome", "forwarded")]
        ) >= 2.0
    );
    assert!(
        sum(
            &metrics,
            "ambit_dns_requests_total",
            &[("outcome", "malformed")]
        ) >= 1.0
    );
    assert!(
        sum(
            &metrics,
            "istio_dns_upstream_request_duration_seconds_count",
            &[]
        ) >= 2.0
    );
    let bpf = agent.ambitctl_json(&["bpf"]).expect("ambitctl bpf");
    assert!(bpf.to_string().contains("dns_redirected"), "{bpf}");
}

#[test]
fn explain_says_what_the_proxy_answers_for_a_name() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = with_dns(MeshSpec::new())
        .node("node-a")
        .pod("client")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let agent = m.bed.start_agent(&m.configs["node-a"]).expect("agent");
    let e = agent
        .ambitctl_json(&["explain", "--dns", "echo.default.svc.cluster.local."])
        .expect("explain");
    assert_eq!(
        e["service"], "default/echo.default.svc.cluster.local",
        "{e}"
    );
    assert_eq!(e["addresses"], json!([ECHO_VIP]), "{e}");
    assert_eq!(e["capture"], true, "{e}");
    let e = agent
        .ambitctl_json(&["explain", "--dns", "example.org"])
        .expect("explain");
    assert!(e["service"].is_null(), "{e}");
    assert!(
        e["outcome"]
            .as_str()
            .unwrap_or_default()
            .contains("forwarded"),
        "{e}"
    );
}
