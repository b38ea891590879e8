//! The Kubernetes workload source against API responses replayed from
//! `fixtures/kube/`. No API server runs on this machine, so a small HTTP server on
//! 127.0.0.1 stands in for it: it serves the pod and namespace lists, then the watch
//! streams (add, modify, delete, bookmark, and an HTTP 410 "too old resource version"
//! error that forces a new list). The pods' cgroups and network namespaces are real:
//! kubelet-style cgroups below a test-owned cgroup, each with a process in its own
//! network namespace. Needs root.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokenmesh_agent::workloads::{
    Pod,
    cgroups::{CgroupDriver, QosClass, pod_cgroup_path},
    kube::{self as kube_source, KubernetesSettings},
};
use tokenmesh_e2e::{
    kubepods::{KubepodsRoot, PodNetwork, netns_id},
    topology::{cgroup2_mount, require_root},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{Notify, watch},
};
use tokio_util::sync::CancellationToken;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/kube")
        .join(name)
}

fn uid(n: u32) -> String {
    format!("7c3f5d2a-1b4e-4f6a-9d8c-{n:012x}")
}

/// What the replay server sends for one request.
enum Reply {
    /// A whole JSON document.
    Document(&'static str),
    /// Watch events, one JSON object a line, after `gate` is notified; then the stream ends.
    Events(&'static str, Option<Arc<Notify>>),
    /// A watch that stays open with no events until the test ends.
    Idle,
    NotFound,
}

/// Stands in for the API server: answers each request from the fixtures and records it.
struct ReplayServer {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    release_first_watch: Arc<Notify>,
    stop: CancellationToken,
}

impl ReplayServer {
    async fn start() -> Result<ReplayServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let release_first_watch = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let pod_lists = Arc::new(Mutex::new(0u32));

        let (log, gate, stopped) = (requests.clone(), release_first_watch.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => break,
                    },
                };
                let (log, gate, stopped, pod_lists) = (
                    log.clone(),
                    gate.clone(),
                    stopped.clone(),
                    pod_lists.clone(),
                );
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = serve(stream, log, gate, pod_lists) => {}
                    }
                });
            }
        });
        Ok(ReplayServer {
            url,
            requests,
            release_first_watch,
            stop,
        })
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until a request whose target contains `part` has arrived.
    async fn wait_for_request(&self, part: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !self.requests().iter().any(|r| r.contains(part)) {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no request with {part:?} within {WAIT:?}: {:#?}",
                    self.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn reply_for(target: &str, gate: &Arc<Notify>, pod_lists: &Mutex<u32>) -> Reply {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: HashMap<&str, &str> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let watching = params.get("watch") == Some(&"true");
    let version = params.get("resourceVersion").copied().unwrap_or("");
    match (path, watching, version) {
        ("/api/v1/pods", false, _) => {
            let mut count = pod_lists.lock().unwrap();
            *count += 1;
            match *count {
                1 => Reply::Document("pods-list-1000.json"),
                _ => Reply::Document("pods-list-1020.json"),
            }
        }
        ("/api/v1/pods", true, "1000") => {
            Reply::Events("pods-watch-from-1000.jsonl", Some(gate.clone()))
        }
        ("/api/v1/pods", true, "1010") => Reply::Events("pods-watch-from-1010.jsonl", None),
        ("/api/v1/pods", true, "1020") => Reply::Idle,
        ("/api/v1/namespaces", false, _) => Reply::Document("namespaces-list-500.json"),
        ("/api/v1/namespaces", true, "500") => Reply::Idle,
        _ => Reply::NotFound,
    }
}

/// Reads one HTTP/1.1 request head and answers it. Every response closes the connection,
/// so bodies end at EOF and no request body handling is needed (the client only GETs).
async fn serve(
    mut stream: TcpStream,
    log: Arc<Mutex<Vec<String>>>,
    gate: Arc<Notify>,
    pod_lists: Arc<Mutex<u32>>,
) -> Result<()> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buffer[..read]);
    }
    let head = String::from_utf8_lossy(&head);
    let target = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .context("request line without a target")?
        .to_string();
    log.lock().unwrap().push(target.clone());

    let ok = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n";
    match reply_for(&target, &gate, &pod_lists) {
        Reply::Document(name) => {
            stream.write_all(ok.as_bytes()).await?;
            stream.write_all(&std::fs::read(fixture(name))?).await?;
        }
        Reply::Events(name, gate) => {
            stream.write_all(ok.as_bytes()).await?;
            stream.flush().await?;
            if let Some(gate) = gate {
                gate.notified().await;
            }
            for line in std::fs::read_to_string(fixture(name))?.lines() {
                stream.write_all(format!("{line}\n").as_bytes()).await?;
                stream.flush().await?;
            }
        }
        Reply::Idle => {
            stream.write_all(ok.as_bytes()).await?;
            stream.flush().await?;
            std::future::pending::<()>().await;
        }
        Reply::NotFound => {
            let body = format!(
                r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"no recorded response for {target}","reason":"NotFound","code":404}}"#
            );
            let response = format!(
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(response.as_bytes()).await?;
        }
    }
    stream.shutdown().await?;
    Ok(())
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

    let server = ReplayServer::start().await?;
    let client = kube::Client::try_from(kube::Config::new(server.url.parse()?))?;
    let settings = KubernetesSettings {
        node_name: NODE.to_string(),
        cgroup_driver: None,
        kubepods_root: kubepods.relative()?,
        proc_path: PathBuf::from("/proc"),
        resolve_retry: Duration::from_millis(200),
        probe_exemption: true,
        probe_extra_sources: vec!["10.244.1.1/32".parse()?],
    };
    let (sender, mut receiver) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let source = tokio::spawn(kube_source::run(
        client,
        settings,
        cgroup2_mount()?,
        sender,
        shutdown.clone(),
    ));

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
    server.release_first_watch.notify_one();
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
    server.wait_for_request("watch=true&timeoutSeconds=290&fieldSelector=spec.nodeName%3Dnode-1&allowWatchBookmarks=true&resourceVersion=1020").await?;
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

    let server = ReplayServer::start().await?;
    let client = kube::Client::try_from(kube::Config::new(server.url.parse()?))?;
    let settings = KubernetesSettings {
        node_name: NODE.to_string(),
        cgroup_driver: None,
        kubepods_root: kubepods.relative()?,
        proc_path: PathBuf::from("/proc"),
        resolve_retry: Duration::from_millis(200),
        probe_exemption: false,
        probe_extra_sources: Vec::new(),
    };
    let (sender, mut receiver) = watch::channel(None);
    let shutdown = CancellationToken::new();
    let source = tokio::spawn(kube_source::run(
        client,
        settings,
        cgroup2_mount()?,
        sender,
        shutdown.clone(),
    ));

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
