//! `flatwire-operator`: maps flatwire custom resources to controller networks and acts as
//! the network controller.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use flatwire_operator::controller::{self, ControllerAddress};
use flatwire_operator::crd;

/// The flatwire operator.
#[derive(Debug, Parser)]
#[command(name = "flatwire-operator", version, about)]
struct Args {
    /// Namespace holding the operator's identity Secret, its Lease and the planet ConfigMap.
    #[arg(long, env = "FLATWIRE_NAMESPACE", default_value = "flatwire-system")]
    namespace: String,
    /// The controller's 40-bit ZeroTier address (10 hex digits), the top of every network
    /// ID; a placeholder until the operator has its own identity. Required to run.
    #[arg(long, env = "FLATWIRE_CONTROLLER_ADDRESS", global = true)]
    controller_address: Option<ControllerAddress>,
    /// Kubeconfig to use (default: `$KUBECONFIG`, `~/.kube/config`, then in-cluster).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// What to do (default: `run`).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the controllers against the API server until SIGINT or SIGTERM.
    Run,
    /// Print the CRD YAML generated from the Rust types (all, `---`-separated, or one).
    Crds {
        /// Print only this CRD (e.g. `networks.flatwire.io`).
        #[arg(long)]
        name: Option<String>,
        /// Print the CRD names, one a line, instead of their YAML.
        #[arg(long, conflicts_with = "name")]
        list: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.command {
        Some(Command::Crds { name, list }) => {
            let mut out = std::io::stdout().lock();
            if list {
                for c in crd::all() {
                    writeln!(out, "{}", crd::name(&c))?;
                }
            } else if let Some(name) = name {
                out.write_all(crd::yaml_of(&name)?.as_bytes())?;
            } else {
                for (i, c) in crd::all().iter().enumerate() {
                    if i > 0 {
                        out.write_all(b"---\n")?;
                    }
                    out.write_all(crd::to_yaml(c)?.as_bytes())?;
                }
            }
            Ok(())
        }
        None | Some(Command::Run) => {
            let address = args
                .controller_address
                .context("--controller-address (or FLATWIRE_CONTROLLER_ADDRESS) is required")?;
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "info".into()),
                )
                .init();
            // The namespace will hold the identity Secret, the Lease and the planet; unused yet.
            tracing::info!(namespace = %args.namespace, %address, "starting");
            let rt = tokio::runtime::Runtime::new().context("tokio runtime")?;
            rt.block_on(async {
                let client = controller::client(args.kubeconfig.as_deref()).await?;
                controller::run(client, address, shutdown_signal()).await;
                anyhow::Ok(())
            })
        }
    }
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_defaults_and_can_be_set() {
        let a = Args::try_parse_from(["flatwire-operator"]).unwrap();
        assert_eq!(a.namespace, "flatwire-system");
        assert!(a.command.is_none());
        let a = Args::try_parse_from(["flatwire-operator", "--namespace", "x"]).unwrap();
        assert_eq!(a.namespace, "x");
    }

    #[test]
    fn crds_subcommand_parses() {
        let a = Args::try_parse_from(["flatwire-operator", "crds", "--name", "n"]).unwrap();
        assert!(
            matches!(a.command, Some(Command::Crds { name: Some(n), list: false }) if n == "n")
        );
        assert!(
            Args::try_parse_from(["flatwire-operator", "crds", "--list", "--name", "n"]).is_err()
        );
    }

    #[test]
    fn run_takes_a_controller_address() {
        let a = Args::try_parse_from([
            "flatwire-operator",
            "run",
            "--controller-address",
            "89e92ceee5",
        ])
        .unwrap();
        assert!(matches!(a.command, Some(Command::Run)));
        assert_eq!(a.controller_address.unwrap().to_string(), "89e92ceee5");
        assert!(
            Args::try_parse_from(["flatwire-operator", "--controller-address", "xyz"]).is_err()
        );
    }
}
