//! A small Kubernetes API client: GET (list), GET with `watch=true` (a stream of JSON events),
//! and merge-PATCH, over HTTP/1.1 with TLS to the cluster's CA and the service account's bearer
//! token. Only what the agent needs, on the TLS stack the agent already has.

use std::{sync::Arc, time::Duration};

use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
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

    /// Sends a request; returns the status and a reader positioned at the body.
    async fn send(
        &self,
        method: &'static str,
        path: &str,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Result<Response, Error> {
        let fail = |detail: String| Error::Request {
            method,
            path: path.to_owned(),
            detail,
        };
        let mut stream = self.connect().await.map_err(fail)?;
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\nUser-Agent: ambit-agent/{}\r\nConnection: close\r\n",
            env!("CARGO_PKG_VERSION")
        );
        if let Some(token_path) = self.token_path.as_ref().filter(|p| p.exists()) {
            // Re-read every time: projected tokens are rotated by the kubelet.
            let token = std::fs::read_to_string(token_path).map_err(|e| {
                fail(format!(
                    "cannot read the token {}: {e}",
                    token_path.display()
                ))
            })?;
            head.push_str(&format!("Authorization: Bearer {}\r\n", token.trim()));
        }
        if let Some(ct) = content_type {
            head.push_str(&format!(
                "Content-Type: {ct}\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        head.push_str("\r\n");
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| fail(e.to_string()))?;
        stream
            .write_all(body)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .await
            .map_err(|e| fail(format!("no answer: {e}")))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fail(format!("not an HTTP answer: {line:?}")))?;
        let mut chunked = false;
        let mut length = None;
        loop {
            line.clear();
            reader
                .read_line(&mut line)
                .await
                .map_err(|e| fail(e.to_string()))?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':') {
                let v = v.trim();
                if k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
                {
                    chunked = true;
                } else if k.eq_ignore_ascii_case("content-length") {
                    length = v.parse::<u64>().ok();
                }
            }
        }
        Ok(Response {
            status,
            body: Body {
                reader,
                chunked,
                remaining: if chunked {
                    0
                } else {
                    length.unwrap_or(u64::MAX)
                },
                done: false,
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
        let mut r = self.send("GET", path, None, &[]).await?;
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
                    body.as_bytes(),
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
        let mut r = tokio::time::timeout(TIMEOUT, self.send("GET", path, None, &[]))
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

/// A response body: content-length, chunked, or until the connection closes.
struct Body {
    reader: BufReader<Box<dyn Stream>>,
    chunked: bool,
    /// Bytes left in the current chunk (chunked) or in the body.
    remaining: u64,
    done: bool,
}

impl Body {
    /// The next bytes of the body; empty at its end.
    async fn next(&mut self) -> Result<Vec<u8>, String> {
        if self.done {
            return Ok(Vec::new());
        }
        if self.chunked && self.remaining == 0 {
            let mut line = String::new();
            self.reader
                .read_line(&mut line)
                .await
                .map_err(|e| e.to_string())?;
            if line.trim().is_empty() {
                // The CRLF that ends the previous chunk.
                line.clear();
                self.reader
                    .read_line(&mut line)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let size = line.trim().split(';').next().unwrap_or("");
            if size.is_empty() {
                self.done = true;
                return Ok(Vec::new());
            }
            self.remaining =
                u64::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
            if self.remaining == 0 {
                self.done = true;
                return Ok(Vec::new());
            }
        }
        let want = self.remaining.min(64 * 1024) as usize;
        let mut buf = vec![0u8; want];
        let n = self
            .reader
            .read(&mut buf)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            self.done = true;
            return Ok(Vec::new());
        }
        buf.truncate(n);
        self.remaining -= n as u64;
        if !self.chunked && self.remaining == 0 {
            self.done = true;
        }
        Ok(buf)
    }

    async fn read_all(&mut self) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        loop {
            let b = self.next().await?;
            if b.is_empty() {
                return Ok(out);
            }
            if out.len() + b.len() > 64 * 1024 * 1024 {
                return Err("the answer is larger than 64 MiB".to_owned());
            }
            out.extend_from_slice(&b);
        }
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
            self.buf.extend_from_slice(&more);
        }
    }
}
