#![no_main]
//! Dictionary parsing never panics and re-parsing its encoding is stable.

use flatwire_vl2::dictionary::Dictionary;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let d = Dictionary::parse(data);
    let again = Dictionary::parse(&d.encode());
    assert_eq!(Dictionary::parse(&again.encode()), again);
});
