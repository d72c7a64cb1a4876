//! Two data planes (a root and a leaf) on loopback, driven through `NodeHandle` snapshots.
//! Loopback is not a valid physical path for VL1 (as in ZeroTier One), so no direct path is
//! confirmed here; the namespace test (`planet_netns`) checks direct paths.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use flatwire_agent::dataplane::{self, DataPlaneConfig, NodeHandle, NodeSnapshot, PeerRole};
use flatwire_agent::metrics::Metrics;
use flatwire_vl1::{Identity, Root, World, WorldType};

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

#[tokio::test]
async fn leaf_reaches_root_and_snapshots_say_so() {
    let root_id = Identity::generate(&AtomicBool::new(false)).unwrap();
    let leaf_id = Identity::generate(&AtomicBool::new(false)).unwrap();
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
        },
        root_metrics.clone(),
    )
    .unwrap();
    let (leaf, mut leaf_events) = dataplane::start(
        DataPlaneConfig {
            identity: leaf_id.clone(),
            planet,
            bind: "127.0.0.1:0".parse().unwrap(),
            controller_dir: None,
            networks: Vec::new(),
        },
        leaf_metrics.clone(),
    )
    .unwrap();
    assert_eq!(root.address(), root_id.address());

    let s = wait_for(&leaf, "leaf online, root latency measured", |s| {
        s.online
            && s.peer(root_id.address())
                .is_some_and(|p| p.latency_ms.is_some())
    })
    .await;
    assert!(!s.is_root);
    assert_eq!(s.peers.len(), 1);
    let p = s.peer(root_id.address()).unwrap();
    assert_eq!(p.role, PeerRole::Root);
    assert!(!p.relayed, "a root is never counted as relayed");
    // Events reach the control plane.
    let ev = tokio::time::timeout(Duration::from_secs(5), leaf_events.recv())
        .await
        .unwrap();
    assert!(ev.is_some());

    let s = wait_for(&root, "root knows the leaf and its version", |s| {
        s.peer(leaf_id.address())
            .is_some_and(|p| p.version.is_some() && p.protocol_version.is_some())
    })
    .await;
    assert!(s.is_root && s.online);
    assert_eq!(s.peer(leaf_id.address()).unwrap().role, PeerRole::Leaf);
    assert!(s.stats.hellos_received >= 1);

    // Runts are counted, in the snapshot and (within a second) in the metrics.
    let junk = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..10u8 {
        junk.send_to(&[i; 7], root_addr).unwrap();
    }
    wait_for(&root, "runts counted", |s| s.drop_count("Malformed") >= 10).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !root_metrics
        .encode()
        .contains("flatwire_drops_total{reason=\"Malformed\"} 10")
    {
        assert!(Instant::now() < deadline, "{}", root_metrics.encode());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = leaf_metrics.encode();
    assert!(m.contains("flatwire_peers 1"), "{m}");
    assert!(m.contains("flatwire_paths{kind=\"relayed\"} 0"), "{m}");

    for n in [root, leaf] {
        n.stop();
        tokio::task::spawn_blocking(move || {
            n.join();
            assert!(!n.is_running());
        })
        .await
        .unwrap();
    }
}
