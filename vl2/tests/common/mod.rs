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
