//! The node scenario shared by the end-to-end suite and `cargo xtask demo`: four pods on
//! one node, the real identity provider on loopback, echo apps, and the agent.
//!
//! - `frontend` (service account `frontend`) calls `echo` with client `frontend`.
//! - `intruder` has its own client, `intruder`, which `echo` does not allow.
//! - `stranger` shares the `frontend` service account, so it gets a valid `frontend`
//!   token, but its address is outside the networks `echo` accepts.
//! - `echo` runs the echo app on port 8080 (intercepted and protected) and on port 9090
//!   (neither).

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    idp::{Idp, IdpClient, IdpConfig, IdpStats},
    process::ChildGuard,
    topology::{Pod, Topology},
};

pub const PROTECTED_PORT: u16 = 8080;
pub const PLAIN_PORT: u16 = 9090;
pub const CLIENT_ID_HEADER: &str = "x-tokenmesh-client-id";
const PODS: [&str; 4] = ["frontend", "echo", "intruder", "stranger"];

/// Paths of the programs a scenario runs.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub agent: PathBuf,
    /// The `tokenmesh-cni` plugin, built beside the agent.
    pub cni: PathBuf,
    pub echo: PathBuf,
}

impl Binaries {
    /// Finds the agent through `TOKENMESH_AGENT_BIN` (set by `cargo xtask`), or else in the
    /// workspace's `target/debug`, the CNI plugin beside it, and the echo app at `echo`.
    pub fn locate(echo: PathBuf) -> anyhow::Result<Binaries> {
        let agent = match std::env::var_os("TOKENMESH_AGENT_BIN") {
            Some(path) => PathBuf::from(path),
            None => {
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/tokenmesh-agent")
            }
        };
        if !agent.exists() {
            bail!(
                "agent binary {} not found; run `cargo build -p tokenmesh-agent` or use `cargo xtask test`",
                agent.display()
            );
        }
        let cni = agent.with_file_name("tokenmesh-cni");
        if !cni.exists() {
            bail!(
                "CNI plugin binary {} not found; `cargo build -p tokenmesh-agent` builds it beside the agent",
                cni.display()
            );
        }
        Ok(Binaries { agent, cni, echo })
    }
}

/// The result of one `curl` run inside a pod.
#[derive(Debug, Clone)]
pub struct CurlOutcome {
    /// curl's exit code: 0 for a completed exchange, 7 for a refused connection.
    pub exit_code: i32,
    /// HTTP status, 0 when no response arrived.
    pub status: u16,
    pub headers: String,
    pub body: String,
}

impl CurlOutcome {
    /// Parses the echo app's JSON report of what reached it.
    pub fn echoed(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("response body is not the echo app's JSON: {:?}", self.body))
    }

    /// Values of a request header as the echo app saw it (names in lower case).
    pub fn echoed_header(&self, name: &str) -> anyhow::Result<Vec<String>> {
        let echoed = self.echoed()?;
        let values = echoed["headers"][name]
            .as_array()
            .map(|values| {
                values
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        Ok(values)
    }

    /// Returns a response header's value (first occurrence, name matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Changes to the standard scenario, for suites that test one part in depth.
#[derive(Debug, Clone, Default)]
pub struct ScenarioOptions {
    /// Identity provider config in place of the standard one. It must register the
    /// clients `frontend`, `intruder` and `echo-validator` (secret `validator-secret`).
    pub idp: Option<IdpConfig>,
    /// YAML lines that replace the `frontend-token` plugin's `client_secret` and `scopes`
    /// lines under `parameters:`, such as `client_auth_method: private_key_jwt`.
    pub frontend_parameters: Option<Vec<String>>,
    /// YAML lines of the agent's `proxy:` section, such as `token_refresh_skew: 2s`.
    pub proxy: Vec<String>,
    /// YAML lines that replace the `echo-validator` plugin's three `introspection_*` lines
    /// under `parameters:`, such as `token_format: jwt`. `{issuer}` in a line becomes the
    /// provider's issuer URL.
    pub echo_validator_parameters: Option<Vec<String>>,
    /// Files written into the scenario folder before the agent starts: relative path and
    /// content.
    pub files: Vec<(String, String)>,
}

/// A running scenario. Drop stops every process and removes every namespace, cgroup and
/// pin it made.
pub struct Scenario {
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub audit_path: PathBuf,
    pub admin: SocketAddr,
    pub bpffs_dir: PathBuf,
    binaries: Binaries,
    /// Cgroup the agent runs in; `None` keeps the test's own cgroup. A folder below the
    /// pods' parent cgroup puts the agent where a DaemonSet pod's agent is on a node.
    pub agent_cgroup: Option<PathBuf>,
    /// Starts the agent in a cgroup namespace of its own, rooted at `agent_cgroup`, as
    /// containerd's CRI plugin starts an unprivileged container on cgroup v2.
    pub agent_cgroup_namespace: bool,
    agent: Option<ChildGuard>,
    apps: Vec<ChildGuard>,
    // Fields drop in order: the identity provider and topology go last.
    pub idp: Idp,
    pub topology: Topology,
}

impl Scenario {
    /// Builds the topology, starts the identity provider and the echo apps, writes the
    /// agent's files, and starts the agent.
    pub fn start(prefix: &str, binaries: Binaries) -> anyhow::Result<Scenario> {
        Scenario::start_with(prefix, binaries, ScenarioOptions::default())
    }

    /// Starts the scenario with `options` applied.
    pub fn start_with(
        prefix: &str,
        binaries: Binaries,
        options: ScenarioOptions,
    ) -> anyhow::Result<Scenario> {
        let topology = Topology::create(prefix, &PODS)?;
        let idp_config = options.idp.clone().unwrap_or_else(|| {
            IdpConfig::new(vec![
                IdpClient::new("frontend", "frontend-secret", "admin"),
                IdpClient::new("intruder", "intruder-secret", "admin"),
                IdpClient::new("echo-validator", "validator-secret", ""),
            ])
        });
        let idp = Idp::start(&idp_config)?;
        let dir = tempfile::Builder::new()
            .prefix("tokenmesh-scenario-")
            .tempdir()?;
        let admin = free_loopback_addr()?;
        let bpffs_dir = topology.bpf_pin_dir().to_path_buf();
        let mut scenario = Scenario {
            config_path: dir.path().join("agent.yaml"),
            audit_path: dir.path().join("audit.jsonl"),
            dir,
            admin,
            bpffs_dir,
            binaries,
            agent_cgroup: None,
            agent_cgroup_namespace: false,
            agent: None,
            apps: Vec::new(),
            idp,
            topology,
        };
        scenario.write_files(&options)?;
        scenario.start_apps()?;
        scenario.start_agent()?;
        Ok(scenario)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.topology.pod(name)
    }

    /// URL of the echo app on `port` at the echo pod's address.
    pub fn echo_url(&self, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.pod("echo").ip)
    }

    fn write_files(&self, options: &ScenarioOptions) -> anyhow::Result<()> {
        let dir = self.dir.path();
        std::fs::create_dir_all(dir.join("secrets"))?;
        std::fs::write(dir.join("secrets/frontend"), "frontend-secret\n")?;
        std::fs::write(dir.join("secrets/intruder"), "intruder-secret\n")?;
        for (path, content) in &options.files {
            let path = dir.join(path);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(path, content)?;
        }
        let frontend_parameters = options
            .frontend_parameters
            .clone()
            .unwrap_or_else(|| {
                vec![
                    "client_secret: file:secrets/frontend".into(),
                    "scopes: [admin]".into(),
                ]
            })
            .iter()
            .map(|line| format!("      {line}\n"))
            .collect::<String>();
        let echo_validator_parameters = options
            .echo_validator_parameters
            .clone()
            .unwrap_or_else(|| {
                vec![
                    format!("introspection_url: {}", self.idp.introspection_endpoint()),
                    "introspection_client_id: echo-validator".into(),
                    "introspection_client_secret: ${ECHO_VALIDATOR_SECRET}".into(),
                ]
            })
            .iter()
            .map(|line| format!("      {}\n", line.replace("{issuer}", self.idp.base_url())))
            .collect::<String>();
        let proxy = if options.proxy.is_empty() {
            String::new()
        } else {
            let lines: String = options
                .proxy
                .iter()
                .map(|line| format!("  {line}\n"))
                .collect();
            format!("proxy:\n{lines}")
        };

        let mut workloads = String::from("pods:\n");
        for name in PODS {
            let pod = self.pod(name);
            let account = if name == "stranger" { "frontend" } else { name };
            let ports = if name == "echo" {
                format!("[{PROTECTED_PORT}]")
            } else {
                "[]".into()
            };
            workloads.push_str(&format!(
                "  - name: {name}\n    namespace: demo\n    service_account: {account}\n    \
                 ip: {ip}\n    netns: {netns}\n    cgroup: {cgroup}\n    protected_ports: {ports}\n",
                ip = pod.ip,
                netns = pod.netns_path.display(),
                cgroup = pod.cgroup.display(),
            ));
        }
        std::fs::write(dir.join("workloads.yaml"), workloads)?;

        let config = format!(
            r#"workloads:
  file: workloads.yaml
steering:
  bpffs_dir: {bpffs}
  pods_cgroup: {cgroup}
  intercept_ports: [{PROTECTED_PORT}]
{proxy}audit:
  path: audit.jsonl
admin:
  listen: {admin}
plugins:
  - id: frontend-token
    type: token-creator
    workloads:
      service_account: frontend
    parameters:
      token_endpoint: {token}
      client_id: frontend
{frontend_parameters}  - id: intruder-token
    type: token-creator
    workloads:
      service_account: intruder
    parameters:
      token_endpoint: {token}
      client_id: intruder
      client_secret: file:secrets/intruder
      scopes: [admin]
  - id: echo-validator
    type: token-validator
    workloads:
      service_account: echo
    parameters:
{echo_validator_parameters}      required_scopes: [admin]
      allowed_client_ids: [frontend]
      allowed_cidrs: [{frontend}/32, {intruder}/32]
      client_id_header: {CLIENT_ID_HEADER}
"#,
            bpffs = self.bpffs_dir.display(),
            cgroup = self.topology.pods_cgroup().display(),
            admin = self.admin,
            token = self.idp.token_endpoint(),
            frontend = self.pod("frontend").ip,
            intruder = self.pod("intruder").ip,
        );
        std::fs::write(&self.config_path, config)?;
        Ok(())
    }

    fn start_apps(&mut self) -> anyhow::Result<()> {
        for port in [PROTECTED_PORT, PLAIN_PORT] {
            let echo = self.pod("echo");
            let mut command = echo.command(&self.binaries.echo.display().to_string());
            command.args(["--listen", &format!("0.0.0.0:{port}")]);
            let child = ChildGuard::spawn(command, &format!("echo-{port}"), self.dir.path())?;
            self.apps.push(child);
        }
        for port in [PROTECTED_PORT, PLAIN_PORT] {
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            wait_until(
                Duration::from_secs(10),
                &format!("echo app on port {port}"),
                || {
                    self.curl_status_in("echo", &format!("http://{addr}/"))
                        .is_ok_and(|status| status == 200)
                },
            )?;
        }
        Ok(())
    }

    /// Starts the agent and waits until its `/readyz` returns 200.
    pub fn start_agent(&mut self) -> anyhow::Result<()> {
        let mut command = match &self.agent_cgroup {
            None => Command::new(&self.binaries.agent),
            Some(cgroup) => {
                std::fs::create_dir_all(cgroup)?;
                let mut command = Command::new("sh");
                command
                    .args([
                        "-c",
                        "echo $$ > \"$1/cgroup.procs\" && shift && exec \"$@\"",
                        "sh",
                    ])
                    .arg(cgroup);
                if self.agent_cgroup_namespace {
                    command.args(["unshare", "--cgroup", "--"]);
                }
                command.arg(&self.binaries.agent);
                command
            }
        };
        command
            .args(["run", "--config"])
            .arg(&self.config_path)
            .env("ECHO_VALIDATOR_SECRET", "validator-secret")
            .env("RUST_LOG", "info,tokenmesh_agent=debug");
        let mut agent = ChildGuard::spawn(command, "agent", self.dir.path())?;
        let admin = self.admin;
        let mut exited = false;
        let ready = wait_until(Duration::from_secs(20), "agent /readyz", || {
            exited = agent.ensure_running().is_err();
            exited || http_get_status(admin, "/readyz").is_ok_and(|status| status == 200)
        });
        self.agent = Some(agent);
        if exited || ready.is_err() {
            let e = ready
                .err()
                .map_or("the agent exited".to_string(), |e| e.to_string());
            let log = self.agent_log();
            bail!("{e}\nagent log:\n{log}");
        }
        Ok(())
    }

    /// Sends SIGTERM to the agent and waits for it to exit.
    pub fn stop_agent(&mut self) -> anyhow::Result<ExitStatus> {
        let mut agent = self.agent.take().context("the agent is not running")?;
        agent.terminate(Duration::from_secs(15))
    }

    /// Replaces the agent's config file with `edit` applied to its text. The new file is
    /// written beside it and renamed over it, as a ConfigMap update does.
    pub fn rewrite_config(&self, edit: impl FnOnce(String) -> String) -> anyhow::Result<()> {
        let text = std::fs::read_to_string(&self.config_path)?;
        replace_file(&self.config_path, &edit(text))
    }

    /// Rewrites the workloads file so it lists only the pods named in `keep`.
    pub fn rewrite_workloads(&self, keep: &[&str]) -> anyhow::Result<()> {
        let path = self.dir.path().join("workloads.yaml");
        let mut document: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(&path)?)?;
        let pods = document["pods"]
            .as_sequence_mut()
            .context("the workloads file has no pods list")?;
        pods.retain(|pod| {
            pod["name"]
                .as_str()
                .is_some_and(|name| keep.contains(&name))
        });
        replace_file(&path, &serde_yaml::to_string(&document)?)
    }

    /// Sends `signal` to the running agent.
    pub fn signal_agent(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let agent = self.agent.as_ref().context("the agent is not running")?;
        let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.id())?);
        nix::sys::signal::kill(pid, signal)?;
        Ok(())
    }

    /// Waits until the agent's log contains `text`.
    pub fn wait_for_log(&self, text: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_until(timeout, &format!("agent log line {text:?}"), || {
            self.agent_log().contains(text)
        })
        .with_context(|| self.agent_log())
    }

    /// Everything the agent wrote to stderr so far.
    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.stderr")).unwrap_or_default()
    }

    /// Request counters of the identity provider.
    pub fn idp_stats(&self) -> anyhow::Result<IdpStats> {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(self.idp.stats())
    }

    /// Audit records written so far.
    pub fn audit_records(&self) -> anyhow::Result<Vec<serde_json::Value>> {
        let text = std::fs::read_to_string(&self.audit_path).unwrap_or_default();
        text.lines()
            .map(|line| {
                serde_json::from_str(line).with_context(|| format!("bad audit line {line:?}"))
            })
            .collect()
    }

    /// Runs curl inside `pod` (its network namespace and cgroup) and returns what happened.
    pub fn curl(&self, pod: &str, url: &str, headers: &[&str]) -> anyhow::Result<CurlOutcome> {
        self.run_curl(self.pod(pod).command("curl"), url, headers)
    }

    /// Runs curl in `pod`'s network namespace but outside the pods' cgroups, as a process
    /// the agent does not know: its connections are not redirected on the way out.
    pub fn curl_unenrolled(&self, pod: &str, url: &str) -> anyhow::Result<CurlOutcome> {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.pod(pod).netns_name, "curl"]);
        self.run_curl(command, url, &[])
    }

    fn run_curl(
        &self,
        mut command: Command,
        url: &str,
        headers: &[&str],
    ) -> anyhow::Result<CurlOutcome> {
        let scratch = tempfile::tempdir_in(self.dir.path())?;
        let body_path = scratch.path().join("body");
        let headers_path = scratch.path().join("headers");
        command
            .args(["-sS", "--max-time", "10", "-o"])
            .arg(&body_path)
            .arg("-D")
            .arg(&headers_path)
            .args(["-w", "%{http_code}"]);
        for header in headers {
            command.args(["-H", header]);
        }
        command.arg(url);
        let output = command.output().context("cannot run curl")?;
        let status_text = String::from_utf8_lossy(&output.stdout);
        Ok(CurlOutcome {
            exit_code: output.status.code().unwrap_or(-1),
            status: status_text.trim().parse().unwrap_or(0),
            headers: std::fs::read_to_string(&headers_path).unwrap_or_default(),
            body: std::fs::read_to_string(&body_path).unwrap_or_default(),
        })
    }

    fn curl_status_in(&self, pod: &str, url: &str) -> anyhow::Result<u16> {
        Ok(self.curl(pod, url, &[])?.status)
    }

    /// Sends `count` requests one after another over one keep-alive connection from
    /// `pod` and returns their statuses.
    pub fn curl_sequential(&self, pod: &str, url: &str, count: usize) -> anyhow::Result<Vec<u16>> {
        let mut command = self.pod(pod).command("curl");
        command.args(["-sS", "--max-time", "20", "-w", "%{http_code}\n"]);
        for _ in 0..count {
            command.args(["-o", "/dev/null", url]);
        }
        let output = command.output().context("cannot run curl")?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.trim().parse().unwrap_or(0))
            .collect())
    }

    /// Sends `count` requests at once from `pod` (curl's parallel mode) and returns their
    /// statuses.
    pub fn curl_parallel(&self, pod: &str, url: &str, count: usize) -> anyhow::Result<Vec<u16>> {
        let mut command = self.pod(pod).command("curl");
        command.args([
            "-sS",
            "--max-time",
            "20",
            "--parallel",
            "--parallel-immediate",
            "--parallel-max",
            &count.to_string(),
            "-w",
            "%{http_code}\n",
        ]);
        for _ in 0..count {
            command.args(["-o", "/dev/null", url]);
        }
        let output = command.output().context("cannot run curl")?;
        let statuses = String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| line.trim().parse().unwrap_or(0))
            .collect();
        Ok(statuses)
    }
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            let _ = agent.terminate(Duration::from_secs(15));
        }
        // The agent keeps its programs pinned when it exits; remove them.
        let uninstall = Command::new(&self.binaries.agent)
            .args(["uninstall", "--config"])
            .arg(&self.config_path)
            .env("ECHO_VALIDATOR_SECRET", "validator-secret")
            .output();
        match uninstall {
            Ok(output) if output.status.success() => {}
            Ok(output) => eprintln!(
                "tokenmesh-agent uninstall failed: {}",
                String::from_utf8_lossy(&output.stderr)
            ),
            Err(e) => eprintln!("cannot run tokenmesh-agent uninstall: {e}"),
        }
        self.apps.clear();
    }
}

/// Selects the audit records of one direction whose destination port is `port`.
pub fn records_where<'a>(
    records: &'a [serde_json::Value],
    direction: &str,
    port: u16,
) -> Vec<&'a serde_json::Value> {
    let suffix = format!(":{port}");
    records
        .iter()
        .filter(|record| record["direction"] == direction)
        .filter(|record| {
            record["destination"]
                .as_str()
                .is_some_and(|destination| destination.ends_with(&suffix))
        })
        .collect()
}

/// Polls `ready` every 50 ms until it returns true or `timeout` passes.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("{what} was not ready after {timeout:?}")
}

/// Minimal HTTP/1.0 GET on loopback, for the agent's admin endpoint.
pub fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .context("empty HTTP response")?
        .parse()?;
    Ok(status)
}

fn replace_file(path: &Path, content: &str) -> anyhow::Result<()> {
    let staged = path.with_extension("new");
    std::fs::write(&staged, content)?;
    std::fs::rename(&staged, path)?;
    Ok(())
}

fn free_loopback_addr() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}
