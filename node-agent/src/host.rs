//! The host's VL1 state in the state directory: its identity (`identity.secret`, `0600`, and
//! `identity.public`, in ZeroTier's text forms) and its planet (`planet`, the serialized world
//! ZeroTier One reads).
//!
//! A file that exists but does not parse or validate is [`StateError::Corrupt`] naming its path:
//! the agent refuses to start rather than silently regenerate an identity.

use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::AtomicBool;

use flatwire_vl1::{Identity, World};

use crate::state::{Sensitivity, StateDir, StateError};

/// The secret identity file (`address:0:public:secret`).
pub const IDENTITY_SECRET: &str = "identity.secret";
/// The public identity file (`address:0:public`).
pub const IDENTITY_PUBLIC: &str = "identity.public";
/// The planet file.
pub const PLANET: &str = "planet";

/// Errors of loading the host's VL1 state.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A state file could not be read or written, or is corrupted.
    #[error(transparent)]
    State(#[from] StateError),
    /// Generating the identity failed.
    #[error("cannot generate the host identity: {0}")]
    Generate(String),
    /// The `--planet` file given on the command line is unusable.
    #[error("planet file {}: {reason}", path.display())]
    PlanetArg {
        /// The file given.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `--root` was asked but this identity is not a root of the planet.
    #[error(
        "--root: this node ({address}) is not one of the roots of planet {planet_id} \
         (roots: {roots}); run it without --root or use a planet that lists it"
    )]
    NotARoot {
        /// Our address.
        address: String,
        /// The planet's ID.
        planet_id: u64,
        /// The planet's root addresses, comma separated.
        roots: String,
    },
}

pub(crate) fn parse_secret_identity(bytes: &[u8]) -> Result<Identity, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
    let id = Identity::from_str(text.trim()).map_err(|e| e.to_string())?;
    if !id.has_secret() {
        return Err("no secret key".into());
    }
    if !id.locally_validate() {
        return Err("the address does not match the keys".into());
    }
    let secret_hex = text.trim().rsplit(':').next().unwrap_or("");
    let secret: Option<Vec<u8>> = (0..secret_hex.len())
        .step_by(2)
        .map(|i| {
            secret_hex
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect();
    let secret: [u8; 64] = secret
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| "bad secret key".to_string())?;
    if flatwire_vl1::identity::public_key_of(&secret) != *id.public_key() {
        return Err("the secret key does not belong to the public key".into());
    }
    Ok(id)
}

/// Loads the host identity; `None` when `identity.secret` does not exist. Checks that
/// `identity.public`, when present, matches.
pub fn load_identity(state: &StateDir) -> Result<Option<Identity>, HostError> {
    let Some(id) = state.read_with(IDENTITY_SECRET, parse_secret_identity)? else {
        return Ok(None);
    };
    let expected = id.to_public();
    state.read_with(IDENTITY_PUBLIC, |b| {
        let text = std::str::from_utf8(b).map_err(|_| "not UTF-8 text".to_string())?;
        match Identity::from_str(text.trim()) {
            Ok(p) if p == expected => Ok(()),
            Ok(_) => Err(format!("does not match {IDENTITY_SECRET}")),
            Err(e) => Err(e.to_string()),
        }
    })?;
    Ok(Some(id))
}

/// Writes `id` as the host identity (secret `0600`, public `0644`), atomically.
pub fn store_identity(state: &StateDir, id: &Identity) -> Result<(), HostError> {
    let secret = id
        .to_secret_string()
        .ok_or_else(|| HostError::Generate("the identity has no secret key".into()))?;
    state.write(
        IDENTITY_SECRET,
        format!("{secret}\n").as_bytes(),
        Sensitivity::Secret,
    )?;
    state.write(
        IDENTITY_PUBLIC,
        format!("{id}\n").as_bytes(),
        Sensitivity::Public,
    )?;
    Ok(())
}

/// Loads the host identity, generating and storing one when there is none. Generation takes
/// a memory-hard hash search (around a second): call it on a blocking thread.
pub fn load_or_generate_identity(
    state: &StateDir,
    cancel: &AtomicBool,
) -> Result<(Identity, bool), HostError> {
    if let Some(id) = load_identity(state)? {
        return Ok((id, false));
    }
    let id = Identity::generate(cancel).map_err(|e| HostError::Generate(e.to_string()))?;
    store_identity(state, &id)?;
    Ok((id, true))
}

fn parse_planet(bytes: &[u8]) -> Result<World, String> {
    let (w, _) = World::parse(bytes).map_err(|e| e.to_string())?;
    if w.roots.is_empty() {
        return Err("the planet lists no roots".into());
    }
    Ok(w)
}

/// The planet: `arg` (a file given with `--planet`) is parsed and copied into the state
/// directory; without it, the one in the state directory. `None` when there is neither.
pub fn load_planet(state: &StateDir, arg: Option<&Path>) -> Result<Option<World>, HostError> {
    if let Some(path) = arg {
        let bytes = std::fs::read(path).map_err(|e| HostError::PlanetArg {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let w = parse_planet(&bytes).map_err(|reason| HostError::PlanetArg {
            path: path.to_path_buf(),
            reason,
        })?;
        store_planet(state, &w)?;
        return Ok(Some(w));
    }
    Ok(state.read_with(PLANET, parse_planet)?)
}

/// Writes the planet atomically (used for `--planet` and for updates pushed by a root).
pub fn store_planet(state: &StateDir, planet: &World) -> Result<(), HostError> {
    state.write(PLANET, &planet.serialize(false), Sensitivity::Public)?;
    Ok(())
}

/// Checks that `id` is one of `planet`'s roots (what `--root` requires).
pub fn check_root(planet: &World, id: &Identity) -> Result<(), HostError> {
    if planet
        .roots
        .iter()
        .any(|r| r.identity.address() == id.address() && r.identity == id.to_public())
    {
        return Ok(());
    }
    Err(HostError::NotARoot {
        address: id.address().to_string(),
        planet_id: planet.id,
        roots: planet
            .roots
            .iter()
            .map(|r| r.identity.address().to_string())
            .collect::<Vec<_>>()
            .join(","),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flatwire_vl1::{Root, WorldType};
    use std::os::unix::fs::PermissionsExt;

    fn planet_of(root: &Identity) -> World {
        let (pk, sk) = flatwire_vl1::identity::generate_key_pair().unwrap();
        World::create(
            WorldType::Planet,
            7,
            1,
            pk,
            vec![Root {
                identity: root.clone(),
                stable_endpoints: vec!["198.18.0.1:9993".parse().unwrap()],
            }],
            &sk,
        )
        .unwrap()
    }

    #[test]
    fn identity_is_generated_once_then_kept() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let stop = AtomicBool::new(false);
        let (a, fresh) = load_or_generate_identity(&s, &stop).unwrap();
        assert!(fresh);
        let (b, fresh) = load_or_generate_identity(&s, &stop).unwrap();
        assert!(!fresh);
        assert_eq!(a.address(), b.address());
        assert_eq!(a, b);
        let secret = s.path(IDENTITY_SECRET).unwrap();
        assert_eq!(
            std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let public = std::fs::read_to_string(s.path(IDENTITY_PUBLIC).unwrap()).unwrap();
        assert_eq!(public.trim(), a.to_string());
        assert!(public.starts_with(&a.address().to_string()));
    }

    #[test]
    fn corrupt_identity_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let path = s.path(IDENTITY_SECRET).unwrap();
        for bad in [&b"garbage"[..], b"", &[0xff, 0xfe]] {
            std::fs::write(&path, bad).unwrap();
            let e = load_or_generate_identity(&s, &AtomicBool::new(false)).unwrap_err();
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        // A secret whose public half was swapped for another identity's does not validate.
        let a = Identity::generate(&AtomicBool::new(false)).unwrap();
        let b = Identity::generate(&AtomicBool::new(false)).unwrap();
        let sa = a.to_secret_string().unwrap();
        let forged = format!("{}{}", &b.to_string(), &sa[sa.rfind(':').unwrap()..]);
        std::fs::write(&path, forged).unwrap();
        assert!(load_identity(&s).is_err());
        // A public file that does not match the secret is corrupt too.
        store_identity(&s, &a).unwrap();
        let public = s.path(IDENTITY_PUBLIC).unwrap();
        std::fs::write(&public, b.to_string()).unwrap();
        let e = load_identity(&s).unwrap_err();
        assert!(e.to_string().contains(&public.display().to_string()), "{e}");
    }

    #[test]
    fn planet_from_argument_is_copied_and_roots_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path().join("home")).unwrap();
        assert!(load_planet(&s, None).unwrap().is_none());
        let root = Identity::generate(&AtomicBool::new(false)).unwrap();
        let other = Identity::generate(&AtomicBool::new(false)).unwrap();
        let planet = planet_of(&root);
        let file = dir.path().join("planet.in");
        std::fs::write(&file, planet.serialize(false)).unwrap();
        assert_eq!(load_planet(&s, Some(&file)).unwrap(), Some(planet.clone()));
        assert_eq!(load_planet(&s, None).unwrap(), Some(planet.clone()));
        check_root(&planet, &root).unwrap();
        let e = check_root(&planet, &other).unwrap_err().to_string();
        assert!(e.contains(&other.address().to_string()), "{e}");
        assert!(e.contains(&root.address().to_string()), "{e}");

        std::fs::write(&file, b"nope").unwrap();
        let e = load_planet(&s, Some(&file)).unwrap_err().to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        std::fs::write(s.path(PLANET).unwrap(), b"nope").unwrap();
        let e = load_planet(&s, None).unwrap_err().to_string();
        assert!(e.contains("corrupted"), "{e}");
    }
}
