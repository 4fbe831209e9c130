//! The CNI protocol as `ambit-cni` sees it (spec 1.0.0 and 1.1.0, and the 0.3/0.4 results that
//! runtimes still send): the environment, the network config on stdin, `CNI_ARGS`, the previous
//! plugins' result, and the error object. Pure parsing, no IO, so all of it is unit tested.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Duration};

use ambit_agent::admin::api;
use serde::Deserialize;
use serde_json::{Map, Value};

/// The spec versions we speak, oldest first. 0.3.0 is the first with chaining (`prevResult`).
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// What we answer with when the caller named no version we know.
pub const LATEST_VERSION: &str = "1.1.0";

/// The default of `agentSocket`.
pub const DEFAULT_AGENT_SOCKET: &str = api::DEFAULT_SOCKET;
/// The default of `stateFile`.
pub const DEFAULT_STATE_FILE: &str = "/var/lib/ambit/cni-state.json";
/// The default of `timeoutSeconds`: how long an ADD waits for the pod's enrollment.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest `timeoutSeconds` accepted: beyond it the kubelet has given up on the sandbox
/// long ago.
const MAX_TIMEOUT_SECONDS: f64 = 600.0;

/// Error codes (the spec's well-known ones, then ours from 100).
pub mod code {
    /// The config's `cniVersion` is not one we speak, or too old for the command.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// A required `CNI_*` variable is missing or malformed; the message names it.
    pub const INVALID_ENV: u32 = 4;
    /// Reading stdin failed.
    pub const IO_FAILURE: u32 = 5;
    /// Stdin is not JSON.
    pub const DECODE_FAILURE: u32 = 6;
    /// The network config (including `prevResult`) is not what we need.
    pub const INVALID_CONFIG: u32 = 7;
    /// Transient: the agent is unreachable (or shutting down) and the pod belongs to the mesh.
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Ours: the agent answered with an error (ADD: enrollment failed; CHECK: not captured).
    pub const AGENT_REFUSED: u32 = 100;
    /// Ours: a bug in the plugin (it panicked); the details say where.
    pub const BUG: u32 = 999;
}

/// The error object printed on stdout with a non-zero exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    /// Short, what went wrong.
    pub msg: String,
    /// Longer: why, and what to check.
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object of the spec, in `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// A `major.minor.patch` version, for "at least" checks.
fn parse_version(v: &str) -> Option<(u32, u32, u32)> {
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(Some(a)), Some(Some(b)), Some(Some(c)), None) => Some((a, b, c)),
        _ => None,
    }
}

/// Whether `version` is at least `min` (both `x.y.z`; an unparsable one is not).
pub fn at_least(version: &str, min: &str) -> bool {
    match (parse_version(version), parse_version(min)) {
        (Some(v), Some(m)) => v >= m,
        _ => false,
    }
}

/// The version to put in a reply: the caller's `cniVersion` when stdin has one, else ours.
pub fn reply_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

/// The `VERSION` answer: the caller's version echoed when we speak it, else our latest.
pub fn version_result(stdin: &[u8]) -> Value {
    let asked = reply_version(stdin);
    let version = if SUPPORTED_VERSIONS.contains(&asked.as_str()) {
        asked
    } else {
        LATEST_VERSION.to_owned()
    };
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED_VERSIONS,
    })
}

/// The operation asked for in `CNI_COMMAND`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Option<Command> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "GC" => Command::Gc,
            "STATUS" => Command::Status,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Gc => "GC",
            Command::Status => "STATUS",
            Command::Version => "VERSION",
        }
    }

    /// The first spec version that has this command.
    fn since(self) -> &'static str {
        match self {
            Command::Add | Command::Del | Command::Version => "0.3.0",
            Command::Check => "0.4.0",
            Command::Gc | Command::Status => "1.1.0",
        }
    }
}

/// The `CNI_*` environment of one invocation, as the runtime set it (`None` when unset).
/// `CNI_PATH` is not read: ambit-cni delegates to no other plugin.
#[derive(Clone, Debug, Default)]
pub struct Env {
    pub command: Option<String>,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    /// Reads the variables through `get` (the process environment in `main`); a value that is
    /// not UTF-8 is an error naming the variable.
    pub fn read(get: impl Fn(&str) -> Option<std::ffi::OsString>) -> Result<Env, CniError> {
        let var = |name: &str| -> Result<Option<String>, CniError> {
            get(name)
                .map(|v| {
                    v.into_string().map_err(|_| {
                        CniError::new(
                            code::INVALID_ENV,
                            format!("{name} is not valid UTF-8"),
                            format!("the container runtime set {name} to bytes that are not UTF-8"),
                        )
                    })
                })
                .transpose()
        };
        Ok(Env {
            command: var("CNI_COMMAND")?,
            container_id: var("CNI_CONTAINERID")?,
            netns: var("CNI_NETNS")?,
            ifname: var("CNI_IFNAME")?,
            args: var("CNI_ARGS")?,
        })
    }

    /// The command, or the spec's error for a missing or unknown one.
    pub fn command(&self) -> Result<Command, CniError> {
        match self.command.as_deref() {
            None | Some("") => Err(CniError::new(
                code::INVALID_ENV,
                "CNI_COMMAND is not set",
                "ambit-cni is a CNI plugin: the container runtime runs it with CNI_COMMAND \
                 (ADD, DEL, CHECK, GC, STATUS or VERSION) and the network config on stdin",
            )),
            Some(c) => Command::parse(c).ok_or_else(|| {
                CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {c:?} is not supported"),
                    "CNI_COMMAND must be one of ADD, DEL, CHECK, GC, STATUS, VERSION",
                )
            }),
        }
    }

    /// Fails with one error naming every variable of `names` that is unset or empty.
    pub fn require(&self, command: Command, names: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| {
                let v = match *n {
                    "CNI_CONTAINERID" => &self.container_id,
                    "CNI_NETNS" => &self.netns,
                    "CNI_IFNAME" => &self.ifname,
                    _ => &None,
                };
                v.as_deref().is_none_or(str::is_empty)
            })
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(CniError::new(
            code::INVALID_ENV,
            format!("missing {}", missing.join(", ")),
            format!(
                "{} needs {}; the container runtime did not set {}",
                command.as_str(),
                names.join(", "),
                missing.join(", ")
            ),
        ))
    }
}

/// `CNI_ARGS`: `KEY=VALUE` pairs separated by `;` (later pairs win over earlier ones).
pub fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.trim().is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_ARGS is malformed",
                format!("CNI_ARGS must be KEY=VALUE pairs separated by ';'; {pair:?} has no '='"),
            ));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                "CNI_ARGS is malformed",
                format!("CNI_ARGS pair {pair:?} has an empty key"),
            ));
        }
        out.insert(key.to_owned(), value.trim().to_owned());
    }
    Ok(out)
}

/// A Kubernetes pod as `CNI_ARGS` names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// Empty when the runtime did not pass `K8S_POD_UID`.
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The pod in `CNI_ARGS`: `None` when neither `K8S_POD_NAMESPACE` nor `K8S_POD_NAME` is there
/// (not a Kubernetes pod); an error when only one is, since a pod that cannot be named cannot
/// be judged, and letting it through could start a mesh pod uncaptured.
pub fn pod_ref(args: &BTreeMap<String, String>) -> Result<Option<PodRef>, CniError> {
    let get = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
    match (get("K8S_POD_NAMESPACE"), get("K8S_POD_NAME")) {
        (None, None) => Ok(None),
        (Some(namespace), Some(name)) => Ok(Some(PodRef {
            namespace,
            name,
            uid: get("K8S_POD_UID").unwrap_or_default(),
        })),
        (namespace, _) => {
            let (has, lacks) = if namespace.is_some() {
                ("K8S_POD_NAMESPACE", "K8S_POD_NAME")
            } else {
                ("K8S_POD_NAME", "K8S_POD_NAMESPACE")
            };
            Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_ARGS has {has} but no {lacks}"),
                "a Kubernetes runtime passes both K8S_POD_NAMESPACE and K8S_POD_NAME in CNI_ARGS; \
                 without both the pod cannot be judged for the mesh",
            ))
        }
    }
}

/// The network config on stdin: the fields of the spec we use and ours. Other fields
/// (`runtimeConfig`, `args`, `capabilities`, ...) are accepted and ignored.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    name: String,
    #[serde(default, rename = "type")]
    plugin_type: String,
    #[serde(default)]
    prev_result: Option<Map<String, Value>>,
    #[serde(default)]
    agent_socket: Option<PathBuf>,
    #[serde(default)]
    state_file: Option<PathBuf>,
    #[serde(default)]
    timeout_seconds: Option<f64>,
    #[serde(default)]
    log_file: Option<PathBuf>,
}

/// The validated network config.
#[derive(Clone, Debug, PartialEq)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The previous plugins' result (the interface plugin's, e.g. `bridge`).
    pub prev_result: Option<Map<String, Value>>,
    /// The agent's admin socket (`agentSocket`).
    pub agent_socket: PathBuf,
    /// What the agent left for us when it cannot be reached (`stateFile`).
    pub state_file: PathBuf,
    /// How long an ADD or CHECK waits for the agent (`timeoutSeconds`).
    pub timeout: Duration,
    /// A file our log lines are appended to, besides stderr (`logFile`).
    pub log_file: Option<PathBuf>,
}

fn invalid(msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg, details)
}

/// Parses and validates the network config for `command`.
pub fn parse_conf(stdin: &[u8], command: Command) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return Err(invalid(
            "no network config on stdin",
            "the container runtime passes the network config as JSON on stdin",
        ));
    }
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            "the network config is not JSON",
            format!("cannot parse stdin: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(invalid(
            "the network config is not a JSON object",
            format!("stdin holds a JSON {}", json_kind(&value)),
        ));
    }
    let raw: RawConf = serde_path_to_error::deserialize(value).map_err(|e| {
        invalid(
            format!("invalid network config field {}", e.path()),
            e.inner().to_string(),
        )
    })?;

    if raw.cni_version.is_empty() {
        return Err(invalid(
            "the network config has no cniVersion",
            format!("set cniVersion to one of {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    if !SUPPORTED_VERSIONS.contains(&raw.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("cniVersion {} is not supported", raw.cni_version),
            format!(
                "ambit-cni supports {} (chaining needs 0.3.0 or later)",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    if !at_least(&raw.cni_version, command.since()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{} is not defined in cniVersion {}",
                command.as_str(),
                raw.cni_version
            ),
            format!(
                "{} exists from CNI spec {} on",
                command.as_str(),
                command.since()
            ),
        ));
    }
    if raw.name.is_empty() {
        return Err(invalid(
            "the network config has no name",
            "the container runtime sets name from the network config list",
        ));
    }
    if raw.plugin_type.is_empty() {
        return Err(invalid(
            "the network config has no type",
            "the plugin's entry in the network config list needs \"type\": \"ambit-cni\"",
        ));
    }
    let timeout = match raw.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_TIMEOUT_SECONDS => {
            Duration::from_secs_f64(t)
        }
        Some(t) => {
            return Err(invalid(
                format!("invalid timeoutSeconds {t}"),
                format!("timeoutSeconds must be more than 0 and at most {MAX_TIMEOUT_SECONDS}"),
            ));
        }
    };
    let path = |field: &str, p: Option<PathBuf>, default: &str| -> Result<PathBuf, CniError> {
        match p {
            None => Ok(PathBuf::from(default)),
            Some(p) if p.as_os_str().is_empty() => Err(invalid(
                format!("{field} is empty"),
                format!("leave {field} out for the default {default}, or name a path"),
            )),
            Some(p) => Ok(p),
        }
    };
    Ok(NetConf {
        agent_socket: path("agentSocket", raw.agent_socket, DEFAULT_AGENT_SOCKET)?,
        state_file: path("stateFile", raw.state_file, DEFAULT_STATE_FILE)?,
        timeout,
        log_file: raw.log_file.filter(|p| !p.as_os_str().is_empty()),
        cni_version: raw.cni_version,
        name: raw.name,
        prev_result: raw.prev_result,
    })
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The pod's IPs in a result: every `ips[].address` (CIDR, the prefix dropped), except those on
/// an interface the result describes as the host's (no `sandbox`), without duplicates.
pub fn pod_ips(result: &Map<String, Value>) -> Result<Vec<IpAddr>, CniError> {
    let ips = match result.get("ips") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(ips)) => ips,
        Some(other) => {
            return Err(invalid(
                "prevResult.ips is not a list",
                format!("prevResult.ips is a JSON {}", json_kind(other)),
            ));
        }
    };
    let interfaces = result.get("interfaces").and_then(Value::as_array);
    let mut out = Vec::new();
    for (i, entry) in ips.iter().enumerate() {
        let field = format!("prevResult.ips[{i}].address");
        let Some(address) = entry.get("address").and_then(Value::as_str) else {
            return Err(invalid(
                format!("{field} is missing"),
                "each entry of prevResult.ips needs an address in CIDR notation",
            ));
        };
        let ip = parse_cidr(address).ok_or_else(|| {
            invalid(
                format!("{field} is not an address in CIDR notation"),
                format!("{address:?} is not like 10.1.0.5/24 or fd00::5/64"),
            )
        })?;
        let on_host = entry
            .get("interface")
            .and_then(Value::as_u64)
            .and_then(|n| interfaces?.get(usize::try_from(n).ok()?))
            .is_some_and(|iface| {
                iface
                    .get("sandbox")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            });
        if !on_host && !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

/// `10.1.0.5/24` -> `10.1.0.5` (the prefix must fit the family).
fn parse_cidr(s: &str) -> Option<IpAddr> {
    let (addr, prefix) = s.split_once('/')?;
    let ip: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some(ip)
}

/// The result we print after an ADD: the previous result as it came, in the config's version.
pub fn pass_through(prev: &Map<String, Value>, cni_version: &str) -> Value {
    let mut out = prev.clone();
    out.insert("cniVersion".into(), Value::String(cni_version.to_owned()));
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: Value, command: Command) -> Result<NetConf, CniError> {
        parse_conf(json.to_string().as_bytes(), command)
    }

    fn base() -> Value {
        serde_json::json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "ambit-cni"})
    }

    #[test]
    fn netconf_defaults_and_our_fields() {
        let c = conf(base(), Command::Add).expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from("/run/ambit/admin.sock"));
        assert_eq!(c.state_file, PathBuf::from("/var/lib/ambit/cni-state.json"));
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(c.log_file, None);
        assert_eq!(c.prev_result, None);

        let mut v = base();
        v["agentSocket"] = "/tmp/a.sock".into();
        v["stateFile"] = "/tmp/state.json".into();
        v["timeoutSeconds"] = 2.5.into();
        v["logFile"] = "/var/log/ambit-cni.log".into();
        v["prevResult"] = serde_json::json!({"cniVersion": "1.0.0", "ips": []});
        // Fields of the runtime and of other conventions pass.
        v["runtimeConfig"] = serde_json::json!({"portMappings": []});
        v["args"] = serde_json::json!({"cni": {"x": 1}});
        let c = conf(v, Command::Add).expect("valid");
        assert_eq!(c.agent_socket, PathBuf::from("/tmp/a.sock"));
        assert_eq!(c.state_file, PathBuf::from("/tmp/state.json"));
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.log_file, Some(PathBuf::from("/var/log/ambit-cni.log")));
        assert!(c.prev_result.is_some());
    }

    #[test]
    fn netconf_errors_have_the_specs_codes() {
        let code_of = |stdin: &str, command| {
            parse_conf(stdin.as_bytes(), command)
                .expect_err("invalid")
                .code
        };
        assert_eq!(code_of("", Command::Add), code::INVALID_CONFIG);
        assert_eq!(code_of("{not json", Command::Add), code::DECODE_FAILURE);
        assert_eq!(code_of("[1]", Command::Add), code::INVALID_CONFIG);
        let with = |k: &str, v: Value| {
            let mut b = base();
            b[k] = v;
            b.to_string()
        };
        assert_eq!(
            code_of(&with("cniVersion", "0.2.0".into()), Command::Add),
            code::INCOMPATIBLE_VERSION
        );
        assert_eq!(
            code_of(&with("cniVersion", "".into()), Command::Add),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(&with("cniVersion", "0.3.1".into()), Command::Check),
            code::INCOMPATIBLE_VERSION,
            "CHECK came with 0.4.0"
        );
        assert_eq!(
            code_of(&with("cniVersion", "1.0.0".into()), Command::Gc),
            code::INCOMPATIBLE_VERSION,
            "GC came with 1.1.0"
        );
        assert_eq!(
            code_of(&with("name", "".into()), Command::Add),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(&with("timeoutSeconds", 0.into()), Command::Add),
            code::INVALID_CONFIG
        );
        assert_eq!(
            code_of(&with("agentSocket", "".into()), Command::Add),
            code::INVALID_CONFIG
        );
        let e = parse_conf(with("timeoutSeconds", "60".into()).as_bytes(), Command::Add)
            .expect_err("a string is not a number");
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("timeoutSeconds"), "{e:?}");
        let e = parse_conf(with("prevResult", "x".into()).as_bytes(), Command::Add)
            .expect_err("prevResult must be an object");
        assert!(e.msg.contains("prevResult"), "{e:?}");
        for version in SUPPORTED_VERSIONS {
            conf(
                with("cniVersion", (*version).into()).parse().expect("json"),
                Command::Add,
            )
            .expect("supported");
        }
    }

    #[test]
    fn cni_args_parsing() {
        let args = parse_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;\
             K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678;",
        )
        .expect("parses");
        assert_eq!(
            pod_ref(&args).expect("valid"),
            Some(PodRef {
                namespace: "default".into(),
                name: "web-0".into(),
                uid: "1234-5678".into()
            })
        );
        assert_eq!(args["IgnoreUnknown"], "1");
        // Values may hold '='; later pairs win.
        let args = parse_args("A=b=c;A=d").expect("parses");
        assert_eq!(args["A"], "d");
        assert_eq!(parse_args("").expect("empty").len(), 0);
        assert_eq!(
            parse_args("K8S_POD_NAME").expect_err("no =").code,
            code::INVALID_ENV
        );
        assert_eq!(
            parse_args("=x").expect_err("no key").code,
            code::INVALID_ENV
        );
        // Not Kubernetes: nothing to judge.
        assert_eq!(
            pod_ref(&parse_args("FOO=bar").expect("parses")).expect("ok"),
            None
        );
        // Half a pod is an error, not a pass.
        let e = pod_ref(&parse_args("K8S_POD_NAMESPACE=default").expect("parses"))
            .expect_err("no name");
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("K8S_POD_NAME"), "{e:?}");
    }

    #[test]
    fn env_requirements_name_every_missing_variable() {
        let env = Env {
            command: Some("ADD".into()),
            container_id: Some("abc".into()),
            netns: Some(String::new()),
            ..Env::default()
        };
        assert_eq!(env.command().expect("known"), Command::Add);
        let e = env
            .require(
                Command::Add,
                &["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"],
            )
            .expect_err("missing");
        assert_eq!(e.code, code::INVALID_ENV);
        assert_eq!(e.msg, "missing CNI_NETNS, CNI_IFNAME");
        let bad = Env {
            command: Some("FROB".into()),
            ..Env::default()
        };
        assert_eq!(bad.command().expect_err("unknown").code, code::INVALID_ENV);
        assert_eq!(
            Env::default().command().expect_err("unset").code,
            code::INVALID_ENV
        );
        let e = Env::read(|k| {
            use std::os::unix::ffi::OsStringExt;
            (k == "CNI_NETNS").then(|| std::ffi::OsString::from_vec(vec![0xff, 0xfe]))
        })
        .expect_err("not UTF-8");
        assert!(e.msg.contains("CNI_NETNS"), "{e:?}");
    }

    #[test]
    fn pod_ips_from_a_bridge_result() {
        // What bridge + host-local print (1.0.0): host bridge, host veth, pod eth0.
        let result: Value = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [
                {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
                {"name": "veth1234", "mac": "aa:bb:cc:dd:ee:02"},
                {"name": "eth0", "mac": "aa:bb:cc:dd:ee:03", "sandbox": "/run/netns/pod"}
            ],
            "ips": [
                {"address": "10.22.0.5/24", "gateway": "10.22.0.1", "interface": 2},
                {"address": "fd00:22::5/64", "gateway": "fd00:22::1", "interface": 2},
                {"address": "10.22.0.5/24", "interface": 2},
                {"address": "192.168.0.1/24", "interface": 0}
            ],
            "routes": [{"dst": "0.0.0.0/0"}]
        });
        let ips = pod_ips(result.as_object().expect("object")).expect("valid");
        assert_eq!(
            ips,
            vec![
                "10.22.0.5".parse::<IpAddr>().expect("ip"),
                "fd00:22::5".parse().expect("ip")
            ],
            "the host bridge's address is not the pod's, duplicates once"
        );
        // 0.3.x style (`version`), no interfaces: every address counts.
        let old = serde_json::json!({"ips": [{"version": "4", "address": "10.0.0.9/16"}]});
        assert_eq!(
            pod_ips(old.as_object().expect("object")).expect("valid"),
            vec!["10.0.0.9".parse::<IpAddr>().expect("ip")]
        );
        assert!(
            pod_ips(&Map::new()).expect("no ips").is_empty(),
            "no ips: nothing to tell"
        );
        for bad in [
            serde_json::json!({"ips": "10.0.0.1/24"}),
            serde_json::json!({"ips": [{"gateway": "10.0.0.1"}]}),
            serde_json::json!({"ips": [{"address": "10.0.0.1"}]}),
            serde_json::json!({"ips": [{"address": "10.0.0.1/33"}]}),
            serde_json::json!({"ips": [{"address": "pod/24"}]}),
        ] {
            let e = pod_ips(bad.as_object().expect("object")).expect_err("invalid");
            assert_eq!(e.code, code::INVALID_CONFIG, "{bad}");
        }
    }

    #[test]
    fn error_and_version_output_shapes() {
        let e = CniError::new(code::TRY_AGAIN_LATER, "agent down", "details here");
        assert_eq!(
            e.to_json("1.0.0"),
            serde_json::json!({"cniVersion": "1.0.0", "code": 11, "msg": "agent down", "details": "details here"})
        );
        let v = version_result(br#"{"cniVersion":"0.4.0"}"#);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_result(b"")["cniVersion"], LATEST_VERSION);
        assert_eq!(
            version_result(br#"{"cniVersion":"9.9.9"}"#)["cniVersion"],
            LATEST_VERSION
        );
        assert_eq!(reply_version(br#"{"cniVersion":"0.3.1"}"#), "0.3.1");
        assert_eq!(reply_version(b"garbage"), LATEST_VERSION);
        assert!(at_least("1.1.0", "1.0.0") && at_least("0.4.0", "0.4.0"));
        assert!(!at_least("0.3.1", "0.4.0") && !at_least("x", "0.1.0"));
    }

    #[test]
    fn pass_through_keeps_the_result_in_the_configs_version() {
        let prev = serde_json::json!({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/24"}], "dns": {}});
        let out = pass_through(prev.as_object().expect("object"), "1.0.0");
        assert_eq!(out, prev);
    }
}
