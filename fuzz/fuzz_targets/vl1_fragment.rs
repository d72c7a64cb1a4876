#![no_main]
//! Fragment views and the reassembler never panic and keep their limits on any sequence
//! of datagrams; fragmenting a packet and reassembling it in reverse order gives it back.

use flatwire_vl1::reassembly::{Reassembler, ReassemblyLimits};
use flatwire_vl1::wire::{self, Fragment};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    // Part 1: a stream of length-prefixed datagrams into a small reassembler.
    let limits = ReassemblyLimits {
        slots: 1 + (ctl as usize & 3),
        max_bytes: 4 * wire::MAX_PACKET_LEN,
        max_age_ms: 50,
    };
    let mut r: Reassembler<u8> = Reassembler::new(limits);
    let mut out = Vec::new();
    let mut now = 0u64;
    let mut b = rest;
    while let Some((&len, tail)) = b.split_first() {
        let n = (len as usize * 8).min(tail.len());
        let (d, next) = tail.split_at(n);
        b = next;
        now += u64::from(len & 0x1f);
        if let Ok(f) = Fragment::new_checked(d) {
            let _ = (
                f.packet_id(),
                f.destination(),
                f.total(),
                f.number(),
                f.hops(),
                f.data(),
            );
        }
        let done = if wire::is_fragment(d) {
            r.add_fragment(now, d, &mut out)
        } else {
            r.add_head(now, d, len, &mut out)
        };
        if let Ok(Some(_)) = done {
            assert!(out.len() <= wire::MAX_PACKET_LEN);
        }
        if len & 0x20 != 0 {
            r.expire(now);
        }
        assert!(r.held_bytes() <= limits.max_bytes);
        assert!(r.pending() <= limits.slots);
    }

    // Part 2: fragment the input as a packet and reassemble it backwards.
    let mtu = wire::FRAGMENT_HEADER_LEN + wire::HEADER_LEN + 1 + ctl as usize * 6;
    if rest.len() < wire::HEADER_LEN || rest.len() > wire::MAX_PACKET_LEN {
        return;
    }
    let mut pieces = Vec::new();
    let mut scratch = Vec::new();
    let Ok(n) = wire::fragment(rest, mtu, &mut scratch, |p| pieces.push(p.to_vec())) else {
        return;
    };
    assert_eq!(n, pieces.len());
    if n < 2 {
        return;
    }
    let mut r: Reassembler<()> = Reassembler::new(ReassemblyLimits::default());
    for (i, p) in pieces.iter().enumerate().rev() {
        let done = if i == 0 {
            r.add_head(0, p, (), &mut out)
        } else {
            assert!(wire::is_fragment(p));
            r.add_fragment(0, p, &mut out)
        };
        assert_eq!(done.unwrap().is_some(), i == 0);
    }
    assert_eq!(out, rest);
    assert_eq!(r.held_bytes(), 0);
});
