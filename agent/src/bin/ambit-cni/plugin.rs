//! What each CNI command does: tell the agent about the pod over its admin socket
//! (`POST /cni/add|del|check` with a [`CniPod`]), and decide from the agent's state file when the
//! agent cannot be reached.
//!
//! | command | agent answers | agent unreachable |
//! |---|---|---|
//! | ADD | enrolled or not opted in: print `prevResult`; error status: fail (100, or 11 if 503) | namespace in the state file, or no state file: fail (11); else print `prevResult` |
//! | CHECK | ok: nothing; error status (409: opted in, not captured): fail (100) | as ADD, with no output |
//! | DEL | anything: succeed | succeed (logged) |
//! | GC, STATUS | not asked | succeed |

use std::{path::Path, time::Duration};

use ambit_agent::admin::{
    api::{CniAnswer, CniPod, CniState},
    client::{self, Client},
};
use serde_json::Value;

use crate::{
    cni::{self, CniError, Command, Env, NetConf, PodRef, code},
    log::Log,
};

/// A DEL tells the agent and moves on: the pod's teardown must not wait on a stuck agent.
const DEL_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs one invocation: `Ok(Some(result))` to print on stdout, `Ok(None)` for success without
/// output, or the error to print (also logged, since a runtime may keep only the log).
pub fn run(env: &Env, stdin: &[u8], log: &mut Log) -> Result<Option<Value>, CniError> {
    let result = dispatch(env, stdin, log);
    if let Err(e) = &result {
        log.info(format!(
            "failed (code {}): {}: {}",
            e.code, e.msg, e.details
        ));
    }
    result
}

fn dispatch(env: &Env, stdin: &[u8], log: &mut Log) -> Result<Option<Value>, CniError> {
    let command = env.command()?;
    log.set_context(command.as_str());
    if command == Command::Version {
        return Ok(Some(cni::version_result(stdin)));
    }
    let conf = cni::parse_conf(stdin, command)?;
    if let Some(path) = &conf.log_file {
        log.open_file(path);
    }
    match command {
        Command::Add => add(env, &conf, log),
        Command::Del => del(env, &conf, log),
        Command::Check => check(env, &conf, log),
        // The plugin holds nothing of its own to collect: the agent owns enrollment and hears
        // of every pod's end through DEL.
        Command::Gc => Ok(None),
        // The plugin can always serve ADD: it judges each pod, with or without the agent.
        Command::Status => Ok(None),
        Command::Version => Ok(Some(cni::version_result(stdin))),
    }
}

/// The pod named in `CNI_ARGS` (or `None`: not Kubernetes), with the log context set.
fn pod(env: &Env, command: Command, log: &mut Log) -> Result<Option<PodRef>, CniError> {
    let args = cni::parse_args(env.args.as_deref().unwrap_or(""))?;
    let pod = cni::pod_ref(&args)?;
    let container = env.container_id.as_deref().unwrap_or("");
    let short = container.get(..12).unwrap_or(container);
    match &pod {
        Some(p) => log.set_context(format!("{} {p} (container {short})", command.as_str())),
        None => log.set_context(format!("{} container {short}", command.as_str())),
    }
    Ok(pod)
}

fn cni_pod(env: &Env, pod: &PodRef, ips: &[std::net::IpAddr]) -> CniPod {
    CniPod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        uid: pod.uid.clone(),
        container_id: env.container_id.clone().unwrap_or_default(),
        netns: env.netns.clone().unwrap_or_default(),
        ips: ips.iter().map(ToString::to_string).collect(),
    }
}

fn client(conf: &NetConf, timeout: Duration) -> Client {
    Client::new("ambit-cni", &conf.agent_socket)
        .with_socket_hint("set agentSocket in the ambit-cni entry of the CNI network config")
        .with_timeout(timeout)
}

fn no_prev_result(command: Command) -> CniError {
    CniError::new(
        code::INVALID_CONFIG,
        format!("{} needs prevResult", command.as_str()),
        "ambit-cni is a chained plugin: list it after the plugin that creates the pod's interface \
         (e.g. bridge, ptp, or the cluster's CNI) in the network config list",
    )
}

fn add(env: &Env, conf: &NetConf, log: &mut Log) -> Result<Option<Value>, CniError> {
    env.require(
        Command::Add,
        &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
    )?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| no_prev_result(Command::Add))?;
    let result = cni::pass_through(prev, &conf.cni_version);
    let Some(pod) = pod(env, Command::Add, log)? else {
        log.info(
            "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME in CNI_ARGS): passed through",
        );
        return Ok(Some(result));
    };
    let ips = cni::pod_ips(prev)?;
    let body = cni_pod(env, &pod, &ips);
    match client(conf, conf.timeout).post::<_, CniAnswer>("/cni/add", &body) {
        Ok(a) if a.enrolled => log.info(format!("captured by the agent ({})", a.reason)),
        Ok(a) => log.info(format!("not captured: {}", a.reason)),
        Err(e) => agent_failed(Command::Add, conf, &pod, e, log)?,
    }
    Ok(Some(result))
}

fn check(env: &Env, conf: &NetConf, log: &mut Log) -> Result<Option<Value>, CniError> {
    env.require(
        Command::Check,
        &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
    )?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| no_prev_result(Command::Check))?;
    let Some(pod) = pod(env, Command::Check, log)? else {
        return Ok(None);
    };
    let ips = cni::pod_ips(prev)?;
    let body = cni_pod(env, &pod, &ips);
    match client(conf, conf.timeout).post::<_, CniAnswer>("/cni/check", &body) {
        Ok(a) => log.info(format!(
            "{}: {}",
            if a.enrolled {
                "captured"
            } else {
                "not in the mesh"
            },
            a.reason
        )),
        Err(e) => agent_failed(Command::Check, conf, &pod, e, log)?,
    }
    Ok(None)
}

fn del(env: &Env, conf: &NetConf, log: &mut Log) -> Result<Option<Value>, CniError> {
    env.require(Command::Del, &["CNI_CONTAINERID", "CNI_IFNAME"])?;
    let Some(pod) = pod(env, Command::Del, log)? else {
        return Ok(None);
    };
    // The IPs help the agent find a pod whose netns is already gone; a bad prevResult does not
    // stop a DEL.
    let ips = match conf.prev_result.as_ref().map(cni::pod_ips) {
        None => Vec::new(),
        Some(Ok(ips)) => ips,
        Some(Err(e)) => {
            log.info(format!("ignoring prevResult: {}: {}", e.msg, e.details));
            Vec::new()
        }
    };
    let body = cni_pod(env, &pod, &ips);
    match client(conf, conf.timeout.min(DEL_TIMEOUT)).post::<_, CniAnswer>("/cni/del", &body) {
        Ok(a) => log.info(format!("released: {}", a.reason)),
        Err(e) => log.info(format!(
            "could not tell the agent ({e}); DEL succeeds anyway, so the pod's teardown is not blocked"
        )),
    }
    Ok(None)
}

/// The agent did not say yes. An error status fails the call; not reaching it (or an answer we
/// cannot read) falls back to the state file.
fn agent_failed(
    command: Command,
    conf: &NetConf,
    pod: &PodRef,
    e: client::Error,
    log: &mut Log,
) -> Result<(), CniError> {
    if let client::Error::Api { status, message } = &e {
        let (code, msg) = match (command, *status) {
            (_, 503) => (code::TRY_AGAIN_LATER, "the agent cannot take the pod now"),
            (Command::Check, 409) => (
                code::AGENT_REFUSED,
                "the pod is in the mesh but not captured",
            ),
            (Command::Check, _) => (code::AGENT_REFUSED, "the agent could not check the pod"),
            _ => (code::AGENT_REFUSED, "the agent could not capture the pod"),
        };
        return Err(CniError::new(
            code,
            msg,
            format!(
                "pod {pod}: the agent at {} answered {status}: {message}",
                conf.agent_socket.display()
            ),
        ));
    }
    let state = read_state(&conf.state_file);
    if let StateFile::Found(s) = &state
        && !s.socket.is_empty()
        && Path::new(&s.socket) != conf.agent_socket
    {
        log.info(format!(
            "note: the agent that wrote {} serves {}, but agentSocket is {}",
            conf.state_file.display(),
            s.socket,
            conf.agent_socket.display()
        ));
    }
    match decide(&pod.namespace, &state, &conf.state_file) {
        Fallback::Allow(why) => {
            log.info(format!("agent unreachable ({e}); {why}"));
            Ok(())
        }
        Fallback::Refuse(why) => Err(CniError::new(
            code::TRY_AGAIN_LATER,
            format!("the Ambit agent is unreachable and pod {pod} belongs to the mesh"),
            format!(
                "{e}\n{why}; the pod must not start uncaptured, so {} fails until the agent is \
                 back (the kubelet retries)",
                command.as_str()
            ),
        )),
    }
}

/// What the agent left on disk for us.
#[derive(Debug)]
pub enum StateFile {
    /// No file: the agent has not run on this node since the plugin was installed (or its state
    /// was lost): which namespaces are in the mesh is unknown.
    Missing,
    Found(CniState),
    /// There is a file, and it cannot be read or parsed.
    Unreadable(String),
}

pub fn read_state(path: &Path) -> StateFile {
    match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::Missing,
        Err(e) => StateFile::Unreadable(e.to_string()),
        Ok(bytes) => match serde_json::from_slice::<CniState>(&bytes) {
            Ok(s) => StateFile::Found(s),
            Err(e) => StateFile::Unreadable(format!("not a CniState: {e}")),
        },
    }
}

/// The decision without the agent.
#[derive(Debug, PartialEq, Eq)]
pub enum Fallback {
    /// Let the pod start (uncaptured), with why.
    Allow(String),
    /// Fail the call, with why.
    Refuse(String),
}

/// Without the agent, a pod may start only when the agent's last word says its namespace is not
/// in the mesh. No state file, or one we cannot read, fails closed: the plugin is installed, so
/// the mesh runs on this node, and a pod of a mesh namespace must not start uncaptured (after a
/// reboot, say, before the agent is back). The agent writes the file as soon as it knows the
/// mesh's namespaces, and keeps it on persistent storage (`/var/lib/ambit` by default).
pub fn decide(namespace: &str, state: &StateFile, path: &Path) -> Fallback {
    let path = path.display();
    match state {
        StateFile::Missing => Fallback::Refuse(format!(
            "no state file {path}: the agent has not said which namespaces are in the mesh since \
             the plugin was installed (if the mesh is not meant to run on this node, remove \
             ambit-cni from the CNI config list)"
        )),
        StateFile::Found(s) if s.ambient_namespaces.iter().any(|n| n == namespace) => {
            Fallback::Refuse(format!(
                "{path} lists namespace {namespace} as ambient (in the mesh)"
            ))
        }
        StateFile::Found(_) => Fallback::Allow(format!(
            "{path} does not list namespace {namespace} as ambient, so the pod starts uncaptured"
        )),
        StateFile::Unreadable(e) => Fallback::Refuse(format!(
            "cannot read the state file {path} ({e}), so whether namespace {namespace} is in the \
             mesh is unknown"
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        os::unix::net::UnixListener,
        path::PathBuf,
        sync::mpsc,
    };

    use super::*;

    /// A fresh temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!(
                "ambit-cni-{tag}-{}-{:x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn env(command: &str, namespace: Option<&str>) -> Env {
        Env {
            command: Some(command.into()),
            container_id: Some("3f6940ab5ab43bc522569d15b23f8c1b".into()),
            netns: Some("/run/netns/cni-1234".into()),
            ifname: Some("eth0".into()),
            args: Some(match namespace {
                Some(ns) => format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME=web-0;K8S_POD_UID=u-1"
                ),
                None => "IgnoreUnknown=1".into(),
            }),
        }
    }

    fn prev() -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/run/netns/cni-1234"}],
            "ips": [{"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 1}],
            "dns": {}
        })
    }

    fn netconf(dir: &TempDir, with_prev: bool) -> Vec<u8> {
        let mut c = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s",
            "type": "ambit-cni",
            "agentSocket": dir.0.join("admin.sock"),
            "stateFile": dir.0.join("cni-state.json"),
            "timeoutSeconds": 5,
        });
        if with_prev {
            c["prevResult"] = prev();
        }
        c.to_string().into_bytes()
    }

    fn write_state(dir: &TempDir, namespaces: &[&str]) {
        let state = CniState {
            ambient_namespaces: namespaces.iter().map(|n| (*n).to_owned()).collect(),
            socket: dir.0.join("admin.sock").display().to_string(),
        };
        std::fs::write(
            dir.0.join("cni-state.json"),
            serde_json::to_vec(&state).expect("json"),
        )
        .expect("write state");
    }

    #[test]
    fn decisions_without_the_agent() {
        let path = Path::new("/var/lib/ambit/cni-state.json");
        let state = StateFile::Found(CniState {
            ambient_namespaces: vec!["shop".into(), "default".into()],
            socket: String::new(),
        });
        assert!(matches!(
            decide("default", &state, path),
            Fallback::Refuse(_)
        ));
        assert!(matches!(
            decide("kube-system", &state, path),
            Fallback::Allow(_)
        ));
        assert!(matches!(
            decide("kube-system", &StateFile::Missing, path),
            Fallback::Refuse(why) if why.contains("no state file")
        ));
        assert!(matches!(
            decide("other", &StateFile::Unreadable("bad".into()), path),
            Fallback::Refuse(_)
        ));
    }

    #[test]
    fn state_file_reading() {
        let dir = TempDir::new("state");
        let path = dir.0.join("cni-state.json");
        assert!(matches!(read_state(&path), StateFile::Missing));
        std::fs::write(
            &path,
            b"{\"ambientNamespaces\":[\"default\"],\"socket\":\"/s\"}",
        )
        .expect("write");
        assert!(
            matches!(read_state(&path), StateFile::Found(s) if s.ambient_namespaces == ["default"])
        );
        std::fs::write(&path, b"{trunc").expect("write");
        assert!(matches!(read_state(&path), StateFile::Unreadable(_)));
    }

    #[test]
    fn add_without_agent_fails_for_a_mesh_namespace_and_passes_others() {
        let dir = TempDir::new("add");
        write_state(&dir, &["default"]);
        let stdin = netconf(&dir, true);

        let mut log = Log::capture();
        let e = run(&env("ADD", Some("default")), &stdin, &mut log).expect_err("refused");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert!(e.msg.contains("default/web-0"), "{e:?}");
        assert!(e.details.contains("no admin socket"), "{e:?}");

        let mut log = Log::capture();
        let out = run(&env("ADD", Some("other")), &stdin, &mut log)
            .expect("other namespaces start")
            .expect("a result");
        assert_eq!(out, prev(), "prevResult printed unchanged");
        assert!(
            log.lines()
                .iter()
                .any(|l| l.contains("does not list namespace other")),
            "{:?}",
            log.lines()
        );

        // No state file at all (a reboot before the agent is back, a lost file): unknown, so
        // every pod waits for the agent.
        std::fs::remove_file(dir.0.join("cni-state.json")).expect("rm");
        for ns in ["default", "other"] {
            let e = run(&env("ADD", Some(ns)), &stdin, &mut Log::capture()).expect_err("refused");
            assert_eq!(e.code, code::TRY_AGAIN_LATER);
            assert!(e.details.contains("no state file"), "{e:?}");
        }

        // CHECK decides the same way; DEL never fails for a missing agent.
        write_state(&dir, &["default"]);
        let e =
            run(&env("CHECK", Some("default")), &stdin, &mut Log::capture()).expect_err("refused");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);
        assert_eq!(
            run(&env("CHECK", Some("other")), &stdin, &mut Log::capture()),
            Ok(None)
        );
        assert_eq!(
            run(&env("DEL", Some("default")), &stdin, &mut Log::capture()),
            Ok(None)
        );
    }

    #[test]
    fn add_needs_prev_result_and_passes_non_kubernetes_pods() {
        let dir = TempDir::new("prev");
        write_state(&dir, &["default"]);
        let e = run(
            &env("ADD", Some("default")),
            &netconf(&dir, false),
            &mut Log::capture(),
        )
        .expect_err("chained only");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.details.contains("chained"), "{e:?}");
        // No pod names: the agent is not asked (there is none here) and the result passes.
        let out =
            run(&env("ADD", None), &netconf(&dir, true), &mut Log::capture()).expect("passes");
        assert_eq!(out, Some(prev()));
        // DEL with no prevResult and no netns is fine.
        let mut gone = env("DEL", Some("default"));
        gone.netns = None;
        assert_eq!(
            run(&gone, &netconf(&dir, false), &mut Log::capture()),
            Ok(None)
        );
    }

    #[test]
    fn bad_env_and_stdin_are_error_results() {
        let dir = TempDir::new("bad");
        let mut e = env("ADD", Some("default"));
        e.netns = None;
        let err = run(&e, &netconf(&dir, true), &mut Log::capture()).expect_err("no netns");
        assert_eq!(err.code, code::INVALID_ENV);
        assert!(err.msg.contains("CNI_NETNS"));
        let err =
            run(&env("ADD", Some("default")), b"{", &mut Log::capture()).expect_err("not json");
        assert_eq!(err.code, code::DECODE_FAILURE);
        let err = run(&Env::default(), b"", &mut Log::capture()).expect_err("no command");
        assert_eq!(err.code, code::INVALID_ENV);
        let mut e = env("ADD", Some("default"));
        e.args = Some("K8S_POD_NAMESPACE".into());
        let err = run(&e, &netconf(&dir, true), &mut Log::capture()).expect_err("bad args");
        assert_eq!(err.code, code::INVALID_ENV);
        // VERSION needs nothing but the command.
        let v = run(&env("VERSION", None), b"", &mut Log::capture())
            .expect("version")
            .expect("output");
        assert_eq!(v["cniVersion"], cni::LATEST_VERSION);
    }

    #[test]
    fn gc_and_status_succeed_quietly_from_1_1_0() {
        let dir = TempDir::new("gc");
        let mut conf: Value = serde_json::from_slice(&netconf(&dir, false)).expect("json");
        conf["cniVersion"] = "1.1.0".into();
        conf["cni.dev/valid-attachments"] =
            serde_json::json!([{"containerID": "abc", "ifname": "eth0"}]);
        let stdin = conf.to_string().into_bytes();
        for command in ["GC", "STATUS"] {
            let env = Env {
                command: Some(command.into()),
                ..Env::default()
            };
            assert_eq!(
                run(&env, &stdin, &mut Log::capture()),
                Ok(None),
                "{command}"
            );
        }
    }

    /// A fake agent answering one request with `status` and `body`; hands back the request.
    fn fake_agent(
        dir: &TempDir,
        status: &'static str,
        body: &'static str,
    ) -> mpsc::Receiver<String> {
        let listener = UnixListener::bind(dir.0.join("admin.sock")).expect("bind");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut req = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let Ok(n) = s.read(&mut buf) else { return };
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                let done = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    body.len() >= len
                });
                if done || n == 0 {
                    break;
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&req).into_owned());
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        });
        rx
    }

    #[test]
    fn add_tells_the_agent_the_pod_and_waits_for_its_answer() {
        let dir = TempDir::new("agent");
        let requests = fake_agent(&dir, "200 OK", r#"{"enrolled":true,"reason":"captured"}"#);
        let mut log = Log::capture();
        let out = run(&env("ADD", Some("default")), &netconf(&dir, true), &mut log)
            .expect("enrolled")
            .expect("result");
        assert_eq!(out, prev());
        let request = requests.recv().expect("request");
        assert!(
            request.starts_with("POST /cni/add HTTP/1.1\r\n"),
            "{request}"
        );
        let (_, body) = request.split_once("\r\n\r\n").expect("body");
        let pod: CniPod = serde_json::from_str(body).expect("a CniPod");
        assert_eq!(
            pod,
            CniPod {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "u-1".into(),
                container_id: "3f6940ab5ab43bc522569d15b23f8c1b".into(),
                netns: "/run/netns/cni-1234".into(),
                ips: vec!["10.22.0.5".into()],
            }
        );
        assert!(
            log.lines()
                .iter()
                .any(|l| l.contains("ADD default/web-0 (container 3f6940ab5ab4): captured")),
            "{:?}",
            log.lines()
        );
    }

    #[test]
    fn an_agent_error_fails_add_and_check() {
        let dir = TempDir::new("refuse");
        // Even with the namespace not in the state file: the agent's word counts.
        write_state(&dir, &[]);
        let _r = fake_agent(
            &dir,
            "500 Internal Server Error",
            r#"{"error":"cannot open netns"}"#,
        );
        let e = run(
            &env("ADD", Some("default")),
            &netconf(&dir, true),
            &mut Log::capture(),
        )
        .expect_err("refused");
        assert_eq!(e.code, code::AGENT_REFUSED);
        assert!(e.details.contains("500: cannot open netns"), "{e:?}");

        std::fs::remove_file(dir.0.join("admin.sock")).expect("rm");
        let _r = fake_agent(&dir, "409 Conflict", r#"{"error":"not enrolled"}"#);
        let e = run(
            &env("CHECK", Some("default")),
            &netconf(&dir, true),
            &mut Log::capture(),
        )
        .expect_err("not captured");
        assert_eq!(e.code, code::AGENT_REFUSED);
        assert!(e.msg.contains("not captured"), "{e:?}");

        std::fs::remove_file(dir.0.join("admin.sock")).expect("rm");
        let _r = fake_agent(
            &dir,
            "503 Service Unavailable",
            r#"{"error":"the agent is shutting down"}"#,
        );
        let e = run(
            &env("ADD", Some("default")),
            &netconf(&dir, true),
            &mut Log::capture(),
        )
        .expect_err("later");
        assert_eq!(e.code, code::TRY_AGAIN_LATER);

        // DEL succeeds whatever the agent says.
        std::fs::remove_file(dir.0.join("admin.sock")).expect("rm");
        let _r = fake_agent(&dir, "500 Internal Server Error", r#"{"error":"boom"}"#);
        assert_eq!(
            run(
                &env("DEL", Some("default")),
                &netconf(&dir, true),
                &mut Log::capture()
            ),
            Ok(None)
        );
    }
}
