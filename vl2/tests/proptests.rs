//! Property tests: every codec round-trips and no parser panics on arbitrary input.

use flatwire_vl1::Address;
use flatwire_vl2::codec::Reader;
use flatwire_vl2::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, Revocation, Tag,
};
use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::netconf::{ConfigChunk, NetworkConfig};
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::rules::{MAX_RULES, Rule, RuleKind, TagOp, decode_rules, encode_rules};
use flatwire_vl2::{Mac, NetworkId};
use proptest::prelude::*;

fn rule_kind() -> impl Strategy<Value = RuleKind> {
    let addr = (0u64..(1 << 40)).prop_map(|a| Address::new(a).unwrap());
    prop_oneof![
        Just(RuleKind::Drop),
        Just(RuleKind::Accept),
        Just(RuleKind::Break),
        Just(RuleKind::Priority),
        (0u64..(1 << 40), any::<u32>(), any::<u16>()).prop_map(|(address, flags, length)| {
            RuleKind::Tee {
                address,
                flags,
                length,
            }
        }),
        (0u64..(1 << 40), any::<u32>(), any::<u16>()).prop_map(|(address, flags, length)| {
            RuleKind::Watch {
                address,
                flags,
                length,
            }
        }),
        (0u64..(1 << 40), any::<u32>(), any::<u16>()).prop_map(|(address, flags, length)| {
            RuleKind::Redirect {
                address,
                flags,
                length,
            }
        }),
        addr.clone().prop_map(RuleKind::SourceZt),
        addr.prop_map(RuleKind::DestZt),
        any::<u16>().prop_map(RuleKind::VlanId),
        any::<[u8; 6]>().prop_map(|m| RuleKind::MacSource(Mac(m))),
        (any::<[u8; 4]>(), any::<u8>()).prop_map(|(a, b)| RuleKind::Ipv4Dest(a.into(), b)),
        (any::<[u8; 16]>(), any::<u8>()).prop_map(|(a, b)| RuleKind::Ipv6Source(a.into(), b)),
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(mask, start, end)| RuleKind::IpTos {
            mask,
            start,
            end
        }),
        any::<u16>().prop_map(RuleKind::Ethertype),
        (any::<u8>(), any::<u8>(), any::<u8>()).prop_map(|(icmp_type, code, flags)| {
            RuleKind::Icmp {
                icmp_type,
                code,
                flags,
            }
        }),
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| RuleKind::DestPortRange(a, b)),
        any::<u64>().prop_map(RuleKind::Characteristics),
        any::<u32>().prop_map(RuleKind::Random),
        (any::<u32>(), any::<u32>()).prop_map(|(id, value)| RuleKind::Tags {
            op: TagOp::Receiver,
            id,
            value
        }),
        (any::<u64>(), any::<u32>(), any::<u16>(), any::<u8>()).prop_map(
            |(start, span, index, format)| RuleKind::IntegerRange {
                start,
                span,
                index,
                format
            }
        ),
        (52u8..64).prop_map(RuleKind::UnknownMatch),
    ]
}

fn rule() -> impl Strategy<Value = Rule> {
    (rule_kind(), any::<bool>(), any::<bool>()).prop_map(|(kind, not, or)| Rule { not, or, kind })
}

proptest! {
    #[test]
    fn rules_round_trip(rules in proptest::collection::vec(rule(), 0..40)) {
        let mut b = Vec::new();
        encode_rules(&rules, &mut b);
        prop_assert_eq!(decode_rules(&b, MAX_RULES).unwrap(), rules);
    }

    #[test]
    fn dictionary_round_trips(entries in proptest::collection::vec(("[a-zA-Z]{1,8}", proptest::collection::vec(any::<u8>(), 0..64)), 0..10)) {
        let mut d = Dictionary::new();
        let mut seen = std::collections::HashSet::new();
        for (k, v) in &entries {
            if seen.insert(k.clone()) {
                d.add(k, v);
            }
        }
        prop_assert_eq!(Dictionary::parse(&d.encode()), d);
    }

    #[test]
    fn credentials_round_trip(nwid in any::<u64>(), ts in any::<i64>(), id in any::<u32>(), val in any::<u32>(), a in 1u64..(1 << 40), sig in any::<[u8; 32]>(), rules in proptest::collection::vec(rule(), 0..10)) {
        let to = Address::new(a).unwrap();
        let n = NetworkId::from(nwid);
        let mut t = Tag::new(n, ts, to, id, val);
        t.signature[..32].copy_from_slice(&sig);
        let mut b = Vec::new(); t.encode(&mut b);
        prop_assert_eq!(Tag::decode(&mut Reader::new(&b)).unwrap(), t);
        let mut c = Capability::new(n, ts, id, rules, 3);
        c.custody.push(flatwire_vl2::credentials::Custody { to, from: n.controller(), signature: [7; 96] });
        let mut b = Vec::new(); c.encode(&mut b);
        prop_assert_eq!(Capability::decode(&mut Reader::new(&b)).unwrap(), c);
        let mut o = CertificateOfOwnership::new(n, ts, to, id);
        o.add_ip(std::net::IpAddr::V4(val.into()));
        let mut b = Vec::new(); o.encode(&mut b);
        prop_assert_eq!(CertificateOfOwnership::decode(&mut Reader::new(&b)).unwrap(), o);
        let r = Revocation::new(id, n, val, ts, 1, to, flatwire_vl2::credentials::CredentialType::Tag);
        let mut b = Vec::new(); r.encode(&mut b);
        prop_assert_eq!(Revocation::decode(&mut Reader::new(&b)).unwrap(), r);
        let mut com = CertificateOfMembership::new(ts as u64, 100, n, to, &[3; 64]);
        com.signed_by = n.controller();
        let mut b = Vec::new(); com.encode(&mut b);
        prop_assert_eq!(CertificateOfMembership::decode(&mut Reader::new(&b)).unwrap(), com);
    }

    #[test]
    fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = decode_rules(&data, MAX_RULES);
        let _ = NetworkConfig::decode(&data);
        let _ = ConfigChunk::decode(&data, 1);
        let _ = CertificateOfMembership::decode(&mut Reader::new(&data));
        let _ = Capability::decode(&mut Reader::new(&data));
        let _ = Tag::decode(&mut Reader::new(&data));
        let _ = CertificateOfOwnership::decode(&mut Reader::new(&data));
        let _ = Revocation::decode(&mut Reader::new(&data));
        let _ = compile(&String::from_utf8_lossy(&data));
    }

    #[test]
    fn compiler_never_panics_on_token_soup(words in proptest::collection::vec(prop_oneof![
        Just("drop"), Just("accept"), Just("tee"), Just("cap"), Just("tag"), Just("macro"), Just("id"),
        Just("1"), Just(";"), Just("not"), Just("or"), Just("ethertype"), Just("include"), Just("x($a)"),
        Just("$a"), Just("enum"), Just("flag"), Just("default"), Just("chr"), Just("63,1"), Just("#c\n"),
        Just("dport"), Just("1-2"), Just("redirect"), Just("0123456789"), Just("\n"), Just("x(1)")
    ], 0..40)) {
        let _ = compile(&words.join(" "));
    }

    #[test]
    fn multicast_headers_round_trip(nwid in any::<u64>(), flags in any::<u8>(), gl in proptest::option::of(any::<u32>()), src in proptest::option::of(any::<[u8; 6]>()), mac in any::<[u8; 6]>(), adi in any::<u32>(), et in any::<u16>(), body in proptest::collection::vec(any::<u8>(), 0..32)) {
        use flatwire_vl2::multicast::MulticastFrameHeader;
        let h = MulticastFrameHeader {
            nwid: NetworkId::from(nwid),
            flags: (flags & 0x08) | if gl.is_some() { 2 } else { 0 } | if src.is_some() { 4 } else { 0 },
            com: None,
            gather_limit: gl,
            source: src.map(Mac),
            group: flatwire_vl2::MulticastGroup::new(Mac(mac), adi),
            ethertype: et,
        };
        let mut b = Vec::new();
        h.encode(&mut b);
        b.extend_from_slice(&body);
        let (back, rest) = MulticastFrameHeader::decode(&b).unwrap();
        prop_assert_eq!(back, h);
        prop_assert_eq!(rest, body.as_slice());
    }

    #[test]
    fn multicast_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        use flatwire_vl2::multicast::*;
        let _ = decode_likes(&data);
        let _ = Gather::decode(&data);
        let _ = GatherResult::decode(&data);
        let _ = ExtFrameHeader::decode(&data);
        let _ = MulticastFrameHeader::decode(&data);
    }

    #[test]
    fn config_round_trips(rev in any::<u64>(), flags in 0u64..32, ml in any::<u32>(), name in "[a-z ]{0,20}", mtu in 1280u32..10000) {
        let cfg = NetworkConfig {
            network_id: NetworkId::from(0x8056c2e21c000001),
            issued_to: Address::new(0x1122334455).unwrap(),
            revision: rev, flags, multicast_limit: u64::from(ml), name, mtu, private: true,
            ..NetworkConfig::default()
        };
        prop_assert_eq!(NetworkConfig::decode(&cfg.encode()).unwrap(), cfg);
    }
}
