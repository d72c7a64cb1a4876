//! flatwire-agent: the per-host daemon's I/O shell around the sans-I/O `vl1`/`vl2` cores.
//!
//! Modules: [`tap`] (member TAP devices created inside pod network namespaces, batched frame I/O,
//! with the TCP offloads of [`offload`]),
//! [`udp`] (the host's UDP port with batched, GSO/GRO-aware I/O), [`state`] (the atomically
//! written state directory), [`metrics`] (Prometheus text over a tiny HTTP endpoint),
//! [`http_api`] (the ZeroTier-style local JSON API), [`service`] (the gRPC service of
//! `flatwire-api`), [`host`] (the host identity and planet in the state directory),
//! [`dataplane`] (the threads that run every local identity's VL1 node on the one UDP port,
//! each owning the share of identities [`shard`] gives it),
//! [`networks`] (VL2 on that thread: joined networks on TAPs, the controller), [`pool`] (the
//! pre-generated member identities), [`attach`] (pods as members with their own identity,
//! persisted and restored), [`mcast`] (the multicast groups TAP interfaces joined),
//! [`shaping`] (pod bandwidth limits with `tc`) and [`kube`] (Kubernetes mode: the planet ConfigMap, the Node's host-identity annotation, GC of
//! attachments whose pods are gone).

pub mod attach;
pub mod dataplane;
pub mod host;
pub mod http_api;
pub mod kube;
pub mod mcast;
pub mod metrics;
pub mod networks;
pub mod offload;
pub mod pool;
pub mod service;
pub mod shaping;
pub mod shard;
pub mod state;
pub mod tap;
pub mod udp;
