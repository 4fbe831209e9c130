//! A deliberately small HTTP/1.1 server for the agent's local endpoints: readiness (15021),
//! metrics (15020) and the admin API (unix socket). One request per connection, bodies only with
//! `content-length` (bounded), answers with `connection: close`: what probes, Prometheus,
//! `ambitctl` and the CNI plugin need, and nothing a peer could stretch (bounded head, body and
//! time).

use std::{future::Future, sync::Arc, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// The most a request head may take (request line and headers).
const MAX_HEAD: usize = 16 * 1024;
/// Connections served at once by one server.
const MAX_CONNECTIONS: usize = 64;
/// The largest request body accepted (the CNI plugin's pod description is well below).
const MAX_BODY: usize = 64 * 1024;
/// How long a probe or scraper has to send its request and read the answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed request line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Without the query.
    pub path: String,
    /// Decoded `key=value` pairs, in order.
    pub query: Vec<(String, String)>,
    /// The body (`content-length` bytes; empty without one).
    pub body: Vec<u8>,
}

impl Request {
    /// The first value of query parameter `key`.
    pub fn param(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// An answer.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into().into_bytes(),
        }
    }

    pub fn json<T: serde::Serialize>(status: u16, value: &T) -> Response {
        match serde_json::to_vec_pretty(value) {
            Ok(mut body) => {
                body.push(b'\n');
                Response {
                    status,
                    content_type: "application/json",
                    body,
                }
            }
            Err(e) => Response::text(500, format!("cannot encode the answer: {e}\n")),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// A TCP listener for a local endpoint, shared (`SO_REUSEPORT`) with the agent that replaces this
/// one during a rolling update, so probes always find a listener on the port.
pub fn bind_shared(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let how = crate::sockets::Listen {
        reuse_port: true,
        mark: None,
        nodelay: false,
        backlog: 128,
    };
    tokio::net::TcpListener::from_std(crate::sockets::listener(addr, &how)?)
}

/// Accepts connections from `accept` until `shutdown`, answering each with `handle`.
///
/// `timeout` bounds each exchange (reading the request, handling it, writing the answer).
pub async fn serve<S, A, AF, H, HF>(
    mut accept: A,
    handle: H,
    timeout: Duration,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: FnMut() -> AF,
    AF: Future<Output = std::io::Result<S>>,
    H: Fn(Request) -> HF + Clone + Send + Sync + 'static,
    HF: Future<Output = Response> + Send,
{
    // Bounded: a peer opening connections and sending nothing cannot take the agent's file
    // descriptors (the data path needs them); the excess waits in the listen backlog.
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(timeout, answer(stream, handle)).await;
            drop(permit);
        });
    }
}

/// Reads one request from `stream` (head and body bounded: 16 KiB and 64 KiB), answers it with
/// `handle`, and closes the stream; a malformed or oversized request gets a 4xx.
pub async fn answer<S, H, HF>(mut stream: S, handle: H) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request) -> HF,
    HF: Future<Output = Response>,
{
    let mut data = Vec::with_capacity(1024);
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if data.len() >= MAX_HEAD {
            let r = Response::text(400, "request head too large\n");
            return write(&mut stream, &r).await;
        }
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            break data.len();
        }
        data.extend_from_slice(&buf[..n]);
    };
    let Some(mut request) = parse(&data[..head_end]) else {
        let r = Response::text(400, "malformed request line\n");
        return write(&mut stream, &r).await;
    };
    let length = match content_length(&data[..head_end]) {
        Ok(n) => n,
        Err(why) => return write(&mut stream, &Response::text(400, why)).await,
    };
    if length > MAX_BODY {
        let r = Response::text(413, "request body too large\n");
        return write(&mut stream, &r).await;
    }
    let mut body = data.split_off(head_end);
    while body.len() < length {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            let r = Response::text(400, "request body cut short\n");
            return write(&mut stream, &r).await;
        }
        body.extend_from_slice(&buf[..n]);
    }
    body.truncate(length);
    request.body = body;
    let response = handle(request).await;
    write(&mut stream, &response).await
}

async fn write<S: AsyncWrite + Unpin>(stream: &mut S, r: &Response) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&r.body).await?;
    stream.shutdown().await
}

/// The `content-length` of a request head (0 without one); chunked bodies are refused.
fn content_length(head: &[u8]) -> Result<usize, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "request head is not UTF-8\n")?;
    let mut length = 0;
    for line in text.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked request bodies are not supported; send content-length\n");
        }
        if name.eq_ignore_ascii_case("content-length") {
            length = value
                .trim()
                .parse()
                .map_err(|_| "invalid content-length\n")?;
        }
    }
    Ok(length)
}

/// The request line of `head`: `METHOD target HTTP/1.x`.
fn parse(head: &[u8]) -> Option<Request> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    if !version.starts_with("HTTP/1.") || parts.next().is_some() || !target.starts_with('/') {
        return None;
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(Request {
        method: method.to_owned(),
        path: percent_decode(path)?,
        query,
        body: Vec::new(),
    })
}

/// `%XX` and `+` decoding of a URL component; `None` when it is not valid UTF-8 afterwards.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'%' => return None,
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines_and_queries() {
        let r = parse(
            b"GET /explain?src=default%2Fclient&dst=10.0.0.1%3A80 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        .expect("valid");
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/explain");
        assert_eq!(r.param("src"), Some("default/client"));
        assert_eq!(r.param("dst"), Some("10.0.0.1:80"));
        assert_eq!(r.param("nope"), None);
        let r = parse(b"PUT /logging?level=info,ambit_agent%3A%3Axds=debug HTTP/1.0\r\n\r\n")
            .expect("valid");
        assert_eq!(r.param("level"), Some("info,ambit_agent::xds=debug"));
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /x HTTP/2\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET /x?a=%zz HTTP/1.1\r\n\r\n",
            b"GET /x?a=%4 HTTP/1.1\r\n\r\n",
            b"\xff\xfe",
        ] {
            assert_eq!(parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn answers_one_request_and_closes() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(answer(server, |r: Request| async move {
            Response::json(200, &serde_json::json!({ "path": r.path }))
        }));
        client
            .write_all(b"GET /status HTTP/1.1\r\nhost: ambit\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        client.read_to_string(&mut out).await.expect("read");
        task.await.expect("join").expect("answer");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("content-type: application/json"), "{out}");
        assert!(out.ends_with("{\n  \"path\": \"/status\"\n}\n"), "{out}");
    }

    #[tokio::test]
    async fn reads_a_body_of_content_length_bytes() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(answer(server, |r: Request| async move {
            Response::text(200, String::from_utf8_lossy(&r.body).into_owned())
        }));
        client
            .write_all(b"POST /cni/add HTTP/1.1\r\ncontent-length: 11\r\n\r\nhello")
            .await
            .expect("write");
        client.write_all(b" world").await.expect("write");
        let mut out = String::new();
        client.read_to_string(&mut out).await.expect("read");
        task.await.expect("join").expect("answer");
        assert!(out.ends_with("\r\n\r\nhello world"), "{out}");
    }
}
