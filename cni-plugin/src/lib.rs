//! flatwire-cni: the CNI 1.1 plugin. A thin binary: it validates the CNI environment and
//! network configuration ([`spec`]), asks the node agent over its Unix socket ([`agent`]), and
//! prints the result or a CNI error object. [`install`] puts the binary and the network
//! configuration list where a container runtime finds them.

pub mod agent;
pub mod install;
pub mod spec;

use std::io::Read;

use serde_json::Value;
use spec::{CniError, Command, ErrorCode, Invocation, LATEST_VERSION, NetConf};

/// What `flatwire-cni` prints when run by hand (no `CNI_COMMAND`), like the reference plugins.
pub fn about() -> String {
    format!(
        "flatwire-cni {}: the flatwire CNI plugin (pods on a ZeroTier-compatible flat network)\n\
         CNI protocol versions supported: {}\n\
         A container runtime runs it with CNI_COMMAND=ADD|DEL|CHECK|STATUS|GC|VERSION; it asks\n\
         flatwire-agent on its Unix socket (`agentSocket`, default {}).\n\
         Install it: flatwire-cni install --bin-dir DIR --conf-dir DIR [--network NWID] \
         [--agent-socket PATH] (see `flatwire-cni install --help`).",
        env!("CARGO_PKG_VERSION"),
        spec::SUPPORTED_VERSIONS.join(", "),
        flatwire_api::DEFAULT_AGENT_SOCKET,
    )
}

/// What one invocation prints: the JSON document and whether it is an error.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The document to print on stdout (a result, a version answer, an error, or nothing).
    pub output: Option<Value>,
    /// Whether the process exits non-zero.
    pub failed: bool,
}

/// Runs one CNI invocation with the environment read through `get` and `stdin`.
pub fn run(get: impl Fn(&str) -> Option<String>, stdin: &mut dyn Read) -> Outcome {
    let mut input = Vec::new();
    let version_of_input = |input: &[u8]| {
        serde_json::from_slice::<Value>(input)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
    };
    // stdin first, so that even an environment error answers in the caller's version.
    let read = stdin
        .take(spec::MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut input)
        .map_err(|e| CniError::new(ErrorCode::Io, "could not read stdin", e.to_string()));
    let result = read
        .and_then(|_| Invocation::from_env(get))
        .and_then(|inv| {
            let conf = || NetConf::parse(&input, inv.command);
            match inv.command {
                Command::Version => Ok(Some(spec::version_result(
                    version_of_input(&input).as_deref(),
                ))),
                Command::Add => agent::add(&inv, &conf()?).map(Some),
                Command::Del => agent::del(&inv, &conf()?).map(|()| None),
                Command::Check => agent::check(&inv, &conf()?).map(|()| None),
                Command::Status => agent::status(&conf()?).map(|()| None),
                Command::Gc => agent::gc(&conf()?).map(|()| None),
            }
        });
    match result {
        Ok(output) => Outcome {
            output,
            failed: false,
        },
        Err(e) => {
            let version = version_of_input(&input)
                .filter(|v| spec::SUPPORTED_VERSIONS.contains(&v.as_str()))
                .unwrap_or_else(|| LATEST_VERSION.to_owned());
            Outcome {
                output: Some(e.to_json(&version)),
                failed: true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_reads_the_requested_version_from_stdin() {
        let out = run(
            |k| (k == "CNI_COMMAND").then(|| "VERSION".to_owned()),
            &mut &br#"{"cniVersion":"1.0.0"}"#[..],
        );
        assert!(!out.failed);
        assert_eq!(out.output.unwrap()["cniVersion"], "1.0.0");
    }

    #[test]
    fn errors_are_printed_in_the_callers_version() {
        let out = run(
            |k| match k {
                "CNI_COMMAND" => Some("ADD".into()),
                "CNI_CONTAINERID" => Some("c1".into()),
                "CNI_IFNAME" => Some("eth0".into()),
                "CNI_NETNS" => Some("/run/netns/x".into()),
                _ => None,
            },
            &mut &br#"{"cniVersion":"0.4.0","name":"n","type":"flatwire-cni","mode":"bad"}"#[..],
        );
        assert!(out.failed);
        let err = out.output.unwrap();
        assert_eq!(err["cniVersion"], "0.4.0");
        assert_eq!(err["code"], 7);
    }
}
