//! The demo a newcomer pokes at: `ambit-demo --keep` runs the scenes (among them locality-aware
//! load balancing), prints the commands to try and keeps the two nodes up; the printed commands
//! work against the live mesh; `--down` stops it and nothing of its cluster is left.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

/// The scenes take about a minute on the 2-core CI machine; this is for a hung demo.
const READY_TIMEOUT: Duration = Duration::from_secs(300);

/// The demo process, stopped (SIGTERM, then SIGKILL) if the test ends early.
struct Demo {
    child: Child,
    dir: PathBuf,
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(60);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn demo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ambit-demo")
}

fn output(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_kept_demo_answers_the_commands_it_prints_and_goes_down_without_leftovers() {
    if !ambit_testbed::privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ambit-demo-keep-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let keep_file = dir.join("keep.json");
    let log = dir.join("out");
    let out = fs::File::create(&log).expect("output file");
    let child = Command::new(demo_bin())
        .arg("--keep")
        .env("AMBIT_DEMO_KEEP_FILE", &keep_file)
        .stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup"))
        .stderr(out)
        .spawn()
        .expect("start ambit-demo --keep");
    let mut demo = Demo {
        child,
        dir: dir.clone(),
    };
    let started = Instant::now();
    while !output(&log).contains("ambit-demo: kept") {
        if let Some(status) = demo.child.try_wait().expect("wait") {
            panic!(
                "the demo ended ({status}) before it was kept:\n{}",
                output(&log)
            );
        }
        assert!(
            started.elapsed() < READY_TIMEOUT,
            "not kept after {READY_TIMEOUT:?}:\n{}",
            output(&log)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let text = output(&log);
    // The scenes ran: service nearby kept each client's connections on its own node.
    for line in [
        "client-a (node-a): 6 connections to nearby -> server-a (node-a) served 6, server-b (node-b) served 0",
        "client-b (node-b): 6 connections to nearby -> server-a (node-a) served 0, server-b (node-b) served 6",
        // The waypoint, configured from the cluster, took the changed route live...
        "client-a: 10 requests after the change -> web-v2 served 10",
        "HTTPRoute default/web status by ambit.dev/waypoint: Accepted=True",
        "Gateway default/waypoint programmed by the waypoint: address waypoint.default.svc.cluster.local",
        // ... and node-a's DNS proxy answered the mesh name itself, the other from the resolver.
        "for web.default.svc.cluster.local: 10.96.0.20 (answer from",
        "for example.test: 192.0.2.7 (answer from",
        "the resolver was asked for: example.test (the mesh name never reached it)",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&keep_file).expect("the keep record"))
            .expect("the record is JSON");
    assert_eq!(record["pid"], demo.child.id(), "{record}");
    let netns: Vec<String> = record["netns"]
        .as_array()
        .expect("netns")
        .iter()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    assert!(!netns.is_empty(), "{record}");

    // The commands as printed, run as a user would paste them.
    let printed: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && (l.contains(" --socket ") || l.starts_with("sh -c")))
        .collect();
    let find = |needle: &str| -> &str {
        printed
            .iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no printed command with {needle:?} in\n{text}"))
    };
    let run = |line: &str| {
        let out = Command::new("sh")
            .args(["-c", line])
            .output()
            .expect("run a printed command");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, status) = run(find(" status"));
    assert_eq!(code, Some(0), "{status}");
    assert!(status.contains("Ready   yes"), "{status}");
    let (code, allowed) = run(find(":8080"));
    assert_eq!(code, Some(0), "{allowed}");
    assert!(allowed.contains("Verdict: ALLOW"), "{allowed}");
    let (code, denied) = run(find(":9090"));
    assert_eq!(code, Some(4), "explain exits 4 on a denial: {denied}");
    assert!(
        denied.contains("denied by policy default/no-9090"),
        "{denied}"
    );
    let (_, hello) = run(find("/hello'"));
    assert!(
        hello.starts_with("web-v"),
        "through the waypoint: {hello:?}"
    );
    let (_, admin) = run(find("/admin'"));
    assert!(admin.contains("RBAC: access denied"), "{admin:?}");

    // Down: the demo tears its cluster down and exits; nothing of it is left.
    let down = Command::new(demo_bin())
        .arg("--down")
        .env("AMBIT_DEMO_KEEP_FILE", &keep_file)
        .output()
        .expect("ambit-demo --down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let status = demo.child.try_wait().expect("wait");
    assert!(
        status.is_some_and(|s| s.success()),
        "the kept demo has exited cleanly: {status:?}\n{}",
        output(&log)
    );
    assert!(!keep_file.exists(), "the record is removed");
    let left: Vec<String> = fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| netns.contains(n))
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}
