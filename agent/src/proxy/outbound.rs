//! Outbound: a connection an enrolled pod's app opened, redirected to the pod's 15001 listener.
//! Look up where it was going, connect there from inside the pod's netns (so it leaves with the
//! pod's own IP), and copy. HBONE replaces the plaintext connect for mesh destinations.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::net::TcpStream;
use tracing::warn;

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
        direction: super::Direction::Outbound,
        src: peer,
        dst: None,
        src_workload: Some(&pod.key),
        dst_workload: None,
        path: Path::Passthrough,
        counts: &counts,
        start,
        error: None,
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
    if let Some(ip) = pod.ips.iter().find(|ip| ip.is_ipv4() == dst.is_ipv4()) {
        log.src = SocketAddr::new(*ip, peer.port());
    }

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
}
