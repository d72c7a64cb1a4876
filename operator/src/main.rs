//! `flatwire-operator`: maps flatwire custom resources to controller networks and acts as
//! the network controller.

use std::io::Write;

use clap::{Parser, Subcommand};
use flatwire_operator::{API_GROUP, crd};

/// The flatwire operator.
#[derive(Debug, Parser)]
#[command(name = "flatwire-operator", version, about)]
struct Args {
    /// Namespace holding the operator's identity Secret, its Lease and the planet ConfigMap.
    #[arg(long, env = "FLATWIRE_NAMESPACE", default_value = "flatwire-system")]
    namespace: String,
    /// What to do (default: run the controllers).
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
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
        None => anyhow::bail!(
            "flatwire-operator {}: the {API_GROUP} controllers are not built yet (namespace {})",
            env!("CARGO_PKG_VERSION"),
            args.namespace
        ),
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
}
