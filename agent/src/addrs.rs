//! Addresses that mean different things and must not be swapped, as types of their own (the
//! idea of linkerd2-proxy's `transport/addrs.rs`). A captured connection has two socket
//! addresses that are both plain `SocketAddr`s to the kernel: the app socket's own (what the
//! agent's in-pod listener accepted, and the key under which the capture program recorded where
//! it was going) and that original destination. Looking one up with the other, or reporting one
//! as the other, is a silent misroute; with these types it does not compile. A network
//! namespace's cookie and a socket's cookie are both `u64`s to the kernel; [`NetnsCookie`] is the
//! one that keys the enrollment maps.

use std::{fmt, net::SocketAddr};

/// The app's end of a captured connection, as the agent's listener in the pod accepted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ClientAddr(pub SocketAddr);

/// Where an app's outbound connection was going before the capture program sent it to the
/// agent: the address the app dialed (a pod, a service VIP, or anything outside the mesh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OrigDstAddr(pub SocketAddr);

/// Where the agent connects for a connection: the address dialed, or the endpoint picked for a
/// service VIP (the VIP itself when the service's waypoint picks).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointAddr(pub SocketAddr);

/// A network namespace's cookie (`SO_NETNS_COOKIE`): the key of a pod in the capture maps and
/// of its pinned `sk_lookup` link. Not a socket's cookie.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct NetnsCookie(pub u64);

impl fmt::Display for ClientAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for OrigDstAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::str::FromStr for NetnsCookie {
    type Err = std::num::ParseIntError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(NetnsCookie)
    }
}

impl std::str::FromStr for OrigDstAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(OrigDstAddr)
    }
}
