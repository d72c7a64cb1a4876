//! End to end (needs root): tag rules set on the controller (rule-language source compiled by
//! flatwire-vl2's compiler, tags on members) are enforced by the members: TCP port 5201 is
//! dropped between tags `alpha` and `beta`, while `alpha` to `alpha` and ping keep working;
//! after the rules are lifted (the controller pushes each change to the members) the port is
//! open again.

use flatwire_tests::planet::{self, Member, NetworkSpec, Planet, PlanetSpec, Profile};

const TAG: u32 = 100;
const BLOCK: &str = "tag role id 100 enum 1 alpha enum 2 beta;\n\
    drop ipprotocol tcp dport 5201 tseq role alpha treq role beta;\n\
    drop ipprotocol tcp dport 5201 tseq role beta treq role alpha;\n\
    accept;\n";
const OPEN: &str = "tag role id 100 enum 1 alpha enum 2 beta;\naccept;\n";

/// Whether an iperf3 client in `from` connects to a server in `to` on port 5201.
fn connects(p: &Planet, from: &Member, to: &Member) -> bool {
    p.iperf(&to.ns, &from.ns, to.ipv4.unwrap().into(), 5201, 1)
        .unwrap()
        .is_some()
}

#[test]
fn tag_rules_from_the_controller_are_enforced() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let p = Planet::start(
        &PlanetSpec::new(agent)
            .host("a1", None)
            .host("a2", None)
            .host("b1", None),
    )
    .unwrap();
    let net = p.create_network(&NetworkSpec::new("rules")).unwrap();
    p.set_rules(&net, BLOCK).unwrap();
    let a1 = p.join("a1", &net, &[(TAG, 1)]).unwrap();
    let a2 = p.join("a2", &net, &[(TAG, 1)]).unwrap();
    let b1 = p.join("b1", &net, &[(TAG, 2)]).unwrap();

    assert!(connects(&p, &a2, &a1), "alpha -> alpha on 5201 was blocked");
    assert!(!connects(&p, &b1, &a1), "beta -> alpha on 5201 got through");
    assert!(!connects(&p, &a1, &b1), "alpha -> beta on 5201 got through");
    let ping = p.ping(&b1, a1.ipv4.unwrap().into(), 2);
    assert!(ping.ok, "the rules dropped ping too:\n{}", ping.output);
    let hits = p.agent("a1").metrics().unwrap();
    eprintln!(
        "a1 rule hits: {}",
        hits.lines()
            .filter(|l| l.starts_with("flatwire_rule_hits"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    p.set_rules(&net, OPEN).unwrap();
    assert!(
        connects(&p, &b1, &a1),
        "beta -> alpha still blocked after lifting"
    );
    assert!(
        connects(&p, &a1, &b1),
        "alpha -> beta still blocked after lifting"
    );
}
