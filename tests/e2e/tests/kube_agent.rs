//! The agent binary with Kubernetes discovery. No API server runs here, so `kube_replay`
//! serves the node's pod list on 127.0.0.1 and the agent finds it through KUBECONFIG.
//! The agent finds the pod's kubelet-style cgroup and its network namespace from a real
//! process, and protects the pod. A probe from the node's address to the pod's probe
//! port passes without a token, and the same request from another pod is rejected.
//! Needs root.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use tokenmesh_agent::workloads::cgroups::{CgroupDriver, QosClass, pod_cgroup_path};
use tokenmesh_e2e::{
    kube_replay::{ReplayServer, node_routes},
    kubepods::{KubepodsRoot, PodNetwork},
    process::{ChildGuard, audit_records, free_port, wait_for_tcp},
    scenario::{Binaries, http_get_status, wait_until},
    topology::{Topology, require_root},
};

const UID: &str = "9d2e4f60-3a1b-4c5d-8e7f-0123456789ab";

fn pod_list(pod_ip: Ipv4Addr, host_ip: Ipv4Addr) -> String {
    serde_json::json!({
        "kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "700"},
        "items": [{
            "metadata": {
                "name": "echo-0", "namespace": "shop", "uid": UID, "resourceVersion": "690",
                "labels": {"app": "echo"},
                "annotations": {"tokenmesh.io/enabled": "true", "tokenmesh.io/protected-ports": "8080"}
            },
            "spec": {
                "nodeName": "node-1", "serviceAccountName": "echo",
                "containers": [{
                    "name": "echo", "image": "echo:1",
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}}
                }]
            },
            "status": {
                "phase": "Running", "qosClass": "Burstable",
                "podIP": pod_ip.to_string(), "podIPs": [{"ip": pod_ip.to_string()}],
                "hostIP": host_ip.to_string(), "hostIPs": [{"ip": host_ip.to_string()}]
            }
        }]
    })
    .to_string()
}

/// Runs curl in network namespace `netns` and returns the HTTP status (0 when no response).
fn curl_status(netns: &str, url: &str) -> Result<u16> {
    let output = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
        ])
        .args(["-w", "%{http_code}", url])
        .output()
        .context("failed to run curl")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exempt_other_pods_need_token() -> Result<()> {
    require_root()?;
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))?;
    let topology = Topology::create("kubeagent", &["echo", "client"])?;
    let dir = tempfile::tempdir()?;

    // The node's address on the pods' bridge, inside the topology's own node namespace:
    // the kubelet's probes come from it.
    let subnet = topology.subnet();
    let node_ip = Ipv4Addr::from(u32::from(subnet.network()) + 254);
    let status = Command::new("ip")
        .args(["-n", topology.node_netns(), "addr", "add"])
        .arg(format!("{node_ip}/{}", subnet.prefix_len()))
        .args(["dev", "br0"])
        .status()?;
    anyhow::ensure!(status.success(), "failed to give the bridge {node_ip}");

    let echo_pod = topology.pod("echo").clone();
    let mut echo_command = echo_pod.command(binaries.echo.to_str().context("echo path")?);
    echo_command.args(["--listen", "0.0.0.0:8080"]);
    let echo = ChildGuard::spawn(echo_command, "echo", dir.path())?;
    wait_for_tcp(
        Some(&echo_pod.netns_path),
        SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)),
        Duration::from_secs(10),
    )?;

    // The kubelet's cgroup for the pod, with a process in the pod's network namespace.
    let mut kubepods = KubepodsRoot::create("kubeagent")?;
    let layout = pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Burstable, UID);
    kubepods.add_pod(&layout, "sandbox", PodNetwork::Join(echo.id()))?;

    let server = ReplayServer::start(node_routes(pod_list(echo_pod.ip, node_ip))).await?;
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
steering:
  pods_cgroup: {root}
  intercept_ports: [8080]
  bpffs_dir: {bpffs}
  on_exit: detach
admin:
  listen: {admin}
audit:
  path: {audit}
plugins:
  - id: echo-validator
    type: token-validator
    workloads:
      namespace: shop
    parameters:
      introspection_url: http://127.0.0.1:9/introspect
      introspection_client_id: echo-validator
      introspection_client_secret: ${{ECHO_VALIDATOR_SECRET}}
"#,
            root = kubepods.relative()?.display(),
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
        .env("ECHO_VALIDATOR_SECRET", "validator-secret")
        .env("RUST_LOG", "info,tokenmesh_agent=debug");
    let mut agent = ChildGuard::spawn(agent_command, "agent", dir.path())?;
    let ready = wait_until(Duration::from_secs(20), "agent /readyz", || {
        agent.ensure_running().is_ok() && http_get_status(admin, "/readyz").is_ok_and(|s| s == 200)
    });
    ready.with_context(|| format!("agent log:\n{}", agent.output_report()))?;
    let pod_list_requests = server
        .requests()
        .iter()
        .filter(|r| {
            r.starts_with("/api/v1/pods?") && r.contains("fieldSelector=spec.nodeName%3Dnode-1")
        })
        .count();
    assert!(pod_list_requests >= 1, "{:#?}", server.requests());

    // The kubelet's probe: from the node's address, to the probe port, without a token.
    let url = format!("http://{}:8080/ready", echo_pod.ip);
    let probe = curl_status(topology.node_netns(), &url)?;
    assert_eq!(probe, 200, "agent log:\n{}", agent.output_report());

    // The same request from another pod needs a token.
    let other = curl_status(&topology.pod("client").netns_name, &url)?;
    assert_eq!(other, 401, "agent log:\n{}", agent.output_report());

    let records = audit_records(&audit);
    let exempt: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["reason"] == "probe_exempt")
        .collect();
    assert_eq!(exempt.len(), 1, "{records:#?}");
    assert_eq!(exempt[0]["decision"], "allow");
    assert_eq!(exempt[0]["direction"], "inbound");
    assert_eq!(exempt[0]["destination_pod"], "shop/echo-0");
    assert_eq!(exempt[0]["source_ip"], node_ip.to_string());
    let denied: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["reason"] == "missing_token")
        .collect();
    assert_eq!(denied.len(), 1, "{records:#?}");
    assert_eq!(denied[0]["status"], 401);
    assert_eq!(
        denied[0]["source_ip"],
        topology.pod("client").ip.to_string()
    );

    let exit = agent.terminate(Duration::from_secs(10))?;
    assert!(
        exit.success(),
        "agent exit {exit:?}:\n{}",
        agent.output_report()
    );
    assert!(
        !topology.bpf_pin_dir().exists(),
        "on_exit: detach left pins in {}:\n{}",
        topology.bpf_pin_dir().display(),
        agent.output_report()
    );
    Ok(())
}
