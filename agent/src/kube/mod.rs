//! Kubernetes mode: the agent watches the cluster's Namespaces and the Pods scheduled on its node
//! (list + watch, with the in-cluster service account), and enrollment follows the labels:
//! a namespace labelled `istio.io/dataplane-mode=ambient` enrolls its pods, a pod labelled
//! `istio.io/dataplane-mode=none` opts out. Pods that already run are found by their IP (the
//! network namespace that holds it) and enrolled without a restart. Enrolled pods are annotated
//! `ambient.istio.io/redirection: enabled`, as Istio's node agent does, so istiod advertises them
//! as HBONE-capable; the annotation is removed when they leave.
//!
//! ```text
//! API server ──list/watch──> watcher (namespaces, pods on this node) ──watch channel──> app
//!                                                               (PodManager merges the pods)
//! ```

pub mod client;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

pub use client::Client;

/// The annotation that tells istiod a pod is captured by the node agent.
pub const REDIRECTION_ANNOTATION: &str = "ambient.istio.io/redirection";

// The settings are the config's (it validates them); the watch only reads them.
pub use crate::config::{KubeSettings, SERVICE_ACCOUNT_DIR};

/// A pod on this node, as far as enrollment cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubePod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
    pub host_network: bool,
    /// `Succeeded` or `Failed`: its sandbox is gone.
    pub finished: bool,
}

impl KubePod {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    fn from_object(o: &Value) -> Option<KubePod> {
        let meta = &o["metadata"];
        let strings = |v: &Value| -> BTreeMap<String, String> {
            v.as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut ips: Vec<IpAddr> = o["status"]["podIPs"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["ip"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if ips.is_empty()
            && let Some(ip) = o["status"]["podIP"].as_str().and_then(|i| i.parse().ok())
        {
            ips.push(ip);
        }
        let phase = o["status"]["phase"].as_str().unwrap_or("");
        Some(KubePod {
            namespace: meta["namespace"].as_str()?.to_owned(),
            name: meta["name"].as_str()?.to_owned(),
            uid: meta["uid"].as_str().unwrap_or_default().to_owned(),
            service_account: o["spec"]["serviceAccountName"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_owned(),
            labels: strings(&meta["labels"]),
            annotations: strings(&meta["annotations"]),
            ips,
            host_network: o["spec"]["hostNetwork"].as_bool().unwrap_or(false),
            finished: matches!(phase, "Succeeded" | "Failed"),
        })
    }
}

/// What the watches know now. Published whole on every change.
#[derive(Clone, Debug, Default)]
pub struct KubeState {
    /// Namespace name -> labels.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// `namespace/name` -> pod, for the pods of this node.
    pub pods: BTreeMap<String, KubePod>,
    /// Both lists have arrived at least once.
    pub synced: bool,
}

impl KubeState {
    pub fn namespace_ambient(&self, ns: &str) -> bool {
        self.namespaces
            .get(ns)
            .and_then(|l| l.get(crate::config::DATAPLANE_MODE_LABEL))
            .is_some_and(|v| v == "ambient")
    }

    /// Whether `pod` should be captured: its namespace opted in and it did not opt out.
    pub fn enrolls(&self, pod: &KubePod) -> bool {
        self.namespace_ambient(&pod.namespace)
            && pod
                .labels
                .get(crate::config::DATAPLANE_MODE_LABEL)
                .is_none_or(|v| v != "none")
            && !pod.host_network
            && !pod.finished
    }
}

/// A watch asks the server to end it after 300 s; no byte for this long means it is dead.
const WATCH_IDLE: Duration = Duration::from_secs(360);

/// Runs the namespace and pod watches for `node` until `shutdown`, publishing into `out`.
pub async fn run(
    client: Client,
    node: String,
    out: watch::Sender<Arc<KubeState>>,
    shutdown: CancellationToken,
) {
    let (ns_tx, mut ns_rx) = watch::channel(None::<BTreeMap<String, Value>>);
    let (pod_tx, mut pod_rx) = watch::channel(None::<BTreeMap<String, Value>>);
    let pods_path = format!(
        "/api/v1/pods?fieldSelector={}",
        url_encode(&format!("spec.nodeName={node}"))
    );
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(watch_list(
        client.clone(),
        "/api/v1/namespaces".to_owned(),
        ns_tx,
        shutdown.clone(),
    ));
    tasks.spawn(watch_list(client, pods_path, pod_tx, shutdown.clone()));
    tasks.close();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = ns_rx.changed() => if r.is_err() { break },
            r = pod_rx.changed() => if r.is_err() { break },
        }
        let namespaces = ns_rx.borrow_and_update().clone();
        let pods = pod_rx.borrow_and_update().clone();
        let state = KubeState {
            synced: namespaces.is_some() && pods.is_some(),
            namespaces: namespaces
                .unwrap_or_default()
                .values()
                .filter_map(|o| {
                    let labels = o["metadata"]["labels"]
                        .as_object()
                        .map(|m| {
                            m.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                                .collect()
                        })
                        .unwrap_or_default();
                    Some((o["metadata"]["name"].as_str()?.to_owned(), labels))
                })
                .collect(),
            pods: pods
                .unwrap_or_default()
                .values()
                .filter_map(KubePod::from_object)
                .map(|p| (p.key(), p))
                .collect(),
        };
        let _ = out.send(Arc::new(state));
    }
    tasks.wait().await;
}

/// Lists `path`, then watches it from the list's resource version, publishing the whole set
/// (by `namespace/name`) after the list and after every event. Relists after errors and when
/// the version expires, with backoff.
async fn watch_list(
    client: Client,
    path: String,
    out: watch::Sender<Option<BTreeMap<String, Value>>>,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(500);
    let sep = if path.contains('?') { '&' } else { '?' };
    while !shutdown.is_cancelled() {
        let listed = match client.get(&path).await {
            Ok(v) => v,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff, "Kubernetes list failed");
                sleep_or_cancel(backoff, &shutdown).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
                continue;
            }
        };
        let mut items: BTreeMap<String, Value> = listed["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|o| Some((object_key(o)?, o.clone())))
            .collect();
        let mut version = listed["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        debug!(path, items = items.len(), "Kubernetes list");
        let _ = out.send(Some(items.clone()));
        backoff = Duration::from_millis(500);
        // Watch until it ends or fails; a normal end starts another watch from where it was.
        loop {
            let watch_path = format!(
                "{path}{sep}watch=true&allowWatchBookmarks=true&timeoutSeconds=300&resourceVersion={}",
                url_encode(&version)
            );
            let mut watch = match client.watch(&watch_path).await {
                Ok(w) => w,
                Err(e) => {
                    warn!(error = %e, "Kubernetes watch failed; listing again");
                    sleep_or_cancel(backoff, &shutdown).await;
                    break;
                }
            };
            let ended = loop {
                // The server ends a watch after timeoutSeconds; silence well past that is a
                // half-open connection.
                let event = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    e = tokio::time::timeout(WATCH_IDLE, watch.next()) => match e {
                        Ok(e) => e,
                        Err(_) => Err(client::Error::Request {
                            method: "GET",
                            path: watch_path.clone(),
                            detail: "no data for longer than the watch's own timeout".to_owned(),
                        }),
                    },
                };
                match event {
                    Ok(Some(event)) => {
                        let object = &event["object"];
                        if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
                            version = v.to_owned();
                        }
                        let Some(key) = object_key(object) else {
                            continue;
                        };
                        match event["type"].as_str() {
                            Some("ADDED" | "MODIFIED") => {
                                items.insert(key, object.clone());
                            }
                            Some("DELETED") => {
                                items.remove(&key);
                            }
                            _ => continue,
                        }
                        let _ = out.send(Some(items.clone()));
                    }
                    Ok(None) => break true,
                    Err(e) => {
                        warn!(error = %e, "Kubernetes watch ended; listing again");
                        break false;
                    }
                }
            };
            if !ended {
                sleep_or_cancel(backoff, &shutdown).await;
                break;
            }
        }
    }
}

async fn sleep_or_cancel(d: Duration, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

fn object_key(o: &Value) -> Option<String> {
    let meta = &o["metadata"];
    let name = meta["name"].as_str()?;
    Some(match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    })
}

/// Percent-encodes a query value.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Finds the network namespaces of pods by IP: the candidates are the named netns under
/// `/run/netns` and `/var/run/netns` and every process's `/proc/<pid>/ns/net` (and
/// `/host/proc/<pid>/ns/net`), each entered once
/// (deduplicated by inode) to read its addresses (getifaddrs, over netlink).
#[derive(Default)]
pub struct NetnsFinder {
    by_ip: HashMap<IpAddr, PathBuf>,
    prefix: Option<String>,
}

impl NetnsFinder {
    pub fn new(prefix: Option<String>) -> NetnsFinder {
        NetnsFinder {
            by_ip: HashMap::new(),
            prefix,
        }
    }

    /// The netns holding `ip`, rescanning when it is not known (or no longer holds it).
    pub fn find(&mut self, ip: IpAddr) -> Option<PathBuf> {
        if let Some(p) = self.by_ip.get(&ip)
            && holds(p, ip)
        {
            return Some(p.clone());
        }
        self.rescan();
        self.by_ip.get(&ip).cloned()
    }

    fn rescan(&mut self) {
        self.by_ip.clear();
        let mut seen = HashSet::new();
        let mut candidates: Vec<PathBuf> = Vec::new();
        for dir in ["/run/netns", "/var/run/netns"] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                candidates.extend(entries.filter_map(|e| Some(e.ok()?.path())));
            }
        }
        // In a container without hostPID the node's processes are under the host's procfs,
        // mounted at /host/proc by the DaemonSet.
        for proc in ["/proc", "/host/proc"] {
            if let Ok(entries) = std::fs::read_dir(proc) {
                candidates.extend(entries.filter_map(|e| {
                    let e = e.ok()?;
                    e.file_name().to_str()?.parse::<u32>().ok()?;
                    Some(e.path().join("ns/net"))
                }));
            }
        }
        if let Some(prefix) = &self.prefix {
            candidates.retain(|p| p.to_string_lossy().starts_with(prefix.as_str()));
        }
        for path in candidates {
            let Ok(meta) = std::fs::metadata(&path) else {
                continue;
            };
            if !seen.insert((meta.dev(), meta.ino())) {
                continue;
            }
            for ip in addresses_in(&path) {
                self.by_ip.entry(ip).or_insert_with(|| path.clone());
            }
        }
        debug!(
            addresses = self.by_ip.len(),
            "scanned network namespaces for pod IPs"
        );
    }
}

fn holds(path: &std::path::Path, ip: IpAddr) -> bool {
    addresses_in(path).contains(&ip)
}

/// The unicast addresses configured in the netns at `path` (none if it cannot be entered).
fn addresses_in(path: &std::path::Path) -> Vec<IpAddr> {
    let Ok(ns) = crate::redirect::Netns::open(path) else {
        return Vec::new();
    };
    ns.run(|| {
        nix::ifaddrs::getifaddrs()
            .map(|addrs| {
                addrs
                    .filter_map(|a| {
                        let addr = a.address?;
                        if let Some(v4) = addr.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .filter(|ip| !ip.is_loopback())
                    .collect()
            })
            .unwrap_or_default()
    })
    .unwrap_or_default()
}

/// Sets or clears the redirection annotation on a pod (a JSON merge patch).
pub async fn annotate(client: &Client, pod: &KubePod, enabled: bool) {
    let path = format!(
        "/api/v1/namespaces/{}/pods/{}",
        url_encode(&pod.namespace),
        url_encode(&pod.name)
    );
    let value = if enabled {
        Value::from("enabled")
    } else {
        Value::Null
    };
    let patch = serde_json::json!({"metadata": {"annotations": {REDIRECTION_ANNOTATION: value}}});
    match client.merge_patch(&path, &patch).await {
        Ok(()) => info!(pod = %pod.key(), enabled, "pod redirection annotation updated"),
        Err(e) => {
            warn!(pod = %pod.key(), error = %e, "cannot update the pod's redirection annotation")
        }
    }
}
