//! `cargo xtask image`: builds the container image of the agent package. The package's
//! binaries are built static for the musl target, stripped into `target/image`, and
//! `podman build` runs `deploy/Containerfile` with that folder as its build context.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{AGENT_PACKAGE, Metadata, command};

/// Target whose binaries link libc statically, so the image needs no files but them.
pub const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Repository of the images that `cargo xtask test` builds and `tests/e2e/tests/image.rs`
/// checks. Each run tags its image with its own process id, so runs at the same time
/// do not remove each other's image.
pub const TEST_REPOSITORY: &str = "localhost/tokenmesh-test-image";
/// Environment variable through which `tests/e2e/tests/image.rs` gets the image id.
pub const TEST_IMAGE_VAR: &str = "TOKENMESH_TEST_IMAGE";

const CONTAINERFILE: &str = "deploy/Containerfile";
/// Commands the image build runs, with the Debian package that provides each.
pub const TOOLS: &[(&str, &str)] = &[
    ("podman", "podman"),
    // The ring crate compiles C code for the musl target with musl-gcc.
    ("musl-gcc", "musl-tools"),
    ("strip", "binutils"),
];

/// Default tag of `cargo xtask image`: the agent package's name and version.
pub fn default_tag(metadata: &Metadata) -> Result<String> {
    let version = metadata.package_version(AGENT_PACKAGE)?;
    Ok(format!("localhost/{AGENT_PACKAGE}:{version}"))
}

/// Builds the image and tags it `tag`. Returns the image id.
pub fn build(root: &Path, metadata: &Metadata, tag: &str) -> Result<String> {
    let started = Instant::now();
    for (program, package) in TOOLS {
        if command::find_program(program).is_none() {
            bail!(
                "`{program}` is not on PATH, and the image build needs it: install the \
                 Debian package {package}, or run `cargo xtask setup` as root"
            );
        }
    }

    // Another xtask process may be building the same binaries and build context.
    let lock_path = metadata.target_dir.join("image.lock");
    let lock = File::create(&lock_path)
        .with_context(|| format!("failed to create {}", lock_path.display()))?;
    lock.lock()
        .with_context(|| format!("failed to lock {}", lock_path.display()))?;

    command::run(
        Command::new("cargo")
            .current_dir(root)
            .args(["build", "--release", "--target", MUSL_TARGET, "-p"])
            .arg(AGENT_PACKAGE)
            .arg("--bins")
            .env("CC_x86_64_unknown_linux_musl", "musl-gcc"),
    )?;

    let context = metadata.target_dir.join("image");
    copy_binaries(metadata, &context)?;

    command::run(
        Command::new("podman")
            .args(["build", "--file"])
            .arg(root.join(CONTAINERFILE))
            .args(["--tag", tag])
            .arg(&context),
    )?;
    let id = command::output(
        Command::new("podman").args(["image", "inspect", "--format", "{{.Id}}", tag]),
    )?
    .trim()
    .to_owned();
    drop(lock);
    println!(
        "image: built {tag} ({id}) in {} s",
        started.elapsed().as_secs()
    );
    Ok(id)
}

/// Returns the tag of this process's test image.
pub fn test_tag() -> String {
    format!("{TEST_REPOSITORY}:{}", std::process::id())
}

/// Removes an image and the intermediate images of its build.
pub fn remove(tag: &str) -> Result<()> {
    command::output(Command::new("podman").args(["rmi", tag]))?;
    Ok(())
}

/// Fills `context` with a stripped copy of every binary of the agent package and nothing
/// else, because podman sends the whole folder to the builder.
fn copy_binaries(metadata: &Metadata, context: &Path) -> Result<()> {
    if context.exists() {
        fs::remove_dir_all(context)
            .with_context(|| format!("failed to remove {}", context.display()))?;
    }
    fs::create_dir_all(context)
        .with_context(|| format!("failed to create {}", context.display()))?;

    let release_dir = metadata.target_dir.join(MUSL_TARGET).join("release");
    let binaries = metadata.binary_names(AGENT_PACKAGE)?;
    for name in &binaries {
        let built: PathBuf = release_dir.join(name);
        command::run(
            Command::new("strip")
                .arg("-o")
                .arg(context.join(name))
                .arg(&built),
        )?;
    }
    println!(
        "image: copied {} into {}",
        binaries.join(", "),
        context.display()
    );
    Ok(())
}
