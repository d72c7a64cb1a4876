#![no_main]
//! TAP offload handling never panics on any virtio-net header, frame and MTU; a plain frame
//! changes at most in its checksum field; a superframe's segments each fit the MTU plus the
//! Ethernet header and carry, in order, exactly the superframe's TCP payload.

use flatwire_agent::offload::{F_NEEDS_CSUM, Received, VNET_HDR_LEN, VnetHdr, classify};
use libfuzzer_sys::fuzz_target;

/// Ethernet header bytes on top of the MTU.
const ETH_HDR: usize = 14;

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
});
