//! The `NetworkMember` custom resource: a member that is not a pod.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A member of a flatwire network that is not a pod of this cluster: a laptop running
/// ZeroTier One, a VM, a node in another cluster.
// clippy reads the repeated `type_` keys of separate `printcolumn(...)` entries as duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flatwire.io",
    version = "v1alpha1",
    kind = "NetworkMember",
    plural = "networkmembers",
    singular = "networkmember",
    shortname = "fwmember",
    category = "flatwire",
    status = "NetworkMemberStatus",
    derive = "PartialEq",
    doc = "A non-pod member of a flatwire network and its authorization.",
    printcolumn(name = "Network", type_ = "string", json_path = ".spec.network"),
    printcolumn(name = "Address", type_ = "string", json_path = ".spec.address"),
    printcolumn(name = "Authorized", type_ = "boolean", json_path = ".spec.authorized"),
    printcolumn(
        name = "IPs",
        type_ = "string",
        json_path = ".status.assignedIPs",
        priority = "1"
    ),
    printcolumn(name = "Last Seen", type_ = "date", json_path = ".status.lastSeen"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMemberSpec {
    /// The name of the `Network` this member belongs to.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("network is immutable"))]
    pub network: String,
    /// The member's ZeroTier address: 10 lowercase hex digits.
    #[schemars(regex(pattern = r"^[0-9a-f]{10}$"))]
    #[x_kube(validation = Rule::new("self != '0000000000' && !self.startsWith('ff')")
        .message("0000000000 and addresses starting with ff are reserved ZeroTier addresses"))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("address is immutable"))]
    pub address: String,
    /// Whether the controller admits the member.
    #[serde(default)]
    pub authorized: bool,
    /// Whether the member may bridge other Ethernet hosts onto the network.
    #[serde(default)]
    pub active_bridge: bool,
    /// Static IP addresses (in addition to, or instead of, pool assignments).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32), inner(length(max = 45)))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    #[x_kube(validation = Rule::new("self.all(a, isIP(a))").message("ipAssignments must be IP addresses"))]
    pub ip_assignments: Vec<String>,
    /// Tag values by tag name (an enum name or a number, as the Network defines the tag).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 128))]
    pub tags: BTreeMap<String, String>,
    /// Names of the Network's capabilities granted to this member.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub capabilities: Vec<String>,
    /// A human-readable name for the member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 127))]
    pub name: Option<String>,
}

/// What the controller last saw of a NetworkMember.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkMemberStatus {
    /// When the member last asked the controller for its configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// The physical (UDP) address it asked from, `ip/port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub physical_address: Option<String>,
    /// The ZeroTier version it reported, `major.minor.revision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The addresses the controller assigned it.
    #[serde(default, rename = "assignedIPs", skip_serializing_if = "Vec::is_empty")]
    pub assigned_ips: Vec<String>,
    /// Problems with the member (e.g. an unknown tag or capability name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}
