//! End to end (needs root): an agent restarted with the same state rejoins its network from
//! `networks.d` and its member answers pings from a peer within 5 s of the restart.

use std::time::{Duration, Instant};

use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{self, NetworkSpec, Planet, PlanetSpec, Profile};

#[test]
fn a_restarted_agent_is_reachable_again_within_5_s() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let mut p = Planet::start(
        &PlanetSpec::new(agent)
            .host("h1", None)
            .host("h2", Some(Nat::Masquerade)),
    )
    .unwrap();
    let net = p.create_network(&NetworkSpec::new("restart")).unwrap();
    let m1 = p.join("h1", &net, &[]).unwrap();
    let m2 = p.join("h2", &net, &[]).unwrap();
    let to_h2 = m2.ipv4.unwrap().into();
    p.wait_ping(&m1, to_h2, Duration::from_secs(10)).unwrap();

    for restarted in ["h2", "h1"] {
        p.stop_agent(restarted);
        if restarted == "h2" {
            assert!(
                !p.ping(&m1, to_h2, 1).ok,
                "h2 answered with its agent stopped"
            );
        }
        let t = Instant::now();
        p.start_agent(restarted).unwrap();
        let back = p.wait_member(restarted, &net).unwrap();
        let addressed = t.elapsed();
        let was = if restarted == "h1" { &m1 } else { &m2 };
        assert_eq!(back.ipv4, was.ipv4, "{restarted} got another address");
        let answered = p
            .wait_ping(
                &m1,
                to_h2,
                Duration::from_secs(5).saturating_sub(t.elapsed()),
            )
            .map(|_| t.elapsed())
            .unwrap_or_else(|e| {
                panic!("no ping h1 -> h2 within 5 s of restarting {restarted}: {e}")
            });
        eprintln!(
            "restarted {restarted}: addresses back after {addressed:?}, ping h1 -> h2 after \
             {answered:?}"
        );
        assert!(answered < Duration::from_secs(5));
    }
}
