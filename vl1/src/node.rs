//! The sans-I/O VL1 node (spec 11, 12, 16, 17, 18).
//!
//! Feed it datagrams with [`Node::handle_datagram`] and the clock with
//! [`Node::handle_timeout`]; drain [`Node::poll_transmit`] and [`Node::poll_event`]; sleep
//! until [`Node::poll_timeout`]. Randomness (packet IDs) comes from a Salsa20 keystream
//! seeded once from the OS RNG.

#![allow(clippy::collapsible_if, clippy::too_many_arguments)]

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};

use crate::address::Address;
use crate::crypto::{self, CipherSuite, SymmetricKey};
use crate::identity::Identity;
use crate::reassembly::{Reassembler, ReassemblyLimits};
use crate::replay::ReplayWindow;
use crate::wire::{
    self, DEFAULT_MTU, ErrorBody, Hello, InReplyTo, OkHello, Packet, PathRecord, RELAY_MAX_HOPS,
    Rendezvous, Verb,
};
use crate::world::{World, WorldType};

/// Opaque identifier of the caller's local socket a datagram came in on / goes out of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct LocalSocket(pub u64);

/// Timing constants (ms).
pub mod timers {
    /// Ping scan period.
    pub const PING_CHECK: u64 = 5000;
    /// Heartbeat when nothing was sent on a path for this long.
    pub const PATH_HEARTBEAT: u64 = 14000;
    /// Full HELLO period.
    pub const PEER_PING: u64 = 60000;
    /// Path expiry without an authenticated receive.
    pub const PATH_EXPIRATION: u64 = 243000;
    /// WHOIS retry gap per address.
    pub const WHOIS_RETRY: u64 = 500;
    /// Lifetime of queued/parked packets.
    pub const QUEUE_TIMEOUT: u64 = 5000;
    /// Gap between introductions of one pair.
    pub const MIN_UNITE_INTERVAL: u64 = 30000;
    /// Wait between the NAT-opening datagram sent on a RENDEZVOUS and the contact
    /// (HELLO/ECHO) that follows it. The far side gets its copy of the introduction at about
    /// the same time and opens its own NAT then; a contact that reached that NAT first would
    /// leave an unsolicited entry there, and a Linux NAT then maps the far side's own flow
    /// to us to another port than the one the root announced, so hole punching fails for
    /// good. The wait covers the far side being a little late (busy, or farther from the
    /// root).
    pub const RENDEZVOUS_CONTACT_DELAY: u64 = 200;
    /// Peer activity window.
    pub const PEER_ACTIVITY: u64 = 500000;
    /// Identity verification gate per source prefix.
    pub const IDENTITY_VALIDATION: u64 = 2000;
    /// Inbound WHOIS gap per peer (non-roots).
    pub const WHOIS_RATE: u64 = 100;
    /// Inbound ECHO gap per path.
    pub const ECHO_RATE: u64 = 166;
    /// HELLO to confirm an unknown path, per path.
    pub const CONFIRM_PATH: u64 = 1000;
    /// PUSH_DIRECT_PATHS inbound window.
    pub const PUSH_CUTOFF: u64 = 30000;
    /// A root we send traffic through and have not heard from for this long gets an ECHO
    /// (at most one per this interval): relayed traffic itself never draws an answer from the
    /// root, and the keepalives ([`PATH_HEARTBEAT`]) alone notice a dead root only after
    /// up to 14 s.
    pub const ROOT_PROBE_IDLE: u64 = 2000;
    /// A root that left a probe unanswered this long counts as unreachable: traffic and
    /// WHOIS go to another root until it answers again.
    pub const ROOT_PROBE_TIMEOUT: u64 = 1000;
}

const QUEUE_LIMIT: usize = 32;
/// Identity validations allowed per source prefix per [`timers::IDENTITY_VALIDATION`]
/// window. 1.x allows one, which serializes a burst of new nodes behind one prefix (the pods
/// of a Kubernetes node share its IP; cluster nodes share a /24): each waits for its next
/// 5 s HELLO. A small budget keeps the CPU bound while letting such a burst in at once.
const IDENTITY_VALIDATION_BURST: u32 = 16;
const MAX_PATHS: usize = 64;
/// Default of [`NodeConfig::max_peers`] for a node that is not a root.
pub const MAX_PEERS: usize = 16_384;
/// Default of [`NodeConfig::max_peers`] for a root (it knows every node of its planet).
pub const ROOT_MAX_PEERS: usize = 1 << 20;
/// How long a peer must have been silent before a new one may take its slot (ms).
const IDLE_BEFORE_EVICTION: u64 = 30_000;
/// Identity validations (one 2 MiB memory-hard hash each) allowed in all per
/// [`timers::IDENTITY_VALIDATION`] window, whatever the source: the per-prefix budget alone
/// lets a sender with many prefixes spend the CPU.
const IDENTITY_VALIDATION_GLOBAL: u32 = 128;
const REPLY_TABLE: usize = 1024;

/// Why a datagram or packet was dropped. Counted per reason by [`Node::drops`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DropReason {
    /// Malformed framing (a cut packet or fragment, a bad fragment number, ...).
    Malformed,
    /// A datagram of at most [`wire::FRAGMENT_HEADER_LEN`] bytes: too short to be a fragment
    /// or a packet. ZeroTier One's NAT-opening probes (4 random bytes) are such datagrams;
    /// ZeroTier One ignores them all, and so does the node, counting them here.
    Runt,
    /// Source is one of our own addresses.
    FromSelf,
    /// Not for us and we do not relay.
    NotForUs,
    /// Relay hop limit reached.
    HopLimit,
    /// No path to relay or send to.
    NoPath,
    /// Fragment reassembly refused the piece.
    Reassembly,
    /// MAC check failed.
    MacFailed,
    /// Trusted-path or unassigned cipher suite.
    BadCipherSuite,
    /// LZ4 decompression failed.
    Decompress,
    /// Verb payload did not parse.
    BadPayload,
    /// Identity failed validation or mismatched its address.
    BadIdentity,
    /// A rate limit refused expensive or repeated work.
    RateLimited,
    /// OK for a packet we never sent.
    UnexpectedReply,
    /// Protocol version too old.
    OldProtocol,
    /// A parked or queued packet timed out or overflowed.
    QueueOverflow,
    /// A message that is accepted only from roots came from elsewhere.
    NotFromRoot,
    /// Suite 2 (trusted path) from an address/ID pair that is not configured as trusted.
    UntrustedPath,
    /// The caller's buffer given to [`Node::poll_transmit`] could not hold a datagram.
    BufferTooSmall,
    /// An authenticated packet whose ID was seen recently from the same peer (a duplicate
    /// or a replay).
    Duplicate,
    /// A world update from a root that is newer but not signed by the current world's key.
    BadWorld,
}

/// A datagram to send; its bytes were copied into the buffer given to
/// [`Node::poll_transmit`] (the first `len` bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    /// Local socket to send from.
    pub local_socket: LocalSocket,
    /// Destination address.
    pub to: SocketAddr,
    /// Length of the UDP payload in the caller's buffer.
    pub len: usize,
    /// IP TTL / hop limit to send with, when it must differ from the socket's default
    /// (1.x sends the 4-byte NAT-opening datagram before a RENDEZVOUS contact with TTL 2).
    pub ttl: Option<u8>,
}

/// Largest datagram the node ever emits: a caller buffer of this size always suffices.
pub const MAX_DATAGRAM_LEN: usize = wire::MAX_PACKET_LEN;

/// A queued datagram; its buffer returns to the node's pool once copied out.
#[derive(Debug)]
struct Outgoing {
    socket: LocalSocket,
    to: SocketAddr,
    ttl: Option<u8>,
    data: Vec<u8>,
}

/// Most spare buffers kept for reuse.
const POOL_LIMIT: usize = 256;

/// A physical network on which packets go unencrypted and unauthenticated (suite 2, spec
/// 7.5 and 20): both ends must configure the same non-zero ID for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrustedPath {
    /// Network address (host bits are ignored).
    pub network: IpAddr,
    /// Prefix length in bits.
    pub prefix_len: u8,
    /// The trusted path ID (non-zero).
    pub id: u64,
}

impl TrustedPath {
    /// Whether `ip` lies inside this network (same family only).
    pub fn contains(&self, ip: IpAddr) -> bool {
        fn masked(a: u128, b: u128, bits: u32, len: u8) -> bool {
            let len = u32::from(len).min(bits);
            if len == 0 {
                return true;
            }
            let shift = bits - len;
            (a >> shift) == (b >> shift)
        }
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => masked(
                u128::from(u32::from(n)),
                u128::from(u32::from(a)),
                32,
                self.prefix_len,
            ),
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                masked(u128::from(n), u128::from(a), 128, self.prefix_len)
            }
            _ => false,
        }
    }
}

/// Counters of control work done (for logs, metrics and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeStats {
    /// WHOIS requests answered with at least one identity.
    pub whois_answered: u64,
    /// Packets and fragments forwarded for others.
    pub relayed: u64,
    /// Bytes of the packets and fragments forwarded for others (UDP payload).
    pub relayed_bytes: u64,
    /// New peers refused because the peer table was full of active peers.
    pub peers_refused: u64,
    /// Peers forgotten to make room for new ones (the table was full).
    pub peers_evicted: u64,
    /// RENDEZVOUS messages sent (introductions, two per pair).
    pub rendezvous_sent: u64,
    /// Authenticated HELLOs received.
    pub hellos_received: u64,
    /// ERROR(IDENTITY_COLLISION) replies sent.
    pub collisions_reported: u64,
    /// Packets sent in the clear over a trusted path (suite 2).
    pub trusted_sent: u64,
    /// Packets accepted from a trusted path (suite 2).
    pub trusted_received: u64,
    /// Identity validations spent on HELLOs from unknown (or colliding) identities: each is
    /// a memory-hard hash (about 15 ms of CPU), the cost of a peer's first contact.
    pub identity_validations: u64,
}

/// Something the host should know about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer's identity became known to local identity `local`.
    PeerLearned {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// The root whose OK(WHOIS) taught it, or `None` when the peer sent a HELLO.
        via: Option<Address>,
    },
    /// An authenticated HELLO arrived (and was answered with OK(HELLO)).
    HelloReceived {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// Where it came from.
        addr: SocketAddr,
        /// Relay hops it took.
        hops: u8,
        /// The peer's protocol version.
        protocol_version: u8,
        /// The peer's software version (major, minor, revision).
        software: (u8, u8, u16),
    },
    /// An ECHO arrived from a peer (and was answered unless rate-limited).
    EchoReceived {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// Where it came from.
        addr: SocketAddr,
        /// Relay hops it took.
        hops: u8,
    },
    /// An OK(ECHO) answered one of our ECHOs.
    EchoReply {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// The echoed payload.
        payload: Vec<u8>,
    },
    /// A root told us another identity holds our address (ERROR IDENTITY_COLLISION):
    /// 1.x treats this as fatal for the node.
    IdentityCollision {
        /// Our identity's address.
        local: Address,
        /// The root that reported it.
        root: Address,
    },
    /// A direct path to a peer was confirmed.
    PathLearned {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// Its physical address.
        addr: SocketAddr,
    },
    /// An authenticated packet for the layer above (VL2 verbs, USER_MESSAGE, OK/ERROR
    /// for VL2 verbs and unknown verbs). `payload` is after the verb byte, decompressed.
    Packet {
        /// Our identity's address.
        local: Address,
        /// Sender.
        from: Address,
        /// Verb.
        verb: Verb,
        /// Packet ID.
        packet_id: u64,
        /// Payload.
        payload: Vec<u8>,
    },
    /// An OK(ECHO) or OK(HELLO) measured the latency to a peer.
    Latency {
        /// Our identity's address.
        local: Address,
        /// The peer.
        peer: Address,
        /// Round trip in ms.
        ms: u64,
    },
    /// A root pushed a newer planet, signed as the current one requires; it is in force now
    /// (persist it so a restart keeps it).
    PlanetUpdated {
        /// The new planet.
        planet: World,
    },
    /// A root reported our external address.
    ExternalAddress {
        /// Our identity's address.
        local: Address,
        /// Address as seen by the remote.
        addr: SocketAddr,
    },
}

/// Errors from the sending API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The sender is not a local identity.
    #[error("not a local identity")]
    UnknownLocal,
    /// The local identity has no secret key.
    #[error("local identity has no secret")]
    NoSecret,
    /// Payload too large for a packet.
    #[error("payload too large")]
    TooLarge,
    /// Two local identities share an address.
    #[error("two local identities share an address")]
    DuplicateLocal,
    /// The OS random number generator failed (seeding the packet ID generator).
    #[error("OS random number generator failed")]
    Random,
}

/// How an offered planet compares with the one in force, when the world update rule
/// accepts it (see [`check_planet_update`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanetChange {
    /// It is the planet in force: nothing changes.
    Same,
    /// It replaces the planet in force.
    Newer,
}

/// Why the world update rule refuses a planet (see [`check_planet_update`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanetRefused {
    /// Another world (ID or type), or a null world.
    #[error("it is world {offered_id} ({offered_type:?}), ours is world {id} ({world_type:?})")]
    OtherWorld {
        /// The offered world's ID.
        offered_id: u64,
        /// The offered world's type.
        offered_type: WorldType,
        /// Our world's ID.
        id: u64,
        /// Our world's type.
        world_type: WorldType,
    },
    /// Not newer than the planet in force.
    #[error("its timestamp {offered} is not newer than ours ({current})")]
    NotNewer {
        /// The offered planet's timestamp.
        offered: u64,
        /// The timestamp of the planet in force.
        current: u64,
    },
    /// Newer, but not signed by the key the planet in force names for updates.
    #[error("it is not signed by the key our planet names in updatesMustBeSignedBy")]
    BadSignature,
}

/// Judges `offered` against the planet in force, `current`, by ZeroTier's world update rule
/// ([`World::should_replace_with`]: same type and ID, newer timestamp, signed by `current`'s
/// `updatesMustBeSignedBy` key; anything replaces a null world) and says why a refused one
/// is refused. The one place where flatwire decides on planet updates: [`Node`] uses it for
/// planets pushed by roots and for [`Node::offer_planet`], the agent for stored planets.
pub fn check_planet_update(
    current: &World,
    offered: &World,
) -> Result<PlanetChange, PlanetRefused> {
    if current == offered {
        return Ok(PlanetChange::Same);
    }
    if current.should_replace_with(offered) {
        return Ok(PlanetChange::Newer);
    }
    if offered.world_type == WorldType::Null
        || offered.world_type != current.world_type
        || offered.id != current.id
    {
        Err(PlanetRefused::OtherWorld {
            offered_id: offered.id,
            offered_type: offered.world_type,
            id: current.id,
            world_type: current.world_type,
        })
    } else if offered.timestamp <= current.timestamp {
        Err(PlanetRefused::NotNewer {
            offered: offered.timestamp,
            current: current.timestamp,
        })
    } else {
        Err(PlanetRefused::BadSignature)
    }
}

/// Node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The planet (roots).
    pub planet: World,
    /// Physical MTU.
    pub mtu: usize,
    /// Whether to relay packets addressed to others even when not a root.
    pub relay_always: bool,
    /// Trusted physical networks (suite 2), at most 32 as in 1.x.
    pub trusted_paths: Vec<TrustedPath>,
    /// Most peers one local identity keeps ([`MAX_PEERS`], or [`ROOT_MAX_PEERS`] when the
    /// node is a root of `planet`). A full table makes room for a new peer (HELLO or WHOIS
    /// answer) by forgetting the longest-silent non-root peer, and only one silent for
    /// 30 s or more; otherwise the newcomer is refused (a counted drop). So a flood of
    /// HELLOs from fresh identities can neither grow memory without bound nor push out
    /// peers that are talking.
    pub max_peers: Option<usize>,
}

impl NodeConfig {
    /// Default configuration with `planet`.
    pub fn new(planet: World) -> Self {
        Self {
            planet,
            mtu: DEFAULT_MTU,
            relay_always: false,
            trusted_paths: Vec::new(),
            max_peers: None,
        }
    }
}

#[derive(Debug, Clone)]
struct PathEntry {
    socket: LocalSocket,
    addr: SocketAddr,
    last_receive: u64,
    last_send: u64,
    latency: Option<u64>,
}

#[derive(Debug)]
struct Peer {
    identity: Identity,
    key: SymmetricKey,
    proto: u8,
    paths: Vec<PathEntry>,
    last_receive: u64,
    last_hello: u64,
    last_whois_answered: u64,
    last_push_received: u64,
    push_count: u32,
    confirm_sent: HashMap<SocketAddr, u64>,
    echo_answered: HashMap<SocketAddr, u64>,
    is_root: bool,
    stable_endpoints: Vec<SocketAddr>,
    recent: ReplayWindow,
    compression: CompressionGate,
    /// When we last sent a root a liveness probe ([`timers::ROOT_PROBE_IDLE`]).
    probe_sent: u64,
    /// When the oldest probe still unanswered went out (0: none).
    probe_unanswered_since: u64,
}

/// Data frames in a row that LZ4 did not shrink before [`CompressionGate`] stops trying.
const COMPRESS_MISSES: u8 = 4;
/// Data frames sent uncompressed without trying between two tries once LZ4 keeps failing.
const COMPRESS_SKIP: u16 = 63;

/// Whether to try LZ4 on the next data frame to a peer. Traffic inside the tunnel is mostly
/// encrypted or already compressed, where every try costs CPU and never wins; a flow that
/// did not compress a few times in a row is unlikely to start (the adaptive skipping of
/// IPComp, RFC 3173 section 2.2). So after [`COMPRESS_MISSES`] misses in a row only one
/// frame in [`COMPRESS_SKIP`] + 1 is tried, and one that compresses resumes trying every frame.
/// Sending uncompressed is always valid: 1.x does the same when LZ4 does not help.
#[derive(Debug, Default)]
struct CompressionGate {
    misses: u8,
    skip: u16,
}

impl CompressionGate {
    /// Whether to try compressing this frame.
    fn should_try(&mut self) -> bool {
        if self.skip > 0 {
            self.skip -= 1;
            return false;
        }
        true
    }

    /// Records the outcome of a try.
    fn record(&mut self, compressed: bool) {
        if compressed {
            self.misses = 0;
        } else {
            self.misses = self.misses.saturating_add(1);
            if self.misses >= COMPRESS_MISSES {
                self.skip = COMPRESS_SKIP;
            }
        }
    }
}

impl Peer {
    fn new(identity: Identity, key: SymmetricKey) -> Self {
        Self {
            identity,
            key,
            proto: 0,
            paths: Vec::new(),
            last_receive: 0,
            last_hello: 0,
            last_whois_answered: 0,
            last_push_received: 0,
            push_count: 0,
            confirm_sent: HashMap::new(),
            echo_answered: HashMap::new(),
            recent: ReplayWindow::new(),
            compression: CompressionGate::default(),
            is_root: false,
            stable_endpoints: Vec::new(),
            probe_sent: 0,
            probe_unanswered_since: 0,
        }
    }

    /// Whether this root left a liveness probe unanswered for
    /// [`timers::ROOT_PROBE_TIMEOUT`] (it is down or unreachable).
    fn unresponsive(&self, now: u64) -> bool {
        self.probe_unanswered_since > self.last_receive
            && now.saturating_sub(self.probe_unanswered_since) >= timers::ROOT_PROBE_TIMEOUT
    }

    fn best_path(&self, now: u64, include_expired: bool) -> Option<&PathEntry> {
        self.paths
            .iter()
            .filter(|p| {
                include_expired || now.saturating_sub(p.last_receive) < timers::PATH_EXPIRATION
            })
            .min_by_key(|p| {
                let age = now.saturating_sub(p.last_receive).min(140_000);
                let l = p.latency.unwrap_or(65535);
                if age < 19000 { l } else { l + 65535 + age }
            })
    }

    fn suite(&self) -> CipherSuite {
        if self.proto >= 12 {
            CipherSuite::AesGmacSiv
        } else {
            CipherSuite::Poly1305Salsa2012
        }
    }
}

#[derive(Debug)]
struct Local {
    identity: Identity,
    peers: HashMap<Address, Peer>,
    whois_sent: HashMap<Address, u64>,
    parked: VecDeque<(u64, LocalSocket, SocketAddr, Vec<u8>)>,
    queued: VecDeque<(u64, Address, Verb, Vec<u8>)>,
    /// Introductions (RENDEZVOUS) whose contact is still due: waiting for
    /// [`timers::RENDEZVOUS_CONTACT_DELAY`] or for the peer's identity (WHOIS):
    /// (received at, peer, socket, address to contact).
    introductions: VecDeque<(u64, Address, LocalSocket, SocketAddr)>,
}

/// The VL1 node state machine hosting one or more local identities.
#[derive(Debug)]
pub struct Node {
    cfg: NodeConfig,
    locals: Vec<Local>,
    is_root: bool,
    reassembler: Reassembler<(usize, LocalSocket, SocketAddr)>,
    transmits: VecDeque<Outgoing>,
    pool: Vec<Vec<u8>>,
    stats: NodeStats,
    events: VecDeque<Event>,
    drops: HashMap<DropReason, u64>,
    expecting: VecDeque<u64>,
    validation_gate: HashMap<u64, (u64, u32)>,
    /// Identity validations in the current window, all sources: (window start, count).
    validation_total: (u64, u32),
    unites: HashMap<(Address, Address), u64>,
    next_ping: u64,
    scratch: Vec<u8>,
    scratch2: Vec<u8>,
    /// Packet IDs and NAT-opening bytes, seeded once from the OS.
    rng: crypto::Csprng,
}

/// How a packet is protected on the wire.
#[derive(Debug, Clone, Copy)]
enum Seal {
    /// Armored with the peer key in this suite.
    Armor(CipherSuite),
    /// Sent in the clear over a trusted path with this ID (suite 2).
    Trusted(u64),
}

fn prefix_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(a) => (u32::from(a) >> 8) as u64,
        IpAddr::V6(a) => {
            let o = a.octets();
            u64::from_be_bytes([0, 0, o[0], o[1], o[2], o[3], o[4], o[5]])
        }
    }
}

fn path_permitted(addr: &SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V4(a) => {
            !(a.is_loopback() || a.is_multicast() || a.is_unspecified() || a.is_link_local())
        }
        IpAddr::V6(a) => {
            let s = a.segments();
            !(a.is_loopback()
                || a.is_multicast()
                || a.is_unspecified()
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0470))
        }
    }
}

impl Node {
    /// Creates a node hosting `identities` (each must have its secret key).
    pub fn new(cfg: NodeConfig, identities: Vec<Identity>) -> Result<Self, NodeError> {
        let mut locals = Vec::new();
        for id in identities {
            if !id.has_secret() {
                return Err(NodeError::NoSecret);
            }
            if locals
                .iter()
                .any(|l: &Local| l.identity.address() == id.address())
            {
                return Err(NodeError::DuplicateLocal);
            }
            locals.push(Local {
                identity: id,
                peers: HashMap::new(),
                whois_sent: HashMap::new(),
                parked: VecDeque::new(),
                queued: VecDeque::new(),
                introductions: VecDeque::new(),
            });
        }
        let mut node = Self {
            cfg,
            locals,
            is_root: false,
            reassembler: Reassembler::new(ReassemblyLimits::default()),
            transmits: VecDeque::new(),
            pool: Vec::new(),
            stats: NodeStats::default(),
            events: VecDeque::new(),
            drops: HashMap::new(),
            expecting: VecDeque::new(),
            validation_gate: HashMap::new(),
            validation_total: (0, 0),
            unites: HashMap::new(),
            next_ping: 0,
            scratch: Vec::new(),
            scratch2: Vec::new(),
            rng: crypto::Csprng::from_os().ok_or(NodeError::Random)?,
        };
        node.install_roots();
        Ok(node)
    }

    /// The planet in force (the one given at start, or a newer one accepted since).
    pub fn planet(&self) -> &World {
        &self.cfg.planet
    }

    /// Offers `planet` from outside the protocol (the I/O shell read it from its
    /// configuration, e.g. a Kubernetes ConfigMap). It is judged by the world update rule
    /// against the planet in force ([`check_planet_update`]); a newer one takes effect at
    /// once: the roots it names become this node's roots (roots it no longer names become
    /// ordinary peers), whether this node is a root is decided again, and the next
    /// [`Node::handle_timeout`] (due now, see [`Node::poll_timeout`]) says HELLO to the new
    /// roots, so traffic and WHOIS can fail over to them within a round trip. Unlike a
    /// planet pushed by a root, no [`Event::PlanetUpdated`] follows: the caller has the
    /// answer and persists the planet itself. A refused planet changes nothing.
    pub fn offer_planet(&mut self, now: u64, planet: World) -> Result<PlanetChange, PlanetRefused> {
        let change = check_planet_update(&self.cfg.planet, &planet)?;
        if change == PlanetChange::Newer {
            self.apply_planet(now, planet);
        }
        Ok(change)
    }

    /// Applies a planet pushed by a root (in OK(HELLO)) if the update rule accepts it. A
    /// newer planet with a bad signature is a counted drop; an older or foreign one is
    /// ignored.
    fn accept_pushed_planet(&mut self, now: u64, w: World) {
        match check_planet_update(&self.cfg.planet, &w) {
            Ok(PlanetChange::Newer) => {
                self.apply_planet(now, w.clone());
                self.events.push_back(Event::PlanetUpdated { planet: w });
            }
            Err(PlanetRefused::BadSignature) => self.drop(DropReason::BadWorld),
            Ok(PlanetChange::Same) | Err(_) => {}
        }
    }

    /// Puts `planet` in force and schedules an immediate ping scan, which contacts roots
    /// that have no path yet.
    fn apply_planet(&mut self, now: u64, planet: World) {
        self.cfg.planet = planet;
        self.install_roots();
        self.next_ping = self.next_ping.min(now);
    }

    /// Marks the current planet's roots (and only them) as roots, adding unknown ones as
    /// peers of every local identity, and decides whether this node is one of them.
    fn install_roots(&mut self) {
        let roots = self.cfg.planet.roots.clone();
        self.is_root = roots
            .iter()
            .any(|r| self.locals.iter().any(|l| l.identity == r.identity));
        for local in &mut self.locals {
            for p in local.peers.values_mut() {
                p.is_root = false;
            }
            for r in &roots {
                if r.identity == local.identity {
                    continue;
                }
                let a = r.identity.address();
                if let Some(p) = local.peers.get_mut(&a).filter(|p| p.identity == r.identity) {
                    p.is_root = true;
                    p.stable_endpoints = r.stable_endpoints.clone();
                } else if let Ok(key) = local.identity.agree(&r.identity) {
                    let mut p = Peer::new(r.identity.clone(), key);
                    p.is_root = true;
                    p.stable_endpoints = r.stable_endpoints.clone();
                    local.peers.insert(a, p);
                }
            }
        }
    }

    /// Whether this node is a root of its planet.
    pub fn is_root(&self) -> bool {
        self.is_root
    }

    /// Drop counters by reason.
    pub fn drops(&self) -> &HashMap<DropReason, u64> {
        &self.drops
    }

    /// Number of drops for `reason`.
    pub fn drop_count(&self, reason: DropReason) -> u64 {
        self.drops.get(&reason).copied().unwrap_or(0)
    }

    /// Whether `local` knows `peer`'s identity.
    pub fn knows_peer(&self, local: Address, peer: Address) -> bool {
        self.local_index(local)
            .is_some_and(|i| self.locals[i].peers.contains_key(&peer))
    }

    /// The identity of `peer` as known to `local` (learned from its HELLO or a root's
    /// OK(WHOIS), or a root of the planet). The layer above uses it to verify what `peer`
    /// signed (e.g. a controller's network config).
    pub fn peer_identity(&self, local: Address, peer: Address) -> Option<&Identity> {
        let li = self.local_index(local)?;
        self.locals[li].peers.get(&peer).map(|p| &p.identity)
    }

    /// The physical address of the best direct (non-expired) path from `local` to `peer`.
    pub fn direct_path(&self, now: u64, local: Address, peer: Address) -> Option<SocketAddr> {
        let li = self.local_index(local)?;
        self.locals[li]
            .peers
            .get(&peer)?
            .best_path(now, false)
            .map(|p| p.addr)
    }

    /// Whether `local` heard from some root within the activity window (or is a root).
    pub fn is_online(&self, now: u64, local: Address) -> bool {
        self.is_root
            || self.local_index(local).is_some_and(|i| {
                self.locals[i].peers.values().any(|p| {
                    p.is_root
                        && p.last_receive > 0
                        && now - p.last_receive.min(now) < timers::PEER_ACTIVITY
                })
            })
    }

    fn local_index(&self, a: Address) -> Option<usize> {
        self.locals.iter().position(|l| l.identity.address() == a)
    }

    fn drop(&mut self, r: DropReason) {
        *self.drops.entry(r).or_default() += 1;
    }

    /// Counters of control work done.
    pub fn stats(&self) -> &NodeStats {
        &self.stats
    }

    /// Next datagram to send, copied into `buf` (its first [`Transmit::len`] bytes). Call
    /// after every `handle_*` and `send` until `None`. A `buf` of [`MAX_DATAGRAM_LEN`] bytes
    /// always suffices; a datagram that does not fit is dropped
    /// ([`DropReason::BufferTooSmall`]). Reuses the node's internal buffers: no allocation
    /// per datagram once warmed up.
    pub fn poll_transmit(&mut self, buf: &mut [u8]) -> Option<Transmit> {
        loop {
            let o = self.transmits.pop_front()?;
            let len = o.data.len();
            let fits = len <= buf.len();
            if fits {
                buf[..len].copy_from_slice(&o.data);
            }
            let t = Transmit {
                local_socket: o.socket,
                to: o.to,
                len,
                ttl: o.ttl,
            };
            self.give_buf(o.data);
            if fits {
                return Some(t);
            }
            self.drop(DropReason::BufferTooSmall);
        }
    }

    /// Number of datagrams waiting for [`Node::poll_transmit`].
    pub fn pending_transmits(&self) -> usize {
        self.transmits.len()
    }

    fn take_buf(&mut self) -> Vec<u8> {
        let mut b = self.pool.pop().unwrap_or_default();
        b.clear();
        b
    }

    fn give_buf(&mut self, b: Vec<u8>) {
        if self.pool.len() < POOL_LIMIT && b.capacity() <= 2 * wire::MAX_PACKET_LEN {
            self.pool.push(b);
        }
    }

    fn trusted_path_id(&self, ip: IpAddr) -> Option<u64> {
        self.cfg
            .trusted_paths
            .iter()
            .take(32)
            .find(|t| t.id != 0 && t.contains(ip))
            .map(|t| t.id)
    }

    fn is_trusted_inbound(&self, ip: IpAddr, id: u64) -> bool {
        self.cfg
            .trusted_paths
            .iter()
            .take(32)
            .any(|t| t.id != 0 && t.id == id && t.contains(ip))
    }

    /// Next event. Call after every `handle_*` until `None`.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When to call [`Node::handle_timeout`] next (absolute ms). Call after every
    /// `handle_*`/`send`.
    pub fn poll_timeout(&self) -> u64 {
        let pending = self
            .locals
            .iter()
            .any(|l| !l.parked.is_empty() || !l.queued.is_empty() || !l.introductions.is_empty());
        if pending {
            let whois = self
                .locals
                .iter()
                .flat_map(|l| l.whois_sent.values())
                .map(|t| t + timers::WHOIS_RETRY);
            // Introductions of unknown peers wait on their WHOIS instead.
            let contacts = self.locals.iter().flat_map(|l| {
                l.introductions
                    .iter()
                    .filter(|i| l.peers.contains_key(&i.1))
                    .map(|i| i.0 + timers::RENDEZVOUS_CONTACT_DELAY)
            });
            self.next_ping
                .min(whois.chain(contacts).min().unwrap_or(self.next_ping))
        } else {
            self.next_ping
        }
    }

    /// Runs timers: ping scan (HELLO/ECHO keepalives, root contact, path expiry), WHOIS
    /// retries, queue and reassembly expiry. Call when `now >= poll_timeout()`.
    pub fn handle_timeout(&mut self, now: u64) {
        self.reassembler.expire(now);
        for _ in 0..self.reassembler.take_abandoned() {
            self.drop(DropReason::Reassembly);
        }
        for li in 0..self.locals.len() {
            self.expire_queues(now, li);
            self.retry_whois(now, li);
            self.contact_introduced(now, li);
        }
        if now >= self.next_ping {
            self.next_ping = now + timers::PING_CHECK;
            for li in 0..self.locals.len() {
                self.ping_scan(now, li);
            }
        }
    }

    fn expire_queues(&mut self, now: u64, li: usize) {
        let l = &mut self.locals[li];
        let before = l.parked.len() + l.queued.len();
        l.parked
            .retain(|p| now.saturating_sub(p.0) < timers::QUEUE_TIMEOUT);
        l.queued
            .retain(|p| now.saturating_sub(p.0) < timers::QUEUE_TIMEOUT);
        let gone = before - l.parked.len() - l.queued.len();
        l.introductions
            .retain(|i| now.saturating_sub(i.0) < timers::QUEUE_TIMEOUT);
        // A WHOIS entry only gates retries; unanswered ones (for addresses a sender made up)
        // would otherwise pile up for good.
        l.whois_sent
            .retain(|_, t| now.saturating_sub(*t) < timers::QUEUE_TIMEOUT);
        for _ in 0..gone {
            self.drop(DropReason::QueueOverflow);
        }
    }

    fn retry_whois(&mut self, now: u64, li: usize) {
        let l = &self.locals[li];
        let mut wanted: Vec<Address> = l
            .parked
            .iter()
            .filter_map(|p| Packet::new_checked(&p.3[..]).ok().map(|v| v.source()))
            .chain(l.queued.iter().map(|q| q.1))
            .chain(l.introductions.iter().map(|i| i.1))
            .filter(|a| !l.peers.contains_key(a))
            .collect();
        wanted.sort();
        wanted.dedup();
        for a in wanted {
            self.whois(now, li, a);
        }
    }

    fn ping_scan(&mut self, now: u64, li: usize) {
        let addrs: Vec<Address> = self.locals[li].peers.keys().copied().collect();
        for a in addrs {
            let (is_root, active, full, has_paths) = {
                let p = &self.locals[li].peers[&a];
                (
                    p.is_root,
                    now.saturating_sub(p.last_receive) < timers::PEER_ACTIVITY
                        && p.last_receive > 0,
                    now.saturating_sub(p.last_hello) >= timers::PEER_PING || p.last_hello == 0,
                    !p.paths.is_empty(),
                )
            };
            if !(is_root || active) {
                continue;
            }
            if full {
                if let Some(p) = self.locals[li].peers.get_mut(&a) {
                    p.last_hello = now;
                }
            }
            // Keepalive over live paths; drop expired ones.
            let mut targets = Vec::new();
            if let Some(p) = self.locals[li].peers.get_mut(&a) {
                p.paths
                    .retain(|x| now.saturating_sub(x.last_receive) < timers::PATH_EXPIRATION);
                for x in &mut p.paths {
                    if full || now.saturating_sub(x.last_send) >= timers::PATH_HEARTBEAT {
                        x.last_send = now;
                        targets.push((x.socket, x.addr));
                    }
                }
            }
            for (s, addr) in targets {
                if full {
                    self.send_hello(now, li, a, s, addr);
                } else {
                    self.send_echo(now, li, a, s, addr);
                }
            }
            if is_root && (!has_paths || self.locals[li].peers[&a].paths.is_empty()) {
                let eps = self.locals[li].peers[&a].stable_endpoints.clone();
                for e in eps {
                    self.send_hello(now, li, a, LocalSocket::default(), e);
                }
            }
        }
        // Forget idle non-root peers.
        self.locals[li].peers.retain(|_, p| {
            p.is_root
                || p.last_receive == 0
                || now.saturating_sub(p.last_receive) < timers::PEER_ACTIVITY
        });
    }

    fn push_buf(&mut self, socket: LocalSocket, to: SocketAddr, data: Vec<u8>, ttl: Option<u8>) {
        self.transmits.push_back(Outgoing {
            socket,
            to,
            ttl,
            data,
        });
    }

    fn expect_reply(&mut self, packet_id: u64) {
        if self.expecting.len() >= REPLY_TABLE {
            self.expecting.pop_front();
        }
        self.expecting.push_back(packet_id >> 32);
    }

    /// Builds, armors and sends a packet to `peer` over a specific physical address.
    #[allow(clippy::too_many_arguments)]
    fn send_direct(
        &mut self,
        li: usize,
        peer: Address,
        socket: LocalSocket,
        to: SocketAddr,
        verb: Verb,
        payload: &[u8],
        suite: Option<CipherSuite>,
        expect: bool,
    ) {
        let me = self.locals[li].identity.address();
        let Some(p) = self.locals[li].peers.get(&peer) else {
            return;
        };
        let suite = suite.unwrap_or_else(|| p.suite());
        let mut pkt = self.take_buf();
        wire::write_header(&mut pkt, self.rng.next8(), peer, me, verb);
        pkt.extend_from_slice(payload);
        self.finish_and_send(li, peer, socket, to, pkt, Seal::Armor(suite), expect);
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_and_send(
        &mut self,
        li: usize,
        peer: Address,
        socket: LocalSocket,
        to: SocketAddr,
        mut pkt: Vec<u8>,
        seal: Seal,
        expect: bool,
    ) {
        let Some(p) = self.locals[li].peers.get(&peer) else {
            return self.give_buf(pkt);
        };
        let mtu = self.cfg.mtu;
        if pkt.len() > mtu {
            pkt[18] |= wire::FLAG_FRAGMENTED;
        }
        match seal {
            Seal::Armor(suite) => {
                if crypto::armor(&mut pkt, &p.key, suite).is_err() {
                    return self.give_buf(pkt);
                }
            }
            Seal::Trusted(id) => {
                // Suite 2 (spec 7.5): no encryption, no MAC; the MAC field carries the ID.
                pkt[18] = (pkt[18] & 0x47) | (2 << 3);
                pkt[19..27].copy_from_slice(&id.to_be_bytes());
                self.stats.trusted_sent += 1;
            }
        }
        if expect {
            let id = Packet::new_checked(&pkt[..])
                .map(|v| v.packet_id())
                .unwrap_or(0);
            self.expect_reply(id);
        }
        let mut scratch = std::mem::take(&mut self.scratch);
        let (pool, transmits) = (&mut self.pool, &mut self.transmits);
        let r = wire::fragment(&pkt, mtu, wire::Split::Even, &mut scratch, |d| {
            let mut b = pool.pop().unwrap_or_default();
            b.clear();
            b.extend_from_slice(d);
            transmits.push_back(Outgoing {
                socket,
                to,
                ttl: None,
                data: b,
            });
        });
        self.scratch = scratch;
        if r.is_err() {
            self.drop(DropReason::Malformed);
        }
        self.give_buf(pkt);
    }

    fn best_root(
        &self,
        now: u64,
        li: usize,
        exclude: Option<Address>,
    ) -> Option<(Address, LocalSocket, SocketAddr)> {
        self.locals[li]
            .peers
            .values()
            .filter(|p| p.is_root && Some(p.identity.address()) != exclude)
            .filter_map(|p| p.best_path(now, true).map(|x| (p, x)))
            .max_by_key(|(p, x)| {
                (
                    !p.unresponsive(now),
                    p.last_receive,
                    std::cmp::Reverse(x.latency.unwrap_or(65535)),
                )
            })
            .map(|(p, x)| (p.identity.address(), x.socket, x.addr))
    }

    /// The best root to send through (see [`Node::best_root`]), probed with an ECHO when it
    /// has been silent for [`timers::ROOT_PROBE_IDLE`]: a root that died is then passed
    /// over after [`timers::ROOT_PROBE_TIMEOUT`] instead of at the next keepalive.
    fn root_route(
        &mut self,
        now: u64,
        li: usize,
        exclude: Option<Address>,
    ) -> Option<(Address, LocalSocket, SocketAddr)> {
        let (root, socket, addr) = self.best_root(now, li, exclude)?;
        let p = self.locals[li].peers.get_mut(&root)?;
        if now.saturating_sub(p.last_receive) >= timers::ROOT_PROBE_IDLE
            && now.saturating_sub(p.probe_sent) >= timers::ROOT_PROBE_IDLE
        {
            p.probe_sent = now;
            if p.probe_unanswered_since <= p.last_receive {
                p.probe_unanswered_since = now;
            }
            self.send_echo(now, li, root, socket, addr);
        }
        Some((root, socket, addr))
    }

    fn send_hello(
        &mut self,
        now: u64,
        li: usize,
        peer: Address,
        socket: LocalSocket,
        to: SocketAddr,
    ) {
        let me = self.locals[li].identity.clone();
        let Some(p) = self.locals[li].peers.get_mut(&peer) else {
            return;
        };
        p.last_hello = now;
        let hello = Hello {
            protocol_version: wire::PROTOCOL_VERSION,
            version_major: 1,
            version_minor: 14,
            version_revision: 1,
            timestamp: now,
            identity: me.to_public(),
            physical_destination: Some(to),
            planet: Some((self.cfg.planet.id, self.cfg.planet.timestamp)),
            moons: Vec::new(),
        };
        let key = p.key.clone();
        let mut pkt = self.take_buf();
        wire::write_header(&mut pkt, self.rng.next8(), peer, me.address(), Verb::HELLO);
        let off = hello.write(&mut pkt);
        crypto::crypt_field(&key, &mut pkt, wire::HEADER_LEN + off);
        self.finish_and_send(
            li,
            peer,
            socket,
            to,
            pkt,
            Seal::Armor(CipherSuite::Poly1305None),
            true,
        );
    }

    fn send_echo(
        &mut self,
        _now: u64,
        li: usize,
        peer: Address,
        socket: LocalSocket,
        to: SocketAddr,
    ) {
        self.send_direct(li, peer, socket, to, Verb::ECHO, &[], None, true);
    }

    fn whois(&mut self, now: u64, li: usize, addr: Address) {
        if let Some(t) = self.locals[li].whois_sent.get(&addr)
            && now.saturating_sub(*t) < timers::WHOIS_RETRY
        {
            return;
        }
        let Some((root, s, to)) = self.root_route(now, li, Some(addr)) else {
            return;
        };
        self.locals[li].whois_sent.insert(addr, now);
        self.send_direct(li, root, s, to, Verb::WHOIS, &addr.to_bytes(), None, true);
    }

    /// Sends `payload` with `verb` from local identity `from` to `to`, relaying through a
    /// root when there is no direct path, or queueing (and sending WHOIS) while `to` is
    /// unknown. Compresses when worthwhile. Call from the host whenever it has traffic.
    pub fn send(
        &mut self,
        now: u64,
        from: Address,
        to: Address,
        verb: Verb,
        payload: &[u8],
    ) -> Result<(), NodeError> {
        let li = self.local_index(from).ok_or(NodeError::UnknownLocal)?;
        if payload.len() + wire::HEADER_LEN > wire::MAX_PACKET_LEN {
            return Err(NodeError::TooLarge);
        }
        if to == from {
            return Ok(());
        }
        if !self.locals[li].peers.contains_key(&to) {
            self.enqueue(now, li, to, verb, payload);
            self.whois(now, li, to);
            return Ok(());
        }
        self.send_now(now, li, to, verb, payload);
        Ok(())
    }

    /// Queues an outgoing packet until `to` is known and reachable (bounded; the oldest
    /// goes first, counted as a drop).
    fn enqueue(&mut self, now: u64, li: usize, to: Address, verb: Verb, payload: &[u8]) {
        let l = &mut self.locals[li];
        if l.queued.len() >= QUEUE_LIMIT {
            l.queued.pop_front();
            self.drop(DropReason::QueueOverflow);
        }
        self.locals[li]
            .queued
            .push_back((now, to, verb, payload.to_vec()));
    }

    fn send_now(&mut self, now: u64, li: usize, to: Address, verb: Verb, payload: &[u8]) {
        let me = self.locals[li].identity.address();
        let Some(p) = self.locals[li].peers.get(&to) else {
            return;
        };
        let suite = p.suite();
        let route = p
            .best_path(now, false)
            .map(|x| (x.socket, x.addr))
            .or_else(|| {
                self.root_route(now, li, Some(to))
                    .map(|(_, s, a)| (s, a))
                    .or_else(|| {
                        let p = self.locals[li].peers.get(&to)?;
                        p.best_path(now, true).map(|x| (x.socket, x.addr))
                    })
            });
        let Some((socket, addr)) = route else {
            // No path and no root online yet (e.g. right after start): queue it like a
            // packet waiting on WHOIS; the first confirmed path sends it.
            return self.enqueue(now, li, to, verb, payload);
        };
        let seal = match self.trusted_path_id(addr.ip()) {
            Some(id) => Seal::Trusted(id),
            None => Seal::Armor(suite),
        };
        let mut pkt = self.take_buf();
        wire::write_header(&mut pkt, self.rng.next8(), to, me, verb);
        pkt.extend_from_slice(payload);
        if matches!(verb, Verb::USER_MESSAGE | Verb::PUSH_DIRECT_PATHS) || verb.is_vl2() {
            // Bulk data goes through the peer's gate; control messages are rare and
            // compress well, so they are always tried.
            let bulk = matches!(verb, Verb::FRAME | Verb::EXT_FRAME);
            match self.locals[li].peers.get_mut(&to).filter(|_| bulk) {
                Some(p) => {
                    if p.compression.should_try() {
                        let compressed = wire::compress_packet(&mut pkt, &mut self.scratch2);
                        p.compression.record(compressed);
                    }
                }
                None => {
                    wire::compress_packet(&mut pkt, &mut self.scratch2);
                }
            }
        }
        self.finish_and_send(li, to, socket, addr, pkt, seal, true);
        if let Some(x) = self.locals[li]
            .peers
            .get_mut(&to)
            .and_then(|p| p.paths.iter_mut().find(|x| x.addr == addr))
        {
            x.last_send = now;
        }
    }

    /// Asks the best root for `peer`'s identity on behalf of `local` (WHOIS) unless it is
    /// already known; [`Event::PeerLearned`] with `via: Some(root)` reports the answer.
    /// Sending to an unknown peer does this by itself; call it to resolve a peer ahead of
    /// traffic.
    pub fn request_identity(
        &mut self,
        now: u64,
        local: Address,
        peer: Address,
    ) -> Result<(), NodeError> {
        let li = self.local_index(local).ok_or(NodeError::UnknownLocal)?;
        if !self.locals[li].peers.contains_key(&peer) && self.local_index(peer).is_none() {
            self.whois(now, li, peer);
        }
        Ok(())
    }

    /// Tells `local`'s peer `peer` about our addresses (PUSH_DIRECT_PATHS).
    pub fn push_direct_paths(
        &mut self,
        now: u64,
        local: Address,
        peer: Address,
        addrs: &[SocketAddr],
    ) -> Result<(), NodeError> {
        let recs: Vec<PathRecord> = addrs
            .iter()
            .map(|a| PathRecord { flags: 0, addr: *a })
            .collect();
        let mut payload = Vec::new();
        wire::write_push_direct_paths(&mut payload, &recs);
        self.send(now, local, peer, Verb::PUSH_DIRECT_PATHS, &payload)
    }

    /// Processes one received UDP datagram. Call for every datagram on the VL1 port.
    pub fn handle_datagram(
        &mut self,
        now: u64,
        local_socket: LocalSocket,
        remote: SocketAddr,
        data: &[u8],
    ) {
        if data.len() > wire::MAX_PACKET_LEN {
            return self.drop(DropReason::Malformed);
        }
        if data.len() <= wire::FRAGMENT_HEADER_LEN {
            return self.drop(DropReason::Runt);
        }
        if wire::is_fragment(data) {
            let Ok(f) = wire::Fragment::new_checked(data) else {
                return self.drop(DropReason::Malformed);
            };
            let dest = f.destination();
            match self.local_index(dest) {
                Some(_) => {
                    let mut out = std::mem::take(&mut self.scratch);
                    match self.reassembler.add_fragment(now, data, &mut out) {
                        Ok(Some((li, s, r))) => {
                            let mut pkt = self.take_buf();
                            std::mem::swap(&mut pkt, &mut out);
                            self.scratch = out;
                            self.process_packet(now, li, s, r, pkt);
                        }
                        Ok(None) => self.scratch = out,
                        Err(_) => {
                            self.scratch = out;
                            self.drop(DropReason::Reassembly)
                        }
                    }
                }
                None => self.relay(now, data, dest, None, f.hops(), true),
            }
            return;
        }
        let Ok(p) = Packet::new_checked(data) else {
            return self.drop(DropReason::Malformed);
        };
        let (src, dest, hops) = (p.source(), p.destination(), p.hops());
        if self.local_index(src).is_some() {
            return self.drop(DropReason::FromSelf);
        }
        let Some(li) = self.local_index(dest) else {
            return self.relay(now, data, dest, Some(src), hops, false);
        };
        if p.is_fragmented() {
            let mut out = std::mem::take(&mut self.scratch);
            match self
                .reassembler
                .add_head(now, data, (li, local_socket, remote), &mut out)
            {
                Ok(Some((li, s, r))) => {
                    let mut pkt = self.take_buf();
                    std::mem::swap(&mut pkt, &mut out);
                    self.scratch = out;
                    self.process_packet(now, li, s, r, pkt);
                }
                Ok(None) => self.scratch = out,
                Err(_) => {
                    self.scratch = out;
                    self.drop(DropReason::Reassembly)
                }
            }
            return;
        }
        let mut pkt = self.take_buf();
        pkt.extend_from_slice(data);
        self.process_packet(now, li, local_socket, remote, pkt);
    }

    fn relay(
        &mut self,
        now: u64,
        data: &[u8],
        dest: Address,
        src: Option<Address>,
        hops: u8,
        fragment: bool,
    ) {
        if !(self.is_root || self.cfg.relay_always) {
            return self.drop(DropReason::NotForUs);
        }
        if hops >= RELAY_MAX_HOPS {
            return self.drop(DropReason::HopLimit);
        }
        let mut d = self.take_buf();
        d.extend_from_slice(data);
        if fragment {
            if let Ok(mut f) = wire::Fragment::new_checked(&mut d[..]) {
                f.set_hops(hops + 1);
            }
        } else if let Ok(mut p) = Packet::new_checked(&mut d[..]) {
            p.set_hops(hops + 1);
        }
        // Several local identities may be hosted: use the peer table of the one that has
        // a live direct path to the destination, the root identity first.
        let direct = self.relay_order().find_map(|li| {
            self.locals[li]
                .peers
                .get(&dest)
                .and_then(|p| p.best_path(now, false))
                .map(|x| (li, x.socket, x.addr))
        });
        if let Some((li, s, a)) = direct {
            self.stats.relayed += 1;
            self.stats.relayed_bytes += d.len() as u64;
            self.push_buf(s, a, d, None);
            if let (Some(src), false) = (src, fragment) {
                self.introduce(now, li, src, dest);
            }
            return;
        }
        let up = self
            .relay_order()
            .find_map(|li| self.best_root(now, li, src));
        if let Some((root, s, a)) = up {
            if Some(root) != src {
                self.stats.relayed += 1;
                self.stats.relayed_bytes += d.len() as u64;
                self.push_buf(s, a, d, None);
                return;
            }
        }
        self.give_buf(d);
        self.drop(DropReason::NoPath);
    }

    /// Local identities in the order their peer tables are consulted for relaying:
    /// identities that are roots of the planet first, then the rest in hosting order.
    fn relay_order(&self) -> impl Iterator<Item = usize> + '_ {
        let is_root_id = move |i: &usize| {
            self.cfg
                .planet
                .roots
                .iter()
                .any(|r| r.identity == self.locals[*i].identity)
        };
        let n = self.locals.len();
        (0..n)
            .filter(is_root_id)
            .chain((0..n).filter(move |i| !is_root_id(i)))
    }

    fn introduce(&mut self, now: u64, li: usize, a: Address, b: Address) {
        let key = if a < b { (a, b) } else { (b, a) };
        if let Some(t) = self.unites.get(&key)
            && now.saturating_sub(*t) < timers::MIN_UNITE_INTERVAL
        {
            return;
        }
        let pa = self.locals[li]
            .peers
            .get(&a)
            .and_then(|p| p.best_path(now, false))
            .cloned();
        let pb = self.locals[li]
            .peers
            .get(&b)
            .and_then(|p| p.best_path(now, false))
            .cloned();
        let (Some(pa), Some(pb)) = (pa, pb) else {
            return;
        };
        if pa.addr.is_ipv4() != pb.addr.is_ipv4() {
            return;
        }
        self.unites.insert(key, now);
        if self.unites.len() > 4096 {
            self.unites.retain(|_, t| now.saturating_sub(*t) < 240_000);
        }
        // The destination hears first (1.x picks the order at random): it is the side that
        // may not know the source yet and whose NAT the source's attempt will hit, so its
        // own NAT should open before that attempt arrives.
        let mut m = Vec::new();
        Rendezvous {
            flags: 0,
            peer: a,
            addr: pa.addr,
        }
        .write(&mut m);
        self.send_direct(li, b, pb.socket, pb.addr, Verb::RENDEZVOUS, &m, None, false);
        m.clear();
        Rendezvous {
            flags: 0,
            peer: b,
            addr: pb.addr,
        }
        .write(&mut m);
        self.send_direct(li, a, pa.socket, pa.addr, Verb::RENDEZVOUS, &m, None, false);
        self.stats.rendezvous_sent += 2;
    }

    fn process_packet(
        &mut self,
        now: u64,
        li: usize,
        socket: LocalSocket,
        remote: SocketAddr,
        mut pkt: Vec<u8>,
    ) {
        let Ok(view) = Packet::new_checked(&pkt[..]) else {
            return self.drop(DropReason::Malformed);
        };
        let (src, suite_bits, hops) = (view.source(), view.cipher_suite_bits(), view.hops());
        if suite_bits == 0 && pkt[27] & 0x1f == Verb::HELLO.0 {
            return self.handle_hello(now, li, socket, remote, pkt, false);
        }
        let trusted = suite_bits == 2;
        if trusted {
            let id = u64::from_be_bytes(pkt[19..27].try_into().unwrap_or([0; 8]));
            if !self.is_trusted_inbound(remote.ip(), id) {
                return self.drop(DropReason::UntrustedPath);
            }
        } else if suite_bits > 3 {
            return self.drop(DropReason::BadCipherSuite);
        }
        let Some(peer) = self.locals[li].peers.get(&src) else {
            let l = &mut self.locals[li];
            if l.parked.len() >= QUEUE_LIMIT {
                l.parked.pop_front();
                self.drop(DropReason::QueueOverflow);
            }
            self.locals[li].parked.push_back((now, socket, remote, pkt));
            self.whois(now, li, src);
            return;
        };
        if trusted {
            self.stats.trusted_received += 1;
        } else if crypto::dearmor(&mut pkt, &peer.key).is_err() {
            return self.drop(DropReason::MacFailed);
        }
        let mut scratch = std::mem::take(&mut self.scratch2);
        let r = wire::decompress_packet(&mut pkt, &mut scratch);
        self.scratch2 = scratch;
        if r.is_err() {
            return self.drop(DropReason::Decompress);
        }
        let verb = Verb(pkt[27] & 0x1f);
        if trusted && verb == Verb::HELLO {
            return self.handle_hello(now, li, socket, remote, pkt, true);
        }
        // Authenticated repeats are dropped (a trusted HELLO is checked in handle_hello).
        let packet_id = Packet::new_checked(&pkt[..])
            .map(|v| v.packet_id())
            .unwrap_or(0);
        if let Some(p) = self.locals[li].peers.get_mut(&src)
            && !p.recent.insert(packet_id)
        {
            return self.drop(DropReason::Duplicate);
        }
        let payload = &pkt[wire::HEADER_LEN..];
        let ok = match verb {
            Verb::OK => self.handle_ok(now, li, src, socket, remote, hops, payload),
            Verb::ERROR => {
                if let Ok((re, body)) = InReplyTo::parse(payload) {
                    if let Ok(e) = ErrorBody::parse(body)
                        && e.code == ErrorBody::IDENTITY_COLLISION
                        && re.verb == Verb::HELLO
                        && self.locals[li].peers.get(&src).is_some_and(|p| p.is_root)
                    {
                        self.events.push_back(Event::IdentityCollision {
                            local: self.locals[li].identity.address(),
                            root: src,
                        });
                    }
                    if ErrorBody::parse(body).is_ok() {
                        self.events.push_back(Event::Packet {
                            local: self.locals[li].identity.address(),
                            from: src,
                            verb,
                            packet_id: re.packet_id,
                            payload: payload.to_vec(),
                        });
                    }
                }
                true
            }
            Verb::WHOIS => {
                self.handle_whois(now, li, src, socket, remote, packet_id, payload);
                true
            }
            Verb::RENDEZVOUS => {
                self.handle_rendezvous(now, li, src, socket, payload);
                true
            }
            Verb::ECHO => {
                let p = self.locals[li].peers.get_mut(&src);
                let allowed = p.is_some_and(|p| {
                    let last = p.echo_answered.entry(remote).or_insert(0);
                    if *last == 0 || now.saturating_sub(*last) >= timers::ECHO_RATE {
                        *last = now;
                        true
                    } else {
                        false
                    }
                });
                self.events.push_back(Event::EchoReceived {
                    local: self.locals[li].identity.address(),
                    peer: src,
                    addr: remote,
                    hops,
                });
                if allowed {
                    let mut m = Vec::new();
                    InReplyTo { verb, packet_id }.write(&mut m);
                    m.extend_from_slice(payload);
                    self.send_direct(li, src, socket, remote, Verb::OK, &m, None, false);
                } else {
                    self.drop(DropReason::RateLimited);
                }
                true
            }
            Verb::PUSH_DIRECT_PATHS => {
                self.handle_push(now, li, src, payload);
                true
            }
            Verb::NOP => true,
            _ => {
                self.events.push_back(Event::Packet {
                    local: self.locals[li].identity.address(),
                    from: src,
                    verb,
                    packet_id,
                    payload: payload.to_vec(),
                });
                true
            }
        };
        if ok {
            self.learn(now, li, src, socket, remote, hops, verb);
        }
        self.give_buf(pkt);
    }

    fn learn(
        &mut self,
        now: u64,
        li: usize,
        src: Address,
        socket: LocalSocket,
        remote: SocketAddr,
        hops: u8,
        verb: Verb,
    ) {
        let local = self.locals[li].identity.address();
        let Some(p) = self.locals[li].peers.get_mut(&src) else {
            return;
        };
        p.last_receive = now;
        if hops != 0 {
            return;
        }
        if let Some(x) = p
            .paths
            .iter_mut()
            .find(|x| x.addr == remote && x.socket == socket)
        {
            x.last_receive = now;
            return;
        }
        if p.paths.iter().any(|x| {
            x.addr.ip() == remote.ip()
                && x.socket == socket
                && now.saturating_sub(x.last_receive) < 19000
        }) {
            return;
        }
        if !path_permitted(&remote)
            || (p.is_root
                && !p.stable_endpoints.is_empty()
                && !p.stable_endpoints.iter().any(|e| e.ip() == remote.ip()))
        {
            return;
        }
        if verb == Verb::OK {
            if p.paths.len() >= MAX_PATHS {
                if let Some(i) = p
                    .paths
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, x)| x.last_receive)
                    .map(|(i, _)| i)
                {
                    p.paths.remove(i);
                }
            }
            let first_path = p.paths.is_empty();
            let first_root_path = p.is_root && first_path;
            p.paths.push(PathEntry {
                socket,
                addr: remote,
                last_receive: now,
                // This OK answers a packet we sent there moments ago: the first heartbeat
                // is due a full period after that, as after any other send.
                last_send: now,
                latency: None,
            });
            self.events.push_back(Event::PathLearned {
                local,
                peer: src,
                addr: remote,
            });
            // Packets queued or parked while no root could be reached wait on a WHOIS that
            // could not be sent: send it now rather than at the next ping scan (up to 5 s).
            if first_root_path {
                self.retry_whois(now, li);
            }
            // Packets for known peers that had no way out yet (no path, no root online) go
            // now: through this new path, or relayed by the root that just answered.
            if first_path {
                self.retry_waiting(now, li);
            }
        } else {
            let last = p.confirm_sent.get(&remote).copied().unwrap_or(0);
            if last == 0 || now.saturating_sub(last) >= timers::CONFIRM_PATH {
                p.confirm_sent.insert(remote, now);
                if p.confirm_sent.len() > 256 {
                    p.confirm_sent
                        .retain(|_, t| now.saturating_sub(*t) < timers::CONFIRM_PATH);
                }
                self.send_hello(now, li, src, socket, remote);
            }
        }
    }

    /// Makes room in `li`'s peer table for one more peer (see [`NodeConfig::max_peers`]): true
    /// when it has room or the longest-silent non-root peer (silent for
    /// [`IDLE_BEFORE_EVICTION`] at least) was forgotten; false when every peer is a root or
    /// was heard from recently.
    fn make_room(&mut self, now: u64, li: usize) -> bool {
        let limit = self.cfg.max_peers.unwrap_or(if self.is_root {
            ROOT_MAX_PEERS
        } else {
            MAX_PEERS
        });
        let peers = &mut self.locals[li].peers;
        if peers.len() < limit {
            return true;
        }
        let victim = peers
            .iter()
            .filter(|(_, p)| {
                !p.is_root && now.saturating_sub(p.last_receive) >= IDLE_BEFORE_EVICTION
            })
            .min_by_key(|(_, p)| p.last_receive)
            .map(|(a, _)| *a);
        match victim {
            Some(a) => {
                peers.remove(&a);
                self.stats.peers_evicted += 1;
                true
            }
            None => {
                self.stats.peers_refused += 1;
                false
            }
        }
    }

    /// Whether the identity-validation budget of `ip`'s prefix has room at `now`.
    fn validation_allowed(&self, now: u64, ip: IpAddr) -> bool {
        let (start, n) = self.validation_total;
        if now.saturating_sub(start) < timers::IDENTITY_VALIDATION
            && n >= IDENTITY_VALIDATION_GLOBAL
        {
            return false;
        }
        match self.validation_gate.get(&prefix_hash(ip)) {
            Some((start, n)) if now.saturating_sub(*start) < timers::IDENTITY_VALIDATION => {
                *n < IDENTITY_VALIDATION_BURST
            }
            _ => true,
        }
    }

    /// Spends one identity validation of `ip`'s prefix at `now`.
    fn validation_spend(&mut self, now: u64, ip: IpAddr) {
        self.stats.identity_validations += 1;
        if now.saturating_sub(self.validation_total.0) >= timers::IDENTITY_VALIDATION {
            self.validation_total = (now, 0);
        }
        self.validation_total.1 += 1;
        let e = self
            .validation_gate
            .entry(prefix_hash(ip))
            .or_insert((now, 0));
        if now.saturating_sub(e.0) >= timers::IDENTITY_VALIDATION {
            *e = (now, 0);
        }
        e.1 += 1;
        if self.validation_gate.len() > 16384 {
            self.validation_gate
                .retain(|_, (t, _)| now.saturating_sub(*t) < timers::IDENTITY_VALIDATION);
        }
    }

    fn handle_hello(
        &mut self,
        now: u64,
        li: usize,
        socket: LocalSocket,
        remote: SocketAddr,
        mut pkt: Vec<u8>,
        trusted_path: bool,
    ) {
        let Ok((hello, crypt)) = Hello::parse_head(&pkt[wire::HEADER_LEN..]) else {
            return self.drop(DropReason::BadPayload);
        };
        let Ok(view) = Packet::new_checked(&pkt[..]) else {
            return self.drop(DropReason::Malformed);
        };
        let (src, hops, packet_id) = (view.source(), view.hops(), view.packet_id());
        if hello.protocol_version < wire::MIN_PROTOCOL_VERSION {
            return self.drop(DropReason::OldProtocol);
        }
        if hello.identity.address() != src {
            return self.drop(DropReason::BadIdentity);
        }
        let local = self.locals[li].identity.address();
        match self.locals[li].peers.get(&src) {
            // Via a trusted path (suite 2, already accepted): only a known peer with the same
            // identity counts, as in 1.x (`alreadyAuthenticated`); the field encryption
            // below still applies.
            Some(p) if trusted_path && p.identity == hello.identity => {}
            _ if trusted_path => return self.drop(DropReason::BadIdentity),
            Some(p) if p.identity != hello.identity => {
                // Address collision (spec 13.2): behind the identity-verification gate, check
                // the MAC with a key agreed with the *presented* identity and, if it is
                // authentic, answer ERROR(IDENTITY_COLLISION) armored with that key.
                if !self.validation_allowed(now, remote.ip()) {
                    return self.drop(DropReason::RateLimited);
                }
                self.validation_spend(now, remote.ip());
                let Ok(key) = self.locals[li].identity.agree(&hello.identity) else {
                    return self.drop(DropReason::BadIdentity);
                };
                if crypto::dearmor(&mut pkt, &key).is_err() {
                    return self.drop(DropReason::MacFailed);
                }
                let me = self.locals[li].identity.address();
                let mut e = self.take_buf();
                wire::write_header(&mut e, self.rng.next8(), src, me, Verb::ERROR);
                InReplyTo {
                    verb: Verb::HELLO,
                    packet_id,
                }
                .write(&mut e);
                e.push(ErrorBody::IDENTITY_COLLISION);
                // 1.x passes the known peer's AES keys here (so a >= 12 peer gets a suite 3
                // packet it cannot open); suite 1 with the presented key is what it means.
                if crypto::armor(&mut e, &key, CipherSuite::Poly1305Salsa2012).is_ok() {
                    self.push_buf(socket, remote, e, None);
                    self.stats.collisions_reported += 1;
                } else {
                    self.give_buf(e);
                }
                return self.drop(DropReason::BadIdentity);
            }
            Some(p) => {
                if crypto::dearmor(&mut pkt, &p.key).is_err() {
                    return self.drop(DropReason::MacFailed);
                }
            }
            None => {
                if !self.validation_allowed(now, remote.ip()) {
                    return self.drop(DropReason::RateLimited);
                }
                let Ok(key) = self.locals[li].identity.agree(&hello.identity) else {
                    return self.drop(DropReason::BadIdentity);
                };
                if crypto::dearmor(&mut pkt, &key).is_err() {
                    return self.drop(DropReason::MacFailed);
                }
                self.validation_spend(now, remote.ip());
                if !hello.identity.locally_validate() {
                    return self.drop(DropReason::BadIdentity);
                }
                if !self.make_room(now, li) {
                    return self.drop(DropReason::RateLimited);
                }
                self.locals[li]
                    .peers
                    .insert(src, Peer::new(hello.identity.to_public(), key));
                self.events.push_back(Event::PeerLearned {
                    local,
                    peer: src,
                    via: None,
                });
                self.retry_waiting(now, li);
            }
        }
        if let Some(p) = self.locals[li].peers.get_mut(&src)
            && !p.recent.insert(packet_id)
        {
            return self.drop(DropReason::Duplicate);
        }
        if let Some(off) = crypt {
            if let Some(p) = self.locals[li].peers.get(&src) {
                let key = p.key.clone();
                crypto::crypt_field(&key, &mut pkt, wire::HEADER_LEN + off);
            }
        }
        // OK(HELLO), armored before recording the version (1.x quirk: first one is suite 1).
        let mut m = Vec::new();
        InReplyTo {
            verb: Verb::HELLO,
            packet_id,
        }
        .write(&mut m);
        OkHello {
            timestamp_echo: hello.timestamp,
            protocol_version: wire::PROTOCOL_VERSION,
            version_major: 1,
            version_minor: 14,
            version_revision: 1,
            observed: Some(remote),
            world_updates: &[],
        }
        .write(&mut m);
        let mut worlds = Vec::new();
        if let Some((pid, pts)) = hello.planet
            && pid == self.cfg.planet.id
            && self.cfg.planet.timestamp > pts
        {
            worlds = self.cfg.planet.serialize(false);
        }
        if !worlds.is_empty() {
            m.truncate(m.len() - 2);
            m.extend_from_slice(&(worlds.len() as u16).to_be_bytes());
            m.extend_from_slice(&worlds);
        }
        self.send_direct(li, src, socket, remote, Verb::OK, &m, None, false);
        if let Some(p) = self.locals[li].peers.get_mut(&src) {
            p.proto = hello.protocol_version;
        }
        self.stats.hellos_received += 1;
        self.events.push_back(Event::HelloReceived {
            local,
            peer: src,
            addr: remote,
            hops,
            protocol_version: hello.protocol_version,
            software: (
                hello.version_major,
                hello.version_minor,
                hello.version_revision,
            ),
        });
        self.learn(now, li, src, socket, remote, hops, Verb::HELLO);
        self.give_buf(pkt);
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_ok(
        &mut self,
        now: u64,
        li: usize,
        src: Address,
        _socket: LocalSocket,
        remote: SocketAddr,
        hops: u8,
        payload: &[u8],
    ) -> bool {
        let Ok((re, body)) = InReplyTo::parse(payload) else {
            self.drop(DropReason::BadPayload);
            return false;
        };
        if !self.expecting.contains(&(re.packet_id >> 32)) {
            self.drop(DropReason::UnexpectedReply);
            return false;
        }
        let local = self.locals[li].identity.address();
        match re.verb {
            Verb::HELLO => {
                let Ok(ok) = OkHello::parse(body) else {
                    self.drop(DropReason::BadPayload);
                    return false;
                };
                if ok.protocol_version < wire::MIN_PROTOCOL_VERSION {
                    self.drop(DropReason::OldProtocol);
                    return false;
                }
                let latency = now.saturating_sub(ok.timestamp_echo);
                let is_root = self.locals[li].peers.get(&src).is_some_and(|p| p.is_root);
                if let Some(p) = self.locals[li].peers.get_mut(&src) {
                    p.proto = ok.protocol_version;
                    if hops == 0 {
                        if let Some(x) = p.paths.iter_mut().find(|x| x.addr == remote) {
                            x.latency = Some(x.latency.map_or(latency, |l| (l + latency) / 2));
                        }
                    }
                }
                self.events.push_back(Event::Latency {
                    local,
                    peer: src,
                    ms: latency,
                });
                if is_root {
                    if let Some(addr) = ok.observed
                        && hops == 0
                    {
                        self.events
                            .push_back(Event::ExternalAddress { local, addr });
                    }
                    let mut rest = ok.world_updates;
                    while let Ok((w, used)) = World::parse(rest) {
                        rest = &rest[used..];
                        self.accept_pushed_planet(now, w);
                    }
                }
            }
            Verb::WHOIS => {
                let from_root = self.locals[li].peers.get(&src).is_some_and(|p| p.is_root);
                if !from_root {
                    self.drop(DropReason::NotFromRoot);
                    return false;
                }
                let Ok(ids) = wire::parse_ok_whois(body) else {
                    self.drop(DropReason::BadPayload);
                    return false;
                };
                let mut learned = false;
                for id in ids {
                    let a = id.address();
                    if self.locals[li].whois_sent.remove(&a).is_none()
                        || self.locals[li].peers.contains_key(&a)
                    {
                        continue;
                    }
                    if !self.make_room(now, li) {
                        self.drop(DropReason::RateLimited);
                        continue;
                    }
                    if let Ok(key) = self.locals[li].identity.agree(&id) {
                        self.locals[li]
                            .peers
                            .insert(a, Peer::new(id.to_public(), key));
                        self.events.push_back(Event::PeerLearned {
                            local,
                            peer: a,
                            via: Some(src),
                        });
                        learned = true;
                    }
                }
                if learned {
                    self.retry_waiting(now, li);
                }
            }
            Verb::ECHO => {
                self.events.push_back(Event::EchoReply {
                    local,
                    peer: src,
                    payload: body.to_vec(),
                });
            }
            _ => {
                self.events.push_back(Event::Packet {
                    local,
                    from: src,
                    verb: Verb::OK,
                    packet_id: re.packet_id,
                    payload: payload.to_vec(),
                });
            }
        }
        true
    }

    /// Contacts the peers of introductions whose wait is over and whose identity is known,
    /// unless the peer has reached us at the introduced address since the introduction.
    fn contact_introduced(&mut self, now: u64, li: usize) {
        let introductions: Vec<_> = self.locals[li].introductions.drain(..).collect();
        for (t, peer, s, addr) in introductions {
            let Some(p) = self.locals[li].peers.get(&peer) else {
                self.locals[li].introductions.push_back((t, peer, s, addr));
                continue;
            };
            if now.saturating_sub(t) < timers::RENDEZVOUS_CONTACT_DELAY {
                self.locals[li].introductions.push_back((t, peer, s, addr));
                continue;
            }
            // 1.x contacts at once on its copy of the introduction, so the path is often
            // open and confirmed (an authenticated packet from that very address since the
            // introduction) by the time our wait is over. Another probe would then be
            // redundant, and would spend the peer's ECHO allowance on that path: 1.x
            // answers at most one ECHO per path per 166 ms and drops the others silently
            // (`Path::rateGateEchoRequest`), so an ECHO the host sends right after ours
            // would go unanswered.
            let open = p
                .paths
                .iter()
                .any(|x| x.socket == s && x.addr == addr && x.last_receive >= t);
            if !open {
                self.contact(now, li, peer, s, addr);
            }
        }
    }

    fn retry_waiting(&mut self, now: u64, li: usize) {
        self.contact_introduced(now, li);
        let parked: Vec<_> = self.locals[li].parked.drain(..).collect();
        for (t, s, r, pkt) in parked {
            let src = Packet::new_checked(&pkt[..]).map(|v| v.source());
            if src.is_ok_and(|a| self.locals[li].peers.contains_key(&a)) {
                self.process_packet(now, li, s, r, pkt);
            } else {
                self.locals[li].parked.push_back((t, s, r, pkt));
            }
        }
        let queued: Vec<_> = self.locals[li].queued.drain(..).collect();
        for (t, to, verb, payload) in queued {
            if self.locals[li].peers.contains_key(&to) {
                self.send_now(now, li, to, verb, &payload);
            } else {
                self.locals[li].queued.push_back((t, to, verb, payload));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_whois(
        &mut self,
        now: u64,
        li: usize,
        src: Address,
        socket: LocalSocket,
        remote: SocketAddr,
        packet_id: u64,
        payload: &[u8],
    ) {
        if !self.is_root {
            let Some(p) = self.locals[li].peers.get_mut(&src) else {
                return;
            };
            if p.last_whois_answered != 0
                && now.saturating_sub(p.last_whois_answered) < timers::WHOIS_RATE
            {
                return self.drop(DropReason::RateLimited);
            }
            p.last_whois_answered = now;
        }
        let Ok(addrs) = wire::parse_whois(payload) else {
            return self.drop(DropReason::BadPayload);
        };
        let mut m = Vec::new();
        InReplyTo {
            verb: Verb::WHOIS,
            packet_id,
        }
        .write(&mut m);
        let head = m.len();
        for a in addrs {
            if let Some(i) = self.locals.iter().position(|l| l.identity.address() == a) {
                self.locals[i].identity.write_bytes(false, &mut m);
            } else if let Some(p) = self.locals[li].peers.get(&a) {
                p.identity.write_bytes(false, &mut m);
            } else if !self.is_root {
                self.whois(now, li, a);
            }
        }
        if m.len() > head {
            self.stats.whois_answered += 1;
            self.send_direct(li, src, socket, remote, Verb::OK, &m, None, false);
        }
    }

    fn handle_rendezvous(
        &mut self,
        now: u64,
        li: usize,
        src: Address,
        socket: LocalSocket,
        payload: &[u8],
    ) {
        if !self.locals[li].peers.get(&src).is_some_and(|p| p.is_root) {
            return self.drop(DropReason::NotFromRoot);
        }
        let Ok(r) = Rendezvous::parse(payload) else {
            return self.drop(DropReason::BadPayload);
        };
        if r.addr.port() == 0 || !path_permitted(&r.addr) || self.local_index(r.peer).is_some() {
            return;
        }
        // 1.x first sends 4 random bytes with IP TTL 2 to open local NAT/firewall state
        // without reaching the far side, then contacts the peer there at once. We contact it
        // a little later (see timers::RENDEZVOUS_CONTACT_DELAY): both sides' NATs are open
        // by then, so neither contact arrives at a NAT before its own side's opening.
        let mut junk = self.take_buf();
        junk.extend_from_slice(&self.rng.next8()[..4]);
        self.push_buf(socket, r.addr, junk, Some(2));
        let l = &mut self.locals[li];
        if l.introductions.len() >= QUEUE_LIMIT {
            l.introductions.pop_front();
        }
        l.introductions.push_back((now, r.peer, socket, r.addr));
        // A root introduces a pair while relaying the first packets between them, so the
        // receiver of those packets usually gets the introduction before it knows the
        // sender. 1.x drops it then, leaving the sender to punch alone (which fails between
        // two NATs and, on a Linux NAT, leaves an entry that takes the port the receiver's
        // own attempt needs) until the next introduction 30 s later. We have opened our NAT
        // above at once; we ask for the identity and contact the peer once it is known.
        if !l.peers.contains_key(&r.peer) {
            self.whois(now, li, r.peer);
        }
    }

    fn contact(
        &mut self,
        now: u64,
        li: usize,
        peer: Address,
        socket: LocalSocket,
        addr: SocketAddr,
    ) {
        let proto = self.locals[li]
            .peers
            .get(&peer)
            .map(|p| p.proto)
            .unwrap_or(0);
        if proto >= 5 {
            self.send_echo(now, li, peer, socket, addr);
        } else {
            self.send_hello(now, li, peer, socket, addr);
        }
    }

    fn handle_push(&mut self, now: u64, li: usize, src: Address, payload: &[u8]) {
        let Some(p) = self.locals[li].peers.get_mut(&src) else {
            return;
        };
        if now.saturating_sub(p.last_push_received) > timers::PUSH_CUTOFF {
            p.push_count = 0;
        } else {
            p.push_count += 1;
        }
        p.last_push_received = now;
        if p.push_count >= 8 {
            return self.drop(DropReason::RateLimited);
        }
        let Ok(recs) = wire::parse_push_direct_paths(payload) else {
            return self.drop(DropReason::BadPayload);
        };
        let mut per_family = [0usize; 2];
        for rec in recs {
            if rec.flags & 0x01 != 0 || !path_permitted(&rec.addr) {
                continue;
            }
            let have = self.locals[li].peers.get(&src).is_some_and(|p| {
                p.paths.iter().any(|x| {
                    x.addr == rec.addr
                        && now.saturating_sub(x.last_receive) < timers::PATH_EXPIRATION
                })
            });
            let fam = usize::from(rec.addr.is_ipv6());
            if have || per_family[fam] >= 8 {
                continue;
            }
            per_family[fam] += 1;
            self.contact(now, li, src, LocalSocket::default(), rec.addr);
        }
    }
}

#[cfg(test)]
#[path = "node_tests.rs"]
mod tests;
