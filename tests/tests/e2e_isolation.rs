//! End to end (needs root): two controllers' networks on one host stay isolated. Host x joins
//! network A (controller ctl0) and network B (controller ctl1); y joins only A and z only B.
//! Each reaches x on the network they share, and even with a route sending B's subnet into A's
//! TAP, y never reaches z (nor z y).

use std::time::Duration;

use flatwire_tests::planet::{self, NetworkSpec, Planet, PlanetSpec, Profile};

#[test]
fn networks_of_two_controllers_stay_isolated_on_one_host() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let p = Planet::start(
        &PlanetSpec::new(agent)
            .controllers(2)
            .host("x", None)
            .host("y", None)
            .host("z", None),
    )
    .unwrap();
    let net_a = p.create_network(&NetworkSpec::new("a")).unwrap();
    let mut spec_b = NetworkSpec::new("b");
    spec_b.controller = 1;
    spec_b.subnet = 1;
    let net_b = p.create_network(&spec_b).unwrap();
    assert_ne!(net_a.nwid[..10], net_b.nwid[..10], "same controller");

    let xa = p.join("x", &net_a, &[]).unwrap();
    let xb = p.join("x", &net_b, &[]).unwrap();
    let y = p.join("y", &net_a, &[]).unwrap();
    let z = p.join("z", &net_b, &[]).unwrap();
    assert_ne!(xa.dev, xb.dev);
    let limit = Duration::from_secs(10);
    p.wait_ping(&y, xa.ipv4.unwrap().into(), limit).unwrap();
    p.wait_ping(&z, xb.ipv4.unwrap().into(), limit).unwrap();

    // Routes that push the other network's subnet into each one's own TAP.
    y.ns.run("ip", &["route", "add", "198.19.1.0/24", "dev", &y.dev])
        .unwrap();
    z.ns.run("ip", &["route", "add", "198.19.0.0/24", "dev", &z.dev])
        .unwrap();
    let yz = p.ping(&y, z.ipv4.unwrap().into(), 3);
    assert!(
        !yz.ok,
        "y (network A) reached z (network B):\n{}",
        yz.output
    );
    let zy = p.ping(&z, y.ipv4.unwrap().into(), 3);
    assert!(
        !zy.ok,
        "z (network B) reached y (network A):\n{}",
        zy.output
    );
    // Both networks still work on the shared host.
    for (from, to) in [(&xa, &y), (&xb, &z)] {
        let r = p.ping(from, to.ipv4.unwrap().into(), 2);
        assert!(r.ok, "{} -> {} failed:\n{}", from.name, to.name, r.output);
    }
}
