//! Known-answer tests for network IDs, MACs, multicast groups and managed IPv6 addresses.

mod common;

use std::net::IpAddr;

use common::{s, unhex, vl2};
use flatwire_vl1::Address;
use flatwire_vl2::{Mac, MulticastGroup, NetworkId, ip};

#[test]
fn mac_derivation_matches_vectors_both_ways() {
    let v = vl2();
    let cases = v["mac_derivation"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for c in cases {
        let n: NetworkId = s(c, "nwid").parse().unwrap();
        let a: Address = s(c, "address").parse().unwrap();
        let mac = Mac::from_address(a, n);
        assert_eq!(mac.to_string(), s(c, "mac"), "{c}");
        assert_eq!(format!("{:02x}", Mac::first_octet(n)), s(c, "first_octet"));
        assert_eq!(mac.to_address(n), Some(a));
        assert_eq!(s(c, "mac").parse::<Mac>().unwrap(), mac);
    }
}

#[test]
fn foreign_macs_are_behind_a_bridge() {
    let n: NetworkId = "8056c2e21c000001".parse().unwrap();
    let m: Mac = "04:11:22:33:44:55".parse().unwrap();
    assert_eq!(m.to_address(n), None);
    assert!(Mac::BROADCAST.is_broadcast() && Mac::BROADCAST.is_multicast());
}

#[test]
fn ipv6_derivation_matches_vectors() {
    let v = vl2();
    for c in v["ipv6_derivation"].as_array().unwrap() {
        let n: NetworkId = s(c, "nwid").parse().unwrap();
        let a: Address = s(c, "address").parse().unwrap();
        let r = ip::rfc4193(n, a);
        assert_eq!(format!("{r}/88"), s(c, "rfc4193"));
        assert_eq!(r.octets().to_vec(), unhex(s(c, "rfc4193_bytes")));
        let p = ip::sixplane(n, a);
        assert_eq!(format!("{p}/40"), s(c, "sixplane"));
        assert_eq!(p.octets().to_vec(), unhex(s(c, "sixplane_bytes")));
        let mut per_member = p.octets();
        per_member[15] = 0;
        assert_eq!(
            format!("{}/80", std::net::Ipv6Addr::from(per_member)),
            s(c, "sixplane_prefix_per_member")
        );
    }
}

#[test]
fn multicast_groups_match_vectors() {
    let v = vl2();
    for c in v["multicast_groups"].as_array().unwrap() {
        let g = match s(c, "ip").parse::<IpAddr>().unwrap() {
            IpAddr::V4(a) => MulticastGroup::arp(a),
            IpAddr::V6(a) => MulticastGroup::ndp(a),
        };
        assert_eq!(g.mac.to_string(), s(c, "group_mac"));
        assert_eq!(format!("{:08x}", g.adi), s(c, "adi_hex"));
        assert_eq!(u64::from(g.adi), c["adi_decimal"].as_u64().unwrap());
        if let Some(t) = c["like_tuple_tail_hex"].as_str() {
            assert_eq!(g.to_bytes().to_vec(), unhex(t));
            assert_eq!(MulticastGroup::from_bytes(g.to_bytes()), g);
        }
    }
    let b = &v["broadcast_group"];
    assert_eq!(MulticastGroup::BROADCAST.mac.to_string(), s(b, "mac"));
    assert_eq!(
        u64::from(MulticastGroup::BROADCAST.adi),
        b["adi"].as_u64().unwrap()
    );
}

#[test]
fn arp_requests_go_to_the_target_group() {
    let mut arp = [0u8; 28];
    arp[2] = 0x08;
    arp[4] = 6;
    arp[5] = 4;
    arp[7] = 1;
    arp[24..28].copy_from_slice(&[10, 147, 17, 5]);
    let g = MulticastGroup::for_outbound(Mac::BROADCAST, 0x0806, &arp);
    assert_eq!(g.adi, 0x0a93_1105);
    arp[7] = 2; // a reply is plain broadcast
    assert_eq!(
        MulticastGroup::for_outbound(Mac::BROADCAST, 0x0806, &arp),
        MulticastGroup::BROADCAST
    );
}
