//! Simulation on a virtual clock: two roots, nodes behind NATs, relaying, introduction
//! (RENDEZVOUS) ending in a direct path, and a lost root routed around.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;

use flatwire_vl1::identity;
use flatwire_vl1::wire::Verb;
use flatwire_vl1::world::{Root, World, WorldType};
use flatwire_vl1::{Address, Event, Identity, LocalSocket, Node, NodeConfig};

/// How long a NAT keeps a UDP mapping or an unanswered inbound entry (Linux conntrack's
/// default for unreplied UDP).
const NAT_TIMEOUT: u64 = 30_000;

/// A port-preserving NAT behaving like Linux MASQUERADE: an inside host's datagram to a
/// remote endpoint opens a mapping on the same public port, and inbound datagrams pass only
/// from endpoints with a live mapping. An unsolicited inbound datagram leaves an entry on
/// the router (refreshed by each further one) that takes the preserved port toward that
/// remote: a mapping opened while it lives gets another public port, which the remote side
/// does not expect.
struct Nat {
    public: SocketAddr,
    /// Remote endpoint -> (public port, last outbound time).
    mappings: HashMap<SocketAddr, (u16, u64)>,
    /// Remote endpoint -> last unsolicited inbound time.
    unsolicited: HashMap<SocketAddr, u64>,
}

impl Nat {
    fn new(public: SocketAddr) -> Self {
        Self {
            public,
            mappings: HashMap::new(),
            unsolicited: HashMap::new(),
        }
    }

    /// The public source address of a datagram going out to `to` at `now`.
    fn outbound(&mut self, now: u64, to: SocketAddr) -> SocketAddr {
        let taken = self
            .unsolicited
            .get(&to)
            .is_some_and(|t| now - t < NAT_TIMEOUT);
        let port = match self.mappings.get(&to) {
            Some((port, t)) if now - t < NAT_TIMEOUT => *port,
            _ if taken => self.public.port() + 1,
            _ => self.public.port(),
        };
        self.mappings.insert(to, (port, now));
        SocketAddr::new(self.public.ip(), port)
    }

    /// Whether a datagram from `from` to public port `port` reaches the inside host.
    fn inbound(&mut self, now: u64, from: SocketAddr, port: u16) -> bool {
        match self.mappings.get(&from) {
            Some((p, t)) if *p == port && now - t < NAT_TIMEOUT => true,
            _ => {
                self.unsolicited.insert(from, now);
                false
            }
        }
    }
}

struct Host {
    node: Node,
    addr: Address,
    private: SocketAddr,
    nat: Option<Nat>,
    alive: bool,
    received: Vec<(Address, Vec<u8>)>,
    /// One-way delay of the host's access link (ms), added to the 1 ms of every datagram.
    delay: u64,
    /// How long the node takes to get to a datagram that passed its NAT (ms): a busy agent.
    lag: u64,
    /// Datagrams that passed the NAT, waiting for the node: (due time, from, datagram).
    inbox: VecDeque<(u64, SocketAddr, Vec<u8>)>,
}

impl Host {
    fn public(&self) -> SocketAddr {
        self.nat.as_ref().map_or(self.private, |n| n.public)
    }
}

struct Sim {
    hosts: Vec<Host>,
    wire: VecDeque<(u64, SocketAddr, SocketAddr, Vec<u8>)>,
    now: u64,
    relayed_by: HashMap<usize, u64>,
    /// Low-TTL NAT-opening datagrams sent (they open the sender's NAT, never arrive).
    junk_sent: u64,
    /// Until this time, datagrams between these two public IPs are lost on the way.
    blackhole: Option<(u64, IpAddr, IpAddr)>,
    buf: Vec<u8>,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

impl Sim {
    fn step(&mut self, dt: u64) {
        let end = self.now + dt;
        while self.now < end {
            self.now += 1;
            let now = self.now;
            for h in &mut self.hosts {
                if h.alive && now >= h.node.poll_timeout() {
                    h.node.handle_timeout(now);
                }
            }
            // Deliver datagrams whose delay (1 ms plus both access links) has passed.
            let mut next = 0;
            while next < self.wire.len() {
                let (sent, _, to, _) = &self.wire[next];
                let delay = self
                    .hosts
                    .iter()
                    .find(|h| h.public().ip() == to.ip())
                    .map_or(0, |h| h.delay);
                if sent + delay > now {
                    next += 1;
                    continue;
                }
                let (_, from, to, data) = self.wire.remove(next).unwrap();
                if self.blackhole.is_some_and(|(until, x, y)| {
                    let ends = [from.ip(), to.ip()];
                    now < until && (ends == [x, y] || ends == [y, x])
                }) {
                    continue;
                }
                let Some(i) = self.hosts.iter().position(|h| h.public().ip() == to.ip()) else {
                    continue;
                };
                let h = &mut self.hosts[i];
                if !h.alive {
                    continue;
                }
                if h.nat
                    .as_mut()
                    .is_some_and(|n| !n.inbound(now, from, to.port()))
                {
                    continue;
                }
                h.inbox.push_back((now + h.lag, from, data));
            }
            // The nodes handle the datagrams that passed their NATs once their lag is over.
            for (i, h) in self.hosts.iter_mut().enumerate() {
                while h.inbox.front().is_some_and(|d| d.0 <= now) {
                    let (_, from, data) = h.inbox.pop_front().unwrap();
                    if !h.alive {
                        continue;
                    }
                    let before = h.node.drops().values().sum::<u64>();
                    let is_for_me = data.len() >= 18 && data[8..13] == h.addr.to_bytes();
                    h.node.handle_datagram(now, LocalSocket(0), from, &data);
                    if !is_for_me
                        && h.node.is_root()
                        && h.node.drops().values().sum::<u64>() == before
                    {
                        *self.relayed_by.entry(i).or_default() += 1;
                    }
                }
            }
            // Collect output.
            for h in &mut self.hosts {
                while let Some(t) = h.node.poll_transmit(&mut self.buf) {
                    if !h.alive {
                        continue;
                    }
                    let from = match &mut h.nat {
                        Some(n) => n.outbound(now, t.to),
                        None => h.private,
                    };
                    if t.ttl.is_some_and(|ttl| ttl <= 2) {
                        // Expires two hops out: it opened our NAT, nobody receives it.
                        assert_eq!(t.len, 4, "the NAT-opening datagram is 4 bytes");
                        self.junk_sent += 1;
                        continue;
                    }
                    self.wire.push_back((
                        now + 1 + h.delay,
                        from,
                        t.to,
                        self.buf[..t.len].to_vec(),
                    ));
                }
                while let Some(e) = h.node.poll_event() {
                    if let Event::Packet {
                        from,
                        verb: Verb::USER_MESSAGE,
                        payload,
                        ..
                    } = e
                    {
                        h.received.push((from, payload));
                    }
                }
            }
        }
    }

    fn send(&mut self, from: usize, to: usize, msg: &[u8]) {
        let (a, b) = (self.hosts[from].addr, self.hosts[to].addr);
        let mut payload = 7u64.to_be_bytes().to_vec();
        payload.extend_from_slice(msg);
        self.hosts[from]
            .node
            .send(self.now, a, b, Verb::USER_MESSAGE, &payload)
            .unwrap();
    }

    fn got(&self, at: usize, from: usize, msg: &[u8]) -> bool {
        self.hosts[at]
            .received
            .iter()
            .any(|(f, p)| *f == self.hosts[from].addr && p.len() >= 8 && &p[8..] == msg)
    }
}

/// Hosts at `spec` (private address, public address of its NAT if any); the first `roots`
/// of them are the roots of the planet.
fn sim(spec: &[(&str, Option<&str>)], roots: usize) -> Sim {
    let cancel = AtomicBool::new(false);
    let ids: Vec<Identity> = spec
        .iter()
        .map(|_| Identity::generate(&cancel).unwrap())
        .collect();
    let (pk, sk) = identity::generate_key_pair().unwrap();
    let planet_roots = ids[..roots]
        .iter()
        .zip(spec)
        .map(|(id, (private, _))| Root {
            identity: id.to_public(),
            stable_endpoints: vec![sa(private)],
        })
        .collect();
    let planet = World::create(WorldType::Planet, 77, 1000, pk, planet_roots, &sk).unwrap();
    let hosts = ids
        .iter()
        .zip(spec)
        .map(|(id, (private, nat))| Host {
            node: Node::new(NodeConfig::new(planet.clone()), vec![id.clone()]).unwrap(),
            addr: id.address(),
            private: sa(private),
            nat: nat.map(|p| Nat::new(sa(p))),
            alive: true,
            received: Vec::new(),
            delay: 0,
            lag: 0,
            inbox: VecDeque::new(),
        })
        .collect();
    Sim {
        hosts,
        wire: VecDeque::new(),
        now: 1000,
        relayed_by: HashMap::new(),
        junk_sent: 0,
        blackhole: None,
        buf: vec![0u8; flatwire_vl1::node::MAX_DATAGRAM_LEN],
    }
}

#[test]
fn nat_traversal_relay_and_lost_root() {
    let mut sim = sim(
        &[
            ("203.0.113.1:9993", None),
            ("203.0.113.2:9993", None),
            ("10.0.0.2:9993", Some("198.51.100.1:9993")),
            ("10.1.0.2:9993", Some("192.0.2.1:9993")),
            ("203.0.113.9:9993", None),
        ],
        2,
    );
    assert!(sim.hosts[0].node.is_root() && sim.hosts[1].node.is_root());
    assert!(!sim.hosts[2].node.is_root());

    // Everyone contacts the roots and comes online.
    sim.step(12_000);
    for i in 2..5 {
        let h = &sim.hosts[i];
        assert!(h.node.is_online(sim.now, h.addr), "host {i} online");
    }

    // A (behind NAT) messages B (behind another NAT): WHOIS via a root, relayed delivery.
    let (a, b) = (2, 3);
    sim.send(a, b, b"hello over the relay");
    sim.step(3000);
    assert!(
        sim.got(b, a, b"hello over the relay"),
        "relayed message delivered"
    );
    assert!(sim.relayed_by.values().sum::<u64>() > 0, "a root relayed");

    // Keep talking both ways; introductions (RENDEZVOUS) make both sides punch through.
    for round in 0..20 {
        sim.send(a, b, format!("a{round}").as_bytes());
        sim.send(b, a, format!("b{round}").as_bytes());
        sim.step(5000);
    }
    let (aa, ba) = (sim.hosts[a].addr, sim.hosts[b].addr);
    assert_eq!(
        sim.hosts[a].node.direct_path(sim.now, aa, ba),
        Some(sim.hosts[b].public())
    );
    assert_eq!(
        sim.hosts[b].node.direct_path(sim.now, ba, aa),
        Some(sim.hosts[a].public())
    );
    assert!(sim.got(a, b, b"b19") && sim.got(b, a, b"a19"));
    assert!(
        sim.junk_sent >= 2,
        "each side opened its NAT with a TTL-2 datagram before contacting the other"
    );

    // Now direct: further traffic does not touch the roots.
    let relayed = sim.relayed_by.values().sum::<u64>();
    sim.send(a, b, b"direct");
    sim.step(500);
    assert!(sim.got(b, a, b"direct"));
    assert_eq!(
        sim.relayed_by.values().sum::<u64>(),
        relayed,
        "no relaying once direct"
    );

    // Lose root 0 entirely.
    sim.hosts[0].alive = false;
    sim.step(40_000);
    // A reaches C (never talked before) through the surviving root: root 1 must answer
    // A's WHOIS for C and relay the first packets; the dead root must carry nothing.
    let c = 4;
    let ca = sim.hosts[c].addr;
    assert!(!sim.hosts[a].node.knows_peer(aa, ca));
    assert!(sim.hosts[a].node.direct_path(sim.now, aa, ca).is_none());
    let relayed_before = (
        sim.relayed_by.get(&0).copied().unwrap_or(0),
        sim.relayed_by.get(&1).copied().unwrap_or(0),
    );
    let whois_before = sim.hosts[1].node.stats().whois_answered;
    let relay_stat_before = sim.hosts[1].node.stats().relayed;
    sim.send(a, c, b"after root loss");
    sim.step(5000);
    assert!(
        sim.got(c, a, b"after root loss"),
        "routed around the lost root"
    );
    assert!(
        sim.hosts[1].node.stats().whois_answered > whois_before,
        "the surviving root answered the WHOIS for C"
    );
    assert!(
        sim.relayed_by.get(&1).copied().unwrap_or(0) > relayed_before.1
            && sim.hosts[1].node.stats().relayed > relay_stat_before,
        "the surviving root relayed A's first packet to C"
    );
    assert_eq!(
        sim.relayed_by.get(&0).copied().unwrap_or(0),
        relayed_before.0,
        "the lost root carried nothing"
    );
    for i in 2..5 {
        let h = &sim.hosts[i];
        assert!(h.node.is_online(sim.now, h.addr));
        assert_eq!(
            h.node.drop_count(flatwire_vl1::DropReason::MacFailed),
            0,
            "host {i}"
        );
    }
}

/// One root, A and B behind separate port-preserving MASQUERADE-like NATs.
fn two_nats() -> Sim {
    let mut sim = sim(
        &[
            ("203.0.113.1:9993", None),
            ("10.0.0.2:9993", Some("198.51.100.1:9993")),
            ("10.1.0.2:9993", Some("192.0.2.1:9993")),
        ],
        1,
    );
    // A is 20 ms from everyone else, so its attempt reaches B's NAT well after the root's
    // introduction reached B.
    sim.hosts[1].delay = 20;
    sim.step(12_000);
    for i in 1..3 {
        let h = &sim.hosts[i];
        assert!(h.node.is_online(sim.now, h.addr), "host {i} online");
    }
    sim
}

impl Sim {
    fn direct_both_ways(&self, a: usize, b: usize) -> bool {
        let (aa, ba) = (self.hosts[a].addr, self.hosts[b].addr);
        self.hosts[a].node.direct_path(self.now, aa, ba) == Some(self.hosts[b].public())
            && self.hosts[b].node.direct_path(self.now, ba, aa) == Some(self.hosts[a].public())
    }

    /// Traffic both ways, a message each way every 10 ms (the root relays at a steady
    /// rate while there is no direct path), for `secs` seconds; returns the times at which
    /// the root `root` sent introductions. The last messages are `a{secs-1}`/`b{secs-1}`.
    fn talk(&mut self, root: usize, a: usize, b: usize, secs: u64) -> Vec<u64> {
        let mut intros = Vec::new();
        let mut sent = self.hosts[root].node.stats().rendezvous_sent;
        for round in 0..secs * 100 {
            let tag = if round % 100 == 99 {
                round / 100
            } else {
                u64::MAX
            };
            self.send(a, b, format!("a{tag}").as_bytes());
            self.send(b, a, format!("b{tag}").as_bytes());
            self.step(10);
            let now_sent = self.hosts[root].node.stats().rendezvous_sent;
            if now_sent > sent {
                intros.push(self.now);
                sent = now_sent;
            }
        }
        // Let the last messages arrive.
        self.step(100);
        intros
    }
}

/// The root introduces A and B while relaying A's first packet to B, so B gets the
/// RENDEZVOUS before it knows A. B must still open its NAT toward A at once and contact A
/// once it has A's identity; otherwise A's lone attempt leaves an entry on B's NAT that
/// takes B's port toward A, and every later attempt fails too.
#[test]
fn the_first_introduction_succeeds_although_the_far_side_does_not_know_the_peer_yet() {
    let mut sim = two_nats();
    let (root, a, b) = (0, 1, 2);
    let (aa, ba) = (sim.hosts[a].addr, sim.hosts[b].addr);
    assert!(!sim.hosts[a].node.knows_peer(aa, ba) && !sim.hosts[b].node.knows_peer(ba, aa));

    sim.send(a, b, b"first");
    let mut introduced_at = None;
    while introduced_at.is_none() && sim.now < 20_000 {
        sim.step(1);
        if sim.hosts[root].node.stats().rendezvous_sent > 0 {
            introduced_at = Some(sim.now);
            assert!(
                !sim.hosts[b].node.knows_peer(ba, aa),
                "B does not know A when the introduction is on its way"
            );
        }
    }
    let introduced_at = introduced_at.expect("the root introduced A and B");
    // Relayed traffic both ways for longer than the 30 s re-introduction interval.
    let intros = sim.talk(root, a, b, 45);
    assert!(sim.got(b, a, b"first") && sim.got(a, b, b"b44") && sim.got(b, a, b"a44"));
    assert!(
        sim.direct_both_ways(a, b),
        "A and B talk directly (introductions at {introduced_at} and {intros:?})"
    );
    assert!(
        intros.is_empty(),
        "the first introduction was enough: {intros:?} after {introduced_at}"
    );
    let relayed = sim.relayed_by.values().sum::<u64>();
    sim.send(a, b, b"direct");
    sim.send(b, a, b"direct");
    sim.step(500);
    assert!(sim.got(b, a, b"direct") && sim.got(a, b, b"direct"));
    assert_eq!(
        sim.relayed_by.values().sum::<u64>(),
        relayed,
        "nothing relayed"
    );
}

/// The RENDEZVOUS of a pair that already knows each other reaches both at about the same
/// time, but B's agent is busy and gets to it (and so opens its NAT) 3 ms late, while A could
/// contact B at once: seen between two agents in network namespaces. A contact that reaches
/// B's NAT before B's own opening datagram leaves an entry there that takes B's port toward
/// A, so both sides wait a moment after opening their NATs before contacting.
#[test]
fn an_introduction_succeeds_although_one_side_is_slow_to_open_its_nat() {
    let mut sim = two_nats();
    sim.hosts[1].delay = 0;
    let (root, a, b) = (0, 1, 2);
    let (na, nb) = (sim.hosts[a].public().ip(), sim.hosts[b].public().ip());
    // The first introduction fails (datagrams between the NATs are lost), so that both know
    // each other when the root introduces them again, 30 s later.
    sim.blackhole = Some((sim.now + 10_000, na, nb));
    let first = sim.talk(root, a, b, 25);
    assert!(first.len() == 1 && !sim.direct_both_ways(a, b), "{first:?}");
    let (aa, ba) = (sim.hosts[a].addr, sim.hosts[b].addr);
    assert!(sim.hosts[a].node.knows_peer(aa, ba) && sim.hosts[b].node.knows_peer(ba, aa));
    sim.hosts[b].lag = 3;
    let second = sim.talk(root, a, b, 10);
    assert_eq!(
        second.len(),
        1,
        "introduced again: {first:?} then {second:?}"
    );
    assert!(
        sim.direct_both_ways(a, b),
        "direct after the second introduction ({first:?} then {second:?})"
    );
}

/// When the first hole punching fails (here: the datagrams between the two NATs are lost
/// for a while), the root introduces the pair again after 30 s of relaying, and then it
/// works.
#[test]
fn a_failed_introduction_is_repeated_after_30_s_of_relaying() {
    let mut sim = two_nats();
    let (root, a, b) = (0, 1, 2);
    let (na, nb) = (sim.hosts[a].public().ip(), sim.hosts[b].public().ip());
    sim.blackhole = Some((sim.now + 10_000, na, nb));
    let intros = sim.talk(root, a, b, 10);
    assert_eq!(intros.len(), 1, "introduced once: {intros:?}");
    assert!(!sim.direct_both_ways(a, b), "the first attempt failed");
    assert!(
        sim.got(b, a, b"a9") && sim.got(a, b, b"b9"),
        "relayed meanwhile"
    );
    let later = sim.talk(root, a, b, 35);
    assert!(
        later.len() == 1 && (30_000..32_000).contains(&(later[0] - intros[0])),
        "introduced again after 30 s: {intros:?} then {later:?}"
    );
    assert!(
        sim.direct_both_ways(a, b),
        "direct after the second introduction"
    );
}
