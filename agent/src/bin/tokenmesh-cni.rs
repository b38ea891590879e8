//! `tokenmesh-cni`: a chained CNI plugin that delays each new pod sandbox until the
//! tokenmesh agent of the node has steered the pod. The container runtime runs it with
//! the `CNI_*` environment variables and the network configuration on stdin.

use std::{
    io::{Read, Write},
    process::ExitCode,
};

use tokenmesh_agent::cni::plugin;

fn main() -> ExitCode {
    let mut stdin = String::new();
    // An unreadable stdin leaves the configuration empty, which `run` reports as a
    // decode error in the CNI error format.
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let output = plugin::run(&|name| std::env::var(name).ok(), &stdin);
    let mut stdout = std::io::stdout();
    let _ = stdout.write_all(output.stdout.as_bytes());
    let _ = stdout.flush();
    if output.success {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
