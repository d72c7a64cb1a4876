//! Known-answer tests for the rule codec, the compiler and the evaluator.

mod common;

use common::{s, unhex, vl2};
use flatwire_vl1::Address;
use flatwire_vl2::Mac;
use flatwire_vl2::rules::compiler::compile;
use flatwire_vl2::rules::eval::{Credentials, Env, Frame, Semantics, Verdict, evaluate};
use flatwire_vl2::rules::{
    MAX_RULES, Rule, decode_rules, encode_rules, rule_from_json, rule_to_json, rules_from_json,
};
use serde_json::Value;

fn hex_rules(rules: &[Rule]) -> String {
    let mut b = Vec::new();
    encode_rules(rules, &mut b);
    hex::encode(b)
}

#[test]
fn every_rule_type_encodes_and_decodes_like_the_vectors() {
    let v = vl2();
    let cases = v["rule_binary_entries"].as_array().unwrap();
    let mut checked = 0;
    for c in cases {
        let bin = unhex(s(c, "binary_hex"));
        let decoded = decode_rules(&bin, MAX_RULES).unwrap();
        assert_eq!(decoded.len(), 1, "{c}");
        let mut again = Vec::new();
        decoded[0].encode(&mut again);
        assert_eq!(again, bin, "binary round trip {c}");
        let json = &c["json"];
        if json.get("_struct").is_some() || s(json, "type") == "ACTION_PRIORITY" {
            // No controller JSON form: the controller drops these entries.
            assert!(rule_from_json(json).is_none() || s(json, "type") == "ACTION_PRIORITY");
            continue;
        }
        let parsed = rule_from_json(json).unwrap_or_else(|| panic!("parse {json}"));
        assert_eq!(parsed, decoded[0], "{c}");
        let rendered = rule_to_json(&parsed).unwrap();
        let mut expected = json.clone();
        if s(json, "type").starts_with("ACTION_") {
            expected.as_object_mut().unwrap().remove("not");
            expected.as_object_mut().unwrap().remove("or");
        }
        assert_eq!(rendered, expected, "render {c}");
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} rule vectors checked");
}

#[test]
fn priority_and_integer_range_are_refused_by_the_json_parser() {
    assert!(rule_from_json(&serde_json::json!({"type": "ACTION_PRIORITY"})).is_none());
    assert!(rule_from_json(&serde_json::json!({"type": "INTEGER_RANGE", "start": 1})).is_none());
    assert!(rule_from_json(&serde_json::json!({"type": "NOPE"})).is_none());
}

#[test]
fn compiler_matches_every_spec_example() {
    let v = vl2();
    let mut n = 0;
    for (name, case) in v["rule_compiler"].as_object().unwrap() {
        let src = s(case, "source");
        if let Some(expected) = case.get("expected_error") {
            let e = compile(src).unwrap_err();
            assert_eq!(e.message, expected.as_str().unwrap(), "{name}");
            n += 1;
            continue;
        }
        let out = compile(src).unwrap_or_else(|e| panic!("{name}: {e}"));
        let expected = case["cli_output"].clone();
        assert_eq!(out.to_cli_json().to_value(), expected, "{name}");
        // Key order, as cli.js prints it.
        let printed = out.to_cli_json().pretty(1);
        let reparsed: Value = serde_json::from_str(&printed).unwrap();
        assert_eq!(reparsed, expected);
        assert_eq!(
            hex_rules(&out.base_rules()),
            s(case, "base_rules_binary_hex"),
            "{name}"
        );
        for (id, hexcap) in case["capability_rules_binary_hex"].as_object().unwrap() {
            let (_, cap) = out
                .capabilities
                .iter()
                .find(|(_, c)| c.id.to_string() == *id)
                .unwrap();
            assert_eq!(
                hex_rules(&out.capability_rules(cap)),
                hexcap.as_str().unwrap()
            );
        }
        n += 1;
    }
    assert!(n >= 5);
}

#[test]
fn compiler_output_keeps_cli_key_order() {
    let out = compile("accept ethertype arp;\n").unwrap();
    let text = out.to_cli_json().pretty(1);
    assert!(text.starts_with("{\n \"config\": {\n  \"rules\": [\n   {\n    \"type\": \"MATCH_ETHERTYPE\",\n    \"not\": false,\n    \"or\": false,\n    \"etherType\": 2054\n   },"), "{text}");
}

#[test]
fn adhoc_rule_sets_encode_like_the_vectors() {
    let v = vl2();
    for c in v["adhoc_networks"].as_array().unwrap() {
        let rules = rules_from_json(&c["rules_json"], MAX_RULES);
        assert_eq!(rules.len(), 14);
        assert_eq!(hex_rules(&rules), s(c, "rules_binary_hex"));
    }
}

struct Tags {
    local: Option<u32>,
    remote: Option<u32>,
}

impl Credentials for Tags {
    fn local_tag(&self, id: u32) -> Option<u32> {
        (id == 1000).then_some(self.local).flatten()
    }
    fn remote_tag(&self, id: u32) -> Option<u32> {
        (id == 1000).then_some(self.remote).flatten()
    }
    fn sender_owns_ip(&self, _: bool, _: &[u8]) -> bool {
        false
    }
    fn sender_owns_mac(&self, _: bool, _: Mac) -> bool {
        false
    }
}

fn ipv4(proto: u8, dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[9] = proto;
    p[12..16].copy_from_slice(&[10, 0, 0, 1]);
    p[16..20].copy_from_slice(&[10, 0, 0, 2]);
    if proto == 1 {
        p[20] = 8;
    } else {
        p[22..24].copy_from_slice(&dport.to_be_bytes());
    }
    p
}

fn frame_for(desc: &str) -> (u16, Vec<u8>) {
    match desc {
        "ethertype 0x0800 (IPv4)" | "any IPv4" | "any" => (0x0800, ipv4(17, 53)),
        d if d.starts_with("any, sender") => (0x0800, ipv4(17, 53)),
        "ethertype 0x88cc (LLDP)" => (0x88cc, vec![0u8; 30]),
        "IPv4 ICMP echo" => (0x0800, ipv4(1, 0)),
        "IPv4 TCP dport 22" => (0x0800, ipv4(6, 22)),
        "ARP (ethertype 0x0806)" => (0x0806, vec![0u8; 28]),
        other => panic!("test does not know how to build frame {other:?}"),
    }
}

#[test]
fn evaluator_matches_every_vector_case_in_both_versions() {
    let v = vl2();
    let cases = v["rule_evaluation_cases"]["cases"].as_array().unwrap();
    let a: Address = "89e92ceee5".parse().unwrap();
    let b: Address = "1122334455".parse().unwrap();
    let tee: Address = "0123456789".parse().unwrap();
    for c in cases {
        let rules = rules_from_json(&c["rules"], MAX_RULES);
        let dir = s(c, "direction");
        let (ethertype, payload) = frame_for(s(c, "frame"));
        let tags = Tags {
            local: c
                .get("local_tag_1000")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
            remote: c
                .get("remote_tag_1000")
                .and_then(Value::as_u64)
                .map(|x| x as u32),
        };
        let frame = Frame {
            source_mac: Mac::from_u64(0x0200_0000_0001),
            dest_mac: Mac::from_u64(0x0200_0000_0002),
            ethertype,
            vlan_id: 0,
            payload: &payload,
        };
        for (sem, key) in [
            (Semantics::V1_14, "expect_1_14"),
            (Semantics::Pre1_14, "expect_pre_1_14"),
        ] {
            let mut rng = || 0u32;
            let tee_target = dir.starts_with("inbound on 0123456789");
            let mut env = Env {
                own_address: if tee_target {
                    tee
                } else if dir == "inbound" {
                    b
                } else {
                    a
                },
                config_flags: 0,
                credentials: &tags,
                random: &mut rng,
                semantics: sem,
            };
            let inbound = dir.starts_with("inbound");
            let (src, dst) = if tee_target {
                (a, tee.to_u64())
            } else {
                (a, b.to_u64())
            };
            let out = evaluate(&rules, inbound, src, dst, &frame, &mut env);
            let mut want = s(c, key);
            if want == "same" {
                want = s(c, "expect_1_14");
            }
            let got = match out.verdict {
                Verdict::Accept => "ACCEPT",
                Verdict::Drop => "DROP",
                Verdict::SuperAccept => "SUPER_ACCEPT",
                Verdict::Redirect => "REDIRECT",
                Verdict::NoMatch => "NO_MATCH",
            };
            assert!(want.starts_with(got), "{key} {c}: got {got}");
            if want.contains("EXT_FRAME copy") {
                let copy = out.copy.expect("tee copy");
                assert_eq!(copy.address, tee);
                assert_eq!(copy.length, payload.len());
                assert!(!copy.watch);
            }
        }
    }
}
