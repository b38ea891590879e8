//! The audit log: one JSON line per request decision and per passed-through TCP flow.
//!
//! Lines are written and flushed before the decision takes effect for denied requests and
//! right after the response for allowed ones, so a crash loses at most the line of the
//! request in progress. Tokens never appear; a client id is not a secret.

use std::{
    fs::OpenOptions,
    io::{self, LineWriter, Write},
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;

/// Side of a pod on which the agent handled the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Leaving a pod of this node.
    Outbound,
    /// Arriving at a protected pod of this node.
    Inbound,
}

/// The agent's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    Deny,
    /// The request could not be handled: identity provider or upstream unavailable.
    Error,
}

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    /// RFC 3339 time in UTC.
    pub time: String,
    pub direction: Direction,
    /// `http` for a request, `tcp` for a passed-through flow.
    pub protocol: &'static str,
    /// `namespace/name` of the calling pod, when it runs on this node.
    pub source_pod: Option<String>,
    pub source_ip: IpAddr,
    pub destination: SocketAddr,
    /// `namespace/name` of the called pod, when it runs on this node.
    pub destination_pod: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub client_id: Option<String>,
    pub plugin: Option<String>,
    /// Index of the `urls:` rule that matched the request, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<usize>,
    pub decision: Decision,
    /// Short machine-readable cause, such as `client_id_not_allowed`.
    pub reason: &'static str,
    /// HTTP status returned to the caller.
    pub status: Option<u16>,
    /// Time from the start of the request (or flow) to the decision's outcome.
    pub latency_ms: f64,
    /// Bytes sent to and received from the destination, for TCP flows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_up: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_down: Option<u64>,
}

impl AuditEvent {
    /// Starts an event with the fields every record has; callers fill in the rest.
    pub fn new(
        direction: Direction,
        protocol: &'static str,
        source_ip: IpAddr,
        destination: SocketAddr,
    ) -> AuditEvent {
        AuditEvent {
            time: now_rfc3339(),
            direction,
            protocol,
            source_pod: None,
            source_ip,
            destination,
            destination_pod: None,
            method: None,
            path: None,
            client_id: None,
            plugin: None,
            rule: None,
            decision: Decision::Error,
            reason: "",
            status: None,
            latency_ms: 0.0,
            bytes_up: None,
            bytes_down: None,
        }
    }

    pub fn finish(&mut self, decision: Decision, reason: &'static str, elapsed: Duration) {
        self.decision = decision;
        self.reason = reason;
        self.latency_ms = (elapsed.as_secs_f64() * 1000.0 * 1000.0).round() / 1000.0;
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Handle to the audit log; cheap to clone.
#[derive(Clone)]
pub struct Audit {
    out: Arc<Mutex<LineWriter<Box<dyn Write + Send>>>>,
}

impl Audit {
    /// Opens the log: appends to `path`, or writes to stdout when `path` is `-`.
    pub fn open(path: &Path) -> io::Result<Audit> {
        let out: Box<dyn Write + Send> = if path == Path::new("-") {
            Box::new(io::stdout())
        } else {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            Box::new(OpenOptions::new().create(true).append(true).open(path)?)
        };
        Ok(Audit::from_writer(out))
    }

    pub fn from_writer(out: Box<dyn Write + Send>) -> Audit {
        Audit {
            out: Arc::new(Mutex::new(LineWriter::new(out))),
        }
    }

    /// Writes one event as a JSON line. A write failure is logged, never hidden.
    pub fn record(&self, event: &AuditEvent) {
        let line = match serde_json::to_string(event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "failed to encode an audit event");
                return;
            }
        };
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = writeln!(out, "{line}") {
            tracing::error!(error = %e, "failed to write an audit line");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn record_writes_one_json_line() {
        let buffer = Shared::default();
        let audit = Audit::from_writer(Box::new(buffer.clone()));
        let mut event = AuditEvent::new(
            Direction::Inbound,
            "http",
            "10.0.0.3".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
        );
        event.client_id = Some("intruder".into());
        event.status = Some(403);
        event.finish(
            Decision::Deny,
            "client_id_not_allowed",
            Duration::from_micros(1500),
        );
        audit.record(&event);

        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1);
        let value: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(value["decision"], "deny");
        assert_eq!(value["reason"], "client_id_not_allowed");
        assert_eq!(value["direction"], "inbound");
        assert_eq!(value["destination"], "10.0.0.2:8080");
        assert_eq!(value["status"], 403);
        assert_eq!(value["latency_ms"], 1.5);
        assert!(value.get("bytes_up").is_none());
    }
}
