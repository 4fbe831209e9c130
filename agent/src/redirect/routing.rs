//! The pod-side policy routing that lets the agent connect to the app *as the client*.
//!
//! Inbound, the agent opens its connection to the app with `IP_TRANSPARENT`, bound to the client's
//! IP, so the app sees the real client. The app's replies go to an address that is not local to
//! the pod; they reach the agent because:
//! - `net.ipv4.tcp_fwmark_accept=1`: the app's accepted socket inherits the SYN's mark
//!   ([`RETURN_MARK`]), so its replies carry the mark too; `net.ipv{4,6}.fwmark_reflect=1` does
//!   the same for replies the kernel makes itself (the RST of a closed port);
//! - `ip rule fwmark 0x1539/0xffff lookup 100` and `local 0.0.0.0/0 dev lo table 100` (and the
//!   IPv6 twins): packets with that mark are delivered locally, to the agent's transparent socket.
//!
//! The agent's outbound sockets in the same netns carry only [`ambit_common::AGENT_MARK`], which
//! this rule does not match, so they are routed normally.
//!
//! All of it lives in the pod's netns, set through netlink and sysctl (no iptables, no `ip`
//! binary). It must be called with the thread inside the pod's netns ([`super::netns::Netns::run`]).

use std::io;

use ambit_common::{RETURN_MARK, RETURN_MARK_MASK};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressHeader, AddressHeaderFlags, AddressMessage, AddressScope},
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
        RouteType,
    },
    rule::{RuleAction, RuleAttribute, RuleHeader, RuleMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// Routing table for marked replies (the same number Istio's in-pod rules use).
pub const ROUTE_TABLE: u32 = 100;
/// Rule priority: before the main table (32766).
pub const RULE_PRIORITY: u32 = 32000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("netlink: {op}: {cause}")]
    Netlink { op: &'static str, cause: io::Error },
    #[error("cannot set sysctl {name}: {cause}")]
    Sysctl {
        name: &'static str,
        cause: io::Error,
    },
}

/// Where the host's procfs is mounted in a container whose own `/proc/sys` is read-only (the
/// DaemonSet mounts it there); net sysctls written through it apply to the writing thread's netns.
const HOST_PROC: &str = "/host/proc";

/// Writes `1` to the sysctl at `path` (under `/proc`), through [`HOST_PROC`] when `/proc/sys` is
/// read-only.
fn write_sysctl(path: &str) -> io::Result<()> {
    match std::fs::write(path, "1") {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
            let host = path.replacen("/proc", HOST_PROC, 1);
            std::fs::write(host, "1").map_err(|_| e)
        }
        other => other,
    }
}

/// Installs the return path for transparent connections in the current netns. Idempotent.
pub fn install() -> Result<(), Error> {
    for (name, path, required) in [
        (
            "net.ipv4.tcp_fwmark_accept",
            "/proc/sys/net/ipv4/tcp_fwmark_accept",
            true,
        ),
        // Replies the kernel sends itself (the RST of a closed port, ICMP) carry the mark of the
        // packet they answer; without this the app's "connection refused" would leave the pod
        // instead of reaching the agent, which would then wait for a timeout.
        (
            "net.ipv4.fwmark_reflect",
            "/proc/sys/net/ipv4/fwmark_reflect",
            true,
        ),
        (
            "net.ipv6.fwmark_reflect",
            "/proc/sys/net/ipv6/fwmark_reflect",
            false,
        ),
        // When a pod is re-enrolled in place, or a new agent takes over (surge upgrade), its
        // listeners bind next to the old ones (`SO_REUSEPORT`); this hands connections still
        // queued on a closing listener to the new one instead of resetting them (kernel 5.14+;
        // the IPv4 knob covers IPv6 too). Not required: without it a few queued connections
        // may be reset, never leaked.
        (
            "net.ipv4.tcp_migrate_req",
            "/proc/sys/net/ipv4/tcp_migrate_req",
            false,
        ),
    ] {
        match write_sysctl(path) {
            Ok(()) => {}
            // A pod without IPv6 has no net.ipv6 tree.
            Err(e) if !required && e.kind() == io::ErrorKind::NotFound => {}
            Err(cause) => return Err(Error::Sysctl { name, cause }),
        }
    }
    let nl = Netlink::open()?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        // A pod without IPv6 (disable_ipv6) refuses the v6 half; that is fine.
        let v6 = family == AddressFamily::Inet6;
        match nl.request(
            RouteNetlinkMessage::NewRule(rule(family)),
            true,
            "add fwmark rule",
        ) {
            Err(Error::Netlink { cause, .. }) if v6 && ipv6_unavailable(&cause) => continue,
            other => other?,
        }
        match nl.request(
            RouteNetlinkMessage::NewRoute(route(family)),
            true,
            "add local route",
        ) {
            Err(Error::Netlink { cause, .. }) if v6 && ipv6_unavailable(&cause) => continue,
            other => other?,
        }
    }
    Ok(())
}

/// Puts the kubelet probe source addresses on `lo` of the current netns (the node's): the probe
/// marker binds kubelet sockets to them (which needs a local address), and the pods' replies to
/// them are delivered here. Idempotent; left in place when the agent stops (`cleanup` removes
/// them). A node without IPv6 skips the IPv6 one.
pub fn add_probe_sources() -> Result<(), Error> {
    let nl = Netlink::open()?;
    for msg in probe_source_messages() {
        let v6 = msg.header.family == AddressFamily::Inet6;
        match nl.request(
            RouteNetlinkMessage::NewAddress(msg),
            true,
            "add the probe source address to lo",
        ) {
            Err(Error::Netlink { cause, .. }) if v6 && ipv6_unavailable(&cause) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Removes what [`add_probe_sources`] added; missing ones are not an error.
pub fn remove_probe_sources() -> Result<(), Error> {
    let nl = Netlink::open()?;
    for msg in probe_source_messages() {
        match nl.request(
            RouteNetlinkMessage::DelAddress(msg),
            false,
            "delete the probe source address from lo",
        ) {
            Err(Error::Netlink { cause, .. })
                if matches!(
                    cause.raw_os_error(),
                    Some(libc::EADDRNOTAVAIL | libc::ENOENT | libc::ESRCH)
                ) || ipv6_unavailable(&cause) => {}
            other => other?,
        }
    }
    Ok(())
}

fn probe_source_messages() -> [AddressMessage; 2] {
    let v4 = std::net::IpAddr::from(ambit_common::PROBE_SOURCE4.to_ne_bytes());
    let mut v6 = [0u8; 16];
    for (i, w) in ambit_common::PROBE_SOURCE6.iter().enumerate() {
        v6[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = std::net::IpAddr::from(v6);
    [
        (v4, AddressFamily::Inet, 32, AddressScope::Link),
        (v6, AddressFamily::Inet6, 128, AddressScope::Universe),
    ]
    .map(|(ip, family, prefix_len, scope)| {
        let mut msg = AddressMessage::default();
        msg.header = AddressHeader {
            family,
            prefix_len,
            // No duplicate address detection: the address is the node's alone, on lo.
            flags: AddressHeaderFlags::Nodad | AddressHeaderFlags::Permanent,
            scope,
            index: LOOPBACK_IFINDEX,
        };
        msg.attributes = vec![AddressAttribute::Local(ip), AddressAttribute::Address(ip)];
        msg
    })
}

/// Removes what [`install`] added. Missing entries are not an error. The sysctl is left as it is:
/// it only affects connections whose SYN carries the agent's mark.
pub fn remove() -> Result<(), Error> {
    let nl = Netlink::open()?;
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        for (msg, op) in [
            (
                RouteNetlinkMessage::DelRule(rule(family)),
                "delete fwmark rule",
            ),
            (
                RouteNetlinkMessage::DelRoute(route(family)),
                "delete local route",
            ),
        ] {
            match nl.request(msg, false, op) {
                Err(Error::Netlink { cause, .. })
                    if matches!(cause.raw_os_error(), Some(libc::ENOENT | libc::ESRCH))
                        || ipv6_unavailable(&cause) => {}
                other => other?,
            }
        }
    }
    Ok(())
}

fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EOPNOTSUPP)
    )
}

fn rule(family: AddressFamily) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header = RuleHeader {
        family,
        action: RuleAction::ToTable,
        ..RuleHeader::default()
    };
    msg.attributes = vec![
        RuleAttribute::FwMark(RETURN_MARK),
        RuleAttribute::FwMask(RETURN_MARK_MASK),
        RuleAttribute::Table(ROUTE_TABLE),
        RuleAttribute::Priority(RULE_PRIORITY),
    ];
    msg
}

fn route(family: AddressFamily) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header = RouteHeader {
        address_family: family,
        destination_prefix_length: 0,
        table: ROUTE_TABLE as u8,
        protocol: RouteProtocol::Static,
        scope: RouteScope::Host,
        kind: RouteType::Local,
        ..RouteHeader::default()
    };
    let dst = if family == AddressFamily::Inet {
        RouteAddress::Inet(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        RouteAddress::Inet6(std::net::Ipv6Addr::UNSPECIFIED)
    };
    msg.attributes = vec![
        RouteAttribute::Destination(dst),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
        RouteAttribute::Table(ROUTE_TABLE),
    ];
    msg
}

/// `lo` is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

struct Netlink {
    socket: Socket,
}

impl Netlink {
    fn open() -> Result<Netlink, Error> {
        let err = |cause| Error::Netlink {
            op: "open socket",
            cause,
        };
        let mut socket = Socket::new(NETLINK_ROUTE).map_err(err)?;
        socket.bind_auto().map_err(err)?;
        socket.connect(&SocketAddr::new(0, 0)).map_err(err)?;
        Ok(Netlink { socket })
    }

    /// Sends one request and waits for its acknowledgement. With `create`, an existing entry
    /// (`EEXIST`) counts as success.
    fn request(
        &self,
        msg: RouteNetlinkMessage,
        create: bool,
        op: &'static str,
    ) -> Result<(), Error> {
        let err = |cause| Error::Netlink { op, cause };
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK;
        if create {
            header.flags |= NLM_F_CREATE | NLM_F_EXCL;
        }
        header.sequence_number = 1;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0u8; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0).map_err(err)?;

        let (reply, _) = self.socket.recv_from_full().map_err(err)?;
        let reply = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&reply)
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidData, e.to_string())))?;
        match reply.payload {
            NetlinkPayload::Error(e) => match e.code {
                None => Ok(()),
                Some(code) if create && -code.get() == libc::EEXIST => Ok(()),
                Some(code) => Err(err(io::Error::from_raw_os_error(-code.get()))),
            },
            _ => Ok(()),
        }
    }
}
