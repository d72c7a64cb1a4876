//! Known-answer tests for packets, InetAddress, payload codecs and worlds
//! (`vectors/vl1.json` and `vectors/zt-one/planet`).

mod common;

use std::net::SocketAddr;

use common::{hx, json, keys, read_vector, read_vector_text};
use flatwire_vl1::crypto::{self, CipherSuite};
use flatwire_vl1::identity::Identity;
use flatwire_vl1::reassembly::{Reassembler, ReassemblyLimits};
use flatwire_vl1::wire::{
    self, Hello, InReplyTo, OkHello, Packet, Reader, Rendezvous, UserMessage, Verb,
};
use flatwire_vl1::world::{World, WorldType};

#[test]
fn hello_with_crypt_field() {
    let v = json("vl1.json");
    let (a, _b, key) = keys(&v);
    let t = &v["packets"]["hello_poly1305_none"];
    let start = t["crypt_field_start"].as_u64().unwrap() as usize;
    let mut p = hx(&t["plaintext_before_cryptfield"]);
    // Our HELLO codec produces exactly this payload.
    let planet = &v["planet"];
    let hello = Hello {
        protocol_version: 12,
        version_major: 1,
        version_minor: 14,
        version_revision: 1,
        timestamp: 1_700_000_000_000,
        identity: a.to_public(),
        physical_destination: Some("198.51.100.20:9993".parse().unwrap()),
        planet: Some((
            planet["id"].as_u64().unwrap(),
            planet["timestamp"].as_u64().unwrap(),
        )),
        moons: vec![(127, 0x0000abcdef012345, 0)],
    };
    let mut built = p[..28].to_vec();
    let off = hello.write(&mut built);
    assert_eq!(built, p);
    assert_eq!(28 + off, start);
    crypto::crypt_field(&key, &mut p, start);
    assert_eq!(p, hx(&t["after_cryptfield"]));
    crypto::armor(&mut p, &key, CipherSuite::Poly1305None).unwrap();
    assert_eq!(p, hx(&t["armored"]));
    // Receive side.
    assert_eq!(
        crypto::dearmor(&mut p, &key).unwrap(),
        CipherSuite::Poly1305None
    );
    let (head, crypt) = Hello::parse_head(&p[28..]).unwrap();
    assert_eq!(28 + crypt.unwrap(), start);
    crypto::crypt_field(&key, &mut p, start);
    let moons = Hello::parse_moons(&p[start..]).unwrap();
    assert_eq!(Hello { moons, ..head }, hello);
    // A flipped bit anywhere fails the MAC.
    let mut bad = hx(&t["armored"]);
    bad[40] ^= 1;
    assert!(crypto::dearmor(&mut bad, &key).is_err());
}

#[test]
fn ok_hello_salsa_and_aes() {
    let v = json("vl1.json");
    let (_a, _b, key) = keys(&v);
    for (name, suite) in [
        ("ok_hello_salsa2012", CipherSuite::Poly1305Salsa2012),
        ("ok_hello_aes_gmac_siv", CipherSuite::AesGmacSiv),
    ] {
        let t = &v["packets"][name];
        let plain = hx(&t["plaintext"]);
        let mut p = plain.clone();
        crypto::armor(&mut p, &key, suite).unwrap();
        assert_eq!(p, hx(&t["armored"]), "{name}");
        assert_eq!(crypto::dearmor(&mut p, &key).unwrap(), suite);
        assert_eq!(p[27..], plain[27..]);
        let pk = Packet::new_checked(&p[..]).unwrap();
        assert_eq!(pk.verb(), Verb::OK);
        let (re, body) = InReplyTo::parse(pk.payload()).unwrap();
        assert_eq!(re.verb, Verb::HELLO);
        let ok = OkHello::parse(body).unwrap();
        let mut again = Vec::new();
        re.write(&mut again);
        ok.write(&mut again);
        assert_eq!(again, pk.payload());
    }
}

#[test]
fn compressed_user_message() {
    let v = json("vl1.json");
    let (_a, _b, key) = keys(&v);
    let t = &v["packets"]["user_message_compressed_salsa2012"];
    let mut p = hx(&t["compressed_plaintext"]);
    crypto::armor(&mut p, &key, CipherSuite::Poly1305Salsa2012).unwrap();
    assert_eq!(p, hx(&t["armored"]));
    crypto::dearmor(&mut p, &key).unwrap();
    assert!(Packet::new_checked(&p[..]).unwrap().is_compressed());
    let mut scratch = Vec::new();
    wire::decompress_packet(&mut p, &mut scratch).unwrap();
    assert_eq!(p[27..], hx(&t["uncompressed_plaintext"])[27..]);
    let pk = Packet::new_checked(&p[..]).unwrap();
    assert_eq!(pk.verb(), Verb::USER_MESSAGE);
    UserMessage::parse(pk.payload()).unwrap();
    // Our own compressor output decompresses to the same packet.
    let mut q = hx(&t["uncompressed_plaintext"]);
    if wire::compress_packet(&mut q, &mut scratch) {
        wire::decompress_packet(&mut q, &mut scratch).unwrap();
    }
    assert_eq!(q, hx(&t["uncompressed_plaintext"]));
}

#[test]
fn fragmented_user_message() {
    let v = json("vl1.json");
    let (_a, _b, key) = keys(&v);
    let t = &v["packets"]["fragmented_user_message_salsa2012"];
    let mtu: usize = t["mtu"].to_string().trim_matches('"').parse().unwrap();
    let mut p = hx(&t["plaintext"]);
    crypto::armor(&mut p, &key, CipherSuite::Poly1305Salsa2012).unwrap();
    assert_eq!(p, hx(&t["armored_whole"]));
    let mut pieces = Vec::new();
    let mut s = Vec::new();
    wire::fragment(&p, mtu, wire::Split::Full, &mut s, |d| {
        pieces.push(d.to_vec())
    })
    .unwrap();
    let want: Vec<Vec<u8>> = std::iter::once(hx(&t["head"]))
        .chain(t["fragments"].as_array().unwrap().iter().map(hx))
        .collect();
    assert_eq!(pieces, want);
    let mut r = Reassembler::new(ReassemblyLimits::default());
    let mut out = Vec::new();
    assert!(r.add_fragment(0, &want[2], &mut out).unwrap().is_none());
    assert!(r.add_fragment(0, &want[1], &mut out).unwrap().is_none());
    assert!(r.add_head(0, &want[0], (), &mut out).unwrap().is_some());
    assert_eq!(out, p);
    crypto::dearmor(&mut out, &key).unwrap();
    assert_eq!(out[27..], hx(&t["plaintext"])[27..]);
}

#[test]
fn inet_addresses_and_payload_examples() {
    let v = json("vl1.json");
    let ex = v["inetaddress"]["examples"].as_array().unwrap();
    assert_eq!(ex.len(), 4);
    for e in ex {
        let text = e["text"].as_str().unwrap();
        let addr: Option<SocketAddr> = if text == "(nil)" {
            None
        } else {
            let (ip, port) = text.rsplit_once('/').unwrap();
            Some(SocketAddr::new(ip.parse().unwrap(), port.parse().unwrap()))
        };
        let mut out = Vec::new();
        wire::write_inet(&mut out, addr);
        assert_eq!(out, hx(&e["serialized"]), "{text}");
        assert_eq!(Reader::new(&out).inet().unwrap(), addr);
    }
    let p = &v["packets"];
    let rz =
        Rendezvous::parse(&hx(&p["rendezvous_payload_example"]["payload_after_verb"])).unwrap();
    assert_eq!(rz.peer.to_string(), "f8240304a0");
    assert_eq!(rz.addr, "198.51.100.20:9993".parse().unwrap());
    let mut out = Vec::new();
    rz.write(&mut out);
    assert_eq!(
        out,
        hx(&p["rendezvous_payload_example"]["payload_after_verb"])
    );
    let push = hx(&p["push_direct_paths_payload_example"]["payload_after_verb"]);
    let recs = wire::parse_push_direct_paths(&push).unwrap();
    assert_eq!(recs.len(), 2);
    assert_eq!(recs[0].addr, "198.51.100.20:9993".parse().unwrap());
    assert_eq!(recs[1].addr, "[2001:db8::5]:9993".parse().unwrap());
    let mut out = Vec::new();
    wire::write_push_direct_paths(&mut out, &recs);
    assert_eq!(out, push);
    let who = wire::parse_whois(&hx(&p["whois_payload_example"]["payload_after_verb"])).unwrap();
    assert_eq!(who[0].to_string(), "f8240304a0");
}

#[test]
fn default_planet() {
    let v = json("vl1.json");
    let pl = &v["planet"];
    let bytes = hx(&pl["serialized"]);
    let (w, used) = World::parse(&bytes).unwrap();
    assert_eq!(used, bytes.len());
    assert_eq!(w.world_type, WorldType::Planet);
    assert_eq!(w.id, pl["id"].as_u64().unwrap());
    assert_eq!(w.timestamp, pl["timestamp"].as_u64().unwrap());
    assert_eq!(
        w.updates_must_be_signed_by.to_vec(),
        hx(&pl["updates_must_be_signed_by"])
    );
    assert_eq!(w.signature.to_vec(), hx(&pl["signature"]));
    assert_eq!(w.serialize(true), hx(&pl["signed_message"]));
    assert_eq!(w.serialize(false), bytes);
    assert!(w.verify_signature(&w.updates_must_be_signed_by));
    let roots = pl["roots"].as_array().unwrap();
    assert_eq!(w.roots.len(), roots.len());
    for (r, e) in w.roots.iter().zip(roots) {
        assert_eq!(
            r.identity.address().to_string(),
            e["address"].as_str().unwrap()
        );
        assert_eq!(r.identity.public_key().to_vec(), hx(&e["public_key"]));
        assert_eq!(r.identity.to_bytes(false), hx(&e["identity_binary"]));
        assert_eq!(
            r.identity.locally_validate(),
            e["locally_valid"].as_bool().unwrap()
        );
        let eps: Vec<String> = r
            .stable_endpoints
            .iter()
            .map(|a| format!("{}/{}", a.ip(), a.port()))
            .collect();
        let want: Vec<String> = e["stable_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(eps, want);
    }
    // A single flipped bit in the signed part breaks the signature.
    let mut bad = bytes.clone();
    bad[20] ^= 1;
    let (wb, _) = World::parse(&bad).unwrap();
    assert!(!wb.verify_signature(&w.updates_must_be_signed_by));
}

#[test]
fn lab_planet_and_update() {
    let bytes = read_vector("zt-one/planet/planet");
    assert_eq!(bytes.len(), 257);
    let (w, used) = World::parse(&bytes).unwrap();
    assert_eq!(used, 257);
    assert_eq!(
        (w.world_type, w.id, w.timestamp),
        (WorldType::Planet, 0x8cc5f30f43, 1795356608284)
    );
    assert!(w.verify_signature(&w.updates_must_be_signed_by));
    assert_eq!(w.serialize(false), bytes);
    let root_pub: Identity =
        read_vector_text("zt-one/capture/node-identities/ztroot-8cc5f30f43.public")
            .parse()
            .unwrap();
    assert_eq!(w.roots.len(), 1);
    assert_eq!(w.roots[0].identity, root_pub);
    assert_eq!(
        w.roots[0].stable_endpoints,
        vec!["172.31.254.1:9993".parse::<SocketAddr>().unwrap()]
    );
    // The recorded signing key lets us make an update nodes would accept.
    let input = json("zt-one/planet/planet-genmoon-input.json");
    let sk: [u8; 64] = hx(&input["signingKey_SECRET"]).try_into().unwrap();
    let pk: [u8; 64] = hx(&input["signingKey"]).try_into().unwrap();
    assert_eq!(flatwire_vl1::identity::public_key_of(&sk), pk);
    let newer = World::create(
        WorldType::Planet,
        w.id,
        w.timestamp + 1,
        pk,
        w.roots.clone(),
        &sk,
    )
    .unwrap();
    assert!(w.should_replace_with(&newer));
    assert!(!newer.should_replace_with(&w));
    // Signing the original contents again reproduces the recorded signature (deterministic).
    let same = World::create(
        WorldType::Planet,
        w.id,
        w.timestamp,
        pk,
        w.roots.clone(),
        &sk,
    )
    .unwrap();
    assert_eq!(same.serialize(false), bytes);
}
