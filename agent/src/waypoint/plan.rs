//! What a request becomes before anything is sent: the route rule it matches, the backend
//! service and port, the endpoints it may go to and what their port speaks, its retry policy
//! and timeout; or the local answer that refuses it (404 `NR` when attached routes do not
//! match, 503 `UH` when nothing can serve it). Pure: the routes and the state snapshot in, a
//! decision out, so every refusal is unit-tested here.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use http::{HeaderMap, StatusCode};

use super::{
    config::{HttpRoute, Retry},
    routes::{self, Selection},
};
use crate::{
    config::AppProtocol,
    state::{Snapshot, Workload},
};

/// A request answered by the waypoint itself: its status, Envoy-style response flags and body.
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: StatusCode,
    pub flags: &'static str,
    pub body: String,
}

impl Refusal {
    pub fn new(status: StatusCode, flags: &'static str, body: String) -> Refusal {
        Refusal {
            status,
            flags,
            body,
        }
    }
}

/// Where the tunnel the request came in on goes.
#[derive(Clone, Copy)]
pub struct Destination<'a> {
    /// The service's `namespace/hostname` when the tunnel was opened to a service VIP.
    pub service: Option<&'a str>,
    /// The workload when it was opened to a workload address.
    pub workload: Option<&'a Arc<Workload>>,
    /// The `CONNECT` authority.
    pub addr: SocketAddr,
}

/// The parts of a request routing reads (the path already normalized).
pub struct RequestLine<'a> {
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// A request that can be sent.
#[derive(Debug)]
pub struct Plan {
    pub port: u16,
    /// What the backend's port speaks, when istiod (`app_protocol`) or the config says.
    pub declared: Option<AppProtocol>,
    /// The endpoints to choose from (healthy, of the destination's address family).
    pub candidates: Vec<(Arc<Workload>, SocketAddr)>,
    pub retry: Retry,
    pub timeout: Option<Duration>,
}

/// The decision, with what was decided before a refusal (for the access log).
pub struct Planned {
    /// `namespace/name#rule` of the matching route rule.
    pub route: Option<String>,
    /// The backend service's key.
    pub backend: Option<String>,
    pub result: Result<Plan, Refusal>,
}

/// Routes `request` arriving for `to` over `routes`, against the state in `snapshot`.
pub fn plan(
    routes: &[HttpRoute],
    snapshot: &Snapshot,
    to: Destination<'_>,
    request: &RequestLine<'_>,
) -> Planned {
    let mut planned = Planned {
        route: None,
        backend: None,
        result: Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            String::new(),
        )),
    };
    let selection = routes::select(
        routes,
        to.service,
        to.addr.port(),
        request.host,
        request.method,
        request.path,
        request.headers,
    );
    let (backend, port, retry, timeout) = match selection {
        Selection::NoMatch { routes } => {
            planned.result = Err(Refusal::new(
                StatusCode::NOT_FOUND,
                "NR",
                format!(
                    "no rule of route {} matches {} {}\n",
                    routes.join(", "),
                    request.method,
                    request.path
                ),
            ));
            return planned;
        }
        Selection::Direct => (
            to.service.map(str::to_owned),
            to.addr.port(),
            Retry::default(),
            None,
        ),
        Selection::Rule { route, index, rule } => {
            planned.route = Some(format!("{route}#{index}"));
            let Some(backend) = routes::pick_backend(rule) else {
                planned.result = Err(Refusal::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UH",
                    "the route has no backend with weight\n".into(),
                ));
                return planned;
            };
            (
                Some(backend.service_key().to_owned()),
                backend.port.unwrap_or(to.addr.port()),
                rule.retry.clone().unwrap_or_default(),
                rule.timeouts.request.map(|d| d.duration()),
            )
        }
    };
    let service = backend.as_deref().and_then(|k| snapshot.service(k));
    let declared = service
        .and_then(|s| s.def.as_ref())
        .and_then(|d| d.protocol(port));
    let candidates: Vec<_> = match (service, &backend, to.workload) {
        (Some(svc), _, _) => svc.candidates(to.addr.ip(), port).collect(),
        (None, None, Some(w)) => vec![(w.clone(), to.addr)],
        _ => Vec::new(),
    };
    planned.result = if candidates.is_empty() {
        Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UH",
            format!(
                "no healthy endpoint for {} port {port}\n",
                backend.as_deref().unwrap_or("the destination")
            ),
        ))
    } else {
        Ok(Plan {
            port,
            declared,
            candidates,
            retry,
            timeout,
        })
    };
    planned.backend = backend;
    planned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const ECHO: &str = "default/echo.default.svc.cluster.local";

    /// `echo` (10.96.0.20) with one endpoint on 10.2.0.5:8080, `empty` with none.
    fn snapshot() -> Snapshot {
        let config = Config::parse(
            "node: n\ncgroup: /x\n\
peers:
  - {namespace: default, name: v1, serviceAccount: echo, ips: [10.2.0.5], services: [default/echo]}
services:
  - {namespace: default, name: echo, vips: [10.96.0.20], ports: [{port: 80, targetPort: 8080}]}
  - {namespace: default, name: empty, vips: [10.96.0.21], ports: [{port: 80, targetPort: 8080}]}
",
            std::path::Path::new("t.yaml"),
        )
        .expect("config");
        Snapshot::from_config(&config)
    }

    fn routes(yaml: &str) -> Vec<HttpRoute> {
        let mut rs: Vec<HttpRoute> = serde_norway::from_str(yaml).expect("routes yaml");
        for r in &mut rs {
            r.namespace = Some("default".into());
            for p in r
                .parent_refs
                .iter_mut()
                .chain(r.rules.iter_mut().flat_map(|x| x.backend_refs.iter_mut()))
            {
                p.service = Some(format!("default/{}.default.svc.cluster.local", p.name));
            }
        }
        rs
    }

    fn to_echo() -> Destination<'static> {
        Destination {
            service: Some(ECHO),
            workload: None,
            addr: "10.96.0.20:80".parse().expect("addr"),
        }
    }

    fn get(path: &str) -> (HeaderMap, String) {
        (HeaderMap::new(), path.to_owned())
    }

    fn run(routes: &[HttpRoute], to: Destination<'_>, path: &str) -> Planned {
        let (headers, path) = get(path);
        plan(
            routes,
            &snapshot(),
            to,
            &RequestLine {
                host: "echo.default.svc.cluster.local",
                method: "GET",
                path: &path,
                headers: &headers,
            },
        )
    }

    #[test]
    fn without_routes_the_request_goes_to_the_dialed_service_s_endpoints() {
        let p = run(&[], to_echo(), "/");
        assert_eq!(p.route, None);
        assert_eq!(p.backend.as_deref(), Some(ECHO));
        let plan = p.result.expect("a plan");
        let addrs: Vec<SocketAddr> = plan.candidates.iter().map(|(_, a)| *a).collect();
        assert_eq!(
            addrs,
            ["10.2.0.5:8080".parse::<SocketAddr>().expect("addr")]
        );
        assert_eq!(plan.retry.attempts, Retry::default().attempts);
        assert_eq!(plan.timeout, None);
    }

    #[test]
    fn attached_routes_that_do_not_match_answer_404_nr() {
        let rs = routes(
            "- name: only-api\n  parentRefs: [{name: echo}]\n  rules:\n  - matches: [{path: {type: PathPrefix, value: /api}}]\n    backendRefs: [{name: echo}]\n",
        );
        let p = run(&rs, to_echo(), "/other");
        let refusal = p.result.expect_err("refused");
        assert_eq!(
            (refusal.status, refusal.flags),
            (StatusCode::NOT_FOUND, "NR")
        );
        assert!(
            refusal.body.contains("default/only-api"),
            "{}",
            refusal.body
        );
    }

    #[test]
    fn a_matching_rule_names_itself_and_takes_its_backend_retry_and_timeout() {
        let rs = routes(
            "- name: to-empty\n  parentRefs: [{name: echo}]\n  rules:\n  - backendRefs: [{name: echo, port: 80}]\n    timeouts: {request: 2s}\n    retry: {attempts: 4}\n",
        );
        let p = run(&rs, to_echo(), "/");
        assert_eq!(p.route.as_deref(), Some("default/to-empty#0"));
        let plan = p.result.expect("a plan");
        assert_eq!(plan.timeout, Some(Duration::from_secs(2)));
        assert_eq!(plan.retry.attempts, 4);
    }

    #[test]
    fn a_backend_without_healthy_endpoints_or_weight_answers_503_uh_after_naming_the_route() {
        let rs = routes(
            "- name: to-empty\n  parentRefs: [{name: echo}]\n  rules:\n  - backendRefs: [{name: empty}]\n",
        );
        let p = run(&rs, to_echo(), "/");
        assert_eq!(p.route.as_deref(), Some("default/to-empty#0"));
        assert_eq!(
            p.backend.as_deref(),
            Some("default/empty.default.svc.cluster.local")
        );
        let refusal = p.result.expect_err("refused");
        assert_eq!(
            (refusal.status, refusal.flags),
            (StatusCode::SERVICE_UNAVAILABLE, "UH")
        );
        assert!(
            refusal.body.contains("no healthy endpoint"),
            "{}",
            refusal.body
        );

        let rs = routes(
            "- name: weightless\n  parentRefs: [{name: echo}]\n  rules:\n  - backendRefs: [{name: echo, weight: 0}]\n",
        );
        let p = run(&rs, to_echo(), "/");
        assert_eq!(p.route.as_deref(), Some("default/weightless#0"));
        assert_eq!(p.backend, None);
        assert_eq!(
            p.result.expect_err("refused").body,
            "the route has no backend with weight\n"
        );
    }

    #[test]
    fn a_tunnel_to_a_workload_goes_to_that_workload_only() {
        let snap = snapshot();
        let w = snap
            .by_ip("10.2.0.5".parse().expect("ip"))
            .expect("v1")
            .clone();
        let to = Destination {
            service: None,
            workload: Some(&w),
            addr: "10.2.0.5:8080".parse().expect("addr"),
        };
        let p = run(&[], to, "/");
        assert_eq!(p.backend, None);
        let plan = p.result.expect("a plan");
        assert_eq!(plan.candidates.len(), 1);
        assert_eq!(plan.candidates[0].1, to.addr);
    }
}
