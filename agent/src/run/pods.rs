//! The set of pods whose listeners run, brought in line with a desired list.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    cni::server::{PodOutcome, PodOutcomes},
    netns,
    proxy::{self, PodHandle, Shared},
    workloads::{Pod, PodIdentity},
};

/// Pods with running listeners, by identity.
#[derive(Default)]
pub struct PodSet {
    running: BTreeMap<PodIdentity, PodHandle>,
    /// Pods the last reconciliation failed to start, with the error.
    failed: BTreeMap<PodIdentity, PodOutcome>,
}

/// Counts of the changes one reconciliation made.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub removed: usize,
    pub replaced: usize,
    pub failed: usize,
}

impl PodSet {
    /// Starts pods that are new, stops pods that are gone and restarts pods whose
    /// identity facts, address, namespace, cgroup or ports changed. Pods that stay the
    /// same keep their listeners and connections. A pod that fails to start is logged and
    /// left out, so one bad entry does not stop the others. A changed pod that fails to
    /// restart keeps running as it was.
    pub async fn reconcile(
        &mut self,
        shared: &Arc<Shared>,
        desired: Vec<Pod>,
        ports: (u16, u16),
    ) -> Changes {
        let mut changes = Changes::default();
        let desired: BTreeMap<PodIdentity, Pod> = desired
            .into_iter()
            .map(|pod| (pod.identity.clone(), pod))
            .collect();
        shared.pods_by_ip.store(Arc::new(
            desired
                .values()
                .map(|pod| (IpAddr::from(pod.ip), pod.identity.clone()))
                .collect::<HashMap<_, _>>(),
        ));

        let gone: Vec<PodIdentity> = self
            .running
            .keys()
            .filter(|identity| !desired.contains_key(*identity))
            .cloned()
            .collect();
        for identity in gone {
            let handle = self.running.remove(&identity).expect("listed above");
            changes.removed += 1;
            if let Err(e) = proxy::stop_pod(shared, handle) {
                tracing::error!(pod = %identity, error = %e, "failed to stop steering a removed pod");
            }
        }

        self.failed.clear();
        for (identity, pod) in desired {
            if self
                .running
                .get(&identity)
                .is_some_and(|handle| handle.pod() == &pod)
            {
                continue;
            }
            // A changed pod in the same namespace starts beside its old handle, so its
            // traffic stays steered while the change is applied. A pod in a new
            // namespace (a new sandbox) has nothing to carry over: its old namespace is
            // released first, since one address can be protected in one namespace only.
            let moved = self
                .running
                .get(&identity)
                .is_some_and(|old| !netns::same_namespace(&old.pod().netns, &pod.netns));
            if moved {
                let old = self.running.remove(&identity).expect("checked above");
                changes.replaced += 1;
                if let Err(e) = proxy::stop_pod(shared, old) {
                    tracing::error!(pod = %identity, error = %e, "failed to stop steering a pod's old network namespace");
                }
            }
            let previous = self.running.get(&identity);
            let netns = pod.netns.clone();
            match proxy::start_pod(shared, pod, ports, previous).await {
                Ok(handle) => {
                    match self.running.remove(&identity) {
                        Some(old) => {
                            changes.replaced += 1;
                            if let Err(e) = proxy::retire_pod(shared, old, &handle) {
                                tracing::error!(pod = %identity, error = %e, "failed to remove the old steering of a changed pod");
                            }
                        }
                        None if moved => {}
                        None => changes.added += 1,
                    }
                    self.running.insert(identity, handle);
                }
                Err(e) => {
                    changes.failed += 1;
                    if previous.is_some() {
                        tracing::error!(pod = %identity, error = %e, "failed to apply a change to a pod; it stays steered as before");
                    } else {
                        tracing::error!(pod = %identity, error = %e, "failed to enrol pod");
                    }
                    let error = Some(e.to_string());
                    self.failed.insert(identity, PodOutcome { netns, error });
                }
            }
        }
        changes
    }

    /// Lists the running pods and the pods the last reconciliation failed to start.
    pub fn outcomes(&self) -> PodOutcomes {
        let mut outcomes = self.failed.clone();
        for (identity, handle) in &self.running {
            let outcome = PodOutcome {
                netns: handle.pod().netns.clone(),
                error: None,
            };
            outcomes.insert(identity.clone(), outcome);
        }
        outcomes
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}
