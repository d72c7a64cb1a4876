//! VL2 multicast: MULTICAST_LIKE / MULTICAST_GATHER / MULTICAST_FRAME payloads, the
//! FRAME and EXT_FRAME headers, and the per-group member table used for gathering and
//! replication under the multicast limit.

use std::collections::BTreeMap;

use flatwire_vl1::Address;

use crate::codec::{CodecError, Reader};
use crate::credentials::CertificateOfMembership;
use crate::{Mac, MulticastGroup, NetworkId};

/// How long a LIKE is remembered (ms).
pub const LIKE_EXPIRE: i64 = 600_000;
/// Maximum VL1 packet length.
pub const MAX_PACKET: usize = 10024;
/// VL1 header plus verb length.
pub const PACKET_HEADER: usize = 28;

/// Builds MULTICAST_LIKE payloads (`nwid, mac6, u32 adi` records), starting a new payload
/// when another record would make the packet reach the maximum length.
pub fn encode_likes(records: &[(NetworkId, MulticastGroup)]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for (nwid, g) in records {
        if PACKET_HEADER + cur.len() + 24 >= MAX_PACKET {
            out.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(&nwid.to_bytes());
        cur.extend_from_slice(&g.to_bytes());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Reads a MULTICAST_LIKE payload.
pub fn decode_likes(payload: &[u8]) -> Result<Vec<(NetworkId, MulticastGroup)>, CodecError> {
    let mut r = Reader::new(payload);
    let mut out = Vec::new();
    while r.remaining() >= 18 {
        let nwid = NetworkId::from(r.u64()?);
        out.push((nwid, MulticastGroup::from_bytes(r.array()?)));
    }
    Ok(out)
}

/// A MULTICAST_GATHER payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gather {
    /// Network.
    pub nwid: NetworkId,
    /// Group.
    pub group: MulticastGroup,
    /// How many members to return.
    pub limit: u32,
    /// The sender's COM (flag 0x01).
    pub com: Option<CertificateOfMembership>,
}

impl Gather {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.nwid.to_bytes().to_vec();
        b.push(u8::from(self.com.is_some()));
        b.extend_from_slice(&self.group.to_bytes());
        b.extend_from_slice(&self.limit.to_be_bytes());
        if let Some(c) = &self.com {
            c.encode(&mut b);
        }
        b
    }

    /// Reads a payload; a COM that fails to parse is ignored, as the reference does.
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let nwid = NetworkId::from(r.u64()?);
        let flags = r.u8()?;
        let group = MulticastGroup::from_bytes(r.array()?);
        let limit = r.u32()?;
        let com = if flags & 1 != 0 {
            CertificateOfMembership::decode(&mut r).ok()
        } else {
            None
        };
        Ok(Self {
            nwid,
            group,
            limit,
            com,
        })
    }
}

/// The answer to a gather: OK(MULTICAST_GATHER) payload after the in-re fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatherResult {
    /// Network.
    pub nwid: NetworkId,
    /// Group.
    pub group: MulticastGroup,
    /// How many members the answering node knows.
    pub total_known: u32,
    /// Listed members.
    pub members: Vec<Address>,
}

impl GatherResult {
    /// The payload bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.nwid.to_bytes().to_vec();
        b.extend_from_slice(&self.group.to_bytes());
        b.extend_from_slice(&self.total_known.to_be_bytes());
        b.extend_from_slice(&(self.members.len() as u16).to_be_bytes());
        for a in &self.members {
            b.extend_from_slice(&a.to_bytes());
        }
        b
    }

    /// Reads a payload.
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let nwid = NetworkId::from(r.u64()?);
        let group = MulticastGroup::from_bytes(r.array()?);
        let total_known = r.u32()?;
        let n = r.u16()?;
        let mut members = Vec::with_capacity(usize::from(n).min(r.remaining() / 5));
        for _ in 0..n {
            members.push(r.address()?);
        }
        Ok(Self {
            nwid,
            group,
            total_known,
            members,
        })
    }
}

/// Appends `nwid ‖ flags ‖ [COM]`, the head of EXT_FRAME and MULTICAST_FRAME.
fn put_frame_head(
    out: &mut Vec<u8>,
    nwid: NetworkId,
    flags: u8,
    com: Option<&CertificateOfMembership>,
) {
    out.extend_from_slice(&nwid.to_bytes());
    out.push(flags);
    if let Some(c) = com {
        c.encode(out);
    }
}

/// Reads `nwid ‖ flags ‖ [COM if flags & 0x01]`.
fn read_frame_head(
    r: &mut Reader<'_>,
) -> Result<(NetworkId, u8, Option<CertificateOfMembership>), CodecError> {
    let nwid = NetworkId::from(r.u64()?);
    let flags = r.u8()?;
    let com = if flags & 1 != 0 {
        Some(CertificateOfMembership::decode(r)?)
    } else {
        None
    };
    Ok((nwid, flags, com))
}

/// A FRAME header; the Ethernet payload follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Network.
    pub nwid: NetworkId,
    /// Ethertype.
    pub ethertype: u16,
}

impl FrameHeader {
    /// Appends the header.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&self.ethertype.to_be_bytes());
    }

    /// Splits a FRAME payload into header and Ethernet payload.
    pub fn decode(payload: &[u8]) -> Result<(Self, &[u8]), CodecError> {
        let mut r = Reader::new(payload);
        let h = Self {
            nwid: NetworkId::from(r.u64()?),
            ethertype: r.u16()?,
        };
        Ok((h, r.rest()))
    }
}

/// An EXT_FRAME header; the Ethernet payload follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtFrameHeader {
    /// Network.
    pub nwid: NetworkId,
    /// Flags (0x01 COM attached, 0x02..0x08 copy kind, 0x10 ACK requested).
    pub flags: u8,
    /// Attached COM (legacy).
    pub com: Option<CertificateOfMembership>,
    /// Destination MAC.
    pub dest: Mac,
    /// Source MAC.
    pub source: Mac,
    /// Ethertype.
    pub ethertype: u16,
}

impl ExtFrameHeader {
    /// Appends the header (the COM bit follows `com`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let flags = (self.flags & !1) | u8::from(self.com.is_some());
        put_frame_head(out, self.nwid, flags, self.com.as_ref());
        out.extend_from_slice(&self.dest.0);
        out.extend_from_slice(&self.source.0);
        out.extend_from_slice(&self.ethertype.to_be_bytes());
    }

    /// Splits an EXT_FRAME payload into header and Ethernet payload.
    pub fn decode(payload: &[u8]) -> Result<(Self, &[u8]), CodecError> {
        let mut r = Reader::new(payload);
        let (nwid, flags, com) = read_frame_head(&mut r)?;
        let h = Self {
            nwid,
            flags,
            com,
            dest: Mac(r.array()?),
            source: Mac(r.array()?),
            ethertype: r.u16()?,
        };
        Ok((h, r.rest()))
    }
}

/// A MULTICAST_FRAME header; the Ethernet payload follows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MulticastFrameHeader {
    /// Network.
    pub nwid: NetworkId,
    /// Flags: 0x01 COM, 0x02 gather limit, 0x04 source MAC, 0x08 please replicate.
    pub flags: u8,
    /// Attached COM (legacy).
    pub com: Option<CertificateOfMembership>,
    /// Implicit gather limit (flag 0x02).
    pub gather_limit: Option<u32>,
    /// Source MAC when bridged (flag 0x04).
    pub source: Option<Mac>,
    /// Destination group.
    pub group: MulticastGroup,
    /// Ethertype.
    pub ethertype: u16,
}

impl MulticastFrameHeader {
    /// Appends the header; flags 0x01/0x02/0x04 follow the optional fields.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let flags = (self.flags & 0x08)
            | u8::from(self.com.is_some())
            | if self.gather_limit.is_some() { 2 } else { 0 }
            | if self.source.is_some() { 4 } else { 0 };
        put_frame_head(out, self.nwid, flags, self.com.as_ref());
        if let Some(g) = self.gather_limit {
            out.extend_from_slice(&g.to_be_bytes());
        }
        if let Some(s) = self.source {
            out.extend_from_slice(&s.0);
        }
        out.extend_from_slice(&self.group.to_bytes());
        out.extend_from_slice(&self.ethertype.to_be_bytes());
    }

    /// Splits a MULTICAST_FRAME payload into header and Ethernet payload.
    pub fn decode(payload: &[u8]) -> Result<(Self, &[u8]), CodecError> {
        let mut r = Reader::new(payload);
        let (nwid, flags, com) = read_frame_head(&mut r)?;
        let gather_limit = if flags & 2 != 0 { Some(r.u32()?) } else { None };
        let source = if flags & 4 != 0 {
            Some(Mac(r.array()?))
        } else {
            None
        };
        let h = Self {
            nwid,
            flags,
            com,
            gather_limit,
            source,
            group: MulticastGroup::from_bytes(r.array()?),
            ethertype: r.u16()?,
        };
        Ok((h, r.rest()))
    }
}

/// Who is subscribed to which group, learned from LIKEs and gather answers.
#[derive(Clone, Debug, Default)]
pub struct GroupMembers {
    groups: BTreeMap<(NetworkId, MulticastGroup), BTreeMap<Address, i64>>,
}

impl GroupMembers {
    /// Records (or refreshes) `member` in a group at `now`. Call on every accepted LIKE.
    pub fn add(&mut self, nwid: NetworkId, group: MulticastGroup, member: Address, now: i64) {
        self.groups
            .entry((nwid, group))
            .or_default()
            .insert(member, now);
    }

    /// Removes a member from a group.
    pub fn remove(&mut self, nwid: NetworkId, group: MulticastGroup, member: Address) {
        if let Some(g) = self.groups.get_mut(&(nwid, group)) {
            g.remove(&member);
        }
    }

    /// Drops LIKEs older than [`LIKE_EXPIRE`]. Call from housekeeping (every 30 s).
    pub fn expire(&mut self, now: i64) {
        for m in self.groups.values_mut() {
            m.retain(|_, t| now - *t < LIKE_EXPIRE);
        }
        self.groups.retain(|_, m| !m.is_empty());
    }

    /// Known members of a group, sorted by address.
    pub fn members(&self, nwid: NetworkId, group: MulticastGroup) -> Vec<Address> {
        self.groups
            .get(&(nwid, group))
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// Answers a gather from `querier` (§12.3): own address first when subscribed, then
    /// random distinct members other than the querier, up to `limit` (capped at 65535).
    pub fn gather(
        &self,
        nwid: NetworkId,
        group: MulticastGroup,
        querier: Address,
        own: Option<Address>,
        limit: u32,
        random: &mut dyn FnMut() -> u64,
    ) -> GatherResult {
        let limit = limit.min(65535) as usize;
        let mut members = Vec::new();
        let mut total = 0u32;
        if let Some(me) = own {
            total += 1;
            members.push(me);
        }
        let mut pool = self.members(nwid, group);
        total = total.saturating_add(pool.len() as u32);
        shuffle(&mut pool, random);
        let max_listed = (MAX_PACKET - PACKET_HEADER - 30) / 5;
        for a in pool {
            if members.len() >= limit || members.len() >= max_listed {
                break;
            }
            if a != querier {
                members.push(a);
            }
        }
        GatherResult {
            nwid,
            group,
            total_known: total,
            members,
        }
    }

    /// The recipients of a multicast (§12.5): active bridges first (not self, not
    /// origin), then shuffled members that are not bridges and not the origin, until
    /// `limit` copies.
    #[allow(clippy::too_many_arguments)]
    pub fn recipients(
        &self,
        nwid: NetworkId,
        group: MulticastGroup,
        limit: usize,
        bridges: &[Address],
        own: Address,
        origin: Option<Address>,
        random: &mut dyn FnMut() -> u64,
    ) -> Vec<Address> {
        let mut out: Vec<Address> = Vec::new();
        for b in bridges {
            if out.len() >= limit {
                return out;
            }
            if *b != own && Some(*b) != origin && !out.contains(b) {
                out.push(*b);
            }
        }
        let mut pool = self.members(nwid, group);
        shuffle(&mut pool, random);
        for a in pool {
            if out.len() >= limit {
                break;
            }
            if a != own && Some(a) != origin && !bridges.contains(&a) {
                out.push(a);
            }
        }
        out
    }
}

/// Fisher–Yates shuffle with caller-supplied randomness.
fn shuffle<T>(v: &mut [T], random: &mut dyn FnMut() -> u64) {
    for i in (1..v.len()).rev() {
        let j = (random() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}
