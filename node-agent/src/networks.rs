//! VL2 inside the data-plane thread: the joined networks (one [`vl2::member::Network`] and one
//! TAP device each) and, with `--controller`, the network controller.
//!
//! Everything here runs on the data-plane thread, next to the VL1 node: VL2 packets
//! (`Event::Packet`) go to the controller (config requests for our networks) or to the
//! members; TAP frames go to [`Network::handle_tap_frame`]; what the members want sent goes
//! out through `Node::send`, frames they deliver are written to their TAP. Link configuration
//! (MTU, addresses, routes) takes netlink round trips, so it runs on a separate `fw-link`
//! thread fed over a channel, in order.
//!
//! There is one `Vl2` per local identity: the host's (its `--join` networks, the controller,
//! the root's multicast directory) and one per attached pod (one member network on the pod's
//! TAP, with the host's vouch in its config requests; its link is configured by
//! [`crate::attach`] in the pod's namespace, not here). All share one set of TAP buffers.
//!
//! # Administering the controller
//!
//! Through the HTTP API (`/controller/network/...`, see [`crate::http_api`]) or by hand:
//! networks and members are ZeroTier controller JSON files in `HOME/controller.d`, the same
//! layout and fields as ZeroTier One's `controller.d`:
//!
//! * `network/<nwid>.json`: `{"id": "<nwid>", "nwid": "<nwid>", "name": "..", "private": true,
//!   "mtu": 2800, "ipAssignmentPools": [{"ipRangeStart": "10.77.0.10", "ipRangeEnd":
//!   "10.77.0.99"}], "routes": [{"target": "10.77.0.0/24", "via": null}], "v4AssignMode":
//!   {"zt": true}}` (omitted fields take ZeroTier's defaults; `<nwid>` starts with the agent's
//!   address);
//! * `network/<nwid>/member/<address>.json`: `{"id": "<address>", "address": "<address>",
//!   "nwid": "<nwid>", "authorized": true}` (optionally `ipAssignments`, `tags`,
//!   `capabilities`, `activeBridge`).
//!
//! Files are read on every config request, so a dropped-in or edited file counts from the next
//! request of that member (members re-ask every 60 s). Changes made through the HTTP API are
//! pushed at once, as ZeroTier One does: the controller remembers, per network and member, the
//! requester's identity, its request metadata and when it last asked; a de-authorization (or
//! the deletion of an authorized member, or a pod member's release: see
//! [Release](flatwire_vl2::vouch#release)) sends a signed revocation of the member's certificate
//! to every member of the network seen in the last [`PUSH_WINDOW`] ms (they pass it on), any
//! other member or network change sends a fresh config to the member(s) concerned seen in that
//! window. The agent may join a network it controls: its member's requests and the answers are
//! handed over inside the agent (VL1 sends nothing to itself), and what the multicast directory
//! next to it learns is passed to it the same way. The controller writes
//! back what it decides (assigned IPs, the pinned identity, revisions) atomically. Its index of
//! assigned IPs is built when the agent starts: addresses written into member files by hand
//! while it runs are not guarded against re-assignment until the next start.
//!
//! [`vl2::member::Network`]: flatwire_vl2::member::Network

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::mpsc;

use flatwire_vl1::{Address, Identity, Node, Verb};
use flatwire_vl2::Mac;
use flatwire_vl2::MulticastGroup;
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ApiError, Controller, ControllerStore, FileStore, RequestOutcome, RequestRefusal, StoreError,
    config_payloads, refusal_payload,
};
use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::member::{self, MemberOptions, Network, NetworkEvent, Output, Status, Upstream};
use flatwire_vl2::multicast::{GatherResult, decode_likes};
use flatwire_vl2::netconf::{DEFAULT_MTU, Dns, FLAG_ENABLE_BROADCAST, NetworkConfig, Route};
use flatwire_vl2::verbs::{
    ConfigRequest, CredentialsPayload, in_re, request_metadata, split_in_re,
};
use flatwire_vl2::vouch::Vouch;

use crate::mcast::{self, Memberships};
use crate::tap::{self, IpPrefix, LinkRoute, LinkState, Tap, TapConfig};

/// Frames read from one TAP per `recv_batch`.
const TAP_BATCH: usize = 32;
/// Bytes per TAP receive buffer: the largest ZeroTier MTU plus the Ethernet header, plus one
/// so that a frame the kernel cut to fit reads as larger than any MTU (and is dropped).
const TAP_FRAME: usize = 10_000 + 14 + 1;
/// TAP batches read before the thread looks at other work again.
const TAP_ROUNDS: usize = 8;
/// Most delivered frames held for one TAP write batch: enough for a superframe of TCP
/// segments ([`crate::offload::MAX_SEGMENTS`]), and no more than the member's buffer pool keeps
/// for reuse, so holding them costs no allocation.
const TAP_PENDING: usize = 64;
/// Most time between two config requests `Vl2::nudge` sends for one network (ms): more
/// than the controller's 1 s duplicate window.
pub const NUDGE_INTERVAL: u64 = 1100;
/// Time between the first and the second nudge (ms); it doubles up to [`NUDGE_INTERVAL`]. A
/// request the controller dropped unanswered (as while it looks up the identities of many new
/// members at once) is sent again soon; one within its duplicate window costs it nothing.
const FIRST_NUDGE_GAP: u64 = 200;
/// Most nudges per network.
const MAX_NUDGES: u8 = 8;
/// Members that asked for a config within this long (ms) get the controller's pushes.
pub const PUSH_WINDOW: u64 = 5 * 60 * 1000;
/// Most (network, member) pairs the controller remembers for pushes.
const SEEN_LIMIT: usize = 65_536;
/// Rounds of local delivery per drain (a member asking its own controller takes two).
const LOOPBACK_ROUNDS: usize = 4;
/// How often the member of a network this agent controls asks for its config (ms): as a
/// member asks a remote controller, retried sooner while it has none.
const OWN_REQUEST_INTERVAL: u64 = 60_000;

/// The host-side TAP name of the primary network (see [`claim_primary`]): the pods' gateway.
pub const PRIMARY_TAP: &str = "flatwire0";

/// The ID of the network whose host TAP is [`PRIMARY_TAP`]; 0 while there is none (no network
/// has ID 0: controller address 0 is reserved). One per process, as the name is one per host.
static PRIMARY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Makes `nwid` the host's primary network for the rest of the process's life: a host TAP
/// created for it from now on is named [`PRIMARY_TAP`]. False when another network already is
/// (it keeps the name; `nwid` keeps its `fw` name).
pub fn claim_primary(nwid: NetworkId) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    let id = nwid.to_u64();
    match PRIMARY.compare_exchange(0, id, SeqCst, SeqCst) {
        Ok(_) => true,
        Err(current) => current == id,
    }
}

/// Waiters for news of pod members (see [`watch_member`]), by member and network.
#[allow(clippy::type_complexity)]
static MEMBER_WATCHES: std::sync::LazyLock<
    std::sync::Mutex<HashMap<(Address, NetworkId), std::sync::Arc<tokio::sync::Notify>>>,
> = std::sync::LazyLock::new(Default::default);

/// Hears when pod member `member`'s network `nwid` changes status or config on the data-plane
/// thread, so an attach waits for the controller's answer without polling. Register it before
/// the member is added: a change before [`MemberWatch::changed`] is awaited is kept. One per
/// member and network; dropping it unregisters.
#[derive(Debug)]
pub struct MemberWatch {
    key: (Address, NetworkId),
    notify: std::sync::Arc<tokio::sync::Notify>,
}

/// Registers a [`MemberWatch`] for pod member `member` on `nwid`.
pub fn watch_member(member: Address, nwid: NetworkId) -> MemberWatch {
    let notify = std::sync::Arc::new(tokio::sync::Notify::new());
    let mut w = MEMBER_WATCHES.lock().unwrap_or_else(|e| e.into_inner());
    w.insert((member, nwid), notify.clone());
    MemberWatch {
        key: (member, nwid),
        notify,
    }
}

impl MemberWatch {
    /// Completes at the next change (at once if one came since the last call).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for MemberWatch {
    fn drop(&mut self) {
        let mut w = MEMBER_WATCHES.lock().unwrap_or_else(|e| e.into_inner());
        if w.get(&self.key)
            .is_some_and(|n| std::sync::Arc::ptr_eq(n, &self.notify))
        {
            w.remove(&self.key);
        }
    }
}

/// Counts the host TAPs the `fw-link` thread configured (see [`watch_host_links`]).
static HOST_LINKS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> =
    std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

/// Hears of every host TAP configuration done (addresses, routes, MTU applied), e.g. to wait
/// until the host member's TAP carries the addresses of its config.
pub fn watch_host_links() -> tokio::sync::watch::Receiver<u64> {
    HOST_LINKS.subscribe()
}

/// Tells the [`MemberWatch`] of `member` on `nwid`, if any, of a change.
fn member_changed(member: Address, nwid: NetworkId) {
    let w = MEMBER_WATCHES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = w.get(&(member, nwid)) {
        n.notify_one();
    }
}

/// The host-side TAP name of a network: [`PRIMARY_TAP`] for the primary network (see
/// [`claim_primary`]), else `fw` and the last 8 hex digits of its ID.
pub fn tap_name(nwid: NetworkId) -> String {
    if PRIMARY.load(std::sync::atomic::Ordering::SeqCst) == nwid.to_u64() {
        return PRIMARY_TAP.to_string();
    }
    format!("fw{:08x}", nwid.to_u64() & 0xffff_ffff)
}

/// The link state a member config asks for: its MTU, its assigned addresses, its managed
/// routes (default routes and routes via one of our own addresses are left out, as ZeroTier
/// One does without `allowDefault`).
pub fn link_state(cfg: &NetworkConfig) -> LinkState {
    let addresses: Vec<IpPrefix> = cfg
        .static_ips
        .iter()
        .map(|a| IpPrefix {
            addr: a.ip,
            len: u8::try_from(a.port).unwrap_or(0),
        })
        .collect();
    let routes = cfg
        .routes
        .iter()
        .filter(|r| r.target.port != 0)
        .filter(|r| {
            r.via
                .as_ref()
                .is_none_or(|v| !addresses.iter().any(|a| a.addr == v.ip))
        })
        .map(|r| LinkRoute {
            dst: IpPrefix {
                addr: r.target.ip,
                len: u8::try_from(r.target.port).unwrap_or(0),
            },
            gateway: r.via.as_ref().map(|v| v.ip),
        })
        .collect();
    LinkState {
        mtu: cfg.mtu.clamp(1280, 10_000),
        addresses,
        routes,
    }
}

/// One joined network: the member runtime and its TAP.
struct Joined {
    net: Network,
    /// `None` when the TAP could not be created (the network is in `PORT_ERROR`).
    tap: Option<Tap>,
    name: String,
    applied: Option<LinkState>,
    /// True for the host's own TAPs (configured here on the `fw-link` thread); false for a
    /// pod's TAP in its namespace, which the attach code configures.
    host_link: bool,
    /// The node vouch of a pod member, sent with every config request.
    vouch: Option<Vouch>,
    /// When the config request was last restarted by [`Vl2::nudge`] (ms).
    nudged: u64,
    /// How many times (at most [`MAX_NUDGES`]; then the member's own 5 s retry remains).
    nudges: u8,
    /// True when this agent is the network's controller: the member runtime sends no config
    /// requests to its own address, so [`Vl2::ask_own_controller`] asks for it.
    own_controller: bool,
    /// When it last asked our own controller (ms).
    own_asked: u64,
    /// Traffic and rule drops since [`Vl2::take_counters`] last ran.
    counters: NetCounters,
    /// Rule hits the member had counted at that time.
    rule_hits_seen: flatwire_vl2::rules::eval::RuleHits,
    /// The multicast groups its TAP's interface joined (`None`: none known).
    groups: Option<Memberships>,
    /// The groups the member is subscribed to from there (sorted).
    subscribed: Vec<MulticastGroup>,
    /// When the memberships are read next (ms).
    groups_due: u64,
    /// Frames delivered to the TAP but not written yet: written together (runs of TCP
    /// segments merged) when [`Vl2::drain`] ends, or once [`TAP_PENDING`] wait.
    pending: Vec<Vec<u8>>,
}

/// Counts of one network over an interval.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct NetCounters {
    /// Frames delivered to the TAP (from the overlay).
    pub(crate) rx_frames: u64,
    /// Their bytes (Ethernet header included).
    pub(crate) rx_bytes: u64,
    /// Frames read from the TAP (handed to the network, before its rules).
    pub(crate) tx_frames: u64,
    /// Their bytes.
    pub(crate) tx_bytes: u64,
    /// Frames per deciding rule action and direction.
    pub(crate) rule_hits: flatwire_vl2::rules::eval::RuleHits,
}

impl Joined {
    /// Subscribes the member to the groups its interface joined since the last call and
    /// unsubscribes it from those it left (`scratch`: a reused buffer).
    fn sync_groups(&mut self, now: u64, scratch: &mut Vec<MulticastGroup>) {
        let Some(m) = self.groups.as_mut() else {
            return;
        };
        if let Err(e) = m.read(scratch) {
            tracing::warn!(tap = %self.name, error = %e, "cannot read multicast memberships");
            self.groups = None;
            return;
        }
        if *scratch == self.subscribed {
            return;
        }
        let (join, leave) = mcast::difference(&self.subscribed, scratch);
        for g in join {
            tracing::debug!(tap = %self.name, group = %g.mac, "multicast group joined");
            self.net.subscribe(now as i64, g);
        }
        for g in leave {
            tracing::debug!(tap = %self.name, group = %g.mac, "multicast group left");
            self.net.unsubscribe(now as i64, g);
        }
        std::mem::swap(&mut self.subscribed, scratch);
    }

    /// When the member of a network we control should ask our controller next (ms).
    fn own_request_due(&self) -> Option<u64> {
        self.own_controller.then(|| {
            if self.net.config().is_some() {
                self.own_asked + OWN_REQUEST_INTERVAL
            } else {
                self.own_asked + NUDGE_INTERVAL
            }
        })
    }

    /// When the next nudge may be sent (ms).
    fn nudge_due(&self) -> u64 {
        let gap = FIRST_NUDGE_GAP << self.nudges.saturating_sub(1).min(8);
        self.nudged + gap.min(NUDGE_INTERVAL)
    }

    /// Writes the pending frames to the TAP (runs of TCP segments as superframes), counts
    /// them and hands their buffers back to the member; returns how many the TAP refused or
    /// could not take.
    fn write_pending(&mut self) -> u64 {
        if self.pending.is_empty() {
            return 0;
        }
        let n = self.pending.len();
        let out = match &self.tap {
            Some(t) => t.queues()[0].send_batch(&self.pending).unwrap_or_else(|e| {
                tracing::debug!(tap = %self.name, error = %e, "TAP write");
                tap::SendOutcome::default()
            }),
            None => tap::SendOutcome::default(),
        };
        self.counters.rx_frames += out.sent as u64;
        self.counters.rx_bytes += out.bytes as u64;
        for f in self.pending.drain(..) {
            self.net.recycle(f);
        }
        (n - out.sent) as u64
    }

    fn wants_nudge(&self) -> bool {
        !self.own_controller
            && self.net.release_state().is_none()
            && self.net.config().is_none()
            && self.net.status() == Status::RequestingConfiguration
            && self.nudges < MAX_NUDGES
    }
}

/// The controller role.
struct Ctl {
    ctl: Controller<FileStore>,
    upstream: Upstream,
    /// What the last config request of each (network, member) said, for pushes.
    seen: HashMap<(NetworkId, Address), Seen>,
    /// Our public identity: the requester when a local member asks us, and the controller
    /// identity our own members verify configs and certificates with.
    public: Identity,
    /// Config requests answered, by outcome (see [`REQUEST_OUTCOMES`]).
    pub(crate) requests: [u64; 4],
    /// Pushed configs a member has not acknowledged yet, sent again until it does.
    unacked: HashMap<(NetworkId, Address), Unacked>,
}

/// A pushed config waiting for the member's OK (which names its update id).
struct Unacked {
    update_id: u64,
    payloads: Vec<(Verb, Vec<u8>)>,
    /// When to send it again (ms).
    next: u64,
    /// Sends so far.
    sends: u32,
}

/// How long a pushed config waits for its acknowledgement before it is sent again (ms); the
/// wait doubles with every send, up to [`PUSH_SENDS`] sends. Without this a lost push left a
/// member on its old config until its own refresh, up to a minute later.
const PUSH_RETRY: u64 = 500;
/// Most sends of one pushed config.
const PUSH_SENDS: u32 = 5;

/// A member's last config request.
struct Seen {
    identity: Identity,
    metadata: Dictionary,
    /// When it asked (ms).
    at: u64,
}

/// Config request outcomes, in the order of `Ctl::requests`, with their metric labels.
pub(crate) const REQUEST_OUTCOMES: [&str; 4] = ["ok", "refused", "ignored", "error"];

/// What an API write changed, and so what to push.
enum Change {
    /// A member lost its authorization: revoke its certificate.
    Revoked(NetworkId, Address),
    /// Member(s) (all of the network for `None`) need a fresh config.
    Config(NetworkId, Option<Address>),
}

/// A link configuration job for the `fw-link` thread.
struct LinkJob {
    name: String,
    ifindex: u32,
    state: LinkState,
}

/// The TAP receive buffers, shared by every TAP of the data-plane thread.
pub(crate) struct TapBufs {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
}

impl TapBufs {
    /// [`TAP_BATCH`] buffers of [`TAP_FRAME`] bytes.
    pub(crate) fn new() -> Self {
        Self {
            bufs: (0..TAP_BATCH).map(|_| vec![0u8; TAP_FRAME]).collect(),
            lens: vec![0; TAP_BATCH],
        }
    }
}

/// A member's network as the attach code sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Its status (refusals show up here).
    pub status: Status,
    /// The config, once one arrived.
    pub config: Option<NetworkConfig>,
}

/// VL2 on the data-plane thread (one per local identity: the host's, and one per pod).
pub(crate) struct Vl2 {
    me: Address,
    ctl: Option<Ctl>,
    /// The multicast directory of a root (without the controller role).
    upstream: Option<Upstream>,
    nets: Vec<Joined>,
    upstreams: Vec<Address>,
    rng: u64,
    /// Controller replies waiting for `Node::send`.
    sends: Vec<(Address, Verb, Vec<u8>)>,
    /// VL2 packets from one of our parts to another (a member asking our own controller, its
    /// answers), delivered without the network by [`Vl2::drain`].
    loopback: Vec<(Verb, Vec<u8>)>,
    link_jobs: Option<mpsc::Sender<LinkJob>>,
    /// Scratch list for reading multicast memberships.
    groups: Vec<MulticastGroup>,
    /// Frames the TAP refused or could not take.
    pub(crate) tap_rejected: u64,
}

impl std::fmt::Debug for Vl2 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vl2")
            .field("me", &self.me)
            .field("controller", &self.ctl.is_some())
            .field("networks", &self.nets.len())
            .finish()
    }
}

fn seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    (t ^ u64::from(std::process::id()).rotate_left(32)) | 1
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// The VL2 drop reasons, in counter order, with their metric names.
pub(crate) const DROPS: [(member::DropReason, &str); 13] = [
    (member::DropReason::NoConfig, "Vl2NoConfig"),
    (member::DropReason::Malformed, "Vl2Malformed"),
    (member::DropReason::NotMember, "Vl2NotMember"),
    (member::DropReason::RulesOutbound, "Vl2RulesOutbound"),
    (member::DropReason::RulesInbound, "Vl2RulesInbound"),
    (member::DropReason::NotBridge, "Vl2NotBridge"),
    (
        member::DropReason::MulticastDisabled,
        "Vl2MulticastDisabled",
    ),
    (member::DropReason::BadMac, "Vl2BadMac"),
    (member::DropReason::BadCredential, "Vl2BadCredential"),
    (member::DropReason::RateLimited, "Vl2RateLimited"),
    (member::DropReason::BadChunk, "Vl2BadChunk"),
    (member::DropReason::BadConfig, "Vl2BadConfig"),
    (member::DropReason::TooBig, "Vl2TooBig"),
];

/// A joined network as the snapshot shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSnapshot {
    /// The network.
    pub nwid: NetworkId,
    /// Its status.
    pub status: Status,
    /// The host-side TAP name.
    pub tap: String,
    /// Assigned addresses of the current config.
    pub addresses: Vec<IpPrefix>,
    /// The member's MAC on this network.
    pub mac: Mac,
    /// Network name from the config (empty without one).
    pub name: String,
    /// MTU of the config ([`DEFAULT_MTU`] without one).
    pub mtu: u32,
    /// Private (certificate-gated) network; true without a config, as in ZeroTier One.
    pub private: bool,
    /// Revision of the config (0 without one).
    pub revision: u64,
    /// Whether the config enables broadcast.
    pub broadcast: bool,
    /// Managed routes of the config.
    pub routes: Vec<Route>,
    /// DNS settings of the config.
    pub dns: Dns,
    /// The multicast groups the member announces.
    pub multicast: Vec<flatwire_vl2::MulticastGroup>,
}

impl Vl2 {
    /// Opens the controller store (`controller_dir`), creates a TAP per network and joins.
    /// `roots` are the planet's roots (the members' multicast upstreams).
    pub(crate) fn start(
        me: Address,
        identity: &flatwire_vl1::Identity,
        roots: &[Address],
        is_root: bool,
        controller_dir: Option<&Path>,
        networks: &[NetworkId],
        now: u64,
    ) -> Result<Self, StoreError> {
        let ctl = match controller_dir {
            Some(dir) => Some(Ctl {
                ctl: Controller::new(identity.clone(), FileStore::open(dir)?.with_group_commit()),
                upstream: Upstream::new(seed()),
                seen: HashMap::new(),
                public: identity.to_public(),
                requests: [0; 4],
                unacked: HashMap::new(),
            }),
            None => None,
        };
        let mut v = Self {
            ctl,
            upstream: is_root.then(|| Upstream::new(seed())),
            ..Self::for_member(me, roots)
        };
        for nwid in networks {
            let _ = v.join(*nwid, now);
        }
        Ok(v)
    }

    /// VL2 of a pod member `me`: no controller, no networks until [`Vl2::attach_tap`].
    pub(crate) fn for_member(me: Address, roots: &[Address]) -> Self {
        Self {
            me,
            ctl: None,
            upstream: None,
            nets: Vec::new(),
            upstreams: roots.iter().copied().filter(|r| *r != me).collect(),
            rng: seed(),
            sends: Vec::new(),
            loopback: Vec::new(),
            link_jobs: None,
            groups: Vec::new(),
            tap_rejected: 0,
        }
    }

    /// Joins `nwid` as this (pod) member on `tap`, a TAP already created in the pod's
    /// namespace (`name` for logs; `None`: no interface), presenting `vouch` in its config
    /// requests. The link is not configured here: read the config with [`Vl2::member_view`].
    pub(crate) fn attach_tap(
        &mut self,
        nwid: NetworkId,
        tap: Option<Tap>,
        name: String,
        vouch: Option<Vouch>,
        groups: Option<Memberships>,
        now: u64,
    ) {
        let net = self.member(nwid, vouch.clone(), now);
        tracing::info!(%nwid, member = %self.me, tap = %name, mac = %net.mac(), "pod member joined");
        self.nets.push(Joined {
            net,
            tap,
            name,
            applied: None,
            host_link: false,
            vouch,
            nudged: 0,
            nudges: 0,
            own_controller: false,
            own_asked: 0,
            counters: NetCounters::default(),
            rule_hits_seen: Default::default(),
            groups,
            subscribed: Vec::new(),
            groups_due: 0,
            pending: Vec::with_capacity(TAP_PENDING),
        });
    }

    /// The status and config of joined network `nwid`, `None` if it is not joined.
    pub(crate) fn member_view(&self, nwid: NetworkId) -> Option<MemberView> {
        self.nets
            .iter()
            .find(|j| j.net.id() == nwid)
            .map(|j| MemberView {
                status: j.net.status(),
                config: j.net.config().cloned(),
            })
    }

    /// Whether anything consumes VL2 packets.
    pub(crate) fn is_active(&self) -> bool {
        self.ctl.is_some() || self.upstream.is_some() || !self.nets.is_empty()
    }

    fn member(&mut self, nwid: NetworkId, vouch: Option<Vouch>, now: u64) -> Network {
        let mut net = Network::join(
            self.me,
            nwid,
            MemberOptions {
                seed: xorshift(&mut self.rng),
                vouch,
                ..MemberOptions::default()
            },
            now as i64,
        );
        net.set_upstreams(self.upstreams.clone());
        net
    }

    /// Takes the roots of a new planet as the multicast upstreams of every network joined
    /// now and later.
    pub(crate) fn set_roots(&mut self, roots: &[Address]) {
        let me = self.me;
        self.upstreams = roots.iter().copied().filter(|r| *r != me).collect();
        for j in &mut self.nets {
            j.net.set_upstreams(self.upstreams.clone());
        }
    }

    /// Whether a network waits for its first config from controller `peer`.
    pub(crate) fn awaits_config_from(&self, peer: Address) -> bool {
        self.nets
            .iter()
            .any(|j| j.wants_nudge() && j.net.id().controller() == peer)
    }

    /// Whether any network waits for its first config.
    pub(crate) fn awaits_config(&self) -> bool {
        self.nets.iter().any(Joined::wants_nudge)
    }

    /// Sends the config request of every network still without a config again, now (the
    /// first time at once, then after [`FIRST_NUDGE_GAP`], doubling up to [`NUDGE_INTERVAL`]). Call when a controller becomes reachable and then
    /// periodically while online: the member runtime only retries on its 5 s tick, a request
    /// sent before the first path existed is lost, and controllers ignore a member's request
    /// within 1 s of its previous one (as after a quick restart).
    pub(crate) fn nudge(&mut self, now: u64) {
        for i in 0..self.nets.len() {
            let j = &self.nets[i];
            if !j.wants_nudge() || now < j.nudge_due() {
                continue;
            }
            // A member without a config holds nothing worth keeping: a fresh one asks at once.
            let (nwid, vouch) = (j.net.id(), j.vouch.clone());
            let net = self.member(nwid, vouch, now);
            let j = &mut self.nets[i];
            j.net = net;
            j.nudged = now;
            j.nudges += 1;
            tracing::debug!(%nwid, "config request sent again");
        }
    }

    /// Leaves `nwid`: the member is dropped and its TAP closed (which removes it); false if
    /// it was not joined.
    pub(crate) fn leave(&mut self, nwid: NetworkId) -> bool {
        let Some(i) = self.nets.iter().position(|j| j.net.id() == nwid) else {
            return false;
        };
        let mut j = self.nets.remove(i);
        j.net.leave();
        tracing::info!(%nwid, tap = %j.name, "left network");
        true
    }

    /// Starts releasing this (pod) member at the controller of every network it joined, so
    /// that its controller deletes it and frees its IPs ([`Network::release`]; bounded by
    /// [`flatwire_vl2::vouch::RELEASE_TIMEOUT_MS`]). [`Vl2::released`] says when that is over.
    pub(crate) fn release(&mut self, now: u64) {
        for j in &mut self.nets {
            j.net.release(now as i64);
        }
    }

    /// Whether no network is still waiting for its controller's answer to a release.
    pub(crate) fn released(&self) -> bool {
        self.nets
            .iter()
            .all(|j| j.net.release_state() != Some(member::Release::Pending))
    }

    /// Leaves every network and hands back their TAPs, for the caller to close elsewhere:
    /// closing a TAP waits for the kernel to unregister the device, which the data-plane
    /// thread should not.
    pub(crate) fn leave_all(&mut self) -> Vec<Tap> {
        let me = self.me;
        std::mem::take(&mut self.nets)
            .into_iter()
            .filter_map(|mut j| {
                let nwid = j.net.id();
                match j.net.release_state() {
                    Some(member::Release::Deleted) => {
                        tracing::info!(%nwid, member = %me, "released: the controller deleted the member");
                    }
                    Some(member::Release::Refused) => tracing::warn!(%nwid, member = %me,
                        "the controller kept the member (not authorized by a vouch): its record stays there"),
                    Some(r) => tracing::warn!(%nwid, member = %me, release = ?r,
                        "the controller did not acknowledge the release; the member's IPs stay assigned there"),
                    None => {}
                }
                j.net.leave();
                tracing::info!(%nwid, tap = %j.name, "left network");
                j.tap.take()
            })
            .collect()
    }

    /// Answers a `/controller/...` API request (`path`: the segments after `controller`);
    /// `None` without the controller role. GET/POST/DELETE of `network`, `network/<nwid>`,
    /// `network/<nwid>/member` and `network/<nwid>/member/<address>`, in ZeroTier One's JSON,
    /// and flatwire's pod bindings (see [`pod_api`]).
    pub(crate) fn controller_api(
        &mut self,
        method: &str,
        path: &[String],
        body: &[u8],
        now: u64,
    ) -> Option<(u16, serde_json::Value)> {
        let ctl = &mut self.ctl.as_mut()?.ctl;
        // The pushes of a write leave through `drain`, after a commit: also when the commit
        // here failed and a later one holds the write.
        if let Some((answer, changes)) = pod_api(ctl, method, path, body) {
            let answer = commit_api_write(ctl, answer);
            for c in changes {
                self.apply_change(c, now);
            }
            return Some(answer);
        }
        let before = member_authorized(ctl, path);
        let answer = controller_api(ctl, method, path, body, now as i64);
        let changed = if answer.0 == 200 {
            change(method, path, before, member_authorized(ctl, path))
        } else {
            None
        };
        let answer = commit_api_write(ctl, answer);
        if let Some(c) = changed {
            self.apply_change(c, now);
        }
        Some(answer)
    }

    /// Pushes what an API write changed.
    fn apply_change(&mut self, change: Change, now: u64) {
        match change {
            Change::Revoked(nwid, a) => self.push_revocation(nwid, a, now),
            Change::Config(nwid, a) => self.push_config(nwid, a, now),
        }
    }

    /// Sends a revocation of `member`'s certificate to every member of `nwid` seen lately.
    fn push_revocation(&mut self, nwid: NetworkId, member: Address, now: u64) {
        let Some(c) = self.ctl.as_mut() else { return };
        let id = xorshift(&mut self.rng) as u32;
        let rev = match c.ctl.revoke(nwid, member, id, now as i64) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(%nwid, %member, error = %e, "controller: cannot sign a revocation");
                return;
            }
        };
        let mut p = Vec::new();
        CredentialsPayload::revocation(rev).encode(&mut p);
        let mut told = 0;
        for ((n, a), seen) in &c.seen {
            if *n == nwid && now.saturating_sub(seen.at) < PUSH_WINDOW {
                self.sends.push((*a, Verb::NETWORK_CREDENTIALS, p.clone()));
                told += 1;
            }
        }
        tracing::info!(%nwid, %member, told, "controller: member revoked");
    }

    /// Sends a fresh config to `member` of `nwid` (every member of it for `None`) that asked
    /// within [`PUSH_WINDOW`], built from its last request.
    fn push_config(&mut self, nwid: NetworkId, member: Option<Address>, now: u64) {
        let Some(c) = self.ctl.as_mut() else { return };
        let mut rng = self.rng;
        for ((n, a), seen) in &c.seen {
            if *n != nwid
                || member.is_some_and(|m| m != *a)
                || now.saturating_sub(seen.at) >= PUSH_WINDOW
            {
                continue;
            }
            let out = c.ctl.handle_request(
                nwid,
                &seen.identity,
                &seen.metadata,
                0,
                now as i64,
                &mut || xorshift(&mut rng),
            );
            let cfg = match out {
                Ok(RequestOutcome::Config(cfg)) => cfg,
                Ok(other) => {
                    tracing::debug!(%nwid, member = %a, outcome = ?other, "controller: nothing to push");
                    continue;
                }
                Err(e) => {
                    tracing::warn!(%nwid, member = %a, error = %e, "controller: cannot build a config to push");
                    continue;
                }
            };
            let update_id = xorshift(&mut rng) | 1;
            match config_payloads(c.ctl.identity(), &cfg, None, update_id) {
                Ok(p) => {
                    tracing::info!(%nwid, member = %a, revision = cfg.revision, "controller: config pushed");
                    self.sends
                        .extend(p.iter().map(|(v, p)| (*a, *v, p.clone())));
                    if *a != self.me {
                        let next = now + PUSH_RETRY;
                        let (update_id, payloads, sends) = (update_id, p, 1);
                        let u = Unacked {
                            update_id,
                            payloads,
                            next,
                            sends,
                        };
                        c.unacked.insert((nwid, *a), u);
                    }
                }
                Err(e) => tracing::error!(%nwid, error = %e, "controller: cannot sign config"),
            }
        }
        self.rng = rng;
    }

    /// Joins `nwid` (a TAP and a member); false if it was already joined.
    pub(crate) fn join(&mut self, nwid: NetworkId, now: u64) -> bool {
        if self.nets.iter().any(|j| j.net.id() == nwid) {
            return false;
        }
        let mut net = self.member(nwid, None, now);
        let name = tap_name(nwid);
        let tap = match Tap::create(&TapConfig {
            name: name.clone(),
            mac: net.mac().0,
            mtu: DEFAULT_MTU as u16,
            queues: 1,
        }) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(%nwid, tap = %name, error = %e, "cannot create the TAP device");
                net.set_port_error(true);
                None
            }
        };
        tracing::info!(%nwid, tap = %name, mac = %net.mac(), "joined network");
        // The data-plane thread is in the host's namespace, where this TAP stays.
        let groups = tap.as_ref().and_then(|_| {
            Memberships::open(&name)
                .inspect_err(
                    |e| tracing::warn!(tap = %name, error = %e, "no multicast subscriptions"),
                )
                .ok()
        });
        self.nets.push(Joined {
            net,
            tap,
            name,
            applied: None,
            host_link: true,
            vouch: None,
            nudged: 0,
            nudges: 0,
            own_controller: self.ctl.is_some() && nwid.controller() == self.me,
            own_asked: 0,
            counters: NetCounters::default(),
            rule_hits_seen: Default::default(),
            groups,
            subscribed: Vec::new(),
            groups_due: 0,
            pending: Vec::with_capacity(TAP_PENDING),
        });
        self.ask_own_controller(now);
        true
    }

    /// The fds of the TAPs to poll, in network order (`None` for a network without one).
    pub(crate) fn tap_fds(&self) -> impl Iterator<Item = Option<BorrowedFd<'_>>> + '_ {
        self.nets
            .iter()
            .map(|j| j.tap.as_ref().map(|t| t.queues()[0].as_fd()))
    }

    /// The earliest member timer or due nudge (absolute ms), `u64::MAX` without networks.
    pub(crate) fn poll_timeout(&self) -> u64 {
        self.nets
            .iter()
            .map(|j| {
                let t = j.net.poll_timeout().max(0) as u64;
                let t = j.own_request_due().map_or(t, |d| t.min(d));
                let t = if j.groups.is_some() {
                    t.min(j.groups_due)
                } else {
                    t
                };
                if j.wants_nudge() {
                    t.min(j.nudge_due())
                } else {
                    t
                }
            })
            .chain(
                self.ctl
                    .iter()
                    .flat_map(|c| c.unacked.values().map(|u| u.next)),
            )
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Runs due member timers, sends unacknowledged config pushes again and expires
    /// multicast directories.
    pub(crate) fn handle_timeout(&mut self, now: u64) {
        for j in &mut self.nets {
            if now as i64 >= j.net.poll_timeout() {
                j.net.handle_timeout(now as i64);
            }
            if now >= j.groups_due {
                j.groups_due = now + mcast::POLL_INTERVAL;
                j.sync_groups(now, &mut self.groups);
            }
        }
        if let Some(u) = self.upstream.as_mut() {
            u.expire(now as i64);
        }
        if let Some(c) = self.ctl.as_mut() {
            c.upstream.expire(now as i64);
            c.unacked.retain(|(nwid, member), u| {
                if now < u.next {
                    return true;
                }
                if u.sends >= PUSH_SENDS {
                    tracing::warn!(%nwid, %member, sends = u.sends, "controller: pushed config never acknowledged; the member gets it at its next request");
                    return false;
                }
                tracing::debug!(%nwid, %member, sends = u.sends, "controller: config push sent again");
                self.sends.extend(u.payloads.iter().map(|(v, p)| (*member, *v, p.clone())));
                u.next = now + (PUSH_RETRY << u.sends);
                u.sends += 1;
                true
            });
        }
        self.ask_own_controller(now);
    }

    /// Drops the pushed config a member's OK acknowledges (in-re ECHO, as ZeroTier answers a
    /// NETWORK_CONFIG push: network id and update id).
    fn push_acknowledged(&mut self, from: Address, payload: &[u8]) {
        let Some(c) = self.ctl.as_mut() else { return };
        let Ok((verb, _, body)) = split_in_re(payload) else {
            return;
        };
        if verb != Verb::ECHO.0 || body.len() < 16 {
            return;
        }
        let word = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_be_bytes(b)
        };
        let (nwid, update_id) = (NetworkId::from(word(0)), word(8));
        if c.unacked
            .get(&(nwid, from))
            .is_some_and(|u| u.update_id == update_id)
        {
            c.unacked.remove(&(nwid, from));
        }
    }

    /// Queues, for [`Vl2::drain`] to hand to our controller, the config request of every
    /// network we control and joined whose request is due.
    fn ask_own_controller(&mut self, now: u64) {
        for j in &mut self.nets {
            if j.own_request_due().is_none_or(|d| now < d) {
                continue;
            }
            j.own_asked = now;
            let opts = MemberOptions::default();
            let (revision, timestamp) = j
                .net
                .config()
                .map_or((0, 0), |c| (c.revision, c.timestamp as u64));
            let req = ConfigRequest {
                nwid: j.net.id(),
                metadata: request_metadata(opts.version, opts.platform.as_deref()).encode(),
                revision,
                timestamp,
            };
            let mut p = Vec::new();
            req.encode(&mut p);
            self.loopback.push((Verb::NETWORK_CONFIG_REQUEST, p));
        }
    }

    /// Handles one VL2 packet of our identity; false when nothing here takes VL2 packets.
    /// Call [`Vl2::drain`] afterwards.
    pub(crate) fn handle_packet(
        &mut self,
        node: &Node,
        now: u64,
        from: Address,
        verb: Verb,
        packet_id: u64,
        payload: &[u8],
    ) -> bool {
        if !self.is_active() {
            return false;
        }
        let me = self.me;
        if verb == Verb::OK {
            self.push_acknowledged(from, payload);
        }
        if verb == Verb::NETWORK_CONFIG_REQUEST && self.ctl.is_some() {
            match ConfigRequest::decode(payload) {
                Ok(req) if req.nwid.controller() == me => {
                    self.config_request(node, now, from, packet_id, &req);
                    return true;
                }
                Ok(_) => {}
                Err(_) => {
                    tracing::debug!(%from, "malformed network config request");
                    return true;
                }
            }
        }
        let own = self.ctl.as_ref().map(|c| &c.public);
        let lookup = |a: Address| identity_of(node, me, own, a);
        for j in &mut self.nets {
            j.net
                .handle_packet(now as i64, from, verb, packet_id, payload, &lookup);
        }
        if matches!(verb, Verb::MULTICAST_LIKE | Verb::MULTICAST_GATHER) {
            // Our own members cannot ask the directory next to them (the member runtime sends
            // nothing to its own address): tell them of what it learns.
            let mut liked = Vec::new();
            let reply = if let Some(Ctl { ctl, upstream, .. }) = self.ctl.as_mut() {
                let store = ctl.store();
                let authorized = |n: NetworkId, a: Address| {
                    if n.controller() != me {
                        return true;
                    }
                    store
                        .get_member(n, a)
                        .ok()
                        .flatten()
                        .is_some_and(|m| m.authorized)
                };
                if verb == Verb::MULTICAST_LIKE {
                    liked = local_likes(&self.nets, from, payload, &authorized);
                }
                upstream.handle_packet(now as i64, from, verb, packet_id, payload, &authorized)
            } else if let Some(u) = self.upstream.as_mut() {
                if verb == Verb::MULTICAST_LIKE {
                    liked = local_likes(&self.nets, from, payload, &|_, _| true);
                }
                u.handle_packet(now as i64, from, verb, packet_id, payload, &|_, _| true)
            } else {
                None
            };
            if let Some(p) = reply {
                self.sends.push((from, Verb::OK, p));
            }
            for (nwid, group) in liked {
                let mut p = Vec::new();
                in_re(Verb::MULTICAST_GATHER.0, 0, &mut p);
                let r = GatherResult {
                    nwid,
                    group,
                    total_known: 1,
                    members: vec![from],
                };
                p.extend_from_slice(&r.encode());
                self.loopback.push((Verb::OK, p));
            }
        }
        true
    }

    fn config_request(
        &mut self,
        node: &Node,
        now: u64,
        from: Address,
        packet_id: u64,
        req: &ConfigRequest,
    ) {
        let Some(c) = self.ctl.as_mut() else { return };
        tracing::debug!(nwid = %req.nwid, member = %from, packet_id, "controller: config request");
        let Some(who) = identity_of(node, self.me, Some(&c.public), from) else {
            tracing::debug!(%from, "config request from a peer of unknown identity");
            return;
        };
        let nwid = req.nwid;
        if c.seen.len() >= SEEN_LIMIT {
            c.seen.retain(|_, s| now.saturating_sub(s.at) < PUSH_WINDOW);
        }
        if c.seen.len() < SEEN_LIMIT || c.seen.contains_key(&(nwid, from)) {
            c.seen.insert(
                (nwid, from),
                Seen {
                    identity: who.clone(),
                    metadata: req.metadata_dictionary(),
                    at: now,
                },
            );
        }
        let mut rng = self.rng;
        let out = c.ctl.handle_request(
            nwid,
            &who,
            &req.metadata_dictionary(),
            packet_id,
            now as i64,
            &mut || xorshift(&mut rng),
        );
        let update_id = xorshift(&mut rng) | 1;
        self.rng = rng;
        let outcome = match &out {
            Ok(RequestOutcome::Config(_)) => 0,
            Ok(RequestOutcome::Refuse(_)) => 1,
            Ok(RequestOutcome::Ignore) => 2,
            Err(_) => 3,
        };
        c.requests[outcome] += 1;
        match out {
            Ok(RequestOutcome::Config(cfg)) => {
                match config_payloads(c.ctl.identity(), &cfg, Some(packet_id), update_id) {
                    Ok(p) => {
                        tracing::info!(
                            %nwid,
                            member = %from,
                            ips = ?cfg.static_ips.iter().map(|a| format!("{}/{}", a.ip, a.port)).collect::<Vec<_>>(),
                            "controller: config sent"
                        );
                        for (v, p) in p {
                            self.sends.push((from, v, p));
                        }
                    }
                    Err(e) => tracing::error!(%nwid, error = %e, "controller: cannot sign config"),
                }
            }
            Ok(RequestOutcome::Refuse(r)) => {
                tracing::info!(%nwid, member = %from, refusal = ?r, "controller: refused");
                self.sends
                    .push((from, Verb::ERROR, refusal_payload(packet_id, r, nwid)));
                if r == RequestRefusal::Released {
                    // Gone for good (its identity is discarded): no pushes to it, and its
                    // peers learn as from a deletion through the API.
                    c.seen.remove(&(nwid, from));
                    c.unacked.remove(&(nwid, from));
                    self.apply_change(Change::Revoked(nwid, from), now);
                }
            }
            Ok(RequestOutcome::Ignore) => {
                tracing::debug!(%nwid, member = %from, "controller: request ignored (repeat within 1 s)")
            }
            Err(e) => tracing::error!(%nwid, member = %from, error = %e, "controller: store error"),
        }
    }

    /// Reads ready frames from the TAP of network `idx` into its member runtime; returns how
    /// many. Call [`Vl2::drain`] afterwards.
    pub(crate) fn tap_readable(
        &mut self,
        idx: usize,
        node: &mut Node,
        now: u64,
        bufs: &mut TapBufs,
    ) -> usize {
        let mut total = 0;
        for _ in 0..TAP_ROUNDS {
            let Some(j) = self.nets.get_mut(idx) else {
                return total;
            };
            let Some(tap) = j.tap.as_ref() else {
                return total;
            };
            let n = match tap.queues()[0].recv_batch(&mut bufs.bufs, &mut bufs.lens) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(tap = %j.name, error = %e, "TAP receive");
                    0
                }
            };
            for (b, len) in bufs.bufs.iter().zip(&bufs.lens).take(n) {
                let frame = &b[..*len];
                if mcast::is_membership_report(frame) {
                    // The interface joined or left a group: read its memberships now.
                    j.groups_due = 0;
                }
                j.net.handle_tap_frame(now as i64, frame);
                j.counters.tx_bytes += *len as u64;
            }
            j.counters.tx_frames += n as u64;
            total += n;
            self.drain(node, now);
            if n < TAP_BATCH {
                break;
            }
        }
        total
    }

    /// Sends what the members and the controller want sent, writes delivered frames to the
    /// TAPs (all together at the end, so that runs of TCP segments of one flow become one
    /// superframe write: [`crate::offload::coalesce`]) and acts on member events (a new
    /// config reconfigures the link). The controller's
    /// replies and pushes leave only after the store writes they depend on are committed:
    /// one group commit per call (per received batch) when something is staged.
    pub(crate) fn drain(&mut self, node: &mut Node, now: u64) {
        self.drain_loopback(node, now);
        // The frames delivered in this pass go to the TAPs now: nothing stays pending while
        // the thread waits.
        for j in &mut self.nets {
            self.tap_rejected += j.write_pending();
        }
    }

    /// [`Vl2::drain`] but the TAP writes, with our packets to ourselves handed over.
    fn drain_loopback(&mut self, node: &mut Node, now: u64) {
        for _ in 0..LOOPBACK_ROUNDS {
            self.drain_once(node, now);
            if self.loopback.is_empty() {
                return;
            }
            // VL1 cannot send to ourselves: hand our packets to ourselves (the controller, our
            // members), as if they came from the network.
            let mut pending = std::mem::take(&mut self.loopback);
            for (verb, p) in pending.drain(..) {
                let packet_id = xorshift(&mut self.rng) | 1;
                self.handle_packet(node, now, self.me, verb, packet_id, &p);
            }
            if self.loopback.is_empty() {
                self.loopback = pending;
            }
        }
        self.drain_once(node, now);
    }

    /// Commits what the controller staged in its store; false when that failed.
    fn commit_store(&mut self) -> bool {
        let Some(c) = self.ctl.as_mut() else {
            return true;
        };
        let staged = c.ctl.store().staged();
        if staged == 0 {
            return true;
        }
        match c.ctl.store_mut().commit() {
            Ok(()) => {
                tracing::trace!(staged, "controller: store committed");
                true
            }
            Err(e) => {
                tracing::error!(staged, error = %e, "controller: store commit failed; replies dropped");
                false
            }
        }
    }

    fn drain_once(&mut self, node: &mut Node, now: u64) {
        let me = self.me;
        if !self.commit_store() {
            // Queued replies may describe writes that are not durable: drop them, the members
            // ask again (and the writes stay staged for the next commit).
            self.sends.clear();
        }
        for (to, verb, p) in self.sends.drain(..) {
            if to == me {
                self.loopback.push((verb, p));
            } else if let Err(e) = node.send(now, me, to, verb, &p) {
                tracing::debug!(%to, error = %e, "VL2 send");
            }
        }
        for j in &mut self.nets {
            while let Some(o) = j.net.poll_output() {
                match o {
                    Output::Send { to, verb, payload } => {
                        if let Err(e) = node.send(now, me, to, verb, &payload) {
                            tracing::debug!(%to, error = %e, "VL2 send");
                        }
                        j.net.recycle(payload);
                    }
                    Output::Deliver(frame) => {
                        j.pending.push(frame);
                        if j.pending.len() >= TAP_PENDING {
                            self.tap_rejected += j.write_pending();
                        }
                    }
                    Output::Event(NetworkEvent::StatusChanged(s)) => {
                        tracing::info!(nwid = %j.net.id(), status = ?s, "network status");
                        if !j.host_link {
                            member_changed(me, j.net.id());
                        }
                    }
                    Output::Event(NetworkEvent::ConfigChanged) => {
                        if !j.host_link {
                            member_changed(me, j.net.id());
                        }
                        let Some(cfg) = j.net.config() else { continue };
                        let state = link_state(cfg);
                        tracing::info!(
                            nwid = %j.net.id(),
                            revision = cfg.revision,
                            addresses = ?state.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            mtu = state.mtu,
                            "network config"
                        );
                        if j.applied.as_ref() == Some(&state) {
                            continue;
                        }
                        if !j.host_link {
                            // A pod's TAP lives in its namespace; attaching configured it.
                            if j.applied.is_some() {
                                tracing::warn!(
                                    nwid = %j.net.id(),
                                    member = %me,
                                    "pod member config changed; its link keeps the attached state until it is attached again"
                                );
                            }
                            j.applied = Some(state);
                            continue;
                        }
                        if let Some(tap) = &j.tap {
                            let job = LinkJob {
                                name: j.name.clone(),
                                ifindex: tap.ifindex(),
                                state: state.clone(),
                            };
                            if !send_link_job(&mut self.link_jobs, job) {
                                tracing::error!(tap = %j.name, "link configuration thread gone");
                            }
                        }
                        j.applied = Some(state);
                    }
                    Output::Event(NetworkEvent::PeerRevoked(a)) => {
                        tracing::info!(nwid = %j.net.id(), peer = %a, "peer revoked");
                    }
                }
            }
        }
    }

    /// Drop counts of all networks, summed per reason.
    pub(crate) fn drops(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        DROPS.iter().map(|(r, name)| {
            (
                *name,
                self.nets.iter().map(|j| j.net.drop_count(*r)).sum::<u64>(),
            )
        })
    }

    /// Each network's counts since the previous call (for the metrics).
    pub(crate) fn take_counters(&mut self) -> impl Iterator<Item = (NetworkId, NetCounters)> + '_ {
        self.nets.iter_mut().map(|j| {
            let hits = *j.net.rule_hits();
            j.counters.rule_hits = hits.since(&j.rule_hits_seen);
            j.rule_hits_seen = hits;
            (j.net.id(), std::mem::take(&mut j.counters))
        })
    }

    /// Config requests the controller answered since the previous call, by outcome label
    /// (empty without the controller role).
    pub(crate) fn take_requests(&mut self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        self.ctl.iter_mut().flat_map(|c| {
            let n = std::mem::take(&mut c.requests);
            REQUEST_OUTCOMES.into_iter().zip(n)
        })
    }

    /// The joined networks.
    pub(crate) fn snapshot(&self) -> Vec<NetworkSnapshot> {
        self.nets
            .iter()
            .map(|j| NetworkSnapshot {
                nwid: j.net.id(),
                status: j.net.status(),
                tap: j.name.clone(),
                addresses: j
                    .net
                    .config()
                    .map_or_else(Vec::new, |c| link_state(c).addresses),
                mac: j.net.mac(),
                name: j.net.config().map(|c| c.name.clone()).unwrap_or_default(),
                mtu: j.net.config().map_or(DEFAULT_MTU, |c| c.mtu),
                private: j.net.config().is_none_or(|c| c.private),
                revision: j.net.config().map_or(0, |c| c.revision),
                broadcast: j
                    .net
                    .config()
                    .is_some_and(|c| c.flags & FLAG_ENABLE_BROADCAST != 0),
                routes: j.net.config().map(|c| c.routes.clone()).unwrap_or_default(),
                dns: j.net.config().map(|c| c.dns.clone()).unwrap_or_default(),
                multicast: j.net.subscriptions().collect(),
            })
            .collect()
    }
}

/// The identity of `a` as local identity `me` knows it; `own` is ours (when we are a
/// controller: our members ask us and verify what we sign).
fn identity_of(node: &Node, me: Address, own: Option<&Identity>, a: Address) -> Option<Identity> {
    match own {
        Some(i) if a == me => Some(i.clone()),
        _ => node.peer_identity(me, a).cloned(),
    }
}

/// The (network, group) pairs of `from`'s MULTICAST_LIKE payload that the directory accepts
/// and one of `nets` joined.
fn local_likes(
    nets: &[Joined],
    from: Address,
    payload: &[u8],
    authorized: &dyn Fn(NetworkId, Address) -> bool,
) -> Vec<(NetworkId, MulticastGroup)> {
    if nets.is_empty() {
        return Vec::new();
    }
    decode_likes(payload)
        .unwrap_or_default()
        .into_iter()
        .filter(|(n, _)| nets.iter().any(|j| j.net.id() == *n) && authorized(*n, from))
        .collect()
}

/// Whether the member an API path names (`network/<nwid>/member/<address>`) is authorized
/// now; `None` for other paths or a member that does not exist.
fn member_authorized(ctl: &Controller<FileStore>, path: &[String]) -> Option<bool> {
    let [n, id, m, a] = path else { return None };
    if n != "network" || m != "member" {
        return None;
    }
    let (id, a) = (id.parse::<NetworkId>().ok()?, a.parse::<Address>().ok()?);
    ctl.store()
        .get_member(id, a)
        .ok()
        .flatten()
        .map(|m| m.authorized)
}

/// What a successful API write (`method` on `path`) changed, given the member's authorization
/// before and after it.
fn change(
    method: &str,
    path: &[String],
    before: Option<bool>,
    after: Option<bool>,
) -> Option<Change> {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    match (method, parts.as_slice()) {
        ("POST", ["network", id]) => Some(Change::Config(id.parse().ok()?, None)),
        (m @ ("POST" | "DELETE"), ["network", id, "member", a]) => {
            let (id, a) = (id.parse().ok()?, a.parse().ok()?);
            if before == Some(true) && after != Some(true) {
                Some(Change::Revoked(id, a))
            } else if m == "POST" {
                Some(Change::Config(id, Some(a)))
            } else {
                None
            }
        }
        _ => None,
    }
}

/// Commits an API write before its answer goes back; a failed commit answers 500 (the write
/// stays staged: a later commit may still make it durable, so the client sends it again).
fn commit_api_write(
    ctl: &mut Controller<FileStore>,
    answer: (u16, serde_json::Value),
) -> (u16, serde_json::Value) {
    match ctl.store_mut().commit() {
        Ok(()) => answer,
        Err(e) => {
            tracing::error!(error = %e, "controller: store commit of an API write failed");
            api_err(500, format_args!("store commit: {e}"))
        }
    }
}

fn api_err(status: u16, msg: impl std::fmt::Display) -> (u16, serde_json::Value) {
    (status, serde_json::json!({ "error": msg.to_string() }))
}

fn api_value<T: serde::Serialize>(v: &T) -> (u16, serde_json::Value) {
    match serde_json::to_value(v) {
        Ok(v) => (200, v),
        Err(e) => api_err(500, e),
    }
}

fn api_write_err(e: &ApiError) -> (u16, serde_json::Value) {
    match e {
        ApiError::NoSuchNetwork(_) => api_err(404, e),
        ApiError::IdentityPinned(_) | ApiError::PodIpsSetByController(_) => api_err(409, e),
        ApiError::Store(_) => api_err(500, e),
        _ => api_err(400, e),
    }
}

fn controller_api(
    ctl: &mut Controller<FileStore>,
    method: &str,
    path: &[String],
    body: &[u8],
    now: i64,
) -> (u16, serde_json::Value) {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let nwid = |s: &str| s.parse::<NetworkId>().ok();
    match (method, parts.as_slice()) {
        ("GET", ["network"]) => match ctl.store().list_networks() {
            Ok(l) => api_value(&l.iter().map(ToString::to_string).collect::<Vec<_>>()),
            Err(e) => api_err(500, e),
        },
        (_, ["network"]) => api_err(405, "only GET"),
        (m, ["network", id]) => {
            let Some(id) = nwid(id) else {
                return api_err(404, "no such network");
            };
            match m {
                "GET" => match ctl.store().get_network(id) {
                    Ok(Some(n)) => api_value(&n),
                    Ok(None) => api_err(404, "no such network"),
                    Err(e) => api_err(500, e),
                },
                "POST" => match ctl.api_network_post(id, body, now) {
                    Ok(n) => api_value(&n),
                    Err(e) => api_write_err(&e),
                },
                "DELETE" => match ctl.store_mut().delete_network(id) {
                    Ok(Some(n)) => api_value(&n),
                    Ok(None) => api_err(404, "no such network"),
                    Err(e) => api_err(500, e),
                },
                _ => api_err(405, "only GET, POST and DELETE"),
            }
        }
        (m, ["network", id, "member"]) => {
            if m != "GET" {
                return api_err(405, "only GET");
            }
            let Some(id) = nwid(id) else {
                return api_err(404, "no such network");
            };
            match ctl.store().get_network(id) {
                Ok(Some(_)) => {}
                Ok(None) => return api_err(404, "no such network"),
                Err(e) => return api_err(500, e),
            }
            let members = match ctl.store().list_members(id) {
                Ok(l) => l,
                Err(e) => return api_err(500, e),
            };
            let mut out = serde_json::Map::new();
            for a in members {
                if let Ok(Some(m)) = ctl.store().get_member(id, a) {
                    out.insert(a.to_string(), m.revision.into());
                }
            }
            (200, serde_json::Value::Object(out))
        }
        (m, ["network", id, "member", a]) => {
            let (Some(id), Ok(a)) = (nwid(id), a.parse::<Address>()) else {
                return api_err(404, "no such member");
            };
            match m {
                "GET" => match ctl.store().get_member(id, a) {
                    Ok(Some(m)) => api_value(&m),
                    Ok(None) => api_err(404, "no such member"),
                    Err(e) => api_err(500, e),
                },
                "POST" => match ctl.api_member_post(id, a, body, now) {
                    Ok(m) => api_value(&m),
                    Err(e) => api_write_err(&e),
                },
                "DELETE" => match ctl.store_mut().delete_member(id, a) {
                    Ok(Some(m)) => api_value(&m),
                    Ok(None) => api_err(404, "no such member"),
                    Err(e) => api_err(500, e),
                },
                _ => api_err(405, "only GET, POST and DELETE"),
            }
        }
        _ => api_err(404, "not found"),
    }
}

/// The pod binding endpoints (a flatwire extension; `None` for other paths), with what to
/// push after them:
///
/// * `GET network/<nwid>/pod`: `{"<uid>": <binding>, ...}`;
/// * `GET network/<nwid>/pod/<uid>`: the binding `{"namespace", "name", "uid", "host",
///   "tags": [[id, value], ...], "members": ["<address>", ...]}`;
/// * `POST network/<nwid>/pod/<uid>`: creates or updates it from `namespace`, `name`, `host`,
///   `tags` (members it authorized are retagged and get a fresh config). A member refused
///   before the binding existed is not pushed a config: its attachment failed and is gone,
///   and the runtime's retry attaches a new one;
/// * `DELETE network/<nwid>/pod/<uid>`: deletes it and the members it authorized, and
///   revokes their certificates.
fn pod_api(
    ctl: &mut Controller<FileStore>,
    method: &str,
    path: &[String],
    body: &[u8],
) -> Option<((u16, serde_json::Value), Vec<Change>)> {
    let parts: Vec<&str> = path.iter().map(String::as_str).collect();
    let (id, uid) = match parts.as_slice() {
        ["network", id, "pod"] => (*id, None),
        ["network", id, "pod", uid] => (*id, Some(*uid)),
        _ => return None,
    };
    let none = Vec::new();
    let Ok(nwid) = id.parse::<NetworkId>() else {
        return Some((api_err(404, "no such network"), none));
    };
    let revoked = |removed: &[flatwire_vl2::controller::Member]| -> Vec<Change> {
        removed
            .iter()
            .filter(|m| m.authorized)
            .filter_map(|m| Some(Change::Revoked(nwid, m.address.parse().ok()?)))
            .collect()
    };
    let Some(uid) = uid else {
        if method != "GET" {
            return Some((api_err(405, "only GET"), none));
        }
        let listed = (|| {
            if ctl.store().get_network(nwid)?.is_none() {
                return Ok(None);
            }
            let mut out = serde_json::Map::new();
            for uid in ctl.store().list_pods(nwid)? {
                if let Some(b) = ctl.store().get_pod(nwid, &uid)? {
                    out.insert(uid, serde_json::to_value(b).unwrap_or_default());
                }
            }
            Ok::<_, StoreError>(Some(out))
        })();
        return Some(match listed {
            Ok(Some(m)) => ((200, serde_json::Value::Object(m)), none),
            Ok(None) => (api_err(404, "no such network"), none),
            Err(e) => (api_err(500, e), none),
        });
    };
    if !flatwire_vl2::controller::valid_pod_uid(uid) {
        return Some((api_err(404, "no such pod binding"), none));
    }
    Some(match method {
        "GET" => match ctl.store().get_pod(nwid, uid) {
            Ok(Some(b)) => (api_value(&b), none),
            Ok(None) => (api_err(404, "no such pod binding"), none),
            Err(e) => (api_err(500, e), none),
        },
        "POST" => match ctl.api_pod_post(nwid, uid, body) {
            Ok(w) => {
                let mut changes = revoked(&w.removed);
                changes.extend(w.retagged.iter().map(|a| Change::Config(nwid, Some(*a))));
                (api_value(&w.binding), changes)
            }
            Err(e) => (api_write_err(&e), none),
        },
        "DELETE" => match ctl.api_pod_delete(nwid, uid) {
            Ok(Some(d)) => (api_value(&d.binding), revoked(&d.removed)),
            Ok(None) => (api_err(404, "no such pod binding"), none),
            Err(e) => (api_write_err(&e), none),
        },
        _ => (api_err(405, "only GET, POST and DELETE"), none),
    })
}

/// Queues a link job, starting the `fw-link` thread on first use.
fn send_link_job(tx: &mut Option<mpsc::Sender<LinkJob>>, job: LinkJob) -> bool {
    if tx.is_none() {
        let (t, rx) = mpsc::channel::<LinkJob>();
        let spawned = std::thread::Builder::new()
            .name("fw-link".into())
            .spawn(move || {
                for job in rx {
                    let started = std::time::Instant::now();
                    match tap::configure_link(job.ifindex, &job.state) {
                        Ok(()) => tracing::info!(
                            tap = %job.name,
                            addresses = ?job.state.addresses.iter().map(ToString::to_string).collect::<Vec<_>>(),
                            routes = job.state.routes.len(),
                            mtu = job.state.mtu,
                            took_ms = started.elapsed().as_millis() as u64,
                            "TAP configured"
                        ),
                        Err(e) => tracing::error!(tap = %job.name, error = %e, "cannot configure the TAP"),
                    }
                    HOST_LINKS.send_modify(|n| *n += 1);
                }
            });
        if spawned.is_err() {
            return false;
        }
        *tx = Some(t);
    }
    tx.as_ref().is_some_and(|t| t.send(job).is_ok())
}

/// Reads the networks persisted in `dir` (`<nwid>.json` files); unknown names are skipped.
pub fn persisted_networks(dir: &Path) -> std::io::Result<Vec<NetworkId>> {
    let mut out = Vec::new();
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            for e in rd {
                let name = e?.file_name();
                let name = name.to_string_lossy();
                if let Some(n) = name
                    .strip_suffix(".json")
                    .and_then(|s| s.parse::<NetworkId>().ok())
                {
                    out.push(n);
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    out.sort_by_key(|n| n.to_u64());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatwire_vl2::ip::InetAddress;
    use flatwire_vl2::netconf::Route;

    fn inet(s: &str, bits: u16) -> InetAddress {
        InetAddress {
            ip: s.parse().unwrap(),
            port: bits,
        }
    }

    #[test]
    fn tap_names_use_the_last_eight_hex_digits() {
        let nwid: NetworkId = "8056c2e21c000001".parse().unwrap();
        assert_eq!(tap_name(nwid), "fw1c000001");
        assert!(tap_name(nwid).len() <= 15);
    }

    #[test]
    fn the_first_primary_network_gets_flatwire0() {
        // The only test that claims: the claim lasts for the process.
        let first: NetworkId = "8056c2e21c0000a1".parse().unwrap();
        let second: NetworkId = "8056c2e21c0000a2".parse().unwrap();
        assert_eq!(tap_name(first), "fw1c0000a1");
        assert!(claim_primary(first));
        assert!(claim_primary(first), "claiming again is fine");
        assert!(!claim_primary(second), "only one network is primary");
        assert_eq!(tap_name(first), PRIMARY_TAP);
        assert_eq!(tap_name(second), "fw1c0000a2");
    }

    #[test]
    fn link_state_from_config() {
        let cfg = NetworkConfig {
            mtu: 2800,
            static_ips: vec![inet("10.77.0.5", 24), inet("fd00::5", 88)],
            routes: vec![
                Route {
                    target: inet("10.77.0.0", 24),
                    via: None,
                    flags: 0,
                    metric: 0,
                },
                // A default route (needs allowDefault, which we do not have): left out.
                Route {
                    target: inet("0.0.0.0", 0),
                    via: Some(inet("10.77.0.1", 0)),
                    flags: 0,
                    metric: 0,
                },
                // Via ourselves (we are the gateway): left out.
                Route {
                    target: inet("192.168.9.0", 24),
                    via: Some(inet("10.77.0.5", 0)),
                    flags: 0,
                    metric: 0,
                },
                Route {
                    target: inet("192.168.8.0", 24),
                    via: Some(inet("10.77.0.1", 0)),
                    flags: 0,
                    metric: 0,
                },
            ],
            ..NetworkConfig::default()
        };
        let s = link_state(&cfg);
        assert_eq!(s.mtu, 2800);
        let addrs: Vec<String> = s.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(addrs, ["10.77.0.5/24", "fd00::5/88"]);
        assert_eq!(s.routes.len(), 2);
        assert_eq!(s.routes[0].dst.to_string(), "10.77.0.0/24");
        assert_eq!(s.routes[0].gateway, None);
        assert_eq!(s.routes[1].dst.to_string(), "192.168.8.0/24");
        assert_eq!(s.routes[1].gateway, Some("10.77.0.1".parse().unwrap()));
        // MTUs outside what a TAP takes are clamped.
        let tiny = NetworkConfig {
            mtu: 100,
            ..NetworkConfig::default()
        };
        assert_eq!(link_state(&tiny).mtu, 1280);
    }

    #[test]
    fn persisted_networks_are_read_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            persisted_networks(&dir.path().join("none"))
                .unwrap()
                .is_empty()
        );
        for name in [
            "8056c2e21c000002.json",
            "8056c2e21c000001.json",
            "junk.json",
            "x",
        ] {
            std::fs::write(dir.path().join(name), "{}").unwrap();
        }
        let nets: Vec<String> = persisted_networks(dir.path())
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(nets, ["8056c2e21c000001", "8056c2e21c000002"]);
    }
}
