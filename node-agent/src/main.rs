//! `flatwire-agent`: the per-host daemon that runs the flatwire node.

use std::path::PathBuf;

use clap::Parser;

/// The flatwire node agent.
#[derive(Debug, Parser)]
#[command(name = "flatwire-agent", version, about)]
struct Args {
    /// State directory (identities, joined networks, planet).
    #[arg(long, default_value = "/var/lib/flatwire")]
    home: PathBuf,
    /// UDP port of the node (the local HTTP API uses the same number on loopback TCP).
    #[arg(long, default_value_t = 9993)]
    port: u16,
    /// Unix socket of the gRPC API for the CNI plugin and the CLI.
    #[arg(long, default_value = flatwire_api::DEFAULT_AGENT_SOCKET)]
    socket: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::bail!(
        "flatwire-agent {}: the node is not built yet (state dir {}, port {}, socket {})",
        env!("CARGO_PKG_VERSION"),
        args.home.display(),
        args.port,
        args.socket.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_zerotier_conventions() {
        let a = Args::try_parse_from(["flatwire-agent"]).unwrap();
        assert_eq!(a.port, 9993);
        assert_eq!(a.home, PathBuf::from("/var/lib/flatwire"));
        assert!(Args::try_parse_from(["flatwire-agent", "--port", "70000"]).is_err());
    }
}
