#![no_main]
//! OK payloads: the in-reply-to head, OK(HELLO) and OK(WHOIS) bodies never panic and
//! round-trip through their writers.

use flatwire_vl1::wire::{InReplyTo, OkHello, parse_ok_whois};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok((head, body)) = InReplyTo::parse(data) else {
        return;
    };
    let mut out = Vec::new();
    head.write(&mut out);
    assert_eq!(InReplyTo::parse(&out).unwrap().0, head);
    if let Ok(ok) = OkHello::parse(body) {
        let mut out = Vec::new();
        ok.write(&mut out);
        assert_eq!(OkHello::parse(&out).unwrap(), ok);
    }
    if let Ok(ids) = parse_ok_whois(body) {
        let mut out = Vec::new();
        for id in &ids {
            id.write_bytes(false, &mut out);
        }
        assert_eq!(parse_ok_whois(&out).unwrap(), ids);
    }
});
