//! Test network topology: pods are network namespaces joined by veth pairs to a bridge in
//! a separate "node" namespace, each with its own cgroup. Nothing is added to the host's
//! own namespace and no namespace has a route out, so traffic stays inside the topology.
//!
//! Names carry the test process id, so parallel test processes never collide and
//! `cargo xtask cleanup` can tell leftovers of exited runs: network namespaces
//! `tm-<pid>-<prefix>-<pod>` and `tm-<pid>-<prefix>-node`, the cgroup
//! `<cgroup2>/tokenmesh-test-<pid>-<prefix>` and the bpffs folder
//! `/sys/fs/bpf/tokenmesh-test-<pid>-<prefix>`.

use std::collections::HashSet;
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use ipnet::Ipv4Net;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// Bridge in the node namespace that every pod's veth joins.
const BRIDGE: &str = "br0";
/// Interface name of the veth end inside each pod.
const POD_INTERFACE: &str = "eth0";
const MAX_NAME_LEN: usize = 32;
/// Pods get .2 to .254 of their /24.
const MAX_PODS: usize = 253;

/// Prefixes and subnets of the topologies alive in this process.
static RESERVED: Mutex<Reserved> = Mutex::new(Reserved {
    prefixes: Vec::new(),
    subnets: Vec::new(),
});

struct Reserved {
    prefixes: Vec<String>,
    subnets: Vec<Ipv4Net>,
}

/// A node namespace with a bridge, and one namespace and one cgroup per pod.
/// Drop kills every process in the pods' cgroups and namespaces and removes everything
/// the topology made, also while a test panics.
pub struct Topology {
    prefix: String,
    subnet: Ipv4Net,
    node_netns: String,
    /// `<cgroup2>/tokenmesh-test-<pid>-<prefix>`.
    test_cgroup: PathBuf,
    pods_cgroup: PathBuf,
    bpf_pin_dir: PathBuf,
    pods: Vec<Pod>,
}

/// One pod: a network namespace with one veth to the bridge, and a cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns_name: String,
    /// `/run/netns/<netns_name>`, the file to open for `setns`.
    pub netns_path: PathBuf,
    /// Absolute path of the pod's cgroup in the cgroup v2 hierarchy.
    pub cgroup: PathBuf,
    pub ip: Ipv4Addr,
}

impl Topology {
    /// Creates the node namespace and bridge, then one namespace, veth pair and cgroup per
    /// pod. Pod `i` of `pods` gets address `.(i + 2)` in the topology's /24. `prefix` is
    /// unique among the topologies alive in this process (the test name is a good choice).
    pub fn create(prefix: &str, pods: &[&str]) -> Result<Topology> {
        require_root()?;
        validate_names(prefix, pods)?;
        let tag = format!("{}-{prefix}", std::process::id());
        let test_cgroup = cgroup2_mount()?.join(format!("tokenmesh-test-{tag}"));

        // From here on, dropping `topology` releases the reservation.
        let subnet = reserve(prefix)?;
        let mut topology = Topology {
            prefix: prefix.to_owned(),
            subnet,
            node_netns: format!("tm-{tag}-node"),
            pods_cgroup: test_cgroup.join("pods"),
            test_cgroup,
            bpf_pin_dir: PathBuf::from(format!("/sys/fs/bpf/tokenmesh-test-{tag}")),
            pods: Vec::new(),
        };
        for (index, name) in pods.iter().enumerate() {
            let netns_name = format!("tm-{tag}-{name}");
            topology.pods.push(Pod {
                name: name.to_string(),
                netns_path: Path::new("/run/netns").join(&netns_name),
                netns_name,
                cgroup: topology.pods_cgroup.join(name),
                ip: host_address(subnet, index + 2),
            });
        }

        // This process id is ours, so anything under these names was left by an exited
        // process that had the same id.
        topology.remove_all();
        // On error, dropping `topology` removes what was made so far.
        topology.build()?;
        Ok(topology)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|pod| pod.name == name)
            .unwrap_or_else(|| panic!("topology `{}` has no pod `{name}`", self.prefix))
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Parent cgroup of all pods, where cgroup eBPF programs attach.
    pub fn pods_cgroup(&self) -> &Path {
        &self.pods_cgroup
    }

    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// Name of the namespace that contains the bridge.
    pub fn node_netns(&self) -> &str {
        &self.node_netns
    }

    /// Folder under bpffs for this topology's pins. The topology does not create it, but
    /// Drop removes it when it exists.
    pub fn bpf_pin_dir(&self) -> &Path {
        &self.bpf_pin_dir
    }

    fn build(&self) -> Result<()> {
        ip(&["netns", "add", &self.node_netns])?;
        ip(&["-n", &self.node_netns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            &self.node_netns,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
        ])?;
        ip(&["-n", &self.node_netns, "link", "set", BRIDGE, "up"])?;

        for dir in [&self.test_cgroup, &self.pods_cgroup] {
            fs::create_dir(dir)
                .with_context(|| format!("failed to create cgroup {}", dir.display()))?;
        }
        for (index, pod) in self.pods.iter().enumerate() {
            self.build_pod(pod, &format!("veth{index}"))?;
        }
        Ok(())
    }

    fn build_pod(&self, pod: &Pod, node_veth: &str) -> Result<()> {
        let netns = pod.netns_name.as_str();
        let address = format!("{}/{}", pod.ip, self.subnet.prefix_len());
        ip(&["netns", "add", netns])?;
        ip(&["-n", netns, "link", "set", "lo", "up"])?;
        // The pair is made inside the pod and its peer moved straight to the node namespace,
        // so neither end ever exists in the host's namespace.
        ip(&[
            "-n",
            netns,
            "link",
            "add",
            POD_INTERFACE,
            "type",
            "veth",
            "peer",
            "name",
            node_veth,
            "netns",
            &self.node_netns,
        ])?;
        ip(&["-n", netns, "addr", "add", &address, "dev", POD_INTERFACE])?;
        ip(&["-n", netns, "link", "set", POD_INTERFACE, "up"])?;
        ip(&[
            "-n",
            &self.node_netns,
            "link",
            "set",
            node_veth,
            "master",
            BRIDGE,
        ])?;
        ip(&["-n", &self.node_netns, "link", "set", node_veth, "up"])?;
        fs::create_dir(&pod.cgroup)
            .with_context(|| format!("failed to create cgroup {}", pod.cgroup.display()))?;
        Ok(())
    }

    /// Removes everything under this topology's names, ignoring what does not exist, and
    /// returns the failures.
    fn remove_all(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.test_cgroup.exists() {
            if let Err(error) = kill_cgroup(&self.test_cgroup) {
                errors.push(format!("{error:#}"));
            }
        }
        let existing = list_netns().unwrap_or_else(|error| {
            errors.push(format!("{error:#}"));
            Vec::new()
        });
        let pod_namespaces = self.pods.iter().map(|pod| pod.netns_name.as_str());
        // Deleting a pod namespace removes its veth pair, and the node namespace goes last.
        for netns in pod_namespaces.chain([self.node_netns.as_str()]) {
            if existing.iter().any(|name| name == netns) {
                if let Err(error) = delete_netns(netns) {
                    errors.push(format!("{error:#}"));
                }
            }
        }
        if self.test_cgroup.exists() {
            if let Err(error) = remove_cgroups(&self.test_cgroup) {
                errors.push(format!("{error:#}"));
            }
        }
        if self.bpf_pin_dir.exists() {
            if let Err(error) = fs::remove_dir_all(&self.bpf_pin_dir) {
                errors.push(format!(
                    "failed to remove {}: {error}",
                    self.bpf_pin_dir.display()
                ));
            }
        }
        errors
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let errors = self.remove_all();
        release(&self.prefix, self.subnet);
        if errors.is_empty() {
            return;
        }
        let message = format!(
            "cleanup of topology `{}` failed: {}",
            self.prefix,
            errors.join("; ")
        );
        if thread::panicking() {
            eprintln!("{message}");
        } else {
            panic!("{message}");
        }
    }
}

impl Pod {
    /// Builds a command that runs `program` inside the pod's network namespace and cgroup.
    /// A shell moves itself into the cgroup, then execs `ip netns exec`, which execs
    /// `program`, so the child's process id stays the program's. Arguments added to the
    /// returned command go to `program`.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"echo $$ > "$1/cgroup.procs" && netns="$2" && shift 2 && exec ip netns exec "$netns" "$@""#)
            .arg("sh")
            .arg(&self.cgroup)
            .arg(&self.netns_name)
            .arg(program);
        command
    }

    /// Runs `f` on a thread that has joined the pod's network namespace, so sockets that
    /// `f` makes belong to the pod. The thread stays in the test's own cgroup.
    pub fn in_netns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.netns_path, f)
    }
}

/// Runs `f` on a new thread that has joined the network namespace at `netns_path`
/// (such as `/run/netns/NAME`). Only that thread changes namespace.
pub fn in_netns<T: Send>(netns_path: &Path, f: impl FnOnce() -> T + Send) -> Result<T> {
    let netns = File::open(netns_path)
        .with_context(|| format!("failed to open network namespace {}", netns_path.display()))?;
    thread::scope(|scope| {
        let worker = scope.spawn(move || {
            nix::sched::setns(&netns, CloneFlags::CLONE_NEWNET).with_context(|| {
                format!("failed to join network namespace {}", netns_path.display())
            })?;
            Ok(f())
        });
        worker
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Finds where cgroup v2 is mounted, from /proc/self/mountinfo: `/sys/fs/cgroup` on most
/// systems, `/sys/fs/cgroup/unified` on hosts with the hybrid layout.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    for line in mountinfo.lines() {
        let Some((mount, source)) = line.split_once(" - ") else {
            continue;
        };
        if source.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        if let Some(mount_point) = mount.split_whitespace().nth(4) {
            // The kernel writes a space in a path as `\040`, and cgroup mounts have none.
            return Ok(PathBuf::from(mount_point.replace("\\040", " ")));
        }
    }
    bail!("no cgroup2 mount in /proc/self/mountinfo: the tests need cgroup v2")
}

/// Fails unless the process runs as root, which namespaces, cgroups and eBPF need.
pub fn require_root() -> Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and cgroups and must run as root, \
         e.g. `sudo -E cargo xtask test`"
    );
    Ok(())
}

fn validate_names(prefix: &str, pods: &[&str]) -> Result<()> {
    let valid = |name: &str, extra: &[char]| {
        (1..=MAX_NAME_LEN).contains(&name.len())
            && name.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || extra.contains(&c)
            })
    };
    ensure!(
        valid(prefix, &['-']),
        "invalid topology prefix `{prefix}`: expected 1 to {MAX_NAME_LEN} of a-z, 0-9, `_` and `-`"
    );
    ensure!(
        (1..=MAX_PODS).contains(&pods.len()),
        "invalid pod count {}: expected 1 to {MAX_PODS}",
        pods.len()
    );
    let mut seen = HashSet::new();
    for pod in pods {
        ensure!(
            valid(pod, &[]) && *pod != "node",
            "invalid pod name `{pod}`: expected 1 to {MAX_NAME_LEN} of a-z, 0-9 and `_`, and not `node`"
        );
        ensure!(seen.insert(*pod), "duplicate pod name `{pod}`");
    }
    Ok(())
}

/// Reserves `prefix` in this process and picks the topology's /24 in 10.0.0.0/8 from a
/// hash of the process id and the prefix, probing past subnets already in use here.
fn reserve(prefix: &str) -> Result<Ipv4Net> {
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    ensure!(
        !reserved.prefixes.iter().any(|used| used == prefix),
        "topology prefix `{prefix}` is already in use in this process: give each test its own"
    );
    let mut hasher = DefaultHasher::new();
    (std::process::id(), prefix).hash(&mut hasher);
    let start = hasher.finish() as u16;
    for offset in 0..=u16::MAX {
        let [a, b] = start.wrapping_add(offset).to_be_bytes();
        let subnet =
            Ipv4Net::new(Ipv4Addr::new(10, a, b, 0), 24).expect("24 is a valid prefix length");
        if !reserved.subnets.contains(&subnet) {
            reserved.prefixes.push(prefix.to_owned());
            reserved.subnets.push(subnet);
            return Ok(subnet);
        }
    }
    Err(anyhow!(
        "every /24 in 10.0.0.0/8 is in use by topologies of this process"
    ))
}

fn release(prefix: &str, subnet: Ipv4Net) {
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    reserved.prefixes.retain(|used| used != prefix);
    reserved.subnets.retain(|used| *used != subnet);
}

fn host_address(subnet: Ipv4Net, host: usize) -> Ipv4Addr {
    let host = u32::try_from(host).expect("pod count is validated");
    Ipv4Addr::from(u32::from(subnet.network()) + host)
}

/// Runs `ip` with `args` and fails with its stderr unless it exits with 0.
fn ip(args: &[&str]) -> Result<String> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("failed to run `ip`: install iproute2 (`cargo xtask setup` does)")?;
    ensure!(
        output.status.success(),
        "`ip {}` failed with {}: {}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// Lists network namespace names; `ip netns list` prints lines like `tm-1-a-b (id: 3)`.
fn list_netns() -> Result<Vec<String>> {
    let listing = ip(&["netns", "list"])?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// Kills the processes left in a namespace, such as ones started with `ip netns exec`
/// outside the pod cgroups, then deletes the namespace's name.
fn delete_netns(name: &str) -> Result<()> {
    let own_pid = std::process::id() as i32;
    for pid in ip(&["netns", "pids", name])?
        .split_whitespace()
        .filter_map(|pid| pid.parse().ok())
    {
        if pid != own_pid {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    ip(&["netns", "delete", name])?;
    Ok(())
}

/// Kills every process in a cgroup subtree with `cgroup.kill` (Linux 5.14) and waits
/// until the kernel reports the subtree empty.
pub(crate) fn kill_cgroup(cgroup: &Path) -> Result<()> {
    let kill_file = cgroup.join("cgroup.kill");
    fs::write(&kill_file, "1")
        .with_context(|| format!("failed to write {}", kill_file.display()))?;
    let events = cgroup.join("cgroup.events");
    let deadline = Instant::now() + Duration::from_secs(5);
    while fs::read_to_string(&events).is_ok_and(|text| text.contains("populated 1")) {
        ensure!(
            Instant::now() < deadline,
            "processes of cgroup {} still run 5 s after SIGKILL",
            cgroup.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Removes the test cgroup tree. A process started with `Pod::command` just before the
/// topology is dropped may join its pod cgroup after the first kill, so rmdir is retried
/// after another kill.
pub(crate) fn remove_cgroups(test_cgroup: &Path) -> Result<()> {
    let mut attempt = 1;
    loop {
        match remove_cgroup_tree(test_cgroup) {
            Ok(()) => return Ok(()),
            Err(error) if attempt == 3 => return Err(error),
            Err(_) => kill_cgroup(test_cgroup)?,
        }
        attempt += 1;
    }
}

/// Removes a cgroup and its descendants, children first, because rmdir only removes a
/// cgroup that has none.
fn remove_cgroup_tree(cgroup: &Path) -> Result<()> {
    let entries =
        fs::read_dir(cgroup).with_context(|| format!("failed to read {}", cgroup.display()))?;
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    fs::remove_dir(cgroup).with_context(|| format!("failed to remove cgroup {}", cgroup.display()))
}
