//! `ambit-agent`: argument parsing only; see `app` for what runs.

use std::path::PathBuf;

use ambit_agent::{app, redirect, telemetry};
use clap::{Parser, Subcommand};

/// Ambit's per-node agent: captures the TCP traffic of enrolled pods with eBPF and carries it.
///
/// Runs on every node (as root, or with CAP_SYS_ADMIN, CAP_NET_ADMIN, CAP_BPF, CAP_NET_RAW).
/// Standalone mode reads the node's pods from a YAML config file; the file is re-read when it
/// changes or on SIGHUP. SIGTERM drains open connections and exits; enrolled pods then stay
/// captured (fail closed: their new connections are refused) until an agent runs again.
#[derive(Parser)]
#[command(name = "ambit-agent", version, about, long_about)]
struct Cli {
    /// Log filter (tracing EnvFilter syntax, e.g. `info` or `info,ambit_agent::proxy=debug`).
    #[arg(long, env = "AMBIT_LOG", default_value = "info", global = true)]
    log_level: String,
    /// Log output format.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: telemetry::LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run {
        /// Standalone config file (YAML): node name, pods' cgroup, pods. See README.md.
        #[arg(
            long,
            short,
            env = "AMBIT_CONFIG",
            default_value = "/etc/ambit/config.yaml"
        )]
        config: PathBuf,
    },
    /// Run as a waypoint: an L7 proxy that terminates HBONE, applies HTTP authorization and
    /// routes (weighted backends, timeouts, retries, outlier ejection), and forwards each request
    /// over HBONE to an endpoint.
    ///
    /// The config file is the agent's format with a `waypoint:` section (no `cgroup`, no `pods`);
    /// run it inside the waypoint pod's network namespace. Routes and policies reload live when
    /// the file changes or on SIGHUP. See README.md, "Waypoints".
    Waypoint {
        #[arg(
            long,
            short,
            env = "AMBIT_CONFIG",
            default_value = "/etc/ambit/waypoint.yaml"
        )]
        config: PathBuf,
    },
    /// Check a config file and print it as the agent understands it.
    Check {
        #[arg(
            long,
            short,
            env = "AMBIT_CONFIG",
            default_value = "/etc/ambit/config.yaml"
        )]
        config: PathBuf,
    },
    /// Serve Istio's CA API from a built-in CA (for standalone meshes of several nodes).
    ///
    /// Agents point `ca.istio.address` at it, with `ca.istio.rootCert: <dir>/server-cert.pem`,
    /// `trustRoots: <dir>/ca-cert.pem`, and `ca.istio.tokenPath` holding their node's token.
    /// With `--config`, each node is authenticated by its own token and gets certificates only
    /// for its workloads' identities (the file's `nodes`); without it, the server takes callers
    /// without a token and so only listens on loopback.
    #[command(
        after_help = "Example config (--config):\n\n  dir: /var/lib/ambit/ca\n  \
        trustDomain: cluster.local\n  listen: 0.0.0.0:15012\n  maxCertLifetimeSeconds: 86400\n  \
        nodes:\n    - name: node-a\n      tokenFile: /etc/ambit/ca/node-a.token\n      \
        agentConfig: /etc/ambit/node-a.yaml   # its enrolled pods are its workloads\n      \
        identities: []                       # and these\n"
    )]
    CaServer {
        /// The CA server's config: dir, trustDomain, listen, maxCertLifetimeSeconds and every
        /// node's tokenFile and workloads.
        #[arg(long, conflicts_with_all = ["dir", "trust_domain", "listen"])]
        config: Option<PathBuf>,
        /// Without --config: where the CA's root certificate and key live (created on first start).
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        /// Without --config: the trust domain.
        #[arg(long)]
        trust_domain: Option<String>,
        /// Without --config: the address to listen on (loopback only: no caller is authenticated).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Remove this node's pinned eBPF programs and maps: every pod of the node is released and
    /// its traffic flows directly. Use when uninstalling; a running agent must be stopped first.
    Cleanup {
        #[arg(
            long,
            short,
            env = "AMBIT_CONFIG",
            default_value = "/etc/ambit/config.yaml"
        )]
        config: PathBuf,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ambit-agent: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// glibc's allocator, set up for a long-lived proxy (before any other thread exists):
/// - Arenas: glibc gives each thread that meets contention its own (up to 8 per core), and
///   memory freed in one arena is not reused by another: with tokio's workers moving tasks
///   between threads, that raised the agent's peak RSS under load. Two serve two workers well.
/// - Thresholds, fixed: left dynamic, freeing one large block raises the size above which
///   blocks are mmapped to that block's size (start-up frees a 16 MiB one) and the size of free
///   memory at the top of an arena that is handed back to twice that. A worker's arena then
///   kept every page a load burst touched (on the test bed, 8 MiB after a burst with 0.2 MiB of
///   it in use: `malloc_trim` releases free chunks inside an arena, not its top). Blocks of
///   1 MiB and up (xDS messages, the state's tables at scale) are mmapped and go back when
///   freed; an arena hands back its top when over 1 MiB of it is free.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter; called before any other thread exists.
    #[allow(unsafe_code)]
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
    }
}

/// Every proxied connection is two or three sockets, so the soft limit on open files (often 1024)
/// would cap the agent far below its connection limits: raise it to the hard limit, as ztunnel
/// does.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open files limit"),
            Err(e) => {
                tracing::warn!(soft, hard, error = %e, "cannot raise the open files limit; connections beyond it will be refused")
            }
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read the open files limit"),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    tune_malloc();
    // Before any other thread exists: the netns every thread returns to after entering a pod's.
    redirect::netns::init_agent_netns()
        .map_err(|e| anyhow::anyhow!("cannot open the agent's own network namespace: {e}"))?;
    let max_level = telemetry::init(&cli.log_level, cli.log_format)?;
    raise_fd_limit();
    match cli.command {
        Command::Run { config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ambit-worker")
                .build()?;
            runtime.block_on(app::run(config, telemetry::ebpf_log_level(max_level)))
        }
        Command::Waypoint { config } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("ambit-waypoint")
                .build()?;
            runtime.block_on(ambit_agent::waypoint::run(config))
        }
        Command::Check { config } => {
            let config = ambit_agent::config::Config::load(&config)?;
            println!("{}", serde_json::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Cleanup { config } => app::cleanup(&config),
        Command::CaServer {
            config,
            dir,
            trust_domain,
            listen,
        } => {
            use ambit_agent::ca_server::access::{CaServerConfig, Callers, DEFAULT_MAX_LIFETIME};
            let config = match (config, dir) {
                (Some(path), _) => CaServerConfig::load(&path)?,
                (None, Some(dir)) => CaServerConfig {
                    dir,
                    trust_domain: trust_domain.unwrap_or_else(|| "cluster.local".to_owned()),
                    listen: listen.unwrap_or_else(|| ([127, 0, 0, 1], 15012).into()),
                    callers: Callers::open(DEFAULT_MAX_LIFETIME),
                },
                (None, None) => anyhow::bail!("give --config FILE, or --dir DIR (loopback only)"),
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            runtime.block_on(app::run_ca_server(config))
        }
    }
}
