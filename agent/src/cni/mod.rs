//! The chained CNI plugin `tokenmesh-cni` and the agent's side of it.
//!
//! The container runtime runs every plugin of the node's CNI configuration when it
//! creates a pod sandbox, before any container of the pod starts. `tokenmesh-cni` runs
//! after the plugin that gives the pod its address, sends the sandbox (pod, network
//! namespace, address) to the agent over a Unix socket, and returns only when the agent
//! has steered the pod or found it not enrolled. When the agent does not reply, the
//! plugin fails, the runtime gives up on the sandbox and the kubelet retries. So no
//! container of an enrolled pod runs before its traffic is steered.

pub mod chain;
pub mod plugin;
pub mod protocol;
pub mod server;

/// The `type` of the plugin in a CNI configuration, and the binary's file name.
pub const PLUGIN_TYPE: &str = "tokenmesh-cni";

/// The agent's socket for the plugin unless configured otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/tokenmesh/cni.sock";
