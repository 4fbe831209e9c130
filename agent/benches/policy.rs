//! One authorization decision against a store with 10,000 policies in the destination namespace,
//! shaped as real ones are (an ALLOW per client principal on a port, some DENYs by source
//! namespace, a few global ones), for a client that one policy allows, one that none does, and a
//! plaintext client. Then 10,000 wildcard principals (`cluster.local/ns/client-N/*`), indexed by
//! the namespace they pin, and the worst case: 10,000 policies that cannot be indexed
//! (`*/sa/sa-N`), so every one is evaluated.
//!
//! `cargo bench -p ambit-agent --bench policy`

use std::{hint::black_box, net::IpAddr};

use ambit_agent::{
    identity::Identity,
    policy::{
        Action, Clause, Connection, DecisionReason, Match, Policy, PolicyStore, Rule, Scope,
        StringMatch, evaluate,
    },
};
use criterion::{Criterion, criterion_group, criterion_main};

const N: usize = 10_000;
const NS: &str = "default";

fn policy(name: String, namespace: &str, scope: Scope, action: Action, m: Match) -> Policy {
    Policy {
        name,
        namespace: namespace.into(),
        scope,
        action,
        dry_run: false,
        rules: vec![Rule {
            clauses: vec![Clause { matches: vec![m] }],
        }],
    }
}

/// 10,000 policies in `default`: 9,900 ALLOW principal+port, 100 DENY namespace+port; plus 3
/// global policies in the root namespace.
fn realistic() -> PolicyStore {
    let mut s = PolicyStore::new();
    for i in 0..N - 100 {
        s.insert(policy(
            format!("allow-client-{i}"),
            NS,
            Scope::Namespace,
            Action::Allow,
            Match {
                principals: vec![StringMatch::Exact(format!(
                    "cluster.local/ns/client-{i}/sa/sa-{i}"
                ))],
                destination_ports: vec![8080, 8000 + (i % 50) as u16],
                ..Default::default()
            },
        ));
    }
    for j in 0..100 {
        s.insert(policy(
            format!("deny-ns-{j}"),
            NS,
            Scope::Namespace,
            Action::Deny,
            Match {
                namespaces: vec![StringMatch::Exact(format!("blocked-{j}"))],
                destination_ports: vec![8080],
                ..Default::default()
            },
        ));
    }
    for (k, who) in ["evil", "untrusted", "legacy"].iter().enumerate() {
        s.insert(policy(
            format!("global-deny-{k}"),
            "istio-system",
            Scope::Global,
            Action::Deny,
            Match {
                principals: vec![StringMatch::Exact(format!(
                    "cluster.local/ns/{who}/sa/default"
                ))],
                ..Default::default()
            },
        ));
    }
    s
}

/// 10,000 ALLOW policies by principal pattern, `prefix` (Istio's `cluster.local/ns/client-N/*`,
/// indexed by the namespace it pins) or suffix (`*/sa/sa-N`: nothing to index, all evaluated).
fn wildcards(prefix: bool) -> PolicyStore {
    (0..N)
        .map(|i| {
            let principal = if prefix {
                StringMatch::Prefix(format!("cluster.local/ns/client-{i}/"))
            } else {
                StringMatch::Suffix(format!("/sa/sa-{i}"))
            };
            policy(
                format!("allow-pattern-{i}"),
                NS,
                Scope::Namespace,
                Action::Allow,
                Match {
                    principals: vec![principal],
                    destination_ports: vec![8080],
                    ..Default::default()
                },
            )
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let ip = |s: &str| s.parse::<IpAddr>().expect("bench IP");
    let id = |s: &str| s.parse::<Identity>().expect("bench identity");
    let allowed_id = id("spiffe://cluster.local/ns/client-4242/sa/sa-4242");
    let unknown_id = id("spiffe://cluster.local/ns/stranger/sa/default");
    let named: Vec<std::sync::Arc<str>> = vec!["default/not-in-store".into()];
    let conn = |src_identity| Connection {
        src_identity,
        src_ip: ip("10.0.1.7"),
        dst_ip: ip("10.0.2.9"),
        dst_port: 8080,
        dst_namespace: NS,
        dst_policies: &named,
    };

    let store = realistic();
    assert_eq!(store.len(), N + 3);
    for (name, conn, want) in [
        (
            "allowed",
            conn(Some(&allowed_id)),
            DecisionReason::AllowedByPolicy,
        ),
        (
            "no_match",
            conn(Some(&unknown_id)),
            DecisionReason::NoAllowPolicyMatched,
        ),
        (
            "plaintext",
            conn(None),
            DecisionReason::NoAllowPolicyMatched,
        ),
    ] {
        assert_eq!(evaluate(&store, &conn).reason, want, "{name}");
        c.bench_function(&format!("policy/10k_ns/{name}"), |b| {
            b.iter(|| evaluate(black_box(&store), black_box(&conn)))
        });
    }

    let conn = conn(Some(&allowed_id));
    for (name, store) in [
        ("10k_ns_prefix", wildcards(true)),
        ("10k_ns_unindexed", wildcards(false)),
    ] {
        assert_eq!(
            evaluate(&store, &conn).reason,
            DecisionReason::AllowedByPolicy
        );
        c.bench_function(&format!("policy/{name}/allowed"), |b| {
            b.iter(|| evaluate(black_box(&store), black_box(&conn)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
