//! End to end (needs root): a member the controller deauthorizes loses connectivity to every
//! peer within 2 s, while the others keep theirs.

use std::time::{Duration, Instant};

use flatwire_tests::planet::{self, NetworkSpec, Planet, PlanetSpec, Profile, describe_pings};

#[test]
fn a_deauthorized_member_is_cut_off_within_2_s() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let p = Planet::start(
        &PlanetSpec::new(agent)
            .host("h1", None)
            .host("h2", None)
            .host("h3", None),
    )
    .unwrap();
    let net = p.create_network(&NetworkSpec::new("deauth")).unwrap();
    let members: Vec<_> = ["h1", "h2", "h3"]
        .iter()
        .map(|h| p.join(h, &net, &[]).unwrap())
        .collect();
    let before = p.ping_matrix(&members, false).unwrap();
    assert!(
        before.iter().all(|(_, _, r)| r.ok),
        "no full connectivity before:\n{}",
        describe_pings(&before)
    );

    let gone = &members[2];
    let t = Instant::now();
    p.authorize(&net, &gone.address, false, &[]).unwrap();
    // Cut off means: no ping in either direction between h3 and any peer.
    let cut = loop {
        let reachable: Vec<String> = members[..2]
            .iter()
            .filter(|m| {
                p.ping(gone, m.ipv4.unwrap().into(), 1).ok
                    || p.ping(m, gone.ipv4.unwrap().into(), 1).ok
            })
            .map(|m| m.name.clone())
            .collect();
        if reachable.is_empty() {
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "h3 still reaches {reachable:?} {:?} after its deauthorization",
            t.elapsed()
        );
    };
    eprintln!("h3 cut off {cut:?} after the deauthorization");
    let rest = p.ping_matrix(&members[..2], false).unwrap();
    assert!(
        rest.iter().all(|(_, _, r)| r.ok),
        "the authorized members lost each other:\n{}",
        describe_pings(&rest)
    );
}
