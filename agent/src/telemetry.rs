//! Logging setup and the access log.
//!
//! Logs go to stdout, as text or one JSON object per line (`--log-format json`), filtered by
//! `--log-level` / `AMBIT_LOG` (tracing's EnvFilter syntax, e.g. `info,ambit_agent::proxy=debug`).
//! Records from the eBPF programs (aya-log) arrive through the `log` crate bridge and are filtered
//! the same way.
//!
//! The access log is one event per finished connection on target `access`, with stable field
//! names: `direction`, `src.addr`, `dst.addr` (what the client dialed), `dst.service` and
//! `dst.endpoint` (for a service VIP), `src.workload`, `dst.workload`, `src.identity`,
//! `dst.identity` (SPIFFE ids, when known), `path` (`hbone` or `passthrough`),
//! `bytes_sent` (source to destination), `bytes_received` (destination to source), `duration_ms`,
//! and on failure `error` and `fault` (`downstream` or `upstream`); inbound, `authz.decision`
//! (e.g. `denied by policy default/deny-sleep (rule 0)`) and `authz.policy`. The record and the
//! guard that writes it once per connection are `proxy::result`'s.

use tracing::level_filters::LevelFilter;
use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Changes the log filter of the running agent (the admin API's `/logging`).
pub struct LogControl {
    handle: tracing_subscriber::reload::Handle<EnvFilter, tracing_subscriber::Registry>,
    current: std::sync::Mutex<String>,
}

static LOG_CONTROL: std::sync::OnceLock<LogControl> = std::sync::OnceLock::new();

/// The log control, once [`init`] has run.
pub fn log_control() -> Option<&'static LogControl> {
    LOG_CONTROL.get()
}

impl LogControl {
    /// The filter in force, as it was given.
    pub fn current(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces the filter (EnvFilter syntax). The eBPF programs' own level is fixed at start;
    /// their records are still filtered by the new filter.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter)
            .map_err(|e| format!("invalid log filter {filter:?}: {e}"))?;
        self.handle
            .reload(parsed)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        // Records from the `log` crate (aya-log) are pre-filtered by its own max level.
        log::set_max_level(log::LevelFilter::Trace);
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = filter.to_owned();
        Ok(())
    }
}

/// Installs the global subscriber. Returns the most verbose level enabled, for the eBPF side.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<LevelFilter> {
    let parsed = EnvFilter::try_new(filter)
        .map_err(|e| anyhow::anyhow!("invalid log filter {filter:?}: {e}"))?;
    let max = parsed.max_level_hint().unwrap_or(LevelFilter::TRACE);
    let (layer, handle) = tracing_subscriber::reload::Layer::new(parsed);
    let registry = tracing_subscriber::registry().with(layer);
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stdout))
            .try_init()?,
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_span_list(false)
                    .with_writer(std::io::stdout),
            )
            .try_init()?,
    }
    let _ = LOG_CONTROL.set(LogControl {
        handle,
        current: std::sync::Mutex::new(filter.to_owned()),
    });
    Ok(max)
}

/// aya-log's level number for a tracing level (1 error .. 5 trace, 0 off).
pub fn ebpf_log_level(max: LevelFilter) -> u8 {
    match max.into_level() {
        None => 0,
        Some(tracing::Level::ERROR) => 1,
        Some(tracing::Level::WARN) => 2,
        Some(tracing::Level::INFO) => 3,
        Some(tracing::Level::DEBUG) => 4,
        Some(tracing::Level::TRACE) => 5,
    }
}

/// How a connection was carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plaintext, agent to destination directly.
    Passthrough,
    /// Inside an HBONE tunnel (mutual TLS).
    Hbone,
    /// Inside an HBONE tunnel to the destination's waypoint (mutual TLS), which carries it on.
    Waypoint,
    /// Between two pods of this node, spliced in the kernel after admission: both identities
    /// are the agent's own pods', the policy was judged, and the bytes never leave the node.
    Kernel,
    /// Between two pods of this node, copied by the agent in user space: the kernel could not
    /// take the connection (a full splice map).
    Local,
    /// DNS over TCP, answered or forwarded by the agent's DNS proxy.
    Dns,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Passthrough => "passthrough",
            Transport::Hbone => "hbone",
            Transport::Waypoint => "waypoint",
            Transport::Kernel => "kernel",
            Transport::Local => "local",
            Transport::Dns => "dns",
        }
    }
}
