//! The capture layer's pinned state read from bpffs by path: what `GET /bpf` serves and what
//! `ambitctl bpf --offline` shows when the agent is down (the moment pods fail closed). Reads
//! only; needs no handle from a running agent.

use std::{collections::BTreeMap, path::Path};

use ambit_common::{self as common, Addr, Counter, EnrolledPod, IpKey, SocketKey};
use aya::maps::{HashMap, Map, MapData, PerCpuArray, SockHash};

use crate::api::{BpfEnrolledView, BpfMapView, BpfProgramView, BpfView};

/// Reads the state pinned under `pin_path`. Pods are not named (the caller knows them by
/// cookie); `cgroup` is what the caller says the cgroup programs are attached to.
pub fn inspect(pin_path: &Path, cgroup: &str) -> Result<BpfView, String> {
    let open = |name: &str| {
        let path = pin_path.join(name);
        MapData::from_pin(&path).map_err(|e| {
            format!(
                "cannot open pinned map {}: {e} (is the agent installed with this pin path, and \
                 are you root?)",
                path.display()
            )
        })
    };
    let enrolled: HashMap<MapData, u64, EnrolledPod> =
        HashMap::try_from(Map::HashMap(open(common::MAP_ENROLLED)?)).map_err(|e| e.to_string())?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(common::MAP_COUNTERS)?))
            .map_err(|e| e.to_string())?;

    let mut pods: Vec<(u64, u32)> = enrolled
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, pod)| (cookie, pod.pod_id))
        .collect();
    pods.sort_unstable();
    let pod_links: Vec<u64> = list(&pin_path.join("pods"))
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();

    let mut programs: Vec<BpfProgramView> = list(&pin_path.join("links"))
        .into_iter()
        .map(|name| BpfProgramView {
            kind: program_kind(&name),
            attached_to: vec![match name.as_str() {
                common::program::PROBE_CONNECT4 | common::program::PROBE_CONNECT6 => {
                    "the kubelet's cgroup (probes.kubeletCgroup)".to_owned()
                }
                common::program::BIND_GUARD4 | common::program::BIND_GUARD6 => {
                    "the host's cgroup (probes.hostCgroup)".to_owned()
                }
                _ => format!("cgroup {cgroup}"),
            }],
            name,
        })
        .collect();
    programs.push(BpfProgramView {
        name: common::program::SK_LOOKUP.to_owned(),
        kind: "sk_lookup".to_owned(),
        attached_to: pod_links.iter().map(|c| format!("netns {c}")).collect(),
    });

    let counters: BTreeMap<String, u64> = Counter::ALL
        .iter()
        .map(|c| {
            let total = counters
                .get(&(*c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (c.name().to_owned(), total)
        })
        .collect();

    let maps = [
        common::MAP_ENROLLED,
        common::MAP_SOCK_DST,
        common::MAP_ORIG_DST,
        common::MAP_INBOUND_LISTENERS,
        common::MAP_POD_IPS,
        common::MAP_EXCLUDED_OUT,
        common::MAP_EXCLUDED_IN,
        common::MAP_COUNTERS,
    ]
    .into_iter()
    .filter_map(|name| {
        let data = open(name).ok()?;
        let max_entries = data.info().map(|i| i.max_entries()).unwrap_or(0);
        Some(BpfMapView {
            name: name.to_owned(),
            max_entries,
            entries: fill(name, data),
        })
    })
    .collect();

    Ok(BpfView {
        pin_path: pin_path.display().to_string(),
        cgroup: cgroup.to_owned(),
        programs,
        enrolled: pods
            .into_iter()
            .map(|(netns_cookie, _)| BpfEnrolledView {
                netns_cookie,
                pod: None,
                ips: Vec::new(),
            })
            .collect(),
        maps,
        counters,
        splice: None,
    })
}

/// Entries in use in map `name` (hash maps; arrays are always full).
fn fill(name: &str, data: MapData) -> Option<u32> {
    fn count<K: aya::Pod, V: aya::Pod>(data: MapData) -> Option<u32> {
        let m: HashMap<MapData, K, V> = HashMap::try_from(Map::HashMap(data)).ok()?;
        Some(m.keys().filter_map(Result::ok).count() as u32)
    }
    match name {
        common::MAP_ENROLLED => count::<u64, EnrolledPod>(data),
        common::MAP_SOCK_DST => count::<u64, Addr>(data),
        common::MAP_ORIG_DST => count::<SocketKey, Addr>(data),
        common::MAP_POD_IPS => count::<IpKey, u8>(data),
        common::MAP_EXCLUDED_OUT | common::MAP_EXCLUDED_IN => count::<u16, u8>(data),
        common::MAP_INBOUND_LISTENERS => {
            let m: SockHash<MapData, IpKey> = SockHash::try_from(Map::SockHash(data)).ok()?;
            Some(m.keys().filter_map(Result::ok).count() as u32)
        }
        _ => None,
    }
}

/// The attach type of a cgroup link pinned under `name` (the program's name).
fn program_kind(name: &str) -> String {
    let short = name.strip_prefix("ambit_").unwrap_or(name);
    if name == common::program::SOCK_OPS {
        "sock_ops".to_owned()
    } else {
        format!("cgroup/{short}")
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
