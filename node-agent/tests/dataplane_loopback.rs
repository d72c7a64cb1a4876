//! Two data planes (a root and a leaf) on loopback, driven through `NodeHandle` snapshots and
//! metrics; the leaf runs two data-plane threads.
//! Loopback is not a valid physical path for VL1 (as in ZeroTier One), so no direct path is
//! confirmed here; the namespace test (`planet_netns`) checks direct paths.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use flatwire_agent::dataplane::{self, DataPlaneConfig, NodeHandle, NodeSnapshot, PeerRole};
use flatwire_agent::metrics::Metrics;
use flatwire_vl1::{Identity, Root, Verb, World, WorldType, wire};

fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for(
    node: &NodeHandle,
    what: &str,
    ok: impl Fn(&NodeSnapshot) -> bool,
) -> NodeSnapshot {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = node.snapshot().await.expect("data plane answers");
        if ok(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{what}: {s:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn identity() -> Identity {
    Identity::generate(&AtomicBool::new(false)).unwrap()
}

/// A root data plane (one thread) on loopback and a leaf one with `leaf_threads`.
struct Pair {
    root_id: Identity,
    leaf_id: Identity,
    root_addr: SocketAddr,
    root: NodeHandle,
    leaf: NodeHandle,
    root_metrics: Arc<Metrics>,
    leaf_metrics: Arc<Metrics>,
    leaf_events: tokio::sync::mpsc::Receiver<flatwire_vl1::Event>,
}

fn start_pair(leaf_threads: usize) -> Pair {
    let (root_id, leaf_id) = (identity(), identity());
    let root_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (pk, sk) = flatwire_vl1::identity::generate_key_pair().unwrap();
    let planet = World::create(
        WorldType::Planet,
        99,
        1,
        pk,
        vec![Root {
            identity: root_id.clone(),
            stable_endpoints: vec![root_addr],
        }],
        &sk,
    )
    .unwrap();
    let root_metrics = Arc::new(Metrics::new());
    let leaf_metrics = Arc::new(Metrics::new());
    let (root, _root_events) = dataplane::start(
        DataPlaneConfig {
            identity: root_id.clone(),
            planet: planet.clone(),
            bind: root_addr,
            controller_dir: None,
            networks: Vec::new(),
            threads: 1,
        },
        root_metrics.clone(),
    )
    .unwrap();
    let (leaf, leaf_events) = dataplane::start(
        DataPlaneConfig {
            identity: leaf_id.clone(),
            planet,
            bind: "127.0.0.1:0".parse().unwrap(),
            controller_dir: None,
            networks: Vec::new(),
            threads: leaf_threads,
        },
        leaf_metrics.clone(),
    )
    .unwrap();
    assert_eq!(root.address(), root_id.address());
    assert_eq!((root.threads(), leaf.threads()), (1, leaf_threads));
    Pair {
        root_id,
        leaf_id,
        root_addr,
        root,
        leaf,
        root_metrics,
        leaf_metrics,
        leaf_events,
    }
}

async fn stop(nodes: [NodeHandle; 2]) {
    for n in nodes {
        n.stop();
        tokio::task::spawn_blocking(move || {
            n.join();
            assert!(!n.is_running());
        })
        .await
        .unwrap();
    }
}

/// The value of the metric line starting with `series` (name and labels), if there is one.
fn metric(m: &Metrics, series: &str) -> Option<f64> {
    m.encode()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}

#[tokio::test]
async fn leaf_reaches_root_and_snapshots_say_so() {
    let mut p = start_pair(2);

    let s = wait_for(&p.leaf, "leaf online, root latency measured", |s| {
        s.online
            && s.peer(p.root_id.address())
                .is_some_and(|r| r.latency_ms.is_some())
    })
    .await;
    assert!(!s.is_root);
    assert_eq!(s.peers.len(), 1);
    let r = s.peer(p.root_id.address()).unwrap();
    assert_eq!(r.role, PeerRole::Root);
    assert!(!r.relayed, "a root is never counted as relayed");
    // Events reach the control plane.
    let ev = tokio::time::timeout(Duration::from_secs(5), p.leaf_events.recv())
        .await
        .unwrap();
    assert!(ev.is_some());

    let s = wait_for(&p.root, "root knows the leaf and its version", |s| {
        s.peer(p.leaf_id.address())
            .is_some_and(|l| l.version.is_some() && l.protocol_version.is_some())
    })
    .await;
    assert!(s.is_root && s.online);
    assert_eq!(s.peer(p.leaf_id.address()).unwrap().role, PeerRole::Leaf);
    assert!(s.stats.hellos_received >= 1);

    // Runts are counted, in the snapshot and (within a second) in the metrics.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..10u8 {
        junk.send_to(&[i; 7], p.root_addr).unwrap();
    }
    wait_for(&p.root, "runts counted", |s| s.drop_count("Runt") >= 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !p
        .root_metrics
        .encode()
        .contains("flatwire_drops_total{reason=\"Runt\"} 10")
    {
        assert!(Instant::now() < deadline, "{}", p.root_metrics.encode());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = p.leaf_metrics.encode();
    assert!(m.contains("flatwire_peers 1"), "{m}");
    assert!(m.contains("flatwire_paths{kind=\"relayed\"} 0"), "{m}");

    stop([p.root, p.leaf]).await;
}

/// Pool identities warmed on both threads of a two-thread leaf say HELLO to the root from
/// their thread's socket, and the root's answers come back to that thread, steered by the
/// kernel (none handed between threads); datagrams of a GSO run for another thread are handed
/// over.
#[tokio::test]
async fn identities_on_both_threads_reach_the_root_through_their_own_socket() {
    let p = start_pair(2);
    let host = p.leaf.address();
    let mut wanted = Vec::new();
    for thread in [0, 1] {
        for _ in 0..2 {
            let id = loop {
                let id = identity();
                if flatwire_agent::shard::shard_of(id.address(), host, 2) == thread {
                    break id;
                }
            };
            wanted.push(id.address());
            assert!(p.leaf.warm_identity(id));
        }
    }
    wait_for(&p.root, "the root heard every warmed identity", |s| {
        wanted
            .iter()
            .all(|a| s.peer(*a).is_some_and(|p| p.version.is_some()))
    })
    .await;
    // The leaf's metrics say where they live and what each thread received.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ids = |t| {
            metric(
                &p.leaf_metrics,
                &format!("flatwire_dataplane_identities{{thread=\"{t}\"}}"),
            )
        };
        let rx = |t| {
            metric(
                &p.leaf_metrics,
                &format!("flatwire_dataplane_datagrams_total{{thread=\"{t}\"}}"),
            )
        };
        // Thread 0: the host and two pool identities; thread 1: two.
        let done = ids(0) == Some(3.0)
            && ids(1) == Some(2.0)
            && rx(0).is_some_and(|n| n >= 3.0)
            && rx(1).is_some_and(|n| n >= 2.0);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "{}", p.leaf_metrics.encode());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in [0, 1] {
        let series = format!("flatwire_dataplane_forwarded_total{{thread=\"{t}\"}}");
        assert_eq!(metric(&p.leaf_metrics, &series), Some(0.0), "{series}");
    }
    // A GSO run is taken whole by the thread of its first datagram (loopback keeps it one
    // buffer for a GRO socket): the datagrams for another thread's identity are handed there,
    // and its node judges them (forged: a failed MAC each).
    let client = flatwire_agent::udp::UdpPort::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    assert!(
        client.capabilities().gso_segments > 1,
        "the kernel has UDP GSO"
    );
    let mut run = Vec::new();
    // Also one for no local identity whose address falls to thread 1: handed there, then on
    // to thread 0, whose host node (no root) counts it as not for us.
    let stranger = loop {
        let a = identity().address();
        if flatwire_agent::shard::shard_of(a, host, 2) == 1 && !wanted.contains(&a) {
            break a;
        }
    };
    for dest in [host, wanted[2], wanted[3], wanted[2], stranger] {
        let mut d = Vec::new();
        wire::write_header(&mut d, [9; 8], dest, p.root_id.address(), Verb::ECHO);
        d.resize(100, 0x5a);
        run.extend(d);
    }
    let t = flatwire_agent::udp::Transmit {
        destination: p.leaf.local_addr(),
        ecn: None,
        contents: &run,
        segment_size: Some(100),
        src_ip: None,
    };
    assert_eq!(client.send_batch(&[t]).unwrap().sent, 1);
    wait_for(
        &p.leaf,
        "the forged datagrams judged on both threads",
        |s| s.drop_count("MacFailed") == 4 && s.drop_count("NotForUs") == 1,
    )
    .await;
    // Thread 0 handed four on; thread 1 handed the stranger's back.
    let handed = |t| format!("flatwire_dataplane_forwarded_total{{thread=\"{t}\"}}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while metric(&p.leaf_metrics, &handed(0)) != Some(4.0)
        || metric(&p.leaf_metrics, &handed(1)) != Some(1.0)
    {
        assert!(Instant::now() < deadline, "{}", p.leaf_metrics.encode());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The snapshot sums the drops of both threads: a runt sent to the port lands on thread 0.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    junk.send_to(&[1; 7], p.leaf.local_addr()).unwrap();
    wait_for(&p.leaf, "the runt counted", |s| s.drop_count("Runt") == 1).await;
    stop([p.root, p.leaf]).await;
}
