//! `ambit-bench --quick` as a smoke test: the benchmark harness brings up its bed, drives every
//! load tool through every path, and reports figures that make sense. It checks that the harness
//! works, never a timing threshold: the binaries here are debug builds, and the machine is shared
//! with the rest of the suite.

use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::Value;

/// `--quick` takes about two minutes on the 2-core CI machine; this is for a hung harness.
const TIMEOUT: Duration = Duration::from_secs(420);

const PATHS: [&str; 4] = [
    "direct-same-node",
    "same-node",
    "direct-cross-node",
    "cross-node",
];

fn median(figure: &Value, path: &str) -> f64 {
    figure["paths"][path]["median"].as_f64().unwrap_or_else(|| {
        panic!(
            "figure {} has no median on the {path} path: {figure}",
            figure["id"]
        )
    })
}

#[test]
fn bench_quick_measures_every_path_and_reports_sane_figures() {
    if !ambit_testbed::privileged() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ambit-bench-smoke-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("temp dir");
    let out = dir.join("report.json");
    let stdout_path = dir.join("stdout");
    let stderr_path = dir.join("stderr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ambit-bench"))
        .args(["--quick", "--out"])
        .arg(&out)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&stdout_path).expect("stdout file"))
        .stderr(fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("start ambit-bench");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for ambit-bench") {
            break Some(status);
        }
        if started.elapsed() > TIMEOUT {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let status = status.unwrap_or_else(|| {
        // SIGTERM lets it kill its tools and remove its bed; then make sure it is gone.
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let _ = nix::sys::signal::kill(pid, Signal::SIGTERM);
        std::thread::sleep(Duration::from_secs(20));
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "ambit-bench --quick did not finish within {TIMEOUT:?}; its stderr:\n{}",
            fs::read_to_string(&stderr_path).unwrap_or_default()
        )
    });
    let stdout = fs::read_to_string(&stdout_path).unwrap_or_default();
    let stderr = fs::read_to_string(&stderr_path).unwrap_or_default();
    assert!(
        status.success(),
        "ambit-bench --quick failed ({status}):\n--- stderr ---\n{stderr}\n--- stdout ---\n{stdout}"
    );
    eprintln!("ambit-bench --quick took {:?}", started.elapsed());
    assert!(
        stdout.contains("| figure |"),
        "no table on stdout:\n{stdout}"
    );
    assert!(stdout.contains("cross-node"), "{stdout}");

    let report: Value =
        serde_json::from_str(&fs::read_to_string(&out).expect("read the JSON report"))
            .expect("the JSON report parses");
    assert_eq!(report["mode"], "quick");
    assert_eq!(report["failed_runs"], 0, "{stderr}");
    // The chart beside it has a bar for the cross-node path of the first figure.
    let chart = fs::read_to_string(out.with_extension("svg")).expect("read the SVG chart");
    assert!(
        chart.starts_with("<svg ") && chart.ends_with("</svg>\n"),
        "{chart}"
    );
    assert!(chart.contains("<title>cross-node: "), "{chart}");
    for section in [
        "environment",
        "settings",
        "paths",
        "figures",
        "agents",
        "scale",
        "targets",
        "runs",
    ] {
        assert!(!report[section].is_null(), "no {section} in the report");
    }
    let env = &report["environment"];
    assert!(env["kernel"].as_str().is_some_and(|k| !k.is_empty()));
    assert!(env["cpus"].as_u64().is_some_and(|n| n > 0));
    for tool in ["iperf3", "sockperf", "nginx", "wrk", "hey"] {
        assert!(
            env["tools"][tool]["version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "no version for {tool}: {}",
            env["tools"]
        );
    }

    let figures = report["figures"].as_array().expect("figures");
    let by_prefix = |prefix: &str| -> Vec<&Value> {
        figures
            .iter()
            .filter(|f| f["id"].as_str().is_some_and(|id| id.starts_with(prefix)))
            .collect()
    };
    // Throughput, latency and request rates are positive on every path, and the mesh paths have
    // a ratio to their direct path.
    let throughput = by_prefix("throughput.");
    assert_eq!(throughput.len(), 4, "1 and 4 streams, both directions");
    let latency = by_prefix("latency.");
    assert_eq!(latency.len(), 4, "p50, p90, p99, p99.9");
    let http = by_prefix("http.");
    assert_eq!(http.len(), 6, "wrk and hey: rate, p50, p99");
    for figure in throughput.iter().chain(&latency).chain(&http) {
        for path in PATHS {
            let m = median(figure, path);
            assert!(m > 0.0 && m.is_finite(), "{} on {path}: {m}", figure["id"]);
        }
        for path in ["same-node", "cross-node"] {
            let ratio = figure["paths"][path]["ratio_to_direct"].as_f64();
            assert!(
                ratio.is_some_and(|r| r > 0.0),
                "{} on {path}: ratio {ratio:?}",
                figure["id"]
            );
        }
    }
    // The waypoint path carries the HTTP scenarios, compared with the direct cross-node path.
    for figure in &http {
        let m = median(figure, "waypoint");
        assert!(
            m > 0.0 && m.is_finite(),
            "{} on waypoint: {m}",
            figure["id"]
        );
        assert!(
            figure["paths"]["waypoint"]["ratio_to_direct"]
                .as_f64()
                .is_some_and(|r| r > 0.0),
            "{figure}"
        );
    }
    for figure in &latency {
        assert!(
            figure["paths"]["cross-node"]["added_over_direct"].is_number(),
            "{figure}"
        );
    }
    // The agents did the work of the mesh paths.
    let cpu = by_prefix("agent.cpu_seconds_per_gb");
    assert_eq!(cpu.len(), 1);
    for path in ["same-node", "cross-node"] {
        assert!(median(cpu[0], path) > 0.0, "{}", cpu[0]);
    }

    let agents = report["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 2, "{agents:?}");
    for agent in agents {
        let idle = agent["idle_rss_bytes"]["median"]
            .as_f64()
            .expect("idle RSS");
        let peak = agent["peak_rss_bytes"].as_f64().expect("peak RSS");
        assert!(idle > 0.0 && peak >= idle, "{agent}");
        let anon = agent["idle_anon_bytes"]["median"]
            .as_f64()
            .expect("idle anonymous RSS");
        assert!(anon > 0.0 && anon < idle, "{agent}");
    }

    let steps = report["scale"]["steps"].as_array().expect("scale steps");
    let workloads: Vec<u64> = steps
        .iter()
        .filter_map(|s| s["workloads"].as_u64())
        .collect();
    assert_eq!(workloads, [1000, 10_000]);
    for step in steps {
        assert!(
            step["push_apply_ms"]["median"]
                .as_f64()
                .is_some_and(|ms| ms > 0.0),
            "{step}"
        );
        assert!(
            step["rss_after_bytes"]["median"]
                .as_f64()
                .is_some_and(|b| b > 0.0),
            "{step}"
        );
    }
    assert_eq!(
        report["scale"]["skipped"][0]["workloads"], 100_000,
        "--quick says it skipped the 100k step"
    );

    let targets = report["targets"].as_array().expect("targets");
    assert!(targets.len() >= 10, "{targets:?}");
    assert!(
        targets.iter().all(|t| t["pass"].is_boolean()),
        "{targets:?}"
    );

    // Nothing of the bed is left: its namespaces are gone.
    let leftovers: Vec<String> = fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("ab-{:x}-", child.id())))
                .collect()
        })
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "namespaces left: {leftovers:?}");
    let _ = fs::remove_dir_all(&dir);
}
