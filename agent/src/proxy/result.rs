//! What became of one connection: the typed [`Error`] that ended it (who is at fault, what to
//! check, the HBONE status it is answered with) and the [`ConnectionResult`] guard that writes
//! the connection's access-log line exactly once, on every path: success, each refusal, an error
//! mid-copy, and a task dropped before it finished (shutdown).
//!
//! The handlers fill in the record as they learn (destination, identities, route) and return
//! `Result<(), Error>`; the guard turns that into the line. Metrics are the live registry's
//! (`live.rs`), counted when a connection registers and when it closes.

use std::{io, net::SocketAddr, sync::Arc, time::Instant};

use http::StatusCode;
use tracing::info;

use super::{
    Direction,
    copy::{ByteCounts, CopyError, Side},
    gate::NotSynced,
    limits::LimitHit,
    outbound::RouteError,
};
use crate::{identity::Identity, policy::Decision, telemetry::Transport};

/// Why a connection ended without carrying its bytes, or ended badly.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An outbound connection the connect hook did not redirect (someone dialed 15001).
    #[error(
        "no original destination recorded (connection not redirected by ambit's connect hook?)"
    )]
    NoOriginalDestination,
    /// The accepted socket's local address (the inbound original destination) is unreadable.
    #[error("cannot read original destination: {0}")]
    LocalAddress(io::Error),
    /// The destination is one of the agent's own ports on the pod's address: forwarding it
    /// would loop.
    #[error("connection to {0}: port {port} is the agent's own; refusing", port = .0.port())]
    OwnPort(SocketAddr),
    /// An HBONE `CONNECT` to an address the pod does not have.
    #[error("CONNECT to {dst}: not an address of pod {pod}")]
    NotPodAddress { dst: SocketAddr, pod: String },
    /// An HBONE request that is not a usable `CONNECT` (method, authority).
    #[error("{0}")]
    BadRequest(String),
    /// An HBONE `CONNECT` to a service hostname this pod cannot serve.
    #[error("{0}")]
    UnknownHostname(String),
    /// The client went away while the agent waited (`while` says for what).
    #[error("the client closed the connection {0}")]
    ClientGone(&'static str),
    /// Held for the control plane's first full state, and refused.
    #[error(transparent)]
    NotSynced(NotSynced),
    /// A connection or stream budget was full.
    #[error(transparent)]
    Limit(LimitHit),
    /// No way to the destination (a service without the port or a usable endpoint).
    #[error(transparent)]
    Route(RouteError),
    /// Refused before policy: the connection skipped the destination's waypoint.
    #[error("{0}")]
    Bypass(String),
    /// The authorization policy denied it; nothing reached the app.
    #[error("denied by authorization policy")]
    Denied,
    /// The pod has no certificate yet (CA slow or down): no tunnel, and never plaintext.
    #[error("no certificate to tunnel with: {0}")]
    NoCertificate(String),
    /// Connecting to the destination (the app, inbound) failed.
    #[error("connect to {}{dst} failed: {cause}", if *.app { "app at " } else { "" })]
    Connect {
        dst: SocketAddr,
        app: bool,
        cause: io::Error,
    },
    /// The HBONE tunnel could not be opened (the message names the hop and the status).
    #[error("{0}")]
    Tunnel(String),
    /// The HBONE `200` could not be sent.
    #[error("cannot answer CONNECT: {0}")]
    Answer(String),
    /// Reading or writing a side failed mid-copy.
    #[error(transparent)]
    Copy(CopyError),
    /// The agent closed it: a policy change no longer allows it, or the pod left the mesh.
    #[error("{0}")]
    Closed(String),
    /// DNS over TCP (the DNS proxy) failed reading or writing a message.
    #[error("DNS over TCP: {0}")]
    Dns(io::Error),
    /// The handler was dropped before it finished (shutdown after the drain timeout).
    #[error("the agent stopped serving the connection before it ended (shutdown)")]
    Abandoned,
}

impl Error {
    /// Who is at fault, as the access log's `fault`.
    pub fn side(&self) -> Side {
        match self {
            Error::NoOriginalDestination
            | Error::LocalAddress(_)
            | Error::OwnPort(_)
            | Error::NotPodAddress { .. }
            | Error::BadRequest(_)
            | Error::UnknownHostname(_)
            | Error::ClientGone(_)
            | Error::Bypass(_)
            | Error::Denied
            | Error::NoCertificate(_)
            | Error::Answer(_)
            | Error::Closed(_)
            | Error::Dns(_) => Side::Downstream,
            Error::Connect { .. } | Error::Tunnel(_) => Side::Upstream,
            Error::Route(e) => e.side(),
            Error::Copy(e) => e.side,
            Error::NotSynced(_) | Error::Limit(_) | Error::Abandoned => Side::Internal,
        }
    }

    /// The limit or missing state that refused the connection (the `reason` label of
    /// `ambit_connections_refused_total`).
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Error::NotSynced(e) => Some(e.reason()),
            Error::Limit(hit) => Some(hit.limit.reason()),
            _ => None,
        }
    }

    /// The status an HBONE `CONNECT` that failed this way is answered with, as ztunnel answers:
    /// 400 for a request that can never work, 401 for a policy refusal, 503 for the rest.
    pub fn status(&self) -> StatusCode {
        match self {
            Error::BadRequest(_) | Error::NotPodAddress { .. } => StatusCode::BAD_REQUEST,
            Error::Bypass(_) | Error::Denied => StatusCode::UNAUTHORIZED,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// One access-log record, filled in as the connection progresses.
pub struct AccessLog {
    pub direction: Direction,
    pub src: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub src_workload: Option<String>,
    pub dst_workload: Option<String>,
    /// The service, when the destination was a service VIP.
    pub dst_service: Option<String>,
    /// The endpoint chosen for a service VIP.
    pub dst_endpoint: Option<SocketAddr>,
    pub src_identity: Option<Identity>,
    pub dst_identity: Option<Identity>,
    pub path: Transport,
    pub counts: Arc<ByteCounts>,
    pub start: Instant,
    /// The authorization decision, for inbound connections.
    pub authz: Option<Decision>,
    /// The W3C `traceparent` of the tunnel (sent outbound, received inbound), to find one
    /// connection in both agents' logs.
    pub trace: Option<String>,
    /// Why the endpoint was chosen, when the service keeps traffic local.
    pub locality: Option<String>,
}

impl AccessLog {
    /// A record with only what every connection has; the rest is filled in as it is learnt.
    pub fn new(direction: Direction, src: SocketAddr, start: Instant) -> AccessLog {
        AccessLog {
            direction,
            src,
            dst: None,
            src_workload: None,
            dst_workload: None,
            dst_service: None,
            dst_endpoint: None,
            src_identity: None,
            dst_identity: None,
            path: Transport::Passthrough,
            counts: Arc::default(),
            start,
            authz: None,
            trace: None,
            locality: None,
        }
    }

    fn emit(&self, error: Option<&Error>) {
        let dst = self.dst.map(|d| d.to_string());
        let dst = dst.as_deref().unwrap_or("unknown");
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let message = error.map(ToString::to_string);
        info!(
            target: "access",
            direction = self.direction.as_str(),
            src.addr = %self.src,
            dst.addr = dst,
            src.workload = self.src_workload.as_deref(),
            dst.workload = self.dst_workload.as_deref(),
            dst.service = self.dst_service.as_deref(),
            dst.endpoint = self.dst_endpoint.map(tracing::field::display),
            src.identity = self.src_identity.as_ref().map(tracing::field::display),
            dst.identity = self.dst_identity.as_ref().map(tracing::field::display),
            path = self.path.as_str(),
            bytes_sent = self.counts.sent(),
            bytes_received = self.counts.received(),
            duration_ms,
            fault = error.map(|e| e.side().as_str()),
            error = message.as_deref(),
            limit = error.and_then(Error::limit),
            authz.policy = self.authz.as_ref().and_then(|d| d.policy.as_deref()),
            authz.decision = self.authz.as_ref().map(|d| tracing::field::display(d.describe())),
            traceparent = self.trace.as_deref(),
            dst.locality = self.locality.as_deref(),
            "connection complete"
        );
    }
}

/// Writes a connection's access-log line when dropped: with the outcome given to
/// [`ConnectionResult::finish`], or as [`Error::Abandoned`] if the handler never got there.
pub struct ConnectionResult {
    pub log: AccessLog,
    outcome: Option<Result<(), Error>>,
}

impl ConnectionResult {
    pub fn new(log: AccessLog) -> ConnectionResult {
        ConnectionResult { log, outcome: None }
    }

    /// Records how the connection ended; the line is written now.
    pub fn finish(mut self, outcome: Result<(), Error>) {
        self.outcome = Some(outcome);
    }
}

impl Drop for ConnectionResult {
    fn drop(&mut self) {
        match &self.outcome {
            Some(Ok(())) => self.log.emit(None),
            Some(Err(e)) => self.log.emit(Some(e)),
            None => self.log.emit(Some(&Error::Abandoned)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hbone_statuses_are_ztunnels() {
        let dst: SocketAddr = "10.1.0.3:8080".parse().expect("addr");
        assert_eq!(Error::Denied.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            Error::Bypass("skipped the waypoint".into()).status(),
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            Error::NotPodAddress {
                dst,
                pod: "default/echo".into()
            }
            .status(),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            Error::OwnPort(dst).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            Error::Connect {
                dst,
                app: true,
                cause: io::ErrorKind::ConnectionRefused.into()
            }
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[test]
    fn faults_and_limits_say_where_to_look() {
        let timeout = Error::NotSynced(NotSynced::Timeout(std::time::Duration::from_secs(5)));
        assert_eq!(timeout.side(), Side::Internal);
        assert_eq!(timeout.limit(), Some("control_plane_not_synced"));
        let connect = Error::Connect {
            dst: "10.2.0.2:80".parse().expect("addr"),
            app: false,
            cause: io::ErrorKind::TimedOut.into(),
        };
        assert_eq!(connect.side(), Side::Upstream);
        assert_eq!(connect.limit(), None);
        assert!(
            connect
                .to_string()
                .starts_with("connect to 10.2.0.2:80 failed"),
            "{connect}"
        );
        assert_eq!(Error::Denied.side(), Side::Downstream);
    }
}
