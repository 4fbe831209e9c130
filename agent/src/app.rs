//! Wiring and the control loop: [`build`] loads the config, loads and attaches the capture
//! programs, starts every component in dependency order and enrolls the pods, returning a
//! [`Bound`] agent; [`Bound::run`] follows Kubernetes, CNI and config changes until SIGTERM, and
//! drains (with [`crate::lifecycle`]).
//!
//! One control task owns the capture state ([`Redirect`]) and the set of served pods; it is the
//! only writer. Connection handlers only read (the original-destination map, their pod's netns).

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    sync::atomic::AtomicBool,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use arc_swap::ArcSwap;

use crate::{
    admin::Admin,
    config::{CaConfig, Config},
    identity::{
        CaClient,
        builtin::BuiltinCa,
        istio::{IstioCa, IstioCaConfig},
        manager::CertManager,
    },
    lifecycle::{self, ConfigWatch, Event},
    pods::{CniRequest, PodManager},
    proxy::{self, ProxyContext},
    readiness::{self, Readiness},
    redirect::{self, Netns, Redirect, routing},
    state::StateWriter,
    tls::TrustRoots,
    xds::{NodeInfo, XdsClient, XdsConfig},
};

/// Runs the agent until SIGTERM or SIGINT, then drains.
pub async fn run(config_path: PathBuf, ebpf_log_level: u8) -> anyhow::Result<()> {
    build(config_path, ebpf_log_level).await?.run().await
}

/// The agent wired and serving: everything [`build`] started, and what the control loop needs.
pub struct Bound {
    config: Config,
    watch: ConfigWatch,
    ctx: Arc<ProxyContext>,
    pods: PodManager,
    admin: Arc<Admin>,
    certs: Arc<CertManager>,
    kube_rx: Option<tokio::sync::watch::Receiver<Arc<crate::kube::KubeState>>>,
    cni_rx: tokio::sync::mpsc::Receiver<CniRequest>,
    /// Fired after the drain: stops the control tasks below.
    shutdown: CancellationToken,
    control_tasks: TaskTracker,
}

/// Wires the agent in dependency order and starts serving: readiness first (so probes see why
/// it is not ready yet), the CA and certificates, the capture programs, the proxy and its state
/// sources, xDS and the Kubernetes watch, the pods, the admin API. Returns once the agent is
/// ready.
pub async fn build(config_path: PathBuf, ebpf_log_level: u8) -> anyhow::Result<Bound> {
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
        pods: Arc::default(),
    });
    control_tasks.spawn(readiness::serve(
        config.readiness_address,
        readiness.clone(),
        shutdown.clone(),
    ));

    let (mut redirect, orig_dst, logger) = Redirect::load(
        &config.bpf_pin_path,
        &config.cgroup,
        ebpf_log_level,
        config.acceleration.splice_sockets(),
    )?;
    match &config.probes {
        Some(p) => {
            // Without these, probes are captured and judged like any host connection: they fail
            // only where a policy refuses plaintext from the node (fail closed, and visible).
            if let Err(e) = routing::add_probe_sources() {
                warn!(error = %e, "cannot put the probe source on lo; kubelet probes will be captured and judged like any host connection");
            } else if let Err(e) = redirect.attach_probes(&p.kubelet_cgroup, &p.host_cgroup) {
                warn!(error = %e, kubelet_cgroup = %p.kubelet_cgroup.display(), "cannot attach the kubelet probe marker (check probes.kubeletCgroup); kubelet probes will be captured and judged like any host connection");
            }
        }
        None => redirect.detach_probes(),
    }
    // SAFETY: the logger owns the ring buffer's fd, which stays open and unchanged for as long
    // as the AsyncFd owns the logger.
    #[allow(unsafe_code)]
    let bpf_logs =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the eBPF log ring buffer: {e}"))?;
    control_tasks.spawn(forward_bpf_logs(bpf_logs, shutdown.clone()));

    let splice = if config.acceleration.same_node {
        redirect.splicer().map_err(|e| {
            warn!(error = %e, "cannot load the same-node splice; connections between this node's pods are carried in user space");
            format!("unavailable: {e}")
        })
    } else {
        Err("off (acceleration.sameNode: false)".to_owned())
    };
    let metrics = Arc::new(crate::metrics::Metrics::default());
    let ctx = ProxyContext::new(
        &config,
        Arc::new(proxy::capture::Kernel::new(orig_dst, splice)),
        certs.clone(),
        roots,
        metrics.clone(),
    );
    control_tasks.spawn(ctx.pool.clone().run_reaper(shutdown.clone()));
    let sources = ctx.sources(&config);
    if let Some(x) = &config.xds {
        let client = Arc::new(build_xds(x, &config, sources.clone())?);
        let _ = readiness.xds.set(client.clone());
        control_tasks.spawn(client.clone().run(shutdown.clone()));
        let ready = client.clone();
        let ctx = ctx.clone();
        control_tasks.spawn(async move {
            ready.wait_ready().await;
            ctx.gate.set_open();
            info!(address = %ready.status().address, "xDS ready: first full state applied; held connections go on");
        });
    }
    let mut kube_rx = None;
    let mut kube_client = None;
    let mut netns_finder = crate::kube::NetnsFinder::default();
    if let Some(k) = &config.kubernetes {
        let client = crate::kube::Client::new(k).context("kubernetes")?;
        let (tx, rx) = tokio::sync::watch::channel(Arc::default());
        control_tasks.spawn(crate::kube::run(
            client.clone(),
            config.node.clone(),
            tx,
            shutdown.clone(),
        ));
        info!(api_server = %k.api_server, "Kubernetes mode: watching namespaces and this node's pods");
        kube_client = Some(client);
        netns_finder = crate::kube::NetnsFinder::new(k.netns_path_prefix.clone());
        let _ = readiness.kube.set(rx.clone());
        kube_rx = Some(rx);
    }
    let mut pods = PodManager::new(
        redirect,
        sources,
        ctx.clone(),
        &config,
        kube_client,
        netns_finder,
    );
    pods.apply(&config)?;
    readiness.pods.store(Arc::new(pods.state()));
    let (cni_tx, cni_rx) = tokio::sync::mpsc::channel::<CniRequest>(64);
    let admin = Arc::new(Admin {
        started: std::time::Instant::now(),
        config_path: config_path.clone(),
        config: ArcSwap::from_pointee(config.clone()),
        config_refused: arc_swap::ArcSwapOption::empty(),
        ctx: ctx.clone(),
        readiness: readiness.clone(),
        certs: certs.clone(),
        pods: readiness.pods.clone(),
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
    let watch = ConfigWatch::new(&config_path)?;
    readiness
        .started
        .store(true, std::sync::atomic::Ordering::Release);
    info!(node = %config.node, pods = pods.active_count(), "agent ready");
    crate::memory::after_start();
    {
        let ctx = ctx.clone();
        control_tasks.spawn(crate::memory::trim_when_idle(
            move || (ctx.live.len(), ctx.live.registered()),
            shutdown.clone(),
        ));
    }
    Ok(Bound {
        config,
        watch,
        ctx,
        pods,
        admin,
        certs,
        kube_rx,
        cni_rx,
        shutdown,
        control_tasks,
    })
}

impl Bound {
    /// The control loop: the one writer of capture state follows Kubernetes, CNI calls and the
    /// config until SIGTERM or SIGINT; then drains and stops.
    pub async fn run(self) -> anyhow::Result<()> {
        let Bound {
            mut config,
            mut watch,
            ctx,
            mut pods,
            admin,
            certs,
            mut kube_rx,
            mut cni_rx,
            shutdown,
            control_tasks,
        } = self;
        loop {
            let event = tokio::select! {
                Ok(()) = async {
                    match &mut kube_rx {
                        Some(rx) => rx.changed().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some(rx) = kube_rx.as_mut() {
                        pods.set_kube(rx.borrow_and_update().clone());
                    }
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
                event = watch.next() => event,
            };
            match event {
                Event::Stop => break,
                Event::Reload => {
                    match watch.reload(&config) {
                        Ok(new) => {
                            config = new;
                            admin.config_refused.store(None);
                            if let Err(e) = pods.apply(&config) {
                                error!(error = %e, "applying the new config failed");
                            }
                            info!(pods = pods.active_count(), "config applied");
                        }
                        Err(e) => {
                            error!(error = %e, "config reload refused; keeping the previous config");
                            admin.config_refused.store(Some(Arc::new(format!("{e:#}"))));
                        }
                    }
                    admin.config.store(Arc::new(config.clone()));
                    admin.pods.store(Arc::new(pods.state()));
                }
                Event::Idle if pods.has_failed() => {
                    // Pods whose netns was not ready yet: try again.
                    if let Err(e) = pods.apply(&config) {
                        error!(error = %e, "retrying enrollment failed");
                    }
                    admin.pods.store(Arc::new(pods.state()));
                }
                Event::Idle if pods.annotating() => pods.sync_annotations(),
                Event::Idle => {}
            }
        }

        let counters = pods.counters();
        pods.stop_listening().await;
        lifecycle::drain(&ctx.connections, &ctx.draining, config.drain_timeout).await;
        lifecycle::stop_control(&shutdown, &certs, &control_tasks).await;
        info!(
            ?counters,
            pin_path = %config.bpf_pin_path.display(),
            "agent stopped; enrolled pods stay captured and their new connections are refused until \
             an agent runs again (`ambit-agent cleanup` releases them)"
        );
        Ok(())
    }
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

/// The xDS client for the configured control plane.
pub(crate) fn build_xds(
    x: &crate::config::XdsSettings,
    config: &Config,
    sink: Arc<StateWriter>,
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
            server_name,
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
                server_name: server_name.clone(),
            })?;
            Ok((Arc::new(ca), roots))
        }
    }
}

/// `ambit-agent cleanup`: removes this node's pinned eBPF state and the pods' return routes.
pub fn cleanup(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let removed = redirect::cleanup(&config.bpf_pin_path)?;
    if config.probes.is_some()
        && let Err(e) = routing::remove_probe_sources()
    {
        warn!(error = %e, "could not remove the probe source addresses from lo");
    }
    for pod in &config.pods {
        let result = Netns::open(&pod.netns.path())
            .map_err(anyhow::Error::from)
            .and_then(|ns| Ok(ns.run(routing::remove)??));
        if let Err(e) = result {
            warn!(pod = %pod.key(), error = %e, "could not remove the pod's return route");
        }
    }
    // Nothing is captured any more: the CNI plugin (if still chained) must let every pod start,
    // and no later agent should adopt pods from the records.
    let released = crate::api::CniState {
        ambient_namespaces: Vec::new(),
        socket: config.admin_socket.display().to_string(),
    };
    if config.cni_state_file.exists()
        && let Err(e) = serde_json::to_vec_pretty(&released)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&config.cni_state_file, b))
    {
        warn!(file = %config.cni_state_file.display(), error = %e, "cannot clear the CNI state file");
    }
    let _ = std::fs::remove_file(crate::pods::records::path(&config.state_dir));
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
/// Who may ask for what is `config.callers` (see [`crate::ca_server::access`]).
pub async fn run_ca_server(config: crate::ca_server::access::CaServerConfig) -> anyhow::Result<()> {
    let crate::ca_server::access::CaServerConfig {
        dir,
        trust_domain,
        listen,
        callers,
    } = config;
    if callers.is_open() && !listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to serve unauthenticated callers on {listen}: other hosts can reach it;              give --config with every node's tokenFile, or listen on loopback"
        );
    }
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
    crate::ca_server::serve(
        listener,
        Arc::new(tls),
        Arc::new(ca),
        Arc::new(callers),
        shutdown,
    )
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
