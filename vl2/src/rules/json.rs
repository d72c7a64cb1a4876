//! The controller's JSON form of rules (`_parseRule` / `_renderRule` of the embedded
//! controller): lenient on input, canonical on output (keys sorted as nlohmann emits them).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde_json::{Map, Value, json};

use super::{Rule, RuleKind, TagOp};
use crate::Mac;
use crate::jsonutil::{json_bool, json_int, parse_hex_u64};

fn address_from(v: Option<&Value>) -> u64 {
    let s = v.and_then(Value::as_str).unwrap_or("0");
    parse_hex_u64(s) & 0xff_ffff_ffff
}

fn ip_with_bits(v: Option<&Value>) -> (Option<IpAddr>, u16) {
    let Some(s) = v.and_then(Value::as_str) else {
        return (None, 0);
    };
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip, bits.trim().parse::<u16>().unwrap_or(0)),
        None => (s, 0),
    };
    (ip.trim().parse::<IpAddr>().ok(), bits & 0xff)
}

/// Parses one JSON rule like the embedded controller; `None` for entries it drops
/// (unknown `type`, `ACTION_PRIORITY`, `INTEGER_RANGE`, non-objects).
pub fn rule_from_json(v: &Value) -> Option<Rule> {
    let obj = v.as_object()?;
    let t = obj.get("type").and_then(Value::as_str).unwrap_or("");
    let not = json_bool(obj.get("not"), false);
    let or = json_bool(obj.get("or"), false);
    let int = |k: &str, d: u64| json_int(obj.get(k), d);
    let fwd = || {
        (
            address_from(obj.get("address")),
            (int("flags", 0) & 0xffff_ffff) as u32,
            (int("length", 0) & 0xffff) as u16,
        )
    };
    let range = || {
        let start = (int("start", 0) & 0xffff) as u16;
        let end = (int("end", u64::from(start)) & 0xffff) as u16;
        (start, end)
    };
    let tag = |op| RuleKind::Tags {
        op,
        id: (int("id", 0) & 0xffff_ffff) as u32,
        value: (int("value", 0) & 0xffff_ffff) as u32,
    };
    let v4 = || match ip_with_bits(obj.get("ip")) {
        (Some(IpAddr::V4(a)), bits) => (a, bits.min(32) as u8),
        (_, bits) => (Ipv4Addr::UNSPECIFIED, bits.min(32) as u8),
    };
    let v6 = || match ip_with_bits(obj.get("ip")) {
        (Some(IpAddr::V6(a)), bits) => (a, bits.min(128) as u8),
        (_, bits) => (Ipv6Addr::UNSPECIFIED, bits.min(128) as u8),
    };
    let mac = || {
        let s = obj.get("mac").and_then(Value::as_str).unwrap_or("0");
        let hex: Vec<u8> = s.bytes().filter(u8::is_ascii_hexdigit).collect();
        let mut m = [0u8; 6];
        for (i, pair) in hex.chunks_exact(2).take(6).enumerate() {
            let text = std::str::from_utf8(pair).unwrap_or("0");
            m[i] = u8::from_str_radix(text, 16).unwrap_or(0);
        }
        Mac(m)
    };
    let zt = || {
        let s = obj.get("zt").and_then(Value::as_str).unwrap_or("0");
        flatwire_vl1::Address::new(parse_hex_u64(s) & 0xff_ffff_ffff).unwrap_or_default()
    };
    let kind = match t {
        "ACTION_DROP" => RuleKind::Drop,
        "ACTION_ACCEPT" => RuleKind::Accept,
        "ACTION_BREAK" => RuleKind::Break,
        "ACTION_TEE" => {
            let (address, flags, length) = fwd();
            RuleKind::Tee {
                address,
                flags,
                length,
            }
        }
        "ACTION_WATCH" => {
            let (address, flags, length) = fwd();
            RuleKind::Watch {
                address,
                flags,
                length,
            }
        }
        "ACTION_REDIRECT" => {
            let (address, flags, _) = fwd();
            RuleKind::Redirect {
                address,
                flags,
                length: 0,
            }
        }
        "MATCH_SOURCE_ZEROTIER_ADDRESS" => RuleKind::SourceZt(zt()),
        "MATCH_DEST_ZEROTIER_ADDRESS" => RuleKind::DestZt(zt()),
        "MATCH_VLAN_ID" => RuleKind::VlanId((int("vlanId", 0) & 0xffff) as u16),
        "MATCH_VLAN_PCP" => RuleKind::VlanPcp((int("vlanPcp", 0) & 0xff) as u8),
        "MATCH_VLAN_DEI" => RuleKind::VlanDei((int("vlanDei", 0) & 0xff) as u8),
        "MATCH_MAC_SOURCE" => RuleKind::MacSource(mac()),
        "MATCH_MAC_DEST" => RuleKind::MacDest(mac()),
        "MATCH_IPV4_SOURCE" => {
            let (a, b) = v4();
            RuleKind::Ipv4Source(a, b)
        }
        "MATCH_IPV4_DEST" => {
            let (a, b) = v4();
            RuleKind::Ipv4Dest(a, b)
        }
        "MATCH_IPV6_SOURCE" => {
            let (a, b) = v6();
            RuleKind::Ipv6Source(a, b)
        }
        "MATCH_IPV6_DEST" => {
            let (a, b) = v6();
            RuleKind::Ipv6Dest(a, b)
        }
        "MATCH_IP_TOS" => RuleKind::IpTos {
            mask: (int("mask", 0) & 0xff) as u8,
            start: (int("start", 0) & 0xff) as u8,
            end: (int("end", 0) & 0xff) as u8,
        },
        "MATCH_IP_PROTOCOL" => RuleKind::IpProtocol((int("ipProtocol", 0) & 0xff) as u8),
        "MATCH_ETHERTYPE" => RuleKind::Ethertype((int("etherType", 0) & 0xffff) as u16),
        "MATCH_ICMP" => {
            let icmp_type = (int("icmpType", 0) & 0xff) as u8;
            match obj.get("icmpCode") {
                None | Some(Value::Null) => RuleKind::Icmp {
                    icmp_type,
                    code: 0,
                    flags: 0,
                },
                Some(c) => RuleKind::Icmp {
                    icmp_type,
                    code: (json_int(Some(c), 0) & 0xff) as u8,
                    flags: 1,
                },
            }
        }
        "MATCH_IP_SOURCE_PORT_RANGE" => {
            let (a, b) = range();
            RuleKind::SourcePortRange(a, b)
        }
        "MATCH_IP_DEST_PORT_RANGE" => {
            let (a, b) = range();
            RuleKind::DestPortRange(a, b)
        }
        "MATCH_FRAME_SIZE_RANGE" => {
            let (a, b) = range();
            RuleKind::FrameSizeRange(a, b)
        }
        "MATCH_CHARACTERISTICS" => RuleKind::Characteristics(match obj.get("mask") {
            Some(Value::String(s)) => parse_hex_u64(s),
            Some(v @ Value::Number(_)) => json_int(Some(v), 0),
            _ => 0,
        }),
        "MATCH_RANDOM" => RuleKind::Random((int("probability", 0) & 0xffff_ffff) as u32),
        "MATCH_TAGS_DIFFERENCE" => tag(TagOp::Difference),
        "MATCH_TAGS_BITWISE_AND" => tag(TagOp::BitwiseAnd),
        "MATCH_TAGS_BITWISE_OR" => tag(TagOp::BitwiseOr),
        "MATCH_TAGS_BITWISE_XOR" => tag(TagOp::BitwiseXor),
        "MATCH_TAGS_EQUAL" => tag(TagOp::Equal),
        "MATCH_TAG_SENDER" => tag(TagOp::Sender),
        "MATCH_TAG_RECEIVER" => tag(TagOp::Receiver),
        // The reference parser never sets the INTEGER_RANGE type and drops the entry;
        // ACTION_PRIORITY is unknown to it.
        _ => return None,
    };
    Some(Rule { not, or, kind })
}

/// Parses a JSON array of rules, dropping entries the controller drops, up to `max`.
pub fn rules_from_json(v: &Value, max: usize) -> Vec<Rule> {
    v.as_array()
        .map(|a| a.iter().filter_map(rule_from_json).take(max).collect())
        .unwrap_or_default()
}

/// Renders a rule canonically (the controller's stored form); `None` for types it
/// cannot render (priority and unknown types).
pub fn rule_to_json(rule: &Rule) -> Option<Value> {
    use RuleKind::*;
    let hex40 = |a: u64| format!("{:010x}", a & 0xff_ffff_ffff);
    let action = match &rule.kind {
        Drop => Some(json!({"type": "ACTION_DROP"})),
        Accept => Some(json!({"type": "ACTION_ACCEPT"})),
        Break => Some(json!({"type": "ACTION_BREAK"})),
        Tee {
            address,
            flags,
            length,
        } => Some(
            json!({"type": "ACTION_TEE", "address": hex40(*address), "flags": flags, "length": length}),
        ),
        Watch {
            address,
            flags,
            length,
        } => Some(
            json!({"type": "ACTION_WATCH", "address": hex40(*address), "flags": flags, "length": length}),
        ),
        Redirect { address, flags, .. } => {
            Some(json!({"type": "ACTION_REDIRECT", "address": hex40(*address), "flags": flags}))
        }
        Priority | UnknownAction(_) | UnknownMatch(_) => return None,
        _ => None,
    };
    if action.is_some() {
        return action;
    }
    let mut m = Map::new();
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_owned(), v);
    };
    let name = match &rule.kind {
        SourceZt(a) => {
            put("zt", json!(a.to_string()));
            "MATCH_SOURCE_ZEROTIER_ADDRESS"
        }
        DestZt(a) => {
            put("zt", json!(a.to_string()));
            "MATCH_DEST_ZEROTIER_ADDRESS"
        }
        VlanId(v) => {
            put("vlanId", json!(v));
            "MATCH_VLAN_ID"
        }
        VlanPcp(v) => {
            put("vlanPcp", json!(v));
            "MATCH_VLAN_PCP"
        }
        VlanDei(v) => {
            put("vlanDei", json!(v));
            "MATCH_VLAN_DEI"
        }
        MacSource(mac) => {
            put("mac", json!(mac.to_string()));
            "MATCH_MAC_SOURCE"
        }
        MacDest(mac) => {
            put("mac", json!(mac.to_string()));
            "MATCH_MAC_DEST"
        }
        Ipv4Source(ip, b) => {
            put("ip", json!(format!("{ip}/{b}")));
            "MATCH_IPV4_SOURCE"
        }
        Ipv4Dest(ip, b) => {
            put("ip", json!(format!("{ip}/{b}")));
            "MATCH_IPV4_DEST"
        }
        Ipv6Source(ip, b) => {
            put("ip", json!(format!("{ip}/{b}")));
            "MATCH_IPV6_SOURCE"
        }
        Ipv6Dest(ip, b) => {
            put("ip", json!(format!("{ip}/{b}")));
            "MATCH_IPV6_DEST"
        }
        IpTos { mask, start, end } => {
            put("mask", json!(mask));
            put("start", json!(start));
            put("end", json!(end));
            "MATCH_IP_TOS"
        }
        IpProtocol(p) => {
            put("ipProtocol", json!(p));
            "MATCH_IP_PROTOCOL"
        }
        Ethertype(e) => {
            put("etherType", json!(e));
            "MATCH_ETHERTYPE"
        }
        Icmp {
            icmp_type,
            code,
            flags,
        } => {
            put("icmpType", json!(icmp_type));
            put(
                "icmpCode",
                if flags & 1 != 0 {
                    json!(code)
                } else {
                    Value::Null
                },
            );
            "MATCH_ICMP"
        }
        SourcePortRange(a, b) => {
            put("start", json!(a));
            put("end", json!(b));
            "MATCH_IP_SOURCE_PORT_RANGE"
        }
        DestPortRange(a, b) => {
            put("start", json!(a));
            put("end", json!(b));
            "MATCH_IP_DEST_PORT_RANGE"
        }
        FrameSizeRange(a, b) => {
            put("start", json!(a));
            put("end", json!(b));
            "MATCH_FRAME_SIZE_RANGE"
        }
        Characteristics(mask) => {
            put("mask", json!(format!("{mask:016x}")));
            "MATCH_CHARACTERISTICS"
        }
        Random(p) => {
            put("probability", json!(p));
            "MATCH_RANDOM"
        }
        Tags { op, id, value } => {
            put("id", json!(id));
            put("value", json!(value));
            match op {
                TagOp::Difference => "MATCH_TAGS_DIFFERENCE",
                TagOp::BitwiseAnd => "MATCH_TAGS_BITWISE_AND",
                TagOp::BitwiseOr => "MATCH_TAGS_BITWISE_OR",
                TagOp::BitwiseXor => "MATCH_TAGS_BITWISE_XOR",
                TagOp::Equal => "MATCH_TAGS_EQUAL",
                TagOp::Sender => "MATCH_TAG_SENDER",
                TagOp::Receiver => "MATCH_TAG_RECEIVER",
            }
        }
        IntegerRange {
            start,
            span,
            index,
            format,
        } => {
            put("start", json!(format!("{start:016x}")));
            put(
                "end",
                json!(format!("{:016x}", start.wrapping_add(u64::from(*span)))),
            );
            put("idx", json!(index));
            put("little", json!(format & 0x80 != 0));
            put("bits", json!((format & 63) + 1));
            "INTEGER_RANGE"
        }
        _ => return None,
    };
    put("type", json!(name));
    put("not", json!(rule.not));
    put("or", json!(rule.or));
    Some(Value::Object(m))
}

/// Renders a rule list canonically, skipping entries that have no JSON form.
pub fn rules_to_json(rules: &[Rule]) -> Value {
    Value::Array(rules.iter().filter_map(rule_to_json).collect())
}
