#![no_main]
//! ERROR payloads never panic and round-trip.

use flatwire_vl1::wire::{ErrorBody, InReplyTo};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let body = InReplyTo::parse(data).map_or(data, |(_, rest)| rest);
    if let Ok(e) = ErrorBody::parse(body) {
        let mut out = Vec::new();
        e.write(&mut out);
        assert_eq!(out, body);
    }
});
