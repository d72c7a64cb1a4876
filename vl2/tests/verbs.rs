//! NETWORK_CONFIG_REQUEST and NETWORK_CREDENTIALS payloads against the spec vectors and
//! the packets a real ZeroTier One 1.14.1 sent in the recorded join.

mod common;

use common::{ident, s, unhex, vl2, zt_one};
use flatwire_vl2::NetworkId;
use flatwire_vl2::credentials::{Revocation, Tag};
use flatwire_vl2::verbs::{
    ConfigRequest, CredentialsPayload, SoftwareVersion, Vl2Error, error_code, request_metadata,
};
use serde_json::Value;

fn captured(verb: &str) -> Vec<(String, Vec<u8>)> {
    let text = String::from_utf8(zt_one("capture/join-decoded.jsonl")).unwrap();
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|j| j["verb"].as_str() == Some(verb))
        .map(|j| (s(&j, "source").to_owned(), unhex(s(&j, "payload_hex"))))
        .collect()
}

const V1_14_1: SoftwareVersion = SoftwareVersion {
    major: 1,
    minor: 14,
    revision: 1,
};

#[test]
fn config_request_matches_the_vector_and_the_capture() {
    let v = vl2();
    let md = request_metadata(V1_14_1, Some("linux/x86_64"));
    assert_eq!(
        md.encode(),
        unhex(s(&v["config_request_metadata_1_14_1"], "hex"))
    );
    let first = &v["network_config_request_payload_first_join"];
    let req = ConfigRequest {
        nwid: s(first, "nwid").parse().unwrap(),
        metadata: md.encode(),
        revision: 0,
        timestamp: 0,
    };
    let mut out = Vec::new();
    req.encode(&mut out);
    assert_eq!(out, unhex(s(first, "payload_hex")));
    assert_eq!(ConfigRequest::decode(&out).unwrap(), req);
    // The three requests the real member sent decode and re-encode byte for byte.
    let reqs = captured("NETWORK_CONFIG_REQUEST");
    assert_eq!(reqs.len(), 3);
    for (_, p) in reqs {
        let r = ConfigRequest::decode(&p).unwrap();
        assert_eq!(r.nwid, "e6acfe87fc3adaf6".parse::<NetworkId>().unwrap());
        let d = r.metadata_dictionary();
        assert_eq!(d.get_u64("minv", 0), 14);
        assert_eq!(d.get_str("o").as_deref(), Some("linux/x86_64"));
        let mut again = Vec::new();
        r.encode(&mut again);
        assert_eq!(again, p);
    }
    // Older members omit the `o` key and (very old ones) the trailing fields.
    let old = request_metadata(
        SoftwareVersion {
            major: 1,
            minor: 10,
            revision: 6,
        },
        None,
    );
    assert!(old.get("o").is_none());
    let mut short = Vec::new();
    ConfigRequest {
        nwid: NetworkId::from(1),
        metadata: old.encode(),
        revision: 0,
        timestamp: 0,
    }
    .encode(&mut short);
    short.truncate(short.len() - 16);
    assert_eq!(ConfigRequest::decode(&short).unwrap().revision, 0);
}

#[test]
fn captured_credentials_decode_verify_and_reencode() {
    let zta = ident("capture/node-identities/zta-e6acfe87fc.public");
    let pushes = captured("NETWORK_CREDENTIALS");
    assert_eq!(pushes.len(), 2);
    for (source, p) in pushes {
        let c = CredentialsPayload::decode(&p).unwrap();
        assert_eq!(c.coms.len(), 1, "a member pushes its own COM");
        let com = &c.coms[0];
        assert_eq!(com.issued_to().unwrap().to_string(), source);
        assert!(com.verify(&zta), "COM signed by the controller");
        assert!(c.revocations.is_empty(), "members never push revocations");
        for t in &c.tags {
            assert!(t.verify(&zta));
        }
        let mut again = Vec::new();
        c.encode(&mut again);
        assert_eq!(again, p, "byte-identical re-encoding");
    }
}

#[test]
fn credentials_layout_known_answer() {
    let v = vl2();
    let rev_bytes = unhex(s(&v["revocation"], "serialized_with_zero_signature_hex"));
    let rev = Revocation::decode(&mut flatwire_vl2::codec::Reader::new(&rev_bytes)).unwrap();
    let tag_bytes = unhex(s(&v["tag"], "serialized_with_zero_signature_hex"));
    let tag = Tag::decode(&mut flatwire_vl2::codec::Reader::new(&tag_bytes)).unwrap();
    // Controller revocation push: no COM, 0x00, no caps, no tags, one revocation, no COOs.
    let mut out = Vec::new();
    CredentialsPayload::revocation(rev.clone()).encode(&mut out);
    let mut want = vec![0, 0, 0, 0, 0, 0, 1];
    want.extend_from_slice(&rev_bytes);
    want.extend_from_slice(&[0, 0]);
    assert_eq!(out, want);
    assert_eq!(
        CredentialsPayload::decode(&out).unwrap().revocations,
        vec![rev]
    );
    // Tags only.
    let c = CredentialsPayload {
        tags: vec![tag.clone(), tag.clone()],
        ..Default::default()
    };
    let mut out = Vec::new();
    c.encode(&mut out);
    let mut want = vec![0, 0, 0, 0, 2];
    want.extend_from_slice(&tag_bytes);
    want.extend_from_slice(&tag_bytes);
    want.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(out, want);
    assert_eq!(CredentialsPayload::decode(&out).unwrap(), c);
    // Old nodes stop after the COM terminator.
    assert!(CredentialsPayload::decode(&[0]).unwrap().is_empty());
    assert!(CredentialsPayload::decode(&[]).unwrap().is_empty());
    // Truncated sections are errors, never panics.
    for n in 0..out.len() {
        let _ = CredentialsPayload::decode(&out[..n]);
    }
}

#[test]
fn need_membership_error_round_trips() {
    let nwid: NetworkId = "8056c2e21c123456".parse().unwrap();
    let mut out = Vec::new();
    Vl2Error::need_membership(nwid).encode(&mut out);
    assert_eq!(out, unhex("068056c2e21c123456"));
    let e = Vl2Error::decode(&out).unwrap();
    assert_eq!(e.code, error_code::NEED_MEMBERSHIP_CERTIFICATE);
    assert_eq!(e.nwid, nwid);
    assert!(e.auth_info().is_none());
    let mut auth = vec![error_code::NETWORK_AUTHENTICATION_REQUIRED];
    auth.extend_from_slice(&nwid.to_bytes());
    let d = b"aV=0\naU=https://x";
    auth.extend_from_slice(&(d.len() as u16).to_be_bytes());
    auth.extend_from_slice(d);
    let e = Vl2Error::decode(&auth).unwrap();
    assert_eq!(
        e.auth_info().unwrap().get_str("aU").as_deref(),
        Some("https://x")
    );
}
