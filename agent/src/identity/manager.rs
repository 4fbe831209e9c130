//! The certificate manager: one [`WorkloadCert`] per workload identity present on the node,
//! fetched ahead of first use, renewed at half its lifetime, read by `tls/`.
//!
//! ```text
//! set_identities ──> one task per identity: key + CSR ──> CaClient::sign ──> check ──> watch
//!                                 ^── renew at ~50% of the lifetime; on failure retry with backoff
//! get / current / subscribe <──────────────────────────────────────────────────────── watch
//! ```
//!
//! The private key is generated here and never leaves the process. When renewal fails the old
//! certificate keeps serving until it expires; an expired certificate is dropped, never served.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{sync::watch, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument as _;

use super::{
    Identity,
    ca::{self, CaClient, WorkloadCert},
};

/// First retry delay after a failed fetch.
const BACKOFF_START: Duration = Duration::from_millis(200);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A CA call that has not answered by then counts as failed (and is retried).
const CA_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no certificate for {0}: no workload on this node has that identity")]
    NotLocal(Identity),
    #[error("certificate for {identity} not available yet: {last_error}")]
    NotReady {
        identity: Identity,
        last_error: String,
    },
    #[error("no certificate for {0}: the certificate manager is shutting down")]
    ShuttingDown(Identity),
}

/// What `ambitctl` and the admin API show for one identity.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertStatus {
    pub identity: String,
    /// `pending` (no certificate yet, first fetch under way), `ready`, `renewing` (a valid
    /// certificate serves while a new one is fetched or retried), `failing` (no valid certificate
    /// and the last fetch failed).
    pub state: &'static str,
    /// Hex serial of the current certificate.
    pub serial: Option<String>,
    /// RFC 3339.
    pub not_after: Option<String>,
    /// The same, in seconds since the Unix epoch.
    pub not_after_unix: Option<i64>,
    /// When the next renewal or retry is due (RFC 3339).
    pub next_rotation: Option<String>,
    /// The CA's last error, cleared by a successful fetch.
    pub last_error: Option<String>,
    /// Certificates obtained from the CA so far.
    pub fetches: u64,
}

/// Holds the certificates of the node's workload identities. Used as `Arc<CertManager>`.
pub struct CertManager {
    ca: Arc<dyn CaClient>,
    cert_ttl: Duration,
    runtime: tokio::runtime::Handle,
    entries: Mutex<HashMap<Identity, Entry>>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

struct Entry {
    shared: Arc<Shared>,
    /// Stops this identity's task (a child of the manager's shutdown token).
    stop: CancellationToken,
}

/// What an identity's task shares with readers.
struct Shared {
    identity: Identity,
    cert: watch::Sender<Option<Arc<WorkloadCert>>>,
    info: Mutex<Info>,
}

struct Info {
    state: &'static str,
    next_rotation: Option<SystemTime>,
    last_error: Option<String>,
    fetches: u64,
}

impl CertManager {
    /// Creates the manager. Must be called inside a tokio runtime: the per-identity tasks run on
    /// it (tracked, stopped by [`shutdown`](Self::shutdown)).
    pub fn new(ca: Arc<dyn CaClient>, cert_ttl: Duration) -> Arc<CertManager> {
        let runtime = tokio::runtime::Handle::try_current()
            .expect("BUG: CertManager::new must be called inside a tokio runtime");
        Arc::new(CertManager {
            ca,
            cert_ttl,
            runtime,
            entries: Mutex::new(HashMap::new()),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        })
    }

    /// The identities of the node's workloads. New ones are fetched at once; ones no longer
    /// listed are dropped (their task stopped, their certificate forgotten).
    pub fn set_identities(&self, ids: impl IntoIterator<Item = Identity>) {
        let wanted: HashSet<Identity> = ids.into_iter().collect();
        if self.shutdown.is_cancelled() {
            tracing::debug!("certificate manager is shut down; ignoring the identity update");
            return;
        }
        let mut entries = self.entries();
        entries.retain(|id, entry| {
            let keep = wanted.contains(id);
            if !keep {
                entry.stop.cancel();
                // Subscribers (TLS resolvers) forget it at once.
                entry.shared.cert.send_replace(None);
                tracing::info!(identity = %id, "no local workload has this identity any more; certificate dropped");
            }
            keep
        });
        for id in wanted {
            if entries.contains_key(&id) {
                continue;
            }
            let shared = Arc::new(Shared {
                identity: id.clone(),
                cert: watch::Sender::new(None),
                info: Mutex::new(Info {
                    state: "pending",
                    next_rotation: None,
                    last_error: None,
                    fetches: 0,
                }),
            });
            let stop = self.shutdown.child_token();
            let task = rotate(shared.clone(), self.ca.clone(), self.cert_ttl, stop.clone())
                .instrument(tracing::info_span!("cert_rotation"));
            self.tasks.spawn_on(task, &self.runtime);
            entries.insert(id, Entry { shared, stop });
        }
    }

    /// The current certificate, waiting up to `wait` for the first one.
    pub async fn get(&self, id: &Identity, wait: Duration) -> Result<Arc<WorkloadCert>, Error> {
        // No deadline for an absurdly long wait (e.g. Duration::MAX).
        let deadline = Instant::now().checked_add(wait);
        let (shared, stop) = {
            let entries = self.entries();
            match entries.get(id) {
                Some(e) => (e.shared.clone(), e.stop.clone()),
                None => return Err(self.not_here(id)),
            }
        };
        let mut rx = shared.cert.subscribe();
        loop {
            if let Some(cert) = usable(&rx.borrow_and_update()) {
                return Ok(cert);
            }
            tokio::select! {
                _ = stop.cancelled() => return Err(self.not_here(id)),
                changed = rx.changed() => {
                    if changed.is_err() {
                        return Err(self.not_here(id));
                    }
                }
                _ = sleep_until_some(deadline) => {
                    let last_error = shared.info().last_error.clone().unwrap_or_else(|| {
                        format!("still waiting for the first answer from {}", self.ca.describe())
                    });
                    return Err(Error::NotReady { identity: id.clone(), last_error });
                }
            }
        }
    }

    /// The current certificate, without waiting. `None` when the identity is not local or has no
    /// valid certificate.
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let entries = self.entries();
        let entry = entries.get(id)?;
        usable(&entry.shared.cert.borrow())
    }

    /// Follows the identity's certificate: the value changes on every rotation, and becomes
    /// `None` when the certificate expires unrenewed or the identity is dropped. `None` when the
    /// identity is not local.
    pub fn subscribe(&self, id: &Identity) -> Option<watch::Receiver<Option<Arc<WorkloadCert>>>> {
        let entries = self.entries();
        Some(entries.get(id)?.shared.cert.subscribe())
    }

    /// One entry per local identity, sorted by identity.
    pub fn status(&self) -> Vec<CertStatus> {
        let entries = self.entries();
        let mut out: Vec<CertStatus> = entries
            .values()
            .map(|e| {
                let cert = usable(&e.shared.cert.borrow());
                let info = e.shared.info();
                CertStatus {
                    identity: e.shared.identity.to_string(),
                    state: info.state,
                    serial: cert.as_ref().map(|c| c.serial.clone()),
                    not_after: cert.as_ref().map(|c| rfc3339(c.not_after)),
                    not_after_unix: cert.as_ref().map(|c| unix_secs(c.not_after)),
                    next_rotation: info.next_rotation.map(rfc3339),
                    last_error: info.last_error.clone(),
                    fetches: info.fetches,
                }
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Whether every local identity has a valid certificate (readiness).
    pub fn all_ready(&self) -> bool {
        self.entries()
            .values()
            .all(|e| usable(&e.shared.cert.borrow()).is_some())
    }

    /// Stops every task and forgets every certificate.
    pub async fn shutdown(&self) {
        self.shutdown.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        for (_, entry) in self.entries().drain() {
            entry.shared.cert.send_replace(None);
        }
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn not_here(&self, id: &Identity) -> Error {
        if self.shutdown.is_cancelled() {
            Error::ShuttingDown(id.clone())
        } else {
            Error::NotLocal(id.clone())
        }
    }
}

impl Drop for CertManager {
    /// Without an explicit `shutdown`, the tasks still stop (untracked).
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Shared {
    fn info(&self) -> MutexGuard<'_, Info> {
        self.info.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current certificate if it has not expired.
    fn valid_cert(&self) -> Option<Arc<WorkloadCert>> {
        usable(&self.cert.borrow())
    }
}

/// The certificate if present and not expired.
fn usable(cert: &Option<Arc<WorkloadCert>>) -> Option<Arc<WorkloadCert>> {
    cert.as_ref()
        .filter(|c| c.not_after > SystemTime::now())
        .cloned()
}

/// One identity's task: fetch, schedule the renewal, retry failures, drop an expired certificate.
async fn rotate(
    shared: Arc<Shared>,
    ca: Arc<dyn CaClient>,
    ttl: Duration,
    stop: CancellationToken,
) {
    let id = &shared.identity;
    let mut backoff = Backoff::new();
    loop {
        if shared.valid_cert().is_some() {
            shared.info().state = "renewing";
        }
        let asked_at = SystemTime::now();
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = fetch(&*ca, id, ttl) => r,
        };
        let wake_at = match result {
            Ok(cert) => {
                backoff.reset();
                let renew = renewal_time(&cert, asked_at);
                tracing::info!(
                    identity = %id,
                    serial = %cert.serial,
                    not_after = %rfc3339(cert.not_after),
                    renew_at = %rfc3339(renew),
                    "workload certificate issued"
                );
                {
                    let mut info = shared.info();
                    info.state = "ready";
                    info.next_rotation = Some(renew);
                    info.last_error = None;
                    info.fetches += 1;
                }
                // Not after the identity was dropped: set_identities cancels `stop` before it
                // clears the value, and this check runs under the channel's write lock.
                let cert = Arc::new(cert);
                let installed = shared.cert.send_if_modified(|current| {
                    if stop.is_cancelled() {
                        return false;
                    }
                    *current = Some(cert);
                    true
                });
                if !installed {
                    return;
                }
                instant_at(renew)
            }
            Err(e) => {
                let delay = backoff.next_delay();
                let current = shared.valid_cert();
                {
                    let mut info = shared.info();
                    info.state = if current.is_some() {
                        "renewing"
                    } else {
                        "failing"
                    };
                    info.next_rotation = Some(SystemTime::now() + delay);
                    info.last_error = Some(e.to_string());
                }
                let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                match current {
                    Some(cert) => tracing::warn!(
                        identity = %id,
                        ca = %ca.describe(),
                        error = %e,
                        retry_in_ms,
                        serial = %cert.serial,
                        not_after = %rfc3339(cert.not_after),
                        "cannot renew the workload certificate; the current one keeps serving until it expires"
                    ),
                    None => tracing::warn!(
                        identity = %id,
                        ca = %ca.describe(),
                        error = %e,
                        retry_in_ms,
                        "cannot get a workload certificate; connections with this identity fail until the CA answers"
                    ),
                }
                Instant::now() + delay
            }
        };
        // Sleep until the renewal or retry, dropping the certificate if it expires first.
        loop {
            let expiry = shared
                .cert
                .borrow()
                .as_ref()
                .map(|c| instant_at(c.not_after));
            let until = match expiry {
                Some(exp) if exp < wake_at => exp,
                _ => wake_at,
            };
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep_until(until) => {}
            }
            let expired = shared
                .cert
                .borrow()
                .as_ref()
                .is_some_and(|c| c.not_after <= SystemTime::now());
            if expired {
                shared.cert.send_replace(None);
                shared.info().state = "failing";
                tracing::warn!(
                    identity = %id,
                    "the workload certificate expired before it could be renewed; dropped it (check the CA)"
                );
            }
            if Instant::now() >= wake_at {
                break;
            }
        }
    }
}

/// Generates a key, asks the CA, and checks the answer.
async fn fetch(ca: &dyn CaClient, id: &Identity, ttl: Duration) -> Result<WorkloadCert, ca::Error> {
    let (key, csr) = new_key_and_csr(id)?;
    let chain = tokio::time::timeout(CA_CALL_TIMEOUT, ca.sign(id, &csr, ttl))
        .await
        .map_err(|_| {
            ca::Error::Unavailable(format!(
                "{} did not answer within {}s",
                ca.describe(),
                CA_CALL_TIMEOUT.as_secs()
            ))
        })??;
    workload_cert(id, &key, chain)
}

/// A fresh ECDSA P-256 key and a PEM CSR whose only SAN is the URI `identity` (empty subject).
pub fn new_key_and_csr(identity: &Identity) -> Result<(KeyPair, String), ca::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ca::Error::Csr(format!("cannot generate a P-256 key: {e}")))?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = identity
        .to_string()
        .try_into()
        .map_err(|e| ca::Error::Csr(format!("{identity} is not a valid URI SAN: {e}")))?;
    params.subject_alt_names = vec![SanType::URI(uri)];
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| ca::Error::Csr(e.to_string()))?;
    Ok((key, csr))
}

/// Checks a chain returned for `identity` against the key that made the CSR and builds the
/// [`WorkloadCert`]: the leaf must carry our public key and exactly the URI SAN `identity`, and
/// must not have expired.
pub fn workload_cert(
    identity: &Identity,
    key: &KeyPair,
    chain: Vec<CertificateDer<'static>>,
) -> Result<WorkloadCert, ca::Error> {
    let bad = |why: String| ca::Error::BadResponse(why);
    let leaf_der = chain
        .first()
        .ok_or_else(|| bad("the chain is empty".to_owned()))?;
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der)
        .map_err(|e| bad(format!("cannot parse the leaf certificate: {e}")))?;
    if leaf.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad(
            "the leaf certificate is for another public key than the one in the CSR".to_owned(),
        ));
    }
    let wanted = identity.to_string();
    let uris: Vec<&str> = leaf
        .subject_alternative_name()
        .map_err(|e| {
            bad(format!(
                "cannot parse the leaf's subject alternative names: {e}"
            ))
        })?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [wanted.as_str()] {
        return Err(bad(format!(
            "the leaf's URI SANs are {uris:?}, expected [{wanted:?}]"
        )));
    }
    let validity = leaf.validity();
    let time = |t: &x509_parser::time::ASN1Time, what: &str| {
        u64::try_from(t.timestamp())
            .map(|s| UNIX_EPOCH + Duration::from_secs(s))
            .map_err(|_| bad(format!("the leaf's {what} is before 1970")))
    };
    let not_before = time(&validity.not_before, "notBefore")?;
    let not_after = time(&validity.not_after, "notAfter")?;
    if not_after <= SystemTime::now() {
        return Err(bad(format!(
            "the leaf expired at {} already (check the CA's clock)",
            rfc3339(not_after)
        )));
    }
    let serial = ca::serial_hex(leaf_der)
        .ok_or_else(|| bad("cannot read the leaf's serial number".to_owned()))?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        chain,
        key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        serial,
        not_before,
        not_after,
    })
}

/// When to renew: half-way through the lifetime, ± up to 5% of it (jitter, so identities issued
/// together do not renew together), never past 75%.
///
/// The lifetime counts from when we asked, not from notBefore: CAs backdate notBefore for clock
/// skew (ours by 60 s), which would put a renewal computed from notBefore in the past for short-lived
/// certificates.
fn renewal_time(cert: &WorkloadCert, asked_at: SystemTime) -> SystemTime {
    let start = cert.not_before.max(asked_at);
    let life = cert
        .not_after
        .duration_since(start)
        .unwrap_or_default()
        .as_secs_f64();
    let fraction = (0.5 + 0.1 * (fastrand::f64() - 0.5)).min(0.75);
    start + Duration::from_secs_f64(life * fraction)
}

/// Exponential backoff with ±20% jitter: 200 ms, 400 ms, ... capped at 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: BACKOFF_START,
        }
    }

    fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    fn next_delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (base * 2).min(BACKOFF_MAX);
        base.mul_f64(0.8 + 0.4 * fastrand::f64()).min(BACKOFF_MAX)
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// The monotonic instant of a wall-clock time (now if it is in the past).
fn instant_at(t: SystemTime) -> Instant {
    let now = Instant::now();
    let ahead = t.duration_since(SystemTime::now()).unwrap_or_default();
    // A notAfter centuries ahead: a year is as good as forever here.
    now.checked_add(ahead)
        .unwrap_or_else(|| now + Duration::from_secs(365 * 24 * 3600))
}

/// `2025-01-31T12:00:00Z` (UTC, whole seconds).
/// Seconds since the Unix epoch (negative before it).
pub fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs(),
        Err(_) => return "1970-01-01T00:00:00Z".to_owned(),
    };
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z")
}

/// The (year, month, day) of `days` since 1970-01-01 (Howard Hinnant's algorithm), in unsigned
/// arithmetic since the date is not before the epoch.
pub fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    use super::{super::builtin::BuiltinCa, *};

    /// The built-in CA, told to fail the next N calls, to answer slowly, and counting calls.
    struct FakeCa {
        inner: BuiltinCa,
        fail_next: AtomicU32,
        delay_ms: AtomicU64,
        calls: AtomicU32,
    }

    impl FakeCa {
        fn new() -> Arc<FakeCa> {
            Arc::new(FakeCa {
                inner: BuiltinCa::generate("cluster.local").expect("ca"),
                fail_next: AtomicU32::new(0),
                delay_ms: AtomicU64::new(0),
                calls: AtomicU32::new(0),
            })
        }

        fn fail_next(&self, n: u32) {
            self.fail_next.store(n, Ordering::SeqCst);
        }

        fn calls(&self) -> u32 {
            self.calls.load(Ordering::SeqCst)
        }
    }

    impl CaClient for FakeCa {
        fn sign<'a>(
            &'a self,
            identity: &'a Identity,
            csr_pem: &'a str,
            ttl: Duration,
        ) -> ca::BoxFuture<'a, Result<Vec<CertificateDer<'static>>, ca::Error>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                let delay = self.delay_ms.load(Ordering::SeqCst);
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                let failing = self
                    .fail_next
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
                if failing {
                    return Err(ca::Error::Unavailable("test CA is down".to_owned()));
                }
                self.inner.sign(identity, csr_pem, ttl).await
            })
        }

        fn describe(&self) -> String {
            "fake CA".to_owned()
        }
    }

    fn id(sa: &str) -> Identity {
        Identity::new("cluster.local", "default", sa).expect("valid identity")
    }

    const WAIT: Duration = Duration::from_secs(5);

    /// Polls `f` every 20 ms until it holds, up to `within`.
    async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn fetches_the_first_certificate() {
        let ca = FakeCa::new();
        let m = CertManager::new(ca.clone(), Duration::from_secs(3600));
        let a = id("a");
        assert!(matches!(m.get(&a, WAIT).await, Err(Error::NotLocal(_))));
        m.set_identities([a.clone()]);
        let cert = m.get(&a, WAIT).await.expect("first certificate");
        assert_eq!(cert.identity, a);
        assert_eq!(ca.calls(), 1);
        let st = m.status();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].state, "ready");
        assert_eq!(st[0].serial.as_deref(), Some(cert.serial.as_str()));
        assert_eq!(st[0].fetches, 1);
        assert!(st[0].last_error.is_none());
        assert!(st[0].next_rotation.is_some() && st[0].not_after.is_some());
        assert!(m.all_ready());
        assert_eq!(
            m.current(&a).map(|c| c.serial.clone()),
            Some(cert.serial.clone())
        );
        // Listing it again does not fetch again.
        m.set_identities([a.clone()]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ca.calls(), 1);
        m.shutdown().await;
        assert!(matches!(m.get(&a, WAIT).await, Err(Error::ShuttingDown(_))));
    }

    #[tokio::test]
    async fn rotates_around_half_life() {
        let ca = FakeCa::new();
        let m = CertManager::new(ca.clone(), Duration::from_secs(4));
        let a = id("a");
        m.set_identities([a.clone()]);
        let first = m.get(&a, WAIT).await.expect("first");
        let mut rx = m.subscribe(&a).expect("local");
        rx.borrow_and_update();
        tokio::time::timeout(Duration::from_secs(4), rx.changed())
            .await
            .expect("rotated within the lifetime")
            .expect("channel open");
        // Judged against the certificate's own times (not against when this test got it, which
        // a loaded machine can delay): the lifetime is requested-at + 4 s, capped by notAfter,
        // and renewal comes at 50% +-5% of it, before expiry.
        let rotated_at = std::time::SystemTime::now();
        let requested_at = first.not_after - Duration::from_secs(4);
        let second = rx.borrow().clone().expect("new certificate");
        assert_ne!(second.serial, first.serial);
        assert!(
            rotated_at >= requested_at + Duration::from_millis(1700),
            "rotated too early: {:?} after the request",
            rotated_at.duration_since(requested_at)
        );
        assert!(rotated_at < first.not_after, "rotated only after expiry");
        assert_eq!(m.status()[0].fetches, 2);
        m.shutdown().await;
    }

    #[tokio::test]
    async fn failed_renewal_retries_with_backoff_and_keeps_the_old_certificate() {
        let ca = FakeCa::new();
        let m = CertManager::new(ca.clone(), Duration::from_secs(4));
        let a = id("a");
        m.set_identities([a.clone()]);
        let first = m.get(&a, WAIT).await.expect("first");
        ca.fail_next(2);
        // The first renewal attempt fails: the old certificate keeps serving.
        eventually(WAIT, "a failed renewal", || {
            m.status()[0].last_error.is_some()
        })
        .await;
        let failed_at = Instant::now();
        let st = m.status().remove(0);
        assert_eq!(st.state, "renewing");
        assert!(
            st.last_error
                .as_deref()
                .unwrap_or("")
                .contains("test CA is down"),
            "{st:?}"
        );
        assert_eq!(
            m.current(&a).map(|c| c.serial.clone()),
            Some(first.serial.clone())
        );
        assert!(m.all_ready());
        let got = m.get(&a, WAIT).await.expect("old certificate still served");
        assert_eq!(got.serial, first.serial);
        // Two retries (about 200 ms, then 400 ms) and the third call succeeds.
        eventually(WAIT, "a renewed certificate", || {
            m.current(&a).is_some_and(|c| c.serial != first.serial)
        })
        .await;
        let took = failed_at.elapsed();
        assert!(
            took >= Duration::from_millis(400) && took <= Duration::from_millis(5000),
            "recovered {took:?} after the first failure, expected about 600 ms of backoff"
        );
        assert_eq!(ca.calls(), 4);
        let st = m.status().remove(0);
        assert_eq!(st.state, "ready");
        assert!(st.last_error.is_none());
        m.shutdown().await;
    }

    #[tokio::test]
    async fn an_expired_certificate_is_dropped_not_served() {
        let ca = FakeCa::new();
        let m = CertManager::new(ca.clone(), Duration::from_secs(2));
        let a = id("a");
        m.set_identities([a.clone()]);
        let first = m.get(&a, WAIT).await.expect("first");
        ca.fail_next(u32::MAX);
        let mut rx = m.subscribe(&a).expect("local");
        tokio::time::timeout(Duration::from_secs(4), rx.wait_for(|c| c.is_none()))
            .await
            .expect("dropped once expired")
            .expect("channel open");
        assert!(SystemTime::now() >= first.not_after);
        assert!(m.current(&a).is_none());
        assert!(!m.all_ready());
        let st = m.status().remove(0);
        assert_eq!(st.state, "failing");
        assert!(st.serial.is_none());
        match m.get(&a, Duration::from_millis(50)).await {
            Err(Error::NotReady { last_error, .. }) => {
                assert!(last_error.contains("test CA is down"), "{last_error}")
            }
            other => panic!("expected NotReady, got {other:?}"),
        }
        // The CA comes back; the next retry (backoff at most ~2 s by now) recovers.
        ca.fail_next(0);
        let cert = m.get(&a, WAIT).await.expect("recovered");
        assert_ne!(cert.serial, first.serial);
        m.shutdown().await;
    }

    #[tokio::test]
    async fn removing_an_identity_drops_it() {
        let ca = FakeCa::new();
        let m = CertManager::new(ca.clone(), Duration::from_secs(3600));
        let (a, b) = (id("a"), id("b"));
        m.set_identities([a.clone(), b.clone()]);
        m.get(&a, WAIT).await.expect("a");
        m.get(&b, WAIT).await.expect("b");
        let rx = m.subscribe(&b).expect("b is local");
        m.set_identities([a.clone()]);
        assert!(matches!(m.get(&b, WAIT).await, Err(Error::NotLocal(_))));
        assert!(m.current(&b).is_none());
        assert!(m.subscribe(&b).is_none());
        assert!(rx.borrow().is_none(), "subscribers forget the certificate");
        let st = m.status();
        assert_eq!(st.len(), 1);
        assert_eq!(st[0].identity, a.to_string());
        assert!(m.current(&a).is_some());
        m.shutdown().await;
    }

    #[tokio::test]
    async fn get_waits_for_the_first_certificate() {
        let ca = FakeCa::new();
        ca.delay_ms.store(300, Ordering::SeqCst);
        let m = CertManager::new(ca.clone(), Duration::from_secs(3600));
        let (a, b) = (id("a"), id("b"));
        m.set_identities([a.clone(), b.clone()]);
        assert!(m.current(&a).is_none());
        assert!(!m.all_ready());
        assert_eq!(m.status()[0].state, "pending");
        match m.get(&b, Duration::from_millis(50)).await {
            Err(e @ Error::NotReady { .. }) => {
                assert!(
                    e.to_string()
                        .contains("waiting for the first answer from fake CA"),
                    "{e}"
                )
            }
            other => panic!("expected NotReady, got {other:?}"),
        }
        let started = Instant::now();
        let cert = m.get(&a, WAIT).await.expect("waited for it");
        assert_eq!(cert.identity, a);
        // Generous: it must not wait out WAIT; a loaded machine may still be slow.
        assert!(started.elapsed() < Duration::from_secs(3));
        m.shutdown().await;
    }

    #[tokio::test]
    async fn ca_down_at_start_is_reported_and_recovered() {
        let ca = FakeCa::new();
        ca.fail_next(u32::MAX);
        let m = CertManager::new(ca.clone(), Duration::from_secs(3600));
        let a = id("a");
        m.set_identities([a.clone()]);
        eventually(WAIT, "the failure in status", || {
            m.status()[0].last_error.is_some()
        })
        .await;
        let st = m.status().remove(0);
        assert_eq!(st.state, "failing");
        assert!(
            st.last_error
                .as_deref()
                .unwrap_or("")
                .contains("test CA is down"),
            "{st:?}"
        );
        assert_eq!(st.fetches, 0);
        assert!(!m.all_ready());
        ca.fail_next(0);
        let cert = m.get(&a, WAIT).await.expect("recovered");
        assert_eq!(cert.identity, a);
        assert!(m.all_ready());
        assert_eq!(m.status()[0].state, "ready");
        m.shutdown().await;
    }

    #[tokio::test]
    async fn rejects_a_certificate_for_another_key_or_identity() {
        let ca = BuiltinCa::generate("cluster.local").expect("ca");
        let a = id("a");
        let (key, _) = new_key_and_csr(&a).expect("csr");
        // Issued for `a`, but with a different key.
        let other_key = ca
            .issue_for_test(&a, Duration::from_secs(60))
            .expect("issue");
        let e = workload_cert(&a, &key, other_key.chain).expect_err("wrong key");
        assert!(matches!(e, ca::Error::BadResponse(_)), "{e}");
        assert!(e.to_string().contains("another public key"), "{e}");
        // Signed for `b` with our key.
        let (key_b, csr_b) = new_key_and_csr(&id("b")).expect("csr");
        let chain = ca
            .sign(&id("b"), &csr_b, Duration::from_secs(60))
            .await
            .expect("signed for b");
        let e = workload_cert(&a, &key_b, chain).expect_err("wrong identity");
        assert!(e.to_string().contains("URI SANs"), "{e}");
        let e = workload_cert(&a, &key, vec![]).expect_err("empty");
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn renewal_is_half_way_with_jitter() {
        let now = SystemTime::now();
        for _ in 0..100 {
            let cert = WorkloadCert {
                identity: id("a"),
                chain: vec![],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![])),
                serial: String::new(),
                // Backdated by 60 s like the built-in CA: the lifetime counts from `now`.
                not_before: now - Duration::from_secs(60),
                not_after: now + Duration::from_secs(100),
            };
            let at = renewal_time(&cert, now)
                .duration_since(now)
                .expect("in the future")
                .as_secs_f64();
            assert!((45.0..=55.0).contains(&at), "{at}");
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new();
        let delays: Vec<Duration> = (0..12).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(160) && delays[0] <= Duration::from_millis(240));
        assert!(delays[1] >= Duration::from_millis(320) && delays[1] <= Duration::from_millis(480));
        assert!(delays.iter().all(|d| *d <= BACKOFF_MAX));
        assert!(delays[11] >= BACKOFF_MAX.mul_f64(0.8));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(240));
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_735_689_599)),
            "2024-12-31T23:59:59Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(4_107_542_400)),
            "2100-03-01T00:00:00Z"
        );
    }
}
