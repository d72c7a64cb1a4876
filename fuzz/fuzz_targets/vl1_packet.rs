#![no_main]
//! Packet view accessors, dearmor and decompression never panic on any input, and armor
//! followed by dearmor gives the plaintext back for every suite.

use flatwire_vl1::crypto::{self, CipherSuite, SymmetricKey};
use flatwire_vl1::wire::{self, Packet};
use libfuzzer_sys::fuzz_target;

fn key() -> SymmetricKey {
    let mut k = [0u8; 48];
    for (i, b) in k.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(37);
    }
    SymmetricKey::new(k)
}

fuzz_target!(|data: &[u8]| {
    let key = key();
    if let Ok(p) = Packet::new_checked(data) {
        let _ = (
            p.packet_id(),
            p.destination(),
            p.source(),
            p.flags(),
            p.hops(),
        );
        let _ = (
            p.cipher_suite(),
            p.is_fragmented(),
            p.verb(),
            p.verb().name(),
        );
        let _ = (p.is_compressed(), p.payload().len());
    }
    let _ = wire::is_fragment(data);

    // Dearmor whatever came in; if it authenticates, decompress it.
    let mut buf = data.to_vec();
    let mut scratch = Vec::new();
    if crypto::dearmor(&mut buf, &key).is_ok() {
        let _ = wire::decompress_packet(&mut buf, &mut scratch);
    }

    // Round trip: treat the input as a plaintext packet.
    if data.len() >= wire::HEADER_LEN {
        for suite in [
            CipherSuite::Poly1305None,
            CipherSuite::Poly1305Salsa2012,
            CipherSuite::AesGmacSiv,
        ] {
            let mut p = data.to_vec();
            p[18] &= 0x47;
            crypto::armor(&mut p, &key, suite).unwrap();
            assert_eq!(crypto::dearmor(&mut p, &key).unwrap(), suite);
            assert_eq!(&p[wire::HEADER_LEN - 1..], &data[wire::HEADER_LEN - 1..]);
        }
        // Compression round trip on the plaintext.
        let mut p = data.to_vec();
        p[27] &= !wire::VERB_FLAG_COMPRESSED;
        let orig = p.clone();
        if wire::compress_packet(&mut p, &mut scratch) {
            wire::decompress_packet(&mut p, &mut scratch).unwrap();
            assert_eq!(p, orig);
        }
    }
});
