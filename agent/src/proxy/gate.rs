//! Holding new connections until the control plane has spoken.
//!
//! With xDS configured, the agent's view is incomplete until the first full state is applied:
//! mesh workloads on other nodes are unknown (a connection to one would leave as plaintext
//! passthrough) and istiod's authorization policies are missing (inbound would be allowed by
//! default). So until then every new connection of an enrolled pod, in both directions (15001,
//! 15006 and each stream on 15008), waits here: bounded in time (`xds.syncHoldSeconds`) and in
//! number (`xds.maxHeldConnections`), then goes on, routed and judged on the synced state, or is
//! refused with the reason in its access log line and in
//! `ambit_connections_refused_total{reason}`. Nothing is read from or sent for a held
//! connection. After a restart the agent starts unsynced again; once synced, the gate stays open
//! through control-plane outages (the last state keeps serving, as ztunnel's does).

use std::{
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    time::Duration,
};

use tokio::sync::Notify;

/// Why a held connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotSynced {
    #[error(
        "refused: no full state from the control plane within {0:?} of the connection (is istiod \
         reachable? `ambitctl status` shows the xDS stream); nothing was sent"
    )]
    Timeout(Duration),
    #[error(
        "refused: {0} connections already wait for the control plane's first full state \
         (xds.maxHeldConnections); nothing was sent"
    )]
    Full(usize),
}

impl NotSynced {
    /// The `reason` label of `ambit_connections_refused_total` and the access log's `limit`.
    pub fn reason(self) -> &'static str {
        match self {
            NotSynced::Timeout(_) => "control_plane_not_synced",
            NotSynced::Full(_) => "held_connections_full",
        }
    }
}

/// Open once the control plane's first full state is applied (at once without xDS).
pub struct SyncGate {
    open: AtomicBool,
    opened: Notify,
    hold: Duration,
    max_held: usize,
    held: AtomicUsize,
}

impl SyncGate {
    /// A gate that is open from the start: the local config is the only source.
    pub fn open() -> SyncGate {
        let g = SyncGate::closed(Duration::ZERO, 0);
        g.open.store(true, Ordering::Release);
        g
    }

    /// A gate that holds connections up to `hold` each, at most `max_held` at a time, until
    /// [`SyncGate::set_open`].
    pub fn closed(hold: Duration, max_held: usize) -> SyncGate {
        SyncGate {
            open: AtomicBool::new(false),
            opened: Notify::new(),
            hold,
            max_held,
            held: AtomicUsize::new(0),
        }
    }

    /// The state is synced: release every held connection, and hold none from now on.
    pub fn set_open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Connections waiting now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Waits until the state is synced (at once when it is), or refuses.
    pub async fn pass(&self) -> Result<(), NotSynced> {
        if self.is_open() {
            return Ok(());
        }
        let opened = self.opened.notified();
        tokio::pin!(opened);
        // Registered before the flag is read again, so an opening in between is not missed.
        opened.as_mut().enable();
        if self.is_open() {
            return Ok(());
        }
        let waiting = self.held.fetch_add(1, Ordering::AcqRel);
        let _unhold = Unhold(&self.held);
        if waiting >= self.max_held {
            return Err(NotSynced::Full(self.max_held));
        }
        match tokio::time::timeout(self.hold, opened).await {
            Ok(()) => Ok(()),
            // Opened just as the timer fired: let it through.
            Err(_) if self.is_open() => Ok(()),
            Err(_) => Err(NotSynced::Timeout(self.hold)),
        }
    }
}

struct Unhold<'a>(&'a AtomicUsize);

impl Drop for Unhold<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn holds_until_open_then_passes_everything() {
        let gate = Arc::new(SyncGate::closed(Duration::from_secs(10), 8));
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { g.pass().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(gate.held(), 3);
        gate.set_open();
        for w in waiting {
            assert_eq!(w.await.expect("task"), Ok(()));
        }
        assert_eq!(gate.held(), 0);
        assert_eq!(gate.pass().await, Ok(()), "open stays open");
    }

    #[tokio::test(start_paused = true)]
    async fn refuses_after_the_hold_and_beyond_the_bound() {
        let gate = Arc::new(SyncGate::closed(Duration::from_secs(5), 2));
        let first: Vec<_> = (0..2)
            .map(|_| {
                let g = gate.clone();
                tokio::spawn(async move { g.pass().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            gate.pass().await,
            Err(NotSynced::Full(2)),
            "a third waits not"
        );
        for w in first {
            assert_eq!(
                w.await.expect("task"),
                Err(NotSynced::Timeout(Duration::from_secs(5)))
            );
        }
        assert_eq!(gate.held(), 0);
        assert_eq!(NotSynced::Full(2).reason(), "held_connections_full");
        assert!(SyncGate::open().is_open());
    }
}
