//! The DNS proxy's decisions (`dns.capture`, per pod `ambient.istio.io/dns-capture`), as
//! ztunnel's; its sockets are [`crate::proxy::dns`]'s. The
//! eBPF programs send an enrolled pod's DNS (UDP to port 53; TCP to port 53 is captured like any
//! TCP) to the agent's listener in the pod, which answers the names the mesh knows from the
//! agent's state and forwards everything else to the resolver the pod asked.
//!
//! ```text
//! app ──UDP :53──> (sendmsg/connect hook) 127.0.0.1:15053 in the pod ──┬─ mesh name: answered
//!  ^                                                                    └─ else: forwarded from
//!  └── reply, its source given back the resolver's address (recvmsg hook)   the pod to its resolver
//! ```
//!
//! - Names the mesh knows: a service's hostname (`echo.default.svc.cluster.local`, a
//!   ServiceEntry host, `*.example.com` wildcard hosts matching one label or more), answered
//!   with its VIPs (A for IPv4, AAAA for IPv6; a known name without an address of the asked
//!   family gets an empty answer, not a forward). Search domains and `ndots` are the stub
//!   resolver's: it sends the expanded names, and only exact names are answered.
//! - Everything else (other names, other record types) goes to the resolver the pod's query was
//!   for, recorded by the eBPF programs per netns (else `dns.upstreams`), from inside the pod,
//!   with a timeout; no answer in time is SERVFAIL.
//! - A query that does not parse gets FORMERR (when its header can be read) and is counted; an
//!   answer larger than the client can take over UDP (512 bytes, or its EDNS size) is sent
//!   truncated (TC) so it asks again over TCP.

use std::net::IpAddr;

use simple_dns::{
    CLASS, Name, PacketFlag, QTYPE, RCODE, ResourceRecord, TYPE,
    rdata::{A, AAAA, RData},
};

use crate::state::{ServiceDef, Snapshot};

/// TTL of the answers for mesh names: short, as the mesh's state can change.
pub const TTL: u32 = 30;
/// What a UDP client takes without EDNS (RFC 1035).
pub const UDP_PLAIN: usize = 512;
/// The largest UDP answer sent whatever the client's EDNS says.
pub const UDP_MAX: usize = 4096;

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answered from the mesh's state: the reply, the name, and the addresses given.
    Mesh {
        reply: Vec<u8>,
        name: String,
        addrs: Vec<IpAddr>,
    },
    /// Not a mesh name (or not an A/AAAA question): for the pod's resolver.
    Forward { name: String },
    /// Not a DNS query the proxy can read: FORMERR when its header could be read.
    Malformed { reply: Option<Vec<u8>>, why: String },
}

/// Judges `query` against the services in `snapshot`.
pub fn answer(query: &[u8], snapshot: &Snapshot) -> Reply {
    let packet = match simple_dns::Packet::parse(query) {
        Ok(p) => p,
        Err(e) => {
            return Reply::Malformed {
                reply: format_error(query),
                why: e.to_string(),
            };
        }
    };
    if packet.has_flags(PacketFlag::RESPONSE) || packet.questions.len() != 1 {
        return Reply::Malformed {
            reply: format_error(query),
            why: format!(
                "expected one question in a query, got {} question(s){}",
                packet.questions.len(),
                if packet.has_flags(PacketFlag::RESPONSE) {
                    " in a response"
                } else {
                    ""
                }
            ),
        };
    }
    let q = &packet.questions[0];
    let name = q.qname.to_string().to_ascii_lowercase();
    let name = name.trim_end_matches('.').to_owned();
    let want_v4 = match q.qtype {
        QTYPE::TYPE(TYPE::A) => true,
        QTYPE::TYPE(TYPE::AAAA) => false,
        _ => return Reply::Forward { name },
    };
    let Some(service) = lookup(snapshot, &name) else {
        return Reply::Forward { name };
    };
    let addrs: Vec<IpAddr> = service
        .vips
        .iter()
        .copied()
        .filter(|ip| ip.is_ipv4() == want_v4)
        .collect();
    let mut reply = packet.clone().into_reply();
    reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_AVAILABLE);
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    for ip in &addrs {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A {
                address: u32::from(*v4),
            }),
            IpAddr::V6(v6) => RData::AAAA(AAAA {
                address: u128::from(*v6),
            }),
        };
        reply
            .answers
            .push(ResourceRecord::new(q.qname.clone(), CLASS::IN, TTL, rdata));
    }
    match reply.build_bytes_vec_compressed() {
        Ok(reply) => Reply::Mesh { reply, name, addrs },
        Err(e) => Reply::Malformed {
            reply: server_failure(query),
            why: format!("cannot build the answer: {e}"),
        },
    }
}

/// The service whose hostname is `name` (lowercase, no trailing dot); see
/// [`Snapshot::service_by_hostname`].
pub fn lookup<'a>(snapshot: &'a Snapshot, name: &str) -> Option<&'a ServiceDef> {
    snapshot.service_by_hostname(name)?.def.as_deref()
}

/// The UDP size the client of `query` takes (its EDNS size, at most [`UDP_MAX`]).
pub fn udp_limit(query: &[u8]) -> usize {
    simple_dns::Packet::parse(query)
        .ok()
        .and_then(|p| p.opt().map(|o| usize::from(o.udp_packet_size)))
        .map_or(UDP_PLAIN, |n| n.clamp(UDP_PLAIN, UDP_MAX))
}

/// `reply` as sent over UDP to a client taking `limit` bytes: whole if it fits, else its header
/// and question with the TC flag (the client asks again over TCP).
pub fn fit_udp(reply: Vec<u8>, limit: usize) -> Vec<u8> {
    if reply.len() <= limit {
        return reply;
    }
    match simple_dns::Packet::parse(&reply) {
        Ok(p) => {
            let mut t = simple_dns::Packet::new_reply(p.id());
            t.set_flags(PacketFlag::TRUNCATION);
            for flag in [
                PacketFlag::RECURSION_DESIRED,
                PacketFlag::RECURSION_AVAILABLE,
                PacketFlag::AUTHORITATIVE_ANSWER,
            ] {
                if p.has_flags(flag) {
                    t.set_flags(flag);
                }
            }
            *t.rcode_mut() = p.rcode();
            t.questions = p.questions.clone();
            t.build_bytes_vec()
                .unwrap_or_else(|_| header_only(&reply, 0x0200))
        }
        Err(_) => header_only(&reply, 0x0200),
    }
}

/// A reply with `rcode` to `query`, built from its header alone (the rest may not parse): its
/// id, opcode and RD kept, QR set, no sections. `None` when there is no header to answer.
fn reply_from_header(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    let mut h = [0u8; 12];
    h[0] = query[0];
    h[1] = query[1];
    // QR, the query's opcode and RD.
    h[2] = 0x80 | (query[2] & 0x79);
    // RA, and the response code.
    h[3] = 0x80 | (rcode as u8 & 0x0f);
    Some(h.to_vec())
}

/// FORMERR for a query the proxy cannot read.
pub fn format_error(query: &[u8]) -> Option<Vec<u8>> {
    reply_from_header(query, RCODE::FormatError)
}

/// SERVFAIL: the pod's resolver did not answer (in time), or the answer could not be built.
pub fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    reply_from_header(query, RCODE::ServerFailure)
}

/// The first 12 bytes of `reply` with `flags` OR-ed into its flags word and every count zero.
fn header_only(reply: &[u8], flags: u16) -> Vec<u8> {
    let mut h = reply
        .get(..12)
        .map(<[u8]>::to_vec)
        .unwrap_or_else(|| vec![0; 12]);
    let word = u16::from_be_bytes([h[2], h[3]]) | flags;
    h[2..4].copy_from_slice(&word.to_be_bytes());
    h[4..12].fill(0);
    h
}

/// A query's id, to match the upstream's answer to it.
pub fn id_of(message: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*message.first()?, *message.get(1)?]))
}

/// Builds a query for `name` (`qtype` A or AAAA) with `id`: what tests and `ambitctl` send.
pub fn query(id: u16, name: &str, v6: bool) -> Result<Vec<u8>, String> {
    let mut p = simple_dns::Packet::new_query(id);
    p.set_flags(PacketFlag::RECURSION_DESIRED);
    let qname = Name::new(name).map_err(|e| format!("{name:?} is not a DNS name: {e}"))?;
    let qtype = if v6 { TYPE::AAAA } else { TYPE::A };
    p.questions.push(simple_dns::Question::new(
        qname,
        QTYPE::TYPE(qtype),
        simple_dns::QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.build_bytes_vec().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn snapshot() -> Snapshot {
        let config = Config::parse(
            "node: n\ncgroup: /x\n\
services:
  - {namespace: default, name: echo, vips: [10.96.0.20, 'fd00:96::20'], ports: [{port: 80}]}
  - {namespace: default, name: v4only, vips: [10.96.0.21], ports: [{port: 80}]}
  - {namespace: shop, name: api, hostname: api.example.com, vips: [240.240.0.1], ports: [{port: 443}]}
  - {namespace: shop, name: wild, hostname: '*.example.com', vips: [240.240.0.2], ports: [{port: 443}]}
",
            std::path::Path::new("t.yaml"),
        )
        .expect("config");
        Snapshot::from_config(&config)
    }

    fn parsed(reply: &[u8]) -> simple_dns::Packet<'_> {
        simple_dns::Packet::parse(reply).expect("a DNS reply")
    }

    fn addresses(reply: &[u8]) -> Vec<IpAddr> {
        parsed(reply)
            .answers
            .iter()
            .filter_map(|rr| match &rr.rdata {
                RData::A(a) => Some(IpAddr::from(std::net::Ipv4Addr::from(a.address))),
                RData::AAAA(a) => Some(IpAddr::from(std::net::Ipv6Addr::from(a.address))),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_service_name_is_answered_with_its_vips_of_the_asked_family() {
        let snap = snapshot();
        let q = query(7, "echo.default.svc.cluster.local", false).expect("query");
        let Reply::Mesh { reply, name, addrs } = answer(&q, &snap) else {
            panic!("a mesh name");
        };
        assert_eq!(name, "echo.default.svc.cluster.local");
        assert_eq!(addrs, ["10.96.0.20".parse::<IpAddr>().expect("ip")]);
        assert_eq!(addresses(&reply), addrs);
        let p = parsed(&reply);
        assert_eq!(p.id(), 7);
        assert!(p.has_flags(PacketFlag::RESPONSE | PacketFlag::RECURSION_DESIRED));
        assert_eq!(p.answers[0].ttl, TTL);

        let q6 = query(8, "ECHO.default.svc.cluster.local.", true).expect("query");
        let Reply::Mesh { addrs, .. } = answer(&q6, &snap) else {
            panic!("case and the trailing dot do not matter");
        };
        assert_eq!(addrs, ["fd00:96::20".parse::<IpAddr>().expect("ip")]);

        // A known name without an address of that family: an empty answer, not a forward.
        let q = query(9, "v4only.default.svc.cluster.local", true).expect("query");
        let Reply::Mesh { reply, addrs, .. } = answer(&q, &snap) else {
            panic!("a mesh name");
        };
        assert!(addrs.is_empty());
        assert_eq!(parsed(&reply).rcode(), RCODE::NoError);
    }

    #[test]
    fn service_entry_hosts_and_wildcards_are_mesh_names_others_are_forwarded() {
        let snap = snapshot();
        let ask = |name: &str| answer(&query(1, name, false).expect("query"), &snap);
        let Reply::Mesh { addrs, .. } = ask("api.example.com") else {
            panic!("an exact host wins over the wildcard");
        };
        assert_eq!(addrs, ["240.240.0.1".parse::<IpAddr>().expect("ip")]);
        let Reply::Mesh { addrs, .. } = ask("a.b.example.com") else {
            panic!("the wildcard covers deeper names");
        };
        assert_eq!(addrs, ["240.240.0.2".parse::<IpAddr>().expect("ip")]);
        for other in [
            "example.com",
            "notexample.com",
            "echo",
            "echo.default",
            "kubernetes.io",
        ] {
            assert_eq!(ask(other), Reply::Forward { name: other.into() }, "{other}");
        }
    }

    #[test]
    fn bad_queries_get_formerr_and_headerless_ones_nothing() {
        let snap = snapshot();
        let Reply::Malformed { reply, .. } =
            answer(&[0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 9], &snap)
        else {
            panic!("a question that runs off the end");
        };
        let reply = reply.expect("a header to answer");
        assert_eq!(&reply[..2], &[0xab, 0xcd], "the query's id");
        assert_eq!(reply[3] & 0x0f, RCODE::FormatError as u8);
        assert_ne!(reply[2] & 0x80, 0, "a response");
        assert!(matches!(
            answer(&[1, 2, 3], &snap),
            Reply::Malformed { reply: None, .. }
        ));
        // A response is not a query.
        let mut q = query(3, "echo.default.svc.cluster.local", false).expect("query");
        q[2] |= 0x80;
        assert!(matches!(
            answer(&q, &snap),
            Reply::Malformed { reply: Some(_), .. }
        ));
    }

    #[test]
    fn an_answer_too_large_for_udp_is_truncated_so_the_client_uses_tcp() {
        let q = query(5, "echo.default.svc.cluster.local", false).expect("query");
        assert_eq!(udp_limit(&q), UDP_PLAIN);
        let mut big = parsed(&q).into_reply();
        let qname = big.questions[0].qname.clone();
        for i in 0..100u32 {
            big.answers.push(ResourceRecord::new(
                qname.clone(),
                CLASS::IN,
                TTL,
                RData::A(A { address: i }),
            ));
        }
        let bytes = big.build_bytes_vec().expect("bytes");
        assert!(bytes.len() > UDP_PLAIN);
        let cut = fit_udp(bytes, UDP_PLAIN);
        assert!(cut.len() <= UDP_PLAIN);
        let p = parsed(&cut);
        assert!(p.has_flags(PacketFlag::TRUNCATION));
        assert_eq!(p.id(), 5);
        assert!(p.answers.is_empty());
        assert_eq!(p.questions.len(), 1);
    }
}
