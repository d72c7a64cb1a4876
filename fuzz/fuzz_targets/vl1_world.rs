#![no_main]
//! World parsing never panics, a parsed world re-serializes to bytes that parse back to
//! it, and signature checks and the update rule run on anything that parses.

use flatwire_vl1::World;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((w, used)) = World::parse(data) else {
        return;
    };
    assert!(used <= data.len());
    let bytes = w.serialize(false);
    let (again, used2) = World::parse(&bytes).unwrap();
    assert_eq!(used2, bytes.len());
    assert_eq!(again, w);
    let _ = w.verify_signature(&w.updates_must_be_signed_by);
    let _ = w.should_replace_with(&again);
});
