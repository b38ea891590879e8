//! Sockets inside a pod's network namespace.
//!
//! A socket keeps the network namespace it was created in, so the agent makes its
//! per-pod listeners and upstream sockets inside the pod's namespace and then uses them
//! from any thread. Each [`Netns`] owns one OS thread that entered the namespace once
//! with `setns(2)` and creates sockets on request, so no tokio worker thread ever
//! switches namespace.

use std::{
    fmt,
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd},
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Protocol, Socket, Type};

/// Backlog of the listeners made by [`Netns::tcp_listener`], the same as tokio's default.
const LISTEN_BACKLOG: i32 = 1024;

type Job = Box<dyn FnOnce() + Send>;

/// An open network namespace with a thread that creates sockets inside it.
///
/// Cloning is cheap and shares the thread, which exits when the last clone is dropped.
#[derive(Clone)]
pub struct Netns {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    cookie: u64,
    file: File,
    jobs: mpsc::Sender<Job>,
}

/// Tells whether two namespace files, such as `/proc/PID/ns/net` and a bind mount under
/// `/var/run/netns`, name the same namespace: the same device and inode. False when
/// either cannot be read.
pub fn same_namespace(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl Netns {
    /// Opens the network namespace at `path` (for example `/run/netns/NAME` or
    /// `/proc/PID/ns/net`) and starts its socket thread.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!(
                    "failed to open network namespace {}: {error}; check that the path exists \
                     and names a netns file",
                    path.display()
                ),
            )
        })?;
        let thread_file = file.try_clone()?;
        let (jobs, job_receiver) = mpsc::channel::<Job>();
        let (entered_sender, entered) = mpsc::sync_channel::<io::Result<u64>>(1);

        thread::Builder::new()
            .name(format!("netns {}", path.display()))
            .spawn(move || {
                let cookie = enter(&thread_file);
                drop(thread_file);
                let ok = cookie.is_ok();
                let _ = entered_sender.send(cookie);
                if ok {
                    while let Ok(job) = job_receiver.recv() {
                        job();
                    }
                }
            })?;

        let cookie = entered
            .recv()
            .map_err(|_| io::Error::other("the netns socket thread exited before entering"))?
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!(
                        "failed to enter network namespace {}: {error}; check that it is a \
                         network namespace and that the agent has CAP_SYS_ADMIN",
                        path.display()
                    ),
                )
            })?;

        Ok(Netns {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                cookie,
                file,
                jobs,
            }),
        })
    }

    /// Path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Cookie of the namespace (`SO_NETNS_COOKIE`), the value `bpf_get_netns_cookie`
    /// returns for sockets inside it. Read once at [`Netns::open`].
    pub fn cookie(&self) -> u64 {
        self.inner.cookie
    }

    /// Creates a TCP listener bound to `addr` inside the namespace, with `SO_REUSEADDR`.
    pub async fn tcp_listener(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let listener = self
            .run(move || {
                let socket =
                    Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_reuse_address(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&addr.into())?;
                socket.listen(LISTEN_BACKLOG)?;
                Ok(std::net::TcpListener::from(socket))
            })
            .await
            .map_err(|error| {
                io::Error::new(
                    error.kind(),
                    format!(
                        "failed to listen on {addr} in network namespace {}: {error}",
                        self.inner.path.display()
                    ),
                )
            })?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// Creates an unconnected TCP socket inside the namespace; connect it from any thread.
    pub async fn tcp_socket(&self, ipv6: bool) -> io::Result<tokio::net::TcpSocket> {
        let domain = if ipv6 { Domain::IPV6 } else { Domain::IPV4 };
        let stream = self
            .run(move || {
                let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
                socket.set_nonblocking(true)?;
                Ok(std::net::TcpStream::from(socket))
            })
            .await?;
        Ok(tokio::net::TcpSocket::from_std_stream(stream))
    }

    /// Runs `job` on the namespace's thread and returns its result.
    async fn run<T, F>(&self, job: F) -> io::Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (result_sender, result) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = result_sender.send(job());
        });
        let thread_gone = || {
            io::Error::other(format!(
                "the socket thread of network namespace {} has exited",
                self.inner.path.display()
            ))
        };
        self.inner.jobs.send(job).map_err(|_| thread_gone())?;
        result.await.map_err(|_| thread_gone())?
    }
}

impl AsFd for Netns {
    /// Borrows the namespace file descriptor, the target for attaching `sk_lookup`.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.file.as_fd()
    }
}

impl fmt::Debug for Netns {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("Netns")
            .field("path", &self.inner.path)
            .field("cookie", &self.inner.cookie)
            .finish()
    }
}

/// Moves the calling thread into the network namespace `file` and returns its cookie.
fn enter(file: &File) -> io::Result<u64> {
    setns(file, CloneFlags::CLONE_NEWNET)?;
    let probe = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    netns_cookie(&probe)
}

/// Reads `SO_NETNS_COOKIE` (Linux 5.14) of `socket`.
fn netns_cookie(socket: &Socket) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut length = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `length` are valid for writes for the duration of the call, and
    // `length` is the size of `cookie`, so the kernel writes at most 8 bytes into it.
    let result = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut length,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        return Err(io::Error::new(
            error.kind(),
            format!("failed to read SO_NETNS_COOKIE: {error}; it needs Linux 5.14 or later"),
        ));
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_missing_path_names_it() {
        let error = Netns::open(Path::new("/nonexistent/netns")).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::NotFound);
        assert!(
            error.to_string().contains("/nonexistent/netns"),
            "message: {error}"
        );
    }

    #[test]
    fn open_own_netns_reads_cookie() {
        // setns needs CAP_SYS_ADMIN even into the caller's own namespace, so this runs as
        // root, like the agent.
        let netns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let probe = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();

        assert_eq!(netns.cookie(), netns_cookie(&probe).unwrap());
        assert_eq!(netns.path(), Path::new("/proc/self/ns/net"));
    }

    #[tokio::test]
    async fn listener_accepts_in_netns() {
        let netns = Netns::open(Path::new("/proc/self/ns/net")).unwrap();
        let listener = netns
            .tcp_listener("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();

        let socket = netns.tcp_socket(false).await.unwrap();
        let client = socket.connect(addr).await.unwrap();
        let (_server, peer) = listener.accept().await.unwrap();

        assert_eq!(peer, client.local_addr().unwrap());
    }
}
