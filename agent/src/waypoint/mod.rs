//! Waypoint mode (`ambit-agent waypoint`): Ambit as an L7 proxy for the mesh.
//!
//! ```text
//! client's agent ── HBONE (CONNECT svc-vip:port) ──> waypoint :15008
//!                                                     │ mTLS: client identity
//!                                                     │ HTTP/1.1 or h2 inside the tunnel
//!                                                     │ per request: L7 authz -> route -> backend
//!                                                     │   -> endpoint (outlier-aware)
//!                                                     └─ HBONE (CONNECT endpoint:port, as the
//!                                                        waypoint) ──> endpoint's agent ──> app
//! ```
//!
//! The same config file format as the node agent, with a `waypoint:` section instead of `cgroup`
//! and `pods` (see [`config`]); services and workloads come from `services`/`peers` and xDS, as
//! for the agent, so endpoints and their identities are the same data. The file is re-read when
//! it changes (or on SIGHUP): routes, policies, outlier settings, services and peers apply to the
//! next request; the waypoint's identity and listener need a restart. With a `kubernetes:`
//! section it also follows the cluster's HTTPRoutes and AuthorizationPolicies ([`cluster`]).

pub mod authz;
pub mod cluster;
pub mod forward;
/// The `waypoint:` section of the config (validated with the rest of it).
pub use crate::config::waypoint as config;
pub mod h2c;
pub mod metrics;
pub mod path;
pub mod plan;
pub mod retry;
pub mod routes;
pub mod server;
pub mod upstream;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, error, info, info_span, warn};

use crate::{
    config::Config,
    http::{Request, Response},
    identity::manager::CertManager,
    lifecycle::{self, ConfigWatch, Event},
    redirect::Netns,
    state::{StateStore, StateWriter},
    tls,
    tunnel::client::Pool,
};

/// Runs the waypoint until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    let Some(settings) = config.waypoint.clone() else {
        anyhow::bail!(
            "{} has no `waypoint:` section; a waypoint needs its namespace, name and routes (see \
             README.md, \"Waypoints\"), and a node agent runs with `ambit-agent run`",
            config_path.display()
        );
    };
    let identity = settings.identity().clone();
    info!(
        waypoint = %format!("{}/{}", settings.namespace, settings.name),
        %identity,
        listen = %settings.listen,
        config = %config_path.display(),
        "starting ambit waypoint"
    );
    let shutdown = CancellationToken::new();
    let control = TaskTracker::new();
    // Its own netns: its upstream sockets open where it runs, without entering a namespace (so
    // without CAP_SYS_ADMIN).
    let netns = Netns::own().context("cannot open the waypoint's own network namespace")?;
    let (ctx, sources, certs) = build(
        &config,
        Arc::new(crate::proxy::capture::Kernel::sockets_only()),
        netns,
        &control,
        &shutdown,
    )?;
    let listener = bind(settings.listen)
        .with_context(|| format!("cannot listen on {} for HBONE", settings.listen))?;
    let accept_stop = CancellationToken::new();
    control.spawn(accept_loop(ctx.clone(), listener, accept_stop.clone()));
    control.spawn(serve_metrics(
        ctx.clone(),
        config.metrics_address,
        shutdown.clone(),
    ));
    // From the cluster: the file's settings go through the follower, which adds what the
    // cluster says before they apply.
    let from_file = match &config.kubernetes {
        Some(k) => {
            let client = crate::kube::Client::new(k)
                .context("cannot set up the Kubernetes client (see `kubernetes:`)")?;
            let (tx, rx) = tokio::sync::watch::channel(Arc::new(settings.clone()));
            let apply = {
                let ctx = ctx.clone();
                move |w: config::Waypoint| ctx.settings.store(Arc::new(w))
            };
            control.spawn(cluster::run(
                client,
                rx,
                Arc::new(config.services.clone()),
                config.xds.is_some(),
                apply,
                ctx.waiting.clone(),
                shutdown.clone(),
            ));
            Some(tx)
        }
        None => None,
    };
    let mut watch = ConfigWatch::new(&config_path)?;
    info!(listen = %settings.listen, "waypoint ready");
    crate::memory::after_start();

    let mut config = config;
    loop {
        match watch.next().await {
            Event::Stop => break,
            Event::Idle => continue,
            Event::Reload => {}
        }
        match watch.reload(&config) {
            Ok(new) => {
                if let Some(w) = &new.waypoint {
                    match &from_file {
                        Some(tx) => {
                            let _ = tx.send(Arc::new(w.clone()));
                        }
                        None => ctx.settings.store(Arc::new(w.clone())),
                    }
                }
                sources.set_config(Arc::new(new.clone()));
                let w = ctx.settings.load();
                info!(
                    routes = w.routes.len(),
                    policies = w.authorization.len(),
                    "waypoint config applied"
                );
                config = new;
            }
            Err(e) => error!(error = %e, "config reload refused; keeping the previous config"),
        }
    }

    accept_stop.cancel();
    lifecycle::drain(&ctx.connections, &ctx.draining, config.drain_timeout).await;
    ctx.upstream.close(Duration::from_secs(1)).await;
    lifecycle::stop_control(&shutdown, &certs, &control).await;
    info!("waypoint stopped");
    Ok(())
}

/// A waypoint wired from `config` (with a `waypoint:` section): the context its HBONE server
/// serves from, the writer of its state (config, and xDS when configured) and its certificates.
/// Sockets to endpoints come from `capture` in `netns`. The pool and upstream reapers, the xDS
/// client and the certificate follower run on `control` until `shutdown`.
pub fn build(
    config: &Config,
    capture: Arc<dyn crate::proxy::capture::Capture>,
    netns: Netns,
    control: &TaskTracker,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Arc<server::Ctx>, Arc<StateWriter>, Arc<CertManager>)> {
    let settings = config
        .waypoint
        .clone()
        .context("the config has no `waypoint:` section")?;
    let identity = settings.identity().clone();
    let (ca, roots) = crate::app::build_ca(config)?;
    let certs = CertManager::new(ca, config.cert_lifetime);
    certs.set_identities([identity.clone()]);

    let metrics = Arc::new(metrics::WaypointMetrics::default());
    let pool = Pool::new(&config.hbone, &config.limits);
    control.spawn(pool.clone().run_reaper(shutdown.clone()));
    let upstream = upstream::Upstream::new(
        pool,
        upstream::Sockets { capture, netns },
        certs.clone(),
        roots.clone(),
        identity.clone(),
        metrics.clone(),
        config.hbone.idle_timeout,
    );
    control.spawn(upstream.clone().run_reaper(shutdown.clone()));
    let ctx = Arc::new(server::Ctx {
        settings: ArcSwap::from_pointee(settings.clone()),
        state: StateStore::default(),
        upstream,
        metrics,
        identity: identity.clone(),
        tls: ArcSwapOption::empty(),
        draining: CancellationToken::new(),
        connections: TaskTracker::new(),
        hbone_server: crate::tunnel::server::ServerSettings::from_config(config),
        budgets: crate::proxy::limits::Budgets::new(config.limits.clone()),
        open: Arc::default(),
        waiting: Arc::new(ArcSwapOption::from_pointee(config.kubernetes.as_ref().map(
            |_| {
                "the waypoint has not read its HTTPRoutes and AuthorizationPolicies from the \
             Kubernetes API yet (is the API server reachable? see the waypoint's log)"
                    .to_owned()
            },
        ))),
    });
    let sources = {
        let ctx = ctx.clone();
        Arc::new(StateWriter::new(
            Arc::new(config.clone()),
            move |snapshot, _policies| ctx.state.replace(snapshot),
        ))
    };
    if let Some(x) = &config.xds {
        let client = Arc::new(crate::app::build_xds(x, config, sources.clone())?);
        control.spawn(client.run(shutdown.clone()));
    }

    // The server certificate follows rotations; connections wait for the first one.
    {
        let ctx = ctx.clone();
        let (certs, shutdown) = (certs.clone(), shutdown.clone());
        let trust_domain = config.trust_domain.clone();
        control.spawn(async move {
            tls::follow_server_config(
                &certs,
                &ctx.identity,
                &roots,
                &trust_domain,
                &ctx.tls,
                shutdown,
            )
            .await
        });
    }
    Ok((ctx, sources, certs))
}

/// A listener on `addr`; `[::]` accepts both families.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let how = crate::sockets::Listen {
        reuse_port: false,
        mark: None,
        nodelay: true,
        backlog: 1024,
    };
    tokio::net::TcpListener::from_std(crate::sockets::listener(addr, &how)?)
}

/// Accepts HBONE connections on `listener` until `stop`, each within the connection budget.
pub async fn accept_loop(
    ctx: Arc<server::Ctx>,
    listener: tokio::net::TcpListener,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match ctx.budgets.connection(&ctx.open) {
            Ok(s) => s,
            Err(hit) => {
                if ctx.budgets.should_warn() {
                    warn!(src.addr = %peer, limit = hit.limit.reason(), "{hit}");
                }
                crate::proxy::refuse_now(tcp);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("hbone_in", src = %peer);
        let serve = server::serve_connection(ctx.clone(), tcp, peer);
        ctx.connections.spawn(
            async move {
                let _slot = slot;
                serve.await
            }
            .instrument(span),
        );
    }
}

async fn serve_metrics(
    ctx: Arc<server::Ctx>,
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
) {
    let listener = match crate::http::bind_shared(addr) {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve metrics (is another process using the port?)");
            return;
        }
    };
    let accept = || async { listener.accept().await.map(|(s, _)| s) };
    let handle = move |r: Request| {
        let response = match r.path.as_str() {
            "/metrics" => {
                let pool = ctx.upstream.pool.stats();
                Response {
                    status: 200,
                    content_type: crate::metrics::CONTENT_TYPE,
                    body: ctx
                        .metrics
                        .render(&metrics::Gauges {
                            ejected_endpoints: ctx.upstream.ejected_now(),
                            pool_connections_opened: pool.connections_opened,
                            pool_streams_opened: pool.streams_opened,
                            pool_open_connections: pool.open_connections,
                        })
                        .into_bytes(),
                }
            }
            "/healthz/ready" if ctx.waiting.load().is_some() => Response::text(
                503,
                format!(
                    "{}\n",
                    ctx.waiting.load().as_deref().map_or("", |w| w.as_str())
                ),
            ),
            "/healthz/ready" if ctx.tls.load().is_some() => Response::text(200, "ready\n"),
            "/healthz/ready" => Response::text(
                503,
                "no certificate for the waypoint's identity yet (is the CA reachable?)\n",
            ),
            _ => Response::text(404, "try /metrics or /healthz/ready\n"),
        };
        async move { response }
    };
    crate::http::serve(accept, handle, crate::http::TIMEOUT, shutdown).await
}
