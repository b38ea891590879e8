//! The `tokenmesh-cni` plugin and the agent binary, for pods that start after the agent.
//!
//! No container runtime or API server runs here. The test plays the runtime: it makes
//! the pod's network namespace (a topology pod) and its kubelet-style cgroup. Then it runs
//! the plugin the agent installed, with the `CNI_*` variables and the network
//! configuration on stdin, and starts the pod's first process only after ADD succeeded. `kube_replay`
//! serves the pod list, with the new pods still `Pending`. Needs root.

use std::{
    io::Write,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use serde_json::{Value, json};
use tokenmesh_agent::workloads::cgroups::{CgroupDriver, QosClass, pod_cgroup_path};
use tokenmesh_e2e::{
    kube_replay::{ReplayServer, node_routes},
    kubepods::KubepodsRoot,
    process::{ChildGuard, audit_records, free_port, wait_for_tcp},
    scenario::{Binaries, http_get_status, wait_until},
    topology::{Pod, Topology, require_root},
};

const WEB_UID: &str = "5f1c3a2e-7b4d-4e6f-9a8b-0c1d2e3f4a5b";
const BATCH_UID: &str = "6a2d4b3f-8c5e-4f70-8b9c-1d2e3f4a5b6c";
const GHOST_UID: &str = "7b3e5c40-9d6f-4081-9cad-2e3f4a5b6c7d";

/// Builds a pod of the node as the API returns it between scheduling and sandbox
/// creation: `Pending`, with no address yet.
fn pending_pod(name: &str, uid: &str, enabled: &str, node_ip: Ipv4Addr) -> Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": uid, "resourceVersion": "690",
            "annotations": {"tokenmesh.io/enabled": enabled}
        },
        "spec": {
            "nodeName": "node-1", "serviceAccountName": name,
            "containers": [{"name": "app", "image": "app:1"}]
        },
        "status": {
            "phase": "Pending", "qosClass": "Burstable",
            "hostIP": node_ip.to_string(), "hostIPs": [{"ip": node_ip.to_string()}]
        }
    })
}

fn pod_list(node_ip: Ipv4Addr) -> String {
    json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "700"},
        "items": [
            pending_pod("web-0", WEB_UID, "true", node_ip),
            pending_pod("batch-0", BATCH_UID, "false", node_ip),
        ]
    })
    .to_string()
}

/// The node's CNI configuration before the agent adds its plugin.
const BRIDGE_CONFLIST: &str = r#"{
  "cniVersion": "1.0.0",
  "name": "pods",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}"#;

/// What a CNI plugin run printed and how it exited.
struct CniRun {
    success: bool,
    stdout: Value,
}

/// Runs `plugin` as the runtime runs the last plugin of a list: the list's `cniVersion`
/// and `name` with the plugin's own entry, and the result of the plugins before it.
fn run_cni(
    plugin: &Path,
    command: &str,
    entry: &Value,
    pod: &Pod,
    name: &str,
    uid: &str,
) -> Result<CniRun> {
    let mut conf = entry.clone();
    conf["cniVersion"] = json!("1.0.0");
    conf["name"] = json!("pods");
    conf["prevResult"] = json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
        "ips": [{"address": format!("{}/24", pod.ip), "interface": 0}]
    });
    let mut child = Command::new(plugin)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", plugin.parent().context("plugin folder")?)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox-{name};K8S_POD_UID={uid}"
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to run {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let output = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let stdout = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| format!("plugin printed {text:?}"))?
    };
    Ok(CniRun {
        success: output.status.success(),
        stdout,
    })
}

fn outbound_records_from(path: &Path, ip: Ipv4Addr) -> Vec<Value> {
    audit_records(path)
        .into_iter()
        .filter(|r| r["direction"] == "outbound" && r["source_ip"] == ip.to_string())
        .collect()
}

/// Runs curl in `pod`'s network namespace from the container cgroup `cgroup`, as the
/// pod's first process, and returns the HTTP status (0 when no response).
fn curl_from(pod: &Pod, cgroup: &Path, url: &str) -> Result<u16> {
    let mut container = pod.clone();
    container.cgroup = cgroup.to_path_buf();
    let output = container
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            url,
        ])
        .output()
        .context("failed to run curl")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

/// Returns the plugin's entry in the first configuration file of `conf_dir`, if present.
fn installed_entry(conf_dir: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(conf_dir.join("10-bridge.conflist")).ok()?;
    let conf: Value = serde_json::from_str(&text).ok()?;
    conf["plugins"]
        .as_array()?
        .iter()
        .find(|plugin| plugin["type"] == "tokenmesh-cni")
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_pod_held_until_steered() -> Result<()> {
    require_root()?;
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))?;
    let topology = Topology::create("cni", &["web", "batch", "ghost", "echo"])?;
    let dir = tempfile::tempdir()?;
    let node_ip = Ipv4Addr::from(u32::from(topology.subnet().network()) + 254);

    // The server the new pods call: a pod the agent does not steer.
    let echo_pod = topology.pod("echo").clone();
    let mut echo_command = echo_pod.command(binaries.echo.to_str().context("echo path")?);
    echo_command.args(["--listen", "0.0.0.0:8080"]);
    let _echo = ChildGuard::spawn(echo_command, "echo", dir.path())?;
    wait_for_tcp(
        Some(&echo_pod.netns_path),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
        Duration::from_secs(10),
    )?;
    let echo_url = format!("http://{}:8080/", echo_pod.ip);

    // The kubelet creates a pod's cgroup before it requests the sandbox from the runtime.
    let kubepods = KubepodsRoot::create("cni")?;
    let container_cgroup = |uid: &str| -> Result<PathBuf> {
        let layout = pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Burstable, uid);
        let cgroup = kubepods.path().join(layout).join("app");
        std::fs::create_dir_all(&cgroup)?;
        Ok(cgroup)
    };
    let web_cgroup = container_cgroup(WEB_UID)?;
    let batch_cgroup = container_cgroup(BATCH_UID)?;

    let conf_dir = dir.path().join("net.d");
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::write(conf_dir.join("10-bridge.conflist"), BRIDGE_CONFLIST)?;
    let socket = dir.path().join("run/cni.sock");

    // Without an agent, the plugin fails the sandbox with the CNI code for a retry.
    // The test's entry matches the one the agent writes into the node's configuration.
    let entry = json!({"type": "tokenmesh-cni", "agent_socket": socket, "timeout_seconds": 3});
    let web = topology.pod("web");
    let without_agent = run_cni(&binaries.cni, "ADD", &entry, web, "web-0", WEB_UID)?;
    assert!(!without_agent.success, "{}", without_agent.stdout);
    assert_eq!(without_agent.stdout["code"], 11, "{}", without_agent.stdout);
    let message = without_agent.stdout["msg"].as_str().unwrap_or_default();
    assert!(
        message.contains(socket.to_str().context("socket path")?),
        "{message}"
    );

    let server = ReplayServer::start(node_routes(pod_list(node_ip))).await?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig())?;
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()?));
    let audit = dir.path().join("audit.jsonl");
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            r#"workloads:
  kubernetes:
    node_name: ${{NODE_NAME}}
    kubepods_root: {root}
    resolve_retry: 200ms
    cni:
      socket: {socket}
      conf_dir: {conf_dir}
      bin_dir: {bin_dir}
      plugin_binary: {plugin}
      timeout: 3s
steering:
  pods_cgroup: {root}
  intercept_ports: [8080]
  bpffs_dir: {bpffs}
  on_exit: detach
admin:
  listen: {admin}
audit:
  path: {audit}
"#,
            root = kubepods.relative()?.display(),
            socket = socket.display(),
            conf_dir = conf_dir.display(),
            bin_dir = bin_dir.display(),
            plugin = binaries.cni.display(),
            bpffs = topology.bpf_pin_dir().display(),
            audit = audit.display(),
        ),
    )?;
    let mut agent_command = Command::new(&binaries.agent);
    agent_command
        .args(["run", "--config"])
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env("NODE_NAME", "node-1")
        .env("RUST_LOG", "info,tokenmesh_agent=debug");
    let mut agent = ChildGuard::spawn(agent_command, "agent", dir.path())?;

    // The kubelet retries a failed sandbox after a backoff, so the pod's next ADD may
    // come while the agent is still starting: before it listens, or before it has listed
    // the node's pods. Each attempt either fails or returns once the pod is steered.
    let started = Instant::now();
    let added = loop {
        let attempt = run_cni(&binaries.cni, "ADD", &entry, web, "web-0", WEB_UID)?;
        if attempt.success {
            break attempt;
        }
        assert_eq!(attempt.stdout["code"], 11, "{}", attempt.stdout);
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "ADD kept failing: {}\nagent log:\n{}",
            attempt.stdout,
            agent.output_report()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(added.stdout["cniVersion"], "1.0.0");
    assert_eq!(added.stdout["ips"][0]["address"], format!("{}/24", web.ip));
    assert_eq!(curl_from(web, &web_cgroup, &echo_url)?, 200);
    let steered = outbound_records_from(&audit, web.ip);
    assert_eq!(steered.len(), 1, "{steered:#?}");
    assert_eq!(steered[0]["source_pod"], "shop/web-0");
    assert_eq!(steered[0]["reason"], "no_token_creator");

    let ready = wait_until(Duration::from_secs(20), "agent /readyz", || {
        agent.ensure_running().is_ok() && http_get_status(admin, "/readyz").is_ok_and(|s| s == 200)
    });
    ready.with_context(|| format!("agent log:\n{}", agent.output_report()))?;

    // The agent copies the plugin into the node's plugin folder and chains it last.
    let installed = wait_until(Duration::from_secs(10), "plugin in the conflist", || {
        installed_entry(&conf_dir).is_some()
    });
    installed.with_context(|| format!("agent log:\n{}", agent.output_report()))?;
    let entry = installed_entry(&conf_dir).context("plugin entry")?;
    assert_eq!(
        entry["agent_socket"],
        socket.to_str().context("socket path")?
    );
    assert_eq!(entry["timeout_seconds"], 3);
    let plugin = bin_dir.join("tokenmesh-cni");
    assert_eq!(std::fs::read(&plugin)?, std::fs::read(&binaries.cni)?);

    // A network plugin that rewrites its file on restart drops the entry; the agent
    // adds it again.
    std::fs::write(conf_dir.join("10-bridge.conflist"), BRIDGE_CONFLIST)?;
    let restored = wait_until(Duration::from_secs(15), "plugin added again", || {
        installed_entry(&conf_dir).is_some()
    });
    restored.with_context(|| format!("agent log:\n{}", agent.output_report()))?;

    // CHECK of a steered pod succeeds and restarts nothing.
    let checked = run_cni(&plugin, "CHECK", &entry, web, "web-0", WEB_UID)?;
    assert!(checked.success, "{}", checked.stdout);
    assert!(
        !agent.stderr().contains("pods.replaced=1"),
        "{}",
        agent.output_report()
    );

    // A pod that opted out starts at once and is left alone.
    let batch = topology.pod("batch");
    let skipped = run_cni(&plugin, "ADD", &entry, batch, "batch-0", BATCH_UID)?;
    assert!(skipped.success, "{}", skipped.stdout);
    assert_eq!(curl_from(batch, &batch_cgroup, &echo_url)?, 200);
    assert!(outbound_records_from(&audit, batch.ip).is_empty());

    // A pod missing from the API waits until the timeout, then fails for a retry.
    let ghost = topology.pod("ghost");
    let unknown = run_cni(&plugin, "ADD", &entry, ghost, "ghost-0", GHOST_UID)?;
    assert!(!unknown.success, "{}", unknown.stdout);
    assert_eq!(unknown.stdout["code"], 100, "{}", unknown.stdout);
    let message = unknown.stdout["msg"].as_str().unwrap_or_default();
    assert!(
        message.contains("pod shop/ghost-0 cannot start: the agent did not see the pod"),
        "{message}"
    );

    // DEL removes the sandbox; the pod, still Pending in the API, is no longer steered.
    let deleted = run_cni(&plugin, "DEL", &entry, web, "web-0", WEB_UID)?;
    assert!(deleted.success, "{}", deleted.stdout);
    let removed = wait_until(Duration::from_secs(10), "web-0 removed", || {
        agent.stderr().contains("pod removed")
    });
    removed.with_context(|| format!("agent log:\n{}", agent.output_report()))?;
    assert_eq!(curl_from(web, &web_cgroup, &echo_url)?, 200);
    assert_eq!(outbound_records_from(&audit, web.ip).len(), 1);

    // An agent that detaches on exit also takes the plugin out of the node's
    // configuration, so pods no longer wait for an agent that is gone.
    let exit = agent.terminate(Duration::from_secs(10))?;
    assert!(
        exit.success(),
        "agent exit {exit:?}:\n{}",
        agent.output_report()
    );
    let restored: Value = serde_json::from_str(&std::fs::read_to_string(
        conf_dir.join("10-bridge.conflist"),
    )?)?;
    assert_eq!(restored, serde_json::from_str::<Value>(BRIDGE_CONFLIST)?);
    assert!(!plugin.exists());
    assert!(!socket.exists());
    Ok(())
}

#[test]
fn uninstall_removes_cni_plugin() -> Result<()> {
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))?;
    let dir = tempfile::tempdir()?;
    let conf_dir = dir.path().join("net.d");
    let bin_dir = dir.path().join("bin");
    std::fs::create_dir_all(&conf_dir)?;
    std::fs::create_dir_all(&bin_dir)?;
    let list = conf_dir.join("10-bridge.conflist");
    let mut chained: Value = serde_json::from_str(BRIDGE_CONFLIST)?;
    chained["plugins"]
        .as_array_mut()
        .context("plugins")?
        .push(json!({"type": "tokenmesh-cni", "agent_socket": "/var/run/tokenmesh/cni.sock"}));
    std::fs::write(&list, chained.to_string())?;
    std::fs::write(bin_dir.join("tokenmesh-cni"), b"plugin")?;

    // Only the folders are read: the policy's secrets do not exist here.
    let config = dir.path().join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:\n  kubernetes:\n    node_name: ${{NODE_NAME}}\n    cni:\n      conf_dir: {}\n      bin_dir: {}\nsteering:\n  bpffs_dir: {}\nplugins:\n  - id: x\n    type: token-creator\n    parameters:\n      client_secret: ${{MISSING_SECRET}}\n",
            conf_dir.display(),
            bin_dir.display(),
            dir.path().join("pins").display(),
        ),
    )?;
    let output = Command::new(&binaries.agent)
        .args(["uninstall", "--config"])
        .arg(&config)
        .env_remove("NODE_NAME")
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("removed tokenmesh-cni from"), "{stdout}");
    assert!(stdout.contains("nothing to remove"), "{stdout}");
    let restored: Value = serde_json::from_str(&std::fs::read_to_string(&list)?)?;
    assert_eq!(restored, serde_json::from_str::<Value>(BRIDGE_CONFLIST)?);
    assert!(!bin_dir.join("tokenmesh-cni").exists());
    Ok(())
}
