//! The 40-bit ZeroTier address of an identity.

use std::fmt;
use std::str::FromStr;

/// A 40-bit VL1 address, written as 10 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Address(u64);

/// Why a value is not a usable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The text is not exactly 10 hex digits.
    #[error("an address is 10 hex digits, got {0:?}")]
    Syntax(String),
    /// The value does not fit in 40 bits.
    #[error("an address has 40 bits, {0:#x} has more")]
    TooWide(u64),
}

impl Address {
    /// Length of an address on the wire, in bytes.
    pub const LEN: usize = 5;

    /// Makes an address from the low 40 bits of `value`.
    pub fn new(value: u64) -> Result<Self, AddressError> {
        if value >> 40 != 0 {
            return Err(AddressError::TooWide(value));
        }
        Ok(Self(value))
    }

    /// Reads an address from its 5 big-endian wire bytes.
    pub fn from_bytes(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }

    /// The 5 big-endian wire bytes of this address.
    pub fn to_bytes(self) -> [u8; Self::LEN] {
        let b = self.0.to_be_bytes();
        [b[3], b[4], b[5], b[6], b[7]]
    }

    /// The address as an integer (the low 40 bits are set).
    pub fn to_u64(self) -> u64 {
        self.0
    }
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 10 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(AddressError::Syntax(s.to_owned()));
        }
        u64::from_str_radix(s, 16)
            .map(Self)
            .map_err(|_| AddressError::Syntax(s.to_owned()))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010x}", self.0)
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_and_bytes_round_trip() {
        let a: Address = "8cc5f30f43".parse().unwrap();
        assert_eq!(a.to_string(), "8cc5f30f43");
        assert_eq!(a.to_bytes(), [0x8c, 0xc5, 0xf3, 0x0f, 0x43]);
        assert_eq!(Address::from_bytes(a.to_bytes()), a);
    }

    #[test]
    fn bad_text_and_values_are_refused() {
        for bad in ["", "8cc5f30f4", "8cc5f30f433", "8cc5f30g43", "+cc5f30f43"] {
            assert_eq!(
                bad.parse::<Address>(),
                Err(AddressError::Syntax(bad.into()))
            );
        }
        assert_eq!(Address::new(1 << 40), Err(AddressError::TooWide(1 << 40)));
    }
}
