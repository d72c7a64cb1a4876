//! 64-bit network IDs: the controller's address and a 24-bit network number.

use std::fmt;

use flatwire_vl1::Address;

/// A VL2 network ID: the controller's 40-bit address followed by a 24-bit number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NetworkId(u64);

impl NetworkId {
    /// Makes the ID of network `number` (low 24 bits used) of `controller`.
    pub fn new(controller: Address, number: u32) -> Self {
        Self((controller.to_u64() << 24) | u64::from(number & 0x00ff_ffff))
    }

    /// The address of the controller that owns this network.
    pub fn controller(self) -> Address {
        Address::from_bytes(self.0.to_be_bytes()[..5].try_into().expect("5 bytes"))
    }

    /// The ID as a 64-bit integer.
    pub fn to_u64(self) -> u64 {
        self.0
    }
}

impl From<u64> for NetworkId {
    fn from(value: u64) -> Self {
        Self(value)
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
    }
}
