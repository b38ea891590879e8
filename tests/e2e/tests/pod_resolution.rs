//! Finding a Kubernetes pod's cgroup and network namespace, against real cgroups laid out
//! as the kubelet lays them out (cgroupfs and systemd drivers, every QoS class) below a
//! test-owned cgroup, with real processes in real network namespaces. Needs root.

use std::path::Path;

use tokenmesh_agent::workloads::cgroups::{
    CgroupDriver, QosClass, ResolveError, find_pod_cgroup, find_pod_netns, pod_cgroup_path,
};
use tokenmesh_e2e::{
    kubepods::{KubepodsRoot, PodNetwork, netns_id},
    topology::require_root,
};

const QOS_CLASSES: [QosClass; 3] = [
    QosClass::Guaranteed,
    QosClass::Burstable,
    QosClass::BestEffort,
];

fn uid(n: u32) -> String {
    format!("5e1c0a7b-2f4d-4c8e-9a6b-{n:012x}")
}

#[test]
fn both_drivers_every_qos_class() -> anyhow::Result<()> {
    require_root()?;
    let mut root = KubepodsRoot::create("qos")?;
    let mut n = 0;
    for driver in [CgroupDriver::Cgroupfs, CgroupDriver::Systemd] {
        for qos in QOS_CLASSES {
            n += 1;
            let uid = uid(n);
            let layout = pod_cgroup_path(driver, qos, &uid);
            let process = root.add_pod(&layout, "app", PodNetwork::Own)?;

            let (cgroup, found_driver) = find_pod_cgroup(root.path(), None, qos, &uid)?;
            assert_eq!(cgroup, process.cgroup, "{driver} {qos:?}");
            assert_eq!(found_driver, driver, "{driver} {qos:?}");

            let netns = find_pod_netns(&cgroup, Path::new("/proc"))?;
            assert_eq!(netns, Path::new(&format!("/proc/{}/ns/net", process.pid)));
            assert_eq!(
                netns_id(&netns)?,
                netns_id(Path::new(&format!("/proc/{}/ns/net", process.pid)))?,
                "{driver} {qos:?}"
            );
            assert_ne!(
                netns_id(&netns)?,
                netns_id(Path::new("/proc/self/ns/net"))?,
                "{driver} {qos:?}: the pod namespace must not be the test's own"
            );
        }
    }
    Ok(())
}

#[test]
fn systemd_slice_names_escape_uid() -> anyhow::Result<()> {
    require_root()?;
    let mut root = KubepodsRoot::create("escape")?;
    let uid = uid(1);
    root.add_pod(
        Path::new(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        )),
        "cri-containerd-0123abcd.scope",
        PodNetwork::Own,
    )?;
    let (cgroup, driver) = find_pod_cgroup(root.path(), None, QosClass::Burstable, &uid)?;
    assert_eq!(driver, CgroupDriver::Systemd);
    assert!(cgroup.ends_with(format!(
        "kubepods-burstable-pod{}.slice",
        uid.replace('-', "_")
    )));
    Ok(())
}

#[test]
fn configured_driver_not_matching_layout() -> anyhow::Result<()> {
    require_root()?;
    let mut root = KubepodsRoot::create("driver")?;
    let uid = uid(2);
    let layout = pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Burstable, &uid);
    root.add_pod(&layout, "app", PodNetwork::Own)?;

    let err = find_pod_cgroup(
        root.path(),
        Some(CgroupDriver::Systemd),
        QosClass::Burstable,
        &uid,
    )
    .unwrap_err();
    assert!(matches!(err, ResolveError::CgroupNotFound { .. }), "{err}");
    assert!(err.to_string().contains("kubepods-burstable-pod"), "{err}");

    let wrong_qos = find_pod_cgroup(root.path(), None, QosClass::BestEffort, &uid).unwrap_err();
    assert!(
        matches!(wrong_qos, ResolveError::CgroupNotFound { .. }),
        "{wrong_qos}"
    );
    Ok(())
}

#[test]
fn several_containers_share_pod_netns() -> anyhow::Result<()> {
    require_root()?;
    let mut root = KubepodsRoot::create("containers")?;
    let uid = uid(3);
    let layout = pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Guaranteed, &uid);
    let sandbox = root.add_pod(&layout, "sandbox", PodNetwork::Own)?;
    // A second container cgroup with a process that joins the sandbox's namespace, as
    // the container runtime does for every container of a pod.
    let app_cgroup = sandbox.cgroup.join("app");
    std::fs::create_dir(&app_cgroup)?;
    let app = root.start_process(&app_cgroup, PodNetwork::Join(sandbox.pid))?;
    let sandbox_netns = netns_id(Path::new(&format!("/proc/{}/ns/net", sandbox.pid)))?;
    assert_eq!(
        netns_id(Path::new(&format!("/proc/{app}/ns/net")))?,
        sandbox_netns
    );

    let netns = find_pod_netns(&sandbox.cgroup, Path::new("/proc"))?;
    assert_eq!(
        netns_id(&netns)?,
        netns_id(Path::new(&format!("/proc/{}/ns/net", sandbox.pid)))?
    );
    Ok(())
}

#[test]
fn host_network_process_rejected() -> anyhow::Result<()> {
    require_root()?;
    let mut root = KubepodsRoot::create("hostnet")?;
    let uid = uid(4);
    let layout = pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::BestEffort, &uid);
    let process = root.add_pod(&layout, "app", PodNetwork::Host)?;

    let err = find_pod_netns(&process.cgroup, Path::new("/proc")).unwrap_err();
    assert!(matches!(err, ResolveError::HostNetwork { .. }), "{err}");
    assert!(err.to_string().contains("never intercepted"), "{err}");
    Ok(())
}

#[test]
fn empty_pod_cgroup_has_no_netns() -> anyhow::Result<()> {
    require_root()?;
    let root = KubepodsRoot::create("empty")?;
    let uid = uid(5);
    let cgroup = root.path().join(pod_cgroup_path(
        CgroupDriver::Systemd,
        QosClass::Burstable,
        &uid,
    ));
    std::fs::create_dir_all(cgroup.join("cri-containerd-0.scope"))?;

    let (found, _) = find_pod_cgroup(root.path(), None, QosClass::Burstable, &uid)?;
    let err = find_pod_netns(&found, Path::new("/proc")).unwrap_err();
    assert!(matches!(err, ResolveError::NoProcess { .. }), "{err}");
    Ok(())
}
