//! IPv6 neighbour-discovery emulation for RFC4193 and 6PLANE addresses (flag 0x4).

use std::net::{IpAddr, Ipv6Addr};

use flatwire_vl1::Address;

use crate::ip::sixplane_prefix;
use crate::netconf::NetworkConfig;
use crate::{Mac, NetworkId};

/// The synthesized neighbour advertisement: Ethernet source MAC and the 72-byte IPv6
/// packet to inject into the local port (ethertype 0x86dd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NdpReply {
    /// Source MAC of the injected frame (the owner's MAC on this network).
    pub source_mac: Mac,
    /// The IPv6 packet.
    pub packet: [u8; 72],
}

/// The address embedded in `target` if it is inside one of the config's RFC4193/6PLANE
/// networks, and the matching own static IP.
pub fn embedded_address(config: &NetworkConfig, target: &[u8; 16]) -> Option<(Address, Ipv6Addr)> {
    let x = sixplane_prefix(config.network_id).to_be_bytes();
    for ip in &config.static_ips {
        let IpAddr::V6(own) = ip.ip else { continue };
        let o = own.octets();
        if ip.port == 88 && o[0] == 0xfd && o[9] == 0x99 && o[10] == 0x93 {
            if target[..11] == o[..11] {
                let a = Address::from_bytes([
                    target[11], target[12], target[13], target[14], target[15],
                ]);
                return Some((a, own));
            }
        } else if ip.port == 40 && o[0] == 0xfc && o[1..5] == x && target[..5] == o[..5] {
            let a = Address::from_bytes([target[5], target[6], target[7], target[8], target[9]]);
            return Some((a, own));
        }
    }
    None
}

/// Answers an outbound neighbour solicitation locally (Switch::onLocalEthernet): returns
/// the advertisement to inject, or `None` to send the solicitation as normal multicast.
pub fn emulate(
    config: &NetworkConfig,
    own: Address,
    dest_mac: Mac,
    ethertype: u16,
    payload: &[u8],
) -> Option<NdpReply> {
    if config.flags & crate::netconf::FLAG_NDP_EMULATION == 0
        || !dest_mac.is_multicast()
        || dest_mac.is_broadcast()
        || ethertype != 0x86dd
        || payload.len() < 64
        || payload[6] != 58
        || payload[40] != 135
    {
        return None;
    }
    let mut target = [0u8; 16];
    target.copy_from_slice(&payload[48..64]);
    let (e, own_ip) = embedded_address(config, &target)?;
    if e.to_u64() == 0 || e == own {
        return None;
    }
    let nwid: NetworkId = config.network_id;
    let mac = Mac::from_address(e, nwid);
    let mut p = [0u8; 72];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&32u16.to_be_bytes());
    p[6] = 0x3a;
    p[7] = 0xff;
    p[8..24].copy_from_slice(&target);
    p[24..40].copy_from_slice(&own_ip.octets());
    p[40] = 0x88;
    p[44] = 0x60;
    p[48..64].copy_from_slice(&target);
    p[64] = 2;
    p[65] = 1;
    p[66..72].copy_from_slice(&mac.0);
    let mut sum: u32 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    add(&p[8..40]);
    add(&32u32.to_be_bytes());
    add(&[0, 0, 0, 58]);
    add(&p[40..72]);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let ck = !(sum as u16);
    p[42..44].copy_from_slice(&ck.to_be_bytes());
    Some(NdpReply {
        source_mac: mac,
        packet: p,
    })
}
