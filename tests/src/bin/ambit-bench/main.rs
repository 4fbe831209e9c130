//! `ambit-bench`: Ambit against the direct path on the network-namespace test bed, with real,
//! Debian-packaged load tools (what `cargo xtask bench` runs once the release binaries are built).
//!
//! Paths between the same pods: `direct` (no agent: measured between the same-node pods and
//! between the cross-node pods, each mesh path's reference), `same-node` (through the node's
//! agent, spliced in the kernel), `same-node-user-space` (the same with the splice off) and
//! `cross-node` (through both agents and HBONE mTLS). iperf3 (1 and 4 streams, both
//! directions), sockperf TCP ping-pong with 1 KiB messages, nginx loaded by wrk (kept
//! connections) and hey (a new connection per request); agent CPU and memory from /proc; and one
//! agent fed 1k/10k/100k synthetic workloads by a test xDS server. Every figure is the median of
//! the runs, with min and max and the ratio to direct; the targets get a pass/miss mark
//! (a miss is reported, not a failure). Output: a Markdown table on stdout, JSON to `--out` and
//! beside it an SVG chart of every figure as a ratio to direct (`--chart-from FILE.json` draws it
//! again for an earlier report).
//!
//! Load goes only to pods of the bed; every process and namespace it made is removed at the end,
//! on error and on Ctrl-C.

mod chart;
mod os;
mod procfs;
mod report;
mod scale;
mod tools;
mod traffic;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use ambit_testbed::TestBed;
use anyhow::{Context, Result, bail};
use clap::Parser;
use serde_json::{Value, json};

use crate::tools::ToolInfo;

#[derive(Parser)]
#[command(
    name = "ambit-bench",
    about = "Ambit against the direct path on network namespaces, with iperf3, sockperf, wrk, hey and nginx"
)]
struct Cli {
    /// Every scenario once, briefly (2 s); the 100,000-workload scale step is skipped.
    #[arg(long)]
    quick: bool,
    /// The JSON report (default: target/bench/latest.json, beside this binary's profile dir).
    #[arg(long, value_name = "FILE.json")]
    out: Option<PathBuf>,
    /// Runs of every scenario and scale step (default 3; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Seconds per load run (default 10; 2 with --quick).
    #[arg(long)]
    seconds: Option<u64>,
    /// Concurrent connections of wrk and hey.
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Scale steps, in workloads (default 1000,10000,100000; 1000,10000 with --quick).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    scale: Option<Vec<usize>>,
    /// Skip the traffic part (only the scale steps).
    #[arg(long)]
    no_traffic: bool,
    /// Skip the scale steps (only the traffic part).
    #[arg(long)]
    no_scale: bool,
    /// Do not install missing load tools with apt-get; fail instead.
    #[arg(long)]
    no_install: bool,
    /// Keep the bed's temp dir (agent configs and logs, tool files) after the run.
    #[arg(long)]
    keep_logs: bool,
    /// Run nothing: draw the chart of an earlier report (FILE.json) to FILE.svg.
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["quick", "out", "no_traffic", "no_scale"])]
    chart_from: Option<PathBuf>,
}

pub fn header(title: &str) {
    eprintln!("\n==> {title}");
}

pub fn step(message: &str) {
    eprintln!("    {message}");
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const FULL_SCALE_STEPS: [usize; 3] = [1_000, 10_000, 100_000];
const QUICK_SKIPPED_STEP: usize = 100_000;

fn run(cli: &Cli) -> Result<ExitCode> {
    if let Some(json) = &cli.chart_from {
        let text = std::fs::read_to_string(json)
            .with_context(|| format!("cannot read {}", json.display()))?;
        let report: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a JSON report of ambit-bench", json.display()))?;
        if report["schema"] != "ambit-bench/1" {
            bail!(
                "{} is not an ambit-bench/1 report (its schema is {})",
                json.display(),
                report["schema"]
            );
        }
        println!("Chart: {}", write_chart(json, &report)?.display());
        return Ok(ExitCode::SUCCESS);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmark needs root for network namespaces, cgroups and eBPF; run it as root");
    }
    let started = Instant::now();
    let loadavg_at_start = loadavg();
    let started_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let runs = cli.runs.unwrap_or(if cli.quick { 1 } else { 3 }).max(1);
    let seconds = cli.seconds.unwrap_or(if cli.quick { 2 } else { 10 }).max(1);
    let mut scale_skipped = Vec::new();
    let scale_steps = match &cli.scale {
        _ if cli.no_scale => Vec::new(),
        Some(steps) => steps.clone(),
        None if cli.quick => {
            scale_skipped.push((
                QUICK_SKIPPED_STEP,
                "--quick (run without it for the 100k step)".to_owned(),
            ));
            FULL_SCALE_STEPS
                .into_iter()
                .filter(|&n| n != QUICK_SKIPPED_STEP)
                .collect()
        }
        None => FULL_SCALE_STEPS.to_vec(),
    };
    let out = match &cli.out {
        Some(path) => path.clone(),
        None => default_out()?,
    };
    os::install_stop_handler()?;

    header("bench: load tools");
    let tools = tools::ensure(!cli.no_install)?;
    for (name, t) in &tools {
        step(&format!(
            "{name:<9} {} ({} {})",
            t.path.display(),
            t.package,
            t.version
        ));
    }
    let agent_bin = ambit_testbed::agent_bin()?;
    step(&format!("agent     {}", agent_bin.display()));
    let cleaned = ambit_testbed::cleanup_stale();
    if !cleaned.is_empty() {
        step(&format!(
            "removed leftovers of crashed test beds: {cleaned:?}"
        ));
    }

    let settings = traffic::Settings::new(runs, seconds, cli.connections);
    // The bed lives inside this block, so it is torn down (processes, namespaces, cgroups,
    // pins) before anything is reported, also on error and on Ctrl-C.
    let (traffic, scale) = {
        let bed = TestBed::new()?;
        bed.set_agent_bin(&agent_bin);
        bed.set_keep_tmp(cli.keep_logs);
        let runner = tools::Runner::new(&bed)?;
        let traffic = if cli.no_traffic {
            None
        } else {
            Some(traffic::run(&bed, &runner, &settings)?)
        };
        let scale = scale::run(&bed, &scale_steps, runs)?;
        header("bench: tearing the test bed down");
        (traffic, scale)
    };
    os::check_stop()?;

    let mut environment = environment(&tools, &agent_bin);
    // Other work on the machine skews every figure: the load averages say whether there was any.
    environment["loadavg_at_start"] = json!(loadavg_at_start);
    environment["loadavg_at_end"] = json!(loadavg());
    let mode = if cli.quick { "quick" } else { "full" };
    let header_lines = vec![
        format!(
            "Ambit bench, {mode} run of {} UTC: {runs} run(s) of {seconds} s per figure (median, (min–max) when several); \
             kernel {}, {} CPUs ({}); agent build: {}",
            utc_date(started_at),
            environment["kernel"].as_str().unwrap_or("?"),
            environment["cpus"],
            environment["cpu_model"].as_str().unwrap_or("?"),
            environment["agent_profile"].as_str().unwrap_or("?"),
        ),
        format!(
            "Load average (1 min) at start {}, at end {} (other work on the machine skews the figures).",
            loadavg_at_start
                .first()
                .map_or("?".into(), |l| format!("{l:.2}")),
            environment["loadavg_at_end"][0]
                .as_f64()
                .map_or("?".into(), |l| format!("{l:.2}")),
        ),
        format!(
            "Tools (Debian): {}. New connections per request: hey -disable-keepalive; kept connections: wrk; \
             {} connections each, nginx 1 worker serving 1 KiB; sockperf client and server pinned to \
             different CPUs, as on two hosts.",
            tools
                .iter()
                .map(|(n, t)| format!("{n} {}", t.version))
                .collect::<Vec<_>>()
                .join(", "),
            cli.connections
        ),
    ];
    let report = report::build(&report::Inputs {
        header: header_lines,
        traffic: traffic.as_ref(),
        scale: &scale,
        scale_skipped: &scale_skipped,
    });

    let failed_runs: Vec<&traffic::Run> = traffic
        .as_ref()
        .map(|t| t.runs.iter().filter(|r| r.error.is_some()).collect())
        .unwrap_or_default();
    let failed_scale: usize = scale.iter().map(|s| s.errors.len()).sum();
    let paths: serde_json::Map<String, Value> = traffic::PathId::ALL
        .iter()
        .map(|p| {
            (
                p.key().to_owned(),
                json!({"description": p.description(), "direct_reference": p.reference().map(|r| r.key())}),
            )
        })
        .collect();
    let mut json = json!({
        "schema": "ambit-bench/1",
        "mode": mode,
        "started_unix": started_at,
        "started_utc": utc_date(started_at),
        "duration_seconds": started.elapsed().as_secs_f64(),
        "environment": environment,
        "settings": {
            "runs": runs,
            "seconds": seconds,
            "traffic": settings,
            "scale_steps": scale_steps,
            "quick": cli.quick,
        },
        "paths": paths,
        "failed_runs": failed_runs.len() + failed_scale,
    });
    if let (Value::Object(all), Value::Object(rest)) = (&mut json, report.json) {
        all.extend(rest);
    }
    write_json(&out, &json)?;
    let chart = write_chart(&out, &json)?;

    println!("{}", report.table);
    println!("JSON report: {}", out.display());
    println!("Chart: {}", chart.display());
    let missed = report.checks.iter().filter(|c| !c.pass).count();
    eprintln!(
        "\nbench finished in {:.0} s; {} of {} targets met (misses are reported, not failures)",
        started.elapsed().as_secs_f64(),
        report.checks.len() - missed,
        report.checks.len()
    );
    if !failed_runs.is_empty() || failed_scale > 0 {
        eprintln!(
            "error: {} run(s) failed (see \"error\" in the JSON runs and scale steps):",
            failed_runs.len() + failed_scale
        );
        for r in &failed_runs {
            eprintln!(
                "  {} {} round {}: {}",
                r.path,
                r.scenario,
                r.round + 1,
                r.error.as_deref().unwrap_or("")
            );
        }
        for s in &scale {
            for e in &s.errors {
                eprintln!("  scale {} workloads: {e}", s.workloads);
            }
        }
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// `target/bench/latest.json`: this binary lives in `target/<profile>/`.
fn default_out() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let target = exe
        .parent()
        .and_then(Path::parent)
        .context("cannot find the target dir above this program")?;
    Ok(target.join("bench").join("latest.json"))
}

/// The chart of `report` beside its JSON at `json_path` (the same name, `.svg`).
fn write_chart(json_path: &Path, report: &Value) -> Result<PathBuf> {
    let path = json_path.with_extension("svg");
    std::fs::write(&path, chart::svg(report))
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(value).context("BUG: report does not serialize")?;
    std::fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

fn environment(tools: &BTreeMap<&'static str, ToolInfo>, agent_bin: &Path) -> Value {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpu_model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            let (key, value) = l.split_once(':')?;
            (key.trim() == "model name").then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let os = read("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_owned())
        .unwrap_or_else(|| "unknown".into());
    // target/<profile>/ambit-agent
    let profile = agent_bin
        .parent()
        .and_then(Path::file_name)
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    json!({
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "os": os,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu_model": cpu_model,
        "memory_kib": read("/proc/meminfo").lines().find_map(|l| l.strip_prefix("MemTotal:")?.split_whitespace().next()?.parse::<u64>().ok()),
        "tools": tools,
        "new_connection_generator": "hey -disable-keepalive (Debian package hey)",
        "agent_binary": agent_bin,
        "agent_profile": profile,
    })
}

/// `/proc/loadavg`'s 1, 5 and 15 minute load averages.
fn loadavg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|v| v.parse().ok())
        .collect()
}

/// `YYYY-MM-DD HH:MM` for a Unix time (days to civil date, proleptic Gregorian).
fn utc_date(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00");
        assert_eq!(utc_date(951_782_400), "2000-02-29 00:00");
        assert_eq!(utc_date(1_700_000_000), "2023-11-14 22:13");
    }
}
