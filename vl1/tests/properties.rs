//! Property tests: codecs round-trip, parsers never panic, dearmor rejects any flipped bit.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use flatwire_vl1::crypto::{self, CipherSuite, SymmetricKey};
use flatwire_vl1::reassembly::{Reassembler, ReassemblyLimits};
use flatwire_vl1::wire::{self, InReplyTo, PathRecord, Reader, Rendezvous, UserMessage, Verb};
use flatwire_vl1::{Address, Identity, World};
use proptest::prelude::*;

fn sockaddr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), p)),
    ]
}

fn key() -> SymmetricKey {
    SymmetricKey::new(std::array::from_fn(|i| (i * 7) as u8))
}

fn packet(payload: &[u8], id: [u8; 8]) -> Vec<u8> {
    let mut p = Vec::new();
    wire::write_header(
        &mut p,
        id,
        Address::new(0x0102030405).unwrap(),
        Address::new(0x0a0b0c0d0e).unwrap(),
        Verb::USER_MESSAGE,
    );
    p.extend_from_slice(payload);
    p
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn inet_round_trips(a in proptest::option::of(sockaddr())) {
        let mut out = Vec::new();
        wire::write_inet(&mut out, a);
        prop_assert_eq!(Reader::new(&out).inet().unwrap(), a);
    }

    #[test]
    fn rendezvous_and_push_round_trip(peer in 1u64..0xff00000000, addr in sockaddr(), addrs in proptest::collection::vec((sockaddr(), 0u8..3), 0..10)) {
        let r = Rendezvous { flags: 0, peer: Address::new(peer).unwrap(), addr };
        let mut out = Vec::new();
        r.write(&mut out);
        prop_assert_eq!(Rendezvous::parse(&out).unwrap(), r);
        let recs: Vec<PathRecord> = addrs.into_iter().map(|(addr, flags)| PathRecord { flags, addr }).collect();
        let mut out = Vec::new();
        wire::write_push_direct_paths(&mut out, &recs);
        prop_assert_eq!(wire::parse_push_direct_paths(&out).unwrap(), recs);
    }

    #[test]
    fn in_reply_and_user_message_round_trip(verb in 0u8..32, id in any::<u64>(), t in any::<u64>(), data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut out = Vec::new();
        InReplyTo { verb: Verb(verb), packet_id: id }.write(&mut out);
        UserMessage { type_id: t, data: &data }.write(&mut out);
        let (re, rest) = InReplyTo::parse(&out).unwrap();
        prop_assert_eq!((re.verb, re.packet_id), (Verb(verb), id));
        let m = UserMessage::parse(rest).unwrap();
        prop_assert_eq!((m.type_id, m.data), (t, &data[..]));
    }

    #[test]
    fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = wire::Packet::new_checked(&b[..]).map(|p| (p.verb(), p.payload().len(), p.hops()));
        let _ = wire::Fragment::new_checked(&b[..]).map(|f| (f.total(), f.data().len()));
        let _ = wire::Hello::parse_head(&b);
        let _ = wire::Hello::parse_moons(&b);
        let _ = wire::OkHello::parse(&b);
        let _ = wire::parse_ok_whois(&b);
        let _ = wire::parse_whois(&b);
        let _ = wire::parse_push_direct_paths(&b);
        let _ = Rendezvous::parse(&b);
        let _ = World::parse(&b);
        let _ = Identity::from_bytes(&b);
        let _ = std::str::from_utf8(&b).map(|s| s.parse::<Identity>());
        let mut v = b.clone();
        let _ = wire::decompress_packet(&mut v, &mut Vec::new());
        let mut v = b.clone();
        let _ = crypto::dearmor(&mut v, &key());
        let mut r: Reassembler<()> = Reassembler::new(ReassemblyLimits::default());
        let _ = r.add_fragment(0, &b, &mut Vec::new());
        let _ = r.add_head(0, &b, (), &mut Vec::new());
    }

    #[test]
    fn dearmor_rejects_any_flipped_bit(
        payload in proptest::collection::vec(any::<u8>(), 0..200),
        id in any::<[u8; 8]>(),
        suite in prop_oneof![Just(CipherSuite::Poly1305None), Just(CipherSuite::Poly1305Salsa2012), Just(CipherSuite::AesGmacSiv)],
        bit in any::<prop::sample::Index>(),
    ) {
        let mut p = packet(&payload, id);
        crypto::armor(&mut p, &key(), suite).unwrap();
        let mut ok = p.clone();
        prop_assert_eq!(crypto::dearmor(&mut ok, &key()).unwrap(), suite);
        prop_assert_eq!(&ok[27..], &packet(&payload, id)[27..]);
        let bit = bit.index(p.len() * 8);
        // Hop bits (byte 18, bits 0..2) are deliberately unauthenticated: relays change them.
        prop_assume!(!(bit / 8 == 18 && bit % 8 < 3));
        p[bit / 8] ^= 1 << (bit % 8);
        prop_assert!(crypto::dearmor(&mut p, &key()).is_err());
    }

    #[test]
    fn fragmentation_round_trips(len in 28usize..9000, mtu in 1400usize..2000, even: bool) {
        let mut p: Vec<u8> = (0..len).map(|i| (i * 31) as u8).collect();
        p[13] = 1;
        let mut pieces = Vec::new();
        let mut s = Vec::new();
        let split = if even { wire::Split::Even } else { wire::Split::Full };
        if wire::fragment(&p, mtu, split, &mut s, |d| pieces.push(d.to_vec())).is_ok() {
            let mut r: Reassembler<()> = Reassembler::new(ReassemblyLimits::default());
            let mut out = Vec::new();
            if pieces.len() == 1 {
                prop_assert_eq!(&pieces[0], &p);
            } else {
                let mut done = false;
                for f in pieces[1..].iter().rev() {
                    done |= r.add_fragment(0, f, &mut out).unwrap().is_some();
                }
                done |= r.add_head(0, &pieces[0], (), &mut out).unwrap().is_some();
                prop_assert!(done);
                prop_assert_eq!(out, p);
            }
        }
    }

    #[test]
    fn compression_round_trips(data in proptest::collection::vec(0u8..4, 0..3000)) {
        let mut p = packet(&data, [1; 8]);
        let orig = p.clone();
        let mut s = Vec::new();
        wire::compress_packet(&mut p, &mut s);
        wire::decompress_packet(&mut p, &mut s).unwrap();
        prop_assert_eq!(p, orig);
    }
}

#[test]
fn identity_codecs_round_trip() {
    let id = Identity::generate(&std::sync::atomic::AtomicBool::new(false)).unwrap();
    for secret in [false, true] {
        let b = id.to_bytes(secret);
        let (back, used) = Identity::from_bytes(&b).unwrap();
        assert_eq!((back.has_secret(), used), (secret, b.len()));
        assert_eq!(back, id);
    }
    let text = id.to_string();
    assert_eq!(text.parse::<Identity>().unwrap().to_string(), text);
}
