//! The waypoint's part of the config file (`waypoint:`): who it is, its routes and its L7
//! authorization policies. The model follows the Kubernetes objects it stands in for, field for
//! field, so a later Kubernetes source can translate them one to one:
//!
//! - `routes` are Gateway API `HTTPRoute`s (GAMMA: `parentRefs` name Services): `hostnames`,
//!   `rules[].matches[]` (`path` `Exact`/`PathPrefix`, `headers` `Exact`, `method`),
//!   `rules[].backendRefs[]` (`name`, `namespace`, `port`, `weight`), `rules[].timeouts.request`,
//!   `rules[].retry` (`attempts`, `codes`, `backoff`, as GEP-1731);
//! - `authorization` entries are Istio `AuthorizationPolicy` specs (`action`, `rules[].from[]
//!   .source`, `to[].operation`, `when[]`), attached with `targetRefs` to the waypoint
//!   (`kind: Gateway`, the default) or to one of its Services;
//! - `outlierDetection` is the matching part of an Istio `DestinationRule`'s traffic policy.
//!
//! Parsing goes straight into these types; [`Waypoint::validate`] then checks values and resolves
//! service names, so errors name the field (`waypoint.routes[0].rules[1].backendRefs[0].weight`).

use std::{fmt, net::SocketAddr, time::Duration};

use serde::{Deserialize, Serialize};

use super::Service;
use crate::identity::Identity;

/// The `waypoint:` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Waypoint {
    /// The waypoint's namespace and name (its workload, as the node agents know it).
    pub namespace: String,
    pub name: String,
    /// Its service account, hence its identity. Default: `name` (as Istio deploys waypoints).
    #[serde(default)]
    pub service_account: Option<String>,
    /// Its SPIFFE identity, filled in by validation.
    #[serde(default, skip_deserializing)]
    pub identity: Option<Identity>,
    /// Where HBONE is served. Default `[::]:15008` (both families).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default)]
    pub routes: Vec<HttpRoute>,
    #[serde(default)]
    pub authorization: Vec<L7Policy>,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Its Gateway's class, in Kubernetes mode: only a Gateway of this class (and of the
    /// waypoint's namespace and name) is programmed by it. Default `ambit-waypoint`.
    #[serde(default = "default_gateway_class")]
    pub gateway_class_name: String,
    /// Outlier detection per service key, from DestinationRules in the cluster (the waypoint
    /// fills it; not read from the file).
    #[serde(default, skip)]
    pub service_outlier_detection: std::collections::BTreeMap<String, OutlierDetection>,
}

fn default_gateway_class() -> String {
    "ambit-waypoint".to_owned()
}

impl Waypoint {
    /// The outlier detection for requests to service `key`: its DestinationRule's, else the
    /// waypoint's.
    pub fn outlier_detection_for(&self, key: Option<&str>) -> &OutlierDetection {
        key.and_then(|k| self.service_outlier_detection.get(k))
            .unwrap_or(&self.outlier_detection)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, ambit_common::HBONE_PORT))
}

/// A Gateway API `HTTPRoute` attached to Services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    /// Default: the waypoint's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// The Services whose traffic this route handles.
    pub parent_refs: Vec<ServiceRef>,
    /// `Host` values it applies to (`*.example.com` wildcards allowed). Empty: any.
    #[serde(default)]
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

/// A reference to a Service (`parentRefs`, `backendRefs`, `targetRefs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    /// `Service` (the default) or, in `targetRefs`, `Gateway` for the waypoint itself.
    #[serde(default)]
    pub kind: Option<String>,
    pub name: String,
    /// Default: the referring object's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// A service port (parentRefs: only that port; backendRefs: the port to send to, default
    /// the port the client asked for).
    #[serde(default)]
    pub port: Option<u16>,
    /// backendRefs only: relative share of requests. Default 1.
    #[serde(default)]
    pub weight: Option<u32>,
    /// `namespace/hostname`, resolved by validation.
    #[serde(default, skip_deserializing)]
    pub service: Option<String>,
}

impl ServiceRef {
    pub fn service_key(&self) -> &str {
        self.service.as_deref().unwrap_or_default()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteRule {
    /// Any of these. Empty: every request (a `/` prefix).
    #[serde(default)]
    pub matches: Vec<RouteMatch>,
    /// Weighted backends; a request picks one by weight.
    pub backend_refs: Vec<ServiceRef>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retry: Option<Retry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// How long to wait for the response to start, retries included; past it the client gets
    /// 504.
    #[serde(default)]
    pub request: Option<GoDuration>,
}

/// All of its fields must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteMatch {
    #[serde(default)]
    pub path: Option<PathMatch>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// `PathPrefix` (the default; matches whole path segments) or `Exact`.
    #[serde(default = "default_path_type", rename = "type")]
    pub kind: String,
    pub value: String,
}

fn default_path_type() -> String {
    "PathPrefix".to_owned()
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderMatch {
    /// Only `Exact`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Case-insensitive; stored lowercase.
    pub name: String,
    pub value: String,
}

/// Retries of a rule (Gateway API GEP-1731). Only idempotent requests (GET, HEAD, OPTIONS, PUT,
/// DELETE, TRACE) whose body the waypoint could keep are retried; a connection that could not
/// be opened is retried for any method, since nothing was sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Retry {
    /// Retries after the first try. Default 2.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// Response codes that are retried. Default 502, 503, 504.
    #[serde(default = "default_retry_codes")]
    pub codes: Vec<u16>,
    /// Wait before each retry. Default 25ms.
    #[serde(default)]
    pub backoff: Option<GoDuration>,
}

fn default_attempts() -> u32 {
    2
}

fn default_retry_codes() -> Vec<u16> {
    vec![502, 503, 504]
}

impl Default for Retry {
    /// What a rule without `retry` gets (as Istio's default): two retries of refused
    /// connections and 503s.
    fn default() -> Retry {
        Retry {
            attempts: 2,
            codes: vec![503],
            backoff: None,
        }
    }
}

impl Retry {
    pub fn backoff(&self) -> Duration {
        self.backoff
            .map_or(Duration::from_millis(25), |d| d.duration())
    }
}

/// Endpoints that keep failing are skipped for a while (Istio `DestinationRule`
/// `outlierDetection`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive failures (5xx answers, connections refused or broken) that eject an endpoint.
    /// Default 5; 0 disables ejection.
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx_errors: u32,
    /// First ejection's length; each further ejection of the same endpoint lasts one more of it.
    /// Default 30s.
    #[serde(default = "default_ejection")]
    pub base_ejection_time: GoDuration,
    /// At most this share of a service's endpoints is ejected at once (at least one may be).
    /// Default 50.
    #[serde(default = "default_max_ejection")]
    pub max_ejection_percent: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_ejection() -> GoDuration {
    GoDuration(Duration::from_secs(30))
}
fn default_max_ejection() -> u32 {
    50
}

impl Default for OutlierDetection {
    fn default() -> OutlierDetection {
        OutlierDetection {
            consecutive_5xx_errors: default_consecutive(),
            base_ejection_time: default_ejection(),
            max_ejection_percent: default_max_ejection(),
        }
    }
}

/// An Istio `AuthorizationPolicy` enforced by the waypoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Policy {
    pub name: String,
    /// Default: the waypoint's namespace.
    #[serde(default)]
    pub namespace: Option<String>,
    /// Empty: the waypoint itself (every request it handles).
    #[serde(default)]
    pub target_refs: Vec<ServiceRef>,
    /// `ALLOW` (the default) or `DENY`.
    #[serde(default)]
    pub action: crate::policy::Action,
    /// The policy matches if any rule matches; no rules match nothing.
    #[serde(default)]
    pub rules: Vec<L7Rule>,
}

impl L7Policy {
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.namespace.as_deref().unwrap_or_default(),
            self.name
        )
    }
}

/// All of `from`, `to` and `when` must match (an empty list matches anything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L7Rule {
    #[serde(default)]
    pub from: Vec<From>,
    #[serde(default)]
    pub to: Vec<To>,
    #[serde(default)]
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct From {
    pub source: Source,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct To {
    pub operation: Operation,
}

/// Istio's `Source`. Principals are `<trust domain>/ns/<ns>/sa/<sa>` (a `spiffe://` prefix is
/// accepted); values may be exact, `prefix*`, `*suffix` or `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Source {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub not_principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub not_namespaces: Vec<String>,
}

/// Istio's `Operation`: hosts (case-insensitive), methods, paths (exact, `prefix*`, `*suffix`,
/// `*`), destination ports.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Operation {
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub not_hosts: Vec<String>,
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub not_methods: Vec<String>,
    #[serde(default)]
    pub paths: Vec<String>,
    #[serde(default)]
    pub not_paths: Vec<String>,
    #[serde(default)]
    pub ports: Vec<String>,
    #[serde(default)]
    pub not_ports: Vec<String>,
}

/// Istio's `Condition`: `request.headers[<name>]`, `source.principal`, `source.namespace`,
/// `source.ip` or `destination.port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default)]
    pub values: Vec<String>,
    #[serde(default)]
    pub not_values: Vec<String>,
}

/// A duration in the Gateway API's format: `1h`, `30s`, `250ms`, `1m30s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub fn duration(self) -> Duration {
        self.0
    }
}

impl std::str::FromStr for GoDuration {
    type Err = String;

    fn from_str(s: &str) -> Result<GoDuration, String> {
        let bad = || format!("{s:?} is not a duration like 30s, 250ms, 1m30s or 1h");
        let mut total = Duration::ZERO;
        let mut rest = s;
        if rest.is_empty() {
            return Err(bad());
        }
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 || digits > 6 {
                return Err(bad());
            }
            let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
            rest = &rest[digits..];
            let (unit, len) = if rest.starts_with("ms") {
                (Duration::from_millis(1), 2)
            } else if rest.starts_with('h') {
                (Duration::from_secs(3600), 1)
            } else if rest.starts_with('m') {
                (Duration::from_secs(60), 1)
            } else if rest.starts_with('s') {
                (Duration::from_secs(1), 1)
            } else {
                return Err(bad());
            };
            rest = &rest[len..];
            total += unit * u32::try_from(n).map_err(|_| bad())?;
        }
        Ok(GoDuration(total))
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms.is_multiple_of(1000) {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl Serialize for GoDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<GoDuration, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The keys a `when` condition may use.
pub const CONDITION_KEYS: &str =
    "request.headers[<name>], source.principal, source.namespace, source.ip, destination.port";

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

impl Waypoint {
    /// Checks values and resolves Service references against `services` (or, when a control
    /// plane may add services, to `<name>.<namespace>.svc.cluster.local`). Returns the field
    /// path (under `waypoint.`) and message of the first problem.
    pub(crate) fn validate(
        &mut self,
        trust_domain: &str,
        services: &[Service],
        xds: bool,
    ) -> Result<(), (String, String)> {
        let err = |f: String, m: String| Err((f, m));
        if !super::is_dns_label(&self.namespace) {
            return err(
                "namespace".into(),
                format!("{:?} is not a valid namespace name", self.namespace),
            );
        }
        if self.name.is_empty() {
            return err("name".into(), "must not be empty".into());
        }
        let sa = self
            .service_account
            .get_or_insert_with(|| self.name.clone())
            .clone();
        self.identity = Some(
            Identity::new(trust_domain.to_owned(), &self.namespace, &sa)
                .map_err(|e| ("serviceAccount".to_owned(), e.to_string()))?,
        );
        let resolver = Resolver { services, xds };
        let mut names = std::collections::HashSet::new();
        for (i, route) in self.routes.iter_mut().enumerate() {
            let f = format!("routes[{i}]");
            let ns = route
                .namespace
                .get_or_insert_with(|| self.namespace.clone())
                .clone();
            if !names.insert(format!("{ns}/{}", route.name)) {
                return err(
                    format!("{f}.name"),
                    format!("route {ns}/{} is listed twice", route.name),
                );
            }
            validate_route(route, &f, &ns, &resolver)?;
        }
        let mut keys = std::collections::HashSet::new();
        for (i, p) in self.authorization.iter_mut().enumerate() {
            let f = format!("authorization[{i}]");
            let ns = p
                .namespace
                .get_or_insert_with(|| self.namespace.clone())
                .clone();
            if !keys.insert(format!("{ns}/{}", p.name)) {
                return err(
                    format!("{f}.name"),
                    format!("policy {ns}/{} is listed twice", p.name),
                );
            }
            validate_policy(p, &f, &ns, &self.name, &resolver)?;
        }
        let o = &self.outlier_detection;
        if o.max_ejection_percent > 100 {
            return err(
                "outlierDetection.maxEjectionPercent".into(),
                format!("{} is more than 100", o.max_ejection_percent),
            );
        }
        if o.base_ejection_time.duration().is_zero() && o.consecutive_5xx_errors > 0 {
            return err(
                "outlierDetection.baseEjectionTime".into(),
                "must be more than 0".into(),
            );
        }
        Ok(())
    }

    pub fn identity(&self) -> &Identity {
        self.identity
            .as_ref()
            .expect("BUG: a validated waypoint config has an identity")
    }
}

/// Resolves Service references (`parentRefs`, `backendRefs`, `targetRefs`) to their keys.
pub struct Resolver<'a> {
    pub services: &'a [Service],
    /// A control plane may add services: unknown names resolve to
    /// `<name>.<namespace>.svc.cluster.local`.
    pub xds: bool,
}

impl Resolver<'_> {
    pub fn resolve(
        &self,
        field: &str,
        r: &mut ServiceRef,
        default_ns: &str,
    ) -> Result<(), (String, String)> {
        let (services, xds) = (self.services, self.xds);
        let ns = r.namespace.get_or_insert_with(|| default_ns.to_owned());
        let found = services
            .iter()
            .find(|s| s.namespace == *ns && (s.name == r.name || s.hostname == r.name));
        r.service = match found {
            Some(s) => Some(s.key()),
            None if xds => Some(format!("{ns}/{}.{ns}.svc.cluster.local", r.name)),
            None => {
                return Err((
                    field.to_owned(),
                    format!("service {ns}/{} is not in `services`", r.name),
                ));
            }
        };
        if r.port == Some(0) {
            return Err((format!("{field}.port"), "port 0 is not a port".into()));
        }
        Ok(())
    }
}

/// Checks one route (its namespace already defaulted to `ns`); `f` is its field path.
pub fn validate_route(
    route: &mut HttpRoute,
    f: &str,
    ns: &str,
    resolver: &Resolver<'_>,
) -> Result<(), (String, String)> {
    let err = |f: String, m: String| Err((f, m));
    let ns = ns.to_owned();
    if route.parent_refs.is_empty() {
        return err(
            format!("{f}.parentRefs"),
            "a route needs at least one Service it applies to".into(),
        );
    }
    for (j, p) in route.parent_refs.iter_mut().enumerate() {
        let pf = format!("{f}.parentRefs[{j}]");
        if p.kind.as_deref().is_some_and(|k| k != "Service") {
            return err(
                format!("{pf}.kind"),
                "only Service parents are supported (a waypoint routes mesh traffic)".into(),
            );
        }
        if p.weight.is_some() {
            return err(
                format!("{pf}.weight"),
                "only backendRefs have weights".into(),
            );
        }
        resolver.resolve(&pf, p, &ns)?;
    }
    for (j, h) in route.hostnames.iter_mut().enumerate() {
        *h = h.to_ascii_lowercase();
        let name = h.strip_prefix("*.").unwrap_or(h);
        let valid = !name.is_empty()
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !valid {
            return err(
                format!("{f}.hostnames[{j}]"),
                format!(
                    "{h:?} is not a DNS name (lowercase letters, digits, `-`, dots; only \
                     a leading `*.` wildcard)"
                ),
            );
        }
    }
    if route.rules.is_empty() {
        return err(
            format!("{f}.rules"),
            "a route needs at least one rule".into(),
        );
    }
    for (k, rule) in route.rules.iter_mut().enumerate() {
        let rf = format!("{f}.rules[{k}]");
        for (m, mat) in rule.matches.iter_mut().enumerate() {
            let mf = format!("{rf}.matches[{m}]");
            if let Some(p) = &mat.path {
                if p.kind != "PathPrefix" && p.kind != "Exact" {
                    return err(
                        format!("{mf}.path.type"),
                        format!("{:?}: only PathPrefix and Exact are supported", p.kind),
                    );
                }
                if !p.value.starts_with('/') {
                    return err(
                        format!("{mf}.path.value"),
                        format!("{:?} must start with /", p.value),
                    );
                }
            }
            for (h, hm) in mat.headers.iter_mut().enumerate() {
                if hm.kind.as_deref().is_some_and(|k| k != "Exact") {
                    return err(
                        format!("{mf}.headers[{h}].type"),
                        "only Exact header matches are supported".into(),
                    );
                }
                hm.name = hm.name.to_ascii_lowercase();
                if http::HeaderName::from_bytes(hm.name.as_bytes()).is_err() {
                    return err(
                        format!("{mf}.headers[{h}].name"),
                        format!("{:?} is not a header name", hm.name),
                    );
                }
            }
            if let Some(method) = &mat.method
                && !METHODS.contains(&method.as_str())
            {
                return err(
                    format!("{mf}.method"),
                    format!("{method:?} is not an HTTP method (uppercase, e.g. GET)"),
                );
            }
        }
        if rule.backend_refs.is_empty() {
            return err(
                format!("{rf}.backendRefs"),
                "a rule needs at least one backend".into(),
            );
        }
        for (b, backend) in rule.backend_refs.iter_mut().enumerate() {
            let bf = format!("{rf}.backendRefs[{b}]");
            if backend.kind.as_deref().is_some_and(|k| k != "Service") {
                return err(format!("{bf}.kind"), "only Service backends".into());
            }
            resolver.resolve(&bf, backend, &ns)?;
        }
        if rule.backend_refs.iter().all(|b| b.weight == Some(0)) {
            return err(
                format!("{rf}.backendRefs"),
                "every backend has weight 0, so no request could be sent".into(),
            );
        }
        if let Some(r) = &rule.retry
            && let Some(c) = r.codes.iter().find(|c| !(400..=599).contains(*c))
        {
            return err(
                format!("{rf}.retry.codes"),
                format!("{c} is not an error status (400-599)"),
            );
        }
        if rule
            .timeouts
            .request
            .is_some_and(|d| d.duration().is_zero())
        {
            return err(
                format!("{rf}.timeouts.request"),
                "must be more than 0 (leave it out for no timeout)".into(),
            );
        }
    }
    Ok(())
}

/// Checks one L7 policy of waypoint `waypoint` (its namespace already defaulted to `ns`); `f`
/// is its field path.
pub fn validate_policy(
    p: &mut L7Policy,
    f: &str,
    ns: &str,
    waypoint: &str,
    resolver: &Resolver<'_>,
) -> Result<(), (String, String)> {
    let err = |f: String, m: String| Err((f, m));
    let ns = ns.to_owned();
    if p.action == crate::policy::Action::Audit {
        return err(
            format!("{f}.action"),
            "AUDIT is not enforced by the waypoint; use ALLOW or DENY".into(),
        );
    }
    for (j, t) in p.target_refs.iter_mut().enumerate() {
        let tf = format!("{f}.targetRefs[{j}]");
        match t.kind.as_deref() {
            Some("Gateway") => {
                if t.name != waypoint {
                    return err(
                        format!("{tf}.name"),
                        format!("this waypoint is {waypoint:?}, not {:?}", t.name),
                    );
                }
            }
            None | Some("Service") => resolver.resolve(&tf, t, &ns)?,
            Some(k) => {
                return err(
                    format!("{tf}.kind"),
                    format!("{k:?}: a target is the waypoint (Gateway) or a Service"),
                );
            }
        }
    }
    for (j, rule) in p.rules.iter_mut().enumerate() {
        let rf = format!("{f}.rules[{j}]");
        for (k, to) in rule.to.iter_mut().enumerate() {
            let op = &mut to.operation;
            for (field, methods) in [("methods", &op.methods), ("notMethods", &op.not_methods)] {
                if let Some(m) = methods.iter().find(|m| !METHODS.contains(&m.as_str())) {
                    return err(
                        format!("{rf}.to[{k}].operation.{field}"),
                        format!("{m:?} is not an HTTP method (uppercase, e.g. GET)"),
                    );
                }
            }
            for (field, ports) in [("ports", &op.ports), ("notPorts", &op.not_ports)] {
                if let Some(p) = ports.iter().find(|p| p.parse::<u16>().is_err()) {
                    return err(
                        format!("{rf}.to[{k}].operation.{field}"),
                        format!("{p:?} is not a port"),
                    );
                }
            }
            for h in op.hosts.iter_mut().chain(op.not_hosts.iter_mut()) {
                *h = h.to_ascii_lowercase();
            }
        }
        for (k, c) in rule.when.iter_mut().enumerate() {
            if ConditionKey::parse(&c.key).is_none() {
                return err(
                    format!("{rf}.when[{k}].key"),
                    format!("{:?} is not supported; use one of {CONDITION_KEYS}", c.key),
                );
            }
            if matches!(ConditionKey::parse(&c.key), Some(ConditionKey::SourceIp))
                && let Some(v) = c
                    .values
                    .iter()
                    .chain(&c.not_values)
                    .find(|v| v.parse::<crate::policy::Cidr>().is_err())
            {
                return err(
                    format!("{rf}.when[{k}].values"),
                    format!("{v:?} is not an IP address or CIDR block"),
                );
            }
            if c.values.is_empty() && c.not_values.is_empty() {
                return err(format!("{rf}.when[{k}]"), "give values or notValues".into());
            }
        }
    }
    Ok(())
}

/// A `when` key, parsed.
#[derive(Debug, PartialEq, Eq)]
pub enum ConditionKey<'a> {
    Header(&'a str),
    SourcePrincipal,
    SourceNamespace,
    SourceIp,
    DestinationPort,
}

impl ConditionKey<'_> {
    pub fn parse(key: &str) -> Option<ConditionKey<'_>> {
        if let Some(name) = key
            .strip_prefix("request.headers[")
            .and_then(|r| r.strip_suffix(']'))
        {
            return (!name.is_empty()).then_some(ConditionKey::Header(name));
        }
        Some(match key {
            "source.principal" => ConditionKey::SourcePrincipal,
            "source.namespace" => ConditionKey::SourceNamespace,
            "source.ip" => ConditionKey::SourceIp,
            "destination.port" => ConditionKey::DestinationPort,
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_gateway_api_durations() {
        let d = |s: &str| s.parse::<GoDuration>().map(|d| d.duration());
        assert_eq!(d("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(d("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(d("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1h"), Ok(Duration::from_secs(3600)));
        for bad in ["", "5", "s", "1.5s", "10x", "-1s"] {
            assert!(d(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            GoDuration(Duration::from_millis(1500)).to_string(),
            "1500ms"
        );
    }
}
