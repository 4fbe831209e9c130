//! A waypoint configured from the cluster (a `kubernetes:` section in its config): it follows
//! the objects Istio's waypoint follows and adds them to the routes and policies of its file.
//!
//! ```text
//! API server ──list/watch──> Namespaces, Services   (which Services use this waypoint:
//!                            HTTP/GRPCRoutes         `istio.io/use-waypoint` on the Service,
//!                            AuthorizationPolicies    else on its Namespace)
//!                 │
//!                 └─> derive (pure) ──> routes + policies ──> the waypoint's settings (live)
//!                                  └─> route status (`Accepted`, `ResolvedRefs`) ──PATCH──> API
//! ```
//!
//! - An `HTTPRoute` is this waypoint's when one of its `parentRefs` is a Service bound to it
//!   (GAMMA). It is read alone: one the waypoint cannot apply (an unsupported field, a bad
//!   value) is not applied and its status says why (`Accepted: False`, the field named); the
//!   others apply. Routes for other Services are ignored, and the log says so.
//! - An `AuthorizationPolicy` is this waypoint's when a `targetRefs` entry names its Gateway or
//!   a Service bound to it. One it cannot enforce as written fails closed: a `DENY` (or
//!   `CUSTOM`) denies every request it targets, an `ALLOW` allows none; the log says why.
//! - Until every list has been read once the waypoint answers 503 (it does not know yet which
//!   policies apply), and its readiness says so.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::config::{
    HttpRoute, L7Policy, L7Rule, OutlierDetection, Resolver, ServiceRef, Waypoint,
};
use crate::{
    kube::{Client, NamespaceObject, Object, ObjectMeta, follow},
    policy::Action,
};

/// The `controllerName` of this waypoint's entries in a route's `status.parents`.
pub const CONTROLLER: &str = "ambit.dev/waypoint";
/// The label that binds a Service (or every Service of a Namespace) to a waypoint.
pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
/// The waypoint's namespace, when it is not the Service's.
pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";
const GRPC_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/grpcroutes";
const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1/gateways";
const POLICIES: &str = "/apis/security.istio.io/v1/authorizationpolicies";
const DESTINATION_RULES: &str = "/apis/networking.istio.io/v1/destinationrules";

/// An object the waypoint reads the `spec` (and `status`) of as written, to translate it with
/// errors that name the field.
#[derive(Clone, Debug, Deserialize)]
pub struct SpecObject {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Value,
    #[serde(default)]
    pub status: Value,
}

impl Object for SpecObject {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

/// A `v1.Service`, as far as waypoint binding reads it (its labels).
#[derive(Clone, Debug, Deserialize)]
pub struct ServiceObject {
    pub metadata: ObjectMeta,
}

impl Object for ServiceObject {
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
}

type Labels = BTreeMap<String, String>;

/// What the cluster holds, as read.
#[derive(Default)]
pub struct Cluster {
    /// Namespace -> labels.
    pub namespaces: BTreeMap<String, Labels>,
    /// `namespace/name` -> labels.
    pub services: BTreeMap<String, Labels>,
    pub routes: Vec<SpecObject>,
    pub grpc_routes: Vec<SpecObject>,
    pub policies: Vec<SpecObject>,
    pub destination_rules: Vec<SpecObject>,
    /// This waypoint's own `Gateway` (same namespace and name), if it exists.
    pub gateway: Option<SpecObject>,
}

impl Cluster {
    /// Whether Service `namespace/name` uses waypoint `me`: its own `istio.io/use-waypoint`
    /// label, else its namespace's (`none` opts out), in the namespace the
    /// `istio.io/use-waypoint-namespace` label next to it names (default: the Service's).
    pub fn uses(&self, me: &Waypoint, namespace: &str, name: &str) -> bool {
        let Some(labels) = self.services.get(&format!("{namespace}/{name}")) else {
            return false;
        };
        let binding = if labels.contains_key(USE_WAYPOINT) {
            Some(labels)
        } else {
            self.namespaces
                .get(namespace)
                .filter(|l| l.contains_key(USE_WAYPOINT))
        };
        binding.is_some_and(|l| {
            l.get(USE_WAYPOINT).is_some_and(|w| *w == me.name)
                && l.get(USE_WAYPOINT_NAMESPACE)
                    .map_or(namespace, String::as_str)
                    == me.namespace
        }) && self.allows_attachment(me, namespace)
    }

    /// Whether Services of `namespace` may attach to the waypoint: its Gateway's HBONE listener
    /// (15008) says so in `allowedRoutes.namespaces` (`Same`, the default and what applies
    /// without a Gateway; `All`; or a `Selector` of `matchLabels`), as istiod decides.
    fn allows_attachment(&self, me: &Waypoint, namespace: &str) -> bool {
        let listener = self.gateway.as_ref().and_then(|g| {
            g.spec["listeners"]
                .as_array()?
                .iter()
                .find(|l| l["protocol"] == "HBONE" && l["port"] == 15008)
                .cloned()
        });
        let allowed = listener.map(|l| l["allowedRoutes"]["namespaces"].clone());
        let allowed = allowed.as_ref();
        match allowed.and_then(|a| a["from"].as_str()).unwrap_or("Same") {
            "All" => true,
            "Selector" => {
                let selector = allowed.map(|a| a["selector"].clone()).unwrap_or_default();
                // matchExpressions are not evaluated: refuse rather than guess.
                if selector.get("matchExpressions").is_some() {
                    return false;
                }
                let labels = self.namespaces.get(namespace);
                selector["matchLabels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .all(|(k, v)| labels.and_then(|l| l.get(k)).map(String::as_str) == v.as_str())
            }
            _ => namespace == me.namespace,
        }
    }
}

/// What the waypoint takes from the cluster.
#[derive(Debug, Default, PartialEq)]
pub struct Derived {
    pub routes: Vec<HttpRoute>,
    pub authorization: Vec<L7Policy>,
    /// `<Kind> namespace/name` -> why it is not applied (as written, or at all).
    pub notes: BTreeMap<String, String>,
    /// Route key -> this waypoint's `status.parents` entries for it (conditions without
    /// `lastTransitionTime`, which [`status_patch`] adds).
    pub statuses: BTreeMap<String, Vec<Value>>,
    /// The same for GRPCRoutes.
    pub grpc_statuses: BTreeMap<String, Vec<Value>>,
    /// The status its own Gateway should have (`addresses` and `conditions`, without times),
    /// when there is a Gateway of its class to program.
    pub gateway_status: Option<Value>,
    /// Service key -> its DestinationRule's outlier detection.
    pub outlier_detection: BTreeMap<String, OutlierDetection>,
}

/// Derives the routes and policies of waypoint `me` (its settings from the config file) from
/// `cluster`; names in them resolve with `resolver`. Objects named like one of the file's are
/// left to the file.
pub fn derive(me: &Waypoint, cluster: &Cluster, resolver: &Resolver) -> Derived {
    let mut out = Derived::default();
    for obj in &cluster.routes {
        route(me, cluster, resolver, RouteKind::Http, obj, &mut out);
    }
    for obj in &cluster.grpc_routes {
        route(me, cluster, resolver, RouteKind::Grpc, obj, &mut out);
    }
    for obj in &cluster.policies {
        policy(me, cluster, resolver, obj, &mut out);
    }
    for obj in &cluster.destination_rules {
        destination_rule(me, cluster, resolver, obj, &mut out);
    }
    out.gateway_status = cluster
        .gateway
        .as_ref()
        .and_then(|g| gateway_status(me, cluster, g, &mut out.notes));
    out
}

/// What this waypoint's Gateway should say: its address is the hostname of the Service of the
/// same name (istiod prefers a hostname, and resolves it to the Service's VIP), and it is
/// `Accepted` and `Programmed`; without that Service it has no address, `Programmed: False`.
/// A Gateway of another class is left alone.
fn gateway_status(
    me: &Waypoint,
    cluster: &Cluster,
    gateway: &SpecObject,
    notes: &mut BTreeMap<String, String>,
) -> Option<Value> {
    let class = gateway.spec["gatewayClassName"]
        .as_str()
        .unwrap_or_default();
    if class != me.gateway_class_name {
        notes.insert(
            format!("Gateway {}", gateway.key()),
            format!(
                "not programmed: its class is {class:?}, this waypoint's is {:?} \
                 (waypoint.gatewayClassName)",
                me.gateway_class_name
            ),
        );
        return None;
    }
    let accepted = condition("Accepted", true, "Accepted", "", gateway);
    let service = format!("{}/{}", me.namespace, me.name);
    Some(if cluster.services.contains_key(&service) {
        json!({"addresses": [{"type": "Hostname",
                              "value": format!("{}.{}.svc.cluster.local", me.name, me.namespace)}],
               "conditions": [accepted, condition("Programmed", true, "Programmed", "", gateway)]})
    } else {
        let why = format!("no Service {service} in front of the waypoint's pods");
        json!({"addresses": [],
               "conditions": [accepted,
                              condition("Programmed", false, "AddressNotAssigned", &why, gateway)]})
    })
}

/// The outlier detection of a DestinationRule for a Service that uses this waypoint. The
/// fields the waypoint implements apply; the others are ignored and noted.
fn destination_rule(
    me: &Waypoint,
    cluster: &Cluster,
    resolver: &Resolver,
    obj: &SpecObject,
    out: &mut Derived,
) {
    let ns = namespace_of(obj);
    let what = format!("DestinationRule {}", obj.key());
    let host = obj.spec["host"].as_str().unwrap_or_default();
    let short = host
        .strip_suffix(".svc.cluster.local")
        .or_else(|| host.strip_suffix(".svc"))
        .unwrap_or(host);
    let (name, service_ns) = match short.split_once('.') {
        None => (short, ns),
        Some((name, rest)) if !rest.contains('.') => (name, rest),
        _ => return,
    };
    if !cluster.uses(me, service_ns, name) {
        return;
    }
    let Some(od) = obj.spec["trafficPolicy"]["outlierDetection"].as_object() else {
        return;
    };
    let mut applied = OutlierDetection::default();
    let mut ignored = Vec::new();
    for (field, value) in od {
        let as_u32 = || value.as_u64().and_then(|n| u32::try_from(n).ok());
        let ok = match field.as_str() {
            "consecutive5xxErrors" => as_u32().map(|n| applied.consecutive_5xx_errors = n),
            "maxEjectionPercent" => as_u32()
                .filter(|n| *n <= 100)
                .map(|n| applied.max_ejection_percent = n),
            "baseEjectionTime" => value
                .as_str()
                .and_then(|d| d.parse::<super::config::GoDuration>().ok())
                .filter(|d| !d.duration().is_zero())
                .map(|d| applied.base_ejection_time = d),
            _ => None,
        };
        if ok.is_none() {
            ignored.push(format!("{field}: {value}"));
        }
    }
    let mut service = ServiceRef {
        kind: None,
        name: name.to_owned(),
        namespace: Some(service_ns.to_owned()),
        port: None,
        weight: None,
        service: None,
    };
    if let Err((_, why)) = resolver.resolve("spec.host", &mut service, service_ns) {
        out.notes.insert(what, format!("not applied: {why}"));
        return;
    }
    if !ignored.is_empty() {
        out.notes.insert(
            what,
            format!(
                "outlierDetection applied without {} (not implemented, or out of range)",
                ignored.join(", ")
            ),
        );
    }
    out.outlier_detection
        .insert(service.service_key().to_owned(), applied);
}

fn namespace_of(obj: &SpecObject) -> &str {
    obj.metadata.namespace.as_deref().unwrap_or_default()
}

/// The Gateway API route kinds the waypoint follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    /// gRPC: its method matches become path matches (`/service/method`), as gRPC sends them.
    Grpc,
}

impl RouteKind {
    pub fn name(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }

    /// Its resource name in the API's paths.
    pub fn plural(self) -> &'static str {
        match self {
            RouteKind::Http => "httproutes",
            RouteKind::Grpc => "grpcroutes",
        }
    }
}

fn route(
    me: &Waypoint,
    cluster: &Cluster,
    resolver: &Resolver,
    kind: RouteKind,
    obj: &SpecObject,
    out: &mut Derived,
) {
    let ns = namespace_of(obj);
    let key = obj.key();
    let what = format!("{} {key}", kind.name());
    let mut ours = Vec::new();
    let mut others = Vec::new();
    for p in obj.spec["parentRefs"].as_array().into_iter().flatten() {
        // Gateway API defaults: a parent is a Gateway unless it says otherwise.
        let group = p["group"].as_str().unwrap_or(GATEWAY_GROUP);
        let kind = p["kind"].as_str().unwrap_or("Gateway");
        let name = p["name"].as_str().unwrap_or_default();
        let pns = p["namespace"].as_str().unwrap_or(ns);
        if matches!(group, "" | "core") && kind == "Service" && cluster.uses(me, pns, name) {
            ours.push(p.clone());
        } else {
            others.push(format!("{kind} {pns}/{name}"));
        }
    }
    if ours.is_empty() {
        out.notes.insert(
            what,
            format!(
                "ignored: none of its parents is a Service that uses this waypoint ({})",
                if others.is_empty() {
                    "it has no parentRefs".to_owned()
                } else {
                    others.join(", ")
                }
            ),
        );
        return;
    }
    let translated = if me
        .routes
        .iter()
        .any(|r| r.name == obj.metadata.name && r.namespace.as_deref() == Some(ns))
    {
        Err((
            "metadata.name".to_owned(),
            "a route of this name is in the waypoint's config file, which wins".to_owned(),
        ))
    } else {
        match kind {
            RouteKind::Http => Ok(obj.spec.clone()),
            RouteKind::Grpc => grpc_as_http(&obj.spec),
        }
        .and_then(|spec| translate_route(obj, spec, &ours, resolver))
    };
    let accepted = match &translated {
        Ok(_) => condition("Accepted", true, "Accepted", "", obj),
        Err((field, why)) => {
            out.notes
                .insert(what.clone(), format!("not applied: {field}: {why}"));
            condition(
                "Accepted",
                false,
                "UnsupportedValue",
                &format!("{field}: {why}"),
                obj,
            )
        }
    };
    let missing: Vec<String> = obj.spec["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| r["backendRefs"].as_array().into_iter().flatten())
        .filter(|b| b["kind"].as_str().unwrap_or("Service") == "Service")
        .map(|b| {
            format!(
                "{}/{}",
                b["namespace"].as_str().unwrap_or(ns),
                b["name"].as_str().unwrap_or_default()
            )
        })
        .filter(|k| !cluster.services.contains_key(k))
        .collect();
    let resolved = if missing.is_empty() {
        condition("ResolvedRefs", true, "ResolvedRefs", "", obj)
    } else {
        condition(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            &format!("no Service {}", missing.join(", ")),
            obj,
        )
    };
    let statuses = match kind {
        RouteKind::Http => &mut out.statuses,
        RouteKind::Grpc => &mut out.grpc_statuses,
    };
    statuses.insert(
        key,
        ours.iter()
            .map(|p| {
                json!({"parentRef": p, "controllerName": CONTROLLER,
                       "conditions": [accepted, resolved]})
            })
            .collect(),
    );
    if let Ok(r) = translated {
        out.routes.push(r);
    }
}

/// A status condition (Gateway API / Kubernetes `metav1.Condition`, without its time).
fn condition(kind: &str, ok: bool, reason: &str, message: &str, obj: &SpecObject) -> Value {
    json!({"type": kind, "status": if ok { "True" } else { "False" }, "reason": reason,
           "message": message, "observedGeneration": obj.metadata.generation})
}

/// The part of an `HTTPRoute` spec the waypoint implements; anything else is an unknown field.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteSpec {
    parent_refs: Vec<ServiceRef>,
    #[serde(default)]
    hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<super::config::RouteRule>,
}

/// A GRPCRoute spec as the HTTPRoute it routes like: each `method` match (`Exact`, with its
/// `service`) becomes the path gRPC puts it in, `/service/method` (or every method of the
/// service, `/service` as a prefix).
fn grpc_as_http(spec: &Value) -> Result<Value, (String, String)> {
    let mut spec = spec.clone();
    let rules = spec["rules"]
        .as_array_mut()
        .into_iter()
        .flatten()
        .enumerate();
    for (i, rule) in rules {
        let matches = rule["matches"]
            .as_array_mut()
            .into_iter()
            .flatten()
            .enumerate();
        for (j, m) in matches {
            let f = format!("spec.rules[{i}].matches[{j}].method");
            let Some(method) = m.as_object_mut().and_then(|o| o.remove("method")) else {
                continue;
            };
            let Some(fields) = method.as_object() else {
                return Err((f, "must be an object".into()));
            };
            if let Some(other) = fields
                .keys()
                .find(|k| !matches!(k.as_str(), "type" | "service" | "method"))
            {
                return Err((format!("{f}.{other}"), "unknown field".into()));
            }
            let kind = method["type"].as_str().unwrap_or("Exact");
            if kind != "Exact" {
                return Err((
                    format!("{f}.type"),
                    format!("{kind:?}: only Exact gRPC method matches are supported"),
                ));
            }
            m["path"] = match (method["service"].as_str(), method["method"].as_str()) {
                (Some(s), Some(n)) => json!({"type": "Exact", "value": format!("/{s}/{n}")}),
                (Some(s), None) => json!({"type": "PathPrefix", "value": format!("/{s}")}),
                (None, Some(_)) => {
                    return Err((
                        format!("{f}.service"),
                        "a method of any service needs a regular expression, which is not \
                         supported"
                            .into(),
                    ));
                }
                (None, None) => continue,
            };
        }
    }
    Ok(spec)
}

fn translate_route(
    obj: &SpecObject,
    mut spec: Value,
    ours: &[Value],
    resolver: &Resolver,
) -> Result<HttpRoute, (String, String)> {
    let ns = namespace_of(obj);
    // Only this waypoint's parents, without the core group the config does not spell.
    spec["parentRefs"] = Value::Array(ours.iter().map(without_core_group).collect());
    for rule in spec["rules"].as_array_mut().into_iter().flatten() {
        if let Some(r) = rule.as_object_mut() {
            // A rule's name (Gateway API 1.2) only labels it.
            r.remove("name");
        }
        for b in rule["backendRefs"].as_array_mut().into_iter().flatten() {
            *b = without_core_group(b);
        }
    }
    let spec: RouteSpec = serde_path_to_error::deserialize(spec)
        .map_err(|e| (format!("spec.{}", e.path()), e.into_inner().to_string()))?;
    let mut route = HttpRoute {
        name: obj.metadata.name.clone(),
        namespace: Some(ns.to_owned()),
        parent_refs: spec.parent_refs,
        hostnames: spec.hostnames,
        rules: spec.rules,
    };
    super::config::validate_route(&mut route, "spec", ns, resolver)?;
    Ok(route)
}

/// `r` without `group` when it is the core group (`""`), which Service references carry.
fn without_core_group(r: &Value) -> Value {
    let mut r = r.clone();
    if let Some(o) = r.as_object_mut()
        && o.get("group").and_then(Value::as_str) == Some("")
    {
        o.remove("group");
    }
    r
}

/// The part of an `AuthorizationPolicy` spec the waypoint enforces.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    target_refs: Vec<ServiceRef>,
    #[serde(default)]
    action: Action,
    #[serde(default)]
    rules: Vec<L7Rule>,
}

fn policy(
    me: &Waypoint,
    cluster: &Cluster,
    resolver: &Resolver,
    obj: &SpecObject,
    out: &mut Derived,
) {
    let ns = namespace_of(obj);
    let what = format!("AuthorizationPolicy {}", obj.key());
    let targets: Vec<&Value> = match (&obj.spec["targetRefs"], &obj.spec["targetRef"]) {
        (Value::Array(t), _) => t.iter().collect(),
        (_, t @ Value::Object(_)) => vec![t],
        // A selector or namespace-wide policy: the node agents enforce it.
        _ => return,
    };
    let ours: Vec<(&str, &str)> = targets
        .iter()
        .filter_map(|t| {
            let (group, kind) = (t["group"].as_str().unwrap_or(""), t["kind"].as_str()?);
            let name = t["name"].as_str()?;
            let mine = match kind {
                "Gateway" => group == GATEWAY_GROUP && name == me.name && ns == me.namespace,
                "Service" => matches!(group, "" | "core") && cluster.uses(me, ns, name),
                _ => false,
            };
            mine.then_some((kind, name))
        })
        .collect();
    if ours.is_empty() {
        out.notes.insert(
            what,
            "ignored: it targets neither this waypoint nor a Service that uses it".to_owned(),
        );
        return;
    }
    if me
        .authorization
        .iter()
        .any(|p| p.name == obj.metadata.name && p.namespace.as_deref() == Some(ns))
    {
        out.notes.insert(
            what,
            "ignored: a policy of this name is in the waypoint's config file, which wins".into(),
        );
        return;
    }
    let refs: Vec<Value> = ours
        .iter()
        .map(|(kind, name)| json!({"kind": kind, "name": name}))
        .collect();
    match translate_policy(obj, &refs, &me.name, resolver) {
        Ok(p) => out.authorization.push(p),
        Err((field, why)) => {
            // Fail closed: what cannot be enforced as written denies rather than allows.
            let action = obj.spec["action"].as_str().unwrap_or("ALLOW");
            let (action, rules, effect) = match action {
                "ALLOW" => (Action::Allow, Vec::new(), "allows no request"),
                "AUDIT" => {
                    out.notes
                        .insert(what, format!("ignored (AUDIT): {field}: {why}"));
                    return;
                }
                _ => (
                    Action::Deny,
                    vec![L7Rule::default()],
                    "denies every request",
                ),
            };
            let mut target_refs: Vec<ServiceRef> = ours
                .iter()
                .map(|(kind, name)| ServiceRef {
                    kind: Some((*kind).to_owned()),
                    name: (*name).to_owned(),
                    namespace: None,
                    port: None,
                    weight: None,
                    service: None,
                })
                .collect();
            for (i, t) in target_refs.iter_mut().enumerate() {
                if t.kind.as_deref() == Some("Service")
                    && let Err((f, e)) = resolver.resolve(&format!("targetRefs[{i}]"), t, ns)
                {
                    warn!(policy = %what, field = f, error = e, "cannot resolve a target");
                }
            }
            out.notes.insert(
                what,
                format!(
                    "cannot be enforced as written ({field}: {why}); it {effect} it targets \
                     instead"
                ),
            );
            out.authorization.push(L7Policy {
                name: obj.metadata.name.clone(),
                namespace: Some(ns.to_owned()),
                target_refs,
                action,
                rules,
            });
        }
    }
}

fn translate_policy(
    obj: &SpecObject,
    refs: &[Value],
    waypoint: &str,
    resolver: &Resolver,
) -> Result<L7Policy, (String, String)> {
    let ns = namespace_of(obj);
    let mut spec = obj.spec.clone();
    if let Some(o) = spec.as_object_mut() {
        o.remove("targetRef");
        o.insert("targetRefs".into(), Value::Array(refs.to_vec()));
    }
    let spec: PolicySpec = serde_path_to_error::deserialize(spec)
        .map_err(|e| (format!("spec.{}", e.path()), e.into_inner().to_string()))?;
    if spec.action == Action::Audit {
        return Err((
            "spec.action".into(),
            "AUDIT takes no part in decisions".into(),
        ));
    }
    let mut p = L7Policy {
        name: obj.metadata.name.clone(),
        namespace: Some(ns.to_owned()),
        target_refs: spec.target_refs,
        action: spec.action,
        rules: spec.rules,
    };
    super::config::validate_policy(&mut p, "spec", ns, waypoint, resolver)?;
    Ok(p)
}

/// `conditions` with their `lastTransitionTime`: kept from `before` for a condition whose
/// status did not change, `stamp` otherwise.
fn timed(conditions: &Value, before: Option<&Value>, stamp: &str) -> Value {
    let mut conditions = conditions.clone();
    for c in conditions.as_array_mut().into_iter().flatten() {
        let kept = before
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .find(|old| old["type"] == c["type"] && old["status"] == c["status"])
            .and_then(|old| old.get("lastTransitionTime").cloned());
        c["lastTransitionTime"] = kept.unwrap_or_else(|| json!(stamp));
    }
    conditions
}

/// `v` without the `lastTransitionTime` of its `conditions`.
fn without_time(v: &Value) -> Value {
    let mut v = v.clone();
    for c in v["conditions"].as_array_mut().into_iter().flatten() {
        if let Some(o) = c.as_object_mut() {
            o.remove("lastTransitionTime");
        }
    }
    v
}

/// The merge patch that makes `route`'s `status.parents` hold `ours` (keeping other
/// controllers' entries, and the transition time of conditions whose status did not change),
/// or `None` when it already does.
pub fn status_patch(route: &SpecObject, ours: &[Value], now: SystemTime) -> Option<Value> {
    let existing: Vec<&Value> = route.status["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    let mine_before: Vec<&Value> = existing
        .iter()
        .copied()
        .filter(|p| p["controllerName"] == CONTROLLER)
        .collect();
    let same = mine_before.len() == ours.len()
        && mine_before
            .iter()
            .zip(ours)
            .all(|(a, b)| without_time(a) == *b);
    if same {
        return None;
    }
    let stamp = crate::identity::manager::rfc3339(now);
    let ours = ours.iter().map(|p| {
        let mut p = p.clone();
        let before = mine_before
            .iter()
            .find(|b| b["parentRef"] == p["parentRef"])
            .map(|b| &b["conditions"]);
        p["conditions"] = timed(&p["conditions"], before, &stamp);
        p
    });
    let parents: Vec<Value> = existing
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER)
        .map(|p| (*p).clone())
        .chain(ours)
        .collect();
    Some(json!({"status": {"parents": parents}}))
}

/// The merge patch that gives `gateway` the status `want` (see [`Derived::gateway_status`]), or
/// `None` when it has it.
pub fn gateway_patch(gateway: &SpecObject, want: &Value, now: SystemTime) -> Option<Value> {
    let have = json!({
        "addresses": gateway.status.get("addresses").cloned().unwrap_or(json!([])),
        "conditions": gateway.status.get("conditions").cloned().unwrap_or(json!([])),
    });
    if without_time(&have) == *want {
        return None;
    }
    let stamp = crate::identity::manager::rfc3339(now);
    let conditions = timed(&want["conditions"], Some(&have["conditions"]), &stamp);
    Some(json!({"status": {"addresses": want["addresses"], "conditions": conditions}}))
}

/// The settings the waypoint serves with: the file's, plus what the cluster adds.
pub fn merged(file: &Waypoint, derived: &Derived) -> Waypoint {
    let mut w = file.clone();
    w.routes.extend(derived.routes.iter().cloned());
    w.authorization
        .extend(derived.authorization.iter().cloned());
    w.service_outlier_detection = derived.outlier_detection.clone();
    w
}

/// Follows the cluster until `shutdown`: the settings from `file` plus the derived routes and
/// policies go to `apply`, and route statuses to the API server. `waiting` holds why requests
/// cannot be served yet; it is cleared once every list has been read.
pub async fn run(
    client: Client,
    mut file: watch::Receiver<Arc<Waypoint>>,
    services: Arc<Vec<crate::config::Service>>,
    xds: bool,
    apply: impl Fn(Waypoint) + Send + 'static,
    waiting: Arc<arc_swap::ArcSwapOption<String>>,
    shutdown: CancellationToken,
) {
    let tasks = tokio_util::task::TaskTracker::new();
    let mut ns_rx = follow::<NamespaceObject>(&tasks, &client, "/api/v1/namespaces", &shutdown);
    let mut svc_rx = follow::<ServiceObject>(&tasks, &client, "/api/v1/services", &shutdown);
    let mut route_rx = follow::<SpecObject>(&tasks, &client, ROUTES, &shutdown);
    let mut grpc_rx = follow::<SpecObject>(&tasks, &client, GRPC_ROUTES, &shutdown);
    let mut pol_rx = follow::<SpecObject>(&tasks, &client, POLICIES, &shutdown);
    let mut gw_rx = follow::<SpecObject>(&tasks, &client, GATEWAYS, &shutdown);
    let mut dr_rx = follow::<SpecObject>(&tasks, &client, DESTINATION_RULES, &shutdown);
    tasks.close();
    let mut notes = BTreeMap::new();
    let mut applied: Option<Waypoint> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = ns_rx.changed() => if r.is_err() { break },
            r = svc_rx.changed() => if r.is_err() { break },
            r = route_rx.changed() => if r.is_err() { break },
            r = grpc_rx.changed() => if r.is_err() { break },
            r = pol_rx.changed() => if r.is_err() { break },
            r = gw_rx.changed() => if r.is_err() { break },
            r = dr_rx.changed() => if r.is_err() { break },
            r = file.changed() => if r.is_err() { break },
        }
        let (Some(n), Some(s), Some(r), Some(gr), Some(p), Some(g), Some(d)) = (
            ns_rx.borrow_and_update().clone(),
            svc_rx.borrow_and_update().clone(),
            route_rx.borrow_and_update().clone(),
            grpc_rx.borrow_and_update().clone(),
            pol_rx.borrow_and_update().clone(),
            gw_rx.borrow_and_update().clone(),
            dr_rx.borrow_and_update().clone(),
        ) else {
            continue;
        };
        let file = file.borrow_and_update().clone();
        let own_gateway = format!("{}/{}", file.namespace, file.name);
        let cluster = Cluster {
            namespaces: n
                .items
                .values()
                .map(|o| (o.metadata.name.clone(), o.metadata.labels.clone()))
                .collect(),
            services: s
                .items
                .iter()
                .map(|(k, o)| (k.clone(), o.metadata.labels.clone()))
                .collect(),
            routes: r.items.values().cloned().collect(),
            grpc_routes: gr.items.values().cloned().collect(),
            policies: p.items.values().cloned().collect(),
            destination_rules: d.items.values().cloned().collect(),
            gateway: g.items.get(&own_gateway).cloned(),
        };
        let resolver = Resolver {
            services: &services,
            xds,
        };
        let derived = derive(&file, &cluster, &resolver);
        for (object, why) in &derived.notes {
            if notes.get(object) != Some(why) {
                info!(object, "{why}");
            }
        }
        for (object, why) in r
            .unreadable
            .iter()
            .chain(&gr.unreadable)
            .chain(&p.unreadable)
            .chain(&g.unreadable)
            .chain(&d.unreadable)
        {
            warn!(object, error = ?why.error, "cannot read this object from the Kubernetes API");
        }
        // Most watch events (a Service's labels, an unrelated route) change nothing here.
        let next = merged(&file, &derived);
        if applied.as_ref() != Some(&next) {
            info!(
                routes = derived.routes.len(),
                policies = derived.authorization.len(),
                noted = derived.notes.len(),
                "waypoint config from the cluster applied"
            );
            applied = Some(next.clone());
            apply(next);
        }
        if waiting.load().is_some() {
            waiting.store(None);
            info!("the waypoint read its routes and policies from the Kubernetes API");
        }
        notes = derived.notes.clone();
        let routes = cluster
            .routes
            .iter()
            .map(|r| (RouteKind::Http, r, &derived.statuses))
            .chain(
                cluster
                    .grpc_routes
                    .iter()
                    .map(|r| (RouteKind::Grpc, r, &derived.grpc_statuses)),
            );
        for (kind, route, statuses) in routes {
            let Some(ours) = statuses.get(&route.key()) else {
                continue;
            };
            let Some(patch) = status_patch(route, ours, SystemTime::now()) else {
                continue;
            };
            let path = format!(
                "/apis/gateway.networking.k8s.io/v1/namespaces/{}/{}/{}/status",
                namespace_of(route),
                kind.plural(),
                route.metadata.name
            );
            if let Err(e) = client.merge_patch(&path, &patch).await {
                warn!(route = %route.key(), error = %e, "cannot write the route's status");
            }
        }
        if let (Some(gateway), Some(want)) = (&cluster.gateway, &derived.gateway_status)
            && let Some(patch) = gateway_patch(gateway, want, SystemTime::now())
        {
            let path = format!(
                "/apis/gateway.networking.k8s.io/v1/namespaces/{}/gateways/{}/status",
                file.namespace, file.name
            );
            match client.merge_patch(&path, &patch).await {
                Ok(()) => {
                    info!(gateway = own_gateway, status = %patch["status"], "Gateway programmed")
                }
                Err(e) => {
                    warn!(gateway = own_gateway, error = %e, "cannot write the Gateway's status")
                }
            }
        }
    }
    tasks.wait().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn me() -> Waypoint {
        serde_norway::from_str("namespace: default\nname: waypoint\n").expect("waypoint")
    }

    fn object(kind_ns_name: (&str, &str), spec: Value) -> SpecObject {
        serde_json::from_value(json!({
            "metadata": {"namespace": kind_ns_name.0, "name": kind_ns_name.1, "generation": 3},
            "spec": spec,
        }))
        .expect("object")
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// `echo` uses the waypoint by its own label, `web` by its namespace's, `other` none, and
    /// `away` opts out of its namespace's.
    fn cluster() -> Cluster {
        Cluster {
            namespaces: BTreeMap::from([
                ("default".into(), Labels::new()),
                (
                    "shop".into(),
                    labels(&[
                        (USE_WAYPOINT, "waypoint"),
                        (USE_WAYPOINT_NAMESPACE, "default"),
                    ]),
                ),
            ]),
            services: BTreeMap::from([
                ("default/echo".into(), labels(&[(USE_WAYPOINT, "waypoint")])),
                ("default/echo-v2".into(), Labels::new()),
                ("default/other".into(), Labels::new()),
                ("shop/web".into(), Labels::new()),
                ("shop/away".into(), labels(&[(USE_WAYPOINT, "none")])),
            ]),
            ..Cluster::default()
        }
    }

    const RESOLVER: Resolver<'static> = Resolver {
        services: &[],
        xds: true,
    };

    fn split_to(parent: &str, extra_rule: Value) -> Value {
        let mut rule = json!({"backendRefs": [
            {"group": "", "kind": "Service", "name": "echo-v2", "port": 80, "weight": 1}]});
        if let (Some(r), Some(e)) = (rule.as_object_mut(), extra_rule.as_object()) {
            r.extend(e.clone());
        }
        json!({"parentRefs": [{"group": "", "kind": "Service", "name": parent}],
               "rules": [rule]})
    }

    #[test]
    fn services_bind_by_their_label_or_their_namespace_s() {
        let (mut c, me) = (cluster(), me());
        // Services of every namespace may attach (the default is the waypoint's own only).
        c.gateway = Some(gateway(
            json!({"allowedRoutes": {"namespaces": {"from": "All"}}}),
            "ambit-waypoint",
        ));
        assert!(c.uses(&me, "default", "echo"));
        assert!(
            c.uses(&me, "shop", "web"),
            "the namespace label, waypoint in default"
        );
        assert!(!c.uses(&me, "default", "other"));
        assert!(!c.uses(&me, "shop", "away"), "`none` opts out");
        assert!(!c.uses(&me, "default", "missing"));
        let mut other = me.clone();
        other.namespace = "shop".into();
        assert!(
            !c.uses(&other, "default", "echo"),
            "same name, other namespace"
        );
    }

    #[test]
    fn a_route_of_a_bound_service_applies_and_is_accepted_others_are_ignored() {
        let mut c = cluster();
        c.routes = vec![
            object(("default", "split"), split_to("echo", json!({}))),
            object(("default", "not-mine"), split_to("other", json!({}))),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        assert_eq!(d.routes.len(), 1);
        assert_eq!(d.routes[0].name, "split");
        assert_eq!(
            d.routes[0].parent_refs[0].service.as_deref(),
            Some("default/echo.default.svc.cluster.local")
        );
        let status = &d.statuses["default/split"];
        assert_eq!(status.len(), 1);
        assert_eq!(status[0]["controllerName"], CONTROLLER);
        assert_eq!(status[0]["conditions"][0]["type"], "Accepted");
        assert_eq!(status[0]["conditions"][0]["status"], "True");
        assert_eq!(status[0]["conditions"][0]["observedGeneration"], 3);
        assert_eq!(status[0]["conditions"][1]["status"], "True");
        assert!(
            !d.statuses.contains_key("default/not-mine"),
            "no status for others' routes"
        );
        let note = &d.notes["HTTPRoute default/not-mine"];
        assert!(note.contains("Service default/other"), "{note}");
    }

    #[test]
    fn an_unsupported_field_rejects_that_route_alone_naming_the_field() {
        let mut c = cluster();
        c.routes = vec![
            object(
                ("default", "filtered"),
                split_to(
                    "echo",
                    json!({"filters": [{"type": "RequestHeaderModifier"}]}),
                ),
            ),
            object(("default", "split"), split_to("echo", json!({}))),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        assert_eq!(d.routes.len(), 1, "the good route still applies");
        let accepted = &d.statuses["default/filtered"][0]["conditions"][0];
        assert_eq!(accepted["status"], "False");
        assert_eq!(accepted["reason"], "UnsupportedValue");
        let message = accepted["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("spec.rules[0]") && message.contains("filters"),
            "{message}"
        );
    }

    #[test]
    fn a_missing_backend_service_is_not_resolved() {
        let mut c = cluster();
        let mut spec = split_to("echo", json!({}));
        spec["rules"][0]["backendRefs"][0]["name"] = json!("gone");
        c.routes = vec![object(("default", "split"), spec)];
        let d = derive(&me(), &c, &RESOLVER);
        let resolved = &d.statuses["default/split"][0]["conditions"][1];
        assert_eq!(resolved["status"], "False");
        assert_eq!(resolved["reason"], "BackendNotFound");
        assert!(
            resolved["message"]
                .as_str()
                .unwrap_or_default()
                .contains("default/gone")
        );
    }

    fn deny(targets: Value, rules: Value) -> Value {
        json!({"targetRefs": targets, "action": "DENY", "rules": rules})
    }

    /// `targetRefs` naming this waypoint's Gateway.
    fn to_the_waypoint() -> Value {
        json!([{"group": GATEWAY_GROUP, "kind": "Gateway", "name": "waypoint"}])
    }

    #[test]
    fn policies_targeting_the_waypoint_or_its_services_apply_others_do_not() {
        let mut c = cluster();
        let gateway = to_the_waypoint();
        let paths = json!([{"to": [{"operation": {"paths": ["/admin"]}}]}]);
        c.policies = vec![
            object(
                ("default", "deny-admin"),
                deny(gateway.clone(), paths.clone()),
            ),
            object(
                ("default", "deny-echo"),
                deny(
                    json!([{"kind": "Service", "group": "", "name": "echo"}]),
                    paths.clone(),
                ),
            ),
            object(
                ("default", "elsewhere"),
                deny(
                    json!([{"kind": "Service", "group": "", "name": "other"}]),
                    paths.clone(),
                ),
            ),
            object(("other", "other-gw"), deny(gateway, paths)),
            object(
                ("default", "selector"),
                json!({"selector": {"matchLabels": {"app": "x"}}}),
            ),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        let names: Vec<&str> = d.authorization.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["deny-admin", "deny-echo"]);
        assert_eq!(
            d.authorization[0].target_refs[0].kind.as_deref(),
            Some("Gateway")
        );
        assert!(
            d.notes
                .contains_key("AuthorizationPolicy default/elsewhere")
        );
        assert!(d.notes.contains_key("AuthorizationPolicy other/other-gw"));
        assert!(
            !d.notes.contains_key("AuthorizationPolicy default/selector"),
            "node agents' policies are not the waypoint's business"
        );
    }

    #[test]
    fn a_policy_it_cannot_enforce_fails_closed() {
        let mut c = cluster();
        let gateway = to_the_waypoint();
        let unknown = json!([{"from": [{"source": {"requestPrincipals": ["*"]}}]}]);
        c.policies = vec![
            object(
                ("default", "deny-jwt"),
                deny(gateway.clone(), unknown.clone()),
            ),
            object(
                ("default", "allow-jwt"),
                json!({"targetRefs": gateway.clone(), "action": "ALLOW", "rules": unknown}),
            ),
            object(
                ("default", "ext"),
                json!({"targetRefs": gateway, "action": "CUSTOM", "provider": {"name": "x"}}),
            ),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        let by_name = |n: &str| {
            d.authorization
                .iter()
                .find(|p| p.name == n)
                .unwrap_or_else(|| panic!("{n} is enforced"))
        };
        let deny_jwt = by_name("deny-jwt");
        assert_eq!(deny_jwt.action, Action::Deny);
        assert_eq!(
            deny_jwt.rules,
            vec![L7Rule::default()],
            "a rule matching everything"
        );
        let allow_jwt = by_name("allow-jwt");
        assert_eq!(allow_jwt.action, Action::Allow);
        assert!(allow_jwt.rules.is_empty(), "an ALLOW that matches nothing");
        assert_eq!(by_name("ext").action, Action::Deny);
        let note = &d.notes["AuthorizationPolicy default/deny-jwt"];
        assert!(
            note.contains("requestPrincipals") && note.contains("denies every request"),
            "{note}"
        );
    }

    #[test]
    fn status_is_written_only_when_it_changes_and_keeps_other_controllers_entries() {
        let mut c = cluster();
        c.routes = vec![object(("default", "split"), split_to("echo", json!({})))];
        let d = derive(&me(), &c, &RESOLVER);
        let ours = &d.statuses["default/split"];
        let mut route = c.routes[0].clone();
        route.status = json!({"parents": [{"controllerName": "istio.io/mesh-controller",
                                           "parentRef": {"name": "echo"}, "conditions": []}]});
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let patch = status_patch(&route, ours, t0).expect("a first status");
        let parents = patch["status"]["parents"].as_array().expect("parents");
        assert_eq!(parents.len(), 2);
        assert_eq!(parents[0]["controllerName"], "istio.io/mesh-controller");
        assert_eq!(
            parents[1]["conditions"][0]["lastTransitionTime"],
            crate::identity::manager::rfc3339(t0)
        );
        route.status = patch["status"].clone();
        assert_eq!(
            status_patch(&route, ours, t0 + Duration::from_secs(60)),
            None,
            "nothing changed: no write (a write would come back as a watch event)"
        );
    }

    fn gateway(listener_extra: Value, class: &str) -> SpecObject {
        let mut listener = json!({"name": "mesh", "port": 15008, "protocol": "HBONE"});
        if let (Some(l), Some(e)) = (listener.as_object_mut(), listener_extra.as_object()) {
            l.extend(e.clone());
        }
        object(
            ("default", "waypoint"),
            json!({"gatewayClassName": class, "listeners": [listener]}),
        )
    }

    #[test]
    fn services_of_other_namespaces_attach_only_as_the_gateway_allows() {
        let mut c = cluster();
        let me = me();
        c.gateway = Some(gateway(json!({}), "ambit-waypoint"));
        assert!(c.uses(&me, "default", "echo"));
        assert!(
            !c.uses(&me, "shop", "web"),
            "allowedRoutes defaults to Same"
        );
        c.gateway = Some(gateway(
            json!({"allowedRoutes": {"namespaces": {"from": "All"}}}),
            "ambit-waypoint",
        ));
        assert!(c.uses(&me, "shop", "web"));
        c.namespaces
            .get_mut("shop")
            .expect("shop")
            .insert("team".into(), "a".into());
        c.gateway = Some(gateway(
            json!({"allowedRoutes": {"namespaces": {"from": "Selector",
                                                    "selector": {"matchLabels": {"team": "a"}}}}}),
            "ambit-waypoint",
        ));
        assert!(c.uses(&me, "shop", "web"));
        c.gateway = Some(gateway(
            json!({"allowedRoutes": {"namespaces": {"from": "Selector",
                                                    "selector": {"matchExpressions": []}}}}),
            "ambit-waypoint",
        ));
        assert!(
            !c.uses(&me, "shop", "web"),
            "what it cannot evaluate does not attach"
        );
    }

    #[test]
    fn its_gateway_gets_the_service_hostname_once_and_another_class_is_left_alone() {
        let mut c = cluster();
        c.gateway = Some(gateway(json!({}), "ambit-waypoint"));
        let d = derive(&me(), &c, &RESOLVER);
        let want = d.gateway_status.expect("a status");
        assert_eq!(
            want["addresses"],
            json!([]),
            "no Service named waypoint yet"
        );
        assert_eq!(want["conditions"][1]["reason"], "AddressNotAssigned");

        c.services.insert("default/waypoint".into(), Labels::new());
        let d = derive(&me(), &c, &RESOLVER);
        let want = d.gateway_status.expect("a status");
        assert_eq!(
            want["addresses"],
            json!([{"type": "Hostname", "value": "waypoint.default.svc.cluster.local"}])
        );
        assert_eq!(want["conditions"][1]["status"], "True");
        let mut gw = c.gateway.clone().expect("gateway");
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let patch = gateway_patch(&gw, &want, t0).expect("first write");
        gw.status = patch["status"].clone();
        assert_eq!(gateway_patch(&gw, &want, t0), None, "written once");

        c.gateway = Some(gateway(json!({}), "istio-waypoint"));
        let d = derive(&me(), &c, &RESOLVER);
        assert_eq!(d.gateway_status, None);
        assert!(d.notes["Gateway default/waypoint"].contains("istio-waypoint"));
    }

    #[test]
    fn a_destination_rule_s_outlier_detection_applies_to_its_service_only() {
        let mut c = cluster();
        let dr = |name: &str, host: &str| {
            object(
                ("default", name),
                json!({"host": host, "trafficPolicy": {"outlierDetection": {
                    "consecutive5xxErrors": 2, "baseEjectionTime": "10s", "interval": "5s"}}}),
            )
        };
        c.destination_rules = vec![
            dr("echo", "echo.default.svc.cluster.local"),
            dr("other", "other"),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        let key = "default/echo.default.svc.cluster.local";
        assert_eq!(d.outlier_detection.len(), 1, "{:?}", d.outlier_detection);
        let od = &d.outlier_detection[key];
        assert_eq!(od.consecutive_5xx_errors, 2);
        assert_eq!(od.base_ejection_time.duration(), Duration::from_secs(10));
        assert_eq!(
            od.max_ejection_percent,
            OutlierDetection::default().max_ejection_percent
        );
        assert!(d.notes["DestinationRule default/echo"].contains("interval"));
        let w = merged(&me(), &d);
        assert_eq!(w.outlier_detection_for(Some(key)).consecutive_5xx_errors, 2);
        assert_eq!(
            w.outlier_detection_for(Some("default/other.default.svc.cluster.local")),
            &w.outlier_detection
        );
    }

    #[test]
    fn a_grpc_route_routes_by_method_as_the_path_grpc_sends_it_in() {
        let mut c = cluster();
        let grpc = |name: &str, method: Value| {
            object(
                ("default", name),
                json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                       "rules": [{"matches": [{"method": method}],
                                  "backendRefs": [{"group": "", "kind": "Service",
                                                   "name": "echo-v2", "port": 80}]}]}),
            )
        };
        c.grpc_routes = vec![
            grpc("one", json!({"service": "echo.Echo", "method": "Say"})),
            grpc("all", json!({"type": "Exact", "service": "echo.Echo"})),
            grpc(
                "regex",
                json!({"type": "RegularExpression", "service": "echo.*"}),
            ),
            grpc("any-service", json!({"method": "Say"})),
        ];
        let d = derive(&me(), &c, &RESOLVER);
        let path = |name: &str| {
            let r = d.routes.iter().find(|r| r.name == name).expect(name);
            let p = r.rules[0].matches[0].path.clone().expect("a path match");
            (p.kind, p.value)
        };
        assert_eq!(
            path("one"),
            ("Exact".to_owned(), "/echo.Echo/Say".to_owned())
        );
        assert_eq!(
            path("all"),
            ("PathPrefix".to_owned(), "/echo.Echo".to_owned())
        );
        for refused in ["regex", "any-service"] {
            let accepted = &d.grpc_statuses[&format!("default/{refused}")][0]["conditions"][0];
            assert_eq!(accepted["status"], "False", "{refused}: {accepted}");
            let message = accepted["message"].as_str().unwrap_or_default();
            assert!(
                message.contains("spec.rules[0].matches[0].method"),
                "{message}"
            );
        }
        assert!(d.notes.contains_key("GRPCRoute default/regex"));
        assert!(
            d.statuses.is_empty(),
            "GRPCRoute status is written as a GRPCRoute's"
        );
    }
}
