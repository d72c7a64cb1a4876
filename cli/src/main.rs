//! `flatwire`: the command-line tool for flatwire nodes, networks and identities.

use std::process::ExitCode;

use clap::Parser;

mod client;
mod controller;
mod idtool;
mod node;
mod rules;
mod table;

/// flatwire: a ZeroTier-compatible, end-to-end encrypted virtual Ethernet for pods.
///
/// The node and controller commands talk to the local flatwire-agent's HTTP API
/// (127.0.0.1:9993, token from /var/lib/flatwire/authtoken.secret). Exit codes: 0 done,
/// 1 the agent refused (unknown network or member, bad value), 2 usage error (nothing was
/// sent), 3 agent unreachable, 4 no usable API token.
#[derive(Debug, Parser)]
#[command(
    name = "flatwire",
    version,
    about,
    long_about,
    propagate_version = true
)]
struct Cli {
    #[command(flatten)]
    agent: client::AgentArgs,
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
    #[command(flatten)]
    Node(node::NodeCommand),
    /// The agent's network controller (flatwire-agent --controller): networks and members.
    #[command(subcommand)]
    Controller(controller::ControllerCommand),
}

/// Prints a command's output, or its error with the error's exit code.
fn report(result: Result<String, client::CliError>) -> ExitCode {
    match result {
        Ok(out) => {
            print!("{out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("flatwire: {e}");
            e.exit_code()
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("flatwire {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Rules(cmd) => rules::run(cmd),
        Command::Idtool(args) => idtool::run(args),
        Command::Node(cmd) => report(node::run(&cli.agent, &cmd)),
        Command::Controller(cmd) => report(controller::run(&cli.agent, &cmd)),
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

    #[test]
    fn ids_are_checked_while_parsing() {
        let err = Cli::try_parse_from(["flatwire", "join", "8056c2e21c00001"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        let err = Cli::try_parse_from([
            "flatwire",
            "controller",
            "member",
            "show",
            "8056c2e21c000001",
            "e28e6b73a",
        ])
        .unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation);
        assert!(
            Cli::try_parse_from(["flatwire", "--port", "1", "--api", "x:1", "status"]).is_err()
        );
        let ok = Cli::try_parse_from(["flatwire", "listnetworks", "-j", "--port", "9"]).unwrap();
        assert!(ok.agent.json);
    }
}
