//! The admin API client: one HTTP/1.1 request per connection on the agent's unix socket, shared
//! by `ambitctl` (questions from an operator) and `ambit-cni` (the CNI plugin telling the agent
//! about a pod).
//!
//! Synchronous on purpose: both callers ask one question and act on the answer, so a blocking
//! `UnixStream` bounded by a deadline is all they need (no async runtime, no HTTP crate). The
//! deadline is per call: a status query should fail fast, a CNI ADD waits for the pod's
//! enrollment. Failures to reach the agent say what to check, since that is the first thing an
//! operator hits when the agent is down.

use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::{fs::FileTypeExt, net::UnixStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Serialize, de::DeserializeOwned};

use super::api;

/// How long a call may take unless the caller says otherwise ([`Client::with_timeout`]).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Upper bounds on what we accept, so a confused peer cannot make us read forever.
const MAX_LINE: u64 = 64 * 1024;
const MAX_HEADERS: usize = 100;
const MAX_BODY: u64 = 512 * 1024 * 1024;

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
        let deadline = Instant::now() + self.timeout;
        let stream = self.connect()?;
        let content = match body {
            None => String::new(),
            Some([]) => "Content-Length: 0\r\n".to_owned(),
            Some(b) => format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ),
        };
        let mut message = format!(
            "{method} {path} HTTP/1.1\r\nHost: ambit\r\nConnection: close\r\n\
             Accept: application/json\r\nUser-Agent: {}/{}\r\n{content}\r\n",
            self.name,
            env!("CARGO_PKG_VERSION")
        )
        .into_bytes();
        message.extend_from_slice(body.unwrap_or_default());
        let mut io = Deadline {
            stream: &stream,
            deadline,
        };
        // A peer that answers and closes before reading (an early error, or not our server at
        // all) makes the write fail; its answer is still worth reading.
        let written = io.write_all(&message);
        let response = read_response(&mut BufReader::new(io)).map_err(|e| match (e, written) {
            (ReadError::Malformed(detail), _) => self.bad(detail),
            (_, Err(e)) | (ReadError::Io(e), Ok(())) => self.io_error(e),
            (ReadError::Eof, Ok(())) => {
                self.bad("the connection closed before the answer was complete")
            }
        })?;
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

    fn connect(&self) -> Result<UnixStream, Error> {
        let socket = self.socket.clone();
        UnixStream::connect(&self.socket).map_err(|e| match e.kind() {
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
        })
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

/// The socket, with every read and write bounded by what is left until `deadline`: the call's
/// timeout covers the whole exchange, not each syscall.
struct Deadline<'a> {
    stream: &'a UnixStream,
    deadline: Instant,
}

impl Deadline<'_> {
    /// What is left, or a `TimedOut` error when nothing is.
    fn remaining(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        Ok(left)
    }
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(Some(self.remaining()?))?;
        self.stream.read(buf)
    }
}

impl Write for Deadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(Some(self.remaining()?))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
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

#[derive(Debug)]
enum ReadError {
    Io(io::Error),
    /// The stream ended before a line or body was complete.
    Eof,
    Malformed(String),
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

fn malformed<T>(detail: impl Into<String>) -> Result<T, ReadError> {
    Err(ReadError::Malformed(detail.into()))
}

/// Reads one HTTP/1.1 response: status line, headers, and a body delimited by
/// `Transfer-Encoding: chunked`, `Content-Length`, or the end of the stream.
fn read_response(r: &mut impl BufRead) -> Result<Response, ReadError> {
    let status_line = read_line(r)?;
    let mut parts = status_line.splitn(3, ' ');
    let (version, code, reason) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return malformed(format!(
            "not an HTTP/1.x response (starts with {status_line:?}); is this the agent's admin socket?"
        ));
    }
    let Some(status) = code.and_then(|c| c.parse::<u16>().ok()) else {
        return malformed(format!("bad status line {status_line:?}"));
    };

    let mut content_length = None;
    let mut chunked = false;
    for n in 0.. {
        let line = read_line(r)?;
        if line.is_empty() {
            break;
        }
        if n == MAX_HEADERS {
            return malformed(format!("more than {MAX_HEADERS} headers"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return malformed(format!("bad header line {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                Ok(len) if len <= MAX_BODY => content_length = Some(len),
                _ => return malformed(format!("bad Content-Length {value:?}")),
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value
                .rsplit(',')
                .next()
                .is_some_and(|v| v.trim().eq_ignore_ascii_case("chunked"));
        }
    }

    let mut body = Vec::new();
    if chunked {
        loop {
            let line = read_line(r)?;
            let size = line.split(';').next().unwrap_or("").trim();
            let Ok(size) = u64::from_str_radix(size, 16) else {
                return malformed(format!("bad chunk size line {line:?}"));
            };
            if size == 0 {
                // Trailers (ignored) up to the empty line.
                while !read_line(r)?.is_empty() {}
                break;
            }
            if body.len() as u64 + size > MAX_BODY {
                return malformed("body too large");
            }
            read_exactly(r, size, &mut body)?;
            if !read_line(r)?.is_empty() {
                return malformed("chunk not followed by CRLF");
            }
        }
    } else if let Some(len) = content_length {
        read_exactly(r, len, &mut body)?;
    } else {
        r.take(MAX_BODY).read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        reason: reason.to_owned(),
        body,
    })
}

/// One line without its CRLF (or LF); an error at the end of the stream.
fn read_line(r: &mut impl BufRead) -> Result<String, ReadError> {
    let mut line = Vec::new();
    r.take(MAX_LINE).read_until(b'\n', &mut line)?;
    if line.last() != Some(&b'\n') {
        return if line.len() as u64 == MAX_LINE {
            malformed("line too long")
        } else {
            Err(ReadError::Eof)
        };
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).or_else(|_| malformed("header line is not UTF-8"))
}

fn read_exactly(r: &mut impl BufRead, len: u64, body: &mut Vec<u8>) -> Result<(), ReadError> {
    let read = r.take(len).read_to_end(body)?;
    if (read as u64) < len {
        return Err(ReadError::Eof);
    }
    Ok(())
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
    use std::{os::unix::net::UnixListener, sync::mpsc};

    use super::*;

    fn parse(raw: &str) -> Result<Response, ReadError> {
        read_response(&mut raw.as_bytes())
    }

    #[test]
    fn content_length_body() {
        let r = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloEXTRA").expect("parses");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
    }

    #[test]
    fn chunked_body() {
        let raw = "HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n\
                   3\r\nabc\r\nA;x=y\r\n0123456789\r\n0\r\nTrailer: 1\r\n\r\n";
        let r = parse(raw).expect("parses");
        assert_eq!(r.status, 404);
        assert_eq!(r.body, b"abc0123456789");
    }

    #[test]
    fn body_to_eof_and_truncation() {
        let r = parse("HTTP/1.0 200 OK\n\n{}").expect("parses");
        assert_eq!(r.body, b"{}");
        assert!(parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nshort").is_err());
        assert!(parse("SSH-2.0-OpenSSH\r\n").is_err());
    }

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
                        .find_map(|l| l.strip_prefix("Content-Length: "))
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
            request.contains("Content-Type: application/json\r\n"),
            "{request}"
        );
        assert!(request.contains("Content-Length: 23\r\n"), "{request}");
        assert!(request.contains("User-Agent: ambit-cni/"), "{request}");
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
