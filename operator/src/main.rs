//! `flatwire-operator`: maps flatwire custom resources to controller networks and acts as
//! the network controller.

use clap::Parser;

/// API group of every flatwire custom resource.
const API_GROUP: &str = "flatwire.io";

/// The flatwire operator.
#[derive(Debug, Parser)]
#[command(name = "flatwire-operator", version, about)]
struct Args {
    /// Namespace holding the operator's identity Secret, its Lease and the planet ConfigMap.
    #[arg(long, env = "FLATWIRE_NAMESPACE", default_value = "flatwire-system")]
    namespace: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "flatwire-operator {}: the {API_GROUP} controllers are not built yet (namespace {})",
        env!("CARGO_PKG_VERSION"),
        args.namespace
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_defaults_and_can_be_set() {
        let a = Args::try_parse_from(["flatwire-operator"]).unwrap();
        assert_eq!(a.namespace, "flatwire-system");
        let a = Args::try_parse_from(["flatwire-operator", "--namespace", "x"]).unwrap();
        assert_eq!(a.namespace, "x");
    }
}
