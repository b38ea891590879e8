//! The static workloads file: a YAML list of pods, for nodes outside Kubernetes and tests.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{Pod, PodIdentity};
use crate::config::locate::Locations;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadsFile {
    pods: Vec<PodEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PodEntry {
    name: String,
    namespace: String,
    service_account: String,
    ip: Ipv4Addr,
    netns: PathBuf,
    cgroup: PathBuf,
    #[serde(default)]
    protected_ports: Vec<u16>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

/// Reasons a workloads file is rejected.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadsError {
    #[error("cannot read workloads file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid workloads file {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Reads and checks a workloads file. Relative `cgroup` paths are taken from
/// `cgroup_root` (the cgroup v2 mount).
pub fn load_file(path: &Path, cgroup_root: &Path) -> Result<Vec<Pod>, WorkloadsError> {
    let text = std::fs::read_to_string(path).map_err(|error| WorkloadsError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    parse(&text, cgroup_root).map_err(|message| WorkloadsError::Invalid {
        path: path.to_path_buf(),
        message,
    })
}

/// Checks every entry and reports every problem, each with its line and column.
fn parse(text: &str, cgroup_root: &Path) -> Result<Vec<Pod>, String> {
    let file: WorkloadsFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut names = HashSet::new();
    let mut addresses = HashSet::new();
    let mut pods = Vec::new();
    let mut problems: Vec<(String, String)> = Vec::new();
    for (i, entry) in file.pods.into_iter().enumerate() {
        let key = format!("pods[{i}]");
        let mut problem = |field: &str, message: String| {
            let at = if field.is_empty() {
                key.clone()
            } else {
                format!("{key}.{field}")
            };
            problems.push((at, message));
        };
        let identity = PodIdentity {
            namespace: entry.namespace,
            name: entry.name,
            service_account: entry.service_account,
        };
        for (field, value) in [
            ("name", &identity.name),
            ("namespace", &identity.namespace),
            ("service_account", &identity.service_account),
        ] {
            if value.trim().is_empty() {
                problem(field, "is empty".to_string());
            }
        }
        if !names.insert((identity.namespace.clone(), identity.name.clone())) {
            problem("", format!("pod {identity} is listed twice"));
        }
        if !addresses.insert(entry.ip) {
            problem(
                "ip",
                format!("{} is already the address of another pod", entry.ip),
            );
        }
        if entry.ip.is_loopback() || entry.ip.is_unspecified() {
            problem(
                "ip",
                format!("{} is not a pod address; give the pod's own IP", entry.ip),
            );
        }
        if let Some(port) = entry.protected_ports.iter().find(|p| **p == 0) {
            problem(
                "protected_ports",
                format!("port {port} is not a valid port"),
            );
        }
        if !entry.netns.is_absolute() {
            problem(
                "netns",
                format!(
                    "{:?} is not an absolute path such as /run/netns/NAME",
                    entry.netns
                ),
            );
        }
        if entry.cgroup.as_os_str().is_empty() {
            problem(
                "cgroup",
                "is empty; give the pod's cgroup, relative to the cgroup v2 mount".to_string(),
            );
        }
        let cgroup = cgroup_root.join(&entry.cgroup);
        pods.push(Pod {
            identity,
            ip: entry.ip,
            netns: entry.netns,
            cgroup,
            protected_ports: entry.protected_ports,
            labels: entry.labels,
            credentials: None,
            probe_exemption: Default::default(),
        });
    }
    if problems.is_empty() {
        return Ok(pods);
    }
    let locations = Locations::of(text);
    let lines: Vec<String> = problems
        .iter()
        .map(|(key, message)| match locations.find(key) {
            Some(at) => format!("line {} column {}: {key}: {message}", at.line, at.column),
            None => format!("{key}: {message}"),
        })
        .collect();
    Err(lines.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "/sys/fs/cgroup";

    fn pod_yaml(name: &str, ip: &str) -> String {
        format!(
            "  - name: {name}\n    namespace: demo\n    service_account: {name}\n    \
             ip: {ip}\n    netns: /run/netns/{name}\n    cgroup: pods/{name}\n    \
             protected_ports: [8080]\n"
        )
    }

    #[test]
    fn parses_pods_and_joins_cgroup_root() {
        let text = format!(
            "pods:\n{}{}",
            pod_yaml("a", "10.1.0.2"),
            pod_yaml("b", "10.1.0.3")
        );
        let pods = parse(&text, Path::new(ROOT)).unwrap();
        assert_eq!(pods.len(), 2);
        assert_eq!(pods[0].identity.to_string(), "demo/a");
        assert_eq!(pods[1].ip, Ipv4Addr::new(10, 1, 0, 3));
        assert_eq!(pods[1].cgroup, Path::new("/sys/fs/cgroup/pods/b"));
        assert_eq!(pods[1].protected_ports, vec![8080]);
    }

    #[test]
    fn duplicate_address_rejected() {
        let text = format!(
            "pods:\n{}{}",
            pod_yaml("a", "10.1.0.2"),
            pod_yaml("b", "10.1.0.2")
        );
        let err = parse(&text, Path::new(ROOT)).unwrap_err();
        assert_eq!(
            err,
            "line 12 column 9: pods[1].ip: 10.1.0.2 is already the address of another pod"
        );
    }

    #[test]
    fn duplicate_pod_rejected() {
        let text = format!(
            "pods:\n{}{}",
            pod_yaml("a", "10.1.0.2"),
            pod_yaml("a", "10.1.0.3")
        );
        let err = parse(&text, Path::new(ROOT)).unwrap_err();
        assert_eq!(err, "line 9 column 5: pods[1]: pod demo/a is listed twice");
    }

    #[test]
    fn unknown_key_rejected_with_location() {
        let text = format!("pods:\n{}    colour: blue\n", pod_yaml("a", "10.1.0.2"));
        let err = parse(&text, Path::new(ROOT)).unwrap_err();
        assert!(err.contains("unknown field `colour`"), "{err}");
        assert!(err.contains("line 9"), "{err}");
    }

    #[test]
    fn every_problem_reported() {
        let text = format!(
            "pods:\n{}{}",
            pod_yaml("a", "10.1.0.2"),
            pod_yaml("a", "127.0.0.1")
        )
        .replace("protected_ports: [8080]", "protected_ports: [0]");
        let err = parse(&text, Path::new(ROOT)).unwrap_err();
        for expected in [
            "pods[0].protected_ports: port 0",
            "pods[1]: pod demo/a is listed twice",
            "pods[1].ip: 127.0.0.1 is not a pod address",
            "pods[1].protected_ports: port 0",
        ] {
            assert!(err.contains(expected), "{expected} missing from {err}");
        }
    }

    #[test]
    fn loopback_address_rejected() {
        let text = format!("pods:\n{}", pod_yaml("a", "127.0.0.1"));
        let err = parse(&text, Path::new(ROOT)).unwrap_err();
        assert!(
            err.starts_with("line 5 column 9: pods[0].ip: 127.0.0.1 is not a pod address"),
            "{err}"
        );
    }
}
