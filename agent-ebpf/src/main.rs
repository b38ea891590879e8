//! tokenmesh eBPF programs: `cgroup/connect4` and `sockops` steer the outbound
//! connections of enrolled pods into the agent, `sk_lookup` steers inbound SYNs for
//! protected pod addresses to the agent's listener in that pod's network namespace.
//!
//! Every map is pinned by name, so a restarted agent reuses the maps, and the programs
//! attached by an earlier run keep working on the same state.
//!
//! Minimum kernel: 5.15, because `bpf_get_netns_cookie` in `sockops` arrived in 5.15.
//! The other programs and helpers name their own minimum where they are used.
#![no_std]
#![no_main]

mod inbound;
mod outbound;

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, SockMap},
};
use tokenmesh_ebpf::{
    ConnKey, InboundKey, MAX_INBOUND_SOCKETS, MAX_INTERCEPT_NETS, MAX_INTERCEPT_PORTS, MAX_PODS,
    MAX_PROTECTED_PORTS, MAX_TRACKED_CONNECTIONS, OriginalDst, PodSteering, PortPolicy,
};

/// `AF_INET` from `<sys/socket.h>`.
const AF_INET: u32 = 2;
/// `SOCK_STREAM` from `<sys/socket.h>`.
const SOCK_STREAM: u32 = 1;
/// `IPPROTO_TCP` from `<netinet/in.h>`.
const IPPROTO_TCP: u32 = 6;

// Minimum kernel of each map type: arrays and hash maps 3.19, LRU hash maps 4.10, LPM tries 4.11,
// SOCKMAP 4.14.

#[map]
static TM_INTERCEPT: HashMap<u16, PortPolicy> = HashMap::pinned(MAX_INTERCEPT_PORTS, 0);

/// Keys are IPv4 addresses in network byte order, so the trie matches octets in order.
#[map]
static TM_INTERCEPT_NETS: LpmTrie<u32, PortPolicy> = LpmTrie::pinned(MAX_INTERCEPT_NETS, 0);

#[map]
static TM_PODS: HashMap<u64, PodSteering> = HashMap::pinned(MAX_PODS, 0);

#[map]
static TM_AGENT_CGROUP: Array<u64> = Array::pinned(1, 0);

#[map]
static TM_PENDING: LruHashMap<u64, OriginalDst> = LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map]
static TM_ORIG_DST: LruHashMap<ConnKey, OriginalDst> =
    LruHashMap::pinned(MAX_TRACKED_CONNECTIONS, 0);

#[map]
static TM_PROTECTED: HashMap<InboundKey, u32> = HashMap::pinned(MAX_PROTECTED_PORTS, 0);

#[map]
static TM_INBOUND_SOCKS: SockMap = SockMap::pinned(MAX_INBOUND_SOCKETS, 0);

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
