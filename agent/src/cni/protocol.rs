//! Messages between the CNI plugin and the agent: one JSON object per line, one request
//! and one reply per connection.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

/// Upper bound for a request line; a sandbox description is a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// A request from the plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// A sandbox was created (CNI ADD) or is checked (CNI CHECK). The agent replies once
    /// the pod is steered, or when it finds the pod is not enrolled.
    Add(Sandbox),
    /// A sandbox is being removed (CNI DEL).
    Del(SandboxRef),
    /// Readiness of the agent (CNI STATUS).
    Status,
}

/// The pod a sandbox belongs to, as the runtime names it in `CNI_ARGS`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, which runtimes since containerd 1.6 and CRI-O 1.21 pass; without it
    /// the pod is found by namespace and name alone.
    pub uid: Option<String>,
    pub container_id: String,
}

/// A new sandbox: its pod, network namespace and address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    #[serde(flatten)]
    pub pod: SandboxRef,
    /// `CNI_NETNS`, such as `/var/run/netns/cni-0b5c…`.
    pub netns: PathBuf,
    /// The first IPv4 address of the earlier plugins' result.
    pub ip: Option<Ipv4Addr>,
    /// How long the agent may take to reply, in milliseconds.
    pub timeout_ms: u64,
}

/// The agent's reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Reply {
    /// The pod is enrolled and its listeners and steering are in place.
    Steered,
    /// The pod is left alone, for the reason given.
    NotEnrolled { reason: String },
    /// The request was carried out.
    Done,
    /// The pod must not start: it is enrolled but cannot be steered, or the agent could
    /// not decide in time.
    Failed { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_request_wire_format() {
        let request = Request::Add(Sandbox {
            pod: SandboxRef {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: Some("1234".into()),
                container_id: "abc".into(),
            },
            netns: "/var/run/netns/cni-1".into(),
            ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
            timeout_ms: 2000,
        });
        let json: serde_json::Value = serde_json::to_value(&request).unwrap();
        assert_eq!(json["command"], "add");
        assert_eq!(json["namespace"], "shop");
        assert_eq!(json["uid"], "1234");
        assert_eq!(json["ip"], "10.1.0.5");
        let back: Request = serde_json::from_value(json).unwrap();
        assert_eq!(back, request);
    }

    #[test]
    fn reply_wire_format() {
        let reply = Reply::Failed {
            message: "no".into(),
        };
        let json = serde_json::to_string(&reply).unwrap();
        assert_eq!(json, r#"{"result":"failed","message":"no"}"#);
    }
}
