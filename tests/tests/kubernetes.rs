//! Kubernetes mode on the namespace test bed, against a stand-in API server speaking the real
//! list/watch JSON: labelling a namespace enrolls its running pods live (found by their IPs),
//! a pod label opts one out, unlabelling releases them, and the agent marks enrolled pods with
//! Istio's redirection annotation and clears it when they leave.

use std::time::Duration;

use ambit_testbed::{Agent, LogMark, Mesh, MeshSpec, Pod, kube_server::KubeApi, log_str, poll};
use serde_json::{Value, json};

const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(20);
const ANNOTATION: &str = "ambient.istio.io/redirection";

/// The agent of node-a in Kubernetes mode against `api`; its config lists no pods.
fn kube_agent(m: &Mesh, api: &KubeApi) -> Agent {
    let mut config = m.configs["node-a"].clone();
    api.configure(&m.bed, &mut config);
    m.bed.start_agent(&config).expect("agent")
}

fn enrolled(agent: &Agent) -> Vec<String> {
    let list = agent
        .ambitctl_json(&["workloads", "--local"])
        .expect("ambitctl workloads");
    let mut names: Vec<String> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter(|w| w["enrolled"] == true)
        .filter_map(|w| {
            Some(format!(
                "{}/{}",
                w["namespace"].as_str()?,
                w["name"].as_str()?
            ))
        })
        .collect();
    names.sort();
    names
}

fn wait_enrolled(agent: &Agent, want: &[&str]) {
    let got = poll(WAIT, || {
        let now = enrolled(agent);
        (now == want).then_some(now)
    });
    assert!(
        got.is_some(),
        "expected enrolled {want:?}, have {:?}",
        enrolled(agent)
    );
}

/// The outbound access log of `from`'s next connection, if the agent proxied it.
fn captured(agent: &Agent, mark: LogMark, from: &Pod) -> Option<Value> {
    agent
        .wait_for_log_after(
            mark,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
                    && log_str(v, "src.workload")
                        == Some(&format!("{}/{}", from.namespace(), from.name()))
            },
            Duration::from_secs(2),
        )
        .ok()
}

#[test]
fn namespace_and_pod_labels_enroll_and_release_running_pods_live() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .listed_elsewhere("client", "default", "client")
        .listed_elsewhere("server", "default", "server")
        .listed_elsewhere("other", "other", "default")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, server, other) = (
        m.take_pod("client"),
        m.take_pod("server"),
        m.take_pod("other"),
    );
    let node = &m.nodes["node-a"];
    let _echo = server.serve(PORT).expect("echo");

    // The cluster as the API shows it: pods already running, no namespace in the mesh yet.
    let api = KubeApi::start_in(&node.netns_path()).expect("fake API server");
    api.set_namespace("default", json!({}));
    api.set_namespace("other", json!({}));
    for p in [&client, &server, &other] {
        api.set_pod("node-a", p, json!({"app": p.name()}));
    }
    let agent = kube_agent(&m, &api);
    let status = poll(WAIT, || {
        let s = agent.ambitctl_json(&["status"]).ok()?;
        (s["ready"] == true).then_some(s)
    });
    assert!(status.is_some(), "ready once the API's lists arrived");
    let requests = api.requests();
    assert!(
        requests.iter().any(|(r, auth)| r
            .contains("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a")
            && auth.as_deref() == Some("Bearer test-token")),
        "pods of this node only, with the token: {requests:#?}"
    );
    assert_eq!(enrolled(&agent), Vec::<String>::new());
    let mark = agent.mark();
    assert!(client.connect(server.v4(PORT), 100).expect("client").ok);
    assert!(
        captured(&agent, mark, &client).is_none(),
        "not in the mesh yet"
    );

    // Label the namespace: its running pods are enrolled, found by IP, and annotated.
    api.set_namespace("default", json!({"istio.io/dataplane-mode": "ambient"}));
    wait_enrolled(&agent, &["default/client", "default/server"]);
    let mark = agent.mark();
    let r = client.connect(server.v4(PORT), 1000).expect("client");
    assert!(r.ok, "{r:#?}");
    let log = captured(&agent, mark, &client).expect("captured after the label");
    // Both pods are on node-a: spliced in the kernel, or copied by the agent when the client had
    // already finished sending by the time it was admitted.
    assert!(
        matches!(log_str(&log, "path"), Some("kernel" | "local")),
        "{log}"
    );
    assert_eq!(
        log_str(&log, "src.identity"),
        Some("spiffe://cluster.local/ns/default/sa/client"),
        "the identity comes from the pod's service account"
    );
    for key in ["default/client", "default/server"] {
        let annotated = poll(WAIT, || {
            (api.annotation(key, ANNOTATION).as_deref() == Some("enabled")).then_some(())
        });
        assert!(annotated.is_some(), "{key} annotated: {:#?}", api.patches());
    }
    assert_eq!(
        api.annotation("other/other", ANNOTATION),
        None,
        "other namespace untouched"
    );

    // A pod label opts the client out: released, annotation removed.
    api.set_pod(
        "node-a",
        &client,
        json!({"app": "client", "istio.io/dataplane-mode": "none"}),
    );
    wait_enrolled(&agent, &["default/server"]);
    let cleared = poll(WAIT, || {
        api.annotation("default/client", ANNOTATION)
            .is_none()
            .then_some(())
    });
    assert!(
        cleared.is_some(),
        "annotation cleared: {:#?}",
        api.patches()
    );
    let mark = agent.mark();
    assert!(client.connect(server.v4(PORT), 100).expect("client").ok);
    assert!(captured(&agent, mark, &client).is_none(), "opted out");

    // Unlabel the namespace: everything released.
    api.set_namespace("default", json!({}));
    wait_enrolled(&agent, &[]);
    let cleared = poll(WAIT, || {
        api.annotation("default/server", ANNOTATION)
            .is_none()
            .then_some(())
    });
    assert!(
        cleared.is_some(),
        "annotation cleared: {:#?}",
        api.patches()
    );
}

#[test]
fn a_pod_object_the_agent_cannot_read_is_named_and_counted_not_silently_skipped() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .listed_elsewhere("server", "default", "server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let server = m.take_pod("server");
    let node = &m.nodes["node-a"];
    let api = KubeApi::start_in(&node.netns_path()).expect("fake API server");
    api.set_namespace("default", json!({"istio.io/dataplane-mode": "ambient"}));
    api.set_pod("node-a", &server, json!({"app": "server"}));
    // A pod in the mesh whose object does not have the shape the agent reads (labels that are
    // not strings): the agent cannot know its addresses, so it cannot capture it.
    let weird = |labels: Value| {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "weird", "namespace": "default", "uid": "uid-weird",
                            "labels": labels},
               "spec": {"nodeName": "node-a", "serviceAccountName": "default"},
               "status": {"phase": "Pending"}})
    };
    api.set_pod_object("default/weird", weird(json!({"app": 7})));
    let agent = kube_agent(&m, &api);
    wait_enrolled(&agent, &["default/server"]);

    let failed = |agent: &Agent| -> Vec<Value> {
        let s = agent.ambitctl_json(&["status"]).expect("status");
        s["failedPods"].as_array().cloned().unwrap_or_default()
    };
    let named = poll(WAIT, || {
        failed(&agent)
            .into_iter()
            .find(|f| f["pod"] == "pod default/weird")
    })
    .expect("the unreadable pod is among the failed pods");
    let error = named["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("cannot read this object from the Kubernetes API")
            && error.contains("not captured"),
        "{named}"
    );
    let metrics = ambit_testbed::metrics::of_node(node);
    assert_eq!(
        metrics.get("ambit_kubernetes_unreadable_objects"),
        Some(&1.0),
        "{metrics:#?}"
    );

    // Once the object reads, it is no longer reported.
    api.set_pod_object("default/weird", weird(json!({"app": "weird"})));
    let cleared = poll(WAIT, || {
        failed(&agent)
            .iter()
            .all(|f| f["pod"] != "pod default/weird")
            .then_some(())
    });
    assert!(cleared.is_some(), "still reported: {:#?}", failed(&agent));
    let metrics = ambit_testbed::metrics::of_node(node);
    assert_eq!(
        metrics.get("ambit_kubernetes_unreadable_objects"),
        Some(&0.0)
    );
}
