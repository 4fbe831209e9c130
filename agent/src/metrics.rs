//! Prometheus metrics (`GET /metrics`, port 15020 by default), in the OpenMetrics text format
//! written by prometheus-client (as ztunnel's).
//!
//! Istio's TCP metrics, with the labels Istio's dashboards query, reported once per connection
//! by the agent that proxied it (`reporter="source"` outbound, `"destination"` inbound):
//! `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//! `istio_tcp_sent_bytes_total` (bytes the destination sent back: Istio's "response" bytes) and
//! `istio_tcp_received_bytes_total` (bytes the source sent: "request" bytes). Byte counters move
//! when a connection closes.
//!
//! Ambit's own (`ambit_*`): authorization denials by policy, enrolled pods, the eBPF programs'
//! counters, certificate expiry, xDS pushes and NACKs, HBONE pool connections and streams, open
//! connections. Labels name workloads, namespaces, identities and policies, never connections,
//! so cardinality is bounded by the mesh's size; and a label set idle for [`SERIES_TTL`] (no
//! connection open, none opened or closed) is dropped, so peers that came and went do not
//! accumulate ([`Series`]; `ambit_metric_series_expired_total` counts them). Prometheus reads a
//! series that reappears later as a counter reset, which `rate()` handles.

use std::{
    collections::{BTreeMap, HashMap},
    hash::Hash,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, MetricEncoder, NoLabelSet},
    metrics::MetricType,
    registry::Registry,
};

/// How long a label set may stay idle before it is dropped.
pub const SERIES_TTL: Duration = Duration::from_secs(10 * 60);

/// Label sets and their values, each with when it last changed. Idle ones expire.
pub(crate) struct Series<K, V> {
    map: HashMap<K, (V, Instant)>,
    ttl: Duration,
    expired: u64,
}

impl<K: Hash + Eq + Clone, V: Default> Series<K, V> {
    pub(crate) fn new(ttl: Duration) -> Self {
        Series {
            map: HashMap::new(),
            ttl,
            expired: 0,
        }
    }

    /// The value of `key` (created at its default), marked as changed now.
    pub(crate) fn touch(&mut self, key: &K) -> &mut V {
        let now = Instant::now();
        if !self.map.contains_key(key) {
            self.map.insert(key.clone(), (V::default(), now));
        }
        let slot = self
            .map
            .get_mut(key)
            .expect("BUG: the entry was inserted above");
        slot.1 = now;
        &mut slot.0
    }

    /// Drops the series unchanged for the TTL, except those `in_use` says are still live.
    pub(crate) fn expire(&mut self, in_use: impl Fn(&V) -> bool) {
        let (ttl, before) = (self.ttl, self.map.len());
        self.map
            .retain(|_, (v, at)| in_use(v) || at.elapsed() < ttl);
        self.expired += (before - self.map.len()) as u64;
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.map.iter().map(|(k, (v, _))| (k, v))
    }

    /// Series dropped so far.
    pub(crate) fn expired(&self) -> u64 {
        self.expired
    }
}

/// One side of a connection in Istio's TCP metrics; `unknown` where the agent does not know
/// (as Istio reports).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerLabels {
    /// Istio's `workload`: the owner's name (a Deployment), else the pod's.
    pub workload: String,
    pub namespace: String,
    pub principal: String,
    /// The canonical service and revision; Istio's `app` and `version` labels carry the same
    /// values, as ztunnel reports them.
    pub canonical_service: String,
    pub canonical_revision: String,
    pub cluster: String,
}

impl PeerLabels {
    pub fn unknown() -> PeerLabels {
        let u = || "unknown".to_owned();
        PeerLabels {
            workload: u(),
            namespace: u(),
            principal: u(),
            canonical_service: u(),
            canonical_revision: u(),
            cluster: u(),
        }
    }
}

/// The labels of Istio's TCP metrics, with the names and in the order ztunnel reports them, so
/// Istio's dashboards and Kiali group Ambit's and ztunnel's nodes alike.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TcpLabels {
    /// `source` (outbound, the client's agent) or `destination` (inbound).
    pub reporter: &'static str,
    pub source: PeerLabels,
    pub destination: PeerLabels,
    /// The service's hostname, name and namespace when a VIP was dialed (or, inbound, the
    /// service the tunnel named), else `unknown`.
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// `-`, or `DENY` (authorization), `CONNECT` (the destination could not be reached), as
    /// ztunnel's flags; set when the connection ends.
    pub response_flags: &'static str,
    /// `mutual_tls` (HBONE), else `unknown` as ztunnel reports plaintext.
    pub connection_security_policy: &'static str,
}

impl TcpLabels {
    fn pairs(&self) -> [(&'static str, &str); 23] {
        let (s, d) = (&self.source, &self.destination);
        [
            ("reporter", self.reporter),
            ("source_workload", &s.workload),
            ("source_canonical_service", &s.canonical_service),
            ("source_canonical_revision", &s.canonical_revision),
            ("source_workload_namespace", &s.namespace),
            ("source_principal", &s.principal),
            ("source_app", &s.canonical_service),
            ("source_version", &s.canonical_revision),
            ("source_cluster", &s.cluster),
            ("destination_service", &self.destination_service),
            (
                "destination_service_namespace",
                &self.destination_service_namespace,
            ),
            ("destination_service_name", &self.destination_service_name),
            ("destination_workload", &d.workload),
            ("destination_canonical_service", &d.canonical_service),
            ("destination_canonical_revision", &d.canonical_revision),
            ("destination_workload_namespace", &d.namespace),
            ("destination_principal", &d.principal),
            ("destination_app", &d.canonical_service),
            ("destination_version", &d.canonical_revision),
            ("destination_cluster", &d.cluster),
            ("request_protocol", "tcp"),
            ("response_flags", self.response_flags),
            (
                "connection_security_policy",
                self.connection_security_policy,
            ),
        ]
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct TcpCounts {
    opened: u64,
    closed: u64,
    /// Connections opened with these labels and not closed yet (the series is in use).
    open: u64,
    /// Source to destination ("received" in Istio's terms).
    request_bytes: u64,
    /// Destination to source ("sent").
    response_bytes: u64,
}

/// The agent's counters. Shared as `Arc<Metrics>`; every update is one short lock.
pub struct Metrics {
    tcp: Mutex<Series<TcpLabels, TcpCounts>>,
    /// Denials by `(direction, policy)`; the policy is `none` when no ALLOW policy matched.
    denials: Mutex<BTreeMap<(&'static str, String), u64>>,
    /// Connections refused by a limit or a missing state, by `(direction, reason)`.
    refusals: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// The DNS proxy's.
    pub dns: DnsMetrics,
}

/// Upper bounds (seconds) of the upstream latency histogram.
const BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

/// The DNS proxy's counters (see [`crate::proxy::dns`]).
#[derive(Default)]
pub struct DnsMetrics {
    pub(crate) requests: AtomicU64,
    /// By outcome: answered from the mesh, forwarded, malformed, over the limit.
    pub(crate) mesh: AtomicU64,
    pub(crate) forwarded: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) limited: AtomicU64,
    pub(crate) upstream_failures: AtomicU64,
    /// Upstream latency: (sum of seconds, count, per-bucket counts).
    upstream: Mutex<(f64, u64, [u64; BUCKETS.len()])>,
}

impl DnsMetrics {
    pub(crate) fn upstream_answered(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let mut h = self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        h.0 += secs;
        h.1 += 1;
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.2[i] += 1;
        }
    }

    /// Adds the DNS families to `e` (as ztunnel names them, plus Ambit's outcomes).
    pub(crate) fn render(&self, e: &mut Exposition) {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        e.counter(
            "istio_dns_requests",
            "DNS queries the proxy received from pods",
            n(&self.requests),
        );
        e.counter(
            "istio_dns_upstream_requests",
            "DNS queries forwarded to the pod's resolver",
            n(&self.forwarded),
        );
        e.counter(
            "istio_dns_upstream_failures",
            "Forwarded DNS queries the resolver did not answer in time (the pod got SERVFAIL)",
            n(&self.upstream_failures),
        );
        let f = e.counters(
            "ambit_dns_requests",
            "DNS queries by outcome: answered from the mesh, forwarded, malformed (FORMERR), over the in-flight limit (SERVFAIL)",
        );
        for (outcome, c) in [
            ("mesh", &self.mesh),
            ("forwarded", &self.forwarded),
            ("malformed", &self.malformed),
            ("limit", &self.limited),
        ] {
            let labels: Labels = vec![("outcome", outcome.to_owned())];
            f.counter(labels, n(c));
        }
        let (sum, count, buckets) = *self.upstream.lock().unwrap_or_else(|p| p.into_inner());
        e.histograms(
            "istio_dns_upstream_request_duration_seconds",
            "How long the pod's resolver took to answer a forwarded DNS query",
        )
        .histogram(Vec::new(), sum, count, BUCKETS.iter().copied().zip(buckets));
    }
}

/// Values read from the rest of the agent when scraped.
#[derive(Default)]
pub struct Gauges {
    pub enrolled_pods: usize,
    /// The eBPF programs' counters (summed over CPUs), by name.
    pub bpf: BTreeMap<String, u64>,
    /// `(identity, seconds since the epoch when its certificate expires)`.
    pub cert_expiry: Vec<(String, i64)>,
    /// The xDS client's counters, when xDS is configured.
    pub xds: Option<crate::xds::XdsStatus>,
    pub pool_connections_opened: u64,
    pub pool_streams_opened: u64,
    pub pool_open_connections: usize,
    pub open_connections: usize,
    /// Connections waiting for the control plane's first full state.
    pub held_connections: usize,
    pub workloads: usize,
    pub services: usize,
    pub policies: usize,
    /// Kubernetes objects the agent cannot read (their pods are not captured).
    pub kube_unreadable: usize,
    /// The same-node splice, when the kernel has it and it is on.
    pub splice: Option<crate::redirect::SpliceStats>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::with_series_ttl(SERIES_TTL)
    }
}

impl Metrics {
    /// Label sets idle for `ttl` expire (see [`SERIES_TTL`]).
    pub fn with_series_ttl(ttl: Duration) -> Metrics {
        Metrics {
            tcp: Mutex::new(Series::new(ttl)),
            denials: Mutex::default(),
            refusals: Mutex::default(),
            dns: Default::default(),
        }
    }

    pub fn tcp_opened(&self, labels: &TcpLabels) {
        let mut tcp = lock(&self.tcp);
        let c = tcp.touch(labels);
        c.opened += 1;
        c.open += 1;
    }

    /// A connection counted by [`Metrics::tcp_opened`] with `labels` ended, having moved
    /// `request_bytes` from source to destination and `response_bytes` back. Its close is counted
    /// with `flags` as `response_flags` (as ztunnel's: a connection opens with `-` and may close
    /// with `DENY` or `CONNECT`).
    pub fn tcp_closed(
        &self,
        labels: &TcpLabels,
        flags: &'static str,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let mut tcp = lock(&self.tcp);
        let c = tcp.touch(labels);
        c.open = c.open.saturating_sub(1);
        let c = if flags == labels.response_flags {
            c
        } else {
            let mut flagged = labels.clone();
            flagged.response_flags = flags;
            tcp.touch(&flagged)
        };
        c.closed += 1;
        c.request_bytes += request_bytes;
        c.response_bytes += response_bytes;
    }

    /// A connection was refused by authorization; `policy` is the deciding policy, if one did.
    pub fn denied(&self, direction: &'static str, policy: Option<&str>) {
        *lock(&self.denials)
            .entry((direction, policy.unwrap_or("none").to_owned()))
            .or_default() += 1;
    }

    /// A connection was refused before it was judged: a limit was hit, or the state it needs
    /// is missing (`reason` names which, as the access log's `limit` does).
    pub fn refused(&self, direction: &'static str, reason: &'static str) {
        *lock(&self.refusals).entry((direction, reason)).or_default() += 1;
    }

    /// The exposition text.
    pub fn render(&self, g: &Gauges) -> String {
        let (tcp, expired): (Vec<(TcpLabels, TcpCounts)>, u64) = {
            let mut series = lock(&self.tcp);
            // A label set with a connection still open stays, however long it has been.
            series.expire(|c| c.open > 0);
            let mut v: Vec<_> = series.iter().map(|(l, c)| (l.clone(), *c)).collect();
            v.sort_by(|a, b| a.0.cmp(&b.0));
            (v, series.expired())
        };
        let mut e = Exposition::default();
        type Family = (&'static str, &'static str, fn(&TcpCounts) -> u64);
        let families: [Family; 4] = [
            (
                "istio_tcp_connections_opened",
                "TCP connections opened",
                |c| c.opened,
            ),
            (
                "istio_tcp_connections_closed",
                "TCP connections closed",
                |c| c.closed,
            ),
            (
                "istio_tcp_sent_bytes",
                "Bytes sent by the destination back to the source (response bytes), counted when the connection closes",
                |c| c.response_bytes,
            ),
            (
                "istio_tcp_received_bytes",
                "Bytes received from the source for the destination (request bytes), counted when the connection closes",
                |c| c.request_bytes,
            ),
        ];
        for (name, help, value) in families {
            let f = e.counters(name, help);
            for (labels, counts) in &tcp {
                f.counter(owned(&labels.pairs()), value(counts));
            }
        }
        self.dns.render(&mut e);
        e.counter(
            "ambit_metric_series_expired",
            "Label sets of istio_tcp_* dropped after being idle for 10 minutes (no connection open or changed)",
            expired,
        );
        let f = e.counters(
            "ambit_authorization_denials",
            "Connections refused by authorization policy, by direction and deciding policy (none: no ALLOW policy matched)",
        );
        for ((direction, policy), n) in lock(&self.denials).iter() {
            f.counter(
                vec![
                    ("direction", (*direction).to_owned()),
                    ("policy", policy.clone()),
                ],
                *n,
            );
        }
        let f = e.counters(
            "ambit_connections_refused",
            "Connections refused before a byte was sent because a limit was hit or the state they need was missing, by direction and reason",
        );
        for ((direction, reason), n) in lock(&self.refusals).iter() {
            f.counter(owned(&[("direction", direction), ("reason", reason)]), *n);
        }
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        e.gauge(
            "ambit_held_connections",
            "New connections waiting for the control plane's first full state",
            count(g.held_connections),
        );
        e.gauge(
            "ambit_enrolled_pods",
            "Local pods whose traffic is captured",
            count(g.enrolled_pods),
        );
        e.gauge(
            "ambit_open_connections",
            "Connections the agent proxies now",
            count(g.open_connections),
        );
        e.gauge(
            "ambit_workloads",
            "Workloads known (all sources)",
            count(g.workloads),
        );
        e.gauge(
            "ambit_services",
            "Services known (all sources)",
            count(g.services),
        );
        e.gauge(
            "ambit_authorization_policies",
            "Authorization policies held",
            count(g.policies),
        );
        e.gauge(
            "ambit_kubernetes_unreadable_objects",
            "Pods of this node and namespaces the agent cannot read from the Kubernetes API (their pods are not captured; ambitctl status names them)",
            count(g.kube_unreadable),
        );
        let f = e.counters(
            "ambit_ebpf_events",
            "Events counted by the eBPF capture programs (redirects, passes, drops), by counter",
        );
        for (counter, n) in &g.bpf {
            f.counter(vec![("counter", counter.clone())], *n);
        }
        let f = e.gauges(
            "ambit_certificate_expiry_timestamp_seconds",
            "When each workload identity's current certificate expires (Unix seconds)",
        );
        for (identity, at) in &g.cert_expiry {
            f.gauge(vec![("identity", identity.clone())], *at);
        }
        if let Some(x) = &g.xds {
            e.counter(
                "ambit_xds_pushes",
                "xDS responses processed (every valid resource applied)",
                x.pushes,
            );
            e.counter(
                "ambit_xds_nacks",
                "xDS responses NACKed because at least one resource was rejected",
                x.nacks,
            );
            let f = e.counters(
                "ambit_xds_rejected_resources",
                "xDS resources rejected (each alone; the rest of their response applied), by type",
            );
            for (kind, n) in &x.rejected {
                f.counter(vec![("type", kind.to_string())], *n);
            }
            e.gauge(
                "ambit_xds_connected",
                "1 while an xDS stream is open",
                i64::from(x.connected),
            );
        }
        if let Some(s) = &g.splice {
            e.counter(
                "ambit_splice_connections",
                "Same-node connections handed to the kernel splice",
                s.spliced,
            );
            let f = e.counters(
                "ambit_splice_refused",
                "Same-node connections the kernel splice could not take, copied by the agent instead (path local), by reason: map (the splice maps are full, see acceleration.sameNodeConnections), not_established (a side had finished sending), cookie, kick",
            );
            for (reason, n) in &s.refused {
                f.counter(owned(&[("reason", reason)]), *n);
            }
            e.gauge(
                "ambit_splice_sockets",
                "Sockets in the splice maps now (two per spliced connection)",
                i64::from(s.sockets),
            );
            e.gauge(
                "ambit_splice_capacity_sockets",
                "How many sockets the splice maps hold (acceleration.sameNodeConnections x 2)",
                i64::from(s.capacity),
            );
        }
        e.counter(
            "ambit_hbone_connections_opened",
            "HBONE (mTLS) connections opened by the pool",
            g.pool_connections_opened,
        );
        e.counter(
            "ambit_hbone_streams_opened",
            "HBONE CONNECT streams opened",
            g.pool_streams_opened,
        );
        e.gauge(
            "ambit_hbone_connections",
            "HBONE connections open in the pool",
            count(g.pool_open_connections),
        );
        e.text()
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Counters only ever grow by whole updates: a poisoned map is still consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The OpenMetrics content type `/metrics` answers with (prometheus-client's text format, as
/// ztunnel's).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One scrape's metric families, written out by prometheus-client's OpenMetrics text encoder
/// (names, escaping, `_total`/`_bucket` suffixes, `# EOF`). The values are read from the
/// agent's own state when scraped: the label sets that expire ([`Series`]) and the gauges other
/// components own have no long-lived prometheus-client metric to live in.
#[derive(Debug, Default)]
pub(crate) struct Exposition {
    families: Vec<MetricFamily>,
}

#[derive(Debug)]
pub(crate) struct MetricFamily {
    /// Without the type's suffix: a counter `x` is sampled as `x_total`.
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

/// A sample's labels, in order.
pub(crate) type Labels = Vec<(&'static str, String)>;

#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(i64),
    /// Sum, count and per-bucket (not cumulative) counts by upper bound, ending with +Inf.
    Histogram(f64, u64, Vec<(f64, u64)>),
}

impl Exposition {
    fn family(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: MetricType,
    ) -> &mut MetricFamily {
        debug_assert!(!name.ends_with("_total"), "{name}: the encoder adds _total");
        self.families.push(MetricFamily {
            name,
            help,
            kind,
            samples: Vec::new(),
        });
        self.families.last_mut().expect("BUG: pushed above")
    }

    /// A counter family; add its samples with [`MetricFamily::counter`].
    pub(crate) fn counters(&mut self, name: &'static str, help: &'static str) -> &mut MetricFamily {
        self.family(name, help, MetricType::Counter)
    }

    /// A histogram family; add its samples with [`MetricFamily::histogram`].
    pub(crate) fn histograms(
        &mut self,
        name: &'static str,
        help: &'static str,
    ) -> &mut MetricFamily {
        self.family(name, help, MetricType::Histogram)
    }

    /// A gauge family; add its samples with [`MetricFamily::gauge`].
    pub(crate) fn gauges(&mut self, name: &'static str, help: &'static str) -> &mut MetricFamily {
        self.family(name, help, MetricType::Gauge)
    }

    /// A counter without labels.
    pub(crate) fn counter(&mut self, name: &'static str, help: &'static str, v: u64) {
        self.counters(name, help).counter(Vec::new(), v);
    }

    /// A gauge without labels.
    pub(crate) fn gauge(&mut self, name: &'static str, help: &'static str, v: i64) {
        self.gauges(name, help).gauge(Vec::new(), v);
    }

    /// The exposition text.
    pub(crate) fn text(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::with_capacity(8192);
        // Writing to a String fails only if an encoder does, which ours never make fail.
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "BUG: cannot encode the metrics");
        }
        out
    }
}

impl MetricFamily {
    pub(crate) fn counter(&mut self, labels: Labels, v: u64) -> &mut Self {
        self.samples.push((labels, Value::Counter(v)));
        self
    }

    pub(crate) fn gauge(&mut self, labels: Labels, v: i64) -> &mut Self {
        self.samples.push((labels, Value::Gauge(v)));
        self
    }

    /// `buckets`: per-bucket counts by upper bound (the encoder makes them cumulative); the
    /// `+Inf` bucket is added to make the total `count`.
    pub(crate) fn histogram(
        &mut self,
        labels: Labels,
        sum: f64,
        count: u64,
        buckets: impl IntoIterator<Item = (f64, u64)>,
    ) -> &mut Self {
        let mut buckets: Vec<(f64, u64)> = buckets.into_iter().collect();
        let finite: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::INFINITY, count.saturating_sub(finite)));
        self.samples
            .push((labels, Value::Histogram(sum, count, buckets)));
        self
    }
}

impl Collector for Exposition {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.families {
            let mut family = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, value) in &f.samples {
                if labels.is_empty() {
                    value.encode(&mut family)?;
                } else {
                    value.encode(&mut family.encode_family(labels)?)?;
                }
            }
        }
        Ok(())
    }
}

impl Value {
    fn encode(&self, m: &mut MetricEncoder) -> Result<(), std::fmt::Error> {
        match self {
            Value::Counter(v) => m.encode_counter::<NoLabelSet, _, u64>(v, None),
            Value::Gauge(v) => m.encode_gauge(v),
            Value::Histogram(sum, count, buckets) => {
                m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)
            }
        }
    }
}

/// Owned copies of `pairs`, for an [`Exposition`] sample.
pub(crate) fn owned(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> TcpLabels {
        let peer = |name: &str| PeerLabels {
            workload: name.into(),
            namespace: "default".into(),
            principal: format!("spiffe://cluster.local/ns/default/sa/{name}"),
            canonical_service: name.into(),
            canonical_revision: "v1".into(),
            cluster: "Kubernetes".into(),
        };
        TcpLabels {
            reporter: "destination",
            source: peer("client"),
            destination: peer("server"),
            destination_service: "server.default.svc.cluster.local".into(),
            destination_service_name: "server".into(),
            destination_service_namespace: "default".into(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
        }
    }

    #[test]
    fn counts_connections_and_bytes_per_label_set() {
        let m = Metrics::default();
        m.tcp_opened(&labels());
        m.tcp_opened(&labels());
        m.tcp_closed(&labels(), "-", 100, 7);
        m.tcp_closed(&labels(), "DENY", 1, 2);
        m.denied("inbound", Some("default/deny \"x\""));
        let text = m.render(&Gauges::default());
        // ztunnel's label set, in its order.
        let l = |flags: &str| {
            format!(
                "reporter=\"destination\",source_workload=\"client\",\
                 source_canonical_service=\"client\",source_canonical_revision=\"v1\",\
                 source_workload_namespace=\"default\",\
                 source_principal=\"spiffe://cluster.local/ns/default/sa/client\",\
                 source_app=\"client\",source_version=\"v1\",source_cluster=\"Kubernetes\",\
                 destination_service=\"server.default.svc.cluster.local\",\
                 destination_service_namespace=\"default\",destination_service_name=\"server\",\
                 destination_workload=\"server\",destination_canonical_service=\"server\",\
                 destination_canonical_revision=\"v1\",destination_workload_namespace=\"default\",\
                 destination_principal=\"spiffe://cluster.local/ns/default/sa/server\",\
                 destination_app=\"server\",destination_version=\"v1\",\
                 destination_cluster=\"Kubernetes\",request_protocol=\"tcp\",\
                 response_flags=\"{flags}\",connection_security_policy=\"mutual_tls\""
            )
        };
        let (l, denied) = (l("-"), l("DENY"));
        for line in [
            format!("istio_tcp_connections_opened_total{{{l}}} 2"),
            // A connection opens with `-` and closes with the flag of how it ended.
            format!("istio_tcp_connections_closed_total{{{l}}} 1"),
            format!("istio_tcp_connections_closed_total{{{denied}}} 1"),
            format!("istio_tcp_received_bytes_total{{{l}}} 100"),
            format!("istio_tcp_sent_bytes_total{{{denied}}} 2"),
            "ambit_authorization_denials_total{direction=\"inbound\",policy=\"default/deny \\\"x\\\"\"} 1"
                .to_owned(),
            "# TYPE istio_tcp_sent_bytes counter".to_owned(),
        ] {
            assert!(text.lines().any(|t| t == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn idle_label_sets_expire_but_not_while_a_connection_is_open() {
        let m = Metrics::with_series_ttl(Duration::ZERO);
        let mut open = labels();
        open.source.workload = "still-connected".into();
        m.tcp_opened(&labels());
        m.tcp_closed(&labels(), "-", 1, 1);
        m.tcp_opened(&open);
        let text = m.render(&Gauges::default());
        assert!(!text.contains("source_workload=\"client\""), "{text}");
        assert!(
            text.contains("source_workload=\"still-connected\""),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l == "ambit_metric_series_expired_total 1"),
            "{text}"
        );
        // Back again: a new series from zero.
        m.tcp_opened(&labels());
        let text = m.render(&Gauges::default());
        assert!(text.contains("source_workload=\"client\""), "{text}");
    }
}
