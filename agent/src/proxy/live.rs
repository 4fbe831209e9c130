//! The live inbound connections of this agent: registered when admitted, removed when they end.
//! Used to re-judge open connections when authorization policy changes (closing the ones the new
//! policy no longer allows), and the natural source for listing connections.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use tokio_util::sync::CancellationToken;

use crate::identity::Identity;

/// One admitted inbound connection.
pub struct LiveConn {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<Arc<Identity>>,
    /// The destination pod's namespace (what namespace-scoped policies apply to).
    pub dst_namespace: String,
    /// Fired to close the connection; the reason is read by its handler for the access log.
    close: CancellationToken,
    reason: Mutex<Option<String>>,
}

impl LiveConn {
    /// Resolves when the connection has been told to close.
    pub async fn closed(&self) {
        self.close.cancelled().await
    }

    /// Why it was closed, if it was.
    pub fn close_reason(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn close(&self, reason: String) {
        *self.reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.close.cancel();
    }
}

/// The registry. Cheap: one short lock per connection open and close.
#[derive(Default)]
pub struct LiveConns {
    conns: Mutex<HashMap<u64, Arc<LiveConn>>>,
    next: std::sync::atomic::AtomicU64,
}

/// Removes its connection from the registry when dropped.
pub struct Registration<'a> {
    registry: &'a LiveConns,
    id: u64,
    pub conn: Arc<LiveConn>,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl LiveConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<LiveConn>>> {
        // Updates are single inserts/removes: a poisoned map is still consistent.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        &self,
        src: SocketAddr,
        dst: SocketAddr,
        src_identity: Option<Arc<Identity>>,
        dst_namespace: &str,
    ) -> Registration<'_> {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let conn = Arc::new(LiveConn {
            src,
            dst,
            src_identity,
            dst_namespace: dst_namespace.to_owned(),
            close: CancellationToken::new(),
            reason: Mutex::new(None),
        });
        self.lock().insert(id, conn.clone());
        Registration {
            registry: self,
            id,
            conn,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Closes every connection for which `judge` returns a reason. Returns how many.
    pub fn close_where(&self, mut judge: impl FnMut(&LiveConn) -> Option<String>) -> usize {
        let conns: Vec<Arc<LiveConn>> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for c in conns {
            if let Some(reason) = judge(&c) {
                c.close(reason);
                closed += 1;
            }
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn registers_closes_and_forgets() {
        let live = LiveConns::default();
        let a: SocketAddr = "10.1.0.2:1000".parse().expect("addr");
        let b: SocketAddr = "10.2.0.2:80".parse().expect("addr");
        let r1 = live.register(a, b, None, "default");
        let r2 = live.register(b, a, None, "other");
        assert_eq!(live.len(), 2);
        let n = live.close_where(|c| (c.dst_namespace == "default").then(|| "policy".to_owned()));
        assert_eq!(n, 1);
        r1.conn.closed().await;
        assert_eq!(r1.conn.close_reason().as_deref(), Some("policy"));
        assert_eq!(r2.conn.close_reason(), None);
        drop(r1);
        assert_eq!(live.len(), 1);
        drop(r2);
        assert!(live.is_empty());
    }
}
