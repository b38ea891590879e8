//! The agent's YAML configuration: parsing, secret resolution and validation.
//!
//! A file is parsed with unknown keys rejected, then validated in full: every problem is
//! collected with the key it concerns, so one run of `check-config` lists them all.
//! Nothing takes effect until the whole file is valid.

pub(crate) mod locate;
mod plugins;
mod rules;
pub mod secret;

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use locate::Location;
use locate::Locations;

pub use plugins::{
    CreatorSettings, NonHttpAction, Plugin, PluginKind, PluginSpec, PluginType, TokenCheck,
    TokenFormat, TokenHeader, ValidatorSettings, WorkloadSelector,
};
pub use rules::{RulePlugin, UrlRule};

/// A configuration file that parsed and passed validation.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub path: PathBuf,
    /// The static workloads file, if `workloads.file` is set.
    pub workloads_file: Option<PathBuf>,
    /// Kubernetes discovery, if `workloads.kubernetes` is set.
    pub kubernetes: Option<crate::workloads::kube::KubernetesSettings>,
    pub steering: SteeringConfig,
    pub proxy: ProxyConfig,
    pub audit: AuditConfig,
    pub admin: AdminConfig,
    pub plugins: Vec<Plugin>,
    /// Per-route plugin overrides; the first rule that matches a request applies.
    pub urls: Vec<UrlRule>,
}

/// The agent's handling of its eBPF programs when it exits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExit {
    /// Leave the programs attached and pinned, so pod traffic to intercepted
    /// destinations is refused until an agent runs again (fail closed).
    #[default]
    Keep,
    /// Detach every program and remove every pin: pods reach destinations directly.
    Detach,
}

/// `steering:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SteeringConfig {
    /// bpffs folder for the pinned maps and links.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Parent cgroup of all pods; relative paths are taken from the cgroup v2 mount.
    pub pods_cgroup: PathBuf,
    /// Destination ports whose outbound connections are steered into the agent.
    pub intercept_ports: Vec<u16>,
    /// Destination networks whose connections are steered; every destination when empty.
    #[serde(default)]
    pub intercept_cidrs: Vec<ipnet::Ipv4Net>,
    /// Destination networks that are never steered, such as the identity provider, the
    /// Kubernetes API server and DNS. The longer prefix decides where both lists overlap.
    /// Identity provider endpoints written as IPv4 addresses are excluded automatically.
    #[serde(default)]
    pub exclude_cidrs: Vec<ipnet::Ipv4Net>,
    /// Port of the per-pod outbound listener on 127.0.0.1 inside each pod.
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// Port of the per-pod inbound listener on 127.0.0.1 inside each pod.
    #[serde(default = "default_inbound_port")]
    pub inbound_port: u16,
    #[serde(default)]
    pub on_exit: OnExit,
}

/// `proxy:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// How long to wait for a client's first bytes before treating the connection as
    /// not HTTP (protocols where the server speaks first send nothing).
    #[serde(default = "default_detect_timeout", with = "humantime_serde")]
    pub protocol_detect_timeout: Duration,
    /// Time limit for connecting to an upstream.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time limit for one request to the identity provider.
    #[serde(default = "default_idp_timeout", with = "humantime_serde")]
    pub idp_timeout: Duration,
    /// How long before `expires_in` a cached access token is replaced.
    #[serde(default = "default_refresh_skew", with = "humantime_serde")]
    pub token_refresh_skew: Duration,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            protocol_detect_timeout: default_detect_timeout(),
            connect_timeout: default_connect_timeout(),
            idp_timeout: default_idp_timeout(),
            token_refresh_skew: default_refresh_skew(),
        }
    }
}

/// `admin:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the `/healthz` and `/readyz` endpoint, in the node's namespace.
    #[serde(default = "default_admin_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
        }
    }
}

fn default_admin_listen() -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], 15021))
}

/// `audit:` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// File the JSON lines are appended to; `-` writes them to stdout.
    #[serde(default = "default_audit_path")]
    pub path: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            path: default_audit_path(),
        }
    }
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/tokenmesh")
}
fn default_outbound_port() -> u16 {
    15001
}
fn default_inbound_port() -> u16 {
    15006
}
fn default_detect_timeout() -> Duration {
    Duration::from_millis(500)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_idp_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_refresh_skew() -> Duration {
    Duration::from_secs(30)
}
fn default_audit_path() -> PathBuf {
    PathBuf::from("-")
}

/// The file as written, before validation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    workloads: RawWorkloads,
    steering: SteeringConfig,
    #[serde(default)]
    proxy: ProxyConfig,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    admin: AdminConfig,
    #[serde(default)]
    plugins: Vec<PluginSpec>,
    #[serde(default)]
    urls: Vec<rules::RuleSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkloads {
    /// Static workloads file; relative paths are taken from the config file's folder.
    #[serde(default)]
    file: Option<PathBuf>,
    /// Pods of this node from the Kubernetes API.
    #[serde(default)]
    kubernetes: Option<crate::workloads::kube::KubernetesSpec>,
}

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key, such as `plugins[1].parameters.allowed_cidrs[0]`; empty for syntax errors.
    pub key: String,
    pub message: String,
    /// Position of the key (or, for a missing key, of its parent) in the file.
    pub location: Option<Location>,
}

/// Every problem found in one configuration file.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        let noun = if count == 1 { "problem" } else { "problems" };
        write!(
            f,
            "invalid config file {}: {count} {noun}",
            self.file.display()
        )?;
        for problem in &self.problems {
            write!(f, "\n  - ")?;
            if let Some(at) = problem.location {
                write!(f, "line {} column {}: ", at.line, at.column)?;
            }
            if !problem.key.is_empty() {
                write!(f, "{}: ", problem.key)?;
            }
            write!(f, "{}", problem.message)?;
        }
        Ok(())
    }
}

/// Collects problems during validation.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub(crate) fn push(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            key: key.into(),
            message: message.into(),
            location: None,
        });
    }
}

impl Config {
    /// Reads and validates `path`, resolving secrets through `env`.
    pub fn load(path: &Path, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                key: String::new(),
                message: format!("cannot read the file: {e}"),
                location: None,
            }],
        })?;
        Config::parse(&text, path, env)
    }

    /// Reads only `steering.bpffs_dir` from `path` (the default when it is absent), for
    /// commands such as `uninstall` that must work where the agent's secrets do not exist.
    pub fn read_bpffs_dir(path: &Path) -> Result<PathBuf, ConfigError> {
        let error = |message: String| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                key: "steering.bpffs_dir".into(),
                message,
                location: None,
            }],
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| error(format!("cannot read the file: {e}")))?;
        let document: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| error(e.to_string()))?;
        match &document["steering"]["bpffs_dir"] {
            serde_yaml::Value::Null => Ok(default_bpffs_dir()),
            serde_yaml::Value::String(dir) if Path::new(dir).is_absolute() => Ok(dir.into()),
            other => Err(error(format!(
                "{other:?} is not an absolute path; use a folder under /sys/fs/bpf"
            ))),
        }
    }

    /// Reads only `workloads.kubernetes.cni.conf_dir` and `bin_dir` from `path`, for
    /// `uninstall`: the folders where the agent installed `tokenmesh-cni`, when it did.
    pub fn read_cni_dirs(path: &Path) -> Result<(Option<PathBuf>, Option<PathBuf>), ConfigError> {
        let error = |key: &str, message: String| ConfigError {
            file: path.to_path_buf(),
            problems: vec![Problem {
                key: format!("workloads.kubernetes.cni.{key}"),
                message,
                location: None,
            }],
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| error("conf_dir", format!("cannot read the file: {e}")))?;
        let document: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|e| error("conf_dir", e.to_string()))?;
        let cni = &document["workloads"]["kubernetes"]["cni"];
        let folder = |key: &str| match &cni[key] {
            serde_yaml::Value::Null => Ok(None),
            serde_yaml::Value::String(dir) if Path::new(dir).is_absolute() => {
                Ok(Some(PathBuf::from(dir)))
            }
            other => Err(error(key, format!("{other:?} is not an absolute path"))),
        };
        Ok((folder("conf_dir")?, folder("bin_dir")?))
    }

    /// Validates `text` as if it were the content of `path`.
    pub fn parse(
        text: &str,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let error = |problems| ConfigError {
            file: path.to_path_buf(),
            problems,
        };
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            let location = e.location().map(|at| Location {
                line: at.line(),
                column: at.column(),
            });
            // The location is printed in front of the message, so drop serde's copy.
            let message = e.to_string();
            let message = match location {
                Some(at) => message
                    .strip_suffix(&format!(" at line {} column {}", at.line, at.column))
                    .map(str::to_string)
                    .unwrap_or(message),
                None => message,
            };
            error(vec![Problem {
                key: String::new(),
                message,
                location,
            }])
        })?;

        let base_dir = path.parent().unwrap_or(Path::new("."));
        let mut problems = Problems::default();
        validate_steering(&raw.steering, &mut problems);
        validate_proxy(&raw.proxy, &mut problems);
        let plugins = plugins::validate(&raw.plugins, base_dir, env, &mut problems);
        let kubernetes = validate_workloads(&raw.workloads, env, &mut problems);
        // The typed parse succeeded, so the same text parses as a plain document, which
        // is what rule parameters are merged from.
        let document: serde_yaml::Value = serde_yaml::from_str(text).unwrap_or_default();
        let urls = rules::validate(
            &raw.urls,
            &raw.plugins,
            &document,
            base_dir,
            env,
            &mut problems,
        );

        if !problems.0.is_empty() {
            let locations = Locations::of(text);
            let mut found = problems.0;
            for problem in &mut found {
                problem.location = locations.find(&problem.key);
            }
            return Err(error(found));
        }
        Ok(Config {
            path: path.to_path_buf(),
            workloads_file: raw.workloads.file.map(|file| base_dir.join(file)),
            kubernetes,
            steering: raw.steering,
            proxy: raw.proxy,
            audit: AuditConfig {
                path: resolve_audit_path(&raw.audit.path, base_dir),
            },
            admin: raw.admin,
            plugins,
            urls,
        })
    }
}

fn validate_workloads(
    workloads: &RawWorkloads,
    env: &dyn Fn(&str) -> Option<String>,
    problems: &mut Problems,
) -> Option<crate::workloads::kube::KubernetesSettings> {
    if workloads.file.is_none() && workloads.kubernetes.is_none() {
        problems.push(
            "workloads",
            "names no source; set file: (a workloads file) or kubernetes: (node_name: ${NODE_NAME})",
        );
    }
    match workloads.kubernetes.as_ref()?.validate(env) {
        Ok(settings) => Some(settings),
        Err(found) => {
            problems.0.extend(found);
            None
        }
    }
}

fn resolve_audit_path(path: &Path, base_dir: &Path) -> PathBuf {
    if path == Path::new("-") {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

fn validate_steering(steering: &SteeringConfig, problems: &mut Problems) {
    if steering.intercept_ports.is_empty() {
        problems.push(
            "steering.intercept_ports",
            "is empty; list the destination ports whose traffic the agent handles, e.g. [8080]",
        );
    }
    for (i, port) in steering.intercept_ports.iter().enumerate() {
        if *port == 0 {
            problems.push(
                format!("steering.intercept_ports[{i}]"),
                "port 0 is not a valid port",
            );
        }
    }
    for (key, port) in [
        ("steering.outbound_port", steering.outbound_port),
        ("steering.inbound_port", steering.inbound_port),
    ] {
        if port == 0 {
            problems.push(key, "port 0 is not a valid port");
        }
        if steering.intercept_ports.contains(&port) {
            problems.push(
                key,
                format!("{port} is also in steering.intercept_ports; pick a port no app uses"),
            );
        }
    }
    if steering.outbound_port == steering.inbound_port {
        problems.push(
            "steering.inbound_port",
            format!(
                "{} equals steering.outbound_port; the two listeners need different ports",
                steering.inbound_port
            ),
        );
    }
    if steering.pods_cgroup.as_os_str().is_empty() {
        problems.push(
            "steering.pods_cgroup",
            "is empty; name the parent cgroup of the pods",
        );
    }
    if !steering.bpffs_dir.is_absolute() {
        problems.push(
            "steering.bpffs_dir",
            format!(
                "{} is not an absolute path; use a folder under /sys/fs/bpf",
                steering.bpffs_dir.display()
            ),
        );
    }
}

fn validate_proxy(proxy: &ProxyConfig, problems: &mut Problems) {
    for (key, value) in [
        (
            "proxy.protocol_detect_timeout",
            proxy.protocol_detect_timeout,
        ),
        ("proxy.connect_timeout", proxy.connect_timeout),
        ("proxy.idp_timeout", proxy.idp_timeout),
    ] {
        if value.is_zero() {
            problems.push(key, "must be longer than 0s, e.g. 500ms");
        }
    }
}

#[cfg(test)]
mod tests;
