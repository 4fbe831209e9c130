//! Wiring: load the config, load and attach the capture programs, enroll the configured pods, then
//! follow config changes until SIGTERM, and drain.
//!
//! One control task owns the capture state ([`Redirect`]) and the set of served pods; it is the
//! only writer. Connection handlers only read (the original-destination map, their pod's netns).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    sync::atomic::AtomicBool,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::{
    admin::{Admin, CniOp, CniRequest, EnrolledPod, PodsState},
    config::{CaConfig, Config, Pod},
    identity::{
        CaClient,
        builtin::BuiltinCa,
        istio::{IstioCa, IstioCaConfig},
        manager::CertManager,
    },
    policy::PolicyStore,
    proxy::{self, PodInfo, PodListeners, ProxyContext},
    readiness::{self, Readiness},
    redirect::{self, CaptureOptions, Netns, Redirect, routing},
    state::{Sources, Workloads},
    tls::{self, TrustRoots},
    tunnel::client::Pool,
    xds::{NodeInfo, XdsClient, XdsConfig},
};

/// How often the config file is checked for changes (SIGHUP applies at once).
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf, ebpf_log_level: u8) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    if config.waypoint.is_some() {
        anyhow::bail!(
            "{} is a waypoint's config (it has a `waypoint:` section); run it with `ambit-agent \
             waypoint`",
            config_path.display()
        );
    }
    info!(node = %config.node, config = %config_path.display(), "starting ambit-agent");

    let control_tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    let (ca, roots) = build_ca(&config)?;
    info!(ca = %ca.describe(), trust_domain = %config.trust_domain, "certificate authority configured");
    let certs = CertManager::new(ca, config.cert_lifetime);
    // Served from the start, so probes see "not ready" (and why) until everything is in place.
    let readiness = Arc::new(Readiness {
        started: AtomicBool::new(false),
        certs: certs.clone(),
        xds: std::sync::OnceLock::new(),
        kube: std::sync::OnceLock::new(),
    });
    control_tasks.spawn(readiness::serve(
        config.readiness_address,
        readiness.clone(),
        shutdown.clone(),
    ));

    let (redirect, orig_dst, logger) =
        Redirect::load(&config.bpf_pin_path, &config.cgroup, ebpf_log_level)?;
    // SAFETY: the logger owns the ring buffer's fd, which stays open and unchanged for as long
    // as the AsyncFd owns the logger.
    #[allow(unsafe_code)]
    let bpf_logs =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the eBPF log ring buffer: {e}"))?;
    control_tasks.spawn(forward_bpf_logs(bpf_logs, shutdown.clone()));

    let metrics = Arc::new(crate::metrics::Metrics::default());
    let pool = Pool::new(
        config.hbone.max_streams_per_connection,
        config.hbone.parallel_connections,
        config.hbone.idle_timeout,
    );
    control_tasks.spawn(pool.clone().run_reaper(shutdown.clone()));
    let ctx = Arc::new(ProxyContext {
        orig_dst,
        connections: TaskTracker::new(),
        workloads: Workloads::default(),
        certs: certs.clone(),
        roots,
        pool,
        trust_domain: config.trust_domain.clone(),
        policies: arc_swap::ArcSwap::from_pointee(PolicyStore::new()),
        live: proxy::live::LiveConns::new(metrics.clone()),
        draining: CancellationToken::new(),
    });
    let sources = {
        let ctx = ctx.clone();
        Arc::new(Sources::new(
            Arc::new(config.clone()),
            move |snapshot, policies| {
                ctx.workloads.replace(snapshot);
                // New connections are judged by the new state at once, open ones re-judged.
                let closed = match policies {
                    Some(policies) => ctx.set_policies(policies),
                    None => ctx.rejudge(),
                };
                if closed > 0 {
                    info!(
                        closed,
                        "closed open connections the new policies no longer allow"
                    );
                }
            },
        ))
    };
    if let Some(x) = &config.xds {
        let client = Arc::new(build_xds(x, &config, sources.clone())?);
        let _ = readiness.xds.set(client.clone());
        control_tasks.spawn(client.clone().run(shutdown.clone()));
        let ready = client.clone();
        control_tasks.spawn(async move {
            ready.wait_ready().await;
            info!(address = %ready.status().address, "xDS ready: first full state applied");
        });
    }
    let mut pods = PodManager {
        sources,
        redirect,
        ctx: ctx.clone(),
        active: BTreeMap::new(),
        failed: BTreeMap::new(),
        cni_pods: BTreeMap::new(),
        cni_state: None,
        kube_client: None,
        kube: None,
        netns_finder: Default::default(),
        annotating: BTreeMap::new(),
        cni_deleted: Default::default(),
        applied: None,
        listeners: TaskTracker::new(),
        next_pod_id: 1,
    };
    let mut kube_rx = match &config.kubernetes {
        None => None,
        Some(k) => {
            let client = crate::kube::Client::new(k).context("kubernetes")?;
            let (tx, rx) = tokio::sync::watch::channel(Arc::default());
            control_tasks.spawn(crate::kube::run(
                client.clone(),
                config.node.clone(),
                tx,
                shutdown.clone(),
            ));
            info!(api_server = %k.api_server, "Kubernetes mode: watching namespaces and this node's pods");
            pods.kube_client = Some(client);
            pods.netns_finder = crate::kube::NetnsFinder::new(k.netns_path_prefix.clone());
            let _ = readiness.kube.set(rx.clone());
            Some(rx)
        }
    };
    pods.apply(&config)?;
    let (cni_tx, mut cni_rx) = tokio::sync::mpsc::channel::<CniRequest>(64);
    let admin = Arc::new(Admin {
        started: std::time::Instant::now(),
        config_path: config_path.clone(),
        config: ArcSwap::from_pointee(config.clone()),
        ctx: ctx.clone(),
        readiness: readiness.clone(),
        certs: certs.clone(),
        pods: ArcSwap::from_pointee(pods.state()),
        cni: cni_tx,
    });
    control_tasks.spawn(
        admin
            .clone()
            .serve_socket(config.admin_socket.clone(), shutdown.clone()),
    );
    control_tasks.spawn(
        admin
            .clone()
            .serve_metrics(config.metrics_address, shutdown.clone()),
    );
    readiness
        .started
        .store(true, std::sync::atomic::Ordering::Release);
    info!(node = %config.node, pods = pods.active.len(), "agent ready");

    let mut config = config;
    let mut last_text = std::fs::read(&config_path).ok();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(CONFIG_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            Ok(()) = async {
                match &mut kube_rx {
                    Some(rx) => rx.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                pods.kube = kube_rx.as_mut().map(|rx| rx.borrow_and_update().clone());
                if let Err(e) = pods.apply(&config) {
                    error!(error = %e, "applying the Kubernetes state failed");
                }
                admin.pods.store(Arc::new(pods.state()));
                continue;
            }
            Some(req) = cni_rx.recv() => {
                let answer = pods.cni(&config, req.op, &req.pod);
                let _ = req.reply.send(answer);
                admin.pods.store(Arc::new(pods.state()));
                continue;
            }
            _ = hup.recv() => true,
            _ = tick.tick() => false,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let text = std::fs::read(&config_path).ok();
        if forced || text != last_text {
            last_text = text;
            match reload(&config, &config_path) {
                Ok(new) => {
                    config = new;
                    if let Err(e) = pods.apply(&config) {
                        error!(error = %e, "applying the new config failed");
                    }
                    info!(pods = pods.active.len(), "config applied");
                }
                Err(e) => error!(error = %e, "config reload refused; keeping the previous config"),
            }
            admin.config.store(Arc::new(config.clone()));
            admin.pods.store(Arc::new(pods.state()));
        } else if !pods.failed.is_empty() {
            // Pods whose netns was not ready yet: try again.
            if let Err(e) = pods.apply(&config) {
                error!(error = %e, "retrying enrollment failed");
            }
            admin.pods.store(Arc::new(pods.state()));
        } else if !pods.annotating.is_empty() {
            pods.sync_annotations();
        }
    }

    info!(
        drain_timeout_s = config.drain_timeout.as_secs_f64(),
        "shutting down: no longer accepting; draining open connections"
    );
    let counters = pods.redirect.counters();
    pods.stop_listening().await;
    ctx.draining.cancel();
    ctx.connections.close();
    if tokio::time::timeout(config.drain_timeout, ctx.connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = ctx.connections.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    shutdown.cancel();
    certs.shutdown().await;
    control_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), control_tasks.wait()).await;
    info!(
        ?counters,
        pin_path = %config.bpf_pin_path.display(),
        "agent stopped; enrolled pods stay captured and their new connections are refused until \
         an agent runs again (`ambit-agent cleanup` releases them)"
    );
    Ok(())
}

pub(crate) fn reload(old: &Config, path: &Path) -> anyhow::Result<Config> {
    let new = Config::load(path)?;
    for (field, changed) in [
        ("node", new.node != old.node),
        ("cgroup", new.cgroup != old.cgroup),
        ("bpfPinPath", new.bpf_pin_path != old.bpf_pin_path),
        ("trustDomain", new.trust_domain != old.trust_domain),
        ("stateDir", new.state_dir != old.state_dir),
        ("ca", new.ca != old.ca),
        ("trustRoots", new.trust_roots != old.trust_roots),
        (
            "certLifetimeSeconds",
            new.cert_lifetime != old.cert_lifetime,
        ),
        ("hbone", new.hbone != old.hbone),
        ("xds", new.xds != old.xds),
        (
            "readinessAddress",
            new.readiness_address != old.readiness_address,
        ),
        ("metricsAddress", new.metrics_address != old.metrics_address),
        ("adminSocket", new.admin_socket != old.admin_socket),
    ] {
        if changed {
            anyhow::bail!(
                "{field} cannot change while the agent runs; restart the agent to change it"
            );
        }
    }
    Ok(new)
}

async fn forward_bpf_logs(
    mut logs: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
    shutdown: CancellationToken,
) {
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            g = logs.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "eBPF log ring buffer unreadable; eBPF logs stop here");
                    return;
                }
            },
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// A pod the agent is serving.
struct ActivePod {
    pod: Pod,
    info: Arc<PodInfo>,
    cancel: CancellationToken,
}

/// How long a redirection annotation patch may take to show in the watch before it is sent again.
const ANNOTATION_RETRY: Duration = Duration::from_secs(10);

/// Keeps the served pods equal to the enrolled pods of the config.
struct PodManager {
    redirect: Redirect,
    /// Merges the config and xDS into the data path's state.
    sources: Arc<Sources>,
    ctx: Arc<ProxyContext>,
    active: BTreeMap<String, ActivePod>,
    /// Pods that could not be enrolled, with the last error (retried on every tick).
    failed: BTreeMap<String, String>,
    /// Pods the CNI plugin announced (not in the config), by `namespace/name`.
    cni_pods: BTreeMap<String, Pod>,
    /// What was last written to the CNI state file.
    cni_state: Option<crate::admin::api::CniState>,
    /// Kubernetes mode: the API client, what the watches know, and where pods' netns are.
    kube_client: Option<crate::kube::Client>,
    kube: Option<Arc<crate::kube::KubeState>>,
    netns_finder: crate::kube::NetnsFinder,
    /// Redirection annotations being written (`namespace/name` -> enabled, when asked); asked
    /// again after a while if the watch does not show the change (a failed patch).
    annotating: BTreeMap<String, (bool, std::time::Instant)>,
    /// Kubernetes pods released by a CNI DEL, kept out until the API drops them or a new ADD.
    cni_deleted: std::collections::BTreeSet<String>,
    /// The merged config last applied to the state (skipped when unchanged).
    applied: Option<Arc<Config>>,
    listeners: TaskTracker,
    next_pod_id: u32,
}

impl PodManager {
    /// What the admin API shows of the pods.
    fn state(&self) -> PodsState {
        PodsState {
            enrolled: self
                .active
                .iter()
                .map(|(key, a)| EnrolledPod {
                    key: key.clone(),
                    netns_cookie: a.info.netns.cookie(),
                    ips: a.pod.ips.clone(),
                })
                .collect(),
            failed: self
                .failed
                .iter()
                .map(|(k, e)| (k.clone(), e.clone()))
                .collect(),
        }
    }

    /// The config with the pods the Kubernetes API and the CNI plugin announced added (the
    /// config's own entries win), and the errors of Kubernetes pods whose netns is not found.
    fn with_extra_pods(&mut self, config: &Config) -> (Config, Vec<(String, String)>) {
        let mut c = config.clone();
        let mut missing = Vec::new();
        if let Some(kube) = self.kube.clone() {
            c.ambient_namespaces.extend(
                kube.namespaces
                    .keys()
                    .filter(|ns| kube.namespace_ambient(ns))
                    .cloned(),
            );
            self.cni_deleted.retain(|k| kube.pods.contains_key(k));
            for (key, kp) in &kube.pods {
                if kp.ips.is_empty() || kp.host_network || kp.finished {
                    continue;
                }
                if self.cni_deleted.contains(key) {
                    continue;
                }
                if config.pods.iter().any(|p| p.key() == *key) {
                    continue;
                }
                let enrolled = kube.enrolls(kp);
                // Only pods to capture need their netns; the others are listed without one.
                let netns = match self.cni_pods.get(key) {
                    Some(p) => Some(p.netns.path()),
                    None if enrolled => self.netns_finder.find(kp.ips[0]),
                    None => Some(PathBuf::new()),
                };
                let Some(netns) = netns else {
                    if enrolled {
                        missing.push((
                            key.clone(),
                            format!(
                                "no network namespace on this node holds the pod's IP {}",
                                kp.ips[0]
                            ),
                        ));
                    }
                    continue;
                };
                let identity = match crate::identity::Identity::new(
                    c.trust_domain.clone(),
                    kp.namespace.clone(),
                    kp.service_account.clone(),
                ) {
                    Ok(i) => i,
                    Err(e) => {
                        missing.push((key.clone(), e.to_string()));
                        continue;
                    }
                };
                c.pods.push(Pod {
                    namespace: kp.namespace.clone(),
                    name: kp.name.clone(),
                    uid: Some(kp.uid.clone()),
                    service_account: kp.service_account.clone(),
                    ips: kp.ips.clone(),
                    netns: crate::config::NetnsRef::Path(netns),
                    enrolled,
                    identity,
                    services: Vec::new(),
                    waypoint: None,
                });
            }
        }
        for (key, pod) in &self.cni_pods {
            if !c.pods.iter().any(|p| p.key() == *key) {
                c.pods.push(pod.clone());
            }
        }
        (c, missing)
    }

    /// Sets the redirection annotation on the Kubernetes pods that are enrolled, and clears it
    /// on those that are not (in the background; the watch shows when it is done).
    fn sync_annotations(&mut self) {
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
            tokio::spawn(async move { crate::kube::annotate(&client, &kp, want).await });
        }
        self.annotating.retain(|k, _| kube.pods.contains_key(k));
    }

    fn apply(&mut self, config: &Config) -> anyhow::Result<()> {
        let (config, missing) = self.with_extra_pods(config);
        let config = &config;
        // In Kubernetes mode the mesh's namespaces are known once the watches have synced;
        // writing the config's (usually none) before would let the CNI plugin fail open.
        if self.kube_client.is_none() || self.kube.as_ref().is_some_and(|k| k.synced) {
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
                node_addresses: &config.node_addresses,
                inbound_excluded_ports: &config.inbound_excluded_ports,
                outbound_excluded_ports: &config.outbound_excluded_ports,
            })
            .context("cannot write capture options to the eBPF maps")?;

        let desired: BTreeMap<String, &Pod> =
            config.enrolled_pods().map(|p| (p.key(), p)).collect();
        let stale: Vec<String> = self
            .active
            .iter()
            .filter(|(k, a)| desired.get(*k).is_none_or(|p| **p != a.pod))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.unenroll(&key);
        }
        self.failed.retain(|k, _| desired.contains_key(k));
        for (key, pod) in desired {
            if self.active.contains_key(&key) {
                continue;
            }
            match self.enroll(pod) {
                Ok(()) => {
                    self.failed.remove(&key);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failed.get(&key) != Some(&msg) {
                        error!(pod = %key, error = %msg, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(key, msg);
                }
            }
        }
        let keep: Vec<u64> = self
            .active
            .values()
            .map(|a| a.info.netns.cookie())
            .collect();
        let pruned = self.redirect.prune(&keep)?;
        if !pruned.is_empty() {
            info!(?pruned, "released netns left enrolled by an earlier agent");
        }
        for (key, error) in missing {
            if self.failed.get(&key) != Some(&error) {
                warn!(pod = %key, error = %error, "cannot enroll pod yet; will retry");
            }
            self.failed.insert(key, error);
        }
        self.sync_annotations();
        Ok(())
    }

    /// Leaves the mesh's namespaces where the CNI plugin looks when the agent is unreachable.
    fn write_cni_state(&mut self, config: &Config) {
        let state = crate::admin::api::CniState {
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

    /// Answers a CNI call: a pod of an opted-in namespace is enrolled before the answer.
    fn cni(
        &mut self,
        config: &Config,
        op: CniOp,
        pod: &crate::admin::api::CniPod,
    ) -> Result<crate::admin::api::CniAnswer, (u16, String)> {
        use crate::admin::api::CniAnswer;
        let key = format!("{}/{}", pod.namespace, pod.name);
        let answer = |enrolled: bool, reason: String| Ok(CniAnswer { enrolled, reason });
        // The config's own entry decides for a pod it lists; otherwise the namespace label.
        let listed = config.pods.iter().find(|p| p.key() == key);
        let known = self
            .kube
            .as_ref()
            .and_then(|k| Some((k.clone(), k.pods.get(&key)?.clone())));
        // In Kubernetes mode the API decides (labels, service account): until the watch knows
        // the pod, the runtime is asked to retry rather than guess.
        if op == CniOp::Add && listed.is_none() && known.is_none() && self.kube_client.is_some() {
            let why = if self.kube.as_ref().is_some_and(|k| k.synced) {
                format!("pod {key} is not known from the Kubernetes API yet")
            } else {
                "the agent has not synced with the Kubernetes API yet".to_owned()
            };
            return Err((503, format!("{why}; retry")));
        }
        if op == CniOp::Add {
            self.cni_deleted.remove(&key);
        }
        let opted_in = match (listed, &known) {
            (Some(p), _) => p.enrolled,
            (None, Some((kube, kp))) => kube.enrolls(kp),
            (None, None) => {
                config.ambient_namespaces.contains(&pod.namespace)
                    || self
                        .kube
                        .as_ref()
                        .is_some_and(|k| k.namespace_ambient(&pod.namespace))
            }
        };
        let why_not = || match listed {
            Some(_) => format!("pod {key} is configured not to be enrolled"),
            None => format!(
                "namespace {} is not labelled {}=ambient",
                pod.namespace,
                crate::config::DATAPLANE_MODE_LABEL
            ),
        };
        match op {
            CniOp::Del => {
                let from_api = known.is_some();
                if from_api {
                    self.cni_deleted.insert(key.clone());
                }
                if (self.cni_pods.remove(&key).is_some() || from_api)
                    && let Err(e) = self.apply(config)
                {
                    error!(pod = %key, error = %e, "releasing a pod on CNI DEL failed");
                }
                answer(false, format!("pod {key} released"))
            }
            CniOp::Check => match (opted_in, self.active.contains_key(&key)) {
                (true, true) => answer(true, format!("pod {key} is enrolled")),
                (true, false) => Err((
                    409,
                    format!(
                        "pod {key} should be enrolled and is not{}",
                        self.failed
                            .get(&key)
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )),
                (false, _) => answer(false, why_not()),
            },
            CniOp::Add if !opted_in => answer(false, why_not()),
            CniOp::Add => {
                if listed.is_none() {
                    let ips = pod
                        .ips
                        .iter()
                        .map(|ip| ip.parse::<std::net::IpAddr>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| (400, format!("invalid pod IP in {:?}: {e}", pod.ips)))?;
                    if pod.netns.is_empty() {
                        return Err((400, "ADD without a netns path".to_owned()));
                    }
                    // The service account comes from the Kubernetes API in Kubernetes mode;
                    // standalone, the CNI call does not carry it.
                    let service_account = known
                        .as_ref()
                        .map_or("default", |(_, kp)| kp.service_account.as_str())
                        .to_owned();
                    let identity = crate::identity::Identity::new(
                        config.trust_domain.clone(),
                        pod.namespace.clone(),
                        service_account.clone(),
                    )
                    .map_err(|e| (400, e.to_string()))?;
                    self.cni_pods.insert(
                        key.clone(),
                        Pod {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
                            service_account,
                            ips,
                            netns: crate::config::NetnsRef::Path(pod.netns.clone().into()),
                            enrolled: true,
                            identity,
                            services: Vec::new(),
                            waypoint: None,
                        },
                    );
                }
                // A pod re-added with a new sandbox replaces its old entry.
                self.unenroll_if_changed(&key);
                if let Err(e) = self.apply(config) {
                    error!(pod = %key, error = %e, "applying a CNI pod failed");
                }
                if self.active.contains_key(&key) {
                    info!(pod = %key, "pod enrolled at CNI ADD");
                    answer(true, format!("pod {key} enrolled"))
                } else {
                    let error = self
                        .failed
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| "not enrolled".to_owned());
                    // Not kept: the runtime retries the ADD, with a netns that works.
                    self.cni_pods.remove(&key);
                    self.failed.remove(&key);
                    Err((503, format!("cannot enroll pod {key}: {error}")))
                }
            }
        }
    }

    /// Drops an active pod whose CNI entry changed (a new sandbox for the same pod).
    fn unenroll_if_changed(&mut self, key: &str) {
        let changed = match (self.active.get(key), self.cni_pods.get(key)) {
            (Some(a), Some(p)) => a.pod != *p,
            _ => false,
        };
        if changed {
            self.unenroll(key);
        }
    }

    fn enroll(&mut self, pod: &Pod) -> anyhow::Result<()> {
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
        let listeners = netns.run(|| -> anyhow::Result<PodListeners> {
            routing::install()
                .context("cannot set up the pod's return route for transparent connections")?;
            Ok(PodListeners::bind()?)
        })??;
        let pod_id = self.next_pod_id;
        self.next_pod_id += 1;
        self.redirect
            .enroll(&netns, pod_id, &pod.ips, &listeners.inbound)
            .context("cannot register the pod with the eBPF programs")?;
        let cookie = netns.cookie();
        let info = Arc::new(PodInfo {
            key: key.clone(),
            identity: pod.identity.clone(),
            ips: pod.ips.clone(),
            netns,
            // W3C baggage naming the source pod, as Istio's data plane sends it.
            baggage: format!(
                "k8s.namespace.name={},k8s.pod.name={}",
                pod.namespace, pod.name
            ),
            hbone_tls: ArcSwapOption::empty(),
        });
        let cancel = CancellationToken::new();
        self.listeners.spawn(follow_pod_cert(
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
            let _ = self.redirect.unenroll(cookie, &pod.ips);
            return Err(e).context("cannot serve the pod's listeners");
        }
        info!(pod = %key, netns_cookie = cookie, ips = ?pod.ips, "pod enrolled");
        self.active.insert(
            key,
            ActivePod {
                pod: pod.clone(),
                info,
                cancel,
            },
        );
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

    async fn stop_listening(&mut self) {
        for a in self.active.values() {
            a.cancel.cancel();
        }
        self.listeners.close();
        self.listeners.wait().await;
    }
}

/// Keeps a pod's HBONE server certificate current (see [`tls::follow_server_config`]).
async fn follow_pod_cert(ctx: Arc<ProxyContext>, pod: Arc<PodInfo>, cancel: CancellationToken) {
    tls::follow_server_config(
        &ctx.certs,
        &pod.identity,
        &ctx.roots,
        &ctx.trust_domain,
        &pod.hbone_tls,
        cancel,
    )
    .await
}

/// The xDS client for the configured control plane.
pub(crate) fn build_xds(
    x: &crate::config::XdsSettings,
    config: &Config,
    sink: Arc<Sources>,
) -> anyhow::Result<XdsClient> {
    let root = std::fs::read(&x.root_cert)
        .with_context(|| format!("cannot read xds.rootCert {}", x.root_cert.display()))?;
    Ok(XdsClient::new(
        XdsConfig {
            address: x.address.clone(),
            root_cert_pem: root,
            token_path: x.token_path.clone(),
            server_name: x.server_name.clone(),
            node: NodeInfo {
                node_name: config.node.clone(),
                pod_name: x.pod_name.clone(),
                pod_namespace: x.pod_namespace.clone(),
                instance_ips: config.node_addresses.clone(),
                cluster_id: x.cluster_id.clone(),
            },
        },
        sink,
    )?)
}

/// The configured certificate authority and the mesh's trust anchors.
pub(crate) fn build_ca(config: &Config) -> anyhow::Result<(Arc<dyn CaClient>, TrustRoots)> {
    let configured_roots =
        |default: &dyn Fn() -> anyhow::Result<TrustRoots>| match &config.trust_roots {
            Some(path) => {
                let pem = std::fs::read(path)
                    .with_context(|| format!("cannot read trustRoots {}", path.display()))?;
                Ok(TrustRoots::from_pem(&pem)?)
            }
            None => default(),
        };
    match &config.ca {
        CaConfig::Builtin {
            dir,
            cert_file,
            key_file,
        } => {
            let ca = match (cert_file, key_file) {
                (Some(cert), Some(key)) => BuiltinCa::from_files(cert, key)?,
                _ => BuiltinCa::load_or_create(dir, &config.trust_domain)?,
            };
            let roots = configured_roots(&|| Ok(TrustRoots::new(vec![ca.root_cert()])?))?;
            Ok((Arc::new(ca), roots))
        }
        CaConfig::Istio {
            address,
            root_cert,
            token_path,
            cluster_id,
        } => {
            let pem = std::fs::read(root_cert).with_context(|| {
                format!("cannot read ca.istio.rootCert {}", root_cert.display())
            })?;
            let roots = configured_roots(&|| Ok(TrustRoots::from_pem(&pem)?))?;
            let ca = IstioCa::new(IstioCaConfig {
                address: address.clone(),
                root_cert_pem: pem.clone(),
                token_path: token_path.clone(),
                cluster_id: cluster_id.clone(),
                server_name: None,
            })?;
            Ok((Arc::new(ca), roots))
        }
    }
}

/// `ambit-agent cleanup`: removes this node's pinned eBPF state and the pods' return routes.
pub fn cleanup(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let removed = redirect::cleanup(&config.bpf_pin_path)?;
    for pod in &config.pods {
        let result = Netns::open(&pod.netns.path())
            .map_err(anyhow::Error::from)
            .and_then(|ns| Ok(ns.run(routing::remove)??));
        if let Err(e) = result {
            warn!(pod = %pod.key(), error = %e, "could not remove the pod's return route");
        }
    }
    info!(
        removed,
        pin_path = %config.bpf_pin_path.display(),
        "eBPF capture state removed; pods of this node are no longer captured"
    );
    Ok(())
}

/// `ambit-agent ca-server`: Istio's CA API (`IstioCertificateService/CreateCertificate`) backed
/// by the built-in CA, for standalone meshes of several nodes and for tests. The CA's root goes
/// to `<dir>/ca-cert.pem` (the mesh trust anchor); the server's own TLS certificate, self-signed
/// for the listen address, to `<dir>/server-cert.pem` (the `ca.istio.rootCert` of agents).
pub async fn run_ca_server(
    dir: PathBuf,
    trust_domain: String,
    listen: std::net::SocketAddr,
    token: Option<String>,
) -> anyhow::Result<()> {
    let ca = BuiltinCa::load_or_create(&dir, &trust_domain)?;
    let mut names = vec!["localhost".to_owned(), "ambit-ca".to_owned()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    // The serving certificate is kept across restarts: agents pin it as the CA's TLS root.
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let (cert_pem, key_pem) = match (
        std::fs::read_to_string(&cert_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(c), Ok(k)) => (c, k),
        _ => {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
                .context("cannot generate the CA server's key")?;
            let cert = rcgen::CertificateParams::new(names)
                .and_then(|p| p.self_signed(&key))
                .context("cannot make the CA server's certificate")?;
            write_private(&key_path, key.serialize_pem().as_bytes())?;
            std::fs::write(&cert_path, cert.pem())
                .with_context(|| format!("cannot write {}", cert_path.display()))?;
            (cert.pem(), key.serialize_pem())
        }
    };
    let cert = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .and_then(Result::ok)
        .with_context(|| format!("no certificate in {}", cert_path.display()))?;
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .ok()
        .flatten()
        .with_context(|| format!("no private key in {}", key_path.display()))?;
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .context("BUG: TLS 1.3 unsupported by the provider")?
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .context("cannot use the CA server's certificate")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    info!(%listen, root = %dir.join("ca-cert.pem").display(), server_cert = %cert_path.display(), "CA server ready");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let shutdown = async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    };
    crate::identity::ca_server::serve(listener, Arc::new(tls), Arc::new(ca), token, shutdown)
        .await?;
    Ok(())
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, contents: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    f.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))
}
