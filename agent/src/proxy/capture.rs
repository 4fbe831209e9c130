//! The seam between the proxy and traffic capture: what the connection handlers need from the
//! kernel side, and nothing more. Where an outbound connection was going (recorded by the
//! connect hook), and a socket that leaves from a pod (inside its netns, with its address, or
//! transparently with a client's).
//!
//! [`Kernel`] is the agent's: the eBPF original-destination map and marked sockets opened in
//! the pod's netns. `Loopback` (tests only) puts every pod on an address of `127.0.0.0/8` in
//! the test's own netns, so outbound -> HBONE -> inbound runs in-process without root.

use std::{
    io,
    net::{IpAddr, SocketAddr},
};

use tokio::net::TcpSocket;

use crate::{
    addrs::{ClientAddr, OrigDstAddr},
    redirect::{Netns, OrigDst, Splicer},
};

/// Whose address a socket leaves with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The pod's own (`ip`, the pod's address of the destination's family).
    Pod(IpAddr),
    /// A client's, transparently: inbound, so the app sees who connected.
    Transparent(IpAddr),
}

/// What the proxy needs from capture.
pub trait Capture: Send + Sync + 'static {
    /// The original destination of a connection accepted on the outbound listener of the pod
    /// in `netns`, from `client` (the app socket's own address).
    fn original_dst(&self, netns: &Netns, client: ClientAddr) -> Option<OrigDstAddr>;

    /// A socket for `dst` that leaves from the pod in `netns` as `src`, not yet connected.
    fn socket(&self, netns: &Netns, dst: SocketAddr, src: Source) -> io::Result<TcpSocket>;

    /// The kernel splice for same-node connections, where it is loaded and turned on.
    fn splicer(&self) -> Option<&Splicer> {
        None
    }

    /// The resolver the pod in `netns` last sent a captured DNS query to.
    fn dns_resolver(&self, _netns: &Netns) -> Option<SocketAddr> {
        None
    }

    /// Whether same-node connections are spliced, for `ambitctl bpf`: `on`, `off (config)`, or
    /// why the kernel cannot.
    fn splice_state(&self) -> String {
        "unavailable (no kernel capture)".to_owned()
    }
}

/// Capture by the kernel: the eBPF programs' map, and sockets opened in the pod's netns with the
/// agent's mark (never captured again).
pub struct Kernel {
    /// `None` where nothing is captured (the waypoint), so no destination was recorded.
    orig_dst: Option<OrigDst>,
    /// The same-node splice, or why there is none.
    splice: Result<Splicer, String>,
}

impl Kernel {
    /// Capture with `orig_dst`; same-node connections are spliced by `splice` if it loaded.
    pub fn new(orig_dst: OrigDst, splice: Result<Splicer, String>) -> Kernel {
        Kernel {
            orig_dst: Some(orig_dst),
            splice,
        }
    }

    /// For a process that captures nothing but opens sockets in netns (the waypoint).
    pub fn sockets_only() -> Kernel {
        Kernel {
            orig_dst: None,
            splice: Err("off (nothing captured)".to_owned()),
        }
    }
}

impl Capture for Kernel {
    fn original_dst(&self, netns: &Netns, client: ClientAddr) -> Option<OrigDstAddr> {
        self.orig_dst.as_ref()?.lookup(netns.cookie(), client)
    }

    fn socket(&self, netns: &Netns, dst: SocketAddr, src: Source) -> io::Result<TcpSocket> {
        // Inside the pod's netns the kernel picks the pod's own address by itself.
        let transparent = match src {
            Source::Pod(_) => None,
            Source::Transparent(ip) => Some(ip),
        };
        super::upstream_socket(netns, dst, transparent)
    }

    fn splicer(&self) -> Option<&Splicer> {
        self.splice.as_ref().ok()
    }

    fn dns_resolver(&self, netns: &Netns) -> Option<SocketAddr> {
        self.orig_dst.as_ref()?.dns_resolver(netns.cookie())
    }

    fn splice_state(&self) -> String {
        match &self.splice {
            Ok(_) => "on".to_owned(),
            Err(why) => why.clone(),
        }
    }
}

/// Capture as the in-process tests do it: each pod is an address on loopback, the test's app
/// registers where its connection "was going" before it dials the pod's outbound listener, and
/// sockets are bound to the source address (any `127.0.0.0/8` address is bindable without root).
#[cfg(test)]
#[derive(Default)]
pub struct Loopback {
    redirects: std::sync::Mutex<std::collections::HashMap<ClientAddr, OrigDstAddr>>,
}

#[cfg(test)]
impl Loopback {
    /// Records that the app socket bound at `from` was redirected on its way to `to`.
    pub fn redirect(&self, from: SocketAddr, to: SocketAddr) {
        self.redirects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ClientAddr(from), OrigDstAddr(to));
    }
}

#[cfg(test)]
impl Capture for Loopback {
    fn original_dst(&self, _netns: &Netns, client: ClientAddr) -> Option<OrigDstAddr> {
        self.redirects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client)
    }

    fn socket(&self, _netns: &Netns, dst: SocketAddr, src: Source) -> io::Result<TcpSocket> {
        let socket = if dst.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_nodelay(true)?;
        let (Source::Pod(ip) | Source::Transparent(ip)) = src;
        socket.bind(SocketAddr::new(ip, 0))?;
        Ok(socket)
    }
}
