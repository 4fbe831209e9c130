//! Output primitives: aligned tables with optional colour, JSON/YAML, and the small formatters
//! (bytes, durations, timestamps, identities) the views share.
//!
//! Colour is decided once ([`Painter::for_stdout`]) and applied when a table is rendered, so
//! escape codes never count toward a column's width.

use std::{
    io::IsTerminal,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

/// `-o` / `--output`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for humans (colour on a terminal unless NO_COLOR is set).
    Table,
    /// Pretty JSON, every field the agent sent.
    Json,
    /// YAML, every field the agent sent.
    Yaml,
}

/// Serializes `value` as JSON or YAML (`format` must not be [`Format::Table`]).
pub fn structured(value: &impl Serialize, format: Format) -> anyhow::Result<String> {
    Ok(match format {
        Format::Yaml => serde_norway::to_string(value)?,
        _ => serde_json::to_string_pretty(value)? + "\n",
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Plain,
    Bold,
    Good,
    Warn,
    Bad,
}

/// Applies [`Style`]s as ANSI escapes, or not at all.
#[derive(Clone, Copy, Debug)]
pub struct Painter {
    colour: bool,
}

impl Painter {
    /// Colour only when stdout is a terminal and `NO_COLOR` is unset or empty (no-color.org).
    pub fn for_stdout() -> Self {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Self {
            colour: std::io::stdout().is_terminal() && !no_color,
        }
    }

    pub fn paint(&self, text: &str, style: Style) -> String {
        let code = match style {
            _ if !self.colour => return text.to_owned(),
            Style::Plain => return text.to_owned(),
            Style::Bold => "1",
            Style::Good => "32",
            Style::Warn => "33",
            Style::Bad => "1;31",
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// One table cell: its text and how to colour it.
pub struct Cell {
    text: String,
    style: Style,
}

impl Cell {
    pub fn styled(text: impl Into<String>, style: Style) -> Self {
        let text = text.into();
        Self {
            text: if text.is_empty() { "-".into() } else { text },
            style,
        }
    }

    /// `yes`/`no`; `no` in `bad_no` style (e.g. red for "not healthy").
    pub fn yes_no(value: bool, bad_no: Style) -> Self {
        if value {
            Self::styled("yes", Style::Plain)
        } else {
            Self::styled("no", bad_no)
        }
    }
}

impl<T: Into<String>> From<T> for Cell {
    fn from(text: T) -> Self {
        Self::styled(text, Style::Plain)
    }
}

/// A table with a header row; columns are as wide as their widest cell, two spaces apart.
pub struct Table {
    header: Vec<&'static str>,
    rows: Vec<Vec<Cell>>,
}

impl Table {
    pub fn new(header: &[&'static str]) -> Self {
        Self {
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<Cell>) {
        debug_assert_eq!(cells.len(), self.header.len(), "BUG: row width");
        self.rows.push(cells);
    }

    /// The rendered table, or `empty` (e.g. "no connections") when there are no rows.
    pub fn render(&self, painter: Painter, empty: &str) -> String {
        if self.rows.is_empty() {
            return format!("{empty}\n");
        }
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.len()).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.text.chars().count());
            }
        }
        let header = self.header.iter().map(|h| (*h, Style::Bold)).collect();
        let body = self
            .rows
            .iter()
            .map(|r| r.iter().map(|c| (c.text.as_str(), c.style)).collect());
        let mut out = String::new();
        for row in std::iter::once(header).chain(body) {
            let row: Vec<(&str, Style)> = row;
            let last = row.len().saturating_sub(1);
            for (i, ((text, style), width)) in row.iter().zip(&widths).enumerate() {
                out.push_str(&painter.paint(text, *style));
                if i < last {
                    let pad = width - text.chars().count() + 2;
                    out.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push('\n');
        }
        out
    }
}

/// Label/value lines with the values aligned (the `status` and `bpf` headers).
pub fn fields(rows: &[(&str, String)]) -> String {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (label, value) in rows {
        // Continuation lines of a multi-line value line up under its first line.
        let value = value.replace('\n', &format!("\n{:width$}  ", ""));
        out.push_str(&format!("{label:width$}  {value}\n"));
    }
    out
}

/// `1.5 KiB`, `23 B`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// `45s`, `3m12s`, `5h03m`, `2d04h`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match () {
        _ if d > 0 => format!("{d}d{h:02}h"),
        _ if h > 0 => format!("{h}h{m:02}m"),
        _ if m > 0 => format!("{m}m{s:02}s"),
        _ => format!("{s}s"),
    }
}

/// `in 5h03m` / `3m12s ago` for a signed offset from now.
pub fn relative(secs: i64) -> String {
    if secs >= 0 {
        format!("in {}", duration(secs.unsigned_abs()))
    } else {
        format!("{} ago", duration(secs.unsigned_abs()))
    }
}

/// Seconds from now until the RFC 3339 time `ts` (negative: in the past), if it parses.
pub fn seconds_until(ts: &str) -> Option<i64> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(parse_rfc3339(ts)? - i64::try_from(now).ok()?)
}

/// Unix seconds of an RFC 3339 timestamp (`2026-05-01T12:00:00.123Z`, `...+02:00`).
fn parse_rfc3339(ts: &str) -> Option<i64> {
    let num = |r: std::ops::Range<usize>| ts.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, s) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let seps = ts.as_bytes();
    if seps.get(4) != Some(&b'-') || seps.get(13) != Some(&b':') || !(1..=12).contains(&mo) {
        return None;
    }
    let rest = ts.get(19..)?;
    let zone = rest.trim_start_matches(|c: char| c == '.' || c.is_ascii_digit());
    let offset = match zone {
        "Z" | "z" => 0,
        _ => {
            let sign = match zone.get(..1)? {
                "+" => 1,
                "-" => -1,
                _ => return None,
            };
            let oh = zone.get(1..3)?.parse::<i64>().ok()?;
            let om = zone.get(4..6)?.parse::<i64>().ok()?;
            sign * (oh * 3600 + om * 60)
        }
    };
    // Days from 1970-01-01 to y-mo-d in the proleptic Gregorian calendar.
    let (y, mo) = if mo <= 2 { (y - 1, mo + 12) } else { (y, mo) };
    let days = 365 * y + y / 4 - y / 100 + y / 400 + (153 * (mo - 3) + 2) / 5 + d - 719_469;
    Some(days * 86400 + h * 3600 + mi * 60 + s - offset)
}

/// An RFC 3339 time without fractional seconds, for narrow columns.
pub fn short_time(ts: &str) -> String {
    match (ts.find('.'), ts.rfind(['Z', 'z', '+', '-'])) {
        (Some(dot), Some(zone)) if zone > dot => format!("{}{}", &ts[..dot], &ts[zone..]),
        _ => ts.to_owned(),
    }
}

/// `spiffe://<td>/ns/<ns>/sa/<sa>` shortened to `<ns>/<sa>` for tables (the full id is in
/// `-o json`); anything else unchanged.
pub fn short_identity(id: &str) -> String {
    let path = id
        .strip_prefix("spiffe://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path);
    match path.map(|p| p.split('/').collect::<Vec<_>>()).as_deref() {
        Some(["ns", ns, "sa", sa]) => format!("{ns}/{sa}"),
        _ => id.to_owned(),
    }
}

/// `text` cut to `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_without_counting_colour() {
        let mut t = Table::new(&["NAME", "READY"]);
        t.row(vec!["a-long-name".into(), Cell::yes_no(false, Style::Bad)]);
        t.row(vec!["b".into(), Cell::yes_no(true, Style::Bad)]);
        let plain = t.render(Painter { colour: false }, "none");
        assert_eq!(
            plain,
            "NAME         READY\na-long-name  no\nb            yes\n"
        );
        let coloured = t.render(Painter { colour: true }, "none");
        assert!(coloured.contains("\x1b[1mNAME\x1b[0m         \x1b[1mREADY"));
        assert!(coloured.contains("a-long-name  \x1b[1;31mno\x1b[0m\n"));
        assert_eq!(
            Table::new(&["X"]).render(Painter { colour: false }, "none"),
            "none\n"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
        assert_eq!(duration(59), "59s");
        assert_eq!(duration(192), "3m12s");
        assert_eq!(duration(3 * 86400 + 4 * 3600 + 5), "3d04h");
        assert_eq!(relative(-60), "1m00s ago");
        assert_eq!(
            short_identity("spiffe://cluster.local/ns/default/sa/web"),
            "default/web"
        );
        assert_eq!(short_identity("spiffe://td/other"), "spiffe://td/other");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(
            short_time("2026-05-01T12:00:00.123456Z"),
            "2026-05-01T12:00:00Z"
        );
        assert_eq!(
            short_time("2026-05-01T12:00:00+02:00"),
            "2026-05-01T12:00:00+02:00"
        );
    }

    #[test]
    fn parses_rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2000-03-01T00:00:00Z"), Some(951_868_800));
        assert_eq!(
            parse_rfc3339("2026-01-01T02:00:00.5+02:00"),
            Some(1_767_225_600)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
