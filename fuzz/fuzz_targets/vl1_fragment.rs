#![no_main]
//! Fragment views and the reassembler never panic and keep their limits on any sequence
//! of datagrams; fragmenting a packet (either split) and reassembling it in reverse order
//! gives it back; an even split has the full split's piece count, one piece length but a
//! shorter last, and no piece over the MTU.

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
    let mtu = wire::FRAGMENT_HEADER_LEN + wire::HEADER_LEN + 1 + (ctl as usize >> 1) * 12;
    if rest.len() < wire::HEADER_LEN || rest.len() > wire::MAX_PACKET_LEN {
        return;
    }
    let cut = |split| {
        let mut pieces = Vec::new();
        let mut scratch = Vec::new();
        let n = wire::fragment(rest, mtu, split, &mut scratch, |p| pieces.push(p.to_vec()));
        n.map(|n| (n, pieces))
    };
    let (split, other) = if ctl & 1 == 0 {
        (wire::Split::Full, wire::Split::Even)
    } else {
        (wire::Split::Even, wire::Split::Full)
    };
    let Ok((n, pieces)) = cut(split) else {
        assert!(cut(other).is_err());
        return;
    };
    assert_eq!(n, pieces.len());
    assert_eq!(cut(other).map(|(n, _)| n).ok(), Some(n));
    assert!(pieces.iter().all(|p| p.len() <= mtu));
    if split == wire::Split::Even {
        let (last, most) = pieces.split_last().expect("one piece at least");
        assert!(most.iter().all(|p| p.len() == pieces[0].len()));
        assert!(last.len() <= pieces[0].len());
    }
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
