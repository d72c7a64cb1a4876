#![no_main]
//! Identity text and binary parsing never panic, and what parses re-encodes to an
//! equivalent identity (binary: to the very bytes that were read).

use flatwire_vl1::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Ok(id) = s.parse::<Identity>()
    {
        let public: Identity = id.to_string().parse().unwrap();
        assert_eq!(public, id);
        assert!(!public.has_secret());
        if let Some(secret) = id.to_secret_string() {
            let back: Identity = secret.parse().unwrap();
            assert_eq!(back.to_secret_string().unwrap(), secret);
        }
    }
    if let Ok((id, used)) = Identity::from_bytes(data) {
        assert_eq!(id.to_bytes(true), &data[..used]);
        let (back, used2) = Identity::from_bytes(&id.to_bytes(false)).unwrap();
        assert_eq!((back, used2), (id.to_public(), 71));
    }
});
