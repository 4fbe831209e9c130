//! The waypoint's Prometheus metrics: Istio's request metrics (`istio_requests_total`,
//! `istio_request_duration_milliseconds`) with `reporter="waypoint"` and the labels Istio's
//! dashboards query, and its own (`ambit_waypoint_*`): retries, ejections, denials.

use std::{collections::HashMap, sync::Mutex};

use crate::metrics::{Exposition, SERIES_TTL, Series, lock, owned};

/// Istio's default request-duration buckets, in milliseconds.
const BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The labels of one request's metrics; `unknown` where the waypoint does not know.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestLabels {
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Envoy's short flags: `-`, `UF` (upstream connect failure), `UH` (no healthy upstream),
    /// `UT` (timeout), `NR` (no route), `URX` (retries exhausted), `UC` (upstream reset), `DC`
    /// (the client went away before the response; code 0).
    pub response_flags: &'static str,
}

#[derive(Default)]
struct Histogram {
    count: u64,
    sum_ms: f64,
    /// Per bucket (not cumulative); the encoder makes them cumulative.
    buckets: [u64; BUCKETS_MS.len()],
}

/// Shared as `Arc<WaypointMetrics>`. Request label sets idle for [`SERIES_TTL`] expire.
pub struct WaypointMetrics {
    requests: Mutex<Series<RequestLabels, Histogram>>,
    counters: Mutex<Counters>,
}

impl Default for WaypointMetrics {
    fn default() -> Self {
        WaypointMetrics {
            requests: Mutex::new(Series::new(SERIES_TTL)),
            counters: Mutex::default(),
        }
    }
}

#[derive(Default)]
struct Counters {
    retries: u64,
    ejections: u64,
    denials: HashMap<String, u64>,
}

/// Read at scrape time.
#[derive(Default)]
pub struct Gauges {
    pub ejected_endpoints: usize,
    pub pool_connections_opened: u64,
    pub pool_streams_opened: u64,
    pub pool_open_connections: usize,
}

impl WaypointMetrics {
    /// One finished request.
    pub fn request(&self, labels: RequestLabels, duration_ms: f64) {
        let mut requests = lock(&self.requests);
        let h = requests.touch(&labels);
        h.count += 1;
        h.sum_ms += duration_ms;
        if let Some(i) = BUCKETS_MS.iter().position(|b| duration_ms <= *b) {
            h.buckets[i] += 1;
        }
    }

    pub fn retried(&self) {
        lock(&self.counters).retries += 1;
    }

    pub fn ejected(&self) {
        lock(&self.counters).ejections += 1;
    }

    /// A request denied by `policy` (`none` when no ALLOW policy matched).
    pub fn denied(&self, policy: &str) {
        *lock(&self.counters)
            .denials
            .entry(policy.to_owned())
            .or_default() += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut e = Exposition::default();
        {
            let mut requests = lock(&self.requests);
            requests.expire(|_| false);
            let mut rows: Vec<(&RequestLabels, &Histogram)> = requests.iter().collect();
            rows.sort_by(|a, b| a.0.cmp(b.0));
            let f = e.counters("istio_requests", "Requests handled by the waypoint.");
            for (l, h) in &rows {
                let code = l.response_code.to_string();
                f.counter(owned(&pairs(l, &code)), h.count);
            }
            let f = e.histograms(
                "istio_request_duration_milliseconds",
                "Time from the request's arrival to the end of its response, in milliseconds.",
            );
            for (l, h) in &rows {
                let code = l.response_code.to_string();
                let buckets = BUCKETS_MS.iter().copied().zip(h.buckets.iter().copied());
                f.histogram(owned(&pairs(l, &code)), h.sum_ms, h.count, buckets);
            }
        }
        let c = lock(&self.counters);
        e.counter(
            "ambit_waypoint_retries",
            "Requests sent again after a failed try.",
            c.retries,
        );
        e.counter(
            "ambit_waypoint_ejections",
            "Endpoints ejected by outlier detection.",
            c.ejections,
        );
        let f = e.counters(
            "ambit_waypoint_denied_requests",
            "Requests refused with 403 by L7 authorization, by deciding policy.",
        );
        let mut denials: Vec<_> = c.denials.iter().collect();
        denials.sort();
        for (policy, n) in denials {
            f.counter(vec![("policy", policy.clone())], *n);
        }
        drop(c);
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        e.gauge(
            "ambit_waypoint_ejected_endpoints",
            "Endpoints currently skipped by outlier detection.",
            count(g.ejected_endpoints),
        );
        e.counter(
            "ambit_hbone_pool_connections_opened",
            "Upstream HBONE connections opened.",
            g.pool_connections_opened,
        );
        e.counter(
            "ambit_hbone_pool_streams_opened",
            "Upstream HBONE streams opened.",
            g.pool_streams_opened,
        );
        e.gauge(
            "ambit_hbone_pool_open_connections",
            "Upstream HBONE connections open now.",
            count(g.pool_open_connections),
        );
        e.text()
    }
}

fn pairs<'a>(l: &'a RequestLabels, code: &'a str) -> [(&'static str, &'a str); 15] {
    [
        ("reporter", "waypoint"),
        ("source_workload", &l.source_workload),
        ("source_workload_namespace", &l.source_workload_namespace),
        ("source_principal", &l.source_principal),
        ("destination_workload", &l.destination_workload),
        (
            "destination_workload_namespace",
            &l.destination_workload_namespace,
        ),
        ("destination_principal", &l.destination_principal),
        ("destination_service", &l.destination_service),
        ("destination_service_name", &l.destination_service_name),
        (
            "destination_service_namespace",
            &l.destination_service_namespace,
        ),
        ("request_protocol", l.request_protocol),
        ("response_code", code),
        ("response_flags", l.response_flags),
        ("connection_security_policy", "mutual_tls"),
        ("destination_canonical_service", &l.destination_service_name),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counts_and_cumulative_buckets() {
        let m = WaypointMetrics::default();
        let labels = RequestLabels {
            source_workload: "client".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            destination_workload: "echo-v1".into(),
            destination_workload_namespace: "default".into(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/echo".into(),
            destination_service: "echo.default.svc.cluster.local".into(),
            destination_service_name: "echo".into(),
            destination_service_namespace: "default".into(),
            request_protocol: "http",
            response_code: 200,
            response_flags: "-",
        };
        m.request(labels.clone(), 3.0);
        m.request(labels, 40.0);
        let out = m.render(&Gauges {
            ejected_endpoints: 0,
            pool_connections_opened: 1,
            pool_streams_opened: 2,
            pool_open_connections: 1,
        });
        let line = |prefix: &str, suffix: &str| {
            out.lines()
                .find(|l| l.starts_with(prefix) && l.contains(suffix))
                .unwrap_or_else(|| panic!("no {prefix}..{suffix} in\n{out}"))
                .to_owned()
        };
        assert!(line("istio_requests_total{", "response_code=\"200\"").ends_with(" 2"));
        let bucket = "istio_request_duration_milliseconds_bucket{";
        assert!(line(bucket, "le=\"1.0\"").ends_with(" 0"));
        assert!(line(bucket, "le=\"5.0\"").ends_with(" 1"));
        assert!(line(bucket, "le=\"50.0\"").ends_with(" 2"));
        assert!(line(bucket, "le=\"+Inf\"").ends_with(" 2"));
        assert!(line("istio_request_duration_milliseconds_sum{", "").ends_with(" 43.0"));
        assert!(line("istio_request_duration_milliseconds_count{", "").ends_with(" 2"));
        assert!(out.contains("# TYPE istio_request_duration_milliseconds histogram\n"));
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
