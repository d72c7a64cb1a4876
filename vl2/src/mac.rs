//! Ethernet MAC addresses and their derivation from (address, network).

use std::fmt;
use std::str::FromStr;

use flatwire_vl1::Address;

use crate::NetworkId;

/// A 48-bit Ethernet MAC address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Mac(pub [u8; 6]);

/// Why text is not a MAC address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a MAC address is 6 hex bytes like 02:ab:cd:ef:01:23, got {0:?}")]
pub struct MacError(pub String);

impl Mac {
    /// The broadcast MAC `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The first octet of every member MAC on `network`.
    pub fn first_octet(network: NetworkId) -> u8 {
        let first = ((network.to_u64() & 0xfe) | 0x02) as u8;
        if first == 0x52 { 0x32 } else { first }
    }

    fn xor_mask(network: NetworkId) -> u64 {
        let n = network.to_u64();
        (((n >> 8) & 0xff) << 32)
            | (((n >> 16) & 0xff) << 24)
            | (((n >> 24) & 0xff) << 16)
            | (((n >> 32) & 0xff) << 8)
            | ((n >> 40) & 0xff)
    }

    /// The MAC of member `address` on `network`.
    pub fn from_address(address: Address, network: NetworkId) -> Mac {
        let m = (u64::from(Self::first_octet(network)) << 40)
            | (address.to_u64() ^ Self::xor_mask(network));
        Mac::from_u64(m)
    }

    /// The member address behind this MAC, if it is a member MAC of `network`.
    pub fn to_address(self, network: NetworkId) -> Option<Address> {
        if self.0[0] != Self::first_octet(network) {
            return None;
        }
        Address::new((self.to_u64() & 0xff_ffff_ffff) ^ Self::xor_mask(network)).ok()
    }

    /// Makes a MAC from the low 48 bits of `value`.
    pub fn from_u64(value: u64) -> Mac {
        let b = value.to_be_bytes();
        Mac([b[2], b[3], b[4], b[5], b[6], b[7]])
    }

    /// The MAC as an integer.
    pub fn to_u64(self) -> u64 {
        self.0.iter().fold(0, |a, b| (a << 8) | u64::from(*b))
    }

    /// True for group (multicast, including broadcast) addresses.
    pub fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// True for `ff:ff:ff:ff:ff:ff`.
    pub fn is_broadcast(self) -> bool {
        self == Self::BROADCAST
    }

    /// True for `00:00:00:00:00:00`.
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for Mac {
    type Err = MacError;

    /// Parses 12 hex digits, optionally separated by `:` or `-`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits: Vec<u8> = s.bytes().filter(|b| *b != b':' && *b != b'-').collect();
        if digits.len() != 12 || !digits.iter().all(u8::is_ascii_hexdigit) {
            return Err(MacError(s.to_owned()));
        }
        let mut out = [0u8; 6];
        for (i, pair) in digits.chunks(2).enumerate() {
            let text = std::str::from_utf8(pair).map_err(|_| MacError(s.to_owned()))?;
            out[i] = u8::from_str_radix(text, 16).map_err(|_| MacError(s.to_owned()))?;
        }
        Ok(Mac(out))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}
