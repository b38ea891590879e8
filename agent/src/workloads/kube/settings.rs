//! `workloads.kubernetes:` in the agent configuration.

use std::{path::PathBuf, time::Duration};

use ipnet::IpNet;
use serde::Deserialize;

use super::super::cgroups::CgroupDriver;
use crate::config::Problem;

/// The section as written in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSpec {
    /// This node's name, usually `${NODE_NAME}` filled from `spec.nodeName` through the
    /// downward API.
    pub node_name: String,
    /// The kubelet's cgroup driver; both layouts are tried when unset.
    #[serde(default)]
    pub cgroup_driver: Option<CgroupDriver>,
    /// Folder below the cgroup v2 mount that holds `kubepods` or `kubepods.slice`, for a
    /// kubelet started with `--cgroup-root`; empty for the mount itself.
    #[serde(default)]
    pub kubepods_root: PathBuf,
    /// procfs of the node (the agent runs with `hostPID`, so `/proc` is the node's).
    #[serde(default = "default_proc_path")]
    pub proc_path: PathBuf,
    /// How often pods whose cgroup or processes are missing are looked up again.
    #[serde(default = "default_resolve_retry", with = "humantime_serde")]
    pub resolve_retry: Duration,
    #[serde(default)]
    pub probe_exemption: ProbeExemptionSpec,
}

/// `workloads.kubernetes.probe_exemption:` which sources reach a protected pod's probe
/// ports without a token.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeExemptionSpec {
    /// Exempt the node's own addresses (`status.hostIPs` of the pod) on the ports that the
    /// pod's liveness, readiness and startup probes use.
    #[serde(default = "enabled_by_default")]
    pub enabled: bool,
    /// More source networks the kubelet's probes come from, such as the address of the
    /// CNI bridge on the node when the probes leave through it.
    #[serde(default)]
    pub extra_sources: Vec<IpNet>,
}

impl Default for ProbeExemptionSpec {
    fn default() -> Self {
        ProbeExemptionSpec {
            enabled: true,
            extra_sources: Vec::new(),
        }
    }
}

fn enabled_by_default() -> bool {
    true
}

fn default_proc_path() -> PathBuf {
    PathBuf::from("/proc")
}

fn default_resolve_retry() -> Duration {
    Duration::from_secs(5)
}

/// The validated section, with `${VAR}` in `node_name` resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesSettings {
    pub node_name: String,
    pub cgroup_driver: Option<CgroupDriver>,
    pub kubepods_root: PathBuf,
    pub proc_path: PathBuf,
    pub resolve_retry: Duration,
    pub probe_exemption: bool,
    pub probe_extra_sources: Vec<IpNet>,
}

impl KubernetesSpec {
    /// Checks the section, returning every problem found; `env` resolves a `${VAR}` node
    /// name.
    pub fn validate(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<KubernetesSettings, Vec<Problem>> {
        const KEY: &str = "workloads.kubernetes";
        let mut problems = Problems::default();
        let node_name = match self
            .node_name
            .trim()
            .strip_prefix("${")
            .and_then(|r| r.strip_suffix('}'))
        {
            Some(var) => env(var).unwrap_or_else(|| {
                problems.push(
                    format!("{KEY}.node_name"),
                    format!(
                        "environment variable {var} is not set; set it from spec.nodeName with the downward API"
                    ),
                );
                String::new()
            }),
            None => self.node_name.trim().to_string(),
        };
        if problems.0.is_empty() && !is_dns_subdomain(&node_name) {
            problems.push(
                format!("{KEY}.node_name"),
                format!(
                    "{node_name:?} is not a Kubernetes node name (lower-case letters, digits, '-' and '.'); use ${{NODE_NAME}}"
                ),
            );
        }
        if self.kubepods_root.is_absolute() {
            problems.push(
                format!("{KEY}.kubepods_root"),
                format!(
                    "{} is absolute; give the folder relative to the cgroup v2 mount, or leave it empty",
                    self.kubepods_root.display()
                ),
            );
        }
        if !self.proc_path.is_absolute() {
            problems.push(
                format!("{KEY}.proc_path"),
                format!(
                    "{} is not an absolute path such as /proc",
                    self.proc_path.display()
                ),
            );
        }
        if self.resolve_retry.is_zero() {
            problems.push(
                format!("{KEY}.resolve_retry"),
                "must be longer than 0s, e.g. 5s",
            );
        }
        if !problems.0.is_empty() {
            return Err(problems.0);
        }
        Ok(KubernetesSettings {
            node_name,
            cgroup_driver: self.cgroup_driver,
            kubepods_root: self.kubepods_root.clone(),
            proc_path: self.proc_path.clone(),
            resolve_retry: self.resolve_retry,
            probe_exemption: self.probe_exemption.enabled,
            probe_extra_sources: self.probe_exemption.extra_sources.clone(),
        })
    }
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn push(&mut self, key: String, message: impl Into<String>) {
        self.0.push(Problem {
            key,
            message: message.into(),
            location: None,
        });
    }
}

/// RFC 1123 subdomain, the form Kubernetes requires of node names.
fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> KubernetesSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn env(name: &str) -> Option<String> {
        (name == "NODE_NAME").then(|| "worker-1.example".to_string())
    }

    #[test]
    fn node_name_from_environment() {
        let settings = spec("node_name: ${NODE_NAME}").validate(&env).unwrap();
        assert_eq!(settings.node_name, "worker-1.example");
        assert_eq!(settings.proc_path, PathBuf::from("/proc"));
        assert_eq!(settings.resolve_retry, Duration::from_secs(5));
        assert!(settings.probe_exemption);
        assert_eq!(settings.cgroup_driver, None);
    }

    #[test]
    fn unset_node_variable_rejected() {
        let problems = spec("node_name: ${MISSING}").validate(&env).unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].key, "workloads.kubernetes.node_name");
        assert!(
            problems[0].message.contains("MISSING is not set"),
            "{}",
            problems[0].message
        );
    }

    #[test]
    fn bad_values_each_reported() {
        let problems = spec(
            "node_name: Worker_1\nkubepods_root: /sys/fs/cgroup\nproc_path: proc\nresolve_retry: 0s\n",
        )
        .validate(&env)
        .unwrap_err();
        let keys: Vec<String> = problems.into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "workloads.kubernetes.node_name",
                "workloads.kubernetes.kubepods_root",
                "workloads.kubernetes.proc_path",
                "workloads.kubernetes.resolve_retry",
            ]
        );
    }

    #[test]
    fn unknown_key_rejected() {
        let result: Result<KubernetesSpec, _> =
            serde_yaml::from_str("node_name: a\ncgroup_drvier: systemd\n");
        assert!(
            result
                .unwrap_err()
                .to_string()
                .contains("unknown field `cgroup_drvier`")
        );
    }

    #[test]
    fn driver_names_parse() {
        assert_eq!(
            spec("node_name: a\ncgroup_driver: systemd").cgroup_driver,
            Some(CgroupDriver::Systemd)
        );
        assert_eq!(
            spec("node_name: a\ncgroup_driver: cgroupfs").cgroup_driver,
            Some(CgroupDriver::Cgroupfs)
        );
    }
}
