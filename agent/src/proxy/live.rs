//! The live connections of this agent, both directions: registered when the connection is
//! admitted, removed when it ends. Used to re-judge open inbound connections when authorization
//! policy changes (closing the ones the new policy no longer allows), to list connections in the
//! admin API, and to count Istio's TCP metrics (opened on register, closed with the bytes moved
//! when the registration drops).

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio_util::sync::CancellationToken;

use super::{Direction, copy::ByteCounts};
use crate::{
    identity::Identity,
    metrics::{Metrics, PeerLabels, TcpLabels},
    telemetry::Transport,
    xds::WorkloadMeta,
};

/// What is known about a connection when it is registered.
pub struct ConnInfo {
    pub direction: Direction,
    pub path: Transport,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    /// `namespace/name`.
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// Istio's `workload` label of each side (a Deployment's name), when known.
    pub src_workload_name: Option<Arc<str>>,
    pub dst_workload_name: Option<Arc<str>>,
    /// Canonical service and revision, cluster of each side, when known.
    pub src_meta: Option<Arc<WorkloadMeta>>,
    pub dst_meta: Option<Arc<WorkloadMeta>>,
    /// `namespace/hostname` of the service whose VIP was dialed.
    pub service: Option<String>,
    /// That service's name (a Kubernetes Service's `metadata.name`).
    pub service_name: Option<String>,
    /// The destination pod's namespace (what namespace-scoped policies apply to).
    pub dst_namespace: String,
    pub counts: Arc<ByteCounts>,
    pub start: Instant,
}

/// One live connection.
pub struct LiveConn {
    pub id: u64,
    pub info: ConnInfo,
    labels: TcpLabels,
    /// Fired to close the connection; the reason is read by its handler for the access log.
    close: CancellationToken,
    reason: Mutex<Option<String>>,
    /// Istio's `response_flags` for its close: `-` unless set (see [`LiveConn::flag`]).
    flags: Mutex<&'static str>,
    /// A connection registered as spliced that the kernel could not take, copied by the agent.
    in_user_space: std::sync::atomic::AtomicBool,
}

impl LiveConn {
    /// Resolves when the connection has been told to close.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    /// Why it was closed, if it was.
    pub fn close_reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// How the connection ends, for the `response_flags` of its close: `DENY` (authorization)
    /// or `CONNECT` (the destination could not be reached).
    pub fn flag(&self, flags: &'static str) {
        *self.flags.lock().unwrap_or_else(|p| p.into_inner()) = flags;
    }

    /// A connection registered with path `kernel` is copied by the agent after all (the splice
    /// could not take it): from now on it shows as `local`.
    pub fn carried_in_user_space(&self) {
        self.in_user_space
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// How its bytes travel now: the registered path, except a spliced connection the kernel
    /// could not take (`local`).
    pub fn path(&self) -> Transport {
        if self.info.path == Transport::Kernel
            && self
                .in_user_space
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            Transport::Local
        } else {
            self.info.path
        }
    }

    fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        // Closed because the policy now denies it.
        self.flag("DENY");
        self.close.cancel();
    }
}

/// The registry. Cheap: one short lock per connection open and close.
#[derive(Default)]
pub struct LiveConns {
    conns: Mutex<HashMap<u64, Arc<LiveConn>>>,
    next: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

/// Removes its connection from the registry when dropped, counting it closed.
pub struct Registration<'a> {
    registry: &'a LiveConns,
    pub conn: Arc<LiveConn>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.conn.id);
        let counts = &self.conn.info.counts;
        let flags = *self.conn.flags.lock().unwrap_or_else(|p| p.into_inner());
        self.registry.metrics.tcp_closed(
            &self.conn.labels,
            flags,
            counts.sent(),
            counts.received(),
        );
    }
}

/// Istio's labels for a connection, as ztunnel fills them: each side's workload (its owner's
/// name from the control plane, else the pod's), namespace, identity, canonical service and
/// revision and cluster; the service dialed; `unknown` where not known.
fn labels(info: &ConnInfo) -> TcpLabels {
    let side = |w: &Option<String>,
                name: &Option<Arc<str>>,
                id: &Option<Identity>,
                meta: &Option<Arc<WorkloadMeta>>| {
        let mut p = PeerLabels::unknown();
        if let Some((ns, pod)) = w.as_deref().and_then(|w| w.split_once('/')) {
            p.workload = name.as_deref().unwrap_or(pod).to_owned();
            p.namespace = ns.to_owned();
        }
        if let Some(id) = id {
            p.principal = id.to_string();
        }
        if let Some(m) = meta.as_deref() {
            let known = |v: &str, slot: &mut String| {
                if !v.is_empty() {
                    *slot = v.to_owned();
                }
            };
            known(&m.canonical_name, &mut p.canonical_service);
            known(&m.canonical_revision, &mut p.canonical_revision);
            known(&m.cluster_id, &mut p.cluster);
        }
        p
    };
    let (service_namespace, service_host) = match info.service.as_deref() {
        Some(key) => key.split_once('/').unwrap_or(("unknown", key)),
        None => ("unknown", "unknown"),
    };
    TcpLabels {
        reporter: match info.direction {
            Direction::Outbound => "source",
            Direction::Inbound => "destination",
        },
        source: side(
            &info.src_workload,
            &info.src_workload_name,
            &info.src_identity,
            &info.src_meta,
        ),
        destination: side(
            &info.dst_workload,
            &info.dst_workload_name,
            &info.dst_identity,
            &info.dst_meta,
        ),
        destination_service: service_host.to_owned(),
        destination_service_name: info
            .service_name
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| "unknown".to_owned()),
        destination_service_namespace: service_namespace.to_owned(),
        response_flags: "-",
        connection_security_policy: match info.path {
            // Spliced: no TLS, but both peers authenticated as the agent's own pods, which is
            // what the label promises its readers (Kiali's lock, STRICT checks).
            Transport::Hbone | Transport::Waypoint | Transport::Kernel | Transport::Local => {
                "mutual_tls"
            }
            Transport::Passthrough | Transport::Dns => "unknown",
        },
    }
}

impl LiveConns {
    pub fn new(metrics: Arc<Metrics>) -> LiveConns {
        LiveConns {
            metrics,
            ..LiveConns::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        // Updates are single inserts/removes: a poisoned map is still consistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Registers a connection, counting it opened.
    pub fn register(&self, info: ConnInfo) -> Registration<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let labels = labels(&info);
        self.metrics.tcp_opened(&labels);
        let conn = Arc::new(LiveConn {
            id,
            info,
            labels,
            close: CancellationToken::new(),
            reason: Mutex::new(None),
            flags: Mutex::new("-"),
            in_user_space: Default::default(),
        });
        self.lock().insert(id, conn.clone());
        Registration {
            registry: self,
            conn,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Connections registered since the start.
    pub fn registered(&self) -> u64 {
        self.next.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every live connection, oldest first.
    pub fn list(&self) -> Vec<Arc<LiveConn>> {
        let mut v: Vec<Arc<LiveConn>> = self.lock().values().cloned().collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Closes every connection for which `judge` returns a reason. Returns how many.
    pub fn close_where(&self, mut judge: impl FnMut(&LiveConn) -> Option<String>) -> usize {
        let conns: Vec<Arc<LiveConn>> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for c in conns {
            if let Some(reason) = judge(&c) {
                c.close(reason);
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(src: SocketAddr, dst: SocketAddr, ns: &str) -> ConnInfo {
        ConnInfo {
            direction: Direction::Inbound,
            path: Transport::Passthrough,
            src,
            dst,
            src_identity: None,
            dst_identity: None,
            src_workload: None,
            dst_workload: Some(format!("{ns}/server")),
            src_workload_name: None,
            // The owner's name from the control plane, not the pod's.
            dst_workload_name: Some("server-v1".into()),
            src_meta: None,
            dst_meta: None,
            service: None,
            service_name: None,
            dst_namespace: ns.to_owned(),
            counts: Arc::default(),
            start: Instant::now(),
        }
    }

    #[test]
    fn a_spliced_connection_the_kernel_did_not_take_shows_as_local() {
        let live = LiveConns::default();
        let a: SocketAddr = "10.1.0.2:1000".parse().expect("addr");
        let b: SocketAddr = "10.1.0.3:80".parse().expect("addr");
        let spliced = live.register(ConnInfo {
            path: Transport::Kernel,
            ..info(a, b, "default")
        });
        let other = live.register(info(b, a, "default"));
        assert_eq!(spliced.conn.path(), Transport::Kernel);
        spliced.conn.carried_in_user_space();
        other.conn.carried_in_user_space();
        assert_eq!(spliced.conn.path(), Transport::Local);
        // Only a spliced one changes: any other path stays what it was.
        assert_eq!(other.conn.path(), Transport::Passthrough);
    }

    #[tokio::test]
    async fn registers_closes_and_forgets() {
        let live = LiveConns::default();
        let a: SocketAddr = "10.1.0.2:1000".parse().expect("addr");
        let b: SocketAddr = "10.2.0.2:80".parse().expect("addr");
        let r1 = live.register(info(a, b, "default"));
        let r2 = live.register(info(b, a, "other"));
        assert_eq!(live.len(), 2);
        let n =
            live.close_where(|c| (c.info.dst_namespace == "default").then(|| "policy".to_owned()));
        assert_eq!(n, 1);
        r1.conn.closed().await;
        assert_eq!(r1.conn.close_reason().as_deref(), Some("policy"));
        assert_eq!(r2.conn.close_reason(), None);
        r1.conn
            .info
            .counts
            .sent
            .fetch_add(5, std::sync::atomic::Ordering::Relaxed);
        drop(r1);
        assert_eq!(live.len(), 1);
        drop(r2);
        assert!(live.is_empty());
        let text = live.metrics().render(&Default::default());
        assert!(
            text.contains("istio_tcp_received_bytes_total{reporter=\"destination\",source_workload=\"unknown\",source_canonical_service=\"unknown\",source_canonical_revision=\"unknown\",source_workload_namespace=\"unknown\",source_principal=\"unknown\""),
            "{text}"
        );
        assert!(
            text.contains("destination_workload=\"server-v1\",destination_canonical_service=\"unknown\",destination_canonical_revision=\"unknown\",destination_workload_namespace=\"default\""),
            "{text}"
        );
        // The one closed by policy counts its close as DENY, the other as `-`.
        let closed = |flags: &str| {
            text.lines()
                .filter(|l| l.starts_with("istio_tcp_connections_closed_total{"))
                .filter(|l| l.contains(&format!("response_flags=\"{flags}\"")))
                .map(|l| l.rsplit(' ').next().unwrap_or_default().to_owned())
                .collect::<Vec<_>>()
        };
        assert_eq!(closed("DENY"), ["1"], "{text}");
        assert_eq!(
            closed("-").iter().filter(|n| *n == "1").count(),
            1,
            "{text}"
        );
    }
}
