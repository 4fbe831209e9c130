//! Byte-counted bidirectional copy between the two sides of a proxied connection.
//!
//! Both directions run in the connection's own task (no extra spawn), each with one buffer
//! allocated up front and reused: no allocation per chunk. When one side finishes sending, the
//! write half of the other side is shut down, so half-closed connections behave as they would
//! without the proxy. Counts are kept in shared atomics so a live connection's progress can be
//! read from outside (ambitctl) while it runs.

use std::{
    io,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Size of each direction's buffer.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Bytes moved so far, per direction, from the source's point of view.
#[derive(Debug, Default)]
pub struct ByteCounts {
    /// Source -> destination.
    pub sent: AtomicU64,
    /// Destination -> source.
    pub received: AtomicU64,
}

impl ByteCounts {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Which side of the proxy an error came from, for access logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// The connection from the source (the client, or the previous hop).
    Downstream,
    /// The connection to the destination.
    Upstream,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{} {op} failed: {cause}", side.as_str())]
pub struct CopyError {
    pub side: Side,
    pub op: &'static str,
    pub cause: io::Error,
}

/// Copies `downstream` <-> `upstream` until both directions end. Returns the first error, if any;
/// byte counts are in `counts` either way.
pub async fn copy_bidirectional<D, U>(
    downstream: D,
    upstream: U,
    counts: Arc<ByteCounts>,
) -> Result<(), CopyError>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut down_r, mut down_w) = tokio::io::split(downstream);
    let (mut up_r, mut up_w) = tokio::io::split(upstream);
    let forward = pump(
        &mut down_r,
        &mut up_w,
        &counts.sent,
        Side::Downstream,
        Side::Upstream,
    );
    let backward = pump(
        &mut up_r,
        &mut down_w,
        &counts.received,
        Side::Upstream,
        Side::Downstream,
    );
    let (a, b) = tokio::join!(forward, backward);
    a.and(b)
}

async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    from_side: Side,
    to_side: Side,
) -> Result<(), CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(cause) => {
                // Let the other side see the end too, then report.
                let _ = to.shutdown().await;
                return Err(CopyError {
                    side: from_side,
                    op: "read",
                    cause,
                });
            }
        };
        to.write_all(&buf[..n]).await.map_err(|cause| CopyError {
            side: to_side,
            op: "write",
            cause,
        })?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    to.shutdown().await.map_err(|cause| CopyError {
        side: to_side,
        op: "shutdown",
        cause,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_both_ways_and_counts() {
        let (client, proxy_down) = tokio::io::duplex(1024);
        let (proxy_up, server) = tokio::io::duplex(1024);
        let counts = Arc::new(ByteCounts::default());
        let proxy = tokio::spawn(copy_bidirectional(proxy_down, proxy_up, counts.clone()));

        let server = tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(server);
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.expect("server read");
            w.write_all(b"pong!").await.expect("server write");
            w.shutdown().await.expect("server shutdown");
            got
        });
        let (mut r, mut w) = tokio::io::split(client);
        let payload = vec![7u8; 200_000];
        w.write_all(&payload).await.expect("client write");
        w.shutdown().await.expect("client shutdown");
        let mut reply = Vec::new();
        r.read_to_end(&mut reply).await.expect("client read");

        assert_eq!(server.await.expect("server task"), payload);
        assert_eq!(reply, b"pong!");
        proxy.await.expect("proxy task").expect("copy ok");
        assert_eq!(counts.sent(), 200_000);
        assert_eq!(counts.received(), 5);
    }
}
