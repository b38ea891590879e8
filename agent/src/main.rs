//! `tokenmesh-agent`: the node agent's command line.

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use tokenmesh_agent::{cni, config::Config, explain, run, steering};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "tokenmesh-agent",
    version,
    about = "OAuth 2.0 for every pod on the node, steered by eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGINT or SIGTERM; SIGHUP or a change to the config or
    /// workloads file reloads them.
    Run {
        /// The agent's YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file and its workloads file, print every problem, and exit.
    CheckConfig {
        /// The YAML configuration file to check. Secrets it references are resolved, so
        /// run it where the agent's secrets and environment are available.
        #[arg(required_unless_present = "config")]
        file: Option<PathBuf>,
        /// The same file, given as for the other commands.
        #[arg(long, short, conflicts_with = "file")]
        config: Option<PathBuf>,
    },
    /// Print which rule and plugins would apply to a request from a pod to a URL.
    Explain {
        /// The YAML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// The calling pod: its name or namespace/name in the workloads file.
        #[arg(long)]
        from: String,
        /// The request URL, such as http://10.0.0.3:8080/api/echo.
        #[arg(long)]
        to: String,
    },
    /// Remove tokenmesh-cni from the node's CNI configuration, then detach the eBPF
    /// programs and remove the pins an agent left in place on exit.
    Uninstall {
        /// A configuration file; only its `steering.bpffs_dir` and
        /// `workloads.kubernetes.cni` folders are read, so secrets and environment
        /// variables it references need not exist here.
        #[arg(
            long,
            short,
            required_unless_present = "bpffs_dir",
            conflicts_with_all = ["bpffs_dir", "cni_conf_dir"]
        )]
        config: Option<PathBuf>,
        /// The pin folder to clean, instead of reading it from a configuration file.
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        /// The CNI configuration folder to remove tokenmesh-cni from, such as
        /// /etc/cni/net.d, instead of reading it from a configuration file.
        #[arg(long)]
        cni_conf_dir: Option<PathBuf>,
        /// The CNI plugin folder to remove the tokenmesh-cni binary from, such as
        /// /opt/cni/bin.
        #[arg(long, requires = "cni_conf_dir")]
        cni_bin_dir: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let env = |name: &str| std::env::var(name).ok();
    let result = match cli.command {
        Command::Run { config } => Config::load(&config, &env)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                let env: run::Env = Arc::new(|name: &str| std::env::var(name).ok());
                tokio::runtime::Runtime::new()?.block_on(run::run(config, env))
            }),
        Command::CheckConfig { file, config } => {
            let file = file.or(config).expect("clap requires one of them");
            check_config(&file, &env)
        }
        Command::Explain { config, from, to } => Config::load(&config, &env)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                let pods = run::load_pods(&config, &cgroup_mount_or_default())?;
                print!("{}", explain::explain(&config, &pods, &from, &to)?);
                Ok(())
            }),
        Command::Uninstall {
            config,
            bpffs_dir,
            cni_conf_dir,
            cni_bin_dir,
        } => uninstall(config, bpffs_dir, cni_conf_dir, cni_bin_dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn check_config(
    file: &std::path::Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<()> {
    let config = Config::load(file, env)?;
    let cgroup_mount = cgroup_mount_or_default();
    let pods = run::load_pods(&config, &cgroup_mount)?;
    let source = match (&config.workloads_file, &config.kubernetes) {
        (Some(path), _) => format!("{} pods in {}", pods.len(), path.display()),
        (None, Some(kubernetes)) => format!("pods from Kubernetes node {}", kubernetes.node_name),
        (None, None) => "no pods".to_string(),
    };
    println!(
        "{}: valid ({} plugins, {source})",
        file.display(),
        config.plugins.len(),
    );
    Ok(())
}

/// Returns the cgroup v2 mount, or the usual path for commands that only read files.
fn cgroup_mount_or_default() -> PathBuf {
    steering::cgroup2_mount().unwrap_or_else(|_| PathBuf::from("/sys/fs/cgroup"))
}

/// Removes tokenmesh-cni from the CNI folders, then detaches the programs and removes the
/// pins under the pin folder. The folders come from the flags or from the config file.
fn uninstall(
    config: Option<PathBuf>,
    bpffs_dir: Option<PathBuf>,
    cni_conf_dir: Option<PathBuf>,
    cni_bin_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (bpffs_dir, (cni_conf_dir, cni_bin_dir)) = match (bpffs_dir, config) {
        (Some(dir), _) => (dir, (cni_conf_dir, cni_bin_dir)),
        (None, Some(config)) => (
            Config::read_bpffs_dir(&config)?,
            Config::read_cni_dirs(&config)?,
        ),
        (None, None) => anyhow::bail!("give --config FILE or --bpffs-dir DIR"),
    };
    // The plugin goes first: once no agent runs, it would keep every new pod from starting.
    if cni_conf_dir.is_none() {
        println!(
            "no CNI configuration folder given: if the agent installed tokenmesh-cni, remove it with --cni-conf-dir /etc/cni/net.d --cni-bin-dir /opt/cni/bin, or new pods on this node cannot start"
        );
    }
    if let Some(conf_dir) = cni_conf_dir {
        let changed = cni::chain::remove(&conf_dir, cni_bin_dir.as_deref())?;
        match changed.as_slice() {
            [] => println!("tokenmesh-cni is not in {}", conf_dir.display()),
            files => {
                for file in files {
                    println!("removed tokenmesh-cni from {}", file.display());
                }
            }
        }
    }
    if !bpffs_dir.exists() {
        println!(
            "nothing to remove: {} does not exist; check steering.bpffs_dir",
            bpffs_dir.display()
        );
        return Ok(());
    }
    steering::uninstall(&bpffs_dir)?;
    println!(
        "detached tokenmesh programs and removed the pins under {}",
        bpffs_dir.display()
    );
    Ok(())
}
