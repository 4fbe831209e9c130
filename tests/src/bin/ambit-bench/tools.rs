//! The load tools: which Debian packages bring them, installing what is missing, their versions,
//! running one in a pod with a deadline, and reading what each one prints.

use std::{
    collections::BTreeMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use ambit_testbed::{Pod, Process, TestBed};
use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;
use serde_json::Value;

use crate::{os, step};

/// A tool the harness runs, and the Debian package that brings it.
pub struct Tool {
    pub binary: &'static str,
    pub package: &'static str,
    pub role: &'static str,
}

pub const TOOLS: &[Tool] = &[
    Tool {
        binary: "iperf3",
        package: "iperf3",
        role: "bulk throughput",
    },
    Tool {
        binary: "sockperf",
        package: "sockperf",
        role: "round-trip latency (TCP ping-pong)",
    },
    Tool {
        binary: "nginx",
        package: "nginx",
        role: "HTTP server",
    },
    Tool {
        binary: "wrk",
        package: "wrk",
        role: "HTTP load, kept connections",
    },
    Tool {
        binary: "hey",
        package: "hey",
        role: "HTTP load, a new connection per request (-disable-keepalive)",
    },
];

/// Where a tool was found and which package version it is.
#[derive(Debug, Clone, Serialize)]
pub struct ToolInfo {
    pub path: PathBuf,
    pub package: String,
    pub version: String,
    pub role: &'static str,
}

/// Looks `binary` up on PATH (and the sbin directories, which a non-login root shell may lack).
fn find_binary(binary: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
}

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The Debian package owning `path` and its version, if it comes from one.
fn package_version(path: &Path, package: &str) -> (String, String) {
    let owner = path
        .to_str()
        .and_then(|p| output("dpkg", &["-S", p]))
        .and_then(|line| line.split(':').next().map(str::to_owned))
        .unwrap_or_else(|| package.to_owned());
    let version = output("dpkg-query", &["-W", "-f=${Version}", &owner])
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown (not from a Debian package)".to_owned());
    (owner, version)
}

/// Finds every tool; installs the missing ones with apt-get when `install` is set.
pub fn ensure(install: bool) -> Result<BTreeMap<&'static str, ToolInfo>> {
    let missing: Vec<&Tool> = TOOLS
        .iter()
        .filter(|t| find_binary(t.binary).is_none())
        .collect();
    if !missing.is_empty() {
        let packages: Vec<&str> = missing.iter().map(|t| t.package).collect();
        let list = packages.join(" ");
        if !install {
            bail!(
                "missing load tools: {list}; install them with `apt-get install -y {list}` (or \
                 `cargo xtask setup`), or run without --no-install"
            );
        }
        step(&format!(
            "installing the missing load tools: apt-get install -y {list}"
        ));
        run_apt(&["update"])?;
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&packages);
        run_apt(&args)?;
    }
    let mut found = BTreeMap::new();
    for tool in TOOLS {
        let path = find_binary(tool.binary).ok_or_else(|| {
            anyhow!(
                "{} is still missing after installing Debian package {}",
                tool.binary,
                tool.package
            )
        })?;
        let (package, version) = package_version(&path, tool.package);
        found.insert(
            tool.binary,
            ToolInfo {
                path,
                package,
                version,
                role: tool.role,
            },
        );
    }
    Ok(found)
}

fn run_apt(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .context("cannot run apt-get; is this Debian?")?;
    if !status.success() {
        bail!(
            "`apt-get {}` failed ({status}); the Debian package registry must be reachable",
            args.join(" ")
        );
    }
    Ok(())
}

/// Runs tools in the bed's pods. Every process is tracked by the bed (killed when it is
/// dropped) and dies with the harness; every destination is checked to be a pod of the bed.
pub struct Runner<'a> {
    bed: &'a TestBed,
    dir: PathBuf,
    counter: AtomicU32,
}

impl<'a> Runner<'a> {
    pub fn new(bed: &'a TestBed) -> Result<Runner<'a>> {
        let dir = bed.tmp_dir().join("bench");
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Runner {
            bed,
            dir,
            counter: AtomicU32::new(0),
        })
    }

    /// A directory of the bed's for tool files (configs, output).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Refuses any destination that is not a pod of this bed: load goes nowhere else.
    pub fn check_target(&self, ip: IpAddr) -> Result<()> {
        if self.bed.pods().iter().any(|p| p.ips().contains(&ip)) {
            Ok(())
        } else {
            bail!("BUG: refusing to send load to {ip}, which is not a pod of this test bed")
        }
    }

    fn output_files(&self, name: &str) -> Result<(PathBuf, PathBuf, fs::File, fs::File)> {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let out_path = self.dir.join(format!("{n:04}-{name}.out"));
        let err_path = self.dir.join(format!("{n:04}-{name}.err"));
        let out = fs::File::create(&out_path)
            .with_context(|| format!("cannot create {}", out_path.display()))?;
        let err = fs::File::create(&err_path)
            .with_context(|| format!("cannot create {}", err_path.display()))?;
        Ok((out_path, err_path, out, err))
    }

    fn spawn(&self, pod: &Pod, args: &[String], out: fs::File, err: fs::File) -> Result<Process> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| anyhow!("BUG: empty command"))?;
        let mut cmd = pod.try_command(program)?;
        cmd.args(rest).stdin(Stdio::null()).stdout(out).stderr(err);
        os::die_with_harness(&mut cmd);
        pod.spawn(&mut cmd)
    }

    /// Runs a client tool to completion in `pod` and returns its stdout. It is killed if it
    /// runs past `limit` or a stop is asked for.
    pub fn run(&self, pod: &Pod, args: &[String], limit: Duration) -> Result<String> {
        let name = tool_name(args);
        let (out_path, err_path, out, err) = self.output_files(name)?;
        let process = self.spawn(pod, args, out, err)?;
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = process.try_wait()? {
                break status;
            }
            if os::stopping() {
                let _ = process.kill();
                bail!("interrupted");
            }
            if Instant::now() >= deadline {
                let _ = process.kill();
                bail!(
                    "`{}` in pod {} did not finish within {limit:?}; killed it",
                    args.join(" "),
                    pod.name()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = fs::read_to_string(&out_path).unwrap_or_default();
        let stderr = fs::read_to_string(&err_path).unwrap_or_default();
        let _ = fs::remove_file(&out_path);
        let _ = fs::remove_file(&err_path);
        if !status.success() {
            bail!(
                "`{}` in pod {} failed ({status}): {}",
                args.join(" "),
                pod.name(),
                tail(&format!("{stderr}\n{stdout}"), 6)
            );
        }
        Ok(stdout)
    }

    /// Starts a server in `pod` and waits until something listens on TCP `port` there.
    pub fn serve(&self, pod: &Pod, args: &[String], port: u16) -> Result<Process> {
        let name = tool_name(args);
        let (out_path, err_path, out, err) = self.output_files(&format!("{name}-server"))?;
        let process = self.spawn(pod, args, out, err)?;
        let filter = format!("sport = :{port}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = process.try_wait()? {
                bail!(
                    "`{}` in pod {} exited ({status}): {}",
                    args.join(" "),
                    pod.name(),
                    tail(
                        &format!(
                            "{}\n{}",
                            fs::read_to_string(&err_path).unwrap_or_default(),
                            fs::read_to_string(&out_path).unwrap_or_default()
                        ),
                        6
                    )
                );
            }
            let listening = pod.exec(&["ss", "-Hltn", &filter])?;
            if !listening.trim().is_empty() {
                return Ok(process);
            }
            os::check_stop()?;
            if Instant::now() >= deadline {
                bail!(
                    "`{}` in pod {} does not listen on port {port} after 10 s",
                    args.join(" "),
                    pod.name()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// The tool a command runs (after a `taskset -c N` prefix), for file names.
fn tool_name(args: &[String]) -> &str {
    let skip = if args.first().is_some_and(|a| a == "taskset") {
        3
    } else {
        0
    };
    args.get(skip).map_or("tool", String::as_str)
}

pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// What one iperf3 client run measured (the receiver's side).
#[derive(Debug, Clone, Serialize)]
pub struct Iperf {
    pub bits_per_second: f64,
    pub bytes: f64,
    pub seconds: f64,
    pub retransmits: Option<u64>,
}

/// Reads `iperf3 -J` output.
pub fn parse_iperf(json: &str) -> Result<Iperf> {
    let v: Value = serde_json::from_str(json).context("iperf3 did not print JSON")?;
    if let Some(e) = v.get("error").and_then(Value::as_str) {
        bail!("iperf3: {e}");
    }
    let received = &v["end"]["sum_received"];
    let number = |field: &str| {
        received[field]
            .as_f64()
            .ok_or_else(|| anyhow!("iperf3 JSON has no end.sum_received.{field}"))
    };
    Ok(Iperf {
        bits_per_second: number("bits_per_second")?,
        bytes: number("bytes")?,
        seconds: number("seconds")?,
        retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
    })
}

/// What one sockperf ping-pong run measured: full round trips, in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Sockperf {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p99_9_us: f64,
    pub avg_us: Option<f64>,
    pub observations: u64,
}

/// Reads `sockperf ping-pong --full-rtt` output (it colours some lines with ANSI escapes).
pub fn parse_sockperf(text: &str) -> Result<Sockperf> {
    let text = strip_ansi(text);
    let percentile = |p: &str| -> Result<f64> {
        let key = format!("percentile {p} =");
        text.lines()
            .find_map(|l| l.split_once(&key).map(|(_, v)| v.trim().parse::<f64>()))
            .ok_or_else(|| anyhow!("sockperf printed no {p} percentile"))?
            .with_context(|| format!("sockperf's {p} percentile is not a number"))
    };
    let avg = text
        .lines()
        .find_map(|l| l.split_once("avg-rtt=").map(|(_, v)| v.to_owned()))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok());
    let observations = text
        .lines()
        .find_map(|l| {
            let (_, rest) = l.split_once("Total ")?;
            rest.split_whitespace().next()?.parse::<u64>().ok()
        })
        .unwrap_or(0);
    Ok(Sockperf {
        p50_us: percentile("50.000")?,
        p90_us: percentile("90.000")?,
        p99_us: percentile("99.000")?,
        p99_9_us: percentile("99.900")?,
        avg_us: avg,
        observations,
    })
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What one HTTP load run measured (wrk or hey).
#[derive(Debug, Clone, Serialize)]
pub struct Http {
    pub requests_per_second: f64,
    /// Requests answered with 2xx/3xx.
    pub ok_requests: u64,
    /// Failed connections or requests, and other status codes.
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

/// A wrk duration such as `812.00us`, `1.25ms`, `2.01s` or `1.00m`, in milliseconds.
fn wrk_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = s.split_at(split);
    let n: f64 = number.parse().ok()?;
    let scale = match unit {
        "us" => 0.001,
        "ms" => 1.0,
        "s" => 1000.0,
        "m" => 60_000.0,
        "h" => 3_600_000.0,
        _ => return None,
    };
    Some(n * scale)
}

/// Reads `wrk --latency` output.
pub fn parse_wrk(text: &str) -> Result<Http> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("wrk printed no Requests/sec"))?;
    let requests = text
        .lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next()?.parse::<u64>().ok())
        .ok_or_else(|| anyhow!("wrk printed no request count"))?;
    let percentile = |p: &str| -> Result<f64> {
        text.lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(p))
                    .then(|| words.next().and_then(wrk_duration_ms))
                    .flatten()
            })
            .ok_or_else(|| anyhow!("wrk printed no {p} latency (run it with --latency)"))
    };
    let mut errors = 0;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += rest
                .split(',')
                .filter_map(|part| part.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += rest.trim().parse::<u64>().unwrap_or(0);
        }
    }
    let non_2xx = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Http {
        requests_per_second: rps,
        ok_requests: requests.saturating_sub(non_2xx),
        errors,
        p50_ms: percentile("50%")?,
        p90_ms: percentile("90%")?,
        p99_ms: percentile("99%")?,
    })
}

/// Reads `hey` output (summary, latency distribution, status codes, errors).
pub fn parse_hey(text: &str) -> Result<Http> {
    let rps = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| anyhow!("hey printed no Requests/sec"))?;
    let percentile = |p: &str| -> Result<f64> {
        let prefix = format!("{p} in ");
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|secs| secs * 1000.0)
            .ok_or_else(|| anyhow!("hey printed no {p} latency"))
    };
    // "  [200]\t1234 responses" under "Status code distribution:", and "  [7]\tGet ...: error"
    // under "Error distribution:".
    let mut ok = 0;
    let mut errors = 0;
    let mut section = "";
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.ends_with("distribution:") {
            section = if trimmed.starts_with("Status code") {
                "status"
            } else if trimmed.starts_with("Error") {
                "error"
            } else {
                ""
            };
            continue;
        }
        let Some(rest) = trimmed.strip_prefix('[') else {
            continue;
        };
        let Some((inside, after)) = rest.split_once(']') else {
            continue;
        };
        let Ok(n) = inside.parse::<u64>() else {
            continue;
        };
        match section {
            "status" => {
                let count = after
                    .split_whitespace()
                    .next()
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0);
                if (200..400).contains(&n) {
                    ok += count;
                } else {
                    errors += count;
                }
            }
            "error" => errors += n,
            _ => {}
        }
    }
    Ok(Http {
        requests_per_second: rps,
        ok_requests: ok,
        errors,
        p50_ms: percentile("50%")?,
        p90_ms: percentile("90%")?,
        p99_ms: percentile("99%")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_iperf3_json() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bytes":1000,"retransmits":3},
            "sum_received":{"seconds":2.0,"bytes":990.0,"bits_per_second":3960.5}}}"#;
        let r = parse_iperf(json).expect("parse");
        assert_eq!(r.bits_per_second, 3960.5);
        assert_eq!(r.bytes, 990.0);
        assert_eq!(r.retransmits, Some(3));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }

    #[test]
    fn reads_sockperf_percentiles() {
        let text = "sockperf: \u{1b}[2;35m====> avg-rtt=5.342 (std-dev=5.497)\u{1b}[0m\n\
            sockperf: \u{1b}[2;35mTotal 288269 observations\u{1b}[0m; each percentile contains 2882.69 observations\n\
            sockperf: ---> <MAX> observation = 1446.698\n\
            sockperf: ---> percentile 99.999 =  636.748\n\
            sockperf: ---> percentile 99.900 =   35.683\n\
            sockperf: ---> percentile 99.000 =   11.498\n\
            sockperf: ---> percentile 90.000 =    7.413\n\
            sockperf: ---> percentile 50.000 =    4.709\n";
        let r = parse_sockperf(text).expect("parse");
        assert_eq!(r.p50_us, 4.709);
        assert_eq!(r.p90_us, 7.413);
        assert_eq!(r.p99_us, 11.498);
        assert_eq!(r.p99_9_us, 35.683);
        assert_eq!(r.avg_us, Some(5.342));
        assert_eq!(r.observations, 288269);
    }

    #[test]
    fn reads_wrk_output() {
        let text = "Running 2s test @ http://10.1.0.3:8080/\n  1 threads and 16 connections\n\
            \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
            \x20   Latency   812.00us  100.00us   5.00ms   90.00%\n\
            \x20 Latency Distribution\n\
            \x20    50%  750.00us\n     75%  800.00us\n     90%    1.10ms\n     99%    2.01s\n\
            \x20 40000 requests in 2.00s, 10.00MB read\n\
            \x20 Socket errors: connect 1, read 2, write 0, timeout 3\n\
            \x20 Non-2xx or 3xx responses: 4\n\
            Requests/sec:  20000.50\nTransfer/sec:      5.00MB\n";
        let r = parse_wrk(text).expect("parse");
        assert_eq!(r.requests_per_second, 20000.5);
        assert_eq!(r.ok_requests, 39996);
        assert_eq!(r.errors, 10);
        assert!((r.p50_ms - 0.75).abs() < 1e-9);
        assert!((r.p90_ms - 1.1).abs() < 1e-9);
        assert!((r.p99_ms - 2010.0).abs() < 1e-9);
    }

    #[test]
    fn reads_hey_output() {
        let text = "\nSummary:\n  Total:\t2.0012 secs\n  Requests/sec:\t5000.1234\n\n\
            Latency distribution:\n  10% in 0.0005 secs\n  50% in 0.0010 secs\n\
            \x20 90% in 0.0020 secs\n  99% in 0.0050 secs\n\n\
            Status code distribution:\n  [200]\t9990 responses\n  [503]\t2 responses\n\n\
            Error distribution:\n  [8]\tGet \"http://10.1.0.3:8080/\": dial tcp: connection refused\n";
        let r = parse_hey(text).expect("parse");
        assert_eq!(r.requests_per_second, 5000.1234);
        assert_eq!(r.ok_requests, 9990);
        assert_eq!(r.errors, 10);
        assert!((r.p50_ms - 1.0).abs() < 1e-9);
        assert!((r.p99_ms - 5.0).abs() < 1e-9);
    }
}
