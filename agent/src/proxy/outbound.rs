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
};
use crate::{
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
    // A service VIP: pick an endpoint; from here on the endpoint is the destination.
    let mut dst = dst;
    let service = snapshot.service_by_vip(dst.ip()).cloned();
    if let Some(svc) = &service {
        log.dst_service = Some(&svc.key);
        if !svc.has_port(dst.port()) {
            log.error = Some((
                Side::Downstream,
                format!("service {} has no port {}", svc.key, dst.port()),
            ));
            log.emit();
            return;
        }
        let Some((_, endpoint)) = svc.pick(dst.ip(), dst.port()) else {
            log.error = Some((
                Side::Upstream,
                format!(
                    "service {} has no healthy endpoint (no workload backs it with an address of this family)",
                    svc.key
                ),
            ));
            log.emit();
            return;
        };
        dst = endpoint;
        log.dst_endpoint = Some(dst);
    }
    let target = snapshot.by_ip(dst.ip()).filter(|w| w.hbone).cloned();
    let dst_name = snapshot.by_ip(dst.ip()).map(|w| w.display_name());
    log.dst_workload = dst_name.as_deref();

    let Some(target) = target else {
        // Not a mesh workload: plaintext, as before capture.
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
    };

    log.path = Path::Hbone;
    log.dst_identity = Some(&target.identity);
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
