//! HBONE server: the pod's 15008 listener. Terminates mutual TLS (the client's SPIFFE identity
//! comes from its certificate), then accepts HTTP/2 `CONNECT` streams and hands each one to
//! `proxy::inbound::hbone`, the inbound flow it shares with plaintext (statuses as ztunnel
//! answers: `proxy::result::Error::status`).
//!
//! A client is bounded everywhere ([`ServerSettings`], `proxy::limits`): handshakes in flight per
//! agent and per source IP, a timeout on each handshake step, `SETTINGS_MAX_CONCURRENT_STREAMS`
//! and `SETTINGS_MAX_HEADER_LIST_SIZE`, h2's rapid-reset accounting, a stream budget per identity,
//! PINGs that close a connection whose peer stopped answering, and a GOAWAY for one idle too
//! long.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use h2::server::SendResponse;
use http::Request;
use tokio::net::TcpStream;
use tracing::{debug, info, warn};

use super::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::{identity::Identity, tls};

/// How an HBONE server treats its clients (from `hbone` and `limits` in the config).
#[derive(Clone, Debug)]
pub struct ServerSettings {
    /// For the TLS and the HTTP/2 handshake each.
    pub handshake_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub max_header_list_bytes: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// A connection without a stream for this long gets a GOAWAY.
    pub idle_timeout: Duration,
}

impl ServerSettings {
    pub fn from_config(config: &crate::config::Config) -> ServerSettings {
        ServerSettings::new(&config.hbone, &config.limits)
    }

    pub fn new(hbone: &crate::config::HboneConfig, limits: &crate::config::Limits) -> Self {
        ServerSettings {
            handshake_timeout: limits.handshake_timeout,
            max_concurrent_streams: hbone.max_concurrent_streams,
            max_header_list_bytes: hbone.max_header_list_bytes,
            keepalive_interval: hbone.keepalive_interval,
            keepalive_timeout: hbone.keepalive_timeout,
            idle_timeout: hbone.server_idle_timeout,
        }
    }
}

impl Default for ServerSettings {
    /// The config's defaults.
    fn default() -> Self {
        ServerSettings::new(&Default::default(), &Default::default())
    }
}

/// How an HBONE connection to us ended, for the caller's log and metrics.
#[derive(Debug)]
pub enum Ended {
    /// The client closed it, or it drained after a GOAWAY.
    Closed,
    /// No stream for the idle timeout: GOAWAY sent, then closed.
    Idle,
    /// The client stopped answering PINGs.
    Unresponsive,
    /// A protocol error; `ENHANCE_YOUR_CALM` is h2 cutting off a client that resets streams
    /// faster than they are accepted (HTTP/2 rapid reset) or keeps opening streams past the
    /// limit after being refused (a stream flood).
    Error(h2::Error),
}

impl Ended {
    /// The limit to count it under, if a limit ended it.
    pub fn limit(&self) -> Option<&'static str> {
        match self {
            Ended::Error(e) if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) => {
                Some("h2_flood")
            }
            Ended::Unresponsive => Some("keepalive"),
            _ => None,
        }
    }
}

/// Held by a stream's task while it lives: the connection is not idle while one is held.
pub struct StreamToken(Arc<AtomicUsize>);

impl Drop for StreamToken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Logs how an HBONE connection to us ended, when it says something.
pub fn log_end(ended: &Ended, peer: SocketAddr, client: &Identity) {
    match ended {
        Ended::Closed => {}
        Ended::Idle => {
            debug!(src.addr = %peer, src.identity = %client, "idle HBONE connection closed (GOAWAY)")
        }
        Ended::Unresponsive => {
            warn!(src.addr = %peer, src.identity = %client, "HBONE client stopped answering pings; connection closed")
        }
        Ended::Error(e) if e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) => warn!(
            src.addr = %peer,
            src.identity = %client,
            "HBONE client reset or opened streams faster than allowed (HTTP/2 rapid reset or a stream flood); connection closed with ENHANCE_YOUR_CALM"
        ),
        Ended::Error(e) => debug!(src.addr = %peer, error = %e, "HBONE connection ended"),
    }
}

/// An HBONE connection after its TLS and HTTP/2 handshakes.
pub struct Accepted {
    /// The client's verified SPIFFE identity.
    pub client: Identity,
    pub conn: h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>,
}

/// The TLS (client certificate required, `config`) and HTTP/2 handshakes of an accepted HBONE
/// connection to `local` (the identity served, for the log), each bounded in time. Refusals are
/// logged with the reason and give `None`.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    peer: SocketAddr,
    local: &Identity,
    settings: &ServerSettings,
) -> Option<Accepted> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let tls = match tokio::time::timeout(settings.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            // The common case of a refused peer: wrong CA, no certificate, wrong trust domain.
            warn!(src.addr = %peer, error = %e, "HBONE TLS handshake refused");
            return None;
        }
        Err(_) => {
            warn!(src.addr = %peer, "HBONE TLS handshake timed out");
            return None;
        }
    };
    let (_, session) = tls.get_ref();
    let Some(client) = tls::peer_identity(session) else {
        // The verifier already insists on a SPIFFE id; this is a belt-and-braces check.
        warn!(src.addr = %peer, "HBONE client presented no SPIFFE identity; closing");
        return None;
    };
    let serial = session
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(crate::identity::ca::serial_hex)
        .unwrap_or_default();
    info!(
        src.addr = %peer,
        src.identity = %client,
        src.serial = %serial,
        dst.identity = %local,
        "hbone connection accepted"
    );
    match tokio::time::timeout(
        settings.handshake_timeout,
        h2_builder(settings).handshake::<_, Bytes>(tls),
    )
    .await
    {
        Ok(Ok(conn)) => Some(Accepted { client, conn }),
        Ok(Err(e)) => {
            warn!(src.addr = %peer, error = %e, "HBONE HTTP/2 handshake failed");
            None
        }
        Err(_) => {
            warn!(src.addr = %peer, "HBONE HTTP/2 handshake timed out");
            None
        }
    }
}

/// Hands every stream of `conn` to `on_stream` (with a token its task holds while it lives) until
/// the connection ends. When `draining` fires, GOAWAY tells the client to open new streams
/// elsewhere; the streams in flight finish, then the connection closes. A client that stops
/// answering PINGs is dropped; a connection without a stream for the idle timeout gets a GOAWAY.
pub async fn accept_streams<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut conn: h2::server::Connection<T, Bytes>,
    draining: &tokio_util::sync::CancellationToken,
    settings: &ServerSettings,
    mut on_stream: impl FnMut(Request<h2::RecvStream>, SendResponse<Bytes>, StreamToken),
) -> Ended {
    let active = Arc::new(AtomicUsize::new(0));
    let pinger = conn.ping_pong();
    let alive = super::keepalive(
        pinger,
        settings.keepalive_interval,
        settings.keepalive_timeout,
    );
    tokio::pin!(alive);
    let mut idle_check = tokio::time::interval(
        (settings.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)),
    );
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle_since = Instant::now();
    let mut goaway_sent = false;
    let mut idle = false;
    loop {
        let next = tokio::select! {
            next = conn.accept() => next,
            _ = draining.cancelled(), if !goaway_sent => {
                conn.graceful_shutdown();
                goaway_sent = true;
                continue;
            }
            () = &mut alive => return Ended::Unresponsive,
            _ = idle_check.tick(), if !goaway_sent => {
                if active.load(Ordering::Acquire) > 0 {
                    idle_since = Instant::now();
                } else if idle_since.elapsed() >= settings.idle_timeout {
                    conn.graceful_shutdown();
                    goaway_sent = true;
                    idle = true;
                }
                continue;
            }
        };
        match next {
            Some(Ok((request, respond))) => {
                active.fetch_add(1, Ordering::AcqRel);
                on_stream(request, respond, StreamToken(active.clone()));
            }
            Some(Err(e)) => return Ended::Error(e),
            None if idle => return Ended::Idle,
            None => return Ended::Closed,
        }
    }
}

/// HTTP/2 server settings for HBONE (large windows and frames, see the module docs of `tunnel`;
/// the bounds of `settings`). Each is set explicitly, so a new h2 release cannot move one unseen.
pub fn h2_builder(settings: &ServerSettings) -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(MAX_FRAME as usize)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_bytes)
        // Rapid reset: streams the client resets before we accept them; past this, GOAWAY
        // ENHANCE_YOUR_CALM (h2's default, made explicit).
        .max_pending_accept_reset_streams(20)
        .max_concurrent_reset_streams(50)
        .max_local_error_reset_streams(Some(1024));
    b
}
