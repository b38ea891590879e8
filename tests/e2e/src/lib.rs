//! Support for the end-to-end suites: network topology, identity provider, processes.

pub mod idp;
pub mod kube_replay;
pub mod kubepods;
pub mod process;
pub mod scenario;
pub mod topology;
