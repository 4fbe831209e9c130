//! Ambit's eBPF programs: the kernel half of traffic capture, replacing istio-cni's iptables.
//!
//! Outbound (attached to the node's pods' cgroup):
//! - `connect4`/`connect6`: a TCP socket of an enrolled pod netns that connects to a non-loopback,
//!   non-excluded destination is sent to the pod-local outbound listener (127.0.0.1:15001 or
//!   [::1]:15001); the original destination is recorded by socket cookie.
//! - `sock_ops` (TCP connect): once the kernel has chosen the client's local port, publish
//!   "client local address -> original destination" for the agent, which looks it up with the peer
//!   address of the connection it accepted. On close, forget the socket.
//! - `getpeername4/6`: the application sees the destination it dialed, not the listener, and
//!   `getsockname4/6` its pod's IP rather than the loopback address the redirect bound it to.
//! - DNS, for pods with `POD_DNS`: a UDP datagram to port 53 (`connect4/6` of a UDP socket,
//!   `dns_sendmsg4/6`) goes to the agent's DNS listener in the pod (127.0.0.1 / [::1]:15053),
//!   the resolver it was for recorded by socket cookie and, for the agent, by netns;
//!   `dns_recvmsg4/6` and `getpeername4/6` give the answers the resolver's address back. TCP
//!   to port 53 is captured like any TCP.
//!
//! Inbound (one link per enrolled pod netns):
//! - `sk_lookup`: TCP connections arriving from outside the pod for its ports are handed to the
//!   agent's 15006 listener in that netns. 15008 (HBONE), excluded ports, kubelet probes (from
//!   the probe source address) and anything arriving on loopback (the agent's own connections to
//!   the app) pass.
//!
//! Kubelet probes (attached to the kubelet's cgroup, and to the host's):
//! - `probe_connect4/6`: a kubelet connection to an enrolled pod's IP is bound to the probe
//!   source address (`bpf_bind`), the one source `sk_lookup` lets through: probes reach the app
//!   as they would without the mesh, every other host connection is captured and judged.
//! - `bind_guard4/6`: no process of the host may bind the probe source itself (`bpf_bind` does
//!   not run this hook, so only the probe marker can).
//!
//! Same-node splice (on the agent's own sockets, not a cgroup):
//! - `splice` (`sk_skb` stream verdict on the `AMBIT_SPLICE` sockhash): a connection between two pods of this
//!   node, once the agent has admitted it, is carried by the kernel: each chunk the agent's
//!   socket on one side receives is sent out on its socket on the other side, without a copy
//!   into the agent. The agent keeps both sockets (to count, list and close the connection).
//!
//! The agent's sockets carry `SO_MARK` [`AGENT_MARK`] and are never redirected. Everything fails
//! closed: a redirect that cannot be recorded is refused, and an enrolled pod whose listener is gone
//! (agent down) refuses inbound plaintext rather than delivering it around the mesh.
#![no_std]
#![no_main]
// eBPF programs read their context and maps through raw pointers and helpers: unsafe is the
// medium here, so every block says why it holds (the workspace denies unsafe everywhere else).
#![allow(unsafe_code)]
#![deny(clippy::undocumented_unsafe_blocks)]

use ambit_common::{
    AGENT_MARK, AGENT_MARK_MASK, Addr, Counter, DNS_PORT, EnrolledPod, HBONE_PORT, INBOUND_PORT,
    IpKey, MAX_CONFIG_ENTRIES, MAX_CONNECTIONS, MAX_POD_IPS, MAX_PODS, MAX_SPLICED_SOCKETS,
    OUTBOUND_PORT, POD_DNS, PROBE_SOURCE4, PROBE_SOURCE6, SocketKey, V4_MAPPED_WORD,
};
use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB, bpf_sock,
        bpf_sock_addr, sk_action, sockaddr,
    },
    helpers::{bpf_bind, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops, stream_verdict},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkBuffContext, SkLookupContext, SockAddrContext, SockOpsContext},
};
use aya_log_ebpf::{debug, warn};

const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const DNS: u16 = 53;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const TCP_CLOSE: u32 = 7;
const ENOENT: i32 = 2;
/// `cgroup/*` verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;
/// The loopback device is ifindex 1 in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;

const LOCALHOST4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
const LOCALHOST6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];

#[map(name = "AMBIT_ENROLLED")]
static ENROLLED: HashMap<u64, EnrolledPod> = HashMap::pinned(MAX_PODS, 0);

/// Netns cookie -> the resolver its last captured DNS datagram was for: where the agent sends
/// the queries it does not answer itself.
#[map(name = "AMBIT_DNS_RESOLVER")]
static DNS_RESOLVER: LruHashMap<u64, Addr> = LruHashMap::pinned(MAX_PODS, 0);

#[map(name = "AMBIT_SOCK_DST")]
static SOCK_DST: LruHashMap<u64, Addr> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map(name = "AMBIT_ORIG_DST")]
static ORIG_DST: LruHashMap<SocketKey, Addr> = LruHashMap::pinned(MAX_CONNECTIONS, 0);

#[map(name = "AMBIT_INBOUND")]
static INBOUND: SockHash<IpKey> = SockHash::pinned(MAX_POD_IPS, 0);

#[map(name = "AMBIT_POD_IPS")]
static POD_IPS: HashMap<IpKey, u8> = HashMap::pinned(MAX_POD_IPS, 0);

#[map(name = "AMBIT_EXCL_OUT")]
static EXCLUDED_OUT: HashMap<u16, u8> = HashMap::pinned(MAX_CONFIG_ENTRIES, 0);

#[map(name = "AMBIT_EXCL_IN")]
static EXCLUDED_IN: HashMap<u16, u8> = HashMap::pinned(MAX_CONFIG_ENTRIES, 0);

#[map(name = "AMBIT_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::COUNT, 0);

#[map(name = "AMBIT_SPLICE_SOCKS")]
static SPLICE_SOCKETS: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "AMBIT_SPLICE")]
static SPLICE: SockHash<u64> = SockHash::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[map(name = "AMBIT_SPLICE_PEER")]
static SPLICE_PEER: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SPLICED_SOCKETS, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

// Context fields are read and written one 32-bit word at a time: the verifier rejects wider
// accesses to `user_ip6`, `local_ip6` and friends.
macro_rules! read {
    ($place:expr) => {
        // SAFETY: `$place` is a field of the program's context, which the verifier bounds-checks.
        unsafe { core::ptr::read_volatile(&raw const $place) }
    };
}
macro_rules! write {
    ($place:expr, $val:expr) => {
        // SAFETY: as for `read!`; the fields written here are writable for this program type.
        unsafe { core::ptr::write_volatile(&raw mut $place, $val) }
    };
}

/// Reads a 16-byte address field of the context (`read6!((*sa).user_ip6)`).
macro_rules! read6 {
    ($place:expr) => {
        // SAFETY: `$place` is a 16-byte address field of the program's context; taking its
        // address reads nothing, and `read_ip6` reads it in verifier-accepted words.
        read_ip6(unsafe { &raw const $place })
    };
}
/// Writes a 16-byte address field of the context (`write6!((*sa).user_ip6, ip)`).
macro_rules! write6 {
    ($place:expr, $val:expr) => {
        // SAFETY: as for `read6!`; the fields written here are writable for this program type.
        write_ip6(unsafe { &raw mut $place }, $val)
    };
}

/// Reads a 16-byte address field one word at a time.
#[inline(always)]
fn read_ip6(words: *const [u32; 4]) -> [u32; 4] {
    let w = words.cast::<u32>();
    // SAFETY: `words` points at a 16-byte context field, so every word is in bounds.
    unsafe {
        [
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
            core::ptr::read_volatile(w.add(2)),
            core::ptr::read_volatile(w.add(3)),
        ]
    }
}

/// Writes a 16-byte address field one word at a time.
#[inline(always)]
fn write_ip6(words: *mut [u32; 4], ip: [u32; 4]) {
    let w = words.cast::<u32>();
    // SAFETY: as for `read_ip6`.
    unsafe {
        core::ptr::write_volatile(w, ip[0]);
        core::ptr::write_volatile(w.add(1), ip[1]);
        core::ptr::write_volatile(w.add(2), ip[2]);
        core::ptr::write_volatile(w.add(3), ip[3]);
    }
}

#[inline(always)]
fn is_v4_mapped(ip: &[u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD
}

/// Loopback and unspecified destinations stay inside the pod and are never captured.
#[inline(always)]
fn is_local4(ip4: u32) -> bool {
    let first = ip4.to_ne_bytes()[0];
    first == 127 || ip4 == 0
}

#[inline(always)]
fn is_local6(ip: &[u32; 4]) -> bool {
    if is_v4_mapped(ip) {
        return is_local4(ip[3]);
    }
    let unspecified = ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == 0;
    unspecified || *ip == LOCALHOST6
}

/// Common checks for all the `cgroup/sock_addr` programs: a TCP socket of an enrolled netns that
/// the agent did not open. Returns the pod's enrollment entry.
#[inline(always)]
fn captured_pod(ctx: &SockAddrContext) -> Option<EnrolledPod> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if read!((*sa).protocol) != IPPROTO_TCP {
        return None;
    }
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once and not kept.
    let pod = unsafe { ENROLLED.get(&netns) }.copied()?;
    // `sk` of a sock_addr context is a valid full socket for the program's duration.
    let sk: *mut bpf_sock = read!((*sa).__bindgen_anon_1.sk);
    let mark = read!((*sk).mark);
    (mark & AGENT_MARK_MASK != AGENT_MARK).then_some(pod)
}

/// A UDP socket of a pod whose DNS the agent serves, that the agent did not open: its netns
/// cookie.
#[inline(always)]
fn dns_pod(ctx: &SockAddrContext) -> Option<u64> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    if read!((*sa).protocol) != IPPROTO_UDP {
        return None;
    }
    // SAFETY: the helper only reads the context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: the value is copied out at once and not kept.
    let pod = unsafe { ENROLLED.get(&netns) }.copied()?;
    if pod.flags & POD_DNS == 0 {
        return None;
    }
    let sk: *mut bpf_sock = read!((*sa).__bindgen_anon_1.sk);
    let mark = read!((*sk).mark);
    (mark & AGENT_MARK_MASK != AGENT_MARK).then_some(netns)
}

/// Sends a DNS datagram for `orig` to the agent's listener at `listener` (`None`: not a DNS
/// datagram of a served pod, untouched). Refused when the resolver cannot be recorded: the
/// answer could not be given its address back.
#[inline(always)]
fn redirect_dns(ctx: &SockAddrContext, orig: &Addr) -> Option<i32> {
    let netns = dns_pod(ctx)?;
    if orig.port != DNS {
        return None;
    }
    if !record(ctx, orig) {
        return Some(REJECT);
    }
    // LRU: an insert makes room. A failure only costs forwarding to the configured upstream.
    let _ = DNS_RESOLVER.insert(&netns, orig, 0);
    count(Counter::DnsRedirected);
    Some(ALLOW)
}

/// Records the original destination for this socket; on failure the connect is refused, so a
/// capture never silently turns into a direct connection.
#[inline(always)]
fn record(ctx: &SockAddrContext, orig: &Addr) -> bool {
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if SOCK_DST.insert(&cookie, orig, 0).is_err() {
        count(Counter::RedirectRecordFailed);
        warn!(
            ctx,
            "ambit: cannot record original destination; refusing connect"
        );
        return false;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn ambit_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect4(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    if let Some(verdict) = dns4(ctx) {
        return Ok(verdict);
    }
    if captured_pod(ctx).is_none() {
        return Ok(ALLOW);
    }
    // SAFETY: context fields of a connect4 program.
    let ip4 = read!((*sa).user_ip4);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    if is_local4(ip4) || excluded_out(port) {
        return Ok(ALLOW);
    }
    if !record(ctx, &Addr::v4(ip4, port)) {
        return Err(REJECT);
    }
    write!((*sa).user_ip4, LOCALHOST4);
    write!((*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    count(Counter::Connect4Redirected);
    debug!(
        ctx,
        "ambit: connect4 to {:i}:{} redirected",
        u32::from_be(ip4),
        port
    );
    Ok(ALLOW)
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_connect6(ctx: SockAddrContext) -> i32 {
    match try_connect6(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_connect6(ctx: &SockAddrContext) -> Result<i32, i32> {
    let sa = ctx.sock_addr;
    if let Some(verdict) = dns6(ctx) {
        return Ok(verdict);
    }
    if captured_pod(ctx).is_none() {
        return Ok(ALLOW);
    }
    let ip = read6!((*sa).user_ip6);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    if is_local6(&ip) || excluded_out(port) {
        return Ok(ALLOW);
    }
    // A dual-stack socket dialing an IPv4-mapped address is an IPv4 connection: send it to the
    // IPv4 listener, which exists even where the pod has IPv6 disabled.
    let (orig, listener) = if is_v4_mapped(&ip) {
        (Addr::v4(ip[3], port), [0, 0, V4_MAPPED_WORD, LOCALHOST4])
    } else {
        (Addr::v6(ip, port), LOCALHOST6)
    };
    if !record(ctx, &orig) {
        return Err(REJECT);
    }
    write6!((*sa).user_ip6, listener);
    write!((*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    count(Counter::Connect6Redirected);
    debug!(ctx, "ambit: connect6 to port {} redirected", port);
    Ok(ALLOW)
}

/// `connect4` of a UDP socket and `sendmsg4`: a DNS datagram goes to the agent's listener.
#[inline(always)]
fn dns4(ctx: &SockAddrContext) -> Option<i32> {
    let sa = ctx.sock_addr;
    let ip4 = read!((*sa).user_ip4);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    let verdict = redirect_dns(ctx, &Addr::v4(ip4, port))?;
    if verdict == ALLOW {
        write!((*sa).user_ip4, LOCALHOST4);
        write!((*sa).user_port, u32::from(DNS_PORT.to_be()));
    }
    Some(verdict)
}

/// `connect6` of a UDP socket and `sendmsg6`; an IPv4-mapped resolver goes to the IPv4-mapped
/// listener.
#[inline(always)]
fn dns6(ctx: &SockAddrContext) -> Option<i32> {
    let sa = ctx.sock_addr;
    let ip = read6!((*sa).user_ip6);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    let (orig, listener) = if is_v4_mapped(&ip) {
        (Addr::v4(ip[3], port), [0, 0, V4_MAPPED_WORD, LOCALHOST4])
    } else {
        (Addr::v6(ip, port), LOCALHOST6)
    };
    let verdict = redirect_dns(ctx, &orig)?;
    if verdict == ALLOW {
        write6!((*sa).user_ip6, listener);
        write!((*sa).user_port, u32::from(DNS_PORT.to_be()));
    }
    Some(verdict)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn ambit_dns_sendmsg4(ctx: SockAddrContext) -> i32 {
    dns4(&ctx).unwrap_or(ALLOW)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn ambit_dns_sendmsg6(ctx: SockAddrContext) -> i32 {
    dns6(&ctx).unwrap_or(ALLOW)
}

/// The resolver a DNS answer from the agent's listener stands for, if this is one.
#[inline(always)]
fn dns_resolver(ctx: &SockAddrContext, from_listener: bool) -> Option<Addr> {
    if !from_listener {
        return None;
    }
    dns_pod(ctx)?;
    redirected_to(ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn ambit_dns_recvmsg4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip4 = read!((*sa).user_ip4);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    if let Some(orig) = dns_resolver(&ctx, ip4 == LOCALHOST4 && port == DNS_PORT) {
        write!((*sa).user_ip4, orig.ip[3]);
        write!((*sa).user_port, u32::from(orig.port.to_be()));
        count(Counter::DnsReplyRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg6)]
pub fn ambit_dns_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = read6!((*sa).user_ip6);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    let listener = ip == LOCALHOST6 || (is_v4_mapped(&ip) && ip[3] == LOCALHOST4);
    if let Some(orig) = dns_resolver(&ctx, listener && port == DNS_PORT) {
        write6!((*sa).user_ip6, orig.ip);
        write!((*sa).user_port, u32::from(orig.port.to_be()));
        count(Counter::DnsReplyRewritten);
    }
    ALLOW
}

#[inline(always)]
fn excluded_out(port: u16) -> bool {
    // SAFETY: the value is not kept.
    unsafe { EXCLUDED_OUT.get(&port) }.is_some()
}

/// The original destination of a redirected socket, if `(ip, port)` is the outbound listener.
#[inline(always)]
fn original_peer(ctx: &SockAddrContext, is_listener: bool) -> Option<Addr> {
    if !is_listener {
        return None;
    }
    captured_pod(ctx)?;
    redirected_to(ctx)
}

/// The recorded original destination of this socket, if `connect4/6` redirected it.
#[inline(always)]
fn redirected_to(ctx: &SockAddrContext) -> Option<Addr> {
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    unsafe { SOCK_DST.get(&cookie) }.copied()
}

/// The pod whose redirected socket this is, if its local address is the loopback one the redirect
/// gave it.
#[inline(always)]
fn redirected_pod(ctx: &SockAddrContext, is_loopback: bool) -> Option<EnrolledPod> {
    if !is_loopback {
        return None;
    }
    let pod = captured_pod(ctx)?;
    redirected_to(ctx)?;
    Some(pod)
}

#[cgroup_sock_addr(getpeername4)]
pub fn ambit_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip4 = read!((*sa).user_ip4);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    let orig = original_peer(&ctx, ip4 == LOCALHOST4 && port == OUTBOUND_PORT)
        .or_else(|| dns_resolver(&ctx, ip4 == LOCALHOST4 && port == DNS_PORT));
    if let Some(orig) = orig {
        write!((*sa).user_ip4, orig.ip[3]);
        write!((*sa).user_port, u32::from(orig.port.to_be()));
        count(Counter::PeerNameRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn ambit_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = read6!((*sa).user_ip6);
    let port = u16::from_be(read!((*sa).user_port) as u16);
    let listener = ip == LOCALHOST6 || (is_v4_mapped(&ip) && ip[3] == LOCALHOST4);
    let orig = original_peer(&ctx, listener && port == OUTBOUND_PORT)
        .or_else(|| dns_resolver(&ctx, listener && port == DNS_PORT));
    if let Some(orig) = orig {
        write6!((*sa).user_ip6, orig.ip);
        write!((*sa).user_port, u32::from(orig.port.to_be()));
        count(Counter::PeerNameRewritten);
    }
    ALLOW
}

#[cgroup_sock_addr(getsockname4)]
pub fn ambit_getsockname4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip4 = read!((*sa).user_ip4);
    if let Some(pod) = redirected_pod(&ctx, ip4 == LOCALHOST4)
        && pod.ip4 != 0
    {
        write!((*sa).user_ip4, pod.ip4);
    }
    ALLOW
}

#[cgroup_sock_addr(getsockname6)]
pub fn ambit_getsockname6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = read6!((*sa).user_ip6);
    let mapped = is_v4_mapped(&ip) && ip[3] == LOCALHOST4;
    if let Some(pod) = redirected_pod(&ctx, ip == LOCALHOST6 || mapped) {
        let local = if mapped {
            (pod.ip4 != 0).then_some([0, 0, V4_MAPPED_WORD, pod.ip4])
        } else {
            (pod.ip6 != [0; 4]).then_some(pod.ip6)
        };
        if let Some(local) = local {
            write6!((*sa).user_ip6, local);
        }
    }
    ALLOW
}

#[sock_ops]
pub fn ambit_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_TCP_CONNECT_CB => on_connect(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => on_close(&ctx),
        _ => {}
    }
    0
}

/// The client's local address, as the agent will see the peer of the accepted connection.
#[inline(always)]
fn local_key(ctx: &SockOpsContext) -> SocketKey {
    // SAFETY: the helper only reads the context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // Read both forms unconditionally and pick the value: branching on the family makes LLVM
    // compute the field offset, and the verifier refuses a variable offset into the context.
    let ops = ctx.ops;
    let v4 = read!((*ops).local_ip4);
    let v6 = read6!((*ops).local_ip6);
    let ip = if read!((*ops).family) == AF_INET {
        [0, 0, V4_MAPPED_WORD, v4]
    } else {
        v6
    };
    SocketKey {
        netns_cookie,
        ip,
        // `local_port` is in host byte order (unlike `remote_port`).
        port: read!((*ops).local_port) as u16,
        _pad: [0; 6],
    }
}

#[inline(always)]
fn on_connect(ctx: &SockOpsContext) {
    let family = ctx.family();
    if family != AF_INET && family != AF_INET6 {
        return;
    }
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(orig) = (unsafe { SOCK_DST.get(&cookie) }).copied() else {
        return;
    };
    let key = local_key(ctx);
    if ORIG_DST.insert(&key, &orig, 0).is_err() {
        warn!(ctx, "ambit: cannot publish original destination");
        return;
    }
    count(Counter::OrigDstPublished);
    // Ask for state changes so both entries go when the socket closes.
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    debug!(
        ctx,
        "ambit: original destination published for local port {}", key.port
    );
}

#[inline(always)]
fn on_close(ctx: &SockOpsContext) {
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_DST.remove(&cookie);
    let _ = ORIG_DST.remove(&local_key(ctx));
}

#[sk_lookup]
pub fn ambit_sk_lookup(ctx: SkLookupContext) -> u32 {
    match try_sk_lookup(&ctx) {
        Ok(v) | Err(v) => v,
    }
}

fn try_sk_lookup(ctx: &SkLookupContext) -> Result<u32, u32> {
    let pass = sk_action::SK_PASS;
    let lk = ctx.lookup;
    // SAFETY: context fields of an sk_lookup program.
    if read!((*lk).protocol) != IPPROTO_TCP {
        return Ok(pass);
    }
    // Loopback: the agent connecting to the app for a connection it already accepted (its
    // transparent sockets are bound to `lo`), or the pod talking to itself over 127.0.0.1. Never
    // steer it (that would loop). Note a pod dialing its *own pod IP* arrives with the ifindex of
    // the device owning that IP, not `lo`, and is steered like any other client.
    let ifindex = read!((*lk).ingress_ifindex);
    if ifindex == LOOPBACK_IFINDEX {
        return Ok(pass);
    }
    let port = read!((*lk).local_port) as u16;
    // SAFETY: the value is not kept.
    if port == HBONE_PORT || unsafe { EXCLUDED_IN.get(&port) }.is_some() {
        return Ok(pass);
    }
    // As in `local_key`: read every form, then choose values, never field offsets.
    let family = read!((*lk).family);
    let remote4 = read!((*lk).remote_ip4);
    let local4 = read!((*lk).local_ip4);
    let remote6 = read6!((*lk).remote_ip6);
    let local6 = read6!((*lk).local_ip6);
    let (remote, local) = if family == AF_INET {
        (
            [0, 0, V4_MAPPED_WORD, remote4],
            [0, 0, V4_MAPPED_WORD, local4],
        )
    } else {
        (remote6, local6)
    };
    // A kubelet probe: its source is the probe address, which only the probe marker can give
    // (the bind guard refuses it to everyone else on the node, and a reply to it from the pod
    // goes to the node, so no other host can complete a handshake from it).
    if remote == [0, 0, V4_MAPPED_WORD, PROBE_SOURCE4] || remote == PROBE_SOURCE6 {
        count(Counter::InboundProbePassed);
        return Ok(pass);
    }
    match INBOUND.redirect_sk_lookup(ctx, IpKey { ip: local }, 0) {
        Ok(()) => {
            count(Counter::InboundSteered);
            debug!(
                ctx,
                "ambit: inbound connection to port {} (ifindex {}) steered to {}",
                port,
                ifindex,
                INBOUND_PORT
            );
            Ok(pass)
        }
        Err(err) => {
            // The pod is enrolled (this program is attached to its netns) but has no listener:
            // the agent is down or restarting. Refuse rather than bypass the mesh.
            count(Counter::InboundDroppedNoListener);
            if err != -ENOENT {
                warn!(ctx, "ambit: sk_assign failed: {}", err);
            }
            Err(sk_action::SK_DROP)
        }
    }
}

/// `struct sockaddr_in`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port: u16,
    addr: u32,
    zero: [u8; 8],
}

/// `struct sockaddr_in6`, for `bpf_bind`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    port: u16,
    flowinfo: u32,
    addr: [u32; 4],
    scope_id: u32,
}

/// Whether `ip` (IPv6 words, IPv4 mapped) is an enrolled pod's.
#[inline(always)]
fn is_pod_ip(ip: [u32; 4]) -> bool {
    // SAFETY: the value is not kept.
    unsafe { POD_IPS.get(&IpKey { ip }) }.is_some()
}

/// Binds the socket to the probe source; counts the outcome. The connect goes on either way:
/// unmarked, it is captured and judged like any host connection (fail closed).
#[inline(always)]
fn mark_probe(ctx: &SockAddrContext, addr: *mut sockaddr, len: usize) {
    // SAFETY: `addr` points at a fully initialised sockaddr of `len` bytes on this stack.
    let r = unsafe { bpf_bind(ctx.sock_addr, addr, len as i32) };
    if r == 0 {
        count(Counter::ProbeMarked);
    } else {
        count(Counter::ProbeMarkFailed);
        warn!(
            ctx,
            "ambit: cannot bind a kubelet probe to the probe source: {}", r
        );
    }
}

#[cgroup_sock_addr(connect4)]
pub fn ambit_probe_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if read!((*sa).protocol) != IPPROTO_TCP {
        return ALLOW;
    }
    let ip4 = read!((*sa).user_ip4);
    if is_pod_ip([0, 0, V4_MAPPED_WORD, ip4]) {
        let mut addr = SockaddrIn {
            family: AF_INET as u16,
            port: 0,
            addr: PROBE_SOURCE4,
            zero: [0; 8],
        };
        mark_probe(
            &ctx,
            (&raw mut addr).cast(),
            core::mem::size_of::<SockaddrIn>(),
        );
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn ambit_probe_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if read!((*sa).protocol) != IPPROTO_TCP {
        return ALLOW;
    }
    let ip = read6!((*sa).user_ip6);
    // A dual-stack socket to an IPv4-mapped pod address is IPv4: bind the mapped probe source.
    if is_pod_ip(ip) {
        let source = if is_v4_mapped(&ip) {
            [0, 0, V4_MAPPED_WORD, PROBE_SOURCE4]
        } else {
            PROBE_SOURCE6
        };
        let mut addr = SockaddrIn6 {
            family: AF_INET6 as u16,
            port: 0,
            flowinfo: 0,
            addr: source,
            scope_id: 0,
        };
        mark_probe(
            &ctx,
            (&raw mut addr).cast(),
            core::mem::size_of::<SockaddrIn6>(),
        );
    }
    ALLOW
}

#[cgroup_sock_addr(bind4)]
pub fn ambit_bind_guard4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    if read!((*sa).user_ip4) == PROBE_SOURCE4 {
        count(Counter::ProbeSourceBindRefused);
        return REJECT;
    }
    ALLOW
}

#[cgroup_sock_addr(bind6)]
pub fn ambit_bind_guard6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let ip = read6!((*sa).user_ip6);
    if ip == PROBE_SOURCE6 || ip == [0, 0, V4_MAPPED_WORD, PROBE_SOURCE4] {
        count(Counter::ProbeSourceBindRefused);
        return REJECT;
    }
    ALLOW
}

/// A chunk a spliced socket received goes out on its peer (the agent's socket on the other side
/// of the connection). The agent pairs the sockets in [`SPLICE_PEER`] and puts both in
/// [`SPLICE_SOCKETS`] *before* it adds either to [`SPLICE`], so a peer is always there; if one
/// is not (the agent is closing the connection), the chunk is dropped and counted: never passed
/// up to the agent's socket, whose reader is gone.
#[stream_verdict]
pub fn ambit_splice(ctx: SkBuffContext) -> u32 {
    // A bare FIN arrives as an empty chunk. Sent on, it would break the peer's transmit queue
    // (an empty send is an error there); the agent passes the FIN on itself, after the bytes.
    if ctx.len() == 0 {
        return sk_action::SK_DROP;
    }
    // SAFETY: the helper only reads the context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: copied out at once.
    let Some(peer) = (unsafe { SPLICE_PEER.get(&cookie) }).copied() else {
        count(Counter::SpliceNoPeer);
        return sk_action::SK_DROP;
    };
    let verdict = SPLICE_SOCKETS.redirect_skb(&ctx, peer, 0);
    if verdict == i64::from(sk_action::SK_PASS) {
        count(Counter::SpliceRedirected);
    } else {
        count(Counter::SpliceNoPeer);
    }
    verdict as u32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
