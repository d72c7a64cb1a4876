//! The network controller's object model (network and member JSON as ZeroTier's
//! controller API and `controller.d` files have them) and its storage.
//!
//! # Pod bindings
//!
//! A flatwire extension for Kubernetes: a [`PodBinding`] (per network, keyed by the pod's
//! uid) says where the API server places a pod: `{"namespace", "name", "uid", "host"` (the
//! 10-hex address of the node's host identity)`, "tags": [[id, value], ...]}` plus
//! `"members"`, the member addresses the binding authorized (written by the controller).
//! On a network with `"vouchRequiresPod": true` a node's vouch (see [`crate::vouch`]) for
//! pod `namespace/name/uid` is accepted only when a binding of that uid, namespace and name
//! names the vouching host; the member it authorizes gets the binding's tags at once.
//! [`Controller::api_pod_post`] writes a binding (retagging the members it authorized) and
//! [`Controller::api_pod_delete`] removes it together with those members, so their IPs
//! return to the pool and the caller revokes their certificates. Without the flag, bindings
//! are not consulted and vouches work as before.
//!
//! A binding also remembers its members' IPs in `"ipAssignments"` (sorted, IPv4 first, at
//! most [`MAX_POD_IPS`]): the controller rewrites it whenever it authorizes such a member or
//! assigns or changes its IPs, so a caller can keep a copy elsewhere (the operator keeps it
//! in a Pod annotation) and hand it back in the POST that re-creates the binding after the
//! store was lost. Such a reservation is a list of IP addresses; a POST to an existing
//! binding may only repeat its value ([`ApiError::PodIpsSetByController`]). Every IP a
//! binding lists counts as taken for the pool assignment of every member but those the
//! binding authorized; the first of these gets the binding's IPs that lie in a pool and no
//! other member holds before any pool pick. Deleting the binding frees them.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use flatwire_vl1::Address;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::NetworkId;

mod api;
mod index;
mod logic;
mod pods;
pub use api::{ApiError, MAX_BODY, MAX_MEMBER_IPS, MAX_NETWORK_ITEMS, MAX_V4_POOL, PoolProblem};
use index::{MemberIndex, binding_ips, member_ips};
pub use logic::{
    Controller, ControllerError, MemberAuthorizer, RequestOutcome, RequestRefusal, config_payloads,
    refusal_payload,
};
pub use pods::{MAX_POD_IPS, PodBinding, PodDeleted, PodWrite, valid_pod_uid};

fn d_true() -> bool {
    true
}
fn d_mtu() -> i64 {
    2800
}
fn d_ml() -> i64 {
    32
}
fn d_neg() -> i64 {
    -1
}
fn d_rules() -> Vec<Value> {
    vec![serde_json::json!({"not": false, "or": false, "type": "ACTION_ACCEPT"})]
}
fn d_empty_arr() -> Value {
    Value::Array(Vec::new())
}
fn d_tokens() -> Value {
    Value::Array(vec![Value::Null])
}
fn d_network() -> String {
    "network".into()
}
fn d_member() -> String {
    "member".into()
}

/// An IPv4/IPv6 assignment pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Last address.
    #[serde(rename = "ipRangeEnd")]
    pub ip_range_end: String,
    /// First address.
    #[serde(rename = "ipRangeStart")]
    pub ip_range_start: String,
}

/// A managed route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteJson {
    /// Target CIDR.
    pub target: String,
    /// Gateway or null.
    #[serde(default)]
    pub via: Option<String>,
}

/// IPv4 assign mode.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct V4AssignMode {
    /// Assign from pools.
    #[serde(default)]
    pub zt: bool,
}

/// IPv6 assign modes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct V6AssignMode {
    /// 6PLANE.
    #[serde(rename = "6plane", default)]
    pub sixplane: bool,
    /// RFC4193.
    #[serde(default)]
    pub rfc4193: bool,
    /// Assign from pools.
    #[serde(default)]
    pub zt: bool,
}

/// A controller network object (`objtype` "network").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Network {
    /// Legacy token auth map (new networks: `[null]`).
    #[serde(default = "d_tokens")]
    pub auth_tokens: Value,
    /// SSO endpoint.
    #[serde(default)]
    pub authorization_endpoint: String,
    /// Capabilities `{id, default, rules}`.
    #[serde(default)]
    pub capabilities: Vec<Value>,
    /// SSO client id.
    #[serde(default)]
    pub client_id: String,
    /// Creation time (ms).
    #[serde(default)]
    pub creation_time: i64,
    /// `{domain, servers}` or `[]`.
    #[serde(default = "d_empty_arr")]
    pub dns: Value,
    /// Broadcast enabled.
    #[serde(default = "d_true")]
    pub enable_broadcast: bool,
    /// 16-hex network id.
    pub id: String,
    /// Pools.
    #[serde(default)]
    pub ip_assignment_pools: Vec<Pool>,
    /// MTU.
    #[serde(default = "d_mtu")]
    pub mtu: i64,
    /// Multicast limit.
    #[serde(default = "d_ml")]
    pub multicast_limit: i64,
    /// Name.
    #[serde(default)]
    pub name: String,
    /// 16-hex network id.
    pub nwid: String,
    /// "network".
    #[serde(default = "d_network")]
    pub objtype: String,
    /// Private (COM required) or public.
    #[serde(default = "d_true")]
    pub private: bool,
    /// Remote trace level.
    #[serde(default)]
    pub remote_trace_level: i64,
    /// Remote trace target.
    #[serde(default)]
    pub remote_trace_target: Option<String>,
    /// Revision.
    #[serde(default)]
    pub revision: u64,
    /// Routes.
    #[serde(default)]
    pub routes: Vec<RouteJson>,
    /// Base rules (JSON form).
    #[serde(default = "d_rules")]
    pub rules: Vec<Value>,
    /// Rule source (Central).
    #[serde(default)]
    pub rules_source: String,
    /// SSO enabled.
    #[serde(default)]
    pub sso_enabled: bool,
    /// Tags `{id, default}`.
    #[serde(default)]
    pub tags: Vec<Value>,
    /// IPv4 assign mode.
    #[serde(default)]
    pub v4_assign_mode: V4AssignMode,
    /// IPv6 assign mode.
    #[serde(default)]
    pub v6_assign_mode: V6AssignMode,
    /// flatwire extension: a node's vouch authorizes a pod member only when a
    /// [`PodBinding`] places that pod on the vouching node (see the module docs).
    /// Absent (false) in ZeroTier's files, and not written while false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vouch_requires_pod: bool,
    /// Fields this model does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A controller member object (`objtype` "member").
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// Active bridge.
    #[serde(default)]
    pub active_bridge: bool,
    /// 10-hex address.
    pub address: String,
    /// SSO expiry.
    #[serde(default)]
    pub authentication_expiry_time: i64,
    /// Authorized.
    #[serde(default)]
    pub authorized: bool,
    /// Capability ids.
    #[serde(default)]
    pub capabilities: Vec<u64>,
    /// Creation time.
    #[serde(default)]
    pub creation_time: i64,
    /// 10-hex address.
    pub id: String,
    /// Pinned public identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Assigned IPs.
    #[serde(default)]
    pub ip_assignments: Vec<String>,
    /// How it was last authorized (token or null).
    #[serde(default)]
    pub last_authorized_credential: Option<String>,
    /// "api", "public", "token" or null.
    #[serde(default)]
    pub last_authorized_credential_type: Option<String>,
    /// Time of last authorization.
    #[serde(default)]
    pub last_authorized_time: i64,
    /// Time of last deauthorization.
    #[serde(default)]
    pub last_deauthorized_time: i64,
    /// Name (1.14.0+).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// No automatic IPs.
    #[serde(default)]
    pub no_auto_assign_ips: bool,
    /// 16-hex network id.
    pub nwid: String,
    /// "member".
    #[serde(default = "d_member")]
    pub objtype: String,
    /// Remote trace level.
    #[serde(default)]
    pub remote_trace_level: i64,
    /// Remote trace target.
    #[serde(default)]
    pub remote_trace_target: Option<String>,
    /// Revision.
    #[serde(default)]
    pub revision: u64,
    /// SSO exempt.
    #[serde(default)]
    pub sso_exempt: bool,
    /// Tags as `[id, value]` pairs.
    #[serde(default)]
    pub tags: Vec<(u64, u64)>,
    /// Software major version.
    #[serde(rename = "vMajor", default = "d_neg")]
    pub v_major: i64,
    /// Software minor version.
    #[serde(rename = "vMinor", default = "d_neg")]
    pub v_minor: i64,
    /// Protocol version.
    #[serde(rename = "vProto", default = "d_neg")]
    pub v_proto: i64,
    /// Software revision.
    #[serde(rename = "vRev", default = "d_neg")]
    pub v_rev: i64,
    /// Fields this model does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Network {
    /// A new network with the controller's defaults.
    pub fn new(nwid: NetworkId, now: i64) -> Self {
        let mut n: Network = serde_json::from_value(serde_json::json!({
            "id": nwid.to_string(), "nwid": nwid.to_string()
        }))
        .unwrap_or_else(|_| unreachable_network(nwid));
        n.creation_time = now;
        n
    }
}

fn unreachable_network(nwid: NetworkId) -> Network {
    Network {
        auth_tokens: d_tokens(),
        authorization_endpoint: String::new(),
        capabilities: Vec::new(),
        client_id: String::new(),
        creation_time: 0,
        dns: d_empty_arr(),
        enable_broadcast: true,
        id: nwid.to_string(),
        ip_assignment_pools: Vec::new(),
        mtu: 2800,
        multicast_limit: 32,
        name: String::new(),
        nwid: nwid.to_string(),
        objtype: d_network(),
        private: true,
        remote_trace_level: 0,
        remote_trace_target: None,
        revision: 0,
        routes: Vec::new(),
        rules: d_rules(),
        rules_source: String::new(),
        sso_enabled: false,
        tags: Vec::new(),
        v4_assign_mode: V4AssignMode::default(),
        v6_assign_mode: V6AssignMode::default(),
        vouch_requires_pod: false,
        extra: BTreeMap::new(),
    }
}

impl Member {
    /// A new member with the controller's defaults.
    pub fn new(nwid: NetworkId, address: Address, now: i64) -> Self {
        Member {
            active_bridge: false,
            address: address.to_string(),
            authentication_expiry_time: 0,
            authorized: false,
            capabilities: Vec::new(),
            creation_time: now,
            id: address.to_string(),
            identity: None,
            ip_assignments: Vec::new(),
            last_authorized_credential: None,
            last_authorized_credential_type: None,
            last_authorized_time: 0,
            last_deauthorized_time: 0,
            name: None,
            no_auto_assign_ips: false,
            nwid: nwid.to_string(),
            objtype: d_member(),
            remote_trace_level: 0,
            remote_trace_target: None,
            revision: 0,
            sso_exempt: false,
            tags: Vec::new(),
            v_major: -1,
            v_minor: -1,
            v_proto: -1,
            v_rev: -1,
            extra: BTreeMap::new(),
        }
    }
}

fn write_sorted(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(*k) {
                    write_sorted(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_sorted(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Compact JSON with object keys sorted, as the reference (nlohmann::json) writes it.
pub fn to_canonical_json<T: Serialize>(v: &T) -> Result<String, StoreError> {
    let value = serde_json::to_value(v).map_err(|e| StoreError::Json(e.to_string()))?;
    let mut s = String::new();
    write_sorted(&value, &mut s);
    Ok(s)
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File system error.
    #[error("store I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A stored object is not valid JSON of the expected shape.
    #[error("store JSON: {0}")]
    Json(String),
}

/// Storage for controller objects. `put_*` compares with the stored object ignoring
/// `revision`; when it differs, it stores it with `revision` = stored + 1 and returns
/// `true`. A new object is stored with revision 1 (or the revision it already has).
pub trait ControllerStore {
    /// Loads a network.
    fn get_network(&self, nwid: NetworkId) -> Result<Option<Network>, StoreError>;
    /// Saves a network (revision bump on change).
    fn put_network(&mut self, network: &mut Network) -> Result<bool, StoreError>;
    /// Deletes a network and its members; returns the deleted network.
    fn delete_network(&mut self, nwid: NetworkId) -> Result<Option<Network>, StoreError>;
    /// Network IDs, sorted.
    fn list_networks(&self) -> Result<Vec<NetworkId>, StoreError>;
    /// Loads a member.
    fn get_member(&self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError>;
    /// Saves a member (revision bump on change).
    fn put_member(&mut self, member: &mut Member) -> Result<bool, StoreError>;
    /// Deletes a member.
    fn delete_member(&mut self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError>;
    /// Members of a network, sorted by address.
    fn list_members(&self, nwid: NetworkId) -> Result<Vec<Address>, StoreError>;
    /// Loads the pod binding of pod `uid` on a network.
    fn get_pod(&self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError>;
    /// Saves a pod binding (keyed by its `uid`); true when it changed.
    fn put_pod(&mut self, nwid: NetworkId, binding: &PodBinding) -> Result<bool, StoreError>;
    /// Deletes a pod binding; returns the deleted one.
    fn delete_pod(&mut self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError>;
    /// The pod uids bound on a network, sorted.
    fn list_pods(&self, nwid: NetworkId) -> Result<Vec<String>, StoreError>;
    /// The members of a network with `activeBridge` set, sorted by address. The default
    /// reads every member; [`MemoryStore`] and [`FileStore`] answer from an index.
    fn active_bridges(&self, nwid: NetworkId) -> Result<Vec<Address>, StoreError> {
        let mut out = Vec::new();
        for a in self.list_members(nwid)? {
            if self.get_member(nwid, a)?.is_some_and(|m| m.active_bridge) {
                out.push(a);
            }
        }
        Ok(out)
    }
    /// Whether a member of the network other than `except` has `ip` in its
    /// `ipAssignments`. The default reads every member; [`MemoryStore`] and
    /// [`FileStore`] answer from an index.
    fn ip_assigned(
        &self,
        nwid: NetworkId,
        ip: IpAddr,
        except: Address,
    ) -> Result<bool, StoreError> {
        for a in self.list_members(nwid)? {
            if a != except
                && let Some(m) = self.get_member(nwid, a)?
                && member_ips(&m).any(|x| x == ip)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
    /// Whether a pod binding of the network other than that of pod `except` has `ip` in
    /// its `ipAssignments`. The default reads every binding; [`MemoryStore`] and
    /// [`FileStore`] answer from an index.
    fn ip_reserved(
        &self,
        nwid: NetworkId,
        ip: IpAddr,
        except: Option<&str>,
    ) -> Result<bool, StoreError> {
        for uid in self.list_pods(nwid)? {
            if Some(uid.as_str()) != except
                && let Some(b) = self.get_pod(nwid, &uid)?
                && binding_ips(&b).any(|x| x == ip)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

fn bump<T: Clone + PartialEq>(
    stored: Option<&T>,
    new: &mut T,
    rev: impl Fn(&mut T) -> &mut u64,
) -> bool {
    match stored {
        Some(old) => {
            let mut a = old.clone();
            let mut b = new.clone();
            *rev(&mut a) = 0;
            *rev(&mut b) = 0;
            if a == b {
                *rev(new) = *rev(&mut old.clone());
                false
            } else {
                *rev(new) = *rev(&mut old.clone()) + 1;
                true
            }
        }
        None => {
            // A new object starts at revision 1; an imported one keeps its revision.
            if *rev(new) == 0 {
                *rev(new) = 1;
            }
            true
        }
    }
}

fn parse_nwid(s: &str) -> Result<NetworkId, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Json(format!("bad network id {s:?}")))
}

fn parse_addr(s: &str) -> Result<Address, StoreError> {
    s.parse()
        .map_err(|_| StoreError::Json(format!("bad address {s:?}")))
}

fn check_uid(uid: &str) -> Result<(), StoreError> {
    if valid_pod_uid(uid) {
        Ok(())
    } else {
        Err(StoreError::Json(format!("bad pod uid {uid:?}")))
    }
}

/// The [`Store`] queries a store with a `MemberIndex` in `self.index` answers from it.
macro_rules! answer_from_index {
    () => {
        fn active_bridges(&self, nwid: NetworkId) -> Result<Vec<Address>, StoreError> {
            Ok(self.index.active_bridges(nwid))
        }
        fn ip_assigned(
            &self,
            nwid: NetworkId,
            ip: IpAddr,
            except: Address,
        ) -> Result<bool, StoreError> {
            Ok(self.index.ip_assigned(nwid, ip, except))
        }
        fn ip_reserved(
            &self,
            nwid: NetworkId,
            ip: IpAddr,
            except: Option<&str>,
        ) -> Result<bool, StoreError> {
            Ok(self.index.ip_reserved(nwid, ip, except))
        }
    };
}

/// An in-memory store.
#[derive(Clone, Debug, Default)]
pub struct MemoryStore {
    networks: BTreeMap<NetworkId, Network>,
    members: BTreeMap<(NetworkId, Address), Member>,
    pods: BTreeMap<(NetworkId, String), PodBinding>,
    index: MemberIndex,
}

impl ControllerStore for MemoryStore {
    fn get_network(&self, nwid: NetworkId) -> Result<Option<Network>, StoreError> {
        Ok(self.networks.get(&nwid).cloned())
    }
    fn put_network(&mut self, n: &mut Network) -> Result<bool, StoreError> {
        let id = parse_nwid(&n.id)?;
        let changed = bump(self.networks.get(&id), n, |x| &mut x.revision);
        if changed {
            self.networks.insert(id, n.clone());
        }
        Ok(changed)
    }
    fn delete_network(&mut self, nwid: NetworkId) -> Result<Option<Network>, StoreError> {
        self.members.retain(|(n, _), _| *n != nwid);
        self.pods.retain(|(n, _), _| *n != nwid);
        self.index.remove_network(nwid);
        Ok(self.networks.remove(&nwid))
    }
    fn list_networks(&self) -> Result<Vec<NetworkId>, StoreError> {
        Ok(self.networks.keys().copied().collect())
    }
    fn get_member(&self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError> {
        Ok(self.members.get(&(nwid, a)).cloned())
    }
    fn put_member(&mut self, m: &mut Member) -> Result<bool, StoreError> {
        let key = (parse_nwid(&m.nwid)?, parse_addr(&m.id)?);
        let changed = bump(self.members.get(&key), m, |x| &mut x.revision);
        if changed {
            let old = self.members.insert(key, m.clone());
            self.index.update(key.0, key.1, old.as_ref(), Some(m));
        }
        Ok(changed)
    }
    fn delete_member(&mut self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError> {
        let old = self.members.remove(&(nwid, a));
        self.index.update(nwid, a, old.as_ref(), None);
        Ok(old)
    }
    fn list_members(&self, nwid: NetworkId) -> Result<Vec<Address>, StoreError> {
        Ok(self
            .members
            .keys()
            .filter(|(n, _)| *n == nwid)
            .map(|(_, a)| *a)
            .collect())
    }
    fn get_pod(&self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError> {
        Ok(self.pods.get(&(nwid, uid.to_owned())).cloned())
    }
    fn put_pod(&mut self, nwid: NetworkId, b: &PodBinding) -> Result<bool, StoreError> {
        check_uid(&b.uid)?;
        let old = self.pods.insert((nwid, b.uid.clone()), b.clone());
        self.index.update_pod(nwid, &b.uid, old.as_ref(), Some(b));
        Ok(old.as_ref() != Some(b))
    }
    fn delete_pod(&mut self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError> {
        let old = self.pods.remove(&(nwid, uid.to_owned()));
        self.index.update_pod(nwid, uid, old.as_ref(), None);
        Ok(old)
    }
    fn list_pods(&self, nwid: NetworkId) -> Result<Vec<String>, StoreError> {
        Ok(self
            .pods
            .keys()
            .filter(|(n, _)| *n == nwid)
            .map(|(_, u)| u.clone())
            .collect())
    }
    answer_from_index!();
}

/// A store of one JSON file per object, laid out like ZeroTier's `controller.d`:
/// `network/<nwid>.json` and `network/<nwid>/member/<address>.json` (and, for flatwire's pod
/// bindings, `network/<nwid>/pod/<uid>.json`).
/// Writes go to a temporary file that is synced and renamed over the target, so a
/// crash leaves either the old or the new object (and perhaps a `.*.tmp` file, which
/// is ignored and overwritten by the next write of that object).
///
/// Active bridges, assigned IPs and the IPs pod bindings reserve are indexed in memory,
/// built when the store opens: files changed behind an open store's back are not seen by
/// the index until it is opened again.
#[derive(Debug)]
pub struct FileStore {
    root: PathBuf,
    index: MemberIndex,
}

impl FileStore {
    /// Opens the store at `root` (created on first write) and indexes its members and pod
    /// bindings. Fails if a member or binding file does not parse.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let mut s = Self {
            root: root.into(),
            index: MemberIndex::default(),
        };
        // Every network with a member directory, with or without its network file,
        // as `list_members` and `get_member` see them.
        let mut nets: BTreeSet<NetworkId> = s.list_networks()?.into_iter().collect();
        match std::fs::read_dir(s.root.join("network")) {
            Ok(rd) => {
                for e in rd {
                    let e = e?;
                    if e.file_type()?.is_dir()
                        && let Ok(n) = e.file_name().to_string_lossy().parse()
                    {
                        nets.insert(n);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        for nwid in nets {
            for a in s.list_members(nwid)? {
                if let Some(m) = s.get_member(nwid, a)? {
                    s.index.update(nwid, a, None, Some(&m));
                }
            }
            for uid in s.list_pods(nwid)? {
                if let Some(b) = s.get_pod(nwid, &uid)? {
                    s.index.update_pod(nwid, &uid, None, Some(&b));
                }
            }
        }
        Ok(s)
    }

    fn network_path(&self, nwid: NetworkId) -> PathBuf {
        self.root.join("network").join(format!("{nwid}.json"))
    }

    fn member_dir(&self, nwid: NetworkId) -> PathBuf {
        self.root
            .join("network")
            .join(nwid.to_string())
            .join("member")
    }

    fn member_path(&self, nwid: NetworkId, a: Address) -> PathBuf {
        self.member_dir(nwid).join(format!("{a}.json"))
    }

    fn pod_dir(&self, nwid: NetworkId) -> PathBuf {
        self.root.join("network").join(nwid.to_string()).join("pod")
    }

    /// `network/<nwid>/pod/<uid>.json`; the uid is checked, so it cannot leave the directory.
    fn pod_path(&self, nwid: NetworkId, uid: &str) -> Result<PathBuf, StoreError> {
        check_uid(uid)?;
        Ok(self.pod_dir(nwid).join(format!("{uid}.json")))
    }

    fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Json(format!("{}: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
        let dir = path
            .parent()
            .ok_or_else(|| StoreError::Json("path without parent".into()))?;
        std::fs::create_dir_all(dir)?;
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("obj");
        let tmp = dir.join(format!(".{name}.tmp"));
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }

    fn list_json(dir: &Path) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        match std::fs::read_dir(dir) {
            Ok(rd) => {
                for e in rd {
                    let name = e?.file_name().to_string_lossy().into_owned();
                    if let Some(stem) = name.strip_suffix(".json")
                        && !stem.starts_with('.')
                    {
                        out.push(stem.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        out.sort();
        Ok(out)
    }
}

impl ControllerStore for FileStore {
    fn get_network(&self, nwid: NetworkId) -> Result<Option<Network>, StoreError> {
        Self::read(&self.network_path(nwid))
    }
    fn put_network(&mut self, n: &mut Network) -> Result<bool, StoreError> {
        let id = parse_nwid(&n.id)?;
        let stored = self.get_network(id)?;
        let changed = bump(stored.as_ref(), n, |x| &mut x.revision);
        if changed {
            Self::write_atomic(&self.network_path(id), to_canonical_json(n)?.as_bytes())?;
        }
        Ok(changed)
    }
    fn delete_network(&mut self, nwid: NetworkId) -> Result<Option<Network>, StoreError> {
        let old = self.get_network(nwid)?;
        if old.is_some() {
            // Members first: a crash in between leaves a network to delete again,
            // never members that a re-created network would inherit.
            let dir = self.root.join("network").join(nwid.to_string());
            if dir.exists() {
                std::fs::remove_dir_all(dir)?;
            }
            self.index.remove_network(nwid);
            std::fs::remove_file(self.network_path(nwid))?;
        }
        Ok(old)
    }
    fn list_networks(&self) -> Result<Vec<NetworkId>, StoreError> {
        Ok(Self::list_json(&self.root.join("network"))?
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }
    fn get_member(&self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError> {
        Self::read(&self.member_path(nwid, a))
    }
    fn put_member(&mut self, m: &mut Member) -> Result<bool, StoreError> {
        let (n, a) = (parse_nwid(&m.nwid)?, parse_addr(&m.id)?);
        let stored = self.get_member(n, a)?;
        let changed = bump(stored.as_ref(), m, |x| &mut x.revision);
        if changed {
            Self::write_atomic(&self.member_path(n, a), to_canonical_json(m)?.as_bytes())?;
            self.index.update(n, a, stored.as_ref(), Some(m));
        }
        Ok(changed)
    }
    fn delete_member(&mut self, nwid: NetworkId, a: Address) -> Result<Option<Member>, StoreError> {
        let old = self.get_member(nwid, a)?;
        if old.is_some() {
            std::fs::remove_file(self.member_path(nwid, a))?;
            self.index.update(nwid, a, old.as_ref(), None);
        }
        Ok(old)
    }
    fn list_members(&self, nwid: NetworkId) -> Result<Vec<Address>, StoreError> {
        Ok(Self::list_json(&self.member_dir(nwid))?
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect())
    }
    fn get_pod(&self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError> {
        Self::read(&self.pod_path(nwid, uid)?)
    }
    fn put_pod(&mut self, nwid: NetworkId, b: &PodBinding) -> Result<bool, StoreError> {
        let path = self.pod_path(nwid, &b.uid)?;
        let old = Self::read::<PodBinding>(&path)?;
        if old.as_ref() == Some(b) {
            return Ok(false);
        }
        Self::write_atomic(&path, to_canonical_json(b)?.as_bytes())?;
        self.index.update_pod(nwid, &b.uid, old.as_ref(), Some(b));
        Ok(true)
    }
    fn delete_pod(&mut self, nwid: NetworkId, uid: &str) -> Result<Option<PodBinding>, StoreError> {
        let path = self.pod_path(nwid, uid)?;
        let old = Self::read(&path)?;
        if old.is_some() {
            std::fs::remove_file(path)?;
            self.index.update_pod(nwid, uid, old.as_ref(), None);
        }
        Ok(old)
    }
    fn list_pods(&self, nwid: NetworkId) -> Result<Vec<String>, StoreError> {
        Ok(Self::list_json(&self.pod_dir(nwid))?
            .into_iter()
            .filter(|u| valid_pod_uid(u))
            .collect())
    }
    answer_from_index!();
}
