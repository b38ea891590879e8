//! The Kubernetes manifests in `deploy/`: rendered with `kubectl kustomize`, validated
//! against the Kubernetes schemas with `kubernetes-validate`, scanned with Checkov, and
//! checked setting by setting against the security rules that docs/kubernetes.md states.
//! The ConfigMap's policy must pass the agent's own `check-config`.
//! `cargo xtask setup` installs the three tools. Needs root for the network namespace that
//! keeps Checkov offline.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde::Deserialize;
use serde_yaml::Value;
use tokenmesh_e2e::scenario::Binaries;

/// Kubernetes version whose schemas the manifests must satisfy.
const SCHEMA_VERSION: &str = "1.33.0";

/// The capabilities the agent adds, each explained in docs/kubernetes.md.
const CAPABILITIES: [&str; 4] = ["BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"];

/// Checkov checks the DaemonSet skips on purpose, each with its reason in an annotation.
const SKIPPED_CHECKS: [&str; 10] = [
    "CKV_K8S_15",
    "CKV_K8S_17",
    "CKV_K8S_19",
    "CKV_K8S_23",
    "CKV_K8S_25",
    "CKV_K8S_38",
    "CKV_K8S_39",
    "CKV_K8S_40",
    "CKV_K8S_43",
    "CKV2_K8S_6",
];

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn tool(program: &str) -> Command {
    Command::new(program)
}

fn run(mut command: Command, what: &str) -> Result<(bool, String)> {
    let output = command.output().with_context(|| {
        format!("failed to run {what} ({command:?}); install it with `cargo xtask setup`")
    })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((output.status.success(), text))
}

/// Renders a kustomization and returns the YAML text.
fn render(kustomization: &str) -> Result<String> {
    let mut command = tool("kubectl");
    command
        .arg("kustomize")
        .arg(deploy_dir().join(kustomization));
    let output = command
        .output()
        .context("failed to run kubectl; install it with `cargo xtask setup`")?;
    ensure!(
        output.status.success(),
        "kubectl kustomize {kustomization} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

fn documents(text: &str) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        documents.push(Value::deserialize(document)?);
    }
    Ok(documents)
}

fn find<'a>(documents: &'a [Value], kind: &str) -> Result<&'a Value> {
    documents
        .iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .with_context(|| format!("no {kind} in the rendered manifests"))
}

fn strings(value: &Value) -> BTreeSet<String> {
    value
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

fn write_rendered(kustomization: &str, dir: &Path) -> Result<PathBuf> {
    let path = dir.join(format!("{}.yaml", kustomization.replace('/', "-")));
    std::fs::write(&path, render(kustomization)?)?;
    Ok(path)
}

#[test]
fn manifests_match_kubernetes_schemas() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for kustomization in ["base", "overlays/example"] {
        let path = write_rendered(kustomization, dir.path())?;
        let mut command = tool("kubernetes-validate");
        command
            .args(["--strict", "--quiet", "-k", SCHEMA_VERSION])
            .arg(&path);
        let (ok, output) = run(command, "kubernetes-validate")?;
        assert!(
            ok,
            "{kustomization} does not match the {SCHEMA_VERSION} schemas:\n{output}"
        );
    }
    Ok(())
}

#[test]
fn schema_check_rejects_unknown_field() -> Result<()> {
    // A control: the validator must reject a misspelt field, or the test above proves nothing.
    let dir = tempfile::tempdir()?;
    let text = render("base")?.replace("hostPID: true", "hostPID: true\n      hostPIDs: true");
    let path = dir.path().join("broken.yaml");
    std::fs::write(&path, text)?;
    let mut command = tool("kubernetes-validate");
    command
        .args(["--strict", "--quiet", "-k", SCHEMA_VERSION])
        .arg(&path);
    let (ok, output) = run(command, "kubernetes-validate")?;
    assert!(!ok, "a misspelt field passed validation:\n{output}");
    assert!(output.contains("hostPIDs"), "{output}");
    Ok(())
}

#[test]
fn checkov_finds_no_failures() -> Result<()> {
    tokenmesh_e2e::topology::require_root()?;
    let dir = tempfile::tempdir()?;
    for kustomization in ["base", "overlays/example"] {
        let path = write_rendered(kustomization, dir.path())?;
        // Checkov fetches guidelines from its vendor's servers without --skip-download, so
        // it runs in an empty network namespace, where nothing can leave this machine.
        let mut command = tool("unshare");
        command
            .args([
                "--net",
                "--",
                "checkov",
                "--skip-download",
                "--framework",
                "kubernetes",
            ])
            .args(["--output", "json", "--file"])
            .arg(&path);
        let (_, output) = run(command, "checkov")?;
        let report: serde_json::Value = serde_json::from_str(&output)
            .with_context(|| format!("checkov printed no JSON report:\n{output}"))?;
        let summary = &report["summary"];
        assert_eq!(
            summary["failed"], 0,
            "{kustomization}: checkov failures:\n{:#}",
            report["results"]["failed_checks"]
        );
        assert!(
            summary["passed"].as_u64().unwrap_or(0) > 50,
            "{kustomization}: {summary}"
        );
        let skipped: BTreeSet<String> = report["results"]["skipped_checks"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|check| check["check_id"].as_str().map(str::to_string))
            .collect();
        let expected: BTreeSet<String> = SKIPPED_CHECKS.iter().map(|s| s.to_string()).collect();
        assert_eq!(skipped, expected, "{kustomization}: skipped checks changed");
    }
    Ok(())
}

#[test]
fn daemonset_security_settings() -> Result<()> {
    for kustomization in ["base", "overlays/example"] {
        let documents = documents(&render(kustomization)?)?;
        let daemonset = find(&documents, "DaemonSet")?;
        let pod = &daemonset["spec"]["template"]["spec"];
        let containers = pod["containers"].as_sequence().context("no containers")?;
        assert_eq!(containers.len(), 1, "{kustomization}");
        let agent = &containers[0];
        let security = &agent["securityContext"];

        assert_eq!(
            security["privileged"],
            Value::Bool(false),
            "{kustomization}"
        );
        assert_eq!(
            security["allowPrivilegeEscalation"],
            Value::Bool(false),
            "{kustomization}"
        );
        assert_eq!(
            security["readOnlyRootFilesystem"],
            Value::Bool(true),
            "{kustomization}"
        );
        assert_eq!(
            security["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault")
        );
        assert_eq!(
            strings(&security["capabilities"]["drop"]),
            BTreeSet::from(["ALL".to_string()])
        );
        assert_eq!(
            strings(&security["capabilities"]["add"]),
            CAPABILITIES.iter().map(|c| c.to_string()).collect(),
            "{kustomization}: added capabilities"
        );
        assert_eq!(
            security["appArmorProfile"]["type"].as_str(),
            Some("Unconfined"),
            "{kustomization}: bpffs writes need it"
        );
        assert_eq!(
            pod["nodeSelector"]["kubernetes.io/arch"].as_str(),
            Some("amd64"),
            "{kustomization}: the image is x86_64 only"
        );
        assert_eq!(pod["hostNetwork"], Value::Bool(true));
        assert_eq!(pod["hostPID"], Value::Bool(true));
        assert!(
            pod["hostIPC"].is_null(),
            "{kustomization}: hostIPC is not needed"
        );

        let resources = &agent["resources"];
        for key in ["cpu", "memory"] {
            assert!(
                resources["requests"][key].is_string(),
                "{kustomization}: requests.{key}"
            );
            assert!(
                resources["limits"][key].is_string(),
                "{kustomization}: limits.{key}"
            );
        }

        for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
            let get = &agent[probe]["httpGet"];
            assert_eq!(
                get["host"].as_str(),
                Some("127.0.0.1"),
                "{kustomization}: {probe}"
            );
            assert_eq!(
                get["port"].as_u64(),
                Some(15021),
                "{kustomization}: {probe}"
            );
            assert_eq!(get["path"].as_str(), Some(path), "{kustomization}: {probe}");
        }

        let host_paths: BTreeSet<String> = pod["volumes"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v["hostPath"]["path"].as_str().map(str::to_string))
            .collect();
        let expected_paths = [
            "/sys/fs/bpf",
            "/sys/fs/cgroup",
            "/var/run/tokenmesh",
            "/var/run/netns",
            "/etc/cni/net.d",
            "/opt/cni/bin",
        ];
        assert_eq!(
            host_paths,
            expected_paths.iter().map(|p| p.to_string()).collect(),
            "{kustomization}: hostPath volumes"
        );
        // The agent writes pins, its socket for the CNI plugin, and the plugin with its
        // configuration entry; every other mount is read-only.
        let writable = ["bpffs", "cni-socket", "cni-conf", "cni-bin"];
        for mount in agent["volumeMounts"].as_sequence().into_iter().flatten() {
            let name = mount["name"].as_str().unwrap_or_default();
            if !writable.contains(&name) {
                assert_eq!(
                    mount["readOnly"],
                    Value::Bool(true),
                    "{kustomization}: mount {name}"
                );
            }
        }

        let node_name = agent["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some("NODE_NAME"))
            .context("no NODE_NAME variable")?;
        assert_eq!(
            node_name["valueFrom"]["fieldRef"]["fieldPath"].as_str(),
            Some("spec.nodeName")
        );

        let strategy = &daemonset["spec"]["updateStrategy"];
        assert_eq!(strategy["type"].as_str(), Some("RollingUpdate"));
        assert_eq!(
            strategy["rollingUpdate"]["maxUnavailable"].as_u64(),
            Some(1)
        );
    }
    Ok(())
}

#[test]
fn cluster_role_reads_pods_only() -> Result<()> {
    let documents = documents(&render("overlays/example")?)?;
    let role = find(&documents, "ClusterRole")?;
    let rules = role["rules"].as_sequence().context("no rules")?;
    assert_eq!(rules.len(), 1, "{rules:?}");
    assert_eq!(
        strings(&rules[0]["apiGroups"]),
        BTreeSet::from([String::new()])
    );
    assert_eq!(
        strings(&rules[0]["resources"]),
        BTreeSet::from(["namespaces".to_string(), "pods".to_string()])
    );
    assert_eq!(
        strings(&rules[0]["verbs"]),
        BTreeSet::from(["get".to_string(), "list".to_string(), "watch".to_string()])
    );
    let roles = documents
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
        .count();
    assert_eq!(roles, 1, "one role only");
    Ok(())
}

#[test]
fn overlay_mounts_credentials_secret() -> Result<()> {
    let documents = documents(&render("overlays/example")?)?;
    let daemonset = find(&documents, "DaemonSet")?;
    let pod = &daemonset["spec"]["template"]["spec"];
    let secret = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .find(|v| !v["secret"].is_null())
        .context("no Secret volume")?;
    assert_eq!(
        secret["secret"]["secretName"].as_str(),
        Some("tokenmesh-client-credentials")
    );
    let image = daemonset["spec"]["template"]["spec"]["containers"][0]["image"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(image, "registry.example.com/platform/tokenmesh-agent:0.1.0");
    // No Secret object is rendered: credentials never sit in the repository.
    if documents
        .iter()
        .any(|d| d["kind"].as_str() == Some("Secret"))
    {
        bail!("the overlay renders a Secret object");
    }
    Ok(())
}

#[test]
fn configmap_policy_passes_check_config() -> Result<()> {
    let binaries = Binaries::locate(PathBuf::from(env!("CARGO_BIN_EXE_echo")))?;
    let dir = tempfile::tempdir()?;
    let secrets = dir.path().join("secrets");
    std::fs::create_dir(&secrets)?;
    for kustomization in ["base", "overlays/example"] {
        let documents = documents(&render(kustomization)?)?;
        let config_map = find(&documents, "ConfigMap")?;
        let text = config_map["data"]["agent.yaml"]
            .as_str()
            .context("the ConfigMap has no agent.yaml")?;

        // The Secret's keys appear as files in the pod; here each gets a file in a folder of
        // the test, holding a placeholder value.
        const MOUNT: &str = "file:/etc/tokenmesh/secrets/";
        let keys: Vec<&str> = text
            .split(MOUNT)
            .skip(1)
            .filter_map(|rest| rest.split_whitespace().next())
            .collect();
        for key in &keys {
            std::fs::write(secrets.join(key), "placeholder-secret\n")?;
        }
        let local = text.replace(MOUNT, &format!("file:{}/", secrets.display()));
        let path = dir
            .path()
            .join(format!("{}.yaml", kustomization.replace('/', "-")));
        std::fs::write(&path, local)?;

        let output = Command::new(&binaries.agent)
            .arg("check-config")
            .arg(&path)
            .env("NODE_NAME", "node-1")
            .output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{kustomization}: check-config failed:\n{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains("pods from Kubernetes node node-1"),
            "{stdout}"
        );
        if kustomization == "overlays/example" {
            assert_eq!(
                keys,
                ["frontend-client-secret", "echo-introspection-secret"]
            );
        }
    }
    Ok(())
}
