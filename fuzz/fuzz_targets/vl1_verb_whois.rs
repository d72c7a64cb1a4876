#![no_main]
//! WHOIS payloads never panic and every address is read.

use flatwire_vl1::wire::parse_whois;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(addrs) = parse_whois(data) {
        let out: Vec<u8> = addrs.iter().flat_map(|a| a.to_bytes()).collect();
        assert_eq!(out, data);
    }
});
