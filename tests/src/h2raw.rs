//! A deliberately ill-behaved HBONE client for the limit tests: mutual TLS with a mesh identity
//! issued by the bed's CA, then HTTP/2 frames written by hand (a real client library would obey
//! the server's limits, which is the point of not using one): many `CONNECT` streams at once,
//! streams reset as soon as they are opened, header blocks past the server's limit, or a TLS
//! handshake that never finishes. Frames from the server are read back by type, not decoded.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use rustls::{
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, StreamOwned,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime},
};

pub const DATA: u8 = 0;
pub const HEADERS: u8 = 1;
pub const RST_STREAM: u8 = 3;
pub const SETTINGS: u8 = 4;
pub const PING: u8 = 6;
pub const GOAWAY: u8 = 7;
pub const WINDOW_UPDATE: u8 = 8;
pub const CONTINUATION: u8 = 9;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
/// `REFUSED_STREAM`, `CANCEL`, `ENHANCE_YOUR_CALM`.
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// A frame from the server.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a `RST_STREAM` or `GOAWAY`.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A TCP connection to `addr` opened from inside the network namespace at `netns` (the socket
/// keeps that netns for life, whatever thread uses it).
pub fn tcp_in(netns: &Path, addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let netns = netns.to_owned();
    std::thread::spawn(move || -> Result<TcpStream> {
        let f = std::fs::File::open(&netns).with_context(|| format!("open {}", netns.display()))?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
        TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connect {addr}"))
    })
    .join()
    .map_err(|_| anyhow!("the connecting thread panicked"))?
}

/// A workload certificate for `identity` (a SPIFFE id) signed by the built-in CA in `ca_dir`.
pub fn issue(
    ca_dir: &Path,
    identity: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ca_pem = std::fs::read_to_string(ca_dir.join("ca-cert.pem")).context("CA cert")?;
    let ca_key = rcgen::KeyPair::from_pem(
        &std::fs::read_to_string(ca_dir.join("ca-key.pem")).context("CA key")?,
    )
    .context("CA key")?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).context("CA")?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("key")?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        identity.try_into().context("identity as a URI")?,
    )];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = params.signed_by(&key, &issuer).context("sign")?;
    let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).context("CA PEM")?;
    Ok((
        vec![cert.der().clone(), ca_der],
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    ))
}

use rustls::pki_types::pem::PemObject as _;

/// Accepts whatever certificate the server shows: these tests attack the server, they do not
/// check it.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// An HTTP/2 connection over mutual TLS, driven frame by frame.
pub struct RawH2 {
    tls: StreamOwned<ClientConnection, TcpStream>,
    out: Vec<u8>,
    inbox: Vec<u8>,
}

impl RawH2 {
    /// TLS (ALPN h2) as `identity` over `tcp`, then the client preface and empty SETTINGS.
    pub fn handshake(
        tcp: TcpStream,
        ca_dir: &Path,
        identity: &str,
        timeout: Duration,
    ) -> Result<RawH2> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let (chain, key) = issue(ca_dir, identity)?;
        let mut config = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let peer = tcp.peer_addr()?;
        tcp.set_read_timeout(Some(timeout))?;
        tcp.set_write_timeout(Some(timeout))?;
        let conn = ClientConnection::new(Arc::new(config), ServerName::from(peer.ip()))?;
        let mut tls = StreamOwned::new(conn, tcp);
        while tls.conn.is_handshaking() {
            tls.conn
                .complete_io(&mut tls.sock)
                .context("TLS handshake")?;
        }
        let mut h2 = RawH2 {
            tls,
            out: Vec::new(),
            inbox: Vec::new(),
        };
        h2.out
            .extend_from_slice(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        h2.frame(SETTINGS, 0, 0, &[]);
        // A large connection window, so the server's answers are never held back.
        h2.frame(WINDOW_UPDATE, 0, 0, &(1u32 << 30).to_be_bytes());
        h2.flush()?;
        Ok(h2)
    }

    fn frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let len = payload.len() as u32;
        self.out.extend_from_slice(&len.to_be_bytes()[1..]);
        self.out.push(kind);
        self.out.push(flags);
        self.out
            .extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
        self.out.extend_from_slice(payload);
    }

    /// Queues a `CONNECT` for `authority` on stream `id` (odd, increasing), with an extra header
    /// of `padding` bytes (0: none): one HEADERS frame, and CONTINUATION frames for a block past
    /// 16 KiB.
    pub fn connect(&mut self, id: u32, authority: &str, padding: usize) {
        let mut block = Vec::new();
        // `:method` (static index 2) and `:authority` (index 1), literals without indexing.
        block.push(0x02);
        hpack_string(&mut block, b"CONNECT");
        block.push(0x01);
        hpack_string(&mut block, authority.as_bytes());
        if padding > 0 {
            block.push(0x00);
            hpack_string(&mut block, b"x-padding");
            hpack_string(&mut block, &vec![b'a'; padding]);
        }
        let mut chunks = block.chunks(16 * 1024).peekable();
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let last = chunks.peek().is_none();
            let flags = if last { END_HEADERS } else { 0 };
            let kind = if first { HEADERS } else { CONTINUATION };
            self.frame(kind, flags, id, chunk);
            first = false;
        }
    }

    /// Queues a `RST_STREAM` with `code` on stream `id`.
    pub fn reset(&mut self, id: u32, code: u32) {
        self.frame(RST_STREAM, 0, id, &code.to_be_bytes());
    }

    /// Sends what is queued.
    pub fn flush(&mut self) -> Result<()> {
        let out = std::mem::take(&mut self.out);
        self.tls.write_all(&out).context("send")?;
        self.tls.flush().context("send")
    }

    /// Reads the server's frames for up to `for_at_most`, or until it closes the connection (or
    /// `done` says enough), answering SETTINGS and PINGs as a client must. `Ok` either way with
    /// what arrived; the bool says whether the server closed the connection.
    pub fn read_frames(
        &mut self,
        for_at_most: Duration,
        mut done: impl FnMut(&[Frame]) -> bool,
    ) -> Result<(Vec<Frame>, bool)> {
        let deadline = Instant::now() + for_at_most;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(f) = self.next_frame() {
                match (f.kind, f.flags & ACK) {
                    (SETTINGS, 0) => self.frame(SETTINGS, ACK, 0, &[]),
                    (PING, 0) => {
                        let payload = f.payload.clone();
                        self.frame(PING, ACK, 0, &payload);
                    }
                    _ => {}
                }
                frames.push(f);
            }
            if !self.out.is_empty() {
                // The server may already be gone; what it sent is what counts.
                let _ = self.flush();
            }
            if done(&frames) || Instant::now() >= deadline {
                return Ok((frames, false));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            self.tls
                .sock
                .set_read_timeout(Some(left.max(Duration::from_millis(10))))?;
            match self.tls.read(&mut buf) {
                Ok(0) => return Ok((frames, true)),
                Ok(n) => self.inbox.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return Ok((frames, true));
                }
                Err(e) => bail!("read: {e}"),
            }
        }
    }

    fn next_frame(&mut self) -> Option<Frame> {
        if self.inbox.len() < 9 {
            return None;
        }
        let len = u32::from_be_bytes([0, self.inbox[0], self.inbox[1], self.inbox[2]]) as usize;
        if self.inbox.len() < 9 + len {
            return None;
        }
        let h: Vec<u8> = self.inbox.drain(..9 + len).collect();
        Some(Frame {
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
            payload: h[9..].to_vec(),
        })
    }
}

/// An HPACK string literal (no Huffman), with its length as an HPACK integer (7-bit prefix).
fn hpack_string(out: &mut Vec<u8>, s: &[u8]) {
    let mut n = s.len();
    if n < 127 {
        out.push(n as u8);
    } else {
        out.push(127);
        n -= 127;
        while n >= 128 {
            out.push((n % 128 + 128) as u8);
            n /= 128;
        }
        out.push(n as u8);
    }
    out.extend_from_slice(s);
}
