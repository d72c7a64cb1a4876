//! TAP offloads, pure: the `virtio_net_hdr` that prefixes every frame on a TAP opened with
//! `IFF_VNET_HDR`, completion of partial checksums (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) and the
//! segmentation of TCP superframes (TSO, `VIRTIO_NET_HDR_GSO_TCPV4`/`TCPV6`) into frames of
//! at most the link MTU, as a NIC would do it.
//!
//! Everything here works on caller-owned buffers and never panics on any input: what the
//! kernel hands over is checked once ([`Plan::new`]), and a frame that does not add up is
//! dropped with an [`OffloadDrop`] reason for the caller to count. [`crate::tap`] does the
//! I/O.

/// Bytes of the `virtio_net_hdr` (without `num_buffers`) the TAPs are configured for.
pub const VNET_HDR_LEN: usize = 10;
/// `flags`: the checksum from `csum_start` on is partial and must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// `gso_type`: not a superframe.
pub const GSO_NONE: u8 = 0;
/// `gso_type`: IPv4 TCP superframe.
pub const GSO_TCPV4: u8 = 1;
/// `gso_type`: IPv6 TCP superframe.
pub const GSO_TCPV6: u8 = 4;
/// `gso_type` bit: the superframe carries the ECN CWR flag (set on the first segment only).
pub const GSO_ECN: u8 = 0x80;

const ETH_HDR: usize = 14;
const ETHERTYPE_VLAN: u16 = 0x8100;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const IPPROTO_TCP: u8 = 6;
const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Why a frame read from a TAP was dropped before it reached VL2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OffloadDrop {
    /// Shorter than the virtio-net header.
    ShortVnetHeader,
    /// The partial checksum's `csum_start`/`csum_offset` point outside the frame.
    BadChecksumOffsets,
    /// A `gso_type` this agent did not enable (or garbage).
    UnsupportedGso,
    /// A superframe whose Ethernet/IP/TCP headers do not parse (or are not plain TCP).
    BadGsoHeaders,
    /// A superframe with `gso_size` 0 or segments larger than the receive buffers.
    BadGsoSize,
}

impl OffloadDrop {
    /// Every reason, for counters; a reason's index is `reason as usize`.
    pub const ALL: [Self; 5] = [
        Self::ShortVnetHeader,
        Self::BadChecksumOffsets,
        Self::UnsupportedGso,
        Self::BadGsoHeaders,
        Self::BadGsoSize,
    ];

    /// The reason's name as the metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Self::ShortVnetHeader => "TapShortVnetHeader",
            Self::BadChecksumOffsets => "TapBadChecksumOffsets",
            Self::UnsupportedGso => "TapUnsupportedGso",
            Self::BadGsoHeaders => "TapBadGsoHeaders",
            Self::BadGsoSize => "TapBadGsoSize",
        }
    }
}

/// A `virtio_net_hdr` in host byte order (the TAP's legacy header is native-endian).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `F_*` bits.
    pub flags: u8,
    /// `GSO_*` type, possibly with [`GSO_ECN`].
    pub gso_type: u8,
    /// Header length hint (not relied upon: the headers are parsed).
    pub hdr_len: u16,
    /// Payload bytes per segment (the MSS).
    pub gso_size: u16,
    /// Where the partial checksum starts.
    pub csum_start: u16,
    /// Where, from `csum_start`, the checksum field is.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the header at the start of `b`; `None` when `b` is too short.
    pub fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; VNET_HDR_LEN] = b.get(..VNET_HDR_LEN)?.try_into().ok()?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_ne_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_ne_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_ne_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_ne_bytes());
        b
    }
}

/// Adds `data` to a running ones' complement sum (big-endian 16-bit words; an odd last byte
/// is padded with zero). Sum 32-bit words into 64 bits: equivalent after folding, fewer steps.
fn sum(mut acc: u64, data: &[u8]) -> u64 {
    let mut words = data.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    let mut tail = [0u8; 4];
    tail[..rest.len()].copy_from_slice(rest);
    acc + u64::from(u32::from_be_bytes(tail))
}

/// Folds a sum to 16 bits (not complemented).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `data` on top of `acc`: the value to store in a checksum field.
fn checksum(acc: u64, data: &[u8]) -> u16 {
    !fold(sum(acc, data))
}

/// True when `data` (a header or an L4 segment with `pseudo` added) checksums to zero, as a
/// receiver verifies it.
pub fn verifies(pseudo: u64, data: &[u8]) -> bool {
    fold(sum(pseudo, data)) == 0xffff
}

/// The TCP/UDP pseudo-header sum of the IP header at `ip` for an L4 length of `l4_len`.
pub fn pseudo_header(ip: &[u8], l4_len: usize) -> u64 {
    let (addrs, proto) = match ip.first().map(|v| v >> 4) {
        Some(4) if ip.len() >= 20 => (&ip[12..20], ip[9]),
        Some(6) if ip.len() >= 40 => (&ip[8..40], ip[6]),
        _ => return 0,
    };
    sum(u64::from(proto) + l4_len as u64, addrs)
}

/// Completes the partial checksum of `frame` (`hdr` has [`F_NEEDS_CSUM`]): the field at
/// `csum_start + csum_offset` holds the pseudo-header sum, the sum from `csum_start` to the
/// end goes in its place.
pub fn complete_checksum(hdr: &VnetHdr, frame: &mut [u8]) -> Result<(), OffloadDrop> {
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > frame.len() {
        return Err(OffloadDrop::BadChecksumOffsets);
    }
    let mut c = checksum(0, &frame[start..]);
    if c == 0 {
        // Equal in ones' complement, and what UDP requires (0 means "no checksum" there).
        c = 0xffff;
    }
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Where the headers of a TCP superframe are and how it splits (from [`Plan::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header.
    l4: usize,
    /// Length of all headers (Ethernet, IP, TCP with options).
    hdr: usize,
    /// Payload bytes per segment.
    mss: usize,
    /// Segments in total.
    segments: usize,
    /// IPv6 (else IPv4).
    v6: bool,
}

impl Plan {
    /// Checks the superframe `frame` (without its virtio header) described by `hdr` (a TCP
    /// `gso_type`) and plans its split into segments of at most `max_frame` bytes.
    pub fn new(hdr: &VnetHdr, frame: &[u8], max_frame: usize) -> Result<Self, OffloadDrop> {
        let v6 = match hdr.gso_type & !GSO_ECN {
            GSO_TCPV4 => false,
            GSO_TCPV6 => true,
            _ => return Err(OffloadDrop::UnsupportedGso),
        };
        let be16 = |at: usize| {
            frame
                .get(at..at + 2)
                .map(|b| u16::from_be_bytes([b[0], b[1]]))
                .ok_or(OffloadDrop::BadGsoHeaders)
        };
        let mut l3 = ETH_HDR;
        let mut ethertype = be16(12)?;
        if ethertype == ETHERTYPE_VLAN {
            l3 += 4;
            ethertype = be16(16)?;
        }
        let ip = frame.get(l3..).ok_or(OffloadDrop::BadGsoHeaders)?;
        let l4 = match (v6, ethertype) {
            (false, ETHERTYPE_IPV4) => {
                let ihl = usize::from(ip.first().map_or(0, |b| b & 0x0f)) * 4;
                let frag = be16(l3 + 6)? & 0x3fff;
                if ip.len() < 20 || ip[0] >> 4 != 4 || ihl < 20 || ip[9] != IPPROTO_TCP || frag != 0
                {
                    return Err(OffloadDrop::BadGsoHeaders);
                }
                l3 + ihl
            }
            (true, ETHERTYPE_IPV6) => {
                if ip.len() < 40 || ip[0] >> 4 != 6 || ip[6] != IPPROTO_TCP {
                    return Err(OffloadDrop::BadGsoHeaders);
                }
                l3 + 40
            }
            _ => return Err(OffloadDrop::BadGsoHeaders),
        };
        let doff = frame.get(l4 + 12).map_or(0, |b| usize::from(b >> 4) * 4);
        let hdr_end = l4 + doff;
        if doff < 20 || hdr_end > frame.len() {
            return Err(OffloadDrop::BadGsoHeaders);
        }
        let mss = usize::from(hdr.gso_size);
        if mss == 0 || hdr_end + mss > max_frame {
            return Err(OffloadDrop::BadGsoSize);
        }
        let payload = frame.len() - hdr_end;
        Ok(Self {
            l3,
            l4,
            hdr: hdr_end,
            mss,
            segments: payload.div_ceil(mss).max(1),
            v6,
        })
    }

    /// How many segments the superframe makes.
    pub fn segments(&self) -> usize {
        self.segments
    }

    /// Writes segment `i` (< [`Plan::segments`]) of the superframe `frame` (the one the plan
    /// was made for, unchanged) into `out` with its IP length, IPv4 ID and header checksum,
    /// TCP sequence number, flags and checksum; returns its length (0 if `i` or `out` does not
    /// fit the plan).
    pub fn write_segment(&self, frame: &[u8], i: usize, out: &mut [u8]) -> usize {
        let start = self.hdr + i * self.mss;
        if i >= self.segments || start > frame.len() {
            return 0;
        }
        let payload = &frame[start..frame.len().min(start + self.mss)];
        let len = self.hdr + payload.len();
        let Some(out) = out.get_mut(..len) else {
            return 0;
        };
        out[..self.hdr].copy_from_slice(&frame[..self.hdr]);
        out[self.hdr..].copy_from_slice(payload);
        let l4_len = len - self.l4;
        let ip_len = len - self.l3;
        let l3 = self.l3;
        if self.v6 {
            let pl = (ip_len - 40) as u16;
            out[l3 + 4..l3 + 6].copy_from_slice(&pl.to_be_bytes());
        } else {
            out[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
            let id = u16::from_be_bytes([out[l3 + 4], out[l3 + 5]]).wrapping_add(i as u16);
            out[l3 + 4..l3 + 6].copy_from_slice(&id.to_be_bytes());
            out[l3 + 10..l3 + 12].fill(0);
            let c = checksum(0, &out[l3..self.l4]);
            out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        let t = self.l4;
        let seq = u32::from_be_bytes([out[t + 4], out[t + 5], out[t + 6], out[t + 7]])
            .wrapping_add((i * self.mss) as u32);
        out[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        if i > 0 {
            out[t + 13] &= !TCP_CWR;
        }
        if i + 1 < self.segments {
            out[t + 13] &= !(TCP_FIN | TCP_PSH);
        }
        out[t + 16..t + 18].fill(0);
        let c = checksum(pseudo_header(&out[l3..], l4_len), &out[t..]);
        out[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        len
    }
}

/// What to do with a frame read from a TAP (after [`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Received {
    /// A plain frame, checksum completed if it was partial: pass it on as it is.
    Frame,
    /// A superframe: pass on its segments.
    Split(Plan),
}

/// Looks at one read from a TAP (`read`: virtio header and frame) and makes the frame ready
/// for VL2: completes a partial checksum in place or plans a split into frames of at most
/// `max_frame` bytes. The frame is `read[VNET_HDR_LEN..]`.
pub fn classify(read: &mut [u8], max_frame: usize) -> Result<Received, OffloadDrop> {
    let hdr = VnetHdr::parse(read).ok_or(OffloadDrop::ShortVnetHeader)?;
    let frame = &mut read[VNET_HDR_LEN..];
    if hdr.gso_type == GSO_NONE {
        if hdr.flags & F_NEEDS_CSUM != 0 {
            complete_checksum(&hdr, frame)?;
        }
        return Ok(Received::Frame);
    }
    // Each segment's checksums are computed whole: the partial one needs no completion.
    Plan::new(&hdr, frame, max_frame).map(Received::Split)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

    /// A TCP segment (Ethernet, IP, TCP with a 12-byte option block) with correct checksums.
    fn tcp_frame(v6: bool, id: u16, seq: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAC_B);
        f.extend_from_slice(&MAC_A);
        let tcp_len = 32 + payload.len();
        if v6 {
            f.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            f.extend_from_slice(&[0x60, 0, 0, 0]);
            f.extend_from_slice(&(tcp_len as u16).to_be_bytes());
            f.extend_from_slice(&[IPPROTO_TCP, 64]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            f.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            f.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            f.extend_from_slice(&[0x45, 0]);
            f.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&[0x40, 0, 64, IPPROTO_TCP, 0, 0]);
            f.extend_from_slice(&[198, 18, 0, 1, 198, 18, 0, 2]);
            let c = checksum(0, &f[14..34]);
            f[24..26].copy_from_slice(&c.to_be_bytes());
        }
        let t = f.len();
        f.extend_from_slice(&40000u16.to_be_bytes());
        f.extend_from_slice(&5201u16.to_be_bytes());
        f.extend_from_slice(&seq.to_be_bytes());
        f.extend_from_slice(&7u32.to_be_bytes());
        f.extend_from_slice(&[0x80, flags, 0x01, 0xf5, 0, 0, 0, 0]);
        f.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 9, 0, 0, 0, 3]);
        f.extend_from_slice(payload);
        let c = checksum(pseudo_header(&f[14..], tcp_len), &f[t..]);
        f[t + 16..t + 18].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// What the kernel hands over: the checksum field holds the pseudo-header sum only.
    fn partial(mut f: Vec<u8>, hdr: VnetHdr) -> Vec<u8> {
        let t = usize::from(hdr.csum_start);
        let pseudo = fold(pseudo_header(&f[14..], f.len() - t));
        f[t + 16..t + 18].copy_from_slice(&pseudo.to_be_bytes());
        let mut read = hdr.encode().to_vec();
        read.extend_from_slice(&f);
        read
    }

    fn split(read: &mut [u8], max: usize) -> Result<Vec<Vec<u8>>, OffloadDrop> {
        match classify(read, max)? {
            Received::Frame => Ok(vec![read[VNET_HDR_LEN..].to_vec()]),
            Received::Split(p) => Ok((0..p.segments())
                .map(|i| {
                    let mut out = vec![0u8; max];
                    let n = p.write_segment(&read[VNET_HDR_LEN..], i, &mut out);
                    assert!(n > 0);
                    out.truncate(n);
                    out
                })
                .collect()),
        }
    }

    fn payload(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    fn check_superframe(v6: bool, gso_type: u8, flags: u8, sizes: &[usize]) {
        let mss = 1000;
        let data = payload(sizes.iter().sum());
        let l4 = if v6 { 54 } else { 34 };
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: (l4 + 32) as u16,
            gso_size: mss as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
        };
        let mut read = partial(tcp_frame(v6, 0xfffe, 0xffff_f000, flags, &data), hdr);
        let got = split(&mut read, 14 + 1500).unwrap();
        let mut expected = Vec::new();
        let mut off = 0;
        for (i, &n) in sizes.iter().enumerate() {
            let last = i + 1 == sizes.len();
            let mut fl = flags;
            if i > 0 {
                fl &= !TCP_CWR;
            }
            if !last {
                fl &= !(TCP_FIN | TCP_PSH);
            }
            let seq = 0xffff_f000u32.wrapping_add(off as u32);
            let id = 0xfffeu16.wrapping_add(i as u16);
            expected.push(tcp_frame(v6, id, seq, fl, &data[off..off + n]));
            off += n;
        }
        assert_eq!(got.len(), expected.len());
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            assert_eq!(g, e, "segment {i}");
            let l4_len = g.len() - l4;
            assert!(
                verifies(pseudo_header(&g[14..], l4_len), &g[l4..]),
                "TCP sum {i}"
            );
            if !v6 {
                assert!(verifies(0, &g[14..34]), "IPv4 header sum {i}");
            }
        }
    }

    #[test]
    fn tcpv4_superframe_splits_into_expected_segments() {
        // PSH|ACK|FIN|CWR: FIN/PSH on the last segment only, CWR on the first only; the IPv4
        // ID and the sequence number wrap.
        let flags = 0x10 | TCP_PSH | TCP_FIN | TCP_CWR;
        check_superframe(false, GSO_TCPV4 | GSO_ECN, flags, &[1000, 1000, 1000, 17]);
        check_superframe(false, GSO_TCPV4, 0x10, &[1000, 1000]);
    }

    #[test]
    fn tcpv6_superframe_splits_into_expected_segments() {
        check_superframe(true, GSO_TCPV6, 0x10 | TCP_PSH, &[1000, 1000, 999]);
        check_superframe(true, GSO_TCPV6, 0x10 | TCP_FIN, &[500]);
    }

    #[test]
    fn partial_checksum_is_completed() {
        for v6 in [false, true] {
            let good = tcp_frame(v6, 9, 1, 0x18, &payload(333));
            let l4: usize = if v6 { 54 } else { 34 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: l4 as u16,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            let mut read = partial(good.clone(), hdr);
            assert_ne!(read[VNET_HDR_LEN..], good[..]);
            assert_eq!(split(&mut read, 1514).unwrap(), vec![good]);
        }
        // Without NEEDS_CSUM the frame passes untouched.
        let f = tcp_frame(false, 1, 1, 0x10, b"x");
        let mut read = VnetHdr::default().encode().to_vec();
        read.extend_from_slice(&f);
        assert_eq!(split(&mut read, 1514).unwrap(), vec![f]);
    }

    #[test]
    fn header_round_trips() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 0x84,
            hdr_len: 66,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        assert_eq!(VnetHdr::parse(&h.encode()), Some(h));
        assert_eq!(VnetHdr::parse(&[0; 9]), None);
    }

    #[test]
    fn bad_input_is_dropped_with_a_reason() {
        let f = tcp_frame(false, 1, 1, 0x10, &payload(3000));
        let with = |hdr: VnetHdr, frame: &[u8]| {
            let mut r = hdr.encode().to_vec();
            r.extend_from_slice(frame);
            classify(&mut r, 1514)
        };
        let tso = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert_eq!(
            classify(&mut [0; 5], 1514),
            Err(OffloadDrop::ShortVnetHeader)
        );
        let far = VnetHdr {
            csum_start: 4000,
            gso_type: 0,
            ..tso
        };
        assert_eq!(with(far, &f), Err(OffloadDrop::BadChecksumOffsets));
        let udp = VnetHdr { gso_type: 5, ..tso };
        assert_eq!(with(udp, &f), Err(OffloadDrop::UnsupportedGso));
        let v6 = VnetHdr {
            gso_type: GSO_TCPV6,
            ..tso
        };
        assert_eq!(with(v6, &f), Err(OffloadDrop::BadGsoHeaders));
        assert_eq!(with(tso, &f[..40]), Err(OffloadDrop::BadGsoHeaders));
        let zero = VnetHdr { gso_size: 0, ..tso };
        assert_eq!(with(zero, &f), Err(OffloadDrop::BadGsoSize));
        let big = VnetHdr {
            gso_size: 1500,
            ..tso
        };
        assert_eq!(with(big, &f), Err(OffloadDrop::BadGsoSize));
    }

    /// Random and cut headers and frames never panic: each read is a frame, a split whose
    /// segments fit, or a drop with a reason.
    #[test]
    fn random_input_never_panics() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let base = [
            tcp_frame(false, 1, 1, 0x19, &payload(4000)),
            tcp_frame(true, 1, 1, 0x19, &payload(4000)),
        ];
        let mut out = vec![0u8; 1514];
        let mut outcomes = [0usize; 3];
        for round in 0..20_000 {
            let f = &base[round % 2];
            let mut read = VnetHdr {
                flags: (rnd() % 4) as u8,
                gso_type: [0, 1, 4, 0x81, 3, 5, rnd() as u8][rnd() as usize % 7],
                hdr_len: rnd() as u16,
                gso_size: [rnd() as u16 % 1600, 1000, 0][rnd() as usize % 3],
                csum_start: [rnd() as u16, 34, 54][rnd() as usize % 3],
                csum_offset: [rnd() as u16, 16, 6][rnd() as usize % 3],
            }
            .encode()
            .to_vec();
            read.extend_from_slice(f);
            // Cut, and flip a few header bytes.
            read.truncate(rnd() as usize % (read.len() + 1));
            for _ in 0..rnd() % 4 {
                if read.len() > VNET_HDR_LEN {
                    let at = VNET_HDR_LEN + rnd() as usize % (read.len() - VNET_HDR_LEN).min(80);
                    read[at] = rnd() as u8;
                }
            }
            match classify(&mut read, out.len()) {
                Ok(Received::Frame) => outcomes[0] += 1,
                Ok(Received::Split(p)) => {
                    outcomes[1] += 1;
                    for i in 0..p.segments() {
                        let n = p.write_segment(&read[VNET_HDR_LEN..], i, &mut out);
                        assert!(n > 0 && n <= out.len(), "segment {i} of {p:?}: {n}");
                    }
                }
                Err(_) => outcomes[2] += 1,
            }
        }
        assert!(outcomes.iter().all(|n| *n > 100), "{outcomes:?}");
    }
}
