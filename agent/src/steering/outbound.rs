//! Outbound steering state: intercepted ports, enrolled pods and the original
//! destinations that `sockops` records for the proxy.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use aya::{
    Ebpf, Pod,
    maps::{
        Array, HashMap, MapData,
        lpm_trie::{Key, LpmTrie},
    },
};
use ipnet::Ipv4Net;
use tokenmesh_ebpf::{
    ConnKey, MAP_AGENT_CGROUP, MAP_INTERCEPT_NETS, MAP_INTERCEPT_PORTS, MAP_PODS, PodSteering,
    PortPolicy,
};

use super::{Steering, SteeringError, is_not_found, lock};

impl Steering {
    /// Steers the outbound connections of the pod whose network namespace has
    /// `netns_cookie` to its listener on 127.0.0.1:`outbound_port` in that namespace.
    ///
    /// Only processes in a cgroup under `pods_cgroup`, other than the agent's own, are
    /// steered.
    pub fn enroll_outbound(
        &self,
        netns_cookie: u64,
        outbound_port: u16,
    ) -> Result<(), SteeringError> {
        if outbound_port == 0 {
            return Err(SteeringError::InvalidOutboundPort { netns_cookie });
        }
        let steering = PodSteering {
            outbound_port,
            _pad: [0; 6],
        };
        lock(&self.pods)
            .insert(netns_cookie, steering, 0)
            .map_err(|error| SteeringError::Map {
                map: MAP_PODS,
                entry: format!("netns cookie {netns_cookie} -> outbound port {outbound_port}"),
                error,
            })?;
        tracing::debug!(
            netns.cookie = netns_cookie,
            outbound.port = outbound_port,
            "pod enrolled"
        );
        Ok(())
    }

    /// Stops steering the outbound connections of the pod with `netns_cookie`. Removing
    /// a pod that is not enrolled succeeds.
    pub fn remove_outbound(&self, netns_cookie: u64) -> Result<(), SteeringError> {
        match lock(&self.pods).remove(&netns_cookie) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => {
                return Err(SteeringError::Map {
                    map: MAP_PODS,
                    entry: format!("netns cookie {netns_cookie}"),
                    error,
                });
            }
        }
        tracing::debug!(
            netns.cookie = netns_cookie,
            "pod removed from outbound steering"
        );
        Ok(())
    }

    /// Returns the original destination of the redirected connection whose client
    /// side is `client_port` in the namespace with `netns_cookie`, and deletes the
    /// record. Returns `None` when there is no record: the connection was not
    /// redirected, its record was already taken, or the LRU map evicted it.
    pub fn take_original_dst(&self, netns_cookie: u64, client_port: u16) -> Option<SocketAddrV4> {
        let key = ConnKey {
            netns_cookie,
            client_port,
            _pad: [0; 6],
        };
        let mut original_dst = lock(&self.original_dst);
        let value = match original_dst.get(&key, 0) {
            Ok(value) => value,
            Err(error) if is_not_found(&error) => return None,
            Err(error) => {
                tracing::warn!(
                    netns.cookie = netns_cookie,
                    client.port = client_port,
                    %error,
                    "failed to read the original destination"
                );
                return None;
            }
        };
        if let Err(error) = original_dst.remove(&key) {
            // The record is still returned; the LRU map evicts it later.
            tracing::warn!(
                netns.cookie = netns_cookie,
                client.port = client_port,
                %error,
                "failed to delete the original destination record"
            );
        }
        Some(SocketAddrV4::new(
            Ipv4Addr::from(value.addr.to_ne_bytes()),
            value.port,
        ))
    }
}

/// Makes `TM_INTERCEPT` hold exactly `ports`: the new ports are added before the ports
/// an earlier run left are removed.
pub(super) fn sync_intercept_ports(ebpf: &mut Ebpf, ports: &[u16]) -> Result<(), SteeringError> {
    let mut intercept: HashMap<MapData, u16, PortPolicy> =
        take_hash_map(ebpf, MAP_INTERCEPT_PORTS)?;
    let wanted: BTreeSet<u16> = ports.iter().copied().collect();
    let map_error = |port: u16, error| SteeringError::Map {
        map: MAP_INTERCEPT_PORTS,
        entry: format!("port {port}"),
        error,
    };

    let policy = PortPolicy {
        intercept: 1,
        _pad: [0; 3],
    };
    for &port in &wanted {
        intercept
            .insert(port, policy, 0)
            .map_err(|error| map_error(port, error))?;
    }

    let mut stale = Vec::new();
    for port in intercept.keys() {
        let port = port.map_err(|error| SteeringError::Map {
            map: MAP_INTERCEPT_PORTS,
            entry: "listing ports pinned by an earlier run".to_string(),
            error,
        })?;
        if !wanted.contains(&port) {
            stale.push(port);
        }
    }
    for port in stale {
        match intercept.remove(&port) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(map_error(port, error)),
        }
    }
    Ok(())
}

/// Makes `TM_INTERCEPT_NETS` hold exactly the intercepted networks (0.0.0.0/0 when there
/// are none) and the excluded ones: new entries are written before stale ones go.
pub(super) fn sync_intercept_networks(
    ebpf: &mut Ebpf,
    intercept: &[Ipv4Net],
    exclude: &[Ipv4Net],
) -> Result<(), SteeringError> {
    let map = ebpf
        .map_mut(MAP_INTERCEPT_NETS)
        .ok_or(SteeringError::MissingObject {
            kind: "map",
            name: MAP_INTERCEPT_NETS,
        })?;
    let map_error = |entry: String, error| SteeringError::Map {
        map: MAP_INTERCEPT_NETS,
        entry,
        error,
    };
    let mut trie: LpmTrie<&mut MapData, u32, PortPolicy> =
        LpmTrie::try_from(map).map_err(|error| map_error("opening the map".to_string(), error))?;

    let every = [Ipv4Net::default()];
    let intercept = if intercept.is_empty() {
        &every[..]
    } else {
        intercept
    };
    let mut wanted = BTreeMap::new();
    for net in intercept {
        wanted.insert(net.trunc(), 1u8);
    }
    // Inserted last, so an exclusion of the same prefix wins.
    for net in exclude {
        wanted.insert(net.trunc(), 0u8);
    }
    for (net, action) in &wanted {
        let policy = PortPolicy {
            intercept: *action,
            _pad: [0; 3],
        };
        trie.insert(&network_key(net), policy, 0)
            .map_err(|error| map_error(net.to_string(), error))?;
    }

    let mut stale = Vec::new();
    for key in trie.keys() {
        let key = key.map_err(|error| {
            map_error(
                "listing networks pinned by an earlier run".to_string(),
                error,
            )
        })?;
        let net = Ipv4Net::new(
            Ipv4Addr::from(key.data().to_ne_bytes()),
            key.prefix_len() as u8,
        );
        match net {
            Ok(net) if wanted.contains_key(&net) => {}
            _ => stale.push(key),
        }
    }
    for key in stale {
        match trie.remove(&key) {
            Ok(()) => {}
            Err(error) if is_not_found(&error) => {}
            Err(error) => return Err(map_error("removing a stale network".to_string(), error)),
        }
    }
    Ok(())
}

/// Records the agent's cgroup id, whose connects `connect4` leaves alone.
pub(super) fn set_agent_cgroup(ebpf: &mut Ebpf, cgroup_id: u64) -> Result<(), SteeringError> {
    let map = ebpf
        .map_mut(MAP_AGENT_CGROUP)
        .ok_or(SteeringError::MissingObject {
            kind: "map",
            name: MAP_AGENT_CGROUP,
        })?;
    let map_error = |error| SteeringError::Map {
        map: MAP_AGENT_CGROUP,
        entry: format!("cgroup id {cgroup_id}"),
        error,
    };
    let mut array: Array<&mut MapData, u64> = Array::try_from(map).map_err(map_error)?;
    array.set(0, cgroup_id, 0).map_err(map_error)?;
    tracing::debug!(cgroup.id = cgroup_id, "agent cgroup excluded from steering");
    Ok(())
}

/// Builds the trie key of `net`: the address in network byte order, as `connect4` reads it.
fn network_key(net: &Ipv4Net) -> Key<u32> {
    Key::new(
        u32::from(net.prefix_len()),
        u32::from_ne_bytes(net.network().octets()),
    )
}

/// Takes the hash map `name` out of `ebpf`, so it can live behind its own lock.
pub(super) fn take_hash_map<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, SteeringError> {
    let map = ebpf
        .take_map(name)
        .ok_or(SteeringError::MissingObject { kind: "map", name })?;
    HashMap::try_from(map).map_err(|error| SteeringError::Map {
        map: name,
        entry: "opening the map".to_string(),
        error,
    })
}
