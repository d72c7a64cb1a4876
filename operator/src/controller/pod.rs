//! Pods as network members: the controller admits a pod's member on a node's vouch only when
//! a pod binding (a flatwire controller extension, see `flatwire_vl2::controller::PodBinding`)
//! places the pod on that node, and gives the member the binding's tags.
//!
//! [`desired_binding`] is the pure core: from a Network, a Pod, its namespace's labels and the
//! nodes' hosts it computes the binding `{namespace, name, host, tags}` (tags from the pod's
//! labels per the Network's tag definitions), or none when the pod does not join. [`run`]
//! keeps the controller equal to that for every Network and Pod: it watches Pods, Nodes,
//! Namespaces and Networks (reflectors), and after every change diffs the desired host
//! members ([`super::node`]) and bindings against what the controller has, writing and
//! deleting only the difference. A deleted (or terminating, unscheduled or no longer
//! selected) pod's binding is deleted at the next pass, well within 2 s; the controller then
//! removes the member the binding authorized and revokes it. No finalizer is needed: the
//! bindings the controller holds are listed when a network is first seen and every
//! [`RESYNC`], so bindings of pods deleted while the operator was down go too.
//!
//! Networks go the same way: the controller's networks are listed at the first pass, every
//! [`RESYNC`] and whenever a network the caches mapped is no longer mapped (its Network was
//! deleted, or its number changed), and one under this operator's controller address that no
//! Network maps to (checked against the API server itself, not only the caches) is emptied
//! by the paths above (its bindings deleted, revoking their pods' members; every member
//! deauthorized, revoked and deleted) and then deleted. So a Network deleted while no
//! operator ran leaves nothing in the controller once a leader runs again. Networks of other
//! controller addresses are never touched.
//!
//! The IPs the controller gives the bindings' and host members' members are saved on the
//! Pods and Nodes, and a binding or host member the controller lacks is created with the
//! saved ones (see [`super::ips`]), so a fresh controller after a failover gives every
//! member its old addresses.
//!
//! At the end of every pass the member counts of each Network's status are brought up to
//! date from what the pass knows (see [`super::counts`]); NetworkMembers are watched for
//! that too.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use kube::api::ListParams;
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::counts::{self, MemberCounts};
use super::ips::{
    ANNOTATION_PREFIX, annotate, annotation_key, annotation_value, assigned, parse_annotation,
};
use super::network::{desired_network, network_id};
use super::node::{NodeHost, host_annotation, host_member_name, parse_host_identity};
use super::{ControllerAddress, recorder};
use crate::crd::{Network, NetworkMember, NetworkSpec};
use crate::metrics::Metrics;
use crate::sink::{ControllerSink, SinkError};

/// How often the bindings in the controller are listed again, and everything re-checked.
pub const RESYNC: Duration = Duration::from_secs(300);
/// Changes arriving within this long of each other are handled in one pass.
const DEBOUNCE: Duration = Duration::from_millis(20);
/// The longest a pass waits for a stream of changes to pause.
const MAX_DEBOUNCE: Duration = Duration::from_millis(200);
/// The first retry delay after a failed pass; it doubles up to [`MAX_RETRY`].
const MIN_RETRY: Duration = Duration::from_millis(500);
/// The longest retry delay.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// How soon after a binding or host member is written the controller is asked for its IPs;
/// while some are still unassigned (the member has not asked for its config yet) the
/// interval doubles up to [`MAX_IP_POLL`].
const MIN_IP_POLL: Duration = Duration::from_millis(500);
/// The longest interval between two looks at IPs still unassigned.
const MAX_IP_POLL: Duration = Duration::from_secs(60);

/// A pod's binding as the controller should store it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBinding {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// The address of the host identity of the pod's node.
    pub host: String,
    /// `[id, value]` pairs, sorted by id.
    pub tags: Vec<(u64, u64)>,
}

impl DesiredBinding {
    /// The POST body.
    pub fn body(&self) -> Value {
        json!({"namespace": self.namespace, "name": self.name, "host": self.host, "tags": self.tags})
    }

    /// The same fields of a binding the controller returned.
    pub fn from_stored(v: &Value) -> Option<Self> {
        let mut tags: Vec<(u64, u64)> = serde_json::from_value(v.get("tags")?.clone()).ok()?;
        tags.sort_unstable();
        Some(Self {
            namespace: v.get("namespace")?.as_str()?.to_owned(),
            name: v.get("name")?.as_str()?.to_owned(),
            host: v.get("host")?.as_str()?.to_owned(),
            tags,
        })
    }
}

/// A pod label whose value names no value of its tag; the pod gets the tag's default.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TagProblem {
    /// The tag.
    pub tag: String,
    /// The label.
    pub label: String,
    /// The label's value.
    pub value: String,
    /// The value used instead (none: the tag is left out).
    pub default: Option<u32>,
}

impl std::fmt::Display for TagProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "label {}={:?} is neither one of tag {:?}'s enum names nor a 32-bit number; ",
            self.label, self.value, self.tag
        )?;
        match self.default {
            Some(d) => write!(f, "using the default {d}"),
            None => f.write_str("the tag has no default and is left out"),
        }
    }
}

/// The tags a pod with `labels` carries on a network with `spec`'s tag definitions: the
/// labelled value (an enum name or a number), else the default; an unknown value gets the
/// default and a [`TagProblem`].
pub fn pod_tags(
    spec: &NetworkSpec,
    labels: &BTreeMap<String, String>,
) -> (Vec<(u64, u64)>, Vec<TagProblem>) {
    let mut tags = Vec::new();
    let mut problems = Vec::new();
    for def in &spec.tags {
        let labelled = def
            .pod_label
            .as_ref()
            .and_then(|l| Some((l, labels.get(l)?)));
        let value = match labelled {
            Some((label, v)) => def.value_of(v).or_else(|| {
                problems.push(TagProblem {
                    tag: def.name.clone(),
                    label: label.clone(),
                    value: v.clone(),
                    default: def.default,
                });
                def.default
            }),
            None => def.default,
        };
        if let Some(v) = value {
            tags.push((u64::from(def.id), u64::from(v)));
        }
    }
    tags.sort_unstable();
    tags.dedup_by_key(|t| t.0);
    (tags, problems)
}

/// Whether `selector` (absent: `absent`) matches `labels`; an unparsable selector matches
/// nothing.
fn matches(
    selector: Option<&k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    labels: &BTreeMap<String, String>,
    absent: bool,
) -> bool {
    match selector {
        None => absent,
        Some(s) => Selector::try_from(s.clone()).is_ok_and(|s| s.matches(labels)),
    }
}

/// The binding `pod` should have on `net` (with the tag problems of its labels), or `None`
/// when it does not join: it is not scheduled on a node with a registered host, uses the
/// host's network, is terminating or finished, or `net`'s namespace and pod selectors
/// (namespace labels: `ns_labels`, `None` when the namespace is unknown) leave it out.
pub fn desired_binding(
    net: &Network,
    pod: &Pod,
    ns_labels: Option<&BTreeMap<String, String>>,
    hosts: &BTreeMap<String, NodeHost>,
) -> Option<(DesiredBinding, Vec<TagProblem>)> {
    let spec = pod.spec.as_ref()?;
    let host = hosts.get(spec.node_name.as_deref()?)?;
    let finished = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Succeeded" || p == "Failed");
    if spec.host_network == Some(true) || pod.metadata.deletion_timestamp.is_some() || finished {
        return None;
    }
    let ns_ok = match (&net.spec.namespace_selector, ns_labels) {
        (None, _) => true,
        (Some(s), Some(l)) => matches(Some(s), l, true),
        (Some(_), None) => false,
    };
    if !ns_ok || !matches(net.spec.pod_selector.as_ref(), pod.labels(), false) {
        return None;
    }
    let (tags, problems) = pod_tags(&net.spec, pod.labels());
    Some((
        DesiredBinding {
            namespace: pod.namespace()?,
            name: pod.metadata.name.clone()?,
            host: host.address.clone(),
            tags,
        },
        problems,
    ))
}

/// Everything the controller should hold, computed from the caches.
#[derive(Default)]
struct Desired {
    /// Network ID -> controller network object, for every usable Network.
    networks: BTreeMap<u64, Value>,
    /// Network IDs of Networks that exist but cannot be written now (rules do not
    /// compile, or pools overlap): their bindings and host members are left as they are.
    frozen: HashSet<u64>,
    /// (network, host address) -> (identity, member name).
    hosts: BTreeMap<(u64, String), (String, String)>,
    /// (network, pod uid) -> binding.
    bindings: BTreeMap<(u64, String), DesiredBinding>,
    /// Pods with label problems: (pod, network name, problem).
    problems: Vec<(Arc<Pod>, String, TagProblem)>,
    /// Nodes whose annotation does not parse: (node, message).
    bad_nodes: Vec<(Arc<Node>, String)>,
    /// (network, pod uid) of every binding -> the Pod and the IPs saved on it for that
    /// network (see [`super::ips`]).
    pods: BTreeMap<(u64, String), (Arc<Pod>, Vec<String>)>,
    /// (network, host address) of every host member -> the Node and its saved IPs.
    nodes: BTreeMap<(u64, String), (Arc<Node>, Vec<String>)>,
    /// Pods and Nodes whose saved IPs do not parse: (pod uid or node name, object, message).
    bad_ips: Vec<(String, BadIps, String)>,
}

/// An object with a bad IPs annotation.
enum BadIps {
    Pod(Arc<Pod>),
    Node(Arc<Node>),
}

/// The IPs saved on an object with `annotations` for network `nwid` (none: empty), or why
/// they cannot be used.
fn saved_ips(annotations: &BTreeMap<String, String>, nwid: u64) -> Result<Vec<String>, String> {
    let key = annotation_key(nwid);
    match annotations.get(&key) {
        None => Ok(Vec::new()),
        Some(v) => parse_annotation(v)
            .map_err(|e| format!("annotation {key}: {e}; the saved IPs are ignored")),
    }
}

/// The networks of the IPs annotations in `annotations`.
fn annotated_networks(annotations: &BTreeMap<String, String>) -> impl Iterator<Item = u64> + '_ {
    annotations.keys().filter_map(|k| {
        let hex = k.strip_prefix(ANNOTATION_PREFIX)?;
        (hex.len() == 16).then(|| u64::from_str_radix(hex, 16).ok())?
    })
}

/// The caches [`run`] reads.
struct Caches {
    pods: Store<Pod>,
    nodes: Store<Node>,
    namespaces: Store<Namespace>,
    networks: Store<Network>,
    members: Store<NetworkMember>,
}

/// What [`run`] remembers between passes.
struct PodSync {
    client: Client,
    address: ControllerAddress,
    sink: Arc<dyn ControllerSink>,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    /// Annotation value -> parsed host (the memory-hard check runs once per value).
    parsed: HashMap<String, Result<NodeHost, String>>,
    /// Controller networks as last written.
    networks: HashMap<u64, Value>,
    /// Host members as last written.
    hosts: HashMap<(u64, String), (String, String)>,
    /// Bindings as the controller holds them (listed, then kept up to date).
    bindings: HashMap<(u64, String), DesiredBinding>,
    /// Networks whose bindings were listed, and when.
    listed: HashMap<u64, Instant>,
    /// Events already published (pod uid or node name, and the message).
    warned: HashSet<(String, String)>,
    /// The IPs of the bindings' members as the controller reported them.
    ips: HashMap<(u64, String), Vec<String>>,
    /// The IPs of the host members as the controller reported them.
    host_ips: HashMap<(u64, String), Vec<String>>,
    /// The current interval between looks at unassigned IPs, and when the next is due.
    ip_poll: Duration,
    ip_poll_at: Instant,
    /// When the pass should run again for IPs still unassigned (none: nothing pending).
    poll_at: Option<Instant>,
    /// The networks the caches mapped at the last pass (usable or frozen).
    mapped: HashSet<u64>,
    /// When the controller's networks were last listed (none: due at the next pass).
    networks_listed: Option<Instant>,
    /// Controller networks under this address that no Network maps to: emptied, then
    /// deleted.
    orphans: BTreeSet<u64>,
    /// The member counts last written to each Network's status, by Network uid.
    counts: HashMap<String, MemberCounts>,
}

impl PodSync {
    fn desired(&mut self, c: &Caches) -> Desired {
        let mut d = Desired::default();
        let mut hosts = BTreeMap::new();
        let mut node_objs = HashMap::new();
        for node in c.nodes.state() {
            let Some(value) = host_annotation(&node) else {
                continue;
            };
            let parsed = self
                .parsed
                .entry(value.to_owned())
                .or_insert_with(|| parse_host_identity(value));
            match parsed {
                Ok(h) => {
                    hosts.insert(node.name_any(), h.clone());
                    node_objs.insert(node.name_any(), node.clone());
                }
                Err(e) => d.bad_nodes.push((node.clone(), e.clone())),
            }
        }
        let ns_labels: HashMap<String, BTreeMap<String, String>> = c
            .namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect();
        let pods = c.pods.state();
        for net in c.networks.state() {
            let Ok(nwid) = network_id(self.address, &net) else {
                continue;
            };
            let Ok(body) = desired_network(&net) else {
                d.frozen.insert(nwid);
                continue;
            };
            d.networks.insert(nwid, body);
            for (node, h) in &hosts {
                d.hosts.insert(
                    (nwid, h.address.clone()),
                    (h.identity.clone(), host_member_name(node)),
                );
                if let Some(obj) = node_objs.get(node) {
                    let saved = saved_ips(obj.annotations(), nwid).unwrap_or_else(|e| {
                        d.bad_ips.push((node.clone(), BadIps::Node(obj.clone()), e));
                        Vec::new()
                    });
                    d.nodes
                        .insert((nwid, h.address.clone()), (obj.clone(), saved));
                }
            }
            for pod in &pods {
                let labels = pod.namespace().and_then(|ns| ns_labels.get(&ns));
                let (Some(uid), Some((b, problems))) =
                    (pod.uid(), desired_binding(&net, pod, labels, &hosts))
                else {
                    continue;
                };
                let saved = saved_ips(pod.annotations(), nwid).unwrap_or_else(|e| {
                    d.bad_ips.push((uid.clone(), BadIps::Pod(pod.clone()), e));
                    Vec::new()
                });
                d.pods.insert((nwid, uid.clone()), (pod.clone(), saved));
                d.bindings.insert((nwid, uid), b);
                d.problems.extend(
                    problems
                        .into_iter()
                        .map(|p| (pod.clone(), net.name_any(), p)),
                );
            }
        }
        d
    }

    /// Publishes a Warning Event about `obj` once per message.
    async fn warn<K: Resource<DynamicType = ()>>(
        &mut self,
        key: String,
        obj: &K,
        reason: &str,
        msg: String,
    ) {
        if !self.warned.insert((key, msg.clone())) {
            return;
        }
        tracing::warn!(object = ?obj.meta().name, reason, "{msg}");
        let ev = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(msg.chars().take(1000).collect()),
            action: "BindPod".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&ev, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish an Event");
        }
    }

    /// Counts and logs a failed write; `false` to make the pass retry.
    fn failed(&self, what: &str, e: &SinkError) -> bool {
        self.metrics.pod_binding_errors.inc();
        tracing::warn!(error = %e, "{what}");
        false
    }

    /// Lists the bindings of `nwid` into [`Self::bindings`] and [`Self::ips`]; true when
    /// it worked.
    async fn list(&mut self, nwid: u64) -> bool {
        match self.sink.list_pods(nwid).await {
            Ok(list) => {
                self.bindings.retain(|(n, _), _| *n != nwid);
                self.ips.retain(|(n, _), _| *n != nwid);
                for (uid, b) in list.as_object().into_iter().flatten() {
                    if let Some(d) = DesiredBinding::from_stored(b) {
                        self.bindings.insert((nwid, uid.clone()), d);
                        self.ips.insert((nwid, uid.clone()), assigned(b));
                    }
                }
                self.listed.insert(nwid, Instant::now());
                true
            }
            Err(e) => self.failed("listing pod bindings", &e),
        }
    }

    /// Updates [`Self::orphans`]: lists the controller's networks when due (the first pass,
    /// every [`RESYNC`], or a network of the last pass's `mapped` gone from `mapped`) and
    /// keeps those under this address that `mapped` lacks and no Network in the API server
    /// (read now: the caches may lag) maps to. True when it worked; on a failure no network
    /// is an orphan until the next pass.
    async fn find_orphans(&mut self, mapped: HashSet<u64>) -> bool {
        let due = self.networks_listed.is_none_or(|t| t.elapsed() >= RESYNC)
            || !self.mapped.is_subset(&mapped);
        self.mapped = mapped;
        if due {
            match self.sink.list_networks().await {
                Ok(ids) => {
                    let ours = self.address.as_u64();
                    self.orphans = ids.into_iter().filter(|n| n >> 24 == ours).collect();
                    self.networks_listed = Some(Instant::now());
                }
                Err(e) => {
                    self.networks_listed = None;
                    self.orphans.clear();
                    return self.failed("listing the controller's networks", &e);
                }
            }
        }
        self.orphans.retain(|n| !self.mapped.contains(n));
        if self.orphans.is_empty() {
            return true;
        }
        match Api::<Network>::all(self.client.clone())
            .list(&ListParams::default())
            .await
        {
            Ok(list) => {
                let live: HashSet<u64> = list
                    .items
                    .iter()
                    .filter_map(|n| network_id(self.address, n).ok())
                    .collect();
                self.orphans.retain(|n| !live.contains(n));
                true
            }
            Err(e) => {
                self.metrics.pod_binding_errors.inc();
                tracing::warn!(error = %e, "listing Networks before deleting controller networks");
                self.networks_listed = None;
                self.orphans.clear();
                false
            }
        }
    }

    /// Writes the host member `key` (authorized, identity pinned, named); the first time
    /// this operator writes it, a member the controller lacks gets the IPs `saved` on its
    /// Node. True when it worked.
    async fn write_host(
        &mut self,
        key: &(u64, String),
        identity: &str,
        name: &str,
        saved: &[String],
    ) -> bool {
        let (nwid, addr) = (key.0, key.1.as_str());
        let restore = if saved.is_empty() || self.hosts.contains_key(key) {
            false
        } else {
            match self.sink.get_member(nwid, addr).await {
                Ok(m) => m.is_none(),
                Err(e) => return self.failed("reading a host member", &e),
            }
        };
        let ips = if restore { saved } else { &[] };
        match self
            .sink
            .put_host_member(nwid, addr, identity, name, ips)
            .await
        {
            Ok(stored) => {
                tracing::info!(nwid = %format!("{nwid:016x}"), host = %addr, %name, restored = ?ips, "host member authorized");
                self.host_ips.insert(key.clone(), assigned(&stored));
                self.hosts
                    .insert(key.clone(), (identity.to_owned(), name.to_owned()));
                true
            }
            Err(e) => self.failed("writing a host member", &e),
        }
    }

    /// Writes binding `b` of pod `pod` as `key`; a binding the controller lacks gets the IPs
    /// `saved` on the Pod (if the controller refuses them, the pod is bound without them and
    /// a Warning Event says so). True when it worked.
    async fn write_binding(
        &mut self,
        key: &(u64, String),
        b: &DesiredBinding,
        pod: Option<&Arc<Pod>>,
        saved: &[String],
    ) -> bool {
        let (nwid, uid) = (key.0, key.1.as_str());
        let saved = if self.bindings.contains_key(key) {
            &[]
        } else {
            saved
        };
        let mut body = b.body();
        if !saved.is_empty() {
            body["ipAssignments"] = json!(saved);
        }
        let mut res = self.sink.put_pod(nwid, uid, &body).await;
        if let (
            Err(SinkError::Status {
                status, body: why, ..
            }),
            Some(pod),
        ) = (&res, pod)
            && matches!(status, 400 | 409)
            && !saved.is_empty()
        {
            let msg = format!(
                "network {nwid:016x}: the controller refused the saved IPs {}: {why}; the pod gets new ones",
                saved.join(",")
            );
            self.warn(uid.to_owned(), &**pod, "IPsNotRestored", msg)
                .await;
            if let Some(o) = body.as_object_mut() {
                o.remove("ipAssignments");
            }
            res = self.sink.put_pod(nwid, uid, &body).await;
        }
        match res {
            Ok(stored) => {
                tracing::info!(nwid = %format!("{nwid:016x}"), pod = %format!("{}/{}", b.namespace, b.name), host = %b.host, tags = ?b.tags, restored = ?saved, "pod binding written");
                self.metrics.pod_bindings_written.inc();
                self.ips.insert(key.clone(), assigned(&stored));
                self.bindings.insert(key.clone(), b.clone());
                true
            }
            Err(e) => self.failed("writing a pod binding", &e),
        }
    }

    /// Asks the controller for the IPs not known yet (bindings listed again, host members
    /// read), at most once per [`Self::ip_poll`], and sets [`Self::poll_at`] while some are
    /// still unassigned. False when a request failed.
    async fn poll_ips(&mut self, d: &Desired, wrote: bool) -> bool {
        let unknown = |ips: Option<&Vec<String>>| ips.is_none_or(Vec::is_empty);
        let nets: BTreeSet<u64> = d
            .bindings
            .keys()
            .filter(|k| unknown(self.ips.get(*k)))
            .map(|k| k.0)
            .collect();
        let hosts: Vec<(u64, String)> = d
            .hosts
            .keys()
            .filter(|k| self.hosts.contains_key(*k) && unknown(self.host_ips.get(*k)))
            .cloned()
            .collect();
        let now = Instant::now();
        if wrote {
            self.ip_poll = MIN_IP_POLL;
            self.ip_poll_at = now + MIN_IP_POLL;
        }
        if nets.is_empty() && hosts.is_empty() {
            self.ip_poll = MIN_IP_POLL;
            self.poll_at = None;
            return true;
        }
        let mut ok = true;
        if self.ip_poll_at <= now {
            let before = self
                .ips
                .values()
                .chain(self.host_ips.values())
                .filter(|v| !v.is_empty())
                .count();
            for nwid in nets {
                ok &= self.list(nwid).await;
            }
            for key in hosts {
                match self.sink.get_member(key.0, &key.1).await {
                    Ok(Some(m)) => {
                        self.host_ips.insert(key, assigned(&m));
                    }
                    // Gone from the controller: written again at the next pass.
                    Ok(None) => {
                        self.hosts.remove(&key);
                    }
                    Err(e) => ok = self.failed("reading a host member", &e),
                }
            }
            let after = self
                .ips
                .values()
                .chain(self.host_ips.values())
                .filter(|v| !v.is_empty())
                .count();
            self.ip_poll = if after > before {
                MIN_IP_POLL
            } else {
                self.ip_poll.saturating_mul(2).min(MAX_IP_POLL)
            };
            self.ip_poll_at = Instant::now() + self.ip_poll;
        }
        self.poll_at = Some(self.ip_poll_at);
        ok
    }

    /// Saves the controller's IPs on the Pods and Nodes ([`super::ips`]): writes the
    /// annotation where the controller's (non-empty) IPs differ, removes it where the
    /// object has no binding or host member on that network any more. False when a patch
    /// failed.
    async fn save_ips(&mut self, c: &Caches, d: &Desired) -> bool {
        let mut ok = true;
        for (key, (pod, _)) in &d.pods {
            let want = self.ips.get(key).and_then(|ips| annotation_value(ips));
            if want.is_some() {
                ok &= self.annotate_pod(pod, key.0, want.as_deref()).await;
            }
        }
        for (key, (node, _)) in &d.nodes {
            let want = self.host_ips.get(key).and_then(|ips| annotation_value(ips));
            if want.is_some() {
                ok &= self.annotate_node(node, key.0, want.as_deref()).await;
            }
        }
        // Annotations of networks the object no longer belongs to (their IPs went back to
        // the pool); only for networks whose bindings are known.
        let known = |nwid: &u64| d.networks.contains_key(nwid) && self.listed.contains_key(nwid);
        for pod in c.pods.state() {
            let Some(uid) = pod.uid() else { continue };
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let stale: Vec<u64> = annotated_networks(pod.annotations())
                .filter(|n| known(n) && !d.bindings.contains_key(&(*n, uid.clone())))
                .collect();
            for nwid in stale {
                ok &= self.annotate_pod(&pod, nwid, None).await;
            }
        }
        let hosted: HashSet<(u64, String)> = d
            .nodes
            .iter()
            .map(|((n, _), (node, _))| (*n, node.name_any()))
            .collect();
        for node in c.nodes.state() {
            let stale: Vec<u64> = annotated_networks(node.annotations())
                .filter(|n| d.networks.contains_key(n) && !hosted.contains(&(*n, node.name_any())))
                .collect();
            for nwid in stale {
                ok &= self.annotate_node(&node, nwid, None).await;
            }
        }
        ok
    }

    /// Sets (or with `None` removes) the IPs annotation of `pod` for `nwid` if it differs.
    async fn annotate_pod(&self, pod: &Pod, nwid: u64, want: Option<&str>) -> bool {
        let key = annotation_key(nwid);
        if pod.annotations().get(&key).map(String::as_str) == want {
            return true;
        }
        let (Some(ns), Some(name)) = (pod.namespace(), pod.metadata.name.as_deref()) else {
            return true;
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &ns);
        self.patched("a Pod", annotate(&api, name, &key, want).await)
    }

    /// Sets (or with `None` removes) the IPs annotation of `node` for `nwid` if it differs.
    async fn annotate_node(&self, node: &Node, nwid: u64, want: Option<&str>) -> bool {
        let key = annotation_key(nwid);
        if node.annotations().get(&key).map(String::as_str) == want {
            return true;
        }
        let api: Api<Node> = Api::all(self.client.clone());
        self.patched("a Node", annotate(&api, &node.name_any(), &key, want).await)
    }

    /// Logs a failed annotation patch (an object deleted meanwhile is no failure).
    fn patched(&self, what: &str, res: Result<(), kube::Error>) -> bool {
        match res {
            Ok(()) => true,
            Err(kube::Error::Api(e)) if e.code == 404 => true,
            Err(e) => {
                self.metrics.pod_binding_errors.inc();
                tracing::warn!(error = %e, "saving the IPs on {what}");
                false
            }
        }
    }

    /// Writes the member counts ([`counts::member_counts`]) of every Network whose bindings
    /// are known into its status, where they differ from what the status shows and from
    /// what was last written. False when a patch failed.
    async fn write_counts(&mut self, c: &Caches) -> bool {
        let mut pods: HashMap<u64, usize> = HashMap::new();
        for (nwid, _) in self.bindings.keys() {
            *pods.entry(*nwid).or_default() += 1;
        }
        let mut hosts: HashMap<u64, usize> = HashMap::new();
        for (nwid, _) in self.hosts.keys() {
            *hosts.entry(*nwid).or_default() += 1;
        }
        let members = c.members.state();
        let networks = c.networks.state();
        self.counts
            .retain(|uid, _| networks.iter().any(|n| n.uid().as_ref() == Some(uid)));
        let mut ok = true;
        for net in &networks {
            let (Ok(nwid), Some(uid)) = (network_id(self.address, net), net.uid()) else {
                continue;
            };
            if !self.listed.contains_key(&nwid) {
                continue;
            }
            let name = net.name_any();
            let want = counts::member_counts(
                &name,
                pods.get(&nwid).copied().unwrap_or(0),
                hosts.get(&nwid).copied().unwrap_or(0),
                members.iter().map(|m| &**m),
            );
            if MemberCounts::shown(net) == Some(want) || self.counts.get(&uid) == Some(&want) {
                continue;
            }
            match counts::apply(&self.client, &name, want).await {
                Ok(()) => {
                    tracing::debug!(network = %name, ?want, "member counts written");
                    self.counts.insert(uid, want);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => {
                    self.metrics.pod_binding_errors.inc();
                    tracing::warn!(network = %name, error = %e, "writing a Network's member counts");
                    ok = false;
                }
            }
        }
        ok
    }

    /// One pass: writes what differs from the desired state. True when every write worked.
    async fn pass(&mut self, c: &Caches) -> bool {
        let d = self.desired(c);
        // Forget what was said about objects that are gone.
        let nodes = c.nodes.state();
        let live: HashSet<String> = c
            .pods
            .state()
            .iter()
            .filter_map(|p| p.uid())
            .chain(nodes.iter().map(|n| n.name_any()))
            .collect();
        self.warned.retain(|(k, _)| live.contains(k));
        let annotations: HashSet<&str> = nodes.iter().filter_map(|n| host_annotation(n)).collect();
        self.parsed.retain(|v, _| annotations.contains(v.as_str()));
        let mut ok = true;
        for (node, msg) in &d.bad_nodes {
            self.warn(node.name_any(), &**node, "InvalidHostIdentity", msg.clone())
                .await;
        }
        for (pod, net, p) in &d.problems {
            let key = pod.uid().unwrap_or_default();
            let msg = format!("Network {net}: {p}");
            self.warn(key, &**pod, "InvalidTagValue", msg).await;
        }
        for (key, obj, msg) in &d.bad_ips {
            match obj {
                BadIps::Pod(p) => {
                    self.warn(key.clone(), &**p, "InvalidIPAnnotation", msg.clone())
                        .await
                }
                BadIps::Node(n) => {
                    self.warn(key.clone(), &**n, "InvalidIPAnnotation", msg.clone())
                        .await
                }
            }
        }
        // Networks first (members and bindings need them), then their bindings as listed.
        for (nwid, body) in &d.networks {
            if self.networks.get(nwid) != Some(body) {
                match self.sink.put_network(*nwid, body).await {
                    Ok(_) => {
                        self.networks.insert(*nwid, body.clone());
                    }
                    Err(e) => ok = self.failed("writing a network", &e),
                }
            }
            let fresh = self.listed.get(nwid).is_some_and(|t| t.elapsed() < RESYNC);
            if !fresh {
                ok &= self.list(*nwid).await;
            }
        }
        let mut wrote = false;
        for (key, (identity, name)) in &d.hosts {
            if self.hosts.get(key) == Some(&(identity.clone(), name.clone())) {
                continue;
            }
            let saved = d.nodes.get(key).map_or(&[][..], |(_, s)| s);
            let done = self.write_host(key, identity, name, saved).await;
            (ok, wrote) = (ok && done, wrote || done);
        }
        for (key, b) in &d.bindings {
            if self.bindings.get(key) == Some(b) {
                continue;
            }
            let (pod, saved) = d
                .pods
                .get(key)
                .map_or((None, &[][..]), |(p, s)| (Some(p), &s[..]));
            let done = self.write_binding(key, b, pod, saved).await;
            (ok, wrote) = (ok && done, wrote || done);
        }
        // Networks no Network maps to: their bindings join the stale ones, their members
        // the gone host members, and once those are deleted, so is the network.
        let mapped = d.networks.keys().chain(&d.frozen).copied().collect();
        ok &= self.find_orphans(mapped).await;
        let orphans: Vec<u64> = self.orphans.iter().copied().collect();
        let mut blocked = HashSet::new();
        for &nwid in &orphans {
            if !self.list(nwid).await {
                ok = false;
                blocked.insert(nwid);
            }
        }
        let stale: Vec<(u64, String)> = self
            .bindings
            .keys()
            .filter(|k| !d.frozen.contains(&k.0) && !d.bindings.contains_key(*k))
            .cloned()
            .collect();
        for (nwid, uid) in stale {
            match self.sink.delete_pod(nwid, &uid).await {
                Ok(()) => {
                    tracing::info!(nwid = %format!("{nwid:016x}"), %uid, "pod binding deleted");
                    self.metrics.pod_bindings_deleted.inc();
                    self.ips.remove(&(nwid, uid.clone()));
                    self.bindings.remove(&(nwid, uid));
                }
                Err(e) => {
                    blocked.insert(nwid);
                    ok = self.failed("deleting a pod binding", &e);
                }
            }
        }
        let mut gone: BTreeSet<(u64, String)> = self
            .hosts
            .keys()
            .filter(|k| !d.frozen.contains(&k.0) && !d.hosts.contains_key(*k))
            .cloned()
            .collect();
        for &nwid in &orphans {
            match self.sink.list_members(nwid).await {
                Ok(members) => gone.extend(members.into_iter().map(|a| (nwid, a))),
                Err(e) => {
                    blocked.insert(nwid);
                    ok = self.failed("listing the members of a network to delete", &e);
                }
            }
        }
        for (nwid, addr) in gone {
            match self.sink.delete_member(nwid, &addr).await {
                Ok(()) => {
                    tracing::info!(nwid = %format!("{nwid:016x}"), member = %addr, "member removed");
                    self.host_ips.remove(&(nwid, addr.clone()));
                    self.hosts.remove(&(nwid, addr));
                }
                Err(e) => {
                    blocked.insert(nwid);
                    ok = self.failed("removing a member", &e);
                }
            }
        }
        for nwid in orphans.into_iter().filter(|n| !blocked.contains(n)) {
            match self.sink.delete_network(nwid).await {
                Ok(()) => {
                    tracing::info!(nwid = %format!("{nwid:016x}"), "network deleted: no Network maps to it");
                    self.metrics.networks_deleted.inc();
                    self.orphans.remove(&nwid);
                }
                Err(e) => ok = self.failed("deleting a network", &e),
            }
        }
        self.networks.retain(|n, _| d.networks.contains_key(n));
        self.listed.retain(|n, _| d.networks.contains_key(n));
        ok &= self.poll_ips(&d, wrote).await;
        ok &= self.save_ips(c, &d).await;
        ok &= self.write_counts(c).await;
        self.metrics
            .pod_bindings
            .set(i64::try_from(self.bindings.len()).unwrap_or(i64::MAX));
        ok
    }
}

/// Keeps host members and pod bindings in the controller behind `sink` equal to what the
/// API server says (see the module docs) until `shutdown` completes. Watch errors are
/// retried with backoff; a failed write makes the pass run again (0.5 s doubling to 30 s).
pub async fn run(
    client: Client,
    address: ControllerAddress,
    sink: Arc<dyn ControllerSink>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let wc = watcher::Config::default().any_semantic();
    let (pods, pods_w) = reflector::store::<Pod>();
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (namespaces, ns_w) = reflector::store::<Namespace>();
    let (networks, nets_w) = reflector::store::<Network>();
    let (members, members_w) = reflector::store::<NetworkMember>();
    let changed = |r: Result<(), watcher::Error>| r.map_err(|e| e.to_string());
    let events = watcher(Api::<Pod>::all(client.clone()), wc.clone())
        .default_backoff()
        .modify(|p: &mut Pod| p.managed_fields_mut().clear())
        .reflect(pods_w)
        .map(|r| changed(r.map(|_| ())))
        .merge(
            watcher(Api::<Node>::all(client.clone()), wc.clone())
                .default_backoff()
                .reflect(nodes_w)
                .map(|r| changed(r.map(|_| ()))),
        )
        .merge(
            watcher(Api::<Namespace>::all(client.clone()), wc.clone())
                .default_backoff()
                .reflect(ns_w)
                .map(|r| changed(r.map(|_| ()))),
        )
        .merge(
            watcher(Api::<Network>::all(client.clone()), wc.clone())
                .default_backoff()
                .reflect(nets_w)
                .map(|r| changed(r.map(|_| ()))),
        )
        .merge(
            watcher(Api::<NetworkMember>::all(client.clone()), wc)
                .default_backoff()
                .modify(|m: &mut NetworkMember| m.managed_fields_mut().clear())
                .reflect(members_w)
                .map(|r| changed(r.map(|_| ()))),
        );
    let mut events = Box::pin(events);
    let caches = Caches {
        pods,
        nodes,
        namespaces,
        networks,
        members,
    };
    let mut sync = PodSync {
        client: client.clone(),
        address,
        sink,
        metrics,
        recorder: recorder(&client),
        parsed: HashMap::new(),
        networks: HashMap::new(),
        hosts: HashMap::new(),
        bindings: HashMap::new(),
        listed: HashMap::new(),
        warned: HashSet::new(),
        ips: HashMap::new(),
        host_ips: HashMap::new(),
        ip_poll: MIN_IP_POLL,
        ip_poll_at: Instant::now(),
        poll_at: None,
        mapped: HashSet::new(),
        networks_listed: None,
        orphans: BTreeSet::new(),
        counts: HashMap::new(),
    };
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failures = 0u32;
    let mut wake = Instant::now() + RESYNC;
    let mut ready = false;
    tracing::info!("pod binding controller running");
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            item = events.next() => match item {
                None => break,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pod binding watch");
                    continue;
                }
                Some(Ok(())) => {}
            },
            () = tokio::time::sleep_until(wake) => {}
        }
        // Whatever else arrives right away is part of the same change (a steady stream of
        // changes still gets a pass every MAX_DEBOUNCE).
        let until = Instant::now() + MAX_DEBOUNCE;
        while Instant::now() < until
            && let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, events.next()).await
        {}
        if !ready {
            let all = async {
                let _ = caches.pods.wait_until_ready().await;
                let _ = caches.nodes.wait_until_ready().await;
                let _ = caches.namespaces.wait_until_ready().await;
                let _ = caches.networks.wait_until_ready().await;
                let _ = caches.members.wait_until_ready().await;
            };
            ready = tokio::time::timeout(Duration::ZERO, all).await.is_ok();
            if !ready {
                continue;
            }
        }
        let ok = sync.pass(&caches).await;
        sync.metrics.reconciled("pod", ok);
        failures = if ok { 0 } else { failures.saturating_add(1) };
        wake = Instant::now()
            + if ok {
                RESYNC
            } else {
                MIN_RETRY
                    .saturating_mul(1 << failures.saturating_sub(1).min(6))
                    .min(MAX_RETRY)
            };
        if let Some(t) = sync.poll_at {
            wake = wake.min(t);
        }
    }
    tracing::info!("pod binding controller stopped");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(spec: Value) -> Network {
        Network::new("lab", serde_json::from_value(spec).unwrap())
    }

    fn pod(ns: &str, name: &str, node: Option<&str>, labels: Value) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"namespace": ns, "name": name, "uid": format!("uid-{name}"), "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c"}]},
        }))
        .unwrap()
    }

    fn hosts() -> BTreeMap<String, NodeHost> {
        BTreeMap::from([(
            "n1".to_owned(),
            NodeHost {
                address: "0123456789".into(),
                identity: "x".into(),
            },
        )])
    }

    fn tagged() -> Network {
        net(json!({
            "number": 1,
            "podSelector": {"matchLabels": {"net": "lab"}},
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "In", "values": ["a", "b"]}]},
            "tags": [
                {"name": "role", "id": 10, "enum": {"web": 1, "db": 2}, "podLabel": "role", "default": 1},
                {"name": "tier", "id": 20, "podLabel": "tier"},
                {"name": "fixed", "id": 30, "default": 9},
            ],
        }))
    }

    #[test]
    fn bindings_follow_labels_selectors_and_scheduling() {
        let n = tagged();
        let ns = BTreeMap::from([("team".to_owned(), "a".to_owned())]);
        let p = pod(
            "default",
            "web",
            Some("n1"),
            json!({"net": "lab", "role": "db", "tier": "7"}),
        );
        let (b, problems) = desired_binding(&n, &p, Some(&ns), &hosts()).unwrap();
        assert_eq!(
            b,
            DesiredBinding {
                namespace: "default".into(),
                name: "web".into(),
                host: "0123456789".into(),
                tags: vec![(10, 2), (20, 7), (30, 9)],
            }
        );
        assert!(problems.is_empty());
        assert_eq!(
            DesiredBinding::from_stored(&b.body()).as_ref(),
            Some(&b),
            "round trip"
        );
        // Absent labels: defaults; a tag without default is left out.
        let p = pod("default", "web", Some("n1"), json!({"net": "lab"}));
        let (b, _) = desired_binding(&n, &p, Some(&ns), &hosts()).unwrap();
        assert_eq!(b.tags, vec![(10, 1), (30, 9)]);
        // Unknown enum value: the default and a problem naming label and tag.
        let p = pod(
            "default",
            "web",
            Some("n1"),
            json!({"net": "lab", "role": "cache"}),
        );
        let (b, problems) = desired_binding(&n, &p, Some(&ns), &hosts()).unwrap();
        assert_eq!(b.tags, vec![(10, 1), (30, 9)]);
        assert_eq!(problems.len(), 1);
        let msg = problems[0].to_string();
        assert!(
            msg.contains("role=\"cache\"") && msg.contains("default 1"),
            "{msg}"
        );

        let none = |p: &Pod, ns: Option<&BTreeMap<String, String>>| {
            desired_binding(&n, p, ns, &hosts()).is_none()
        };
        let other_ns = BTreeMap::from([("team".to_owned(), "c".to_owned())]);
        let selected = json!({"net": "lab"});
        assert!(none(
            &pod("default", "web", None, selected.clone()),
            Some(&ns)
        ));
        assert!(none(
            &pod("default", "web", Some("n2"), selected.clone()),
            Some(&ns)
        ));
        assert!(none(
            &pod("default", "web", Some("n1"), json!({"net": "x"})),
            Some(&ns)
        ));
        assert!(none(
            &pod("default", "web", Some("n1"), selected.clone()),
            Some(&other_ns)
        ));
        assert!(none(
            &pod("default", "web", Some("n1"), selected.clone()),
            None
        ));
        let mut gone = pod("default", "web", Some("n1"), selected.clone());
        gone.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::now(),
            ));
        assert!(none(&gone, Some(&ns)));
        let mut host_net = pod("default", "web", Some("n1"), selected);
        host_net.spec.as_mut().unwrap().host_network = Some(true);
        assert!(none(&host_net, Some(&ns)));
        // Without a pod selector no pod joins; `{}` selects every pod.
        let p = pod("default", "web", Some("n1"), json!({}));
        assert!(desired_binding(&net(json!({})), &p, None, &hosts()).is_none());
        assert!(desired_binding(&net(json!({"podSelector": {}})), &p, None, &hosts()).is_some());
    }
}
