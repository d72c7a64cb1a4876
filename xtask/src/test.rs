//! `cargo xtask test`: the one command CI runs. Formatting, clippy, every test in the
//! workspace, then a check that the tests left no namespace, mount or process behind.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flatwire_tests::netns::{NS_PREFIX, harness_namespaces, owner_alive};

use crate::table::Table;

/// Options of `cargo xtask test`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Skip `cargo fmt --check` and clippy (for a quick local re-run of the tests).
    #[arg(long)]
    no_lint: bool,
    /// Extra arguments for `cargo test` (e.g. `-p flatwire-vl1`, or `-- name_filter`).
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// Outcome of one step.
struct Step {
    name: &'static str,
    ok: bool,
    seconds: f64,
    detail: String,
}

/// Runs every step (even after a failure, so the summary is complete) and fails if any did.
pub fn run(args: &Args) -> Result<()> {
    let mut steps = Vec::new();
    let mut step = |name: &'static str, f: &mut dyn FnMut() -> Result<String>| {
        println!("==> {name}");
        let started = Instant::now();
        let result = f();
        let seconds = started.elapsed().as_secs_f64();
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(e) => {
                eprintln!("{name} failed: {e:#}");
                (
                    false,
                    format!("{e:#}").lines().next().unwrap_or("").to_owned(),
                )
            }
        };
        steps.push(Step {
            name,
            ok,
            seconds,
            detail,
        });
    };

    step("tools installed", &mut || {
        crate::tools::check_installed().map(|()| "all pinned tools found".into())
    });
    if !args.no_lint {
        step("cargo fmt --check", &mut || {
            cargo(&["fmt", "--all", "--", "--check"]).map(|()| "formatted".into())
        });
        step("cargo clippy -D warnings", &mut || {
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--quiet",
                "--",
                "-D",
                "warnings",
            ])
            .map(|()| "no warnings".into())
        });
    }
    let before = orphaned_processes();
    let mut counts = Counts::default();
    step("cargo test", &mut || {
        counts = cargo_test(&args.cargo_test_args)?;
        if counts.failed > 0 {
            bail!("{} tests failed", counts.failed);
        }
        Ok(format!(
            "{} passed, {} ignored",
            counts.passed, counts.ignored
        ))
    });
    step("nothing left behind", &mut || leftovers(&before));

    let mut table = Table::new(&["step", "result", "seconds", "detail"]);
    for s in &steps {
        table.row(&[
            s.name,
            if s.ok { "ok" } else { "FAILED" },
            &format!("{:.1}", s.seconds),
            &s.detail,
        ]);
    }
    println!();
    table.print();
    println!("{} passed, {} failed", counts.passed, counts.failed);
    if steps.iter().any(|s| !s.ok) {
        bail!("cargo xtask test failed");
    }
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} exited with {status}", args.join(" "));
    }
    Ok(())
}

/// Test counts summed over every `test result:` line of a cargo test run.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Counts {
    /// Adds the figures of one `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            let (Some(n), Some(what)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                "ignored" => self.ignored += n,
                _ => {}
            }
        }
    }
}

/// Runs `cargo test --workspace`, streaming its output and counting results.
fn cargo_test(extra: &[String]) -> Result<Counts> {
    let mut cmd = Command::new(env!("CARGO"));
    cmd.arg("test").current_dir(workspace_root());
    if !extra
        .iter()
        .any(|a| a == "-p" || a.starts_with("--package"))
    {
        cmd.arg("--workspace");
    }
    cmd.args(extra).stdout(Stdio::piped());
    let mut child = cmd.spawn().context("running cargo test")?;
    let mut counts = Counts::default();
    let stdout = child.stdout.take().expect("stdout is piped");
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        counts.add_line(&line);
    }
    let status = child.wait()?;
    if !status.success() && counts.failed == 0 {
        bail!("cargo test exited with {status} (a build error or a crashed test binary)");
    }
    Ok(counts)
}

/// Binaries whose processes the tests start and must end.
const WATCHED: &[&str] = &[
    "etcd",
    "kube-apiserver",
    "kubelet",
    "iperf3",
    "flatwire-agent",
    "flatwire-operator",
    "zerotier-one",
];

/// Running processes of the watched binaries that have been orphaned (re-parented to PID 1):
/// what a test that forgot to end its children leaves. Children of a run still in progress
/// (say, another checkout's tests) keep their parent and are not counted.
fn orphaned_processes() -> BTreeSet<(u32, String)> {
    watched_processes()
        .into_iter()
        .filter(|(pid, _)| parent_pid(*pid) == Some(1))
        .collect()
}

fn parent_pid(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// PIDs of running processes of the watched binaries.
fn watched_processes() -> BTreeSet<(u32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return BTreeSet::new();
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let name = exe.file_name()?.to_str()?.to_owned();
            WATCHED.contains(&name.as_str()).then_some((pid, name))
        })
        .collect()
}

/// Fails if the run left harness namespaces (whose creating process is gone), their mounts,
/// or new orphaned watched processes.
fn leftovers(before: &BTreeSet<(u32, String)>) -> Result<String> {
    let mut problems = Vec::new();
    let namespaces: Vec<String> = harness_namespaces()
        .into_iter()
        .filter(|ns| !owner_alive(ns))
        .collect();
    if !namespaces.is_empty() {
        problems.push(format!("namespaces left: {}", namespaces.join(" ")));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let ns_mounts: Vec<&str> = mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .filter(|m| {
            Path::new(m)
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(NS_PREFIX) && !owner_alive(n))
        })
        .collect();
    if !ns_mounts.is_empty() {
        problems.push(format!("netns mounts left: {}", ns_mounts.join(" ")));
    }
    let leaked: Vec<String> = orphaned_processes()
        .difference(before)
        .map(|(pid, name)| format!("{name} (pid {pid})"))
        .collect();
    if !leaked.is_empty() {
        problems.push(format!("processes left: {}", leaked.join(", ")));
    }
    if problems.is_empty() {
        Ok("no namespace, mount or process".into())
    } else {
        bail!("{}", problems.join("; "))
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_lines_are_summed() {
        let mut c = Counts::default();
        c.add_line("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s");
        c.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        c.add_line("running 5 tests");
        assert_eq!(
            c,
            Counts {
                passed: 15,
                failed: 2,
                ignored: 1
            }
        );
    }
}
