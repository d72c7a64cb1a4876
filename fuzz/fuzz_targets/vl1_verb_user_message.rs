#![no_main]
//! USER_MESSAGE payloads never panic and round-trip byte for byte.

use flatwire_vl1::wire::UserMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = UserMessage::parse(data) {
        let mut out = Vec::new();
        m.write(&mut out);
        assert_eq!(out, data);
    }
});
