//! flatwire-operator: the `flatwire.io` custom resources (`Network`, `NetworkMember`) and
//! the kube-runtime controllers that turn them into ZeroTier-compatible networks.

pub mod controller;
pub mod crd;

/// API group of every flatwire custom resource.
pub const API_GROUP: &str = "flatwire.io";
