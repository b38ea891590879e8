//! Adds `tokenmesh-cni` to the node's CNI configuration, and removes it again.
//!
//! The runtime (containerd, CRI-O) uses the first file of the configuration folder in
//! lexical order with the extension `.conflist`, `.conf` or `.json`, as libcni sorts
//! them. The plugin is appended to that file's `plugins` list, after the network plugin
//! that gives the pod its address. A single-plugin `.conf` file is rewritten as the
//! equivalent `.conflist`, because only a list can chain plugins.

use std::{
    fs,
    io::Write,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};

use super::PLUGIN_TYPE;

/// The plugin's place on the node: configuration folder, plugin folder and entry values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// The node's CNI configuration folder, usually `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// The node's CNI plugin folder, usually `/opt/cni/bin`; the plugin binary is copied
    /// there when set.
    pub bin_dir: Option<PathBuf>,
    /// The `tokenmesh-cni` binary to copy.
    pub plugin_binary: PathBuf,
    /// The agent's socket, written into the plugin's configuration entry.
    pub socket: PathBuf,
    /// How long the plugin waits for the agent, written into the entry.
    pub timeout_seconds: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error(
        "no CNI configuration (.conflist, .conf or .json) in {0}; the node's network plugin writes one, and tokenmesh-cni is added once it exists"
    )]
    NoConfig(PathBuf),
    // The I/O error is part of the message and not a `source`, so it is printed once.
    #[error("cannot {action} {path}: {error}")]
    Io {
        action: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is not a CNI configuration: {reason}; fix or remove the file")]
    Invalid { path: PathBuf, reason: String },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ChainError {
    let path = path.to_path_buf();
    move |error| ChainError::Io {
        action,
        path,
        error,
    }
}

/// The effect of [`ensure`].
#[derive(Debug, PartialEq, Eq)]
pub enum Ensured {
    /// The configuration file was written to add or update the plugin's entry.
    Written(PathBuf),
    /// The file already had the plugin's entry.
    Unchanged(PathBuf),
}

impl Chain {
    /// Builds the plugin's entry for the `plugins` list.
    fn entry(&self) -> Value {
        json!({
            "type": PLUGIN_TYPE,
            "agent_socket": self.socket,
            "timeout_seconds": self.timeout_seconds,
        })
    }

    /// Copies the plugin binary when it differs, and makes sure the runtime's
    /// configuration file ends with the plugin's entry.
    pub fn ensure(&self) -> Result<Ensured, ChainError> {
        if let Some(bin_dir) = &self.bin_dir {
            install_binary(&self.plugin_binary, &bin_dir.join(PLUGIN_TYPE))?;
        }

        let path = primary_config(&self.conf_dir)?;
        let text = fs::read_to_string(&path).map_err(io_error("read", &path))?;
        let mut conf = parse_object(&path, &text)?;
        let (target, converted) = if conf.contains_key("plugins") {
            (path.clone(), false)
        } else {
            conf = as_list(conf);
            (path.with_extension("conflist"), true)
        };

        let plugins = plugins_mut(&path, &mut conf)?;
        let entry = self.entry();
        let existing = plugins
            .iter()
            .position(|plugin| plugin["type"] == PLUGIN_TYPE);
        match existing {
            Some(index) if plugins[index] == entry && index + 1 == plugins.len() && !converted => {
                return Ok(Ensured::Unchanged(path));
            }
            Some(index) => {
                plugins.remove(index);
                plugins.push(entry);
            }
            None => plugins.push(entry),
        }

        write_atomically(&target, &to_pretty(&conf), file_mode(&path))?;
        if converted {
            fs::remove_file(&path).map_err(io_error("remove", &path))?;
        }
        Ok(Ensured::Written(target))
    }
}

/// Removes the plugin's entry from every configuration list in `conf_dir`, and the binary
/// from `bin_dir`. Returns the files changed.
pub fn remove(conf_dir: &Path, bin_dir: Option<&Path>) -> Result<Vec<PathBuf>, ChainError> {
    let mut changed = Vec::new();
    for path in config_files(conf_dir)? {
        let text = fs::read_to_string(&path).map_err(io_error("read", &path))?;
        let Ok(mut conf) = parse_object(&path, &text) else {
            continue;
        };
        let Some(Value::Array(plugins)) = conf.get_mut("plugins") else {
            continue;
        };
        let before = plugins.len();
        plugins.retain(|plugin| plugin["type"] != PLUGIN_TYPE);
        if plugins.len() != before {
            write_atomically(&path, &to_pretty(&conf), file_mode(&path))?;
            changed.push(path);
        }
    }
    if let Some(bin_dir) = bin_dir {
        let binary = bin_dir.join(PLUGIN_TYPE);
        match fs::remove_file(&binary) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_error("remove", &binary)(e)),
        }
    }
    Ok(changed)
}

/// Returns the configuration file the runtime uses, the first in lexical order.
pub fn primary_config(conf_dir: &Path) -> Result<PathBuf, ChainError> {
    config_files(conf_dir)?
        .into_iter()
        .next()
        .ok_or_else(|| ChainError::NoConfig(conf_dir.to_path_buf()))
}

fn config_files(conf_dir: &Path) -> Result<Vec<PathBuf>, ChainError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(conf_dir).map_err(io_error("list", conf_dir))? {
        let path = entry.map_err(io_error("list", conf_dir))?.path();
        let extension = path.extension().and_then(|e| e.to_str());
        if matches!(extension, Some("conflist" | "conf" | "json")) && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_object(path: &Path, text: &str) -> Result<Map<String, Value>, ChainError> {
    match serde_json::from_str(text) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(ChainError::Invalid {
            path: path.to_path_buf(),
            reason: "the top level is not a JSON object".into(),
        }),
        Err(e) => Err(ChainError::Invalid {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

fn plugins_mut<'a>(
    path: &Path,
    conf: &'a mut Map<String, Value>,
) -> Result<&'a mut Vec<Value>, ChainError> {
    match conf.get_mut("plugins") {
        Some(Value::Array(plugins)) if !plugins.is_empty() => Ok(plugins),
        _ => Err(ChainError::Invalid {
            path: path.to_path_buf(),
            reason: "\"plugins\" is not a list of plugins".into(),
        }),
    }
}

/// Wraps a single-plugin configuration in a list with that one plugin.
fn as_list(mut conf: Map<String, Value>) -> Map<String, Value> {
    let mut list = Map::new();
    for key in ["cniVersion", "name"] {
        if let Some(value) = conf.remove(key) {
            list.insert(key.to_string(), value);
        }
    }
    list.insert("plugins".into(), Value::Array(vec![Value::Object(conf)]));
    list
}

fn to_pretty(conf: &Map<String, Value>) -> Vec<u8> {
    let mut text = serde_json::to_vec_pretty(conf).expect("a JSON map serializes");
    text.push(b'\n');
    text
}

/// Returns the permission bits of the existing file at `path`, or 0644 for a new one.
fn file_mode(path: &Path) -> u32 {
    fs::metadata(path)
        .map(|metadata| metadata.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

fn install_binary(source: &Path, target: &Path) -> Result<(), ChainError> {
    let content = fs::read(source).map_err(io_error("read", source))?;
    if fs::read(target).is_ok_and(|existing| existing == content) {
        return Ok(());
    }
    write_atomically(target, &content, 0o755)
}

/// Writes through a temporary file in the same folder and a rename, so the runtime never
/// reads half a file.
fn write_atomically(path: &Path, content: &[u8], mode: u32) -> Result<(), ChainError> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temporary = path.with_file_name(format!(".{file_name}.tokenmesh-tmp"));
    let mut file = fs::File::create(&temporary).map_err(io_error("create", &temporary))?;
    file.write_all(content)
        .and_then(|()| file.set_permissions(fs::Permissions::from_mode(mode)))
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", &temporary))?;
    fs::rename(&temporary, path).map_err(io_error("replace", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

    fn chain(dir: &Path) -> Chain {
        let binary = dir.join("tokenmesh-cni-build");
        fs::write(&binary, b"plugin").unwrap();
        fs::create_dir_all(dir.join("net.d")).unwrap();
        fs::create_dir_all(dir.join("bin")).unwrap();
        Chain {
            conf_dir: dir.join("net.d"),
            bin_dir: Some(dir.join("bin")),
            plugin_binary: binary,
            socket: PathBuf::from("/var/run/tokenmesh/cni.sock"),
            timeout_seconds: 30,
        }
    }

    fn read_json(path: &Path) -> Value {
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn ensure_appends_entry_once() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let list = chain.conf_dir.join("10-bridge.conflist");
        fs::write(&list, BRIDGE).unwrap();
        fs::write(chain.conf_dir.join("20-other.conflist"), BRIDGE).unwrap();

        assert_eq!(chain.ensure().unwrap(), Ensured::Written(list.clone()));
        let conf = read_json(&list);
        let plugins = conf["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 3);
        assert_eq!(plugins[0]["type"], "bridge");
        assert_eq!(plugins[2]["type"], "tokenmesh-cni");
        assert_eq!(plugins[2]["agent_socket"], "/var/run/tokenmesh/cni.sock");
        assert_eq!(conf["name"], "pods");
        let other = read_json(&chain.conf_dir.join("20-other.conflist"));
        assert_eq!(other["plugins"].as_array().unwrap().len(), 2);

        assert_eq!(chain.ensure().unwrap(), Ensured::Unchanged(list.clone()));
        let binary = chain.bin_dir.as_ref().unwrap().join("tokenmesh-cni");
        assert_eq!(fs::read(&binary).unwrap(), b"plugin");
        let mode = fs::metadata(&binary).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o755);
    }

    #[test]
    fn ensure_moves_entry_last() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let list = chain.conf_dir.join("10-bridge.conflist");
        fs::write(&list, BRIDGE).unwrap();
        chain.ensure().unwrap();
        // A network plugin that rewrites its file may append its own plugins after ours.
        let mut conf = read_json(&list);
        conf["plugins"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "bandwidth"}));
        fs::write(&list, conf.to_string()).unwrap();

        assert_eq!(chain.ensure().unwrap(), Ensured::Written(list.clone()));
        let plugins = read_json(&list)["plugins"].as_array().unwrap().clone();
        let types: Vec<&str> = plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "portmap", "bandwidth", "tokenmesh-cni"]);
    }

    #[test]
    fn ensure_converts_single_conf() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let single = chain.conf_dir.join("10-flannel.conf");
        fs::write(
            &single,
            r#"{"cniVersion": "0.4.0", "name": "cbr0", "type": "flannel", "delegate": {"isDefaultGateway": true}}"#,
        )
        .unwrap();

        let list = chain.conf_dir.join("10-flannel.conflist");
        assert_eq!(chain.ensure().unwrap(), Ensured::Written(list.clone()));
        assert!(!single.exists());
        let conf = read_json(&list);
        assert_eq!(conf["cniVersion"], "0.4.0");
        assert_eq!(conf["name"], "cbr0");
        assert_eq!(conf["plugins"][0]["type"], "flannel");
        assert_eq!(conf["plugins"][0]["delegate"]["isDefaultGateway"], true);
        assert!(conf["plugins"][0].get("name").is_none());
        assert_eq!(conf["plugins"][1]["type"], "tokenmesh-cni");
    }

    #[test]
    fn ensure_without_config_names_folder() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let error = chain.ensure().unwrap_err();
        assert!(matches!(error, ChainError::NoConfig(_)), "{error}");
        assert!(error.to_string().contains("net.d"), "{error}");
    }

    #[test]
    fn ensure_rejects_broken_config() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let list = chain.conf_dir.join("10-bridge.conflist");
        fs::write(&list, "{\"plugins\": [").unwrap();
        let error = chain.ensure().unwrap_err();
        assert!(error.to_string().contains("10-bridge.conflist"), "{error}");
        assert_eq!(fs::read_to_string(&list).unwrap(), "{\"plugins\": [");
    }

    #[test]
    fn remove_restores_list() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain(dir.path());
        let list = chain.conf_dir.join("10-bridge.conflist");
        fs::write(&list, BRIDGE).unwrap();
        chain.ensure().unwrap();

        fs::set_permissions(&list, fs::Permissions::from_mode(0o600)).unwrap();

        let changed = remove(&chain.conf_dir, chain.bin_dir.as_deref()).unwrap();
        let mode = fs::metadata(&list).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(changed, vec![list.clone()]);
        assert_eq!(
            read_json(&list),
            serde_json::from_str::<Value>(BRIDGE).unwrap()
        );
        assert!(!chain.bin_dir.unwrap().join("tokenmesh-cni").exists());
        assert!(remove(&chain.conf_dir, None).unwrap().is_empty());
    }
}
