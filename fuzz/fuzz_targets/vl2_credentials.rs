#![no_main]
//! Credential and multicast-verb parsers never panic, and what they accept re-encodes identically.

use flatwire_vl2::codec::Reader;
use flatwire_vl2::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, Revocation, Tag,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = CertificateOfMembership::decode(&mut Reader::new(data)) {
        let mut b = Vec::new();
        c.encode(&mut b);
        assert_eq!(CertificateOfMembership::decode(&mut Reader::new(&b)).ok(), Some(c));
    }
    let _ = Capability::decode(&mut Reader::new(data));
    let _ = Tag::decode(&mut Reader::new(data));
    let _ = CertificateOfOwnership::decode(&mut Reader::new(data));
    let _ = Revocation::decode(&mut Reader::new(data));
    let _ = flatwire_vl2::multicast::decode_likes(data);
    let _ = flatwire_vl2::multicast::Gather::decode(data);
    let _ = flatwire_vl2::multicast::GatherResult::decode(data);
    let _ = flatwire_vl2::multicast::ExtFrameHeader::decode(data);
    let _ = flatwire_vl2::multicast::MulticastFrameHeader::decode(data);
});
