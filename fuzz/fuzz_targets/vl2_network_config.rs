#![no_main]
//! Network config and config-chunk parsing never panic; decoded configs re-encode to
//! something that decodes to the same config.

use flatwire_vl2::netconf::{ConfigChunk, NetworkConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = ConfigChunk::decode(data, 1);
    if let Ok(cfg) = NetworkConfig::decode(data) {
        let again = NetworkConfig::decode(&cfg.encode());
        assert!(again.is_ok());
    }
});
