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
    /// flatwire: no address (or no member identity) is left in the network's pool.
    PoolExhausted = 100,
    /// flatwire: the network's controller refused the pod as a member.
    AccessDenied = 101,
    /// flatwire: the agent knows no such network or attachment.
    NotFound = 102,
    /// flatwire: CHECK found the attachment different from `prevResult`.
    CheckMismatch = 103,
    /// flatwire: the agent failed (its log has the details) or speaks another API version.
    AgentFailed = 104,
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
        if let Some(ns) = netns.as_ref().filter(|p| !p.is_absolute()) {
            return Err(CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("CNI_NETNS {} is not an absolute path", ns.display()),
                "the runtime passes the full path of the network namespace, e.g. /var/run/netns/cni-1234",
            ));
        }
        Ok(Self {
            command,
            container_id,
            netns,
            ifname,
            args,
        })
    }

    /// The Kubernetes pod from `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`,
    /// `K8S_POD_UID`): namespace, name and UID, each empty when not given.
    pub fn pod(&self) -> (&str, &str, &str) {
        let arg = |k: &str| self.args.get(k).map_or("", String::as_str);
        (
            arg("K8S_POD_NAMESPACE"),
            arg("K8S_POD_NAME"),
            arg("K8S_POD_UID"),
        )
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
    /// `cni.dev/valid-attachments` (GC only; also read from the `cni.dev/attachments` alias
    /// libcni sends). Absent means none is valid, which is what `cnitool gc` asks for.
    pub valid_attachments: Vec<Attachment>,
    /// The `bandwidth` capability (`runtimeConfig.bandwidth`: `ingressRate`, `ingressBurst`,
    /// `egressRate`, `egressBurst`; bits per second and bits), if the runtime passed it.
    pub bandwidth: Option<flatwire_api::v1::Bandwidth>,
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
        let valid_attachments = match ["cni.dev/valid-attachments", "cni.dev/attachments"]
            .iter()
            .find_map(|k| obj.get(*k).filter(|v| !v.is_null()))
        {
            None => Vec::new(),
            Some(v) => serde_json::from_value(v.clone()).map_err(|e| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "`cni.dev/valid-attachments` is malformed",
                    format!("expected a list of {{\"containerID\", \"ifname\"}}: {e}"),
                )
            })?,
        };
        if command == Command::Add && network.is_none() {
            return Err(CniError::new(
                ErrorCode::InvalidConfig,
                "the network configuration has no `network`",
                "set \"network\" to the flatwire network ID (16 hex digits), e.g. with \
                 `flatwire-cni install --network NWID`",
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
            bandwidth: bandwidth(obj.get("runtimeConfig"))?,
        })
    }
}

/// `runtimeConfig.bandwidth`, each field a non-negative integer when present (whether the
/// values fit together is the agent's to judge: it knows the network's MTU).
fn bandwidth(runtime: Option<&Value>) -> Result<Option<flatwire_api::v1::Bandwidth>, CniError> {
    let Some(bw) = runtime
        .and_then(|r| r.get("bandwidth"))
        .filter(|v| !v.is_null())
    else {
        return Ok(None);
    };
    let Some(obj) = bw.as_object() else {
        return Err(CniError::new(
            ErrorCode::InvalidConfig,
            "`runtimeConfig.bandwidth` is not an object",
            "pass {\"ingressRate\", \"ingressBurst\", \"egressRate\", \"egressBurst\"}",
        ));
    };
    let field = |key: &str| match obj.get(key) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v.as_u64().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                format!("`runtimeConfig.bandwidth.{key}` is {v}"),
                "rates are bits per second and bursts bits, as non-negative integers",
            )
        }),
    };
    Ok(Some(flatwire_api::v1::Bandwidth {
        ingress_rate: field("ingressRate")?,
        ingress_burst: field("ingressBurst")?,
        egress_rate: field("egressRate")?,
        egress_burst: field("egressBurst")?,
    }))
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

impl CniResult {
    /// Renders this result in spec `version` after `prev`, the `prevResult` of a chained ADD:
    /// the previous interfaces, addresses and routes come first, ours are appended (our
    /// addresses' interface indexes shifted past the previous interfaces), and the previous
    /// DNS settings win when they say anything.
    pub fn chained_json(&self, version: &str, prev: Option<&Value>) -> Result<Value, CniError> {
        let Some(prev) = prev else {
            return Ok(self.to_json(version));
        };
        let prev_obj = prev.as_object().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidConfig,
                "`prevResult` must be a JSON object",
                format!("got {}", json_kind(prev)),
            )
        })?;
        let list = |key: &str| -> Result<Vec<Value>, CniError> {
            match prev_obj.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(a)) => Ok(a.clone()),
                Some(other) => Err(CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("`prevResult.{key}` must be a list"),
                    format!("got {}", json_kind(other)),
                )),
            }
        };
        let mut interfaces = list("interfaces")?;
        let mut ips = list("ips")?;
        let mut routes = list("routes")?;
        let mut shifted = self.clone();
        for ip in &mut shifted.ips {
            ip.interface = ip.interface.map(|i| i + interfaces.len());
        }
        let ours = shifted.to_json(version);
        let take = |key: &str| ours[key].as_array().cloned().unwrap_or_default();
        interfaces.extend(take("interfaces"));
        ips.extend(take("ips"));
        routes.extend(take("routes"));
        let dns = match prev_obj.get("dns") {
            Some(Value::Object(d)) if !d.is_empty() => Value::Object(d.clone()),
            _ => ours["dns"].clone(),
        };
        let mut out = prev_obj.clone();
        out.insert("cniVersion".into(), version.into());
        out.insert("interfaces".into(), interfaces.into());
        out.insert("ips".into(), ips.into());
        out.insert("routes".into(), routes.into());
        out.insert("dns".into(), dns);
        Ok(Value::Object(out))
    }

    /// This plugin's part of `prev` (the `prevResult` given to CHECK): the sandbox interface
    /// named `ifname`, the addresses on it, and the routes that are on-link or go through a
    /// gateway inside one of its subnets. Fails with code 7 when `prev` has no such interface.
    pub fn from_prev(prev: &Value, ifname: &str) -> Result<Self, CniError> {
        let bad = |what: String| {
            CniError::new(ErrorCode::InvalidConfig, "`prevResult` is malformed", what)
        };
        let items = |key: &str| {
            prev.get(key)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let str_of = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
        let (index, iface) = items("interfaces")
            .into_iter()
            .enumerate()
            .find(|(_, i)| {
                str_of(i, "name").as_deref() == Some(ifname) && i.get("sandbox").is_some()
            })
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    format!("`prevResult` has no sandbox interface {ifname:?}"),
                    "CHECK compares the attachment with the result of its ADD; pass that result",
                )
            })?;
        let interface = Interface {
            name: ifname.to_owned(),
            mac: str_of(&iface, "mac").unwrap_or_default(),
            mtu: iface
                .get("mtu")
                .and_then(Value::as_u64)
                .and_then(|m| u32::try_from(m).ok()),
            sandbox: str_of(&iface, "sandbox"),
        };
        let mut ips = Vec::new();
        for ip in items("ips") {
            if ip.get("interface").and_then(Value::as_u64) != Some(index as u64) {
                continue;
            }
            let text = str_of(&ip, "address").unwrap_or_default();
            let (address, prefix) =
                parse_cidr(&text).ok_or_else(|| bad(format!("address {text:?} is not a CIDR")))?;
            let gateway = match str_of(&ip, "gateway") {
                None => None,
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("gateway {g:?} is not an IP address")))?,
                ),
            };
            ips.push(IpConfig {
                address,
                prefix,
                gateway,
                interface: Some(0),
            });
        }
        let mut routes = Vec::new();
        for r in items("routes") {
            let dst = str_of(&r, "dst").unwrap_or_default();
            if parse_cidr(&dst).is_none() {
                return Err(bad(format!("route destination {dst:?} is not a CIDR")));
            }
            let gw: Option<IpAddr> = match str_of(&r, "gw") {
                None => None,
                Some(g) => Some(
                    g.parse()
                        .map_err(|_| bad(format!("route gateway {g:?} is not an IP address")))?,
                ),
            };
            let ours =
                gw.is_none_or(|gw| ips.iter().any(|ip| same_subnet(ip.address, gw, ip.prefix)));
            if ours {
                routes.push(Route { dst, gw });
            }
        }
        let dns = prev
            .get("dns")
            .map(|d| {
                let strings = |key: &str| {
                    d.get(key)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Dns {
                    nameservers: strings("nameservers"),
                    domain: str_of(d, "domain"),
                    search: strings("search"),
                    options: strings("options"),
                }
            })
            .unwrap_or_default();
        Ok(Self {
            interfaces: vec![interface],
            ips,
            routes,
            dns,
        })
    }
}

/// Parses `address/prefix` (e.g. `10.147.17.5/24`, `fd80::5/88`), checking the prefix length
/// against the address family.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, prefix) = s.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let prefix: u8 = prefix.parse().ok()?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((addr, prefix))
}

/// Whether `a` and `b` are in the same `prefix`-long subnet (false across families).
fn same_subnet(a: IpAddr, b: IpAddr, prefix: u8) -> bool {
    let mask = |bits: u32, width: u32| -> u128 {
        if bits == 0 {
            0
        } else {
            (!0u128 << (width - bits.min(width))) & (!0u128 >> (128 - width))
        }
    };
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let m = mask(u32::from(prefix), 32);
            u128::from(u32::from(a)) & m == u128::from(u32::from(b)) & m
        }
        (IpAddr::V6(a), IpAddr::V6(b)) => {
            let m = mask(u32::from(prefix), 128);
            u128::from(a) & m == u128::from(b) & m
        }
        _ => false,
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
        assert_eq!(inv.pod(), ("default", "web-0", ""));
    }

    #[test]
    fn gc_without_a_list_keeps_nothing_and_reads_the_libcni_alias() {
        let base = r#"{"cniVersion":"1.1.0","name":"flat","type":"flatwire-cni""#;
        let none = NetConf::parse(format!("{base}}}").as_bytes(), Command::Gc).unwrap();
        assert!(none.valid_attachments.is_empty());
        let alias = NetConf::parse(
            format!(r#"{base},"cni.dev/attachments":[{{"containerID":"c9","ifname":"net1"}}]}}"#)
                .as_bytes(),
            Command::Gc,
        )
        .unwrap();
        assert_eq!(alias.valid_attachments[0].container_id, "c9");
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
        // A relative netns path is refused.
        let relative = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", "run/netns/x"),
        ];
        assert_eq!(
            Invocation::from_env(env(&relative)).unwrap_err().code,
            ErrorCode::InvalidEnvironment
        );
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
                Command::Add,
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
            conf.valid_attachments,
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

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![Interface {
                name: "eth0".into(),
                mac: "32:aa:bb:cc:dd:ee".into(),
                mtu: Some(2800),
                sandbox: Some("/run/netns/pod".into()),
            }],
            ips: vec![
                IpConfig {
                    address: "10.77.0.12".parse().unwrap(),
                    prefix: 24,
                    gateway: Some("10.77.0.1".parse().unwrap()),
                    interface: Some(0),
                },
                IpConfig {
                    address: "fd00:77::12".parse().unwrap(),
                    prefix: 64,
                    gateway: None,
                    interface: Some(0),
                },
            ],
            routes: vec![
                Route {
                    dst: "0.0.0.0/0".into(),
                    gw: Some("10.77.0.1".parse().unwrap()),
                },
                Route {
                    dst: "fd00:77::/64".into(),
                    gw: None,
                },
            ],
            dns: Dns::default(),
        }
    }

    #[test]
    fn a_chained_add_appends_to_the_previous_result() {
        let prev = serde_json::json!({
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "lo", "sandbox": "/run/netns/pod"}, {"name": "veth1"}],
            "ips": [{"address": "192.0.2.5/24", "interface": 0}],
            "routes": [{"dst": "192.0.2.0/24"}],
            "dns": {"nameservers": ["192.0.2.53"]},
        });
        let out = sample().chained_json("1.0.0", Some(&prev)).unwrap();
        assert_eq!(out["interfaces"].as_array().unwrap().len(), 3);
        assert_eq!(out["interfaces"][2]["name"], "eth0");
        assert_eq!(out["ips"][0]["address"], "192.0.2.5/24");
        assert_eq!(out["ips"][1]["address"], "10.77.0.12/24");
        assert_eq!(out["ips"][1]["interface"], 2);
        assert_eq!(out["ips"][2]["interface"], 2);
        assert_eq!(out["routes"].as_array().unwrap().len(), 3);
        assert_eq!(out["dns"]["nameservers"][0], "192.0.2.53");
        assert_eq!(
            sample().chained_json("1.1.0", None).unwrap(),
            sample().to_json("1.1.0")
        );
        let bad = serde_json::json!({"interfaces": 3});
        assert_eq!(
            sample().chained_json("1.1.0", Some(&bad)).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
    }

    #[test]
    fn check_reads_our_part_back_from_the_final_result() {
        // The final result of a chain: ours first, then an interface a later plugin added,
        // and a route of another plugin through a foreign gateway.
        let mut prev = sample().to_json("1.1.0");
        prev["interfaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "bwp1234", "mac": "aa:aa:aa:aa:aa:aa"}));
        prev["routes"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"dst": "198.51.100.0/24", "gw": "192.0.2.1"}));
        let ours = CniResult::from_prev(&prev, "eth0").unwrap();
        assert_eq!(ours, sample());
        let err = CniResult::from_prev(&prev, "net1").unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidConfig);
        prev["ips"][0]["address"] = "10.77.0.12".into();
        assert!(CniResult::from_prev(&prev, "eth0").is_err());
    }

    #[test]
    fn cidrs_and_subnets() {
        assert_eq!(
            parse_cidr("10.1.2.3/8"),
            Some(("10.1.2.3".parse().unwrap(), 8))
        );
        assert_eq!(parse_cidr("fd00::1/128").map(|c| c.1), Some(128));
        for bad in [
            "10.1.2.3",
            "10.1.2.3/33",
            "fd00::1/129",
            "x/1",
            "10.0.0.1/-1",
        ] {
            assert_eq!(parse_cidr(bad), None, "{bad}");
        }
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(same_subnet(ip("10.77.0.12"), ip("10.77.0.1"), 24));
        assert!(!same_subnet(ip("10.77.0.12"), ip("10.77.1.1"), 24));
        assert!(same_subnet(ip("10.77.0.12"), ip("192.0.2.1"), 0));
        assert!(same_subnet(ip("fd00:77::12"), ip("fd00:77::1"), 64));
        assert!(!same_subnet(ip("fd00:77::12"), ip("fd00:78::1"), 64));
        assert!(!same_subnet(ip("10.77.0.12"), ip("fd00:77::1"), 0));
    }
}
