//! Inbound: requests arriving at a protected pod. sk_lookup hands the agent the connection,
//! so the local address is the original destination and the peer is the real client.
//! Only requests that pass every check reach the app, on 127.0.0.1 inside the pod.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http::{HeaderValue, Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;

use super::{
    Exchange, PodRuntime, Shared, detect, request_target, respond, send_and_record,
    tcp::{flow_event, pass_through},
    upstream::{HttpUpstream, ProxyBody},
};
use crate::{
    audit::{AuditEvent, Decision, Direction},
    config::{NonHttpAction, ValidatorSettings},
    policy::{
        inbound::{Accepted, RequestView, Verifiers, check, strip_query_token},
        pattern::Target,
    },
};

/// Serves one connection that sk_lookup steered to a pod's inbound listener.
pub async fn serve(
    shared: Arc<Shared>,
    runtime: Arc<PodRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let Ok(original) = stream.local_addr() else {
        return;
    };
    // The app listens inside the pod; loopback is never steered, so this reaches it.
    let app = SocketAddr::from((Ipv4Addr::LOCALHOST, original.port()));

    // Kubelet probes come from the node and carry no token; the pod's probe exemption
    // lists the node's addresses and the protected ports its probes use.
    if runtime
        .pod
        .probe_exemption
        .exempts(peer.ip(), original.port())
    {
        let mut event = flow_event(Direction::Inbound, peer, original);
        event.destination_pod = Some(runtime.pod.identity.to_string());
        pass_through(&shared, &runtime, stream, event, app, "probe_exempt").await;
        return;
    }

    if detect::sniff(&stream, shared.settings.protocol_detect_timeout).await
        != detect::Protocol::Http1
    {
        let mut event = flow_event(Direction::Inbound, peer, original);
        event.source_pod = shared.pod_name(peer.ip());
        event.destination_pod = Some(runtime.pod.identity.to_string());
        let target = Target {
            host: None,
            ip: original.ip(),
            port: original.port(),
            path: "",
        };
        let validator = shared
            .policy
            .load()
            .validator_for(&runtime.pod, &target)
            .settings;
        event.plugin = validator.as_ref().map(|v| v.plugin_id.clone());
        let action = validator.map_or(NonHttpAction::Allow, |v| v.non_http);
        match action {
            NonHttpAction::Allow => {
                pass_through(&shared, &runtime, stream, event, app, "tcp_pass_through").await
            }
            NonHttpAction::Deny => {
                event.finish(Decision::Deny, "not_http", Default::default());
                shared.audit.record(&event);
            }
        }
        return;
    }

    let upstream = Arc::new(HttpUpstream::new(
        runtime.netns.clone(),
        app,
        shared.settings.connect_timeout,
    ));
    let requests = Arc::new(AtomicU64::new(0));
    let counted = requests.clone();
    let (audit_shared, audit_runtime) = (shared.clone(), runtime.clone());
    let service = service_fn(move |request| {
        counted.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        let runtime = runtime.clone();
        let upstream = upstream.clone();
        async move {
            let response = handle(&shared, &runtime, &upstream, peer, original, request).await;
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .max_header_size(MAX_HEADER_BYTES)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(client.addr = %peer, error = %e, "inbound connection ended with an error");
        if let Some((status, reason)) = rejected_head(&e, requests.load(Ordering::Relaxed)) {
            let mut event = AuditEvent::new(Direction::Inbound, "http", peer.ip(), original);
            event.source_pod = audit_shared.pod_name(peer.ip());
            event.destination_pod = Some(audit_runtime.pod.identity.to_string());
            event.status = status;
            event.finish(Decision::Deny, reason, Default::default());
            audit_shared.audit.record(&event);
        }
    }
}

/// Largest request head (request line and headers) accepted; a larger one gets 431 from
/// hyper. Tokens and the usual headers fit many times over.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// Time a client has to send a complete request head, also between requests on a
/// keep-alive connection. A client that stalls is disconnected.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The audit status and reason for a request head hyper rejected before any handler ran.
/// hyper itself responds with 431 for a head over [`MAX_HEADER_BYTES`] and 400 for one that does
/// not parse. A head timeout is audited only when no request came before it, because on a
/// keep-alive connection it is the normal end of an idle connection.
fn rejected_head(error: &hyper::Error, requests: u64) -> Option<(Option<u16>, &'static str)> {
    if error.is_parse_too_large() {
        Some((Some(431), "headers_too_large"))
    } else if error.is_parse() {
        Some((Some(400), "malformed_request"))
    } else if error.is_timeout() && requests == 0 {
        Some((None, "header_timeout"))
    } else {
        None
    }
}

async fn handle(
    shared: &Shared,
    runtime: &PodRuntime,
    upstream: &HttpUpstream,
    peer: SocketAddr,
    original: SocketAddr,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut event = AuditEvent::new(Direction::Inbound, "http", peer.ip(), original);
    event.source_pod = shared.pod_name(peer.ip());
    event.destination_pod = Some(runtime.pod.identity.to_string());
    event.method = Some(request.method().to_string());
    event.path = Some(request.uri().path().to_string());

    let target = request_target(&request, original);
    let selection = shared.policy.load().validator_for(&runtime.pod, &target);
    event.rule = selection.rule;
    let Some(validator) = selection.settings else {
        // No validator applies here, for example a rule that turns it off for a health
        // check path: the request goes to the app unchanged.
        return forward(
            shared,
            runtime,
            upstream,
            request,
            event,
            started,
            "no_token_validator",
        )
        .await;
    };
    let validator = validator.as_ref();
    event.plugin = Some(validator.plugin_id.clone());

    let verifiers = Verifiers {
        introspector: &shared.introspector,
        key_sets: &shared.key_sets,
    };
    let view = RequestView {
        method: request.method(),
        uri: request.uri(),
        headers: request.headers(),
        peer: peer.ip(),
    };
    let accepted = match check(validator, verifiers, view).await {
        Ok(accepted) => accepted,
        Err(denial) => {
            event.client_id = denial.client_id.clone();
            event.status = Some(denial.status.as_u16());
            event.finish(denial.decision, denial.reason, started.elapsed());
            shared.audit.record(&event);
            let mut response = respond::text(
                denial.status,
                format!("tokenmesh: {}\n", denial.description),
            );
            denial.apply_headers(response.headers_mut());
            return response;
        }
    };
    event.client_id = accepted.client_id.as_ref().map(ToString::to_string);
    prepare_for_app(validator, &accepted, &mut request);
    forward(
        shared,
        runtime,
        upstream,
        request,
        event,
        started,
        accepted.reason,
    )
    .await
}

/// Sends an accepted request to the app and records the outcome.
async fn forward(
    shared: &Shared,
    runtime: &PodRuntime,
    upstream: &HttpUpstream,
    request: Request<Incoming>,
    event: AuditEvent,
    started: Instant,
    reason: &'static str,
) -> Response<ProxyBody> {
    let exchange = Exchange {
        event,
        started,
        allow_reason: reason,
        error_reason: "app_unavailable",
    };
    send_and_record(shared, runtime, upstream, request, exchange, |error| {
        format!(
            "the app of pod {} is unreachable: {error}",
            runtime.pod.identity
        )
    })
    .await
}

/// Removes the token (when configured, and always from the URL) and any client id header
/// the caller sent, then sets the client id the agent proved.
fn prepare_for_app(
    validator: &ValidatorSettings,
    accepted: &Accepted,
    request: &mut Request<Incoming>,
) {
    if accepted.token_in_query {
        *request.uri_mut() = strip_query_token(request.uri());
    }
    let headers = request.headers_mut();
    if validator.remove_token_header {
        headers.remove(&validator.header.name);
    }
    headers.remove(&validator.client_id_header);
    let Some(client_id) = &accepted.client_id else {
        return;
    };
    match HeaderValue::from_str(&client_id.0) {
        Ok(value) => {
            headers.insert(validator.client_id_header.clone(), value);
        }
        Err(_) => tracing::warn!(
            plugin = %validator.plugin_id,
            "the token's client id is not a valid header value; the app gets no client id header"
        ),
    }
}
