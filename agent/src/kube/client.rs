//! A small Kubernetes API client: GET (list), GET with `watch=true` (a stream of JSON events),
//! and merge-PATCH, with hyper's HTTP/1.1 client over TLS to the cluster's CA and the service
//! account's bearer token. Only what the agent needs, on the TLS stack the agent already has;
//! every answer is bounded (a list at 64 MiB, a watch event at 16 MiB).

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
};

use super::KubeSettings;

/// How long a connect, a list or a patch may take (a watch runs until the server ends it).
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid Kubernetes API address {0:?}: expected https://host:port (or http:// to a loopback address)"
    )]
    Address(String),
    #[error("cannot read {what} {path}: {cause}")]
    File {
        what: &'static str,
        path: String,
        cause: std::io::Error,
    },
    #[error("the Kubernetes API CA certificate is not usable: {0}")]
    Ca(String),
    #[error("Kubernetes API {method} {path}: {detail}")]
    Request {
        method: &'static str,
        path: String,
        detail: String,
    },
    /// 410: the resource version is too old; list again.
    #[error("Kubernetes API watch {0}: resource version expired (410 Gone)")]
    Gone(String),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Where the API is and how to authenticate.
#[derive(Clone)]
pub struct Client {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    token_path: Option<std::path::PathBuf>,
}

impl Client {
    pub fn new(s: &KubeSettings) -> Result<Client, Error> {
        let bad = || Error::Address(s.api_server.clone());
        let uri: http::Uri = s.api_server.parse().map_err(|_| bad())?;
        let host = uri
            .host()
            .ok_or_else(bad)?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = match uri.scheme_str() {
            Some("https") => {
                let pem = std::fs::read(&s.ca_cert).map_err(|cause| Error::File {
                    what: "the Kubernetes API CA certificate",
                    path: s.ca_cert.display().to_string(),
                    cause,
                })?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| Error::Ca(e.to_string()))?;
                    roots.add(cert).map_err(|e| Error::Ca(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(Error::Ca("no certificate in the file".to_owned()));
                }
                let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::aws_lc_rs::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Ca(e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                let name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
                Some((Arc::new(config), name))
            }
            // Plaintext only to this host itself (tests, `kubectl proxy`): never send the token
            // across a network unencrypted.
            Some("http") if is_loopback(&host) => None,
            _ => return Err(bad()),
        };
        let port = uri
            .port_u16()
            .unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Client {
            host,
            port,
            tls,
            // Sent when the file exists (in-cluster it always does; tests may have none).
            token_path: Some(s.token_path.clone()),
        })
    }

    async fn connect(&self) -> Result<Box<dyn Stream>, String> {
        let tcp =
            tokio::time::timeout(TIMEOUT, TcpStream::connect((self.host.as_str(), self.port)))
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Box::new(tcp)),
            Some((config, name)) => {
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| format!("TLS with the API server failed: {e}"))?;
                Ok(Box::new(tls))
            }
        }
    }

    /// Sends a request on a new connection (hyper's HTTP/1.1 client); returns the status and
    /// the body, with the task that drives the connection.
    async fn send(
        &self,
        method: &'static str,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Response, Error> {
        let fail = |detail: String| Error::Request {
            method,
            path: path.to_owned(),
            detail,
        };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, host)
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                concat!("ambit-agent/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token_path) = self.token_path.as_ref().filter(|p| p.exists()) {
            // Re-read every time: projected tokens are rotated by the kubelet.
            let token = std::fs::read_to_string(token_path).map_err(|e| {
                fail(format!(
                    "cannot read the token {}: {e}",
                    token_path.display()
                ))
            })?;
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.trim()));
        }
        if let Some(ct) = content_type {
            request = request.header(header::CONTENT_TYPE, ct);
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| fail(format!("cannot build the request: {e}")))?;
        let stream = self.connect().await.map_err(fail)?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| fail(e.to_string()))?;
        // Ends when the answer has been read (or the connection fails); aborted with the body.
        let driver = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| fail(format!("no answer: {e}")))?;
        Ok(Response {
            status: response.status().as_u16(),
            body: Body {
                incoming: response.into_body(),
                _driver: driver,
            },
        })
    }

    /// GET `path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value, Error> {
        tokio::time::timeout(TIMEOUT, self.get_inner(path))
            .await
            .map_err(|_| Error::Request {
                method: "GET",
                path: path.to_owned(),
                detail: "timed out".to_owned(),
            })?
    }

    async fn get_inner(&self, path: &str) -> Result<Value, Error> {
        let mut r = self.send("GET", path, None, Vec::new()).await?;
        let body = r.body.read_all().await.map_err(|e| Error::Request {
            method: "GET",
            path: path.to_owned(),
            detail: e,
        })?;
        check("GET", path, r.status, &body)?;
        serde_json::from_slice(&body).map_err(|e| Error::Request {
            method: "GET",
            path: path.to_owned(),
            detail: format!("the answer is not JSON: {e}"),
        })
    }

    /// A JSON merge patch.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<(), Error> {
        let body = patch.to_string();
        let run = async {
            let mut r = self
                .send(
                    "PATCH",
                    path,
                    Some("application/merge-patch+json"),
                    body.into_bytes(),
                )
                .await?;
            let answer = r.body.read_all().await.unwrap_or_default();
            check("PATCH", path, r.status, &answer)
        };
        tokio::time::timeout(TIMEOUT, run)
            .await
            .map_err(|_| Error::Request {
                method: "PATCH",
                path: path.to_owned(),
                detail: "timed out".to_owned(),
            })?
    }

    /// Starts a watch: `path` must carry `watch=true` and the resource version to start from.
    pub async fn watch(&self, path: &str) -> Result<Watch, Error> {
        let mut r = tokio::time::timeout(TIMEOUT, self.send("GET", path, None, Vec::new()))
            .await
            .map_err(|_| Error::Request {
                method: "GET",
                path: path.to_owned(),
                detail: "timed out".to_owned(),
            })??;
        if r.status == 410 {
            return Err(Error::Gone(path.to_owned()));
        }
        if r.status != 200 {
            let body = r.body.read_all().await.unwrap_or_default();
            check("GET", path, r.status, &body)?;
        }
        Ok(Watch {
            body: r.body,
            buf: Vec::new(),
            path: path.to_owned(),
        })
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn check(method: &'static str, path: &str, status: u16, body: &[u8]) -> Result<(), Error> {
    if (200..300).contains(&status) {
        return Ok(());
    }
    // The API answers errors with a Status object whose `message` says what is wrong.
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    let hint = match status {
        401 => " (is the service account token valid?)",
        403 => " (does the agent's ClusterRole allow it?)",
        _ => "",
    };
    Err(Error::Request {
        method,
        path: path.to_owned(),
        detail: format!("HTTP {status}: {message}{hint}"),
    })
}

struct Response {
    status: u16,
    body: Body,
}

/// A response body, read as hyper delivers it (content-length, chunked or to the end).
struct Body {
    incoming: Incoming,
    /// The task that drives the connection; the body ends with it.
    _driver: AbortOnDrop,
}

/// The most a list (or an error answer) may be.
const MAX_ANSWER: usize = 64 * 1024 * 1024;
/// The most one watch event may be: a Pod or Namespace object is a few KiB.
const MAX_EVENT: usize = 16 * 1024 * 1024;

impl Body {
    /// The next bytes of the body; empty at its end.
    async fn next(&mut self) -> Result<Bytes, String> {
        loop {
            match self.incoming.frame().await {
                None => return Ok(Bytes::new()),
                Some(Err(e)) => return Err(e.to_string()),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => return Ok(data),
                    // Trailers, or an empty chunk: nothing to hand on.
                    _ => continue,
                },
            }
        }
    }

    async fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let b = self.next().await?;
            if b.is_empty() {
                return Ok(out);
            }
            if out.len() + b.len() > MAX_ANSWER {
                return Err(format!(
                    "the answer is larger than {} MiB",
                    MAX_ANSWER >> 20
                ));
            }
            out.extend_from_slice(&b);
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running watch: one JSON event per line.
pub struct Watch {
    body: Body,
    buf: Vec<u8>,
    path: String,
}

impl Watch {
    /// The next event (`{"type": ADDED|MODIFIED|DELETED|BOOKMARK|ERROR, "object": ...}`), or
    /// `None` when the server ended the watch (normal: watches time out; start another).
    pub async fn next(&mut self) -> Result<Option<Value>, Error> {
        loop {
            if let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let event: Value = serde_json::from_slice(&line).map_err(|e| Error::Request {
                    method: "GET",
                    path: self.path.clone(),
                    detail: format!("a watch event is not JSON: {e}"),
                })?;
                if event["type"] == "ERROR" {
                    if event["object"]["code"] == 410 {
                        return Err(Error::Gone(self.path.clone()));
                    }
                    return Err(Error::Request {
                        method: "GET",
                        path: self.path.clone(),
                        detail: format!("the watch failed: {}", event["object"]["message"]),
                    });
                }
                return Ok(Some(event));
            }
            let more = self.body.next().await.map_err(|detail| Error::Request {
                method: "GET",
                path: self.path.clone(),
                detail,
            })?;
            if more.is_empty() {
                return Ok(None);
            }
            if self.buf.len() + more.len() > MAX_EVENT {
                return Err(Error::Request {
                    method: "GET",
                    path: self.path.clone(),
                    detail: format!(
                        "a watch event is larger than {} MiB (or has no line end)",
                        MAX_EVENT >> 20
                    ),
                });
            }
            self.buf.extend_from_slice(&more);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    /// A loopback "API server" answering each connection with the next of `answers` (raw
    /// HTTP, written in the pieces given); returns the client and the requests' heads.
    async fn server(
        answers: Vec<Vec<Vec<u8>>>,
    ) -> (Client, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for pieces in answers {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = tx.send(String::from_utf8_lossy(&head).into_owned());
                for piece in pieces {
                    let _ = s.write_all(&piece).await;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        let client = Client::new(&KubeSettings {
            api_server: format!("http://127.0.0.1:{port}"),
            token_path: "/nonexistent/token".into(),
            ca_cert: "/nonexistent/ca.crt".into(),
            netns_path_prefix: None,
        })
        .expect("loopback http is allowed");
        (client, rx)
    }

    fn chunk(data: &[u8]) -> Vec<u8> {
        let mut out = format!("{:x}\r\n", data.len()).into_bytes();
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
        out
    }

    #[tokio::test]
    async fn lists_and_watches_over_chunked_answers() {
        let list = br#"{"kind":"PodList","items":[]}"#;
        let head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
        let (client, mut heads) = server(vec![
            vec![format!(
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{}",
                list.len(),
                String::from_utf8_lossy(list)
            )
            .into_bytes()],
            vec![
                head.to_vec(),
                // One event split across chunks, then two in one chunk.
                chunk(br#"{"type":"ADDED","object":{"metadata":"#),
                chunk(b"{\"name\":\"a\"}}}\n"),
                chunk(b"{\"type\":\"DELETED\",\"object\":{}}\n\n{\"type\":\"BOOKMARK\",\"object\":{}}\n"),
                b"0\r\n\r\n".to_vec(),
            ],
        ])
        .await;
        let listed = client.get("/api/v1/pods").await.expect("list");
        assert_eq!(listed["kind"], "PodList");
        let request = heads.recv().await.expect("a request");
        assert!(
            request.starts_with("GET /api/v1/pods HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains("accept: application/json"), "{request}");
        assert!(
            !request.contains("authorization"),
            "no token file: {request}"
        );

        let mut watch = client
            .watch("/api/v1/pods?watch=true&resourceVersion=1")
            .await
            .expect("watch");
        let mut types = Vec::new();
        while let Some(event) = watch.next().await.expect("event") {
            types.push(event["type"].as_str().unwrap_or("?").to_owned());
            if types.len() == 1 {
                assert_eq!(event["object"]["metadata"]["name"], "a");
            }
        }
        assert_eq!(types, ["ADDED", "DELETED", "BOOKMARK"]);
    }

    #[tokio::test]
    async fn errors_say_what_the_api_said() {
        let status = br#"{"kind":"Status","message":"pods is forbidden"}"#;
        let (client, _heads) = server(vec![
            vec![
                format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-length: {}\r\n\r\n{}",
                    status.len(),
                    String::from_utf8_lossy(status)
                )
                .into_bytes(),
            ],
            vec![b"HTTP/1.1 410 Gone\r\ncontent-length: 0\r\n\r\n".to_vec()],
            vec![
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                chunk(br#"{"type":"ERROR","object":{"code":410,"message":"too old"}}"#),
                chunk(b"\n"),
            ],
        ])
        .await;
        let e = client.get("/api/v1/pods").await.expect_err("403");
        let text = e.to_string();
        assert!(text.contains("HTTP 403: pods is forbidden"), "{text}");
        assert!(text.contains("ClusterRole"), "{text}");
        let e = client.watch("/api/v1/pods?watch=true").await.err();
        assert!(matches!(e, Some(Error::Gone(_))), "{e:?}");
        let mut watch = client
            .watch("/api/v1/pods?watch=true")
            .await
            .expect("watch");
        let e = watch.next().await.expect_err("an ERROR event");
        assert!(matches!(e, Error::Gone(_)), "{e:?}");
    }

    #[tokio::test]
    async fn a_watch_event_without_an_end_is_bounded() {
        let (client, _heads) = server(vec![vec![
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
            chunk(&vec![b'x'; MAX_EVENT / 2]),
            chunk(&vec![b'x'; MAX_EVENT / 2 + 1]),
        ]])
        .await;
        let mut watch = client
            .watch("/api/v1/pods?watch=true")
            .await
            .expect("watch");
        let e = watch.next().await.expect_err("too large");
        assert!(e.to_string().contains("larger than 16 MiB"), "{e}");
    }
}
