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

use serde::Deserialize;
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
}

/// A field that may be absent or `null` (the API server omits empty fields, a proxy in between
/// may write them as `null`): the type's default either way.
fn nullable<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// The fields of an object's `metadata` the agent reads. Everything else a list or watch
/// returns is dropped at parse time, so the watches hold only this.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub namespace: Option<String>,
    #[serde(default, deserialize_with = "nullable")]
    pub uid: String,
    #[serde(default, deserialize_with = "nullable")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "nullable")]
    pub annotations: BTreeMap<String, String>,
    /// Bumped by the API server on every change of the spec (status conditions name it).
    #[serde(default, deserialize_with = "nullable")]
    pub generation: i64,
}

/// A `v1.Pod`, as far as enrollment reads it.
#[derive(Clone, Debug, Deserialize)]
pub struct PodObject {
    pub metadata: ObjectMeta,
    #[serde(default, deserialize_with = "nullable")]
    pub spec: PodSpec,
    #[serde(default, deserialize_with = "nullable")]
    pub status: PodStatus,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default, deserialize_with = "nullable")]
    pub service_account_name: String,
    #[serde(default, deserialize_with = "nullable")]
    pub host_network: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIPs", deserialize_with = "nullable")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, rename = "podIP", deserialize_with = "nullable")]
    pub pod_ip: String,
    #[serde(default, deserialize_with = "nullable")]
    pub phase: String,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct PodIp {
    #[serde(default, deserialize_with = "nullable")]
    pub ip: String,
}

/// A `v1.Namespace`: its labels say whether it is in the mesh.
#[derive(Clone, Debug, Deserialize)]
pub struct NamespaceObject {
    pub metadata: ObjectMeta,
}

/// What a watched kind has in common.
pub trait Object: serde::de::DeserializeOwned + Clone + Send + Sync + 'static {
    fn meta(&self) -> &ObjectMeta;

    /// `namespace/name`, or `name` for cluster-scoped objects.
    fn key(&self) -> String {
        let m = self.meta();
        match &m.namespace {
            Some(ns) => format!("{ns}/{}", m.name),
            None => m.name.clone(),
        }
    }
}

impl Object for PodObject {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl Object for NamespaceObject {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

impl From<&PodObject> for KubePod {
    fn from(o: &PodObject) -> KubePod {
        let mut ips: Vec<IpAddr> = o
            .status
            .pod_ips
            .iter()
            .filter_map(|i| i.ip.parse().ok())
            .collect();
        if ips.is_empty()
            && let Ok(ip) = o.status.pod_ip.parse()
        {
            ips.push(ip);
        }
        KubePod {
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone(),
            uid: o.metadata.uid.clone(),
            service_account: match o.spec.service_account_name.as_str() {
                "" => "default".to_owned(),
                sa => sa.to_owned(),
            },
            labels: o.metadata.labels.clone(),
            annotations: o.metadata.annotations.clone(),
            ips,
            host_network: o.spec.host_network,
            finished: matches!(o.status.phase.as_str(), "Succeeded" | "Failed"),
        }
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
    /// Objects of the watched kinds the agent cannot read, pods of this node first, then
    /// namespaces: `pod <namespace>/<name>` or `namespace <name>`. All are here (bounded by what
    /// the API lists); the reason is kept for the first [`MAX_UNREADABLE`] of each kind.
    /// `ambitctl status` lists them among the failed pods and
    /// `ambit_kubernetes_unreadable_objects` counts them.
    pub unreadable: Vec<(String, Unreadable)>,
}

/// How many unreadable objects of a kind keep their reason.
pub const MAX_UNREADABLE: usize = 100;

/// An object the agent cannot read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// The decode error, for the first [`MAX_UNREADABLE`] of a kind.
    pub error: Option<String>,
    /// An earlier version was read and is still what the agent acts on (an update it cannot
    /// read); otherwise the object is unknown to it (a pod only described by it is not captured).
    pub kept_previous: bool,
}

impl Unreadable {
    /// What `ambitctl status` says of it.
    pub fn describe(&self) -> String {
        let why = self.error.as_deref().unwrap_or("reason not kept");
        if self.kept_previous {
            format!(
                "the agent cannot read the latest version of this object from the Kubernetes API \
                 ({why}); it acts on the last version it read"
            )
        } else {
            format!(
                "the agent cannot read this object from the Kubernetes API ({why}); a pod only \
                 known from it is not captured"
            )
        }
    }
}

/// What one list-and-watch publishes: the objects read, and the ones that could not be.
pub struct Listed<T> {
    pub items: BTreeMap<String, T>,
    /// Raw key -> what is known of it; every unreadable object, its reason for the first
    /// [`MAX_UNREADABLE`].
    pub unreadable: BTreeMap<String, Unreadable>,
}

impl<T: Clone> Clone for Listed<T> {
    fn clone(&self) -> Self {
        Listed {
            items: self.items.clone(),
            unreadable: self.unreadable.clone(),
        }
    }
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
    let pods_path = format!(
        "/api/v1/pods?fieldSelector={}",
        url_encode(&format!("spec.nodeName={node}"))
    );
    let tasks = tokio_util::task::TaskTracker::new();
    let mut ns_rx = follow::<NamespaceObject>(&tasks, &client, "/api/v1/namespaces", &shutdown);
    let mut pod_rx = follow::<PodObject>(&tasks, &client, &pods_path, &shutdown);
    tasks.close();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = ns_rx.changed() => if r.is_err() { break },
            r = pod_rx.changed() => if r.is_err() { break },
        }
        let namespaces = ns_rx.borrow_and_update().clone();
        let pods = pod_rx.borrow_and_update().clone();
        // Pods first: they are what runs uncaptured.
        let unreadable = pods
            .iter()
            .flat_map(|l| &l.unreadable)
            .map(|(k, u)| (format!("pod {k}"), u.clone()))
            .chain(
                namespaces
                    .iter()
                    .flat_map(|l| &l.unreadable)
                    .map(|(k, u)| (format!("namespace {k}"), u.clone())),
            )
            .collect();
        let state = KubeState {
            synced: namespaces.is_some() && pods.is_some(),
            namespaces: namespaces
                .iter()
                .flat_map(|l| l.items.values())
                .map(|o| (o.metadata.name.clone(), o.metadata.labels.clone()))
                .collect(),
            unreadable,
            pods: pods
                .iter()
                .flat_map(|l| l.items.values())
                .filter(|o| o.metadata.namespace.is_some())
                .map(KubePod::from)
                .map(|p| (p.key(), p))
                .collect(),
        };
        let _ = out.send(Arc::new(state));
    }
    tasks.wait().await;
}

/// What one list-and-watch publishes: `None` until the first list arrived.
pub(crate) type Following<T> = watch::Receiver<Option<Arc<Listed<T>>>>;

/// Starts the list-and-watch of `path` on `tasks` until `shutdown` ([`watch_list`]).
pub(crate) fn follow<T: Object>(
    tasks: &tokio_util::task::TaskTracker,
    client: &Client,
    path: &str,
    shutdown: &CancellationToken,
) -> Following<T> {
    let (tx, rx) = watch::channel(None);
    tasks.spawn(watch_list(
        client.clone(),
        path.to_owned(),
        tx,
        shutdown.clone(),
    ));
    rx
}

/// Lists `path`, then watches it from the list's resource version, publishing the whole set
/// (by `namespace/name`) after the list and after every event. Relists after errors and when
/// the version expires, with backoff.
async fn watch_list<T: Object>(
    client: Client,
    path: String,
    out: watch::Sender<Option<Arc<Listed<T>>>>,
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
        let mut listing = Listed {
            items: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        };
        for o in listed["items"].as_array().into_iter().flatten() {
            listing.read(&path, o);
        }
        let mut version = listed["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        debug!(path, items = listing.items.len(), "Kubernetes list");
        let _ = out.send(Some(Arc::new(listing.clone())));
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
                        // Bookmarks carry only the version; every event moves it.
                        if let Some(v) = object["metadata"]["resourceVersion"].as_str() {
                            version = v.to_owned();
                        }
                        let kind = event["type"].as_str();
                        if !matches!(kind, Some("ADDED" | "MODIFIED" | "DELETED")) {
                            continue;
                        }
                        if kind == Some("DELETED") {
                            // A deletion needs only the name: never keep a pod that is gone.
                            let key = parse::<T>(object)
                                .map(|o| o.key())
                                .or_else(|_| raw_key(object).ok_or(()));
                            let Ok(key) = key else { continue };
                            listing.items.remove(&key);
                            listing.unreadable.remove(&key);
                        } else {
                            // An update it cannot read keeps what it knew, and says so.
                            listing.read(&path, object);
                        }
                        let _ = out.send(Some(Arc::new(listing.clone())));
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

/// `namespace/name` (or `name`) of an object it could not otherwise read.
fn raw_key(o: &Value) -> Option<String> {
    let meta = &o["metadata"];
    let name = meta["name"].as_str()?;
    Some(match meta["namespace"].as_str() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_owned(),
    })
}

impl<T: Object> Listed<T> {
    /// Takes in one listed or watched object: a readable one replaces what was known of it; one
    /// the agent cannot read keeps what was known and is remembered as unreadable (the API
    /// server does not send those, but a proxy in between or a newer API version might).
    fn read(&mut self, path: &str, o: &Value) {
        match parse::<T>(o) {
            Ok(t) => {
                let key = t.key();
                self.unreadable.remove(&key);
                self.items.insert(key, t);
            }
            Err(e) => {
                warn!(path, error = %e, name = %o["metadata"]["name"], "a Kubernetes object the agent cannot read");
                let key = raw_key(o).unwrap_or_else(|| "(no name)".to_owned());
                let with_reason = self
                    .unreadable
                    .values()
                    .filter(|u| u.error.is_some())
                    // Stops at the bound: a mass of unreadable objects costs no more per read.
                    .take(MAX_UNREADABLE)
                    .count();
                let keeps_reason = with_reason < MAX_UNREADABLE
                    || self.unreadable.get(&key).is_some_and(|u| u.error.is_some());
                let kept_previous = self.items.contains_key(&key);
                self.unreadable.insert(
                    key,
                    Unreadable {
                        error: keeps_reason.then(|| e.to_string()),
                        kept_previous,
                    },
                );
            }
        }
    }
}

/// One listed or watched object, typed.
fn parse<T: Object>(o: &Value) -> Result<T, serde_json::Error> {
    T::deserialize(o)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_is_read_into_what_enrollment_needs_and_nothing_else() {
        let o: Value = serde_json::json!({
            "kind": "Pod",
            "metadata": {
                "name": "curl", "namespace": "default", "uid": "u-1",
                "resourceVersion": "42", "managedFields": [{"manager": "kubelet"}],
                "labels": {"app": "curl"}, "annotations": {"a": "b"}
            },
            "spec": {"hostNetwork": false, "containers": [{"name": "c", "image": "curl"}]},
            "status": {"phase": "Running", "podIP": "10.1.0.2",
                       "podIPs": [{"ip": "10.1.0.2"}, {"ip": "fd00:1::2"}, {"ip": "garbage"}]}
        });
        let pod = parse::<PodObject>(&o).expect("a pod");
        assert_eq!(pod.key(), "default/curl");
        let k = KubePod::from(&pod);
        assert_eq!(
            k.service_account, "default",
            "no serviceAccountName: default"
        );
        assert_eq!(
            k.ips,
            [
                "10.1.0.2".parse::<IpAddr>().expect("ip"),
                "fd00:1::2".parse().expect("ip")
            ]
        );
        assert!(!k.finished && !k.host_network);
        assert_eq!(k.labels.get("app").map(String::as_str), Some("curl"));

        // Older API servers: podIP only; a finished pod.
        let o = serde_json::json!({
            "metadata": {"name": "job", "namespace": "ns"},
            "spec": {"serviceAccountName": "runner"},
            "status": {"phase": "Succeeded", "podIP": "10.1.0.9"}
        });
        let k = KubePod::from(&parse::<PodObject>(&o).expect("a pod"));
        assert_eq!(k.service_account, "runner");
        assert_eq!(k.ips, ["10.1.0.9".parse::<IpAddr>().expect("ip")]);
        assert!(k.finished);
    }

    #[test]
    fn null_fields_read_as_absent() {
        let o = serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "labels": null, "uid": null},
            "spec": {"serviceAccountName": null, "hostNetwork": null},
            "status": {"podIP": null, "podIPs": [{"ip": null}, {"ip": "10.1.0.4"}], "phase": null}
        });
        let k = KubePod::from(&parse::<PodObject>(&o).expect("a pod despite the nulls"));
        assert_eq!(k.service_account, "default");
        assert_eq!(k.ips, ["10.1.0.4".parse::<IpAddr>().expect("ip")]);
        assert_eq!(
            raw_key(&serde_json::json!({"metadata": {"name": "x", "namespace": "y"}})).as_deref(),
            Some("y/x")
        );
    }

    #[test]
    fn an_object_it_cannot_read_is_remembered_as_unreadable_not_fatal() {
        let nameless = serde_json::json!({"metadata": {"namespace": "default"}});
        assert!(parse::<PodObject>(&nameless).is_err());
        let bad_labels = serde_json::json!({"metadata": {"name": "x", "labels": {"a": 1}}});
        assert!(parse::<NamespaceObject>(&bad_labels).is_err());
        let good = |labels: serde_json::Value| serde_json::json!({"metadata": {"name": "x", "labels": labels}});

        let mut listing = Listed::<NamespaceObject> {
            items: BTreeMap::new(),
            unreadable: BTreeMap::new(),
        };
        listing.read(
            "n",
            &good(serde_json::json!({"istio.io/dataplane-mode": "ambient"})),
        );
        // An update it cannot read keeps what it knew, and is named with why.
        listing.read("n", &bad_labels);
        assert_eq!(
            listing.items["x"].metadata.labels["istio.io/dataplane-mode"],
            "ambient"
        );
        let u = &listing.unreadable["x"];
        assert!(u.kept_previous, "{u:?}");
        assert!(
            u.error
                .as_deref()
                .is_some_and(|e| e.contains("invalid type")),
            "{u:?}"
        );
        assert!(
            u.describe().contains("acts on the last version it read"),
            "{u:?}"
        );
        // A readable version clears it.
        listing.read("n", &good(serde_json::json!({})));
        assert!(listing.unreadable.is_empty());
        assert!(listing.items["x"].metadata.labels.is_empty());
        // Bounded, however many there are.
        for i in 0..MAX_UNREADABLE + 50 {
            listing.read(
                "n",
                &serde_json::json!({"metadata": {"name": format!("bad-{i}"), "labels": 7}}),
            );
        }
        // Every one is counted; the reason is kept for the first MAX_UNREADABLE.
        assert_eq!(listing.unreadable.len(), MAX_UNREADABLE + 50);
        let reasons = listing.unreadable.values().filter(|u| u.error.is_some());
        assert_eq!(reasons.count(), MAX_UNREADABLE);
        let never_read = &listing.unreadable["bad-0"];
        assert!(!never_read.kept_previous);
        assert!(
            never_read.describe().contains("not captured"),
            "{never_read:?}"
        );
    }
}
