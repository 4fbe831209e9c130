//! HBONE: TCP connections carried as HTTP/2 `CONNECT` streams over mutual TLS 1.3, on port 15008,
//! wire-compatible with Istio's ztunnel.
//!
//! ```text
//! outbound (pod A netns)                                   pod B netns
//! app bytes -> pump -> h2 stream ─┐                    ┌─> server: CONNECT B:8080 -> 200 -> pump -> app
//!              client::Pool: one TLS+h2 connection per  │    (client identity from the TLS handshake)
//!              (src id, src IP, src cert, dst id, dst) ─┴── TLS 1.3, ALPN h2, SPIFFE both ways
//! ```
//!
//! HTTP/2 is tuned for bulk and latency: multi-MiB stream and connection windows so one stream
//! can fill a fast link, large frames, `TCP_NODELAY` on the underlying socket. The pump hands the
//! bytes read from TCP to h2 without copying them again.

pub mod client;
pub mod metadata;
pub mod server;
pub mod stream;

use std::{
    future::poll_fn,
    io,
    sync::{Arc, atomic::Ordering},
};

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::copy::{ByteCounts, CopyError, Side};

/// HBONE's port.
pub const HBONE_PORT: u16 = ambit_common::HBONE_PORT;
/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection flow-control window (shared by all streams of the connection).
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame we accept.
pub const MAX_FRAME: u32 = 256 * 1024;
/// How much the pump reads from TCP at once.
const READ_CHUNK: usize = 64 * 1024;

/// Which end of the tunnel the TCP side is.
#[derive(Clone, Copy)]
pub enum TcpSide {
    /// The TCP connection is the source (outbound: the app's connection).
    Source,
    /// The TCP connection is the destination (inbound: the connection to the app).
    Destination,
}

/// Copies a TCP connection <-> an HTTP/2 stream until both directions end, counting bytes from
/// the source's point of view. An error on either side ends both: the stream is reset and the
/// TCP connection closed when they are dropped.
pub async fn pump<T>(
    tcp: T,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    tcp_side: TcpSide,
    counts: Arc<ByteCounts>,
) -> Result<(), CopyError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let (tcp_to_h2, h2_to_tcp, tcp_fault, h2_fault) = match tcp_side {
        TcpSide::Source => (
            &counts.sent,
            &counts.received,
            Side::Downstream,
            Side::Upstream,
        ),
        TcpSide::Destination => (
            &counts.received,
            &counts.sent,
            Side::Upstream,
            Side::Downstream,
        ),
    };
    let (mut tcp_r, mut tcp_w) = tokio::io::split(tcp);

    let up = async {
        let mut buf = BytesMut::with_capacity(READ_CHUNK);
        loop {
            buf.reserve(READ_CHUNK);
            let n = match tcp_r.read_buf(&mut buf).await {
                Ok(n) => n,
                Err(e) => {
                    send.send_reset(h2::Reason::CANCEL);
                    return Err(CopyError {
                        side: tcp_fault,
                        op: "read",
                        cause: e,
                    });
                }
            };
            if n == 0 {
                // Half close: END_STREAM, the other direction keeps flowing.
                return send
                    .send_data(Bytes::new(), true)
                    .map_err(|e| h2_error(h2_fault, "write", e));
            }
            let mut chunk = buf.split().freeze();
            while !chunk.is_empty() {
                send.reserve_capacity(chunk.len());
                let granted = match poll_fn(|cx| send.poll_capacity(cx)).await {
                    Some(Ok(n)) => n,
                    Some(Err(e)) => return Err(h2_error(h2_fault, "write", e)),
                    None => {
                        return Err(CopyError {
                            side: h2_fault,
                            op: "write",
                            cause: io::Error::new(
                                io::ErrorKind::BrokenPipe,
                                "stream closed by peer",
                            ),
                        });
                    }
                };
                if granted == 0 {
                    continue;
                }
                let part = chunk.split_to(granted.min(chunk.len()));
                let len = part.len() as u64;
                send.send_data(part, false)
                    .map_err(|e| h2_error(h2_fault, "write", e))?;
                tcp_to_h2.fetch_add(len, Ordering::Relaxed);
            }
        }
    };

    let down = async {
        while let Some(data) = recv.data().await {
            let data = data.map_err(|e| h2_error(h2_fault, "read", e))?;
            let n = data.len();
            tcp_w.write_all(&data).await.map_err(|e| CopyError {
                side: tcp_fault,
                op: "write",
                cause: e,
            })?;
            h2_to_tcp.fetch_add(n as u64, Ordering::Relaxed);
            // Open the window again only once the bytes are handed to TCP: backpressure.
            let _ = recv.flow_control().release_capacity(n);
        }
        tcp_w.shutdown().await.map_err(|e| CopyError {
            side: tcp_fault,
            op: "shutdown",
            cause: e,
        })
    };

    // A failure of either direction ends both (the caller drops the TCP connection and the
    // stream, which resets it): a reset on one side must not leave the other waiting forever.
    tokio::try_join!(up, down).map(|_| ())
}

fn h2_error(side: Side, op: &'static str, e: h2::Error) -> CopyError {
    let cause = if e.is_io() {
        e.into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"))
    } else {
        io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
    };
    CopyError { side, op, cause }
}

/// Sends a PING every `interval`; returns when one is not answered within `timeout` (the peer is
/// gone or stuck). Never returns without a ping handle.
pub(crate) async fn keepalive(
    pinger: Option<h2::PingPong>,
    interval: std::time::Duration,
    timeout: std::time::Duration,
) {
    let Some(mut pinger) = pinger else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(timeout, pinger.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            // The connection is ending anyway (its own error is reported by `accept`).
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}
