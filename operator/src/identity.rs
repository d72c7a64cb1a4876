//! The controller's persistent identity, kept in a Secret of the operator's namespace.
//!
//! The Secret holds the VL1 identity (ZeroTier's text forms) and the key pair that signs the
//! planet, so every replica and every restart serves the same controller address and can
//! sign planet updates the agents accept. It is created once, create-only: of two replicas
//! racing on first start exactly one create succeeds and the other reads the winner's
//! Secret. A Secret that exists but does not hold a valid identity is an error, never
//! silently replaced (that would orphan every network ID and planet already handed out).

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;

use flatwire_vl1::Identity;
use flatwire_vl1::identity::{PUBLIC_KEY_LEN, SECRET_KEY_LEN, generate_key_pair, public_key_of};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::controller::{ControllerAddress, FIELD_MANAGER};

/// Secret key: the identity with its secret key, `address:0:public:secret`.
pub const IDENTITY_SECRET_KEY: &str = "identity.secret";
/// Secret key: the public identity, `address:0:public`.
pub const IDENTITY_PUBLIC_KEY: &str = "identity.public";
/// Secret key: the planet signing key's secret half (128 hex digits).
pub const WORLD_SECRET_KEY: &str = "world.secret";
/// Secret key: the planet signing key's public half (128 hex digits).
pub const WORLD_PUBLIC_KEY: &str = "world.public";

/// The controller's identity and its planet signing key.
#[derive(Clone)]
pub struct ControllerIdentity {
    /// The VL1 identity (with its secret key).
    pub identity: Identity,
    /// Public key every planet revision names as `updatesMustBeSignedBy`.
    pub world_public: [u8; PUBLIC_KEY_LEN],
    /// Its secret half, which signs planet revisions.
    pub world_secret: [u8; SECRET_KEY_LEN],
}

impl std::fmt::Debug for ControllerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerIdentity")
            .field("address", &self.identity.address())
            .finish_non_exhaustive()
    }
}

impl ControllerIdentity {
    /// Generates a new identity and world key pair (CPU-heavy: run it off the async runtime).
    pub fn generate() -> Result<Self, IdentityError> {
        let identity = Identity::generate(&AtomicBool::new(false))
            .map_err(|e| IdentityError::Generate(e.to_string()))?;
        let (world_public, world_secret) =
            generate_key_pair().map_err(|e| IdentityError::Generate(e.to_string()))?;
        Ok(Self {
            identity,
            world_public,
            world_secret,
        })
    }

    /// The controller address (the identity's address).
    pub fn address(&self) -> ControllerAddress {
        ControllerAddress::from_u64(self.identity.address().to_u64())
            .expect("an identity's address is never reserved")
    }

    /// The Secret's `data`.
    pub fn to_secret_data(&self) -> BTreeMap<String, ByteString> {
        let text = |s: String| ByteString(format!("{s}\n").into_bytes());
        let secret = self.identity.to_secret_string().unwrap_or_default();
        BTreeMap::from([
            (IDENTITY_SECRET_KEY.to_owned(), text(secret)),
            (
                IDENTITY_PUBLIC_KEY.to_owned(),
                text(self.identity.to_string()),
            ),
            (
                WORLD_SECRET_KEY.to_owned(),
                text(hex::encode(self.world_secret)),
            ),
            (
                WORLD_PUBLIC_KEY.to_owned(),
                text(hex::encode(self.world_public)),
            ),
        ])
    }

    /// Reads the Secret's `data`, checking that every key is present and consistent: the
    /// secret key belongs to the public key, the address is the public key's hash, the
    /// public form matches, and the world keys are a pair.
    pub fn from_secret_data(data: &BTreeMap<String, ByteString>) -> Result<Self, String> {
        let text = |key: &str| -> Result<&str, String> {
            let v = data
                .get(key)
                .ok_or_else(|| format!("key {key} is missing"))?;
            std::str::from_utf8(&v.0)
                .map(str::trim)
                .map_err(|_| format!("key {key} is not UTF-8 text"))
        };
        let secret_text = text(IDENTITY_SECRET_KEY)?;
        let identity: Identity = secret_text
            .parse()
            .map_err(|e| format!("key {IDENTITY_SECRET_KEY}: {e}"))?;
        let secret_hex = secret_text
            .rsplit(':')
            .next()
            .filter(|_| identity.has_secret())
            .ok_or_else(|| format!("key {IDENTITY_SECRET_KEY} has no secret key"))?;
        let secret: [u8; SECRET_KEY_LEN] = decode_hex(secret_hex, IDENTITY_SECRET_KEY)?;
        let derived = Identity::from_secret_key(&secret)
            .map_err(|e| format!("key {IDENTITY_SECRET_KEY}: {e}"))?;
        if derived.public_key() != identity.public_key() || !identity.locally_validate() {
            return Err(format!(
                "key {IDENTITY_SECRET_KEY}: the address and keys do not belong together"
            ));
        }
        let public: Identity = text(IDENTITY_PUBLIC_KEY)?
            .parse()
            .map_err(|e| format!("key {IDENTITY_PUBLIC_KEY}: {e}"))?;
        if public != identity.to_public() || public.has_secret() {
            return Err(format!(
                "key {IDENTITY_PUBLIC_KEY} does not match {IDENTITY_SECRET_KEY}"
            ));
        }
        let world_secret = decode_hex(text(WORLD_SECRET_KEY)?, WORLD_SECRET_KEY)?;
        let world_public = decode_hex(text(WORLD_PUBLIC_KEY)?, WORLD_PUBLIC_KEY)?;
        if public_key_of(&world_secret) != world_public {
            return Err(format!(
                "key {WORLD_PUBLIC_KEY} does not match {WORLD_SECRET_KEY}"
            ));
        }
        Ok(Self {
            identity,
            world_public,
            world_secret,
        })
    }
}

fn decode_hex<const N: usize>(s: &str, key: &str) -> Result<[u8; N], String> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out)
        .map_err(|_| format!("key {key} is not {} hex digits", 2 * N))?;
    Ok(out)
}

/// Why the identity could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// The API server refused or failed a request.
    #[error("identity Secret {namespace}/{name}: {source}")]
    Kube {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// The API error.
        source: kube::Error,
    },
    /// The Secret exists but does not hold a valid identity; it is left as it is.
    #[error(
        "identity Secret {namespace}/{name} is malformed: {reason} (fix or delete it; the \
         operator never replaces an existing identity)"
    )]
    Malformed {
        /// The Secret's namespace.
        namespace: String,
        /// The Secret's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Generating keys failed.
    #[error("generating the controller identity: {0}")]
    Generate(String),
}

/// Reads the identity from Secret `namespace/name`, or generates one and creates the Secret
/// (create-only; a replica that loses the race reads the winner's). Returns the identity and
/// whether this call created it.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
) -> Result<(ControllerIdentity, bool), IdentityError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let kube_err = |source| IdentityError::Kube {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    };
    let parse = |s: &Secret| {
        ControllerIdentity::from_secret_data(s.data.as_ref().unwrap_or(&BTreeMap::new())).map_err(
            |reason| IdentityError::Malformed {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                reason,
            },
        )
    };
    if let Some(s) = api.get_opt(name).await.map_err(kube_err)? {
        return Ok((parse(&s)?, false));
    }
    let fresh = tokio::task::spawn_blocking(ControllerIdentity::generate)
        .await
        .map_err(|e| IdentityError::Generate(e.to_string()))??;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(fresh.to_secret_data()),
        type_: Some("Opaque".into()),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((fresh, true)),
        Err(kube::Error::Api(s)) if s.is_already_exists() => {
            let s = api.get(name).await.map_err(kube_err)?;
            Ok((parse(&s)?, false))
        }
        Err(e) => Err(kube_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_data_round_trips_and_bad_data_is_named() {
        let id = ControllerIdentity::generate().unwrap();
        let data = id.to_secret_data();
        let back = ControllerIdentity::from_secret_data(&data).unwrap();
        assert_eq!(back.identity, id.identity);
        assert!(back.identity.has_secret());
        assert_eq!(back.world_public, id.world_public);
        assert_eq!(back.address().as_u64(), id.identity.address().to_u64());

        let broken = |key: &str, value: Option<&str>| {
            let mut d = data.clone();
            match value {
                Some(v) => d.insert(key.to_owned(), ByteString(v.as_bytes().to_vec())),
                None => d.remove(key),
            };
            ControllerIdentity::from_secret_data(&d).unwrap_err()
        };
        let e = broken(IDENTITY_SECRET_KEY, None);
        assert!(e.contains("identity.secret is missing"), "{e}");
        let e = broken(IDENTITY_SECRET_KEY, Some("garbage"));
        assert!(e.starts_with("key identity.secret"), "{e}");
        let e = broken(IDENTITY_SECRET_KEY, Some(&id.identity.to_string()));
        assert!(e.contains("no secret key"), "{e}");
        let other = ControllerIdentity::generate().unwrap();
        let e = broken(IDENTITY_PUBLIC_KEY, Some(&other.identity.to_string()));
        assert!(e.contains("does not match"), "{e}");
        let e = broken(WORLD_PUBLIC_KEY, Some(&hex::encode(other.world_public)));
        assert!(e.contains("world.public does not match"), "{e}");
        let e = broken(WORLD_SECRET_KEY, Some("abc"));
        assert!(e.contains("128 hex digits"), "{e}");
        // A secret key that is not the public key's.
        let mut mixed = other.identity.to_string();
        mixed.push(':');
        mixed.push_str(
            id.identity
                .to_secret_string()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap(),
        );
        let e = broken(IDENTITY_SECRET_KEY, Some(&mixed));
        assert!(e.contains("do not belong together"), "{e}");
    }
}
