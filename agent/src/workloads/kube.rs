//! The Kubernetes workload source: watches the pods scheduled on this node and the
//! namespaces that enrol pods, and publishes the set of pods the agent should serve.
//!
//! Pods are listed and watched with the field selector `spec.nodeName=<node>`, namespaces
//! with the label selector `tokenmesh.io/enabled=true`. Each watch runs the list-then-watch
//! cycle of `kube::runtime::watcher`: after a watch error (HTTP 410 Gone, a dropped
//! connection) it lists again, and the new list replaces the old objects whole, so pods
//! removed while the watch was down disappear from the published set. Nothing is
//! published before both initial lists completed, so a half-listed node never makes the
//! agent stop pods it should keep.

mod settings;
mod translate;

use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    pin::pin,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use settings::{KubernetesSettings, KubernetesSpec, ProbeExemptionSpec};
pub use translate::{CREDENTIALS_KEY, Candidate, ENABLED_KEY, PROTECTED_PORTS_KEY, Skip};

use super::{
    Pod,
    cgroups::{self, ResolveError},
};

/// Errors that stop the Kubernetes source from starting.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    #[error(
        "cannot configure the Kubernetes client: {0}; the agent reads the in-cluster service account (KUBERNETES_SERVICE_HOST and /var/run/secrets/kubernetes.io/serviceaccount) or KUBECONFIG"
    )]
    Client(#[source] kube::Error),
}

/// Builds a client from the in-cluster service account, or from KUBECONFIG outside a pod.
pub async fn default_client() -> Result<Client, KubeSourceError> {
    Client::try_default().await.map_err(KubeSourceError::Client)
}

/// Watches the API server and keeps `sender` filled with the sorted set of enrolled pods,
/// until `shutdown` is cancelled. `cgroup_mount` is the cgroup v2 mount. The channel contains
/// `None` until the first complete listing.
pub async fn run(
    client: Client,
    settings: KubernetesSettings,
    cgroup_mount: PathBuf,
    sender: watch::Sender<Option<Vec<Pod>>>,
    shutdown: CancellationToken,
) {
    let pods_api: Api<KubePod> = Api::all(client.clone());
    let namespaces_api: Api<Namespace> = Api::all(client);
    let pod_events = watcher(
        pods_api,
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name)),
    )
    .default_backoff();
    let namespace_events = watcher(
        namespaces_api,
        watcher::Config::default().labels(&format!("{ENABLED_KEY}=true")),
    )
    .default_backoff();
    tracing::info!(
        node = %settings.node_name,
        "watching the Kubernetes API for this node's pods"
    );

    let mut state = State::new(settings, cgroup_mount);
    let mut pod_events = pin!(pod_events);
    let mut namespace_events = pin!(namespace_events);
    let mut retry = tokio::time::interval(state.settings.resolve_retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = pod_events.next() => match event {
                Some(Ok(event)) => state.pods.apply(event, |pod| pod.metadata.uid.clone()),
                Some(Err(e)) => log_watch_error("pods", &e),
                None => break,
            },
            event = namespace_events.next() => match event {
                Some(Ok(event)) => state.namespaces.apply(event, |ns| ns.metadata.name.clone()),
                Some(Err(e)) => log_watch_error("namespaces", &e),
                None => break,
            },
            _ = retry.tick() => {
                if state.pending.is_empty() {
                    continue;
                }
            },
        }
        if let Some(pods) = state.desired() {
            sender.send_if_modified(|current| {
                if current.as_ref() == Some(&pods) {
                    return false;
                }
                tracing::info!(pods = pods.len(), "Kubernetes pod set changed");
                *current = Some(pods);
                true
            });
        }
    }
    tracing::info!("Kubernetes watch stopped");
}

fn log_watch_error(resource: &str, error: &watcher::Error) {
    // The watcher lists again after HTTP 410 Gone and retries other failures with backoff.
    tracing::warn!(resource, error = %error, "Kubernetes watch failed; retrying after a backoff");
}

/// Objects of one watch, with the listing in progress kept apart until it completes.
struct Store<K> {
    objects: HashMap<String, K>,
    listing: Option<HashMap<String, K>>,
    listed: bool,
}

impl<K> Store<K> {
    fn new() -> Self {
        Store {
            objects: HashMap::new(),
            listing: None,
            listed: false,
        }
    }

    fn apply(&mut self, event: watcher::Event<K>, key: impl Fn(&K) -> Option<String>) {
        match event {
            watcher::Event::Init => self.listing = Some(HashMap::new()),
            watcher::Event::InitApply(object) => {
                if let (Some(listing), Some(key)) = (&mut self.listing, key(&object)) {
                    listing.insert(key, object);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listing) = self.listing.take() {
                    self.objects = listing;
                }
                self.listed = true;
            }
            watcher::Event::Apply(object) => {
                if let Some(key) = key(&object) {
                    self.objects.insert(key, object);
                }
            }
            watcher::Event::Delete(object) => {
                if let Some(key) = key(&object) {
                    self.objects.remove(&key);
                }
            }
        }
    }
}

/// A pod's cgroup and network namespace, kept while the namespace path stays valid.
#[derive(Clone)]
struct Resolved {
    cgroup: PathBuf,
    netns: PathBuf,
}

struct State {
    settings: KubernetesSettings,
    kubepods_root: PathBuf,
    pods: Store<KubePod>,
    namespaces: Store<Namespace>,
    resolved: HashMap<String, Resolved>,
    /// UIDs of enrolled pods whose cgroup or processes were not found at the last look.
    pending: HashSet<String>,
    /// Last skip reason logged per UID, so a reason is logged once, not on every event.
    skipped: HashMap<String, String>,
}

impl State {
    fn new(settings: KubernetesSettings, cgroup_mount: PathBuf) -> State {
        State {
            kubepods_root: cgroup_mount.join(&settings.kubepods_root),
            settings,
            pods: Store::new(),
            namespaces: Store::new(),
            resolved: HashMap::new(),
            pending: HashSet::new(),
            skipped: HashMap::new(),
        }
    }

    /// Returns the enrolled, resolved pods, or `None` until both initial listings completed.
    fn desired(&mut self) -> Option<Vec<Pod>> {
        if !self.pods.listed || !self.namespaces.listed {
            return None;
        }
        let mut candidates = Vec::new();
        let mut skipped = HashMap::new();
        for (uid, object) in &self.pods.objects {
            let namespace = object.metadata.namespace.clone().unwrap_or_default();
            let namespace_enrolled = self.namespaces.objects.contains_key(&namespace);
            let candidate = match translate::candidate(
                object,
                namespace_enrolled,
                self.settings.probe_exemption,
                &self.settings.probe_extra_sources,
            ) {
                Ok(candidate) => candidate,
                Err(skip) => {
                    let reason = skip.to_string();
                    if self.skipped.get(uid) != Some(&reason) && skip != Skip::NotEnrolled {
                        tracing::debug!(pod = %pod_name(object), uid, reason, "pod not steered");
                    }
                    skipped.insert(uid.clone(), reason);
                    continue;
                }
            };
            candidates.push(candidate);
        }

        let mut desired = Vec::new();
        let mut pending = HashSet::new();
        for candidate in candidates {
            match self.resolve(&candidate) {
                Ok(resolved) => desired.push(discovered(candidate, resolved)),
                Err(e) => {
                    let reason = e.to_string();
                    if self.skipped.get(&candidate.uid) != Some(&reason) {
                        tracing::info!(pod = %candidate.identity, uid = candidate.uid, reason, "enrolled pod not ready for steering; retrying");
                    }
                    skipped.insert(candidate.uid.clone(), reason);
                    pending.insert(candidate.uid);
                }
            }
        }
        self.resolved
            .retain(|uid, _| self.pods.objects.contains_key(uid));
        self.pending = pending;
        self.skipped = skipped;
        desired.sort_by(|a, b| a.identity.cmp(&b.identity));
        Some(desired)
    }

    fn resolve(&mut self, candidate: &Candidate) -> Result<Resolved, ResolveError> {
        if let Some(known) = self.resolved.get(&candidate.uid) {
            // The namespace path names a process; once it exits, look up another one.
            if known.netns.exists() && known.cgroup.is_dir() {
                return Ok(known.clone());
            }
        }
        let (cgroup, _driver) = cgroups::find_pod_cgroup(
            &self.kubepods_root,
            self.settings.cgroup_driver,
            candidate.qos,
            &candidate.uid,
        )?;
        let netns = cgroups::find_pod_netns(&cgroup, &self.settings.proc_path)?;
        let resolved = Resolved { cgroup, netns };
        self.resolved
            .insert(candidate.uid.clone(), resolved.clone());
        Ok(resolved)
    }
}

fn discovered(candidate: Candidate, resolved: Resolved) -> Pod {
    Pod {
        identity: candidate.identity,
        ip: candidate.ip,
        netns: resolved.netns,
        cgroup: resolved.cgroup,
        protected_ports: candidate.protected_ports,
        labels: candidate.labels,
        credentials: candidate.credentials,
        probe_exemption: candidate.probe_exemption,
    }
}

fn pod_name(object: &KubePod) -> String {
    format!(
        "{}/{}",
        object.metadata.namespace.as_deref().unwrap_or(""),
        object.metadata.name.as_deref().unwrap_or("")
    )
}
