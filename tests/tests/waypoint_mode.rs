//! Ambit as a waypoint (`ambit-agent waypoint`), on the namespace test bed: a client pod on
//! node-a calls the `echo` service, whose waypoint runs in a pod on node-b; the waypoint applies
//! L7 policy and routes, and sends each request over HBONE to an endpoint pod on node-b. Every hop
//! is HBONE: client's agent -> waypoint -> server's agent. Requests are made with curl in the
//! client pod, as a user would.

use std::time::{Duration, Instant};

use ambit_testbed::{
    Agent, AgentConfig, MeshSpec, Pod, TestBed,
    kube_server::{self, KubeApi},
    log_field, log_message, log_str, poll,
};
use serde_json::{Value, json};

const APP_PORT: u16 = 8080;
const ECHO_VIP: &str = "10.96.0.20";
const V1_VIP: &str = "10.96.0.21";
const V2_VIP: &str = "10.96.0.22";
const WAIT: Duration = Duration::from_secs(15);

/// Two nodes; `client` on node-a, the waypoint and the `v1`/`v2` endpoints of `echo` on node-b.
struct Mesh {
    bed: TestBed,
    client: Pod,
    v1: Pod,
    v2: Pod,
    waypoint_pod: Pod,
    agent_a: Agent,
    agent_b: Agent,
    waypoint: Agent,
    waypoint_config: AgentConfig,
}

fn services(waypoint_ip: &str) -> Value {
    json!([
        {"namespace": "default", "name": "echo", "vips": [ECHO_VIP],
         "ports": [{"port": 80, "targetPort": APP_PORT}], "waypoint": {"address": waypoint_ip}},
        {"namespace": "default", "name": "echo-v1", "vips": [V1_VIP],
         "ports": [{"port": 80, "targetPort": APP_PORT}]},
        {"namespace": "default", "name": "echo-v2", "vips": [V2_VIP],
         "ports": [{"port": 80, "targetPort": APP_PORT}]},
    ])
}

/// Brings the mesh up (the tests start the apps); `waypoint` edits the waypoint's section before
/// it starts.
fn mesh(waypoint: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Mesh {
    mesh_with(|_, _, wp| waypoint(wp.waypoint_mut()))
}

/// Like [`mesh`]; `edit` gets the bed, the waypoint's pod and its whole config.
fn mesh_with(edit: impl FnOnce(&TestBed, &Pod, &mut AgentConfig)) -> Mesh {
    let mut m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .node("node-b")
        .pod_as("v1", "default", "echo")
        .serves(&["default/echo", "default/echo-v1"])
        .pod_as("v2", "default", "echo")
        .serves(&["default/echo", "default/echo-v2"])
        .unenrolled_peer("waypoint", "default", "waypoint")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let wp_ip = m.pods["waypoint"].ipv4().to_string();
    for config in m.configs.values_mut() {
        config.extra.insert("services".into(), services(&wp_ip));
    }
    let mut wp = m.waypoint_config("waypoint");
    wp.extra.insert("services".into(), services(&wp_ip));
    edit(&m.bed, &m.pods["waypoint"], &mut wp);

    let agent_a = m.bed.start_agent(&m.configs["node-a"]).expect("agent-a");
    let agent_b = m.bed.start_agent(&m.configs["node-b"]).expect("agent-b");
    let waypoint_pod = m.take_pod("waypoint");
    let waypoint = m.bed.start_waypoint(&waypoint_pod, &wp).expect("waypoint");
    Mesh {
        client: m.take_pod("client"),
        v1: m.take_pod("v1"),
        v2: m.take_pod("v2"),
        waypoint_pod,
        agent_a,
        agent_b,
        waypoint,
        waypoint_config: wp,
        bed: m.bed,
    }
}

/// One response as curl reports it.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Connections curl opened for this request (0: it reused the previous one).
    new_connections: u32,
    /// `1.1` or `2`.
    http_version: String,
    body: String,
}

/// Runs curl in `pod` with `args` (several requests separated by `--next`), each printing its
/// body then a `\n@@ <code> <connects>` line.
fn curl(pod: &Pod, args: &[&str]) -> Vec<Reply> {
    let mut full = vec!["curl", "-sS", "--max-time", "10"];
    let mark = "\n@@ %{http_code} %{num_connects} %{http_version}\n";
    for a in args {
        if *a == "--next" {
            full.extend(["-w", mark, "--next", "-sS", "--max-time", "10"]);
        } else {
            full.push(a);
        }
    }
    full.extend(["-w", mark]);
    let out = pod.exec(&full).expect("curl runs");
    let mut replies = Vec::new();
    let mut body = String::new();
    for line in out.split_inclusive('\n') {
        if let Some(rest) = line.strip_prefix("@@ ") {
            let mut it = rest.split_whitespace();
            replies.push(Reply {
                status: it.next().and_then(|s| s.parse().ok()).unwrap_or(0),
                new_connections: it.next().and_then(|s| s.parse().ok()).unwrap_or(99),
                http_version: it.next().unwrap_or_default().to_owned(),
                body: std::mem::take(&mut body).trim_end().to_owned(),
            });
        } else {
            body.push_str(line);
        }
    }
    replies
}

fn metrics(pod: &Pod) -> String {
    pod.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "5",
        "http://127.0.0.1:15020/metrics",
    ])
    .expect("metrics")
}

/// The value of the first sample of `name` whose labels contain every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .find(|l| labels.iter().all(|x| l.contains(x)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn requests_go_client_agent_waypoint_agent_server_all_over_hbone() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh(|_| {});
    let v1s = m.v1.serve_http(APP_PORT).expect("v1 app");
    let v2s = m.v2.serve_http(APP_PORT).expect("v2 app");
    let url = format!("http://{ECHO_VIP}/hello");

    let mark_wp = m.waypoint.mark();
    let mark_a = m.agent_a.mark();
    let mark_b = m.agent_b.mark();
    let replies = curl(&m.client, &["-H", "x-request-id: first-request", &url]);
    assert_eq!(replies.len(), 1, "{replies:?}");
    assert_eq!(replies[0].status, 200, "{replies:?}");
    assert!(
        replies[0].body.ends_with("GET /hello"),
        "an endpoint answered: {replies:?}"
    );
    let served_by = replies[0]
        .body
        .split(' ')
        .next()
        .unwrap_or_default()
        .to_owned();
    let server = if served_by == "v1" { &v1s } else { &v2s };
    let seen = server.requests();
    assert!(
        seen.iter()
            .any(|r| r["path"] == "/hello" && r["request_id"] == "first-request"),
        "the server saw the request: {seen:?}"
    );

    // The waypoint's access log: who asked, what, where it went.
    let log = m
        .waypoint
        .wait_for_log_after(
            mark_wp,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "request_id") == Some("first-request")
            },
            WAIT,
        )
        .expect("waypoint access log");
    assert_eq!(
        log_str(&log, "src.identity"),
        Some("spiffe://cluster.local/ns/default/sa/default"),
        "{log}"
    );
    assert_eq!(log_str(&log, "method"), Some("GET"), "{log}");
    assert_eq!(log_str(&log, "path"), Some("/hello"), "{log}");
    assert_eq!(
        log_field(&log, "status").and_then(Value::as_u64),
        Some(200),
        "{log}"
    );
    assert_eq!(
        log_str(&log, "dst.workload"),
        Some(format!("default/{served_by}").as_str()),
        "{log}"
    );

    // Hop 1: the client's agent sent it to the waypoint over HBONE.
    let out = m
        .agent_a
        .wait_for_log_after(
            mark_a,
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "direction") == Some("outbound")
            },
            WAIT,
        )
        .expect("client agent access log");
    assert_eq!(log_str(&out, "path"), Some("waypoint"), "{out}");
    assert_eq!(
        log_str(&out, "dst.identity"),
        Some("spiffe://cluster.local/ns/default/sa/waypoint"),
        "{out}"
    );
    // Hop 2: the server's agent took it over HBONE (mutual TLS) from the waypoint's identity.
    // (Its access line comes when the waypoint's kept-alive connection closes.)
    let inbound = m
        .agent_b
        .wait_for_log_after(
            mark_b,
            |v| {
                ambit_testbed::log_message(v) == Some("hbone connection accepted")
                    && log_str(v, "src.identity")
                        == Some("spiffe://cluster.local/ns/default/sa/waypoint")
            },
            WAIT,
        )
        .expect("server agent accepted HBONE from the waypoint");
    assert_eq!(
        log_str(&inbound, "dst.identity"),
        Some("spiffe://cluster.local/ns/default/sa/echo"),
        "{inbound}"
    );

    // HTTP/2 with prior knowledge, and by upgrade from HTTP/1.1 (h2c), work the same.
    let replies = curl(&m.client, &["--http2-prior-knowledge", &url]);
    assert_eq!(replies[0].status, 200, "{replies:?}");
    assert_eq!(replies[0].http_version, "2", "{replies:?}");
    let replies = curl(&m.client, &["--http2", &format!("{url}?upgraded=1")]);
    assert_eq!(replies[0].status, 200, "{replies:?}");
    assert_eq!(replies[0].http_version, "2", "upgraded to h2c: {replies:?}");
    assert!(
        replies[0].body.ends_with("GET /hello?upgraded=1"),
        "{replies:?}"
    );
    m.waypoint
        .wait_for_log_after(
            mark_wp,
            |v| log_str(v, "target") == Some("access") && log_str(v, "protocol") == Some("HTTP/2"),
            WAIT,
        )
        .expect("an HTTP/2 request in the waypoint's log");

    // A client that gives up before the answer is still in the log (Envoy's flag DC, code 0).
    let gave_up = m.client.exec(&[
        "curl",
        "-sS",
        "--max-time",
        "0.5",
        &format!("http://{ECHO_VIP}/delay/2000"),
    ]);
    assert!(gave_up.is_err(), "curl gave up: {gave_up:?}");
    let log = m
        .waypoint
        .wait_for_log_after(
            mark_wp,
            |v| log_str(v, "target") == Some("access") && log_str(v, "path") == Some("/delay/2000"),
            WAIT,
        )
        .expect("an access line for the abandoned request");
    assert_eq!(log_str(&log, "flags"), Some("DC"), "{log}");
    assert_eq!(
        log_field(&log, "status").and_then(Value::as_u64),
        Some(0),
        "{log}"
    );

    // The Istio request metrics count the three answered ones.
    let text = metrics(&m.waypoint_pod);
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with("istio_requests_total{") && l.contains("response_code=\"200\""))
        .filter(|l| {
            l.contains("reporter=\"waypoint\"") && l.contains("destination_service_name=\"echo\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(total, 3.0, "{text}");
    assert!(
        sample(
            &text,
            "istio_request_duration_milliseconds_count",
            &["response_code=\"200\""]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

#[test]
fn l7_policy_denies_by_path_and_method_on_a_live_connection() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh(|_| {});
    let v1s = m.v1.serve_http(APP_PORT).expect("v1 app");
    let v2s = m.v2.serve_http(APP_PORT).expect("v2 app");
    let base = format!("http://{ECHO_VIP}");

    // No policy yet: /admin passes.
    let r = curl(&m.client, &[&format!("{base}/admin/users")]);
    assert_eq!(r[0].status, 200, "{r:?}");

    // Reloaded live: deny /admin* and DELETE.
    m.waypoint_config.waypoint_mut().insert(
        "authorization".into(),
        json!([{
            "name": "no-admin-no-delete",
            "action": "DENY",
            "rules": [
                {"to": [{"operation": {"paths": ["/admin*"]}}]},
                {"to": [{"operation": {"methods": ["DELETE"]}}]},
                {"to": [{"operation": {"hosts": ["admin.internal"]}}]},
            ],
        }]),
    );
    m.waypoint.reload(&m.waypoint_config).expect("reload");

    let replies = curl(
        &m.client,
        &[
            &format!("{base}/items/1"),
            "--next",
            &format!("{base}/admin/users"),
            "--next",
            "-X",
            "DELETE",
            &format!("{base}/items/1"),
            "--next",
            "-X",
            "PUT",
            &format!("{base}/items/1"),
            // Ways around a path rule: dot segments and escapes are judged as the app resolves
            // them; an escaped slash is refused outright.
            "--next",
            "--path-as-is",
            &format!("{base}/public/../admin/users"),
            "--next",
            &format!("{base}/%61dmin/users"),
            "--next",
            &format!("{base}/admin%2Fusers"),
            // The Host header is judged, and the app sees the host that was judged.
            "--next",
            "-H",
            "Host: admin.internal",
            &format!("{base}/items/2"),
            "--next",
            "--request-target",
            "http://public.example/items/3",
            "-H",
            "Host: admin.internal",
            &format!("{base}/"),
        ],
    );
    let statuses: Vec<u16> = replies.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [200, 403, 403, 200, 403, 403, 400, 403, 200],
        "{replies:?}"
    );
    assert!(replies[8].body.ends_with("GET /items/3"), "{replies:?}");
    assert!(
        replies[1..].iter().all(|r| r.new_connections == 0),
        "all on the first request's connection: {replies:?}"
    );
    assert!(
        replies[1].body.contains("default/no-admin-no-delete")
            && replies[1].body.contains("rule 0"),
        "the 403 names the policy and rule: {replies:?}"
    );
    assert!(replies[2].body.contains("rule 1"), "{replies:?}");
    // Nothing denied reached an app.
    let seen: Vec<Value> = [&v1s, &v2s].iter().flat_map(|s| s.requests()).collect();
    assert!(
        !seen.iter().any(|r| r["method"] == "DELETE"),
        "a denied request reached an app: {seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|r| r["path"] == "/admin/users").count(),
        1,
        "only the request from before the policy: {seen:?}"
    );
    assert!(
        !seen.iter().any(|r| r["host"] == "admin.internal"),
        "the app never saw the denied host: {seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r["path"] == "/items/3" && r["host"] == "public.example"),
        "the app saw the host the policy judged: {seen:?}"
    );
    let text = metrics(&m.waypoint_pod);
    assert_eq!(
        sample(
            &text,
            "ambit_waypoint_denied_requests_total",
            &["policy=\"default/no-admin-no-delete\""]
        ),
        Some(5.0),
        "{text}"
    );
    assert!(
        sample(&text, "istio_requests_total", &["response_code=\"403\""]).is_some(),
        "{text}"
    );
}

#[test]
fn a_90_10_split_sends_about_90_percent_to_v1() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh(|w| {
        w.insert(
            "routes".into(),
            json!([{
                "name": "echo-split",
                "parentRefs": [{"name": "echo"}],
                "rules": [{
                    "backendRefs": [
                        {"name": "echo-v1", "port": 80, "weight": 90},
                        {"name": "echo-v2", "port": 80, "weight": 10},
                    ],
                }],
            }]),
        );
    });
    let v1 = m.v1.serve_http(APP_PORT).expect("v1 app");
    let v2 = m.v2.serve_http(APP_PORT).expect("v2 app");
    // 1000 requests on kept connections (curl's URL globbing).
    let out = m
        .client
        .exec(&[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}\n",
            &format!("http://{ECHO_VIP}/split/[1-1000]"),
        ])
        .expect("curl");
    let ok = out.lines().filter(|l| *l == "200").count();
    assert_eq!(ok, 1000, "every request succeeded: {out}");
    let wait_total = Instant::now();
    let (mut n1, mut n2) = (0, 0);
    while wait_total.elapsed() < WAIT {
        n1 = v1.requests().len();
        n2 = v2.requests().len();
        if n1 + n2 >= 1000 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(n1 + n2, 1000, "v1 {n1} + v2 {n2}");
    // Binomial(1000, 0.9): standard deviation ~9.5; 850..=950 is over 5 of them either way.
    assert!(
        (850..=950).contains(&n1),
        "about 90% to v1 (tolerance 85-95%): v1 {n1}, v2 {n2}"
    );
}

#[test]
fn a_failing_endpoint_is_retried_then_ejected_and_a_slow_one_times_out() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = mesh(|w| {
        w.insert(
            "outlierDetection".into(),
            json!({"consecutive5xxErrors": 2, "baseEjectionTime": "60s", "maxEjectionPercent": 50}),
        );
        w.insert(
            "routes".into(),
            json!([{
                "name": "echo",
                "parentRefs": [{"name": "echo"}],
                "rules": [
                    {"matches": [{"path": {"type": "PathPrefix", "value": "/delay"}}],
                     "backendRefs": [{"name": "echo"}],
                     "timeouts": {"request": "500ms"}},
                    {"backendRefs": [{"name": "echo"}],
                     "retry": {"attempts": 2, "codes": [503]}},
                ],
            }]),
        );
    });
    // v2's app is down: its agent refuses the tunnel (503); v1 answers.
    let v1 = m.v1.serve_http(APP_PORT).expect("v1 app");
    let mark = m.waypoint.mark();
    let urls: Vec<String> = (0..20)
        .map(|i| format!("http://{ECHO_VIP}/try/{i}"))
        .collect();
    let mut args: Vec<&str> = Vec::new();
    for (i, u) in urls.iter().enumerate() {
        if i > 0 {
            args.push("--next");
        }
        args.push(u);
    }
    let replies = curl(&m.client, &args);
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.body.starts_with("v1 ")),
        "every request answered by v1, retried where v2 was tried: {replies:?}"
    );
    assert_eq!(v1.requests().len(), 20);

    let ejected = m
        .waypoint
        .wait_for_log_after(
            mark,
            |v| {
                ambit_testbed::log_message(v)
                    == Some("endpoint ejected by outlier detection: it keeps failing")
            },
            WAIT,
        )
        .expect("v2 ejected");
    let v2_addr = format!("{}:{APP_PORT}", m.v2.ipv4());
    assert_eq!(
        log_str(&ejected, "endpoint"),
        Some(v2_addr.as_str()),
        "{ejected}"
    );
    let logs: Vec<Value> = m
        .waypoint
        .access_logs()
        .into_iter()
        .filter(|v| log_str(v, "path").is_some_and(|p| p.starts_with("/try/")))
        .collect();
    assert_eq!(logs.len(), 20, "{logs:#?}");
    let attempts = |v: &Value| log_field(v, "attempts").and_then(Value::as_u64);
    assert!(
        logs.iter().any(|v| attempts(v) == Some(2)),
        "some requests were retried: {logs:#?}"
    );
    // Once ejected, v2 is not tried: the last requests went straight to v1.
    assert!(
        logs[logs.len() - 5..]
            .iter()
            .all(|v| attempts(v) == Some(1)),
        "after the ejection no request tries v2: {logs:#?}"
    );
    let text = metrics(&m.waypoint_pod);
    assert_eq!(
        sample(&text, "ambit_waypoint_ejections_total", &[]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "ambit_waypoint_ejected_endpoints", &[]),
        Some(1.0),
        "{text}"
    );

    // A slow answer: 504 at the route's 500 ms timeout, not the app's 3 s.
    let start = Instant::now();
    let replies = curl(&m.client, &[&format!("http://{ECHO_VIP}/delay/3000")]);
    let took = start.elapsed();
    assert_eq!(replies[0].status, 504, "{replies:?}");
    assert!(
        replies[0].body.contains("upstream request timeout"),
        "{replies:?}"
    );
    assert!(took < Duration::from_millis(2500), "answered in {took:?}");
}

#[test]
fn grpc_is_carried_over_http2_end_to_end() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = mesh(|w| {
        w.insert(
            "routes".into(),
            json!([{"name": "to-v1", "parentRefs": [{"name": "echo"}],
                    "rules": [{"backendRefs": [{"name": "echo-v1", "port": 80}]}]}]),
        );
    });
    // An HTTP/2-only (h2c) server in v1, as a gRPC server is: it refuses HTTP/1.1.
    let dir = m.bed.tmp_dir().join("nginx-h2");
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log stderr warn; events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
             server {{ listen {APP_PORT} http2; location / {{ default_type text/plain;\n\
             return 200 \"served over $server_protocol\\n\"; }} }} }}\n"
        ),
    )
    .expect("nginx config");
    let mut cmd = m.v1.command("nginx");
    cmd.args([
        "-p",
        &d.to_string(),
        "-c",
        &conf.display().to_string(),
        "-e",
        "stderr",
    ]);
    let _nginx = m.v1.spawn(&mut cmd).expect("nginx");
    let local = format!("http://127.0.0.1:{APP_PORT}/");
    let up = ambit_testbed::poll(WAIT, || {
        m.v1.exec(&["curl", "-sS", "--http2-prior-knowledge", &local])
            .ok()
    });
    assert!(up.is_some(), "nginx (h2c) did not come up in v1");

    let replies = curl(
        &m.client,
        &[
            "--http2-prior-knowledge",
            "-X",
            "POST",
            "-H",
            "content-type: application/grpc",
            "--data-binary",
            "",
            &format!("http://{ECHO_VIP}/echo.Echo/Say"),
        ],
    );
    assert_eq!(replies[0].status, 200, "{replies:?}");
    assert_eq!(
        replies[0].body, "served over HTTP/2.0",
        "the endpoint got HTTP/2: {replies:?}"
    );
    let log = m
        .waypoint
        .wait_for_log(
            |v| {
                log_str(v, "target") == Some("access")
                    && log_str(v, "path") == Some("/echo.Echo/Say")
            },
            WAIT,
        )
        .expect("waypoint access log");
    assert_eq!(log_str(&log, "dst.workload"), Some("default/v1"), "{log}");

    // A plain HTTP/1.1 request is sent as HTTP/1.1, which this endpoint refuses, until the port
    // declares its protocol (`appProtocol`, istiod's `Port.app_protocol`): then HTTP/2.
    let plain = format!("http://{ECHO_VIP}/plain");
    let replies = curl(&m.client, &[&plain]);
    assert_ne!(
        replies[0].status, 200,
        "HTTP/1.1 to an h2c-only server: {replies:?}"
    );
    let mut declared = services(&m.waypoint_pod.ipv4().to_string());
    declared[1]["ports"][0]["appProtocol"] = json!("http2");
    m.waypoint_config.extra.insert("services".into(), declared);
    m.waypoint.reload(&m.waypoint_config).expect("reload");
    let replies = curl(&m.client, &[&plain]);
    assert_eq!(replies[0].status, 200, "{replies:?}");
    assert_eq!(
        replies[0].body, "served over HTTP/2.0",
        "the declared protocol chose HTTP/2: {replies:?}"
    );
}

/// Who answers `path` through the echo service, 10 times (`""` for a failure).
fn answered_by(client: &Pod, path: &str) -> Vec<String> {
    let url = format!("http://{ECHO_VIP}{path}");
    let args: Vec<&str> = std::iter::repeat_n(["--next", url.as_str()], 10)
        .flatten()
        .skip(1)
        .collect();
    curl(client, &args)
        .into_iter()
        .map(|r| match r.status {
            200 => r.body.split(' ').next().unwrap_or_default().to_owned(),
            code => code.to_string(),
        })
        .collect()
}

/// Polls until every one of 10 requests to `path` is answered by `who` (a pod name or a status).
fn wait_answered_by(client: &Pod, path: &str, who: &str, when: &str) {
    let mut last = Vec::new();
    let done = poll(WAIT, || {
        last = answered_by(client, path);
        last.iter().all(|w| w == who).then_some(())
    });
    assert!(
        done.is_some(),
        "{when}: {path} answered by {last:?}, not all {who}"
    );
}

/// A fake API server in the waypoint's pod (plain HTTP is allowed to loopback only) with the
/// cluster the waypoint serves: `echo` using it, its `to-v2` route, its Gateway and the Service
/// in front of it (the Gateway's address).
fn echo_cluster(bed: &TestBed, pod: &Pod, wp: &mut AgentConfig) -> KubeApi {
    let a = KubeApi::start_in(&pod.netns_path()).expect("fake API server");
    a.set_namespace("default", json!({}));
    a.set_object(
        "services",
        "default/echo",
        kube_server::service(
            "echo",
            json!({"istio.io/use-waypoint": "waypoint"}),
            APP_PORT,
        ),
    );
    for s in ["echo-v1", "echo-v2"] {
        a.set_object(
            "services",
            &format!("default/{s}"),
            kube_server::service(s, json!({}), APP_PORT),
        );
    }
    a.set_object(
        "httproutes",
        "default/to-v2",
        kube_server::http_route("to-v2", "echo", &[("echo-v2", 1)], json!({})),
    );
    a.set_object(
        "gateways",
        "default/waypoint",
        kube_server::waypoint_gateway("waypoint"),
    );
    a.set_object(
        "services",
        "default/waypoint",
        kube_server::service("waypoint", json!({}), APP_PORT),
    );
    a.configure(bed, wp);
    a
}

#[test]
fn routes_and_policies_from_the_cluster_apply_live_with_status_and_others_are_ignored() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut api = None;
    let m = mesh_with(|bed, pod, wp| {
        let a = echo_cluster(bed, pod, wp);
        // A route for a Service that does not use this waypoint.
        a.set_object(
            "httproutes",
            "default/not-mine",
            kube_server::http_route("not-mine", "echo-v1", &[("echo-v2", 1)], json!({})),
        );
        api = Some(a);
    });
    let api = api.expect("API server started");
    let _v1 = m.v1.serve_http(APP_PORT).expect("v1 app");
    let _v2 = m.v2.serve_http(APP_PORT).expect("v2 app");

    // The route from the cluster applies, and its status says it was accepted by this waypoint.
    wait_answered_by(&m.client, "/", "v2", "the cluster's route");
    let status = api.object("httproutes", "default/to-v2").expect("route")["status"].clone();
    let parent = &status["parents"][0];
    assert_eq!(parent["controllerName"], "ambit.dev/waypoint", "{status:#}");
    assert_eq!(parent["parentRef"]["name"], "echo", "{status:#}");
    let conditions = parent["conditions"].as_array().expect("conditions");
    for (kind, reason) in [("Accepted", "Accepted"), ("ResolvedRefs", "ResolvedRefs")] {
        let c = conditions
            .iter()
            .find(|c| c["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} condition: {status:#}"));
        assert_eq!(
            (c["status"].as_str(), c["reason"].as_str()),
            (Some("True"), Some(reason))
        );
        assert!(c["lastTransitionTime"].is_string(), "{c}");
    }
    // Its Gateway names it for istiod: the Service's hostname, Programmed.
    let programmed = poll(WAIT, || {
        let g = api.object("gateways", "default/waypoint")?;
        (g["status"]["conditions"][1]["type"] == "Programmed").then_some(g["status"].clone())
    })
    .expect("the Gateway is programmed");
    assert_eq!(
        programmed["addresses"],
        json!([{"type": "Hostname", "value": "waypoint.default.svc.cluster.local"}]),
        "{programmed:#}"
    );
    assert_eq!(
        programmed["conditions"][1]["status"], "True",
        "{programmed:#}"
    );
    // The other route is left alone, and the log says why.
    assert!(
        api.object("httproutes", "default/not-mine").expect("route")["status"].is_null(),
        "no status written for a route that is not this waypoint's"
    );
    m.waypoint
        .wait_for_log(
            |v| {
                log_str(v, "object") == Some("HTTPRoute default/not-mine")
                    && log_message(v).is_some_and(|t| t.contains("Service default/echo-v1"))
            },
            WAIT,
        )
        .expect("the waypoint says it ignores the route");

    // Live: the route changes, then a DENY for /admin arrives.
    api.set_object(
        "httproutes",
        "default/to-v2",
        kube_server::http_route("to-v2", "echo", &[("echo-v1", 1)], json!({})),
    );
    wait_answered_by(&m.client, "/", "v1", "the route changed");
    api.set_object(
        "authorizationpolicies",
        "default/deny-admin",
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "deny-admin", "namespace": "default"},
               "spec": {"targetRefs": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                                        "name": "waypoint"}],
                        "action": "DENY",
                        "rules": [{"to": [{"operation": {"paths": ["/admin"]}}]}]}}),
    );
    wait_answered_by(&m.client, "/admin", "403", "the cluster's DENY");
    assert!(answered_by(&m.client, "/other").iter().all(|w| w == "v1"));

    // A route it cannot apply is refused alone, its status naming the field.
    api.set_object(
        "httproutes",
        "default/with-filter",
        kube_server::http_route(
            "with-filter",
            "echo",
            &[("echo-v2", 1)],
            json!({"filters": [{"type": "RequestHeaderModifier"}]}),
        ),
    );
    let refused = poll(WAIT, || {
        let o = api.object("httproutes", "default/with-filter")?;
        let c = o["status"]["parents"][0]["conditions"][0].clone();
        (c["type"] == "Accepted").then_some(c)
    })
    .expect("the refused route gets a status");
    assert_eq!(refused["status"], "False", "{refused}");
    assert_eq!(refused["reason"], "UnsupportedValue", "{refused}");
    let message = refused["message"].as_str().unwrap_or_default();
    assert!(message.contains("filters"), "{message}");
    assert!(
        answered_by(&m.client, "/").iter().all(|w| w == "v1"),
        "the good route still applies"
    );
}

#[test]
fn before_it_has_read_the_cluster_the_waypoint_refuses_with_503_and_is_not_ready() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut api = None;
    let m = mesh_with(|bed, pod, wp| {
        let a = echo_cluster(bed, pod, wp);
        // Unreachable from the start: the waypoint has no routes or policies to judge by.
        a.set_down(true);
        api = Some(a);
    });
    let api = api.expect("API server started");
    let _v1 = m.v1.serve_http(APP_PORT).expect("v1 app");
    let _v2 = m.v2.serve_http(APP_PORT).expect("v2 app");

    // Requests are refused, not sent on without the cluster's policies, and say why.
    let replies = curl(&m.client, &[&format!("http://{ECHO_VIP}/")]);
    assert_eq!(replies[0].status, 503, "{replies:?}");
    assert!(
        replies[0].body.contains("Kubernetes API"),
        "the 503 says what to check: {replies:?}"
    );
    let ready = |pod: &Pod| {
        pod.exec(&[
            "curl",
            "-sS",
            "--max-time",
            "5",
            "-w",
            "\n%{http_code}",
            "http://127.0.0.1:15020/healthz/ready",
        ])
        .expect("readiness")
    };
    let before = ready(&m.waypoint_pod);
    assert!(
        before.ends_with("\n503") && before.contains("Kubernetes API"),
        "not ready, with the reason: {before:?}"
    );
    m.waypoint
        .wait_for_log(|v| log_str(v, "flags") == Some("UH"), WAIT)
        .expect("the refusal is in the access log with UH");

    // The API server answers: the cluster's route applies and the waypoint is ready.
    api.set_down(false);
    wait_answered_by(&m.client, "/", "v2", "once the cluster was read");
    let after = ready(&m.waypoint_pod);
    assert!(after.ends_with("\n200"), "ready once synced: {after:?}");
}
