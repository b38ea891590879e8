//! Inbound steering state: which pod addresses are protected, the SOCKMAP slot that
//! stores each pod's inbound listener, and the `sk_lookup` link of each namespace.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    os::fd::AsFd,
    path::PathBuf,
};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, SockMap},
    programs::{SkLookup, links::FdLink},
};
use tokenmesh_ebpf::{
    InboundKey, MAP_INBOUND_SOCKETS, MAP_PROTECTED, MAX_INBOUND_SOCKETS, PROGRAM_SK_LOOKUP,
};

use super::{
    Steering, SteeringError, is_not_found, lock, outbound::take_hash_map, pins, program_error,
    program_mut,
};
use crate::netns::Netns;

/// The loaded programs, the inbound maps, and this run's record of protected addresses.
pub(super) struct InboundState {
    /// Owner of the `sk_lookup` program, attached once per namespace on demand.
    ebpf: Ebpf,
    protected: HashMap<MapData, InboundKey, u32>,
    sockets: SockMap<MapData>,
    links_dir: PathBuf,
    addresses: BTreeMap<Ipv4Addr, ProtectedAddress>,
    /// Netns cookie to the `sk_lookup` link pin this run created.
    attached: BTreeMap<u64, PathBuf>,
}

/// One protected pod address.
struct ProtectedAddress {
    slot: u32,
    /// `None` for an address an earlier run protected, until it is protected again.
    netns_cookie: Option<u64>,
    ports: BTreeSet<u16>,
}

impl InboundState {
    /// Takes the inbound maps out of `ebpf`, and reads the addresses an earlier run
    /// protected, so they keep their slots.
    ///
    /// NOTE: entries and `sk_lookup` pins of pods that went away while the agent was
    /// down stay until `unprotect_inbound` for that address or `uninstall`.
    pub(super) fn new(mut ebpf: Ebpf, links_dir: PathBuf) -> Result<InboundState, SteeringError> {
        let protected: HashMap<MapData, InboundKey, u32> = take_hash_map(&mut ebpf, MAP_PROTECTED)?;
        let sockets = ebpf
            .take_map(MAP_INBOUND_SOCKETS)
            .ok_or(SteeringError::MissingObject {
                kind: "map",
                name: MAP_INBOUND_SOCKETS,
            })
            .and_then(|map| {
                SockMap::try_from(map).map_err(|error| SteeringError::Map {
                    map: MAP_INBOUND_SOCKETS,
                    entry: "opening the map".to_string(),
                    error,
                })
            })?;

        let mut addresses: BTreeMap<Ipv4Addr, ProtectedAddress> = BTreeMap::new();
        for entry in protected.iter() {
            let (key, slot) = entry.map_err(|error| SteeringError::Map {
                map: MAP_PROTECTED,
                entry: "listing entries pinned by an earlier run".to_string(),
                error,
            })?;
            let address = addresses
                .entry(key_address(&key))
                .or_insert_with(|| ProtectedAddress {
                    slot,
                    netns_cookie: None,
                    ports: BTreeSet::new(),
                });
            address.ports.insert(key.port);
        }

        Ok(InboundState {
            ebpf,
            protected,
            sockets,
            links_dir,
            addresses,
            attached: BTreeMap::new(),
        })
    }

    /// Attaches `sk_lookup` to `netns` unless this run already did, then removes the
    /// links an earlier run pinned for the same namespace.
    fn attach(&mut self, netns: &Netns) -> Result<(), SteeringError> {
        let cookie = netns.cookie();
        if self.attached.contains_key(&cookie) {
            return Ok(());
        }
        let program: &mut SkLookup = program_mut(&mut self.ebpf, PROGRAM_SK_LOOKUP)?;
        let link_id = program
            .attach(netns)
            .map_err(|error| SteeringError::AttachNetns {
                program: PROGRAM_SK_LOOKUP,
                netns: netns.path().to_path_buf(),
                error,
            })?;
        let link = program
            .take_link(link_id)
            .map_err(|error| program_error(PROGRAM_SK_LOOKUP, "take the link of", error))?;

        let kind = pins::sk_lookup_kind(cookie);
        let pin = pins::pin_link(
            FdLink::from(link),
            &self.links_dir,
            &kind,
            PROGRAM_SK_LOOKUP,
        )?;
        pins::remove_link_pins(&self.links_dir, &kind, Some(&pin))?;
        tracing::info!(
            netns.path = %netns.path().display(),
            netns.cookie = cookie,
            pin = %pin.display(),
            "sk_lookup attached"
        );
        self.attached.insert(cookie, pin);
        Ok(())
    }

    /// Returns the slot of `addr`, or the lowest free one.
    fn slot_for(&self, addr: Ipv4Addr) -> Result<u32, SteeringError> {
        if let Some(address) = self.addresses.get(&addr) {
            return Ok(address.slot);
        }
        let used: BTreeSet<u32> = self
            .addresses
            .values()
            .map(|address| address.slot)
            .collect();
        (0..MAX_INBOUND_SOCKETS)
            .find(|slot| !used.contains(slot))
            .ok_or(SteeringError::NoInboundSlot {
                addr,
                max: MAX_INBOUND_SOCKETS,
            })
    }

    /// Fails when `addr` is protected in another namespace by this run.
    fn check_owner(&self, addr: Ipv4Addr, netns_cookie: u64) -> Result<(), SteeringError> {
        match self
            .addresses
            .get(&addr)
            .and_then(|address| address.netns_cookie)
        {
            Some(existing) if existing != netns_cookie => Err(SteeringError::AddressInOtherNetns {
                addr,
                existing,
                requested: netns_cookie,
            }),
            _ => Ok(()),
        }
    }

    fn remove_key(&mut self, key: &InboundKey) -> Result<(), SteeringError> {
        match self.protected.remove(key) {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(SteeringError::Map {
                map: MAP_PROTECTED,
                entry: format!("{}:{}", key_address(key), key.port),
                error,
            }),
        }
    }
}

impl Steering {
    /// Steers inbound TCP connections to `addr`:`ports` inside `netns` to `listener`,
    /// a listening socket made in that namespace (for example on 127.0.0.1). The
    /// accepted sockets' local address is the original destination, and their peer the
    /// real client. Loopback connections to the application are never steered.
    ///
    /// Calling it again for the same address replaces the listener and the port list.
    pub fn protect_inbound(
        &self,
        netns: &Netns,
        addr: Ipv4Addr,
        ports: &[u16],
        listener: &impl AsFd,
    ) -> Result<(), SteeringError> {
        let mut state = lock(&self.inbound);
        let cookie = netns.cookie();
        state.check_owner(addr, cookie)?;
        let slot = state.slot_for(addr)?;
        state.attach(netns)?;

        // The listener goes in before the ports point at its slot, so no SYN finds an
        // empty slot, which would be refused.
        state
            .sockets
            .set(slot, &listener.as_fd(), 0)
            .map_err(|error| SteeringError::InboundSocket { addr, slot, error })?;

        let wanted: BTreeSet<u16> = ports.iter().copied().collect();
        for &port in &wanted {
            let key = inbound_key(addr, port);
            state
                .protected
                .insert(key, slot, 0)
                .map_err(|error| SteeringError::Map {
                    map: MAP_PROTECTED,
                    entry: format!("{addr}:{port} -> slot {slot}"),
                    error,
                })?;
        }
        let previous_ports = state
            .addresses
            .get(&addr)
            .map(|address| address.ports.clone())
            .unwrap_or_default();
        for &port in previous_ports.difference(&wanted) {
            state.remove_key(&inbound_key(addr, port))?;
        }

        state.addresses.insert(
            addr,
            ProtectedAddress {
                slot,
                netns_cookie: Some(cookie),
                ports: wanted,
            },
        );
        tracing::info!(
            netns.path = %netns.path().display(),
            %addr,
            ?ports,
            slot,
            "inbound protection on"
        );
        Ok(())
    }

    /// Stops steering inbound connections to `addr` in `netns`, frees its SOCKMAP
    /// slot, and detaches `sk_lookup` from `netns` when no protected address is left
    /// there. Unprotecting an address that is not protected succeeds.
    pub fn unprotect_inbound(&self, netns: &Netns, addr: Ipv4Addr) -> Result<(), SteeringError> {
        let mut state = lock(&self.inbound);
        let cookie = netns.cookie();
        state.check_owner(addr, cookie)?;

        // Every key of the address goes, also those an earlier run added.
        let mut keys = Vec::new();
        for key in state.protected.keys() {
            let key = key.map_err(|error| SteeringError::Map {
                map: MAP_PROTECTED,
                entry: format!("listing the ports of {addr}"),
                error,
            })?;
            if key_address(&key) == addr {
                keys.push(key);
            }
        }
        for key in &keys {
            state.remove_key(key)?;
        }

        if let Some(address) = state.addresses.remove(&addr) {
            match state.sockets.clear_index(&address.slot) {
                Ok(()) => {}
                // The slot is already empty when the listener was closed.
                Err(error) if is_not_found(&error) => {}
                Err(error) => {
                    return Err(SteeringError::InboundSocket {
                        addr,
                        slot: address.slot,
                        error,
                    });
                }
            }
        }

        let netns_in_use = state
            .addresses
            .values()
            .any(|address| address.netns_cookie == Some(cookie));
        if !netns_in_use {
            state.attached.remove(&cookie);
            let removed =
                pins::remove_link_pins(&state.links_dir, &pins::sk_lookup_kind(cookie), None)?;
            if removed > 0 {
                tracing::info!(
                    netns.path = %netns.path().display(),
                    netns.cookie = cookie,
                    "sk_lookup detached"
                );
            }
        }
        tracing::info!(netns.path = %netns.path().display(), %addr, "inbound protection off");
        Ok(())
    }
}

fn inbound_key(addr: Ipv4Addr, port: u16) -> InboundKey {
    InboundKey {
        // Network byte order: the octets in memory order, as `bpf_sk_lookup` stores them.
        addr: u32::from_ne_bytes(addr.octets()),
        port,
        _pad: [0; 2],
    }
}

fn key_address(key: &InboundKey) -> Ipv4Addr {
    Ipv4Addr::from(key.addr.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbound_key_network_order() {
        let key = inbound_key(Ipv4Addr::new(10, 1, 2, 3), 8080);

        assert_eq!(key.addr.to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(key.port, 8080);
        assert_eq!(key_address(&key), Ipv4Addr::new(10, 1, 2, 3));
    }
}
