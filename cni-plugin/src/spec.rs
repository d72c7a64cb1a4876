//! The CNI specification's side of the plugin: the environment, the network configuration,
//! version negotiation, results in each supported spec version, and error objects.
//!
//! Written by hand for CNI 1.1 (the `cni-plugin` crate stops at 1.0): ADD, DEL, CHECK,
//! STATUS, GC and VERSION; results rendered for 0.4.0, 1.0.0 and 1.1.0.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// CNI specification versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.4.0", "1.0.0", "1.1.0"];

/// The newest version, used when the input names none we can trust.
pub const LATEST_VERSION: &str = "1.1.0";

/// Largest network configuration accepted on stdin (a runtime never sends more).
pub const MAX_CONFIG_BYTES: usize = 1 << 20;

/// The well-known error codes of the CNI specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ErrorCode {
    /// Incompatible CNI version.
    IncompatibleVersion = 1,
    /// Unsupported field in the network configuration.
    UnsupportedField = 2,
    /// Container unknown or does not exist.
    UnknownContainer = 3,
    /// Invalid necessary environment variables.
    InvalidEnvironment = 4,
    /// I/O failure.
    Io = 5,
    /// Failed to decode content.
    Decode = 6,
    /// Invalid network configuration.
    InvalidConfig = 7,
    /// Try again later.
    TryAgainLater = 11,
    /// The plugin is not available (cannot serve ADD).
    NotAvailable = 50,
    /// The plugin is not available and existing containers may have limited connectivity.
    LimitedConnectivity = 51,
}

/// A CNI error object: printed on stdout with a non-zero exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Well-known code.
    pub code: ErrorCode,
    /// Short message a person can act on.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    /// An error with `code`, a short message and details.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The JSON object the specification prescribes, tagged with `version`.
    pub fn to_json(&self, version: &str) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "code": self.code as u32,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (code {}): {}",
            self.msg, self.code as u32, self.details
        )
    }
}

/// The operation a runtime asks for (`CNI_COMMAND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container to the network.
    Add,
    /// Detach it (idempotent).
    Del,
    /// Verify an attachment against `prevResult`.
    Check,
    /// Report whether the plugin can serve ADD.
    Status,
    /// Remove attachments not in `cni.dev/valid-attachments`.
    Gc,
    /// Report supported spec versions.
    Version,
}

impl Command {
    fn parse(value: Option<&str>) -> Result<Self, CniError> {
        match value {
            Some("ADD") => Ok(Self::Add),
            Some("DEL") => Ok(Self::Del),
            Some("CHECK") => Ok(Self::Check),
            Some("STATUS") => Ok(Self::Status),
            Some("GC") => Ok(Self::Gc),
            Some("VERSION") => Ok(Self::Version),
            Some(other) => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected one of ADD, DEL, CHECK, STATUS, GC, VERSION",
            )),
            None => Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_COMMAND is not set",
                "flatwire-cni is run by a container runtime with the CNI environment set",
            )),
        }
    }
}

/// The CNI environment of one invocation, validated for its command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The operation.
    pub command: Command,
    /// `CNI_CONTAINERID` (empty for STATUS, GC and VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (may be empty for DEL).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (e.g. `K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
    pub args: BTreeMap<String, String>,
}

impl Invocation {
    /// Reads and validates the environment through `get` (normally `std::env::var`).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let command = Command::parse(get("CNI_COMMAND").as_deref())?;
        let needs_container = matches!(command, Command::Add | Command::Del | Command::Check);
        let container_id = get("CNI_CONTAINERID").unwrap_or_default();
        let ifname = get("CNI_IFNAME").unwrap_or_default();
        let netns = get("CNI_NETNS")
            .filter(|s| !s.is_empty())
            .map(PathBuf::from);
        if needs_container {
            check_container_id(&container_id)?;
            check_ifname(&ifname)?;
            if netns.is_none() && command != Command::Del {
                return Err(CniError::new(
                    ErrorCode::InvalidEnvironment,
                    "CNI_NETNS is not set",
                    "ADD and CHECK need the path of the container's network namespace",
                ));
            }
        }
        let args = parse_cni_args(&get("CNI_ARGS").unwrap_or_default())?;
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }
}

fn check_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_CONTAINERID {id:?} is not a valid container ID"),
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        ))
    }
}

fn check_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_IFNAME {name:?} is not a valid interface name"),
            "it must be 1 to 15 characters, not '.' or '..', without '/', ':' or whitespace",
        ))
    }
}

/// Parses `CNI_ARGS` (`K=V;K2=V2`); an element without `=` is an error.
fn parse_cni_args(raw: &str) -> Result<BTreeMap<String, String>, CniError> {
    raw.split(';')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| {
                    CniError::new(
                        ErrorCode::InvalidEnvironment,
                        format!("CNI_ARGS element {kv:?} is not KEY=VALUE"),
                        "CNI_ARGS is a ';'-separated list of KEY=VALUE pairs",
                    )
                })
        })
        .collect()
}

/// One attachment the runtime still considers valid (GC input).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// Container ID.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// Interface name inside the container.
    pub ifname: String,
}

/// The network configuration a runtime streams on stdin, as far as flatwire reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// The spec version the runtime speaks (negotiated: one of [`SUPPORTED_VERSIONS`]).
    pub cni_version: String,
    /// Network name (the CNI network, which maps to a flatwire network).
    pub name: String,
    /// Plugin type (`flatwire-cni`).
    pub plugin_type: String,
    /// The flatwire network ID (16 hex digits) this attachment joins.
    pub network: Option<String>,
    /// `primary` (default route via the node member) or `secondary` (network routes only).
    pub mode: Mode,
    /// The agent's Unix socket (`agentSocket`), default `/run/flatwire/agent.sock`.
    pub agent_socket: PathBuf,
    /// The previous plugin's result, when chained.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC only).
    pub valid_attachments: Option<Vec<Attachment>>,
    /// `runtimeConfig` capabilities, passed through.
    pub runtime_config: Value,
}

/// How the pod interface is routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// flatwire is the pod network: default route via the node's member.
    #[default]
    Primary,
    /// An extra interface: only the flat network's routes use it.
    Secondary,
}

impl NetConf {
    /// Parses and validates stdin for `command`. VERSION accepts an empty or minimal input.
    pub fn parse(stdin: &[u8], command: Command) -> Result<Self, CniError> {
        if stdin.len() > MAX_CONFIG_BYTES {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("the network configuration is {} bytes", stdin.len()),
                format!("the limit is {MAX_CONFIG_BYTES} bytes"),
            ));
        }
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                ErrorCode::Decode,
                "the network configuration on stdin is not valid JSON",
                e.to_string(),
            )
        })?;
        let obj = value.as_object().ok_or_else(|| {
            CniError::new(
                ErrorCode::Decode,
                "the network configuration must be a JSON object",
                format!("got {}", json_kind(&value)),
            )
        })?;
        let string = |key: &str| -> Result<Option<String>, CniError> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("`{key}` must be a string"),
                    format!("got {}", json_kind(other)),
                )),
            }
        };
        let cni_version = string("cniVersion")?.ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "the network configuration has no `cniVersion`",
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            )
        })?;
        if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!("CNI version {cni_version} is not supported"),
                format!("flatwire-cni supports {}", SUPPORTED_VERSIONS.join(", ")),
            ));
        }
        let name = string("name")?.unwrap_or_default();
        let plugin_type = string("type")?.unwrap_or_default();
        if command != Command::Version {
            check_network_name(&name)?;
            if plugin_type.is_empty() {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    "the network configuration has no `type`",
                    "set \"type\": \"flatwire-cni\"",
                ));
            }
        }
        let network = string("network")?;
        if let Some(id) = network
            .as_ref()
            .filter(|id| id.len() != 16 || !id.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("`network` {id:?} is not a network ID"),
                "a flatwire/ZeroTier network ID is 16 hex digits",
            ));
        }
        let mode = match string("mode")?.as_deref() {
            None | Some("primary") => Mode::Primary,
            Some("secondary") => Mode::Secondary,
            Some(other) => {
                return Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("`mode` {other:?} is not known"),
                    "use \"primary\" or \"secondary\"",
                ));
            }
        };
        let agent_socket = flatwire_api::agent_socket(string("agentSocket")?.as_deref());
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v.clone()).map_err(|e| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "`cni.dev/valid-attachments` is malformed",
                    format!("expected a list of {{\"containerID\", \"ifname\"}}: {e}"),
                )
            })?),
        };
        if command == Command::Gc && valid_attachments.is_none() {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "GC needs `cni.dev/valid-attachments`",
                "the runtime lists the attachments that must be kept",
            ));
        }
        let prev_result = obj.get("prevResult").filter(|v| !v.is_null()).cloned();
        if command == Command::Check && prev_result.is_none() {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "CHECK needs `prevResult`",
                "the runtime passes the result of the preceding ADD",
            ));
        }
        Ok(Self {
            cni_version,
            name,
            plugin_type,
            network,
            mode,
            agent_socket,
            prev_result,
            valid_attachments,
            runtime_config: obj.get("runtimeConfig").cloned().unwrap_or(Value::Null),
        })
    }
}

fn check_network_name(name: &str) -> Result<(), CniError> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            ErrorCode::InvalidConfig,
            format!("network name {name:?} is not valid"),
            "it must start with a letter or digit, followed by letters, digits, '_', '.' or '-'",
        ))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The VERSION answer for a runtime that speaks `requested` (or the latest if unknown).
pub fn version_result(requested: Option<&str>) -> Value {
    let version = requested
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .unwrap_or(LATEST_VERSION);
    serde_json::json!({ "cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS })
}

/// An interface in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    /// Interface name.
    pub name: String,
    /// MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// MTU (reported from 1.1.0 on).
    pub mtu: Option<u32>,
    /// The netns path for sandbox interfaces; `None` for host interfaces.
    pub sandbox: Option<String>,
}

/// An address in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpConfig {
    /// The address.
    pub address: IpAddr,
    /// Prefix length.
    pub prefix: u8,
    /// Gateway, if any.
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    pub interface: Option<usize>,
}

/// A route in a result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination prefix (`0.0.0.0/0` for the default route).
    pub dst: String,
    /// Next hop, if any.
    pub gw: Option<IpAddr>,
}

/// DNS settings in a result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Dns {
    /// Name servers.
    pub nameservers: Vec<String>,
    /// Local domain.
    pub domain: Option<String>,
    /// Search domains.
    pub search: Vec<String>,
    /// Resolver options.
    pub options: Vec<String>,
}

/// The result of a successful ADD.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CniResult {
    /// Interfaces created or moved.
    pub interfaces: Vec<Interface>,
    /// Addresses assigned.
    pub ips: Vec<IpConfig>,
    /// Routes installed.
    pub routes: Vec<Route>,
    /// DNS settings.
    pub dns: Dns,
}

impl CniResult {
    /// Renders the result in spec `version` (0.4.0 adds `version` to each IP; 1.1.0 adds
    /// the interface MTU).
    pub fn to_json(&self, version: &str) -> Value {
        let v1_1 = version == "1.1.0";
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut o = serde_json::json!({ "name": i.name, "mac": i.mac });
                if let Some(sb) = &i.sandbox {
                    o["sandbox"] = sb.clone().into();
                }
                if let (true, Some(mtu)) = (v1_1, i.mtu) {
                    o["mtu"] = mtu.into();
                }
                o
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut o =
                    serde_json::json!({ "address": format!("{}/{}", ip.address, ip.prefix) });
                if version == "0.4.0" {
                    o["version"] = if ip.address.is_ipv4() { "4" } else { "6" }.into();
                }
                if let Some(gw) = ip.gateway {
                    o["gateway"] = gw.to_string().into();
                }
                if let Some(i) = ip.interface {
                    o["interface"] = i.into();
                }
                o
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut o = serde_json::json!({ "dst": r.dst });
                if let Some(gw) = r.gw {
                    o["gw"] = gw.to_string().into();
                }
                o
            })
            .collect();
        let mut dns = serde_json::Map::new();
        if !self.dns.nameservers.is_empty() {
            dns.insert("nameservers".into(), self.dns.nameservers.clone().into());
        }
        if let Some(d) = &self.dns.domain {
            dns.insert("domain".into(), d.clone().into());
        }
        if !self.dns.search.is_empty() {
            dns.insert("search".into(), self.dns.search.clone().into());
        }
        if !self.dns.options.is_empty() {
            dns.insert("options".into(), self.dns.options.clone().into());
        }
        serde_json::json!({
            "cniVersion": version,
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": dns,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const ADD_ENV: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/pod"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_ARGS", "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0"),
    ];

    #[test]
    fn a_complete_add_environment_is_read() {
        let inv = Invocation::from_env(env(ADD_ENV)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(inv.netns, Some(PathBuf::from("/run/netns/pod")));
        assert_eq!(inv.args["K8S_POD_NAME"], "web-0");
    }

    #[test]
    fn bad_environments_are_error_code_4() {
        let cases: &[&[(&str, &str)]] = &[
            &[],
            &[("CNI_COMMAND", "ADDD")],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "-bad"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "name-far-too-long0"),
                ("CNI_NETNS", "/x"),
            ],
            &[
                ("CNI_COMMAND", "CHECK"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
            ],
            &[
                ("CNI_COMMAND", "ADD"),
                ("CNI_CONTAINERID", "c1"),
                ("CNI_IFNAME", "eth0"),
                ("CNI_NETNS", "/x"),
                ("CNI_ARGS", "novalue"),
            ],
        ];
        for vars in cases {
            let err = Invocation::from_env(env(vars)).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidEnvironment, "{vars:?}: {err}");
        }
        // DEL without a netns is allowed (the namespace may be gone already).
        let del = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ];
        assert_eq!(Invocation::from_env(env(&del)).unwrap().netns, None);
    }

    #[test]
    fn configs_are_validated_with_spec_codes() {
        let cases: &[(&str, Command, ErrorCode)] = &[
            ("not json", Command::Add, ErrorCode::Decode),
            ("[1,2]", Command::Add, ErrorCode::Decode),
            (
                r#"{"name":"n","type":"flatwire-cni"}"#,
                Command::Add,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"0.3.1","name":"n","type":"flatwire-cni"}"#,
                Command::Add,
                ErrorCode::IncompatibleVersion,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"-n","type":"flatwire-cni"}"#,
                Command::Add,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni","network":"xyz"}"#,
                Command::Add,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni","mode":"tertiary"}"#,
                Command::Add,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni","agentSocket":7}"#,
                Command::Add,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni"}"#,
                Command::Gc,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni","cni.dev/valid-attachments":[{"x":1}]}"#,
                Command::Gc,
                ErrorCode::InvalidConfig,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","type":"flatwire-cni"}"#,
                Command::Check,
                ErrorCode::InvalidConfig,
            ),
        ];
        for (input, cmd, code) in cases {
            let err = NetConf::parse(input.as_bytes(), *cmd).unwrap_err();
            assert_eq!(err.code, *code, "{input}: {err}");
            assert!(!err.msg.is_empty() && !err.details.is_empty());
        }
        let huge = vec![b' '; MAX_CONFIG_BYTES + 1];
        assert_eq!(
            NetConf::parse(&huge, Command::Add).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
    }

    #[test]
    fn a_good_config_is_read_with_defaults() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"1.0.0","name":"flat","type":"flatwire-cni","network":"e6acfe87fc3adaf6",
                "cni.dev/valid-attachments":[{"containerID":"c1","ifname":"eth0"}]}"#,
            Command::Gc,
        )
        .unwrap();
        assert_eq!(conf.cni_version, "1.0.0");
        assert_eq!(conf.mode, Mode::Primary);
        assert_eq!(conf.agent_socket, PathBuf::from("/run/flatwire/agent.sock"));
        assert_eq!(
            conf.valid_attachments.unwrap(),
            vec![Attachment {
                container_id: "c1".into(),
                ifname: "eth0".into()
            }]
        );
    }

    #[test]
    fn version_answers_in_the_requested_version() {
        assert_eq!(version_result(Some("0.4.0"))["cniVersion"], "0.4.0");
        assert_eq!(version_result(Some("9.9.9"))["cniVersion"], LATEST_VERSION);
        assert_eq!(
            version_result(None)["supportedVersions"],
            serde_json::json!(SUPPORTED_VERSIONS)
        );
    }

    #[test]
    fn results_follow_each_spec_version() {
        let r = CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                mtu: Some(2800),
                sandbox: Some("/run/netns/pod".into()),
            }],
            ips: vec![IpConfig {
                address: "10.42.0.5".parse().unwrap(),
                prefix: 16,
                gateway: Some("10.42.0.1".parse().unwrap()),
                interface: Some(0),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("10.42.0.1".parse().unwrap()),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Dns::default()
            },
        };
        let v11 = r.to_json("1.1.0");
        assert_eq!(v11["interfaces"][0]["mtu"], 2800);
        assert_eq!(v11["ips"][0]["address"], "10.42.0.5/16");
        assert!(v11["ips"][0].get("version").is_none());
        let v10 = r.to_json("1.0.0");
        assert!(v10["interfaces"][0].get("mtu").is_none());
        let v04 = r.to_json("0.4.0");
        assert_eq!(v04["ips"][0]["version"], "4");
        assert_eq!(v04["routes"][0]["gw"], "10.42.0.1");
        assert_eq!(v04["dns"]["nameservers"][0], "10.96.0.10");
    }
}
