//! The SVG chart of a report: every figure as a ratio to direct, one bar per mesh path, on a
//! log scale centred on 1× (the direct path), so a reader sees the gap at a glance. Bars to the
//! left of 1× are below direct, to the right above; the legend of each figure says which way is
//! better (throughput: higher; latency and CPU: lower). A figure's target is a tick on the path
//! it is set for, green when met, red when missed.
//!
//! Drawn from the report's JSON (what `--out` wrote), so an old run can be charted again with
//! `ambit-bench --chart-from FILE.json`. Hand-written SVG: a few rectangles and lines do not
//! justify a plotting crate in the build.

use std::fmt::Write as _;

use serde_json::Value;

/// The mesh paths, in drawing order, with their colours.
const PATHS: [(&str, &str); 4] = [
    ("cross-node", "#1f77b4"),
    ("same-node", "#2ca02c"),
    ("same-node-user-space", "#ff7f0e"),
    ("waypoint", "#9467bd"),
];

/// The scale: ratios from 1/16× to 16×, log2.
const MIN_LOG2: f64 = -4.0;
const MAX_LOG2: f64 = 4.0;

const WIDTH: f64 = 900.0;
const PLOT_LEFT: f64 = 50.0;
const PLOT_WIDTH: f64 = WIDTH - PLOT_LEFT - 50.0;
const BAR_HEIGHT: f64 = 11.0;
/// A figure's label line above its bars, and the space after them.
const LABEL_HEIGHT: f64 = 15.0;
const FIGURE_GAP: f64 = 10.0;
const TOP: f64 = 78.0;

/// The SVG of `report` (an `ambit-bench/1` JSON report).
pub fn svg(report: &Value) -> String {
    let figures: Vec<&Value> = report["figures"]
        .as_array()
        .map(|f| f.iter().filter(|f| bars(f).next().is_some()).collect())
        .unwrap_or_default();
    let rows: usize = figures.iter().map(|f| bars(f).count()).sum();
    let height = TOP
        + rows as f64 * (BAR_HEIGHT + 2.0)
        + figures.len() as f64 * (LABEL_HEIGHT + FIGURE_GAP)
        + 40.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height:.0}" viewBox="0 0 {WIDTH} {height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r##"<rect width="100%" height="100%" fill="#ffffff"/>"##
    );
    let title = format!(
        "Ambit bench, {} run of {}: each figure as a ratio to the direct path (log scale)",
        report["mode"].as_str().unwrap_or("?"),
        report["started_utc"].as_str().unwrap_or("?"),
    );
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="13" font-weight="bold">{}</text>"#,
        escape(&title)
    );
    // Legend.
    let mut x = 10.0;
    for (path, colour) in PATHS {
        let _ = writeln!(
            out,
            r#"<rect x="{x}" y="30" width="12" height="10" fill="{colour}"/><text x="{}" y="39">{path}</text>"#,
            x + 16.0
        );
        x += 24.0 + 7.0 * path.len() as f64;
    }
    let _ = writeln!(
        out,
        r##"<line x1="{x}" y1="35" x2="{}" y2="35" stroke="#2ca02c" stroke-width="3"/><text x="{}" y="39">target met</text>"##,
        x + 12.0,
        x + 16.0
    );
    let x = x + 90.0;
    let _ = writeln!(
        out,
        r##"<line x1="{x}" y1="35" x2="{}" y2="35" stroke="#d62728" stroke-width="3"/><text x="{}" y="39">target missed</text>"##,
        x + 12.0,
        x + 16.0
    );
    // Axis: a grid line per power of two, 1× (direct) stronger.
    let bottom = height - 30.0;
    for exp in MIN_LOG2 as i32..=MAX_LOG2 as i32 {
        let gx = position(2f64.powi(exp));
        let (stroke, width) = if exp == 0 {
            ("#000000", 1.5)
        } else {
            ("#dddddd", 1.0)
        };
        let _ = writeln!(
            out,
            r#"<line x1="{gx:.1}" y1="{}" x2="{gx:.1}" y2="{bottom:.1}" stroke="{stroke}" stroke-width="{width}"/>"#,
            TOP - 8.0
        );
        let label = if exp >= 0 {
            format!("{}×", 1u32 << exp)
        } else {
            format!("1/{}×", 1u32 << -exp)
        };
        let _ = writeln!(
            out,
            r#"<text x="{gx:.1}" y="{}" text-anchor="middle">{label}</text>"#,
            bottom + 14.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle" font-weight="bold">direct</text>"#,
        position(1.0),
        TOP - 12.0
    );

    let mut y = TOP;
    for figure in figures {
        let label = format!(
            "{} ({}{})",
            figure["label"].as_str().unwrap_or("?"),
            figure["unit"].as_str().unwrap_or("?"),
            if higher_is_better(figure) {
                ", higher is better"
            } else {
                ", lower is better"
            }
        );
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}" font-weight="bold">{}</text>"#,
            y + LABEL_HEIGHT - 4.0,
            escape(&label)
        );
        y += LABEL_HEIGHT;
        let target = &figure["target"];
        for (path, colour, ratio) in bars(figure) {
            let (a, b) = (position(1.0), position(ratio));
            let _ = writeln!(
                out,
                r#"<rect x="{:.1}" y="{y:.1}" width="{:.1}" height="{BAR_HEIGHT}" fill="{colour}"><title>{path}: {}× direct</title></rect>"#,
                a.min(b),
                (b - a).abs().max(1.0),
                short(ratio)
            );
            let (tx, anchor) = if b >= a {
                (b + 3.0, "start")
            } else {
                (b - 3.0, "end")
            };
            let _ = writeln!(
                out,
                r#"<text x="{tx:.1}" y="{:.1}" text-anchor="{anchor}" font-size="9">{}×</text>"#,
                y + BAR_HEIGHT - 2.0,
                short(ratio)
            );
            if target["path"].as_str() == Some(path)
                && target["target"]["ratio"].as_bool() == Some(true)
                && let Some(goal) = target["target"]["value"].as_f64()
            {
                let gx = position(goal);
                let stroke = if target["pass"].as_bool() == Some(true) {
                    "#2ca02c"
                } else {
                    "#d62728"
                };
                let _ = writeln!(
                    out,
                    r#"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="{stroke}" stroke-width="3"><title>target: {}</title></line>"#,
                    y - 2.0,
                    y + BAR_HEIGHT + 2.0,
                    escape(target["description"].as_str().unwrap_or(""))
                );
            }
            y += BAR_HEIGHT + 2.0;
        }
        y += FIGURE_GAP;
    }
    out.push_str("</svg>\n");
    out
}

/// The figure's mesh paths that have a ratio to direct, with their colours.
fn bars(figure: &Value) -> impl Iterator<Item = (&'static str, &'static str, f64)> + '_ {
    PATHS.iter().filter_map(|(path, colour)| {
        let ratio = figure["paths"][*path]["ratio_to_direct"].as_f64()?;
        (ratio.is_finite() && ratio > 0.0).then_some((*path, *colour, ratio))
    })
}

/// Throughput (a rate) is better higher; latencies and costs lower.
fn higher_is_better(figure: &Value) -> bool {
    match figure["target"]["target"]["op"].as_str() {
        Some("at_least") => true,
        Some("at_most") => false,
        _ => matches!(figure["unit"].as_str(), Some("Gbit/s" | "req/s")),
    }
}

/// Where `ratio` is on the x axis (clamped to the scale).
fn position(ratio: f64) -> f64 {
    let l = ratio.log2().clamp(MIN_LOG2, MAX_LOG2);
    PLOT_LEFT + (l - MIN_LOG2) / (MAX_LOG2 - MIN_LOG2) * PLOT_WIDTH
}

fn short(ratio: f64) -> String {
    if ratio >= 10.0 {
        format!("{ratio:.0}")
    } else {
        format!("{ratio:.2}")
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report() -> Value {
        json!({
            "mode": "full",
            "started_utc": "2026-12-02 04:47",
            "figures": [
                {
                    "label": "iperf3 <1 stream> & more",
                    "unit": "Gbit/s",
                    "paths": {
                        "direct-cross-node": {"ratio_to_direct": null},
                        "cross-node": {"ratio_to_direct": 0.44},
                        "same-node": {"ratio_to_direct": 0.56},
                        "waypoint": {"ratio_to_direct": null},
                    },
                    "target": {"path": "cross-node", "pass": false, "description": "≥ 0.55× direct",
                               "target": {"op": "at_least", "ratio": true, "value": 0.55}},
                },
                {
                    "label": "round trip p50",
                    "unit": "µs",
                    "paths": {"cross-node": {"ratio_to_direct": 1.76}},
                },
                {
                    "label": "agent CPU",
                    "unit": "CPU-s/GB",
                    "paths": {},
                },
            ],
        })
    }

    #[test]
    fn one_bar_per_path_with_a_ratio_and_the_target_marked() {
        let svg = svg(&report());
        assert!(
            svg.starts_with("<svg ") && svg.ends_with("</svg>\n"),
            "{svg}"
        );
        assert_eq!(
            svg.matches("<title>").count(),
            4,
            "3 bars and 1 target: {svg}"
        );
        assert!(svg.contains("cross-node: 0.44× direct"), "{svg}");
        assert!(svg.contains("same-node: 0.56× direct"), "{svg}");
        assert!(
            svg.contains("<title>target: ≥ 0.55× direct</title>"),
            "{svg}"
        );
        assert!(
            svg.contains(r##"stroke="#d62728" stroke-width="3"><title>"##),
            "missed: {svg}"
        );
        // Escaped, with the direction of each figure.
        assert!(
            svg.contains("iperf3 &lt;1 stream&gt; &amp; more (Gbit/s, higher is better)"),
            "{svg}"
        );
        assert!(
            svg.contains("round trip p50 (µs, lower is better)"),
            "{svg}"
        );
        // A figure without any ratio is left out.
        assert!(!svg.contains("agent CPU"), "{svg}");
    }

    #[test]
    fn the_scale_is_logarithmic_around_direct() {
        let one = position(1.0);
        assert!((position(2.0) - one - (one - position(0.5))).abs() < 1e-9);
        assert!(position(0.44) < one && position(1.76) > one);
        // Off-scale ratios stay on the chart.
        assert_eq!(position(1e-9), position(1.0 / 16.0));
        assert_eq!(position(1e9), position(16.0));
    }
}
