//! Byte-counted bidirectional copy between the two sides of a proxied connection, shared by the
//! proxy and the tunnel.
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
    /// Neither end: the agent itself, or its control plane (not synced yet, a limit).
    Internal,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
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

/// Copies `downstream` <-> `upstream` until both directions end, or either fails (then both
/// connections are closed). Returns the first error, if any; byte counts are in `counts` either
/// way.
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
    // A failure of either direction ends both: a peer that reset its connection must not leave
    // the other connection open, waiting for bytes that will never come.
    tokio::try_join!(forward, backward).map(|_| ())
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

    /// A client that resets its connection: the proxy closes the server's connection too, even
    /// though the server never sends or closes (sockperf's server waits like that).
    #[tokio::test]
    async fn a_reset_on_one_side_closes_the_other() {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let back = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (front_addr, back_addr) = (
            front.local_addr().expect("a"),
            back.local_addr().expect("a"),
        );
        let proxy = tokio::spawn(async move {
            let (down, _) = front.accept().await.expect("accept");
            let up = tokio::net::TcpStream::connect(back_addr)
                .await
                .expect("connect");
            copy_bidirectional(down, up, Arc::default()).await
        });
        let client = tokio::net::TcpStream::connect(front_addr)
            .await
            .expect("client");
        let (mut server, _) = back.accept().await.expect("server accept");
        // RST instead of FIN.
        socket2::SockRef::from(&client)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(client);
        let mut buf = [0u8; 16];
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("the server's connection is closed, not left open");
        assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
        let result = proxy.await.expect("proxy task");
        assert!(result.is_err(), "the reset is reported");
    }

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
