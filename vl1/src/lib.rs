//! flatwire-vl1: the ZeroTier-compatible peer-to-peer transport as a sans-I/O state machine.
//!
//! Nothing in this crate reads a clock, opens a socket or spawns a thread: every entry point
//! takes `now` and returns what to send, what happened and when to wake up next.
//!
//! Modules: [`identity`] (type-0 identities, signatures, key agreement), [`crypto`]
//! (cipher suites 0/1/3, `cryptField`), [`wire`] (zero-copy packet/fragment views, verb
//! payload codecs, LZ4), [`reassembly`] (bounded fragment reassembly), [`world`]
//! (planets and moons), [`node`] (the sans-I/O VL1 state machine).

#![forbid(unsafe_code)]

mod address;
pub mod crypto;
pub mod identity;
pub mod node;
pub mod reassembly;
mod replay;
pub mod wire;
pub mod world;

pub use address::{Address, AddressError};
pub use crypto::{CipherSuite, CryptoError, SymmetricKey};
pub use identity::{Identity, IdentityError};
pub use node::{
    DropReason, Event, LocalSocket, Node, NodeConfig, NodeError, PlanetChange, PlanetRefused,
    Transmit, check_planet_update,
};
pub use wire::{Fragment, Packet, Verb, WireError};
pub use world::{Root, World, WorldType};
