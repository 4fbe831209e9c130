//! The contract between Ambit's eBPF programs (`ambit-ebpf`) and the agent.
//!
//! Every map name, key and value type and every constant that both sides must agree on is defined
//! here and only here. The types are `#[repr(C)]`, `Copy`, with explicit padding and a size
//! assertion beside each, so the kernel, the eBPF programs and the agent see the same bytes.
//!
//! Addresses are stored as IPv6 (IPv4 as `::ffff:a.b.c.d`) in four 32-bit words holding the
//! address bytes in network order, exactly as the kernel's `user_ip6`/`local_ip6` context fields
//! lay them out; ports are in host byte order.
#![no_std]

/// Port of the pod-local outbound listener that `connect4/6` redirect to.
pub const OUTBOUND_PORT: u16 = 15001;
/// Port of the pod's inbound plaintext listener that `sk_lookup` steers to.
pub const INBOUND_PORT: u16 = 15006;
/// Port of the pod's inbound HBONE listener; never steered.
pub const HBONE_PORT: u16 = 15008;
/// The agent's DNS listener in each pod whose DNS it serves (UDP and TCP on 127.0.0.1 and
/// [::1]), as ztunnel's.
pub const DNS_PORT: u16 = 15053;
/// [`EnrolledPod::flags`]: the agent serves this pod's DNS (UDP to port 53 goes to
/// [`DNS_PORT`]; TCP to port 53 is captured like any TCP and answered by the agent).
pub const POD_DNS: u32 = 1;
/// `SO_MARK` carried by every socket the agent opens (in the bits of [`AGENT_MARK_MASK`]); the
/// programs leave such sockets alone.
pub const AGENT_MARK: u32 = 0x539;
/// The bits of the mark that identify the agent's sockets.
pub const AGENT_MARK_MASK: u32 = 0xfff;
/// Mark of the agent's transparent sockets (inbound, connecting to the app as the client). It
/// includes [`AGENT_MARK`], and the pod's policy routing sends packets carrying it (the app's
/// replies, which inherit it through `tcp_fwmark_accept`) back to the agent. The agent's other
/// sockets must not carry it, or their traffic would be delivered locally too.
pub const RETURN_MARK: u32 = 0x1000 | AGENT_MARK;
/// The bits of the mark the return-path rule matches.
pub const RETURN_MARK_MASK: u32 = 0xffff;

/// Enrolled pod network namespaces: netns cookie (`u64`) -> [`EnrolledPod`].
pub const MAP_ENROLLED: &str = "AMBIT_ENROLLED";
/// Redirected sockets: socket cookie (`u64`) -> original destination [`Addr`]. Written by
/// `connect4/6`, read by `getpeername4/6` and `sock_ops`, removed when the socket closes.
pub const MAP_SOCK_DST: &str = "AMBIT_SOCK_DST";
/// Netns cookie -> the resolver its last captured DNS datagram was for (LRU, [`Addr`]).
pub const MAP_DNS_RESOLVER: &str = "AMBIT_DNS_RESOLVER";
/// Redirected connections as the agent sees them: [`SocketKey`] (the client's local address in
/// its netns, i.e. the peer of the connection accepted on 15001) -> original destination [`Addr`].
pub const MAP_ORIG_DST: &str = "AMBIT_ORIG_DST";
/// Inbound listeners for `sk_lookup`: [`IpKey`] (a pod IP) -> the pod's 15006 listener socket.
pub const MAP_INBOUND_LISTENERS: &str = "AMBIT_INBOUND";
/// The IPs of the pods enrolled on this node: [`IpKey`] -> `u8`. A kubelet connection to one of
/// them is a health probe, which the probe marker gives the [`PROBE_SOURCE4`]/[`PROBE_SOURCE6`]
/// source address.
pub const MAP_POD_IPS: &str = "AMBIT_POD_IPS";
/// The pinned name of the map an earlier agent version used to exempt node addresses from
/// inbound capture; removed at start (every host connection is captured now, kubelet probes
/// aside).
pub const LEGACY_MAP_NODE_ADDRS: &str = "AMBIT_NODE_ADDRS";
/// Destination ports that outbound capture skips: `u16` -> `u8`.
pub const MAP_EXCLUDED_OUT: &str = "AMBIT_EXCL_OUT";
/// Local ports that inbound capture skips: `u16` -> `u8`.
pub const MAP_EXCLUDED_IN: &str = "AMBIT_EXCL_IN";
/// Per-CPU event counters, indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "AMBIT_COUNTERS";
/// The agent's sockets of same-node connections it hands to the kernel: socket cookie (`u64`)
/// -> socket. No program is attached to it: it is where the splice program redirects to.
/// Neither splice map is pinned: the sockets are the agent's, and go with it.
pub const MAP_SPLICE_SOCKETS: &str = "AMBIT_SPLICE_SOCKS";
/// The same sockets once spliced: socket cookie (`u64`) -> socket. The `sk_skb` verdict program
/// ([`program::SPLICE`]) is attached here, so it runs on every chunk they receive.
pub const MAP_SPLICE: &str = "AMBIT_SPLICE";
/// Splice pairs: socket cookie (`u64`) -> the cookie of the socket its bytes are sent out on.
pub const MAP_SPLICE_PEER: &str = "AMBIT_SPLICE_PEER";

/// The source address of kubelet health probes (Istio's `169.254.7.127`), in network order as
/// the kernel stores IPv4 addresses. The probe marker binds the kubelet's connections to pods to
/// it; `sk_lookup` lets connections from it reach the app uncaptured; nothing else on the node
/// may bind it (the bind guard).
pub const PROBE_SOURCE4: u32 = u32::from_ne_bytes([169, 254, 7, 127]);
/// The IPv6 probe source, Istio's `fd16:9254:7127:1337:ffff:ffff:ffff:ffff`, as four
/// network-order words.
pub const PROBE_SOURCE6: [u32; 4] = [
    u32::from_ne_bytes([0xfd, 0x16, 0x92, 0x54]),
    u32::from_ne_bytes([0x71, 0x27, 0x13, 0x37]),
    u32::from_ne_bytes([0xff, 0xff, 0xff, 0xff]),
    u32::from_ne_bytes([0xff, 0xff, 0xff, 0xff]),
];

/// Capacity of [`MAP_ENROLLED`] (pods per node).
pub const MAX_PODS: u32 = 4096;
/// Capacity of the per-connection LRU maps.
pub const MAX_CONNECTIONS: u32 = 65536;
/// Capacity of [`MAP_INBOUND_LISTENERS`] (pod IPs per node).
pub const MAX_POD_IPS: u32 = 8192;
/// Capacity of each splice map, in sockets (two per spliced connection).
pub const MAX_SPLICED_SOCKETS: u32 = 32768;
/// Capacity of the small configuration maps.
pub const MAX_CONFIG_ENTRIES: u32 = 256;

/// The names of the programs in the object, as the agent looks them up.
pub mod program {
    pub const CONNECT4: &str = "ambit_connect4";
    pub const CONNECT6: &str = "ambit_connect6";
    pub const GETPEERNAME4: &str = "ambit_getpeername4";
    pub const GETPEERNAME6: &str = "ambit_getpeername6";
    pub const GETSOCKNAME4: &str = "ambit_getsockname4";
    pub const GETSOCKNAME6: &str = "ambit_getsockname6";
    pub const SOCK_OPS: &str = "ambit_sock_ops";
    pub const SK_LOOKUP: &str = "ambit_sk_lookup";
    /// On the kubelet's cgroup: its connections to enrolled pods get the probe source.
    pub const PROBE_CONNECT4: &str = "ambit_probe_connect4";
    pub const PROBE_CONNECT6: &str = "ambit_probe_connect6";
    /// On the host's cgroup: nobody binds the probe source.
    pub const BIND_GUARD4: &str = "ambit_bind_guard4";
    pub const BIND_GUARD6: &str = "ambit_bind_guard6";
    /// `sk_skb` stream verdict on [`super::MAP_SPLICE`]: a spliced socket's bytes go out on
    /// its peer.
    pub const SPLICE: &str = "ambit_splice";
    /// DNS capture (UDP to port 53 of a pod with [`super::POD_DNS`]): `sendmsg` (and, for
    /// connected sockets, `connect4/6`) send it to the agent's listener, `recvmsg` (and
    /// `getpeername`) give the answers the resolver's address back.
    pub const DNS_SENDMSG4: &str = "ambit_dns_sendmsg4";
    pub const DNS_SENDMSG6: &str = "ambit_dns_sendmsg6";
    pub const DNS_RECVMSG4: &str = "ambit_dns_recvmsg4";
    pub const DNS_RECVMSG6: &str = "ambit_dns_recvmsg6";
}

/// Indexes into [`MAP_COUNTERS`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// `connect4` sent a connection to the outbound listener.
    Connect4Redirected = 0,
    /// `connect6` sent a connection to the outbound listener.
    Connect6Redirected = 1,
    /// A redirect was refused because the original destination could not be recorded.
    RedirectRecordFailed = 2,
    /// `sock_ops` published an original destination for the agent.
    OrigDstPublished = 3,
    /// `sk_lookup` handed an inbound connection to the pod's 15006 listener.
    InboundSteered = 4,
    /// `sk_lookup` dropped an inbound connection because the pod's listener is gone (fail closed).
    InboundDroppedNoListener = 5,
    /// `getpeername` was answered with the original destination.
    PeerNameRewritten = 6,
    /// A kubelet connection to an enrolled pod was given the probe source (it passes capture).
    ProbeMarked = 7,
    /// A kubelet connection could not be given the probe source: it is captured like any
    /// other host connection (judged as plaintext from the node).
    ProbeMarkFailed = 8,
    /// A process on the node tried to bind the probe source, and was refused.
    ProbeSourceBindRefused = 9,
    /// `sk_lookup` let a kubelet probe through to the app.
    InboundProbePassed = 10,
    /// The splice program sent a received chunk out on the peer socket.
    SpliceRedirected = 11,
    /// The splice program had no peer for a socket (or the peer was gone): the chunk was
    /// dropped, and the agent resets the connection.
    SpliceNoPeer = 12,
    /// A DNS datagram to port 53 was sent to the agent's DNS listener instead.
    DnsRedirected = 13,
    /// An answer from the agent's DNS listener was given the resolver's address back.
    DnsReplyRewritten = 14,
}

impl Counter {
    /// Number of counters; the size of [`MAP_COUNTERS`].
    pub const COUNT: u32 = 16;
    pub const ALL: [Counter; 15] = [
        Counter::Connect4Redirected,
        Counter::Connect6Redirected,
        Counter::RedirectRecordFailed,
        Counter::OrigDstPublished,
        Counter::InboundSteered,
        Counter::InboundDroppedNoListener,
        Counter::PeerNameRewritten,
        Counter::ProbeMarked,
        Counter::ProbeMarkFailed,
        Counter::ProbeSourceBindRefused,
        Counter::InboundProbePassed,
        Counter::SpliceRedirected,
        Counter::SpliceNoPeer,
        Counter::DnsRedirected,
        Counter::DnsReplyRewritten,
    ];

    /// Stable snake_case name for logs, metrics and `ambitctl`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Redirected => "connect4_redirected",
            Counter::Connect6Redirected => "connect6_redirected",
            Counter::RedirectRecordFailed => "redirect_record_failed",
            Counter::OrigDstPublished => "orig_dst_published",
            Counter::InboundSteered => "inbound_steered",
            Counter::InboundDroppedNoListener => "inbound_dropped_no_listener",
            Counter::PeerNameRewritten => "peername_rewritten",
            Counter::ProbeMarked => "probe_marked",
            Counter::ProbeMarkFailed => "probe_mark_failed",
            Counter::ProbeSourceBindRefused => "probe_source_bind_refused",
            Counter::InboundProbePassed => "inbound_probe_passed",
            Counter::SpliceRedirected => "splice_redirected",
            Counter::SpliceNoPeer => "splice_no_peer",
            Counter::DnsRedirected => "dns_redirected",
            Counter::DnsReplyRewritten => "dns_reply_rewritten",
        }
    }
}

/// `AF_INET` and `AF_INET6` as stored in [`Addr::family`].
pub const FAMILY_INET: u8 = 2;
pub const FAMILY_INET6: u8 = 10;

/// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`), in network byte order as
/// stored in memory.
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// A socket address: an IPv6 address (IPv4 mapped) and a port in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr {
    /// Address bytes in network order, four at a time.
    pub ip: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    /// The family the application used: [`FAMILY_INET`] or [`FAMILY_INET6`].
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Addr>() == 20);

impl Addr {
    /// An IPv4 address as the kernel stores it (`user_ip4`, network order) and a host-order port.
    #[inline(always)]
    pub const fn v4(ip4: u32, port: u16) -> Self {
        Addr {
            ip: [0, 0, V4_MAPPED_WORD, ip4],
            port,
            family: FAMILY_INET,
            _pad: 0,
        }
    }

    #[inline(always)]
    pub const fn v6(ip6: [u32; 4], port: u16) -> Self {
        Addr {
            ip: ip6,
            port,
            family: FAMILY_INET6,
            _pad: 0,
        }
    }
}

/// Key of [`MAP_ORIG_DST`]: a redirected client socket's local address inside its netns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketKey {
    pub netns_cookie: u64,
    /// Address bytes in network order (IPv4 mapped).
    pub ip: [u32; 4],
    /// Port, host byte order.
    pub port: u16,
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<SocketKey>() == 32);

/// An IP address (IPv4 mapped) used as a map key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub ip: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<IpKey>() == 16);

/// Value of [`MAP_ENROLLED`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EnrolledPod {
    /// The agent's id for the pod (for logs and `ambitctl`).
    pub pod_id: u32,
    /// Per-pod options: [`POD_DNS`].
    pub flags: u32,
    /// The pod's IPv4 address as the kernel stores it (network order), 0 if none. A redirected
    /// socket is bound to 127.0.0.1; `getsockname4` reports this address instead.
    pub ip4: u32,
    /// The pod's IPv6 address (network-order words), all zero if none; for `getsockname6`.
    pub ip6: [u32; 4],
}
const _: () = assert!(core::mem::size_of::<EnrolledPod>() == 28);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all four types are `#[repr(C)]`, `Copy`, contain only integers and have explicit
    // padding fields, so every bit pattern is valid and no byte is uninitialised.
    #![allow(unsafe_code)]
    use super::*;
    unsafe impl aya::Pod for Addr {}
    unsafe impl aya::Pod for SocketKey {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for EnrolledPod {}
}
