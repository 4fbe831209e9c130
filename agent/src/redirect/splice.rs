//! Same-node splice: the kernel carries an admitted connection between two pods of this node.
//!
//! The agent holds two sockets of such a connection: `a`, accepted from the client app on its
//! pod's outbound listener, and `b`, connected to the server app in the destination pod's netns
//! (transparently, as the client). Splicing pairs them in the kernel: every chunk `a` receives
//! is sent out on `b` and every chunk `b` receives on `a`, by the `sk_skb` verdict program
//! (`ambit_splice`), without a copy into the agent, without TLS (the bytes never leave the node)
//! and without a wake-up of the agent per chunk.
//!
//! Order of operations, so that no byte is lost or reordered:
//! 1. The agent has read nothing from either socket (admission needs no payload).
//! 2. Both cookies are paired in `AMBIT_SPLICE_PEER`, and both sockets are put in
//!    `AMBIT_SPLICE_SOCKS` (no program: only the redirect target). Either failing (a full map)
//!    undoes the rest and the caller copies in user space as before.
//! 3. Both sockets are put in `AMBIT_SPLICE`, which attaches the verdict program to them. From
//!    the first, a peer is always there to redirect to.
//! 4. Bytes that arrived before step 3 wait in the socket's receive queue; setting `SO_RCVLOWAT`
//!    makes the kernel run the socket's data-ready callback, now the verdict's, over them, in
//!    order, ahead of anything that arrives later.
//!
//! The kernel removes a socket from both sockhashes when it closes, so an agent that exits
//! (or crashes) leaves nothing behind; [`Spliced`] removes the pair when the connection ends.
//! TCP's FIN and RST are not carried by the program: the proxy watches both sockets and passes
//! them on (see `proxy::splice`), with the byte counts read from `TCP_INFO`.

use std::{
    io,
    net::TcpStream,
    os::fd::{AsRawFd, RawFd},
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use ambit_common as common;
use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockHash},
    programs::SkSkb,
};

use super::{Error, program, take};

/// The maps the agent writes, behind one lock (a splice is two short map updates per socket).
struct Maps {
    sockets: SockHash<MapData, u64>,
    splice: SockHash<MapData, u64>,
    peer: HashMap<MapData, u64, u64>,
}

/// The splice program and its maps, shared by the connection handlers.
pub struct Splicer {
    maps: Mutex<Maps>,
    /// Sockets in the splice maps now (two per connection).
    sockets: AtomicU32,
    /// The maps' size, in sockets (`acceleration.sameNodeConnections` x 2).
    capacity: u32,
    /// Connections handed to the kernel since the start.
    spliced: AtomicU64,
    /// Connections that could not be, by [`SpliceError::REASONS`].
    refused: [AtomicU64; SpliceError::REASONS.len()],
    /// Map refusals since the last splice (a full map refuses every connection until one
    /// ends: the log says so once, the metric counts each).
    streak: AtomicU64,
}

/// What `/metrics` shows of the splice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// Sockets in the splice maps now, and the maps' size.
    pub sockets: u32,
    pub capacity: u32,
    pub spliced: u64,
    /// `(reason, connections)` for every [`SpliceError::REASONS`].
    pub refused: Vec<(&'static str, u64)>,
}

/// Why a connection could not be spliced (it is carried in user space instead).
#[derive(Debug, thiserror::Error)]
pub enum SpliceError {
    #[error("cannot read a socket cookie: {0}")]
    Cookie(io::Error),
    /// The client or the app finished sending before the splice: a sockhash takes only
    /// established sockets. Copying in user space is the way then.
    #[error("a socket is no longer established (one side already finished sending)")]
    NotEstablished,
    #[error("splice map {name} refused a socket: {cause}{detail} (full? it holds {capacity} sockets, two per connection: see acceleration.sameNodeConnections)", detail = source_of(cause))]
    Map {
        name: &'static str,
        cause: aya::maps::MapError,
        capacity: u32,
    },
    #[error("cannot start the splice on a socket: {0}")]
    Kick(io::Error),
}

impl SpliceError {
    /// The `reason` label of `ambit_splice_refused`, one per kind.
    pub const REASONS: [&'static str; 4] = ["cookie", "not_established", "map", "kick"];

    /// This error's entry of [`SpliceError::REASONS`].
    fn reason(&self) -> usize {
        match self {
            SpliceError::Cookie(_) => 0,
            SpliceError::NotEstablished => 1,
            SpliceError::Map { .. } => 2,
            SpliceError::Kick(_) => 3,
        }
    }

    /// Whether the connection may still be carried in user space: no byte was redirected yet
    /// (the verdict program is on neither socket).
    pub fn recoverable(&self) -> bool {
        match self {
            SpliceError::Cookie(_) | SpliceError::NotEstablished => true,
            SpliceError::Map { name, .. } => *name != common::MAP_SPLICE,
            SpliceError::Kick(_) => false,
        }
    }
}

impl Splicer {
    /// Loads the verdict program and attaches it to the splice map (sized by the loader to
    /// `capacity` sockets). Fails on a kernel without `sk_skb` programs or sockhash maps; the
    /// agent then carries same-node connections in user space.
    pub(super) fn load(ebpf: &mut Ebpf, capacity: u32) -> Result<Splicer, Error> {
        let splice: SockHash<MapData, u64> = take(ebpf, common::MAP_SPLICE)?;
        let name = common::program::SPLICE;
        let prog: &mut SkSkb = program(ebpf, name)?;
        prog.load()
            .map_err(|cause| Error::Program { name, cause })?;
        // The link lives as long as the program (the capture owner's object) or the map.
        prog.attach(splice.fd())
            .map_err(|cause| Error::Program { name, cause })?;
        Ok(Splicer {
            maps: Mutex::new(Maps {
                sockets: take(ebpf, common::MAP_SPLICE_SOCKETS)?,
                splice,
                peer: take(ebpf, common::MAP_SPLICE_PEER)?,
            }),
            sockets: AtomicU32::new(0),
            capacity,
            spliced: AtomicU64::new(0),
            refused: Default::default(),
            streak: AtomicU64::new(0),
        })
    }

    /// Sockets spliced now, and the capacity.
    pub fn fill(&self) -> (u32, u32) {
        (self.sockets.load(Ordering::Relaxed), self.capacity)
    }

    pub fn stats(&self) -> SpliceStats {
        let (sockets, capacity) = self.fill();
        SpliceStats {
            sockets,
            capacity,
            spliced: self.spliced.load(Ordering::Relaxed),
            refused: SpliceError::REASONS
                .iter()
                .zip(&self.refused)
                .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
                .collect(),
        }
    }

    /// Splices `a` and `b` (see the module's order of operations). Neither may have been read
    /// from. On a recoverable error nothing was changed and both are plain sockets again; the
    /// `bool` says whether to tell the operator (not for every connection a full map refuses).
    pub fn splice<'s>(
        &'s self,
        a: &TcpStream,
        b: &TcpStream,
    ) -> Result<Spliced<'s>, (SpliceError, bool)> {
        match self.try_splice(a, b) {
            Ok(pair) => {
                self.spliced.fetch_add(1, Ordering::Relaxed);
                self.streak.store(0, Ordering::Relaxed);
                Ok(pair)
            }
            Err(e) => {
                self.refused[e.reason()].fetch_add(1, Ordering::Relaxed);
                let first = !matches!(e, SpliceError::Map { .. })
                    || self.streak.fetch_add(1, Ordering::Relaxed) == 0;
                Err((e, first))
            }
        }
    }

    fn try_splice<'s>(&'s self, a: &TcpStream, b: &TcpStream) -> Result<Spliced<'s>, SpliceError> {
        let cookie = |s: &TcpStream| socket2::SockRef::from(s).cookie();
        let ca = cookie(a).map_err(SpliceError::Cookie)?;
        let cb = cookie(b).map_err(SpliceError::Cookie)?;
        let mut spliced = Spliced {
            splicer: self,
            cookies: [ca, cb],
            counted: false,
        };
        {
            let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            let map_err = |name| {
                move |cause: aya::maps::MapError| {
                    if os_error(&cause) == Some(libc::EOPNOTSUPP) {
                        SpliceError::NotEstablished
                    } else {
                        SpliceError::Map {
                            name,
                            cause,
                            capacity: self.capacity,
                        }
                    }
                }
            };
            maps.peer
                .insert(ca, cb, 0)
                .map_err(map_err(common::MAP_SPLICE_PEER))?;
            maps.peer
                .insert(cb, ca, 0)
                .map_err(map_err(common::MAP_SPLICE_PEER))?;
            for (c, s) in [(ca, a), (cb, b)] {
                maps.sockets
                    .insert(c, s.as_raw_fd(), 0)
                    .map_err(map_err(common::MAP_SPLICE_SOCKETS))?;
            }
            self.sockets.fetch_add(2, Ordering::Relaxed);
            spliced.counted = true;
            for (c, s) in [(ca, a), (cb, b)] {
                maps.splice
                    .insert(c, s.as_raw_fd(), 0)
                    .map_err(map_err(common::MAP_SPLICE))?;
            }
        }
        // Bytes already queued go through the verdict now (see the module docs, step 4).
        for s in [a, b] {
            set_rcvlowat(s.as_raw_fd(), 1).map_err(SpliceError::Kick)?;
        }
        Ok(spliced)
    }
}

/// The errno under a map error, if it has one.
fn os_error(e: &aya::maps::MapError) -> Option<i32> {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io.raw_os_error();
        }
        source = s.source();
    }
    None
}

/// `: <cause>` for an error whose message does not include its source.
fn source_of(e: &aya::maps::MapError) -> String {
    std::error::Error::source(e)
        .map(|s| format!(": {s}"))
        .unwrap_or_default()
}

/// A spliced pair; dropping it takes the pair out of the maps (closing the sockets does too).
/// Drop it only once neither socket has bytes in flight (both directions finished, or the
/// connection is being reset): taking a socket out of the maps discards what its queues hold.
pub struct Spliced<'s> {
    splicer: &'s Splicer,
    cookies: [u64; 2],
    /// Whether the pair is in [`Splicer::fill`]'s count.
    counted: bool,
}

impl Drop for Spliced<'_> {
    fn drop(&mut self) {
        let mut maps = self.splicer.maps.lock().unwrap_or_else(|p| p.into_inner());
        // Closed sockets are gone from the sockhashes already; the pairing is ours to remove.
        for c in self.cookies {
            let _ = maps.splice.remove(&c);
            let _ = maps.sockets.remove(&c);
            let _ = maps.peer.remove(&c);
        }
        if self.counted {
            self.splicer.sockets.fetch_sub(2, Ordering::Relaxed);
        }
    }
}

/// What the kernel says about one TCP socket (the part of `struct tcp_info` the splice reads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounts {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1 ... `TCP_CLOSING` = 11).
    pub state: u8,
    /// Sequence space the peer sent us (`tcpi_bytes_received`): its payload bytes, plus one
    /// for its FIN once that arrived.
    pub bytes_received: u64,
    /// Sequence space we sent that the peer acknowledged (`tcpi_bytes_acked`): payload, plus
    /// one for our SYN on a socket we connected, and one for our FIN.
    pub bytes_acked: u64,
}

const TCP_TIME_WAIT: u8 = 6;
const TCP_CLOSE: u8 = 7;
const TCP_CLOSE_WAIT: u8 = 8;
const TCP_LAST_ACK: u8 = 9;
const TCP_CLOSING: u8 = 11;

impl TcpCounts {
    /// Whether the peer has finished sending (its FIN arrived), or the connection is over.
    pub fn peer_done(&self) -> bool {
        matches!(
            self.state,
            TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT | TCP_CLOSE
        )
    }
}

/// The head of Linux's `struct tcp_info` (`include/uapi/linux/tcp.h`) up to the fields read
/// here; the kernel copies at most the length it is given.
#[repr(C)]
#[derive(Default)]
struct TcpInfoHead {
    state: u8,
    _flags: [u8; 7],
    /// `tcpi_rto` .. `tcpi_total_retrans`: 24 `__u32`.
    _u32s: [u32; 24],
    _pacing_rate: u64,
    _max_pacing_rate: u64,
    bytes_acked: u64,
    bytes_received: u64,
}
const _: () = assert!(std::mem::size_of::<TcpInfoHead>() == 136);

/// `TCP_INFO` of the socket `fd`.
pub fn tcp_counts(fd: RawFd) -> io::Result<TcpCounts> {
    let mut info = TcpInfoHead::default();
    let mut len = std::mem::size_of::<TcpInfoHead>() as libc::socklen_t;
    // SAFETY: `info` is a plain-data buffer of `len` bytes that outlives the call; the kernel
    // writes at most `len` bytes and updates `len`.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < std::mem::size_of::<TcpInfoHead>() {
        return Err(io::Error::other(
            "kernel's tcp_info is too short for byte counts",
        ));
    }
    Ok(TcpCounts {
        state: info.state,
        bytes_received: info.bytes_received,
        bytes_acked: info.bytes_acked,
    })
}

/// Sequence space written to socket `fd` so far: acknowledged plus still queued (`SIOCOUTQ`),
/// so the SYN of a socket we connected counts one (subtract the value before the first write).
/// Read in that order, so the sum never exceeds the truth (a byte acknowledged in between is
/// counted once or not at all).
pub fn bytes_written(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_counts(fd)?.bytes_acked;
    let mut queued: libc::c_int = 0;
    // SAFETY: `SIOCOUTQ` (`TIOCOUTQ`) writes one `int` to the pointer, which outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &raw mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(acked + u64::try_from(queued).unwrap_or(0))
}

/// `SO_RCVLOWAT`: on TCP, setting it runs the socket's data-ready callback if data is queued.
fn set_rcvlowat(fd: RawFd, bytes: libc::c_int) -> io::Result<()> {
    // SAFETY: the option value is one `int` that outlives the call.
    #[allow(unsafe_code)]
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const bytes).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counts of a loopback connection are the bytes that crossed it (no root needed).
    #[test]
    fn tcp_info_counts_payload_bytes() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (mut s, _) = l.accept().expect("accept");
        c.write_all(&[7u8; 10_000]).expect("write");
        let mut buf = vec![0u8; 10_000];
        s.read_exact(&mut buf).expect("read");
        let got = tcp_counts(s.as_raw_fd()).expect("tcp_info");
        assert_eq!(got.bytes_received, 10_000);
        assert_eq!(got.state, 1, "established");
        assert!(!got.peer_done());
        // The connecting side's SYN is in its sequence space; the accepting side's is not.
        assert_eq!(bytes_written(c.as_raw_fd()).expect("written"), 10_001);
        assert_eq!(bytes_written(s.as_raw_fd()).expect("written"), 0);
        c.shutdown(std::net::Shutdown::Write).expect("shutdown");
        assert_eq!(s.read(&mut buf).expect("eof"), 0);
        let after = tcp_counts(s.as_raw_fd()).expect("tcp_info");
        assert!(after.peer_done());
        assert_eq!(after.bytes_received, 10_001, "the FIN counts one");
    }
}
