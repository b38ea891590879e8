//! tokenmesh node agent.
//!
//! Modules follow the data path: `steering` loads the eBPF programs that move pod traffic
//! into the agent, `workloads` lists the pods of this node, `proxy` runs the per-pod
//! outbound and inbound listeners, `oauth` gets and validates access tokens, `policy`
//! decides which plugin applies to which pod, and `audit` records every decision.

pub mod admin;
pub mod audit;
pub mod cni;
pub mod config;
pub mod explain;
pub mod netns;
pub mod oauth;
pub mod policy;
pub mod proxy;
pub mod run;
pub mod steering;
pub mod workloads;
