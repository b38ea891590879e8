//! Child processes for the end-to-end tests: a guard that stops and reaps its process on
//! Drop and keeps its output for failure messages, and readiness checks for servers.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::topology::in_netns;

/// How long Drop waits after SIGTERM before it sends SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// A child process that is stopped (SIGTERM, then SIGKILL after a grace period) and reaped
/// when the guard is dropped. Its stdout and stderr go to `<log_dir>/<name>.stdout` and
/// `<name>.stderr`, and Drop prints them while the test panics, so a failing test shows
/// what its servers wrote.
pub struct ChildGuard {
    name: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Starts `command` with stdin closed and stdout and stderr written to files in
    /// `log_dir`. `name` labels the process in file names and messages.
    pub fn spawn(mut command: Command, name: &str, log_dir: &Path) -> Result<ChildGuard> {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let child = command
            .stdin(Stdio::null())
            .stdout(create(&stdout_path)?)
            .stderr(create(&stderr_path)?)
            .spawn()
            .with_context(|| format!("failed to start {name}: {command:?}"))?;
        Ok(ChildGuard {
            name: name.to_owned(),
            child,
            stdout_path,
            stderr_path,
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Reads what the process has written to stdout so far.
    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Reads what the process has written to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Formats both outputs, labeled, for failure messages.
    pub fn output_report(&self) -> String {
        format!(
            "--- {name} stdout ---\n{}\n--- {name} stderr ---\n{}",
            self.stdout().trim_end(),
            self.stderr().trim_end(),
            name = self.name
        )
    }

    /// Fails with the process output if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited early with {status}\n{}",
                self.name,
                self.output_report()
            );
        }
        Ok(())
    }

    /// Waits for the process to exit by itself; fails with its output after `timeout`.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} still runs after {timeout:?}\n{}",
                    self.name,
                    self.output_report()
                );
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Waits until a TCP connection to `addr` succeeds, from the network namespace at
    /// `netns` (None: this process's own), and fails early if the process exits.
    pub fn wait_for_tcp(
        &mut self,
        netns: Option<&Path>,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<()> {
        let child = &mut self.child;
        let result = poll_until_connected(netns, addr, timeout, || match child.try_wait()? {
            Some(status) => bail!("the process exited with {status}"),
            None => Ok(()),
        });
        result.with_context(|| {
            format!(
                "{} is not ready on {addr}\n{}",
                self.name,
                self.output_report()
            )
        })
    }

    /// Sends SIGTERM, waits up to `grace`, then sends SIGKILL, and reaps the process.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(POLL_INTERVAL);
        }
        let _ = self.child.kill();
        self.child
            .wait()
            .with_context(|| format!("failed to reap {}", self.name))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let result = self.terminate(STOP_GRACE);
        if thread::panicking() {
            eprintln!("{}", self.output_report());
        }
        if let Err(error) = result {
            eprintln!("failed to stop {}: {error:#}", self.name);
        }
    }
}

/// Waits until a TCP connection to `addr` succeeds, from the network namespace at `netns`
/// (None: this process's own), and fails after `timeout` with the last connect error.
pub fn wait_for_tcp(netns: Option<&Path>, addr: SocketAddr, timeout: Duration) -> Result<()> {
    poll_until_connected(netns, addr, timeout, || Ok(()))
}

/// Tries to connect every 20 ms until it succeeds, `timeout` passes or `check` fails.
fn poll_until_connected(
    netns: Option<&Path>,
    addr: SocketAddr,
    timeout: Duration,
    mut check: impl FnMut() -> Result<()>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check()?;
        let error = match connect_once(netns, addr) {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        if Instant::now() >= deadline {
            bail!("nothing accepted TCP connections on {addr} within {timeout:?}: {error:#}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

fn connect_once(netns: Option<&Path>, addr: SocketAddr) -> Result<()> {
    let connect = move || {
        TcpStream::connect_timeout(&addr, Duration::from_millis(500))
            .map(drop)
            .with_context(|| format!("failed to connect to {addr}"))
    };
    match netns {
        Some(netns) => in_netns(netns, connect)?,
        None => connect(),
    }
}

fn create(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("failed to create {}", path.display()))
}

/// Returns a TCP port on 127.0.0.1 that was free a moment ago, for a server the test starts.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Reads the agent's audit log at `path`: one JSON record a line; nothing when it is missing.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}
