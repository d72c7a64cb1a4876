//! The data plane: dedicated OS threads that own the host's [`UdpPort`] and the sans-I/O VL1
//! [`Node`]s of every local identity, and the [`NodeHandle`] the tokio control plane uses to
//! talk to them.
//!
//! With more than one thread ([`DataPlaneConfig::threads`]) each owns a share of the local
//! identities ([`crate::shard`]): thread 0 the host's (and with it the joined networks, the
//! controller and the root role), every thread the pod members and pool identities whose
//! address falls to it. Each has its own socket in one `SO_REUSEPORT` group on the port, and
//! the kernel steers each datagram to the thread that owns its destination. A datagram that
//! reaches a thread without its destination is handed on to the owner, or to thread 0 when no
//! local identity has it (relaying as a root, a stale member): UDP GRO gives a thread a whole
//! batch of one sender's datagrams, steered by the first. Flatwire senders never mix
//! destinations in one GSO run, so among agents that happens only where a NIC's GRO merges
//! what arrived; handed datagrams are taken before the socket's next batch, which keeps one
//! peer's packets in order as far as the threads allow.
//!
//! Local identities: the host's (with its joined networks, the controller and the root role)
//! and one per attached pod, each with its own [`Node`] and its own VL2 member on the pod's
//! TAP ([`NodeHandle::add_member`], [`NodeHandle::remove_member`], which first releases the
//! member at its controller, bounded). They share the one UDP
//! port: a received datagram goes to the node whose address is its destination (bytes 8..13
//! of a packet or a fragment); any other goes to the host's node, which relays it when it is a
//! root and counts a drop otherwise. Every node sends through the shared port.
//!
//! Identities of the identity pool are warmed ahead of use ([`NodeHandle::warm_identity`]):
//! each gets a standby node of its own, created at most one per [`WARM_INTERVAL`], whose
//! ordinary first HELLO makes the roots validate the identity (a memory-hard hash, rate
//! limited per source prefix) and pin its path long before a pod uses it; the standby node's
//! keepalives keep it known (and introduce it again after a root restart).
//! [`NodeHandle::add_member`] then takes over the standby node, already online, so the roots
//! answer at once.
//!
//! Each thread waits in `poll(2)` on the UDP socket and a wake-up socket, with the node's next
//! timer as the timeout (no busy loop). Readable datagrams are taken in batches (`recvmmsg`,
//! GRO) and fed to [`Node::handle_datagram`]; what the node wants sent goes out in batches
//! (`sendmmsg`, GSO). Events go to the control plane over a bounded channel; snapshots (peers,
//! stats, drops) are answered on request; metrics are refreshed once a second.

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flatwire_vl1::node::{MAX_DATAGRAM_LEN, NodeStats};
use flatwire_vl1::{
    Address, DropReason, Event, Identity, LocalSocket, Node, NodeConfig, PlanetChange,
    PlanetRefused, World,
};
use flatwire_vl2::NetworkId;
use flatwire_vl2::rules::eval::RuleAction;
use flatwire_vl2::vouch::Vouch;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use prometheus_client::metrics::gauge::Gauge;

use crate::mcast::Memberships;
use crate::metrics::{
    ControllerLabels, Direction, DropLabels, Metrics, PathKind, PathLabels, RuleLabels,
    ThreadLabels, TrafficLabels,
};
use crate::networks::{MemberView, NetworkSnapshot, TapBufs, Vl2};
use crate::offload::OffloadDrop;
use crate::shard::{self, shard_of};
use crate::tap::{self, OffloadCounters, Tap};
use crate::udp::{self, RecvMeta, UdpPort};

/// Receive slots per `recvmmsg`.
const RECV_BATCH: usize = quinn_udp::BATCH_SIZE;
/// Bytes per receive slot: a whole GRO-coalesced run fits.
const RECV_SLOT: usize = 64 * 1024;
/// Datagrams queued for one send batch (GSO runs make several a syscall).
const QUEUED_DATAGRAMS: usize = 4 * udp::SEND_BATCH;
/// Receive batches handled before the thread looks at timers and commands again.
const RECV_ROUNDS: usize = 8;
/// Events buffered for the control plane; beyond that they are counted as lost.
pub const EVENT_QUEUE: usize = 1024;
/// Most peers the snapshot table tracks.
const PEER_TABLE_LIMIT: usize = 16 * 1024;
/// How often metrics are refreshed (ms).
const PUBLISH_INTERVAL: u64 = 1000;
/// Gap between two pool identities warmed (ms): 4 a second stays inside a root's budget of
/// identity validations per source prefix (16 per 2 s) with room for the pods attaching.
pub const WARM_INTERVAL: u64 = 250;

/// Errors of starting the data plane.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The UDP port could not be bound.
    #[error(transparent)]
    Bind(#[from] udp::BindError),
    /// The node refused the configuration.
    #[error("cannot start the VL1 node: {0}")]
    Node(#[from] flatwire_vl1::NodeError),
    /// The thread or its wake-up socket could not be created.
    #[error("cannot start the data-plane thread: {0}")]
    Io(#[from] io::Error),
    /// The controller's store could not be opened.
    #[error("cannot open the controller store: {0}")]
    Controller(#[from] flatwire_vl2::controller::StoreError),
}

/// What the data plane runs.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// The host identity (with its secret).
    pub identity: Identity,
    /// The planet.
    pub planet: World,
    /// Where to bind the UDP port (`[::]:9993` by default: dual-stack).
    pub bind: SocketAddr,
    /// With the controller role: its JSON-file store (`<home>/controller.d`).
    pub controller_dir: Option<PathBuf>,
    /// Networks to join (a TAP `fw<last 8 hex digits>` each).
    pub networks: Vec<NetworkId>,
    /// Data-plane threads (1 to [`shard::MAX_SHARDS`]); when the kernel refuses the steered
    /// socket group, the data plane runs on one and says so in the log.
    pub threads: usize,
}

/// The role of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// A root of our planet.
    Root,
    /// Any other node.
    Leaf,
}

/// One peer as the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSnapshot {
    /// Its address.
    pub address: Address,
    /// Root or leaf.
    pub role: PeerRole,
    /// Last measured round trip (OK(HELLO)/OK(ECHO)), ms.
    pub latency_ms: Option<u64>,
    /// The best confirmed direct path, if any.
    pub direct_path: Option<SocketAddr>,
    /// True for a leaf without a direct path: traffic to it goes through a root.
    pub relayed: bool,
    /// Software version (major, minor, revision) from its HELLO, if it sent one.
    pub version: Option<(u8, u8, u16)>,
    /// Protocol version from its HELLO, if it sent one.
    pub protocol_version: Option<u8>,
}

/// A point-in-time view of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSnapshot {
    /// Our address.
    pub address: Address,
    /// Whether we are a root of the planet.
    pub is_root: bool,
    /// Whether some root answered recently (always true for a root).
    pub online: bool,
    /// The planet's ID.
    pub planet_id: u64,
    /// The planet's timestamp (updated when a root pushes a newer one).
    pub planet_timestamp: u64,
    /// The planet's root addresses.
    pub roots: Vec<Address>,
    /// Known peers (roots first), sorted by address within each role.
    pub peers: Vec<PeerSnapshot>,
    /// Control-work counters of the node.
    pub stats: NodeStats,
    /// Drops by reason (the node's and the I/O shell's), sorted by reason.
    pub drops: Vec<(&'static str, u64)>,
    /// Events the control plane did not take in time.
    pub events_lost: u64,
    /// The bound UDP address.
    pub local_addr: SocketAddr,
    /// Joined networks (of the host identity).
    pub networks: Vec<NetworkSnapshot>,
}

impl NodeSnapshot {
    /// The entry of `peer`, if known.
    pub fn peer(&self, peer: Address) -> Option<&PeerSnapshot> {
        self.peers.iter().find(|p| p.address == peer)
    }

    /// Total drops for `reason` (a [`DropReason`] name such as `"Malformed"`).
    pub fn drop_count(&self, reason: &str) -> u64 {
        self.drops
            .iter()
            .filter(|(r, _)| *r == reason)
            .map(|(_, n)| n)
            .sum()
    }
}

/// A `/controller/...` API request for the thread that owns the controller.
struct ControllerCall {
    method: String,
    path: Vec<String>,
    body: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Option<(u16, serde_json::Value)>>,
}

/// A pod member to add to the data plane (see [`NodeHandle::add_member`]).
#[derive(Debug)]
pub struct NewMember {
    /// Its identity (with the secret).
    pub identity: Identity,
    /// The network it joins.
    pub nwid: NetworkId,
    /// Its TAP, already in the pod's namespace; `None` for a member whose pod is gone, added
    /// only to release it at its controller ([`NodeHandle::remove_member`]).
    pub tap: Option<Tap>,
    /// A name for logs (e.g. the TAP's host-side name).
    pub name: String,
    /// The host's vouch for it, sent with its config requests.
    pub vouch: Option<Vouch>,
    /// The multicast memberships of its TAP, opened in the pod's namespace.
    pub groups: Option<Memberships>,
}

/// Why [`NodeHandle::add_member`] failed.
#[derive(Debug, thiserror::Error)]
pub enum AddMemberError {
    /// The data plane stopped or did not answer.
    #[error("the data plane is not running")]
    Stopped,
    /// The member's node could not be created.
    #[error("cannot create the member's VL1 node: {0}")]
    Node(#[from] flatwire_vl1::NodeError),
    /// The address is already a local identity.
    #[error("member {0} is already attached")]
    Duplicate(Address),
}

enum Command {
    Snapshot(tokio::sync::oneshot::Sender<NodeSnapshot>),
    AddMember(
        Box<NewMember>,
        tokio::sync::oneshot::Sender<Result<(), AddMemberError>>,
    ),
    RemoveMember(Address, RemoveReply),
    Member(
        Address,
        NetworkId,
        tokio::sync::oneshot::Sender<Option<MemberView>>,
    ),
    Join(NetworkId, tokio::sync::oneshot::Sender<bool>),
    Leave(NetworkId, tokio::sync::oneshot::Sender<bool>),
    Controller(ControllerCall),
    Warm(Box<Identity>),
    OfferPlanet(
        Box<World>,
        tokio::sync::oneshot::Sender<Result<PlanetChange, PlanetRefused>>,
    ),
    /// Thread 0 to the others: the planet now in force.
    Planet(Box<World>),
    /// A thread's drop totals, for the snapshot.
    Drops(tokio::sync::oneshot::Sender<Vec<(&'static str, u64)>>),
    Stop,
}

/// A datagram another thread received for one of this thread's identities (or, on thread 0,
/// for none): its source and bytes.
type Handed = (SocketAddr, Vec<u8>);

/// The way into one data-plane thread: its command queue, the queue of datagrams other
/// threads hand it, and its wake-up socket.
#[derive(Debug)]
struct Link {
    commands: mpsc::Sender<Command>,
    handed: mpsc::Sender<Handed>,
    waker: UnixDatagram,
}

impl Link {
    /// Queues `c` and wakes the thread; false when the thread is gone.
    fn send(&self, c: Command) -> bool {
        let sent = self.commands.send(c).is_ok();
        self.wake();
        sent
    }

    /// Hands the thread a datagram and wakes it.
    fn hand(&self, d: Handed) {
        let _ = self.handed.send(d);
        self.wake();
    }

    fn wake(&self) {
        // A full wake-up socket already holds a wake-up: nothing lost.
        let _ = self.waker.send(&[1]);
    }
}

/// The control plane's handle on the data-plane threads; dropping it stops them.
#[derive(Debug)]
pub struct NodeHandle {
    address: Address,
    local_addr: SocketAddr,
    /// One per thread, thread 0 (the host's) first.
    links: Arc<[Link]>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Snapshot(_) => "Snapshot",
            Command::AddMember(..) => "AddMember",
            Command::RemoveMember(..) => "RemoveMember",
            Command::Member(..) => "Member",
            Command::Join(..) => "Join",
            Command::Leave(..) => "Leave",
            Command::Controller(_) => "Controller",
            Command::Warm(_) => "Warm",
            Command::OfferPlanet(..) => "OfferPlanet",
            Command::Planet(_) => "Planet",
            Command::Drops(_) => "Drops",
            Command::Stop => "Stop",
        })
    }
}

impl NodeHandle {
    /// Our address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Data-plane threads running the node.
    pub fn threads(&self) -> usize {
        self.links.len()
    }

    /// The thread that owns local identity `a`.
    fn link_of(&self, a: Address) -> &Link {
        &self.links[shard_of(a, self.address, self.links.len())]
    }

    /// Asks the data plane for a snapshot (drops summed over every thread); `None` if it
    /// stopped or did not answer in 2 s.
    pub async fn snapshot(&self) -> Option<NodeSnapshot> {
        let limit = Duration::from_secs(2);
        let mut s = self.ask(Command::Snapshot, limit).await?;
        let mut totals: HashMap<&'static str, u64> = s.drops.drain(..).collect();
        for link in &self.links[1..] {
            for (r, n) in self.ask_on(link, Command::Drops, limit).await? {
                *totals.entry(r).or_default() += n;
            }
        }
        s.drops = totals.into_iter().collect();
        s.drops.sort_unstable();
        Some(s)
    }

    /// Joins `nwid` at runtime (TAP and member); `Some(false)` if it was already joined,
    /// `None` if the data plane stopped or did not answer in 2 s. Not persisted here.
    pub async fn join_network(&self, nwid: NetworkId) -> Option<bool> {
        self.ask(|tx| Command::Join(nwid, tx), Duration::from_secs(2))
            .await
    }

    /// Leaves `nwid` at runtime (its TAP goes away); `Some(false)` if it was not joined,
    /// `None` if the data plane stopped or did not answer in 2 s. Not persisted here.
    pub async fn leave_network(&self, nwid: NetworkId) -> Option<bool> {
        self.ask(|tx| Command::Leave(nwid, tx), Duration::from_secs(2))
            .await
    }

    /// Runs a `/controller/...` API request (`path`: the segments after `controller`) on the
    /// controller: `Some(None)` without the controller role, `None` if the data plane stopped
    /// or did not answer in 5 s; else the HTTP status and JSON body.
    pub async fn controller_api(
        &self,
        method: &str,
        path: Vec<String>,
        body: Vec<u8>,
    ) -> Option<Option<(u16, serde_json::Value)>> {
        let call = |reply| {
            Command::Controller(ControllerCall {
                method: method.to_string(),
                path,
                body,
                reply,
            })
        };
        self.ask(call, Duration::from_secs(5)).await
    }

    /// Sends `c` (made around a reply sender) to thread 0 and waits up to `limit` for the
    /// reply; `None` if the data plane stopped or did not answer in time.
    async fn ask<T>(
        &self,
        c: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
        limit: Duration,
    ) -> Option<T> {
        self.ask_on(&self.links[0], c, limit).await
    }

    /// [`NodeHandle::ask`] on the thread of `link`.
    async fn ask_on<T>(
        &self,
        link: &Link,
        c: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Command,
        limit: Duration,
    ) -> Option<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !link.send(c(tx)) {
            return None;
        }
        tokio::time::timeout(limit, rx).await.ok()?.ok()
    }

    /// Adds a pod member: its own VL1 node on the shared port and its VL2 member on its TAP,
    /// which starts asking the controller for its config at once ([`NodeHandle::member`]).
    pub async fn add_member(&self, m: NewMember) -> Result<(), AddMemberError> {
        let link = self.link_of(m.identity.address());
        self.ask_on(
            link,
            |tx| Command::AddMember(Box::new(m), tx),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or(Err(AddMemberError::Stopped))
    }

    /// Removes pod member `member`: first its controller is asked to delete it, so that its
    /// IPs return to the pool (see [Release](flatwire_vl2::vouch#release); waits for the
    /// answer at most [`flatwire_vl2::vouch::RELEASE_TIMEOUT_MS`], resending meanwhile), then
    /// its network is left and its TAP closed, which destroys the device wherever it lives.
    /// `Some(false)` if it was not there, `None` if the data plane stopped or did not answer
    /// in 5 s.
    pub async fn remove_member(&self, member: Address) -> Option<bool> {
        let taps = self
            .ask_on(
                self.link_of(member),
                |tx| Command::RemoveMember(member, tx),
                Duration::from_secs(5),
            )
            .await?;
        let Some(taps) = taps else {
            return Some(false);
        };
        // Closing a TAP waits for the kernel to unregister the device (milliseconds, under
        // the kernel's lock): on a blocking thread, so the data plane goes on meanwhile.
        if !taps.is_empty()
            && tokio::task::spawn_blocking(move || {
                drop(taps);
                trim_heap();
            })
            .await
            .is_err()
        {
            tracing::error!(%member, "closing the member's TAP panicked");
        }
        Some(true)
    }

    /// The status and config of pod member `member` on `nwid`: `Some(None)` if there is no
    /// such member, `None` if the data plane stopped or did not answer in 2 s.
    pub async fn member(&self, member: Address, nwid: NetworkId) -> Option<Option<MemberView>> {
        self.ask_on(
            self.link_of(member),
            |tx| Command::Member(member, nwid, tx),
            Duration::from_secs(2),
        )
        .await
    }

    /// Queues pool identity `identity` (with its secret) for warming: a standby node of its
    /// own says HELLO to the roots, paced (one per [`WARM_INTERVAL`]), so that attaching it
    /// later needs no identity validation at the roots. False when the data plane stopped.
    pub fn warm_identity(&self, identity: Identity) -> bool {
        self.link_of(identity.address())
            .send(Command::Warm(Box::new(identity)))
    }

    /// Offers `planet` (read from the agent's configuration, e.g. the planet ConfigMap) to the
    /// running node, which judges it by the world update rule against the planet in force
    /// ([`Node::offer_planet`]). A newer one is in force when this returns: the host's node and
    /// every pod member's node use its roots (new roots are contacted at once, traffic fails
    /// over among them), and members attached later start with it. Persisting it is the
    /// caller's business. `None` if the data plane stopped or did not answer in 2 s.
    pub async fn offer_planet(&self, planet: World) -> Option<Result<PlanetChange, PlanetRefused>> {
        self.ask(
            |tx| Command::OfferPlanet(Box::new(planet), tx),
            Duration::from_secs(2),
        )
        .await
    }

    /// Tells the threads to stop; [`NodeHandle::join`] waits for them.
    pub fn stop(&self) {
        for link in self.links.iter() {
            link.send(Command::Stop);
        }
    }

    /// Waits for the threads to end (blocking: call off the tokio workers).
    pub fn join(&self) {
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }

    /// Whether every data-plane thread is still running.
    pub fn is_running(&self) -> bool {
        self.threads
            .lock()
            .map(|t| !t.is_empty() && t.iter().all(|t| !t.is_finished()))
            .unwrap_or(false)
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        // The threads hold links to each other: their queues never close by themselves.
        self.stop();
    }
}

/// Binds the UDP port (one socket per thread), creates the host's node, opens the controller
/// store, creates the TAPs of the joined networks and starts the data-plane threads
/// (`flatwire-dp`, `flatwire-dp1`, ...). Blocks briefly (file and device I/O): from async code
/// call it via `spawn_blocking`. Returns the handle and the receiver of the host node's events
/// (all but `Packet`, which VL2 consumes on the thread; with no VL2 role it is counted as an
/// `UnhandledPacket` drop).
pub fn start(
    cfg: DataPlaneConfig,
    metrics: Arc<Metrics>,
) -> Result<(NodeHandle, tokio::sync::mpsc::Receiver<Event>), StartError> {
    let address = cfg.identity.address();
    let ports = bind_ports(cfg.bind, cfg.threads.clamp(1, shard::MAX_SHARDS), address)?;
    let local_addr = ports[0].local_addr()?;
    let roots: Vec<Address> = cfg
        .planet
        .roots
        .iter()
        .map(|r| r.identity.address())
        .collect();
    let clock = Clock::new();
    let is_root = roots.contains(&address);
    let vl2_identity = cfg.identity.clone();
    let planet = cfg.planet.clone();
    let node = Node::new(NodeConfig::new(cfg.planet), vec![cfg.identity])?;
    let mut links = Vec::with_capacity(ports.len());
    let mut queues = Vec::with_capacity(ports.len());
    for _ in 0..ports.len() {
        let (wake_tx, wake_rx) = UnixDatagram::pair()?;
        wake_tx.set_nonblocking(true)?;
        wake_rx.set_nonblocking(true)?;
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let (hand_tx, hand_rx) = mpsc::channel();
        links.push(Link {
            commands: cmd_tx,
            handed: hand_tx,
            waker: wake_tx,
        });
        queues.push((cmd_rx, hand_rx, wake_rx));
    }
    let links: Arc<[Link]> = links.into();
    let (ev_tx, ev_rx) = tokio::sync::mpsc::channel(EVENT_QUEUE);
    let mut shards = Vec::with_capacity(ports.len());
    for (shard, (port, (commands, handed, wake))) in ports.into_iter().zip(queues).enumerate() {
        shards.push(ShardInit {
            shard,
            host: address,
            port,
            links: links.clone(),
            commands,
            handed,
            wake,
            events: ev_tx.clone(),
            roots: roots.clone(),
            planet: planet.clone(),
            local_addr,
            metrics: metrics.clone(),
            clock,
        });
    }
    let first = shards.remove(0);
    // The controller is not `Send`: VL2 is set up on the thread, which reports how it went.
    let (started_tx, started_rx) = mpsc::sync_channel(1);
    let (controller_dir, networks) = (cfg.controller_dir, cfg.networks);
    let thread = std::thread::Builder::new()
        .name("flatwire-dp".into())
        .spawn(move || {
            let now = clock.now();
            let vl2 = Vl2::start(
                address,
                &vl2_identity,
                &first.roots,
                is_root,
                controller_dir.as_deref(),
                &networks,
                now,
            );
            match vl2 {
                Ok(vl2) => {
                    let _ = started_tx.send(Ok(()));
                    let host = Local {
                        address,
                        node,
                        vl2,
                        standby: false,
                    };
                    DataPlane::new(first, Some(host)).run();
                }
                Err(e) => {
                    let _ = started_tx.send(Err(e));
                }
            }
        })?;
    match started_rx.recv() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            let _ = thread.join();
            return Err(e.into());
        }
        Err(_) => {
            let _ = thread.join();
            return Err(io::Error::other("the data-plane thread died while starting").into());
        }
    }
    let handle = NodeHandle {
        address,
        local_addr,
        links,
        threads: Mutex::new(vec![thread]),
    };
    for init in shards {
        let name = format!("flatwire-dp{}", init.shard);
        let t = std::thread::Builder::new()
            .name(name)
            .spawn(move || DataPlane::new(init, None).run())?;
        if let Ok(mut threads) = handle.threads.lock() {
            threads.push(t);
        }
    }
    Ok((handle, ev_rx))
}

/// Gives the heap's free pages back to the kernel. A member's node, TAP buffers and
/// controller state are freed on whichever thread removed it; the allocator would otherwise
/// keep them in that thread's arena, so pod churn would look like growth.
#[allow(unsafe_code)]
fn trim_heap() {
    // SAFETY: malloc_trim has no preconditions; it walks the allocator's own arenas under
    // their locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Binds `threads` sockets on `bind` in a group steered by destination address, or one socket
/// when that is not possible (said in the log).
fn bind_ports(
    bind: SocketAddr,
    threads: usize,
    host: Address,
) -> Result<Vec<UdpPort>, udp::BindError> {
    if threads <= 1 {
        return Ok(vec![UdpPort::bind(bind)?]);
    }
    match UdpPort::bind_group(bind, threads, &shard::steering_program(host, threads)) {
        Ok(ports) => Ok(ports),
        Err(e) => {
            tracing::warn!(threads, error = %e, "cannot spread the data plane over threads; running one");
            Ok(vec![UdpPort::bind(bind)?])
        }
    }
}

/// The ZeroTier address a datagram is for: bytes 8..13 of a packet and of a fragment alike.
fn destination(datagram: &[u8]) -> Option<Address> {
    let b: [u8; 5] = datagram.get(8..13)?.try_into().ok()?;
    Some(Address::from_bytes(b))
}

/// Milliseconds on a monotonic clock that starts at the wall-clock time of launch.
#[derive(Clone, Copy)]
struct Clock {
    start: Instant,
    epoch_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let epoch_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_millis() as u64);
        Self {
            start: Instant::now(),
            epoch_ms,
        }
    }

    fn now(&self) -> u64 {
        self.epoch_ms + self.start.elapsed().as_millis() as u64
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct PeerTrack {
    latency_ms: Option<u64>,
    version: Option<(u8, u8, u16)>,
    protocol_version: Option<u8>,
}

/// Drop reasons of the I/O shell (next to the node's [`DropReason`]s).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ShellDrop {
    /// The kernel refused a datagram we sent (unreachable, too large, ...).
    SendRejected,
    /// An authenticated VL2 packet while no VL2 role runs (no network, controller or root).
    UnhandledPacket,
    /// A frame a member delivered that its TAP refused or could not take.
    TapRejected,
}

impl ShellDrop {
    fn name(self) -> &'static str {
        match self {
            ShellDrop::SendRejected => "SendRejected",
            ShellDrop::UnhandledPacket => "UnhandledPacket",
            ShellDrop::TapRejected => "TapRejected",
        }
    }
}

/// One local identity on the shared port: its VL1 node and its VL2 networks.
struct Local {
    address: Address,
    node: Node,
    vl2: Vl2,
    /// A warmed pool identity no pod uses yet (no network; events are dropped).
    standby: bool,
}

/// What one data-plane thread starts from.
struct ShardInit {
    shard: usize,
    host: Address,
    port: UdpPort,
    links: Arc<[Link]>,
    commands: mpsc::Receiver<Command>,
    handed: mpsc::Receiver<Handed>,
    wake: UnixDatagram,
    events: tokio::sync::mpsc::Sender<Event>,
    roots: Vec<Address>,
    planet: World,
    local_addr: SocketAddr,
    metrics: Arc<Metrics>,
    clock: Clock,
}

/// One data-plane thread with its share of the local identities.
struct DataPlane {
    /// This thread's index; 0 owns the host identity.
    shard: usize,
    /// The host's address.
    host: Address,
    /// Every thread's link (this one's too), by index.
    links: Arc<[Link]>,
    port: UdpPort,
    /// Segments one GSO send may carry on `port` (1: none).
    gso_segments: usize,
    /// On thread 0 the host's identity first (never removed); then one per pod member or
    /// warmed pool identity this thread owns.
    locals: Vec<Local>,
    /// Address -> index in `locals`, for demultiplexing.
    index: HashMap<Address, usize>,
    roots: Vec<Address>,
    /// The current planet (new members' nodes start with it).
    planet: World,
    local_addr: SocketAddr,
    commands: mpsc::Receiver<Command>,
    /// Datagrams other threads handed over, taken before this thread's own socket each time.
    handed: mpsc::Receiver<Handed>,
    wake: UnixDatagram,
    events: tokio::sync::mpsc::Sender<Event>,
    events_lost: u64,
    peers: HashMap<Address, PeerTrack>,
    metrics: Arc<Metrics>,
    /// Drop totals already added to the metrics counters, by label.
    published_drops: HashMap<&'static str, u64>,
    /// The host node's relay counters (packets, bytes, rendezvous) already added to the
    /// metrics.
    published_relay: NodeStats,
    /// The TAP offload counters already added to the metrics.
    published_offload: OffloadCounters,
    local_drops: HashMap<ShellDrop, u64>,
    /// `DropReason` label strings, made once per reason (a handful of small strings).
    names: HashMap<DropReason, &'static str>,
    clock: Clock,
    next_publish: u64,
    /// Receive buffers shared by all TAPs.
    tap_bufs: TapBufs,
    /// (local, network) indices of the TAPs that polled readable (reused).
    ready_taps: Vec<(usize, usize)>,
    /// Pool identities waiting for their standby node ([`NodeHandle::warm_identity`]).
    warm_queue: VecDeque<Identity>,
    /// When the next one may get it.
    next_warm: u64,
    /// Pod members being removed, waiting for their release ([`DataPlane::remove_member`]),
    /// with when it started (ms).
    removing: Vec<(Address, RemoveReply, u64)>,
    /// Datagrams received from the socket, and handed to another thread; the part of each
    /// already added to the metrics.
    received: u64,
    forwarded: u64,
    published_received: u64,
    published_forwarded: u64,
}

/// The answer to [`Command::RemoveMember`].
type RemoveReply = tokio::sync::oneshot::Sender<Option<Vec<Tap>>>;

impl DataPlane {
    /// Thread `init.shard`, with `host` (the host identity, thread 0 only).
    fn new(init: ShardInit, host: Option<Local>) -> Self {
        let mut peers = HashMap::new();
        if init.shard == 0 {
            for r in init.roots.iter().filter(|r| **r != init.host) {
                peers.insert(*r, PeerTrack::default());
            }
        }
        let locals: Vec<Local> = host.into_iter().collect();
        let index = locals.iter().map(|l| (l.address, 0)).collect();
        Self {
            shard: init.shard,
            host: init.host,
            links: init.links,
            gso_segments: init.port.capabilities().gso_segments,
            port: init.port,
            locals,
            index,
            roots: init.roots,
            planet: init.planet,
            local_addr: init.local_addr,
            commands: init.commands,
            handed: init.handed,
            wake: init.wake,
            events: init.events,
            events_lost: 0,
            peers,
            metrics: init.metrics,
            published_drops: HashMap::new(),
            published_relay: NodeStats::default(),
            published_offload: OffloadCounters::default(),
            local_drops: HashMap::new(),
            names: HashMap::new(),
            clock: init.clock,
            next_publish: 0,
            tap_bufs: TapBufs::new(),
            ready_taps: Vec::new(),
            warm_queue: VecDeque::new(),
            next_warm: 0,
            removing: Vec::new(),
            received: 0,
            forwarded: 0,
            published_received: 0,
            published_forwarded: 0,
        }
    }

    fn address(&self) -> Address {
        self.host
    }

    /// Whether local `li` is the host identity.
    fn is_host(&self, li: usize) -> bool {
        self.shard == 0 && li == 0
    }

    fn run(mut self) {
        let mut rx = vec![0u8; RECV_SLOT * RECV_BATCH];
        let mut metas = [RecvMeta::default(); RECV_BATCH];
        let mut tx = vec![0u8; MAX_DATAGRAM_LEN * udp::SEND_BATCH];
        tracing::info!(
            address = %self.address(),
            udp = %self.local_addr,
            thread = self.shard,
            "data plane running"
        );
        loop {
            let now = self.clock.now();
            for l in &mut self.locals {
                if now >= l.node.poll_timeout() {
                    l.node.handle_timeout(now);
                }
                if now >= l.vl2.poll_timeout() {
                    l.vl2.handle_timeout(now);
                }
                if l.vl2.awaits_config() && l.node.is_online(now, l.address) {
                    l.vl2.nudge(now);
                }
            }
            // Commands first: what they queue (the controller's pushes) goes out just below.
            if !self.serve_commands() {
                tracing::info!("data plane stopped");
                return;
            }
            self.finish_removals();
            self.warm_next(now);
            self.take_handed();
            self.drain_events();
            if let Err(e) = self.flush(&mut tx) {
                tracing::error!(error = %e, "UDP socket failed; data plane stops");
                return;
            }
            if now >= self.next_publish {
                self.publish(now);
                self.next_publish = now + PUBLISH_INTERVAL;
            }
            let now = self.clock.now();
            let wake_at = self
                .locals
                .iter()
                .map(|l| l.node.poll_timeout().min(l.vl2.poll_timeout()))
                .fold(self.next_publish, u64::min);
            let wake_at = if self.warm_queue.is_empty() {
                wake_at
            } else {
                wake_at.min(self.next_warm)
            };
            let timeout = Duration::from_millis(wake_at.saturating_sub(now));
            let (udp_ready, _) = match self.wait(timeout) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "poll failed; data plane stops");
                    return;
                }
            };
            if udp_ready && let Err(e) = self.receive(&mut rx, &mut metas, &mut tx) {
                tracing::error!(error = %e, "UDP socket failed; data plane stops");
                return;
            }
            if !self.ready_taps.is_empty() {
                let now = self.clock.now();
                let ready = std::mem::take(&mut self.ready_taps);
                for &(li, ni) in &ready {
                    let l = &mut self.locals[li];
                    l.vl2.tap_readable(ni, &mut l.node, now, &mut self.tap_bufs);
                }
                self.ready_taps = ready;
                self.account_tap_rejects();
                if let Err(e) = self.flush(&mut tx) {
                    tracing::error!(error = %e, "UDP socket failed; data plane stops");
                    return;
                }
            }
        }
    }

    /// Waits for the UDP socket, the wake-up socket or a TAP; returns whether the first two
    /// are readable and leaves the (local, network) indices of readable TAPs in `ready_taps`.
    fn wait(&mut self, timeout: Duration) -> io::Result<(bool, bool)> {
        let t = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        let mut taps: Vec<(usize, usize)> = Vec::new();
        let mut fds = vec![
            PollFd::new(self.port.as_fd(), PollFlags::POLLIN),
            PollFd::new(self.wake.as_fd(), PollFlags::POLLIN),
        ];
        for (li, l) in self.locals.iter().enumerate() {
            for (ni, fd) in l.vl2.tap_fds().enumerate() {
                if let Some(fd) = fd {
                    taps.push((li, ni));
                    fds.push(PollFd::new(fd, PollFlags::POLLIN));
                }
            }
        }
        loop {
            match poll(&mut fds, t) {
                Ok(_) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        let ready = |f: &PollFd<'_>| {
            f.revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLERR))
        };
        let (udp, wake) = (ready(&fds[0]), ready(&fds[1]));
        self.ready_taps.clear();
        for (k, i) in taps.iter().enumerate() {
            if ready(&fds[k + 2]) {
                self.ready_taps.push(*i);
            }
        }
        drop(fds);
        if wake {
            let mut b = [0u8; 64];
            while self.wake.recv(&mut b).is_ok() {}
        }
        Ok((udp, wake))
    }

    fn receive(
        &mut self,
        rx: &mut [u8],
        metas: &mut [RecvMeta; RECV_BATCH],
        tx: &mut [u8],
    ) -> io::Result<()> {
        for _ in 0..RECV_ROUNDS {
            // What other threads handed over came in before what the socket holds now: taken
            // first, so that the packets of one peer keep their order as far as possible.
            self.take_handed();
            let mut chunks = rx.chunks_mut(RECV_SLOT);
            let mut slices: [IoSliceMut<'_>; RECV_BATCH] =
                std::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()));
            let n = match self.port.recv_batch(&mut slices, metas) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBADF | libc::ENOTSOCK | libc::EFAULT | libc::EINVAL)
                    ) =>
                {
                    return Err(e);
                }
                // Anything else (an ICMP error reported on the socket, ...) concerns one
                // datagram, not the socket: go back to waiting.
                Err(e) => {
                    tracing::debug!(error = %e, "UDP receive");
                    return Ok(());
                }
            };
            if n == 0 {
                return Ok(());
            }
            let now = self.clock.now();
            for (slice, meta) in slices.iter().zip(metas.iter()).take(n) {
                if meta.len == 0 {
                    // An empty datagram has no segments: the host's node counts it
                    // (malformed).
                    self.route(now, meta.addr, &[], false);
                }
                for datagram in udp::segments(slice, meta) {
                    self.received += 1;
                    self.route(now, meta.addr, datagram, false);
                }
            }
            self.drain_events();
            self.flush(tx)?;
        }
        Ok(())
    }

    /// Hands `datagram` (from `from`) to the local node it is for. One for an identity of
    /// another thread goes to that thread; one for no local identity (or too short to say)
    /// goes to the host's node on thread 0, which relays it as a root or counts it. A
    /// `forwarded` datagram came from another thread: it only moves on toward thread 0.
    fn route(&mut self, now: u64, from: SocketAddr, datagram: &[u8], forwarded: bool) {
        let dest = destination(datagram);
        if let Some(li) = dest.and_then(|a| self.index.get(&a).copied()) {
            self.locals[li]
                .node
                .handle_datagram(now, LocalSocket(0), from, datagram);
            return;
        }
        let owner = dest.map_or(0, |a| shard_of(a, self.host, self.links.len()));
        let to = if forwarded || owner == self.shard {
            0
        } else {
            owner
        };
        if to == self.shard {
            self.locals[0]
                .node
                .handle_datagram(now, LocalSocket(0), from, datagram);
        } else {
            self.forwarded += 1;
            self.links[to].hand((from, datagram.to_vec()));
        }
    }

    /// Routes the datagrams other threads handed over.
    fn take_handed(&mut self) {
        while let Ok((from, datagram)) = self.handed.try_recv() {
            self.route(self.clock.now(), from, &datagram, true);
        }
    }

    /// Sends everything the nodes have queued: datagrams are laid back to back in `tx`, up to
    /// [`QUEUED_DATAGRAMS`] a batch, and runs of equal-sized ones to one peer (the even pieces
    /// of fragmented packets) leave as one GSO send each.
    fn flush(&mut self, tx: &mut [u8]) -> io::Result<()> {
        let mut queued = [(0usize, SocketAddr::from(([0, 0, 0, 0], 0))); QUEUED_DATAGRAMS];
        let (mut n, mut at) = (0, 0);
        for li in 0..self.locals.len() {
            loop {
                let slot = &mut tx[at..at + MAX_DATAGRAM_LEN];
                let Some(t) = self.locals[li].node.poll_transmit(slot) else {
                    break;
                };
                if let Some(ttl) = t.ttl {
                    // Rare (NAT-opening datagrams): sent alone with the asked TTL.
                    self.send_with_ttl(&slot[..t.len], t.to, ttl)?;
                    continue;
                }
                queued[n] = (t.len, t.to);
                n += 1;
                at += t.len;
                if n == QUEUED_DATAGRAMS || tx.len() - at < MAX_DATAGRAM_LEN {
                    self.send_queued(tx, &queued[..n])?;
                    (n, at) = (0, 0);
                }
            }
        }
        if n > 0 {
            self.send_queued(tx, &queued[..n])?;
        }
        Ok(())
    }

    /// Sends the datagrams laid back to back at the start of `tx` (`queued`: length and
    /// destination of each).
    fn send_queued(&mut self, tx: &[u8], queued: &[(usize, SocketAddr)]) -> io::Result<()> {
        let mut transmits = Vec::with_capacity(queued.len());
        udp::coalesce(tx, queued, self.gso_segments, destination, &mut transmits);
        let out = self.port.send_batch(&transmits)?;
        if out.rejected > 0 {
            *self.local_drops.entry(ShellDrop::SendRejected).or_default() += out.rejected as u64;
        }
        Ok(())
    }

    fn send_with_ttl(&mut self, data: &[u8], to: SocketAddr, ttl: u8) -> io::Result<()> {
        use nix::sys::socket::{setsockopt, sockopt};
        let fd = self.port.as_fd();
        let ttl = i32::from(ttl);
        // On the dual-stack socket IPv4 destinations use IP_TTL, IPv6 ones the hop limit.
        let _ = setsockopt(&fd, sockopt::Ipv4Ttl, &ttl);
        let _ = setsockopt(&fd, sockopt::Ipv6Ttl, &ttl);
        let t = udp::Transmit {
            destination: to,
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        };
        let r = self.port.send_batch(std::slice::from_ref(&t));
        let _ = setsockopt(&fd, sockopt::Ipv4Ttl, &64);
        let _ = setsockopt(&fd, sockopt::Ipv6Ttl, &-1);
        if r?.rejected > 0 {
            *self.local_drops.entry(ShellDrop::SendRejected).or_default() += 1;
        }
        Ok(())
    }

    fn track(&mut self, peer: Address) -> Option<&mut PeerTrack> {
        if peer == self.address() {
            return None;
        }
        if self.peers.len() >= PEER_TABLE_LIMIT && !self.peers.contains_key(&peer) {
            return None;
        }
        Some(self.peers.entry(peer).or_default())
    }

    fn drain_events(&mut self) {
        for li in 0..self.locals.len() {
            self.drain_local(li);
        }
        self.account_tap_rejects();
    }

    /// Handles the events of local `li`'s node (VL2 packets to its networks; for the host,
    /// peer tracking and the control plane's events) and runs its VL2 output.
    fn drain_local(&mut self, li: usize) {
        let host = self.is_host(li);
        while let Some(ev) = self.locals[li].node.poll_event() {
            let l = &mut self.locals[li];
            match &ev {
                Event::PlanetUpdated { planet } if host => {
                    let planet = planet.clone();
                    self.planet_changed(planet);
                }
                Event::PeerLearned { peer, .. } | Event::PathLearned { peer, .. } => {
                    if l.vl2.awaits_config_from(*peer) {
                        l.vl2.nudge(self.clock.now());
                    }
                    if host {
                        self.track(*peer);
                    }
                }
                Event::HelloReceived {
                    peer,
                    protocol_version,
                    software,
                    ..
                } => {
                    let (pv, sw) = (*protocol_version, *software);
                    if host && let Some(t) = self.track(*peer) {
                        t.protocol_version = Some(pv);
                        t.version = Some(sw);
                    }
                }
                Event::Latency { peer, ms, .. } => {
                    if l.vl2.awaits_config_from(*peer) {
                        l.vl2.nudge(self.clock.now());
                    }
                    let ms = *ms;
                    if host && let Some(t) = self.track(*peer) {
                        t.latency_ms = Some(ms);
                    }
                }
                Event::Packet {
                    from,
                    verb,
                    packet_id,
                    payload,
                    ..
                } => {
                    let now = self.clock.now();
                    let handled = l
                        .vl2
                        .handle_packet(&l.node, now, *from, *verb, *packet_id, payload);
                    if !handled {
                        *self
                            .local_drops
                            .entry(ShellDrop::UnhandledPacket)
                            .or_default() += 1;
                    }
                    continue;
                }
                _ => {}
            }
            // A pod member's other events concern nobody outside the data plane.
            if host && self.events.try_send(ev).is_err() {
                self.events_lost += 1;
            }
        }
        let now = self.clock.now();
        let l = &mut self.locals[li];
        l.vl2.drain(&mut l.node, now);
    }

    fn account_tap_rejects(&mut self) {
        let n: u64 = self
            .locals
            .iter_mut()
            .map(|l| std::mem::take(&mut l.vl2.tap_rejected))
            .sum();
        if n > 0 {
            *self.local_drops.entry(ShellDrop::TapRejected).or_default() += n;
        }
    }

    /// Follows the host node's new planet: the roots as the snapshot and metrics see them,
    /// the planet new members start with, and the nodes of the pod members and standby pool
    /// identities (each judges it by the update rule itself).
    /// On thread 0 it is passed on to the other threads.
    fn planet_changed(&mut self, planet: World) {
        let me = self.address();
        self.roots = planet.roots.iter().map(|r| r.identity.address()).collect();
        let now = self.clock.now();
        let shard = self.shard;
        for (i, l) in self.locals.iter_mut().enumerate() {
            // The same rule judged it for the host: a member's node may only already have it.
            if shard != 0 || i > 0 {
                let _ = l.node.offer_planet(now, planet.clone());
            }
            l.vl2.set_roots(&self.roots);
        }
        if self.shard == 0 {
            for r in self.roots.iter().filter(|r| **r != me) {
                self.peers.entry(*r).or_default();
            }
            for link in &self.links[1..] {
                link.send(Command::Planet(Box::new(planet.clone())));
            }
            tracing::info!(
                id = planet.id,
                timestamp = planet.timestamp,
                roots = ?self.roots,
                "planet in force"
            );
        }
        self.planet = planet;
    }

    /// Gives the next queued pool identity its standby node, at most one per
    /// [`WARM_INTERVAL`]. Its first timeout (right away) says HELLO to the roots.
    fn warm_next(&mut self, now: u64) {
        if now < self.next_warm {
            return;
        }
        let Some(identity) = self.warm_queue.pop_front() else {
            return;
        };
        self.next_warm = now + WARM_INTERVAL;
        let address = identity.address();
        if self.index.contains_key(&address) {
            return;
        }
        match Node::new(NodeConfig::new(self.planet.clone()), vec![identity]) {
            Ok(node) => {
                let vl2 = Vl2::for_member(address, &self.roots);
                self.index.insert(address, self.locals.len());
                self.locals.push(Local {
                    address,
                    node,
                    vl2,
                    standby: true,
                });
            }
            Err(e) => tracing::warn!(%address, error = %e, "cannot warm a pool identity"),
        }
    }

    /// Adds pod member `m` as a new local identity (taking over its standby node when the
    /// identity was warmed).
    fn add_member(&mut self, m: NewMember) -> Result<(), AddMemberError> {
        let address = m.identity.address();
        let now = self.clock.now();
        if let Some(&i) = self.index.get(&address) {
            let l = &mut self.locals[i];
            if !l.standby {
                return Err(AddMemberError::Duplicate(address));
            }
            l.standby = false;
            l.vl2
                .attach_tap(m.nwid, m.tap, m.name, m.vouch, m.groups, now);
            return Ok(());
        }
        self.warm_queue.retain(|id| id.address() != address);
        let node = Node::new(NodeConfig::new(self.planet.clone()), vec![m.identity])?;
        let mut vl2 = Vl2::for_member(address, &self.roots);
        vl2.attach_tap(m.nwid, m.tap, m.name, m.vouch, m.groups, now);
        self.index.insert(address, self.locals.len());
        self.locals.push(Local {
            address,
            node,
            vl2,
            standby: false,
        });
        Ok(())
    }

    /// Removes pod member `member` once its networks released it at their controllers
    /// ([`Vl2::release`], bounded): `reply` then gets its TAPs, still open, for the caller to
    /// close (`None` at once if there is no such member).
    fn remove_member(&mut self, member: Address, reply: RemoveReply) {
        match self.index.get(&member) {
            Some(&i) if !self.is_host(i) => {
                let now = self.clock.now();
                self.locals[i].vl2.release(now);
                self.removing.push((member, reply, now));
                self.finish_removals();
            }
            _ => {
                let _ = reply.send(None);
            }
        }
    }

    /// Removes the members whose release is over (acknowledged or given up) and answers their
    /// removal.
    fn finish_removals(&mut self) {
        let mut k = 0;
        while k < self.removing.len() {
            let member = self.removing[k].0;
            let at = self
                .index
                .get(&member)
                .copied()
                .filter(|&i| !self.is_host(i));
            if at.is_some_and(|i| !self.locals[i].vl2.released()) {
                k += 1;
                continue;
            }
            let (_, reply, started) = self.removing.swap_remove(k);
            let release_ms = self.clock.now().saturating_sub(started);
            tracing::debug!(%member, release_ms, "pod member removed");
            let taps = at.map(|i| {
                let mut l = self.locals.swap_remove(i);
                self.index.remove(&member);
                if let Some(moved) = self.locals.get(i) {
                    self.index.insert(moved.address, i);
                }
                l.vl2.leave_all()
            });
            let _ = reply.send(taps);
        }
    }

    /// Answers commands; false when told to stop (or when the control plane is gone).
    fn serve_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Snapshot(reply)) => {
                    let s = self.snapshot(self.clock.now());
                    let _ = reply.send(s);
                }
                Ok(Command::AddMember(m, reply)) => {
                    let _ = reply.send(self.add_member(*m));
                }
                Ok(Command::RemoveMember(a, reply)) => self.remove_member(a, reply),
                Ok(Command::Member(a, nwid, reply)) => {
                    let view = self
                        .index
                        .get(&a)
                        .and_then(|&i| self.locals[i].vl2.member_view(nwid));
                    let _ = reply.send(view);
                }
                Ok(Command::Join(nwid, reply)) => {
                    let joined = self.locals[0].vl2.join(nwid, self.clock.now());
                    let _ = reply.send(joined);
                }
                Ok(Command::Leave(nwid, reply)) => {
                    let _ = reply.send(self.locals[0].vl2.leave(nwid));
                }
                Ok(Command::Controller(c)) => {
                    let now = self.clock.now();
                    let r = self.locals[0]
                        .vl2
                        .controller_api(&c.method, &c.path, &c.body, now);
                    let _ = c.reply.send(r);
                }
                Ok(Command::Warm(id)) => {
                    if id.has_secret() && self.warm_queue.len() < crate::pool::MAX_DEPTH {
                        self.warm_queue.push_back(*id);
                    }
                }
                Ok(Command::OfferPlanet(planet, reply)) => {
                    let now = self.clock.now();
                    let r = self.locals[0].node.offer_planet(now, (*planet).clone());
                    if r == Ok(PlanetChange::Newer) {
                        self.planet_changed(*planet);
                    }
                    let _ = reply.send(r);
                }
                Ok(Command::Planet(planet)) => self.planet_changed(*planet),
                Ok(Command::Drops(reply)) => {
                    let _ = reply.send(self.drops());
                }
                Ok(Command::Stop) | Err(mpsc::TryRecvError::Disconnected) => return false,
                Err(mpsc::TryRecvError::Empty) => return true,
            }
        }
    }

    fn drop_name(&mut self, r: DropReason) -> &'static str {
        if let Some(&n) = self.names.get(&r) {
            return n;
        }
        let n: &'static str = Box::leak(format!("{r:?}").into_boxed_str());
        self.names.insert(r, n);
        n
    }

    /// Drops by reason, summed over this thread's local identities' nodes and networks (and
    /// on thread 0 the TAP offload drops of the whole agent).
    fn drops(&mut self) -> Vec<(&'static str, u64)> {
        let mut node: HashMap<DropReason, u64> = HashMap::new();
        for l in &self.locals {
            for (r, n) in l.node.drops() {
                *node.entry(*r).or_default() += n;
            }
        }
        let mut totals: HashMap<&'static str, u64> = HashMap::new();
        for (r, n) in node {
            *totals.entry(self.drop_name(r)).or_default() += n;
        }
        for (r, n) in &self.local_drops {
            *totals.entry(r.name()).or_default() += n;
        }
        if self.shard == 0 {
            let o = tap::offload_counters();
            for (r, n) in OffloadDrop::ALL.iter().zip(o.drops) {
                *totals.entry(r.name()).or_default() += n;
            }
            *totals.entry(tap::TOO_LONG).or_default() += o.too_long;
        }
        for l in &self.locals {
            for (r, n) in l.vl2.drops() {
                *totals.entry(r).or_default() += n;
            }
        }
        let mut out: Vec<(&'static str, u64)> =
            totals.into_iter().filter(|(_, n)| *n > 0).collect();
        out.sort_unstable();
        out
    }

    fn snapshot(&mut self, now: u64) -> NodeSnapshot {
        let me = self.address();
        let node = &self.locals[0].node;
        self.peers
            .retain(|a, _| *a != me && (node.knows_peer(me, *a) || self.roots.contains(a)));
        let mut peers: Vec<PeerSnapshot> = self
            .peers
            .iter()
            .map(|(a, t)| {
                let role = if self.roots.contains(a) {
                    PeerRole::Root
                } else {
                    PeerRole::Leaf
                };
                let direct_path = node.direct_path(now, me, *a);
                PeerSnapshot {
                    address: *a,
                    role,
                    latency_ms: t.latency_ms,
                    direct_path,
                    relayed: direct_path.is_none() && role == PeerRole::Leaf,
                    version: t.version,
                    protocol_version: t.protocol_version,
                }
            })
            .collect();
        peers.sort_by_key(|p| (p.role == PeerRole::Leaf, p.address));
        let (is_root, online, stats) = (node.is_root(), node.is_online(now, me), *node.stats());
        NodeSnapshot {
            address: me,
            is_root,
            online,
            planet_id: self.planet.id,
            planet_timestamp: self.planet.timestamp,
            roots: self.roots.clone(),
            peers,
            stats,
            drops: self.drops(),
            events_lost: self.events_lost,
            local_addr: self.local_addr,
            networks: self.locals[0].vl2.snapshot(),
        }
    }

    /// The host's part of the metrics (thread 0): peers, paths by kind, relaying, TAP
    /// offloads.
    fn publish_host(&mut self, s: &NodeSnapshot) {
        let m = &self.metrics;
        set(&m.peers, s.peers.len());
        let direct = s.peers.iter().filter(|p| p.direct_path.is_some()).count();
        let relayed = s.peers.iter().filter(|p| p.relayed).count();
        set(
            &m.paths.get_or_create(&PathLabels {
                kind: PathKind::Direct,
            }),
            direct,
        );
        set(
            &m.paths.get_or_create(&PathLabels {
                kind: PathKind::Relayed,
            }),
            relayed,
        );
        let old = self.published_relay;
        m.relayed_packets
            .inc_by(s.stats.relayed.saturating_sub(old.relayed));
        m.relayed_bytes
            .inc_by(s.stats.relayed_bytes.saturating_sub(old.relayed_bytes));
        m.rendezvous_sent
            .inc_by(s.stats.rendezvous_sent.saturating_sub(old.rendezvous_sent));
        m.identity_validations.inc_by(
            s.stats
                .identity_validations
                .saturating_sub(old.identity_validations),
        );
        self.published_relay = s.stats;
        let o = tap::offload_counters();
        let old = self.published_offload;
        m.tap_superframes
            .inc_by(o.superframes.saturating_sub(old.superframes));
        m.tap_segments
            .inc_by(o.segments.saturating_sub(old.segments));
        m.tap_coalesced_writes
            .inc_by(o.coalesced.saturating_sub(old.coalesced));
        m.tap_coalesced_frames
            .inc_by(o.coalesced_frames.saturating_sub(old.coalesced_frames));
        self.published_offload = o;
    }

    /// Refreshes the metrics: this thread's drops by reason, datagrams, traffic and rule drops
    /// per network and controller requests; on thread 0 also peers, paths by kind, relaying
    /// and the TAP offloads.
    fn publish(&mut self, now: u64) {
        let drops = if self.shard == 0 {
            let s = self.snapshot(now);
            self.publish_host(&s);
            s.drops
        } else {
            self.drops()
        };
        let m = &self.metrics;
        for (reason, total) in drops {
            let seen = self.published_drops.entry(reason).or_default();
            if total > *seen {
                m.drops
                    .get_or_create(&DropLabels { reason })
                    .inc_by(total - *seen);
                *seen = total;
            }
        }
        let thread = ThreadLabels {
            thread: self.shard as u64,
        };
        m.dataplane_datagrams
            .get_or_create(&thread)
            .inc_by(self.received - self.published_received);
        m.dataplane_forwarded
            .get_or_create(&thread)
            .inc_by(self.forwarded - self.published_forwarded);
        (self.published_received, self.published_forwarded) = (self.received, self.forwarded);
        set(
            &m.dataplane_identities.get_or_create(&thread),
            self.locals.len(),
        );
        for l in &mut self.locals {
            for (nwid, c) in l.vl2.take_counters() {
                let network = nwid.to_string();
                for (direction, frames, bytes) in [
                    (Direction::Rx, c.rx_frames, c.rx_bytes),
                    (Direction::Tx, c.tx_frames, c.tx_bytes),
                ] {
                    let labels = TrafficLabels {
                        network: network.clone(),
                        direction,
                    };
                    m.packets.get_or_create(&labels).inc_by(frames);
                    m.bytes.get_or_create(&labels).inc_by(bytes);
                }
                for (inbound, direction) in [(false, Direction::Tx), (true, Direction::Rx)] {
                    for action in RuleAction::ALL {
                        let n = c.rule_hits.get(inbound, action);
                        if n > 0 {
                            m.rule_hits
                                .get_or_create(&RuleLabels {
                                    network: network.clone(),
                                    action: action.as_str(),
                                    direction,
                                })
                                .inc_by(n);
                        }
                    }
                }
            }
            for (result, n) in l.vl2.take_requests() {
                m.controller_requests
                    .get_or_create(&ControllerLabels {
                        kind: "network_config",
                        result,
                    })
                    .inc_by(n);
            }
        }
    }
}

fn set(g: &Gauge, v: usize) {
    g.set(i64::try_from(v).unwrap_or(i64::MAX));
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatwire_vl1::{Verb, wire};

    #[test]
    fn datagrams_are_demultiplexed_by_their_destination() {
        let (dest, src): (Address, Address) =
            ("a1b2c3d4e5".parse().unwrap(), "0102030405".parse().unwrap());
        let mut packet = Vec::new();
        wire::write_header(&mut packet, [7; 8], dest, src, Verb::FRAME);
        packet.resize(3000, 0x5a);
        let mut pieces = Vec::new();
        let n = wire::fragment(&packet, 1400, wire::Split::Even, &mut Vec::new(), |p| {
            pieces.push(p.to_vec())
        })
        .unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            wire::Packet::new_checked(&pieces[0][..])
                .unwrap()
                .destination(),
            dest
        );
        for p in &pieces {
            assert_eq!(destination(p), Some(dest), "head and fragments alike");
        }
        assert_eq!(
            wire::Fragment::new_checked(&pieces[1][..])
                .unwrap()
                .destination(),
            dest
        );
        // Too short to name one: the host node gets it (and counts it as malformed).
        assert_eq!(destination(&packet[..12]), None);
        assert_eq!(destination(&[]), None);
    }
}
