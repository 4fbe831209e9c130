//! `GET /explain`: what would happen to a new connection from a source to `ip:port`, computed
//! with the functions the data path runs for a real one: capture (the pod is enrolled, the port
//! not excluded), [`route`] (service VIP, endpoint, HBONE or passthrough) and
//! [`ProxyContext::decide`](crate::proxy::ProxyContext::decide) (authorization at the
//! destination).

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use super::{Admin, api};
use crate::policy::Decision;
use crate::{
    addrs::OrigDstAddr,
    identity::Identity,
    proxy::outbound::{Pick, route},
    state::{Snapshot, Workload},
};

type ApiResult<T> = Result<T, (u16, String)>;

/// The source as the operator named it.
struct Source {
    shown: String,
    ip: Option<IpAddr>,
    workload: Option<Arc<Workload>>,
}

/// The source as named: an IP, `namespace/name`, a pod name, or a SPIFFE id (its address is the
/// one of `dst`'s family, as the data path's).
fn resolve_source(snapshot: &Snapshot, src: &str, dst: IpAddr) -> ApiResult<Source> {
    if let Ok(ip) = src.parse::<IpAddr>() {
        let workload = snapshot.by_ip(ip).cloned();
        return Ok(Source {
            shown: workload
                .as_ref()
                .map_or_else(|| ip.to_string(), |w| w.display_name()),
            ip: Some(ip.to_canonical()),
            workload,
        });
    }
    // A pod both in the config and from xDS is one workload: the config's (as the data path).
    let one = |w: &&Arc<Workload>| snapshot.merged_into(w).is_none();
    let candidates: Vec<Arc<Workload>> = if src.starts_with("spiffe://") {
        let id: Identity = src.parse().map_err(|e| (400, format!("{e}")))?;
        snapshot
            .by_identity(&id)
            .iter()
            .filter(one)
            .cloned()
            .collect()
    } else if let Some((ns, name)) = src.split_once('/') {
        snapshot
            .workloads()
            .filter(|w| &*w.namespace == ns && w.name() == name)
            .filter(one)
            .cloned()
            .collect()
    } else {
        snapshot
            .workloads()
            .filter(|w| w.name() == src)
            .filter(one)
            .cloned()
            .collect()
    };
    // Local workloads first: they are the ones this agent captures.
    let mut candidates = candidates;
    candidates.sort_by_key(|w| (!w.local, w.display_name()));
    match candidates.as_slice() {
        [] => Err((
            404,
            format!(
                "no workload {src:?} is known to this agent (give a pod as namespace/name, an IP \
                 or a SPIFFE id; `ambitctl workloads` lists them)"
            ),
        )),
        // Several pods with one name: ambiguous, unless exactly one of them is on this node.
        // (An identity naming several pods is fine: they share it.)
        [first, second, ..] if !src.starts_with("spiffe://") && (!first.local || second.local) => {
            Err((
                400,
                format!(
                    "{src:?} is ambiguous: {}; name it as namespace/name or by IP",
                    candidates
                        .iter()
                        .map(|w| w.display_name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ))
        }
        [first, ..] => Ok(Source {
            shown: first.display_name(),
            ip: first
                .ips()
                .iter()
                .find(|ip| ip.is_ipv4() == dst.is_ipv4())
                .or(first.ips().first())
                .copied(),
            workload: Some(first.clone()),
        }),
    }
}

pub(super) fn explain(admin: &Admin, src: &str, dst: &str) -> ApiResult<api::Explain> {
    let dst: SocketAddr = dst.parse().map_err(|_| {
        (
            400,
            format!("destination {dst:?} is not ip:port (IPv6 as [addr]:port)"),
        )
    })?;
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let snapshot = admin.ctx.workloads.snapshot();
    let config = admin.config.load();
    let pods = admin.pods.load();
    let source = resolve_source(&snapshot, src, dst.ip())?;
    let mut steps = Vec::new();
    let mut out = api::Explain {
        src: source.shown.clone(),
        src_ip: source.ip.map(|ip| ip.to_string()),
        src_identity: source.workload.as_ref().map(|w| w.identity.to_string()),
        dst: dst.to_string(),
        captured: false,
        service: None,
        endpoint: None,
        dst_workload: None,
        dst_identity: None,
        path: String::new(),
        authorization: None,
        verdict: "allow".to_owned(),
        steps: Vec::new(),
    };

    // 1. Capture: the connect hook redirects enrolled pods' connections, unless the port is
    //    excluded.
    let enrolled = source.workload.as_ref().is_some_and(|w| {
        let key = format!("{}/{}", w.namespace, w.name());
        w.local && pods.enrolled.iter().any(|p| p.key == key)
    });
    out.captured = enrolled && !config.outbound_excluded_ports.contains(&dst.port());
    steps.push(match (&source.workload, enrolled) {
        (Some(w), true) if out.captured => format!(
            "{} is enrolled on this node: its connection is captured by the connect hook and \
             proxied as {}",
            w.display_name(),
            w.identity
        ),
        (Some(_), true) => format!(
            "destination port {} is in outboundExcludedPorts: not captured, the pod connects \
             directly",
            dst.port()
        ),
        (Some(w), false) if w.local => format!(
            "{} is on this node but not enrolled: its traffic is not captured",
            w.display_name()
        ),
        (Some(w), false) => format!(
            "{} is not on this node (node {:?}): this agent does not capture it; its own \
             node's agent would",
            w.display_name(),
            w.node
        ),
        (None, _) => "the source is not a known workload: not captured".to_owned(),
    });

    let src_addr = SocketAddr::new(source.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])), 0);
    if out.captured {
        // 2. Routing, exactly as the outbound proxy does (without moving the round robin).
        let r = match route(
            &snapshot,
            source.ip.unwrap_or(IpAddr::from([0, 0, 0, 0])),
            OrigDstAddr(dst),
            Pick::Peek,
        ) {
            Ok(r) => r,
            Err(e) => {
                out.service = Some(e.service().to_owned());
                out.path = "refused".to_owned();
                out.verdict = "deny".to_owned();
                steps.push(format!("refused by the source's agent: {e}"));
                out.steps = steps;
                return Ok(out);
            }
        };
        if let Some(hop) = &r.waypoint {
            out.service = r.service.as_ref().map(|s| s.key.to_string());
            out.dst_workload = r.workload.as_ref().map(|w| w.display_name());
            out.dst_identity = Some(hop.identity.to_string());
            out.path = "waypoint".to_owned();
            steps.push(format!(
                "{} has a waypoint: tunnelled over HBONE (mTLS) to waypoint {} at {}, expecting \
                 identity {}, asking it for {}; the waypoint applies L7 policy and picks the \
                 endpoint",
                out.service
                    .as_deref()
                    .or(out.dst_workload.as_deref())
                    .unwrap_or("the destination"),
                hop.name,
                hop.addr,
                hop.identity,
                hop.authority
            ));
            out.steps = steps;
            return Ok(out);
        }
        if let Some(svc) = &r.service {
            out.service = Some(svc.key.to_string());
            out.endpoint = Some(r.endpoint.0.to_string());
            steps.push(match &r.locality {
                Some(why) => format!(
                    "{dst} is a VIP of service {}: the next connection goes to endpoint {}, \
                     chosen by locality: {why} (round robin among the best of {} endpoints)",
                    svc.key,
                    r.endpoint.0,
                    svc.endpoints.len()
                ),
                None => format!(
                    "{dst} is a VIP of service {}: the next connection goes to endpoint {} ({} \
                     endpoints, round robin)",
                    svc.key,
                    r.endpoint.0,
                    svc.endpoints.len()
                ),
            });
        }
        out.dst_workload = r.workload.as_ref().map(|w| w.display_name());
        out.dst_identity = r.workload.as_ref().map(|w| w.identity.to_string());
        match &r.workload {
            Some(w) if r.hbone => {
                out.path = "hbone".to_owned();
                steps.push(format!(
                    "{} is a mesh workload: tunnelled over HBONE (mTLS) to {}:15008, expecting \
                     identity {}",
                    w.display_name(),
                    r.endpoint.0.ip(),
                    w.identity
                ));
                let src_identity = source.workload.as_ref().map(|w| w.identity.clone());
                let d = admin.ctx.decide(
                    &snapshot,
                    src_identity.as_ref(),
                    src_addr,
                    r.endpoint.0,
                    w.identity.namespace(),
                );
                authorize(&mut out, &mut steps, d, w);
            }
            Some(w) => {
                out.path = "passthrough".to_owned();
                steps.push(format!(
                    "{} is not in the mesh (not enrolled): plaintext passthrough, no \
                     authorization by Ambit",
                    w.display_name()
                ));
            }
            None => {
                out.path = "passthrough".to_owned();
                steps.push(format!(
                    "{} is not a known workload: plaintext passthrough",
                    r.endpoint.0
                ));
            }
        }
    } else {
        // Not captured at the source: it reaches the destination as plaintext; a mesh
        // destination's agent captures it on arrival and judges it without an identity.
        out.path = "direct".to_owned();
        if let Some(svc) = snapshot.service_by_vip(dst.ip()) {
            out.service = Some(svc.key.to_string());
            steps.push(format!(
                "{dst} is a VIP of service {}, but the connection is not captured: Ambit does \
                 not load-balance it",
                svc.key
            ));
        }
        let target = snapshot.by_ip(dst.ip()).cloned();
        out.dst_workload = target.as_ref().map(|w| w.display_name());
        out.dst_identity = target.as_ref().map(|w| w.identity.to_string());
        let bypass = crate::proxy::ProxyContext::bypasses_waypoint(&snapshot, dst, None);
        match &target {
            Some(w) if w.hbone && bypass.is_some() => {
                out.verdict = "deny".to_owned();
                steps.push(format!(
                    "refused by the destination's agent: {}",
                    bypass.unwrap_or_default()
                ));
            }
            Some(w) if w.hbone => {
                let excluded = config.inbound_excluded_ports.contains(&dst.port())
                    || source.ip.is_some_and(crate::redirect::is_probe_source);
                if excluded && w.local {
                    steps.push(
                        "the destination pod's agent does not capture it (inbound excluded port \
                         or a kubelet probe): delivered as is"
                            .to_owned(),
                    );
                } else {
                    steps.push(format!(
                        "{} is in the mesh: its agent captures the plaintext connection and \
                         judges it with no client identity",
                        w.display_name()
                    ));
                    let d =
                        admin
                            .ctx
                            .decide(&snapshot, None, src_addr, dst, w.identity.namespace());
                    authorize(&mut out, &mut steps, d, w);
                }
            }
            _ => steps.push("the destination is not in the mesh: no policy applies".to_owned()),
        }
    }
    out.steps = steps;
    Ok(out)
}

/// Reports the destination's authorization decision `d` (made by the code that enforces it).
fn authorize(
    out: &mut api::Explain,
    steps: &mut Vec<String>,
    d: Decision,
    dst_workload: &Workload,
) {
    steps.push(format!(
        "authorization at {}: {}",
        dst_workload.display_name(),
        d
    ));
    for hit in &d.dry_run {
        steps.push(format!("(dry run) {}", hit.describe()));
    }
    out.verdict = if d.allowed { "allow" } else { "deny" }.to_owned();
    out.authorization = Some(api::ExplainAuthz {
        allowed: d.allowed,
        policy: d.policy.clone(),
        rule: d.rule,
        reason: d.describe(),
        dry_run: d.dry_run.iter().map(|h| h.describe()).collect(),
    });
}
