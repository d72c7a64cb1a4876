//! Multicast verb payloads, replication, NDP emulation and the frame filters.

mod common;

use common::{s, unhex, vl2};
use flatwire_vl1::Address;
use flatwire_vl2::ip::InetAddress;
use flatwire_vl2::multicast::{
    ExtFrameHeader, FrameHeader, Gather, GatherResult, GroupMembers, MulticastFrameHeader,
    decode_likes, encode_likes,
};
use flatwire_vl2::netconf::NetworkConfig;
use flatwire_vl2::rules::eval::{
    Env, Frame, NoCredentials, Semantics, copy_flags, filter_inbound, filter_outbound,
};
use flatwire_vl2::rules::{Rule, RuleKind};
use flatwire_vl2::{Mac, MulticastGroup, NetworkId, ndp};

fn nwid() -> NetworkId {
    "8056c2e21c123456".parse().unwrap()
}

#[test]
fn verb_payloads_match_vectors() {
    let v = vl2();
    let p = &v["verb_payloads"];
    let groups: Vec<(NetworkId, MulticastGroup)> = p["MULTICAST_LIKE"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                nwid(),
                MulticastGroup::new(
                    s(g, "mac").parse().unwrap(),
                    g["adi"].as_u64().unwrap() as u32,
                ),
            )
        })
        .collect();
    let likes = encode_likes(&groups);
    assert_eq!(likes.len(), 1);
    assert_eq!(
        hex::encode(&likes[0]),
        s(&p["MULTICAST_LIKE"], "payload_hex")
    );
    assert_eq!(decode_likes(&likes[0]).unwrap(), groups);

    let bcast_arp = MulticastGroup::new(Mac::BROADCAST, 0x0a93_1105);
    let g = Gather {
        nwid: nwid(),
        group: bcast_arp,
        limit: 33,
        com: None,
    };
    assert_eq!(
        hex::encode(g.encode()),
        s(&p["MULTICAST_GATHER"], "payload_hex")
    );
    assert_eq!(Gather::decode(&g.encode()).unwrap(), g);

    let ok = GatherResult {
        nwid: nwid(),
        group: bcast_arp,
        total_known: 3,
        members: vec!["89e92ceee5".parse().unwrap(), "1122334455".parse().unwrap()],
    };
    assert_eq!(
        hex::encode(ok.encode()),
        s(&p["OK_MULTICAST_GATHER"], "payload_after_inre_hex")
    );
    assert_eq!(GatherResult::decode(&ok.encode()).unwrap(), ok);

    let mut b = Vec::new();
    FrameHeader {
        nwid: nwid(),
        ethertype: 0x0800,
    }
    .encode(&mut b);
    assert_eq!(hex::encode(&b), s(&p["FRAME"], "header_hex"));

    let bytes = unhex(s(&p["EXT_FRAME_bridged"], "header_hex"));
    let (h, rest) = ExtFrameHeader::decode(&bytes).unwrap();
    assert!(rest.is_empty());
    assert_eq!(h.flags, 0);
    assert_eq!(h.ethertype, 0x0806);
    let mut b = Vec::new();
    h.encode(&mut b);
    assert_eq!(b, bytes);

    for k in [
        "MULTICAST_FRAME_replicator_style",
        "MULTICAST_FRAME_with_gather",
    ] {
        let bytes = unhex(s(&p[k], "header_hex"));
        let (h, rest) = MulticastFrameHeader::decode(&bytes).unwrap();
        assert!(rest.is_empty());
        let mut b = Vec::new();
        h.encode(&mut b);
        assert_eq!(b, bytes, "{k}");
    }
    let (h, _) =
        MulticastFrameHeader::decode(&unhex(s(&p["MULTICAST_FRAME_with_gather"], "header_hex")))
            .unwrap();
    assert_eq!(h.gather_limit, Some(33));
    assert_eq!(
        h.group,
        MulticastGroup::ndp("fd80:56c2:e21c:0:199:9389:e92c:eee5".parse().unwrap())
    );
}

#[test]
fn replication_respects_the_limit_bridges_and_origin() {
    let mut gm = GroupMembers::default();
    let g = MulticastGroup::BROADCAST;
    let addrs: Vec<Address> = (1..=10).map(|i| Address::new(i).unwrap()).collect();
    for a in &addrs {
        gm.add(nwid(), g, *a, 0);
    }
    let mut seed = 1u64;
    let mut rnd = move || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        seed >> 11
    };
    let me = addrs[0];
    let bridge = Address::new(99).unwrap();
    let r = gm.recipients(nwid(), g, 4, &[bridge], me, Some(addrs[1]), &mut rnd);
    assert_eq!(r.len(), 4);
    assert_eq!(r[0], bridge);
    assert!(!r.contains(&me) && !r.contains(&addrs[1]));
    let res = gm.gather(nwid(), g, addrs[2], Some(me), 5, &mut rnd);
    assert_eq!(res.total_known, 11);
    assert_eq!(res.members.len(), 5);
    assert_eq!(res.members[0], me);
    assert!(!res.members.contains(&addrs[2]));
    gm.expire(600_000);
    assert!(gm.members(nwid(), g).is_empty());
}

#[test]
fn ndp_emulation_matches_vector() {
    let v = vl2();
    let c = &v["ndp_emulation"];
    let me: Address = s(c, "local_member").parse().unwrap();
    let (ip, _) = s(c, "local_static_ip").split_once('/').unwrap();
    let cfg = NetworkConfig {
        network_id: s(c, "nwid").parse().unwrap(),
        issued_to: me,
        flags: 0x4,
        static_ips: vec![InetAddress::new(ip.parse().unwrap(), 88)],
        ..NetworkConfig::default()
    };
    let target: std::net::Ipv6Addr = s(c, "solicited_target").parse().unwrap();
    let mut ns = vec![0u8; 64];
    ns[0] = 0x60;
    ns[6] = 58;
    ns[40] = 135;
    ns[48..64].copy_from_slice(&target.octets());
    let dst = MulticastGroup::ndp(target).mac;
    let reply = ndp::emulate(&cfg, me, dst, 0x86dd, &ns).unwrap();
    assert_eq!(reply.source_mac.to_string(), s(c, "ethernet_src"));
    assert_eq!(
        hex::encode(reply.packet),
        s(c, "synthesized_ipv6_packet_hex")
    );
    assert!(
        ndp::emulate(
            &NetworkConfig {
                flags: 0,
                ..cfg.clone()
            },
            me,
            dst,
            0x86dd,
            &ns
        )
        .is_none()
    );

    let six = &c["sixplane_case"];
    let (ip, _) = s(six, "local_static_ip").split_once('/').unwrap();
    let cfg6 = NetworkConfig {
        static_ips: vec![InetAddress::new(ip.parse().unwrap(), 40)],
        ..cfg
    };
    let t: std::net::Ipv6Addr = s(six, "solicited_target").parse().unwrap();
    let (e, _) = ndp::embedded_address(&cfg6, &t.octets()).unwrap();
    assert_eq!(e.to_string(), s(six, "embedded_address"));
}

#[test]
fn filters_combine_base_rules_capabilities_and_copies() {
    let me: Address = "89e92ceee5".parse().unwrap();
    let peer: Address = "1122334455".parse().unwrap();
    let watcher: Address = "0123456789".parse().unwrap();
    let payload = [0u8; 40];
    let frame = Frame {
        source_mac: Mac::from_address(me, nwid()),
        dest_mac: Mac::from_address(peer, nwid()),
        ethertype: 0x0800,
        vlan_id: 0,
        payload: &payload,
    };
    let mut rng = || 0u32;
    let mut env = Env {
        own_address: me,
        config_flags: 0,
        credentials: &NoCredentials,
        random: &mut rng,
        semantics: Semantics::V1_14,
    };
    // Base rules: BREAK for IPv4 (no verdict), capability accepts with a WATCH copy.
    let base = vec![
        Rule::new(RuleKind::Ethertype(0x0800)),
        Rule::new(RuleKind::Break),
        Rule::new(RuleKind::Drop),
    ];
    let cap = vec![
        Rule::new(RuleKind::Watch {
            address: watcher.to_u64(),
            flags: 0,
            length: 16,
        }),
        Rule::new(RuleKind::Accept),
    ];
    let d = filter_outbound(
        &base,
        [cap.as_slice()],
        false,
        peer.to_u64(),
        &frame,
        &mut env,
    );
    assert_eq!(d.accept, 1);
    let copy = d.copy.unwrap();
    assert_eq!(
        (copy.to, copy.length, copy.flags),
        (watcher, 16, copy_flags::WATCH_OUT)
    );
    let d = filter_outbound(
        &base,
        [cap.as_slice()],
        true,
        peer.to_u64(),
        &frame,
        &mut env,
    );
    assert_eq!((d.accept, d.copy), (1, None));
    // No capability: dropped.
    assert_eq!(
        filter_outbound(&base, [], false, peer.to_u64(), &frame, &mut env).accept,
        0
    );
    // DROP in base rules cannot be overridden by a capability.
    let drop_all = vec![Rule::new(RuleKind::Drop)];
    assert_eq!(
        filter_outbound(
            &drop_all,
            [cap.as_slice()],
            false,
            peer.to_u64(),
            &frame,
            &mut env
        )
        .accept,
        0
    );
    // REDIRECT sends a copy instead of the original.
    let redirect = vec![Rule::new(RuleKind::Redirect {
        address: watcher.to_u64(),
        flags: 0,
        length: 0,
    })];
    let d = filter_outbound(&redirect, [], false, peer.to_u64(), &frame, &mut env);
    assert_eq!(d.accept, 0);
    assert_eq!(d.redirect.unwrap().flags, copy_flags::REDIRECT_OUT);
    // Inbound at the watch target: super-accept.
    let mut env2 = Env {
        own_address: watcher,
        config_flags: 0,
        credentials: &NoCredentials,
        random: &mut rng,
        semantics: Semantics::V1_14,
    };
    let d = filter_inbound(&base, [cap.as_slice()], me, &frame, &mut env2);
    assert_eq!(d.accept, 2);
}
