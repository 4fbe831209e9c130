//! What the node agent and the waypoint both do around their work: follow the config file
//! (a change on disk, or SIGHUP at once), stop on SIGTERM or SIGINT, and drain.
//!
//! Which settings a reload may change is decided in one place, [`Config::restart_needed`]; this
//! module only refuses a reload that needs a restart and says which settings to revert.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{config::Config, identity::manager::CertManager};

/// How often the config file is checked for changes (SIGHUP applies at once).
pub const CONFIG_POLL: Duration = Duration::from_secs(1);

/// What the control loop should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The config file changed, or SIGHUP asked to read it again: call [`ConfigWatch::reload`].
    Reload,
    /// A poll found nothing new: a chance to retry work that failed.
    Idle,
    /// SIGTERM or SIGINT: stop accepting and drain.
    Stop,
}

/// The config file and the process signals, as one stream of [`Event`]s.
pub struct ConfigWatch {
    path: PathBuf,
    /// The file's bytes when last read (`None`: unreadable), to see changes without parsing.
    last: Option<Vec<u8>>,
    hup: Signal,
    term: Signal,
    int: Signal,
    tick: tokio::time::Interval,
}

impl ConfigWatch {
    /// Starts watching `path`, whose current content is the config in force. Installs the
    /// signal handlers, so call it before announcing readiness.
    pub fn new(path: &Path) -> std::io::Result<Self> {
        let mut tick = tokio::time::interval(CONFIG_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(ConfigWatch {
            path: path.to_owned(),
            last: std::fs::read(path).ok(),
            hup: signal(SignalKind::hangup())?,
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            tick,
        })
    }

    /// Waits for the next event. Cancel-safe: usable as one branch of a `select!`.
    pub async fn next(&mut self) -> Event {
        let forced = tokio::select! {
            _ = self.hup.recv() => true,
            _ = self.tick.tick() => false,
            _ = self.term.recv() => return Event::Stop,
            _ = self.int.recv() => return Event::Stop,
        };
        let text = std::fs::read(&self.path).ok();
        if forced || text != self.last {
            self.last = text;
            Event::Reload
        } else {
            Event::Idle
        }
    }

    /// The file's new config, unless it fails validation or changes a setting that only a
    /// restart applies (the error names them).
    pub fn reload(&self, old: &Config) -> anyhow::Result<Config> {
        let new = Config::load(&self.path)?;
        let fixed = old.restart_needed(&new);
        if !fixed.is_empty() {
            anyhow::bail!(
                "{} cannot change while the agent runs; restart the agent to change {}, or put \
                 the old value back",
                fixed.join(", "),
                if fixed.len() == 1 { "it" } else { "them" }
            );
        }
        Ok(new)
    }
}

/// Drains after the listeners stopped accepting: fires `draining` (HBONE connections send
/// GOAWAY), then waits up to `timeout` for the tracked connections to finish.
pub async fn drain(connections: &TaskTracker, draining: &CancellationToken, timeout: Duration) {
    info!(
        drain_timeout_s = timeout.as_secs_f64(),
        open = connections.len(),
        "shutting down: no longer accepting; draining open connections"
    );
    draining.cancel();
    connections.close();
    if tokio::time::timeout(timeout, connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = connections.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
}

/// Stops the control tasks (certificate renewal, xDS, reapers, servers) after a drain, giving
/// them a second to finish cleanly.
pub async fn stop_control(
    shutdown: &CancellationToken,
    certs: &CertManager,
    control: &TaskTracker,
) {
    shutdown.cancel();
    certs.shutdown().await;
    control.close();
    if tokio::time::timeout(Duration::from_secs(1), control.wait())
        .await
        .is_err()
    {
        warn!(
            tasks = control.len(),
            "control tasks did not stop within 1 s"
        );
    }
}
