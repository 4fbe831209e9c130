//! The writer's incremental updates against the same state built from scratch, and the indexes
//! the data path and the admin API read.

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use super::{Snapshot, Source, StateWriter};
use crate::{
    config::Config,
    identity::Identity,
    xds::{AddressResource, WorkloadService, XdsService, XdsSink, XdsWorkload},
};

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

fn config(extra: &str) -> Arc<Config> {
    let text = format!("node: node-a\ncgroup: /x\n{extra}");
    Arc::new(Config::parse(&text, std::path::Path::new("t.yaml")).expect("test config"))
}

fn xw(name: &str, addr: &str, sa: &str, services: &[(&str, &[(u16, u16)])]) -> XdsWorkload {
    XdsWorkload {
        uid: format!("Kubernetes//Pod/default/{name}"),
        name: name.to_owned(),
        namespace: "default".to_owned(),
        ips: vec![ip(addr)],
        hostname: String::new(),
        identity: Identity::new("cluster.local", "default", sa).expect("identity"),
        hbone: true,
        host_network: false,
        node: "node-b".to_owned(),
        services: services
            .iter()
            .map(|(host, ports)| WorkloadService {
                key: format!("default/{host}"),
                namespace: "default".to_owned(),
                hostname: (*host).to_owned(),
                ports: ports.to_vec(),
            })
            .collect(),
        authorization_policies: Vec::new(),
        waypoint: None,
        healthy: true,
        workload_name: name.to_owned(),
        meta: Default::default(),
    }
}

fn xs(host: &str, vip: &str, ports: &[(u16, u16)]) -> XdsService {
    XdsService {
        name: host.split('.').next().unwrap_or(host).to_owned(),
        namespace: "default".to_owned(),
        hostname: host.to_owned(),
        vips: vec![ip(vip)],
        vip_ranges: Vec::new(),
        passthrough: false,
        ports: ports.to_vec(),
        protocols: Vec::new(),
        load_balancing: None,
        waypoint: None,
    }
}

fn upsert_w(w: XdsWorkload) -> (String, AddressResource) {
    (w.uid.clone(), AddressResource::Workload(w))
}

fn upsert_s(s: XdsService) -> (String, AddressResource) {
    (s.key(), AddressResource::Service(s))
}

fn uid(name: &str) -> String {
    format!("Kubernetes//Pod/default/{name}")
}

/// A comparable summary of everything a snapshot indexes.
fn summary(s: &Snapshot) -> Vec<String> {
    let mut out: Vec<String> = s
        .workloads()
        .map(|w| {
            format!(
                "w {} {} {:?} {} hbone={} local={} {:?} by_identity={}",
                w.uid(),
                w.name(),
                w.ips(),
                w.identity,
                w.hbone,
                w.local,
                w.services.iter().map(|r| &*r.key).collect::<Vec<_>>(),
                s.by_identity(&w.identity).iter().any(|x| Arc::ptr_eq(x, w))
            )
        })
        .collect();
    for w in s.workloads() {
        for a in w.ips() {
            out.push(format!(
                "ip {a} -> {:?}",
                s.by_ip(*a).map(|h| h.uid().to_owned())
            ));
        }
    }
    for e in s.services() {
        let mut eps: Vec<&str> = e.endpoints.iter().map(|w| w.uid()).collect();
        eps.sort_unstable();
        out.push(format!(
            "svc {} def={:?} endpoints={eps:?}",
            e.key,
            e.def.as_ref().map(|d| (&d.vips, &d.ports, d.source))
        ));
        for vip in e.def.iter().flat_map(|d| d.vips.iter()) {
            out.push(format!(
                "vip {vip} -> {:?}",
                s.service_by_vip(*vip).map(|x| x.key.to_string())
            ));
        }
    }
    out.sort();
    out
}

/// A writer that remembers what it published.
fn sources(config: Arc<Config>) -> StateWriter {
    StateWriter::new(config, |_, _| {})
}

#[test]
fn indexes_by_uid_ip_identity_and_service() {
    let s = sources(config(""));
    s.apply_addresses(
        vec![
            upsert_w(xw("a-1", "10.2.0.1", "a", &[("echo.default.svc", &[])])),
            upsert_w(xw("a-2", "10.2.0.2", "a", &[("echo.default.svc", &[])])),
            upsert_w(xw("b-1", "10.2.0.3", "b", &[])),
            upsert_s(xs("echo.default.svc", "10.96.0.1", &[(80, 8080)])),
        ],
        Vec::new(),
    );
    let snap = s.snapshot();
    let a1 = snap.by_uid(&uid("a-1")).expect("by uid");
    assert_eq!(a1.name(), "a-1");
    assert_eq!(a1.ips(), &[ip("10.2.0.1")]);
    assert!(!a1.local, "node-b is not this node");
    assert!(Arc::ptr_eq(a1, snap.by_ip(ip("10.2.0.1")).expect("by ip")));
    let a = Identity::new("cluster.local", "default", "a").expect("identity");
    assert_eq!(snap.by_identity(&a).len(), 2);
    let echo = snap.service("default/echo.default.svc").expect("by key");
    assert_eq!(echo.endpoints.len(), 2);
    assert!(Arc::ptr_eq(
        echo,
        snap.service_by_vip(ip("10.96.0.1")).expect("by VIP")
    ));
    // Identities and namespaces are shared, not copied per workload.
    let a2 = snap.by_uid(&uid("a-2")).expect("a-2");
    assert!(Arc::ptr_eq(&a1.namespace, &a2.namespace));
    assert!(Arc::ptr_eq(&a1.services, &a2.services));
}

#[test]
fn a_push_changes_only_what_it_names_and_matches_a_rebuild() {
    let s = sources(config(""));
    let first: Vec<_> = (0..50)
        .map(|i| {
            upsert_w(xw(
                &format!("p-{i}"),
                &format!("10.2.1.{i}"),
                &format!("sa-{}", i % 5),
                &[(&format!("svc-{}.default.svc", i % 3), &[])],
            ))
        })
        .chain((0..3).map(|j| {
            upsert_s(xs(
                &format!("svc-{j}.default.svc"),
                &format!("10.96.1.{j}"),
                &[(80, 8080)],
            ))
        }))
        .collect();
    s.apply_addresses(first, Vec::new());
    let before = s.snapshot();
    // Replace p-7 by a pod with a new IP and identity, remove p-8 and service svc-2, add p-99.
    s.apply_addresses(
        vec![
            upsert_w(xw(
                "p-7",
                "10.2.2.7",
                "sa-new",
                &[("svc-0.default.svc", &[])],
            )),
            upsert_w(xw(
                "p-99",
                "10.2.2.99",
                "sa-1",
                &[("svc-1.default.svc", &[])],
            )),
        ],
        vec![uid("p-8"), "default/svc-2.default.svc".to_owned()],
    );
    let after = s.snapshot();
    // Untouched workloads are the very same allocations.
    assert!(Arc::ptr_eq(
        before.by_uid(&uid("p-3")).expect("p-3"),
        after.by_uid(&uid("p-3")).expect("p-3")
    ));
    assert!(
        after.by_ip(ip("10.2.1.7")).is_none(),
        "p-7's old IP is gone"
    );
    assert!(after.by_ip(ip("10.2.1.8")).is_none(), "p-8 is gone");
    assert!(after.service_by_vip(ip("10.96.1.2")).is_none());
    // svc-2 keeps its endpoints (workloads still name it) but lost its definition.
    assert!(
        after
            .service("default/svc-2.default.svc")
            .expect("named")
            .def
            .is_none()
    );
    let old_sa = Identity::new("cluster.local", "default", "sa-2").expect("identity");
    assert!(
        after
            .by_identity(&old_sa)
            .iter()
            .all(|w| w.uid() != uid("p-7")),
        "p-7 left its old identity's list"
    );

    // The same end state built from scratch (a config change rebuilds every index).
    s.set_config(config(""));
    assert_eq!(summary(&after), summary(&s.snapshot()));
}

#[test]
fn the_config_wins_on_an_ip_and_xds_named_policies_still_apply_there() {
    let s = sources(config(
        "pods:\n  - {namespace: default, name: local, ips: [10.2.0.9], netns: /run/netns/x}\n",
    ));
    let mut w = xw("local", "10.2.0.9", "other", &[]);
    w.authorization_policies = vec!["default/p".into()];
    s.apply_addresses(vec![upsert_w(w)], Vec::new());
    let snap = s.snapshot();
    let held = snap.by_ip(ip("10.2.0.9")).expect("held");
    assert_eq!(held.source, Source::Config);
    assert_eq!(held.identity.service_account(), "default");
    assert_eq!(
        snap.named_policies(ip("10.2.0.9"))
            .iter()
            .map(|p| &**p)
            .collect::<Vec<_>>(),
        ["default/p"]
    );
    // One pod, two sources: the admin API shows them as one (the config's), with istiod's uid.
    let xds = snap.by_uid(&uid("local")).expect("the xDS view is kept");
    assert!(Arc::ptr_eq(snap.merged_into(xds).expect("merged"), held));
    assert_eq!(
        snap.xds_twin(held).map(|t| t.uid()),
        Some(uid("local").as_str())
    );
    assert!(
        snap.merged_into(held).is_none(),
        "the config workload is the one shown"
    );
    // Removing the xDS view leaves the config's.
    s.apply_addresses(Vec::new(), vec![uid("local")]);
    let snap = s.snapshot();
    assert_eq!(
        snap.by_ip(ip("10.2.0.9")).expect("still held").source,
        Source::Config
    );
    assert!(snap.named_policies(ip("10.2.0.9")).is_empty());
}

#[test]
fn endpoints_map_ports_themselves_when_the_service_does_not() {
    let s = sources(config(""));
    s.apply_addresses(
        vec![
            upsert_s(xs("web.default.svc", "10.96.0.5", &[(80, 0)])),
            upsert_w(xw(
                "w",
                "10.2.0.5",
                "w",
                &[("web.default.svc", &[(80, 9090)])],
            )),
        ],
        Vec::new(),
    );
    let snap = s.snapshot();
    let svc = snap.service_by_vip(ip("10.96.0.5")).expect("service");
    assert!(svc.has_port(80));
    assert!(!svc.has_port(81));
    let (_, addr) = svc.pick(ip("10.96.0.5"), 80).expect("endpoint");
    assert_eq!(addr, "10.2.0.5:9090".parse().expect("addr"));
}

#[test]
fn round_robin_skips_unhealthy_endpoints_and_survives_pushes() {
    let s = sources(config(""));
    let mut sick = xw("sick", "10.2.0.3", "w", &[("web.default.svc", &[])]);
    sick.healthy = false;
    s.apply_addresses(
        vec![
            upsert_s(xs("web.default.svc", "10.96.0.5", &[(80, 8080)])),
            upsert_w(xw("a", "10.2.0.1", "w", &[("web.default.svc", &[])])),
            upsert_w(xw("b", "10.2.0.2", "w", &[("web.default.svc", &[])])),
            upsert_w(sick),
        ],
        Vec::new(),
    );
    let picks: Vec<IpAddr> = (0..6)
        .map(|_| {
            let snap = s.snapshot();
            let svc = snap.service_by_vip(ip("10.96.0.5")).expect("service");
            svc.pick(ip("10.96.0.5"), 80).expect("endpoint").1.ip()
        })
        .collect();
    assert!(picks.contains(&ip("10.2.0.1")) && picks.contains(&ip("10.2.0.2")));
    assert!(!picks.contains(&ip("10.2.0.3")), "unhealthy never picked");
    // Remove b: every new pick goes to a.
    s.apply_addresses(Vec::new(), vec![uid("b")]);
    let snap = s.snapshot();
    let svc = snap.service_by_vip(ip("10.96.0.5")).expect("service");
    for _ in 0..4 {
        assert_eq!(
            svc.pick(ip("10.96.0.5"), 80).expect("a").1.ip(),
            ip("10.2.0.1")
        );
    }
    // No healthy endpoint left: nothing to pick.
    s.apply_addresses(Vec::new(), vec![uid("a")]);
    let snap = s.snapshot();
    let svc = snap.service_by_vip(ip("10.96.0.5")).expect("service");
    assert!(svc.pick(ip("10.96.0.5"), 80).is_none());
}

#[test]
fn publishes_policies_only_when_they_change() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let s = StateWriter::new(config(""), move |_, p| {
        out.lock().expect("lock").push(p.is_some());
    });
    s.apply_addresses(vec![upsert_w(xw("a", "10.2.0.1", "a", &[]))], Vec::new());
    s.apply_policies(Vec::new(), Vec::new());
    assert_eq!(*seen.lock().expect("lock"), [true, false, true]);
}

#[test]
fn names_that_are_not_suffixes_of_the_uid_are_kept() {
    let s = sources(config(""));
    let mut w = xw("n", "10.2.0.1", "a", &[]);
    w.name = "other-name".into();
    s.apply_addresses(vec![upsert_w(w)], Vec::new());
    let snap = s.snapshot();
    let w = snap.by_uid(&uid("n")).expect("by uid");
    assert_eq!((w.uid(), w.name()), (uid("n").as_str(), "other-name"));
}

#[test]
fn host_network_workloads_back_services_but_do_not_own_their_ip() {
    let s = sources(config(""));
    let mut w = xw("hostnet", "10.0.0.1", "h", &[("web.default.svc", &[])]);
    w.host_network = true;
    s.apply_addresses(
        vec![
            upsert_w(w),
            upsert_w(xw("pod", "10.2.0.1", "p", &[])),
            upsert_s(xs("web.default.svc", "10.96.0.5", &[(80, 8080)])),
        ],
        Vec::new(),
    );
    let snap = s.snapshot();
    assert!(
        snap.by_ip(ip("10.0.0.1")).is_none(),
        "the node's IP is nobody's"
    );
    assert!(snap.by_uid(&uid("hostnet")).is_some());
    let svc = snap.service_by_vip(ip("10.96.0.5")).expect("service");
    assert_eq!(svc.endpoints.len(), 1, "still an endpoint");
}

#[test]
fn a_mapped_vip_is_forgotten_with_its_service() {
    let s = sources(config(""));
    s.apply_addresses(
        vec![upsert_s(xs(
            "web.default.svc",
            "::ffff:10.96.0.7",
            &[(80, 8080)],
        ))],
        Vec::new(),
    );
    assert!(s.snapshot().service_by_vip(ip("10.96.0.7")).is_some());
    s.apply_addresses(Vec::new(), vec!["default/web.default.svc".to_owned()]);
    assert!(
        s.snapshot().service_by_vip(ip("10.96.0.7")).is_none(),
        "no stale VIP left behind"
    );
}

#[test]
fn two_workloads_on_one_ip_resolve_by_content_not_by_arrival() {
    // A replacement pod gets the old one's IP before the old one is removed; the unhealthy one
    // never wins, then the smallest uid, whatever order the pushes came in.
    let mut old = xw("web-a", "10.2.3.4", "web", &[]);
    old.healthy = false;
    let new = xw("web-b", "10.2.3.4", "web", &[]);
    let other = xw("web-c", "10.2.3.4", "web", &[]);
    for order in [
        [old.clone(), new.clone(), other.clone()],
        [other.clone(), new.clone(), old.clone()],
        [new.clone(), old.clone(), other.clone()],
    ] {
        let s = sources(config(""));
        for w in order {
            s.apply_addresses(vec![upsert_w(w)], Vec::new());
        }
        let owner = |s: &StateWriter| {
            s.snapshot()
                .by_ip(ip("10.2.3.4"))
                .map(|w| w.uid().to_owned())
        };
        assert_eq!(owner(&s), Some(uid("web-b")));
        // The owner goes: the IP falls to the next claimant instead of to nobody.
        s.apply_addresses(Vec::new(), vec![uid("web-b")]);
        assert_eq!(owner(&s), Some(uid("web-c")));
        let incremental = summary(&s.snapshot());
        s.set_config(config(""));
        assert_eq!(incremental, summary(&s.snapshot()), "a rebuild agrees");
        s.apply_addresses(Vec::new(), vec![uid("web-c")]);
        assert_eq!(
            owner(&s),
            Some(uid("web-a")),
            "an unhealthy claimant is better than none"
        );
    }
}

#[test]
fn a_vip_claimed_by_two_services_stays_while_either_claims_it() {
    let s = sources(config(""));
    s.apply_addresses(
        vec![
            upsert_s(xs("b.default.svc", "10.96.3.3", &[(80, 80)])),
            upsert_s(xs("a.default.svc", "10.96.3.3", &[(80, 80)])),
        ],
        Vec::new(),
    );
    let holder = |s: &StateWriter| {
        s.snapshot()
            .service_by_vip(ip("10.96.3.3"))
            .map(|e| e.key.to_string())
    };
    assert_eq!(
        holder(&s).as_deref(),
        Some("default/a.default.svc"),
        "the smallest key"
    );
    s.apply_addresses(Vec::new(), vec!["default/a.default.svc".to_owned()]);
    assert_eq!(
        holder(&s).as_deref(),
        Some("default/b.default.svc"),
        "not dropped"
    );
    // Moving the VIP away from b releases it.
    s.apply_addresses(
        vec![upsert_s(xs("b.default.svc", "10.96.3.4", &[(80, 80)]))],
        Vec::new(),
    );
    assert_eq!(holder(&s), None);
}

/// ztunnel's `load_balance`: endpoints ranked by the preferred scopes they share with the
/// client, in order, stopping at the first they do not.
#[test]
fn locality_preferences_rank_endpoints_as_ztunnel() {
    use crate::xds::{LbMode, LoadBalancing, Scope, WorkloadMeta};

    use super::Near;

    let place = |name: &str, addr: &str, node: &str, region: &str, zone: &str| {
        let mut w = xw(name, addr, "web", &[("web.default.svc", &[])]);
        w.node = node.into();
        w.meta = WorkloadMeta {
            region: region.into(),
            zone: zone.into(),
            cluster_id: "Kubernetes".into(),
            ..WorkloadMeta::default()
        };
        w
    };
    let endpoints = [
        place("same-node", "10.2.5.1", "node-a", "eu", "eu-1"),
        place("same-zone", "10.2.5.2", "node-b", "eu", "eu-1"),
        place("same-region", "10.2.5.3", "node-c", "eu", "eu-2"),
        place("far", "10.2.5.4", "node-d", "us", "eu-1"),
    ];
    let client_meta = WorkloadMeta {
        region: "eu".into(),
        zone: "eu-1".into(),
        cluster_id: "Kubernetes".into(),
        ..WorkloadMeta::default()
    };
    let client = Near {
        node: "node-a",
        meta: &client_meta,
    };
    let picks = |mode: LbMode, healthy: &[bool], near: Option<Near<'_>>| {
        let s = sources(config(""));
        let mut svc = xs("web.default.svc", "10.96.5.5", &[(80, 8080)]);
        svc.load_balancing = Some(LoadBalancing {
            scopes: vec![Scope::Network, Scope::Region, Scope::Zone, Scope::Node],
            mode,
            allow_unhealthy: false,
        });
        let mut push: Vec<_> = endpoints
            .iter()
            .zip(healthy)
            .map(|(w, h)| {
                let mut w = w.clone();
                w.healthy = *h;
                upsert_w(w)
            })
            .collect();
        push.push(upsert_s(svc));
        s.apply_addresses(push, Vec::new());
        let snap = s.snapshot();
        let entry = snap.service("default/web.default.svc").expect("service");
        let mut seen: Vec<String> = (0..8)
            .filter_map(|_| entry.pick_near(near, ip("10.96.5.5"), 80, false))
            .map(|p| p.workload.name().to_owned())
            .collect();
        seen.sort();
        seen.dedup();
        seen
    };
    let all = [true; 4];
    assert_eq!(picks(LbMode::Failover, &all, Some(client)), ["same-node"]);
    assert_eq!(picks(LbMode::Strict, &all, Some(client)), ["same-node"]);
    // The node's endpoint gone: FAILOVER takes the next rank, STRICT refuses.
    let no_node = [false, true, true, true];
    assert_eq!(
        picks(LbMode::Failover, &no_node, Some(client)),
        ["same-zone"]
    );
    assert!(picks(LbMode::Strict, &no_node, Some(client)).is_empty());
    // A zone match does not count without the region: `far` ranks below `same-region`.
    let only_far = [false, false, true, true];
    assert_eq!(
        picks(LbMode::Failover, &only_far, Some(client)),
        ["same-region"]
    );
    // STANDARD ignores the preferences; an unknown client ranks everything alike.
    assert_eq!(picks(LbMode::Standard, &all, Some(client)).len(), 4);
    assert_eq!(picks(LbMode::Failover, &all, None).len(), 4);
    // The choice says why.
    let s = sources(config(""));
    let mut svc = xs("web.default.svc", "10.96.5.5", &[(80, 8080)]);
    svc.load_balancing = Some(LoadBalancing {
        scopes: vec![Scope::Region, Scope::Node],
        mode: LbMode::Failover,
        allow_unhealthy: true,
    });
    let mut unhealthy = endpoints[0].clone();
    unhealthy.healthy = false;
    s.apply_addresses(vec![upsert_w(unhealthy), upsert_s(svc)], Vec::new());
    let snap = s.snapshot();
    let p = snap
        .service("default/web.default.svc")
        .expect("service")
        .pick_near(Some(client), ip("10.96.5.5"), 80, true)
        .expect("ALLOW_ALL takes an unhealthy endpoint");
    assert_eq!(
        p.why.as_deref(),
        Some("FAILOVER REGION,NODE (2 of 2 preferred scopes shared)")
    );
}

#[test]
fn hostnames_keys_do_not_reach_are_indexed_for_dns_and_forgotten_with_their_service() {
    let s = sources(config(""));
    s.apply_addresses(
        vec![
            upsert_s(xs("api.example.com", "240.240.0.1", &[(443, 443)])),
            upsert_s(xs("*.example.com", "240.240.0.2", &[(443, 443)])),
            upsert_s(xs("*.b.example.com", "240.240.0.3", &[(443, 443)])),
            upsert_s(xs(
                "web.default.svc.cluster.local",
                "10.96.0.9",
                &[(80, 80)],
            )),
        ],
        Vec::new(),
    );
    let found = |snap: &Snapshot, name: &str| {
        snap.service_by_hostname(name)
            .map(|e| e.key.to_string())
            .unwrap_or_default()
    };
    let snap = s.snapshot();
    for (name, key) in [
        ("api.example.com", "default/api.example.com"),
        ("x.example.com", "default/*.example.com"),
        ("x.b.example.com", "default/*.b.example.com"),
        (
            "web.default.svc.cluster.local",
            "default/web.default.svc.cluster.local",
        ),
        ("example.com", ""),
        ("b.example.com", "default/*.example.com"),
    ] {
        assert_eq!(found(&snap, name), key, "{name}");
    }
    s.apply_addresses(Vec::new(), vec!["default/api.example.com".to_owned()]);
    assert_eq!(
        found(&s.snapshot(), "api.example.com"),
        "default/*.example.com",
        "the wildcard covers it once the host is gone"
    );
    s.apply_addresses(
        Vec::new(),
        vec![
            "default/*.example.com".to_owned(),
            "default/*.b.example.com".to_owned(),
        ],
    );
    assert_eq!(found(&s.snapshot(), "x.b.example.com"), "", "no stale host");
}
