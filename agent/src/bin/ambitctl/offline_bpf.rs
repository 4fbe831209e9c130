//! `ambitctl`: inspect Ambit on this node.
//!
//! Today it reads the agent's pinned eBPF state directly from bpffs (no running agent needed),
//! which is what an operator checks first when traffic is not captured: are the programs attached,
//! which network namespaces are enrolled, and what have the programs done. The admin API
//! subcommands (workloads, connections, explain, ...) come with the agent's admin socket.

use std::{path::PathBuf, process::ExitCode};

use ambit_common::{self as common, Counter, EnrolledPod};
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use clap::{Parser, Subcommand};

/// Inspect the Ambit mesh agent on this node.
#[derive(Parser)]
#[command(name = "ambitctl", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the agent's eBPF state: attached links, enrolled netns cookies, program counters.
    ///
    /// Reads the pinned maps under the agent's bpffs directory (needs root). Works while the
    /// agent is stopped, which is when enrolled pods fail closed.
    Bpf {
        /// The agent's bpffs pin directory (`bpfPinPath` in its config). Default: the only node
        /// under /sys/fs/bpf/ambit.
        #[arg(long, conflicts_with = "node")]
        pin_path: Option<PathBuf>,
        /// Node name: shorthand for `--pin-path /sys/fs/bpf/ambit/<node>`.
        #[arg(long)]
        node: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long, short = 'o', value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambitctl: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Bpf {
            pin_path,
            node,
            output,
        } => {
            let root = PathBuf::from(ambit_agent::config::DEFAULT_BPF_PIN_ROOT);
            let pin_path = match (node, pin_path) {
                (Some(n), _) => root.join(n),
                (None, Some(p)) => p,
                (None, None) => only_node_under(&root)?,
            };
            bpf(&pin_path, &output)
        }
    }
}

/// The single node directory under the default pin root, or an error that lists the choices.
fn only_node_under(root: &std::path::Path) -> anyhow::Result<PathBuf> {
    let nodes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read {}: {e} (is the agent installed on this node? pass --pin-path)",
                root.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match nodes.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!(
            "no agent state under {} (is the agent running on this node?)",
            root.display()
        ),
        many => anyhow::bail!(
            "several agents' state under {}: {}; pick one with --node or --pin-path",
            root.display(),
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn open(pin_path: &std::path::Path, name: &str) -> anyhow::Result<MapData> {
    let path = pin_path.join(name);
    MapData::from_pin(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot open pinned map {}: {e} (is the agent installed on this node with this pin path, and are you root?)",
            path.display()
        )
    })
}

fn bpf(pin_path: &std::path::Path, output: &str) -> anyhow::Result<()> {
    let enrolled: HashMap<MapData, u64, EnrolledPod> =
        HashMap::try_from(Map::HashMap(open(pin_path, common::MAP_ENROLLED)?))?;
    let counters: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_path, common::MAP_COUNTERS)?))?;
    let mut pods: Vec<(u64, u32)> = enrolled
        .iter()
        .filter_map(Result::ok)
        .map(|(cookie, pod)| (cookie, pod.pod_id))
        .collect();
    pods.sort_unstable();
    let counts: Vec<(&str, u64)> = Counter::ALL
        .iter()
        .map(|c| {
            let v = counters
                .get(&(*c as u32), 0)
                .map(|v| v.iter().sum())
                .unwrap_or(0);
            (c.name(), v)
        })
        .collect();
    let mut links: Vec<String> = std::fs::read_dir(pin_path.join("links"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    links.sort();

    if output == "json" {
        let v = serde_json::json!({
            "pinPath": pin_path,
            "links": links,
            "enrolled": pods.iter().map(|(c, id)| serde_json::json!({"netnsCookie": c, "podId": id})).collect::<Vec<_>>(),
            "counters": counts.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("pin path: {}", pin_path.display());
    println!(
        "attached links: {}",
        if links.is_empty() {
            "none".into()
        } else {
            links.join(", ")
        }
    );
    println!("\nENROLLED NETNS COOKIE  POD ID");
    for (cookie, id) in &pods {
        println!("{cookie:<21}  {id}");
    }
    if pods.is_empty() {
        println!("(none)");
    }
    println!("\nCOUNTER                       VALUE");
    for (name, v) in counts {
        println!("{name:<28}  {v}");
    }
    Ok(())
}
