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

/// A config push the network loses is sent again until the member acknowledges it: with the
/// controller's UDP cut for the first push and its first resend, the members still hold the
/// new revision within the harness's 5 s, long before their own refresh (a minute after they
/// joined).
#[test]
fn a_lost_config_push_is_sent_again() {
    planet::check_root().unwrap();
    let agent = planet::agent_binary(Profile::Debug).unwrap();
    let p = Planet::start(&PlanetSpec::new(agent).host("a1", None).host("a2", None)).unwrap();
    let net = p.create_network(&NetworkSpec::new("push")).unwrap();
    let a1 = p.join("a1", &net, &[(TAG, 1)]).unwrap();
    let a2 = p.join("a2", &net, &[(TAG, 2)]).unwrap();
    assert!(p.ping(&a1, a2.ipv4.unwrap().into(), 2).ok);

    let ctl = p.agent("ctl0").host().clone();
    let cut = ["OUTPUT", "-p", "udp", "-j", "DROP"];
    let iptables = |op: &str| {
        let mut args = vec![op];
        args.extend(cut);
        let out = ctl.run("iptables", &args).unwrap();
        assert!(out.status.success(), "iptables {op}: {out:?}");
    };
    iptables("-I");
    let compiled = flatwire_vl2::rules::compiler::compile(BLOCK).unwrap();
    let cli = compiled.to_cli_json().to_value();
    let body = serde_json::json!({"rules": cli["config"]["rules"], "tags": cli["config"]["tags"]});
    let stored = p
        .agent("ctl0")
        .api_ok(
            "POST",
            &format!("/controller/network/{}", net.nwid),
            Some(&body),
        )
        .unwrap();
    let pushed = std::time::Instant::now();
    // The push (at once) and the first resend (0.5 s) are lost; the next one (1.5 s) is not.
    std::thread::sleep(std::time::Duration::from_millis(1000));
    iptables("-D");
    let revision = stored["revision"].as_u64().unwrap();
    p.wait_revision(&net, revision)
        .expect("the members never got the lost push");
    eprintln!(
        "revision {revision} reached both members {:?} after the push, with the first 1 s of it lost",
        pushed.elapsed()
    );
    assert!(!connects(&p, &a2, &a1), "the new rules are not in force");
}
