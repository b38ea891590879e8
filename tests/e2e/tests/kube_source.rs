//! The Kubernetes workload source against API responses replayed from
//! `fixtures/kube/`. No API server runs on this machine, so a small HTTP server on
//! 127.0.0.1 (`kube_replay`) takes its place. It serves the pod and namespace lists, then
//! the watch streams: add, modify, delete, bookmark, and an HTTP 410 "too old resource
//! version" error that forces a new list. The pods' cgroups and network namespaces are
//! real: kubelet-style cgroups below a test-owned cgroup, each with a process in its own
//! network namespace. Needs root.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Result, bail};
use tokenmesh_agent::workloads::{
    Pod,
    cgroups::{CgroupDriver, QosClass, pod_cgroup_path},
    kube::{self as kube_source, KubernetesSettings},
};
use tokenmesh_e2e::{
    kube_replay::{ReplayServer, Reply, Route, fixture},
    kubepods::{KubepodsRoot, PodNetwork, netns_id},
    topology::{cgroup2_mount, require_root},
};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(20);

fn uid(n: u32) -> String {
    format!("7c3f5d2a-1b4e-4f6a-9d8c-{n:012x}")
}

/// The replayed conversation. A pod list comes first, then a watch with an added, a
/// modified and a deleted pod and a bookmark, held until `gate` is notified. The watch
/// from the bookmark gets 410 Gone, and a second pod list and idle watches follow.
fn routes(gate: Arc<Notify>) -> Result<Vec<Route>> {
    Ok(vec![
        Route {
            path: "/api/v1/pods",
            watch: false,
            version: None,
            replies: vec![
                Reply::Document(fixture("pods-list-1000.json")?),
                Reply::Document(fixture("pods-list-1020.json")?),
            ],
        },
        Route {
            path: "/api/v1/pods",
            watch: true,
            version: Some("1000"),
            replies: vec![Reply::Events(
                fixture("pods-watch-from-1000.jsonl")?,
                Some(gate),
            )],
        },
        Route {
            path: "/api/v1/pods",
            watch: true,
            version: Some("1010"),
            replies: vec![Reply::Events(fixture("pods-watch-from-1010.jsonl")?, None)],
        },
        Route {
            path: "/api/v1/pods",
            watch: true,
            version: Some("1020"),
            replies: vec![Reply::Idle],
        },
        Route {
            path: "/api/v1/namespaces",
            watch: false,
            version: None,
            replies: vec![Reply::Document(fixture("namespaces-list-500.json")?)],
        },
        Route {
            path: "/api/v1/namespaces",
            watch: true,
            version: Some("500"),
            replies: vec![Reply::Idle],
        },
    ])
}

/// Pods of the fixtures that get a cgroup: (uid number, driver, QoS class as listed).
const POD_CGROUPS: [(u32, CgroupDriver, QosClass); 6] = [
    (1, CgroupDriver::Cgroupfs, QosClass::Burstable), // shop/cart-0
    (2, CgroupDriver::Systemd, QosClass::Guaranteed), // payments/ledger-0
    (3, CgroupDriver::Cgroupfs, QosClass::BestEffort), // payments/exporter-0, host network
    (5, CgroupDriver::Cgroupfs, QosClass::BestEffort), // payments/worker-0
    (6, CgroupDriver::Systemd, QosClass::Burstable),  // payments/batch-0
    (7, CgroupDriver::Cgroupfs, QosClass::Burstable), // payments/report-0
];

fn names(pods: &[Pod]) -> Vec<String> {
    pods.iter().map(|p| p.identity.to_string()).collect()
}

async fn wait_for_names(
    receiver: &mut watch::Receiver<Option<Vec<Pod>>>,
    expected: &[&str],
) -> Result<Vec<Pod>> {
    let waited = tokio::time::timeout(
        WAIT,
        receiver.wait_for(|set| set.as_deref().is_some_and(|pods| names(pods) == expected)),
    )
    .await
    .map(|found| found.map(|set| set.clone().unwrap_or_default()));
    match waited {
        Ok(Ok(set)) => Ok(set),
        Ok(Err(_)) => bail!("the Kubernetes source stopped before publishing {expected:?}"),
        Err(_) => bail!(
            "no pod set {expected:?} within {WAIT:?}; last published: {:?}",
            receiver.borrow().as_deref().map(names)
        ),
    }
}

/// Starts the Kubernetes source against `server`, with pod cgroups below `kubepods`.
fn start_source(
    server: &ReplayServer,
    kubepods: &KubepodsRoot,
    probe_exemption: bool,
    probe_extra_sources: Vec<ipnet::IpNet>,
) -> Result<(
    tokio::task::JoinHandle<()>,
    CancellationToken,
    watch::Receiver<Option<Vec<Pod>>>,
)> {
    let client = kube::Client::try_from(kube::Config::new(server.url.parse()?))?;
    let settings = KubernetesSettings {
        node_name: NODE.to_string(),
        cgroup_driver: None,
        kubepods_root: kubepods.relative()?,
        proc_path: PathBuf::from("/proc"),
        resolve_retry: Duration::from_millis(200),
        probe_exemption,
        probe_extra_sources,
        cni: None,
    };
    let (sender, receiver) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let source = tokio::spawn(kube_source::run(
        client,
        settings,
        cgroup2_mount()?,
        sender,
        None,
        shutdown.clone(),
    ));
    Ok((source, shutdown, receiver))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_watch_resync_replayed() -> Result<()> {
    require_root()?;
    let mut kubepods = KubepodsRoot::create("source")?;
    let mut pids = HashMap::new();
    for (n, driver, qos) in POD_CGROUPS {
        let network = if n == 3 {
            PodNetwork::Host
        } else {
            PodNetwork::Own
        };
        let process = kubepods.add_pod(&pod_cgroup_path(driver, qos, &uid(n)), "app", network)?;
        pids.insert(n, process);
    }

    let gate = Arc::new(Notify::new());
    let server = ReplayServer::start(routes(gate.clone())?).await?;
    let extra = vec!["10.244.1.1/32".parse()?];
    let (source, shutdown, mut receiver) = start_source(&server, &kubepods, true, extra)?;

    // The first list: cart-0 is enrolled by its annotation, ledger-0 by its namespace's
    // label. exporter-0 uses the host network, frontend-0 is not enrolled and worker-0 is
    // still Pending.
    let initial = wait_for_names(&mut receiver, &["payments/ledger-0", "shop/cart-0"]).await?;
    let ledger = &initial[0];
    assert_eq!(ledger.identity.service_account, "ledger");
    assert_eq!(ledger.ip.to_string(), "10.244.1.12");
    assert_eq!(ledger.protected_ports, vec![8080]);
    assert_eq!(ledger.labels.get("app").map(String::as_str), Some("ledger"));
    assert_eq!(ledger.credentials.as_deref(), Some("ledger-token"));
    assert_eq!(ledger.probe_exemption.ports, vec![8080]);
    assert_eq!(
        ledger.probe_exemption.sources,
        vec!["192.0.2.10/32".parse()?, "10.244.1.1/32".parse()?]
    );
    assert_eq!(
        ledger.cgroup,
        kubepods.path().join(pod_cgroup_path(
            CgroupDriver::Systemd,
            QosClass::Guaranteed,
            &uid(2)
        ))
    );
    assert_eq!(
        netns_id(&ledger.netns)?,
        netns_id(Path::new(&format!("/proc/{}/ns/net", pids[&2].pid)))?
    );
    let cart = &initial[1];
    assert_eq!(cart.cgroup, pids[&1].cgroup);
    assert_eq!(cart.credentials, None);

    // The watch: batch-0 added, worker-0 now Running, cart-0 deleted, then a bookmark.
    gate.notify_one();
    let watched = wait_for_names(
        &mut receiver,
        &["payments/batch-0", "payments/ledger-0", "payments/worker-0"],
    )
    .await?;
    assert_eq!(watched[2].cgroup, pids[&5].cgroup);
    assert_eq!(watched[0].cgroup, pids[&6].cgroup);

    // The next watch starts at the bookmark's version and gets 410 Gone; the new list has
    // report-0, and batch-0 was deleted while no watch ran.
    let resynced = wait_for_names(
        &mut receiver,
        &[
            "payments/ledger-0",
            "payments/report-0",
            "payments/worker-0",
        ],
    )
    .await?;
    assert_eq!(resynced[1].cgroup, pids[&7].cgroup);

    // The source watches again from the new list's version.
    server
        .wait_for_request("allowWatchBookmarks=true&resourceVersion=1020", WAIT)
        .await?;
    let requests = server.requests();
    let pod_lists: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && !r.contains("watch=true"))
        .collect();
    assert_eq!(pod_lists.len(), 2, "pod lists: {requests:#?}");
    for list in &pod_lists {
        assert!(
            list.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "{list}"
        );
    }
    let pod_watches: Vec<&String> = requests
        .iter()
        .filter(|r| r.starts_with("/api/v1/pods?") && r.contains("watch=true"))
        .collect();
    assert!(pod_watches.len() >= 3, "pod watches: {requests:#?}");
    assert!(
        pod_watches[0].contains("resourceVersion=1000"),
        "{}",
        pod_watches[0]
    );
    assert!(
        pod_watches[1].contains("resourceVersion=1010"),
        "{}",
        pod_watches[1]
    );
    assert!(
        pod_watches[2].contains("resourceVersion=1020"),
        "{}",
        pod_watches[2]
    );
    for watch in &pod_watches {
        assert!(watch.contains("allowWatchBookmarks=true"), "{watch}");
        assert!(
            watch.contains("fieldSelector=spec.nodeName%3Dnode-1"),
            "{watch}"
        );
    }
    assert!(
        requests.iter().any(|r| r.starts_with("/api/v1/namespaces?")
            && r.contains("labelSelector=tokenmesh.io%2Fenabled%3Dtrue")),
        "namespace list: {requests:#?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("/api/v1/pods?") || r.starts_with("/api/v1/namespaces?")),
        "requests without a recorded response: {requests:#?}"
    );

    shutdown.cancel();
    tokio::time::timeout(WAIT, source).await??;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_steered_once_cgroup_appears() -> Result<()> {
    require_root()?;
    let mut kubepods = KubepodsRoot::create("late")?;
    // Only ledger-0's cgroup exists at first; cart-0's appears after the first set.
    kubepods.add_pod(
        &pod_cgroup_path(CgroupDriver::Systemd, QosClass::Guaranteed, &uid(2)),
        "app",
        PodNetwork::Own,
    )?;

    let server = ReplayServer::start(routes(Arc::new(Notify::new()))?).await?;
    let (source, shutdown, mut receiver) = start_source(&server, &kubepods, false, Vec::new())?;

    let first = wait_for_names(&mut receiver, &["payments/ledger-0"]).await?;
    assert!(first[0].probe_exemption.ports.is_empty());

    let cart = kubepods.add_pod(
        &pod_cgroup_path(CgroupDriver::Cgroupfs, QosClass::Burstable, &uid(1)),
        "app",
        PodNetwork::Own,
    )?;
    let later = wait_for_names(&mut receiver, &["payments/ledger-0", "shop/cart-0"]).await?;
    assert_eq!(later[1].cgroup, cart.cgroup);

    shutdown.cancel();
    tokio::time::timeout(WAIT, source).await??;
    Ok(())
}
