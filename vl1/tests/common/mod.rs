//! Shared helpers for the known-answer tests: vector loading fails loudly, never skips.
#![allow(dead_code)]

use std::path::PathBuf;

use flatwire_vl1::crypto::SymmetricKey;
use flatwire_vl1::identity::Identity;

/// Absolute path of a file under `shared/spec/vectors/`.
pub fn vector_path(rel: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/spec/vectors/"
    ))
    .join(rel)
}

/// Reads a vector file; panics with the path if it is missing.
pub fn read_vector(rel: &str) -> Vec<u8> {
    let p = vector_path(rel);
    std::fs::read(&p).unwrap_or_else(|e| panic!("vector file {} is required: {e}", p.display()))
}

/// Reads a vector file as UTF-8 text.
pub fn read_vector_text(rel: &str) -> String {
    String::from_utf8(read_vector(rel)).expect("vector file is UTF-8")
}

/// Parses a JSON vector file.
pub fn json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&read_vector(rel)).expect("vector file is valid JSON")
}

/// The identity `v["identity"][name]` of `vl1.json`, parsed; panics if absent or malformed.
pub fn vector_identity(v: &serde_json::Value, name: &str) -> Identity {
    v["identity"][name]
        .as_str()
        .unwrap_or_else(|| panic!("identity.{name} missing"))
        .parse()
        .unwrap_or_else(|e| panic!("identity.{name} parses: {e}"))
}

/// The identities A (`known_good`) and B (`derived_second_identity`) of `vl1.json` and the
/// key they agree on.
pub fn keys(v: &serde_json::Value) -> (Identity, Identity, SymmetricKey) {
    let a = vector_identity(v, "known_good");
    let b = vector_identity(v, "derived_second_identity");
    let k = a.agree(&b).unwrap();
    (a, b, k)
}

/// Decodes a hex string field; panics if absent or malformed.
pub fn hx(v: &serde_json::Value) -> Vec<u8> {
    hex::decode(
        v.as_str()
            .unwrap_or_else(|| panic!("expected hex string, got {v}")),
    )
    .expect("valid hex")
}

/// Decodes a hex string into a fixed array.
pub fn arr<const N: usize>(v: &serde_json::Value) -> [u8; N] {
    hx(v)
        .try_into()
        .unwrap_or_else(|b: Vec<u8>| panic!("expected {N} bytes, got {}", b.len()))
}
