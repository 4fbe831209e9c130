//! `ambitctl` as an operator runs it, without root and without an agent: what it says when the
//! agent cannot be reached, its help and completions, and its output against a fake agent (a
//! few threads serving canned `ambit_agent::admin::api` bodies over HTTP/1.1 on a unix socket).

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ambit_agent::admin::api;
use serde_json::{Value, json};

const SUBCOMMANDS: &[&str] = &[
    "status",
    "workloads",
    "services",
    "policies",
    "certificates",
    "certs",
    "connections",
    "bpf",
    "config",
    "log-level",
    "explain",
    "completions",
];

fn ambitctl() -> Command {
    let bin = ambit_testbed::ambitctl_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let mut cmd = Command::new(bin);
    cmd.env_remove("AMBIT_SOCKET").env_remove("NO_COLOR");
    cmd
}

fn run(socket: &Path, args: &[&str]) -> Output {
    ambitctl()
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("run ambitctl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_exit(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "exit status\nstdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
}

/// A fresh directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ambitctl-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What the fake agent answers to one request.
struct Reply {
    status: u16,
    body: String,
    chunked: bool,
}

fn ok(body: impl serde::Serialize) -> Reply {
    Reply {
        status: 200,
        body: serde_json::to_string(&body).expect("serialize"),
        chunked: false,
    }
}

fn api_error(status: u16, message: &str) -> Reply {
    Reply {
        status,
        body: serde_json::to_string(&api::ApiError {
            error: message.into(),
        })
        .expect("serialize"),
        chunked: true,
    }
}

/// An HTTP/1.1 server on a unix socket that answers from `routes(method, target)` and records
/// each request line.
struct FakeAgent {
    _dir: TempDir,
    socket: PathBuf,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeAgent {
    fn start(routes: fn(&str, &str) -> Reply) -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("admin.sock");
        let listener = UnixListener::bind(&socket).expect("bind fake agent socket");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        // Serves until the test process exits.
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let seen = seen.clone();
                std::thread::spawn(move || serve(stream, routes, &seen));
            }
        });
        Self {
            _dir: dir,
            socket,
            requests,
        }
    }

    fn run(&self, args: &[&str]) -> Output {
        run(&self.socket, args)
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().expect("lock").clone()
    }
}

fn serve(stream: UnixStream, routes: fn(&str, &str) -> Reply, seen: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(&stream);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    // The rest of the head; requests carry no body.
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => {}
        }
    }
    let request_line = request_line.trim_end().to_owned();
    seen.lock().expect("lock").push(request_line.clone());
    let mut parts = request_line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let reply = routes(method, target);
    let mut response = format!(
        "HTTP/1.1 {} X\r\nContent-Type: application/json\r\nConnection: close\r\n",
        reply.status
    );
    if reply.chunked {
        // Two chunks, to exercise the client's decoding.
        let (a, b) = reply.body.split_at(reply.body.len() / 2);
        response.push_str(&format!(
            "Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
            a.len(),
            b.len()
        ));
    } else {
        response.push_str(&format!(
            "Content-Length: {}\r\n\r\n{}",
            reply.body.len(),
            reply.body
        ));
    }
    let _ = (&stream).write_all(response.as_bytes());
}

fn workload(ns: &str, name: &str, ip: &str, local: bool, enrolled: bool) -> api::WorkloadView {
    api::WorkloadView {
        uid: format!("config//Pod/{ns}/{name}"),
        namespace: ns.into(),
        name: name.into(),
        node: if local { "node-a" } else { "node-b" }.into(),
        identity: format!("spiffe://cluster.local/ns/{ns}/sa/{name}"),
        ips: vec![ip.into()],
        hbone: true,
        local,
        enrolled,
        healthy: true,
        services: vec![],
        policies: vec![],
        source: "config".into(),
        waypoint: None,
        canonical_name: name.split('-').next().unwrap_or(name).into(),
        canonical_revision: if local { "v1" } else { "" }.into(),
        cluster: "Kubernetes".into(),
        network: String::new(),
        locality: if local { "eu/eu-1a" } else { "" }.into(),
        xds_uid: None,
    }
}

fn explain(verdict: &str) -> api::Explain {
    let allowed = verdict == "allow";
    api::Explain {
        src: "default/client".into(),
        src_ip: Some("10.1.0.2".into()),
        src_identity: Some("spiffe://cluster.local/ns/default/sa/client".into()),
        dst: "10.1.0.3:8080".into(),
        captured: true,
        service: None,
        endpoint: None,
        dst_workload: Some("default/server".into()),
        dst_identity: Some("spiffe://cluster.local/ns/default/sa/server".into()),
        path: "hbone".into(),
        authorization: Some(api::ExplainAuthz {
            allowed,
            policy: Some("default/deny-client".into()).filter(|_| !allowed),
            rule: Some(0).filter(|_| !allowed),
            reason: if allowed {
                "no ALLOW policy applies".into()
            } else {
                "denied by default/deny-client rule 0".into()
            },
            dry_run: vec![],
        }),
        verdict: verdict.into(),
        steps: vec![
            "default/client is an enrolled local pod: captured".into(),
            "10.1.0.3 is workload default/server (HBONE)".into(),
        ],
    }
}

fn routes(method: &str, target: &str) -> Reply {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/status") => ok(api::Status {
            version: "0.1.0".into(),
            node: "node-a".into(),
            pid: 42,
            uptime_seconds: 3725,
            ready: false,
            not_ready: vec![
                "no certificate yet for spiffe://cluster.local/ns/default/sa/web".into(),
            ],
            config_file: "/etc/ambit/config.yaml".into(),
            config_refused: Some(
                "nodeAddresses cannot change while the agent runs; restart the agent to change \
                 it, or put the old value back"
                    .into(),
            ),
            trust_domain: "cluster.local".into(),
            enrolled_pods: 1,
            adopted_pods: vec!["default/web".into()],
            held_netns: vec![4242],
            waiting_for: Some("kubernetes".into()),
            failed_pods: vec![api::FailedPod {
                pod: "default/broken".into(),
                error: "network namespace not found".into(),
            }],
            workloads: 2,
            services: 1,
            policies: 0,
            connections: 1,
            ca: api::CaStatus {
                kind: "builtin".into(),
                location: "/var/lib/ambit/ca".into(),
                certificates_ready: 0,
                certificates_total: 1,
            },
            xds: Some(api::XdsView {
                address: "https://istiod.istio-system.svc:15012".into(),
                connected: false,
                ready: false,
                streams: 3,
                pushes: 7,
                nacks: 1,
                rejected: [("address".to_owned(), 1)].into(),
                last_rejected: vec!["workload default/odd: addresses[0] is 5 bytes".into()],
                last_push: Some("2020-01-01T00:00:00Z".into()),
                last_error: Some("connection refused".into()),
                addresses: 12,
                policies: 2,
            }),
        }),
        ("GET", "/workloads") => {
            let mut list = vec![workload("default", "web-0", "10.1.0.3", true, true)];
            if query != "local=true" {
                list.push(workload("shop", "cart-7d9f", "10.2.0.4", false, false));
            }
            ok(list)
        }
        ("GET", "/services") => ok(vec![api::ServiceView {
            key: "default/web.default.svc.cluster.local".into(),
            namespace: "default".into(),
            hostname: "web.default.svc.cluster.local".into(),
            vips: vec!["10.96.0.10".into()],
            ports: vec![api::ServicePortView {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec![
                api::EndpointView {
                    workload: "default/web-0".into(),
                    ips: vec!["10.1.0.3".into()],
                    healthy: true,
                },
                api::EndpointView {
                    workload: "default/web-1".into(),
                    ips: vec!["10.1.0.4".into()],
                    healthy: false,
                },
            ],
            source: "config".into(),
            waypoint: None,
        }]),
        ("GET", "/certificates") => ok(vec![api::CertView {
            identity: "spiffe://cluster.local/ns/default/sa/web".into(),
            state: "failing".into(),
            serial: None,
            not_after: None,
            expires_in_seconds: None,
            next_rotation: None,
            last_error: Some("CA unreachable".into()),
            fetches: 4,
        }]),
        ("GET", "/connections") => ok(vec![api::ConnectionView {
            id: 17,
            direction: "outbound".into(),
            path: "hbone".into(),
            src: "10.1.0.2:40000".into(),
            dst: "10.1.0.3:8080".into(),
            src_workload: Some("default/client".into()),
            dst_workload: Some("default/web-0".into()),
            src_identity: Some("spiffe://cluster.local/ns/default/sa/client".into()),
            dst_identity: Some("spiffe://cluster.local/ns/default/sa/web".into()),
            service: None,
            bytes_sent: 1536,
            bytes_received: 3 * 1024 * 1024,
            age_seconds: 75.5,
        }]),
        ("GET", "/bpf") => ok(api::BpfView {
            pin_path: "/sys/fs/bpf/ambit/node-a".into(),
            cgroup: "/sys/fs/cgroup".into(),
            programs: vec![
                api::BpfProgramView {
                    name: "connect4".into(),
                    kind: "cgroup/connect4".into(),
                    attached_to: vec!["/sys/fs/cgroup".into()],
                },
                api::BpfProgramView {
                    name: "getpeername6".into(),
                    kind: "cgroup/getpeername6".into(),
                    attached_to: vec![],
                },
            ],
            enrolled: vec![api::BpfEnrolledView {
                netns_cookie: 4099,
                pod: None,
                ips: vec![],
            }],
            maps: vec![api::BpfMapView {
                name: "AMBIT_ORIG_DST".into(),
                max_entries: 1000,
                entries: Some(990),
            }],
            counters: [("inbound_dropped_no_listener".to_owned(), 3)].into(),
            splice: Some("unavailable: eBPF program ambit_splice: not supported".into()),
        }),
        ("GET", "/config") => ok(json!({"node": "node-a", "xds": null})),
        ("GET", "/logging") => ok(api::LogLevel {
            level: "info".into(),
        }),
        ("PUT", "/logging") => ok(api::LogLevel {
            level: "info,ambit_agent::xds=debug".into(),
        }),
        ("GET", "/explain") if query.contains("default%2Fdenied") => ok(explain("deny")),
        ("GET", "/explain") => ok(explain("allow")),
        ("GET", "/policies") => api_error(500, "policy store is being rebuilt"),
        _ => api_error(404, &format!("no such endpoint {path}")),
    }
}

#[test]
fn no_agent_at_the_socket_says_what_to_check_and_exits_3() {
    let dir = TempDir::new();
    let socket = dir.0.join("admin.sock");
    let out = run(&socket, &["status"]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    for needle in [
        "no admin socket at",
        "not running on this node",
        "systemctl",
        "kubectl -n ambit-system get pods",
        "adminSocket",
        "--socket",
    ] {
        assert!(err.contains(needle), "{needle:?} missing in:\n{err}");
    }
    assert!(stdout(&out).is_empty());
}

#[test]
fn socket_in_a_missing_directory_names_the_directory() {
    let out = run(
        Path::new("/nonexistent-ambit-dir/admin.sock"),
        &["workloads"],
    );
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("directory /nonexistent-ambit-dir does not exist"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_socket_comes_from_ambit_socket_by_default() {
    let dir = TempDir::new();
    let socket = dir.0.join("from-env.sock");
    let out = ambitctl()
        .env("AMBIT_SOCKET", &socket)
        .arg("status")
        .output()
        .expect("run ambitctl");
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains(&*socket.to_string_lossy()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_stale_socket_is_reported_as_nothing_listening() {
    let dir = TempDir::new();
    let socket = dir.0.join("admin.sock");
    drop(UnixListener::bind(&socket).expect("bind"));
    let out = run(&socket, &["status"]);
    assert_exit(&out, 3);
    let err = stderr(&out);
    assert!(err.contains("nothing listens on"), "{err}");
    assert!(err.contains("bpf --offline"), "{err}");

    let file = dir.0.join("not-a-socket");
    std::fs::write(&file, "").expect("write");
    let out = run(&file, &["status"]);
    assert_exit(&out, 3);
    assert!(
        stderr(&out).contains("is not a unix socket"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_non_http_peer_is_an_unexpected_answer() {
    let dir = TempDir::new();
    let socket = dir.0.join("admin.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let _ = (&s).write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    let out = run(&socket, &["status"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("not an HTTP/1.x response"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn every_subcommand_has_help_with_examples() {
    let out = ambitctl().arg("--help").output().expect("run");
    assert_exit(&out, 0);
    let help = stdout(&out);
    for needle in [
        "Exit codes:",
        "  0  ",
        "  1  ",
        "  2  ",
        "  3  ",
        "  4  ",
        "AMBIT_SOCKET",
    ] {
        assert!(
            help.contains(needle),
            "{needle:?} missing in --help:\n{help}"
        );
    }
    for sub in SUBCOMMANDS {
        let out = ambitctl().args([sub, "--help"]).output().expect("run");
        assert_exit(&out, 0);
        let help = stdout(&out);
        assert!(help.contains("Examples:"), "{sub} --help:\n{help}");
        let example = format!("ambitctl {sub}");
        assert!(
            help.contains(&example) || *sub == "certs",
            "{sub} --help:\n{help}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["no-such-command"][..],
        &["explain", "10.1.0.3:8080"],
        &["explain", "--from", "default/client", "10.1.0.3"],
        &["connections", "--interval", "5"],
        &["-o", "xml", "status"],
    ] {
        let out = ambitctl().args(args).output().expect("run");
        assert_exit(&out, 2);
    }
    let out = ambitctl()
        .args(["explain", "--from", "x", "nope"])
        .output()
        .expect("run");
    assert!(
        stderr(&out).contains("expected IP:PORT"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn completions_print_a_script() {
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef ambitctl"),
        ("fish", "complete -c ambitctl"),
    ] {
        let out = ambitctl()
            .args(["completions", shell])
            .output()
            .expect("run");
        assert_exit(&out, 0);
        let script = stdout(&out);
        assert!(script.contains(needle), "{shell}: {needle:?} missing");
        assert!(
            script.contains("workloads") && script.contains("explain"),
            "{shell}"
        );
    }
}

/// `value` starts in the same column as `header` in the nearest header line above the row
/// holding `value`: the table is aligned. (Several tables may follow each other.)
#[track_caller]
fn assert_column(text: &str, header: &str, value: &str) {
    let lines: Vec<&str> = text.lines().collect();
    let row = (1..lines.len())
        .find(|&i| lines[i].contains(value))
        .unwrap_or_else(|| panic!("{value} not in:\n{text}"));
    // Padded, so that `NAME` does not match inside `NAMESPACE`.
    let header = format!(" {header} ");
    let col = lines[..row]
        .iter()
        .rev()
        .find_map(|l| format!(" {l} ").find(&header))
        .unwrap_or_else(|| panic!("no {header:?} above {value}:\n{text}"));
    assert_eq!(
        lines[row].find(value),
        Some(col),
        "{value} under {header:?}:\n{text}"
    );
}

#[test]
fn workloads_table_and_structured_output() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["workloads"]);
    assert_exit(&out, 0);
    let table = stdout(&out);
    assert!(
        !table.contains('\x1b'),
        "no colour when not a terminal:\n{table}"
    );
    assert!(table.starts_with("NAMESPACE"), "{table}");
    for (header, value) in [
        ("NAME", "cart-7d9f"),
        ("IPS", "10.2.0.4"),
        ("IDENTITY", "shop/cart-7d9f"),
        ("NODE", "node-b"),
        ("SOURCE", "config"),
        ("CANONICAL", "web:v1"),
        ("CLUSTER", "Kubernetes"),
        ("LOCALITY", "eu/eu-1a"),
    ] {
        assert_column(&table, header, value);
    }
    assert!(
        !table.contains("spiffe://"),
        "identities are shortened:\n{table}"
    );

    let out = agent.run(&["workloads", "--local", "-o", "json"]);
    assert_exit(&out, 0);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_eq!(json[0]["uid"], "config//Pod/default/web-0");
    assert_eq!(
        json[0]["identity"],
        "spiffe://cluster.local/ns/default/sa/web-0"
    );

    let out = agent.run(&["-o", "yaml", "workloads"]);
    assert_exit(&out, 0);
    let yaml = stdout(&out);
    assert!(yaml.contains("uid: config//Pod/shop/cart-7d9f"), "{yaml}");

    assert_eq!(
        agent.requests(),
        [
            "GET /workloads HTTP/1.1",
            "GET /workloads?local=true HTTP/1.1",
            "GET /workloads HTTP/1.1"
        ]
    );
}

#[test]
fn status_shows_what_is_wrong() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["status"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    for needle in [
        "node-a",
        "1h02m",
        "NO",
        "no certificate yet for spiffe://cluster.local/ns/default/sa/web",
        "DISCONNECTED",
        "NACKs 1 (1 resources rejected: 1 address)",
        "- workload default/odd: addresses[0] is 5 bytes",
        "ago (2020-01-01T00:00:00Z)",
        "last error: connection refused",
        "0/1 certificates ready",
        "1 FAILED",
        "default/broken: network namespace not found",
        "waiting for the kubernetes source to sync",
        "served as the earlier agent left them: default/web",
        "1 netns captured without a record (connections refused): cookies 4242",
        "last change refused: nodeAddresses cannot change while the agent runs",
        "the previous config stays in force",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
}

#[test]
fn services_certificates_and_connections_tables() {
    let agent = FakeAgent::start(routes);
    let services = stdout(&agent.run(&["services"]));
    assert_column(&services, "PORTS", "80->8080");
    assert_column(&services, "ENDPOINTS", "1/2");

    let out = agent.run(&["certs"]);
    assert_exit(&out, 0);
    let certs = stdout(&out);
    assert_column(&certs, "STATE", "failing");
    assert_column(&certs, "LAST-ERROR", "CA unreachable");

    let connections = stdout(&agent.run(&["connections"]));
    assert_column(&connections, "DIR", "out");
    assert_column(&connections, "SRC-IDENTITY", "default/client");
    assert_column(&connections, "SENT", "1.5 KiB");
    assert_column(&connections, "RECEIVED", "3.0 MiB");
    assert_column(&connections, "AGE", "1m15s");
}

#[test]
fn an_agent_error_is_printed_and_exits_1() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["policies"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("500: policy store is being rebuilt"),
        "{}",
        stderr(&out)
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn config_is_json_by_default_and_yaml_on_request() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["config"]);
    assert_exit(&out, 0);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["node"], "node-a");
    let yaml = stdout(&agent.run(&["config", "-o", "yaml"]));
    assert!(yaml.contains("node: node-a"), "{yaml}");
}

#[test]
fn log_level_shows_and_sets() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["log-level"]);
    assert_exit(&out, 0);
    assert_eq!(stdout(&out), "info\n");
    let out = agent.run(&["log-level", "info,ambit_agent::xds=debug"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("info,ambit_agent::xds=debug"));
    assert_eq!(
        agent.requests()[1],
        "PUT /logging?level=info%2Cambit_agent%3A%3Axds%3Ddebug HTTP/1.1"
    );
}

#[test]
fn explain_prints_steps_and_verdict_and_exits_4_on_deny() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&[
        "explain",
        "--from",
        "spiffe://cluster.local/ns/default/sa/client",
        "10.1.0.3:8080",
    ]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert!(
        text.contains("1. default/client is an enrolled local pod"),
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("Verdict: ALLOW")),
        "{text}"
    );
    assert_eq!(
        agent.requests()[0],
        "GET /explain?src=spiffe%3A%2F%2Fcluster.local%2Fns%2Fdefault%2Fsa%2Fclient\
         &dst=10.1.0.3%3A8080 HTTP/1.1"
    );

    let out = agent.run(&["explain", "--from", "default/denied", "[fd00:1::3]:8080"]);
    assert_exit(&out, 4);
    let text = stdout(&out);
    assert!(text.contains("Verdict: DENY"), "{text}");
    assert!(
        text.contains("denied by default/deny-client rule 0"),
        "{text}"
    );
    assert!(
        agent.requests()[1].contains("&dst=%5Bfd00%3A1%3A%3A3%5D%3A8080 "),
        "{:?}",
        agent.requests()
    );

    // The exit code does not depend on the output format.
    let out = agent.run(&[
        "explain",
        "--from",
        "default/denied",
        "10.1.0.3:8080",
        "-o",
        "json",
    ]);
    assert_exit(&out, 4);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["verdict"], "deny");
}

#[test]
fn connections_watch_separates_refreshes_when_not_a_terminal() {
    let agent = FakeAgent::start(routes);
    let mut child = ambitctl()
        .arg("--socket")
        .arg(&agent.socket)
        .args(["connections", "--watch", "--interval", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().expect("kill");
    let out = child.wait_with_output().expect("wait");
    let text = stdout(&out);
    assert!(
        !text.contains('\x1b'),
        "no screen clearing when not a terminal"
    );
    let frames = text.matches("ID  DIR").count();
    assert!(frames >= 2, "at least two refreshes in 2.5 s:\n{text}");
    assert_eq!(
        text.lines().filter(|l| *l == "---").count(),
        frames - 1,
        "{text}"
    );
}

#[test]
fn bpf_from_the_agent_and_offline() {
    let agent = FakeAgent::start(routes);
    let out = agent.run(&["bpf"]);
    assert_exit(&out, 0);
    let text = stdout(&out);
    assert_column(&text, "ATTACHED-TO", "NOT ATTACHED");
    assert_column(&text, "POD", "(no pod: stale)");
    assert_column(&text, "FILL", "99%");
    assert_column(&text, "VALUE", "3");
    assert!(
        text.contains("Same-node splice") && text.contains("unavailable: eBPF program"),
        "{text}"
    );

    // Offline reads bpffs, not the socket: a missing pin directory is an error (exit 1) that
    // names it, with no request to the agent.
    let out = agent.run(&["bpf", "--pin-path", "/nonexistent-ambit-pins", "-o", "json"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains("/nonexistent-ambit-pins"),
        "{}",
        stderr(&out)
    );
    assert_eq!(agent.requests(), ["GET /bpf HTTP/1.1"]);
}
