//! Finds a Kubernetes pod's cgroup and network namespace on this node.
//!
//! The kubelet puts every pod in a cgroup named after its UID, below a folder for its QoS
//! class. With the `cgroupfs` driver the layout is `kubepods/pod<uid>` (Guaranteed),
//! `kubepods/burstable/pod<uid>` and `kubepods/besteffort/pod<uid>`. With the `systemd`
//! driver it is `kubepods.slice/kubepods-pod<uid>.slice`,
//! `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice` and the
//! same for `besteffort`, where the dashes of the UID become underscores because systemd
//! reads a dash in a slice name as a parent separator. Container cgroups sit below the
//! pod's, so the pod's network namespace is found through any process of that subtree.

use std::{
    fmt,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// The kubelet's cgroup driver (`cgroupDriver` in the kubelet configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CgroupDriver {
    Cgroupfs,
    Systemd,
}

impl fmt::Display for CgroupDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CgroupDriver::Cgroupfs => "cgroupfs",
            CgroupDriver::Systemd => "systemd",
        })
    }
}

/// A pod's QoS class, as in `status.qosClass`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// Parses `status.qosClass`; `None` for a value Kubernetes does not define.
    pub fn parse(value: &str) -> Option<QosClass> {
        match value {
            "Guaranteed" => Some(QosClass::Guaranteed),
            "Burstable" => Some(QosClass::Burstable),
            "BestEffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }

    fn folder(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }
}

/// Errors of the cgroup and network namespace lookup.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "no cgroup for pod UID {uid} under {root}: tried {tried}; check workloads.kubernetes.cgroup_driver and kubepods_root, or the pod's containers have not started yet"
    )]
    CgroupNotFound {
        uid: String,
        root: PathBuf,
        tried: String,
    },
    #[error("pod UID {uid:?} is not a Kubernetes UID (expected hex digits and dashes)")]
    InvalidUid { uid: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no process runs in cgroup {cgroup} yet, so its network namespace is unknown")]
    NoProcess { cgroup: PathBuf },
    #[error(
        "the processes of cgroup {cgroup} share the agent's own network namespace; a host-network pod is never intercepted"
    )]
    HostNetwork { cgroup: PathBuf },
}

/// Returns the cgroup folder of one pod, relative to the folder that contains `kubepods`.
pub fn pod_cgroup_path(driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    match (driver, qos.folder()) {
        (CgroupDriver::Cgroupfs, None) => PathBuf::from(format!("kubepods/pod{uid}")),
        (CgroupDriver::Cgroupfs, Some(class)) => {
            PathBuf::from(format!("kubepods/{class}/pod{uid}"))
        }
        (CgroupDriver::Systemd, class) => {
            let escaped = uid.replace('-', "_");
            let mut path = PathBuf::from("kubepods.slice");
            match class {
                None => path.push(format!("kubepods-pod{escaped}.slice")),
                Some(class) => {
                    path.push(format!("kubepods-{class}.slice"));
                    path.push(format!("kubepods-{class}-pod{escaped}.slice"));
                }
            }
            path
        }
    }
}

/// Finds the pod's cgroup below `root` (the folder that contains `kubepods` or
/// `kubepods.slice`), trying the given driver or, with `None`, both.
pub fn find_pod_cgroup(
    root: &Path,
    driver: Option<CgroupDriver>,
    qos: QosClass,
    uid: &str,
) -> Result<(PathBuf, CgroupDriver), ResolveError> {
    // A UID goes into a path, so it must not contain a separator or `..`.
    if uid.is_empty() || !uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
        return Err(ResolveError::InvalidUid {
            uid: uid.to_string(),
        });
    }
    let drivers = match driver {
        Some(driver) => vec![driver],
        None => vec![CgroupDriver::Cgroupfs, CgroupDriver::Systemd],
    };
    let mut tried = Vec::new();
    for driver in drivers {
        let path = root.join(pod_cgroup_path(driver, qos, uid));
        if path.is_dir() {
            return Ok((path, driver));
        }
        tried.push(path.display().to_string());
    }
    Err(ResolveError::CgroupNotFound {
        uid: uid.to_string(),
        root: root.to_path_buf(),
        tried: tried.join(", "),
    })
}

/// Returns `/proc/PID/ns/net` of the lowest PID in the cgroup subtree. `proc` is the procfs
/// mount (the host's, with `hostPID`). A namespace equal to the agent's own is rejected:
/// the agent runs in the node's network namespace, and a pod there shares the host network.
pub fn find_pod_netns(cgroup: &Path, proc: &Path) -> Result<PathBuf, ResolveError> {
    let mut pids = Vec::new();
    collect_pids(cgroup, &mut pids)?;
    pids.sort_unstable();
    let own = netns_id(&proc.join("self/ns/net"))?;
    for pid in pids {
        let path = proc.join(pid.to_string()).join("ns/net");
        // The process may have exited since cgroup.procs was read.
        let Ok(id) = netns_id(&path) else { continue };
        if id == own {
            return Err(ResolveError::HostNetwork {
                cgroup: cgroup.to_path_buf(),
            });
        }
        return Ok(path);
    }
    Err(ResolveError::NoProcess {
        cgroup: cgroup.to_path_buf(),
    })
}

fn netns_id(path: &Path) -> Result<(u64, u64), ResolveError> {
    let meta = std::fs::metadata(path).map_err(|source| ResolveError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((meta.dev(), meta.ino()))
}

fn collect_pids(cgroup: &Path, pids: &mut Vec<u32>) -> Result<(), ResolveError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ResolveError::Read { path, source }
    };
    let procs = cgroup.join("cgroup.procs");
    let text = std::fs::read_to_string(&procs).map_err(read_error(&procs))?;
    pids.extend(
        text.lines()
            .filter_map(|line| line.trim().parse::<u32>().ok()),
    );
    for entry in std::fs::read_dir(cgroup).map_err(read_error(cgroup))? {
        let entry = entry.map_err(read_error(cgroup))?;
        if entry
            .file_type()
            .map_err(read_error(&entry.path()))?
            .is_dir()
        {
            collect_pids(&entry.path(), pids)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";

    #[test]
    fn cgroupfs_layout_per_qos() {
        let cases = [
            (
                QosClass::Guaranteed,
                "kubepods/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            ),
            (
                QosClass::Burstable,
                "kubepods/burstable/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            ),
            (
                QosClass::BestEffort,
                "kubepods/besteffort/pod0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0",
            ),
        ];
        for (qos, expected) in cases {
            assert_eq!(
                pod_cgroup_path(CgroupDriver::Cgroupfs, qos, UID),
                Path::new(expected)
            );
        }
    }

    #[test]
    fn systemd_layout_per_qos() {
        let cases = [
            (
                QosClass::Guaranteed,
                "kubepods.slice/kubepods-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
            ),
            (
                QosClass::Burstable,
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
            ),
            (
                QosClass::BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0f1e2d3c_4b5a_6978_8796_a5b4c3d2e1f0.slice",
            ),
        ];
        for (qos, expected) in cases {
            assert_eq!(
                pod_cgroup_path(CgroupDriver::Systemd, qos, UID),
                Path::new(expected)
            );
        }
    }

    #[test]
    fn uid_with_path_characters_rejected() {
        let root = Path::new("/nonexistent");
        for uid in ["../../etc", "a/b", ""] {
            let err = find_pod_cgroup(root, None, QosClass::Burstable, uid).unwrap_err();
            assert!(
                matches!(err, ResolveError::InvalidUid { .. }),
                "{uid}: {err}"
            );
        }
    }

    #[test]
    fn missing_cgroup_names_every_path_tried() {
        let root = Path::new("/nonexistent");
        let err = find_pod_cgroup(root, None, QosClass::Burstable, UID).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("/nonexistent/kubepods/burstable/pod0f1e2d3c"),
            "{message}"
        );
        assert!(
            message.contains("kubepods-burstable-pod0f1e2d3c_4b5a"),
            "{message}"
        );
    }

    #[test]
    fn qos_class_parses_kubernetes_values() {
        assert_eq!(QosClass::parse("Burstable"), Some(QosClass::Burstable));
        assert_eq!(QosClass::parse("BestEffort"), Some(QosClass::BestEffort));
        assert_eq!(QosClass::parse("Guaranteed"), Some(QosClass::Guaranteed));
        assert_eq!(QosClass::parse("burstable"), None);
    }
}
