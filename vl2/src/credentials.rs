//! Network credentials: certificate of membership, tags, capabilities, certificates of
//! ownership and revocations. Binary codecs, signing and verification.
//!
//! All credentials are signed by the network's controller identity with the 96-byte
//! signature of `flatwire_vl1::Identity::sign`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flatwire_vl1::{Address, Identity};
use sha2::{Digest, Sha384};

use crate::codec::{CodecError, Reader};
use crate::rules::{MAX_CAPABILITY_RULES, Rule, decode_rule_count, encode_rules};
use crate::{Mac, NetworkId};

/// Length of a signature.
pub const SIGNATURE_LEN: usize = 96;
/// Maximum qualifiers in a certificate of membership.
pub const COM_MAX_QUALIFIERS: usize = 8;
/// Maximum custody chain length of a capability.
pub const MAX_CUSTODY_CHAIN: usize = 7;
/// Maximum things in a certificate of ownership.
pub const COO_MAX_THINGS: usize = 16;

const MARKER: [u8; 8] = [0x7f; 8];

/// Why a credential could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// The signing identity has no secret key, or signing failed.
    #[error("cannot sign: {0}")]
    Identity(#[from] flatwire_vl1::IdentityError),
}

/// Credential type codes (used in revocations).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum CredentialType {
    /// None.
    Null = 0,
    /// Certificate of membership.
    Com = 1,
    /// Capability.
    Capability = 2,
    /// Tag.
    Tag = 3,
    /// Certificate of ownership.
    Coo = 4,
    /// Revocation.
    Revocation = 6,
}

impl CredentialType {
    /// From the wire code.
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Null,
            1 => Self::Com,
            2 => Self::Capability,
            3 => Self::Tag,
            4 => Self::Coo,
            6 => Self::Revocation,
            _ => return None,
        })
    }
}

fn put_sig(out: &mut Vec<u8>, sig: &[u8; SIGNATURE_LEN]) {
    out.push(1);
    out.extend_from_slice(&(SIGNATURE_LEN as u16).to_be_bytes());
    out.extend_from_slice(sig);
}

fn read_sig(r: &mut Reader<'_>) -> Result<[u8; SIGNATURE_LEN], CodecError> {
    let t = r.u8()?;
    let len = r.u16()? as usize;
    if t == 1 {
        if len != SIGNATURE_LEN {
            return Err(CodecError::Invalid(format!("signature length {len}")));
        }
        r.array()
    } else {
        r.skip(len)?;
        Ok([0; SIGNATURE_LEN])
    }
}

fn read_ext(r: &mut Reader<'_>) -> Result<(), CodecError> {
    let n = r.u16()? as usize;
    r.skip(n)
}

/// The trailing signature and (skipped) extension of a marker-framed credential.
fn read_final_sig(r: &mut Reader<'_>) -> Result<[u8; SIGNATURE_LEN], CodecError> {
    let sig = read_sig(r)?;
    read_ext(r)?;
    Ok(sig)
}

fn controller_signed(nwid: NetworkId, signer: &Identity, signed_by: Address) -> bool {
    signer.address() == signed_by && nwid.controller() == signed_by
}

/// `MARKER ‖ body ‖ 0x0000 ‖ MARKER`: the signed form of the marker-framed credentials.
fn marked(body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut m = MARKER.to_vec();
    body(&mut m);
    m.extend_from_slice(&[0, 0]);
    m.extend_from_slice(&MARKER);
    m
}

/// The signing, verification and encoding shared by the controller-signed credentials
/// whose `body` ends with `signed_by` (tags, certificates of ownership, revocations).
macro_rules! controller_signed_credential {
    ($($t:ty),+) => {$(
        impl $t {
            /// The signed bytes.
            pub fn signed_message(&self) -> Vec<u8> {
                marked(|m| self.body(m))
            }

            /// Signs with the controller identity.
            pub fn sign(&mut self, signer: &Identity) -> Result<(), SignError> {
                self.signed_by = signer.address();
                self.signature = signer.sign(&self.signed_message())?;
                Ok(())
            }

            /// Verifies signer and signature.
            pub fn verify(&self, signer: &Identity) -> bool {
                controller_signed(self.nwid, signer, self.signed_by)
                    && signer.verify(&self.signed_message(), &self.signature)
            }

            /// Appends the binary form.
            pub fn encode(&self, out: &mut Vec<u8>) {
                self.body(out);
                put_sig(out, &self.signature);
                out.extend_from_slice(&[0, 0]);
            }
        }
    )+};
}

controller_signed_credential!(Tag, CertificateOfOwnership, Revocation);

/// The four identity-hash words of a COM: SHA-384(address ‖ 64-byte public key).
pub fn identity_hash(address: Address, public_key: &[u8; 64]) -> [u64; 4] {
    let mut h = Sha384::new();
    h.update(address.to_bytes());
    h.update(public_key);
    let d = h.finalize();
    let mut w = [0u64; 4];
    for (i, word) in w.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&d[i * 8..i * 8 + 8]);
        *word = u64::from_be_bytes(b);
    }
    w
}

/// One COM qualifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Qualifier {
    /// Qualifier id (0 timestamp, 1 network, 2 issued-to, 3..6 identity hash).
    pub id: u64,
    /// Value.
    pub value: u64,
    /// Maximum allowed difference for agreement.
    pub max_delta: u64,
}

/// A certificate of membership.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateOfMembership {
    /// Qualifiers in ascending id order.
    pub qualifiers: Vec<Qualifier>,
    /// Signer (zero address when unsigned).
    pub signed_by: Address,
    /// Signature (zeros when unsigned).
    pub signature: [u8; SIGNATURE_LEN],
}

impl CertificateOfMembership {
    /// An unsigned COM as the 1.x controller issues it.
    pub fn new(
        timestamp: u64,
        max_delta: u64,
        nwid: NetworkId,
        issued_to: Address,
        public_key: &[u8; 64],
    ) -> Self {
        let h = identity_hash(issued_to, public_key);
        let mut q = vec![
            Qualifier {
                id: 0,
                value: timestamp,
                max_delta,
            },
            Qualifier {
                id: 1,
                value: nwid.to_u64(),
                max_delta: 0,
            },
            Qualifier {
                id: 2,
                value: issued_to.to_u64(),
                max_delta: u64::MAX,
            },
        ];
        for (i, w) in h.iter().enumerate() {
            q.push(Qualifier {
                id: 3 + i as u64,
                value: *w,
                max_delta: u64::MAX,
            });
        }
        Self {
            qualifiers: q,
            signed_by: Address::default(),
            signature: [0; SIGNATURE_LEN],
        }
    }

    fn q(&self, id: u64) -> Option<&Qualifier> {
        self.qualifiers.iter().find(|q| q.id == id)
    }

    /// The timestamp qualifier.
    pub fn timestamp(&self) -> Option<u64> {
        self.q(0).map(|q| q.value)
    }

    /// The network qualifier.
    pub fn network_id(&self) -> Option<NetworkId> {
        self.q(1).map(|q| NetworkId::from(q.value))
    }

    /// The issued-to qualifier.
    pub fn issued_to(&self) -> Option<Address> {
        self.q(2).and_then(|q| Address::new(q.value).ok())
    }

    /// The signed bytes: the qualifiers as serialized.
    pub fn signed_message(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(24 * self.qualifiers.len());
        for q in &self.qualifiers {
            m.extend_from_slice(&q.id.to_be_bytes());
            m.extend_from_slice(&q.value.to_be_bytes());
            m.extend_from_slice(&q.max_delta.to_be_bytes());
        }
        m
    }

    /// Signs with the controller identity.
    pub fn sign(&mut self, signer: &Identity) -> Result<(), SignError> {
        self.signature = signer.sign(&self.signed_message())?;
        self.signed_by = signer.address();
        Ok(())
    }

    /// Verifies: signer is the network's controller and the signature is valid.
    pub fn verify(&self, signer: &Identity) -> bool {
        let Some(nwid) = self.network_id() else {
            return false;
        };
        self.signed_by.to_u64() != 0
            && self.qualifiers.len() <= COM_MAX_QUALIFIERS
            && controller_signed(nwid, signer, self.signed_by)
            && signer.verify(&self.signed_message(), &self.signature)
    }

    /// Agreement of my COM with theirs, given the identity they authenticated with.
    pub fn agrees_with(&self, theirs: &Self, their_address: Address, their_key: &[u8; 64]) -> bool {
        if self.qualifiers.is_empty() || theirs.qualifiers.is_empty() {
            return false;
        }
        let mut check_hash = false;
        for q in &self.qualifiers {
            let Some(t) = theirs.q(q.id) else {
                return false;
            };
            if q.value.abs_diff(t.value) > q.max_delta {
                return false;
            }
            if (3..=6).contains(&q.id) {
                check_hash = true;
            }
        }
        if check_hash {
            let h = identity_hash(their_address, their_key);
            for (i, w) in h.iter().enumerate() {
                if theirs.q(3 + i as u64).map(|q| q.value) != Some(*w) {
                    return false;
                }
            }
        }
        true
    }

    /// Appends the binary form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(1);
        out.extend_from_slice(&(self.qualifiers.len() as u16).to_be_bytes());
        out.extend_from_slice(&self.signed_message());
        out.extend_from_slice(&self.signed_by.to_bytes());
        if self.signed_by.to_u64() != 0 {
            out.extend_from_slice(&self.signature);
        }
    }

    /// Reads the binary form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        if r.u8()? != 1 {
            return Err(CodecError::Invalid("COM format marker".into()));
        }
        let n = r.u16()? as usize;
        if n > COM_MAX_QUALIFIERS {
            return Err(CodecError::TooMany("COM qualifiers"));
        }
        let mut qualifiers = Vec::with_capacity(n);
        for _ in 0..n {
            let q = Qualifier {
                id: r.u64()?,
                value: r.u64()?,
                max_delta: r.u64()?,
            };
            if qualifiers.last().is_some_and(|p: &Qualifier| p.id > q.id) {
                return Err(CodecError::Invalid("COM qualifier order".into()));
            }
            qualifiers.push(q);
        }
        let signed_by = r.address()?;
        let signature = if signed_by.to_u64() != 0 {
            r.array()?
        } else {
            [0; SIGNATURE_LEN]
        };
        Ok(Self {
            qualifiers,
            signed_by,
            signature,
        })
    }
}

/// A tag: a (id, value) pair issued to one member.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Tag {
    /// Network.
    pub nwid: NetworkId,
    /// Issue time (ms).
    pub timestamp: i64,
    /// Tag id.
    pub id: u32,
    /// Tag value.
    pub value: u32,
    /// Holder.
    pub issued_to: Address,
    /// Signer.
    pub signed_by: Address,
    /// Signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Tag {
    /// An unsigned tag.
    pub fn new(nwid: NetworkId, timestamp: i64, issued_to: Address, id: u32, value: u32) -> Self {
        Self {
            nwid,
            timestamp,
            id,
            value,
            issued_to,
            signed_by: Address::default(),
            signature: [0; SIGNATURE_LEN],
        }
    }

    fn body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.value.to_be_bytes());
        out.extend_from_slice(&self.issued_to.to_bytes());
        out.extend_from_slice(&self.signed_by.to_bytes());
    }

    /// Reads the binary form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(Self {
            nwid: NetworkId::from(r.u64()?),
            timestamp: r.u64()? as i64,
            id: r.u32()?,
            value: r.u32()?,
            issued_to: r.address()?,
            signed_by: r.address()?,
            signature: read_final_sig(r)?,
        })
    }
}

/// One custody chain entry of a capability.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Custody {
    /// Receiver.
    pub to: Address,
    /// Giver (entry 0: the controller).
    pub from: Address,
    /// Signature by `from`.
    pub signature: [u8; SIGNATURE_LEN],
}

/// A capability: a rule set a member may use beyond the base rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Capability {
    /// Network.
    pub nwid: NetworkId,
    /// Issue time (ms).
    pub timestamp: i64,
    /// Capability id.
    pub id: u32,
    /// Rules (at most 64).
    pub rules: Vec<Rule>,
    /// Maximum custody chain length (1..=7).
    pub max_custody_chain_length: u8,
    /// Custody chain.
    pub custody: Vec<Custody>,
}

impl Capability {
    /// An unsigned capability with no custody yet.
    pub fn new(nwid: NetworkId, timestamp: i64, id: u32, rules: Vec<Rule>, max_chain: u8) -> Self {
        Self {
            nwid,
            timestamp,
            id,
            rules,
            max_custody_chain_length: max_chain,
            custody: Vec::new(),
        }
    }

    fn head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(self.rules.len() as u16).to_be_bytes());
        encode_rules(&self.rules, out);
        out.push(self.max_custody_chain_length);
    }

    /// The signed bytes (the same for every custody entry).
    pub fn signed_message(&self) -> Vec<u8> {
        marked(|m| self.head(m))
    }

    /// Adds a custody entry `from` → `to`, signed by `from`.
    pub fn add_custody(&mut self, from: &Identity, to: Address) -> Result<(), SignError> {
        let signature = from.sign(&self.signed_message())?;
        self.custody.push(Custody {
            to,
            from: from.address(),
            signature,
        });
        Ok(())
    }

    /// The current holder: the last non-zero `to`.
    pub fn holder(&self) -> Option<Address> {
        self.custody
            .iter()
            .rev()
            .map(|c| c.to)
            .find(|a| a.to_u64() != 0)
    }

    /// Verifies the custody chain; `identity_of` resolves signer addresses.
    pub fn verify<'a>(&self, identity_of: impl Fn(Address) -> Option<&'a Identity>) -> bool {
        let m = usize::from(self.max_custody_chain_length);
        if !(1..=MAX_CUSTODY_CHAIN).contains(&m)
            || self.custody.is_empty()
            || self.custody.len() > m
        {
            return false;
        }
        let msg = self.signed_message();
        for (i, c) in self.custody.iter().enumerate() {
            if i == 0 {
                if c.to.to_u64() == 0 || c.from != self.nwid.controller() {
                    return false;
                }
            } else if c.to.to_u64() == 0 {
                return true;
            } else if c.from != self.custody[i - 1].to {
                return false;
            }
            match identity_of(c.from) {
                Some(id) if id.address() == c.from && id.verify(&msg, &c.signature) => {}
                _ => return false,
            }
        }
        true
    }

    /// Appends the binary form.
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.head(out);
        for c in &self.custody {
            out.extend_from_slice(&c.to.to_bytes());
            out.extend_from_slice(&c.from.to_bytes());
            put_sig(out, &c.signature);
        }
        out.extend_from_slice(&[0; 5]);
        out.extend_from_slice(&[0, 0]);
    }

    /// Reads the binary form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let nwid = NetworkId::from(r.u64()?);
        let timestamp = r.u64()? as i64;
        let id = r.u32()?;
        let n = r.u16()? as usize;
        if n > MAX_CAPABILITY_RULES {
            return Err(CodecError::TooMany("capability rules"));
        }
        let rules = decode_rule_count(r, n)?;
        let m = r.u8()?;
        if !(1..=MAX_CUSTODY_CHAIN as u8).contains(&m) {
            return Err(CodecError::Invalid(format!("custody chain length {m}")));
        }
        let mut custody = Vec::new();
        loop {
            let to = r.address()?;
            if to.to_u64() == 0 {
                break;
            }
            if custody.len() >= usize::from(m) {
                return Err(CodecError::TooMany("custody entries"));
            }
            let from = r.address()?;
            let signature = read_sig(r)?;
            custody.push(Custody {
                to,
                from,
                signature,
            });
        }
        read_ext(r)?;
        Ok(Self {
            nwid,
            timestamp,
            id,
            rules,
            max_custody_chain_length: m,
            custody,
        })
    }
}

/// Something a certificate of ownership can claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Thing {
    /// A MAC address (type 1).
    Mac(Mac),
    /// An IPv4 address (type 2).
    Ipv4(Ipv4Addr),
    /// An IPv6 address (type 3).
    Ipv6(Ipv6Addr),
    /// Any other type code with its 16 raw bytes.
    Other(u8, [u8; 16]),
}

impl Thing {
    fn to_wire(self) -> (u8, [u8; 16]) {
        let mut v = [0u8; 16];
        match self {
            Thing::Mac(m) => {
                v[..6].copy_from_slice(&m.0);
                (1, v)
            }
            Thing::Ipv4(a) => {
                v[..4].copy_from_slice(&a.octets());
                (2, v)
            }
            Thing::Ipv6(a) => (3, a.octets()),
            Thing::Other(t, raw) => (t, raw),
        }
    }

    fn from_wire(t: u8, v: [u8; 16]) -> Self {
        match t {
            1 if v[6..] == [0; 10] => Thing::Mac(Mac([v[0], v[1], v[2], v[3], v[4], v[5]])),
            2 if v[4..] == [0; 12] => Thing::Ipv4(Ipv4Addr::new(v[0], v[1], v[2], v[3])),
            3 => Thing::Ipv6(Ipv6Addr::from(v)),
            _ => Thing::Other(t, v),
        }
    }
}

/// A certificate of ownership of IPs and MACs.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CertificateOfOwnership {
    /// Network.
    pub nwid: NetworkId,
    /// Issue time (ms).
    pub timestamp: i64,
    /// Flags (0).
    pub flags: u64,
    /// Id.
    pub id: u32,
    /// Claimed things (at most 16).
    pub things: Vec<Thing>,
    /// Holder.
    pub issued_to: Address,
    /// Signer.
    pub signed_by: Address,
    /// Signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl CertificateOfOwnership {
    /// An unsigned, empty certificate.
    pub fn new(nwid: NetworkId, timestamp: i64, issued_to: Address, id: u32) -> Self {
        Self {
            nwid,
            timestamp,
            flags: 0,
            id,
            things: Vec::new(),
            issued_to,
            signed_by: Address::default(),
            signature: [0; SIGNATURE_LEN],
        }
    }

    /// Adds an IP address.
    pub fn add_ip(&mut self, ip: IpAddr) {
        if self.things.len() < COO_MAX_THINGS {
            self.things.push(match ip {
                IpAddr::V4(a) => Thing::Ipv4(a),
                IpAddr::V6(a) => Thing::Ipv6(a),
            });
        }
    }

    /// Whether this certificate claims `ip` (4 or 16 bytes).
    pub fn owns_ip(&self, ip: &[u8]) -> bool {
        self.things.iter().any(|t| match (t, ip.len()) {
            (Thing::Ipv4(a), 4) => a.octets() == ip,
            (Thing::Ipv6(a), 16) => a.octets() == ip,
            _ => false,
        })
    }

    /// Whether this certificate claims `mac`.
    pub fn owns_mac(&self, mac: Mac) -> bool {
        self.things.contains(&Thing::Mac(mac))
    }

    fn body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&(self.things.len() as u16).to_be_bytes());
        for t in &self.things {
            let (ty, v) = t.to_wire();
            out.push(ty);
            out.extend_from_slice(&v);
        }
        out.extend_from_slice(&self.issued_to.to_bytes());
        out.extend_from_slice(&self.signed_by.to_bytes());
    }

    /// Reads the binary form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        let nwid = NetworkId::from(r.u64()?);
        let timestamp = r.u64()? as i64;
        let flags = r.u64()?;
        let id = r.u32()?;
        let n = r.u16()? as usize;
        if n > COO_MAX_THINGS {
            return Err(CodecError::TooMany("ownership things"));
        }
        let mut things = Vec::with_capacity(n);
        for _ in 0..n {
            let t = r.u8()?;
            things.push(Thing::from_wire(t, r.array()?));
        }
        Ok(Self {
            nwid,
            timestamp,
            flags,
            id,
            things,
            issued_to: r.address()?,
            signed_by: r.address()?,
            signature: read_final_sig(r)?,
        })
    }
}

/// A revocation of credentials held by one member.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Revocation {
    /// Revocation id (random).
    pub id: u32,
    /// Network.
    pub nwid: NetworkId,
    /// Revoked credential id (0 for COMs).
    pub credential_id: u32,
    /// Credentials with timestamp <= threshold are revoked.
    pub threshold: i64,
    /// Flags (0x1 fast propagate).
    pub flags: u64,
    /// Member whose credentials are revoked.
    pub target: Address,
    /// Signer.
    pub signed_by: Address,
    /// Revoked credential type code.
    pub credential_type: u8,
    /// Signature.
    pub signature: [u8; SIGNATURE_LEN],
}

impl Revocation {
    /// Flag: forward to other members on receipt.
    pub const FAST_PROPAGATE: u64 = 1;

    /// An unsigned revocation.
    pub fn new(
        id: u32,
        nwid: NetworkId,
        credential_id: u32,
        threshold: i64,
        flags: u64,
        target: Address,
        credential_type: CredentialType,
    ) -> Self {
        Self {
            id,
            nwid,
            credential_id,
            threshold,
            flags,
            target,
            signed_by: Address::default(),
            credential_type: credential_type as u8,
            signature: [0; SIGNATURE_LEN],
        }
    }

    fn body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.nwid.to_bytes());
        out.extend_from_slice(&0u32.to_be_bytes());
        out.extend_from_slice(&self.credential_id.to_be_bytes());
        out.extend_from_slice(&self.threshold.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.target.to_bytes());
        out.extend_from_slice(&self.signed_by.to_bytes());
        out.push(self.credential_type);
    }

    /// Reads the binary form.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        r.skip(4)?;
        let id = r.u32()?;
        let nwid = NetworkId::from(r.u64()?);
        r.skip(4)?;
        Ok(Self {
            id,
            nwid,
            credential_id: r.u32()?,
            threshold: r.u64()? as i64,
            flags: r.u64()?,
            target: r.address()?,
            signed_by: r.address()?,
            credential_type: r.u8()?,
            signature: read_final_sig(r)?,
        })
    }
}
