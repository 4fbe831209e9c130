//! Inbound: one flow, two transports. A connection for one of the pod's ports arrives either in
//! plaintext (steered to the pod's 15006 listener by `sk_lookup`; the accepted socket's local
//! address is the original destination) or as an HBONE stream on 15008 (`tunnel::server` reads
//! the `CONNECT` and the client's verified identity). Both then go through [`admit_and_connect`]:
//! wait for synced policy, admit (waypoint rule, L4 policy), and connect to the app from inside
//! the pod's netns *as the client* (transparent socket, see `redirect::routing`), so the app sees
//! the real client IP. Only the copy differs.

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
use tracing::{Instrument as _, info_span, warn};

use super::{
    Direction, InboundConn, PodInfo, ProxyContext,
    capture::Source,
    copy,
    limits::StreamSlot,
    live,
    result::{AccessLog, ConnectionResult, Error},
};
use crate::{
    identity::Identity,
    telemetry::Transport,
    tunnel::{
        self, TcpSide, metadata,
        server::{self, StreamToken},
    },
};

/// How long a connection waits for the pod's first certificate.
const CERT_WAIT: Duration = Duration::from_secs(5);

/// Whether `port` is one of the agent's own listeners in the pod: a connection to it would loop.
pub fn is_agent_port(port: u16) -> bool {
    [OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT].contains(&port)
}

/// The record an inbound connection to `pod` starts with.
pub fn access_log(pod: &PodInfo, peer: SocketAddr, path: Transport, start: Instant) -> AccessLog {
    AccessLog {
        dst_workload: Some(pod.key.clone()),
        dst_identity: Some(pod.identity.clone()),
        path,
        ..AccessLog::new(Direction::Inbound, peer, start)
    }
}

/// Serves a plaintext connection accepted on 15006.
pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    downstream: TcpStream,
    peer: SocketAddr,
    start: Instant,
) {
    let mut result = ConnectionResult::new(access_log(&pod, peer, Transport::Passthrough, start));
    let outcome = plaintext(&ctx, &pod, downstream, &mut result.log).await;
    result.finish(outcome);
}

async fn plaintext(
    ctx: &ProxyContext,
    pod: &PodInfo,
    downstream: TcpStream,
    log: &mut AccessLog,
) -> Result<(), Error> {
    let dst = super::canonical(downstream.local_addr().map_err(Error::LocalAddress)?);
    log.dst = Some(dst);
    if is_agent_port(dst.port()) {
        return Err(Error::OwnPort(dst));
    }
    // A plaintext client has no verified identity: only policies that allow that admit it.
    let counts = log.counts.clone();
    let conn = InboundConn {
        path: Transport::Passthrough,
        peer: log.src,
        dst,
        client: None,
        baggage: None,
        service_host: None,
        counts: &counts,
        start: log.start,
    };
    let (upstream, live) = tokio::select! {
        r = admit_and_connect(ctx, pod, conn, log) => r?,
        () = super::gave_up(&downstream) => {
            return Err(Error::ClientGone(if ctx.gate.is_open() {
                "before the app answered"
            } else {
                "while it waited for the control plane"
            }));
        }
    };
    tokio::select! {
        r = copy::copy_bidirectional(downstream, upstream, log.counts.clone()) => {
            r.map_err(Error::Copy)
        }
        _ = live.conn.closed() => Err(Error::Closed(live.conn.close_reason().unwrap_or_default())),
    }
}

/// The inbound sequence both transports share, up to a connected app socket: judged only on
/// synced policy; registered (so a policy change re-judges it and the metrics count it); refused
/// if it skipped the pod's waypoint or the policy denies it (nothing reaches the app); then
/// connected to the app as the client. Fills in the record's source and decision.
pub async fn admit_and_connect<'c>(
    ctx: &'c ProxyContext,
    pod: &PodInfo,
    conn: InboundConn<'_>,
    log: &mut AccessLog,
) -> Result<(TcpStream, live::Registration<'c>), Error> {
    ctx.wait_synced(Direction::Inbound)
        .await
        .map_err(Error::NotSynced)?;
    let (peer, dst) = (conn.peer, conn.dst);
    let admission = ctx.admit(pod, conn);
    let live = admission.live;
    log.src_workload = admission.src_workload;
    let decision = admission.outcome.map_err(Error::Bypass)?;
    let allowed = decision.allowed;
    log.authz = Some(decision);
    if !allowed {
        return Err(Error::Denied);
    }
    let socket = ctx
        .capture
        .socket(&pod.netns, dst, Source::Transparent(peer.ip()));
    let connected = match socket {
        Ok(s) => super::connect(s, dst).await,
        Err(e) => Err(e),
    };
    match connected {
        Ok(upstream) => Ok((upstream, live)),
        Err(cause) => {
            live.conn.flag("CONNECT");
            Err(Error::Connect {
                dst,
                app: true,
                cause,
            })
        }
    }
}

/// Serves one HBONE connection accepted on the pod's 15008 listener until it closes: TLS as the
/// pod (waiting, bounded, for its first certificate), within the handshake budgets, then each
/// `CONNECT` stream as [`hbone`].
pub async fn hbone_connection(
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
    let handshake = match ctx.budgets.handshake(peer.ip()) {
        Ok(h) => h,
        Err(hit) => {
            ctx.live
                .metrics()
                .refused(Direction::Inbound.as_str(), hit.limit.reason());
            if ctx.budgets.should_warn() {
                warn!(src.addr = %peer, limit = hit.limit.reason(), "{hit}");
            }
            return;
        }
    };
    let accepted = server::accept(config, tcp, peer, &pod.identity, &ctx.hbone_server).await;
    drop(handshake);
    let Some(accepted) = accepted else {
        return;
    };
    let client_id = Arc::new(accepted.client);
    let ended = server::accept_streams(
        accepted.conn,
        &ctx.draining,
        &ctx.hbone_server,
        |request, respond, token| {
            let span = info_span!("hbone_inbound", pod = %pod.key, src = %peer);
            ctx.connections.spawn(
                hbone(
                    ctx.clone(),
                    pod.clone(),
                    client_id.clone(),
                    peer,
                    request,
                    respond,
                    token,
                )
                .instrument(span),
            );
        },
    )
    .await;
    server::log_end(&ended, peer, &client_id);
    if let Some(limit) = ended.limit() {
        ctx.live
            .metrics()
            .refused(Direction::Inbound.as_str(), limit);
    }
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

/// Serves one HBONE `CONNECT` stream accepted on the pod's 15008 listener from `client` (its
/// verified identity). Refusals are answered with [`Error::status`], as ztunnel answers them.
pub async fn hbone(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    client: Arc<Identity>,
    peer: SocketAddr,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    _token: StreamToken,
) {
    let mut result = ConnectionResult::new(AccessLog {
        src_identity: Some((*client).clone()),
        ..access_log(&pod, peer, Transport::Hbone, Instant::now())
    });
    let outcome = match hbone_connect(&ctx, &pod, &client, &request, &mut result.log).await {
        Ok((upstream, live, _slot)) => {
            hbone_copy(&ctx, upstream, &live, request, respond, &result.log).await
        }
        Err(e) => {
            if let Ok(resp) = Response::builder().status(e.status()).body(()) {
                let _ = respond.send_response(resp, true);
            }
            Err(e)
        }
    };
    result.finish(outcome);
}

/// Everything before the `200`: the request read, the stream budget, the shared inbound sequence.
async fn hbone_connect<'c>(
    ctx: &'c ProxyContext,
    pod: &PodInfo,
    client: &Identity,
    request: &Request<h2::RecvStream>,
    log: &mut AccessLog,
) -> Result<(TcpStream, live::Registration<'c>, StreamSlot), Error> {
    if request.method() != Method::CONNECT {
        return Err(Error::BadRequest(format!(
            "{} is not CONNECT",
            request.method()
        )));
    }
    let peer = log.src;
    let authority = request.uri().authority();
    let dst = match authority.map(|a| a.as_str().parse::<SocketAddr>()) {
        Some(Ok(a)) => super::canonical(a),
        // ztunnel's service-hostname form (`reviews.shop.svc.cluster.local:9080`, used through
        // east-west gateways): a service this pod backs, on the port it maps to here.
        Some(Err(_))
            if let Some(a) = authority
                && let Some(port) = a.port_u16() =>
        {
            by_hostname(ctx, pod, a.host(), port, peer).map_err(Error::UnknownHostname)?
        }
        _ => {
            return Err(Error::BadRequest(format!(
                "CONNECT authority {:?} is not ip:port or service-hostname:port",
                authority.map(|a| a.as_str())
            )));
        }
    };
    log.dst = Some(dst);
    if !pod.ips.contains(&dst.ip()) {
        return Err(Error::NotPodAddress {
            dst,
            pod: pod.key.clone(),
        });
    }
    if is_agent_port(dst.port()) {
        return Err(Error::OwnPort(dst));
    }
    // The client identity's budget of streams, held until the stream ends.
    let slot = ctx.budgets.stream(client).map_err(|hit| {
        ctx.live
            .metrics()
            .refused(Direction::Inbound.as_str(), hit.limit.reason());
        Error::Limit(hit)
    })?;
    // Telemetry the client sent (never used for identity or policy).
    log.trace = metadata::traceparent(request.headers());
    let peer_baggage = metadata::Baggage::parse(request.headers());
    let service_host = metadata::forwarded_host(request.headers());
    let counts = log.counts.clone();
    let conn = InboundConn {
        path: Transport::Hbone,
        peer,
        dst,
        client: Some(client),
        baggage: Some(&peer_baggage),
        service_host: service_host.as_deref(),
        counts: &counts,
        start: log.start,
    };
    let (upstream, live) = admit_and_connect(ctx, pod, conn, log).await?;
    Ok((upstream, live, slot))
}

/// After the app accepted: answer `200` (with the destination's baggage, as ztunnel does, for the
/// client's telemetry) and copy until either side ends or the agent closes the connection.
async fn hbone_copy(
    ctx: &ProxyContext,
    upstream: TcpStream,
    live: &live::Registration<'_>,
    request: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    log: &AccessLog,
) -> Result<(), Error> {
    let dst = log.dst.map(|d| d.ip());
    let snapshot = ctx.workloads.snapshot();
    let baggage = dst.and_then(|ip| snapshot.by_ip(ip)).map(|w| {
        let t = snapshot.telemetry_of(w);
        metadata::Baggage::of(&w.namespace, &t.workload_name, &t.meta).header_value()
    });
    drop(snapshot);
    let mut ok = Response::builder().status(StatusCode::OK);
    if let Some(b) = baggage.filter(|b| !b.is_empty()) {
        ok = ok.header("baggage", b);
    }
    let ok = ok
        .body(())
        .map_err(|e| Error::Answer(format!("BUG: cannot build response: {e}")))?;
    let send = respond
        .send_response(ok, false)
        .map_err(|e| Error::Answer(e.to_string()))?;
    let recv = request.into_body();
    tokio::select! {
        r = tunnel::pump(upstream, send, recv, TcpSide::Destination, log.counts.clone()) => {
            r.map_err(Error::Copy)
        }
        // Dropping the stream resets it; the client side sees the tunnel end.
        _ = live.conn.closed() => Err(Error::Closed(live.conn.close_reason().unwrap_or_default())),
    }
}

/// The address a service-hostname `CONNECT` (`host:port`) reaches in `pod`: the pod's address of
/// the client's family and the port `pod` serves the service's `port` on. Only a service the pod
/// backs (stricter than ztunnel, which takes any service of that name and sends to the pod).
fn by_hostname(
    ctx: &ProxyContext,
    pod: &PodInfo,
    host: &str,
    port: u16,
    peer: SocketAddr,
) -> Result<SocketAddr, String> {
    let like = pod
        .ips
        .iter()
        .find(|ip| ip.is_ipv4() == peer.ip().to_canonical().is_ipv4())
        .or(pod.ips.first())
        .copied()
        .ok_or_else(|| format!("pod {} has no address", pod.key))?;
    let snapshot = ctx.workloads.snapshot();
    let w = snapshot
        .by_ip(like)
        .ok_or_else(|| format!("pod {} is not a known workload", pod.key))?;
    let w = snapshot.telemetry_of(w);
    let service = w
        .services
        .iter()
        .filter_map(|r| snapshot.service(&r.key))
        .find(|s| s.def.as_ref().is_some_and(|d| d.hostname == host))
        .ok_or_else(|| {
            format!(
                "CONNECT to {host}:{port}: pod {} backs no service {host}",
                pod.key
            )
        })?;
    let (_, target) = service
        .candidates(like, port)
        .find(|(e, _)| e.uid() == w.uid())
        .filter(|_| service.has_port(port))
        .ok_or_else(|| {
            format!(
                "CONNECT to {host}:{port}: service {} has no port {port} on pod {}",
                service.key, pod.key
            )
        })?;
    Ok(SocketAddr::new(like, target.port()))
}
