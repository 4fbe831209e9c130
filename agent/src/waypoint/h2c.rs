//! HTTP/2 by upgrade (`Upgrade: h2c`, RFC 7540 section 3.2): the waypoint answers `101 Switching
//! Protocols` and serves HTTP/2 on the same tunnel, the upgrade request itself becoming stream 1.
//!
//! hyper's HTTP/2 server knows nothing of upgrades, so the connection it is given starts with
//! what a prior-knowledge client would have sent: the client's preface and SETTINGS (read from
//! the wire after the 101), then a HEADERS frame for stream 1 carrying the upgrade request
//! (encoded here as HPACK literals without indexing, which leave the client's HPACK table
//! untouched), then the rest of the client's bytes as they come.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Request, header};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest HEADERS frame a peer must accept (the default SETTINGS_MAX_FRAME_SIZE).
const MAX_FRAME: usize = 16_384;
/// Headers that are about the HTTP/1.1 connection, never carried into HTTP/2.
const CONNECTION_HEADERS: [&str; 8] = [
    "connection",
    "upgrade",
    "http2-settings",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "host",
];

/// Whether `req` asks to upgrade to h2c in a way this server can honour: `Upgrade: h2c`,
/// `HTTP2-Settings`, `Connection` naming both, and no request body.
pub fn is_upgrade<B: hyper::body::Body>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    req.version() == http::Version::HTTP_11
        && has_token(header::UPGRADE, "h2c")
        && req.headers().contains_key("http2-settings")
        && has_token(header::CONNECTION, "upgrade")
        && has_token(header::CONNECTION, "http2-settings")
        && req.body().is_end_stream()
}

/// The HEADERS frame (stream 1, END_STREAM | END_HEADERS) for the upgrade request, or `None`
/// when it does not fit one frame (the request is then answered over HTTP/1.1).
pub fn headers_frame<B>(req: &Request<B>) -> Option<Bytes> {
    let mut block = BytesMut::new();
    let authority = req
        .headers()
        .get(header::HOST)
        .map(|h| h.as_bytes().to_vec())
        .unwrap_or_default();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .as_bytes();
    literal(&mut block, b":method", req.method().as_str().as_bytes());
    literal(&mut block, b":scheme", b"http");
    literal(&mut block, b":path", path);
    if !authority.is_empty() {
        literal(&mut block, b":authority", &authority);
    }
    for (name, value) in req.headers() {
        if CONNECTION_HEADERS.contains(&name.as_str()) {
            continue;
        }
        literal(&mut block, name.as_str().as_bytes(), value.as_bytes());
    }
    if block.len() > MAX_FRAME {
        return None;
    }
    let mut frame = BytesMut::with_capacity(9 + block.len());
    let len = block.len() as u32;
    frame.put_slice(&len.to_be_bytes()[1..]);
    frame.put_u8(0x1); // HEADERS
    frame.put_u8(0x1 | 0x4); // END_STREAM | END_HEADERS
    frame.put_u32(1); // stream 1
    frame.put_slice(&block);
    Some(frame.freeze())
}

/// An HPACK "literal header field without indexing — new name" (RFC 7541 section 6.2.2), no
/// Huffman coding.
fn literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0x00);
    string(out, name);
    string(out, value);
}

fn string(out: &mut BytesMut, s: &[u8]) {
    integer(out, s.len(), 7, 0x00);
    out.put_slice(s);
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 section 5.1).
fn integer(out: &mut BytesMut, mut v: usize, n: u32, first_bits: u8) {
    let max = (1usize << n) - 1;
    if v < max {
        out.put_u8(first_bits | v as u8);
        return;
    }
    out.put_u8(first_bits | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v % 128 + 128) as u8);
        v /= 128;
    }
    out.put_u8(v as u8);
}

/// Reads the client's preface and first SETTINGS frame from `io` and returns the bytes an
/// HTTP/2 server must see first: those, then `headers` (stream 1).
pub async fn opening<T: AsyncRead + Unpin>(io: &mut T, headers: &[u8]) -> io::Result<Bytes> {
    let mut start = vec![0u8; PREFACE.len() + 9];
    io.read_exact(&mut start).await?;
    if &start[..PREFACE.len()] != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no HTTP/2 preface after the h2c upgrade",
        ));
    }
    let frame = &start[PREFACE.len()..];
    if frame[3] != 0x4 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the client's first HTTP/2 frame is not SETTINGS",
        ));
    }
    let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the client's SETTINGS frame is too large",
        ));
    }
    let mut payload = vec![0u8; len];
    io.read_exact(&mut payload).await?;
    let mut out = BytesMut::with_capacity(start.len() + len + headers.len());
    out.put_slice(&start);
    out.put_slice(&payload);
    out.put_slice(headers);
    Ok(out.freeze())
}

/// `prefix`, then `inner`'s bytes; writes go to `inner`.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Rewind<T> {
        Rewind { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_hpack_integers() {
        let enc = |v| {
            let mut b = BytesMut::new();
            integer(&mut b, v, 5, 0);
            b.to_vec()
        };
        // RFC 7541 C.1.1 and C.1.2.
        assert_eq!(enc(10), [10]);
        assert_eq!(enc(1337), [31, 154, 10]);
    }

    #[test]
    fn only_a_complete_bodiless_upgrade_is_taken() {
        let req = |conn: &str| {
            Request::builder()
                .uri("/x")
                .header("host", "echo")
                .header("connection", conn)
                .header("upgrade", "h2c")
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .body(http_body_util::Empty::<Bytes>::new())
                .expect("request")
        };
        assert!(is_upgrade(&req("Upgrade, HTTP2-Settings")));
        assert!(!is_upgrade(&req("Upgrade")));
        let frame = headers_frame(&req("Upgrade, HTTP2-Settings")).expect("frame");
        // Length, type HEADERS, END_STREAM|END_HEADERS, stream 1.
        assert_eq!(&frame[3..9], &[0x1, 0x5, 0, 0, 0, 1]);
        let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
        assert_eq!(len, frame.len() - 9);
        let block = &frame[9..];
        assert!(block.windows(5).any(|w| w == b":path"));
        assert!(!block.windows(7).any(|w| w == b"upgrade"));
    }
}
