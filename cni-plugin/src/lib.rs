//! flatwire-cni: the CNI 1.1 plugin. A thin binary: it validates the CNI environment and
//! network configuration ([`spec`]), asks the node agent over its Unix socket, and prints the
//! result or a CNI error object.

pub mod spec;

use std::io::Read;

use serde_json::Value;
use spec::{CniError, Command, ErrorCode, Invocation, LATEST_VERSION, NetConf};

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
    let result = Invocation::from_env(get).and_then(|inv| {
        stdin
            .take(spec::MAX_CONFIG_BYTES as u64 + 1)
            .read_to_end(&mut input)
            .map_err(|e| CniError::new(ErrorCode::Io, "could not read stdin", e.to_string()))?;
        if inv.command == Command::Version {
            return Ok(Some(spec::version_result(
                version_of_input(&input).as_deref(),
            )));
        }
        let conf = NetConf::parse(&input, inv.command)?;
        Err(CniError::new(
            ErrorCode::TryAgainLater,
            format!(
                "the flatwire agent at {} cannot serve {:?} yet",
                conf.agent_socket.display(),
                inv.command
            ),
            "pod attachment through the agent arrives with the CNI plugin issue",
        ))
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
