//! A client that resets its connection (RST, as sockperf's client does) must not leave the
//! connection to the server app open at the far end: both agents pass the end along, through
//! HBONE (the stream is reset) and in plaintext.

use std::time::Duration;

use ambit_testbed::{MeshSpec, Pod};

const PORT: u16 = 8080;

/// Connects from `pod` to `dst`, sends a little, waits for the echo, then resets (SO_LINGER 0).
fn connect_and_reset(pod: &Pod, dst: std::net::SocketAddr) {
    let script = format!(
        "import socket,struct,time\n\
         s=socket.create_connection(('{}',{}),timeout=5)\n\
         s.sendall(b'x'*100)\n\
         got=b''\n\
         while len(got)<100:\n    got+=s.recv(100)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_LINGER,struct.pack('ii',1,0))\n\
         s.close()\n",
        dst.ip(),
        dst.port()
    );
    let out = pod
        .command("python3")
        .args(["-c", &script])
        .output()
        .expect("run python3 in the pod");
    assert!(
        out.status.success(),
        "client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_client_reset_closes_the_connection_to_the_app_across_the_mesh() {
    if !ambit_testbed::privileged() {
        return;
    }
    let m = MeshSpec::new()
        .node("node-a")
        .pod("client")
        .node("node-b")
        .pod("server")
        .build(env!("CARGO_BIN_EXE_ambit-testpod"))
        .expect("mesh");
    let (client, server) = (&m.pods["client"], &m.pods["server"]);
    let echo = server.serve(PORT).expect("echo");
    let _agent_a = m.bed.start_agent(&m.configs["node-a"]).expect("agent-a");
    let _agent_b = m.bed.start_agent(&m.configs["node-b"]).expect("agent-b");

    connect_and_reset(client, server.v4(PORT));
    // The echo server got its 100 bytes, answered, and then only waits: its connection must be
    // closed by the agent once the client's reset arrives.
    echo.wait_for_event(|v| v["event"] == "closed", Duration::from_secs(10))
        .expect("the app's connection is closed after the client's reset");
}
