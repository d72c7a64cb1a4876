//! `flatwire rules …`: the ZeroTier rule-language compiler.

use std::path::PathBuf;
use std::process::ExitCode;

use flatwire_vl2::rules::compiler::compile;

/// Rule-language commands.
#[derive(Debug, clap::Subcommand)]
pub enum RulesCommand {
    /// Compile a rules file and print the JSON that ZeroTier's rule-compiler/cli.js prints.
    Compile {
        /// The rules source file.
        file: PathBuf,
        /// Only check the source: print nothing on success.
        #[arg(long)]
        check: bool,
    },
}

/// Runs a rules command; errors go to stderr as `line L column C: <what is wrong>`.
pub fn run(cmd: RulesCommand) -> ExitCode {
    match cmd {
        RulesCommand::Compile { file, check } => {
            let src = match std::fs::read(&file) {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => {
                    eprintln!("cannot read {}: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            match compile(&src) {
                Ok(out) => {
                    if !check {
                        println!("{}", out.to_cli_json().pretty(1));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
