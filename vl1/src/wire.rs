//! Wire formats: packet and fragment views, InetAddress, verb payload codecs.
//!
//! Views check the length once in `new_checked`; after that no accessor can panic.
//! Payload parsers return [`WireError`] on any malformed input.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::address::Address;
use crate::crypto::CipherSuite;
use crate::identity::Identity;

/// Packet header length including the verb byte.
pub const HEADER_LEN: usize = 28;
/// Fragment header length.
pub const FRAGMENT_HEADER_LEN: usize = 16;
/// Largest packet that may be assembled.
pub const MAX_PACKET_LEN: usize = 10024;
/// Default physical MTU (UDP payload).
pub const DEFAULT_MTU: usize = 1432;
/// Most pieces (head + fragments) accepted for one packet.
pub const MAX_FRAGMENTS: usize = 7;
/// Fragment indicator byte at offset 13.
pub const FRAGMENT_INDICATOR: u8 = 0xff;
/// Packets with this many hops or more are not relayed.
pub const RELAY_MAX_HOPS: u8 = 3;
/// Protocol version we speak.
pub const PROTOCOL_VERSION: u8 = 12;
/// Lowest protocol version accepted from peers.
pub const MIN_PROTOCOL_VERSION: u8 = 4;
/// Flag bit: more fragments follow.
pub const FLAG_FRAGMENTED: u8 = 0x40;
/// Verb byte bit: payload is LZ4-compressed.
pub const VERB_FLAG_COMPRESSED: u8 = 0x80;

/// Why bytes could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The buffer ends before a field does.
    #[error("truncated")]
    Truncated,
    /// A field holds a value the format does not allow.
    #[error("invalid field: {0}")]
    Invalid(&'static str),
}

/// A verb number (low 5 bits of the verb byte). Unknown values pass through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Verb(pub u8);

impl Verb {
    /// No operation.
    pub const NOP: Verb = Verb(0x00);
    /// Announce identity and versions.
    pub const HELLO: Verb = Verb(0x01);
    /// Error response.
    pub const ERROR: Verb = Verb(0x02);
    /// Success response.
    pub const OK: Verb = Verb(0x03);
    /// Identity lookup.
    pub const WHOIS: Verb = Verb(0x04);
    /// Introduction by a root.
    pub const RENDEZVOUS: Verb = Verb(0x05);
    /// VL2 Ethernet frame.
    pub const FRAME: Verb = Verb(0x06);
    /// VL2 extended frame.
    pub const EXT_FRAME: Verb = Verb(0x07);
    /// Echo request.
    pub const ECHO: Verb = Verb(0x08);
    /// VL2 multicast subscription.
    pub const MULTICAST_LIKE: Verb = Verb(0x09);
    /// VL2 credentials.
    pub const NETWORK_CREDENTIALS: Verb = Verb(0x0a);
    /// VL2 configuration request.
    pub const NETWORK_CONFIG_REQUEST: Verb = Verb(0x0b);
    /// VL2 configuration push.
    pub const NETWORK_CONFIG: Verb = Verb(0x0c);
    /// VL2 multicast gather.
    pub const MULTICAST_GATHER: Verb = Verb(0x0d);
    /// VL2 multicast frame.
    pub const MULTICAST_FRAME: Verb = Verb(0x0e);
    /// Advertise direct paths.
    pub const PUSH_DIRECT_PATHS: Verb = Verb(0x10);
    /// Multipath ACK.
    pub const ACK: Verb = Verb(0x12);
    /// Multipath QoS measurement.
    pub const QOS_MEASUREMENT: Verb = Verb(0x13);
    /// Application message.
    pub const USER_MESSAGE: Verb = Verb(0x14);
    /// Diagnostic trace.
    pub const REMOTE_TRACE: Verb = Verb(0x15);
    /// Multipath negotiation.
    pub const PATH_NEGOTIATION_REQUEST: Verb = Verb(0x16);

    /// Whether the verb belongs to VL2 (passed through to the layer above).
    pub fn is_vl2(self) -> bool {
        matches!(self.0, 0x06 | 0x07 | 0x09..=0x0e)
    }

    /// A short upper-case name, as in ZeroTier's sources.
    pub fn name(self) -> &'static str {
        match self.0 {
            0x00 => "NOP",
            0x01 => "HELLO",
            0x02 => "ERROR",
            0x03 => "OK",
            0x04 => "WHOIS",
            0x05 => "RENDEZVOUS",
            0x06 => "FRAME",
            0x07 => "EXT_FRAME",
            0x08 => "ECHO",
            0x09 => "MULTICAST_LIKE",
            0x0a => "NETWORK_CREDENTIALS",
            0x0b => "NETWORK_CONFIG_REQUEST",
            0x0c => "NETWORK_CONFIG",
            0x0d => "MULTICAST_GATHER",
            0x0e => "MULTICAST_FRAME",
            0x10 => "PUSH_DIRECT_PATHS",
            0x12 => "ACK",
            0x13 => "QOS_MEASUREMENT",
            0x14 => "USER_MESSAGE",
            0x15 => "REMOTE_TRACE",
            0x16 => "PATH_NEGOTIATION_REQUEST",
            _ => "UNKNOWN",
        }
    }
}

fn addr_at(b: &[u8], at: usize) -> Address {
    let mut a = [0u8; 5];
    a.copy_from_slice(&b[at..at + 5]);
    Address::from_bytes(a)
}

/// True if `datagram` has the shape of a fragment (not a packet head).
pub fn is_fragment(datagram: &[u8]) -> bool {
    datagram.len() > FRAGMENT_HEADER_LEN && datagram[13] == FRAGMENT_INDICATOR
}

/// A zero-copy view of a packet (head): 28-byte header, verb byte, payload.
#[derive(Debug, Clone, Copy)]
pub struct Packet<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buf` after checking it holds at least a full header.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if buf.as_ref().len() < HEADER_LEN {
            return Err(WireError::Truncated);
        }
        Ok(Self { buf })
    }

    /// The wrapped buffer.
    pub fn into_inner(self) -> T {
        self.buf
    }

    /// The whole packet.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_ref()
    }

    /// Packet ID (bytes 0..8, big-endian).
    pub fn packet_id(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf.as_ref()[..8]);
        u64::from_be_bytes(b)
    }

    /// Destination address.
    pub fn destination(&self) -> Address {
        addr_at(self.buf.as_ref(), 8)
    }

    /// Source address.
    pub fn source(&self) -> Address {
        addr_at(self.buf.as_ref(), 13)
    }

    /// The raw flags byte.
    pub fn flags(&self) -> u8 {
        self.buf.as_ref()[18]
    }

    /// Hop count.
    pub fn hops(&self) -> u8 {
        self.flags() & 7
    }

    /// Cipher suite bits (0..7).
    pub fn cipher_suite_bits(&self) -> u8 {
        (self.flags() >> 3) & 7
    }

    /// Cipher suite, if assigned.
    pub fn cipher_suite(&self) -> Option<CipherSuite> {
        CipherSuite::from_u8(self.cipher_suite_bits())
    }

    /// Whether fragments follow this head.
    pub fn is_fragmented(&self) -> bool {
        self.flags() & FLAG_FRAGMENTED != 0
    }

    /// The verb (meaningful only after dearmoring for suites 1 and 3).
    pub fn verb(&self) -> Verb {
        Verb(self.buf.as_ref()[27] & 0x1f)
    }

    /// Whether the payload is compressed (after dearmoring).
    pub fn is_compressed(&self) -> bool {
        self.buf.as_ref()[27] & VERB_FLAG_COMPRESSED != 0
    }

    /// Bytes after the verb byte.
    pub fn payload(&self) -> &[u8] {
        &self.buf.as_ref()[HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    /// Sets the hop count (0..7).
    pub fn set_hops(&mut self, hops: u8) {
        let b = self.buf.as_mut();
        b[18] = (b[18] & 0xf8) | (hops & 7);
    }

    /// Sets or clears the fragmented flag.
    pub fn set_fragmented(&mut self, on: bool) {
        let b = self.buf.as_mut();
        if on {
            b[18] |= FLAG_FRAGMENTED;
        } else {
            b[18] &= !FLAG_FRAGMENTED;
        }
    }
}

/// A zero-copy view of a fragment datagram (pieces 1.. of a fragmented packet).
#[derive(Debug, Clone, Copy)]
pub struct Fragment<T: AsRef<[u8]>> {
    buf: T,
}

impl<T: AsRef<[u8]>> Fragment<T> {
    /// Wraps `buf` after checking length (> 16) and the indicator byte.
    pub fn new_checked(buf: T) -> Result<Self, WireError> {
        if !is_fragment(buf.as_ref()) {
            return Err(WireError::Invalid("not a fragment"));
        }
        Ok(Self { buf })
    }

    /// Packet ID of the whole packet.
    pub fn packet_id(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.buf.as_ref()[..8]);
        u64::from_be_bytes(b)
    }

    /// Destination address.
    pub fn destination(&self) -> Address {
        addr_at(self.buf.as_ref(), 8)
    }

    /// Total number of pieces including the head.
    pub fn total(&self) -> u8 {
        self.buf.as_ref()[14] >> 4
    }

    /// This fragment's number (1..total-1).
    pub fn number(&self) -> u8 {
        self.buf.as_ref()[14] & 0x0f
    }

    /// Hop count.
    pub fn hops(&self) -> u8 {
        self.buf.as_ref()[15] & 7
    }

    /// Fragment data.
    pub fn data(&self) -> &[u8] {
        &self.buf.as_ref()[FRAGMENT_HEADER_LEN..]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Fragment<T> {
    /// Sets the hop count (0..7).
    pub fn set_hops(&mut self, hops: u8) {
        self.buf.as_mut()[15] = hops & 7;
    }
}

/// Appends a packet header (flags 0, MAC zero) and verb byte to `out`.
pub fn write_header(
    out: &mut Vec<u8>,
    packet_id: [u8; 8],
    dest: Address,
    src: Address,
    verb: Verb,
) {
    out.extend_from_slice(&packet_id);
    out.extend_from_slice(&dest.to_bytes());
    out.extend_from_slice(&src.to_bytes());
    out.push(0);
    out.extend_from_slice(&[0u8; 8]);
    out.push(verb.0 & 0x1f);
}

/// How [`fragment`] cuts a packet longer than the MTU. Receivers (ours and ZeroTier One's)
/// reassemble either layout: they match pieces by packet ID and never check their sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// ZeroTier One's layout: a head of exactly `mtu` bytes, then chunks of `mtu` − 16.
    Full,
    /// As few pieces as [`Split::Full`], all of one length but the last (which may be
    /// shorter), so that a run of them to one peer can leave in one UDP GSO send.
    Even,
}

/// Splits an armored packet into datagrams for `mtu` as `split` says: calls `emit` with the
/// head then each fragment (the fragment is built in `scratch`). Returns the number of
/// pieces, or an error if more than [`MAX_FRAGMENTS`] would be needed.
pub fn fragment(
    packet: &[u8],
    mtu: usize,
    split: Split,
    scratch: &mut Vec<u8>,
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, WireError> {
    if packet.len() < HEADER_LEN || mtu <= FRAGMENT_HEADER_LEN + HEADER_LEN {
        return Err(WireError::Invalid("packet or mtu too small"));
    }
    if packet.len() <= mtu {
        emit(packet);
        return Ok(1);
    }
    let pieces = 1 + (packet.len() - mtu).div_ceil(mtu - FRAGMENT_HEADER_LEN);
    if pieces > MAX_FRAGMENTS {
        return Err(WireError::Invalid("too many fragments"));
    }
    // Every piece but the head carries a fragment header: `on_wire` bytes in all.
    let head = match split {
        Split::Full => mtu,
        Split::Even => (packet.len() + FRAGMENT_HEADER_LEN * (pieces - 1)).div_ceil(pieces),
    };
    let chunk = head - FRAGMENT_HEADER_LEN;
    let rest = &packet[head..];
    let total = 1 + rest.len().div_ceil(chunk);
    emit(&packet[..head]);
    for (i, c) in rest.chunks(chunk).enumerate() {
        scratch.clear();
        scratch.extend_from_slice(&packet[..8]);
        scratch.extend_from_slice(&packet[8..13]);
        scratch.push(FRAGMENT_INDICATOR);
        scratch.push(((total as u8) << 4) | ((i + 1) as u8));
        scratch.push(0);
        scratch.extend_from_slice(c);
        emit(scratch);
    }
    Ok(total)
}

/// A bounds-checked reader over a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Reads from the start of `b`.
    pub fn new(b: &'a [u8]) -> Self {
        Self { b, pos: 0 }
    }
    /// Current offset.
    pub fn pos(&self) -> usize {
        self.pos
    }
    /// Bytes left.
    pub fn remaining(&self) -> usize {
        self.b.len() - self.pos
    }
    /// The unread bytes.
    pub fn rest(&self) -> &'a [u8] {
        &self.b[self.pos..]
    }
    /// Takes `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).ok_or(WireError::Truncated)?;
        let s = self.b.get(self.pos..end).ok_or(WireError::Truncated)?;
        self.pos = end;
        Ok(s)
    }
    /// Takes a fixed-size array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    /// Reads a u8.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.array::<1>()?[0])
    }
    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// Reads a 5-byte address.
    pub fn address(&mut self) -> Result<Address, WireError> {
        Ok(Address::from_bytes(self.array()?))
    }
    /// Reads a binary identity (public or with secret).
    pub fn identity(&mut self) -> Result<Identity, WireError> {
        let (id, used) =
            Identity::from_bytes(self.rest()).map_err(|_| WireError::Invalid("identity"))?;
        self.pos += used;
        Ok(id)
    }
    /// Reads an InetAddress (section 14). Reserved types are skipped and read as `None`.
    pub fn inet(&mut self) -> Result<Option<SocketAddr>, WireError> {
        match self.u8()? {
            0 => Ok(None),
            1 | 2 => {
                self.bytes(6)?;
                Ok(None)
            }
            3 => {
                let n = self.u16()? as usize;
                self.bytes(n)?;
                Ok(None)
            }
            4 => {
                let ip: [u8; 4] = self.array()?;
                let port = self.u16()?;
                Ok(Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::from(ip)), port)))
            }
            6 => {
                let ip: [u8; 16] = self.array()?;
                let port = self.u16()?;
                Ok(Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(ip)), port)))
            }
            _ => Err(WireError::Invalid("inet address type")),
        }
    }
}

/// Appends an InetAddress (nil, IPv4 or IPv6).
pub fn write_inet(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(0),
        Some(SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

/// HELLO payload (section 13.2). `moons` is the decrypted moon list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Sender's protocol version.
    pub protocol_version: u8,
    /// Software major version.
    pub version_major: u8,
    /// Software minor version.
    pub version_minor: u8,
    /// Software revision.
    pub version_revision: u16,
    /// Sender timestamp (echoed in OK).
    pub timestamp: u64,
    /// Sender identity (public).
    pub identity: Identity,
    /// Where the sender sent this datagram.
    pub physical_destination: Option<SocketAddr>,
    /// Sender's planet ID and timestamp, if present.
    pub planet: Option<(u64, u64)>,
    /// Moon entries: (world type, id, timestamp).
    pub moons: Vec<(u8, u64, u64)>,
}

impl Hello {
    /// Appends the payload (after the verb byte). Returns the offset, relative to the
    /// start of `out` before writing, where `cryptField` encryption begins.
    pub fn write(&self, out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.push(self.protocol_version);
        out.push(self.version_major);
        out.push(self.version_minor);
        out.extend_from_slice(&self.version_revision.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        self.identity.write_bytes(false, out);
        write_inet(out, self.physical_destination);
        let (pid, pts) = self.planet.unwrap_or((0, 0));
        out.extend_from_slice(&pid.to_be_bytes());
        out.extend_from_slice(&pts.to_be_bytes());
        let crypt = out.len() - start;
        out.extend_from_slice(&(self.moons.len() as u16).to_be_bytes());
        for (t, id, ts) in &self.moons {
            out.push(*t);
            out.extend_from_slice(&id.to_be_bytes());
            out.extend_from_slice(&ts.to_be_bytes());
        }
        crypt
    }

    /// Parses the fixed part and returns it with the offset (within `payload`) where the
    /// encrypted moon list starts, if any bytes remain there. Moons are left empty.
    pub fn parse_head(payload: &[u8]) -> Result<(Hello, Option<usize>), WireError> {
        let mut r = Reader::new(payload);
        let protocol_version = r.u8()?;
        let version_major = r.u8()?;
        let version_minor = r.u8()?;
        let version_revision = r.u16()?;
        let timestamp = r.u64()?;
        let identity = r.identity()?;
        let physical_destination = if r.remaining() > 0 { r.inet()? } else { None };
        let planet = if r.remaining() >= 16 {
            Some((r.u64()?, r.u64()?))
        } else {
            None
        };
        let crypt = (planet.is_some() && r.remaining() > 0).then_some(r.pos());
        Ok((
            Hello {
                protocol_version,
                version_major,
                version_minor,
                version_revision,
                timestamp,
                identity,
                physical_destination,
                planet,
                moons: Vec::new(),
            },
            crypt,
        ))
    }

    /// Parses the (already decrypted) moon list.
    pub fn parse_moons(b: &[u8]) -> Result<Vec<(u8, u64, u64)>, WireError> {
        let mut r = Reader::new(b);
        if r.remaining() < 2 {
            return Ok(Vec::new());
        }
        let n = r.u16()? as usize;
        let mut v = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            v.push((r.u8()?, r.u64()?, r.u64()?));
        }
        Ok(v)
    }
}

/// The common head of OK and ERROR payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InReplyTo {
    /// Verb of the answered packet.
    pub verb: Verb,
    /// Packet ID of the answered packet.
    pub packet_id: u64,
}

impl InReplyTo {
    /// Parses the 9-byte head; returns it and the rest.
    pub fn parse(payload: &[u8]) -> Result<(InReplyTo, &[u8]), WireError> {
        let mut r = Reader::new(payload);
        let verb = Verb(r.u8()? & 0x1f);
        let packet_id = r.u64()?;
        Ok((InReplyTo { verb, packet_id }, r.rest()))
    }
    /// Appends the 9-byte head.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.verb.0);
        out.extend_from_slice(&self.packet_id.to_be_bytes());
    }
}

/// OK(HELLO) body (after the in-re head).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OkHello<'a> {
    /// Timestamp copied from the HELLO.
    pub timestamp_echo: u64,
    /// Responder's protocol version.
    pub protocol_version: u8,
    /// Responder's major version.
    pub version_major: u8,
    /// Responder's minor version.
    pub version_minor: u8,
    /// Responder's revision.
    pub version_revision: u16,
    /// Address the responder saw the HELLO come from.
    pub observed: Option<SocketAddr>,
    /// Serialized world updates (possibly empty).
    pub world_updates: &'a [u8],
}

impl<'a> OkHello<'a> {
    /// Parses the body.
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b);
        let timestamp_echo = r.u64()?;
        let protocol_version = r.u8()?;
        let version_major = r.u8()?;
        let version_minor = r.u8()?;
        let version_revision = r.u16()?;
        let observed = if r.remaining() > 0 { r.inet()? } else { None };
        let world_updates = if r.remaining() >= 2 {
            let n = r.u16()? as usize;
            r.bytes(n)?
        } else {
            &[]
        };
        Ok(Self {
            timestamp_echo,
            protocol_version,
            version_major,
            version_minor,
            version_revision,
            observed,
            world_updates,
        })
    }
    /// Appends the body.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.timestamp_echo.to_be_bytes());
        out.push(self.protocol_version);
        out.push(self.version_major);
        out.push(self.version_minor);
        out.extend_from_slice(&self.version_revision.to_be_bytes());
        write_inet(out, self.observed);
        out.extend_from_slice(&(self.world_updates.len() as u16).to_be_bytes());
        out.extend_from_slice(self.world_updates);
    }
}

/// Parses the identities of an OK(WHOIS) body.
pub fn parse_ok_whois(b: &[u8]) -> Result<Vec<Identity>, WireError> {
    let mut r = Reader::new(b);
    let mut v = Vec::new();
    while r.remaining() > 0 {
        v.push(r.identity()?);
    }
    if v.is_empty() {
        return Err(WireError::Truncated);
    }
    Ok(v)
}

/// ERROR body (after the in-re head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorBody<'a> {
    /// Error code.
    pub code: u8,
    /// Code-specific payload.
    pub data: &'a [u8],
}

impl ErrorBody<'_> {
    /// Invalid request.
    pub const INVALID_REQUEST: u8 = 1;
    /// Bad protocol version.
    pub const BAD_PROTOCOL_VERSION: u8 = 2;
    /// Object not found.
    pub const OBJ_NOT_FOUND: u8 = 3;
    /// Identity collision.
    pub const IDENTITY_COLLISION: u8 = 4;
    /// Unsupported operation.
    pub const UNSUPPORTED_OPERATION: u8 = 5;

    /// Parses the body.
    pub fn parse(b: &[u8]) -> Result<ErrorBody<'_>, WireError> {
        let mut r = Reader::new(b);
        Ok(ErrorBody {
            code: r.u8()?,
            data: r.rest(),
        })
    }
    /// Appends the body.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.code);
        out.extend_from_slice(self.data);
    }
}

/// Parses a WHOIS payload: one or more addresses.
pub fn parse_whois(b: &[u8]) -> Result<Vec<Address>, WireError> {
    if b.is_empty() || !b.len().is_multiple_of(5) {
        return Err(WireError::Truncated);
    }
    Ok(b.chunks_exact(5).map(|c| addr_at(c, 0)).collect())
}

/// RENDEZVOUS payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rendezvous {
    /// Flags (0).
    pub flags: u8,
    /// The peer reachable at `addr`.
    pub peer: Address,
    /// Its physical address.
    pub addr: SocketAddr,
}

impl Rendezvous {
    /// Parses the payload.
    pub fn parse(b: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b);
        let flags = r.u8()?;
        let peer = r.address()?;
        let port = r.u16()?;
        let ip = match r.u8()? {
            4 => IpAddr::V4(Ipv4Addr::from(r.array::<4>()?)),
            16 => IpAddr::V6(Ipv6Addr::from(r.array::<16>()?)),
            _ => return Err(WireError::Invalid("rendezvous address length")),
        };
        Ok(Self {
            flags,
            peer,
            addr: SocketAddr::new(ip, port),
        })
    }
    /// Appends the payload.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.push(self.flags);
        out.extend_from_slice(&self.peer.to_bytes());
        out.extend_from_slice(&self.addr.port().to_be_bytes());
        match self.addr.ip() {
            IpAddr::V4(ip) => {
                out.push(4);
                out.extend_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out.push(16);
                out.extend_from_slice(&ip.octets());
            }
        }
    }
}

/// One PUSH_DIRECT_PATHS record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathRecord {
    /// Flags (0x01 forget, 0x02 cluster redirect).
    pub flags: u8,
    /// The advertised address.
    pub addr: SocketAddr,
}

/// Parses PUSH_DIRECT_PATHS; records of unknown address types are skipped.
pub fn parse_push_direct_paths(b: &[u8]) -> Result<Vec<PathRecord>, WireError> {
    let mut r = Reader::new(b);
    let n = r.u16()?;
    let mut v = Vec::new();
    for _ in 0..n {
        let flags = r.u8()?;
        let ext = r.u16()? as usize;
        r.bytes(ext)?;
        let t = r.u8()?;
        let len = r.u8()? as usize;
        let body = r.bytes(len)?;
        let addr = match (t, len) {
            (4, 6..) => {
                let ip: [u8; 4] = [body[0], body[1], body[2], body[3]];
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(ip)),
                    u16::from_be_bytes([body[4], body[5]]),
                ))
            }
            (6, 18..) => {
                let mut ip = [0u8; 16];
                ip.copy_from_slice(&body[..16]);
                Some(SocketAddr::new(
                    IpAddr::V6(Ipv6Addr::from(ip)),
                    u16::from_be_bytes([body[16], body[17]]),
                ))
            }
            _ => None,
        };
        if let Some(addr) = addr {
            v.push(PathRecord { flags, addr });
        }
    }
    Ok(v)
}

/// Appends a PUSH_DIRECT_PATHS payload (no extensions).
pub fn write_push_direct_paths(out: &mut Vec<u8>, records: &[PathRecord]) {
    out.extend_from_slice(&(records.len() as u16).to_be_bytes());
    for rec in records {
        out.push(rec.flags);
        out.extend_from_slice(&0u16.to_be_bytes());
        match rec.addr {
            SocketAddr::V4(a) => {
                out.push(4);
                out.push(6);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
            SocketAddr::V6(a) => {
                out.push(6);
                out.push(18);
                out.extend_from_slice(&a.ip().octets());
                out.extend_from_slice(&a.port().to_be_bytes());
            }
        }
    }
}

/// USER_MESSAGE payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserMessage<'a> {
    /// Message type ID.
    pub type_id: u64,
    /// Message data.
    pub data: &'a [u8],
}

impl<'a> UserMessage<'a> {
    /// Parses the payload.
    pub fn parse(b: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(b);
        Ok(Self {
            type_id: r.u64()?,
            data: r.rest(),
        })
    }
    /// Appends the payload.
    pub fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_id.to_be_bytes());
        out.extend_from_slice(self.data);
    }
}

/// Grows `scratch` to at least `len` bytes; never shrinks or clears it, so a reused buffer
/// is not zero-filled again for every packet.
fn work_space(scratch: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if scratch.len() < len {
        scratch.resize(len, 0);
    }
    &mut scratch[..len]
}

/// LZ4-compresses the payload of a plaintext packet in `packet` if that makes it shorter
/// (only tried above 92 bytes, as 1.x; like 1.x, the packet stays uncompressed when LZ4
/// does not shrink it). Uses `scratch` as work space. Returns whether it compressed.
pub fn compress_packet(packet: &mut Vec<u8>, scratch: &mut Vec<u8>) -> bool {
    if packet.len() <= HEADER_LEN + 64 {
        return false;
    }
    let payload = &packet[HEADER_LEN..];
    let out = work_space(
        scratch,
        lz4_flex::block::get_maximum_output_size(payload.len()),
    );
    let Ok(n) = lz4_flex::block::compress_into(payload, out) else {
        return false;
    };
    if n >= payload.len() {
        return false;
    }
    packet.truncate(HEADER_LEN);
    packet.extend_from_slice(&scratch[..n]);
    packet[27] |= VERB_FLAG_COMPRESSED;
    true
}

/// Decompresses a dearmored packet in place if its verb byte says so.
pub fn decompress_packet(packet: &mut Vec<u8>, scratch: &mut Vec<u8>) -> Result<(), WireError> {
    if packet.len() < HEADER_LEN || packet[27] & VERB_FLAG_COMPRESSED == 0 {
        return Ok(());
    }
    if packet.len() > HEADER_LEN {
        let out = work_space(scratch, MAX_PACKET_LEN - HEADER_LEN);
        let n = lz4_flex::block::decompress_into(&packet[HEADER_LEN..], out)
            .map_err(|_| WireError::Invalid("lz4"))?;
        packet.truncate(HEADER_LEN);
        packet.extend_from_slice(&scratch[..n]);
    }
    packet[27] &= !VERB_FLAG_COMPRESSED;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_refuse_short_buffers() {
        assert!(Packet::new_checked(&[0u8; 27][..]).is_err());
        assert!(Fragment::new_checked(&[0u8; 16][..]).is_err());
        let mut f = [0u8; 17];
        f[13] = 0xff;
        f[14] = 0x31;
        let v = Fragment::new_checked(&f[..]).unwrap();
        assert_eq!((v.total(), v.number()), (3, 1));
    }

    #[test]
    fn compression_round_trips() {
        let mut p = vec![0u8; 28];
        p[27] = 0x14;
        p.extend(std::iter::repeat_n(b'A', 500));
        let orig = p.clone();
        let mut s = Vec::new();
        assert!(compress_packet(&mut p, &mut s));
        assert!(p.len() < orig.len());
        decompress_packet(&mut p, &mut s).unwrap();
        assert_eq!(p, orig);
    }

    #[test]
    fn a_reused_dirty_scratch_buffer_is_fine_and_not_refilled() {
        let mut s = vec![0xa5u8; 20_000];
        let ptr = s.as_ptr();
        for n in [100usize, 1400, 300] {
            let mut p = vec![0u8; 28];
            p[27] = 0x06;
            p.extend((0..n).map(|i| (i % 7) as u8));
            let orig = p.clone();
            assert!(compress_packet(&mut p, &mut s));
            decompress_packet(&mut p, &mut s).unwrap();
            assert_eq!(p, orig);
        }
        assert_eq!(
            (s.len(), s.as_ptr()),
            (20_000, ptr),
            "grown only when too small"
        );
    }
}
