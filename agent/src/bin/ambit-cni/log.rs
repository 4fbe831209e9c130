//! The plugin's log: lines on stderr (the runtime keeps or shows them), and appended to the
//! network config's `logFile` when it names one, with a UTC timestamp, since a runtime's copy of
//! a plugin's stderr is easy to lose.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::Path,
    time::{SystemTime, UNIX_EPOCH},
};

pub struct Log {
    /// `ADD default/web-0 (container 3f6940ab5ab4)`: who the lines are about.
    context: String,
    file: Option<File>,
    /// Lines kept for the unit tests (and written nowhere) when set.
    captured: Option<Vec<String>>,
}

impl Log {
    /// Logging to stderr.
    pub fn stderr() -> Log {
        Log {
            context: String::new(),
            file: None,
            captured: None,
        }
    }

    /// Logging into memory only, for tests.
    #[cfg(test)]
    pub fn capture() -> Log {
        Log {
            context: String::new(),
            file: None,
            captured: Some(Vec::new()),
        }
    }

    /// The lines logged so far (tests).
    #[cfg(test)]
    pub fn lines(&self) -> &[String] {
        self.captured.as_deref().unwrap_or_default()
    }

    /// What every following line is about.
    pub fn set_context(&mut self, context: impl Into<String>) {
        self.context = context.into();
    }

    /// Also appends lines to `path`; if it cannot be opened, says so on stderr and goes on.
    pub fn open_file(&mut self, path: &Path) {
        if self.captured.is_some() {
            return;
        }
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(f) => self.file = Some(f),
            Err(e) => self.info(format!("cannot open logFile {}: {e}", path.display())),
        }
    }

    /// Logs `message` as one line (a multi-line message, such as the client's advice on an
    /// unreachable agent, is joined with "; ").
    pub fn info(&mut self, message: impl AsRef<str>) {
        let message = message
            .as_ref()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; ");
        let line = if self.context.is_empty() {
            format!("ambit-cni: {message}")
        } else {
            format!("ambit-cni: {}: {message}", self.context)
        };
        if let Some(lines) = &mut self.captured {
            lines.push(line);
            return;
        }
        let _ = writeln!(std::io::stderr(), "{line}");
        if let Some(f) = &mut self.file {
            let _ = writeln!(f, "{} [{}] {line}", utc_now(), std::process::id());
        }
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn utc_now() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = ambit_agent::identity::manager::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use ambit_agent::identity::manager::civil_from_days;

    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(utc_now().len(), "2026-01-01T00:00:00.000Z".len());
    }
}
