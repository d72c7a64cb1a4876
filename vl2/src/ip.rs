//! Managed IPv6 addresses (RFC4193, 6PLANE) and ZeroTier's binary `InetAddress` form.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flatwire_vl1::Address;

use crate::NetworkId;
use crate::codec::{CodecError, Reader};

/// The member's RFC4193 address (`/88` network): `fd || nwid || 99 93 || address`.
pub fn rfc4193(network: NetworkId, address: Address) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[0] = 0xfd;
    b[1..9].copy_from_slice(&network.to_bytes());
    b[9] = 0x99;
    b[10] = 0x93;
    b[11..16].copy_from_slice(&address.to_bytes());
    Ipv6Addr::from(b)
}

/// The 32-bit value 6PLANE puts after `fc`: `(nwid ^ (nwid >> 32)) as u32`.
pub fn sixplane_prefix(network: NetworkId) -> u32 {
    let n = network.to_u64();
    ((n ^ (n >> 32)) & 0xffff_ffff) as u32
}

/// The member's 6PLANE address (`/40` network, the member owns the `/80`).
pub fn sixplane(network: NetworkId, address: Address) -> Ipv6Addr {
    let mut b = [0u8; 16];
    b[0] = 0xfc;
    b[1..5].copy_from_slice(&sixplane_prefix(network).to_be_bytes());
    b[5..10].copy_from_slice(&address.to_bytes());
    b[15] = 1;
    Ipv6Addr::from(b)
}

/// An IP address with a "port" field, which VL2 uses for netmask bits (or 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InetAddress {
    /// The address.
    pub ip: IpAddr,
    /// The port, or the netmask bits for static IPs and route targets.
    pub port: u16,
}

impl InetAddress {
    /// Makes one.
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self { ip, port }
    }

    /// Appends the binary form (`04 ip4 port` or `06 ip6 port`).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self.ip {
            IpAddr::V4(a) => {
                out.push(4);
                out.extend_from_slice(&a.octets());
            }
            IpAddr::V6(a) => {
                out.push(6);
                out.extend_from_slice(&a.octets());
            }
        }
        out.extend_from_slice(&self.port.to_be_bytes());
    }

    /// Appends the binary form of an optional address (`00` for none).
    pub fn encode_opt(a: Option<&InetAddress>, out: &mut Vec<u8>) {
        match a {
            Some(a) => a.encode(out),
            None => out.push(0),
        }
    }

    /// Reads one binary address; `None` for the null form and the skipped legacy types.
    pub fn decode(r: &mut Reader<'_>) -> Result<Option<InetAddress>, CodecError> {
        match r.u8()? {
            0 => Ok(None),
            1 | 2 => {
                r.skip(6)?;
                Ok(None)
            }
            3 => {
                let n = r.u16()? as usize;
                r.skip(n)?;
                Ok(None)
            }
            4 => {
                let ip = Ipv4Addr::from(r.array::<4>()?);
                let port = r.u16()?;
                Ok(Some(InetAddress::new(IpAddr::V4(ip), port)))
            }
            6 => {
                let ip = Ipv6Addr::from(r.array::<16>()?);
                let port = r.u16()?;
                Ok(Some(InetAddress::new(IpAddr::V6(ip), port)))
            }
            t => Err(CodecError::Invalid(format!("InetAddress type {t}"))),
        }
    }
}

impl std::fmt::Display for InetAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.ip, self.port)
    }
}

/// True when `ip` lies in `net/bits` (same family).
pub fn in_prefix(ip: IpAddr, net: IpAddr, bits: u16) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let bits = u32::from(bits.min(32));
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let bits = u32::from(bits.min(128));
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}
