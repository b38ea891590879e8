//! The test topology itself: pods reach each other over the node bridge and nothing else,
//! commands run in the pod's namespace and cgroup, and Drop removes every namespace and
//! cgroup, also after a panic. Needs root.

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokenmesh_e2e::process::ChildGuard;
use tokenmesh_e2e::topology::{Pod, Topology, cgroup2_mount};

const ECHO: &str = env!("CARGO_BIN_EXE_echo");
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs a command to completion and returns its stdout, panicking with its stderr on failure.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|error| panic!("failed to run {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("command output is UTF-8")
}

fn netns_names() -> Vec<String> {
    run(Command::new("ip").args(["netns", "list"]))
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

fn log_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("tokenmesh-test-topology-")
        .tempdir()
        .expect("temporary folder")
}

/// Starts the echo app in `pod` with `mode` (`--listen` or `--tcp-echo`) on port 8080 of
/// the pod's address and waits until it accepts connections.
fn start_echo(pod: &Pod, mode: &str, logs: &Path) -> (ChildGuard, SocketAddr) {
    let addr = SocketAddr::from((pod.ip, 8080));
    let mut command = pod.command(ECHO);
    command.arg(mode).arg(addr.to_string());
    let mut echo =
        ChildGuard::spawn(command, &format!("echo-{}", pod.name), logs).expect("echo starts");
    echo.wait_for_tcp(Some(&pod.netns_path), addr, READY_TIMEOUT)
        .expect("echo becomes ready");
    (echo, addr)
}

#[test]
fn pods_reach_each_other_over_http() {
    let topology = Topology::create("http", &["client", "server"]).unwrap();
    let logs = log_dir();
    let client = topology.pod("client");
    let (_echo, addr) = start_echo(topology.pod("server"), "--listen", logs.path());

    let body = run(client.command("curl").args([
        "--silent",
        "--show-error",
        "--fail",
        "--max-time",
        "5",
        "--header",
        "X-Probe: one",
        &format!("http://{addr}/hello?x=1"),
    ]));
    let echoed: serde_json::Value = serde_json::from_str(&body).expect("echo answers with JSON");

    assert_eq!(echoed["method"], "GET");
    assert_eq!(echoed["path"], "/hello");
    assert_eq!(echoed["query"], "x=1");
    assert_eq!(echoed["headers"]["x-probe"], serde_json::json!(["one"]));
    assert_eq!(echoed["local"], addr.to_string());
    let peer: SocketAddr = echoed["peer"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        peer.ip(),
        client.ip,
        "the server sees the client pod's own address"
    );
}

#[test]
fn pods_reach_each_other_over_tcp() {
    let topology = Topology::create("tcp", &["client", "server"]).unwrap();
    let logs = log_dir();
    let client = topology.pod("client");
    let (_echo, addr) = start_echo(topology.pod("server"), "--tcp-echo", logs.path());

    let (local, echoed) = client
        .in_netns(move || {
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            stream.write_all(b"ping over the bridge").unwrap();
            stream.shutdown(Shutdown::Write).unwrap();
            let mut echoed = Vec::new();
            stream.read_to_end(&mut echoed).unwrap();
            (stream.local_addr().unwrap(), echoed)
        })
        .unwrap();

    assert_eq!(echoed, b"ping over the bridge");
    assert_eq!(
        local.ip(),
        client.ip,
        "the socket was created in the client pod"
    );
}

#[test]
fn no_namespace_has_default_route() {
    let topology = Topology::create("routes", &["a", "b"]).unwrap();
    let mut namespaces: Vec<&str> = topology
        .pods()
        .iter()
        .map(|pod| pod.netns_name.as_str())
        .collect();
    namespaces.push(topology.node_netns());

    for netns in namespaces {
        for family in ["-4", "-6"] {
            let default =
                run(Command::new("ip").args(["-n", netns, family, "route", "show", "default"]));
            assert_eq!(default.trim(), "", "{netns} has a default route ({family})");
        }
    }
    for pod in topology.pods() {
        let routes = run(Command::new("ip").args(["-n", &pod.netns_name, "-4", "route", "show"]));
        let routes: Vec<&str> = routes.lines().collect();
        assert_eq!(routes.len(), 1, "{}: {routes:?}", pod.name);
        assert!(
            routes[0].starts_with(&format!("{} dev eth0", topology.subnet())),
            "{routes:?}"
        );
    }
    let node_routes =
        run(Command::new("ip").args(["-n", topology.node_netns(), "-4", "route", "show"]));
    assert_eq!(
        node_routes.trim(),
        "",
        "the node namespace has no IPv4 route at all"
    );
}

#[test]
fn pod_addresses_and_subnets() {
    let first = Topology::create("addr_one", &["a", "b", "c"]).unwrap();
    let second = Topology::create("addr_two", &["a"]).unwrap();

    assert_ne!(first.subnet(), second.subnet());
    assert_eq!(first.subnet().prefix_len(), 24);
    for (index, pod) in first.pods().iter().enumerate() {
        let expected = u32::from(first.subnet().network()) + index as u32 + 2;
        assert_eq!(u32::from(pod.ip), expected, "pod {}", pod.name);
    }
    assert_eq!(first.pod("b").cgroup, first.pods_cgroup().join("b"));
    assert!(first.pods_cgroup().starts_with(cgroup2_mount().unwrap()));
}

#[test]
fn create_rejects_invalid_names() {
    assert!(Topology::create("bad/prefix", &["a"]).is_err());
    assert!(Topology::create("", &["a"]).is_err());
    assert!(Topology::create("dup", &["a", "a"]).is_err());
    assert!(Topology::create("dash", &["a-b"]).is_err());
    assert!(Topology::create("reserved", &["node"]).is_err());
    assert!(Topology::create("none", &[]).is_err());

    let first = Topology::create("taken", &["a"]).unwrap();
    let duplicate = Topology::create("taken", &["a"]);
    assert!(
        duplicate.is_err(),
        "a prefix in use cannot be created twice"
    );
    drop(first);
}

#[test]
fn command_runs_in_pod_netns_and_cgroup() {
    let topology = Topology::create("command", &["a"]).unwrap();
    let pod = topology.pod("a");

    let cgroups = run(pod.command("cat").arg("/proc/self/cgroup"));
    let relative = pod.cgroup.strip_prefix(cgroup2_mount().unwrap()).unwrap();
    let expected = format!("0::/{}", relative.display());
    assert!(
        cgroups.lines().any(|line| line == expected),
        "expected {expected} in {cgroups}"
    );

    let addresses = run(pod
        .command("ip")
        .args(["-4", "-o", "address", "show", "dev", "eth0"]));
    assert!(
        addresses.contains(&format!("inet {}/24", pod.ip)),
        "{addresses}"
    );
}

/// Names and paths a topology created, to check after it is gone.
struct CreatedItems {
    namespaces: Vec<String>,
    test_cgroup: PathBuf,
}

fn created_by(topology: &Topology) -> CreatedItems {
    let mut namespaces: Vec<String> = topology
        .pods()
        .iter()
        .map(|pod| pod.netns_name.clone())
        .collect();
    namespaces.push(topology.node_netns().to_owned());
    let test_cgroup = topology.pods_cgroup().parent().unwrap().to_path_buf();
    CreatedItems {
        namespaces,
        test_cgroup,
    }
}

fn assert_removed(created: &CreatedItems) {
    let existing = netns_names();
    for netns in &created.namespaces {
        assert!(
            !existing.contains(netns),
            "network namespace {netns} still exists"
        );
    }
    assert!(
        !created.test_cgroup.exists(),
        "cgroup {} still exists",
        created.test_cgroup.display()
    );
}

#[test]
fn drop_removes_namespaces_cgroups_processes() {
    let topology = Topology::create("drop", &["a", "b"]).unwrap();
    let created = created_by(&topology);
    let existing = netns_names();
    for netns in &created.namespaces {
        assert!(
            existing.contains(netns),
            "network namespace {netns} was not created"
        );
    }
    assert!(created.test_cgroup.is_dir());
    let mut sleeper = topology
        .pod("a")
        .command("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    wait_for_exec(sleeper.id(), "sleep");

    drop(topology);

    assert_removed(&created);
    let status = sleeper.wait().unwrap();
    assert_eq!(
        status.signal(),
        Some(Signal::SIGKILL as i32),
        "the process in the pod was killed: {status}"
    );
}

/// Waits until process `pid` runs `program`, past the shell and `ip netns exec` that
/// `Pod::command` starts first.
fn wait_for_exec(pid: u32, program: &str) {
    let deadline = Instant::now() + READY_TIMEOUT;
    let comm = PathBuf::from(format!("/proc/{pid}/comm"));
    while fs::read_to_string(&comm).unwrap_or_default().trim() != program {
        assert!(
            Instant::now() < deadline,
            "process {pid} did not exec {program}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn drop_cleans_up_after_panic() {
    let (sender, receiver) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let topology = Topology::create("panic", &["a"]).unwrap();
        sender.send(created_by(&topology)).unwrap();
        panic!("deliberate panic while the topology exists");
    })
    .join();

    assert!(result.is_err(), "the thread panicked");
    let created = receiver
        .recv()
        .expect("the topology was created before the panic");
    assert_removed(&created);
}
