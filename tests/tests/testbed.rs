//! Smoke test of the test bed itself (no agent): two nodes with two pods each, echo traffic
//! within a node and across nodes over IPv4 and IPv6, and a clean teardown.

use std::{net::SocketAddr, os::unix::fs::MetadataExt, path::PathBuf, time::Duration};

use ambit_testbed::TestBed;

const PORT: u16 = 8080;

fn netns_list() -> String {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run `ip netns list`");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn pods_talk_within_and_across_nodes_and_teardown_is_clean() {
    if !ambit_testbed::privileged() {
        return;
    }
    let bed = TestBed::with_testpod_bin(env!("CARGO_BIN_EXE_ambit-testpod")).expect("create bed");
    let node_a = bed.add_node("node-a").expect("add node-a");
    let node_b = bed.add_node("node-b").expect("add node-b");
    let server = bed.add_pod(&node_a, "server").expect("add server");
    let neighbour = bed.add_pod(&node_a, "neighbour").expect("add neighbour");
    let remote = bed.add_pod(&node_b, "remote").expect("add remote");
    let _idle = bed.add_pod(&node_b, "idle").expect("add idle");

    assert_eq!(server.ipv4().to_string(), "10.1.0.2");
    assert_eq!(neighbour.ipv6().to_string(), "fd00:1::3");
    assert_eq!(remote.ipv4().to_string(), "10.2.0.2");
    assert_eq!(
        node_b.cgroup_rel(),
        format!("/ambit-test-{}/node-b", bed.id())
    );

    let echo = server.serve(PORT).expect("start echo server");

    // The server runs in the pod's cgroup and network namespace.
    let pid = echo.process().pid();
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read cgroup");
    let expected = format!("0::{}/server", node_a.cgroup_rel());
    assert!(
        cgroup.lines().any(|l| l == expected),
        "{cgroup:?} lacks {expected:?}"
    );
    let netns_of = |path: &str| {
        std::fs::metadata(path)
            .map(|m| (m.dev(), m.ino()))
            .expect(path)
    };
    assert_eq!(
        netns_of(&format!("/proc/{pid}/ns/net")),
        netns_of(&server.netns_path().to_string_lossy())
    );
    let cases: [(&ambit_testbed::Pod, SocketAddr, usize); 4] = [
        (&neighbour, server.v4(PORT), 1000),
        (&neighbour, server.v6(PORT), 70_000),
        (&remote, server.v4(PORT), 300_000),
        (&remote, server.v6(PORT), 1),
    ];
    for (i, (client, dst, bytes)) in cases.iter().enumerate() {
        let report = client.connect(*dst, *bytes).expect("run client");
        assert!(report.ok, "{} -> {dst}: {report:#?}", client.name());
        assert_eq!(report.sent, *bytes as u64);
        assert_eq!(report.received, *bytes as u64);
        assert_eq!(report.peer, Some(*dst), "client sees the address it dialed");
        let local = report.local.expect("client local address");
        let expected_ip = if dst.is_ipv4() {
            client.ipv4().into()
        } else {
            std::net::IpAddr::from(client.ipv6())
        };
        assert_eq!(
            local.ip(),
            expected_ip,
            "client's source address is its pod IP"
        );
        let peers = echo
            .wait_for_accepts(i + 1, Duration::from_secs(5))
            .expect("server accepted");
        assert_eq!(
            peers[i], local,
            "server sees the client pod's address and port"
        );
    }
    echo.wait_for_event(
        |v| v["event"] == "closed" && v["bytes"] == 1,
        Duration::from_secs(5),
    )
    .expect("last connection closed cleanly");

    // Nothing listens on 9: refused, reported as such.
    let refused = remote.connect(server.v4(9), 10).expect("run client");
    assert!(!refused.ok);
    assert_eq!(
        refused.error_kind.as_deref(),
        Some("ConnectionRefused"),
        "{refused:#?}"
    );

    let prefix = format!("ab-{}-", bed.id());
    assert!(netns_list().contains(&prefix));
    let cgroup_root: PathBuf = bed.cgroup_root().to_owned();
    assert!(server.cgroup_dir().is_dir());
    let tmp = bed.tmp_dir().to_owned();
    // Stand in for the agent's pins: the bed removes its bpffs directory.
    std::fs::create_dir_all(node_a.bpf_pin_path()).expect("mkdir on bpffs");
    let bpf_root = bed.bpf_root().to_owned();
    drop(echo);
    drop(bed);

    let left: Vec<String> = netns_list()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "netns left after drop: {left:?}");
    assert!(
        !cgroup_root.exists(),
        "cgroup {} left after drop",
        cgroup_root.display()
    );
    assert!(!tmp.exists(), "temp dir {} left after drop", tmp.display());
    assert!(
        !bpf_root.exists(),
        "bpffs dir {} left after drop",
        bpf_root.display()
    );
}
