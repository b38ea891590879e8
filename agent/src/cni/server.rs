//! The agent's side: a Unix socket that takes the plugin's requests, hands new sandboxes
//! to the Kubernetes source, and replies once the pod's listeners and steering run.

use std::{
    collections::BTreeMap,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};
use tokio_util::sync::CancellationToken;

use super::protocol::{MAX_LINE, Reply, Request, Sandbox, SandboxRef};
use crate::workloads::PodIdentity;

/// The plugin writes its request at once; a client that does not is dropped.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A sandbox change for the Kubernetes source.
#[derive(Debug)]
pub enum SandboxEvent {
    /// A new sandbox; the source sends its decision once it has seen the pod.
    Add(Sandbox, oneshot::Sender<Decision>),
    Del(SandboxRef),
}

/// The Kubernetes source's decision about a new sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The pod is enrolled and will be steered under this identity, from the namespace
    /// at `netns`.
    Steer {
        identity: PodIdentity,
        netns: PathBuf,
    },
    /// The pod is not enrolled, for this reason.
    Skip(String),
    /// The pod must not start, for this reason.
    Reject(String),
}

/// The outcome of the last attempt to start each pod of the agent.
pub type PodOutcomes = BTreeMap<PodIdentity, PodOutcome>;

/// Whether a pod's listeners and steering run, and in which network namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodOutcome {
    pub netns: PathBuf,
    /// The error that stopped the pod from being steered.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen on the CNI socket {path}: {source}; check workloads.kubernetes.cni.socket and the hostPath that holds it"
    )]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Binds the socket, replacing a file an earlier agent left, and makes it reachable by
/// root alone.
pub fn bind(path: &Path) -> Result<UnixListener, ServerError> {
    let error = |source| ServerError::Listen {
        path: path.to_path_buf(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(error)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let listener = UnixListener::bind(path).map_err(error)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}

/// Serves the plugin's requests until `shutdown` is cancelled, then removes the socket.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    events: mpsc::Sender<SandboxEvent>,
    outcomes: watch::Receiver<PodOutcomes>,
    shutdown: CancellationToken,
) {
    tracing::info!(socket = %path.display(), "listening for the CNI plugin");
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "CNI socket accept failed");
                    continue;
                }
            },
        };
        let events = events.clone();
        let outcomes = outcomes.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(stream, events, outcomes).await {
                tracing::warn!(error = %e, "CNI plugin connection failed");
            }
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn handle(
    stream: UnixStream,
    events: mpsc::Sender<SandboxEvent>,
    outcomes: watch::Receiver<PodOutcomes>,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(MAX_LINE as u64));
    tokio::time::timeout(REQUEST_READ_TIMEOUT, reader.read_line(&mut line))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no complete request line within 5 s",
            )
        })??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(request) => answer(request, &events, outcomes).await,
        Err(e) => Reply::Failed {
            message: format!(
                "invalid request from the plugin: {e}; use the tokenmesh-cni of the same version as the agent"
            ),
        },
    };
    let mut bytes = serde_json::to_vec(&reply)?;
    bytes.push(b'\n');
    write.write_all(&bytes).await
}

async fn answer(
    request: Request,
    events: &mpsc::Sender<SandboxEvent>,
    outcomes: watch::Receiver<PodOutcomes>,
) -> Reply {
    let stopping = || Reply::Failed {
        message: "the agent is shutting down".into(),
    };
    let sandbox = match request {
        Request::Status => return Reply::Done,
        Request::Del(pod) => {
            tracing::debug!(
                pod.namespace = pod.namespace,
                pod.name = pod.name,
                container.id = pod.container_id,
                "CNI DEL"
            );
            return match events.send(SandboxEvent::Del(pod)).await {
                Ok(()) => Reply::Done,
                Err(_) => stopping(),
            };
        }
        Request::Add(sandbox) => sandbox,
    };

    let timeout = Duration::from_millis(sandbox.timeout_ms);
    let pod = format!("{}/{}", sandbox.pod.namespace, sandbox.pod.name);
    tracing::info!(pod, netns = %sandbox.netns.display(), ip = ?sandbox.ip, "CNI ADD: new pod sandbox");
    let started = tokio::time::Instant::now();
    let (decision_sender, decision) = oneshot::channel();
    if events
        .send(SandboxEvent::Add(sandbox, decision_sender))
        .await
        .is_err()
    {
        return stopping();
    }
    let (identity, netns) = match tokio::time::timeout(timeout, decision).await {
        Ok(Ok(Decision::Steer { identity, netns })) => (identity, netns),
        Ok(Ok(Decision::Skip(reason))) => {
            tracing::info!(pod, reason, "new pod not enrolled; letting it start");
            return Reply::NotEnrolled { reason };
        }
        Ok(Ok(Decision::Reject(message))) => {
            tracing::warn!(
                pod,
                reason = message,
                "new pod held: it is enrolled but cannot be steered"
            );
            return Reply::Failed { message };
        }
        Ok(Err(_)) => return stopping(),
        Err(_) => {
            let message = format!(
                "the agent did not see the pod in the Kubernetes API within {}",
                humantime::format_duration(timeout)
            );
            tracing::warn!(pod, "new pod held: {message}");
            return Reply::Failed { message };
        }
    };

    let remaining = timeout.saturating_sub(started.elapsed());
    let outcome = wait_for_outcome(outcomes, &identity, &netns, remaining).await;
    match outcome {
        Some(PodOutcome { error: None, .. }) => {
            tracing::info!(pod = %identity, "new pod steered before its containers start");
            Reply::Steered
        }
        Some(PodOutcome {
            error: Some(error), ..
        }) => Reply::Failed {
            message: format!("steering failed: {error}"),
        },
        None => Reply::Failed {
            message: format!(
                "the agent did not steer the pod within {}",
                humantime::format_duration(timeout)
            ),
        },
    }
}

/// Waits until the pod has an outcome for the sandbox's network namespace.
async fn wait_for_outcome(
    mut outcomes: watch::Receiver<PodOutcomes>,
    identity: &PodIdentity,
    netns: &Path,
    timeout: Duration,
) -> Option<PodOutcome> {
    let wait = outcomes.wait_for(|outcomes| {
        outcomes
            .get(identity)
            .is_some_and(|outcome| outcome.netns == netns)
    });
    match tokio::time::timeout(timeout, wait).await {
        Ok(Ok(outcomes)) => outcomes.get(identity).cloned(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::AsyncReadExt as _;

    use super::*;
    use crate::cni::{plugin, protocol::Sandbox};

    fn sandbox(netns: &Path) -> Sandbox {
        Sandbox {
            pod: SandboxRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: None,
                container_id: "abc".into(),
            },
            netns: netns.to_path_buf(),
            ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
            timeout_ms: 2000,
        }
    }

    /// Starts the server and returns its socket, the source's end of the events, the
    /// outcomes sender and the shutdown token.
    fn start(
        dir: &Path,
    ) -> (
        PathBuf,
        mpsc::Receiver<SandboxEvent>,
        watch::Sender<PodOutcomes>,
        CancellationToken,
    ) {
        let path = dir.join("run/cni.sock");
        let listener = bind(&path).unwrap();
        let (events, receiver) = mpsc::channel(4);
        let (outcomes, outcomes_receiver) = watch::channel(PodOutcomes::new());
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            path.clone(),
            events,
            outcomes_receiver,
            shutdown.clone(),
        ));
        (path, receiver, outcomes, shutdown)
    }

    async fn call(path: PathBuf, request: Request) -> Reply {
        tokio::task::spawn_blocking(move || {
            plugin::call(&path, &request, Duration::from_secs(5)).unwrap()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn add_replies_once_pod_steered() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut events, outcomes, shutdown) = start(dir.path());
        let netns = dir.path().join("netns");
        let identity = PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            service_account: "web".into(),
        };

        let reply = tokio::spawn(call(path.clone(), Request::Add(sandbox(&netns))));
        let Some(SandboxEvent::Add(received, decision)) = events.recv().await else {
            panic!("expected an ADD event");
        };
        assert_eq!(received.netns, netns);
        decision
            .send(Decision::Steer {
                identity: identity.clone(),
                netns: netns.clone(),
            })
            .unwrap();
        // The reply waits for the pod's outcome in the sandbox's namespace.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!reply.is_finished());
        let outcome = PodOutcome {
            netns: netns.clone(),
            error: None,
        };
        outcomes.send_replace(PodOutcomes::from([(identity, outcome)]));
        assert_eq!(reply.await.unwrap(), Reply::Steered);

        shutdown.cancel();
    }

    #[tokio::test]
    async fn add_reports_steering_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut events, outcomes, _shutdown) = start(dir.path());
        let netns = dir.path().join("netns");
        let identity = PodIdentity {
            namespace: "shop".into(),
            name: "web-0".into(),
            service_account: "web".into(),
        };
        let outcome = PodOutcome {
            netns: netns.clone(),
            error: Some("cannot listen".into()),
        };
        outcomes.send_replace(PodOutcomes::from([(identity.clone(), outcome)]));

        let reply = tokio::spawn(call(path.clone(), Request::Add(sandbox(&netns))));
        let Some(SandboxEvent::Add(_, decision)) = events.recv().await else {
            panic!("expected an ADD event");
        };
        decision.send(Decision::Steer { identity, netns }).unwrap();
        assert_eq!(
            reply.await.unwrap(),
            Reply::Failed {
                message: "steering failed: cannot listen".into()
            }
        );
    }

    #[tokio::test]
    async fn add_not_enrolled_and_del() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut events, _outcomes, _shutdown) = start(dir.path());

        let reply = tokio::spawn(call(path.clone(), Request::Add(sandbox(dir.path()))));
        let Some(SandboxEvent::Add(_, decision)) = events.recv().await else {
            panic!("expected an ADD event");
        };
        decision
            .send(Decision::Skip("pod is not enrolled".into()))
            .unwrap();
        assert_eq!(
            reply.await.unwrap(),
            Reply::NotEnrolled {
                reason: "pod is not enrolled".into()
            }
        );

        let pod = sandbox(dir.path()).pod;
        assert_eq!(
            call(path.clone(), Request::Del(pod.clone())).await,
            Reply::Done
        );
        let Some(SandboxEvent::Del(deleted)) = events.recv().await else {
            panic!("expected a DEL event");
        };
        assert_eq!(deleted, pod);
        assert_eq!(call(path.clone(), Request::Status).await, Reply::Done);
    }

    #[tokio::test]
    async fn invalid_request_answered() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _events, _outcomes, _shutdown) = start(dir.path());
        let mut stream = UnixStream::connect(&path).await.unwrap();
        stream.write_all(b"{\"command\":\"up\"}\n").await.unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).await.unwrap();
        let reply: Reply = serde_json::from_str(&reply).unwrap();
        let Reply::Failed { message } = reply else {
            panic!("expected a failure, got {reply:?}");
        };
        assert!(message.contains("invalid request"), "{message}");
    }

    #[tokio::test]
    async fn shutdown_removes_socket() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _events, _outcomes, shutdown) = start(dir.path());
        assert!(path.exists());
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        shutdown.cancel();
        for _ in 0..50 {
            if !path.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("{} still exists after shutdown", path.display());
    }
}
