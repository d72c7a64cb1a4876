//! 64-bit network IDs: the controller's address and a 24-bit network number.

use std::fmt;
use std::str::FromStr;

use flatwire_vl1::Address;

/// A VL2 network ID: the controller's 40-bit address followed by a 24-bit number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct NetworkId(u64);

/// The two kinds of controller-less ("ad-hoc") network IDs, whose top byte is `0xff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdHoc {
    /// `ffSSSSEEEE000000`: IPv6-only network allowing TCP/UDP ports `start..=end`.
    PortRange {
        /// First allowed port.
        start: u16,
        /// Last allowed port.
        end: u16,
    },
    /// `ffAAhhhhhhhhhh01`: IPv4 `AA.x.y.z/8` network with an optional hub address.
    Ipv4 {
        /// First octet of the IPv4 /8.
        first_octet: u8,
        /// The hub address (zero when none).
        hub: Address,
    },
    /// Any other `0xff` ID: nothing is synthesized.
    Invalid,
}

/// Why text is not a network ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a network ID is 16 hex digits, got {0:?}")]
pub struct NetworkIdError(pub String);

impl NetworkId {
    /// Makes the ID of network `number` (low 24 bits used) of `controller`.
    pub fn new(controller: Address, number: u32) -> Self {
        Self((controller.to_u64() << 24) | u64::from(number & 0x00ff_ffff))
    }

    /// The address of the controller that owns this network.
    pub fn controller(self) -> Address {
        let b = self.0.to_be_bytes();
        Address::from_bytes([b[0], b[1], b[2], b[3], b[4]])
    }

    /// The 24-bit network number.
    pub fn number(self) -> u32 {
        (self.0 & 0x00ff_ffff) as u32
    }

    /// The ID as a 64-bit integer.
    pub fn to_u64(self) -> u64 {
        self.0
    }

    /// The 8 big-endian wire bytes.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// True when the top byte is `0xff` (no controller is ever contacted).
    pub fn is_adhoc(self) -> bool {
        self.0 >> 56 == 0xff
    }

    /// Classifies an ad-hoc ID; `None` for an ordinary (controller) network.
    pub fn adhoc(self) -> Option<AdHoc> {
        if !self.is_adhoc() {
            return None;
        }
        let n = self.0;
        if n & 0x00ff_ffff == 0 {
            Some(AdHoc::PortRange {
                start: ((n >> 40) & 0xffff) as u16,
                end: ((n >> 24) & 0xffff) as u16,
            })
        } else if n & 0xff == 0x01 {
            let hub = Address::new((n >> 8) & 0xff_ffff_ffff).unwrap_or_default();
            Some(AdHoc::Ipv4 {
                first_octet: ((n >> 48) & 0xff) as u8,
                hub,
            })
        } else {
            Some(AdHoc::Invalid)
        }
    }
}

impl From<u64> for NetworkId {
    fn from(value: u64) -> Self {
        Self(value)
    }
}

impl FromStr for NetworkId {
    type Err = NetworkIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NetworkIdError(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| NetworkIdError(s.to_owned()))
    }
}

impl fmt::Display for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl fmt::Debug for NetworkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkId({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_and_number_make_the_recorded_id() {
        let controller: Address = "e6acfe87fc".parse().unwrap();
        let id = NetworkId::new(controller, 0x3adaf6);
        assert_eq!(id.to_string(), "e6acfe87fc3adaf6");
        assert_eq!(id.controller(), controller);
        assert_eq!(id.number(), 0x3adaf6);
        assert_eq!("e6acfe87fc3adaf6".parse::<NetworkId>(), Ok(id));
        assert!("e6acfe87fc3adaf".parse::<NetworkId>().is_err());
        assert!(id.adhoc().is_none());
    }

    #[test]
    fn adhoc_forms_are_classified() {
        let id: NetworkId = "ff00160016000000".parse().unwrap();
        assert_eq!(id.adhoc(), Some(AdHoc::PortRange { start: 22, end: 22 }));
        let id: NetworkId = "ff0a89e92ceee501".parse().unwrap();
        assert_eq!(
            id.adhoc(),
            Some(AdHoc::Ipv4 {
                first_octet: 10,
                hub: "89e92ceee5".parse().unwrap()
            })
        );
        let id: NetworkId = "ff0a89e92ceee502".parse().unwrap();
        assert_eq!(id.adhoc(), Some(AdHoc::Invalid));
    }
}
