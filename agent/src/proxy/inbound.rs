//! Inbound: requests arriving at a protected pod. sk_lookup hands the agent the connection,
//! so the local address is the original destination and the peer is the real client.
//! Only requests that pass every check reach the app, on 127.0.0.1 inside the pod.

use std::{
    convert::Infallible,
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
    time::Instant,
};

use http::{HeaderValue, Request, Response};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    PodRuntime, Shared, detect, respond,
    tcp::{flow_event, pass_through},
    upstream::{HttpUpstream, ProxyBody},
};
use crate::{
    audit::{AuditEvent, Decision, Direction},
    config::{NonHttpAction, ValidatorSettings},
    policy::inbound::{Accepted, check},
};

/// Serves one connection that sk_lookup steered to a pod's inbound listener.
pub async fn serve(
    shared: Arc<Shared>,
    runtime: Arc<PodRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let Some(validator) = runtime.policy.validator.clone() else {
        return;
    };
    let Ok(original) = stream.local_addr() else {
        return;
    };
    // The app listens inside the pod; loopback is never steered, so this reaches it.
    let app = SocketAddr::from((Ipv4Addr::LOCALHOST, original.port()));

    if detect::sniff(&stream, shared.settings.protocol_detect_timeout).await
        != detect::Protocol::Http1
    {
        let mut event = flow_event(Direction::Inbound, peer, original);
        event.source_pod = shared.pod_name(peer.ip());
        event.destination_pod = Some(runtime.pod.identity.to_string());
        event.plugin = Some(validator.plugin_id.clone());
        match validator.non_http {
            NonHttpAction::Allow => pass_through(&shared, &runtime, stream, event, app).await,
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
    let service = service_fn(move |request| {
        let shared = shared.clone();
        let runtime = runtime.clone();
        let upstream = upstream.clone();
        let validator = validator.clone();
        async move {
            let response = handle(
                &shared, &runtime, &validator, &upstream, peer, original, request,
            )
            .await;
            Ok::<_, Infallible>(response)
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(client.addr = %peer, error = %e, "inbound connection ended with an error");
    }
}

async fn handle(
    shared: &Shared,
    runtime: &PodRuntime,
    validator: &ValidatorSettings,
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
    event.plugin = Some(validator.plugin_id.clone());

    let accepted = match check(
        validator,
        &shared.introspector,
        request.headers(),
        peer.ip(),
    )
    .await
    {
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
    event.client_id = Some(accepted.client_id.to_string());
    prepare_for_app(validator, &accepted, &mut request);

    match upstream.send(request).await {
        Ok(response) => {
            event.status = Some(response.status().as_u16());
            event.finish(Decision::Allow, "token_valid", started.elapsed());
            shared.audit.record(&event);
            respond::forwarded(response)
        }
        Err(e) => {
            tracing::debug!(pod = %runtime.pod.identity, error = %e, "app unreachable");
            let response = respond::text(
                http::StatusCode::BAD_GATEWAY,
                format!(
                    "tokenmesh: the app of pod {} is unreachable: {e}\n",
                    runtime.pod.identity
                ),
            );
            event.status = Some(response.status().as_u16());
            event.finish(Decision::Error, "app_unavailable", started.elapsed());
            shared.audit.record(&event);
            response
        }
    }
}

/// Removes the token (when configured) and any client id header the caller sent, then
/// sets the client id the agent proved.
fn prepare_for_app(
    validator: &ValidatorSettings,
    accepted: &Accepted,
    request: &mut Request<Incoming>,
) {
    let headers = request.headers_mut();
    if validator.remove_token_header {
        headers.remove(&validator.header.name);
    }
    headers.remove(&validator.client_id_header);
    match HeaderValue::from_str(&accepted.client_id.0) {
        Ok(value) => {
            headers.insert(validator.client_id_header.clone(), value);
        }
        Err(_) => tracing::warn!(
            plugin = %validator.plugin_id,
            "the token's client id is not a valid header value; the app gets no client id header"
        ),
    }
}
