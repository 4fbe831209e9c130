//! Outbound: a connection an enrolled pod's app opened, redirected to the pod's 15001 listener.
//! Look up where it was going; if the destination is a mesh workload, carry it through HBONE
//! (mutual TLS as the pod's identity, verifying the destination's); otherwise connect to it in
//! plaintext (passthrough), and say so in the access log. Either way the connection leaves from
//! inside the pod's netns, with the pod's own IP.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    PodInfo, ProxyContext,
    copy::{self, ByteCounts, Side},
    live::ConnInfo,
};
use crate::{
    state::{ServiceEntry, Snapshot, Workload},
    telemetry::{AccessLog, Path},
    tls,
    tunnel::{
        self, TcpSide,
        client::{PoolKey, TunnelHeaders},
    },
};

/// How long a new connection waits for the pod's first certificate (CA slow or down).
const CERT_WAIT: Duration = Duration::from_secs(5);

pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    downstream: TcpStream,
    peer: SocketAddr,
    start: Instant,
) {
    let counts = Arc::new(ByteCounts::default());
    let mut log = AccessLog {
        direction: super::Direction::Outbound,
        src: peer,
        dst: None,
        src_workload: Some(&pod.key),
        dst_workload: None,
        dst_service: None,
        dst_endpoint: None,
        src_identity: Some(&pod.identity),
        dst_identity: None,
        path: Path::Passthrough,
        counts: &counts,
        start,
        error: None,
        authz: None,
    };
    let Some(dst) = ctx.orig_dst.lookup(pod.netns.cookie(), peer) else {
        // Not redirected by connect4 (someone dialed 15001 directly), or the client is gone.
        warn!("no original destination recorded for this connection; closing it");
        log.error = Some((
            Side::Downstream,
            "no original destination recorded (connection not redirected by ambit's connect hook?)"
                .to_owned(),
        ));
        log.emit();
        return;
    };
    log.dst = Some(dst);
    // The app's socket is bound to loopback (it was redirected to 127.0.0.1:15001); report the
    // pod's own address, which is what the destination sees.
    let src_ip = pod.ip_like(dst.ip()).unwrap_or(peer.ip());
    log.src = SocketAddr::new(src_ip, peer.port());

    let snapshot = ctx.workloads.snapshot();
    let route = match route(&snapshot, dst, Pick::Next) {
        Ok(r) => r,
        Err(e) => {
            log.dst_service = Some(e.service());
            log.error = Some((e.side(), e.to_string()));
            log.emit();
            return;
        }
    };
    let service_key = route.service.as_ref().map(|s| s.key.clone());
    log.dst_service = service_key.as_deref();
    let dst = route.dst;
    if route.service.is_some() {
        log.dst_endpoint = Some(dst);
    }
    let dst_name = route.workload.as_ref().map(|w| w.display_name());
    log.dst_workload = dst_name.as_deref();
    let conn_info = |path, dst_identity| ConnInfo {
        direction: super::Direction::Outbound,
        path,
        src: log_src(src_ip, peer),
        dst,
        src_identity: Some(pod.identity.clone()),
        dst_identity,
        src_workload: Some(pod.key.clone()),
        dst_workload: dst_name.clone(),
        service: service_key.as_deref().map(str::to_owned),
        dst_namespace: route
            .workload
            .as_ref()
            .map(|w| w.namespace.to_string())
            .unwrap_or_default(),
        counts: counts.clone(),
        start,
    };

    let target = match &route.workload {
        Some(w) if route.hbone => w.clone(),
        _ => {
            // Not a mesh workload: plaintext, as before capture. Registered (and counted as
            // opened) before connecting, so failed connections are counted too.
            let _live = ctx.live.register(conn_info(Path::Passthrough, None));
            let upstream = match super::upstream_socket(&pod.netns, dst, None) {
                Ok(s) => super::connect(s, dst).await,
                Err(e) => Err(e),
            };
            let upstream = match upstream {
                Ok(u) => u,
                Err(e) => {
                    log.error = Some((Side::Upstream, format!("connect to {dst} failed: {e}")));
                    log.emit();
                    return;
                }
            };
            if let Err(e) = copy::copy_bidirectional(downstream, upstream, counts.clone()).await {
                log.error = Some((e.side, e.to_string()));
            }
            log.emit();
            return;
        }
    };

    log.path = Path::Hbone;
    log.dst_identity = Some(&target.identity);
    let _live = ctx
        .live
        .register(conn_info(Path::Hbone, Some(target.identity.clone())));
    let cert = match ctx.certs.get(&pod.identity, CERT_WAIT).await {
        Ok(c) => c,
        Err(e) => {
            // Fail closed: no certificate, no connection (never plaintext instead).
            log.error = Some((
                Side::Downstream,
                format!("no certificate to tunnel with: {e}"),
            ));
            log.emit();
            return;
        }
    };
    let key = PoolKey {
        src_identity: pod.identity.clone(),
        src_ip,
        src_serial: cert.serial.clone(),
        dst_identity: target.identity.clone(),
        dst: tunnel::client::tunnel_addr(dst.ip()),
    };
    let expected = vec![target.identity.clone()];
    let tunnel = ctx
        .pool
        .connect(
            key,
            &pod.netns,
            || tls::client_config(&cert, &ctx.roots, expected),
            dst,
            TunnelHeaders {
                client_ip: src_ip,
                traceparent: None,
                baggage: Some(&pod.baggage),
            },
        )
        .await;
    let tunnel = match tunnel {
        Ok(t) => t,
        Err(e) => {
            log.error = Some((Side::Upstream, e.to_string()));
            log.emit();
            return;
        }
    };
    if let Err(e) = tunnel::pump(
        downstream,
        tunnel.send,
        tunnel.recv,
        TcpSide::Source,
        counts.clone(),
    )
    .await
    {
        log.error = Some((e.side, e.to_string()));
    }
    log.emit();
}

fn log_src(src_ip: std::net::IpAddr, peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(src_ip, peer.port())
}

/// Whether a route may advance a service's round robin (a real connection) or only look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Next,
    /// For `explain`: the endpoint the next connection would get.
    Peek,
}

/// Where an outbound connection to `dst` goes. One function for the data path and `explain`.
pub struct Route {
    /// The service whose VIP `dst` is.
    pub service: Option<Arc<ServiceEntry>>,
    /// The address connected to: `dst`, or the endpoint picked for a VIP.
    pub dst: SocketAddr,
    /// The workload at that address, if known.
    pub workload: Option<Arc<Workload>>,
    /// Through HBONE (the workload is in the mesh); otherwise passthrough.
    pub hbone: bool,
}

/// Why a connection to a service VIP cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: Arc<str>, port: u16 },
    #[error(
        "service {service} has no healthy endpoint (no workload backs it with an address of this family)"
    )]
    NoEndpoint { service: Arc<str> },
}

impl RouteError {
    pub fn service(&self) -> &str {
        match self {
            RouteError::NoSuchPort { service, .. } | RouteError::NoEndpoint { service } => service,
        }
    }

    /// A port the service lacks is the client's mistake; no endpoint is the destination's.
    pub fn side(&self) -> Side {
        match self {
            RouteError::NoSuchPort { .. } => Side::Downstream,
            RouteError::NoEndpoint { .. } => Side::Upstream,
        }
    }
}

/// Resolves `dst`: a service VIP to one of its endpoints (on the mapped port), then the
/// workload at the address and whether it speaks HBONE.
pub fn route(snapshot: &Snapshot, dst: SocketAddr, pick: Pick) -> Result<Route, RouteError> {
    let service = snapshot.service_by_vip(dst.ip()).cloned();
    let dst = match &service {
        None => dst,
        Some(svc) => {
            if !svc.has_port(dst.port()) {
                return Err(RouteError::NoSuchPort {
                    service: svc.key.clone(),
                    port: dst.port(),
                });
            }
            let picked = match pick {
                Pick::Next => svc.pick(dst.ip(), dst.port()),
                Pick::Peek => svc.peek(dst.ip(), dst.port()),
            };
            let Some((_, endpoint)) = picked else {
                return Err(RouteError::NoEndpoint {
                    service: svc.key.clone(),
                });
            };
            endpoint
        }
    };
    let workload = snapshot.by_ip(dst.ip()).cloned();
    let hbone = workload.as_ref().is_some_and(|w| w.hbone);
    Ok(Route {
        service,
        dst,
        workload,
        hbone,
    })
}
