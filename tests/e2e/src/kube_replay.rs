//! A stand-in for the Kubernetes API server, because no API server runs on the test
//! machines. This HTTP server on 127.0.0.1 replies to list and watch requests with the
//! responses in `fixtures/kube/` (or given by the test) and records every request target.
//! The fixtures are written in the API server's wire format (`core/v1`, Kubernetes 1.33);
//! they were not captured from a live cluster.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::Notify,
};
use tokio_util::sync::CancellationToken;

/// Returns the folder of the stored responses.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube")
}

/// Reads a stored response.
pub fn fixture(name: &str) -> Result<String> {
    let path = fixtures_dir().join(name);
    std::fs::read_to_string(&path).with_context(|| format!("failed to read {}", path.display()))
}

/// Routes of a node whose pods are the PodList `pods` and whose namespaces carry no
/// enrolment label; both watches stay open with no events.
pub fn node_routes(pods: String) -> Vec<Route> {
    let namespaces = r#"{"kind":"NamespaceList","apiVersion":"v1","metadata":{"resourceVersion":"50"},"items":[]}"#;
    let list = |path, reply| Route {
        path,
        watch: false,
        version: None,
        replies: vec![reply],
    };
    let idle_watch = |path| Route {
        path,
        watch: true,
        version: None,
        replies: vec![Reply::Idle],
    };
    vec![
        list("/api/v1/pods", Reply::Document(pods)),
        idle_watch("/api/v1/pods"),
        list(
            "/api/v1/namespaces",
            Reply::Document(namespaces.to_string()),
        ),
        idle_watch("/api/v1/namespaces"),
    ]
}

/// What the server sends for one request.
#[derive(Clone)]
pub enum Reply {
    /// A whole JSON document, such as a PodList.
    Document(String),
    /// Watch events, one JSON object a line, sent once `gate` (if any) is notified. Then
    /// the stream ends, as a watch does when the API server closes it.
    Events(String, Option<Arc<Notify>>),
    /// A watch that stays open with no events until the server stops.
    Idle,
}

/// The requests that get `replies`: the path, list or watch, and for a watch the
/// `resourceVersion` it starts from (`None` matches any).
#[derive(Clone)]
pub struct Route {
    pub path: &'static str,
    pub watch: bool,
    pub version: Option<&'static str>,
    /// Replies for the first, second, ... matching request; the last one repeats.
    pub replies: Vec<Reply>,
}

struct Routes {
    routes: Vec<Route>,
    served: Vec<usize>,
}

/// The running server; dropping it closes every open watch.
pub struct ReplayServer {
    pub url: String,
    requests: Arc<Mutex<Vec<String>>>,
    stop: CancellationToken,
}

impl ReplayServer {
    pub async fn start(routes: Vec<Route>) -> Result<ReplayServer> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let served = vec![0; routes.len()];
        let routes = Arc::new(Mutex::new(Routes { routes, served }));

        let (log, stopped) = (requests.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stopped.cancelled() => break,
                    accepted = listener.accept() => match accepted {
                        Ok(accepted) => accepted,
                        Err(_) => break,
                    },
                };
                let (log, stopped, routes) = (log.clone(), stopped.clone(), routes.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = stopped.cancelled() => {}
                        _ = serve(stream, log, routes) => {}
                    }
                });
            }
        });
        Ok(ReplayServer {
            url,
            requests,
            stop,
        })
    }

    /// Returns every request target received so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until a request whose target contains `part` has arrived.
    pub async fn wait_for_request(&self, part: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.requests().iter().any(|r| r.contains(part)) {
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "no request with {part:?} within {timeout:?}: {:#?}",
                    self.requests()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Returns a kubeconfig that points a client at this server, for the agent binary.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: replay\n  cluster:\n    server: {}\n\
             contexts:\n- name: replay\n  context:\n    cluster: replay\n    user: replay\n\
             current-context: replay\nusers:\n- name: replay\n  user: {{}}\n",
            self.url
        )
    }
}

impl Drop for ReplayServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn reply_for(target: &str, routes: &Mutex<Routes>) -> Option<Reply> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let params: HashMap<&str, &str> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .collect();
    let watching = params.get("watch") == Some(&"true");
    let version = params.get("resourceVersion").copied();
    let mut routes = routes.lock().unwrap();
    let index = routes.routes.iter().position(|route| {
        route.path == path
            && route.watch == watching
            && (route.version.is_none() || route.version == version)
    })?;
    let count = routes.served[index];
    routes.served[index] += 1;
    let replies = &routes.routes[index].replies;
    replies.get(count).or(replies.last()).cloned()
}

/// Reads one HTTP/1.1 request head and sends the reply. Every response closes the connection,
/// so bodies end at EOF and no request body handling is needed (the client only GETs).
async fn serve(
    mut stream: TcpStream,
    log: Arc<Mutex<Vec<String>>>,
    routes: Arc<Mutex<Routes>>,
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
    match reply_for(&target, &routes) {
        Some(Reply::Document(body)) => {
            stream.write_all(ok.as_bytes()).await?;
            stream.write_all(body.as_bytes()).await?;
        }
        Some(Reply::Events(lines, gate)) => {
            stream.write_all(ok.as_bytes()).await?;
            stream.flush().await?;
            if let Some(gate) = gate {
                gate.notified().await;
            }
            for line in lines.lines() {
                stream.write_all(format!("{line}\n").as_bytes()).await?;
                stream.flush().await?;
            }
        }
        Some(Reply::Idle) => {
            stream.write_all(ok.as_bytes()).await?;
            stream.flush().await?;
            std::future::pending::<()>().await;
        }
        None => {
            let body = format!(
                r#"{{"kind":"Status","apiVersion":"v1","metadata":{{}},"status":"Failure","message":"no stored response for {target}","reason":"NotFound","code":404}}"#
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
