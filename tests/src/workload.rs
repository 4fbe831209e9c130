//! Typed wrappers around `ambit-testpod`, the workload run in pods: an echo [`Server`] and the
//! client ([`Pod::connect`], [`Pod::spawn_connect`]), whose JSON event lines are collected by a
//! reader thread per pipe.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    process::{Command, ExitStatus, Stdio},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::{bed::Pod, process::Process};

/// How long [`Pod::serve`] waits for the server to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// The client's default connect/IO timeout.
const DEFAULT_TIMEOUT_MS: u64 = 5000;

#[derive(Default)]
struct EventsState {
    events: Vec<Value>,
    stdout_closed: bool,
    stderr: String,
}

/// JSON events from a testpod's stdout, and its stderr, collected by reader threads.
#[derive(Default)]
struct Events {
    state: Mutex<EventsState>,
    changed: Condvar,
}

impl Events {
    fn start(process: &Process) -> Arc<Events> {
        let events = Arc::new(Events::default());
        if let Some(stdout) = process.take_stdout() {
            let ev = Arc::clone(&events);
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Ok(v) = serde_json::from_str::<Value>(&line) {
                        ev.lock().events.push(v);
                        ev.changed.notify_all();
                    }
                }
                ev.lock().stdout_closed = true;
                ev.changed.notify_all();
            });
        }
        if let Some(mut stderr) = process.take_stderr() {
            let ev = Arc::clone(&events);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stderr.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    ev.lock()
                        .stderr
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        events
    }

    fn lock(&self) -> MutexGuard<'_, EventsState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn snapshot(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    fn stderr(&self) -> String {
        self.lock().stderr.clone()
    }

    /// Waits until `done(events, stdout_closed)` returns `Some`, or `timeout` passes.
    fn wait<T>(
        &self,
        timeout: Duration,
        mut done: impl FnMut(&[Value], bool) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut state = self.lock();
        loop {
            if let Some(v) = done(&state.events, state.stdout_closed) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            // Wake up now and then even without events, so callers' conditions on time hold.
            let wait = (deadline - now).min(Duration::from_millis(100));
            state = self
                .changed
                .wait_timeout(state, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

fn event_is(v: &Value, name: &str) -> bool {
    v.get("event").and_then(Value::as_str) == Some(name)
}

fn addr_field(v: &Value, name: &str) -> Option<SocketAddr> {
    v.get(name)?.as_str()?.parse().ok()
}

/// A running `ambit-testpod serve`: a dual-stack echo server in a pod. Killed when dropped.
pub struct Server {
    process: Process,
    events: Arc<Events>,
    pod: String,
    port: u16,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("pod", &self.pod)
            .field("port", &self.port)
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl Server {
    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The requests an HTTP server ([`Pod::serve_http`]) has answered.
    pub fn requests(&self) -> Vec<Value> {
        self.events
            .snapshot()
            .into_iter()
            .filter(|v| event_is(v, "request"))
            .collect()
    }

    /// Its process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// All events so far (`listening`, `accept`, `closed`).
    pub fn events(&self) -> Vec<Value> {
        self.events.snapshot()
    }

    /// The peers of the connections accepted so far, as the server saw them (IPv4-mapped
    /// addresses shown as IPv4).
    pub fn accepted_peers(&self) -> Vec<SocketAddr> {
        self.events()
            .iter()
            .filter(|v| event_is(v, "accept"))
            .filter_map(|v| addr_field(v, "peer"))
            .collect()
    }

    /// The `closed` events so far (`peer`, `bytes` echoed, optional `error`).
    pub fn closed(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|v| event_is(v, "closed"))
            .collect()
    }

    /// Waits up to `timeout` until at least `n` connections were accepted; returns their peers.
    pub fn wait_for_accepts(&self, n: usize, timeout: Duration) -> Result<Vec<SocketAddr>> {
        let got = self.events.wait(timeout, |events, closed| {
            let peers: Vec<SocketAddr> = events
                .iter()
                .filter(|v| event_is(v, "accept"))
                .filter_map(|v| addr_field(v, "peer"))
                .collect();
            (peers.len() >= n || closed).then_some(peers)
        });
        match got {
            Some(peers) if peers.len() >= n => Ok(peers),
            other => bail!(
                "server in pod {} on port {} accepted {} of {n} connections within {timeout:?}{}; \
                 events: {:?}",
                self.pod,
                self.port,
                other.map_or_else(|| self.accepted_peers().len(), |p| p.len()),
                if self.process.is_running() {
                    ""
                } else {
                    " and exited"
                },
                self.events()
            ),
        }
    }

    /// Waits up to `timeout` for an event matching `pred`.
    pub fn wait_for_event(
        &self,
        mut pred: impl FnMut(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value> {
        self.events
            .wait(timeout, |events, _| events.iter().find(|v| pred(v)).cloned())
            .ok_or_else(|| {
                anyhow!(
                    "server in pod {} on port {}: no matching event within {timeout:?}; events: {:?}",
                    self.pod,
                    self.port,
                    self.events()
                )
            })
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        self.events.stderr()
    }

    /// Kills it.
    pub fn stop(&self) -> Result<ExitStatus> {
        self.process.kill()
    }
}

/// What `ambit-testpod connect` reported.
#[derive(Debug, Clone, Default)]
pub struct ClientReport {
    /// The peer the client saw (`getpeername`), if it connected.
    pub peer: Option<SocketAddr>,
    /// The client's local address (its source port), if it connected.
    pub local: Option<SocketAddr>,
    /// Bytes sent.
    pub sent: u64,
    /// Bytes echoed back.
    pub received: u64,
    /// Whether every byte came back unchanged and the client exited 0.
    pub ok: bool,
    /// On failure: `connect`, `io` or `verify`.
    pub error_stage: Option<String>,
    /// On failure: the `io::ErrorKind`, e.g. `ConnectionRefused`, `TimedOut`, `ConnectionReset`.
    pub error_kind: Option<String>,
    /// On failure: the error message.
    pub error_message: Option<String>,
    /// The client's exit status.
    pub status: Option<ExitStatus>,
    /// All events it printed.
    pub events: Vec<Value>,
    /// Its stderr.
    pub stderr: String,
}

impl ClientReport {
    fn from_events(events: Vec<Value>, status: Option<ExitStatus>, stderr: String) -> ClientReport {
        let mut r = ClientReport {
            status,
            stderr,
            ..ClientReport::default()
        };
        let mut done_ok = false;
        for v in &events {
            if event_is(v, "connected") {
                r.peer = addr_field(v, "peer");
                r.local = addr_field(v, "local");
            } else if event_is(v, "done") {
                r.sent = v.get("sent").and_then(Value::as_u64).unwrap_or(0);
                r.received = v.get("received").and_then(Value::as_u64).unwrap_or(0);
                done_ok = v.get("ok").and_then(Value::as_bool).unwrap_or(false);
            } else if event_is(v, "error") {
                let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
                r.error_stage = s("stage");
                r.error_kind = s("kind");
                r.error_message = s("message");
            }
        }
        r.ok = done_ok && r.error_kind.is_none() && status.is_some_and(|s| s.success());
        r.events = events;
        r
    }
}

/// A running `ambit-testpod connect` (see [`Pod::spawn_connect`]). Killed when dropped.
pub struct ClientHandle {
    process: Process,
    events: Arc<Events>,
    pod: String,
    addr: SocketAddr,
    deadline: Duration,
}

impl std::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandle")
            .field("pod", &self.pod)
            .field("addr", &self.addr)
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl ClientHandle {
    /// Its process.
    pub fn process(&self) -> &Process {
        &self.process
    }

    /// Events so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.snapshot()
    }

    /// Waits up to `timeout` for the connection; returns `(peer, local)` as the client sees them.
    pub fn wait_connected(&self, timeout: Duration) -> Result<(SocketAddr, SocketAddr)> {
        let got = self.events.wait(timeout, |events, closed| {
            for v in events {
                if event_is(v, "connected") {
                    return Some(Ok((addr_field(v, "peer"), addr_field(v, "local"))));
                }
                if event_is(v, "error") {
                    return Some(Err(v.clone()));
                }
            }
            closed.then_some(Err(Value::Null))
        });
        match got {
            Some(Ok((Some(peer), Some(local)))) => Ok((peer, local)),
            Some(Ok(_)) => bail!("BUG: testpod connected event without addresses"),
            Some(Err(v)) => bail!(
                "client in pod {} could not connect to {}: {v}; stderr: {}",
                self.pod,
                self.addr,
                self.events.stderr()
            ),
            None => bail!(
                "client in pod {} not connected to {} within {timeout:?}",
                self.pod,
                self.addr
            ),
        }
    }

    /// Waits (up to a deadline derived from its timeouts and hold time) for it to finish.
    pub fn wait(self) -> Result<ClientReport> {
        let timeout = self.deadline;
        self.wait_timeout(timeout)
    }

    /// Waits up to `timeout` for it to finish; kills it and fails if it does not.
    pub fn wait_timeout(self, timeout: Duration) -> Result<ClientReport> {
        let status = self.process.wait_timeout(timeout)?;
        let Some(status) = status else {
            let _ = self.process.kill();
            bail!(
                "client in pod {} connecting to {} did not finish within {timeout:?}; killed it; \
                 events: {:?}",
                self.pod,
                self.addr,
                self.events.snapshot()
            );
        };
        // The process is gone; give the reader thread a moment to drain the pipe.
        self.events
            .wait(Duration::from_secs(2), |_, closed| closed.then_some(()));
        Ok(ClientReport::from_events(
            self.events.snapshot(),
            Some(status),
            self.events.stderr(),
        ))
    }

    /// Kills it.
    pub fn kill(&self) -> Result<ExitStatus> {
        self.process.kill()
    }
}

impl Pod {
    /// Starts a dual-stack echo server on `[::]:port` in this pod and waits until it listens.
    pub fn serve(&self, port: u16) -> Result<Server> {
        self.serve_with(port, false)
    }

    /// Like [`Pod::serve`]; with `v6only`, the socket does not accept IPv4.
    pub fn serve_with(&self, port: u16, v6only: bool) -> Result<Server> {
        let mut args = vec!["serve".to_owned(), "--port".to_owned(), port.to_string()];
        if v6only {
            args.push("--v6only".to_owned());
        }
        self.start_server(port, &args)
    }

    /// Starts a UDP DNS resolver on `port` answering A queries for `answers` (`name`, IPv4)
    /// and NXDOMAIN for other names; each query is a `query` event with its `name`.
    pub fn serve_dns(&self, port: u16, answers: &[(&str, &str)]) -> Result<Server> {
        let mut args = vec![
            "dns-server".to_owned(),
            "--port".to_owned(),
            port.to_string(),
        ];
        for (name, ip) in answers {
            args.push("--answer".to_owned());
            args.push(format!("{name}={ip}"));
        }
        self.start_server(port, &args)
    }

    /// Sends one DNS query from the pod (`ambit-testpod dns-query SERVER ARGS...`) and returns
    /// its `answer` event: `rcode`, `answers` (addresses), `truncated`, `id`, and `from` (the
    /// address the answer came from, as the app sees it).
    pub fn dns_query(&self, server: SocketAddr, args: &[&str]) -> Result<serde_json::Value> {
        let bin = self.bed.testpod_bin()?;
        let bin = bin.to_string_lossy();
        let server = server.to_string();
        let mut full = vec![bin.as_ref(), "dns-query", server.as_str()];
        full.extend_from_slice(args);
        let out = self.exec(&full)?;
        let last = out.lines().last().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(last)
            .map_err(|e| anyhow::anyhow!("dns-query printed {out:?}: {e}"))?;
        if v["event"] != "answer" {
            anyhow::bail!("dns-query in pod {}: {v}", self.name());
        }
        Ok(v)
    }

    /// Starts an HTTP/1.1 server on `port` that answers with its pod's name (`x-served-by`);
    /// `/status/<code>` answers that status and `/delay/<ms>` answers late. Each request is a
    /// `request` event ([`Server::requests`]).
    pub fn serve_http(&self, port: u16) -> Result<Server> {
        let args = [
            "http".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--name".to_owned(),
            self.name().to_owned(),
        ];
        self.start_server(port, &args)
    }

    fn start_server(&self, port: u16, args: &[String]) -> Result<Server> {
        let bin = self.bed.testpod_bin()?;
        let mut cmd = self.try_command(&bin)?;
        cmd.args(args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let process = self.spawn(&mut cmd)?;
        let events = Events::start(&process);
        let listening = events.wait(LISTEN_TIMEOUT, |events, closed| {
            if events.iter().any(|v| event_is(v, "listening")) {
                Some(true)
            } else {
                closed.then_some(false)
            }
        });
        if listening != Some(true) {
            let _ = process.kill();
            bail!(
                "server in pod {} did not listen on port {port} within {LISTEN_TIMEOUT:?}: {}",
                self.name(),
                events.stderr().trim()
            );
        }
        Ok(Server {
            process,
            events,
            pod: self.name().to_owned(),
            port,
        })
    }

    /// Connects to `addr` from this pod, sends `bytes` bytes, checks the echo, and reports. A
    /// refused or failed connection is a report with `ok == false` and `error_kind` set; `Err`
    /// means the client could not be run.
    pub fn connect(&self, addr: SocketAddr, bytes: usize) -> Result<ClientReport> {
        self.connect_with(addr, bytes, 0, DEFAULT_TIMEOUT_MS)
    }

    /// Like [`Pod::connect`], holding the connection open `hold_ms` after sending, with
    /// connect/IO timeout `timeout_ms`.
    pub fn connect_with(
        &self,
        addr: SocketAddr,
        bytes: usize,
        hold_ms: u64,
        timeout_ms: u64,
    ) -> Result<ClientReport> {
        self.spawn_connect(addr, bytes, hold_ms, timeout_ms)?.wait()
    }

    /// Starts a client like [`Pod::connect_with`] without waiting for it.
    pub fn spawn_connect(
        &self,
        addr: SocketAddr,
        bytes: usize,
        hold_ms: u64,
        timeout_ms: u64,
    ) -> Result<ClientHandle> {
        self.spawn_client(ClientRun {
            addr,
            bytes,
            hold_ms,
            timeout_ms,
            extra: &[],
        })
    }
}

impl Pod {
    /// Starts a client that sends `bytes` to `addr`, waits `hold_ms`, and then resets the
    /// connection (`SO_LINGER` 0) instead of closing it; it reports a `reset` event.
    pub fn spawn_connect_reset(
        &self,
        addr: SocketAddr,
        bytes: usize,
        hold_ms: u64,
    ) -> Result<ClientHandle> {
        self.spawn_client(ClientRun {
            addr,
            bytes,
            hold_ms,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            extra: &["--reset"],
        })
    }

    fn spawn_client(&self, run: ClientRun<'_>) -> Result<ClientHandle> {
        let bin = self.bed.testpod_bin()?;
        let cmd = self.try_command(&bin)?;
        spawn_client(|c| self.spawn(c), cmd, &format!("pod {}", self.name()), run)
    }

    /// Like [`Pod::serve`], resetting each connection once it has echoed `bytes`.
    pub fn serve_then_reset(&self, port: u16, bytes: u64) -> Result<Server> {
        let args = [
            "serve".to_owned(),
            "--port".to_owned(),
            port.to_string(),
            "--reset-after".to_owned(),
            bytes.to_string(),
        ];
        self.start_server(port, &args)
    }

    /// `ambit-testpod flood`: `connections` connections to `addr` held open at once, `bytes` sent
    /// and echoed on each; returns its `flood` event (`opened`, `echoed`, `errors`).
    pub fn flood(&self, addr: SocketAddr, connections: usize, bytes: usize) -> Result<Value> {
        let bin = self.bed.testpod_bin()?;
        let mut cmd = self.try_command(&bin)?;
        cmd.args([
            "flood".to_owned(),
            addr.to_string(),
            "--connections".to_owned(),
            connections.to_string(),
            "--bytes".to_owned(),
            bytes.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let process = self.spawn(&mut cmd)?;
        let events = Events::start(&process);
        let deadline = Duration::from_secs(300);
        let _ = process.wait_timeout(deadline)?;
        events
            .wait(Duration::from_secs(5), |evs, _| {
                evs.iter().find(|e| e["event"] == "flood").cloned()
            })
            .ok_or_else(|| anyhow!("the flood client in pod {} reported nothing", self.name()))
    }
}

/// What one `ambit-testpod connect` does (see [`Pod::connect_with`]); `extra` are more flags.
pub(crate) struct ClientRun<'a> {
    pub addr: SocketAddr,
    pub bytes: usize,
    pub hold_ms: u64,
    pub timeout_ms: u64,
    pub extra: &'a [&'a str],
}

/// Starts `ambit-testpod connect` (`cmd` is the binary, set up to run where it should) with
/// `spawn` (a pod's or a node's, which tracks the process). `who` names it in errors.
pub(crate) fn spawn_client(
    spawn: impl FnOnce(&mut Command) -> Result<Process>,
    mut cmd: Command,
    who: &str,
    run: ClientRun<'_>,
) -> Result<ClientHandle> {
    let ClientRun {
        addr,
        bytes,
        hold_ms,
        timeout_ms,
        extra,
    } = run;
    cmd.args([
        "connect".to_owned(),
        addr.to_string(),
        "--bytes".to_owned(),
        bytes.to_string(),
        "--hold-ms".to_owned(),
        hold_ms.to_string(),
        "--timeout-ms".to_owned(),
        timeout_ms.to_string(),
    ])
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let process = spawn(&mut cmd).with_context(|| format!("cannot start the client in {who}"))?;
    let events = Events::start(&process);
    // The client bounds itself (connect and each read/write time out); this is a backstop.
    let deadline = Duration::from_millis(hold_ms + 4 * timeout_ms) + Duration::from_secs(60);
    Ok(ClientHandle {
        process,
        events,
        pod: who.to_owned(),
        addr,
        deadline,
    })
}
