//! `cargo xtask crds`: regenerates `crds/*.yaml` from the operator's Rust types, and the
//! chart's copy in `charts/flatwire/files/crds/` (helm can only read files in the chart).
//!
//! The YAML comes from `flatwire-operator crds`, so xtask itself never builds kube or
//! k8s-openapi; `operator/tests/crds.rs` checks the files match what the types generate.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// Runs `flatwire-operator crds <args>` through cargo and returns its stdout.
fn operator_crds(root: &Path, args: &[&str]) -> Result<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["run", "--quiet", "-p", "flatwire-operator", "--", "crds"])
        .args(args)
        .output()
        .context("running `cargo run -p flatwire-operator -- crds`")?;
    if !out.status.success() {
        bail!(
            "flatwire-operator crds {}: {}\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8(out.stdout).context("flatwire-operator printed non-UTF-8")
}

/// Writes `<dir>/<name>.yaml` for every CRD the operator defines, in `crds/` and in the
/// chart, and prints each path.
pub fn run() -> Result<()> {
    let root = root();
    let dirs = [root.join("crds"), root.join("charts/flatwire/files/crds")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for name in operator_crds(&root, &["--list"])?.lines() {
        let yaml = operator_crds(&root, &["--name", name])?;
        for dir in &dirs {
            let path = dir.join(format!("{name}.yaml"));
            std::fs::write(&path, &yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("{}", path.display());
        }
    }
    Ok(())
}
