//! The per-pod listeners. Each pod gets an outbound listener on 127.0.0.1 inside its own
//! network namespace (connect4 redirects the pod's intercepted connections there) and, when
//! a validator protects it, an inbound listener that sk_lookup feeds with the SYNs for its
//! protected ports. Upstream sockets are made in the same namespace, so traffic keeps the
//! pod's own address.

mod detect;
mod inbound;
mod outbound;
mod respond;
mod tcp;
mod upstream;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use arc_swap::ArcSwap;
use http::{Request, Response, StatusCode, header::HOST};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    audit::{Audit, AuditEvent, Decision},
    config::ProxyConfig,
    netns::Netns,
    oauth::{introspect::Introspector, jwks::KeySets, token::TokenSource},
    policy::{Policy, pattern::Target},
    steering::Steering,
    workloads::{Pod, PodIdentity},
};

pub use detect::{Protocol, classify};
use upstream::{HttpUpstream, ProxyBody, UpstreamError};

/// State shared by every listener of the node.
pub struct Shared {
    pub audit: Audit,
    pub tokens: TokenSource,
    pub introspector: Introspector,
    /// Issuers' signing keys for JWT access tokens, by source.
    pub key_sets: KeySets,
    pub steering: Arc<Steering>,
    pub settings: ProxyConfig,
    /// Plugins and rules; a reload swaps in a new snapshot while requests in flight
    /// finish with the one they loaded.
    pub policy: ArcSwap<Policy>,
    /// Pods of this node by address, to name both ends in audit records.
    pub pods_by_ip: ArcSwap<HashMap<IpAddr, PodIdentity>>,
    pub shutdown: CancellationToken,
    /// Accept loops and connections, so shutdown can wait for them.
    pub tasks: TaskTracker,
}

impl Shared {
    pub fn pod_name(&self, ip: IpAddr) -> Option<String> {
        self.pods_by_ip.load().get(&ip).map(ToString::to_string)
    }
}

/// One pod and its network namespace, as the proxy serves it.
pub struct PodRuntime {
    pub pod: Pod,
    pub netns: Netns,
}

/// A pod whose listeners run; `stop_pod` tears them down.
pub struct PodHandle {
    runtime: Arc<PodRuntime>,
    /// Stops the pod's accept loops; connections already accepted finish.
    cancel: CancellationToken,
    outbound: Arc<TcpListener>,
    /// Present when the pod has protected ports.
    inbound: Option<Arc<TcpListener>>,
}

impl PodHandle {
    pub fn pod(&self) -> &Pod {
        &self.runtime.pod
    }
}

/// Builds what the `urls:` rules match a request against: the `Host` header without its
/// port, and the original destination.
pub fn request_target<'r, B>(request: &'r Request<B>, destination: SocketAddr) -> Target<'r> {
    let host = request
        .headers()
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .or_else(|| request.uri().host())
        .map(strip_port);
    Target {
        host,
        ip: destination.ip(),
        port: destination.port(),
        path: request.uri().path(),
    }
}

/// The audit record of one request and the reasons to record for each outcome.
pub(crate) struct Exchange {
    pub event: AuditEvent,
    pub started: Instant,
    /// Reason recorded when the destination returns a response.
    pub allow_reason: &'static str,
    /// Reason recorded with a 502 when the destination cannot be reached.
    pub error_reason: &'static str,
}

/// Sends `request` upstream and records the outcome. When the destination cannot be
/// reached, the caller gets a 502 whose body `describe` builds from the error.
pub(crate) async fn send_and_record(
    shared: &Shared,
    runtime: &PodRuntime,
    upstream: &HttpUpstream,
    request: Request<Incoming>,
    exchange: Exchange,
    describe: impl FnOnce(&UpstreamError) -> String,
) -> Response<ProxyBody> {
    let Exchange {
        mut event,
        started,
        allow_reason,
        error_reason,
    } = exchange;
    match upstream.send(request).await {
        Ok(response) => {
            event.status = Some(response.status().as_u16());
            event.finish(Decision::Allow, allow_reason, started.elapsed());
            shared.audit.record(&event);
            respond::forwarded(response)
        }
        Err(error) => {
            tracing::debug!(pod = %runtime.pod.identity, error = %error, "destination unreachable");
            let response = respond::text(
                StatusCode::BAD_GATEWAY,
                format!("tokenmesh: {}\n", describe(&error)),
            );
            event.status = Some(response.status().as_u16());
            event.finish(Decision::Error, error_reason, started.elapsed());
            shared.audit.record(&event);
            response
        }
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Reasons a pod's listeners could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PodSetupError {
    #[error(
        "cannot open network namespace {path} of pod {pod}: {source}; check the netns path in the workloads file"
    )]
    Netns {
        pod: PodIdentity,
        path: String,
        source: std::io::Error,
    },
    #[error(
        "cannot listen on {addr} inside pod {pod}: {source}; is another process using the port?"
    )]
    Listen {
        pod: PodIdentity,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot steer traffic of pod {pod}: {source}")]
    Steering {
        pod: PodIdentity,
        source: crate::steering::SteeringError,
    },
}

/// Opens the pod's listeners, registers them with the eBPF programs and starts serving.
/// Pods with protected ports get an inbound listener; which validator applies is decided
/// per request from the current policy.
///
/// `previous` is the handle of the same pod before a change. When the pod is still in
/// the same network namespace, its listeners carry over, so the ports stay bound and
/// the eBPF maps are updated in place. Pass the old handle to `retire_pod` afterwards.
pub async fn start_pod(
    shared: &Arc<Shared>,
    pod: Pod,
    ports: (u16, u16),
    previous: Option<&PodHandle>,
) -> Result<PodHandle, PodSetupError> {
    let (outbound_port, inbound_port) = ports;
    let identity = pod.identity.clone();
    let netns = Netns::open(&pod.netns).map_err(|source| PodSetupError::Netns {
        pod: identity.clone(),
        path: pod.netns.display().to_string(),
        source,
    })?;
    let listen = |port: u16| {
        let netns = netns.clone();
        let identity = identity.clone();
        async move {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            netns
                .tcp_listener(addr)
                .await
                .map(Arc::new)
                .map_err(|source| PodSetupError::Listen {
                    pod: identity,
                    addr,
                    source,
                })
        }
    };
    let steering_error = |source| PodSetupError::Steering {
        pod: identity.clone(),
        source,
    };

    let same_netns = previous.filter(|old| old.runtime.netns.cookie() == netns.cookie());
    let outbound_listener = match same_netns {
        Some(old) => old.outbound.clone(),
        None => listen(outbound_port).await?,
    };
    let inbound_listener = match (pod.protected_ports.is_empty(), same_netns) {
        (true, _) => None,
        (
            false,
            Some(PodHandle {
                inbound: Some(listener),
                ..
            }),
        ) => Some(listener.clone()),
        (false, _) => Some(listen(inbound_port).await?),
    };

    let runtime = Arc::new(PodRuntime { pod, netns });
    let cancel = shared.shutdown.child_token();
    if let Some(listener) = &inbound_listener {
        shared
            .steering
            .protect_inbound(
                &runtime.netns,
                runtime.pod.ip,
                &runtime.pod.protected_ports,
                listener.as_ref(),
            )
            .map_err(steering_error)?;
        spawn_accept_loop(shared, &runtime, &cancel, listener.clone(), inbound::serve);
    }
    shared
        .steering
        .enroll_outbound(runtime.netns.cookie(), outbound_port)
        .map_err(steering_error)?;
    spawn_accept_loop(
        shared,
        &runtime,
        &cancel,
        outbound_listener.clone(),
        outbound::serve,
    );

    tracing::info!(
        pod = %runtime.pod.identity,
        pod.ip = %runtime.pod.ip,
        protected_ports = ?runtime.pod.protected_ports,
        "pod enrolled"
    );
    Ok(PodHandle {
        runtime,
        cancel,
        outbound: outbound_listener,
        inbound: inbound_listener,
    })
}

/// Stops steering the pod's traffic and closes its listeners. Connections already
/// accepted finish on their own.
pub fn stop_pod(shared: &Shared, handle: PodHandle) -> Result<(), crate::steering::SteeringError> {
    let runtime = &handle.runtime;
    shared.steering.remove_outbound(runtime.netns.cookie())?;
    if handle.inbound.is_some() {
        shared
            .steering
            .unprotect_inbound(&runtime.netns, runtime.pod.ip)?;
    }
    handle.cancel.cancel();
    tracing::info!(pod = %runtime.pod.identity, "pod removed");
    Ok(())
}

/// Stops the accept loops of `old` after `new` took its place, and removes only the
/// steering that `new` does not cover: another network namespace, another address, or
/// no protected port left. Listeners that `new` carried over stay open.
pub fn retire_pod(
    shared: &Shared,
    old: PodHandle,
    new: &PodHandle,
) -> Result<(), crate::steering::SteeringError> {
    let old_runtime = &old.runtime;
    let same_netns = old_runtime.netns.cookie() == new.runtime.netns.cookie();
    if !same_netns {
        shared
            .steering
            .remove_outbound(old_runtime.netns.cookie())?;
    }
    let address_kept =
        same_netns && new.inbound.is_some() && new.runtime.pod.ip == old_runtime.pod.ip;
    if old.inbound.is_some() && !address_kept {
        shared
            .steering
            .unprotect_inbound(&old_runtime.netns, old_runtime.pod.ip)?;
    }
    old.cancel.cancel();
    tracing::info!(pod = %new.runtime.pod.identity, "pod updated");
    Ok(())
}

fn spawn_accept_loop<F, Fut>(
    shared: &Arc<Shared>,
    runtime: &Arc<PodRuntime>,
    cancel: &CancellationToken,
    listener: Arc<TcpListener>,
    serve: F,
) where
    F: Fn(Arc<Shared>, Arc<PodRuntime>, tokio::net::TcpStream, SocketAddr) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shared = shared.clone();
    let runtime = runtime.clone();
    let cancel = cancel.clone();
    let tasks = shared.tasks.clone();
    tasks.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    let connection = serve(shared.clone(), runtime.clone(), stream, peer);
                    shared.tasks.spawn(connection);
                }
                Err(e) => {
                    tracing::warn!(pod = %runtime.pod.identity, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    });
}
