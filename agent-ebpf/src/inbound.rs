//! Inbound steering: `sk_lookup` hands SYNs for protected pod addresses to the agent's
//! inbound listener, and drops them when that listener is gone.

use core::ptr::{addr_of, read_volatile};

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use tokenmesh_ebpf::InboundKey;

use crate::{AF_INET, IPPROTO_TCP, TM_INBOUND_SOCKS, TM_PROTECTED};

/// Selects the agent's inbound listener for TCP/IPv4 lookups of a protected
/// (address, port), and drops the SYN when the listener's SOCKMAP slot is empty.
///
/// Minimum kernel: 5.9 for `sk_lookup`, including `bpf_sk_assign` and SOCKMAP lookups
/// from this program type.
#[sk_lookup]
pub fn tm_sk_lookup(ctx: SkLookupContext) -> u32 {
    let lookup = ctx.lookup;

    // Volatile reads keep each context access at the field's full 4 bytes, which every
    // kernel with `sk_lookup` accepts ("invalid bpf_context access" otherwise).
    // SAFETY: the kernel passes a valid `bpf_sk_lookup`, and the verifier checks each
    // field offset and access size against it.
    let (family, protocol, local_ip4, local_port) = unsafe {
        (
            read_volatile(addr_of!((*lookup).family)),
            read_volatile(addr_of!((*lookup).protocol)),
            read_volatile(addr_of!((*lookup).local_ip4)),
            read_volatile(addr_of!((*lookup).local_port)),
        )
    };
    // NOTE: IPv6 lookups pass unsteered, because protected addresses are IPv4 only.
    if family != AF_INET || protocol != IPPROTO_TCP {
        return sk_action::SK_PASS;
    }

    let key = InboundKey {
        addr: local_ip4,
        // `local_port` is in host byte order in `bpf_sk_lookup`.
        port: local_port as u16,
        _pad: [0; 2],
    };
    // The `None` arm is the NULL check that avoids "R0 invalid mem access
    // 'map_value_or_null'". Addresses the agent does not protect, loopback among
    // them, keep the kernel's normal lookup.
    // SAFETY: the value is a `u32` slot index copied out at once.
    let Some(slot) = (unsafe { TM_PROTECTED.get(&key) }).copied() else {
        return sk_action::SK_PASS;
    };

    // `redirect_sk_lookup` NULL-checks the socket that the SOCKMAP lookup returns
    // ("R2 type=sock_or_null expected=sock" otherwise) and releases its reference
    // ("Unreleased reference" otherwise). An empty slot means the agent's listener is
    // closed: SK_DROP makes the kernel reply to the SYN with a RST, so the client sees
    // "connection refused" instead of reaching the application unchecked. While an
    // agent restart leaves two of these programs attached, the second assign fails
    // with EEXIST; the kernel still passes the SYN because an earlier program selected
    // a socket, and it drops only when no program selected one.
    match TM_INBOUND_SOCKS.redirect_sk_lookup(&ctx, slot, 0) {
        Ok(()) => sk_action::SK_PASS,
        Err(_) => sk_action::SK_DROP,
    }
}
