//! The `Network` custom resource: one ZeroTier-compatible controller network.

use std::collections::BTreeMap;

use flatwire_vl2::rules::compiler::{self, CompileError, Compiled, is_valid_name};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// CEL: the IPv4 address `s` (dotted quad) as an integer.
macro_rules! v4_int {
    ($s:literal) => {
        concat!(
            "(int(",
            $s,
            ".split('.')[0]) * 16777216 + int(",
            $s,
            ".split('.')[1]) * 65536",
            " + int(",
            $s,
            ".split('.')[2]) * 256 + int(",
            $s,
            ".split('.')[3]))"
        )
    };
}

/// The desired state of a flatwire network (the controller's network object).
// clippy reads the repeated `type_` keys of separate `printcolumn(...)` entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flatwire.io",
    version = "v1alpha1",
    kind = "Network",
    plural = "networks",
    singular = "network",
    shortname = "fwnet",
    category = "flatwire",
    status = "NetworkStatus",
    derive = "PartialEq",
    doc = "A flatwire network: a ZeroTier-compatible encrypted virtual Ethernet whose controller is the flatwire operator.",
    printcolumn(
        name = "ID",
        type_ = "string",
        json_path = ".status.networkId",
        description = "64-bit network ID"
    ),
    printcolumn(
        name = "Members",
        type_ = "integer",
        json_path = ".status.members",
        description = "Members the controller knows"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Ready condition"
    ),
    printcolumn(
        name = "Mode",
        type_ = "string",
        json_path = ".spec.mode",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!(has(self.id) && has(self.number))").message("set at most one of id and number"))]
#[serde(rename_all = "camelCase")]
pub struct NetworkSpec {
    /// The 24-bit network number under the operator's controller address; the operator picks
    /// one when neither this nor `id` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 16777215))]
    pub number: Option<u32>,
    /// The full 64-bit network ID as 16 lowercase hex digits; its top 40 bits must be the
    /// operator's controller address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9a-f]{16}$"))]
    #[x_kube(validation = Rule::new("!self.startsWith('ff')").message("network IDs starting with ff are ad-hoc networks, which have no controller"))]
    pub id: Option<String>,
    /// The network's short name shown to members (ZeroTier allows 127 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 127))]
    pub name: Option<String>,
    /// Private networks admit only authorized members (public ones admit anyone).
    #[serde(default = "default_true")]
    pub private: bool,
    /// Ranges members get addresses from (`v4AssignMode`/`v6AssignMode` `pool`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub ip_assignment_pools: Vec<IpPool>,
    /// Routes pushed to members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub routes: Vec<Route>,
    /// How members get IPv4 addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub v4_assign_mode: Vec<V4AssignMode>,
    /// How members get IPv6 addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub v6_assign_mode: Vec<V6AssignMode>,
    /// DNS settings pushed to members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    /// The virtual Ethernet's MTU.
    #[serde(default = "default_mtu")]
    #[schemars(range(min = 1280, max = 10000))]
    pub mtu: u32,
    /// Maximum recipients of one multicast (0 disables multicast).
    #[serde(default = "default_multicast_limit")]
    #[schemars(range(max = 65535))]
    pub multicast_limit: u32,
    /// Whether Ethernet broadcast (ff:ff:ff:ff:ff:ff) is allowed.
    #[serde(default = "default_true")]
    pub enable_broadcast: bool,
    /// Tag definitions: values members carry, read from pod labels.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[x_kube(validation = Rule::new("self.all(t, self.exists_one(u, u.id == t.id))").message("tag ids must be unique"))]
    pub tags: Vec<TagDefinition>,
    /// Capability definitions: named rule sets granted to chosen members.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["name".into()]))]
    #[x_kube(validation = Rule::new("self.all(c, self.exists_one(d, d.id == c.id))").message("capability ids must be unique"))]
    pub capabilities: Vec<CapabilityDefinition>,
    /// The network's rules in ZeroTier's rule language (compiled by the operator; errors
    /// appear in the `RulesCompiled` condition). Empty means "accept".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 65536))]
    pub rules: Option<String>,
    /// Namespaces whose pods may join (absent: every namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// Pods that join, within the selected namespaces (absent: no pod joins; `{}`: every pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Whether the network is the pods' primary interface (`eth0`) or an extra one.
    #[serde(default)]
    pub mode: NetworkMode,
}

fn default_true() -> bool {
    true
}

fn default_mtu() -> u32 {
    2800
}

fn default_multicast_limit() -> u32 {
    32
}

/// An address range members are assigned from (inclusive).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(concat!(
    "!isIP(self.ipRangeStart) || !isIP(self.ipRangeEnd) || ",
    "(ip(self.ipRangeStart).family() == ip(self.ipRangeEnd).family() && ",
    "(ip(self.ipRangeStart).family() == 6 || ",
    v4_int!("self.ipRangeStart"), " <= ", v4_int!("self.ipRangeEnd"), "))"
)).message("ipRangeStart and ipRangeEnd must be of one address family with ipRangeStart <= ipRangeEnd"))]
#[serde(rename_all = "camelCase")]
pub struct IpPool {
    /// First address of the range.
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address"))]
    pub ip_range_start: String,
    /// Last address of the range.
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address"))]
    pub ip_range_end: String,
}

/// A route pushed to members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new(
    "!has(self.via) || !isCIDR(self.target) || !isIP(self.via) || cidr(self.target).ip().family() == ip(self.via).family()"
).message("via must be of the same address family as target"))]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// Destination prefix (CIDR).
    #[schemars(length(max = 49))]
    #[x_kube(validation = Rule::new("isCIDR(self)").message("must be a CIDR prefix such as 10.0.0.0/8"))]
    pub target: String,
    /// Gateway; absent for the network's own (link-local) prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 45))]
    #[x_kube(validation = Rule::new("isIP(self)").message("must be an IPv4 or IPv6 address"))]
    pub via: Option<String>,
}

/// IPv4 assignment modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4AssignMode {
    /// From `ipAssignmentPools`.
    #[serde(rename = "pool")]
    Pool,
}

/// IPv6 assignment modes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum V6AssignMode {
    /// From `ipAssignmentPools`.
    #[serde(rename = "pool")]
    Pool,
    /// An RFC4193 /88 address computed from the network ID and member address.
    #[serde(rename = "rfc4193")]
    Rfc4193,
    /// A 6PLANE /80 per member, computed from the network ID and member address.
    #[serde(rename = "6plane")]
    SixPlane,
}

/// DNS settings pushed to members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Dns {
    /// Search domain.
    #[schemars(length(max = 127))]
    pub domain: String,
    /// Name servers (at most 4, ZeroTier's limit).
    #[serde(default)]
    #[schemars(length(max = 4), inner(length(max = 45)))]
    #[x_kube(validation = Rule::new("self.all(s, isIP(s))").message("servers must be IP addresses"))]
    pub servers: Vec<String>,
}

/// A tag definition: a numeric value each member carries, read from a pod label.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[x_kube(validation = Rule::new("!has(self.default) || !has(self.enum) || self.enum.exists(k, self.enum[k] == self.default)")
    .message("default must be one of the enum values"))]
#[serde(rename_all = "camelCase")]
pub struct TagDefinition {
    /// Name used in the rules source and in NetworkMember tags.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
    /// The tag's 32-bit id.
    #[schemars(range(max = 4294967295u32))]
    pub id: u32,
    /// Value names (pod label values) and their numbers.
    #[serde(default, rename = "enum", skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 256))]
    #[x_kube(validation = Rule::new("self.all(k, self[k] <= 4294967295)").message("enum values must fit in 32 bits"))]
    pub enum_values: BTreeMap<String, u32>,
    /// The pod label whose value (an enum name or a number) gives a pod its value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 317))]
    pub pod_label: Option<String>,
    /// Value of members without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 4294967295u32))]
    pub default: Option<u32>,
}

/// A capability definition: a named rule set granted to chosen members.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CapabilityDefinition {
    /// Name used in the rules source and in NetworkMember capabilities.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[A-Za-z_][A-Za-z0-9_.-]*$")
    )]
    pub name: String,
    /// The capability's 32-bit id.
    #[schemars(range(max = 4294967295u32))]
    pub id: u32,
    /// The capability's rules in ZeroTier's rule language.
    #[serde(default)]
    #[schemars(length(max = 16384))]
    pub rules: String,
}

/// Whether a network is the pods' primary network.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum NetworkMode {
    /// The pods' `eth0` and default route.
    Primary,
    /// An extra interface carrying only the network's routes.
    #[default]
    Secondary,
}

/// What the operator observed and did for a Network.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkStatus {
    /// The 64-bit network ID in use (16 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_id: Option<String>,
    /// The controller's configuration revision, bumped on every change members see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<u64>,
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready` and `RulesCompiled` (whose message is `line L column C: ...` on an error).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Members the controller holds: bound pods, the nodes' host members and the
    /// NetworkMembers it serves (written by the operator whenever the count changes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<u32>,
    /// Of those, the authorized ones (a NetworkMember with `authorized: false` counts only
    /// in `members`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorized_members: Option<u32>,
}

impl TagDefinition {
    /// The value `s` names: one of the enum names, else a decimal 32-bit number.
    pub fn value_of(&self, s: &str) -> Option<u32> {
        self.enum_values
            .get(s)
            .copied()
            .or_else(|| s.parse::<u32>().ok())
    }
}

impl NetworkSpec {
    /// Compiles `rules` with ZeroTier's rule language; an error displays as
    /// `line L column C: ...`, the message of a `RulesCompiled=False` condition. The rules
    /// may name the Network's tags and their enum values (see [`NetworkSpec::compile_source`]).
    pub fn compile_rules(&self) -> Result<Compiled, CompileError> {
        self.compile_source(self.rules.as_deref().unwrap_or(""))
    }

    /// Compiles rule-language `src` (the base rules or a capability's) after declarations of
    /// the Network's tags, so `src` can name them: each tag whose name the rule language
    /// accepts, with its id, default and the enum values whose names it accepts. Error lines
    /// and columns are those of `src`.
    pub fn compile_source(&self, src: &str) -> Result<Compiled, CompileError> {
        let mut decls = String::new();
        for t in self.tags.iter().filter(|t| is_valid_name(&t.name)) {
            decls.push_str(&format!("tag {} id {}", t.name, t.id));
            for (name, v) in t.enum_values.iter().filter(|(n, _)| is_valid_name(n)) {
                decls.push_str(&format!(" enum {v} {name}"));
            }
            if let Some(d) = t.default {
                decls.push_str(&format!(" default {d}"));
            }
            decls.push_str(";\n");
        }
        let lines = decls.lines().count();
        compiler::compile(&format!("{decls}{src}")).map_err(|mut e| {
            if e.line > lines {
                e.line -= lines;
            } else {
                e.message = format!("in the declarations of spec.tags: {}", e.message);
            }
            e
        })
    }
}
