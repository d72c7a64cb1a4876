//! flatwire-operator: the `flatwire.io` custom resources (`Network`, `NetworkMember`), the
//! kube-runtime controllers that turn them into ZeroTier-compatible controller networks and
//! members, and the operator's own state: leader election, the controller identity Secret
//! and the planet ConfigMap.

pub mod controller;
pub mod crd;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod planet;
pub mod sink;

/// API group of every flatwire custom resource.
pub const API_GROUP: &str = "flatwire.io";
