#![no_main]
//! HELLO payload parsing (fixed part and moon list) never panics and round-trips.

use flatwire_vl1::wire::Hello;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Hello::parse_moons(data);
    let Ok((mut h, crypt)) = Hello::parse_head(data) else {
        return;
    };
    if let Some(at) = crypt {
        assert!(at <= data.len());
        if let Ok(moons) = Hello::parse_moons(&data[at..]) {
            h.moons = moons;
        }
    }
    if h.planet.is_none() {
        return;
    }
    let mut out = Vec::new();
    let at = h.write(&mut out);
    let (back, crypt) = Hello::parse_head(&out).unwrap();
    assert_eq!(crypt, Some(at));
    assert_eq!(Hello::parse_moons(&out[at..]).unwrap(), h.moons);
    let mut h2 = back;
    h2.moons = h.moons.clone();
    assert_eq!(h2, h);
});
