//! Types shared by the eBPF programs and the userspace agent.
//!
//! Every type is `#[repr(C)]`, `Copy`, has explicit padding and no `bool`, so both sides
//! agree on the layout byte for byte. Addresses are stored in network byte order as the
//! kernel hands them over; ports are stored in host byte order.
#![no_std]

/// Map of intercepted destination ports: key `u16` port, value [`PortPolicy`].
pub const MAP_INTERCEPT_PORTS: &str = "TM_INTERCEPT";
/// LPM trie of destination networks: key `aya::maps::lpm_trie::Key<u32>` (prefix length
/// and IPv4 address in network byte order), value [`PortPolicy`]. The longest matching
/// prefix decides; a destination that matches no prefix is not intercepted.
pub const MAP_INTERCEPT_NETS: &str = "TM_INTERCEPT_NETS";
/// One-entry array holding the cgroup v2 id of the agent's own cgroup (`u64`, 0 when
/// unset). `connect4` never steers a connect made by a task of that cgroup. So the
/// agent's upstream sockets, which it creates inside pods' namespaces, are not sent back
/// into the agent, even when the agent's cgroup is below the pods' parent cgroup.
pub const MAP_AGENT_CGROUP: &str = "TM_AGENT_CGROUP";
/// Map of enrolled pods: key `u64` netns cookie, value [`PodSteering`].
pub const MAP_PODS: &str = "TM_PODS";
/// LRU map from socket cookie to [`OriginalDst`], written by `connect4`.
pub const MAP_PENDING: &str = "TM_PENDING";
/// LRU map from [`ConnKey`] to [`OriginalDst`], written by `sockops`, read by the agent.
pub const MAP_ORIGINAL_DST: &str = "TM_ORIG_DST";
/// Map of protected inbound addresses: key [`InboundKey`], value `u32` SOCKMAP slot.
pub const MAP_PROTECTED: &str = "TM_PROTECTED";
/// SOCKMAP holding the agent's inbound listeners, one slot per protected pod.
pub const MAP_INBOUND_SOCKETS: &str = "TM_INBOUND_SOCKS";

/// Name of the `cgroup/connect4` program that redirects intercepted connects.
pub const PROGRAM_CONNECT4: &str = "tm_connect4";
/// Name of the `sockops` program that records original destinations on ESTABLISHED.
pub const PROGRAM_SOCKOPS: &str = "tm_sockops";
/// Name of the `sk_lookup` program that steers inbound SYNs to the agent's listener.
pub const PROGRAM_SK_LOOKUP: &str = "tm_sk_lookup";

/// Maximum number of entries in [`MAP_INTERCEPT_PORTS`].
pub const MAX_INTERCEPT_PORTS: u32 = 1024;
/// Maximum number of networks in [`MAP_INTERCEPT_NETS`].
pub const MAX_INTERCEPT_NETS: u32 = 1024;
/// Maximum number of enrolled pods in [`MAP_PODS`].
pub const MAX_PODS: u32 = 4096;
/// Maximum number of connections in [`MAP_PENDING`] and [`MAP_ORIGINAL_DST`]; the least
/// recently used entry is evicted when a map is full.
pub const MAX_TRACKED_CONNECTIONS: u32 = 65536;
/// Maximum number of protected (address, port) pairs in [`MAP_PROTECTED`].
pub const MAX_PROTECTED_PORTS: u32 = 16384;
/// Number of slots in [`MAP_INBOUND_SOCKETS`], so the maximum number of protected pods.
pub const MAX_INBOUND_SOCKETS: u32 = 4096;

/// Value of [`MAP_INTERCEPT_PORTS`] and [`MAP_INTERCEPT_NETS`]: whether connections to
/// this port or network are steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortPolicy {
    /// 1 to intercept, 0 to leave alone.
    pub intercept: u8,
    pub _pad: [u8; 3],
}

/// Value of [`MAP_PODS`]: how the outbound traffic of one enrolled pod is steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSteering {
    /// Port of the agent's outbound listener on 127.0.0.1 inside the pod's netns.
    pub outbound_port: u16,
    pub _pad: [u8; 6],
}

/// An intercepted connection's original IPv4 destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginalDst {
    /// IPv4 address in network byte order.
    pub addr: u32,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

/// Key of [`MAP_ORIGINAL_DST`]: the client side of a redirected connection, as the
/// agent's listener sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnKey {
    /// Cookie of the network namespace the connection lives in.
    pub netns_cookie: u64,
    /// The client's local port, in host byte order.
    pub client_port: u16,
    pub _pad: [u8; 6],
}

/// Key of [`MAP_PROTECTED`]: a pod address whose inbound connections the agent validates.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundKey {
    /// IPv4 address in network byte order.
    pub addr: u32,
    /// Port in host byte order.
    pub port: u16,
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: each type is repr(C), Copy, built only of integers with explicit padding,
    // so every bit pattern is valid and there are no implicit padding bytes.
    unsafe impl aya::Pod for super::PortPolicy {}
    unsafe impl aya::Pod for super::PodSteering {}
    unsafe impl aya::Pod for super::OriginalDst {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::InboundKey {}
}
