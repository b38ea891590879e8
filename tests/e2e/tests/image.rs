//! The agent's container image, which `cargo xtask test` builds from deploy/Containerfile
//! and passes here by id in `TOKENMESH_TEST_IMAGE`. The tests check the image config as
//! `podman image inspect` reports it, that the image contains exactly the binaries of the
//! agent package, and that each is static. They then run the agent binary taken out of
//! the image on this host.
//!
//! The container itself is not started: on the test machines root lacks
//! `CAP_SYS_RESOURCE`, so podman's runtime (crun) fails to set the container's resource
//! limits (`setrlimit RLIMIT_NOFILE: Operation not permitted`).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

const IMAGE_VAR: &str = "TOKENMESH_TEST_IMAGE";
const AGENT_PACKAGE: &str = "tokenmesh-agent";
const AGENT_BINARY: &str = "tokenmesh-agent";

/// Program header types and dynamic section tags from the ELF specification.
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// Returns the id of the image under test.
fn image_id() -> Result<String> {
    match std::env::var(IMAGE_VAR) {
        Ok(id) if !id.is_empty() => Ok(id),
        _ => bail!(
            "{IMAGE_VAR} is not set: run the tests with `cargo xtask test`, which builds the \
             image and sets it. If it ran, the image build failed, and its error is printed \
             before the tests."
        ),
    }
}

/// Runs a command and returns its stdout. Fails with its stderr unless it exits with 0.
fn output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("failed to start {command:?}"))?;
    ensure!(
        output.status.success(),
        "{command:?} failed with {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// Reads the agent package's entry from `cargo metadata`.
fn agent_package() -> Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.toml");
    let text = output(
        Command::new(cargo)
            .args([
                "metadata",
                "--no-deps",
                "--format-version",
                "1",
                "--manifest-path",
            ])
            .arg(manifest),
    )?;
    let metadata: Value = serde_json::from_str(&text)?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == AGENT_PACKAGE)
        .cloned()
        .with_context(|| format!("`cargo metadata` lists no package {AGENT_PACKAGE}"))
}

/// Names of the agent package's bin targets. xtask reads the same list to fill the build
/// context, and the test reads it again on its own, so a binary missing from the image fails.
fn package_binaries() -> Result<BTreeSet<String>> {
    let package = agent_package()?;
    let binaries: BTreeSet<String> = package["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|target| {
            target["kind"]
                .as_array()
                .is_some_and(|kinds| kinds.iter().any(|kind| kind == "bin"))
        })
        .filter_map(|target| target["name"].as_str().map(str::to_owned))
        .collect();
    ensure!(!binaries.is_empty(), "{AGENT_PACKAGE} has no bin target");
    Ok(binaries)
}

/// A container created from the image and never started, removed on drop.
struct Container {
    name: String,
}

impl Container {
    fn create(image: &str, purpose: &str) -> Result<Container> {
        let name = format!("tokenmesh-test-{}-{purpose}", std::process::id());
        output(Command::new("podman").args(["create", "--name", &name, image]))?;
        Ok(Container { name })
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let removed = Command::new("podman")
            .args(["rm", "--force", &self.name])
            .output();
        if !removed.is_ok_and(|output| output.status.success()) {
            eprintln!("failed to remove the test container {}", self.name);
        }
    }
}

/// Writes the image's file system as a tar file in `dir`, through a container that is
/// created, exported and removed.
fn export_image(dir: &Path, purpose: &str) -> Result<PathBuf> {
    let container = Container::create(&image_id()?, purpose)?;
    let tar = dir.join("rootfs.tar");
    output(
        Command::new("podman")
            .args(["export", "--output"])
            .arg(&tar)
            .arg(&container.name),
    )?;
    Ok(tar)
}

/// Lists the entries of a tar file, without a leading `./` or a trailing `/`.
fn tar_entries(tar: &Path) -> Result<BTreeSet<String>> {
    let listing = output(Command::new("tar").arg("--list").arg("--file").arg(tar))?;
    Ok(listing
        .lines()
        .map(|line| line.trim_start_matches("./").trim_end_matches('/'))
        .filter(|name| !name.is_empty() && *name != ".")
        .map(str::to_owned)
        .collect())
}

/// Exports the image and unpacks its file system into `dir`/rootfs.
fn unpack_image(dir: &Path, purpose: &str) -> Result<PathBuf> {
    let tar = export_image(dir, purpose)?;
    let rootfs = dir.join("rootfs");
    std::fs::create_dir(&rootfs)?;
    output(
        Command::new("tar")
            .arg("--extract")
            .arg("--file")
            .arg(&tar)
            .arg("--directory")
            .arg(&rootfs),
    )?;
    Ok(rootfs)
}

/// How an ELF file is linked: the program interpreter (dynamic loader) it requests and
/// the number of shared libraries its dynamic section names.
#[derive(Debug)]
struct ElfLinking {
    interpreter: Option<String>,
    needed_libraries: usize,
}

fn read_bytes<const N: usize>(bytes: &[u8], offset: usize) -> Result<[u8; N]> {
    let slice = bytes
        .get(offset..offset + N)
        .with_context(|| format!("the ELF file ends before offset {}", offset + N))?;
    Ok(slice.try_into()?)
}

/// Reads the program headers of a 64-bit little-endian ELF file.
fn elf_linking(bytes: &[u8]) -> Result<ElfLinking> {
    ensure!(bytes.starts_with(b"\x7fELF"), "not an ELF file");
    ensure!(bytes.get(4) == Some(&2), "not a 64-bit ELF file");
    ensure!(bytes.get(5) == Some(&1), "not a little-endian ELF file");
    let headers_offset = u64::from_le_bytes(read_bytes(bytes, 0x20)?) as usize;
    let header_size = u16::from_le_bytes(read_bytes(bytes, 0x36)?) as usize;
    let header_count = u16::from_le_bytes(read_bytes(bytes, 0x38)?) as usize;

    let mut linking = ElfLinking {
        interpreter: None,
        needed_libraries: 0,
    };
    for index in 0..header_count {
        let header = headers_offset + index * header_size;
        let segment_type = u32::from_le_bytes(read_bytes(bytes, header)?);
        let offset = u64::from_le_bytes(read_bytes(bytes, header + 8)?) as usize;
        let size = u64::from_le_bytes(read_bytes(bytes, header + 32)?) as usize;
        let contents = bytes
            .get(offset..offset + size)
            .with_context(|| format!("program header {index} points outside the file"))?;
        match segment_type {
            PT_INTERP => {
                let path = String::from_utf8_lossy(contents);
                linking.interpreter = Some(path.trim_end_matches('\0').to_owned());
            }
            PT_DYNAMIC => {
                for entry in contents.chunks_exact(16) {
                    let tag = u64::from_le_bytes(read_bytes(entry, 0)?);
                    if tag == DT_NULL {
                        break;
                    }
                    if tag == DT_NEEDED {
                        linking.needed_libraries += 1;
                    }
                }
            }
            _ => {}
        }
    }
    Ok(linking)
}

#[test]
fn image_config_runs_agent() -> Result<()> {
    let text = output(Command::new("podman").args([
        "image",
        "inspect",
        "--format",
        "json",
        &image_id()?,
    ]))?;
    let inspected: Value = serde_json::from_str(&text)?;
    let image = &inspected[0];
    let config = &image["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!([format!("/{AGENT_BINARY}")]),
        "{config:#}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/tokenmesh/config/agent.yaml"]),
        "{config:#}"
    );
    assert_eq!(config["User"], "0:0", "{config:#}");
    assert_eq!(image["Os"], "linux");
    assert_eq!(image["Architecture"], "amd64");
    Ok(())
}

#[test]
fn image_contains_only_package_binaries() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tar = export_image(dir.path(), "image-files")?;
    assert_eq!(
        tar_entries(&tar)?,
        package_binaries()?,
        "the image's files (left) differ from the agent package's binaries (right); \
         deploy/Containerfile needs one COPY line for each binary"
    );
    Ok(())
}

#[test]
fn image_binaries_are_static() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rootfs = unpack_image(dir.path(), "image-static")?;
    for name in package_binaries()? {
        let bytes = std::fs::read(rootfs.join(&name))
            .with_context(|| format!("{name} is not in the image"))?;
        let linking = elf_linking(&bytes).with_context(|| format!("{name} in the image"))?;
        assert_eq!(linking.interpreter, None, "{name} requests a loader");
        assert_eq!(linking.needed_libraries, 0, "{name} needs shared libraries");
    }
    Ok(())
}

#[test]
fn static_check_detects_dynamic_binary() -> Result<()> {
    // A control for the test above: this test program is linked against glibc.
    let bytes = std::fs::read(std::env::current_exe()?)?;
    let linking = elf_linking(&bytes)?;
    let interpreter = linking.interpreter.unwrap_or_default();
    assert!(interpreter.contains("ld-linux"), "{interpreter:?}");
    assert!(linking.needed_libraries > 0);
    Ok(())
}

#[test]
fn extracted_agent_runs_on_host() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let rootfs = unpack_image(dir.path(), "image-run")?;
    let agent = rootfs.join(AGENT_BINARY);

    let version = output(Command::new(&agent).arg("--version"))?;
    let package_version = agent_package()?["version"]
        .as_str()
        .context("the agent package has no version")?
        .to_owned();
    assert_eq!(version, format!("{AGENT_BINARY} {package_version}\n"));

    // Every URL points to loopback port 9, where nothing listens, in case check-config
    // ever sends a request.
    let config_dir = dir.path().join("config");
    std::fs::create_dir(&config_dir)?;
    let secret = config_dir.join("frontend.secret");
    std::fs::write(&secret, "placeholder-secret\n")?;
    let workloads = config_dir.join("workloads.yaml");
    std::fs::write(
        &workloads,
        "pods:
  - name: frontend-1
    namespace: shop
    service_account: frontend
    ip: 10.244.1.12
    netns: /run/netns/frontend-1
    cgroup: kubepods/frontend-1
  - name: echo-1
    namespace: shop
    service_account: echo
    ip: 10.244.1.13
    netns: /run/netns/echo-1
    cgroup: kubepods/echo-1
    protected_ports: [8080]
",
    )?;
    let config = config_dir.join("agent.yaml");
    std::fs::write(
        &config,
        format!(
            "workloads:
  file: {workloads}
steering:
  pods_cgroup: kubepods
  intercept_ports: [8080]
audit:
  path: {audit}
plugins:
  - id: frontend-token
    type: token-creator
    workloads:
      service_account: frontend
    parameters:
      token_endpoint: http://127.0.0.1:9/token
      client_id: frontend
      client_secret: file:{secret}
      scopes: [admin]
  - id: echo-validator
    type: token-validator
    workloads:
      service_account: echo
    parameters:
      introspection_url: http://127.0.0.1:9/introspect
      introspection_client_id: echo-validator
      introspection_client_secret: file:{secret}
      required_scopes: [admin]
      allowed_client_ids: [frontend]
      allowed_cidrs: [10.244.1.12/32]
",
            workloads = workloads.display(),
            audit = config_dir.join("audit.jsonl").display(),
            secret = secret.display(),
        ),
    )?;
    let checked = output(Command::new(&agent).arg("check-config").arg(&config))?;
    assert!(
        checked.contains("valid (2 plugins, 2 pods in"),
        "check-config printed: {checked}"
    );

    // Without the secret file the same config is invalid, so the check above read it.
    std::fs::remove_file(&secret)?;
    let rejected = Command::new(&agent)
        .arg("check-config")
        .arg(&config)
        .output()?;
    let stderr = String::from_utf8_lossy(&rejected.stderr);
    assert!(!rejected.status.success(), "check-config passed: {stderr}");
    assert!(
        stderr.contains(&secret.display().to_string()),
        "check-config did not name the missing secret file: {stderr}"
    );
    Ok(())
}
