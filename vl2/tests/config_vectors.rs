//! Known-answer tests for the dictionary, network config, credentials and chunks.

mod common;

use common::{s, unhex, vl2, zt_one};
use flatwire_vl1::{Address, Identity};
use flatwire_vl2::NetworkId;
use flatwire_vl2::codec::Reader;
use flatwire_vl2::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, CredentialType, Revocation, Tag,
    identity_hash,
};
use flatwire_vl2::dictionary::{Dictionary, METADATA_CAPACITY};
use flatwire_vl2::netconf::{ConfigChunk, NetworkConfig};
use flatwire_vl2::rules::{MAX_RULES, decode_rules};

fn identity(n: u32) -> Identity {
    let text = String::from_utf8(zt_one(&format!("identities/identity-{n}.secret"))).unwrap();
    text.trim().parse().expect("identity parses")
}

#[test]
fn dictionary_escaping_matches_vectors() {
    let v = vl2();
    for c in v["dictionary_escaping"].as_array().unwrap() {
        let mut d = Dictionary::new();
        assert!(d.add(s(c, "key"), &unhex(s(c, "value_hex"))));
        assert_eq!(hex::encode(d.encode()), s(c, "encoded_hex"));
        let back = Dictionary::parse(&d.encode());
        assert_eq!(
            back.get(s(c, "key")).unwrap(),
            unhex(s(c, "value_hex")).as_slice()
        );
    }
}

#[test]
fn dictionary_first_key_wins_and_capacity_cuts() {
    let d = Dictionary::parse(b"a=1\r\na=2\nb=\\q\0c=3");
    assert_eq!(d.get("a"), Some(&b"1"[..]));
    assert_eq!(d.get("b"), Some(&b"q"[..]));
    assert_eq!(d.get("c"), None);
    let long = vec![b'x'; 2000];
    let mut src = b"k=".to_vec();
    src.extend_from_slice(&long);
    let d = Dictionary::parse_with_capacity(&src, METADATA_CAPACITY);
    assert_eq!(d.get("k").unwrap().len(), METADATA_CAPACITY - 3);
    assert!(!Dictionary::new().add("a=b", b"x"));
}

#[test]
fn request_metadata_is_byte_exact() {
    let v = vl2();
    let c = &v["config_request_metadata_1_14_1"];
    let mut d = Dictionary::new();
    for (k, val) in [
        ("v", 7u64),
        ("vend", 1),
        ("pv", 12),
        ("majv", 1),
        ("minv", 14),
        ("revv", 1),
        ("mr", 1024),
        ("mc", 128),
        ("mcr", 64),
        ("mt", 128),
        ("f", 0),
        ("revr", 1),
    ] {
        d.add_u64(k, val);
    }
    d.add_str("o", "linux/x86_64");
    assert_eq!(hex::encode(d.encode()), s(c, "hex"));
    assert_eq!(d.encode().len() as u64, c["length"].as_u64().unwrap());
}

#[test]
fn synthetic_config_encodes_byte_for_byte() {
    let v = vl2();
    let c = &v["network_config_dictionary_synthetic"];
    let bytes = unhex(s(c, "dictionary_hex"));
    let cfg = NetworkConfig::decode(&bytes).unwrap();
    assert_eq!(cfg.network_id.to_string(), "8056c2e21c123456");
    assert_eq!(cfg.issued_to.to_string(), "89e92ceee5");
    assert_eq!(cfg.name, "testnet");
    assert_eq!(cfg.flags, 6);
    assert_eq!(cfg.multicast_limit, 32);
    assert!(cfg.private);
    assert_eq!(cfg.routes.len(), 2);
    assert_eq!(cfg.static_ips.len(), 2);
    assert_eq!(cfg.dns.domain, "zt.example");
    assert_eq!(
        cfg.dns.servers,
        vec!["10.147.20.1".parse::<std::net::IpAddr>().unwrap()]
    );
    assert!(cfg.is_active_bridge("deadbeef01".parse().unwrap()));
    assert_eq!(
        cfg.rules,
        decode_rules(&unhex("a5020800a5020806a50286dd00000100"), MAX_RULES).unwrap()
    );
    let d = Dictionary::parse(&bytes);
    for (k, val) in c["fields"].as_object().unwrap() {
        assert_eq!(
            hex::encode(d.get(k).unwrap()),
            val.as_str().unwrap(),
            "field {k}"
        );
    }
    assert_eq!(cfg.encode(), bytes);
}

#[test]
fn recorded_netconf_from_zerotier_decodes_and_reencodes() {
    for (file, me, ip) in [
        (
            "api-json/netconf/ztb-e6acfe87fc3adaf6.conf",
            "e28e6b73a1",
            "10.147.17.244",
        ),
        (
            "api-json/netconf/zta-e6acfe87fc3adaf6.conf",
            "e6acfe87fc",
            "10.147.17.251",
        ),
    ] {
        let bytes = zt_one(file);
        let cfg = NetworkConfig::decode(&bytes).unwrap();
        assert_eq!(cfg.network_id.to_string(), "e6acfe87fc3adaf6");
        assert_eq!(cfg.issued_to.to_string(), me);
        assert_eq!(cfg.name, "zt-anchor-lab");
        assert_eq!(cfg.mtu, 2800);
        assert_eq!(cfg.multicast_limit, 32);
        assert_eq!(cfg.flags, 2);
        assert_eq!(cfg.revision, 1);
        assert_eq!(cfg.credential_time_max_delta, 1_800_000);
        assert!(cfg.private);
        assert_eq!(cfg.static_ips.len(), 1);
        assert_eq!(cfg.static_ips[0].to_string(), format!("{ip}/24"));
        assert_eq!(cfg.routes[0].target.to_string(), "10.147.17.0/24");
        let com = cfg.com.as_ref().unwrap();
        assert_eq!(com.qualifiers.len(), 7);
        assert_eq!(com.issued_to().unwrap().to_string(), me);
        assert_eq!(com.timestamp().unwrap() as i64, cfg.timestamp);
        assert_eq!(com.signed_by.to_string(), "e6acfe87fc");
        let coo = &cfg.certificates_of_ownership[0];
        assert!(coo.owns_ip(&ip.parse::<std::net::Ipv4Addr>().unwrap().octets()));
        assert_eq!(cfg.encode(), bytes, "{file} re-encodes byte for byte");
    }
}

#[test]
fn recorded_credentials_verify_with_the_controller_identity() {
    let ctl: Identity = String::from_utf8(zt_one("capture/node-identities/zta-e6acfe87fc.public"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ztb: Identity = String::from_utf8(zt_one("capture/node-identities/ztb-e28e6b73a1.public"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let zta_cfg =
        NetworkConfig::decode(&zt_one("api-json/netconf/zta-e6acfe87fc3adaf6.conf")).unwrap();
    let ztb_cfg =
        NetworkConfig::decode(&zt_one("api-json/netconf/ztb-e6acfe87fc3adaf6.conf")).unwrap();
    let com = ztb_cfg.com.as_ref().unwrap();
    assert!(com.verify(&ctl));
    assert!(!com.verify(&ztb));
    assert!(ztb_cfg.certificates_of_ownership[0].verify(&ctl));
    // zta's COM agrees with ztb's when ztb proves ztb's identity, not anyone else's.
    let mine = zta_cfg.com.as_ref().unwrap();
    assert!(mine.agrees_with(com, ztb.address(), ztb.public_key()));
    assert!(!mine.agrees_with(com, ctl.address(), ctl.public_key()));
}

#[test]
fn com_vector_fields_and_agreement() {
    let v = vl2();
    let c = &v["certificate_of_membership"];
    let key: [u8; 64] = unhex(s(c, "issued_to_public_key_hex")).try_into().unwrap();
    let to: Address = s(c, "issued_to").parse().unwrap();
    let h = identity_hash(to, &key);
    let hh: String = h.iter().map(|w| format!("{w:016x}")).collect();
    assert_eq!(hh, &s(c, "identity_hash_sha384_hex")[..64]);
    let nwid: NetworkId = s(c, "nwid").parse().unwrap();
    let mut com = CertificateOfMembership::new(
        c["timestamp"].as_u64().unwrap(),
        c["max_delta"].as_u64().unwrap(),
        nwid,
        to,
        &key,
    );
    assert_eq!(
        hex::encode(com.signed_message()),
        s(c, "signed_message_hex")
    );
    // The vector names the controller as signer, with 96 zero bytes as the signature.
    com.signed_by = nwid.controller();
    let mut ser = Vec::new();
    com.encode(&mut ser);
    assert_eq!(
        hex::encode(&ser),
        s(c, "serialized_with_zero_signature_hex")
    );
    let back = CertificateOfMembership::decode(&mut Reader::new(&ser)).unwrap();
    assert_eq!(back, com);

    for case in v["com_agreement"].as_array().unwrap() {
        let Some(agree) = case["agree"].as_bool() else {
            continue;
        };
        let mine = CertificateOfMembership::new(
            case["mine"]["ts"].as_u64().unwrap(),
            case["mine"]["maxDelta"].as_u64().unwrap(),
            nwid,
            to,
            &key,
        );
        let theirs =
            CertificateOfMembership::new(case["theirs"]["ts"].as_u64().unwrap(), 0, nwid, to, &key);
        assert_eq!(mine.agrees_with(&theirs, to, &key), agree, "{case}");
    }
}

#[test]
fn tag_capability_coo_revocation_vectors() {
    let v = vl2();
    let c = &v["tag"];
    let mut tag = Tag::new(
        s(c, "nwid").parse().unwrap(),
        c["ts"].as_i64().unwrap(),
        s(c, "issuedTo").parse().unwrap(),
        c["id"].as_u64().unwrap() as u32,
        c["value"].as_u64().unwrap() as u32,
    );
    tag.signed_by = s(c, "signedBy").parse().unwrap();
    assert_eq!(
        hex::encode(tag.signed_message()),
        s(c, "signed_message_hex")
    );
    let mut b = Vec::new();
    tag.encode(&mut b);
    assert_eq!(hex::encode(&b), s(c, "serialized_with_zero_signature_hex"));
    assert_eq!(b.len() as u64, c["serialized_length"].as_u64().unwrap());
    assert_eq!(Tag::decode(&mut Reader::new(&b)).unwrap(), tag);

    let c = &v["capability"];
    let rules = decode_rules(&unhex(s(c, "rules_binary_hex")), MAX_RULES).unwrap();
    let mut cap = Capability::new(
        s(c, "nwid").parse().unwrap(),
        c["ts"].as_i64().unwrap(),
        c["id"].as_u64().unwrap() as u32,
        rules,
        c["maxCustodyChainLength"].as_u64().unwrap() as u8,
    );
    assert_eq!(
        hex::encode(cap.signed_message()),
        s(c, "signed_message_hex")
    );
    cap.custody.push(flatwire_vl2::credentials::Custody {
        to: s(&c["custody"][0], "to").parse().unwrap(),
        from: s(&c["custody"][0], "from").parse().unwrap(),
        signature: [0; 96],
    });
    let mut b = Vec::new();
    cap.encode(&mut b);
    let exp = s(c, "serialized_with_zero_signature_hex");
    assert_eq!(hex::encode(&b), exp);
    assert_eq!(Capability::decode(&mut Reader::new(&b)).unwrap(), cap);

    let c = &v["certificate_of_ownership"];
    let mut coo = CertificateOfOwnership::new(
        s(c, "nwid").parse().unwrap(),
        c["ts"].as_i64().unwrap(),
        s(c, "issuedTo").parse().unwrap(),
        c["id"].as_u64().unwrap() as u32,
    );
    for t in c["things"].as_array().unwrap() {
        coo.add_ip(s(t, "value").parse().unwrap());
    }
    coo.signed_by = s(c, "signedBy").parse().unwrap();
    assert_eq!(
        hex::encode(coo.signed_message()),
        s(c, "signed_message_hex")
    );
    let mut b = Vec::new();
    coo.encode(&mut b);
    assert_eq!(hex::encode(&b), s(c, "serialized_with_zero_signature_hex"));
    assert_eq!(
        CertificateOfOwnership::decode(&mut Reader::new(&b)).unwrap(),
        coo
    );

    let c = &v["revocation"];
    let mut rev = Revocation::new(
        u32::from_str_radix(s(c, "id"), 16).unwrap(),
        s(c, "nwid").parse().unwrap(),
        c["credentialId"].as_u64().unwrap() as u32,
        c["threshold"].as_i64().unwrap(),
        c["flags"].as_u64().unwrap(),
        s(c, "target").parse().unwrap(),
        CredentialType::from_u8(c["type"].as_u64().unwrap() as u8).unwrap(),
    );
    rev.signed_by = s(c, "signedBy").parse().unwrap();
    assert_eq!(
        hex::encode(rev.signed_message()),
        s(c, "signed_message_hex")
    );
    let mut b = Vec::new();
    rev.encode(&mut b);
    assert_eq!(hex::encode(&b), s(c, "serialized_with_zero_signature_hex"));
    assert_eq!(Revocation::decode(&mut Reader::new(&b)).unwrap(), rev);
}

#[test]
fn credentials_sign_and_verify_with_real_identities() {
    let ctl = identity(1);
    let member = identity(2);
    let nwid = NetworkId::new(ctl.address(), 0x42);
    let mut com =
        CertificateOfMembership::new(1000, 100, nwid, member.address(), member.public_key());
    com.sign(&ctl).unwrap();
    assert!(com.verify(&ctl.to_public()));
    let mut bad = com.clone();
    bad.qualifiers[0].value += 1;
    assert!(!bad.verify(&ctl));

    let mut tag = Tag::new(nwid, 1000, member.address(), 7, 9);
    tag.sign(&ctl).unwrap();
    assert!(tag.verify(&ctl));
    tag.value = 10;
    assert!(!tag.verify(&ctl));

    let mut cap = Capability::new(nwid, 1000, 5, vec![], 1);
    cap.add_custody(&ctl, member.address()).unwrap();
    let lookup = |a: Address| (a == ctl.address()).then_some(&ctl);
    assert!(cap.verify(lookup));
    assert_eq!(cap.holder(), Some(member.address()));
    let mut forged = Capability::new(nwid, 1000, 5, vec![], 1);
    forged.add_custody(&member, member.address()).unwrap();
    assert!(!forged.verify(|a| (a == member.address()).then_some(&member)));

    let mut rev = Revocation::new(1, nwid, 0, 1000, 1, member.address(), CredentialType::Com);
    rev.sign(&ctl).unwrap();
    assert!(rev.verify(&ctl));
    assert!(!rev.verify(&member));

    // A member cannot sign for a network it does not control.
    let mut t2 = Tag::new(nwid, 1, member.address(), 1, 1);
    t2.sign(&member).unwrap();
    assert!(!t2.verify(&member));
}

#[test]
fn config_chunks_cover_the_vector_region_and_verify() {
    let v = vl2();
    let c = &v["network_config_chunk_signed_region"];
    let dict = unhex(s(
        &v["network_config_dictionary_synthetic"],
        "dictionary_hex",
    ));
    let chunk = ConfigChunk {
        nwid: "8056c2e21c123456".parse().unwrap(),
        data: dict.clone(),
        flags: 0,
        update_id: 0x0123_4567_89ab_cdef,
        total_length: dict.len() as u32,
        index: 0,
        signature: None,
    };
    assert_eq!(
        hex::encode(chunk.signed_region()),
        s(c, "signed_region_hex")
    );

    let ctl = identity(3);
    let nwid = NetworkId::new(ctl.address(), 1);
    let big = vec![b'a'; 20000];
    let chunks = ConfigChunk::split(nwid, &big, 77, &ctl).unwrap();
    assert_eq!(chunks.len(), 3);
    let mut joined = vec![0u8; big.len()];
    for ch in &chunks {
        let wire = ch.encode();
        let back = ConfigChunk::decode(&wire, 0).unwrap();
        assert!(back.verify(&ctl));
        assert!(!back.verify(&identity(4)));
        joined[back.index as usize..back.index as usize + back.data.len()]
            .copy_from_slice(&back.data);
    }
    assert_eq!(joined, big);
}

#[test]
fn adhoc_configs_match_vectors() {
    let v = vl2();
    for c in v["adhoc_networks"].as_array().unwrap() {
        let nwid: NetworkId = s(c, "nwid").parse().unwrap();
        let me: Address = s(c, "member").parse().unwrap();
        let cfg = NetworkConfig::adhoc(nwid, me, 5).unwrap();
        assert_eq!(cfg.name, s(c, "name"));
        assert!(!cfg.private);
        assert_eq!(format!("{:016x}", cfg.flags), s(c, "flags_hex"));
        assert_eq!(u64::from(cfg.mtu), c["mtu"].as_u64().unwrap());
        assert_eq!(cfg.multicast_limit, c["multicastLimit"].as_u64().unwrap());
        assert_eq!(cfg.revision, c["revision"].as_u64().unwrap());
        assert_eq!(
            cfg.credential_time_max_delta as u64,
            c["credentialTimeMaxDelta"].as_u64().unwrap()
        );
        let ips: Vec<String> = cfg.static_ips.iter().map(|i| i.to_string()).collect();
        let want: Vec<String> = c["staticIps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ips, want);
        let mut b = Vec::new();
        flatwire_vl2::rules::encode_rules(&cfg.rules, &mut b);
        assert_eq!(hex::encode(b), s(c, "rules_binary_hex"));
    }
    assert!(
        NetworkConfig::adhoc(
            "ff00170016000000".parse().unwrap(),
            Address::new(1).unwrap(),
            0
        )
        .is_none()
    );
    assert!(
        NetworkConfig::adhoc(
            "8056c2e21c000001".parse().unwrap(),
            Address::new(1).unwrap(),
            0
        )
        .is_none()
    );
}
