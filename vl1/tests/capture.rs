//! Decrypts every ZeroTier packet of the recorded ZeroTier One 1.14.1 captures
//! (`vectors/zt-one/capture/*.pcap`) with the recorded node secrets and checks each one
//! against the reference decode (`*-decoded.jsonl`) and summary.

mod common;

use std::collections::HashMap;

use common::{json, read_vector, read_vector_text};
use flatwire_vl1::Address;
use flatwire_vl1::crypto::{self, SymmetricKey};
use flatwire_vl1::identity::Identity;
use flatwire_vl1::reassembly::{Reassembler, ReassemblyLimits};
use flatwire_vl1::wire::{self, Fragment, Hello, InReplyTo, OkHello, Packet, Verb};

/// One UDP datagram from a pcap file.
struct Datagram {
    src: String,
    dst: String,
    payload: Vec<u8>,
}

/// Minimal pcap reader: classic little-endian microsecond format, Ethernet, IPv4, UDP.
fn read_pcap(bytes: &[u8]) -> Vec<Datagram> {
    assert!(bytes.len() >= 24, "pcap too short");
    assert_eq!(
        &bytes[..4],
        &[0xd4, 0xc3, 0xb2, 0xa1],
        "little-endian microsecond pcap"
    );
    let linktype = u32::from_le_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!(linktype, 1, "Ethernet link type");
    let mut out = Vec::new();
    let mut pos = 24;
    while pos + 16 <= bytes.len() {
        let incl = u32::from_le_bytes(bytes[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let frame = &bytes[pos + 16..pos + 16 + incl];
        pos += 16 + incl;
        let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
        assert_eq!(ethertype, 0x0800, "IPv4 only in this capture");
        let ip = &frame[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        assert_eq!(ip[9], 17, "UDP");
        let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        let udp = &ip[ihl..total];
        let ulen = u16::from_be_bytes([udp[4], udp[5]]) as usize;
        let ipstr = |b: &[u8]| format!("{}.{}.{}.{}", b[0], b[1], b[2], b[3]);
        out.push(Datagram {
            src: format!(
                "{}:{}",
                ipstr(&ip[12..16]),
                u16::from_be_bytes([udp[0], udp[1]])
            ),
            dst: format!(
                "{}:{}",
                ipstr(&ip[16..20]),
                u16::from_be_bytes([udp[2], udp[3]])
            ),
            payload: udp[8..ulen].to_vec(),
        });
    }
    assert_eq!(pos, bytes.len(), "pcap ends on a record boundary");
    out
}

fn node_identities() -> Vec<Identity> {
    ["ztroot-8cc5f30f43", "zta-e6acfe87fc", "ztb-e28e6b73a1"]
        .iter()
        .map(|n| {
            let id: Identity =
                read_vector_text(&format!("zt-one/capture/node-identities/{n}.secret"))
                    .parse()
                    .unwrap();
            assert!(id.locally_validate());
            id
        })
        .collect()
}

/// A field as text (numbers and booleans as the Python decoder printed them).
fn s(v: &serde_json::Value, k: &str) -> String {
    match &v[k] {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Bool(b) => if *b { "True" } else { "False" }.to_string(),
        serde_json::Value::Number(n) => n.to_string(),
        other => panic!("field {k} missing or odd ({other}) in {v}"),
    }
}

/// Decodes one complete packet and checks it against the reference record.
fn check_packet(
    mut pkt: Vec<u8>,
    want: &serde_json::Value,
    ids: &[Identity],
    keys: &HashMap<(Address, Address), SymmetricKey>,
    verbs: &mut HashMap<String, usize>,
) {
    let view = Packet::new_checked(&pkt[..]).unwrap();
    let (src, dst) = (view.source(), view.destination());
    assert_eq!(src.to_string(), s(want, "source"));
    assert_eq!(dst.to_string(), s(want, "dest"));
    assert_eq!(view.hops().to_string(), s(want, "hops"));
    assert_eq!(format!("{:016x}", view.packet_id()), s(want, "packet_id"));
    let key = &keys[&(src, dst)];
    let suite = crypto::dearmor(&mut pkt, key).expect("packet authenticates");
    assert_eq!((suite as u8).to_string(), s(want, "cipher_suite"));
    assert_eq!(
        hex::encode(&pkt),
        s(want, "dearmored_hex"),
        "frame {}",
        want["frame"]
    );
    let mut scratch = Vec::new();
    let compressed = Packet::new_checked(&pkt[..]).unwrap().is_compressed();
    assert_eq!(
        if compressed { "True" } else { "False" },
        s(want, "compressed")
    );
    wire::decompress_packet(&mut pkt, &mut scratch).unwrap();
    let view = Packet::new_checked(&pkt[..]).unwrap();
    assert_eq!(view.verb().name(), s(want, "verb"));
    assert_eq!(hex::encode(view.payload()), s(want, "payload_hex"));
    *verbs.entry(view.verb().name().to_string()).or_default() += 1;
    // Verb-level decoding with our codecs.
    match view.verb() {
        Verb::HELLO => {
            let (hello, crypt) = Hello::parse_head(view.payload()).unwrap();
            let sender = ids.iter().find(|i| i.address() == src).unwrap();
            assert_eq!(&hello.identity, sender);
            assert_eq!(hello.protocol_version, 12);
            assert_eq!(
                (
                    hello.version_major,
                    hello.version_minor,
                    hello.version_revision
                ),
                (1, 14, 1)
            );
            assert_eq!(hello.planet.unwrap().0, 0x8cc5f30f43);
            let start = 28 + crypt.unwrap();
            crypto::crypt_field(key, &mut pkt, start);
            let moons = Hello::parse_moons(&pkt[start..]).unwrap();
            assert!(moons.is_empty(), "the lab orbits no moons");
        }
        Verb::OK => {
            let (re, body) = InReplyTo::parse(view.payload()).unwrap();
            match re.verb {
                Verb::HELLO => {
                    let ok = OkHello::parse(body).unwrap();
                    assert_eq!(ok.protocol_version, 12);
                    assert!(ok.observed.is_some());
                }
                Verb::WHOIS => {
                    for id in wire::parse_ok_whois(body).unwrap() {
                        assert!(ids.contains(&id), "WHOIS answers carry lab identities");
                    }
                }
                _ => {}
            }
        }
        Verb::WHOIS => {
            for a in wire::parse_whois(view.payload()).unwrap() {
                assert!(ids.iter().any(|i| i.address() == a));
            }
        }
        Verb::RENDEZVOUS => {
            let r = wire::Rendezvous::parse(view.payload()).unwrap();
            assert!(ids.iter().any(|i| i.address() == r.peer));
        }
        Verb::PUSH_DIRECT_PATHS => {
            assert!(
                !wire::parse_push_direct_paths(view.payload())
                    .unwrap()
                    .is_empty()
            );
        }
        _ => {}
    }
}

fn run_capture(name: &str, expect_datagrams: usize) {
    let ids = node_identities();
    let mut keys = HashMap::new();
    for a in &ids {
        for b in &ids {
            if a != b {
                keys.insert((a.address(), b.address()), a.agree(b).unwrap());
            }
        }
    }
    let datagrams = read_pcap(&read_vector(&format!("zt-one/capture/{name}.pcap")));
    assert_eq!(datagrams.len(), expect_datagrams);
    let decoded: Vec<serde_json::Value> =
        read_vector_text(&format!("zt-one/capture/{name}-decoded.jsonl"))
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let by_frame: HashMap<String, &serde_json::Value> = decoded
        .iter()
        .filter(|d| d["kind"] != "reassembled")
        .map(|d| (s(d, "frame"), d))
        .collect();
    let reassembled: HashMap<String, &serde_json::Value> = decoded
        .iter()
        .filter(|d| d["kind"] == "reassembled")
        .map(|d| (s(d, "packet_id"), d))
        .collect();
    let summary = read_vector_text(&format!("zt-one/capture/{name}-summary.txt"));
    let mut r: Reassembler<()> = Reassembler::new(ReassemblyLimits::default());
    let mut verbs = HashMap::new();
    let (mut packets, mut assembled, mut short) = (0, 0, 0);
    let mut out = Vec::new();
    for (i, d) in datagrams.iter().enumerate() {
        let frame = (i + 1).to_string();
        let want = by_frame[&frame];
        assert_eq!(s(want, "udp_src"), d.src);
        assert_eq!(s(want, "udp_dst"), d.dst);
        assert_eq!(s(want, "udp_payload_hex"), hex::encode(&d.payload));
        let line = summary
            .lines()
            .find(|l| l.split_whitespace().next() == Some(frame.as_str()))
            .unwrap_or_else(|| panic!("summary line for frame {frame}"));
        if d.payload.len() < wire::HEADER_LEN && !wire::is_fragment(&d.payload) {
            assert!(s(want, "kind").starts_with("short"));
            short += 1;
            continue;
        }
        if wire::is_fragment(&d.payload) {
            let f = Fragment::new_checked(&d.payload[..]).unwrap();
            assert_eq!(s(want, "kind"), "fragment");
            assert_eq!(f.number().to_string(), s(want, "fragment_no"));
            assert_eq!(f.total().to_string(), s(want, "total_fragments"));
            if r.add_fragment(0, &d.payload, &mut out).unwrap().is_some() {
                let id = format!("{:016x}", f.packet_id());
                assert_eq!(hex::encode(&out), s(reassembled[&id], "reassembled_hex"));
                check_packet(out.clone(), reassembled[&id], &ids, &keys, &mut verbs);
                assembled += 1;
            }
            continue;
        }
        let p = Packet::new_checked(&d.payload[..]).unwrap();
        if p.is_fragmented() {
            assert!(s(want, "kind").starts_with("head"));
            if r.add_head(0, &d.payload, (), &mut out).unwrap().is_some() {
                let id = format!("{:016x}", p.packet_id());
                check_packet(out.clone(), reassembled[&id], &ids, &keys, &mut verbs);
                assembled += 1;
            }
            continue;
        }
        assert_eq!(s(want, "kind"), "packet");
        check_packet(d.payload.clone(), want, &ids, &keys, &mut verbs);
        assert!(
            line.contains(&s(want, "verb")),
            "summary agrees on the verb for frame {frame}"
        );
        packets += 1;
    }
    assert_eq!(r.pending(), 0, "every fragmented packet completed");
    assert_eq!(assembled, reassembled.len());
    assert_eq!(short, 2);
    assert!(packets > 150);
    for v in [
        "HELLO",
        "OK",
        "WHOIS",
        "RENDEZVOUS",
        "ECHO",
        "PUSH_DIRECT_PATHS",
        "FRAME",
        "NETWORK_CONFIG_REQUEST",
    ] {
        assert!(verbs.contains_key(v), "{name}: saw {v}");
    }
}

#[test]
fn join_capture_decrypts_completely() {
    run_capture("join", 200);
}

#[test]
fn bridge_capture_decrypts_completely() {
    run_capture("join-bridge", 265);
}

#[test]
fn pairwise_keys_file_matches_capture_identities() {
    let v = json("zt-one/capture/node-pairwise-keys.json");
    assert_eq!(v.as_array().unwrap().len(), 3);
}
