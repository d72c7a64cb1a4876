//! The member runtime of one joined network, sans-I/O: config requests and signed chunk
//! reassembly, status, the membership gate with a credential store per peer, sender- and
//! receiver-side rule checks on every frame, unicast and multicast forwarding, active
//! bridging and revocations (spec §5, §8.7, §12, §13), and a flatwire pod's release at its
//! controller before it goes ([`Network::release`], see [Release](crate::vouch#release)).
//!
//! The host feeds it the VL2 packets `flatwire_vl1::Node` delivers
//! ([`Network::handle_packet`]), the frames read from the TAP ([`Network::handle_tap_frame`])
//! and timer ticks ([`Network::handle_timeout`]); it drains [`Network::poll_output`] for VL2
//! payloads to hand to `Node::send`, frames to write to the TAP and events. Buffers handed
//! out can be returned with [`Network::recycle`] so the data path does not allocate.
//!
//! [`Upstream`] is the multicast directory a root or controller keeps (LIKE storage and
//! GATHER answers).

use std::collections::{BTreeSet, HashMap, VecDeque};

use flatwire_vl1::{Address, Identity, Verb};

use crate::codec::{CodecError, Reader};
use crate::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, CredentialType, Revocation, Tag,
};
use crate::multicast::{
    ExtFrameHeader, FrameHeader, Gather, GatherResult, GroupMembers, MulticastFrameHeader,
    decode_likes, encode_likes,
};
use crate::netconf::{ConfigChunk, FLAG_ENABLE_BROADCAST, NetworkConfig};
use crate::rules::eval::{
    self, CopyAction, Credentials, Env, FilterDecision, Frame, RuleHits, Semantics,
};
use crate::verbs::{
    ConfigRequest, CredentialsPayload, SoftwareVersion, Vl2Error, error_code, in_re,
    request_metadata, split_in_re,
};
use crate::{Mac, MulticastGroup, NetworkId};

/// Background task period (ms).
pub const TICK: i64 = 5000;
/// A config older than this (since its last change) is requested again (ms).
pub const CONFIG_REFRESH: i64 = 60_000;
/// Multicast announcement period (ms).
pub const ANNOUNCE_PERIOD: i64 = 60_000;
/// Credentials are re-pushed to a peer after this long (ms).
pub const PUSH_PERIOD: i64 = 500_000;
/// Largest config dictionary accepted (the reference's exact capacity is unverified).
pub const CONFIG_CAPACITY: usize = 512 * 1024;
/// Reassembly slots for config updates.
const SLOTS: usize = 3;
/// Queued outbound multicasts.
const MAX_QUEUED_MULTICASTS: usize = 32;
/// How long a queued multicast still reaches newly learned members (ms).
const MULTICAST_QUEUE_TTL: i64 = 5000;
/// Explicit gathers for one group are at most this frequent (ms).
const GATHER_PERIOD: i64 = 60_000;
/// Copies to active bridges for an unknown MAC.
const MAX_BRIDGE_COPIES: usize = 32;
/// Peers with a credential record.
const MAX_PEERS: usize = 1 << 16;
/// Learned MAC routes behind bridges.
const MAX_BRIDGE_ROUTES: usize = 1 << 16;
/// Largest Ethernet payload carried.
const MAX_FRAME_PAYLOAD: usize = 10_000;

/// Looks up peer identities (the controller's for signatures, peers' for COM agreement).
/// The host answers from what VL1 learned (HELLO/WHOIS).
pub trait Directory {
    /// The identity of `address`, if known.
    fn identity(&self, address: Address) -> Option<Identity>;
}

impl<F: Fn(Address) -> Option<Identity>> Directory for F {
    fn identity(&self, address: Address) -> Option<Identity> {
        self(address)
    }
}

/// Network status (the numeric codes of `ZT_VirtualNetworkStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// 0: waiting for the first config.
    RequestingConfiguration = 0,
    /// 1: a config is held.
    Ok = 1,
    /// 2: the controller refused the member.
    AccessDenied = 2,
    /// 3: the controller does not know the network.
    NotFound = 3,
    /// 4: the port failed (set by the host).
    PortError = 4,
    /// 5: never set by 1.x.
    ClientTooOld = 5,
    /// 6: SSO login required.
    AuthenticationRequired = 6,
}

/// Where a release ([`Network::release`]) stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Release {
    /// Asked; the controller has not answered yet.
    Pending,
    /// The controller deleted the member (ERROR `OBJ_NOT_FOUND`: it has no record of it now).
    Deleted,
    /// The controller kept the member (any other ERROR, e.g. `ACCESS_DENIED` for a member not
    /// authorized by a vouch).
    Refused,
    /// No answer within [`crate::vouch::RELEASE_TIMEOUT_MS`].
    Unanswered,
}

/// A release under way.
#[derive(Clone, Copy, Debug)]
struct Releasing {
    state: Release,
    /// When it started (ms).
    started: i64,
    /// Requests sent so far.
    sends: usize,
}

/// Something the host should know about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NetworkEvent {
    /// A new config was applied (read it with [`Network::config`]).
    ConfigChanged,
    /// The status changed.
    StatusChanged(Status),
    /// A peer's COM was revoked (it can no longer send to us).
    PeerRevoked(Address),
}

/// What the runtime asks the host to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `payload` with `verb` to `to` through `flatwire_vl1::Node::send`.
    Send {
        /// Recipient.
        to: Address,
        /// Verb (VL2 verbs, OK or ERROR).
        verb: Verb,
        /// Payload after the verb byte.
        payload: Vec<u8>,
    },
    /// Write this Ethernet frame (dst, src, ethertype, payload) to the TAP.
    Deliver(Vec<u8>),
    /// An event.
    Event(NetworkEvent),
}

/// Why a frame or packet was dropped (one counter each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// No config yet, or the network was left.
    NoConfig,
    /// Not parseable.
    Malformed,
    /// The sender failed the membership gate.
    NotMember,
    /// The outbound rules refused it.
    RulesOutbound,
    /// The inbound rules refused it.
    RulesInbound,
    /// A bridged frame where bridging is not allowed.
    NotBridge,
    /// Broadcast disabled or multicast limit 0.
    MulticastDisabled,
    /// Bad source or destination MAC.
    BadMac,
    /// A credential failed verification or is stale.
    BadCredential,
    /// Credentials arrived faster than once per second from a peer.
    RateLimited,
    /// A config chunk was refused (signature, bounds, duplicate).
    BadChunk,
    /// A config was for another member or network.
    BadConfig,
    /// A frame from the local interface larger than the network's MTU.
    TooBig,
}

const DROP_REASONS: usize = 13;

fn drop_index(r: DropReason) -> usize {
    r as usize
}

/// Member options.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// Software version reported to the controller.
    pub version: SoftwareVersion,
    /// `o` metadata key (`linux/x86_64`), `None` to omit.
    pub platform: Option<String>,
    /// Rules-engine semantics.
    pub semantics: Semantics,
    /// Seed for the internal PRNG (shuffles, `random` rule matches).
    pub seed: u64,
    /// A node vouch sent with every config request (flatwire pods), `None` for none.
    pub vouch: Option<crate::vouch::Vouch>,
}

impl Default for MemberOptions {
    fn default() -> Self {
        Self {
            version: SoftwareVersion {
                major: 1,
                minor: 14,
                revision: 1,
            },
            platform: Some("linux/x86_64".into()),
            semantics: Semantics::V1_14,
            seed: 0x9e37_79b9_7f4a_7c15,
            vouch: None,
        }
    }
}

/// What this member knows about one peer on the network (§8.7).
#[derive(Clone, Debug, Default)]
struct PeerRecord {
    com: Option<CertificateOfMembership>,
    key: Option<[u8; 64]>,
    com_revoked_at: i64,
    revoked: HashMap<(u8, u32), i64>,
    tags: HashMap<u32, Tag>,
    caps: HashMap<u32, Capability>,
    coos: HashMap<u32, CertificateOfOwnership>,
    last_pushed: i64,
    last_announced: i64,
    last_credentials: i64,
}

impl PeerRecord {
    fn revoked_at(&self, t: CredentialType, id: u32) -> i64 {
        self.revoked
            .get(&(t as u8, id))
            .copied()
            .unwrap_or(i64::MIN)
    }

    fn valid(&self, cfg: &NetworkConfig, t: CredentialType, id: u32, ts: i64) -> bool {
        ts.abs_diff(cfg.timestamp) <= cfg.credential_time_max_delta.unsigned_abs()
            && ts > self.revoked_at(t, id)
    }
}

/// A credential a peer holds by id: a tag, capability or certificate of ownership.
trait HeldCredential: Sized {
    const TYPE: CredentialType;
    fn nwid(&self) -> NetworkId;
    fn holder(&self) -> Option<Address>;
    fn id(&self) -> u32;
    fn timestamp(&self) -> i64;
    fn verified_by(&self, ctl: &Identity) -> bool;
    fn held(r: &mut PeerRecord) -> &mut HashMap<u32, Self>;
}

macro_rules! held_credential {
    ($t:ty, $ty:ident, $field:ident, |$c:ident, $ctl:ident| $holder:expr, $verify:expr) => {
        impl HeldCredential for $t {
            const TYPE: CredentialType = CredentialType::$ty;
            fn nwid(&self) -> NetworkId {
                self.nwid
            }
            fn holder(&self) -> Option<Address> {
                let $c = self;
                $holder
            }
            fn id(&self) -> u32 {
                self.id
            }
            fn timestamp(&self) -> i64 {
                self.timestamp
            }
            fn verified_by(&self, $ctl: &Identity) -> bool {
                let $c = self;
                $verify
            }
            fn held(r: &mut PeerRecord) -> &mut HashMap<u32, Self> {
                &mut r.$field
            }
        }
    };
}

held_credential!(Tag, Tag, tags, |t, ctl| Some(t.issued_to), t.verify(ctl));
held_credential!(
    CertificateOfOwnership,
    Coo,
    coos,
    |c, ctl| Some(c.issued_to),
    c.verify(ctl)
);
held_credential!(Capability, Capability, caps, |c, ctl| c.holder(), {
    c.verify(|a| (a == ctl.address()).then_some(ctl))
});

#[derive(Clone, Debug, Default)]
struct Slot {
    update_id: u64,
    chunk_ids: Vec<u64>,
    data: Vec<u8>,
    received: usize,
    uses: u64,
}

#[derive(Clone, Debug)]
struct QueuedMulticast {
    created: i64,
    group: MulticastGroup,
    source: Option<Mac>,
    ethertype: u16,
    payload: Vec<u8>,
    gather_limit: u32,
    sent_to: Vec<Address>,
    limit: usize,
}

/// The credentials view the rules engine sees for one frame.
struct CredView<'a> {
    cfg: &'a NetworkConfig,
    peer: Option<&'a PeerRecord>,
}

impl CredView<'_> {
    /// Whether the sender holds a certificate of ownership satisfying `owns`: inbound, a
    /// valid one the peer presented; outbound (we are the sender), one in our config.
    fn sender_owns(&self, inbound: bool, owns: impl Fn(&CertificateOfOwnership) -> bool) -> bool {
        if inbound {
            self.peer.is_some_and(|p| {
                p.coos
                    .values()
                    .any(|c| p.valid(self.cfg, CredentialType::Coo, c.id, c.timestamp) && owns(c))
            })
        } else {
            self.cfg.certificates_of_ownership.iter().any(owns)
        }
    }
}

impl Credentials for CredView<'_> {
    fn local_tag(&self, id: u32) -> Option<u32> {
        self.cfg.tag(id)
    }
    fn remote_tag(&self, id: u32) -> Option<u32> {
        let t = self.peer?.tags.get(&id)?;
        self.peer?
            .valid(self.cfg, CredentialType::Tag, id, t.timestamp)
            .then_some(t.value)
    }
    fn sender_owns_ip(&self, inbound: bool, ip: &[u8]) -> bool {
        self.sender_owns(inbound, |c| c.owns_ip(ip))
    }
    fn sender_owns_mac(&self, inbound: bool, mac: Mac) -> bool {
        self.sender_owns(inbound, |c| c.owns_mac(mac))
    }
}

fn xorshift(s: &mut u64) -> u64 {
    let mut x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    x
}

/// Runs `filter` with the rules environment of one frame to or from `peer`.
fn with_filter_env<R>(
    cfg: &NetworkConfig,
    peer: Option<&PeerRecord>,
    own: Address,
    semantics: Semantics,
    rng: &mut u64,
    filter: impl FnOnce(&mut Env<'_>) -> R,
) -> R {
    let creds = CredView { cfg, peer };
    let mut random = || xorshift(rng) as u32;
    let mut env = Env {
        own_address: own,
        config_flags: cfg.flags,
        credentials: &creds,
        random: &mut random,
        semantics,
    };
    filter(&mut env)
}

/// Runs the outbound filter for one frame.
#[allow(clippy::too_many_arguments)]
fn outbound_filter(
    cfg: &NetworkConfig,
    peer: Option<&PeerRecord>,
    own: Address,
    semantics: Semantics,
    rng: &mut u64,
    zt_dest: u64,
    no_tee: bool,
    frame: &Frame<'_>,
) -> FilterDecision {
    with_filter_env(cfg, peer, own, semantics, rng, |env| {
        eval::filter_outbound(
            &cfg.rules,
            cfg.capabilities.iter().map(|c| c.rules.as_slice()),
            no_tee,
            zt_dest,
            frame,
            env,
        )
    })
}

/// Runs the inbound filter for one frame from `sender`.
fn inbound_filter(
    cfg: &NetworkConfig,
    peer: Option<&PeerRecord>,
    own: Address,
    semantics: Semantics,
    rng: &mut u64,
    sender: Address,
    frame: &Frame<'_>,
) -> FilterDecision {
    let caps = peer.into_iter().flat_map(|p| {
        p.caps
            .values()
            .filter(|c| p.valid(cfg, CredentialType::Capability, c.id, c.timestamp))
            .map(|c| c.rules.as_slice())
    });
    with_filter_env(cfg, peer, own, semantics, rng, |env| {
        eval::filter_inbound(&cfg.rules, caps, sender, frame, env)
    })
}

/// The runtime of one joined network for one local identity.
#[derive(Debug)]
pub struct Network {
    own: Address,
    nwid: NetworkId,
    mac: Mac,
    opts: MemberOptions,
    metadata: Vec<u8>,
    config: Option<NetworkConfig>,
    status: Status,
    last_config_change: i64,
    next_tick: i64,
    last_announce: i64,
    slots: [Slot; SLOTS],
    slot_counter: u64,
    peers: HashMap<Address, PeerRecord>,
    groups: GroupMembers,
    subscriptions: BTreeSet<MulticastGroup>,
    host_groups: BTreeSet<MulticastGroup>,
    bridged_groups: BTreeSet<MulticastGroup>,
    upstreams: Vec<Address>,
    bridge_routes: HashMap<Mac, Address>,
    queued: VecDeque<QueuedMulticast>,
    last_gather: HashMap<MulticastGroup, i64>,
    out: VecDeque<Output>,
    pool: Vec<Vec<u8>>,
    rng: u64,
    drops: [u64; DROP_REASONS],
    rule_hits: RuleHits,
    left: bool,
    release: Option<Releasing>,
}

/// The metadata of a config request with `opts`: ZeroTier's keys and the vouch, if any.
fn request_dictionary(opts: &MemberOptions) -> crate::dictionary::Dictionary {
    let mut metadata = request_metadata(opts.version, opts.platform.as_deref());
    if let Some(v) = &opts.vouch {
        metadata.add(crate::vouch::METADATA_KEY, &v.encode());
    }
    metadata
}

impl Network {
    /// Joins `nwid` as `own` at `now`: the first config request goes out immediately (an
    /// ad-hoc network is configured at once instead).
    pub fn join(own: Address, nwid: NetworkId, opts: MemberOptions, now: i64) -> Self {
        let metadata = request_dictionary(&opts).encode();
        let rng = opts.seed | 1;
        let mut n = Self {
            own,
            nwid,
            mac: Mac::from_address(own, nwid),
            opts,
            metadata,
            config: None,
            status: Status::RequestingConfiguration,
            last_config_change: 0,
            next_tick: now,
            last_announce: i64::MIN / 2,
            slots: Default::default(),
            slot_counter: 0,
            peers: HashMap::new(),
            groups: GroupMembers::default(),
            subscriptions: BTreeSet::new(),
            host_groups: BTreeSet::new(),
            bridged_groups: BTreeSet::new(),
            upstreams: Vec::new(),
            bridge_routes: HashMap::new(),
            queued: VecDeque::new(),
            last_gather: HashMap::new(),
            out: VecDeque::new(),
            pool: Vec::new(),
            rng,
            drops: [0; DROP_REASONS],
            rule_hits: RuleHits::default(),
            left: false,
            release: None,
        };
        // Ad-hoc networks have no controller: their config is derived locally.
        if nwid.is_adhoc()
            && let Some(cfg) = NetworkConfig::adhoc(nwid, own, now)
        {
            n.apply_config(now, cfg);
        }
        n.handle_timeout(now);
        n
    }

    /// The network id.
    pub fn id(&self) -> NetworkId {
        self.nwid
    }

    /// This member's MAC on the network.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The current config, if any.
    pub fn config(&self) -> Option<&NetworkConfig> {
        self.config.as_ref()
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Frames/packets dropped for `reason`.
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops[drop_index(reason)]
    }

    /// Frames counted per deciding rule action and direction since the join.
    pub fn rule_hits(&self) -> &RuleHits {
        &self.rule_hits
    }

    /// Whether `peer` currently passes the membership gate (§13.3).
    pub fn is_member(&self, peer: Address) -> bool {
        self.gate(peer)
    }

    /// The addresses known to subscribe to `group`.
    pub fn group_members(&self, group: MulticastGroup) -> Vec<Address> {
        self.groups.members(self.nwid, group)
    }

    /// Sets the VL1 upstreams (roots) that receive LIKEs and GATHERs besides the controller.
    pub fn set_upstreams(&mut self, upstreams: Vec<Address>) {
        self.upstreams = upstreams;
    }

    /// Subscribes the host port to `group` (announced at once).
    pub fn subscribe(&mut self, now: i64, group: MulticastGroup) {
        self.host_groups.insert(group);
        self.refresh_subscriptions(now);
    }

    /// Unsubscribes the host port (remote LIKEs simply expire).
    pub fn unsubscribe(&mut self, now: i64, group: MulticastGroup) {
        self.host_groups.remove(&group);
        self.refresh_subscriptions(now);
    }

    /// The groups this member announces: the ARP and NDP groups of its own addresses and the
    /// groups its host port subscribed to, in order.
    pub fn subscriptions(&self) -> impl Iterator<Item = MulticastGroup> + '_ {
        self.subscriptions.iter().copied()
    }

    /// Marks the port failed (status PORT_ERROR) or recovered.
    pub fn set_port_error(&mut self, failed: bool) {
        let s = if failed {
            Status::PortError
        } else if self.config.is_some() {
            Status::Ok
        } else {
            Status::RequestingConfiguration
        };
        self.set_status(s);
    }

    /// Leaves the network: all state is dropped and every later input is ignored (1.x
    /// sends nothing on leave).
    pub fn leave(&mut self) {
        self.left = true;
        self.config = None;
        self.peers.clear();
        self.groups = GroupMembers::default();
        self.queued.clear();
        self.bridge_routes.clear();
        self.subscriptions.clear();
    }

    /// Asks the controller to delete this member, as a flatwire pod does before it goes (see
    /// [Release](crate::vouch#release)): a config request whose metadata also carries
    /// [`crate::vouch::RELEASE_KEY`] goes out now and again at the offsets of
    /// [`crate::vouch::RELEASE_SENDS_MS`] until the controller answers it with an ERROR or
    /// [`crate::vouch::RELEASE_TIMEOUT_MS`] passed. Meanwhile keep calling
    /// [`Network::handle_timeout`] at [`Network::poll_timeout`] and feeding packets, and read
    /// [`Network::release_state`]; then [`Network::leave`]. Nothing else is requested from then
    /// on. False (nothing sent) when there is no controller to ask (an ad-hoc network, or this
    /// member is its controller), after [`Network::leave`], or when a release already started.
    pub fn release(&mut self, now: i64) -> bool {
        if self.left
            || self.release.is_some()
            || self.controller() == self.own
            || self.nwid.is_adhoc()
        {
            return false;
        }
        let mut metadata = request_dictionary(&self.opts);
        metadata.add(crate::vouch::RELEASE_KEY, b"1");
        self.metadata = metadata.encode();
        self.release = Some(Releasing {
            state: Release::Pending,
            started: now,
            sends: 0,
        });
        self.next_tick = now;
        self.handle_timeout(now);
        true
    }

    /// Where the release stands; `None` if [`Network::release`] did not start one.
    pub fn release_state(&self) -> Option<Release> {
        self.release.map(|r| r.state)
    }

    /// The release's part of [`Network::handle_timeout`]: due sends, or giving up.
    fn release_tick(&mut self, now: i64) {
        let Some(r) = self.release.as_mut() else {
            return;
        };
        let mut send = false;
        let mut next = now + TICK;
        if r.state == Release::Pending {
            let elapsed = now - r.started;
            if elapsed >= crate::vouch::RELEASE_TIMEOUT_MS {
                r.state = Release::Unanswered;
            } else {
                let at = crate::vouch::RELEASE_SENDS_MS;
                while at.get(r.sends).is_some_and(|&t| elapsed >= t) {
                    r.sends += 1;
                    send = true;
                }
                let due = at
                    .get(r.sends)
                    .copied()
                    .unwrap_or(crate::vouch::RELEASE_TIMEOUT_MS);
                next = r.started + due;
            }
        }
        self.next_tick = next;
        if send {
            self.request_config();
        }
    }

    /// Next output. Call after every `handle_*` until `None`.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Returns a payload/frame buffer from [`Output`] for reuse.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        if self.pool.len() < 64 && buf.capacity() <= 16 * 1024 {
            buf.clear();
            self.pool.push(buf);
        }
    }

    /// When to call [`Network::handle_timeout`] next (absolute ms).
    pub fn poll_timeout(&self) -> i64 {
        self.next_tick
    }

    fn buf(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_default()
    }

    /// A decoded payload when it is for this network; `None` when it is for another one, or
    /// (counted as malformed) when it did not decode.
    fn for_this_network<T>(
        &mut self,
        decoded: Result<T, CodecError>,
        nwid_of: impl FnOnce(&T) -> NetworkId,
    ) -> Option<T> {
        let Ok(v) = decoded else {
            self.drop(DropReason::Malformed);
            return None;
        };
        (nwid_of(&v) == self.nwid).then_some(v)
    }

    fn drop(&mut self, r: DropReason) {
        self.drops[drop_index(r)] += 1;
    }

    fn send(&mut self, to: Address, verb: Verb, payload: Vec<u8>) {
        if to != self.own {
            self.out.push_back(Output::Send { to, verb, payload });
        } else {
            self.recycle(payload);
        }
    }

    fn event(&mut self, e: NetworkEvent) {
        self.out.push_back(Output::Event(e));
    }

    fn set_status(&mut self, s: Status) {
        if s != self.status {
            self.status = s;
            self.event(NetworkEvent::StatusChanged(s));
        }
    }

    /// Runs the periodic work: config requests/refresh, multicast announcements and
    /// expiry. Call when `now >= poll_timeout()`.
    pub fn handle_timeout(&mut self, now: i64) {
        if self.left || now < self.next_tick {
            return;
        }
        if self.release.is_some() {
            return self.release_tick(now);
        }
        self.next_tick = now + TICK;
        if self.config.is_none() || now - self.last_config_change >= CONFIG_REFRESH {
            self.request_config();
        }
        if now - self.last_announce >= ANNOUNCE_PERIOD {
            self.last_announce = now;
            self.announce_all(now, None);
        }
        self.groups.expire(now);
        self.queued
            .retain(|q| now - q.created < MULTICAST_QUEUE_TTL * 6);
    }

    fn controller(&self) -> Address {
        self.nwid.controller()
    }

    fn request_config(&mut self) {
        if self.controller() == self.own || self.nwid.is_adhoc() {
            return;
        }
        let (revision, timestamp) = self
            .config
            .as_ref()
            .map_or((0, 0), |c| (c.revision, c.timestamp as u64));
        let req = ConfigRequest {
            nwid: self.nwid,
            metadata: self.metadata.clone(),
            revision,
            timestamp,
        };
        let mut p = self.buf();
        req.encode(&mut p);
        self.send(self.controller(), Verb::NETWORK_CONFIG_REQUEST, p);
    }

    fn gate(&self, peer: Address) -> bool {
        let Some(cfg) = &self.config else {
            return false;
        };
        if !cfg.private {
            return true;
        }
        let (Some(rec), Some(mine)) = (self.peers.get(&peer), &cfg.com) else {
            return false;
        };
        let (Some(com), Some(key)) = (&rec.com, &rec.key) else {
            return false;
        };
        com.timestamp()
            .is_some_and(|t| (t as i64) > rec.com_revoked_at)
            && mine.agrees_with(com, peer, key)
    }

    /// Gate plus the per-peer announcement it triggers.
    fn gate_and_announce(&mut self, now: i64, peer: Address) -> bool {
        if !self.gate(peer) {
            return false;
        }
        let due = self
            .peers
            .get(&peer)
            .is_none_or(|r| now - r.last_announced >= ANNOUNCE_PERIOD || r.last_announced == 0);
        if due {
            self.announce_to(now, peer, None);
        }
        true
    }

    fn record(&mut self, peer: Address) -> Option<&mut PeerRecord> {
        if !self.peers.contains_key(&peer) && self.peers.len() >= MAX_PEERS {
            return None;
        }
        Some(self.peers.entry(peer).or_default())
    }

    fn refresh_subscriptions(&mut self, now: i64) {
        let mut s: BTreeSet<MulticastGroup> = self.host_groups.clone();
        s.extend(self.bridged_groups.iter().copied());
        if let Some(cfg) = &self.config {
            if cfg.flags & FLAG_ENABLE_BROADCAST != 0 {
                s.insert(MulticastGroup::BROADCAST);
            }
            // The address-resolution group of every assigned IP, as the reference's taps
            // add `deriveMulticastGroupForAddressResolution` for each: ARP `(ff:…:ff, ip)`
            // for IPv4, the solicited-node `(33:33:ff:xx:yy:zz, 0)` for IPv6.
            for ip in &cfg.static_ips {
                match ip.ip {
                    std::net::IpAddr::V4(a) => s.insert(MulticastGroup::arp(a)),
                    std::net::IpAddr::V6(a) => s.insert(MulticastGroup::ndp(a)),
                };
            }
        }
        let new: Vec<MulticastGroup> = s.difference(&self.subscriptions).copied().collect();
        self.subscriptions = s;
        for g in new {
            self.announce_all(now, Some(g));
        }
    }

    fn like_payloads(&self, only: Option<MulticastGroup>) -> Vec<Vec<u8>> {
        let recs: Vec<(NetworkId, MulticastGroup)> = match only {
            Some(g) => vec![(self.nwid, g)],
            None => self.subscriptions.iter().map(|g| (self.nwid, *g)).collect(),
        };
        if recs.is_empty() {
            return Vec::new();
        }
        encode_likes(&recs)
    }

    fn announce_to(&mut self, now: i64, peer: Address, only: Option<MulticastGroup>) {
        if let Some(r) = self.record(peer)
            && only.is_none()
        {
            r.last_announced = now;
        }
        for p in self.like_payloads(only) {
            self.send(peer, Verb::MULTICAST_LIKE, p);
        }
    }

    fn announce_all(&mut self, now: i64, only: Option<MulticastGroup>) {
        if self.config.is_none() {
            return;
        }
        let mut targets: Vec<Address> = self.upstreams.clone();
        targets.push(self.controller());
        for t in targets.clone() {
            for p in self.like_payloads(only) {
                self.send(t, Verb::MULTICAST_LIKE, p);
            }
        }
        let peers: Vec<Address> = self
            .peers
            .iter()
            .filter(|(a, r)| {
                !targets.contains(a)
                    && (only.is_some() || now - r.last_announced >= ANNOUNCE_PERIOD)
            })
            .map(|(a, _)| *a)
            .collect();
        for a in peers {
            if self.gate(a) {
                self.announce_to(now, a, only);
            }
        }
    }

    fn credentials_payload(&mut self) -> Option<Vec<u8>> {
        let cfg = self.config.as_ref()?;
        let c = CredentialsPayload {
            coms: cfg.com.iter().cloned().collect(),
            capabilities: cfg.capabilities.clone(),
            tags: cfg.tags.clone(),
            revocations: Vec::new(),
            coos: cfg.certificates_of_ownership.clone(),
        };
        let mut p = self.buf();
        c.encode(&mut p);
        Some(p)
    }

    fn push_credentials(&mut self, now: i64, peer: Address) {
        if let Some(p) = self.credentials_payload() {
            if let Some(r) = self.record(peer) {
                r.last_pushed = now;
            }
            self.send(peer, Verb::NETWORK_CREDENTIALS, p);
        }
    }

    fn push_if_needed(&mut self, now: i64, peer: Address, min_age: i64) {
        let last = self
            .peers
            .get(&peer)
            .map_or(i64::MIN / 2, |r| r.last_pushed);
        if last < self.last_config_change || now - last >= min_age {
            self.push_credentials(now, peer);
        }
    }

    // ----- packets from VL1 -------------------------------------------------------

    /// Processes one packet `flatwire_vl1::Node` delivered (`Event::Packet`): `payload` is
    /// after the verb byte (for OK/ERROR it starts with the in-re fields). Packets for
    /// other networks are ignored. Call for every VL2 packet of the local identity.
    pub fn handle_packet(
        &mut self,
        now: i64,
        from: Address,
        verb: Verb,
        packet_id: u64,
        payload: &[u8],
        dir: &dyn Directory,
    ) {
        if self.left {
            return;
        }
        match verb {
            Verb::FRAME => self.on_frame(now, from, packet_id, payload),
            Verb::EXT_FRAME => self.on_ext_frame(now, from, packet_id, payload, dir),
            Verb::MULTICAST_LIKE => self.on_like(now, from, payload),
            Verb::NETWORK_CREDENTIALS => self.on_credentials(now, from, payload, dir),
            Verb::NETWORK_CONFIG => self.on_chunk(now, from, packet_id, payload, true, dir),
            Verb::MULTICAST_GATHER => self.on_gather(now, from, packet_id, payload, dir),
            Verb::MULTICAST_FRAME => self.on_multicast_frame(now, from, packet_id, payload, dir),
            Verb::OK => self.on_ok(now, from, payload, dir),
            Verb::ERROR => self.on_error(now, from, payload),
            _ => {}
        }
    }

    fn need_credentials(&mut self, from: Address, verb: Verb, packet_id: u64) {
        self.drop(DropReason::NotMember);
        let mut p = self.buf();
        in_re(verb.0, packet_id, &mut p);
        Vl2Error::need_membership(self.nwid).encode(&mut p);
        self.send(from, Verb::ERROR, p);
    }

    fn deliver(&mut self, dest: Mac, source: Mac, ethertype: u16, payload: &[u8]) {
        let mut f = self.buf();
        f.extend_from_slice(&dest.0);
        f.extend_from_slice(&source.0);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        self.out.push_back(Output::Deliver(f));
    }

    fn send_ext_frame(&mut self, to: Address, flags: u8, fr: &Frame<'_>, data: &[u8]) {
        let mut p = self.buf();
        ExtFrameHeader {
            nwid: self.nwid,
            flags,
            com: None,
            dest: fr.dest_mac,
            source: fr.source_mac,
            ethertype: fr.ethertype,
        }
        .encode(&mut p);
        p.extend_from_slice(data);
        self.send(to, Verb::EXT_FRAME, p);
    }

    /// Sends the TEE/REDIRECT copy `c` of `fr`.
    fn send_copy(&mut self, c: CopyAction, fr: &Frame<'_>) {
        let data = &fr.payload[..c.length.min(fr.payload.len())];
        self.send_ext_frame(c.to, c.flags, fr, data);
    }

    /// Inbound filter for a frame from `sender`; sends copies; returns 0/1/2.
    fn inbound(&mut self, sender: Address, frame: &Frame<'_>) -> u8 {
        let Some(cfg) = &self.config else {
            return 0;
        };
        let d = inbound_filter(
            cfg,
            self.peers.get(&sender),
            self.own,
            self.opts.semantics,
            &mut self.rng,
            sender,
            frame,
        );
        self.rule_hits.record(true, &d);
        for c in [d.copy, d.redirect].into_iter().flatten() {
            self.send_copy(c, frame);
        }
        if d.accept == 0 {
            self.drop(DropReason::RulesInbound);
        }
        d.accept
    }

    fn on_frame(&mut self, now: i64, from: Address, packet_id: u64, payload: &[u8]) {
        let Some((h, data)) = self.for_this_network(FrameHeader::decode(payload), |(h, _)| h.nwid)
        else {
            return;
        };
        if self.config.is_none() {
            return self.drop(DropReason::NoConfig);
        }
        if !self.gate_and_announce(now, from) {
            return self.need_credentials(from, Verb::FRAME, packet_id);
        }
        if data.is_empty() {
            return;
        }
        let frame = Frame {
            source_mac: Mac::from_address(from, self.nwid),
            dest_mac: self.mac,
            ethertype: h.ethertype,
            vlan_id: 0,
            payload: data,
        };
        if self.inbound(from, &frame) > 0 {
            self.deliver(frame.dest_mac, frame.source_mac, h.ethertype, data);
        }
    }

    fn is_bridge(&self, a: Address) -> bool {
        self.config.as_ref().is_some_and(|c| c.is_active_bridge(a))
    }

    fn learn_route(&mut self, mac: Mac, bridge: Address) {
        if self.bridge_routes.len() >= MAX_BRIDGE_ROUTES && !self.bridge_routes.contains_key(&mac) {
            // Drop every route of the bridge owning the most entries.
            let mut counts: HashMap<Address, usize> = HashMap::new();
            for a in self.bridge_routes.values() {
                *counts.entry(*a).or_default() += 1;
            }
            if let Some((worst, _)) = counts.into_iter().max_by_key(|(_, n)| *n) {
                self.bridge_routes.retain(|_, a| *a != worst);
            }
        }
        self.bridge_routes.insert(mac, bridge);
    }

    fn on_ext_frame(
        &mut self,
        now: i64,
        from: Address,
        packet_id: u64,
        payload: &[u8],
        dir: &dyn Directory,
    ) {
        let Some((h, data)) =
            self.for_this_network(ExtFrameHeader::decode(payload), |(h, _)| h.nwid)
        else {
            return;
        };
        if self.config.is_none() {
            return self.drop(DropReason::NoConfig);
        }
        if let Some(com) = h.com.clone() {
            self.add_com(com, dir);
        }
        if !self.gate_and_announce(now, from) {
            return self.need_credentials(from, Verb::EXT_FRAME, packet_id);
        }
        if !(h.source.is_zero() || h.source == self.mac) {
            let frame = Frame {
                source_mac: h.source,
                dest_mac: h.dest,
                ethertype: h.ethertype,
                vlan_id: 0,
                payload: data,
            };
            let verdict = self.inbound(from, &frame);
            let ok = match verdict {
                2 => true,
                1 => {
                    let sender_mac = Mac::from_address(from, self.nwid);
                    let limit = self.config.as_ref().map_or(0, |c| c.multicast_limit);
                    let src_ok = if h.source != sender_mac {
                        if self.is_bridge(from) {
                            self.learn_route(h.source, from);
                            true
                        } else {
                            false
                        }
                    } else {
                        true
                    };
                    let dst_ok = h.dest == self.mac
                        || if h.dest.is_multicast() {
                            limit > 0
                        } else {
                            self.is_bridge(self.own)
                        };
                    if !(src_ok && dst_ok) {
                        self.drop(DropReason::NotBridge);
                    }
                    src_ok && dst_ok
                }
                _ => false,
            };
            if ok {
                self.deliver(h.dest, h.source, h.ethertype, data);
            }
        }
        if h.flags & 0x10 != 0 {
            let mut p = self.buf();
            in_re(Verb::EXT_FRAME.0, packet_id, &mut p);
            p.extend_from_slice(&self.nwid.to_bytes());
            self.send(from, Verb::OK, p);
        }
    }

    fn on_like(&mut self, now: i64, from: Address, payload: &[u8]) {
        let Ok(recs) = decode_likes(payload) else {
            return self.drop(DropReason::Malformed);
        };
        let mut authorized = None;
        for (nwid, g) in recs {
            if nwid != self.nwid {
                continue;
            }
            let ok = *authorized.get_or_insert_with(|| self.gate_and_announce(now, from));
            if ok {
                self.add_member(now, g, from);
            }
        }
    }

    fn add_member(&mut self, now: i64, group: MulticastGroup, member: Address) {
        if member == self.own {
            return;
        }
        self.groups.add(self.nwid, group, member, now);
        // Queued multicasts reach members learned later.
        let mut sends = Vec::new();
        for (i, q) in self.queued.iter_mut().enumerate() {
            if q.group == group
                && now - q.created < MULTICAST_QUEUE_TTL
                && q.sent_to.len() < q.limit
                && !q.sent_to.contains(&member)
            {
                q.sent_to.push(member);
                sends.push(i);
            }
        }
        for i in sends {
            if let Some(q) = self.queued.get(i).cloned() {
                self.multicast_copy(now, member, &q, q.gather_limit);
            }
        }
    }

    fn on_gather(
        &mut self,
        now: i64,
        from: Address,
        packet_id: u64,
        payload: &[u8],
        dir: &dyn Directory,
    ) {
        let Some(g) = self.for_this_network(Gather::decode(payload), |g| g.nwid) else {
            return;
        };
        if let Some(com) = g.com {
            self.add_com(com, dir);
        }
        if g.limit > 0 && self.gate_and_announce(now, from) {
            self.answer_gather(
                from,
                packet_id,
                Verb::MULTICAST_GATHER,
                g.group,
                g.limit,
                None,
            );
        }
    }

    fn answer_gather(
        &mut self,
        to: Address,
        packet_id: u64,
        verb: Verb,
        group: MulticastGroup,
        limit: u32,
        frame_flags: Option<u8>,
    ) {
        let own = self.subscriptions.contains(&group).then_some(self.own);
        let rng = &mut self.rng;
        let r = self
            .groups
            .gather(self.nwid, group, to, own, limit, &mut || xorshift(rng));
        if r.members.is_empty() {
            return;
        }
        let mut p = self.buf();
        in_re(verb.0, packet_id, &mut p);
        write_gather_result(&r, frame_flags, &mut p);
        self.send(to, Verb::OK, p);
    }

    fn on_multicast_frame(
        &mut self,
        now: i64,
        from: Address,
        packet_id: u64,
        payload: &[u8],
        dir: &dyn Directory,
    ) {
        let Some((h, data)) =
            self.for_this_network(MulticastFrameHeader::decode(payload), |(h, _)| h.nwid)
        else {
            return;
        };
        let Some(limit) = self.config.as_ref().map(|c| c.multicast_limit) else {
            return self.drop(DropReason::NoConfig);
        };
        if let Some(com) = h.com.clone() {
            self.add_com(com, dir);
        }
        if !self.gate_and_announce(now, from) {
            return self.need_credentials(from, Verb::MULTICAST_FRAME, packet_id);
        }
        if limit == 0 {
            return self.drop(DropReason::MulticastDisabled);
        }
        if !data.is_empty() && data.len() <= MAX_FRAME_PAYLOAD {
            let source = h.source.unwrap_or(Mac::from_address(from, self.nwid));
            let dest = h.group.mac;
            if !dest.is_multicast()
                || source.is_zero()
                || source.is_multicast()
                || source == self.mac
            {
                return self.drop(DropReason::BadMac);
            }
            if source != Mac::from_address(from, self.nwid) {
                if self.is_bridge(from) {
                    self.learn_route(source, from);
                } else {
                    return self.drop(DropReason::NotBridge);
                }
            }
            let frame = Frame {
                source_mac: source,
                dest_mac: dest,
                ethertype: h.ethertype,
                vlan_id: 0,
                payload: data,
            };
            if self.inbound(from, &frame) > 0 {
                self.deliver(dest, source, h.ethertype, data);
            }
        }
        if let Some(g) = h.gather_limit.filter(|g| *g > 0) {
            self.answer_gather(
                from,
                packet_id,
                Verb::MULTICAST_FRAME,
                h.group,
                g,
                Some(0x02),
            );
        }
    }

    fn on_ok(&mut self, now: i64, from: Address, payload: &[u8], dir: &dyn Directory) {
        let Ok((verb, packet_id, body)) = split_in_re(payload) else {
            return self.drop(DropReason::Malformed);
        };
        match Verb(verb) {
            Verb::NETWORK_CONFIG_REQUEST if from == self.controller() => {
                self.on_chunk(now, from, packet_id, body, false, dir);
            }
            Verb::MULTICAST_GATHER => {
                if let Ok(r) = GatherResult::decode(body)
                    && r.nwid == self.nwid
                {
                    for a in r.members {
                        self.add_member(now, r.group, a);
                    }
                }
            }
            Verb::MULTICAST_FRAME => self.on_ok_multicast_frame(now, body, dir),
            _ => {}
        }
    }

    fn on_ok_multicast_frame(&mut self, now: i64, body: &[u8], dir: &dyn Directory) {
        let mut r = Reader::new(body);
        let Ok(nwid) = r.u64() else { return };
        if NetworkId::from(nwid) != self.nwid {
            return;
        }
        let (Ok(g), Ok(flags)) = (r.array::<10>(), r.u8()) else {
            return;
        };
        let group = MulticastGroup::from_bytes(g);
        if flags & 1 != 0 {
            match CertificateOfMembership::decode(&mut r) {
                Ok(c) => self.add_com(c, dir),
                Err(_) => return,
            }
        }
        if flags & 2 != 0 {
            let (Ok(_total), Ok(n)) = (r.u32(), r.u16()) else {
                return;
            };
            for _ in 0..n {
                let Ok(a) = r.address() else { return };
                self.add_member(now, group, a);
            }
        }
    }

    fn on_error(&mut self, now: i64, from: Address, payload: &[u8]) {
        let Ok((verb, _, body)) = split_in_re(payload) else {
            return self.drop(DropReason::Malformed);
        };
        let Some(e) = self.for_this_network(Vl2Error::decode(body), |e| e.nwid) else {
            return;
        };
        let from_controller = from == self.controller();
        if from_controller
            && verb == Verb::NETWORK_CONFIG_REQUEST.0
            && let Some(r) = self
                .release
                .as_mut()
                .filter(|r| r.state == Release::Pending)
        {
            r.state = if e.code == error_code::OBJ_NOT_FOUND {
                Release::Deleted
            } else {
                Release::Refused
            };
            return;
        }
        match e.code {
            error_code::OBJ_NOT_FOUND | error_code::UNSUPPORTED_OPERATION
                if from_controller && verb == Verb::NETWORK_CONFIG_REQUEST.0 =>
            {
                self.set_status(Status::NotFound)
            }
            error_code::NETWORK_ACCESS_DENIED if from_controller => {
                self.set_status(Status::AccessDenied)
            }
            error_code::NETWORK_AUTHENTICATION_REQUIRED if from_controller => {
                self.set_status(Status::AuthenticationRequired)
            }
            error_code::NEED_MEMBERSHIP_CERTIFICATE
                if self.config.as_ref().is_some_and(|c| c.com.is_some()) =>
            {
                self.push_if_needed(now, from, 1000);
            }
            error_code::UNWANTED_MULTICAST if e.extra.len() >= 10 && self.gate(from) => {
                let mut g = [0u8; 10];
                g.copy_from_slice(&e.extra[..10]);
                self.groups
                    .remove(self.nwid, MulticastGroup::from_bytes(g), from);
            }
            _ => {}
        }
    }

    // ----- config chunks ----------------------------------------------------------

    fn on_chunk(
        &mut self,
        now: i64,
        from: Address,
        packet_id: u64,
        body: &[u8],
        pushed: bool,
        dir: &dyn Directory,
    ) {
        let Ok(chunk) = ConfigChunk::decode(body, packet_id) else {
            return self.drop(DropReason::BadChunk);
        };
        if chunk.nwid != self.nwid {
            return;
        }
        let total = chunk.total_length as usize;
        if total >= CONFIG_CAPACITY || total == 0 {
            return self.drop(DropReason::BadChunk);
        }
        let slot_index = match chunk.signature {
            Some(sig) => {
                let mut id = [0u8; 8];
                for (i, b) in sig[..16].iter().enumerate() {
                    id[i % 8] ^= b;
                }
                let chunk_id = u64::from_be_bytes(id);
                let si = match self
                    .slots
                    .iter()
                    .position(|s| s.update_id == chunk.update_id && s.data.len() == total)
                {
                    Some(i) => {
                        if self.slots[i].chunk_ids.contains(&chunk_id) {
                            return self.drop(DropReason::BadChunk);
                        }
                        i
                    }
                    None => (0..SLOTS).min_by_key(|i| self.slots[*i].uses).unwrap_or(0),
                };
                let Some(ctl) = dir.identity(self.controller()) else {
                    return self.drop(DropReason::BadChunk);
                };
                if !chunk.verify(&ctl) {
                    return self.drop(DropReason::BadChunk);
                }
                if chunk.flags & 1 != 0 {
                    let fwd: Vec<Address> = self
                        .peers
                        .keys()
                        .copied()
                        .filter(|a| *a != from && *a != self.controller())
                        .collect();
                    for a in fwd {
                        let mut p = self.buf();
                        p.extend_from_slice(body);
                        self.send(a, Verb::NETWORK_CONFIG, p);
                    }
                }
                self.prepare_slot(si, chunk.update_id, total);
                let s = &mut self.slots[si];
                if s.chunk_ids.len() > CONFIG_CAPACITY / 1024 {
                    return self.drop(DropReason::BadChunk);
                }
                s.chunk_ids.push(chunk_id);
                si
            }
            None => {
                if from != self.controller() {
                    return self.drop(DropReason::BadChunk);
                }
                let si = (0..SLOTS).min_by_key(|i| self.slots[*i].uses).unwrap_or(0);
                self.prepare_slot(si, chunk.update_id, total);
                si
            }
        };
        let s = &mut self.slots[slot_index];
        let at = chunk.index as usize;
        let Some(dst) = s.data.get_mut(at..at + chunk.data.len()) else {
            return self.drop(DropReason::BadChunk);
        };
        dst.copy_from_slice(&chunk.data);
        s.received += chunk.data.len();
        if s.received != total {
            return;
        }
        let data = std::mem::take(&mut s.data);
        *s = Slot::default();
        match NetworkConfig::decode(&data) {
            Ok(cfg) => {
                if self.apply_config(now, cfg) && pushed {
                    let mut p = self.buf();
                    // Reference quirk: the OK to a NETWORK_CONFIG push names ECHO as in-re verb.
                    in_re(Verb::ECHO.0, packet_id, &mut p);
                    p.extend_from_slice(&self.nwid.to_bytes());
                    p.extend_from_slice(&chunk.update_id.to_be_bytes());
                    self.send(from, Verb::OK, p);
                }
            }
            Err(_) => self.drop(DropReason::BadConfig),
        }
    }

    fn prepare_slot(&mut self, si: usize, update_id: u64, total: usize) {
        self.slot_counter += 1;
        let s = &mut self.slots[si];
        if s.update_id != update_id || s.data.len() != total {
            *s = Slot {
                update_id,
                chunk_ids: Vec::new(),
                data: vec![0; total],
                received: 0,
                uses: 0,
            };
        }
        s.uses = self.slot_counter;
    }

    /// Applies a config (§13.2); returns whether it was accepted.
    fn apply_config(&mut self, now: i64, cfg: NetworkConfig) -> bool {
        if cfg.issued_to != self.own || cfg.network_id != self.nwid {
            self.drop(DropReason::BadConfig);
            return false;
        }
        let changed = self.config.as_ref() != Some(&cfg);
        if changed {
            self.config = Some(cfg);
            self.last_config_change = now;
            self.event(NetworkEvent::ConfigChanged);
        }
        if self.status != Status::PortError {
            self.set_status(Status::Ok);
        }
        if changed {
            self.refresh_subscriptions(now);
        }
        true
    }

    // ----- credentials ------------------------------------------------------------

    fn on_credentials(&mut self, now: i64, from: Address, payload: &[u8], dir: &dyn Directory) {
        let Ok(c) = CredentialsPayload::decode(payload) else {
            return self.drop(DropReason::Malformed);
        };
        let last = self
            .peers
            .get(&from)
            .map_or(i64::MIN / 2, |r| r.last_credentials);
        if now - last < 1000 {
            return self.drop(DropReason::RateLimited);
        }
        if let Some(r) = self.record(from) {
            r.last_credentials = now;
        }
        if self.config.is_none() {
            return;
        }
        for com in c.coms {
            self.add_com(com, dir);
        }
        let Some(ctl) = dir.identity(self.controller()) else {
            return;
        };
        for cap in c.capabilities {
            self.add_held(cap, &ctl);
        }
        for t in c.tags {
            self.add_held(t, &ctl);
        }
        for coo in c.coos {
            self.add_held(coo, &ctl);
        }
        for r in c.revocations {
            self.add_revocation(now, from, r, &ctl);
        }
    }

    fn add_com(&mut self, com: CertificateOfMembership, dir: &dyn Directory) {
        if com.network_id() != Some(self.nwid) {
            return;
        }
        let (Some(to), Some(ts)) = (com.issued_to(), com.timestamp()) else {
            return;
        };
        if let Some(r) = self.peers.get(&to) {
            if ts as i64 <= r.com_revoked_at {
                return self.drop(DropReason::BadCredential);
            }
            if let Some(old) = &r.com {
                if *old == com {
                    return;
                }
                if old.timestamp().unwrap_or(0) > ts {
                    return self.drop(DropReason::BadCredential);
                }
            }
        }
        let (Some(ctl), Some(holder)) = (dir.identity(self.controller()), dir.identity(to)) else {
            return;
        };
        if holder.address() != to || !com.verify(&ctl) {
            return self.drop(DropReason::BadCredential);
        }
        if let Some(r) = self.record(to) {
            r.com = Some(com);
            r.key = Some(*holder.public_key());
        }
    }

    /// Stores a tag, capability or certificate of ownership unless it is for another
    /// network, older than the one held, revoked, or not signed by the controller.
    fn add_held<C: HeldCredential>(&mut self, c: C, ctl: &Identity) {
        let Some(holder) = c.holder() else { return };
        if c.nwid() != self.nwid {
            return;
        }
        let (id, ts) = (c.id(), c.timestamp());
        let ok = self.peers.get_mut(&holder).is_none_or(|r| {
            C::held(r).get(&id).is_none_or(|o| o.timestamp() <= ts)
                && r.revoked_at(C::TYPE, id) < ts
        });
        if !ok || !c.verified_by(ctl) {
            return self.drop(DropReason::BadCredential);
        }
        if let Some(r) = self.record(holder) {
            C::held(r).insert(id, c);
        }
    }

    fn add_revocation(&mut self, now: i64, from: Address, rev: Revocation, ctl: &Identity) {
        if rev.nwid != self.nwid || !rev.verify(ctl) {
            return self.drop(DropReason::BadCredential);
        }
        let Some(r) = self.record(rev.target) else {
            return;
        };
        let newly = match CredentialType::from_u8(rev.credential_type) {
            Some(CredentialType::Com) => {
                let n = rev.threshold > r.com_revoked_at;
                if n {
                    r.com_revoked_at = rev.threshold;
                }
                n
            }
            Some(t @ (CredentialType::Capability | CredentialType::Tag | CredentialType::Coo)) => {
                let e = r
                    .revoked
                    .entry((t as u8, rev.credential_id))
                    .or_insert(i64::MIN);
                let n = rev.threshold > *e;
                if n {
                    *e = rev.threshold;
                    // Reference quirk: any credential revocation also raises the COM threshold.
                    r.com_revoked_at = rev.threshold;
                }
                n
            }
            _ => false,
        };
        if !newly {
            return;
        }
        let _ = now;
        self.event(NetworkEvent::PeerRevoked(rev.target));
        if rev.flags & Revocation::FAST_PROPAGATE != 0 {
            let fwd: Vec<Address> = self
                .peers
                .keys()
                .copied()
                .filter(|a| *a != from && *a != rev.signed_by && *a != self.own)
                .collect();
            let mut body = self.buf();
            CredentialsPayload::revocation(rev).encode(&mut body);
            for a in fwd {
                let mut p = self.buf();
                p.extend_from_slice(&body);
                self.send(a, Verb::NETWORK_CREDENTIALS, p);
            }
            self.recycle(body);
        }
    }

    // ----- frames from the TAP ----------------------------------------------------

    /// Processes one Ethernet frame read from the TAP (`dst, src, ethertype, payload`;
    /// VLAN tags are not interpreted). Call for every frame the host port emits.
    pub fn handle_tap_frame(&mut self, now: i64, frame: &[u8]) {
        if self.left || self.config.is_none() {
            return self.drop(DropReason::NoConfig);
        }
        if frame.len() < 14 {
            return self.drop(DropReason::Malformed);
        }
        if self
            .config
            .as_ref()
            .is_some_and(|c| frame.len() - 14 > c.mtu as usize)
        {
            return self.drop(DropReason::TooBig);
        }
        let mut d = [0u8; 6];
        let mut s = [0u8; 6];
        d.copy_from_slice(&frame[0..6]);
        s.copy_from_slice(&frame[6..12]);
        let (dest, source) = (Mac(d), Mac(s));
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        let payload = &frame[14..frame.len().min(14 + MAX_FRAME_PAYLOAD)];
        let bridged = source != self.mac;
        if bridged && !self.is_bridge(self.own) {
            return self.drop(DropReason::NotBridge);
        }
        let fr = Frame {
            source_mac: source,
            dest_mac: dest,
            ethertype,
            vlan_id: 0,
            payload,
        };
        if dest.is_multicast() {
            return self.tap_multicast(now, &fr, bridged);
        }
        if dest == self.mac {
            self.deliver(dest, source, ethertype, payload);
            return;
        }
        if let Some(to) = dest.to_address(self.nwid) {
            let Some(dec) = self.outbound(to.to_u64(), false, &fr) else {
                return;
            };
            if dec.redirect.is_none() {
                self.push_if_needed(now, to, PUSH_PERIOD);
                if bridged {
                    self.send_ext_frame(to, 0, &fr, payload);
                } else {
                    let mut p = self.buf();
                    FrameHeader {
                        nwid: self.nwid,
                        ethertype,
                    }
                    .encode(&mut p);
                    p.extend_from_slice(payload);
                    self.send(to, Verb::FRAME, p);
                }
            }
            return;
        }
        // Bridge path: a MAC that is not a member MAC of this network.
        let Some(dec) = self.outbound(0, false, &fr) else {
            return;
        };
        if dec.redirect.is_some() {
            return;
        }
        let route = self
            .bridge_routes
            .get(&dest)
            .copied()
            .filter(|b| *b != self.own && self.is_bridge(*b));
        let targets: Vec<Address> = match route {
            Some(b) => vec![b],
            None => {
                let mut v = self.active_bridges();
                v.retain(|a| *a != self.own);
                let rng = &mut self.rng;
                shuffle(&mut v, rng);
                v.truncate(MAX_BRIDGE_COPIES);
                v
            }
        };
        for b in targets {
            if self.outbound(b.to_u64(), true, &fr).is_none() {
                continue;
            }
            self.push_if_needed(now, b, PUSH_PERIOD);
            self.send_ext_frame(b, 0, &fr, payload);
        }
    }

    /// Outbound filter; sends TEE/REDIRECT copies; `None` when the frame must not go.
    fn outbound(&mut self, zt_dest: u64, no_tee: bool, fr: &Frame<'_>) -> Option<FilterDecision> {
        let cfg = self.config.as_ref()?;
        let peer = Address::new(zt_dest).ok().and_then(|a| self.peers.get(&a));
        let d = outbound_filter(
            cfg,
            peer,
            self.own,
            self.opts.semantics,
            &mut self.rng,
            zt_dest,
            no_tee,
            fr,
        );
        self.rule_hits.record(false, &d);
        for c in [d.copy, d.redirect].into_iter().flatten() {
            self.send_copy(c, fr);
        }
        if d.accept == 0 && d.redirect.is_none() {
            self.drop(DropReason::RulesOutbound);
            return None;
        }
        Some(d)
    }

    fn tap_multicast(&mut self, now: i64, fr: &Frame<'_>, bridged: bool) {
        let Some(cfg) = &self.config else { return };
        let group = MulticastGroup::for_outbound(fr.dest_mac, fr.ethertype, fr.payload);
        if fr.dest_mac.is_broadcast()
            && group == MulticastGroup::BROADCAST
            && cfg.flags & FLAG_ENABLE_BROADCAST == 0
        {
            return self.drop(DropReason::MulticastDisabled);
        }
        if cfg.multicast_limit == 0 {
            return self.drop(DropReason::MulticastDisabled);
        }
        if bridged && self.bridged_groups.insert(group) {
            self.refresh_subscriptions(now);
        }
        if self.outbound(0, false, fr).is_none() {
            return;
        }
        self.multicast_send(
            now,
            None,
            group,
            bridged.then_some(fr.source_mac),
            fr.ethertype,
            fr.payload,
        );
    }

    fn active_bridges(&self) -> Vec<Address> {
        self.config
            .as_ref()
            .map(|c| {
                c.specialists
                    .iter()
                    .filter(|s| **s & crate::netconf::SPECIALIST_ACTIVE_BRIDGE != 0)
                    .filter_map(|s| Address::new(s & 0xff_ffff_ffff).ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// §12.5 without replicators.
    fn multicast_send(
        &mut self,
        now: i64,
        origin: Option<Address>,
        group: MulticastGroup,
        source: Option<Mac>,
        ethertype: u16,
        payload: &[u8],
    ) {
        let limit = self.config.as_ref().map_or(0, |c| c.multicast_limit) as usize;
        let bridges = self.active_bridges();
        let known = self
            .groups
            .members(self.nwid, group)
            .into_iter()
            .filter(|a| *a != self.own)
            .count();
        let rng = &mut self.rng;
        let recipients = self.groups.recipients(
            self.nwid,
            group,
            limit,
            &bridges,
            self.own,
            origin,
            &mut || xorshift(rng),
        );
        let gather_limit = if known >= limit {
            1
        } else {
            (limit - known + 1) as u32
        };
        let mut q = QueuedMulticast {
            created: now,
            group,
            source,
            ethertype,
            payload: payload.to_vec(),
            gather_limit,
            sent_to: origin.into_iter().collect(),
            limit,
        };
        if known < limit {
            let due = known == 0
                || self
                    .last_gather
                    .get(&group)
                    .is_none_or(|t| now - t >= GATHER_PERIOD);
            if due {
                self.last_gather.insert(group, now);
                let com = self.config.as_ref().and_then(|c| c.com.clone());
                let g = Gather {
                    nwid: self.nwid,
                    group,
                    limit: gather_limit,
                    com,
                }
                .encode();
                let mut targets = self.upstreams.clone();
                targets.push(self.controller());
                targets.truncate(16);
                for t in targets {
                    self.send(t, Verb::MULTICAST_GATHER, g.clone());
                }
            }
        }
        for r in &recipients {
            q.sent_to.push(*r);
            self.multicast_copy(now, *r, &q, gather_limit);
        }
        if known < limit {
            if self.queued.len() >= MAX_QUEUED_MULTICASTS {
                self.queued.pop_front();
            }
            self.queued.push_back(q);
        }
    }

    fn multicast_copy(&mut self, now: i64, to: Address, q: &QueuedMulticast, gather_limit: u32) {
        if to == self.own {
            return;
        }
        let fr = Frame {
            source_mac: q.source.unwrap_or(self.mac),
            dest_mac: q.group.mac,
            ethertype: q.ethertype,
            vlan_id: 0,
            payload: &q.payload,
        };
        if self.outbound(to.to_u64(), true, &fr).is_none() {
            return;
        }
        self.push_if_needed(now, to, PUSH_PERIOD);
        let h = MulticastFrameHeader {
            nwid: self.nwid,
            flags: 0,
            com: None,
            gather_limit: Some(gather_limit),
            source: q.source,
            group: q.group,
            ethertype: q.ethertype,
        };
        let mut p = self.buf();
        h.encode(&mut p);
        p.extend_from_slice(&q.payload);
        self.send(to, Verb::MULTICAST_FRAME, p);
    }
}

fn shuffle<T>(v: &mut [T], rng: &mut u64) {
    for i in (1..v.len()).rev() {
        let j = (xorshift(rng) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Writes a gather answer: `nwid, group, [flags], u32 total, u16 n, n × addr5`.
fn write_gather_result(r: &GatherResult, frame_flags: Option<u8>, out: &mut Vec<u8>) {
    out.extend_from_slice(&r.nwid.to_bytes());
    out.extend_from_slice(&r.group.to_bytes());
    if let Some(f) = frame_flags {
        out.push(f);
    }
    out.extend_from_slice(&r.total_known.to_be_bytes());
    out.extend_from_slice(&(r.members.len() as u16).to_be_bytes());
    for a in &r.members {
        out.extend_from_slice(&a.to_bytes());
    }
}

/// The multicast directory of a root or controller: stores LIKEs from `authorized`
/// senders and answers GATHERs (§5.3, §5.7, §12.3).
#[derive(Debug, Default)]
pub struct Upstream {
    groups: GroupMembers,
    rng: u64,
}

impl Upstream {
    /// An empty directory with a PRNG seed.
    pub fn new(seed: u64) -> Self {
        Self {
            groups: GroupMembers::default(),
            rng: seed | 1,
        }
    }

    /// Handles MULTICAST_LIKE / MULTICAST_GATHER (other verbs are ignored); returns the
    /// OK payloads to send back to `from`. `authorized(nwid, from)` decides whether the
    /// sender may subscribe/query (roots: always; controllers: authorized members).
    pub fn handle_packet(
        &mut self,
        now: i64,
        from: Address,
        verb: Verb,
        packet_id: u64,
        payload: &[u8],
        authorized: &dyn Fn(NetworkId, Address) -> bool,
    ) -> Option<Vec<u8>> {
        match verb {
            Verb::MULTICAST_LIKE => {
                for (nwid, g) in decode_likes(payload).ok()? {
                    if authorized(nwid, from) {
                        self.groups.add(nwid, g, from, now);
                    }
                }
                None
            }
            Verb::MULTICAST_GATHER => {
                let g = Gather::decode(payload).ok()?;
                if g.limit == 0 || !authorized(g.nwid, from) {
                    return None;
                }
                let rng = &mut self.rng;
                let r = self
                    .groups
                    .gather(g.nwid, g.group, from, None, g.limit, &mut || xorshift(rng));
                if r.members.is_empty() {
                    return None;
                }
                let mut p = Vec::new();
                in_re(Verb::MULTICAST_GATHER.0, packet_id, &mut p);
                write_gather_result(&r, None, &mut p);
                Some(p)
            }
            _ => None,
        }
    }

    /// Drops expired LIKEs. Call every 30 s.
    pub fn expire(&mut self, now: i64) {
        self.groups.expire(now);
    }

    /// Members of a group.
    pub fn members(&self, nwid: NetworkId, group: MulticastGroup) -> Vec<Address> {
        self.groups.members(nwid, group)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;
    use crate::ip::{InetAddress, rfc4193, sixplane};

    fn likes_to(out: &[Output], to: Address) -> BTreeSet<MulticastGroup> {
        out.iter()
            .filter_map(|o| match o {
                Output::Send {
                    to: t,
                    verb: Verb::MULTICAST_LIKE,
                    payload,
                } if *t == to => Some(decode_likes(payload).unwrap()),
                _ => None,
            })
            .flatten()
            .map(|(_, g)| g)
            .collect()
    }

    #[test]
    fn members_subscribe_to_the_address_resolution_groups_of_their_ips() {
        let own = Address::new(0x89_e92c_eee5).unwrap();
        let root = Address::new(0x77_7777_7777).unwrap();
        let nwid: NetworkId = "8056c2e21c000001".parse().unwrap();
        let mut n = Network::join(own, nwid, MemberOptions::default(), 1000);
        n.set_upstreams(vec![root]);
        while n.poll_output().is_some() {}

        let v4 = Ipv4Addr::new(10, 9, 0, 17);
        let pool6: Ipv6Addr = "fd00:feed::12:3456".parse().unwrap();
        let (r6, p6) = (rfc4193(nwid, own), sixplane(nwid, own));
        let mut cfg = NetworkConfig {
            network_id: nwid,
            issued_to: own,
            timestamp: 1000,
            multicast_limit: 32,
            static_ips: vec![
                InetAddress::new(IpAddr::V4(v4), 24),
                InetAddress::new(IpAddr::V6(pool6), 64),
                InetAddress::new(IpAddr::V6(r6), 88),
                InetAddress::new(IpAddr::V6(p6), 40),
            ],
            ..NetworkConfig::default()
        };
        assert!(n.apply_config(2000, cfg.clone()));
        let out: Vec<Output> = std::iter::from_fn(|| n.poll_output()).collect();

        // ZeroTier's deriveMulticastGroupForAddressResolution: IPv6 groups are the
        // solicited-node MAC 33:33:ff + the last three address bytes, with ADI 0.
        let ndp = |ip: Ipv6Addr| {
            let o = ip.octets();
            MulticastGroup::new(Mac([0x33, 0x33, 0xff, o[13], o[14], o[15]]), 0)
        };
        let want: BTreeSet<MulticastGroup> = [
            MulticastGroup::new(Mac::BROADCAST, u32::from(v4)),
            ndp(pool6),
            ndp(r6),
            ndp(p6),
        ]
        .into_iter()
        .collect();
        assert_eq!(
            n.subscriptions, want,
            "no broadcast group: broadcast is off"
        );
        assert_eq!(ndp(pool6).mac, Mac([0x33, 0x33, 0xff, 0x12, 0x34, 0x56]));
        // Announced at once to the root and the controller.
        assert_eq!(likes_to(&out, root), want);
        assert_eq!(likes_to(&out, nwid.controller()), want);

        // A changed address: the new group is announced, the old one is no longer held.
        let moved: Ipv6Addr = "fd00:feed::ab:cdef".parse().unwrap();
        cfg.static_ips[1] = InetAddress::new(IpAddr::V6(moved), 64);
        cfg.revision += 1;
        assert!(n.apply_config(3000, cfg));
        let out: Vec<Output> = std::iter::from_fn(|| n.poll_output()).collect();
        assert!(n.subscriptions.contains(&ndp(moved)));
        assert!(!n.subscriptions.contains(&ndp(pool6)));
        assert_eq!(likes_to(&out, root), [ndp(moved)].into_iter().collect());
    }
}
