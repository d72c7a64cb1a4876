//! The planet the operator publishes when it is a root: a signed world listing the
//! controller's identity as its only root, stored in a ConfigMap (binary key `planet`) that
//! the agents mount.
//!
//! The world's ID is the controller address; revisions are signed by the world key kept in
//! the identity Secret, which every revision also names as `updatesMustBeSignedBy`, so agents
//! accept the operator's updates under ZeroTier's world update rule. [`desired_planet`]
//! keeps the stored planet as long as it is ours and lists the same roots and endpoints; a
//! change of endpoints gives a new revision with a strictly newer timestamp.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use flatwire_vl1::{Root, World, WorldType};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};

use crate::controller::FIELD_MANAGER;
use crate::identity::ControllerIdentity;

/// The ConfigMap `binaryData` key holding the serialized planet.
pub const PLANET_KEY: &str = "planet";

/// Why the planet could not be built or published.
#[derive(Debug, thiserror::Error)]
pub enum PlanetError {
    /// No stable endpoint to list for the root.
    #[error(
        "--root needs the root's stable endpoints: pass --stable-endpoint IP:PORT (repeatable) \
         or set POD_IP (then POD_IP:--port is used); the hostname resolves to no usable address"
    )]
    NoEndpoints,
    /// `POD_IP` is not an IP address.
    #[error("POD_IP={0:?} is not an IP address")]
    BadPodIp(String),
    /// Too many endpoints for a world.
    #[error("a root may list at most {max} stable endpoints, got {got}")]
    TooManyEndpoints {
        /// The limit.
        max: usize,
        /// How many were given.
        got: usize,
    },
    /// The world could not be built.
    #[error("building the planet: {0}")]
    World(#[from] flatwire_vl1::world::WorldError),
    /// The API server refused or failed a request.
    #[error("planet ConfigMap {namespace}/{name}: {source}")]
    Kube {
        /// The ConfigMap's namespace.
        namespace: String,
        /// The ConfigMap's name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
}

/// The root's stable endpoints: `explicit` (`--stable-endpoint`) when given, else
/// `POD_IP:port`, else `host_ips` (the hostname's addresses; in a pod, the pod IP) with
/// `port`. Sorted and deduplicated, so the planet does not change with flag order.
pub fn stable_endpoints(
    explicit: &[SocketAddr],
    pod_ip: Option<&str>,
    host_ips: &[IpAddr],
    port: u16,
) -> Result<Vec<SocketAddr>, PlanetError> {
    let pod_ip = pod_ip.map(str::trim).filter(|s| !s.is_empty());
    let mut out: Vec<SocketAddr> = match (explicit, pod_ip) {
        ([_, ..], _) => explicit.to_vec(),
        ([], Some(ip)) => {
            let ip: IpAddr = ip.parse().map_err(|_| PlanetError::BadPodIp(ip.into()))?;
            vec![SocketAddr::new(ip, port)]
        }
        ([], None) => host_ips
            .iter()
            .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
            .map(|ip| SocketAddr::new(*ip, port))
            .collect(),
    };
    if out.is_empty() {
        return Err(PlanetError::NoEndpoints);
    }
    out.sort();
    out.dedup();
    let max = flatwire_vl1::world::MAX_STABLE_ENDPOINTS;
    if out.len() > max {
        return Err(PlanetError::TooManyEndpoints {
            max,
            got: out.len(),
        });
    }
    Ok(out)
}

/// The planet to publish and whether it differs from `current` (the stored serialization,
/// kept when it is already right): a planet with ID = the controller address, signed by and naming the world key of
/// `id`, whose only root is `id` at `endpoints`. A replacement's timestamp is `now_ms`, or
/// one more than the current revision's if that is not older.
pub fn desired_planet(
    id: &ControllerIdentity,
    endpoints: &[SocketAddr],
    current: Option<&[u8]>,
    now_ms: u64,
) -> Result<(World, bool), PlanetError> {
    let world_id = id.identity.address().to_u64();
    let roots = vec![Root {
        identity: id.identity.to_public(),
        stable_endpoints: endpoints.to_vec(),
    }];
    let current = current.and_then(|b| World::parse(b).ok()).map(|(w, _)| w);
    if let Some(w) = current {
        if w.world_type == WorldType::Planet
            && w.id == world_id
            && w.updates_must_be_signed_by == id.world_public
            && w.verify_signature(&id.world_public)
            && w.roots == roots
        {
            return Ok((w, false));
        }
        let timestamp = now_ms.max(w.timestamp.saturating_add(1));
        let next = World::create(
            WorldType::Planet,
            world_id,
            timestamp,
            id.world_public,
            roots,
            &id.world_secret,
        )?;
        return Ok((next, true));
    }
    let first = World::create(
        WorldType::Planet,
        world_id,
        now_ms,
        id.world_public,
        roots,
        &id.world_secret,
    )?;
    Ok((first, true))
}

/// Makes ConfigMap `namespace/name` hold the planet [`desired_planet`] gives (server-side
/// apply of `binaryData.planet`, only when it changes). Returns the planet now stored and
/// whether this call wrote it.
pub async fn publish(
    client: Client,
    namespace: &str,
    name: &str,
    id: &ControllerIdentity,
    endpoints: &[SocketAddr],
) -> Result<(World, bool), PlanetError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let kube_err = |source| PlanetError::Kube {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let stored = api.get_opt(name).await.map_err(kube_err)?;
    let bytes = stored
        .as_ref()
        .and_then(|c| c.binary_data.as_ref())
        .and_then(|d| d.get(PLANET_KEY))
        .map(|b| b.0.clone());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    match desired_planet(id, endpoints, bytes.as_deref(), now_ms)? {
        (world, false) => Ok((world, false)),
        (world, true) => {
            let cm = ConfigMap {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.to_owned()),
                    namespace: Some(namespace.to_owned()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/managed-by".to_owned(),
                        FIELD_MANAGER.to_owned(),
                    )])),
                    ..Default::default()
                },
                binary_data: Some(BTreeMap::from([(
                    PLANET_KEY.to_owned(),
                    ByteString(world.serialize(false)),
                )])),
                ..ConfigMap::default()
            };
            let mut v = serde_json::to_value(&cm).unwrap_or_default();
            v["apiVersion"] = "v1".into();
            v["kind"] = "ConfigMap".into();
            api.patch(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&v),
            )
            .await
            .map_err(kube_err)?;
            Ok((world, true))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn endpoints_from_flags_or_pod_ip() {
        let host: Vec<IpAddr> = vec!["127.0.1.1".parse().unwrap(), "198.18.0.7".parse().unwrap()];
        assert_eq!(
            stable_endpoints(
                &[ep("198.18.0.2:9993"), ep("198.18.0.1:9993")],
                None,
                &host,
                1
            )
            .unwrap(),
            vec![ep("198.18.0.1:9993"), ep("198.18.0.2:9993")]
        );
        assert_eq!(
            stable_endpoints(&[], Some("fd00::5"), &host, 9993).unwrap(),
            vec![ep("[fd00::5]:9993")]
        );
        assert_eq!(
            stable_endpoints(&[], None, &host, 9993).unwrap(),
            vec![ep("198.18.0.7:9993")],
            "the hostname's non-loopback addresses"
        );
        assert!(matches!(
            stable_endpoints(&[], None, &host[..1], 9993),
            Err(PlanetError::NoEndpoints)
        ));
        let e = stable_endpoints(&[], Some("pod"), &host, 9993).unwrap_err();
        assert!(e.to_string().contains("POD_IP=\"pod\""), "{e}");
    }

    #[test]
    fn planet_is_stable_until_endpoints_change() {
        let id = ControllerIdentity::generate().unwrap();
        let eps = vec![ep("198.18.0.1:9993")];
        let (w1, new) = desired_planet(&id, &eps, None, 1000).unwrap();
        assert!(new);
        assert_eq!(w1.id, id.identity.address().to_u64());
        assert_eq!(w1.world_type, WorldType::Planet);
        assert_eq!(w1.roots[0].identity, id.identity.to_public());
        assert!(w1.verify_signature(&id.world_public));
        let b1 = w1.serialize(false);
        assert_eq!(
            desired_planet(&id, &eps, Some(&b1), 5000).unwrap(),
            (w1.clone(), false)
        );

        // New endpoints: a newer revision the agents accept (same key, later timestamp),
        // even when the clock went back.
        let eps2 = vec![ep("198.18.0.1:9993"), ep("198.18.0.9:9993")];
        let (w2, _) = desired_planet(&id, &eps2, Some(&b1), 10).unwrap();
        assert_eq!(w2.timestamp, 1001);
        assert!(w1.should_replace_with(&w2));

        // Garbage or a foreign planet is replaced.
        assert!(desired_planet(&id, &eps, Some(b"junk"), 1).unwrap().1);
        let other = ControllerIdentity::generate().unwrap();
        let (foreign, _) = desired_planet(&other, &eps, None, 1).unwrap();
        let (mine, new) = desired_planet(&id, &eps, Some(&foreign.serialize(false)), 7).unwrap();
        assert!(new);
        assert_eq!(mine.id, id.identity.address().to_u64());
    }
}
