//! `ambitctl`: the node CLI, a client of the agent's admin API on its unix socket
//! (`ambit_agent::admin::api` defines both ends). This file is the command line (clap) and the
//! dispatch; `ambit_agent::admin::client` speaks HTTP/1.1 on the socket (shared with `ambit-cni`),
//! `views` turns answers into tables, `render`
//! holds the table and format primitives, and `offline_bpf` reads the pinned eBPF maps for when
//! the agent is down.

mod offline_bpf;
mod render;
mod views;

use std::{
    io::{IsTerminal, Write},
    net::SocketAddr,
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use ambit_agent::admin::{api, client};
use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand};
use serde::de::DeserializeOwned;

use crate::render::{Format, Painter};

/// The agent answered with an error (or something ambitctl cannot read), or another failure.
pub const EXIT_API_ERROR: u8 = 1;
/// The agent could not be reached: no socket, nothing listening, permission denied, timeout.
pub const EXIT_UNREACHABLE: u8 = 3;
/// `explain`: the verdict is not `allow`.
pub const EXIT_DENIED: u8 = 4;

const ABOUT_LONG: &str = "\
Inspect the Ambit mesh agent on this node through its admin API (a root-only unix socket).

Start with `ambitctl status`: is the agent ready, and if not, why (capture not attached, no
control-plane state yet, certificates missing); is xDS connected; which pods failed to enroll.
Then drill down: `workloads` and `services` (what the agent knows), `policies` and
`explain --from SRC DST` (why a connection is allowed or denied), `certificates` (identities and
rotation), `connections` (live traffic), `bpf` (the capture programs), `log-level` (turn up
logging without a restart).

If the agent is down, enrolled pods fail closed (their new connections are refused);
`ambitctl bpf --offline` reads the pinned capture state without the agent.";

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the agent answered with an error (its message is printed), or another failure
  2  usage error (unknown flag, bad value)
  3  the agent is unreachable: no socket, nothing listening on it, permission denied, timeout
  4  explain: the verdict is deny (so scripts can test whether policy allows a connection)

Examples:
  sudo ambitctl status
  sudo ambitctl workloads --local
  sudo ambitctl explain --from default/client 10.96.0.10:80
  sudo ambitctl connections --watch
  ambitctl --socket /var/run/ambit/admin.sock status -o json
  ambitctl completions bash > /etc/bash_completion.d/ambitctl";

#[derive(Parser)]
#[command(
    name = "ambitctl",
    version,
    about = "Inspect the Ambit mesh agent on this node",
    long_about = ABOUT_LONG,
    after_help = EXIT_CODES,
    subcommand_required = true,
    arg_required_else_help = true
)]
struct Cli {
    /// The agent's admin socket (the `adminSocket` field of its config).
    #[arg(
        long,
        global = true,
        env = "AMBIT_SOCKET",
        default_value = api::DEFAULT_SOCKET,
        value_name = "PATH"
    )]
    socket: PathBuf,
    /// Output format. `json` and `yaml` print every field the agent sent (tables leave some out
    /// for width). Default: table (JSON for `config`).
    #[arg(short = 'o', long, global = true, value_enum, value_name = "FORMAT")]
    output: Option<Format>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Is the agent healthy: readiness, xDS, CA, enrolled pods
    ///
    /// Shows the agent's version, node, uptime, and whether it is ready (what /healthz/ready on
    /// port 15021 answers), with the reasons when it is not. Then the control plane (xDS): is a
    /// stream connected, has the first full state arrived, pushes and NACKs, when the last push
    /// was applied, and the last error; the CA and how many of the node's workload identities
    /// hold a valid certificate; how many local pods are enrolled (captured) and which failed to
    /// enroll, with the error; and how many workloads, services, policies and open connections
    /// the agent knows.
    ///
    /// What to check: `Ready: NO` lists what is missing. A DISCONNECTED xDS or a growing NACK
    /// count means the agent runs on its last good state (see `last error`). Failed pods are
    /// not captured: their traffic bypasses the mesh, or is refused if they were enrolled
    /// before.
    #[command(after_help = "Examples:\n  ambitctl status\n  ambitctl status -o json | jq .xds")]
    Status,

    /// Workloads the agent knows (local pods, and remote ones from xDS or the config)
    ///
    /// One row per workload: namespace and name, IPs, identity (the SPIFFE id shortened to
    /// namespace/service-account; -o json shows it in full), its node, whether it is reached
    /// through HBONE (mesh) or plaintext, whether it is on this node, for a local pod whether
    /// this agent captures it now (ENROLLED), whether it is healthy, and where the agent learned
    /// it (config or xds). -o json/yaml adds the uid, services it backs, policies that select it
    /// and its waypoint.
    ///
    /// What to check: a local pod with ENROLLED no is not captured (see `ambitctl status` for
    /// the error); a destination with HBONE no is reached in plaintext; an unhealthy workload
    /// gets no service traffic.
    #[command(
        after_help = "Examples:\n  ambitctl workloads\n  ambitctl workloads --local\n  \
                            ambitctl workloads -o json | jq '.[] | select(.name == \"web-0\")'"
    )]
    Workloads {
        /// Only workloads on this node.
        #[arg(long)]
        local: bool,
    },

    /// Services and their endpoints
    ///
    /// One row per service: namespace/hostname, virtual IPs, ports (port->targetPort when the
    /// target differs), endpoints as healthy/total, where it came from (config, xds, or
    /// `workloads` when only named by workloads), and its waypoint. -o json/yaml lists the
    /// endpoints.
    ///
    /// What to check: a service with 0 healthy endpoints refuses connections to its VIP (the
    /// access log says `dst.endpoint` none).
    #[command(after_help = "Examples:\n  ambitctl services\n  \
                            ambitctl services -o json | jq '.[] | select(.key == \"default/web.default.svc.cluster.local\") | .endpoints'")]
    Services,

    /// Authorization policies in force
    ///
    /// One row per policy: namespace/name, scope (GLOBAL, NAMESPACE, WORKLOAD_SELECTOR), action
    /// (ALLOW or DENY), whether it is dry-run (only logged), how many rules, and its source.
    /// -o json/yaml shows each policy in full, in the config file's shape.
    ///
    /// Semantics (Istio's): any matching DENY denies; with no ALLOW policy for the destination,
    /// the connection is allowed; otherwise an ALLOW must match. To see which policy decides
    /// for one connection, use `ambitctl explain`.
    #[command(after_help = "Examples:\n  ambitctl policies\n  ambitctl policies -o yaml")]
    Policies,

    /// Workload certificates: state, expiry, rotation
    ///
    /// One row per workload identity on this node: its state (pending: not fetched yet, ready,
    /// renewing, failing), serial, expiry time and how long until then, when the next renewal
    /// (or retry) is due, and the last error from the CA. -o json/yaml adds the number of
    /// fetches.
    ///
    /// What to check: a failing or pending identity cannot serve or open HBONE connections
    /// (and keeps the agent not ready); the error names the CA's complaint. EXPIRED means the
    /// old certificate is no longer accepted by peers.
    #[command(
        visible_alias = "certs",
        after_help = "Examples:\n  ambitctl certificates\n  ambitctl certs -o json"
    )]
    Certificates,

    /// Open connections through the agent, with bytes and identities
    ///
    /// One row per proxied connection: id, direction (in/out), path (hbone, passthrough,
    /// waypoint), source and destination addresses with their identities (namespace/service
    /// account), the service whose VIP was dialed, bytes sent (source to destination) and
    /// received, and age. -o json/yaml adds the workload names.
    ///
    /// With --watch the view refreshes every --interval seconds until Ctrl-C (the screen is
    /// redrawn on a terminal; otherwise each refresh follows a `---` line).
    #[command(
        after_help = "Examples:\n  ambitctl connections\n  ambitctl connections --watch --interval 5\n  \
                            ambitctl connections -o json | jq '[.[] | .bytesSent] | add'"
    )]
    Connections {
        /// Refresh until interrupted.
        #[arg(short, long)]
        watch: bool,
        /// Seconds between refreshes with --watch.
        #[arg(long, value_name = "SECS", default_value_t = 2, requires = "watch",
              value_parser = clap::value_parser!(u64).range(1..))]
        interval: u64,
    },

    /// The eBPF capture programs, enrolled network namespaces, maps and counters
    ///
    /// From the agent: each program and where it is attached (the cgroup, or one network
    /// namespace per pod for sk_lookup), the enrolled network namespace cookies with their pod
    /// and IPs, each map's fill, and the programs' counters.
    ///
    /// With --offline (implied by --pin-path or --node) it reads the pinned maps under bpffs
    /// instead, without the agent: use it when the agent is down, which is when enrolled pods
    /// fail closed. It shows the attached links, enrolled netns cookies and counters. Needs
    /// root.
    ///
    /// What to check: a program NOT ATTACHED captures nothing; an enrolled cookie with no pod
    /// is stale state; a map near 100% fill drops entries; growing drop or refuse counters
    /// explain failed connections.
    #[command(after_help = "Examples:\n  ambitctl bpf\n  ambitctl bpf --offline\n  \
                            ambitctl bpf --offline --node node-a -o json")]
    Bpf {
        /// Read the pinned maps directly instead of asking the agent.
        #[arg(long)]
        offline: bool,
        /// The agent's bpffs pin directory (`bpfPinPath` in its config); implies --offline.
        /// Default: the only node under /sys/fs/bpf/ambit.
        #[arg(long, value_name = "DIR", conflicts_with = "node")]
        pin_path: Option<PathBuf>,
        /// Node name, for `--pin-path /sys/fs/bpf/ambit/<NODE>`; implies --offline.
        #[arg(long)]
        node: Option<String>,
    },

    /// The agent's configuration as it runs
    ///
    /// The config the agent loaded (after validation and defaults), as JSON, or YAML with
    /// -o yaml. It has no table form.
    #[command(
        after_help = "Examples:\n  ambitctl config\n  ambitctl config -o yaml\n  \
                            ambitctl config | jq .xds"
    )]
    Config,

    /// Show or set the agent's log level
    ///
    /// Without LEVEL, prints the agent's current log filter. With LEVEL, sets it at once,
    /// without a restart (until the next restart). LEVEL is a tracing EnvFilter directive:
    /// `debug`, or `info,ambit_agent::xds=debug` for one module.
    #[command(
        after_help = "Examples:\n  ambitctl log-level\n  ambitctl log-level debug\n  \
                            ambitctl log-level 'info,ambit_agent::proxy=trace'"
    )]
    LogLevel {
        /// The new filter, e.g. `debug` or `info,ambit_agent::xds=debug`.
        level: Option<String>,
    },

    /// Explain what happens to a new connection from SRC to DST, and why
    ///
    /// Runs the same lookups and authorization the data path runs for a real connection and
    /// prints each step: how the source resolves (workload, IP, identity) and whether its
    /// traffic is captured, whether DST is a service VIP and which endpoint it picks, the
    /// destination workload and identity, the path (hbone, passthrough, waypoint, direct or
    /// refused), which policy and rule decide, and dry-run policies that would decide
    /// otherwise. The last line is the verdict.
    ///
    /// Exits 0 when the verdict is allow and 4 when it is deny, in every output format.
    #[command(
        after_help = "Examples:\n  ambitctl explain --from default/client 10.96.0.10:80\n  \
                            ambitctl explain --from spiffe://cluster.local/ns/default/sa/client 10.1.0.5:8080\n  \
                            ambitctl explain --from 10.1.0.4 '[fd00:1::5]:8080' && echo allowed\n  \
                            ambitctl explain --dns echo.default.svc.cluster.local"
    )]
    Explain {
        /// The source: a pod as `namespace/name` or `name`, an IP, or a SPIFFE id.
        #[arg(long = "from", value_name = "SRC", required_unless_present = "dns")]
        from: Option<String>,
        /// The destination as IP:PORT (`[v6]:port` for IPv6); a service VIP or a workload.
        #[arg(value_name = "DST", value_parser = parse_dst, required_unless_present = "dns")]
        dst: Option<SocketAddr>,
        /// Instead: what the DNS proxy answers for NAME (the mesh's VIPs, or forwarded to the
        /// pod's resolver).
        #[arg(long = "dns", value_name = "NAME", conflicts_with_all = ["from", "dst"])]
        dns: Option<String>,
    },

    /// Print a shell completion script
    ///
    /// Writes the completion script for SHELL to stdout. Does not contact the agent.
    #[command(
        after_help = "Examples:\n  ambitctl completions bash > /etc/bash_completion.d/ambitctl\n  \
                            ambitctl completions zsh > \"${fpath[1]}/_ambitctl\"\n  \
                            ambitctl completions fish > ~/.config/fish/completions/ambitctl.fish"
    )]
    Completions {
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
}

fn parse_dst(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| "expected IP:PORT, e.g. 10.96.0.10:80 or [fd00::5]:8080".to_owned())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader went away (`ambitctl ... | head`): nothing left to say.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ambitctl: error: {e:#}");
            ExitCode::from(
                e.downcast_ref::<client::Error>()
                    .map_or(EXIT_API_ERROR, exit_code),
            )
        }
    }
}

/// The exit code a failure to get an answer maps to (the contract in the top-level `--help`).
fn exit_code(e: &client::Error) -> u8 {
    if e.is_unreachable() {
        EXIT_UNREACHABLE
    } else {
        EXIT_API_ERROR
    }
}

/// What a command needs to print an answer.
struct Ctx {
    client: client::Client,
    format: Format,
    painter: Painter,
}

impl Ctx {
    /// `GET path` as a table made by `table`, or as JSON/YAML of everything the agent sent.
    fn render<T: DeserializeOwned>(
        &self,
        path: &str,
        table: impl Fn(T, Painter) -> String,
    ) -> anyhow::Result<String> {
        match self.format {
            Format::Table => Ok(table(self.client.get(path)?, self.painter)),
            format => render::structured(&self.client.get::<serde_json::Value>(path)?, format),
        }
    }

    fn show<T: DeserializeOwned>(
        &self,
        path: &str,
        table: impl Fn(T, Painter) -> String,
    ) -> anyhow::Result<u8> {
        print(&self.render(path, table)?)?;
        Ok(0)
    }
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Ctx {
        client: client::Client::new("ambitctl", cli.socket)
            .with_socket_hint("pass it with --socket or AMBIT_SOCKET"),
        format: cli.output.unwrap_or(Format::Table),
        painter: Painter::for_stdout(),
    };
    match cli.command {
        Command::Status => ctx.show("/status", views::status),
        Command::Workloads { local } => {
            let path = if local {
                "/workloads?local=true"
            } else {
                "/workloads"
            };
            ctx.show(path, views::workloads)
        }
        Command::Services => ctx.show("/services", views::services),
        Command::Policies => ctx.show("/policies", views::policies),
        Command::Certificates => ctx.show("/certificates", views::certificates),
        Command::Connections { watch: false, .. } => ctx.show("/connections", views::connections),
        Command::Connections {
            watch: true,
            interval,
        } => watch(
            &ctx,
            "/connections",
            Duration::from_secs(interval),
            views::connections,
        ),
        Command::Bpf {
            offline,
            pin_path,
            node,
        } => {
            if offline || pin_path.is_some() || node.is_some() {
                let pin_path = offline_bpf::pin_path(node, pin_path)?;
                print(&offline_bpf::show(&pin_path, ctx.format, ctx.painter)?)?;
                Ok(0)
            } else {
                ctx.show("/bpf", views::bpf)
            }
        }
        Command::Config => {
            let format = match ctx.format {
                Format::Yaml => Format::Yaml,
                _ => Format::Json,
            };
            let config: serde_json::Value = ctx.client.get("/config")?;
            print(&render::structured(&config, format)?)?;
            Ok(0)
        }
        Command::LogLevel { level } => {
            let answer: serde_json::Value = match &level {
                None => ctx.client.get("/logging")?,
                Some(l) => ctx
                    .client
                    .put(&format!("/logging?level={}", client::encode(l)))?,
            };
            if ctx.format != Format::Table {
                print(&render::structured(&answer, ctx.format)?)?;
                return Ok(0);
            }
            let answer: api::LogLevel = from_answer(answer)?;
            match level {
                None => print(&format!("{}\n", answer.level))?,
                Some(_) => print(&format!("log level set to {}\n", answer.level))?,
            }
            Ok(0)
        }
        Command::Explain {
            dns: Some(name), ..
        } => {
            let path = format!("/explain/dns?name={}", client::encode(&name));
            let answer: serde_json::Value = ctx.client.get(&path)?;
            let explain: api::DnsExplain = from_answer(answer.clone())?;
            print(&match ctx.format {
                Format::Table => {
                    let addrs: Vec<String> =
                        explain.addresses.iter().map(ToString::to_string).collect();
                    format!(
                        "name:     {}\nservice:  {}\nanswer:   {}\noutcome:  {}\ncapture:  {} (node default; a pod's ambient.istio.io/dns-capture overrides it)\n",
                        explain.name,
                        explain.service.as_deref().unwrap_or("-"),
                        if addrs.is_empty() {
                            "-".to_owned()
                        } else {
                            addrs.join(", ")
                        },
                        explain.outcome,
                        if explain.capture { "on" } else { "off" },
                    )
                }
                format => render::structured(&answer, format)?,
            })?;
            Ok(0)
        }
        Command::Explain { from, dst, .. } => {
            let (Some(from), Some(dst)) = (from, dst) else {
                unreachable!("clap requires --from and DST without --dns");
            };
            let path = format!(
                "/explain?src={}&dst={}",
                client::encode(&from),
                client::encode(&dst.to_string())
            );
            let answer: serde_json::Value = ctx.client.get(&path)?;
            let explain: api::Explain = from_answer(answer.clone())?;
            print(&match ctx.format {
                Format::Table => views::explain(&explain, ctx.painter),
                format => render::structured(&answer, format)?,
            })?;
            Ok(if explain.verdict == "allow" {
                0
            } else {
                EXIT_DENIED
            })
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "ambitctl", &mut script);
            std::io::stdout().write_all(&script)?;
            Ok(0)
        }
    }
}

/// Decodes an answer kept as JSON (to print it whole with -o json) into its API type.
fn from_answer<T: DeserializeOwned>(answer: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(answer).context(concat!(
        "cannot read the agent's answer (an agent of another version than ambitctl ",
        env!("CARGO_PKG_VERSION"),
        "?)"
    ))
}

/// Redraws `path` every `interval` until interrupted. A failure on the first fetch ends it (a
/// wrong socket should not loop); later ones are shown and retried, since watching through an
/// agent restart is the point.
fn watch<T: DeserializeOwned>(
    ctx: &Ctx,
    path: &str,
    interval: Duration,
    table: impl Fn(T, Painter) -> String,
) -> anyhow::Result<u8> {
    let tty = std::io::stdout().is_terminal();
    for refresh in 0u64.. {
        let text = match ctx.render(path, &table) {
            Ok(text) => text,
            Err(e) if refresh == 0 => return Err(e),
            Err(e) => format!("ambitctl: error: {e:#}\n"),
        };
        let frame = if tty {
            // Home the cursor and clear the screen, then a title line as watch(1) prints.
            format!(
                "\x1b[H\x1b[2JEvery {}s: ambitctl {} (Ctrl-C to stop)\n\n{text}",
                interval.as_secs(),
                path.trim_start_matches('/')
            )
        } else if refresh == 0 || ctx.format == Format::Json {
            // Concatenated JSON documents are a stream `jq` reads as is.
            text
        } else {
            // Also YAML's document separator.
            format!("---\n{text}")
        };
        print(&frame)?;
        std::thread::sleep(interval);
    }
    Ok(0)
}

/// Writes all of `text` to stdout (one write, so a table is never interleaved).
fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}
