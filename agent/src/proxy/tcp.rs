//! Plain TCP pass-through for connections that are not HTTP/1.x.

use std::{net::SocketAddr, time::Instant};

use tokio::net::TcpStream;

use super::{PodRuntime, Shared, upstream};
use crate::audit::{AuditEvent, Decision, Direction};

/// Copies bytes both ways between `client` and `destination` and audits the flow with
/// `reason`, such as `tcp_pass_through`.
pub async fn pass_through(
    shared: &Shared,
    runtime: &PodRuntime,
    mut client: TcpStream,
    mut event: AuditEvent,
    destination: SocketAddr,
    reason: &'static str,
) {
    let started = Instant::now();
    let timeout = shared.settings.connect_timeout;
    let mut upstream = match upstream::connect(&runtime.netns, destination, timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(pod = %runtime.pod.identity, error = %e, "pass-through connect failed");
            event.finish(Decision::Error, "upstream_unavailable", started.elapsed());
            shared.audit.record(&event);
            return;
        }
    };
    let copied = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    let (up, down) = copied.unwrap_or((0, 0));
    event.bytes_up = Some(up);
    event.bytes_down = Some(down);
    event.finish(Decision::Allow, reason, started.elapsed());
    shared.audit.record(&event);
}

/// Starts the audit record of a TCP flow.
pub fn flow_event(direction: Direction, source: SocketAddr, destination: SocketAddr) -> AuditEvent {
    AuditEvent::new(direction, "tcp", source.ip(), destination)
}
