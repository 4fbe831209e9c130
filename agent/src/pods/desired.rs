//! The enrollment decision: which local pods the agent serves, merged from every source that can
//! claim one (the config file, the Kubernetes API, the CNI plugin), and what becomes of capture
//! state an earlier agent left pinned. No IO: the caller finds pods' netns, checks the records
//! saved beside the pinned state against the kernel, and applies the result
//! ([`super::PodManager`]).
//!
//! Fail closed across restarts and upgrades: a pinned netns stays captured until every source
//! that could claim it has synced and none does. Until then, one whose saved record still matches
//! its netns is served as it was (same pod, same identity), so the pod keeps working while the API
//! server is away; one without a usable record stays captured and unserved (its new connections
//! are refused, its inbound plaintext dropped), never released into plaintext.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use crate::{
    addrs::NetnsCookie,
    config::{Config, NetnsRef, Pod},
    identity::Identity,
    kube::KubeState,
};

/// The source that claims a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Origin {
    Config,
    Kubernetes,
    Cni,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Kubernetes => "kubernetes",
            Origin::Cni => "cni",
        }
    }
}

/// A pod the agent served, as saved beside the pinned state (see `super::records`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The source that claimed it when it was saved.
    pub origin: Origin,
    pub pod: Pod,
}

/// What is known of a netns found enrolled in the pinned maps when the agent started.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pinned {
    /// Its record's netns still exists and has this cookie: it is the pod the record describes.
    Live(Box<Record>),
    /// Its record's netns is gone, or is another netns now: nothing is left to protect.
    Gone,
    /// No record (an agent that kept none, a lost file): what it is stays unknown until every
    /// source has synced.
    Unknown,
}

/// Everything the decision reads.
pub struct Inputs<'a> {
    pub config: &'a Config,
    /// Whether the Kubernetes API is a source (Kubernetes mode).
    pub kube_mode: bool,
    /// What the Kubernetes watches published last (`None`: nothing yet). Used only once both
    /// lists have arrived ([`KubeState::synced`]): a half-listed cluster claims nothing.
    pub kube: Option<&'a KubeState>,
    /// Pods the CNI plugin announced (after a restart: reloaded from the records).
    pub cni: &'a BTreeMap<String, Pod>,
    /// Kubernetes pods a CNI DEL released, kept out until the API drops them too.
    pub cni_deleted: &'a BTreeSet<String>,
    /// Capture state the agent found pinned at start and has not resolved yet, by netns cookie.
    pub pinned: &'a BTreeMap<NetnsCookie, Pinned>,
}

/// The decision.
#[derive(Debug)]
pub struct Desired {
    /// The config with every local pod the agent should know: the config's own, Kubernetes',
    /// the CNI plugin's and the adopted ones (enrolled or not), and the ambient namespaces the API
    /// reports.
    pub config: Config,
    /// The source of each pod of `config.pods` (adopted pods: the source of their record).
    pub origins: BTreeMap<String, Origin>,
    /// Pods served from an earlier agent's record because their source has not synced yet.
    pub adopted: BTreeSet<String>,
    /// Pods that should be enrolled and cannot be yet, with why.
    pub missing: Vec<(String, String)>,
    /// Pinned netns cookies to keep captured even if no pod is served in them: claimed by a pod
    /// (kept if its enrollment fails), adopted, or unknown while a source has not synced. Every
    /// other pinned cookie that no served pod holds is released.
    pub keep_pinned: BTreeSet<NetnsCookie>,
    /// Pinned netns kept captured without being served (no usable record), by cookie.
    pub held: BTreeSet<NetnsCookie>,
    /// The source that has not synced yet, if one has not: until it has, nothing pinned is
    /// released.
    pub waiting_for: Option<&'static str>,
}

/// Decides the pods to serve. `find_netns` locates the netns holding a pod IP (Kubernetes pods
/// that are neither announced by the CNI plugin nor adopted; the caller scans the node).
pub fn desired(
    inputs: &Inputs<'_>,
    find_netns: &mut dyn FnMut(IpAddr) -> Option<PathBuf>,
) -> Desired {
    let config = inputs.config;
    let kube = inputs.kube.filter(|k| k.synced);
    let waiting_for = (inputs.kube_mode && kube.is_none()).then_some("kubernetes");
    let mut c = config.clone();
    let mut origins: BTreeMap<String, Origin> =
        c.pods.iter().map(|p| (p.key(), Origin::Config)).collect();
    let mut missing = Vec::new();
    let live_record = |key: &str, uid: &str| {
        inputs.pinned.values().find_map(|p| match p {
            Pinned::Live(r)
                if r.pod.key() == key && r.pod.uid.as_deref().is_none_or(|u| u == uid) =>
            {
                Some(r.pod.netns.path())
            }
            _ => None,
        })
    };

    if let Some(kube) = kube {
        c.ambient_namespaces.extend(
            kube.namespaces
                .keys()
                .filter(|ns| kube.namespace_ambient(ns))
                .cloned(),
        );
        for (key, kp) in &kube.pods {
            if kp.ips.is_empty()
                || kp.host_network
                || kp.finished
                || inputs.cni_deleted.contains(key)
                || origins.contains_key(key)
            {
                continue;
            }
            let enrolled = kube.enrolls(kp);
            // Only pods to capture need their netns; the others are listed without one. The
            // CNI plugin's path first, then the one an earlier agent served, then a scan.
            let netns = match inputs.cni.get(key) {
                Some(p) => Some(p.netns.path()),
                None if enrolled => live_record(key, &kp.uid).or_else(|| find_netns(kp.ips[0])),
                None => Some(PathBuf::new()),
            };
            let Some(netns) = netns else {
                missing.push((
                    key.clone(),
                    format!(
                        "no network namespace on this node holds the pod's IP {}",
                        kp.ips[0]
                    ),
                ));
                continue;
            };
            let identity = match Identity::new(
                c.trust_domain.clone(),
                kp.namespace.clone(),
                kp.service_account.clone(),
            ) {
                Ok(i) => i,
                Err(e) => {
                    missing.push((key.clone(), e.to_string()));
                    continue;
                }
            };
            c.pods.push(Pod {
                namespace: kp.namespace.clone(),
                name: kp.name.clone(),
                uid: Some(kp.uid.clone()),
                service_account: kp.service_account.clone(),
                ips: kp.ips.clone(),
                netns: NetnsRef::Path(netns),
                enrolled,
                identity,
                services: Vec::new(),
                waypoint: None,
                dns_capture: match kp.annotations.get(crate::config::DNS_CAPTURE_ANNOTATION) {
                    Some(v) if v == "true" => Some(true),
                    Some(v) if v == "false" => Some(false),
                    _ => None,
                },
            });
            origins.insert(key.clone(), Origin::Kubernetes);
        }
    }
    for (key, pod) in inputs.cni {
        if !origins.contains_key(key) {
            c.pods.push(pod.clone());
            origins.insert(key.clone(), Origin::Cni);
        }
    }

    let mut keep_pinned = BTreeSet::new();
    let mut held = BTreeSet::new();
    let mut adopted = BTreeSet::new();
    for (cookie, pinned) in inputs.pinned {
        match pinned {
            Pinned::Gone => {}
            Pinned::Unknown => {
                if waiting_for.is_some() {
                    keep_pinned.insert(*cookie);
                    held.insert(*cookie);
                }
            }
            Pinned::Live(record) => {
                let key = record.pod.key();
                let path = record.pod.netns.path();
                let claimed = c
                    .pods
                    .iter()
                    .any(|p| p.enrolled && p.key() == key && p.netns.path() == path);
                if claimed {
                    keep_pinned.insert(*cookie);
                } else if waiting_for.is_some() {
                    keep_pinned.insert(*cookie);
                    if origins.contains_key(&key) {
                        // A pod of that name is known with another netns: keep this one
                        // captured, but there is no pod to serve in it.
                        held.insert(*cookie);
                    } else {
                        let mut pod = record.pod.clone();
                        pod.enrolled = true;
                        c.pods.push(pod);
                        origins.insert(key.clone(), record.origin);
                        adopted.insert(key);
                    }
                }
            }
        }
    }
    Desired {
        config: c,
        origins,
        adopted,
        missing,
        keep_pinned,
        held,
        waiting_for,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cookies<const N: usize>(ns: [u64; N]) -> BTreeSet<NetnsCookie> {
        ns.into_iter().map(NetnsCookie).collect()
    }
    use crate::kube::KubePod;

    const CONFIG: &str = "node: node-a\ncgroup: /x\n";

    fn config(extra: &str) -> Config {
        Config::parse(&format!("{CONFIG}{extra}"), std::path::Path::new("t.yaml")).expect("config")
    }

    fn pod(namespace: &str, name: &str, ip: &str, netns: &str) -> Pod {
        Pod {
            namespace: namespace.into(),
            name: name.into(),
            uid: Some(format!("uid-{name}")),
            service_account: name.into(),
            ips: vec![ip.parse().expect("ip")],
            netns: NetnsRef::Path(netns.into()),
            enrolled: true,
            identity: Identity::new("cluster.local", namespace, name).expect("identity"),
            services: Vec::new(),
            waypoint: None,
            dns_capture: None,
        }
    }

    fn kube_pod(namespace: &str, name: &str, ip: &str) -> KubePod {
        KubePod {
            namespace: namespace.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            service_account: name.into(),
            labels: Default::default(),
            annotations: Default::default(),
            ips: vec![ip.parse().expect("ip")],
            host_network: false,
            finished: false,
        }
    }

    fn kube(synced: bool, ambient: &[&str], pods: &[KubePod]) -> KubeState {
        let mut namespaces = BTreeMap::new();
        for ns in ["default", "other"] {
            let mut labels = BTreeMap::new();
            if ambient.contains(&ns) {
                labels.insert(
                    crate::config::DATAPLANE_MODE_LABEL.to_owned(),
                    "ambient".to_owned(),
                );
            }
            namespaces.insert(ns.to_owned(), labels);
        }
        KubeState {
            namespaces,
            pods: pods.iter().map(|p| (p.key(), p.clone())).collect(),
            synced,
            unreadable: Vec::new(),
        }
    }

    fn live(origin: Origin, pod: Pod) -> Pinned {
        Pinned::Live(Box::new(Record { origin, pod }))
    }

    struct Case {
        config: Config,
        kube_mode: bool,
        kube: Option<KubeState>,
        cni: BTreeMap<String, Pod>,
        pinned: BTreeMap<NetnsCookie, Pinned>,
    }

    impl Case {
        fn new() -> Case {
            Case {
                config: config(""),
                kube_mode: false,
                kube: None,
                cni: BTreeMap::new(),
                pinned: BTreeMap::new(),
            }
        }

        fn run(&self) -> Desired {
            let none = BTreeSet::new();
            desired(
                &Inputs {
                    config: &self.config,
                    kube_mode: self.kube_mode,
                    kube: self.kube.as_ref(),
                    cni: &self.cni,
                    cni_deleted: &none,
                    pinned: &self.pinned,
                },
                &mut |ip| Some(format!("/proc/found-{ip}/ns/net").into()),
            )
        }
    }

    fn enrolled(d: &Desired) -> Vec<String> {
        d.config.enrolled_pods().map(Pod::key).collect()
    }

    #[test]
    fn the_dns_capture_annotation_overrides_the_node_default_per_pod() {
        let mut case = Case::new();
        case.kube_mode = true;
        let with = |name: &str, ip: &str, value: Option<&str>| {
            let mut p = kube_pod("default", name, ip);
            if let Some(v) = value {
                p.annotations.insert(
                    crate::config::DNS_CAPTURE_ANNOTATION.to_owned(),
                    v.to_owned(),
                );
            }
            p
        };
        case.kube = Some(kube(
            true,
            &["default"],
            &[
                with("on", "10.1.0.2", Some("true")),
                with("off", "10.1.0.3", Some("false")),
                with("unset", "10.1.0.4", None),
                with("odd", "10.1.0.5", Some("yes")),
            ],
        ));
        let d = case.run();
        let capture = |name: &str| {
            d.config
                .pods
                .iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("{name}"))
                .dns_capture
        };
        assert_eq!(capture("on"), Some(true));
        assert_eq!(capture("off"), Some(false));
        assert_eq!(capture("unset"), None, "the node's dns.capture decides");
        assert_eq!(capture("odd"), None, "only true and false override");
    }

    #[test]
    fn before_the_kubernetes_list_pinned_pods_are_served_from_their_records_not_released() {
        let mut case = Case::new();
        case.kube_mode = true;
        case.pinned.insert(
            NetnsCookie(7),
            live(
                Origin::Kubernetes,
                pod("default", "web", "10.1.0.2", "/run/netns/web"),
            ),
        );
        case.pinned.insert(NetnsCookie(8), Pinned::Unknown);
        case.pinned.insert(NetnsCookie(9), Pinned::Gone);
        for kube in [None, Some(kube(false, &["default"], &[]))] {
            case.kube = kube;
            let d = case.run();
            assert_eq!(d.waiting_for, Some("kubernetes"));
            assert_eq!(enrolled(&d), ["default/web"], "served as the record says");
            assert!(d.adopted.contains("default/web"));
            assert_eq!(d.origins["default/web"], Origin::Kubernetes);
            assert_eq!(
                d.keep_pinned,
                cookies([7, 8]),
                "unknown kept, gone released"
            );
            assert_eq!(d.held, cookies([8]), "nothing to serve in the unknown one");
        }
    }

    #[test]
    fn once_the_list_is_in_claimed_pods_stay_and_the_rest_are_released() {
        let mut case = Case::new();
        case.kube_mode = true;
        let web = pod("default", "web", "10.1.0.2", "/run/netns/web");
        let gone = pod("default", "deleted", "10.1.0.3", "/run/netns/deleted");
        let opted_out = pod("other", "db", "10.1.0.4", "/run/netns/db");
        case.pinned
            .insert(NetnsCookie(7), live(Origin::Kubernetes, web.clone()));
        case.pinned
            .insert(NetnsCookie(8), live(Origin::Kubernetes, gone));
        case.pinned
            .insert(NetnsCookie(9), live(Origin::Kubernetes, opted_out));
        case.pinned.insert(NetnsCookie(10), Pinned::Unknown);
        case.kube = Some(kube(
            true,
            &["default"],
            &[
                kube_pod("default", "web", "10.1.0.2"),
                kube_pod("other", "db", "10.1.0.4"),
            ],
        ));
        let d = case.run();
        assert_eq!(d.waiting_for, None);
        assert_eq!(enrolled(&d), ["default/web"]);
        let served = d
            .config
            .pods
            .iter()
            .find(|p| p.key() == "default/web")
            .expect("web");
        assert_eq!(
            served.netns.path(),
            web.netns.path(),
            "the netns the earlier agent served, not a scan"
        );
        assert_eq!(*served, web, "the same pod: no re-enrollment");
        assert!(d.adopted.is_empty());
        assert_eq!(
            d.keep_pinned,
            cookies([7]),
            "deleted, opted out and unknown released"
        );
        assert!(d.held.is_empty());
        assert!(
            d.config
                .pods
                .iter()
                .any(|p| p.key() == "other/db" && !p.enrolled),
            "the opted-out pod is still a local workload"
        );
    }

    #[test]
    fn standalone_has_nothing_to_wait_for() {
        let mut case = Case::new();
        case.config = config(
            "pods:\n- {namespace: default, name: web, ips: [10.1.0.2], netns: /run/netns/web, enrolled: true}\n",
        );
        case.pinned.insert(
            NetnsCookie(7),
            live(
                Origin::Config,
                pod("default", "old", "10.1.0.9", "/run/netns/old"),
            ),
        );
        case.pinned.insert(NetnsCookie(8), Pinned::Unknown);
        let d = case.run();
        assert_eq!(d.waiting_for, None);
        assert_eq!(enrolled(&d), ["default/web"]);
        assert!(d.keep_pinned.is_empty(), "the config is the only source");
    }

    #[test]
    fn cni_pods_reloaded_from_records_are_claimed_at_once() {
        let mut case = Case::new();
        let web = pod("default", "web", "10.1.0.2", "/run/netns/cni-1");
        case.cni.insert(web.key(), web.clone());
        case.pinned.insert(NetnsCookie(7), live(Origin::Cni, web));
        let d = case.run();
        assert_eq!(enrolled(&d), ["default/web"]);
        assert_eq!(d.origins["default/web"], Origin::Cni);
        assert_eq!(d.keep_pinned, cookies([7]));
        assert!(d.adopted.is_empty());
    }

    #[test]
    fn a_kubernetes_pod_uses_the_cni_netns_then_the_record_then_a_scan() {
        let mut case = Case::new();
        case.kube_mode = true;
        case.kube = Some(kube(
            true,
            &["default"],
            &[
                kube_pod("default", "a", "10.1.0.2"),
                kube_pod("default", "b", "10.1.0.3"),
                kube_pod("default", "c", "10.1.0.4"),
            ],
        ));
        let a = pod("default", "a", "10.1.0.2", "/run/netns/cni-a");
        case.cni.insert(a.key(), a);
        case.pinned.insert(
            NetnsCookie(7),
            live(
                Origin::Kubernetes,
                pod("default", "b", "10.1.0.3", "/proc/42/ns/net"),
            ),
        );
        let d = case.run();
        let netns = |key: &str| {
            d.config
                .pods
                .iter()
                .find(|p| p.key() == key)
                .map(|p| p.netns.path())
                .expect("pod")
        };
        assert_eq!(netns("default/a"), PathBuf::from("/run/netns/cni-a"));
        assert_eq!(netns("default/b"), PathBuf::from("/proc/42/ns/net"));
        assert_eq!(
            netns("default/c"),
            PathBuf::from("/proc/found-10.1.0.4/ns/net")
        );
        assert_eq!(d.origins["default/a"], Origin::Kubernetes);
    }

    #[test]
    fn a_recreated_pod_is_not_confused_with_its_predecessor() {
        let mut case = Case::new();
        case.kube_mode = true;
        // Same name, another uid: the record's netns is the old sandbox.
        let mut old = pod("default", "web", "10.1.0.2", "/proc/42/ns/net");
        old.uid = Some("uid-old".into());
        case.pinned
            .insert(NetnsCookie(7), live(Origin::Kubernetes, old.clone()));
        case.kube = Some(kube(
            true,
            &["default"],
            &[kube_pod("default", "web", "10.1.0.2")],
        ));
        let d = case.run();
        let web = d
            .config
            .pods
            .iter()
            .find(|p| p.key() == "default/web")
            .expect("web");
        assert_eq!(
            web.netns.path(),
            PathBuf::from("/proc/found-10.1.0.2/ns/net")
        );
        assert!(d.keep_pinned.is_empty(), "the old sandbox is released");

        // Before the list: a config pod of the same name in another netns keeps the old one
        // captured but does not serve it.
        case.kube = None;
        case.config = config(
            "pods:\n- {namespace: default, name: web, ips: [10.1.0.2], netns: /run/netns/web, enrolled: true}\n",
        );
        let d = case.run();
        assert_eq!(d.keep_pinned, cookies([7]));
        assert_eq!(d.held, cookies([7]));
        assert!(d.adopted.is_empty());
    }

    #[test]
    fn a_pod_opted_out_by_a_synced_source_is_released() {
        let mut case = Case::new();
        case.kube_mode = true;
        let web = pod("default", "web", "10.1.0.2", "/run/netns/web");
        case.pinned
            .insert(NetnsCookie(7), live(Origin::Kubernetes, web));
        let mut kp = kube_pod("default", "web", "10.1.0.2");
        kp.labels.insert(
            crate::config::DATAPLANE_MODE_LABEL.to_owned(),
            "none".to_owned(),
        );
        case.kube = Some(kube(true, &["default"], &[kp]));
        let d = case.run();
        assert!(enrolled(&d).is_empty());
        assert!(d.keep_pinned.is_empty());
    }
}
