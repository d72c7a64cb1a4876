//! Payload codecs of the VL2 control verbs: NETWORK_CONFIG_REQUEST (with its metadata
//! dictionary), NETWORK_CREDENTIALS, and the VL2 ERROR bodies (including the
//! NEED_MEMBERSHIP_CERTIFICATE "request" for credentials).

use crate::NetworkId;
use crate::codec::{CodecError, Reader};
use crate::credentials::{
    Capability, CertificateOfMembership, CertificateOfOwnership, Revocation, Tag,
};
use crate::dictionary::{Dictionary, METADATA_CAPACITY};

/// VL2 ERROR codes (the byte after the in-re fields).
pub mod error_code {
    /// The network (or config) does not exist.
    pub const OBJ_NOT_FOUND: u8 = 0x03;
    /// The receiver is not a controller.
    pub const UNSUPPORTED_OPERATION: u8 = 0x05;
    /// The receiver lacks a valid certificate of membership for the sender.
    pub const NEED_MEMBERSHIP_CERTIFICATE: u8 = 0x06;
    /// The controller refuses the member.
    pub const NETWORK_ACCESS_DENIED: u8 = 0x07;
    /// Never sent by 1.x; unsubscribes the sender from a group.
    pub const UNWANTED_MULTICAST: u8 = 0x08;
    /// SSO login required.
    pub const NETWORK_AUTHENTICATION_REQUIRED: u8 = 0x09;
}

/// The software version and platform a member reports in its request metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftwareVersion {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Revision.
    pub revision: u64,
}

/// The metadata dictionary a 1.10–1.14 member sends (§5.5), keys in the reference
/// order. `platform` (`"linux/x86_64"`) is the `o` key that 1.14.1+ adds; `None` omits it.
pub fn request_metadata(version: SoftwareVersion, platform: Option<&str>) -> Dictionary {
    let mut d = Dictionary::new();
    for (k, v) in [
        ("v", 7),
        ("vend", 1),
        ("pv", 12),
        ("majv", version.major),
        ("minv", version.minor),
        ("revv", version.revision),
        ("mr", 1024),
        ("mc", 128),
        ("mcr", 64),
        ("mt", 128),
        ("f", 0),
        ("revr", 1),
    ] {
        d.add_u64(k, v);
    }
    if let Some(p) = platform {
        d.add_str("o", p);
    }
    d
}

/// A NETWORK_CONFIG_REQUEST payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigRequest {
    /// Network.
    pub nwid: NetworkId,
    /// The metadata dictionary bytes (no NUL).
    pub metadata: Vec<u8>,
    /// Revision of the config the member holds (0 if none).
    pub revision: u64,
    /// Timestamp of the config the member holds (0 if none).
    pub timestamp: u64,
}

impl ConfigRequest {
    /// Appends the payload. Metadata longer than 65535 bytes is cut.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let md = &self.metadata[..self.metadata.len().min(usize::from(u16::MAX))];
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&(md.len() as u16).to_be_bytes());
        out.extend_from_slice(md);
        out.extend_from_slice(&self.revision.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
    }

    /// Reads a payload. The revision/timestamp fields are optional (older members).
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let nwid = NetworkId::from(r.u64()?);
        let n = usize::from(r.u16()?);
        let metadata = r.bytes(n)?.to_vec();
        let (revision, timestamp) = if r.remaining() >= 16 {
            (r.u64()?, r.u64()?)
        } else {
            (0, 0)
        };
        Ok(Self {
            nwid,
            metadata,
            revision,
            timestamp,
        })
    }

    /// The metadata as the controller reads it (capacity 1024, longer input truncated).
    pub fn metadata_dictionary(&self) -> Dictionary {
        Dictionary::parse_with_capacity(&self.metadata, METADATA_CAPACITY)
    }
}

/// A NETWORK_CREDENTIALS payload (§5.4).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CredentialsPayload {
    /// Certificates of membership.
    pub coms: Vec<CertificateOfMembership>,
    /// Capabilities.
    pub capabilities: Vec<Capability>,
    /// Tags.
    pub tags: Vec<Tag>,
    /// Revocations.
    pub revocations: Vec<Revocation>,
    /// Certificates of ownership.
    pub coos: Vec<CertificateOfOwnership>,
}

/// Most credentials of one kind decoded from a payload (bounded by the packet size).
const MAX_CREDENTIALS: usize = 1024;

impl CredentialsPayload {
    /// Whether nothing is carried.
    pub fn is_empty(&self) -> bool {
        self.coms.is_empty()
            && self.capabilities.is_empty()
            && self.tags.is_empty()
            && self.revocations.is_empty()
            && self.coos.is_empty()
    }

    /// Appends the payload: COMs, 0x00, then counted caps, tags, revocations, COOs.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for c in &self.coms {
            c.encode(out);
        }
        out.push(0);
        out.extend_from_slice(&(self.capabilities.len() as u16).to_be_bytes());
        for c in &self.capabilities {
            c.encode(out);
        }
        out.extend_from_slice(&(self.tags.len() as u16).to_be_bytes());
        for t in &self.tags {
            t.encode(out);
        }
        out.extend_from_slice(&(self.revocations.len() as u16).to_be_bytes());
        for r in &self.revocations {
            r.encode(out);
        }
        out.extend_from_slice(&(self.coos.len() as u16).to_be_bytes());
        for c in &self.coos {
            c.encode(out);
        }
    }

    /// A revocation push as the controller sends it: `0x00, 0, 0, 1, revocation, 0`.
    pub fn revocation(r: Revocation) -> Self {
        Self {
            revocations: vec![r],
            ..Self::default()
        }
    }

    /// Reads a payload; sections after the COMs may be absent (older nodes).
    pub fn decode(payload: &[u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(payload);
        let mut out = Self::default();
        while r.peek().is_some_and(|b| b != 0) {
            if out.coms.len() >= MAX_CREDENTIALS {
                return Err(CodecError::TooMany("COMs"));
            }
            out.coms.push(CertificateOfMembership::decode(&mut r)?);
        }
        if r.remaining() == 0 {
            return Ok(out);
        }
        r.skip(1)?;
        if r.remaining() == 0 {
            return Ok(out);
        }
        fn section<T>(
            r: &mut Reader<'_>,
            v: &mut Vec<T>,
            f: impl Fn(&mut Reader<'_>) -> Result<T, CodecError>,
        ) -> Result<bool, CodecError> {
            if r.remaining() == 0 {
                return Ok(false);
            }
            let n = usize::from(r.u16()?);
            for _ in 0..n.min(MAX_CREDENTIALS) {
                v.push(f(r)?);
            }
            Ok(true)
        }
        let _ = section(&mut r, &mut out.capabilities, Capability::decode)?
            && section(&mut r, &mut out.tags, Tag::decode)?
            && section(&mut r, &mut out.revocations, Revocation::decode)?
            && section(&mut r, &mut out.coos, CertificateOfOwnership::decode)?;
        Ok(out)
    }
}

/// The body of a VL2 ERROR after the in-re fields: `u8 code, u64 nwid, [extra]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vl2Error<'a> {
    /// Error code ([`error_code`]).
    pub code: u8,
    /// Network.
    pub nwid: NetworkId,
    /// What follows the network id (auth info, unwanted group), possibly empty.
    pub extra: &'a [u8],
}

impl<'a> Vl2Error<'a> {
    /// The "send me your credentials" error a member answers an ungated frame with.
    pub fn need_membership(nwid: NetworkId) -> Self {
        Self {
            code: error_code::NEED_MEMBERSHIP_CERTIFICATE,
            nwid,
            extra: &[],
        }
    }

    /// Appends the body (without the in-re fields).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.code);
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(self.extra);
    }

    /// Reads a body (after the in-re fields).
    pub fn decode(body: &'a [u8]) -> Result<Self, CodecError> {
        let mut r = Reader::new(body);
        Ok(Self {
            code: r.u8()?,
            nwid: NetworkId::from(r.u64()?),
            extra: r.rest(),
        })
    }

    /// The auth-info dictionary of NETWORK_AUTHENTICATION_REQUIRED, if one follows.
    pub fn auth_info(&self) -> Option<Dictionary> {
        if self.extra.len() <= 2 {
            return None;
        }
        let mut r = Reader::new(self.extra);
        let n = usize::from(r.u16().ok()?);
        let b = r.bytes(n).ok()?;
        Some(Dictionary::parse(b))
    }
}

/// Builds the `in-re verb, in-re packet id` head of an OK/ERROR payload.
pub fn in_re(verb: u8, packet_id: u64, out: &mut Vec<u8>) {
    out.push(verb);
    out.extend_from_slice(&packet_id.to_be_bytes());
}

/// Splits an OK/ERROR payload into `(in-re verb, in-re packet id, body)`.
pub fn split_in_re(payload: &[u8]) -> Result<(u8, u64, &[u8]), CodecError> {
    let mut r = Reader::new(payload);
    let verb = r.u8()? & 0x1f;
    let id = r.u64()?;
    Ok((verb, id, r.rest()))
}
