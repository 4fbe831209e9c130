//! The admin API client: one HTTP/1.1 request per connection on the agent's unix socket, shared
//! by `ambitctl` (questions from an operator) and `ambit-cni` (the CNI plugin telling the agent
//! about a pod).
//!
//! Synchronous to its callers: both ask one question and act on the answer, so each call runs
//! hyper's HTTP/1.1 client on a current-thread runtime of its own, bounded by a deadline. The
//! deadline is per call: a status query should fail fast, a CNI ADD waits for the pod's
//! enrollment. Failures to reach the agent say what to check, since that is the first thing an
//! operator hits when the agent is down.

use std::{
    io,
    os::unix::fs::FileTypeExt,
    path::{Path, PathBuf},
    time::Duration,
};

use bytes::Bytes;
use http::header;
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use super::api;

/// How long a call may take unless the caller says otherwise ([`Client::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bounds on what we accept, so a confused peer cannot make us read forever.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 512 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no admin socket at {socket}{missing_dir}: the agent is not running on this node, or it \
         serves its admin API on another socket\n  \
         check the agent: `systemctl status ambit-agent`, or `kubectl -n ambit-system get pods -o wide` \
         (is there a pod on this node?)\n  \
         another socket: the agent's config field `adminSocket` names it; {hint}"
    )]
    NoSocket {
        socket: PathBuf,
        /// ` (directory ... does not exist)` when that is why, else empty.
        missing_dir: String,
        /// How the caller is pointed at another socket (see [`Client::with_socket_hint`]).
        hint: String,
    },
    #[error(
        "permission denied on {socket}: the admin socket is root-only; run {client} as root \
         (e.g. `sudo {client} ...`)"
    )]
    PermissionDenied {
        socket: PathBuf,
        client: &'static str,
    },
    #[error(
        "nothing listens on {socket}: the socket file exists but no agent accepts on it (the agent \
         crashed or is restarting, and this is a stale socket)\n  \
         check the agent: `systemctl status ambit-agent` / `journalctl -u ambit-agent`, or \
         `kubectl -n ambit-system get pods -o wide` and its logs\n  \
         while the agent is down, enrolled pods fail closed; `ambitctl bpf --offline` shows the pinned capture state"
    )]
    Refused { socket: PathBuf },
    #[error("{socket} is not a unix socket; {hint}")]
    NotASocket { socket: PathBuf, hint: String },
    #[error(
        "the agent at {socket} did not answer within {}s (overloaded or stuck? check its logs)",
        timeout.as_secs_f64()
    )]
    Timeout { socket: PathBuf, timeout: Duration },
    #[error("cannot talk to the agent at {socket}")]
    Io { socket: PathBuf, source: io::Error },
    /// The agent answered with a non-2xx status.
    #[error("the agent answered {status}: {message}")]
    Api { status: u16, message: String },
    /// The answer is not the HTTP or JSON we expect (another program on the socket, or an
    /// agent of another version).
    #[error("unexpected answer from {socket}: {detail}")]
    BadResponse { socket: PathBuf, detail: String },
}

impl Error {
    /// The agent could not be asked, or did not answer in time: no socket, nothing listening,
    /// permission denied, a connection error, a timeout. Otherwise it answered, with an error
    /// status ([`Error::Api`]) or something unreadable ([`Error::BadResponse`]).
    pub fn is_unreachable(&self) -> bool {
        !matches!(self, Error::Api { .. } | Error::BadResponse { .. })
    }
}

/// A client of one agent's admin socket. Cheap to clone; [`Client::with_timeout`] gives a
/// copy with another deadline for one call.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    /// Who asks: in the `User-Agent` and in messages (`ambitctl`, `ambit-cni`).
    name: &'static str,
    timeout: Duration,
    /// How a user of this program points it at another socket, for the "no socket" error.
    socket_hint: String,
}

impl Client {
    /// A client named `name` (shown in `User-Agent` and in error messages) of the agent at
    /// `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(name: &'static str, socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            name,
            timeout: DEFAULT_TIMEOUT,
            socket_hint: format!("point {name} at it"),
        }
    }

    /// The same client with `timeout` for each call: the whole exchange (connect, request,
    /// waiting for the agent, reading the answer) must fit in it.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout,
            ..self.clone()
        }
    }

    /// Says how a user points this program at another socket, e.g. "pass it with --socket";
    /// it ends the "no admin socket" error.
    pub fn with_socket_hint(mut self, hint: impl Into<String>) -> Self {
        self.socket_hint = hint.into();
        self
    }

    /// The socket it talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The deadline of each call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// `GET path`, decoded into `T` (a type from [`api`], or `serde_json::Value` to keep every
    /// field the agent sent).
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.decode(&self.request("GET", path, None)?)
    }

    /// `PUT path` with an empty body, decoded into `T`.
    pub fn put<T: DeserializeOwned>(&self, path: &str) -> Result<T, Error> {
        self.decode(&self.request("PUT", path, Some(&[]))?)
    }

    /// `POST path` with `body` as JSON, the answer decoded into `T`.
    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, Error> {
        let body = serde_json::to_vec(body)
            .map_err(|e| self.bad(format!("BUG: cannot encode the request body: {e}")))?;
        self.decode(&self.request("POST", path, Some(&body))?)
    }

    fn decode<T: DeserializeOwned>(&self, body: &[u8]) -> Result<T, Error> {
        serde_json::from_slice(body).map_err(|e| {
            self.bad(format!(
                "cannot read the body: {e} (an agent of another version than {} {}?)",
                self.name,
                env!("CARGO_PKG_VERSION")
            ))
        })
    }

    fn bad(&self, detail: impl Into<String>) -> Error {
        Error::BadResponse {
            socket: self.socket.clone(),
            detail: detail.into(),
        }
    }

    /// Sends one request (a JSON body when `body` is `Some`) and returns the body of a 2xx
    /// answer.
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>, Error> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "ambit")
            .header(header::ACCEPT, "application/json")
            .header(
                header::USER_AGENT,
                format!("{}/{}", self.name, env!("CARGO_PKG_VERSION")),
            );
        match body {
            None => {}
            Some([]) => request = request.header(header::CONTENT_LENGTH, 0),
            Some(_) => request = request.header(header::CONTENT_TYPE, "application/json"),
        }
        let request = request
            .body(Full::new(Bytes::copy_from_slice(body.unwrap_or_default())))
            .map_err(|e| self.bad(format!("BUG: cannot build the request: {e}")))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| self.io_error(e))?;
        // One deadline over the whole call, connecting included (an agent at its connection
        // limit leaves new connections in a full backlog).
        let call = async {
            let stream = self.connect().await?;
            self.exchange(stream, request).await
        };
        let response = runtime
            .block_on(async { tokio::time::timeout(self.timeout, call).await })
            .map_err(|_| Error::Timeout {
                socket: self.socket.clone(),
                timeout: self.timeout,
            })??;
        if (200..300).contains(&response.status) {
            return Ok(response.body);
        }
        let message = match serde_json::from_slice::<api::ApiError>(&response.body) {
            Ok(e) => e.error,
            // Not our error body: show what came, so the operator sees something to act on.
            Err(_) => {
                let text = String::from_utf8_lossy(&response.body).trim().to_owned();
                if text.is_empty() {
                    response.reason
                } else {
                    text
                }
            }
        };
        Err(Error::Api {
            status: response.status,
            message,
        })
    }

    /// One request and its whole answer on `stream`.
    async fn exchange(
        &self,
        stream: tokio::net::UnixStream,
        request: http::Request<Full<Bytes>>,
    ) -> Result<Response, Error> {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let io = AnswerFirst {
            stream,
            seen: seen.clone(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEAD)
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| self.hyper_error(e))?;
        let answer = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| self.hyper_error(e))?;
            let status = response.status();
            let body = match Limited::new(response.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes().to_vec(),
                Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
                    return Err(self.bad(format!("body larger than {} MiB", MAX_BODY >> 20)));
                }
                Err(e) => match e.downcast::<hyper::Error>() {
                    Ok(e) => return Err(self.hyper_error(*e)),
                    Err(e) => return Err(self.bad(e.to_string())),
                },
            };
            Ok(Response {
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_owned(),
                body,
            })
        };
        let mut answer = std::pin::pin!(answer);
        // The block owns the connection and drops it as soon as it ends, which ends the
        // answer's wait too (a pinned `connection` would live to the end of this function).
        #[allow(clippy::redundant_async_block)]
        let mut connection = std::pin::pin!(async move { connection.await });
        let result = tokio::select! {
            r = &mut answer => r,
            // The connection may end first (the agent closes after its answer, or sends bytes
            // after it) with the answer already read: that answer counts.
            c = &mut connection => match (answer.await, c) {
                (Ok(r), _) => Ok(r),
                (Err(e), Ok(())) => Err(e),
                // The connection's error is the cause; the answer only saw it end.
                (Err(_), Err(c)) => Err(self.hyper_error(c)),
            },
        };
        // A peer that is not an HTTP server (it may speak first, before our request): say what
        // it sent, whatever hyper made of it.
        let seen = seen.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match result {
            Err(_) if !seen.is_empty() && !seen.starts_with(b"HTTP/") => Err(self.bad(format!(
                "not an HTTP/1.x response (starts with {:?}); is this the agent's admin socket?",
                String::from_utf8_lossy(&seen)
            ))),
            r => r,
        }
    }

    /// What a failed exchange means for the operator.
    fn hyper_error(&self, e: hyper::Error) -> Error {
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
            return self.bad("the connection closed before the answer was complete");
        }
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<io::Error>() {
                if io.kind() == io::ErrorKind::UnexpectedEof {
                    return self.bad("the connection closed before the answer was complete");
                }
                return self.io_error(io::Error::new(io.kind(), io.to_string()));
            }
            source = s.source();
        }
        // Not an I/O failure: the peer sent what HTTP/1.1 does not allow (a bad status line, bytes
        // before any request, ...).
        self.bad(format!(
            "not an HTTP/1.x response ({e}); is this the agent's admin socket?"
        ))
    }

    /// Connects, waiting while the agent's backlog is full (the caller's deadline bounds it).
    async fn connect(&self) -> Result<tokio::net::UnixStream, Error> {
        loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(s) => return Ok(s),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(self.connect_error(e)),
            }
        }
    }

    fn connect_error(&self, e: io::Error) -> Error {
        let socket = self.socket.clone();
        match e.kind() {
            io::ErrorKind::NotFound => Error::NoSocket {
                missing_dir: match self.socket.parent() {
                    Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => {
                        format!(" (directory {} does not exist)", dir.display())
                    }
                    _ => String::new(),
                },
                socket,
                hint: self.socket_hint.clone(),
            },
            io::ErrorKind::PermissionDenied => Error::PermissionDenied {
                socket,
                client: self.name,
            },
            io::ErrorKind::ConnectionRefused if !is_socket(&self.socket) => Error::NotASocket {
                socket,
                hint: self.socket_hint.clone(),
            },
            io::ErrorKind::ConnectionRefused => Error::Refused { socket },
            _ => self.io_error(e),
        }
    }

    fn io_error(&self, e: io::Error) -> Error {
        let socket = self.socket.clone();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Error::Timeout {
                socket,
                timeout: self.timeout,
            },
            _ => Error::Io { socket, source: e },
        }
    }
}

/// The socket, for hyper, with a peer that stopped reading treated as having read: a peer that
/// answers and closes before our request is written (an early error, or not our server at all)
/// makes the write fail, and its answer is still what the operator needs to see.
struct AnswerFirst {
    stream: tokio::net::UnixStream,
    /// The first bytes the peer sent (up to [`SEEN`]), to describe a peer that is not HTTP.
    seen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// How much of the peer's first bytes is kept for the error message.
const SEEN: usize = 40;

fn peer_stopped_reading(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
    )
}

impl tokio::io::AsyncRead for AnswerFirst {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.stream).poll_read(cx, buf);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() < SEEN {
            let new = &buf.filled()[before..];
            let room = SEEN - seen.len();
            seen.extend_from_slice(&new[..new.len().min(room)]);
        }
        polled
    }
}

/// A write result with a peer that stopped reading counted as done (see [`AnswerFirst`]).
fn as_read<T>(polled: std::task::Poll<io::Result<T>>, done: T) -> std::task::Poll<io::Result<T>> {
    match polled {
        std::task::Poll::Ready(Err(e)) if peer_stopped_reading(&e) => {
            std::task::Poll::Ready(Ok(done))
        }
        other => other,
    }
}

impl tokio::io::AsyncWrite for AnswerFirst {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        as_read(
            std::pin::Pin::new(&mut self.stream).poll_write(cx, buf),
            buf.len(),
        )
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        as_read(std::pin::Pin::new(&mut self.stream).poll_flush(cx), ())
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        as_read(std::pin::Pin::new(&mut self.stream).poll_shutdown(cx), ())
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

#[derive(Debug)]
struct Response {
    status: u16,
    reason: String,
    body: Vec<u8>,
}

/// Percent-encodes a query parameter value (everything but RFC 3986's unreserved characters).
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        os::unix::net::UnixListener,
        sync::mpsc,
        time::Instant,
    };

    use super::*;

    #[test]
    fn encodes_query_values() {
        assert_eq!(
            encode("spiffe://td/ns/a b/sa/x&y=z"),
            "spiffe%3A%2F%2Ftd%2Fns%2Fa%20b%2Fsa%2Fx%26y%3Dz"
        );
        assert_eq!(
            encode("info,ambit_agent::xds=debug"),
            "info%2Cambit_agent%3A%3Axds%3Ddebug"
        );
    }

    /// A unix socket in a fresh temp dir, removed on drop.
    struct TempSocket(PathBuf);

    impl TempSocket {
        fn new(tag: &str) -> TempSocket {
            let dir = std::env::temp_dir().join(format!(
                "ambit-client-{tag}-{}-{:x}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            TempSocket(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.join("admin.sock")
        }
    }

    impl Drop for TempSocket {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Serves one connection: hands the raw request to the test and writes `answer`.
    fn serve_once(listener: UnixListener, answer: &'static str) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Head, then the body of its content-length.
            loop {
                let Ok(n) = s.read(&mut buf) else { return };
                request.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&request).into_owned();
                if let Some((head, body)) = text.split_once("\r\n\r\n") {
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length: ")
                                .map(str::to_owned)
                        })
                        .and_then(|v| v.parse::<usize>().ok())
                        .unwrap_or(0);
                    if body.len() >= len || n == 0 {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let _ = tx.send(String::from_utf8_lossy(&request).into_owned());
            let _ = s.write_all(answer.as_bytes());
        });
        rx
    }

    #[test]
    fn posts_json_with_content_length_and_decodes_the_answer() {
        let dir = TempSocket::new("post");
        let listener = UnixListener::bind(dir.path()).expect("bind");
        let requests = serve_once(
            listener,
            "HTTP/1.1 200 OK\r\ncontent-length: 38\r\n\r\n{\"enrolled\":true,\"reason\":\"captured\"}\n\n",
        );
        let client = Client::new("ambit-cni", dir.path());
        let answer: api::CniAnswer = client
            .post("/cni/add", &serde_json::json!({"namespace": "default"}))
            .expect("answer");
        assert!(answer.enrolled);
        let request = requests.recv().expect("request seen");
        assert!(
            request.starts_with("POST /cni/add HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(
            request.contains("content-type: application/json\r\n"),
            "{request}"
        );
        assert!(request.contains("content-length: 23\r\n"), "{request}");
        assert!(request.contains("user-agent: ambit-cni/"), "{request}");
        assert!(
            request.ends_with("\r\n\r\n{\"namespace\":\"default\"}"),
            "{request}"
        );
    }

    #[test]
    fn an_error_status_carries_the_agents_message() {
        let dir = TempSocket::new("api");
        let listener = UnixListener::bind(dir.path()).expect("bind");
        let _requests = serve_once(
            listener,
            "HTTP/1.1 409 Conflict\r\ncontent-length: 26\r\n\r\n{\"error\":\"not enrolled\"}\n\n",
        );
        let err = Client::new("ambit-cni", dir.path())
            .post::<_, api::CniAnswer>("/cni/check", &())
            .expect_err("409");
        assert!(
            matches!(&err, Error::Api { status: 409, message } if message == "not enrolled"),
            "{err:?}"
        );
        assert!(!err.is_unreachable());
    }

    #[test]
    fn reads_chunked_answers_and_refuses_what_is_not_one() {
        let cases: [(&'static str, &str); 3] = [
            (
                "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
                 3\r\nabc\r\nA;x=y\r\n0123456789\r\n0\r\nTrailer: 1\r\n\r\n",
                "the agent answered 404: abc0123456789",
            ),
            ("SSH-2.0-OpenSSH\r\n", "is this the agent's admin socket?"),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort",
                "the connection closed before the answer was complete",
            ),
        ];
        for (answer, expected) in cases {
            let dir = TempSocket::new("answers");
            let listener = UnixListener::bind(dir.path()).expect("bind");
            let _requests = serve_once(listener, answer);
            let err = Client::new("ambitctl", dir.path())
                .get::<serde_json::Value>("/status")
                .expect_err("not a 2xx JSON answer");
            assert!(err.to_string().contains(expected), "{answer:?}: {err}");
            assert!(!err.is_unreachable(), "{err:?}");
        }
    }

    #[test]
    fn the_timeout_bounds_the_whole_call() {
        let dir = TempSocket::new("slow");
        // Accepts and never answers.
        let listener = UnixListener::bind(dir.path()).expect("bind");
        let client = Client::new("ambit-cni", dir.path()).with_timeout(Duration::from_millis(200));
        let started = Instant::now();
        let err = client
            .get::<serde_json::Value>("/status")
            .expect_err("times out");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(matches!(err, Error::Timeout { .. }), "{err:?}");
        assert!(err.is_unreachable());
        assert!(err.to_string().contains("within 0.2s"), "{err}");
        drop(listener);
    }

    #[test]
    fn a_missing_socket_names_the_callers_hint() {
        let dir = TempSocket::new("none");
        let err = Client::new("ambit-cni", dir.path())
            .with_socket_hint("set agentSocket in the CNI network config")
            .get::<serde_json::Value>("/status")
            .expect_err("no socket");
        assert!(err.is_unreachable());
        assert!(
            err.to_string()
                .ends_with("`adminSocket` names it; set agentSocket in the CNI network config"),
            "{err}"
        );
    }
}
