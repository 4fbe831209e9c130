//! HBONE client: opens `CONNECT` streams to a destination's port 15008, pooling the TLS + HTTP/2
//! connections.
//!
//! A pooled connection is keyed by everything that makes it valid for a stream: the source
//! workload's identity, its IP (the TCP connection is made from inside that pod's netns, so it
//! carries that IP), the serial of the certificate it presented (after a rotation new streams
//! open a connection with the new certificate; old ones drain), the identity the destination must
//! present, and the destination address. Streams are spread over up to `parallel` connections
//! per key first (an idle connection is preferred, then a new one while there are fewer than
//! `parallel`): one TLS connection is driven by one task, so flows that all shared one would queue
//! behind one core's encryption. Past that, the least-loaded connection with fewer than
//! `max_streams` streams takes the next one, else a new one is opened. Connections without streams
//! for `idle_timeout` are closed.
//!
//! Every step is bounded in time (`limits.handshakeTimeoutSeconds`: TLS, HTTP/2, the answer to a
//! `CONNECT`; the TCP connect has its own), and a connection whose peer stops answering PINGs is
//! closed. A stream waiting for a connection that is still handshaking waits at most
//! [`OPENING_PATIENCE`], then opens one of its own: a destination that stalls one handshake does
//! not hold up every flow behind it.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::{RecvStream, SendStream, client::SendRequest};
use http::{Method, Request, StatusCode, Version};
use rustls::pki_types::ServerName;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument as _, debug, info, warn};

use super::{CONNECTION_WINDOW, HBONE_PORT, MAX_FRAME, STREAM_WINDOW};
use crate::{identity::Identity, tls};

/// How long a stream waits for a connection someone else is opening before it opens its own.
pub const OPENING_PATIENCE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot connect to {addr}: {cause} (is the destination's node running an HBONE agent, and can port 15008 be reached?)"
    )]
    Connect { addr: SocketAddr, cause: io::Error },
    #[error("TLS handshake with {addr} failed: {cause}")]
    Tls { addr: SocketAddr, cause: io::Error },
    #[error(
        "{step} with {addr} took longer than {timeout:?} (limits.handshakeTimeoutSeconds); is the destination's agent overloaded or stuck?"
    )]
    Timeout {
        addr: SocketAddr,
        step: &'static str,
        timeout: Duration,
    },
    #[error("HTTP/2 with {addr} failed: {cause}")]
    H2 { addr: SocketAddr, cause: h2::Error },
    #[error("destination {addr} refused the tunnel to {authority}: {status} ({meaning})")]
    Status {
        addr: SocketAddr,
        authority: SocketAddr,
        status: StatusCode,
        meaning: &'static str,
    },
    #[error("destination {addr} reset the tunnel to {authority}: {reason}")]
    Reset {
        addr: SocketAddr,
        authority: SocketAddr,
        reason: String,
    },
    /// The TLS client config could not be built (the pod's certificate or the roots).
    #[error(transparent)]
    TlsConfig(#[from] tls::Error),
}

impl Error {
    /// The destination refused by policy (401, or 403 from older Ambit agents).
    pub fn denied(&self) -> bool {
        matches!(self, Error::Status { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }
}

/// What a `CONNECT` status means, for operators.
fn status_meaning(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad request: the destination does not host that address",
        // ztunnel and Ambit answer a policy denial with 401; the TLS handshake, not a status,
        // is where an identity is refused.
        401 => {
            "unauthorized: denied by the destination's authorization policy (or the destination \
             did not accept our identity for that target)"
        }
        403 => "forbidden: denied by the destination's authorization policy",
        503 => {
            "service unavailable: the destination app refused the connection or is not \
             listening, the port is not served there, or the destination is at a limit"
        }
        _ => "unexpected status",
    }
}

/// Who is connecting to whom.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src_identity: Identity,
    pub src_ip: IpAddr,
    pub src_serial: String,
    pub dst_identity: Identity,
    /// The tunnel endpoint (destination IP, port 15008).
    pub dst: SocketAddr,
}

struct PooledConn {
    id: u64,
    sender: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    last_used: Instant,
    closed: CancellationToken,
}

/// Counters for logs, metrics and tests.
#[derive(Debug, Default, serde::Serialize)]
pub struct PoolStats {
    pub connections_opened: u64,
    pub streams_opened: u64,
    pub open_connections: usize,
}

/// The pool of HBONE connections of one agent.
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Slot>>,
    /// Woken when a connection finishes opening (or fails to), for streams waiting for one.
    opened: tokio::sync::Notify,
    max_streams: usize,
    parallel: usize,
    idle_timeout: Duration,
    handshake_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
    /// The connections' driver tasks.
    tasks: tokio_util::task::TaskTracker,
    next_id: AtomicU64,
    connections_opened: AtomicU64,
    streams_opened: AtomicU64,
}

/// An open tunnel stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
    /// Which pooled connection carries it (for logs).
    pub connection_id: u64,
    /// Released when the stream ends, so the pool knows the connection has room again.
    _guard: StreamGuard,
}

/// The connections of one pool key, and how many are being opened.
#[derive(Default)]
struct Slot {
    conns: Vec<PooledConn>,
    opening: usize,
    /// When the last of the connections being opened started.
    opening_since: Option<Instant>,
}

impl Slot {
    fn is_empty(&self) -> bool {
        self.conns.is_empty() && self.opening == 0
    }
}

enum Decision<'a> {
    Reuse(SendRequest<Bytes>, u64, StreamGuard),
    Open(Opening<'a>),
    Wait,
}

/// A connection being opened for `key`: counted in its slot's `opening` until pooled or dropped.
struct Opening<'a> {
    pool: &'a Pool,
    key: PoolKey,
    pooled: bool,
}

impl Opening<'_> {
    /// The connection is pooled (the caller holds the pool lock and the slot, and wakes the
    /// waiters once it lets go of the lock).
    fn done(mut self, slot: &mut Slot) {
        slot.opening = slot.opening.saturating_sub(1);
        self.pooled = true;
    }
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        if self.pooled {
            return;
        }
        {
            let mut conns = self.pool.lock();
            if let Some(slot) = conns.get_mut(&self.key) {
                slot.opening = slot.opening.saturating_sub(1);
                if slot.is_empty() {
                    conns.remove(&self.key);
                }
            }
        }
        self.pool.opened.notify_waiters();
    }
}

/// Holds a pooled connection's stream slot while the stream lives.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Tunnel {
    /// The stream as a byte stream (for HTTP inside the tunnel), holding its pool slot.
    pub fn into_io(self) -> super::stream::H2Stream<StreamGuard> {
        super::stream::H2Stream::new(self.send, self.recv, self._guard)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Extra HBONE headers Istio peers send and understand.
pub struct TunnelHeaders<'a> {
    /// The original client's IP, sent as `Forwarded: for=...`.
    pub client_ip: IpAddr,
    /// W3C trace context (the agent starts one per connection, as ztunnel does).
    pub traceparent: Option<&'a str>,
    /// W3C baggage describing the source workload (Istio peers read `k8s.*` keys from it).
    pub baggage: Option<&'a str>,
    /// The hostname of the service the client dialed, sent as `Forwarded: ...;host=` (ztunnel
    /// reads it for the destination's `destination_service` label).
    pub service_host: Option<&'a str>,
}

impl Pool {
    pub fn new(hbone: &crate::config::HboneConfig, limits: &crate::config::Limits) -> Arc<Pool> {
        Arc::new(Pool {
            conns: Mutex::new(HashMap::new()),
            opened: tokio::sync::Notify::new(),
            max_streams: hbone.max_streams_per_connection.max(1),
            parallel: hbone.parallel_connections.max(1),
            idle_timeout: hbone.idle_timeout,
            handshake_timeout: limits.handshake_timeout,
            keepalive_interval: hbone.keepalive_interval,
            keepalive_timeout: hbone.keepalive_timeout,
            tasks: tokio_util::task::TaskTracker::new(),
            next_id: AtomicU64::new(1),
            connections_opened: AtomicU64::new(0),
            streams_opened: AtomicU64::new(0),
        })
    }

    pub fn stats(&self) -> PoolStats {
        let open = self.lock().values().map(|s| s.conns.len()).sum();
        PoolStats {
            connections_opened: self.connections_opened.load(Ordering::Relaxed),
            streams_opened: self.streams_opened.load(Ordering::Relaxed),
            open_connections: open,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PoolKey, Slot>> {
        // A panic while holding the lock cannot leave the map inconsistent (every update is a
        // single push/retain), so a poisoned lock is still usable.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the next stream for `key` goes (see the module docs): a pooled connection, a new
    /// one (counted as opening until it is pooled or fails), or wait for one being opened.
    fn decide(&self, key: &PoolKey) -> Decision<'_> {
        let mut conns = self.lock();
        if !conns.contains_key(key) {
            conns.insert(key.clone(), Slot::default());
        }
        let Some(slot) = conns.get_mut(key) else {
            return Decision::Wait;
        };
        let list = &mut slot.conns;
        list.retain(|c| !c.closed.is_cancelled());
        let idle = list
            .iter()
            .position(|c| c.active.load(Ordering::Acquire) == 0);
        let pick = match idle {
            Some(i) => Some(i),
            None if list.len() + slot.opening < self.parallel => None,
            None => list
                .iter()
                .enumerate()
                .map(|(i, c)| (c.active.load(Ordering::Acquire), i))
                .filter(|(active, _)| *active < self.max_streams)
                .min()
                .map(|(_, i)| i),
        };
        let Some(pick) = pick else {
            let patient = slot
                .opening_since
                .is_some_and(|at| at.elapsed() < OPENING_PATIENCE);
            if list.len() + slot.opening >= self.parallel
                && slot.opening > 0
                && (patient || slot.opening >= self.parallel)
            {
                // Every connection is full or still handshaking: wait for one to be ready
                // rather than start yet another handshake (unless the ones opening are slow,
                // and then at most `parallel` more).
                return Decision::Wait;
            }
            slot.opening += 1;
            slot.opening_since = Some(Instant::now());
            return Decision::Open(Opening {
                pool: self,
                key: key.clone(),
                pooled: false,
            });
        };
        let conn = &mut list[pick];
        conn.active.fetch_add(1, Ordering::AcqRel);
        conn.last_used = Instant::now();
        Decision::Reuse(
            conn.sender.clone(),
            conn.id,
            StreamGuard(conn.active.clone()),
        )
    }

    /// Opens a `CONNECT` stream for `authority` (the original destination) to `key.dst`,
    /// reusing a pooled connection when one has room.
    pub async fn connect(
        &self,
        key: PoolKey,
        socket: impl FnOnce() -> std::io::Result<tokio::net::TcpSocket>,
        tls_config: impl FnOnce() -> Result<Arc<rustls::ClientConfig>, tls::Error>,
        authority: SocketAddr,
        headers: TunnelHeaders<'_>,
    ) -> Result<Tunnel, Error> {
        let opening = loop {
            let notified = self.opened.notified();
            tokio::pin!(notified);
            // Registered before deciding, so an opening that finishes in between still wakes us.
            notified.as_mut().enable();
            match self.decide(&key) {
                Decision::Reuse(sender, id, guard) => {
                    match self.request(sender, key.dst, authority, &headers).await {
                        Ok((send, recv)) => {
                            self.streams_opened.fetch_add(1, Ordering::Relaxed);
                            return Ok(Tunnel {
                                send,
                                recv,
                                connection_id: id,
                                _guard: guard,
                            });
                        }
                        // The pooled connection died (GOAWAY, peer closed it while idle): nothing
                        // was sent for this stream yet, so forget that connection and try again.
                        Err(Error::H2 { cause, .. }) => {
                            debug!(connection = id, error = %cause, "pooled HBONE connection unusable; opening a new one");
                            self.evict(&key, id);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Decision::Open(opening) => break opening,
                // Woken when a connection is ready, or after the patience to open our own.
                Decision::Wait => {
                    let _ = tokio::time::timeout(OPENING_PATIENCE, notified).await;
                }
            }
        };
        let config = tls_config()?;
        let (sender, id, guard) = self.open(&key, socket, config, opening).await?;
        self.streams_opened.fetch_add(1, Ordering::Relaxed);
        let (send, recv) = self.request(sender, key.dst, authority, &headers).await?;
        Ok(Tunnel {
            send,
            recv,
            connection_id: id,
            _guard: guard,
        })
    }

    /// Drops connection `id` of `key` from the pool.
    fn evict(&self, key: &PoolKey, id: u64) {
        let mut conns = self.lock();
        if let Some(slot) = conns.get_mut(key) {
            slot.conns.retain(|c| c.id != id);
            if slot.is_empty() {
                conns.remove(key);
            }
        }
    }

    /// Opens and pools a connection for `key`; `opening` is released either way (dropped on an
    /// error, which wakes the streams waiting for it to try themselves).
    async fn open(
        &self,
        key: &PoolKey,
        socket: impl FnOnce() -> std::io::Result<tokio::net::TcpSocket>,
        config: Arc<rustls::ClientConfig>,
        opening: Opening<'_>,
    ) -> Result<(SendRequest<Bytes>, u64, StreamGuard), Error> {
        let addr = key.dst;
        let socket = socket().map_err(|cause| Error::Connect { addr, cause })?;
        let tcp = crate::sockets::connect(socket, addr)
            .await
            .map_err(|cause| Error::Connect { addr, cause })?;
        let (sender, mut connection) = handshake(tcp, config, addr, self.handshake_timeout).await?;

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let closed = CancellationToken::new();
        let done = closed.clone();
        let span = tracing::info_span!("hbone_conn", id, dst = %addr);
        let alive = super::keepalive(
            connection.ping_pong(),
            self.keepalive_interval,
            self.keepalive_timeout,
        );
        self.tasks.spawn(
            async move {
                tokio::select! {
                    r = &mut connection => {
                        if let Err(e) = r {
                            debug!(error = %e, "HBONE connection ended with an error");
                        }
                    }
                    () = alive => warn!("HBONE destination stopped answering pings; connection closed"),
                }
                done.cancel();
            }
            .instrument(span),
        );
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        info!(
            connection = id,
            src.identity = %key.src_identity,
            src.serial = %key.src_serial,
            dst.identity = %key.dst_identity,
            dst.addr = %addr,
            "hbone connection opened"
        );

        let active = Arc::new(AtomicUsize::new(1));
        {
            let mut conns = self.lock();
            let slot = conns.entry(key.clone()).or_default();
            slot.conns.push(PooledConn {
                id,
                sender: sender.clone(),
                active: active.clone(),
                last_used: Instant::now(),
                closed,
            });
            // Pooled: it no longer counts as opening.
            opening.done(slot);
        }
        self.opened.notify_waiters();
        Ok((sender, id, StreamGuard(active)))
    }

    /// Closes connections that have had no streams for the idle timeout. Run periodically.
    pub fn reap_idle(&self) {
        let now = Instant::now();
        let mut conns = self.lock();
        for slot in conns.values_mut() {
            slot.conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && now.duration_since(c.last_used) >= self.idle_timeout;
                if idle {
                    debug!(connection = c.id, "closing idle HBONE connection");
                }
                // Dropping the last sender lets h2 close the connection gracefully.
                !idle && !c.closed.is_cancelled()
            });
        }
        conns.retain(|_, slot| !slot.is_empty());
    }

    /// Runs [`Pool::reap_idle`] until `shutdown`.
    pub async fn run_reaper(self: Arc<Self>, shutdown: CancellationToken) {
        let period =
            (self.idle_timeout / 2).clamp(Duration::from_millis(100), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.reap_idle(),
            }
        }
    }
}

/// TLS and HTTP/2 handshakes on a connected socket, each within `timeout`. The returned future
/// drives the connection and must be spawned.
pub async fn handshake(
    tcp: tokio::net::TcpStream,
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<
    (
        SendRequest<Bytes>,
        h2::client::Connection<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, Bytes>,
    ),
    Error,
> {
    let connector = tokio_rustls::TlsConnector::from(config);
    // Identities are checked by our verifier; the name only has to be syntactically valid.
    let name = ServerName::IpAddress(addr.ip().into());
    let timed_out = |step| Error::Timeout {
        addr,
        step,
        timeout,
    };
    let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
        .await
        .map_err(|_| timed_out("the TLS handshake"))?
        .map_err(|cause| Error::Tls { addr, cause })?;
    tokio::time::timeout(
        timeout,
        h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_send_buffer_size(MAX_FRAME as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls),
    )
    .await
    .map_err(|_| timed_out("the HTTP/2 handshake"))?
    .map_err(|cause| Error::H2 { addr, cause })
}

impl Pool {
    /// [`request`], waiting at most the handshake timeout for a stream and for the answer.
    async fn request(
        &self,
        sender: SendRequest<Bytes>,
        addr: SocketAddr,
        authority: SocketAddr,
        headers: &TunnelHeaders<'_>,
    ) -> Result<(SendStream<Bytes>, RecvStream), Error> {
        tokio::time::timeout(
            self.handshake_timeout,
            request(sender, addr, authority, headers),
        )
        .await
        .map_err(|_| Error::Timeout {
            addr,
            step: "the answer to CONNECT",
            timeout: self.handshake_timeout,
        })?
    }
}

/// Sends a `CONNECT` for `authority` on `sender`'s connection to `addr` and waits for a 200.
pub async fn request(
    mut sender: SendRequest<Bytes>,
    addr: SocketAddr,
    authority: SocketAddr,
    headers: &TunnelHeaders<'_>,
) -> Result<(SendStream<Bytes>, RecvStream), Error> {
    let h2err = |cause| Error::H2 { addr, cause };
    let mut forwarded = match headers.client_ip {
        IpAddr::V4(ip) => format!("for={ip}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    if let Some(host) = headers.service_host {
        forwarded.push_str(";host=");
        forwarded.push_str(host);
    }
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .version(Version::HTTP_2)
        .header("forwarded", forwarded);
    if let Some(tp) = headers.traceparent {
        req = req.header("traceparent", tp);
    }
    if let Some(b) = headers.baggage {
        req = req.header("baggage", b);
    }
    let req = req.body(()).map_err(|e| Error::Connect {
        addr,
        cause: io::Error::other(format!("BUG: cannot build CONNECT request: {e}")),
    })?;
    sender = sender.ready().await.map_err(h2err)?;
    let (response, send) = sender.send_request(req, false).map_err(h2err)?;
    let response = response.await.map_err(|e| match e.reason() {
        Some(reason) => Error::Reset {
            addr,
            authority,
            reason: reason.to_string(),
        },
        None => h2err(e),
    })?;
    let status = response.status();
    if status != StatusCode::OK {
        warn!(%status, %authority, "HBONE CONNECT refused");
        return Err(Error::Status {
            addr,
            authority,
            status,
            meaning: status_meaning(status),
        });
    }
    Ok((send, response.into_body()))
}

/// The tunnel endpoint for a destination workload IP.
pub fn tunnel_addr(ip: IpAddr) -> SocketAddr {
    SocketAddr::new(ip, HBONE_PORT)
}
