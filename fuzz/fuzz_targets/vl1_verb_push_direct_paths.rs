#![no_main]
//! PUSH_DIRECT_PATHS payloads never panic and the records round-trip.

use flatwire_vl1::wire::{parse_push_direct_paths, write_push_direct_paths};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(recs) = parse_push_direct_paths(data) {
        let mut out = Vec::new();
        write_push_direct_paths(&mut out, &recs);
        assert_eq!(parse_push_direct_paths(&out).unwrap(), recs);
    }
});
