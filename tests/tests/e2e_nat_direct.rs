//! End to end (needs root): two hosts behind two different MASQUERADE NAT routers reach a
//! direct path to each other (the root introduces them, both punch through their NAT): each
//! agent's `/peer` lists a path to the other, and traffic between them stops passing through
//! the root (the root's underlay receive counter barely moves during a ping flood).

use std::time::{Duration, Instant};

use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{self, PathKind, Planet, Profile};

#[test]
fn hosts_behind_two_masquerade_nats_go_direct() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let t = Instant::now();
    let (p, a, b) = Planet::pair_behind(agent, Nat::Masquerade).unwrap();
    eprintln!("first ping a -> b after {:?}", t.elapsed());
    let to_b = b.ipv4.unwrap().into();
    // Traffic in both directions keeps the NAT mappings and the root's introductions going.
    let to_a = a.ipv4.unwrap().into();
    let limit = Duration::from_secs(45);
    let direct = loop {
        let (ab, ba) = (p.ping(&a, to_b, 1), p.ping(&b, to_a, 1));
        assert!(
            ab.ok && ba.ok,
            "relayed pings failed:\n{}\n{}",
            ab.output,
            ba.output
        );
        let paths = (
            p.agent("a").path_to(&b.address),
            p.agent("b").path_to(&a.address),
        );
        if paths == (Some(PathKind::Direct), Some(PathKind::Direct)) {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < limit,
            "no direct path both ways {limit:?} after the first ping: {paths:?}; /peer of a: {}",
            p.agent("a").api("GET", "/peer", None).1
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    eprintln!("direct both ways {direct:?} after the first ping");
    let (_, peer) = p
        .agent("a")
        .api("GET", &format!("/peer/{}", b.address), None);
    let path = peer["paths"][0]["address"].as_str().unwrap().to_owned();
    eprintln!("a reaches b at {path}");
    // b is the planet's second host: its NAT's public side is 198.18.(128 + 1).2.
    assert!(
        path.starts_with("198.18.129.2/"),
        "a's path to b is not b's NAT's public side: {path}"
    );

    // 300 pings of 1000 bytes: relayed, the root would receive 600 packets.
    let (summary, grown) = p.flood(&a, to_b, "root0").unwrap();
    eprintln!("root received {grown} packets during the flood: {summary}");
    assert!(summary.contains(" 0% packet loss"), "{summary}");
    assert!(
        grown < 60,
        "the root received {grown} packets while 600 went directly: still relaying"
    );
    assert_eq!(p.agent("a").path_to(&b.address), Some(PathKind::Direct));
}
