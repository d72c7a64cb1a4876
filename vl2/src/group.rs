//! Multicast groups: (MAC, ADI) pairs, and the ARP/NDP group rules.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::Mac;

/// A multicast group: a group MAC plus 32 bits of "additional distinguishing information".
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MulticastGroup {
    /// The group MAC.
    pub mac: Mac,
    /// Additional distinguishing information (the IPv4 address for ARP groups).
    pub adi: u32,
}

impl MulticastGroup {
    /// Wire length: `mac6 || u32 ADI`.
    pub const LEN: usize = 10;

    /// The broadcast group `(ff:ff:ff:ff:ff:ff, 0)`.
    pub const BROADCAST: MulticastGroup = MulticastGroup {
        mac: Mac::BROADCAST,
        adi: 0,
    };

    /// Makes a group.
    pub fn new(mac: Mac, adi: u32) -> Self {
        Self { mac, adi }
    }

    /// The group an ARP request for `ip` is sent to (and that a holder of `ip` subscribes to).
    pub fn arp(ip: Ipv4Addr) -> Self {
        Self::new(Mac::BROADCAST, u32::from(ip))
    }

    /// The solicited-node style group a holder of `ip` subscribes to: `33:33:ff:xx:yy:zz`.
    pub fn ndp(ip: Ipv6Addr) -> Self {
        let o = ip.octets();
        Self::new(Mac([0x33, 0x33, 0xff, o[13], o[14], o[15]]), 0)
    }

    /// The group for an arbitrary multicast destination MAC.
    pub fn for_mac(mac: Mac) -> Self {
        Self::new(mac, 0)
    }

    /// The 10 wire bytes.
    pub fn to_bytes(self) -> [u8; 10] {
        let mut b = [0u8; 10];
        b[..6].copy_from_slice(&self.mac.0);
        b[6..].copy_from_slice(&self.adi.to_be_bytes());
        b
    }

    /// Reads a group from its 10 wire bytes.
    pub fn from_bytes(b: [u8; 10]) -> Self {
        Self {
            mac: Mac([b[0], b[1], b[2], b[3], b[4], b[5]]),
            adi: u32::from_be_bytes([b[6], b[7], b[8], b[9]]),
        }
    }

    /// The group an outbound frame to `dest` should go to, if the frame is a broadcast ARP
    /// request: `payload` is the Ethernet payload after the ethertype.
    pub fn for_outbound(dest: Mac, ethertype: u16, payload: &[u8]) -> Self {
        if dest.is_broadcast()
            && ethertype == 0x0806
            && payload.len() >= 28
            && payload[2] == 0x08
            && payload[3] == 0x00
            && payload[4] == 6
            && payload[5] == 4
            && payload[7] == 1
        {
            return Self::new(
                dest,
                u32::from_be_bytes([payload[24], payload[25], payload[26], payload[27]]),
            );
        }
        Self::for_mac(dest)
    }
}
