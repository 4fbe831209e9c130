//! Bounds on what clients can make the agent hold (`limits` and `hbone` in the config): open
//! connections per agent and per pod, TLS handshakes in flight per agent and per source IP, and
//! HBONE streams per client identity. Each is a counter taken when the thing starts and given
//! back (a guard's `Drop`) when it ends; a take over the bound is refused at once, with a
//! [`LimitHit`] naming the limit for the access log and `ambit_connections_refused_total`.
//!
//! The bounds are on concurrency, not rates: a client that opens and resets streams as fast as it
//! can (HTTP/2 rapid reset) is held back by h2's own accounting (`max_pending_accept_reset_streams`,
//! GOAWAY `ENHANCE_YOUR_CALM`), by `hbone.maxConcurrentStreams` per connection and by its
//! identity's stream budget here.

use std::{
    collections::HashMap,
    hash::Hash,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use crate::{config::Limits, identity::Identity};

/// Which bound refused something.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    PodConnections,
    Handshakes,
    HandshakesPerSource,
    IdentityStreams,
}

impl Limit {
    /// The `reason` label of `ambit_connections_refused_total` and the access log's `limit`.
    pub fn reason(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::PodConnections => "pod_connections",
            Limit::Handshakes => "handshakes",
            Limit::HandshakesPerSource => "handshakes_per_source",
            Limit::IdentityStreams => "identity_streams",
        }
    }

    fn field(self) -> &'static str {
        match self {
            Limit::Connections => "limits.maxConnections",
            Limit::PodConnections => "limits.maxConnectionsPerPod",
            Limit::Handshakes => "limits.maxHandshakes",
            Limit::HandshakesPerSource => "limits.maxHandshakesPerSource",
            Limit::IdentityStreams => "limits.maxStreamsPerIdentity",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Limit::Connections => "connections in all pods",
            Limit::PodConnections => "connections in this pod",
            Limit::Handshakes => "TLS handshakes in flight",
            Limit::HandshakesPerSource => "TLS handshakes in flight from this source",
            Limit::IdentityStreams => "HBONE streams from this identity",
        }
    }
}

/// A refusal: `limit` was at `max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("refused: {max} {} already, the most allowed ({}); nothing was sent", .limit.what(), .limit.field())]
pub struct LimitHit {
    pub limit: Limit,
    pub max: usize,
}

/// The agent's counters against [`Limits`].
pub struct Budgets {
    limits: Limits,
    connections: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    per_source: Mutex<HashMap<IpAddr, usize>>,
    per_identity: Mutex<HashMap<Identity, usize>>,
    /// When a refusal was last logged (Unix seconds), so a flood logs once a second, not once per
    /// connection (the metric counts every one).
    last_warned: AtomicU64,
}

impl Budgets {
    pub fn new(limits: Limits) -> Arc<Budgets> {
        Arc::new(Budgets {
            limits,
            connections: Arc::default(),
            handshakes: Arc::default(),
            per_source: Mutex::default(),
            per_identity: Mutex::default(),
            last_warned: AtomicU64::new(0),
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// A new connection on one of a pod's listeners; `pod_open` is that pod's counter.
    pub fn connection(
        self: &Arc<Self>,
        pod_open: &Arc<AtomicUsize>,
    ) -> Result<ConnectionSlot, LimitHit> {
        let total = take(
            &self.connections,
            self.limits.max_connections,
            Limit::Connections,
        )?;
        let pod = match take(
            pod_open,
            self.limits.max_connections_per_pod,
            Limit::PodConnections,
        ) {
            Ok(p) => p,
            Err(e) => {
                drop(total);
                return Err(e);
            }
        };
        Ok(ConnectionSlot {
            _total: total,
            _pod: pod,
        })
    }

    /// A TLS handshake from `source`, held until it is done.
    pub fn handshake(self: &Arc<Self>, source: IpAddr) -> Result<HandshakeSlot, LimitHit> {
        let all = take(
            &self.handshakes,
            self.limits.max_handshakes,
            Limit::Handshakes,
        )?;
        let one = take_keyed(
            self.clone(),
            |b| &b.per_source,
            source,
            self.limits.max_handshakes_per_source,
            Limit::HandshakesPerSource,
        )?;
        Ok(HandshakeSlot {
            _all: all,
            _source: one,
        })
    }

    /// An HBONE stream from `identity`, held while it lives.
    pub fn stream(self: &Arc<Self>, identity: &Identity) -> Result<StreamSlot, LimitHit> {
        take_keyed(
            self.clone(),
            |b| &b.per_identity,
            identity.clone(),
            self.limits.max_streams_per_identity,
            Limit::IdentityStreams,
        )
        .map(|held| StreamSlot { _held: held })
    }

    /// Whether a refusal should be logged now (at most once a second; every one is counted).
    pub fn should_warn(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        self.last_warned.swap(now, Ordering::Relaxed) != now
    }
}

/// A unit taken from a counter, given back on drop.
struct Taken(Arc<AtomicUsize>);

impl Drop for Taken {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn take(counter: &Arc<AtomicUsize>, max: usize, limit: Limit) -> Result<Taken, LimitHit> {
    let before = counter.fetch_add(1, Ordering::AcqRel);
    if before >= max {
        counter.fetch_sub(1, Ordering::AcqRel);
        return Err(LimitHit { limit, max });
    }
    Ok(Taken(counter.clone()))
}

fn take_keyed<K: Hash + Eq + Clone>(
    budgets: Arc<Budgets>,
    map: fn(&Budgets) -> &Mutex<HashMap<K, usize>>,
    key: K,
    max: usize,
    limit: Limit,
) -> Result<Keyed<K>, LimitHit> {
    {
        let mut m = map(&budgets).lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        if *n >= max {
            return Err(LimitHit { limit, max });
        }
        *n += 1;
    }
    Ok(Keyed { budgets, map, key })
}

/// A unit of a per-key counter; the key's entry goes when its count is back to zero.
struct Keyed<K: Hash + Eq + Clone> {
    budgets: Arc<Budgets>,
    map: fn(&Budgets) -> &Mutex<HashMap<K, usize>>,
    key: K,
}

impl<K: Hash + Eq + Clone> Drop for Keyed<K> {
    fn drop(&mut self) {
        let mut m = (self.map)(&self.budgets)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A connection's place in the agent's and its pod's budgets.
pub struct ConnectionSlot {
    _total: Taken,
    _pod: Taken,
}

/// A handshake's place in the budgets.
pub struct HandshakeSlot {
    _all: Taken,
    _source: Keyed<IpAddr>,
}

/// A stream's place in its identity's budget.
pub struct StreamSlot {
    _held: Keyed<Identity>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            max_connections_per_pod: 2,
            max_handshakes: 3,
            max_handshakes_per_source: 2,
            handshake_timeout: Duration::from_secs(1),
            max_streams_per_identity: 2,
        }
    }

    #[test]
    fn each_bound_refuses_past_its_max_and_frees_on_drop() {
        let b = Budgets::new(limits());
        let (pod_a, pod_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let a1 = b.connection(&pod_a).expect("a1");
        let _a2 = b.connection(&pod_a).expect("a2");
        let hit = b.connection(&pod_a).err().expect("a3 over the pod's bound");
        assert_eq!(hit.limit, Limit::PodConnections);
        let _b1 = b.connection(&pod_b).expect("b1");
        let hit = b.connection(&pod_b).err().expect("over the agent's bound");
        assert_eq!(hit.limit, Limit::Connections);
        assert!(hit.to_string().contains("limits.maxConnections"), "{hit}");
        drop(a1);
        b.connection(&pod_b).expect("room again");

        let (x, y): (IpAddr, IpAddr) = (
            "10.0.0.1".parse().expect("ip"),
            "10.0.0.2".parse().expect("ip"),
        );
        let h1 = b.handshake(x).expect("h1");
        let _h2 = b.handshake(x).expect("h2");
        assert_eq!(
            b.handshake(x).err().map(|h| h.limit),
            Some(Limit::HandshakesPerSource)
        );
        let _h3 = b.handshake(y).expect("another source is not held up");
        assert_eq!(
            b.handshake(y).err().map(|h| h.limit),
            Some(Limit::Handshakes)
        );
        drop(h1);
        b.handshake(x).expect("room again");

        let id = Identity::new("cluster.local", "default", "flood").expect("id");
        let s1 = b.stream(&id).expect("s1");
        let _s2 = b.stream(&id).expect("s2");
        assert_eq!(
            b.stream(&id).err().map(|h| h.limit),
            Some(Limit::IdentityStreams)
        );
        let other = Identity::new("cluster.local", "default", "calm").expect("id");
        b.stream(&other)
            .expect("another identity has its own budget");
        drop(s1);
        b.stream(&id).expect("room again");
    }
}
