//! `ambit-testpod`: the workload the test bed runs inside pods. Plain std and threads; every
//! event is one JSON object per line on stdout, flushed at once, so the bed can follow along.
//!
//! ```text
//! ambit-testpod serve --port P [--v6only] [--reset-after BYTES]
//! ambit-testpod connect ADDR --bytes N [--hold-ms MS] [--timeout-ms MS] [--reset]
//! ambit-testpod http --port P --name NAME
//! ambit-testpod flood ADDR --connections N --bytes B [--timeout-ms MS]
//! ambit-testpod dns-server --port P [--answer NAME=IPV4]...
//! ambit-testpod dns-query SERVER (--name NAME | --raw HEX) [--aaaa] [--tcp] [--connected]
//! ```
//!
//! `flood` opens N connections to ADDR and holds them all open at once: it sends B bytes on each,
//! then reads each one's echo back, and reports one `flood` event with the counts.
//!
//! `serve` is a dual-stack echo server on `[::]:P`; `connect` sends N bytes of a fixed pattern,
//! reads the echo concurrently and checks it. `--reset` (connect) resets the connection after
//! sending instead of closing it; `--reset-after` (serve) resets each connection once it has
//! echoed that many bytes. `http` is a dual-stack HTTP/1.1 server (kept-alive
//! connections) answering `NAME METHOD PATH` with `x-served-by: NAME`; `/status/<code>` answers
//! that status and `/delay/<ms>` answers after that long. Each request is a `request` event.

use std::{
    io::{self, Read, Write},
    net::{Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::ExitCode,
    time::Duration,
};

use serde_json::{Value, json};
use socket2::{Domain, Protocol, Socket, Type};

const USAGE: &str = "usage:\n  ambit-testpod serve --port P [--v6only] [--reset-after BYTES]\n  \
                     ambit-testpod connect ADDR --bytes N [--hold-ms MS] [--timeout-ms MS] [--reset]\n  \
                     ambit-testpod http --port P --name NAME\n  \
                     ambit-testpod flood ADDR --connections N --bytes B [--timeout-ms MS]\n  \
                     ambit-testpod dns-server --port P [--answer NAME=IPV4]...\n  \
                     ambit-testpod dns-query SERVER (--name NAME | --raw HEX) [--aaaa] [--tcp] [--connected]\n\
                     (--hold-ms: send half the bytes, pause, send the rest)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("serve") => parse_serve(&args[1..]).map(serve),
        Some("connect") => parse_connect(&args[1..]).map(connect),
        Some("http") => parse_http(&args[1..]).map(|(args, name)| http(args, name)),
        Some("flood") => parse_flood(&args[1..]).map(flood),
        Some("dns-server") => parse_dns_server(&args[1..]).map(dns_server),
        Some("dns-query") => parse_dns_query(&args[1..]).map(dns_query),
        _ => Err(format!("missing or unknown subcommand\n{USAGE}")),
    };
    match result {
        Ok(code) => code,
        Err(usage_error) => {
            eprintln!("ambit-testpod: {usage_error}");
            ExitCode::from(2)
        }
    }
}

/// Prints one event line and flushes it. Output errors are ignored: nobody is listening then.
fn emit(event: Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{event}");
    let _ = out.flush();
}

fn canonical(addr: SocketAddr) -> String {
    SocketAddr::new(addr.ip().to_canonical(), addr.port()).to_string()
}

/// The error kind as tests match on it. Read/write timeouts surface as `WouldBlock` on Unix.
fn kind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::WouldBlock => "TimedOut".to_owned(),
        k => format!("{k:?}"),
    }
}

fn error_event(stage: &str, e: &io::Error, context: &str) -> Value {
    json!({
        "event": "error",
        "stage": stage,
        "kind": kind(e),
        "message": format!("{context}: {e}"),
    })
}

/// Takes the value of a `--flag VALUE` argument.
fn flag_value<'a>(args: &'a [String], i: &mut usize, flag: &str) -> Result<&'a str, String> {
    *i += 1;
    args.get(*i)
        .map(String::as_str)
        .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
}

fn parse_num<T: std::str::FromStr>(s: &str, flag: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("{flag}: {s:?} is not a valid number\n{USAGE}"))
}

struct ServeArgs {
    port: u16,
    v6only: bool,
    reset_after: Option<u64>,
}

fn parse_serve(args: &[String]) -> Result<ServeArgs, String> {
    let mut port = None;
    let mut v6only = false;
    let mut reset_after = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--port" => port = Some(parse_num(flag_value(args, &mut i, "--port")?, "--port")?),
            "--v6only" => v6only = true,
            "--reset-after" => {
                reset_after = Some(parse_num(
                    flag_value(args, &mut i, "--reset-after")?,
                    "--reset-after",
                )?);
            }
            other => return Err(format!("serve: unexpected argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    Ok(ServeArgs {
        port: port.ok_or_else(|| format!("serve needs --port\n{USAGE}"))?,
        v6only,
        reset_after,
    })
}

struct ConnectArgs {
    addr: SocketAddr,
    bytes: u64,
    hold: Duration,
    timeout: Duration,
    reset: bool,
}

fn parse_connect(args: &[String]) -> Result<ConnectArgs, String> {
    let mut addr = None;
    let mut bytes = None;
    let mut hold_ms = 0u64;
    let mut timeout_ms = 5000u64;
    let mut reset = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--reset" => reset = true,
            "--bytes" => bytes = Some(parse_num(flag_value(args, &mut i, "--bytes")?, "--bytes")?),
            "--hold-ms" => {
                hold_ms = parse_num(flag_value(args, &mut i, "--hold-ms")?, "--hold-ms")?;
            }
            "--timeout-ms" => {
                timeout_ms = parse_num(flag_value(args, &mut i, "--timeout-ms")?, "--timeout-ms")?;
            }
            a if !a.starts_with("--") && addr.is_none() => {
                addr = Some(a.parse::<SocketAddr>().map_err(|_| {
                    format!(
                        "connect: {a:?} is not an address like 10.1.0.2:8080 or [fd00:1::2]:8080"
                    )
                })?);
            }
            other => return Err(format!("connect: unexpected argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    if timeout_ms == 0 {
        return Err("--timeout-ms must be > 0".to_owned());
    }
    Ok(ConnectArgs {
        addr: addr.ok_or_else(|| format!("connect needs ADDR\n{USAGE}"))?,
        bytes: bytes.ok_or_else(|| format!("connect needs --bytes\n{USAGE}"))?,
        hold: Duration::from_millis(hold_ms),
        timeout: Duration::from_millis(timeout_ms),
        reset,
    })
}

fn listen(args: &ServeArgs) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_only_v6(args.v6only)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, args.port)).into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

fn serve(args: ServeArgs) -> ExitCode {
    let listener = match listen(&args) {
        Ok(l) => l,
        Err(e) => {
            emit(error_event(
                "listen",
                &e,
                &format!("cannot listen on [::]:{}", args.port),
            ));
            return ExitCode::FAILURE;
        }
    };
    emit(json!({"event": "listening", "port": args.port}));
    raise_fd_limit();
    let reset_after = args.reset_after;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                // Small stacks: a flood test holds thousands of connections at once.
                let spawned = std::thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn(move || echo(stream, peer, reset_after));
                if let Err(e) = spawned {
                    emit(error_event("accept", &e, "cannot start a thread"));
                }
            }
            Err(e) => {
                emit(error_event("accept", &e, "accept failed"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn echo(mut stream: TcpStream, peer: SocketAddr, reset_after: Option<u64>) {
    let peer = canonical(peer);
    let local = stream
        .local_addr()
        .map(canonical)
        .unwrap_or_else(|e| format!("unknown ({e})"));
    emit(json!({"event": "accept", "peer": peer, "local": local}));
    let mut buf = vec![0u8; 16 * 1024];
    let mut bytes = 0u64;
    let result = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = stream.write_all(&buf[..n]) {
                    break Err(e);
                }
                bytes += n as u64;
                if reset_after.is_some_and(|r| bytes >= r) {
                    // Closed with SO_LINGER 0: the peer gets an RST.
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                    emit(json!({"event": "closed", "peer": peer, "bytes": bytes, "reset": true}));
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    match result {
        Ok(()) => {
            let _ = stream.shutdown(Shutdown::Write);
            emit(json!({"event": "closed", "peer": peer, "bytes": bytes}));
        }
        Err(e) => emit(json!({
            "event": "closed", "peer": peer, "bytes": bytes,
            "error": kind(&e), "message": e.to_string(),
        })),
    }
}

fn parse_http(args: &[String]) -> Result<(ServeArgs, String), String> {
    let mut port = None;
    let mut name = None;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--port" => port = Some(parse_num(flag_value(args, &mut i, "--port")?, "--port")?),
            "--name" => name = Some(flag_value(args, &mut i, "--name")?.to_owned()),
            other => return Err(format!("http: unexpected argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    Ok((
        ServeArgs {
            port: port.ok_or_else(|| format!("http needs --port\n{USAGE}"))?,
            v6only: false,
            reset_after: None,
        },
        name.ok_or_else(|| format!("http needs --name\n{USAGE}"))?,
    ))
}

fn http(args: ServeArgs, name: String) -> ExitCode {
    let listener = match listen(&args) {
        Ok(l) => l,
        Err(e) => {
            emit(error_event(
                "listen",
                &e,
                &format!("cannot listen on [::]:{}", args.port),
            ));
            return ExitCode::FAILURE;
        }
    };
    emit(json!({"event": "listening", "port": args.port}));
    let name: &'static str = Box::leak(name.into_boxed_str());
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                std::thread::spawn(move || http_connection(stream, peer, name));
            }
            Err(e) => {
                emit(error_event("accept", &e, "accept failed"));
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Serves requests on one kept-alive connection until the client closes it.
fn http_connection(stream: TcpStream, peer: SocketAddr, name: &str) {
    let peer = canonical(peer);
    emit(json!({"event": "accept", "peer": peer}));
    let Ok(write_half) = stream.try_clone() else {
        return;
    };
    let mut reader = io::BufReader::new(stream);
    let mut out = write_half;
    loop {
        let mut head = Vec::new();
        // The head: lines up to an empty one.
        loop {
            let mut line = String::new();
            match io::BufRead::read_line(&mut reader, &mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(_) => return,
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let Some((method, path)) = head.first().and_then(|l| {
            let mut parts = l.split(' ');
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        }) else {
            return;
        };
        let header = |n: &str| {
            head.iter().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(n).then(|| v.trim().to_owned())
            })
        };
        let length: usize = header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let close = header("connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
        let mut status = 200u16;
        if let Some(code) = path.strip_prefix("/status/") {
            status = code.parse().unwrap_or(400);
        } else if let Some(ms) = path.strip_prefix("/delay/") {
            std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        }
        emit(json!({
            "event": "request",
            "peer": peer,
            "method": method,
            "path": path,
            "host": header("host"),
            "request_id": header("x-request-id"),
            "body_bytes": length,
            "status": status,
        }));
        let text = format!("{name} {method} {path}\n");
        let response = format!(
            "HTTP/1.1 {status} X\r\nx-served-by: {name}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}\r\n{text}",
            text.len(),
            if close { "connection: close\r\n" } else { "" }
        );
        if out.write_all(response.as_bytes()).is_err() || close {
            return;
        }
    }
}

/// Byte `i` of the stream a client sends.
fn pattern(i: u64) -> u8 {
    (((i % 251) * 31 + 7) % 251) as u8
}

/// What the reader thread saw.
struct Echoed {
    received: u64,
    first_mismatch: Option<u64>,
    error: Option<io::Error>,
}

fn read_echo(mut stream: TcpStream) -> Echoed {
    let mut buf = vec![0u8; 64 * 1024];
    let mut echoed = Echoed {
        received: 0,
        first_mismatch: None,
        error: None,
    };
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return echoed,
            Ok(n) => {
                if echoed.first_mismatch.is_none() {
                    let start = echoed.received;
                    echoed.first_mismatch = buf[..n]
                        .iter()
                        .zip(start..)
                        .find(|(b, i)| **b != pattern(*i))
                        .map(|(_, i)| i);
                }
                echoed.received += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                echoed.error = Some(e);
                return echoed;
            }
        }
    }
}

fn connect(args: ConnectArgs) -> ExitCode {
    let stream = match TcpStream::connect_timeout(&args.addr, args.timeout) {
        Ok(s) => s,
        Err(e) => {
            emit(error_event(
                "connect",
                &e,
                &format!("cannot connect to {}", args.addr),
            ));
            return ExitCode::FAILURE;
        }
    };
    let io_error = |e: io::Error, what: &str| {
        emit(error_event("io", &e, what));
        ExitCode::FAILURE
    };
    let (peer, local) = match (stream.peer_addr(), stream.local_addr()) {
        (Ok(p), Ok(l)) => (p, l),
        (Err(e), _) | (_, Err(e)) => return io_error(e, "cannot read the connection's addresses"),
    };
    emit(json!({"event": "connected", "peer": canonical(peer), "local": canonical(local)}));

    // The reader idles while the writer holds the connection open, so it may wait that long too.
    let timeouts = stream
        .set_read_timeout(Some(args.timeout + args.hold))
        .and_then(|()| stream.set_write_timeout(Some(args.timeout)));
    if let Err(e) = timeouts {
        return io_error(e, "cannot set socket timeouts");
    }
    let reader = match stream.try_clone() {
        Ok(r) => r,
        Err(e) => return io_error(e, "cannot clone the socket for reading"),
    };
    // The reader's outcome comes over a channel, so that a connection cut during the hold is
    // reported when it happens, not when the hold is over.
    let (echo_tx, echo_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = echo_tx.send(read_echo(reader));
    });
    let mut echoed = None;

    let mut writer = stream;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut sent = 0u64;
    // With --hold-ms, half the bytes go before the pause and half after it, so the connection
    // carries data across whatever happens meanwhile (a certificate rotation, an agent drain).
    let half = if args.hold.is_zero() {
        args.bytes
    } else {
        args.bytes / 2
    };
    for (until, pause) in [(half, args.hold), (args.bytes, Duration::ZERO)] {
        while sent < until {
            let n = (until - sent).min(chunk.len() as u64) as usize;
            for (b, i) in chunk[..n].iter_mut().zip(sent..) {
                *b = pattern(i);
            }
            if let Err(e) = writer.write_all(&chunk[..n]) {
                return io_error(
                    e,
                    &format!("send failed after {sent} of {} bytes", args.bytes),
                );
            }
            sent += n as u64;
        }
        if pause.is_zero() {
            continue;
        }
        match echo_rx.recv_timeout(pause) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            // The echo ended before we did: the connection was cut (or the reader died).
            done => {
                echoed = done.ok();
                break;
            }
        }
    }
    if args.reset {
        // Every fd of the socket closes at exit; with SO_LINGER 0 that sends an RST.
        let _ = socket2::SockRef::from(&writer).set_linger(Some(Duration::ZERO));
        emit(json!({"event": "reset", "sent": sent}));
        std::process::exit(0);
    }
    if echoed.is_none()
        && let Err(e) = writer.shutdown(Shutdown::Write)
    {
        return io_error(e, "cannot shut down the sending side");
    }
    let Some(echoed) = echoed.or_else(|| echo_rx.recv().ok()) else {
        emit(json!({"event": "error", "stage": "io", "kind": "Other",
                    "message": "BUG: the reader thread panicked"}));
        return ExitCode::FAILURE;
    };
    if let Some(e) = echoed.error {
        return io_error(
            e,
            &format!("receive failed after {} of {sent} bytes", echoed.received),
        );
    }
    let ok = sent == args.bytes && echoed.received == sent && echoed.first_mismatch.is_none();
    emit(json!({"event": "done", "sent": sent, "received": echoed.received, "ok": ok}));
    if ok {
        return ExitCode::SUCCESS;
    }
    let message = match echoed.first_mismatch {
        Some(at) => format!("echoed data differs from what was sent at byte {at}"),
        None if sent < args.bytes => format!(
            "connection closed during the hold, after {sent} of {} bytes were sent",
            args.bytes
        ),
        None => format!(
            "connection closed after {} of {sent} bytes came back",
            echoed.received
        ),
    };
    emit(json!({"event": "error", "stage": "verify", "kind": "InvalidData", "message": message}));
    ExitCode::FAILURE
}

struct FloodArgs {
    addr: SocketAddr,
    connections: usize,
    bytes: usize,
    timeout: Duration,
}

fn parse_flood(args: &[String]) -> Result<FloodArgs, String> {
    let mut addr = None;
    let mut connections = None;
    let mut bytes = 64usize;
    let mut timeout_ms = 20_000u64;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--connections" => {
                connections = Some(parse_num(
                    flag_value(args, &mut i, "--connections")?,
                    "--connections",
                )?);
            }
            "--bytes" => bytes = parse_num(flag_value(args, &mut i, "--bytes")?, "--bytes")?,
            "--timeout-ms" => {
                timeout_ms = parse_num(flag_value(args, &mut i, "--timeout-ms")?, "--timeout-ms")?;
            }
            a if !a.starts_with("--") && addr.is_none() => {
                addr = Some(
                    a.parse::<SocketAddr>()
                        .map_err(|_| format!("flood: {a:?} is not an address"))?,
                );
            }
            other => return Err(format!("flood: unexpected argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    Ok(FloodArgs {
        addr: addr.ok_or_else(|| format!("flood needs ADDR\n{USAGE}"))?,
        connections: connections.ok_or_else(|| format!("flood needs --connections\n{USAGE}"))?,
        bytes: bytes.clamp(1, 64 * 1024),
        timeout: Duration::from_millis(timeout_ms.max(1)),
    })
}

/// The soft open-files limit up to the hard one (thousands of sockets at once).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// Opens every connection first (so all are open at once), then sends on each, then reads each
/// echo, and reports the counts (errors by kind).
fn flood(args: FloodArgs) -> ExitCode {
    raise_fd_limit();
    let mut errors: std::collections::BTreeMap<String, usize> = Default::default();
    let mut open = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        match TcpStream::connect_timeout(&args.addr, args.timeout) {
            Ok(s) => {
                let _ = s.set_read_timeout(Some(args.timeout));
                let _ = s.set_write_timeout(Some(args.timeout));
                open.push(s);
            }
            Err(e) => *errors.entry(format!("connect {}", kind(&e))).or_default() += 1,
        }
    }
    let payload: Vec<u8> = (0..args.bytes as u64).map(pattern).collect();
    let mut sent = Vec::with_capacity(open.len());
    for mut s in open.drain(..) {
        match s.write_all(&payload) {
            Ok(()) => sent.push(s),
            Err(e) => *errors.entry(format!("send {}", kind(&e))).or_default() += 1,
        }
    }
    let opened = sent.len();
    let mut echoed = 0usize;
    let mut buf = vec![0u8; args.bytes];
    for s in &mut sent {
        match s.read_exact(&mut buf) {
            Ok(()) if buf == payload => echoed += 1,
            Ok(()) => *errors.entry("echo mismatch".to_owned()).or_default() += 1,
            Err(e) => *errors.entry(format!("read {}", kind(&e))).or_default() += 1,
        }
    }
    emit(json!({
        "event": "flood",
        "connections": args.connections,
        "opened": opened,
        "echoed": echoed,
        "errors": errors,
    }));
    drop(sent);
    if echoed == args.connections {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// `dns-server --port P [--answer NAME=IPV4]...`: a UDP resolver on `[::]:P` answering A
/// queries for its names (NXDOMAIN for others); each query is a `query` event.
fn parse_dns_server(args: &[String]) -> Result<(u16, Vec<(String, std::net::Ipv4Addr)>), String> {
    let (mut port, mut answers, mut i) = (None, Vec::new(), 0);
    while i < args.len() {
        match args[i].as_str() {
            "--port" => port = Some(parse_num(flag_value(args, &mut i, "--port")?, "--port")?),
            "--answer" => {
                let v = flag_value(args, &mut i, "--answer")?;
                let (name, ip) = v
                    .split_once('=')
                    .ok_or_else(|| format!("--answer NAME=IPV4, got {v:?}"))?;
                let ip = ip
                    .parse()
                    .map_err(|_| format!("--answer: {ip:?} is not IPv4"))?;
                answers.push((name.to_ascii_lowercase(), ip));
            }
            other => {
                return Err(format!(
                    "dns-server: unexpected argument {other:?}\n{USAGE}"
                ));
            }
        }
        i += 1;
    }
    Ok((port.ok_or("dns-server needs --port")?, answers))
}

fn dns_server((port, answers): (u16, Vec<(String, std::net::Ipv4Addr)>)) -> ExitCode {
    use simple_dns::{CLASS, Packet, RCODE, ResourceRecord, rdata::RData};
    let socket = match std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)) {
        Ok(s) => s,
        Err(e) => {
            emit(error_event("bind", &e, &format!("bind [::]:{port}")));
            return ExitCode::FAILURE;
        }
    };
    emit(json!({"event": "listening", "port": port}));
    let mut buf = [0u8; 4096];
    loop {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Packet::parse(&buf[..n]) else {
            emit(json!({"event": "query", "from": canonical(from), "malformed": true}));
            continue;
        };
        let Some(q) = query.questions.first() else {
            continue;
        };
        let name = q.qname.to_string().to_ascii_lowercase();
        emit(json!({"event": "query", "from": canonical(from), "name": name}));
        let mut reply = query.clone().into_reply();
        match answers.iter().find(|(n, _)| *n == name) {
            Some((_, ip)) => reply.answers.push(ResourceRecord::new(
                q.qname.clone(),
                CLASS::IN,
                60,
                RData::A(simple_dns::rdata::A {
                    address: u32::from(*ip),
                }),
            )),
            None => *reply.rcode_mut() = RCODE::NameError,
        }
        if let Ok(bytes) = reply.build_bytes_vec() {
            let _ = socket.send_to(&bytes, from);
        }
    }
}

struct DnsQuery {
    server: SocketAddr,
    /// A name to ask for, or raw bytes to send (hex).
    name: Option<String>,
    raw: Option<Vec<u8>>,
    aaaa: bool,
    tcp: bool,
    connected: bool,
    timeout_ms: u64,
}

/// `dns-query SERVER (--name NAME | --raw HEX) [--aaaa] [--tcp] [--connected] [--timeout-ms MS]`:
/// sends one query (UDP with `sendto`, or `connect` + `send` with `--connected`, or TCP) and
/// prints one `answer` event: rcode, addresses, TC, the id, and the address the answer came from.
fn parse_dns_query(args: &[String]) -> Result<DnsQuery, String> {
    let mut q = DnsQuery {
        server: "[::1]:53".parse().map_err(|_| "BUG")?,
        name: None,
        raw: None,
        aaaa: false,
        tcp: false,
        connected: false,
        timeout_ms: 3000,
    };
    let (mut server, mut i) = (None, 0);
    while i < args.len() {
        match args[i].as_str() {
            "--name" => q.name = Some(flag_value(args, &mut i, "--name")?.to_owned()),
            "--raw" => {
                let hex = flag_value(args, &mut i, "--raw")?;
                let bytes: Result<Vec<u8>, _> = (0..hex.len())
                    .step_by(2)
                    .map(|j| u8::from_str_radix(hex.get(j..j + 2).unwrap_or("x"), 16))
                    .collect();
                q.raw = Some(bytes.map_err(|_| format!("--raw: {hex:?} is not hex"))?);
            }
            "--aaaa" => q.aaaa = true,
            "--tcp" => q.tcp = true,
            "--connected" => q.connected = true,
            "--timeout-ms" => {
                q.timeout_ms =
                    parse_num(flag_value(args, &mut i, "--timeout-ms")?, "--timeout-ms")?;
            }
            a if !a.starts_with("--") && server.is_none() => {
                server = Some(a.parse().map_err(|_| format!("{a:?} is not IP:PORT"))?);
            }
            other => return Err(format!("dns-query: unexpected argument {other:?}\n{USAGE}")),
        }
        i += 1;
    }
    q.server = server.ok_or("dns-query needs SERVER")?;
    if q.name.is_none() == q.raw.is_none() {
        return Err("dns-query needs one of --name and --raw".into());
    }
    Ok(q)
}

fn dns_query(q: DnsQuery) -> ExitCode {
    use simple_dns::{CLASS, Packet, PacketFlag, QCLASS, QTYPE, Question, TYPE, rdata::RData};
    let id: u16 = 0x5a5a;
    let message = match (&q.raw, &q.name) {
        (Some(raw), _) => raw.clone(),
        (None, Some(name)) => {
            let mut p = Packet::new_query(id);
            p.set_flags(PacketFlag::RECURSION_DESIRED);
            let Ok(qname) = simple_dns::Name::new(name) else {
                emit(json!({"event": "error", "stage": "query", "message": "bad name"}));
                return ExitCode::FAILURE;
            };
            let t = if q.aaaa { TYPE::AAAA } else { TYPE::A };
            p.questions.push(Question::new(
                qname,
                QTYPE::TYPE(t),
                QCLASS::CLASS(CLASS::IN),
                false,
            ));
            p.build_bytes_vec().unwrap_or_default()
        }
        (None, None) => unreachable!("parse_dns_query requires one"),
    };
    let timeout = Some(Duration::from_millis(q.timeout_ms));
    let exchanged: io::Result<(Vec<u8>, Option<SocketAddr>)> = (|| {
        if q.tcp {
            let mut s = TcpStream::connect_timeout(&q.server, Duration::from_millis(q.timeout_ms))?;
            s.set_read_timeout(timeout)?;
            let mut out = (message.len() as u16).to_be_bytes().to_vec();
            out.extend_from_slice(&message);
            s.write_all(&out)?;
            let mut len = [0u8; 2];
            s.read_exact(&mut len)?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(len))];
            s.read_exact(&mut answer)?;
            return Ok((answer, s.peer_addr().ok()));
        }
        let any: SocketAddr = if q.server.is_ipv4() {
            "0.0.0.0:0".parse().map_err(io::Error::other)?
        } else {
            "[::]:0".parse().map_err(io::Error::other)?
        };
        let s = std::net::UdpSocket::bind(any)?;
        s.set_read_timeout(timeout)?;
        let mut buf = [0u8; 4096];
        if q.connected {
            s.connect(q.server)?;
            s.send(&message)?;
            let n = s.recv(&mut buf)?;
            Ok((buf[..n].to_vec(), s.peer_addr().ok()))
        } else {
            s.send_to(&message, q.server)?;
            let (n, from) = s.recv_from(&mut buf)?;
            Ok((buf[..n].to_vec(), Some(from)))
        }
    })();
    let (answer, from) = match exchanged {
        Ok(a) => a,
        Err(e) => {
            emit(error_event("query", &e, &format!("query {}", q.server)));
            return ExitCode::FAILURE;
        }
    };
    let from = from.map(canonical);
    match Packet::parse(&answer) {
        Ok(p) => {
            let addrs: Vec<String> = p
                .answers
                .iter()
                .filter_map(|rr| match &rr.rdata {
                    RData::A(a) => Some(std::net::Ipv4Addr::from(a.address).to_string()),
                    RData::AAAA(a) => Some(std::net::Ipv6Addr::from(a.address).to_string()),
                    _ => None,
                })
                .collect();
            emit(
                json!({"event": "answer", "id": p.id(), "rcode": p.rcode() as u8,
                        "answers": addrs, "truncated": p.has_flags(PacketFlag::TRUNCATION),
                        "from": from}),
            );
        }
        Err(_) if answer.len() >= 4 => {
            // A header-only reply (FORMERR to a query that does not parse).
            emit(
                json!({"event": "answer", "id": u16::from_be_bytes([answer[0], answer[1]]),
                        "rcode": answer[3] & 0x0f, "answers": [], "truncated": false,
                        "from": from}),
            );
        }
        Err(e) => {
            emit(json!({"event": "error", "stage": "parse", "message": e.to_string()}));
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
