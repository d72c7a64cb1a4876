//! The controller's member indexes (active bridges, assigned IPs): the configs it issues
//! are byte-identical to those of the scanning implementation, and the indexes of both
//! stores agree with a naive recomputation after any sequence of member changes,
//! including a restart of the file store.

mod common;

use std::net::IpAddr;

use common::{add_capability_tag_and_dns, ident, node_metadata, stored_member};
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    Controller, ControllerStore, FileStore, Member, MemoryStore, Network, Pool, RequestOutcome,
};
use flatwire_vl2::dictionary::Dictionary;
use proptest::prelude::*;
use sha2::{Digest, Sha256};

fn nwid() -> NetworkId {
    "e6acfe87fc3adaf6".parse().unwrap()
}

/// The recorded lab network with a small IPv4 pool (so picks collide), an IPv6 pool,
/// RFC4193, a capability, a tag and DNS.
fn lab_network() -> Network {
    let mut n = common::lab_network();
    n.ip_assignment_pools = vec![
        Pool {
            ip_range_start: "10.147.17.1".into(),
            ip_range_end: "10.147.17.40".into(),
        },
        Pool {
            ip_range_start: "fd00:feed::".into(),
            ip_range_end: "fd00:feed::ffff".into(),
        },
    ];
    n.routes.push(flatwire_vl2::controller::RouteJson {
        target: "fd00:feed::/112".into(),
        via: None,
    });
    n.v6_assign_mode.zt = true;
    n.v6_assign_mode.rfc4193 = true;
    add_capability_tag_and_dns(&mut n);
    n
}

fn metadata() -> Dictionary {
    node_metadata(Some("linux/x86_64"))
}

/// Requesters: ztb and 40 synthetic identities sharing ztb's key.
fn requesters() -> Vec<Identity> {
    let ztb = ident("capture/node-identities/ztb-e28e6b73a1.public");
    let mut v = vec![ztb.clone()];
    for i in 0..40u64 {
        let a = Address::new(0x10_0000_0000 + i * 0x1_0001).unwrap();
        v.push(Identity::from_public_parts(a, *ztb.public_key()).unwrap());
    }
    v
}

/// Runs a fixed script of API changes and requests; returns the SHA-256 of every
/// outcome (encoded configs, refusal codes, ignores) and of the stored members.
fn script<S: ControllerStore>(store: S) -> String {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.secret");
    let nwid = nwid();
    let mut ctl = Controller::new(zta, store);
    let mut n = lab_network();
    ctl.store_mut().put_network(&mut n).unwrap();
    let who = requesters();
    let md = metadata();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        seed
    };
    // Members created through the API first: some authorized, some bridges, some
    // holding pool addresses the others would pick.
    for (i, id) in who.iter().enumerate().skip(1) {
        if i % 3 == 0 {
            continue;
        }
        let mut m = Member::new(nwid, id.address(), 10);
        m.authorized = i % 5 != 0;
        m.active_bridge = i % 7 == 1;
        if i % 4 == 2 {
            m.ip_assignments = vec![format!("10.147.17.{}", 1 + (i * 3) % 40)];
        }
        ctl.store_mut().put_member(&mut m).unwrap();
    }
    let mut h = Sha256::new();
    // (configs, configs listing bridges, configs with a pool IPv4 address)
    let mut seen = (0, 0, 0);
    let mut outcome = |o: RequestOutcome, h: &mut Sha256| match o {
        RequestOutcome::Ignore => h.update(b"I"),
        RequestOutcome::Refuse(r) => h.update([b'R', r.error_code()]),
        RequestOutcome::Config(c) => {
            seen.0 += 1;
            seen.1 += usize::from(c.specialists.len() > 1);
            seen.2 += usize::from(c.static_ips.iter().any(|i| i.ip.is_ipv4()));
            h.update(b"C");
            h.update(c.encode());
        }
    };
    let mut now = 1_000_000i64;
    for round in 0..3 {
        for (i, id) in who.iter().enumerate() {
            now += 17;
            let pid = (round * 100 + i + 1) as u64;
            let o = ctl
                .handle_request(nwid, id, &md, pid, now, &mut rnd)
                .unwrap();
            outcome(o, &mut h);
        }
        // Between rounds: authorize everyone refused, make some bridges, deauthorize
        // and delete others, drop some IPs.
        for (i, id) in who.iter().enumerate() {
            let a = id.address();
            let Some(mut m) = ctl.store().get_member(nwid, a).unwrap() else {
                continue;
            };
            match (i + round) % 6 {
                0 => {
                    ctl.store_mut().delete_member(nwid, a).unwrap();
                    continue;
                }
                1 => m.authorized = false,
                2 => m.active_bridge = !m.active_bridge,
                3 => m.ip_assignments.clear(),
                _ => m.authorized = true,
            }
            ctl.store_mut().put_member(&mut m).unwrap();
        }
        now += 5000;
    }
    // The script reaches bridges and pool assignment.
    assert!(seen.0 > 40 && seen.1 > 20 && seen.2 > 40, "{seen:?}");
    for a in ctl.store().list_members(nwid).unwrap() {
        let m = stored_member(&ctl, nwid, a);
        h.update(flatwire_vl2::controller::to_canonical_json(&m).unwrap());
    }
    hex::encode(h.finalize())
}

/// Recorded from the scanning implementation (before the indexes) on this script.
const GOLDEN: &str = "588a18b3f4ef106e266413bb647989d4690869528f6748297b134818c9884fe2";

#[test]
fn issued_configs_are_byte_identical_to_the_scanning_controller() {
    let mem = script(MemoryStore::default());
    let dir = tempfile::tempdir().unwrap();
    let file = script(FileStore::open(dir.path()).unwrap());
    assert_eq!(mem, file, "memory and file stores issue the same configs");
    assert_eq!(mem, GOLDEN);
}

// ---- index consistency ----

#[derive(Clone, Debug)]
enum Op {
    /// Create or overwrite member `a` of network `n` with these fields.
    Put {
        n: usize,
        a: usize,
        bridge: bool,
        authorized: bool,
        ips: Vec<usize>,
    },
    Authorize(usize, usize, bool),
    Bridge(usize, usize, bool),
    Delete(usize, usize),
    DeleteNetwork(usize),
    /// Restart: reopen the file store from disk.
    Reopen,
}

const NETS: [&str; 2] = ["e6acfe87fc3adaf6", "e6acfe87fc000001"];
const IPS: [&str; 5] = ["10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.1", "not-an-ip"];

fn addr(a: usize) -> Address {
    Address::new(0x10_0000_0000 + a as u64).unwrap()
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..5usize, any::<bool>(), any::<bool>(), prop::collection::vec(0..5usize, 0..3))
            .prop_map(|(n, a, bridge, authorized, ips)| Op::Put { n, a, bridge, authorized, ips }),
        2 => (0..2usize, 0..5usize, any::<bool>()).prop_map(|(n, a, b)| Op::Authorize(n, a, b)),
        2 => (0..2usize, 0..5usize, any::<bool>()).prop_map(|(n, a, b)| Op::Bridge(n, a, b)),
        2 => (0..2usize, 0..5usize).prop_map(|(n, a)| Op::Delete(n, a)),
        1 => (0..2usize).prop_map(Op::DeleteNetwork),
        1 => Just(Op::Reopen),
    ]
}

fn apply(s: &mut dyn ControllerStore, op: &Op) {
    let nw = |n: usize| -> NetworkId { NETS[n].parse().unwrap() };
    match op {
        Op::Put {
            n,
            a,
            bridge,
            authorized,
            ips,
        } => {
            if s.get_network(nw(*n)).unwrap().is_none() {
                s.put_network(&mut Network::new(nw(*n), 0)).unwrap();
            }
            let mut m = s
                .get_member(nw(*n), addr(*a))
                .unwrap()
                .unwrap_or_else(|| Member::new(nw(*n), addr(*a), 0));
            m.active_bridge = *bridge;
            m.authorized = *authorized;
            m.ip_assignments = ips.iter().map(|i| IPS[*i].to_string()).collect();
            s.put_member(&mut m).unwrap();
        }
        Op::Authorize(n, a, v) | Op::Bridge(n, a, v) => {
            if let Some(mut m) = s.get_member(nw(*n), addr(*a)).unwrap() {
                if matches!(op, Op::Authorize(..)) {
                    m.authorized = *v;
                } else {
                    m.active_bridge = *v;
                }
                s.put_member(&mut m).unwrap();
            }
        }
        Op::Delete(n, a) => {
            s.delete_member(nw(*n), addr(*a)).unwrap();
        }
        Op::DeleteNetwork(n) => {
            s.delete_network(nw(*n)).unwrap();
        }
        Op::Reopen => {}
    }
}

/// The indexed answers equal a recomputation from every stored member.
fn assert_consistent(s: &dyn ControllerStore) {
    for n in NETS {
        let nwid: NetworkId = n.parse().unwrap();
        let members: Vec<Member> = s
            .list_members(nwid)
            .unwrap()
            .into_iter()
            .map(|a| s.get_member(nwid, a).unwrap().unwrap())
            .collect();
        let bridges: Vec<Address> = members
            .iter()
            .filter(|m| m.active_bridge)
            .map(|m| m.id.parse().unwrap())
            .collect();
        assert_eq!(s.active_bridges(nwid).unwrap(), bridges, "bridges of {n}");
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2"] {
            let ip: IpAddr = ip.parse().unwrap();
            for except in (0..6).map(addr) {
                let naive = members.iter().any(|m| {
                    m.id != except.to_string()
                        && m.ip_assignments.iter().any(|x| x.parse() == Ok(ip))
                });
                assert_eq!(
                    s.ip_assigned(nwid, ip, except).unwrap(),
                    naive,
                    "{n} {ip} except {except}"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn memory_store_index_matches_recomputation(ops in prop::collection::vec(op(), 1..40)) {
        let mut s = MemoryStore::default();
        for op in &ops {
            apply(&mut s, op);
            assert_consistent(&s);
        }
    }
}

proptest! {
    // Every write is two fsyncs: fewer cases.
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn file_store_index_matches_recomputation_across_restarts(ops in prop::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut s = FileStore::open(dir.path()).unwrap();
        for op in &ops {
            if matches!(op, Op::Reopen) {
                s = FileStore::open(dir.path()).unwrap();
            }
            apply(&mut s, op);
            assert_consistent(&s);
        }
        // And a restart at the end rebuilds the same index.
        assert_consistent(&FileStore::open(dir.path()).unwrap());
    }
}

/// Network files deleted while members remain (a crash of an older version between
/// the two deletions): the reopened index still sees those members, as the store does.
#[test]
fn file_store_indexes_members_of_a_network_without_its_file() {
    let dir = tempfile::tempdir().unwrap();
    let nwid = nwid();
    let mut s = FileStore::open(dir.path()).unwrap();
    s.put_network(&mut Network::new(nwid, 0)).unwrap();
    let mut m = Member::new(nwid, addr(1), 0);
    m.active_bridge = true;
    m.ip_assignments = vec!["10.0.0.1".into()];
    s.put_member(&mut m).unwrap();
    std::fs::remove_file(dir.path().join(format!("network/{nwid}.json"))).unwrap();
    let s = FileStore::open(dir.path()).unwrap();
    assert_eq!(s.active_bridges(nwid).unwrap(), vec![addr(1)]);
    assert!(
        s.ip_assigned(nwid, "10.0.0.1".parse().unwrap(), addr(2))
            .unwrap()
    );
    assert_consistent(&s);
}
