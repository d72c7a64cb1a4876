//! `flatwire-cni`: the CNI plugin binary. It reads the CNI environment and stdin, asks the
//! agent, and prints the result or a CNI error object.

use std::io::Write;
use std::process::ExitCode;

/// CNI specification versions this plugin speaks, oldest first.
const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The CNI version of our own results.
const CNI_VERSION: &str = "1.1.0";

/// A CNI error as the specification defines it (well-known code, message, details).
#[derive(Debug, PartialEq, Eq)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

impl CniError {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "cniVersion": CNI_VERSION,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// Runs one CNI invocation for `command` (the value of `CNI_COMMAND`).
fn run(command: Option<&str>) -> Result<serde_json::Value, CniError> {
    match command {
        Some("VERSION") => Ok(serde_json::json!({
            "cniVersion": CNI_VERSION,
            "supportedVersions": SUPPORTED_VERSIONS,
        })),
        Some(verb @ ("ADD" | "DEL" | "CHECK" | "STATUS" | "GC")) => Err(CniError {
            code: 11,
            msg: format!("{verb} needs the flatwire agent, which this build cannot reach yet"),
            details: "pod attachment arrives with the CNI plugin issue".into(),
        }),
        Some(other) => Err(CniError {
            code: 4,
            msg: format!("unknown CNI_COMMAND {other:?}"),
            details: "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION".into(),
        }),
        None => Err(CniError {
            code: 4,
            msg: "CNI_COMMAND is not set".into(),
            details: "flatwire-cni is run by a container runtime with the CNI environment".into(),
        }),
    }
}

fn main() -> ExitCode {
    let command = std::env::var("CNI_COMMAND").ok();
    let (value, code) = match run(command.as_deref()) {
        Ok(v) => (v, ExitCode::SUCCESS),
        Err(e) => (e.to_json(), ExitCode::FAILURE),
    };
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{value}").is_err() {
        return ExitCode::FAILURE;
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lists_every_supported_spec() {
        let v = run(Some("VERSION")).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn missing_or_unknown_commands_are_spec_errors() {
        for cmd in [None, Some("ADDD"), Some("")] {
            let e = run(cmd).unwrap_err();
            assert_eq!(e.code, 4, "{cmd:?}");
            let j = e.to_json();
            assert_eq!(j["code"], 4);
            assert!(j["msg"].as_str().unwrap().contains("CNI_COMMAND"));
        }
    }
}
