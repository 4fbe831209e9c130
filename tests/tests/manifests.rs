//! `deploy/` without a cluster: every manifest of `deploy/daemonset` validated against the
//! Kubernetes schemas offline (`kubernetes-validate`, which `cargo xtask setup` installs) and a
//! broken copy refused; what the schemas cannot see (least-privilege RBAC, the upgrade strategy,
//! a mount behind every path of the agent's config); the CNI install script run as the init
//! container runs it, against a temp CNI dir; and a light lint of the Dockerfile. No root.

use std::{
    collections::BTreeSet,
    io::Write,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use serde_json::{Value, json};

/// Kubernetes versions the manifests are validated for: the oldest they support (1.30 added
/// `securityContext.appArmorProfile`) and the newest the pinned validator bundles.
const KUBERNETES_VERSIONS: &[&str] = &["1.30.0", "1.33.0"];
/// Names the `kubernetes-validate` executable to use instead of the one setup installs.
const VALIDATOR_ENV: &str = "AMBIT_KUBERNETES_VALIDATE";
const NAMESPACE: &str = "ambit-system";

fn repo_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests.parent().unwrap_or(tests).to_owned()
}

fn deploy_dir() -> PathBuf {
    repo_root().join("deploy").join("daemonset")
}

fn install_script() -> PathBuf {
    deploy_dir().join("ambit-cni-install")
}

/// `kubernetes-validate`: `$AMBIT_KUBERNETES_VALIDATE`, else the venv `cargo xtask setup` makes
/// at `<target>/tools/kubernetes-validate`. Missing is a failure, never a skip.
fn validator() -> PathBuf {
    if let Some(path) = std::env::var_os(VALIDATOR_ENV) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{VALIDATOR_ENV}={} is not a file; unset it to use the one `cargo xtask setup` installs",
            path.display()
        );
        return path;
    }
    // CARGO_TARGET_TMPDIR is <target>/tmp.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .expect("the target dir")
        .to_owned();
    let path = target
        .join("tools")
        .join("kubernetes-validate")
        .join("bin")
        .join("kubernetes-validate");
    assert!(
        path.is_file(),
        "kubernetes-validate is not installed at {}: run `cargo xtask setup` (it installs it from \
         PyPI into a venv there), or set {VALIDATOR_ENV} to a kubernetes-validate executable",
        path.display()
    );
    path
}

/// The Python next to the validator (its venv's, which has PyYAML), else `python3`.
fn python() -> PathBuf {
    let venv_python = validator().with_file_name("python3");
    if venv_python.is_file() {
        venv_python
    } else {
        PathBuf::from("python3")
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Every document of a YAML text, as JSON (PyYAML: a real YAML parser).
fn yaml_docs(yaml: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml\n\
             json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python().display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(yaml.as_bytes())
        .expect("write YAML to python");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "parsing YAML with {} failed (run `cargo xtask setup`):\n{}",
        python().display(),
        text(&out)
    );
    match serde_json::from_slice(&out.stdout).expect("python printed JSON") {
        Value::Array(docs) => docs,
        other => panic!("expected a list of documents, got {other}"),
    }
}

fn yaml_file(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    yaml_docs(&text)
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path
            .extension()
            .is_some_and(|ext| ext == "yaml" || ext == "yml")
        {
            out.push(path);
        }
    }
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n == "kustomization.yaml" || n == "kustomization.yml")
}

/// Every Kubernetes manifest under deploy/daemonset (kustomizations are kustomize's, not the API's).
fn manifests() -> Vec<PathBuf> {
    manifests_in(&deploy_dir())
}

/// Every Kubernetes manifest under `dir`, which has some.
fn manifests_in(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    yaml_files(dir, &mut files);
    files.retain(|f| !is_kustomization(f));
    assert!(!files.is_empty(), "no manifests under {}", dir.display());
    files
}

/// Every resource under deploy/daemonset (parsed once per test binary).
fn resources() -> &'static [Value] {
    static RESOURCES: OnceLock<Vec<Value>> = OnceLock::new();
    RESOURCES.get_or_init(|| manifests().iter().flat_map(|f| yaml_file(f)).collect())
}

fn resource(kind: &str, name: &str) -> &'static Value {
    resources()
        .iter()
        .find(|r| r["kind"] == kind && r["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} under {}", deploy_dir().display()))
}

fn validate(files: &[PathBuf], version: &str) -> Output {
    Command::new(validator())
        .args(["--kubernetes-version", version, "--strict"])
        .args(files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", validator().display()))
}

#[test]
fn every_manifest_validates_against_the_kubernetes_schemas() {
    let files = manifests();
    for version in KUBERNETES_VERSIONS {
        let out = validate(&files, version);
        let report = text(&out);
        assert!(
            out.status.success(),
            "kubernetes-validate --strict for Kubernetes {version} failed:\n{report}"
        );
        // An unknown kind or apiVersion is only a warning: it must not pass silently.
        assert!(
            !report.contains("WARN") && !report.contains("ERROR"),
            "kubernetes-validate for Kubernetes {version}:\n{report}"
        );
        for file in &files {
            let docs = yaml_file(file).len();
            let passed = report
                .lines()
                .filter(|l| l.contains(&*file.to_string_lossy()) && l.contains(" passed "))
                .count();
            assert_eq!(
                passed,
                docs,
                "{}: {docs} resources, {passed} validated for {version}:\n{report}",
                file.display()
            );
        }
    }
}

#[test]
fn the_validator_refuses_a_broken_daemonset() {
    let original = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("read");
    let dir = TempDir::new("broken");
    let broken = |name: &str, from: &str, to: &str| {
        assert_eq!(
            original.matches(from).count(),
            1,
            "daemonset.yaml should hold `{from}` once"
        );
        let path = dir.path().join(name);
        std::fs::write(&path, original.replacen(from, to, 1)).expect("write");
        path
    };
    let cases = [
        (
            broken(
                "misspelled.yaml",
                "      containers:\n",
                "      containerz:\n",
            ),
            "'containers' is a required property",
        ),
        (
            broken(
                "wrong-type.yaml",
                "hostNetwork: true",
                "hostNetwork: \"yes\"",
            ),
            "is not of type 'boolean'",
        ),
        (
            broken(
                "unknown-field.yaml",
                "dnsPolicy: ClusterFirstWithHostNet",
                "dnsPolicey: ClusterFirstWithHostNet",
            ),
            "'dnsPolicey' was unexpected",
        ),
    ];
    let files: Vec<PathBuf> = cases.iter().map(|(f, _)| f.clone()).collect();
    let out = validate(&files, KUBERNETES_VERSIONS[0]);
    let report = text(&out);
    assert!(
        !out.status.success(),
        "the broken copies validated:\n{report}"
    );
    for (file, problem) in &cases {
        assert!(
            report.lines().any(|l| l.starts_with("ERROR")
                && l.contains(&*file.to_string_lossy())
                && l.contains(problem)),
            "no error `{problem}` for {}:\n{report}",
            file.display()
        );
    }
}

#[test]
fn each_kustomization_lists_the_manifests_beside_it() {
    let mut files = Vec::new();
    yaml_files(&deploy_dir(), &mut files);
    let kustomizations: Vec<&PathBuf> = files.iter().filter(|f| is_kustomization(f)).collect();
    assert!(!kustomizations.is_empty());
    for manifest in files.iter().filter(|f| !is_kustomization(f)) {
        assert!(
            kustomizations
                .iter()
                .any(|k| k.parent() == manifest.parent()),
            "{} is in no kustomization",
            manifest.display()
        );
    }
    for k in kustomizations {
        let doc = &yaml_file(k)[0];
        assert_eq!(doc["kind"], "Kustomization", "{}", k.display());
        let dir = k.parent().expect("dir");
        let listed: BTreeSet<String> = doc["resources"]
            .as_array()
            .unwrap_or_else(|| panic!("{} has no resources", k.display()))
            .iter()
            .map(|r| r.as_str().expect("a file name").to_owned())
            .collect();
        let present: BTreeSet<String> = std::fs::read_dir(dir)
            .expect("read dir")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.is_file() && !is_kustomization(p))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
            .map(|p| p.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(listed, present, "{}", k.display());
    }
}

fn pod_spec(daemonset: &Value) -> &Value {
    &daemonset["spec"]["template"]["spec"]
}

fn containers(daemonset: &Value) -> Vec<&Value> {
    let spec = pod_spec(daemonset);
    ["initContainers", "containers"]
        .iter()
        .flat_map(|k| spec[k].as_array().into_iter().flatten())
        .collect()
}

fn container<'a>(daemonset: &'a Value, name: &str) -> &'a Value {
    containers(daemonset)
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().expect("a string").to_owned())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn rbac_grants_only_what_the_agent_needs() {
    let role = resource("ClusterRole", "ambit-agent");
    // (API group, resource, verbs), one per group and resource a rule names.
    let mut rules = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        assert!(
            rule.get("resourceNames").is_none() && rule.get("nonResourceURLs").is_none(),
            "{rule}"
        );
        for group in strings(&rule["apiGroups"]) {
            for resource in strings(&rule["resources"]) {
                rules.insert((group.clone(), resource, strings(&rule["verbs"])));
            }
        }
    }
    let expected = BTreeSet::from([
        (
            String::new(),
            "namespaces".to_owned(),
            set(&["get", "list", "watch"]),
        ),
        (
            String::new(),
            "pods".to_owned(),
            set(&["get", "list", "watch", "patch"]),
        ),
    ]);
    assert_eq!(rules, expected);

    let binding = resource("ClusterRoleBinding", "ambit-agent");
    assert_eq!(binding["roleRef"]["kind"], "ClusterRole");
    assert_eq!(binding["roleRef"]["name"], "ambit-agent");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "ambit", "namespace": NAMESPACE}])
    );
    resource("ServiceAccount", "ambit");
    let ds = resource("DaemonSet", "ambit");
    assert_eq!(pod_spec(ds)["serviceAccountName"], "ambit");
    // Nothing else runs with the agent's account.
    for r in resources() {
        if r["kind"] == "DaemonSet" && r["metadata"]["name"] != "ambit" {
            assert!(pod_spec(r).get("serviceAccountName").is_none(), "{r}");
        }
    }
    // Namespaced resources live in the agent's namespace.
    for r in resources() {
        let cluster_scoped = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
        if !cluster_scoped.contains(&r["kind"].as_str().unwrap_or_default()) {
            assert_eq!(r["metadata"]["namespace"], NAMESPACE, "{}", r["metadata"]);
        }
    }
}

#[test]
fn the_agent_runs_on_every_node_and_upgrades_with_surge() {
    let ds = resource("DaemonSet", "ambit");
    let spec = pod_spec(ds);
    assert_eq!(
        ds["spec"]["updateStrategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}})
    );
    assert_eq!(spec["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_ne!(spec["hostPID"], true);
    // On the host network a declared port is a host port: the surge pod could not be scheduled.
    for c in containers(ds) {
        assert!(c.get("ports").is_none(), "{} declares ports", c["name"]);
    }

    let agent = container(ds, "agent");
    assert_eq!(
        agent["command"],
        json!([
            "ambit-agent",
            "run",
            "--config",
            "/etc/ambit/config.yaml",
            "--log-format",
            "json"
        ])
    );
    assert_eq!(
        agent["readinessProbe"]["httpGet"],
        json!({"path": "/healthz/ready", "port": 15021})
    );
    for (name, field) in [
        ("NODE_NAME", "spec.nodeName"),
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
        ("INSTANCE_IPS", "status.podIPs"),
    ] {
        let env = agent["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"));
        assert_eq!(env["valueFrom"]["fieldRef"]["fieldPath"], field, "{name}");
    }
    let resources = &agent["resources"];
    assert!(
        resources["requests"]["cpu"].is_string() && resources["requests"]["memory"].is_string()
    );
    assert!(resources["limits"]["memory"].is_string());

    let config = agent_config();
    let drain = config["drainTimeoutSeconds"].as_f64().unwrap_or(5.0);
    let grace = spec["terminationGracePeriodSeconds"]
        .as_f64()
        .unwrap_or(30.0);
    assert!(
        grace > drain,
        "terminationGracePeriodSeconds {grace} must exceed drainTimeoutSeconds {drain}"
    );
}

#[test]
fn the_agent_gets_capabilities_not_privileged() {
    let ds = resource("DaemonSet", "ambit");
    let agent = container(ds, "agent");
    let sc = &agent["securityContext"];
    assert_ne!(sc["privileged"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), set(&["ALL"]));
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        set(&["BPF", "NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"])
    );
    for r in resources() {
        if r["kind"] != "DaemonSet" {
            continue;
        }
        for c in containers(r) {
            let privileged = c["securityContext"]["privileged"] == true;
            // The API server refuses Bidirectional propagation in unprivileged containers.
            let bidirectional = c["volumeMounts"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|m| m["mountPropagation"] == "Bidirectional");
            assert_eq!(
                privileged, bidirectional,
                "{}/{}: only the bpffs mount needs (and gets) privileged",
                r["metadata"]["name"], c["name"]
            );
            if privileged {
                assert_eq!(c["name"], "mount-bpffs");
            }
        }
    }
}

/// The agent's config, from the ConfigMap.
fn agent_config() -> Value {
    let cm = resource("ConfigMap", "ambit-config");
    let text = cm["data"]["config.yaml"]
        .as_str()
        .expect("config.yaml in the ConfigMap");
    yaml_docs(text).pop().expect("a config document")
}

/// The volume behind the mount of `container` that holds `path`.
fn volume_for<'a>(ds: &'a Value, container: &Value, path: &str) -> (&'a Value, String) {
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .filter(|m| {
            let at = m["mountPath"].as_str().expect("mountPath");
            Path::new(path).starts_with(at)
        })
        .max_by_key(|m| m["mountPath"].as_str().map(str::len))
        .unwrap_or_else(|| panic!("nothing of {} is mounted at {path}", container["name"]));
    let name = mount["name"].as_str().expect("name");
    let volume = pod_spec(ds)["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"));
    let rest = Path::new(path)
        .strip_prefix(mount["mountPath"].as_str().expect("mountPath"))
        .expect("under the mount")
        .to_string_lossy()
        .into_owned();
    (volume, rest)
}

#[test]
fn every_path_of_the_agent_config_is_mounted() {
    let ds = resource("DaemonSet", "ambit");
    let agent = container(ds, "agent");
    let config = agent_config();
    assert_eq!(
        config.get("node"),
        None,
        "node comes from NODE_NAME in Kubernetes"
    );
    assert_eq!(config["kubernetes"], json!({}));

    let (volume, file) = volume_for(ds, agent, "/etc/ambit/config.yaml");
    assert_eq!(volume["configMap"]["name"], "ambit-config");
    assert_eq!(file, "config.yaml");

    for key in ["ca", "xds"] {
        let endpoint = if key == "ca" {
            &config["ca"]["istio"]
        } else {
            &config["xds"]
        };
        assert_eq!(
            endpoint["address"], "https://istiod.istio-system.svc:15012",
            "{key}"
        );
        let (volume, file) =
            volume_for(ds, agent, endpoint["rootCert"].as_str().expect("rootCert"));
        assert_eq!(volume["configMap"]["name"], "istio-ca-root-cert", "{key}");
        assert_eq!(file, "root-cert.pem", "{key}");
        let (volume, file) = volume_for(
            ds,
            agent,
            endpoint["tokenPath"].as_str().expect("tokenPath"),
        );
        let token = &volume["projected"]["sources"][0]["serviceAccountToken"];
        assert_eq!(token["audience"], "istio-ca", "{key}");
        assert_eq!(token["path"], json!(file), "{key}");
    }
    assert_eq!(config["trustRoots"], config["ca"]["istio"]["rootCert"]);

    // Host paths, at the same place in the container as on the host.
    let host_path = |path: &str| {
        let (volume, rest) = volume_for(ds, agent, path);
        let host = volume["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not on a hostPath volume"));
        Path::new(host).join(rest)
    };
    for key in ["adminSocket", "cniStateFile", "bpfPinPath", "stateDir"] {
        let path = config[key].as_str().unwrap_or_else(|| panic!("{key}"));
        assert_eq!(host_path(path), Path::new(path), "{key}");
    }
    // The pods' cgroup is relative to the host's cgroup v2 mount.
    let cgroup = config["cgroup"].as_str().expect("cgroup");
    let cgroup = format!("/sys/fs/cgroup{cgroup}");
    assert_eq!(host_path(&cgroup), Path::new(&cgroup));

    // The CNI plugin (on the host) is told the same socket and state file.
    let install = container(ds, "install-cni");
    for (env, key) in [
        ("AMBIT_AGENT_SOCKET", "adminSocket"),
        ("AMBIT_CNI_STATE_FILE", "cniStateFile"),
    ] {
        let value = install["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == env)
            .unwrap_or_else(|| panic!("no {env}"));
        assert_eq!(value["value"], config[key], "{env}");
    }

    // Every mount names a volume, every volume is mounted.
    for r in resources() {
        if r["kind"] != "DaemonSet" {
            continue;
        }
        let volumes: BTreeSet<String> = pod_spec(r)["volumes"]
            .as_array()
            .expect("volumes")
            .iter()
            .map(|v| v["name"].as_str().expect("name").to_owned())
            .collect();
        let mounted: BTreeSet<String> = containers(r)
            .iter()
            .flat_map(|c| c["volumeMounts"].as_array().into_iter().flatten())
            .map(|m| m["name"].as_str().expect("name").to_owned())
            .collect();
        assert_eq!(volumes, mounted, "{}", r["metadata"]["name"]);
    }
}

/// The ConfigMap's config as the agent reads it, with the environment the DaemonSet gives it:
/// `nodeAddresses` from INSTANCE_IPS and the xDS pod name and namespace from POD_NAME /
/// POD_NAMESPACE (a ConfigMap shared by every node cannot hold them).
#[test]
fn the_agent_accepts_the_configmap_config() {
    let dir = TempDir::new("config");
    let path = dir.path().join("config.yaml");
    let cm = resource("ConfigMap", "ambit-config");
    std::fs::write(&path, cm["data"]["config.yaml"].as_str().expect("config")).expect("write");
    let agent = ambit_testbed::agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(agent)
        .args(["check", "--config"])
        .arg(&path)
        .env("NODE_NAME", "node-a")
        .env("POD_NAME", "ambit-x2j4k")
        .env("POD_NAMESPACE", NAMESPACE)
        .env("INSTANCE_IPS", "10.0.0.1,fd00::1")
        // What the kubelet gives every pod: the in-cluster API server.
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .output()
        .expect("run ambit-agent check");
    assert!(out.status.success(), "{}", text(&out));
    let seen: Value = serde_json::from_slice(&out.stdout).expect("check prints the config as JSON");
    assert_eq!(seen["node"], "node-a");
    assert_eq!(seen["nodeAddresses"], json!(["10.0.0.1", "fd00::1"]));
    // istiod accepts an xDS client only in the namespace of its token's service account.
    assert_eq!(seen["xds"]["podName"], "ambit-x2j4k");
    assert_eq!(seen["xds"]["podNamespace"], NAMESPACE);
}

/// A fresh directory under the target's tmp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "manifests-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A node's CNI directories, a stand-in for the ambit-cni binary (answers VERSION), and the
/// install script run on them with `sh`, as the init container runs it.
struct CniNode {
    dir: TempDir,
}

const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "bridge-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.1.0/24"}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
"#;

impl CniNode {
    fn new(supported_versions: &[&str]) -> Self {
        for tool in ["sh", "jq"] {
            let found = Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success());
            assert!(found, "{tool} is not installed: run `cargo xtask setup`");
        }
        let dir = TempDir::new("cni");
        std::fs::create_dir_all(dir.path().join("bin")).expect("bin dir");
        std::fs::create_dir_all(dir.path().join("net.d")).expect("conf dir");
        let versions = serde_json::to_string(supported_versions).expect("json");
        let plugin = format!(
            "#!/bin/sh\n\
             [ \"$CNI_COMMAND\" = VERSION ] || exit 1\n\
             cat >/dev/null\n\
             echo '{{\"cniVersion\": \"1.0.0\", \"supportedVersions\": {versions}}}'\n"
        );
        let plugin_path = dir.path().join("ambit-cni");
        std::fs::write(&plugin_path, plugin).expect("write plugin");
        let chmod = Command::new("chmod")
            .arg("755")
            .arg(&plugin_path)
            .status()
            .expect("chmod");
        assert!(chmod.success());
        Self { dir }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.dir.path().join("net.d").join(name)
    }

    fn installed_plugin(&self) -> PathBuf {
        self.dir.path().join("bin").join("ambit-cni")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("sh")
            .arg(install_script())
            .arg("--bin-dir")
            .arg(self.dir.path().join("bin"))
            .arg("--conf-dir")
            .arg(self.dir.path().join("net.d"))
            .arg("--plugin")
            .arg(self.dir.path().join("ambit-cni"))
            .args(["--agent-socket", "/run/ambit/admin.sock"])
            .args(["--state-file", "/var/lib/ambit/cni-state.json"])
            .args(args)
            .env_remove("CNI_BIN_DIR")
            .env_remove("CNI_CONF_DIR")
            .output()
            .expect("run the install script with sh")
    }

    /// Runs the script and expects exit status `code`.
    #[track_caller]
    fn run_expecting(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        let report = text(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}:\n{report}");
        report
    }

    fn json(&self, name: &str) -> Value {
        let text = std::fs::read_to_string(self.conf(name)).expect("read conflist");
        serde_json::from_str(&text).expect("the conflist is JSON")
    }

    /// The names of the files of the config dir (no temporary files left behind).
    fn conf_files(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.path().join("net.d"))
            .expect("read conf dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn ambit_entries(conflist: &Value) -> Vec<&Value> {
    conflist["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter(|p| p["type"] == "ambit-cni")
        .collect()
}

#[test]
fn cni_install_chains_the_plugin_once_and_uninstall_restores_the_config() {
    let node = CniNode::new(&["0.3.1", "0.4.0", "1.0.0"]);
    std::fs::write(node.conf("10-bridge.conflist"), BRIDGE_CONFLIST).expect("write");
    let original: Value = serde_json::from_str(BRIDGE_CONFLIST).expect("json");

    let report = node.run_expecting(&[], 0);
    assert!(report.contains("chained ambit-cni into"), "{report}");
    let report = node.run_expecting(&[], 0);
    assert!(report.contains("already chains ambit-cni"), "{report}");

    let chained = node.json("10-bridge.conflist");
    assert_eq!(
        ambit_entries(&chained),
        vec![&json!({
            "type": "ambit-cni",
            "agentSocket": "/run/ambit/admin.sock",
            "stateFile": "/var/lib/ambit/cni-state.json"
        })]
    );
    // Appended: the others keep their order and content.
    let plugins = chained["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.last().expect("last")["type"], "ambit-cni");
    assert_eq!(
        plugins[..plugins.len() - 1],
        original["plugins"].as_array().expect("plugins")[..]
    );
    assert_eq!(chained["cniVersion"], original["cniVersion"]);
    assert_eq!(chained["name"], original["name"]);
    assert!(node.installed_plugin().is_file());
    assert_eq!(node.conf_files(), ["10-bridge.conflist"]);

    let report = node.run_expecting(&["--uninstall"], 0);
    assert!(report.contains("removed ambit-cni from"), "{report}");
    assert_eq!(node.json("10-bridge.conflist"), original);
    assert!(!node.installed_plugin().exists());
    assert_eq!(node.conf_files(), ["10-bridge.conflist"]);
    // Nothing left to remove is not an error.
    node.run_expecting(&["--uninstall"], 0);
    assert_eq!(node.json("10-bridge.conflist"), original);
}

#[test]
fn cni_install_updates_an_existing_entry_in_place() {
    let node = CniNode::new(&["1.0.0"]);
    let mut conflist: Value = serde_json::from_str(BRIDGE_CONFLIST).expect("json");
    let plugins = conflist["plugins"].as_array_mut().expect("plugins");
    let stale = json!({"type": "ambit-cni", "agentSocket": "/old.sock", "stateFile": "/old.json"});
    plugins.insert(1, stale.clone());
    plugins.push(stale);
    std::fs::write(node.conf("10-bridge.conflist"), conflist.to_string()).expect("write");

    node.run_expecting(&[], 0);
    let chained = node.json("10-bridge.conflist");
    let plugins = chained["plugins"].as_array().expect("plugins");
    assert_eq!(plugins.len(), 3, "{chained}");
    assert_eq!(plugins[1]["type"], "ambit-cni");
    assert_eq!(plugins[1]["agentSocket"], "/run/ambit/admin.sock");
    assert_eq!(plugins[1]["stateFile"], "/var/lib/ambit/cni-state.json");
}

#[test]
fn cni_install_leaves_a_config_that_is_not_json_alone() {
    let node = CniNode::new(&["1.0.0"]);
    let broken = "{\"cniVersion\": \"1.0.0\", \"plugins\": [{\"type\": \"bridge\"}\n";
    std::fs::write(node.conf("10-bridge.conflist"), broken).expect("write");
    let report = node.run_expecting(&[], 1);
    assert!(
        report.contains("is not valid JSON; left unchanged"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(node.conf("10-bridge.conflist")).expect("read"),
        broken
    );
    assert!(!node.installed_plugin().exists());
    assert_eq!(node.conf_files(), ["10-bridge.conflist"]);
}

#[test]
fn cni_install_refuses_a_list_whose_version_the_plugin_does_not_support() {
    let node = CniNode::new(&["1.0.0"]);
    let old = BRIDGE_CONFLIST.replace("\"1.0.0\"", "\"0.3.1\"");
    std::fs::write(node.conf("10-bridge.conflist"), &old).expect("write");
    let report = node.run_expecting(&[], 1);
    assert!(
        report.contains("uses CNI version 0.3.1, which") && report.contains("does not support"),
        "{report}"
    );
    assert_eq!(
        std::fs::read_to_string(node.conf("10-bridge.conflist")).expect("read"),
        old
    );
}

#[test]
fn cni_install_chains_into_the_config_the_runtime_uses() {
    let node = CniNode::new(&["1.0.0"]);
    std::fs::write(node.conf("10-bridge.conflist"), BRIDGE_CONFLIST).expect("write");
    std::fs::write(node.conf("20-other.conflist"), BRIDGE_CONFLIST).expect("write");
    std::fs::write(node.conf("README"), "not a config").expect("write");
    node.run_expecting(&[], 0);
    assert_eq!(ambit_entries(&node.json("10-bridge.conflist")).len(), 1);
    assert_eq!(ambit_entries(&node.json("20-other.conflist")).len(), 0);

    // A single-plugin .conf sorting first is what the runtime loads: chaining elsewhere would
    // do nothing, so it is an error.
    let single = r#"{"cniVersion": "1.0.0", "name": "n", "type": "bridge"}"#;
    std::fs::write(node.conf("05-single.conf"), single).expect("write");
    let report = node.run_expecting(&[], 1);
    assert!(report.contains("is not a plugin list"), "{report}");
    assert_eq!(
        std::fs::read_to_string(node.conf("05-single.conf")).expect("read"),
        single
    );
}

#[test]
fn cni_install_without_a_config_fails_after_waiting() {
    let node = CniNode::new(&["1.0.0"]);
    let report = node.run_expecting(&["--wait", "1"], 1);
    assert!(report.contains("no CNI config"), "{report}");
    assert!(!node.installed_plugin().exists());
    let report = node.run_expecting(&["--wait", "soon"], 2);
    assert!(
        report.contains("--wait takes a number of seconds"),
        "{report}"
    );
}

#[test]
fn cni_uninstall_keeps_the_binary_while_a_config_naming_it_cannot_be_cleaned() {
    let node = CniNode::new(&["1.0.0"]);
    std::fs::write(node.conf("10-bridge.conflist"), BRIDGE_CONFLIST).expect("write");
    node.run_expecting(&[], 0);
    let broken = "{\"plugins\": [{\"type\": \"ambit-cni\"}";
    std::fs::write(node.conf("20-broken.conflist"), broken).expect("write");
    let report = node.run_expecting(&["--uninstall"], 1);
    assert!(
        report.contains("20-broken.conflist mentions ambit-cni but is not valid JSON"),
        "{report}"
    );
    // The good config is cleaned, the broken one left as it was, and the binary kept for it.
    assert_eq!(ambit_entries(&node.json("10-bridge.conflist")).len(), 0);
    assert_eq!(
        std::fs::read_to_string(node.conf("20-broken.conflist")).expect("read"),
        broken
    );
    assert!(node.installed_plugin().is_file());
}

/// Dockerfile instructions: continuation lines joined, comments and blank lines dropped.
fn dockerfile_instructions() -> Vec<(String, Vec<String>)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).expect("read Dockerfile");
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(trimmed);
        let mut words = current.split_whitespace().map(str::to_owned);
        if let Some(op) = words.next() {
            out.push((op.to_uppercase(), words.collect()));
        }
        current.clear();
    }
    out
}

#[test]
fn the_dockerfile_builds_and_ships_the_three_binaries_and_the_install_script() {
    let binaries = ["ambit-agent", "ambitctl", "ambit-cni"];
    let instructions = dockerfile_instructions();
    let ignored: Vec<String> = std::fs::read_to_string(repo_root().join(".dockerignore"))
        .expect("read .dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_end_matches('/').to_owned())
        .collect();

    let mut stages: Vec<String> = Vec::new();
    let mut shipped: BTreeSet<String> = BTreeSet::new();
    let mut built = false;
    let mut runtime_has_jq = false;
    for (op, args) in &instructions {
        match op.as_str() {
            "FROM" => {
                let alias = match args.as_slice() {
                    [_, as_, alias] if as_.eq_ignore_ascii_case("as") => alias.clone(),
                    _ => String::new(),
                };
                stages.push(alias);
                shipped.clear();
            }
            "RUN" => {
                let line = args.join(" ");
                if line.contains("cargo build") {
                    assert!(line.contains("--release"), "{line}");
                    for bin in binaries {
                        assert!(line.contains(&format!("--bin {bin}")), "{line}");
                        assert!(line.contains(&format!("target/release/{bin}")), "{line}");
                    }
                    built = true;
                }
                if line.contains("apt-get install") && stages.len() > 1 {
                    runtime_has_jq |= line.split_whitespace().any(|w| w == "jq");
                }
            }
            "COPY" => {
                let from = args
                    .iter()
                    .find_map(|a| a.strip_prefix("--from="))
                    .map(str::to_owned);
                let paths: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
                let (dest, sources) = paths.split_last().expect("COPY needs a destination");
                for source in sources {
                    let name = Path::new(source.as_str())
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    match &from {
                        Some(stage) => assert!(
                            stages[..stages.len() - 1].contains(stage),
                            "COPY --from={stage}: no earlier stage of that name"
                        ),
                        None => {
                            assert!(
                                repo_root().join(source.as_str()).exists(),
                                "COPY {source}: not in the repository"
                            );
                            assert!(
                                !ignored.iter().any(|i| {
                                    source.as_str() == i || source.starts_with(&format!("{i}/"))
                                }),
                                "COPY {source}: excluded by .dockerignore"
                            );
                        }
                    }
                    if dest.ends_with('/') {
                        shipped.insert(name);
                    } else {
                        shipped.insert(
                            Path::new(dest.as_str())
                                .file_name()
                                .map(|n| n.to_string_lossy().into_owned())
                                .unwrap_or_default(),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    assert!(built, "no `cargo build` of the three binaries");
    assert!(stages.len() >= 2, "a build stage and a runtime stage");
    assert!(
        runtime_has_jq,
        "the runtime stage must install jq (ambit-cni-install)"
    );
    for bin in binaries.iter().chain(&["ambit-cni-install"]) {
        assert!(
            shipped.contains(*bin),
            "the final stage does not ship {bin}: {shipped:?}"
        );
    }
    // Whatever the manifests run from the image is in it (sh and sleep come with the base).
    for r in resources() {
        if r["kind"] != "DaemonSet" {
            continue;
        }
        for c in containers(r) {
            let program = c["command"][0].as_str().expect("a command");
            assert!(
                shipped.contains(program) || ["sh", "sleep"].contains(&program),
                "{}/{} runs {program}, which the image does not have",
                r["metadata"]["name"],
                c["name"]
            );
        }
    }
    // The builder must not see the host's build output.
    assert!(
        ignored.iter().any(|i| i == "target"),
        ".dockerignore must exclude target/"
    );
}

fn waypoint_dir() -> PathBuf {
    repo_root().join("deploy").join("waypoint")
}

/// Every resource of deploy/waypoint, by file.
fn waypoint_resources() -> Vec<(PathBuf, Vec<Value>)> {
    manifests_in(&waypoint_dir())
        .into_iter()
        .map(|f| (f.clone(), yaml_file(&f)))
        .collect()
}

fn waypoint_resource(kind: &str) -> Value {
    waypoint_resources()
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .find(|r| r["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} under {}", waypoint_dir().display()))
}

/// The core kinds validate against the schemas; the Gateway API objects (which the schemas do
/// not know) are checked against what the waypoint needs of them; the kustomization lists them.
#[test]
fn the_waypoint_manifests_validate_and_agree_with_each_other() {
    let all = waypoint_resources();
    let gateway_api = |docs: &[Value]| {
        docs.iter().any(|d| {
            d["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with("gateway.networking.k8s.io/"))
        })
    };
    let core: Vec<PathBuf> = all
        .iter()
        .filter(|(_, docs)| !gateway_api(docs))
        .map(|(f, _)| f.clone())
        .collect();
    for version in KUBERNETES_VERSIONS {
        let out = validate(&core, version);
        let report = text(&out);
        assert!(out.status.success(), "Kubernetes {version}:\n{report}");
        assert!(
            !report.contains("WARN") && !report.contains("ERROR"),
            "Kubernetes {version}:\n{report}"
        );
    }

    let class = waypoint_resource("GatewayClass");
    // The controllerName the waypoint writes in route status (`waypoint::cluster::CONTROLLER`).
    assert_eq!(class["spec"]["controllerName"], "ambit.dev/waypoint");
    let gateway = waypoint_resource("Gateway");
    assert_eq!(
        gateway["spec"]["gatewayClassName"],
        class["metadata"]["name"]
    );
    assert_eq!(
        gateway["spec"]["listeners"],
        json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
    );
    // The config's waypoint is the Gateway, with the Deployment's service account.
    let cm = waypoint_resource("ConfigMap");
    let config = yaml_docs(cm["data"]["config.yaml"].as_str().expect("config"))
        .pop()
        .expect("a config document");
    assert_eq!(config["waypoint"]["name"], gateway["metadata"]["name"]);
    assert_eq!(
        config["waypoint"]["namespace"],
        gateway["metadata"]["namespace"]
    );
    let deployment = waypoint_resource("Deployment");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(
        pod["serviceAccountName"],
        config["waypoint"]["serviceAccount"]
    );
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["istio.io/dataplane-mode"], "none",
        "the waypoint's own HBONE traffic is not captured again"
    );
    // Least privilege: read what it follows, write only route status.
    let role = waypoint_resource("ClusterRole");
    assert_eq!(
        role["rules"],
        json!([
            {"apiGroups": [""], "resources": ["namespaces", "services"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"],
             "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["gateway.networking.k8s.io"], "resources": ["gateways/status"],
             "verbs": ["patch"]},
            {"apiGroups": ["networking.istio.io"], "resources": ["destinationrules"],
             "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["security.istio.io"], "resources": ["authorizationpolicies"],
             "verbs": ["get", "list", "watch"]},
        ])
    );
    let kustomization = yaml_file(&waypoint_dir().join("kustomization.yaml"));
    let listed: BTreeSet<String> = strings(&kustomization[0]["resources"]);
    let present: BTreeSet<String> = all
        .iter()
        .map(|(f, _)| f.file_name().expect("name").to_string_lossy().into_owned())
        .collect();
    assert_eq!(listed, present);
}

/// The waypoint's ConfigMap config as `ambit-agent check` reads it in the pod's environment.
#[test]
fn the_waypoint_accepts_its_configmap_config() {
    let dir = TempDir::new("waypoint-config");
    let path = dir.path().join("config.yaml");
    let cm = waypoint_resource("ConfigMap");
    std::fs::write(&path, cm["data"]["config.yaml"].as_str().expect("config")).expect("write");
    let agent = ambit_testbed::agent_bin().unwrap_or_else(|e| panic!("{e:#}"));
    let out = Command::new(agent)
        .args(["check", "--config"])
        .arg(&path)
        .env("NODE_NAME", "node-a")
        .env("POD_NAME", "waypoint-7c9f")
        .env("POD_NAMESPACE", "default")
        .env("INSTANCE_IPS", "10.1.0.7,fd00:1::7")
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .output()
        .expect("run ambit-agent check");
    assert!(out.status.success(), "{}", text(&out));
    let seen: Value = serde_json::from_slice(&out.stdout).expect("check prints the config as JSON");
    assert_eq!(seen["waypoint"]["name"], "waypoint");
    assert_eq!(seen["kubernetes"]["apiServer"], "https://10.96.0.1:443");
}
