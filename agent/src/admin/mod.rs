//! The admin API: JSON over HTTP on a root-only unix socket (default `/run/ambit/admin.sock`),
//! read by `ambitctl`; and the Prometheus endpoint (`/metrics`, port 15020). Both read the same
//! live state the data path uses. Wire types are in [`api`].

/// The wire types, shared with ambitctl and the CNI plugin (kept at `admin::api` for them).
pub use crate::api;
pub mod client;
mod explain;

use std::{
    net::SocketAddr,
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{CaConfig, Config},
    http::{Request, Response},
    identity::manager::CertManager,
    metrics::Gauges,
    pods::{CniOp, CniRequest, PodsState},
    proxy::ProxyContext,
    readiness::Readiness,
    state::{Source, Workload},
    telemetry,
};

/// What the admin API reads.
pub struct Admin {
    pub started: Instant,
    pub config_path: PathBuf,
    /// The config in force (updated on every reload that applies).
    pub config: ArcSwap<Config>,
    /// Why the last reload was refused, until one applies.
    pub config_refused: arc_swap::ArcSwapOption<String>,
    pub ctx: Arc<ProxyContext>,
    pub readiness: Arc<Readiness>,
    pub certs: Arc<CertManager>,
    /// Shared with readiness.
    pub pods: Arc<ArcSwap<PodsState>>,
    /// CNI calls, answered by the pod manager.
    pub cni: tokio::sync::mpsc::Sender<CniRequest>,
}

/// How long a CNI ADD may wait for its pod to be enrolled.
const CNI_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

impl Admin {
    /// Serves the admin API on `path` until `shutdown`. The socket is replaced if a stale one
    /// is there, and made root-only (0600) before the first request can arrive.
    pub async fn serve_socket(self: Arc<Self>, path: PathBuf, shutdown: CancellationToken) {
        let (listener, inode) = match bind_socket(&path) {
            Ok(l) => l,
            Err(e) => {
                warn!(socket = %path.display(), error = %e, "cannot serve the admin API; ambitctl will not reach this agent");
                return;
            }
        };
        info!(socket = %path.display(), "admin API listening");
        let accept = || async { listener.accept().await.map(|(s, _)| s) };
        let admin = self.clone();
        let handle = move |r: Request| {
            let admin = admin.clone();
            async move { admin.handle(&r).await }
        };
        // A CNI ADD waits for the pod's enrollment.
        crate::http::serve(accept, handle, CNI_TIMEOUT, shutdown).await;
        // Only our own socket: a newer agent (rolling update) may have replaced it.
        if std::fs::metadata(&path).is_ok_and(|m| m.ino() == inode) {
            let _ = std::fs::remove_file(&path);
        }
    }

    /// Serves `/metrics` on `addr` until `shutdown`.
    pub async fn serve_metrics(self: Arc<Self>, addr: SocketAddr, shutdown: CancellationToken) {
        let listener = match crate::http::bind_shared(addr) {
            Ok(l) => l,
            Err(e) => {
                warn!(%addr, error = %e, "cannot serve metrics (is another agent using the port?)");
                return;
            }
        };
        let accept = || async { listener.accept().await.map(|(s, _)| s) };
        let admin = self.clone();
        let handle = move |r: Request| {
            let response = if r.path == "/metrics" {
                Response {
                    status: 200,
                    content_type: crate::metrics::CONTENT_TYPE,
                    body: admin.metrics_text().into_bytes(),
                }
            } else {
                Response::text(404, "try /metrics\n")
            };
            async move { response }
        };
        crate::http::serve(accept, handle, crate::http::TIMEOUT, shutdown).await
    }

    async fn handle(&self, r: &Request) -> Response {
        let result = match (r.method.as_str(), r.path.as_str()) {
            ("POST", "/cni/add") => self.cni(CniOp::Add, &r.body).await,
            ("POST", "/cni/del") => self.cni(CniOp::Del, &r.body).await,
            ("POST", "/cni/check") => self.cni(CniOp::Check, &r.body).await,
            ("GET", "/status") => Ok(Response::json(200, &self.status())),
            ("GET", "/workloads") => {
                let local = r.param("local").is_some_and(|v| v == "true" || v == "1");
                Ok(Response::json(200, &self.workloads(local)))
            }
            ("GET", "/services") => Ok(Response::json(200, &self.services())),
            ("GET", "/policies") => Ok(Response::json(200, &self.policies())),
            ("GET", "/certificates") => Ok(Response::json(200, &self.certificates())),
            ("GET", "/connections") => Ok(Response::json(200, &self.connections())),
            ("GET", "/bpf") => self.bpf().map(|b| Response::json(200, &b)),
            ("GET", "/config") => Ok(Response::json(200, &**self.config.load())),
            ("GET", "/logging") => log_level().map(|l| Response::json(200, &l)),
            ("PUT", "/logging") => set_log_level(r.param("level")),
            ("GET", "/explain/dns") => match r.param("name") {
                Some(name) => Ok(Response::json(200, &self.explain_dns(name))),
                None => Err((400, "explain/dns needs name".to_owned())),
            },
            ("GET", "/explain") => match (r.param("src"), r.param("dst")) {
                (Some(src), Some(dst)) => {
                    explain::explain(self, src, dst).map(|e| Response::json(200, &e))
                }
                _ => Err((
                    400,
                    "explain needs src (pod, IP or SPIFFE id) and dst (ip:port)".to_owned(),
                )),
            },
            (_, path) if ROUTES.contains(&path) => {
                Err((405, format!("{} is not allowed on {path}", r.method)))
            }
            (_, path) => Err((
                404,
                format!(
                    "no endpoint {path}; the endpoints are {}",
                    ROUTES.join(", ")
                ),
            )),
        };
        result.unwrap_or_else(|(status, error)| Response::json(status, &api::ApiError { error }))
    }

    /// What the DNS proxy does with `name`, from the state the data path reads.
    fn explain_dns(&self, name: &str) -> api::DnsExplain {
        let snapshot = self.ctx.workloads.snapshot();
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let def = crate::dns::lookup(&snapshot, &name);
        let capture = self.ctx.dns.settings.capture;
        api::DnsExplain {
            service: def.map(|d| format!("{}/{}", d.namespace, d.hostname)),
            addresses: def.map(|d| d.vips.clone()).unwrap_or_default(),
            outcome: match def {
                Some(d) => format!(
                    "answered by the agent (A/AAAA) with the VIPs of service {}/{}",
                    d.namespace, d.name
                ),
                None => "forwarded to the pod's resolver: not a service hostname the mesh knows"
                    .to_owned(),
            },
            capture,
            name,
        }
    }

    /// Hands a CNI call to the pod manager and waits for its answer.
    async fn cni(&self, op: CniOp, body: &[u8]) -> Result<Response, (u16, String)> {
        let pod: api::CniPod = serde_json::from_slice(body)
            .map_err(|e| (400, format!("the body is not a CniPod: {e}")))?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.cni
            .send(CniRequest { op, pod, reply })
            .await
            .map_err(|_| (503, "the agent is shutting down".to_owned()))?;
        let answer = answer
            .await
            .map_err(|_| (503, "the agent is shutting down".to_owned()))??;
        Ok(Response::json(200, &answer))
    }

    fn status(&self) -> api::Status {
        let config = self.config.load();
        let pods = self.pods.load();
        let snapshot = self.ctx.workloads.snapshot();
        let certs = self.certs.status();
        let not_ready = match self.readiness.check() {
            Ok(()) => Vec::new(),
            Err(missing) => missing,
        };
        let (kind, location) = match &config.ca {
            CaConfig::Builtin { dir, cert_file, .. } => (
                "builtin",
                cert_file.as_ref().unwrap_or(dir).display().to_string(),
            ),
            CaConfig::Istio { address, .. } => ("istio", address.clone()),
        };
        api::Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            node: config.node.clone(),
            pid: std::process::id(),
            uptime_seconds: self.started.elapsed().as_secs(),
            ready: not_ready.is_empty(),
            not_ready,
            config_file: self.config_path.display().to_string(),
            config_refused: self.config_refused.load_full().map(|e| (*e).clone()),
            trust_domain: config.trust_domain.clone(),
            enrolled_pods: pods.enrolled.len(),
            adopted_pods: pods
                .enrolled
                .iter()
                .filter(|p| p.adopted)
                .map(|p| p.key.clone())
                .collect(),
            held_netns: pods.held_netns.iter().map(|c| c.0).collect(),
            waiting_for: pods.waiting_for.map(str::to_owned),
            failed_pods: pods
                .failed
                .iter()
                .map(|(pod, error)| api::FailedPod {
                    pod: pod.clone(),
                    error: error.clone(),
                })
                .collect(),
            workloads: snapshot.workload_count(),
            services: snapshot.service_count(),
            policies: self.ctx.policies.load().len(),
            connections: self.ctx.live.len(),
            ca: api::CaStatus {
                kind: kind.to_owned(),
                location,
                certificates_ready: certs.iter().filter(|c| c.serial.is_some()).count(),
                certificates_total: certs.len(),
            },
            xds: self.readiness.xds.get().map(|x| {
                let s = x.status();
                api::XdsView {
                    address: s.address,
                    connected: s.connected,
                    ready: s.ready,
                    streams: s.connections,
                    pushes: s.pushes,
                    nacks: s.nacks,
                    rejected: s.rejected,
                    last_rejected: s.last_rejected,
                    last_push: s.last_push_unix_ms.map(|ms| {
                        crate::identity::manager::rfc3339(
                            std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
                        )
                    }),
                    last_error: s.last_error,
                    addresses: s.addresses,
                    policies: s.policies,
                }
            }),
        }
    }

    fn workloads(&self, local_only: bool) -> Vec<api::WorkloadView> {
        let snapshot = self.ctx.workloads.snapshot();
        let pods = self.pods.load();
        let mut out: Vec<api::WorkloadView> = snapshot
            .workloads()
            .filter(|w| !local_only || w.local)
            // Shown once, as the config workload it is merged into.
            .filter(|w| snapshot.merged_into(w).is_none())
            .map(|w| workload_view(w, snapshot.xds_twin(w).map(|t| &**t), &pods))
            .collect();
        out.sort_by(|a, b| (&a.namespace, &a.name, &a.uid).cmp(&(&b.namespace, &b.name, &b.uid)));
        out
    }

    fn services(&self) -> Vec<api::ServiceView> {
        let snapshot = self.ctx.workloads.snapshot();
        let mut out: Vec<api::ServiceView> = snapshot
            .services()
            .map(|s| {
                let (namespace, hostname) = s.key.split_once('/').unwrap_or(("", &s.key));
                let def = s.def.as_deref();
                api::ServiceView {
                    key: s.key.to_string(),
                    namespace: namespace.to_owned(),
                    hostname: hostname.to_owned(),
                    vips: def
                        .map(|d| {
                            d.vips
                                .iter()
                                .map(ToString::to_string)
                                .chain(d.vip_ranges.iter().map(ToString::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                    ports: def
                        .map(|d| {
                            d.ports
                                .iter()
                                .map(|(port, target_port)| api::ServicePortView {
                                    port: *port,
                                    target_port: *target_port,
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    endpoints: s
                        .endpoints
                        .iter()
                        .map(|w| api::EndpointView {
                            workload: w.display_name(),
                            ips: w.ips().iter().map(ToString::to_string).collect(),
                            healthy: w.healthy,
                        })
                        .collect(),
                    source: def.map_or("workloads", |d| d.source.as_str()).to_owned(),
                    waypoint: def
                        .and_then(|d| d.waypoint.as_ref())
                        .map(crate::xds::XdsGateway::display_name),
                }
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    fn policies(&self) -> Vec<api::PolicyView> {
        let config = self.config.load();
        let store = self.ctx.policies.load();
        let mut out: Vec<api::PolicyView> = store
            .iter()
            .map(|p| {
                let key = p.key();
                let from_config = config.policies.iter().any(|c| c.key() == key);
                let enum_str = |v: serde_json::Value| v.as_str().unwrap_or_default().to_owned();
                api::PolicyView {
                    name: key,
                    scope: enum_str(serde_json::to_value(p.scope).unwrap_or_default()),
                    action: enum_str(serde_json::to_value(p.action).unwrap_or_default()),
                    dry_run: p.dry_run,
                    rules: p.rules.len(),
                    source: if from_config { "config" } else { "xds" }.to_owned(),
                    spec: serde_json::to_value(p).unwrap_or_default(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    fn certificates(&self) -> Vec<api::CertView> {
        let now = crate::identity::manager::unix_secs(std::time::SystemTime::now());
        self.certs
            .status()
            .into_iter()
            .map(|c| api::CertView {
                identity: c.identity,
                state: c.state.to_owned(),
                serial: c.serial,
                not_after: c.not_after,
                expires_in_seconds: c.not_after_unix.map(|t| t - now),
                next_rotation: c.next_rotation,
                last_error: c.last_error,
                fetches: c.fetches,
            })
            .collect()
    }

    fn connections(&self) -> Vec<api::ConnectionView> {
        self.ctx
            .live
            .list()
            .iter()
            .map(|c| {
                let i = &c.info;
                api::ConnectionView {
                    id: c.id,
                    direction: i.direction.as_str().to_owned(),
                    path: c.path().as_str().to_owned(),
                    src: i.src.to_string(),
                    dst: i.dst.to_string(),
                    src_workload: i.src_workload.clone(),
                    dst_workload: i.dst_workload.clone(),
                    src_identity: i.src_identity.as_ref().map(ToString::to_string),
                    dst_identity: i.dst_identity.as_ref().map(ToString::to_string),
                    service: i.service.clone(),
                    bytes_sent: i.counts.sent(),
                    bytes_received: i.counts.received(),
                    age_seconds: i.start.elapsed().as_secs_f64(),
                }
            })
            .collect()
    }

    fn bpf(&self) -> Result<api::BpfView, (u16, String)> {
        let config = self.config.load();
        let mut view =
            crate::redirect::inspect(&config.bpf_pin_path, &config.cgroup.display().to_string())
                .map_err(|e| (500, e))?;
        let pods = self.pods.load();
        for e in &mut view.enrolled {
            if let Some(p) = pods
                .enrolled
                .iter()
                .find(|p| p.netns_cookie.0 == e.netns_cookie)
            {
                e.pod = Some(p.key.clone());
                e.ips = p.ips.iter().map(ToString::to_string).collect();
            }
        }
        // The splice maps are the agent's own (not pinned): only it can show them.
        view.splice = Some(self.ctx.capture.splice_state());
        if let Some(splicer) = self.ctx.capture.splicer() {
            use ambit_common as common;
            view.programs.push(api::BpfProgramView {
                name: common::program::SPLICE.to_owned(),
                kind: "sk_skb/stream_verdict".to_owned(),
                attached_to: vec![format!("sockhash {}", common::MAP_SPLICE)],
            });
            let (sockets, max_entries) = splicer.fill();
            for name in [common::MAP_SPLICE_SOCKETS, common::MAP_SPLICE] {
                view.maps.push(api::BpfMapView {
                    name: name.to_owned(),
                    max_entries,
                    entries: Some(sockets),
                });
            }
        }
        Ok(view)
    }

    /// The Prometheus exposition text.
    pub fn metrics_text(&self) -> String {
        let config = self.config.load();
        let snapshot = self.ctx.workloads.snapshot();
        let pool = self.ctx.pool.stats();
        let gauges = Gauges {
            enrolled_pods: self.pods.load().enrolled.len(),
            bpf: crate::redirect::inspect(&config.bpf_pin_path, "")
                .map(|v| v.counters)
                .unwrap_or_default(),
            cert_expiry: self
                .certs
                .status()
                .into_iter()
                .filter_map(|c| Some((c.identity, c.not_after_unix?)))
                .collect(),
            xds: self.readiness.xds.get().map(|x| x.status()),
            pool_connections_opened: pool.connections_opened,
            pool_streams_opened: pool.streams_opened,
            pool_open_connections: pool.open_connections,
            open_connections: self.ctx.live.len(),
            held_connections: self.ctx.gate.held(),
            workloads: snapshot.workload_count(),
            services: snapshot.service_count(),
            policies: self.ctx.policies.load().len(),
            kube_unreadable: self.pods.load().unreadable,
            splice: self.ctx.capture.splicer().map(|s| s.stats()),
        };
        self.ctx.live.metrics().render(&gauges)
    }
}

const ROUTES: &[&str] = &[
    "/cni/add",
    "/cni/del",
    "/cni/check",
    "/status",
    "/workloads",
    "/services",
    "/policies",
    "/certificates",
    "/connections",
    "/bpf",
    "/config",
    "/logging",
    "/explain",
    "/explain/dns",
];

/// `twin`: for a config workload, istiod's view of the same pod (its telemetry fields and uid
/// are shown; the config's settings are the ones used).
fn workload_view(w: &Workload, twin: Option<&Workload>, pods: &PodsState) -> api::WorkloadView {
    let key = format!("{}/{}", w.namespace, w.name());
    let meta = twin.map_or(&w.meta, |t| &t.meta);
    api::WorkloadView {
        canonical_name: meta.canonical_name.clone(),
        canonical_revision: meta.canonical_revision.clone(),
        cluster: meta.cluster_id.clone(),
        network: meta.network.clone(),
        locality: [&meta.region, &meta.zone, &meta.subzone]
            .into_iter()
            .filter(|s| !s.is_empty())
            .cloned()
            .collect::<Vec<_>>()
            .join("/"),
        xds_uid: twin.map(|t| t.uid().to_owned()),
        uid: w.uid().to_owned(),
        namespace: w.namespace.to_string(),
        name: w.name().to_owned(),
        node: w.node.to_string(),
        identity: w.identity.to_string(),
        ips: w.ips().iter().map(ToString::to_string).collect(),
        hbone: w.hbone,
        local: w.local,
        enrolled: w.local && pods.enrolled.iter().any(|p| p.key == key),
        healthy: w.healthy,
        services: w.services.iter().map(|s| s.key.to_string()).collect(),
        policies: w.policies.iter().map(|p| p.to_string()).collect(),
        source: match (w.source, twin) {
            (Source::Config, Some(_)) => "config+xds",
            (Source::Config, None) => "config",
            (Source::Xds, _) => "xds",
        }
        .to_owned(),
        waypoint: w
            .waypoint
            .as_deref()
            .map(crate::xds::XdsGateway::display_name),
    }
}

fn log_level() -> Result<api::LogLevel, (u16, String)> {
    telemetry::log_control()
        .map(|c| api::LogLevel { level: c.current() })
        .ok_or((500, "logging is not initialized".to_owned()))
}

fn set_log_level(level: Option<&str>) -> Result<Response, (u16, String)> {
    let Some(level) = level.filter(|l| !l.is_empty()) else {
        return Err((
            400,
            "give the new filter as ?level=, e.g. info or info,ambit_agent::xds=debug".to_owned(),
        ));
    };
    let control = telemetry::log_control().ok_or((500, "logging is not initialized".to_owned()))?;
    control.set(level).map_err(|e| (400, e))?;
    info!(level, "log level changed through the admin API");
    Ok(Response::json(
        200,
        &api::LogLevel {
            level: control.current(),
        },
    ))
}

/// Binds the socket, replacing a stale one, and makes it root-only.
fn bind_socket(path: &Path) -> std::io::Result<(UnixListener, u64)> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created with the umask's mode, then narrowed before anyone is accepted.
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, std::fs::metadata(path)?.ino()))
}
