//! `cargo xtask fuzz`: runs each cargo-fuzz target for a bounded time and prints a table.
//!
//! Not part of CI. Installs cargo-fuzz if it is missing, builds with `-s none` on the
//! stable toolchain and falls back to nightly if stable cannot build the targets.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::table::Table;

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run each target, in seconds.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets to run (default: every target in fuzz/Cargo.toml).
    targets: Vec<String>,
}

/// Seed inputs from the known-answer vectors, copied into a target's empty corpus.
const SEEDS: &[(&str, &[&str])] = &[
    ("vl1_world", &["planet/planet"]),
    (
        "vl1_identity",
        &[
            "identities/identity-1.secret",
            "identities/identity-1.public",
        ],
    ),
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Builds every target, runs each for `--seconds`, and prints target/runs/result.
pub fn run(args: &Args) -> Result<()> {
    ensure_cargo_fuzz()?;
    let root = root();
    let toolchain = pick_toolchain(&root)?;
    let targets = if args.targets.is_empty() {
        list_targets(&root, toolchain)?
    } else {
        args.targets.clone()
    };
    seed_corpora(&root, &targets)?;
    let mut table = Table::new(&["target", "fuzzed s", "wall s", "runs", "result"]);
    let mut failed = Vec::new();
    for t in &targets {
        println!("==> fuzz {t} for {} s", args.seconds);
        let started = Instant::now();
        let (ok, done, detail) = run_target(&root, toolchain, t, args.seconds)?;
        let wall = format!("{:.0}", started.elapsed().as_secs_f64());
        if !ok {
            failed.push(t.clone());
        }
        let (runs, fuzzed) = done.unwrap_or_else(|| ("-".into(), "-".into()));
        table.row(&[t, &fuzzed, &wall, &runs, &detail]);
    }
    table.print();
    if !failed.is_empty() {
        bail!("fuzz targets failed: {}", failed.join(", "));
    }
    Ok(())
}

fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    println!("==> cargo install cargo-fuzz --locked");
    let st = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("running cargo install")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed");
    }
    Ok(())
}

fn cargo_fuzz(toolchain: Option<&str>) -> Command {
    let mut c = Command::new("cargo");
    if let Some(t) = toolchain {
        c.arg(format!("+{t}"));
    }
    c.arg("fuzz");
    c
}

/// Stable if `cargo fuzz build -s none` works there, else nightly.
fn pick_toolchain(root: &Path) -> Result<Option<&'static str>> {
    for tc in [None, Some("nightly")] {
        println!(
            "==> cargo {}fuzz build -s none",
            tc.map_or(String::new(), |t| format!("+{t} "))
        );
        let st = cargo_fuzz(tc)
            .args(["build", "-s", "none"])
            .current_dir(root)
            .status()
            .context("running cargo fuzz build")?;
        if st.success() {
            return Ok(tc);
        }
    }
    bail!("cargo fuzz build -s none failed on both stable and nightly")
}

fn list_targets(root: &Path, toolchain: Option<&str>) -> Result<Vec<String>> {
    let out = cargo_fuzz(toolchain)
        .arg("list")
        .current_dir(root)
        .output()
        .context("running cargo fuzz list")?;
    if !out.status.success() {
        bail!("cargo fuzz list failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect())
}

fn seed_corpora(root: &Path, targets: &[String]) -> Result<()> {
    let vectors = root.join("../shared/spec/vectors/zt-one");
    for (target, files) in SEEDS {
        let dir = root.join("fuzz/corpus").join(target);
        if !targets.iter().any(|t| t == target) || dir.exists() {
            continue;
        }
        std::fs::create_dir_all(&dir)?;
        for f in *files {
            let src = vectors.join(f);
            if src.exists() {
                let name = f.replace('/', "_");
                std::fs::copy(&src, dir.join(name))
                    .with_context(|| format!("seeding {target} from {}", src.display()))?;
            }
        }
    }
    Ok(())
}

/// Runs and seconds fuzzed, as libFuzzer reported them.
type Done = (String, String);

/// Runs one target; returns (passed, (runs, seconds fuzzed), result text).
fn run_target(
    root: &Path,
    toolchain: Option<&str>,
    target: &str,
    seconds: u64,
) -> Result<(bool, Option<Done>, String)> {
    let out = cargo_fuzz(toolchain)
        .args(["run", "-s", "none", target, "--"])
        .arg(format!("-max_total_time={seconds}"))
        .current_dir(root)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running cargo fuzz run {target}"))?;
    let log = String::from_utf8_lossy(&out.stderr);
    let log_path = root.join("fuzz").join(format!("last-run-{target}.log"));
    let _ = std::fs::write(&log_path, log.as_bytes());
    let runs = parse_runs(&log);
    if out.status.success() {
        return Ok((true, runs, "ok".into()));
    }
    let artifact = log
        .lines()
        .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
        .map_or_else(
            || format!("FAILED (see {})", log_path.display()),
            |p| format!("CRASH {p}"),
        );
    Ok((false, runs, artifact))
}

/// Runs and seconds from libFuzzer's closing `Done N runs in S second(s)` line, or else
/// the run count of the last `#N` status line (after a crash).
fn parse_runs(log: &str) -> Option<Done> {
    if let Some(done) = log.lines().rev().find_map(|l| {
        let w: Vec<&str> = l.strip_prefix("Done ")?.split_whitespace().collect();
        Some((w.first()?.to_string(), w.get(3)?.to_string()))
    }) {
        return Some(done);
    }
    log.lines().rev().find_map(|l| {
        l.strip_prefix('#')
            .and_then(|r| r.split_whitespace().next())
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            .map(|n| (n.to_owned(), "-".to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_count_comes_from_libfuzzer_output() {
        let log = "#1024\tpulse  cov: 10\n#2048\tNEW cov: 11\nDone 123456 runs in 61 second(s)\n";
        let pair = |a: &str, b: &str| Some((a.to_owned(), b.to_owned()));
        assert_eq!(parse_runs(log), pair("123456", "61"));
        assert_eq!(parse_runs("#77\tNEW cov: 1\n==1== ERROR"), pair("77", "-"));
        assert_eq!(parse_runs("nothing"), None);
    }
}
