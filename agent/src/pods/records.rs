//! Records of the pods the agent serves, saved beside the pinned capture state, so that the next
//! agent (a restart, an upgrade) knows what each pinned netns is before its sources have synced:
//! it serves those pods as they were instead of releasing them or turning them away
//! (`super::desired`). CNI pods exist nowhere else, so they are reloaded from here.
//!
//! One JSON file, `<stateDir>/pods.json`, written atomically (temp file, rename) whenever the
//! served set changes, read once at start. It carries the boot id: pinned state does not survive
//! a reboot, and netns cookies are reused across boots, so a file from another boot is ignored.
//! Every record is checked against the kernel before use: its netns must still exist and have
//! the cookie it was saved with.

use std::{
    collections::BTreeMap,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::desired::{Origin, Record};
use crate::{
    addrs::NetnsCookie,
    config::{NetnsRef, Pod},
    identity::Identity,
};

/// The file is ours, but it is read before anything else is known: bounded all the same.
const MAX_FILE_BYTES: u64 = 16 << 20;

const BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    boot_id: String,
    node: String,
    pods: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Entry {
    netns_cookie: NetnsCookie,
    origin: Origin,
    namespace: String,
    name: String,
    #[serde(default)]
    uid: Option<String>,
    service_account: String,
    ips: Vec<IpAddr>,
    netns: PathBuf,
    /// The pod's own DNS capture choice (its annotation), so an adopted pod keeps it while the
    /// API is away. Written only when set: an older agent's file reader still takes the rest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dns_capture: Option<bool>,
}

/// Where the records of an agent with state directory `state_dir` live.
pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("pods.json")
}

fn boot_id() -> String {
    std::fs::read_to_string(BOOT_ID)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The records saved by an earlier agent of `node` in this boot, by netns cookie. A missing
/// file is no records; an unreadable one, or one from another node or boot, is logged and
/// ignored (pinned state without a record is then held until every source has synced).
pub fn load(path: &Path, node: &str, trust_domain: &str) -> BTreeMap<NetnsCookie, Record> {
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return BTreeMap::new(),
        Ok(m) if m.len() > MAX_FILE_BYTES => {
            warn!(file = %path.display(), bytes = m.len(), "pod records too large; ignoring them");
            return BTreeMap::new();
        }
        _ => std::fs::read(path),
    };
    let file: File = match text
        .map_err(|e| e.to_string())
        .and_then(|t| serde_json::from_slice(&t).map_err(|e| format!("not a pod record file: {e}")))
    {
        Ok(f) => f,
        Err(e) => {
            warn!(file = %path.display(), error = %e, "cannot read the pod records; pinned pods without one are held until every source has synced");
            return BTreeMap::new();
        }
    };
    if file.node != node || file.boot_id != boot_id() {
        warn!(
            file = %path.display(),
            file_node = %file.node,
            "pod records are from another node or boot; ignoring them"
        );
        return BTreeMap::new();
    }
    let mut out = BTreeMap::new();
    for e in file
        .pods
        .into_iter()
        .take(usize::try_from(ambit_common::MAX_PODS).unwrap_or(4096))
    {
        let identity = match Identity::new(
            trust_domain,
            e.namespace.as_str(),
            e.service_account.as_str(),
        ) {
            Ok(i) => i,
            Err(err) => {
                warn!(pod = %format!("{}/{}", e.namespace, e.name), error = %err, "ignoring a pod record");
                continue;
            }
        };
        out.insert(
            e.netns_cookie,
            Record {
                origin: e.origin,
                pod: Pod {
                    namespace: e.namespace,
                    name: e.name,
                    uid: e.uid,
                    service_account: e.service_account,
                    ips: e.ips,
                    netns: NetnsRef::Path(e.netns),
                    enrolled: true,
                    identity,
                    services: Vec::new(),
                    waypoint: None,
                    dns_capture: e.dns_capture,
                },
            },
        );
    }
    out
}

/// Replaces the records with `records` (by netns cookie).
pub fn save(path: &Path, node: &str, records: &BTreeMap<NetnsCookie, Record>) -> io::Result<()> {
    let file = File {
        boot_id: boot_id(),
        node: node.to_owned(),
        pods: records
            .iter()
            .map(|(cookie, r)| Entry {
                netns_cookie: *cookie,
                origin: r.origin,
                namespace: r.pod.namespace.clone(),
                name: r.pod.name.clone(),
                uid: r.pod.uid.clone(),
                service_account: r.pod.service_account.clone(),
                ips: r.pod.ips.clone(),
                netns: r.pod.netns.path(),
                dns_capture: r.pod.dns_capture,
            })
            .collect(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(&file)?)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_other_boots_are_ignored() {
        let dir = std::env::temp_dir().join(format!(
            "ambit-records-{}-{:x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let file = path(&dir);
        let pod = Pod {
            namespace: "default".into(),
            name: "web".into(),
            uid: Some("u1".into()),
            service_account: "web".into(),
            ips: vec!["10.1.0.2".parse().expect("ip")],
            netns: NetnsRef::Path("/run/netns/web".into()),
            enrolled: true,
            identity: Identity::new("cluster.local", "default", "web").expect("identity"),
            services: Vec::new(),
            waypoint: None,
            // The annotation's choice survives a restart.
            dns_capture: Some(false),
        };
        let records: BTreeMap<NetnsCookie, Record> = [(
            NetnsCookie(42),
            Record {
                origin: Origin::Cni,
                pod,
            },
        )]
        .into();
        save(&file, "node-a", &records).expect("save");
        assert_eq!(load(&file, "node-a", "cluster.local"), records);
        assert!(
            load(&file, "node-b", "cluster.local").is_empty(),
            "another node's"
        );

        let mut v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&file).expect("read")).expect("json");
        v["bootId"] = "another-boot".into();
        std::fs::write(&file, v.to_string()).expect("write");
        assert!(
            load(&file, "node-a", "cluster.local").is_empty(),
            "another boot's"
        );

        std::fs::write(&file, "{not json").expect("write");
        assert!(load(&file, "node-a", "cluster.local").is_empty());
        assert!(load(&dir.join("missing.json"), "node-a", "cluster.local").is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
