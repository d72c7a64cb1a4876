//! `cargo xtask tools`: install and cache every pinned real tool, then print what is there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use flatwire_tests::tools::{self, Source, TOOLS, Tool};

use crate::table::Table;

/// Installs what is missing (Debian packages, Go builds) and prints tool, version, path.
pub fn run() -> Result<()> {
    let started = Instant::now();
    install_debian_packages()?;
    for tool in TOOLS {
        match tool.source {
            Source::Debian { .. } => {}
            Source::GoInstall { .. } | Source::GoModule { .. } => build_go_tool(tool)?,
        }
    }
    let mut table = Table::new(&["tool", "binary", "version", "path"]);
    for tool in TOOLS {
        for binary in tool.binaries {
            let path = tools::bin(binary)?;
            let version = reported_version(tool, binary, &path)?;
            table.row(&[tool.name, binary, &version, &path.display().to_string()]);
        }
    }
    table.print();
    println!(
        "tools ready in {:.1} s (cache: {})",
        started.elapsed().as_secs_f64(),
        tools::cache_root().display()
    );
    Ok(())
}

/// Ensures every pinned tool is installed, without installing anything.
pub fn check_installed() -> Result<()> {
    for tool in TOOLS {
        for binary in tool.binaries {
            tools::bin(binary)?;
        }
    }
    Ok(())
}

fn install_debian_packages() -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter_map(|t| match t.source {
            Source::Debian { package } => Some(package),
            _ => None,
        })
        .filter(|package| !debian_installed(package))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("installing Debian packages: {}", missing.join(" "));
    sh(Command::new("apt-get").arg("update").arg("-qq"))?;
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn debian_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && o.stdout.ends_with(b"install ok installed"))
}

/// Builds a Go tool into `<cache>/<name>-<version>/` unless every binary is already there.
/// The build goes to a scratch directory that is renamed into place, so a broken build never
/// leaves a half-filled cache entry.
fn build_go_tool(tool: &Tool) -> Result<()> {
    let dir = tool.cache_dir();
    if tool.binaries.iter().all(|b| dir.join(b).is_file()) {
        return Ok(());
    }
    let scratch = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let started = Instant::now();
    println!(
        "building {} {} with {} ...",
        tool.name,
        tool.version,
        go_version()?
    );
    let mut cmd = Command::new("go");
    cmd.env("GOTOOLCHAIN", "local");
    match tool.source {
        Source::GoInstall {
            module,
            packages,
            version_ldflags,
        } => {
            cmd.env("GOBIN", &scratch)
                .args([
                    "install",
                    "-trimpath",
                    "-ldflags",
                    &ldflags(version_ldflags),
                ])
                .args(
                    packages
                        .iter()
                        .map(|p| format!("{module}/{p}@{}", tool.version)),
                );
        }
        Source::GoModule {
            packages,
            version_ldflags,
        } => {
            cmd.current_dir(gotools_dir())
                .args([
                    "build",
                    "-trimpath",
                    "-ldflags",
                    &ldflags(version_ldflags),
                    "-o",
                ])
                .arg(format!("{}/", scratch.display()))
                .args(packages.iter());
        }
        Source::Debian { .. } => unreachable!("Debian tools are not built"),
    }
    sh(&mut cmd).with_context(|| format!("building {} {}", tool.name, tool.version))?;
    for b in tool.binaries {
        if !scratch.join(b).is_file() {
            bail!(
                "building {} produced no {b} in {}",
                tool.name,
                scratch.display()
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&scratch, &dir).with_context(|| format!("moving into {}", dir.display()))?;
    println!(
        "built {} {} in {:.0} s",
        tool.name,
        tool.version,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn ldflags(version_ldflags: &[&str]) -> String {
    let mut flags = String::from("-s -w");
    for x in version_ldflags {
        flags.push_str(" -X ");
        flags.push_str(x);
    }
    flags
}

fn gotools_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("gotools")
}

fn go_version() -> Result<String> {
    let out = Command::new("go")
        .arg("version")
        .output()
        .context("the Go toolchain (`go`) is needed to build the pinned tools")?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .nth(2)
        .unwrap_or("go")
        .to_owned())
}

/// The version the binary itself reports; for Go-built tools it must match the pin.
fn reported_version(tool: &Tool, binary: &str, path: &Path) -> Result<String> {
    let run = |args: &[&str], env: &[(&str, &str)]| -> String {
        let out = Command::new(path)
            .args(args)
            .envs(env.iter().copied())
            .output();
        out.map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text
        })
        .unwrap_or_default()
    };
    let text = match binary {
        "ip" => run(&["-V"], &[]),
        "iptables" | "ip6tables" | "iperf3" | "tcpdump" | "curl" => run(&["--version"], &[]),
        "ping" => run(&["-V"], &[]),
        "openssl" => run(&["version"], &[]),
        "helm" => run(&["version", "--short"], &[]),
        "kubectl" => run(&["version", "--client"], &[]),
        "kube-apiserver" | "kubelet" | "etcd" => run(&["--version"], &[]),
        // The reference CNI plugins print their version when run without CNI_COMMAND.
        _ if tool.name == "cni-plugins" => run(&[], &[]),
        _ => go_module_version(path)?,
    };
    // iputils numbers its releases by date: `ping from iputils 20221126`.
    let version = first_version_token(&text)
        .or_else(|| {
            let after = text.split_once("iputils")?.1;
            after.split_whitespace().next().map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into());
    if !matches!(tool.source, Source::Debian { .. })
        && version.trim_start_matches('v') != tool.version.trim_start_matches('v')
    {
        bail!(
            "{binary} reports version {version:?} but {} is pinned at {} (rebuild: remove {})",
            tool.name,
            tool.version,
            tool.cache_dir().display()
        );
    }
    Ok(version)
}

/// The module version Go recorded in a binary (`go version -m`).
fn go_module_version(path: &Path) -> Result<String> {
    let out = Command::new("go")
        .args(["version", "-m"])
        .arg(path)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .find(|l| l.trim_start().starts_with("mod"))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or("unknown")
        .to_owned())
}

/// The first token of `text` that looks like a version (`v1.2.3`, `3.6.5`, `iproute2-6.1.0`).
fn first_version_token(text: &str) -> Option<String> {
    text.split(|c: char| c.is_whitespace() || c == ',' || c == '"')
        .map(|t| t.trim_start_matches("iproute2-").trim_end_matches('+'))
        .map(|t| t.split('+').next().unwrap_or(t))
        .find(|t| {
            let digits = t.trim_start_matches('v');
            digits.starts_with(|c: char| c.is_ascii_digit()) && digits.contains('.')
        })
        .map(str::to_owned)
}

/// Runs a command with inherited output; fails on a non-zero exit.
fn sh(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_found_in_tool_output() {
        let cases = [
            ("ip utility, iproute2-6.1.0, libbpf 1.1.0", "6.1.0"),
            ("v3.22.0+g1234abc", "v3.22.0"),
            (
                "Client Version: v1.35.4\nKustomize Version: v5.7.1",
                "v1.35.4",
            ),
            ("Kubernetes v1.35.4", "v1.35.4"),
            ("etcd Version: 3.6.5\nGit SHA: GitNotFound", "3.6.5"),
            (
                "CNI bridge plugin v1.9.1\nCNI protocol versions supported: 0.1.0",
                "v1.9.1",
            ),
            ("OpenSSL 3.0.17 1 Jul 2025", "3.0.17"),
        ];
        for (text, want) in cases {
            assert_eq!(first_version_token(text).as_deref(), Some(want), "{text}");
        }
        assert_eq!(first_version_token("no version here"), None);
    }

    #[test]
    fn ldflags_stamp_every_symbol() {
        assert_eq!(ldflags(&[]), "-s -w");
        assert_eq!(ldflags(&["a.b=1", "c.d=2"]), "-s -w -X a.b=1 -X c.d=2");
    }
}
