//! The pods of this node: identity, address, network namespace, cgroup, and the ports the
//! agent protects. For now pods come from a static YAML file; a Kubernetes source will
//! produce the same `Pod` values.

mod file;

use std::{fmt, net::Ipv4Addr, path::PathBuf};

pub use file::{WorkloadsError, load_file};

/// Who a pod is, as Kubernetes names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodIdentity {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

impl fmt::Display for PodIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One pod on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub identity: PodIdentity,
    pub ip: Ipv4Addr,
    /// The pod's network namespace, such as `/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// The pod's cgroup v2 folder (absolute).
    pub cgroup: PathBuf,
    /// Ports of the pod's apps whose inbound connections the agent validates.
    pub protected_ports: Vec<u16>,
}
