//! One HBONE stream over loopback, end to end through the same code the agent runs: the pump on
//! both sides, TLS 1.3 with SPIFFE verification, HTTP/2 with the tunnel's window settings, and a
//! TCP echo "app" behind the server. Measures bulk throughput and a 1 KiB round trip on an open
//! stream, so changes to the data path can be compared (`cargo bench -p ambit-agent`).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use ambit_agent::{
    copy::ByteCounts,
    identity::{Identity, builtin::BuiltinCa},
    tls::{self, CertResolver, TrustRoots},
    tunnel::{self, TcpSide, client, server},
};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt, DuplexStream},
    net::{TcpListener, TcpStream},
    runtime::Runtime,
};

const BULK: usize = 16 * 1024 * 1024;
const SMALL: usize = 1024;

/// A TCP echo server standing in for the destination app.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind echo");
    let addr = l.local_addr().expect("echo addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// An HBONE server: TLS + HTTP/2 + CONNECT -> pump to the echo app.
async fn hbone_server(config: Arc<rustls::ServerConfig>, app: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind hbone");
    let addr = l.local_addr().expect("hbone addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let config = config.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .expect("server TLS");
                let mut conn = server::h2_builder(&server::ServerSettings::default())
                    .handshake::<_, bytes::Bytes>(tls)
                    .await
                    .expect("server h2");
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    tokio::spawn(async move {
                        let upstream = TcpStream::connect(app).await.expect("connect app");
                        let _ = upstream.set_nodelay(true);
                        let ok = http::Response::builder()
                            .status(200)
                            .body(())
                            .expect("resp");
                        let send = respond.send_response(ok, false).expect("send response");
                        let counts = Arc::new(ByteCounts::default());
                        let _ = tunnel::pump(
                            upstream,
                            send,
                            req.into_body(),
                            TcpSide::Destination,
                            counts,
                        )
                        .await;
                    });
                }
            });
        }
    });
    addr
}

/// Sets up the path and returns the app-side end of the client's tunnel.
async fn open_stream() -> DuplexStream {
    let ca = BuiltinCa::generate("cluster.local").expect("CA");
    let client_id: Identity = "spiffe://cluster.local/ns/default/sa/client"
        .parse()
        .expect("id");
    let server_id: Identity = "spiffe://cluster.local/ns/default/sa/server"
        .parse()
        .expect("id");
    let day = Duration::from_secs(86400);
    let client_cert = ca.issue_for_test(&client_id, day).expect("client cert");
    let server_cert = ca.issue_for_test(&server_id, day).expect("server cert");
    let roots = TrustRoots::new(vec![ca.root_cert()]).expect("roots");
    let resolver = Arc::new(CertResolver::new(&server_cert).expect("resolver"));
    let server_config = tls::server_config(resolver, &roots, "cluster.local").expect("server tls");
    let client_config =
        tls::client_config(&client_cert, &roots, vec![server_id]).expect("client tls");

    let app = echo_app().await;
    let addr = hbone_server(server_config, app).await;
    let tcp = TcpStream::connect(addr).await.expect("connect hbone");
    tcp.set_nodelay(true).expect("nodelay");
    let (sender, conn) = client::handshake(tcp, client_config, addr, Duration::from_secs(10))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let headers = client::TunnelHeaders {
        client_ip: addr.ip(),
        traceparent: None,
        baggage: None,
        service_host: None,
    };
    let (send, recv) = client::request(sender, addr, app, &headers)
        .await
        .expect("CONNECT");
    let (app_side, pump_side) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        let counts = Arc::new(ByteCounts::default());
        let _ = tunnel::pump(pump_side, send, recv, TcpSide::Source, counts).await;
    });
    app_side
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let stream = rt.block_on(open_stream());
    let (mut r, mut w) = tokio::io::split(stream);

    let mut group = c.benchmark_group("hbone_loopback");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.sample_size(10);
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sink = vec![0u8; 64 * 1024];
    group.bench_function("bulk_16MiB_echoed", |b| {
        b.iter(|| {
            rt.block_on(async {
                let writer = async {
                    for _ in 0..BULK / chunk.len() {
                        w.write_all(&chunk).await.expect("write");
                    }
                };
                let reader = async {
                    let mut got = 0;
                    while got < BULK {
                        got += r.read(&mut sink).await.expect("read");
                    }
                };
                tokio::join!(writer, reader);
            })
        })
    });
    group.finish();

    let mut group = c.benchmark_group("hbone_loopback");
    group.throughput(Throughput::Bytes(SMALL as u64));
    let ping = vec![1u8; SMALL];
    let mut pong = vec![0u8; SMALL];
    group.bench_function("round_trip_1KiB", |b| {
        b.iter(|| {
            rt.block_on(async {
                w.write_all(&ping).await.expect("write");
                r.read_exact(&mut pong).await.expect("read");
            })
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
