//! Policies compiled once, when they enter the store, into the form the data path evaluates:
//! CIDRs as masks, IPv4-mapped blocks un-mapped, rules that can never match dropped (keeping
//! their indices for reporting), clauses that always match dropped, and an index placement — the
//! set of exact source principals, source namespaces or destination ports one of which a
//! connection must have for the policy to possibly match. Evaluation allocates nothing: the
//! source principal is compared part by part against the identity, never formatted.

use std::net::IpAddr;

use super::types::{Match, Net, Policy, ServiceAccountMatch, StringMatch};
use crate::identity::Identity;

/// What a connection offers to the matchers, computed once per decision.
pub(super) struct Probe<'a> {
    pub identity: Option<&'a Identity>,
    /// Source namespace, `""` for a plaintext source (ztunnel's behaviour: `namespaces` entries
    /// are matched against the empty string).
    pub namespace: &'a str,
    /// Index keys; `principal` is `None` for a plaintext source, which no principal matches.
    pub principal_key: Option<u64>,
    pub namespace_key: u64,
    pub port_key: u64,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub port: u16,
}

impl<'a> Probe<'a> {
    pub fn new(identity: Option<&'a Identity>, src: IpAddr, dst: IpAddr, port: u16) -> Probe<'a> {
        let namespace = identity.map(Identity::namespace).unwrap_or("");
        Probe {
            identity,
            namespace,
            principal_key: identity.map(|id| Fnv::of_parts(&principal_parts(id))),
            namespace_key: Fnv::of_parts(&[namespace]),
            port_key: port_key(port),
            src: src.to_canonical(),
            dst: dst.to_canonical(),
            port,
        }
    }
}

/// A policy ready to evaluate.
#[derive(Debug)]
pub(super) struct Compiled {
    rules: Vec<CRule>,
    pub placement: Placement,
}

#[derive(Debug)]
struct CRule {
    /// Index in `Policy::rules`, reported in decisions.
    index: usize,
    /// All must match; empty: the rule matches everything.
    clauses: Vec<CClause>,
}

#[derive(Debug)]
struct CClause {
    /// Any must match; never empty (a clause without matches always matches and is dropped; one
    /// whose matches are all empty never matches and drops its rule).
    matches: Vec<CMatch>,
}

#[derive(Debug, Default)]
struct CMatch {
    namespaces: Vec<StringMatch>,
    not_namespaces: Vec<StringMatch>,
    service_accounts: Vec<ServiceAccountMatch>,
    not_service_accounts: Vec<ServiceAccountMatch>,
    principals: Vec<StringMatch>,
    not_principals: Vec<StringMatch>,
    source_ips: Vec<Net>,
    not_source_ips: Vec<Net>,
    destination_ips: Vec<Net>,
    not_destination_ips: Vec<Net>,
    destination_ports: Vec<u16>,
    not_destination_ports: Vec<u16>,
}

/// Where the store files a policy so that a decision looks at few of them.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Placement {
    /// It can never match (no rules, or every rule has a clause that cannot match). It still
    /// counts as present (an ALLOW policy that matches nothing denies).
    Never,
    /// It can match only a connection whose source principal (`Principal`), source namespace
    /// (`Namespace`) or destination port (`Port`) has one of these keys.
    Keys(IndexKind, Vec<u64>),
    /// Evaluated for every connection.
    Always,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum IndexKind {
    Principal,
    Namespace,
    Port,
}

impl Compiled {
    pub fn new(policy: &Policy) -> Compiled {
        let mut rules = Vec::with_capacity(policy.rules.len());
        'rules: for (index, rule) in policy.rules.iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for clause in &rule.clauses {
                if clause.matches.is_empty() {
                    continue; // always matches
                }
                let matches: Vec<CMatch> = clause
                    .matches
                    .iter()
                    .filter(|m| !m.is_empty())
                    .map(CMatch::new)
                    .collect();
                if matches.is_empty() {
                    continue 'rules; // this clause never matches, so neither does the rule
                }
                clauses.push(CClause { matches });
            }
            rules.push(CRule { index, clauses });
        }
        let placement = placement(&rules);
        Compiled { rules, placement }
    }

    /// The index of the first rule that matches, if any.
    #[inline]
    pub fn matches(&self, p: &Probe<'_>) -> Option<usize> {
        self.rules
            .iter()
            .find(|r| {
                r.clauses
                    .iter()
                    .all(|c| c.matches.iter().any(|m| m.matches(p)))
            })
            .map(|r| r.index)
    }
}

impl CMatch {
    fn new(m: &Match) -> CMatch {
        let nets = |v: &[super::Cidr]| v.iter().map(|c| Net::from(*c)).collect();
        CMatch {
            namespaces: m.namespaces.clone(),
            not_namespaces: m.not_namespaces.clone(),
            service_accounts: m.service_accounts.clone(),
            not_service_accounts: m.not_service_accounts.clone(),
            principals: m.principals.clone(),
            not_principals: m.not_principals.clone(),
            source_ips: nets(&m.source_ips),
            not_source_ips: nets(&m.not_source_ips),
            destination_ips: nets(&m.destination_ips),
            not_destination_ips: nets(&m.not_destination_ips),
            destination_ports: m.destination_ports.clone(),
            not_destination_ports: m.not_destination_ports.clone(),
        }
    }

    /// Cheap fields first: ports, addresses, then strings.
    #[inline]
    fn matches(&self, p: &Probe<'_>) -> bool {
        field(&self.destination_ports, &self.not_destination_ports, |x| {
            *x == p.port
        }) && field(&self.destination_ips, &self.not_destination_ips, |n| {
            n.contains(p.dst)
        }) && field(&self.source_ips, &self.not_source_ips, |n| {
            n.contains(p.src)
        }) && field(&self.principals, &self.not_principals, |m| {
            p.identity.is_some_and(|id| principal_matches(m, id))
        }) && field(&self.namespaces, &self.not_namespaces, |m| {
            m.matches(p.namespace)
        }) && field(&self.service_accounts, &self.not_service_accounts, |sa| {
            p.identity.is_some_and(|id| {
                id.namespace() == sa.namespace && id.service_account() == sa.service_account
            })
        })
    }
}

/// A positive field matches if empty or any entry matches; a negative one if no entry matches.
#[inline]
fn field<T>(pos: &[T], neg: &[T], f: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&f)) && !neg.iter().any(&f)
}

/// The source principal `td/ns/<ns>/sa/<sa>` as pieces, so it is never formatted.
fn principal_parts(id: &Identity) -> [&str; 5] {
    [
        id.trust_domain(),
        "/ns/",
        id.namespace(),
        "/sa/",
        id.service_account(),
    ]
}

/// Whether `id`'s principal (`td/ns/<ns>/sa/<sa>`, Istio's form without `spiffe://`) matches
/// `m`; L4 and L7 (the waypoint) policies both judge principals with it.
pub fn principal_matches(m: &StringMatch, id: &Identity) -> bool {
    let parts = principal_parts(id);
    match m {
        StringMatch::Exact(s) => {
            parts.iter().map(|p| p.len()).sum::<usize>() == s.len() && starts_with(&parts, s)
        }
        StringMatch::Prefix(s) => starts_with(&parts, s),
        StringMatch::Suffix(s) => ends_with(&parts, s),
        // The principal always has at least "/ns/" in it.
        StringMatch::Presence {} => true,
    }
}

/// Whether the concatenation of `parts` starts with `prefix`.
fn starts_with(parts: &[&str], prefix: &str) -> bool {
    let mut rest = prefix.as_bytes();
    for part in parts {
        if rest.is_empty() {
            return true;
        }
        let part = part.as_bytes();
        let n = part.len().min(rest.len());
        if part[..n] != rest[..n] {
            return false;
        }
        rest = &rest[n..];
    }
    rest.is_empty()
}

/// Whether the concatenation of `parts` ends with `suffix`.
fn ends_with(parts: &[&str], suffix: &str) -> bool {
    let mut rest = suffix.as_bytes();
    for part in parts.iter().rev() {
        if rest.is_empty() {
            return true;
        }
        let part = part.as_bytes();
        let n = part.len().min(rest.len());
        if part[part.len() - n..] != rest[rest.len() - n..] {
            return false;
        }
        rest = &rest[..rest.len() - n];
    }
    rest.is_empty()
}

/// Chooses the index for a policy: the first of principal, namespace, port for which every
/// rule that can match has a clause whose every match requires one of a finite set of keys.
/// That is a necessary condition for the policy to match, so looking the policy up only under
/// those keys never misses it; a hash collision only adds a candidate, which is then evaluated
/// in full.
fn placement(rules: &[CRule]) -> Placement {
    if rules.is_empty() {
        return Placement::Never;
    }
    'kinds: for kind in [IndexKind::Principal, IndexKind::Namespace, IndexKind::Port] {
        let mut keys = Vec::new();
        for rule in rules {
            let clause_keys = rule.clauses.iter().find_map(|c| {
                let mut keys = Vec::new();
                for m in &c.matches {
                    keys.extend(kind.required_keys(m)?);
                }
                Some(keys)
            });
            match clause_keys {
                Some(k) => keys.extend(k),
                None => continue 'kinds,
            }
        }
        keys.sort_unstable();
        keys.dedup();
        return Placement::Keys(kind, keys);
    }
    Placement::Always
}

impl IndexKind {
    /// The keys one of which a connection must have for `m` to match, if `m` restricts this
    /// kind of key to a finite set.
    fn required_keys(self, m: &CMatch) -> Option<Vec<u64>> {
        let exact = |v: &[StringMatch]| -> Option<Vec<u64>> {
            if v.is_empty() {
                return None;
            }
            v.iter()
                .map(|s| match s {
                    StringMatch::Exact(s) => Some(Fnv::of_parts(&[s])),
                    _ => None,
                })
                .collect()
        };
        match self {
            IndexKind::Principal => exact(&m.principals),
            IndexKind::Namespace => exact(&m.namespaces)
                .or_else(|| {
                    (!m.service_accounts.is_empty()).then(|| {
                        m.service_accounts
                            .iter()
                            .map(|sa| Fnv::of_parts(&[&sa.namespace]))
                            .collect()
                    })
                })
                .or_else(|| {
                    if m.principals.is_empty() {
                        return None;
                    }
                    m.principals
                        .iter()
                        .map(|p| principal_namespace(p).map(|ns| Fnv::of_parts(&[ns])))
                        .collect()
                }),
            IndexKind::Port => (!m.destination_ports.is_empty())
                .then(|| m.destination_ports.iter().map(|p| port_key(*p)).collect()),
        }
    }
}

/// The source namespace a principal match pins down, if it does. A principal is
/// `td/ns/NS/sa/SA` with no `/` inside the parts (identities are validated), so the slashes of
/// an exact value, a prefix or a suffix line up with the principal's: `td/ns/foo/sa/bar`,
/// `td/ns/foo/` (Istio's `td/ns/foo/*`) and `/ns/foo/sa/bar` (`*/ns/foo/sa/bar`) all require
/// namespace `foo`.
fn principal_namespace(m: &StringMatch) -> Option<&str> {
    match m {
        StringMatch::Exact(s) => match s.split('/').collect::<Vec<_>>()[..] {
            [_, "ns", ns, "sa", _] => Some(ns),
            _ => None,
        },
        StringMatch::Prefix(s) => match s.split('/').collect::<Vec<_>>()[..] {
            [_, "ns", ns, _, ..] => Some(ns),
            _ => None,
        },
        StringMatch::Suffix(s) => match s.rsplit('/').collect::<Vec<_>>()[..] {
            [_, "sa", ns, _, ..] => Some(ns),
            _ => None,
        },
        StringMatch::Presence {} => None,
    }
}

/// Ports get their own key space (a separate map), mixed so the high bits vary too.
fn port_key(port: u16) -> u64 {
    (u64::from(port) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// FNV-1a over a byte stream: hashing `["a", "/ns/", "b"]` equals hashing `"a/ns/b"`, so an
/// identity's key is computed from its parts without formatting it.
pub(super) struct Fnv;

impl Fnv {
    pub fn of_parts(parts: &[&str]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for part in parts {
            for b in part.as_bytes() {
                h ^= u64::from(*b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

/// The index maps' keys are already hashes; this hasher passes them through.
#[derive(Default, Clone, Copy)]
pub(super) struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

pub(super) type BuildKeyHasher = std::hash::BuildHasherDefault<KeyHasher>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_compare_like_the_joined_string() {
        let parts = ["cluster.local", "/ns/", "default", "/sa/", "sleep"];
        let joined = parts.concat();
        for probe in [
            "",
            "c",
            "cluster.local",
            "cluster.local/",
            "cluster.local/ns/default/sa/sleep",
            "cluster.local/ns/default/sa/sleepy",
            "xcluster.local/ns/default/sa/sleep",
            "sleep",
            "/sa/sleep",
            "default/sa/sleep",
            "ns/default",
            "local/ns/def",
        ] {
            assert_eq!(
                starts_with(&parts, probe),
                joined.starts_with(probe),
                "{probe:?}"
            );
            assert_eq!(
                ends_with(&parts, probe),
                joined.ends_with(probe),
                "{probe:?}"
            );
        }
        assert_eq!(Fnv::of_parts(&parts), Fnv::of_parts(&[&joined]));
    }

    #[test]
    fn principal_matches_that_pin_the_namespace() {
        for (m, want) in [
            (StringMatch::Exact("td/ns/foo/sa/bar".into()), Some("foo")),
            (StringMatch::Exact("td/ns/foo/sa".into()), None),
            (StringMatch::Exact("td/ns/foo/sa/bar/x".into()), None),
            (StringMatch::Prefix("td/ns/foo/".into()), Some("foo")),
            (StringMatch::Prefix("td/ns/foo/sa/b".into()), Some("foo")),
            (StringMatch::Prefix("td/ns/foo".into()), None),
            (StringMatch::Prefix("td/".into()), None),
            (StringMatch::Suffix("/ns/foo/sa/bar".into()), Some("foo")),
            (StringMatch::Suffix("oo/sa/bar".into()), None),
            (StringMatch::Suffix("td/ns/foo/sa/bar".into()), Some("foo")),
            (StringMatch::Presence {}, None),
        ] {
            assert_eq!(principal_namespace(&m), want, "{m:?}");
        }
    }
}
