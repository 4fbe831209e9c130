//! Pod reconciliation: the control task's [`PodManager`] is the one writer of capture state and
//! of the set of served pods. [`desired`] decides which pods to serve (pure: config, Kubernetes,
//! CNI and the state an earlier agent left pinned); this module applies the decision: enroll,
//! re-enroll in place, unenroll, release pinned state nobody claims, save the [`records`] the next
//! agent adopts, and keep the CNI state file and Istio's redirection annotations current.
//!
//! ```text
//! config ─┐
//! kube ───┼─> desired() ─> Desired ─> apply: enroll / replace / unenroll ─> Redirect (eBPF maps)
//! cni ────┤                                  prune(keep) ─> records (<stateDir>/pods.json)
//! pinned ─┘ (records checked against the kernel at start)
//! ```

mod cni;
pub use cni::{CniOp, CniRequest};
pub mod desired;
pub mod records;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    addrs::NetnsCookie,
    config::{Config, Pod},
    proxy::{self, PodInfo, PodListeners, ProxyContext},
    redirect::{CaptureOptions, Netns, Redirect, routing},
    state::StateWriter,
};
use desired::{Desired, Inputs, Origin, Pinned, Record};

/// How long a redirection annotation patch may take to show in the watch before it is sent again.
const ANNOTATION_RETRY: Duration = Duration::from_secs(10);

/// A pod the agent is serving.
struct ActivePod {
    pod: Pod,
    origin: Origin,
    info: Arc<PodInfo>,
    cancel: CancellationToken,
}

/// A local pod the agent captures now.
#[derive(Clone, Debug)]
pub struct EnrolledPod {
    /// `namespace/name`.
    pub key: String,
    pub netns_cookie: NetnsCookie,
    pub ips: Vec<std::net::IpAddr>,
    /// The source that claims it: `config`, `kubernetes` or `cni`.
    pub origin: &'static str,
    /// Served from the record an earlier agent saved, because its source has not synced yet.
    pub adopted: bool,
}

/// The pods' side of the agent, published by the pod manager after every change.
#[derive(Clone, Debug, Default)]
pub struct PodsState {
    pub enrolled: Vec<EnrolledPod>,
    /// `(namespace/name, error)` of pods that should be enrolled and could not be.
    pub failed: Vec<(String, String)>,
    /// Netns an earlier agent left enrolled that stay captured, unserved (no usable record),
    /// until every pod source has synced: their new connections are refused.
    pub held_netns: Vec<NetnsCookie>,
    /// The pod source that has not synced yet (`kubernetes`), if any: nothing an earlier agent
    /// left is released before it has.
    pub waiting_for: Option<&'static str>,
    /// Kubernetes objects (pods of this node, namespaces) the agent cannot read; each is also
    /// among `failed`.
    pub unreadable: usize,
}

/// Keeps the served pods equal to what [`desired::desired`] decides.
pub struct PodManager {
    redirect: Redirect,
    /// Merges the config and xDS into the data path's state.
    sources: Arc<StateWriter>,
    ctx: Arc<ProxyContext>,
    node: String,
    active: BTreeMap<String, ActivePod>,
    /// Pods that could not be enrolled, with the last error (retried on every tick).
    failed: BTreeMap<String, String>,
    /// Pods the CNI plugin announced (not in the config), by `namespace/name`.
    cni_pods: BTreeMap<String, Pod>,
    /// What was last written to the CNI state file.
    cni_state: Option<crate::api::CniState>,
    /// Kubernetes mode: the API client, what the watches know, and where pods' netns are.
    kube_client: Option<crate::kube::Client>,
    kube: Option<Arc<crate::kube::KubeState>>,
    netns_finder: crate::kube::NetnsFinder,
    /// Redirection annotations being written (`namespace/name` -> enabled, when asked); asked
    /// again after a while if the watch does not show the change (a failed patch).
    annotating: BTreeMap<String, (bool, std::time::Instant)>,
    /// The annotation writes in flight, each bounded by the Kubernetes client's timeouts.
    annotation_writes: TaskTracker,
    /// Kubernetes pods released by a CNI DEL, kept out until the API drops them or a new ADD.
    cni_deleted: BTreeSet<String>,
    /// The merged config last applied to the state (skipped when unchanged).
    applied: Option<Arc<Config>>,
    listeners: TaskTracker,
    next_pod_id: u32,
    /// Capture state found pinned at start and not resolved yet (cleared once every source has
    /// synced).
    pinned: BTreeMap<NetnsCookie, Pinned>,
    /// From the last decision, for the admin API and readiness.
    adopted: BTreeSet<String>,
    held: BTreeSet<NetnsCookie>,
    waiting_for: Option<&'static str>,
    records_path: PathBuf,
    /// What was last saved to `records_path`.
    saved: Option<BTreeMap<NetnsCookie, Record>>,
}

impl PodManager {
    /// Takes over the capture state: reads the records the previous agent saved, checks each
    /// against the pinned enrollments and the kernel, and reloads the CNI pods among them.
    pub fn new(
        redirect: Redirect,
        sources: Arc<StateWriter>,
        ctx: Arc<ProxyContext>,
        config: &Config,
        kube_client: Option<crate::kube::Client>,
        netns_finder: crate::kube::NetnsFinder,
    ) -> PodManager {
        let records_path = records::path(&config.state_dir);
        let mut saved = records::load(&records_path, &config.node, &config.trust_domain);
        let mut cookies: BTreeSet<NetnsCookie> = redirect.enrolled_cookies().into_iter().collect();
        cookies.extend(redirect.pinned_pod_links());
        let mut pinned = BTreeMap::new();
        let mut cni_pods = BTreeMap::new();
        for cookie in cookies {
            let state = match saved.remove(&cookie) {
                None => Pinned::Unknown,
                Some(r) => match Netns::open(&r.pod.netns.path()) {
                    Ok(ns) if ns.cookie() == cookie => {
                        if r.origin == Origin::Cni {
                            cni_pods.insert(r.pod.key(), r.pod.clone());
                        }
                        Pinned::Live(Box::new(r))
                    }
                    _ => Pinned::Gone,
                },
            };
            pinned.insert(cookie, state);
        }
        if !pinned.is_empty() {
            let count = |f: fn(&Pinned) -> bool| pinned.values().filter(|p| f(p)).count();
            info!(
                pinned = pinned.len(),
                with_record = count(|p| matches!(p, Pinned::Live(_))),
                gone = count(|p| matches!(p, Pinned::Gone)),
                unknown = count(|p| matches!(p, Pinned::Unknown)),
                cni = cni_pods.len(),
                "found pods enrolled by an earlier agent; they stay captured until every source that could claim them has synced"
            );
        }
        PodManager {
            redirect,
            sources,
            ctx,
            node: config.node.clone(),
            active: BTreeMap::new(),
            failed: BTreeMap::new(),
            cni_pods,
            cni_state: None,
            kube_client,
            kube: None,
            netns_finder,
            annotating: BTreeMap::new(),
            annotation_writes: TaskTracker::new(),
            cni_deleted: BTreeSet::new(),
            applied: None,
            listeners: TaskTracker::new(),
            next_pod_id: 1,
            pinned,
            adopted: BTreeSet::new(),
            held: BTreeSet::new(),
            waiting_for: None,
            records_path,
            saved: None,
        }
    }

    /// Takes the Kubernetes watches' latest state (applied by the next [`PodManager::apply`]).
    pub fn set_kube(&mut self, kube: Arc<crate::kube::KubeState>) {
        self.kube = Some(kube);
    }

    pub fn active_count(&self) -> usize {
        self.active.len()
    }

    pub fn has_failed(&self) -> bool {
        !self.failed.is_empty()
    }

    pub fn annotating(&self) -> bool {
        !self.annotating.is_empty()
    }

    /// The capture programs' counters (for the shutdown log).
    pub fn counters(&self) -> BTreeMap<&'static str, u64> {
        self.redirect.counters()
    }

    /// What the admin API shows of the pods.
    pub fn state(&self) -> PodsState {
        PodsState {
            enrolled: self
                .active
                .iter()
                .map(|(key, a)| EnrolledPod {
                    key: key.clone(),
                    netns_cookie: a.info.netns.cookie(),
                    ips: a.pod.ips.clone(),
                    origin: a.origin.as_str(),
                    adopted: self.adopted.contains(key),
                })
                .collect(),
            failed: self
                .failed
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .chain(
                    self.kube
                        .iter()
                        .flat_map(|k| &k.unreadable)
                        // Pods come first; the count is in `unreadable` and the metric.
                        .take(crate::kube::MAX_UNREADABLE)
                        .map(|(what, u)| (what.clone(), u.describe())),
                )
                .collect(),
            held_netns: self.held.iter().copied().collect(),
            waiting_for: self.waiting_for,
            unreadable: self.kube.as_ref().map_or(0, |k| k.unreadable.len()),
        }
    }

    fn decide(&mut self, config: &Config) -> Desired {
        let finder = &mut self.netns_finder;
        desired::desired(
            &Inputs {
                config,
                kube_mode: self.kube_client.is_some(),
                kube: self.kube.as_deref(),
                cni: &self.cni_pods,
                cni_deleted: &self.cni_deleted,
                pinned: &self.pinned,
            },
            &mut |ip| finder.find(ip),
        )
    }

    /// Makes the served pods what the decision says for `config` and the other sources.
    pub fn apply(&mut self, config: &Config) -> anyhow::Result<()> {
        if let Some(kube) = &self.kube {
            self.cni_deleted.retain(|k| kube.pods.contains_key(k));
        }
        let decision = self.decide(config);
        let config = &decision.config;
        // The mesh's namespaces are known once every source has synced; writing fewer before
        // (in Kubernetes mode, usually none) would let the CNI plugin fail open.
        if decision.waiting_for.is_none() {
            self.write_cni_state(config);
        }
        // Workloads, policies and identities first: a pod enrolled below can tunnel at once.
        // Rebuilt only when the merged config changed (Kubernetes events often change nothing).
        if self.applied.as_deref() != Some(config) {
            let config = Arc::new(config.clone());
            self.sources.set_config(config.clone());
            self.applied = Some(config);
        }
        self.ctx
            .certs
            .set_identities(config.enrolled_pods().map(|p| p.identity.clone()));
        self.redirect
            .set_options(&CaptureOptions {
                inbound_excluded_ports: &config.inbound_excluded_ports,
                outbound_excluded_ports: &config.outbound_excluded_ports,
            })
            .context("cannot write capture options to the eBPF maps")?;

        let desired: BTreeMap<String, &Pod> =
            config.enrolled_pods().map(|p| (p.key(), p)).collect();
        let origin = |key: &str| decision.origins.get(key).copied().unwrap_or(Origin::Config);
        let mut replace = Vec::new();
        let mut gone = Vec::new();
        for (key, a) in &mut self.active {
            match desired.get(key) {
                None => gone.push(key.clone()),
                Some(p) if **p == a.pod => a.origin = origin(key),
                Some(p) if p.netns.path() == a.pod.netns.path() => replace.push(key.clone()),
                Some(_) => gone.push(key.clone()),
            }
        }
        for key in gone {
            self.unenroll(&key);
        }
        for key in replace {
            let pod = desired[&key];
            if let Err(e) = self.replace(&key, pod, origin(&key)) {
                let msg = format!("{e:#}");
                error!(pod = %key, error = %msg, "cannot re-enroll pod with its new settings; it keeps the old ones");
                self.failed.insert(key, msg);
            }
        }
        self.failed.retain(|k, _| desired.contains_key(k));
        for (key, pod) in &desired {
            if self.active.contains_key(key) {
                continue;
            }
            match self.enroll(pod, origin(key)) {
                Ok(()) => {
                    self.failed.remove(key);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failed.get(key) != Some(&msg) {
                        error!(pod = %key, error = %msg, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(key.clone(), msg);
                }
            }
        }

        // Release pinned state nobody claims; keep what is served, what the decision keeps, and
        // the netns of pods that should be served and failed (they stay captured, fail closed).
        let mut keep: BTreeSet<NetnsCookie> = self
            .active
            .values()
            .map(|a| a.info.netns.cookie())
            .collect();
        keep.extend(&decision.keep_pinned);
        for key in self.failed.keys() {
            if let Some(pod) = desired.get(key)
                && let Ok(ns) = Netns::open(&pod.netns.path())
            {
                keep.insert(ns.cookie());
            }
        }
        let keep: Vec<NetnsCookie> = keep.into_iter().collect();
        let pruned = self.redirect.prune(&keep)?;
        let served_ips: Vec<IpAddr> = self
            .active
            .values()
            .flat_map(|a| a.pod.ips.iter().copied())
            .collect();
        self.redirect
            .set_pod_ips(&served_ips)
            .context("cannot write the pods' IPs for the kubelet probe marker")?;
        if !pruned.is_empty() {
            info!(?pruned, "released netns no source claims any more");
        }
        self.pinned.retain(|c, _| keep.contains(c));
        if decision.waiting_for.is_none() && !self.pinned.is_empty() {
            info!("every pod source has synced; the earlier agent's pods are resolved");
            self.pinned.clear();
        }
        for (key, error) in decision.missing {
            if self.failed.get(&key) != Some(&error) {
                warn!(pod = %key, error = %error, "cannot enroll pod yet; will retry");
            }
            self.failed.insert(key, error);
        }
        self.adopted = decision.adopted;
        self.held = decision.held;
        self.waiting_for = decision.waiting_for;
        self.save_records();
        self.sync_annotations();
        Ok(())
    }

    /// Saves what the next agent needs to adopt the served pods (and the pinned ones still
    /// held with a record), when it changed.
    fn save_records(&mut self) {
        let mut records: BTreeMap<NetnsCookie, Record> = self
            .pinned
            .iter()
            .filter_map(|(cookie, p)| match p {
                Pinned::Live(r) => Some((*cookie, (**r).clone())),
                _ => None,
            })
            .collect();
        for a in self.active.values() {
            records.insert(
                a.info.netns.cookie(),
                Record {
                    origin: a.origin,
                    pod: a.pod.clone(),
                },
            );
        }
        if self.saved.as_ref() == Some(&records) {
            return;
        }
        match records::save(&self.records_path, &self.node, &records) {
            Ok(()) => self.saved = Some(records),
            Err(e) => warn!(
                file = %self.records_path.display(),
                error = %e,
                "cannot save the pod records; after a restart, pods are held captured but not served until every source has synced"
            ),
        }
    }

    /// Sets the redirection annotation on the Kubernetes pods that are enrolled, and clears it
    /// on those that are not (in the background; the watch shows when it is done).
    pub fn sync_annotations(&mut self) {
        let (Some(client), Some(kube)) = (&self.kube_client, &self.kube) else {
            return;
        };
        for (key, kp) in &kube.pods {
            let want = self.active.contains_key(key);
            let has = kp
                .annotations
                .get(crate::kube::REDIRECTION_ANNOTATION)
                .is_some_and(|v| v == "enabled");
            if want == has {
                self.annotating.remove(key);
                continue;
            }
            if self
                .annotating
                .get(key)
                .is_some_and(|(w, at)| *w == want && at.elapsed() < ANNOTATION_RETRY)
            {
                continue;
            }
            self.annotating
                .insert(key.clone(), (want, std::time::Instant::now()));
            let (client, kp) = (client.clone(), kp.clone());
            self.annotation_writes
                .spawn(async move { crate::kube::annotate(&client, &kp, want).await });
        }
        self.annotating.retain(|k, _| kube.pods.contains_key(k));
    }

    /// Leaves the mesh's namespaces where the CNI plugin looks when the agent is unreachable.
    fn write_cni_state(&mut self, config: &Config) {
        let state = crate::api::CniState {
            ambient_namespaces: config.ambient_namespaces.iter().cloned().collect(),
            socket: config.admin_socket.display().to_string(),
        };
        if self.cni_state.as_ref() == Some(&state) {
            return;
        }
        let path = &config.cni_state_file;
        let write = || -> std::io::Result<()> {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(&state)?)?;
            std::fs::rename(&tmp, path)
        };
        match write() {
            Ok(()) => self.cni_state = Some(state),
            Err(e) => warn!(
                file = %path.display(),
                error = %e,
                "cannot write the CNI state file; with the agent down, the CNI plugin cannot tell mesh pods from others"
            ),
        }
    }

    fn enroll(&mut self, pod: &Pod, origin: Origin) -> anyhow::Result<()> {
        let key = pod.key();
        let netns = Netns::open(&pod.netns.path())?;
        if let Some(other) = self
            .active
            .values()
            .find(|a| a.info.netns.cookie() == netns.cookie())
        {
            anyhow::bail!(
                "netns {} is already used by pod {}; each pod needs its own network namespace",
                pod.netns,
                other.pod.key()
            );
        }
        // The pod's annotation (or config entry) over the node's `dns.capture`.
        let dns = pod.dns_capture.unwrap_or(self.ctx.dns.settings.capture);
        let listeners = netns.run(|| -> anyhow::Result<PodListeners> {
            routing::install()
                .context("cannot set up the pod's return route for transparent connections")?;
            Ok(PodListeners::bind(dns)?)
        })??;
        let pod_id = self.next_pod_id;
        self.next_pod_id += 1;
        self.redirect
            .enroll(&netns, pod_id, &pod.ips, &listeners.inbound, dns)
            .context("cannot register the pod with the eBPF programs")?;
        let cookie = netns.cookie();
        let info = Arc::new(PodInfo {
            key: key.clone(),
            identity: pod.identity.clone(),
            ips: pod.ips.clone(),
            netns,
            hbone_tls: ArcSwapOption::empty(),
            open: Arc::default(),
            dns,
        });
        let cancel = CancellationToken::new();
        self.listeners.spawn(proxy::follow_pod_cert(
            self.ctx.clone(),
            info.clone(),
            cancel.clone(),
        ));
        if let Err(e) = proxy::serve_pod(
            self.ctx.clone(),
            info.clone(),
            listeners,
            cancel.clone(),
            &self.listeners,
        ) {
            cancel.cancel();
            // Fail closed: the netns stays enrolled (captured, refused) rather than released.
            return Err(e).context("cannot serve the pod's listeners");
        }
        info!(pod = %key, netns_cookie = %cookie, ips = ?pod.ips, origin = origin.as_str(), "pod enrolled");
        self.active.insert(
            key,
            ActivePod {
                pod: pod.clone(),
                origin,
                info,
                cancel,
            },
        );
        Ok(())
    }

    /// Serves `pod` (same netns as the active pod `key`, new settings) without a moment out of
    /// capture: the new listeners bind next to the old ones (`SO_REUSEPORT`) and replace them in
    /// the eBPF maps before the old ones close. On failure the old pod keeps being served.
    fn replace(&mut self, key: &str, pod: &Pod, origin: Origin) -> anyhow::Result<()> {
        let Some(old) = self.active.remove(key) else {
            return self.enroll(pod, origin);
        };
        if let Err(e) = self.enroll(pod, origin) {
            self.active.insert(key.to_owned(), old);
            return Err(e);
        }
        old.cancel.cancel();
        let dropped: Vec<IpAddr> = old
            .pod
            .ips
            .iter()
            .filter(|ip| !pod.ips.contains(ip))
            .copied()
            .collect();
        self.redirect.unregister_inbound(&dropped);
        info!(pod = %key, "pod re-enrolled in place with its new settings; capture never stopped");
        Ok(())
    }

    /// Capture off first, then the listeners close; open connections finish on their own.
    fn unenroll(&mut self, key: &str) {
        let Some(active) = self.active.remove(key) else {
            return;
        };
        if let Err(e) = self
            .redirect
            .unenroll(active.info.netns.cookie(), &active.pod.ips)
        {
            error!(pod = %key, error = %e, "releasing the pod from capture failed");
        }
        active.cancel.cancel();
        info!(pod = %key, "pod unenrolled; its traffic flows directly again");
    }

    /// Stops every pod's listeners (the drain), leaving capture pinned.
    pub async fn stop_listening(&mut self) {
        for a in self.active.values() {
            a.cancel.cancel();
        }
        self.listeners.close();
        self.listeners.wait().await;
        self.annotation_writes.close();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.annotation_writes.wait(),
        )
        .await;
    }
}
