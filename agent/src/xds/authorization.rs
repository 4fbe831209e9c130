//! `istio.security.Authorization` -> [`Policy`], validated: a CIDR or port the matcher cannot
//! represent, or an enum value this agent does not know, is refused (and NACKed) rather than
//! dropped, because dropping part of a policy changes what it allows.

use ambit_proto::istio::security::{self as pb, string_match::MatchType};

use super::{Error, types::ip_from_bytes, types::port};
use crate::policy::{
    Action, Cidr, Clause, Match, Policy, Rule, Scope, ServiceAccountMatch, StringMatch,
};

/// Converts and validates one decoded `Authorization` whose xDS resource name is `name`.
pub fn policy_from_proto(name: &str, a: pb::Authorization) -> Result<Policy, Error> {
    let bad = |why: String| Error::Resource {
        resource: format!("policy {name}"),
        why,
    };
    if a.name.is_empty() {
        return Err(bad("name is empty".to_owned()));
    }
    if a.namespace.is_empty() {
        return Err(bad("namespace is empty".to_owned()));
    }
    let scope = match pb::Scope::try_from(a.scope) {
        Ok(pb::Scope::Global) => Scope::Global,
        Ok(pb::Scope::Namespace) => Scope::Namespace,
        Ok(pb::Scope::WorkloadSelector) => Scope::WorkloadSelector,
        Err(_) => return Err(bad(format!("scope {} is not known", a.scope))),
    };
    let action = match pb::Action::try_from(a.action) {
        Ok(pb::Action::Allow) => Action::Allow,
        Ok(pb::Action::Deny) => Action::Deny,
        Err(_) => {
            return Err(bad(format!(
                "action {} is not ALLOW or DENY (an unknown action is refused, not ignored)",
                a.action
            )));
        }
    };
    let rules = a
        .rules
        .into_iter()
        .enumerate()
        .map(|(r, rule)| {
            let clauses = rule
                .clauses
                .into_iter()
                .enumerate()
                .map(|(c, clause)| {
                    let matches = clause
                        .matches
                        .into_iter()
                        .enumerate()
                        .map(|(m, x)| {
                            convert_match(x).map_err(|why| {
                                bad(format!("rules[{r}].clauses[{c}].matches[{m}].{why}"))
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok(Clause { matches })
                })
                .collect::<Result<Vec<_>, Error>>()?;
            Ok(Rule { clauses })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    Ok(Policy {
        name: a.name,
        namespace: a.namespace,
        scope,
        action,
        dry_run: a.dry_run,
        rules,
    })
}

/// Errors start with the field name, to follow `matches[i].`.
fn convert_match(m: pb::Match) -> Result<Match, String> {
    Ok(Match {
        namespaces: strings("namespaces", m.namespaces)?,
        not_namespaces: strings("not_namespaces", m.not_namespaces)?,
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        principals: strings("principals", m.principals)?,
        not_principals: strings("not_principals", m.not_principals)?,
        source_ips: cidrs("source_ips", m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", m.not_destination_ips)?,
        destination_ports: ports("destination_ports", &m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", &m.not_destination_ports)?,
    })
}

fn strings(field: &str, list: Vec<pb::StringMatch>) -> Result<Vec<StringMatch>, String> {
    list.into_iter()
        .enumerate()
        .map(|(i, s)| match s.match_type {
            Some(MatchType::Exact(v)) => Ok(StringMatch::Exact(v)),
            Some(MatchType::Prefix(v)) => Ok(StringMatch::Prefix(v)),
            Some(MatchType::Suffix(v)) => Ok(StringMatch::Suffix(v)),
            Some(MatchType::Presence(())) => Ok(StringMatch::Presence {}),
            None => Err(format!(
                "{field}[{i}] has no match type (exact, prefix, suffix or presence)"
            )),
        })
        .collect()
}

fn accounts(list: Vec<pb::ServiceAccountMatch>) -> Vec<ServiceAccountMatch> {
    list.into_iter()
        .map(|s| ServiceAccountMatch {
            namespace: s.namespace,
            service_account: s.service_account,
        })
        .collect()
}

fn cidrs(field: &str, list: Vec<pb::Address>) -> Result<Vec<Cidr>, String> {
    list.into_iter()
        .enumerate()
        .map(|(i, a)| {
            let ip =
                ip_from_bytes(&a.address).map_err(|why| format!("{field}[{i}].address {why}"))?;
            let len = u8::try_from(a.length)
                .ok()
                .and_then(|len| Cidr::new(ip, len).ok())
                .ok_or_else(|| {
                    format!(
                        "{field}[{i}]: {ip}/{} has a prefix length above {}",
                        a.length,
                        if ip.is_ipv4() { 32 } else { 128 }
                    )
                })?;
            Ok(len)
        })
        .collect()
}

fn ports(field: &str, list: &[u32]) -> Result<Vec<u16>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| port(*p).map_err(|why| format!("{field}[{i}] {why}")))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    pub(crate) fn authorization() -> pb::Authorization {
        let exact = |s: &str| pb::StringMatch {
            match_type: Some(MatchType::Exact(s.into())),
        };
        pb::Authorization {
            name: "deny-sleep".into(),
            namespace: "default".into(),
            scope: pb::Scope::Namespace.into(),
            action: pb::Action::Deny.into(),
            rules: vec![pb::Rule {
                clauses: vec![pb::Clause {
                    matches: vec![pb::Match {
                        principals: vec![exact("cluster.local/ns/default/sa/sleep")],
                        not_namespaces: vec![pb::StringMatch {
                            match_type: Some(MatchType::Presence(())),
                        }],
                        service_accounts: vec![pb::ServiceAccountMatch {
                            namespace: "default".into(),
                            service_account: "sleep".into(),
                        }],
                        source_ips: vec![pb::Address {
                            address: vec![10, 0, 0, 0],
                            length: 8,
                        }],
                        not_destination_ips: vec![pb::Address {
                            address: vec![0xfd; 16],
                            length: 128,
                        }],
                        destination_ports: vec![8080],
                        not_destination_ports: vec![15021],
                        ..Default::default()
                    }],
                }],
            }],
            dry_run: true,
        }
    }

    #[test]
    fn converts_every_field() {
        let p = policy_from_proto("default/deny-sleep", authorization()).expect("valid");
        assert_eq!(p.key(), "default/deny-sleep");
        assert_eq!(
            (p.scope, p.action, p.dry_run),
            (Scope::Namespace, Action::Deny, true)
        );
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![StringMatch::Exact(
                "cluster.local/ns/default/sa/sleep".into()
            )]
        );
        assert_eq!(m.not_namespaces, vec![StringMatch::Presence {}]);
        assert_eq!(m.service_accounts[0].service_account, "sleep");
        assert_eq!(
            m.source_ips,
            vec![Cidr::new(IpAddr::from([10, 0, 0, 0]), 8).expect("cidr")]
        );
        assert_eq!(m.not_destination_ips[0].prefix_len(), 128);
        assert_eq!(m.destination_ports, vec![8080]);
        assert_eq!(m.not_destination_ports, vec![15021]);
    }

    #[test]
    fn refuses_what_it_cannot_represent() {
        let mut cases: Vec<(pb::Authorization, &str)> = Vec::new();
        let mut a = authorization();
        a.rules[0].clauses[0].matches[0].source_ips[0].length = 33;
        cases.push((
            a,
            "rules[0].clauses[0].matches[0].source_ips[0]: 10.0.0.0/33 has a prefix length above 32",
        ));
        let mut a = authorization();
        a.rules[0].clauses[0].matches[0].source_ips[0].address = vec![1, 2, 3];
        cases.push((a, "source_ips[0].address is 3 bytes"));
        let mut a = authorization();
        a.rules[0].clauses[0].matches[0].destination_ports[0] = 65536;
        cases.push((a, "destination_ports[0] 65536 is not a port"));
        let mut a = authorization();
        a.action = 2;
        cases.push((a, "action 2 is not ALLOW or DENY"));
        let mut a = authorization();
        a.scope = 9;
        cases.push((a, "scope 9"));
        let mut a = authorization();
        a.rules[0].clauses[0].matches[0].principals[0].match_type = None;
        cases.push((a, "principals[0] has no match type"));
        let mut a = authorization();
        a.namespace.clear();
        cases.push((a, "namespace is empty"));
        for (a, want) in cases {
            let e = policy_from_proto("default/deny-sleep", a)
                .expect_err(want)
                .to_string();
            assert!(e.starts_with("policy default/deny-sleep: "), "{e}");
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }
}
