//! The authorization policy as plain data: what the xDS handler converts
//! `istio.security.Authorization` into and what the local YAML config parses. Field names follow
//! the xDS type in camelCase (`rules` -> `clauses` -> `matches`, `notPrincipals`, `dryRun`), enum
//! values its proto names (`ALLOW`, `WORKLOAD_SELECTOR`). Nothing here evaluates; see
//! [`super::compile`] for the matchers built from these types.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use serde::{Deserialize, Serialize};

use super::Error;

/// One authorization policy (Istio's `AuthorizationPolicy` as the control plane sends it to node
/// proxies). Its key in the store is `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    pub namespace: String,
    /// Which workloads it applies to.
    pub scope: Scope,
    /// `ALLOW` if not given (as in Istio).
    #[serde(default)]
    pub action: Action,
    /// Evaluated and reported, never enforced.
    #[serde(default)]
    pub dry_run: bool,
    /// The policy matches if any rule matches. No rules: it matches nothing (an `ALLOW` policy
    /// with no rules therefore denies everything it applies to).
    #[serde(default)]
    pub rules: Vec<Rule>,
}

impl Policy {
    /// `namespace/name`, the store key and the name used in decisions and logs.
    pub fn key(&self) -> String {
        let mut k = String::with_capacity(self.namespace.len() + 1 + self.name.len());
        k.push_str(&self.namespace);
        k.push('/');
        k.push_str(&self.name);
        k
    }
}

/// Where a policy applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Scope {
    /// Every workload in the mesh (policies in the root namespace).
    #[serde(alias = "Global")]
    Global,
    /// Every workload in the policy's namespace.
    #[serde(alias = "Namespace")]
    Namespace,
    /// Only workloads that name the policy (`namespace/name`) in their policy list.
    #[serde(alias = "WorkloadSelector")]
    WorkloadSelector,
}

/// What a matching policy does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Action {
    #[default]
    #[serde(alias = "Allow")]
    Allow,
    #[serde(alias = "Deny")]
    Deny,
    /// Istio's `AUDIT`: accepted so a config carrying it parses, but it never takes part in a
    /// decision (it only affects logging in Istio's proxies). Other actions (`CUSTOM`) are refused
    /// when parsing, rather than ignored: ignoring an external-authorization policy would allow
    /// what it was meant to check.
    #[serde(alias = "Audit")]
    Audit,
}

/// A rule matches if all of its clauses match. No clauses: it matches every connection (Istio's
/// `rules: [{}]`, "allow all").
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub clauses: Vec<Clause>,
}

/// A clause matches if any of its matches does. No matches: it matches every connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Clause {
    #[serde(default)]
    pub matches: Vec<Match>,
}

/// A match matches if every non-empty field matches: a positive field if any of its entries
/// matches, a `not_` field if none does. A match with every field empty never matches (as in
/// ztunnel: it is skipped).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Match {
    /// Source namespace (from the source identity; `""` for a plaintext source).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_namespaces: Vec<StringMatch>,
    /// Source namespace and service account, exactly; never matches a plaintext source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub service_accounts: Vec<ServiceAccountMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source identity without `spiffe://` (`cluster.local/ns/default/sa/sleep`); never matches
    /// a plaintext source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<StringMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_source_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ips: Vec<Cidr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_destination_ports: Vec<u16>,
}

impl Match {
    /// Every field empty: such a match never matches.
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.not_namespaces.is_empty()
            && self.service_accounts.is_empty()
            && self.not_service_accounts.is_empty()
            && self.principals.is_empty()
            && self.not_principals.is_empty()
            && self.source_ips.is_empty()
            && self.not_source_ips.is_empty()
            && self.destination_ips.is_empty()
            && self.not_destination_ips.is_empty()
            && self.destination_ports.is_empty()
            && self.not_destination_ports.is_empty()
    }
}

/// `{exact: "a"}`, `{prefix: "a"}`, `{suffix: "a"}` or `{presence: {}}` (any non-empty value).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "RawStringMatch", into = "RawStringMatch")]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence {},
}

/// The wire form of [`StringMatch`]: a map with one key, like the xDS `oneof`. (A Rust enum
/// would be a YAML tag, `!exact a`, in serde's YAML mapping.)
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RawStringMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exact: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    suffix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    presence: Option<Empty>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

impl TryFrom<RawStringMatch> for StringMatch {
    type Error = &'static str;

    fn try_from(r: RawStringMatch) -> Result<StringMatch, &'static str> {
        match (r.exact, r.prefix, r.suffix, r.presence) {
            (Some(s), None, None, None) => Ok(StringMatch::Exact(s)),
            (None, Some(s), None, None) => Ok(StringMatch::Prefix(s)),
            (None, None, Some(s), None) => Ok(StringMatch::Suffix(s)),
            (None, None, None, Some(Empty {})) => Ok(StringMatch::Presence {}),
            _ => Err("a string match needs exactly one of exact, prefix, suffix or presence"),
        }
    }
}

impl From<StringMatch> for RawStringMatch {
    fn from(m: StringMatch) -> RawStringMatch {
        let mut r = RawStringMatch {
            exact: None,
            prefix: None,
            suffix: None,
            presence: None,
        };
        match m {
            StringMatch::Exact(s) => r.exact = Some(s),
            StringMatch::Prefix(s) => r.prefix = Some(s),
            StringMatch::Suffix(s) => r.suffix = Some(s),
            StringMatch::Presence {} => r.presence = Some(Empty {}),
        }
        r
    }
}

impl StringMatch {
    /// Istio's pattern form, as `AuthorizationPolicy` YAML (and the waypoint's L7 policies)
    /// write it: `*` any non-empty value, `prefix*`, `*suffix`, otherwise exact.
    pub fn from_pattern(pattern: &str) -> StringMatch {
        match Pattern::of(pattern) {
            Pattern::Present => StringMatch::Presence {},
            Pattern::Prefix(p) => StringMatch::Prefix(p.to_owned()),
            Pattern::Suffix(s) => StringMatch::Suffix(s.to_owned()),
            Pattern::Exact(e) => StringMatch::Exact(e.to_owned()),
        }
    }

    /// `from_pattern(pattern).matches(value)` without building the match: the waypoint judges
    /// every request with it.
    pub fn pattern_matches(pattern: &str, value: &str) -> bool {
        match Pattern::of(pattern) {
            Pattern::Present => !value.is_empty(),
            Pattern::Prefix(p) => value.starts_with(p),
            Pattern::Suffix(s) => value.ends_with(s),
            Pattern::Exact(e) => value == e,
        }
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence {} => !value.is_empty(),
        }
    }
}

/// Istio's pattern form, borrowed (see [`StringMatch::from_pattern`]).
enum Pattern<'a> {
    Present,
    Prefix(&'a str),
    Suffix(&'a str),
    Exact(&'a str),
}

impl<'a> Pattern<'a> {
    fn of(pattern: &'a str) -> Pattern<'a> {
        if pattern == "*" {
            Pattern::Present
        } else if let Some(prefix) = pattern.strip_suffix('*') {
            Pattern::Prefix(prefix)
        } else if let Some(suffix) = pattern.strip_prefix('*') {
            Pattern::Suffix(suffix)
        } else {
            Pattern::Exact(pattern)
        }
    }
}

/// A source service account: both parts compared exactly, the trust domain ignored.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// An address block, IPv4 or IPv6; written `10.0.0.0/8`, or a bare address for a single host.
/// An IPv4-mapped IPv6 block (`::ffff:10.0.0.0/104`) is the IPv4 block it maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    /// Host bits in `addr` are allowed and ignored (`10.1.2.3/8` is `10.0.0.0/8`), as Istio does.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Cidr, Error> {
        let max = match addr {
            IpAddr::V4(_) => 32,
            IpAddr::V6(_) => 128,
        };
        if prefix_len > max {
            return Err(Error::Cidr {
                value: format!("{addr}/{prefix_len}"),
                why: if max == 32 {
                    "an IPv4 prefix length is at most 32"
                } else {
                    "an IPv6 prefix length is at most 128"
                },
            });
        }
        Ok(Cidr { addr, prefix_len })
    }

    /// A single address (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        let prefix_len = if addr.is_ipv4() { 32 } else { 128 };
        Cidr { addr, prefix_len }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    /// Whether `ip` is in the block; IPv4-mapped IPv6 addresses and blocks count as IPv4. An IPv6
    /// block wider than `::ffff:0:0/96` (e.g. `::/0`) does not contain IPv4 addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        Net::from(*self).contains(ip.to_canonical())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cidr, Error> {
        let bad = |why| Error::Cidr {
            value: s.to_owned(),
            why,
        };
        match s.split_once('/') {
            None => s
                .parse::<IpAddr>()
                .map(Cidr::host)
                .map_err(|_| bad("expected an IP address or ADDRESS/PREFIX-LENGTH")),
            Some((addr, len)) => {
                let addr = addr
                    .parse::<IpAddr>()
                    .map_err(|_| bad("the part before '/' is not an IP address"))?;
                let len = len
                    .parse::<u8>()
                    .map_err(|_| bad("the prefix length is not a number from 0 to 128"))?;
                Cidr::new(addr, len).map_err(|e| match e {
                    Error::Cidr { why, .. } => bad(why),
                })
            }
        }
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A block in the form the matcher uses: the family after un-mapping, the masked network and the
/// mask, so `contains` is one AND and one compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Net {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Net {
    /// `ip` must already be canonical (IPv4-mapped addresses as IPv4).
    #[inline]
    pub(super) fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (Net::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Net::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

impl From<Cidr> for Net {
    fn from(c: Cidr) -> Net {
        fn v4(a: Ipv4Addr, len: u8) -> Net {
            let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
            Net::V4 {
                net: u32::from(a) & mask,
                mask,
            }
        }
        fn v6(a: Ipv6Addr, len: u8) -> Net {
            let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
            Net::V6 {
                net: u128::from(a) & mask,
                mask,
            }
        }
        match c.addr {
            IpAddr::V4(a) => v4(a, c.prefix_len),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(m) if c.prefix_len >= 96 => v4(m, c.prefix_len - 96),
                _ => v6(a, c.prefix_len),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    #[test]
    fn string_match_kinds() {
        for (m, value, want) in [
            (StringMatch::Exact("foo".into()), "foo", true),
            (StringMatch::Exact("foo".into()), "foobar", false),
            (StringMatch::Exact("foo".into()), "", false),
            (StringMatch::Prefix("foo".into()), "foobar", true),
            (StringMatch::Prefix("foo".into()), "barfoo", false),
            (StringMatch::Prefix("foo".into()), "", false),
            (StringMatch::Suffix("foo".into()), "barfoo", true),
            (StringMatch::Suffix("foo".into()), "foobar", false),
            (StringMatch::Suffix("foo".into()), "", false),
            (StringMatch::Presence {}, "x", true),
            (StringMatch::Presence {}, "", false),
        ] {
            assert_eq!(m.matches(value), want, "{m:?} on {value:?}");
        }
    }

    #[test]
    fn cidr_parse_and_contains() {
        let c: Cidr = "10.0.0.0/8".parse().expect("v4 cidr");
        assert!(c.contains(ip("10.1.2.3")));
        assert!(!c.contains(ip("11.0.0.1")));
        assert!(c.contains(ip("::ffff:10.9.9.9")), "v4-mapped address as v4");
        assert!(!c.contains(ip("fd00::1")));

        let host: Cidr = "10.0.0.1".parse().expect("bare v4");
        assert_eq!(host.prefix_len(), 32);
        assert!(host.contains(ip("10.0.0.1")) && !host.contains(ip("10.0.0.2")));

        let c6: Cidr = "fd00::/16".parse().expect("v6 cidr");
        assert!(c6.contains(ip("fd00:1::1")));
        assert!(!c6.contains(ip("fe80::1")));
        assert!(!c6.contains(ip("10.0.0.1")));

        let mapped: Cidr = "::ffff:10.0.0.0/104".parse().expect("mapped cidr");
        assert!(mapped.contains(ip("10.200.0.1")), "mapped block as v4 /8");
        assert!(mapped.contains(ip("::ffff:10.200.0.1")));
        assert!(!mapped.contains(ip("11.0.0.1")));

        let all6: Cidr = "::/0".parse().expect("::/0");
        assert!(all6.contains(ip("fd00::1")));
        assert!(!all6.contains(ip("10.0.0.1")), "::/0 is IPv6 only");
        let all4: Cidr = "0.0.0.0/0".parse().expect("0/0");
        assert!(all4.contains(ip("1.2.3.4")) && !all4.contains(ip("::1")));

        let hostbits: Cidr = "10.1.2.3/8".parse().expect("host bits");
        assert!(hostbits.contains(ip("10.200.0.1")));
    }

    #[test]
    fn cidr_errors_say_what_is_wrong() {
        for (s, want) in [
            ("10.0.0.0/33", "at most 32"),
            ("fd00::/129", "at most 128"),
            ("10.0.0/8", "not an IP address"),
            ("10.0.0.0/x", "prefix length"),
            ("nonsense", "expected an IP address"),
        ] {
            let e = s.parse::<Cidr>().expect_err(s).to_string();
            assert!(e.contains(want) && e.contains(s), "{s}: {e}");
        }
    }

    #[test]
    fn yaml_uses_the_xds_names() {
        let text = r#"
name: deny-sleep
namespace: default
scope: NAMESPACE
action: DENY
dryRun: true
rules:
- clauses:
  - matches:
    - principals: [{exact: cluster.local/ns/default/sa/sleep}, {presence: {}}]
      notPrincipals: [{prefix: cluster.local/ns/kube}]
      namespaces: [{suffix: "-prod"}]
      notNamespaces: [{exact: test}]
      serviceAccounts: [{namespace: default, serviceAccount: sleep}]
      notServiceAccounts: [{namespace: default, serviceAccount: curl}]
      sourceIps: ["10.0.0.0/8", "fd00::1"]
      notSourceIps: ["10.0.0.1"]
      destinationIps: ["10.1.0.0/16"]
      notDestinationIps: ["::ffff:10.1.1.0/120"]
      destinationPorts: [8080]
      notDestinationPorts: [9090]
- {}
"#;
        let p: Policy = serde_norway::from_str(text).expect("parses");
        assert_eq!(p.key(), "default/deny-sleep");
        assert_eq!(p.scope, Scope::Namespace);
        assert_eq!(p.action, Action::Deny);
        assert!(p.dry_run);
        assert_eq!(p.rules.len(), 2);
        assert!(p.rules[1].clauses.is_empty());
        let m = &p.rules[0].clauses[0].matches[0];
        assert_eq!(
            m.principals,
            vec![
                StringMatch::Exact("cluster.local/ns/default/sa/sleep".into()),
                StringMatch::Presence {}
            ]
        );
        assert_eq!(m.source_ips[1], Cidr::host(ip("fd00::1")));
        assert_eq!(m.not_destination_ports, vec![9090]);

        // Round trip through JSON keeps everything.
        let json = serde_json::to_string(&p).expect("serializes");
        assert!(json.contains(r#""presence":{}"#), "{json}");
        assert!(
            json.contains(r#""sourceIps":["10.0.0.0/8","fd00::1/128"]"#),
            "{json}"
        );
        let back: Policy = serde_json::from_str(&json).expect("round trip");
        assert_eq!(back, p);

        // Defaults: action ALLOW, not dry-run, no rules; ztunnel's local-config spellings work.
        let p: Policy = serde_norway::from_str("{name: a, namespace: b, scope: WorkloadSelector}")
            .expect("min");
        assert_eq!(
            (p.scope, p.action, p.dry_run, p.rules.len()),
            (Scope::WorkloadSelector, Action::Allow, false, 0)
        );
        let p: Policy =
            serde_norway::from_str("{name: a, namespace: b, scope: GLOBAL, action: AUDIT}")
                .expect("audit");
        assert_eq!(p.action, Action::Audit);
    }

    #[test]
    fn yaml_refuses_what_it_cannot_enforce() {
        for (text, want) in [
            (
                "{name: a, namespace: b, scope: GLOBAL, action: CUSTOM}",
                "CUSTOM",
            ),
            ("{name: a, namespace: b}", "scope"),
            (
                "{name: a, namespace: b, scope: GLOBAL, rules: [{clauses: [{matches: [{principal: []}]}]}]}",
                "principal",
            ),
            (
                "{name: a, namespace: b, scope: GLOBAL, rules: [{clauses: [{matches: [{sourceIps: [10.0.0.0/40]}]}]}]}",
                "at most 32",
            ),
            (
                "{name: a, namespace: b, scope: GLOBAL, rules: [{clauses: [{matches: [{principals: [{regex: x}]}]}]}]}",
                "regex",
            ),
            (
                "{name: a, namespace: b, scope: GLOBAL, rules: [{clauses: [{matches: [{principals: [{exact: x, prefix: y}]}]}]}]}",
                "exactly one of",
            ),
            (
                "{name: a, namespace: b, scope: GLOBAL, rules: [{clauses: [{matches: [{principals: [{}]}]}]}]}",
                "exactly one of",
            ),
        ] {
            let e = serde_norway::from_str::<Policy>(text)
                .expect_err(text)
                .to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
