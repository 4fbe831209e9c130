//! Inbound plaintext: a connection for one of the pod's ports, steered to the pod's 15006 listener
//! by `sk_lookup`. The accepted socket's local address is the original destination. Connect to the
//! app from inside the pod's netns *as the client* (transparent socket, see
//! `redirect::routing`), so the app sees the real client IP, and copy.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;

use super::{
    PodInfo, ProxyContext,
    copy::{self, ByteCounts, Side},
};
use crate::telemetry::{AccessLog, Path};

pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    downstream: TcpStream,
    peer: SocketAddr,
    start: Instant,
) {
    let counts = Arc::new(ByteCounts::default());
    let mut log = AccessLog {
        direction: super::Direction::Inbound,
        src: peer,
        dst: None,
        src_workload: None,
        dst_workload: Some(&pod.key),
        dst_service: None,
        dst_endpoint: None,
        src_identity: None,
        dst_identity: Some(&pod.identity),
        path: Path::Passthrough,
        counts: &counts,
        start,
        error: None,
        limit: None,
        authz: None,
        trace: None,
        locality: None,
    };
    let dst = match downstream.local_addr() {
        Ok(a) => super::canonical(a),
        Err(e) => {
            log.error = Some((
                Side::Downstream,
                format!("cannot read original destination: {e}"),
            ));
            log.emit();
            return;
        }
    };
    log.dst = Some(dst);
    if [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&dst.port()) {
        // Someone dialed the agent's own port on the pod IP; forwarding it would loop.
        log.error = Some((
            Side::Downstream,
            format!("port {} is the agent's own; refusing", dst.port()),
        ));
        log.emit();
        return;
    }

    // Judged only on synced policy.
    let synced = tokio::select! {
        r = ctx.wait_synced(super::Direction::Inbound) => r,
        () = super::gave_up(&downstream) => {
            log.error = Some((Side::Downstream, "the client closed the connection while it waited for the control plane".to_owned()));
            log.emit();
            return;
        }
    };
    if let Err(e) = synced {
        log.error = Some((Side::Internal, e.to_string()));
        log.limit = Some(e.reason());
        log.emit();
        return;
    }
    // A plaintext client has no verified identity: only policies that allow that admit it.
    let admission = ctx.admit(
        &pod,
        super::InboundConn {
            path: Path::Passthrough,
            peer,
            dst,
            client: None,
            baggage: None,
            service_host: None,
            counts: &counts,
            start,
        },
    );
    let live = admission.live;
    log.src_workload = admission.src_workload.as_deref();
    let decision = match admission.outcome {
        Ok(d) => d,
        Err(why) => {
            log.error = Some((Side::Downstream, why));
            log.emit();
            return;
        }
    };
    let allowed = decision.allowed;
    log.authz = Some(decision);
    if !allowed {
        // Closed before a byte reaches the app.
        log.error = Some((
            Side::Downstream,
            "denied by authorization policy".to_owned(),
        ));
        log.emit();
        return;
    }

    let upstream = match super::upstream_socket(&pod.netns, dst, Some(peer.ip())) {
        Ok(s) => tokio::select! {
            r = super::connect(s, dst) => r,
            () = super::gave_up(&downstream) => {
                log.error = Some((Side::Downstream, "the client closed the connection before the app answered".to_owned()));
                log.emit();
                return;
            }
        },
        Err(e) => Err(e),
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            log.error = Some((
                Side::Upstream,
                format!("connect to app at {dst} failed: {e}"),
            ));
            log.emit();
            return;
        }
    };
    tokio::select! {
        r = copy::copy_bidirectional(downstream, upstream, counts.clone()) => {
            if let Err(e) = r {
                log.error = Some((e.side, e.to_string()));
            }
        }
        _ = live.conn.closed() => {
            log.error = Some((Side::Downstream, live.conn.close_reason().unwrap_or_default()));
        }
    }
    log.emit();
}
