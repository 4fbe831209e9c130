//! The targets. Each panics (with what it found) when an invariant breaks.

use std::{
    cell::RefCell,
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use ambit_agent::{
    config::Config,
    identity::Identity,
    policy::{
        self, Action, Cidr, Clause, DecisionReason, DryRunResult, Match, Policy, PolicyStore, Rule,
        Scope, ServiceAccountMatch, StringMatch,
    },
    state::{Snapshot, StateWriter},
    xds::{XdsSink, address_from_proto, policy_from_proto},
};
use ambit_proto::{
    istio::{
        security as sec,
        workload::{self as wl, address},
    },
    prost::Message,
};

use crate::input::Input;

#[allow(dead_code, unused_imports, clippy::all)]
#[path = "../../agent/src/bin/ambit-cni/cni.rs"]
mod cni_plugin;

thread_local! {
    /// One runtime per fuzzing thread (a new one per input would dominate the time).
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|rt| {
        let mut rt = rt.borrow_mut();
        let rt = rt.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        });
        rt.block_on(f)
    })
}

// ---------------------------------------------------------------------------------------------
// policy

const NAMESPACES: [&str; 3] = ["default", "other", "istio-system"];
const STRINGS: [&str; 8] = [
    "",
    "default",
    "def",
    "ault",
    "cluster.local/ns/default/sa/sleep",
    "cluster.local/",
    "sa/web",
    "other",
];
const IPS: [&str; 7] = [
    "10.0.0.1",
    "10.0.1.5",
    "192.168.1.1",
    "fd00::1",
    "fd00::2:1",
    "::ffff:10.0.0.1",
    "::",
];
const PORTS: [u16; 4] = [80, 443, 8080, 15008];

fn ip(s: &str) -> IpAddr {
    s.parse().expect("a test IP")
}

fn string_match(i: &mut Input<'_>) -> StringMatch {
    let s = i.pick(&STRINGS).to_owned();
    match i.below(4) {
        0 => StringMatch::Exact(s),
        1 => StringMatch::Prefix(s),
        2 => StringMatch::Suffix(s),
        _ => StringMatch::Presence {},
    }
}

fn cidr(i: &mut Input<'_>) -> Cidr {
    let addr = ip(i.pick(&IPS));
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = i
        .pick(&[0u8, 8, 16, 24, 31, 32, 64, 96, 104, 112, 127, 128])
        .min(max);
    Cidr::new(addr, len).expect("a valid prefix length")
}

fn some<T>(i: &mut Input<'_>, f: impl FnMut(&mut Input<'_>) -> T) -> Vec<T> {
    if i.below(3) == 0 {
        i.list(2, f)
    } else {
        Vec::new()
    }
}

fn a_match(i: &mut Input<'_>) -> Match {
    let sa = |i: &mut Input<'_>| ServiceAccountMatch {
        namespace: i.pick(&["default", "other"]).to_owned(),
        service_account: i.pick(&["sleep", "web"]).to_owned(),
    };
    Match {
        namespaces: some(i, string_match),
        not_namespaces: some(i, string_match),
        service_accounts: some(i, sa),
        not_service_accounts: some(i, sa),
        principals: some(i, string_match),
        not_principals: some(i, string_match),
        source_ips: some(i, cidr),
        not_source_ips: some(i, cidr),
        destination_ips: some(i, cidr),
        not_destination_ips: some(i, cidr),
        destination_ports: some(i, |i| i.pick(&PORTS)),
        not_destination_ports: some(i, |i| i.pick(&PORTS)),
    }
}

fn a_policy(i: &mut Input<'_>) -> Policy {
    Policy {
        name: format!("p{}", i.below(5)),
        namespace: i.pick(&NAMESPACES).to_owned(),
        scope: i.pick(&[Scope::Global, Scope::Namespace, Scope::WorkloadSelector]),
        action: i.pick(&[Action::Allow, Action::Deny, Action::Audit]),
        dry_run: i.below(4) == 0,
        rules: i.list(3, |i| Rule {
            clauses: i.list(2, |i| Clause {
                matches: i.list(2, a_match),
            }),
        }),
    }
}

/// A connection as the naive evaluator sees it.
struct Conn {
    identity: Option<Identity>,
    src: IpAddr,
    dst: IpAddr,
    port: u16,
    dst_namespace: &'static str,
    named: Vec<Arc<str>>,
}

/// Whether `ip` is in `c`, bit by bit (no shared code with the store's masks): IPv4-mapped
/// addresses and blocks (`::ffff:a.b.c.d/96+`) are IPv4.
fn naive_contains(c: &Cidr, ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    let (addr, len) = match c.addr() {
        IpAddr::V6(a) if c.prefix_len() >= 96 && a.to_ipv4_mapped().is_some() => (
            IpAddr::V4(a.to_ipv4_mapped().expect("checked")),
            c.prefix_len() - 96,
        ),
        a => (a, c.prefix_len()),
    };
    let (x, y): (Vec<u8>, Vec<u8>) = match (addr, ip) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        (IpAddr::V6(a), IpAddr::V6(b)) => (a.octets().to_vec(), b.octets().to_vec()),
        _ => return false,
    };
    (0..usize::from(len))
        .all(|bit| (x[bit / 8] >> (7 - bit % 8)) & 1 == (y[bit / 8] >> (7 - bit % 8)) & 1)
}

fn naive_match(m: &Match, c: &Conn) -> bool {
    fn field<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
        (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(&f)
    }
    let principal = c.identity.as_ref().map(|id| {
        format!(
            "{}/ns/{}/sa/{}",
            id.trust_domain(),
            id.namespace(),
            id.service_account()
        )
    });
    let src_ns = c.identity.as_ref().map_or("", |id| id.namespace());
    field(&m.destination_ports, &m.not_destination_ports, |p| {
        *p == c.port
    }) && field(&m.destination_ips, &m.not_destination_ips, |n| {
        naive_contains(n, c.dst)
    }) && field(&m.source_ips, &m.not_source_ips, |n| {
        naive_contains(n, c.src)
    }) && field(&m.principals, &m.not_principals, |s| {
        principal.as_deref().is_some_and(|p| s.matches(p))
    }) && field(&m.namespaces, &m.not_namespaces, |s| s.matches(src_ns))
        && field(&m.service_accounts, &m.not_service_accounts, |sa| {
            c.identity.as_ref().is_some_and(|id| {
                id.namespace() == sa.namespace && id.service_account() == sa.service_account
            })
        })
}

/// The first rule of `p` that matches `c`: every clause has no matches or a non-empty one that
/// matches (a match with every field empty never matches).
fn naive_rule(p: &Policy, c: &Conn) -> Option<usize> {
    p.rules.iter().position(|r| {
        r.clauses.iter().all(|cl| {
            cl.matches.is_empty()
                || cl
                    .matches
                    .iter()
                    .any(|m| !m.is_empty() && naive_match(m, c))
        })
    })
}

/// Checks the store's decision for `c` against the policies read naively.
fn check_decision(policies: &BTreeMap<String, Policy>, store: &PolicyStore, c: &Conn) {
    let applies = |p: &Policy| {
        c.named.iter().any(|k| **k == *p.key())
            || match p.scope {
                Scope::Global => true,
                Scope::Namespace => p.namespace == c.dst_namespace,
                Scope::WorkloadSelector => false,
            }
    };
    let of = |action: Action, dry_run: bool| -> Vec<&Policy> {
        policies
            .values()
            .filter(|p| p.action == action && p.dry_run == dry_run && applies(p))
            .collect()
    };
    let matching = |ps: &[&Policy]| -> BTreeSet<String> {
        ps.iter()
            .filter(|p| naive_rule(p, c).is_some())
            .map(|p| p.key())
            .collect()
    };
    let d = policy::evaluate(
        store,
        &policy::Connection {
            src_identity: c.identity.as_ref(),
            src_ip: c.src,
            dst_ip: c.dst,
            dst_port: c.port,
            dst_namespace: c.dst_namespace,
            dst_policies: &c.named,
        },
    );
    let context = || format!("decision {d:?}\npolicies {policies:#?}");
    let denying = matching(&of(Action::Deny, false));
    let allow_applicable = of(Action::Allow, false);
    let allowing = matching(&allow_applicable);
    let (allowed, reason) = if !denying.is_empty() {
        (false, DecisionReason::DeniedByPolicy)
    } else if allow_applicable.is_empty() {
        (true, DecisionReason::NoAllowPolicy)
    } else if !allowing.is_empty() {
        (true, DecisionReason::AllowedByPolicy)
    } else {
        (false, DecisionReason::NoAllowPolicyMatched)
    };
    assert_eq!(d.allowed, allowed, "allowed differs: {}", context());
    assert_eq!(d.reason, reason, "reason differs: {}", context());
    if let Some(key) = &d.policy {
        let set = if allowed { &allowing } else { &denying };
        assert!(set.contains(key), "{key} did not decide: {}", context());
        let p = &policies[key];
        assert_eq!(d.rule, naive_rule(p, c), "rule differs: {}", context());
    }
    let reported = |r: DryRunResult| -> BTreeSet<String> {
        d.dry_run
            .iter()
            .filter(|h| h.result == r)
            .filter_map(|h| h.policy.clone())
            .collect()
    };
    assert_eq!(
        reported(DryRunResult::WouldDeny),
        matching(&of(Action::Deny, true)),
        "dry-run denies differ: {}",
        context()
    );
    if denying.is_empty() {
        let dry_allow = of(Action::Allow, true);
        let dry_allowing = matching(&dry_allow);
        assert_eq!(
            reported(DryRunResult::WouldAllow),
            dry_allowing,
            "dry-run allows differ: {}",
            context()
        );
        let would_deny =
            allow_applicable.is_empty() && dry_allowing.is_empty() && !dry_allow.is_empty();
        assert_eq!(
            d.dry_run
                .iter()
                .any(|h| h.result == DryRunResult::WouldDenyNoAllowMatched),
            would_deny,
            "dry-run set verdict differs: {}",
            context()
        );
    }
}

/// The policy store decides as the policies say: inserts, replacements and removals, then
/// connections of every kind, compared with a naive evaluation of the same policies.
pub fn policy(data: &[u8]) {
    let mut i = Input::new(data);
    let mut store = PolicyStore::new();
    let mut policies: BTreeMap<String, Policy> = BTreeMap::new();
    for _ in 0..i.below(12) {
        if i.below(5) == 0 {
            let key = format!("{}/p{}", i.pick(&NAMESPACES), i.below(5));
            let gone = store.remove(&key);
            assert_eq!(
                gone.is_some(),
                policies.remove(&key).is_some(),
                "remove {key}"
            );
        } else {
            let p = a_policy(&mut i);
            policies.insert(p.key(), p.clone());
            store.insert(p);
        }
    }
    assert_eq!(store.len(), policies.len());
    while !i.is_done() {
        let identity = i.flip().then(|| {
            Identity::new(
                "cluster.local",
                i.pick(&["default", "other"]),
                i.pick(&["sleep", "web", "default"]),
            )
            .expect("a valid identity")
        });
        let c = Conn {
            identity,
            src: ip(i.pick(&IPS)),
            dst: ip(i.pick(&IPS)),
            port: i.pick(&PORTS),
            dst_namespace: i.pick(&NAMESPACES),
            named: i.list(2, |i| {
                format!("{}/p{}", i.pick(&NAMESPACES), i.below(5)).into()
            }),
        };
        check_decision(&policies, &store, &c);
    }
}

// ---------------------------------------------------------------------------------------------
// xds

const WORKLOADS: usize = 4;
const SERVICES: usize = 2;
const POLICIES: usize = 3;

fn workload_name(n: usize) -> String {
    format!("Kubernetes//Pod/default/w{n}")
}

fn service_name(n: usize) -> String {
    format!("default/s{n}.default.svc.cluster.local")
}

fn policy_name(n: usize) -> String {
    format!("default/p{n}")
}

fn ip_bytes(i: &mut Input<'_>) -> Vec<u8> {
    match i.below(6) {
        0 => vec![10, 1, 0, 2],
        1 => vec![10, 1, 0, 3],
        2 => vec![10, 2, 0, 2],
        3 => std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2)
            .octets()
            .to_vec(),
        4 => vec![10, 96, 0, 1],
        // Not an address: a resource with it is rejected alone.
        _ => vec![1, 2, 3],
    }
}

/// One `Address` resource: a workload or a service from the small sets, or raw bytes.
fn address_resource(i: &mut Input<'_>) -> (String, Vec<u8>) {
    match i.below(5) {
        0..=2 => {
            let n = i.below(WORKLOADS);
            let services = i
                .list(2, |i| {
                    (
                        service_name(i.below(SERVICES)),
                        wl::PortList {
                            ports: vec![wl::Port {
                                service_port: 80,
                                target_port: i.pick(&[0, 8080]),
                                app_protocol: 0,
                            }],
                        },
                    )
                })
                .into_iter()
                .collect();
            let w = wl::Workload {
                uid: workload_name(n),
                name: format!("w{n}"),
                namespace: "default".into(),
                addresses: i.list(2, ip_bytes),
                hostname: if i.below(6) == 0 {
                    format!("w{n}.example.com")
                } else {
                    String::new()
                },
                tunnel_protocol: i.pick(&[wl::TunnelProtocol::Hbone as i32, 0, 42]),
                service_account: i.pick(&["sleep", "web", ""]).into(),
                node: i.pick(&["node-a", "node-b"]).into(),
                services,
                authorization_policies: i.list(2, |i| policy_name(i.below(POLICIES))),
                status: i.pick(&[0, 1]),
                waypoint: (i.below(4) == 0).then(|| wl::GatewayAddress {
                    destination: Some(wl::gateway_address::Destination::Address(
                        wl::NetworkAddress {
                            network: String::new(),
                            address: ip_bytes(i),
                            length: None,
                        },
                    )),
                    hbone_mtls_port: 15008,
                }),
                ..Default::default()
            };
            let a = wl::Address {
                r#type: Some(address::Type::Workload(w)),
            };
            (workload_name(n), a.encode_to_vec())
        }
        3 => {
            let n = i.below(SERVICES);
            let s = wl::Service {
                name: format!("s{n}"),
                namespace: "default".into(),
                hostname: format!("s{n}.default.svc.cluster.local"),
                addresses: i.list(2, |i| wl::NetworkAddress {
                    network: String::new(),
                    address: ip_bytes(i),
                    length: i.pick(&[None, None, Some(24), Some(32), Some(128), Some(200)]),
                }),
                ports: i.list(2, |i| wl::Port {
                    service_port: i.pick(&[80, 443]),
                    target_port: i.pick(&[0, 8080]),
                    app_protocol: 0,
                }),
                ..Default::default()
            };
            let a = wl::Address {
                r#type: Some(address::Type::Service(s)),
            };
            (service_name(n), a.encode_to_vec())
        }
        _ => {
            let len = i.below(64);
            let name = if i.flip() {
                workload_name(i.below(WORKLOADS))
            } else {
                service_name(i.below(SERVICES))
            };
            (name, i.bytes(len).to_vec())
        }
    }
}

fn policy_resource(i: &mut Input<'_>) -> (String, Vec<u8>) {
    let n = i.below(POLICIES);
    if i.below(4) == 0 {
        let len = i.below(64);
        return (policy_name(n), i.bytes(len).to_vec());
    }
    let string = |i: &mut Input<'_>| sec::StringMatch {
        match_type: Some(match i.below(3) {
            0 => sec::string_match::MatchType::Exact(i.pick(&STRINGS).into()),
            1 => sec::string_match::MatchType::Prefix(i.pick(&STRINGS).into()),
            _ => sec::string_match::MatchType::Suffix(i.pick(&STRINGS).into()),
        }),
    };
    let a = sec::Authorization {
        name: format!("p{n}"),
        namespace: "default".into(),
        scope: i.pick(&[0, 1, 2, 9]),
        action: i.pick(&[0, 1, 2, 9]),
        dry_run: i.below(4) == 0,
        rules: i.list(2, |i| sec::Rule {
            clauses: i.list(2, |i| sec::Clause {
                matches: i.list(2, |i| sec::Match {
                    principals: i.list(1, string),
                    namespaces: i.list(1, string),
                    source_ips: i.list(1, |i| sec::Address {
                        address: ip_bytes(i),
                        length: i.pick(&[0, 8, 32, 33, 128]),
                    }),
                    destination_ports: i.list(1, |i| i.pick(&[80, 0, 70000])),
                    ..Default::default()
                }),
            }),
        }),
    };
    (policy_name(n), a.encode_to_vec())
}

/// Everything a snapshot indexes, comparably.
fn summary(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s
        .workloads()
        .map(|w| {
            format!(
                "w {} {:?} {} node={} hbone={} healthy={} svcs={:?} policies={:?} waypoint={:?}",
                w.uid(),
                w.ips(),
                w.identity,
                w.node,
                w.hbone,
                w.healthy,
                w.services
                    .iter()
                    .map(|r| (&*r.key, &*r.ports))
                    .collect::<Vec<_>>(),
                w.policies,
                w.waypoint
            )
        })
        .collect();
    for a in ["10.1.0.2", "10.1.0.3", "10.2.0.2", "fd00::2", "10.96.0.1"] {
        let a = ip(a);
        out.push(format!(
            "ip {a} -> {:?} named={:?}",
            s.by_ip(a).map(|w| w.uid().to_owned()),
            s.named_policies(a)
        ));
        out.push(format!(
            "vip {a} -> {:?}",
            s.service_by_vip(a).map(|e| e.key.to_string())
        ));
    }
    for e in s.services() {
        let mut eps: Vec<&str> = e.endpoints.iter().map(|w| w.uid()).collect();
        eps.sort_unstable();
        out.push(format!(
            "svc {} def={:?} endpoints={eps:?}",
            e.key,
            e.def
                .as_ref()
                .map(|d| (&d.vips, &d.vip_ranges, d.passthrough, &d.ports))
        ));
    }
    out.sort();
    out
}

/// `AMBIT_FUZZ_TRACE=1`: the targets say what they do (to read a crasher).
fn trace() -> bool {
    std::env::var_os("AMBIT_FUZZ_TRACE").is_some()
}

type Published = Arc<Mutex<Option<PolicyStore>>>;

fn sources() -> (StateWriter, Published) {
    let config = Config::parse("node: node-a\ncgroup: /x\n", Path::new("fuzz.yaml"))
        .expect("the base config");
    let published: Published = Arc::default();
    let out = published.clone();
    let sources = StateWriter::new(Arc::new(config), move |_, p| {
        if let Some(p) = p {
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
    });
    (sources, published)
}

fn policies_of(p: &Published) -> Vec<Policy> {
    let mut v: Vec<Policy> = p
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|s| s.iter().cloned().collect())
        .unwrap_or_default();
    v.sort_by_key(Policy::key);
    v
}

/// Decodes and applies one push as the xDS client does (each resource alone: the valid ones and
/// the removals apply, a rejected one keeps its last good version), keeping the last good bytes
/// of every resource in `held`.
fn push(
    sink: &StateWriter,
    policies: bool,
    upserts: Vec<(String, Vec<u8>)>,
    removes: Vec<String>,
    held: &mut BTreeMap<String, Vec<u8>>,
) {
    if trace() {
        eprintln!(
            "push {}: upserts {:?} removes {removes:?}",
            if policies { "policies" } else { "addresses" },
            upserts.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }
    // A name both upserted and removed in one response ends up upserted: the client's version
    // map and the state both take removals first.
    for r in &removes {
        held.remove(r);
    }
    if policies {
        let good = decode_each(upserts, held, |name, bytes| {
            let a = sec::Authorization::decode(bytes).map_err(|e| e.to_string())?;
            policy_from_proto(name, a).map_err(|e| e.to_string())
        });
        sink.apply_policies(good, removes);
    } else {
        let good = decode_each(upserts, held, |name, bytes| {
            let a = wl::Address::decode(bytes).map_err(|e| e.to_string())?;
            address_from_proto(name, a).map_err(|e| e.to_string())
        });
        sink.apply_addresses(good, removes);
    }
}

/// The resources that decode, as the client keeps them (the bytes of each in `held`); the others
/// are dropped alone, as the client's NACK of one resource.
fn decode_each<T>(
    upserts: Vec<(String, Vec<u8>)>,
    held: &mut BTreeMap<String, Vec<u8>>,
    decode: impl Fn(&str, &[u8]) -> Result<T, String>,
) -> Vec<(String, T)> {
    let mut good = Vec::new();
    for (name, bytes) in upserts {
        match decode(&name, &bytes) {
            Ok(v) => {
                held.insert(name.clone(), bytes);
                good.push((name, v));
            }
            Err(e) if trace() => eprintln!("  rejected {name}: {e}"),
            Err(_) => {}
        }
    }
    good
}

/// xDS decoding never panics, and pushes applied one after another give the state that the
/// resources held at the end give when applied at once (what a restarted agent builds).
pub fn xds(data: &[u8]) {
    let mut i = Input::new(data);
    let (incremental, inc_policies) = sources();
    let mut addresses = BTreeMap::new();
    let mut policies = BTreeMap::new();
    for _ in 0..i.below(8) {
        let is_policy = i.below(3) == 0;
        let upserts = i.list(4, |i| {
            if is_policy {
                policy_resource(i)
            } else {
                address_resource(i)
            }
        });
        let removes = i.list(2, |i| {
            if is_policy {
                policy_name(i.below(POLICIES))
            } else if i.flip() {
                workload_name(i.below(WORKLOADS))
            } else {
                service_name(i.below(SERVICES))
            }
        });
        let held = if is_policy {
            &mut policies
        } else {
            &mut addresses
        };
        push(&incremental, is_policy, upserts, removes, held);
    }
    let (rebuilt, reb_policies) = sources();
    push(
        &rebuilt,
        false,
        addresses.clone().into_iter().collect(),
        Vec::new(),
        &mut BTreeMap::new(),
    );
    push(
        &rebuilt,
        true,
        policies.clone().into_iter().collect(),
        Vec::new(),
        &mut BTreeMap::new(),
    );
    assert_eq!(
        summary(&incremental.snapshot()),
        summary(&rebuilt.snapshot()),
        "incremental pushes and a rebuild disagree"
    );
    assert_eq!(
        policies_of(&inc_policies),
        policies_of(&reb_policies),
        "the policies disagree"
    );
}

// ---------------------------------------------------------------------------------------------
// ads

/// The ADS stream's decoder (`xds::Push::decode`, which walks a response's bytes resource by
/// resource) never panics, and agrees with prost's decoding of the whole response wherever that
/// succeeds: same type, nonce and removals, every resource counted. It may accept more (a
/// resource that does not decode is refused alone), never less.
pub fn ads(data: &[u8]) {
    use ambit_proto::envoy::service::discovery::v3::DeltaDiscoveryResponse;
    let ours = ambit_agent::xds::Push::decode(data);
    let Ok(whole) = DeltaDiscoveryResponse::decode(data) else {
        return;
    };
    let push = ours.unwrap_or_else(|e| panic!("prost decodes it, the push decoder does not: {e}"));
    assert_eq!(push.type_url, whole.type_url);
    assert_eq!(push.nonce, whole.nonce);
    assert_eq!(push.removed, whole.removed_resources);
    assert_eq!(push.upserts, whole.resources.len());
    let valid = match &push.resources {
        ambit_agent::xds::Resources::Addresses(v) => v.len(),
        ambit_agent::xds::Resources::Policies(v) => v.len(),
        ambit_agent::xds::Resources::Unsubscribed => 0,
    };
    assert!(valid <= push.upserts, "{valid} valid of {}", push.upserts);
}

// ---------------------------------------------------------------------------------------------
// path

/// The waypoint's path normalization: a result is idempotent and clean; nothing panics.
pub fn path(data: &[u8]) {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let _ = ambit_agent::waypoint::path::without_trailing_dot(raw);
    let Ok(p) = ambit_agent::waypoint::path::normalize(raw) else {
        return;
    };
    assert_eq!(
        ambit_agent::waypoint::path::normalize(&p).as_deref(),
        Ok(p.as_str()),
        "not idempotent: {raw:?} -> {p:?}"
    );
    if p == "*" {
        return;
    }
    assert!(p.starts_with('/'), "{raw:?} -> {p:?}");
    assert!(!p.contains("//"), "repeated slashes: {raw:?} -> {p:?}");
    assert!(!p.contains(';'), "a path parameter left: {raw:?} -> {p:?}");
    assert!(!p.contains('\\'), "{raw:?} -> {p:?}");
    for seg in p.split('/') {
        assert!(seg != "." && seg != "..", "a dot segment: {raw:?} -> {p:?}");
    }
    let b = p.as_bytes();
    for (at, _) in p.match_indices('%') {
        let hex = b.get(at + 1..at + 3).unwrap_or_default();
        assert!(
            hex.len() == 2
                && hex
                    .iter()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c)),
            "an escape not in upper case: {raw:?} -> {p:?}"
        );
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap_or("00"), 16).unwrap_or(0);
        assert!(
            !(v.is_ascii_alphanumeric() || b"-._~/\\".contains(&v)),
            "an escape left that should be decoded or refused: {raw:?} -> {p:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// hbone

/// The HBONE server's HTTP/2 side over an in-memory duplex: whatever the client sends, the
/// connection ends (bounded in time), no panic, streams are only what the client sent, and no
/// task outlives the connection.
pub fn hbone(data: &[u8]) {
    use ambit_agent::tunnel::server::{ServerSettings, accept_streams, h2_builder};
    use tokio::io::AsyncWriteExt as _;
    let settings = ServerSettings {
        handshake_timeout: Duration::from_millis(200),
        max_concurrent_streams: 4,
        max_header_list_bytes: 2048,
        keepalive_interval: Duration::from_secs(60),
        keepalive_timeout: Duration::from_secs(60),
        idle_timeout: Duration::from_secs(60),
    };
    block_on(async {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = async {
            let Ok(Ok(conn)) = tokio::time::timeout(
                settings.handshake_timeout,
                h2_builder(&settings).handshake::<_, bytes::Bytes>(server),
            )
            .await
            else {
                return 0;
            };
            let draining = tokio_util::sync::CancellationToken::new();
            let mut accepted = 0usize;
            let mut held = Vec::new();
            let _ = accept_streams(conn, &draining, &settings, |_req, mut respond, token| {
                accepted += 1;
                // Answer some, hold others open (their tokens too) until the end.
                if accepted.is_multiple_of(2) {
                    if let Ok(r) = http_response(200) {
                        let _ = respond.send_response(r, true);
                    }
                } else {
                    held.push((respond, token));
                }
            })
            .await;
            accepted
        };
        let send = async {
            let _ = client.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            // Keep reading so the server is never blocked on a full pipe.
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut client, &mut sink).await;
        };
        let done =
            tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(served, send) })
                .await;
        let Ok((accepted, ())) = done else {
            panic!("the HBONE server did not finish with the input");
        };
        // Every stream costs the client at least one 9-byte frame header: nothing is made up.
        assert!(
            accepted <= data.len() / 9,
            "{accepted} streams from {} bytes",
            data.len()
        );
        let tasks = tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks();
        assert_eq!(tasks, 0, "tasks left behind by one connection");
    });
}

fn http_response(status: u16) -> Result<::http::Response<()>, ::http::Error> {
    ::http::Response::builder().status(status).body(())
}

// ---------------------------------------------------------------------------------------------
// http

/// The HTTP/1.1 server (readiness, metrics, admin socket): any bytes get one bounded
/// answer, and a well-formed request reaches the handler.
pub fn http(data: &[u8]) {
    use ambit_agent::http::{Request, Response, answer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    block_on(async {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let handle = |r: Request| async move {
            Response::text(200, format!("{} {} {}\n", r.method, r.path, r.body.len()))
        };
        let serve = tokio::time::timeout(Duration::from_secs(1), answer(server, handle));
        let talk = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(serve, talk);
        if !out.is_empty() {
            assert!(
                out.starts_with(b"HTTP/1.1 ") || out.starts_with(b"HTTP/1.0 "),
                "not an HTTP answer: {:?}",
                String::from_utf8_lossy(&out[..out.len().min(64)])
            );
        }
        assert!(
            out.len() < 128 * 1024,
            "the answer is unbounded: {} bytes",
            out.len()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// identity

/// SPIFFE ids parse and print back the same; certificates of any bytes are refused or read.
pub fn identity(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = s.parse::<Identity>()
    {
        let printed = id.to_string();
        assert!(printed.starts_with("spiffe://"), "{printed}");
        let again: Identity = printed.parse().expect("an identity prints as one");
        assert_eq!(again, id, "{s:?} -> {printed:?}");
    }
    let _ = ambit_agent::tls::identity_of(&rustls::pki_types::CertificateDer::from(data));
}

// ---------------------------------------------------------------------------------------------
// config

/// Any YAML is refused with an error or accepted; an accepted config prints.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(c) = Config::parse(text, Path::new("fuzz.yaml")) {
        serde_json::to_string(&c).expect("a valid config prints");
    }
}

// ---------------------------------------------------------------------------------------------
// cni

/// The CNI plugin's input parsing: the network config (with `prevResult`) for each command,
/// `CNI_ARGS`, and the VERSION answer.
pub fn cni(data: &[u8]) {
    use cni_plugin::Command;
    let mut i = Input::new(data);
    let which = i.below(3);
    let rest = i.rest();
    match which {
        0 => {
            for command in [Command::Add, Command::Del, Command::Check] {
                if let Ok(conf) = cni_plugin::parse_conf(rest, command)
                    && let Some(prev) = &conf.prev_result
                {
                    let _ = cni_plugin::pod_ips(prev);
                    let _ = cni_plugin::pass_through(prev, &conf.cni_version);
                }
            }
        }
        1 => {
            if let Ok(s) = std::str::from_utf8(rest)
                && let Ok(args) = cni_plugin::parse_args(s)
            {
                let _ = cni_plugin::pod_ref(&args);
            }
        }
        _ => {
            let _ = cni_plugin::version_result(rest);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// dns

/// The DNS proxy's judgement of one datagram, against a state with a service, a ServiceEntry
/// host and a wildcard host: a mesh answer parses and carries the query's id, FORMERR carries
/// it too, and an answer cut for UDP fits the client's limit.
pub fn dns(data: &[u8]) {
    use ambit_agent::dns::{Reply, UDP_PLAIN, answer, fit_udp, id_of, udp_limit};
    static STATE: std::sync::OnceLock<ambit_agent::state::Snapshot> = std::sync::OnceLock::new();
    let snapshot = STATE.get_or_init(|| {
        let config = ambit_agent::config::Config::parse(
            "node: n\ncgroup: /x\nservices:\n\
  - {namespace: default, name: echo, vips: [10.96.0.20, 'fd00::20'], ports: [{port: 80}]}\n\
  - {namespace: shop, name: api, hostname: api.example.com, vips: [240.240.0.1], ports: [{port: 443}]}\n\
  - {namespace: shop, name: wild, hostname: '*.example.com', vips: [240.240.0.2], ports: [{port: 443}]}\n",
            std::path::Path::new("fuzz.yaml"),
        )
        .expect("the fuzz config is valid");
        ambit_agent::state::Snapshot::from_config(&config)
    });
    let limit = udp_limit(data);
    assert!((UDP_PLAIN..=ambit_agent::dns::UDP_MAX).contains(&limit));
    match answer(data, snapshot) {
        Reply::Mesh { reply, .. } => {
            assert_eq!(
                id_of(&reply),
                id_of(data),
                "the answer keeps the query's id"
            );
            let cut = fit_udp(reply, limit);
            assert!(
                cut.len() <= limit,
                "{} bytes over UDP for a {limit}-byte client",
                cut.len()
            );
        }
        Reply::Malformed { reply: Some(r), .. } => {
            assert_eq!(id_of(&r), id_of(data));
            assert!(r.len() == 12, "FORMERR is a bare header");
        }
        Reply::Malformed { reply: None, .. } => assert!(data.len() < 12),
        Reply::Forward { .. } => {}
    }
}
