//! Which route rule a request takes, with the Gateway API's precedence: among the routes attached
//! to the destination Service (and its port) whose hostnames match, the most specific match wins:
//! the route whose matching hostname is exact, then the longest wildcard, then an exact path, the
//! longest path prefix, a method, the most header matches, then the order in the config. Then one backend is picked by weight.

use http::HeaderMap;

use super::config::{HttpRoute, PathMatch, RouteMatch, RouteRule, ServiceRef};

/// Where a request goes.
#[derive(Debug)]
pub enum Selection<'a> {
    /// No route is attached to the destination: it goes where the client sent it.
    Direct,
    /// Routes are attached but none matches: 404, as the Gateway API says.
    NoMatch { routes: Vec<String> },
    Rule {
        /// `namespace/name` of the route.
        route: String,
        index: usize,
        rule: &'a RouteRule,
    },
}

/// The rule `routes` give a request to `service` (`namespace/hostname`, when a VIP was dialed)
/// on `port`.
#[allow(clippy::too_many_arguments)]
pub fn select<'a>(
    routes: &'a [HttpRoute],
    service: Option<&str>,
    port: u16,
    host: &str,
    method: &str,
    path: &str,
    headers: &HeaderMap,
) -> Selection<'a> {
    let Some(service) = service else {
        return Selection::Direct;
    };
    let attached: Vec<&HttpRoute> = routes
        .iter()
        .filter(|r| {
            r.parent_refs
                .iter()
                .any(|p| p.service_key() == service && p.port.is_none_or(|p| p == port))
        })
        .collect();
    if attached.is_empty() {
        return Selection::Direct;
    }
    let mut best: Option<((HostRank, Rank), &HttpRoute, usize)> = None;
    for route in &attached {
        // How specifically the route names this host: exact (2), by wildcard (1), any (0).
        let host_rank = if route.hostnames.is_empty() {
            (0, 0)
        } else {
            match route
                .hostnames
                .iter()
                .filter(|h| host_matches(h, host))
                .map(|h| (if h.starts_with('*') { 1 } else { 2 }, h.len()))
                .max()
            {
                Some(r) => r,
                None => continue,
            }
        };
        for (i, rule) in route.rules.iter().enumerate() {
            let default = [RouteMatch::default()];
            let matches: &[RouteMatch] = if rule.matches.is_empty() {
                &default
            } else {
                &rule.matches
            };
            for m in matches {
                if !match_applies(m, method, path, headers) {
                    continue;
                }
                let rank = (host_rank, specificity(m));
                // Strictly better only: earlier routes and rules win ties.
                if best.as_ref().is_none_or(|(b, _, _)| rank > *b) {
                    best = Some((rank, route, i));
                }
            }
        }
    }
    match best {
        Some((_, route, index)) => Selection::Rule {
            route: format!(
                "{}/{}",
                route.namespace.as_deref().unwrap_or_default(),
                route.name
            ),
            index,
            rule: &route.rules[index],
        },
        None => Selection::NoMatch {
            routes: attached
                .iter()
                .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or_default(), r.name))
                .collect(),
        },
    }
}

/// How specifically a route names the request's host: exact (2), by wildcard (1), any (0), then
/// the length of the name.
type HostRank = (u8, usize);

/// How specific a match is: path kind (2 exact, 1 prefix), prefix length, has a method, header
/// matches. Compared as a tuple.
type Rank = (u8, usize, bool, usize);

fn specificity(m: &RouteMatch) -> Rank {
    let (kind, len) = match &m.path {
        Some(p) if p.kind == "Exact" => (2, p.value.len()),
        Some(p) => (1, p.value.trim_end_matches('/').len()),
        None => (1, 0),
    };
    (kind, len, m.method.is_some(), m.headers.len())
}

fn match_applies(m: &RouteMatch, method: &str, path: &str, headers: &HeaderMap) -> bool {
    m.path.as_ref().is_none_or(|p| path_matches(p, path))
        && m.method.as_deref().is_none_or(|x| x == method)
        && m.headers.iter().all(|h| {
            headers
                .get_all(h.name.as_str())
                .iter()
                .any(|v| v.as_bytes() == h.value.as_bytes())
        })
}

/// `PathPrefix` matches whole segments: `/api` matches `/api` and `/api/x`, not `/apix`.
fn path_matches(m: &PathMatch, path: &str) -> bool {
    if m.kind == "Exact" {
        return path == m.value;
    }
    let prefix = m.value.trim_end_matches('/');
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.is_empty(),
        None => false,
    }
}

/// `*.example.com` matches one or more labels before `.example.com`.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host.len() > suffix.len() && host.ends_with(suffix),
        None => pattern == host,
    }
}

/// A backend of `rule`, picked at random in proportion to the weights (default 1 each).
pub fn pick_backend(rule: &RouteRule) -> Option<&ServiceRef> {
    let weight = |b: &ServiceRef| u64::from(b.weight.unwrap_or(1));
    let total: u64 = rule.backend_refs.iter().map(weight).sum();
    if total == 0 {
        return None;
    }
    let mut n = fastrand::u64(0..total);
    for b in &rule.backend_refs {
        if n < weight(b) {
            return Some(b);
        }
        n -= weight(b);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

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

    const SVC: Option<&str> = Some("default/echo.default.svc.cluster.local");

    fn rule_of(s: Selection<'_>) -> Option<usize> {
        match s {
            Selection::Rule { index, .. } => Some(index),
            _ => None,
        }
    }

    #[test]
    fn the_most_specific_match_wins() {
        let rs = routes(
            r#"
- name: echo
  parentRefs: [{name: echo}]
  rules:
  - matches: [{path: {value: /}}]
    backendRefs: [{name: v1}]
  - matches: [{path: {value: /api}}]
    backendRefs: [{name: v2}]
  - matches: [{path: {type: Exact, value: /api/exact}}]
    backendRefs: [{name: v3}]
  - matches: [{path: {value: /api}, headers: [{name: x-canary, value: "1"}]}]
    backendRefs: [{name: v4}]
"#,
        );
        let h = HeaderMap::new();
        let pick =
            |path: &str, h: &HeaderMap| rule_of(select(&rs, SVC, 80, "echo", "GET", path, h));
        assert_eq!(pick("/", &h), Some(0));
        assert_eq!(pick("/apix", &h), Some(0), "prefixes match whole segments");
        assert_eq!(pick("/api", &h), Some(1));
        assert_eq!(pick("/api/x", &h), Some(1));
        assert_eq!(pick("/api/exact", &h), Some(2));
        let mut canary = HeaderMap::new();
        canary.insert("x-canary", "1".parse().expect("value"));
        assert_eq!(pick("/api/x", &canary), Some(3));
        // Another service has no routes: direct.
        assert!(matches!(
            select(&rs, Some("default/other"), 80, "x", "GET", "/", &h),
            Selection::Direct
        ));
    }

    #[test]
    fn hostnames_and_ports_limit_a_route() {
        let rs = routes(
            r#"
- name: echo
  parentRefs: [{name: echo, port: 80}]
  hostnames: ["*.example.com"]
  rules:
  - backendRefs: [{name: v1}]
"#,
        );
        let h = HeaderMap::new();
        assert_eq!(
            rule_of(select(&rs, SVC, 80, "a.example.com", "GET", "/", &h)),
            Some(0)
        );
        assert!(matches!(
            select(&rs, SVC, 80, "example.com", "GET", "/", &h),
            Selection::NoMatch { .. }
        ));
        assert!(matches!(
            select(&rs, SVC, 8080, "a.example.com", "GET", "/", &h),
            Selection::Direct
        ));
    }

    #[test]
    fn an_exact_hostname_beats_a_wildcard_and_any() {
        let rs = routes(
            r#"
- name: any
  parentRefs: [{name: echo}]
  rules: [{matches: [{path: {type: Exact, value: /x}}], backendRefs: [{name: v1}]}]
- name: wild
  parentRefs: [{name: echo}]
  hostnames: ["*.example.com"]
  rules: [{backendRefs: [{name: v2}]}]
- name: exact
  parentRefs: [{name: echo}]
  hostnames: ["a.example.com"]
  rules: [{backendRefs: [{name: v3}]}]
"#,
        );
        let h = HeaderMap::new();
        let route_of = |host: &str| match select(&rs, SVC, 80, host, "GET", "/x", &h) {
            Selection::Rule { route, .. } => route,
            other => panic!("{other:?}"),
        };
        assert_eq!(route_of("a.example.com"), "default/exact");
        assert_eq!(route_of("b.example.com"), "default/wild");
        assert_eq!(route_of("other"), "default/any");
    }

    #[test]
    fn backends_are_picked_by_weight() {
        let rs = routes(
            r#"
- name: split
  parentRefs: [{name: echo}]
  rules:
  - backendRefs: [{name: v1, weight: 90}, {name: v2, weight: 10}, {name: off, weight: 0}]
"#,
        );
        let rule = &rs[0].rules[0];
        let mut v1 = 0;
        for _ in 0..10_000 {
            match pick_backend(rule).map(|b| b.name.as_str()) {
                Some("v1") => v1 += 1,
                Some("v2") => {}
                other => panic!("picked {other:?}"),
            }
        }
        assert!((8_700..=9_300).contains(&v1), "{v1} of 10000 to v1");
    }
}
