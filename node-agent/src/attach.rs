//! Pod attachments: every attached pod is a VL2 member with its own identity, on a TAP the
//! agent holds inside the pod's network namespace.
//!
//! [`Attachments::attach`] takes an identity from the [`IdentityPool`], creates the TAP right in
//! the namespace under the requested interface name (MAC [`Mac::from_address`]; a TAP is born
//! in the namespace of the thread that makes it, so there is no host-side name and no move),
//! adds the member to the data plane with a [`Vouch`] signed by the host identity (pod
//! `namespace/name/uid`, else the container id), waits (bounded) for the controller's config
//! (woken by [`networks::watch_member`], no polling), then sets the MTU, addresses and routes in
//! the namespace while the record is written. The namespace is entered twice: once to create
//! the TAP and open its multicast memberships, once to configure it. Attaches of different
//! keys run concurrently; calls for one key are serialized.
//!
//! Primary mode makes the host's own member of the network the pods' gateway: a default route
//! per address family via the host member's address. The first primary network claims the host
//! TAP name [`PRIMARY_TAP`] (`flatwire0`; the host member is rejoined once to take it, see
//! [`networks::claim_primary`]; after a restart the agent claims it from the records before the
//! data plane starts, see [`recorded_gateways`]); while a network has primary attachments,
//! forwarding is on, forwarded traffic through the TAP is accepted and pod traffic leaving the
//! network is masqueraded behind the host (see the `gateway` module); the rules go with the
//! network's last primary attachment. When the host has not joined the network there is no
//! gateway: the pod is attached as secondary, and the log says so. Secondary mode installs only
//! the network's routes.
//!
//! Any failure undoes everything (the member leaves the data plane, which closes the TAP and so
//! destroys it; the identity is discarded and so is its standby node in the data plane; rules
//! installed for it alone are removed).
//!
//! Detach (and GarbageCollect, and the undoing of a failed attach) removes the member through
//! [`NodeHandle::remove_member`], which first releases it at its controller: the member asks
//! the controller to delete its record, so its IPs return to the pool even where no operator
//! deletes members (see [Release](flatwire_vl2::vouch#release)). That waits for the
//! controller's answer, a round trip, and at most
//! [`RELEASE_TIMEOUT_MS`](flatwire_vl2::vouch::RELEASE_TIMEOUT_MS) when it does not
//! come (the member's record then stays on the controller, with its IPs). The `detached` log
//! line gives `removed_ms` (release and TAP removal) and `took_ms`.
//!
//! Each attachment is a file `HOME/attachments/<member address>.json` (`0600`, written
//! atomically): the member's secret identity and the `flatwire.agent.v1.Attachment` message
//! as hex-encoded protobuf (the versioned API type, so a newer agent reads an older record).
//! Records are written by one thread in batches ([`StateDir::commit`]: the files of a batch
//! synced together, then one directory sync; the identity pool's removals are synced first), and
//! Attach answers only once its record is on disk. [`Attachments::restore`] runs at start: for
//! each record whose namespace still exists it recreates the TAP (which died with the old
//! process) with the same name, MAC, MTU, addresses and routes and rejoins with the same
//! identity; records of vanished namespaces (or that cannot be restored) are removed, and their
//! members released at their controllers in the background (added without an interface and
//! removed at once), since their pods' DEL will find nothing to detach.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_api::v1;
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::member::Status;
use flatwire_vl2::netconf::DEFAULT_MTU;
use flatwire_vl2::vouch::Vouch;
use flatwire_vl2::{Mac, NetworkId};
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::dataplane::{NewMember, NodeHandle};
use crate::mcast::Memberships;
use crate::networks::{self, MemberWatch, PRIMARY_TAP, link_state};
use crate::pool::IdentityPool;
use crate::shaping::{self, Bandwidth, ShapingError};
use crate::state::{Change, Sensitivity, StateDir};
use crate::tap::{self, IpPrefix, LinkRoute, LinkState, Tap, TapConfig};

mod gateway;

pub use gateway::{CHAIN as NAT_CHAIN, FORWARD_CHAIN};

/// The attachment records under the state directory.
pub const ATTACHMENTS_DIR: &str = "attachments";
/// How long Attach waits for the controller's config unless configured otherwise.
pub const DEFAULT_CONFIG_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait between two looks at a member's status (or the host link) while Attach waits:
/// changes are notified at once, this is only a safety net.
const RECHECK: Duration = Duration::from_secs(1);

/// Why an attachment operation failed; each maps to the gRPC code the API documents.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The namespace or the attachment does not exist, or the controller does not know the
    /// network (`NOT_FOUND`).
    #[error("{0}")]
    NotFound(String),
    /// The controller refused the member (`PERMISSION_DENIED`).
    #[error("{0}")]
    Denied(String),
    /// No identity or no address left (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    Exhausted(String),
    /// The agent cannot attach now: the data plane or the controller did not answer
    /// (`UNAVAILABLE`).
    #[error("{0}")]
    Unavailable(String),
    /// Check found the attachment different from the previous result (`FAILED_PRECONDITION`).
    #[error("{0}")]
    Mismatch(String),
    /// The request cannot be met as asked, e.g. a bandwidth burst below one frame of the
    /// network's MTU (`INVALID_ARGUMENT`).
    #[error("{0}")]
    Invalid(String),
    /// Anything else (`INTERNAL`).
    #[error("{0}")]
    Internal(String),
}

impl From<AttachError> for tonic::Status {
    fn from(e: AttachError) -> Self {
        match e {
            AttachError::NotFound(m) => tonic::Status::not_found(m),
            AttachError::Denied(m) => tonic::Status::permission_denied(m),
            AttachError::Exhausted(m) => tonic::Status::resource_exhausted(m),
            AttachError::Unavailable(m) => tonic::Status::unavailable(m),
            AttachError::Mismatch(m) => tonic::Status::failed_precondition(m),
            AttachError::Invalid(m) => tonic::Status::invalid_argument(m),
            AttachError::Internal(m) => tonic::Status::internal(m),
        }
    }
}

fn internal(what: &str) -> impl FnOnce(String) -> AttachError + '_ {
    move |e| AttachError::Internal(format!("{what}: {e}"))
}

/// An attachment's identity: (network name, container id, interface name).
type Key = (String, String, String);

fn key_of(k: &v1::AttachmentKey) -> Key {
    (
        k.network_name.clone(),
        k.container_id.clone(),
        k.ifname.clone(),
    )
}

/// An attachment as held (and persisted).
#[derive(Debug, Clone)]
struct Entry {
    identity: Identity,
    attachment: v1::Attachment,
}

impl Entry {
    fn member(&self) -> Address {
        self.identity.address()
    }

    fn result(&self) -> v1::AttachResult {
        self.attachment.result.clone().unwrap_or_default()
    }

    /// The network when the attachment uses the host member as its gateway (primary mode
    /// with the host on the network): it holds a use of the network's NAT rules.
    fn gateway_network(&self) -> Option<NetworkId> {
        gatewayed(self.attachment.result.as_ref()?)
    }
}

/// The network of `r` when its addresses have a gateway (primary mode via the host member).
fn gatewayed(r: &v1::AttachResult) -> Option<NetworkId> {
    if r.addresses.iter().any(|a| !a.gateway.is_empty()) {
        NetworkId::from_str(&r.network_id).ok()
    } else {
        None
    }
}

/// The file form of an [`Entry`].
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    /// The member's identity with its secret, ZeroTier text form.
    identity: String,
    /// `flatwire.agent.v1.Attachment`, protobuf, hex.
    attachment: String,
}

/// A validated Attach request (see `crate::service`).
#[derive(Debug, Clone)]
pub struct AttachSpec {
    /// Its key (all fields non-empty).
    pub key: v1::AttachmentKey,
    /// Absolute namespace path.
    pub netns_path: String,
    /// The network.
    pub nwid: NetworkId,
    /// Primary or secondary (unspecified already mapped to primary).
    pub mode: v1::Mode,
    /// The pod, if given.
    pub pod: Option<v1::PodRef>,
    /// Bandwidth limits for the pod interface (checked for consistency, not yet against
    /// the MTU).
    pub bandwidth: Bandwidth,
}

/// The pod string of the host's vouch: `namespace/name/uid` from the pod reference when it
/// names a pod, else the container id.
pub fn vouch_pod(pod: Option<&v1::PodRef>, container_id: &str) -> String {
    match pod {
        Some(p) if !p.namespace.is_empty() && !p.name.is_empty() => {
            format!("{}/{}/{}", p.namespace, p.name, p.uid)
        }
        _ => container_id.to_string(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Runs blocking work (TAP and namespace syscalls, file I/O) off the tokio workers.
async fn blocking<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, AttachError> + Send + 'static,
) -> Result<T, AttachError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| AttachError::Internal(format!("{what}: {e}")))?
}

/// The attachments of this agent.
pub struct Attachments {
    node: Arc<NodeHandle>,
    host: Identity,
    pool: Arc<IdentityPool>,
    dir: StateDir,
    config_timeout: Duration,
    /// The recorder thread (see [`recorder`]).
    recorder: std::sync::mpsc::Sender<RecordJob>,
    /// One slot per key; its async lock serializes the calls for that key.
    slots: Mutex<HashMap<Key, Arc<tokio::sync::Mutex<Option<Entry>>>>>,
    /// Networks serving as the pods' gateway (see [`Attachments::take_gateway`]); the lock
    /// serializes gateway setup and teardown.
    gateways: tokio::sync::Mutex<HashMap<NetworkId, Gateway>>,
}

/// A network whose host member is the pods' gateway.
#[derive(Debug)]
struct Gateway {
    /// How many attachments use it.
    users: usize,
    /// The host member's addresses when the first of them came (the gateways of the rest).
    addresses: Vec<IpPrefix>,
}

/// The first address of each family in `pod` among `host`: the pod's gateways.
fn gateways_for(host: &[IpPrefix], pod: &[IpPrefix]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for a in host {
        let family_wanted = pod.iter().any(|p| p.addr.is_ipv4() == a.addr.is_ipv4());
        if family_wanted && !out.iter().any(|o| o.is_ipv4() == a.addr.is_ipv4()) {
            out.push(a.addr);
        }
    }
    out
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachments")
            .field("dir", &self.dir.root())
            .finish()
    }
}

impl Attachments {
    /// Attachments on the data plane `node`, vouched for by `host` (the host identity with
    /// its secret), identities from `pool`, records in `HOME/attachments` under `state`, and
    /// Attach waiting at most `config_timeout` for a network config. Blocking file I/O.
    pub fn new(
        node: Arc<NodeHandle>,
        host: Identity,
        pool: Arc<IdentityPool>,
        state: &StateDir,
        config_timeout: Duration,
    ) -> Result<Self, crate::state::StateError> {
        let dir = StateDir::open(state.root().join(ATTACHMENTS_DIR))?;
        let recorder = recorder(dir.clone(), pool.dir().clone())?;
        Ok(Self {
            node,
            host,
            pool,
            recorder,
            dir,
            config_timeout,
            slots: Mutex::new(HashMap::new()),
            gateways: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The identity pool.
    pub fn pool(&self) -> &IdentityPool {
        &self.pool
    }

    fn slot(&self, key: &Key) -> Arc<tokio::sync::Mutex<Option<Entry>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.entry(key.clone()).or_default().clone()
    }

    /// Every slot, for listings.
    fn all_slots(&self) -> Vec<Arc<tokio::sync::Mutex<Option<Entry>>>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.values().cloned().collect()
    }

    /// Has the recorder thread make `change` durable (with whatever else is waiting).
    async fn record(&self, change: Change) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let gone = || "the attachment recorder thread is gone".to_string();
        self.recorder.send((change, tx)).map_err(|_| gone())?;
        rx.await.unwrap_or_else(|_| Err(gone()))
    }

    async fn persist(&self, e: &Entry) -> Result<(), AttachError> {
        let record = Record {
            identity: e.identity.to_secret_string().unwrap_or_default(),
            attachment: hex::encode(e.attachment.encode_to_vec()),
        };
        let mut bytes = serde_json::to_vec_pretty(&record)
            .map_err(|e| AttachError::Internal(format!("cannot encode the attachment: {e}")))?;
        bytes.push(b'\n');
        self.record(Change::Write {
            name: format!("{}.json", e.member()),
            bytes,
            sensitivity: Sensitivity::Secret,
        })
        .await
        .map_err(|e| AttachError::Internal(format!("cannot record the attachment: {e}")))
    }

    async fn forget(&self, member: Address) {
        if let Err(e) = self.record(Change::Remove(format!("{member}.json"))).await {
            tracing::error!(%member, error = %e, "cannot remove the attachment record");
        }
    }

    /// Attaches per `spec`; a retry for an existing key returns the existing result.
    /// Attaches of different keys run concurrently.
    pub async fn attach(&self, spec: AttachSpec) -> Result<v1::AttachResult, AttachError> {
        let slot = self.slot(&key_of(&spec.key));
        let mut slot = slot.lock().await;
        if let Some(e) = slot.as_ref() {
            tracing::debug!(member = %e.member(), "attach retry: returning the existing result");
            return Ok(e.result());
        }
        let mut t = Timings::start();
        let entry = self.attach_new(&spec, &mut t).await?;
        let result = entry.result();
        tracing::info!(
            member = %entry.member(),
            nwid = %spec.nwid,
            netns = %spec.netns_path,
            ifname = %spec.key.ifname,
            addresses = ?result.addresses.iter().map(|a| a.address.as_str()).collect::<Vec<_>>(),
            took_ms = t.total(),
            identity_ms = t.identity,
            tap_ms = t.tap,
            config_ms = t.config,
            link_and_record_ms = t.link,
            "attached"
        );
        *slot = Some(entry);
        Ok(result)
    }

    /// Takes an identity and attaches it; a failure undoes everything, the identity's standby
    /// node in the data plane (from warming it in the pool) included.
    async fn attach_new(&self, spec: &AttachSpec, t: &mut Timings) -> Result<Entry, AttachError> {
        check_netns(Path::new(&spec.netns_path))?;
        let pool = self.pool.clone();
        let identity = blocking("identity", move || {
            pool.take()
                .map_err(|e| AttachError::Exhausted(format!("no member identity: {e}")))
        })
        .await?;
        t.identity = t.lap();
        let member = identity.address();
        // Before the member exists: its first status change is not missed.
        let watch = networks::watch_member(member, spec.nwid);
        match self.join_member(spec, identity, &watch, t).await {
            Ok(entry) => Ok(entry),
            Err(e) => {
                // Removes the member, or the standby node its pool identity had: the identity
                // is discarded, nothing of it stays in the data plane.
                if self.node.remove_member(member).await.is_none() {
                    tracing::error!(%member, "cannot remove the member after a failed attach");
                }
                tracing::warn!(%member, nwid = %spec.nwid, netns = %spec.netns_path, error = %e,
                    "attach failed; undone");
                Err(e)
            }
        }
    }

    /// Creates the TAP of `identity` in the pod's namespace, adds the member to the data plane
    /// and, once the controller answered, configures its link and records the attachment
    /// durably (the two at once).
    async fn join_member(
        &self,
        spec: &AttachSpec,
        identity: Identity,
        watch: &MemberWatch,
        t: &mut Timings,
    ) -> Result<Entry, AttachError> {
        let (member, nwid) = (identity.address(), spec.nwid);
        let mac = Mac::from_address(member, nwid);
        // Down and unaddressed until the config came (configured in the second visit).
        let unconfigured = LinkState {
            mtu: DEFAULT_MTU,
            ..LinkState::default()
        };
        let (tap, groups) =
            create_tap(&spec.key.ifname, mac, &spec.netns_path, unconfigured).await?;
        let ifindex = tap.ifindex();
        let pod = vouch_pod(spec.pod.as_ref(), &spec.key.container_id);
        let vouch = Vouch::sign(&self.host, member, nwid, &pod, now_ms())
            .map_err(|e| AttachError::Internal(format!("cannot sign the vouch: {e}")))?;
        self.node
            .add_member(NewMember {
                identity: identity.clone(),
                nwid,
                tap: Some(tap),
                name: format!("{} in {}", spec.key.ifname, spec.netns_path),
                vouch: Some(vouch),
                groups,
            })
            .await
            .map_err(|e| AttachError::Unavailable(format!("cannot add the member: {e}")))?;
        t.tap = t.lap();
        let (result, state) = self.configure(spec, member, mac, watch, t).await?;
        let entry = Entry {
            identity,
            attachment: v1::Attachment {
                key: Some(spec.key.clone()),
                netns_path: spec.netns_path.clone(),
                mode: spec.mode as i32,
                pod: spec.pod.clone(),
                result: Some(result),
                attached_unix_ms: now_ms(),
                bandwidth: (!spec.bandwidth.is_unlimited()).then(|| spec.bandwidth.into()),
            },
        };
        let (linked, recorded) = tokio::join!(
            async {
                let mtu = state.mtu;
                configure_in(&spec.netns_path, ifindex, state).await?;
                shape(&spec.netns_path, &spec.key.ifname, spec.bandwidth, mtu).await
            },
            self.persist(&entry)
        );
        t.link = t.lap();
        let failed = match (linked, recorded) {
            (Ok(()), Ok(())) => None,
            (Err(e), recorded) => {
                if recorded.is_ok() {
                    self.forget(member).await;
                }
                Some(e)
            }
            (Ok(()), Err(e)) => Some(e),
        };
        if let Some(e) = failed {
            if let Some(nwid) = entry.gateway_network() {
                self.release_gateway(nwid).await;
            }
            return Err(e);
        }
        Ok(entry)
    }

    /// Waits for the member's config (woken by `watch`), takes its gateway in primary mode,
    /// and returns the attachment's result and the state its link is to get. A non-empty
    /// gateway in the result holds a use of it ([`Attachments::release_gateway`]).
    async fn configure(
        &self,
        spec: &AttachSpec,
        member: Address,
        mac: Mac,
        watch: &MemberWatch,
        t: &mut Timings,
    ) -> Result<(v1::AttachResult, LinkState), AttachError> {
        let nwid = spec.nwid;
        let deadline = Instant::now() + self.config_timeout;
        let cfg = loop {
            let view = self.node.member(member, nwid).await.ok_or_else(|| {
                AttachError::Unavailable("the data plane is not answering".into())
            })?;
            let view = view.ok_or_else(|| {
                AttachError::Internal(format!("member {member} vanished from the data plane"))
            })?;
            match (view.status, view.config) {
                (Status::Ok, Some(cfg)) => break cfg,
                (Status::AccessDenied, _) => {
                    return Err(AttachError::Denied(format!(
                        "the controller {} refused member {member} on network {nwid} \
                         (access denied: the host {} must be an authorized member of the \
                         network to vouch for its pods, and where the network requires pod \
                         bindings (the operator's networks), the pod must be bound to this \
                         host; a retry succeeds once the operator has written the binding)",
                        nwid.controller(),
                        self.host.address()
                    )));
                }
                (Status::NotFound, _) => {
                    return Err(AttachError::NotFound(format!(
                        "network {nwid} does not exist on its controller {}",
                        nwid.controller()
                    )));
                }
                (s, _) if Instant::now() >= deadline => {
                    return Err(AttachError::Unavailable(format!(
                        "no config for network {nwid} from its controller {} within {:?} \
                         (member {member}, status {s:?})",
                        nwid.controller(),
                        self.config_timeout
                    )));
                }
                _ => {
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .min(RECHECK);
                    let _ = tokio::time::timeout(wait, watch.changed()).await;
                }
            }
        };
        t.config = t.lap();
        let mut state = link_state(&cfg);
        if state.addresses.is_empty() {
            return Err(AttachError::Exhausted(format!(
                "the controller of network {nwid} assigned member {member} no address (its \
                 pool is exhausted or the network assigns none)"
            )));
        }
        let gateways = if spec.mode == v1::Mode::Primary {
            self.take_gateway(nwid, &state.addresses).await?
        } else {
            Vec::new()
        };
        for gw in &gateways {
            let dst = if gw.is_ipv4() {
                IpPrefix {
                    addr: IpAddr::from([0u8; 4]),
                    len: 0,
                }
            } else {
                IpPrefix {
                    addr: IpAddr::from([0u8; 16]),
                    len: 0,
                }
            };
            state.routes.push(LinkRoute {
                dst,
                gateway: Some(*gw),
            });
        }
        let result = v1::AttachResult {
            ifname: spec.key.ifname.clone(),
            mac: mac.to_string(),
            mtu: state.mtu,
            sandbox: spec.netns_path.clone(),
            addresses: state
                .addresses
                .iter()
                .map(|a| v1::IpConfig {
                    address: a.to_string(),
                    gateway: gateways
                        .iter()
                        .find(|g| g.is_ipv4() == a.addr.is_ipv4())
                        .map(ToString::to_string)
                        .unwrap_or_default(),
                })
                .collect(),
            routes: state
                .routes
                .iter()
                .map(|r| v1::Route {
                    dst: r.dst.to_string(),
                    gw: r.gateway.map(|g| g.to_string()).unwrap_or_default(),
                })
                .collect(),
            dns: Some(v1::Dns {
                nameservers: cfg.dns.servers.iter().map(ToString::to_string).collect(),
                domain: cfg.dns.domain.clone(),
                search: if cfg.dns.domain.is_empty() {
                    Vec::new()
                } else {
                    vec![cfg.dns.domain.clone()]
                },
                options: Vec::new(),
            }),
            member_address: member.to_string(),
            network_id: nwid.to_string(),
        };
        Ok((result, state))
    }

    /// Makes the host's own member of `nwid` the gateway of one more attachment and returns
    /// its addresses of the families in `pod` (the pods' default gateways). The network's first
    /// use claims the TAP name [`PRIMARY_TAP`] (rejoining the host member to take it, then
    /// waiting until its TAP carries its addresses), turns on forwarding and installs the NAT
    /// rules. Later uses take the host addresses found then (no data-plane round trip, which
    /// matters with many concurrent attaches). Empty, with a log line and no use taken, when
    /// the host has not joined `nwid`. Pair every non-empty answer with
    /// [`Attachments::release_gateway`].
    async fn take_gateway(
        &self,
        nwid: NetworkId,
        pod: &[IpPrefix],
    ) -> Result<Vec<IpAddr>, AttachError> {
        let mut users = self.gateways.lock().await;
        if let Some(g) = users.get_mut(&nwid) {
            let out = gateways_for(&g.addresses, pod);
            g.users += usize::from(!out.is_empty());
            return Ok(out);
        }
        let Some(host) = self.host_network(nwid).await? else {
            tracing::info!(
                %nwid,
                "primary mode: the host is not a member of the network, so there is no \
                 gateway; attaching as secondary (network routes only)"
            );
            return Ok(Vec::new());
        };
        if host.tap != PRIMARY_TAP && networks::claim_primary(nwid) {
            tracing::info!(%nwid, old = %host.tap, new = PRIMARY_TAP,
                "primary network: rejoining the host member to rename its TAP");
            let gone = self.node.leave_network(nwid).await;
            let back = self.node.join_network(nwid).await;
            if gone.is_none() || back.is_none() {
                return Err(AttachError::Unavailable(
                    "the data plane is not answering".into(),
                ));
            }
        }
        let host = self.wait_host_link(nwid).await?;
        let out = gateways_for(&host.addresses, pod);
        if out.is_empty() {
            tracing::info!(%nwid, "primary mode: the host member has no address of the pod's \
                families, so there is no gateway; attaching as secondary (network routes only)");
            return Ok(out);
        }
        let (prefixes, last) = (host.addresses.clone(), users.is_empty());
        let tap = host.tap.clone();
        blocking("gateway", move || {
            gateway::enable(nwid, &tap, &prefixes).map_err(|e| {
                // Leave nothing half-done: what this call added goes again.
                if let Err(undo) = gateway::disable(nwid, last) {
                    tracing::error!(%nwid, error = %undo, "cannot undo the NAT rules");
                }
                AttachError::Internal(format!("primary mode on network {nwid}: {e}"))
            })
        })
        .await?;
        users.insert(
            nwid,
            Gateway {
                users: 1,
                addresses: host.addresses,
            },
        );
        Ok(out)
    }

    /// Gives back a use taken by [`Attachments::take_gateway`]; the network's last use removes
    /// its NAT rules (and the agent's chain when no gateway network is left). Forwarding and
    /// the TAP name stay.
    async fn release_gateway(&self, nwid: NetworkId) {
        let mut users = self.gateways.lock().await;
        let Some(g) = users.get_mut(&nwid) else {
            return;
        };
        g.users = g.users.saturating_sub(1);
        if g.users > 0 {
            return;
        }
        users.remove(&nwid);
        let last = users.is_empty();
        let removed = blocking("gateway", move || {
            gateway::disable(nwid, last).map_err(|e| AttachError::Internal(e.to_string()))
        })
        .await;
        if let Err(e) = removed {
            tracing::error!(%nwid, error = %e, "cannot remove the NAT rules of the network");
        }
    }

    /// The host member's network `nwid` as the data plane shows it, `None` if not joined.
    async fn host_network(
        &self,
        nwid: NetworkId,
    ) -> Result<Option<crate::networks::NetworkSnapshot>, AttachError> {
        let snapshot =
            self.node.snapshot().await.ok_or_else(|| {
                AttachError::Unavailable("the data plane is not answering".into())
            })?;
        Ok(snapshot.networks.into_iter().find(|n| n.nwid == nwid))
    }

    /// Waits (at most the config timeout) until the host member of `nwid` has addresses and
    /// its TAP in the host namespace carries them.
    async fn wait_host_link(
        &self,
        nwid: NetworkId,
    ) -> Result<crate::networks::NetworkSnapshot, AttachError> {
        let deadline = Instant::now() + self.config_timeout;
        let mut links = networks::watch_host_links();
        loop {
            let host = self
                .host_network(nwid)
                .await?
                .ok_or_else(|| AttachError::Unavailable(format!("the host left network {nwid}")))?;
            if !host.addresses.is_empty() {
                let (tap, want) = (host.tap.clone(), host.addresses.clone());
                let on_link = blocking("inspect", move || {
                    tap::inspect_link(&tap).map_err(|e| AttachError::Internal(e.to_string()))
                })
                .await?
                .is_some_and(|l| want.iter().all(|a| l.addresses.contains(a)));
                if on_link {
                    return Ok(host);
                }
            }
            if Instant::now() >= deadline {
                return Err(AttachError::Unavailable(format!(
                    "the host member of network {nwid} has no address on its TAP {} within \
                     {:?}, so it cannot be the pods' gateway yet",
                    host.tap, self.config_timeout
                )));
            }
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(RECHECK);
            let _ = tokio::time::timeout(wait, links.changed()).await;
        }
    }

    /// Removes the attachment of `key`; false when there was none. `netns_path` is only
    /// informational: the TAP goes away with the member wherever it is.
    pub async fn detach(&self, key: &v1::AttachmentKey) -> Result<bool, AttachError> {
        let k = key_of(key);
        let slot = self.slot(&k);
        let mut guard = slot.lock().await;
        let Some(e) = guard.take() else {
            return Ok(false);
        };
        let member = e.member();
        let started = Instant::now();
        if self.node.remove_member(member).await.is_none() {
            *guard = Some(e);
            return Err(AttachError::Unavailable(
                "the data plane is not answering".into(),
            ));
        }
        let removed = started.elapsed();
        self.forget(member).await;
        if let Some(nwid) = e.gateway_network() {
            self.release_gateway(nwid).await;
        }
        if e.attachment.bandwidth.is_some() {
            // The TAP went with the member; its ingress `ifb` stays until removed (or until
            // the namespace goes, which may already have happened).
            let (ns, ifname) = (e.attachment.netns_path.clone(), k.2.clone());
            let removed = blocking("unshape", move || {
                shaping::remove(Path::new(&ns), &ifname)
                    .map_err(|e| AttachError::Internal(e.to_string()))
            })
            .await;
            if let Err(err) = removed {
                tracing::debug!(%member, error = %err, "bandwidth limits not removed");
            }
        }
        let removed_ms = removed.as_millis() as u64;
        let took_ms = started.elapsed().as_millis() as u64;
        tracing::info!(%member, network = %k.0, container = %k.1, ifname = %k.2, removed_ms,
            took_ms, "detached");
        Ok(true)
    }

    /// Compares the live interface of `key` in `netns_path` with `prev`.
    pub async fn check(
        &self,
        key: &v1::AttachmentKey,
        netns_path: &str,
        prev: Option<&v1::AttachResult>,
        bandwidth: Bandwidth,
    ) -> Result<(), AttachError> {
        let slot = self.slot(&key_of(key));
        let guard = slot.lock().await;
        let Some(e) = guard.as_ref() else {
            return Err(AttachError::NotFound(format!(
                "no attachment {}/{}/{}",
                key.network_name, key.container_id, key.ifname
            )));
        };
        check_netns(Path::new(netns_path))?;
        let want = prev.cloned().unwrap_or_else(|| e.result());
        let (ns, ifname) = (netns_path.to_string(), key.ifname.clone());
        let live = blocking("check", move || {
            tap::in_netns(Path::new(&ns), move || tap::inspect_link(&ifname))
                .map_err(|e| AttachError::Internal(format!("cannot inspect the interface: {e}")))
        })
        .await?;
        let Some(live) = live else {
            return Err(AttachError::Mismatch(format!(
                "interface {} is missing in {netns_path}",
                key.ifname
            )));
        };
        let mut diffs = Vec::new();
        let mac = Mac(live.mac).to_string();
        if !want.mac.is_empty() && !want.mac.eq_ignore_ascii_case(&mac) {
            diffs.push(format!("MAC is {mac}, expected {}", want.mac));
        }
        if want.mtu != 0 && want.mtu != live.mtu {
            diffs.push(format!("MTU is {}, expected {}", live.mtu, want.mtu));
        }
        for a in &want.addresses {
            let present = IpPrefix::from_str(&a.address)
                .map(|p| live.addresses.contains(&p))
                .unwrap_or(false);
            if !present {
                diffs.push(format!("address {} is missing", a.address));
            }
        }
        let (ns, ifname) = (netns_path.to_string(), key.ifname.clone());
        let shaped = blocking("check", move || {
            Ok(shaping::check(Path::new(&ns), &ifname, bandwidth))
        })
        .await?;
        if let Err(e) = shaped {
            diffs.push(e.to_string());
        }
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(AttachError::Mismatch(format!(
                "interface {} in {netns_path} differs: {}",
                key.ifname,
                diffs.join("; ")
            )))
        }
    }

    /// The attachments, of network `network_name` only unless it is empty.
    pub async fn list(&self, network_name: &str) -> Vec<v1::Attachment> {
        let mut out = Vec::new();
        for slot in self.all_slots() {
            let guard = slot.lock().await;
            if let Some(e) = guard.as_ref()
                && (network_name.is_empty()
                    || e.attachment
                        .key
                        .as_ref()
                        .is_some_and(|k| k.network_name == network_name))
            {
                out.push(e.attachment.clone());
            }
        }
        out
    }

    /// Detaches every attachment of `network_name` whose container id and interface name are
    /// not in `keep`; returns their keys.
    pub async fn garbage_collect(
        &self,
        network_name: &str,
        keep: &[v1::AttachmentKey],
    ) -> Result<Vec<v1::AttachmentKey>, AttachError> {
        let mut removed = Vec::new();
        for a in self.list(network_name).await {
            let Some(k) = a.key else { continue };
            // The GC is scoped to one network: a kept key names its container and interface.
            if keep
                .iter()
                .any(|x| x.container_id == k.container_id && x.ifname == k.ifname)
            {
                continue;
            }
            if self.detach(&k).await? {
                removed.push(k);
            }
        }
        Ok(removed)
    }

    /// Restores the recorded attachments (at start, before serving): those whose namespace
    /// exists get their TAP back and rejoin; the others' records are removed (and their members
    /// released at their controllers in the background). Returns how many were restored.
    pub async fn restore(&self) -> usize {
        let dir = self.dir.clone();
        let records = blocking("list", move || Ok(read_records(&dir)))
            .await
            .unwrap_or_default();
        // One after the other: measured on two busy cores, restoring eight at a time was no
        // faster and grew the heap (per-thread malloc arenas).
        let mut restored = 0;
        for (name, record) in records {
            restored += usize::from(self.restore_record(name, record).await);
        }
        restored
    }

    /// Restores one record (file `name`); false when it was removed instead.
    async fn restore_record(&self, name: String, record: Record) -> bool {
        match self.restore_one(&record).await {
            Ok((key, entry)) => {
                *self.slot(&key).lock().await = Some(entry);
                return true;
            }
            Err(AttachError::NotFound(e)) => {
                tracing::info!(record = %name, "attachment not restored ({e}); record removed");
            }
            Err(e) => {
                tracing::error!(record = %name, error = %e, "cannot restore an attachment; record removed");
            }
        }
        if let Err(e) = self.record(Change::Remove(name)).await {
            tracing::error!(error = %e, "cannot remove an attachment record");
        }
        false
    }

    async fn restore_one(&self, r: &Record) -> Result<(Key, Entry), AttachError> {
        let identity = crate::host::parse_secret_identity(r.identity.as_bytes())
            .map_err(internal("bad identity"))?;
        let bytes =
            hex::decode(&r.attachment).map_err(|e| internal("bad record")(e.to_string()))?;
        let attachment = v1::Attachment::decode(bytes.as_slice())
            .map_err(|e| internal("bad record")(e.to_string()))?;
        let (Some(key), Some(result)) = (&attachment.key, &attachment.result) else {
            return Err(AttachError::Internal("record without key or result".into()));
        };
        let nwid = NetworkId::from_str(&result.network_id)
            .map_err(|e| internal("bad network id")(e.to_string()))?;
        let member = identity.address();
        let pod = vouch_pod(attachment.pod.as_ref(), &key.container_id);
        let added = self
            .restore_member(&identity, nwid, &attachment, key, result, &pod)
            .await;
        let pod_addresses = match added {
            Ok(a) => a,
            Err(e) => {
                // Its record goes, so its pod's DEL will find nothing to detach.
                self.release_gone(identity, nwid);
                return Err(e);
            }
        };
        // Its routes already point at the host member: take its use of the gateway again (the
        // kernel kept forwarding and NAT while the agent was away; this checks them).
        if gatewayed(result).is_some() {
            match self.take_gateway(nwid, &pod_addresses).await {
                Ok(g) if !g.is_empty() => {}
                Ok(_) => tracing::warn!(%member, %nwid, "restored pod's gateway is gone"),
                Err(e) => {
                    tracing::error!(%member, %nwid, error = %e, "cannot restore the pod's gateway");
                }
            }
        }
        tracing::info!(%member, %nwid, netns = %attachment.netns_path, "attachment restored");
        let key = key_of(key);
        Ok((
            key,
            Entry {
                identity,
                attachment,
            },
        ))
    }

    /// The part of [`Attachments::restore_one`] that can fail once the record parsed: the
    /// pod's namespace is checked, its TAP made again and the member added; returns the pod's
    /// addresses.
    async fn restore_member(
        &self,
        identity: &Identity,
        nwid: NetworkId,
        attachment: &v1::Attachment,
        key: &v1::AttachmentKey,
        result: &v1::AttachResult,
        pod: &str,
    ) -> Result<Vec<IpPrefix>, AttachError> {
        check_netns(Path::new(&attachment.netns_path))?;
        let member = identity.address();
        let mac = Mac::from_address(member, nwid);
        let parse = |s: &str| IpPrefix::from_str(s).map_err(internal("bad prefix"));
        let addresses = result
            .addresses
            .iter()
            .map(|a| parse(&a.address))
            .collect::<Result<Vec<_>, _>>()?;
        let routes = result
            .routes
            .iter()
            .map(|r| {
                Ok(LinkRoute {
                    dst: parse(&r.dst)?,
                    gateway: if r.gw.is_empty() {
                        None
                    } else {
                        Some(r.gw.parse().map_err(|e: std::net::AddrParseError| {
                            internal("bad gateway")(e.to_string())
                        })?)
                    },
                })
            })
            .collect::<Result<Vec<_>, AttachError>>()?;
        let pod_addresses = addresses.clone();
        let state = LinkState {
            mtu: result.mtu,
            addresses,
            routes,
        };
        let (tap, groups) = create_tap(&key.ifname, mac, &attachment.netns_path, state).await?;
        // A new TAP: its limits (and its ingress `ifb`, replaced) are set again.
        if let Some(bw) = &attachment.bandwidth {
            shape(&attachment.netns_path, &key.ifname, bw.into(), result.mtu).await?;
        }
        let vouch = Vouch::sign(&self.host, member, nwid, pod, now_ms())
            .map_err(|e| internal("cannot sign the vouch")(e.to_string()))?;
        self.node
            .add_member(NewMember {
                identity: identity.clone(),
                nwid,
                tap: Some(tap),
                name: format!("{} in {}", key.ifname, attachment.netns_path),
                vouch: Some(vouch),
                groups,
            })
            .await
            .map_err(|e| AttachError::Unavailable(e.to_string()))?;
        Ok(pod_addresses)
    }

    /// Releases, in the background, the member of a record that is not restored, so that its
    /// controller frees its IPs: it is added without an interface and removed at once, which
    /// releases it ([`NodeHandle::remove_member`]).
    fn release_gone(&self, identity: Identity, nwid: NetworkId) {
        let node = self.node.clone();
        let member = identity.address();
        tokio::spawn(async move {
            let added = node
                .add_member(NewMember {
                    identity,
                    nwid,
                    tap: None,
                    name: format!("{member} (pod gone)"),
                    vouch: None,
                    groups: None,
                })
                .await;
            match added {
                Ok(()) if node.remove_member(member).await.is_some() => {}
                Ok(()) => tracing::error!(%member, "cannot remove the member of a gone pod"),
                Err(e) => {
                    tracing::warn!(%member, %nwid, error = %e,
                        "cannot release the member of a gone pod");
                }
            }
        });
    }
}

/// The attachment records in `dir` with their file names (blocking file I/O); unreadable ones
/// are logged and left out.
fn read_records(dir: &StateDir) -> Vec<(String, Record)> {
    let rd = match std::fs::read_dir(dir.root()) {
        Ok(rd) => rd,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the attachment records");
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".json") {
            continue;
        }
        match dir.read_json::<Record>(&name) {
            Ok(Some(r)) => out.push((name, r)),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "skipping an attachment record"),
        }
    }
    out
}

/// The networks whose recorded attachments (in `HOME/attachments` under `state`) use the host
/// member as their gateway. At start, before the data plane creates the host's TAPs, the agent
/// claims the first with [`networks::claim_primary`]: the host member is back on
/// [`PRIMARY_TAP`] from its first moment, so host-to-pod traffic works as soon as its config
/// is back (no rejoin when the first pod is restored). Blocking file I/O.
pub fn recorded_gateways(state: &StateDir) -> Vec<NetworkId> {
    let dir = match StateDir::open(state.root().join(ATTACHMENTS_DIR)) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(error = %e, "cannot read the attachment records");
            return Vec::new();
        }
    };
    let mut out: Vec<NetworkId> = Vec::new();
    for (_, r) in read_records(&dir) {
        let gw = hex::decode(&r.attachment)
            .ok()
            .and_then(|b| v1::Attachment::decode(b.as_slice()).ok())
            .and_then(|a| gatewayed(a.result.as_ref()?));
        if let Some(nwid) = gw.filter(|n| !out.contains(n)) {
            out.push(nwid);
        }
    }
    out
}

/// Whether `path` is a network namespace as the agent sees it: a namespace file that exists in
/// its mount namespace.
fn check_netns(path: &Path) -> Result<(), AttachError> {
    use nix::sys::statfs::{NSFS_MAGIC, statfs};
    match statfs(path) {
        Ok(s) if s.filesystem_type() == NSFS_MAGIC => Ok(()),
        Ok(_) => Err(AttachError::NotFound(format!(
            "{} is not a network namespace (as the agent sees it: a mount made after the agent \
             started outside a shared mount such as /run/netns is invisible to it)",
            path.display()
        ))),
        Err(_) => Err(AttachError::NotFound(format!(
            "network namespace {} does not exist",
            path.display()
        ))),
    }
}

/// Shapes interface `ifname` in `netns` to `bw` (nothing to do when unlimited).
async fn shape(netns: &str, ifname: &str, bw: Bandwidth, mtu: u32) -> Result<(), AttachError> {
    if bw.is_unlimited() {
        return Ok(());
    }
    let (netns, ifname) = (netns.to_string(), ifname.to_string());
    blocking("shape", move || {
        shaping::apply(Path::new(&netns), &ifname, bw, mtu).map_err(|e| match e {
            ShapingError::Invalid(m) => AttachError::Invalid(m),
            e => AttachError::Internal(e.to_string()),
        })
    })
    .await
}

/// Sets the MTU, addresses and routes of link `ifindex` in `netns`.
async fn configure_in(netns: &str, ifindex: u32, state: LinkState) -> Result<(), AttachError> {
    let netns = netns.to_string();
    blocking("configure", move || {
        tap::in_netns(Path::new(&netns), move || {
            tap::configure_link(ifindex, &state)
        })
        .map_err(|e| {
            AttachError::Internal(format!("cannot configure the interface in {netns}: {e}"))
        })
    })
    .await
}

/// Creates the member's TAP `ifname` with `mac` right inside `netns` (a TAP lives in the
/// namespace of the thread that creates it: no host-side name, no move, no rename) with
/// `state`'s MTU; when `state` has addresses, brings it up with them and its routes; and opens
/// its multicast memberships there (`None`, logged, if that fails: the member then only has
/// the groups VL2 derives itself). One visit of the namespace, on one thread.
async fn create_tap(
    ifname: &str,
    mac: Mac,
    netns: &str,
    state: LinkState,
) -> Result<(Tap, Option<Memberships>), AttachError> {
    let (ifname, netns) = (ifname.to_string(), netns.to_string());
    blocking("tap", move || {
        let (ns, name) = (netns.clone(), ifname.clone());
        tap::in_netns(Path::new(&netns), move || {
            // Dropped on failure, which destroys it.
            let tap = Tap::create(&TapConfig {
                name: name.clone(),
                mac: mac.0,
                mtu: u16::try_from(state.mtu).unwrap_or(u16::MAX),
                queues: 1,
            })?;
            if !state.addresses.is_empty() {
                tap::configure_link(tap.ifindex(), &state)?;
            }
            let groups = Memberships::open(&name)
                .inspect_err(
                    |e| tracing::warn!(netns = %ns, error = %e, "no multicast subscriptions"),
                )
                .ok();
            Ok((tap, groups))
        })
        .map_err(|e| AttachError::Internal(format!("cannot create {ifname} in {netns}: {e}")))
    })
    .await
}

/// The recorder thread (`fw-record`): makes attachment records durable in batches (what
/// waits while one batch syncs goes in the next, see [`StateDir::commit`]), with the identity
/// pool's removals (`pool`) before them, answering each change once its batch is on disk. It
/// ends when the [`Attachments`] are dropped.
fn recorder(
    dir: StateDir,
    pool: StateDir,
) -> Result<std::sync::mpsc::Sender<RecordJob>, crate::state::StateError> {
    let (tx, rx) = std::sync::mpsc::channel::<RecordJob>();
    std::thread::Builder::new()
        .name("fw-record".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let jobs: Vec<RecordJob> = std::iter::once(first).chain(rx.try_iter()).collect();
                let (changes, replies): (Vec<Change>, Vec<_>) = jobs.into_iter().unzip();
                let started = Instant::now();
                let done = dir.commit(&changes, &[&pool]).map_err(|e| e.to_string());
                tracing::debug!(
                    changes = changes.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "attachment records committed"
                );
                for reply in replies {
                    let _ = reply.send(done.clone());
                }
            }
        })
        .map_err(|source| crate::state::StateError::Io {
            path: std::path::PathBuf::from("fw-record thread"),
            source,
        })?;
    Ok(tx)
}

/// A change for the recorder thread and where its outcome goes.
type RecordJob = (Change, tokio::sync::oneshot::Sender<Result<(), String>>);

/// Where the time of one attach went (ms per phase, see the `attached` log line).
#[derive(Debug)]
struct Timings {
    started: Instant,
    last: Instant,
    identity: u64,
    tap: u64,
    config: u64,
    link: u64,
}

impl Timings {
    fn start() -> Self {
        let now = Instant::now();
        Self {
            started: now,
            last: now,
            identity: 0,
            tap: 0,
            config: 0,
            link: 0,
        }
    }

    /// Milliseconds since the previous lap.
    fn lap(&mut self) -> u64 {
        let now = Instant::now();
        let ms = now.duration_since(self.last).as_millis() as u64;
        self.last = now;
        ms
    }

    fn total(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vouch_pod_names_the_pod_else_the_container() {
        let pod = v1::PodRef {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: "1234-abcd".into(),
        };
        assert_eq!(vouch_pod(Some(&pod), "c0ffee"), "default/web-0/1234-abcd");
        assert_eq!(vouch_pod(None, "c0ffee"), "c0ffee");
        assert_eq!(vouch_pod(Some(&v1::PodRef::default()), "c0ffee"), "c0ffee");
    }

    #[test]
    fn errors_map_to_the_documented_codes() {
        use tonic::Code;
        for (e, code) in [
            (AttachError::NotFound("x".into()), Code::NotFound),
            (AttachError::Denied("x".into()), Code::PermissionDenied),
            (AttachError::Exhausted("x".into()), Code::ResourceExhausted),
            (AttachError::Unavailable("x".into()), Code::Unavailable),
            (AttachError::Mismatch("x".into()), Code::FailedPrecondition),
            (AttachError::Invalid("x".into()), Code::InvalidArgument),
            (AttachError::Internal("x".into()), Code::Internal),
        ] {
            assert_eq!(tonic::Status::from(e).code(), code);
        }
    }
}
