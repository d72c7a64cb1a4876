#![no_main]
//! The binary rule decoder and the rule-language compiler never panic.

use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::rules::{MAX_RULES, decode_rules, encode_rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(rules) = decode_rules(data, MAX_RULES) {
        let mut b = Vec::new();
        encode_rules(&rules, &mut b);
        assert_eq!(decode_rules(&b, MAX_RULES).ok(), Some(rules));
    }
    if let Ok(out) = compile(&String::from_utf8_lossy(data)) {
        let _ = out.to_cli_json().pretty(1);
        let _ = out.base_rules();
    }
});
