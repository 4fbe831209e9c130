//! Same node: a connection from one of this node's pods to another, carried by the kernel.
//!
//! Outbound has resolved the destination (service VIP picked, no waypoint) to a workload that is
//! a pod this agent serves, with the identity the state gives it. The inbound half is then the
//! same as for HBONE, with the source pod's identity (the agent's own pod: nothing to verify on
//! a wire): synced policy, waypoint rule, L4 policy, a transparent connection to the app as the
//! client. Once both sockets exist, and before a byte is read, they are spliced
//! (`redirect::splice`): the bytes go socket to socket in the kernel, without TLS, as they never
//! leave the node.
//!
//! The agent keeps both sockets and watches them (one epoll set per connection, for the peer's
//! FIN and errors only, so data never wakes it): a FIN is passed on once every byte before it
//! has been sent on (`SHUT_WR` on the other socket), a reset resets the other side, and a
//! policy change that no longer allows the connection resets both. Byte counts come from
//! `TCP_INFO`: refreshed every second for `ambitctl connections`, exact at the close for the
//! access log and the Istio metrics. Both access lines are written, as for HBONE: the source's
//! (outbound) and the destination's (inbound), with path `kernel`.

use std::{
    io,
    net::{Shutdown, SocketAddr, TcpStream as StdStream},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::{
    io::{Interest, unix::AsyncFd},
    net::TcpStream,
};
use tracing::{debug, warn};

use super::{
    InboundConn, PodInfo, ProxyContext,
    copy::{self, ByteCounts, CopyError, Side},
    inbound,
    live::{LiveConn, Registration},
    result::{AccessLog, ConnectionResult, Error},
};
use crate::{redirect::splice as ksplice, telemetry::Transport};

/// How often the live byte counts of a spliced connection are read from the kernel.
const COUNTS_EVERY: Duration = Duration::from_secs(1);
/// Longest pause between checks that the bytes before a FIN have all been sent on.
const DRAIN_POLL_MAX: Duration = Duration::from_millis(50);

/// A same-node destination: the pod, when splicing applies to `dst`.
pub fn destination(ctx: &ProxyContext, dst: SocketAddr) -> Option<Arc<PodInfo>> {
    ctx.capture.splicer()?;
    if inbound::is_agent_port(dst.port()) {
        return None;
    }
    ctx.local_pod(dst.ip())
}

/// What the outbound handler knows when it hands a connection to [`serve`].
pub struct SameNode<'a> {
    pub src_pod: &'a PodInfo,
    pub dst_pod: Arc<PodInfo>,
    /// The client as the destination sees it (the source pod's address).
    pub src: SocketAddr,
    pub dst: SocketAddr,
    /// The service host dialed, for the destination's telemetry.
    pub service_host: Option<&'a str>,
    /// The outbound registration (its flags say how the connection ended).
    pub out_live: &'a LiveConn,
}

/// Admits the connection at the destination pod, connects to its app, and splices. Writes the
/// destination's access line; returns the outcome for the source's.
pub async fn serve(
    ctx: &ProxyContext,
    hop: SameNode<'_>,
    downstream: TcpStream,
    log: &mut AccessLog,
) -> Result<(), Error> {
    let SameNode {
        src_pod,
        dst_pod,
        src,
        dst,
        service_host,
        out_live,
    } = hop;
    let _slot = ctx
        .budgets
        .connection(&dst_pod.open)
        .map_err(Error::Limit)?;
    let mut inbound = ConnectionResult::new(AccessLog {
        src_identity: Some(src_pod.identity.clone()),
        src_workload: log.src_workload.clone(),
        dst: Some(dst),
        counts: log.counts.clone(),
        ..inbound::access_log(&dst_pod, src, Transport::Kernel, log.start)
    });
    let counts = log.counts.clone();
    let conn = InboundConn {
        path: Transport::Kernel,
        peer: src,
        dst,
        client: Some(&src_pod.identity),
        baggage: None,
        service_host,
        counts: &counts,
        start: log.start,
    };
    let admitted = tokio::select! {
        r = inbound::admit_and_connect(ctx, &dst_pod, conn, &mut inbound.log) => r,
        () = super::gave_up(&downstream) => Err(Error::ClientGone("before the app answered")),
    };
    let (upstream, in_live) = match admitted {
        Ok(a) => a,
        Err(e) => {
            let mine = match &e {
                Error::ClientGone(when) => Error::ClientGone(when),
                Error::Denied | Error::Bypass(_) => {
                    out_live.flag("DENY");
                    Error::Tunnel(format!("refused by {}: {e}", dst_pod.key))
                }
                _ => {
                    out_live.flag("CONNECT");
                    Error::Tunnel(format!("{}: {e}", dst_pod.key))
                }
            };
            inbound.finish(Err(e));
            return Err(mine);
        }
    };
    let outcome = carry(
        ctx,
        downstream,
        upstream,
        &counts,
        [out_live, &in_live.conn],
        &in_live,
        log,
    )
    .await;
    inbound.log.path = log.path;
    inbound.finish(outcome.as_ref().map(|_| ()).map_err(duplicate));
    drop(in_live);
    outcome
}

/// Splices the two sockets, or copies in user space where the kernel refuses (a full map).
async fn carry(
    ctx: &ProxyContext,
    downstream: TcpStream,
    upstream: TcpStream,
    counts: &Arc<ByteCounts>,
    both: [&LiveConn; 2],
    in_live: &Registration<'_>,
    log: &mut AccessLog,
) -> Result<(), Error> {
    let Some(splicer) = ctx.capture.splicer() else {
        return user_space(downstream, upstream, counts, both, in_live, log).await;
    };
    // Out of tokio's reactor: the kernel carries the data, and its wake-ups must not reach us.
    let a = downstream
        .into_std()
        .map_err(copy_error(Side::Downstream))?;
    let b = upstream.into_std().map_err(copy_error(Side::Upstream))?;
    // Nothing was written to either yet: what their sequence space holds now is the SYN.
    let base = [
        ksplice::bytes_written(a.as_raw_fd()).map_err(copy_error(Side::Downstream))?,
        ksplice::bytes_written(b.as_raw_fd()).map_err(copy_error(Side::Upstream))?,
    ];
    match splicer.splice(&a, &b) {
        Ok(pair) => {
            let r = watch([&a, &b], base, counts, &in_live.conn).await;
            if r.is_err() {
                reset(&a);
                reset(&b);
            }
            drop(pair);
            r
        }
        Err((e, first)) if e.recoverable() => {
            if first && !matches!(e, ksplice::SpliceError::NotEstablished) {
                warn!(error = %e, "cannot splice this same-node connection; copying it, and the next ones until a splice succeeds again, in user space (counted in ambit_splice_refused)");
            } else {
                debug!(error = %e, "same-node connection copied in user space");
            }
            let (a, b) = (TcpStream::from_std(a), TcpStream::from_std(b));
            let a = a.map_err(copy_error(Side::Downstream))?;
            let b = b.map_err(copy_error(Side::Upstream))?;
            user_space(a, b, counts, both, in_live, log).await
        }
        Err((e, _)) => {
            reset(&a);
            reset(&b);
            Err(Error::Tunnel(format!("kernel splice failed: {e}")))
        }
    }
}

/// The fallback: the agent copies, as for any plaintext hop (path `local`).
async fn user_space(
    a: TcpStream,
    b: TcpStream,
    counts: &Arc<ByteCounts>,
    both: [&LiveConn; 2],
    in_live: &Registration<'_>,
    log: &mut AccessLog,
) -> Result<(), Error> {
    log.path = Transport::Local;
    // `ambitctl connections` shows both sides as copied by the agent, as the access log does.
    for live in both {
        live.carried_in_user_space();
    }
    tokio::select! {
        r = copy::copy_bidirectional(a, b, counts.clone()) => r.map_err(Error::Copy),
        () = in_live.conn.closed() => Err(Error::Closed(in_live.conn.close_reason().unwrap_or_default())),
    }
}

/// One direction of a spliced connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flow {
    Open,
    /// The sender's FIN arrived after `bytes` payload bytes; it is passed on once they are.
    Draining {
        bytes: u64,
    },
    Done,
}

/// Watches a spliced pair (`[client side, app side]`; `base`: each one's sequence space before
/// the splice) until both directions have ended, or one side fails, or the policy closes it.
/// The caller resets both sockets on an error.
async fn watch(
    socks: [&StdStream; 2],
    base: [u64; 2],
    counts: &ByteCounts,
    closed: &LiveConn,
) -> Result<(), Error> {
    const SIDES: [Side; 2] = [Side::Downstream, Side::Upstream];
    let events = Events::new(socks[0], socks[1]).map_err(copy_error(Side::Internal))?;
    let mut flows = [Flow::Open, Flow::Open];
    // Whether each side's FIN arrived (it takes one of `bytes_received`).
    let mut fin = [false, false];
    let mut pause = Duration::from_millis(1);
    let mut counted = tokio::time::interval(COUNTS_EVERY);
    counted.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        for from in 0..2 {
            let to = 1 - from;
            let sock = socks[from];
            if let Some(cause) = sock.take_error().map_err(copy_error(SIDES[from]))? {
                refresh(counts, socks, fin);
                return Err(Error::Copy(CopyError {
                    side: SIDES[from],
                    op: "read",
                    cause,
                }));
            }
            let now = ksplice::tcp_counts(sock.as_raw_fd()).map_err(copy_error(SIDES[from]))?;
            if flows[from] == Flow::Open && now.peer_done() {
                fin[from] = true;
                flows[from] = Flow::Draining {
                    bytes: now.bytes_received.saturating_sub(1),
                };
            }
            if let Flow::Draining { bytes } = flows[from] {
                let written =
                    ksplice::bytes_written(socks[to].as_raw_fd()).map_err(copy_error(SIDES[to]))?;
                if written.saturating_sub(base[to]) >= bytes {
                    // The other end may be gone already (it closed both ways): nothing is owed
                    // to it then.
                    match socks[to].shutdown(Shutdown::Write) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                        Err(cause) => {
                            return Err(Error::Copy(CopyError {
                                side: SIDES[to],
                                op: "shutdown",
                                cause,
                            }));
                        }
                    }
                    flows[from] = Flow::Done;
                    pause = Duration::from_millis(1);
                }
            }
        }
        refresh(counts, socks, fin);
        if flows == [Flow::Done, Flow::Done] {
            return Ok(());
        }
        let draining = flows.iter().any(|f| matches!(f, Flow::Draining { .. }));
        tokio::select! {
            r = events.next() => r.map_err(copy_error(Side::Internal))?,
            _ = counted.tick() => {}
            () = tokio::time::sleep(pause), if draining => {
                pause = (pause * 2).min(DRAIN_POLL_MAX);
            }
            () = closed.closed() => {
                return Err(Error::Closed(closed.close_reason().unwrap_or_default()));
            }
        }
    }
}

/// The payload bytes each way so far, from the kernel: what the client's socket received (less
/// its FIN), and what the app's did.
fn refresh(counts: &ByteCounts, socks: [&StdStream; 2], fin: [bool; 2]) {
    for (i, total) in [&counts.sent, &counts.received].into_iter().enumerate() {
        if let Ok(c) = ksplice::tcp_counts(socks[i].as_raw_fd()) {
            total.store(
                c.bytes_received.saturating_sub(u64::from(fin[i])),
                Ordering::Relaxed,
            );
        }
    }
}

/// An epoll set of the two sockets for their peers' FIN (`EPOLLRDHUP`) and errors only: data
/// arriving (which the kernel carries on) never wakes the agent.
struct Events {
    epoll: AsyncFd<EpollFd>,
}

struct EpollFd(Epoll);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        let fd: &OwnedFd = &self.0.0;
        fd.as_raw_fd()
    }
}

impl Events {
    fn new(a: &StdStream, b: &StdStream) -> io::Result<Events> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        for (i, s) in [a, b].into_iter().enumerate() {
            // Edge-triggered: each state change once; the watcher reads the state itself.
            let flags = EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLET;
            epoll.add(s, EpollEvent::new(flags, i as u64))?;
        }
        // SAFETY: `EpollFd` owns the epoll fd, which stays open and unchanged for as long as
        // the `AsyncFd` owns it.
        #[allow(unsafe_code)]
        let epoll = unsafe { AsyncFd::register_with_interest(EpollFd(epoll), Interest::READABLE) }?;
        Ok(Events { epoll })
    }

    /// Resolves when either socket's state changed.
    async fn next(&self) -> io::Result<()> {
        loop {
            let mut ready = self.epoll.readable().await?;
            let mut got = [EpollEvent::empty(); 2];
            let n = ready.get_inner().0.wait(&mut got, EpollTimeout::ZERO)?;
            if n > 0 {
                return Ok(());
            }
            ready.clear_ready();
        }
    }
}

/// Closes with a reset when the socket is dropped (`SO_LINGER` 0).
fn reset(s: &StdStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

fn copy_error(side: Side) -> impl Fn(io::Error) -> Error {
    move |cause| {
        Error::Copy(CopyError {
            side,
            op: "splice",
            cause,
        })
    }
}

/// The destination's copy of the source's outcome (same sides: downstream is the client).
fn duplicate(e: &Error) -> Error {
    match e {
        Error::Copy(c) => Error::Copy(CopyError {
            side: c.side,
            op: c.op,
            cause: io::Error::new(c.cause.kind(), c.cause.to_string()),
        }),
        Error::Closed(why) => Error::Closed(why.clone()),
        other => Error::Closed(other.to_string()),
    }
}
