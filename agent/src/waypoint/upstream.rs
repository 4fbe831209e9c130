//! Sending requests to endpoints: HTTP/1.1 inside HBONE streams (or plain TCP to workloads
//! outside the mesh), with kept-alive connections per endpoint on top of the shared HBONE pool,
//! and outlier detection (an endpoint that keeps failing is skipped for a while).

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{body::Incoming, client::conn::http1::SendRequest};
use hyper_util::rt::TokioIo;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{config::OutlierDetection, metrics::WaypointMetrics};
use crate::proxy::capture::{Capture, Source};
use crate::{
    identity::{Identity, manager::CertManager},
    proxy,
    redirect::Netns,
    state::Workload,
    tls::{self, TrustRoots},
    tunnel::client::{Pool, PoolKey, TunnelHeaders, tunnel_addr},
};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Request and response bodies as the waypoint passes them on.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Idle kept-alive connections per endpoint, at most this many each.
const MAX_IDLE_PER_ENDPOINT: usize = 32;
/// The longest an endpoint is ejected, however often it was before (as Envoy's default).
const MAX_EJECTION: Duration = Duration::from_secs(300);
/// Outlier state of an endpoint that has been healthy this long is forgotten.
const OUTLIER_MEMORY: Duration = Duration::from_secs(600);

/// Why a try failed.
#[derive(Debug)]
pub enum Failure {
    /// No connection could be opened: nothing of the request was sent.
    Connect(String),
    /// The connection broke while the request was in flight.
    Broken(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "connect failed: {e}"),
            Failure::Broken(e) => write!(f, "connection broke: {e}"),
        }
    }
}

#[derive(Default)]
struct Outlier {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// A kept-alive HTTP/1.1 connection waiting for the next request to its endpoint.
struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

/// A kept-alive connection lent to one request; give it back with [`Checkout::done`] once the
/// response has been read to its end.
pub struct Checkout {
    upstream: Arc<Upstream>,
    addr: SocketAddr,
    sender: SendRequest<Body>,
}

impl Checkout {
    pub fn done(self) {
        if self.sender.is_closed() {
            return;
        }
        let mut idle = lock(&self.upstream.idle);
        let list = idle.entry(self.addr).or_default();
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                sender: self.sender,
                since: Instant::now(),
            });
        }
    }
}

/// Everything the waypoint needs to reach endpoints.
pub struct Upstream {
    pub pool: Arc<Pool>,
    sockets: Sockets,
    certs: Arc<CertManager>,
    roots: TrustRoots,
    identity: Identity,
    metrics: Arc<WaypointMetrics>,
    /// Kept-alive connections unused this long are closed (each holds an HBONE stream).
    idle_timeout: Duration,
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// One multiplexed HTTP/2 connection per endpoint, for gRPC.
    h2: Mutex<HashMap<SocketAddr, hyper::client::conn::http2::SendRequest<Body>>>,
    outliers: Mutex<HashMap<SocketAddr, Outlier>>,
    /// The HTTP connection drivers, so that shutdown can wait for them ([`Upstream::close`]).
    tasks: TaskTracker,
}

/// Where the waypoint's sockets to endpoints come from: `capture` (the kernel; loopback in the
/// in-process tests), in the waypoint's netns.
pub struct Sockets {
    pub capture: Arc<dyn Capture>,
    pub netns: Netns,
}

impl Sockets {
    fn socket(&self, dst: SocketAddr, local_ip: IpAddr) -> std::io::Result<tokio::net::TcpSocket> {
        self.capture.socket(&self.netns, dst, Source::Pod(local_ip))
    }
}

/// A byte stream to an endpoint: an HBONE stream, or TCP for workloads outside the mesh.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Upstream {
    pub fn new(
        pool: Arc<Pool>,
        sockets: Sockets,
        certs: Arc<CertManager>,
        roots: TrustRoots,
        identity: Identity,
        metrics: Arc<WaypointMetrics>,
        idle_timeout: Duration,
    ) -> Arc<Upstream> {
        Arc::new(Upstream {
            pool,
            sockets,
            certs,
            roots,
            identity,
            metrics,
            idle_timeout,
            idle: Mutex::default(),
            h2: Mutex::default(),
            outliers: Mutex::default(),
            tasks: TaskTracker::new(),
        })
    }

    /// After the drain: drops the kept-alive connections and gives their drivers `patience` to
    /// finish.
    pub async fn close(&self, patience: Duration) {
        lock(&self.idle).clear();
        lock(&self.h2).clear();
        self.tasks.close();
        if tokio::time::timeout(patience, self.tasks.wait())
            .await
            .is_err()
        {
            debug!(
                open = self.tasks.len(),
                "upstream connections still open at shutdown"
            );
        }
    }

    /// Closes kept-alive connections idle past the timeout and forgets endpoints that have
    /// long been healthy (endpoints come and go). Run periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        {
            let mut idle = lock(&self.idle);
            for list in idle.values_mut() {
                list.retain(|i| {
                    !i.sender.is_closed() && now.duration_since(i.since) < self.idle_timeout
                });
            }
            idle.retain(|_, list| !list.is_empty());
        }
        lock(&self.h2).retain(|_, s| !s.is_closed());
        lock(&self.outliers).retain(|_, o| {
            o.consecutive > 0 || o.ejected_until.is_some_and(|t| t + OUTLIER_MEMORY > now)
        });
    }

    /// Runs [`Upstream::reap`] until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.reap(),
            }
        }
    }

    /// How many endpoints are ejected now.
    pub fn ejected_now(&self) -> usize {
        let now = Instant::now();
        lock(&self.outliers)
            .values()
            .filter(|o| o.ejected_until.is_some_and(|t| t > now))
            .count()
    }

    /// Which of `candidates` to try: not ejected and not tried yet if possible, else not tried,
    /// else any (a service whose endpoints are all ejected still gets its traffic: "panic mode").
    pub fn choose(&self, candidates: &[SocketAddr], tried: &[SocketAddr]) -> Option<usize> {
        if candidates.is_empty() {
            return None;
        }
        let now = Instant::now();
        let outliers = lock(&self.outliers);
        let ejected = |a: &SocketAddr| {
            outliers
                .get(a)
                .and_then(|o| o.ejected_until)
                .is_some_and(|t| t > now)
        };
        let fresh: Vec<usize> = (0..candidates.len())
            .filter(|i| !tried.contains(&candidates[*i]))
            .collect();
        let healthy: Vec<usize> = fresh
            .iter()
            .copied()
            .filter(|i| !ejected(&candidates[*i]))
            .collect();
        let pool = if !healthy.is_empty() {
            healthy
        } else if !fresh.is_empty() {
            fresh
        } else {
            (0..candidates.len()).collect()
        };
        Some(pool[fastrand::usize(0..pool.len())])
    }

    /// Records a try's outcome at `addr`, one of `peers` (the service's endpoints, for the
    /// ejection limit). A failure streak of `od.consecutive_5xx_errors` ejects the endpoint.
    pub fn record(&self, addr: SocketAddr, ok: bool, peers: &[SocketAddr], od: &OutlierDetection) {
        let mut outliers = lock(&self.outliers);
        if ok {
            if let Some(o) = outliers.get_mut(&addr) {
                o.consecutive = 0;
            }
            return;
        }
        let now = Instant::now();
        let ejected_peers = peers
            .iter()
            .filter(|p| {
                outliers
                    .get(p)
                    .and_then(|o| o.ejected_until)
                    .is_some_and(|t| t > now)
            })
            .count();
        let o = outliers.entry(addr).or_default();
        o.consecutive += 1;
        if od.consecutive_5xx_errors == 0 || o.consecutive < od.consecutive_5xx_errors {
            return;
        }
        if o.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        let limit = (peers.len() * od.max_ejection_percent as usize / 100).max(1);
        if ejected_peers >= limit {
            debug!(endpoint = %addr, "not ejecting: the service's ejection limit is reached");
            return;
        }
        o.ejections += 1;
        o.consecutive = 0;
        let base = od.base_ejection_time.duration();
        let length = (base * o.ejections).min(MAX_EJECTION.max(base));
        o.ejected_until = Some(now + length);
        self.metrics.ejected();
        warn!(
            endpoint = %addr,
            failures = od.consecutive_5xx_errors,
            ejected_for_s = length.as_secs_f64(),
            "endpoint ejected by outlier detection: it keeps failing"
        );
    }

    /// Sends `req` to `workload` at `addr` on a kept-alive connection or a new one (HBONE when
    /// the workload is in the mesh, verifying its identity). A kept-alive connection the
    /// endpoint closed before the request went out is replaced by a new one, transparently.
    /// Tunnels are shared by clients, so their `Forwarded` header names the waypoint (`local_ip`);
    /// the request itself carries the client in `x-forwarded-for`.
    pub async fn send(
        self: &Arc<Self>,
        workload: &Workload,
        addr: SocketAddr,
        local_ip: IpAddr,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Checkout), Failure> {
        let (mut sender, pooled) = match self.take_idle(addr) {
            Some(s) => (s, true),
            None => (self.open(workload, addr, local_ip).await?, false),
        };
        let req = match sender.try_send_request(req).await {
            Ok(resp) => return Ok(self.checkout(resp, addr, sender)),
            Err(mut e) => match e.take_message() {
                // Not sent: the kept-alive connection was closed under us. Try a fresh one.
                Some(req) if pooled => req,
                _ => return Err(Failure::Broken(e.into_error().to_string())),
            },
        };
        let mut sender = self.open(workload, addr, local_ip).await?;
        match sender.try_send_request(req).await {
            Ok(resp) => Ok(self.checkout(resp, addr, sender)),
            Err(mut e) => {
                let unsent = e.take_message().is_some();
                let cause = e.into_error();
                Err(if unsent {
                    Failure::Connect(format!(
                        "{addr} closed a new connection before the request: {cause}"
                    ))
                } else {
                    Failure::Broken(cause.to_string())
                })
            }
        }
    }

    fn checkout(
        self: &Arc<Self>,
        resp: Response<Incoming>,
        addr: SocketAddr,
        sender: SendRequest<Body>,
    ) -> (Response<Incoming>, Checkout) {
        (
            resp,
            Checkout {
                upstream: self.clone(),
                addr,
                sender,
            },
        )
    }

    fn take_idle(&self, addr: SocketAddr) -> Option<SendRequest<Body>> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(i) = list.pop() {
            if !i.sender.is_closed()
                && i.sender.is_ready()
                && now.duration_since(i.since) < self.idle_timeout
            {
                return Some(i.sender);
            }
        }
        None
    }

    async fn open(
        &self,
        workload: &Workload,
        addr: SocketAddr,
        local_ip: IpAddr,
    ) -> Result<SendRequest<Body>, Failure> {
        let io = self.connect_io(workload, addr, local_ip).await?;
        handshake(io, addr, &self.tasks).await
    }

    /// Sends a gRPC request (HTTP/2 end to end) to `workload` at `addr`, on the endpoint's one
    /// multiplexed HTTP/2 connection (opened on first use, inside HBONE as for HTTP/1.1).
    pub async fn send_h2(
        &self,
        workload: &Workload,
        addr: SocketAddr,
        local_ip: IpAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, Failure> {
        let existing = lock(&self.h2)
            .get(&addr)
            .filter(|s| !s.is_closed())
            .cloned();
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let io = self.connect_io(workload, addr, local_ip).await?;
                let (sender, conn) =
                    hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| Failure::Connect(format!("HTTP/2 with {addr}: {e}")))?;
                self.tasks.spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(endpoint = %addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                lock(&self.h2).insert(addr, sender.clone());
                sender
            }
        };
        if sender.ready().await.is_err() {
            lock(&self.h2).remove(&addr);
            return Err(Failure::Connect(format!(
                "the HTTP/2 connection to {addr} closed"
            )));
        }
        sender
            .send_request(req)
            .await
            .map_err(|e| Failure::Broken(e.to_string()))
    }

    async fn connect_io(
        &self,
        workload: &Workload,
        addr: SocketAddr,
        local_ip: IpAddr,
    ) -> Result<Box<dyn Io>, Failure> {
        if !workload.hbone {
            let socket = self
                .sockets
                .socket(addr, local_ip)
                .map_err(|e| Failure::Connect(format!("{addr}: {e}")))?;
            let tcp = proxy::connect(socket, addr)
                .await
                .map_err(|e| Failure::Connect(format!("{addr}: {e}")))?;
            return Ok(Box::new(tcp));
        }
        let cert = self.certs.current(&self.identity).ok_or_else(|| {
            Failure::Connect(format!(
                "no certificate for the waypoint's identity {} yet (is the CA reachable?)",
                self.identity
            ))
        })?;
        let key = PoolKey {
            src_identity: self.identity.clone(),
            src_ip: local_ip,
            src_serial: cert.serial.clone(),
            dst_identity: workload.identity.clone(),
            dst: tunnel_addr(addr.ip()),
        };
        let expected = vec![workload.identity.clone()];
        let tunnel_to = key.dst;
        let tunnel = self
            .pool
            .connect(
                key,
                || self.sockets.socket(tunnel_to, local_ip),
                || tls::client_config(&cert, &self.roots, expected),
                addr,
                TunnelHeaders {
                    client_ip: local_ip,
                    traceparent: None,
                    baggage: None,
                    service_host: None,
                },
            )
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        Ok(Box::new(tunnel.into_io()))
    }
}

async fn handshake(
    io: Box<dyn Io>,
    addr: SocketAddr,
    tasks: &TaskTracker,
) -> Result<SendRequest<Body>, Failure> {
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(|e| Failure::Connect(format!("HTTP/1.1 with {addr}: {e}")))?;
    tasks.spawn(async move {
        if let Err(e) = conn.await {
            debug!(endpoint = %addr, error = %e, "upstream HTTP connection ended");
        }
    });
    debug!(endpoint = %addr, "upstream HTTP connection opened");
    Ok(sender)
}

/// How long to wait before retry `n` (1-based): the rule's backoff, doubled each time, at most
/// one second.
pub fn backoff(base: Duration, n: u32) -> Duration {
    (base * 2u32.saturating_pow(n.saturating_sub(1))).min(Duration::from_secs(1))
}
