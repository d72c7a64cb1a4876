//! The `NetworkMember` reconciler: a non-pod member's controller record.
//!
//! [`desired_member`] is the pure core: from the NetworkMember, its Network and the
//! controller address it computes the network ID and the controller member fields
//! (`authorized`, `activeBridge`, `ipAssignments`, `name`, `tags` as `[id, value]`,
//! `capabilities` as ids, named as in `flatwire_vl2::controller::Member`), or the problem
//! that prevents it. [`reconcile`] writes the network and the member through the
//! [`ControllerSink`], records `Ready`/`Authorized` conditions and the assigned IPs in
//! status, emits a Warning Event when a problem appears, and keeps a finalizer so that
//! deleting the NetworkMember deauthorizes and removes the member from the controller first.
//!
//! Without static IPs in the spec the controller's assignments (from the pools) are kept;
//! when the controller lacks the member (a fresh controller after a failover), it is created
//! with the IPs recorded in `status.assignedIPs`, so it gets its old addresses back.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::finalizer::{self, finalizer};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde_json::Value;

use super::ips::{assigned, parse_ips};
use super::network::{desired_network, network_id};
use super::{ControllerAddress, Error, FIELD_MANAGER, condition, lock, recorder};
use crate::crd::{Network, NetworkMember, NetworkMemberStatus};
use crate::sink::ControllerSink;

/// The finalizer that deauthorizes the member in the controller before the object goes.
pub const FINALIZER: &str = "flatwire.io/deauthorize";
/// Condition type: the member's record is in the controller as the spec says.
pub const READY: &str = "Ready";
/// Condition type: the controller admits the member.
pub const AUTHORIZED: &str = "Authorized";
/// How often a healthy NetworkMember is reconciled again without any change.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a NetworkMember with a problem in its spec or its Network is looked at again.
const RECHECK: Duration = Duration::from_secs(30);
/// How soon an authorized member without IPs yet (it has not asked for its config) is looked
/// at again, so that its status records the IPs the controller then assigns.
const PENDING_IPS: Duration = Duration::from_secs(10);

/// The controller member fields the operator owns (a partial controller member object;
/// the keys are those of `flatwire_vl2::controller::Member`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberBody {
    /// Whether the controller admits the member.
    pub authorized: bool,
    /// Whether it may bridge other Ethernet hosts.
    pub active_bridge: bool,
    /// Static IP assignments (none: the controller's are kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ip_assignments: Option<Vec<String>>,
    /// Display name (`null` clears it).
    pub name: Option<String>,
    /// Tags as `[id, value]`, sorted by id.
    pub tags: Vec<(u64, u64)>,
    /// Capability ids, sorted.
    pub capabilities: Vec<u64>,
}

/// A member as the controller should store it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredMember {
    /// The network ID.
    pub nwid: u64,
    /// The member's address (10 hex digits).
    pub address: String,
    /// Its fields.
    pub body: MemberBody,
    /// The network it belongs to, as the controller should store it (written first).
    pub network: Value,
}

/// Why a NetworkMember cannot be served; shown as the `Ready=False` condition.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemberProblem {
    /// `spec.network` names no Network.
    #[error("Network {0:?} does not exist")]
    NetworkNotFound(String),
    /// The Network has no valid network ID.
    #[error("Network {0:?} has no valid network ID: {1}")]
    InvalidNetwork(String, String),
    /// The Network's rules do not compile, so it cannot be written to the controller.
    #[error("Network {0:?} is not ready: {1}")]
    NetworkNotReady(String, String),
    /// A tag name the Network does not define.
    #[error("tag {0:?} is not defined by the Network")]
    UnknownTag(String),
    /// A tag value that is neither one of the tag's enum names nor a 32-bit number.
    #[error("tag {tag:?}: value {value:?} is neither one of its enum names nor a 32-bit number")]
    InvalidTagValue {
        /// The tag.
        tag: String,
        /// The value.
        value: String,
    },
    /// A capability name the Network does not define.
    #[error("capability {0:?} is not defined by the Network")]
    UnknownCapability(String),
    /// The member is the controller itself.
    #[error("address {0} is the controller's own address")]
    ControllerAddress(String),
}

impl MemberProblem {
    /// The condition and Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NetworkNotFound(_) => "NetworkNotFound",
            Self::InvalidNetwork(..) => "InvalidNetwork",
            Self::NetworkNotReady(..) => "NetworkNotReady",
            Self::UnknownTag(_) => "UnknownTag",
            Self::InvalidTagValue { .. } => "InvalidTagValue",
            Self::UnknownCapability(_) => "UnknownCapability",
            Self::ControllerAddress(_) => "ControllerAddress",
        }
    }
}

/// The controller record of `member` under `address`, given its Network (`None`: not found).
pub fn desired_member(
    address: ControllerAddress,
    member: &NetworkMember,
    network: Option<&Network>,
) -> Result<DesiredMember, MemberProblem> {
    let spec = &member.spec;
    let net = network.ok_or_else(|| MemberProblem::NetworkNotFound(spec.network.clone()))?;
    let nwid = network_id(address, net)
        .map_err(|e| MemberProblem::InvalidNetwork(spec.network.clone(), e))?;
    if spec.address == address.to_string() {
        return Err(MemberProblem::ControllerAddress(spec.address.clone()));
    }
    let network = desired_network(net)
        .map_err(|e| MemberProblem::NetworkNotReady(spec.network.clone(), e))?;
    let mut tags = Vec::with_capacity(spec.tags.len());
    for (name, value) in &spec.tags {
        let def = net
            .spec
            .tags
            .iter()
            .find(|t| &t.name == name)
            .ok_or_else(|| MemberProblem::UnknownTag(name.clone()))?;
        let v = def
            .value_of(value)
            .ok_or_else(|| MemberProblem::InvalidTagValue {
                tag: name.clone(),
                value: value.clone(),
            })?;
        tags.push((u64::from(def.id), u64::from(v)));
    }
    tags.sort_unstable();
    let mut caps = BTreeSet::new();
    for name in &spec.capabilities {
        let def = net
            .spec
            .capabilities
            .iter()
            .find(|c| &c.name == name)
            .ok_or_else(|| MemberProblem::UnknownCapability(name.clone()))?;
        caps.insert(u64::from(def.id));
    }
    let mut ips = spec.ip_assignments.clone();
    ips.sort();
    ips.dedup();
    Ok(DesiredMember {
        nwid,
        address: spec.address.clone(),
        body: MemberBody {
            authorized: spec.authorized,
            active_bridge: spec.active_bridge,
            ip_assignments: (!ips.is_empty()).then_some(ips),
            name: spec.name.clone(),
            tags,
            capabilities: caps.into_iter().collect(),
        },
        network,
    })
}

/// The status for `member` given the outcome of a reconcile: `Ready` from `outcome`
/// (`Ok(assigned IPs)` or the reason and message of the failure), `Authorized` from the
/// spec when the member is served.
pub fn desired_status(
    member: &NetworkMember,
    outcome: Result<Vec<String>, (&str, String)>,
    now: Timestamp,
) -> NetworkMemberStatus {
    let prev = member.status.clone().unwrap_or_default();
    let generation = member.metadata.generation;
    let cond = |t: &str, ok: bool, reason: &str, msg: String| {
        condition(&prev.conditions, t, ok, reason, msg, generation, now)
    };
    let (ready, assigned) = match outcome {
        Ok(ips) => (
            cond(
                READY,
                true,
                "Synced",
                "the controller has the member".into(),
            ),
            ips,
        ),
        Err((reason, msg)) => (cond(READY, false, reason, msg), prev.assigned_ips.clone()),
    };
    let served = ready.status == "True";
    let authorized = match (served, member.spec.authorized) {
        (true, true) => cond(
            AUTHORIZED,
            true,
            "Authorized",
            "the controller admits the member".into(),
        ),
        (true, false) => cond(
            AUTHORIZED,
            false,
            "NotAuthorized",
            "spec.authorized is false".into(),
        ),
        (false, _) => cond(
            AUTHORIZED,
            false,
            "NotServed",
            "the member is not in the controller (see Ready)".into(),
        ),
    };
    NetworkMemberStatus {
        assigned_ips: assigned,
        conditions: vec![ready, authorized],
        ..prev
    }
}

/// What a NetworkMember reconcile needs.
pub struct Context {
    client: Client,
    recorder: Recorder,
    address: ControllerAddress,
    sink: Option<Arc<dyn ControllerSink>>,
    failures: Mutex<std::collections::HashMap<String, u32>>,
}

impl Context {
    /// A context writing to `sink` (none: members get `Ready=False`, reason `NoController`).
    pub fn new(
        client: Client,
        address: ControllerAddress,
        sink: Option<Arc<dyn ControllerSink>>,
    ) -> Self {
        Self {
            recorder: recorder(&client),
            client,
            address,
            sink,
            failures: Mutex::new(Default::default()),
        }
    }
}

/// Reconciles one NetworkMember through the [`FINALIZER`] helper: apply (write the network
/// and member to the controller, then status) or cleanup (deauthorize and delete the member
/// in the controller). Call it from the controller.
pub async fn reconcile(member: Arc<NetworkMember>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<NetworkMember> = Api::all(ctx.client.clone());
    let name = member.name_any();
    let result = finalizer(&api, FINALIZER, member, |event| async {
        match event {
            finalizer::Event::Apply(m) => apply(&m, &ctx).await,
            finalizer::Event::Cleanup(m) => cleanup(&m, &ctx).await,
        }
    })
    .await;
    match result {
        Ok(a) => {
            lock(&ctx.failures).remove(&name);
            Ok(a)
        }
        Err(finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e)) => Err(e),
        Err(finalizer::Error::AddFinalizer(e) | finalizer::Error::RemoveFinalizer(e)) => {
            Err(Error::Kube(e))
        }
        Err(finalizer::Error::UnnamedObject) => Err(Error::NoName),
        Err(e @ finalizer::Error::InvalidFinalizer) => Err(Error::Finalizer(e.to_string())),
    }
}

async fn network_of(ctx: &Context, member: &NetworkMember) -> Result<Option<Network>, Error> {
    let nets: Api<Network> = Api::all(ctx.client.clone());
    Ok(nets.get_opt(&member.spec.network).await?)
}

async fn apply(member: &NetworkMember, ctx: &Context) -> Result<Action, Error> {
    let network = network_of(ctx, member).await?;
    let desired = desired_member(ctx.address, member, network.as_ref());
    let (outcome, action, failure) = match (&desired, &ctx.sink) {
        (Err(p), _) => (
            Err((p.reason(), p.to_string())),
            Action::requeue(RECHECK),
            None,
        ),
        (Ok(_), None) => (
            Err((
                "NoController",
                "no controller API configured (--controller-api); the member is not served".into(),
            )),
            Action::requeue(RESYNC),
            None,
        ),
        (Ok(d), Some(sink)) => match write(ctx, sink.as_ref(), member, d).await {
            Ok(ips) => {
                let again = if d.body.authorized && ips.is_empty() {
                    PENDING_IPS
                } else {
                    RESYNC
                };
                (Ok(ips), Action::requeue(again), None)
            }
            Err(e) => (
                Err(("ControllerError", e.to_string())),
                Action::requeue(RECHECK),
                Some(e),
            ),
        },
    };
    let status = desired_status(member, outcome, Timestamp::now());
    warn_if_new(ctx, member, &status).await?;
    if member.status.as_ref() != Some(&status) {
        let api: Api<NetworkMember> = Api::all(ctx.client.clone());
        let patch = serde_json::json!({
            "apiVersion": NetworkMember::api_version(&()),
            "kind": NetworkMember::kind(&()),
            "status": status,
        });
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        api.patch_status(&member.name_any(), &pp, &Patch::Apply(&patch))
            .await?;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(action),
    }
}

/// Writes the network (so the member has one to belong to) and then the member; one the
/// controller lacks, without static IPs in the spec, gets the IPs recorded in `member`'s
/// status (bad ones are ignored with a Warning Event). Returns the member's IP assignments
/// as the controller stored them.
async fn write(
    ctx: &Context,
    sink: &dyn ControllerSink,
    member: &NetworkMember,
    d: &DesiredMember,
) -> Result<Vec<String>, Error> {
    sink.put_network(d.nwid, &d.network).await?;
    let mut body = serde_json::to_value(&d.body).unwrap_or(Value::Null);
    let recorded = member
        .status
        .as_ref()
        .map(|s| s.assigned_ips.as_slice())
        .unwrap_or_default();
    if d.body.ip_assignments.is_none()
        && !recorded.is_empty()
        && sink.get_member(d.nwid, &d.address).await?.is_none()
    {
        match parse_ips(recorded.iter().map(String::as_str)) {
            Ok(ips) => {
                tracing::info!(member = %d.address, nwid = %format!("{:016x}", d.nwid), ?ips, "restoring the member's IPs");
                body["ipAssignments"] = serde_json::json!(ips);
            }
            Err(e) => {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: "InvalidAssignedIPs".into(),
                    note: Some(format!(
                        "status.assignedIPs: {e}; the controller lacks the member and it gets new IPs"
                    )),
                    action: "SyncMember".into(),
                    secondary: None,
                };
                ctx.recorder.publish(&ev, &member.object_ref(&())).await?;
            }
        }
    }
    let stored = sink.put_member(d.nwid, &d.address, &body).await?;
    Ok(assigned(&stored))
}

/// Publishes a Warning Event when `status` has a `Ready=False` problem the stored status did
/// not have (the same reason and message are not repeated).
async fn warn_if_new(
    ctx: &Context,
    member: &NetworkMember,
    status: &NetworkMemberStatus,
) -> Result<(), Error> {
    let problem = |s: Option<&NetworkMemberStatus>| {
        s?.conditions
            .iter()
            .find(|c| c.type_ == READY && c.status == "False")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    let Some((reason, msg)) = problem(Some(status)) else {
        return Ok(());
    };
    if problem(member.status.as_ref()) == Some((reason.clone(), msg.clone())) {
        return Ok(());
    }
    let ev = Event {
        type_: EventType::Warning,
        reason,
        note: Some(msg.chars().take(1000).collect()),
        action: "SyncMember".into(),
        secondary: None,
    };
    ctx.recorder.publish(&ev, &member.object_ref(&())).await?;
    Ok(())
}

async fn cleanup(member: &NetworkMember, ctx: &Context) -> Result<Action, Error> {
    let network = network_of(ctx, member).await?;
    // Without a network (or an ID) there is nothing in the controller to remove.
    let nwid = network
        .as_ref()
        .and_then(|n| network_id(ctx.address, n).ok());
    if let (Some(nwid), Some(sink)) = (nwid, &ctx.sink) {
        sink.delete_member(nwid, &member.spec.address).await?;
        let ev = Event {
            type_: EventType::Normal,
            reason: "Deauthorized".into(),
            note: Some(format!(
                "member {} removed from network {nwid:016x}",
                member.spec.address
            )),
            action: "DeleteMember".into(),
            secondary: None,
        };
        ctx.recorder.publish(&ev, &member.object_ref(&())).await?;
    }
    Ok(Action::await_change())
}

/// The retry after a failed reconcile: exponential backoff per NetworkMember.
pub fn error_policy(member: Arc<NetworkMember>, err: &Error, ctx: Arc<Context>) -> Action {
    let name = member.name_any();
    let mut failures = lock(&ctx.failures);
    let n = failures.entry(name.clone()).or_insert(0);
    *n = n.saturating_add(1);
    let delay = super::network::backoff(*n);
    tracing::warn!(member = %name, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> ControllerAddress {
        "89e92ceee5".parse().unwrap()
    }

    fn net() -> Network {
        let mut n = Network::new(
            "lab",
            serde_json::from_value(serde_json::json!({
                "number": 1,
                "tags": [{"name": "department", "id": 1000, "enum": {"eng": 100, "ops": 200}}],
                "capabilities": [{"name": "superuser", "id": 7, "rules": "accept;"}],
            }))
            .unwrap(),
        );
        n.metadata.uid = Some("u".into());
        n
    }

    fn member(spec: Value) -> NetworkMember {
        let mut m = NetworkMember::new("laptop", serde_json::from_value(spec).unwrap());
        m.metadata.generation = Some(1);
        m
    }

    #[test]
    fn member_json_from_spec_and_network() {
        let m = member(serde_json::json!({
            "network": "lab", "address": "0123456789", "authorized": true,
            "ipAssignments": ["198.19.0.9", "198.19.0.2", "198.19.0.9"],
            "tags": {"department": "ops"}, "capabilities": ["superuser"], "name": "Ada"
        }));
        let d = desired_member(addr(), &m, Some(&net())).unwrap();
        assert_eq!(d.nwid, 0x89e9_2cee_e500_0001);
        assert_eq!(d.address, "0123456789");
        let v = serde_json::to_value(&d.body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "authorized": true, "activeBridge": false,
                "ipAssignments": ["198.19.0.2", "198.19.0.9"], "name": "Ada",
                "tags": [[1000, 200]], "capabilities": [7]
            })
        );
        // The keys are the vl2 controller's member fields.
        let mut full = v.clone();
        full["id"] = "0123456789".into();
        full["address"] = "0123456789".into();
        full["nwid"] = "89e92ceee5000001".into();
        let vm: flatwire_vl2::controller::Member = serde_json::from_value(full).unwrap();
        assert!(vm.authorized && !vm.active_bridge);
        assert_eq!(vm.tags, vec![(1000, 200)]);
        assert_eq!(vm.capabilities, vec![7]);
        assert_eq!(vm.ip_assignments, vec!["198.19.0.2", "198.19.0.9"]);
        assert_eq!(vm.name.as_deref(), Some("Ada"));
        assert!(vm.extra.is_empty(), "{:?}", vm.extra);

        // Numbers are accepted as tag values.
        let m = member(serde_json::json!({
            "network": "lab", "address": "0123456789", "tags": {"department": "5"}
        }));
        let d = desired_member(addr(), &m, Some(&net())).unwrap();
        assert_eq!(d.body.tags, vec![(1000, 5)]);
        assert!(!d.body.authorized);
    }

    #[test]
    fn problems_are_named() {
        let p = |spec: Value, n: Option<&Network>| {
            desired_member(addr(), &member(spec), n).unwrap_err()
        };
        let base = |extra: Value| {
            let mut v = serde_json::json!({"network": "lab", "address": "0123456789"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        let e = p(base(serde_json::json!({})), None);
        assert_eq!(e.reason(), "NetworkNotFound");
        let e = p(
            base(serde_json::json!({"tags": {"team": "a"}})),
            Some(&net()),
        );
        assert_eq!(
            (e.reason(), e.to_string().contains("\"team\"")),
            ("UnknownTag", true)
        );
        let e = p(
            base(serde_json::json!({"tags": {"department": "hr"}})),
            Some(&net()),
        );
        assert_eq!(e.reason(), "InvalidTagValue");
        let e = p(
            base(serde_json::json!({"capabilities": ["root"]})),
            Some(&net()),
        );
        assert_eq!(e.reason(), "UnknownCapability");
        let mut other = net();
        other.spec.number = None;
        other.spec.id = Some("1111111111000001".into());
        let e = p(base(serde_json::json!({})), Some(&other));
        assert_eq!(e.reason(), "InvalidNetwork");
        let e = p(
            serde_json::json!({"network": "lab", "address": "89e92ceee5"}),
            Some(&net()),
        );
        assert_eq!(e.reason(), "ControllerAddress");
        let mut broken = net();
        broken.spec.rules = Some("drop bogus;".into());
        let e = p(base(serde_json::json!({})), Some(&broken));
        assert_eq!(e.reason(), "NetworkNotReady");
        assert!(e.to_string().contains("line 1 column"), "{e}");
    }

    #[test]
    fn status_conditions_follow_the_outcome() {
        let mut m = member(serde_json::json!({
            "network": "lab", "address": "0123456789", "authorized": true
        }));
        let now = Timestamp::now();
        let s = desired_status(&m, Ok(vec!["198.19.0.2".into()]), now);
        let get = |s: &NetworkMemberStatus, t: &str| {
            let c = s.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
            (c.status, c.reason)
        };
        assert_eq!(get(&s, READY), ("True".into(), "Synced".into()));
        assert_eq!(get(&s, AUTHORIZED), ("True".into(), "Authorized".into()));
        assert_eq!(s.assigned_ips, vec!["198.19.0.2"]);
        m.status = Some(s.clone());
        let later = now + k8s_openapi::jiff::SignedDuration::from_secs(60);
        assert_eq!(desired_status(&m, Ok(vec!["198.19.0.2".into()]), later), s);
        let bad = desired_status(&m, Err(("UnknownTag", "tag x".into())), later);
        assert_eq!(get(&bad, READY), ("False".into(), "UnknownTag".into()));
        assert_eq!(get(&bad, AUTHORIZED), ("False".into(), "NotServed".into()));
        assert_eq!(bad.assigned_ips, vec!["198.19.0.2"], "kept from before");
    }
}
