//! `cargo xtask setup`: installs what the build and the tests need and are missing.
//! Every check is cheap, so a run on a machine that has everything takes seconds.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{command, image};

/// Commands the end-to-end tests run, with the Debian package that provides each. The
/// image build's commands are in `image::TOOLS`.
const DEBIAN_TOOLS: &[(&str, &str)] = &[("ip", "iproute2"), ("curl", "curl")];

/// Folder of the identity provider that the end-to-end tests start with Node.js.
const IDP_DIR: &str = "tests/idp";

pub fn run(root: &Path) -> Result<()> {
    let mut installed = Vec::new();
    ensure_rust_src(&mut installed)?;
    ensure_bpf_linker(&mut installed)?;
    ensure_musl_target(&mut installed)?;
    ensure_debian_tools(&mut installed)?;
    ensure_idp_packages(root, &mut installed)?;
    crate::manifests::ensure_tools(&mut installed)?;
    if installed.is_empty() {
        println!("setup: nothing to install");
    } else {
        println!("setup: installed {}", installed.join(", "));
    }
    Ok(())
}

/// Installs rust-src for nightly, which the eBPF build needs to compile `core` for the
/// bpfel-unknown-none target.
fn ensure_rust_src(installed: &mut Vec<String>) -> Result<()> {
    let components = command::output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context(
        "failed to list the components of the nightly toolchain, which builds the eBPF \
         programs: install it with `rustup toolchain install nightly`",
    )?;
    if components.lines().any(|line| line.starts_with("rust-src")) {
        return Ok(());
    }
    println!("setup: installing rust-src for the nightly toolchain");
    command::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    installed.push("rust-src (nightly)".to_owned());
    Ok(())
}

/// Installs the rustup target of the image's static binaries.
fn ensure_musl_target(installed: &mut Vec<String>) -> Result<()> {
    let targets = command::output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if targets
        .lines()
        .any(|line| line.trim() == image::MUSL_TARGET)
    {
        return Ok(());
    }
    println!("setup: installing the rustup target {}", image::MUSL_TARGET);
    command::run(Command::new("rustup").args(["target", "add", image::MUSL_TARGET]))?;
    installed.push(format!("rustup target {}", image::MUSL_TARGET));
    Ok(())
}

/// Checks bpf-linker the way the eBPF build runs it: under nightly, whose `lib` folder
/// rustup puts on the library path, because bpf-linker links to the nightly's libLLVM.
fn bpf_linker_works() -> bool {
    command::succeeds(Command::new("rustup").args(["run", "nightly", "bpf-linker", "--version"]))
}

/// Builds bpf-linker against the LLVM shared library that ships with the nightly
/// toolchain, so it needs no system LLVM and matches the LLVM that rustc emits bitcode for.
fn ensure_bpf_linker(installed: &mut Vec<String>) -> Result<()> {
    if bpf_linker_works() {
        return Ok(());
    }
    let sysroot = command::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let (library, major) = find_rust_llvm(&Path::new(sysroot.trim()).join("lib"))?;

    // llvm-sys links to `$LLVM_PREFIX/lib/libLLVM.so`, and the nightly ships the library
    // only under its versioned name, so a folder with one link stands in for an LLVM install.
    let prefix = std::env::temp_dir().join(format!("tokenmesh-llvm-prefix-{}", std::process::id()));
    fs::create_dir_all(prefix.join("lib"))
        .with_context(|| format!("failed to create {}", prefix.display()))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = fs::remove_file(&link);
    symlink(&library, &link)
        .with_context(|| format!("failed to create the link {}", link.display()))?;

    println!(
        "setup: installing bpf-linker, built against {}",
        library.display()
    );
    let mut install = Command::new("cargo");
    install
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix);
    if command::find_program("bpf-linker").is_some() {
        // The binary on PATH does not run with the nightly's LLVM, so replace it.
        install.arg("--force");
    }
    let result = command::run(&mut install);
    let _ = fs::remove_dir_all(&prefix);
    result?;

    if !bpf_linker_works() {
        bail!(
            "bpf-linker was installed but `rustup run nightly bpf-linker --version` still \
             fails: check that cargo's bin folder (usually ~/.cargo/bin) is on PATH"
        );
    }
    installed.push("bpf-linker".to_owned());
    Ok(())
}

/// Finds the nightly's `libLLVM.so.<major>.<minor>-rust-…` in `lib_dir` and returns its
/// path and LLVM major version.
fn find_rust_llvm(lib_dir: &Path) -> Result<(PathBuf, u32)> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("failed to read {}", lib_dir.display()))?;
    for entry in entries {
        let entry = entry?;
        if let Some(major) = entry.file_name().to_str().and_then(llvm_major_version) {
            return Ok((entry.path(), major));
        }
    }
    bail!(
        "no libLLVM.so.* in {}: the nightly toolchain should ship its LLVM there; \
         reinstall it with `rustup toolchain install nightly --force`",
        lib_dir.display()
    )
}

/// Parses the LLVM major version from a file name such as `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major_version(file_name: &str) -> Option<u32> {
    let version = file_name.strip_prefix("libLLVM.so.")?;
    let digits: String = version.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Debian packages installed with their recommended packages.
const WITH_RECOMMENDS: &[&str] = &["podman"];

/// Installs the Debian packages of missing commands, running `apt-get update` first only
/// when something has to be installed.
// NOTE: the install branch has not run yet, because every machine it was tried on already
// had these commands.
fn ensure_debian_tools(installed: &mut Vec<String>) -> Result<()> {
    let tools = || DEBIAN_TOOLS.iter().chain(image::TOOLS);
    let missing: Vec<&str> = tools()
        .filter(|(program, _)| command::find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if command::find_program("apt-get").is_none() {
        bail!(
            "missing commands; install these packages with the system's package manager: {}",
            missing.join(" ")
        );
    }
    println!("setup: installing Debian packages {}", missing.join(" "));
    command::run(
        Command::new("apt-get")
            .arg("update")
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    // podman's recommended packages (buildah, fuse-overlayfs, slirp4netns, uidmap) are
    // installed with it, as on the machines where the image build was tried.
    let (with_recommends, plain): (Vec<&str>, Vec<&str>) = missing
        .iter()
        .partition(|package| WITH_RECOMMENDS.contains(package));
    for (packages, options) in [
        (plain, &["install", "-y", "--no-install-recommends"][..]),
        (with_recommends, &["install", "-y"][..]),
    ] {
        if packages.is_empty() {
            continue;
        }
        command::run(
            Command::new("apt-get")
                .args(options)
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    }
    for (program, package) in tools() {
        if command::find_program(program).is_none() {
            bail!("`{program}` is still not on PATH after installing the Debian package {package}");
        }
    }
    installed.extend(missing.iter().map(|package| package.to_string()));
    Ok(())
}

/// Runs `npm ci` for the identity provider when `node_modules` is missing or older
/// than `package-lock.json`.
fn ensure_idp_packages(root: &Path, installed: &mut Vec<String>) -> Result<()> {
    let dir = root.join(IDP_DIR);
    let lock = dir.join("package-lock.json");
    let Ok(lock_modified) = fs::metadata(&lock).and_then(|metadata| metadata.modified()) else {
        return Ok(());
    };
    let modules_modified =
        fs::metadata(dir.join("node_modules")).and_then(|metadata| metadata.modified());
    if modules_modified.is_ok_and(|modified| modified >= lock_modified) {
        return Ok(());
    }
    if command::find_program("npm").is_none() {
        bail!("npm is missing: the identity provider in {IDP_DIR} needs Node.js 20 and npm");
    }
    println!("setup: installing the npm packages of {IDP_DIR} (npm ci)");
    command::run(
        Command::new("npm")
            .current_dir(&dir)
            .args(["ci", "--no-audit", "--no-fund"]),
    )?;
    installed.push(format!("npm packages of {IDP_DIR}"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::llvm_major_version;

    #[test]
    fn llvm_version_from_rust_library_name() {
        assert_eq!(
            llvm_major_version("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some(22)
        );
        assert_eq!(
            llvm_major_version("libLLVM.so.19.1-rust-1.84.0-nightly"),
            Some(19)
        );
    }

    #[test]
    fn llvm_version_rejects_other_files() {
        assert_eq!(
            llvm_major_version("libLLVM-22-rust-1.97.0-nightly.so"),
            None
        );
        assert_eq!(
            llvm_major_version("librustc_driver-b5a965480ee51f9a.so"),
            None
        );
        assert_eq!(llvm_major_version("libLLVM.so."), None);
    }
}
