//! Network rules: the binary rule-entry codec, the controller's JSON form, the evaluator
//! ([`eval`]) and the rule-language compiler ([`compiler`]).

pub mod compiler;
pub mod eval;
mod json;

use std::net::{Ipv4Addr, Ipv6Addr};

use flatwire_vl1::Address;

use crate::Mac;
use crate::codec::{CodecError, Reader};

pub use json::{rule_from_json, rule_to_json, rules_from_json, rules_to_json};

/// Maximum rules in a network's base rule table.
pub const MAX_RULES: usize = 1024;
/// Maximum rules in one capability.
pub const MAX_CAPABILITY_RULES: usize = 64;

/// Type codes of rule entries (low 6 bits of the entry's first byte).
pub mod types {
    #![allow(missing_docs)]
    pub const ACTION_DROP: u8 = 0;
    pub const ACTION_ACCEPT: u8 = 1;
    pub const ACTION_TEE: u8 = 2;
    pub const ACTION_WATCH: u8 = 3;
    pub const ACTION_REDIRECT: u8 = 4;
    pub const ACTION_BREAK: u8 = 5;
    pub const ACTION_PRIORITY: u8 = 6;
    pub const MATCH_SOURCE_ZEROTIER_ADDRESS: u8 = 24;
    pub const MATCH_DEST_ZEROTIER_ADDRESS: u8 = 25;
    pub const MATCH_VLAN_ID: u8 = 26;
    pub const MATCH_VLAN_PCP: u8 = 27;
    pub const MATCH_VLAN_DEI: u8 = 28;
    pub const MATCH_MAC_SOURCE: u8 = 29;
    pub const MATCH_MAC_DEST: u8 = 30;
    pub const MATCH_IPV4_SOURCE: u8 = 31;
    pub const MATCH_IPV4_DEST: u8 = 32;
    pub const MATCH_IPV6_SOURCE: u8 = 33;
    pub const MATCH_IPV6_DEST: u8 = 34;
    pub const MATCH_IP_TOS: u8 = 35;
    pub const MATCH_IP_PROTOCOL: u8 = 36;
    pub const MATCH_ETHERTYPE: u8 = 37;
    pub const MATCH_ICMP: u8 = 38;
    pub const MATCH_IP_SOURCE_PORT_RANGE: u8 = 39;
    pub const MATCH_IP_DEST_PORT_RANGE: u8 = 40;
    pub const MATCH_CHARACTERISTICS: u8 = 41;
    pub const MATCH_FRAME_SIZE_RANGE: u8 = 42;
    pub const MATCH_RANDOM: u8 = 43;
    pub const MATCH_TAGS_DIFFERENCE: u8 = 44;
    pub const MATCH_TAGS_BITWISE_AND: u8 = 45;
    pub const MATCH_TAGS_BITWISE_OR: u8 = 46;
    pub const MATCH_TAGS_BITWISE_XOR: u8 = 47;
    pub const MATCH_TAGS_EQUAL: u8 = 48;
    pub const MATCH_TAG_SENDER: u8 = 49;
    pub const MATCH_TAG_RECEIVER: u8 = 50;
    pub const MATCH_INTEGER_RANGE: u8 = 51;
}

/// Bits of the characteristics computed for `MATCH_CHARACTERISTICS`.
pub mod characteristics {
    #![allow(missing_docs)]
    pub const INBOUND: u64 = 0x8000_0000_0000_0000;
    pub const MULTICAST: u64 = 0x4000_0000_0000_0000;
    pub const BROADCAST: u64 = 0x2000_0000_0000_0000;
    pub const SENDER_IP_AUTHENTICATED: u64 = 0x1000_0000_0000_0000;
    pub const SENDER_MAC_AUTHENTICATED: u64 = 0x0800_0000_0000_0000;
    pub const TCP_RESERVED_0: u64 = 0x800;
    pub const TCP_RESERVED_1: u64 = 0x400;
    pub const TCP_RESERVED_2: u64 = 0x200;
    pub const TCP_NS: u64 = 0x100;
    pub const TCP_CWR: u64 = 0x80;
    pub const TCP_ECE: u64 = 0x40;
    pub const TCP_URG: u64 = 0x20;
    pub const TCP_ACK: u64 = 0x10;
    pub const TCP_PSH: u64 = 0x08;
    pub const TCP_RST: u64 = 0x04;
    pub const TCP_SYN: u64 = 0x02;
    pub const TCP_FIN: u64 = 0x01;
}

/// Which tag comparison a tag match performs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TagOp {
    /// `|local - remote| <= value`.
    Difference,
    /// `(local & remote) == value`.
    BitwiseAnd,
    /// `(local | remote) == value`.
    BitwiseOr,
    /// `(local ^ remote) == value`.
    BitwiseXor,
    /// `local == value && remote == value`.
    Equal,
    /// The sender's tag equals value.
    Sender,
    /// The receiver's tag equals value.
    Receiver,
}

/// What a rule entry does: an action or a match, with its value.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum RuleKind {
    /// Drop the frame.
    Drop,
    /// Accept the frame.
    Accept,
    /// Copy (up to `length` bytes, 0 = all) to `address` and continue.
    Tee {
        /// Copy target (40 bits).
        address: u64,
        /// Flags (unused by 1.x, carried).
        flags: u32,
        /// Bytes to copy, 0 = whole frame.
        length: u16,
    },
    /// Like TEE but the copy is marked as a watch copy.
    Watch {
        /// Copy target (40 bits).
        address: u64,
        /// Flags.
        flags: u32,
        /// Bytes to copy, 0 = whole frame.
        length: u16,
    },
    /// Send the frame to `address` instead.
    Redirect {
        /// New destination (40 bits).
        address: u64,
        /// Flags.
        flags: u32,
        /// Carried on the wire, unused.
        length: u16,
    },
    /// Stop evaluating this rule list without a verdict.
    Break,
    /// QoS priority (accepts; the bucket is not carried on the wire).
    Priority,
    /// An action type this implementation does not know (ignored by the evaluator).
    UnknownAction(u8),
    /// Sender's ZeroTier address equals.
    SourceZt(Address),
    /// Receiver's ZeroTier address equals.
    DestZt(Address),
    /// VLAN id equals.
    VlanId(u16),
    /// VLAN PCP equals (always compared with 0).
    VlanPcp(u8),
    /// VLAN DEI equals (always compared with 0).
    VlanDei(u8),
    /// Source MAC equals.
    MacSource(Mac),
    /// Destination MAC equals.
    MacDest(Mac),
    /// IPv4 source in prefix.
    Ipv4Source(Ipv4Addr, u8),
    /// IPv4 destination in prefix.
    Ipv4Dest(Ipv4Addr, u8),
    /// IPv6 source in prefix.
    Ipv6Source(Ipv6Addr, u8),
    /// IPv6 destination in prefix.
    Ipv6Dest(Ipv6Addr, u8),
    /// IP TOS / traffic class `& mask` in `start..=end`.
    IpTos {
        /// Mask applied first.
        mask: u8,
        /// Range start.
        start: u8,
        /// Range end.
        end: u8,
    },
    /// IP protocol (after IPv6 extension headers) equals.
    IpProtocol(u8),
    /// Ethertype equals.
    Ethertype(u16),
    /// ICMP type (and code when `flags & 1`).
    Icmp {
        /// ICMP type.
        icmp_type: u8,
        /// ICMP code.
        code: u8,
        /// 0x01 = also compare the code.
        flags: u8,
    },
    /// Source port in range.
    SourcePortRange(u16, u16),
    /// Destination port in range.
    DestPortRange(u16, u16),
    /// Any of the mask's characteristics bits present.
    Characteristics(u64),
    /// Ethernet payload length in range.
    FrameSizeRange(u16, u16),
    /// Random number `<=` probability.
    Random(u32),
    /// A tag comparison.
    Tags {
        /// Which comparison.
        op: TagOp,
        /// Tag id.
        id: u32,
        /// Rule value.
        value: u32,
    },
    /// An integer read from the frame lies in `start..=start+span`.
    IntegerRange {
        /// Range start.
        start: u64,
        /// Span (end - start), 32 bits as in the reference.
        span: u32,
        /// Byte index into the payload.
        index: u16,
        /// Bit 7 little-endian, low 6 bits width-1.
        format: u8,
    },
    /// A match type this implementation does not know.
    UnknownMatch(u8),
}

/// One rule entry: NOT/OR flags plus what it does.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Invert the match result (ignored for actions).
    pub not: bool,
    /// Combine with the previous result by OR instead of AND (ignored for actions).
    pub or: bool,
    /// The action or match.
    pub kind: RuleKind,
}

impl Rule {
    /// A rule without NOT/OR flags.
    pub fn new(kind: RuleKind) -> Self {
        Self {
            not: false,
            or: false,
            kind,
        }
    }

    /// The type code (0..=63).
    pub fn type_code(&self) -> u8 {
        use RuleKind::*;
        use types::*;
        match &self.kind {
            Drop => ACTION_DROP,
            Accept => ACTION_ACCEPT,
            Tee { .. } => ACTION_TEE,
            Watch { .. } => ACTION_WATCH,
            Redirect { .. } => ACTION_REDIRECT,
            Break => ACTION_BREAK,
            Priority => ACTION_PRIORITY,
            UnknownAction(t) | UnknownMatch(t) => *t & 0x3f,
            SourceZt(_) => MATCH_SOURCE_ZEROTIER_ADDRESS,
            DestZt(_) => MATCH_DEST_ZEROTIER_ADDRESS,
            VlanId(_) => MATCH_VLAN_ID,
            VlanPcp(_) => MATCH_VLAN_PCP,
            VlanDei(_) => MATCH_VLAN_DEI,
            MacSource(_) => MATCH_MAC_SOURCE,
            MacDest(_) => MATCH_MAC_DEST,
            Ipv4Source(..) => MATCH_IPV4_SOURCE,
            Ipv4Dest(..) => MATCH_IPV4_DEST,
            Ipv6Source(..) => MATCH_IPV6_SOURCE,
            Ipv6Dest(..) => MATCH_IPV6_DEST,
            IpTos { .. } => MATCH_IP_TOS,
            IpProtocol(_) => MATCH_IP_PROTOCOL,
            Ethertype(_) => MATCH_ETHERTYPE,
            Icmp { .. } => MATCH_ICMP,
            SourcePortRange(..) => MATCH_IP_SOURCE_PORT_RANGE,
            DestPortRange(..) => MATCH_IP_DEST_PORT_RANGE,
            Characteristics(_) => MATCH_CHARACTERISTICS,
            FrameSizeRange(..) => MATCH_FRAME_SIZE_RANGE,
            Random(_) => MATCH_RANDOM,
            Tags { op, .. } => match op {
                TagOp::Difference => MATCH_TAGS_DIFFERENCE,
                TagOp::BitwiseAnd => MATCH_TAGS_BITWISE_AND,
                TagOp::BitwiseOr => MATCH_TAGS_BITWISE_OR,
                TagOp::BitwiseXor => MATCH_TAGS_BITWISE_XOR,
                TagOp::Equal => MATCH_TAGS_EQUAL,
                TagOp::Sender => MATCH_TAG_SENDER,
                TagOp::Receiver => MATCH_TAG_RECEIVER,
            },
            IntegerRange { .. } => MATCH_INTEGER_RANGE,
        }
    }

    /// True for actions (type 0..=15).
    pub fn is_action(&self) -> bool {
        self.type_code() <= 15
    }

    /// The entry's first byte: type plus NOT (0x80) and OR (0x40).
    pub fn t_byte(&self) -> u8 {
        self.type_code() | if self.not { 0x80 } else { 0 } | if self.or { 0x40 } else { 0 }
    }

    /// Appends the binary entry `t, L, value`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use RuleKind::*;
        out.push(self.t_byte());
        match &self.kind {
            Tee {
                address,
                flags,
                length,
            }
            | Watch {
                address,
                flags,
                length,
            }
            | Redirect {
                address,
                flags,
                length,
            } => {
                out.push(14);
                out.extend_from_slice(&(address & 0xff_ffff_ffff).to_be_bytes());
                out.extend_from_slice(&flags.to_be_bytes());
                out.extend_from_slice(&length.to_be_bytes());
            }
            SourceZt(a) | DestZt(a) => {
                out.push(5);
                out.extend_from_slice(&a.to_bytes());
            }
            VlanId(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_be_bytes());
            }
            VlanPcp(v) | VlanDei(v) | IpProtocol(v) => {
                out.push(1);
                out.push(*v);
            }
            MacSource(m) | MacDest(m) => {
                out.push(6);
                out.extend_from_slice(&m.0);
            }
            Ipv4Source(ip, bits) | Ipv4Dest(ip, bits) => {
                out.push(5);
                out.extend_from_slice(&ip.octets());
                out.push(*bits);
            }
            Ipv6Source(ip, bits) | Ipv6Dest(ip, bits) => {
                out.push(17);
                out.extend_from_slice(&ip.octets());
                out.push(*bits);
            }
            IpTos { mask, start, end } => out.extend_from_slice(&[3, *mask, *start, *end]),
            Ethertype(v) => {
                out.push(2);
                out.extend_from_slice(&v.to_be_bytes());
            }
            Icmp {
                icmp_type,
                code,
                flags,
            } => out.extend_from_slice(&[3, *icmp_type, *code, *flags]),
            SourcePortRange(a, b) | DestPortRange(a, b) | FrameSizeRange(a, b) => {
                out.push(4);
                out.extend_from_slice(&a.to_be_bytes());
                out.extend_from_slice(&b.to_be_bytes());
            }
            Characteristics(m) => {
                out.push(8);
                out.extend_from_slice(&m.to_be_bytes());
            }
            Random(p) => {
                out.push(4);
                out.extend_from_slice(&p.to_be_bytes());
            }
            Tags { id, value, .. } => {
                out.push(8);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&value.to_be_bytes());
            }
            IntegerRange {
                start,
                span,
                index,
                format,
            } => {
                out.push(19);
                out.extend_from_slice(&start.to_be_bytes());
                out.extend_from_slice(&start.wrapping_add(u64::from(*span)).to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.push(*format);
            }
            Drop | Accept | Break | Priority | UnknownAction(_) | UnknownMatch(_) => out.push(0),
        }
    }

    /// Reads one binary entry. Like the reference, the value is read by type and then
    /// exactly `L` bytes are skipped; a value longer than `L` is refused here rather than
    /// read past the entry.
    pub fn decode(r: &mut Reader<'_>) -> Result<Rule, CodecError> {
        use RuleKind::*;
        use types::*;
        let t = r.u8()?;
        let len = r.u8()? as usize;
        let value = r.bytes(len)?;
        let mut v = Reader::new(value);
        let ty = t & 0x3f;
        let need = |n: usize| {
            if len < n {
                Err(CodecError::Invalid(format!(
                    "rule type {ty} needs {n} value bytes, has {len}"
                )))
            } else {
                Ok(())
            }
        };
        let kind = match ty {
            ACTION_DROP => Drop,
            ACTION_ACCEPT => Accept,
            ACTION_TEE | ACTION_WATCH | ACTION_REDIRECT => {
                need(14)?;
                let address = v.u64()? & 0xff_ffff_ffff;
                let flags = v.u32()?;
                let length = v.u16()?;
                match ty {
                    ACTION_TEE => Tee {
                        address,
                        flags,
                        length,
                    },
                    ACTION_WATCH => Watch {
                        address,
                        flags,
                        length,
                    },
                    _ => Redirect {
                        address,
                        flags,
                        length,
                    },
                }
            }
            ACTION_BREAK => Break,
            ACTION_PRIORITY => Priority,
            7..=15 => UnknownAction(ty),
            MATCH_SOURCE_ZEROTIER_ADDRESS => {
                need(5)?;
                SourceZt(v.address()?)
            }
            MATCH_DEST_ZEROTIER_ADDRESS => {
                need(5)?;
                DestZt(v.address()?)
            }
            MATCH_VLAN_ID => {
                need(2)?;
                VlanId(v.u16()?)
            }
            MATCH_VLAN_PCP => {
                need(1)?;
                VlanPcp(v.u8()?)
            }
            MATCH_VLAN_DEI => {
                need(1)?;
                VlanDei(v.u8()?)
            }
            MATCH_MAC_SOURCE => {
                need(6)?;
                MacSource(Mac(v.array()?))
            }
            MATCH_MAC_DEST => {
                need(6)?;
                MacDest(Mac(v.array()?))
            }
            MATCH_IPV4_SOURCE | MATCH_IPV4_DEST => {
                need(5)?;
                let ip = Ipv4Addr::from(v.array::<4>()?);
                let bits = v.u8()?;
                if ty == MATCH_IPV4_SOURCE {
                    Ipv4Source(ip, bits)
                } else {
                    Ipv4Dest(ip, bits)
                }
            }
            MATCH_IPV6_SOURCE | MATCH_IPV6_DEST => {
                need(17)?;
                let ip = Ipv6Addr::from(v.array::<16>()?);
                let bits = v.u8()?;
                if ty == MATCH_IPV6_SOURCE {
                    Ipv6Source(ip, bits)
                } else {
                    Ipv6Dest(ip, bits)
                }
            }
            MATCH_IP_TOS => {
                need(3)?;
                IpTos {
                    mask: v.u8()?,
                    start: v.u8()?,
                    end: v.u8()?,
                }
            }
            MATCH_IP_PROTOCOL => {
                need(1)?;
                IpProtocol(v.u8()?)
            }
            MATCH_ETHERTYPE => {
                need(2)?;
                Ethertype(v.u16()?)
            }
            MATCH_ICMP => {
                need(3)?;
                Icmp {
                    icmp_type: v.u8()?,
                    code: v.u8()?,
                    flags: v.u8()?,
                }
            }
            MATCH_IP_SOURCE_PORT_RANGE | MATCH_IP_DEST_PORT_RANGE | MATCH_FRAME_SIZE_RANGE => {
                need(4)?;
                let a = v.u16()?;
                let b = v.u16()?;
                match ty {
                    MATCH_IP_SOURCE_PORT_RANGE => SourcePortRange(a, b),
                    MATCH_IP_DEST_PORT_RANGE => DestPortRange(a, b),
                    _ => FrameSizeRange(a, b),
                }
            }
            MATCH_CHARACTERISTICS => {
                need(8)?;
                Characteristics(v.u64()?)
            }
            MATCH_RANDOM => {
                need(4)?;
                Random(v.u32()?)
            }
            MATCH_TAGS_DIFFERENCE..=MATCH_TAG_RECEIVER => {
                need(8)?;
                let op = match ty {
                    MATCH_TAGS_DIFFERENCE => TagOp::Difference,
                    MATCH_TAGS_BITWISE_AND => TagOp::BitwiseAnd,
                    MATCH_TAGS_BITWISE_OR => TagOp::BitwiseOr,
                    MATCH_TAGS_BITWISE_XOR => TagOp::BitwiseXor,
                    MATCH_TAGS_EQUAL => TagOp::Equal,
                    MATCH_TAG_SENDER => TagOp::Sender,
                    _ => TagOp::Receiver,
                };
                Tags {
                    op,
                    id: v.u32()?,
                    value: v.u32()?,
                }
            }
            MATCH_INTEGER_RANGE => {
                need(19)?;
                let start = v.u64()?;
                let end = v.u64()?;
                IntegerRange {
                    start,
                    span: end.wrapping_sub(start) as u32,
                    index: v.u16()?,
                    format: v.u8()?,
                }
            }
            _ => UnknownMatch(ty),
        };
        Ok(Rule {
            not: t & 0x80 != 0,
            or: t & 0x40 != 0,
            kind,
        })
    }
}

/// Appends every rule's binary entry.
pub fn encode_rules(rules: &[Rule], out: &mut Vec<u8>) {
    for r in rules {
        r.encode(out);
    }
}

/// Reads rule entries until the input ends or `max` rules were read.
pub fn decode_rules(data: &[u8], max: usize) -> Result<Vec<Rule>, CodecError> {
    let mut r = Reader::new(data);
    let mut out = Vec::new();
    while r.remaining() > 0 && out.len() < max {
        out.push(Rule::decode(&mut r)?);
    }
    Ok(out)
}

/// Reads exactly `count` rule entries from a reader (capabilities carry a count).
pub fn decode_rule_count(r: &mut Reader<'_>, count: usize) -> Result<Vec<Rule>, CodecError> {
    let mut out = Vec::with_capacity(count.min(MAX_RULES));
    for _ in 0..count {
        out.push(Rule::decode(r)?);
    }
    Ok(out)
}
