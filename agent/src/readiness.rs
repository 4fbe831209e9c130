//! The readiness endpoint (`GET /healthz/ready`, port 15021 by default), for the kubelet's probe
//! and for operators: ready only when the capture programs are attached, the first config has been
//! applied, the control plane's first full state has arrived (when xDS is configured), and every
//! local workload identity has a certificate. A `503` body lists what is missing.
//!
//! Deliberately tiny HTTP/1.1: one request per connection, nothing but the request line is read.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{identity::manager::CertManager, xds::XdsClient};

/// What readiness depends on.
pub struct Readiness {
    /// Programs attached and the first config applied.
    pub started: AtomicBool,
    pub certs: Arc<CertManager>,
    /// Set once the xDS client exists (when xDS is configured).
    pub xds: std::sync::OnceLock<Arc<XdsClient>>,
}

impl Readiness {
    /// `Ok` when ready, else what is missing.
    pub fn check(&self) -> Result<(), Vec<&'static str>> {
        let mut missing = Vec::new();
        if !self.started.load(Ordering::Acquire) {
            missing.push("eBPF capture not attached or first config not applied yet");
        }
        if self.xds.get().is_some_and(|x| !x.is_ready()) {
            missing.push("no full state from the xDS control plane yet");
        }
        if !self.certs.all_ready() {
            missing.push(
                "certificates missing for some local workload identities (is the CA reachable?)",
            );
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(missing)
        }
    }
}

/// Serves readiness on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, readiness: Arc<Readiness>, shutdown: CancellationToken) {
    let listener = match TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            warn!(%addr, error = %e, "cannot serve readiness (is another agent using the port?)");
            return;
        }
    };
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "readiness accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(2), answer(stream, &readiness)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, readiness: &Readiness) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let mut len = 0;
    // Up to the end of the request line is all we need.
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let line = String::from_utf8_lossy(&buf[..len]);
    let path = line.split_whitespace().nth(1).unwrap_or("");
    let (status, body) = if path == "/healthz/ready" {
        match readiness.check() {
            Ok(()) => ("200 OK", "ready\n".to_owned()),
            Err(missing) => (
                "503 Service Unavailable",
                format!("not ready:\n- {}\n", missing.join("\n- ")),
            ),
        }
    } else {
        ("404 Not Found", "try /healthz/ready\n".to_owned())
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}
