//! Outbound: a connection an enrolled pod's app opened, redirected to the pod's 15001 listener.
//! Look up where it was going; if the destination is a mesh workload, carry it through HBONE
//! (mutual TLS as the pod's identity, verifying the destination's); otherwise connect to it in
//! plaintext (passthrough), and say so in the access log. Either way the connection leaves from
//! inside the pod's netns, with the pod's own IP.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::net::TcpStream;
use tracing::warn;

use super::{
    PodInfo, ProxyContext,
    capture::Source,
    copy::{self, Side},
    live::ConnInfo,
    result::{AccessLog, ConnectionResult, Error},
    splice::{self, SameNode},
};
use crate::{
    addrs::{ClientAddr, EndpointAddr, OrigDstAddr},
    identity::Identity,
    state::{Near, ServiceEntry, Snapshot, Workload},
    telemetry::Transport,
    tls,
    tunnel::{
        self, TcpSide,
        client::{PoolKey, TunnelHeaders},
        metadata::{self, Baggage},
    },
    xds::{GatewayDestination, XdsGateway},
};

/// How long a new connection waits for the pod's first certificate (CA slow or down).
const CERT_WAIT: Duration = Duration::from_secs(5);

pub async fn handle(
    ctx: Arc<ProxyContext>,
    pod: Arc<PodInfo>,
    downstream: TcpStream,
    client: ClientAddr,
    start: Instant,
) {
    let mut result = ConnectionResult::new(AccessLog {
        src_workload: Some(pod.key.clone()),
        src_identity: Some(pod.identity.clone()),
        ..AccessLog::new(super::Direction::Outbound, client.0, start)
    });
    let outcome = serve(&ctx, &pod, downstream, &mut result.log).await;
    result.finish(outcome);
}

async fn serve(
    ctx: &ProxyContext,
    pod: &PodInfo,
    downstream: TcpStream,
    log: &mut AccessLog,
) -> Result<(), Error> {
    let (peer, start, counts) = (log.src, log.start, log.counts.clone());
    let Some(OrigDstAddr(dst)) = ctx.capture.original_dst(&pod.netns, ClientAddr(peer)) else {
        // Not redirected by connect4 (someone dialed 15001 directly), or the client is gone.
        warn!("no original destination recorded for this connection; closing it");
        return Err(Error::NoOriginalDestination);
    };
    log.dst = Some(dst);
    // The app's socket is bound to loopback (it was redirected to 127.0.0.1:15001); report the
    // pod's own address, which is what the destination sees.
    let src_ip = pod.ip_like(dst.ip()).unwrap_or(peer.ip());
    log.src = SocketAddr::new(src_ip, peer.port());
    // DNS over TCP of a pod whose DNS the agent serves: answered here, forwarded from the pod
    // (no control-plane state needed to forward a name the mesh does not know).
    if crate::proxy::dns::is_dns(pod, dst) {
        log.path = crate::telemetry::Transport::Dns;
        return crate::proxy::dns::serve_tcp(ctx, pod, downstream, dst)
            .await
            .map(|_| ())
            .map_err(Error::Dns);
    }
    // Where it goes (HBONE or passthrough) is known only on synced state.
    tokio::select! {
        r = ctx.wait_synced(super::Direction::Outbound) => r.map_err(Error::NotSynced)?,
        () = super::gave_up(&downstream) => {
            return Err(Error::ClientGone("while it waited for the control plane"));
        }
    };

    let snapshot = ctx.workloads.snapshot();
    let route = route(&snapshot, src_ip, OrigDstAddr(dst), Pick::Next).map_err(|e| {
        log.dst_service = Some(e.service().to_owned());
        Error::Route(e)
    })?;
    let service_key: Option<String> = route.service.as_ref().map(|s| s.key.to_string());
    log.dst_service = service_key.clone();
    // From here on the connection goes to the endpoint, not to what was dialed.
    let EndpointAddr(dst) = route.endpoint;
    if route.service.is_some() && route.waypoint.is_none() {
        log.dst_endpoint = Some(dst);
    }
    log.locality = route.locality.clone();
    let dst_name = match (&route.workload, &route.waypoint) {
        (Some(w), _) => Some(w.display_name()),
        // The waypoint picks the endpoint; the log names the service.
        (None, Some(_)) => service_key.clone(),
        (None, None) => None,
    };
    log.dst_workload = dst_name.clone();
    let src_workload = snapshot.by_ip(src_ip);
    let src_meta = src_workload.map(|w| snapshot.telemetry_of(w).meta.clone());
    let conn_info = |path, dst_identity| ConnInfo {
        direction: super::Direction::Outbound,
        path,
        src: log_src(src_ip, peer),
        dst,
        src_identity: Some(pod.identity.clone()),
        dst_identity,
        src_workload: Some(pod.key.clone()),
        dst_workload: dst_name.clone(),
        src_workload_name: src_workload.map(|w| snapshot.telemetry_of(w).workload_name.clone()),
        dst_workload_name: route
            .workload
            .as_ref()
            .map(|w| snapshot.telemetry_of(w).workload_name.clone()),
        src_meta: src_meta.clone(),
        dst_meta: route
            .workload
            .as_ref()
            .map(|w| snapshot.telemetry_of(w).meta.clone()),
        service: service_key.clone(),
        service_name: route
            .service
            .as_ref()
            .and_then(|s| s.def.as_ref())
            .map(|d| d.name.clone()),
        dst_namespace: route
            .workload
            .as_ref()
            .map(|w| w.namespace.to_string())
            .unwrap_or_default(),
        counts: counts.clone(),
        start,
    };

    // Between two of this node's pods: admitted at the destination, then spliced in the kernel.
    if route.waypoint.is_none()
        && route.hbone
        && let Some(w) = &route.workload
        && let Some(dst_pod) = splice::destination(ctx, dst)
        && dst_pod.identity == w.identity
    {
        log.path = Transport::Kernel;
        log.dst_identity = Some(dst_pod.identity.clone());
        let live = ctx
            .live
            .register(conn_info(Transport::Kernel, Some(dst_pod.identity.clone())));
        let service_host = route
            .service
            .as_ref()
            .and_then(|s| s.def.as_ref())
            .map(|d| d.hostname.clone());
        drop(snapshot);
        let hop = SameNode {
            src_pod: pod,
            dst_pod,
            src: log_src(src_ip, peer),
            dst,
            service_host: service_host.as_deref(),
            out_live: &live.conn,
        };
        return splice::serve(ctx, hop, downstream, log).await;
    }

    // Through HBONE: to the destination's waypoint, or to the destination itself.
    let (path, tunnel_to, authority, expected_identity) = match (&route.waypoint, &route.workload) {
        (Some(hop), _) => (
            Transport::Waypoint,
            hop.addr,
            hop.authority,
            hop.identity.clone(),
        ),
        (None, Some(w)) if route.hbone => (
            Transport::Hbone,
            tunnel::client::tunnel_addr(dst.ip()),
            dst,
            w.identity.clone(),
        ),
        _ => {
            // Not a mesh workload: plaintext, as before capture. Registered (and counted as
            // opened) before connecting, so failed connections are counted too.
            let live = ctx.live.register(conn_info(Transport::Passthrough, None));
            drop(snapshot);
            let upstream = match ctx.capture.socket(&pod.netns, dst, Source::Pod(src_ip)) {
                Ok(s) => tokio::select! {
                    r = super::connect(s, dst) => r,
                    () = super::gave_up(&downstream) => {
                        return Err(Error::ClientGone("before the destination answered"));
                    }
                },
                Err(e) => Err(e),
            };
            let upstream = upstream.map_err(|cause| {
                live.conn.flag("CONNECT");
                Error::Connect {
                    dst,
                    app: false,
                    cause,
                }
            })?;
            return copy::copy_bidirectional(downstream, upstream, counts)
                .await
                .map_err(Error::Copy);
        }
    };

    log.path = path;
    // The identity the tunnel verifies: the destination's, or its waypoint's.
    log.dst_identity = Some(expected_identity.clone());
    let live = ctx
        .live
        .register(conn_info(path, Some(expected_identity.clone())));
    // Telemetry for the destination (it may know us only by this): who we are, and a trace id
    // both agents log.
    let baggage = match src_workload {
        Some(w) => {
            let t = snapshot.telemetry_of(w);
            Baggage::of(&w.namespace, &t.workload_name, &t.meta)
        }
        None => Baggage {
            namespace: pod.identity.namespace().to_owned(),
            ..Baggage::default()
        },
    }
    .header_value();
    drop(snapshot);
    log.trace = Some(metadata::new_traceparent());
    let traceparent = log.trace.as_deref().unwrap_or_default();
    // Fail closed: no certificate, no connection (never plaintext instead).
    let cert = ctx
        .certs
        .get(&pod.identity, CERT_WAIT)
        .await
        .map_err(|e| Error::NoCertificate(e.to_string()))?;
    let key = PoolKey {
        src_identity: pod.identity.clone(),
        src_ip,
        src_serial: cert.serial.clone(),
        dst_identity: expected_identity.clone(),
        dst: tunnel_to,
    };
    let expected = vec![expected_identity.clone()];
    let connecting = ctx.pool.connect(
        key,
        || {
            ctx.capture
                .socket(&pod.netns, tunnel_to, Source::Pod(src_ip))
        },
        || tls::client_config(&cert, &ctx.roots, expected),
        authority,
        TunnelHeaders {
            client_ip: src_ip,
            traceparent: Some(traceparent),
            baggage: Some(&baggage),
            service_host: route
                .service
                .as_ref()
                .and_then(|s| s.def.as_ref())
                .map(|d| d.hostname.as_str()),
        },
    );
    // A client that gives up while the tunnel is being opened cancels it.
    let tunnel = tokio::select! {
        t = connecting => t,
        () = super::gave_up(&downstream) => {
            return Err(Error::ClientGone("before the tunnel was open"));
        }
    };
    let tunnel = tunnel.map_err(|e| {
        live.conn.flag(if e.denied() { "DENY" } else { "CONNECT" });
        Error::Tunnel(match &route.waypoint {
            // Never a fallback around it: its L7 policy would be skipped.
            Some(hop) => format!("waypoint {} at {} failed: {e}", hop.name, hop.addr),
            None => e.to_string(),
        })
    })?;
    tunnel::pump(
        downstream,
        tunnel.send,
        tunnel.recv,
        TcpSide::Source,
        counts,
    )
    .await
    .map_err(Error::Copy)
}

fn log_src(src_ip: std::net::IpAddr, peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(src_ip, peer.port())
}

/// Whether a route may advance a service's round robin (a real connection) or only look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    Next,
    /// For `explain`: the endpoint the next connection would get.
    Peek,
}

/// Where an outbound connection to `dst` goes. One function for the data path and `explain`.
pub struct Route {
    /// The service whose VIP `dst` is.
    pub service: Option<Arc<ServiceEntry>>,
    /// The address connected to: the one dialed, or the endpoint picked for a VIP (the VIP
    /// itself when the service's waypoint picks).
    pub endpoint: EndpointAddr,
    /// The workload at that address, if known.
    pub workload: Option<Arc<Workload>>,
    /// Through HBONE (the workload is in the mesh); otherwise passthrough.
    pub hbone: bool,
    /// The waypoint the connection must go through (the service's, else the workload's).
    pub waypoint: Option<WaypointHop>,
    /// Why this endpoint, when the service keeps traffic local (its mode and the scopes the
    /// endpoint shares with the client).
    pub locality: Option<String>,
}

/// HBONE to a waypoint, asking it for the original destination.
#[derive(Clone, Debug)]
pub struct WaypointHop {
    /// The waypoint's HBONE address.
    pub addr: SocketAddr,
    /// The identity it must present.
    pub identity: Identity,
    /// `namespace/name` of the waypoint workload.
    pub name: String,
    /// The CONNECT authority: the service VIP and port, or the workload's address.
    pub authority: SocketAddr,
}

/// Why a connection to a service VIP cannot be routed.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no port {port}")]
    NoSuchPort { service: Arc<str>, port: u16 },
    #[error(
        "service {service} has no healthy endpoint{} (no workload backs it with an address of this family{})",
        if *strict { " in the client's locality" } else { "" },
        if *strict { " that shares every preferred scope with the client: its load balancing is STRICT" } else { "" }
    )]
    NoEndpoint { service: Arc<str>, strict: bool },
    /// Failing closed: going around it would skip its L7 policy.
    #[error(
        "the waypoint {waypoint} of {of} is not a known mesh workload, so its identity cannot be \
         verified; refusing rather than bypassing it"
    )]
    UnknownWaypoint { waypoint: String, of: Arc<str> },
}

impl RouteError {
    pub fn service(&self) -> &str {
        match self {
            RouteError::NoSuchPort { service, .. } | RouteError::NoEndpoint { service, .. } => {
                service
            }
            RouteError::UnknownWaypoint { of, .. } => of,
        }
    }

    /// A port the service lacks is the client's mistake; no endpoint is the destination's.
    pub fn side(&self) -> Side {
        match self {
            RouteError::NoSuchPort { .. } => Side::Downstream,
            RouteError::NoEndpoint { .. } | RouteError::UnknownWaypoint { .. } => Side::Upstream,
        }
    }
}

/// Resolves `dialed` for a connection from `src_ip`: a service with a waypoint goes to the
/// waypoint (asking it for the VIP); otherwise a VIP to one of its endpoints (on the mapped port),
/// then the workload at the address, whether it speaks HBONE, and its waypoint if it has one.
/// A waypoint's own connections are never sent back to it.
pub fn route(
    snapshot: &Snapshot,
    src_ip: IpAddr,
    dialed: OrigDstAddr,
    pick: Pick,
) -> Result<Route, RouteError> {
    let OrigDstAddr(dst) = dialed;
    let service = snapshot.service_by_vip(dst.ip()).cloned();
    if let Some(svc) = &service
        && let Some(gw) = svc.def.as_ref().and_then(|d| d.waypoint.as_ref())
    {
        if !svc.has_port(dst.port()) {
            return Err(RouteError::NoSuchPort {
                service: svc.key.clone(),
                port: dst.port(),
            });
        }
        let hop = waypoint_hop(snapshot, gw, dst, &svc.key, pick)?;
        if hop.addr.ip() != src_ip {
            return Ok(Route {
                service,
                endpoint: EndpointAddr(dst),
                workload: None,
                hbone: true,
                waypoint: Some(hop),
                locality: None,
            });
        }
    }
    let dst = match &service {
        None => dst,
        Some(svc) => {
            if !svc.has_port(dst.port()) {
                return Err(RouteError::NoSuchPort {
                    service: svc.key.clone(),
                    port: dst.port(),
                });
            }
            if svc.def.as_ref().is_some_and(|d| d.passthrough) {
                // No endpoint to pick: the address dialled is the destination (a ServiceEntry
                // with resolution NONE, often a block of external addresses).
                return route_to_address(snapshot, src_ip, dst, service.clone(), pick);
            }
            // Where the client runs, for a service that keeps traffic local.
            let client = snapshot
                .by_ip(src_ip)
                .map(|w| (w, snapshot.telemetry_of(w)));
            let near = client.map(|(w, t)| Near {
                node: &w.node,
                meta: &t.meta,
            });
            let Some(picked) = svc.pick_near(near, dst.ip(), dst.port(), pick == Pick::Peek) else {
                return Err(RouteError::NoEndpoint {
                    service: svc.key.clone(),
                    strict: svc
                        .def
                        .as_ref()
                        .and_then(|d| d.load_balancing.as_ref())
                        .is_some_and(|lb| lb.mode == crate::xds::LbMode::Strict),
                });
            };
            let mut route = route_to_address(snapshot, src_ip, picked.addr, service.clone(), pick)?;
            route.locality = picked.why;
            return Ok(route);
        }
    };
    route_to_address(snapshot, src_ip, dst, service, pick)
}

/// The route to the workload at `dst` (if one is known there): HBONE if it speaks it, through
/// its waypoint if it has one (unless the connection comes from that waypoint).
fn route_to_address(
    snapshot: &Snapshot,
    src_ip: IpAddr,
    dst: SocketAddr,
    service: Option<Arc<ServiceEntry>>,
    pick: Pick,
) -> Result<Route, RouteError> {
    let workload = snapshot.by_ip(dst.ip()).cloned();
    let hbone = workload.as_ref().is_some_and(|w| w.hbone);
    let waypoint = match workload
        .as_ref()
        .and_then(|w| Some((w, w.waypoint.as_ref()?)))
    {
        Some((w, gw)) => {
            let of: Arc<str> = w.display_name().into();
            Some(waypoint_hop(snapshot, gw, dst, &of, pick)?).filter(|h| h.addr.ip() != src_ip)
        }
        None => None,
    };
    Ok(Route {
        service,
        endpoint: EndpointAddr(dst),
        workload,
        hbone,
        waypoint,
        locality: None,
    })
}

/// Where waypoint `gw` is and which identity it must present.
fn waypoint_hop(
    snapshot: &Snapshot,
    gw: &XdsGateway,
    authority: SocketAddr,
    of: &Arc<str>,
    pick: Pick,
) -> Result<WaypointHop, RouteError> {
    let unknown = |waypoint: String| RouteError::UnknownWaypoint {
        waypoint,
        of: of.clone(),
    };
    let (ip, w) = match &gw.destination {
        GatewayDestination::Address(ip) => {
            let w = snapshot
                .by_ip(*ip)
                .filter(|w| w.hbone)
                .ok_or_else(|| unknown(ip.to_string()))?;
            (*ip, w.clone())
        }
        GatewayDestination::Hostname {
            namespace,
            hostname,
        } => {
            let key = format!("{namespace}/{hostname}");
            let svc = snapshot.service(&key).ok_or_else(|| unknown(key.clone()))?;
            let picked = match pick {
                Pick::Next => svc.pick(authority.ip(), gw.hbone_mtls_port),
                Pick::Peek => svc.peek(authority.ip(), gw.hbone_mtls_port),
            };
            let (w, addr) = picked.ok_or_else(|| unknown(key.clone()))?;
            (addr.ip(), w)
        }
    };
    Ok(WaypointHop {
        addr: SocketAddr::new(ip, gw.hbone_mtls_port),
        identity: w.identity.clone(),
        name: w.display_name(),
        authority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        config::Config,
        state::StateWriter,
        xds::{AddressResource, XdsService, XdsSink, XdsWorkload},
    };

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test IP")
    }

    fn workload(name: &str, addr: &str, waypoint: Option<&str>) -> (String, AddressResource) {
        let uid = format!("Kubernetes//Pod/default/{name}");
        let w = XdsWorkload {
            uid: uid.clone(),
            name: name.to_owned(),
            namespace: "default".to_owned(),
            ips: vec![ip(addr)],
            hostname: String::new(),
            identity: Identity::new("cluster.local", "default", name).expect("identity"),
            hbone: true,
            host_network: false,
            node: "node-b".to_owned(),
            services: Vec::new(),
            authorization_policies: Vec::new(),
            waypoint: waypoint.map(|a| XdsGateway {
                destination: GatewayDestination::Address(ip(a)),
                hbone_mtls_port: 15008,
            }),
            healthy: true,
            workload_name: name.to_owned(),
            meta: Default::default(),
        };
        (uid, AddressResource::Workload(w))
    }

    fn snapshot(service_waypoint: Option<&str>) -> Arc<Snapshot> {
        let config = Config::parse("node: node-a\ncgroup: /x\n", std::path::Path::new("t.yaml"))
            .expect("config");
        let sources = StateWriter::new(Arc::new(config), |_, _| {});
        let svc = XdsService {
            name: "web".into(),
            namespace: "default".into(),
            hostname: "web.default.svc".into(),
            vips: vec![ip("10.96.0.1")],
            vip_ranges: Vec::new(),
            passthrough: false,
            ports: vec![(80, 8080)],
            protocols: Vec::new(),
            load_balancing: None,
            waypoint: service_waypoint.map(|a| XdsGateway {
                destination: GatewayDestination::Address(ip(a)),
                hbone_mtls_port: 15008,
            }),
        };
        sources.apply_addresses(
            vec![
                workload("server", "10.2.0.2", Some("10.2.0.9")),
                workload("waypoint", "10.2.0.9", None),
                (
                    "default/web.default.svc".into(),
                    AddressResource::Service(svc),
                ),
            ],
            Vec::new(),
        );
        sources.snapshot()
    }

    #[test]
    fn a_workload_with_a_waypoint_is_reached_through_it_asking_for_the_workload() {
        let snap = snapshot(None);
        let dst: SocketAddr = "10.2.0.2:8080".parse().expect("addr");
        let r = route(&snap, ip("10.1.0.2"), OrigDstAddr(dst), Pick::Next).expect("route");
        let hop = r.waypoint.expect("through the waypoint");
        assert_eq!(hop.addr, "10.2.0.9:15008".parse().expect("addr"));
        assert_eq!(hop.authority, dst);
        assert_eq!(hop.identity.service_account(), "waypoint");
        // The waypoint's own connection to the workload goes straight to it.
        let r = route(&snap, ip("10.2.0.9"), OrigDstAddr(dst), Pick::Next).expect("route");
        assert!(
            r.waypoint.is_none() && r.hbone,
            "no loop back to the waypoint"
        );
    }

    #[test]
    fn a_service_with_a_waypoint_hands_the_waypoint_the_vip() {
        let snap = snapshot(Some("10.2.0.9"));
        let vip: SocketAddr = "10.96.0.1:80".parse().expect("addr");
        let r = route(&snap, ip("10.1.0.2"), OrigDstAddr(vip), Pick::Next).expect("route");
        let hop = r.waypoint.expect("through the waypoint");
        assert_eq!(hop.authority, vip, "the waypoint picks the endpoint");
        assert!(r.workload.is_none());
        assert!(matches!(
            route(
                &snap,
                ip("10.1.0.2"),
                "10.96.0.1:81".parse().expect("addr"),
                Pick::Next
            ),
            Err(RouteError::NoSuchPort { .. })
        ));
    }

    /// A ServiceEntry's address blocks: the longest block containing the address wins, an exact
    /// VIP beats any block, and a PASSTHROUGH service connects to the address dialled.
    #[test]
    fn address_blocks_route_to_their_service() {
        let config = Config::parse("node: node-a\ncgroup: /x\n", std::path::Path::new("t.yaml"))
            .expect("config");
        let sources = StateWriter::new(Arc::new(config), |_, _| {});
        let block = |host: &str, ranges: &[&str], vips: &[&str], passthrough: bool| {
            let s = XdsService {
                name: host.into(),
                namespace: "default".into(),
                hostname: host.into(),
                vips: vips.iter().map(|v| ip(v)).collect(),
                vip_ranges: ranges.iter().map(|r| r.parse().expect("cidr")).collect(),
                passthrough,
                ports: vec![(80, 8080)],
                protocols: Vec::new(),
                load_balancing: None,
                waypoint: None,
            };
            (format!("default/{host}"), AddressResource::Service(s))
        };
        let mut server = workload("server", "10.2.0.2", None);
        if let AddressResource::Workload(w) = &mut server.1 {
            w.services = vec![crate::xds::WorkloadService {
                key: "default/wide".into(),
                namespace: "default".into(),
                hostname: "wide".into(),
                ports: Vec::new(),
            }];
        }
        sources.apply_addresses(
            vec![
                server,
                workload("ext", "10.50.1.7", None),
                block("wide", &["10.50.0.0/16"], &[], false),
                block("narrow", &["10.50.1.0/24"], &[], true),
                block("exact", &[], &["10.50.1.9"], true),
            ],
            Vec::new(),
        );
        let snap = sources.snapshot();
        let key = |a: &str| {
            snap.service_by_vip(ip(a))
                .map(|e| e.key.to_string())
                .unwrap_or_default()
        };
        assert_eq!(key("10.50.200.1"), "default/wide");
        assert_eq!(
            key("10.50.1.200"),
            "default/narrow",
            "the longest block wins"
        );
        assert_eq!(
            key("10.50.1.9"),
            "default/exact",
            "an exact VIP beats a block"
        );
        assert_eq!(key("10.51.0.1"), "", "outside every block");
        // The /16 picks an endpoint; the PASSTHROUGH /24 keeps the address dialled (and reaches
        // the workload there over HBONE).
        let wide = route(
            &snap,
            ip("10.1.0.2"),
            "10.50.200.1:80".parse().expect("a"),
            Pick::Next,
        )
        .expect("route");
        assert_eq!(wide.endpoint.0, "10.2.0.2:8080".parse().expect("a"));
        let narrow = route(
            &snap,
            ip("10.1.0.2"),
            "10.50.1.7:80".parse().expect("a"),
            Pick::Next,
        )
        .expect("route");
        assert_eq!(narrow.endpoint.0, "10.50.1.7:80".parse().expect("a"));
        assert!(narrow.hbone && narrow.workload.is_some());
        assert!(matches!(
            route(
                &snap,
                ip("10.1.0.2"),
                "10.50.1.7:81".parse().expect("a"),
                Pick::Next
            ),
            Err(RouteError::NoSuchPort { .. })
        ));
        // Removing the /24 gives its addresses back to the /16.
        sources.apply_addresses(Vec::new(), vec!["default/narrow".into()]);
        assert_eq!(
            sources
                .snapshot()
                .service_by_vip(ip("10.50.1.200"))
                .map(|e| e.key.to_string()),
            Some("default/wide".into())
        );
    }

    #[test]
    fn an_unknown_waypoint_is_refused_not_bypassed() {
        let snap = snapshot(Some("10.2.0.77"));
        let r = route(
            &snap,
            ip("10.1.0.2"),
            "10.96.0.1:80".parse().expect("addr"),
            Pick::Next,
        );
        assert!(
            matches!(r, Err(RouteError::UnknownWaypoint { .. })),
            "fail closed"
        );
    }
}
