//! Unit tests of the node: NAT-opening datagram, address collisions, trusted paths,
//! relaying with several local identities and buffer reuse, the peer table bound, root
//! failover and planet updates (pushed by roots, offered by the I/O shell).

use std::collections::VecDeque;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;

use super::*;
use crate::identity::generate_key_pair;
use crate::world::{Root, WorldType};

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn new_id() -> Identity {
    Identity::generate(&AtomicBool::new(false)).unwrap()
}

fn planet(roots: &[(&Identity, &str)]) -> World {
    let (pk, sk) = generate_key_pair().unwrap();
    let roots = roots
        .iter()
        .map(|(id, ep)| Root {
            identity: id.to_public(),
            stable_endpoints: vec![sa(ep)],
        })
        .collect();
    World::create(WorldType::Planet, 4242, 1000, pk, roots, &sk).unwrap()
}

/// A datagram seen on the virtual wire.
struct Sent {
    from: usize,
    to: SocketAddr,
    data: Vec<u8>,
    ttl: Option<u8>,
}

/// Nodes on one flat virtual network; every datagram takes 1 ms.
struct Net {
    nodes: Vec<(Node, SocketAddr)>,
    now: u64,
    wire: VecDeque<(u64, SocketAddr, SocketAddr, Vec<u8>)>,
    sent: Vec<Sent>,
    events: Vec<(usize, Event)>,
    buf: Vec<u8>,
    /// Addresses whose datagrams are lost both ways (a stopped node).
    down: Vec<SocketAddr>,
    /// Pairs of addresses that cannot reach each other directly (symmetric NATs).
    blocked: Vec<(SocketAddr, SocketAddr)>,
}

impl Net {
    fn new(nodes: Vec<(Node, SocketAddr)>) -> Self {
        Self {
            nodes,
            now: 10_000,
            wire: VecDeque::new(),
            sent: Vec::new(),
            events: Vec::new(),
            buf: vec![0; MAX_DATAGRAM_LEN],
            down: Vec::new(),
            blocked: Vec::new(),
        }
    }

    fn lost(&self, from: SocketAddr, to: SocketAddr) -> bool {
        self.down.contains(&from)
            || self.down.contains(&to)
            || self
                .blocked
                .iter()
                .any(|&(a, b)| (a, b) == (from, to) || (b, a) == (from, to))
    }

    fn step(&mut self, ms: u64) {
        for _ in 0..ms {
            self.now += 1;
            let now = self.now;
            for (n, a) in &mut self.nodes {
                if self.down.contains(a) {
                    continue;
                }
                if now >= n.poll_timeout() {
                    n.handle_timeout(now);
                }
            }
            while self.wire.front().is_some_and(|w| w.0 <= now) {
                let (_, from, to, data) = self.wire.pop_front().unwrap();
                if self.lost(from, to) {
                    continue;
                }
                if let Some((n, _)) = self.nodes.iter_mut().find(|(_, a)| *a == to) {
                    n.handle_datagram(now, LocalSocket(0), from, &data);
                }
            }
            self.collect();
        }
    }

    fn collect(&mut self) {
        let now = self.now;
        for (i, (n, addr)) in self.nodes.iter_mut().enumerate() {
            while let Some(t) = n.poll_transmit(&mut self.buf) {
                let data = self.buf[..t.len].to_vec();
                self.sent.push(Sent {
                    from: i,
                    to: t.to,
                    data: data.clone(),
                    ttl: t.ttl,
                });
                // A TTL-2 datagram dies on the way (it only opens the sender's NAT).
                if t.ttl.is_none() {
                    self.wire.push_back((now + 1, *addr, t.to, data));
                }
            }
            while let Some(e) = n.poll_event() {
                self.events.push((i, e));
            }
        }
    }

    /// Node `at` sends `payload` from its identity `from` to `to`, now.
    fn send(&mut self, at: usize, from: &Identity, to: &Identity, verb: Verb, payload: &[u8]) {
        let now = self.now;
        self.nodes[at]
            .0
            .send(now, from.address(), to.address(), verb, payload)
            .unwrap();
    }

    fn user_messages(&self, at: usize) -> Vec<(Address, Vec<u8>)> {
        self.events
            .iter()
            .filter(|(i, _)| *i == at)
            .filter_map(|(_, e)| match e {
                Event::Packet {
                    from,
                    verb: Verb::USER_MESSAGE,
                    payload,
                    ..
                } => Some((*from, payload.clone())),
                _ => None,
            })
            .collect()
    }
}

fn leaf(planet: &World, id: &Identity, addr: &str) -> (Node, SocketAddr) {
    (
        Node::new(NodeConfig::new(planet.clone()), vec![id.clone()]).unwrap(),
        sa(addr),
    )
}

/// A root `r` at 10.0.0.1 (node 0) and one leaf per address (nodes 1, 2, ...), not yet
/// stepped.
fn root_and_leaves<const N: usize>(addrs: [&str; N]) -> (Net, Identity, [Identity; N]) {
    let r = new_id();
    let leaves: [Identity; N] = std::array::from_fn(|_| new_id());
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    let mut nodes = vec![leaf(&p, &r, "10.0.0.1:9993")];
    nodes.extend(
        leaves
            .iter()
            .zip(addrs)
            .map(|(id, addr)| leaf(&p, id, addr)),
    );
    (Net::new(nodes), r, leaves)
}

/// Roots at 10.0.0.1 and 10.0.0.2 (nodes 0 and 1) and leaves at 10.0.2.2 and 10.0.3.3
/// (nodes 2 and 3) that cannot reach each other directly (symmetric NATs): node `i` runs
/// `nodes[i]`'s identity with its planet. Not yet stepped.
fn two_roots_and_two_nated_leaves(nodes: [(&World, &Identity); 4]) -> Net {
    let addrs = [
        "10.0.0.1:9993",
        "10.0.0.2:9993",
        "10.0.2.2:9993",
        "10.0.3.3:9993",
    ];
    let mut net = Net::new(
        nodes
            .iter()
            .zip(addrs)
            .map(|((p, id), addr)| leaf(p, id, addr))
            .collect(),
    );
    net.blocked.push((sa(addrs[2]), sa(addrs[3])));
    net
}

/// A root `r` at 10.0.0.1 and leaves `a` at 10.0.2.2 and `b` at 10.0.3.3, not yet stepped.
fn root_and_two_leaves() -> (Net, Identity, Identity, Identity) {
    let (net, r, [a, b]) = root_and_leaves(["10.0.2.2:9993", "10.0.3.3:9993"]);
    (net, r, a, b)
}

#[test]
fn rendezvous_opens_the_nat_with_a_ttl2_datagram_before_contact() {
    let (mut net, _, a, b) = root_and_two_leaves();
    net.step(2000);
    net.send(1, &a, &b, Verb::USER_MESSAGE, &[0; 9]);
    net.step(2000);
    assert_eq!(net.nodes[0].0.stats().rendezvous_sent, 2);
    // A knows B when the RENDEZVOUS arrives, so it opens its NAT towards B first.
    let a_to_b: Vec<&Sent> = net
        .sent
        .iter()
        .filter(|s| s.from == 1 && s.to == sa("10.0.3.3:9993"))
        .collect();
    let first = a_to_b.first().expect("A contacted B");
    assert_eq!(first.ttl, Some(2), "the NAT-opening datagram goes first");
    assert_eq!(first.data.len(), 4);
    assert!(
        a_to_b.len() > 1,
        "contact (HELLO/ECHO) follows the junk datagram"
    );
    assert!(a_to_b[1..].iter().all(|s| s.ttl.is_none()));
    // And the leaves end up with a direct path.
    assert_eq!(
        net.nodes[1]
            .0
            .direct_path(net.now, a.address(), b.address()),
        Some(sa("10.0.3.3:9993"))
    );
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn an_address_collision_is_answered_with_identity_collision() {
    let (r, x) = (new_id(), new_id());
    // An impostor: x's address with other keys (it cannot validate, but it can speak).
    let (pk2, sk2) = generate_key_pair().unwrap();
    let impostor =
        Identity::from_str(&format!("{}:0:{}:{}", x.address(), hex(&pk2), hex(&sk2))).unwrap();
    assert_eq!(impostor.address(), x.address());
    assert_ne!(impostor, x);
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    let mut net = Net::new(vec![
        leaf(&p, &r, "10.0.0.1:9993"),
        leaf(&p, &x, "10.0.2.2:9993"),
    ]);
    net.step(3000);
    assert!(net.nodes[0].0.knows_peer(r.address(), x.address()));
    // The impostor shows up from another /24 (the identity-verification gate is per /24).
    net.nodes.push(leaf(&p, &impostor, "10.0.9.2:9993"));
    net.step(3000);
    assert!(net.nodes[0].0.stats().collisions_reported >= 1);
    assert!(
        net.events.iter().any(|(i, e)| *i == 2
            && *e
                == Event::IdentityCollision {
                    local: x.address(),
                    root: r.address()
                }),
        "the impostor learns from its root that its address is taken"
    );
    // The genuine peer is untouched and still known with its own key.
    assert!(net.nodes[0].0.knows_peer(r.address(), x.address()));
    assert!(
        !net.events
            .iter()
            .any(|(i, e)| *i == 1 && matches!(e, Event::IdentityCollision { .. }))
    );
}

#[test]
fn trusted_paths_send_suite_2_and_accept_only_matching_networks() {
    let (r, a, b) = (new_id(), new_id(), new_id());
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    let trusted = TrustedPath {
        network: "10.0.0.0".parse().unwrap(),
        prefix_len: 16,
        id: 0x1234_5678,
    };
    let with_trust = |id: &Identity, addr: &str| {
        let mut cfg = NodeConfig::new(p.clone());
        cfg.trusted_paths = vec![trusted];
        (Node::new(cfg, vec![id.clone()]).unwrap(), sa(addr))
    };
    let mut net = Net::new(vec![
        leaf(&p, &r, "10.0.0.1:9993"),
        with_trust(&a, "10.0.2.2:9993"),
        with_trust(&b, "10.0.3.3:9993"),
    ]);
    net.step(2000);
    // Make the path direct first (HELLO/ECHO are never suite 2).
    for i in 0..3 {
        net.send(1, &a, &b, Verb::USER_MESSAGE, format!("warm{i}").as_bytes());
        net.step(1000);
    }
    assert!(
        net.nodes[1]
            .0
            .direct_path(net.now, a.address(), b.address())
            .is_some()
    );
    let mark = net.sent.len();
    let mut msg = 9u64.to_be_bytes().to_vec();
    msg.extend_from_slice(b"in the clear on a trusted path");
    net.send(1, &a, &b, Verb::USER_MESSAGE, &msg);
    net.collect();
    let pkt = net.sent[mark..]
        .iter()
        .find(|s| s.from == 1 && s.to == sa("10.0.3.3:9993"))
        .expect("sent directly")
        .data
        .clone();
    assert_eq!((pkt[18] >> 3) & 7, 2, "suite 2");
    assert_eq!(pkt[19..27], 0x1234_5678u64.to_be_bytes());
    assert_eq!(pkt[27] & 0x1f, Verb::USER_MESSAGE.0);
    net.step(10);
    assert!(
        net.user_messages(2).iter().any(|(_, p)| *p == msg),
        "the trusted receiver accepts it"
    );

    // The same bytes from outside the trusted network, or with another ID, are dropped.
    let b_node = &mut net.nodes[2].0;
    let before = b_node.drop_count(DropReason::UntrustedPath);
    b_node.handle_datagram(net.now, LocalSocket(0), sa("10.1.0.2:9993"), &pkt);
    let mut wrong = pkt.clone();
    wrong[26] ^= 1;
    b_node.handle_datagram(net.now, LocalSocket(0), sa("10.0.2.2:9993"), &wrong);
    assert_eq!(b_node.drop_count(DropReason::UntrustedPath), before + 2);

    // A HELLO arriving over the trusted path (suite 2) is accepted like an authenticated one.
    let hello = net
        .sent
        .iter()
        .find(|s| {
            s.from == 1
                && s.to == sa("10.0.3.3:9993")
                && s.data.len() > 28
                && s.data[27] & 0x1f == Verb::HELLO.0
        })
        .expect("A sent B a HELLO")
        .data
        .clone();
    let mut trusted_hello = hello.clone();
    trusted_hello[18] = (trusted_hello[18] & 0x47) | (2 << 3);
    trusted_hello[19..27].copy_from_slice(&0x1234_5678u64.to_be_bytes());
    // B already saw that HELLO's packet ID (a replay is dropped), so give it a fresh one and
    // re-encrypt its cryptField under the new ID, as a sender would.
    let key = a.agree(&b).unwrap();
    let (_, crypt) = Hello::parse_head(&trusted_hello[wire::HEADER_LEN..]).unwrap();
    let start = wire::HEADER_LEN + crypt.expect("A's HELLO has a cryptField");
    crypto::crypt_field(&key, &mut trusted_hello, start);
    trusted_hello[..8].copy_from_slice(&0x0f1e_2d3c_4b5a_6978u64.to_be_bytes());
    crypto::crypt_field(&key, &mut trusted_hello, start);
    let b_node = &mut net.nodes[2].0;
    let (hellos, drops) = (
        b_node.stats().hellos_received,
        b_node.drops().values().sum::<u64>(),
    );
    b_node.handle_datagram(net.now, LocalSocket(0), sa("10.0.2.2:9993"), &trusted_hello);
    assert_eq!(b_node.stats().hellos_received, hellos + 1);
    assert_eq!(b_node.drops().values().sum::<u64>(), drops);

    // A node without the configuration never accepts suite 2.
    let mut plain = Node::new(NodeConfig::new(p.clone()), vec![b.clone()]).unwrap();
    plain.handle_datagram(net.now, LocalSocket(0), sa("10.0.2.2:9993"), &pkt);
    assert_eq!(plain.drop_count(DropReason::UntrustedPath), 1);

    assert!(trusted.contains("10.0.200.1".parse().unwrap()));
    assert!(!trusted.contains("10.1.0.1".parse().unwrap()));
    assert!(!trusted.contains("::1".parse().unwrap()));
}

#[test]
fn a_root_hosting_several_identities_relays_with_the_root_identitys_peers() {
    let (other, r, a, b) = (new_id(), new_id(), new_id(), new_id());
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    // The root identity is *not* the first one the node hosts.
    let root_node = Node::new(NodeConfig::new(p.clone()), vec![other.clone(), r.clone()]).unwrap();
    assert!(root_node.is_root());
    let mut net = Net::new(vec![
        (root_node, sa("10.0.0.1:9993")),
        leaf(&p, &a, "10.0.2.2:9993"),
        leaf(&p, &b, "10.0.3.3:9993"),
    ]);
    net.step(2000);
    let mut msg = 1u64.to_be_bytes().to_vec();
    msg.extend_from_slice(b"through the second identity's table");
    net.send(1, &a, &b, Verb::USER_MESSAGE, &msg);
    net.step(500);
    assert!(
        net.user_messages(2)
            .iter()
            .any(|(f, m)| *f == a.address() && *m == msg)
    );
    let s = net.nodes[0].0.stats();
    assert!(s.relayed >= 1, "{s:?}");
    assert!(
        s.relayed_bytes >= (s.relayed * wire::HEADER_LEN as u64).max(msg.len() as u64),
        "{s:?}"
    );
    assert_eq!(s.rendezvous_sent, 2, "introduced by the root identity");
    assert_eq!(net.nodes[0].0.drop_count(DropReason::NoPath), 0);
}

#[test]
fn transmit_buffers_are_reused_and_a_short_caller_buffer_is_a_counted_drop() {
    let (mut net, r, [a]) = root_and_leaves(["10.0.2.2:9993"]);
    net.step(2000);
    let n = &mut net.nodes[1].0;
    let mut buf = vec![0u8; MAX_DATAGRAM_LEN];
    while n.poll_transmit(&mut buf).is_some() {}
    let pooled = n.pool.len();
    assert!(pooled > 0, "sent datagrams returned their buffers");
    let spare: Vec<*const u8> = n.pool.iter().map(|b| b.as_ptr()).collect();
    n.send(net.now, a.address(), r.address(), Verb::ECHO, b"x")
        .unwrap();
    let queued = n.transmits.front().expect("queued");
    assert!(
        spare.contains(&queued.data.as_ptr()),
        "the datagram was built in a pooled buffer"
    );
    assert!(n.pool.len() <= pooled, "no new buffer was needed");
    // A caller buffer too small for the datagram: dropped and counted, not truncated.
    let mut tiny = [0u8; 8];
    assert!(n.poll_transmit(&mut tiny).is_none());
    assert_eq!(n.drop_count(DropReason::BufferTooSmall), 1);
    assert!(n.pool.len() <= POOL_LIMIT);
}

#[test]
fn an_introduction_to_an_unknown_peer_opens_the_nat_at_once_and_contacts_it_once_known() {
    let (mut net, _, a, b) = root_and_two_leaves();
    net.step(2000);
    net.send(1, &a, &b, Verb::USER_MESSAGE, &[0; 9]);
    let b_to_a = |net: &Net| -> Vec<Option<u8>> {
        net.sent
            .iter()
            .filter(|s| s.from == 2 && s.to == sa("10.0.2.2:9993"))
            .map(|s| s.ttl)
            .collect()
    };
    // The root's RENDEZVOUS reaches B together with A's relayed packet: B does not know A
    // yet, and opens its NAT towards A right away.
    while b_to_a(&net).is_empty() && net.now < 14_000 {
        net.step(1);
    }
    assert_eq!(
        b_to_a(&net),
        vec![Some(2)],
        "B's first datagram to A opens its NAT"
    );
    assert!(!net.nodes[2].0.knows_peer(b.address(), a.address()));
    // Once OK(WHOIS) told B who A is and A's NAT had time to open, B contacts A there itself.
    net.step(100);
    assert!(net.nodes[2].0.knows_peer(b.address(), a.address()));
    assert_eq!(b_to_a(&net), vec![Some(2)], "B waits before contacting A");
    net.step(timers::RENDEZVOUS_CONTACT_DELAY);
    let sent = b_to_a(&net);
    assert!(
        sent.len() > 1 && sent[1..].iter().all(|t| t.is_none()),
        "B contacted A: {sent:?}"
    );
    assert_eq!(
        net.nodes[2]
            .0
            .direct_path(net.now, b.address(), a.address()),
        Some(sa("10.0.2.2:9993"))
    );
}

/// ZeroTier One contacts the peer at once on its copy of an introduction. When that contact
/// has confirmed the path by the time ours is due, we send no probe of our own there (1.x
/// answers one ECHO per path per 166 ms: ours would leave the host's next ECHO unanswered),
/// and the new path's first heartbeat waits a full period.
#[test]
fn an_introduced_peer_that_reached_us_first_gets_no_probe_of_ours() {
    let (mut net, _, a, b) = root_and_two_leaves();
    let (a_addr, b_addr) = (sa("10.0.2.2:9993"), sa("10.0.3.3:9993"));
    net.step(2000);
    let now = net.now;
    net.nodes[1]
        .0
        .request_identity(now, a.address(), b.address())
        .unwrap();
    net.nodes[2]
        .0
        .request_identity(now, b.address(), a.address())
        .unwrap();
    net.step(100);
    assert!(net.nodes[1].0.knows_peer(a.address(), b.address()));
    assert!(net.nodes[2].0.knows_peer(b.address(), a.address()));
    net.send(1, &a, &b, Verb::USER_MESSAGE, &[0; 9]);
    // The root relays and introduces: A opens its NAT towards B...
    let opened = |net: &Net| {
        net.sent
            .iter()
            .any(|s| s.from == 1 && s.to == b_addr && s.ttl == Some(2))
    };
    while !opened(&net) && net.now < 14_000 {
        net.step(1);
    }
    assert!(opened(&net), "A got its RENDEZVOUS");
    // ...and B contacts A there at once, as 1.x does.
    let now = net.now;
    net.nodes[2]
        .0
        .contact(now, 0, a.address(), LocalSocket(0), a_addr);
    net.collect();
    net.step(10);
    assert_eq!(
        net.nodes[1]
            .0
            .direct_path(net.now, a.address(), b.address()),
        Some(b_addr),
        "B's contact confirmed the path before A's own contact was due"
    );
    let mark = net.sent.len();
    // Past A's contact time and a ping scan.
    net.step(timers::RENDEZVOUS_CONTACT_DELAY + timers::PING_CHECK + 500);
    let key = net.nodes[1].0.locals[0].peers[&b.address()].key.clone();
    let probes: Vec<Verb> = net.sent[mark..]
        .iter()
        .filter(|s| s.from == 1 && s.to == b_addr)
        .filter_map(|s| {
            let mut d = s.data.clone();
            crypto::dearmor(&mut d, &key).ok()?;
            Some(Verb(d[27] & 0x1f))
        })
        .filter(|v| matches!(*v, Verb::ECHO | Verb::HELLO))
        .collect();
    assert!(probes.is_empty(), "A probed B again: {probes:?}");
}

/// Incompressible data frames soon stop costing an LZ4 try on every frame; frames that
/// compress again are compressed again after the next try.
#[test]
fn compression_is_skipped_for_a_peer_whose_frames_do_not_compress() {
    let (mut net, r, [a]) = root_and_leaves(["10.0.2.2:9993"]);
    net.step(2000);
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..1000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let text = [b'z'; 1000];
    // Length on the wire of a FRAME sent from A to the root right now.
    let frame = |net: &mut Net, payload: &[u8]| -> usize {
        let mark = net.sent.len();
        net.send(1, &a, &r, Verb::FRAME, payload);
        net.collect();
        let sent: Vec<&Sent> = net.sent[mark..].iter().filter(|s| s.from == 1).collect();
        assert_eq!(sent.len(), 1);
        sent[0].data.len()
    };
    assert!(
        frame(&mut net, &text) < 200,
        "compressible frames are compressed"
    );
    for _ in 0..COMPRESS_MISSES {
        assert!(frame(&mut net, &noise) > 1000);
    }
    // Now the next frames are not even tried, so a compressible one goes out as it is ...
    for _ in 0..COMPRESS_SKIP {
        assert!(frame(&mut net, &text) > 1000);
    }
    // ... until the next try, which compresses and makes every frame tried again.
    assert!(frame(&mut net, &text) < 200);
    assert!(frame(&mut net, &text) < 200);
    // Control messages are always compressed.
    for _ in 0..COMPRESS_MISSES {
        frame(&mut net, &noise);
    }
    let mark = net.sent.len();
    net.send(1, &a, &r, Verb::USER_MESSAGE, &text);
    net.collect();
    assert!(net.sent[mark..].iter().all(|s| s.data.len() < 200));
}

/// Packet IDs come from a generator seeded once per node: distinct within a node and
/// between nodes.
#[test]
fn packet_ids_are_distinct_within_and_across_nodes() {
    let r = new_id();
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    let mut ids = std::collections::HashSet::new();
    for _ in 0..2 {
        let (mut n, _) = leaf(&p, &new_id(), "10.0.2.2:9993");
        for _ in 0..500 {
            assert!(ids.insert(n.rng.next8()));
        }
    }
}

#[test]
fn request_identity_resolves_a_peer_through_the_root_without_contacting_it() {
    let (mut net, r, a, b) = root_and_two_leaves();
    net.step(6000);
    let mark = net.sent.len();
    net.nodes[1]
        .0
        .request_identity(net.now, a.address(), b.address())
        .unwrap();
    net.step(100);
    assert!(net.events.iter().any(|(i, e)| *i == 1
        && *e
            == Event::PeerLearned {
                local: a.address(),
                peer: b.address(),
                via: Some(r.address()),
            }));
    assert!(
        net.sent[mark..].iter().all(|s| s.to != sa("10.0.3.3:9993")),
        "B is not contacted"
    );
    assert!(!net.nodes[2].0.knows_peer(b.address(), a.address()));
    assert_eq!(
        net.nodes[1]
            .0
            .request_identity(net.now, b.address(), a.address()),
        Err(NodeError::UnknownLocal)
    );
}

/// Many nodes in one /24 (a Kubernetes node's pods share its IP; cluster nodes share a
/// subnet) start at once and each sends to a peer it has never seen. Every first packet must
/// arrive within a couple of seconds: the root's identity-validation gate must let a burst
/// of HELLOs from one prefix through, and packets queued while no root path was known must
/// go out (with their WHOIS) as soon as the root answers, not at the next 5 s ping scan.
#[test]
fn a_burst_of_new_nodes_in_one_prefix_all_reach_a_peer_quickly() {
    let root = new_id();
    let ctl = new_id();
    let members: Vec<Identity> = (0..6).map(|_| new_id()).collect();
    let p = planet(&[(&root, "10.7.0.1:9993")]);
    let mut nodes = vec![
        leaf(&p, &root, "10.7.0.1:9993"),
        leaf(&p, &ctl, "10.7.0.2:9993"),
    ];
    for (i, m) in members.iter().enumerate() {
        nodes.push(leaf(&p, m, &format!("10.7.0.{}:9993", 10 + i)));
    }
    let mut net = Net::new(nodes);
    for (i, m) in members.iter().enumerate() {
        net.send(2 + i, m, &ctl, Verb::USER_MESSAGE, b"join");
    }
    net.collect();
    net.step(2500);
    let got: Vec<Address> = net.user_messages(1).iter().map(|(a, _)| *a).collect();
    for m in &members {
        assert!(
            got.contains(&m.address()),
            "{} reached the controller within 2.5 s (got {} of {}); root drops {:?}",
            m.address(),
            got.len(),
            members.len(),
            net.nodes[0].0.drops()
        );
    }
}

#[test]
fn replayed_and_duplicated_packets_are_dropped_and_counted() {
    let (mut net, _, a, b) = root_and_two_leaves();
    net.step(2000);
    net.send(1, &a, &b, Verb::USER_MESSAGE, b"once");
    net.step(2000);
    assert_eq!(net.user_messages(2), vec![(a.address(), b"once".to_vec())]);
    assert_eq!(net.nodes[2].0.drop_count(DropReason::Duplicate), 0);

    // Replay everything B ever received, as an attacker on the path could.
    let b_addr = net.nodes[2].1;
    let replays: Vec<(SocketAddr, Vec<u8>)> = net
        .sent
        .iter()
        .filter(|s| s.to == b_addr && s.ttl.is_none())
        .map(|s| (net.nodes[s.from].1, s.data.clone()))
        .collect();
    assert!(replays.len() >= 3, "HELLO, OK and the message reached B");
    let now = net.now;
    for (from, data) in &replays {
        net.nodes[2]
            .0
            .handle_datagram(now, LocalSocket(0), *from, data);
    }
    net.collect();
    assert_eq!(
        net.user_messages(2).len(),
        1,
        "a replayed USER_MESSAGE must not be delivered again"
    );
    // Every replayed packet that reached the checks is a counted duplicate (the HELLO, the
    // root's OK and the message at least); nothing else was dropped for being odd.
    let drops = net.nodes[2].0.drops().clone();
    assert!(
        drops.get(&DropReason::Duplicate).copied().unwrap_or(0) >= 3,
        "{drops:?}"
    );
    assert_eq!(drops.get(&DropReason::MacFailed), None, "{drops:?}");
    // Good state survives: new traffic still flows.
    net.send(1, &a, &b, Verb::USER_MESSAGE, b"twice");
    net.step(1000);
    assert_eq!(net.user_messages(2).len(), 2);
}

#[test]
fn roots_push_newer_planets_and_badly_signed_ones_are_counted_drops() {
    let (r, r2, a) = (new_id(), new_id(), new_id());
    let (pk, sk) = generate_key_pair().unwrap();
    let root = |id: &Identity, ep: &str| Root {
        identity: id.to_public(),
        stable_endpoints: vec![sa(ep)],
    };
    let old = World::create(
        WorldType::Planet,
        77,
        1000,
        pk,
        vec![root(&r, "10.0.0.1:9993")],
        &sk,
    )
    .unwrap();
    let newer = World::create(
        WorldType::Planet,
        77,
        2000,
        pk,
        vec![root(&r, "10.0.0.1:9993"), root(&r2, "10.0.0.2:9993")],
        &sk,
    )
    .unwrap();
    let (other_pk, other_sk) = generate_key_pair().unwrap();
    let forged = World::create(
        WorldType::Planet,
        77,
        3000,
        other_pk,
        vec![root(&r2, "10.0.0.2:9993")],
        &other_sk,
    )
    .unwrap();

    // A root serving the forged planet: the leaf counts it and keeps its own.
    let mut net = Net::new(vec![
        leaf(&forged, &r, "10.0.0.1:9993"),
        leaf(&old, &a, "10.0.2.2:9993"),
    ]);
    net.step(2000);
    assert!(net.nodes[1].0.drop_count(DropReason::BadWorld) >= 1);
    assert!(
        !net.events
            .iter()
            .any(|(_, e)| matches!(e, Event::PlanetUpdated { .. }))
    );
    assert!(!net.nodes[1].0.knows_peer(a.address(), r2.address()));

    // A root serving a properly signed newer planet: the leaf takes it and its new root.
    let mut net = Net::new(vec![
        leaf(&newer, &r, "10.0.0.1:9993"),
        leaf(&old, &a, "10.0.2.2:9993"),
    ]);
    net.step(2000);
    assert!(net.events.iter().any(|(i, e)| *i == 1
        && *e
            == Event::PlanetUpdated {
                planet: newer.clone()
            }));
    assert!(net.nodes[1].0.knows_peer(a.address(), r2.address()));
    assert_eq!(net.nodes[1].0.drop_count(DropReason::BadWorld), 0);
}

#[test]
fn packets_sent_before_any_path_exists_go_out_once_the_root_answers() {
    let (mut net, r, [a]) = root_and_leaves(["10.0.2.2:9993"]);
    // Right at start A knows the root (from the planet) but has no confirmed path to it.
    net.send(1, &a, &r, Verb::USER_MESSAGE, b"early");
    net.step(500);
    assert_eq!(net.user_messages(0), vec![(a.address(), b"early".to_vec())]);
    assert_eq!(net.nodes[1].0.drop_count(DropReason::NoPath), 0);
}

#[test]
fn a_full_peer_table_refuses_new_peers_until_one_falls_silent() {
    let (r, t, a, b) = (new_id(), new_id(), new_id(), new_id());
    let p = planet(&[(&r, "10.0.0.1:9993")]);
    let mut cfg = NodeConfig::new(p.clone());
    // The root and one more.
    cfg.max_peers = Some(2);
    let target = Node::new(cfg, vec![t.clone()]).unwrap();
    let mut net = Net::new(vec![
        leaf(&p, &r, "10.0.0.1:9993"),
        (target, sa("10.0.1.1:9993")),
        leaf(&p, &b, "10.0.3.3:9993"),
        leaf(&p, &a, "10.0.2.2:9993"),
    ]);
    net.step(1000);
    net.send(3, &a, &t, Verb::USER_MESSAGE, b"a");
    net.step(2000);
    assert_eq!(net.user_messages(1), vec![(a.address(), b"a".to_vec())]);
    // The table is full of peers that talk: B is refused, A keeps its place.
    net.send(2, &b, &t, Verb::USER_MESSAGE, b"b1");
    net.step(2000);
    let target = &net.nodes[1].0;
    assert!(!target.knows_peer(t.address(), b.address()));
    assert!(target.knows_peer(t.address(), a.address()));
    assert!(target.stats().peers_refused >= 1, "{:?}", target.stats());
    assert!(target.drop_count(DropReason::RateLimited) >= 1);
    // A stops; once silent for 30 s its slot goes to B.
    net.down.push(sa("10.0.2.2:9993"));
    net.step(31_000);
    net.send(2, &b, &t, Verb::USER_MESSAGE, b"b2");
    net.step(2000);
    let target = &net.nodes[1].0;
    assert!(target.knows_peer(t.address(), b.address()));
    assert!(!target.knows_peer(t.address(), a.address()));
    assert_eq!(target.stats().peers_evicted, 1, "{:?}", target.stats());
    assert!(
        net.user_messages(1)
            .contains(&(b.address(), b"b2".to_vec()))
    );
}

#[test]
fn traffic_relayed_by_a_root_that_dies_moves_to_the_other_root_within_seconds() {
    let (r1, r2, a, b) = (new_id(), new_id(), new_id(), new_id());
    let p = planet(&[(&r1, "10.0.0.1:9993"), (&r2, "10.0.0.2:9993")]);
    let mut net = two_roots_and_two_nated_leaves([(&p, &r1), (&p, &r2), (&p, &a), (&p, &b)]);
    net.step(3000);
    let mut seq = 0u64;
    let mut exchange = |net: &mut Net| -> bool {
        seq += 1;
        let m = seq.to_be_bytes().to_vec();
        net.send(2, &a, &b, Verb::USER_MESSAGE, &m);
        net.step(250);
        net.user_messages(3).contains(&(a.address(), m))
    };
    // Traffic well past the roots' first keepalives, so both roots look alive.
    for _ in 0..80 {
        assert!(exchange(&mut net));
    }
    let relayed: Vec<u64> = (0..2).map(|i| net.nodes[i].0.stats().relayed).collect();
    let used = usize::from(relayed[1] > relayed[0]);
    assert!(relayed[used] > 0, "no root relayed: {relayed:?}");
    net.down.push(net.nodes[used].1);
    let killed = net.now;
    while !exchange(&mut net) {
        assert!(
            net.now - killed < 30_000,
            "no traffic 30 s after the relaying root died"
        );
    }
    let took = net.now - killed;
    // A probe goes out within 2 s (ROOT_PROBE_IDLE), counts as lost after 1 s
    // (ROOT_PROBE_TIMEOUT); then the next message goes through the other root. Without
    // probes this waits for a keepalive to make the other root look fresher (up to 14 s).
    eprintln!("traffic back {took} ms after the relaying root died");
    assert!(took <= 3500, "took {took} ms");
    assert!(net.nodes[1 - used].0.stats().relayed > relayed[1 - used]);
}

#[test]
fn a_root_validates_each_identity_once_however_often_it_says_hello() {
    let (mut net, _r, _a, _b) = root_and_two_leaves();
    net.step(500);
    assert_eq!(
        net.nodes[0].0.stats().identity_validations,
        2,
        "the root validated both leaves on their first HELLO"
    );
    let hellos = net.nodes[0].0.stats().hellos_received;
    // Keepalive HELLOs (every 60 s) come from known peers: no validation.
    net.step(121_000);
    assert!(net.nodes[0].0.stats().hellos_received > hellos);
    assert_eq!(net.nodes[0].0.stats().identity_validations, 2);
    assert_eq!(
        net.nodes[1].0.stats().identity_validations,
        0,
        "a leaf knows its root from the planet"
    );
}

#[test]
fn a_planet_offered_by_the_shell_takes_effect_at_once_and_a_refused_one_changes_nothing() {
    let (r1, r2, a, b) = (new_id(), new_id(), new_id(), new_id());
    let (pk, sk) = generate_key_pair().unwrap();
    let root = |id: &Identity, ep: &str| Root {
        identity: id.to_public(),
        stable_endpoints: vec![sa(ep)],
    };
    let make = |ts: u64, roots: Vec<Root>, key: &[u8; 64], id: u64| {
        World::create(WorldType::Planet, id, ts, pk, roots, key).unwrap()
    };
    let p1 = make(1000, vec![root(&r1, "10.0.0.1:9993")], &sk, 77);
    let both = vec![root(&r1, "10.0.0.1:9993"), root(&r2, "10.0.0.2:9993")];
    let p2 = make(2000, both.clone(), &sk, 77);
    let (_, other_sk) = generate_key_pair().unwrap();
    let forged = make(3000, both.clone(), &other_sk, 77);
    let older = make(500, both.clone(), &sk, 77);
    let foreign = make(3000, both, &sk, 78);
    // R1 serves P1 (it never pushes P2); R2 and B run P2 already.
    let mut net = two_roots_and_two_nated_leaves([(&p1, &r1), (&p2, &r2), (&p1, &a), (&p2, &b)]);
    net.step(2000);
    fn node_a(net: &mut Net) -> &mut Node {
        &mut net.nodes[2].0
    }
    let now = net.now;
    assert!(
        node_a(&mut net)
            .direct_path(now, a.address(), r1.address())
            .is_some()
    );
    assert!(!node_a(&mut net).knows_peer(a.address(), r2.address()));

    // Refused offers change nothing and say why.
    assert_eq!(
        node_a(&mut net).offer_planet(now, forged),
        Err(PlanetRefused::BadSignature)
    );
    assert_eq!(
        node_a(&mut net).offer_planet(now, older),
        Err(PlanetRefused::NotNewer {
            offered: 500,
            current: 1000
        })
    );
    assert!(matches!(
        node_a(&mut net).offer_planet(now, foreign),
        Err(PlanetRefused::OtherWorld {
            offered_id: 78,
            id: 77,
            ..
        })
    ));
    assert_eq!(
        node_a(&mut net).offer_planet(now, p1.clone()),
        Ok(PlanetChange::Same)
    );
    assert_eq!(node_a(&mut net).planet(), &p1);
    assert!(!node_a(&mut net).knows_peer(a.address(), r2.address()));
    // Offers from the shell are not root pushes: not counted as bad worlds.
    assert_eq!(node_a(&mut net).drop_count(DropReason::BadWorld), 0);

    // The signed update is in force at once: R2 is a root, contacted right away.
    assert_eq!(
        node_a(&mut net).offer_planet(now, p2.clone()),
        Ok(PlanetChange::Newer)
    );
    assert_eq!(node_a(&mut net).planet(), &p2);
    assert!(
        node_a(&mut net).poll_timeout() <= now,
        "the new root is contacted now"
    );
    assert!(node_a(&mut net).knows_peer(a.address(), r2.address()));
    net.step(50);
    let now = net.now;
    assert_eq!(
        node_a(&mut net).direct_path(now, a.address(), r2.address()),
        Some(sa("10.0.0.2:9993"))
    );
    assert!(
        !net.events
            .iter()
            .any(|(i, e)| *i == 2 && matches!(e, Event::PlanetUpdated { .. })),
        "the shell has the answer; no event"
    );

    // R1 dies: A's traffic to B (which it must WHOIS and which only a root can relay to)
    // fails over to R2, a root A did not have before the offer.
    net.step(3000);
    net.down.push(sa("10.0.0.1:9993"));
    let killed = net.now;
    let m = b"through the new root".to_vec();
    net.send(2, &a, &b, Verb::USER_MESSAGE, &m);
    while !net.user_messages(3).contains(&(a.address(), m.clone())) {
        assert!(net.now - killed < 10_000, "B unreachable through R2");
        net.step(100);
    }
    eprintln!("B reached through R2 {} ms after R1 died", net.now - killed);
    assert!(net.nodes[1].0.stats().whois_answered >= 1);
    assert!(net.nodes[1].0.stats().relayed >= 1);
}

#[test]
fn the_update_rule_says_why_it_refuses() {
    let r = new_id();
    let (pk, sk) = generate_key_pair().unwrap();
    let roots = vec![Root {
        identity: r.to_public(),
        stable_endpoints: vec![sa("10.0.0.1:9993")],
    }];
    let w = |ty, id, ts| World::create(ty, id, ts, pk, roots.clone(), &sk).unwrap();
    let cur = w(WorldType::Planet, 5, 100);
    assert_eq!(check_planet_update(&cur, &cur), Ok(PlanetChange::Same));
    assert_eq!(
        check_planet_update(&cur, &w(WorldType::Planet, 5, 101)),
        Ok(PlanetChange::Newer)
    );
    let moon = check_planet_update(&cur, &w(WorldType::Moon, 5, 101)).unwrap_err();
    assert!(moon.to_string().contains("Moon"), "{moon}");
    let old = check_planet_update(&cur, &w(WorldType::Planet, 5, 99)).unwrap_err();
    assert!(old.to_string().contains("not newer"), "{old}");
}

#[test]
fn runts_such_as_nat_probes_are_counted_apart_from_malformed_datagrams() {
    let (mut net, _r, [_a]) = root_and_leaves(["10.0.2.2:9993"]);
    net.step(2000);
    let n = &mut net.nodes[1].0;
    let from = sa("10.0.9.9:9993");
    // ZeroTier One's NAT-opening probe: 4 random bytes; and every length up to a fragment
    // header.
    for len in [0, 4, 13, 16] {
        n.handle_datagram(net.now, LocalSocket(0), from, &vec![0xa5; len]);
    }
    assert_eq!(n.drop_count(DropReason::Runt), 4);
    assert_eq!(n.drop_count(DropReason::Malformed), 0);
    // Longer, but still short of a packet header: malformed.
    n.handle_datagram(net.now, LocalSocket(0), from, &[0x22; 17]);
    n.handle_datagram(net.now, LocalSocket(0), from, &[0x11; 27]);
    assert_eq!(n.drop_count(DropReason::Runt), 4);
    assert_eq!(n.drop_count(DropReason::Malformed), 2);
}
