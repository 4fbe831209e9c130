//! Ambit's test bed: a Kubernetes-like cluster on one machine, built from network namespaces.
//!
//! Where it sits: below the privileged integration tests in `tests/tests/` and the `cargo xtask
//! demo`. A [`TestBed`] owns a "fabric" netns with a bridge (the underlay), one netns per node
//! (routing between its pods' bridge and the underlay) and one netns per pod, plus a cgroup v2
//! subtree, a bpffs pin directory and a temp directory. It starts the agent on a node
//! ([`TestBed::start_agent`]) and runs the `ambit-testpod` workload in pods ([`Pod::serve`],
//! [`Pod::connect`]). Everything it made is removed when it is dropped, also when a test panics.
//!
//! Addressing (node `k` and pod `j` are 0-based, in the order they were added):
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | node `eth0` (underlay) | `10.0.0.(k+1)/24` | `fd00::(k+1)/64` |
//! | node `br0` (pods' gateway) | `10.(k+1).0.1/24` | `fd00:(k+1)::1/64` |
//! | pod `eth0` | `10.(k+1).0.(j+2)/24` | `fd00:(k+1)::(j+2)/64` |
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! if !ambit_testbed::privileged() { return Ok(()); }
//! let bed = ambit_testbed::TestBed::new()?;
//! let node = bed.add_node("node-a")?;
//! let client = bed.add_pod(&node, "client")?;
//! let server = bed.add_pod(&node, "server")?;
//! let mut config = bed.agent_config(&node);
//! config.enroll(&client).enroll(&server);
//! let agent = bed.start_agent(&config)?;
//! let echo = server.serve(8080)?;
//! let report = client.connect(std::net::SocketAddr::new(server.ipv4().into(), 8080), 1000)?;
//! assert!(report.ok, "{report:?}");
//! # Ok(()) }
//! ```

mod agent;
mod bed;
mod binaries;
mod cgroup;
mod cmd;
mod mesh;
mod process;
mod workload;

use std::time::Duration;

pub mod h2raw;
pub mod kube_server;
pub mod metrics;
pub mod wire;
pub mod xds_server;

pub use agent::{Agent, AgentConfig, LogMark, PeerConfig, PodConfig, TEST_LOG_FILTER};
pub use bed::{KEEP_TMP_ENV, Node, NodeName, Pod, TestBed, cleanup_stale};
pub use binaries::{
    AGENT_BIN_ENV, CTL_BIN_ENV, TESTPOD_BIN_ENV, agent as agent_bin, ambitctl as ambitctl_bin,
    testpod as testpod_bin,
};
pub use cgroup::cgroup2_mount;
pub use mesh::{Mesh, MeshSpec};

/// The links an agent pins on its pods' cgroup: the ten `cgroup/sock_addr` programs (connect,
/// DNS sendmsg and recvmsg, getpeername, getsockname; IPv4 and IPv6) and `sock_ops`.
pub const CGROUP_LINKS: usize = 11;
pub use process::Process;
pub use workload::{ClientHandle, ClientReport, Server};

/// Environment variable that makes privileged tests skip (with a message) instead of failing
/// when not run as root.
pub const SKIP_PRIVILEGED_ENV: &str = "AMBIT_SKIP_PRIVILEGED";

/// Whether this process may build a test bed (it runs as root).
///
/// Privileged tests start with `if !ambit_testbed::privileged() { return; }`. When not root, this
/// panics, because a silently skipped test looks like a pass, unless `AMBIT_SKIP_PRIVILEGED=1`
/// asks for an explicit skip: then it prints why on stderr and returns `false`.
pub fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("this test")
        .to_owned();
    if std::env::var(SKIP_PRIVILEGED_ENV).is_ok_and(|v| v == "1") {
        eprintln!(
            "skipping {test}: it needs root for network namespaces and eBPF, \
             and {SKIP_PRIVILEGED_ENV}=1 is set"
        );
        return false;
    }
    panic!(
        "{test}: this test needs root for network namespaces and eBPF; run as root (CI does) \
         or set {SKIP_PRIVILEGED_ENV}=1 to skip it explicitly"
    );
}

/// A field of a JSON log line: a top-level key (the agent flattens event fields, so
/// `"src.addr"` is a key of its own), else the same key under `"fields"` (unflattened output).
pub fn log_field<'a>(line: &'a serde_json::Value, name: &str) -> Option<&'a serde_json::Value> {
    line.get(name)
        .or_else(|| line.get("fields").and_then(|f| f.get(name)))
}

/// A string field of a JSON log line (see [`log_field`]).
pub fn log_str<'a>(line: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    log_field(line, name).and_then(serde_json::Value::as_str)
}

/// The `message` of a JSON log line, if it has one.
pub fn log_message(line: &serde_json::Value) -> Option<&str> {
    log_field(line, "message").and_then(|m| m.as_str())
}

/// Polls `check` every 20 ms until it returns `Some`, or `timeout` passes.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
