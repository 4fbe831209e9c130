//! The policy store: every policy by key, and the enforceable ones filed by where they apply
//! (global, or a namespace), by action (deny, allow, dry-run deny, dry-run allow) and by index
//! placement, so a decision evaluates only the policies that could match. Workload-selector
//! policies are only found by key, when a workload names them.
//!
//! Written by the one state updater; read by the data path. Entries are `Arc`s, so a clone
//! copies the maps but not the policies: an updater can clone the current snapshot, apply a
//! whole push, and publish it (`ArcSwap<PolicyStore>`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use super::{
    compile::{BuildKeyHasher, Compiled, IndexKind, Placement, Probe},
    types::{Action, Policy, Scope},
};

/// One stored policy and its compiled form.
#[derive(Debug)]
pub(super) struct Entry {
    pub key: Arc<str>,
    pub policy: Policy,
    pub compiled: Compiled,
}

/// All known authorization policies; see the module docs.
#[derive(Clone, Debug, Default)]
pub struct PolicyStore {
    by_key: HashMap<Arc<str>, Arc<Entry>>,
    global: Group,
    by_namespace: HashMap<String, Group>,
}

/// Which enforcement set a policy belongs to. `Audit` policies belong to none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    Deny,
    Allow,
    DryRunDeny,
    DryRunAllow,
}

impl Kind {
    pub fn of(p: &Policy) -> Option<Kind> {
        match (p.action, p.dry_run) {
            (Action::Deny, false) => Some(Kind::Deny),
            (Action::Allow, false) => Some(Kind::Allow),
            (Action::Deny, true) => Some(Kind::DryRunDeny),
            (Action::Allow, true) => Some(Kind::DryRunAllow),
            (Action::Audit, _) => None,
        }
    }
}

/// The policies that apply to every workload of one namespace (or of the mesh, for `global`).
#[derive(Clone, Debug, Default)]
pub(super) struct Group {
    deny: Set,
    allow: Set,
    dry_run_deny: Set,
    dry_run_allow: Set,
}

impl Group {
    pub fn set(&self, kind: Kind) -> &Set {
        match kind {
            Kind::Deny => &self.deny,
            Kind::Allow => &self.allow,
            Kind::DryRunDeny => &self.dry_run_deny,
            Kind::DryRunAllow => &self.dry_run_allow,
        }
    }

    fn set_mut(&mut self, kind: Kind) -> &mut Set {
        match kind {
            Kind::Deny => &mut self.deny,
            Kind::Allow => &mut self.allow,
            Kind::DryRunDeny => &mut self.dry_run_deny,
            Kind::DryRunAllow => &mut self.dry_run_allow,
        }
    }

    fn is_empty(&self) -> bool {
        self.deny.count == 0
            && self.allow.count == 0
            && self.dry_run_deny.count == 0
            && self.dry_run_allow.count == 0
    }
}

/// Policies ordered by key inside a bucket, so evaluation order (and so the policy a decision
/// names when several match) does not depend on insertion order.
type Bucket = BTreeMap<Arc<str>, Arc<Entry>>;

/// One action's policies in one group, indexed by placement.
#[derive(Clone, Debug, Default)]
pub(super) struct Set {
    /// Policies in the set, including those that can never match.
    pub count: usize,
    principal: HashMap<u64, Bucket, BuildKeyHasher>,
    namespace: HashMap<u64, Bucket, BuildKeyHasher>,
    port: HashMap<u64, Bucket, BuildKeyHasher>,
    always: Bucket,
}

impl Set {
    /// The policies that could match `p`: those filed under its principal, its namespace, its
    /// port, then those evaluated always. Each policy is filed under one kind of key only, so
    /// none comes twice.
    #[inline]
    pub fn candidates<'s>(&'s self, p: &Probe<'_>) -> impl Iterator<Item = &'s Entry> + 's {
        let principal = match p.principal_key {
            Some(k) if !self.principal.is_empty() => self.principal.get(&k),
            _ => None,
        };
        let lookup = |m: &'s HashMap<u64, Bucket, BuildKeyHasher>, k: u64| {
            if m.is_empty() { None } else { m.get(&k) }
        };
        principal
            .into_iter()
            .chain(lookup(&self.namespace, p.namespace_key))
            .chain(lookup(&self.port, p.port_key))
            .chain(std::iter::once(&self.always))
            .flat_map(|b| b.values())
            .map(|e| &**e)
    }

    #[cfg(test)]
    fn buckets(&mut self, entry: &Entry) -> Vec<&mut Bucket> {
        match &entry.compiled.placement {
            Placement::Never => Vec::new(),
            Placement::Always => vec![&mut self.always],
            Placement::Keys(kind, keys) => {
                let map = match kind {
                    IndexKind::Principal => &mut self.principal,
                    IndexKind::Namespace => &mut self.namespace,
                    IndexKind::Port => &mut self.port,
                };
                map.iter_mut()
                    .filter(|(k, _)| keys.binary_search(k).is_ok())
                    .map(|(_, b)| b)
                    .collect()
            }
        }
    }

    fn add(&mut self, entry: &Arc<Entry>) {
        self.count += 1;
        match &entry.compiled.placement {
            Placement::Never => {}
            Placement::Always => {
                self.always.insert(entry.key.clone(), entry.clone());
            }
            Placement::Keys(kind, keys) => {
                let map = match kind {
                    IndexKind::Principal => &mut self.principal,
                    IndexKind::Namespace => &mut self.namespace,
                    IndexKind::Port => &mut self.port,
                };
                for k in keys {
                    map.entry(*k)
                        .or_default()
                        .insert(entry.key.clone(), entry.clone());
                }
            }
        }
    }

    fn remove(&mut self, entry: &Entry) {
        self.count = self.count.saturating_sub(1);
        match &entry.compiled.placement {
            Placement::Never => {}
            Placement::Always => {
                self.always.remove(&entry.key);
            }
            Placement::Keys(kind, keys) => {
                let map = match kind {
                    IndexKind::Principal => &mut self.principal,
                    IndexKind::Namespace => &mut self.namespace,
                    IndexKind::Port => &mut self.port,
                };
                for k in keys {
                    if let Some(b) = map.get_mut(k) {
                        b.remove(&entry.key);
                        if b.is_empty() {
                            map.remove(k);
                        }
                    }
                }
            }
        }
    }
}

impl PolicyStore {
    pub fn new() -> PolicyStore {
        PolicyStore::default()
    }

    /// Adds `policy`, replacing the one with the same `namespace/name`.
    pub fn insert(&mut self, policy: Policy) {
        let key: Arc<str> = policy.key().into();
        self.remove(&key);
        let compiled = Compiled::new(&policy);
        let entry = Arc::new(Entry {
            key: key.clone(),
            policy,
            compiled,
        });
        if let Some(kind) = Kind::of(&entry.policy) {
            let group = match entry.policy.scope {
                Scope::Global => Some(&mut self.global),
                Scope::Namespace => Some(
                    self.by_namespace
                        .entry(entry.policy.namespace.clone())
                        .or_default(),
                ),
                Scope::WorkloadSelector => None,
            };
            if let Some(g) = group {
                g.set_mut(kind).add(&entry);
            }
        }
        self.by_key.insert(key, entry);
    }

    /// Removes the policy with key `namespace/name`.
    pub fn remove(&mut self, key: &str) -> Option<Policy> {
        let entry = self.by_key.remove(key)?;
        if let Some(kind) = Kind::of(&entry.policy) {
            match entry.policy.scope {
                Scope::Global => self.global.set_mut(kind).remove(&entry),
                Scope::Namespace => {
                    if let Some(g) = self.by_namespace.get_mut(&entry.policy.namespace) {
                        g.set_mut(kind).remove(&entry);
                        if g.is_empty() {
                            self.by_namespace.remove(&entry.policy.namespace);
                        }
                    }
                }
                Scope::WorkloadSelector => {}
            }
        }
        // Other clones of the store may still share the entry.
        Some(match Arc::try_unwrap(entry) {
            Ok(e) => e.policy,
            Err(shared) => shared.policy.clone(),
        })
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }

    /// The policy with key `namespace/name`.
    pub fn get(&self, key: &str) -> Option<&Policy> {
        self.by_key.get(key).map(|e| &e.policy)
    }

    /// All policies, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Policy> {
        self.by_key.values().map(|e| &e.policy)
    }

    pub(super) fn entry(&self, key: &str) -> Option<&Entry> {
        self.by_key.get(key).map(|e| &**e)
    }

    pub(super) fn global(&self) -> &Group {
        &self.global
    }

    pub(super) fn namespace(&self, ns: &str) -> Option<&Group> {
        self.by_namespace.get(ns)
    }

    #[cfg(test)]
    fn placement_of(&self, key: &str) -> Option<&Placement> {
        self.by_key.get(key).map(|e| &e.compiled.placement)
    }

    #[cfg(test)]
    fn buckets_of(&mut self, key: &str) -> usize {
        let Some(e) = self.by_key.get(key).cloned() else {
            return 0;
        };
        let Some(kind) = Kind::of(&e.policy) else {
            return 0;
        };
        let g = match e.policy.scope {
            Scope::Global => &mut self.global,
            Scope::Namespace => match self.by_namespace.get_mut(&e.policy.namespace) {
                Some(g) => g,
                None => return 0,
            },
            Scope::WorkloadSelector => return 0,
        };
        g.set_mut(kind).buckets(&e).len()
    }
}

impl FromIterator<Policy> for PolicyStore {
    fn from_iter<I: IntoIterator<Item = Policy>>(iter: I) -> PolicyStore {
        let mut s = PolicyStore::new();
        s.extend(iter);
        s
    }
}

impl Extend<Policy> for PolicyStore {
    fn extend<I: IntoIterator<Item = Policy>>(&mut self, iter: I) {
        for p in iter {
            self.insert(p);
        }
    }
}

impl From<Vec<Policy>> for PolicyStore {
    fn from(v: Vec<Policy>) -> PolicyStore {
        v.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::types::{Clause, Match, Rule, StringMatch};

    fn policy(name: &str, scope: Scope, m: Option<Match>) -> Policy {
        Policy {
            name: name.into(),
            namespace: "default".into(),
            scope,
            action: Action::Allow,
            dry_run: false,
            rules: m
                .map(|m| {
                    vec![Rule {
                        clauses: vec![Clause { matches: vec![m] }],
                    }]
                })
                .unwrap_or_default(),
        }
    }

    #[test]
    fn files_policies_by_index_and_cleans_up() {
        let mut s = PolicyStore::new();
        let by_principal = Match {
            principals: vec![
                StringMatch::Exact("td/ns/a/sa/b".into()),
                StringMatch::Exact("td/ns/c/sa/d".into()),
            ],
            destination_ports: vec![80],
            ..Default::default()
        };
        let by_port = Match {
            principals: vec![StringMatch::Prefix("td/".into())],
            destination_ports: vec![80, 81, 82],
            ..Default::default()
        };
        let by_ns = Match {
            service_accounts: vec![crate::policy::ServiceAccountMatch {
                namespace: "x".into(),
                service_account: "y".into(),
            }],
            ..Default::default()
        };
        let always = Match {
            principals: vec![StringMatch::Suffix("/sa/b".into())],
            ..Default::default()
        };
        s.insert(policy("p", Scope::Namespace, Some(by_principal)));
        s.insert(policy("o", Scope::Namespace, Some(by_port)));
        s.insert(policy("n", Scope::Namespace, Some(by_ns)));
        let wildcard = Match {
            principals: vec![
                StringMatch::Prefix("td/ns/x/".into()),
                StringMatch::Suffix("/ns/z/sa/y".into()),
            ],
            ..Default::default()
        };
        s.insert(policy("a", Scope::Global, Some(always)));
        s.insert(policy("wild", Scope::Global, Some(wildcard)));
        s.insert(policy("never", Scope::Namespace, None));
        s.insert(policy("w", Scope::WorkloadSelector, Some(Match::default())));
        assert_eq!(s.len(), 7);
        assert!(matches!(
            s.placement_of("default/p"),
            Some(Placement::Keys(IndexKind::Principal, k)) if k.len() == 2
        ));
        assert!(matches!(
            s.placement_of("default/o"),
            Some(Placement::Keys(IndexKind::Port, k)) if k.len() == 3
        ));
        assert!(matches!(
            s.placement_of("default/n"),
            Some(Placement::Keys(IndexKind::Namespace, k)) if k.len() == 1
        ));
        assert!(matches!(
            s.placement_of("default/wild"),
            Some(Placement::Keys(IndexKind::Namespace, k)) if k.len() == 2
        ));
        assert_eq!(s.placement_of("default/a"), Some(&Placement::Always));
        assert_eq!(s.placement_of("default/never"), Some(&Placement::Never));
        assert_eq!(s.buckets_of("default/p"), 2);
        assert_eq!(s.buckets_of("default/o"), 3);
        assert_eq!(
            s.namespace("default").map(|g| g.set(Kind::Allow).count),
            Some(4)
        );

        // A clone shares entries; removing from one leaves the other intact.
        let snapshot = s.clone();
        for k in ["default/p", "default/o", "default/n", "default/never"] {
            assert!(s.remove(k).is_some(), "{k}");
        }
        assert!(s.remove("default/p").is_none());
        assert!(s.namespace("default").is_none(), "empty group dropped");
        assert_eq!(s.len(), 3);
        assert_eq!(snapshot.len(), 7);
        assert_eq!(
            snapshot.get("default/p").map(|p| p.name.as_str()),
            Some("p")
        );

        // Replacing a policy re-files it.
        s.insert(policy("a", Scope::Namespace, None));
        assert_eq!(s.global().set(Kind::Allow).count, 1, "only \"wild\" left");
        assert_eq!(
            s.namespace("default").map(|g| g.set(Kind::Allow).count),
            Some(1)
        );
        assert_eq!(s.len(), 3);
    }
}
