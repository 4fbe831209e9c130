//! Wiring: load the config, load and attach the capture programs, enroll the configured pods, then
//! follow config changes until SIGTERM, and drain.
//!
//! One control task owns the capture state ([`Redirect`]) and the set of served pods; it is the
//! only writer. Connection handlers only read (the original-destination map, their pod's netns).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    config::{Config, Pod},
    proxy::{self, PodInfo, PodListeners, ProxyContext},
    redirect::{self, CaptureOptions, Netns, Redirect, routing},
};

/// How often the config file is checked for changes (SIGHUP applies at once).
const CONFIG_POLL: Duration = Duration::from_secs(1);

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(config_path: PathBuf, ebpf_log_level: u8) -> anyhow::Result<()> {
    let config = Config::load(&config_path)?;
    info!(node = %config.node, config = %config_path.display(), "starting ambit-agent");

    let (redirect, orig_dst, logger) =
        Redirect::load(&config.bpf_pin_path, &config.cgroup, ebpf_log_level)?;
    // SAFETY: the logger owns the ring buffer's fd, which stays open and unchanged for as long
    // as the AsyncFd owns the logger.
    #[allow(unsafe_code)]
    let bpf_logs =
        unsafe { AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the eBPF log ring buffer: {e}"))?;
    let control_tasks = TaskTracker::new();
    let shutdown = CancellationToken::new();
    control_tasks.spawn(forward_bpf_logs(bpf_logs, shutdown.clone()));

    let ctx = Arc::new(ProxyContext {
        orig_dst,
        connections: TaskTracker::new(),
    });
    let mut pods = PodManager {
        redirect,
        ctx: ctx.clone(),
        active: BTreeMap::new(),
        failed: BTreeMap::new(),
        listeners: TaskTracker::new(),
        next_pod_id: 1,
    };
    pods.apply(&config)?;
    info!(node = %config.node, pods = pods.active.len(), "agent ready");

    let mut config = config;
    let mut last_text = std::fs::read(&config_path).ok();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(CONFIG_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let forced = tokio::select! {
            _ = hup.recv() => true,
            _ = tick.tick() => false,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let text = std::fs::read(&config_path).ok();
        if forced || text != last_text {
            last_text = text;
            match reload(&config, &config_path) {
                Ok(new) => {
                    config = new;
                    if let Err(e) = pods.apply(&config) {
                        error!(error = %e, "applying the new config failed");
                    }
                    info!(pods = pods.active.len(), "config applied");
                }
                Err(e) => error!(error = %e, "config reload refused; keeping the previous config"),
            }
        } else if !pods.failed.is_empty() {
            // Pods whose netns was not ready yet: try again.
            if let Err(e) = pods.apply(&config) {
                error!(error = %e, "retrying enrollment failed");
            }
        }
    }

    info!(
        drain_timeout_s = config.drain_timeout.as_secs_f64(),
        "shutting down: no longer accepting; draining open connections"
    );
    let counters = pods.redirect.counters();
    pods.stop_listening().await;
    ctx.connections.close();
    if tokio::time::timeout(config.drain_timeout, ctx.connections.wait())
        .await
        .is_err()
    {
        warn!(
            open = ctx.connections.len(),
            "drain timeout reached; closing the remaining connections"
        );
    }
    shutdown.cancel();
    control_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(1), control_tasks.wait()).await;
    info!(
        ?counters,
        pin_path = %config.bpf_pin_path.display(),
        "agent stopped; enrolled pods stay captured and their new connections are refused until \
         an agent runs again (`ambit-agent cleanup` releases them)"
    );
    Ok(())
}

fn reload(old: &Config, path: &Path) -> anyhow::Result<Config> {
    let new = Config::load(path)?;
    for (field, changed) in [
        ("node", new.node != old.node),
        ("cgroup", new.cgroup != old.cgroup),
        ("bpfPinPath", new.bpf_pin_path != old.bpf_pin_path),
    ] {
        if changed {
            anyhow::bail!(
                "{field} cannot change while the agent runs; restart the agent to change it"
            );
        }
    }
    Ok(new)
}

async fn forward_bpf_logs(
    mut logs: AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>,
    shutdown: CancellationToken,
) {
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            g = logs.readable_mut() => match g {
                Ok(g) => g,
                Err(e) => {
                    warn!(error = %e, "eBPF log ring buffer unreadable; eBPF logs stop here");
                    return;
                }
            },
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}

/// A pod the agent is serving.
struct ActivePod {
    pod: Pod,
    info: Arc<PodInfo>,
    cancel: CancellationToken,
}

/// Keeps the served pods equal to the enrolled pods of the config.
struct PodManager {
    redirect: Redirect,
    ctx: Arc<ProxyContext>,
    active: BTreeMap<String, ActivePod>,
    /// Pods that could not be enrolled, with the last error (retried on every tick).
    failed: BTreeMap<String, String>,
    listeners: TaskTracker,
    next_pod_id: u32,
}

impl PodManager {
    fn apply(&mut self, config: &Config) -> anyhow::Result<()> {
        self.redirect
            .set_options(&CaptureOptions {
                node_addresses: &config.node_addresses,
                inbound_excluded_ports: &config.inbound_excluded_ports,
                outbound_excluded_ports: &config.outbound_excluded_ports,
            })
            .context("cannot write capture options to the eBPF maps")?;

        let desired: BTreeMap<String, &Pod> =
            config.enrolled_pods().map(|p| (p.key(), p)).collect();
        let stale: Vec<String> = self
            .active
            .iter()
            .filter(|(k, a)| desired.get(*k).is_none_or(|p| **p != a.pod))
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            self.unenroll(&key);
        }
        self.failed.retain(|k, _| desired.contains_key(k));
        for (key, pod) in desired {
            if self.active.contains_key(&key) {
                continue;
            }
            match self.enroll(pod) {
                Ok(()) => {
                    self.failed.remove(&key);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failed.get(&key) != Some(&msg) {
                        error!(pod = %key, error = %msg, "cannot enroll pod; will retry");
                    }
                    self.failed.insert(key, msg);
                }
            }
        }
        let keep: Vec<u64> = self
            .active
            .values()
            .map(|a| a.info.netns.cookie())
            .collect();
        let pruned = self.redirect.prune(&keep)?;
        if !pruned.is_empty() {
            info!(?pruned, "released netns left enrolled by an earlier agent");
        }
        Ok(())
    }

    fn enroll(&mut self, pod: &Pod) -> anyhow::Result<()> {
        let key = pod.key();
        let netns = Netns::open(&pod.netns.path())?;
        if let Some(other) = self
            .active
            .values()
            .find(|a| a.info.netns.cookie() == netns.cookie())
        {
            anyhow::bail!(
                "netns {} is already used by pod {}; each pod needs its own network namespace",
                pod.netns,
                other.pod.key()
            );
        }
        let listeners = netns.run(|| -> anyhow::Result<PodListeners> {
            routing::install()
                .context("cannot set up the pod's return route for transparent connections")?;
            Ok(PodListeners::bind()?)
        })??;
        let pod_id = self.next_pod_id;
        self.next_pod_id += 1;
        self.redirect
            .enroll(&netns, pod_id, &pod.ips, &listeners.inbound)
            .context("cannot register the pod with the eBPF programs")?;
        let cookie = netns.cookie();
        let info = Arc::new(PodInfo {
            key: key.clone(),
            service_account: pod.service_account.clone(),
            ips: pod.ips.clone(),
            netns,
        });
        let cancel = CancellationToken::new();
        if let Err(e) = proxy::serve_pod(
            self.ctx.clone(),
            info.clone(),
            listeners,
            cancel.clone(),
            &self.listeners,
        ) {
            let _ = self.redirect.unenroll(cookie, &pod.ips);
            return Err(e).context("cannot serve the pod's listeners");
        }
        info!(pod = %key, netns_cookie = cookie, ips = ?pod.ips, "pod enrolled");
        self.active.insert(
            key,
            ActivePod {
                pod: pod.clone(),
                info,
                cancel,
            },
        );
        Ok(())
    }

    /// Capture off first, then the listeners close; open connections finish on their own.
    fn unenroll(&mut self, key: &str) {
        let Some(active) = self.active.remove(key) else {
            return;
        };
        if let Err(e) = self
            .redirect
            .unenroll(active.info.netns.cookie(), &active.pod.ips)
        {
            error!(pod = %key, error = %e, "releasing the pod from capture failed");
        }
        active.cancel.cancel();
        info!(pod = %key, "pod unenrolled; its traffic flows directly again");
    }

    async fn stop_listening(&mut self) {
        for a in self.active.values() {
            a.cancel.cancel();
        }
        self.listeners.close();
        self.listeners.wait().await;
    }
}

/// `ambit-agent cleanup`: removes this node's pinned eBPF state and the pods' return routes.
pub fn cleanup(config_path: &Path) -> anyhow::Result<()> {
    let config = Config::load(config_path)?;
    let removed = redirect::cleanup(&config.bpf_pin_path)?;
    for pod in &config.pods {
        let result = Netns::open(&pod.netns.path())
            .map_err(anyhow::Error::from)
            .and_then(|ns| Ok(ns.run(routing::remove)??));
        if let Err(e) = result {
            warn!(pod = %pod.key(), error = %e, "could not remove the pod's return route");
        }
    }
    info!(
        removed,
        pin_path = %config.bpf_pin_path.display(),
        "eBPF capture state removed; pods of this node are no longer captured"
    );
    Ok(())
}
