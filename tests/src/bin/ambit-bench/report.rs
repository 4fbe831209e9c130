//! From raw runs to figures: the median, min and max of each, its ratio to the direct path of the
//! same run, the targets with a pass/miss mark, a Markdown table for stdout (and the
//! README) and the JSON report.

use std::{collections::BTreeMap, fmt::Write as _};

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    scale::ScaleStep,
    traffic::{AgentMemory, MIB, PathId, Run, Scenario, Traffic},
};

/// The median of `values` (the mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    Some(if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    })
}

/// Median, min and max of several runs.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stat {
    pub fn of(values: &[f64]) -> Option<Stat> {
        let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        Some(Stat {
            median: median(&finite)?,
            min: finite.iter().copied().fold(f64::INFINITY, f64::min),
            max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            runs: finite.len(),
        })
    }

    fn scaled(self, by: f64) -> Stat {
        Stat {
            median: self.median * by,
            min: self.min * by,
            max: self.max * by,
            runs: self.runs,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    AtLeast,
    AtMost,
}

/// One of the targets.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Target {
    pub op: Op,
    pub value: f64,
    /// Compared with the ratio to direct (else with the figure itself).
    pub ratio: bool,
}

impl Target {
    const fn ratio(op: Op, value: f64) -> Target {
        Target {
            op,
            value,
            ratio: true,
        }
    }

    const fn absolute(op: Op, value: f64) -> Target {
        Target {
            op,
            value,
            ratio: false,
        }
    }

    fn holds(self, measured: f64) -> bool {
        match self.op {
            Op::AtLeast => measured >= self.value,
            Op::AtMost => measured <= self.value,
        }
    }

    fn describe(self, unit: &str) -> String {
        let op = match self.op {
            Op::AtLeast => "≥",
            Op::AtMost => "≤",
        };
        if self.ratio {
            format!("{op} {}× direct", num(self.value))
        } else {
            format!("{op} {} {unit}", num(self.value))
        }
    }
}

/// A figure measured on several paths, each run giving one value.
struct Figure {
    id: String,
    label: String,
    unit: &'static str,
    values: BTreeMap<PathId, Vec<f64>>,
    /// Show the difference to direct (latencies: "microseconds added").
    added: bool,
    /// The target, for the cross-node path.
    target: Option<Target>,
}

/// The result of checking one target.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub figure: String,
    pub target: String,
    pub measured: f64,
    pub pass: bool,
}

fn runs_of<'a>(
    runs: &'a [Run],
    scenario: Scenario,
    path: PathId,
) -> impl Iterator<Item = &'a Run> + 'a {
    runs.iter()
        .filter(move |r| r.kind == scenario && r.path == path && r.error.is_none())
}

fn per_path(
    runs: &[Run],
    scenario: Scenario,
    value: impl Fn(&Run) -> Option<f64>,
) -> BTreeMap<PathId, Vec<f64>> {
    PathId::ALL
        .iter()
        .map(|&p| (p, runs_of(runs, scenario, p).filter_map(&value).collect()))
        .collect()
}

fn figures(traffic: &Traffic) -> Vec<Figure> {
    let runs = &traffic.runs;
    let mut out = Vec::new();
    for (streams, reverse, target) in [
        (1, false, 0.55),
        (1, true, 0.55),
        (4, false, 0.30),
        (4, true, 0.30),
    ] {
        let scenario = Scenario::Iperf { streams, reverse };
        out.push(Figure {
            id: format!("throughput.{}", scenario.key()),
            label: format!(
                "iperf3, {streams} stream{}, {}",
                if streams == 1 { "" } else { "s" },
                if reverse {
                    "server → client"
                } else {
                    "client → server"
                }
            ),
            unit: "Gbit/s",
            values: per_path(runs, scenario, |r| {
                r.iperf3.as_ref().map(|i| i.bits_per_second / 1e9)
            }),
            added: false,
            target: Some(Target::ratio(Op::AtLeast, target)),
        });
    }
    type Pick = fn(&crate::tools::Sockperf) -> f64;
    let percentiles: [(&str, Pick, Option<f64>); 4] = [
        ("p50", |s| s.p50_us, Some(1.15)),
        ("p90", |s| s.p90_us, None),
        ("p99", |s| s.p99_us, Some(1.30)),
        ("p99.9", |s| s.p99_9_us, None),
    ];
    for (name, pick, target) in percentiles {
        out.push(Figure {
            id: format!("latency.sockperf.{name}"),
            label: format!("sockperf ping-pong TCP 1 KiB, round trip {name}"),
            unit: "µs",
            values: per_path(runs, Scenario::Sockperf, |r| r.sockperf.as_ref().map(pick)),
            added: true,
            target: target.map(|t| Target::ratio(Op::AtMost, t)),
        });
    }
    for (scenario, what, target) in [
        (Scenario::Wrk, "wrk, kept connections", None),
        (
            Scenario::Hey,
            "hey, new connection per request",
            Some(Target::ratio(Op::AtLeast, 0.5)),
        ),
    ] {
        let tool = if scenario == Scenario::Wrk {
            "wrk"
        } else {
            "hey"
        };
        out.push(Figure {
            id: format!("http.{tool}.requests_per_second"),
            label: format!("{what}: requests/s"),
            unit: "req/s",
            values: per_path(runs, scenario, |r| {
                r.http.as_ref().map(|h| h.requests_per_second)
            }),
            added: false,
            target,
        });
        for (name, pick) in [
            ("p50", (|h| h.p50_ms) as fn(&crate::tools::Http) -> f64),
            ("p99", |h| h.p99_ms),
        ] {
            out.push(Figure {
                id: format!("http.{tool}.latency_{name}"),
                label: format!("{what}: latency {name}"),
                unit: "ms",
                values: per_path(runs, scenario, |r| r.http.as_ref().map(pick)),
                added: true,
                target: None,
            });
        }
    }
    // Agent CPU per GB: per round, all iperf3 runs of the path together.
    let mut cpu_per_gb: BTreeMap<PathId, Vec<f64>> = BTreeMap::new();
    for path in PathId::ALL.into_iter().filter(|p| p.is_mesh()) {
        let rounds: std::collections::BTreeSet<usize> = runs.iter().map(|r| r.round).collect();
        let values = rounds
            .into_iter()
            .filter_map(|round| {
                let (cpu, bytes) = runs
                    .iter()
                    .filter(|r| r.path == path && r.round == round && r.error.is_none())
                    .filter_map(|r| Some((r.agent_cpu_seconds?, r.iperf3.as_ref()?.bytes)))
                    .fold((0.0, 0.0), |(c, b), (rc, rb)| (c + rc, b + rb));
                (bytes > 0.0).then(|| cpu / (bytes / 1e9))
            })
            .collect();
        cpu_per_gb.insert(path, values);
    }
    out.push(Figure {
        id: "agent.cpu_seconds_per_gb".into(),
        label: "both agents, CPU per GB moved, all iperf3 runs together".into(),
        unit: "CPU-s/GB",
        values: cpu_per_gb,
        added: false,
        target: Some(Target::absolute(Op::AtMost, 1.0)),
    });
    for (scenario, what) in [
        (Scenario::Wrk, "kept connections (wrk)"),
        (Scenario::Hey, "new connections (hey)"),
    ] {
        let tool = if scenario == Scenario::Wrk {
            "wrk"
        } else {
            "hey"
        };
        out.push(Figure {
            id: format!("agent.cpu_seconds_per_1000_requests.{tool}"),
            label: format!("both agents, CPU per 1000 requests, {what}"),
            unit: "CPU-s",
            values: per_path(runs, scenario, |r| {
                let requests = r.http.as_ref()?.ok_requests as f64;
                (requests > 0.0).then_some(r.agent_cpu_seconds? / (requests / 1000.0))
            }),
            added: false,
            target: None,
        });
    }
    // Where the agents' CPU goes: the kernel (sockets, TCP, loopback) or the agent's own code.
    let system_share = PathId::ALL
        .iter()
        .map(|&p| {
            let values = runs
                .iter()
                .filter(|r| r.path == p && r.error.is_none())
                .filter_map(|r| {
                    let total = r.agent_cpu_seconds?;
                    (total > 0.0).then_some(100.0 * r.agent_cpu_system_seconds? / total)
                })
                .collect();
            (p, values)
        })
        .collect();
    out.push(Figure {
        id: "agent.cpu_system_share".into(),
        label: "both agents, share of their CPU in the kernel (system time), every run".into(),
        unit: "%",
        values: system_share,
        added: false,
        target: None,
    });
    out
}

/// Numbers as people read them: 3 significant digits or so.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 || a == 0.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn cell(stat: Option<Stat>) -> String {
    match stat {
        None => "—".into(),
        Some(s) if s.runs == 1 => num(s.median),
        Some(s) => format!("{} ({}–{})", num(s.median), num(s.min), num(s.max)),
    }
}

fn mark(pass: bool) -> &'static str {
    if pass { "pass" } else { "**MISS**" }
}

/// Everything the report holds besides the raw runs.
pub struct Report {
    pub json: Value,
    pub table: String,
    pub checks: Vec<TargetCheck>,
}

pub struct Inputs<'a> {
    pub header: Vec<String>,
    pub traffic: Option<&'a Traffic>,
    pub scale: &'a [ScaleStep],
    pub scale_skipped: &'a [(usize, String)],
}

pub fn build(inputs: &Inputs) -> Report {
    let mut table = String::new();
    let mut checks = Vec::new();
    let mut figures_json = Vec::new();
    for line in &inputs.header {
        let _ = writeln!(table, "{line}");
    }
    let _ = writeln!(table);

    if let Some(traffic) = inputs.traffic {
        let _ = writeln!(
            table,
            "| figure | direct, same node | same-node (spliced) | × direct | same-node, user space | × direct | direct, cross node | cross-node | × direct | waypoint | × direct | target (cross-node) |"
        );
        let _ = writeln!(table, "|---|---|---|---|---|---|---|---|---|---|---|---|");
        for f in figures(traffic) {
            let stats: BTreeMap<PathId, Option<Stat>> =
                f.values.iter().map(|(p, v)| (*p, Stat::of(v))).collect();
            let stat = |p: PathId| stats.get(&p).copied().flatten();
            let compare = |p: PathId| -> Option<(f64, f64)> {
                let reference = stat(p.reference()?)?;
                let s = stat(p)?;
                (reference.median != 0.0)
                    .then(|| (s.median / reference.median, s.median - reference.median))
            };
            let ratio_cell = |p: PathId| match compare(p) {
                None => "—".into(),
                Some((ratio, added)) if f.added => {
                    format!(
                        "{}× ({}{} {})",
                        num(ratio),
                        if added >= 0.0 { "+" } else { "" },
                        num(added),
                        f.unit
                    )
                }
                Some((ratio, _)) => format!("{}×", num(ratio)),
            };
            let mut target_cell = String::new();
            let mut target_json = Value::Null;
            if let Some(t) = f.target {
                let measured = if t.ratio {
                    compare(PathId::Cross).map(|(r, _)| r)
                } else {
                    stat(PathId::Cross).map(|s| s.median)
                };
                let description = t.describe(f.unit);
                match measured {
                    Some(m) => {
                        let pass = t.holds(m);
                        target_cell = format!("{description}: {}", mark(pass));
                        checks.push(TargetCheck {
                            figure: f.label.clone(),
                            target: description.clone(),
                            measured: m,
                            pass,
                        });
                        target_json = json!({"path": "cross-node", "target": t, "description": description, "measured": m, "pass": pass});
                    }
                    None => target_cell = format!("{description}: not measured"),
                }
            }
            let _ = writeln!(
                table,
                "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                f.label,
                f.unit,
                cell(stat(PathId::DirectSame)),
                cell(stat(PathId::Same)),
                ratio_cell(PathId::Same),
                cell(stat(PathId::SameUserSpace)),
                ratio_cell(PathId::SameUserSpace),
                cell(stat(PathId::DirectCross)),
                cell(stat(PathId::Cross)),
                ratio_cell(PathId::Cross),
                cell(stat(PathId::Waypoint)),
                ratio_cell(PathId::Waypoint),
                target_cell
            );
            let paths: serde_json::Map<String, Value> = PathId::ALL
                .iter()
                .filter_map(|&p| {
                    let values = f.values.get(&p)?;
                    let s = stat(p);
                    let (ratio, added) = compare(p).unzip();
                    Some((
                        p.key().to_owned(),
                        json!({
                            "values": values,
                            "median": s.map(|s| s.median),
                            "min": s.map(|s| s.min),
                            "max": s.map(|s| s.max),
                            "ratio_to_direct": ratio,
                            "added_over_direct": if f.added { added } else { None },
                        }),
                    ))
                })
                .collect();
            figures_json.push(json!({
                "id": f.id, "label": f.label, "unit": f.unit, "paths": paths, "target": target_json,
            }));
        }
        let _ = writeln!(table);
        agents_table(&mut table, &mut checks, &traffic.agents);
    }
    let scale_json = scale_table(&mut table, &mut checks, inputs.scale, inputs.scale_skipped);

    let missed: Vec<&TargetCheck> = checks.iter().filter(|c| !c.pass).collect();
    let _ = writeln!(
        table,
        "Targets met: {} of {}{}",
        checks.len() - missed.len(),
        checks.len(),
        if missed.is_empty() {
            String::new()
        } else {
            format!(
                "; missed (reported, not failures): {}",
                missed
                    .iter()
                    .map(|c| format!("{} ({}, measured {})", c.figure, c.target, num(c.measured)))
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    );

    let agents_json: Vec<Value> = inputs
        .traffic
        .map(|t| {
            t.agents
                .iter()
                .map(|a| {
                    json!({
                        "node": a.node,
                        "idle_rss_bytes": Stat::of(&a.idle_rss),
                        "idle_anon_bytes": Stat::of(&a.idle_anon),
                        "peak_rss_bytes": a.peak_rss,
                        "rss_after_load_bytes": Stat::of(&a.rss_after_load),
                        "anon_after_load_bytes": Stat::of(&a.anon_after_load),
                        "samples": a,
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let json = json!({
        "figures": figures_json,
        "agents": agents_json,
        "scale": scale_json,
        "targets": checks,
        "runs": inputs.traffic.map(|t| &t.runs),
    });
    Report {
        json,
        table,
        checks,
    }
}

fn agents_table(table: &mut String, checks: &mut Vec<TargetCheck>, agents: &[AgentMemory]) {
    let _ = writeln!(
        table,
        "| agent memory | idle RSS (MiB) | of it anonymous | peak RSS, VmHWM (MiB) | RSS after the load (MiB) | of it anonymous |"
    );
    let _ = writeln!(table, "|---|---|---|---|---|---|");
    let mib = |v: &[f64]| Stat::of(v).map(|s| s.scaled(1.0 / MIB));
    for a in agents {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} |",
            a.node,
            cell(mib(&a.idle_rss)),
            cell(mib(&a.idle_anon)),
            num(a.peak_rss / MIB),
            cell(mib(&a.rss_after_load)),
            cell(mib(&a.anon_after_load)),
        );
    }
    let largest = |f: &dyn Fn(&AgentMemory) -> Option<f64>| {
        agents.iter().filter_map(f).fold(0.0, f64::max) / MIB
    };
    let idle_max = largest(&|a| median(&a.idle_rss));
    let peak_max = largest(&|a| Some(a.peak_rss));
    // How far each agent stays above its own idle once the load is over.
    let kept_max = largest(&|a| Some(median(&a.rss_after_load)? - median(&a.idle_rss)?));
    let idle_target = Target::absolute(Op::AtMost, 12.0);
    let peak_target = Target::absolute(Op::AtMost, 32.0);
    let kept_target = Target::absolute(Op::AtMost, 2.0);
    let (idle_pass, peak_pass, kept_pass) = (
        idle_target.holds(idle_max),
        peak_target.holds(peak_max),
        kept_target.holds(kept_max),
    );
    let _ = writeln!(
        table,
        "| target (each agent) | {}: {} | | {}: {} | {} above idle: {} ({} MiB) | |",
        idle_target.describe("MiB"),
        mark(idle_pass),
        peak_target.describe("MiB"),
        mark(peak_pass),
        kept_target.describe("MiB"),
        mark(kept_pass),
        num(kept_max),
    );
    let _ = writeln!(table);
    for (figure, target, measured, pass) in [
        (
            "agent RSS idle, largest of the agents (MiB)",
            idle_target,
            idle_max,
            idle_pass,
        ),
        (
            "agent RSS peak under load, largest of the agents (MiB)",
            peak_target,
            peak_max,
            peak_pass,
        ),
        (
            "agent RSS after the load above its idle, largest of the agents (MiB)",
            kept_target,
            kept_max,
            kept_pass,
        ),
    ] {
        checks.push(TargetCheck {
            figure: figure.into(),
            target: target.describe("MiB"),
            measured,
            pass,
        });
    }
}

fn scale_table(
    table: &mut String,
    checks: &mut Vec<TargetCheck>,
    steps: &[ScaleStep],
    skipped: &[(usize, String)],
) -> Value {
    let per_workload_target = Target::absolute(Op::AtMost, 400.0);
    let mut steps_json = Vec::new();
    if !steps.is_empty() {
        let _ = writeln!(
            table,
            "| scale: workloads pushed by xDS | push → ACK (ms) | agent RSS after (MiB) | RSS added per workload (B) |"
        );
        let _ = writeln!(table, "|---|---|---|---|");
    }
    let mut last_per_workload = None;
    for s in steps {
        let apply = Stat::of(&s.runs.iter().map(|r| r.push_apply_ms).collect::<Vec<_>>());
        let rss = Stat::of(&s.runs.iter().map(|r| r.rss_after).collect::<Vec<_>>());
        let per = Stat::of(
            &s.runs
                .iter()
                .map(|r| r.bytes_per_workload)
                .collect::<Vec<_>>(),
        );
        let failed = if s.errors.is_empty() {
            String::new()
        } else {
            format!(" ({} runs failed)", s.errors.len())
        };
        let _ = writeln!(
            table,
            "| {}{failed} | {} | {} | {} |",
            s.workloads,
            cell(apply),
            cell(rss.map(|r| r.scaled(1.0 / MIB))),
            cell(per)
        );
        if let Some(p) = per {
            last_per_workload = Some((s.workloads, p.median));
        }
        steps_json.push(json!({
            "workloads": s.workloads,
            "push_apply_ms": apply,
            "rss_after_bytes": rss,
            "bytes_per_workload": per,
            "runs": s.runs,
            "errors": s.errors,
        }));
    }
    for (n, why) in skipped {
        let _ = writeln!(table, "| {n} | skipped: {why} | | |");
    }
    if let Some((n, per)) = last_per_workload {
        let pass = per_workload_target.holds(per);
        let _ = writeln!(
            table,
            "| target | | | {} at {n}: {} |",
            per_workload_target.describe("B"),
            mark(pass)
        );
        checks.push(TargetCheck {
            figure: format!("agent RSS per extra workload at {n} workloads (B)"),
            target: per_workload_target.describe("B"),
            measured: per,
            pass,
        });
    }
    if !steps.is_empty() || !skipped.is_empty() {
        let _ = writeln!(table);
    }
    json!({
        "steps": steps_json,
        "skipped": skipped.iter().map(|(n, why)| json!({"workloads": n, "reason": why})).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        let s = Stat::of(&[5.0, 1.0, 3.0]).expect("stat");
        assert_eq!((s.median, s.min, s.max, s.runs), (3.0, 1.0, 5.0, 3));
    }

    #[test]
    fn targets_compare_both_ways() {
        assert!(Target::ratio(Op::AtLeast, 0.5).holds(0.5));
        assert!(!Target::ratio(Op::AtLeast, 0.5).holds(0.49));
        assert!(Target::absolute(Op::AtMost, 1.0).holds(0.9));
        assert!(!Target::absolute(Op::AtMost, 1.0).holds(1.1));
    }
}
