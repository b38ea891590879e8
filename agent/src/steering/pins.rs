//! Pins under `bpffs_dir`: the maps, pinned by name by the loader, and the links, pinned
//! by this module so the programs stay attached when the agent exits.
//!
//! Layout: `<bpffs_dir>/<MAP NAME>` for each map, and under `<bpffs_dir>/links/` one pin
//! per link named `<kind>-<kernel link id>`, where the kind is `connect4`, `sockops` or
//! `sk_lookup-<netns cookie>`. The link id makes every pin name unique, so a new link can
//! be pinned before the one it replaces is removed. Names use `-` because bpffs rejects
//! names that contain a `.` with EPERM.

use std::{
    io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::maps::{MapInfo, MapType};
use aya::programs::links::FdLink;
use tokenmesh_ebpf::{
    ConnKey, InboundKey, MAP_AGENT_CGROUP, MAP_INBOUND_SOCKETS, MAP_INTERCEPT_NETS,
    MAP_INTERCEPT_PORTS, MAP_ORIGINAL_DST, MAP_PENDING, MAP_PODS, MAP_PROTECTED,
    MAX_INBOUND_SOCKETS, MAX_INTERCEPT_NETS, MAX_INTERCEPT_PORTS, MAX_PODS, MAX_PROTECTED_PORTS,
    MAX_TRACKED_CONNECTIONS, OriginalDst, PodSteering, PortPolicy,
};

use super::{SteeringError, mounts};

/// Folder under `bpffs_dir` for the link pins.
const LINKS_FOLDER: &str = "links";
/// Link pin kinds; `sk_lookup` pins add the netns cookie, as `sk_lookup-<cookie>`.
pub(super) const CONNECT4_KIND: &str = "connect4";
pub(super) const SOCKOPS_KIND: &str = "sockops";
const SK_LOOKUP_KIND: &str = "sk_lookup";

/// Kind of the `sk_lookup` link pins of one network namespace.
pub(super) fn sk_lookup_kind(netns_cookie: u64) -> String {
    format!("{SK_LOOKUP_KIND}-{netns_cookie}")
}

pub(super) fn links_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(LINKS_FOLDER)
}

/// Pins `link` as `<links_dir>/<kind>-<link id>` and returns the pin path.
pub(super) fn pin_link(
    link: FdLink,
    links_dir: &Path,
    kind: &str,
    program: &'static str,
) -> Result<PathBuf, SteeringError> {
    let link_id = link
        .info()
        .map_err(|error| SteeringError::LinkInfo { program, error })?
        .id();
    let path = links_dir.join(format!("{kind}-{link_id}"));
    link.pin(&path).map_err(|error| SteeringError::PinLink {
        path: path.clone(),
        error,
    })?;
    Ok(path)
}

/// Removes every link pin of `kind` except `keep`, which detaches those links once no
/// process has them open, and returns how many were removed.
pub(super) fn remove_link_pins(
    links_dir: &Path,
    kind: &str,
    keep: Option<&Path>,
) -> Result<usize, SteeringError> {
    let prefix = format!("{kind}-");
    let mut removed = 0;
    for path in list_folder(links_dir)? {
        let Some(name) = path.file_name().and_then(|name| name.to_str()) else {
            continue;
        };
        // The rest of the name must be the link id, so `sk_lookup-1` never matches the
        // pins of `sk_lookup-12`.
        let is_kind = name
            .strip_prefix(&prefix)
            .is_some_and(|id| !id.is_empty() && id.bytes().all(|byte| byte.is_ascii_digit()));
        if is_kind && Some(path.as_path()) != keep {
            remove_pin(&path)?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Detaches every program and removes every pin that a run with this `bpffs_dir` left,
/// then the folder itself. Does nothing when the folder does not exist.
///
/// Only the pins this module creates are removed; the folder is kept, and an error
/// returned, when it contains anything else.
pub fn uninstall(bpffs_dir: &Path) -> Result<(), SteeringError> {
    if !bpffs_dir.exists() {
        return Ok(());
    }
    mounts::check_on_bpffs(bpffs_dir)?;

    let links_dir = links_dir(bpffs_dir);
    if links_dir.exists() {
        remove_link_pins(&links_dir, CONNECT4_KIND, None)?;
        remove_link_pins(&links_dir, SOCKOPS_KIND, None)?;
        for path in list_folder(&links_dir)? {
            let name = path
                .file_name()
                .and_then(|name| name.to_str())
                .unwrap_or("");
            if let Some(cookie) = name
                .strip_prefix(SK_LOOKUP_KIND)
                .and_then(|rest| rest.strip_prefix('-'))
                .and_then(|rest| rest.split('-').next())
                .and_then(|cookie| cookie.parse::<u64>().ok())
            {
                remove_link_pins(&links_dir, &sk_lookup_kind(cookie), None)?;
            }
        }
        remove_folder(&links_dir)?;
    }

    for layout in &MAP_LAYOUTS {
        let path = bpffs_dir.join(layout.name);
        if path.exists() {
            remove_pin(&path)?;
        }
    }
    remove_folder(bpffs_dir)?;
    tracing::info!(bpffs_dir = %bpffs_dir.display(), "removed steering pins");
    Ok(())
}

/// Checks that maps an earlier run pinned under `bpffs_dir` have the type, key size,
/// value size and capacity this agent's programs use, because the loader reuses a
/// pinned map as it is.
pub(super) fn check_pinned_maps(bpffs_dir: &Path) -> Result<(), SteeringError> {
    for layout in &MAP_LAYOUTS {
        let path = bpffs_dir.join(layout.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|error| SteeringError::Map {
            map: layout.name,
            entry: format!("reading pinned map info at {}", path.display()),
            error,
        })?;
        if let Some(detail) = layout.mismatch(&info) {
            return Err(SteeringError::PinnedMapMismatch { path, detail });
        }
    }
    Ok(())
}

/// Type, key and value sizes and capacity of one map, as the eBPF crate defines it.
struct MapLayout {
    name: &'static str,
    map_type: MapType,
    key_size: usize,
    value_size: usize,
    max_entries: u32,
}

impl MapLayout {
    fn mismatch(&self, info: &MapInfo) -> Option<String> {
        let found = (
            info.map_type().ok(),
            info.key_size() as usize,
            info.value_size() as usize,
            info.max_entries(),
        );
        let expected = (
            Some(self.map_type),
            self.key_size,
            self.value_size,
            self.max_entries,
        );
        (found != expected).then(|| {
            format!(
                "found type {:?}, key size {}, value size {}, max entries {}; expected type \
                 {:?}, key size {}, value size {}, max entries {}",
                found.0, found.1, found.2, found.3, expected.0, expected.1, expected.2, expected.3
            )
        })
    }
}

const MAP_LAYOUTS: [MapLayout; 8] = [
    MapLayout {
        name: MAP_INTERCEPT_PORTS,
        map_type: MapType::Hash,
        key_size: size_of::<u16>(),
        value_size: size_of::<PortPolicy>(),
        max_entries: MAX_INTERCEPT_PORTS,
    },
    MapLayout {
        name: MAP_AGENT_CGROUP,
        map_type: MapType::Array,
        key_size: size_of::<u32>(),
        value_size: size_of::<u64>(),
        max_entries: 1,
    },
    MapLayout {
        name: MAP_INTERCEPT_NETS,
        map_type: MapType::LpmTrie,
        // An LPM key is a u32 prefix length followed by the u32 address.
        key_size: size_of::<u32>() + size_of::<u32>(),
        value_size: size_of::<PortPolicy>(),
        max_entries: MAX_INTERCEPT_NETS,
    },
    MapLayout {
        name: MAP_PODS,
        map_type: MapType::Hash,
        key_size: size_of::<u64>(),
        value_size: size_of::<PodSteering>(),
        max_entries: MAX_PODS,
    },
    MapLayout {
        name: MAP_PENDING,
        map_type: MapType::LruHash,
        key_size: size_of::<u64>(),
        value_size: size_of::<OriginalDst>(),
        max_entries: MAX_TRACKED_CONNECTIONS,
    },
    MapLayout {
        name: MAP_ORIGINAL_DST,
        map_type: MapType::LruHash,
        key_size: size_of::<ConnKey>(),
        value_size: size_of::<OriginalDst>(),
        max_entries: MAX_TRACKED_CONNECTIONS,
    },
    MapLayout {
        name: MAP_PROTECTED,
        map_type: MapType::Hash,
        key_size: size_of::<InboundKey>(),
        value_size: size_of::<u32>(),
        max_entries: MAX_PROTECTED_PORTS,
    },
    MapLayout {
        name: MAP_INBOUND_SOCKETS,
        map_type: MapType::SockMap,
        key_size: size_of::<u32>(),
        value_size: size_of::<u32>(),
        max_entries: MAX_INBOUND_SOCKETS,
    },
];

fn list_folder(path: &Path) -> Result<Vec<PathBuf>, SteeringError> {
    let folder_error = |error| SteeringError::PinFolder {
        path: path.to_path_buf(),
        error,
    };
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(path).map_err(folder_error)? {
        paths.push(entry.map_err(folder_error)?.path());
    }
    paths.sort();
    Ok(paths)
}

fn remove_pin(path: &Path) -> Result<(), SteeringError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(SteeringError::RemovePin {
            path: path.to_path_buf(),
            error,
        }),
    }
}

fn remove_folder(path: &Path) -> Result<(), SteeringError> {
    std::fs::remove_dir(path).map_err(|error| SteeringError::RemovePin {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_link_pins_matches_kind_exactly() {
        let folder = tempfile::tempdir().unwrap();
        for name in [
            "sk_lookup-1-7",
            "sk_lookup-12-8",
            "sk_lookup-1-x",
            "connect4-9",
        ] {
            std::fs::write(folder.path().join(name), b"").unwrap();
        }
        let keep = folder.path().join("sk_lookup-1-7");

        let removed = remove_link_pins(folder.path(), &sk_lookup_kind(1), Some(&keep)).unwrap();
        assert_eq!(removed, 0);

        let removed = remove_link_pins(folder.path(), &sk_lookup_kind(1), None).unwrap();
        assert_eq!(removed, 1);
        assert!(!keep.exists());
        assert!(folder.path().join("sk_lookup-12-8").exists());
        assert!(folder.path().join("sk_lookup-1-x").exists());
        assert!(folder.path().join("connect4-9").exists());
    }

    #[test]
    fn uninstall_missing_folder_is_noop() {
        uninstall(Path::new("/nonexistent/tokenmesh-pins")).unwrap();
    }

    #[test]
    fn uninstall_rejects_folder_off_bpffs() {
        let folder = tempfile::tempdir().unwrap();

        let error = uninstall(folder.path()).unwrap_err();

        assert!(
            matches!(&error, SteeringError::NotOnBpffs { path } if path == folder.path()),
            "error: {error}"
        );
    }
}
