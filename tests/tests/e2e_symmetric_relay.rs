//! End to end (needs root): two hosts behind symmetric NATs (MASQUERADE `--random-fully`: a
//! new port for every destination) cannot punch through, so their traffic stays relayed by the
//! root: `/peer` shows no direct path, pings work, and the root's underlay receive counter
//! grows with the traffic.

use std::time::{Duration, Instant};

use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{self, PathKind, Planet, Profile};

#[test]
fn symmetric_nats_fall_back_to_the_root_relay() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let t = Instant::now();
    let (p, a, b) = Planet::pair_behind(agent, Nat::Symmetric).unwrap();
    eprintln!("first ping a -> b after {:?}", t.elapsed());
    let to_b = b.ipv4.unwrap().into();
    let back = p.ping(&b, a.ipv4.unwrap().into(), 3);
    assert!(back.ok, "b -> a failed:\n{}", back.output);

    // Give NAT traversal time to try (and fail): the peers stay relayed all along.
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        let r = p.ping(&a, to_b, 2);
        assert!(r.ok, "a -> b failed while relayed:\n{}", r.output);
        assert_eq!(p.agent("a").path_to(&b.address), Some(PathKind::Relayed));
        assert_eq!(p.agent("b").path_to(&a.address), Some(PathKind::Relayed));
    }

    // 300 pings of 1000 bytes: the root receives 600 packets to relay (both directions).
    let (summary, grown) = p.flood(&a, to_b, "root0").unwrap();
    eprintln!("root received {grown} packets during the flood: {summary}");
    assert!(!summary.contains(" 100% packet loss"), "{summary}");
    assert!(
        grown >= 500,
        "the root received only {grown} packets of the 600 it should relay"
    );
}
