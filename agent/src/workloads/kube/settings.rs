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
    /// The `tokenmesh-cni` plugin, which delays new pods until they are steered.
    #[serde(default)]
    pub cni: Option<CniSpec>,
}

/// `workloads.kubernetes.cni:` the socket the plugin calls, and where the agent installs
/// the plugin on the node.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CniSpec {
    /// The agent's Unix socket for the plugin, a path the node and the agent share.
    #[serde(default = "default_cni_socket")]
    pub socket: PathBuf,
    /// The node's CNI configuration folder, as mounted in the agent's container. The agent
    /// adds the plugin to the runtime's configuration list there and keeps it there. When
    /// unset, the plugin is installed by other means.
    #[serde(default)]
    pub conf_dir: Option<PathBuf>,
    /// The node's CNI plugin folder, as mounted in the agent's container; the agent copies the plugin
    /// binary there.
    #[serde(default)]
    pub bin_dir: Option<PathBuf>,
    /// The `tokenmesh-cni` binary to copy; by default the one beside the agent's binary.
    #[serde(default)]
    pub plugin_binary: Option<PathBuf>,
    /// How long a new pod's sandbox waits for the agent before the runtime retries it.
    #[serde(default = "default_cni_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_cni_socket() -> PathBuf {
    PathBuf::from(crate::cni::DEFAULT_SOCKET)
}

fn default_cni_timeout() -> Duration {
    Duration::from_secs(30)
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
    pub cni: Option<CniSettings>,
}

/// The validated `cni` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniSettings {
    pub socket: PathBuf,
    /// Set when the agent installs the plugin itself.
    pub chain: Option<crate::cni::chain::Chain>,
    pub timeout: Duration,
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
        let cni = self
            .cni
            .as_ref()
            .and_then(|cni| cni.validate(&mut problems));
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
            cni,
        })
    }
}

impl CniSpec {
    fn validate(&self, problems: &mut Problems) -> Option<CniSettings> {
        const KEY: &str = "workloads.kubernetes.cni";
        let before = problems.0.len();
        let paths = [
            ("socket", Some(&self.socket)),
            ("conf_dir", self.conf_dir.as_ref()),
            ("bin_dir", self.bin_dir.as_ref()),
            ("plugin_binary", self.plugin_binary.as_ref()),
        ];
        for (name, path) in paths {
            if let Some(path) = path.filter(|path| !path.is_absolute()) {
                problems.push(
                    format!("{KEY}.{name}"),
                    format!("{} is not an absolute path", path.display()),
                );
            }
        }
        if self.bin_dir.is_some() && self.conf_dir.is_none() {
            problems.push(
                format!("{KEY}.bin_dir"),
                "is set without conf_dir; set conf_dir too, so the copied plugin is also added to the node's CNI configuration",
            );
        }
        if self.timeout.is_zero() {
            problems.push(format!("{KEY}.timeout"), "must be longer than 0s, e.g. 30s");
        }
        if problems.0.len() > before {
            return None;
        }
        let chain = self
            .conf_dir
            .clone()
            .map(|conf_dir| crate::cni::chain::Chain {
                conf_dir,
                bin_dir: self.bin_dir.clone(),
                plugin_binary: self
                    .plugin_binary
                    .clone()
                    .unwrap_or_else(default_plugin_binary),
                socket: self.socket.clone(),
                timeout_seconds: self.timeout.as_secs().max(1),
            });
        Some(CniSettings {
            socket: self.socket.clone(),
            chain,
            timeout: self.timeout,
        })
    }
}

/// `tokenmesh-cni` beside the running binary, as the image and a cargo build place it.
fn default_plugin_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(crate::cni::PLUGIN_TYPE)))
        .unwrap_or_else(|| PathBuf::from(crate::cni::PLUGIN_TYPE))
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
    fn cni_defaults() {
        let settings = spec("node_name: a\ncni: {}\n").validate(&env).unwrap();
        let cni = settings.cni.unwrap();
        assert_eq!(cni.socket, PathBuf::from("/var/run/tokenmesh/cni.sock"));
        assert_eq!(cni.timeout, Duration::from_secs(30));
        assert_eq!(cni.chain, None);
    }

    #[test]
    fn cni_chain_from_folders() {
        let settings = spec(
            "node_name: a\ncni: {conf_dir: /host/etc/cni/net.d, bin_dir: /host/opt/cni/bin, plugin_binary: /tokenmesh-cni, timeout: 10s}\n",
        )
        .validate(&env)
        .unwrap();
        let chain = settings.cni.unwrap().chain.unwrap();
        assert_eq!(chain.conf_dir, PathBuf::from("/host/etc/cni/net.d"));
        assert_eq!(chain.bin_dir, Some(PathBuf::from("/host/opt/cni/bin")));
        assert_eq!(chain.plugin_binary, PathBuf::from("/tokenmesh-cni"));
        assert_eq!(chain.timeout_seconds, 10);
    }

    #[test]
    fn cni_bad_values_each_reported() {
        let problems =
            spec("node_name: a\ncni: {socket: cni.sock, bin_dir: /opt/cni/bin, timeout: 0s}\n")
                .validate(&env)
                .unwrap_err();
        let keys: Vec<String> = problems.into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            [
                "workloads.kubernetes.cni.socket",
                "workloads.kubernetes.cni.bin_dir",
                "workloads.kubernetes.cni.timeout",
            ]
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
