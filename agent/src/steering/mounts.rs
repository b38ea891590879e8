//! The mounts steering depends on: cgroup v2 for the pods' cgroup, bpffs for the pins.

use std::path::{Path, PathBuf};

use nix::{
    mount::MsFlags,
    sys::statfs::{BPF_FS_MAGIC, CGROUP2_SUPER_MAGIC, FsType, statfs},
};

use super::SteeringError;

const MOUNTINFO: &str = "/proc/self/mountinfo";
/// Mount point for bpffs when nothing mounted one, as systemd and libbpf expect.
const BPFFS_MOUNT_POINT: &str = "/sys/fs/bpf";

/// One line of `/proc/self/mountinfo`: where a file system is mounted and its type.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    mount_point: PathBuf,
    fs_type: String,
}

/// Returns the mount point of the cgroup v2 hierarchy, read from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf, SteeringError> {
    read_mounts()?
        .into_iter()
        .find(|mount| mount.fs_type == "cgroup2")
        .map(|mount| mount.mount_point)
        .ok_or(SteeringError::NoCgroup2Mount)
}

/// The cgroup v2 id of this process's cgroup: the inode number of its folder, which is
/// what `bpf_get_current_cgroup_id` returns.
///
/// `/proc/self/cgroup` gives the path relative to the process's cgroup namespace. In a
/// container with a namespace of its own (containerd's CRI plugin gives one to every
/// unprivileged container on cgroup v2) it reads `0::/`, which names no folder of the
/// node's hierarchy. So the folder is accepted only when its `cgroup.procs` lists this
/// process. Otherwise the folder that does is searched for below `pods_cgroup`, because
/// only there would the agent's own connects be steered.
pub(super) fn own_cgroup_id(pods_cgroup: &Path) -> Result<u64, SteeringError> {
    let membership =
        std::fs::read_to_string("/proc/self/cgroup").map_err(|error| SteeringError::OwnCgroup {
            detail: error.to_string(),
        })?;
    // The cgroup v2 line has hierarchy id 0 and no controller list: `0::/path`.
    let path = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| SteeringError::OwnCgroup {
            detail: "/proc/self/cgroup has no cgroup v2 line (0::PATH)".to_string(),
        })?;
    let listed = cgroup2_mount()?.join(path.trim_start_matches('/'));
    let pid = std::process::id();
    let folder = if lists_process(&listed, pid) {
        listed
    } else {
        match find_process_cgroup(pods_cgroup, pid, MAX_SEARCH_DEPTH) {
            Some(found) => {
                tracing::debug!(cgroup = %found.display(), "agent cgroup found below the pods' cgroup");
                found
            }
            // Not below the pods' cgroup: connect4 never runs for the agent.
            None => listed,
        }
    };
    let metadata = std::fs::metadata(&folder).map_err(|error| SteeringError::OwnCgroup {
        detail: format!("{}: {error}", folder.display()),
    })?;
    Ok(std::os::unix::fs::MetadataExt::ino(&metadata))
}

/// Depth of the search below the pods' cgroup: the kubelet's QoS, pod and container
/// levels are three, with room for a runtime's extra level.
const MAX_SEARCH_DEPTH: usize = 5;

/// Tells whether `cgroup.procs` of `folder` lists `pid`.
fn lists_process(folder: &Path, pid: u32) -> bool {
    std::fs::read_to_string(folder.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|line| line.trim() == pid.to_string()))
}

/// Returns the folder below `root`, down to `depth` levels, whose `cgroup.procs` lists
/// `pid`.
fn find_process_cgroup(root: &Path, pid: u32, depth: usize) -> Option<PathBuf> {
    if lists_process(root, pid) {
        return Some(root.to_path_buf());
    }
    if depth == 0 {
        return None;
    }
    std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .find_map(|entry| find_process_cgroup(&entry.path(), pid, depth - 1))
}

/// Mounts bpffs at /sys/fs/bpf unless a bpf file system is already mounted there.
pub(super) fn ensure_bpffs_mounted() -> Result<(), SteeringError> {
    let mounted = read_mounts()?
        .iter()
        .any(|mount| mount.fs_type == "bpf" && mount.mount_point == Path::new(BPFFS_MOUNT_POINT));
    if mounted {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS_MOUNT_POINT,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|error| SteeringError::MountBpffs { error })?;
    tracing::info!(mount_point = BPFFS_MOUNT_POINT, "mounted bpffs");
    Ok(())
}

/// Checks that `path`, or its nearest existing ancestor when `path` does not exist yet,
/// is on bpffs.
pub(super) fn check_on_bpffs(path: &Path) -> Result<(), SteeringError> {
    let existing = path.ancestors().find(|ancestor| ancestor.exists());
    if existing.and_then(fs_type) == Some(BPF_FS_MAGIC) {
        Ok(())
    } else {
        Err(SteeringError::NotOnBpffs {
            path: path.to_path_buf(),
        })
    }
}

/// Checks that `path` (which must exist) is on cgroup v2.
pub(super) fn check_on_cgroup2(path: &Path) -> Result<(), SteeringError> {
    if fs_type(path) == Some(CGROUP2_SUPER_MAGIC) {
        Ok(())
    } else {
        Err(SteeringError::NotCgroup2 {
            path: path.to_path_buf(),
            cgroup2_mount: cgroup2_mount().ok(),
        })
    }
}

fn fs_type(path: &Path) -> Option<FsType> {
    statfs(path).ok().map(|stat| stat.filesystem_type())
}

fn read_mounts() -> Result<Vec<Mount>, SteeringError> {
    let table =
        std::fs::read_to_string(MOUNTINFO).map_err(|error| SteeringError::ReadMountTable {
            path: MOUNTINFO.into(),
            error,
        })?;
    Ok(table.lines().filter_map(parse_mountinfo_line).collect())
}

/// Parses one mountinfo line (proc(5)): the mount point is field 5, and the file
/// system type is the first field after the lone `-` separator.
fn parse_mountinfo_line(line: &str) -> Option<Mount> {
    let mut fields = line.split(' ');
    let mount_point = fields.nth(4)?;
    let fs_type = fields.skip_while(|field| *field != "-").nth(1)?;
    Some(Mount {
        mount_point: PathBuf::from(unescape_octal(mount_point)),
        fs_type: fs_type.to_string(),
    })
}

/// Decodes the `\NNN` octal escapes the kernel writes for space, tab, newline and
/// backslash in mountinfo paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escape = bytes.get(index + 1..index + 4);
        let octal = escape.filter(|digits| {
            bytes[index] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                decoded.push(value as u8);
                index += 4;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_line_cgroup2() {
        let line = "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

        assert_eq!(
            parse_mountinfo_line(line),
            Some(Mount {
                mount_point: "/sys/fs/cgroup/unified".into(),
                fs_type: "cgroup2".into(),
            })
        );
    }

    #[test]
    fn mountinfo_line_optional_fields() {
        let line = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:7 - ext3 \
                    /dev/root rw,errors=continue";

        assert_eq!(
            parse_mountinfo_line(line),
            Some(Mount {
                mount_point: "/mnt/with space".into(),
                fs_type: "ext3".into(),
            })
        );
    }

    #[test]
    fn mountinfo_line_truncated() {
        assert_eq!(parse_mountinfo_line("36 35 98:0 /mnt1"), None);
        assert_eq!(parse_mountinfo_line("36 35 98:0 /mnt1 /mnt rw"), None);
    }

    #[test]
    fn octal_escapes_decoded() {
        assert_eq!(unescape_octal("a\\011b\\012c\\134d"), "a\tb\nc\\d");
        assert_eq!(unescape_octal("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_octal("not\\x41octal"), "not\\x41octal");
    }

    #[test]
    fn bpffs_check_rejects_missing_tmp_path() {
        let folder = tempfile::tempdir().unwrap();
        let path = folder.path().join("pins/links");

        let error = check_on_bpffs(&path).unwrap_err();

        assert!(
            matches!(&error, SteeringError::NotOnBpffs { path: reported } if *reported == path),
            "error: {error}"
        );
    }

    #[test]
    fn cgroup2_mount_found_here() {
        // Needs cgroup v2 mounted, as on every node this agent runs on.
        let mount = cgroup2_mount().unwrap();

        check_on_cgroup2(&mount).unwrap();
    }
}
