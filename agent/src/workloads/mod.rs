//! The pods of this node: identity, address, network namespace, cgroup, and the ports the
//! agent protects. For now pods come from a static YAML file; a Kubernetes source will
//! produce the same `Pod` values.

pub mod cgroups;
mod file;
pub mod kube;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

pub use file::{WorkloadsError, load_file};

/// A pod's identity, as Kubernetes names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
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
    /// Kubernetes labels, for workload selectors.
    pub labels: BTreeMap<String, String>,
    /// Token-creator plugin id that the pod's `tokenmesh.io/credentials` annotation names;
    /// it narrows the creators whose selector matches the pod to that one.
    pub credentials: Option<String>,
    /// Connections to protected ports that need no token (kubelet probes).
    pub probe_exemption: ProbeExemption,
}

/// Sources that reach a protected pod's probe ports without a token: the kubelet probes
/// from the node, and it cannot send a token. Empty for pods from the workloads file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProbeExemption {
    /// Source networks of the probes, the node's own addresses by default.
    pub sources: Vec<ipnet::IpNet>,
    /// Protected ports that the pod's liveness, readiness and startup probes use.
    pub ports: Vec<u16>,
}

impl ProbeExemption {
    /// Tells whether a connection from `source` to the pod's `port` skips token checks.
    pub fn exempts(&self, source: IpAddr, port: u16) -> bool {
        self.ports.contains(&port) && self.sources.iter().any(|net| net.contains(&source))
    }
}
