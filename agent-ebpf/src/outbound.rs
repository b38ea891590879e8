//! Outbound steering: `cgroup/connect4` redirects a pod's connect to an intercepted port
//! to the agent's listener on 127.0.0.1 in the pod's netns, and `sockops` files the
//! original destination under a key the agent can compute from the accepted socket.

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
    helpers::{bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, sock_ops},
    maps::lpm_trie::Key,
    programs::{SockAddrContext, SockOpsContext},
};
use tokenmesh_ebpf::{ConnKey, OriginalDst};

use crate::{
    AF_INET, IPPROTO_TCP, SOCK_STREAM, TM_AGENT_CGROUP, TM_INTERCEPT, TM_INTERCEPT_NETS,
    TM_ORIG_DST, TM_PENDING, TM_PODS,
};

/// `cgroup/connect4` verdict that lets `connect()` go on.
const CONNECT_ALLOW: i32 = 1;
/// `cgroup/connect4` verdict that fails `connect()` with EPERM.
const CONNECT_DENY: i32 = 0;

/// 127.0.0.1 in network byte order, as `user_ip4` stores it.
const LOOPBACK_IP4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);

/// Redirects TCP/IPv4 connects of enrolled pods to intercepted ports.
///
/// NOTE: there is no `cgroup/connect6` program yet, so IPv6 connects to intercepted
/// ports are not redirected.
///
/// Minimum kernel: 4.17 for `cgroup/connect4`, 4.19 for `bpf_get_socket_cookie` and 5.7
/// for `bpf_get_netns_cookie` in this program type.
#[cgroup_sock_addr(connect4)]
pub fn tm_connect4(ctx: SockAddrContext) -> i32 {
    steer_connect4(&ctx)
}

fn steer_connect4(ctx: &SockAddrContext) -> i32 {
    let sock_addr = ctx.sock_addr;

    // Volatile reads and writes keep each context access at the field's full 4 bytes.
    // LLVM would otherwise narrow `user_port as u16` to a 2-byte load, and kernels that
    // allow only 4-byte reads of `user_port`, as the 4.17 uapi header documents, reject
    // it with "invalid bpf_context access off=24 size=2".
    // SAFETY: the kernel passes a valid `bpf_sock_addr`, and the verifier checks each
    // field offset and access size against it.
    let (user_family, sock_type, protocol, dst_ip4, user_port) = unsafe {
        (
            read_volatile(addr_of!((*sock_addr).user_family)),
            read_volatile(addr_of!((*sock_addr).type_)),
            read_volatile(addr_of!((*sock_addr).protocol)),
            read_volatile(addr_of!((*sock_addr).user_ip4)),
            read_volatile(addr_of!((*sock_addr).user_port)),
        )
    };
    if user_family != AF_INET || sock_type != SOCK_STREAM || protocol != IPPROTO_TCP {
        return CONNECT_ALLOW;
    }

    // The address is in network byte order, so its first byte in memory is the first octet.
    if dst_ip4.to_ne_bytes()[0] == 127 {
        return CONNECT_ALLOW;
    }

    // The agent's own connects are never steered. Minimum kernel 5.7 for this helper in
    // this program type.
    // SAFETY: the helper takes no arguments and only reads the current task.
    let current_cgroup = unsafe { bpf_get_current_cgroup_id() };
    if TM_AGENT_CGROUP
        .get(0)
        .is_some_and(|agent| *agent != 0 && *agent == current_cgroup)
    {
        return CONNECT_ALLOW;
    }

    // SAFETY: the context pointer comes from the kernel; the helper only reads it.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // The `None` arm is the NULL check on the lookup result that avoids
    // "R0 invalid mem access 'map_value_or_null'".
    // SAFETY: the agent writes a pod's entry once at enrollment and deletes it whole, and
    // the value is copied out at once.
    let Some(pod) = (unsafe { TM_PODS.get(&netns_cookie) }).copied() else {
        return CONNECT_ALLOW;
    };

    // `user_port` stores the port in network byte order in its low 16 bits.
    let dst_port = u16::from_be(user_port as u16);
    // Same NULL check as above: "R0 invalid mem access 'map_value_or_null'".
    // SAFETY: the value is a plain integer struct copied out at once.
    match unsafe { TM_INTERCEPT.get(&dst_port) } {
        Some(policy) if policy.intercept != 0 => {}
        _ => return CONNECT_ALLOW,
    }
    // The longest prefix that contains the destination decides, so an excluded /32 (the
    // identity provider, the API server) wins over an intercepted /8.
    // Same NULL check as above: "R0 invalid mem access 'map_value_or_null'".
    match TM_INTERCEPT_NETS.get(Key::new(32, dst_ip4)).copied() {
        Some(policy) if policy.intercept != 0 => {}
        _ => return CONNECT_ALLOW,
    }

    // SAFETY: the context pointer comes from the kernel; the helper only reads it.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let original = OriginalDst {
        addr: dst_ip4,
        port: dst_port,
        _pad: [0; 2],
    };
    // Without a record the agent could not forward the connection, so fail the
    // connect now instead of redirecting it.
    if TM_PENDING.insert(&socket_cookie, &original, 0).is_err() {
        return CONNECT_DENY;
    }

    // SAFETY: `user_ip4` and `user_port` are writable with 4-byte stores in
    // `cgroup/connect4`; the verifier checks both.
    unsafe {
        write_volatile(addr_of_mut!((*sock_addr).user_ip4), LOOPBACK_IP4);
        write_volatile(
            addr_of_mut!((*sock_addr).user_port),
            u32::from(pod.outbound_port.to_be()),
        );
    }
    CONNECT_ALLOW
}

/// Moves the original destination of a redirected connection from its socket cookie to
/// (netns cookie, client port) once the connection is established.
///
/// Minimum kernel: 4.13 for `sockops`, 4.19 for `bpf_get_socket_cookie` and 5.15 for
/// `bpf_get_netns_cookie` in this program type.
#[sock_ops]
pub fn tm_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.op() == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        record_original_dst(&ctx);
    }
    // The return value is only read for ops that request a reply; 1 means success.
    1
}

fn record_original_dst(ctx: &SockOpsContext) {
    // SAFETY: the context pointer comes from the kernel; the helper only reads it.
    let socket_cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // The `None` arm is the NULL check that avoids "R0 invalid mem access
    // 'map_value_or_null'". Most sockets were not redirected and have no entry.
    // SAFETY: the entry was written once by `tm_connect4` for this socket and is copied
    // out at once.
    let Some(original) = (unsafe { TM_PENDING.get(&socket_cookie) }).copied() else {
        return;
    };

    // A 4-byte volatile read, because sock_ops rejects narrow loads of `local_port`
    // with "invalid bpf_context access".
    // SAFETY: the kernel passes a valid `bpf_sock_ops`; the verifier checks the access.
    let local_port = unsafe { read_volatile(addr_of!((*ctx.ops).local_port)) };
    // SAFETY: the context pointer comes from the kernel; the helper only reads it.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = ConnKey {
        netns_cookie,
        // `local_port` is in host byte order in `bpf_sock_ops`.
        client_port: local_port as u16,
        _pad: [0; 6],
    };
    // An LRU insert with flags 0 fails only when the kernel finds no free or evictable
    // element. The proxy then finds no record and closes the connection, so the error
    // needs no handling here.
    let _ = TM_ORIG_DST.insert(&key, &original, 0);
    let _ = TM_PENDING.remove(&socket_cookie);
}
