#![no_main]
//! TAP offload handling never panics on any virtio-net header, frame and MTU; a plain frame
//! changes at most in its checksum field; a superframe's segments each fit the MTU plus the
//! Ethernet header and carry, in order, exactly the superframe's TCP payload; coalescing the
//! segments again (as for a TAP write) and splitting what that makes gives them back.

use flatwire_agent::offload::{
    F_NEEDS_CSUM, HEAD_MAX, Received, VNET_HDR_LEN, VnetHdr, classify, coalesce,
};
use libfuzzer_sys::fuzz_target;

/// Ethernet header bytes on top of the MTU.
const ETH_HDR: usize = 14;

/// Coalesces `frames` as [`flatwire_agent::tap`] does for a TAP write and splits each
/// superframe again as the kernel would: every frame comes back unchanged, in order.
fn round_trip(frames: &[Vec<u8>], out: &mut [u8]) {
    let mut head = [0u8; HEAD_MAX];
    let mut i = 0;
    while i < frames.len() {
        let run = coalesce(&frames[i..], &mut head);
        assert!(run.frames >= 1 && i + run.frames <= frames.len(), "{run:?}");
        if run.is_superframe() {
            let mut write = run.parts(&head, &frames[i..]).collect::<Vec<_>>().concat();
            let Ok(Received::Split(plan)) = classify(&mut write, out.len()) else {
                panic!("the superframe of {run:?} does not split");
            };
            assert_eq!(plan.segments(), run.frames, "{run:?}");
            for (k, f) in frames[i..i + run.frames].iter().enumerate() {
                let n = plan.write_segment(&write[VNET_HDR_LEN..], k, out);
                assert_eq!(&out[..n], &f[..], "segment {k} of {run:?}");
            }
        }
        i += run.frames;
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((mtu, input)) = data.split_first_chunk::<2>() else {
        return;
    };
    let max_frame = usize::from(u16::from_le_bytes(*mtu)) + ETH_HDR;
    let mut read = input.to_vec();
    let Ok(got) = classify(&mut read, max_frame) else {
        return;
    };
    // classify succeeded, so the header parsed.
    let hdr = VnetHdr::parse(input).unwrap();
    let before = &input[VNET_HDR_LEN..];
    let frame = &read[VNET_HDR_LEN..];
    let plan = match got {
        Received::Frame => {
            let at = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset);
            let field = if hdr.flags & F_NEEDS_CSUM != 0 {
                at..at + 2
            } else {
                0..0
            };
            for (i, (a, b)) in before.iter().zip(frame).enumerate() {
                assert!(
                    a == b || field.contains(&i),
                    "byte {i} of a plain frame changed"
                );
            }
            return;
        }
        Received::Split(plan) => plan,
    };
    // Every segment is written into a buffer far larger than allowed, so the size limit is
    // the plan's, not the buffer's.
    let mut out = vec![0u8; 2 * usize::from(u16::MAX)];
    let segments: Vec<Vec<u8>> = (0..plan.segments())
        .map(|i| {
            let n = plan.write_segment(frame, i, &mut out);
            assert!(n > 0, "segment {i} of {plan:?} not written");
            assert!(n <= max_frame, "segment {i} of {plan:?}: {n} > {max_frame}");
            out[..n].to_vec()
        })
        .collect();
    assert_eq!(plan.write_segment(frame, plan.segments(), &mut out), 0);
    if let [only] = &segments[..] {
        assert_eq!(
            only.len(),
            frame.len(),
            "a single segment is the whole frame"
        );
        return;
    }
    // All segments but the last carry `gso_size` payload bytes behind the same headers.
    let mss = usize::from(hdr.gso_size);
    let headers = segments[0].len() - mss;
    let (last, full) = segments.split_last().unwrap();
    assert!(full.iter().all(|s| s.len() == headers + mss));
    assert!(last.len() > headers && last.len() <= headers + mss);
    let payload: Vec<u8> = segments
        .iter()
        .flat_map(|s| &s[headers..])
        .copied()
        .collect();
    assert_eq!(
        payload,
        frame[headers..],
        "segments' payload differs from the superframe's"
    );
    round_trip(&segments, &mut out);
});
