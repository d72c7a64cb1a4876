//! Shared helpers for the known-answer tests.
#![allow(dead_code)]

use serde_json::Value;

/// Loads `shared/spec/vectors/vl2.json`; a missing file fails the test.
pub fn vl2() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/spec/vectors/vl2.json"
    );
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("vector file {path} is required: {e}"));
    serde_json::from_str(&text).expect("vl2.json parses")
}

/// Reads a file under `shared/spec/vectors/zt-one/`; a missing file fails the test.
pub fn zt_one(rel: &str) -> Vec<u8> {
    let path = format!(
        "{}/../../shared/spec/vectors/zt-one/{rel}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("vector file {path} is required: {e}"))
}

/// An identity (public or secret) from a file under `shared/spec/vectors/zt-one/`.
pub fn ident(file: &str) -> flatwire_vl1::Identity {
    String::from_utf8(zt_one(file))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Hex to bytes.
pub fn unhex(s: &str) -> Vec<u8> {
    hex::decode(s).expect("hex")
}

/// A string field.
pub fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("field {k} missing in {v}"))
}

/// The recorded lab network (`e6acfe87fc3adaf6`, controller `zta`) as ZeroTier One's
/// controller stored it in `controller.d`.
pub fn lab_network() -> flatwire_vl2::controller::Network {
    let text = String::from_utf8(zt_one(
        "api-json/controller.d/network/e6acfe87fc3adaf6.json",
    ))
    .expect("the lab network is UTF-8");
    serde_json::from_str(&text).expect("the lab network parses")
}

/// Gives network `n` a default capability (ID 7, accepting everything), a tag (ID 3,
/// default 9) and DNS settings (domain `lab`, server 10.147.17.1).
pub fn add_capability_tag_and_dns(n: &mut flatwire_vl2::controller::Network) {
    n.capabilities =
        vec![serde_json::json!({"id": 7, "default": true, "rules": [{"type": "ACTION_ACCEPT"}]})];
    n.tags = vec![serde_json::json!({"id": 3, "default": 9})];
    n.dns = serde_json::json!({"domain": "lab", "servers": ["10.147.17.1"]});
}

/// The stored record of member `a` of `nwid`; panics if the store fails or has none.
pub fn stored_member<S: flatwire_vl2::controller::ControllerStore>(
    ctl: &flatwire_vl2::controller::Controller<S>,
    nwid: flatwire_vl2::NetworkId,
    a: flatwire_vl1::Address,
) -> flatwire_vl2::controller::Member {
    ctl.store()
        .get_member(nwid, a)
        .unwrap()
        .unwrap_or_else(|| panic!("member {a} of {nwid} is not stored"))
}

/// The config in a controller's answer; panics on a refusal or an ignored request.
pub fn config(o: flatwire_vl2::controller::RequestOutcome) -> flatwire_vl2::netconf::NetworkConfig {
    match o {
        flatwire_vl2::controller::RequestOutcome::Config(c) => *c,
        other => panic!("expected a config, got {other:?}"),
    }
}

/// Config request metadata as a 1.14.1 node builds it, with the platform key if given.
pub fn node_metadata(platform: Option<&str>) -> flatwire_vl2::dictionary::Dictionary {
    use flatwire_vl2::verbs::{SoftwareVersion, request_metadata};
    request_metadata(
        SoftwareVersion {
            major: 1,
            minor: 14,
            revision: 1,
        },
        platform,
    )
}

/// Config request metadata as a 1.14.1 node sends it (without the platform key), as it arrives
/// at the controller: with `vouch` (a flatwire pod's) and the release marker if `release`.
pub fn pod_metadata(
    vouch: Option<&flatwire_vl2::vouch::Vouch>,
    release: bool,
) -> flatwire_vl2::dictionary::Dictionary {
    let mut md = node_metadata(None);
    if let Some(v) = vouch {
        md.add(flatwire_vl2::vouch::METADATA_KEY, &v.encode());
    }
    if release {
        md.add(flatwire_vl2::vouch::RELEASE_KEY, b"1");
    }
    flatwire_vl2::dictionary::Dictionary::parse(&md.encode())
}
