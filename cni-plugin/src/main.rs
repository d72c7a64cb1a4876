//! `flatwire-cni`: the CNI plugin binary a container runtime executes.

use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
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
