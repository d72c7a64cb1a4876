#![no_main]
//! RENDEZVOUS payloads never panic and round-trip.

use flatwire_vl1::wire::Rendezvous;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Rendezvous::parse(data) {
        let mut out = Vec::new();
        r.write(&mut out);
        assert_eq!(Rendezvous::parse(&out).unwrap(), r);
        assert!(data.starts_with(&out));
    }
});
