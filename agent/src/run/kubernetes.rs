//! Pods from the Kubernetes API, kept beside the pods of the workloads file.

use std::{collections::HashSet, path::Path};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{
    config::Config,
    workloads::{Pod, PodIdentity, kube},
};

/// The latest pod set of the Kubernetes source, or nothing when the config has no
/// `workloads.kubernetes` section.
pub struct KubePods {
    receiver: Option<watch::Receiver<Option<Vec<Pod>>>>,
}

impl KubePods {
    /// Starts watching the API server when the config has a `workloads.kubernetes` section. The watch stops when
    /// `shutdown` is cancelled.
    // The section is read once: a reload that changes it logs a warning, and the change
    // takes effect after a restart.
    pub async fn start(
        config: &Config,
        cgroup_mount: &Path,
        shutdown: CancellationToken,
    ) -> anyhow::Result<KubePods> {
        let Some(settings) = config.kubernetes.clone() else {
            return Ok(KubePods { receiver: None });
        };
        let client = kube::default_client().await?;
        let (sender, receiver) = watch::channel(None);
        tokio::spawn(kube::run(
            client,
            settings,
            cgroup_mount.to_path_buf(),
            sender,
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
