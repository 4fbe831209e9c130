//! The HTTP/1.1 server of the agent's local endpoints: readiness (15021), metrics (15020) and the
//! admin API (unix socket), on hyper. One request per connection, answered with `connection:
//! close`: what probes, Prometheus, `ambitctl` and the CNI plugin need, and nothing a peer could
//! stretch (bounded connections, head, body and time). Handlers see a [`Request`] with the path
//! and query already percent-decoded and the body read.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{StatusCode, body::Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
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

/// Reads one request from `stream` with hyper's HTTP/1.1 server (head bounded at 16 KiB, body at
/// 64 KiB, either `content-length` or chunked), answers it with `handle`, and closes the stream.
/// A request hyper cannot parse gets its 400 (or 431 for an oversized head); a request line that
/// parses but whose path or query is not valid percent-encoded UTF-8, and a body that is cut
/// short, get a 400 saying so; a body over the bound gets a 413.
pub async fn answer<S, H, HF>(stream: S, handle: H) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Fn(Request) -> HF,
    HF: Future<Output = Response>,
{
    let handle = &handle;
    let service = hyper::service::service_fn(move |req: ::http::Request<Incoming>| async move {
        let response = match read(req).await {
            Ok(request) => handle(request).await,
            Err(refusal) => refusal,
        };
        Ok::<_, std::convert::Infallible>(encode(response))
    });
    hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        // A client may shut its side down once it has sent the request (the fuzz target and
        // `printf ... | nc` do): still answer it.
        .half_close(true)
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(stream), service)
        .await
        .map_err(std::io::Error::other)
}

/// The request of `req` as the handlers take it, or the answer that refuses it.
async fn read(req: ::http::Request<Incoming>) -> Result<Request, Response> {
    let (parts, body) = req.into_parts();
    let bad = || {
        Response::text(
            400,
            "the path or query is not valid percent-encoded UTF-8\n",
        )
    };
    let path = percent_decode(parts.uri.path()).ok_or_else(bad)?;
    let query = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k)?, percent_decode(v)?))
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(bad)?;
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes().to_vec(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Err(Response::text(413, "request body too large\n"));
        }
        Err(_) => return Err(Response::text(400, "request body cut short\n")),
    };
    Ok(Request {
        method: parts.method.as_str().to_owned(),
        path,
        query,
        body,
    })
}

fn encode(r: Response) -> ::http::Response<Full<Bytes>> {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = ::http::Response::new(Full::new(Bytes::from(r.body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        ::http::header::CONTENT_TYPE,
        ::http::HeaderValue::from_static(r.content_type),
    );
    response
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
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// Sends `parts` to [`answer`] (one write each, the stream half-closed after) with a handler
    /// that echoes what it saw; returns the raw answer.
    async fn exchange(parts: &[&[u8]]) -> String {
        let (mut client, server) = tokio::io::duplex(256 * 1024);
        let task = tokio::spawn(answer(server, |r: Request| async move {
            let query: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let body = String::from_utf8_lossy(&r.body).into_owned();
            Response::text(
                200,
                format!("{} {} [{}] {body}", r.method, r.path, query.join(" ")),
            )
        }));
        for part in parts {
            // The server may answer (and close) before it has read everything.
            if client.write_all(part).await.is_err() {
                break;
            }
        }
        let _ = client.shutdown().await;
        let mut out = Vec::new();
        client.read_to_end(&mut out).await.expect("read");
        let _ = task.await.expect("join");
        String::from_utf8_lossy(&out).into_owned()
    }

    fn status(answer: &str) -> u16 {
        answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
    }

    #[tokio::test]
    async fn decodes_paths_and_queries() {
        let out = exchange(&[
            b"GET /explain?src=default%2Fclient&dst=10.0.0.1%3A80 HTTP/1.1\r\nHost: x\r\n\r\n",
        ])
        .await;
        assert!(
            out.ends_with("GET /explain [src=default/client dst=10.0.0.1:80] "),
            "{out}"
        );
        let out =
            exchange(&[b"PUT /logging?level=info,ambit_agent%3A%3Axds=debug HTTP/1.0\r\n\r\n"])
                .await;
        assert!(
            out.ends_with("PUT /logging [level=info,ambit_agent::xds=debug] "),
            "{out}"
        );
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_request_without_calling_the_handler() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"GET /x HTTP/2\r\n\r\n",
            b"GET /x?a=%zz HTTP/1.1\r\n\r\n",
            b"GET /x?a=%4 HTTP/1.1\r\n\r\n",
            b"GET /%ff HTTP/1.1\r\n\r\n",
            b"\xff\xfe\r\n\r\n",
        ] {
            let out = exchange(&[bad]).await;
            let code = status(&out);
            assert!(
                (400..500).contains(&code) || code == 505,
                "{:?} -> {out:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[tokio::test]
    async fn answers_one_request_and_closes() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(answer(server, |r: Request| async move {
            Response::json(200, &serde_json::json!({ "path": r.path }))
        }));
        // A second request on the same connection is not answered.
        client
            .write_all(b"GET /status HTTP/1.1\r\nhost: ambit\r\n\r\nGET /again HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let mut out = String::new();
        client.read_to_string(&mut out).await.expect("read");
        task.await.expect("join").expect("answer");
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("content-type: application/json"), "{out}");
        assert!(out.contains("connection: close"), "{out}");
        assert!(out.ends_with("{\n  \"path\": \"/status\"\n}\n"), "{out}");
    }

    #[tokio::test]
    async fn reads_content_length_and_chunked_bodies() {
        let out = exchange(&[
            b"POST /cni/add HTTP/1.1\r\ncontent-length: 11\r\n\r\nhello",
            b" world",
        ])
        .await;
        assert!(out.ends_with("POST /cni/add [] hello world"), "{out}");
        let out = exchange(&[
            b"POST /cni/add HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
            b"6\r\n world\r\n0\r\n\r\n",
        ])
        .await;
        assert!(out.ends_with("POST /cni/add [] hello world"), "{out}");
    }

    #[tokio::test]
    async fn bounds_the_head_and_the_body() {
        let long = format!(
            "GET /x HTTP/1.1\r\nx-long: {}\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        assert_eq!(status(&exchange(&[long.as_bytes()]).await), 431);
        let head = format!(
            "POST /x HTTP/1.1\r\ncontent-length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        let body = vec![b'b'; MAX_BODY + 1];
        let out = exchange(&[head.as_bytes(), &body]).await;
        assert_eq!(status(&out), 413, "{out}");
        assert!(out.ends_with("request body too large\n"), "{out}");
        let out = exchange(&[b"POST /x HTTP/1.1\r\ncontent-length: 10\r\n\r\nshort"]).await;
        assert_eq!(status(&out), 400, "{out}");
        assert!(out.ends_with("request body cut short\n"), "{out}");
    }
}
