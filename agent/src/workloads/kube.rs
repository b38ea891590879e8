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
    net::Ipv4Addr,
    path::PathBuf,
    pin::pin,
};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod as KubePod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::cni::{
    protocol::{Sandbox, SandboxRef},
    server::{Decision, SandboxEvent},
};

pub use settings::{CniSettings, CniSpec, KubernetesSettings, KubernetesSpec, ProbeExemptionSpec};
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
/// `None` until the first complete listing. `sandboxes` carries the new pod sandboxes the
/// CNI plugin reports: an enrolled pod is steered from its sandbox's network namespace
/// before the API shows it running.
pub async fn run(
    client: Client,
    settings: KubernetesSettings,
    cgroup_mount: PathBuf,
    sender: watch::Sender<Option<Vec<Pod>>>,
    mut sandboxes: Option<mpsc::Receiver<SandboxEvent>>,
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
            event = next_sandbox_event(&mut sandboxes) => match event {
                Some(event) => state.sandbox_event(event),
                None => sandboxes = None,
            },
            _ = retry.tick() => {
                if state.pending.is_empty() && state.waiting.is_empty() {
                    continue;
                }
            },
        }
        state.decide_waiting();
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

async fn next_sandbox_event(
    receiver: &mut Option<mpsc::Receiver<SandboxEvent>>,
) -> Option<SandboxEvent> {
    match receiver {
        Some(receiver) => receiver.recv().await,
        None => std::future::pending().await,
    }
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

/// A pod sandbox the CNI plugin reported, for an enrolled pod.
struct SandboxRecord {
    container_id: String,
    netns: PathBuf,
    ip: Option<Ipv4Addr>,
}

/// A new sandbox whose pod the API has not shown yet.
struct Waiting {
    sandbox: Sandbox,
    reply: oneshot::Sender<Decision>,
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
    /// Sandboxes of enrolled pods by pod UID, from the CNI plugin.
    sandboxes: HashMap<String, SandboxRecord>,
    waiting: Vec<Waiting>,
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
            sandboxes: HashMap::new(),
            waiting: Vec::new(),
        }
    }

    fn sandbox_event(&mut self, event: SandboxEvent) {
        match event {
            SandboxEvent::Add(sandbox, reply) => self.waiting.push(Waiting { sandbox, reply }),
            SandboxEvent::Del(pod) => {
                let uids: Vec<String> = self
                    .sandboxes
                    .iter()
                    .filter(|(_, record)| record.container_id == pod.container_id)
                    .map(|(uid, _)| uid.clone())
                    .collect();
                for uid in uids {
                    self.sandboxes.remove(&uid);
                }
            }
        }
    }

    /// Decides about the new sandboxes whose pods the API now shows, and records those of
    /// enrolled pods. A sandbox waits while its pod is not listed yet, and while the
    /// kubelet has not yet reported the node addresses that its probe exemption needs.
    fn decide_waiting(&mut self) {
        if !self.pods.listed || !self.namespaces.listed {
            return;
        }
        for waiting in std::mem::take(&mut self.waiting) {
            if waiting.reply.is_closed() {
                continue;
            }
            let Some((uid, object)) = self.find_pod(&waiting.sandbox.pod) else {
                self.waiting.push(waiting);
                continue;
            };
            let (uid, object) = (uid.clone(), object.clone());
            let Some(decision) = self.decide(&uid, &object, &waiting.sandbox) else {
                self.waiting.push(waiting);
                continue;
            };
            let decision = match decision {
                Decision::Steer { identity, .. } => {
                    let netns = self.sandbox_netns(&uid, &waiting.sandbox.netns);
                    let record = SandboxRecord {
                        container_id: waiting.sandbox.pod.container_id.clone(),
                        netns: netns.clone(),
                        ip: waiting.sandbox.ip,
                    };
                    self.sandboxes.insert(uid, record);
                    Decision::Steer { identity, netns }
                }
                other => other,
            };
            let _ = waiting.reply.send(decision);
        }
    }

    /// Returns the path under which to steer a sandbox's namespace. A pod already steered from a
    /// process's namespace (a CNI CHECK, or a pod the agent found before the sandbox was
    /// reported) keeps that path, so its steering is not restarted for a new name.
    fn sandbox_netns(&self, uid: &str, netns: &std::path::Path) -> PathBuf {
        match self.resolved.get(uid) {
            Some(known) if crate::netns::same_namespace(&known.netns, netns) => known.netns.clone(),
            _ => netns.to_path_buf(),
        }
    }

    fn find_pod(&self, pod: &SandboxRef) -> Option<(&String, &KubePod)> {
        if let Some(uid) = &pod.uid {
            return self.pods.objects.get_key_value(uid);
        }
        self.pods.objects.iter().find(|(_, object)| {
            object.metadata.namespace.as_deref() == Some(pod.namespace.as_str())
                && object.metadata.name.as_deref() == Some(pod.name.as_str())
        })
    }

    /// Decides about a new sandbox of `object`; `None` means wait for more facts.
    fn decide(&self, uid: &str, object: &KubePod, sandbox: &Sandbox) -> Option<Decision> {
        let namespace = object.metadata.namespace.clone().unwrap_or_default();
        let candidate = translate::candidate(
            object,
            self.namespaces.objects.contains_key(&namespace),
            self.settings.probe_exemption,
            &self.settings.probe_extra_sources,
            sandbox.ip,
        );
        let decision = match candidate {
            Ok(candidate) => {
                let has_host_ips = object
                    .status
                    .as_ref()
                    .and_then(|status| status.host_ips.as_ref())
                    .is_some_and(|ips| !ips.is_empty());
                if self.settings.probe_exemption
                    && !candidate.probe_exemption.ports.is_empty()
                    && !has_host_ips
                {
                    // The exemption would change once status.hostIPs arrives, and
                    // restarting the pod's steering then would leave a gap.
                    return None;
                }
                Decision::Steer {
                    identity: candidate.identity,
                    netns: sandbox.netns.clone(),
                }
            }
            Err(Skip::NotRunning(phase)) if sandbox.ip.is_none() && phase_may_run(&phase) => {
                Decision::Reject(
                    "the CNI result has no IPv4 address, and tokenmesh steers IPv4 only".into(),
                )
            }
            Err(Skip::Invalid(reason)) => Decision::Reject(format!("the pod {reason} (UID {uid})")),
            Err(skip) => Decision::Skip(format!("pod {skip}")),
        };
        Some(decision)
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
            let sandbox_ip = self.sandboxes.get(uid).and_then(|sandbox| sandbox.ip);
            let candidate = match translate::candidate(
                object,
                namespace_enrolled,
                self.settings.probe_exemption,
                &self.settings.probe_extra_sources,
                sandbox_ip,
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
        self.sandboxes
            .retain(|uid, _| self.pods.objects.contains_key(uid));
        self.pending = pending;
        self.skipped = skipped;
        desired.sort_by(|a, b| a.identity.cmp(&b.identity));
        Some(desired)
    }

    fn resolve(&mut self, candidate: &Candidate) -> Result<Resolved, ResolveError> {
        // The sandbox's namespace path stays valid as long as the sandbox, and it exists
        // before any process of the pod does.
        let sandbox_netns = self
            .sandboxes
            .get(&candidate.uid)
            .map(|sandbox| sandbox.netns.clone());
        if let Some(netns) = sandbox_netns {
            if netns.exists() {
                let cgroup = self.pod_cgroup(candidate)?;
                return Ok(Resolved { cgroup, netns });
            }
            tracing::info!(pod = %candidate.identity, netns = %netns.display(), "pod sandbox's network namespace is gone; looking up the pod's processes");
            self.sandboxes.remove(&candidate.uid);
        }
        if let Some(known) = self.resolved.get(&candidate.uid) {
            // The namespace path names a process; once it exits, look up another one.
            if known.netns.exists() && known.cgroup.is_dir() {
                return Ok(known.clone());
            }
        }
        let cgroup = self.pod_cgroup(candidate)?;
        let netns = cgroups::find_pod_netns(&cgroup, &self.settings.proc_path)?;
        let resolved = Resolved { cgroup, netns };
        self.resolved
            .insert(candidate.uid.clone(), resolved.clone());
        Ok(resolved)
    }

    fn pod_cgroup(&self, candidate: &Candidate) -> Result<PathBuf, ResolveError> {
        let (cgroup, _driver) = cgroups::find_pod_cgroup(
            &self.kubepods_root,
            self.settings.cgroup_driver,
            candidate.qos,
            &candidate.uid,
        )?;
        Ok(cgroup)
    }
}

/// Phases in which a pod's containers start or run.
fn phase_may_run(phase: &str) -> bool {
    matches!(phase, "" | "Pending" | "Running")
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
