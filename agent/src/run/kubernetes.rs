//! Pods from the Kubernetes API, kept beside the pods of the workloads file.

use std::{collections::HashSet, path::Path, time::Duration};

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    cni::{
        chain::{Chain, Ensured},
        server::{self, PodOutcomes},
    },
    config::Config,
    workloads::{Pod, PodIdentity, kube},
};

/// How often the agent checks that the node's CNI configuration still lists the plugin;
/// some network plugins rewrite their file when they restart.
const CHAIN_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// New sandboxes waiting for the Kubernetes source.
const SANDBOX_QUEUE: usize = 256;

/// The latest pod set of the Kubernetes source, or nothing when the config has no
/// `workloads.kubernetes` section.
pub struct KubePods {
    receiver: Option<watch::Receiver<Option<Vec<Pod>>>>,
}

impl KubePods {
    /// Starts watching the API server when the config has a `workloads.kubernetes` section,
    /// and with its `cni` section the socket for the CNI plugin. Both stop when `shutdown`
    /// is cancelled. `outcomes` follows the pods the agent steers, for replies to the plugin.
    // The section is read once: a reload that changes it logs a warning, and the change
    // takes effect after a restart.
    pub async fn start(
        config: &Config,
        cgroup_mount: &Path,
        outcomes: watch::Receiver<PodOutcomes>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<KubePods> {
        let Some(settings) = config.kubernetes.clone() else {
            return Ok(KubePods { receiver: None });
        };
        let client = kube::default_client().await?;
        let sandboxes = match &settings.cni {
            Some(cni) => {
                let listener = server::bind(&cni.socket)?;
                let (events, sandboxes) = mpsc::channel(SANDBOX_QUEUE);
                tokio::spawn(server::serve(
                    listener,
                    cni.socket.clone(),
                    events,
                    outcomes,
                    shutdown.clone(),
                ));
                if let Some(chain) = cni.chain.clone() {
                    tokio::spawn(keep_chained(chain, shutdown.clone()));
                }
                Some(sandboxes)
            }
            None => None,
        };
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(kube::run(
            client,
            settings,
            cgroup_mount.to_path_buf(),
            sender,
            sandboxes,
            shutdown,
        ));
        Ok(KubePods {
            receiver: Some(receiver),
        })
    }

    /// True when the config has a `workloads.kubernetes` section.
    pub fn enabled(&self) -> bool {
        self.receiver.is_some()
    }

    /// True without Kubernetes, and once the first complete listing has arrived.
    pub fn listed(&self) -> bool {
        self.receiver
            .as_ref()
            .is_none_or(|receiver| receiver.borrow().is_some())
    }

    /// Waits for a new pod set; never returns without Kubernetes or after the watch ended.
    pub async fn changed(&mut self) {
        if let Some(receiver) = &mut self.receiver
            && receiver.changed().await.is_ok()
        {
            return;
        }
        std::future::pending().await
    }

    /// Returns the pods of the workloads file followed by the Kubernetes pods. A Kubernetes
    /// pod with the identity of a file pod is left out, because the file entry wins.
    pub fn merge(&self, file_pods: &[Pod]) -> Vec<Pod> {
        let mut pods = file_pods.to_vec();
        let Some(receiver) = &self.receiver else {
            return pods;
        };
        let known: HashSet<PodIdentity> = file_pods.iter().map(|p| p.identity.clone()).collect();
        for pod in receiver.borrow().iter().flatten() {
            if known.contains(&pod.identity) {
                tracing::warn!(pod = %pod.identity, "pod is both in the workloads file and in Kubernetes; the file entry is used");
                continue;
            }
            pods.push(pod.clone());
        }
        pods
    }
}

/// Keeps the plugin in the node's CNI configuration until `shutdown` is cancelled. The
/// plugin is added only after the socket listens, so no sandbox waits on a closed socket
/// for longer than the agent takes to start.
async fn keep_chained(chain: Chain, shutdown: CancellationToken) {
    let mut interval = tokio::time::interval(CHAIN_CHECK_INTERVAL);
    let mut last_error = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = interval.tick() => {}
        }
        match chain.ensure() {
            Ok(Ensured::Written(path)) => {
                tracing::info!(file = %path.display(), "tokenmesh-cni added to the node's CNI configuration");
                last_error = None;
            }
            Ok(Ensured::Unchanged(_)) => last_error = None,
            Err(e) => {
                let message = e.to_string();
                if last_error.as_ref() != Some(&message) {
                    tracing::warn!(
                        error = message,
                        "cannot add tokenmesh-cni to the node's CNI configuration; new pods start without being held for steering"
                    );
                    last_error = Some(message);
                }
            }
        }
    }
}
