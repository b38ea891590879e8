//! Steering: loads the eBPF programs that move pod traffic into the agent, attaches them,
//! and keeps their maps in step with the pods of the node.
//!
//! - `cgroup/connect4` and `sockops`, attached to the pods' parent cgroup, redirect the
//!   connects of enrolled pods to intercepted ports to the pod's outbound listener on
//!   127.0.0.1, and record each original destination for [`Steering::take_original_dst`].
//! - `sk_lookup`, attached to each protected pod's network namespace, hands SYNs for a
//!   protected (address, port) to the agent's inbound listener in that namespace.
//!
//! Maps and links are pinned under `bpffs_dir`, so the programs stay attached when the
//! agent exits. With the agent's listeners closed, an intercepted connect goes to a
//! closed port and an inbound SYN to a protected port is dropped with a RST: both are
//! refused, and no connection bypasses the proxy. [`Steering::shutdown`] with
//! [`OnExit::Detach`] or [`uninstall`] removes the pins and lets traffic flow directly.

mod error;
mod inbound;
mod mounts;
mod outbound;
mod pins;

use std::{
    fs::File,
    path::{Path, PathBuf},
    sync::Mutex,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup, SockOps,
        links::{FdLink, LinkError},
    },
};
use ipnet::Ipv4Net;
use tokenmesh_ebpf::{
    ConnKey, MAX_INTERCEPT_NETS, MAX_INTERCEPT_PORTS, OriginalDst, PROGRAM_CONNECT4,
    PROGRAM_SK_LOOKUP, PROGRAM_SOCKOPS, PodSteering,
};

pub use error::SteeringError;
pub use mounts::cgroup2_mount;
pub use pins::uninstall;

/// The eBPF object that `build.rs` compiles from the `agent-ebpf` crate.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tokenmesh-ebpf"));

/// Steering settings: the pin folder, the pods' parent cgroup and the intercepted ports.
#[derive(Clone, Debug)]
pub struct SteeringSettings {
    /// Folder on bpffs for the map and link pins, created when missing.
    pub bpffs_dir: PathBuf,
    /// Absolute path of the cgroup v2 folder that contains every pod's cgroup.
    pub pods_cgroup: PathBuf,
    /// Destination ports whose outbound connections are steered into the agent.
    pub intercept_ports: Vec<u16>,
    /// Destination networks that are steered; empty means every destination.
    pub intercept_networks: Vec<Ipv4Net>,
    /// Destination networks that are never steered. Where an intercepted and an excluded
    /// network overlap, the longer prefix decides, and an exclusion wins a tie.
    pub exclude_networks: Vec<Ipv4Net>,
}

/// Action of [`Steering::shutdown`] on the attached programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Leave programs attached and maps pinned, so intercepted connections are refused
    /// until the agent starts again.
    Keep,
    /// Detach every program and remove every pin, so traffic flows directly.
    Detach,
}

/// The loaded and attached steering programs and their maps.
///
/// Dropping it has the effect of `shutdown(OnExit::Keep)`.
pub struct Steering {
    bpffs_dir: PathBuf,
    pods: Mutex<HashMap<MapData, u64, PodSteering>>,
    original_dst: Mutex<HashMap<MapData, ConnKey, OriginalDst>>,
    inbound: Mutex<inbound::InboundState>,
}

impl Steering {
    /// Loads the programs with their maps pinned under `bpffs_dir`, attaches
    /// `cgroup/connect4` and `sockops` to `pods_cgroup`, and fills the intercepted ports.
    ///
    /// Links pinned by an earlier run are replaced only after the new ones are attached
    /// and pinned, so there is no moment without steering.
    pub fn start(settings: &SteeringSettings) -> Result<Steering, SteeringError> {
        check_settings(settings)?;
        let bpffs_dir = settings.bpffs_dir.as_path();
        let links_dir = pins::links_dir(bpffs_dir);

        let cgroup = open_cgroup(&settings.pods_cgroup)?;
        mounts::ensure_bpffs_mounted()?;
        mounts::check_on_bpffs(bpffs_dir)?;
        std::fs::create_dir_all(&links_dir).map_err(|error| SteeringError::PinFolder {
            path: links_dir.clone(),
            error,
        })?;
        pins::check_pinned_maps(bpffs_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(bpffs_dir)
            .load(EBPF_OBJECT)
            .map_err(|error| SteeringError::LoadObject {
                pin_dir: bpffs_dir.to_path_buf(),
                error,
            })?;

        let connect4: &mut CgroupSockAddr = program_mut(&mut ebpf, PROGRAM_CONNECT4)?;
        load(PROGRAM_CONNECT4, connect4.load())?;
        let sockops: &mut SockOps = program_mut(&mut ebpf, PROGRAM_SOCKOPS)?;
        load(PROGRAM_SOCKOPS, sockops.load())?;
        // sk_lookup is attached per pod by `protect_inbound`; loading it now reports a
        // verifier rejection at start.
        let sk_lookup: &mut SkLookup = program_mut(&mut ebpf, PROGRAM_SK_LOOKUP)?;
        load(PROGRAM_SK_LOOKUP, sk_lookup.load())?;

        // Maps are taken out of `ebpf` only after every program is loaded, because the
        // loader wrote the map fds into the programs, and a dropped map closes its fd.
        outbound::sync_intercept_ports(&mut ebpf, &settings.intercept_ports)?;
        outbound::set_agent_cgroup(&mut ebpf, mounts::own_cgroup_id(&settings.pods_cgroup)?)?;
        outbound::sync_intercept_networks(
            &mut ebpf,
            &settings.intercept_networks,
            &settings.exclude_networks,
        )?;

        // sockops is attached first, because a connect that connect4 redirects before
        // sockops runs would leave no original destination for the proxy.
        let sockops: &mut SockOps = program_mut(&mut ebpf, PROGRAM_SOCKOPS)?;
        let sockops_link = cgroup_link(PROGRAM_SOCKOPS, settings, || {
            let link_id = sockops.attach(&cgroup, CgroupAttachMode::Single)?;
            sockops.take_link(link_id)
        })?;
        let connect4: &mut CgroupSockAddr = program_mut(&mut ebpf, PROGRAM_CONNECT4)?;
        let connect4_link = cgroup_link(PROGRAM_CONNECT4, settings, || {
            let link_id = connect4.attach(&cgroup, CgroupAttachMode::Single)?;
            connect4.take_link(link_id)
        })?;

        // Make before break: the new links are attached and pinned before the pins of
        // an earlier run are removed.
        let mut replaced = 0;
        for (link, kind, program) in [
            (sockops_link, pins::SOCKOPS_KIND, PROGRAM_SOCKOPS),
            (connect4_link, pins::CONNECT4_KIND, PROGRAM_CONNECT4),
        ] {
            let pin = pins::pin_link(link, &links_dir, kind, program)?;
            replaced += pins::remove_link_pins(&links_dir, kind, Some(&pin))?;
        }

        let pods = outbound::take_hash_map(&mut ebpf, tokenmesh_ebpf::MAP_PODS)?;
        let original_dst = outbound::take_hash_map(&mut ebpf, tokenmesh_ebpf::MAP_ORIGINAL_DST)?;
        let inbound = inbound::InboundState::new(ebpf, links_dir)?;

        tracing::info!(
            bpffs_dir = %bpffs_dir.display(),
            pods_cgroup = %settings.pods_cgroup.display(),
            intercept_ports = ?settings.intercept_ports,
            replaced_links = replaced,
            "steering programs attached and pinned"
        );
        Ok(Steering {
            bpffs_dir: bpffs_dir.to_path_buf(),
            pods: Mutex::new(pods),
            original_dst: Mutex::new(original_dst),
            inbound: Mutex::new(inbound),
        })
    }

    /// Closes the agent's handles. With [`OnExit::Keep`] the programs stay attached, so
    /// intercepted connections are refused until the next start; with
    /// [`OnExit::Detach`] every program is detached and every pin removed.
    pub fn shutdown(self, on_exit: OnExit) -> Result<(), SteeringError> {
        let Steering {
            bpffs_dir,
            pods,
            original_dst,
            inbound,
        } = self;
        drop((pods, original_dst, inbound));

        match on_exit {
            OnExit::Keep => {
                tracing::info!(
                    bpffs_dir = %bpffs_dir.display(),
                    "steering handles closed; pinned programs keep refusing intercepted \
                     connections until the agent starts again"
                );
                Ok(())
            }
            OnExit::Detach => uninstall(&bpffs_dir),
        }
    }
}

fn check_settings(settings: &SteeringSettings) -> Result<(), SteeringError> {
    if !settings.pods_cgroup.is_absolute() {
        return Err(SteeringError::RelativeCgroupPath {
            path: settings.pods_cgroup.clone(),
        });
    }
    if settings.intercept_ports.contains(&0) {
        return Err(SteeringError::InvalidInterceptPort);
    }
    let networks = settings.intercept_networks.len().max(1) + settings.exclude_networks.len();
    if networks > MAX_INTERCEPT_NETS as usize {
        return Err(SteeringError::TooManyNetworks {
            count: networks,
            max: MAX_INTERCEPT_NETS,
        });
    }
    if settings.intercept_ports.len() > MAX_INTERCEPT_PORTS as usize {
        return Err(SteeringError::TooManyInterceptPorts {
            count: settings.intercept_ports.len(),
            max: MAX_INTERCEPT_PORTS,
        });
    }
    Ok(())
}

fn open_cgroup(path: &Path) -> Result<File, SteeringError> {
    let cgroup = File::open(path).map_err(|error| SteeringError::OpenCgroup {
        path: path.to_path_buf(),
        cgroup2_mount: cgroup2_mount().ok(),
        error,
    })?;
    mounts::check_on_cgroup2(path)?;
    Ok(cgroup)
}

fn program_mut<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, SteeringError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(SteeringError::MissingObject {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|error| program_error(name, "use", error))
}

/// Turns a load failure into an error that carries the verifier log.
fn load(program: &'static str, result: Result<(), ProgramError>) -> Result<(), SteeringError> {
    result.map_err(|error| match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => SteeringError::Verifier {
            program,
            error: io_error,
            verifier_log: verifier_log.to_string(),
        },
        other => program_error(program, "load", other),
    })
}

fn program_error(
    program: &'static str,
    action: &'static str,
    error: ProgramError,
) -> SteeringError {
    SteeringError::Program {
        program,
        action,
        error,
    }
}

/// Runs `attach`, which attaches `program` to the pods' cgroup and takes the link, and
/// turns that link into one that can be pinned.
fn cgroup_link<L>(
    program: &'static str,
    settings: &SteeringSettings,
    attach: impl FnOnce() -> Result<L, ProgramError>,
) -> Result<FdLink, SteeringError>
where
    FdLink: TryFrom<L, Error = LinkError>,
{
    let link = attach().map_err(|error| SteeringError::AttachCgroup {
        program,
        cgroup: settings.pods_cgroup.clone(),
        error,
    })?;
    FdLink::try_from(link).map_err(|error| SteeringError::LinkNotPinnable { program, error })
}

/// Checks whether a map operation failed because the key does not exist.
fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(syscall) => syscall.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Locks `mutex`, also after a panic in another holder, because steering must keep
/// working for the other pods. Each map update is one syscall, and the inbound
/// bookkeeping is written only after its map updates succeed.
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pods_cgroup: &str, intercept_ports: Vec<u16>) -> SteeringSettings {
        SteeringSettings {
            bpffs_dir: "/sys/fs/bpf/tokenmesh-unit".into(),
            pods_cgroup: pods_cgroup.into(),
            intercept_ports,
            intercept_networks: Vec::new(),
            exclude_networks: Vec::new(),
        }
    }

    #[test]
    fn settings_reject_relative_cgroup() {
        let error = check_settings(&settings("pods", vec![80])).unwrap_err();

        assert!(
            matches!(&error, SteeringError::RelativeCgroupPath { path } if path == Path::new("pods")),
            "error: {error}"
        );
    }

    #[test]
    fn settings_reject_port_zero() {
        let error = check_settings(&settings("/sys/fs/cgroup/pods", vec![80, 0])).unwrap_err();

        assert!(
            matches!(error, SteeringError::InvalidInterceptPort),
            "error: {error}"
        );
    }

    #[test]
    fn settings_reject_too_many_ports() {
        let ports = (1..=MAX_INTERCEPT_PORTS as u16 + 1).collect();

        let error = check_settings(&settings("/sys/fs/cgroup/pods", ports)).unwrap_err();

        assert!(
            matches!(
                error,
                SteeringError::TooManyInterceptPorts { count, max }
                    if count == MAX_INTERCEPT_PORTS as usize + 1 && max == MAX_INTERCEPT_PORTS
            ),
            "error: {error}"
        );
    }

    #[test]
    fn settings_accept_valid() {
        check_settings(&settings("/sys/fs/cgroup/pods", vec![80, 8080])).unwrap();
    }

    #[test]
    fn steering_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Steering>();
    }
}
