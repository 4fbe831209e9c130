//! CNI calls, answered by the pod manager (which owns enrollment): a pod of an opted-in
//! namespace is enrolled before the ADD returns, so no container starts uncaptured.

use tracing::{error, info};

use super::PodManager;
use crate::config::{Config, Pod};

/// The CNI operation the plugin forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CniOp {
    Add,
    Del,
    Check,
}

/// A CNI call for the pod manager, which owns enrollment.
pub struct CniRequest {
    pub op: CniOp,
    pub pod: crate::api::CniPod,
    pub reply: tokio::sync::oneshot::Sender<Result<crate::api::CniAnswer, (u16, String)>>,
}

impl PodManager {
    /// Answers a CNI call: a pod of an opted-in namespace is enrolled before the answer.
    pub fn cni(
        &mut self,
        config: &Config,
        op: CniOp,
        pod: &crate::api::CniPod,
    ) -> Result<crate::api::CniAnswer, (u16, String)> {
        use crate::api::CniAnswer;
        let key = format!("{}/{}", pod.namespace, pod.name);
        let answer = |enrolled: bool, reason: String| Ok(CniAnswer { enrolled, reason });
        // The config's own entry decides for a pod it lists; otherwise the namespace label.
        let listed = config.pods.iter().find(|p| p.key() == key);
        let known = self
            .kube
            .as_ref()
            .and_then(|k| Some((k.clone(), k.pods.get(&key)?.clone())));
        // In Kubernetes mode the API decides (labels, service account): until the watch knows
        // the pod, the runtime is asked to retry rather than guess.
        if op == CniOp::Add && listed.is_none() && known.is_none() && self.kube_client.is_some() {
            let why = if self.kube.as_ref().is_some_and(|k| k.synced) {
                format!("pod {key} is not known from the Kubernetes API yet")
            } else {
                "the agent has not synced with the Kubernetes API yet".to_owned()
            };
            return Err((503, format!("{why}; retry")));
        }
        if op == CniOp::Add {
            self.cni_deleted.remove(&key);
        }
        let opted_in = match (listed, &known) {
            (Some(p), _) => p.enrolled,
            (None, Some((kube, kp))) => kube.enrolls(kp),
            (None, None) => {
                config.ambient_namespaces.contains(&pod.namespace)
                    || self
                        .kube
                        .as_ref()
                        .is_some_and(|k| k.namespace_ambient(&pod.namespace))
            }
        };
        let why_not = || match listed {
            Some(_) => format!("pod {key} is configured not to be enrolled"),
            None => format!(
                "namespace {} is not labelled {}=ambient",
                pod.namespace,
                crate::config::DATAPLANE_MODE_LABEL
            ),
        };
        match op {
            CniOp::Del => {
                let from_api = known.is_some();
                if from_api {
                    self.cni_deleted.insert(key.clone());
                }
                if (self.cni_pods.remove(&key).is_some() || from_api)
                    && let Err(e) = self.apply(config)
                {
                    error!(pod = %key, error = %e, "releasing a pod on CNI DEL failed");
                }
                answer(false, format!("pod {key} released"))
            }
            CniOp::Check => match (opted_in, self.active.contains_key(&key)) {
                (true, true) => answer(true, format!("pod {key} is enrolled")),
                (true, false) => Err((
                    409,
                    format!(
                        "pod {key} should be enrolled and is not{}",
                        self.failed
                            .get(&key)
                            .map(|e| format!(": {e}"))
                            .unwrap_or_default()
                    ),
                )),
                (false, _) => answer(false, why_not()),
            },
            CniOp::Add if !opted_in => answer(false, why_not()),
            CniOp::Add => {
                if listed.is_none() {
                    let ips = pod
                        .ips
                        .iter()
                        .map(|ip| ip.parse::<std::net::IpAddr>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| (400, format!("invalid pod IP in {:?}: {e}", pod.ips)))?;
                    if pod.netns.is_empty() {
                        return Err((400, "ADD without a netns path".to_owned()));
                    }
                    // The service account comes from the Kubernetes API in Kubernetes mode;
                    // standalone, the CNI call does not carry it.
                    let service_account = known
                        .as_ref()
                        .map_or("default", |(_, kp)| kp.service_account.as_str())
                        .to_owned();
                    let identity = crate::identity::Identity::new(
                        config.trust_domain.clone(),
                        pod.namespace.clone(),
                        service_account.clone(),
                    )
                    .map_err(|e| (400, e.to_string()))?;
                    self.cni_pods.insert(
                        key.clone(),
                        Pod {
                            namespace: pod.namespace.clone(),
                            name: pod.name.clone(),
                            uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
                            service_account,
                            ips,
                            netns: crate::config::NetnsRef::Path(pod.netns.clone().into()),
                            enrolled: true,
                            identity,
                            services: Vec::new(),
                            waypoint: None,
                            dns_capture: None,
                        },
                    );
                }
                // A pod re-added with a new sandbox replaces its old entry.
                self.unenroll_if_changed(&key);
                if let Err(e) = self.apply(config) {
                    error!(pod = %key, error = %e, "applying a CNI pod failed");
                }
                if self.active.contains_key(&key) {
                    info!(pod = %key, "pod enrolled at CNI ADD");
                    answer(true, format!("pod {key} enrolled"))
                } else {
                    let error = self
                        .failed
                        .get(&key)
                        .cloned()
                        .unwrap_or_else(|| "not enrolled".to_owned());
                    // Not kept: the runtime retries the ADD, with a netns that works.
                    self.cni_pods.remove(&key);
                    self.failed.remove(&key);
                    Err((503, format!("cannot enroll pod {key}: {error}")))
                }
            }
        }
    }

    /// Drops an active pod whose CNI entry has another netns (a new sandbox for the same pod;
    /// the old one is being torn down). Other changes are applied in place.
    fn unenroll_if_changed(&mut self, key: &str) {
        let changed = match (self.active.get(key), self.cni_pods.get(key)) {
            (Some(a), Some(p)) => a.pod.netns.path() != p.netns.path(),
            _ => false,
        };
        if changed {
            self.unenroll(key);
        }
    }
}
