//! `cargo xtask test`: runs `cargo test` over the workspace and closes with one line that
//! adds up the `test result:` lines of every test binary.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{Context, Result};

use crate::command;

/// Counts from libtest's `test result:` lines.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
    /// Test binaries that reported a result.
    pub suites: u64,
}

impl Totals {
    /// Adds the counts of a line such as
    /// `test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s`.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        self.suites += 1;
        let counts = rest.split_once(". ").map_or(rest, |(_, counts)| counts);
        for field in counts.split("; ") {
            let Some((number, label)) = field.split_once(' ') else {
                continue;
            };
            let Ok(number) = number.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += number,
                "failed" => self.failed += number,
                "ignored" => self.ignored += number,
                _ => {}
            }
        }
    }

    /// Formats the closing line: `total: N passed, N failed`, with `, N skipped` for
    /// ignored tests.
    pub fn closing_line(&self) -> String {
        let mut line = format!("total: {} passed, {} failed", self.passed, self.failed);
        if self.ignored > 0 {
            line.push_str(&format!(", {} skipped", self.ignored));
        }
        line
    }
}

/// Runs `cargo test --workspace --no-fail-fast` with `extra_args` and the environment
/// variables `env`, passing its output through. Returns the exit code for xtask: 0 only
/// when cargo succeeded and at least one test ran, or `extra_args` may have filtered every
/// test out.
pub fn run_cargo_test(root: &Path, extra_args: &[String], env: &[(&str, OsString)]) -> Result<i32> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(extra_args)
        .envs(env.iter().map(|(name, value)| (*name, value)))
        .stdout(Stdio::piped());
    let line = command::display(&cmd);
    println!("+ {line}");
    let mut child = cmd
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;

    let mut totals = Totals::default();
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut pending = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let count = stdout
            .read(&mut buffer)
            .context("failed to read the output of cargo test")?;
        if count == 0 {
            break;
        }
        // Write through at once, because libtest prints `test name ...` before the verdict.
        let mut out = std::io::stdout().lock();
        out.write_all(&buffer[..count])?;
        out.flush()?;
        pending.extend_from_slice(&buffer[..count]);
        while let Some(end) = pending.iter().position(|byte| *byte == b'\n') {
            let text: Vec<u8> = pending.drain(..=end).collect();
            totals.add_line(&String::from_utf8_lossy(&text));
        }
    }
    totals.add_line(&String::from_utf8_lossy(&pending));
    let status = child.wait().context("failed to wait for cargo test")?;

    let mut code = 0;
    if !status.success() {
        println!("tests failed: `{line}` exited with {status}");
        code = 1;
    } else if totals.passed + totals.failed == 0 && extra_args.is_empty() {
        println!("tests failed: `{line}` ran no test");
        code = 1;
    }
    println!("{}", totals.closing_line());
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::Totals;

    #[test]
    fn totals_add_up_result_lines() {
        let mut totals = Totals::default();
        totals.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s\n");
        totals.add_line("test result: FAILED. 2 passed; 4 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1.20s");
        assert_eq!(totals.passed, 5);
        assert_eq!(totals.failed, 4);
        assert_eq!(totals.ignored, 1);
        assert_eq!(totals.suites, 2);
    }

    #[test]
    fn totals_skip_other_lines() {
        let mut totals = Totals::default();
        totals.add_line("test topology::pods_reach_each_other ... ok");
        totals.add_line("     Running tests/topology.rs (target/debug/deps/topology-0123)");
        assert_eq!(totals, Totals::default());
    }

    #[test]
    fn closing_line_mentions_skipped_only_when_some_were() {
        let mut totals = Totals {
            passed: 7,
            failed: 1,
            ignored: 0,
            suites: 2,
        };
        assert_eq!(totals.closing_line(), "total: 7 passed, 1 failed");
        totals.ignored = 2;
        assert_eq!(
            totals.closing_line(),
            "total: 7 passed, 1 failed, 2 skipped"
        );
    }
}
