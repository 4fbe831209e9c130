//! The DNS proxy's I/O ([`crate::dns`] decides): the listeners in each pod whose DNS the agent serves (UDP 127.0.0.1 / [::1]:15053), DNS
//! over TCP (a captured connection to port 53), and forwarding to the pod's resolver.
//!
//! Bounded: at most [`MAX_INFLIGHT`] queries are resolved at once across pods (beyond it a query
//! gets SERVFAIL at once and `ambit_dns_requests{outcome="limit"}` counts it); a TCP connection
//! carries at most [`MAX_TCP_QUERIES`] queries, each read within [`TCP_IDLE`]; forwarded
//! queries wait [`crate::config::DnsSettings::timeout`] for their answer.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use ambit_common::{AGENT_MARK, DNS_PORT};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpStream, UdpSocket},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{PodInfo, ProxyContext};
use crate::{
    config::DnsSettings,
    dns::{Reply, answer, fit_udp, format_error, id_of, server_failure, udp_limit},
    metrics::DnsMetrics,
    redirect::Netns,
};

/// Queries being resolved at once, across the node's pods.
pub const MAX_INFLIGHT: usize = 1024;
/// Queries one DNS-over-TCP connection may carry.
pub const MAX_TCP_QUERIES: usize = 128;
/// How long a DNS-over-TCP connection may sit between queries.
pub const TCP_IDLE: Duration = Duration::from_secs(10);

/// The DNS proxy's settings and in-flight bound (its counters are in [`crate::metrics`]).
pub struct Dns {
    pub settings: DnsSettings,
    inflight: Arc<Semaphore>,
}

impl Dns {
    /// Without `upstreams` in `settings`, the nameservers of the agent's `/etc/resolv.conf`.
    pub fn new(mut settings: DnsSettings) -> Dns {
        if settings.upstreams.is_empty() {
            settings.upstreams = std::fs::read_to_string("/etc/resolv.conf")
                .map(|t| nameservers(&t))
                .unwrap_or_default();
        }
        Dns {
            settings,
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        }
    }
}

/// The `nameserver` lines of a resolv.conf, on port 53 (at most 3, as the stub resolver).
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .take(3)
        .collect()
}

fn metrics(ctx: &ProxyContext) -> &DnsMetrics {
    &ctx.live.metrics().dns
}

/// Binds the pod's DNS listeners (UDP 127.0.0.1:15053, and [::1]:15053 where the pod has
/// IPv6). Must run inside the pod's netns.
pub fn bind() -> io::Result<Vec<std::net::UdpSocket>> {
    let mut sockets = vec![udp_socket(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        DNS_PORT,
    )))?];
    match udp_socket(SocketAddr::from((Ipv6Addr::LOCALHOST, DNS_PORT))) {
        Ok(s) => sockets.push(s),
        Err(e) => debug!(error = %e, "no IPv6 DNS listener (pod without IPv6?)"),
    }
    Ok(sockets)
}

/// A marked, non-blocking UDP socket bound to `addr` (the eBPF programs leave it alone).
fn udp_socket(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    s.set_mark(AGENT_MARK)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Serves `socket`, one of `pod`'s DNS listeners, until `cancel`.
pub async fn serve_udp(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    socket: std::net::UdpSocket,
    cancel: CancellationToken,
) {
    let socket = match UdpSocket::from_std(socket) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            warn!(pod = %pod.key, error = %e, "cannot serve the pod's DNS listener");
            return;
        }
    };
    // One byte more than the largest query kept: a longer datagram is known to be too long.
    let mut buf = vec![0u8; crate::dns::UDP_MAX + 1];
    loop {
        let (n, from) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(r) => r,
                Err(e) => {
                    debug!(pod = %pod.key, error = %e, "DNS receive failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let m = metrics(&ctx);
        m.requests.fetch_add(1, Ordering::Relaxed);
        if n > crate::dns::UDP_MAX {
            m.malformed.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = format_error(&buf[..n]) {
                let _ = socket.send_to(&r, from).await;
            }
            continue;
        }
        let query = buf[..n].to_vec();
        let Ok(permit) = ctx.dns.inflight.clone().try_acquire_owned() else {
            m.limited.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = server_failure(&query) {
                let _ = socket.send_to(&r, from).await;
            }
            continue;
        };
        let (ctx2, pod, socket) = (ctx.clone(), pod.clone(), socket.clone());
        ctx.connections.spawn(async move {
            let _permit = permit;
            if let Some(reply) = resolve(&ctx2, &pod, &query, false).await {
                let reply = fit_udp(reply, udp_limit(&query));
                if let Err(e) = socket.send_to(&reply, from).await {
                    debug!(pod = %pod.key, error = %e, "cannot send the DNS answer");
                }
            }
        });
    }
}

/// Serves a captured TCP connection of `pod` to `resolver`:53 (DNS over TCP: each message
/// prefixed by its 2-byte length), at most [`MAX_TCP_QUERIES`] queries.
pub async fn serve_tcp(
    ctx: &ProxyContext,
    pod: &PodInfo,
    mut client: TcpStream,
    resolver: SocketAddr,
) -> io::Result<u64> {
    let mut answered = 0;
    for _ in 0..MAX_TCP_QUERIES {
        let query = match tokio::time::timeout(TCP_IDLE, read_message(&mut client)).await {
            Ok(Ok(Some(q))) => q,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(e)) => return Err(e),
        };
        metrics(ctx).requests.fetch_add(1, Ordering::Relaxed);
        let Ok(_permit) = ctx.dns.inflight.clone().try_acquire_owned() else {
            metrics(ctx).limited.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = server_failure(&query) {
                write_message(&mut client, &r).await?;
            }
            continue;
        };
        let reply = resolve_with(ctx, pod, &query, true, Some(resolver)).await;
        let Some(reply) = reply else { break };
        write_message(&mut client, &reply).await?;
        answered += 1;
    }
    Ok(answered)
}

async fn read_message(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut m).await?;
    Ok(Some(m))
}

async fn write_message(s: &mut TcpStream, m: &[u8]) -> io::Result<()> {
    let len = u16::try_from(m.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(m.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(m);
    s.write_all(&out).await
}

/// The reply to `query` from `pod` (`None`: nothing to answer, the query had no header).
async fn resolve(ctx: &ProxyContext, pod: &PodInfo, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
    resolve_with(ctx, pod, query, tcp, None).await
}

async fn resolve_with(
    ctx: &ProxyContext,
    pod: &PodInfo,
    query: &[u8],
    tcp: bool,
    resolver: Option<SocketAddr>,
) -> Option<Vec<u8>> {
    let m = metrics(ctx);
    let judged = answer(query, &ctx.workloads.snapshot());
    match judged {
        Reply::Mesh { reply, name, addrs } => {
            m.mesh.fetch_add(1, Ordering::Relaxed);
            debug!(target: "access", kind = "dns", pod = %pod.key, name, answer = ?addrs, "answered from the mesh");
            Some(reply)
        }
        Reply::Malformed { reply, why } => {
            m.malformed.fetch_add(1, Ordering::Relaxed);
            debug!(target: "access", kind = "dns", pod = %pod.key, error = why, "malformed DNS query");
            reply
        }
        Reply::Forward { name } => {
            m.forwarded.fetch_add(1, Ordering::Relaxed);
            let upstream = resolver
                .or_else(|| ctx.capture.dns_resolver(&pod.netns))
                .or_else(|| ctx.dns.settings.upstreams.first().copied());
            let Some(upstream) = upstream else {
                warn!(pod = %pod.key, name, "no resolver known for the pod and no dns.upstreams; SERVFAIL");
                m.upstream_failures.fetch_add(1, Ordering::Relaxed);
                return server_failure(query);
            };
            let start = Instant::now();
            let timeout = ctx.dns.settings.timeout;
            let forwarded = if tcp {
                forward_tcp(&pod.netns, upstream, query, timeout).await
            } else {
                forward_udp(&pod.netns, upstream, query, timeout).await
            };
            match forwarded {
                Ok(reply) => {
                    m.upstream_answered(start.elapsed());
                    debug!(target: "access", kind = "dns", pod = %pod.key, name, %upstream, "forwarded");
                    Some(reply)
                }
                Err(e) => {
                    m.upstream_failures.fetch_add(1, Ordering::Relaxed);
                    debug!(target: "access", kind = "dns", pod = %pod.key, name, %upstream, error = %e, "the resolver did not answer; SERVFAIL");
                    server_failure(query)
                }
            }
        }
    }
}

/// Sends `query` to `upstream` from inside the pod (a marked socket, so it is not captured
/// again) and waits up to `timeout` for the answer with its id.
async fn forward_udp(
    netns: &Netns,
    upstream: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let any: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = netns.run(|| udp_socket(any)).map_err(io::Error::other)??;
    let socket = UdpSocket::from_std(socket)?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let id = id_of(query);
    let wait = async {
        // Bounded like the client side: at most UDP_MAX bytes are kept per query in flight. A
        // longer answer is cut here, and `fit_udp` then sends the client a TC header, so it
        // asks again over TCP.
        let mut buf = vec![0u8; crate::dns::UDP_MAX + 1];
        loop {
            let n = socket.recv(&mut buf).await?;
            if id_of(&buf[..n]) == id {
                return Ok(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(timeout, wait)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Sends `query` to `upstream` over TCP from inside the pod and reads one answer.
async fn forward_tcp(
    netns: &Netns,
    upstream: SocketAddr,
    query: &[u8],
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let exchange = async {
        let socket = super::upstream_socket(netns, upstream, None)?;
        let mut s = socket.connect(upstream).await?;
        write_message(&mut s, query).await?;
        read_message(&mut s)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "closed without an answer"))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}

/// Whether DNS over TCP to `dst` from `pod` is the proxy's.
pub fn is_dns(pod: &PodInfo, dst: SocketAddr) -> bool {
    pod.dns && dst.port() == 53
}

/// The addresses `name` resolves to in the mesh, for `ambitctl explain`.
pub fn explain(snapshot: &crate::state::Snapshot, name: &str) -> Option<Vec<IpAddr>> {
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    crate::dns::lookup(snapshot, &name).map(|d| d.vips.clone())
}

#[cfg(test)]
mod tests {
    #[test]
    fn resolv_conf_nameservers_are_read_on_port_53() {
        let text = "# generated\nsearch default.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.96.0.10\nnameserver fd00::a\noptions ndots:5\nnameserver bad\n";
        assert_eq!(
            super::nameservers(text),
            [
                "10.96.0.10:53".parse().expect("addr"),
                "[fd00::a]:53".parse().expect("addr")
            ]
        );
    }
}
