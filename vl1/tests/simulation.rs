//! Simulation on a virtual clock: two roots, nodes behind NATs, relaying, introduction
//! (RENDEZVOUS) ending in a direct path, and a lost root routed around.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;

use flatwire_vl1::identity;
use flatwire_vl1::wire::Verb;
use flatwire_vl1::world::{Root, World, WorldType};
use flatwire_vl1::{Address, Event, Identity, LocalSocket, Node, NodeConfig};

/// A port-restricted cone NAT: one public IP, ports preserved, inbound only from
/// endpoints the inside host has sent to.
struct Nat {
    public: SocketAddr,
    allowed: HashSet<SocketAddr>,
}

struct Host {
    node: Node,
    addr: Address,
    private: SocketAddr,
    nat: Option<Nat>,
    alive: bool,
    received: Vec<(Address, Vec<u8>)>,
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
            // Deliver datagrams whose 1 ms link delay has passed.
            while self.wire.front().is_some_and(|w| w.0 <= now) {
                let (_, from, to, data) = self.wire.pop_front().unwrap();
                let Some(i) = self.hosts.iter().position(|h| h.public() == to) else {
                    continue;
                };
                let h = &mut self.hosts[i];
                if !h.alive {
                    continue;
                }
                if h.nat.as_ref().is_some_and(|n| !n.allowed.contains(&from)) {
                    continue;
                }
                let before = h.node.drops().values().sum::<u64>();
                let is_for_me = data.len() >= 18 && data[8..13] == h.addr.to_bytes();
                h.node.handle_datagram(now, LocalSocket(0), from, &data);
                if !is_for_me && h.node.is_root() && h.node.drops().values().sum::<u64>() == before
                {
                    *self.relayed_by.entry(i).or_default() += 1;
                }
            }
            // Collect output.
            for h in &mut self.hosts {
                while let Some(t) = h.node.poll_transmit(&mut self.buf) {
                    if !h.alive {
                        continue;
                    }
                    let from = match &mut h.nat {
                        Some(n) => {
                            n.allowed.insert(t.to);
                            n.public
                        }
                        None => h.private,
                    };
                    if t.ttl.is_some_and(|ttl| ttl <= 2) {
                        // Expires two hops out: it opened our NAT, nobody receives it.
                        assert_eq!(t.len, 4, "the NAT-opening datagram is 4 bytes");
                        self.junk_sent += 1;
                        continue;
                    }
                    self.wire
                        .push_back((now + 1, from, t.to, self.buf[..t.len].to_vec()));
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

#[test]
fn nat_traversal_relay_and_lost_root() {
    let cancel = AtomicBool::new(false);
    let ids: Vec<Identity> = (0..5)
        .map(|_| Identity::generate(&cancel).unwrap())
        .collect();
    let (pk, sk) = identity::generate_key_pair().unwrap();
    let roots = vec![
        Root {
            identity: ids[0].to_public(),
            stable_endpoints: vec![sa("203.0.113.1:9993")],
        },
        Root {
            identity: ids[1].to_public(),
            stable_endpoints: vec![sa("203.0.113.2:9993")],
        },
    ];
    let planet = World::create(WorldType::Planet, 77, 1000, pk, roots, &sk).unwrap();
    let spec = [
        ("203.0.113.1:9993", None),
        ("203.0.113.2:9993", None),
        ("10.0.0.2:9993", Some("198.51.100.1:9993")),
        ("10.1.0.2:9993", Some("192.0.2.1:9993")),
        ("203.0.113.9:9993", None),
    ];
    let hosts = ids
        .iter()
        .zip(spec)
        .map(|(id, (private, nat))| Host {
            node: Node::new(NodeConfig::new(planet.clone()), vec![id.clone()]).unwrap(),
            addr: id.address(),
            private: sa(private),
            nat: nat.map(|p| Nat {
                public: sa(p),
                allowed: HashSet::new(),
            }),
            alive: true,
            received: Vec::new(),
        })
        .collect();
    let mut sim = Sim {
        hosts,
        wire: VecDeque::new(),
        now: 1000,
        relayed_by: HashMap::new(),
        junk_sent: 0,
        buf: vec![0u8; flatwire_vl1::node::MAX_DATAGRAM_LEN],
    };
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
