//! An HBONE stream (one HTTP/2 `CONNECT` stream) as a byte stream: `AsyncRead` + `AsyncWrite`,
//! so an HTTP server or client (the waypoint's hyper) can run inside a tunnel.
//!
//! Reads hand out the DATA frames received and give the flow-control window back as the bytes
//! are consumed (backpressure reaches the peer). Writes wait for send capacity and queue at most
//! what was granted. Shutdown sends `END_STREAM`; dropping the stream without it resets it.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A `CONNECT` stream's two halves as one byte stream. `guard` is kept alive with it (the pool's
/// stream slot of a client tunnel).
pub struct H2Stream<G = ()> {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet read.
    pending: Bytes,
    /// Bytes read since the window was last given back.
    unreleased: usize,
    recv_done: bool,
    _guard: G,
}

impl<G> H2Stream<G> {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream, guard: G) -> H2Stream<G> {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            unreleased: 0,
            recv_done: false,
            _guard: guard,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e.to_string())
}

impl<G: Unpin> AsyncRead for H2Stream<G> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                this.unreleased += n;
                // Give the window back in batches rather than per small read.
                if this.pending.is_empty() || this.unreleased >= 16 * 1024 {
                    let _ = this.recv.flow_control().release_capacity(this.unreleased);
                    this.unreleased = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.recv_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => this.recv_done = true,
            }
        }
    }
}

impl<G: Unpin> AsyncWrite for H2Stream<G> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.send;
        send.reserve_capacity(buf.len());
        loop {
            let granted = send.capacity();
            if granted > 0 {
                let n = granted.min(buf.len());
                send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(to_io)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(send.poll_capacity(cx)) {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "stream closed by peer",
                    )));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 sends queued frames from its connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            // Already ended (or reset): nothing more to say.
            Err(e) if !e.is_io() => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(to_io(e))),
        }
    }
}
