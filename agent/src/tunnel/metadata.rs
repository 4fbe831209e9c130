//! What an HBONE `CONNECT` carries besides the bytes, as Istio's data plane sends and reads it:
//! W3C `baggage` describing a workload (the `k8s.*`, `service.*` and `cloud.*` keys ztunnel
//! uses), W3C `traceparent`, and the `host` of a `Forwarded` header. All of it is telemetry: it is
//! never used for identity or policy, which come only from the certificate and the TCP peer.
//! Parsing is bounded: values past [`MAX_VALUE`] bytes and headers past [`MAX_HEADER`] bytes are
//! ignored, so a peer cannot grow a metric label or a log line.

use std::fmt::Write as _;

use http::HeaderMap;

use crate::xds::WorkloadMeta;

/// A header longer than this is ignored whole.
pub const MAX_HEADER: usize = 4096;
/// A baggage value longer than this (or with characters outside a label's) is dropped.
pub const MAX_VALUE: usize = 253;

/// A workload as baggage describes it; empty strings are unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    pub cluster: String,
    pub namespace: String,
    /// `deployment`, `pod`, ... (the `k8s.<kind>.name` key it came in).
    pub workload_kind: String,
    pub workload_name: String,
    /// Istio's canonical service (`service.name`) and revision (`service.version`).
    pub service_name: String,
    pub service_version: String,
    pub region: String,
    pub zone: String,
}

impl Baggage {
    /// The baggage of a workload: its namespace, owner, canonical service and placement.
    pub fn of(namespace: &str, workload_name: &str, meta: &WorkloadMeta) -> Baggage {
        Baggage {
            cluster: meta.cluster_id.clone(),
            namespace: namespace.to_owned(),
            workload_kind: meta.workload_type.to_owned(),
            workload_name: workload_name.to_owned(),
            service_name: meta.canonical_name.clone(),
            service_version: meta.canonical_revision.clone(),
            region: meta.region.clone(),
            zone: meta.zone.clone(),
        }
    }

    /// The header value: ztunnel's keys in its order, the unknown ones left out.
    pub fn header_value(&self) -> String {
        let kind = if self.workload_kind.is_empty() {
            "deployment"
        } else {
            &self.workload_kind
        };
        let mut out = String::new();
        for (key, value) in [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (&format!("k8s.{kind}.name"), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
            ("cloud.region", &self.region),
            ("cloud.availability_zone", &self.zone),
        ] {
            // A value a peer could misread (a `,` or `=` from a label) is left out.
            if value.is_empty() || value.len() > MAX_VALUE || !value.bytes().all(label_byte) {
                continue;
            }
            if !out.is_empty() {
                out.push(',');
            }
            let _ = write!(out, "{key}={value}");
        }
        out
    }

    /// Reads every `baggage` header of `headers`; unknown keys, properties (`;...`) and values
    /// that are too long or not label-like are ignored.
    pub fn parse(headers: &HeaderMap) -> Baggage {
        let mut b = Baggage::default();
        for value in headers.get_all("baggage") {
            let Ok(value) = value.to_str() else { continue };
            if value.len() > MAX_HEADER {
                continue;
            }
            for member in value.split(',') {
                let member = member.split(';').next().unwrap_or_default();
                let Some((key, v)) = member.split_once('=') else {
                    continue;
                };
                let v = v.trim();
                if v.is_empty() || v.len() > MAX_VALUE || !v.bytes().all(label_byte) {
                    continue;
                }
                let slot = match key.trim() {
                    "k8s.cluster.name" => &mut b.cluster,
                    "k8s.namespace.name" => &mut b.namespace,
                    "service.name" => &mut b.service_name,
                    "service.version" => &mut b.service_version,
                    "cloud.region" => &mut b.region,
                    "cloud.availability_zone" => &mut b.zone,
                    k => match k.strip_prefix("k8s.").and_then(|k| k.strip_suffix(".name")) {
                        Some(kind @ ("deployment" | "cronjob" | "pod" | "job")) => {
                            b.workload_kind = kind.to_owned();
                            &mut b.workload_name
                        }
                        _ => continue,
                    },
                };
                *slot = v.to_owned();
            }
        }
        b
    }

    /// Its placement and canonical names as workload metadata.
    pub fn meta(&self) -> WorkloadMeta {
        WorkloadMeta {
            canonical_name: self.service_name.clone(),
            canonical_revision: self.service_version.clone(),
            cluster_id: self.cluster.clone(),
            region: self.region.clone(),
            zone: self.zone.clone(),
            ..WorkloadMeta::default()
        }
    }
}

/// What Kubernetes names and Istio's label values are made of.
fn label_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._/:".contains(&b)
}

/// A fresh W3C `traceparent` (version 00, random trace and span ids, not sampled), as ztunnel
/// starts one for each outbound connection.
pub fn new_traceparent() -> String {
    let trace = fastrand::u128(1..);
    let span = fastrand::u64(1..);
    format!("00-{trace:032x}-{span:016x}-00")
}

/// The `traceparent` of `headers` if it is a well-formed version-00 one (55 characters:
/// version, 32 and 16 lower-case hex digits, flags; all-zero ids are invalid).
pub fn traceparent(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("traceparent")?.to_str().ok()?;
    let parts: Vec<&str> = v.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match parts.as_slice() {
        [version, trace, span, flags]
            if *version == "00"
                && hex(trace, 32)
                && hex(span, 16)
                && hex(flags, 2)
                && trace.bytes().any(|b| b != b'0')
                && span.bytes().any(|b| b != b'0') =>
        {
            Some(v.to_owned())
        }
        _ => None,
    }
}

/// The `host=` of the first `Forwarded` header (RFC 7239), as ztunnel reads it to tell which
/// service a tunnel was for: telemetry only.
pub fn forwarded_host(headers: &HeaderMap) -> Option<String> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    if v.len() > MAX_HEADER {
        return None;
    }
    let first = v.split(',').next()?;
    first.split(';').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("host") {
            return None;
        }
        let v = v.trim().trim_matches('"');
        (!v.is_empty() && v.len() <= MAX_VALUE && v.bytes().all(label_byte)).then(|| v.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use http::{HeaderMap, HeaderValue};

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn baggage_round_trips_with_ztunnels_keys() {
        let meta = WorkloadMeta {
            canonical_name: "reviews".into(),
            canonical_revision: "v2".into(),
            cluster_id: "Kubernetes".into(),
            region: "eu".into(),
            workload_type: "deployment",
            ..WorkloadMeta::default()
        };
        let b = Baggage::of("shop", "reviews-v2", &meta);
        assert_eq!(
            b.header_value(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=shop,k8s.deployment.name=reviews-v2,\
             service.name=reviews,service.version=v2,cloud.region=eu"
        );
        let back = Baggage::parse(&headers(&[("baggage", &b.header_value())]));
        assert_eq!(back, b);
    }

    #[test]
    fn baggage_parsing_ignores_what_it_cannot_use() {
        let long = "x".repeat(MAX_VALUE + 1);
        let b = Baggage::parse(&headers(&[
            (
                "baggage",
                "k8s.namespace.name=ns;prop=1,unknown.key=v,k8s.job.name=etl",
            ),
            (
                "baggage",
                &format!("service.name={long},service.version=a b,cloud.region="),
            ),
            ("baggage", "k8s.replicaset.name=rs,garbage"),
        ]));
        assert_eq!(b.namespace, "ns");
        assert_eq!((&*b.workload_kind, &*b.workload_name), ("job", "etl"));
        assert!(b.service_name.is_empty() && b.service_version.is_empty() && b.region.is_empty());
        let huge = format!("k8s.namespace.name={}", "n,".repeat(MAX_HEADER));
        assert_eq!(
            Baggage::parse(&headers(&[("baggage", &huge)])),
            Baggage::default()
        );
    }

    #[test]
    fn traceparents_are_validated() {
        let fresh = new_traceparent();
        assert_eq!(fresh.len(), 55);
        assert_eq!(
            traceparent(&headers(&[("traceparent", &fresh)])).as_deref(),
            Some(fresh.as_str())
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "garbage",
        ] {
            assert_eq!(
                traceparent(&headers(&[("traceparent", bad)])),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn forwarded_host_is_read_from_the_first_element() {
        let h = |v: &str| forwarded_host(&headers(&[("forwarded", v)]));
        assert_eq!(
            h("for=\"10.0.0.1\";host=reviews.shop.svc.cluster.local").as_deref(),
            Some("reviews.shop.svc.cluster.local")
        );
        assert_eq!(h("for=10.0.0.1").as_deref(), None);
        assert_eq!(h("for=1;Host=\"a.b\", host=c.d").as_deref(), Some("a.b"));
        assert_eq!(h("host=bad value").as_deref(), None);
    }
}
