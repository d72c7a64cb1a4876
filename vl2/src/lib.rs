//! flatwire-vl2: the ZeroTier-compatible virtual Ethernet on top of `flatwire-vl1`, as a
//! sans-I/O state machine: networks, configuration, credentials, rules and the controller.

mod network_id;

pub use network_id::NetworkId;
