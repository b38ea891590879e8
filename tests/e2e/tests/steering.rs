//! eBPF steering on the real kernel. `cgroup/connect4` and `sockops` redirect a pod's
//! connects to intercepted ports into the agent's listener in that pod. `sk_lookup`
//! hands SYNs for protected pod addresses to the agent's inbound listener. Pinned
//! programs keep refusing both directions while the agent's listeners are closed.
//!
//! Needs root. Each test builds its own topology (namespaces, bridge, cgroups) and pins
//! under its own `/sys/fs/bpf/tokenmesh-test-…` folder, and removes all of it at the end,
//! also when it fails. Clients in pods are `bash` connecting through `/dev/tcp`, so the
//! connecting process really is in the pod's namespace and cgroup.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokenmesh_agent::netns::Netns;
use tokenmesh_agent::steering::{OnExit, Steering, SteeringError, SteeringSettings, uninstall};
use tokenmesh_e2e::topology::{Pod, Topology};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Port the pods' applications listen on and that steering intercepts.
const APP_PORT: u16 = 8080;
/// Port the pods' applications listen on that steering leaves alone.
const PLAIN_PORT: u16 = 9090;
/// The agent's outbound listener on 127.0.0.1 in each enrolled pod.
const OUTBOUND_PORT: u16 = 15001;
/// The agent's inbound listener on 127.0.0.1 in each protected pod.
const INBOUND_PORT: u16 = 15006;

const TIMEOUT: Duration = Duration::from_secs(10);
/// How long a listener must stay without connections to count as not reached.
const QUIET: Duration = Duration::from_millis(500);

/// Opens a TCP connection from inside `pod` with bash's `/dev/tcp`, sends one line and
/// prints the line that comes back. Arguments: address, port.
const CLIENT_SCRIPT: &str = r#"exec 3<>"/dev/tcp/$1/$2" || exit 3
echo ping >&3
IFS= read -r reply <&3
printf '%s' "$reply""#;

/// Result of one client run inside a pod.
#[derive(Debug)]
struct ClientRun {
    exit_code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs the bash client in `pod`'s network namespace and cgroup against `target`.
async fn connect_from_pod(pod: &Pod, target: SocketAddrV4) -> ClientRun {
    let mut command = pod.command("bash");
    command.args([
        "-c",
        CLIENT_SCRIPT,
        "client",
        &target.ip().to_string(),
        &target.port().to_string(),
    ]);
    let mut command = tokio::process::Command::from(command);
    command.kill_on_drop(true);
    let output = tokio::time::timeout(TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "client in pod {} timed out connecting to {target}",
                pod.name
            )
        })
        .expect("bash runs");
    ClientRun {
        exit_code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A connection a test listener accepted: its local address and its peer.
#[derive(Debug)]
struct Accepted {
    local: SocketAddr,
    peer: SocketAddr,
}

/// Accepts one connection, reads its first line, replies with `reply(peer)` and returns
/// the connection's addresses.
async fn serve_one(listener: &TcpListener, reply: impl FnOnce(SocketAddr) -> String) -> Accepted {
    let (stream, peer) = tokio::time::timeout(TIMEOUT, listener.accept())
        .await
        .expect("a connection arrives in time")
        .expect("accept succeeds");
    let local = stream
        .local_addr()
        .expect("accepted socket has a local address");
    let mut stream = BufReader::new(stream);
    let mut line = String::new();
    stream
        .read_line(&mut line)
        .await
        .expect("client sends a line");
    assert_eq!(line, "ping\n");
    stream
        .get_mut()
        .write_all(format!("{}\n", reply(peer)).as_bytes())
        .await
        .expect("reply is written");
    Accepted { local, peer }
}

/// Fails when `listener` accepts a connection within [`QUIET`].
async fn assert_not_reached(listener: &TcpListener, listener_name: &str) {
    if let Ok(accepted) = tokio::time::timeout(QUIET, listener.accept()).await {
        let peer = accepted.map(|(_, peer)| peer.to_string());
        panic!("{listener_name} was reached, but every connection must be refused: peer {peer:?}");
    }
}

/// Steering for one test, detached with every pin removed when the test ends, also
/// when it panics. Declare it after the topology, so it is dropped first.
struct SteeringGuard {
    steering: Option<Steering>,
    bpffs_dir: PathBuf,
}

impl SteeringGuard {
    fn start(topology: &Topology) -> SteeringGuard {
        let steering =
            Steering::start(&settings(topology)).unwrap_or_else(|error| panic!("{error}"));
        SteeringGuard {
            steering: Some(steering),
            bpffs_dir: topology.bpf_pin_dir().to_path_buf(),
        }
    }

    fn get(&self) -> &Steering {
        self.steering.as_ref().expect("steering is running")
    }

    /// Starts steering again on the same pins, as a restarted agent does.
    fn restart(&mut self, topology: &Topology) {
        assert!(
            self.steering.is_none(),
            "shut steering down before a restart"
        );
        let steering =
            Steering::start(&settings(topology)).unwrap_or_else(|error| panic!("{error}"));
        self.steering = Some(steering);
    }

    fn shutdown(&mut self, on_exit: OnExit) {
        let steering = self.steering.take().expect("steering is running");
        steering
            .shutdown(on_exit)
            .unwrap_or_else(|error| panic!("{error}"));
    }
}

impl Drop for SteeringGuard {
    fn drop(&mut self) {
        let result = match self.steering.take() {
            Some(steering) => steering.shutdown(OnExit::Detach),
            None => uninstall(&self.bpffs_dir),
        };
        if let Err(error) = result {
            eprintln!("steering cleanup failed: {error}");
        }
    }
}

/// Two pods, `client` and `server`, with steering started and both namespaces open.
/// Fields drop in order, so steering is detached before the topology goes away.
struct Fixture {
    steering: SteeringGuard,
    client_netns: Netns,
    server_netns: Netns,
    topology: Topology,
}

impl Fixture {
    fn start(prefix: &str) -> Fixture {
        let topology = Topology::create(prefix, &["client", "server"]).unwrap();
        let steering = SteeringGuard::start(&topology);
        Fixture {
            steering,
            client_netns: open_netns(topology.pod("client")),
            server_netns: open_netns(topology.pod("server")),
            topology,
        }
    }

    fn client(&self) -> &Pod {
        self.topology.pod("client")
    }

    fn server(&self) -> &Pod {
        self.topology.pod("server")
    }

    fn steering(&self) -> &Steering {
        self.steering.get()
    }

    fn pin_dir(&self) -> &Path {
        self.topology.bpf_pin_dir()
    }

    /// Returns the server's application address on the intercepted port.
    fn app_target(&self) -> SocketAddrV4 {
        SocketAddrV4::new(self.server().ip, APP_PORT)
    }

    fn enroll_client(&self) {
        self.steering()
            .enroll_outbound(self.client_netns.cookie(), OUTBOUND_PORT)
            .unwrap();
    }

    fn protect_server(&self, inbound: &TcpListener) {
        self.steering()
            .protect_inbound(&self.server_netns, self.server().ip, &[APP_PORT], inbound)
            .unwrap();
    }

    /// Connects from the client pod to `target`, checks that `app` accepted it with the
    /// client pod's address as peer, and returns the accepted connection's addresses.
    async fn assert_direct(&self, app: &TcpListener, target: SocketAddrV4) -> Accepted {
        let (run, accepted) = tokio::join!(
            connect_from_pod(self.client(), target),
            serve_one(app, |_| "app".to_string()),
        );

        assert_eq!(run.exit_code, Some(0), "client: {run:?}");
        assert_eq!(run.stdout, "app");
        assert_eq!(accepted.local, SocketAddr::V4(target));
        assert_eq!(accepted.peer.ip(), self.client().ip);
        accepted
    }
}

fn settings(topology: &Topology) -> SteeringSettings {
    SteeringSettings {
        bpffs_dir: topology.bpf_pin_dir().to_path_buf(),
        pods_cgroup: topology.pods_cgroup().to_path_buf(),
        intercept_ports: vec![APP_PORT],
        intercept_networks: Vec::new(),
        exclude_networks: Vec::new(),
    }
}

fn open_netns(pod: &Pod) -> Netns {
    Netns::open(&pod.netns_path).expect("pod namespace opens")
}

async fn listen(netns: &Netns, ip: Ipv4Addr, port: u16) -> TcpListener {
    netns
        .tcp_listener(SocketAddr::from((ip, port)))
        .await
        .unwrap_or_else(|error| panic!("{error}"))
}

/// Names of the pins under `dir`, sorted; empty when `dir` does not exist.
fn pin_names(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .map(|entry| {
            entry
                .expect("pin folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_intercepted_port_reaches_agent() {
    let fixture = Fixture::start("steer_out");
    let agent = listen(&fixture.client_netns, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    fixture.enroll_client();
    let target = fixture.app_target();
    let cookie = fixture.client_netns.cookie();

    let mut records = Vec::new();
    let (run, accepted) = tokio::join!(
        connect_from_pod(fixture.client(), target),
        serve_one(&agent, |peer| {
            let original = fixture.steering().take_original_dst(cookie, peer.port());
            let again = fixture.steering().take_original_dst(cookie, peer.port());
            records.push((original, again));
            format!("original {original:?}")
        }),
    );

    assert_eq!(run.exit_code, Some(0), "client: {run:?}");
    assert_eq!(run.stdout, format!("original Some({target})"));
    assert_eq!(
        accepted.local,
        SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT))
    );
    assert_eq!(accepted.peer.ip(), Ipv4Addr::LOCALHOST);
    assert_eq!(
        records,
        vec![(Some(target), None)],
        "the record is deleted when taken"
    );
    assert_not_reached(&app, "the server's application").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_other_port_connects_directly() {
    let fixture = Fixture::start("steer_plain");
    let agent = listen(&fixture.client_netns, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, PLAIN_PORT).await;
    fixture.enroll_client();
    let target = SocketAddrV4::new(fixture.server().ip, PLAIN_PORT);

    let accepted = fixture.assert_direct(&app, target).await;

    let cookie = fixture.client_netns.cookie();
    assert_eq!(
        fixture
            .steering()
            .take_original_dst(cookie, accepted.peer.port()),
        None
    );
    assert_not_reached(&agent, "the agent's outbound listener").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_unenrolled_pod_connects_directly() {
    let fixture = Fixture::start("steer_unenrolled");
    let agent = listen(&fixture.client_netns, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;

    fixture.assert_direct(&app, fixture.app_target()).await;

    assert_not_reached(&agent, "the agent's outbound listener").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_protected_port_reaches_agent() {
    let fixture = Fixture::start("steer_in");
    let agent = listen(&fixture.server_netns, Ipv4Addr::LOCALHOST, INBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    fixture.protect_server(&agent);
    let target = fixture.app_target();

    // The client pod is not enrolled, so its connect is not redirected.
    let (run, accepted) = tokio::join!(
        connect_from_pod(fixture.client(), target),
        serve_one(&agent, |_| "agent".to_string()),
    );

    assert_eq!(run.exit_code, Some(0), "client: {run:?}");
    assert_eq!(run.stdout, "agent");
    assert_eq!(
        accepted.local,
        SocketAddr::V4(target),
        "local address is the original destination"
    );
    assert_eq!(
        accepted.peer.ip(),
        fixture.client().ip,
        "peer is the real client"
    );
    assert_not_reached(&app, "the application by its pod address").await;

    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, APP_PORT);
    let (run, accepted) = tokio::join!(
        connect_from_pod(fixture.server(), loopback),
        serve_one(&app, |_| "app".to_string()),
    );

    assert_eq!(run.exit_code, Some(0), "loopback client: {run:?}");
    assert_eq!(run.stdout, "app");
    assert_eq!(accepted.local, SocketAddr::V4(loopback));
    assert_eq!(accepted.peer.ip(), Ipv4Addr::LOCALHOST);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_unprotect_restores_direct_path() {
    let fixture = Fixture::start("steer_unprotect");
    let agent = listen(&fixture.server_netns, Ipv4Addr::LOCALHOST, INBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    fixture.protect_server(&agent);
    let links_dir = fixture.pin_dir().join("links");
    let sk_lookup_prefix = format!("sk_lookup-{}-", fixture.server_netns.cookie());
    let sk_lookup_pins = || -> Vec<String> {
        pin_names(&links_dir)
            .into_iter()
            .filter(|name| name.starts_with(&sk_lookup_prefix))
            .collect()
    };
    assert_eq!(
        sk_lookup_pins().len(),
        1,
        "links: {:?}",
        pin_names(&links_dir)
    );

    fixture
        .steering()
        .unprotect_inbound(&fixture.server_netns, fixture.server().ip)
        .unwrap();

    fixture.assert_direct(&app, fixture.app_target()).await;
    assert_not_reached(&agent, "the agent's inbound listener").await;
    assert_eq!(sk_lookup_pins(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_agent_refuses_both_directions() {
    let mut fixture = Fixture::start("steer_closed");
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    {
        let _outbound = listen(&fixture.client_netns, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
        let inbound = listen(&fixture.server_netns, Ipv4Addr::LOCALHOST, INBOUND_PORT).await;
        fixture.enroll_client();
        fixture.protect_server(&inbound);
        fixture.steering.shutdown(OnExit::Keep);
        // The listeners close here, as when the agent process exits.
    }
    assert!(!pin_names(fixture.pin_dir()).is_empty(), "pins are kept");
    let target = fixture.app_target();

    // Outbound: the enrolled pod's connect still goes to the closed outbound port.
    let run = connect_from_pod(fixture.client(), target).await;

    assert_eq!(run.exit_code, Some(3), "client: {run:?}");
    assert!(
        run.stderr.contains("connect: Connection refused"),
        "client: {run:?}"
    );
    assert_not_reached(&app, "the server's application").await;

    // Inbound: a socket outside the pods' cgroups, as the agent's upstream sockets are,
    // reaches the server pod, whose sk_lookup finds the inbound slot empty.
    let socket = fixture.client_netns.tcp_socket(false).await.unwrap();
    let error = socket.connect(SocketAddr::V4(target)).await.unwrap_err();

    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "error: {error}"
    );
    assert_not_reached(&app, "the server's application").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_removes_pins_and_steering() {
    let mut fixture = Fixture::start("steer_detach");
    let inbound = listen(&fixture.server_netns, Ipv4Addr::LOCALHOST, INBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    fixture.enroll_client();
    fixture.protect_server(&inbound);
    assert!(fixture.pin_dir().exists());

    fixture.steering.shutdown(OnExit::Detach);

    assert!(
        !fixture.pin_dir().exists(),
        "pins left: {:?}",
        pin_names(fixture.pin_dir())
    );
    fixture.assert_direct(&app, fixture.app_target()).await;
    assert_not_reached(&inbound, "the agent's inbound listener").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uninstall_removes_kept_pins() {
    let mut fixture = Fixture::start("steer_uninstall");
    let inbound = listen(&fixture.server_netns, Ipv4Addr::LOCALHOST, INBOUND_PORT).await;
    let app = listen(&fixture.server_netns, Ipv4Addr::UNSPECIFIED, APP_PORT).await;
    fixture.enroll_client();
    fixture.protect_server(&inbound);
    fixture.steering.shutdown(OnExit::Keep);
    assert!(!pin_names(fixture.pin_dir()).is_empty(), "pins are kept");

    uninstall(fixture.pin_dir()).unwrap();

    assert!(
        !fixture.pin_dir().exists(),
        "pins left: {:?}",
        pin_names(fixture.pin_dir())
    );
    fixture.assert_direct(&app, fixture.app_target()).await;
    assert_not_reached(&inbound, "the agent's inbound listener").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replaces_pinned_links() {
    let mut fixture = Fixture::start("steer_restart");
    fixture.enroll_client();
    let links_dir = fixture.pin_dir().join("links");
    let first_links = pin_names(&links_dir);
    fixture.steering.shutdown(OnExit::Keep);

    fixture.steering.restart(&fixture.topology);
    let second_links = pin_names(&links_dir);

    assert_eq!(first_links.len(), 2, "links: {first_links:?}");
    assert_eq!(second_links.len(), 2, "links: {second_links:?}");
    assert!(
        first_links.iter().all(|name| !second_links.contains(name)),
        "old links still pinned: {first_links:?} -> {second_links:?}"
    );
    // The pinned pod map survived the restart, so the enrolled pod is still steered.
    let agent = listen(&fixture.client_netns, Ipv4Addr::LOCALHOST, OUTBOUND_PORT).await;
    let target = fixture.app_target();
    let cookie = fixture.client_netns.cookie();
    let (run, _) = tokio::join!(
        connect_from_pod(fixture.client(), target),
        serve_one(&agent, |peer| {
            let original = fixture.steering().take_original_dst(cookie, peer.port());
            format!("original {original:?}")
        }),
    );
    assert_eq!(run.exit_code, Some(0), "client: {run:?}");
    assert_eq!(run.stdout, format!("original Some({target})"));
}

#[test]
fn start_rejects_missing_cgroup() {
    let topology = Topology::create("steer_nocgroup", &["pod"]).unwrap();
    let missing = topology.pods_cgroup().join("missing");
    let settings = SteeringSettings {
        pods_cgroup: missing.clone(),
        ..settings(&topology)
    };

    let error = match Steering::start(&settings) {
        Ok(steering) => {
            let _ = steering.shutdown(OnExit::Detach);
            panic!("start succeeded with a missing cgroup");
        }
        Err(error) => error,
    };

    assert!(
        matches!(&error, SteeringError::OpenCgroup { path, .. } if *path == missing),
        "error: {error}"
    );
    assert!(
        error.to_string().contains(&missing.display().to_string()),
        "error: {error}"
    );
    assert!(
        !topology.bpf_pin_dir().exists(),
        "start left a pin folder behind"
    );
}

#[test]
fn start_rejects_pin_folder_off_bpffs() {
    let topology = Topology::create("steer_nobpffs", &["pod"]).unwrap();
    let folder = tempfile::tempdir().unwrap();
    let bpffs_dir = folder.path().join("pins");
    let settings = SteeringSettings {
        bpffs_dir: bpffs_dir.clone(),
        ..settings(&topology)
    };

    let error = match Steering::start(&settings) {
        Ok(steering) => {
            let _ = steering.shutdown(OnExit::Detach);
            panic!("start succeeded with a pin folder off bpffs");
        }
        Err(error) => error,
    };

    assert!(
        matches!(&error, SteeringError::NotOnBpffs { path } if *path == bpffs_dir),
        "error: {error}"
    );
    assert!(!bpffs_dir.exists(), "start created {}", bpffs_dir.display());
}
