//! `cargo xtask cleanup`: removes what end-to-end test runs left behind when they were
//! killed before their fixtures could clean up. Test fixtures name everything after the
//! test process id: network namespaces `tm-<pid>-…`, cgroups, bpffs folders and podman
//! containers `tokenmesh-test-<pid>-…`. Test images, `localhost/tokenmesh-test-image:<pid>`,
//! carry the id of the xtask process that built them. Leftovers of a process that still
//! runs are kept unless `--all` is given.
//!
//! The cgroup and namespace helpers repeat a few lines of the e2e topology fixture on
//! purpose: depending on `tokenmesh-e2e` would build the agent, whose build script needs
//! the bpf-linker that `cargo xtask setup` installs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::{command, image};

const NETNS_PREFIX: &str = "tm-";
const TEST_DIR_PREFIX: &str = "tokenmesh-test-";
const BPFFS: &str = "/sys/fs/bpf";

pub fn run(all: bool) -> Result<()> {
    let cgroup_root = cgroup2_mount()?;
    let cgroups = leftovers(&list_dir(&cgroup_root)?, TEST_DIR_PREFIX, all);
    let namespaces = leftovers(&list_netns()?, NETNS_PREFIX, all);
    let pin_dirs = leftovers(&list_dir(Path::new(BPFFS))?, TEST_DIR_PREFIX, all);
    let containers = leftovers(&list_podman(CONTAINER_NAMES)?, TEST_DIR_PREFIX, all);
    let image_prefix = format!("{}:", image::TEST_REPOSITORY);
    let images = leftovers(&list_podman(IMAGE_NAMES)?, &image_prefix, all);

    let mut errors = Vec::new();
    for name in &cgroups {
        let cgroup = cgroup_root.join(name);
        println!(
            "cleanup: killing the processes of cgroup {}",
            cgroup.display()
        );
        if let Err(error) = kill_cgroup(&cgroup) {
            errors.push(error);
        }
    }
    for name in &namespaces {
        println!("cleanup: deleting network namespace {name}");
        if let Err(error) = delete_netns(name) {
            errors.push(error);
        }
    }
    for name in &cgroups {
        let cgroup = cgroup_root.join(name);
        println!("cleanup: removing cgroup {}", cgroup.display());
        if let Err(error) = remove_cgroup_tree(&cgroup) {
            errors.push(error);
        }
    }
    for name in &pin_dirs {
        let dir = Path::new(BPFFS).join(name);
        println!("cleanup: removing bpffs folder {}", dir.display());
        if let Err(error) = fs::remove_dir_all(&dir) {
            errors.push(anyhow::anyhow!(
                "failed to remove {}: {error}",
                dir.display()
            ));
        }
    }

    for name in &containers {
        println!("cleanup: removing podman container {name}");
        if let Err(error) = command::output(Command::new("podman").args(["rm", "--force", name])) {
            errors.push(error);
        }
    }

    // After the containers, because `podman rmi` fails for an image that a container uses.
    for tag in &images {
        println!("cleanup: removing test image {tag}");
        if let Err(error) = image::remove(tag) {
            errors.push(error);
        }
    }

    let removed =
        cgroups.len() + namespaces.len() + pin_dirs.len() + containers.len() + images.len();
    if removed == 0 {
        println!("cleanup: nothing to remove");
    }
    if !errors.is_empty() {
        for error in &errors {
            eprintln!("cleanup: {error:#}");
        }
        bail!("cleanup failed for {} item(s)", errors.len());
    }
    Ok(())
}

/// Selects the names with `prefix`, keeping those whose owner process still runs
/// unless `all` is set.
fn leftovers(names: &[String], prefix: &str, all: bool) -> Vec<String> {
    let mut selected = Vec::new();
    for name in names {
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        match owner_pid(rest) {
            Some(pid) if !all && Path::new("/proc").join(pid.to_string()).exists() => {
                println!("cleanup: keeping {name}, its test process {pid} is still running");
            }
            _ => selected.push(name.clone()),
        }
    }
    selected
}

/// Parses the process id at the start of a name's suffix, such as `4242-outbound-a`.
fn owner_pid(suffix: &str) -> Option<u32> {
    let digits = suffix.split('-').next()?;
    digits.parse().ok()
}

fn list_dir(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let entries = fs::read_dir(dir).with_context(|| format!("failed to read {}", dir.display()))?;
    let mut names = Vec::new();
    for entry in entries {
        names.push(entry?.file_name().to_string_lossy().into_owned());
    }
    Ok(names)
}

/// Lists network namespace names from `ip netns list`, whose lines look like `tm-1-a (id: 3)`.
fn list_netns() -> Result<Vec<String>> {
    let listing = command::output(Command::new("ip").args(["netns", "list"]))?;
    Ok(listing
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect())
}

/// `podman` arguments that list every container by name, one a line.
const CONTAINER_NAMES: &[&str] = &["ps", "--all", "--format", "{{.Names}}"];
/// `podman` arguments that list every image as `repository:tag`, one a line.
const IMAGE_NAMES: &[&str] = &["images", "--format", "{{.Repository}}:{{.Tag}}"];

/// Runs a podman listing and returns its lines, or none when podman is not installed.
fn list_podman(args: &[&str]) -> Result<Vec<String>> {
    if command::find_program("podman").is_none() {
        return Ok(Vec::new());
    }
    let listing = command::output(Command::new("podman").args(args))?;
    Ok(listing.lines().map(str::to_owned).collect())
}

/// Kills the processes left in a namespace, then deletes its name, which frees it and
/// its veth devices.
fn delete_netns(name: &str) -> Result<()> {
    let pids = command::output(Command::new("ip").args(["netns", "pids", name]))?;
    for pid in pids
        .split_whitespace()
        .filter_map(|pid| pid.parse::<i32>().ok())
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    command::output(Command::new("ip").args(["netns", "delete", name]))?;
    Ok(())
}

/// Kills every process in a cgroup subtree and waits until the subtree is empty.
fn kill_cgroup(cgroup: &Path) -> Result<()> {
    let kill_file = cgroup.join("cgroup.kill");
    if kill_file.exists() {
        // cgroup.kill (Linux 5.14) sends SIGKILL to the whole subtree at once.
        fs::write(&kill_file, "1")
            .with_context(|| format!("failed to write {}", kill_file.display()))?;
    } else {
        for dir in cgroup_tree(cgroup)? {
            let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|pid| pid.parse::<i32>().ok()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let events = cgroup.join("cgroup.events");
    while fs::read_to_string(&events).is_ok_and(|text| text.contains("populated 1")) {
        if Instant::now() > deadline {
            bail!(
                "processes of {} are still running 5 s after SIGKILL",
                cgroup.display()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Removes a cgroup and its descendants, deepest first, because rmdir only removes a
/// cgroup without children.
fn remove_cgroup_tree(cgroup: &Path) -> Result<()> {
    for dir in cgroup_tree(cgroup)?.iter().rev() {
        fs::remove_dir(dir)
            .with_context(|| format!("failed to remove cgroup {}", dir.display()))?;
    }
    Ok(())
}

/// Lists a cgroup and its descendants, parents before children.
fn cgroup_tree(cgroup: &Path) -> Result<Vec<PathBuf>> {
    let mut tree = vec![cgroup.to_path_buf()];
    let mut next = 0;
    while next < tree.len() {
        let dir = tree[next].clone();
        next += 1;
        for entry in
            fs::read_dir(&dir).with_context(|| format!("failed to read {}", dir.display()))?
        {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                tree.push(entry.path());
            }
        }
    }
    Ok(tree)
}

/// Finds where cgroup v2 is mounted, from /proc/self/mountinfo: `/sys/fs/cgroup` on most
/// systems, `/sys/fs/cgroup/unified` on hybrid ones.
fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .context("failed to read /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(cgroup2_mount_point)
        .context("no cgroup2 mount in /proc/self/mountinfo: tokenmesh needs cgroup v2")
}

/// Returns the mount point of a mountinfo line whose file system type is cgroup2.
fn cgroup2_mount_point(line: &str) -> Option<PathBuf> {
    let (mount, source) = line.split_once(" - ")?;
    if source.split_whitespace().next()? != "cgroup2" {
        return None;
    }
    // The kernel escapes space, tab, newline and backslash in paths as octal `\ooo`.
    let escaped = mount.split_whitespace().nth(4)?;
    let mut path = String::new();
    let mut chars = escaped.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            path.push(c);
            continue;
        }
        let octal: String = chars.by_ref().take(3).collect();
        path.push(u8::from_str_radix(&octal, 8).ok()? as char);
    }
    Some(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup2_mount_point_hybrid_layout() {
        let line = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";
        assert_eq!(
            cgroup2_mount_point(line),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn cgroup2_mount_point_unescapes_space() {
        let line = "41 31 0:38 / /mnt/cg\\040two rw - cgroup2 none rw";
        assert_eq!(
            cgroup2_mount_point(line),
            Some(PathBuf::from("/mnt/cg two"))
        );
    }

    #[test]
    fn cgroup2_mount_point_skips_v1() {
        let line = "35 31 0:30 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu";
        assert_eq!(cgroup2_mount_point(line), None);
    }

    #[test]
    fn owner_pid_from_names() {
        assert_eq!(owner_pid("4242-outbound-a"), Some(4242));
        assert_eq!(owner_pid("4242"), Some(4242));
        assert_eq!(owner_pid("node-a"), None);
    }
}
