//! `ambitctl bpf --offline`: the agent's pinned eBPF state read directly from bpffs.
//!
//! Works while the agent is down, which is exactly when enrolled pods fail closed: it shows
//! whether the programs are still attached, which network namespaces are still enrolled, and
//! what the programs counted (e.g. `inbound_dropped_no_listener`). Needs root.

use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};

use crate::{
    render::{self, Format, Painter},
    views,
};

/// Where to read: `--node`, `--pin-path`, or the only node under the default pin root.
pub fn pin_path(node: Option<String>, pin_path: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let root = Path::new(ambit_agent::config::DEFAULT_BPF_PIN_ROOT);
    match (node, pin_path) {
        (Some(n), _) => Ok(root.join(n)),
        (None, Some(p)) => Ok(p),
        (None, None) => only_node_under(root),
    }
}

/// The single node directory under the default pin root, or an error that lists the choices.
fn only_node_under(root: &Path) -> anyhow::Result<PathBuf> {
    let nodes: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "cannot read {} (is the agent installed on this node? pass --pin-path)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match nodes.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "no agent state under {} (has the agent ever run on this node?)",
            root.display()
        ),
        many => bail!(
            "several agents' state under {}: {}; pick one with --node or --pin-path",
            root.display(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Reads the pinned state under `pin_path` (the same reading `GET /bpf` serves) and renders it.
/// Pods show by netns cookie only: their names live in the agent.
pub fn show(pin_path: &Path, format: Format, painter: Painter) -> anyhow::Result<String> {
    let view = ambit_agent::redirect::inspect(pin_path, "(as pinned)").map_err(|e| anyhow!(e))?;
    if format != Format::Table {
        return render::structured(&view, format);
    }
    Ok(views::bpf(view, painter))
}
