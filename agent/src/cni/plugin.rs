//! The plugin side: what `tokenmesh-cni` does for each CNI command, following the CNI
//! specification 1.1 (environment variables, network configuration on stdin, result or
//! error on stdout).

use std::{
    io::{BufRead, BufReader, Write},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    DEFAULT_SOCKET,
    protocol::{MAX_LINE, Reply, Request, Sandbox, SandboxRef},
};

/// CNI versions whose result format (`ips`, `interfaces`) the plugin reads.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The time the agent may take to steer a new pod, unless `timeout_seconds` is set.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// DEL and STATUS need no work from the agent beyond a map update.
const SHORT_TIMEOUT: Duration = Duration::from_secs(5);

// Error codes of the CNI specification.
const INCOMPATIBLE_VERSION: u32 = 1;
const INVALID_ENVIRONMENT: u32 = 4;
const DECODE_FAILED: u32 = 6;
const INVALID_CONFIG: u32 = 7;
const TRY_AGAIN_LATER: u32 = 11;
/// First code of the range the specification leaves to plugins.
const POD_REJECTED: u32 = 100;

/// The plugin's entry of the network configuration list, with the earlier result.
#[derive(Debug, Deserialize)]
struct NetConf {
    #[serde(rename = "cniVersion")]
    cni_version: String,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    /// The agent's Unix socket.
    #[serde(default = "default_socket")]
    agent_socket: PathBuf,
    /// How long to wait for the agent to steer a new pod, in seconds.
    timeout_seconds: Option<u64>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

/// The plugin's stdout and exit status.
#[derive(Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: String,
    pub success: bool,
}

/// A CNI error result.
#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }
}

/// Runs one CNI command. `env` reads the `CNI_*` variables, `stdin` is the network
/// configuration.
pub fn run(env: &dyn Fn(&str) -> Option<String>, stdin: &str) -> Output {
    let command = env("CNI_COMMAND").unwrap_or_default();
    if command == "VERSION" {
        return Output {
            stdout: json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
            success: true,
        };
    }
    // The error result carries the configuration's version when it can be read.
    let version = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|conf| conf["cniVersion"].as_str().map(str::to_string))
        .unwrap_or_else(|| "1.1.0".to_string());
    match execute(&command, env, stdin) {
        Ok(stdout) => Output {
            stdout,
            success: true,
        },
        Err(error) => Output {
            stdout: json!({
                "cniVersion": version,
                "code": error.code,
                "msg": error.msg,
                "details": error.details,
            })
            .to_string(),
            success: false,
        },
    }
}

fn execute(
    command: &str,
    env: &dyn Fn(&str) -> Option<String>,
    stdin: &str,
) -> Result<String, CniError> {
    let conf: NetConf = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            DECODE_FAILED,
            "invalid network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {:?} is not supported by tokenmesh-cni",
                conf.cni_version
            ),
            format!("use one of {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    match command {
        "ADD" => add(&conf, env, false),
        "CHECK" => add(&conf, env, true),
        "DEL" => {
            del(&conf, env);
            Ok(String::new())
        }
        "STATUS" => status(&conf),
        "GC" => Ok(String::new()),
        other => Err(CniError::new(
            INVALID_ENVIRONMENT,
            format!("CNI_COMMAND {other:?} is not a CNI command"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// Handles ADD, and CHECK with `check`: the agent steers the pod if it has not yet, so a
/// CHECK after an agent restart repairs the pod too.
fn add(
    conf: &NetConf,
    env: &dyn Fn(&str) -> Option<String>,
    check: bool,
) -> Result<String, CniError> {
    let prev_result = conf.prev_result.clone().ok_or_else(|| {
        CniError::new(
            INVALID_CONFIG,
            "tokenmesh-cni found no prevResult",
            "list tokenmesh-cni after the plugin that sets up the pod network in the same .conflist",
        )
    })?;
    let Some(pod) = sandbox_ref(env)? else {
        // Not a Kubernetes pod: nothing can enrol it.
        if check {
            return Ok(String::new());
        }
        return Ok(result_output(prev_result, &conf.cni_version));
    };
    let netns = required(env, "CNI_NETNS")?;
    let timeout = conf
        .timeout_seconds
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_TIMEOUT);
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let request = Request::Add(Sandbox {
        pod,
        netns: PathBuf::from(netns),
        ip: first_ipv4(&prev_result),
        timeout_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
    });
    // The agent replies before its own deadline; the margin covers the socket round trip.
    let reply = call(&conf.agent_socket, &request, timeout + SHORT_TIMEOUT)
        .map_err(|e| agent_failed(&conf.agent_socket, &e))?;
    match reply {
        // CHECK prints nothing on success.
        Reply::Steered | Reply::NotEnrolled { .. } | Reply::Done if check => Ok(String::new()),
        Reply::Steered | Reply::NotEnrolled { .. } | Reply::Done => {
            Ok(result_output(prev_result, &conf.cni_version))
        }
        Reply::Failed { message } => Err(CniError::new(
            POD_REJECTED,
            format!("tokenmesh: pod {pod_name} cannot start: {message}"),
            "the kubelet retries the sandbox; the agent's log names the cause",
        )),
    }
}

/// Tells the agent a sandbox is gone. DEL must succeed even when the agent is down, so
/// the runtime can remove the sandbox; the agent drops pods whose namespace is gone.
fn del(conf: &NetConf, env: &dyn Fn(&str) -> Option<String>) {
    if let Ok(Some(pod)) = sandbox_ref(env) {
        let _ = call(&conf.agent_socket, &Request::Del(pod), SHORT_TIMEOUT);
    }
}

/// Reports the plugin as available even when the agent does not reply. Runtimes use
/// STATUS for the node's network readiness (containerd 2.0 through go-cni pull request
/// 123, CRI-O through ocicni pull request 196), and a failure marks the whole node
/// NotReady, so its pods may be evicted. A missing agent holds new pods at ADD instead.
fn status(conf: &NetConf) -> Result<String, CniError> {
    if let Err(error) = call(&conf.agent_socket, &Request::Status, SHORT_TIMEOUT) {
        eprintln!(
            "tokenmesh-cni: {}; new pods wait at ADD until it answers",
            error.describe(&conf.agent_socket)
        );
    }
    Ok(String::new())
}

fn agent_failed(socket: &Path, error: &CallError) -> CniError {
    CniError::new(
        TRY_AGAIN_LATER,
        error.describe(socket),
        "pods start once the tokenmesh agent on this node is running; check the tokenmesh-agent DaemonSet pod of this node",
    )
}

/// Reads the pod from `CNI_ARGS`; `None` for a container that is not a Kubernetes pod.
fn sandbox_ref(env: &dyn Fn(&str) -> Option<String>) -> Result<Option<SandboxRef>, CniError> {
    let args = env("CNI_ARGS").unwrap_or_default();
    let arg = |key: &str| {
        args.split(';')
            .filter_map(|pair| pair.split_once('='))
            .find(|(name, _)| name.trim() == key)
            .map(|(_, value)| value.trim().to_string())
            .filter(|value| !value.is_empty())
    };
    let (Some(namespace), Some(name)) = (arg("K8S_POD_NAMESPACE"), arg("K8S_POD_NAME")) else {
        return Ok(None);
    };
    Ok(Some(SandboxRef {
        namespace,
        name,
        uid: arg("K8S_POD_UID"),
        container_id: required(env, "CNI_CONTAINERID")?,
    }))
}

fn required(env: &dyn Fn(&str) -> Option<String>, name: &str) -> Result<String, CniError> {
    env(name).filter(|v| !v.is_empty()).ok_or_else(|| {
        CniError::new(
            INVALID_ENVIRONMENT,
            format!("{name} is not set"),
            "the container runtime sets it when it runs a CNI plugin",
        )
    })
}

/// Returns the first IPv4 address of a CNI 0.3+ result, from `ips[].address` in CIDR form.
fn first_ipv4(result: &Value) -> Option<Ipv4Addr> {
    result["ips"]
        .as_array()?
        .iter()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next())
        .find_map(|address| address.parse().ok())
}

/// The earlier result, passed on unchanged as a chained plugin must, in the
/// configuration's version.
fn result_output(mut result: Value, version: &str) -> String {
    if let Some(object) = result.as_object_mut() {
        object.insert("cniVersion".into(), Value::String(version.to_string()));
    }
    result.to_string()
}

/// The reason a request to the agent got no usable reply.
#[derive(Debug)]
pub enum CallError {
    /// The socket could not be reached.
    Connect(std::io::Error),
    /// No reply within the timeout.
    Timeout(Duration),
    /// The connection failed while the request was sent or the reply read.
    Io(std::io::Error),
    /// The reply was not a reply of this protocol.
    InvalidReply(String),
}

impl CallError {
    /// Describes the failure for an operator, naming the socket.
    pub fn describe(&self, socket: &Path) -> String {
        let socket = socket.display();
        match self {
            CallError::Connect(error) => {
                format!("tokenmesh agent not reachable at {socket}: {error}")
            }
            CallError::Timeout(timeout) => format!(
                "tokenmesh agent at {socket} did not reply within {} s",
                timeout.as_secs()
            ),
            CallError::Io(error) => {
                format!("connection to the tokenmesh agent at {socket} failed: {error}")
            }
            CallError::InvalidReply(error) => format!(
                "tokenmesh agent at {socket} sent an invalid reply ({error}); use tokenmesh-cni of the agent's version"
            ),
        }
    }
}

/// Sends one request to the agent and reads its reply.
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, CallError> {
    let mut stream = UnixStream::connect(socket).map_err(CallError::Connect)?;
    let io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            CallError::Timeout(timeout)
        }
        _ => CallError::Io(error),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(SHORT_TIMEOUT)).map_err(io)?;
    let mut line = serde_json::to_vec(request).expect("a request serializes");
    line.push(b'\n');
    stream.write_all(&line).map_err(io)?;
    let mut reply = String::new();
    BufReader::new(std::io::Read::take(stream, MAX_LINE as u64))
        .read_line(&mut reply)
        .map_err(io)?;
    serde_json::from_str(&reply).map_err(|e| CallError::InvalidReply(e.to_string()))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    fn conf(socket: &Path) -> String {
        json!({
            "cniVersion": "1.0.0", "name": "pods", "type": "tokenmesh-cni",
            "agent_socket": socket, "timeout_seconds": 1,
            "prevResult": {"cniVersion": "1.0.0", "ips": [
                {"address": "fd00::5/64"}, {"address": "10.1.0.5/24", "gateway": "10.1.0.1"}
            ]}
        })
        .to_string()
    }

    fn error_of(output: &Output) -> Value {
        assert!(!output.success, "{}", output.stdout);
        serde_json::from_str(&output.stdout).unwrap()
    }

    #[test]
    fn version_lists_supported() {
        let output = run(&env_of(&[("CNI_COMMAND", "VERSION")]), "");
        assert!(output.success);
        let json: Value = serde_json::from_str(&output.stdout).unwrap();
        assert_eq!(json["supportedVersions"].as_array().unwrap().len(), 5);
    }

    #[test]
    fn add_without_agent_try_again() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
            ),
        ]);
        let error = error_of(&run(&env, &conf(&socket)));
        assert_eq!(error["code"], TRY_AGAIN_LATER);
        assert_eq!(error["cniVersion"], "1.0.0");
        let msg = error["msg"].as_str().unwrap();
        assert!(msg.contains(socket.to_str().unwrap()), "{msg}");
    }

    #[test]
    fn add_outside_kubernetes_passes_result() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[("CNI_COMMAND", "ADD"), ("CNI_CONTAINERID", "abc")]);
        let output = run(&env, &conf(&dir.path().join("cni.sock")));
        assert!(output.success, "{}", output.stdout);
        let result: Value = serde_json::from_str(&output.stdout).unwrap();
        assert_eq!(result["ips"][1]["address"], "10.1.0.5/24");
    }

    #[test]
    fn add_without_prev_result_rejected() {
        let env = env_of(&[("CNI_COMMAND", "ADD")]);
        let stdin = json!({"cniVersion": "1.0.0", "name": "pods", "type": "tokenmesh-cni"});
        let error = error_of(&run(&env, &stdin.to_string()));
        assert_eq!(error["code"], INVALID_CONFIG);
    }

    #[test]
    fn add_without_netns_invalid_environment() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"),
        ]);
        let error = error_of(&run(&env, &conf(&dir.path().join("cni.sock"))));
        assert_eq!(error["code"], INVALID_ENVIRONMENT);
        assert_eq!(error["msg"], "CNI_NETNS is not set");
    }

    #[test]
    fn del_without_agent_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"),
        ]);
        let output = run(&env, &conf(&dir.path().join("cni.sock")));
        assert_eq!(
            output,
            Output {
                stdout: String::new(),
                success: true
            }
        );
    }

    #[test]
    fn status_without_agent_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[("CNI_COMMAND", "STATUS")]);
        let output = run(&env, &conf(&dir.path().join("cni.sock")));
        assert!(output.success, "{}", output.stdout);
        assert_eq!(output.stdout, "");
    }

    #[test]
    fn silent_agent_reported_as_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        // Accepts the connection and never replies.
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let env = env_of(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0"),
        ]);
        let mut stdin: Value = serde_json::from_str(&conf(&socket)).unwrap();
        stdin["timeout_seconds"] = json!(0);
        let error = error_of(&run(&env, &stdin.to_string()));
        assert_eq!(error["code"], TRY_AGAIN_LATER);
        let msg = error["msg"].as_str().unwrap();
        assert!(msg.contains("did not reply within 5 s"), "{msg}");
    }

    #[test]
    fn check_without_kubernetes_prints_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[("CNI_COMMAND", "CHECK"), ("CNI_CONTAINERID", "abc")]);
        let output = run(&env, &conf(&dir.path().join("cni.sock")));
        assert!(output.success, "{}", output.stdout);
        assert_eq!(output.stdout, "");
    }

    #[test]
    fn unsupported_version_rejected() {
        let env = env_of(&[("CNI_COMMAND", "ADD")]);
        let stdin = json!({"cniVersion": "0.2.0", "name": "pods", "type": "tokenmesh-cni"});
        let error = error_of(&run(&env, &stdin.to_string()));
        assert_eq!(error["code"], INCOMPATIBLE_VERSION);
    }

    #[test]
    fn unknown_command_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let env = env_of(&[("CNI_COMMAND", "UP")]);
        let error = error_of(&run(&env, &conf(&dir.path().join("cni.sock"))));
        assert_eq!(error["code"], INVALID_ENVIRONMENT);
    }

    #[test]
    fn first_ipv4_skips_ipv6() {
        let result = json!({"ips": [{"address": "fd00::5/64"}, {"address": "10.1.0.5/24"}]});
        assert_eq!(first_ipv4(&result), Some(Ipv4Addr::new(10, 1, 0, 5)));
        assert_eq!(first_ipv4(&json!({"ips": []})), None);
    }

    #[test]
    fn pod_from_cni_args() {
        let env = env_of(&[
            ("CNI_CONTAINERID", "abc"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1",
            ),
        ]);
        let pod = sandbox_ref(&env).unwrap().unwrap();
        assert_eq!(pod.namespace, "shop");
        assert_eq!(pod.name, "web-0");
        assert_eq!(pod.uid.as_deref(), Some("u-1"));
        assert_eq!(pod.container_id, "abc");
    }
}
