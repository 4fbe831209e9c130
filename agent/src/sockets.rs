//! Socket plumbing every part shares: the one listener builder (pod listeners, the waypoint's,
//! readiness, metrics) and connecting with a timeout.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpStream;

/// How a listener is set up beyond its address. `[::]` always accepts both families.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// Another process may bind the same address: a new agent next to the one it replaces (a
    /// surge rollout), so the port never lacks a listener.
    pub reuse_port: bool,
    /// `SO_MARK` on the socket and the connections it accepts (the agent's, skipped by capture).
    pub mark: Option<u32>,
    /// `TCP_NODELAY` for the accepted connections.
    pub nodelay: bool,
    pub backlog: i32,
}

/// A non-blocking listener on `addr`.
pub fn listener(addr: SocketAddr, how: &Listen) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if how.reuse_port {
        socket.set_reuse_port(true)?;
    }
    if let Some(mark) = how.mark {
        socket.set_mark(mark)?;
    }
    if how.nodelay {
        socket.set_tcp_nodelay(true)?;
    }
    if addr.is_ipv6() {
        // Dual stack on [::]; loopback [::1] is IPv6 only anyway.
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(how.backlog)?;
    Ok(socket.into())
}

/// How long the agent waits for a destination to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connects with [`CONNECT_TIMEOUT`].
pub async fn connect(socket: tokio::net::TcpSocket, dst: SocketAddr) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer from {dst} within {CONNECT_TIMEOUT:?}"),
        )),
    }
}
