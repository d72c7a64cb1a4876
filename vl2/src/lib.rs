//! flatwire-vl2: the ZeroTier-compatible virtual Ethernet on top of `flatwire-vl1`, as a
//! sans-I/O library: network IDs and addressing, the rules engine and its compiler, the
//! dictionary and network configuration, credentials and the network controller.
//!
//! Nothing here reads a clock, opens a socket or spawns a thread: callers pass `now`
//! (milliseconds) and random values in, and get bytes and decisions out.

#![forbid(unsafe_code)]

pub mod codec;
pub mod controller;
pub mod credentials;
pub mod dictionary;
mod group;
pub mod ip;
mod jsonutil;
mod mac;
pub mod member;
pub mod multicast;
pub mod ndp;
pub mod netconf;
mod network_id;
pub mod rules;
pub mod verbs;
pub mod vouch;

pub use group::MulticastGroup;
pub use mac::{Mac, MacError};
pub use network_id::{AdHoc, NetworkId, NetworkIdError};
