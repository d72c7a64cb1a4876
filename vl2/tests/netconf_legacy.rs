//! The legacy (pre-1.1.6, `v` < 6) NETWORK_CONFIG forms, pinned against 1.14.1.
//!
//! 1.14's `NetworkConfig::fromDictionary` keeps a decoder for the old text keys (`eb`,
//! `p`, `v4s`, `v6s`, `et`, `com`, `ab`; `rl` is defined but never read) inside
//! `#ifdef ZT_SUPPORT_OLD_STYLE_NETCONF`, and no 1.14.1 source, header or build file
//! defines that macro (checked at the 1.14.1 `dev` snapshot): a dictionary with `v` < 6
//! makes `fromDictionary` return false and the config is dropped, and for `v` ≥ 6 the
//! old keys are never looked at. So a 1.14 member accepts *no* legacy form, and these
//! tests pin that flatwire does the same rather than decode them.

use flatwire_vl2::dictionary::Dictionary;
use flatwire_vl2::netconf::{
    ConfigError, FLAG_ENABLE_BROADCAST, FLAG_NDP_EMULATION, NetworkConfig,
};

/// The common fields every config carries, new or old.
fn base(version: Option<u64>) -> Dictionary {
    let mut d = Dictionary::new();
    if let Some(v) = version {
        d.add_u64("v", v);
    }
    d.add_u64("nwid", 0x8056_c2e2_1c00_0001);
    d.add_u64("ts", 0x18c_0000_0000);
    d.add_u64("r", 3);
    d.add_str("id", "89e92ceee5");
    d.add_u64("ml", 32);
    d.add_str("n", "legacy");
    d
}

/// The keys a pre-1.1.6 controller wrote (what 1.14's `toDictionary(includeLegacy)`
/// would add): broadcast on, public, static IPs as text, an ethertype whitelist, a
/// string-form COM and an active bridge.
fn add_legacy_keys(d: &mut Dictionary) {
    d.add_str("eb", "1");
    d.add_str("p", "0");
    d.add_str("v4s", "10.147.17.5/24");
    d.add_str("v6s", "fd80:56c2:e21c:0:199:9389:e92c:eee5/88");
    d.add_str("et", "800,806,86dd");
    d.add_str(
        "com",
        "1:0000018c00000000,0000000000000000,0000000000000000:8056c2e21c000001,0,0:89e92ceee5,0,ffffffffffffffff:8056c2e21c",
    );
    d.add_str("ab", "1122334455");
    d.add_str("rl", "1122334455;10.0.0.1/9993");
}

#[test]
fn a_legacy_config_is_refused_like_1_14_does() {
    // Old controllers wrote no `v` at all (0) or a version below 6.
    for (version, seen) in [(None, 0), (Some(1), 1), (Some(5), 5)] {
        let mut d = base(version);
        add_legacy_keys(&mut d);
        assert_eq!(
            NetworkConfig::from_dictionary(&d),
            Err(ConfigError::TooOld(seen)),
            "v = {version:?}"
        );
        // Also when it arrives as dictionary bytes (the NETWORK_CONFIG chunk payload).
        assert_eq!(
            NetworkConfig::decode(&d.encode()),
            Err(ConfigError::TooOld(seen))
        );
    }
    // Version 6 (1.1.6+) is the oldest accepted form, not only the current 7.
    assert!(NetworkConfig::from_dictionary(&base(Some(6))).is_ok());
}

#[test]
fn legacy_keys_next_to_a_current_config_are_ignored() {
    for v in [6, 7] {
        let mut d = base(Some(v));
        add_legacy_keys(&mut d);
        d.add_u64("f", 0);
        let c = NetworkConfig::from_dictionary(&d).expect("a v6+ config decodes");
        // What the compiled-out legacy decoder would have produced, and 1.14 does not:
        assert_eq!(
            c.flags & FLAG_ENABLE_BROADCAST,
            0,
            "`eb` is not read; `f` rules"
        );
        assert_eq!(c.flags & FLAG_NDP_EMULATION, 0, "no forced NDP emulation");
        assert!(c.private, "`p` is not read; a missing `t` means private");
        assert!(c.static_ips.is_empty(), "`v4s`/`v6s` are not read");
        assert!(c.rules.is_empty(), "`et` makes no ethertype rules");
        assert!(c.specialists.is_empty(), "`ab` adds no active bridge");
        assert!(c.com.is_none(), "the string-form `com` is not read");
        // The fields common to both forms are read as usual.
        assert_eq!(c.network_id.to_u64(), 0x8056_c2e2_1c00_0001);
        assert_eq!(c.issued_to.to_u64(), 0x89_e92c_eee5);
        assert_eq!((c.revision, c.multicast_limit), (3, 32));
        assert_eq!(c.name, "legacy");
        // Re-encoding writes the current form only.
        let keys: Vec<Vec<u8>> = c.to_dictionary().keys().map(<[u8]>::to_vec).collect();
        for k in ["eb", "p", "v4s", "v6s", "et", "com", "ab", "rl"] {
            assert!(!keys.contains(&k.as_bytes().to_vec()), "{k} is not written");
        }
    }
}
