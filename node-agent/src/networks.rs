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
//! request of that member (members re-ask every 60 s; nothing is pushed). The controller writes
//! back what it decides (assigned IPs, the pinned identity, revisions) atomically. Its index of
//! assigned IPs is built when the agent starts: addresses written into member files by hand
//! while it runs are not guarded against re-assignment until the next start.
//!
//! [`vl2::member::Network`]: flatwire_vl2::member::Network

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::mpsc;

use flatwire_vl1::{Address, Node, Verb};
use flatwire_vl2::Mac;
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    ApiError, Controller, ControllerStore, FileStore, RequestOutcome, StoreError, config_payloads,
    refusal_payload,
};
use flatwire_vl2::member::{self, MemberOptions, Network, NetworkEvent, Output, Status, Upstream};
use flatwire_vl2::netconf::{DEFAULT_MTU, Dns, FLAG_ENABLE_BROADCAST, NetworkConfig, Route};
use flatwire_vl2::verbs::ConfigRequest;
use flatwire_vl2::vouch::Vouch;

use crate::tap::{self, IpPrefix, LinkRoute, LinkState, Tap, TapConfig};

/// Frames read from one TAP per `recv_batch`.
const TAP_BATCH: usize = 32;
/// Bytes per TAP receive buffer: the largest ZeroTier MTU plus the Ethernet header.
const TAP_FRAME: usize = 10_000 + 14;
/// TAP batches read before the thread looks at other work again.
const TAP_ROUNDS: usize = 8;
/// Least time between two config requests `Vl2::nudge` sends for one network (ms): more
/// than the controller's 1 s duplicate window.
pub const NUDGE_INTERVAL: u64 = 1100;
/// Most nudges per network.
const MAX_NUDGES: u8 = 8;

/// The host-side TAP name of a network: `fw` and the last 8 hex digits of its ID.
pub fn tap_name(nwid: NetworkId) -> String {
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
}

impl Joined {
    fn wants_nudge(&self) -> bool {
        self.net.config().is_none()
            && self.net.status() == Status::RequestingConfiguration
            && self.nudges < MAX_NUDGES
    }
}

/// The controller role.
struct Ctl {
    ctl: Controller<FileStore>,
    upstream: Upstream,
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
    link_jobs: Option<mpsc::Sender<LinkJob>>,
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
pub(crate) const DROPS: [(member::DropReason, &str); 12] = [
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
                ctl: Controller::new(identity.clone(), FileStore::open(dir)?),
                upstream: Upstream::new(seed()),
            }),
            None => None,
        };
        let mut v = Self {
            me,
            ctl,
            upstream: is_root.then(|| Upstream::new(seed())),
            nets: Vec::new(),
            upstreams: roots.iter().copied().filter(|r| *r != me).collect(),
            rng: seed(),
            sends: Vec::new(),
            link_jobs: None,
            tap_rejected: 0,
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
            link_jobs: None,
            tap_rejected: 0,
        }
    }

    /// Joins `nwid` as this (pod) member on `tap`, a TAP already moved into the pod's
    /// namespace (`name` for logs), presenting `vouch` in its config requests. The link is
    /// not configured here: read the config with [`Vl2::member_view`].
    pub(crate) fn attach_tap(
        &mut self,
        nwid: NetworkId,
        tap: Tap,
        name: String,
        vouch: Option<Vouch>,
        now: u64,
    ) {
        let net = self.member(nwid, vouch.clone(), now);
        tracing::info!(%nwid, member = %self.me, tap = %name, mac = %net.mac(), "pod member joined");
        self.nets.push(Joined {
            net,
            tap: Some(tap),
            name,
            applied: None,
            host_link: false,
            vouch,
            nudged: 0,
            nudges: 0,
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

    /// Sends the config request of every network still without a config again, now (at most
    /// once per [`NUDGE_INTERVAL`] each). Call when a controller becomes reachable and then
    /// periodically while online: the member runtime only retries on its 5 s tick, a request
    /// sent before the first path existed is lost, and controllers ignore a member's request
    /// within 1 s of its previous one (as after a quick restart).
    pub(crate) fn nudge(&mut self, now: u64) {
        for i in 0..self.nets.len() {
            let j = &self.nets[i];
            if !j.wants_nudge() || now < j.nudged + NUDGE_INTERVAL {
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

    /// Answers a `/controller/...` API request (`path`: the segments after `controller`);
    /// `None` without the controller role. GET/POST/DELETE of `network`, `network/<nwid>`,
    /// `network/<nwid>/member` and `network/<nwid>/member/<address>`, in ZeroTier One's JSON.
    pub(crate) fn controller_api(
        &mut self,
        method: &str,
        path: &[String],
        body: &[u8],
        now: u64,
    ) -> Option<(u16, serde_json::Value)> {
        let ctl = &mut self.ctl.as_mut()?.ctl;
        Some(controller_api(ctl, method, path, body, now as i64))
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
        self.nets.push(Joined {
            net,
            tap,
            name,
            applied: None,
            host_link: true,
            vouch: None,
            nudged: 0,
            nudges: 0,
        });
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
                if j.wants_nudge() {
                    t.min(j.nudged + NUDGE_INTERVAL)
                } else {
                    t
                }
            })
            .min()
            .unwrap_or(u64::MAX)
    }

    /// Runs due member timers and expires multicast directories.
    pub(crate) fn handle_timeout(&mut self, now: u64) {
        for j in &mut self.nets {
            if now as i64 >= j.net.poll_timeout() {
                j.net.handle_timeout(now as i64);
            }
        }
        if let Some(u) = self.upstream.as_mut() {
            u.expire(now as i64);
        }
        if let Some(c) = self.ctl.as_mut() {
            c.upstream.expire(now as i64);
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
        let lookup = |a: Address| node.peer_identity(me, a).cloned();
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
        for j in &mut self.nets {
            j.net
                .handle_packet(now as i64, from, verb, packet_id, payload, &lookup);
        }
        if matches!(verb, Verb::MULTICAST_LIKE | Verb::MULTICAST_GATHER) {
            let reply = if let Some(Ctl { ctl, upstream }) = self.ctl.as_mut() {
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
                upstream.handle_packet(now as i64, from, verb, packet_id, payload, &authorized)
            } else if let Some(u) = self.upstream.as_mut() {
                u.handle_packet(now as i64, from, verb, packet_id, payload, &|_, _| true)
            } else {
                None
            };
            if let Some(p) = reply {
                self.sends.push((from, Verb::OK, p));
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
        let Some(who) = node.peer_identity(self.me, from).cloned() else {
            tracing::debug!(%from, "config request from a peer of unknown identity");
            return;
        };
        let nwid = req.nwid;
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
                j.net.handle_tap_frame(now as i64, &b[..*len]);
            }
            total += n;
            self.drain(node, now);
            if n < TAP_BATCH {
                break;
            }
        }
        total
    }

    /// Sends what the members and the controller want sent, writes delivered frames to the
    /// TAPs and acts on member events (a new config reconfigures the link).
    pub(crate) fn drain(&mut self, node: &mut Node, now: u64) {
        let me = self.me;
        for (to, verb, p) in self.sends.drain(..) {
            if let Err(e) = node.send(now, me, to, verb, &p) {
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
                        match j.tap.as_ref().map(|t| t.queues()[0].send_batch(&[&frame])) {
                            Some(Ok(o)) if o.sent == 1 => {}
                            _ => self.tap_rejected += 1,
                        }
                        j.net.recycle(frame);
                    }
                    Output::Event(NetworkEvent::StatusChanged(s)) => {
                        tracing::info!(nwid = %j.net.id(), status = ?s, "network status");
                    }
                    Output::Event(NetworkEvent::ConfigChanged) => {
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
            })
            .collect()
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
