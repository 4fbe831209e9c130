//! HBONE server: the pod's 15008 listener. Terminates mutual TLS (the client's SPIFFE identity
//! comes from its certificate), then serves HTTP/2 `CONNECT` streams: each one is a TCP
//! connection to the pod's app, opened from inside the pod's netns as the client's IP.
//!
//! Refusals follow HTTP semantics as Istio peers expect them: 400 for anything that is not a
//! `CONNECT` to this pod's own address, 503 when the app refuses the connection.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use ambit_common::{HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT};
use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW, TcpSide};
use crate::{
    identity::Identity,
    proxy::{
        self, Direction, PodInfo, ProxyContext,
        copy::{ByteCounts, Side},
    },
    telemetry::{AccessLog, Path},
    tls,
};

/// How long a client gets to finish the TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the pod's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(5);

/// Serves one accepted HBONE connection until it closes.
pub async fn serve_connection(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let Some(config) = server_config(&ctx, &pod).await else {
        warn!(
            identity = %pod.identity,
            "refusing HBONE connection: no certificate for this pod's identity yet (is the CA reachable?)"
        );
        return;
    };
    let Some(accepted) = accept(config, tcp, peer, &pod.identity).await else {
        return;
    };
    let client_id = Arc::new(accepted.client);
    accept_streams(accepted.conn, &ctx.draining, |request, respond| {
        let span = info_span!("hbone_inbound", pod = %pod.key, src = %peer);
        ctx.connections.spawn(
            serve_stream(
                ctx.clone(),
                pod.clone(),
                client_id.clone(),
                peer,
                request,
                respond,
            )
            .instrument(span),
        );
    })
    .await;
}

/// An HBONE connection after its TLS and HTTP/2 handshakes.
pub struct Accepted {
    /// The client's verified SPIFFE identity.
    pub client: Identity,
    pub conn: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
}

/// The TLS (client certificate required, `config`) and HTTP/2 handshakes of an accepted HBONE
/// connection to `local` (the identity served, for the log), each bounded in time. Refusals are
/// logged with the reason and give `None`.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: &Identity,
) -> Option<Accepted> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // The common case of a refused peer: wrong CA, no certificate, wrong trust domain.
            warn!(src.addr = %peer, error = %e, "HBONE TLS handshake refused");
            return None;
        }
        Err(_) => {
            warn!(src.addr = %peer, "HBONE TLS handshake timed out");
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    let Some(client) = tls::peer_identity(session) else {
        // The verifier already insists on a SPIFFE id; this is a belt-and-braces check.
        warn!(src.addr = %peer, "HBONE client presented no SPIFFE identity; closing");
        return None;
    };
    let serial = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::identity::ca::serial_hex)
        .unwrap_or_default();
    info!(
        src.addr = %peer,
        src.identity = %client,
        src.serial = %serial,
        dst.identity = %local,
        "hbone connection accepted"
    );
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2_builder().handshake::<_, Bytes>(tls)).await {
        Ok(Ok(conn)) => Some(Accepted { client, conn }),
        Ok(Err(e)) => {
            warn!(src.addr = %peer, error = %e, "HBONE HTTP/2 handshake failed");
            None
        }
        Err(_) => {
            warn!(src.addr = %peer, "HBONE HTTP/2 handshake timed out");
            None
        }
    }
}

/// Hands every stream of `conn` to `on_stream` until the connection ends. When `draining` fires,
/// GOAWAY tells the client to open new streams elsewhere; the streams in flight finish, then the
/// connection closes.
pub async fn accept_streams(
    mut conn: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
    draining: &tokio_util::sync::CancellationToken,
    mut on_stream: impl FnMut(Request<h2::RecvStream>, SendResponse<Bytes>),
) {
    let mut goaway_sent = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = draining.cancelled(), if !goaway_sent => {
                conn.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) => on_stream(request, respond),
            Some(Err(e)) => {
                debug!(error = %e, "HBONE connection ended");
                break;
            }
            None => break,
        }
    }
}

/// HTTP/2 server settings for HBONE (large windows and frames, see the module docs of `tunnel`).
pub fn h2_builder() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize);
    b
}

/// The pod's TLS config; right after enrollment its first certificate may still be on its way, so
/// wait for it (bounded) rather than turn the first clients away.
async fn server_config(ctx: &ProxyContext, pod: &PodInfo) -> Option<Arc<rustls::ServerConfig>> {
    if let Some(c) = pod.hbone_server_config() {
        return Some(c);
    }
    ctx.certs.get(&pod.identity, CERT_WAIT).await.ok()?;
    // The config is built from the certificate by the pod's certificate follower, moments later.
    for _ in 0..50 {
        if let Some(c) = pod.hbone_server_config() {
            return Some(c);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    pod.hbone_server_config()
}

async fn serve_stream(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    client_id: Arc<Identity>,
    peer: SocketAddr,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let start = Instant::now();
    let counts = Arc::new(ByteCounts::default());
    let mut log = AccessLog {
        direction: Direction::Inbound,
        src: peer,
        dst: None,
        src_workload: None,
        dst_workload: Some(&pod.key),
        dst_service: None,
        dst_endpoint: None,
        src_identity: Some(&client_id),
        dst_identity: Some(&pod.identity),
        path: Path::Hbone,
        counts: &counts,
        start,
        error: None,
        limit: None,
        authz: None,
    };
    let refuse = |respond: &mut SendResponse<Bytes>, status: StatusCode| {
        let resp = Response::builder().status(status).body(());
        if let Ok(resp) = resp {
            let _ = respond.send_response(resp, true);
        }
    };

    if request.method() != Method::CONNECT {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        log.error = Some((
            Side::Downstream,
            format!("{} is not CONNECT", request.method()),
        ));
        log.emit();
        return;
    }
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let dst = match authority.as_deref().map(str::parse::<SocketAddr>) {
        Some(Ok(a)) => proxy::canonical(a),
        _ => {
            refuse(&mut respond, StatusCode::BAD_REQUEST);
            log.error = Some((
                Side::Downstream,
                format!("CONNECT authority {authority:?} is not an ip:port"),
            ));
            log.emit();
            return;
        }
    };
    log.dst = Some(dst);
    if !pod.ips.contains(&dst.ip())
        || [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&dst.port())
    {
        refuse(&mut respond, StatusCode::BAD_REQUEST);
        log.error = Some((
            Side::Downstream,
            format!("CONNECT to {dst}: not an address of pod {}", pod.key),
        ));
        log.emit();
        return;
    }

    // Judged only on synced policy.
    if let Err(e) = ctx.wait_synced(Direction::Inbound).await {
        refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
        log.error = Some((Side::Internal, e.to_string()));
        log.limit = Some(e.reason());
        log.emit();
        return;
    }
    let admission = ctx.admit(
        &pod,
        proxy::InboundConn {
            path: Path::Hbone,
            peer,
            dst,
            client: Some(&client_id),
            counts: &counts,
            start,
        },
    );
    let live = admission.live;
    log.src_workload = admission.src_workload.as_deref();
    let decision = match admission.outcome {
        Ok(d) => d,
        Err(why) => {
            // 403, as for a policy denial: the client's agent did not route through the waypoint.
            refuse(&mut respond, StatusCode::FORBIDDEN);
            log.error = Some((Side::Downstream, why));
            log.emit();
            return;
        }
    };
    let allowed = decision.allowed;
    log.authz = Some(decision);
    if !allowed {
        // 403, as Istio peers expect for a policy denial; nothing reaches the app.
        refuse(&mut respond, StatusCode::FORBIDDEN);
        log.error = Some((
            Side::Downstream,
            "denied by authorization policy".to_owned(),
        ));
        log.emit();
        return;
    }

    let upstream = match proxy::upstream_socket(&pod.netns, dst, Some(peer.ip())) {
        Ok(s) => proxy::connect(s, dst).await,
        Err(e) => Err(e),
    };
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            refuse(&mut respond, StatusCode::SERVICE_UNAVAILABLE);
            log.error = Some((
                Side::Upstream,
                format!("connect to app at {dst} failed: {e}"),
            ));
            log.emit();
            return;
        }
    };
    let ok = Response::builder().status(StatusCode::OK).body(());
    let send = match ok.map(|r| respond.send_response(r, false)) {
        Ok(Ok(send)) => send,
        Ok(Err(e)) => {
            log.error = Some((Side::Downstream, format!("cannot answer CONNECT: {e}")));
            log.emit();
            return;
        }
        Err(e) => {
            log.error = Some((Side::Downstream, format!("BUG: cannot build response: {e}")));
            log.emit();
            return;
        }
    };
    let recv = request.into_body();
    tokio::select! {
        r = super::pump(upstream, send, recv, TcpSide::Destination, counts.clone()) => {
            if let Err(e) = r {
                log.error = Some((e.side, e.to_string()));
            }
        }
        _ = live.conn.closed() => {
            // Dropping the stream resets it; the client side sees the tunnel end.
            log.error = Some((Side::Downstream, live.conn.close_reason().unwrap_or_default()));
        }
    }
    log.emit();
}
