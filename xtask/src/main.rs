//! `cargo xtask`: setup, build, tests, demo and cleanup for tokenmesh developers and CI.

mod cleanup;
mod command;
mod image;
mod manifests;
mod setup;
mod summary;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

const DEMO_PACKAGE: &str = "tokenmesh-e2e";
const DEMO_BINARY: &str = "tokenmesh-demo";
const AGENT_PACKAGE: &str = "tokenmesh-agent";
const AGENT_BINARY: &str = "tokenmesh-agent";
/// Environment variable through which the end-to-end tests and the demo find the agent.
const AGENT_BIN_VAR: &str = "TOKENMESH_AGENT_BIN";

#[derive(Parser)]
#[command(
    name = "xtask",
    bin_name = "cargo xtask",
    about = "Developer and CI tasks for tokenmesh"
)]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and the tests need and are missing: rust-src for nightly,
    /// bpf-linker, the musl target, iproute2, curl, podman, musl-tools, binutils, the
    /// identity provider's npm packages, and kubectl, kubernetes-validate and Checkov for
    /// the manifest checks.
    Setup,
    /// Run setup, then build every binary of the workspace in release mode.
    Build,
    /// Run setup, then build the agent image from deploy/Containerfile with podman: a
    /// static musl release build of every binary of the agent package, stripped into
    /// target/image, the build context.
    Image {
        /// Name and tag of the image [default: localhost/tokenmesh-agent:VERSION].
        #[arg(long)]
        tag: Option<String>,
    },
    /// Run setup, build the test image (`localhost/tokenmesh-test-image:PID`), then run
    /// every unit and end-to-end test of the workspace, then remove the image (needs root).
    Test {
        /// Arguments passed on to `cargo test`, for example `-p tokenmesh-e2e --test topology`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        cargo_args: Vec<String>,
    },
    /// Run setup, build, then the demo on this machine (needs root).
    Demo {
        /// Arguments passed on to the demo binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        demo_args: Vec<String>,
    },
    /// Remove network namespaces (`tm-*`), cgroups and bpffs folders (`tokenmesh-test-*`)
    /// left behind by test runs whose process has exited.
    Cleanup {
        /// Also remove the ones whose test process is still running.
        #[arg(long)]
        all: bool,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(&root),
        Task::Build => {
            setup::run(&root)?;
            build_release(&root)
        }
        Task::Image { tag } => {
            setup::run(&root)?;
            let metadata = Metadata::read(&root)?;
            let tag = match tag {
                Some(tag) => tag,
                None => image::default_tag(&metadata)?,
            };
            image::build(&root, &metadata, &tag)?;
            Ok(())
        }
        Task::Test { .. } => {
            let cargo_args = args_after_task("test");
            require_root("test")?;
            setup::run(&root)?;
            let metadata = Metadata::read(&root)?;
            // `cargo test` builds only the binaries of packages with integration tests, so
            // the agent package's binaries that the end-to-end tests start (the agent and
            // the CNI plugin beside it) are built here, never stale.
            command::run(Command::new("cargo").current_dir(&root).args([
                "build",
                "-p",
                AGENT_PACKAGE,
                "--bins",
            ]))?;
            let agent = metadata.target_dir.join("debug").join(AGENT_BINARY);
            let mut test_env = vec![(AGENT_BIN_VAR, agent.into_os_string())];

            // A failed image build does not stop the run: the image tests fail without
            // the image id, and the other tests still report.
            let image_tag = image::test_tag();
            let image = image::build(&root, &metadata, &image_tag);
            match &image {
                Ok(id) => test_env.push((image::TEST_IMAGE_VAR, OsString::from(id))),
                Err(error) => eprintln!("image build failed: {error:#}"),
            }

            let mut code = summary::run_cargo_test(&root, &cargo_args, &test_env)?;
            match image {
                Ok(_) => {
                    if let Err(error) = image::remove(&image_tag) {
                        println!("tests failed: the test image was not removed: {error:#}");
                        code = 1;
                    }
                }
                Err(error) => {
                    println!("tests failed: the image build failed: {error:#}");
                    code = 1;
                }
            }
            std::process::exit(code);
        }
        Task::Demo { .. } => {
            let demo_args = args_after_task("demo");
            require_root("demo")?;
            setup::run(&root)?;
            let metadata = Metadata::read(&root)?;
            metadata.ensure_demo_binary()?;
            build_release(&root)?;
            command::run(
                Command::new("cargo")
                    .current_dir(&root)
                    .args([
                        "run",
                        "--release",
                        "-p",
                        DEMO_PACKAGE,
                        "--bin",
                        DEMO_BINARY,
                        "--",
                    ])
                    .args(&demo_args)
                    .env(
                        AGENT_BIN_VAR,
                        metadata.target_dir.join("release").join(AGENT_BINARY),
                    ),
            )
        }
        Task::Cleanup { all } => {
            require_root("cleanup")?;
            cleanup::run(all)
        }
    }
}

/// Returns the command-line arguments after the task name, as given. clap drops a leading
/// `--`, which `cargo xtask test -- --nocapture` needs to pass on to `cargo test`.
fn args_after_task(task: &str) -> Vec<String> {
    std::env::args()
        .skip(1)
        .skip_while(|arg| arg != task)
        .skip(1)
        .collect()
}

fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .expect("xtask lives one folder below the workspace root")
        .to_path_buf()
}

fn build_release(root: &Path) -> Result<()> {
    command::run(Command::new("cargo").current_dir(root).args([
        "build",
        "--release",
        "--workspace",
        "--bins",
    ]))
}

/// Fails unless the process runs as root, which the eBPF loads and namespace setup need.
fn require_root(task: &str) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "`cargo xtask {task}` must run as root because it loads eBPF programs and creates \
             network namespaces and cgroups: run as root, e.g. `sudo -E cargo xtask {task}`"
        );
    }
    Ok(())
}

/// The parts of `cargo metadata --no-deps` that xtask uses.
struct Metadata {
    target_dir: PathBuf,
    packages: Vec<serde_json::Value>,
}

impl Metadata {
    fn read(root: &Path) -> Result<Metadata> {
        let output = command::output(Command::new("cargo").current_dir(root).args([
            "metadata",
            "--no-deps",
            "--format-version",
            "1",
        ]))?;
        let metadata: serde_json::Value =
            serde_json::from_str(&output).context("failed to parse `cargo metadata` output")?;
        let target_dir = metadata["target_directory"]
            .as_str()
            .context("`cargo metadata` output has no target_directory")?;
        Ok(Metadata {
            target_dir: PathBuf::from(target_dir),
            packages: metadata["packages"].as_array().cloned().unwrap_or_default(),
        })
    }

    fn package(&self, name: &str) -> Result<&serde_json::Value> {
        self.packages
            .iter()
            .find(|package| package["name"] == name)
            .with_context(|| format!("`cargo metadata` lists no package `{name}`"))
    }

    fn package_version(&self, name: &str) -> Result<&str> {
        self.package(name)?["version"]
            .as_str()
            .with_context(|| format!("`cargo metadata` lists no version for package `{name}`"))
    }

    /// Returns the names of a package's bin targets: its `[[bin]]` sections, or the
    /// binaries cargo finds on its own, such as `src/main.rs`.
    fn binary_names(&self, name: &str) -> Result<Vec<String>> {
        let targets = self.package(name)?["targets"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let names: Vec<String> = targets
            .iter()
            .filter(|target| {
                target["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
            })
            .filter_map(|target| target["name"].as_str().map(str::to_owned))
            .collect();
        if names.is_empty() {
            bail!("package `{name}` has no bin target");
        }
        Ok(names)
    }

    /// Fails with a clear message when the e2e package has no demo binary yet.
    fn ensure_demo_binary(&self) -> Result<()> {
        let has_demo = self
            .binary_names(DEMO_PACKAGE)?
            .iter()
            .any(|name| name == DEMO_BINARY);
        if !has_demo {
            bail!(
                "the demo binary `{DEMO_BINARY}` does not exist yet: package `{DEMO_PACKAGE}` \
                 (tests/e2e) has no bin target of that name"
            );
        }
        Ok(())
    }
}
