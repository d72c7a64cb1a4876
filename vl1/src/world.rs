//! Worlds (planets and moons): signed lists of root servers (spec 15).

use std::net::SocketAddr;

use crate::identity::{
    self, Identity, PUBLIC_KEY_LEN, SECRET_KEY_LEN, SIGNATURE_LEN, sign_with_secret_key,
};
use crate::wire::{Reader, WireError, write_inet};

/// Most roots in one world.
pub const MAX_ROOTS: usize = 4;
/// Most stable endpoints per root.
pub const MAX_STABLE_ENDPOINTS: usize = 32;

/// World type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WorldType {
    /// Null (placeholder).
    Null,
    /// The planet.
    Planet,
    /// A user-defined moon.
    Moon,
}

impl WorldType {
    /// Wire value.
    pub fn to_u8(self) -> u8 {
        match self {
            WorldType::Null => 0,
            WorldType::Planet => 1,
            WorldType::Moon => 127,
        }
    }
    /// From the wire value.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(WorldType::Null),
            1 => Some(WorldType::Planet),
            127 => Some(WorldType::Moon),
            _ => None,
        }
    }
}

/// One root: its public identity and stable endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    /// Root identity (public).
    pub identity: Identity,
    /// Known addresses of the root.
    pub stable_endpoints: Vec<SocketAddr>,
}

/// A planet or moon definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    /// Planet, moon or null.
    pub world_type: WorldType,
    /// World ID.
    pub id: u64,
    /// Revision timestamp (ms).
    pub timestamp: u64,
    /// Public key whose secret must sign the next revision.
    pub updates_must_be_signed_by: [u8; PUBLIC_KEY_LEN],
    /// Signature of this revision by the previous revision's key.
    pub signature: [u8; SIGNATURE_LEN],
    /// The roots.
    pub roots: Vec<Root>,
}

/// Errors from world handling.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WorldError {
    /// Malformed serialization.
    #[error("malformed world: {0}")]
    Wire(#[from] WireError),
    /// Too many roots or endpoints.
    #[error("world exceeds limits")]
    Limits,
}

impl World {
    /// Parses one serialized world from the start of `b`; returns it and bytes used.
    pub fn parse(b: &[u8]) -> Result<(World, usize), WorldError> {
        let mut r = Reader::new(b);
        let world_type = WorldType::from_u8(r.u8()?).ok_or(WireError::Invalid("world type"))?;
        let id = r.u64()?;
        let timestamp = r.u64()?;
        let updates_must_be_signed_by = r.array()?;
        let signature = r.array()?;
        let n = r.u8()? as usize;
        if n > MAX_ROOTS {
            return Err(WorldError::Limits);
        }
        let mut roots = Vec::with_capacity(n);
        for _ in 0..n {
            let identity = r.identity()?.to_public();
            let e = r.u8()? as usize;
            if e > MAX_STABLE_ENDPOINTS {
                return Err(WorldError::Limits);
            }
            let mut stable_endpoints = Vec::with_capacity(e);
            for _ in 0..e {
                if let Some(a) = r.inet()? {
                    stable_endpoints.push(a);
                }
            }
            roots.push(Root {
                identity,
                stable_endpoints,
            });
        }
        if world_type == WorldType::Moon {
            let d = r.u16()? as usize;
            r.bytes(d)?;
        }
        Ok((
            World {
                world_type,
                id,
                timestamp,
                updates_must_be_signed_by,
                signature,
                roots,
            },
            r.pos(),
        ))
    }

    /// Serializes the world; `for_signing` gives the exact signed message (with the
    /// 0x7f/0xf7 guards and without the signature).
    pub fn serialize(&self, for_signing: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        if for_signing {
            out.extend_from_slice(&[0x7f; 8]);
        }
        out.push(self.world_type.to_u8());
        out.extend_from_slice(&self.id.to_be_bytes());
        out.extend_from_slice(&self.timestamp.to_be_bytes());
        out.extend_from_slice(&self.updates_must_be_signed_by);
        if !for_signing {
            out.extend_from_slice(&self.signature);
        }
        out.push(self.roots.len() as u8);
        for root in &self.roots {
            root.identity.write_bytes(false, &mut out);
            out.push(root.stable_endpoints.len() as u8);
            for e in &root.stable_endpoints {
                write_inet(&mut out, Some(*e));
            }
        }
        if self.world_type == WorldType::Moon {
            out.extend_from_slice(&0u16.to_be_bytes());
        }
        if for_signing {
            out.extend_from_slice(&[0xf7; 8]);
        }
        out
    }

    /// Creates a world and signs it with `signing_secret` (the secret of the previous
    /// revision's `updates_must_be_signed_by`, or of its own key for a first revision).
    pub fn create(
        world_type: WorldType,
        id: u64,
        timestamp: u64,
        updates_must_be_signed_by: [u8; PUBLIC_KEY_LEN],
        roots: Vec<Root>,
        signing_secret: &[u8; SECRET_KEY_LEN],
    ) -> Result<World, WorldError> {
        if roots.len() > MAX_ROOTS
            || roots
                .iter()
                .any(|r| r.stable_endpoints.len() > MAX_STABLE_ENDPOINTS)
        {
            return Err(WorldError::Limits);
        }
        let mut w = World {
            world_type,
            id,
            timestamp,
            updates_must_be_signed_by,
            signature: [0u8; SIGNATURE_LEN],
            roots: roots
                .into_iter()
                .map(|r| Root {
                    identity: r.identity.to_public(),
                    stable_endpoints: r.stable_endpoints,
                })
                .collect(),
        };
        w.signature = sign_with_secret_key(signing_secret, &w.serialize(true));
        Ok(w)
    }

    /// Whether this world's signature verifies against `key`.
    pub fn verify_signature(&self, key: &[u8; PUBLIC_KEY_LEN]) -> bool {
        identity::verify_with_public_key(key, &self.serialize(true), &self.signature)
    }

    /// The update rule (spec 15.3): whether `update` should replace `self`. Requires the
    /// same type and ID, a strictly newer timestamp, and a signature by `self`'s
    /// `updates_must_be_signed_by` key. A null current world accepts any planet or moon.
    pub fn should_replace_with(&self, update: &World) -> bool {
        if update.world_type == WorldType::Null {
            return false;
        }
        if self.world_type == WorldType::Null || self.id == 0 {
            return true;
        }
        update.world_type == self.world_type
            && update.id == self.id
            && update.timestamp > self.timestamp
            && update.verify_signature(&self.updates_must_be_signed_by)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn create_sign_parse_and_update() {
        let root = Identity::generate(&AtomicBool::new(false)).unwrap();
        let (p1, s1) = identity::generate_key_pair().unwrap();
        let (p2, s2) = identity::generate_key_pair().unwrap();
        let roots = vec![Root {
            identity: root.clone(),
            stable_endpoints: vec!["192.0.2.1:9993".parse().unwrap()],
        }];
        let w1 = World::create(WorldType::Moon, 42, 1000, p1, roots.clone(), &s1).unwrap();
        assert!(w1.verify_signature(&p1));
        let bytes = w1.serialize(false);
        let (back, used) = World::parse(&bytes).unwrap();
        assert_eq!((back.clone(), used), (w1.clone(), bytes.len()));
        // Next revision: signed by w1's key, hands over to p2.
        let w2 = World::create(WorldType::Moon, 42, 2000, p2, roots.clone(), &s1).unwrap();
        assert!(w1.should_replace_with(&w2));
        assert!(!w2.should_replace_with(&w1), "older");
        let forged = World::create(WorldType::Moon, 42, 3000, p2, roots.clone(), &s2).unwrap();
        assert!(!w1.should_replace_with(&forged), "wrong key");
        assert!(
            w2.should_replace_with(&forged),
            "right key for w2's successor"
        );
        let other = World::create(WorldType::Moon, 43, 3000, p2, roots, &s1).unwrap();
        assert!(!w1.should_replace_with(&other), "other id");
    }
}
