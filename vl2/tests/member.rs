//! The member runtime in isolation: multi-chunk config reassembly with signature checks,
//! controller errors and status, and robustness against arbitrary payloads.

use std::sync::atomic::AtomicBool;

use flatwire_vl1::{Address, Identity, Verb};
use flatwire_vl2::NetworkId;
use flatwire_vl2::controller::{
    Controller, ControllerStore, Member, MemoryStore, Network as NetworkJson, RequestOutcome,
    config_payloads,
};
use flatwire_vl2::member::{DropReason, MemberOptions, Network, NetworkEvent, Output, Status};
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::verbs::{ConfigRequest, in_re};
use proptest::prelude::*;

struct Lab {
    ctl: Identity,
    member: Identity,
    nwid: NetworkId,
    cfg: NetworkConfig,
}

fn lab(rule_lines: usize) -> Lab {
    let cancel = AtomicBool::new(false);
    let ctl = Identity::generate(&cancel).unwrap();
    let member = Identity::generate(&cancel).unwrap();
    let nwid = NetworkId::new(ctl.address(), 7);
    let src: String = (0..rule_lines)
        .map(|i| format!("drop ipdest fd00:{:x}::/64;\n", i + 1))
        .collect::<String>()
        + "accept;\n";
    let cli = compile(&src).unwrap().to_cli_json().to_value();
    let mut n = NetworkJson::new(nwid, 0);
    n.rules = cli["config"]["rules"].as_array().cloned().unwrap();
    let mut store = MemoryStore::default();
    store.put_network(&mut n).unwrap();
    let mut m = Member::new(nwid, member.address(), 0);
    m.authorized = true;
    store.put_member(&mut m).unwrap();
    let mut c = Controller::new(ctl.clone(), store);
    let md = flatwire_vl2::verbs::request_metadata(
        flatwire_vl2::verbs::SoftwareVersion {
            major: 1,
            minor: 14,
            revision: 1,
        },
        None,
    );
    let cfg = match c
        .handle_request(nwid, &member.to_public(), &md, 1, 5000, &mut || 3)
        .unwrap()
    {
        RequestOutcome::Config(c) => *c,
        o => panic!("{o:?}"),
    };
    Lab {
        ctl,
        member,
        nwid,
        cfg,
    }
}

fn drain(n: &mut Network) -> Vec<Output> {
    std::iter::from_fn(|| n.poll_output()).collect()
}

#[test]
fn multi_chunk_config_reassembles_and_rejects_forgeries() {
    let l = lab(500);
    let pubs = [l.ctl.to_public(), l.member.to_public()];
    let dir = |a: Address| pubs.iter().find(|i| i.address() == a).cloned();
    let mut n = Network::join(l.member.address(), l.nwid, MemberOptions::default(), 1000);
    let out = drain(&mut n);
    let req = out
        .iter()
        .find_map(|o| match o {
            Output::Send {
                to,
                verb: Verb::NETWORK_CONFIG_REQUEST,
                payload,
            } if *to == l.ctl.address() => Some(ConfigRequest::decode(payload).unwrap()),
            _ => None,
        })
        .expect("join sends a config request to the controller");
    assert_eq!(req.nwid, l.nwid);
    assert_eq!(req.metadata_dictionary().get_u64("v", 0), 7);
    assert_eq!(n.status(), Status::RequestingConfiguration);

    let chunks = config_payloads(&l.ctl, &l.cfg, Some(42), 0xfeed).unwrap();
    assert!(chunks.len() >= 2, "the config spans several chunks");
    // A chunk signed by someone else is refused.
    let forged = config_payloads(&l.member, &l.cfg, Some(42), 0xbad).unwrap();
    n.handle_packet(2000, l.ctl.address(), forged[0].0, 1, &forged[0].1, &dir);
    assert_eq!(n.drop_count(DropReason::BadChunk), 1);
    // Chunks arrive in reverse order, one twice; only from the controller.
    for (v, p) in chunks.iter().rev() {
        n.handle_packet(2000, l.ctl.address(), *v, 1, p, &dir);
    }
    n.handle_packet(2000, l.ctl.address(), chunks[0].0, 1, &chunks[0].1, &dir);
    assert_eq!(n.status(), Status::Ok);
    assert_eq!(n.config(), Some(&l.cfg));
    assert_eq!(n.config().unwrap().rules.len(), 1001);
    let ev = drain(&mut n);
    assert!(ev.contains(&Output::Event(NetworkEvent::ConfigChanged)));
    assert!(ev.contains(&Output::Event(NetworkEvent::StatusChanged(Status::Ok))));

    // A push (NETWORK_CONFIG) of the same config changes nothing but is acknowledged with
    // the reference's in-re ECHO quirk.
    let pushed = config_payloads(&l.ctl, &l.cfg, None, 0xf00d).unwrap();
    for (v, p) in &pushed {
        assert_eq!(*v, Verb::NETWORK_CONFIG);
        n.handle_packet(3000, l.ctl.address(), *v, 99, p, &dir);
    }
    let ev = drain(&mut n);
    assert!(!ev.contains(&Output::Event(NetworkEvent::ConfigChanged)));
    assert!(ev.iter().any(|o| matches!(o,
        Output::Send { verb: Verb::OK, payload, .. } if payload[0] == Verb::ECHO.0)));

    // Refresh: after 60 s the member asks again, with its revision and timestamp.
    n.handle_timeout(70_000);
    let again = drain(&mut n);
    assert!(again.iter().any(|o| matches!(o,
        Output::Send { verb: Verb::NETWORK_CONFIG_REQUEST, payload, .. }
            if ConfigRequest::decode(payload).unwrap().timestamp == l.cfg.timestamp as u64)));
}

#[test]
fn frames_over_the_mtu_from_the_interface_are_dropped() {
    let l = lab(0);
    let pubs = [l.ctl.to_public(), l.member.to_public()];
    let dir = |a: Address| pubs.iter().find(|i| i.address() == a).cloned();
    let mut n = Network::join(l.member.address(), l.nwid, MemberOptions::default(), 1000);
    for (v, p) in config_payloads(&l.ctl, &l.cfg, Some(42), 0xfeed).unwrap() {
        n.handle_packet(2000, l.ctl.address(), v, 1, &p, &dir);
    }
    assert_eq!(n.status(), Status::Ok);
    drain(&mut n);
    let mtu = l.cfg.mtu as usize;
    let own = flatwire_vl2::Mac::from_address(l.member.address(), l.nwid);
    let frame = |payload: usize| {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&own.0);
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(14 + payload, 0x45);
        f
    };
    n.handle_tap_frame(3000, &frame(mtu + 1));
    assert_eq!(n.drop_count(DropReason::TooBig), 1);
    n.handle_tap_frame(3000, &frame(mtu));
    assert_eq!(
        n.drop_count(DropReason::TooBig),
        1,
        "a frame of exactly the MTU passes"
    );
}

#[test]
fn controller_errors_set_the_status() {
    let cancel = AtomicBool::new(false);
    let ctl = Identity::generate(&cancel).unwrap();
    let nwid = NetworkId::new(ctl.address(), 9);
    let me = Address::new(0x0102030405).unwrap();
    let dir = |_: Address| None;
    let mut n = Network::join(me, nwid, MemberOptions::default(), 0);
    let err = |code: u8| {
        let mut p = Vec::new();
        in_re(Verb::NETWORK_CONFIG_REQUEST.0, 5, &mut p);
        p.push(code);
        p.extend_from_slice(&nwid.to_bytes());
        p
    };
    // Not from the controller: ignored.
    n.handle_packet(1, me, Verb::ERROR, 5, &err(7), &dir);
    assert_eq!(n.status(), Status::RequestingConfiguration);
    n.handle_packet(1, ctl.address(), Verb::ERROR, 5, &err(3), &dir);
    assert_eq!(n.status(), Status::NotFound);
    n.handle_packet(1, ctl.address(), Verb::ERROR, 5, &err(7), &dir);
    assert_eq!(n.status(), Status::AccessDenied);
    n.handle_packet(1, ctl.address(), Verb::ERROR, 5, &err(9), &dir);
    assert_eq!(n.status(), Status::AuthenticationRequired);
    // Frames without a config are dropped, and leaving stops everything.
    n.handle_tap_frame(2, &[0u8; 60]);
    assert_eq!(n.drop_count(DropReason::NoConfig), 1);
    drain(&mut n);
    n.leave();
    n.handle_timeout(100_000);
    assert!(n.poll_output().is_none());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// No payload, for any verb, makes a configured member panic.
    #[test]
    fn arbitrary_packets_never_panic(
        verb in 0u8..0x20,
        body in proptest::collection::vec(any::<u8>(), 0..300),
        frame in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let nwid = NetworkId::from(0x8056_c2e2_1c00_0001);
        let me = Address::new(0x0102030405).unwrap();
        let peer = Address::new(0x0a0b0c0d0e).unwrap();
        let cfg = NetworkConfig::adhoc(NetworkId::from(0xff00_00ff_ff00_0000), me, 1).unwrap();
        let dir = |_: Address| None;
        let mut n = Network::join(me, cfg.network_id, MemberOptions::default(), 0);
        let _ = nwid;
        // Prefix the network id so the payload reaches the verb handlers.
        let mut p = cfg.network_id.to_bytes().to_vec();
        p.extend_from_slice(&body);
        for payload in [&p, &body] {
            n.handle_packet(10, peer, Verb(verb), 1, payload, &dir);
        }
        n.handle_tap_frame(20, &frame);
        n.handle_timeout(100_000);
        while n.poll_output().is_some() {}
    }
}
