//! flatwire-vl1: the ZeroTier-compatible peer-to-peer transport as a sans-I/O state machine.
//!
//! Nothing in this crate reads a clock, opens a socket or spawns a thread: every entry point
//! takes `now` and returns what to send, what happened and when to wake up next.

mod address;

pub use address::{Address, AddressError};
