//! L7 authorization at the waypoint, in Istio's terms: DENY policies first (any match denies),
//! then, if any ALLOW policy applies to the request's destination, one of them must match.
//! Every decision names the policy and rule that made it, for the 403 body and the access log.

use std::net::IpAddr;

use http::HeaderMap;

use super::config::{Condition, L7Policy, L7Rule, Operation, Source};
use crate::{
    identity::Identity,
    policy::{Action, Decision, DecisionReason, StringMatch, principal_matches},
};

/// What a request is judged on.
pub struct RequestAttrs<'a> {
    /// The client's verified identity (mTLS).
    pub principal: &'a Identity,
    pub source_ip: IpAddr,
    pub method: &'a str,
    /// Path without the query.
    pub path: &'a str,
    /// Host without the port, lowercase.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
    pub destination_port: u16,
    /// `namespace/hostname` of the destination service, if the client dialed one.
    pub service: Option<&'a str>,
}

pub use crate::config::waypoint::ConditionKey;

/// Judges `req` by the `policies` that apply to its destination, with the decision type of L4
/// policy (its `describe()` names the policy and rule, for the 403 body and the access log).
pub fn evaluate(policies: &[L7Policy], req: &RequestAttrs<'_>) -> Decision {
    let decided = |allowed, policy: Option<String>, rule, reason| Decision {
        allowed,
        policy,
        rule,
        reason,
        dry_run: Vec::new(),
    };
    let applies = |p: &&L7Policy| {
        p.target_refs.is_empty()
            || p.target_refs.iter().any(|t| {
                t.kind.as_deref() == Some("Gateway") || Some(t.service_key()) == req.service
            })
    };
    let principal = principal_of(req.principal);
    for p in policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Deny)
    {
        if let Some(i) = p
            .rules
            .iter()
            .position(|r| rule_matches(r, req, &principal))
        {
            return decided(
                false,
                Some(p.key()),
                Some(i),
                DecisionReason::DeniedByPolicy,
            );
        }
    }
    let mut any_allow = false;
    for p in policies
        .iter()
        .filter(applies)
        .filter(|p| p.action == Action::Allow)
    {
        any_allow = true;
        if let Some(i) = p
            .rules
            .iter()
            .position(|r| rule_matches(r, req, &principal))
        {
            return decided(
                true,
                Some(p.key()),
                Some(i),
                DecisionReason::AllowedByPolicy,
            );
        }
    }
    if any_allow {
        decided(false, None, None, DecisionReason::NoAllowPolicyMatched)
    } else {
        decided(true, None, None, DecisionReason::NoAllowPolicy)
    }
}

/// Istio writes principals without the `spiffe://` scheme.
fn principal_of(id: &Identity) -> String {
    let s = id.to_string();
    s.strip_prefix("spiffe://").map(str::to_owned).unwrap_or(s)
}

fn rule_matches(rule: &L7Rule, req: &RequestAttrs<'_>, principal: &str) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|f| source_matches(&f.source, req)))
        && (rule.to.is_empty() || rule.to.iter().any(|t| operation_matches(&t.operation, req)))
        && rule
            .when
            .iter()
            .all(|c| condition_matches(c, req, principal))
}

/// Istio's string match (`StringMatch::from_pattern`, shared with L4 policy), except that `*`
/// matches any value, empty included: Istio makes it a presence match for headers, hosts and
/// the rest, so `values: ["*"]` on a DENY catches `x-debug:` with an empty value too.
/// (Principals are never empty; they go through `principal_matches`.)
fn string_matches(pattern: &str, value: &str) -> bool {
    pattern == "*" || StringMatch::pattern_matches(pattern, value)
}

/// `values` must contain a match (if given) and `not_values` none.
fn field_matches(values: &[String], not_values: &[String], value: &str) -> bool {
    (values.is_empty() || values.iter().any(|p| string_matches(p, value)))
        && !not_values.iter().any(|p| string_matches(p, value))
}

fn principal_pattern(p: &str) -> &str {
    p.strip_prefix("spiffe://").unwrap_or(p)
}

fn source_matches(s: &Source, req: &RequestAttrs<'_>) -> bool {
    // Principals as L4 policy compares them: part by part against the verified identity.
    let principal = |p: &String| {
        principal_matches(
            &StringMatch::from_pattern(principal_pattern(p)),
            req.principal,
        )
    };
    (s.principals.is_empty() || s.principals.iter().any(principal))
        && !s.not_principals.iter().any(principal)
        && field_matches(&s.namespaces, &s.not_namespaces, req.principal.namespace())
}

fn operation_matches(op: &Operation, req: &RequestAttrs<'_>) -> bool {
    let port = req.destination_port.to_string();
    field_matches(&op.hosts, &op.not_hosts, req.host)
        && field_matches(&op.methods, &op.not_methods, req.method)
        && field_matches(&op.paths, &op.not_paths, req.path)
        && field_matches(&op.ports, &op.not_ports, &port)
}

/// `source.ip` values are addresses or CIDR blocks (checked when the config is loaded).
fn ip_matches(patterns: &[String], ip: IpAddr) -> bool {
    patterns.iter().any(|p| {
        p.parse::<crate::policy::Cidr>()
            .is_ok_and(|c| c.contains(ip))
    })
}

fn condition_matches(c: &Condition, req: &RequestAttrs<'_>, principal: &str) -> bool {
    if matches!(ConditionKey::parse(&c.key), Some(ConditionKey::SourceIp)) {
        return (c.values.is_empty() || ip_matches(&c.values, req.source_ip))
            && !ip_matches(&c.not_values, req.source_ip);
    }
    let values: Vec<String> = match ConditionKey::parse(&c.key) {
        Some(ConditionKey::Header(name)) => req
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned)
            .collect(),
        Some(ConditionKey::SourcePrincipal) => vec![principal.to_owned()],
        Some(ConditionKey::SourceNamespace) => vec![req.principal.namespace().to_owned()],
        Some(ConditionKey::SourceIp) => return false,
        Some(ConditionKey::DestinationPort) => vec![req.destination_port.to_string()],
        // Refused when the config is loaded; never matches if it got here.
        None => return false,
    };
    let principal_key = matches!(
        ConditionKey::parse(&c.key),
        Some(ConditionKey::SourcePrincipal)
    );
    let pat = |p: &String| -> String {
        if principal_key {
            principal_pattern(p).to_owned()
        } else {
            p.clone()
        }
    };
    (c.values.is_empty()
        || values
            .iter()
            .any(|v| c.values.iter().any(|p| string_matches(&pat(p), v))))
        && !values
            .iter()
            .any(|v| c.not_values.iter().any(|p| string_matches(&pat(p), v)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> L7Policy {
        let mut p: L7Policy = serde_norway::from_str(yaml).expect("policy yaml");
        p.namespace.get_or_insert_with(|| "default".to_owned());
        p
    }

    fn attrs<'a>(
        id: &'a Identity,
        method: &'a str,
        path: &'a str,
        headers: &'a HeaderMap,
    ) -> RequestAttrs<'a> {
        RequestAttrs {
            principal: id,
            source_ip: "10.0.0.1".parse().expect("ip"),
            method,
            path,
            host: "echo.default.svc.cluster.local",
            headers,
            destination_port: 8080,
            service: Some("default/echo.default.svc.cluster.local"),
        }
    }

    #[test]
    fn deny_wins_then_allow_must_match() {
        let deny = policy(
            "name: no-admin\naction: DENY\nrules:\n- to:\n  - operation: {paths: [\"/admin*\"]}\n- to:\n  - operation: {methods: [DELETE]}\n",
        );
        let allow = policy(
            "name: only-client\nrules:\n- from:\n  - source: {principals: [\"cluster.local/ns/default/sa/client\"]}\n",
        );
        let client = Identity::new("cluster.local", "default", "client").expect("id");
        let other = Identity::new("cluster.local", "other", "x").expect("id");
        let h = HeaderMap::new();
        let ps = [deny, allow];
        let v = evaluate(&ps, &attrs(&client, "GET", "/admin/users", &h));
        assert_eq!(
            (v.allowed, v.policy.as_deref(), v.rule),
            (false, Some("default/no-admin"), Some(0))
        );
        assert_eq!(v.describe(), "denied by policy default/no-admin (rule 0)");
        let v = evaluate(&ps, &attrs(&client, "DELETE", "/items/1", &h));
        assert_eq!((v.allowed, v.rule), (false, Some(1)));
        let v = evaluate(&ps, &attrs(&client, "GET", "/items/1", &h));
        assert_eq!(
            (v.allowed, v.policy.as_deref()),
            (true, Some("default/only-client"))
        );
        let v = evaluate(&ps, &attrs(&other, "GET", "/items/1", &h));
        assert_eq!((v.allowed, v.policy.as_deref()), (false, None));
        assert_eq!(v.describe(), "denied: no allow policy matched");
        // No policy at all: allowed.
        assert!(evaluate(&[], &attrs(&other, "GET", "/", &h)).allowed);
    }

    #[test]
    fn principals_match_as_l4_policy_matches_them() {
        let id = Identity::new("cluster.local", "shop", "cart").expect("id");
        let other = Identity::new("cluster.local", "shopping", "x").expect("id");
        let h = HeaderMap::new();
        let only = |principals: &str| {
            [policy(&format!(
                "name: p\nrules:\n- from:\n  - source: {{principals: {principals}}}\n"
            ))]
        };
        // The scheme is optional in a pattern; prefixes stop where the pattern says.
        let ps = only(r#"["spiffe://cluster.local/ns/shop/sa/cart"]"#);
        assert!(evaluate(&ps, &attrs(&id, "GET", "/", &h)).allowed);
        let ps = only(r#"["cluster.local/ns/shop/*"]"#);
        assert!(evaluate(&ps, &attrs(&id, "GET", "/", &h)).allowed);
        assert!(!evaluate(&ps, &attrs(&other, "GET", "/", &h)).allowed);
        // `*`: any authenticated principal.
        let ps = only(r#"["*"]"#);
        assert!(evaluate(&ps, &attrs(&other, "GET", "/", &h)).allowed);
    }

    #[test]
    fn a_wildcard_deny_catches_an_empty_header_value() {
        let deny = [policy(
            "name: no-debug\naction: DENY\nrules:\n- when:\n  - key: request.headers[x-debug]\n    values: [\"*\"]\n",
        )];
        let id = Identity::new("cluster.local", "default", "client").expect("id");
        let mut empty = HeaderMap::new();
        empty.insert("x-debug", "".parse().expect("value"));
        assert!(!evaluate(&deny, &attrs(&id, "GET", "/", &empty)).allowed);
        assert!(evaluate(&deny, &attrs(&id, "GET", "/", &HeaderMap::new())).allowed);
    }

    #[test]
    fn matches_suffixes_namespaces_and_headers() {
        let p = policy(
            "name: p\nrules:\n- from:\n  - source: {namespaces: [default], notPrincipals: [\"*/sa/blocked\"]}\n  to:\n  - operation: {paths: [\"*.html\"], notMethods: [POST]}\n  when:\n  - key: request.headers[x-team]\n    values: [\"blue\"]\n",
        );
        let client = Identity::new("cluster.local", "default", "client").expect("id");
        let blocked = Identity::new("cluster.local", "default", "blocked").expect("id");
        let mut blue = HeaderMap::new();
        blue.insert("x-team", "blue".parse().expect("value"));
        let none = HeaderMap::new();
        let ps = [p];
        assert!(evaluate(&ps, &attrs(&client, "GET", "/index.html", &blue)).allowed);
        assert!(!evaluate(&ps, &attrs(&client, "GET", "/index.html", &none)).allowed);
        assert!(!evaluate(&ps, &attrs(&client, "POST", "/index.html", &blue)).allowed);
        assert!(!evaluate(&ps, &attrs(&client, "GET", "/index.json", &blue)).allowed);
        assert!(!evaluate(&ps, &attrs(&blocked, "GET", "/index.html", &blue)).allowed);
    }

    #[test]
    fn source_ip_conditions_take_cidrs() {
        let p = policy(
            "name: p\naction: DENY\nrules:\n- when:\n  - key: source.ip\n    values: [\"10.0.0.0/16\", \"fd00::1\"]\n",
        );
        let id = Identity::new("cluster.local", "default", "client").expect("id");
        let h = HeaderMap::new();
        let mut a = attrs(&id, "GET", "/", &h);
        let ps = [p];
        assert!(!evaluate(&ps, &a).allowed, "10.0.0.1 is in 10.0.0.0/16");
        a.source_ip = "10.1.0.1".parse().expect("ip");
        assert!(evaluate(&ps, &a).allowed);
        a.source_ip = "fd00:0::1".parse().expect("ip");
        assert!(
            !evaluate(&ps, &a).allowed,
            "the same IPv6 address written another way"
        );
    }

    #[test]
    fn parses_condition_keys() {
        assert_eq!(
            ConditionKey::parse("request.headers[x-user]"),
            Some(ConditionKey::Header("x-user"))
        );
        assert_eq!(ConditionKey::parse("request.headers[]"), None);
        assert_eq!(ConditionKey::parse("request.auth.claims[iss]"), None);
    }
}
