//! Outbound: requests leaving a pod. Each gets an access token for the pod's client and
//! goes on to its original destination from a socket in the pod's namespace.

use std::{
    convert::Infallible,
    net::{SocketAddr, SocketAddrV4},
    sync::Arc,
    time::Instant,
};

use http::{HeaderValue, Request, Response, StatusCode, header::RETRY_AFTER};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::{
    Exchange, PodRuntime, Shared, detect, request_target, respond, send_and_record,
    tcp::{flow_event, pass_through},
    upstream::{HttpUpstream, ProxyBody},
};
use crate::{
    audit::{AuditEvent, Decision, Direction},
    config::CreatorSettings,
    oauth::token::{ClientCredentials, TokenError},
};

/// Serves one connection accepted on a pod's outbound listener.
pub async fn serve(
    shared: Arc<Shared>,
    runtime: Arc<PodRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let Some(original) = shared
        .steering
        .take_original_dst(runtime.netns.cookie(), peer.port())
    else {
        // Only connections redirected by connect4 have a record; anything else dialled
        // the listener directly and has no destination to go to.
        tracing::debug!(pod = %runtime.pod.identity, client.addr = %peer, "no original destination; closing");
        return;
    };
    let destination = SocketAddr::V4(original);
    let source = SocketAddr::from((runtime.pod.ip, peer.port()));

    if detect::sniff(&stream, shared.settings.protocol_detect_timeout).await
        != detect::Protocol::Http1
    {
        let mut event = flow_event(Direction::Outbound, source, destination);
        event.source_pod = Some(runtime.pod.identity.to_string());
        event.destination_pod = shared.pod_name(destination.ip());
        pass_through(
            &shared,
            &runtime,
            stream,
            event,
            destination,
            "tcp_pass_through",
        )
        .await;
        return;
    }

    let upstream = Arc::new(HttpUpstream::new(
        runtime.netns.clone(),
        destination,
        shared.settings.connect_timeout,
    ));
    let service = service_fn(move |request| {
        let shared = shared.clone();
        let runtime = runtime.clone();
        let upstream = upstream.clone();
        async move { Ok::<_, Infallible>(handle(&shared, &runtime, &upstream, original, request).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(client.addr = %peer, error = %e, "outbound connection ended with an error");
    }
}

async fn handle(
    shared: &Shared,
    runtime: &PodRuntime,
    upstream: &HttpUpstream,
    original: SocketAddrV4,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let mut event = AuditEvent::new(
        Direction::Outbound,
        "http",
        runtime.pod.ip.into(),
        SocketAddr::V4(original),
    );
    event.source_pod = Some(runtime.pod.identity.to_string());
    event.destination_pod = shared.pod_name((*original.ip()).into());
    event.method = Some(request.method().to_string());
    event.path = Some(request.uri().path().to_string());

    let target = request_target(&request, SocketAddr::V4(original));
    let selection = shared.policy.load().creator_for(&runtime.pod, &target);
    event.rule = selection.rule;
    let creator = selection.settings;
    if let Some(creator) = &creator {
        event.plugin = Some(creator.plugin_id.clone());
        event.client_id = Some(creator.credentials.client_id.to_string());
        if let Err(response) = attach_token(shared, creator, &mut request).await {
            event.status = Some(response.status().as_u16());
            event.finish(Decision::Error, "token_unavailable", started.elapsed());
            shared.audit.record(&event);
            return response;
        }
    }

    let allow_reason = if creator.is_some() {
        "token_added"
    } else {
        "no_token_creator"
    };
    let exchange = Exchange {
        event,
        started,
        allow_reason,
        error_reason: "upstream_unavailable",
    };
    send_and_record(
        shared,
        runtime,
        upstream,
        request,
        exchange,
        ToString::to_string,
    )
    .await
}

/// Replaces whatever token header the app sent with a fresh token for the pod's client.
/// Returns the 503 response when no token can be had, and the request is then not
/// forwarded.
async fn attach_token(
    shared: &Shared,
    creator: &CreatorSettings,
    request: &mut Request<Incoming>,
) -> Result<(), Response<ProxyBody>> {
    let credentials = &creator.credentials;
    let token = match shared.tokens.token(credentials).await {
        Ok(token) => token,
        Err(e) => {
            // The token source logs each failed token request once; this is per request.
            tracing::debug!(
                plugin = %creator.plugin_id,
                client.id = %credentials.client_id,
                error = %e,
                "no access token; responding with 503"
            );
            return Err(token_unavailable(credentials, &e));
        }
    };
    let value = if creator.header.bearer {
        format!("Bearer {}", token.secret())
    } else {
        token.secret().to_string()
    };
    let Ok(mut value) = HeaderValue::from_str(&value) else {
        return Err(respond::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "tokenmesh: the identity provider returned a token that is not a valid header value\n"
                .to_string(),
        ));
    };
    value.set_sensitive(true);
    let headers = request.headers_mut();
    headers.remove(&creator.header.name);
    headers.insert(creator.header.name.clone(), value);
    Ok(())
}

/// Builds the 503 for a request that was not sent because no token could be had. The
/// body names the client and the cause, which carry no secret. `Retry-After` is the
/// interval within which the agent does not ask the provider again.
fn token_unavailable(credentials: &ClientCredentials, error: &TokenError) -> Response<ProxyBody> {
    let mut response = respond::text(
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "tokenmesh: token_unavailable: no access token could be obtained for client {}, \
             so the request was not sent.\ncause: {error}\n",
            credentials.client_id
        ),
    );
    let retry_after = credentials
        .min_request_interval
        .as_secs_f64()
        .ceil()
        .max(1.0) as u64;
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after));
    response
}
