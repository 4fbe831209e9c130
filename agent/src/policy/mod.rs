//! L4 authorization: decides whether an inbound connection may reach its destination workload,
//! with Istio's semantics as ztunnel implements them. Pure functions over a [`PolicyStore`]; no
//! IO, so the proxy calls [`evaluate`] on every inbound connection (15008 and 15006) and again
//! for live connections when policy changes.
//!
//! ```text
//! xds / local config ──> Policy (plain data) ──> PolicyStore::insert (compile + index)
//! proxy inbound: Connection { src identity, src ip, dst ip:port, dst workload ns + policy keys }
//!        └─> evaluate(&store, &conn) ──> Decision { allowed, policy, rule, reason, dry_run }
//! ```
//!
//! Which policies apply: `GLOBAL` ones, `NAMESPACE` ones of the destination workload's namespace,
//! and the ones the destination workload names (`namespace/name`, usually `WORKLOAD_SELECTOR`;
//! a named key that is not in the store is skipped, as ztunnel does). Then:
//!
//! 1. every matching dry-run DENY policy is reported (never enforced);
//! 2. a matching DENY policy denies;
//! 3. every matching dry-run ALLOW policy is reported;
//! 4. no ALLOW policy applies: allow (and if dry-run ALLOW policies apply but none matched, report
//!    that enforcing them would deny);
//! 5. a matching ALLOW policy allows; otherwise deny.
//!
//! Matching (ztunnel's `rbac.rs`): a policy matches if any rule does; a rule if all its clauses do
//! (no clauses: always); a clause if any of its matches does (no matches: always); a match if every
//! non-empty field does, and a match with every field empty never matches. So an ALLOW policy with
//! no rules denies everything it applies to, `rules: [{}]` allows everything, and a DENY policy
//! with no rules has no effect. Principals are compared against the source identity without
//! `spiffe://`; a plaintext source has no principal (positive principal and service-account
//! fields never match it, `not_` fields always do) and its namespace is `""`. Addresses are
//! compared with IPv4-mapped IPv6 treated as IPv4.
//!
//! When several policies of one action match, the one named is the first in evaluation order:
//! namespace policies, then global, then workload-named; within each, by index bucket and then by
//! key. The decision (allowed or not) never depends on that order.

mod compile;
mod store;
mod types;

use std::net::IpAddr;

use serde::Serialize;

pub use compile::principal_matches;
pub use store::PolicyStore;
pub use types::{
    Action, Cidr, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};

use compile::Probe;
use store::{Entry, Group, Kind};

use crate::identity::Identity;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid CIDR {value:?}: {why}")]
    Cidr { value: String, why: &'static str },
}

/// The facts about one inbound connection that policy can look at.
#[derive(Clone, Copy, Debug)]
pub struct Connection<'a> {
    /// The peer's verified identity (HBONE); `None` for a plaintext client.
    pub src_identity: Option<&'a Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// The destination workload's namespace.
    pub dst_namespace: &'a str,
    /// The policies the destination workload names (`namespace/name`).
    pub dst_policies: &'a [std::sync::Arc<str>],
}

/// The outcome of [`evaluate`], with what decided it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the policy that decided, for `DeniedByPolicy` and `AllowedByPolicy`.
    pub policy: Option<String>,
    /// Index of the policy's rule that matched.
    pub rule: Option<usize>,
    pub reason: DecisionReason,
    /// Dry-run policies that matched (or, for an unmatched dry-run allow set, would have denied);
    /// for logging only.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dry_run: Vec<DryRunHit>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DecisionReason {
    DeniedByPolicy,
    AllowedByPolicy,
    /// No ALLOW policy applies to the destination.
    NoAllowPolicy,
    /// ALLOW policies apply and none matched.
    NoAllowPolicyMatched,
}

/// What a dry-run policy would have done.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DryRunHit {
    /// `namespace/name`; `None` for `WouldDenyNoAllowMatched`, which is about the set.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    pub result: DryRunResult,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DryRunResult {
    /// A dry-run DENY policy matched.
    WouldDeny,
    /// A dry-run ALLOW policy matched.
    WouldAllow,
    /// No enforced ALLOW policy applies, dry-run ALLOW policies do, and none matched: enforcing
    /// them would deny this connection.
    WouldDenyNoAllowMatched,
}

impl Decision {
    /// One line for logs: `denied by policy default/deny-sleep (rule 0)`.
    pub fn describe(&self) -> String {
        let by = |verb: &str| match (&self.policy, self.rule) {
            (Some(p), Some(r)) => format!("{verb} by policy {p} (rule {r})"),
            (Some(p), None) => format!("{verb} by policy {p}"),
            _ => format!("{verb} by policy"),
        };
        match self.reason {
            DecisionReason::DeniedByPolicy => by("denied"),
            DecisionReason::AllowedByPolicy => by("allowed"),
            DecisionReason::NoAllowPolicy => "allowed: no allow policy applies".to_owned(),
            DecisionReason::NoAllowPolicyMatched => "denied: no allow policy matched".to_owned(),
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl DryRunHit {
    /// One line for logs: `dry-run policy default/deny-sleep would deny (rule 0)`.
    pub fn describe(&self) -> String {
        let policy = self.policy.as_deref().unwrap_or("(unknown)");
        let rule = self
            .rule
            .map(|r| format!(" (rule {r})"))
            .unwrap_or_default();
        match self.result {
            DryRunResult::WouldDeny => format!("dry-run policy {policy} would deny{rule}"),
            DryRunResult::WouldAllow => format!("dry-run policy {policy} would allow{rule}"),
            DryRunResult::WouldDenyNoAllowMatched => {
                "dry-run: no allow policy matched, enforcing the dry-run allow policies would deny"
                    .to_owned()
            }
        }
    }
}

/// Decides `conn` against `store`; see the module docs for the order. Allocates only for the
/// names it reports.
pub fn evaluate(store: &PolicyStore, conn: &Connection<'_>) -> Decision {
    let probe = Probe::new(conn.src_identity, conn.src_ip, conn.dst_ip, conn.dst_port);
    let applicable = Applicable {
        groups: [store.namespace(conn.dst_namespace), Some(store.global())],
        named: conn.dst_policies,
        store,
    };
    let mut dry_run = Vec::new();

    for (e, rule) in applicable.matching(Kind::DryRunDeny, &probe) {
        dry_run.push(DryRunHit {
            policy: Some(e.key.to_string()),
            rule: Some(rule),
            result: DryRunResult::WouldDeny,
        });
    }

    if let Some((e, rule)) = applicable.matching(Kind::Deny, &probe).next() {
        return Decision {
            allowed: false,
            policy: Some(e.key.to_string()),
            rule: Some(rule),
            reason: DecisionReason::DeniedByPolicy,
            dry_run,
        };
    }

    let mut dry_run_allow_matched = false;
    for (e, rule) in applicable.matching(Kind::DryRunAllow, &probe) {
        dry_run_allow_matched = true;
        dry_run.push(DryRunHit {
            policy: Some(e.key.to_string()),
            rule: Some(rule),
            result: DryRunResult::WouldAllow,
        });
    }

    if !applicable.any(Kind::Allow) {
        if !dry_run_allow_matched && applicable.any(Kind::DryRunAllow) {
            dry_run.push(DryRunHit {
                policy: None,
                rule: None,
                result: DryRunResult::WouldDenyNoAllowMatched,
            });
        }
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            reason: DecisionReason::NoAllowPolicy,
            dry_run,
        };
    }

    match applicable.matching(Kind::Allow, &probe).next() {
        Some((e, rule)) => Decision {
            allowed: true,
            policy: Some(e.key.to_string()),
            rule: Some(rule),
            reason: DecisionReason::AllowedByPolicy,
            dry_run,
        },
        None => Decision {
            allowed: false,
            policy: None,
            rule: None,
            reason: DecisionReason::NoAllowPolicyMatched,
            dry_run,
        },
    }
}

/// The policies that apply to one destination.
struct Applicable<'s, 'c> {
    /// The destination namespace's group, then the global one.
    groups: [Option<&'s Group>; 2],
    named: &'c [std::sync::Arc<str>],
    store: &'s PolicyStore,
}

impl<'s> Applicable<'s, '_> {
    fn named(&self, kind: Kind) -> impl Iterator<Item = &'s Entry> + '_ {
        let store = self.store;
        self.named
            .iter()
            .filter_map(move |k| store.entry(k))
            .filter(move |e| Kind::of(&e.policy) == Some(kind))
    }

    /// Policies of `kind` that match, with the matching rule, in evaluation order; lazy, so
    /// `.next()` stops at the first.
    fn matching<'a>(
        &'a self,
        kind: Kind,
        probe: &'a Probe<'_>,
    ) -> impl Iterator<Item = (&'s Entry, usize)> + 'a {
        self.groups
            .iter()
            .flatten()
            .flat_map(move |g| g.set(kind).candidates(probe))
            .chain(self.named(kind))
            .filter_map(move |e| e.compiled.matches(probe).map(|rule| (e, rule)))
    }

    /// Whether any policy of `kind` applies (matching or not).
    fn any(&self, kind: Kind) -> bool {
        self.groups.iter().flatten().any(|g| g.set(kind).count > 0)
            || self.named(kind).next().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "default";

    fn identity(s: &str) -> Identity {
        s.parse().expect("test identity")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().expect("test CIDR")
    }

    /// An owned connection, so tests can build them in tables.
    #[derive(Clone)]
    struct Conn {
        id: Option<Identity>,
        src: IpAddr,
        dst: IpAddr,
        port: u16,
        ns: String,
        policies: Vec<std::sync::Arc<str>>,
    }

    impl Conn {
        fn eval(&self, store: &PolicyStore) -> Decision {
            evaluate(
                store,
                &Connection {
                    src_identity: self.id.as_ref(),
                    src_ip: self.src,
                    dst_ip: self.dst,
                    dst_port: self.port,
                    dst_namespace: &self.ns,
                    dst_policies: &self.policies,
                },
            )
        }

        fn named(mut self, key: &str) -> Conn {
            self.policies.push(key.into());
            self
        }
    }

    /// ztunnel's three test connections: plaintext, one identity, another identity elsewhere.
    fn plaintext() -> Conn {
        Conn {
            id: None,
            src: ip("127.0.0.1"),
            dst: ip("127.0.0.2"),
            port: 8080,
            ns: NS.into(),
            policies: vec![],
        }
    }

    fn tls() -> Conn {
        Conn {
            id: Some(identity("spiffe://td/ns/namespace/sa/account")),
            ..plaintext()
        }
    }

    fn tls_alt() -> Conn {
        Conn {
            id: Some(identity("spiffe://td-alt/ns/ns-alt/sa/sa-alt")),
            src: ip("127.0.0.3"),
            dst: ip("127.0.0.4"),
            port: 9090,
            ns: NS.into(),
            policies: vec![],
        }
    }

    fn policy(name: &str, action: Action, rules: Vec<Rule>) -> Policy {
        Policy {
            name: name.into(),
            namespace: NS.into(),
            scope: Scope::Namespace,
            action,
            dry_run: false,
            rules,
        }
    }

    fn rule(clauses: Vec<Vec<Match>>) -> Rule {
        Rule {
            clauses: clauses
                .into_iter()
                .map(|matches| Clause { matches })
                .collect(),
        }
    }

    /// A policy with one rule, one clause, one match.
    fn one(name: &str, action: Action, m: Match) -> Policy {
        policy(name, action, vec![rule(vec![vec![m]])])
    }

    fn store(ps: impl IntoIterator<Item = Policy>) -> PolicyStore {
        ps.into_iter().collect()
    }

    /// Asserts an ALLOW policy with the single match `m` matches exactly the connections marked.
    fn check_field(label: &str, m: Match, want: [(Conn, bool); 3]) {
        let s = store([one("p", Action::Allow, m)]);
        for (i, (c, want)) in want.into_iter().enumerate() {
            assert_eq!(c.eval(&s).allowed, want, "{label}: connection {i}");
        }
    }

    #[test]
    fn every_field_and_its_not_form() {
        let exact = |s: &str| vec![StringMatch::Exact(s.into())];
        let sa = vec![ServiceAccountMatch {
            namespace: "namespace".into(),
            service_account: "account".into(),
        }];
        let m = Match::default;
        let cases: Vec<(&str, Match, [bool; 3])> = vec![
            (
                "namespaces",
                Match {
                    namespaces: exact("namespace"),
                    ..m()
                },
                [false, true, false],
            ),
            (
                "not_namespaces",
                Match {
                    not_namespaces: exact("namespace"),
                    ..m()
                },
                [true, false, true],
            ),
            (
                "service_accounts",
                Match {
                    service_accounts: sa.clone(),
                    ..m()
                },
                [false, true, false],
            ),
            (
                "not_service_accounts",
                Match {
                    not_service_accounts: sa,
                    ..m()
                },
                [true, false, true],
            ),
            (
                "principals",
                Match {
                    principals: exact("td/ns/namespace/sa/account"),
                    ..m()
                },
                [false, true, false],
            ),
            (
                "not_principals",
                Match {
                    not_principals: exact("td/ns/namespace/sa/account"),
                    ..m()
                },
                [true, false, true],
            ),
            (
                "source_ips",
                Match {
                    source_ips: vec![cidr("127.0.0.1/32")],
                    ..m()
                },
                [true, true, false],
            ),
            (
                "not_source_ips",
                Match {
                    not_source_ips: vec![cidr("127.0.0.1")],
                    ..m()
                },
                [false, false, true],
            ),
            (
                "destination_ips",
                Match {
                    destination_ips: vec![cidr("127.0.0.2/32")],
                    ..m()
                },
                [true, true, false],
            ),
            (
                "not_destination_ips",
                Match {
                    not_destination_ips: vec![cidr("127.0.0.2")],
                    ..m()
                },
                [false, false, true],
            ),
            (
                "cidr range",
                Match {
                    destination_ips: vec![cidr("127.0.0.1/24")],
                    ..m()
                },
                [true, true, true],
            ),
            (
                "destination_ports",
                Match {
                    destination_ports: vec![8080],
                    ..m()
                },
                [true, true, false],
            ),
            (
                "not_destination_ports",
                Match {
                    not_destination_ports: vec![8080],
                    ..m()
                },
                [false, false, true],
            ),
        ];
        for (label, m, [a, b, c]) in cases {
            check_field(label, m, [(plaintext(), a), (tls(), b), (tls_alt(), c)]);
        }
    }

    #[test]
    fn a_match_needs_all_its_fields_and_a_field_any_entry() {
        let m = Match {
            principals: vec![
                StringMatch::Exact("td/ns/other/sa/x".into()),
                StringMatch::Exact("td/ns/namespace/sa/account".into()),
            ],
            destination_ports: vec![9090, 8080],
            not_source_ips: vec![cidr("10.0.0.0/8")],
            ..Default::default()
        };
        let s = store([one("p", Action::Allow, m)]);
        assert!(tls().eval(&s).allowed);
        assert!(
            !Conn {
                port: 7070,
                ..tls()
            }
            .eval(&s)
            .allowed,
            "port must match too"
        );
        assert!(
            !Conn {
                src: ip("10.1.1.1"),
                ..tls()
            }
            .eval(&s)
            .allowed,
            "not_source_ips excludes"
        );
        assert!(!plaintext().eval(&s).allowed);
    }

    #[test]
    fn each_string_match_kind_on_principals_and_namespaces() {
        let cases = [
            (
                StringMatch::Exact("td/ns/namespace/sa/account".into()),
                true,
            ),
            (
                StringMatch::Exact("td/ns/namespace/sa/accoun".into()),
                false,
            ),
            (
                StringMatch::Exact("spiffe://td/ns/namespace/sa/account".into()),
                false,
            ),
            (StringMatch::Prefix("td/ns/namespace/".into()), true),
            (StringMatch::Prefix("td/ns/ns-alt/".into()), false),
            (StringMatch::Prefix("".into()), true),
            (StringMatch::Suffix("/sa/account".into()), true),
            (StringMatch::Suffix("/sa/sa-alt".into()), false),
            (StringMatch::Presence {}, true),
        ];
        for (sm, want) in cases {
            let s = store([one(
                "p",
                Action::Allow,
                Match {
                    principals: vec![sm.clone()],
                    ..Default::default()
                },
            )]);
            assert_eq!(tls().eval(&s).allowed, want, "principal {sm:?}");
            assert!(
                !plaintext().eval(&s).allowed,
                "plaintext never has a principal: {sm:?}"
            );
            let s = store([one(
                "p",
                Action::Allow,
                Match {
                    not_principals: vec![sm.clone()],
                    ..Default::default()
                },
            )]);
            assert_eq!(tls().eval(&s).allowed, !want, "not principal {sm:?}");
            assert!(
                plaintext().eval(&s).allowed,
                "plaintext passes not_principals: {sm:?}"
            );
        }
        for (sm, tls_want, plain_want) in [
            (StringMatch::Exact("namespace".into()), true, false),
            (StringMatch::Prefix("name".into()), true, false),
            (StringMatch::Suffix("space".into()), true, false),
            (StringMatch::Presence {}, true, false),
            (StringMatch::Suffix("alt".into()), false, false),
            // ztunnel compares a plaintext source's namespace as "".
            (StringMatch::Exact("".into()), false, true),
        ] {
            let s = store([one(
                "p",
                Action::Allow,
                Match {
                    namespaces: vec![sm.clone()],
                    ..Default::default()
                },
            )]);
            assert_eq!(tls().eval(&s).allowed, tls_want, "namespace {sm:?}");
            assert_eq!(
                plaintext().eval(&s).allowed,
                plain_want,
                "plaintext namespace {sm:?}"
            );
        }
    }

    #[test]
    fn addresses_v4_v6_and_v4_mapped() {
        let allow = |c: &str| {
            store([one(
                "p",
                Action::Allow,
                Match {
                    source_ips: vec![cidr(c)],
                    ..Default::default()
                },
            )])
        };
        let from = |src: &str| Conn {
            src: ip(src),
            ..tls()
        };
        let s = allow("10.0.0.0/8");
        assert!(from("10.2.3.4").eval(&s).allowed);
        assert!(
            from("::ffff:10.2.3.4").eval(&s).allowed,
            "mapped source as v4"
        );
        assert!(!from("11.0.0.1").eval(&s).allowed);
        assert!(!from("fd00::1").eval(&s).allowed);
        let s = allow("fd00::/8");
        assert!(from("fd12::1").eval(&s).allowed);
        assert!(!from("fe80::1").eval(&s).allowed);
        assert!(!from("10.0.0.1").eval(&s).allowed);
        let s = allow("::ffff:10.0.0.0/104");
        assert!(from("10.9.9.9").eval(&s).allowed, "mapped block as v4");
        assert!(!from("11.9.9.9").eval(&s).allowed);

        let s = store([one(
            "p",
            Action::Deny,
            Match {
                not_destination_ips: vec![cidr("fd00::/16")],
                ..Default::default()
            },
        )]);
        assert!(
            Conn {
                dst: ip("fd00::5"),
                ..tls()
            }
            .eval(&s)
            .allowed
        );
        assert!(
            !Conn {
                dst: ip("10.0.0.5"),
                ..tls()
            }
            .eval(&s)
            .allowed
        );
        assert!(
            !Conn {
                dst: ip("::ffff:10.0.0.5"),
                ..tls()
            }
            .eval(&s)
            .allowed
        );
    }

    #[test]
    fn nesting_rules_clauses_matches() {
        // Rule 0: (ns a OR ns b) AND port 80. Rule 1: principal c.
        let ns = |n: &str| Match {
            namespaces: vec![StringMatch::Exact(n.into())],
            ..Default::default()
        };
        let p = policy(
            "p",
            Action::Allow,
            vec![
                rule(vec![
                    vec![ns("a"), ns("b")],
                    vec![Match {
                        destination_ports: vec![80],
                        ..Default::default()
                    }],
                ]),
                rule(vec![vec![Match {
                    principals: vec![StringMatch::Exact("td/ns/c/sa/x".into())],
                    ..Default::default()
                }]]),
            ],
        );
        let s = store([p]);
        let from = |id: &str, port| Conn {
            id: Some(identity(id)),
            port,
            ..plaintext()
        };
        let d = from("spiffe://td/ns/a/sa/x", 80).eval(&s);
        assert_eq!((d.allowed, d.rule), (true, Some(0)));
        assert!(from("spiffe://td/ns/b/sa/x", 80).eval(&s).allowed);
        assert!(
            !from("spiffe://td/ns/bad/sa/x", 80).eval(&s).allowed,
            "wrong namespace"
        );
        assert!(
            !from("spiffe://td/ns/a/sa/x", 81).eval(&s).allowed,
            "wrong port"
        );
        let d = from("spiffe://td/ns/c/sa/x", 81).eval(&s);
        assert_eq!((d.allowed, d.rule), (true, Some(1)), "second rule");
    }

    #[test]
    fn empty_rules_clauses_and_matches_follow_ztunnel() {
        let allow = |rules| store([policy("p", Action::Allow, rules)]);
        // No rules: matches nothing, so an ALLOW policy denies all.
        let d = tls().eval(&allow(vec![]));
        assert_eq!(
            (d.allowed, d.reason),
            (false, DecisionReason::NoAllowPolicyMatched)
        );
        // A rule with no clauses (`rules: [{}]`): matches all.
        assert!(plaintext().eval(&allow(vec![rule(vec![])])).allowed);
        // A clause with no matches: matches.
        assert!(plaintext().eval(&allow(vec![rule(vec![vec![]])])).allowed);
        // A match with every field empty: never matches, even next to an always-true clause.
        assert!(
            !plaintext()
                .eval(&allow(vec![rule(vec![vec![Match::default()]])]))
                .allowed
        );
        assert!(
            !plaintext()
                .eval(&allow(vec![rule(vec![vec![], vec![Match::default()]])]))
                .allowed
        );
        // ... but another match in the same clause can still match.
        let port = Match {
            destination_ports: vec![8080],
            ..Default::default()
        };
        assert!(
            plaintext()
                .eval(&allow(vec![rule(vec![vec![Match::default(), port]])]))
                .allowed
        );
        // A DENY policy with no rules has no effect.
        let s = store([policy("d", Action::Deny, vec![])]);
        assert_eq!(tls().eval(&s).reason, DecisionReason::NoAllowPolicy);
    }

    #[test]
    fn scopes() {
        let allow_all = |name: &str, namespace: &str, scope| Policy {
            namespace: namespace.into(),
            scope,
            ..policy(name, Action::Allow, vec![rule(vec![])])
        };
        let deny_all = |name: &str, namespace: &str, scope| Policy {
            action: Action::Deny,
            ..allow_all(name, namespace, scope)
        };

        // Global (root namespace) applies everywhere.
        let s = store([deny_all("g", "istio-system", Scope::Global)]);
        let d = tls().eval(&s);
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("istio-system/g"))
        );
        assert!(
            !Conn {
                ns: "elsewhere".into(),
                ..tls()
            }
            .eval(&s)
            .allowed
        );

        // Namespace scope: only the destination's namespace.
        let s = store([deny_all("n", "other", Scope::Namespace)]);
        assert!(
            tls().eval(&s).allowed,
            "another namespace's policy does not apply"
        );
        assert!(
            !Conn {
                ns: "other".into(),
                ..tls()
            }
            .eval(&s)
            .allowed
        );
        // ... and an ALLOW there does not make this namespace allow-listed either.
        let s = store([Policy {
            rules: vec![],
            ..allow_all("n", "other", Scope::Namespace)
        }]);
        assert_eq!(tls().eval(&s).reason, DecisionReason::NoAllowPolicy);

        // Workload selector: only when the workload names it.
        let s = store([deny_all("w", NS, Scope::WorkloadSelector)]);
        assert!(tls().eval(&s).allowed, "not named");
        let d = tls().named("default/w").eval(&s);
        assert_eq!((d.allowed, d.policy.as_deref()), (false, Some("default/w")));
        // A named key the store does not have is skipped.
        assert!(tls().named("default/missing").eval(&s).allowed);

        // A named ALLOW policy makes the workload allow-listed.
        let s = store([Policy {
            rules: vec![],
            ..allow_all("w", NS, Scope::WorkloadSelector)
        }]);
        assert!(tls().eval(&s).allowed);
        assert_eq!(
            tls().named("default/w").eval(&s).reason,
            DecisionReason::NoAllowPolicyMatched
        );
    }

    #[test]
    fn deny_wins_over_allow() {
        let s = store([
            policy("allow-all", Action::Allow, vec![rule(vec![])]),
            one(
                "deny-account",
                Action::Deny,
                Match {
                    principals: vec![StringMatch::Exact("td/ns/namespace/sa/account".into())],
                    ..Default::default()
                },
            ),
        ]);
        let d = tls().eval(&s);
        assert_eq!(
            d,
            Decision {
                allowed: false,
                policy: Some("default/deny-account".into()),
                rule: Some(0),
                reason: DecisionReason::DeniedByPolicy,
                dry_run: vec![],
            }
        );
        assert_eq!(
            d.describe(),
            "denied by policy default/deny-account (rule 0)"
        );
        let d = tls_alt().eval(&s);
        assert_eq!(
            (d.allowed, d.reason),
            (true, DecisionReason::AllowedByPolicy)
        );
        assert_eq!(d.describe(), "allowed by policy default/allow-all (rule 0)");
    }

    #[test]
    fn no_allow_policy_allows_and_unmatched_allow_denies() {
        let d = tls().eval(&PolicyStore::new());
        assert_eq!(
            (d.allowed, d.reason, d.policy.clone()),
            (true, DecisionReason::NoAllowPolicy, None)
        );
        assert_eq!(d.describe(), "allowed: no allow policy applies");

        let s = store([one(
            "only-8080",
            Action::Allow,
            Match {
                destination_ports: vec![8080],
                ..Default::default()
            },
        )]);
        assert!(tls().eval(&s).allowed);
        let d = tls_alt().eval(&s);
        assert_eq!(
            (d.allowed, d.reason, d.policy.clone()),
            (false, DecisionReason::NoAllowPolicyMatched, None)
        );
        assert_eq!(d.describe(), "denied: no allow policy matched");

        // Audit policies take no part.
        let s = store([policy("audit", Action::Audit, vec![rule(vec![])])]);
        assert_eq!(tls().eval(&s).reason, DecisionReason::NoAllowPolicy);
    }

    #[test]
    fn dry_run_is_reported_and_never_decides() {
        let dry = |p: Policy| Policy { dry_run: true, ..p };
        let account = Match {
            principals: vec![StringMatch::Exact("td/ns/namespace/sa/account".into())],
            ..Default::default()
        };

        // A matching dry-run DENY: still allowed, reported.
        let s = store([dry(one("would-deny", Action::Deny, account.clone()))]);
        let d = tls().eval(&s);
        assert!(d.allowed);
        assert_eq!(d.reason, DecisionReason::NoAllowPolicy);
        assert_eq!(
            d.dry_run,
            vec![DryRunHit {
                policy: Some("default/would-deny".into()),
                rule: Some(0),
                result: DryRunResult::WouldDeny
            }]
        );
        assert_eq!(
            d.dry_run[0].describe(),
            "dry-run policy default/would-deny would deny (rule 0)"
        );
        assert!(
            tls_alt().eval(&s).dry_run.is_empty(),
            "not matching: nothing reported"
        );

        // A dry-run ALLOW is not an allow policy: its presence does not deny others ...
        let s = store([dry(one("would-allow", Action::Allow, account.clone()))]);
        let d = tls_alt().eval(&s);
        assert_eq!((d.allowed, d.reason), (true, DecisionReason::NoAllowPolicy));
        // ... but it is reported that enforcing it would deny them.
        assert_eq!(d.dry_run.len(), 1);
        assert_eq!(d.dry_run[0].result, DryRunResult::WouldDenyNoAllowMatched);
        assert!(d.dry_run[0].describe().contains("would deny"));
        let d = tls().eval(&s);
        assert!(d.allowed);
        assert_eq!(d.dry_run[0].result, DryRunResult::WouldAllow);

        // With an enforced deny and allow in place, dry-run policies change nothing.
        let s = store([
            one("deny", Action::Deny, account.clone()),
            dry(policy("dry-allow-all", Action::Allow, vec![rule(vec![])])),
            dry(policy("dry-deny-all", Action::Deny, vec![rule(vec![])])),
            one(
                "allow-alt",
                Action::Allow,
                Match {
                    principals: vec![StringMatch::Exact("td-alt/ns/ns-alt/sa/sa-alt".into())],
                    ..Default::default()
                },
            ),
        ]);
        let d = tls().eval(&s);
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (false, Some("default/deny"))
        );
        assert_eq!(
            d.dry_run.iter().map(|h| h.result).collect::<Vec<_>>(),
            vec![DryRunResult::WouldDeny]
        );
        let d = tls_alt().eval(&s);
        assert_eq!(
            (d.allowed, d.policy.as_deref()),
            (true, Some("default/allow-alt"))
        );
        assert_eq!(
            d.dry_run.iter().map(|h| h.result).collect::<Vec<_>>(),
            vec![DryRunResult::WouldDeny, DryRunResult::WouldAllow]
        );
        let d = plaintext().eval(&s);
        assert_eq!(
            (d.allowed, d.reason),
            (false, DecisionReason::NoAllowPolicyMatched)
        );
        assert_eq!(d.dry_run.len(), 2, "{:?}", d.dry_run);

        // Named dry-run policies count too.
        let s = store([Policy {
            scope: Scope::WorkloadSelector,
            ..dry(one("w", Action::Deny, account))
        }]);
        assert!(tls().eval(&s).dry_run.is_empty());
        let d = tls().named("default/w").eval(&s);
        assert!(d.allowed);
        assert_eq!(d.dry_run[0].policy.as_deref(), Some("default/w"));
    }

    #[test]
    fn decision_serializes_for_the_access_log() {
        let s = store([one(
            "deny",
            Action::Deny,
            Match {
                destination_ports: vec![8080],
                ..Default::default()
            },
        )]);
        let json = serde_json::to_string(&tls().eval(&s)).expect("serializes");
        assert_eq!(
            json,
            r#"{"allowed":false,"policy":"default/deny","rule":0,"reason":"denied_by_policy"}"#
        );
    }

    /// The index is only an optimisation: for random policies and connections, the decision
    /// equals a direct transcription of ztunnel's algorithm over the plain types.
    #[test]
    fn indexed_evaluation_equals_the_reference() {
        let mut rng = fastrand::Rng::with_seed(7);
        let ids = [
            None,
            Some(identity("spiffe://td/ns/a/sa/x")),
            Some(identity("spiffe://td/ns/a/sa/y")),
            Some(identity("spiffe://td/ns/b/sa/x")),
            Some(identity("spiffe://other/ns/b/sa/y")),
        ];
        let ips = ["10.0.0.1", "10.0.1.1", "fd00::1", "::ffff:10.0.0.2"];
        let strings = |rng: &mut fastrand::Rng, full: bool| -> Vec<StringMatch> {
            let pool: &[&str] = if full {
                &[
                    "td/ns/a/sa/x",
                    "td/ns/a/sa/y",
                    "td/ns/b/sa/x",
                    "other/ns/b/sa/y",
                    "td/ns/c/sa/z",
                ]
            } else {
                &["a", "b", "c", ""]
            };
            (0..rng.usize(1..=2))
                .map(|_| {
                    let s = pool[rng.usize(..pool.len())].to_string();
                    let slash = |n: usize| s.match_indices('/').nth(n).map_or(0, |(i, _)| i);
                    match rng.u8(..12) {
                        0 => StringMatch::Prefix(s[..s.len() / 2].to_string()),
                        1 => StringMatch::Suffix(s[s.len() / 2..].to_string()),
                        2 => StringMatch::Presence {},
                        // Istio's `td/ns/foo/*` and `*/ns/foo/sa/bar` shapes, when `full`.
                        3 if full => StringMatch::Prefix(s[..=slash(2)].to_string()),
                        4 if full => StringMatch::Suffix(s[slash(0)..].to_string()),
                        _ => StringMatch::Exact(s),
                    }
                })
                .collect()
        };
        let random_match = |rng: &mut fastrand::Rng| {
            let mut m = Match::default();
            let maybe = |rng: &mut fastrand::Rng| rng.u8(..4) == 0;
            if rng.bool() {
                m.principals = strings(rng, true)
            }
            if maybe(rng) {
                m.not_principals = strings(rng, true)
            }
            if maybe(rng) {
                m.namespaces = strings(rng, false)
            }
            if maybe(rng) {
                m.not_namespaces = strings(rng, false)
            }
            if maybe(rng) {
                m.service_accounts = vec![ServiceAccountMatch {
                    namespace: "a".into(),
                    service_account: "x".into(),
                }]
            }
            if maybe(rng) {
                m.not_service_accounts = vec![ServiceAccountMatch {
                    namespace: "b".into(),
                    service_account: "y".into(),
                }]
            }
            if maybe(rng) {
                m.source_ips = vec![cidr(
                    ["10.0.0.0/24", "fd00::/64", "::ffff:10.0.0.0/120"][rng.usize(..3)],
                )]
            }
            if maybe(rng) {
                m.not_source_ips = vec![cidr("10.0.1.0/24")]
            }
            if maybe(rng) {
                m.destination_ips = vec![cidr("10.0.0.0/8")]
            }
            if maybe(rng) {
                m.not_destination_ips = vec![cidr("fd00::/8")]
            }
            if rng.bool() {
                m.destination_ports = vec![rng.u16(80..83)]
            }
            if maybe(rng) {
                m.not_destination_ports = vec![rng.u16(80..83)]
            }
            m
        };
        let mut seen = std::collections::HashMap::new();
        for round in 0..300 {
            let mut policies = Vec::new();
            for i in 0..rng.usize(0..8) {
                let rules = (0..rng.usize(0..3))
                    .map(|_| {
                        rule(
                            (0..rng.usize(0..3))
                                .map(|_| {
                                    (0..rng.usize(0..3))
                                        .map(|_| random_match(&mut rng))
                                        .collect()
                                })
                                .collect(),
                        )
                    })
                    .collect();
                let scope = [
                    Scope::Global,
                    Scope::Namespace,
                    Scope::Namespace,
                    Scope::WorkloadSelector,
                ][rng.usize(..4)];
                policies.push(Policy {
                    name: format!("p{i}"),
                    namespace: ["default", "other"][rng.usize(..2)].into(),
                    scope,
                    action: [Action::Allow, Action::Deny, Action::Audit][rng.usize(..3)],
                    dry_run: rng.u8(..5) == 0,
                    rules,
                });
            }
            let s: PolicyStore = policies.iter().cloned().collect();
            for _ in 0..20 {
                let c = Conn {
                    id: ids[rng.usize(..ids.len())].clone(),
                    src: ip(ips[rng.usize(..ips.len())]),
                    dst: ip(ips[rng.usize(..ips.len())]),
                    port: rng.u16(80..83),
                    ns: "default".into(),
                    policies: if rng.bool() {
                        vec!["default/p0".into(), "other/p1".into()]
                    } else {
                        vec![]
                    },
                };
                let got = c.eval(&s);
                let want = reference::decide(&policies, &c);
                assert_eq!(
                    (got.allowed, got.reason),
                    want,
                    "round {round}: {policies:#?}\n{}",
                    c.ns
                );
                *seen.entry(format!("{:?}", got.reason)).or_insert(0) += 1;
                if let (Some(key), Some(rule)) = (&got.policy, got.rule) {
                    let p = policies
                        .iter()
                        .find(|p| &p.key() == key)
                        .expect("named policy exists");
                    assert_eq!(
                        reference::matches(p, &c),
                        Some(rule),
                        "round {round}: {key}"
                    );
                }
            }
        }
        // The random cases reach every outcome, not just the easy ones.
        for reason in [
            "DeniedByPolicy",
            "AllowedByPolicy",
            "NoAllowPolicy",
            "NoAllowPolicyMatched",
        ] {
            assert!(seen.get(reason).copied().unwrap_or(0) >= 100, "{seen:?}");
        }
    }

    /// ztunnel's algorithm, transcribed over the plain types, with the identity formatted.
    mod reference {
        use super::*;

        pub fn matches(p: &Policy, c: &Conn) -> Option<usize> {
            let principal = c.id.as_ref().map(|i| i.to_string()).unwrap_or_default();
            let ns =
                c.id.as_ref()
                    .map(|i| i.namespace().to_owned())
                    .unwrap_or_default();
            let field = |pos: bool, neg: bool| pos && neg;
            p.rules.iter().position(|r| {
                r.clauses.iter().all(|cl| {
                    cl.matches.is_empty()
                        || cl.matches.iter().any(|m| {
                            if m.is_empty() {
                                return false;
                            }
                            let any_s = |v: &[StringMatch], s: &str| v.iter().any(|x| x.matches(s));
                            let any_p = |v: &[StringMatch]| {
                                principal
                                    .strip_prefix("spiffe://")
                                    .is_some_and(|s| any_s(v, s))
                            };
                            let any_sa = |v: &[ServiceAccountMatch]| {
                                c.id.as_ref().is_some_and(|i| {
                                    v.iter().any(|sa| {
                                        sa.namespace == i.namespace()
                                            && sa.service_account == i.service_account()
                                    })
                                })
                            };
                            let any_ip = |v: &[Cidr], a: IpAddr| v.iter().any(|n| n.contains(a));
                            field(
                                m.principals.is_empty() || any_p(&m.principals),
                                !any_p(&m.not_principals),
                            ) && field(
                                m.namespaces.is_empty() || any_s(&m.namespaces, &ns),
                                !any_s(&m.not_namespaces, &ns),
                            ) && field(
                                m.service_accounts.is_empty() || any_sa(&m.service_accounts),
                                !any_sa(&m.not_service_accounts),
                            ) && field(
                                m.source_ips.is_empty() || any_ip(&m.source_ips, c.src),
                                !any_ip(&m.not_source_ips, c.src),
                            ) && field(
                                m.destination_ips.is_empty() || any_ip(&m.destination_ips, c.dst),
                                !any_ip(&m.not_destination_ips, c.dst),
                            ) && field(
                                m.destination_ports.is_empty()
                                    || m.destination_ports.contains(&c.port),
                                !m.not_destination_ports.contains(&c.port),
                            )
                        })
                })
            })
        }

        pub fn decide(policies: &[Policy], c: &Conn) -> (bool, DecisionReason) {
            let applies = |p: &&Policy| {
                p.scope == Scope::Global
                    || (p.scope == Scope::Namespace && p.namespace == c.ns)
                    || c.policies.iter().any(|n| **n == *p.key())
            };
            let enforced: Vec<&Policy> = policies
                .iter()
                .filter(applies)
                .filter(|p| !p.dry_run)
                .collect();
            if enforced
                .iter()
                .any(|p| p.action == Action::Deny && matches(p, c).is_some())
            {
                return (false, DecisionReason::DeniedByPolicy);
            }
            let allows: Vec<_> = enforced
                .iter()
                .filter(|p| p.action == Action::Allow)
                .collect();
            if allows.is_empty() {
                return (true, DecisionReason::NoAllowPolicy);
            }
            if allows.iter().any(|p| matches(p, c).is_some()) {
                (true, DecisionReason::AllowedByPolicy)
            } else {
                (false, DecisionReason::NoAllowPolicyMatched)
            }
        }
    }
}
