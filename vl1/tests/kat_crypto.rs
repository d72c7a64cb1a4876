//! Known-answer tests for the primitives, identities, signatures and key agreement
//! (`vectors/vl1.json` and `vectors/zt-one/{identities,signatures,selftest}`).

mod common;

use common::{arr, hx, json, keys, read_vector, read_vector_text, vector_identity};
use flatwire_vl1::crypto::{self, CipherSuite};
use flatwire_vl1::identity::{self, Identity};
use sha2::Digest;

#[test]
fn salsa20_keystreams() {
    let v = json("vl1.json");
    for (name, rounds20) in [("salsa20_20", true), ("salsa20_12", false)] {
        let t = &v["salsa20"][name];
        let mut buf = [0u8; 64];
        if rounds20 {
            crypto::salsa20_xor(&arr(&t["key"]), &arr(&t["nonce"]), &mut buf);
        } else {
            crypto::salsa2012_xor(&arr(&t["key"]), &arr(&t["nonce"]), &mut buf);
        }
        assert_eq!(buf.to_vec(), hx(&t["keystream_block0"]), "{name}");
    }
}

#[test]
fn poly1305_and_sha512() {
    let v = json("vl1.json");
    let vs = v["poly1305"]["vectors"].as_array().unwrap();
    assert_eq!(vs.len(), 2);
    for t in vs {
        assert_eq!(
            crypto::poly1305(&arr(&t["key"]), &hx(&t["message"])).to_vec(),
            hx(&t["tag"])
        );
    }
    let m = v["sha512"]["message_ascii"].as_str().unwrap();
    assert_eq!(
        sha2::Sha512::digest(m.as_bytes()).to_vec(),
        hx(&v["sha512"]["digest"])
    );
}

fn id_from_keys(public: &[u8], secret: &[u8]) -> Identity {
    let s: [u8; 64] = secret.try_into().unwrap();
    let id = Identity::from_secret_key(&s).unwrap();
    assert_eq!(
        id.public_key().to_vec(),
        public,
        "public key derives from secret"
    );
    id
}

#[test]
fn c25519_agreement_and_signatures() {
    let v = json("vl1.json");
    let vs = v["c25519"]["vectors"].as_array().unwrap();
    assert_eq!(vs.len(), 32);
    for t in vs {
        let a = id_from_keys(&hx(&t["pub1"]), &hx(&t["priv1"]));
        let b = id_from_keys(&hx(&t["pub2"]), &hx(&t["priv2"]));
        let agreement = hx(&t["agreement"]);
        assert_eq!(a.agree_64(&b).unwrap().to_vec(), agreement);
        assert_eq!(b.agree_64(&a).unwrap().to_vec(), agreement);
        assert_eq!(
            a.agree(&b).unwrap().as_bytes().to_vec(),
            agreement[..48].to_vec()
        );
        let s1 = hx(&t["agreementSignedBy1"]);
        let s2 = hx(&t["agreementSignedBy2"]);
        assert_eq!(a.sign(&agreement).unwrap().to_vec(), s1);
        assert_eq!(b.sign(&agreement).unwrap().to_vec(), s2);
        assert!(a.to_public().verify(&agreement, &s1));
        assert!(b.to_public().verify(&agreement, &s2));
        assert!(!a.verify(&agreement, &s2));
    }
}

#[test]
fn known_good_and_bad_identities() {
    let v = json("vl1.json");
    let id = &v["identity"];
    let good = vector_identity(&v, "known_good");
    assert!(good.has_secret());
    assert!(good.locally_validate());
    assert_eq!(
        identity::memory_hard_digest(good.public_key()).to_vec(),
        hx(&id["known_good_memory_hard_digest"])
    );
    assert_eq!(
        good.to_string(),
        id["known_good_public_string"].as_str().unwrap()
    );
    assert_eq!(
        good.to_secret_string().unwrap(),
        id["known_good"].as_str().unwrap()
    );
    assert_eq!(good.to_bytes(false), hx(&id["known_good_binary_public"]));
    assert_eq!(
        good.to_bytes(true),
        hx(&id["known_good_binary_with_secret"])
    );
    let (back, used) = Identity::from_bytes(&hx(&id["known_good_binary_with_secret"])).unwrap();
    assert_eq!(used, 135);
    assert!(back.has_secret() && back == good);

    let bad = vector_identity(&v, "known_bad");
    assert!(!bad.locally_validate());

    let second = vector_identity(&v, "derived_second_identity");
    assert!(second.locally_validate());
    assert_eq!(
        identity::memory_hard_digest(second.public_key()).to_vec(),
        hx(&id["derived_second_identity_memory_hard_digest"])
    );
    for (addr, what) in id["reserved_address_examples"].as_object().unwrap() {
        let reserved = !what.as_str().unwrap().starts_with("not");
        assert_eq!(
            identity::is_reserved(addr.parse().unwrap()),
            reserved,
            "{addr}"
        );
    }
}

#[test]
fn key_agreement_and_kbkdf() {
    let v = json("vl1.json");
    let k = &v["key_agreement"];
    let a = vector_identity(&v, "known_good");
    let b = vector_identity(&v, "derived_second_identity");
    // The spec gives the identities with their secrets; compare the public part.
    let public_part = |field: &str| {
        let full = k[field].as_str().unwrap();
        full.split(':').take(3).collect::<Vec<_>>().join(":")
    };
    assert_eq!(a.to_string(), public_part("identity_a"));
    assert_eq!(b.to_string(), public_part("identity_b"));
    let key = a.agree(&b.to_public()).unwrap();
    assert_eq!(key.as_bytes().to_vec(), hx(&k["shared_key_48"]));
    assert_eq!(b.agree(&a).unwrap().as_bytes(), key.as_bytes());
    assert_eq!(
        crypto::hmac_sha384(key.as_bytes(), &hx(&k["kbkdf_message_k0"])).to_vec(),
        hx(&k["hmac_sha384_k0_full48"])
    );
    assert_eq!(
        crypto::kbkdf_hmac_sha384(key.as_bytes(), b'1').to_vec(),
        hx(&k["hmac_sha384_k1_full48"])
    );
}

#[test]
fn aes_gmac_siv_vectors_from_spec() {
    let v = json("vl1.json");
    let k0: [u8; 32] = v["aes"]["gmac_siv_k0_ascii"]
        .as_str()
        .unwrap()
        .as_bytes()
        .try_into()
        .unwrap();
    let k1: [u8; 32] = v["aes"]["gmac_siv_k1_ascii"]
        .as_str()
        .unwrap()
        .as_bytes()
        .try_into()
        .unwrap();
    let vs = v["aes"]["gmac_siv"].as_array().unwrap();
    assert_eq!(vs.len(), 85);
    for t in vs {
        let n = t["length"].as_u64().unwrap() as usize;
        let pt: Vec<u8> = (0..n).map(|i| i as u8).collect();
        let iv = (n as u64).to_le_bytes();
        let mut buf = pt.clone();
        let tag = crypto::aes_gmac_siv_encrypt(&k0, &k1, &iv, &pt, &mut buf);
        assert_eq!(tag.to_vec(), hx(&t["tag"]), "tag, length {n}");
        assert_eq!(
            sha2::Sha384::digest(&buf).to_vec(),
            hx(&t["ct_sha384"]),
            "ct, length {n}"
        );
        assert!(crypto::aes_gmac_siv_decrypt(&k0, &k1, &tag, &pt, &mut buf));
        assert_eq!(buf, pt);
    }
}

#[test]
fn aes_gmac_siv_vectors_from_zerotier() {
    let v = json("zt-one/crypto/aes-gmac-siv-vectors.json");
    let k0: [u8; 32] = arr(&v["k0"]);
    let k1: [u8; 32] = arr(&v["k1"]);
    let iv: [u8; 8] = arr(&v["iv_bytes"]);
    let aad = hx(&v["aad"]);
    let vectors = v["vectors"].as_array().expect("vectors array");
    assert!(!vectors.is_empty());
    for t in vectors {
        let n = t["length"].as_u64().unwrap() as usize;
        let pt: Vec<u8> = (0..n).map(|i| ((7 * i + 3) % 256) as u8).collect();
        let mut buf = pt.clone();
        let tag = crypto::aes_gmac_siv_encrypt(&k0, &k1, &iv, &aad, &mut buf);
        assert_eq!(pt, hx(&t["plaintext"]));
        assert_eq!(tag.to_vec(), hx(&t["tag_16"]), "length {n}");
        assert_eq!(buf, hx(&t["ciphertext"]), "length {n}");
        assert!(crypto::aes_gmac_siv_decrypt(&k0, &k1, &tag, &aad, &mut buf));
        assert_eq!(buf, pt);
    }
}

#[test]
fn zt_one_identity_files() {
    let v = json("zt-one/identities/identities.json");
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 5);
    for e in list {
        let secret_text = read_vector_text(&format!(
            "zt-one/identities/{}",
            e["file_secret"].as_str().unwrap()
        ));
        let public_text = read_vector_text(&format!(
            "zt-one/identities/{}",
            e["file_public"].as_str().unwrap()
        ));
        let s: Identity = secret_text.parse().unwrap();
        let p: Identity = public_text.parse().unwrap();
        assert!(s.locally_validate() && p.locally_validate());
        assert_eq!(s, p);
        assert_eq!(s.to_string(), public_text);
        assert_eq!(s.to_secret_string().unwrap(), secret_text);
        assert_eq!(s.address().to_string(), e["address"].as_str().unwrap());
        let sk: [u8; 64] = s.to_bytes(true)[71..].try_into().unwrap();
        assert_eq!(
            Identity::from_secret_key(&sk).unwrap(),
            s,
            "public derives from secret"
        );
    }
    // Negative cases as recorded from zerotier-idtool validate.
    let results = read_vector_text("zt-one/identities/validate-negative/results.tsv");
    let mut n = 0;
    for line in results.lines().filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let text = read_vector_text(&format!("zt-one/identities/validate-negative/{}", cols[0]));
        let ok = text
            .trim()
            .parse::<Identity>()
            .map(|id| id.locally_validate())
            .unwrap_or(false);
        assert_eq!(ok, cols[1] == "0", "{}", cols[0]);
        n += 1;
    }
    assert_eq!(n, 3);
}

#[test]
fn zt_one_pairwise_keys() {
    let ids: Vec<Identity> = (1..=5)
        .map(|i| {
            read_vector_text(&format!("zt-one/identities/identity-{i}.secret"))
                .parse()
                .unwrap()
        })
        .collect();
    let find = |a: &str| ids.iter().find(|i| i.address().to_string() == a).unwrap();
    let check = |v: serde_json::Value, ids: &dyn Fn(&str) -> Identity| {
        let list = v.as_array().unwrap().clone();
        assert!(!list.is_empty());
        for e in list {
            let a = ids(e["a"].as_str().unwrap());
            let b = ids(e["b"].as_str().unwrap());
            let k = a.agree(&b.to_public()).unwrap();
            assert_eq!(k.as_bytes().to_vec(), hx(&e["agreed_key_48"]));
            assert_eq!(b.agree(&a).unwrap().as_bytes(), k.as_bytes());
            assert_eq!(
                crypto::kbkdf_hmac_sha384(k.as_bytes(), b'0').to_vec(),
                hx(&e["kbkdf_k0_48"])
            );
            assert_eq!(
                crypto::kbkdf_hmac_sha384(k.as_bytes(), b'1').to_vec(),
                hx(&e["kbkdf_k1_48"])
            );
        }
    };
    check(json("zt-one/identities/pairwise-keys.json"), &|a| {
        find(a).clone()
    });
    let node = |a: &str| -> Identity {
        let name = ["ztroot-8cc5f30f43", "zta-e6acfe87fc", "ztb-e28e6b73a1"]
            .into_iter()
            .find(|n| n.ends_with(a))
            .unwrap();
        read_vector_text(&format!("zt-one/capture/node-identities/{name}.secret"))
            .parse()
            .unwrap()
    };
    check(json("zt-one/capture/node-pairwise-keys.json"), &node);
}

#[test]
fn zt_one_signatures() {
    let id1: Identity = read_vector_text("zt-one/identities/identity-1.secret")
        .parse()
        .unwrap();
    let id1p: Identity = read_vector_text("zt-one/identities/identity-1.public")
        .parse()
        .unwrap();
    let id2: Identity = read_vector_text("zt-one/identities/identity-2.public")
        .parse()
        .unwrap();
    let msg = read_vector("zt-one/signatures/message.txt");
    let empty = read_vector("zt-one/signatures/message-empty.txt");
    let tampered = read_vector("zt-one/signatures/message-tampered.txt");
    let sig = hex::decode(read_vector_text("zt-one/signatures/message.txt.sig").trim()).unwrap();
    let sig_empty =
        hex::decode(read_vector_text("zt-one/signatures/message-empty.txt.sig").trim()).unwrap();
    // Our signatures are byte-identical to zerotier-idtool's (deterministic Ed25519).
    assert_eq!(id1.sign(&msg).unwrap().to_vec(), sig);
    assert_eq!(id1.sign(&empty).unwrap().to_vec(), sig_empty);
    let flip_ed =
        hex::decode(read_vector_text("zt-one/signatures/sig-bitflip-ed25519-part.hex").trim())
            .unwrap();
    let flip_dg =
        hex::decode(read_vector_text("zt-one/signatures/sig-bitflip-digest-part.hex").trim())
            .unwrap();
    let results = read_vector_text("zt-one/signatures/verify-results.tsv");
    let mut n = 0;
    for line in results.lines().filter(|l| !l.is_empty()) {
        let cols: Vec<&str> = line.split('\t').collect();
        let ours = match cols[0] {
            "valid-secret-id" => id1.verify(&msg, &sig),
            "valid-public-id" => id1p.verify(&msg, &sig),
            "valid-empty-message" => id1p.verify(&empty, &sig_empty),
            "tampered-message" => id1p.verify(&tampered, &sig),
            "sig-bitflip-ed25519-part" => id1p.verify(&msg, &flip_ed),
            "sig-bitflip-digest-part" => id1p.verify(&msg, &flip_dg),
            "wrong-identity" => id2.verify(&msg, &sig),
            "truncated-sig-64-bytes" => id1p.verify(&msg, &sig[..64]),
            other => panic!("unknown case {other}"),
        };
        assert_eq!(ours, cols[1] == "0", "{}", cols[0]);
        n += 1;
    }
    assert_eq!(n, 8);
}

#[test]
fn signature_example() {
    let v = json("vl1.json");
    let s = &v["signature_example"];
    let signer: Identity = s["signer"].as_str().unwrap().parse().unwrap();
    let id = vector_identity(&v, "known_good");
    assert_eq!(signer, id);
    let msg = s["message_ascii"].as_str().unwrap().as_bytes();
    assert_eq!(id.sign(msg).unwrap().to_vec(), hx(&s["signature96"]));
    assert!(signer.verify(msg, &hx(&s["signature96"])));
}

#[test]
fn salsa2012_echo_packet() {
    let v = json("vl1.json");
    let p = &v["packets"];
    let (_a, _b, key) = keys(&v);
    let t = &p["echo_salsa2012"];
    let mut pkt = hx(&t["plaintext"]);
    let salsa_key: [u8; 32] = key.as_bytes()[..32].try_into().unwrap();
    pkt[18] = 0x88;
    assert_eq!(
        crypto::mangle_key(&salsa_key, &pkt).to_vec(),
        hx(&t["mangled_key"])
    );
    pkt[18] = 0;
    crypto::armor(&mut pkt, &key, CipherSuite::Poly1305Salsa2012).unwrap();
    assert_eq!(pkt, hx(&t["armored"]));
    assert_eq!(
        crypto::dearmor(&mut pkt, &key).unwrap(),
        CipherSuite::Poly1305Salsa2012
    );
    let mut plain = hx(&t["plaintext"]);
    plain[18] = 0x88;
    assert_eq!(pkt[27..], plain[27..]);
}
