#![no_main]
//! Vouch decoding never panics, and what decodes encodes back to the same bytes.

use flatwire_vl2::vouch::Vouch;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = Vouch::decode(data) {
        assert_eq!(v.encode(), data);
    }
});
