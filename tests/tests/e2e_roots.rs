//! End to end (needs root): a planet with two roots keeps working when the root relaying the
//! traffic dies (hosts behind symmetric NATs, so every pair is relayed): peers that already
//! talked keep talking, and a pair that never talked before finds each other through the
//! remaining root.

use std::time::Duration;

use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{self, NetworkSpec, Planet, PlanetSpec, Profile};

#[test]
fn one_of_two_roots_dies_and_connectivity_stays() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let mut p = Planet::start(
        &PlanetSpec::new(agent)
            .roots(2)
            .host("h1", Some(Nat::Symmetric))
            .host("h2", Some(Nat::Symmetric))
            .host("h3", Some(Nat::Symmetric)),
    )
    .unwrap();
    let net = p.create_network(&NetworkSpec::new("roots")).unwrap();
    let m1 = p.join("h1", &net, &[]).unwrap();
    let m2 = p.join("h2", &net, &[]).unwrap();
    let m3 = p.join("h3", &net, &[]).unwrap();
    // h1 and h2 talk before the root dies; h3 talks to nobody until after.
    p.wait_ping(&m1, m2.ipv4.unwrap().into(), Duration::from_secs(10))
        .unwrap();
    p.wait_ping(&m2, m1.ipv4.unwrap().into(), Duration::from_secs(10))
        .unwrap();

    // Behind symmetric NATs every pair stays relayed. A burst of 100 pings (200 packets) must
    // pass through the roots; each host relays through the root it prefers, so on a loaded
    // machine the two directions may take different roots. Stop the root that relayed more
    // (at least half of the burst), so at least one direction has to fail over.
    let counts = |p: &Planet| -> Vec<u64> {
        ["root0", "root1"]
            .iter()
            .map(|r| p.agent(r).underlay_rx_packets().unwrap())
            .collect()
    };
    let before = counts(&p);
    m1.ns
        .run(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                "100",
                "-i",
                "0.005",
                &m2.ipv4.unwrap().to_string(),
            ],
        )
        .unwrap();
    let after = counts(&p);
    let relayed: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert!(
        relayed.iter().sum::<u64>() >= 190,
        "the roots did not relay the burst: {before:?} -> {after:?}"
    );
    let used = usize::from(relayed[1] > relayed[0]);
    let (dead, alive) = (format!("root{used}"), format!("root{}", 1 - used));
    eprintln!(
        "h1 <-> h2 relayed by {dead} (received {:?} -> {after:?}); stopping it",
        before
    );
    p.stop_agent(&dead);
    // Hosts probe a root they relay through once it has been silent for 2 s and pass it over
    // when the probe goes 1 s unanswered (vl1 `timers::ROOT_PROBE_*`): about 3 s at worst
    // plus a ping interval; measured 1.9 s (it took 13.5 s before, waiting for the 14 s
    // keepalive to show the other root fresher). The rest is margin for a loaded machine.
    let limit = Duration::from_secs(6);
    let old = p
        .wait_ping(&m1, m2.ipv4.unwrap().into(), limit)
        .unwrap_or_else(|e| panic!("old pair h1 -> h2 lost for good after {dead} stopped: {e}"));
    eprintln!("old pair h1 -> h2 answers {old:?} after {dead} stopped");
    let new = p
        .wait_ping(&m3, m2.ipv4.unwrap().into(), limit)
        .unwrap_or_else(|e| panic!("new pair h3 -> h2 never met through {alive}: {e}"));
    eprintln!("new pair h3 -> h2 answers {new:?} after {dead} stopped (after the old pair)");
    let back = p.ping(&m2, m3.ipv4.unwrap().into(), 3);
    assert!(back.ok, "h2 -> h3 failed:\n{}", back.output);
    let old_again = p.ping(&m2, m1.ipv4.unwrap().into(), 3);
    assert!(old_again.ok, "h2 -> h1 failed:\n{}", old_again.output);
}
