//! The agent's lifecycle: load, steer, serve every pod, reload, and shut down on a signal.

mod kubernetes;
mod pods;
mod reload;

use kubernetes::KubePods;
pub use pods::{Changes, PodSet};
use reload::Reloader;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context;
use arc_swap::ArcSwap;
use ipnet::Ipv4Net;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    admin::{self, Readiness},
    audit::Audit,
    config::{Config, OnExit},
    oauth::{introspect::Introspector, jwks::KeySets, token::TokenSource},
    policy::Policy,
    proxy::Shared,
    steering::{self, Steering, SteeringSettings},
    workloads::{self, Pod},
};

/// How long connections in flight may finish after a shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Joins a cgroup path from the config or workloads file onto the cgroup v2 mount, unless
/// it already starts with the mount.
pub fn cgroup_path(mount: &Path, path: &Path) -> PathBuf {
    if path.starts_with(mount) {
        return path.to_path_buf();
    }
    let relative = path.strip_prefix("/").unwrap_or(path);
    mount.join(relative)
}

/// Loads the workloads file named by `config`, with cgroup paths made absolute; no pods
/// when the config names no file.
pub fn load_pods(config: &Config, cgroup_mount: &Path) -> anyhow::Result<Vec<Pod>> {
    let Some(file) = &config.workloads_file else {
        return Ok(Vec::new());
    };
    let mut pods = workloads::load_file(file, Path::new("/"))?;
    for pod in &mut pods {
        pod.cgroup = cgroup_path(cgroup_mount, &pod.cgroup);
    }
    Ok(pods)
}

/// Lookup of environment variables for secrets referenced as `${VAR}`.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Runs the agent until SIGINT or SIGTERM, reloading on SIGHUP and on file changes.
pub async fn run(config: Config, env: Env) -> anyhow::Result<()> {
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = ?config, "starting tokenmesh agent");

    let cgroup_mount = steering::cgroup2_mount()?;
    let pods_cgroup = cgroup_path(&cgroup_mount, &config.steering.pods_cgroup);
    let pods = load_pods(&config, &cgroup_mount)?;
    let audit = Audit::open(&config.audit.path)
        .with_context(|| format!("cannot open audit log {}", config.audit.path.display()))?;

    let http = reqwest::Client::builder()
        .timeout(config.proxy.idp_timeout)
        .build()
        .context("cannot build the HTTP client for the identity provider")?;

    let shutdown = CancellationToken::new();
    let readiness = Readiness::default();
    let admin_task = admin::serve(config.admin.listen, readiness.clone(), shutdown.clone())
        .await
        .with_context(|| format!("cannot listen on admin.listen {}", config.admin.listen))?;

    let exclude_networks = excluded_networks(&config);
    let steering = Arc::new(Steering::start(&SteeringSettings {
        bpffs_dir: config.steering.bpffs_dir.clone(),
        pods_cgroup: pods_cgroup.clone(),
        intercept_ports: config.steering.intercept_ports.clone(),
        intercept_networks: config.steering.intercept_cidrs.clone(),
        exclude_networks,
    })?);

    let shared = Arc::new(Shared {
        audit,
        tokens: TokenSource::new(http.clone(), config.proxy.token_refresh_skew),
        introspector: Introspector::new(http.clone()),
        key_sets: KeySets::new(http),
        steering: steering.clone(),
        settings: config.proxy.clone(),
        policy: ArcSwap::from_pointee(Policy::from_config(&config, 1)),
        pods_by_ip: ArcSwap::from_pointee(HashMap::new()),
        shutdown: shutdown.clone(),
        tasks: TaskTracker::new(),
    });

    let (outcomes, outcomes_receiver) = tokio::sync::watch::channel(Default::default());
    let kube_pods =
        KubePods::start(&config, &cgroup_mount, outcomes_receiver, shutdown.clone()).await;
    let kube_pods = match kube_pods {
        Ok(kube_pods) => kube_pods,
        Err(e) => {
            shutdown.cancel();
            stop(
                shared,
                steering,
                config.steering.on_exit,
                &config.steering.bpffs_dir,
            )
            .await;
            return Err(e);
        }
    };
    let ports = (config.steering.outbound_port, config.steering.inbound_port);
    let mut pod_set = PodSet::default();
    let changes = pod_set.reconcile(&shared, pods.clone(), ports).await;
    outcomes.send_replace(pod_set.outcomes());
    if changes.failed > 0 {
        shutdown.cancel();
        stop(
            shared,
            steering,
            config.steering.on_exit,
            &config.steering.bpffs_dir,
        )
        .await;
        anyhow::bail!(
            "{} pod(s) could not be enrolled (see the errors above); refusing to start with pods whose traffic would not be checked",
            changes.failed
        );
    }
    // With Kubernetes, the agent becomes ready in `serve_until_signal`, once the first
    // listing of the node's pods is applied.
    readiness.set(!kube_pods.enabled());
    tracing::info!(pods = pod_set.len(), "agent ready");

    let mut reloader = Reloader::new(config, cgroup_mount, env);
    let mut sources = Sources {
        file_pods: pods,
        kube_pods,
        outcomes,
    };
    let result = serve_until_signal(
        &shared,
        &mut pod_set,
        &mut reloader,
        &mut sources,
        &readiness,
        ports,
    )
    .await;
    tracing::info!("starting shutdown");
    readiness.set(false);
    shutdown.cancel();
    let steering_settings = &reloader.current().steering;
    stop(
        shared,
        steering,
        steering_settings.on_exit,
        &steering_settings.bpffs_dir,
    )
    .await;
    if steering_settings.on_exit == OnExit::Detach {
        remove_cni_chain(reloader.current());
    }
    let _ = admin_task.await;
    tracing::info!("shutdown complete");
    result
}

/// Returns the configured exclusions plus every identity provider endpoint whose host is an
/// IPv4 address, so pods' own calls to the provider are never steered into the agent.
pub fn excluded_networks(config: &Config) -> Vec<Ipv4Net> {
    let mut networks = config.steering.exclude_cidrs.clone();
    for url in config
        .plugins
        .iter()
        .flat_map(|plugin| plugin.kind.endpoints())
    {
        let host = url::Url::parse(url)
            .ok()
            .and_then(|url| url.host_str().map(str::to_string));
        if let Some(Ok(address)) = host.map(|host| host.parse::<std::net::Ipv4Addr>()) {
            let network = Ipv4Net::from(address);
            if !networks.contains(&network) {
                tracing::info!(network = %network, "excluding an identity provider address from steering");
                networks.push(network);
            }
        }
    }
    networks
}

/// Removes the plugin from the node's CNI configuration, so new pods no longer wait for
/// an agent.
fn remove_cni_chain(config: &Config) {
    let chain = config
        .kubernetes
        .as_ref()
        .and_then(|kubernetes| kubernetes.cni.as_ref())
        .and_then(|cni| cni.chain.as_ref());
    let Some(chain) = chain else {
        return;
    };
    match crate::cni::chain::remove(&chain.conf_dir, chain.bin_dir.as_deref()) {
        Ok(files) => {
            tracing::info!(files = ?files, "tokenmesh-cni removed from the node's CNI configuration")
        }
        Err(e) => {
            tracing::error!(error = %e, "failed to remove tokenmesh-cni from the node's CNI configuration; new pods fail to start until it is removed")
        }
    }
}

/// The pods of the workloads file and of the Kubernetes API, reconciled together, and
/// the outcome of the last reconciliation for the CNI plugin.
struct Sources {
    file_pods: Vec<Pod>,
    kube_pods: KubePods,
    outcomes: tokio::sync::watch::Sender<crate::cni::server::PodOutcomes>,
}

/// Handles reload triggers and Kubernetes pod changes until SIGINT or SIGTERM arrives.
async fn serve_until_signal(
    shared: &Arc<Shared>,
    pod_set: &mut PodSet,
    reloader: &mut Reloader,
    sources: &mut Sources,
    readiness: &Readiness,
    ports: (u16, u16),
) -> anyhow::Result<()> {
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut hangup = signal(SignalKind::hangup()).context("cannot handle SIGHUP")?;
    let mut poll = tokio::time::interval(reload::POLL_INTERVAL);
    loop {
        let trigger = tokio::select! {
            _ = terminate.recv() => {
                tracing::info!(signal = "SIGTERM", "signal received");
                return Ok(());
            }
            _ = interrupt.recv() => {
                tracing::info!(signal = "SIGINT", "signal received");
                return Ok(());
            }
            _ = hangup.recv() => "SIGHUP",
            _ = sources.kube_pods.changed() => {
                let desired = sources.kube_pods.merge(&sources.file_pods);
                let changes = pod_set.reconcile(shared, desired, ports).await;
                sources.outcomes.send_replace(pod_set.outcomes());
                readiness.set(changes.failed == 0);
                tracing::info!(
                    pods.added = changes.added,
                    pods.removed = changes.removed,
                    pods.replaced = changes.replaced,
                    pods.failed = changes.failed,
                    "Kubernetes pods applied"
                );
                continue;
            }
            _ = poll.tick() => {
                if !reloader.files_changed() {
                    continue;
                }
                "file change"
            }
        };
        let Some((config, pods)) = reloader.load(trigger) else {
            continue;
        };
        let generation = shared.policy.load().generation + 1;
        shared
            .policy
            .store(Arc::new(Policy::from_config(&config, generation)));
        sources.file_pods = pods;
        let desired = sources.kube_pods.merge(&sources.file_pods);
        let changes = pod_set.reconcile(shared, desired, ports).await;
        sources.outcomes.send_replace(pod_set.outcomes());
        readiness.set(changes.failed == 0 && sources.kube_pods.listed());
        tracing::info!(
            trigger,
            generation,
            pods.added = changes.added,
            pods.removed = changes.removed,
            pods.replaced = changes.replaced,
            pods.failed = changes.failed,
            "configuration reloaded"
        );
        reloader.accept(config);
    }
}

async fn stop(shared: Arc<Shared>, steering: Arc<Steering>, on_exit: OnExit, bpffs_dir: &Path) {
    shared.tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, shared.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout = ?DRAIN_TIMEOUT,
            "connections still open after the drain timeout; closing them"
        );
    }
    drop(shared);
    let mode = match on_exit {
        OnExit::Keep => steering::OnExit::Keep,
        OnExit::Detach => steering::OnExit::Detach,
    };
    let result = match Arc::into_inner(steering) {
        Some(steering) => steering.shutdown(mode),
        // Connections that outlived the drain still hold the handle; the pins are
        // removed by path instead.
        None if on_exit == OnExit::Detach => steering::uninstall(bpffs_dir),
        None => Ok(()),
    };
    match result {
        Ok(()) if on_exit == OnExit::Keep => tracing::info!(
            "eBPF programs stay attached: intercepted connections of pods are refused until an agent runs again; `tokenmesh-agent uninstall` removes them"
        ),
        Ok(()) => tracing::info!("eBPF programs detached and pins removed"),
        Err(e) => tracing::error!(error = %e, "failed to shut down steering"),
    }
}
