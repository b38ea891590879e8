//! Reloading the configuration and workloads files while traffic flows. A new file is
//! parsed and validated in full first; only a valid one replaces the running one.

use std::{
    hash::{DefaultHasher, Hash, Hasher},
    path::{Path, PathBuf},
    time::Duration,
};

use super::{Env, load_pods};
use crate::{config::Config, workloads::Pod};

/// How often the files are checked for changes. Reading two small files this often costs
/// little, and it also catches ConfigMap updates, which replace a symlink.
pub const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// The running configuration and what its files looked like when it was loaded.
pub struct Reloader {
    current: Config,
    cgroup_mount: PathBuf,
    env: Env,
    fingerprint: u64,
}

impl Reloader {
    pub fn new(current: Config, cgroup_mount: PathBuf, env: Env) -> Reloader {
        let fingerprint = fingerprint(&current.path, current.workloads_file.as_deref());
        Reloader {
            current,
            cgroup_mount,
            env,
            fingerprint,
        }
    }

    pub fn current(&self) -> &Config {
        &self.current
    }

    /// True once after the content of the config file or its workloads file changed.
    pub fn files_changed(&mut self) -> bool {
        let now = fingerprint(&self.current.path, self.current.workloads_file.as_deref());
        if now == self.fingerprint {
            return false;
        }
        self.fingerprint = now;
        true
    }

    /// Loads and validates both files. On any problem it logs the reason and returns
    /// `None`, and the running configuration stays.
    pub fn load(&mut self, trigger: &str) -> Option<(Config, Vec<Pod>)> {
        let env = self.env.clone();
        let config = match Config::load(&self.current.path, &|name| env(name)) {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(trigger, error = %e, "config reload rejected; the running configuration stays");
                return None;
            }
        };
        let pods = match load_pods(&config, &self.cgroup_mount) {
            Ok(pods) => pods,
            Err(e) => {
                tracing::error!(trigger, error = %e, "workloads reload rejected; the running configuration stays");
                return None;
            }
        };
        self.warn_about_restart_only_changes(&config);
        // A workloads file that moved is watched from now on.
        self.fingerprint = fingerprint(&config.path, config.workloads_file.as_deref());
        Some((config, pods))
    }

    /// Makes `config` the running configuration.
    pub fn accept(&mut self, config: Config) {
        self.current = config;
    }

    fn warn_about_restart_only_changes(&self, new: &Config) {
        let old = &self.current;
        for (section, changed) in [
            ("steering", old.steering != new.steering),
            ("proxy", old.proxy != new.proxy),
            ("audit", old.audit != new.audit),
            ("admin", old.admin != new.admin),
            ("workloads.kubernetes", old.kubernetes != new.kubernetes),
        ] {
            if changed {
                tracing::warn!(
                    section,
                    "changes to this section take effect after a restart; the running values stay"
                );
            }
        }
    }
}

/// Hashes the content of both files; a missing file hashes as empty.
fn fingerprint(config: &Path, workloads: Option<&Path>) -> u64 {
    let mut hasher = DefaultHasher::new();
    for path in std::iter::once(config).chain(workloads) {
        std::fs::read(path).unwrap_or_default().hash(&mut hasher);
    }
    hasher.finish()
}
