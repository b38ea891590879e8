//! A kubelet-style pod cgroup tree for tests: `kubepods` (cgroupfs driver) or
//! `kubepods.slice` (systemd driver) folders below a test-owned cgroup
//! `<cgroup2>/tokenmesh-kubepods-<pid>-<prefix>`, with real processes in each pod cgroup.
//! Drop kills every process of the tree and removes it, also when the test fails.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use crate::topology::{cgroup2_mount, kill_cgroup, remove_cgroups};

/// Which network namespace a test pod's process runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodNetwork {
    /// A new network namespace made with `unshare --net`, as a pod sandbox has.
    Own,
    /// The namespace of the test process, as a `hostNetwork: true` pod has.
    Host,
    /// The namespace of another process, as a second container of a pod joins the
    /// sandbox's namespace.
    Join(u32),
}

/// A process placed in a pod's container cgroup.
pub struct PodProcess {
    pub pid: u32,
    /// The pod's cgroup (the parent of the container cgroup the process is in).
    pub cgroup: PathBuf,
}

/// The test-owned folder that stands in for the cgroup v2 root of a node.
pub struct KubepodsRoot {
    root: PathBuf,
    children: Vec<Child>,
}

impl KubepodsRoot {
    /// Creates `<cgroup2>/tokenmesh-kubepods-<pid>-<prefix>`.
    pub fn create(prefix: &str) -> Result<KubepodsRoot> {
        let root = cgroup2_mount()?.join(format!(
            "tokenmesh-kubepods-{}-{prefix}",
            std::process::id()
        ));
        fs::create_dir(&root)
            .with_context(|| format!("failed to create cgroup {}", root.display()))?;
        Ok(KubepodsRoot {
            root,
            children: Vec::new(),
        })
    }

    /// The folder to give the resolver as the node's cgroup root.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// The folder below the cgroup v2 mount, for `workloads.kubernetes.kubepods_root`.
    pub fn relative(&self) -> Result<PathBuf> {
        Ok(self.root.strip_prefix(cgroup2_mount()?)?.to_path_buf())
    }

    /// Creates the cgroup `pod_path` (relative to the root, as the kubelet names it) with
    /// one container cgroup `container` inside, and starts a process there.
    pub fn add_pod(
        &mut self,
        pod_path: &Path,
        container: &str,
        network: PodNetwork,
    ) -> Result<PodProcess> {
        let cgroup = self.root.join(pod_path);
        let container_cgroup = cgroup.join(container);
        fs::create_dir_all(&container_cgroup)
            .with_context(|| format!("failed to create cgroup {}", container_cgroup.display()))?;
        let pid = self.start_process(&container_cgroup, network)?;
        Ok(PodProcess { pid, cgroup })
    }

    /// Starts `sleep` (in a new network namespace for `PodNetwork::Own`) and moves it into
    /// `cgroup`. Returns once the process runs `sleep`, so its namespace is final.
    pub fn start_process(&mut self, cgroup: &Path, network: PodNetwork) -> Result<u32> {
        let mut command = match network {
            PodNetwork::Own => {
                let mut command = Command::new("unshare");
                command.args(["--net", "--", "sleep", "300"]);
                command
            }
            PodNetwork::Host => {
                let mut command = Command::new("sleep");
                command.arg("300");
                command
            }
            PodNetwork::Join(pid) => {
                let mut command = Command::new("nsenter");
                command.arg(format!("--net=/proc/{pid}/ns/net"));
                command.args(["--", "sleep", "300"]);
                command
            }
        };
        let child = command
            .stdin(Stdio::null())
            .spawn()
            .context("failed to start sleep (unshare and nsenter come with util-linux)")?;
        let pid = child.id();
        self.children.push(child);
        let procs = cgroup.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .with_context(|| format!("failed to move PID {pid} into {}", procs.display()))?;

        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if comm.trim() == "sleep" {
                return Ok(pid);
            }
            ensure!(
                Instant::now() < deadline,
                "PID {pid} did not exec sleep within 5 s"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for KubepodsRoot {
    fn drop(&mut self) {
        if let Err(error) = kill_cgroup(&self.root) {
            eprintln!("cleanup: {error:#}");
        }
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Err(error) = remove_cgroups(&self.root) {
            eprintln!("cleanup: {error:#}");
        }
    }
}

/// Device and inode of a network namespace file, which identify the namespace.
pub fn netns_id(path: &Path) -> Result<(u64, u64)> {
    let meta = fs::metadata(path).with_context(|| format!("failed to stat {}", path.display()))?;
    Ok((meta.dev(), meta.ino()))
}
