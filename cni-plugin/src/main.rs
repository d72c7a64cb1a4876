//! `flatwire-cni`: the CNI plugin binary a container runtime executes.
//!
//! With `CNI_COMMAND` set it is a CNI plugin (result or error JSON on stdout, logs on
//! stderr). Without it, `flatwire-cni install ...` installs the plugin and its network
//! configuration list, and `flatwire-cni` alone prints what it is.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use flatwire_cni::install::{Change, Install};

/// Installs flatwire-cni into a container runtime's CNI directories.
#[derive(Debug, Parser)]
#[command(name = "flatwire-cni install", version, about)]
struct InstallArgs {
    /// The runtime's CNI binary directory (e.g. /opt/cni/bin); created if missing.
    #[arg(long)]
    bin_dir: PathBuf,
    /// The runtime's CNI configuration directory (e.g. /etc/cni/net.d); created if missing.
    #[arg(long)]
    conf_dir: PathBuf,
    /// The flatwire network pods join (16 hex digits).
    #[arg(long, value_name = "NWID")]
    network: Option<String>,
    /// The agent's Unix socket (default /run/flatwire/agent.sock).
    #[arg(long, value_name = "PATH")]
    agent_socket: Option<PathBuf>,
}

fn install(args: InstallArgs) -> anyhow::Result<()> {
    let binary = std::env::current_exe().context("cannot find the running flatwire-cni")?;
    let report = Install {
        binary,
        bin_dir: args.bin_dir,
        conf_dir: args.conf_dir,
        network: args.network,
        agent_socket: args.agent_socket,
    }
    .run()?;
    for (path, change) in [report.binary, report.conflist] {
        let verb = match change {
            Change::Written => "installed",
            Change::Unchanged => "up to date",
        };
        println!("{verb}: {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLATWIRE_CNI_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    if std::env::var_os("CNI_COMMAND").is_none() {
        let mut argv = std::env::args_os().skip(1).peekable();
        return match argv.peek().and_then(|a| a.to_str()) {
            Some("install") => match install(InstallArgs::parse_from(argv)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("flatwire-cni install: {e:#}");
                    ExitCode::FAILURE
                }
            },
            None => {
                eprintln!("{}", flatwire_cni::about());
                ExitCode::SUCCESS
            }
            Some(other) => {
                eprintln!(
                    "flatwire-cni: unknown command {other:?}\n\n{}",
                    flatwire_cni::about()
                );
                ExitCode::from(2)
            }
        };
    }
    let outcome = flatwire_cni::run(|k| std::env::var(k).ok(), &mut std::io::stdin().lock());
    if let Some(doc) = &outcome.output {
        let mut out = std::io::stdout().lock();
        if writeln!(out, "{doc}").is_err() {
            return ExitCode::FAILURE;
        }
    }
    if outcome.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
