//! `flatwire`: the command-line tool for flatwire nodes, networks and identities.

use std::process::ExitCode;

use clap::Parser;

mod idtool;
mod rules;

/// flatwire: a ZeroTier-compatible, end-to-end encrypted virtual Ethernet for pods.
#[derive(Debug, Parser)]
#[command(name = "flatwire", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Print version information about this build.
    Version,
    /// Compile and check ZeroTier rule-language sources.
    #[command(subcommand)]
    Rules(rules::RulesCommand),
    /// Identities, signatures and planets, as `zerotier-idtool` (`flatwire idtool` for usage).
    Idtool(idtool::IdtoolArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Version => {
            println!("flatwire {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Rules(cmd) => rules::run(cmd),
        Command::Idtool(args) => idtool::run(args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn unknown_subcommands_are_refused() {
        let err = Cli::try_parse_from(["flatwire", "frobnicate"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidSubcommand);
    }
}
