//! The waypoint's data path: HBONE in (mutual TLS, HTTP/2 `CONNECT` to a destination that uses
//! this waypoint), HTTP inside each tunnel (HTTP/1.1, HTTP/2 with prior knowledge or by h2c
//! upgrade), and for
//! each request: L7 authorization, a route, an endpoint, then HTTP/1.1 over HBONE to it, with
//! retries, a timeout and outlier detection. One access-log line and one metrics sample per
//! request.

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::{Duration, Instant},
};

use arc_swap::{ArcSwap, ArcSwapOption};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt as _, Full};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{
    authz::{self, RequestAttrs},
    config::Waypoint as Settings,
    forward, h2c,
    metrics::{RequestLabels, WaypointMetrics},
    path,
    plan::{self, Destination, Plan, Refusal, RequestLine},
    retry::{self, AfterAnswer},
    upstream::{Body, BoxError, Checkout, Failure, Upstream, backoff},
};
use crate::{
    identity::Identity,
    proxy,
    state::{ServiceEntry, Snapshot, StateStore, Workload},
    tunnel::{server as tunnel_server, stream::H2Stream},
    xds::GatewayDestination,
};

/// How long a client gets for the TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Request bodies up to this size are kept so the request can be retried.
const MAX_RETRY_BODY: u64 = 64 * 1024;
/// How long a client gets to send a request's head, or a body the waypoint keeps.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// What every connection shares.
pub struct Ctx {
    pub settings: ArcSwap<Settings>,
    pub state: StateStore,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<WaypointMetrics>,
    pub identity: Identity,
    /// Built from the waypoint's certificate once it arrives.
    pub tls: ArcSwapOption<rustls::ServerConfig>,
    pub draining: CancellationToken,
    pub connections: TaskTracker,
    /// How HBONE clients are bounded (as on the node agents' pods).
    pub hbone_server: tunnel_server::ServerSettings,
    pub budgets: Arc<proxy::limits::Budgets>,
    /// The waypoint's open connections (its budget, like one pod's).
    pub open: Arc<std::sync::atomic::AtomicUsize>,
    /// Why requests cannot be served yet (the cluster's policies are not read): each is
    /// answered 503 with it.
    pub waiting: Arc<ArcSwapOption<String>>,
}

/// The destination a tunnel was opened for.
enum Target {
    Service(Arc<ServiceEntry>),
    Workload(Arc<Workload>),
}

/// One tunnel's facts, shared by its requests.
struct Tunnel {
    client: Arc<Identity>,
    /// The HBONE client's address: the source pod (its node agent connects from the pod's IP).
    peer: SocketAddr,
    /// The waypoint's own address on this connection.
    local_ip: IpAddr,
    /// The `CONNECT` authority: service VIP:port or workload ip:port.
    dst: SocketAddr,
    target: Target,
    /// The client workload, when known (`namespace`, `workload name`).
    src_workload: Option<Arc<Workload>>,
}

impl Tunnel {
    fn destination(&self) -> Destination<'_> {
        match &self.target {
            Target::Service(s) => Destination {
                service: Some(&s.key),
                workload: None,
                addr: self.dst,
            },
            Target::Workload(w) => Destination {
                service: None,
                workload: Some(w),
                addr: self.dst,
            },
        }
    }
}

/// Serves one accepted HBONE connection until it closes.
pub async fn serve_connection(ctx: Arc<Ctx>, tcp: TcpStream, peer: SocketAddr) {
    let peer = proxy::canonical(peer);
    let local_ip = match tcp.local_addr() {
        Ok(a) => proxy::canonical(a).ip(),
        Err(e) => {
            warn!(error = %e, "accepted socket has no local address");
            return;
        }
    };
    let Some(config) = ctx.tls.load_full() else {
        warn!(
            identity = %ctx.identity,
            "refusing HBONE connection: no certificate for the waypoint's identity yet (is the CA reachable?)"
        );
        return;
    };
    let handshake = match ctx.budgets.handshake(peer.ip()) {
        Ok(h) => h,
        Err(hit) => {
            if ctx.budgets.should_warn() {
                warn!(src.addr = %peer, limit = hit.limit.reason(), "{hit}");
            }
            return;
        }
    };
    let accepted = tunnel_server::accept(config, tcp, peer, &ctx.identity, &ctx.hbone_server).await;
    drop(handshake);
    let Some(accepted) = accepted else {
        return;
    };
    let client = Arc::new(accepted.client);
    let ended = tunnel_server::accept_streams(
        accepted.conn,
        &ctx.draining,
        &ctx.hbone_server,
        |request, mut respond, token| {
            let slot = match ctx.budgets.stream(&client) {
                Ok(s) => s,
                Err(hit) => {
                    if ctx.budgets.should_warn() {
                        warn!(src.addr = %peer, src.identity = %client, "{hit}");
                    }
                    if let Ok(resp) = Response::builder()
                        .status(StatusCode::SERVICE_UNAVAILABLE)
                        .body(())
                    {
                        let _ = respond.send_response(resp, true);
                    }
                    return;
                }
            };
            let span = info_span!("waypoint", src = %peer);
            let tunnel = serve_tunnel(
                ctx.clone(),
                client.clone(),
                peer,
                local_ip,
                request,
                respond,
            );
            ctx.connections.spawn(
                async move {
                    let _held = (token, slot);
                    tunnel.await
                }
                .instrument(span),
            );
        },
    )
    .await;
    tunnel_server::log_end(&ended, peer, &client);
}

async fn serve_tunnel(
    ctx: Arc<Ctx>,
    client: Arc<Identity>,
    peer: SocketAddr,
    local_ip: IpAddr,
    request: Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) {
    let refuse = |respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode, why: &str| {
        warn!(src.addr = %peer, src.identity = %client, %status, "waypoint refused a tunnel: {why}");
        if let Ok(resp) = Response::builder().status(status).body(()) {
            let _ = respond.send_response(resp, true);
        }
    };
    if request.method() != Method::CONNECT {
        refuse(
            &mut respond,
            StatusCode::BAD_REQUEST,
            &format!("{} is not CONNECT", request.method()),
        );
        return;
    }
    let authority = request.uri().authority().map(|a| a.as_str().to_owned());
    let Some(dst) = authority
        .as_deref()
        .and_then(|a| a.parse::<SocketAddr>().ok())
    else {
        refuse(
            &mut respond,
            StatusCode::BAD_REQUEST,
            &format!("CONNECT authority {authority:?} is not an ip:port"),
        );
        return;
    };
    let dst = proxy::canonical(dst);
    let snapshot = ctx.state.snapshot();
    let target = match served_target(&snapshot, dst, local_ip) {
        Ok(t) => t,
        Err(why) => {
            refuse(&mut respond, StatusCode::BAD_REQUEST, &why);
            return;
        }
    };
    let src_workload = snapshot.by_ip(peer.ip()).cloned();
    drop(snapshot);
    let Ok(ok) = Response::builder().status(StatusCode::OK).body(()) else {
        return;
    };
    let send = match respond.send_response(ok, false) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot answer CONNECT");
            return;
        }
    };
    let io = TokioIo::new(H2Stream::new(send, request.into_body(), ()));
    let tunnel = Arc::new(Tunnel {
        client,
        peer,
        local_ip,
        dst,
        target,
        src_workload,
    });
    let service = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            let ctx = ctx.clone();
            let tunnel = tunnel.clone();
            async move {
                if h2c::is_upgrade(&req)
                    && let Some(stream1) = h2c::headers_frame(&req)
                {
                    let upgrade = hyper::upgrade::on(&mut req);
                    ctx.connections
                        .spawn(serve_h2c(ctx.clone(), tunnel, upgrade, stream1).in_current_span());
                    return Ok::<_, Infallible>(switching_to_h2c());
                }
                Ok::<_, Infallible>(handle(ctx, tunnel, req).await)
            }
        })
    };
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        // No half-close: the end of a tunnel's client side is the client going away (a
        // `CONNECT` stream cannot tell a shutdown from a close), and its request is abandoned,
        // as Envoy does.
        .header_read_timeout(REQUEST_READ_TIMEOUT);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP inside the tunnel ended with an error");
    }
}

fn switching_to_h2c() -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    r.headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static("h2c"));
    r
}

/// HTTP/2 on a tunnel upgraded from HTTP/1.1; the upgrade request is stream 1 (see [`h2c`]).
async fn serve_h2c(
    ctx: Arc<Ctx>,
    tunnel: Arc<Tunnel>,
    upgrade: hyper::upgrade::OnUpgrade,
    stream1: Bytes,
) {
    let mut io = match upgrade.await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            debug!(error = %e, "h2c upgrade did not complete");
            return;
        }
    };
    let opening = match tokio::time::timeout(HANDSHAKE_TIMEOUT, h2c::opening(&mut io, &stream1))
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no HTTP/2 preface in time after the h2c upgrade",
            ))
        }) {
        Ok(b) => b,
        Err(e) => {
            warn!(src.addr = %tunnel.peer, error = %e, "h2c upgrade failed");
            return;
        }
    };
    let service = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let tunnel = tunnel.clone();
            async move { Ok::<_, Infallible>(handle(ctx, tunnel, req).await) }
        })
    };
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(h2c::Rewind::new(opening, io)), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = ctx.draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "HTTP/2 after an h2c upgrade ended with an error");
    }
}

/// The destination of a tunnel, if it is one this waypoint serves: a service VIP (with that
/// port) or a workload whose waypoint is this one. Anything else is refused, so the waypoint
/// cannot be used to reach workloads as itself (its identity is trusted by their agents).
fn served_target(snapshot: &Snapshot, dst: SocketAddr, local_ip: IpAddr) -> Result<Target, String> {
    // Named by any of this waypoint's addresses (clients may reach it on another family).
    let is_me = |gw: &crate::xds::XdsGateway| match &gw.destination {
        GatewayDestination::Address(ip) => {
            *ip == local_ip
                || snapshot
                    .by_ip(*ip)
                    .is_some_and(|w| w.ips().contains(&local_ip))
        }
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => snapshot
            .service(&format!("{namespace}/{hostname}"))
            .is_some_and(|s| s.endpoints.iter().any(|w| w.ips().contains(&local_ip))),
    };
    if let Some(svc) = snapshot.service_by_vip(dst.ip()) {
        let uses_me = svc
            .def
            .as_ref()
            .and_then(|d| d.waypoint.as_ref())
            .is_some_and(is_me);
        if !uses_me {
            return Err(format!("service {} does not use this waypoint", svc.key));
        }
        if !svc.has_port(dst.port()) {
            return Err(format!("service {} has no port {}", svc.key, dst.port()));
        }
        return Ok(Target::Service(svc.clone()));
    }
    match snapshot.by_ip(dst.ip()) {
        Some(w) if w.waypoint.as_deref().is_some_and(is_me) => Ok(Target::Workload(w.clone())),
        Some(w) => Err(format!(
            "workload {} does not use this waypoint",
            w.display_name()
        )),
        None => Err(format!("{dst} is not a known service or workload")),
    }
}

/// Everything one request's access-log line and metrics need.
struct Record {
    start: Instant,
    request_id: String,
    method: String,
    host: String,
    path: String,
    protocol: &'static str,
    status: u16,
    flags: &'static str,
    route: Option<String>,
    backend: Option<String>,
    endpoint: Option<SocketAddr>,
    dst_workload: Option<Arc<Workload>>,
    attempts: u32,
    authz: Option<String>,
    error: Option<String>,
    response_bytes: u64,
}

struct Handled {
    response: Response<Body>,
    checkout: Option<Checkout>,
}

/// A request in flight: if hyper drops it (the client went away before the response), the
/// request is still logged and counted, as Envoy does (`response_code` 0, flag `DC`).
struct InFlight {
    ctx: Arc<Ctx>,
    tunnel: Arc<Tunnel>,
    record: Option<Record>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            r.status = 0;
            r.flags = "DC";
            r.error = Some("the client went away before the response".to_owned());
            finish(&self.ctx, &self.tunnel, &r);
        }
    }
}

async fn handle(ctx: Arc<Ctx>, tunnel: Arc<Tunnel>, req: Request<Incoming>) -> Response<Body> {
    let start = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:032x}", fastrand::u128(..)));
    let host = req
        .uri()
        .host()
        .map(str::to_owned)
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(|h| {
                    // Strip a port (and IPv6 brackets' port).
                    match h.rsplit_once(':') {
                        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => {
                            name.to_owned()
                        }
                        _ => h.to_owned(),
                    }
                })
        })
        .unwrap_or_else(|| tunnel.dst.ip().to_string())
        .to_ascii_lowercase();
    // `example.com.` is `example.com` (a fully qualified name): judged and routed as one.
    let host = match host.strip_suffix('.') {
        Some(h) if !h.is_empty() => h.to_owned(),
        _ => host,
    };
    let record = Record {
        start,
        request_id: request_id.clone(),
        method: req.method().to_string(),
        host,
        path: req.uri().path().to_owned(),
        protocol: if req.version() == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        },
        status: 0,
        flags: "-",
        route: None,
        backend: None,
        endpoint: None,
        dst_workload: None,
        attempts: 0,
        authz: None,
        error: None,
        response_bytes: 0,
    };
    let mut in_flight = InFlight {
        ctx: ctx.clone(),
        tunnel: tunnel.clone(),
        record: None,
    };
    let record = in_flight.record.insert(record);
    let Handled { response, checkout } = route_request(&ctx, &tunnel, req, record).await;
    let Some(record) = in_flight.record.take() else {
        unreachable!("only the drop takes the record");
    };
    let (mut parts, body) = response.into_parts();
    forward::strip_hop_by_hop(&mut parts.headers);
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        parts.headers.insert("x-request-id", v);
    }
    let on_end = {
        let ctx = ctx.clone();
        let tunnel = tunnel.clone();
        move |complete: bool, bytes: u64| {
            let mut record = record;
            record.response_bytes = bytes;
            if complete {
                if let Some(c) = checkout {
                    c.done();
                }
            } else if record.error.is_none() {
                record.error = Some("response not sent to its end (client gone?)".to_owned());
            }
            finish(&ctx, &tunnel, &record);
        }
    };
    Response::from_parts(
        parts,
        Tracked {
            inner: body,
            bytes: 0,
            on_end: Some(Box::new(on_end)),
        }
        .boxed_unsync(),
    )
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

async fn route_request(
    ctx: &Arc<Ctx>,
    tunnel: &Tunnel,
    req: Request<Incoming>,
    record: &mut Record,
) -> Handled {
    match dispatch(ctx, tunnel, req, record).await {
        Ok(handled) => handled,
        Err(Refusal {
            status,
            flags,
            body,
        }) => {
            record.status = status.as_u16();
            record.flags = flags;
            if status != StatusCode::FORBIDDEN && record.error.is_none() {
                record.error = Some(body.trim_end().to_owned());
            }
            Handled {
                response: text(status, body),
                checkout: None,
            }
        }
    }
}

/// One request: normalize, authorize, plan, read the body, send (with retries and timeout).
async fn dispatch(
    ctx: &Arc<Ctx>,
    tunnel: &Tunnel,
    req: Request<Incoming>,
    record: &mut Record,
) -> Result<Handled, Refusal> {
    // Judge and route the path the endpoint will see: `/a/../admin` and `/%61dmin` are `/admin`.
    record.path = path::normalize(req.uri().path()).map_err(|why| {
        let body = format!("bad request path {:?}: {why}\n", req.uri().path());
        Refusal::new(StatusCode::BAD_REQUEST, "-", body)
    })?;
    if let Some(why) = ctx.waiting.load_full() {
        let body = format!("{why}\n");
        return Err(Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "UH", body));
    }
    let settings = ctx.settings.load_full();
    let to = tunnel.destination();
    authorize(ctx, &settings, tunnel, to.service, &req, record)?;
    let planned = plan::plan(
        &settings.routes,
        &ctx.state.snapshot(),
        to,
        &RequestLine {
            host: &record.host,
            method: req.method().as_str(),
            path: &record.path,
            headers: req.headers(),
        },
    );
    record.route = planned.route;
    record.backend = planned.backend;
    let plan = planned.result?;

    // The request as the endpoint gets it (see `forward`).
    let (mut parts, body) = req.into_parts();
    let protocol = forward::protocol(plan.declared, &parts);
    forward::rewrite(
        &mut parts,
        protocol,
        &record.path,
        &record.request_id,
        tunnel.peer.ip(),
        tunnel.dst,
    );
    let body = RequestBody::read(body).await?;
    let repeatable = retry::Repeatable {
        idempotent: is_idempotent(&parts.method),
        replayable: matches!(body, RequestBody::Kept(_)),
    };
    // The backend's DestinationRule's, else the waypoint's.
    let outlier_detection = settings
        .outlier_detection_for(record.backend.as_deref())
        .clone();
    let attempts = send_with_retries(
        ctx,
        tunnel,
        &plan,
        &outlier_detection,
        Outgoing {
            parts: &parts,
            h2: protocol.h2,
            body,
            repeatable,
        },
        record,
    );
    let outcome = match plan.timeout {
        Some(t) => tokio::time::timeout(t, attempts).await.map_err(|_| {
            let body = format!(
                "upstream request timeout: no response within {}\n",
                super::config::GoDuration(t)
            );
            Refusal::new(StatusCode::GATEWAY_TIMEOUT, "UT", body)
        })?,
        None => attempts.await,
    };
    match outcome {
        Ok((resp, checkout)) => {
            record.status = resp.status().as_u16();
            let (parts, body) = resp.into_parts();
            Ok(Handled {
                response: Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync()),
                checkout,
            })
        }
        Err(Some(last)) => Err(Refusal::new(
            last.status,
            last.flags,
            format!(
                "upstream failed after {} tries: {}\n",
                record.attempts, last.why
            ),
        )),
        Err(None) => Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            "no endpoint could be tried\n".into(),
        )),
    }
}

/// L7 authorization: a denial is answered 403 and counted by the policy that denied.
fn authorize(
    ctx: &Ctx,
    settings: &Settings,
    tunnel: &Tunnel,
    service: Option<&str>,
    req: &Request<Incoming>,
    record: &mut Record,
) -> Result<(), Refusal> {
    let verdict = authz::evaluate(
        &settings.authorization,
        &RequestAttrs {
            principal: &tunnel.client,
            source_ip: tunnel.peer.ip(),
            method: req.method().as_str(),
            path: &record.path,
            host: &record.host,
            headers: req.headers(),
            destination_port: tunnel.dst.port(),
            service,
        },
    );
    if !verdict.allowed {
        let reason = verdict.describe();
        ctx.metrics
            .denied(verdict.policy.as_deref().unwrap_or("none"));
        record.authz = Some(reason.clone());
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "-",
            format!("RBAC: access denied: {reason}\n"),
        ));
    }
    if verdict.policy.is_some() {
        record.authz = Some(verdict.describe());
    }
    Ok(())
}

/// A request body: kept whole when small (so the request can be sent again), else streamed
/// with the first try.
enum RequestBody {
    Kept(Bytes),
    Streamed(Option<Incoming>),
}

impl RequestBody {
    async fn read(body: Incoming) -> Result<RequestBody, Refusal> {
        let replayable = body.is_end_stream()
            || body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= MAX_RETRY_BODY);
        if !replayable {
            return Ok(RequestBody::Streamed(Some(body)));
        }
        match tokio::time::timeout(REQUEST_READ_TIMEOUT, body.collect()).await {
            Ok(Ok(b)) => Ok(RequestBody::Kept(b.to_bytes())),
            Ok(Err(e)) => Err(Refusal::new(
                StatusCode::BAD_REQUEST,
                "DPE",
                format!("reading the request body failed: {e}\n"),
            )),
            Err(_) => Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "DPE",
                format!(
                    "the request body did not arrive within {}s\n",
                    REQUEST_READ_TIMEOUT.as_secs()
                ),
            )),
        }
    }

    /// The body for the next try; `None` once a streamed body has gone.
    fn next(&mut self) -> Option<Body> {
        match self {
            RequestBody::Kept(b) => Some(
                Full::new(b.clone())
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            ),
            RequestBody::Streamed(b) => b.take().map(|b| b.map_err(BoxError::from).boxed_unsync()),
        }
    }
}

/// The request as it goes to endpoints.
struct Outgoing<'a> {
    parts: &'a http::request::Parts,
    /// HTTP/2 to the endpoint (else HTTP/1.1 with a pooled connection).
    h2: bool,
    body: RequestBody,
    repeatable: retry::Repeatable,
}

impl Outgoing<'_> {
    fn build(&self, body: Body) -> Request<Body> {
        let mut r = Request::new(body);
        *r.method_mut() = self.parts.method.clone();
        *r.uri_mut() = self.parts.uri.clone();
        *r.version_mut() = self.parts.version;
        *r.headers_mut() = self.parts.headers.clone();
        r
    }
}

/// Why the last try failed.
struct LastFailure {
    status: StatusCode,
    flags: &'static str,
    why: String,
}

/// Tries endpoints of `plan` (outlier-aware, never the same one twice) until one answers with
/// something that is not retried or the retries are spent. `Err(None)`: no endpoint could be
/// tried at all.
async fn send_with_retries(
    ctx: &Ctx,
    tunnel: &Tunnel,
    plan: &Plan,
    od: &super::config::OutlierDetection,
    mut out: Outgoing<'_>,
    record: &mut Record,
) -> Result<(Response<Incoming>, Option<Checkout>), Option<LastFailure>> {
    let retry = &plan.retry;
    let addrs: Vec<SocketAddr> = plan.candidates.iter().map(|(_, a)| *a).collect();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut last: Option<LastFailure> = None;
    for n in 0..=retry.attempts {
        if n > 0 {
            tokio::time::sleep(backoff(retry.backoff(), n)).await;
            ctx.metrics.retried();
        }
        let Some(i) = ctx.upstream.choose(&addrs, &tried) else {
            break;
        };
        let (workload, addr) = &plan.candidates[i];
        // A streamed body went with the first try: no more tries.
        let Some(body) = out.body.next() else { break };
        tried.push(*addr);
        record.attempts = n + 1;
        record.endpoint = Some(*addr);
        record.dst_workload = Some(workload.clone());
        let sent = if out.h2 {
            ctx.upstream
                .send_h2(workload, *addr, tunnel.local_ip, out.build(body))
                .await
                .map(|resp| (resp, None))
        } else {
            ctx.upstream
                .send(workload, *addr, tunnel.local_ip, out.build(body))
                .await
                .map(|(resp, checkout)| (resp, Some(checkout)))
        };
        match sent {
            Ok((resp, checkout)) => {
                let status = resp.status();
                ctx.upstream
                    .record(*addr, !status.is_server_error(), &addrs, od);
                match retry::after_answer(retry, out.repeatable, status, n) {
                    AfterAnswer::Retry => {
                        debug!(endpoint = %addr, %status, "retrying");
                        last = Some(LastFailure {
                            status,
                            flags: "URX",
                            why: format!("{addr} answered {status}"),
                        });
                    }
                    AfterAnswer::Answer { exhausted } => {
                        if exhausted {
                            // Every try answered a retryable error: the last answer goes back.
                            record.flags = "URX";
                        }
                        return Ok((resp, checkout));
                    }
                }
            }
            Err(e) => {
                ctx.upstream.record(*addr, false, &addrs, od);
                let (status, flags) = match e {
                    Failure::Connect(_) => (StatusCode::SERVICE_UNAVAILABLE, "UF"),
                    Failure::Broken(_) => (StatusCode::BAD_GATEWAY, "UC"),
                };
                let connect_failed = matches!(e, Failure::Connect(_));
                last = Some(LastFailure {
                    status,
                    flags,
                    why: format!("{addr}: {e}"),
                });
                if !retry::may_retry_failure(out.repeatable, connect_failed) {
                    break;
                }
            }
        }
    }
    Err(last)
}

/// Logs and counts a finished request.
fn finish(ctx: &Ctx, tunnel: &Tunnel, r: &Record) {
    let duration_ms = r.start.elapsed().as_secs_f64() * 1000.0;
    let svc_key = match (&r.backend, &tunnel.target) {
        (Some(b), _) => b.clone(),
        (None, Target::Service(s)) => s.key.to_string(),
        (None, Target::Workload(_)) => String::new(),
    };
    let (svc_ns, svc_host) = svc_key.split_once('/').unwrap_or(("unknown", "unknown"));
    let svc_name = svc_host.split('.').next().unwrap_or(svc_host);
    let unknown = || "unknown".to_owned();
    ctx.metrics.request(
        RequestLabels {
            source_workload: tunnel
                .src_workload
                .as_ref()
                .map_or_else(unknown, |w| w.workload_name.to_string()),
            source_workload_namespace: tunnel.client.namespace().to_owned(),
            source_principal: tunnel.client.to_string(),
            destination_workload: r
                .dst_workload
                .as_ref()
                .map_or_else(unknown, |w| w.workload_name.to_string()),
            destination_workload_namespace: r
                .dst_workload
                .as_ref()
                .map_or_else(unknown, |w| w.namespace.to_string()),
            destination_principal: r
                .dst_workload
                .as_ref()
                .map_or_else(unknown, |w| w.identity.to_string()),
            destination_service: if svc_key.is_empty() {
                unknown()
            } else {
                svc_host.to_owned()
            },
            destination_service_name: if svc_key.is_empty() {
                unknown()
            } else {
                svc_name.to_owned()
            },
            destination_service_namespace: if svc_key.is_empty() {
                unknown()
            } else {
                svc_ns.to_owned()
            },
            request_protocol: "http",
            response_code: r.status,
            response_flags: r.flags,
        },
        duration_ms,
    );
    info!(
        target: "access",
        direction = "waypoint",
        src.addr = %tunnel.peer,
        src.identity = %tunnel.client,
        src.workload = tunnel.src_workload.as_ref().map(|w| w.display_name()),
        dst.addr = %tunnel.dst,
        dst.service = r.backend.as_deref(),
        dst.endpoint = r.endpoint.map(tracing::field::display),
        dst.workload = r.dst_workload.as_ref().map(|w| w.display_name()),
        method = %r.method,
        host = %r.host,
        path = %r.path,
        protocol = r.protocol,
        status = r.status,
        flags = r.flags,
        route = r.route.as_deref(),
        attempts = r.attempts,
        authz = r.authz.as_deref(),
        request_id = %r.request_id,
        bytes_sent = r.response_bytes,
        duration_ms = (duration_ms * 1000.0).round() / 1000.0,
        error = r.error.as_deref(),
        "request"
    );
}

/// A response body that reports when it has been sent to its end (or dropped before).
struct Tracked {
    inner: Body,
    bytes: u64,
    on_end: Option<Box<dyn FnOnce(bool, u64) + Send>>,
}

impl Tracked {
    fn end(&mut self, complete: bool) {
        if let Some(f) = self.on_end.take() {
            f(complete, self.bytes);
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.end(true);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                this.end(false);
                Poll::Ready(Some(Err(e)))
            }
            None => {
                this.end(true);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let complete = self.inner.is_end_stream();
        self.end(complete);
    }
}
