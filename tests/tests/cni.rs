//! `ambit-cni` run exactly as a container runtime runs a CNI network config list: chained after
//! Debian's reference plugins (`bridge` with `host-local` IPAM, from `containernetworking-plugins`
//! in /usr/lib/cni), each plugin executed in the node's network namespace with `CNI_*` in its
//! environment and its derived config (with `prevResult`) on stdin, the last ADD result kept for
//! CHECK and DEL, and DEL run in reverse order, also after a failed ADD.
//!
//! The bridge (`cni0`) lives in a test bed node's netns, never on the host; host-local keeps its
//! leases in the bed's temp dir.

use std::{
    io::Write,
    net::{IpAddr, SocketAddr},
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use ambit_agent::admin::api::CniState;
use ambit_testbed::{Agent, MeshSpec, Node, Pod, TestBed, log_str};
use serde_json::{Value, json};

/// Where Debian's `containernetworking-plugins` installs the reference plugins.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const PORT: u16 = 8080;
const WAIT: Duration = Duration::from_secs(10);

/// The `ambit-cni` binary: `$AMBIT_CNI_BIN`, else next to the test's target dir (built by
/// `cargo build -p ambit-agent --bins`, which `cargo xtask test` does).
fn ambit_cni_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("AMBIT_CNI_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    for candidate in [dir.join("../ambit-cni"), dir.join("ambit-cni")] {
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "ambit-cni binary not found next to {} (set AMBIT_CNI_BIN to use another); run \
         `cargo build -p ambit-agent --bins` or `cargo xtask test` first",
        dir.display()
    );
}

/// Runs `ambit-cni` directly (no netns needed) with `env` and `stdin`.
fn run_plugin_directly(env: &[(&str, &str)], stdin: &str) -> Output {
    let mut cmd = Command::new(ambit_cni_bin());
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CNI_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run ambit-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait for ambit-cni")
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}): {:?}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn version_prints_the_supported_versions() {
    // Needs no privileges: VERSION touches nothing.
    let out = run_plugin_directly(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"1.0.0"}"#);
    assert!(out.status.success(), "{out:?}");
    let v = stdout_json(&out);
    assert_eq!(
        v["cniVersion"], "1.0.0",
        "answers in the version asked: {v}"
    );
    let supported: Vec<&str> = v["supportedVersions"]
        .as_array()
        .expect("supportedVersions is a list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for version in ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"] {
        assert!(supported.contains(&version), "{version} missing in {v}");
    }
    // A runtime that sends nothing still gets an answer.
    let out = run_plugin_directly(&[("CNI_COMMAND", "VERSION")], "");
    assert!(out.status.success(), "{out:?}");
    assert!(stdout_json(&out)["supportedVersions"].is_array());
}

#[test]
fn bad_env_and_stdin_get_the_specs_error_object() {
    // Needs no privileges: every case fails before anything is touched.
    let conf = r#"{"cniVersion":"1.0.0","name":"net","type":"ambit-cni","prevResult":{"cniVersion":"1.0.0","ips":[]}}"#;
    let add = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "c1"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];
    let pod = [
        add[0],
        add[1],
        add[2],
        add[3],
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web"),
    ];
    let no_prev_result = r#"{"cniVersion":"1.0.0","name":"net","type":"ambit-cni"}"#;
    // (environment, stdin, the spec's error code)
    let cases = [
        // No CNI_COMMAND, an unknown one, ADD without CNI_NETNS and CNI_IFNAME: invalid env.
        (&[][..], conf, 4),
        (&[("CNI_COMMAND", "FROB")][..], conf, 4),
        (&add[..2], conf, 4),
        // Stdin cut short: decoding failure.
        (&add[..], "{\"cniVersion\": ", 6),
        // A version without chaining: incompatible.
        (
            &add[..],
            r#"{"cniVersion":"0.2.0","name":"net","type":"ambit-cni"}"#,
            1,
        ),
        // Not chained: invalid network config.
        (&pod[..], no_prev_result, 7),
    ];
    for (env, stdin, code) in cases {
        let out = run_plugin_directly(env, stdin);
        assert!(!out.status.success(), "{env:?} must fail: {out:?}");
        let e = stdout_json(&out);
        assert_eq!(e["code"], code, "{env:?} {stdin}: {e}");
        assert!(
            e["msg"].as_str().is_some_and(|m| !m.is_empty()) && e["details"].is_string(),
            "{e}"
        );
        assert!(e["cniVersion"].is_string(), "{e}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

/// One attachment, as the runtime identifies it.
#[derive(Clone, Debug)]
struct Attachment {
    container_id: String,
    netns: PathBuf,
    namespace: String,
    name: String,
}

impl Attachment {
    fn new(netns: PathBuf, namespace: &str, name: &str) -> Attachment {
        static N: AtomicU32 = AtomicU32::new(0);
        let container_id = format!(
            "{:016x}{:08x}{:08x}",
            random_u64(),
            N.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        Attachment {
            container_id,
            netns,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// `CNI_ARGS` as the kubelet's runtimes (containerd, CRI-O) pass them.
    fn cni_args(&self) -> String {
        format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID=uid-{}",
            self.namespace, self.name, self.container_id, self.name
        )
    }
}

fn random_u64() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    // A multiplicative hash: every bit of the clock reaches the leading hex digits, which the
    // plugin's log shows.
    ((nanos as u64) ^ u64::from(std::process::id())).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// What a failed plugin left.
#[derive(Debug)]
struct Failed {
    plugin: String,
    status: ExitStatus,
    /// Its stdout: the spec's error object.
    error: Value,
    stderr: String,
}

/// A container runtime with one network config list, executing plugins in `node`'s netns.
struct Runtime {
    node: Node,
    /// `CNI_PATH`: the reference plugins, then a directory with `ambit-cni`.
    cni_path: String,
    conflist: Value,
}

impl Runtime {
    /// `bridge` (`cni0`, gateway) + `host-local` (`subnet`, default route, leases under `dir`),
    /// then `ambit-cni` with `ambit`'s fields.
    fn new(node: &Node, dir: &Path, subnet: &str, ambit: Value) -> Runtime {
        assert!(
            Path::new(REFERENCE_PLUGINS).join("bridge").is_file()
                && Path::new(REFERENCE_PLUGINS).join("host-local").is_file(),
            "the CNI reference plugins are missing in {REFERENCE_PLUGINS}: install Debian's \
             containernetworking-plugins (`apt-get install containernetworking-plugins`, or \
             `cargo xtask setup`)"
        );
        let bin_dir = dir.join("bin");
        std::fs::create_dir_all(&bin_dir).expect("plugin dir");
        let link = bin_dir.join("ambit-cni");
        if !link.exists() {
            symlink(ambit_cni_bin(), &link).expect("link ambit-cni into the plugin dir");
        }
        let mut ambit_conf = json!({"type": "ambit-cni"});
        if let (Some(conf), Some(fields)) = (ambit_conf.as_object_mut(), ambit.as_object()) {
            conf.extend(fields.clone());
        }
        let conflist = json!({
            "cniVersion": "1.0.0",
            "name": "ambit-test",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": dir.join("ipam"),
                        "ranges": [[{"subnet": subnet}]],
                        "routes": [{"dst": "0.0.0.0/0"}]
                    }
                },
                ambit_conf
            ]
        });
        Runtime {
            node: node.clone(),
            cni_path: format!("{REFERENCE_PLUGINS}:{}", bin_dir.display()),
            conflist,
        }
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The executable for `type`, looked up in `CNI_PATH` as a runtime does.
    fn find(&self, plugin_type: &str) -> PathBuf {
        self.cni_path
            .split(':')
            .map(|d| Path::new(d).join(plugin_type))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("plugin {plugin_type} not found in {}", self.cni_path))
    }

    /// Executes one plugin: the derived config on stdin (the list's `cniVersion` and `name`,
    /// and `prevResult`), `CNI_*` in the environment, in the node's netns.
    fn exec(
        &self,
        plugin: &Value,
        command: &str,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Option<Value>, Failed> {
        let plugin_type = plugin["type"].as_str().unwrap_or_default().to_owned();
        let mut conf = plugin.clone();
        conf["cniVersion"] = self.conflist["cniVersion"].clone();
        conf["name"] = self.conflist["name"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let mut cmd = self.node.command(self.find(&plugin_type));
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_ARGS", att.cni_args())
            .env("CNI_PATH", &self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run plugin {plugin_type}: {e}"));
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(conf.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("cannot write {plugin_type}'s stdin: {e}"));
        }
        let out = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("plugin {plugin_type} did not finish: {e}"));
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let parsed = (!stdout.is_empty()).then(|| {
            serde_json::from_str::<Value>(&stdout).unwrap_or_else(|e| {
                panic!("{plugin_type} {command} printed no JSON ({e}): {stdout:?}")
            })
        });
        if out.status.success() {
            return Ok(parsed);
        }
        Err(Failed {
            plugin: plugin_type,
            status: out.status,
            error: parsed.unwrap_or(Value::Null),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    /// ADD through the list; returns every plugin's result in order (the last is the
    /// attachment's result).
    fn add(&self, att: &Attachment) -> Result<Vec<Value>, Failed> {
        let mut results: Vec<Value> = Vec::new();
        for plugin in self.plugins() {
            let result = self
                .exec(&plugin, "ADD", att, results.last())?
                .unwrap_or_else(|| panic!("{} ADD printed no result", plugin["type"]));
            results.push(result);
        }
        Ok(results)
    }

    /// CHECK through the list, with the ADD result.
    fn check(&self, att: &Attachment, result: &Value) -> Result<(), Failed> {
        for plugin in self.plugins() {
            self.exec(&plugin, "CHECK", att, Some(result))?;
        }
        Ok(())
    }

    /// DEL through the list in reverse, with the ADD result when there is one.
    fn del(&self, att: &Attachment, result: Option<&Value>) -> Result<(), Failed> {
        for plugin in self.plugins().iter().rev() {
            self.exec(plugin, "DEL", att, result)?;
        }
        Ok(())
    }
}

/// The pod's IPv4 address in an ADD result.
fn result_ipv4(result: &Value) -> IpAddr {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str()?.split('/').next()?.parse().ok())
        .find(IpAddr::is_ipv4)
        .unwrap_or_else(|| panic!("no IPv4 address in {result}"))
}

/// A network namespace of this test (`ab-<bed id>-cni-<name>`, so the bed's stale cleanup
/// recognises it), deleted when dropped.
struct ScratchNetns {
    name: String,
}

impl ScratchNetns {
    fn new(bed: &TestBed, name: &str) -> ScratchNetns {
        let name = format!("ab-{}-cni-{name}", bed.id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(out.status.success(), "ip netns add {name}: {out:?}");
        ScratchNetns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    fn delete(&self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

impl Drop for ScratchNetns {
    fn drop(&mut self) {
        if self.path().exists() {
            self.delete();
        }
    }
}

fn write_state(path: &Path, namespaces: &[&str], socket: &Path) {
    let state = CniState {
        ambient_namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
        socket: socket.display().to_string(),
    };
    std::fs::write(path, serde_json::to_vec(&state).expect("json")).expect("write state file");
}

#[test]
fn without_the_agent_a_mesh_pod_fails_with_try_again_and_others_start() {
    if !ambit_testbed::privileged() {
        return;
    }
    let bed = TestBed::new().expect("create bed");
    let node = bed.add_node("node-a").expect("add node");
    let dir = bed.tmp_dir().join("cni");
    let socket = dir.join("admin.sock");
    let state = dir.join("cni-state.json");
    std::fs::create_dir_all(&dir).expect("cni dir");
    write_state(&state, &["default"], &socket);
    let runtime = Runtime::new(
        &node,
        &dir,
        "10.1.128.0/24",
        json!({"agentSocket": socket, "stateFile": state, "timeoutSeconds": 10, "logFile": dir.join("ambit-cni.log")}),
    );

    // A pod of a namespace the mesh does not know starts, with the bridge's result unchanged.
    let other_ns = ScratchNetns::new(&bed, "other");
    let other = Attachment::new(other_ns.path(), "other", "web");
    let other_results = runtime
        .add(&other)
        .unwrap_or_else(|f| panic!("ADD of a pod outside the mesh must succeed: {f:#?}"));
    assert_eq!(
        other_results[1], other_results[0],
        "ambit-cni prints prevResult unchanged"
    );
    let ip = result_ipv4(&other_results[1]);
    let addrs = Command::new("ip")
        .args(["-n", &other_ns.name, "-o", "addr", "show", "dev", "eth0"])
        .output()
        .expect("ip addr");
    assert!(
        String::from_utf8_lossy(&addrs.stdout).contains(&format!("inet {ip}/24")),
        "the pod got its IP from host-local: {addrs:?}"
    );

    // A pod of a namespace in the mesh must not start uncaptured: try again later.
    let mesh_ns = ScratchNetns::new(&bed, "mesh");
    let mesh = Attachment::new(mesh_ns.path(), "default", "web");
    let failed = runtime
        .add(&mesh)
        .expect_err("ADD of a mesh pod without agent fails");
    assert_eq!(failed.plugin, "ambit-cni", "{failed:#?}");
    assert!(!failed.status.success());
    assert_eq!(failed.error["code"], 11, "{failed:#?}");
    assert_eq!(failed.error["cniVersion"], "1.0.0", "{failed:#?}");
    assert!(
        failed.error["msg"]
            .as_str()
            .is_some_and(|m| m.contains("default/web")),
        "{failed:#?}"
    );
    assert!(
        failed.error["details"]
            .as_str()
            .is_some_and(|d| d.contains("no admin socket") && d.contains("default")),
        "{failed:#?}"
    );
    assert!(
        failed.stderr.contains("ambit-cni: ADD default/web"),
        "the log on stderr names the pod: {failed:#?}"
    );
    // The runtime cleans up a failed ADD with DEL: it succeeds without the agent.
    runtime
        .del(&mesh, None)
        .unwrap_or_else(|f| panic!("DEL after a failed ADD: {f:#?}"));

    // Without a state file (a node rebooted before its agent is back, a lost file) nothing is
    // known, so every pod waits for the agent, in the mesh's namespaces or not.
    std::fs::remove_file(&state).expect("remove state file");
    let stranger_ns = ScratchNetns::new(&bed, "stranger");
    let stranger = Attachment::new(stranger_ns.path(), "other", "stranger");
    for att in [&mesh, &stranger] {
        let failed = runtime
            .add(att)
            .expect_err("ADD with no state file and no agent fails");
        assert_eq!(failed.error["code"], 11, "{failed:#?}");
        assert!(
            failed.error["details"]
                .as_str()
                .is_some_and(|d| d.contains("no state file")),
            "{failed:#?}"
        );
        runtime.del(att, None).expect("DEL after a failed ADD");
    }

    // The state `ambit-agent cleanup` leaves (no namespace in the mesh): pods start.
    write_state(&state, &[], &socket);
    let results = runtime
        .add(&mesh)
        .unwrap_or_else(|f| panic!("ADD with the mesh released must succeed: {f:#?}"));
    runtime
        .check(&mesh, &results[1])
        .unwrap_or_else(|f| panic!("CHECK with the mesh released: {f:#?}"));
    runtime.del(&mesh, Some(&results[1])).expect("DEL");
    runtime
        .del(&mesh, Some(&results[1]))
        .expect("DEL is idempotent");

    // DEL never fails because the netns is gone (the pod was torn down first).
    other_ns.delete();
    runtime
        .del(&other, Some(&other_results[1]))
        .unwrap_or_else(|f| panic!("DEL with the netns gone: {f:#?}"));

    let log = std::fs::read_to_string(dir.join("ambit-cni.log")).expect("logFile written");
    assert!(log.contains("ADD default/web"), "{log}");
}

/// The node's eBPF counter of redirected outbound connections.
fn redirected(node: &Node) -> u64 {
    let bin = ambit_testbed::ambitctl_bin().expect("locate ambitctl");
    let out = Command::new(&bin)
        .args(["bpf", "-o", "json", "--pin-path"])
        .arg(node.bpf_pin_path())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()));
    assert!(out.status.success(), "ambitctl bpf: {out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("ambitctl bpf -o json");
    v["counters"]["connect4_redirected"]
        .as_u64()
        .unwrap_or_else(|| panic!("connect4_redirected missing in {v}"))
}

fn enrolled_pods(agent: &Agent) -> u64 {
    let status = agent.ambitctl_json(&["status"]).expect("ambitctl status");
    status["enrolledPods"]
        .as_u64()
        .unwrap_or_else(|| panic!("enrolledPods missing in {status}"))
}

/// A bed pod (its netns and its cgroup under the node's, for the bed's client helpers) whose
/// bed-made interface is removed, so that the CNI chain sets up its network as a runtime would.
fn bare_pod(bed: &TestBed, node: &Node, name: &str, namespace: &str) -> Pod {
    let pod = bed
        .add_pod_in(node, name, namespace, "default")
        .expect("add pod");
    pod.exec(&["ip", "link", "del", "eth0"])
        .expect("remove the bed's interface");
    pod
}

#[test]
fn a_pod_added_through_the_chain_is_captured_from_its_first_connection() {
    if !ambit_testbed::privileged() {
        return;
    }
    // The server is not in the config (not enrolled); the client comes through the chain.
    let mut m = MeshSpec::new()
        .node("node-a")
        .listed_elsewhere("server", "default", "default")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (server, mut config) = (m.take_pod("server"), m.take_config("node-a"));
    let (bed, node) = (&m.bed, &m.nodes["node-a"]);
    let echo = server.serve(PORT).expect("start echo server");
    let dst: SocketAddr = server.v4(PORT);

    config.extra.insert(
        "namespaces".into(),
        json!({"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    let agent = bed.start_agent(&config).expect("start agent");
    assert_eq!(enrolled_pods(&agent), 0);

    let dir = bed.tmp_dir().join("cni");
    std::fs::create_dir_all(&dir).expect("cni dir");
    let runtime = Runtime::new(
        node,
        &dir,
        "10.1.128.0/24",
        json!({
            "agentSocket": agent.admin_socket(),
            "stateFile": dir.join("cni-state.json"),
            "timeoutSeconds": 30,
            "logFile": dir.join("ambit-cni.log"),
        }),
    );

    // A pod of namespace `other` (not labelled): it starts and is not captured.
    let stranger = bare_pod(bed, node, "stranger", "other");
    let stranger_att = Attachment::new(stranger.netns_path(), "other", "stranger");
    let stranger_result = runtime
        .add(&stranger_att)
        .unwrap_or_else(|f| panic!("ADD of a pod outside the mesh: {f:#?}"));
    let stranger_ip = result_ipv4(&stranger_result[1]);
    assert_eq!(stranger_result[1], stranger_result[0]);
    let before = redirected(node);
    let report = stranger.connect(dst, 1000).expect("run client");
    assert!(report.ok, "{report:#?}");
    assert_eq!(redirected(node), before, "a pod of `other` is not captured");

    // A pod of namespace `default` (labelled ambient): ADD returns once it is enrolled, so its
    // very first connection goes through the agent.
    let web = bare_pod(bed, node, "web", "default");
    let web_att = Attachment::new(web.netns_path(), "default", "web");
    let mark = agent.mark();
    let web_result = runtime
        .add(&web_att)
        .unwrap_or_else(|f| panic!("ADD of a mesh pod: {f:#?}"));
    assert_eq!(web_result[1], web_result[0], "prevResult printed unchanged");
    let web_ip = result_ipv4(&web_result[1]);
    let before = redirected(node);
    let report = web.connect(dst, 1000).expect("run client");
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.peer, Some(dst), "the app sees the address it dialed");
    assert_eq!(
        redirected(node),
        before + 1,
        "the first connection is redirected"
    );
    let out = agent
        .wait_for_connection_log(mark, "outbound", dst, WAIT)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let src: SocketAddr = log_str(&out, "src.addr")
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no src.addr in {out}"));
    assert_eq!(
        src.ip(),
        web_ip,
        "the access log names the pod's host-local IP: {out}"
    );
    let peers = echo
        .wait_for_accepts(2, WAIT)
        .expect("server accepted both");
    assert_eq!(peers[0].ip(), stranger_ip);
    assert_eq!(peers[1].ip(), web_ip, "the server sees the pod's own IP");
    assert!(
        !agent.access_logs().iter().any(|l| {
            log_str(l, "src.addr")
                .and_then(|s| s.parse::<SocketAddr>().ok())
                .is_some_and(|a| a.ip() == stranger_ip)
        }),
        "no access log for the pod of `other`"
    );
    assert_eq!(enrolled_pods(&agent), 1);

    // CHECK agrees for both; DEL releases the mesh pod, and may be repeated.
    runtime
        .check(&web_att, &web_result[1])
        .unwrap_or_else(|f| panic!("CHECK of the captured pod: {f:#?}"));
    runtime
        .check(&stranger_att, &stranger_result[1])
        .unwrap_or_else(|f| panic!("CHECK of the pod outside the mesh: {f:#?}"));
    runtime
        .del(&web_att, Some(&web_result[1]))
        .unwrap_or_else(|f| panic!("DEL of the mesh pod: {f:#?}"));
    let released = ambit_testbed::poll(WAIT, || (enrolled_pods(&agent) == 0).then_some(()));
    assert!(released.is_some(), "DEL releases the pod");
    runtime
        .del(&web_att, Some(&web_result[1]))
        .unwrap_or_else(|f| panic!("a second DEL: {f:#?}"));
    runtime
        .del(&stranger_att, Some(&stranger_result[1]))
        .unwrap_or_else(|f| panic!("DEL of the pod outside the mesh: {f:#?}"));
}

/// The netns cookies enrolled in the agent's pinned maps.
fn enrolled_cookies(agent: &Agent) -> Vec<u64> {
    let bpf = agent.ambitctl_json(&["bpf"]).expect("ambitctl bpf");
    bpf["enrolled"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["netnsCookie"].as_u64())
        .collect()
}

#[test]
fn a_restart_keeps_cni_pods_captured_and_served() {
    if !ambit_testbed::privileged() {
        return;
    }
    let mut m = MeshSpec::new()
        .node("node-a")
        .node("node-b")
        .pod_as("server", "default", "server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (server, mut config_a) = (m.take_pod("server"), m.take_config("node-a"));
    let (bed, node_a) = (&m.bed, &m.nodes["node-a"]);
    let _echo = server.serve(PORT).expect("echo");
    let dst = server.v4(PORT);
    let _agent_b = bed.start_agent(&m.configs["node-b"]).expect("agent-b");
    config_a.extra.insert(
        "namespaces".into(),
        json!({"default": {"labels": {"istio.io/dataplane-mode": "ambient"}}}),
    );
    let old = bed.start_agent(&config_a).expect("agent-a");

    // A pod of the mesh, known only from the CNI plugin (the config does not list it).
    let dir = bed.tmp_dir().join("cni");
    std::fs::create_dir_all(&dir).expect("cni dir");
    let runtime = Runtime::new(
        node_a,
        &dir,
        "10.1.128.0/24",
        json!({"agentSocket": old.admin_socket(), "stateFile": dir.join("cni-state.json"),
               "timeoutSeconds": 30}),
    );
    let web = bare_pod(bed, node_a, "web", "default");
    let att = Attachment::new(web.netns_path(), "default", "web");
    runtime
        .add(&att)
        .unwrap_or_else(|f| panic!("ADD of a mesh pod: {f:#?}"));
    // node-b reaches the CNI subnet through node-a, as a cluster's routes would.
    m.nodes["node-b"]
        .exec(&["ip", "route", "add", "10.1.128.0/24", "via", "10.0.0.1"])
        .expect("route to the CNI subnet");
    let tunnelled = |agent: &Agent, when: &str| {
        let mark = agent.mark();
        let report = web.connect(dst, 4096).expect("run client");
        assert!(report.ok, "{when}: {report:#?}");
        let log = agent
            .wait_for_connection_log(mark, "outbound", dst, WAIT)
            .unwrap_or_else(|e| panic!("{when}: {e:#}"));
        assert_eq!(log_str(&log, "path"), Some("hbone"), "{when}: {log}");
    };
    tunnelled(&old, "before the restart");
    let before = enrolled_cookies(&old);
    assert_eq!(before.len(), 1, "the CNI pod is enrolled");

    let capture = ambit_testbed::wire::Capture::start(bed, node_a).expect("capture");
    old.stop().expect("the old agent stops");
    // While no agent runs, the pod stays captured: refused, never direct.
    let report = web.connect_with(dst, 4096, 0, 2000).expect("run client");
    assert!(!report.ok, "no agent, no connection: {report:#?}");
    let new = bed.start_agent(&config_a).expect("the new agent");
    assert_eq!(
        enrolled_cookies(&new),
        before,
        "the same netns, never released"
    );
    let status = new.ambitctl_json(&["status"]).expect("status");
    assert_eq!(
        status["enrolledPods"], 1,
        "reloaded from the records: {status:#}"
    );
    tunnelled(&new, "after the restart");
    let (_, raw) = capture.stop().expect("stop capture");
    for window in [0..64, 1000..1064] {
        assert!(
            !ambit_testbed::wire::contains(&raw, &ambit_testbed::wire::pattern(window.clone())),
            "the pod's payload {window:?} is visible on the wire"
        );
    }
}
