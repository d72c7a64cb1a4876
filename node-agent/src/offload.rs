//! TAP offloads, pure: the `virtio_net_hdr` that prefixes every frame on a TAP opened with
//! `IFF_VNET_HDR`, completion of partial checksums (`VIRTIO_NET_HDR_F_NEEDS_CSUM`) and the
//! segmentation of TCP superframes (TSO, `VIRTIO_NET_HDR_GSO_TCPV4`/`TCPV6`) into frames of
//! at most the link MTU, as a NIC would do it; and the reverse for frames written to a TAP:
//! runs of consecutive TCP segments of one flow merge into one superframe ([`coalesce`],
//! receive-side GRO), so the kernel takes one write instead of one per segment.
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
const TCP_ACK: u8 = 0x10;
const TCP_CWR: u8 = 0x80;
/// Offset of the checksum field in the TCP header.
const TCP_CHECKSUM_AT: usize = 16;

/// Most TCP segments [`coalesce`] merges into one superframe.
pub const MAX_SEGMENTS: usize = 64;
/// Most bytes of a superframe's head ([`coalesce`]): the virtio header, an Ethernet header
/// with one VLAN tag, an IPv6 header and a TCP header with the most options.
pub const HEAD_MAX: usize = VNET_HDR_LEN + ETH_HDR + 4 + 40 + 60;

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

/// A TCP segment [`coalesce`] may merge: where its parts are and the fields that vary
/// along a run. Checksums are not looked at yet ([`Segment::checksums_valid`]).
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// Offset of the IP header.
    l3: usize,
    /// Offset of the TCP header.
    l4: usize,
    /// Length of all headers: where the payload starts.
    hdr: usize,
    v6: bool,
    seq: u32,
    /// The IPv4 ID (0 for IPv6).
    id: u16,
    flags: u8,
    /// Payload bytes (at least one).
    payload: usize,
}

impl Segment {
    /// Parses `f` as a plain TCP segment that can join a superframe: Ethernet (one VLAN tag at
    /// most), IPv4 without options or fragmentation or IPv6 without extension headers, whose
    /// length is the frame's, flags ACK or ACK|PSH, and a payload.
    fn parse(f: &[u8]) -> Option<Self> {
        let be16 = |at: usize| f.get(at..at + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
        let mut l3 = ETH_HDR;
        let mut ethertype = be16(12)?;
        if ethertype == ETHERTYPE_VLAN {
            l3 += 4;
            ethertype = be16(16)?;
        }
        let ip = f.get(l3..)?;
        let (v6, l4, id) = match ethertype {
            ETHERTYPE_IPV4
                if ip.len() >= 20
                    && ip[0] == 0x45
                    && ip[9] == IPPROTO_TCP
                    && be16(l3 + 6)? & 0x3fff == 0
                    && usize::from(be16(l3 + 2)?) == ip.len() =>
            {
                (false, l3 + 20, be16(l3 + 4)?)
            }
            ETHERTYPE_IPV6
                if ip.len() >= 40
                    && ip[0] >> 4 == 6
                    && ip[6] == IPPROTO_TCP
                    && usize::from(be16(l3 + 4)?) + 40 == ip.len() =>
            {
                (true, l3 + 40, 0)
            }
            _ => return None,
        };
        let tcp = f.get(l4..l4 + 20)?;
        let doff = usize::from(tcp[12] >> 4) * 4;
        let flags = tcp[13];
        let hdr = l4 + doff;
        if doff < 20 || hdr >= f.len() || (flags != TCP_ACK && flags != TCP_ACK | TCP_PSH) {
            return None;
        }
        Some(Self {
            l3,
            l4,
            hdr,
            v6,
            seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
            id,
            flags,
            payload: f.len() - hdr,
        })
    }

    /// True when the IPv4 header checksum and the TCP checksum of `f` (the frame parsed) are
    /// valid and as computed: a field of `0xffff`, which verifies too but is never computed,
    /// is not, so that splitting the superframe again gives the same bytes back.
    fn checksums_valid(&self, f: &[u8]) -> bool {
        let ok = |valid: bool, field: &[u8]| valid && field != [0xff, 0xff];
        let (l3, l4) = (self.l3, self.l4);
        (self.v6 || ok(verifies(0, &f[l3..l4]), &f[l3 + 10..l3 + 12]))
            && ok(
                verifies(pseudo_header(&f[l3..], f.len() - l4), &f[l4..]),
                &f[l4 + TCP_CHECKSUM_AT..l4 + TCP_CHECKSUM_AT + 2],
            )
    }

    /// True when the headers of `a` and `b` (both parsed as `self`'s shape) are the same
    /// except where the segments of one superframe differ: IP length, IPv4 ID and header
    /// checksum, TCP sequence number, flags and checksum.
    fn same_headers(&self, a: &[u8], b: &[u8]) -> bool {
        let same = |at: usize, ranges: &[(usize, usize)]| {
            ranges
                .iter()
                .all(|&(x, y)| a[at + x..at + y] == b[at + x..at + y])
        };
        let ip: &[(usize, usize)] = if self.v6 {
            &[(0, 4), (6, 40)]
        } else {
            &[(0, 2), (6, 10), (12, 20)]
        };
        a[..self.l3] == b[..self.l3]
            && same(self.l3, ip)
            && same(
                self.l4,
                &[(0, 4), (8, 13), (14, 16), (18, self.hdr - self.l4)],
            )
    }
}

/// A run of frames from [`coalesce`]: one frame to write as it is, or a superframe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Frames in the run, from the first one given (0 only when none was).
    pub frames: usize,
    /// Bytes of the superframe's head (virtio header and the headers of the first segment,
    /// fixed up); 0 for a single frame, which goes out behind an empty virtio header.
    pub head_len: usize,
    /// Where the TCP payload starts in each frame of a superframe.
    pub payload_at: usize,
}

impl Run {
    /// True when the run is a superframe (more than one frame merged).
    pub fn is_superframe(&self) -> bool {
        self.head_len > 0
    }

    /// The superframe's pieces in order, to be written as one: `head[..head_len]` (virtio
    /// header included), then the payload of each merged frame of `frames` (the slice the run
    /// was made from). Empty for a single frame.
    pub fn parts<'a, F: AsRef<[u8]>>(
        &self,
        head: &'a [u8],
        frames: &'a [F],
    ) -> impl Iterator<Item = &'a [u8]> + 'a {
        let (n, at) = if self.is_superframe() {
            (self.frames, self.payload_at)
        } else {
            (0, 0)
        };
        let head = head.get(..self.head_len).unwrap_or_default();
        std::iter::once(head).filter(|h| !h.is_empty()).chain(
            frames
                .iter()
                .take(n)
                .map(move |f| f.as_ref().get(at..).unwrap_or_default()),
        )
    }
}

/// Finds the run at the start of `frames` (consecutive frames for one TAP, in order) and, if
/// it is a superframe, writes its head into `head`: the longest run of TCP segments of one
/// flow (same Ethernet, IP and TCP headers but for length, IPv4 ID, sequence number, flags
/// and checksums; IPv4 IDs and sequence numbers contiguous; flags ACK, PSH on the last only;
/// every segment but the last of the first one's payload size; valid checksums; at most
/// [`MAX_SEGMENTS`] and an IP length of 64 KiB). A frame that merges with none makes a run
/// of one. The superframe carries the first segment's headers with the IP length (and IPv4
/// header checksum) fixed, the last segment's flags, the pseudo-header sum in the TCP
/// checksum field and a virtio header asking for checksum completion and TCP segmentation
/// at the segments' payload size, as the kernel expects of a `CHECKSUM_PARTIAL` GSO frame.
/// Checksums are verified first: a segment that fails is never merged, so its write still
/// fails the kernel's check.
pub fn coalesce<F: AsRef<[u8]>>(frames: &[F], head: &mut [u8; HEAD_MAX]) -> Run {
    let single = Run {
        frames: frames.len().min(1),
        head_len: 0,
        payload_at: 0,
    };
    let Some(f0) = frames.first().map(AsRef::as_ref) else {
        return single;
    };
    let Some(s0) = Segment::parse(f0).filter(|s| s.flags == TCP_ACK) else {
        return single;
    };
    let mss = s0.payload;
    let (mut n, mut ip_len, mut last) = (1, f0.len() - s0.l3, s0);
    for f in frames[1..].iter().take(MAX_SEGMENTS - 1).map(AsRef::as_ref) {
        let Some(s) = Segment::parse(f) else { break };
        let k = n as u32;
        let fits = last.payload == mss
            && last.flags == TCP_ACK
            && s.v6 == s0.v6
            && s.l3 == s0.l3
            && s.hdr == s0.hdr
            && s.payload <= mss
            && s.seq == s0.seq.wrapping_add(k * mss as u32)
            && (s0.v6 || s.id == s0.id.wrapping_add(k as u16))
            && ip_len + s.payload <= usize::from(u16::MAX)
            && s0.same_headers(f0, f);
        if !fits {
            break;
        }
        if n == 1 && !s0.checksums_valid(f0) {
            return single;
        }
        if !s.checksums_valid(f) {
            break;
        }
        n += 1;
        ip_len += s.payload;
        last = s;
    }
    if n == 1 {
        return single;
    }
    let (l3, l4) = (s0.l3, s0.l4);
    let head_len = VNET_HDR_LEN + s0.hdr;
    let vnet = VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if s0.v6 { GSO_TCPV6 } else { GSO_TCPV4 },
        hdr_len: s0.hdr as u16,
        gso_size: mss as u16,
        csum_start: l4 as u16,
        csum_offset: TCP_CHECKSUM_AT as u16,
    };
    head[..VNET_HDR_LEN].copy_from_slice(&vnet.encode());
    let out = &mut head[VNET_HDR_LEN..head_len];
    out.copy_from_slice(&f0[..s0.hdr]);
    if s0.v6 {
        out[l3 + 4..l3 + 6].copy_from_slice(&((ip_len - 40) as u16).to_be_bytes());
    } else {
        out[l3 + 2..l3 + 4].copy_from_slice(&(ip_len as u16).to_be_bytes());
        out[l3 + 10..l3 + 12].fill(0);
        let c = checksum(0, &out[l3..l4]);
        out[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
    }
    out[l4 + 13] = last.flags;
    let pseudo = fold(pseudo_header(&out[l3..], ip_len - (l4 - l3)));
    out[l4 + TCP_CHECKSUM_AT..l4 + TCP_CHECKSUM_AT + 2].copy_from_slice(&pseudo.to_be_bytes());
    Run {
        frames: n,
        head_len,
        payload_at: s0.hdr,
    }
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

    /// Recomputes the IPv4 header and TCP checksums of a frame made by [`tcp_frame`] (and
    /// changed since) with IP header `l3` (14, or 18 behind a VLAN tag).
    fn refresh(f: &mut [u8], v6: bool, l3: usize) {
        let l4 = l3 + if v6 { 40 } else { 20 };
        if !v6 {
            f[l3 + 10..l3 + 12].fill(0);
            let c = checksum(0, &f[l3..l4]);
            f[l3 + 10..l3 + 12].copy_from_slice(&c.to_be_bytes());
        }
        f[l4 + 16..l4 + 18].fill(0);
        let c = checksum(pseudo_header(&f[l3..], f.len() - l4), &f[l4..]);
        f[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
    }

    /// Consecutive segments of one flow with payloads of `sizes` (of one payload stream),
    /// IPv4 IDs from `id`, sequence numbers from `seq`, flags ACK but `last_flags` on the last.
    fn segments(v6: bool, id: u16, seq: u32, sizes: &[usize], last_flags: u8) -> Vec<Vec<u8>> {
        let data = payload(sizes.iter().sum());
        let mut off = 0;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let flags = if i + 1 == sizes.len() {
                    last_flags
                } else {
                    TCP_ACK
                };
                let seq = seq.wrapping_add(off as u32);
                let f = tcp_frame(
                    v6,
                    id.wrapping_add(i as u16),
                    seq,
                    flags,
                    &data[off..off + n],
                );
                off += n;
                f
            })
            .collect()
    }

    /// What the TAP gets for `frames`, run by run: the run's length and the write (a
    /// superframe, or the frame behind an empty virtio header).
    fn writes(frames: &[Vec<u8>]) -> Vec<(usize, Vec<u8>)> {
        let mut head = [0u8; HEAD_MAX];
        let mut out = Vec::new();
        let mut i = 0;
        while i < frames.len() {
            let run = coalesce(&frames[i..], &mut head);
            assert!(run.frames >= 1 && i + run.frames <= frames.len(), "{run:?}");
            let write = if run.is_superframe() {
                assert!(run.frames > 1 && run.frames <= MAX_SEGMENTS, "{run:?}");
                run.parts(&head, &frames[i..]).collect::<Vec<_>>().concat()
            } else {
                assert_eq!(run.frames, 1);
                assert_eq!(run.parts(&head, &frames[i..]).count(), 0);
                [&VnetHdr::default().encode()[..], &frames[i]].concat()
            };
            out.push((run.frames, write));
            i += run.frames;
        }
        out
    }

    /// Coalesces `frames`, checks that splitting each write gives exactly them back (as the
    /// kernel would segment it), and returns the run lengths.
    fn round_trip(frames: &[Vec<u8>]) -> Vec<usize> {
        let mut back = Vec::new();
        let mut runs = Vec::new();
        for (n, mut write) in writes(frames) {
            let got = split(&mut write, READ_MAX).unwrap();
            assert_eq!(got.len(), n, "segments of a run of {n}");
            back.extend(got);
            runs.push(n);
        }
        assert!(
            back == frames,
            "coalescing and splitting changed the frames"
        );
        runs
    }

    /// A `max_frame` that any superframe's segments fit.
    const READ_MAX: usize = 70_000;

    #[test]
    fn tcp_segments_coalesce_into_the_expected_superframe() {
        for v6 in [false, true] {
            // IPv4 IDs and sequence numbers wrap; PSH on the last segment goes on the
            // superframe.
            let segs = segments(
                v6,
                0xfffe,
                0xffff_fc00,
                &[1000, 1000, 500],
                TCP_ACK | TCP_PSH,
            );
            let l4: u16 = if v6 { 54 } else { 34 };
            let hdr = VnetHdr {
                flags: F_NEEDS_CSUM,
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                hdr_len: l4 + 32,
                gso_size: 1000,
                csum_start: l4,
                csum_offset: 16,
            };
            let whole = tcp_frame(v6, 0xfffe, 0xffff_fc00, TCP_ACK | TCP_PSH, &payload(2500));
            let expected = partial(whole.clone(), hdr);
            let mut got = writes(&segs);
            assert_eq!(got, vec![(3, expected)], "v6: {v6}");
            // The kernel completes the partial checksum into the whole frame's.
            complete_checksum(&hdr, &mut got[0].1[VNET_HDR_LEN..]).unwrap();
            assert_eq!(got[0].1[VNET_HDR_LEN..], whole[..]);
            assert_eq!(round_trip(&segs), [3]);
        }
    }

    #[test]
    fn only_matching_segments_coalesce() {
        let base = || segments(false, 7, 1000, &[1000; 4], TCP_ACK);
        let changed = |i: usize, change: &dyn Fn(&mut Vec<u8>)| {
            let mut f = base();
            change(&mut f[i]);
            round_trip(&f)
        };
        let refreshed = |i: usize, change: &dyn Fn(&mut Vec<u8>)| {
            changed(i, &|f| {
                change(f);
                refresh(f, false, 14);
            })
        };
        assert_eq!(round_trip(&base()), [4]);
        // A gap in the sequence numbers.
        assert_eq!(refreshed(2, &|f| f[41] ^= 1), [2, 1, 1]);
        // Another flow (source port), twice in a row: two runs.
        let mut f = base();
        for g in &mut f[2..] {
            g[34] ^= 1;
            refresh(g, false, 14);
        }
        assert_eq!(round_trip(&f), [2, 2]);
        // Another Ethernet destination, TTL, DF, ACK number, window.
        for at in [0, 22, 20, 45, 49] {
            assert_eq!(refreshed(2, &|f| f[at] ^= 0x40), [2, 1, 1], "byte {at}");
        }
        // IPv4 IDs not contiguous.
        assert_eq!(refreshed(2, &|f| f[19] ^= 4), [2, 1, 1]);
        // PSH ends a run, SYN, FIN, RST, URG, ECE and CWR keep a segment out of any.
        assert_eq!(refreshed(1, &|f| f[47] |= TCP_PSH), [2, 2]);
        for flag in [0x02, TCP_FIN, 0x04, 0x20, 0x40, TCP_CWR] {
            assert_eq!(
                refreshed(1, &|f| f[47] |= flag),
                [1, 1, 2],
                "flag {flag:#x}"
            );
            assert_eq!(refreshed(0, &|f| f[47] |= flag), [1, 3], "flag {flag:#x}");
        }
        // Bad TCP or IPv4 header checksums: such a segment is written as it came.
        assert_eq!(changed(2, &|f| f[80] ^= 1), [2, 1, 1]);
        assert_eq!(changed(0, &|f| f[80] ^= 1), [1, 3]);
        assert_eq!(changed(1, &|f| f[24] ^= 1), [1, 1, 2]);
        // Differing TCP options (the timestamp).
        assert_eq!(refreshed(2, &|f| f[61] ^= 1), [2, 1, 1]);
        // A fragment (MF) and a cut frame are not merged.
        assert_eq!(refreshed(3, &|f| f[20] |= 0x20), [3, 1]);
        assert_eq!(changed(3, &|f| f.truncate(1000)), [3, 1]);
        // Payload sizes: all but the last as large as the first's.
        let sized = |sizes: &[usize]| round_trip(&segments(true, 0, 1, sizes, TCP_ACK));
        assert_eq!(sized(&[1000, 500, 1000]), [2, 1]);
        assert_eq!(sized(&[1000, 1000, 1200]), [2, 1]);
        assert_eq!(sized(&[1000, 1000, 1]), [3]);
        // A pure ACK (no payload) is not merged.
        assert_eq!(sized(&[1000, 1000, 0, 1000]), [2, 1, 1]);
        // At most 64 KiB of IP packet (46 segments of 1,400 bytes behind 52 bytes of IPv4
        // and TCP headers) and at most MAX_SEGMENTS segments.
        let big = round_trip(&segments(false, 0, 0, &[1400; 50], TCP_ACK));
        assert_eq!(big, [46, 4]);
        let many = round_trip(&segments(false, 0, 0, &[10; 70], TCP_ACK));
        assert_eq!(many, [MAX_SEGMENTS, 70 - MAX_SEGMENTS]);
        // One VLAN tag is fine.
        let mut f = base();
        for g in &mut f {
            g.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
        }
        assert_eq!(round_trip(&f), [4]);
    }

    /// A xorshift64 generator from `seed` (not zero): reproducible random input.
    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Random streams of segments of a few flows, with gaps, odd sizes and flags, corrupted,
    /// cut and re-checksummed frames: coalescing never panics, splitting every write gives
    /// exactly the frames back, and runs do merge.
    #[test]
    fn random_streams_round_trip() {
        let mut rnd = xorshift(0x2545_f491_4f6c_dd1du64);
        // (IPv6, VLAN tag, next IPv4 ID, next sequence number) of each flow.
        let mut flows = [
            (false, false, 1u16, 1u32),
            (true, false, 0, 7),
            (false, true, 9, 3),
        ];
        let data = payload(2000);
        let (mut frames_total, mut runs_total, mut merged_max) = (0, 0, 0);
        for _ in 0..300 {
            let mut frames = Vec::new();
            let mut flow = 0;
            let mss = [1000, 1448, 100][rnd() as usize % 3];
            for _ in 0..rnd() % 120 {
                if rnd().is_multiple_of(16) {
                    flow = rnd() as usize % flows.len();
                }
                let (v6, vlan, id, seq) = &mut flows[flow];
                let len = if rnd().is_multiple_of(16) {
                    rnd() as usize % (mss + 2)
                } else {
                    mss
                };
                let flags = match rnd() % 32 {
                    0 => rnd() as u8,
                    1 | 2 => TCP_ACK | TCP_PSH,
                    _ => TCP_ACK,
                };
                let mut f = tcp_frame(*v6, *id, *seq, flags, &data[..len]);
                f[34 + if *v6 { 20 } else { 0 }] = flow as u8;
                let l3 = if *vlan { 18 } else { 14 };
                if *vlan {
                    f.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
                }
                refresh(&mut f, *v6, l3);
                *id = id.wrapping_add(1);
                if !rnd().is_multiple_of(32) {
                    *seq = seq.wrapping_add(len as u32);
                }
                match rnd() % 64 {
                    0..2 => {
                        let at = rnd() as usize % f.len().min(100);
                        f[at] = rnd() as u8;
                    }
                    2..4 => {
                        let at = rnd() as usize % f.len().min(100);
                        f[at] = rnd() as u8;
                        if f.len() >= l3 + 60 {
                            refresh(&mut f, *v6, l3);
                        }
                    }
                    4 => f.truncate(rnd() as usize % f.len()),
                    _ => {}
                }
                frames.push(f);
            }
            let runs = round_trip(&frames);
            frames_total += frames.len();
            runs_total += runs.len();
            merged_max = merged_max.max(runs.iter().copied().max().unwrap_or(0));
        }
        assert!(
            runs_total * 2 < frames_total && merged_max > 16,
            "{frames_total} frames in {runs_total} runs, longest {merged_max}"
        );
    }

    /// Random and cut headers and frames never panic: each read is a frame, a split whose
    /// segments fit, or a drop with a reason.
    #[test]
    fn random_input_never_panics() {
        let mut rnd = xorshift(0x9e37_79b9_7f4a_7c15u64);
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
