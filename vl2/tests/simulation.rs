//! A whole network on a virtual clock: a root, a controller (vl2 `Controller` over the
//! in-memory store) and four members, each a `flatwire_vl1::Node` on in-memory links,
//! members running the vl2 `member::Network` runtime. Members join and get pool IPs,
//! exchange real Ethernet/IPv4 frames, resolve each other with broadcast ARP (multicast
//! gather through the root), tag rules compiled from the rule language drop one flow
//! and allow the others, and a member de-authorized at the controller is cut off by
//! every other member through the revocation. A second run gives members IPv6 (RFC4193 and
//! a /64 pool): an ICMPv6 neighbor solicitation reaches only the owner through its
//! solicited-node group and the advertisement comes back, and an IPv4 multicast reaches
//! only the members that subscribed to its group.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::AtomicBool;

use flatwire_vl1::identity;
use flatwire_vl1::wire::Verb;
use flatwire_vl1::world::{Root, World, WorldType};
use flatwire_vl1::{Address, Event, Identity, LocalSocket, Node, NodeConfig};
use flatwire_vl2::controller::{
    Controller, ControllerStore, Member, MemoryStore, Network as NetworkJson, Pool, RequestOutcome,
    RouteJson, config_payloads, refusal_payload,
};
use flatwire_vl2::ip::rfc4193;
use flatwire_vl2::member::{
    DropReason, MemberOptions, Network, NetworkEvent, Output, Status, Upstream,
};
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::verbs::{ConfigRequest, CredentialsPayload};
use flatwire_vl2::{Mac, MulticastGroup, NetworkId};

/// Upper bound on the virtual time from start to every member holding a config. Measured:
/// 19 ms with 2 ms links (HELLO to the root, WHOIS of the controller through it, HELLO to
/// the controller, config request and the signed config), every run; the bound leaves 3×
/// for that path and fails if first packets wait for a timer tick again.
const JOIN_BOUND_MS: u64 = 60;

const RULES: &str = "
tag role
  id 1
  enum 10 web
  enum 20 db
  enum 30 ops
;
# web may not open anything towards ops; everything else is allowed.
drop
  tseq role web
  treq role ops
;
accept;
";

enum Role {
    Root(Upstream),
    Controller {
        ctl: Box<Controller<MemoryStore>>,
        upstream: Upstream,
        online: HashMap<Address, i64>,
    },
    Member {
        net: Box<Network>,
        tap: Vec<Vec<u8>>,
        events: Vec<NetworkEvent>,
    },
}

struct Host {
    node: Node,
    addr: Address,
    sock: SocketAddr,
    role: Role,
}

struct Sim {
    hosts: Vec<Host>,
    dir: HashMap<Address, Identity>,
    wire: VecDeque<(u64, SocketAddr, SocketAddr, Vec<u8>)>,
    now: u64,
    buf: Vec<u8>,
    rng: u64,
    nwid: NetworkId,
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

impl Sim {
    fn step(&mut self, dt: u64) {
        let end = self.now + dt;
        while self.now < end {
            self.now += 1;
            let now = self.now;
            for h in &mut self.hosts {
                if now >= h.node.poll_timeout() {
                    h.node.handle_timeout(now);
                }
                if let Role::Member { net, .. } = &mut h.role
                    && now as i64 >= net.poll_timeout()
                {
                    net.handle_timeout(now as i64);
                }
            }
            while self.wire.front().is_some_and(|w| w.0 <= now) {
                let (_, from, to, data) = self.wire.pop_front().unwrap();
                if let Some(h) = self.hosts.iter_mut().find(|h| h.sock == to) {
                    h.node.handle_datagram(now, LocalSocket(0), from, &data);
                }
            }
            for i in 0..self.hosts.len() {
                self.pump(i);
            }
        }
    }

    /// Moves one host's VL1 events into its role and the role's output back into VL1.
    fn pump(&mut self, i: usize) {
        let now = self.now;
        let dir = &self.dir;
        let lookup = |a: Address| dir.get(&a).map(Identity::to_public);
        let h = &mut self.hosts[i];
        let me = h.addr;
        let mut sends: Vec<(Address, Verb, Vec<u8>)> = Vec::new();
        while let Some(e) = h.node.poll_event() {
            let Event::Packet {
                from,
                verb,
                packet_id,
                payload,
                ..
            } = e
            else {
                continue;
            };
            match &mut h.role {
                Role::Root(up) => {
                    if let Some(p) =
                        up.handle_packet(now as i64, from, verb, packet_id, &payload, &|_, _| true)
                    {
                        sends.push((from, Verb::OK, p));
                    }
                }
                Role::Controller {
                    ctl,
                    upstream,
                    online,
                } => {
                    if verb == Verb::NETWORK_CONFIG_REQUEST {
                        let Ok(req) = ConfigRequest::decode(&payload) else {
                            continue;
                        };
                        let Some(who) = dir.get(&from) else { continue };
                        let rng = &mut self.rng;
                        let out = ctl
                            .handle_request(
                                req.nwid,
                                who,
                                &req.metadata_dictionary(),
                                packet_id,
                                now as i64,
                                &mut || xorshift(rng),
                            )
                            .unwrap();
                        if std::env::var("SIMDBG").is_ok() {
                            eprintln!(
                                "{now} ctl: request from {from}: {:?}",
                                matches!(out, RequestOutcome::Config(_))
                            );
                        }
                        match out {
                            RequestOutcome::Config(cfg) => {
                                online.insert(from, now as i64);
                                let upd = xorshift(&mut self.rng) | 1;
                                for (v, p) in
                                    config_payloads(ctl.identity(), &cfg, Some(packet_id), upd)
                                        .unwrap()
                                {
                                    sends.push((from, v, p));
                                }
                            }
                            RequestOutcome::Refuse(r) => {
                                sends.push((
                                    from,
                                    Verb::ERROR,
                                    refusal_payload(packet_id, r, req.nwid),
                                ));
                            }
                            RequestOutcome::Ignore => {}
                        }
                    } else {
                        let store = ctl.store();
                        let authorized = |n: NetworkId, a: Address| {
                            store
                                .get_member(n, a)
                                .ok()
                                .flatten()
                                .is_some_and(|m| m.authorized)
                        };
                        if let Some(p) = upstream.handle_packet(
                            now as i64,
                            from,
                            verb,
                            packet_id,
                            &payload,
                            &authorized,
                        ) {
                            sends.push((from, Verb::OK, p));
                        }
                    }
                }
                Role::Member { net, .. } => {
                    net.handle_packet(now as i64, from, verb, packet_id, &payload, &lookup);
                }
            }
        }
        if let Role::Member { net, tap, events } = &mut h.role {
            while let Some(o) = net.poll_output() {
                match o {
                    Output::Send { to, verb, payload } => {
                        if std::env::var("SIMDBG").is_ok() {
                            eprintln!("{now} {me} -> {to} {} {}", verb.name(), payload.len());
                        }
                        sends.push((to, verb, payload));
                    }
                    Output::Deliver(f) => tap.push(f),
                    Output::Event(e) => events.push(e),
                }
            }
        }
        for (to, verb, p) in sends {
            h.node.send(now, me, to, verb, &p).unwrap();
        }
        while let Some(t) = h.node.poll_transmit(&mut self.buf) {
            self.wire
                .push_back((now + 2, h.sock, t.to, self.buf[..t.len].to_vec()));
        }
    }

    /// Runs until every member in `members` holds a config (status OK), at most
    /// [`JOIN_BOUND_MS`]; returns the virtual time it took.
    fn join(&mut self, members: &[usize]) -> u64 {
        let t0 = self.now;
        while self.now - t0 < JOIN_BOUND_MS {
            self.step(1);
            if members.iter().all(|&m| self.net(m).status() == Status::Ok) {
                break;
            }
        }
        self.now - t0
    }

    fn net(&mut self, i: usize) -> &mut Network {
        match &mut self.hosts[i].role {
            Role::Member { net, .. } => net,
            _ => panic!("host {i} is not a member"),
        }
    }

    fn tap(&mut self, i: usize) -> &mut Vec<Vec<u8>> {
        match &mut self.hosts[i].role {
            Role::Member { tap, .. } => tap,
            _ => panic!("host {i} is not a member"),
        }
    }

    fn ctl(&mut self) -> &mut Controller<MemoryStore> {
        match &mut self.hosts[1].role {
            Role::Controller { ctl, .. } => ctl,
            _ => panic!("host 1 is the controller"),
        }
    }

    /// Writes a frame into member `i`'s TAP and runs its output.
    fn tap_write(&mut self, i: usize, frame: &[u8]) {
        let now = self.now as i64;
        self.net(i).handle_tap_frame(now, frame);
        self.pump(i);
    }

    fn ip(&mut self, i: usize) -> Ipv4Addr {
        let cfg = self.net(i).config().expect("config");
        cfg.static_ips
            .iter()
            .find_map(|a| match a.ip {
                IpAddr::V4(v) => Some(v),
                _ => None,
            })
            .expect("an IPv4 from the pool")
    }

    /// Member `i`'s IPv6 address with prefix length `bits` (88: RFC4193, 64: the pool).
    fn ip6(&mut self, i: usize, bits: u16) -> Ipv6Addr {
        let cfg = self.net(i).config().expect("config");
        cfg.static_ips
            .iter()
            .find_map(|a| match a.ip {
                IpAddr::V6(v) if a.port == bits => Some(v),
                _ => None,
            })
            .unwrap_or_else(|| panic!("member {i} has an IPv6 /{bits}"))
    }

    /// The members the root's multicast directory lists under `group`.
    fn root_members(&self, group: MulticastGroup) -> Vec<Address> {
        match &self.hosts[0].role {
            Role::Root(up) => {
                let mut v = up.members(self.nwid, group);
                v.sort();
                v
            }
            _ => unreachable!(),
        }
    }

    fn mac(&mut self, i: usize) -> Mac {
        self.net(i).mac()
    }

    /// Sends a UDP datagram from member `a` to member `b` and says whether `b`'s TAP got it.
    fn udp(&mut self, a: usize, b: usize, tagline: &[u8]) -> bool {
        let f = ipv4_udp(self.mac(a), self.mac(b), self.ip(a), self.ip(b), tagline);
        self.tap_write(a, &f);
        self.step(300);
        let got = self.tap(b).iter().any(|x| x == &f);
        self.tap(b).clear();
        got
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// A complete Ethernet II / IPv4 / UDP frame.
fn ipv4_udp(src: Mac, dst: Mac, sip: Ipv4Addr, dip: Ipv4Addr, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let total = 20 + 8 + data.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip.extend_from_slice(&sip.octets());
    ip.extend_from_slice(&dip.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&4000u16.to_be_bytes());
    f.extend_from_slice(&5000u16.to_be_bytes());
    f.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(data);
    f
}

/// The ICMPv6 checksum of `icmp` (checksum field included) under the IPv6 pseudo-header:
/// writing it into a zeroed field makes the frame valid, and a valid message sums to 0.
fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
    let mut p = Vec::new();
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 58]);
    p.extend_from_slice(icmp);
    checksum(&p)
}

/// Ethernet II / IPv6 (hop limit 255) / ICMPv6 with the checksum filled in.
fn ethernet_icmpv6(dst: Mac, src: Mac, sip: Ipv6Addr, dip: Ipv6Addr, mut icmp: Vec<u8>) -> Vec<u8> {
    let c = icmpv6_checksum(sip, dip, &icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&sip.octets());
    f.extend_from_slice(&dip.octets());
    f.extend_from_slice(&icmp);
    f
}

/// Whether an Ethernet/IPv6/ICMPv6 frame carries a correct ICMPv6 checksum.
fn icmpv6_valid(f: &[u8]) -> bool {
    let ip = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&f[o..o + 16]).unwrap());
    f.len() >= 62 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && {
        let len = usize::from(u16::from_be_bytes([f[18], f[19]]));
        f.len() == 54 + len && icmpv6_checksum(ip(22), ip(38), &f[54..]) == 0
    }
}

/// The solicited-node multicast address of `ip` (ff02::1:ffxx:yyzz, RFC 4291 §2.7.1).
fn solicited_node(ip: Ipv6Addr) -> Ipv6Addr {
    let o = ip.octets();
    let mut a = [0u8; 16];
    a[0] = 0xff;
    a[1] = 0x02;
    a[11] = 1;
    a[12] = 0xff;
    a[13..].copy_from_slice(&o[13..]);
    Ipv6Addr::from(a)
}

/// A Neighbor Solicitation (RFC 4861 §4.3) from `sha`/`src` for `target`, sent to the
/// target's solicited-node address and its MAC `33:33:ff:xx:yy:zz`, with the
/// source link-layer address option.
fn neighbor_solicitation(sha: Mac, src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
    let dip = solicited_node(target);
    let d = dip.octets();
    let dst = Mac([0x33, 0x33, d[12], d[13], d[14], d[15]]);
    let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[1, 1]);
    icmp.extend_from_slice(&sha.0);
    ethernet_icmpv6(dst, sha, src, dip, icmp)
}

/// The solicited Neighbor Advertisement (RFC 4861 §4.4; S and O set) answering `ns`,
/// unicast back to the solicitor, with the target link-layer address option.
fn neighbor_advertisement(ns: &[u8], tha: Mac) -> Vec<u8> {
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&ns[62..78]).unwrap());
    let solicitor = Ipv6Addr::from(<[u8; 16]>::try_from(&ns[22..38]).unwrap());
    let mut icmp = vec![136, 0, 0, 0, 0x60, 0, 0, 0];
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&tha.0);
    let to = Mac(<[u8; 6]>::try_from(&ns[6..12]).unwrap());
    ethernet_icmpv6(to, tha, target, solicitor, icmp)
}

/// A broadcast ARP request (who-has `tpa` tell `spa`).
fn arp_request(sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&Mac::BROADCAST.0);
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f
}

/// The unicast ARP reply to `req`.
fn arp_reply(req: &[u8], sha: Mac) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&req[22..28]);
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&sha.0);
    f.extend_from_slice(&req[38..42]);
    f.extend_from_slice(&req[22..32]);
    f
}

fn setup() -> Sim {
    let cancel = AtomicBool::new(false);
    let ids: Vec<Identity> = (0..6)
        .map(|_| Identity::generate(&cancel).unwrap())
        .collect();
    let (pk, sk) = identity::generate_key_pair().unwrap();
    let sock = |i: usize| -> SocketAddr { format!("198.18.0.{}:9993", i + 1).parse().unwrap() };
    let planet = World::create(
        WorldType::Planet,
        1,
        1,
        pk,
        vec![Root {
            identity: ids[0].to_public(),
            stable_endpoints: vec![sock(0)],
        }],
        &sk,
    )
    .unwrap();
    let nwid = NetworkId::new(ids[1].address(), 0x00_0001);
    let start = 1_000i64;

    // The network: private, a /24 pool, broadcast on, tag rules from the rule language.
    let compiled = compile(RULES).expect("rules compile");
    let cli = compiled.to_cli_json().to_value();
    let mut n = NetworkJson::new(nwid, start);
    n.private = true;
    n.enable_broadcast = true;
    n.multicast_limit = 32;
    n.ip_assignment_pools = vec![Pool {
        ip_range_start: "10.9.0.10".into(),
        ip_range_end: "10.9.0.200".into(),
    }];
    // IPv6 too: an RFC4193 address per member and one from a /64 pool.
    n.ip_assignment_pools.push(Pool {
        ip_range_start: "fd00:feed::".into(),
        ip_range_end: "fd00:feed::ffff:ffff:ffff:ffff".into(),
    });
    n.routes = vec![
        RouteJson {
            target: "10.9.0.0/24".into(),
            via: None,
        },
        RouteJson {
            target: "fd00:feed::/64".into(),
            via: None,
        },
    ];
    n.v4_assign_mode.zt = true;
    n.v6_assign_mode.zt = true;
    n.v6_assign_mode.rfc4193 = true;
    n.rules = cli["config"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    n.tags = cli["config"]["tags"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut store = MemoryStore::default();
    store.put_network(&mut n).unwrap();
    // Members 2..5: web, db, ops, db.
    for (i, role) in [(2, 10u64), (3, 20), (4, 30), (5, 20)] {
        let mut m = Member::new(nwid, ids[i].address(), start);
        m.authorized = true;
        m.tags = vec![(1, role)];
        store.put_member(&mut m).unwrap();
    }

    let dir: HashMap<Address, Identity> = ids.iter().map(|i| (i.address(), i.clone())).collect();
    let hosts = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let role = match i {
                0 => Role::Root(Upstream::new(7)),
                1 => Role::Controller {
                    ctl: Box::new(Controller::new(id.clone(), store.clone())),
                    upstream: Upstream::new(8),
                    online: HashMap::new(),
                },
                _ => Role::Member {
                    net: Box::new(Network::join(
                        id.address(),
                        nwid,
                        MemberOptions {
                            seed: 1000 + i as u64,
                            ..MemberOptions::default()
                        },
                        start,
                    )),
                    tap: Vec::new(),
                    events: Vec::new(),
                },
            };
            Host {
                node: Node::new(NodeConfig::new(planet.clone()), vec![id.clone()]).unwrap(),
                addr: id.address(),
                sock: sock(i),
                role,
            }
        })
        .collect();
    let mut sim = Sim {
        hosts,
        dir,
        wire: VecDeque::new(),
        now: start as u64,
        buf: vec![0u8; flatwire_vl1::node::MAX_DATAGRAM_LEN],
        rng: 0x1234_5678_9abc_def1,
        nwid,
    };
    let root = sim.hosts[0].addr;
    for i in 2..6 {
        sim.net(i).set_upstreams(vec![root]);
    }
    sim
}

#[test]
fn members_join_talk_obey_tag_rules_and_revocation_cuts_one_off() {
    let mut sim = setup();
    let members = [2usize, 3, 4, 5];
    let (web, db, ops, db2) = (2usize, 3usize, 4usize, 5usize);

    // 1. Join: every member gets a signed config with an IP from the pool within
    // JOIN_BOUND_MS (VL1 first has to reach the root and WHOIS the controller).
    let took = sim.join(&members);
    eprintln!("join took {took} ms of virtual time");
    // Let the last member's LIKE announcements reach the root.
    sim.step(50);
    let mut ips = Vec::new();
    for &m in &members {
        if sim.net(m).status() != Status::Ok {
            let n = sim.net(m);
            eprintln!(
                "member {m}: chunk {} config {} malformed {}",
                n.drop_count(DropReason::BadChunk),
                n.drop_count(DropReason::BadConfig),
                n.drop_count(DropReason::Malformed)
            );
            eprintln!("vl1 drops {:?}", sim.hosts[m].node.drops());
            eprintln!("ctl vl1 drops {:?}", sim.hosts[1].node.drops());
        }
        assert_eq!(sim.net(m).status(), Status::Ok, "member {m} configured");
        let ip = sim.ip(m);
        let o = ip.octets();
        assert!(
            o[..3] == [10, 9, 0] && (10..=200).contains(&o[3]),
            "{ip} is in the pool"
        );
        assert!(!ips.contains(&ip), "IPs are unique");
        ips.push(ip);
        let cfg = sim.net(m).config().unwrap();
        assert!(cfg.com.is_some() && cfg.private);
        assert!(cfg.rules.len() > 1, "compiled rules arrived");
        match &sim.hosts[m].role {
            Role::Member { events, .. } => {
                assert!(events.contains(&NetworkEvent::ConfigChanged));
                assert!(events.contains(&NetworkEvent::StatusChanged(Status::Ok)));
            }
            _ => unreachable!(),
        }
    }

    // 2. Broadcast ARP: web asks for db's IP; the multicast goes out through a gather at
    // the root, reaches db only (the ARP group is per IP), and db's unicast reply returns.
    let (wm, wip, dip) = (sim.mac(web), sim.ip(web), sim.ip(db));
    let req = arp_request(wm, wip, dip);
    sim.tap_write(web, &req);
    sim.step(1000);
    assert!(
        sim.tap(db).iter().any(|f| f == &req),
        "db received the ARP request"
    );
    for other in [ops, db2] {
        assert!(
            !sim.tap(other).iter().any(|f| f == &req),
            "ARP for db's IP is not flooded to {other}"
        );
    }
    let dm = sim.mac(db);
    let reply = arp_reply(&req, dm);
    sim.tap_write(db, &reply);
    sim.step(500);
    assert!(
        sim.tap(web).iter().any(|f| f == &reply),
        "web received the ARP reply"
    );
    for &m in &members {
        sim.tap(m).clear();
    }

    // 3. Ethernet broadcast (not ARP) from db reaches every other member.
    let mut bcast = Vec::new();
    bcast.extend_from_slice(&Mac::BROADCAST.0);
    bcast.extend_from_slice(&dm.0);
    bcast.extend_from_slice(&0x88b5u16.to_be_bytes());
    bcast.extend_from_slice(b"hello everyone");
    sim.tap_write(db, &bcast);
    sim.step(1000);
    for m in [web, ops, db2] {
        assert!(
            sim.tap(m).iter().any(|f| f == &bcast),
            "broadcast reached {m}"
        );
        sim.tap(m).clear();
    }

    // 4. Unicast IPv4 between members, and the tag rule: web -> ops is dropped, the
    // rest (including ops -> web) is allowed.
    assert!(sim.udp(web, db, b"web->db"), "web reaches db");
    assert!(sim.udp(db, web, b"db->web"), "db reaches web");
    assert!(sim.udp(db, ops, b"db->ops"), "db reaches ops");
    assert!(
        sim.udp(ops, web, b"ops->web"),
        "ops reaches web (rule is one-way)"
    );
    assert!(sim.udp(db2, ops, b"db2->ops"), "db2 reaches ops");
    let before = sim.net(web).drop_count(DropReason::RulesOutbound);
    assert!(!sim.udp(web, ops, b"web->ops"), "web -> ops is dropped");
    assert!(
        sim.net(web).drop_count(DropReason::RulesOutbound) > before,
        "dropped by web's outbound rules"
    );
    // A sender that skips its own rules is still stopped by the receiver's rules.
    let f = ipv4_udp(sim.mac(web), sim.mac(ops), wip, sim.ip(ops), b"forged");
    let mut payload = Vec::new();
    payload.extend_from_slice(&sim.nwid.to_bytes());
    payload.extend_from_slice(&f[12..]);
    let (wa, oa) = (sim.hosts[web].addr, sim.hosts[ops].addr);
    // The first copy is refused by ops' gate (web never pushed it credentials); ops asks
    // for them with ERROR NEED_MEMBERSHIP_CERTIFICATE and web pushes its COM and tags.
    let gate_before = sim.net(ops).drop_count(DropReason::NotMember);
    let now = sim.now;
    sim.hosts[web]
        .node
        .send(now, wa, oa, Verb::FRAME, &payload)
        .unwrap();
    sim.step(300);
    assert_eq!(
        sim.net(ops).drop_count(DropReason::NotMember),
        gate_before + 1,
        "unknown sender refused by the gate"
    );
    assert!(
        sim.net(ops).is_member(wa),
        "credentials were pushed on request"
    );
    let before = sim.net(ops).drop_count(DropReason::RulesInbound);
    let now = sim.now;
    sim.hosts[web]
        .node
        .send(now, wa, oa, Verb::FRAME, &payload)
        .unwrap();
    sim.step(300);
    assert!(
        sim.net(ops).drop_count(DropReason::RulesInbound) > before,
        "ops' inbound rules dropped the frame"
    );
    assert!(sim.tap(ops).is_empty());

    // 5. Everyone keeps talking for three minutes (config refreshes, re-announcements).
    for _ in 0..6 {
        sim.step(30_000);
        assert!(sim.udp(db2, db, b"keepalive"));
    }
    for &m in &members {
        assert_eq!(sim.net(m).status(), Status::Ok);
    }
    // db2 talks to everyone, so every member holds its credentials.
    let db2a = sim.hosts[db2].addr;
    for m in [web, db, ops] {
        assert!(sim.udp(db2, m, b"hello from db2"));
        assert!(sim.net(m).is_member(db2a), "member {m} admits db2");
    }

    // 6. De-authorize db2 at the controller: it revokes db2's COM and pushes the
    // revocation to every online member; they forward it (fast propagation).
    let nwid = sim.nwid;
    let now = sim.now as i64;
    let mut m = sim.ctl().store().get_member(nwid, db2a).unwrap().unwrap();
    m.authorized = false;
    sim.ctl().store_mut().put_member(&mut m).unwrap();
    let rev = sim.ctl().revoke(nwid, db2a, 0x5eed, now).unwrap();
    let mut push = Vec::new();
    CredentialsPayload::revocation(rev).encode(&mut push);
    let online: Vec<Address> = match &sim.hosts[1].role {
        Role::Controller { online, .. } => online
            .iter()
            .filter(|(_, t)| now - **t < 120_000)
            .map(|(a, _)| *a)
            .collect(),
        _ => unreachable!(),
    };
    assert_eq!(online.len(), 4, "all members are online at the controller");
    let ca = sim.hosts[1].addr;
    for a in online {
        sim.hosts[1]
            .node
            .send(sim.now, ca, a, Verb::NETWORK_CREDENTIALS, &push)
            .unwrap();
    }
    // Bound: every other member refuses db2 within 2 s of virtual time.
    sim.step(2000);
    for m in [web, db, ops] {
        assert!(!sim.net(m).is_member(db2a), "member {m} cut db2 off");
        match &sim.hosts[m].role {
            Role::Member { events, .. } => {
                assert!(events.contains(&NetworkEvent::PeerRevoked(db2a)));
            }
            _ => unreachable!(),
        }
    }
    for m in [web, db, ops] {
        assert!(
            !sim.udp(db2, m, b"after revocation"),
            "db2 cannot reach {m}"
        );
    }
    // The others still talk.
    assert!(sim.udp(web, db, b"still fine"));
    // db2's next config request is refused.
    sim.step(65_000);
    assert_eq!(sim.net(db2).status(), Status::AccessDenied);
    for m in [web, db, ops] {
        assert!(
            !sim.udp(db2, m, b"still revoked"),
            "db2 stays cut off from {m}"
        );
    }
}

#[test]
fn ipv6_neighbor_discovery_and_ip_multicast_reach_only_the_subscribers() {
    let mut sim = setup();
    let members = [2usize, 3, 4, 5];
    let (web, db, ops, db2) = (2usize, 3usize, 4usize, 5usize);
    let took = sim.join(&members);
    assert!(took < JOIN_BOUND_MS, "joined in {took} ms");
    sim.step(50);

    // 1. IPv6 addresses: RFC4193 from the assign mode, and one from the /64 pool (the
    // controller's first pick for a pool this large is start + the ZeroTier address).
    // Every member subscribed to the solicited-node group of its addresses, with ZeroTier's
    // NDP rule (33:33:ff + the last three address bytes, ADI 0), and the root knows it.
    let nwid = sim.nwid;
    for &m in &members {
        let a = sim.hosts[m].addr;
        let r = sim.ip6(m, 88);
        assert_eq!(r, rfc4193(nwid, a), "member {m} holds its RFC4193 address");
        let p = sim.ip6(m, 64);
        let o = p.octets();
        assert_eq!(
            o[..8],
            [0xfd, 0, 0xfe, 0xed, 0, 0, 0, 0],
            "{p} is in the pool"
        );
        assert_eq!(o[11..], a.to_bytes(), "{p} embeds {a}");
        for ip in [r, p] {
            let g = MulticastGroup::ndp(ip);
            assert_eq!(g.mac.0[..3], [0x33, 0x33, 0xff]);
            assert_eq!(g.mac.0[3..], ip.octets()[13..]);
            assert_eq!(g.adi, 0, "NDP groups carry no ADI");
            assert!(
                sim.root_members(g).contains(&a),
                "the root lists {a} under {ip}'s solicited-node group"
            );
        }
    }

    // 2. NDP: web solicits db's pool address. The NS goes to the solicited-node group
    // (gathered from the root), reaches db only, and db's unicast NA comes back.
    let (wm, dm) = (sim.mac(web), sim.mac(db));
    let (wip, dip) = (sim.ip6(web, 64), sim.ip6(db, 64));
    let ns = neighbor_solicitation(wm, wip, dip);
    assert!(icmpv6_valid(&ns));
    let group = MulticastGroup::ndp(dip);
    assert_eq!(Mac(<[u8; 6]>::try_from(&ns[..6]).unwrap()), group.mac);
    let dba = sim.hosts[db].addr;
    assert_eq!(
        sim.root_members(group),
        vec![dba],
        "only db is in the group"
    );
    sim.tap_write(web, &ns);
    sim.step(1000);
    assert_eq!(
        sim.net(web).group_members(group),
        vec![dba],
        "web learned the group's members from the gather"
    );
    let got: Vec<Vec<u8>> = sim.tap(db).drain(..).collect();
    assert_eq!(got, vec![ns.clone()], "db received the NS, byte for byte");
    assert!(icmpv6_valid(&got[0]));
    for other in [ops, db2] {
        assert!(
            !sim.tap(other).iter().any(|f| f[12..14] == [0x86, 0xdd]),
            "the NS is not flooded to {other}"
        );
    }
    let na = neighbor_advertisement(&ns, dm);
    assert!(icmpv6_valid(&na));
    assert_eq!(na[..6], wm.0, "the NA is unicast to web");
    sim.tap_write(db, &na);
    sim.step(500);
    let got: Vec<Vec<u8>> = sim.tap(web).drain(..).collect();
    assert_eq!(got, vec![na], "web received db's NA");
    for other in [ops, db2] {
        assert!(sim.tap(other).is_empty());
    }

    // 3. IP multicast: web and ops join 239.1.2.3 (MAC 01:00:5e:01:02:03, ADI 0) and
    // announce it with MULTICAST_LIKE; db's datagram to the group reaches those two only.
    let g = MulticastGroup::for_mac(Mac([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]));
    let now = sim.now as i64;
    for m in [web, ops] {
        sim.net(m).subscribe(now, g);
        sim.pump(m);
    }
    sim.step(100);
    let mut subscribed = vec![sim.hosts[web].addr, sim.hosts[ops].addr];
    subscribed.sort();
    assert_eq!(sim.root_members(g), subscribed);
    let f = ipv4_udp(
        dm,
        g.mac,
        sim.ip(db),
        Ipv4Addr::new(239, 1, 2, 3),
        b"to the group",
    );
    sim.tap_write(db, &f);
    sim.step(1000);
    for m in [web, ops] {
        let got: Vec<Vec<u8>> = sim.tap(m).drain(..).collect();
        assert_eq!(
            got,
            vec![f.clone()],
            "member {m} received the group datagram"
        );
    }
    assert!(sim.tap(db2).is_empty(), "db2 did not subscribe");
    assert!(sim.tap(db).is_empty(), "no echo to the sender");
}
