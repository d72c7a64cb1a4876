//! End to end (needs root): a planet of real agents (a root, a controller, three hosts, one
//! behind a MASQUERADE NAT) on one network with IPv4 and RFC 4193 IPv6 addresses; every member
//! pings every other over the overlay, in both families (IPv6 needs NDP over the overlay).

use std::time::Instant;

use flatwire_tests::netns::Nat;
use flatwire_tests::planet::{
    self, NetworkSpec, Planet, PlanetSpec, Profile, V6Mode, describe_pings,
};

#[test]
fn every_member_pings_every_other_over_ipv4_and_ipv6() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let t = Instant::now();
    let p = Planet::start(
        &PlanetSpec::new(agent)
            .host("h1", None)
            .host("h2", None)
            .host("h3", Some(Nat::Masquerade)),
    )
    .unwrap();
    eprintln!("planet up in {:?}", t.elapsed());
    let mut spec = NetworkSpec::new("matrix");
    spec.v6 = V6Mode::Rfc4193;
    let net = p.create_network(&spec).unwrap();
    let members: Vec<_> = p
        .host_names()
        .iter()
        .map(|h| p.join(h, &net, &[]).unwrap())
        .collect();
    for m in &members {
        let v4 = m.ipv4.unwrap();
        assert_eq!(v4.octets()[..3], [198, 19, 0], "{v4} outside the pool");
        let v6 = m.ipv6.unwrap();
        assert_eq!(v6.octets()[0], 0xfd, "{v6} is not an RFC 4193 address");
        eprintln!("{}: {} {v4} {v6} on {}", m.name, m.address, m.dev);
    }
    eprintln!("members joined after {:?}", t.elapsed());
    for v6 in [false, true] {
        let t = Instant::now();
        let results = p.ping_matrix(&members, v6).unwrap();
        let table = describe_pings(&results);
        eprintln!(
            "IPv{} matrix in {:?}:\n{table}",
            if v6 { 6 } else { 4 },
            t.elapsed()
        );
        assert_eq!(results.len(), 6);
        assert!(
            results.iter().all(|(_, _, r)| r.ok),
            "failed pings:\n{table}"
        );
    }
}
