//! The proxy: per-pod listeners inside each enrolled pod's netns, and the connection handlers.
//!
//! ```text
//! app --connect(dst)--> [connect4: to 127.0.0.1:15001] --> outbound::handle --> dst (from the pod's netns)
//! client --> pod:port --> [sk_lookup: to 15006] --> inbound::handle --> app (as the client's IP)
//! ```
//!
//! Listeners are created inside the pod's netns ([`Netns::run`]), so they see exactly the pod's
//! traffic and nothing else. Every socket the agent opens carries [`AGENT_MARK`], which the eBPF
//! programs skip, so the agent never captures itself.

pub mod capture;
pub mod dns;
pub mod gate;
pub mod inbound;
pub mod limits;
pub mod live;
pub mod outbound;
pub mod result;
pub mod splice;
#[cfg(test)]
mod tests;

/// The byte-stream plumbing the proxy shares with the tunnel (at `crate::copy`).
pub(crate) use crate::{copy, sockets::connect};

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use ambit_common::{AGENT_MARK, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, RETURN_MARK};
use arc_swap::ArcSwapOption;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, info_span, warn};

use crate::{
    addrs::ClientAddr,
    identity::{Identity, manager::CertManager},
    policy::{self, Decision, PolicyStore},
    redirect::{Netns, netns},
    state::{Snapshot, StateStore, StateWriter, Workload},
    tls::TrustRoots,
    tunnel::{self, client::Pool},
};

const LISTEN_BACKLOG: i32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create listener {addr} in the pod's netns: {cause}")]
    Listen { addr: SocketAddr, cause: io::Error },
    #[error(transparent)]
    Netns(#[from] netns::Error),
}

/// What the proxy knows about a pod it serves.
pub struct PodInfo {
    /// `namespace/name`.
    pub key: String,
    pub identity: Identity,
    pub ips: Vec<IpAddr>,
    pub netns: Netns,
    /// TLS config of the pod's HBONE listener; empty until its first certificate arrives.
    pub hbone_tls: ArcSwapOption<rustls::ServerConfig>,
    /// Connections its listeners hold now (against `limits.maxConnectionsPerPod`).
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    /// The agent serves its DNS ([`crate::dns`]).
    pub dns: bool,
}

impl PodInfo {
    pub fn hbone_server_config(&self) -> Option<Arc<rustls::ServerConfig>> {
        self.hbone_tls.load_full()
    }

    /// The pod's IP of the same family as `like`.
    pub fn ip_like(&self, like: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == like.is_ipv4())
    }
}

/// Shared by every connection handler.
pub struct ProxyContext {
    /// Original destinations and pod sockets: the kernel's, or the in-process tests' loopback.
    pub capture: Arc<dyn capture::Capture>,
    /// Every connection task, so shutdown can drain them.
    pub connections: TaskTracker,
    pub workloads: StateStore,
    pub certs: Arc<CertManager>,
    pub roots: TrustRoots,
    pub pool: Arc<Pool>,
    pub trust_domain: String,
    /// Authorization policies; replaced whole on every config change.
    pub policies: arc_swap::ArcSwap<PolicyStore>,
    /// Admitted inbound connections (re-judged when policy changes).
    pub live: live::LiveConns,
    /// Fired when the agent starts draining: HBONE connections send GOAWAY.
    pub draining: CancellationToken,
    /// Holds new connections until the control plane's first full state is applied.
    pub gate: gate::SyncGate,
    /// Connections, handshakes and streams against `limits`.
    pub budgets: Arc<limits::Budgets>,
    /// How the pods' HBONE listeners treat clients.
    pub hbone_server: tunnel::server::ServerSettings,
    /// The DNS proxy's settings and bounds.
    pub dns: crate::proxy::dns::Dns,
    /// The pods this agent serves, by IP: same-node destinations (see [`splice`]).
    local_pods: std::sync::RwLock<std::collections::HashMap<IpAddr, Arc<PodInfo>>>,
}

impl ProxyContext {
    /// The proxy's shared state for `config`; original destinations and pod sockets come from
    /// `capture`. Until xDS (if configured) has sent its first full state, new connections are
    /// held (see [`gate`]); the caller opens the gate.
    pub fn new(
        config: &crate::config::Config,
        capture: Arc<dyn capture::Capture>,
        certs: Arc<CertManager>,
        roots: TrustRoots,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Arc<ProxyContext> {
        Arc::new(ProxyContext {
            capture,
            connections: TaskTracker::new(),
            workloads: StateStore::default(),
            certs,
            roots,
            pool: Pool::new(&config.hbone, &config.limits),
            trust_domain: config.trust_domain.clone(),
            policies: arc_swap::ArcSwap::from_pointee(PolicyStore::new()),
            live: live::LiveConns::new(metrics),
            draining: CancellationToken::new(),
            budgets: limits::Budgets::new(config.limits.clone()),
            hbone_server: tunnel::server::ServerSettings::from_config(config),
            dns: crate::proxy::dns::Dns::new(config.dns.clone()),
            local_pods: Default::default(),
            gate: match &config.xds {
                Some(x) => gate::SyncGate::closed(x.sync_hold, x.max_held_connections),
                None => gate::SyncGate::open(),
            },
        })
    }

    /// The one writer of the proxy's state, starting from `config`: every change (config, xDS)
    /// replaces the workloads the handlers read; new policies judge new connections at once and
    /// close open ones they no longer allow.
    pub fn sources(self: &Arc<Self>, config: &crate::config::Config) -> Arc<StateWriter> {
        let ctx = self.clone();
        Arc::new(StateWriter::new(
            Arc::new(config.clone()),
            move |snapshot, policies| {
                ctx.workloads.replace(snapshot);
                let closed = match policies {
                    Some(policies) => ctx.set_policies(policies),
                    None => ctx.rejudge(),
                };
                if closed > 0 {
                    tracing::info!(
                        closed,
                        "closed open connections the new policies no longer allow"
                    );
                }
            },
        ))
    }

    /// The pod this agent serves at `ip`, if any.
    pub fn local_pod(&self, ip: IpAddr) -> Option<Arc<PodInfo>> {
        let pods = self.local_pods.read().unwrap_or_else(|p| p.into_inner());
        pods.get(&ip.to_canonical()).cloned()
    }

    /// Serves `pod` at its IPs until it is forgotten (a later pod with the same IP wins).
    fn remember_pod(&self, pod: &Arc<PodInfo>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            pods.insert(ip.to_canonical(), pod.clone());
        }
    }

    fn forget_pod(&self, pod: &Arc<PodInfo>) {
        let mut pods = self.local_pods.write().unwrap_or_else(|p| p.into_inner());
        for ip in &pod.ips {
            if pods
                .get(&ip.to_canonical())
                .is_some_and(|p| Arc::ptr_eq(p, pod))
            {
                pods.remove(&ip.to_canonical());
            }
        }
    }

    /// Holds a new connection until the state is synced (see [`gate`]); a refusal is counted
    /// and returned, for the caller's access log.
    pub async fn wait_synced(&self, direction: Direction) -> Result<(), gate::NotSynced> {
        let r = self.gate.pass().await;
        if let Err(e) = r {
            self.live.metrics().refused(direction.as_str(), e.reason());
        }
        r
    }

    /// Installs new policies: new connections are judged by them at once, and open inbound
    /// connections they no longer allow are closed. Returns how many were closed.
    pub fn set_policies(&self, store: PolicyStore) -> usize {
        self.policies.store(Arc::new(store));
        self.rejudge()
    }

    /// Judges the open inbound connections again by the current policies and state (which
    /// decides the policies a workload names), closing the ones no longer allowed. Returns how
    /// many were closed.
    pub fn rejudge(&self) -> usize {
        let snapshot = self.workloads.snapshot();
        self.live.close_where(|c| {
            let c = &c.info;
            if c.direction != Direction::Inbound {
                // Policy is enforced where the connection arrives.
                return None;
            }
            let d = self.decide(
                &snapshot,
                c.src_identity.as_ref(),
                c.src,
                c.dst,
                &c.dst_namespace,
            );
            if d.allowed {
                return None;
            }
            self.live.metrics().denied("inbound", d.policy.as_deref());
            Some(format!("closed: no longer allowed ({})", d.describe()))
        })
    }

    /// The decision for a connection from `src` (with `src_identity` when it came through HBONE)
    /// to `dst`, a workload in `dst_namespace`, by the current policies and `snapshot`. What
    /// [`ProxyContext::admit`] enforces, what policy changes re-judge, and what `explain` reports.
    pub fn decide(
        &self,
        snapshot: &Snapshot,
        src_identity: Option<&Identity>,
        src: SocketAddr,
        dst: SocketAddr,
        dst_namespace: &str,
    ) -> Decision {
        policy::evaluate(
            &self.policies.load(),
            &policy::Connection {
                src_identity,
                src_ip: src.ip(),
                dst_ip: dst.ip(),
                dst_port: dst.port(),
                dst_namespace,
                dst_policies: snapshot.named_policies(dst.ip()),
            },
        )
    }

    /// Why a connection to `dst` from a client with `client` identity (none for plaintext) must
    /// be refused because it did not come through the destination's waypoint, if it must. As
    /// Istio does, a workload with a waypoint only takes traffic its waypoint sent.
    pub fn bypasses_waypoint(
        snapshot: &Snapshot,
        dst: SocketAddr,
        client: Option<&Identity>,
    ) -> Option<String> {
        let w = snapshot.by_ip(dst.ip())?;
        let gw = w.waypoint.as_ref()?;
        let waypoints: Vec<&Identity> = match &gw.destination {
            crate::xds::GatewayDestination::Address(ip) => snapshot
                .by_ip(*ip)
                .map(|w| &w.identity)
                .into_iter()
                .collect(),
            crate::xds::GatewayDestination::Hostname {
                namespace,
                hostname,
            } => snapshot
                .service(&format!("{namespace}/{hostname}"))
                .map(|s| s.endpoints.iter().map(|e| &e.identity).collect())
                .unwrap_or_default(),
        };
        if client.is_some_and(|c| waypoints.contains(&c)) {
            return None;
        }
        Some(format!(
            "{} only accepts traffic through its waypoint {} ({}); this connection came {}",
            w.display_name(),
            gw.display_name(),
            waypoints
                .first()
                .map_or_else(|| "identity unknown".to_owned(), |i| i.to_string()),
            match client {
                Some(c) => format!("from {c}"),
                None => "in plaintext".to_owned(),
            }
        ))
    }

    /// Admits or refuses a new inbound connection to `pod` (HBONE with the client's verified
    /// identity, or plaintext without one), from one snapshot: registers it first (so a policy
    /// change from here on re-judges it, and the metrics count it), then refuses it if it skipped
    /// the pod's waypoint, then asks the policies. Denials are counted; dry-run opinions logged.
    pub fn admit(&self, pod: &PodInfo, conn: InboundConn<'_>) -> Admission<'_> {
        let snapshot = self.workloads.snapshot();
        let src = snapshot.by_ip(conn.peer.ip());
        let src_workload = src.map(|w| w.display_name());
        let dst_w = snapshot.by_ip(conn.dst.ip());
        // A source this agent does not know (another cluster, behind a gateway) is described
        // for telemetry by the baggage it sent; never for policy, which sees only its identity.
        let baggage = conn.baggage.filter(|_| src.is_none());
        // The services istiod says the pod backs (a config pod lists none of its own).
        let service = dst_w.and_then(|w| {
            inbound_service(
                &snapshot,
                snapshot.telemetry_of(w),
                conn.dst.port(),
                conn.service_host,
            )
        });
        let live = self.live.register(live::ConnInfo {
            direction: Direction::Inbound,
            path: conn.path,
            src: conn.peer,
            dst: conn.dst,
            src_identity: conn.client.cloned(),
            dst_identity: Some(pod.identity.clone()),
            src_workload: src_workload.clone().or_else(|| {
                let b = baggage?;
                (!b.namespace.is_empty() && !b.workload_name.is_empty())
                    .then(|| format!("{}/{}", b.namespace, b.workload_name))
            }),
            dst_workload: Some(pod.key.clone()),
            src_workload_name: src.map(|w| snapshot.telemetry_of(w).workload_name.clone()),
            dst_workload_name: dst_w.map(|w| snapshot.telemetry_of(w).workload_name.clone()),
            src_meta: src
                .map(|w| snapshot.telemetry_of(w).meta.clone())
                .or_else(|| baggage.map(|b| Arc::new(b.meta()))),
            dst_meta: dst_w.map(|w| snapshot.telemetry_of(w).meta.clone()),
            service_name: service
                .as_ref()
                .and_then(|s| s.def.as_ref())
                .map(|d| d.name.clone()),
            service: service.map(|s| s.key.to_string()),
            dst_namespace: pod.identity.namespace().to_owned(),
            counts: conn.counts.clone(),
            start: conn.start,
        });
        let outcome = match Self::bypasses_waypoint(&snapshot, conn.dst, conn.client) {
            Some(why) => {
                self.live
                    .metrics()
                    .denied("inbound", Some("(waypoint bypass)"));
                live.conn.flag("DENY");
                Err(why)
            }
            None => {
                let d = self.decide(
                    &snapshot,
                    conn.client,
                    conn.peer,
                    conn.dst,
                    pod.identity.namespace(),
                );
                if !d.allowed {
                    self.live.metrics().denied("inbound", d.policy.as_deref());
                    live.conn.flag("DENY");
                }
                for hit in &d.dry_run {
                    tracing::info!(
                        policy = hit.policy.as_deref().unwrap_or("(allow set)"),
                        result = ?hit.result,
                        src = %conn.peer,
                        dst = %conn.dst,
                        "dry-run authorization policy"
                    );
                }
                Ok(d)
            }
        };
        Admission {
            live,
            src_workload,
            outcome,
        }
    }
}

/// The service an inbound connection was for, as ztunnel guesses it for telemetry: the one the
/// client named (`Forwarded: host=`) among those `w` backs, else the first whose port maps to
/// `port` on `w`.
fn inbound_service(
    snapshot: &Snapshot,
    w: &Workload,
    port: u16,
    host: Option<&str>,
) -> Option<Arc<crate::state::ServiceEntry>> {
    let backed = || w.services.iter().filter_map(|r| snapshot.service(&r.key));
    if let Some(host) = host
        && let Some(s) = backed().find(|s| s.def.as_ref().is_some_and(|d| d.hostname == host))
    {
        return Some(s.clone());
    }
    backed()
        .find(|s| {
            let own = w.services.iter().find(|r| r.key == s.key);
            s.def.as_ref().is_some_and(|d| {
                d.ports.iter().any(|(p, t)| {
                    let mapped = own
                        .and_then(|r| r.ports.iter().find(|(sp, tp)| sp == p && *tp != 0))
                        .map(|(_, tp)| *tp)
                        .unwrap_or(if *t != 0 { *t } else { *p });
                    mapped == port
                })
            })
        })
        .cloned()
}

/// A new inbound connection, as [`ProxyContext::admit`] judges it.
pub struct InboundConn<'a> {
    pub path: crate::telemetry::Transport,
    pub peer: SocketAddr,
    pub dst: SocketAddr,
    /// The client's verified identity (HBONE); `None` in plaintext.
    pub client: Option<&'a Identity>,
    /// What the client's `baggage` says it is (HBONE; telemetry only).
    pub baggage: Option<&'a crate::tunnel::metadata::Baggage>,
    /// The service host the client's `Forwarded` header named (HBONE; telemetry only).
    pub service_host: Option<&'a str>,
    pub counts: &'a Arc<copy::ByteCounts>,
    pub start: Instant,
}

/// What [`ProxyContext::admit`] decided, and the connection's registration (dropping it counts
/// the connection closed).
pub struct Admission<'a> {
    pub live: live::Registration<'a>,
    /// `namespace/name` of the source, when known.
    pub src_workload: Option<String>,
    /// The policy decision (allowed or not), or why the connection skipped the waypoint.
    pub outcome: Result<Decision, String>,
}

/// A pod's listeners, bound inside its netns and not yet serving.
pub struct PodListeners {
    /// 127.0.0.1:15001 and, where the pod has IPv6, [::1]:15001.
    pub outbound: Vec<std::net::TcpListener>,
    /// [::]:15006 (dual stack) or 0.0.0.0:15006 if the pod has no IPv6.
    pub inbound: std::net::TcpListener,
    /// [::]:15008 (dual stack) or 0.0.0.0:15008: HBONE.
    pub hbone: std::net::TcpListener,
    /// UDP 127.0.0.1:15053 (and [::1]:15053), when the agent serves the pod's DNS.
    pub dns: Vec<std::net::UdpSocket>,
}

impl PodListeners {
    /// Binds the listeners (with `dns`, the DNS ones too). Must run inside the pod's netns.
    pub fn bind(dns: bool) -> Result<PodListeners, Error> {
        let mut outbound = vec![listen(SocketAddr::from((
            Ipv4Addr::LOCALHOST,
            OUTBOUND_PORT,
        )))?];
        match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
            Ok(l) => outbound.push(l),
            Err(e) => debug!(error = %e, "no IPv6 outbound listener (pod without IPv6?)"),
        }
        let any = |port| match listen(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))) {
            Ok(l) => Ok(l),
            Err(_) => listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port))),
        };
        let dns = if dns {
            crate::proxy::dns::bind().map_err(|cause| Error::Listen {
                addr: SocketAddr::from((Ipv4Addr::LOCALHOST, ambit_common::DNS_PORT)),
                cause,
            })?
        } else {
            Vec::new()
        };
        Ok(PodListeners {
            outbound,
            inbound: any(INBOUND_PORT)?,
            hbone: any(HBONE_PORT)?,
            dns,
        })
    }
}

fn listen(addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
    let how = crate::sockets::Listen {
        reuse_port: true,
        mark: Some(AGENT_MARK),
        nodelay: false,
        backlog: LISTEN_BACKLOG,
    };
    crate::sockets::listener(addr, &how).map_err(|cause| Error::Listen { addr, cause })
}

/// Opens a marked TCP socket inside `netns` for `dst`; with `transparent_src`, bound to that
/// (foreign) address so the destination sees the original client, and marked so the app's
/// replies come back to it (see `redirect::routing`).
pub(crate) fn upstream_socket(
    netns: &Netns,
    dst: SocketAddr,
    transparent_src: Option<IpAddr>,
) -> io::Result<tokio::net::TcpSocket> {
    let socket = netns
        .run(|| Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP)))
        .map_err(io::Error::other)??;
    socket.set_mark(if transparent_src.is_some() {
        RETURN_MARK
    } else {
        AGENT_MARK
    })?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(true)?;
    if let Some(src) = transparent_src {
        // Bound to `lo`: the kernel then reports the connection to the pod's `sk_lookup` as
        // arriving on loopback, which the program never steers (without it, the agent's own
        // connection to the app would be sent back to its 15006 listener, in a loop). Packets
        // from outside the pod can never claim to arrive on `lo`.
        socket.bind_device(Some(b"lo"))?;
        match src {
            IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
            IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
        }
        socket.bind(&SocketAddr::new(src, 0).into())?;
    }
    Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
}

/// Resolves when the client of `downstream` closed or reset it without sending anything (it gave
/// up waiting); never, once it has sent data (a half-close after a request still wants the
/// answer, so the copy handles it). For racing against an upstream that is still being opened.
pub(crate) async fn gave_up(downstream: &TcpStream) {
    let mut byte = [0u8; 1];
    match downstream.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => std::future::pending().await,
    }
}

/// Canonical form of an accepted socket's address (IPv4-mapped IPv6 shown as IPv4).
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Keeps a pod's HBONE server certificate current (see [`crate::tls::follow_server_config`]).
pub async fn follow_pod_cert(ctx: Arc<ProxyContext>, pod: Arc<PodInfo>, cancel: CancellationToken) {
    crate::tls::follow_server_config(
        &ctx.certs,
        &pod.identity,
        &ctx.roots,
        &ctx.trust_domain,
        &pod.hbone_tls,
        cancel,
    )
    .await
}

/// Starts serving a pod's listeners until `cancel` fires. Accepted connections are tracked by
/// `ctx.connections` and outlive the listeners (they drain on their own).
pub fn serve_pod(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    listeners: PodListeners,
    cancel: CancellationToken,
    tasks: &TaskTracker,
) -> io::Result<()> {
    for l in listeners.outbound {
        let l = TcpListener::from_std(l)?;
        tasks.spawn(accept_loop(
            ctx.clone(),
            pod.clone(),
            l,
            Listener::Outbound,
            cancel.clone(),
        ));
    }
    let l = TcpListener::from_std(listeners.inbound)?;
    tasks.spawn(accept_loop(
        ctx.clone(),
        pod.clone(),
        l,
        Listener::Inbound,
        cancel.clone(),
    ));
    let l = TcpListener::from_std(listeners.hbone)?;
    tasks.spawn(accept_loop(
        ctx.clone(),
        pod.clone(),
        l,
        Listener::Hbone,
        cancel.clone(),
    ));
    for socket in listeners.dns {
        tasks.spawn(crate::proxy::dns::serve_udp(
            ctx.clone(),
            pod.clone(),
            socket,
            cancel.clone(),
        ));
    }
    // A same-node destination while its listeners serve.
    ctx.remember_pod(&pod);
    tasks.spawn(async move {
        cancel.cancelled().await;
        ctx.forget_pod(&pod);
    });
    Ok(())
}

/// The three listeners of a pod.
#[derive(Clone, Copy, Debug)]
enum Listener {
    Outbound,
    Inbound,
    Hbone,
}

impl Listener {
    fn as_str(self) -> &'static str {
        match self {
            Listener::Outbound => "outbound",
            Listener::Inbound => "inbound",
            Listener::Hbone => "hbone",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Outbound,
    Inbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

async fn accept_loop(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    listener: TcpListener,
    kind: Listener,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(pod = %pod.key, listener = kind.as_str(), error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let peer = canonical(peer);
        let start = Instant::now();
        let slot = match ctx.budgets.connection(&pod.open) {
            Ok(s) => s,
            Err(hit) => {
                refuse_over_limit(&ctx, &pod, kind, stream, peer, start, hit);
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = next_connection_id();
        // The slot is held for as long as the connection lives.
        match kind {
            Listener::Outbound => {
                let span = info_span!("outbound", id, pod = %pod.key, src = %peer);
                let handle =
                    outbound::handle(ctx.clone(), pod.clone(), stream, ClientAddr(peer), start);
                ctx.connections.spawn(
                    async move {
                        let _slot = slot;
                        handle.await
                    }
                    .instrument(span),
                );
            }
            Listener::Inbound => {
                let span = info_span!("inbound", id, pod = %pod.key, src = %peer);
                let handle = inbound::handle(ctx.clone(), pod.clone(), stream, peer, start);
                ctx.connections.spawn(
                    async move {
                        let _slot = slot;
                        handle.await
                    }
                    .instrument(span),
                );
            }
            Listener::Hbone => {
                let span = info_span!("hbone", id, pod = %pod.key, src = %peer);
                let serve = inbound::hbone_connection(ctx.clone(), pod.clone(), stream, peer);
                ctx.connections.spawn(
                    async move {
                        let _slot = slot;
                        serve.await
                    }
                    .instrument(span),
                );
            }
        }
    }
    debug!(pod = %pod.key, listener = kind.as_str(), "listener closed");
}

/// Refuses a connection over a limit: counted, logged (an access line for a pod's own
/// connections; a rate-limited warning for HBONE), and reset at once.
fn refuse_over_limit(
    ctx: &ProxyContext,
    pod: &PodInfo,
    kind: Listener,
    stream: TcpStream,
    peer: SocketAddr,
    start: Instant,
    hit: limits::LimitHit,
) {
    let direction = match kind {
        Listener::Outbound => Direction::Outbound,
        Listener::Inbound | Listener::Hbone => Direction::Inbound,
    };
    ctx.live
        .metrics()
        .refused(direction.as_str(), hit.limit.reason());
    match kind {
        Listener::Hbone => {
            if ctx.budgets.should_warn() {
                warn!(pod = %pod.key, src.addr = %peer, limit = hit.limit.reason(), "{hit}");
            }
        }
        Listener::Outbound | Listener::Inbound => {
            let mut log = result::AccessLog::new(direction, peer, start);
            log.dst = stream.local_addr().ok().map(canonical);
            match direction {
                Direction::Outbound => {
                    log.src_workload = Some(pod.key.clone());
                    log.src_identity = Some(pod.identity.clone());
                }
                Direction::Inbound => {
                    log.dst_workload = Some(pod.key.clone());
                    log.dst_identity = Some(pod.identity.clone());
                }
            }
            result::ConnectionResult::new(log).finish(Err(result::Error::Limit(hit)));
        }
    }
    refuse_now(stream);
}

/// Closes an accepted connection with a reset (`SO_LINGER` 0): the client learns at once, and no
/// TIME_WAIT is left behind.
pub fn refuse_now(stream: TcpStream) {
    if let Ok(std) = stream.into_std() {
        let _ = socket2::SockRef::from(&std).set_linger(Some(Duration::ZERO));
    }
}

fn next_connection_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
