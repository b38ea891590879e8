//! Errors of the steering module.

use std::{io, net::Ipv4Addr, path::PathBuf};

/// Next step when the kernel rejects a program, a map or an attachment.
const KERNEL_HINT: &str = "check that the kernel is 5.15 or later and that the agent runs as \
                           root or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN";

/// An error while loading, attaching or updating the eBPF steering programs.
///
/// Each message includes the full cause, so the `error` fields are not exposed as
/// [`std::error::Error::source`], and a report that walks the chain shows it once.
#[derive(Debug, thiserror::Error)]
pub enum SteeringError {
    #[error("failed to read mount table {path}: {}", chain(&.error))]
    ReadMountTable { path: PathBuf, error: io::Error },

    #[error(
        "no cgroup2 file system found in /proc/self/mountinfo; mount cgroup v2, for example \
         with `mount -t cgroup2 none /sys/fs/cgroup`"
    )]
    NoCgroup2Mount,

    #[error(
        "failed to mount bpffs at /sys/fs/bpf: {}; run the agent as root or with \
         CAP_SYS_ADMIN, or mount it first with `mount -t bpf bpf /sys/fs/bpf`",
        chain(&.error)
    )]
    MountBpffs { error: nix::Error },

    #[error(
        "bpffs_dir {path} is not on a bpf file system; choose a folder under a bpffs mount \
         such as /sys/fs/bpf"
    )]
    NotOnBpffs { path: PathBuf },

    #[error("failed to create or read pin folder {path}: {}", chain(&.error))]
    PinFolder { path: PathBuf, error: io::Error },

    #[error("pods_cgroup {path} must be an absolute path")]
    RelativeCgroupPath { path: PathBuf },

    #[error(
        "failed to open pods_cgroup {path}: {}; check that the cgroup exists on the \
         cgroup v2 hierarchy{}",
        chain(&.error), cgroup2_hint(.cgroup2_mount)
    )]
    OpenCgroup {
        path: PathBuf,
        cgroup2_mount: Option<PathBuf>,
        error: io::Error,
    },

    #[error(
        "pods_cgroup {path} is not on a cgroup v2 file system{}; use a cgroup under that mount",
        cgroup2_hint(.cgroup2_mount)
    )]
    NotCgroup2 {
        path: PathBuf,
        cgroup2_mount: Option<PathBuf>,
    },

    #[error(
        "cannot find the agent's own cgroup v2 folder: {detail}; check that cgroup v2 is mounted"
    )]
    OwnCgroup { detail: String },
    #[error("{count} intercept and exclude networks configured, the maximum is {max}")]
    TooManyNetworks { count: usize, max: u32 },
    #[error("invalid intercept port 0; use ports from 1 to 65535")]
    InvalidInterceptPort,

    #[error("{count} intercept ports configured, the maximum is {max}")]
    TooManyInterceptPorts { count: usize, max: u32 },

    #[error("invalid outbound listener port 0 for netns cookie {netns_cookie}")]
    InvalidOutboundPort { netns_cookie: u64 },

    #[error(
        "pinned map {path} does not match this agent ({detail}); an earlier agent version \
         left it, so remove the old pins with the agent's uninstall command and start again"
    )]
    PinnedMapMismatch { path: PathBuf, detail: String },

    #[error(
        "failed to load the eBPF object with maps pinned in {pin_dir}: {}; {KERNEL_HINT}",
        chain(&.error)
    )]
    LoadObject {
        pin_dir: PathBuf,
        error: aya::EbpfError,
    },

    #[error(
        "the eBPF object has no {kind} named {name}; the agent was built from a mismatched eBPF crate"
    )]
    MissingObject {
        kind: &'static str,
        name: &'static str,
    },

    #[error(
        "the kernel verifier rejected eBPF program {program}: {}; {KERNEL_HINT}\n\
         verifier log:\n{verifier_log}",
        chain(&.error)
    )]
    Verifier {
        program: &'static str,
        error: io::Error,
        verifier_log: String,
    },

    #[error("failed to {action} eBPF program {program}: {}; {KERNEL_HINT}", chain(&.error))]
    Program {
        program: &'static str,
        action: &'static str,
        error: aya::programs::ProgramError,
    },

    #[error(
        "failed to attach {program} to cgroup {cgroup}: {}; check that the cgroup is \
         on cgroup v2, and {KERNEL_HINT}",
        chain(&.error)
    )]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        error: aya::programs::ProgramError,
    },

    #[error(
        "failed to attach {program} to network namespace {netns}: {}; check that the \
         namespace still exists, and {KERNEL_HINT}",
        chain(&.error)
    )]
    AttachNetns {
        program: &'static str,
        netns: PathBuf,
        error: aya::programs::ProgramError,
    },

    #[error(
        "the kernel attached {program} without a BPF link, so it cannot be pinned: {}; \
         steering needs kernel 5.15 or later",
        chain(&.error)
    )]
    LinkNotPinnable {
        program: &'static str,
        error: aya::programs::links::LinkError,
    },

    #[error("failed to read link info of {program}: {}", chain(&.error))]
    LinkInfo {
        program: &'static str,
        error: aya::programs::links::LinkError,
    },

    #[error("failed to pin link at {path}: {}; check that bpffs is mounted there", chain(&.error))]
    PinLink {
        path: PathBuf,
        error: aya::pin::PinError,
    },

    #[error("failed to remove pin {path}: {}", chain(&.error))]
    RemovePin { path: PathBuf, error: io::Error },

    #[error("failed to update map {map} ({entry}): {}", chain(&.error))]
    Map {
        map: &'static str,
        entry: String,
        error: aya::maps::MapError,
    },

    #[error(
        "failed to put the inbound listener for {addr} into SOCKMAP slot {slot}: {}; \
         the socket must be a listening TCP socket",
        chain(&.error)
    )]
    InboundSocket {
        addr: Ipv4Addr,
        slot: u32,
        error: aya::maps::MapError,
    },

    #[error(
        "no free inbound SOCKMAP slot for {addr}: all {max} slots are in use; unprotect \
         the pods that are gone"
    )]
    NoInboundSlot { addr: Ipv4Addr, max: u32 },

    #[error(
        "{addr} is protected in network namespace cookie {existing}, not in {requested}; \
         unprotect it there first"
    )]
    AddressInOtherNetns {
        addr: Ipv4Addr,
        existing: u64,
        requested: u64,
    },

    #[error("{addr} is not protected in network namespace {netns}")]
    NotProtected { addr: Ipv4Addr, netns: PathBuf },
}

/// Formats `error` and each of its causes, separated by ": ".
fn chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut cause = error.source();
    while let Some(error) = cause {
        message.push_str(": ");
        message.push_str(&error.to_string());
        cause = error.source();
    }
    message
}

fn cgroup2_hint(mount: &Option<PathBuf>) -> String {
    match mount {
        Some(mount) => format!(" (cgroup v2 is mounted at {})", mount.display()),
        None => " (no cgroup v2 mount found)".to_string(),
    }
}
